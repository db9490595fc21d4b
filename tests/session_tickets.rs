//! TLS session resumption that survives reloads and spans replicas: the ticket keys outlive
//! a listener's accept loop, and `session_ticket_keys_file` gives several ballast processes
//! the same keys, so a client resumes with any of them (`tls::tickets`).

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::time::Duration;

use rustls::HandshakeKind;
use support::tls::{self, Pki};
use support::{Backend, Ballast, Save, TestConfig, WAIT};

fn random_keys(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; 80 * n];
    std::fs::File::open("/dev/urandom")
        .expect("urandom")
        .read_exact(&mut bytes)
        .expect("random bytes");
    bytes
}

fn config(backend: &Backend, pki: &Pki, extra: &str) -> String {
    let leaf = pki.issue("site", &["site.test"]);
    TestConfig::new(&[backend])
        .listener(&format!(
            "[listeners.web.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n{extra}",
            leaf.cert.display(),
            leaf.key.display()
        ))
        .build()
}

/// A full handshake and a request: the client's store then holds the tickets the server
/// sent after the handshake.
async fn get_tickets(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) {
    let s = tls::connect(addr, Some("site.test"), connector)
        .await
        .expect("handshake");
    let reply = tls::get_h1(s, "site.test", "/").await.expect("request");
    assert_eq!(reply.status, 200);
}

async fn handshake_kind(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> HandshakeKind {
    let s = tls::connect(addr, Some("site.test"), connector)
        .await
        .expect("handshake");
    s.get_ref().1.handshake_kind().expect("handshake done")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_a_key_file_resume_each_others_sessions() {
    let backend = Backend::start("app").await;
    let pki = Pki::new("tickets");
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("tickets.key");
    std::fs::write(&keys, random_keys(1)).expect("keys");
    let shared = format!("session_ticket_keys_file = \"{}\"", keys.display());
    let (a, b) = (
        Ballast::start(&config(&backend, &pki, &shared)),
        Ballast::start(&config(&backend, &pki, &shared)),
    );
    let own = Ballast::start(&config(&backend, &pki, ""));
    let connector = pki.client_resuming(&["http/1.1"]);
    get_tickets(a.addr("web"), &connector).await;
    // B never saw this client, and resumes the session A began.
    assert_eq!(
        handshake_kind(b.addr("web"), &connector).await,
        HandshakeKind::Resumed
    );
    // A process with its own keys cannot read A's tickets: a full handshake.
    get_tickets(a.addr("web"), &connector).await;
    assert_eq!(
        handshake_kind(own.addr("web"), &connector).await,
        HandshakeKind::Full
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_file_still_reads_the_old_keys_tickets() {
    let backend = Backend::start("app").await;
    let pki = Pki::new("tickets-rotate");
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("tickets.key");
    let (old, new) = (random_keys(1), random_keys(1));
    std::fs::write(&keys, &old).expect("keys");
    let text = config(
        &backend,
        &pki,
        &format!("session_ticket_keys_file = \"{}\"", keys.display()),
    );
    let lb = Ballast::start(&text);
    let connector = pki.client_resuming(&["http/1.1"]);
    get_tickets(lb.addr("web"), &connector).await;
    // The operator puts a new key first and keeps the old one: the file is watched.
    std::fs::write(&keys, [new.clone(), old].concat()).expect("rotate");
    assert!(lb.wait_for_log("config reloaded", WAIT), "{}", lb.logs());
    assert_eq!(
        handshake_kind(lb.addr("web"), &connector).await,
        HandshakeKind::Resumed
    );
    // The old key dropped: its tickets no longer resume.
    get_tickets(lb.addr("web"), &connector).await; // sealed with `new` now
    std::fs::write(&keys, random_keys(1)).expect("replace");
    assert!(
        lb.wait_for_log_count("config reloaded", 2, WAIT),
        "{}",
        lb.logs()
    );
    assert_eq!(
        handshake_kind(lb.addr("web"), &connector).await,
        HandshakeKind::Full
    );
    // A file that is not keys is refused at its place, and the running keys stay.
    std::fs::write(&keys, b"not 80 bytes").expect("break");
    assert!(
        lb.wait_for_log("session_ticket_keys_file", Duration::from_secs(5)),
        "{}",
        lb.logs()
    );
    assert!(lb
        .logs()
        .contains("the file must hold 1 to 16 keys of 80 random bytes each"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_restarts_the_listener_keeps_resumption() {
    let backend = Backend::start("app").await;
    let pki = Pki::new("tickets-reload");
    let lb = Ballast::start(&config(&backend, &pki, ""));
    let connector = pki.client_resuming(&["http/1.1"]);
    get_tickets(lb.addr("web"), &connector).await;
    // A TLS setting changes: a new accept loop with a new rustls config takes over.
    lb.save_config(&config(&backend, &pki, "strict_sni = true"), Save::Rename);
    assert!(lb.wait_for_log("config reloaded", WAIT), "{}", lb.logs());
    assert_eq!(
        handshake_kind(lb.addr("web"), &connector).await,
        HandshakeKind::Resumed
    );
}
