//! Traffic management (issue 11): backup backends and the all-down policy, the panic
//! threshold, `retry_on` and the retry budget. Each behaviour against real backends behind
//! the real daemon, with the opposite case beside it so the test can fail.

mod support;

use std::time::Duration;

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

    let (failed, attempts) = storm(retrying.addr("web"), 20, &[&a, &b]).await;
    assert_eq!(failed, 0, "every 503 from a was retried on b");
    // A 503 is an answer, not a failed backend: a is never ejected, so every request (the
    // retry takes a round-robin turn too) still goes to a first.
    assert_eq!(attempts, 40, "a 503 ejected a");
    // With a backoff, a retried request takes at least that long.
    let paused = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .pool("retry_on = [\"503\"]\nretry_backoff = \"300ms\"")
            .build(),
    );
    let mut c = Client::connect(paused.addr("web")).await.unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..2 {
        let t = std::time::Instant::now();
        assert_eq!(c.get("/").await.unwrap().status, 200);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest >= Duration::from_millis(300),
        "no pause before the retry: {slowest:?}"
    );
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

/// A backend named `name` that answers every request, or with `silent_on_reuse` only the
/// first of each connection: it closes a connection on its second request without a byte
/// of answer, which is what a backend closing an idle connection (or dying) looks like to a
/// proxy that just reused it. Returns its address and how many request heads it has read.
async fn reuse_backend(
    name: &'static str,
    silent_on_reuse: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    scripted_backend(move |n, _| {
        (n == 1 || !silent_on_reuse)
            .then(|| format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{name}").into_bytes())
    })
    .await
}

/// Two backends close the connections ballast reuses without answering (an idle-close race,
/// or a backend gone), one answers. With `retries = 1`, a GET that meets both closes is not
/// out of retries: a try that a reused connection ended before any byte of an answer is
/// not counted, as one that never left is not. The order is round robin's: a, b, c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_connection_closed_without_an_answer_spends_no_retry() {
    use std::sync::atomic::Ordering;
    let (a, a_heads) = reuse_backend("a", true).await;
    let (b, b_heads) = reuse_backend("b", true).await;
    let (c, c_heads) = reuse_backend("c", false).await;
    let lb = Ballast::start(&TestConfig::addresses([a, b, c]).pool("retries = 1").build());
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    // One request each opens a connection to a, b and c, which ballast keeps.
    let mut first = Vec::new();
    for _ in 0..3 {
        let r = client.get("/").await.unwrap();
        first.push((r.status, r.body));
    }
    assert_eq!(
        first,
        [(200, "a".into()), (200, "b".into()), (200, "c".into())]
    );
    // The fourth goes to a's kept connection, then b's: both close unanswered; c answers.
    let r = client.get("/").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "c"), "{}", lb.logs());
    assert_eq!(
        (
            a_heads.load(Ordering::SeqCst),
            b_heads.load(Ordering::SeqCst),
            c_heads.load(Ordering::SeqCst)
        ),
        (2, 2, 2),
        "a and b each saw the request once more, then c answered it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_holds_during_a_503_storm() {
    let [a, b] = start_backends(["a", "b"]).await;
    a.set_status(503);
    const N: usize = 200;
    let pool = "retry_on = [\"503\"]\nretry_budget = \"20%\"\nretry_budget_min = 1";
    let budgeted = Ballast::start(&TestConfig::new(&[&a, &b]).pool(pool).admin().build());
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
    // Every retry went to b and was answered; every refused one left a's 503 as the answer.
    let page = get(budgeted.admin(), "/metrics").await.body;
    let app = [("pool", "app")];
    assert_eq!(
        metric(&page, "ballast_pool_retries_total", &app),
        retries as f64
    );
    assert_eq!(
        metric(&page, "ballast_pool_retries_over_budget_total", &app),
        failed as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_set_and_remove_headers_strip_and_rewrite_prefixes_and_carry_a_request_id() {
    let [a] = start_backends(["a"]).await;
    let routes = r#"request_id = true
routes = [
  { path_prefix = "/api/", pool = "app", strip_prefix = true },
  { path_prefix = "/old", pool = "app", rewrite_prefix = "/echo-path/new/" },
  { path_prefix = "/rules/", pool = "app", rewrite_prefix = "/headers/", request_headers = { set = { "X-Env" = "prod", "X-Client" = "${client_ip} via ${listener}" }, remove = ["X-Debug"] }, response_headers = { set = { "X-Id" = "${request_id}", "X-Served" = "yes" }, remove = ["X-Backend"] } },
]"#;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .head("[access_log]\npath = \"access.log\"\nformat = \"json\"\n")
            .listener(routes)
            .build(),
    );
    let web = lb.addr("web");

    let r = get(web, "/api/echo-path?q=1").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/echo-path?q=1"),
        "stripped"
    );
    let r = get(web, "/old/x?y=2").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "/echo-path/new/x?y=2"),
        "rewritten"
    );

    let r = get_with(web, "/rules/a", &[("x-debug", "1"), ("x-env", "dev")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen: Vec<&str> = r.body.lines().collect();
    assert!(seen.contains(&"x-env: prod"), "set replaces: {seen:?}");
    assert!(
        !seen.iter().any(|l| l.starts_with("x-debug")),
        "removed: {seen:?}"
    );
    assert!(seen.contains(&"x-client: 127.0.0.1 via web"), "{seen:?}");
    let id = seen
        .iter()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("an id was generated");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(r.headers["x-id"], id, "the response carries the same id");
    assert_eq!(r.headers["x-served"], "yes");
    assert!(
        r.headers.get("x-backend").is_none(),
        "removed from the response"
    );

    // A client's own id passes through; an overlong one is replaced.
    let r = get_with(web, "/rules/b", &[("x-request-id", "trace-42")]).await;
    assert!(
        r.body.lines().any(|l| l == "x-request-id: trace-42"),
        "{}",
        r.body
    );
    assert_eq!(r.headers["x-id"], "trace-42");
    let long = "z".repeat(300);
    let r = get_with(web, "/rules/c", &[("x-request-id", &long)]).await;
    assert_eq!(r.headers["x-id"].len(), 32, "an overlong id is replaced");

    // The default route has no rules: nothing set or removed, the id still forwarded.
    let r = get_with(web, "/headers", &[("x-debug", "1")]).await;
    assert!(r.body.lines().any(|l| l == "x-debug: 1"), "{}", r.body);
    assert!(
        r.body.lines().any(|l| l.starts_with("x-request-id: ")),
        "{}",
        r.body
    );
    assert!(!r.body.contains("x-env"), "{}", r.body);
    assert_eq!(r.headers["x-backend"], "a");

    // The id is logged.
    let path = lb.dir.path().join("access.log");
    let logged = eventually(Duration::from_secs(5), async || {
        std::fs::read_to_string(&path).is_ok_and(|t| t.contains("\"request_id\":\"trace-42\""))
    })
    .await;
    assert!(
        logged.is_some(),
        "{}",
        std::fs::read_to_string(&path).unwrap_or_default()
    );
}

#[test]
fn bad_rules_are_refused_with_their_place() {
    let base = "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n";
    for (listener, pool, want) in [
        (
            "routes = [{ pool = \"app\", strip_prefix = true }]",
            "",
            "need a path_prefix",
        ),
        (
            "routes = [{ path_prefix = \"/a\", pool = \"app\", strip_prefix = true, rewrite_prefix = \"/b\" }]",
            "",
            "choose one",
        ),
        (
            "request_headers = { set = { \"Content-Length\" = \"1\" } }",
            "",
            "frames the message",
        ),
        (
            "request_headers = { set = { \"X-A\" = \"${nope}\" } }",
            "",
            "unknown variable",
        ),
        (
            "rate_limit = { requests_per_second = 1, ipv6_prefix = 0 }",
            "",
            "ipv6_prefix",
        ),
        ("", "when_all_down = \"maybe\"", "when_all_down"),
        ("", "panic_threshold = \"150%\"", "panic_threshold"),
        ("", "retry_on = [\"500\"]", "retry_on"),
        ("", "retry_budget_min = 3", "only used with retry_budget"),
    ] {
        let text = format!(
            "{base}{listener}\n[pools.app]\nbackends = [\"127.0.0.1:1\"]\n{pool}\n"
        );
        let (ok, err) = check_config(&text);
        assert!(!ok, "accepted: {text}");
        assert!(err.contains(want), "{want:?} not in {err}");
        assert!(err.contains(":"), "no place in {err}");
    }
    let (ok, err) = check_config(&format!(
        "{base}\n[pools.app]\nbackends = [{{ address = \"127.0.0.1:1\", backup = true }}]\n"
    ));
    assert!(!ok && err.contains("needs a primary"), "{err}");
}

/// GET `path` on a connection of its own; (status, when it was answered).
async fn timed_get(web: std::net::SocketAddr, path: String) -> (u16, std::time::Instant) {
    let r = get(web, &path).await;
    (r.status, std::time::Instant::now())
}

async fn queued(admin: std::net::SocketAddr) -> u64 {
    let (_, status) = admin_call(admin, "GET", "/status", None).await;
    status["pools"]["app"]["queued"].as_u64().unwrap_or(0)
}

/// Fills a pool of one backend `a` that has `max_connections = 1`: a request to
/// `hold_path` takes the slot, then `n` requests to `path` wait in the queue (each seen in
/// `/status` first). Returns the holder and the waiters.
async fn hold_and_queue(
    web: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    a: &Backend,
    hold_path: &str,
    n: usize,
    path: &str,
) -> (Waiter, Vec<Waiter>) {
    let holder = tokio::spawn(timed_get(web, hold_path.to_string()));
    assert!(
        eventually(WAIT, async || a.in_flight() == 1)
            .await
            .is_some(),
        "the holding request never reached the backend"
    );
    let waiting: Vec<_> = (0..n)
        .map(|_| tokio::spawn(timed_get(web, path.to_string())))
        .collect();
    assert!(
        eventually(WAIT, async || queued(admin).await == n as u64)
            .await
            .is_some(),
        "{n} requests did not queue"
    );
    (holder, waiting)
}

type Waiter = tokio::task::JoinHandle<(u16, std::time::Instant)>;

/// Awaits the queued requests and then the holder, each of which must be answered 200
/// (the holder's backend may have left the pool meanwhile: its request still finishes);
/// whether every queued one was answered before the holder.
async fn all_served_before_the_holder(holder: Waiter, waiting: Vec<Waiter>) -> bool {
    let mut served = Vec::new();
    for w in waiting {
        let (status, at) = w.await.unwrap();
        assert_eq!(status, 200, "a queued request was not served");
        served.push(at);
    }
    let (status, held_until) = holder.await.unwrap();
    assert_eq!(status, 200, "the holding request was cut");
    served.iter().all(|t| *t < held_until)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_serves_in_order_within_max_connections_and_is_bounded() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .pool("max_connections = 1\nmax_queue = 3\nqueue_timeout = \"10s\"")
            .admin()
            .build(),
    );
    let (web, admin) = (lb.addr("web"), lb.admin());
    // Largest number of requests the backend held at once, sampled while the test runs.
    let in_flight = a.in_flight_counter();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            for _ in 0..20_000 {
                let n = in_flight.load(std::sync::atomic::Ordering::SeqCst);
                peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let first = tokio::spawn(timed_get(web, "/slow/600".into()));
    assert!(
        eventually(WAIT, async || a.in_flight() == 1)
            .await
            .is_some(),
        "the first request never reached the backend"
    );
    // Three more queue up, one after the other (each seen in the queue before the next).
    let mut waiting = Vec::new();
    for i in 1..=3u64 {
        // 200 ms each: their answers are far enough apart that when a client task records
        // its time cannot reorder them.
        waiting.push(tokio::spawn(timed_get(web, "/slow/200".into())));
        assert!(
            eventually(WAIT, async || queued(admin).await == i)
                .await
                .is_some(),
            "request {i} did not queue"
        );
    }
    // The metric says what /status says.
    let page = get(admin, "/metrics").await.body;
    assert_eq!(
        metric(&page, "ballast_pool_queued", &[("pool", "app")]),
        3.0
    );
    // The queue is full: the next one is refused at once.
    let refused = get(web, "/").await;
    assert_eq!(refused.status, 503);
    assert!(lb.wait_for_log("reason=queue_full", WAIT), "{}", lb.logs());

    let (status, t0) = first.await.unwrap();
    assert_eq!(status, 200);
    let mut done = Vec::new();
    for w in waiting {
        let (status, t) = w.await.unwrap();
        assert_eq!(status, 200, "a queued request was served");
        done.push(t);
    }
    assert!(
        t0 <= done[0] && done[0] <= done[1] && done[1] <= done[2],
        "served out of order"
    );
    sampler.abort();
    assert_eq!(
        peak.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "max_connections exceeded"
    );
    assert_eq!(queued(admin).await, 0);
    let page = get(admin, "/metrics").await.body;
    assert_eq!(
        metric(&page, "ballast_pool_queued", &[("pool", "app")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_request_times_out_with_503_and_blames_no_backend() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .pool("max_connections = 1\nqueue_timeout = \"300ms\"")
            .admin()
            .build(),
    );
    let web = lb.addr("web");
    let holder = tokio::spawn(timed_get(web, "/slow/3000".into()));
    assert!(eventually(WAIT, async || a.in_flight() == 1)
        .await
        .is_some());
    let started = std::time::Instant::now();
    let r = get(web, "/").await;
    let waited = started.elapsed();
    assert_eq!(r.status, 503);
    assert!(
        waited >= Duration::from_millis(300),
        "answered before the timeout: {waited:?}"
    );
    assert!(
        lb.wait_for_log("reason=queue_timeout", WAIT),
        "{}",
        lb.logs()
    );
    assert_eq!(backend_state(lb.admin(), "app", a.addr).await, "healthy");
    assert_eq!(holder.await.unwrap().0, 200);
    // The slot is free again: served at once.
    assert_eq!(get(web, "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_leave_the_queue_free_their_places_and_blame_no_backend() {
    use tokio::io::AsyncWriteExt;
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .pool("max_connections = 1\nmax_queue = 5\nqueue_timeout = \"30s\"")
            .admin()
            .build(),
    );
    let (web, admin) = (lb.addr("web"), lb.admin());
    let holder = tokio::spawn(timed_get(web, "/slow/3000".into()));
    assert!(eventually(WAIT, async || a.in_flight() == 1)
        .await
        .is_some());
    // Five clients fill the queue, then go away without waiting for their answers.
    let mut gone = Vec::new();
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(web).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        gone.push(s);
    }
    assert!(
        eventually(WAIT, async || queued(admin).await == 5)
            .await
            .is_some(),
        "the five did not queue"
    );
    drop(gone);
    // Their places are free long before the queue timeout: the queue takes new requests.
    assert!(
        eventually(WAIT, async || queued(admin).await == 0)
            .await
            .is_some(),
        "clients that left still hold queue places"
    );
    let waiting = tokio::spawn(timed_get(web, "/".into()));
    assert!(eventually(WAIT, async || queued(admin).await == 1)
        .await
        .is_some());
    assert_eq!(holder.await.unwrap().0, 200);
    assert_eq!(waiting.await.unwrap().0, 200);
    // The five never reached the backend and cost it nothing.
    assert_eq!(a.hits(), 2);
    assert_eq!(backend_state(admin, "app", a.addr).await, "healthy");
    // Counted as the clients' doing, and as nothing else.
    let page = get(admin, "/metrics").await.body;
    let closed = [("pool", "app"), ("reason", "client_closed")];
    assert_eq!(metric(&page, "ballast_pool_failures_total", &closed), 5.0);
    assert_eq!(metric(&page, "ballast_pool_failures_total", &[]), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_loses_no_queued_request() {
    let [a, b] = start_backends(["a", "b"]).await;
    let limits = "max_connections = 1\nqueue_timeout = \"10s\"";
    let lb = Ballast::start(&TestConfig::new(&[&a]).pool(limits).admin().build());
    let (web, admin) = (lb.addr("web"), lb.admin());
    let (holder, waiting) = hold_and_queue(web, admin, &a, "/slow/800", 2, "/slow/20").await;
    lb.save_config(
        &TestConfig::new(&[&a, &b]).pool(limits).admin().build(),
        Save::Rename,
    );
    assert!(lb.wait_for_log("config reloaded", WAIT), "{}", lb.logs());
    assert_eq!(queued(admin).await, 2, "the queue carried over the reload");
    assert_eq!(holder.await.unwrap().0, 200);
    for w in waiting {
        assert_eq!(w.await.unwrap().0, 200, "a queued request was lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_replaces_the_backends_sends_queued_requests_to_the_new_ones() {
    let [a, b] = start_backends(["a", "b"]).await;
    let limits = "max_connections = 1\nqueue_timeout = \"10s\"";
    let lb = Ballast::start(&TestConfig::new(&[&a]).pool(limits).admin().build());
    let (web, admin) = (lb.addr("web"), lb.admin());
    let (holder, waiting) = hold_and_queue(web, admin, &a, "/slow/3000", 2, "/slow/20").await;
    // a leaves the pool and b takes its place: the queued requests go to b, without
    // waiting for a's running request.
    lb.save_config(
        &TestConfig::new(&[&b]).pool(limits).admin().build(),
        Save::Rename,
    );
    assert!(lb.wait_for_log("config reloaded", WAIT), "{}", lb.logs());
    assert!(
        all_served_before_the_holder(holder, waiting).await,
        "the queued requests waited for the removed backend"
    );
    assert_eq!(b.hits(), 2, "the queued requests went elsewhere");
    assert_eq!(a.hits(), 1);
    assert_eq!(queued(admin).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_lifts_the_limit_serves_the_queue_at_once() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .pool("max_connections = 1\nqueue_timeout = \"10s\"")
            .admin()
            .build(),
    );
    let (web, admin) = (lb.addr("web"), lb.admin());
    let (holder, waiting) = hold_and_queue(web, admin, &a, "/slow/3000", 2, "/").await;
    lb.save_config(&TestConfig::new(&[&a]).admin().build(), Save::Rename);
    assert!(lb.wait_for_log("config reloaded", WAIT), "{}", lb.logs());
    assert!(
        all_served_before_the_holder(holder, waiting).await,
        "the queued requests still waited for the limit the reload lifted"
    );
}

/// Where 10 concurrent requests with one hash key went, per backend name.
async fn hot_key_burst(web: std::net::SocketAddr) -> std::collections::BTreeMap<String, usize> {
    let burst: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn(async move {
                get_with(web, "/slow/1000", &[("x-key", "hot")])
                    .await
                    .backend()
                    .to_string()
            })
        })
        .collect();
    let mut got = std::collections::BTreeMap::new();
    for b in burst {
        *got.entry(b.await.unwrap()).or_insert(0) += 1;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_spills_over_only_while_its_backend_is_over_the_bound() {
    let [a, b] = start_backends(["a", "b"]).await;
    let hash = "algorithm = \"hash\"\nhash_key = \"header:X-Key\"";
    let bounded = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .pool(&format!("{hash}\nhash_balance_factor = 125"))
            .build(),
    );
    let plain = Ballast::start(&TestConfig::new(&[&a, &b]).pool(hash).build());

    // Unloaded, the key is sticky: every request goes to its one backend.
    let mut home = String::new();
    for lb in [&bounded, &plain] {
        let mut c = Client::connect(lb.addr("web")).await.unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let mut req = http::Request::get("/")
                .header("host", "x")
                .header("x-key", "hot");
            req = req.header("connection", "keep-alive");
            let r = c
                .request(req.body(http_body_util::Full::default()).unwrap())
                .await
                .unwrap();
            seen.insert(r.backend().to_string());
        }
        assert_eq!(seen.len(), 1, "{seen:?}");
        home = seen.into_iter().next().unwrap();
    }

    let spread = hot_key_burst(plain.addr("web")).await;
    assert_eq!(
        spread.get(&home),
        Some(&10),
        "plain hashing keeps a hot key on one backend: {spread:?}"
    );
    let spread = hot_key_burst(bounded.addr("web")).await;
    println!("hot key with hash_balance_factor = 125: {spread:?}");
    // 125% of the average of 10 over 2 is 6.25: the home backend takes at most 7 (the
    // bound is taken before each request is counted), the other the rest.
    let at_home = spread.get(&home).copied().unwrap_or(0);
    assert!((5..=7).contains(&at_home), "{spread:?}");
    assert_eq!(spread.values().sum::<usize>(), 10);

    // The load is gone: the key is back on its own backend.
    let r = get_with(bounded.addr("web"), "/", &[("x-key", "hot")]).await;
    assert_eq!(r.backend(), home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_rate_limit_a_client_gets_429_with_retry_after_and_the_backend_nothing() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener(
                "rate_limit = { requests_per_second = 0.05, burst = 3 }\nroutes = [{ path_prefix = \"/keyed/\", pool = \"app\", rate_limit = { requests_per_second = 0.05, burst = 2, key = \"header:X-Api-Key\" } }]",
            )
            .build(),
    );
    let web = lb.addr("web");
    // Refills are 20 s apart: no request in this test waits long enough to see one.
    let mut c = Client::connect(web).await.unwrap();
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..5 {
        let r = c
            .get("/")
            .await
            .expect("the connection stays open after a 429");
        if r.status == 429 {
            retry_after = r.headers.get("retry-after").cloned();
        }
        statuses.push(r.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "burst of 3, then limited"
    );
    let secs: u64 = retry_after
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // One token per 20 s: the client is told to come back within that.
    assert!((1..=20).contains(&secs), "{secs}");
    assert_eq!(a.hits(), 3, "a limited request reached the backend");
    assert!(
        lb.wait_for_log("reason=rate_limited", WAIT),
        "{}",
        lb.logs()
    );

    // Another client address has its own bucket (the listener's limit is per client_ip).
    let other = get_from("127.0.0.2".parse().unwrap(), web, "/", "")
        .await
        .expect("answer");
    assert_eq!(other.status, 200);
    // The route's limit is per API key, on top of the listener's.
    let from = "127.0.0.3".parse().unwrap();
    let key_get = |key: &'static str| async move {
        let key = format!("X-Api-Key: {key}\r\n");
        let r = get_from(from, web, "/keyed/x", &key).await;
        r.expect("answer").status
    };
    let got = [
        key_get("k1").await,
        key_get("k1").await,
        key_get("k1").await,
    ];
    assert_eq!(got, [200, 200, 429], "burst of 2 per key");
    // k2 has its own bucket; the listener's bucket for 127.0.0.3 (3) is spent by now.
    assert_eq!(
        key_get("k2").await,
        429,
        "the listener's limit still applies"
    );
    let fresh = "127.0.0.4".parse().unwrap();
    let r = get_from(fresh, web, "/keyed/x", "").await.unwrap();
    assert_eq!(r.status, 200, "no key: counted by address, a fresh one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_table_stays_bounded_under_many_client_addresses() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("rate_limit = { requests_per_second = 0.05, burst = 1, max_keys = 32 }")
            .admin()
            .build(),
    );
    let web = lb.addr("web");
    let mut served = 0;
    for i in 0..300u32 {
        let ip = std::net::Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
        let r = get_from(ip.into(), web, "/", "").await.expect("answer");
        served += usize::from(r.status == 200);
    }
    assert_eq!(served, 300, "each new address has a full bucket");
    let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
    let keys = status["listeners"]["web"]["rate_limit_keys"]
        .as_u64()
        .expect("keys shown");
    assert!(keys <= 32, "{keys} keys tracked with max_keys = 32");
    assert!(keys >= 16, "the table is in use: {keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_limited_per_64_unless_told_otherwise() {
    let [a] = start_backends(["a"]).await;
    // The client addresses come from PROXY headers (the test can only connect from
    // loopback); ballast counts the address the header gives.
    let limited = |prefix: &str| {
        Ballast::start(
            &TestConfig::new(&[&a])
                .listener(&format!(
                    "accept_proxy = [\"127.0.0.1\"]\nrate_limit = {{ requests_per_second = 0.05, burst = 1{prefix} }}"
                ))
                .build(),
        )
    };
    let status_from = async |web, client: &str| {
        let head = format!("PROXY TCP6 {client} 2001:db8::80 40000 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        raw_request(web, head.as_bytes())
            .await
            .expect("answer")
            .status
    };
    let per_64 = limited("");
    let web = per_64.addr("web");
    assert_eq!(status_from(web, "2001:db8:0:1::1").await, 200);
    // Another address of the same /64 shares its bucket; another /64 has its own.
    assert_eq!(status_from(web, "2001:db8:0:1::beef").await, 429);
    assert_eq!(status_from(web, "2001:db8:0:2::1").await, 200);

    let per_address = limited(", ipv6_prefix = 128");
    let web = per_address.addr("web");
    assert_eq!(status_from(web, "2001:db8:0:1::1").await, 200);
    assert_eq!(status_from(web, "2001:db8:0:1::beef").await, 200);
    assert_eq!(status_from(web, "2001:db8:0:1::1").await, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_queued_requests_with_503_at_once_and_finishes_the_running_one() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .pool("max_connections = 1\nqueue_timeout = \"30s\"")
            .admin()
            .build(),
    );
    let (web, admin) = (lb.addr("web"), lb.admin());
    let (holder, waiting) = hold_and_queue(web, admin, &a, "/slow/1500", 2, "/").await;
    let drained_at = std::time::Instant::now();
    assert_eq!(admin_backend(admin, a.addr, "drain").await, 200);
    for w in waiting {
        let (status, at) = w.await.unwrap();
        assert_eq!(status, 503, "a queued request for a drained pool");
        assert!(
            at.duration_since(drained_at) < Duration::from_secs(5),
            "answered only after {:?}, not at the drain",
            at.duration_since(drained_at)
        );
    }
    assert!(
        lb.wait_for_log("reason=no_healthy_backend", WAIT),
        "{}",
        lb.logs()
    );
    assert_eq!(
        holder.await.unwrap().0,
        200,
        "the request in flight finished"
    );
}
