//! The HTTP request path: route → select → forward → stream the response back.
//!
//! One call of [`handle`] per request. It loads the live snapshot once, so a request sees a
//! single config generation from start to end. Errors are logged once, with pool, backend
//! and reason, and turned into a short plain-text response.
//!
//! One file per step, in the order a request meets them:
//! - `prepare`: checks on the head, routing, rate limits, header and URI shaping, the
//!   request body made ready (read or streamed) before any backend is chosen;
//! - `attempt`: the attempt loop: pick a backend, get a connection, send, retry;
//! - `queue`: waiting for a backend below its `max_connections`;
//! - `body`: the response body on its way back, which returns the upstream connection;
//! - `synthetic`: responses ballast makes itself (errors, redirects, 429).
//!
//! The connection's shared facts live in `proxy::context`, the request's account in
//! `proxy::exchange`; neither depends on this module.

mod attempt;
mod body;
mod prepare;
mod queue;
mod synthetic;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};

use super::compress;
use super::context::ConnCtx;
use super::exchange::Exchange;
use super::rules;
use crate::request_body::ClientStream;

pub use body::ProxyBody;
use body::UpstreamResponseBody;
use prepare::respond;
pub use synthetic::plain_response;

/// A response as the path builds it: a backend's body, or one ballast made.
type Inner = Either<UpstreamResponseBody, Full<Bytes>>;

/// Proxies one request. Never fails: errors become 4xx/5xx responses.
pub async fn handle(
    mut req: Request<ClientStream>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    ctx.phase.busy();
    // An HTTP/1.1 client's fields come as lines, outside the map (`h1::RequestFields`).
    let fields = req.body_mut().take_fields();
    let snap = ctx.listener.live.load_full();
    let log = snap
        .access_log
        .as_ref()
        .filter(|_| ctx.config().access_log)
        .cloned();
    // Lives inside this future until the response exists: a client that leaves before that
    // (an HTTP/2 reset) drops it here, and it is counted as 499.
    // Boxed: it rides inside the response body, which is moved several times on its way
    // to the writer; a pointer moves cheaper than its ~290 bytes (callgrind: memcpy was 14%
    // of a proxied request's instructions).
    let mut ex = Box::new(Exchange::start(
        Arc::clone(&ctx),
        &req,
        fields.as_ref(),
        log,
    ));
    // The matched route's response rules and compression, set by `respond` once it has
    // routed.
    let mut response_rules = None;
    let mut compress = None;
    let mut resp = respond(
        req,
        fields,
        &ctx,
        &snap,
        &mut ex,
        &mut response_rules,
        &mut compress,
    )
    .await;
    // An HTTP/1.1 backend's fields come written for an HTTP/1.1 client, outside the map
    // (`h1::PassFields`). Header rules and compression edit a map, and hyper's HTTP/2
    // server writes one.
    if response_rules.is_some() || compress.is_some() || ctx.phase.is_multiplexed() {
        if let Either::Left(body) = resp.body_mut() {
            if let Some(fields) = body.take_fields() {
                fields.append_to(resp.headers_mut());
            }
        }
    }
    if let Some(r) = response_rules {
        rules::apply(r, resp.headers_mut(), &vars(&ctx, &ex));
    }
    ex.status = resp.status().as_u16();
    // A switched HTTP/1.1 connection belongs to its tunnel now: no keep-alive timer on it.
    // (An HTTP/2 tunnel is one stream; it stays counted until it ends.)
    let tunnel = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || resp.extensions().get::<Tunnel>().is_some();
    let encoder = compress.and_then(|n| {
        let status = resp.status();
        let length = hyper::body::Body::size_hint(resp.body()).exact();
        compress::start(status, resp.headers_mut(), length, &n, tunnel)
    });
    drop(snap);
    if tunnel && !ctx.phase.is_multiplexed() {
        ex.armed = false;
    }
    // Shutting down: `h1::server` says `Connection: close` on the connection's last
    // response itself, as it writes the head (the same token; asking it here too took the
    // token's mutex once more per request). HTTP/2 ends with GOAWAY instead.
    Ok(resp.map(|inner| ProxyBody { inner, ex, encoder }))
}

/// Marks a response whose connection was handed to a tunnel (CONNECT).
#[derive(Clone, Copy)]
struct Tunnel;

/// What `${...}` in a header rule stands for, for this request.
fn vars<'a>(ctx: &'a ConnCtx, ex: &'a Exchange) -> rules::Vars<'a> {
    rules::Vars {
        client_ip: ex.forwarded.as_ref().map_or(&ctx.forwarded_for, |f| &f.1),
        request_id: ex.request_id.as_ref(),
        listener: &ctx.listener.name,
    }
}
