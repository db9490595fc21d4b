//! Accept loops: one per bound listener, one task per downstream connection.
//!
//! A listener holds a semaphore of `max_connections` permits; when they are all taken it
//! stops accepting and new connections wait in the kernel's backlog (HAProxy's `maxconn`).
//! `max_connections_per_client`, when set, bounds what one address may hold of them.
//!
//! HTTP/1.1, over plain TCP or TLS, is served by ballast's own server
//! ([`crate::h1::server`]): it frames requests (400/431/501/417 for what it refuses), runs
//! the request-head and keep-alive timers, and an idle connection holds its socket (and
//! rustls's state) and no buffer (`Conn::serve_own_h1`). HTTP/2 is served by hyper, with
//! its timers in the socket wrapper [`TimedStream`]. Either way `TimedStream` runs the send
//! timeout and the request path the body timeout.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, Method, Request};
use hyper::body::Incoming;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Semaphore};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenerConfig, ListenerMode};
use crate::h1::server::{Ending, RequestBody, Transport};
use crate::handover::Inherited;
use crate::net::{ConnPhase, Prefixed, ReadLimits, TimedStream};
use crate::proxy::context::{ConnCtx, Extras, ListenerCtx};
use crate::proxy::http::handle;
use crate::proxy::tcp::ClientConn;
use crate::proxy::tunnel::{ClientIo, OwnUpgrade};
use crate::request_body::ClientStream;
use crate::state::Live;

