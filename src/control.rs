//! The control plane: reloads, listener reconciliation, drains and shutdown state.
//!
//! [`Daemon::reload`] is the single writer of [`Live`]: it parses and validates the whole
//! file, binds any new listener, builds a new snapshot that reuses every backend it keeps,
//! swaps it in atomically, then reconciles health checks and accept loops. If any step
//! before the swap fails, nothing changes. Admin requests, SIGHUP and file edits all come
//! through here; one reload runs at a time.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::backend::Backend;
use crate::config::{Config, ConfigError, ListenerConfig};
use crate::handover::Inherited;
use crate::health::HealthChecks;
use crate::state::{Live, Snapshot};
use crate::{listener, systemd};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    Bind(#[from] BindError),
}

/// A listening socket could not be bound (or adopted).
#[derive(Debug, thiserror::Error)]
#[error("listener {listener}: cannot bind {addr}: {source}")]
pub struct BindError {
    pub listener: String,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// What the last reload did, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub applied: u64,
    pub rejected: u64,
    pub last: Option<LastReload>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReload {
    /// `applied`, `unchanged` or `rejected`.
    pub result: &'static str,
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub error: Option<String>,
}

/// An accept loop and the socket it serves.
struct RunningListener {
    config: ListenerConfig,
    socket: Arc<TcpListener>,
    accept: CancellationToken,
    conns: CancellationToken,
}

/// What only the control plane touches; one reload at a time holds it.
struct Control {
    health: HealthChecks,
    listeners: HashMap<String, RunningListener>,
}

/// The running daemon's control plane: the single writer of [`Live`], the owner of accept
/// loops, health checks and drain timers.
pub struct Daemon {
    pub live: Live,
    config_path: Option<PathBuf>,
    control: Mutex<Control>,
    reload_status: std::sync::Mutex<ReloadStatus>,
    shutting_down: AtomicBool,
    /// Parent of every listener's tokens: fires on shutdown.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The admin socket, kept so it can be handed to a successor.
    admin_socket: Option<Arc<TcpListener>>,
}

impl Daemon {
    /// A daemon serving `live`, with `health` checks already started. No listener runs
    /// until [`Daemon::start_listeners`].
    pub fn new(
        live: Live,
        config_path: Option<PathBuf>,
        health: HealthChecks,
        admin_socket: Option<Arc<TcpListener>>,
    ) -> Daemon {
        Daemon {
            live,
            config_path,
            control: Mutex::new(Control {
                health,
                listeners: HashMap::new(),
            }),
            reload_status: Default::default(),
            shutting_down: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            admin_socket,
        }
    }

    /// Starts an accept loop on each of `sockets` (listener name → bound socket).
    pub async fn start_listeners(
        &self,
        snap: &Snapshot,
        sockets: HashMap<String, Arc<TcpListener>>,
    ) {
        let mut control = self.control.lock().await;
        self.reconcile_listeners(&mut control, snap, sockets);
    }

    /// Fires when shutdown begins.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Every socket a successor needs, by name: the listeners and the admin socket.
    pub async fn handover_sockets(&self) -> Vec<(String, Arc<TcpListener>)> {
        let control = self.control.lock().await;
        let mut sockets: Vec<(String, Arc<TcpListener>)> = control
            .listeners
            .iter()
            .map(|(n, r)| (n.clone(), Arc::clone(&r.socket)))
            .collect();
        if let Some(admin) = &self.admin_socket {
            sockets.push(("admin".into(), Arc::clone(admin)));
        }
        sockets
    }

    /// Starts a graceful shutdown: `/ready` turns 503, accept loops stop and the listening
    /// sockets close (new connections are refused), open connections finish their current
    /// request with `Connection: close`.
    pub async fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.shutdown.cancel();
        self.control.lock().await.listeners.clear();
        self.tracker.close();
    }

    /// Resolves when every downstream connection has closed (after [`Self::begin_shutdown`]).
    pub async fn drained(&self) {
        self.tracker.wait().await
    }

    pub fn open_connections(&self) -> usize {
        self.tracker.len()
    }

