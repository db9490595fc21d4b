//! The control plane: startup, reloads, DNS updates, listener reconciliation, drains and
//! shutdown state.
//!
//! [`Daemon`] is the single writer of [`Live`]. Every change goes through one sequence
//! (`Daemon::commit`): bind the sockets of new listeners, build a snapshot that reuses every
//! backend it keeps, store it atomically, drain the backends that left, reconcile health
//! checks, then accept loops and DNS discovery. Startup is the same sequence with no
//! previous snapshot and the inherited sockets. If a step before the store fails, nothing
//! changes. Four inputs feed it, one at a time: the file watch, SIGHUP, the admin API and
//! DNS discovery ([`Daemon::apply_discovery`]).

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

use crate::access_log::AccessLog;
use crate::balance::backend::Backend;
use crate::config::{Config, ConfigError, ListenerConfig};
use crate::discovery::{Discovery, Resolved, Update};
use crate::handover::Inherited;
use crate::health::HealthChecks;
use crate::listener::{bind_named, BindError};
use crate::state::{Live, Snapshot};
use crate::{listener, systemd};

/// Listening sockets a config needs that are not open yet, by listener name.
type NewSockets = HashMap<String, Arc<TcpListener>>;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to reload from")]
    NoFile,
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("{0}")]
    Bind(#[from] BindError),
    #[error("access_log.path: cannot open {path}: {error}")]
    AccessLog { path: String, error: std::io::Error },
}

/// What the last reload did, for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub applied: u64,
    pub rejected: u64,
    pub last: Option<LastReload>,
    /// When a reload last succeeded (applied or unchanged), seconds since the Unix epoch.
    pub last_success_at: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReload {
    /// `applied`, `unchanged` or `rejected`.
    pub result: &'static str,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The generation served after it.
    pub generation: u64,
    pub error: Option<String>,
}

/// An accept loop and the socket it serves.
struct RunningListener {
    config: ListenerConfig,
    socket: Arc<TcpListener>,
    accept: CancellationToken,
    conns: CancellationToken,
}

/// What only the control plane touches; one change at a time holds it.
struct Control {
    health: HealthChecks,
    listeners: HashMap<String, RunningListener>,
    discovery: Discovery,
    /// The addresses DNS last gave each named backend; part of every snapshot build.
    resolved: Resolved,
    /// Sockets bound during startup, served once startup ends ([`Daemon::started`]):
    /// meanwhile connections wait in the kernel's accept queue instead of meeting a pool
    /// whose names are not resolved yet.
    startup_sockets: HashMap<String, Arc<TcpListener>>,
    /// Certificates ordered from an ACME CA (`[tls.acme]`), one task each.
    acme: crate::acme::Manager,
}

/// The running daemon's control plane: the single writer of [`Live`], the owner of accept
/// loops, health checks and drain timers.
pub struct Daemon {
    pub live: Live,
    config_path: Option<PathBuf>,
    control: Mutex<Control>,
    reload_status: std::sync::Mutex<ReloadStatus>,
    shutting_down: AtomicBool,
    /// See [`Daemon::enter_lame_duck`].
    lame_duck: AtomicBool,
    /// Until [`Daemon::started`]: changes are part of startup (new backends start healthy
    /// and their first probes are awaited), so names resolved while starting count as if
    /// they had been written in the file.
    starting: AtomicBool,
    /// Parent of every listener's tokens: fires on shutdown.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// The admin socket, kept so it can be handed to a successor.
    admin_socket: Option<Arc<TcpListener>>,
    started_at: SystemTime,
}

impl Daemon {
    /// A daemon that serves nothing yet; [`Daemon::start`] applies the first config. DNS
    /// updates arrive on the returned receiver: pass each to [`Daemon::apply_discovery`].
    pub fn new(
        config_path: Option<PathBuf>,
        admin_socket: Option<Arc<TcpListener>>,
    ) -> (Daemon, tokio::sync::mpsc::Receiver<Update>) {
        let (discovery, updates) = Discovery::new();
        let daemon = Daemon {
            live: Arc::new(arc_swap::ArcSwap::from_pointee(Snapshot::empty())),
            config_path,
            control: Mutex::new(Control {
                health: HealthChecks::default(),
                listeners: HashMap::new(),
                discovery,
                resolved: Resolved::new(),
                startup_sockets: HashMap::new(),
                acme: crate::acme::Manager::default(),
            }),
            reload_status: Default::default(),
            shutting_down: AtomicBool::new(false),
            lame_duck: AtomicBool::new(false),
            starting: AtomicBool::new(true),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            admin_socket,
            started_at: SystemTime::now(),
        };
        (daemon, updates)
    }

