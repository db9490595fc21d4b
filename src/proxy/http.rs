//! The HTTP request path: route → select → forward → stream the response back.
//!
//! One call of [`handle`] per request. It loads the live snapshot once, so a request sees a
//! single config generation from start to end. Errors are logged once, here, with pool,
//! backend and reason, and turned into a short plain-text response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::abandoned;
use super::error::{ProxyError, Side};
use super::exchange::{BytesIn, Exchange};
use super::headers;
use super::rules;
use super::tunnel;
use crate::balance::backend::Lease;
use crate::balance::policy::hash_key;
use crate::balance::{NoPick, Pool};
use crate::config::{HashKey, ListenerConfig, UpstreamProtocol};
use crate::net::ConnPhase;
use crate::request_body::{self, BodyLimits, BodyWatch, ClientStream, UpstreamBody};
use crate::state::{Live, Snapshot};
use crate::upstream::{ConnSettings, Sender};

/// How often a queued request looks for a free backend without being woken.
const QUEUE_RECHECK: Duration = Duration::from_millis(250);

/// Upper bound on attempts per request, whatever `retries` says.
const MAX_ATTEMPTS: usize = 8;

/// Facts about one downstream connection, shared by its requests.
#[derive(Debug)]
pub struct ConnCtx {
    pub live: Live,
    pub listener: Arc<str>,
    /// The listener's settings when the connection was accepted.
    pub config: Arc<ListenerConfig>,
    pub peer: SocketAddr,
    /// The client's address as it goes into `X-Forwarded-For`.
    pub forwarded_for: HeaderValue,
    /// The address the client connected to (from a PROXY header when there was one).
    pub local: SocketAddr,
    /// `"http"` or `"https"`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// Where upgrade tunnels are spawned, so a graceful shutdown waits for them too.
    pub tracker: tokio_util::task::TaskTracker,
    /// Busy while a request is served, idle after: the socket's read timers follow it.
    pub phase: Arc<ConnPhase>,
    /// This client connection's own upstream connection, for pools with `send_proxy`
    /// (made on first use: most connections never need one).
    pub private: std::sync::OnceLock<Arc<PrivateConn>>,
    /// Fires when the connection must close after its current request (shutdown).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The listener's counters.
    pub stats: Arc<crate::stats::ListenerStats>,
}

/// An upstream connection that belongs to one client connection: with `send_proxy` its
/// PROXY header names that client, so it must never carry another client's requests. It is
/// kept for the client's next request to the same backend, and closes with the client.
#[derive(Default)]
pub struct PrivateConn(std::sync::Mutex<Option<(SocketAddr, Sender)>>);

impl PrivateConn {
    fn take(&self, addr: SocketAddr) -> Option<Sender> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some((a, s)) if a == addr && s.is_ready() => Some(s),
            _ => None,
        }
    }

    fn put(&self, addr: SocketAddr, sender: Sender) {
        if !sender.is_closed() {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((addr, sender));
        }
    }
}

impl std::fmt::Debug for PrivateConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateConn")
    }
}

type Inner = Either<UpstreamResponseBody, Full<Bytes>>;

/// A response body on its way to the client. Once hyper has finished with it (dropped it),
/// the request is over: the connection is idle and its keep-alive timer runs, and the
/// request is counted and logged (see [`Exchange`]).
pub struct ProxyBody {
    inner: Inner,
    ex: Exchange,
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Bodies that are empty by framing (HEAD, 204, 304) are never polled to the end.
        if self.inner.is_end_stream() {
            self.ex.complete = true;
        }
    }
}

/// Proxies one request. Never fails: errors become 4xx/5xx responses.
pub async fn handle(
    req: Request<ClientStream>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    ctx.phase.busy();
    let snap = ctx.live.load_full();
    let log = snap
        .access_log
        .as_ref()
        .filter(|_| ctx.config.access_log)
        .cloned();
    // Lives inside this future until the response exists: a client that leaves before that
    // (an HTTP/2 reset) drops it here, and it is counted as 499.
    let mut ex = Exchange::start(Arc::clone(&ctx), &req, log);
    // The matched route's response rules, set by `respond` once it has routed.
    let mut response_rules = None;
    let mut resp = respond(req, &ctx, &snap, &mut ex, &mut response_rules).await;
    if let Some(r) = response_rules {
        rules::apply(r, resp.headers_mut(), &rules::Vars::of(&ctx, &ex));
    }
    drop(snap);
    ex.status = resp.status().as_u16();
    // A switched HTTP/1.1 connection belongs to its tunnel now: no keep-alive timer on it.
    // (An HTTP/2 tunnel is one stream; it stays counted until it ends.)
    let tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || resp.extensions().get::<Tunnel>().is_some();
    if tunnel && !ctx.phase.is_multiplexed() {
        ex.armed = false;
    }
    // Shutting down: this is the connection's last response; say so (hyper does too when
    // told before the head is written, but a quick response can beat that).
    if !tunnel && !ctx.phase.is_multiplexed() && ctx.shutdown.is_cancelled() {
        close_after(&mut resp);
    }
    Ok(resp.map(|inner| ProxyBody { inner, ex }))
}