/// A listening socket could not be bound (or adopted).
#[derive(Debug, thiserror::Error)]
#[error("listener {listener}: cannot bind {addr}: {source}")]
pub struct BindError {
    pub listener: String,
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds `addr` for listener `name`, or adopts the socket a predecessor or systemd passed.
pub fn bind_named(
    name: &str,
    addr: SocketAddr,
    inherited: &mut Inherited,
) -> Result<TcpListener, BindError> {
    let err = |source| BindError {
        listener: name.to_string(),
        addr,
        source,
    };
    let (sock, adopted) = match inherited.take(name, addr) {
        Some(std) => {
            // Sockets from systemd arrive in blocking mode; tokio needs non-blocking.
            std.set_nonblocking(true).map_err(err)?;
            (TcpListener::from_std(std).map_err(err)?, true)
        }
        None => (bind(addr).map_err(err)?, false),
    };
    let local = sock.local_addr().unwrap_or(addr);
    tracing::info!(listener = %name, addr = %local, inherited = adopted, "listener bound");
    Ok(sock)
}

/// Binds `addr` with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Accepts connections on `listener` until `stop_accepting` fires. Connection tasks are
/// spawned on `tracker`; when `shutdown` fires they finish their current request, answer
/// it with `Connection: close`, and close. The two tokens differ when a reload changes a
/// listener's settings: the old loop stops accepting, a new one takes over the same socket,
/// and the old loop's connections carry on.
pub async fn run(
    listener: Arc<TcpListener>,
    config: ListenerConfig,
    live: Live,
    stop_accepting: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let config = Arc::new(config);
    let name: Arc<str> = config.name.as_str().into();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let tls = match &config.tls {
        None => None,
        Some(t) => match crate::tls::server_config(t) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(listener = %name, error = %e, "cannot set up TLS: not accepting");
                return;
            }
        },
    };
    // Carried from one snapshot to the next by name, so every accept loop this listener
    // has (old and new across a reload) counts into the same one.
    let stats = live
        .load()
        .routers
        .get(&*name)
        .map_or_else(Default::default, |r| Arc::clone(&r.stats));
    // Accepted sockets inherit TCP_NODELAY and TCP_NOTSENT_LOWAT from the listening socket
    // (Linux copies both at accept): set once here, not with two syscalls per connection.
    // A reload's new loop sets its own values; connections the old loop accepts meanwhile
    // get them too, which only matters for a changed `response_buffer`.
    let listening = socket2::SockRef::from(&*listener);
    let unsent = match config.mode {
        ListenerMode::Http => config.response_buffer,
        ListenerMode::Tcp => 0,
    };
    let inherited_options =
        listening.set_tcp_nodelay(true).is_ok() && crate::net::limit_unsent(&*listener, unsent);
    // The address clients connected to, when it is one: only a wildcard bind (0.0.0.0,
    // [::]) needs getsockname(2) per connection to tell.
    let fixed_local = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    let env = Arc::new(Env {
        inherited_options,
        h1_own: crate::h1::server::Server {
            config: own_h1_config(&config),
            shutdown: shutdown.clone(),
        },
        h2: h2_builder(&config),
        read_limits: ReadLimits {
            header_timeout: config.request_header_timeout,
            keepalive_timeout: config.keepalive_timeout,
        },
        shared: Arc::new(ListenerCtx {
            live,
            name: Arc::clone(&name),
            config: Arc::clone(&config),
            tracker: tracker.clone(),
            shutdown,
            stats,
        }),
        tls,
        per_client: config
            .max_connections_per_client
            .map(|max| Arc::new(PerClient::new(max))),
        limit: Arc::clone(&limit),
    });
    // One waiter for the loop's life: made and polled anew per connection, it took a lock
    // to register and another to leave, twice per accepted connection (callgrind).
    let mut stop = std::pin::pin!(stop_accepting.cancelled());
    loop {
        // `biased`: once told to stop, never accept again, even if a connection is ready.
        let permit = tokio::select! {
            biased;
            _ = stop.as_mut() => break,
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.as_mut() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and say so once a
                    // second (clients can cause this, and it repeats every 50 ms).
                    if let Some(suppressed) = crate::log_limit::allow((&*name, "accept_failed")) {
                        tracing::error!(listener = %name, error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let local = match fixed_local {
            Some(addr) => addr,
            None => stream.local_addr().unwrap_or(config.bind),
        };
        let Some(trusted) = &config.accept_proxy else {
            if !env.admit(&stream, peer) {
                continue;
            }
            // The connection's future itself, not one wrapped in an async block: a block
            // would hold its own copies of the arguments beside the future's (rustc keeps
            // both), and the task is what an idle connection costs.
            tracker.spawn(Arc::clone(&env).serve(stream, peer, local, Vec::new(), permit));
            continue;
        };
        if !trusted.contains(peer.ip()) {
            // Refused before a byte is read: only a trusted balancer may speak for clients.
            if let Some(suppressed) = crate::log_limit::allow((&*name, "accept_proxy")) {
                tracing::info!(listener = %name, client = %peer, suppressed, reason = %"untrusted_proxy_source", "connection refused: not from an accept_proxy range");
            }
            continue;
        }
        let env = Arc::clone(&env);
        tracker.spawn(async move {
            let mut stream = stream;
            let limit = env.shared.config.request_header_timeout;
            let (header, rest) = match crate::proxy_protocol::read_header(&mut stream, limit).await {
                Ok(h) => h,
                Err(e) => {
                    if let Some(suppressed) = crate::log_limit::allow((&*env.shared.name, "proxy_header")) {
                        tracing::info!(listener = %env.shared.name, client = %peer, error = %e, suppressed, reason = %"bad_proxy_header", "connection refused: no valid PROXY header");
                    }
                    return;
                }
            };
            // LOCAL / UNKNOWN: the balancer's own connection (a health check); its address stands.
            let (peer, local) = match (header.source, header.destination) {
                (Some(src), Some(dst)) if header.proxied => (src, dst),
                _ => (peer, local),
            };
            if !env.admit(&stream, peer) {
                return;
            }
            // A task of its own: this one is sized for reading the PROXY header, which an
            // idle connection no longer needs.
            let tracker = env.shared.tracker.clone();
            tracker.spawn(env.serve(stream, peer, local, rest, permit));
        });
    }
    tracing::info!(listener = %name, "listener stopped accepting");
}

/// What every connection of one accept loop shares.
struct Env {
    /// TCP_NODELAY and TCP_NOTSENT_LOWAT are set on the listening socket (see [`run`]).
    inherited_options: bool,
    /// What its connections share (and hold a pointer to).
    shared: Arc<ListenerCtx>,
    tls: Option<Arc<rustls::ServerConfig>>,
    h1_own: crate::h1::server::Server,
    h2: http2::Builder<TokioExecutor>,
    read_limits: ReadLimits,
    per_client: Option<Arc<PerClient>>,
    /// `max_connections`: one permit per open connection.
    limit: Arc<Semaphore>,
}

impl Env {
    /// Applies a TCP listener's `allow_from` / `deny_from` and `max_connections_per_client`
    /// to `peer`: false if refused (and answered, or closed).
    /// An admitted connection holds its share until [`Env::release`]; [`Env::serve`] must
    /// follow at once.
    fn admit(&self, stream: &TcpStream, peer: SocketAddr) -> bool {
        let config = &self.shared.config;
        // An HTTP listener answers a refused client with a 403 per request (see
        // `proxy::http`); a TCP listener has no way to say why, and closes.
        if config.mode == ListenerMode::Tcp && !config.access.permits(peer.ip()) {
            if let Some(suppressed) = crate::log_limit::allow((&*config.name, "denied")) {
                tracing::info!(listener = %config.name, client = %peer, suppressed, reason = %"denied", "connection refused by allow_from / deny_from");
            }
            return false;
        }
        let Some(table) = self.per_client(peer.ip()) else {
            return true;
        };
        if table.acquire(peer.ip()) {
            return true;
        }
        refuse_over_limit(stream, &self.shared.config, peer, table.max);
        false
    }

    /// The `max_connections_per_client` table that counts connections from `peer`. None
    /// for a proxy in `trusted_proxies`: its connections carry many clients' requests.
    fn per_client(&self, peer: IpAddr) -> Option<&PerClient> {
        let trusted = &self.shared.config.trusted_proxies;
        self.per_client
            .as_deref()
            .filter(|_| !trusted.as_ref().is_some_and(|t| t.contains(peer)))
    }

    /// Gives back what a connection from `client` took: its `max_connections` permit, its
    /// share of `max_connections_per_client` and its place in the open count. Called once,
    /// when the connection's [`Conn`] (HTTP) or [`Held`] (TCP) drops.
    fn release(&self, client: IpAddr) {
        self.limit.add_permits(1);
        if let Some(table) = self.per_client(client) {
            table.release(client);
        }
        self.shared.stats.closed();
    }

    /// Serves one connection. `peer` and `local` are the client's addresses (from a PROXY
    /// header when there was one); `prefix` holds bytes read past that header.
    /// `permit` and what [`Env::admit`] took become the connection's, given back by
    /// [`Env::release`] when its `Conn` or `Held` drops (one pointer there instead of three
    /// guards in every idle connection).
    ///
    /// Not an `async fn`: the setup runs here, before the task exists, so the future keeps
    /// none of these arguments (an async fn or block stores its arguments for its whole life,
    /// and this future is most of what an idle connection's task holds). Plain HTTP/1.1 is
    /// the future itself; TLS, HTTP/2 and TCP are boxed (several KiB each), so the task is
    /// not sized for them.
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        prefix: Vec<u8>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> impl std::future::Future<Output = ()> + Send {
        permit.forget();
        self.shared.stats.opened();
        if !self.inherited_options {
            let _ = stream.set_nodelay(true);
        }
        if self.shared.config.mode == ListenerMode::Tcp {
            let held = Held {
                env: Arc::clone(&self),
                client: peer.ip(),
            };
            let client = if self.shared.config.splice {
                ClientConn::Splice(stream, prefix)
            } else {
                ClientConn::Copy(Prefixed::new(
                    prefix,
                    TimedStream::tcp_client(stream, self.shared.config.send_timeout),
                ))
            };
            // No reaction to `shutdown`: an open TCP connection is in-flight work, and a
            // graceful shutdown waits for it (up to shutdown_timeout).
            let live = Arc::clone(&self.shared.live);
            let stats = Arc::clone(&self.shared.stats);
            let config = Arc::clone(&self.shared.config);
            let tls = self.tls.clone();
            return Either::Right(Box::pin(async move {
                let _held = held;
                crate::proxy::tcp::serve(client, peer, local, live, config, stats, tls).await
            }) as BoxedConn);
        }
        if !self.inherited_options {
            let _ = crate::net::limit_unsent(&stream, self.shared.config.response_buffer);
        }
        let ctx = Arc::new(ConnCtx {
            listener: Arc::clone(&self.shared),
            forwarded_for: crate::proxy::headers::client_header(peer.ip()),
            peer,
            local,
            phase: ConnPhase::default(),
            extras: Default::default(),
        });
        let send_timeout = self.shared.config.send_timeout;
        if self.tls.is_none() && !ctx.config().h2c {
            // ballast's own server runs the read timers; the stream times writes. Boxed
            // once: the idle task then holds a pointer to the stream.
            let io = Box::new(Prefixed::new(
                prefix,
                TimedStream::tcp_client(stream, send_timeout),
            ));
            return Either::Left(Conn::serve_own_h1(Conn { ctx, env: self }, io));
        }
        let owner: Arc<dyn crate::net::HasPhase> = Arc::clone(&ctx) as _;
        let timed = TimedStream::downstream(stream, send_timeout, owner, self.read_limits);
        let io = Prefixed::new(prefix, timed);
        let conn = Conn { ctx, env: self };
        Either::Right(Box::pin(async move {
            match &conn.env.tls {
                None => conn.serve_auto(io).await,
                Some(tls) => conn.serve_tls(tls, io).await,
            }
        }) as BoxedConn)
    }
}

/// A connection served by a boxed future (TLS, HTTP/2, TCP).
type BoxedConn = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A TCP connection's place in the listener's counts and limits, given back on drop (an
/// HTTP connection's [`Conn`] does the same).
struct Held {
    env: Arc<Env>,
    client: IpAddr,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.env.release(self.client);
    }
}

/// ballast's own HTTP/1.1 server's limits and timers, from the listener's settings.
fn own_h1_config(config: &ListenerConfig) -> crate::h1::server::ServerConfig {
    crate::h1::server::ServerConfig {
        limits: crate::h1::Limits {
            max_head: config.max_header_size,
            max_headers: config.max_headers,
        },
        head_timeout: config.request_header_timeout,
        keepalive_timeout: config.keepalive_timeout,
        read_size: READ_SIZE,
        first_request_grace: FIRST_REQUEST_GRACE.min(config.request_header_timeout),
        relay_fields: true,
    }
}

/// What one read asks for while a message is in flight (hyper's first read buffer is the
/// same size): a typical request head fits in one read, and an idle connection holds none.
const READ_SIZE: usize = 8 * 1024;

/// HTTP/2 server limits. Each bounds a known abuse:
/// - many streams at once: `max_concurrent_streams` (RFC 9113 §5.1.2);
/// - huge or endless header blocks, CONTINUATION floods: `max_header_list_size`, which h2
///   enforces while the block is still arriving;
/// - rapid reset (CVE-2023-44487): at most `max_pending_accept_reset_streams` streams reset
///   before ballast accepted them, and `max_local_error_reset_streams` streams ballast had to
///   reset for the peer's errors; past either the connection gets GOAWAY;
/// - SETTINGS and PING floods: h2 answers each with one ACK queued behind a bounded send
///   buffer, and stops reading while it cannot write, so a peer that floods without reading
///   stalls itself and meets `send_timeout`;
/// - a slow reader: `max_send_buf_size` caps what one stream queues for it.
fn h2_builder(config: &ListenerConfig) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // WebSocket over HTTP/2 (RFC 8441, `proxy::websocket_h2`).
        .enable_connect_protocol()
        .max_header_list_size(u32::try_from(config.max_header_size).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_RESETS))
        .max_send_buf_size(config.response_buffer)
        // A peer that stops answering PINGs is gone; its streams are cancelled.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// On shutdown, how long a just-accepted HTTP/1 connection may take to send its first
/// request (which then gets `Connection: close`) before it is closed.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

const H2_MAX_CONCURRENT_STREAMS: u32 = 128;
const H2_MAX_PENDING_RESETS: usize = 32;
const H2_MAX_LOCAL_RESETS: usize = 256;
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// One accepted client connection and what it needs to be served. Small on purpose: it
/// lives in the connection's task for as long as the connection. Dropping it gives back
/// the connection's place in the listener's counts and limits ([`Env::release`]).
struct Conn {
    ctx: Arc<ConnCtx>,
    env: Arc<Env>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.env.release(self.ctx.peer.ip());
    }
}

