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
