//! Traffic management (issue 11): backup backends and the all-down policy, the panic
//! threshold, `retry_on` and the retry budget. Each behaviour against real backends behind
//! the real daemon, with the opposite case beside it so the test can fail.

mod support;

use support::*;

/// Health checks quick enough that a backend's state follows `set_healthy` in a few 50 ms
/// rounds.
const CHECKS: &str =
    "[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"50ms\"\nrise = 1\nfall = 1\n";

/// Where `n` requests on one keep-alive connection went: the backend name of each 200, and
/// the other statuses.
async fn spread(web: std::net::SocketAddr, n: usize) -> (Vec<String>, Vec<u16>) {
    let mut client = Client::connect(web).await.expect("connect");
    let mut names = Vec::new();
    let mut other = Vec::new();
    for _ in 0..n {
        let r = client.get("/").await.expect("request");
        if r.status == 200 {
            names.push(r.backend().to_string());
        } else {
            other.push(r.status);
        }
    }
    (names, other)
}

fn count(names: &[String], who: &str) -> usize {
    names.iter().filter(|n| *n == who).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_over_when_no_primary_is_up_and_hands_back() {
    let [a, b, spare] = start_backends(["a", "b", "spare"]).await;
    let lb = Ballast::start(
        &TestConfig::entries(&[
            format!("\"{}\"", a.addr),
            format!("\"{}\"", b.addr),
            format!("{{ address = \"{}\", backup = true }}", spare.addr),
        ])
        .pool(CHECKS)
        .admin()
        .build(),
    );
    let web = lb.addr("web");
    let (names, other) = spread(web, 20).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(
        count(&names, "spare"),
        0,
        "the backup got traffic while primaries were up: {names:?}"
    );

    // One primary down: the other carries it all; the backup still waits.
    a.set_healthy(false);
    assert!(
        lb.wait_for_log_count("backend is unhealthy", 1, WAIT),
        "{}",
        lb.logs()
    );
    let (names, _) = spread(web, 20).await;
    assert_eq!(count(&names, "b"), 20, "{names:?}");

    // Both down: the backup takes over.
    b.set_healthy(false);
    assert!(
        lb.wait_for_log_count("backend is unhealthy", 2, WAIT),
        "{}",
        lb.logs()
    );
    let (names, other) = spread(web, 20).await;
    assert!(other.is_empty(), "no 503 while a backup is up: {other:?}");
    assert_eq!(count(&names, "spare"), 20, "{names:?}");
    let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
    let shown = &status["pools"]["app"]["backends"][2];
    assert_eq!(shown["backup"], true, "{status}");

    // One primary back: it gets everything again at once.
    a.set_healthy(true);
    assert!(
        lb.wait_for_log_count("backend is healthy", 1, WAIT),
        "{}",
        lb.logs()
    );
    let (names, _) = spread(web, 20).await;
    assert_eq!(count(&names, "a"), 20, "the backup kept traffic: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_sends_to_backends_the_checks_call_down_and_reject_answers_503() {
    let [a, b] = start_backends(["a", "b"]).await;
    let open = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .pool(&format!("when_all_down = \"fail_open\"\n{CHECKS}"))
            .build(),
    );
    let reject = Ballast::start(&TestConfig::new(&[&a, &b]).pool(CHECKS).build());
    a.set_healthy(false);
    b.set_healthy(false);
    for lb in [&open, &reject] {
        assert!(
            lb.wait_for_log_count("backend is unhealthy", 2, WAIT),
            "{}",
            lb.logs()
        );
    }
    let (names, other) = spread(open.addr("web"), 20).await;
    assert!(other.is_empty(), "fail_open answered {other:?}");
    assert_eq!(
        (count(&names, "a"), count(&names, "b")),
        (10, 10),
        "{names:?}"
    );

    let (names, other) = spread(reject.addr("web"), 5).await;
    assert!(names.is_empty(), "{names:?}");
    assert_eq!(other, vec![503; 5]);
    assert!(
        reject.wait_for_log("reason=no_healthy_backend", WAIT),
        "{}",
        reject.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_panic_threshold_traffic_goes_to_every_primary() {
    let [a, b, c, d] = start_backends(["a", "b", "c", "d"]).await;
    let all = [&a, &b, &c, &d];
    // 1 of 4 up is 25%: below 50% panics, above 20% does not.
    let panics = Ballast::start(
        &TestConfig::new(&all)
            .pool(&format!("panic_threshold = \"50%\"\n{CHECKS}"))
            .build(),
    );
    let calm = Ballast::start(
        &TestConfig::new(&all)
            .pool(&format!("panic_threshold = \"20%\"\n{CHECKS}"))
            .build(),
    );
    for x in [&b, &c, &d] {
        x.set_healthy(false);
    }
    for lb in [&panics, &calm] {
        assert!(
            lb.wait_for_log_count("backend is unhealthy", 3, WAIT),
            "{}",
            lb.logs()
        );
    }
    let (names, other) = spread(panics.addr("web"), 40).await;
    assert!(other.is_empty(), "{other:?}");
    for who in ["a", "b", "c", "d"] {
        assert_eq!(
            count(&names, who),
            10,
            "panic mode spreads over all: {names:?}"
        );
    }
    let (names, _) = spread(calm.addr("web"), 40).await;
    assert_eq!(
        count(&names, "a"),
        40,
        "above the threshold only the healthy one: {names:?}"
    );
}

/// Sends `n` GETs; returns (statuses other than 200, attempts the backends saw).
async fn storm(web: std::net::SocketAddr, n: usize, backends: &[&Backend]) -> (usize, usize) {
    let before: usize = backends.iter().map(|b| b.hits()).sum();
    let (names, other) = spread(web, n).await;
    assert_eq!(names.len() + other.len(), n);
    assert!(other.iter().all(|s| *s == 503), "{other:?}");
    let after: usize = backends.iter().map(|b| b.hits()).sum();
    (other.len(), after - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_a_status_resends_idempotent_requests_only() {
    let [a, b] = start_backends(["a", "b"]).await;
    a.set_status(503);
    let retrying = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .pool("retry_on = [\"connect_failure\", \"reset\", \"503\"]")
            .build(),
    );
    let plain = Ballast::start(&TestConfig::new(&[&a, &b]).build());

    let (failed, _) = storm(retrying.addr("web"), 20, &[&a, &b]).await;
    assert_eq!(failed, 0, "every 503 from a was retried on b");
    let (failed, attempts) = storm(plain.addr("web"), 20, &[&a, &b]).await;
    assert_eq!(
        (failed, attempts),
        (10, 20),
        "without \"503\" in retry_on a 503 is the answer"
    );

    // A POST that got a 503 was seen by the backend: not sent again.
    let mut posts_failed = 0;
    for _ in 0..4 {
        let r = raw_request(
            retrying.addr("web"),
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .await
        .expect("answer");
        posts_failed += usize::from(r.status == 503);
    }
    assert!(posts_failed >= 1, "a POST was retried after a 503");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_holds_during_a_503_storm() {
    let [a, b] = start_backends(["a", "b"]).await;
    a.set_status(503);
    const N: usize = 200;
    let pool = "retry_on = [\"503\"]\nretry_budget = \"20%\"\nretry_budget_min = 1";
    let budgeted = Ballast::start(&TestConfig::new(&[&a, &b]).pool(pool).build());
    let unbounded = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .pool("retry_on = [\"503\"]")
            .build(),
    );

    let (failed, attempts) = storm(unbounded.addr("web"), N, &[&a, &b]).await;
    let retries_unbounded = attempts - N;
    assert_eq!(failed, 0, "without a budget every 503 is retried");

    let (failed, attempts) = storm(budgeted.addr("web"), N, &[&a, &b]).await;
    let retries = attempts - N;
    // 20% of the requests in the window plus 1 a second over the 10 s window.
    let allowed = N / 5 + 10;
    println!("retries: {retries} with the budget (allowed {allowed}), {retries_unbounded} without");
    assert!(retries <= allowed, "{retries} retries for {N} requests");
    assert!(retries >= N / 10, "the budget still allows some: {retries}");
    assert!(retries_unbounded >= N / 2 - 1, "{retries_unbounded}");
    assert!(failed > 0, "refused retries leave the 503 as the answer");
    assert!(
        budgeted.wait_for_log("reason=retry_budget", WAIT),
        "{}",
        budgeted.logs()
    );
}
