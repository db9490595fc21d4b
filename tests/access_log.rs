//! The access log from the real daemon: JSON and combined format, fields that match what
//! happened, a listener that opts out, TCP connections, a client that leaves (499, no blame
//! on the backend) and reopening on SIGUSR1 as logrotate does.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::Full;
use support::{admin_call, eventually, get, get_with, start_backends, Ballast, Client, TestConfig};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until `path` holds at least `n` lines (the writer flushes when its queue empties).
async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let done = eventually(Duration::from_secs(5), async || lines(path).len() >= n).await;
    let got = lines(path);
    assert!(
        done.is_some(),
        "{} of {n} lines in {}: {got:?}",
        got.len(),
        path.display()
    );
    got
}

fn log_path(lb: &Ballast) -> PathBuf {
    lb.dir.path().join("access.log")
}

/// `[access_log]` writing to `access.log` in the config's folder (paths are relative to it).
fn access_log(format: &str) -> String {
    format!("[access_log]\npath = \"access.log\"\nformat = \"{format}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_hold_what_happened_and_a_listener_can_opt_out() {
    let [b] = start_backends(["a"]).await;
    let config = TestConfig::new(&[&b])
        .admin()
        .head(&access_log("json"))
        .head("[listeners.quiet]\nbind = \"127.0.0.1:0\"\npool = \"app\"\naccess_log = false\n")
        .build();
    let lb = Ballast::start(&config);
    let (web, path) = (lb.addr("web"), log_path(&lb));

    let r = get_with(
        web,
        "/hello?x=1",
        &[("user-agent", "tester/1.0"), ("host", "shop.example")],
    )
    .await;
    assert_eq!(r.status, 200);
    let mut c = Client::connect(web).await.unwrap();
    let body = "0123456789".repeat(10);
    let req = http::Request::post("/upload")
        .header("host", "shop.example")
        .body(Full::from(body.clone()))
        .unwrap();
    let upload = c.request(req).await.unwrap();
    assert_eq!(upload.status, 200);
    assert_eq!(get(lb.addr("quiet"), "/not-logged").await.status, 200);
    // Nothing healthy: ballast answers itself.
    admin_call(
        lb.admin(),
        "POST",
        &format!("/pools/app/backends/{}/drain", b.addr),
        None,
    )
    .await;
    assert_eq!(get(web, "/unavailable").await.status, 503);

    let got = wait_lines(&path, 3).await;
    assert_eq!(got.len(), 3, "the quiet listener logs nothing: {got:?}");
    let v: Vec<serde_json::Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &v[0];
    assert_eq!(first["listener"], "web");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "shop.example");
    assert_eq!(first["path"], "/hello?x=1");
    assert_eq!(first["protocol"], "HTTP/1.1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["pool"], "app");
    assert_eq!(first["backend"], b.addr.to_string());
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["termination"], "ok");
    assert_eq!(first["user_agent"], "tester/1.0");
    assert_eq!(first["bytes_out"], r.body.len() as u64);
    assert!(first["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        first["connect_ms"].as_f64().unwrap() >= 0.0,
        "a new backend connection: {first}"
    );
    assert!(first["header_ms"].as_f64().unwrap() <= first["total_ms"].as_f64().unwrap());
    let t = first["time"].as_str().unwrap();
    assert!(
        t.ends_with('Z') && t.len() == "2026-11-30T13:06:16.475Z".len(),
        "{t}"
    );

    let second = &v[1];
    assert_eq!(second["method"], "POST");
    assert_eq!(second["bytes_in"], body.len() as u64);
    assert_eq!(second["bytes_out"], upload.body.len() as u64);
    assert_eq!(
        second["connect_ms"],
        serde_json::Value::Null,
        "reused connection: {second}"
    );

    let third = &v[2];
    assert_eq!(third["status"], 503);
    assert_eq!(third["termination"], "no_healthy_backend");
    assert_eq!(third["backend"], serde_json::Value::Null);
    assert_eq!(third["attempts"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_format_is_what_log_tools_parse() {
    let [b] = start_backends(["a"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&b]).head(&access_log("combined")).build());
    let r = get_with(
        lb.addr("web"),
        "/page?q=1",
        &[
            ("user-agent", "Mozilla/5.0 \"quoted\""),
            ("referer", "http://ref.example/"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let got = wait_lines(&log_path(&lb), 1).await;
    let line = &got[0];
    // 127.0.0.1 - - [30/Nov/2026:13:06:16 +0000] "GET /page?q=1 HTTP/1.1" 200 23 "ref" "ua"
    let (head, rest) = line.split_once(" [").unwrap();
    assert_eq!(head, "127.0.0.1 - -");
    let (stamp, rest) = rest.split_once("] ").unwrap();
    assert_eq!(stamp.len(), "30/Nov/2026:13:06:16 +0000".len(), "{stamp}");
    assert!(stamp.ends_with(" +0000"));
    assert_eq!(
        rest,
        format!(
            "\"GET /page?q=1 HTTP/1.1\" 200 {} \"http://ref.example/\" \"Mozilla/5.0 \\x22quoted\\x22\"",
            r.body.len()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_a_trusted_proxy_names_is_logged_with_the_proxy_as_peer() {
    let [b] = start_backends(["a"]).await;
    for format in ["json", "combined"] {
        let lb = Ballast::start(
            &TestConfig::new(&[&b])
                .head(&access_log(format))
                .listener("trusted_proxies = [\"127.0.0.1\"]")
                .build(),
        );
        let web = lb.addr("web");
        let r = get_with(web, "/", &[("x-forwarded-for", "1.1.1.1, 203.0.113.7")]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            get(web, "/").await.status,
            200,
            "a request the proxy sent itself"
        );
        let got = wait_lines(&log_path(&lb), 2).await;
        if format == "combined" {
            assert!(got[0].starts_with("203.0.113.7 - - ["), "{got:?}");
            assert!(got[1].starts_with("127.0.0.1 - - ["), "{got:?}");
            continue;
        }
        let first: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(first["client"], "203.0.113.7", "{first}");
        let peer = first["peer"].as_str().unwrap_or_default();
        assert!(peer.starts_with("127.0.0.1:"), "{first}");
        let second: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
        assert!(second["client"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:"));
        assert!(
            second.get("peer").is_none(),
            "no peer when the client is the peer: {second}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_and_no_line_is_lost() {
    let [b] = start_backends(["a"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&b]).head(&access_log("json")).build());
    let (web, path) = (lb.addr("web"), log_path(&lb));
    for i in 0..5 {
        assert_eq!(get(web, &format!("/before/{i}")).await.status, 200);
    }
    wait_lines(&path, 5).await;
    // logrotate: rename, then postrotate sends SIGUSR1.
    let rotated = lb.dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    lb.signal("USR1");
    // Requests go on meanwhile; lines land in the old file until the reopen, then in the new.
    let mut sent = 5;
    let reopened = eventually(Duration::from_secs(5), async || {
        assert_eq!(get(web, &format!("/after/{sent}")).await.status, 200);
        sent += 1;
        !lines(&path).is_empty()
    })
    .await;
    assert!(reopened.is_some(), "no new file after SIGUSR1");
    assert!(lb.wait_for_log("access log reopened", Duration::from_secs(5)));
    let all = eventually(Duration::from_secs(5), async || {
        lines(&rotated).len() + lines(&path).len() == sent
    })
    .await;
    let (old, new) = (lines(&rotated), lines(&path));
    assert!(
        all.is_some(),
        "{} + {} lines for {sent} requests",
        old.len(),
        new.len()
    );
    assert!(old.len() >= 5);
    assert!(new.iter().all(|l| l.contains("/after/")), "{new:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_is_logged_as_499_and_not_held_against_the_backend() {
    let [b] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&b])
            .admin()
            .head(&access_log("json"))
            .pool("passive = { max_fails = 1, fail_timeout = \"30s\" }")
            .build(),
    );
    let (web, path) = (lb.addr("web"), log_path(&lb));
    // The client gives up on a slow response after 200 ms.
    let mut c = Client::connect(web).await.unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(200), c.get("/slow/1500")).await;
    assert!(gave_up.is_err());
    drop(c);
    let got = wait_lines(&path, 1).await;
    let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(v["status"], 499, "{v}");
    assert_eq!(v["termination"], "client_closed");
    assert_eq!(v["backend"], b.addr.to_string());
    // The backend is as healthy as before: the next request goes to it.
    assert_eq!(
        support::backend_state(lb.admin(), "app", b.addr).await,
        "healthy"
    );
    assert_eq!(get(web, "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_is_one_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let [b] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&b])
            .head(&access_log("json"))
            .listener("mode = \"tcp\"")
            .build(),
    );
    let mut s = tokio::net::TcpStream::connect(lb.addr("web"))
        .await
        .unwrap();
    let request = b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";
    s.write_all(request).await.unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.unwrap();
    drop(s);
    let got = wait_lines(&log_path(&lb), 1).await;
    let v: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(v["method"], serde_json::Value::Null);
    assert_eq!(v["status"], serde_json::Value::Null);
    assert_eq!(v["bytes_in"], request.len() as u64);
    assert_eq!(v["bytes_out"], reply.len() as u64);
    assert_eq!(v["backend"], b.addr.to_string());
    assert_eq!(v["termination"], "ok");
}

#[test]
fn a_bad_access_log_section_is_refused_with_its_line() {
    let (ok, err) = support::check_config(
        &TestConfig::addresses(["127.0.0.1:9"])
            .head("[access_log]\nformat = \"xml\"\n")
            .build(),
    );
    assert!(!ok);
    assert!(
        err.contains(":2:10: access_log.format: expected \"json\" or \"combined\", got \"xml\""),
        "{err}"
    );
}

/// A sink that stops taking lines (a pipe nobody reads): requests go on at full speed,
/// lines beyond the queue are dropped and counted, and logging resumes once the sink reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_drops_lines_and_counts_them_instead_of_stalling_requests() {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let [b] = start_backends(["a"]).await;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("log.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // The reader opens the pipe (which waits for ballast to open it for writing), then reads
    // nothing until told to.
    let (read, bytes) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let reader = {
        let (fifo, read, bytes) = (fifo.clone(), read.clone(), bytes.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::File::open(&fifo).unwrap();
            while !read.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut buf = [0u8; 65536];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                bytes.fetch_add(n, Ordering::SeqCst);
            }
        })
    };
    let lb = Ballast::start(
        &TestConfig::new(&[&b])
            .admin()
            .head(&format!(
                "[access_log]\npath = \"{}\"\nbuffer = 8\n",
                fifo.display()
            ))
            .build(),
    );
    let web = lb.addr("web");
    // ~300 bytes a line: 1,000 lines overflow the pipe (64 KiB) and the queue (8) many times.
    let mut c = Client::connect(web).await.unwrap();
    for i in 0..1000 {
        let r = tokio::time::timeout(Duration::from_secs(5), c.get(&format!("/{i}")))
            .await
            .expect("a request stalled behind the access log")
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let dropped = |page: &str| -> f64 {
        page.lines()
            .find_map(|l| l.strip_prefix("ballast_access_log_dropped_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let page = support::get(lb.admin(), "/metrics").await.body;
    assert!(dropped(&page) > 0.0, "{page}");
    // The sink reads again: new lines arrive.
    read.store(true, Ordering::SeqCst);
    let flowing = eventually(Duration::from_secs(5), async || {
        let before = bytes.load(Ordering::SeqCst);
        assert_eq!(get(web, "/again").await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        bytes.load(Ordering::SeqCst) > before && before > 0
    })
    .await;
    assert!(flowing.is_some(), "logging did not resume");
    drop(lb);
    reader.join().unwrap();
}
