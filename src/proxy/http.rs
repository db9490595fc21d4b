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

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::error::ProxyError;
use super::headers;
use super::tunnel;
use crate::balance::backend::Lease;
use crate::balance::policy::hash_key;
use crate::balance::Pool;
use crate::config::HashKey;
use crate::state::Live;
use crate::upstream::{ConnSettings, Sender, UpstreamBody};

/// Upper bound on attempts per request, whatever `retries` says.
const MAX_ATTEMPTS: usize = 8;

/// Facts about one downstream connection, shared by its requests.
#[derive(Debug)]
pub struct ConnCtx {
    pub live: Live,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    /// `"http"` or `"https"`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// Where upgrade tunnels are spawned, so a graceful shutdown waits for them too.
    pub tracker: tokio_util::task::TaskTracker,
}

pub type ProxyBody = Either<UpstreamResponseBody, Full<Bytes>>;

/// Proxies one request. Never fails: errors become 5xx responses.
pub async fn handle(
    mut req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snap = ctx.live.load_full();
    let Some(router) = snap.routers.get(&*ctx.listener) else {
        return Ok(error_response(&ProxyError::ListenerGone, &ctx, None, None));
    };
    if req
        .headers()
        .get_all(http::header::HOST)
        .iter()
        .nth(1)
        .is_some()
    {
        // Two Host fields make the target ambiguous (RFC 9112 §3.2): refuse, like nginx.
        tracing::debug!(client = %ctx.peer, "rejected request with several Host fields");
        return Ok(plain_response(StatusCode::BAD_REQUEST));
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .map(headers::host_without_port);
    let pool = router.route(host, req.uri().path());
    let key = pool
        .hash_key()
        .and_then(|k| request_hash(k, &req, ctx.peer));

    let upgrade = tunnel::requested_upgrade(req.headers())
        .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let (mut parts, body) = req.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    if let Some((protocol, _)) = &upgrade {
        tunnel::restore_upgrade_headers(&mut parts.headers, protocol.clone());
    }
    headers::add_forwarded(&mut parts.headers, ctx.peer.ip(), ctx.proto);
    if parts.uri.scheme().is_some() {
        // Absolute-form from the client: backends expect origin-form.
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
    }
    if parts.version != http::Version::HTTP_11 {
        parts.version = http::Version::HTTP_11;
    }

    let client_upgrade = upgrade.map(|(_, on)| on);
    Ok(
        match forward(parts, body, pool, key, client_upgrade, &ctx.tracker).await {
            Ok(resp) => resp,
            Err((e, backend)) => error_response(&e, &ctx, Some(pool), backend.as_deref()),
        },
    )
}

/// Sends the request to a backend of `pool`, retrying on another backend when that is safe:
/// always when the request never left (connect failed, or hyper handed it back), and for a
/// request without a body also when the backend failed before any response byte.
async fn forward(
    parts: http::request::Parts,
    body: Incoming,
    pool: &Arc<Pool>,
    key: Option<u64>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<Response<ProxyBody>, (ProxyError, Option<Arc<str>>)> {
    let cfg = &pool.config;
    let settings = ConnSettings {
        connect_timeout: cfg.connect_timeout,
        idle_timeout: cfg.idle_timeout,
        max_idle: cfg.max_idle_per_backend,
    };
    let bodiless = body.is_end_stream();
    // Kept only for requests without a body: those can be re-sent after a failure.
    let resend = (bodiless && cfg.retries > 0).then(|| parts.clone());
    let body: UpstreamBody = if bodiless {
        Either::Right(Empty::new())
    } else {
        Either::Left(body)
    };
    let mut req = Request::from_parts(parts, body);
    let attempts = (cfg.retries as usize + 1).min(MAX_ATTEMPTS);
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    let mut last_error: Option<(ProxyError, Option<Arc<str>>)> = None;

    for attempt in 0..attempts {
        let Some((idx, lease)) = pool.select(key, &tried[..attempt]) else {
            break;
        };
        tried[attempt] = idx;
        let backend = lease.backend();
        let mut sender = match backend
            .conns
            .get(backend.addr, &settings, || backend.cut_token())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let ejected = backend.record_failure(&cfg.passive);
                tracing::warn!(pool = %pool.name, backend = %backend.label, reason = %e, ejected, attempt, "backend connection failed");
                last_error = Some((ProxyError::Connect(e), Some(Arc::clone(&backend.label))));
                continue;
            }
        };
        let cuts = backend.cuts();
        match tokio::time::timeout(cfg.response_timeout, sender.try_send_request(req)).await {
            Ok(Ok(resp)) => {
                backend.record_success();
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = client_upgrade {
                        return Ok(switch_protocols(resp, client, lease, tracker));
                    }
                }
                return Ok(upstream_response(resp, lease, sender, settings));
            }
            Ok(Err(_)) if backend.cuts() != cuts => {
                // Our own drain timeout ended it; the work may have run, don't resend it.
                return Err((ProxyError::DrainCut, Some(Arc::clone(&backend.label))));
            }
            Ok(Err(mut e)) => {
                let message = e.take_message();
                let error = e.into_error();
                let ejected = backend.record_failure(&cfg.passive);
                tracing::warn!(pool = %pool.name, backend = %backend.label, reason = %error, ejected, attempt, "backend failed before responding");
                last_error = Some((
                    ProxyError::Upstream(error),
                    Some(Arc::clone(&backend.label)),
                ));
                req = match (message, &resend) {
                    (Some(m), _) => m,
                    (None, Some(p)) => Request::from_parts(p.clone(), Either::Right(Empty::new())),
                    (None, None) => break,
                };
            }
            Err(_) => {
                // The request may be executing; a timeout is not retried.
                return Err((
                    ProxyError::ResponseTimeout(cfg.response_timeout),
                    Some(Arc::clone(&backend.label)),
                ));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| {
        (
            ProxyError::NoHealthyBackend {
                pool: Arc::clone(&pool.name),
            },
            None,
        )
    }))
}

