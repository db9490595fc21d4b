//! `ballast::h1::server` on real TCP sockets (127.0.0.1, ephemeral ports): hyper's client
//! for well-formed traffic (an independent implementation reads what the server writes),
//! raw bytes for the edges. Each test's server reports how each connection ended.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use ballast::h1::server::{self, Ending, RequestBody, ServerConfig};
use ballast::h1::Limits;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

/// A body of given frames, of unknown length (so it goes out chunked); an `Err` frame fails it.
struct Frames(VecDeque<Result<&'static str, &'static str>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|f| match f {
            Ok(s) => Ok(Frame::data(Bytes::from_static(s.as_bytes()))),
            Err(e) => Err(e.into()),
        }))
    }
}

type Out = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn full(s: impl Into<Bytes>) -> Out {
    Full::new(s.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

/// Routes: `/echo` answers the body; `/count` the body's length (or `body error: ...`
/// with 400); `/stream` three chunks; `/fail` a chunk then an error; `/noread` 200 without
/// reading the body; `/204`; `/upgrade` 101.
async fn service(req: Request<RequestBody>) -> Response<Out> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/echo" | "/count" => match req.into_body().collect().await {
            Ok(body) if path == "/echo" => Response::new(full(body.to_bytes())),
            Ok(body) => Response::new(full(body.to_bytes().len().to_string())),
            Err(e) => {
                let mut r = Response::new(full(format!("body error: {e}")));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        },
        "/stream" => {
            Response::new(Frames(vec![Ok("one,"), Ok("two,"), Ok("three")].into()).boxed())
        }
        "/fail" => {
            Response::new(Frames(vec![Ok("partial"), Err("backend went away")].into()).boxed())
        }
        "/204" => {
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        "/upgrade" => {
            let mut r = Response::new(full(""));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "echo".parse().unwrap());
            r.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            r
        }
        _ => Response::new(full("ok")),
    }
}

struct Server {
    addr: std::net::SocketAddr,
    endings: mpsc::UnboundedReceiver<String>,
    shutdown: CancellationToken,
}

impl Server {
    async fn start(config: ServerConfig) -> Server {
        Server::start_with(config, None).await
    }

    /// `rcvbuf`: the accepted sockets' receive buffer (inherited from the listening socket).
    async fn start_with(config: ServerConfig, rcvbuf: Option<u32>) -> Server {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener: TcpListener = socket.listen(64).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, endings) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let shared = server::Server {
                    config,
                    shutdown: token.clone(),
                };
                tokio::spawn(async move {
                    let ending = match server::serve(stream, &shared, service).await {
                        Ending::Upgraded { mut io, read_ahead } => {
                            // An echo protocol: what came with the head, then the rest.
                            let _ = io.write_all(&read_ahead).await;
                            let (mut r, mut w) = io.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            format!("Upgraded({})", String::from_utf8_lossy(&read_ahead))
                        }
                        Ending::Refused(r) => format!("Refused({})", r.status.as_u16()),
                        Ending::Io(e) => format!("Io({})", e.kind()),
                        other => format!("{other:?}"),
                    };
                    let _ = tx.send(ending);
                });
            }
        });
        Server {
            addr,
            endings,
            shutdown,
        }
    }

    async fn ending(&mut self) -> String {
        tokio::time::timeout(WAIT, self.endings.recv())
            .await
            .expect("a connection ended within 5 s")
            .expect("server running")
    }
}

fn config() -> ServerConfig {
    ServerConfig {
        limits: Limits {
            max_head: 4096,
            max_headers: 32,
        },
        head_timeout: Duration::from_secs(3),
        keepalive_timeout: Duration::from_secs(3),
        read_size: 8192,
        first_request_grace: Duration::from_secs(1),
        relay_fields: false,
    }
}

