//! DNS discovery: backends written as HOST:PORT follow a real DNS server's answers, which
//! the test changes while traffic flows. Backends sit on distinct loopback addresses
//! (127.0.N.x) on one port, as replicas behind one service name do.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::dns::{Answer, DnsServer};
use support::*;

fn config(dns: &DnsServer, names: &str, extra: &str) -> String {
    format!(
        r#"
[admin]
bind = "127.0.0.1:0"

[listeners.web]
bind = "127.0.0.1:0"
pool = "app"

[pools.app]
backends = [{names}]
resolve_interval = "1s"
resolvers = ["{}"]
{extra}
"#,
        dns.addr
    )
}

/// Addresses of `pool` in `/status`, with their states.
async fn states(admin: SocketAddr, pool: &str) -> Vec<(String, String)> {
    let (_, v) = admin_call(admin, "GET", "/status", None).await;
    let mut out: Vec<(String, String)> = v["pools"][pool]["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| {
                    (
                        b["address"].as_str().unwrap_or("").to_string(),
                        b["state"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Clients sending requests until `stop`, each bounded to 20,000; returns what failed.
fn load(
    addr: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for n in 0..20_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // New connections now and then, so both pooled and fresh paths run.
                    let mut client = match Client::connect(addr).await {
                        Ok(c) => c,
                        Err(e) => {
                            failures.push(format!("connect: {e}"));
                            continue;
                        }
                    };
                    for _ in 0..10 {
                        let path = if n % 3 == 0 { "/slow/30" } else { "/" };
                        match client.get(path).await {
                            Ok(r) if r.status == 200 => {}
                            Ok(r) => failures.push(format!("status {} {}", r.status, r.body)),
                            Err(e) => failures.push(format!("error {e}")),
                        }
                    }
                }
                failures
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_add_remove_and_drain_backends_with_no_failed_request() {
    let dns = DnsServer::start().await;
    let bs = Backend::start_same_port(
        &["r1", "r2", "r3"],
        &["127.0.7.1", "127.0.7.2", "127.0.7.3"],
    )
    .await;
    let fixed = Backend::start("fixed").await;
    let port = bs[0].addr.port();
    dns.set_addrs("app.test", &[bs[0].addr, bs[1].addr]);
    // A name and a fixed address in one pool; health checks on all of them.
    let text = config(
        &dns,
        &format!("\"app.test:{port}\", \"{}\"", fixed.addr),
        "drain_timeout = \"10s\"\n[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\nrise = 1\n",
    );
    let lb = Ballast::start(&text);
    let (web, admin) = (lb.addr("web"), lb.admin());
    // Resolved before READY: the first requests already find the replicas.
    let at_start = states(admin, "app").await;
    assert_eq!(
        at_start,
        vec![
            (fixed.addr.to_string(), "healthy".into()),
            (bs[0].addr.to_string(), "healthy".into()),
            (bs[1].addr.to_string(), "healthy".into()),
        ],
        "{}",
        lb.logs()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(web, 3, stop.clone());
    assert!(
        eventually(WAIT, async || bs[0].hits() > 20 && bs[1].hits() > 20)
            .await
            .is_some(),
        "traffic reaches both replicas"
    );

    // r3 appears but fails its checks: it is a backend, pending, and gets no traffic.
    bs[2].set_healthy(false);
    dns.set_addrs("app.test", &[bs[0].addr, bs[1].addr, bs[2].addr]);
    let added = format!("+app/{}", bs[2].addr);
    assert!(lb.wait_for_log(&added, WAIT), "{}", lb.logs());
    // Three failed probes (every 100 ms) with traffic flowing all along.
    let probe_failed = format!("health probe failed pool=app backend={}", bs[2].addr);
    assert!(
        lb.wait_for_log_count(&probe_failed, 3, WAIT),
        "{}",
        lb.logs()
    );
    assert_eq!(
        bs[2].hits(),
        0,
        "a new address waits for its first passing check"
    );
    bs[2].set_healthy(true);
    assert!(
        eventually(WAIT, async || bs[2].hits() > 20).await.is_some(),
        "after its first passing check r3 takes traffic; {}",
        lb.logs()
    );

    // r1 leaves the answer while requests are in flight on it: it drains, nothing fails.
    dns.set_addrs("app.test", &[bs[1].addr, bs[2].addr]);
    let removed = format!("-app/{}", bs[0].addr);
    assert!(lb.wait_for_log(&removed, WAIT), "{}", lb.logs());
    let line = lb
        .lines()
        .into_iter()
        .find(|l| l.contains(&removed))
        .unwrap_or_default();
    assert!(line.contains("DNS changed the backends"), "{line}");
    assert!(lb.wait_for_log("backend drained", WAIT), "{}", lb.logs());
    let r1_after_drain = bs[0].hits();
    // Another 100 requests served by the others while r1 is out.
    let others = bs[1].hits() + bs[2].hits();
    assert!(
        eventually(WAIT, async || bs[1].hits() + bs[2].hits() > others + 100)
            .await
            .is_some()
    );
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    assert!(
        failures.is_empty(),
        "failed requests: {failures:?}\n{}",
        lb.logs()
    );
    assert_eq!(
        bs[0].hits(),
        r1_after_drain,
        "a removed address gets no new request"
    );
    assert_eq!(bs[0].in_flight(), 0);
    assert!(fixed.hits() > 0, "the fixed backend kept its share");
    assert_eq!(states(admin, "app").await.len(), 3, "fixed, r2, r3 remain");
    // Its Prometheus series went with it; the others' stay.
    let page = support::get(admin, "/metrics").await.body;
    assert!(
        !page.contains(&format!("backend=\"{}\"", bs[0].addr)),
        "{page}"
    );
    assert!(
        page.contains(&format!("backend=\"{}\"", bs[1].addr)),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_trouble_keeps_the_last_good_backends_until_the_grace_period_ends() {
    let dns = DnsServer::start().await;
    let bs = Backend::start_same_port(&["r1", "r2"], &["127.0.7.11", "127.0.7.12"]).await;
    let port = bs[0].addr.port();
    dns.set_addrs("svc.test", &[bs[0].addr, bs[1].addr]);
    let lb = Ballast::start(&config(
        &dns,
        &format!("\"svc.test:{port}\""),
        "resolve_grace = \"3s\"",
    ));
    let web = lb.addr("web");
    assert_eq!(get(web, "/").await.status, 200);

    // SERVFAIL for many intervals: one warning, the pool is untouched.
    dns.set("svc.test", Answer::ServFail);
    let asked = dns.queries();
    assert!(
        eventually(WAIT, async || dns.queries() >= asked + 12)
            .await
            .is_some(),
        "ballast keeps asking"
    );
    assert_eq!(
        lb.logs().matches("DNS resolution failing").count(),
        1,
        "one warning per outage:\n{}",
        lb.logs()
    );
    for _ in 0..10 {
        assert_eq!(get(web, "/").await.status, 200);
    }
    assert!(!lb.logs().contains("-app/"), "{}", lb.logs());

    // Back with the same answer: logged, nothing applied.
    dns.set_addrs("svc.test", &[bs[0].addr, bs[1].addr]);
    assert!(lb.wait_for_log("DNS resolution works again", WAIT));

    // NXDOMAIN: kept for the grace period, then followed.
    dns.set("svc.test", Answer::NxDomain);
    assert!(
        lb.wait_for_log("DNS answered no addresses", WAIT),
        "{}",
        lb.logs()
    );
    let warned = std::time::Instant::now();
    assert_eq!(get(web, "/").await.status, 200, "inside the grace period");
    assert!(
        lb.wait_for_log(&format!("-app/{}", bs[0].addr), WAIT),
        "{}",
        lb.logs()
    );
    assert!(
        warned.elapsed() >= Duration::from_millis(1500),
        "the pool emptied only after the grace period ({:?})",
        warned.elapsed()
    );
    let r = get(web, "/").await;
    assert_eq!(r.status, 503, "an empty pool answers 503");

    // The name comes back: followed at once.
    dns.set_addrs("svc.test", &[bs[1].addr]);
    assert!(
        lb.wait_for_log(&format!("+app/{}", bs[1].addr), WAIT),
        "{}",
        lb.logs()
    );
    assert!(eventually(WAIT, async || get(web, "/").await.status == 200)
        .await
        .is_some());
    assert_eq!(get(web, "/").await.backend(), "r2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_name_at_startup_leaves_the_pool_waiting() {
    let dns = DnsServer::start().await;
    let bs = Backend::start_same_port(&["late"], &["127.0.7.21"]).await;
    let port = bs[0].addr.port();
    let lb = Ballast::start(&config(&dns, &format!("\"late.test:{port}\""), ""));
    let web = lb.addr("web");
    assert!(
        lb.logs().contains("name does not resolve (yet)"),
        "{}",
        lb.logs()
    );
    assert_eq!(get(web, "/").await.status, 503);
    dns.set_addrs("late.test", &[bs[0].addr]);
    assert!(
        eventually(WAIT, async || get(web, "/").await.status == 200)
            .await
            .is_some(),
        "{}",
        lb.logs()
    );
    assert_eq!(get(web, "/").await.backend(), "late");
}

#[test]
fn check_reports_a_bad_host_name_but_needs_no_dns() {
    // Nothing answers for this name: --check does not ask.
    let (ok, err) = check_config(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n[pools.app]\nbackends = [\"nowhere.invalid:8000\"]\nresolvers = [\"127.0.0.1:1\"]\n",
    );
    assert!(ok, "{err}");
    let (ok, err) = check_config(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n[pools.app]\nbackends = [\"app_1:8000\", \"bad name:80\", \"app\", \"-x.y:80\"]\nresolve_interval = \"200ms\"\n",
    );
    assert!(!ok);
    assert!(err.contains(":5:"), "errors carry the line: {err}");
    assert!(
        err.contains("\"bad name\" is neither an IP address nor a valid host name"),
        "{err}"
    );
    assert!(
        err.contains("invalid backend address \"app\": no port"),
        "{err}"
    );
    assert!(err.contains("\"-x.y\" is neither"), "{err}");
    assert!(
        err.contains("resolve_interval: must be at least 1s"),
        "{err}"
    );
    assert!(
        !err.contains("app_1"),
        "underscores (compose project names) are fine: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_a_discovered_backend_verifies_the_name_it_was_found_by() {
    // nginx's proxy_ssl_name default: the certificate is checked against the DNS name in
    // the config, not the resolved IP address, and that name is sent as SNI.
    let dns = DnsServer::start().await;
    let pki = support::tls::Pki::new("discovery");
    let leaf = pki.issue("api", &["api.test"]);
    let backend = support::tls::backend(&leaf, "127.0.7.31:0").await;
    dns.set_addrs("api.test", &[backend]);
    // The pool names the backend by DNS name and trusts the test CA; no `sni` is set.
    let start = |name: &str, at: SocketAddr| {
        Ballast::start(&config(
            &dns,
            &format!("\"{name}:{}\"", at.port()),
            &format!(
                "retries = 0\n[pools.app.tls]\nca = \"{}\"\n",
                pki.ca_path.display()
            ),
        ))
    };
    let lb = start("api.test", backend);
    let r = get(lb.addr("web"), "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "tls-backend sni=api.test"),
        "{}",
        lb.logs()
    );
    // A certificate for another name is refused as before.
    let other = pki.issue("other", &["other.test"]);
    let wrong = support::tls::backend(&other, "127.0.7.32:0").await;
    dns.set_addrs("wrong.test", &[wrong]);
    let lb = start("wrong.test", wrong);
    assert_eq!(get(lb.addr("web"), "/").await.status, 502);
    assert!(lb.wait_for_log("reason=tls_failed", WAIT), "{}", lb.logs());
}

/// Which backend answered a GET carrying `cookie`, and the session cookie it set, if any.
async fn session_get(web: SocketAddr, cookie: Option<&str>) -> (String, Option<String>) {
    let fields = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
    let sent = format!("GET / HTTP/1.1\r\nHost: x\r\n{fields}Connection: close\r\n\r\n");
    let r = raw_request(web, sent.as_bytes()).await.expect("answer");
    assert_eq!(r.status, 200, "{}", r.head);
    let field = |name: &str| {
        r.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let set = field("set-cookie").and_then(|s| s.split(';').next().map(String::from));
    (field("x-backend").unwrap_or_default(), set)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_stay_put_when_a_service_scales_from_5_to_7_and_move_when_theirs_leaves() {
    let dns = DnsServer::start().await;
    let names = ["r1", "r2", "r3", "r4", "r5", "r6", "r7"];
    let ips = names.map(|n| format!("127.0.8.{}", &n[1..]));
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let bs = Backend::start_same_port(&names, &ips).await;
    let port = bs[0].addr.port();
    let addrs: Vec<SocketAddr> = bs.iter().map(|b| b.addr).collect();
    dns.set_addrs("app.test", &addrs[..5]);
    let lb = Ballast::start(&config(
        &dns,
        &format!("\"app.test:{port}\""),
        "sticky = { cookie = \"lb\" }\n",
    ));
    let (web, admin) = (lb.addr("web"), lb.admin());
    assert_eq!(states(admin, "app").await.len(), 5);

    // Forty sessions over the five replicas.
    let mut sessions = Vec::new();
    for _ in 0..40 {
        let (home, cookie) = session_get(web, None).await;
        sessions.push((home, cookie.expect("a new session gets its cookie")));
    }
    let spread: std::collections::BTreeSet<_> = sessions.iter().map(|s| s.0.clone()).collect();
    assert_eq!(spread.len(), 5, "{spread:?}");

    // `--scale app=7`: two more records.
    dns.set_addrs("app.test", &addrs);
    assert!(
        eventually(WAIT, async || states(admin, "app").await.len() == 7)
            .await
            .is_some(),
        "{}",
        lb.logs()
    );
    for (home, cookie) in &sessions {
        assert_eq!(
            session_get(web, Some(cookie)).await,
            (home.clone(), None),
            "{cookie}"
        );
    }
    // New sessions do reach the new replicas.
    let mut fresh = std::collections::BTreeSet::new();
    for _ in 0..14 {
        fresh.insert(session_get(web, None).await.0);
    }
    assert!(fresh.contains("r6") && fresh.contains("r7"), "{fresh:?}");

    // r1 leaves the answer: its sessions move, with a new cookie; the others stay.
    dns.set_addrs("app.test", &addrs[1..]);
    assert!(
        eventually(WAIT, async || !states(admin, "app")
            .await
            .iter()
            .any(|(a, s)| *a == addrs[0].to_string() && s != "draining"))
        .await
        .is_some(),
        "{}",
        lb.logs()
    );
    for (home, cookie) in &sessions {
        let (now, set) = session_get(web, Some(cookie)).await;
        if home == "r1" {
            assert_ne!(now, "r1", "{cookie}");
            assert!(set.is_some(), "the moved session's cookie is rewritten");
        } else {
            assert_eq!((now, set), (home.clone(), None), "{cookie}");
        }
    }
}
