//! The one thing the data path reads: an immutable [`Snapshot`] of a config generation,
//! behind a single `ArcSwap` ([`Live`]).
//!
//! A request loads the snapshot once and uses it to the end, so it sees one consistent
//! config even if a reload swaps in another meanwhile. Only the reload path stores.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access_log::AccessLog;
use crate::balance::Pool;
use crate::config::Config;
use crate::discovery::{NameKey, Resolved};
use crate::routing::Router;

pub type Live = Arc<ArcSwap<Snapshot>>;

#[derive(Debug)]
pub struct Snapshot {
    /// 1 for the config loaded at startup, +1 per applied reload.
    pub generation: u64,
    pub config: Arc<Config>,
    pub pools: HashMap<Arc<str>, Arc<Pool>>,
    /// Routing table per listener name.
    pub routers: HashMap<Arc<str>, Router>,
    /// The access log's writer, when the config has one (kept across reloads that leave
    /// `[access_log]` as it is).
    pub access_log: Option<AccessLog>,
}

impl Snapshot {
    /// What [`Live`] holds before the first config is applied: nothing to serve.
    pub fn empty() -> Snapshot {
        Snapshot {
            generation: 0,
            config: Arc::new(Config::empty()),
            pools: HashMap::new(),
            routers: HashMap::new(),
            access_log: None,
        }
    }

    /// Builds the snapshot for `config`, with the addresses DNS gave each named backend.
    /// Backends of `previous` are reused by (pool, address) so their state survives (see
    /// `Pool::build`). During `startup` new backends start healthy (the first probe round
    /// runs before listeners open); afterwards they wait for their first passing check.
    pub fn build(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        resolved: &Resolved,
        startup: bool,
        access_log: Option<AccessLog>,
    ) -> Snapshot {
        let metrics = config.admin.as_ref().is_some_and(|a| a.metrics);
        let pools: HashMap<Arc<str>, Arc<Pool>> = config
            .pools
            .iter()
            .map(|pc| {
                let old = previous.and_then(|s| s.pools.get(pc.name.as_str()));
                let pc = pc
                    .with_resolved(|n| resolved.get(&NameKey::new(&pc.name, n)).map(Vec::as_slice));
                let pool = Pool::build(&pc, old.map(|p| &**p), startup, metrics);
                (Arc::clone(&pool.name), Arc::new(pool))
            })
            .collect();
        let routers = config
            .listeners
            .iter()
            .filter_map(|l| {
                let old = previous.and_then(|p| p.routers.get(l.name.as_str()));
                Some((l.name.as_str().into(), Router::build(l, &pools, old)?))
            })
            .collect();
        Snapshot {
            generation: previous.map_or(1, |p| p.generation + 1),
            config,
            pools,
            routers,
            access_log,
        }
    }
}

impl Snapshot {
    /// Closes idle upstream connections that outlived their pool's idle timeout.
    pub fn evict_idle_connections(&self) {
        for pool in self.pools.values() {
            for b in &pool.backends {
                b.conns.evict_expired(pool.config.idle_timeout);
            }
        }
    }
}