/// Marks a response whose connection was handed to a tunnel (CONNECT).
#[derive(Clone, Copy)]
struct Tunnel;

async fn respond<'s>(
    mut req: Request<ClientStream>,
    ctx: &ConnCtx,
    snap: &'s Snapshot,
    ex: &mut Exchange,
    response_rules: &mut Option<&'s crate::config::HeaderRules>,
) -> Response<Inner> {
    let Some(router) = snap.routers.get(&*ctx.listener) else {
        return error_response(&ProxyError::ListenerGone, ex);
    };
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host_field = hosts.next();
    if hosts.next().is_some() {
        // Two Host fields make the target ambiguous (RFC 9112 §3.2): refuse, like nginx.
        return reject(ctx, StatusCode::BAD_REQUEST, "several Host fields");
    }
    if host_field.is_none() && req.version() == Version::HTTP_11 {
        // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400.
        return reject(ctx, StatusCode::BAD_REQUEST, "no Host field");
    }
    if ctx.config.redirect_https {
        return redirect_https(&req, ctx);
    }
    let connect = req.method() == Method::CONNECT;
    if connect && !ctx.config.allow_connect {
        return reject(
            ctx,
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not allowed",
        );
    }
    let host = host_field
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(headers::host_without_port);
    // Route and forward the path the backend will act on, not one that dot-segments change.
    let normalized = match headers::normalize_path(req.uri().path()) {
        Ok(n) => n,
        Err(headers::PathAboveRoot) => {
            return reject(ctx, StatusCode::BAD_REQUEST, "path climbs above the root")
        }
    };
    let path = normalized.as_deref().unwrap_or(req.uri().path());
    let target = router.route(host, path);
    let rewritten = target
        .rewrite
        .as_ref()
        .map(|(prefix, with)| rules::rewrite_prefix(path, prefix, with));
    let pool = &target.pool;
    ex.pool = Some(Arc::clone(pool));
    *response_rules = target.response_headers.as_ref();
    // Before the body is read or a backend chosen: a limited client costs neither.
    for limiter in [router.rate_limit.as_deref(), target.rate_limit.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Err(wait) = limiter.check(limiter.key_of(req.headers(), ctx.peer.ip())) {
            return rate_limited(ctx, ex, wait);
        }
    }
    let key = pool
        .hash_key()
        .and_then(|k| request_hash(k, &req, ctx.peer));

    let h2_backend = pool.config.protocol == UpstreamProtocol::H2;
    // An HTTP/1.1 upgrade cannot cross to an HTTP/2 backend; it is dropped like any other
    // protocol the route does not allow.
    let upgrade = tunnel::requested_upgrade(req.headers(), &target.upgrade).filter(|_| !h2_backend);
    // `TE: trailers` is hop-by-hop, yet gRPC servers require it on HTTP/2: keep that one.
    let te_trailers = h2_backend
        && req.headers().get_all(http::header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    let client_upgrade =
        (upgrade.is_some() || connect).then(|| tunnel::ClientUpgrade::of(&mut req));
    let (mut parts, body) = req.into_parts();
    if let Some(path) = rewritten.or(normalized) {
        let query = parts.uri.query().map_or(String::new(), |q| format!("?{q}"));
        parts.uri =
            Uri::try_from(format!("{path}{query}")).unwrap_or_else(|_| Uri::from_static("/"));
    }
    let close = headers::remove_hop_by_hop(&mut parts.headers);
    if close {
        ctx.phase.closing();
    }
    // ballast answers `Expect: 100-continue` itself, when it starts reading the body.
    parts.headers.remove(http::header::EXPECT);
    if let Some(protocol) = upgrade {
        tunnel::restore_upgrade_headers(&mut parts.headers, protocol);
    }
    if !parts.headers.contains_key(http::header::HOST) {
        // HTTP/2 carries the host in `:authority`; an HTTP/1.1 backend needs `Host`.
        if let Some(v) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(http::header::HOST, v);
        }
    }
    headers::add_forwarded(&mut parts.headers, &ctx.forwarded_for, ctx.proto);
    if ctx.config.request_id {
        ex.request_id = Some(rules::request_id(&mut parts.headers));
    }
    if let Some(r) = &target.request_headers {
        rules::apply(r, &mut parts.headers, &rules::Vars::of(ctx, ex));
    }
    if h2_backend {
        // HTTP/2 carries scheme and authority as pseudo-headers, taken from an absolute URI.
        let scheme = if pool.tls.is_some() { "https" } else { "http" };
        let authority = parts
            .headers
            .remove(http::header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .unwrap_or_else(|| "localhost".to_owned());
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(format!("{scheme}://{authority}{pq}"))
            .unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_2;
        if te_trailers {
            parts
                .headers
                .insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
    } else {
        if parts.uri.scheme().is_some() {
            // Absolute-form from the client: backends expect origin-form.
            let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
        }
        parts.version = Version::HTTP_11;
    }

    let limits = BodyLimits {
        read_timeout: ctx.config.request_body_timeout,
        max_size: ctx.config.max_request_body,
        buffer: pool
            .config
            .request_buffering
            .unwrap_or(ctx.config.request_buffering),
    };
    // Before any backend is chosen: a slow or broken body costs no backend anything.
    let body = match request_body::prepare(body, limits).await {
        Ok(b) => b,
        Err(fault) => return error_response(&ProxyError::Client(fault), ex),
    };
    ex.bytes_in = BytesIn::of(&body);
    match forward(parts, body, pool, key, client_upgrade, ctx, ex).await {
        Ok(resp) => resp,
        Err(e) => error_response(&e, ex),
    }
}

/// Sends the request to a backend of `pool`, waiting in the pool's queue when every backend
/// is at its `max_connections`, and retrying on another backend for what `retry_on` names,
/// within `retries` and the retry budget: a request that never left (connect failed, or
/// hyper handed it back) can always go again; after a reset or a retried status only an
/// idempotent one (or any, with `non_idempotent`) whose body is in hand (none, or buffered). A failure the client
/// caused is returned at once, with no retry and no mark against the backend.
///
/// Not an `async fn`: rustc would keep its arguments twice in the future (as captured and as
/// moved into locals), 400 bytes more in every request's future; the block uses them in
/// place.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    parts: http::request::Parts,
    body: UpstreamBody,
    pool: &'a Arc<Pool>,
    key: Option<u64>,
    client_upgrade: Option<tunnel::ClientUpgrade>,
    ctx: &'a ConnCtx,
    ex: &'a mut Exchange,
) -> impl std::future::Future<Output = Result<Response<Inner>, ProxyError>> + Send + 'a {
    async move {
        let tracker = &ctx.tracker;
        // With `send_proxy`, connections are this client's own (see `PrivateConn`).
        let private = cfg_send_proxy(pool).map(|v| {
            (
                crate::proxy_protocol::encode(v, ctx.peer, ctx.local),
                ctx.private.get_or_init(Default::default),
            )
        });
        let cfg = &pool.config;
        let settings = ConnSettings {
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_idle: cfg.max_idle_per_backend,
            send_timeout: cfg.response_timeout,
            protocol: cfg.protocol,
        };
        let connect = parts.method == Method::CONNECT;
        // Whether sending it again after the backend saw it is safe.
        let resendable = cfg.retry_on.non_idempotent || is_idempotent(&parts.method);
        let watch = body.watch();
        // Kept only when the body is in hand: such a request can be sent again after a failure.
        let resend = if cfg.retries > 0 {
            body.try_clone().map(|b| (parts.clone(), b))
        } else {
            None
        };
        // `resend` only ever holds a body in hand, so its copy always exists; never fall back to
        // another body (that would send the wrong request).
        let copy = || {
            let (p, b) = resend.as_ref()?;
            Some(Request::from_parts(p.clone(), b.try_clone()?))
        };
        let mut req = Request::from_parts(parts, body);
        // Attempts that count against `retries`: not one that never reached its backend
        // (a refused connection, or a pooled one closed before the request was written;
        // see `may_try_free`).
        let attempts = (cfg.retries as usize + 1).min(MAX_ATTEMPTS);
        let mut charged = 0usize;
        let mut free_retry = false;
        let mut first_miss = None;
        let mut tried: smallvec::SmallVec<[usize; MAX_ATTEMPTS]> = smallvec::SmallVec::new();
        let mut last_error: Option<ProxyError> = None;
        // A response with a status in `retry_on`, kept while another backend is tried: it is
        // the answer if that fails too. Boxed: it lives across every await below, and a request
        // that is not retried for its status should not carry its room.
        let mut answered: Option<Box<(Response<Inner>, Arc<crate::balance::backend::Backend>)>> =
            None;
        let budget = pool.retry_budget.as_deref().zip(cfg.retry_budget.as_ref());
        if let Some((budget, _)) = budget {
            budget.request();
        }

        loop {
            let attempt = tried.len();
            if attempt > 0 && !free_retry {
                if charged >= attempts {
                    break;
                }
                if let Some((budget, limits)) = budget {
                    if !budget.try_retry(limits) {
                        pool.stats.retries_over_budget.incr();
                        log_retry_refused(&pool.name);
                        break;
                    }
                }
                if let Some(pause) = cfg.retry_backoff {
                    tokio::time::sleep(pause).await;
                }
            }
            let tried_now = &tried[..];
            // Requests already queued go first: a newcomer queues behind them.
            let queued_ahead = pool.queue().is_some_and(|q| q.waiting() > 0);
            let picked = match pool.select(key, tried_now) {
                Ok(p) if !queued_ahead => Ok(p),
                Err(NoPick::Down) => break,
                Ok(p) => {
                    drop(p);
                    Box::pin(wait_in_queue(pool, &ctx.live, key, tried_now, true)).await
                }
                // Boxed: the queue is the rare path, its timers need not widen every request.
                Err(NoPick::Full) => {
                    Box::pin(wait_in_queue(pool, &ctx.live, key, tried_now, queued_ahead)).await
                }
            };
            let (idx, lease) = match picked {
                Ok(p) => p,
                Err(QueueEnd::Down) => break,
                Err(QueueEnd::Refused(e)) => {
                    last_error = Some(e);
                    break;
                }
            };
            tried.push(idx);
            // Charged unless it turns out it never reached the backend.
            charged += 1;
            free_retry = false;
            if attempt > 0 {
                pool.stats.retries.incr();
            }
            let backend = lease.backend();
            ex.attempts = attempt as u32 + 1;
            ex.backend = Some(Arc::clone(backend));
            let got = match &private {
                Some((header, slot)) => match slot.take(backend.addr) {
                    Some(s) => Ok((s, None)),
                    None => {
                        let started = std::time::Instant::now();
                        // Boxed, as in `ConnPool::get`: a new connection's future is large.
                        Box::pin(crate::upstream::connect(
                            backend.addr,
                            &settings,
                            pool.tls.as_ref(),
                            backend.tls_name.as_ref(),
                            Some(header),
                            backend.cut_token(),
                        ))
                        .await
                        .map(|s| (s, Some(started.elapsed())))
                    }
                },
                None => {
                    backend
                        .conns
                        .get(
                            backend.addr,
                            &settings,
                            pool.tls.as_ref(),
                            backend.tls_name.as_ref(),
                            || backend.cut_token(),
                        )
                        .await
                }
            };
            let mut sender = match got {
                Ok((s, connect_time)) => {
                    if connect_time.is_some() {
                        ex.connect = connect_time;
                    }
                    s
                }
                Err(e) => {
                    let ejected = backend.record_connect_error(&e, &cfg.passive);
                    if e.never_reached()
                        && super::may_try_free(attempt, &mut first_miss, cfg.connect_timeout)
                    {
                        charged -= 1;
                        free_retry = true;
                    }
                    let error = ProxyError::Connect(e);
                    log_backend_failure(
                        &pool.name,
                        &backend.label,
                        error.reason(),
                        &error,
                        ejected,
                        attempt,
                    );
                    last_error = Some(error);
                    if !cfg.retry_on.connect_failure {
                        break;
                    }
                    continue;
                }
            };
            let cuts = backend.cuts();
            let sent_at = std::time::Instant::now();
            // If the client leaves before the answer, a request that was in hand is finished in
            // the background and its connection kept (see `abandoned`).
            let home =
                (watch.is_none() && private.is_none() && client_upgrade.is_none()).then(|| {
                    abandoned::Home {
                        backend: Arc::clone(backend),
                        settings,
                        cuts,
                    }
                });
            let mut in_flight = abandoned::InFlight::send(sender, req, home);
            let sent = send(&mut in_flight, watch.as_deref(), cfg.response_timeout).await;
            // Whatever came of it, this task is still here: nothing to finish in the background.
            in_flight.abandon();
            let Some((sent_sender, sent)) = sent else {
                // The request may be executing; a timeout is not retried.
                return Err(ProxyError::ResponseTimeout(cfg.response_timeout));
            };
            sender = sent_sender;
            match sent {
                Ok(resp) => {
                    ex.header = Some(sent_at.elapsed());
                    ex.answered = true;
                    backend.record_success();
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        || (connect && resp.status().is_success());
                    if switching {
                        if let Some(client) = client_upgrade {
                            return Ok(switch_protocols(resp, client, lease, tracker));
                        }
                    }
                    let status = resp.status().as_u16();
                    let backend = Arc::clone(backend);
                    let home = private.as_ref().map(|(_, slot)| Arc::clone(slot));
                    let resp = upstream_response(
                        resp,
                        lease,
                        (sender, settings, home),
                        pool,
                        cuts,
                        watch.clone(),
                    );
                    // The backend saw the request: only an idempotent one (any, with
                    // `non_idempotent`) with its body in hand is sent again, and only for the
                    // statuses `retry_on` names. If no attempt does better, this is the answer.
                    if cfg.retry_on.status(status) && resendable && charged < attempts {
                        if let Some(next) = copy() {
                            log_backend_failure(
                                &pool.name,
                                &backend.label,
                                "retried_status",
                                &status,
                                false,
                                attempt,
                            );
                            answered = Some(Box::new((resp, backend)));
                            req = next;
                            continue;
                        }
                    }
                    return Ok(resp);
                }
                Err(_) if backend.cuts() != cuts => {
                    // Our own drain timeout ended it; the work may have run, don't resend it.
                    return Err(ProxyError::DrainCut);
                }
                Err(mut e) => {
                    if let Some(fault) = watch.as_ref().and_then(|w| w.fault()) {
                        // The client's body failed, not the backend: no mark, no retry.
                        return Err(ProxyError::Client(fault));
                    }
                    let message = e.take_message();
                    let error = e.into_error();
                    let ejected = backend.record_failure(&cfg.passive);
                    log_backend_failure(
                        &pool.name,
                        &backend.label,
                        "upstream_failed",
                        &error,
                        ejected,
                        attempt,
                    );
                    last_error = Some(ProxyError::Upstream(error));
                    // A request handed back never left: a connect failure in all but name.
                    let next = match message {
                        Some(r) if cfg.retry_on.connect_failure => {
                            if super::may_try_free(attempt, &mut first_miss, cfg.connect_timeout) {
                                charged -= 1;
                                free_retry = true;
                            }
                            Some(r)
                        }
                        Some(_) => None,
                        None if cfg.retry_on.reset && resendable => copy(),
                        None => None,
                    };
                    req = match next {
                        Some(r) => r,
                        None => break,
                    };
                }
            }
        }
        if let Some(kept) = answered {
            let (resp, backend) = *kept;
            ex.backend = Some(backend);
            return Ok(resp);
        }
        Err(last_error.unwrap_or_else(|| ProxyError::NoHealthyBackend {
            pool: Arc::clone(&pool.name),
        }))
    }
}

