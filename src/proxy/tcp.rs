//! TCP (L4) mode: one client connection joined to one backend connection, bytes copied both
//! ways with no parsing.
//!
//! - The pool is the listener's, or one of its `sni_routes` by the name the client's TLS
//!   ClientHello asks for (`proxy::sni_peek`, or the handshake when TLS ends here).
//! - TLS may end here (`tls` on the listener) and start again towards the backend (`tls`
//!   on the pool); the bytes in between are the protocol's own, unread.
//!
//! - A connect that fails (refused, timed out) counts against the backend and is retried on
//!   another one: nothing has been sent yet, so that is always safe. A refused one ejects
//!   the backend at once and is not counted against `retries` (see `proxy::may_try_free`).
//!   Once joined, whatever happens to the bytes is nobody's fault that ballast could tell,
//!   so nothing more is counted, like HAProxy's `mode tcp`.
//! - A half-close is passed on: when one side shuts down its write side, the other side's
//!   write side is shut down and the opposite direction keeps flowing.
//! - The connection holds a lease on its backend for its whole life: `least_conn` counts it,
//!   a drain waits for it (and cuts it at `drain_timeout`), a graceful shutdown waits for it
//!   (up to `shutdown_timeout`).
//! - It closes after the pool's `idle_timeout` without a byte in either direction, and when a
//!   write stays blocked for the listener's `send_timeout` (client) or the pool's
//!   `response_timeout` (backend).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::access_log::{AccessLog, Entry};
use crate::balance::backend::{Backend, Lease};
use crate::balance::policy::hash_key;
use crate::balance::{NoPick, Pool};
use crate::config::{HashKey, ListenerConfig};
use crate::net::{Prefixed, TimedStream};
use crate::proxy::sni_peek::{self, Peeked};
use crate::state::Live;
use crate::stats::ListenerStats;
use crate::upstream::ConnectError;

/// Copy buffer per direction: large enough for bulk transfers, small enough that ten
/// thousand connections stay within a few hundred MiB.
const COPY_BUFFER: usize = 32 * 1024;

/// A TCP listener's client connection, as the copy method wants it.
pub enum ClientConn {
    /// Copied through userspace buffers (the default).
    Copy(Prefixed<TimedStream>),
    /// Moved with splice(2) (`splice = true`); the bytes are those read past a PROXY header,
    /// sent to the backend first.
    Splice(TcpStream, Vec<u8>),
}

