//! `ballast::h1::client` on real TCP sockets (127.0.0.1, ephemeral ports) against backends
//! that speak raw bytes, so each test controls exactly what the backend sends and when: the
//! edges of response framing, connection reuse, a response that begins before the request
//! body has ended, a request handed back, and a drain cut. The proxy-level behaviour (blame,
//! retries, pools) is covered through the daemon in the other suites.

use std::convert::Infallible;
use std::time::Duration;

use ballast::h1::client::{ClientConfig, ClientError, Conn};
use ballast::h1::Limits;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Body;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

const CONFIG: ClientConfig = ClientConfig {
    limits: Limits {
        max_head: 16 * 1024,
        max_headers: 100,
    },
    read_size: 16 * 1024,
};

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn connect(l: &TcpListener) -> (Conn<TcpStream>, TcpStream, CancellationToken) {
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    let cut = CancellationToken::new();
    (Conn::new(client, cut.clone(), CONFIG), server, cut)
}

fn get(path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", "backend")
        .body(Empty::new())
        .unwrap()
}

/// Reads from `s` until `needle` has arrived; returns everything read.
async fn read_until(s: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !got.windows(needle.len()).any(|w| w == needle) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before {:?}", String::from_utf8_lossy(needle));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("backend waited too long");
    got
}

/// The backend's side of one exchange: waits for the whole request head, then writes `raw`.
async fn answer_head(backend: &mut TcpStream, raw: &[u8]) {
    read_until(backend, b"\r\n\r\n").await;
    backend.write_all(raw).await.unwrap();
}

async fn body_of<B>(body: B) -> Bytes
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    tokio::time::timeout(WAIT, body.collect())
        .await
        .expect("body took too long")
        .expect("body failed")
        .to_bytes()
}

#[tokio::test]
async fn a_keep_alive_connection_carries_the_next_request_once_its_response_is_read() {
    let l = listener().await;
    let (conn, mut backend, _cut) = connect(&l).await;
    let resp = conn.send(get("/one?q=1"));
    let serve = async {
        let head = read_until(&mut backend, b"\r\n\r\n").await;
        assert!(head.starts_with(b"GET /one?q=1 HTTP/1.1\r\nhost: backend\r\n"));
        backend
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello")
            .await
            .unwrap();
    };
    let (resp, ()) = tokio::join!(resp, serve);
    let mut resp = resp.unwrap_or_else(|e| panic!("{}", e.error));
    assert_eq!(resp.status(), StatusCode::OK);
    // A relayed response's fields come written for the client, not in the map.
    assert!(resp.headers().is_empty());
    let fields = resp.body_mut().take_fields().expect("the fields");
    assert_eq!(fields.lines(), b"x-a: 1\r\n");
    assert_eq!(fields.to_header_map()["x-a"], "1");
    assert_eq!(resp.body().size_hint().exact(), Some(5));
    assert!(
        resp.body_mut().take_conn().is_none(),
        "not before the body is read"
    );
    let mut body = resp.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "hello");
    assert!(body.is_end_stream());
    let mut conn = body
        .take_conn()
        .expect("a finished keep-alive response gives its connection back");
    assert!(conn.is_reusable());

    // The same socket carries the second request.
    let resp = conn.send(get("/two"));
    let serve = async {
        read_until(&mut backend, b"GET /two").await;
        backend
            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
    };
    let (resp, ()) = tokio::join!(resp, serve);
    let mut resp = resp.unwrap_or_else(|e| panic!("{}", e.error));
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(resp.body().is_end_stream(), "a 204 has no body to read");
    assert!(resp.body_mut().take_conn().is_some());
}

/// A response's first read asks for less than `read_size` (4 KiB): a head longer than
/// that still arrives whole, up to `max_head`, and so does a long body sent with it.
#[tokio::test]
async fn a_head_longer_than_the_first_read_and_a_long_body_arrive_whole() {
    let l = listener().await;
    let (conn, mut backend, _cut) = connect(&l).await;
    let fields: String = (0..80)
        .map(|i| format!("x-f{i:03}: {}\r\n", "v".repeat(120)))
        .collect();
    assert!(fields.len() > 9 * 1024 && fields.len() < CONFIG.limits.max_head - 100);
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let mut raw = format!(
        "HTTP/1.1 200 OK\r\n{fields}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let resp = conn.send(get("/long"));
    let (resp, ()) = tokio::join!(resp, answer_head(&mut backend, &raw));
    let mut resp = resp.unwrap_or_else(|e| panic!("{}", e.error));
    assert_eq!(resp.status(), StatusCode::OK);
    let passed = resp.body_mut().take_fields().expect("the fields");
    assert_eq!(passed.lines(), fields.as_bytes());
    assert_eq!(body_of(resp.into_body()).await, body);

    // Past `max_head`, the head is still refused.
    let (conn, mut backend, _cut) = connect(&l).await;
    let huge: String = (0..60)
        .map(|i| format!("x-f{i:03}: {}\r\n", "v".repeat(300)))
        .collect();
    let raw = format!("HTTP/1.1 200 OK\r\n{huge}content-length: 0\r\n\r\n");
    let resp = conn.send(get("/huge"));
    let (resp, ()) = tokio::join!(resp, answer_head(&mut backend, raw.as_bytes()));
    let Err(err) = resp else {
        panic!("a head over max_head is refused");
    };
    assert!(matches!(err.error, ClientError::Head(_)), "{}", err.error);
}

#[tokio::test]
async fn interim_responses_are_dropped_and_chunked_bodies_with_trailers_decoded() {
    let l = listener().await;
    let (conn, mut backend, _cut) = connect(&l).await;
    let serve = async {
        read_until(&mut backend, b"\r\n\r\n").await;
        backend
            .write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
                  HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nx-checksum: 1\r\n\r\n",
            )
            .await
            .unwrap();
    };
    let (resp, ()) = tokio::join!(conn.send(get("/")), serve);
    let resp = resp.unwrap_or_else(|e| panic!("{}", e.error));
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get("link").is_none(),
        "103's fields are not the answer's"
    );
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        got.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert_eq!(got, b"abcde");
    assert!(body.take_conn().is_some());
}