    /// Applies the first config: the reload sequence with no previous snapshot, adopting
    /// `inherited` sockets where they match. Returns once the first health probes answered
    /// (bounded by the longest probe timeout); the listeners are bound (connections queue)
    /// and start accepting at [`Daemon::started`].
    pub async fn start(
        &self,
        config: Config,
        inherited: &mut Inherited,
    ) -> Result<(), ReloadError> {
        let mut control = self.control.lock().await;
        self.apply(&mut control, config, inherited)
            .await
            .map(|_| ())
    }

    /// Ends startup: the listeners start accepting, and from now on new backends wait for
    /// their first passing check.
    pub async fn started(&self) {
        let mut control = self.control.lock().await;
        self.starting.store(false, Ordering::Relaxed);
        let sockets = std::mem::take(&mut control.startup_sockets);
        let snap = self.live.load_full();
        self.reconcile_listeners(&mut control, &snap, sockets);
    }

    /// How many named backends have had no DNS answer yet (startup waits a little for them).
    pub async fn unresolved_names(&self) -> usize {
        let control = self.control.lock().await;
        let snap = self.live.load();
        snap.config
            .pools
            .iter()
            .flat_map(|p| {
                p.names
                    .iter()
                    .map(move |n| crate::discovery::NameKey::new(&p.name, n))
            })
            .filter(|k| !control.resolved.contains_key(k))
            .count()
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

    /// When this process started (the daemon was created).
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    pub fn open_connections(&self) -> usize {
        self.tracker.len()
    }

    /// Stops health checks and DNS discovery (at the very end of a shutdown).
    pub async fn stop_background_tasks(&self) {
        let mut control = self.control.lock().await;
        control.health.stop_all();
        control.discovery.stop_all();
        control.acme.stop_all();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Lame duck: `/ready` answers 503 from now on while everything keeps serving, so that
    /// an orchestrator takes this instance out of rotation before it sends SIGTERM
    /// (Kubernetes' preStop hook). There is no way back short of a restart.
    pub fn enter_lame_duck(&self) {
        if !self.lame_duck.swap(true, Ordering::Relaxed) {
            tracing::info!("lame duck: /ready answers 503, traffic is still served until SIGTERM");
        }
    }

    /// Whether `/ready` should answer 200.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down() && !self.lame_duck.load(Ordering::Relaxed)
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
                st.last_success_at = Some(at);
            } else {
                st.rejected += 1;
            }
            st.last = Some(LastReload {
                result: outcome,
                at,
                generation: self.live.load().generation,
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
        self.apply(&mut control, config, &mut Inherited::default())
            .await
    }

    /// "Pool P's name N now has addresses X", from DNS discovery: applied like a file edit
    /// (same build, same backend reuse, same draining), with the file's config unchanged.
    pub async fn apply_discovery(&self, update: Update) {
        let mut control = self.control.lock().await;
        // An update from a task that a reload has since stopped describes a name that is no
        // longer in the config.
        if !control.discovery.is_current(&update.key)
            || control.resolved.get(&update.key) == Some(&update.addrs)
        {
            return;
        }
        let (pool, host) = (update.key.pool.clone(), update.key.host.clone());
        control.resolved.insert(update.key, update.addrs);
        let current = self.live.load_full();
        let (config, log) = (Arc::clone(&current.config), current.access_log.clone());
        drop(current);
        let next = self.commit(&mut control, config, HashMap::new(), log).await;
        tracing::info!(generation = next.0, pool = %pool, name = %host, changes = %next.1, "DNS changed the backends");
    }

    /// Applies `config` unless it is what runs already. The first call (generation 0)
    /// is startup.
    async fn apply(
        &self,
        control: &mut Control,
        config: Config,
        inherited: &mut Inherited,
    ) -> Result<bool, ReloadError> {
        let current = self.live.load_full();
        let startup = current.generation == 0;
        if !startup {
            if *current.config == config {
                return Ok(false);
            }
            // The token is read per request, so a new one applies at once; the socket and
            // the metrics recorder are set up once.
            let (was, now) = (&current.config.admin, &config.admin);
            if was.as_ref().map(|a| (a.bind, a.metrics))
                != now.as_ref().map(|a| (a.bind, a.metrics))
            {
                tracing::warn!("admin settings changed: restart ballast to apply them");
            }
        }
        // The log format and level first, so that this reload's own lines (listeners bound,
        // the summary) are written the new way; a rejected config puts the old ones back.
        crate::logging::apply(&config.log);
        let prepared = Self::prepare(control, &config, &current, inherited);
        let (new_sockets, access_log) = match prepared {
            Ok(p) => p,
            Err(e) => {
                crate::logging::apply(&current.config.log);
                return Err(e);
            }
        };
        let (generation, changes) = self
            .commit(control, Arc::new(config), new_sockets, access_log)
            .await;
        if !startup {
            tracing::info!(generation, changes = %changes, "config reloaded");
        }
        Ok(true)
    }

    /// What `config` needs that can fail, before anything changes: its new listening
    /// sockets and its access log writer.
    fn prepare(
        control: &Control,
        config: &Config,
        current: &Snapshot,
        inherited: &mut Inherited,
    ) -> Result<(NewSockets, Option<AccessLog>), ReloadError> {
        // Bind new sockets first: if one fails, nothing has changed yet.
        let mut new_sockets = HashMap::new();
        for l in &config.listeners {
            let same_socket = control
                .listeners
                .get(&l.name)
                .is_some_and(|r| r.config.bind == l.bind);
            if !same_socket {
                new_sockets.insert(
                    l.name.clone(),
                    Arc::new(bind_named(&l.name, l.bind, inherited)?),
                );
            }
        }
        // The access log's writer is kept unless its settings changed; a file that cannot be
        // opened rejects the change.
        let access_log = match (&config.access_log, &current.access_log) {
            (None, _) => None,
            (Some(wanted), Some(running)) if running.config() == wanted => Some(running.clone()),
            (Some(wanted), _) => Some(AccessLog::start(wanted).map_err(|error| {
                ReloadError::AccessLog {
                    path: wanted
                        .path
                        .as_ref()
                        .map_or("standard output".into(), |p| p.display().to_string()),
                    error,
                }
            })?),
        };
        Ok((new_sockets, access_log))
    }

    /// The one sequence every change goes through: build, store, drain what left,
    /// reconcile health checks, accept loops and DNS tasks. Returns the new generation and
    /// a one-line summary of the change.
    async fn commit(
        &self,
        control: &mut Control,
        config: Arc<Config>,
        new_sockets: HashMap<String, Arc<TcpListener>>,
        access_log: Option<AccessLog>,
    ) -> (u64, String) {
        let current = self.live.load_full();
        let previous = (current.generation > 0).then_some(&*current);
        let startup = self.starting.load(Ordering::Relaxed);
        // Names that left the config forget their addresses; new ones start resolving.
        control.discovery.reconcile(&config);
        control.acme.reconcile(&config);
        let Control {
            discovery,
            resolved,
            ..
        } = &mut *control;
        resolved.retain(|k, _| discovery.is_current(k));
        let next = Arc::new(Snapshot::build(
            config,
            previous,
            &control.resolved,
            startup,
            access_log,
        ));
        let changes = describe_changes(&current, &next);
        // Backends that left drain: no new requests, in-flight ones finish.
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
        let first_round = control.health.reconcile(&next);
        if startup {
            // Listeners open (and READY is sent) once every backend had its first probe,
            // bounded by the longest probe timeout.
            let bound = next
                .config
                .pools
                .iter()
                .filter_map(|p| p.health_check.as_ref().map(|h| h.timeout + h.interval / 10))
                .max()
                .unwrap_or_default()
                + Duration::from_millis(100);
            let _ = tokio::time::timeout(bound, async {
                for rx in first_round {
                    let _ = rx.await;
                }
            })
            .await;
        }
        if startup {
            control.startup_sockets.extend(new_sockets);
        } else {
            self.reconcile_listeners(control, &next, new_sockets);
        }
        (next.generation, changes)
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
                // Backends added or removed are listed above, weights below: the rest.
                let settings_changed = {
                    let (mut a, mut b) = (o.config.clone(), pool.config.clone());
                    a.backends.clear();
                    b.backends.clear();
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