/// How waiting in a pool's queue ended without a backend.
enum QueueEnd {
    /// Every backend went down or away meanwhile.
    Down,
    /// The queue was full, or `queue_timeout` passed.
    Refused(ProxyError),
}

/// Waits in `pool`'s queue for a backend below its `max_connections`, first in first out:
/// with requests `ahead`, it looks only once woken, so a slot freed for them stays theirs.
///
/// Each look picks from the pool as it is now: once a reload has replaced `pool` (see
/// [`successor`]), a waiting request goes to the new set of backends, and only when that
/// set has none available does it get its 503. The index returned is `pool`'s (what
/// `tried` holds); `usize::MAX` for a backend `pool` does not have.
async fn wait_in_queue(
    pool: &Pool,
    live: &Live,
    key: Option<u64>,
    tried: &[usize],
    ahead: bool,
) -> Result<(usize, Lease), QueueEnd> {
    let Some(queue) = pool.queue() else {
        return Err(QueueEnd::Down);
    };
    let Some(ticket) = queue.enter(pool.config.max_queue) else {
        return Err(QueueEnd::Refused(ProxyError::QueueFull {
            pool: Arc::clone(&pool.name),
        }));
    };
    let started = tokio::time::Instant::now();
    let deadline = started + pool.config.queue_timeout;
    // First in the queue after all (those ahead just left): nothing to wait behind.
    let mut look = !ahead || ticket.is_first();
    // Registered before the first look, so a slot freed between a look and the wait is not
    // missed. Notify wakes the oldest registration first, so a waiter keeps its
    // registration until it is woken: registering again on every recheck would send it to
    // the back, behind requests that came later.
    let mut notified = std::pin::pin!(queue.notify().notified());
    notified.as_mut().enable();
    loop {
        if look {
            let picked = match successor(pool, live) {
                None => pool.select(key, tried),
                Some(next) => select_in_successor(pool, &next, key, tried),
            };
            match picked {
                Ok(p) => return Ok(p),
                Err(NoPick::Down) => return Err(QueueEnd::Down),
                Err(NoPick::Full) => {}
            }
        }
        // Slots free up by a lease ending (which wakes the oldest waiter), but also by a
        // backend coming back up or a limit raised by a reload, which wake nobody: the
        // oldest waiter looks again now and then too (only the oldest, to keep the order).
        let recheck = tokio::time::sleep(
            QUEUE_RECHECK.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        );
        tokio::select! {
            () = notified.as_mut() => {
                look = true;
                notified.set(queue.notify().notified());
                notified.as_mut().enable();
            }
            // A reload that lifted the limits leaves no order to keep: everyone looks.
            () = recheck => {
                look = ticket.is_first()
                    || successor(pool, live).is_some_and(|next| next.queue().is_none());
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(QueueEnd::Refused(ProxyError::QueueTimeout {
                    pool: Arc::clone(&pool.name),
                    waited: started.elapsed(),
                }));
            }
        }
    }
}

