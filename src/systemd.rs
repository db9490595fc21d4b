//! The sd_notify protocol: READY, RELOADING (with MONOTONIC_USEC), STOPPING, STATUS and
//! watchdog pings. Every call is a no-op when `NOTIFY_SOCKET` is not set, so the daemon
//! behaves the same outside systemd.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Every listener is bound and the first round of health checks is done.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins. systemd ≥ 253 wants the monotonic timestamp with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining connections"),
    ]);
}

/// Half the watchdog period when systemd asked for pings (`WATCHDOG_USEC`), else `None`.
/// As sd_watchdog_enabled(3): a `WATCHDOG_PID` that names another process means the
/// watchdog is not ours; an absent one means it is.
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog forever at `every`. It runs on the same runtime as the proxy, so a
/// wedged runtime stops the pings and systemd restarts the service.
pub async fn watchdog(every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}
