//! Composition root: bind listeners, build the first snapshot, start health checks and
//! accept loops, then serve until a signal says reload or stop.
//!
//! Reloads go through [`Daemon::reload`], the single writer of [`Live`]: parse and
//! validate the whole file, build a new snapshot that reuses every backend it keeps, swap it
//! in atomically, then reconcile the health-check tasks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError};
use crate::health::HealthChecks;
use crate::listener;
use crate::state::{Live, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("listener {listener}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("changing {0} requires a restart")]
    NeedsRestart(&'static str),
}

/// The running daemon's shared control-plane state.
pub struct Daemon {
    pub live: Live,
    config_path: Option<PathBuf>,
    health: Mutex<HealthChecks>,
}

impl Daemon {
    /// Re-reads the config file and applies it live, or leaves everything as it is and
    /// returns why not. Returns whether anything changed.
    pub async fn reload(&self) -> Result<bool, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let config = Config::load(path)?;
        // Serialise reloads so two of them can't interleave build and store.
        let mut health = self.health.lock().await;
        let current = self.live.load_full();
        if *current.config == config {
            return Ok(false);
        }
        if current
            .config
            .listeners
            .iter()
            .map(|l| (&l.name, l.bind))
            .ne(config.listeners.iter().map(|l| (&l.name, l.bind)))
        {
            return Err(ReloadError::NeedsRestart("listeners"));
        }
        let next = Snapshot::build(Arc::new(config), Some(&current));
        // Backends that left the config drain: no new requests, in-flight ones finish.
        for pool in current.pools.values() {
            for b in &pool.backends {
                let kept = next
                    .pools
                    .get(&pool.name)
                    .is_some_and(|p| p.backends.iter().any(|n| Arc::ptr_eq(n, b)));
                if !kept {
                    b.set_draining(true);
                }
            }
        }
        tracing::info!(generation = next.generation, summary = %next.config.summary(), "config reloaded");
        let next = Arc::new(next);
        self.live.store(Arc::clone(&next));
        health.reconcile(&next);
        Ok(true)
    }
}

/// Runs the daemon until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn run(config: Config, config_path: Option<PathBuf>) -> Result<(), AppError> {
    let shutdown_timeout = config.global.shutdown_timeout;
    let snapshot = Arc::new(Snapshot::build(Arc::new(config), None));
    let live: Live = Arc::new(ArcSwap::new(Arc::clone(&snapshot)));

    let mut bound = Vec::new();
    for l in &snapshot.config.listeners {
        let sock = listener::bind(l.bind).map_err(|source| AppError::Bind {
            listener: l.name.clone(),
            addr: l.bind,
            source,
        })?;
        let addr = sock.local_addr().unwrap_or(l.bind);
        tracing::info!(listener = %l.name, addr = %addr, "listener bound");
        bound.push((sock, l.clone()));
    }

    let mut health = HealthChecks::default();
    let first_round = health.reconcile(&snapshot);
    // READY waits for the first probe of every backend, bounded by the longest timeout.
    let bound_wait = snapshot
        .config
        .pools
        .iter()
        .filter_map(|p| p.health_check.as_ref().map(|h| h.timeout + h.interval / 10))
        .max()
        .unwrap_or_default()
        + Duration::from_millis(100);
    let _ = tokio::time::timeout(bound_wait, async {
        for rx in first_round {
            let _ = rx.await;
        }
    })
    .await;

    let daemon = Arc::new(Daemon {
        live: Arc::clone(&live),
        config_path,
        health: Mutex::new(health),
    });

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    for (sock, cfg) in bound {
        tokio::spawn(listener::run(
            sock,
            cfg,
            Arc::clone(&live),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    tokio::spawn(evict_idle_connections(Arc::clone(&live), shutdown.clone()));
    tracing::info!(summary = %snapshot.config.summary(), "ballast is ready");

    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match daemon.reload().await {
                Ok(true) => {}
                Ok(false) => tracing::info!("reload: configuration unchanged"),
                Err(e) => tracing::error!("reload rejected, keeping the running config:\n{e}"),
            },
        }
    }

    tracing::info!(timeout = ?shutdown_timeout, "shutting down: finishing in-flight requests");
    shutdown.cancel();
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(open = tracker.len(), "shutdown timeout reached, closing remaining connections")
        }
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    daemon.health.lock().await.stop_all();
    Ok(())
}

/// Closes idle upstream connections that outlived their pool's idle timeout.
async fn evict_idle_connections(live: Live, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = live.load_full();
        for pool in snap.pools.values() {
            for b in &pool.backends {
                b.conns.evict_expired(pool.config.idle_timeout);
            }
        }
    }
}
