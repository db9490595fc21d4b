//! One upstream address and its live state, shared by the data path and the control plane.
//!
//! A `Backend` is identified by (pool, address) and its `Arc` is reused across reloads (see
//! `Pool::build`), so health, in-flight counts, drain state and pooled connections survive a
//! config change. The data path reads the atomics; health checks, passive failure reports and
//! the admin API write them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use crate::config::PassiveConfig;
use crate::health::threshold::{HealthCounter, HealthState, Transition};
use crate::upstream::ConnPool;

use super::queue::Queue;
use tokio_util::sync::CancellationToken;

/// What the admin status reports for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    Pending,
    Healthy,
    Unhealthy,
    /// Passively ejected after failed connections, for `passive.fail_timeout`.
    Ejected,
    Draining,
}

#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// The DNS name this backend was found by, if any: the default TLS server name.
    pub tls_name: Option<rustls::pki_types::ServerName<'static>>,
    /// The address as text, for logs, metrics and hashing.
    pub label: Arc<str>,
    /// Written by health checks (through `health`); read per request.
    healthy: AtomicBool,
    /// Written by the admin API and reloads (a backend removed from the file drains).
    draining: AtomicBool,
    /// Passive ejection deadline in ms since [`clock_start`]; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    /// Consecutive failed connections seen by the data path.
    passive_fails: AtomicU32,
    in_flight: AtomicUsize,
    requests_total: AtomicU64,
    failures_total: AtomicU64,
    /// Traffic counters for `/metrics` and the status page.
    pub stats: BackendStats,
    /// When (ms since [`clock_start`]) the state last changed by an event (check, drain,
    /// ejection); an ejection's end is derived in [`Backend::state_since_ms`].
    changed_ms: AtomicU64,
    /// The last active check: when (ms since [`clock_start`]), 0 for never; and whether it
    /// passed.
    last_check_ms: AtomicU64,
    last_check_ok: AtomicBool,
    /// Rise/fall state of active checks. Only the control plane and failure reports lock it.
    health: Mutex<HealthCounter>,
    /// Idle keep-alive connections to this backend.
    pub conns: ConnPool,
    /// Fired to cut every open connection to this backend (drain timeout); replaced by a
    /// fresh token afterwards so later connections are not born cut.
    cut: Mutex<CancellationToken>,
    /// Bumped by every cut, so the data path can tell our cut from a backend failure.
    cuts: AtomicU64,
    /// Slow start: when (ms since [`clock_start`]) this backend last became healthy; 0 when
    /// it is not ramping. Cleared by the first pick after the ramp is over.
    ramp_start_ms: AtomicU64,
    /// `max_connections`: whether this backend is limited (its pool then has a queue, told
    /// when a lease ends). The limit itself is the pool's (a reload may change it).
    limited: AtomicBool,
    queue: arc_swap::ArcSwapOption<Queue>,
}

/// What a backend served and how its checks went, for `/metrics` and the status page.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Responses by status class.
    pub responses: crate::stats::ByClass,
    /// Request body bytes sent to it (TCP: all bytes).
    pub bytes_in: crate::stats::Counter,
    /// Response body bytes received from it (TCP: all bytes).
    pub bytes_out: crate::stats::Counter,
    pub ejections: crate::stats::Counter,
    pub checks_passed: crate::stats::Counter,
    pub checks_failed: crate::stats::Counter,
}

/// Where a slow-start ramp begins: a backend back from the dead takes this share of its
/// weight at once, and grows linearly to all of it.
const RAMP_FIRST_SHARE: f64 = 0.05;

