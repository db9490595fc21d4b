//! PROXY protocol both ways: accepting v1/v2 headers from trusted ranges only (the address
//! they carry becomes the client's), refusing everything else before a backend is touched,
//! and sending v1/v2 headers to backends, byte-exact, on connections private to one client.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ballast::proxy_protocol::{encode, Header, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{read_response, start_backends, Ballast, TestConfig, WAIT};

/// Sends `header` then a GET on a fresh connection; returns the response (if any).
async fn get_with_header(addr: SocketAddr, header: &[u8], path: &str) -> Option<support::RawReply> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(header).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    read_response(&mut s, WAIT).await
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_headers_from_a_trusted_range_set_the_client_address() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("accept_proxy = [\"127.0.0.0/8\"]")
            .build(),
    );
    for (version, client) in [
        (Version::V1, "203.0.113.7:4321"),
        (Version::V2, "[2001:db8::9]:555"),
    ] {
        let header = encode(version, sa(client), sa("198.51.100.1:443"));
        let r = get_with_header(lb.addr("web"), &header, "/headers")
            .await
            .expect("answer");
        let (status, body) = r.status_text();
        assert_eq!(status, 200, "{body}");
        let ip = sa(client).ip().to_string();
        assert!(
            body.contains(&format!("x-forwarded-for: {ip}\n")),
            "{version:?}: {body}"
        );
    }
    // The data right behind the header (same packet) is not lost.
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let mut both = encode(Version::V2, sa("192.0.2.1:1000"), sa("192.0.2.2:80"));
    both.extend_from_slice(
        b"GET /headers HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n",
    );
    s.write_all(&both).await.unwrap();
    let (status, body) = read_response(&mut s, WAIT)
        .await
        .expect("answer")
        .status_text();
    assert_eq!(status, 200);
    assert!(body.contains("x-forwarded-for: 192.0.2.1\n"), "{body}");
    // v2 LOCAL (the balancer's own health check): the socket's address stands.
    let local = ballast::proxy_protocol::encode_local(Version::V2);
    let (_, body) = get_with_header(lb.addr("web"), &local, "/headers")
        .await
        .unwrap()
        .status_text();
    assert!(body.contains("x-forwarded-for: 127.0.0.1\n"), "{body}");
    // Access and error logs name the real client too.
    let bad = encode(Version::V1, sa("203.0.113.99:1"), sa("198.51.100.1:443"));
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(&bad).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap(); // no Host: rejected, logged
    let _ = read_response(&mut s, WAIT).await;
    assert!(
        lb.wait_for_log("client=203.0.113.99:1", WAIT),
        "{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_client_ip_uses_the_address_from_the_header() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a, &b, &c])
            .listener("accept_proxy = [\"127.0.0.1\"]")
            .pool("algorithm = \"hash\"\nhash_key = \"client_ip\"")
            .build(),
    );
    let mut seen = std::collections::BTreeSet::new();
    for i in 1..=30u8 {
        let client = SocketAddr::from(([10, 0, 0, i], 1000));
        let mut first = None;
        for port in [1000, 2000, 3000] {
            let header = encode(
                Version::V1,
                SocketAddr::new(client.ip(), port),
                sa("10.9.9.9:80"),
            );
            let (_, body) = get_with_header(lb.addr("web"), &header, "/")
                .await
                .unwrap()
                .status_text();
            assert_eq!(*first.get_or_insert(body.clone()), body, "{client} moved");
        }
        seen.insert(first.unwrap());
    }
    // Every request came from 127.0.0.1, yet 30 header addresses spread over all three.
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// Opens a connection, writes `bytes`, and reports whether ballast closed it (without an
/// HTTP answer) within `limit`.
async fn closed_without_answer(
    addr: SocketAddr,
    bytes: &[u8],
    hold: bool,
    limit: Duration,
) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if !hold {
        let _ = s.shutdown().await;
    }
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_sources_and_bad_headers_are_refused_before_any_backend() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("accept_proxy = [\"127.0.0.1/32\"]\nrequest_header_timeout = \"500ms\"")
            .build(),
    );
    let addr = lb.addr("web");
    let request = b"GET / HTTP/1.1\r\nHost: test.local\r\n\r\n";
    // No header at all: a plain request is not a PROXY header.
    assert!(
        closed_without_answer(addr, request, true, WAIT).await,
        "plain request"
    );
    // Malformed: v1 with a bad port, v2 with a bad version.
    let mut bad_v2 = encode(Version::V2, sa("1.2.3.4:5"), sa("5.6.7.8:9"));
    bad_v2[12] = 0x31;
    for bad in [&b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n"[..], &bad_v2] {
        let mut bytes = bad.to_vec();
        bytes.extend_from_slice(request);
        assert!(
            closed_without_answer(addr, &bytes, true, WAIT).await,
            "malformed accepted"
        );
    }
    // Truncated: half a header, then the client closes.
    let v2 = encode(Version::V2, sa("1.2.3.4:5"), sa("5.6.7.8:9"));
    assert!(closed_without_answer(addr, &v2[..20], false, WAIT).await);
    // Too slow: half a header, then silence; cut at request_header_timeout.
    let started = Instant::now();
    assert!(closed_without_answer(addr, b"PROXY TCP4 1.2.", true, WAIT).await);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.hits(), 0, "a backend was touched");
    assert!(lb.wait_for_log("bad_proxy_header", WAIT));
    drop(lb);
    // A source outside the trusted ranges: closed at once, even with a valid header.
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("accept_proxy = [\"10.0.0.0/8\", \"::1\"]")
            .build(),
    );
    let mut bytes = encode(Version::V1, sa("10.1.1.1:5"), sa("10.2.2.2:80"));
    bytes.extend_from_slice(request);
    assert!(closed_without_answer(lb.addr("web"), &bytes, true, WAIT).await);
    assert!(lb.wait_for_log("untrusted_proxy_source", WAIT));
    assert_eq!(a.hits(), 0);
}

