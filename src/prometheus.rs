//! `GET /metrics`: the Prometheus text format, through `metrics-exporter-prometheus`.
//!
//! Two recorders make one page:
//! - The global recorder holds the per-pool latency histograms. The data path records into
//!   handles cached on each [`crate::balance::Pool`] (see `stats::Latency`); an upkeep task
//!   folds the samples into buckets every few seconds, so memory stays flat even if nobody
//!   scrapes.
//! - Every other series is read at scrape time from the live snapshot's atomics (see
//!   `stats`) into a fresh recorder made for this one scrape. So a backend that left the
//!   config or DNS, or a listener that was removed, is gone from the very next scrape, which
//!   the exporter alone cannot do (it has no way to delete a series).
//!
//! Labels are only ever `listener`, `pool`, `backend` (an address), `code` (a status class),
//! `state`, `result` and `reason` (fixed word lists), and a certificate's `name` (from its
//! file): nothing a client can make unbounded.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::balance::backend::BackendState;
use crate::control::Daemon;
use crate::stats;

/// Bucket bounds (seconds) of every latency histogram: 1 ms to 60 s.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// How often histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the global recorder for the latency histograms and starts its upkeep task.
/// Call once, before the first config is applied (pools take their handles when built).
pub fn install() -> Option<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), &BUCKETS)
        .map(|b| b.build_recorder());
    let recorder = match recorder {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "metrics: cannot build the recorder");
            return None;
        }
    };
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("metrics: a recorder was already installed; latency histograms are off");
        return None;
    }
    describe_histogram!(
        stats::REQUEST_DURATION,
        Unit::Seconds,
        "Time from the request head to the end of the response (TCP: the connection's life), per pool."
    );
    describe_histogram!(
        stats::CONNECT_DURATION,
        Unit::Seconds,
        "Time to open a new connection to a backend (TCP, TLS, PROXY header), per pool."
    );
    describe_histogram!(
        stats::HEADER_DURATION,
        Unit::Seconds,
        "Time from sending a request to a backend to its response head, per pool."
    );
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Some(handle)
}

/// The whole `/metrics` page.
pub fn render(daemon: &Daemon, histograms: Option<&PrometheusHandle>) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        describe();
        record(daemon);
    });
    let mut page = recorder.handle().render();
    if let Some(h) = histograms {
        page.push_str(&h.render());
    }
    page
}

