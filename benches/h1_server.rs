//! Server-side HTTP/1.1 cost, hyper's server connection against `ballast::h1::server`, on
//! the same trivial service (2 bytes to every request; hyper with ballast's listener settings),
//! one thread each, in one run:
//!
//!   cargo bench --bench h1_server            # 3 rounds of 3 s per server
//!   ROUNDS=5 SECS=5 CONNS=50 cargo bench --bench h1_server
//!   MODE=busy BUSY=1000 cargo bench --bench h1_server   # memory per stalled download
//!   MODE=idle BUSY=1000 cargo bench --bench h1_server   # memory per idle keep-alive client
//!
//! The server thread is pinned to CPU 0 and wrk (Debian's) to CPU 1, keep-alive; the figure
//! is the server thread's own CPU time (user + system, from the kernel's per-thread clock)
//! per request, the median of the rounds, and the ratio. No proxying and no backend: this
//! isolates what the codec route of issue 10 replaces (hyper's HTTP/1 server dispatch,
//! parse, buffers and encode) from the rest of ballast's request path.
//!
//! `MODE=busy`: each server, in a process of its own, serves a 1 MiB body to `BUSY` clients
//! that read 1 KiB and stop (4 KiB receive buffers); the process's RSS growth per
//! connection 3 s after the last client stalled. hyper gets ballast's listener settings
//! (`max_buf_size` 32 KiB, flat writes). The bench binary uses the system allocator.
//! `MODE=idle`: the same with a 2-byte answer read whole, the connection then left open
//! (hyper alone, without the parking `listener.rs` adds around it).

use std::convert::Infallible;
use std::process::Command;
use std::time::Duration;

use ballast::h1::server::{self, ServerConfig};
use ballast::h1::Limits;
use bytes::Bytes;
use http::Response;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug)]
enum Engine {
    Hyper,
    Ballast,
}

/// Thread CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The calling thread's user time in clock ticks (`/proc/thread-self/stat`, field 14).
fn thread_user_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace()
        .nth(11)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Clock ticks per second (USER_HZ); 100 on Linux.
const TICKS: f64 = 100.0;

/// Serves every connection on `listener` with `engine` until `stop`: each request gets
/// `size` zero bytes of known length. hyper runs with ballast's listener settings (flat
/// writes, `max_buf_size` 32 KiB), `h1::server` with the same head limits.
async fn accept_loop(
    engine: Engine,
    listener: std::net::TcpListener,
    stop: CancellationToken,
    size: usize,
) {
    let listener = TcpListener::from_std(listener).expect("listener");
    let config = ServerConfig {
        limits: Limits {
            max_head: 32 * 1024,
            max_headers: 100,
        },
        head_timeout: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(60),
        read_size: 16 * 1024,
        first_request_grace: Duration::from_secs(1),
        relay_fields: false,
    };
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let stop = stop.clone();
        tokio::spawn(async move {
            match engine {
                Engine::Hyper => {
                    let svc = service_fn(|_req| async move {
                        Ok::<_, Infallible>(Response::new(Download { left: size }))
                    });
                    let conn = http1::Builder::new()
                        .writev(false)
                        .max_buf_size(32 * 1024)
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! { _ = conn => {}, _ = stop.cancelled() => {} }
                }
                Engine::Ballast => {
                    let svc = move |_req| async move { Response::new(Download { left: size }) };
                    let shared = server::Server {
                        config,
                        shutdown: stop,
                    };
                    let _ = server::serve(stream, &shared, svc).await;
                }
            }
        });
    }
}

/// Serves until `stop`; returns the serving thread's CPU time, and its user part.
fn serve(
    engine: Engine,
    listener: std::net::TcpListener,
    stop: CancellationToken,
) -> (Duration, Duration) {
    let mut cpus = rustix::thread::CpuSet::new();
    cpus.set(0);
    let _ = rustix::thread::sched_setaffinity(None, &cpus);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let (start, user_start) = (thread_cpu(), thread_user_ticks());
    rt.block_on(accept_loop(engine, listener, stop, 2));
    let user = (thread_user_ticks() - user_start) as f64 / TICKS;
    (thread_cpu() - start, Duration::from_secs_f64(user))
}