/// The pool that replaced `pool` in the current generation, when a request queued in `pool`
/// can move to it: the queue carried over (the limits did) or there are no limits any more,
/// and the transport is the same (the request was prepared for `pool`'s protocol, and its
/// TLS settings connect).
fn successor(pool: &Pool, live: &Live) -> Option<Arc<Pool>> {
    let snap = live.load();
    let next = snap.pools.get(&pool.name)?;
    let same_queue = match (pool.queue(), next.queue()) {
        (_, None) => true,
        (Some(here), Some(there)) => std::ptr::eq(here, there),
        (None, Some(_)) => false,
    };
    (!std::ptr::eq(pool, &**next)
        && same_queue
        && next.config.protocol == pool.config.protocol
        && next.config.tls == pool.config.tls)
        .then(|| Arc::clone(next))
}

/// [`Pool::select`] in `next` for a request of `pool`: `tried` (indices into `pool`) is
/// translated to the same backends in `next`, and the index picked back into `pool`'s.
fn select_in_successor(
    pool: &Pool,
    next: &Pool,
    key: Option<u64>,
    tried: &[usize],
) -> Result<(usize, Lease), NoPick> {
    let tried_there: Vec<usize> = tried
        .iter()
        .filter_map(|&i| pool.backends.get(i))
        .filter_map(|b| next.backends.iter().position(|n| Arc::ptr_eq(n, b)))
        .collect();
    let (_, lease) = next.select(key, &tried_there)?;
    let here = pool
        .backends
        .iter()
        .position(|b| Arc::ptr_eq(b, lease.backend()))
        .unwrap_or(usize::MAX);
    Ok((here, lease))
}

