//! Hot reload from the TOML file: storms of edits under traffic, invalid edits, state that
//! survives, listeners added and removed, and how fast a change takes effect.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    admin_call, backend_state, start_backends, Backend, Ballast, Client, Save, TestConfig,
};

const CHECKS: &str = "[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\nrise = 3\n";

fn cfg(algorithm: &str, backends: &[(&Backend, u32)], extra: &str) -> String {
    let key = if algorithm == "hash" {
        "hash_key = \"header:x-user\"\n"
    } else {
        ""
    };
    TestConfig::weighted(backends)
        .admin()
        .pool(&format!("algorithm = \"{algorithm}\"\n{key}{extra}"))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_under_traffic_drops_nothing_and_ends_on_the_final_split() {
    let bs = [
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
        Backend::start("d").await,
    ];
    let lb = Ballast::start(&cfg("round_robin", &[(&bs[0], 1), (&bs[1], 1)], ""));
    let addr = lb.addr("web");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..3 {
        let (stop, sent) = (stop.clone(), sent.clone());
        clients.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut client = Client::connect(addr).await.unwrap();
            for n in 0..20_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if n % 50 == 0 && i > 0 {
                    client = Client::connect(addr).await.unwrap();
                }
                let req = http::Request::get(if n % 7 == 0 { "/slow/20" } else { "/" })
                    .header("host", "t")
                    .header("x-user", format!("u{n}"))
                    .body(Default::default())
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("status {} {}", r.status, r.body)),
                    Err(e) => failures.push(format!("error {e}")),
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
            failures
        }));
    }

    let algorithms = ["round_robin", "least_conn", "random", "hash"];
    let started = Instant::now();
    for i in 0..30usize {
        // A changing subset of backends, weights and algorithm; the timeout makes every
        // version differ so each save is one applied reload.
        let set: Vec<(&Backend, u32)> = bs
            .iter()
            .enumerate()
            .filter(|(k, _)| (i + k) % 3 != 0)
            .map(|(k, b)| (b, 1 + ((i + k) % 3) as u32))
            .collect();
        let text = cfg(
            algorithms[i % 4],
            &set,
            &format!("response_timeout = \"{}s\"", 30 + i),
        );
        let how = [Save::InPlace, Save::SymlinkSwap, Save::Rename][i % 3];
        lb.save_config(&text, how);
        assert!(
            lb.wait_for_log_count("config reloaded", i + 1, Duration::from_secs(5)),
            "reload {i} ({how:?}) not applied; log:\n{}",
            lb.logs()
        );
    }
    // The final version: round robin over a:1, c:2, d:1.
    let final_set = [(&bs[0], 1), (&bs[2], 2), (&bs[3], 1)];
    lb.save_config(&cfg("round_robin", &final_set, ""), Save::Rename);
    assert!(lb.wait_for_log_count("config reloaded", 31, Duration::from_secs(5)));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let failures = c.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during the storm: {failures:?}\n{}",
            lb.logs()
        );
    }
    assert!(
        sent.load(Ordering::SeqCst) > 300,
        "traffic flowed during {:?}",
        started.elapsed()
    );

    let before: Vec<usize> = bs.iter().map(|b| b.hits()).collect();
    let mut client = Client::connect(addr).await.unwrap();
    for _ in 0..40 {
        assert_eq!(client.get("/").await.unwrap().status, 200);
    }
    let split: Vec<usize> = bs.iter().zip(&before).map(|(b, n)| b.hits() - n).collect();
    assert_eq!(
        split,
        [10, 0, 20, 10],
        "final traffic split follows the final file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_keeps_serving_the_old_config_and_reports_the_line() {
    let [a, b] = start_backends(["a", "b"]).await;
    let good = cfg("round_robin", &[(&a, 1)], "");
    let lb = Ballast::start(&good);
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    assert_eq!(client.get("/").await.unwrap().body, "a");

    let bad = cfg(
        "round_robin",
        &[(&a, 1), (&b, 1)],
        "connect_timeout = \"soon\"",
    );
    let line_no = bad
        .lines()
        .position(|l| l.starts_with("connect_timeout"))
        .unwrap()
        + 1;
    let at = format!("ballast.toml:{line_no}:19: ");
    lb.save_config(&bad, Save::Rename);
    assert!(
        lb.wait_for_log("reload rejected", Duration::from_secs(5)),
        "{}",
        lb.logs()
    );
    let line = lb
        .lines()
        .into_iter()
        .find(|l| l.contains("reload rejected"))
        .unwrap();
    assert!(
        line.contains(&format!("{at}pools.app.connect_timeout: invalid duration")),
        "{line}"
    );
    for _ in 0..10 {
        let r = client.get("/").await.unwrap();
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "a"),
            "still the old config"
        );
    }
    let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
    assert_eq!(status["reload"]["last"]["result"], "rejected");
    let err = status["reload"]["last"]["error"].as_str().unwrap();
    assert!(err.contains(&at[12..]), "{err}");
    assert_eq!(status["generation"], 1);

    // Fixing the file applies it. (An in-place save is a truncate then a write: a reload
    // that reads between the two sees an empty file and rejects it; the write's own event
    // then applies the full file.)
    lb.save_config(&cfg("round_robin", &[(&a, 1), (&b, 1)], ""), Save::InPlace);
    assert!(lb.wait_for_log("config reloaded", Duration::from_secs(5)));
    let applied = support::eventually(Duration::from_secs(5), async || {
        let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
        status["reload"]["last"]["result"] == "applied"
    })
    .await;
    assert!(applied.is_some(), "{}", lb.logs());
    let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
    assert_eq!(
        status["generation"], 2,
        "an empty or partial read was applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_edit_serves_in_under_a_second() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(&cfg("round_robin", &[(&a, 1)], ""));
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    let saved = Instant::now();
    lb.save_config(&cfg("round_robin", &[(&b, 1)], ""), Save::Rename);
    let mut took = None;
    while saved.elapsed() < Duration::from_secs(5) {
        if client.get("/").await.unwrap().body == "b" {
            took = Some(saved.elapsed());
            break;
        }
    }
    let took = took.expect("the new config was never served");
    assert!(
        took < Duration::from_secs(1),
        "file write to new config serving took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_health_state_and_new_backends_wait_for_their_first_check() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    b.set_healthy(false);
    let lb = Ballast::start(&cfg("round_robin", &[(&a, 1), (&b, 1)], CHECKS));
    let admin = lb.admin();
    support::eventually(Duration::from_secs(5), async || {
        backend_state(admin, "app", b.addr).await == "unhealthy"
    })
    .await
    .expect("b unhealthy");

    c.set_healthy(false);
    lb.save_config(
        &cfg("round_robin", &[(&a, 1), (&b, 1), (&c, 1)], CHECKS),
        Save::Rename,
    );
    assert!(lb.wait_for_log("config reloaded", Duration::from_secs(5)));
    assert_eq!(backend_state(admin, "app", a.addr).await, "healthy");
    assert_eq!(
        backend_state(admin, "app", b.addr).await,
        "unhealthy",
        "health survives a reload"
    );
    assert!(lb.logs().contains("changes=+app/"), "{}", lb.logs());
    // c has not passed a check: no traffic.
    let mut client = Client::connect(lb.addr("web")).await.unwrap();
    for _ in 0..10 {
        assert_eq!(client.get("/").await.unwrap().body, "a");
    }
    c.set_healthy(true);
    support::eventually(Duration::from_secs(5), async || {
        backend_state(admin, "app", c.addr).await == "healthy"
    })
    .await
    .expect("c healthy after its first passing check");
    assert_eq!(b.hits(), 0);

    // Saving the same content again changes nothing.
    let (code, v) = admin_call(admin, "POST", "/reload", None).await;
    assert_eq!((code, v["result"].as_str()), (200, Some("unchanged")));
    let (_, status) = admin_call(admin, "GET", "/status", None).await;
    assert_eq!(status["generation"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_bound_and_closed_by_reload_and_a_failed_bind_changes_nothing() {
    let a = Backend::start("a").await;
    let base = cfg("round_robin", &[(&a, 1)], "");
    let lb = Ballast::start(&base);
    let with_api = format!("{base}\n[listeners.api]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n");
    lb.save_config(&with_api, Save::Rename);
    assert!(
        lb.wait_for_log("listener bound listener=api", Duration::from_secs(5)),
        "{}",
        lb.logs()
    );
    let line = lb
        .lines()
        .into_iter()
        .find(|l| l.contains("listener bound listener=api"))
        .unwrap();
    let api: std::net::SocketAddr = support::field(&line, "addr").unwrap().parse().unwrap();
    assert_eq!(support::get(api, "/").await.body, "a");
    assert!(support::listens_on(lb.pid(), api.port()));

    lb.save_config(&base, Save::Rename);
    assert!(lb.wait_for_log("listener removed", Duration::from_secs(5)));
    let pid = lb.pid();
    let refused = support::eventually(Duration::from_secs(5), async || {
        !support::listens_on(pid, api.port())
    })
    .await;
    assert!(
        refused.is_some(),
        "the removed listener's port still accepts"
    );

    // A port that is taken: the reload is rejected and the old config stays.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    lb.save_config(
        &format!("{base}\n[listeners.api]\nbind = \"{port}\"\npool = \"app\"\n"),
        Save::Rename,
    );
    assert!(lb.wait_for_log("reload rejected", Duration::from_secs(5)));
    let (_, status) = admin_call(lb.admin(), "GET", "/status", None).await;
    assert!(
        status["reload"]["last"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot bind"),
        "{status}"
    );
    assert_eq!(status["generation"], 3);
    assert_eq!(support::get(lb.addr("web"), "/").await.body, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_settings_change_live_without_closing_open_connections() {
    let a = Backend::start("a").await;
    let base = TestConfig::weighted(&[(&a, 1)]).admin();
    let lb = Ballast::start(&base.clone().listener("max_header_size = 65536").build());
    let addr = lb.addr("web");
    let mut open = Client::connect(addr).await.unwrap();
    let big = "x".repeat(20_000);
    let req = |c: &str| {
        http::Request::get("/")
            .header("host", "t")
            .header("x-big", c)
            .body(Default::default())
            .unwrap()
    };
    assert_eq!(open.request(req(&big)).await.unwrap().status, 200);

    lb.save_config(
        &base.listener("max_header_size = 8192").build(),
        Save::Rename,
    );
    assert!(
        lb.wait_for_log("changes=~listener web", Duration::from_secs(5)),
        "{}",
        lb.logs()
    );
    // A new connection gets the new limit...
    let mut fresh = Client::connect(addr).await.unwrap();
    assert_eq!(fresh.request(req(&big)).await.unwrap().status, 431);
    // ... the connection opened before the reload keeps working.
    assert_eq!(open.get("/").await.unwrap().status, 200);
    assert_eq!(support::get(addr, "/").await.status, 200);
}
