//! The sd_notify protocol: READY, RELOADING (with MONOTONIC_USEC), STOPPING, STATUS and
//! watchdog pings. Every call is a no-op when `NOTIFY_SOCKET` is not set, so the daemon
//! behaves the same outside systemd.
//!
//! Messages are sent without blocking: the control plane calls this in the middle of a
//! reload, and a notify socket whose reader is slow (its queue holds only
//! `net.unix.max_dgram_qlen` datagrams, 10 by default) must never hold a reload up. A
//! message that does not fit is dropped and logged at debug level; the next one carries
//! the current state anyway.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    match send_nonblocking(path.as_bytes(), msg.as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            tracing::debug!(message = %msg.trim_end(), "sd_notify: the notify socket is full; message dropped")
        }
        Err(e) => tracing::warn!(error = %e, "sd_notify failed"),
    }
}

/// One datagram to `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
fn send_nonblocking(path: &[u8], msg: &[u8]) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    let sent = match path.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg, &addr)?
        }
        None => sock.send_to(msg, std::ffi::OsStr::from_bytes(path))?,
    };
    if sent == msg.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "incomplete sd_notify datagram",
        ))
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
