//! Process lifecycle: graceful shutdown, sd_notify, the systemd unit, admin token rules.

mod support;

use std::time::{Duration, Instant};

use support::{admin_call, get, Backend, Ballast, Client, TestConfig, WAIT};

fn cfg(backends: &[&Backend], admin: &str) -> String {
    TestConfig::new(backends)
        .head(admin)
        .head("[global]\nworker_threads = 1\nshutdown_timeout = \"10s\"")
        .build()
}

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let a = Backend::start("a").await;
    let mut lb = Ballast::start(&cfg(&[&a], ADMIN));
    let addr = lb.addr("web");
    let admin = lb.admin();
    assert_eq!(admin_call(admin, "GET", "/ready", None).await.0, 200);

    let mut slow = Vec::new();
    for _ in 0..3 {
        slow.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            let r = c.get("/slow/1500").await.unwrap();
            (
                r.status,
                r.headers
                    .get("connection")
                    .map(|v| v.to_str().unwrap().to_string()),
            )
        }));
    }
    support::eventually(Duration::from_secs(5), async || a.in_flight() == 3)
        .await
        .expect("slow requests in flight");
    let mut idle = Client::connect(addr).await.unwrap();
    assert_eq!(idle.get("/").await.unwrap().status, 200);

    assert!(support::listens_on(lb.pid(), addr.port()));
    lb.signal("TERM");
    assert!(lb.wait_for_log("shutting down", Duration::from_secs(5)));
    assert_eq!(
        admin_call(admin, "GET", "/ready", None).await.0,
        503,
        "not ready while draining"
    );
    let pid = lb.pid();
    let refused = support::eventually(Duration::from_secs(5), async || {
        !support::listens_on(pid, addr.port())
    })
    .await;
    assert!(
        refused.is_some(),
        "new connections are refused during shutdown"
    );
    assert!(
        idle.get("/").await.is_err(),
        "an idle keep-alive connection is closed"
    );

    for s in slow {
        let (status, connection) = s.await.unwrap();
        assert_eq!(status, 200, "in-flight requests complete");
        assert_eq!(
            connection.as_deref(),
            Some("close"),
            "keep-alive clients are told to close"
        );
    }
    assert_eq!(
        lb.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_accepted_before_sigterm_still_gets_its_first_request_served() {
    // The race of every shutdown and hand-over: the client's connection was accepted, its
    // request is on the way. It reached a listening socket, so it must be served.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let mut lb = Ballast::start(&cfg(&[&a], ADMIN));
    let mut s = tokio::net::TcpStream::connect(lb.addr("web"))
        .await
        .unwrap();
    let admin = lb.admin();
    support::eventually(WAIT, async || {
        admin_call(admin, "GET", "/status", None).await.1["open_connections"] == 1
    })
    .await
    .expect("ballast accepted the connection");
    lb.signal("TERM");
    assert!(
        lb.wait_for_log("listener stopped accepting", WAIT),
        "{}",
        lb.logs()
    );
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let a = Backend::start("a").await;
    let mut lb = Ballast::start(&cfg(&[&a], ""));
    let addr = lb.addr("web");
    let slow =
        tokio::spawn(async move { Client::connect(addr).await.unwrap().get("/slow/8000").await });
    support::eventually(Duration::from_secs(5), async || a.in_flight() == 1)
        .await
        .unwrap();
    lb.signal("TERM");
    assert!(lb.wait_for_log("shutting down", Duration::from_secs(5)));
    let start = Instant::now();
    lb.signal("INT");
    assert!(lb.wait_exit(Duration::from_secs(5)).is_some());
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(slow.await.unwrap().is_err(), "the cut request fails");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_sequence_ready_reloading_ready_stopping() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut lb = Ballast::start_with(
        &cfg(&[&a], ""),
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen: Vec<String> = Vec::new();
    let next = async || {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
            .await
            .expect("a notify message")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Skip watchdog pings, but check that they come.
    let wait_for = async |prefix: &str, seen: &mut Vec<String>| loop {
        let m = next().await;
        seen.push(m.clone());
        if m.starts_with(prefix) {
            return m;
        }
        assert!(
            m.starts_with("WATCHDOG=1"),
            "unexpected message {m:?} while waiting for {prefix}"
        );
    };
    let ready = wait_for("READY=1", &mut seen).await;
    assert!(ready.contains("STATUS="), "{ready}");
    lb.signal("HUP");
    let reloading = wait_for("RELOADING=1", &mut seen).await;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    wait_for("READY=1", &mut seen).await;
    wait_for("WATCHDOG=1", &mut seen).await;
    lb.signal("TERM");
    wait_for("STOPPING=1", &mut seen).await;
    assert_eq!(lb.wait_exit(Duration::from_secs(10)), Some(0));
    let order: Vec<&str> = seen
        .iter()
        .filter(|m| !m.starts_with("WATCHDOG"))
        .map(|m| m.lines().next().unwrap())
        .collect();
    assert_eq!(order, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_socket_nobody_reads_never_holds_a_reload_up() {
    // Its queue takes net.unix.max_dgram_qlen datagrams (10 by default); every reload sends
    // two. With a blocking send the eleventh message would stall the control plane.
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let _unread = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    let lb = Ballast::start_with(
        &cfg(&[&a], ADMIN),
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    for i in 0..100 {
        let call = admin_call(lb.admin(), "POST", "/reload", None);
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap_or_else(|_| panic!("reload {i} hung on the notify socket"));
        assert_eq!(status, 200);
    }
    assert_eq!(get(lb.addr("web"), "/").await.status, 200);
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    // The units name the installed paths; point them at this build so verify can check the
    // executable too.
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in ["ballast.service", "ballast.socket"] {
        let unit = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config/systemd")
                .join(name),
        )
        .unwrap();
        if name.ends_with(".service") {
            assert!(
                unit.contains("Type=notify") && unit.contains("ExecReload=/bin/kill -HUP $MAINPID")
            );
        }
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            unit.replace("/usr/local/bin/ballast", support::ballast_bin()),
        )
        .unwrap();
        paths.push(path);
    }
    let out = match std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: systemd-analyze verify ({e}; Debian package systemd, which .ci/run installs)");
            return;
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_on_a_non_loopback_bind_requires_the_token() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&cfg(
        &[&a],
        "[admin]\nbind = \"0.0.0.0:0\"\ntoken = \"s3cret\"\n",
    ));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], lb.admin().port()));
    assert_eq!(admin_call(admin, "GET", "/status", None).await.0, 401);
    assert_eq!(
        admin_call(admin, "GET", "/status", Some("wrong")).await.0,
        401
    );
    assert_eq!(admin_call(admin, "POST", "/reload", None).await.0, 401);
    let (code, status) = admin_call(admin, "GET", "/status", Some("s3cret")).await;
    assert_eq!(code, 200);
    let b = &status["pools"]["app"]["backends"][0];
    assert_eq!(b["address"], a.addr.to_string());
    assert_eq!(b["state"], "healthy");
    assert_eq!(b["in_flight"], 0);
    assert_eq!(status["pools"]["app"]["algorithm"], "round_robin");
    assert_eq!(status["generation"], 1);
    assert_eq!(status["ready"], true);
    assert!(status["reload"]["last"].is_null());
    assert_eq!(
        admin_call(admin, "GET", "/nope", Some("s3cret")).await.0,
        404
    );
    assert_eq!(
        admin_call(admin, "DELETE", "/status", Some("s3cret"))
            .await
            .0,
        405
    );
    assert_eq!(get(lb.addr("web"), "/").await.status, 200);
}

