//! Test harness: real backend servers on ephemeral ports, the real `ballast` binary in
//! front of them, and small HTTP clients.
//!
//! Readiness is read from the daemon's own log ("listener bound ... addr=", "ballast is
//! ready"), never guessed with sleeps. Every wait is bounded.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub mod dns;
pub mod tls;

pub const WAIT: Duration = Duration::from_secs(15);

/// A real HTTP/1.1 backend. Routes:
/// - `/health`: 200, or 503 after `set_healthy(false)` (not counted as a hit)
/// - after `set_status(N)`: every other path answers with status N
/// - `/slow/MS`: answers after MS milliseconds
/// - `/status/NNN`: answers with that status
/// - `/upload`: reads the body as a stream and answers `NAME BYTES`
/// - `/download/N`: streams N bytes (chunked)
/// - `/upgrade`: switches to an echo protocol (101, `Upgrade: websocket`); so does any
///   `CONNECT` (200)
/// - `/headers...`: answers with the request headers, one `name: value` a line
/// - `/echo-path...`: answers with the path and query it received
/// - `/version`: answers with the HTTP version it was asked in (`HTTP/1.1`, `HTTP/2.0`)
/// - anything else: answers with the backend's name
///
/// Every response carries `x-backend: NAME`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    forced_status: Arc<AtomicU64>,
    accepted: Arc<AtomicUsize>,
    accept: AbortHandle,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve(name, listener)
    }

    /// A backend that also speaks HTTP/2 with prior knowledge (h2c), as gRPC servers do.
    pub async fn start_h2(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Self::serve_with(name, listener, true)
    }

    /// One backend per loopback address in `ips`, all on the same port: what a name with
    /// several A records stands for. The port is chosen by the kernel for the first address
    /// and tried on the others (again with a new port if one of them has it taken).
    pub async fn start_same_port(names: &[&str], ips: &[&str]) -> Vec<Backend> {
        assert_eq!(names.len(), ips.len());
        for _ in 0..20 {
            let first = TcpListener::bind((ips[0], 0)).await.expect("bind backend");
            let port = first.local_addr().expect("local addr").port();
            let mut listeners = vec![first];
            for ip in &ips[1..] {
                match TcpListener::bind((*ip, port)).await {
                    Ok(l) => listeners.push(l),
                    Err(_) => break,
                }
            }
            if listeners.len() == ips.len() {
                return listeners
                    .into_iter()
                    .zip(names)
                    .map(|(l, n)| Self::serve(n, l))
                    .collect();
            }
        }
        panic!("no port free on all of {ips:?}");
    }

    /// Serves on an already bound listener (used to bring a backend back on its old port).
    pub fn serve(name: &str, listener: TcpListener) -> Backend {
        Self::serve_with(name, listener, false)
    }

    fn serve_with(name: &str, listener: TcpListener, h2: bool) -> Backend {
        let addr = listener.local_addr().expect("local addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let forced_status = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let state = (
            name.to_string(),
            hits.clone(),
            in_flight.clone(),
            healthy.clone(),
            delay_ms.clone(),
            forced_status.clone(),
        );
        let conns2 = conns.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let accepted2 = accepted.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted2.fetch_add(1, Ordering::SeqCst);
                // Like a well-run server: a slow reader's backlog waits in the process, not
                // in a 4 MiB kernel send queue (many of those push loopback into TCP memory
                // pressure, which drops packets for every test on the machine).
                let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(128 * 1024);
                let state = state.clone();
                let task = tokio::spawn(async move {
                    let svc = service_fn(move |req| respond(req, state.clone()));
                    if h2 {
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                        return;
                    }
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
                conns2.lock().unwrap().push(task.abort_handle());
            }
        })
        .abort_handle();
        Backend {
            name: name.to_string(),
            addr,
            hits,
            in_flight,
            healthy,
            delay_ms,
            forced_status,
            accepted,
            accept,
            conns,
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Connections to this backend that are still open.
    pub fn open_connections(&self) -> usize {
        self.conns
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.is_finished())
            .count()
    }

    /// Connections this backend accepted (health checks included).
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The live in-flight counter, for sampling from another task.
    pub fn in_flight_counter(&self) -> Arc<AtomicUsize> {
        self.in_flight.clone()
    }

    /// Delays every answer (except `/health`) by `ms`.
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Answers every request (except `/health`) with `status` from now on; 0: as usual.
    pub fn set_status(&self, status: u16) {
        self.forced_status.store(status.into(), Ordering::SeqCst);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Stops the backend like a crashed process: the port refuses, open connections drop.
    pub fn kill(&self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

type State = (
    String,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
);

async fn respond(
    mut req: http::Request<Incoming>,
    (name, hits, in_flight, healthy, delay_ms, forced_status): State,
) -> Result<http::Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    let reply = |status: u16, body: String| {
        let mut r = http::Response::new(TestBody::Full(Full::new(Bytes::from(body))));
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        r.headers_mut().insert("x-backend", name.parse().unwrap());
        Ok(r)
    };
    if path == "/health" {
        let ok = healthy.load(Ordering::SeqCst);
        return reply(if ok { 200 } else { 503 }, String::new());
    }
    hits.fetch_add(1, Ordering::SeqCst);
    in_flight.fetch_add(1, Ordering::SeqCst);
    struct Done(Arc<AtomicUsize>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _done = Done(in_flight.clone());
    let forced = forced_status.load(Ordering::SeqCst) as u16;
    if forced != 0 {
        return reply(forced, name.clone());
    }
    let delay = delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        let ms: u64 = ms.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return reply(200, name.clone());
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return reply(code.parse().unwrap_or(500), name.clone());
    }
    let connect = req.method() == http::Method::CONNECT;
    if path == "/upgrade" || path == "/upgrade-bad-accept" || connect {
        // Echo protocol: after 101 (or a 200 to CONNECT), every byte comes back.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = on.await {
                let mut io = TokioIo::new(io);
                let mut buf = [0u8; 4096];
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = http::Response::new(TestBody::Full(Full::default()));
        if connect {
            r.headers_mut().insert("x-backend", name.parse().unwrap());
            return Ok(r);
        }
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        // A WebSocket's answer to its key (RFC 6455); `/upgrade-bad-accept` gets it wrong.
        if let Some(key) = req.headers().get("sec-websocket-key") {
            let key = key.to_str().unwrap_or("");
            let accept = if path == "/upgrade-bad-accept" {
                "d3JvbmcgYWNjZXB0IHZhbHVlIQ==".to_string()
            } else {
                websocket_accept(key)
            };
            r.headers_mut()
                .insert("sec-websocket-accept", accept.parse().unwrap());
        }
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut().insert("x-backend", name.parse().unwrap());
        return Ok(r);
    }
    if let Some(n) = path.strip_prefix("/download/") {
        let mut r = http::Response::new(TestBody::Stream {
            left: n.parse().unwrap_or(0),
        });
        r.headers_mut().insert("x-backend", name.parse().unwrap());
        return Ok(r);
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut n: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => return reply(400, "broken body".into()),
            }
        }
        return reply(200, format!("{name} {n}"));
    }
    if path == "/version" {
        return reply(200, format!("{:?}", req.version()));
    }
    if path.starts_with("/echo-path") {
        let pq = req.uri().path_and_query().map_or("", |pq| pq.as_str());
        return reply(200, pq.to_string());
    }
    if path.starts_with("/headers") {
        let mut text = String::new();
        for (k, v) in req.headers() {
            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        return reply(200, text);
    }
    reply(200, name.clone())
}

