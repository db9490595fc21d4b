//! The attempt loop: pick a backend (or wait in the pool's queue), get a connection to it,
//! send, and on failure decide whether to try another one and whom to blame.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{Either, Full};

use super::body::upstream_response;
use super::queue::{wait_in_queue, QueueEnd};
use super::{Inner, Tunnel};
use crate::balance::backend::Lease;
use crate::balance::{NoPick, Pool};
use crate::proxy::abandoned;
use crate::proxy::context::ConnCtx;
use crate::proxy::error::ProxyError;
use crate::proxy::exchange::Exchange;
use crate::proxy::{headers, tunnel};
use crate::request_body::BodyWatch;
use crate::upstream::{ConnSettings, Outgoing, UpstreamError, UpstreamIncoming};

/// Upper bound on attempts per request, whatever `retries` says.
const MAX_ATTEMPTS: usize = 8;

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
pub(super) fn forward<'a>(
    mut req: Outgoing,
    pool: &'a Arc<Pool>,
    key: Option<u64>,
    sticky: Option<usize>,
    client_upgrade: Option<tunnel::ClientUpgrade>,
    ctx: &'a ConnCtx,
    ex: &'a mut Exchange,
) -> impl std::future::Future<Output = Result<Response<Inner>, ProxyError>> + Send + 'a {
    async move {
        let tracker = &ctx.listener.tracker;
        // With `send_proxy`, connections are this client's own (see `Extras`). The header
        // names the client a trusted proxy named, if one did (its port is unknown: 0), and
        // a kept connection serves only requests for the same client.
        let private = cfg_send_proxy(pool).map(|v| {
            let client = ex.client_ip();
            let source = match ex.forwarded {
                Some(_) => std::net::SocketAddr::new(client, 0),
                None => ctx.peer,
            };
            (
                crate::proxy_protocol::encode(v, source, ctx.local),
                ctx.extras.get_or_init(Default::default),
                client,
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
        let connect = req.method() == Method::CONNECT;
        // Whether sending it again after the backend saw it is safe.
        let resendable = cfg.retry_on.non_idempotent || is_idempotent(req.method());
        let watch = req.body().watch();
        // Kept only when the body is in hand: such a request can be sent again after a failure.
        // (An HTTP/1.1 copy shares the encoded head and the body's bytes.)
        let resend = if cfg.retries > 0 {
            req.try_clone()
        } else {
            None
        };
        // `resend` only ever holds a body in hand, so its copy always exists; never fall back to
        // another body (that would send the wrong request).
        let copy = || resend.as_ref()?.try_clone();
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
            // A sticky session's backend first, while it may take the request.
            let first = match sticky.and_then(|i| pool.sticky_lease(i, tried_now)) {
                Some(p) => Ok(p),
                None => pool.select(key, tried_now),
            };
            let picked = match first {
                Ok(p) if !queued_ahead => Ok(p),
                Err(NoPick::Down) => break,
                Ok(p) => {
                    drop(p);
                    Box::pin(wait_in_queue(
                        pool,
                        &ctx.listener.live,
                        key,
                        tried_now,
                        true,
                    ))
                    .await
                }
                // Boxed: the queue is the rare path, its timers need not widen every request.
                Err(NoPick::Full) => {
                    Box::pin(wait_in_queue(
                        pool,
                        &ctx.listener.live,
                        key,
                        tried_now,
                        queued_ahead,
                    ))
                    .await
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
                Some((header, slot, client)) => match slot.take(backend.addr, *client) {
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
            // `reused`: the connection served before (from the pool, or the client's slot).
            let (sender, reused) = match got {
                Ok((s, connect_time)) => {
                    if connect_time.is_some() {
                        ex.connect = connect_time;
                    }
                    (s, connect_time.is_none())
                }
                Err(e) => {
                    let ejected = backend.record_connect_error(&e, &cfg.passive);
                    if e.never_reached()
                        && crate::proxy::may_try_free(attempt, &mut first_miss, cfg.connect_timeout)
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
            let sent = send(
                &mut in_flight,
                watch.as_deref(),
                sent_at,
                cfg.response_timeout,
            )
            .await;
            // Whatever came of it, this task is still here: nothing to finish in the background.
            in_flight.abandon();
            let Some(sent) = sent else {
                // The request may be executing; a timeout is not retried.
                return Err(ProxyError::ResponseTimeout(cfg.response_timeout));
            };
            match sent {
                Ok(resp) => {
                    ex.header = Some(sent_at.elapsed());
                    ex.answered = true;
                    backend.record_success();
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        || (connect && resp.status().is_success());
                    if switching {
                        if let Some(client) = client_upgrade {
                            let label = Arc::clone(&backend.label);
                            let switched = switch_protocols(resp, client, lease, tracker);
                            if switched.is_err() {
                                log_backend_failure(
                                    &pool.name,
                                    &label,
                                    "upstream_failed",
                                    &UpstreamError::WebSocketAccept,
                                    false,
                                    attempt,
                                );
                            }
                            return switched;
                        }
                    }
                    let status = resp.status().as_u16();
                    let backend = Arc::clone(backend);
                    let home = private
                        .as_ref()
                        .map(|(_, slot, client)| (Arc::clone(slot), *client));
                    let resp =
                        upstream_response(resp, lease, (settings, home), pool, cuts, watch.clone());
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
                    // An idle connection that the backend closed, or died with, as the
                    // request went out: the backend answered nothing. As with a request that
                    // never left, a resendable one goes on without spending a retry (Go's
                    // HTTP client does the same for a reused connection).
                    let silent = reused && e.silent();
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
                            if crate::proxy::may_try_free(
                                attempt,
                                &mut first_miss,
                                cfg.connect_timeout,
                            ) {
                                charged -= 1;
                                free_retry = true;
                            }
                            Some(r)
                        }
                        Some(_) => None,
                        None if cfg.retry_on.reset && resendable => {
                            if silent
                                && crate::proxy::may_try_free(
                                    attempt,
                                    &mut first_miss,
                                    cfg.connect_timeout,
                                )
                            {
                                charged -= 1;
                                free_retry = true;
                            }
                            copy()
                        }
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
    sent_at: std::time::Instant,
    response_timeout: Duration,
) -> Option<<abandoned::InFlight as std::future::Future>::Output> {
    match watch {
        // From `sent_at`, which the caller read anyway: `timeout` would read the clock again.
        None => match tokio::time::Instant::from_std(sent_at).checked_add(response_timeout) {
            Some(deadline) => tokio::time::timeout_at(deadline, in_flight).await.ok(),
            // Past what the clock can hold: as good as no timeout.
            None => Some(in_flight.await),
        },
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
pub(super) fn log_backend_failure(
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

/// The backend agreed to switch protocols (a 101, or a 2xx to CONNECT): answer the client
/// the same and join the two connections once both sides have upgraded. An HTTP/2 client's
/// WebSocket gets a 200 instead of the 101, once the backend's `Sec-WebSocket-Accept` is
/// checked; a wrong one closes the backend's connection and is a 502.
fn switch_protocols(
    mut resp: Response<UpstreamIncoming>,
    client: tunnel::ClientUpgrade,
    lease: Lease,
    tracker: &tokio_util::task::TaskTracker,
) -> Result<Response<Inner>, ProxyError> {
    // hyper's (HTTP/2 CONNECT) hands its stream over through the response's extensions.
    let hyper_side = hyper::upgrade::on(&mut resp);
    let protocol = resp.headers().get(http::header::UPGRADE).cloned();
    let (mut parts, body) = resp.into_parts();
    let backend = match body {
        UpstreamIncoming::H1(body) => match body.into_upgraded() {
            Some((io, read_ahead)) => tunnel::BackendUpgrade::Own(Box::new(
                crate::net::Prefixed::new(read_ahead.to_vec(), io),
            )),
            None => tunnel::BackendUpgrade::Missing,
        },
        UpstreamIncoming::H2(..) => tunnel::BackendUpgrade::Hyper(hyper_side),
    };
    let websocket = client.expected_accept().is_some()
        || protocol.as_ref().is_some_and(|p| {
            p.to_str()
                .is_ok_and(|p| p.trim().eq_ignore_ascii_case("websocket"))
        });
    headers::remove_hop_by_hop(&mut parts.headers);
    if let Some(expected) = client.expected_accept() {
        let accept = parts.headers.remove(http::header::SEC_WEBSOCKET_ACCEPT);
        if parts.status != StatusCode::SWITCHING_PROTOCOLS || accept.as_ref() != Some(expected) {
            // `backend` (its switched connection) and the lease drop here: nothing reuses it.
            return Err(ProxyError::Upstream(UpstreamError::WebSocketAccept));
        }
        parts.status = StatusCode::OK;
    } else if let Some(p) = protocol.filter(|_| parts.status == StatusCode::SWITCHING_PROTOCOLS) {
        tunnel::restore_upgrade_headers(&mut parts.headers, p);
    }
    parts.extensions.insert(Tunnel);
    tunnel::spawn(client, backend, lease, tracker, websocket);
    Ok(Response::from_parts(
        parts,
        Either::Right(Full::new(Bytes::new())),
    ))
}
