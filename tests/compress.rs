//! Response compression (issue 25): negotiation by `Accept-Encoding` with q-values, each
//! algorithm decoded back to what the backend sent, the fields a compressed response gets,
//! every "never compress" case beside one that is compressed, a slow stream that is not
//! held back, and a large body that does not grow memory. Real daemon, real backends.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// A text body that compresses well, and is long enough to be compressed.
fn page() -> String {
    (0..200)
        .map(|i| format!("<p>line {i} of a page that repeats itself</p>\n"))
        .collect()
}

/// A backend that answers each path with fixed fields and `page()` as the body.
async fn backend() -> SocketAddr {
    let (addr, _) = scripted_backend(|_, head| {
        let path = head.split(' ').nth(1).unwrap_or("/");
        let body = page();
        let fields = match path {
            "/html" => "Content-Type: text/html; charset=utf-8\r\nETag: \"v1\"\r\nAccept-Ranges: bytes\r\n",
            "/json" => "Content-Type: application/json\r\nVary: Origin\r\n",
            "/png" => "Content-Type: image/png\r\n",
            "/encoded" => "Content-Type: text/html\r\nContent-Encoding: br\r\n",
            "/no-transform" => "Content-Type: text/html\r\nCache-Control: public, no-transform\r\n",
            "/small" => {
                let small = "<p>short</p>";
                return Some(
                    format!("HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\r\n{small}", small.len())
                        .into_bytes(),
                );
            }
            "/range" => {
                let part = &body[..100];
                return Some(
                    format!("HTTP/1.1 206 Partial Content\r\nContent-Type: text/html\r\nContent-Range: bytes 0-99/{}\r\nContent-Length: 100\r\n\r\n{part}", body.len())
                        .into_bytes(),
                );
            }
            _ => "Content-Type: text/plain\r\n",
        };
        Some(
            format!(
                "HTTP/1.1 200 OK\r\n{fields}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await;
    addr
}

/// `method path` with `Accept-Encoding: accept` (if any) over HTTP/1.1: status, fields, and
/// the body's bytes as they came.
async fn fetch(
    web: SocketAddr,
    method: &str,
    path: &str,
    accept: Option<&str>,
) -> (u16, HeaderMap, Bytes) {
    let stream = TcpStream::connect(web).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "x");
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    let resp = sender
        .send_request(req.body(Full::<Bytes>::default()).expect("request"))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

/// `body` decoded from `encoding`.
async fn decode(encoding: &str, body: &[u8]) -> String {
    use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
    let mut out = Vec::new();
    match encoding {
        "gzip" => GzipDecoder::new(body).read_to_end(&mut out).await,
        "br" => BrotliDecoder::new(body).read_to_end(&mut out).await,
        "zstd" => ZstdDecoder::new(body).read_to_end(&mut out).await,
        other => panic!("unexpected encoding {other}"),
    }
    .expect("decodes");
    String::from_utf8(out).expect("text")
}

fn field<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn compressing(backend: SocketAddr, compress: &str) -> Ballast {
    Ballast::start(
        &TestConfig::addresses([backend])
            .listener(&format!("compress = {compress}"))
            .build(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_algorithm_is_chosen_by_accept_encoding_and_decodes_to_the_original() {
    let lb = compressing(backend().await, "{}");
    let web = lb.addr("web");
    let cases = [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, deflate, br", "br"),
        ("br;q=0.5, gzip", "gzip"),
        ("zstd;q=0, *;q=0.3", "br"),
        ("x-gzip", "gzip"),
    ];
    for (accept, want) in cases {
        let (status, h, body) = fetch(web, "GET", "/html", Some(accept)).await;
        assert_eq!(status, 200);
        assert_eq!(field(&h, "content-encoding"), Some(want), "{accept}");
        assert!(
            body.len() < page().len() / 4,
            "{accept}: {} bytes",
            body.len()
        );
        assert_eq!(decode(want, &body).await, page(), "{accept}");
        // Fields a compressed response gets.
        assert_eq!(field(&h, "vary"), Some("accept-encoding"));
        assert_eq!(
            field(&h, "etag"),
            Some("W/\"v1\""),
            "the strong ETag becomes weak"
        );
        assert!(!h.contains_key("content-length") && !h.contains_key("accept-ranges"));
    }
    // A client that takes none: the body as it is, still marked as varying.
    for accept in [None, Some("identity"), Some("gzip;q=0, br;q=0, zstd;q=0")] {
        let (_, h, body) = fetch(web, "GET", "/html", accept).await;
        assert_eq!(body, page(), "{accept:?}");
        assert_eq!(field(&h, "content-encoding"), None);
        assert_eq!(field(&h, "vary"), Some("accept-encoding"));
        assert_eq!(field(&h, "etag"), Some("\"v1\""));
    }
    // An existing Vary is kept, and extended.
    let (_, h, _) = fetch(web, "GET", "/json", Some("gzip")).await;
    let vary: Vec<_> = h.get_all("vary").iter().collect();
    assert_eq!(vary, ["Origin", "accept-encoding"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_must_not_be_compressed_is_passed_as_it_came() {
    let lb = compressing(
        backend().await,
        "{ types = [\"text/*\"], min_size = \"1KiB\" }",
    );
    let web = lb.addr("web");
    for path in [
        "/encoded",
        "/no-transform",
        "/png",
        "/small",
        "/range",
        "/json",
    ] {
        let (status, h, body) = fetch(web, "GET", path, Some("gzip, br, zstd")).await;
        let encoding = field(&h, "content-encoding");
        assert!(
            encoding.is_none() || encoding == Some("br") && path == "/encoded",
            "{path}: {h:?}"
        );
        assert!(matches!(status, 200 | 206), "{path}");
        assert!(!body.is_empty(), "{path}");
    }
    // The backend's own encoding is left alone, bytes and all.
    let (_, _, body) = fetch(web, "GET", "/encoded", Some("gzip")).await;
    assert_eq!(body, page());
    // HEAD: no body to compress; the fields say what a GET would vary on.
    let (status, h, body) = fetch(web, "HEAD", "/html", Some("gzip")).await;
    assert_eq!((status, body.len()), (200, 0));
    assert_eq!(field(&h, "content-encoding"), None);
    assert_eq!(field(&h, "vary"), Some("accept-encoding"));
    // A listed type is compressed on the same listener: the cases above were not by chance.
    let (_, h, _) = fetch(web, "GET", "/html", Some("gzip")).await;
    assert_eq!(field(&h, "content-encoding"), Some("gzip"));
    // An upgrade passes untouched.
    let [ws] = start_backends(["ws"]).await;
    let lb = compressing(
        ws.addr,
        "{ types = [\"text/*\", \"application/octet-stream\"] }",
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.expect("connect");
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\nAccept-Encoding: gzip\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("content-encoding"),
        "{head}"
    );
    s.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_is_flushed_as_it_comes_not_held_for_more() {
    // A backend that sends an event, then waits until the test has seen it compressed.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(tokio::sync::Notify::new());
    let release = seen.clone();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let event = "data: first event\n\n";
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
            event.len()
        );
        let _ = s.write_all(head.as_bytes()).await;
        release.notified().await;
        let last = "data: second event\n\n";
        let _ = s
            .write_all(format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len()).as_bytes())
            .await;
    });
    let lb = compressing(addr, "{ min_size = 0 }");
    let stream = TcpStream::connect(lb.addr("web")).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/events")
        .header("host", "x")
        .header("accept-encoding", "gzip")
        .body(Full::<Bytes>::default())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(field(resp.headers(), "content-encoding"), Some("gzip"));
    let mut body = resp.into_body();
    // The first event arrives, compressed and flushed, while the backend still holds the
    // second: nothing waits for more input.
    let mut got = Vec::new();
    let mut decoder = flate_prefix();
    while !decoder(&got).contains("first event") {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("the first event is not held back")
            .expect("a frame")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    seen.notify_one();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("no error").into_data() {
            got.extend_from_slice(&data);
        }
    }
    assert_eq!(
        decode("gzip", &got).await,
        "data: first event\n\ndata: second event\n\n"
    );
}

/// Decodes as much of a gzip stream as has arrived (a flushed prefix decodes in full).
fn flate_prefix() -> impl FnMut(&[u8]) -> String {
    |bytes: &[u8]| {
        let mut out = Vec::new();
        let mut d = async_compression::tokio::bufread::GzipDecoder::new(bytes);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut buf = [0u8; 4096];
        loop {
            let mut rb = tokio::io::ReadBuf::new(&mut buf);
            match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut d), &mut cx, &mut rb) {
                std::task::Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    out.extend_from_slice(rb.filled())
                }
                _ => break,
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_is_compressed_in_bounded_memory() {
    // 192 MiB of text, streamed (chunked) in 64 KiB pieces.
    const TOTAL: usize = 192 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "y".repeat(64 << 10));
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        for _ in 0..TOTAL / (64 << 10) {
            if s.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    });
    let lb = compressing(addr, "{ algorithms = [\"gzip\"] }");
    let before = lb.rss_kib();
    let (status, h, body) = fetch(lb.addr("web"), "GET", "/big", Some("gzip")).await;
    assert_eq!(status, 200);
    assert_eq!(field(&h, "content-encoding"), Some("gzip"));
    assert!(body.len() < TOTAL / 100, "compressed: {} bytes", body.len());
    let mut decoded = Vec::new();
    async_compression::tokio::bufread::GzipDecoder::new(&body[..])
        .read_to_end(&mut decoded)
        .await
        .expect("decodes");
    assert_eq!(decoded.len(), TOTAL);
    lb.assert_memory_bounded(before, "a 192 MiB body through gzip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_gets_the_same_compressed_answer() {
    let lb = Ballast::start(
        &TestConfig::addresses([backend().await])
            .listener("h2c = true\ncompress = {}")
            .build(),
    );
    let stream = TcpStream::connect(lb.addr("web")).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    for (accept, want) in [("br, gzip", Some("br")), ("identity", None)] {
        let req = http::Request::get("http://x/html")
            .header("accept-encoding", accept)
            .body(Full::<Bytes>::default())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        assert_eq!(field(&parts.headers, "content-encoding"), want, "{accept}");
        assert_eq!(field(&parts.headers, "vary"), Some("accept-encoding"));
        let text = match want {
            Some(e) => decode(e, &body).await,
            None => String::from_utf8_lossy(&body).into_owned(),
        };
        assert_eq!(text, page(), "{accept}");
    }
}