impl Backend {
    pub fn new(addr: SocketAddr, initial: HealthState) -> Backend {
        Backend {
            addr,
            tls_name: None,
            label: addr.to_string().into(),
            healthy: AtomicBool::new(initial == HealthState::Healthy),
            draining: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            passive_fails: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            requests_total: AtomicU64::new(0),
            failures_total: AtomicU64::new(0),
            stats: BackendStats::default(),
            changed_ms: AtomicU64::new(now_ms()),
            last_check_ms: AtomicU64::new(0),
            last_check_ok: AtomicBool::new(false),
            health: Mutex::new(HealthCounter::new(1, 1, initial)),
            conns: ConnPool::default(),
            cut: Mutex::new(CancellationToken::new()),
            cuts: AtomicU64::new(0),
            ramp_start_ms: AtomicU64::new(0),
            limited: AtomicBool::new(false),
            queue: arc_swap::ArcSwapOption::empty(),
        }
    }

    /// Set by the pool this backend belongs to: the queue told when a slot frees, or
    /// `None` for no limit.
    pub fn set_queue(&self, queue: Option<Arc<Queue>>) {
        self.limited.store(queue.is_some(), Ordering::Relaxed);
        self.queue.store(queue);
    }

    /// This backend was found by resolving `host`: TLS verifies that name by default.
    pub fn found_by(mut self, host: Option<&str>) -> Backend {
        self.tls_name =
            host.and_then(|h| rustls::pki_types::ServerName::try_from(h.to_string()).ok());
        self
    }

    /// Starts this backend's slow-start ramp now (it just became healthy, or was just
    /// added healthy to a running pool). A passive ejection starts one at its end.
    pub fn start_ramp(&self) {
        self.ramp_start_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Slow start: whether one pick may go to this backend, given how far it is through a
    /// ramp of `ramp`. Ramping backends are admitted with a probability equal to their
    /// current share of their weight, so each policy keeps its own order and the backend's
    /// traffic grows with the share; the others take what it is not admitted for.
    #[inline]
    pub fn ramp_admits(&self, ramp: std::time::Duration) -> bool {
        let start = self.ramp_start_ms.load(Ordering::Relaxed);
        if start == 0 {
            return true;
        }
        let elapsed = now_ms().saturating_sub(start);
        let total = ramp.as_millis().max(1) as u64;
        if elapsed >= total {
            // Only this ramp's start is cleared, not one that began meanwhile.
            let _ =
                self.ramp_start_ms
                    .compare_exchange(start, 0, Ordering::Relaxed, Ordering::Relaxed);
            return true;
        }
        let share = (elapsed as f64 / total as f64).max(RAMP_FIRST_SHARE);
        fastrand::f64() < share
    }

    /// The share of its weight a ramping backend gets now (1.0 when not ramping), for
    /// `/status`.
    pub fn ramp_share(&self, ramp: Option<std::time::Duration>) -> f64 {
        let start = self.ramp_start_ms.load(Ordering::Relaxed);
        match ramp {
            Some(ramp) if start != 0 => {
                let elapsed = now_ms().saturating_sub(start) as f64;
                (elapsed / ramp.as_millis().max(1) as f64).clamp(RAMP_FIRST_SHARE, 1.0)
            }
            _ => 1.0,
        }
    }

    /// In-flight count if this backend may take a new request, else `None`.
    #[inline]
    pub fn load_if_available(&self) -> Option<usize> {
        if !self.healthy.load(Ordering::Relaxed) || self.draining.load(Ordering::Relaxed) {
            return None;
        }
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until != 0 && now_ms() < until {
            return None;
        }
        Some(self.in_flight.load(Ordering::Relaxed))
    }

    /// Like [`Self::load_if_available`] but ignoring passive ejection: used when every
    /// backend of a pool is ejected, because trying one beats a certain 503 (nginx does the
    /// same for a pool of one).
    #[inline]
    pub fn load_ignoring_ejection(&self) -> Option<usize> {
        (self.healthy.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed))
            .then(|| self.in_flight.load(Ordering::Relaxed))
    }