fn describe() {
    describe_gauge!("ballast_build_info", "Always 1; the version is a label.");
    describe_gauge!(
        "ballast_start_time_seconds",
        Unit::Seconds,
        "When this process started, in seconds since the Unix epoch."
    );
    describe_gauge!(
        "ballast_config_generation",
        "Config generation being served (+1 per applied reload or DNS change)."
    );
    describe_counter!(
        "ballast_config_reloads_total",
        "Config reloads (file edit, SIGHUP, admin API) by result: success or failure."
    );
    describe_gauge!(
        "ballast_config_last_reload_success_timestamp_seconds",
        Unit::Seconds,
        "When a reload last succeeded (else when the process started), seconds since the epoch."
    );
    describe_gauge!(
        "ballast_listener_connections_open",
        "Client connections open now."
    );
    describe_counter!(
        "ballast_listener_connections_accepted_total",
        "Client connections accepted."
    );
    describe_counter!(
        "ballast_listener_requests_total",
        "HTTP responses sent, by status class (499: the client left first)."
    );
    describe_counter!(
        "ballast_listener_received_bytes_total",
        Unit::Bytes,
        "Request body bytes received from clients (TCP listeners: all bytes)."
    );
    describe_counter!(
        "ballast_listener_sent_bytes_total",
        Unit::Bytes,
        "Response body bytes sent to clients (TCP listeners: all bytes)."
    );
    describe_counter!(
        "ballast_listener_tls_handshakes_total",
        "TLS handshakes completed."
    );
    describe_counter!(
        "ballast_listener_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out."
    );
    describe_gauge!(
        "ballast_tls_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "When a certificate a listener serves expires (notAfter, Unix time); `name` is its first DNS name."
    );
    describe_counter!(
        "ballast_acme_renewal_failures_total",
        "ACME orders (first issuance or renewal) that failed; each is retried with backoff."
    );
    describe_counter!(
        "ballast_acme_certificates_issued_total",
        "Certificates this process ordered and installed through ACME."
    );
    describe_gauge!("ballast_pool_backends", "Backends in the pool.");
    describe_gauge!(
        "ballast_pool_queued",
        "Requests waiting in the pool's queue for a backend below its max_connections."
    );
    describe_gauge!(
        "ballast_pool_healthy_backends",
        "Backends that take new traffic now (healthy, not ejected, not draining)."
    );
    describe_counter!(
        "ballast_pool_requests_total",
        "HTTP responses for requests routed to the pool, by status class, including the ones ballast gave itself."
    );
    describe_counter!(
        "ballast_pool_retries_total",
        "Requests (or TCP connects) sent again to another backend."
    );
    describe_counter!(
        "ballast_pool_retries_over_budget_total",
        "Retries not made because the pool's retry_budget was spent."
    );
    describe_counter!(
        "ballast_pool_failures_total",
        "Requests or TCP connections that failed, by reason."
    );
    describe_gauge!(
        "ballast_backend_state",
        "1 for the backend's current state, 0 for the others."
    );
    describe_gauge!(
        "ballast_backend_up",
        "1 if the backend takes new traffic now, else 0."
    );
    describe_gauge!("ballast_backend_weight", "Configured weight.");
    describe_gauge!(
        "ballast_backend_in_flight",
        "Requests (TCP: connections) in flight to the backend."
    );
    describe_counter!(
        "ballast_backend_requests_total",
        "Responses from the backend, by status class."
    );
    describe_counter!(
        "ballast_backend_sent_bytes_total",
        Unit::Bytes,
        "Request body bytes sent to the backend (TCP: all bytes)."
    );
    describe_counter!(
        "ballast_backend_received_bytes_total",
        Unit::Bytes,
        "Response body bytes received from the backend (TCP: all bytes)."
    );
    describe_counter!(
        "ballast_backend_failures_total",
        "Connection or response failures counted against the backend (passive checks)."
    );
    describe_counter!(
        "ballast_backend_ejections_total",
        "Times the backend was passively ejected."
    );
    describe_counter!(
        "ballast_backend_health_checks_total",
        "Active health checks, by result: pass or fail."
    );
    describe_counter!(
        "ballast_access_log_dropped_total",
        "Access log lines dropped because the writer could not keep up."
    );
}

