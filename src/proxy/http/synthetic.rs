//! Responses ballast makes itself: errors (logged once, here), the `redirect_https` 308,
//! 429 for a rate limit, and refusals of requests it will not forward.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use super::Inner;
use crate::proxy::context::ConnCtx;
use crate::proxy::error::{ProxyError, Side};
use crate::proxy::exchange::Exchange;
use crate::proxy::headers;

/// Logs a failed request once, here, and answers it. Failures the client caused are logged
/// at info (they are routine on the internet), the rest as warnings; both at most once a
/// second per (pool, backend, reason), with the count of lines suppressed meanwhile.
pub(super) fn error_response(e: &ProxyError, ex: &mut Exchange) -> Response<Inner> {
    ex.termination = e.reason();
    let ctx = &*ex.ctx;
    let status = e.status();
    let pool_name = ex.pool.as_ref().map_or("-", |p| &*p.name);
    let backend = ex.backend.as_ref().map_or("-", |b| &*b.label);
    let side = e.side();
    if let Some(suppressed) =
        crate::log_limit::allow((&*ctx.listener.name, pool_name, backend, e.reason()))
    {
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    listener = %ctx.listener.name,
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
pub(super) fn redirect_https<B>(req: &Request<B>, ctx: &ConnCtx) -> Response<Inner> {
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
    let location = match ctx.config().redirect_https_port {
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
pub(super) fn rate_limited(ctx: &ConnCtx, ex: &mut Exchange, wait: Duration) -> Response<Inner> {
    ex.termination = "rate_limited";
    if let Some(suppressed) = crate::log_limit::allow((&*ctx.listener.name, "rate_limited")) {
        tracing::info!(listener = %ctx.listener.name, client = %ctx.peer, status = 429, reason = %"rate_limited", suppressed, "request over the rate limit");
    }
    let mut resp = plain_response(StatusCode::TOO_MANY_REQUESTS);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    resp
}

pub(super) fn reject(ctx: &ConnCtx, status: StatusCode, why: &str) -> Response<Inner> {
    tracing::debug!(listener = %ctx.listener.name, client = %ctx.peer, status = status.as_u16(), why, "rejected request");
    let mut resp = plain_response(status);
    close_after(&mut resp);
    resp
}

pub(super) fn close_after<B>(resp: &mut Response<B>) {
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
