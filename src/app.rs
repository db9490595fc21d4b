//! Composition root and control plane: bind listeners, build the first snapshot, start
//! health checks and accept loops, then apply reloads and drains until a signal says stop.
//!
//! [`Daemon::reload`] is the single writer of [`Live`]: it parses and validates the whole
//! file, binds any new listener, builds a new snapshot that reuses every backend it keeps,
//! swaps it in atomically, then reconciles health checks and accept loops. If any step
//! before the swap fails, nothing changes.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::backend::Backend;
use crate::config::{Config, ConfigError, ListenerConfig};
use crate::handover::{self, Inherited};
use crate::health::HealthChecks;
use crate::state::{Live, Snapshot};
use crate::{admin, listener, systemd};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("listener {listener}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
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
    #[error("{0}")]
    Bind(#[from] AppError),
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

/// The running daemon's shared control-plane state.
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

fn bind(l: &ListenerConfig) -> Result<TcpListener, AppError> {
    bind_named(&l.name, l.bind, &mut Inherited::default())
}

/// Binds `addr` for listener `name`, or adopts the socket a predecessor or systemd passed.
fn bind_named(
    name: &str,
    addr: SocketAddr,
    inherited: &mut Inherited,
) -> Result<TcpListener, AppError> {
    let err = |source| AppError::Bind {
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

/// Runs the daemon until SIGTERM or SIGINT (or until a successor took over), then shuts
/// down gracefully. With `upgrade`, the listening sockets are taken over from the process
/// serving `global.handover_socket`, which then drains and exits.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    upgrade: bool,
) -> Result<(), AppError> {
    let shutdown_timeout = config.global.shutdown_timeout;
    let snapshot = Arc::new(Snapshot::build(Arc::new(config), None));
    let live: Live = Arc::new(ArcSwap::new(Arc::clone(&snapshot)));

    // Signals first, so a SIGHUP or SIGTERM during startup is not the default (fatal) one.
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;

    let mut inherited = Inherited::from_systemd();
    let mut predecessor = None;
    if upgrade {
        match snapshot.config.global.handover_socket.clone() {
            Some(path) => match tokio::task::spawn_blocking(move || handover::request(&path)).await
            {
                Ok(Ok((sockets, conn))) => {
                    inherited = sockets;
                    predecessor = Some(conn);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "upgrade: no running ballast handed over its sockets; binding fresh")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade: hand-over task failed; binding fresh")
                }
            },
            None => tracing::warn!("upgrade: global.handover_socket is not set; binding fresh"),
        }
    }
    let mut sockets = HashMap::new();
    for l in &snapshot.config.listeners {
        sockets.insert(
            l.name.clone(),
            Arc::new(bind_named(&l.name, l.bind, &mut inherited)?),
        );
    }
    let admin_socket = match &snapshot.config.admin {
        Some(a) => Some(Arc::new(bind_named("admin", a.bind, &mut inherited)?)),
        None => None,
    };

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

    let shutdown = CancellationToken::new();
    let daemon = Arc::new(Daemon {
        live: Arc::clone(&live),
        config_path: config_path.clone(),
        control: Mutex::new(Control {
            health,
            listeners: HashMap::new(),
        }),
        reload_status: Default::default(),
        shutting_down: AtomicBool::new(false),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        admin_socket: admin_socket.clone(),
    });
    {
        let mut control = daemon.control.lock().await;
        daemon.reconcile_listeners(&mut control, &snapshot, sockets);
    }
    let admin_stop = CancellationToken::new();
    if let (Some(sock), Some(a)) = (admin_socket, &snapshot.config.admin) {
        tokio::spawn(admin::run(
            sock,
            a.token.clone(),
            Arc::clone(&daemon),
            admin_stop.clone(),
        ));
    }
    tokio::spawn(evict_idle_connections(Arc::clone(&live), shutdown.clone()));
    if let Some(every) = systemd::watchdog_interval() {
        tokio::spawn(systemd::watchdog(every));
    }
    // Kept alive for the life of the daemon; dropping it stops the watch.
    let mut file_events = match config_path.as_deref().map(crate::config::watch::watch) {
        Some(Ok((watcher, rx))) => Some((watcher, rx)),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP or the admin API");
            None
        }
        None => None,
    };
    tracing::info!(summary = %snapshot.config.summary(), "ballast is ready");
    systemd::ready(&format!("serving: {}", snapshot.config.summary()));
    if let Some(conn) = predecessor {
        match tokio::task::spawn_blocking(move || handover::signal_ready(conn)).await {
            Ok(Ok(())) => tracing::info!(
                "upgrade complete: the previous process stopped accepting and is draining"
            ),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "upgrade: could not signal the previous process")
            }
            Err(e) => tracing::warn!(error = %e, "upgrade: hand-over task failed"),
        }
    }
    let (handover_tx, mut handover_rx) = tokio::sync::mpsc::channel(1);
    if let Some(path) = &snapshot.config.global.handover_socket {
        match handover_listener(path) {
            Ok(l) => {
                tokio::spawn(serve_handover(l, Arc::clone(&daemon), handover_tx));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot listen for hand-over; upgrades will bind fresh")
            }
        }
    }

    let mut successor: Option<std::os::unix::net::UnixStream> = None;
    loop {
        let file_changed = async {
            match file_events.as_mut() {
                Some((_, rx)) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => { let _ = daemon.reload().await; }
            Some(()) = file_changed => { let _ = daemon.reload().await; }
            Some(conn) = handover_rx.recv() => {
                tracing::info!("a successor took over the listening sockets: draining and exiting");
                successor = Some(conn);
                admin_stop.cancel();
                break;
            }
        }
    }

    daemon.shutting_down.store(true, Ordering::Relaxed);
    systemd::stopping();
    tracing::info!(timeout = ?shutdown_timeout, "shutting down: finishing in-flight requests");
    shutdown.cancel();
    // Close the listening sockets so new connections are refused, not left in the backlog.
    daemon.control.lock().await.listeners.clear();
    // The accept loops have been told to stop; closing this tells the successor so.
    drop(successor);
    daemon.tracker.close();
    tokio::select! {
        _ = daemon.tracker.wait() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(open = daemon.tracker.len(), "shutdown timeout reached, closing remaining connections")
        }
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    daemon.control.lock().await.health.stop_all();
    Ok(())
}

