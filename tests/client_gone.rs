//! A client that hangs up while its request is at a backend: ballast lets a cheap response
//! finish in the background and keeps the backend connection (as HAProxy does), so the next
//! request needs no new connection; a large or slow one is cut as before. Either way the
//! backend is not blamed.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{admin_call, backend_state, eventually, get, Backend, Ballast, TestConfig};

/// Idle upstream connections ballast holds to the pool's only backend, per `/status`.
async fn idle_connections(admin: SocketAddr) -> u64 {
    let (_, v) = admin_call(admin, "GET", "/status", None).await;
    v["pools"]["app"]["backends"][0]["idle_connections"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Sends `GET path`, waits until the backend has the request (or, with `read_head`, until
/// the response head arrived), and hangs up.
async fn leave(lb: SocketAddr, backend: &Backend, path: &str, read_head: bool) {
    let mut s = TcpStream::connect(lb).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    if read_head {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut byte).await.unwrap(),
                1,
                "response head cut short"
            );
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    } else {
        let at_backend = eventually(Duration::from_secs(5), async || backend.in_flight() == 1);
        assert!(
            at_backend.await.is_some(),
            "the request never reached the backend"
        );
    }
    drop(s);
}

/// The backend connection went back to the pool, the next request rides it (the backend
/// accepted no other), and the backend is still healthy.
async fn assert_kept_and_reused(lb: &Ballast, a: &Backend) {
    let admin = lb.admin();
    let kept = eventually(Duration::from_secs(5), async || {
        idle_connections(admin).await == 1
    });
    assert!(kept.await.is_some(), "connection not kept:\n{}", lb.logs());

    let r = get(lb.addr("web"), "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "a"));
    assert_eq!(
        a.connections(),
        1,
        "the next request opened a new connection"
    );
    assert_eq!(backend_state(admin, "app", a.addr).await, "healthy");
}

fn config(backend: &Backend) -> String {
    TestConfig::new(&[backend])
        .admin()
        .pool("response_timeout = \"10s\"")
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_answer_leaves_the_backend_connection_reusable() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&a));

    leave(lb.addr("web"), &a, "/slow/300", false).await;
    // The backend answers after its 300 ms; ballast reads the answer and keeps the connection.
    assert_kept_and_reused(&lb, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_body_leaves_the_connection_reusable_when_the_rest_is_small() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&a));

    // 200,000 bytes, chunked, 64 KiB at a time: under the 256 KiB ballast finishes.
    leave(lb.addr("web"), &a, "/download/200000", true).await;
    assert_kept_and_reused(&lb, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_large_download_gets_its_backend_connection_closed() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&a));
    let admin = lb.admin();

    // 100 MB: ballast does not read that much for nobody; the connection is closed.
    leave(lb.addr("web"), &a, "/download/100000000", true).await;
    let closed = eventually(Duration::from_secs(10), async || a.open_connections() == 0);
    assert!(closed.await.is_some(), "backend connection still open");
    assert_eq!(idle_connections(admin).await, 0);

    let r = get(lb.addr("web"), "/").await;
    assert_eq!((r.status, r.body.as_str()), (200, "a"));
    assert_eq!(a.connections(), 2);
    assert_eq!(backend_state(admin, "app", a.addr).await, "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_timeout_still_closes_the_backend_connection() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .admin()
            .pool("response_timeout = \"200ms\"")
            .build(),
    );
    let admin = lb.admin();

    // ballast gave up on this one (504): its connection is not finished in the background.
    let r = get(lb.addr("web"), "/slow/600").await;
    assert_eq!(r.status, 504);
    let closed = eventually(Duration::from_secs(5), async || a.open_connections() == 0);
    assert!(closed.await.is_some(), "backend connection still open");
    // Past the backend's 600 ms: still nothing kept.
    let finished = eventually(Duration::from_secs(5), async || a.in_flight() == 0);
    assert!(finished.await.is_some());
    assert_eq!(idle_connections(admin).await, 0);
}
