//! Request preparation: everything decided before a backend is chosen. The head is checked
//! (one `Host`, CONNECT allowed), routed (host and normalized path), rate-limited, shaped
//! for the backend (hop-by-hop fields, `X-Forwarded-*`, header rules, the URI form the
//! backend's protocol wants), and its body made ready: a slow or broken body costs no
//! backend anything.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};

use super::attempt::forward;
use super::synthetic::{
    acme_answer, configured, denied, error_response, rate_limited, redirect, reject, unauthorized,
};
use super::{vars, Inner};
use crate::balance::policy::hash_key;
use crate::balance::sticky;
use crate::config::{HashKey, UpstreamProtocol};
use crate::h1::client::RelayedHead;
use crate::h1::RequestFields;
use crate::proxy::compress::{self, Negotiated};
use crate::proxy::context::ConnCtx;
use crate::proxy::error::ProxyError;
use crate::proxy::exchange::{BytesIn, Exchange};
use crate::proxy::websocket_h2::{self, Extended};
use crate::proxy::{client_addr, headers, rules, tunnel};
use crate::request_body::{self, BodyLimits, ClientStream};
use crate::routing::{Action, Fields, RequestView, Target};
use crate::state::Snapshot;
use crate::upstream::Outgoing;

/// Checks, routes and shapes `req`, then forwards it (see `attempt::forward`); every
/// outcome is a response. `fields`: the request's fields when they came as lines (an
/// HTTP/1.1 client's) rather than in its map. `response_rules` receives the matched
/// route's response rules, `compress` what the client accepts when the route compresses.
pub(super) async fn respond<'s>(
    mut req: Request<ClientStream>,
    fields: Option<RequestFields>,
    ctx: &ConnCtx,
    snap: &'s Snapshot,
    ex: &mut Exchange,
    response_rules: &mut Option<&'s crate::config::HeaderRules>,
    compress: &mut Option<Negotiated<'s>>,
) -> Response<Inner> {
    let Some(router) = snap.routers.get(&*ctx.listener.name) else {
        return error_response(&ProxyError::ListenerGone, ex);
    };
    // RFC 8441: an HTTP/2 client's WebSocket is an extended CONNECT; from here on it is the
    // HTTP/1.1 Upgrade request that routes and backends know (`websocket_h2`).
    let websocket_accept = match websocket_h2::translate(&mut req) {
        Extended::No => None,
        Extended::WebSocket(accept) => Some(accept),
        Extended::Other => {
            return reject(
                ctx,
                StatusCode::NOT_IMPLEMENTED,
                "extended CONNECT for a protocol other than websocket",
            )
        }
    };
    // Lines are relayed as they came (`h1::RequestFields::write_relayed`) unless something
    // on this listener reads or edits the request's fields (`Router::relays_fields`), or the
    // request is of a kind the map path shapes: an upgrade, CONNECT, an absolute-form
    // target. Otherwise the map is made here, and the request takes the path below as an
    // HTTP/2 client's does. The parse already refused a second `Host`, and a missing one
    // in HTTP/1.1.
    let peer = ctx.peer.ip();
    // With `trusted_proxies`, the chain of forwarding fields is kept only from them: anyone
    // else's is removed (on the map path, below), so no backend can be told a made-up
    // client.
    let untrusted = router
        .trusted_proxies
        .as_ref()
        .is_some_and(|t| !t.contains(peer));
    let chain = [&headers::X_FORWARDED_FOR, &http::header::FORWARDED];
    let relay = match fields {
        Some(f)
            if router.relays_fields
                && !(untrusted
                    && chain
                        .iter()
                        .any(|n| f.values(n.as_str().as_bytes()).next().is_some()))
                && !f.has_upgrade()
                && req.method() != Method::CONNECT
                && req.uri().scheme().is_none() =>
        {
            Some(f)
        }
        Some(f) => {
            *req.headers_mut() = f.to_header_map();
            None
        }
        None => None,
    };
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host_field = hosts.next();
    if hosts.next().is_some() {
        // Two Host fields make the target ambiguous (RFC 9112 §3.2): refuse, like nginx.
        return reject(ctx, StatusCode::BAD_REQUEST, "several Host fields");
    }
    if host_field.is_none() && req.version() == Version::HTTP_11 && relay.is_none() {
        // RFC 9112 §3.2: an HTTP/1.1 request without Host gets 400.
        return reject(ctx, StatusCode::BAD_REQUEST, "no Host field");
    }
    let host = match &relay {
        Some(f) => f.host().and_then(|h| std::str::from_utf8(h).ok()),
        None => host_field.and_then(|h| h.to_str().ok()),
    }
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
    // ACME http-01, before everything that could refuse the CA's validator (`acme`).
    if path.starts_with(crate::acme::HTTP01_PREFIX)
        && matches!(*req.method(), Method::GET | Method::HEAD)
    {
        if let Some(answer) = crate::acme::http01_answer(path) {
            return acme_answer(answer);
        }
    }
    let fields = match &relay {
        Some(lines) => Fields::Lines(lines),
        None => Fields::Map(req.headers()),
    };
    // The client: the peer, or whom a trusted proxy names (see `client_addr`).
    if let Some(trusted) = router.trusted_proxies.as_ref().filter(|t| t.contains(peer)) {
        let named = client_addr::forwarded_client(
            &fields.lines(&headers::X_FORWARDED_FOR),
            &fields.lines(&http::header::FORWARDED),
            trusted,
        );
        ex.forwarded = named
            .filter(|ip| *ip != peer)
            .map(|ip| Box::new((ip, headers::client_header(ip))));
    }
    let client = ex.forwarded.as_ref().map_or(peer, |f| f.0);
    // Before the body is read or a backend chosen: a refused client costs neither.
    if router.access.as_ref().is_some_and(|a| !a.permits(client)) {
        return denied(ctx, ex, "listener");
    }
    // Made only where something reads it: a listener without routes skips it.
    let view = || RequestView {
        host,
        path,
        method: req.method(),
        headers: fields,
        query: req.uri().query(),
        client,
        sni: ctx.sni(),
    };
    if let Some(r) = &ctx.config().redirect_https {
        return redirect(r, &view(), req.uri(), ctx);
    }
    let connect = req.method() == Method::CONNECT;
    if connect && !ctx.config().allow_connect {
        return reject(
            ctx,
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not allowed",
        );
    }
    let view = router.has_routes().then(view);
    let matched = view.as_ref().and_then(|v| Some((router.route(v)?, v)));
    if matched.is_some_and(|(rule, _)| !rule.access.permits(client)) {
        return denied(ctx, ex, "route");
    }
    // `basic_auth`: the route's, else the listener's; before any body is read.
    let gate = matched
        .and_then(|(rule, _)| rule.auth.as_deref())
        .or(router.auth.as_deref());
    if let Some(gate) = gate {
        let authorization = fields.lines(&http::header::AUTHORIZATION);
        if !gate.admits(authorization.first().copied()).await {
            return unauthorized(gate, ctx, ex);
        }
    }
    let target = match matched {
        None => router.default_target(),
        Some((rule, view)) => match &rule.action {
            Action::Forward(target) => target,
            Action::Redirect(r) => return redirect(r, view, req.uri(), ctx),
            Action::Respond(r) => return configured(r),
        },
    };
    let rewritten = target
        .rewrite
        .as_ref()
        .map(|(prefix, with)| rules::rewrite_prefix(path, prefix, with));
    let pool = &target.pool;
    ex.pool = Some(Arc::clone(pool));
    *response_rules = target.response_headers.as_ref();
    if let Some(config) = &target.compress {
        let accept = match &relay {
            Some(lines) => Fields::Lines(lines),
            None => Fields::Map(req.headers()),
        }
        .lines(&http::header::ACCEPT_ENCODING);
        *compress = Some(Negotiated {
            config,
            encoding: compress::negotiate(&accept, &config.algorithms),
            head: req.method() == Method::HEAD,
        });
    }
    // Before the body is read or a backend chosen: a limited client costs neither.
    for limiter in [router.rate_limit.as_deref(), target.rate_limit.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Err(wait) = limiter.check(limiter.key_of(req.headers(), client)) {
            return rate_limited(ctx, ex, wait);
        }
    }
    let key = pool.hash_key().and_then(|k| request_hash(k, &req, client));
    // A sticky session's backend (`balance::sticky`): the id its cookie holds, and the
    // backend of the pool with that id. No such backend: balanced as any request.
    // Only the id lives on past the exchange (to tell whether the cookie must change).
    let (held, preferred) = match &pool.config.sticky {
        Some(s) => {
            let held = headers::cookie(req.headers(), &s.cookie).and_then(sticky::decode);
            (held, held.and_then(|id| pool.sticky_index(id)))
        }
        None => (None, None),
    };

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
    let client_upgrade = match websocket_accept {
        // The client waits for a 2xx that means the tunnel is open: without one, refuse.
        Some(_) if upgrade.is_none() => {
            return reject(
                ctx,
                StatusCode::FORBIDDEN,
                "WebSocket is not among this route's upgrade protocols",
            )
        }
        Some(accept) => Some(tunnel::ClientUpgrade::H2WebSocket(
            hyper::upgrade::on(&mut req),
            accept,
        )),
        None => (upgrade.is_some() || connect).then(|| tunnel::ClientUpgrade::of(&mut req)),
    };
    let (mut parts, body) = req.into_parts();
    if let Some(path) = rewritten.or(normalized) {
        let query = parts.uri.query().map_or(String::new(), |q| format!("?{q}"));
        parts.uri =
            Uri::try_from(format!("{path}{query}")).unwrap_or_else(|_| Uri::from_static("/"));
    }
    let (relayed, client_upgrade) = match relay {
        // What the map path does below was done to the lines as they were parsed, or is
        // written as they are relayed (`X-Forwarded-*`); what else it adds, this path
        // excludes (see `Router::relays_fields`).
        Some(fields) => {
            if fields.close() {
                ctx.phase.closing();
            }
            parts.version = Version::HTTP_11;
            let relayed = RelayedHead {
                fields,
                client: ctx.forwarded_for.as_bytes(),
                proto: ctx.proto(),
            };
            (Some(relayed), None)
        }
        None => {
            // The session cookie is ballast's (valid or not), not the backend's.
            if let Some(s) = pool.config.sticky.as_ref().filter(|s| !s.pass_cookie) {
                headers::remove_cookie(&mut parts.headers, &s.cookie);
            }
            if untrusted {
                for name in chain {
                    parts.headers.remove(name);
                }
            }
            let h2 = h2_backend.then_some(H2Backend {
                tls: pool.tls.is_some(),
                te_trailers,
            });
            shape_map(&mut parts, upgrade, h2, target, ctx, ex);
            (None, client_upgrade)
        }
    };

    let limits = BodyLimits {
        read_timeout: ctx.config().request_body_timeout,
        max_size: ctx.config().max_request_body,
        buffer: pool
            .config
            .request_buffering
            .unwrap_or(ctx.config().request_buffering),
    };
    // Before any backend is chosen: a slow or broken body costs no backend anything.
    let body = match request_body::prepare(body, limits).await {
        Ok(b) => b,
        Err(fault) => return error_response(&ProxyError::Client(fault), ex),
    };
    ex.bytes_in = BytesIn::of(&body);
    // Encoded here for an HTTP/1.1 backend, once: every attempt sends the same bytes.
    let req = Outgoing::new(
        Request::from_parts(parts, body),
        relayed,
        pool.config.protocol,
    );
    let result = forward(req, pool, key, preferred, client_upgrade, ctx, ex).await;
    match (result, &pool.config.sticky) {
        (Ok(resp), None) => resp,
        (Ok(mut resp), Some(s)) => {
            set_sticky_cookie(&mut resp, s, held, pool, ctx, ex);
            resp
        }
        (Err(e), _) => error_response(&e, ex),
    }
}

