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
