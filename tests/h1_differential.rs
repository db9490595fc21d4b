//! Differential test of ballast's HTTP/1.1 framing (`ballast::h1`) against hyper's HTTP/1
//! server, on a corpus of valid and hostile requests.
//!
//! Each case's bytes go to both. hyper runs as a real server connection (over an in-memory
//! duplex stream; framing does not depend on the transport) whose service records every
//! request and its whole body; its own error answers are read from what it writes back.
//! ballast's verdict comes from `h1::parse_request` and `h1::BodyDecoder` fed the same
//! bytes. The two must agree on every case, except those marked `differs`: there ballast is
//! deliberately stricter than hyper (the reason is given), and the test checks that they
//! still differ, so the list stays true. ballast's own server connection (`h1::server`) is
//! fed the corpus too, and must read every case exactly as the framing functions do.
//!
//! The client side the same way: a corpus of backends' answers to `GET /`, read by
//! ballast's client connection (`h1::client`) and by hyper's, each over a duplex stream to a
//! backend that writes the bytes and closes; status, body and where it failed must agree.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast::h1::{self, BodyDecoder, Framing, Limits};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMITS: Limits = Limits {
    max_head: 4096,
    max_headers: 16,
};

/// What a server made of the bytes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// A request (method, target, version) with its whole body.
    Request(String, String, String, Vec<u8>),
    /// The head was refused with this status.
    Refused(u16),
    /// The body's framing was invalid or the body was cut short.
    BadBody,
}

/// Bytes one side sends: a client's requests (`corpus`) or a backend's answer (`replies`).
struct Case {
    name: &'static str,
    raw: &'static [u8],
    /// Why ballast deliberately differs from hyper here.
    differs: Option<&'static str>,
}

const fn same(name: &'static str, raw: &'static [u8]) -> Case {
    Case {
        name,
        raw,
        differs: None,
    }
}

const fn differs(name: &'static str, raw: &'static [u8], why: &'static str) -> Case {
    Case {
        name,
        raw,
        differs: Some(why),
    }
}

const HOST: &str = "RFC 9112 §3.2: a server MUST answer 400 without exactly one valid Host \
     (ballast's proxy layer already refuses a missing or repeated Host after hyper's parse)";

