//! Responses ballast makes itself: errors (logged once, here), redirects and responses a
//! route gives (`redirect`, `respond`, `redirect_https`), 403 for `allow_from` /
//! `deny_from`, 429 for a rate limit, and refusals of requests it will not forward.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use super::Inner;
use crate::config::{Redirect, Respond, UrlPiece};
use crate::proxy::context::ConnCtx;
use crate::proxy::error::{ProxyError, Side};
use crate::proxy::exchange::Exchange;
use crate::routing::RequestView;

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
                    client = %ex.client_label(),
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

/// A route's `redirect` (or `redirect_https`, one case of it): `Location` made from the
/// request's host, path and query as the route's `to` says. 400 when `to` needs a host
/// and the request has no usable one.
pub(super) fn redirect(
    r: &Redirect,
    req: &RequestView<'_>,
    uri: &http::Uri,
    ctx: &ConnCtx,
) -> Response<Inner> {
    let request_uri = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut location = String::with_capacity(128);
    for piece in &r.to {
        match piece {
            UrlPiece::Text(t) => location.push_str(t),
            UrlPiece::Host => {
                let host = req.host.filter(|h| {
                    !h.is_empty()
                        && h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
                });
                let Some(host) = host else {
                    return reject(ctx, StatusCode::BAD_REQUEST, "no valid Host to redirect to");
                };
                if host.contains(':') {
                    // An IPv6 address, its brackets taken off with the port.
                    location.push('[');
                    location.push_str(host);
                    location.push(']');
                } else {
                    location.push_str(host);
                }
            }
            UrlPiece::Path => push_path(&mut location, req.path),
            UrlPiece::Query => location.push_str(req.query.unwrap_or("")),
            UrlPiece::RequestUri => push_path(&mut location, request_uri),
        }
    }
    let Ok(location) = HeaderValue::try_from(location) else {
        return reject(ctx, StatusCode::BAD_REQUEST, "unusable redirect target");
    };
    let mut resp = plain_response(r.status);
    resp.headers_mut().insert(http::header::LOCATION, location);
    resp
}

/// Appends a path. At the start of a `Location`, `//evil.example/` would be a link to
/// another host (a protocol-relative reference): there, leading slashes count as one.
fn push_path(location: &mut String, path: &str) {
    if location.is_empty() && path.starts_with('/') {
        location.push('/');
        location.push_str(path.trim_start_matches('/'));
    } else {
        location.push_str(path);
    }
}

/// A route's `respond`: the status, fields and body the config gives.
pub(super) fn configured(r: &Respond) -> Response<Inner> {
    let mut resp = Response::new(Either::Right(Full::new(r.body.clone())));
    *resp.status_mut() = r.status;
    let headers = resp.headers_mut();
    for (name, value) in &r.headers {
        headers.append(name.clone(), value.clone());
    }
    resp
}

/// An ACME http-01 answer: the key authorization, or 404 for a token nobody placed.
pub(super) fn acme_answer(answer: Option<Vec<u8>>) -> Response<Inner> {
    let Some(body) = answer else {
        return plain_response(StatusCode::NOT_FOUND);
    };
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// 403 for a client that `allow_from` / `deny_from` refuses (of the listener or of the
/// route, `which`); the connection closes, as the request body is left unread.
pub(super) fn denied(ctx: &ConnCtx, ex: &mut Exchange, which: &'static str) -> Response<Inner> {
    ex.termination = "denied";
    if let Some(suppressed) = crate::log_limit::allow((&*ctx.listener.name, "denied")) {
        tracing::info!(listener = %ctx.listener.name, client = %ex.client_label(), status = 403, reason = %"denied", by = which, suppressed, "request refused by allow_from / deny_from");
    }
    let mut resp = plain_response(StatusCode::FORBIDDEN);
    close_after(&mut resp);
    resp
}

/// 401 with `WWW-Authenticate` for a request `basic_auth` refuses (no credentials, or
/// wrong ones). The log says so, with the client; never a user name or password.
pub(super) fn unauthorized(
    gate: &crate::basic_auth::Gate,
    ctx: &ConnCtx,
    ex: &mut Exchange,
) -> Response<Inner> {
    ex.termination = "unauthorized";
    if let Some(suppressed) = crate::log_limit::allow((&*ctx.listener.name, "unauthorized")) {
        tracing::info!(listener = %ctx.listener.name, client = %ex.client_label(), status = 401, reason = %"unauthorized", suppressed, "request refused by basic_auth");
    }
    let mut resp = plain_response(StatusCode::UNAUTHORIZED);
    resp.headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, gate.challenge.clone());
    resp
}

/// Refuses a request ballast will not forward (debug log: clients get this wrong all day).
/// 429 with `Retry-After` (whole seconds, at least 1) for a request over a rate limit. The
/// connection stays open: the client did nothing wrong by HTTP's rules.
pub(super) fn rate_limited(ctx: &ConnCtx, ex: &mut Exchange, wait: Duration) -> Response<Inner> {
    ex.termination = "rate_limited";
    if let Some(suppressed) = crate::log_limit::allow((&*ctx.listener.name, "rate_limited")) {
        tracing::info!(listener = %ctx.listener.name, client = %ex.client_label(), status = 429, reason = %"rate_limited", suppressed, "request over the rate limit");
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