/// Binds the hand-over socket, replacing a stale file (or a predecessor's, which no longer
/// needs it once it handed over).
fn handover_listener(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Whoever can connect can take the sockets and stop this process: owner only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers hand-over requests: sends the current listening sockets and, once the successor
/// says it is ready, passes the connection to the main loop, which shuts this process down.
async fn serve_handover(
    listener: tokio::net::UnixListener,
    daemon: Arc<Daemon>,
    done: tokio::sync::mpsc::Sender<std::os::unix::net::UnixStream>,
) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let Ok(conn) = conn
            .into_std()
            .and_then(|c| c.set_nonblocking(false).map(|()| c))
        else {
            continue;
        };
        let mut sockets: Vec<(String, Arc<TcpListener>)> = {
            let control = daemon.control.lock().await;
            control
                .listeners
                .iter()
                .map(|(n, r)| (n.clone(), Arc::clone(&r.socket)))
                .collect()
        };
        if let Some(admin) = &daemon.admin_socket {
            sockets.push(("admin".into(), Arc::clone(admin)));
        }
        tracing::info!(
            sockets = sockets.len(),
            "hand-over requested: sending listening sockets"
        );
        match tokio::task::spawn_blocking(move || handover::serve_one(conn, &sockets)).await {
            Ok(Ok(Some(conn))) => {
                let _ = done.send(conn).await;
                return;
            }
            Ok(Ok(None)) => tracing::warn!(
                "hand-over: the successor went away before it was ready; still serving"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "hand-over failed; still serving"),
            Err(e) => tracing::warn!(error = %e, "hand-over task failed; still serving"),
        }
    }
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