fn corpus() -> Vec<Case> {
    vec![
        // Valid requests.
        same("get", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("get with query", b"GET /p/q?x=1&y=%20 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"),
        same("absolute form", b"GET http://a.example/p HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        same("options asterisk", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("post length", b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"),
        same("post length zero", b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"),
        same("post equal repeated lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
        same("post length list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc"),
        same("post length leading zeros", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 003\r\n\r\nabc"),
        same("chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        same("chunked upper-case hex", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n"),
        same("chunked extensions", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;name=value;x\r\nabc\r\n0;end\r\n\r\n"),
        same("chunked trailers", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n"),
        same("pipelined three", b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET /3 HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("pipelined after chunked", b"POST /1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("http/1.0 keep-alive", b"GET /1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /2 HTTP/1.0\r\n\r\nGET /3 HTTP/1.0\r\n\r\n"),
        same("http/1.1 close stops the connection", b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("expect 100-continue", b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\ndata"),
        same("upgrade request", b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
        same("bare lf line ends", b"GET / HTTP/1.1\nHost: a\n\n"),
        same("head", b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("empty line before request", b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("obs-text in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: caf\xc3\xa9\r\n\r\n"),
        // Hostile or broken heads.
        same("te and cl", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        same("cl after te", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
        same("te chunked not last", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
        same("te unknown only", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
        differs("te unknown then chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "RFC 9112 §6.1: 501 for a coding the server does not implement; hyper passes gzip on undecoded"),
        differs("te chunked twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
            "RFC 9112 §6.1: chunked MUST NOT be applied twice; hyper reads it once"),
        differs("te chunked on two lines", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "RFC 9112 §6.1: chunked twice across lines; hyper looks at the last line only"),
        differs("te gzip line then chunked line", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "the lines form one list, gzip then chunked: 501 as above"),
        same("te in http/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        same("cl differing lines", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        same("cl differing list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd"),
        same("cl plus sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc"),
        same("cl negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
        same("cl hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc"),
        same("cl inner space", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n"),
        same("cl empty", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n"),
        same("cl overflow", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n"),
        same("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n"),
        same("obs-fold tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2\r\n\r\n"),
        same("bare cr in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n"),
        same("bare cr line end", b"GET / HTTP/1.1\rHost: a\r\n\r\n"),
        same("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
        same("space before colon on length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\n\r\nabc"),
        same("space in name", b"GET / HTTP/1.1\r\nHost: a\r\nX A: 1\r\n\r\n"),
        same("space before first field", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n"),
        same("nul in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n"),
        same("nul in target", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("double space in request line", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
        same("http/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n"),
        same("http/2.0 in h1", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
        same("lower-case version", b"GET / http/1.1\r\nHost: a\r\n\r\n"),
        same("invalid method token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n"),
        differs("relative target", b"GET x HTTP/1.1\r\nHost: a\r\n\r\n",
            "RFC 9112 §3.2: origin-form starts with '/'; hyper's Uri takes 'x' as an authority"),
        differs("asterisk with get", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            "RFC 9112 §3.2.4: asterisk-form is only for OPTIONS"),
        same("too many fields", b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\nF: 1\r\nG: 1\r\nH: 1\r\nI: 1\r\nJ: 1\r\nK: 1\r\nL: 1\r\nM: 1\r\nN: 1\r\nO: 1\r\nP: 1\r\n\r\n"),
        differs("no host", b"GET / HTTP/1.1\r\n\r\n", HOST),
        differs("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HOST),
        differs("host with space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", HOST),
        differs("host with userinfo", b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", HOST),
        differs("unknown expectation", b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
            "RFC 9110 §10.1.1 lets a server answer 417; hyper ignores the expectation"),
        // Hostile or broken bodies.
        same("chunk size overflow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n"),
        same("chunk size hex prefix", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n"),
        same("chunk size sign", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n"),
        same("chunk size missing", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\r\nabc\r\n0\r\n\r\n"),
        same("chunk data too long", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n"),
        same("chunk data without crlf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc0\r\n\r\n"),
        differs("chunk extension control char", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a\x01\r\nabc\r\n0\r\n\r\n",
            "RFC 9112 §7.1.1: an extension is tokens and quoted strings; hyper skips them unread"),
        same("chunk size bare lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"),
        same("chunk data bare lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\n0\r\n\r\n"),
        same("last chunk bare lf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\n\r\n"),
        same("body shorter than length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"),
        same("chunked body cut", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"),
        same("chunked without last chunk", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
    ]
}

/// ballast's reading: heads and bodies one after another until the bytes end, a message is
/// refused, or a message says the connection closes after it.
fn ballast(raw: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let (head, len) = match h1::parse_request(&raw[at..], &LIMITS) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => break,
            Err(e) => {
                events.push(Event::Refused(e.status.as_u16()));
                break;
            }
        };
        at += len;
        let mut decoder = BodyDecoder::new(head.framing, LIMITS.max_head);
        let mut body = Vec::new();
        let mut bad = false;
        while !decoder.is_done() {
            match decoder.decode(&raw[at..]) {
                Ok(step) => {
                    body.extend_from_slice(&raw[at..][step.data]);
                    at += step.consumed;
                    if at == raw.len() && !decoder.is_done() {
                        bad = decoder.end_of_input().is_err();
                        break;
                    }
                }
                Err(_) => {
                    bad = true;
                    break;
                }
            }
        }
        if bad {
            events.push(Event::BadBody);
            break;
        }
        events.push(Event::Request(
            head.method.to_string(),
            head.target.to_string(),
            format!("{:?}", head.version),
            body,
        ));
        if !head.keep_alive || head.framing == Framing::UntilClose {
            break;
        }
    }
    events
}

/// Final statuses other than the service's 200 in what a server wrote: its own refusals.
fn refusals(out: &[u8]) -> Vec<Event> {
    let out = String::from_utf8_lossy(out);
    out.split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|s| s.get(..3))
        .filter_map(|status| match status.parse::<u16>() {
            Ok(200) | Ok(100..=199) => None,
            Ok(code) => Some(Event::Refused(code)),
            Err(_) => panic!("unreadable status {status:?} in {out:?}"),
        })
        .collect()
}

/// What a service saw of one request (its whole body, or that the body failed).
async fn record<B>(req: hyper::Request<B>) -> Event
where
    B: hyper::body::Body,
{
    let method = req.method().to_string();
    let target = req.uri().to_string();
    let version = format!("{:?}", req.version());
    match req.into_body().collect().await {
        Ok(body) => Event::Request(method, target, version, body.to_bytes().to_vec()),
        Err(_) => Event::BadBody,
    }
}

/// ballast's HTTP/1.1 server connection (`h1::server`) fed the same bytes: it must read them
/// exactly as the framing functions do.
async fn ballast_server(raw: &'static [u8]) -> Vec<Event> {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record_to = seen.clone();
    let config = h1::server::ServerConfig {
        limits: LIMITS,
        head_timeout: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(5),
        read_size: 8192,
        first_request_grace: Duration::from_secs(1),
        relay_fields: false,
    };
    let serve = tokio::spawn(async move {
        let shared = h1::server::Server {
            config,
            shutdown: tokio_util::sync::CancellationToken::new(),
        };
        h1::server::serve(server, &shared, |req| {
            let record_to = record_to.clone();
            async move {
                let event = record(req).await;
                record_to.lock().unwrap().push(event);
                hyper::Response::new(Full::new(Bytes::from_static(b"ok")))
            }
        })
        .await;
    });
    client.write_all(raw).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
        .await
        .expect("ballast's server answered within 10 s")
        .unwrap();
    drop(client);
    let _ = serve.await;
    let mut events = seen.lock().unwrap().clone();
    events.extend(refusals(&out));
    events
}

/// hyper's reading, from a real server connection.
async fn hyper(raw: &'static [u8]) -> Vec<Event> {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record_to = seen.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let record_to = record_to.clone();
        async move {
            let event = record(req).await;
            record_to.lock().unwrap().push(event);
            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        // Keep serving after the client's write side ends, so the last request is answered.
        .half_close(true)
        .max_headers(LIMITS.max_headers)
        .max_buf_size(LIMITS.max_head.max(8192))
        .serve_connection(TokioIo::new(server), svc);
    let serve = tokio::spawn(conn);
    client.write_all(raw).await.unwrap();
    client.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out))
        .await
        .expect("hyper answered within 10 s")
        .unwrap();
    let _ = serve.await;
    let mut events = seen.lock().unwrap().clone();
    events.extend(refusals(&out));
    events
}

fn assert_none_wrong(wrong: &[String], cases: usize) {
    assert!(
        wrong.is_empty(),
        "{} of {cases} cases:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[tokio::test]
async fn ballast_s_server_reads_the_corpus_as_its_framing_functions_do() {
    let mut wrong = Vec::new();
    let cases = corpus();
    for case in &cases {
        let functions = ballast(case.raw);
        let server = ballast_server(case.raw).await;
        if functions != server {
            wrong.push(format!(
                "{}: functions {functions:?}, server {server:?}",
                case.name
            ));
        }
    }
    assert_none_wrong(&wrong, cases.len());
}

#[tokio::test]
async fn ballast_and_hyper_frame_the_corpus_alike_except_where_ballast_is_stricter() {
    let mut wrong = Vec::new();
    let cases = corpus();
    for case in &cases {
        let ours = ballast(case.raw);
        let theirs = hyper(case.raw).await;
        let refused = matches!(ours.last(), Some(Event::Refused(_) | Event::BadBody));
        judge(case.name, &ours, &theirs, case.differs, refused, &mut wrong);
    }
    assert_none_wrong(&wrong, cases.len());
}

/// Records where ballast and hyper disagree unexpectedly (or agree where ballast should
/// be stricter). Where ballast is stricter it refuses (`refused`): it never accepts what
/// hyper refuses.
fn judge<T: std::fmt::Debug + PartialEq>(
    name: &str,
    ours: &T,
    theirs: &T,
    differs: Option<&str>,
    refused: bool,
    wrong: &mut Vec<String>,
) {
    let agree = ours == theirs;
    println!(
        "{name:<40} {:<8} ballast {ours:?} / hyper {theirs:?}",
        if agree { "same" } else { "differs" },
    );
    match (agree, differs) {
        (true, None) | (false, Some(_)) => {}
        (false, None) => wrong.push(format!("{name}: ballast {ours:?}, hyper {theirs:?}")),
        (true, Some(why)) => wrong.push(format!(
            "{name}: expected ballast to differ ({why}) but both say {ours:?}"
        )),
    }
    if differs.is_some() {
        assert!(refused, "{name}: ballast should refuse, got {ours:?}");
    }
}

// --- The client side: backends' answers read by ballast's client and by hyper's ----------

/// What a client made of a backend's answer to `GET /`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// The status and the whole body.
    Response(u16, Vec<u8>),
    /// No response: the head was refused, or the connection ended before one.
    NoHead,
    /// The head was accepted (this status), the body failed.
    BadBody(u16),
}

const RESPONSE_LENGTH: &str = "RFC 9112 §6.3 ¶5: a Content-Length that is not a valid number \
     (a comma list included) is an unrecoverable error for a proxy (502); hyper folds a list \
     of equal values (equal repeated lines pass in both)";

/// Backends' answers, as [`Case`]s (the same `same` and `differs`).
fn replies() -> Vec<Case> {
    vec![
        same("length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        same("length zero", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        same("chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        same("chunked with extensions", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0;x\r\n\r\n"),
        same("chunked with trailers", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n"),
        same("until close", b"HTTP/1.1 200 OK\r\n\r\nall of it"),
        same("http/1.0 until close", b"HTTP/1.0 200 OK\r\n\r\nold"),
        same("204 without body", b"HTTP/1.1 204 No Content\r\n\r\n"),
        same("304 keeps no body", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        same("100 then 200", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        same("103 then 200", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        same("empty reason", b"HTTP/1.1 404 \r\nContent-Length: 1\r\n\r\nx"),
        same("bare LF lines", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"),
        same("chunked beats length", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        same("500 with body", b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nfail"),
        // Broken answers.
        same("length cut short", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"),
        same("chunked cut short", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"),
        same("chunk size not hex", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        same("chunk size overflow", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nabc\r\n0\r\n\r\n"),
        same("head cut short", b"HTTP/1.1 200 OK\r\nContent-Le"),
        same("nothing", b""),
        same("not http", b"garbage\r\n\r\n"),
        same("status not a number", b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"),
        same("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\nContent-Length: 0\r\n\r\n"),
        same("negative length", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
        same("space before colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"),
        differs("equal length list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", RESPONSE_LENGTH),
        same("equal repeated lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"),
        same("different lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!"),
    ]
}

/// A backend on the other end of `io`: reads the request head, writes `raw`, closes.
async fn backend(mut io: tokio::io::DuplexStream, raw: &'static [u8]) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = io.write_all(raw).await;
    let _ = io.shutdown().await;
}

fn get() -> hyper::Request<http_body_util::Empty<Bytes>> {
    hyper::Request::get("/")
        .header("host", "a")
        .body(http_body_util::Empty::new())
        .unwrap()
}

async fn answer<B>(resp: Option<hyper::Response<B>>) -> Answer
where
    B: hyper::body::Body<Data = Bytes>,
{
    let Some(resp) = resp else {
        return Answer::NoHead;
    };
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(body) => Answer::Response(status, body.to_bytes().to_vec()),
        Err(_) => Answer::BadBody(status),
    }
}

async fn hyper_client(raw: &'static [u8]) -> Answer {
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let serve = tokio::spawn(backend(theirs, raw));
    let run = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .unwrap();
        tokio::spawn(conn);
        answer(sender.send_request(get()).await.ok()).await
    };
    let got = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("hyper's client ended within 10 s");
    let _ = serve.await;
    got
}

async fn ballast_client(raw: &'static [u8]) -> Answer {
    use ballast::h1::client::{ClientConfig, Conn};
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let serve = tokio::spawn(backend(theirs, raw));
    let config = ClientConfig {
        limits: LIMITS,
        read_size: 16 * 1024,
    };
    let conn = Conn::new(ours, tokio_util::sync::CancellationToken::new(), config);
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        answer(conn.send(get()).await.ok()).await
    })
    .await
    .expect("ballast's client ended within 10 s");
    let _ = serve.await;
    got
}

#[tokio::test]
async fn ballast_s_client_reads_backend_answers_as_hyper_s_does_except_where_stricter() {
    let mut wrong = Vec::new();
    let cases = replies();
    for case in &cases {
        let ours = ballast_client(case.raw).await;
        let theirs = hyper_client(case.raw).await;
        let refused = matches!(ours, Answer::NoHead | Answer::BadBody(_));
        judge(case.name, &ours, &theirs, case.differs, refused, &mut wrong);
    }
    assert_none_wrong(&wrong, cases.len());
}
