//! What observability costs a request on the data path:
//! - `counters`: the relaxed atomics a finished request bumps (listener, pool and backend
//!   counts by status class, bytes) — always on, they feed `/status` too;
//! - `histograms`: the three latency samples per request into `metrics-exporter-prometheus`
//!   handles (metrics on), against the no-op handles (metrics off);
//! - `access_log`: building an entry and queueing it for the writer thread (`log`), and the
//!   formatting the writer thread then does (`format_json`, `format_combined`).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ballast::access_log::{AccessLog, Entry, LineFormat, RequestLine};
use ballast::balance::backend::BackendStats;
use ballast::config::{AccessLogConfig, AccessLogFormat};
use ballast::stats::{Latency, ListenerStats, PoolStats};
use criterion::{criterion_group, criterion_main, Criterion};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

fn counters(c: &mut Criterion) {
    let listener = ListenerStats::default();
    let pool = PoolStats::default();
    let backend = BackendStats::default();
    c.bench_function("observability/counters_per_request", |b| {
        b.iter(|| {
            let status = black_box(200);
            listener.requests.add(status);
            listener.bytes_in.add(black_box(0));
            listener.bytes_out.add(black_box(512));
            pool.requests.add(status);
            backend.responses.add(status);
            backend.bytes_in.add(black_box(0));
            backend.bytes_out.add(black_box(512));
        })
    });
}

fn histograms(c: &mut Criterion) {
    let mut group = c.benchmark_group("observability/histograms_per_request");
    let off = Latency::new("app", false);
    group.bench_function("metrics_off", |b| {
        b.iter(|| {
            off.total.record(black_box(0.0012));
            off.connect.record(black_box(0.0003));
            off.header.record(black_box(0.0009));
        })
    });
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_duration_seconds".into()),
            &[0.001, 0.01, 0.1, 1.0, 10.0],
        )
        .expect("buckets")
        .build_recorder();
    let handle = recorder.handle();
    let on = metrics::with_local_recorder(&recorder, || Latency::new("app", true));
    group.bench_function("metrics_on", |b| {
        // The daemon folds samples into buckets every 5 s; do it between batches here
        // (untimed), so memory stays flat as it does in the daemon.
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                on.total.record(black_box(0.0012));
                on.connect.record(black_box(0.0003));
                on.header.record(black_box(0.0009));
            }
            let took = start.elapsed();
            handle.run_upkeep();
            took
        })
    });
    group.finish();
}

fn entry() -> Entry {
    Entry {
        time: SystemTime::now(),
        listener: "web".into(),
        client: "192.0.2.7:51000".parse().expect("addr"),
        forwarded: None,
        request: Some(RequestLine::new(
            http::Method::GET,
            http::Version::HTTP_11,
            b"/api/v1/items?page=2",
            Some(b"shop.example"),
            None,
            Some(b"Mozilla/5.0 (X11; Linux x86_64)"),
        )),
        status: 200,
        bytes_in: 0,
        bytes_out: 512,
        pool: Some("app".into()),
        backend: Some("10.0.0.1:8080".into()),
        attempts: 1,
        connect: None,
        header: Some(Duration::from_micros(900)),
        total: Duration::from_micros(1200),
        termination: "ok",
        request_id: None,
    }
}

fn access_log(c: &mut Criterion) {
    let mut group = c.benchmark_group("observability/access_log");
    let template = entry();
    // To /dev/null: the writer thread keeps up, so what is measured is the data path's part.
    let log = AccessLog::start(&AccessLogConfig {
        path: Some("/dev/null".into()),
        format: AccessLogFormat::Json,
        buffer: 16_384,
    })
    .expect("open /dev/null");
    let listener: Arc<str> = "web".into();
    group.bench_function("log", |b| {
        // In batches smaller than the queue, waiting (untimed) for the writer to catch up
        // in between: what is timed is queueing a line, never dropping one.
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let batch = left.min(4096);
                let target = log.written() + batch;
                let start = Instant::now();
                for _ in 0..batch {
                    let mut e = template.clone();
                    e.listener = Arc::clone(&listener);
                    e.time = SystemTime::now();
                    log.log(e);
                }
                took += start.elapsed();
                while log.written() < target && log.dropped() == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                left -= batch;
            }
            took
        })
    });
    let mut out = Vec::with_capacity(4096);
    for (name, format) in [
        ("format_json", AccessLogFormat::Json),
        ("format_combined", AccessLogFormat::Combined),
    ] {
        let mut lines = LineFormat::new(format);
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                lines.write(&template, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
    println!(
        "access_log: {} lines written, {} dropped (the queue was full)",
        log.written(),
        log.dropped()
    );
}

criterion_group!(benches, counters, histograms, access_log);
criterion_main!(benches);