/// RFC 9110 §9.2.2: sending these twice has the effect of sending them once.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Logs a retry the budget refused, at most once a second per pool.
fn log_retry_refused(pool: &str) {
    if let Some(suppressed) = crate::log_limit::allow((pool, "", "retry_budget", "budget")) {
        tracing::warn!(pool = %pool, reason = %"retry_budget", suppressed, "retry budget spent: not retried");
    }
}

/// Waits for the response head of `in_flight`; `None` if `response_timeout` passed first.
/// The response timer starts once the request is completely sent: a streamed body counts
/// only when its last byte has gone, so a long upload with steady progress is never cut.
/// While it is sent, the client's body timeout and the connection's write timeout apply.
async fn send(
    in_flight: &mut abandoned::InFlight,
    watch: Option<&BodyWatch>,
    response_timeout: Duration,
) -> Option<<abandoned::InFlight as std::future::Future>::Output> {
    match watch {
        None => tokio::time::timeout(response_timeout, in_flight).await.ok(),
        Some(w) => {
            let deadline = async {
                w.finished().await;
                tokio::time::sleep(response_timeout).await;
            };
            tokio::select! {
                biased;
                r = in_flight => Some(r),
                () = deadline => None,
            }
        }
    }
}

/// Logs a backend's failure, at most once a second per (pool, backend, reason).
fn log_backend_failure(
    pool: &str,
    backend: &str,
    reason: &'static str,
    error: &dyn std::fmt::Display,
    ejected: bool,
    attempt: usize,
) {
    if let Some(suppressed) = crate::log_limit::allow((pool, backend, reason, "backend")) {
        tracing::warn!(pool = %pool, backend = %backend, reason = %reason, error = %error, ejected, attempt, suppressed, "backend failed");
    }
}

