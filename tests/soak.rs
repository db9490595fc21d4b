//! A bounded soak: hundreds of slow uploaders, slow readers and slowloris heads at once,
//! beside normal clients. The hostile crowd must cost ballast bounded memory, never reach
//! the backends as held-open requests, never fail a health check or eject a backend, and
//! never fail a normal client's request. Everything runs on loopback and stops by itself
//! (about 30 s). The figures are printed (run with `--nocapture` to see them) and recorded
//! in BENCHMARKS.md; latency is reported, not asserted, beyond a gross stall bound.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{backend_state, BackendRuntime, Ballast, Client, TestConfig};

const SLOW_UPLOADERS: usize = 300;
const SLOW_READERS: usize = 300;
const SLOWLORIS: usize = 200;
const NORMAL_CLIENTS: usize = 4;
const BASELINE: Duration = Duration::from_secs(4);
const SOAK: Duration = Duration::from_secs(15);

/// A client socket with a small receive buffer, so a slow reader's backlog sits in ballast
/// rather than in the kernel.
async fn small_window(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_recv_buffer_size(16 * 1024)?;
    s.set_nonblocking(true)?;
    let s = tokio::net::TcpSocket::from_std_stream(s.into());
    s.connect(addr).await
}

/// Sends 1 KiB of a 60 KiB body every 200 ms (12 s), then reads the answer.
async fn slow_uploader(addr: SocketAddr, until: Instant, completed: Arc<AtomicUsize>) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let total = 60 * 1024;
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n");
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut sent = 0;
    while sent < total && Instant::now() < until {
        if s.write_all(&[b'u'; 1024]).await.is_err() {
            return;
        }
        sent += 1024;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if sent == total {
        if let Some(r) = support::read_response(&mut s, Duration::from_secs(10)).await {
            if r.status == 200 {
                completed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Asks for a 64 MiB download and reads 4 KiB every 100 ms.
async fn slow_reader(addr: SocketAddr, until: Instant) {
    let Ok(mut s) = small_window(addr).await else {
        return;
    };
    let req = b"GET /download/67108864 HTTP/1.1\r\nHost: x\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Sends a request head one line a second; reconnects when cut.
async fn slowloris(addr: SocketAddr, until: Instant, cut: Arc<AtomicUsize>) {
    while Instant::now() < until {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return;
        };
        if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.is_err() {
            continue;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if Instant::now() >= until {
                return;
            }
            if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                cut.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}

/// Keep-alive GETs in a loop; returns each request's latency, panics on any failure.
async fn normal_client(addr: SocketAddr, until: Instant) -> Vec<Duration> {
    let mut c = Client::connect(addr).await.expect("connect");
    let mut times = Vec::new();
    while Instant::now() < until {
        let start = Instant::now();
        let r = c.get("/").await.expect("a normal request failed");
        assert_eq!(r.status, 200, "a normal request failed: {r:?}");
        times.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    times
}

async fn normal_load(addr: SocketAddr, until: Instant) -> Vec<Duration> {
    let tasks: Vec<_> = (0..NORMAL_CLIENTS)
        .map(|_| tokio::spawn(normal_client(addr, until)))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("normal client"));
    }
    all.sort();
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_crowd_leaves_health_memory_and_normal_clients_alone() {
    raise_fd_limit();
    let backends = BackendRuntime::new(1);
    let (a, b) = (backends.start("a").await, backends.start("b").await);
    let checks = "[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 2\n";
    let lb = Ballast::start_production_logging(
        &TestConfig::new(&[&a, &b])
            .admin()
            .listener("request_header_timeout = \"3s\"")
            .pool("idle_timeout = \"1s\"")
            .pool(checks)
            .build(),
    );
    let addr = lb.addr("web");

    // Baseline: normal clients alone (also warms up connections and allocator).
    let baseline = normal_load(addr, Instant::now() + BASELINE).await;
    let rss_start = lb.rss_kib();

    // The crowd, beside normal clients.
    let until = Instant::now() + SOAK;
    let completed = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let mut crowd = Vec::new();
    for _ in 0..SLOW_UPLOADERS {
        crowd.push(tokio::spawn(slow_uploader(addr, until, completed.clone())));
    }
    for _ in 0..SLOW_READERS {
        crowd.push(tokio::spawn(slow_reader(addr, until)));
    }
    for _ in 0..SLOWLORIS {
        crowd.push(tokio::spawn(slowloris(addr, until, cut.clone())));
    }
    // What the backends see while the uploads trickle in (they take 12 s; when they end,
    // all 300 arrive at once, which is a burst of quick requests, not held ones).
    let trickle_until = Instant::now() + Duration::from_secs(10);
    let peak_backend = {
        let (a_in, b_in) = (a.in_flight_counter(), b.in_flight_counter());
        tokio::spawn(async move {
            let mut peak = 0;
            while Instant::now() < trickle_until {
                peak = peak.max(a_in.load(Ordering::SeqCst) + b_in.load(Ordering::SeqCst));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    // Let the crowd build up, then measure normal clients for the rest of the soak.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = normal_load(addr, until).await;
    let mut rss_peak_soak = lb.rss_kib();
    for t in crowd {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        rss_peak_soak = rss_peak_soak.max(lb.rss_kib());
    }
    let peak_backend = peak_backend.await.unwrap();
    let rss_peak = lb.peak_rss_kib();

    // Memory comes back once the crowd is gone (bounded wait; allocators return lazily).
    let margin_kib = 32 * 1024;
    let settled = support::eventually(Duration::from_secs(30), async || {
        lb.rss_kib() < rss_start + margin_kib
    })
    .await;
    let rss_end = lb.rss_kib();
    let fds_end = std::fs::read_dir(format!("/proc/{}/fd", lb.pid())).map_or(0, |d| d.count());

    println!(
        "soak figures: normal clients p50/p99 alone {:?}/{:?} ({} requests), during the soak {:?}/{:?} ({} requests); \
         RSS start {} KiB, peak {} KiB, end {} KiB; backend requests held at once: peak {}; \
         uploads completed {}/{}; slowloris heads cut {}; open fds at the end {}",
        percentile(&baseline, 0.5),
        percentile(&baseline, 0.99),
        baseline.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len(),
        rss_start,
        rss_peak,
        rss_end,
        peak_backend,
        completed.load(Ordering::Relaxed),
        SLOW_UPLOADERS,
        cut.load(Ordering::Relaxed),
        fds_end,
    );

    let logs = lb.logs();
    assert!(
        !logs.contains("backend is unhealthy") && !logs.contains("ejected=true"),
        "the crowd failed a health check or ejected a backend:\n{logs}"
    );
    for backend in [&a, &b] {
        assert_eq!(
            backend_state(lb.admin(), "app", backend.addr).await,
            "healthy"
        );
    }
    assert!(!during.is_empty(), "normal clients got nothing done");
    assert!(
        percentile(&during, 0.99) < Duration::from_millis(500),
        "normal clients stalled: p99 {:?} during the soak",
        percentile(&during, 0.99)
    );
    assert!(
        peak_backend < 50,
        "slow uploads held {peak_backend} backend requests open at once (without buffering: one each)"
    );
    assert!(
        completed.load(Ordering::Relaxed) > SLOW_UPLOADERS / 2,
        "slow but steady uploads should complete"
    );
    assert!(
        cut.load(Ordering::Relaxed) >= SLOWLORIS,
        "slowloris heads were not cut"
    );
    assert!(
        settled.is_some(),
        "RSS did not come back: start {rss_start} KiB, peak {rss_peak} KiB, end {rss_end} KiB"
    );
}
