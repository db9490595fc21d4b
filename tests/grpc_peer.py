#!/usr/bin/env python3
"""A real gRPC server and client (grpcio) for tests/http2.rs, without generated code:
methods are registered generically and messages are raw bytes.

  grpc_peer.py server NAME      serves on 127.0.0.1:<ephemeral>, prints "PORT <n>", runs
                                until stdin closes
  grpc_peer.py client HOST:PORT runs unary, server-streaming, client-streaming and bidi
                                calls plus one failing call; prints one JSON object
"""
import json
import sys
from concurrent import futures

import grpc

SERVICE = "ballast.test.Echo"


def server(name):
    def unary(request, context):
        context.set_trailing_metadata((("x-trailer", "unary-" + name),))
        return b"unary:" + request

    def server_stream(request, context):
        context.set_trailing_metadata((("x-trailer", "stream-" + name),))
        for i in range(int(request.decode() or "0")):
            yield b"item-%d" % i

    def client_stream(request_iterator, context):
        total = b"".join(request_iterator)
        context.set_trailing_metadata((("x-trailer", "sum-" + name),))
        return b"got:%d" % len(total)

    def bidi(request_iterator, context):
        for req in request_iterator:
            yield b"echo:" + req

    def fail(request, context):
        context.set_trailing_metadata((("x-why", "on-purpose"),))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused by " + name)

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    print("PORT %d" % port, flush=True)
    sys.stdin.read()
    srv.stop(0)


def client(target):
    out = {}
    with grpc.insecure_channel(target) as ch:
        m = lambda kind, name: getattr(ch, kind)("/%s/%s" % (SERVICE, name))
        resp, call = m("unary_unary", "Unary").with_call(b"hello", timeout=10)
        out["unary"] = resp.decode()
        out["unary_trailer"] = dict(call.trailing_metadata()).get("x-trailer")
        stream = m("unary_stream", "ServerStream")(b"5", timeout=10)
        out["server_stream"] = [r.decode() for r in stream]
        out["server_stream_trailer"] = dict(stream.trailing_metadata()).get("x-trailer")
        resp, call = m("stream_unary", "ClientStream").with_call(
            iter([b"a" * 1000, b"b" * 70000, b"c"]), timeout=10
        )
        out["client_stream"] = resp.decode()
        out["client_stream_trailer"] = dict(call.trailing_metadata()).get("x-trailer")
        out["bidi"] = [r.decode() for r in m("stream_stream", "Bidi")(iter([b"x", b"y", b"z"]), timeout=10)]
        try:
            m("unary_unary", "Fail")(b"", timeout=10)
            out["fail"] = "no error"
        except grpc.RpcError as e:
            out["fail"] = "%s %s" % (e.code().name, e.details())
            out["fail_trailer"] = dict(e.trailing_metadata()).get("x-why")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2])
    else:
        client(sys.argv[2])