fn cfg_send_proxy(pool: &Pool) -> Option<crate::proxy_protocol::Version> {
    pool.config.send_proxy
}

fn upstream_response(
    resp: Response<Incoming>,
    lease: Lease,
    (sender, settings, home): (Sender, ConnSettings, Option<Arc<PrivateConn>>),
    pool: &Pool,
    cuts: u64,
    watch: Option<Arc<BodyWatch>>,
) -> Response<Inner> {
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    let body = UpstreamResponseBody {
        inner: Some(body),
        conn: Some((sender, settings)),
        home,
        lease,
        pool: Arc::clone(&pool.name),
        passive: pool.config.passive,
        cuts,
        watch,
    };
    Response::from_parts(parts, Either::Left(body))
}

/// The backend agreed to switch protocols (a 101, or a 2xx to CONNECT): answer the client
/// the same and join the two connections once both sides have upgraded.
fn switch_protocols(
    mut resp: Response<Incoming>,
    client: tunnel::ClientUpgrade,
    lease: Lease,
    tracker: &tokio_util::task::TaskTracker,
) -> Response<Inner> {
    let backend = hyper::upgrade::on(&mut resp);
    let protocol = resp.headers().get(http::header::UPGRADE).cloned();
    let (mut parts, _) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    if let Some(p) = protocol.filter(|_| parts.status == StatusCode::SWITCHING_PROTOCOLS) {
        tunnel::restore_upgrade_headers(&mut parts.headers, p);
    }
    parts.extensions.insert(Tunnel);
    tunnel::spawn(client, backend, lease, tracker);
    Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
}