    /// In-flight count unless draining, whatever the health: for `fail_open` and the panic
    /// threshold, which send traffic to backends their checks call down.
    #[inline]
    pub fn load_if_not_draining(&self) -> Option<usize> {
        (!self.draining.load(Ordering::Relaxed)).then(|| self.in_flight.load(Ordering::Relaxed))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    pub fn failures_total(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Stops (or resumes) new traffic to this backend. Draining also closes idle upstream
    /// connections; requests in flight finish normally.
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) != draining {
            self.changed_ms.store(now_ms(), Ordering::Relaxed);
        }
        if draining {
            self.conns.clear();
        }
    }

    /// How many times connections were cut; compare before and after a request.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// The token new upstream connections watch.
    pub fn cut_token(&self) -> CancellationToken {
        self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Closes every connection to this backend now, in flight or idle.
    pub fn cut_connections(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.conns.clear();
        let old = std::mem::take(&mut *self.cut.lock().unwrap_or_else(|p| p.into_inner()));
        old.cancel();
    }

    pub fn state(&self) -> BackendState {
        if self.is_draining() {
            return BackendState::Draining;
        }
        match self.health_state() {
            HealthState::Pending => BackendState::Pending,
            HealthState::Unhealthy => BackendState::Unhealthy,
            HealthState::Healthy => {
                let until = self.ejected_until_ms.load(Ordering::Relaxed);
                if until != 0 && now_ms() < until {
                    BackendState::Ejected
                } else {
                    BackendState::Healthy
                }
            }
        }
    }

    /// How long ago the state last changed (an ejection's end counts as a change).
    pub fn state_age(&self) -> std::time::Duration {
        let now = now_ms();
        let changed = self.changed_ms.load(Ordering::Relaxed);
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        let since = if until > changed && until <= now {
            until
        } else {
            changed
        };
        std::time::Duration::from_millis(now.saturating_sub(since))
    }

    /// The last active check: how long ago, and whether it passed. `None`: no check yet.
    pub fn last_check(&self) -> Option<(std::time::Duration, bool)> {
        let at = self.last_check_ms.load(Ordering::Relaxed);
        (at != 0).then(|| {
            (
                std::time::Duration::from_millis(now_ms().saturating_sub(at)),
                self.last_check_ok.load(Ordering::Relaxed),
            )
        })
    }

    pub fn health_state(&self) -> HealthState {
        self.lock_health().state()
    }

    /// Applies thresholds from the (re)loaded config, keeping the current state.
    pub fn set_thresholds(&self, rise: u32, fall: u32) {
        self.lock_health().set_thresholds(rise, fall);
    }

    /// Forces the active-check state (used when a reload turns checks off).
    pub fn set_health_state(&self, state: HealthState) {
        let mut h = self.lock_health();
        if h.state() != state {
            self.changed_ms.store(now_ms(), Ordering::Relaxed);
        }
        h.set_state(state);
        self.healthy
            .store(state == HealthState::Healthy, Ordering::Relaxed);
    }

    /// Records an active probe result; returns the transition, if any.
    pub fn record_probe(&self, ok: bool) -> Option<Transition> {
        let mut h = self.lock_health();
        let t = h.record(ok);
        let now = now_ms();
        if t == Some(Transition::Up) {
            self.start_ramp();
        }
        if t.is_some() {
            self.changed_ms.store(now, Ordering::Relaxed);
        }
        self.last_check_ms.store(now, Ordering::Relaxed);
        self.last_check_ok.store(ok, Ordering::Relaxed);
        if ok {
            self.stats.checks_passed.incr();
        } else {
            self.stats.checks_failed.incr();
        }
        self.healthy
            .store(h.state() == HealthState::Healthy, Ordering::Relaxed);
        if ok {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.passive_fails.store(0, Ordering::Relaxed);
        }
        t
    }

    /// Called when the data path failed to connect to or talk to this backend. Returns true
    /// when this failure ejected the backend.
    pub fn record_failure(&self, passive: &PassiveConfig) -> bool {
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        self.conns.clear();
        if passive.max_fails == 0 {
            return false;
        }
        let fails = self.passive_fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails < passive.max_fails {
            return false;
        }
        self.eject(passive);
        true
    }

    /// A failed connect. A refused one means nothing listens there (a replica that exited,
    /// most often with requests still aimed at it): ejected at once for `fail_timeout`,
    /// without waiting for `max_fails`, so the next picks skip it (`max_fails = 0` still
    /// turns passive ejection off). Any other counts like [`Self::record_failure`].
    /// Returns whether the backend was ejected now.
    pub fn record_connect_error(
        &self,
        error: &crate::upstream::ConnectError,
        passive: &PassiveConfig,
    ) -> bool {
        if !error.refused() {
            return self.record_failure(passive);
        }
        self.failures_total.fetch_add(1, Ordering::Relaxed);
        self.conns.clear();
        if passive.max_fails == 0 {
            return false;
        }
        self.eject(passive);
        true
    }

    /// No traffic for `fail_timeout` (unless every backend is ejected).
    fn eject(&self, passive: &PassiveConfig) {
        self.passive_fails.store(0, Ordering::Relaxed);
        self.stats.ejections.incr();
        let now = now_ms();
        self.changed_ms.store(now, Ordering::Relaxed);
        let until = now + passive.fail_timeout.as_millis() as u64;
        self.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
        // Slow start (when the pool has it) begins when the ejection ends: a backend
        // that was failing comes back gently, as after a failed health check.
        self.ramp_start_ms.store(until.max(1), Ordering::Relaxed);
    }

    /// Called when a response head arrived from this backend.
    pub fn record_success(&self) {
        if self.passive_fails.load(Ordering::Relaxed) != 0 {
            self.passive_fails.store(0, Ordering::Relaxed);
        }
    }

    fn lock_health(&self) -> std::sync::MutexGuard<'_, HealthCounter> {
        // The counter holds no invariant a panic could break half-way; keep going.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One in-flight request (or connection) on a backend. Dropping it ends it, so every early
/// return and every cancelled future is counted correctly.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<Backend>,
}

impl Lease {
    pub fn new(backend: Arc<Backend>) -> Lease {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        backend.requests_total.fetch_add(1, Ordering::Relaxed);
        Lease { backend }
    }

