//! The admin endpoint: status page, metrics, readiness, reload and per-backend drain
//! controls.
//!
//! - `GET /`: the status page (`page.html`, self-contained): it polls `/status` and calls
//!   the drain/enable endpoints below.
//! - `GET /metrics`: Prometheus text format (see `prometheus`), unless `admin.metrics` is
//!   off.
//! - `GET /status`: JSON with every pool's backends (state, in-flight, counters) and the
//!   last reload's result.
//! - `GET /ready`: 200 while serving, 503 from the moment shutdown begins (or lame duck),
//!   so an outer balancer stops sending first. Public, like HAProxy's `monitor-uri`.
//! - `GET /live`: 200 while the process answers at all (a liveness probe). Public.
//! - `POST /reload`: re-read the config file (same path as SIGHUP and file edits).
//! - `POST /pools/{pool}/backends/{address}/drain` and `.../enable`.
//!
//! When a token is configured (`admin.token` or `admin.token_file`) every request must
//! carry `Authorization: Bearer <token>`, except three that reveal nothing and change
//! nothing: `GET /` (a browser cannot send a token with a page load, and the page holds no
//! data; its script asks for the token when `/status` says 401), and `GET /ready` and
//! `GET /live`, which probes (Docker's HEALTHCHECK, Kubernetes' httpGet) call without
//! credentials. The token is read from the running config on each request, so a reload
//! (a rotated `token_file`) applies it at once.
//! It reads the daemon's state and calls its control methods; it never touches `Live`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Daemon;

/// Longest `POST /lame-duck?wait=` accepted.
const MAX_LAME_DUCK_WAIT: Duration = Duration::from_secs(300);