/// Logs a failed request once, here, and answers it. Failures the client caused are logged
/// at info (they are routine on the internet), the rest as warnings; both at most once a
/// second per (pool, backend, reason), with the count of lines suppressed meanwhile.
fn error_response(e: &ProxyError, ex: &mut Exchange) -> Response<Inner> {
    ex.termination = e.reason();
    let ctx = &*ex.ctx;
    let status = e.status();
    let pool_name = ex.pool.as_ref().map_or("-", |p| &*p.name);
    let backend = ex.backend.as_ref().map_or("-", |b| &*b.label);
    let side = e.side();
    if let Some(suppressed) =
        crate::log_limit::allow((&*ctx.listener, pool_name, backend, e.reason()))
    {
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    listener = %ctx.listener,
                    client = %ctx.peer,
                    pool = %pool_name,
                    backend = %backend,
                    status = status.as_u16(),
                    reason = %e.reason(),
                    error = %e,
                    suppressed,
                    "request failed"
                )
            };
        }
        match side {
            Side::Client => log!(info),
            Side::Backend | Side::Proxy => log!(warn),
        }
    }
    let mut resp = plain_response(status);
    if side == Side::Client {
        // The rest of the request may be unread: this connection is done.
        close_after(&mut resp);
    }
    resp
}

/// `redirect_https`: a 308 to the same host and path on `https://` (308 keeps the method
/// and body, unlike 301).
fn redirect_https<B>(req: &Request<B>, ctx: &ConnCtx) -> Response<Inner> {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(headers::host_without_port)
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        });
    let Some(host) = host else {
        return reject(ctx, StatusCode::BAD_REQUEST, "no valid Host to redirect to");
    };
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let location = match ctx.config.redirect_https_port {
        Some(port) if port != 443 => format!("https://{host}:{port}{pq}"),
        _ => format!("https://{host}{pq}"),
    };
    let mut resp = plain_response(StatusCode::PERMANENT_REDIRECT);
    match HeaderValue::try_from(location) {
        Ok(v) => {
            resp.headers_mut().insert(http::header::LOCATION, v);
            resp
        }
        Err(_) => reject(ctx, StatusCode::BAD_REQUEST, "unusable redirect target"),
    }
}