/// A backend's response body: a small fixed one, or `left` bytes generated 64 KiB at a
/// time without a length (chunked), so nothing holds the whole body.
pub enum TestBody {
    Full(Full<Bytes>),
    Stream { left: u64 },
}

impl hyper::body::Body for TestBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            TestBody::Full(f) => std::pin::Pin::new(f).poll_frame(cx),
            TestBody::Stream { left } => {
                if *left == 0 {
                    return std::task::Poll::Ready(None);
                }
                // One shared chunk: a download costs the backend no allocation per chunk.
                static CHUNK: [u8; 64 * 1024] = [b'y'; 64 * 1024];
                let n = (*left).min(CHUNK.len() as u64);
                *left -= n;
                std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                    &CHUNK[..n as usize],
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TestBody::Full(f) => f.is_end_stream(),
            TestBody::Stream { left } => *left == 0,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            TestBody::Full(f) => f.size_hint(),
            TestBody::Stream { .. } => hyper::body::SizeHint::default(),
        }
    }
}

/// The real daemon, started from a config text. Killed on drop.
pub struct Ballast {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    addrs: HashMap<String, SocketAddr>,
}

pub fn ballast_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ballast")
}

impl Ballast {
    /// Starts ballast with `config` and waits until it logs that it is ready.
    pub fn start(config: &str) -> Ballast {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Ballast {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("ballast.toml");
        std::fs::write(&config_path, config).expect("write config");
        Self::launch(dir, config_path, &[], env)
    }

    /// Starts ballast with neither `--log` nor `RUST_LOG`: the config's `[log] level` rules.
    pub fn start_config_level(config: &str) -> Ballast {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("ballast.toml");
        std::fs::write(&config_path, config).expect("write config");
        Self::launch_reading(dir, config_path, &[], &[], true, false)
    }

    /// Starts ballast with the log filter production runs with (`info`).
    pub fn start_production_logging(config: &str) -> Ballast {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("ballast.toml");
        std::fs::write(&config_path, config).expect("write config");
        Self::launch(dir, config_path, &["--log", "info"], &[])
    }

    /// Starts ballast with `--log filter` and stops reading its log once it is ready,
    /// keeping the pipe open: whatever it logs next fills the pipe and then stays unwritten.
    pub fn start_with_unread_log(config: &str, filter: &str) -> Ballast {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("ballast.toml");
        std::fs::write(&config_path, config).expect("write config");
        Self::launch_reading(dir, config_path, &["--log", filter], &[], false, true)
    }

    /// Starts a second process on the same config file with `--upgrade`: it takes this
    /// one's listening sockets over.
    pub fn upgrade(&self) -> Ballast {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::launch(dir, self.config_path.clone(), &["--upgrade"], &[])
    }

    /// Runs `$BALLAST_TEST_BIN` when set (to measure another build with the same tests),
    /// else the binary cargo built.
    fn launch(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Ballast {
        Self::launch_reading(dir, config_path, args, env, true, true)
    }

    fn launch_reading(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        args: &[&str],
        env: &[(&str, &str)],
        keep_reading: bool,
        log_flag: bool,
    ) -> Ballast {
        let bin = std::env::var("BALLAST_TEST_BIN").unwrap_or_else(|_| ballast_bin().into());
        let mut cmd = Command::new(bin);
        cmd.args(args);
        if !log_flag {
            cmd.env_remove("RUST_LOG");
        } else if !args.contains(&"--log") {
            cmd.args(["--log", "info,ballast=debug"]);
        }
        cmd.arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ballast");
        let stderr = child.stderr.take().expect("stderr");
        let log: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            for line in (&mut reader).lines() {
                let Ok(line) = line else { break };
                let ready = line.contains("ballast is ready");
                let (lines, cv) = &*log2;
                lines.lock().unwrap().push(line);
                cv.notify_all();
                if ready && !keep_reading {
                    // Hold the pipe open, unread, for as long as the test process lives.
                    loop {
                        std::thread::park();
                    }
                }
            }
        });
        let mut b = Ballast {
            child,
            dir,
            config_path,
            log,
            addrs: HashMap::new(),
        };
        if !b.wait_for_log("ballast is ready", WAIT) {
            panic!("ballast did not become ready; log:\n{}", b.logs());
        }
        for line in b.lines() {
            if line.contains("listener bound") {
                let name = field(&line, "listener").expect("listener field");
                let addr = field(&line, "addr")
                    .expect("addr field")
                    .parse()
                    .expect("addr");
                b.addrs.insert(name, addr);
            }
        }
        b
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .addrs
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener}; log:\n{}", self.logs()))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().clone()
    }

    pub fn logs(&self) -> String {
        self.lines().join("\n")
    }

    /// Waits (bounded) until a log line contains `needle`; true if one did.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits (bounded) until `count` log lines contain `needle`.
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.log;
        let mut guard = lines.lock().unwrap();
        loop {
            if guard.iter().filter(|l| l.contains(needle)).count() >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard =
                tokio::task::block_in_place(|| cv.wait_timeout(guard, deadline - now).unwrap().0);
        }
    }

    /// Sends a signal to the daemon (our own child, by PID).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits (bounded) for the daemon to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Peak resident memory of the daemon in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    /// Resident memory of the daemon now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{}/status", self.pid()))
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` from a tracing log line (values without spaces).
pub fn field(line: &str, key: &str) -> Option<String> {
    if line.starts_with('{') {
        // `[log] format = "json"`: the same fields, at the top level of the object.
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        return match &v[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Null => None,
            other => Some(other.to_string()),
        };
    }
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// A response as the tests see it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Client { sender })
    }

    pub async fn get(&mut self, path: &str) -> Result<Reply, hyper::Error> {
        self.request(
            http::Request::get(path)
                .header("host", "test.local")
                .body(Full::default())
                .unwrap(),
        )
        .await
    }

    pub async fn request(
        &mut self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<Reply, hyper::Error> {
        self.sender.ready().await?;
        reply_of(self.sender.send_request(req).await?).await
    }
}

/// A response read to its end, its body as text.
pub async fn reply_of(resp: http::Response<hyper::body::Incoming>) -> Result<Reply, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One request on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    get_with(addr, path, &[]).await
}

pub async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut c = Client::connect(addr).await.expect("connect to ballast");
    let mut req = http::Request::get(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", "test.local");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    c.request(req.body(Full::default()).unwrap())
        .await
        .expect("request through ballast")
}

pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

/// Polls `cond` every 20ms until it holds or `timeout` passes; returns the time it took.
pub async fn eventually(
    timeout: Duration,
    mut cond: impl AsyncFnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// How a test saves a new version of the config file, like the tools operators use.
#[derive(Debug, Clone, Copy)]
pub enum Save {
    /// Truncate and write the same inode (shell `>`).
    InPlace,
    /// Write a temporary file and rename it over (editors, `sed -i`).
    Rename,
    /// Kubernetes ConfigMap style: `ballast.toml -> ..data/ballast.toml`, and `..data` is a
    /// symlink swapped atomically to a new directory.
    SymlinkSwap,
}

impl Ballast {
    /// Saves `text` as the new config with `how`.
    pub fn save_config(&self, text: &str, how: Save) {
        let dir = self.dir.path();
        match how {
            Save::InPlace => std::fs::write(&self.config_path, text).unwrap(),
            Save::Rename => {
                let tmp = dir.join(".ballast.toml.swp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, &self.config_path).unwrap();
            }
            Save::SymlinkSwap => {
                use std::sync::atomic::AtomicU32;
                static N: AtomicU32 = AtomicU32::new(0);
                let version = format!("..v{}", N.fetch_add(1, Ordering::SeqCst));
                std::fs::create_dir(dir.join(&version)).unwrap();
                std::fs::write(dir.join(&version).join("ballast.toml"), text).unwrap();
                let tmp = dir.join("..data_tmp");
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(&version, &tmp).unwrap();
                std::fs::rename(&tmp, dir.join("..data")).unwrap();
                // First swap: point the config path at ..data (itself a rename over it).
                let meta = std::fs::symlink_metadata(&self.config_path).unwrap();
                if !meta.file_type().is_symlink() {
                    let link = dir.join(".ballast.toml.link");
                    std::os::unix::fs::symlink("..data/ballast.toml", &link).unwrap();
                    std::fs::rename(&link, &self.config_path).unwrap();
                }
            }
        }
    }

    pub fn admin(&self) -> SocketAddr {
        self.addr("admin")
    }
}

/// From a `/metrics` page: the sum of every sample of `name` whose labels include all of
/// `labels`.
pub fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// An admin API call; returns (status, parsed JSON body).
pub async fn admin_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut c = Client::connect(addr).await.expect("connect to admin");
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = c
        .request(req.body(Full::default()).unwrap())
        .await
        .expect("admin request");
    let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status, v)
}

/// State of `address` in `pool` according to `/status`.
pub async fn backend_state(admin: SocketAddr, pool: &str, address: SocketAddr) -> String {
    let (_, v) = admin_call(admin, "GET", "/status", None).await;
    v["pools"][pool]["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["address"] == address.to_string()))
        .map(|b| b["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_else(|| "absent".into())
}

/// Backends on a runtime of their own threads, so that a test's crowd of clients does not
/// starve them (as it would a real backend on another host).
pub struct BackendRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl BackendRuntime {
    pub fn new(threads: usize) -> BackendRuntime {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("test-backends")
            .enable_all()
            .build()
            .expect("backend runtime");
        BackendRuntime { rt: Some(rt) }
    }

    pub async fn start(&self, name: &str) -> Backend {
        let name = name.to_string();
        let rt = self.rt.as_ref().expect("runtime");
        rt.spawn(async move { Backend::start(&name).await })
            .await
            .expect("start backend")
    }
}

impl Drop for BackendRuntime {
    fn drop(&mut self) {
        // A runtime may not be dropped (blocking) inside the test's async context.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A backend that accepts, reads the start of a request and closes without answering.
pub async fn rude_backend() -> SocketAddr {
    use tokio::io::AsyncReadExt;
    let rude = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = rude.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = rude.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
        }
    });
    addr
}

/// A raw HTTP/1.1 backend whose answers a test writes byte for byte. For each request head
/// read on a connection, `answer(n, head)` (`n` counts from 1 on that connection; `head` is
/// the text up to its blank line) gives the bytes to write, or `None` to close the
/// connection without a byte. Bodies are not read: for requests without one. Returns the
/// address and a count of the heads read on all connections.
pub async fn scripted_backend(
    answer: impl Fn(usize, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let heads = Arc::new(AtomicUsize::new(0));
    let (counted, answer) = (heads.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (counted, answer) = (counted.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut n = 0;
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        counted.fetch_add(1, Ordering::SeqCst);
                        n += 1;
                        let Some(reply) = answer(n, &head) else {
                            return;
                        };
                        if s.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// Starts one backend per name, in order.
pub async fn start_backends<const N: usize>(names: [&str; N]) -> [Backend; N] {
    let mut started = Vec::with_capacity(N);
    for n in names {
        started.push(Backend::start(n).await);
    }
    match started.try_into() {
        Ok(all) => all,
        Err(_) => unreachable!("one backend per name"),
    }
}

/// A test config: listener `web` on an ephemeral port in front of pool `app`.
#[derive(Debug, Clone, Default)]
pub struct TestConfig {
    head: String,
    listener: String,
    backends: Vec<String>,
    pool: String,
}

impl TestConfig {
    /// Pool `app` over `backends`, weight 1 each.
    pub fn new(backends: &[&Backend]) -> TestConfig {
        Self::addresses(backends.iter().map(|b| b.addr.to_string()))
    }

    pub fn weighted(backends: &[(&Backend, u32)]) -> TestConfig {
        TestConfig {
            backends: backends
                .iter()
                .map(|(b, w)| format!("{{ address = \"{}\", weight = {w} }}", b.addr))
                .collect(),
            ..Default::default()
        }
    }

    pub fn addresses(addrs: impl IntoIterator<Item = impl std::fmt::Display>) -> TestConfig {
        TestConfig {
            backends: addrs.into_iter().map(|a| format!("\"{a}\"")).collect(),
            ..Default::default()
        }
    }

    /// Backend entries written as they go into `backends = [...]`, e.g.
    /// `{ address = "...", backup = true }`.
    pub fn entries(entries: &[String]) -> TestConfig {
        TestConfig {
            backends: entries.to_vec(),
            ..Default::default()
        }
    }

    /// Adds `[admin]` on an ephemeral loopback port.
    pub fn admin(self) -> TestConfig {
        self.head("[admin]\nbind = \"127.0.0.1:0\"\n")
    }

    /// TOML placed before the listener (`[global]`, `[admin]`).
    pub fn head(mut self, toml: &str) -> TestConfig {
        self.head.push_str(toml);
        self.head.push('\n');
        self
    }

    /// Keys of `[listeners.web]`.
    pub fn listener(mut self, toml: &str) -> TestConfig {
        self.listener.push_str(toml);
        self.listener.push('\n');
        self
    }

    /// Keys of `[pools.app]`, then any further tables (e.g. `[pools.app.health_check]`).
    pub fn pool(mut self, toml: &str) -> TestConfig {
        self.pool.push_str(toml);
        self.pool.push('\n');
        self
    }

    /// Another pool, `name`, over one backend (for routes to name).
    pub fn named_pool(self, name: &str, backend: &Backend) -> TestConfig {
        self.pool(&format!(
            "[pools.{name}]\nbackends = [\"{}\"]",
            backend.addr
        ))
    }

    pub fn build(&self) -> String {
        format!(
            "{}\n[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n{}\n[pools.app]\nbackends = [{}]\n{}",
            self.head,
            self.listener,
            self.backends.join(", "),
            self.pool
        )
    }
}

/// Runs `ballast --check` on `text` (written to a temporary file); returns whether it
/// passed and its stderr.
pub fn check_config(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("b.toml");
    std::fs::write(&path, text).expect("write config");
    let out = Command::new(ballast_bin())
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .expect("run ballast --check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An address that refuses connections for as long as the returned socket lives: bound,
/// never listening, so no other test can be handed the port meanwhile (a listener bound
/// and dropped frees its port for the next `bind(0)`).
pub fn refusing_addr() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}

/// Whether process `pid` holds a listening TCP socket on `port`, read from /proc (robust
/// where a connect test is not: once freed, the port may go to another test's server).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                if let Some(inode) = f.get(9) {
                    inodes.push(format!("socket:[{inode}]"));
                }
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .any(|target| inodes.iter().any(|i| target.to_string_lossy() == *i))
}

/// `POST /pools/app/backends/{addr}/{action}` (`drain` or `enable`); returns the status.
pub async fn admin_backend(admin: SocketAddr, addr: SocketAddr, action: &str) -> u16 {
    let path = format!("/pools/app/backends/{addr}/{action}");
    admin_call(admin, "POST", &path, None).await.0
}

impl Ballast {
    /// Asserts the daemon's peak RSS grew by less than 64 MiB since `before` (KiB) while
    /// moving `what`: bodies are streamed, not buffered.
    pub fn assert_memory_bounded(&self, before: u64, what: &str) {
        let after = self.peak_rss_kib();
        assert!(
            after < before + 64 * 1024,
            "peak RSS grew from {before} KiB to {after} KiB for {what}"
        );
    }
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl RawReply {
    /// (status, body as text), for one-line assertions.
    pub fn status_text(&self) -> (u16, String) {
        (
            self.status,
            String::from_utf8_lossy(&self.body).into_owned(),
        )
    }
}

/// Reads one response (head, then a `Content-Length` body) from `s`; `None` if the
/// connection closed or nothing complete arrived within `limit`.
pub async fn read_response(s: &mut TcpStream, limit: Duration) -> Option<RawReply> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let mut body = buf[head_end..].to_vec();
        while body.len() < len {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        Some(RawReply { status, head, body })
    };
    tokio::time::timeout(limit, read).await.ok().flatten()
}

/// Sends `bytes` on a fresh connection and reads one response.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Option<RawReply> {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.expect("connect to ballast");
    s.write_all(bytes).await.ok()?;
    read_response(&mut s, WAIT).await
}

/// A GET on a fresh connection from the loopback address `from`, with `headers` (whole
/// field lines, each ending in CRLF) added.
pub async fn get_from(
    from: std::net::IpAddr,
    web: std::net::SocketAddr,
    path: &str,
    headers: &str,
) -> Option<RawReply> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(std::net::SocketAddr::new(from, 0)).ok()?;
    let mut s = socket.connect(web).await.ok()?;
    use tokio::io::AsyncWriteExt;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    read_response(&mut s, WAIT).await
}

/// Reads a response head from `s` a byte at a time (nothing past it, which may belong to a
/// tunnel); `None` if the connection closed before its first byte.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(s, &mut byte))
            .await
            .expect("head in time")
            .unwrap_or(0);
        if n == 0 {
            assert!(
                head.is_empty(),
                "closed during the head: {}",
                String::from_utf8_lossy(&head)
            );
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// Waits (bounded) until the peer closes `s`; returns how long that took, or `None`.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2), computed here apart from ballast's.
pub fn websocket_accept(key: &str) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}
