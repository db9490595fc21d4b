//! TLS on TCP listeners and pools, stunnel-style: `tls` on a `mode = "tcp"` listener
//! terminates TLS and forwards plain bytes (client certificates with `client_ca`; the
//! handshake's SNI picks among `sni_routes`), and `tls` on a pool such a listener uses
//! starts TLS to its backends. Real redis-cli over TLS is in `tests/tcp.rs`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::tls::{self, Pki};
use support::{Ballast, TestConfig, WAIT};

/// A plain TCP backend that answers every read with `NAME:` and the bytes it read.
async fn tagged_echo(name: &'static str) -> SocketAddr {
    tagged_echo_counted(name).await.0
}

/// [`tagged_echo`], and how many connections it has accepted.
async fn tagged_echo_counted(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let reply = [name.as_bytes(), b":", &buf[..n]].concat();
                    if s.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Writes `msg` and reads the reply of [`tagged_echo`].
async fn roundtrip<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, msg: &str) -> String {
    s.write_all(msg.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("reply in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn tls_table(pki: &Pki, names: &[&str], extra: &str) -> String {
    let leaf = pki.issue("listener", names);
    format!(
        "[listeners.web.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n{extra}",
        leaf.cert.display(),
        leaf.key.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_terminated_and_plain_bytes_reach_the_backend() {
    let pki = Pki::new("tcp-tls");
    let (backend, accepted) = tagged_echo_counted("plain").await;
    let lb = Ballast::start(
        &TestConfig::addresses([backend])
            .listener(&format!(
                "mode = \"tcp\"\n{}",
                tls_table(&pki, &["db.test"], "")
            ))
            .build(),
    );
    // The client offers ALPN; a TCP listener answers with none (it does not know the
    // protocol).
    let mut s = tls::connect(
        lb.addr("web"),
        Some("db.test"),
        &pki.client(&["h2", "redis"]),
    )
    .await
    .expect("handshake");
    assert_eq!(tls::alpn(&s), None);
    assert_eq!(roundtrip(&mut s, "ping").await, "plain:ping");
    assert_eq!(roundtrip(&mut s, "again").await, "plain:again");
    // Plain bytes to a TLS listener are no handshake: closed, the backend untouched.
    let mut raw = TcpStream::connect(lb.addr("web")).await.expect("connect");
    raw.write_all(b"ping\r\n").await.expect("write");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, raw.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        matches!(read, Ok(0) | Err(_)) || buf.first() == Some(&21),
        "a plain client gets a close or a TLS alert: {read:?}"
    );
    // The client's failed handshake is its own: no backend connection was made for it,
    // and the backend still serves.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let mut s = tls::connect(lb.addr("web"), Some("db.test"), &pki.client(&[]))
        .await
        .expect("handshake");
    assert_eq!(roundtrip(&mut s, "after").await, "plain:after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_with_client_ca() {
    let pki = Pki::new("tcp-mtls");
    let backend = tagged_echo("pg").await;
    let ca = pki.ca_path.display().to_string();
    let lb = Ballast::start(
        &TestConfig::addresses([backend])
            .listener(&format!(
                "mode = \"tcp\"\n{}",
                tls_table(&pki, &["db.test"], &format!("client_ca = \"{ca}\""))
            ))
            .build(),
    );
    let with_cert = pki.client_with_cert(&pki.issue("client", &["client.test"]));
    let mut s = tls::connect(lb.addr("web"), Some("db.test"), &with_cert)
        .await
        .expect("handshake with a certificate");
    assert_eq!(roundtrip(&mut s, "select 1").await, "pg:select 1");
    // Without one: the handshake fails (TLS 1.3 tells the client at its first read).
    let refused = match tls::connect(lb.addr("web"), Some("db.test"), &pki.client(&[])).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"select 1").await;
            let mut buf = [0u8; 64];
            matches!(
                tokio::time::timeout(WAIT, s.read(&mut buf)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    };
    assert!(refused, "a client without a certificate was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_sni_picks_among_sni_routes() {
    let pki = Pki::new("tcp-tls-sni");
    let (a, other) = (tagged_echo("a").await, tagged_echo("other").await);
    let lb = Ballast::start(
        &TestConfig::addresses([other])
            .listener(&format!(
                "mode = \"tcp\"\nsni_routes = [{{ sni = \"a.test\", pool = \"a\" }}]\n{}",
                tls_table(&pki, &["a.test", "b.test"], "")
            ))
            .pool(&format!("[pools.a]\nbackends = [\"{a}\"]"))
            .build(),
    );
    for (name, want) in [("a.test", "a:x"), ("b.test", "other:x")] {
        let mut s = tls::connect(lb.addr("web"), Some(name), &pki.client(&[]))
            .await
            .expect("handshake");
        assert_eq!(roundtrip(&mut s, "x").await, want, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_pool_with_tls_speaks_tls_to_its_backends() {
    let pki = Pki::new("tcp-upstream-tls");
    let good = tls::backend(&pki.issue("good", &["backend.test"]), "127.0.0.1:0").await;
    let stranger = Pki::new("stranger");
    let bad = tls::backend(&stranger.issue("bad", &["backend.test"]), "127.0.0.1:0").await;
    let ca = pki.ca_path.display().to_string();
    let config = |backend: SocketAddr| {
        TestConfig::addresses([backend])
            .listener("mode = \"tcp\"")
            .pool(&format!(
                "connect_timeout = \"2s\"\n[pools.app.tls]\nca = \"{ca}\"\nsni = \"backend.test\""
            ))
            .build()
    };
    let get = b"GET / HTTP/1.1\r\nHost: backend.test\r\nConnection: close\r\n\r\n";
    let lb = Ballast::start(&config(good));
    let mut s = TcpStream::connect(lb.addr("web")).await.expect("connect");
    s.write_all(get).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .expect("read");
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("tls-backend sni=backend.test"),
        "{reply}"
    );
    // A backend whose certificate the pool's CA did not sign: no bytes pass, and the log
    // says why.
    let lb = Ballast::start(&config(bad));
    let mut s = TcpStream::connect(lb.addr("web")).await.expect("connect");
    let _ = s.write_all(get).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(read.is_err() || buf.is_empty(), "{buf:?}");
    assert!(
        lb.wait_for_log("reason=tls_failed", Duration::from_secs(5)),
        "{}",
        lb.logs()
    );
}

#[test]
fn tls_on_tcp_is_checked_at_its_place() {
    for (text, want) in [
        (
            "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\nmode = \"tcp\"\nsplice = true\n[listeners.web.tls]\ncertificates = [{ cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" }]\n[pools.app]\nbackends = [\"127.0.0.1:9\"]\n",
            "listeners.web.splice: splice(2) moves bytes unread, and with tls ballast decrypts them",
        ),
        (
            "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\nmode = \"tcp\"\nsplice = true\n[pools.app]\nbackends = [\"127.0.0.1:9\"]\n[pools.app.tls]\ninsecure_skip_verify = true\n",
            "listeners.web.pool: pool \"app\" sets tls, which splice = true cannot carry",
        ),
    ] {
        let (ok, stderr) = support::check_config(text);
        assert!(!ok && stderr.contains(want), "{want}: {stderr}");
    }
}
