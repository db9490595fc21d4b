//! Connections to backends: connect with a deadline, TLS when the pool asks for it, then
//! HTTP/1.1 on ballast's own client ([`crate::h1::client`]) or the HTTP/2 handshake on
//! hyper's; and per backend a pool of idle HTTP/1.1 connections sized by recent need, or one
//! shared HTTP/2 connection that carries many requests at once.
//!
//! The pools are ballast's own (not hyper-util's pooled client): a request that never
//! reached the wire comes back and can be retried on another backend whatever its method; a
//! draining or failed backend drops exactly its own idle connections; and each pool is sized
//! per backend. `sender` holds the one type the request path sends on.

mod sender;
pub use sender::{
    H1Conn, Outgoing, SendError, SendResult, Sender, Sending, UpIo, UpstreamError, UpstreamIncoming,
};

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::UpstreamProtocol;
use crate::net::TimedStream;
pub use crate::request_body::UpstreamBody;
use crate::tls::BackendTls;
use rustls::pki_types::ServerName;

/// Largest read from a backend, and so the most response data read ahead of a slow client
/// per connection; also the limit on a response head.
pub const READ_BUFFER: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[source] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
}

impl ConnectError {
    /// Nothing listens at the address (ECONNREFUSED): the process is gone or not up yet.
    pub fn refused(&self) -> bool {
        matches!(self, ConnectError::Io(e) if e.kind() == io::ErrorKind::ConnectionRefused)
    }

    /// The connection failed before a byte of any request could be written (refused, or
    /// reset or aborted during the TCP handshake): the request reached no one.
    pub fn never_reached(&self) -> bool {
        matches!(self, ConnectError::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        ))
    }
}

/// Per-backend limits, taken from the pool's config.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept per backend at most; `None`: as many as the backend
    /// had in use at once lately (see [`Idle`]).
    pub max_idle: Option<usize>,
    /// A write to the backend (a request body) blocked this long fails the connection.
    pub send_timeout: Duration,
    pub protocol: UpstreamProtocol,
}

/// A backend's idle HTTP/1.1 connections, and how many it needed lately.
///
/// Why sized by recent need: a fixed cap below the steady concurrency (640 HTTP/2 streams
/// spread over 4 backends need 160 connections each) closes the surplus after every burst
/// and opens it again on the next: a connect, and a backend accept, per request over the
/// cap. HAProxy keeps what it opened until it idles out; nginx's `keepalive N` churns.
/// Here the pool keeps up to the most requests the backend had in flight at once in the
/// last one or two `idle_timeout` windows, and `idle_timeout` closes what a past burst
/// left over. An explicit `max_idle_per_backend` caps it.
#[derive(Default)]
struct Idle {
    /// Most recently used last (LIFO keeps a few connections hot; old ones age out).
    conns: Vec<(H1Conn, Instant)>,
    /// Peak in-flight requests seen in the current window and in the one before.
    peak: usize,
    previous_peak: usize,
    window_start: Option<Instant>,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("conns", &self.conns.len())
            .field("peak", &self.peak)
            .field("previous_peak", &self.previous_peak)
            .finish()
    }
}

impl Idle {
    /// Notes `busy` requests in flight at `now`; returns how many idle connections to keep.
    fn note_busy(&mut self, busy: usize, window: Duration, now: Instant) -> usize {
        match self.window_start {
            Some(start) if now.duration_since(start) < window => {}
            Some(start) => {
                // Two windows or more passed: the older peak is stale too.
                self.previous_peak = if now.duration_since(start) < window * 2 {
                    self.peak
                } else {
                    0
                };
                self.peak = 0;
                self.window_start = Some(now);
            }
            None => self.window_start = Some(now),
        }
        self.peak = self.peak.max(busy);
        self.peak.max(self.previous_peak)
    }
}

#[derive(Debug, Default)]
pub struct ConnPool {
    /// HTTP/1.1.
    idle: Mutex<Idle>,
    /// HTTP/2: the connection new requests are multiplexed onto.
    shared: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    /// HTTP/2: held while the shared connection is being opened, so that a burst of requests
    /// opens one connection, not one each. Counts the failed attempts, so that requests that
    /// waited on a failing one fail with it instead of each waiting out its own timeout.
    connecting: tokio::sync::Mutex<()>,
    failed_connects: std::sync::atomic::AtomicU64,
}