impl Conn {
    /// TLS: the handshake, then HTTP/2 or HTTP/1.1 as ALPN chose. Each step is boxed apart
    /// and the handshake's box is freed when it ends, so an idle connection holds only the
    /// protocol it speaks (one box sized for all three was 6.5 KB per connection).
    async fn serve_tls(&self, tls: &Arc<rustls::ServerConfig>, io: Prefixed<TimedStream>) {
        // Read only where a route matches on it: an idle TLS connection holds no more than
        // it needs.
        let read_sni = self.ctx.config().routes.iter().any(|r| r.sni.is_some());
        let Some((mut stream, sni)) = Box::pin(self.handshake(tls, io, read_sni)).await else {
            return;
        };
        if let Some(sni) = sni {
            // Set before any request, so `send_proxy` finds it made.
            let _ = self.ctx.extras.set(Arc::new(Extras::with_sni(sni)));
        }
        if stream.alpn_protocol() == Some(crate::acme::ACME_TLS_ALPN) {
            // An ACME tls-alpn-01 validation: the handshake was the answer.
            return;
        }
        if stream.alpn_protocol() == Some(b"h2") {
            Box::pin(self.serve_h2(stream)).await
        } else {
            // ballast's own server runs the head and keep-alive timers.
            stream.get_mut().get_mut().untime_reads();
            Box::pin(Conn::serve_own_h1(
                self,
                Box::new(Prefixed::new(Vec::new(), stream)),
            ))
            .await
        }
    }

