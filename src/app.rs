//! Composition root: wire the parts together and run them until it is time to stop.
//!
//! Startup order: signals, inherited sockets (systemd or a predecessor), the admin socket,
//! the metrics recorder, the first config through the control plane's apply sequence, the
//! admin endpoint, the idle-connection sweeper, then READY. The main loop turns its inputs
//! (SIGHUP, file edits, DNS updates; admin calls go to the control plane directly) into
//! control-plane calls, SIGUSR1 into an access-log reopen, and SIGTERM or a successor's
//! take-over into the shutdown order below.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::control::{Daemon, ReloadError};
use crate::handover::{self, Inherited};
use crate::listener::{bind_named, BindError};
use crate::{admin, systemd, upstream};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Bind(#[from] BindError),
    #[error("{0}")]
    Start(#[from] ReloadError),
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// How long startup waits for named backends' first DNS answer before READY.
const FIRST_RESOLUTION_WAIT: Duration = Duration::from_secs(3);

/// Runs the daemon until SIGTERM or SIGINT (or until a successor took over), then shuts
/// down gracefully. With `upgrade`, the listening sockets are taken over from the process
/// serving `global.handover_socket`, which then drains and exits.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    upgrade: bool,
) -> Result<(), AppError> {
    let shutdown_timeout = config.global.shutdown_timeout;
    // Signals first, so a SIGHUP or SIGTERM during startup is not the default (fatal) one.
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AppError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Signal)?;
    let mut usr1 = signal(SignalKind::user_defined1()).map_err(AppError::Signal)?;

    let mut inherited = Inherited::from_systemd();
    let mut predecessor = None;
    if upgrade {
        if let Some((sockets, conn)) = take_over(config.global.handover_socket.clone()).await {
            inherited = sockets;
            predecessor = Some(conn);
        }
    }
    let admin_socket = match &config.admin {
        Some(a) => Some(Arc::new(bind_named("admin", a.bind, &mut inherited)?)),
        None => None,
    };
    let admin_config = config.admin.clone();
    let handover_path = config.global.handover_socket.clone();

    // Before the first config: pools take their histogram handles when they are built.
    let metrics = match &admin_config {
        Some(a) if a.metrics => admin::Metrics::On(crate::prometheus::install()),
        _ => admin::Metrics::Off,
    };
    let (daemon, mut dns_updates) = Daemon::new(config_path.clone(), admin_socket.clone());
    let daemon = Arc::new(daemon);
    daemon.start(config, &mut inherited).await?;
    // Named backends: give DNS a moment so the first requests find them (connections that
    // arrive meanwhile wait in the accept queue).
    let _ = tokio::time::timeout(FIRST_RESOLUTION_WAIT, async {
        while daemon.unresolved_names().await > 0 {
            match dns_updates.recv().await {
                Some(update) => daemon.apply_discovery(update).await,
                None => break,
            }
        }
    })
    .await;
    daemon.started().await;
    let live = Arc::clone(&daemon.live);
    let snapshot = live.load_full();

    let shutdown = daemon.shutdown_token();
    let admin_stop = CancellationToken::new();
    if let (Some(sock), Some(_)) = (admin_socket, &admin_config) {
        tokio::spawn(admin::run(
            sock,
            Arc::clone(&daemon),
            admin_stop.clone(),
            metrics,
        ));
    }
    let sweep_live = Arc::clone(&live);
    tokio::spawn(upstream::evict_idle(shutdown.clone(), move || {
        sweep_live.load().evict_idle_connections()
    }));
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
    if let Some(path) = &handover_path {
        match handover::listen(path) {
            Ok(l) => {
                let d = Arc::clone(&daemon);
                let current = move || {
                    let d = Arc::clone(&d);
                    async move { d.handover_sockets().await }
                };
                tokio::spawn(handover::serve(l, current, handover_tx));
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
            _ = usr1.recv() => match &live.load().access_log {
                Some(log) => log.reopen(),
                None => tracing::info!("SIGUSR1: there is no access log to reopen"),
            },
            Some(()) = file_changed => { let _ = daemon.reload().await; }
            Some(update) = dns_updates.recv() => daemon.apply_discovery(update).await,
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
    daemon.stop_background_tasks().await;
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

/// Asks the process serving `path` for its listening sockets (`--upgrade`); `None` (with
/// a warning) when there is none: this process then binds fresh.
async fn take_over(path: Option<PathBuf>) -> Option<(Inherited, std::os::unix::net::UnixStream)> {
    let Some(path) = path else {
        tracing::warn!("upgrade: global.handover_socket is not set; binding fresh");
        return None;
    };
    match tokio::task::spawn_blocking(move || handover::request(&path)).await {
        Ok(Ok(taken)) => Some(taken),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "upgrade: no running ballast handed over its sockets; binding fresh");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "upgrade: hand-over task failed; binding fresh");
            None
        }
    }
}
