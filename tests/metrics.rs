//! `GET /metrics` against the real daemon under real traffic: the counters add up, they
//! match what the backends saw, failures are counted by reason, a removed backend's series
//! disappear, the token is required, and `promtool check metrics` accepts the page.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{
    admin_call, eventually, get, metric, start_backends, Ballast, Client, Save, TestConfig,
};

const CHECKS: &str = "[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n";

/// `GET /metrics` with an optional bearer token: (status, body).
async fn scrape_with(admin: SocketAddr, token: Option<&str>) -> (u16, String) {
    let mut c = Client::connect(admin).await.expect("connect to admin");
    let mut req = http::Request::get("/metrics").header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = c
        .request(req.body(Default::default()).unwrap())
        .await
        .expect("scrape");
    (r.status, r.body)
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = scrape_with(admin, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Runs promtool's linter on `page` if promtool is installed.
fn promtool_check(page: &str) {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        println!("SKIPPED: promtool check metrics (promtool is not installed; .ci/run installs Debian's prometheus package)");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "promtool check metrics: {text}\n--- page ---\n{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_add_up_under_traffic_match_the_backends_and_removed_backends_disappear() {
    let bs = start_backends(["a", "b", "c"]).await;
    let config = |backends: &[&support::Backend]| {
        TestConfig::new(backends)
            .admin()
            .pool(&format!("retries = 0\n{CHECKS}"))
            .build()
    };
    let lb = Ballast::start(&config(&[&bs[0], &bs[1], &bs[2]]));
    let (web, admin) = (lb.addr("web"), lb.admin());

    // 4 clients x 150 requests, every fifth answered 503 by the backend itself; scrapes
    // run meanwhile.
    const CLIENTS: usize = 4;
    const EACH: usize = 150;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(web).await.unwrap();
            let (mut ok, mut unavailable) = (0, 0);
            for i in 0..EACH {
                let path = if i % 5 == 0 { "/status/503" } else { "/" };
                match c.get(path).await.unwrap().status {
                    200 => ok += 1,
                    503 => unavailable += 1,
                    s => panic!("unexpected status {s}"),
                }
            }
            (ok, unavailable)
        }));
    }
    let mut scrapes_during = 0;
    while !tasks.iter().all(|t| t.is_finished()) && scrapes_during < 200 {
        let page = scrape(admin).await;
        assert!(page.contains("ballast_listener_requests_total"));
        scrapes_during += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut ok, mut unavailable) = (0.0, 0.0);
    for t in tasks {
        let (o, u) = t.await.unwrap();
        ok += o as f64;
        unavailable += u as f64;
    }
    let sent = (CLIENTS * EACH) as f64;
    assert_eq!(ok + unavailable, sent);

    // A request is counted once hyper is done with its response; the client may read it a
    // moment earlier.
    let mut page = String::new();
    let settled = eventually(Duration::from_secs(5), async || {
        page = scrape(admin).await;
        metric(
            &page,
            "ballast_listener_requests_total",
            &[("listener", "web")],
        ) == sent
    })
    .await;
    assert!(
        settled.is_some(),
        "counted {} of {sent}\n{page}",
        metric(&page, "ballast_listener_requests_total", &[])
    );

    let web_code = |code| {
        metric(
            &page,
            "ballast_listener_requests_total",
            &[("listener", "web"), ("code", code)],
        )
    };
    assert_eq!(web_code("2xx"), ok);
    assert_eq!(web_code("5xx"), unavailable);
    assert_eq!(
        web_code("2xx") + web_code("5xx"),
        metric(&page, "ballast_listener_requests_total", &[])
    );
    assert_eq!(
        metric(&page, "ballast_pool_requests_total", &[("pool", "app")]),
        sent
    );
    // Each backend's count is what that backend itself says it served.
    let mut per_backend = 0.0;
    for b in &bs {
        let addr = b.addr.to_string();
        let counted = metric(
            &page,
            "ballast_backend_requests_total",
            &[("backend", &addr)],
        );
        assert_eq!(counted, b.hits() as f64, "backend {addr}");
        assert!(counted > 0.0);
        per_backend += counted;
        assert_eq!(
            metric(&page, "ballast_backend_up", &[("backend", &addr)]),
            1.0
        );
        assert_eq!(
            metric(
                &page,
                "ballast_backend_state",
                &[("backend", &addr), ("state", "healthy")]
            ),
            1.0
        );
        assert!(
            metric(
                &page,
                "ballast_backend_health_checks_total",
                &[("backend", &addr), ("result", "pass")]
            ) >= 1.0
        );
        assert!(
            metric(
                &page,
                "ballast_backend_received_bytes_total",
                &[("backend", &addr)]
            ) > 0.0
        );
    }
    assert_eq!(per_backend, sent);
    assert_eq!(
        metric(
            &page,
            "ballast_request_duration_seconds_count",
            &[("pool", "app")]
        ),
        sent
    );
    assert_eq!(
        metric(
            &page,
            "ballast_upstream_header_duration_seconds_count",
            &[("pool", "app")]
        ),
        sent
    );
    assert!(
        metric(
            &page,
            "ballast_upstream_connect_duration_seconds_count",
            &[("pool", "app")]
        ) >= 1.0
    );
    assert_eq!(
        metric(&page, "ballast_pool_healthy_backends", &[("pool", "app")]),
        3.0
    );
    assert_eq!(
        metric(
            &page,
            "ballast_listener_connections_accepted_total",
            &[("listener", "web")]
        ),
        CLIENTS as f64
    );
    assert_eq!(metric(&page, "ballast_pool_failures_total", &[]), 0.0);
    promtool_check(&page);

    // Backend c leaves the config: its series are gone from the next scrape.
    let gone = bs[2].addr.to_string();
    assert!(page.contains(&gone));
    lb.save_config(&config(&[&bs[0], &bs[1]]), Save::Rename);
    let reloaded = eventually(Duration::from_secs(10), async || {
        admin_call(admin, "GET", "/status", None).await.1["generation"] == 2
    })
    .await;
    assert!(reloaded.is_some(), "reload not applied");
    let page = scrape(admin).await;
    assert!(
        !page.contains(&gone),
        "removed backend still exported:\n{page}"
    );
    assert!(page.contains(&bs[0].addr.to_string()));
    assert_eq!(
        metric(
            &page,
            "ballast_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(metric(&page, "ballast_config_generation", &[]), 2.0);
    // The listener's counters survive the reload.
    assert_eq!(
        metric(
            &page,
            "ballast_listener_requests_total",
            &[("listener", "web")]
        ),
        sent
    );
    promtool_check(&page);

    // A bad edit is rejected: counted as a failure, the last success time stays.
    let last_ok = metric(
        &page,
        "ballast_config_last_reload_success_timestamp_seconds",
        &[],
    );
    lb.save_config("[listeners.web]\nbind = \"nonsense\"\n", Save::Rename);
    let rejected = eventually(Duration::from_secs(10), async || {
        admin_call(admin, "GET", "/status", None).await.1["reload"]["rejected"] == 1
    })
    .await;
    assert!(rejected.is_some(), "bad edit not rejected");
    let page = scrape(admin).await;
    assert_eq!(
        metric(
            &page,
            "ballast_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &page,
            "ballast_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &page,
            "ballast_config_last_reload_success_timestamp_seconds",
            &[]
        ),
        last_ok
    );
    assert_eq!(metric(&page, "ballast_config_generation", &[]), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_counted_by_reason_and_only_where_they_belong() {
    let [live] = start_backends(["live"]).await;
    // A port nothing listens on: connecting is refused at once.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let lb = Ballast::start(
        &TestConfig::addresses([live.addr, dead_addr])
            .admin()
            .pool("retries = 1\npassive = { max_fails = 0 }")
            .build(),
    );
    let (web, admin) = (lb.addr("web"), lb.admin());
    for _ in 0..20 {
        assert_eq!(get(web, "/").await.status, 200);
    }
    // Both backends drained: ballast answers 503 itself.
    for b in [live.addr, dead_addr] {
        let (s, _) = admin_call(
            admin,
            "POST",
            &format!("/pools/app/backends/{b}/drain"),
            None,
        )
        .await;
        assert_eq!(s, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(web, "/").await.status, 503);
    }
    let mut page = String::new();
    let settled = eventually(Duration::from_secs(5), async || {
        page = scrape(admin).await;
        metric(&page, "ballast_listener_requests_total", &[]) == 23.0
    })
    .await;
    assert!(settled.is_some(), "{page}");
    let dead_s = dead_addr.to_string();
    // Every request round robin sent to the dead backend first was retried on the live one.
    let retries = metric(&page, "ballast_pool_retries_total", &[("pool", "app")]);
    assert!(retries >= 1.0, "{page}");
    assert_eq!(
        metric(
            &page,
            "ballast_backend_failures_total",
            &[("backend", &dead_s)]
        ),
        retries
    );
    assert_eq!(
        metric(
            &page,
            "ballast_backend_requests_total",
            &[("backend", &dead_s)]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &page,
            "ballast_backend_requests_total",
            &[("backend", &live.addr.to_string()), ("code", "2xx")]
        ),
        20.0
    );
    // Retried requests succeeded: they are no failure; the 503s are.
    assert_eq!(
        metric(
            &page,
            "ballast_pool_failures_total",
            &[("pool", "app"), ("reason", "no_healthy_backend")]
        ),
        3.0
    );
    assert_eq!(metric(&page, "ballast_pool_failures_total", &[]), 3.0);
    assert_eq!(
        metric(&page, "ballast_pool_healthy_backends", &[("pool", "app")]),
        0.0
    );
    assert_eq!(
        metric(
            &page,
            "ballast_backend_state",
            &[("backend", &dead_s), ("state", "draining")]
        ),
        1.0
    );
    promtool_check(&page);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_token_and_can_be_switched_off() {
    let [b] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&b])
            .head("[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n")
            .build(),
    );
    let (s, _) = scrape_with(lb.admin(), None).await;
    assert_eq!(s, 401);
    let (s, _) = scrape_with(lb.admin(), Some("wrong")).await;
    assert_eq!(s, 401);
    let (s, page) = scrape_with(lb.admin(), Some("s3cret")).await;
    assert_eq!(s, 200);
    assert!(page.contains("ballast_build_info"));

    let off = Ballast::start(
        &TestConfig::new(&[&b])
            .head("[admin]\nbind = \"127.0.0.1:0\"\nmetrics = false\n")
            .build(),
    );
    assert_eq!(get(off.addr("web"), "/").await.status, 200);
    let (s, body) = scrape_with(off.admin(), None).await;
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("metrics are off"));
}

/// The alert rules shipped in config/prometheus/ are valid, and `BallastPoolDown` fires on
/// a pool whose last healthy backend went away (promtool's rule unit test).
#[test]
fn shipped_alert_rules_check_and_fire() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = match std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
        {
            Ok(out) => out,
            Err(_) => {
                println!(
                    "SKIPPED: promtool {} (promtool is not installed)",
                    args.join(" ")
                );
                return;
            }
        };
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