#[tokio::test]
async fn a_body_until_close_and_bytes_after_a_response_keep_the_connection_out_of_the_pool() {
    let l = listener().await;
    // No length: the body ends when the backend closes.
    let (conn, mut backend, _cut) = connect(&l).await;
    let serve = async {
        answer_head(&mut backend, b"HTTP/1.1 200 OK\r\n\r\nall of it").await;
        drop(backend);
    };
    let (resp, ()) = tokio::join!(conn.send(get("/")), serve);
    let mut body = resp.unwrap_or_else(|e| panic!("{}", e.error)).into_body();
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        got.extend_from_slice(&frame.unwrap().into_data().unwrap());
    }
    assert_eq!(got, b"all of it");
    assert!(
        body.take_conn().is_none(),
        "a closed connection is not kept"
    );

    // Bytes past the declared length: the backend and ballast disagree on framing.
    let (conn, mut backend, _cut) = connect(&l).await;
    let serve = async {
        answer_head(
            &mut backend,
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nxHTTP/1.1 200 OK\r\n",
        )
        .await;
    };
    let (resp, ()) = tokio::join!(conn.send(get("/")), serve);
    let mut body = resp.unwrap_or_else(|e| panic!("{}", e.error)).into_body();
    assert_eq!(
        body.frame().await.unwrap().unwrap().into_data().unwrap(),
        "x"
    );
    assert!(body.frame().await.is_none());
    assert!(
        body.take_conn().is_none(),
        "stray bytes after a response: not kept"
    );
}

#[tokio::test]
async fn a_head_answer_has_no_body_but_keeps_its_length() {
    let l = listener().await;
    let (conn, mut backend, _cut) = connect(&l).await;
    let req = Request::head("/")
        .header("host", "b")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let serve = async {
        answer_head(
            &mut backend,
            b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n",
        )
        .await;
    };
    let (resp, ()) = tokio::join!(conn.send(req), serve);
    let mut resp = resp.unwrap_or_else(|e| panic!("{}", e.error));
    let fields = resp.body_mut().take_fields().expect("the fields");
    assert_eq!(fields.content_length(), Some(1234));
    assert_eq!(fields.to_header_map()["content-length"], "1234");
    assert!(resp.body().is_end_stream());
    assert!(resp.body_mut().take_conn().is_some());
}

#[tokio::test]
async fn malformed_or_missing_heads_fail_the_exchange() {
    let l = listener().await;
    for (reply, close, want) in [
        (&b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n"[..], false, "head"),
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n"[..],
            false,
            "head",
        ),
        (&b"HTTP/1.1 200 OK\r\ncontent-le"[..], true, "closed"),
        (&b""[..], true, "closed"),
    ] {
        let (conn, mut backend, _cut) = connect(&l).await;
        let serve = async {
            read_until(&mut backend, b"\r\n\r\n").await;
            backend.write_all(reply).await.unwrap();
            if close {
                drop(backend);
            } else {
                // Held open: the verdict must come from the bytes alone.
                std::mem::forget(backend);
            }
        };
        let (resp, ()) = tokio::join!(conn.send(get("/")), serve);
        let err = match resp {
            Ok(_) => panic!("accepted {:?}", String::from_utf8_lossy(reply)),
            Err(e) => e,
        };
        match (&err.error, want) {
            (ClientError::Head(_), "head") | (ClientError::ClosedBeforeHead, "closed") => {}
            (other, _) => panic!("{:?}: got {other}", String::from_utf8_lossy(reply)),
        }
        assert!(
            err.request.is_none(),
            "the backend got the request: not handed back"
        );
    }
}