/// Serves one client connection of a TCP listener. `peer` is the client and `local` the
/// address it connected to (both from a PROXY header when the listener accepts one).
pub async fn serve(
    client: ClientConn,
    peer: SocketAddr,
    local: SocketAddr,
    live: Live,
    config: Arc<ListenerConfig>,
    stats: Arc<ListenerStats>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    // `sni_routes`: the name the ClientHello asks for chooses the pool. With `tls` the
    // handshake tells it; without, the ClientHello is read and left to pass. Either way
    // before the snapshot is taken: a slow client holds no generation of the config.
    let wants_sni = !config.sni_routes.is_empty() || config.sni_required;
    let (client, sni) = match (tls, client) {
        (Some(tls), ClientConn::Copy(io)) => {
            let Some((stream, sni)) = terminate(tls, io, wants_sni, &config, &stats, peer).await
            else {
                return;
            };
            if sni.is_none() && config.sni_required {
                refuse_without_sni(&config, peer, "a ClientHello without a host name");
                return;
            }
            (Client::Tls(Box::new(stream)), sni)
        }
        (Some(_), ClientConn::Splice(..)) => {
            // Refused by validation: splice(2) cannot decrypt.
            tracing::error!(listener = %config.name, "splice with tls: connection closed");
            return;
        }
        (None, mut client) => {
            let sni = if wants_sni {
                match sni_peek::peek(&mut client, config.request_header_timeout).await {
                    Peeked::Hello(Some(name)) => Some(name),
                    Peeked::Gone => return,
                    other if config.sni_required => {
                        let why = match other {
                            Peeked::NotHello(why) => why,
                            _ => "a ClientHello without a host name",
                        };
                        refuse_without_sni(&config, peer, why);
                        return;
                    }
                    Peeked::Hello(None) | Peeked::NotHello(_) => None,
                }
            } else {
                None
            };
            let client = match client {
                ClientConn::Copy(c) => Client::Plain(c),
                ClientConn::Splice(c, prefix) => Client::Splice(c, prefix),
            };
            (client, sni)
        }
    };
    let snap = live.load_full();
    let Some(router) = snap.routers.get(config.name.as_str()) else {
        return;
    };
    let pool = Arc::clone(router.sni_pool(sni.as_deref()));
    let log = snap
        .access_log
        .as_ref()
        .filter(|_| config.access_log)
        .map(|l| (l.clone(), std::time::SystemTime::now()));
    drop(snap);
    let started = Instant::now();
    // Written to the counters and the access log once the connection ends, however it ends.
    let mut account = Account {
        listener: config.name.as_str().into(),
        client: peer,
        stats,
        pool: Arc::clone(&pool),
        log,
        started,
        backend: None,
        attempts: 0,
        connect: None,
        activity: None,
        termination: "ok",
    };
    let key = match pool.hash_key() {
        Some(HashKey::ClientIp) => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
        _ => None,
    };
    let header = pool
        .config
        .send_proxy
        .map(|v| crate::proxy_protocol::encode(v, peer, local));
    let (joined, lease) = match connect(
        &pool,
        key,
        &config.name,
        peer,
        header.as_deref(),
        &mut account,
    )
    .await
    {
        Ok(c) => c,
        Err(reason) => {
            account.termination = reason;
            return;
        }
    };
    let backend = Arc::clone(lease.backend());
    let cut = backend.cut_token();
    let activity = Arc::new(Activity::new());
    account.activity = Some(Arc::clone(&activity));
    let timed = |s: TcpStream| TimedStream::upstream(s, pool.config.response_timeout);
    let copied = async {
        match (client, joined) {
            (Client::Plain(c), Joined::Tcp(u)) => pump(c, timed(u), &activity).await,
            (Client::Plain(c), Joined::Tls(u)) => pump(c, *u, &activity).await,
            (Client::Tls(c), Joined::Tcp(u)) => pump(*c, timed(u), &activity).await,
            (Client::Tls(c), Joined::Tls(u)) => pump(*c, *u, &activity).await,
            (Client::Splice(client, prefix), Joined::Tcp(mut upstream)) => {
                if !prefix.is_empty() {
                    tokio::io::AsyncWriteExt::write_all(&mut upstream, &prefix).await?;
                }
                let touch = || activity.touch(0, false);
                tokio::try_join!(
                    super::splice::one_way(
                        &client,
                        &upstream,
                        pool.config.response_timeout,
                        &touch
                    ),
                    super::splice::one_way(&upstream, &client, config.send_timeout, &touch),
                )
            }
            // Refused by validation: splice(2) cannot encrypt.
            (Client::Splice(..), Joined::Tls(_)) => Err(std::io::Error::other(
                "splice cannot carry TLS to the backend",
            )),
        }
    };
    let idle_timeout = pool.config.idle_timeout;
    let outcome = tokio::select! {
        r = copied => match r {
            Ok((up, down)) => {
                // splice(2) moves bytes without reading them: count them here.
                activity.set_totals(up, down);
                format!("closed: {up} bytes up, {down} bytes down")
            }
            Err(e) => {
                account.termination = "connection_error";
                format!("ended: {e}")
            }
        },
        () = activity.idle_for(idle_timeout) => {
            account.termination = "idle_timeout";
            format!("idle for {idle_timeout:?} (idle_timeout)")
        }
        () = cut.cancelled() => {
            account.termination = "drain_timeout";
            "cut by drain_timeout".to_string()
        }
    };
    tracing::debug!(listener = %config.name, client = %peer, pool = %pool.name, backend = %backend.label, "tcp connection {outcome}");
    drop(lease);
}

/// The client's side of a connection, once it is known how it is read.
enum Client {
    Plain(Prefixed<TimedStream>),
    /// TLS terminated here (`tls` on the listener). Boxed: a TLS session is large.
    Tls(Box<crate::tls::ServerStream<Prefixed<TimedStream>>>),
    Splice(TcpStream, Vec<u8>),
}

/// The backend's side: plain, or TLS started here (`tls` on the pool).
enum Joined {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TimedStream>>),
}

