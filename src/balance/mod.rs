//! Pools: named sets of backends with a selection policy, built once per config generation.
//!
//! `policy` holds the pure pick functions, `backend` the per-address live state, `queue` the
//! wait list for backends at their `max_connections`, `budget` the retry budget, `sticky`
//! the ids a session cookie names backends by. A [`Pool`]
//! is immutable once built; a reload builds a new one that reuses the `Arc<Backend>` of every
//! address it keeps, and the queue and budget of the pool it replaces.
//!
//! A pick is the policy's choice among the backends that may take the request. Pools that
//! set none of backups, `panic_threshold`, `when_all_down = "fail_open"`, `max_connections`
//! or `hash_balance_factor` take the plain passes only (available, then ejected-but-healthy);
//! the others add their filters around the same policy, so every algorithm keeps its order.

pub mod backend;
pub mod budget;
pub mod policy;
pub mod queue;
pub mod sticky;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{HashKey, PoolConfig, WhenAllDown};
use crate::health::threshold::HealthState;
use crate::stats::{Latency, PoolStats};
use crate::tls::BackendTls;
use backend::{Backend, Lease};
use policy::Selector;

#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub config: PoolConfig,
    pub backends: Vec<Arc<Backend>>,
    /// TLS to the backends, built once per config generation.
    pub tls: Option<BackendTls>,
    /// Request counters, carried over from the previous pool of the same name.
    pub stats: Arc<PoolStats>,
    /// Latency histogram handles (no-ops when metrics are off).
    pub latency: Latency,
    /// With `retry_budget`: the pool's recent requests and retries, carried over from the
    /// previous pool of the same name so a reload does not refill it.
    pub retry_budget: Option<Arc<budget::RetryBudget>>,
    selector: Selector,
    /// Backups, panic threshold and the all-down policy; `None` when the pool uses none of
    /// them, and then a pick is the plain passes over all backends and costs what it did
    /// before these existed.
    tiers: Option<Tiers>,
    /// `max_connections` per backend index (`usize::MAX`: none) and the pool's queue; `None`
    /// when no backend is limited.
    limits: Option<(Vec<usize>, Arc<queue::Queue>)>,
    /// With `sticky`: each backend's id (by index); empty otherwise.
    sticky_ids: Vec<u64>,
}

/// Why [`Pool::select`] found no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPick {
    /// None is available (all down, draining, or already tried).
    Down,
    /// Some are available but each is at its `max_connections`: wait in the queue.
    Full,
}

/// How a pool with backups, a panic threshold or `when_all_down = "fail_open"` picks.
#[derive(Debug)]
struct Tiers {
    /// Per backend index: a backup.
    backup: Vec<bool>,
    panic_threshold: Option<f64>,
    fail_open: bool,
}

