//! Connections to backends: connect with a deadline, TLS when the pool asks for it, the
//! HTTP/1.1 or HTTP/2 handshake, and per backend a small pool of idle HTTP/1.1 connections
//! or one shared HTTP/2 connection that carries many requests at once.
//!
//! We drive hyper's low-level client connection ourselves (instead of hyper-util's pooled
//! client) for three reasons: `try_send_request` hands back a request that never reached the
//! wire, so it can be retried on another backend whatever its method; a draining or failed
//! backend can drop exactly its own idle connections; and each pool is sized per backend.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::UpstreamProtocol;
use crate::net::TimedStream;
pub use crate::request_body::UpstreamBody;
use crate::tls::BackendTls;
use rustls::pki_types::ServerName;

/// A connection to a backend, ready to carry a request.
pub enum Sender {
    H1(http1::SendRequest<UpstreamBody>),
    /// A handle on the backend's shared HTTP/2 connection.
    H2(http2::SendRequest<UpstreamBody>),
}

impl Sender {
    pub fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_ready(),
            Sender::H2(s) => s.is_ready(),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    pub async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    /// Sends `req`; a request that never reached the wire comes back in the error. hyper
    /// queues the request to the connection at once; the future only waits for the answer
    /// and does not borrow the connection (it can outlive this call's caller: see
    /// `proxy::abandoned`).
    pub fn send(&mut self, req: Request<UpstreamBody>) -> Sending {
        match self {
            Sender::H1(s) => Box::pin(s.try_send_request(req)),
            Sender::H2(s) => Box::pin(s.try_send_request(req)),
        }
    }
}

/// The response head of a request sent on a [`Sender`], or the error (with the request, if
/// it never reached the wire).
pub type SendResult = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>;

/// A request on its way: see [`Sender::send`].
pub type Sending = std::pin::Pin<Box<dyn std::future::Future<Output = SendResult> + Send>>;

/// Largest read from a backend, and so the most response data read ahead of a slow client
/// per connection (hyper would grow it to 400 KiB); also the limit on a response head.
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
#[derive(Debug, Default)]
struct Idle {
    /// Most recently used last (LIFO keeps a few connections hot; old ones age out).
    conns: Vec<(http1::SendRequest<UpstreamBody>, Instant)>,
    /// Peak in-flight requests seen in the current window and in the one before.
    peak: usize,
    previous_peak: usize,
    window_start: Option<Instant>,
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
        while let Some(mut sender) = self.pop(s.idle_timeout) {
            // A connection goes back to the pool as its response body ends; hyper may need a
            // moment to settle it into idle. `ready` is immediate for a healthy idle one and
            // errors for a closed one.
            if sender.is_ready() {
                return Ok((Sender::H1(sender), None));
            }
            // Bounded: a connection that does not settle quickly is dropped, not waited on.
            let settle = s.connect_timeout.min(Duration::from_millis(100));
            if let Ok(Ok(())) = tokio::time::timeout(settle, sender.ready()).await {
                return Ok((Sender::H1(sender), None));
            }
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

    fn pop(&self, idle_timeout: Duration) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.lock();
        while let Some((sender, since)) = idle.conns.pop() {
            if !sender.is_closed() && since.elapsed() < idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    /// Returns a connection whose last response has been read completely; `busy` is how
    /// many requests the backend has in flight now, this one included.
    pub fn put(&self, sender: Sender, s: &ConnSettings, busy: usize) {
        // An HTTP/2 handle is just dropped: the shared connection stays in `shared`.
        let Sender::H1(sender) = sender else { return };
        if sender.is_closed() || s.max_idle == Some(0) {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        let needed = idle.note_busy(busy, s.idle_timeout, now);
        let keep = s.max_idle.map_or(needed, |cap| needed.min(cap)).max(1);
        while idle.conns.len() >= keep {
            idle.conns.remove(0);
        }
        idle.conns.push((sender, now));
    }

    /// Closes idle connections that outlived `idle_timeout` or were closed by the backend.
    pub fn evict_expired(&self, idle_timeout: Duration) {
        self.lock()
            .conns
            .retain(|(s, since)| !s.is_closed() && since.elapsed() < idle_timeout);
        let mut shared = self.shared_lock();
        if shared.as_ref().is_some_and(|s| s.is_closed()) {
            *shared = None;
        }
    }

    /// Closes every idle connection (dropping the sender ends hyper's connection task), and
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
    match tls {
        None => handshake(stream, addr, s.protocol, cut).await,
        Some(tls) => {
            let left = timeout.saturating_sub(started.elapsed());
            let name = tls.server_name(addr.ip(), tls_name);
            let stream = match tokio::time::timeout(left, tls.connector.connect(name, stream)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(ConnectError::Tls(e)),
                Err(_) => return Err(ConnectError::Timeout(timeout)),
            };
            handshake(stream, addr, s.protocol, cut).await
        }
    }
}

/// A TCP connection to `addr` within `timeout`, with `proxy_header` sent first.
pub async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    proxy_header: Option<&[u8]>,
) -> Result<TcpStream, ConnectError> {
    let connecting = async {
        let mut stream = TcpStream::connect(addr).await?;
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

async fn handshake<I>(
    io: I,
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    cut: CancellationToken,
) -> Result<Sender, ConnectError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    match protocol {
        UpstreamProtocol::Http1 => {
            let (sender, conn) = http1::Builder::new()
                .writev(false)
                .max_buf_size(READ_BUFFER)
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            spawn_conn(conn.with_upgrades(), addr, cut);
            Ok(Sender::H1(sender))
        }
        UpstreamProtocol::H2 => {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // A backend that stops answering PINGs fails its streams instead of hanging.
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(20))
                .max_send_buf_size(READ_BUFFER * 4)
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            spawn_conn(conn, addr, cut);
            Ok(Sender::H2(sender))
        }
    }
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