/// Each connection's header: the raw bytes received, and what they parse to.
type Seen = Arc<Mutex<Vec<(Vec<u8>, Header)>>>;

/// A backend that requires a PROXY header, records each connection's header bytes and
/// serves HTTP behind it (answering with its name).
struct ProxyAwareBackend {
    addr: SocketAddr,
    headers: Seen,
}

impl ProxyAwareBackend {
    async fn start(tcp_echo: bool) -> ProxyAwareBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let headers: Seen = Arc::default();
        let seen = headers.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    // The bytes exactly as they came off the wire, up to the header's end.
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 256];
                    let (header, len) = loop {
                        match ballast::proxy_protocol::parse(&buf) {
                            Ok(Some(done)) => break done,
                            Ok(None) => {}
                            Err(_) => return,
                        }
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    let rest = buf.split_off(len);
                    let raw = buf;
                    seen.lock().unwrap().push((raw, header));
                    let io = ballast::net::Prefixed::new(rest, s);
                    if tcp_echo {
                        let (mut r, mut w) = tokio::io::split(io);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        return;
                    }
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from("proxy-aware")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        ProxyAwareBackend { addr, headers }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_writes_the_client_address_byte_exact_on_private_connections() {
    for version in ["v1", "v2"] {
        let backend = ProxyAwareBackend::start(false).await;
        let lb = Ballast::start(
            &TestConfig::addresses([backend.addr])
                .pool(&format!("send_proxy = \"{version}\""))
                .build(),
        );
        let listener = lb.addr("web");
        // Two clients, two requests each on keep-alive.
        let mut clients = Vec::new();
        for _ in 0..2 {
            let s = TcpStream::connect(listener).await.unwrap();
            let me = s.local_addr().unwrap();
            clients.push((s, me));
        }
        for round in 0..2 {
            for (s, _) in clients.iter_mut() {
                s.write_all(b"GET / HTTP/1.1\r\nHost: test.local\r\n\r\n")
                    .await
                    .unwrap();
                let (status, body) = read_response(s, WAIT).await.expect("answer").status_text();
                assert_eq!(
                    (status, body.as_str()),
                    (200, "proxy-aware"),
                    "round {round}"
                );
            }
        }
        let seen = backend.headers.lock().unwrap().clone();
        // One upstream connection per client (reused for its second request, never shared).
        assert_eq!(seen.len(), 2, "{version}: {seen:?}");
        let v = if version == "v1" {
            Version::V1
        } else {
            Version::V2
        };
        for (_, me) in &clients {
            let want = encode(v, *me, listener);
            assert!(
                seen.iter().any(|(raw, h)| *raw == want && h.version == v),
                "{version}: no header for {me}: {seen:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_names_the_client_a_trusted_proxy_named_one_client_per_connection() {
    let backend = ProxyAwareBackend::start(false).await;
    let lb = Ballast::start(
        &TestConfig::addresses([backend.addr])
            .listener("trusted_proxies = [\"127.0.0.1\"]")
            .pool("send_proxy = \"v2\"")
            .build(),
    );
    let listener = lb.addr("web");
    // One connection from the (trusted) proxy carries requests of two clients, the first
    // one twice.
    let mut s = TcpStream::connect(listener).await.unwrap();
    for client in ["203.0.113.7", "203.0.113.7", "2001:db8::9"] {
        let req =
            format!("GET / HTTP/1.1\r\nHost: test.local\r\nX-Forwarded-For: {client}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut s, WAIT)
            .await
            .expect("answer")
            .status_text();
        assert_eq!((status, body.as_str()), (200, "proxy-aware"), "{client}");
    }
    let seen = backend.headers.lock().unwrap().clone();
    let sources: Vec<_> = seen.iter().map(|(_, h)| h.source).collect();
    // The port a proxy's client used is not known: 0. A connection whose header names one
    // client never carries another's request: the second client got a connection of its own.
    let v4 = sa("203.0.113.7:0");
    let v6 = sa("[2001:db8::9]:0");
    assert_eq!(sources.len(), 2, "{seen:?}");
    assert!(
        sources
            .iter()
            .any(|s| s.map(|a| a.ip()) == Some(v4.ip()) && s.map(|a| a.port()) == Some(0)),
        "{seen:?}"
    );
    assert!(
        sources.iter().any(|s| s.map(|a| a.ip()) == Some(v6.ip())),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_passes_the_address_from_an_incoming_header_to_the_backend() {
    let backend = ProxyAwareBackend::start(true).await;
    let lb = Ballast::start(
        &TestConfig::addresses([backend.addr])
            .listener("mode = \"tcp\"\naccept_proxy = [\"127.0.0.1\"]")
            .pool("send_proxy = \"v2\"")
            .build(),
    );
    // A balancer in front says: client 198.51.100.20:6000 connected to 203.0.113.5:5432.
    let (client, dst) = (sa("198.51.100.20:6000"), sa("203.0.113.5:5432"));
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let mut bytes = encode(Version::V1, client, dst);
    bytes.extend_from_slice(b"ping");
    s.write_all(&bytes).await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    let seen = backend.headers.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, encode(Version::V2, client, dst), "{seen:?}");
}

#[test]
fn bad_proxy_settings_are_config_errors() {
    let (ok, err) = support::check_config(
        "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\naccept_proxy = [\"10.0.0.0/33\"]\n\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\nsend_proxy = \"v3\"\n",
    );
    assert!(!ok);
    assert!(
        err.contains(":4:17: listeners.web.accept_proxy: invalid range \"10.0.0.0/33\""),
        "{err}"
    );
    assert!(err.contains(":8:14: pools.app.send_proxy: \"v3\""), "{err}");
}