    /// A lease if fewer than `limit` requests are in flight on `backend` (checked and
    /// counted in one step, so concurrent picks never exceed it).
    pub fn within(backend: &Arc<Backend>, limit: usize) -> Option<Lease> {
        backend
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        backend.requests_total.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            backend: Arc::clone(backend),
        })
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.backend.limited.load(Ordering::Relaxed) {
            if let Some(queue) = &*self.backend.queue.load() {
                queue.slot_freed();
            }
        }
    }
}

fn clock_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1 so that 0 can mean "not ejected" even in the first millisecond.
    clock_start().elapsed().as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slow_start_ramps_after_a_check_comes_up_and_after_an_ejection_ends() {
        let ramp = Some(Duration::from_secs(60));
        let b = Backend::new("10.0.0.1:80".parse().unwrap(), HealthState::Unhealthy);
        assert_eq!(b.ramp_share(ramp), 1.0, "no ramp before it is healthy");
        assert_eq!(b.record_probe(true), Some(Transition::Up));
        assert!(b.ramp_share(ramp) < 0.1, "just came up: a small share");
        assert_eq!(
            b.ramp_share(None),
            1.0,
            "pools without slow_start ignore it"
        );

        let c = Backend::new("10.0.0.2:80".parse().unwrap(), HealthState::Healthy);
        assert_eq!(c.ramp_share(ramp), 1.0);
        let passive = PassiveConfig {
            max_fails: 1,
            fail_timeout: Duration::from_millis(1),
        };
        assert!(c.record_failure(&passive), "ejected");
        assert!(
            c.ramp_share(ramp) < 0.1,
            "ramps from the end of the ejection"
        );
        // Once a ramp is over (1 ms ejection, 1 ms ramp), the first pick clears it.
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.ramp_admits(Duration::from_millis(1)));
        assert_eq!(c.ramp_share(ramp), 1.0);
    }
}
