//! Upgraded connections (WebSocket and other `Upgrade:` protocols) through the proxy.

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{admin_call, Backend, Ballast, TestConfig};

/// Opens an upgraded connection to `/upgrade` through ballast; returns the stream after the
/// 101 head and the head itself.
async fn open_tunnel(addr: std::net::SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("101 head")
            .unwrap();
        assert_eq!(
            n,
            1,
            "connection closed before the head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

async fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo")
        .unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_passes_through_both_ways() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let (mut s, head) = open_tunnel(lb.addr("web")).await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        lower.contains("upgrade: websocket") && lower.contains("connection: upgrade"),
        "{head}"
    );
    for msg in [
        &b"ping"[..],
        b"a longer message over the tunnel",
        &[0u8, 159, 146, 150],
    ] {
        assert_eq!(echo(&mut s, msg).await, msg);
    }
    // Ordinary requests are unaffected.
    assert_eq!(support::get(lb.addr("web"), "/").await.body, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tunnel_counts_as_in_flight_and_a_drain_timeout_cuts_it() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .admin()
            .pool("drain_timeout = \"500ms\"")
            .build(),
    );
    let (mut s, _) = open_tunnel(lb.addr("web")).await;
    assert_eq!(echo(&mut s, b"hello").await, b"hello");
    let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
    assert_eq!(
        status["pools"]["app"]["backends"][0]["in_flight"], 1,
        "{status}"
    );

    assert_eq!(
        support::admin_backend(lb.admin(), a.addr, "drain").await,
        200
    );
    // Draining lets the tunnel go on...
    assert_eq!(echo(&mut s, b"still here").await, b"still here");
    // ... until the drain timeout cuts it.
    assert!(
        lb.wait_for_log(
            "drain timeout: cutting remaining connections",
            Duration::from_secs(5)
        ),
        "{}",
        lb.logs()
    );
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the cut closes the client side")
        .unwrap_or(0);
    assert_eq!(n, 0, "tunnel closed");
    let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
    assert_eq!(status["pools"]["app"]["backends"][0]["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_waits_for_an_open_tunnel() {
    let a = Backend::start("a").await;
    let mut lb = Ballast::start(
        &TestConfig::new(&[&a])
            .head("[global]\nshutdown_timeout = \"10s\"")
            .build(),
    );
    let (mut s, _) = open_tunnel(lb.addr("web")).await;
    lb.signal("TERM");
    assert!(lb.wait_for_log("shutting down", Duration::from_secs(5)));
    assert_eq!(
        echo(&mut s, b"still open").await,
        b"still open",
        "the tunnel outlives SIGTERM"
    );
    assert_eq!(
        lb.wait_exit(Duration::from_millis(300)),
        None,
        "ballast waits for the tunnel"
    );
    drop(s);
    assert_eq!(
        lb.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        lb.logs()
    );
}

/// A WebSocket opened the HTTP/2 way (RFC 8441: an extended CONNECT stream) on an `h2c`
/// listener: the response, and the stream once switched.
async fn h2_websocket(
    addr: std::net::SocketAddr,
    path: &str,
) -> (
    http::Response<hyper::body::Incoming>,
    Option<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive first: hyper refuses an
    // extended CONNECT to a server that did not send it.
    sender.ready().await.expect("ready");
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{addr}{path}"))
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let mut resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("extended CONNECT accepted by the client library");
    let upgraded = if resp.status() == http::StatusCode::OK {
        let on = hyper::upgrade::on(&mut resp);
        Some(hyper_util::rt::TokioIo::new(
            on.await.expect("stream switched"),
        ))
    } else {
        None
    };
    (resp, upgraded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_websocket_reaches_an_http11_backend_as_an_upgrade() {
    let backend = Backend::start("ws").await;
    let lb = Ballast::start(&TestConfig::new(&[&backend]).listener("h2c = true").build());
    let (resp, io) = h2_websocket(lb.addr("web"), "/upgrade").await;
    // The backend answered a GET with Upgrade and the key ballast made (its accept was
    // right, or this would be a 502); the client gets a 200, as RFC 8441 says.
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backend"], "ws");
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let mut io = io.expect("switched");
    for msg in [&b"hello"[..], b"over one h2 stream"] {
        io.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut got))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_accept_is_a_502_and_the_upgrade_list_applies_to_http2_websockets() {
    let backend = Backend::start("ws").await;
    let lb = Ballast::start(&TestConfig::new(&[&backend]).listener("h2c = true").build());
    let (resp, io) = h2_websocket(lb.addr("web"), "/upgrade-bad-accept").await;
    assert_eq!(resp.status(), 502);
    assert!(io.is_none());
    assert!(
        lb.wait_for_log(
            "Sec-WebSocket-Accept does not answer the key",
            Duration::from_secs(5)
        ),
        "{}",
        lb.logs()
    );
    // A listener that lets no protocol through: refused before any backend.
    let closed = Ballast::start(
        &TestConfig::new(&[&backend])
            .listener("h2c = true\nupgrade = []")
            .build(),
    );
    let before = backend.hits();
    let (resp, io) = h2_websocket(closed.addr("web"), "/upgrade").await;
    assert_eq!(resp.status(), 403);
    assert!(io.is_none());
    assert_eq!(backend.hits(), before);
}

/// A WebSocket server written out by hand: answers the Upgrade with the right accept,
/// says `hi` in one text frame, then keeps every byte it receives.
async fn raw_websocket_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got: std::sync::Arc<std::sync::Mutex<Vec<u8>>> = Default::default();
    let sink = got.clone();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let key = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        let reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            support::websocket_accept(&key)
        );
        s.write_all(reply.as_bytes()).await.unwrap();
        s.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (addr, got)
}

/// Either side of a test's WebSocket, whichever protocol carried it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A masked text frame from a client.
const CLIENT_FRAME: [u8; 8] = [0x81, 0x82, 1, 2, 3, 4, b'o' ^ 1, b'k' ^ 2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_timeout_closes_websockets_with_1001_on_both_sides() {
    for http2 in [false, true] {
        let (backend, got) = raw_websocket_backend().await;
        let lb = Ballast::start(
            &TestConfig::addresses([backend])
                .admin()
                .listener("h2c = true")
                .pool("drain_timeout = \"300ms\"")
                .build(),
        );
        // The client's side, over HTTP/1.1 or as an HTTP/2 stream.
        let mut client: Box<dyn Io> = if http2 {
            let (resp, io) = h2_websocket(lb.addr("web"), "/chat").await;
            assert_eq!(resp.status(), 200);
            Box::new(io.expect("switched"))
        } else {
            let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
            s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
            let head = support::read_head(&mut s).await.expect("a head");
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            Box::new(s)
        };
        let mut hi = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut hi))
            .await
            .expect("the server's frame")
            .unwrap();
        assert_eq!(hi, [0x81, 0x02, b'h', b'i']);
        client.write_all(&CLIENT_FRAME).await.unwrap();
        assert!(
            support::eventually(Duration::from_secs(5), async || {
                got.lock().unwrap().len() == CLIENT_FRAME.len()
            })
            .await
            .is_some(),
            "the client's frame reached the backend"
        );
        let path = format!("/pools/app/backends/{backend}/drain");
        assert_eq!(admin_call(lb.admin(), "POST", &path, None).await.0, 200);
        // At the drain timeout: a close frame 1001 to the client, then the end.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("closed after the drain timeout")
            .unwrap();
        assert_eq!(rest, [0x88, 0x02, 0x03, 0xE9], "http2={http2}");
        // And the backend got one too, masked as a client's, after the client's frame.
        assert!(
            support::eventually(Duration::from_secs(5), async || {
                got.lock().unwrap().len() == CLIENT_FRAME.len() + 8
            })
            .await
            .is_some(),
            "http2={http2}: {:?}",
            got.lock().unwrap()
        );
        assert_eq!(
            got.lock().unwrap()[CLIENT_FRAME.len()..],
            [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE9]
        );
    }
}
