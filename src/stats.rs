//! Counters the data path writes: per listener and per pool (per backend ones live on
//! [`crate::balance::backend::Backend`]).
//!
//! Why plain atomics and not `metrics::counter!` on the hot path: a labelled `counter!`
//! looks its key up in the recorder's registry on every call, and the Prometheus exporter
//! cannot delete a series, so a backend removed from the config would stay in `/metrics`
//! forever. Instead every request bumps a few relaxed atomics that already sit on objects
//! it holds, and `GET /metrics` reads them from the live snapshot at scrape time (see
//! `prometheus`). What is not in the snapshot any more is simply not exported. Only the
//! latency histograms go through the `metrics` crate, through handles cached per pool.
//!
//! Objects here are reused across reloads by name (like backends by address), so counters
//! only ever grow while their listener or pool exists.

use std::sync::atomic::{AtomicU64, Ordering};

/// HTTP status classes `1xx` .. `5xx`, as the index `status / 100 - 1`.
#[derive(Debug, Default)]
pub struct ByClass([AtomicU64; 5]);

/// Labels of [`ByClass`] entries.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

impl ByClass {
    #[inline]
    pub fn add(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// `(label, count)` for each class.
    pub fn read(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CLASSES
            .iter()
            .zip(&self.0)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
    }
}

/// A monotonically growing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn incr(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One listener's traffic. Shared by its accept loops (old and new across a reload) and
/// every connection they serve.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub accepted: Counter,
    /// Connections open now (accepted minus closed).
    open: AtomicU64,
    /// HTTP responses by status class (TCP listeners count none).
    pub requests: ByClass,
    /// Body bytes received from clients (TCP: all bytes).
    pub bytes_in: Counter,
    /// Body bytes sent to clients (TCP: all bytes).
    pub bytes_out: Counter,
    pub tls_handshakes: Counter,
    pub tls_failures: Counter,
}

impl ListenerStats {
    /// Counts a connection as open, until [`ListenerStats::closed`].
    pub fn opened(&self) {
        self.accepted.incr();
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection counted by [`ListenerStats::opened`] ended.
    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn open_now(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

/// Why a request (or TCP connection) failed, for `ballast_pool_failures_total{reason}`.
/// The same words as the `reason` field of the log and of the access log.
pub const REASONS: [&str; 19] = [
    "no_healthy_backend",
    "queue_timeout",
    "queue_full",
    "rate_limited",
    "connect_timeout",
    "connect_failed",
    "handshake_failed",
    "tls_failed",
    "upstream_failed",
    "response_timeout",
    "response_truncated",
    "compress_failed",
    "listener_gone",
    "drain_timeout",
    "bad_request_body",
    "client_aborted",
    "body_timeout",
    "body_too_large",
    "client_closed",
];

/// One pool's request counters.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Responses by status class, including the ones ballast gave itself (503 with no
    /// healthy backend, 413, ...).
    pub requests: ByClass,
    /// Attempts after the first.
    pub retries: Counter,
    /// Retries the retry budget refused.
    pub retries_over_budget: Counter,
    failures: [AtomicU64; REASONS.len()],
}

impl PoolStats {
    /// Counts one failure; a reason missing from [`REASONS`] is a bug, counted nowhere.
    pub fn failed(&self, reason: &str) {
        if let Some(i) = REASONS.iter().position(|r| *r == reason) {
            self.failures[i].fetch_add(1, Ordering::Relaxed);
        } else {
            debug_assert!(false, "reason {reason} is not in stats::REASONS");
        }
    }

    /// `(reason, count)` for every reason seen at least once.
    pub fn failures(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REASONS
            .iter()
            .zip(&self.failures)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
    }
}

/// Per-pool latency histograms, recorded through the `metrics` crate. Without a recorder
/// (metrics off, or in tests) the handles do nothing.
#[derive(Debug)]
pub struct Latency {
    /// From the request head to the end of the response (or the client leaving).
    pub total: metrics::Histogram,
    /// Opening a connection to a backend (TCP, TLS, PROXY header); reused ones skip it.
    pub connect: metrics::Histogram,
    /// From sending the request to the backend's response head.
    pub header: metrics::Histogram,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            total: metrics::Histogram::noop(),
            connect: metrics::Histogram::noop(),
            header: metrics::Histogram::noop(),
        }
    }
}

pub const REQUEST_DURATION: &str = "ballast_request_duration_seconds";
pub const CONNECT_DURATION: &str = "ballast_upstream_connect_duration_seconds";
pub const HEADER_DURATION: &str = "ballast_upstream_header_duration_seconds";

impl Latency {
    /// Handles for `pool`'s histograms in the installed recorder, or no-op handles.
    pub fn new(pool: &str, enabled: bool) -> Latency {
        if !enabled {
            return Latency::default();
        }
        let pool = pool.to_string();
        Latency {
            total: metrics::histogram!(REQUEST_DURATION, "pool" => pool.clone()),
            connect: metrics::histogram!(CONNECT_DURATION, "pool" => pool.clone()),
            header: metrics::histogram!(HEADER_DURATION, "pool" => pool),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_reasons() {
        let c = ByClass::default();
        for s in [101, 200, 204, 302, 404, 499, 503, 999] {
            c.add(s);
        }
        let got: Vec<_> = c.read().collect();
        assert_eq!(
            got,
            [("1xx", 1), ("2xx", 2), ("3xx", 1), ("4xx", 2), ("5xx", 2)]
        );
        let p = PoolStats::default();
        p.failed("connect_failed");
        p.failed("connect_failed");
        assert_eq!(p.failures().collect::<Vec<_>>(), [("connect_failed", 2)]);
    }
}
