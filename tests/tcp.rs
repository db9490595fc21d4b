//! TCP (L4) mode: bytes both ways with no parsing, half-close, retry of failed connects,
//! sticky hashing on the client address, draining and shutdown of long connections, the
//! idle timeout, and real PostgreSQL (pgbench) and Redis servers behind ballast.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::AbortHandle;

use support::{Ballast, TestConfig, WAIT};

/// A TCP backend: greets with `NAME\n`, then echoes; on EOF from the client it writes
/// `bye N\n` (N bytes echoed) and closes, so a half-close can be observed end to end.
struct Echo {
    name: String,
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    tasks: Arc<std::sync::Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Echo {
    async fn start(name: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<std::sync::Mutex<Vec<AbortHandle>>> = Arc::default();
        let (o, a, t, n) = (
            open.clone(),
            accepted.clone(),
            tasks.clone(),
            name.to_string(),
        );
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                o.fetch_add(1, Ordering::SeqCst);
                let (o, n) = (o.clone(), n.clone());
                let task = tokio::spawn(async move {
                    let _ = s.write_all(format!("{n}\n").as_bytes()).await;
                    let mut buf = [0u8; 16 * 1024];
                    let mut total = 0usize;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => {
                                let _ = s.write_all(format!("bye {total}\n").as_bytes()).await;
                                break;
                            }
                            Ok(k) => {
                                total += k;
                                if s.write_all(&buf[..k]).await.is_err() {
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    o.fetch_sub(1, Ordering::SeqCst);
                });
                t.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Echo {
            name: name.to_string(),
            addr,
            open,
            accepted,
            tasks,
            accept,
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Stops listening and drops every connection (the port then refuses).
    fn kill(&self) {
        self.accept.abort();
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tcp_config(backends: &[&Echo], listener: &str, pool: &str) -> String {
    TestConfig::addresses(backends.iter().map(|b| b.addr))
        .admin()
        .listener(&format!("mode = \"tcp\"\n{listener}"))
        .pool(pool)
        .build()
}

/// Connects (optionally from `source`) and reads the greeting: which backend answered.
async fn open(addr: SocketAddr, source: Option<[u8; 4]>) -> (TcpStream, String) {
    let sock = TcpSocket::new_v4().unwrap();
    if let Some(ip) = source {
        sock.bind(SocketAddr::from((ip, 0))).unwrap();
    }
    let mut s = tokio::time::timeout(WAIT, sock.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let name = read_line(&mut s).await;
    (s, name)
}

async fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("line in time")
            .unwrap_or(0);
        if n == 0 || b[0] == b'\n' {
            return String::from_utf8_lossy(&line).into_owned();
        }
        line.push(b[0]);
    }
}

async fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_both_ways_and_connections_rotate() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Ballast::start(&tcp_config(&[&a, &b], "", ""));
    let mut names = Vec::new();
    for _ in 0..4 {
        let (mut s, name) = open(lb.addr("web"), None).await;
        // Binary, including what would be HTTP framing: nothing is parsed.
        echo_roundtrip(&mut s, b"GET / HTTP/1.1\r\n\r\n\x00\xff").await;
        echo_roundtrip(&mut s, &vec![7u8; 300_000]).await;
        names.push(name);
    }
    assert_eq!(names, ["a", "b", "a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_close_is_passed_on_and_the_reply_still_arrives() {
    let a = Echo::start("a").await;
    let lb = Ballast::start(&tcp_config(&[&a], "", ""));
    let (mut s, _) = open(lb.addr("web"), None).await;
    s.write_all(b"12345").await.unwrap();
    // The client is done sending; it still wants the reply.
    s.shutdown().await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut rest))
        .await
        .expect("reply in time")
        .expect("read");
    assert_eq!(
        rest, "12345bye 5\n",
        "the backend saw the EOF and its reply came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_side_half_close_reaches_the_client_too() {
    // A backend that sends a reply, shuts its write side, then still reads.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let got2 = got.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        s.shutdown().await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        *got2.lock().unwrap() = buf;
    });
    let lb = Ballast::start(
        &TestConfig::addresses([addr])
            .listener("mode = \"tcp\"")
            .build(),
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let mut banner = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(banner, b"banner");
    // The client can still send after the backend finished sending.
    s.write_all(b"late data").await.unwrap();
    s.shutdown().await.unwrap();
    let ok = support::eventually(WAIT, async || *got.lock().unwrap() == b"late data").await;
    assert!(ok.is_some(), "backend got {:?}", got.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_under_load_costs_no_connection() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Ballast::start(&tcp_config(&[&a, &b], "", "retries = 2"));
    let addr = lb.addr("web");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            for _ in 0..2000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let done = async {
                    let mut s = TcpStream::connect(addr).await.ok()?;
                    let name = read_line(&mut s).await;
                    s.write_all(b"x").await.ok()?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).await.ok()?;
                    (!name.is_empty()).then_some(())
                };
                match tokio::time::timeout(WAIT, done).await {
                    Ok(Some(())) => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }
    support::eventually(WAIT, async || ok.load(Ordering::SeqCst) > 200)
        .await
        .expect("load running");
    a.kill();
    let after_kill = ok.load(Ordering::SeqCst);
    support::eventually(WAIT, async || ok.load(Ordering::SeqCst) > after_kill + 500)
        .await
        .expect("load continued");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    // Connections cut by the kill itself may fail (the backend dropped them mid-exchange);
    // new ones never do: the failed connect is retried on b.
    let failed = failed.load(Ordering::SeqCst);
    assert!(failed <= 4, "{failed} connections failed after the kill");
    let later = b.accepted.load(Ordering::SeqCst);
    for _ in 0..10 {
        let (_s, name) = open(addr, None).await;
        assert_eq!(name, "b");
    }
    assert_eq!(b.accepted.load(Ordering::SeqCst), later + 10);
    assert!(lb.wait_for_log("backend failed", WAIT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_on_client_ip_keeps_each_address_on_one_backend() {
    let (a, b, c) = (
        Echo::start("a").await,
        Echo::start("b").await,
        Echo::start("c").await,
    );
    let lb = Ballast::start(&tcp_config(
        &[&a, &b, &c],
        "",
        "algorithm = \"hash\"\nhash_key = \"client_ip\"",
    ));
    let mut used = std::collections::BTreeSet::new();
    for last in 1..=24u8 {
        let ip = [127, 0, 0, last];
        let (_s, first) = open(lb.addr("web"), Some(ip)).await;
        for _ in 0..3 {
            let (_s, again) = open(lb.addr("web"), Some(ip)).await;
            assert_eq!(again, first, "127.0.0.{last} moved");
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "24 addresses all hashed to {used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_count_for_least_conn() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Ballast::start(&tcp_config(&[&a, &b], "", "algorithm = \"least_conn\""));
    // In flight per backend, as ballast counts it.
    let in_flight = async || -> Vec<u64> {
        let status = support::admin_call(lb.admin(), "GET", "/status", None)
            .await
            .1;
        status["pools"]["app"]["backends"]
            .as_array()
            .map(|bs| bs.iter().filter_map(|b| b["in_flight"].as_u64()).collect())
            .unwrap_or_default()
    };
    let (_held, first) = open(lb.addr("web"), None).await;
    // While the first connection stays open, every short one goes to the other backend
    // (round robin would alternate).
    for _ in 0..6 {
        let (s, name) = open(lb.addr("web"), None).await;
        assert_ne!(name, first);
        drop(s);
        // Ballast has let go of the short connection (its lease), not just the backend.
        support::eventually(WAIT, async || in_flight().await.iter().sum::<u64>() == 1)
            .await
            .expect("short connection released");
    }
    assert_eq!(a.open() + b.open(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_connection_beyond_it_and_blames_no_backend() {
    let a = Echo::start("a").await;
    let lb = Ballast::start(&tcp_config(&[&a], "", "max_connections = 1"));
    let (held, name) = open(lb.addr("web"), None).await;
    assert_eq!(name, "a");
    // TCP has no queue: the second connection is closed at once, without reaching a.
    let (_refused, greeting) = open(lb.addr("web"), None).await;
    assert_eq!(
        greeting, "",
        "a connection beyond max_connections was served"
    );
    assert!(
        lb.wait_for_log("reason=backends_full", WAIT),
        "{}",
        lb.logs()
    );
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        support::backend_state(lb.admin(), "app", a.addr).await,
        "healthy"
    );
    // Its slot comes back when the first one closes.
    drop(held);
    let served =
        support::eventually(WAIT, async || open(lb.addr("web"), None).await.1 == "a").await;
    assert!(served.is_some(), "the slot never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_backend_keeps_its_long_connection_until_drain_timeout() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Ballast::start(&tcp_config(&[&a, &b], "", "drain_timeout = \"1500ms\""));
    let (mut long, name) = open(lb.addr("web"), None).await;
    let (drained, other) = if name == "a" { (&a, &b) } else { (&b, &a) };
    assert_eq!(
        support::admin_backend(lb.admin(), drained.addr, "drain").await,
        200
    );
    // New connections go elsewhere; the long one keeps working.
    for _ in 0..4 {
        let (_s, n) = open(lb.addr("web"), None).await;
        assert_eq!(n, other.name);
    }
    let started = Instant::now();
    echo_roundtrip(&mut long, b"still here").await;
    // At drain_timeout it is cut.
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(WAIT, long.read(&mut buf))
        .await
        .expect("cut in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(lb.wait_for_log("drain timeout", WAIT), "{}", lb.logs());
    support::eventually(WAIT, async || drained.open() == 0)
        .await
        .expect("backend side closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_finishes_when_its_connection_ends() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Ballast::start(&tcp_config(&[&a, &b], "", "drain_timeout = \"30s\""));
    let (mut long, name) = open(lb.addr("web"), None).await;
    let drained = if name == "a" { &a } else { &b };
    support::admin_backend(lb.admin(), drained.addr, "drain").await;
    echo_roundtrip(&mut long, b"work").await;
    drop(long);
    assert!(lb.wait_for_log("backend drained", WAIT), "{}", lb.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_open_tcp_connections() {
    let a = Echo::start("a").await;
    let mut lb = Ballast::start(&tcp_config(&[&a], "", ""));
    let addr = lb.addr("web");
    let (mut long, _) = open(addr, None).await;
    lb.signal("TERM");
    assert!(lb.wait_for_log("shutting down", WAIT));
    // New connections are refused; the open one still works.
    let refused = support::eventually(WAIT, async || TcpStream::connect(addr).await.is_err()).await;
    assert!(refused.is_some());
    echo_roundtrip(&mut long, b"during shutdown").await;
    drop(long);
    assert_eq!(lb.wait_exit(WAIT), Some(0));
    assert!(
        lb.logs().contains("all connections closed"),
        "{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_idle_timeout() {
    let a = Echo::start("a").await;
    let lb = Ballast::start(&tcp_config(&[&a], "", "idle_timeout = \"1s\""));
    let (mut s, _) = open(lb.addr("web"), None).await;
    // Activity keeps it open past the timeout (pauses shorter than it, 1.2 s in all)...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        echo_roundtrip(&mut s, b"tick").await;
    }
    // ...silence closes it.
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    support::eventually(WAIT, async || a.open() == 0)
        .await
        .expect("backend side closed");
}

#[test]
fn http_only_keys_are_refused_on_a_tcp_listener() {
    let (ok, err) = support::check_config(
        "[listeners.db]\nbind = \"127.0.0.1:5432\"\npool = \"pg\"\nmode = \"tcp\"\nh2c = true\n\n[pools.pg]\nalgorithm = \"hash\"\nhash_key = \"header:x-user\"\nbackends = [\"127.0.0.1:5433\"]\n",
    );
    assert!(!ok);
    assert!(
        err.contains(":1:12: listeners.db.h2c: only used with mode = \"http\""),
        "{err}"
    );
    assert!(
        err.contains(
            ":9:12: pools.pg.hash_key: listener db is mode = \"tcp\", where only client_ip"
        ),
        "{err}"
    );
}

// ---- real servers: PostgreSQL and Redis ----

/// A free port on 127.0.0.1 (bound and released; the server started next takes it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A child process killed (by PID, ours) on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pg_bin(name: &str) -> Option<std::path::PathBuf> {
    let dirs = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    dirs.filter_map(|d| d.ok())
        .map(|d| d.path().join("bin").join(name))
        .find(|p| p.exists())
}

/// Starts a throwaway PostgreSQL server on `port` (as the `postgres` user when run as root).
fn start_postgres(dir: &std::path::Path, port: u16) -> Option<Child> {
    let (initdb, postgres) = (pg_bin("initdb")?, pg_bin("postgres")?);
    let as_root = rustix::process::geteuid().is_root();
    let run = |bin: &std::path::Path| {
        let mut c = if as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            std::process::Command::new(bin)
        };
        c.stdin(std::process::Stdio::null());
        c
    };
    let data = dir.join("data");
    std::fs::create_dir_all(&data).ok()?;
    if as_root {
        std::process::Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir)
            .status()
            .ok()?;
    }
    let init = run(&initdb)
        .args(["-D", data.to_str()?, "-U", "postgres", "--auth=trust", "-N"])
        .output()
        .ok()?;
    assert!(
        init.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let child = run(&postgres)
        .args([
            "-D",
            data.to_str()?,
            "-p",
            &port.to_string(),
            "-k",
            dir.to_str()?,
        ])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=50",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let child = Child(child);
    // Ready when pg_isready says so (bounded).
    let isready = pg_bin("pg_isready")?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let ok = std::process::Command::new(&isready)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "1"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("postgres did not become ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_ballast_has_zero_errors() {
    let Some(pgbench) = pg_bin("pgbench").filter(|_| pg_bin("postgres").is_some()) else {
        eprintln!("SKIPPED: PostgreSQL server not installed (.ci/run installs postgresql)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _pg = start_postgres(dir.path(), port).expect("start postgres");
    // A dead address first in the pool: every connection that picks it is retried on the
    // live server, and it is ejected after its first failure.
    let (_dead_socket, dead) = support::refusing_addr();
    let lb = Ballast::start(
        &TestConfig::addresses([dead, SocketAddr::from(([127, 0, 0, 1], port))])
            .listener("mode = \"tcp\"")
            .pool("retries = 1")
            .build(),
    );
    let lbport = lb.addr("web").port().to_string();
    let pg = |args: &[&str]| {
        let out = std::process::Command::new(&pgbench)
            .args(["-h", "127.0.0.1", "-p", &lbport, "-U", "postgres"])
            .args(args)
            .arg("postgres")
            .output()
            .expect("run pgbench");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "pgbench {args:?} failed:\n{text}\n{}",
            lb.logs()
        );
        text
    };
    pg(&["-i", "-s", "1", "-q"]);
    // A new connection per transaction (-C) exercises connect and close as well.
    for args in [
        &["-c", "8", "-j", "2", "-t", "150"][..],
        &["-c", "4", "-j", "2", "-t", "50", "-C"][..],
    ] {
        let text = pg(args);
        assert!(text.contains("number of failed transactions: 0"), "{text}");
        assert!(
            text.contains("number of transactions actually processed"),
            "{text}"
        );
    }
}

/// Runs a Redis tool to its end and returns its output, asserted free of errors.
fn run_clean(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run the redis tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    text
}

/// A throwaway Redis server on a free port, answering PING; `None` (said as skipped) when
/// redis-server is not installed.
fn start_redis() -> Option<(Child, tempfile::TempDir, u16)> {
    if !have("redis-server") || !have("redis-benchmark") || !have("redis-cli") {
        eprintln!("SKIPPED: redis-server not installed (.ci/run installs redis-server)");
        return None;
    }
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start redis");
    let server = Child(server);
    let started = Instant::now();
    while std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "ping"])
        .output()
        .map_or(true, |o| {
            !String::from_utf8_lossy(&o.stdout).contains("PONG")
        })
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "redis did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((server, dir, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_ballast_has_zero_errors() {
    let Some((_server, _dir, port)) = start_redis() else {
        return;
    };
    let lb = Ballast::start(
        &TestConfig::addresses([SocketAddr::from(([127, 0, 0, 1], port))])
            .listener("mode = \"tcp\"")
            .build(),
    );
    let lbport = lb.addr("web").port().to_string();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &lbport])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(cli(&["set", "k", "through ballast"]), "OK");
    assert_eq!(cli(&["get", "k"]), "through ballast");
    let text = run_clean(std::process::Command::new("redis-benchmark").args([
        "-p",
        &lbport,
        "-n",
        "20000",
        "-c",
        "20",
        "-P",
        "4",
        "-t",
        "set,get,lpush",
        "-q",
        "--csv",
    ]));
    for t in ["SET", "GET", "LPUSH"] {
        assert!(text.contains(&format!("\"{t}")), "{t} missing:\n{text}");
    }
    // Every request landed: the counter agrees.
    assert_eq!(cli(&["set", "n", "0"]), "OK");
    let incr = std::process::Command::new("redis-benchmark")
        .args(["-p", &lbport, "-n", "5000", "-c", "10", "-q", "incr", "n"])
        .output()
        .expect("redis-benchmark incr");
    assert!(incr.status.success());
    assert_eq!(cli(&["get", "n"]), "5000");
}

/// stunnel's job: redis-cli and redis-benchmark speak TLS to ballast, which speaks plain
/// TCP to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_terminated_by_ballast_has_zero_errors() {
    let Some((_server, _dir, port)) = start_redis() else {
        return;
    };
    let pki = support::tls::Pki::new("redis-tls");
    let leaf = pki.issue("redis", &["redis.test", "127.0.0.1"]);
    let lb = Ballast::start(
        &TestConfig::addresses([SocketAddr::from(([127, 0, 0, 1], port))])
            .listener(&format!(
                "mode = \"tcp\"\n[listeners.web.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]",
                leaf.cert.display(),
                leaf.key.display()
            ))
            .build(),
    );
    let lbport = lb.addr("web").port().to_string();
    let ca = pki.ca_path.display().to_string();
    let tls_args = ["--tls", "--cacert", ca.as_str(), "--sni", "redis.test"];
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &lbport])
            .args(tls_args)
            .args(args)
            .output()
            .expect("redis-cli");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    assert_eq!(cli(&["set", "k", "over tls"]), "OK");
    assert_eq!(cli(&["get", "k"]), "over tls");
    run_clean(
        std::process::Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &lbport])
            .args(tls_args)
            .args(["-n", "5000", "-c", "10", "-q", "incr", "n"]),
    );
    // Every request landed: read straight from Redis, not through ballast.
    let direct = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "get", "n"])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&direct.stdout).trim(), "5000");
    // A client that does not trust the certificate gets no answer.
    let untrusting = std::process::Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &lbport,
            "--tls",
            "--cacert",
            "/dev/null",
            "ping",
        ])
        .output()
        .expect("redis-cli");
    assert!(!String::from_utf8_lossy(&untrusting.stdout).contains("PONG"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_moves_the_same_bytes_with_half_close_and_idle_timeout() {
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let lb = Ballast::start(&tcp_config(
        &[&a, &b],
        "splice = true\naccept_proxy = [\"127.0.0.1\"]",
        "idle_timeout = \"1s\"",
    ));
    let addr = lb.addr("web");
    let header = ballast::proxy_protocol::encode(
        ballast::proxy_protocol::Version::V1,
        "192.0.2.1:1000".parse().unwrap(),
        "192.0.2.2:5432".parse().unwrap(),
    );
    let connect = || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The header and the first bytes in one write: what came after the header is sent
        // to the backend before splicing starts.
        let mut first = header.clone();
        first.extend_from_slice(b"hello");
        s.write_all(&first).await.unwrap();
        let name = read_line(&mut s).await;
        let mut echoed = [0u8; 5];
        tokio::time::timeout(WAIT, s.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&echoed, b"hello");
        (s, name)
    };
    let mut names = Vec::new();
    for _ in 0..2 {
        let (mut s, name) = connect().await;
        // 4 MB both ways, a pattern that shows reordering or loss.
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut rd, mut wr) = s.split();
        let send = async {
            wr.write_all(&data).await.unwrap();
        };
        let recv = async {
            let mut got = vec![0u8; data.len()];
            tokio::time::timeout(WAIT, rd.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            got
        };
        let ((), got) = tokio::join!(send, recv);
        assert!(got == data, "bytes changed on the way");
        // Half-close: the reply to our EOF still arrives.
        s.shutdown().await.unwrap();
        let mut rest = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest, "bye 4000005\n");
        names.push(name);
    }
    assert_eq!(names, ["a", "b"]);
    // Idle timeout applies to spliced connections too.
    let (mut s, _) = connect().await;
    let started = Instant::now();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}

/// Three of four backends refuse (their process is gone): each connection goes on past
/// them without spending `retries` (a refused connect sent nothing), and each refusing
/// backend is ejected at its first refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_go_on_past_every_refusing_backend() {
    let live = Echo::start("live").await;
    let dead: Vec<_> = (0..3).map(|_| support::refusing_addr()).collect();
    let mut addrs: Vec<SocketAddr> = dead.iter().map(|(_, a)| *a).collect();
    addrs.push(live.addr);
    let lb = Ballast::start(
        &TestConfig::addresses(addrs)
            .admin()
            .listener("mode = \"tcp\"")
            .pool("retries = 0")
            .build(),
    );
    for _ in 0..8 {
        let (_s, name) = open(lb.addr("web"), None).await;
        assert_eq!(name, "live");
    }
    for (_, addr) in &dead {
        assert_eq!(
            support::backend_state(lb.admin(), "app", *addr).await,
            "ejected"
        );
    }
}