    pub async fn stop_health_checks(&self) {
        self.control.lock().await.health.stop_all();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.reload_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the config file and applies it live, or keeps everything as it is and
    /// says why. Brackets the work with sd_notify RELOADING/READY and records the outcome.
    pub async fn reload(&self) -> Result<bool, ReloadError> {
        systemd::reloading();
        let result = self.apply_file().await;
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        {
            let mut st = self.reload_status.lock().unwrap_or_else(|p| p.into_inner());
            let (outcome, error) = match &result {
                Ok(true) => ("applied", None),
                Ok(false) => ("unchanged", None),
                Err(e) => ("rejected", Some(e.to_string())),
            };
            if result.is_ok() {
                st.applied += 1;
            } else {
                st.rejected += 1;
            }
            st.last = Some(LastReload {
                result: outcome,
                at,
                error,
            });
        }
        match &result {
            Ok(true) => {}
            Ok(false) => tracing::debug!("reload: configuration unchanged"),
            Err(e) => tracing::error!("reload rejected, keeping the running config: {e}"),
        }
        let generation = self.live.load().generation;
        systemd::ready(&format!("serving config generation {generation}"));
        result
    }

    async fn apply_file(&self) -> Result<bool, ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let config = Config::load(path)?;
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        let mut control = self.control.lock().await;
        let current = self.live.load_full();
        if *current.config == config {
            return Ok(false);
        }
        if current.config.admin != config.admin {
            tracing::warn!("admin settings changed: restart ballast to apply them");
        }
        // Bind new sockets first: if one fails, nothing has changed yet.
        let mut new_sockets = HashMap::new();
        for l in &config.listeners {
            let same_socket = control
                .listeners
                .get(&l.name)
                .is_some_and(|r| r.config.bind == l.bind);
            if !same_socket {
                new_sockets.insert(l.name.clone(), Arc::new(bind(l)?));
            }
        }

        let next = Arc::new(Snapshot::build(Arc::new(config), Some(&current)));
        let changes = describe_changes(&current, &next);
        // Backends that left the config drain: no new requests, in-flight ones finish.
        for pool in current.pools.values() {
            for b in &pool.backends {
                let kept = next
                    .pools
                    .get(&pool.name)
                    .is_some_and(|p| p.backends.iter().any(|n| Arc::ptr_eq(n, b)));
                if !kept {
                    b.set_draining(true);
                    spawn_drain(
                        Arc::clone(&pool.name),
                        Arc::clone(b),
                        pool.config.drain_timeout,
                    );
                }
            }
        }
        self.live.store(Arc::clone(&next));
        control.health.reconcile(&next);
        self.reconcile_listeners(&mut control, &next, new_sockets);
        tracing::info!(generation = next.generation, changes = %changes, "config reloaded");
        Ok(true)
    }

    /// Starts, restarts and stops accept loops to match `snap`.
    fn reconcile_listeners(
        &self,
        control: &mut Control,
        snap: &Snapshot,
        mut new_sockets: HashMap<String, Arc<TcpListener>>,
    ) {
        let wanted: BTreeSet<&str> = snap
            .config
            .listeners
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        control.listeners.retain(|name, running| {
            let keep = wanted.contains(name.as_str()) && !new_sockets.contains_key(name);
            if !keep {
                tracing::info!(listener = %name, "listener removed: closing and draining its connections");
                running.accept.cancel();
                running.conns.cancel();
            }
            keep
        });
        for l in &snap.config.listeners {
            match control.listeners.get_mut(&l.name) {
                Some(running) if running.config == *l => {}
                Some(running) => {
                    // Same socket, new settings: a new accept loop takes over, existing
                    // connections keep going.
                    running.accept.cancel();
                    running.accept = self.shutdown.child_token();
                    running.config = l.clone();
                    self.spawn_listener(running);
                }
                None => {
                    let Some(socket) = new_sockets.remove(&l.name) else {
                        continue;
                    };
                    let running = RunningListener {
                        config: l.clone(),
                        socket,
                        accept: self.shutdown.child_token(),
                        conns: self.shutdown.child_token(),
                    };
                    self.spawn_listener(&running);
                    control.listeners.insert(l.name.clone(), running);
                }
            }
        }
    }

    fn spawn_listener(&self, r: &RunningListener) {
        tokio::spawn(listener::run(
            Arc::clone(&r.socket),
            r.config.clone(),
            Arc::clone(&self.live),
            r.accept.clone(),
            r.conns.clone(),
            self.tracker.clone(),
        ));
    }