    /// The TLS handshake, within `request_header_timeout`; `None` (logged and counted) if
    /// it failed.
    async fn handshake(
        &self,
        tls: &Arc<rustls::ServerConfig>,
        io: Prefixed<TimedStream>,
        read_sni: bool,
    ) -> Option<(
        crate::tls::ServerStream<Prefixed<TimedStream>>,
        Option<Box<str>>,
    )> {
        let conn = self;
        // The same timer as a request head: a handshake that stalls is cut.
        let limit = conn.ctx.config().request_header_timeout;
        match tokio::time::timeout(limit, crate::tls::accept(Arc::clone(tls), io, read_sni)).await {
            Ok(Ok(s)) => {
                conn.env.shared.stats.tls_handshakes.incr();
                Some(s)
            }
            Ok(Err(e)) => {
                conn.env.shared.stats.tls_failures.incr();
                if is_invalid_sni(&e) {
                    // rustls refuses these before any certificate is chosen and has no
                    // setting to serve them the default one (README, "Known limit"); say so
                    // where an operator looks, at most once a second.
                    if let Some(suppressed) =
                        crate::log_limit::allow((&*conn.ctx.listener.name, "invalid_sni"))
                    {
                        tracing::info!(listener = %conn.ctx.listener.name, client = %conn.ctx.peer, suppressed, reason = %"invalid_sni", "TLS handshake refused: the client's SNI is not a host name (e.g. host:port)");
                    }
                    return None;
                }
                tracing::debug!(listener = %conn.ctx.listener.name, client = %conn.ctx.peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                conn.env.shared.stats.tls_failures.incr();
                tracing::debug!(listener = %conn.ctx.listener.name, client = %conn.ctx.peer, timeout = ?limit, "TLS handshake not complete within request_header_timeout");
                None
            }
        }
    }

    /// HTTP/1.1 over TCP or TLS, on ballast's own server ([`crate::h1::server`]): the request
    /// path runs in this task, a connection holds a read buffer only while a message is in
    /// flight, and an idle keep-alive connection waits for its next request's first byte
    /// holding no buffer (BENCHMARKS.md, issue 10). On shutdown an idle connection closes,
    /// the request in progress finishes with `Connection: close`, and a just-accepted
    /// connection's first request is still served.
    ///
    /// Not an `async fn`, which would keep a second copy of each argument. Takes the
    /// connection owned (plain HTTP/1.1: this is the task's whole future) or borrowed (TLS
    /// and `h2c`, whose box holds it).
    #[allow(clippy::manual_async_fn)] // see above: the size of the future
    fn serve_own_h1<C, T>(
        conn: C,
        io: Box<Prefixed<T>>,
    ) -> impl std::future::Future<Output = ()> + Send
    where
        C: std::borrow::Borrow<Conn> + Send + Sync,
        T: Transport + Send + 'static,
    {
        async move {
            // The sending end of the stream for a request that asks to switch protocols: the
            // request carries the receiving end to the tunnel (`tunnel::ClientUpgrade`).
            // Boxed: an upgrade is rare, and the slot is part of every idle connection.
            let mut switched: Option<Box<oneshot::Sender<Box<dyn ClientIo>>>> = None;
            let service = |mut req: Request<RequestBody>| {
                let upgrade = req.headers().contains_key(header::UPGRADE)
                    || req.body().fields().is_some_and(|f| f.has_upgrade());
                if req.method() == Method::CONNECT || upgrade {
                    let (tx, rx) = oneshot::channel();
                    switched = Some(Box::new(tx));
                    req.extensions_mut()
                        .insert(OwnUpgrade(Arc::new(Mutex::new(Some(rx)))));
                }
                let ctx = Arc::clone(&conn.borrow().ctx);
                async move {
                    let mut response = match handle(req.map(ClientStream::H1), ctx).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    };
                    // A backend's fields, written once for this client as they were read.
                    let fields = response.body_mut().take_fields();
                    crate::h1::server::Relayed { response, fields }
                }
            };
            let ending = crate::h1::server::serve(io, &conn.borrow().env.h1_own, service).await;
            let peer = &conn.borrow().ctx.peer;
            match ending {
                Ending::Closed => {}
                Ending::Upgraded { mut io, read_ahead } => {
                    // Bytes the client sent right behind its request belong to the tunnel.
                    io.put_back(&read_ahead);
                    if let Some(tx) = switched.take() {
                        let _ = tx.send(io);
                    }
                }
                Ending::Refused(rejection) => {
                    tracing::debug!(client = %peer, status = rejection.status.as_u16(), reason = rejection.reason, "request head refused");
                }
                Ending::HeadTimeout => {
                    tracing::debug!(client = %peer, "request head not complete within request_header_timeout");
                }
                Ending::ResponseFailed => {
                    tracing::debug!(client = %peer, "response body failed; connection closed");
                }
                Ending::Io(e) => {
                    tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
                }
            }
        }
    }