/// Refuses a request ballast will not forward (debug log: clients get this wrong all day).
/// 429 with `Retry-After` (whole seconds, at least 1) for a request over a rate limit. The
/// connection stays open: the client did nothing wrong by HTTP's rules.
fn rate_limited(ctx: &ConnCtx, ex: &mut Exchange, wait: Duration) -> Response<Inner> {
    ex.termination = "rate_limited";
    if let Some(suppressed) = crate::log_limit::allow((&*ctx.listener, "rate_limited")) {
        tracing::info!(listener = %ctx.listener, client = %ctx.peer, status = 429, reason = %"rate_limited", suppressed, "request over the rate limit");
    }
    let mut resp = plain_response(StatusCode::TOO_MANY_REQUESTS);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

fn reject(ctx: &ConnCtx, status: StatusCode, why: &str) -> Response<Inner> {
    tracing::debug!(listener = %ctx.listener, client = %ctx.peer, status = status.as_u16(), why, "rejected request");
    let mut resp = plain_response(status);
    close_after(&mut resp);
    resp
}

fn close_after<B>(resp: &mut Response<B>) {
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
}

/// A short text response for `status`, e.g. `503 Service Unavailable\n`.
pub fn plain_response(status: StatusCode) -> Response<Inner> {
    let text = format!(
        "{} {}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(text))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn request_hash<B>(key: &HashKey, req: &Request<B>, peer: SocketAddr) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match peer.ip() {
            std::net::IpAddr::V4(ip) => hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => hash_key(&ip.octets()),
        }),
        HashKey::Path => Some(hash_key(req.uri().path().as_bytes())),
        HashKey::Header(name) => req.headers().get(name).map(|v| hash_key(v.as_bytes())),
        HashKey::Cookie(name) => {
            headers::cookie(req.headers(), name).map(|v| hash_key(v.as_bytes()))
        }
    }
}

/// A backend's response body on its way to the client. It holds the [`Lease`], so the
/// request counts as in flight until the body is done, and gives the upstream connection back
/// to the pool once the body has been read to the end.
pub struct UpstreamResponseBody {
    /// `None` once handed to [`abandoned`] to be finished.
    inner: Option<Incoming>,
    conn: Option<(Sender, ConnSettings)>,
    /// Where the connection goes back to: the client's own slot (`send_proxy`), else the
    /// backend's pool.
    home: Option<Arc<PrivateConn>>,
    lease: Lease,
    /// For reporting a body the backend broke off: it counts against the backend.
    pool: Arc<str>,
    passive: crate::config::PassiveConfig,
    /// The backend's cut count when the response began, to tell our drain cut apart.
    cuts: u64,
    /// A request body still streaming when the response began: if it fails, the upstream
    /// connection (and so this body) breaks by the client's fault.
    watch: Option<Arc<BodyWatch>>,
}

impl UpstreamResponseBody {
    fn release_conn(&mut self) {
        if let Some((sender, settings)) = self.conn.take() {
            let backend = self.lease.backend();
            match &self.home {
                Some(slot) => slot.put(backend.addr, sender),
                None => backend.conns.put(sender, &settings),
            }
        }
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release_conn(),
            Poll::Ready(Some(Err(e))) => {
                // A broken body leaves the connection unusable. A client that leaves just stops
                // polling, so unless our own drain timeout cut it or the client's streamed
                // request body failed under it, the backend broke it: a truncated response.
                this.conn = None;
                let backend = this.lease.backend();
                let client_fault = this.watch.as_ref().is_some_and(|w| w.fault().is_some());
                if backend.cuts() == this.cuts && !client_fault {
                    let ejected = backend.record_failure(&this.passive);
                    log_backend_failure(
                        &this.pool,
                        &backend.label,
                        "response_truncated",
                        e,
                        ejected,
                        0,
                    );
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx),
            Either::Right(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.ex.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.ex.complete = true,
            Poll::Ready(Some(Err(_))) => {
                // The client's own streamed body failing breaks the response too: its fault.
                let fault = match &this.ex.bytes_in {
                    BytesIn::Streamed(w) => w.fault(),
                    BytesIn::Known(_) => None,
                };
                this.ex.termination =
                    fault.map_or("response_truncated", |f| ProxyError::Client(f).reason());
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamResponseBody {
    fn drop(&mut self) {
        // Bodies that are empty by framing (HEAD, 204, 304) may never be polled.
        if self.is_end_stream() {
            self.release_conn();
            return;
        }
        // The client left mid-body: a small rest is read in the background so the
        // connection can be kept, unless it is this client's own or its upload broke.
        let upload_done = self
            .watch
            .as_ref()
            .is_none_or(|w| w.read_all() && w.fault().is_none());
        if self.home.is_some() || !upload_done {
            return;
        }
        if let (Some((sender, settings)), Some(body)) = (self.conn.take(), self.inner.take()) {
            let home = abandoned::Home {
                backend: Arc::clone(self.lease.backend()),
                settings,
                cuts: self.cuts,
            };
            home.finish_body(sender, body);
        }
    }
}