fn record(daemon: &Daemon) {
    let snap = daemon.live.load_full();
    gauge!("ballast_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!("ballast_start_time_seconds").set(epoch_seconds(daemon.started_at()));
    gauge!("ballast_config_generation").set(snap.generation as f64);
    let reloads = daemon.reload_status();
    counter!("ballast_config_reloads_total", "result" => "success").absolute(reloads.applied);
    counter!("ballast_config_reloads_total", "result" => "failure").absolute(reloads.rejected);
    let last_ok = reloads
        .last_success_at
        .map_or_else(|| epoch_seconds(daemon.started_at()), |at| at as f64);
    gauge!("ballast_config_last_reload_success_timestamp_seconds").set(last_ok);
    if let Some(log) = &snap.access_log {
        counter!("ballast_access_log_dropped_total").absolute(log.dropped());
    }

    let mut listeners: Vec<_> = snap.routers.iter().collect();
    listeners.sort_by(|a, b| a.0.cmp(b.0));
    for (name, router) in listeners {
        let s = &router.stats;
        let l = name.to_string();
        gauge!("ballast_listener_connections_open", "listener" => l.clone())
            .set(s.open_now() as f64);
        counter!("ballast_listener_connections_accepted_total", "listener" => l.clone())
            .absolute(s.accepted.get());
        for (code, n) in s.requests.read() {
            counter!("ballast_listener_requests_total", "listener" => l.clone(), "code" => code)
                .absolute(n);
        }
        counter!("ballast_listener_received_bytes_total", "listener" => l.clone())
            .absolute(s.bytes_in.get());
        counter!("ballast_listener_sent_bytes_total", "listener" => l.clone())
            .absolute(s.bytes_out.get());
        let tls = snap
            .config
            .listeners
            .iter()
            .any(|c| c.name == **name && c.tls.is_some());
        if tls {
            counter!("ballast_listener_tls_handshakes_total", "listener" => l.clone())
                .absolute(s.tls_handshakes.get());
            counter!("ballast_listener_tls_handshake_failures_total", "listener" => l)
                .absolute(s.tls_failures.get());
        }
    }

    // Every certificate a listener serves, named by its first DNS name; ACME's counters.
    for l in &snap.config.listeners {
        for c in l.tls.iter().flat_map(|t| t.certificates.iter()) {
            let name = c.names.first().cloned().unwrap_or_default();
            gauge!("ballast_tls_certificate_expiry_timestamp_seconds", "listener" => l.name.clone(), "name" => name)
                .set(c.not_after as f64);
        }
    }
    for (listener, st) in crate::acme::statuses() {
        counter!("ballast_acme_renewal_failures_total", "listener" => listener.clone())
            .absolute(st.failures_total);
        counter!("ballast_acme_certificates_issued_total", "listener" => listener)
            .absolute(st.issued_total);
    }

    let mut pools: Vec<_> = snap.pools.values().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    for pool in pools {
        let p = pool.name.to_string();
        let up = pool
            .backends
            .iter()
            .filter(|b| b.load_if_available().is_some())
            .count();
        gauge!("ballast_pool_backends", "pool" => p.clone()).set(pool.backends.len() as f64);
        gauge!("ballast_pool_queued", "pool" => p.clone())
            .set(pool.queue().map_or(0, |q| q.waiting()) as f64);
        gauge!("ballast_pool_healthy_backends", "pool" => p.clone()).set(up as f64);
        for (code, n) in pool.stats.requests.read() {
            counter!("ballast_pool_requests_total", "pool" => p.clone(), "code" => code)
                .absolute(n);
        }
        counter!("ballast_pool_retries_total", "pool" => p.clone())
            .absolute(pool.stats.retries.get());
        counter!("ballast_pool_retries_over_budget_total", "pool" => p.clone())
            .absolute(pool.stats.retries_over_budget.get());
        for (reason, n) in pool.stats.failures() {
            counter!("ballast_pool_failures_total", "pool" => p.clone(), "reason" => reason)
                .absolute(n);
        }
        for (b, cfg) in pool.backends.iter().zip(&pool.config.backends) {
            let labels = [("pool", p.clone()), ("backend", b.label.to_string())];
            let with = |k: &'static str, v: &'static str| {
                let mut l: Vec<(&'static str, String)> = labels.to_vec();
                l.push((k, v.to_string()));
                l
            };
            let state = b.state();
            for s in STATES {
                let on = if s == state { 1.0 } else { 0.0 };
                gauge!("ballast_backend_state", &with("state", state_name(s))).set(on);
            }
            gauge!("ballast_backend_up", &labels).set(if b.load_if_available().is_some() {
                1.0
            } else {
                0.0
            });
            gauge!("ballast_backend_weight", &labels).set(f64::from(cfg.weight));
            gauge!("ballast_backend_in_flight", &labels).set(b.in_flight() as f64);
            for (code, n) in b.stats.responses.read() {
                counter!("ballast_backend_requests_total", &with("code", code)).absolute(n);
            }
            counter!("ballast_backend_sent_bytes_total", &labels).absolute(b.stats.bytes_in.get());
            counter!("ballast_backend_received_bytes_total", &labels)
                .absolute(b.stats.bytes_out.get());
            counter!("ballast_backend_failures_total", &labels).absolute(b.failures_total());
            counter!("ballast_backend_ejections_total", &labels).absolute(b.stats.ejections.get());
            if pool.config.health_check.is_some() {
                counter!(
                    "ballast_backend_health_checks_total",
                    &with("result", "pass")
                )
                .absolute(b.stats.checks_passed.get());
                counter!(
                    "ballast_backend_health_checks_total",
                    &with("result", "fail")
                )
                .absolute(b.stats.checks_failed.get());
            }
        }
    }
}

const STATES: [BackendState; 5] = [
    BackendState::Healthy,
    BackendState::Unhealthy,
    BackendState::Pending,
    BackendState::Ejected,
    BackendState::Draining,
];

fn state_name(s: BackendState) -> &'static str {
    match s {
        BackendState::Healthy => "healthy",
        BackendState::Unhealthy => "unhealthy",
        BackendState::Pending => "pending",
        BackendState::Ejected => "ejected",
        BackendState::Draining => "draining",
    }
}

fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
