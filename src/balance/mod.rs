//! Pools: named sets of backends with a selection policy, built once per config generation.
//!
//! `policy` holds the pure pick functions, `backend` the per-address live state. A [`Pool`]
//! is immutable once built; a reload builds a new one that reuses the `Arc<Backend>` of every
//! address it keeps.

pub mod backend;
pub mod policy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{HashKey, PoolConfig};
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
    selector: Selector,
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
        Pool {
            name: config.name.as_str().into(),
            config: config.clone(),
            backends,
            tls,
            stats: previous.map_or_else(Default::default, |p| Arc::clone(&p.stats)),
            latency: Latency::new(&config.name, metrics),
            selector,
        }
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        self.config.hash_key.as_ref()
    }

    /// Picks a backend for one request, skipping the indices in `tried`, and returns its index
    /// and a [`Lease`] on it.
    pub fn select(&self, key: Option<u64>, tried: &[usize]) -> Option<(usize, Lease)> {
        let pick = |avail: fn(&Backend) -> Option<usize>| {
            self.selector.pick(key, |i| {
                if tried.contains(&i) {
                    None
                } else {
                    avail(&self.backends[i])
                }
            })
        };
        let ramped = self.config.slow_start.and_then(|ramp| {
            self.selector.pick(key, |i| {
                let b = &self.backends[i];
                if tried.contains(&i) || !b.ramp_admits(ramp) {
                    None
                } else {
                    b.load_if_available()
                }
            })
        });
        // Without slow start (or when every ramping backend said no this time) the plain
        // passes decide; a ramp never turns a pick into a 503.
        let i = ramped
            .or_else(|| pick(Backend::load_if_available))
            .or_else(|| pick(Backend::load_ignoring_ejection))?;
        Some((i, Lease::new(Arc::clone(&self.backends[i]))))
    }
}
