//! Active health checks and passive ejection against real backends.

mod support;

use std::time::Duration;

use support::{start_backends, Backend, Ballast, Client, TestConfig};

fn config(backends: &[&Backend], health: &str) -> String {
    TestConfig::new(backends).pool(health).build()
}

const FAST_CHECKS: &str = "[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 2\nrise = 2\n";

/// Sends requests until `n` in a row avoid (or, with `want`, reach) backend `name`.
async fn until_traffic(client: &mut Client, name: &str, want: bool, n: usize) -> Option<Duration> {
    let mut streak = 0;
    support::eventually(Duration::from_secs(5), async || {
        let r = client.get("/").await.expect("request");
        assert_eq!(
            r.status, 200,
            "no client error while a backend changes state"
        );
        if (r.body == name) == want {
            streak += 1;
        } else {
            streak = 0;
        }
        streak >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_backend_is_ejected_and_returns_within_configured_timing() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(&config(&[&a, &b], FAST_CHECKS));
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    assert!(
        until_traffic(&mut client, "b", true, 1).await.is_some(),
        "b serves at first"
    );

    b.set_healthy(false);
    // fall = 2 probes at a 100ms interval: out after about 200ms (+ jitter and the probe).
    let out = until_traffic(&mut client, "b", false, 10)
        .await
        .expect("b ejected");
    assert!(out < Duration::from_millis(1500), "ejected after {out:?}");
    assert!(
        lb.wait_for_log("backend is unhealthy", Duration::from_secs(1)),
        "{}",
        lb.logs()
    );
    let hits = b.hits();
    for _ in 0..20 {
        assert_eq!(client.get("/").await.unwrap().body, "a");
    }
    assert_eq!(b.hits(), hits, "an unhealthy backend gets no traffic");

    b.set_healthy(true);
    let back = until_traffic(&mut client, "b", true, 1)
        .await
        .expect("b returns");
    assert!(
        back < Duration::from_millis(1500),
        "returned after {back:?}"
    );
    assert!(lb.wait_for_log("backend is healthy", Duration::from_secs(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_check_ejects_a_stopped_backend() {
    let [a, b] = start_backends(["a", "b"]).await;
    // rise is out of reach: once down, b stays down even if another test's server is
    // handed its freed port.
    let checks = "[pools.app.health_check]\nkind = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\nrise = 1000\n";
    let lb = Ballast::start(&config(&[&a, &b], checks));
    b.kill();
    let needle = format!("backend={} reason=connect failed", b.addr);
    assert!(
        lb.wait_for_log(&needle, Duration::from_secs(3)),
        "{}",
        lb.logs()
    );
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    for _ in 0..10 {
        assert_eq!(client.get("/").await.unwrap().body, "a");
    }
}

/// Kills one backend in the middle of a GET loop from several clients, with and without
/// active checks: retries and passive ejection hide it from every client.
async fn kill_under_load(health: &str) {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(&config(&[&a, &b, &c], health));
    let addr = lb.addr("web");
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await.unwrap();
            let mut statuses = Vec::new();
            for n in 0..150 {
                // Half the clients reconnect now and then; all keep going across the kill.
                if i % 2 == 0 && n % 10 == 0 {
                    client = Client::connect(addr).await.unwrap();
                }
                let r = client.get(if n % 3 == 0 { "/slow/2" } else { "/" }).await;
                statuses.push(r.map(|r| r.status).unwrap_or(0));
            }
            statuses
        }));
    }
    // Kill once traffic flows to every backend.
    support::eventually(Duration::from_secs(5), async || b.hits() > 20)
        .await
        .expect("traffic reaches b");
    b.kill();
    let hits_at_kill = a.hits() + c.hits();
    let mut total = 0;
    for t in tasks {
        let statuses = t.await.unwrap();
        total += statuses.len();
        let bad: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
        assert!(
            bad.is_empty(),
            "client saw errors {bad:?}; log:\n{}",
            lb.logs()
        );
    }
    assert_eq!(total, 600);
    assert!(
        a.hits() + c.hits() > hits_at_kill + 100,
        "traffic went on after the kill"
    );
    // Logs are written by a thread of their own: give the line a moment.
    lb.wait_for_log("backend failed", Duration::from_secs(2));
    let noticed = lb
        .lines()
        .iter()
        .any(|l| l.contains(&b.addr.to_string()) && l.contains("backend failed"));
    assert!(
        noticed,
        "the kill was noticed (and hidden) by the data path:\n{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_get_load_shows_no_client_error() {
    kill_under_load("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_under_get_load_with_active_checks_shows_no_client_error() {
    kill_under_load(&FAST_CHECKS.replace("100ms", "1s")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_ejects_the_backend_before_the_next_check() {
    let a = Backend::start("a").await;
    // A port that refuses: bound, then closed.
    let (_reserved, dead) = support::refusing_addr();
    let text = format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n[pools.app]\nbackends = [\"{}\", \"{dead}\"]\n{}",
        a.addr,
        FAST_CHECKS.replace("100ms", "60s")
    );
    let lb = Ballast::start(&text);
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    for _ in 0..20 {
        let r = client.get("/").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "a"));
    }
    // One failed connect, retried on `a`, then the dead backend is ejected.
    assert!(
        lb.wait_for_log("ejected=true", Duration::from_secs(2)),
        "{}",
        lb.logs()
    );
    let failures = lb
        .lines()
        .iter()
        .filter(|l| {
            l.contains("backend failed")
                && l.contains("reason=connect_failed")
                && l.contains(&dead.to_string())
        })
        .count();
    assert_eq!(failures, 1, "{}", lb.logs());
}

/// Five of seven backends exit at once under load, like replicas of an app that exits on
/// SIGTERM without a lame-duck period when a compose service scales from 7 to 2, with the
/// default settings (`retries = 1`). A request that finds a dead replica never reached it
/// (refused, or a pooled connection closed before the request was written): it goes on to
/// the next backend without spending its retry, and the refusing backend leaves the next
/// picks at once. No request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_of_a_pool_exiting_at_once_under_load_costs_no_request() {
    let backends = start_backends(["a", "b", "c", "d", "e", "f", "g"]).await;
    let refs: Vec<&Backend> = backends.iter().collect();
    let lb = Ballast::start(&config(&refs, ""));
    let addr = lb.addr("web");
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await.unwrap();
            let mut statuses = Vec::new();
            for n in 0..200 {
                // Some clients come and go, as a load tester's do.
                if i % 2 == 0 && n % 5 == 0 {
                    client = Client::connect(addr).await.unwrap();
                }
                let r = client.get("/").await;
                statuses.push(r.map(|r| r.status).unwrap_or(0));
            }
            statuses
        }));
    }
    support::eventually(Duration::from_secs(5), async || {
        backends.iter().all(|b| b.hits() > 10)
    })
    .await
    .expect("traffic reaches every backend");
    for b in &backends[2..] {
        b.kill();
    }
    let survivors_before = backends[0].hits() + backends[1].hits();
    let mut failed = Vec::new();
    let mut total = 0;
    for t in tasks {
        let statuses = t.await.unwrap();
        total += statuses.len();
        failed.extend(statuses.into_iter().filter(|s| *s != 200));
    }
    assert_eq!(total, 1200);
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:?}; log:\n{}",
        failed.len(),
        lb.logs()
    );
    assert!(
        backends[0].hits() + backends[1].hits() > survivors_before + 200,
        "the survivors took the load"
    );
}
