//! Restart without losing a connection: listening sockets passed from the running process
//! to its successor, and systemd socket activation.
//!
//! With `global.handover_socket` set, the running daemon listens on that Unix socket. A new
//! process started with `--upgrade` connects, asks for the listening sockets (`FDS`), gets
//! them over `SCM_RIGHTS` with their listener names, starts serving on them, and once it is
//! ready says `READY`. The old process then stops accepting and drains like on SIGTERM. The
//! kernel's accept queue belongs to the socket, which both processes hold during the
//! switch, so no connection attempt is refused or lost (HAProxy's `-x`, Pingora's upgrade).
//!
//! Systemd socket activation (`LISTEN_FDS`) is honoured the same way: an inherited socket
//! is used for the listener whose bind address it has.

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Binds the hand-over socket, replacing a stale file (or a predecessor's, which no longer
/// needs it once it handed over).
pub fn listen(path: &Path) -> io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Whoever can connect can take the sockets and stop this process: owner only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers hand-over requests on `listener`: sends the sockets `current()` returns (the
/// listeners of the moment, which reloads change) and, once the successor says it is
/// ready, passes its connection to `done` (whose receiver shuts this process down) and
/// returns.
pub async fn serve<F, Fut, S>(
    listener: tokio::net::UnixListener,
    current: F,
    done: tokio::sync::mpsc::Sender<UnixStream>,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(String, S)>>,
    S: AsFd + Send + 'static,
{
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
        let sockets = current().await;
        tracing::info!(
            sockets = sockets.len(),
            "hand-over requested: sending listening sockets"
        );
        match tokio::task::spawn_blocking(move || serve_one(conn, &sockets)).await {
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

/// Most sockets one handover carries (listeners plus admin).
const MAX_FDS: usize = 64;
const REQUEST: &[u8] = b"FDS\n";
const READY: &[u8] = b"READY\n";

/// Listening sockets received from a predecessor or from systemd, waiting to be claimed.
#[derive(Debug, Default)]
pub struct Inherited {
    by_name: HashMap<String, TcpListener>,
    unnamed: Vec<TcpListener>,
}

impl Inherited {
    /// Sockets passed by systemd socket activation (`LISTEN_FDS`/`LISTEN_PID`).
    pub fn from_systemd() -> Inherited {
        let mut fds = listenfd::ListenFd::from_env();
        let mut inherited = Inherited::default();
        for i in 0..fds.len() {
            match fds.take_tcp_listener(i) {
                Ok(Some(l)) => inherited.unnamed.push(l),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(fd = i + 3, error = %e, "ignoring inherited fd that is not a TCP listener")
                }
            }
        }
        inherited
    }

    /// The inherited socket for listener `name` bound at `bind`: by name from a predecessor,
    /// else by address (a `:0` port matches any port on that IP).
    pub fn take(&mut self, name: &str, bind: SocketAddr) -> Option<TcpListener> {
        if let Some(l) = self.by_name.remove(name) {
            return Some(l);
        }
        let pos = self.unnamed.iter().position(|l| {
            l.local_addr()
                .is_ok_and(|a| a == bind || (bind.port() == 0 && a.ip() == bind.ip()))
        })?;
        Some(self.unnamed.swap_remove(pos))
    }
}

/// The successor's side: fetch the listening sockets from the process serving `path`.
/// Returns them and the open connection, on which [`signal_ready`] is sent later.
pub fn request(path: &Path) -> io::Result<(Inherited, UnixStream)> {
    let mut conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(REQUEST)?;

    let mut payload = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(&mut payload)];
    let msg = rustix::net::recvmsg(&conn, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let n = msg.bytes;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    let names: Vec<String> = serde_json::from_slice(&payload[..n]).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad handover payload: {e}"),
        )
    })?;
    if names.len() != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "handover sent {} names for {} sockets",
                names.len(),
                fds.len()
            ),
        ));
    }
    let mut inherited = Inherited::default();
    for (name, fd) in names.into_iter().zip(fds) {
        let listener = TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        inherited.by_name.insert(name, listener);
    }
    Ok((inherited, conn))
}

/// The successor is serving: the predecessor may stop accepting and drain.
pub fn signal_ready(mut conn: UnixStream) -> io::Result<()> {
    conn.write_all(READY)?;
    // Wait for the predecessor to acknowledge by closing, so it has stopped accepting
    // before we report the upgrade done.
    let mut buf = [0u8; 16];
    let _ = conn.read(&mut buf);
    Ok(())
}

/// The running process's side of one handover connection: send `sockets` (name and fd) and
/// wait for the successor to be ready. Returns the connection once it is (drop it after
/// accepting has stopped: that is the successor's acknowledgement), `None` if it went away.
pub fn serve_one<F: AsFd>(
    mut conn: UnixStream,
    sockets: &[(String, F)],
) -> io::Result<Option<UnixStream>> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = [0u8; REQUEST.len()];
    conn.read_exact(&mut req)?;
    if req != REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected handover request",
        ));
    }
    let names: Vec<&str> = sockets.iter().map(|(n, _)| n.as_str()).collect();
    let payload = serde_json::to_vec(&names).map_err(io::Error::other)?;
    let fds: Vec<_> = sockets.iter().map(|(_, f)| f.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS || !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("too many sockets for one handover"));
    }
    rustix::net::sendmsg(
        &conn,
        &[IoSlice::new(&payload)],
        &mut control,
        SendFlags::empty(),
    )?;

    // The successor now starts; its health checks may take a while.
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut ready = [0u8; READY.len()];
    match conn.read_exact(&mut ready) {
        Ok(()) if ready == READY => Ok(Some(conn)),
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}
