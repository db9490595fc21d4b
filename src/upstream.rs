//! Connections to backends: connect with a deadline, HTTP/1.1 handshake, and a small
//! per-backend pool of idle keep-alive connections.
//!
//! We drive hyper's low-level client connection ourselves (instead of hyper-util's pooled
//! client) for three reasons: `try_send_request` hands back a request that never reached the
//! wire, so it can be retried on another backend whatever its method; a draining or failed
//! backend can drop exactly its own idle connections; and each pool is sized per backend.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::net::TimedStream;
pub use crate::request_body::UpstreamBody;

pub type Sender = http1::SendRequest<UpstreamBody>;

/// Largest read from a backend, and so the most response data read ahead of a slow client
/// per connection (hyper would grow it to 400 KiB); also the limit on a response head.
pub const READ_BUFFER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[source] io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
}

/// Per-backend limits, taken from the pool's config.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// A write to the backend (a request body) blocked this long fails the connection.
    pub send_timeout: Duration,
}

#[derive(Debug, Default)]
pub struct ConnPool {
    /// Most recently used last (LIFO keeps a few connections hot; old ones age out).
    idle: Mutex<Vec<(Sender, Instant)>>,
}

impl ConnPool {
    /// An idle connection that is still open, or a new one.
    /// `cut` gives the token that ends a new connection when fired (a drain timeout),
    /// mid-request or not; it is only called when a connection is opened.
    pub async fn get(
        &self,
        addr: SocketAddr,
        s: &ConnSettings,
        cut: impl FnOnce() -> CancellationToken,
    ) -> Result<Sender, ConnectError> {
        while let Some(mut sender) = self.pop(s.idle_timeout) {
            // A connection goes back to the pool as its response body ends; hyper may need a
            // moment to settle it into idle. `ready` is immediate for a healthy idle one and
            // errors for a closed one.
            if sender.is_ready() {
                return Ok(sender);
            }
            // Bounded: a connection that does not settle quickly is dropped, not waited on.
            let settle = s.connect_timeout.min(Duration::from_millis(100));
            if let Ok(Ok(())) = tokio::time::timeout(settle, sender.ready()).await {
                return Ok(sender);
            }
        }
        connect(addr, s, cut()).await
    }

    fn pop(&self, idle_timeout: Duration) -> Option<Sender> {
        let mut idle = self.lock();
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// Returns a connection whose last response has been read completely.
    pub fn put(&self, sender: Sender, s: &ConnSettings) {
        if sender.is_closed() || s.max_idle == 0 {
            return;
        }
        let mut idle = self.lock();
        if idle.len() >= s.max_idle {
            idle.remove(0);
        }
        idle.push((sender, Instant::now()));
    }

    /// Closes idle connections that outlived `idle_timeout` or were closed by the backend.
    pub fn evict_expired(&self, idle_timeout: Duration) {
        self.lock()
            .retain(|(s, since)| !s.is_closed() && since.elapsed() < idle_timeout);
    }

    /// Closes every idle connection (dropping the sender ends hyper's connection task).
    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Sender, Instant)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens a fresh HTTP/1.1 connection to `addr`.
pub async fn connect(
    addr: SocketAddr,
    s: &ConnSettings,
    cut: CancellationToken,
) -> Result<Sender, ConnectError> {
    let timeout = s.connect_timeout;
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Io(e)),
        Err(_) => return Err(ConnectError::Timeout(timeout)),
    };
    let _ = stream.set_nodelay(true);
    // A backend that reads a request body slowly holds a bounded send queue here too.
    crate::net::limit_unsent(&stream, READ_BUFFER);
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        .max_buf_size(READ_BUFFER)
        .handshake(TokioIo::new(TimedStream::upstream(stream, s.send_timeout)))
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        tokio::select! {
            r = conn.with_upgrades() => if let Err(e) = r {
                tracing::debug!(backend = %addr, error = %e, "upstream connection ended with an error");
            },
            _ = cut.cancelled() => {
                tracing::debug!(backend = %addr, "upstream connection cut");
            }
        }
    });
    Ok(sender)
}