    /// HTTP/2. On shutdown, or after `keepalive_timeout` with no open stream, GOAWAY: the
    /// client opens no new stream here, the open ones finish.
    async fn serve_h2<I: Io>(&self, io: I) {
        self.ctx.phase.multiplexed();
        let ctx = Arc::clone(&self.ctx);
        // hyper spawns a task per stream and moves the service future into it: boxed, that
        // move is a pointer, not the whole request path's state (measured: the copies were
        // ~4% of CPU under h2load).
        let svc = service_fn(move |req: Request<Incoming>| {
            Box::pin(handle(req.map(ClientStream::Hyper), Arc::clone(&ctx)))
        });
        let conn = self.env.h2.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.env.shared.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = idle(&self.ctx.phase, self.ctx.config().keepalive_timeout) => {
                tracing::debug!(client = %self.ctx.peer, "HTTP/2 connection idle for keepalive_timeout: GOAWAY");
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        self.log_end(result.err());
    }

    /// `h2c = true`: HTTP/2 with prior knowledge (the connection preface) or HTTP/1.1.
    async fn serve_auto(&self, mut io: Prefixed<TimedStream>) {
        let (h2, seen) = match sniff_h2_preface(&mut io).await {
            Ok(sniffed) => sniffed,
            Err(e) => {
                tracing::debug!(client = %self.ctx.peer, error = %e, "client connection ended before a request");
                return;
            }
        };
        io.put_back(&seen);
        // Boxed apart, as in `serve_tls`: an idle connection holds only its own protocol.
        if h2 {
            Box::pin(self.serve_h2(io)).await
        } else {
            io.get_mut().untime_reads();
            Box::pin(Conn::serve_own_h1(self, Box::new(io))).await
        }
    }

    fn log_end(&self, error: Option<hyper::Error>) {
        if let Some(e) = error {
            // hyper's message names the step; the cause (e.g. one of our timeouts) is its source.
            let cause = std::error::Error::source(&e).map(|c| c.to_string());
            tracing::debug!(client = %self.ctx.peer, error = %e, cause = cause.as_deref().unwrap_or("-"), "client connection ended with an error");
        }
    }
}

/// What a client connection can be served over: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Reads until the bytes seen either are the HTTP/2 connection preface or cannot become it;
/// returns which, with the bytes read (to be replayed to the server).
async fn sniff_h2_preface<I: Io>(io: &mut I) -> std::io::Result<(bool, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut seen = Vec::with_capacity(PREFACE.len());
    let mut buf = [0u8; 24];
    while seen.len() < PREFACE.len() {
        let want = PREFACE.len() - seen.len();
        let n = io.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&buf[..n]);
        if !PREFACE.starts_with(&seen) {
            return Ok((false, seen));
        }
    }
    Ok((true, seen))
}