impl ConnPool {
    /// An idle connection that is still open, or a new one (with the time it took to open).
    /// `cut` gives the token that ends a new connection when fired (a drain timeout),
    /// mid-request or not; it is only called when a connection is opened.
    pub async fn get(
        &self,
        addr: SocketAddr,
        s: &ConnSettings,
        tls: Option<&BackendTls>,
        tls_name: Option<&ServerName<'static>>,
        cut: impl FnOnce() -> CancellationToken,
    ) -> Result<(Sender, Option<Duration>), ConnectError> {
        if s.protocol == UpstreamProtocol::H2 {
            return self.get_shared(addr, s, tls, tls_name, cut).await;
        }
        if let Some(conn) = self.pop(s.idle_timeout) {
            return Ok((Sender::H1(conn), None));
        }
        let started = Instant::now();
        // Boxed: opening (with a TLS handshake) is a ~7 KB future; inline, every request's
        // future would carry and move that space, though most reuse a pooled connection.
        let sender = Box::pin(connect(addr, s, tls, tls_name, None, cut())).await?;
        Ok((sender, Some(started.elapsed())))
    }

    async fn get_shared(
        &self,
        addr: SocketAddr,
        s: &ConnSettings,
        tls: Option<&BackendTls>,
        tls_name: Option<&ServerName<'static>>,
        cut: impl FnOnce() -> CancellationToken,
    ) -> Result<(Sender, Option<Duration>), ConnectError> {
        let open = || self.shared_lock().clone().filter(|c| !c.is_closed());
        if let Some(sender) = open() {
            return Ok((Sender::H2(sender), None));
        }
        use std::sync::atomic::Ordering;
        let failures_before = self.failed_connects.load(Ordering::Acquire);
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = open() {
            return Ok((Sender::H2(sender), None));
        }
        if self.failed_connects.load(Ordering::Acquire) != failures_before {
            return Err(ConnectError::Io(io::Error::other(
                "the connection this request waited for failed",
            )));
        }
        let started = Instant::now();
        match Box::pin(connect(addr, s, tls, tls_name, None, cut())).await {
            Ok(Sender::H2(h2)) => {
                *self.shared_lock() = Some(h2.clone());
                Ok((Sender::H2(h2), Some(started.elapsed())))
            }
            Ok(other) => Ok((other, Some(started.elapsed()))),
            Err(e) => {
                self.failed_connects.fetch_add(1, Ordering::Release);
                Err(e)
            }
        }
    }

    /// The most recently used idle connection that is still open. The check (a read that
    /// finds nothing) runs outside the lock.
    fn pop(&self, idle_timeout: Duration) -> Option<H1Conn> {
        loop {
            let (mut conn, since) = self.lock().conns.pop()?;
            if since.elapsed() < idle_timeout && conn.is_reusable() {
                return Some(conn);
            }
        }
    }

    /// Returns a connection whose last response has been read completely; `busy` is how
    /// many requests the backend has in flight now, this one included.
    pub fn put(&self, sender: Sender, s: &ConnSettings, busy: usize) {
        // An HTTP/2 handle is just dropped: the shared connection stays in `shared`.
        let Sender::H1(conn) = sender else { return };
        if s.max_idle == Some(0) {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        let needed = idle.note_busy(busy, s.idle_timeout, now);
        let keep = s.max_idle.map_or(needed, |cap| needed.min(cap)).max(1);
        while idle.conns.len() >= keep {
            idle.conns.remove(0);
        }
        idle.conns.push((conn, now));
    }

    /// Closes idle connections that outlived `idle_timeout` or were closed by the backend.
    pub fn evict_expired(&self, idle_timeout: Duration) {
        self.lock()
            .conns
            .retain_mut(|(c, since)| since.elapsed() < idle_timeout && c.is_reusable());
        let mut shared = self.shared_lock();
        if shared.as_ref().is_some_and(|s| s.is_closed()) {
            *shared = None;
        }
    }

    /// Closes every idle connection, and
    /// stops handing out the shared HTTP/2 one (it closes when its last request ends).
    pub fn clear(&self) {
        self.lock().conns.clear();
        *self.shared_lock() = None;
    }

    /// Idle HTTP/1.1 connections, plus the shared HTTP/2 one.
    pub fn idle_count(&self) -> usize {
        self.lock().conns.len() + usize::from(self.shared_lock().is_some())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shared_lock(&self) -> std::sync::MutexGuard<'_, Option<http2::SendRequest<UpstreamBody>>> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every 5 s until `shutdown`, calls `sweep`, which closes the idle connections that
/// outlived their pool's idle timeout (it visits the pools of the moment: reloads change
/// them).
pub async fn evict_idle(shutdown: CancellationToken, sweep: impl Fn()) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => sweep(),
        }
    }
}