/// Points the session's cookie at the backend that answered, unless it already did.
fn set_sticky_cookie(
    resp: &mut Response<Inner>,
    config: &crate::config::StickyConfig,
    held: Option<u64>,
    pool: &crate::balance::Pool,
    ctx: &ConnCtx,
    ex: &Exchange,
) {
    let Some(backend) = ex.backend.as_ref().filter(|_| ex.answered) else {
        return;
    };
    let id = sticky::id(&pool.name, backend.addr);
    if held == Some(id) {
        return;
    }
    if let Some(cookie) = sticky::set_cookie(config, id, ctx.proto() == "https") {
        resp.headers_mut().append(http::header::SET_COOKIE, cookie);
    }
}

/// What an HTTP/2 backend needs of the request's shaping.
struct H2Backend {
    /// The pool speaks TLS (the `:scheme`).
    tls: bool,
    /// The client asked for `TE: trailers` (gRPC servers require it).
    te_trailers: bool,
}

/// Shapes the request's map for the backend: hop-by-hop fields out (`upgrade`, the
/// protocol the route lets through, back in), `Host` from an absolute URI, `X-Forwarded-*`,
/// the request id, the route's header rules, and the URI form the backend's protocol wants
/// (`h2` for an HTTP/2 backend).
fn shape_map(
    parts: &mut http::request::Parts,
    upgrade: Option<HeaderValue>,
    h2: Option<H2Backend>,
    target: &Target,
    ctx: &ConnCtx,
    ex: &mut Exchange,
) {
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
    headers::add_forwarded(&mut parts.headers, &ctx.forwarded_for, ctx.proto());
    if ctx.config().request_id {
        ex.request_id = Some(rules::request_id(&mut parts.headers));
    }
    if let Some(r) = &target.request_headers {
        rules::apply(r, &mut parts.headers, &vars(ctx, ex));
    }
    if let Some(h2) = h2 {
        // HTTP/2 carries scheme and authority as pseudo-headers, taken from an absolute URI.
        let scheme = if h2.tls { "https" } else { "http" };
        let authority = parts
            .headers
            .remove(http::header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_owned))
            .unwrap_or_else(|| "localhost".to_owned());
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = Uri::try_from(format!("{scheme}://{authority}{pq}"))
            .unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_2;
        if h2.te_trailers {
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
}

fn request_hash<B>(key: &HashKey, req: &Request<B>, client: IpAddr) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(match client {
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