/// Resolves once a multiplexed connection has had no open request for `timeout`.
async fn idle(phase: &ConnPhase, timeout: Duration) {
    // Sampled four times per timeout: an idle connection closes after 1 to 1.25 timeouts.
    let tick = (timeout / 4).max(Duration::from_millis(10));
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        if phase.active() == 0 {
            quiet += tick;
            if quiet >= timeout {
                return;
            }
        } else {
            quiet = Duration::ZERO;
        }
    }
}

/// Open connections per client address, for `max_connections_per_client`.
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerClient {
    fn new(max: usize) -> PerClient {
        PerClient {
            max,
            open: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more connection from `ip`, unless it has `max` already.
    fn acquire(&self, ip: IpAddr) -> bool {
        let mut open = self.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return false;
        }
        *n += 1;
        true
    }
}

impl PerClient {
    /// A connection from `ip` counted by [`PerClient::acquire`] ended.
    fn release(&self, ip: IpAddr) {
        let mut open = self.lock();
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                // Entries live only while the address has connections: memory follows load.
                open.remove(&ip);
            }
        }
    }
}

/// Answers a connection over its address's limit with 429 (best effort, without reading or
/// waiting; a TCP listener just closes) and closes it.
fn refuse_over_limit(stream: &TcpStream, config: &ListenerConfig, peer: SocketAddr, max: usize) {
    let listener = config.name.as_str();
    if config.mode == ListenerMode::Http {
        let _ = stream.try_write(
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 22\r\nconnection: close\r\n\r\n429 Too Many Requests\n",
        );
    }
    if let Some(suppressed) = crate::log_limit::allow((listener, "max_connections_per_client")) {
        tracing::info!(listener, client = %peer, max, suppressed, reason = %"too_many_connections", "connection refused: client is at max_connections_per_client");
    }
}