#[tokio::test]
async fn a_request_that_never_left_comes_back_whole() {
    let l = listener().await;
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    // The backend resets the connection before ballast writes anything. (Linger 0 closes at
    // once with a reset; the blocking the deprecation warns of is for a positive linger.)
    #[allow(deprecated)]
    server.set_linger(Some(Duration::ZERO)).unwrap();
    drop(server);
    tokio::time::timeout(WAIT, client.readable())
        .await
        .unwrap()
        .unwrap();
    let conn = Conn::new(client, CancellationToken::new(), CONFIG);
    let req = Request::post("/orders")
        .header("host", "b")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let err = match tokio::time::timeout(WAIT, conn.send(req)).await.unwrap() {
        Ok(r) => panic!("a reset connection answered {}", r.status()),
        Err(e) => e,
    };
    assert!(matches!(err.error, ClientError::Write(_)), "{}", err.error);
    let (head, _body) = err
        .request
        .expect("nothing was written: the request comes back");
    assert_eq!(head.method(), Method::POST);
    assert!(head.as_bytes().starts_with(b"POST /orders HTTP/1.1\r\n"));
}

#[tokio::test]
async fn an_idle_connection_the_backend_closed_is_not_reused() {
    let l = listener().await;
    let (mut conn, backend, _cut) = connect(&l).await;
    assert!(conn.is_reusable());
    drop(backend);
    // Bounded wait for the FIN to arrive; each check is a non-blocking read.
    tokio::time::timeout(WAIT, async {
        while conn.is_reusable() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a closed connection still looked reusable");
}

#[tokio::test]
async fn a_response_may_begin_while_the_upload_goes_on_and_the_body_keeps_it_moving() {
    let l = listener().await;
    let (conn, mut backend, _cut) = connect(&l).await;
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
    let req = Request::post("/upload")
        .header("host", "b")
        .body(body)
        .unwrap();
    let exchange = conn.send(req);
    // The backend answers as soon as the head and the first chunk are in, then reads the
    // rest of the upload and only then sends its body.
    let backend_task = tokio::spawn(async move {
        read_until(&mut backend, b"first").await;
        backend
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
            .await
            .unwrap();
        let rest = read_until(&mut backend, b"0\r\n\r\n").await;
        assert!(String::from_utf8_lossy(&rest).contains("second"));
        backend.write_all(b"done").await.unwrap();
        backend
    });
    tx.send_data(Bytes::from_static(b"first")).await.unwrap();
    let resp = tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{}", e.error));
    assert_eq!(resp.status(), StatusCode::OK);
    // The rest of the upload goes out as the response body is read.
    let feed = async move {
        tx.send_data(Bytes::from_static(b"second")).await.unwrap();
    };
    let mut body = resp.into_body();
    let (got, ()) = tokio::join!(
        async {
            let mut got = Vec::new();
            while let Some(f) = body.frame().await {
                got.extend_from_slice(&f.unwrap().into_data().unwrap());
            }
            got
        },
        feed
    );
    assert_eq!(got, b"done");
    let _backend = backend_task.await.unwrap();
    assert!(
        body.take_conn().is_some(),
        "both directions ended cleanly: the connection is kept"
    );
}

#[tokio::test]
async fn an_early_answer_to_an_unfinished_upload_is_delivered_and_the_connection_dropped() {
    let l = listener().await;
    let (conn, mut backend, _cut) = connect(&l).await;
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
    let req = Request::post("/big")
        .header("host", "b")
        .body(body)
        .unwrap();
    let exchange = conn.send(req);
    let serve = async {
        read_until(&mut backend, b"part").await;
        backend
            .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig")
            .await
            .unwrap();
    };
    tx.send_data(Bytes::from_static(b"part")).await.unwrap();
    let (resp, ()) = tokio::join!(exchange, serve);
    let resp = resp.unwrap_or_else(|e| panic!("{}", e.error));
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let mut body = resp.into_body();
    assert_eq!(body_of(&mut body).await, "big");
    assert!(
        body.take_conn().is_none(),
        "the upload never ended: not kept"
    );
    drop(tx);
}

#[tokio::test]
async fn a_drain_cut_ends_an_exchange_that_waits_for_its_answer() {
    let l = listener().await;
    let (conn, mut backend, cut) = connect(&l).await;
    let exchange = conn.send(get("/slow"));
    let serve = async {
        read_until(&mut backend, b"\r\n\r\n").await;
        cut.cancel();
    };
    let (resp, ()) = tokio::join!(tokio::time::timeout(WAIT, exchange), serve);
    match resp.expect("the cut must end the wait") {
        Err(e) => assert!(matches!(e.error, ClientError::Cut), "{}", e.error),
        Ok(r) => panic!("answered {}", r.status()),
    }
}

#[tokio::test]
async fn a_sized_body_goes_out_with_its_own_length_field() {
    let l = listener().await;
    let (conn, mut backend, _cut) = connect(&l).await;
    let req = Request::put("/k")
        .header("host", "b")
        .header("content-length", "999")
        .header("transfer-encoding", "chunked")
        .body(Full::new(Bytes::from_static(b"twelve bytes")))
        .unwrap();
    let serve = async {
        let got = read_until(&mut backend, b"twelve bytes").await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("content-length: 12\r\n"), "{text}");
        assert!(!text.contains("999") && !text.contains("chunked"), "{text}");
        backend
            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
    };
    let (resp, ()) = tokio::join!(conn.send(req), serve);
    let mut resp = resp.unwrap_or_else(|e| panic!("{}", e.error));
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(resp.body_mut().take_conn().is_some());
}