/// One round: requests per second, and CPU and user microseconds per request.
fn round(engine: Engine, secs: u32, conns: u32) -> Option<(f64, f64, f64)> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    listener.set_nonblocking(true).ok()?;
    let port = listener.local_addr().ok()?.port();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let server = std::thread::spawn(move || serve(engine, listener, token));
    let out = Command::new("taskset")
        .args(["-c", "1", "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .ok()?;
    stop.cancel();
    let (cpu, user) = server.join().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let requests: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let rps: f64 = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / requests;
    Some((rps, per(cpu), per(user)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A body of `left` zero bytes in 16 KiB pieces, of known length (a file download).
struct Download {
    left: usize,
}

static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];

impl hyper::body::Body for Download {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let n = self.left.min(ZEROS.len());
        self.left -= n;
        std::task::Poll::Ready(
            (n > 0).then(|| Ok(hyper::body::Frame::data(Bytes::from_static(&ZEROS[..n])))),
        )
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left as u64)
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The child process of `MODE=busy`: one engine, `n` stalled downloads; prints the RSS
/// growth per connection.
fn busy_child(engine: Engine, n: usize, idle: bool) {
    // Idle: a 2-byte answer read whole, then the connection stays open with nothing in flight.
    let size = if idle { 2 } else { 1 << 20 };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let token = stop.clone();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(accept_loop(engine, listener, token, size));
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_bytes();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        use std::io::{Read, Write};
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let _ = socket.set_recv_buffer_size(4096);
        socket.connect(&addr.into()).expect("connect");
        let mut stream: std::net::TcpStream = socket.into();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: busy\r\n\r\n")
            .expect("request");
        let mut got = 0;
        let mut chunk = [0u8; 1024];
        if idle {
            let _ = stream.read(&mut chunk);
            got = 1024;
        }
        while got < 1024 {
            match stream.read(&mut chunk[..1024 - got]) {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
        held.push(stream);
    }
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_bytes();
    println!("RSS_PER_CONN {}", after.saturating_sub(before) / n as u64);
    stop.cancel();
    drop(held);
    let _ = server.join();
}

fn busy(n: usize, idle: bool) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut figures = Vec::new();
    for engine in ["hyper", "ballast"] {
        let out = Command::new(&exe)
            .arg("--bench")
            .env("H1_BUSY_CHILD", engine)
            .env("MODE", if idle { "idle" } else { "busy" })
            .env("BUSY", n.to_string())
            .output();
        let per = out.ok().and_then(|o| {
            String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                l.strip_prefix("RSS_PER_CONN ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        });
        match per {
            Some(b) => {
                let what = if idle {
                    "idle keep-alive connection"
                } else {
                    "stalled 1 MiB download"
                };
                println!("{engine}: {b:.0} bytes of RSS per {what} ({n} connections)");
                figures.push(b);
            }
            None => println!("{engine}: no result"),
        }
    }
    if let [hyper, ours] = figures[..] {
        println!("ballast h1 / hyper: {:.2}", ours / hyper);
    }
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench` absent: nothing to do then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let env = |k: &str, d: u32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    if let Ok(child) = std::env::var("H1_BUSY_CHILD") {
        let engine = if child == "hyper" {
            Engine::Hyper
        } else {
            Engine::Ballast
        };
        let idle = std::env::var("MODE").is_ok_and(|m| m == "idle");
        busy_child(engine, env("BUSY", 1000) as usize, idle);
        return;
    }
    if let Ok(mode) = std::env::var("MODE") {
        if mode == "busy" || mode == "idle" {
            busy(env("BUSY", 1000) as usize, mode == "idle");
            return;
        }
    }
    if Command::new("wrk").arg("--version").output().is_err() {
        println!("SKIPPED: h1_server bench needs wrk (apt-get install wrk)");
        return;
    }
    let (rounds, secs, conns) = (env("ROUNDS", 3), env("SECS", 3), env("CONNS", 50));
    let mut results = Vec::new();
    for engine in [Engine::Hyper, Engine::Ballast] {
        results.push((engine, Vec::new(), Vec::new(), Vec::new()));
    }
    for r in 0..rounds {
        for (engine, rps, cpu, user) in &mut results {
            match round(*engine, secs, conns) {
                Some((q, c, u)) => {
                    println!(
                        "round {r} {engine:?}: {q:.0} req/s, {c:.2} us CPU ({u:.2} user) per request"
                    );
                    rps.push(q);
                    cpu.push(c);
                    user.push(u);
                }
                None => println!("round {r} {engine:?}: no result (wrk output unreadable)"),
            }
        }
    }
    let summary: Vec<(Engine, f64, f64, f64)> = results
        .into_iter()
        .filter(|(_, rps, _, _)| !rps.is_empty())
        .map(|(e, rps, cpu, user)| (e, median(rps), median(cpu), median(user)))
        .collect();
    println!("\nserver thread, medians of {rounds} rounds ({secs} s, {conns} connections):");
    for (engine, rps, cpu, user) in &summary {
        println!("  {engine:?}: {rps:.0} req/s, {cpu:.2} us CPU per request, {user:.2} us user");
    }
    if let [(_, _, hyper, hyper_user), (_, _, ours, ours_user)] = summary[..] {
        println!(
            "  ballast h1 / hyper: CPU {:.2}, user {:.2}",
            ours / hyper,
            ours_user / hyper_user
        );
    }
}
