//! ballast: an L4/L7 load balancer daemon.
//!
//! # Layout
//! Modules depend only on modules above them in this list. The hot path
//! (`listener` → `proxy` → `balance` → `upstream`) reads shared state through one `ArcSwap`
//! load per request plus atomics; its only locks are a backend's idle-connection list (or its
//! shared HTTP/2 handle, or a `send_proxy` client's own connection), each held for a push
//! or a pop. Off the happy path: the warning limiter's table on failures, and the
//! per-client connection table at accept when `max_connections_per_client` is set. Only when
//! configured: a rate limiter's shard (`rate_limit`) and a pool's retry budget window
//! (`retry_budget`), each held for a few arithmetic steps.
//!
//! - `proxy_protocol`: PROXY protocol v1/v2 headers: parse (bounded, incremental) and write.
//! - `h1`: HTTP/1.1 message framing (RFC 9112): heads, body decoding, encoding, and a server
//!   and a client connection on them: HTTP/1.1 on every HTTP listener, plain or TLS, and to
//!   every HTTP/1.1 backend (HTTP/2 stays on hyper both ways).
//! - `config`: the TOML file → validated [`config::Config`], errors as `FILE:LINE:COL: ...`.
//! - `log_limit`: at most one line a second per repeated data-path warning.
//! - `logging`: the daemon log: text or JSON, level from `[log]`, dependencies' lines
//!   limited like ballast's own.
//! - `stats`: the data path's counters (per listener, per pool) and latency histogram
//!   handles; per-backend ones sit on the backend.
//! - `access_log`: one line per request or TCP connection, queued to a writer thread.
//! - `health::threshold`: the pure rise/fall counter.
//! - `net`: a TCP stream with write-stall, request-head and keep-alive timeouts.
//! - `tls`: rustls configurations: certificate by SNI, versions, ALPN, client certificates.
//! - `request_body`: request bodies buffered or streamed upstream, with read timeout, size
//!   limit, and a record of the client's faults so they are never blamed on a backend.
//! - `upstream`: connections to backends (TLS, PROXY header, HTTP/1.1 on `h1::client` or
//!   HTTP/2 on hyper), the per-backend idle pool, and `upstream::sender`: the one type the
//!   request path sends on and gets a response body from, whichever the protocol.
//! - `discovery`: DNS discovery: one task per `HOST:PORT` backend entry turns the name's
//!   records into address sets for the control plane, riding out DNS outages.
//! - `access`: IP ranges, and `allow_from` / `deny_from`.
//! - `basic_auth`: HTTP Basic authentication against an htpasswd file of bcrypt hashes.
//! - `rate_limit`: token buckets per client address or header value, in a bounded table.
//! - `balance`: [`balance::Pool`], its backends' live state, the selection policies, the
//!   queue for `max_connections` and the retry budget.
//! - `state`: the [`state::Snapshot`] of one config generation and the `Live` handle.
//! - `routing`: per listener, the routes (what each matches, who may use it, and what it
//!   does: forward to a pool, redirect or answer).
//! - `health`: probe tasks, reconciled against each new snapshot.
//! - `acme`: certificates ordered and renewed from an ACME CA into `storage`, from where
//!   the config loads them; its challenge answers (http-01 files, tls-alpn-01
//!   certificates) and the renewal lock replicas share.
//! - `proxy`: hop-by-hop headers, route rules (header rules, prefix rewrites, request id),
//!   error mapping, the connection context, the HTTP forwarding path (one file per step
//!   under `proxy/http/`), upgrade tunnels, the TCP (L4) forwarding path.
//! - `handover`: listening sockets passed to a successor process or from systemd, and the
//!   Unix socket that serves them.
//! - `listener`: socket binding (or adoption), accept loops, per-connection limits, PROXY
//!   headers in, TLS handshakes, and the HTTP/1.1 or HTTP/2 server for each connection.
//! - `systemd`: sd_notify readiness, reload and watchdog messages.
//! - `control`: the control plane, single writer of the live snapshot: startup and reloads
//!   (file watch, SIGHUP, admin API) and DNS updates go through one apply sequence; drain,
//!   shutdown state.
//! - `prometheus`: `GET /metrics`, read from the live snapshot at scrape time.
//! - `admin`: the admin HTTP endpoint (status page, metrics, status, ready, lame duck,
//!   reload, drain).
//! - `app`: the composition root: wiring, signals (SIGUSR1 reopens the access log), file
//!   watch, DNS updates, shutdown order.
//! - `demo`: built-in backends for `ballast demo` and `ballast demo-backend`.
//! - `probe`: `ballast probe URL`, the container image's health check.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod access;
pub mod access_log;
pub mod acme;
pub mod admin;
pub mod app;
pub mod balance;
pub mod basic_auth;
pub mod config;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod h1;
pub mod handover;
pub mod health;
pub mod listener;
pub mod log_limit;
pub mod logging;
pub mod net;
pub mod probe;
pub mod prometheus;
pub mod proxy;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod request_body;
pub mod routing;
pub mod state;
pub mod stats;
pub mod systemd;
pub mod tls;
pub mod upstream;
