//! Draining: a backend leaving a pool (file edit or admin API) finishes its in-flight work
//! and gets nothing new; after drain_timeout what is left is cut.

mod support;

use std::time::Duration;

use support::{
    admin_call, backend_state, get, start_backends, Backend, Ballast, Client, Save, TestConfig,
};

fn cfg(backends: &[&Backend], extra: &str) -> String {
    TestConfig::new(backends).admin().pool(extra).build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_on_removed_and_drained_backends_complete() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(&cfg(&[&a, &b, &c], ""));
    let addr = lb.addr("web");
    // One slow request on each backend (round robin: a, b, c).
    let mut slow = Vec::new();
    for _ in 0..3 {
        slow.push(tokio::spawn(async move { get(addr, "/slow/2000").await }));
        let n = slow.len();
        support::eventually(Duration::from_secs(5), async || {
            a.in_flight() + b.in_flight() + c.in_flight() == n
        })
        .await
        .expect("slow request in flight");
    }
    assert_eq!((a.in_flight(), b.in_flight(), c.in_flight()), (1, 1, 1));

    // b leaves the file; c is drained through the admin API.
    lb.save_config(&cfg(&[&a, &c], ""), Save::Rename);
    assert!(lb.wait_for_log("config reloaded", Duration::from_secs(5)));
    assert_eq!(
        support::admin_backend(lb.admin(), c.addr, "drain").await,
        200
    );
    assert_eq!(backend_state(lb.admin(), "app", c.addr).await, "draining");

    let (hits_b, hits_c) = (b.hits(), c.hits());
    let mut client = Client::connect(addr).await.unwrap();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.unwrap().body, "a");
    }
    for s in slow {
        let r = s.await.unwrap();
        assert_eq!(r.status, 200, "in-flight request finished normally");
    }
    assert_eq!(
        (b.hits(), c.hits()),
        (hits_b, hits_c),
        "no new request reached b or c"
    );
    assert!(
        lb.wait_for_log_count("backend drained", 2, Duration::from_secs(5)),
        "{}",
        lb.logs()
    );

    // Drained stays drained across a reload, until enabled.
    lb.save_config(&cfg(&[&a, &c], "retries = 2"), Save::Rename);
    assert!(lb.wait_for_log_count("config reloaded", 2, Duration::from_secs(5)));
    assert_eq!(backend_state(lb.admin(), "app", c.addr).await, "draining");
    assert_eq!(
        support::admin_backend(lb.admin(), c.addr, "enable").await,
        200
    );
    let mut seen_c = false;
    for _ in 0..4 {
        seen_c |= client.get("/").await.unwrap().body == "c";
    }
    assert!(seen_c, "an enabled backend takes traffic again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cuts_what_is_left() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(&cfg(&[&a, &b], "drain_timeout = \"300ms\""));
    let addr = lb.addr("web");
    let mut slow = Vec::new();
    for _ in 0..2 {
        slow.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            c.get("/slow/2500").await.map(|r| r.status)
        }));
    }
    support::eventually(Duration::from_secs(5), async || {
        a.in_flight() == 1 && b.in_flight() == 1
    })
    .await
    .expect("one slow request on each");
    assert_eq!(
        support::admin_backend(lb.admin(), b.addr, "drain").await,
        200
    );
    assert!(
        lb.wait_for_log(
            "drain timeout: cutting remaining connections",
            Duration::from_secs(3)
        ),
        "{}",
        lb.logs()
    );
    let mut results: Vec<_> = futures_join(slow)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    results.sort();
    assert_eq!(
        results,
        [200, 502],
        "exactly the request on the drained backend was cut"
    );
    assert!(
        lb.wait_for_log("reason=drain_timeout", Duration::from_secs(2)),
        "{}",
        lb.logs()
    );
    assert_eq!(a.hits(), 1, "a cut request is not resent elsewhere");
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_drain_of_an_unknown_backend_is_404() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&cfg(&[&a], ""));
    let (code, v) = admin_call(
        lb.admin(),
        "POST",
        "/pools/app/backends/127.0.0.1:1/drain",
        None,
    )
    .await;
    assert_eq!(code, 404, "{v}");
    let (code, _) = admin_call(
        lb.admin(),
        "POST",
        "/pools/nope/backends/127.0.0.1:1/drain",
        None,
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_idle_upstream_connections() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(&cfg(&[&a, &b], ""));
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    for _ in 0..4 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    assert_eq!(
        a.open_connections(),
        1,
        "ballast keeps one idle connection to a"
    );
    assert_eq!(
        support::admin_backend(lb.admin(), a.addr, "drain").await,
        200
    );
    let closed =
        support::eventually(Duration::from_secs(5), async || a.open_connections() == 0).await;
    assert!(
        closed.is_some(),
        "the drained backend's idle connection was not closed"
    );
    assert_eq!(b.open_connections(), 1, "other backends keep theirs");
}