/// Copies both ways through userspace buffers until both sides have closed.
async fn pump<C, U>(client: C, upstream: U, activity: &Arc<Activity>) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Tracked {
        inner: client,
        activity: Arc::clone(activity),
        upstream: false,
    };
    let mut upstream = Tracked {
        inner: upstream,
        activity: Arc::clone(activity),
        upstream: true,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER)
        .await
}

/// The TLS handshake of a listener with `tls`, within `request_header_timeout`; the
/// stream and the SNI (when `read_sni`), or `None` (counted, logged at debug).
async fn terminate(
    tls: Arc<rustls::ServerConfig>,
    io: Prefixed<TimedStream>,
    read_sni: bool,
    config: &ListenerConfig,
    stats: &ListenerStats,
    peer: SocketAddr,
) -> Option<(
    crate::tls::ServerStream<Prefixed<TimedStream>>,
    Option<Box<str>>,
)> {
    let limit = config.request_header_timeout;
    match tokio::time::timeout(limit, crate::tls::accept(tls, io, read_sni)).await {
        Ok(Ok(done)) => {
            stats.tls_handshakes.incr();
            // An ACME tls-alpn-01 validation: the handshake was the answer, no backend.
            (done.0.alpn_protocol() != Some(crate::acme::ACME_TLS_ALPN)).then_some(done)
        }
        Ok(Err(e)) => {
            stats.tls_failures.incr();
            tracing::debug!(listener = %config.name, client = %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            stats.tls_failures.incr();
            tracing::debug!(listener = %config.name, client = %peer, timeout = ?limit, "TLS handshake not complete within request_header_timeout");
            None
        }
    }
}

/// `sni_required`: says why a client was closed (at most once a second per listener).
fn refuse_without_sni(config: &ListenerConfig, peer: SocketAddr, why: &str) {
    if let Some(suppressed) = crate::log_limit::allow((&*config.name, "no_sni")) {
        tracing::info!(listener = %config.name, client = %peer, suppressed, reason = %"no_sni", "tcp connection refused by sni_required: {why}");
    }
}

/// Connects to a backend of `pool`, trying others when a connect fails. On failure,
/// returns the reason.
async fn connect(
    pool: &Arc<Pool>,
    key: Option<u64>,
    listener: &str,
    peer: SocketAddr,
    proxy_header: Option<&[u8]>,
    account: &mut Account,
) -> Result<(Joined, Lease), &'static str> {
    let cfg = &pool.config;
    let attempts = (cfg.retries as usize + 1).min(8);
    let mut tried = Vec::with_capacity(attempts);
    let mut reason = "no_healthy_backend";
    // Tries that count against `retries`: not a refused connect (nothing was sent; see
    // `may_try_free`).
    let mut charged = 0;
    let mut first_miss = None;
    loop {
        let attempt = tried.len();
        if charged >= attempts {
            break;
        }
        // No queue for TCP: a connection that finds every backend at max_connections is
        // refused, with its own reason.
        let (idx, lease) = match pool.select(key, &tried) {
            Ok(picked) => picked,
            Err(NoPick::Full) => {
                reason = "backends_full";
                break;
            }
            Err(NoPick::Down) => break,
        };
        tried.push(idx);
        charged += 1;
        if attempt > 0 {
            pool.stats.retries.incr();
        }
        let backend = lease.backend();
        account.attempts = attempt as u32 + 1;
        account.backend = Some(Arc::clone(backend));
        let started = Instant::now();
        let connected = async {
            let stream =
                crate::upstream::connect_tcp(backend.addr, cfg.connect_timeout, proxy_header)
                    .await?;
            let Some(tls) = &pool.tls else {
                return Ok(Joined::Tcp(stream));
            };
            // `connect_timeout` bounds the TLS handshake too, as on HTTP pools.
            let left = cfg.connect_timeout.saturating_sub(started.elapsed());
            let name = tls.server_name(backend.addr.ip(), backend.tls_name.as_ref());
            let stream = TimedStream::upstream(stream, cfg.response_timeout);
            match tokio::time::timeout(left, tls.connector.connect(name, stream)).await {
                Ok(Ok(s)) => Ok(Joined::Tls(Box::new(s))),
                Ok(Err(e)) => Err(ConnectError::Tls(e)),
                Err(_) => Err(ConnectError::Timeout(cfg.connect_timeout)),
            }
        };
        let (error, ejected) = match connected.await {
            Ok(joined) => {
                account.connect = Some(started.elapsed());
                backend.record_success();
                return Ok((joined, lease));
            }
            Err(e) => {
                reason = match e {
                    ConnectError::Timeout(_) => "connect_timeout",
                    ConnectError::Tls(_) => "tls_failed",
                    _ => "connect_failed",
                };
                if e.never_reached()
                    && super::may_try_free(attempt, &mut first_miss, cfg.connect_timeout)
                {
                    charged -= 1;
                }
                let ejected = backend.record_connect_error(&e, &cfg.passive);
                (e.to_string(), ejected)
            }
        };
        if let Some(suppressed) =
            crate::log_limit::allow((&*pool.name, &*backend.label, "tcp_connect", "backend"))
        {
            tracing::warn!(pool = %pool.name, backend = %backend.label, reason = %reason, error = %error, ejected, attempt, suppressed, "backend failed");
        }
    }
    if let Some(suppressed) = crate::log_limit::allow((listener, &*pool.name, "tcp_no_backend")) {
        tracing::warn!(listener, client = %peer, pool = %pool.name, reason = %reason, suppressed, "tcp connection refused: no backend could take it");
    }
    Err(reason)
}