#[test]
fn admin_on_a_non_loopback_bind_without_a_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.toml");
    std::fs::write(
        &path,
        cfg(&[], "[admin]\nbind = \"0.0.0.0:0\"\n")
            .replace("backends = []", "backends = [\"127.0.0.1:9\"]"),
    )
    .unwrap();
    let out = std::process::Command::new(support::ballast_bin())
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("admin.token (or admin.token_file) is required"));
}

/// Every path README and the shipped configs tell ballast to write (the access log, the
/// hand-over socket) lies in a directory the unit makes writable: with
/// `ProtectSystem=strict` anything else fails at startup.
#[test]
fn the_unit_lets_ballast_write_every_path_the_docs_write() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("config/systemd/ballast.service")).unwrap();
    assert!(unit.contains("ProtectSystem=strict"));
    let mut writable: Vec<String> = Vec::new();
    for line in unit.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let base = match key {
            "LogsDirectory" => "/var/log/",
            "RuntimeDirectory" => "/run/",
            "StateDirectory" => "/var/lib/",
            "CacheDirectory" => "/var/cache/",
            "ReadWritePaths" => "",
            _ => continue,
        };
        writable.extend(value.split_whitespace().map(|d| format!("{base}{d}/")));
    }
    let mut written = Vec::new();
    for doc in ["README.md", "config/ballast.toml", "config/starter.toml"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        // `path` is the access log's only in [access_log]; health checks have one too.
        let mut table = "";
        for line in text.lines() {
            let line = line.trim_start_matches(['#', ' ']);
            if line.starts_with('[') {
                table = line;
            }
            for key in ["path = \"/", "handover_socket = \"/", "storage = \"/"] {
                if key.starts_with("path") && !table.starts_with("[access_log]") {
                    continue;
                }
                if let Some(rest) = line.strip_prefix(key) {
                    let path = format!("/{}", rest.split('"').next().unwrap_or_default());
                    written.push((doc, path));
                }
            }
        }
    }
    assert!(
        written
            .iter()
            .any(|(_, p)| p == "/var/log/ballast/access.log"),
        "{written:?}"
    );
    assert!(
        written.iter().any(|(_, p)| p == "/var/lib/ballast/acme"),
        "{written:?}"
    );
    for (doc, path) in &written {
        assert!(
            writable.iter().any(|dir| path.starts_with(dir.as_str())),
            "{doc} writes {path}, which the unit leaves read-only (writable: {writable:?})"
        );
    }
}
