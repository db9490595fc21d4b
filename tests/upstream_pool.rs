//! Idle connections to backends: steady load reuses what it opened (no connection churn
//! above a fixed cap), and an explicit `max_idle_per_backend` still caps what is kept.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{eventually, get, start_backends, Ballast, TestConfig};

/// `n` requests at once, each on its own client connection, each held `ms` by the backend.
async fn wave(addr: SocketAddr, n: usize, ms: u64) {
    let path = format!("/slow/{ms}");
    let mut replies = tokio::task::JoinSet::new();
    for _ in 0..n {
        let path = path.clone();
        replies.spawn(async move { get(addr, &path).await.status });
    }
    while let Some(status) = replies.join_next().await {
        assert_eq!(status.expect("request task"), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_above_128_concurrent_requests_opens_no_new_backend_connections() {
    // 150 at once on one backend: above the old fixed cap of 128 idle connections, which
    // closed 22 after every wave and opened them again on the next.
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let addr = lb.addr("web");
    wave(addr, 150, 300).await;
    let opened = a.connections();
    assert!(
        opened >= 140,
        "the first wave ran {opened} at once, not ~150"
    );
    for _ in 0..3 {
        wave(addr, 150, 300).await;
    }
    assert_eq!(
        a.connections(),
        opened,
        "later waves of the same size opened new backend connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_max_idle_per_backend_caps_the_idle_connections() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .pool("max_idle_per_backend = 10")
            .build(),
    );
    wave(lb.addr("web"), 40, 300).await;
    assert!(a.connections() >= 30, "the wave did not run at once");
    let capped = eventually(Duration::from_secs(5), async || a.open_connections() == 10).await;
    assert!(
        capped.is_some(),
        "{} idle connections kept, not 10",
        a.open_connections()
    );
}

/// A backend that answers one request per connection without saying `Connection: close`,
/// then closes the connection (as a backend whose keep-alive timeout is shorter than
/// ballast's `idle_timeout` does). Reports each close once it is done.
async fn closing_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (closed, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                drop(s);
                let _ = closed.send(());
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_never_used() {
    // No retries: a request sent on a closed connection would fail, not be retried.
    let (backend, mut closed) = closing_backend().await;
    let lb = Ballast::start(&TestConfig::addresses([backend]).pool("retries = 0").build());
    let addr = lb.addr("web");
    for i in 0..20 {
        let reply = get(addr, "/").await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.body);
        // The backend closed the connection ballast has pooled by now.
        tokio::time::timeout(Duration::from_secs(5), closed.recv())
            .await
            .expect("the backend did not close")
            .expect("backend gone");
    }
}
