//! Composition root: bind (or inherit) the sockets, build the first snapshot, start health
//! checks, accept loops, the admin endpoint and the config watcher, then turn signals, file
//! edits and hand-over requests into control-plane calls until it is time to stop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{bind_named, BindError, Daemon};
use crate::handover::{self, Inherited};
use crate::health::HealthChecks;
use crate::state::{Live, Snapshot};
use crate::{admin, systemd};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Bind(#[from] BindError),
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
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

    let daemon = Arc::new(Daemon::new(
        Arc::clone(&live),
        config_path.clone(),
        health,
        admin_socket.clone(),
    ));
    daemon.start_listeners(&snapshot, sockets).await;
    let shutdown = daemon.shutdown_token();
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
    for w in snapshot.config.warnings() {
        tracing::warn!("{w}");
    }
    // Kept alive for the life of the daemon; dropping it stops the watch.
    let mut watched = watched_files(config_path.as_deref(), &snapshot.config);
    let mut file_events = watch_files(&watched);
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
        // A reload (from anywhere) may name other certificate files: follow them.
        let now = watched_files(config_path.as_deref(), &live.load().config);
        if now != watched {
            file_events = watch_files(&now);
            watched = now;
        }
    }

    systemd::stopping();
    tracing::info!(timeout = ?shutdown_timeout, "shutting down: finishing in-flight requests");
    daemon.begin_shutdown().await;
    // The accept loops have been told to stop; closing this tells the successor so.
    drop(successor);
    tokio::select! {
        _ = daemon.drained() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(open = daemon.open_connections(), "shutdown timeout reached, closing remaining connections")
        }
        _ = term.recv() => tracing::warn!("second signal: exiting now"),
        _ = int.recv() => tracing::warn!("second signal: exiting now"),
    }
    daemon.stop_health_checks().await;
    Ok(())
}

/// The config file and every file it names.
fn watched_files(config_path: Option<&std::path::Path>, config: &Config) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = config_path.map(PathBuf::from).into_iter().collect();
    if config_path.is_some() {
        files.extend(config.referenced_files());
    }
    files
}

type FileEvents = (notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>);

fn watch_files(files: &[PathBuf]) -> Option<FileEvents> {
    if files.is_empty() {
        return None;
    }
    match crate::config::watch::watch(files) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file or its certificates; reload with SIGHUP or the admin API");
            None
        }
    }
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
        let sockets = daemon.handover_sockets().await;
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