impl Pool {
    /// Builds a pool, reusing backends from `previous` (same address in the same pool) so
    /// their health, counters and connections carry over. New backends start healthy at
    /// startup, and pending (no traffic until the first passing check) when added later to a
    /// pool with health checks. `metrics`: record latency histograms.
    pub fn build(
        config: &PoolConfig,
        previous: Option<&Pool>,
        startup: bool,
        metrics: bool,
    ) -> Pool {
        let old: HashMap<SocketAddr, &Arc<Backend>> = previous
            .map(|p| p.backends.iter().map(|b| (b.addr, b)).collect())
            .unwrap_or_default();
        let new_state = if startup || config.health_check.is_none() {
            HealthState::Healthy
        } else {
            HealthState::Pending
        };
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| match old.get(&b.address) {
                Some(existing) => Arc::clone(existing),
                None => {
                    let backend = Backend::new(b.address, new_state).found_by(b.host.as_deref());
                    // Added healthy to a running pool (no checks to pass first): it ramps
                    // from now. With checks, its first passing one starts the ramp.
                    if !startup && new_state == HealthState::Healthy {
                        backend.start_ramp();
                    }
                    Arc::new(backend)
                }
            })
            .collect();
        for b in &backends {
            match &config.health_check {
                Some(h) => b.set_thresholds(h.rise, h.fall),
                // Without active checks nothing could ever mark it healthy again.
                None if b.health_state() != HealthState::Healthy => {
                    b.set_health_state(HealthState::Healthy)
                }
                None => {}
            }
        }
        if let Some(prev) = previous {
            let transport_changed =
                prev.config.protocol != config.protocol || prev.config.tls != config.tls;
            if transport_changed {
                // Pooled connections speak the old protocol or TLS settings: open new ones.
                backends.iter().for_each(|b| b.conns.clear());
            }
        }
        let tls = config.tls.as_ref().and_then(|t| {
            BackendTls::new(t, config.protocol)
                .map_err(|e| tracing::error!(pool = %config.name, error = %e, "cannot set up TLS to backends"))
                .ok()
        });
        let weights: Vec<u32> = config.backends.iter().map(|b| b.weight).collect();
        let ids: Vec<&str> = backends.iter().map(|b| &*b.label).collect();
        let selector = Selector::build(config.algorithm, &weights, &ids);
        let backup: Vec<bool> = config.backends.iter().map(|b| b.backup).collect();
        let fail_open = config.when_all_down == WhenAllDown::FailOpen;
        let tiers = (backup.contains(&true) || config.panic_threshold.is_some() || fail_open)
            .then_some(Tiers {
                backup,
                panic_threshold: config.panic_threshold,
                fail_open,
            });
        let limits = config.has_limits().then(|| {
            let queue = previous
                .and_then(|p| p.limits.as_ref().map(|(_, q)| Arc::clone(q)))
                .unwrap_or_default();
            let max: Vec<usize> = config
                .backends
                .iter()
                .map(|b| b.max_connections.map_or(usize::MAX, |m| m as usize))
                .collect();
            (max, queue)
        });
        for (i, b) in backends.iter().enumerate() {
            let queue = limits
                .as_ref()
                .filter(|(max, _)| max[i] != usize::MAX)
                .map(|(_, q)| Arc::clone(q));
            b.set_queue(queue);
        }
        let sticky_ids = match &config.sticky {
            Some(_) => backends
                .iter()
                .map(|b| sticky::id(&config.name, b.addr))
                .collect(),
            None => Vec::new(),
        };
        Pool {
            name: config.name.as_str().into(),
            config: config.clone(),
            backends,
            tls,
            stats: previous.map_or_else(Default::default, |p| Arc::clone(&p.stats)),
            latency: Latency::new(&config.name, metrics),
            retry_budget: config.retry_budget.map(|_| {
                previous
                    .and_then(|p| p.retry_budget.clone())
                    .unwrap_or_default()
            }),
            selector,
            tiers,
            limits,
            sticky_ids,
        }
    }

    /// The backend a sticky cookie's id names, if the pool has it.
    pub fn sticky_index(&self, id: u64) -> Option<usize> {
        self.sticky_ids.iter().position(|i| *i == id)
    }

    /// A lease on backend `i` (a sticky session's), if it may take the request now: not
    /// tried yet, healthy, not draining or ejected, and below its `max_connections`.
    /// Otherwise the request is balanced as any other.
    pub fn sticky_lease(&self, i: usize, tried: &[usize]) -> Option<(usize, Lease)> {
        let backend = self.backends.get(i)?;
        if tried.contains(&i) || backend.load_if_available().is_none() {
            return None;
        }
        let lease = match &self.limits {
            Some((max, _)) => Lease::within(backend, max[i])?,
            None => Lease::new(Arc::clone(backend)),
        };
        Some((i, lease))
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        self.config.hash_key.as_ref()
    }

    /// The pool's queue, when a backend has `max_connections`.
    pub fn queue(&self) -> Option<&queue::Queue> {
        self.limits.as_ref().map(|(_, q)| &**q)
    }

    /// Picks a backend for one request, skipping the indices in `tried`, and returns its index
    /// and a [`Lease`] on it; or why there is none.
    pub fn select(&self, key: Option<u64>, tried: &[usize]) -> Result<(usize, Lease), NoPick> {
        let bound = self.load_bound(key);
        let Some((max, _)) = &self.limits else {
            let i = match bound {
                None => self.pick_index(key, tried, |_| true),
                Some(bound) => self
                    .pick_index(key, tried, |i| self.backends[i].in_flight() < bound)
                    .or_else(|| self.pick_index(key, tried, |_| true)),
            }
            .ok_or(NoPick::Down)?;
            return Ok((i, Lease::new(Arc::clone(&self.backends[i]))));
        };
        let bound = bound.unwrap_or(usize::MAX);
        // A pick and its lease are two steps: another request may take the last slot in
        // between, and then the pick is made again.
        // The load bound is a preference (keys spill over only while their backend is over
        // it); the limit is not.
        for _ in 0..4 {
            let room = |i: usize| self.backends[i].in_flight() < max[i];
            let balanced = |i: usize| room(i) && self.backends[i].in_flight() < bound;
            let picked = self.pick_index(key, tried, balanced).or_else(|| {
                (bound != usize::MAX)
                    .then(|| self.pick_index(key, tried, room))
                    .flatten()
            });
            let Some(i) = picked else {
                break;
            };
            if let Some(lease) = Lease::within(&self.backends[i], max[i]) {
                return Ok((i, lease));
            }
        }
        match self.pick_index(key, tried, |_| true) {
            Some(_) => Err(NoPick::Full),
            None => Err(NoPick::Down),
        }
    }

    /// `hash_balance_factor` (consistent hashing with bounded loads, HAProxy's
    /// `hash-balance-factor`): the in-flight count a backend must be below to take one more
    /// keyed request, `ceil(factor% of (in flight + 1) / available backends)`. `None`
    /// without a factor or a key. Costs a pass over the backends, only in pools that set it.
    fn load_bound(&self, key: Option<u64>) -> Option<usize> {
        let factor = self.config.hash_balance_factor?;
        key?;
        let (busy, up) = self
            .backends
            .iter()
            .filter_map(|b| b.load_if_available())
            .fold((0usize, 0usize), |(busy, up), n| (busy + n, up + 1));
        let up = up.max(1) as u64;
        let scaled = (busy as u64 + 1) * u64::from(factor);
        Some(scaled.div_ceil(100 * up) as usize)
    }

    /// The policy's pick among the backends `admit` lets in.
    #[inline]
    fn pick_index(
        &self,
        key: Option<u64>,
        tried: &[usize],
        admit: impl Fn(usize) -> bool + Copy,
    ) -> Option<usize> {
        match &self.tiers {
            None => self
                .pick_available(key, tried, admit)
                .or_else(|| self.pick_with(key, tried, admit, Backend::load_ignoring_ejection)),
            Some(t) => self.pick_tiered(t, key, tried, admit),
        }
    }

    /// Primaries first; backups only while no primary is available; ejected ones (healthy
    /// by their checks) before none; then the panic threshold and `when_all_down`.
    fn pick_tiered(
        &self,
        t: &Tiers,
        key: Option<u64>,
        tried: &[usize],
        admit: impl Fn(usize) -> bool + Copy,
    ) -> Option<usize> {
        let primary = |i: usize| !t.backup[i] && admit(i);
        let backup = |i: usize| t.backup[i] && admit(i);
        if let Some(threshold) = t.panic_threshold {
            // Counting costs a pass over the backends: only pools that set a threshold pay.
            let (up, total) = self
                .backends
                .iter()
                .enumerate()
                .filter(|(i, _)| !t.backup[*i])
                .fold((0usize, 0usize), |(up, n), (_, b)| {
                    (up + usize::from(b.load_if_available().is_some()), n + 1)
                });
            let short = (up as f64) < threshold * total as f64;
            // With no primary up, an available backup is the better answer than panic.
            let backup_up = || {
                self.backends
                    .iter()
                    .enumerate()
                    .any(|(i, b)| t.backup[i] && b.load_if_available().is_some())
            };
            if short && (up > 0 || !backup_up()) {
                if let Some(i) = self.pick_with(key, tried, primary, Backend::load_if_not_draining)
                {
                    return Some(i);
                }
            }
        }
        self.pick_available(key, tried, primary)
            .or_else(|| self.pick_available(key, tried, backup))
            .or_else(|| self.pick_with(key, tried, primary, Backend::load_ignoring_ejection))
            .or_else(|| self.pick_with(key, tried, backup, Backend::load_ignoring_ejection))
            .or_else(|| {
                t.fail_open
                    .then(|| self.pick_with(key, tried, admit, Backend::load_if_not_draining))
                    .flatten()
            })
    }

    /// Among the backends `member` admits: ramping ones by their share first (slow start),
    /// then every available one. Without slow start (or when every ramping backend said no
    /// this time) the plain pass decides; a ramp never turns a pick into a 503.
    #[inline]
    fn pick_available(
        &self,
        key: Option<u64>,
        tried: &[usize],
        member: impl Fn(usize) -> bool + Copy,
    ) -> Option<usize> {
        let ramped = self.config.slow_start.and_then(|ramp| {
            self.selector.pick(key, |i| {
                let b = &self.backends[i];
                if !member(i) || tried.contains(&i) || !b.ramp_admits(ramp) {
                    None
                } else {
                    b.load_if_available()
                }
            })
        });
        ramped.or_else(|| self.pick_with(key, tried, member, Backend::load_if_available))
    }

    /// One pass of the policy over the backends `member` admits, by `avail`.
    #[inline]
    fn pick_with(
        &self,
        key: Option<u64>,
        tried: &[usize],
        member: impl Fn(usize) -> bool,
        avail: fn(&Backend) -> Option<usize>,
    ) -> Option<usize> {
        self.selector.pick(key, |i| {
            if !member(i) || tried.contains(&i) {
                None
            } else {
                avail(&self.backends[i])
            }
        })
    }
}