/// A handshake rustls refused because the ClientHello's server name is not a DNS name
/// (Go's `hey` sends "127.0.0.1:8443").
fn is_invalid_sni(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::PeerMisbehaved(
                    rustls::PeerMisbehaved::ServerNameMustContainOneHostName
                ) | rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidServerName)
            )
        })
}

#[cfg(test)]
mod tests {
    /// `run` sets TCP_NODELAY and TCP_NOTSENT_LOWAT once on the listening socket and relies
    /// on accepted sockets inheriting both (no per-connection setsockopt). This pins that
    /// kernel behaviour on the machine the tests run on.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listening_sockets_options() {
        let listener = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listening = socket2::SockRef::from(&listener);
        listening.set_tcp_nodelay(true).unwrap();
        assert!(crate::net::limit_unsent(&listener, 12_345));
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap());
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), 12_345);
    }

    /// An idle keep-alive connection is mostly its task: tokio's task cell is the
    /// connection's future plus 128 bytes (the tracker's token, header, scheduler, id,
    /// trailer), in 128-byte steps. The future must stay within 384 bytes for the cell to
    /// stay at 512 (it was 1,280; BENCHMARKS.md, issue 24 third pass). This pins the size
    /// where a change to the connection path would grow it unnoticed: a local held across
    /// an await, an argument an `async fn` copies, a `select!`.
    #[tokio::test]
    async fn an_idle_plain_http1_connection_future_fits_its_size_class() {
        use std::sync::Arc;
        let text = r#"
            [listeners.web]
            bind = "127.0.0.1:0"
            pool = "app"
            [pools.app]
            backends = ["127.0.0.1:1"]
        "#;
        let config = crate::config::Config::from_toml_str(text, std::path::Path::new("t.toml"))
            .expect("test config parses");
        let listener_config = Arc::new(config.listeners[0].clone());
        let tracker = tokio_util::task::TaskTracker::new();
        let env = Arc::new(super::Env {
            inherited_options: true,
            shared: Arc::new(super::ListenerCtx {
                live: Arc::new(arc_swap::ArcSwap::from_pointee(
                    crate::state::Snapshot::empty(),
                )),
                name: "web".into(),
                config: Arc::clone(&listener_config),
                tracker: tracker.clone(),
                shutdown: tokio_util::sync::CancellationToken::new(),
                stats: Default::default(),
            }),
            h1_own: crate::h1::server::Server {
                config: super::own_h1_config(&listener_config),
                shutdown: tokio_util::sync::CancellationToken::new(),
            },
            h2: super::h2_builder(&listener_config),
            read_limits: crate::net::ReadLimits {
                header_timeout: listener_config.request_header_timeout,
                keepalive_timeout: listener_config.keepalive_timeout,
            },
            tls: None,
            per_client: None,
            limit: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        let listener = super::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let permit = Arc::clone(&env.limit).acquire_owned().await.unwrap();
        let connection = env.serve(stream, peer, addr, Vec::new(), permit);
        let size = std::mem::size_of_val(&connection);
        assert!(
            size <= 384,
            "the plain HTTP/1.1 connection future is {size} bytes (at most 384)"
        );
    }

    /// Every connection holds its `ConnCtx` in an `Arc` for its whole life: the `Arc`'s
    /// allocation (two counts and the context) stays within jemalloc's 160-byte class.
    #[test]
    fn a_connection_context_fits_its_size_class() {
        let size = 16 + std::mem::size_of::<crate::proxy::context::ConnCtx>();
        assert!(size <= 160, "Arc<ConnCtx> is {size} bytes (at most 160)");
    }
}