    /// Drains (or re-enables) one backend by pool name and address as written in the
    /// config. A drained backend stays drained across reloads until enabled or removed.
    pub fn set_draining(&self, pool: &str, address: &str, draining: bool) -> Result<(), String> {
        let snap = self.live.load_full();
        let p = snap
            .pools
            .get(pool)
            .ok_or_else(|| format!("no pool {pool:?}"))?;
        let b = p
            .backends
            .iter()
            .find(|b| &*b.label == address || address.parse::<SocketAddr>().ok() == Some(b.addr))
            .ok_or_else(|| format!("no backend {address:?} in pool {pool:?}"))?;
        if draining == b.is_draining() {
            return Ok(());
        }
        b.set_draining(draining);
        if draining {
            tracing::info!(pool = %pool, backend = %b.label, "backend draining (admin)");
            spawn_drain(Arc::clone(&p.name), Arc::clone(b), p.config.drain_timeout);
        } else {
            tracing::info!(pool = %pool, backend = %b.label, "backend enabled (admin)");
        }
        Ok(())
    }
}

fn bind(l: &ListenerConfig) -> Result<TcpListener, BindError> {
    bind_named(&l.name, l.bind, &mut Inherited::default())
}

/// Binds `addr` for listener `name`, or adopts the socket a predecessor or systemd passed.
pub fn bind_named(
    name: &str,
    addr: SocketAddr,
    inherited: &mut Inherited,
) -> Result<TcpListener, BindError> {
    let err = |source| BindError {
        listener: name.to_string(),
        addr,
        source,
    };
    let (sock, adopted) = match inherited.take(name, addr) {
        Some(std) => {
            // Sockets from systemd arrive in blocking mode; tokio needs non-blocking.
            std.set_nonblocking(true).map_err(err)?;
            (TcpListener::from_std(std).map_err(err)?, true)
        }
        None => (listener::bind(addr).map_err(err)?, false),
    };
    let local = sock.local_addr().unwrap_or(addr);
    tracing::info!(listener = %name, addr = %local, inherited = adopted, "listener bound");
    Ok(sock)
}

/// Waits for a draining backend's in-flight work to finish; after `timeout` cuts what is
/// left. Stops early if the backend is enabled again.
fn spawn_drain(pool: Arc<str>, backend: Arc<Backend>, timeout: Duration) {
    tokio::spawn(async move {
        let deadline = Instant::now() + timeout;
        while backend.is_draining() && backend.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !backend.is_draining() {
            return;
        }
        let left = backend.in_flight();
        if left > 0 {
            tracing::warn!(pool = %pool, backend = %backend.label, in_flight = left, timeout = ?timeout, "drain timeout: cutting remaining connections");
            backend.cut_connections();
        } else {
            tracing::info!(pool = %pool, backend = %backend.label, "backend drained");
            backend.conns.clear();
        }
    });
}

/// One line: pools and backends added, removed, changed.
fn describe_changes(old: &Snapshot, new: &Snapshot) -> String {
    let mut parts = Vec::new();
    for (name, pool) in &new.pools {
        match old.pools.get(name) {
            None => parts.push(format!("+pool {name}")),
            Some(o) => {
                for b in &pool.backends {
                    if !o.backends.iter().any(|x| x.addr == b.addr) {
                        parts.push(format!("+{name}/{}", b.label));
                    }
                }
                for b in &o.backends {
                    if !pool.backends.iter().any(|x| x.addr == b.addr) {
                        parts.push(format!("-{name}/{}", b.label));
                    }
                }
                let settings_changed = {
                    let (mut a, mut b) = (o.config.clone(), pool.config.clone());
                    a.backends.iter_mut().for_each(|x| x.weight = 0);
                    b.backends.iter_mut().for_each(|x| x.weight = 0);
                    a.backends.sort_by_key(|x| x.address);
                    b.backends.sort_by_key(|x| x.address);
                    a != b
                };
                let weights_changed = pool.config.backends.iter().any(|nb| {
                    o.config
                        .backends
                        .iter()
                        .any(|ob| ob.address == nb.address && ob.weight != nb.weight)
                });
                if settings_changed || weights_changed {
                    parts.push(format!("~pool {name}"));
                }
            }
        }
    }
    for name in old.pools.keys() {
        if !new.pools.contains_key(name) {
            parts.push(format!("-pool {name}"));
        }
    }
    for l in &new.config.listeners {
        match old.config.listeners.iter().find(|o| o.name == l.name) {
            None => parts.push(format!("+listener {}", l.name)),
            Some(o) if o != l => parts.push(format!("~listener {}", l.name)),
            Some(_) => {}
        }
    }
    for l in &old.config.listeners {
        if !new.config.listeners.iter().any(|n| n.name == l.name) {
            parts.push(format!("-listener {}", l.name));
        }
    }
    parts.sort();
    if parts.is_empty() {
        "settings only".into()
    } else {
        parts.join(" ")
    }
}