/// Writes `raw`, then reads until the server closes.
async fn raw(server: &Server, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the server closed within 5 s")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `pattern` has arrived (the connection stays open).
async fn read_until(s: &mut TcpStream, pattern: &str) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&out).contains(pattern) {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "closed before {pattern:?}: {:?}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no {pattern:?} within 5 s: {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hyper_client_keeps_one_connection_for_many_exchanges() {
    let mut server = Server::start(config()).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Out>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let big = "x".repeat(100_000);
    let requests: Vec<(&str, Out, &str)> = vec![
        ("/echo", full(""), ""),
        ("/echo", full("hello"), "hello"),
        (
            "/echo",
            Frames(vec![Ok("chunked "), Ok("upload")].into()).boxed(),
            "chunked upload",
        ),
        ("/stream", full(""), "one,two,three"),
        ("/count", full(big), "100000"),
    ];
    for (path, body, expect) in requests {
        let req = Request::post(path).header("host", "a").body(body).unwrap();
        let resp = tokio::time::timeout(WAIT, send.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers().contains_key("date"), "{path}: no Date");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, expect.as_bytes(), "{path}");
    }
    drop(send);
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let mut server = Server::start(config()).await;
    let out = raw(
        &server,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nfirstGET /stream HTTP/1.1\r\nHost: a\r\n\r\nGET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let first = out.find("first").expect("first answer");
    let second = out
        .find("5\r\nthree\r\n0\r\n\r\n")
        .expect("second answer, chunked");
    let third = out.rfind("HTTP/1.1 200 OK").unwrap();
    assert!(first < second && second < third, "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
    assert!(out[third..].contains("connection: close"), "{out}");
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn refused_heads_are_answered_and_closed() {
    let mut server = Server::start(config()).await;
    for (request, status) in [
        (&b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"[..], 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
        ),
    ] {
        let out = raw(&server, request).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert_eq!(server.ending().await, format!("Refused({status})"));
    }
    // Both Transfer-Encoding and Content-Length: served by chunked framing, and the
    // connection closes after the answer (nothing after it on the connection is trusted).
    let out = raw(
        &server,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /echo HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert_eq!(server.ending().await, "Closed");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-A: {}\r\n\r\n",
        "a".repeat(5000)
    );
    let out = raw(&server, huge.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    assert_eq!(server.ending().await, "Refused(431)");
}

#[tokio::test]
async fn a_refused_upload_still_reads_its_answer() {
    // The head is refused while 200 KB of body follow, more than the small socket buffers
    // hold: the server lingers, reading and dropping them, so its close does not reset the
    // connection while the client is still sending (a reset fails the client's write, and
    // on many systems discards the answer it has not read yet).
    let mut server = Server::start_with(config(), Some(4096)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    let s = socket.connect(server.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut req = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\nContent-Length: 200001\r\n\r\n".to_vec();
        req.extend(std::iter::repeat_n(b'x', 200_000));
        wr.write_all(&req).await
    });
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, rd.read_to_end(&mut out))
        .await
        .expect("the server closed within 5 s")
        .expect("no reset before the answer was read");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    writer.await.unwrap().expect("the whole upload was taken");
    assert_eq!(server.ending().await, "Refused(400)");
}

#[tokio::test]
async fn expect_continue_gets_100_before_the_body() {
    let mut server = Server::start(config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"PUT /count HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = read_until(&mut s, "\r\n\r\n").await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let out = read_until(&mut s, "\r\n\r\n5").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    drop(s);
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn head_and_204_answers_have_no_body_and_the_connection_goes_on() {
    let mut server = Server::start(config()).await;
    let out = raw(
        &server,
        b"HEAD /echo HTTP/1.1\r\nHost: a\r\n\r\nGET /204 HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answers: Vec<&str> = out.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert!(
        answers[0].starts_with("200 OK\r\n") && answers[0].contains("content-length: 0\r\n"),
        "{out}"
    );
    assert!(
        answers[0].ends_with("\r\n\r\n"),
        "a HEAD answer carried a body: {out}"
    );
    assert!(
        answers[1].starts_with("204 No Content\r\n") && answers[1].ends_with("\r\n\r\n"),
        "{out}"
    );
    assert!(!answers[1].contains("transfer-encoding"), "{out}");
    assert!(answers[2].ends_with("\r\n\r\nok"), "{out}");
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn http_1_0_clients() {
    let mut server = Server::start(config()).await;
    // No keep-alive asked: a body of unknown length is delimited by the close.
    let out = raw(&server, b"GET /stream HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        !out.contains("transfer-encoding"),
        "chunked to an HTTP/1.0 client: {out}"
    );
    assert!(
        out.contains("connection: close\r\n") && out.ends_with("\r\n\r\none,two,three"),
        "{out}"
    );
    assert_eq!(server.ending().await, "Closed");
    // Keep-alive asked, sized body: kept, and said so.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let out = read_until(&mut s, "\r\n\r\nok").await;
    assert!(out.contains("connection: keep-alive\r\n"), "{out}");
    s.write_all(b"GET /x HTTP/1.0\r\n\r\n").await.unwrap();
    let out = read_to_close(&mut s).await;
    assert!(
        out.ends_with("\r\n\r\nok") && out.contains("connection: close\r\n"),
        "{out}"
    );
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn bad_or_cut_request_bodies_reach_the_service_as_errors() {
    let mut server = Server::start(config()).await;
    let out = raw(
        &server,
        b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
    assert!(
        out.contains("body error: request body: invalid chunk size"),
        "{out}"
    );
    assert!(out.contains("connection: close"), "{out}");
    assert_eq!(server.ending().await, "Closed");

    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let out = read_to_close(&mut s).await;
    assert!(
        out.contains("body error: request body: body ended before its declared length"),
        "{out}"
    );
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn an_unread_request_body_closes_the_connection() {
    let mut server = Server::start(config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nsome of it")
        .await
        .unwrap();
    let out = read_to_close(&mut s).await;
    assert!(
        out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("ok"),
        "{out}"
    );
    // The answer says the connection closes (it came before the body was read).
    assert!(
        out.to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{out}"
    );
    // The server lingers for the rest of the upload (up to 1 s); closing ends that.
    drop(s);
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn timers_idle_keep_alive_and_slow_heads() {
    let mut server = Server::start(ServerConfig {
        head_timeout: Duration::from_millis(300),
        keepalive_timeout: Duration::from_millis(200),
        ..config()
    })
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let out = read_to_close(&mut s).await;
    assert!(out.ends_with("ok"), "{out}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    assert_eq!(server.ending().await, "Closed");

    let out = raw(&server, b"GET /x HTTP/1.1\r\nHo").await;
    assert!(out.starts_with("HTTP/1.1 408 "), "{out}");
    assert_eq!(server.ending().await, "HeadTimeout");
}

#[tokio::test]
async fn an_upgrade_hands_over_the_stream_with_what_came_after_the_head() {
    let mut server = Server::start(config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\nping",
    )
    .await
    .unwrap();
    let out = read_until(&mut s, "\r\n\r\nping").await;
    assert!(
        out.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{out}"
    );
    s.write_all(b"pong").await.unwrap();
    read_until(&mut s, "pong").await;
    drop(s);
    assert_eq!(server.ending().await, "Upgraded(ping)");
}

#[tokio::test]
async fn a_failing_response_body_is_cut_without_its_last_chunk() {
    let mut server = Server::start(config()).await;
    let out = raw(&server, b"GET /fail HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(
        out.contains("transfer-encoding: chunked") && out.ends_with("7\r\npartial\r\n"),
        "{out}"
    );
    assert_eq!(server.ending().await, "ResponseFailed");
}

/// Shutdown closes an idle keep-alive connection without a reset: a request the client
/// sends as it closes is read and dropped, so the client sees an orderly close (which HTTP
/// clients answer by resending on a new connection) and not ECONNRESET.
#[tokio::test]
async fn shutdown_closes_idle_connections_and_ends_the_current_exchange() {
    let mut server = Server::start(config()).await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, "\r\n\r\nok").await;
    server.shutdown.cancel();
    let rest = read_to_close(&mut s).await;
    assert_eq!(rest, "");
    // Requests that cross the close. Had the server closed its socket outright, the first
    // would draw a reset from its kernel, and a reset socket takes no more writes (EPIPE):
    // a request in flight there was lost to a reset instead of an orderly close.
    for path in ["/y", "/z"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        s.write_all(request.as_bytes())
            .await
            .expect("the server still reads what comes after its close");
    }
    drop(s);
    assert_eq!(server.ending().await, "Closed");
    // After shutdown, a request already on its way is answered, with `Connection: close`.
    let out = raw(&server, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(
        out.contains("connection: close\r\n") && out.ends_with("ok"),
        "{out}"
    );
    assert_eq!(server.ending().await, "Closed");
}

#[tokio::test]
async fn after_shutdown_a_silent_new_connection_gets_only_the_first_request_grace() {
    let mut server = Server::start(ServerConfig {
        first_request_grace: Duration::from_millis(300),
        relay_fields: false,
        ..config()
    })
    .await;
    server.shutdown.cancel();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let start = std::time::Instant::now();
    let rest = read_to_close(&mut s).await;
    let held = start.elapsed();
    assert_eq!(rest, "");
    // Closed after the grace, well before head_timeout (3 s).
    assert!(
        held >= Duration::from_millis(250) && held < Duration::from_secs(2),
        "held {held:?}"
    );
    assert_eq!(server.ending().await, "Closed");
}