/// Serves the admin API on `listener` until `stop` fires (a successor took the socket over).
/// A plain shutdown leaves it up while connections drain, so `/ready` can say 503.
pub async fn run(
    listener: Arc<TcpListener>,
    daemon: Arc<Daemon>,
    stop: CancellationToken,
    metrics: Metrics,
) {
    let metrics = Arc::new(metrics);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let daemon = Arc::clone(&daemon);
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let daemon = Arc::clone(&daemon);
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(handle(req, &daemon, &metrics).await) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// What `GET /metrics` serves.
pub enum Metrics {
    /// `admin.metrics = false`: 404.
    Off,
    /// The histograms' recorder (`None` if it could not be installed: the rest still works).
    On(Option<metrics_exporter_prometheus::PrometheusHandle>),
}

async fn handle(
    req: Request<Incoming>,
    daemon: &Daemon,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if req.method() == Method::GET {
        match req.uri().path() {
            "/" => return text(StatusCode::OK, "text/html; charset=utf-8", PAGE),
            "/live" => return reply(StatusCode::OK, json!({"live": true})),
            "/ready" if daemon.is_ready() => return reply(StatusCode::OK, json!({"ready": true})),
            "/ready" => return reply(StatusCode::SERVICE_UNAVAILABLE, json!({"ready": false})),
            _ => {}
        }
    }
    if !authorized(&req, daemon) {
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong bearer token"}),
        );
    }
    // Segments are percent-decoded: the status page encodes addresses (`[::1]:80`).
    let decoded: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = decoded.iter().map(String::as_str).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["status"]) => reply(StatusCode::OK, status(daemon)),
        (&Method::GET, ["metrics"]) => match metrics {
            Metrics::On(histograms) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::prometheus::render(daemon, histograms.as_ref()),
            ),
            Metrics::Off => reply(
                StatusCode::NOT_FOUND,
                json!({"error": "metrics are off (admin.metrics = false)"}),
            ),
        },
        (&Method::POST, ["lame-duck"]) => {
            // `?wait=10s`: answer only after that long (at most 5 minutes), so that a
            // preStop hook holds SIGTERM back while load balancers notice the 503.
            let wait = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("wait=")))
                .map(humantime::parse_duration);
            let wait = match wait {
                None => Duration::ZERO,
                Some(Ok(d)) if d <= MAX_LAME_DUCK_WAIT => d,
                Some(_) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "wait: expected a duration of at most 5m, e.g. wait=10s"}),
                    )
                }
            };
            daemon.enter_lame_duck();
            tokio::time::sleep(wait).await;
            reply(
                StatusCode::OK,
                json!({"ready": false, "waited_ms": wait.as_millis() as u64}),
            )
        }
        (&Method::POST, ["reload"]) => match daemon.reload().await {
            Ok(changed) => reply(
                StatusCode::OK,
                json!({"result": if changed { "applied" } else { "unchanged" }}),
            ),
            Err(e) => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"result": "rejected", "error": e.to_string()}),
            ),
        },
        (&Method::POST, ["pools", pool, "backends", address, action @ ("drain" | "enable")]) => {
            match daemon.set_draining(pool, address, *action == "drain") {
                Ok(()) => reply(
                    StatusCode::OK,
                    json!({"pool": pool, "backend": address, "draining": *action == "drain"}),
                ),
                Err(e) => reply(StatusCode::NOT_FOUND, json!({"error": e})),
            }
        }
        (_, ["status" | "ready" | "live" | "metrics"])
        | (_, ["reload" | "lame-duck"])
        | (_, ["pools", _, "backends", _, _]) => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        _ => reply(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

fn status(daemon: &Daemon) -> serde_json::Value {
    let snap = daemon.live.load_full();
    let mut pools = serde_json::Map::new();
    let mut names: Vec<_> = snap.pools.keys().collect();
    names.sort();
    for name in names {
        let pool = &snap.pools[name];
        let backends: Vec<_> = pool
            .backends
            .iter()
            .zip(&pool.config.backends)
            .map(|(b, cfg)| {
                let responses: serde_json::Map<_, _> = b
                    .stats
                    .responses
                    .read()
                    .map(|(class, n)| (class.to_string(), n.into()))
                    .collect();
                json!({
                    "address": &*b.label,
                    "state": b.state(),
                    // Seconds since the state last changed.
                    "state_age_s": b.state_age().as_secs_f64(),
                    "weight": cfg.weight,
                    // Takes traffic only while no primary is available.
                    "backup": cfg.backup,
                    "max_connections": cfg.max_connections,
                    "in_flight": b.in_flight(),
                    "requests_total": b.requests_total(),
                    "responses": responses,
                    "failures_total": b.failures_total(),
                    "ejections_total": b.stats.ejections.get(),
                    "last_check": b.last_check().map(|(ago, ok)| json!({"ok": ok, "age_s": ago.as_secs_f64()})),
                    "idle_connections": b.conns.idle_count(),
                    // Slow start: the share of its weight it takes now (1 when not ramping).
                    "weight_share": b.ramp_share(pool.config.slow_start),
                })
            })
            .collect();
        pools.insert(
            name.to_string(),
            json!({
                "algorithm": pool.config.algorithm,
                "backends": backends,
                // Requests waiting for a backend below its max_connections.
                "queued": pool.queue().map_or(0, |q| q.waiting()),
                // Backends written as HOST:PORT, followed by DNS.
                "names": pool.config.names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            }),
        );
    }
    let mut listeners = serde_json::Map::new();
    let acme_status = crate::acme::statuses();
    for l in &snap.config.listeners {
        let tls = l.tls.as_ref().map(|t| {
            let certs: Vec<_> = t
                .certificates
                .iter()
                .map(|c| {
                    json!({
                        "cert": c.cert_path,
                        "names": c.names,
                        "not_after": c.not_after,
                        "days_left": c.days_left(),
                        "warning": c.expiry_warning(),
                    })
                })
                .collect();
            // `[tls.acme]`: the settings and what the renewal task last did.
            let acme = t.acme.as_ref().map(|a| {
                json!({
                    "domains": a.domains,
                    "challenge": a.challenge,
                    "directory": a.directory,
                    "storage": a.storage,
                    "certificate": a.cert_path(),
                    "renewal": acme_status.get(&l.name),
                })
            });
            json!({"certificates": certs, "min_version": t.min_version, "alpn": t.alpn, "client_ca": t.client_ca.as_ref().map(|c| &c.path), "acme": acme})
        });
        // Keys the listener's rate limit tracks now (bounded by its max_keys).
        let rate_limit_keys = snap
            .routers
            .get(l.name.as_str())
            .and_then(|r| r.rate_limit.as_ref())
            .map(|r| r.keys());
        listeners.insert(
            l.name.clone(),
            json!({"bind": l.bind.to_string(), "mode": l.mode, "pool": l.default_pool, "tls": tls, "rate_limit_keys": rate_limit_keys}),
        );
    }
    let uptime = daemon.started_at().elapsed().unwrap_or_default();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": uptime.as_secs(),
        "generation": snap.generation,
        "ready": daemon.is_ready(),
        // Client connections open on all listeners (draining ones included).
        "open_connections": daemon.open_connections(),
        "listeners": listeners,
        "pools": pools,
        "reload": daemon.reload_status(),
    })
}

/// The status page: one self-contained HTML file, no external assets.
const PAGE: &str = include_str!("page.html");

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// `%3A` → `:`; anything malformed is left as it is (and will not match a name).
fn percent_decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// True when no token is configured or the request carries the running config's token.
fn authorized(req: &Request<Incoming>, daemon: &Daemon) -> bool {
    let snapshot = daemon.live.load();
    let Some(token) = snapshot
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.as_deref())
    else {
        return true;
    };
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()))
}

/// Compares without an early exit, so response timing says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_decoding() {
        assert_eq!(super::percent_decode("127.0.0.1%3A80"), "127.0.0.1:80");
        assert_eq!(super::percent_decode("%5B%3A%3A1%5D%3A80"), "[::1]:80");
        assert_eq!(super::percent_decode("bad%zz%4"), "bad%zz%4");
    }
}
