//! SNI passthrough on TCP listeners (`sni_routes`, `sni_required`): the pool is chosen by
//! the name in the client's ClientHello, TLS runs end to end to the backend (ballast holds
//! no certificate here), and every byte reaches the backend as the client sent it. A
//! ClientHello split over records and segments routes the same; other bytes go to the
//! listener's pool or are refused; a slow or silent client is bounded by
//! `request_header_timeout`.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ballast::proxy_protocol::{encode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::tls::{self, Leaf, Pki};
use support::{Ballast, TestConfig, WAIT};

/// A TCP listener in front of three TLS backends: `a.example` (pool `a`),
/// `*.wild.example` (pool `wild`), and the listener's own pool for anything else.
struct Setup {
    pki: Pki,
    default_leaf: Leaf,
    lb: Ballast,
}

async fn setup(extra: &str) -> Setup {
    let pki = Pki::new("sni-passthrough");
    let a = pki.issue("a", &["a.example"]);
    let wild = pki.issue("wild", &["*.wild.example"]);
    let default_leaf = pki.issue("default", &["default.example"]);
    let (a_addr, wild_addr, default_addr) = (
        tls::backend(&a, "127.0.0.1:0").await,
        tls::backend(&wild, "127.0.0.1:0").await,
        tls::backend(&default_leaf, "127.0.0.1:0").await,
    );
    let lb = Ballast::start(
        &TestConfig::addresses([default_addr])
            .listener(&format!(
                "mode = \"tcp\"\n\
                 sni_routes = [{{ sni = \"a.example\", pool = \"a\" }}, {{ sni = \"*.wild.example\", pool = \"wild\" }}]\n\
                 {extra}"
            ))
            .pool(&format!(
                "[pools.a]\nbackends = [\"{a_addr}\"]\n[pools.wild]\nbackends = [\"{wild_addr}\"]"
            ))
            .build(),
    );
    Setup {
        pki,
        default_leaf,
        lb,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_name_in_the_client_hello_chooses_the_pool_and_tls_runs_to_the_backend() {
    let s = setup("").await;
    let addr = s.lb.addr("web");
    // A verifying client: the certificate it checks is the backend's own.
    let verify = s.pki.client(&[]);
    for (name, want) in [
        ("a.example", "tls-backend sni=a.example"),
        ("A.Example", "tls-backend sni=a.example"),
        ("x.wild.example", "tls-backend sni=x.wild.example"),
    ] {
        let stream = tls::connect(addr, Some(name), &verify)
            .await
            .unwrap_or_else(|e| panic!("{name}: handshake through ballast: {e}"));
        let reply = tls::get_h1(stream, name, "/").await.expect("reply");
        assert_eq!(reply.body, want, "{name}");
    }
    // A name no route has, and no name at all: the listener's pool.
    let any = tls::any_name(&s.pki);
    for name in [Some("other.example"), Some("wild.example"), None] {
        let stream = tls::connect(addr, name, &any).await.expect("handshake");
        assert_eq!(
            tls::served_cert(&stream),
            s.default_leaf.der,
            "{name:?}: the listener's pool"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_split_over_records_and_segments_routes_the_same() {
    let s = setup("").await;
    let addr = s.lb.addr("web");
    let roots = s.pki.roots();
    let reply = tokio::task::spawn_blocking(move || {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            ballast::tls::crypto::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("a.example").expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_nodelay(true).expect("nodelay");
        sock.set_read_timeout(Some(WAIT)).expect("timeout");
        // The ClientHello as rustls wrote it (one record), sent as two records, the first
        // of them in two writes.
        let mut first = Vec::new();
        conn.write_tls(&mut first).expect("ClientHello");
        assert_eq!(first[0], 22, "a handshake record");
        let body = &first[5..];
        let (one, two) = body.split_at(body.len() / 2);
        for part in [one, two] {
            let mut record = vec![22, first[1], first[2]];
            record.extend_from_slice(&(part.len() as u16).to_be_bytes());
            record.extend_from_slice(part);
            let (head, tail) = record.split_at(3);
            sock.write_all(head).expect("write");
            sock.flush().expect("flush");
            sock.write_all(tail).expect("write");
        }
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        tls.write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            .expect("request over TLS");
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply);
        String::from_utf8_lossy(&reply).into_owned()
    })
    .await
    .expect("client thread");
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("tls-backend sni=a.example"),
        "{reply}"
    );
}

/// A backend that keeps every byte it receives.
async fn recording_backend() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got: Arc<Mutex<Vec<u8>>> = Arc::default();
    let sink = Arc::clone(&got);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().expect("sink").extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, got)
}

/// The ClientHello of the fuzz corpus (openssl's, naming `api.example.com`).
fn openssl_hello() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/corpus/client_hello/openssl"
    ))
    .expect("seed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_reaches_the_backend_behind_a_proxy_header() {
    let (api, got) = recording_backend().await;
    let (fallback, fallback_got) = recording_backend().await;
    let lb = Ballast::start(
        &TestConfig::addresses([fallback])
            .listener("mode = \"tcp\"\nsni_routes = [{ sni = \"api.example.com\", pool = \"api\" }]")
            .pool(&format!(
                "[pools.api]\nbackends = [\"{api}\"]\nsend_proxy = \"v2\"\nalgorithm = \"least_conn\""
            ))
            .build(),
    );
    let listener = lb.addr("web");
    let mut client = TcpStream::connect(listener).await.expect("connect");
    let me = client.local_addr().expect("local");
    let hello = openssl_hello();
    client.write_all(&hello).await.expect("hello");
    client.write_all(b"and what follows").await.expect("more");
    let mut want = encode(Version::V2, me, listener);
    want.extend_from_slice(&hello);
    want.extend_from_slice(b"and what follows");
    assert!(
        support::eventually(WAIT, async || got.lock().expect("got").len() >= want.len())
            .await
            .is_some(),
        "in time"
    );
    assert_eq!(*got.lock().expect("got"), want);
    assert!(fallback_got.lock().expect("fallback").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_bytes_go_to_the_listener_pool_unless_sni_is_required() {
    let (api, api_got) = recording_backend().await;
    let (fallback, fallback_got) = recording_backend().await;
    let config = |extra: &str| {
        TestConfig::addresses([fallback])
            .listener(&format!(
                "mode = \"tcp\"\nrequest_header_timeout = \"300ms\"\nsni_routes = [{{ sni = \"api.example.com\", pool = \"api\" }}]\n{extra}"
            ))
            .pool(&format!("[pools.api]\nbackends = [\"{api}\"]"))
            .build()
    };
    let open = Ballast::start(&config(""));
    // Plain text: not TLS, passed to the listener's pool as it came.
    let mut s = TcpStream::connect(open.addr("web")).await.expect("connect");
    s.write_all(b"PING\r\n").await.expect("write");
    assert!(
        support::eventually(WAIT, async || *fallback_got.lock().expect("got")
            == b"PING\r\n")
        .await
        .is_some(),
        "in time"
    );
    // A ClientHello cut short: after request_header_timeout, what came goes there too.
    let hello = openssl_hello();
    let mut s2 = TcpStream::connect(open.addr("web")).await.expect("connect");
    s2.write_all(&hello[..40]).await.expect("write");
    let want: Vec<u8> = [&b"PING\r\n"[..], &hello[..40]].concat();
    assert!(
        support::eventually(WAIT, async || *fallback_got.lock().expect("got") == want)
            .await
            .is_some(),
        "in time"
    );
    assert!(api_got.lock().expect("api").is_empty());
    drop((s, s2));

    let strict = Ballast::start(&config("sni_required = true"));
    let before = fallback_got.lock().expect("got").len();
    // Plain text, a ClientHello without a name, and one cut short: closed, with nothing
    // sent to any backend.
    let no_name = hello_without_sni();
    for (what, bytes) in [
        ("plain text", b"PING\r\n".to_vec()),
        ("no server name", no_name),
        ("cut short", hello[..40].to_vec()),
    ] {
        let mut s = TcpStream::connect(strict.addr("web"))
            .await
            .expect("connect");
        s.write_all(&bytes).await.expect("write");
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: not closed in time"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "{what}: closed, not answered"
        );
    }
    assert!(strict.wait_for_log("tcp connection refused by sni_required", WAIT));
    assert_eq!(fallback_got.lock().expect("got").len(), before);
    assert!(api_got.lock().expect("api").is_empty());
    // A ClientHello with the name still goes through.
    let mut s = TcpStream::connect(strict.addr("web"))
        .await
        .expect("connect");
    s.write_all(&hello).await.expect("write");
    assert!(
        support::eventually(WAIT, async || *api_got.lock().expect("api") == hello)
            .await
            .is_some(),
        "in time"
    );
}

/// The ClientHello a client sends when it connects by IP address (rustls sends no SNI
/// then), captured without sending it anywhere.
fn hello_without_sni() -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        ballast::tls::crypto::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

#[test]
fn sni_routes_are_checked_at_their_place() {
    let base = "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n";
    let pools = "[pools.app]\nbackends = [\"127.0.0.1:9\"]\n[pools.h2]\nbackends = [\"127.0.0.1:9\"]\nprotocol = \"h2\"\n";
    for (listener, want) in [
        (
            "sni_routes = [{ sni = \"a.example\", pool = \"app\" }]\n",
            "listeners.web.sni_routes: only used with mode = \"tcp\"",
        ),
        (
            "mode = \"tcp\"\nsni_routes = [{ sni = \"a.example:443\", pool = \"app\" }]\n",
            "listeners.web.sni_routes[0].sni: invalid host \"a.example:443\"",
        ),
        (
            "mode = \"tcp\"\nsni_routes = [{ sni = \"a.example\", pool = \"nope\" }]\n",
            "listeners.web.sni_routes[0].pool: unknown pool \"nope\"",
        ),
        (
            "mode = \"tcp\"\nsni_routes = [{ sni = \"a.example\", pool = \"h2\" }]\n",
            "listeners.web.sni_routes[0].pool: pool \"h2\" sets protocol, which",
        ),
        (
            "mode = \"tcp\"\nsni_routes = [{ sni = \"a.example\", pool = \"app\", port = 1 }]\n",
            "unknown field `port`",
        ),
    ] {
        let (ok, stderr) = support::check_config(&format!("{base}{listener}{pools}"));
        assert!(!ok && stderr.contains(want), "{listener}: {stderr}");
    }
    let (ok, stderr) = support::check_config(&format!(
        "{base}mode = \"tcp\"\nsni_required = true\nsni_routes = [{{ sni = \"*.a.example\", pool = \"app\" }}]\n{pools}"
    ));
    assert!(ok, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_holds_no_backend_and_is_bounded_by_the_timeout() {
    let (fallback, fallback_got) = recording_backend().await;
    let lb = Ballast::start(
        &TestConfig::addresses([fallback])
            .listener("mode = \"tcp\"\nrequest_header_timeout = \"300ms\"\nsni_required = true")
            .build(),
    );
    // Connected, sending nothing: closed once request_header_timeout passes.
    let mut s = TcpStream::connect(lb.addr("web")).await.expect("connect");
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within the timeout, not held");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert!(fallback_got.lock().expect("got").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sni_routes_pool_has_its_health_checks_and_drains() {
    let (fallback, fallback_got) = recording_backend().await;
    let (one, one_got) = recording_backend().await;
    let (two, two_got) = recording_backend().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let lb = Ballast::start(
        &TestConfig::addresses([fallback])
            .admin()
            .listener("mode = \"tcp\"\nsni_routes = [{ sni = \"api.example.com\", pool = \"api\" }]")
            .pool(&format!(
                "[pools.api]\nbackends = [\"{one}\", \"{two}\", \"{dead}\"]\n\
                 [pools.api.health_check]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\nrise = 1000\n"
            ))
            .build(),
    );
    let admin = lb.admin();
    assert!(
        support::eventually(WAIT, async || {
            support::backend_state(admin, "api", dead).await == "unhealthy"
        })
        .await
        .is_some(),
        "the dead backend is never marked down: {}",
        lb.logs()
    );
    let path = format!("/pools/api/backends/{one}/drain");
    assert_eq!(support::admin_call(admin, "POST", &path, None).await.0, 200);
    // Neither the unhealthy backend nor the draining one gets a new connection.
    let hello = openssl_hello();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(lb.addr("web")).await.expect("connect");
        s.write_all(&hello).await.expect("hello");
        held.push(s);
    }
    assert!(
        support::eventually(WAIT, async || two_got.lock().expect("two").len()
            == 4 * hello.len())
        .await
        .is_some(),
        "every connection on the one backend left"
    );
    assert!(one_got.lock().expect("one").is_empty());
    assert!(fallback_got.lock().expect("fallback").is_empty());
}