fn upstream_response(
    resp: Response<Incoming>,
    lease: Lease,
    sender: Sender,
    settings: ConnSettings,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    let body = UpstreamResponseBody {
        inner: body,
        conn: Some((sender, settings)),
        lease,
    };
    Response::from_parts(parts, Either::Left(body))
}

/// The backend agreed to switch protocols: answer the client with the same 101 and join
/// the two connections once both sides have upgraded.
fn switch_protocols(
    mut resp: Response<Incoming>,
    client: hyper::upgrade::OnUpgrade,
    lease: Lease,
    tracker: &tokio_util::task::TaskTracker,
) -> Response<ProxyBody> {
    let backend = hyper::upgrade::on(&mut resp);
    let protocol = resp.headers().get(http::header::UPGRADE).cloned();
    let (mut parts, _) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    if let Some(p) = protocol {
        tunnel::restore_upgrade_headers(&mut parts.headers, p);
    }
    tunnel::spawn(client, backend, lease, tracker);
    Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
}

fn error_response(
    e: &ProxyError,
    ctx: &ConnCtx,
    pool: Option<&Arc<Pool>>,
    backend: Option<&str>,
) -> Response<ProxyBody> {
    let status = e.status();
    tracing::warn!(
        listener = %ctx.listener,
        client = %ctx.peer,
        pool = %pool.map_or("-", |p| &*p.name),
        backend = %backend.unwrap_or("-"),
        status = status.as_u16(),
        reason = %e.reason(),
        error = %e,
        "request failed"
    );
    plain_response(status)
}

/// A short text response for `status`, e.g. `503 Service Unavailable\n`.
pub fn plain_response(status: StatusCode) -> Response<ProxyBody> {
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

fn request_hash(key: &HashKey, req: &Request<Incoming>, peer: SocketAddr) -> Option<u64> {
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
    inner: Incoming,
    conn: Option<(Sender, ConnSettings)>,
    lease: Lease,
}

impl UpstreamResponseBody {
    fn release_conn(&mut self) {
        if let Some((sender, settings)) = self.conn.take() {
            self.lease.backend().conns.put(sender, &settings);
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
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release_conn(),
            // A broken body leaves the connection unusable.
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
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
        if self.inner.is_end_stream() {
            self.release_conn();
        }
    }
}