/// Opens a fresh connection to `addr`: TCP, the PROXY header if one is given, TLS if the
/// pool has it, then the HTTP/1.1 or HTTP/2 handshake. `connect_timeout` bounds all but the
/// last.
pub async fn connect(
    addr: SocketAddr,
    s: &ConnSettings,
    tls: Option<&BackendTls>,
    tls_name: Option<&ServerName<'static>>,
    proxy_header: Option<&[u8]>,
    cut: CancellationToken,
) -> Result<Sender, ConnectError> {
    let timeout = s.connect_timeout;
    let started = Instant::now();
    let stream = connect_tcp(addr, timeout, proxy_header).await?;
    // A backend that reads a request body slowly holds a bounded send queue here too.
    let _ = crate::net::limit_unsent(&stream, READ_BUFFER);
    let stream = TimedStream::upstream(stream, s.send_timeout);
    let io = match tls {
        None => UpIo::Plain(stream),
        Some(tls) => {
            let left = timeout.saturating_sub(started.elapsed());
            let name = tls.server_name(addr.ip(), tls_name);
            match tokio::time::timeout(left, tls.connector.connect(name, stream)).await {
                Ok(Ok(s)) => UpIo::Tls(Box::new(s)),
                Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                Err(_) => return Err(ConnectError::Timeout(timeout)),
            }
        }
    };
    match s.protocol {
        UpstreamProtocol::Http1 => Ok(Sender::H1(H1Conn::new(io, cut, H1_CLIENT))),
        UpstreamProtocol::H2 => handshake_h2(io, addr, cut).await,
    }
}

/// How ballast's HTTP/1.1 client reads responses: heads up to [`READ_BUFFER`] and hyper's
/// default of 100 fields; reads of up to [`READ_BUFFER`].
const H1_CLIENT: crate::h1::client::ClientConfig = crate::h1::client::ClientConfig {
    limits: crate::h1::Limits {
        max_head: READ_BUFFER,
        max_headers: 100,
    },
    read_size: READ_BUFFER,
};

/// A TCP connection to `addr` within `timeout`, with `proxy_header` sent first.
pub async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    proxy_header: Option<&[u8]>,
) -> Result<TcpStream, ConnectError> {
    let connecting = async {
        let mut stream = crate::net::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        if let Some(header) = proxy_header {
            tokio::io::AsyncWriteExt::write_all(&mut stream, header).await?;
        }
        Ok(stream)
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

/// The HTTP/2 handshake on `io`; hyper drives the connection in a task of its own.
async fn handshake_h2(
    io: UpIo,
    addr: SocketAddr,
    cut: CancellationToken,
) -> Result<Sender, ConnectError> {
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // A backend that stops answering PINGs fails its streams instead of hanging.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_send_buf_size(READ_BUFFER * 4)
        .handshake(TokioIo::new(io))
        .await
        .map_err(ConnectError::Handshake)?;
    spawn_conn(conn, addr, cut);
    Ok(Sender::H2(sender))
}

/// Drives a connection until it ends or `cut` (a drain timeout) fires.
fn spawn_conn<F>(conn: F, addr: SocketAddr, cut: CancellationToken)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(backend = %addr, error = %e, "upstream connection ended with an error");
            },
            _ = cut.cancelled() => {
                tracing::debug!(backend = %addr, "upstream connection cut");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::Idle;
    use std::time::{Duration, Instant};

    #[test]
    fn the_idle_pool_keeps_what_recent_load_needed_then_forgets_it() {
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut idle = Idle::default();
        assert_eq!(idle.note_busy(3, window, at(0)), 3);
        assert_eq!(
            idle.note_busy(160, window, at(1)),
            160,
            "a burst raises it at once"
        );
        assert_eq!(
            idle.note_busy(1, window, at(59)),
            160,
            "and it holds in its window"
        );
        assert_eq!(
            idle.note_busy(2, window, at(61)),
            160,
            "and the window after"
        );
        assert_eq!(idle.note_busy(2, window, at(119)), 160);
        assert_eq!(
            idle.note_busy(2, window, at(122)),
            2,
            "then it is forgotten"
        );
        assert_eq!(
            idle.note_busy(9, window, at(400)),
            9,
            "a long quiet forgets both"
        );
    }
}