/// One TCP connection's account, written to the counters and the access log on drop.
struct Account {
    listener: Arc<str>,
    client: SocketAddr,
    stats: Arc<ListenerStats>,
    pool: Arc<Pool>,
    log: Option<(AccessLog, std::time::SystemTime)>,
    started: Instant,
    /// The backend connected to, or the last one tried.
    backend: Option<Arc<Backend>>,
    attempts: u32,
    connect: Option<Duration>,
    /// Bytes moved, once joined to a backend.
    activity: Option<Arc<Activity>>,
    /// `ok`, or why it ended otherwise.
    termination: &'static str,
}

impl Drop for Account {
    fn drop(&mut self) {
        let total = self.started.elapsed();
        let (up, down) = self.activity.as_ref().map_or((0, 0), |a| a.totals());
        self.stats.bytes_in.add(up);
        self.stats.bytes_out.add(down);
        if crate::stats::REASONS.contains(&self.termination) {
            self.pool.stats.failed(self.termination);
        }
        self.pool.latency.total.record(total.as_secs_f64());
        if let Some(d) = self.connect {
            self.pool.latency.connect.record(d.as_secs_f64());
        }
        if let Some(b) = self.backend.as_ref().filter(|_| self.connect.is_some()) {
            b.stats.bytes_in.add(up);
            b.stats.bytes_out.add(down);
        }
        if let Some((log, time)) = self.log.take() {
            log.log(Entry {
                time,
                listener: Arc::clone(&self.listener),
                client: self.client,
                forwarded: None,
                request: None,
                status: 0,
                bytes_in: up,
                bytes_out: down,
                pool: Some(Arc::clone(&self.pool.name)),
                backend: self.backend.as_ref().map(|b| Arc::clone(&b.label)),
                attempts: self.attempts,
                connect: self.connect,
                header: None,
                total,
                termination: self.termination,
                request_id: None,
            });
        }
    }
}

/// When either side last moved a byte, and how many each way.
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
    /// Read from the client (sent up) and from the backend (sent down).
    up: AtomicU64,
    down: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        }
    }

    /// `n` bytes read from the backend (`upstream`) or the client.
    fn touch(&self, n: u64, upstream: bool) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
        let side = if upstream { &self.down } else { &self.up };
        side.fetch_add(n, Ordering::Relaxed);
    }

    fn set_totals(&self, up: u64, down: u64) {
        self.up.store(up, Ordering::Relaxed);
        self.down.store(down, Ordering::Relaxed);
    }

    fn totals(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }

    /// Resolves once no byte has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that records activity on every successful read.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The backend's side (its reads go down to the client).
    upstream: bool,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if matches!(polled, Poll::Ready(Ok(()))) && read > 0 {
            self.activity.touch(read as u64, self.upstream);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
