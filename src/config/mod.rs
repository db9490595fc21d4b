//! Validated configuration: what the daemon runs on.
//!
//! [`Config::from_toml_str`] turns the TOML text into immutable, checked values, or into a
//! [`ConfigError`] listing every problem as `FILE:LINE:COLUMN: what is wrong`. Syntax and type
//! errors come from the TOML parser (one at a time, as serde stops at the first); every
//! semantic error (bad address, bad duration, unknown pool, duplicate bind, empty pool, zero
//! weight, ...) is collected in a single pass. `Config` is `PartialEq` so a reload can tell
//! that nothing changed.

mod env;
mod file;
pub mod tls;
mod validate;
pub mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use file::FileConfig;
use serde::Deserialize;

/// Defaults, in one place so `config/ballast.toml` and the code agree.
pub mod defaults {
    use std::time::Duration;
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTIONS: u32 = 10_000;
    pub const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
    pub const REQUEST_BUFFERING: usize = 64 * 1024;
    /// Keeps `request_buffering` × concurrent slow uploads within reason.
    pub const MAX_REQUEST_BUFFERING: usize = 64 * 1024 * 1024;
    pub const RESPONSE_BUFFER: usize = 32 * 1024;
    pub const ACCESS_LOG_BUFFER: u32 = 16_384;
    /// hyper's smallest buffer.
    pub const MIN_RESPONSE_BUFFER: usize = 8 * 1024;
    pub const MAX_RESPONSE_BUFFER: usize = 16 * 1024 * 1024;
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
    pub const MAX_HEADER_SIZE: u32 = 32 * 1024;
    pub const MAX_HEADERS: u32 = 100;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const RETRIES: u32 = 1;
    /// Retries per second a retry budget always allows.
    pub const RETRY_BUDGET_MIN: u32 = 10;
    pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
    pub const MAX_QUEUE: u32 = 1024;
    pub const RATE_LIMIT_MAX_KEYS: u32 = 100_000;
    /// IPv6 clients are counted per /64: one subscriber's or one host's allocation.
    pub const RATE_LIMIT_IPV6_PREFIX: u8 = 64;
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
    pub const RISE: u32 = 2;
    pub const FALL: u32 = 3;
    pub const PASSIVE_MAX_FAILS: u32 = 1;
    pub const PASSIVE_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    /// hyper refuses a read buffer below 8 KiB, so headers can't be limited below that.
    pub const MIN_HEADER_SIZE: u32 = 8 * 1024;
    pub const MAX_WEIGHT: i64 = 1000;
    pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
    /// Resolving more often than this would only hammer the resolver.
    pub const MIN_RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
    pub const RESOLVE_GRACE: Duration = Duration::from_secs(30);
    /// Longest duration accepted anywhere: keeps timer arithmetic far from overflow.
    pub const ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
    pub const ACME_STORAGE: &str = "/var/lib/ballast/acme";
    pub const ACME_RETRY_AFTER: Duration = Duration::from_secs(60);
    pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
    /// `compress.min_size`: below this, compression saves less than it costs.
    pub const COMPRESS_MIN_SIZE: u64 = 1024;
    /// `compress.types`: text that compresses well (`text/*` takes in HTML, CSS, plain
    /// text, CSV, JavaScript as `text/javascript`, event streams).
    pub const COMPRESS_TYPES: [&str; 7] = [
        "text/*",
        "application/json",
        "application/javascript",
        "application/xml",
        "application/wasm",
        "image/svg+xml",
        "application/x-ndjson",
    ];
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub global: Global,
    pub admin: Option<AdminConfig>,
    pub log: LogConfig,
    /// `None`: no access log.
    pub access_log: Option<AccessLogConfig>,
    /// Sorted by name.
    pub listeners: Vec<ListenerConfig>,
    /// Sorted by name.
    pub pools: Vec<PoolConfig>,
    /// Environment variables the file reads with `${env:NAME}` (names only; `--check`
    /// lists them).
    pub env_vars: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// `None`: one worker per core.
    pub worker_threads: Option<usize>,
    pub shutdown_timeout: Duration,
    /// Unix socket on which this process hands its listeners to a successor started with
    /// `--upgrade`. `None`: no hand-over.
    pub handover_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// From `token`, or read from `token_file` (watched: a rotated file reloads).
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Serve `GET /metrics` and record the latency histograms behind it.
    pub metrics: bool,
}

/// The `[access_log]` table: one line per HTTP request or TCP connection.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    /// `None`: standard output.
    pub path: Option<PathBuf>,
    pub format: AccessLogFormat,
    /// Lines held for the writer thread; beyond that, lines are dropped (and counted)
    /// rather than slowing requests down.
    pub buffer: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// One JSON object per line.
    Json,
    /// nginx's (and Apache's) "combined" format; `"common"` is accepted as an alias.
    Combined,
}

/// The `[log]` table: the daemon's own log (stderr, the journal under systemd).
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// An `EnvFilter` directive: `"info"`, `"warn,ballast=debug"`. `--log` and `RUST_LOG`
    /// win over it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-06T22:05:39.123Z  INFO ballast::app: message key=value ...`
    Text,
    /// One JSON object per line with the same fields: `timestamp`, `level`, `target`,
    /// `message` and each `key`.
    Json,
}

/// One of a TCP listener's `sni_routes`.
#[derive(Debug, Clone, PartialEq)]
pub struct SniRoute {
    pub sni: HostMatch,
    pub pool: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub default_pool: String,
    pub routes: Vec<RouteConfig>,
    pub max_connections: usize,
    /// Also bounds how long an idle keep-alive connection waits for its next request.
    pub request_header_timeout: Duration,
    /// A write to the client blocked this long (the client stopped reading) closes the
    /// connection, like nginx's `send_timeout`.
    pub send_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    /// How long an idle keep-alive connection waits for the first byte of its next request
    /// (nginx `keepalive_timeout`, HAProxy `timeout http-keep-alive`). Once that byte has
    /// arrived, `request_header_timeout` bounds the rest of the head.
    pub keepalive_timeout: Duration,
    /// Longest gap between two reads of a request body (408, or a close once the response
    /// has started).
    pub request_body_timeout: Duration,
    /// Bytes of request body read completely before a backend is chosen, for pools that do
    /// not set their own; 0 turns buffering off.
    pub request_buffering: usize,
    /// Largest request body accepted (413); `None`: no limit.
    pub max_request_body: Option<u64>,
    /// Most response data held for one client in ballast's write buffer: a client reading
    /// slowly slows the backend down instead of growing a buffer.
    pub response_buffer: usize,
    /// `Upgrade` protocols passed to backends (lower case), unless a route says otherwise.
    pub upgrade: Vec<String>,
    /// Whether `CONNECT` requests are forwarded (and tunnelled on a 2xx); else 405.
    pub allow_connect: bool,
    /// Connections one client address may hold open at once; `None`: no limit.
    pub max_connections_per_client: Option<usize>,
    /// TLS termination; `None`: plain TCP.
    pub tls: Option<TlsConfig>,
    /// `redirect_https`: every request gets a 308 to the same URL on `https://` (with
    /// `redirect_https_port`), before routing. A redirect like a route's, made at load.
    pub redirect_https: Option<Redirect>,
    /// Accept cleartext HTTP/2 with prior knowledge (next to HTTP/1.1) on a plain listener.
    pub h2c: bool,
    /// HTTP (parsed, routed per request) or TCP (bytes forwarded per connection).
    pub mode: ListenerMode,
    /// Trusted sources of PROXY protocol headers. When set, every connection must come from
    /// one of these ranges and start with a v1 or v2 header, whose client address then
    /// replaces the socket's everywhere.
    pub accept_proxy: Option<crate::access::Ranges>,
    /// TCP mode: move bytes with splice(2) through a pipe instead of userspace buffers.
    pub splice: bool,
    /// TCP mode: the pool for a TLS client by the name its ClientHello asks for, first
    /// match in file order; no match, the listener's pool. TLS is not terminated
    /// (`proxy::sni_peek`).
    pub sni_routes: Vec<SniRoute>,
    /// TCP mode: a client whose first bytes are not a TLS ClientHello naming a host is
    /// refused, not sent to the listener's pool.
    pub sni_required: bool,
    /// `X-Request-Id`: passed through when the client sent a sane one, else generated;
    /// forwarded and logged. Also on when a header rule uses `${request_id}`.
    pub request_id: bool,
    /// Header rules for requests that no route with its own rules matches.
    pub request_headers: Option<HeaderRules>,
    pub response_headers: Option<HeaderRules>,
    /// Applies to every request of this listener.
    pub rate_limit: Option<RateLimitConfig>,
    /// `allow_from` / `deny_from`: clients refused before routing (HTTP: a 403 per request;
    /// TCP: the connection is closed at accept).
    pub access: crate::access::Access,
    /// Response compression for requests that no route with its own `compress` matches.
    pub compress: Option<CompressConfig>,
    /// Basic authentication for requests that no route with its own `basic_auth` matches.
    pub basic_auth: Option<BasicAuthConfig>,
    /// Proxies whose `X-Forwarded-For` (or `Forwarded`) names the client: for their
    /// connections the client address is the one those fields give (`proxy::client_addr`).
    /// When set, an `X-Forwarded-For` from anyone else is replaced, not extended.
    pub trusted_proxies: Option<crate::access::Ranges>,
    /// Whether this listener's requests go to the access log (when there is one).
    pub access_log: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerMode {
    Http,
    /// L4: each client connection is joined to one backend connection, bytes both ways.
    Tcp,
}

/// TLS termination on a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// The first is the default, for clients without SNI or with an unknown name.
    pub certificates: Vec<tls::CertPair>,
    pub min_version: TlsVersion,
    /// ALPN protocols offered, in order of preference.
    pub alpn: Vec<String>,
    /// Mutual TLS: a client certificate signed by one of these is required.
    pub client_ca: Option<tls::CaBundle>,
    /// Refuse a handshake whose SNI matches no certificate (or that has none) instead of
    /// answering with the default certificate (HAProxy's `strict-sni`).
    pub strict_sni: bool,
    /// `session_ticket_keys_file`; `None`: the process's own keys (`tls::tickets`).
    pub session_tickets: Option<tls::TicketKeys>,
    /// `[tls.acme]`: a certificate ordered and renewed by ballast. Once issued it is one of
    /// `certificates` (read from `storage` like any other file).
    pub acme: Option<AcmeConfig>,
}

/// `[listeners.NAME.tls.acme]` (`crate::acme` does the work).
#[derive(Debug, Clone, PartialEq)]
pub struct AcmeConfig {
    /// DNS names, lower case; the first names the certificate's folder in `storage`.
    pub domains: Vec<String>,
    pub email: Option<String>,
    /// The CA's directory URL.
    pub directory: String,
    /// An extra CA to trust for the directory's own HTTPS.
    pub directory_ca: Option<tls::CaBundle>,
    pub challenge: AcmeChallenge,
    /// Account, certificates, challenge answers and the renewal lock; may be shared.
    pub storage: PathBuf,
    /// The wait after a failed attempt; it doubles with each further failure.
    pub retry_after: Duration,
    /// A stored certificate that exists but cannot be used (a warning; a new one is
    /// ordered).
    pub stored_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum AcmeChallenge {
    #[serde(rename = "http-01")]
    Http01,
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
}

impl AcmeConfig {
    /// The folder in `storage` that holds this certificate and its key.
    pub fn cert_dir(&self) -> PathBuf {
        let name = self.domains.first().map_or("certificate", |d| d.as_str());
        self.storage.join(name)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.cert_dir().join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.cert_dir().join("key.pem")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    pub path_prefix: Option<String>,
    /// The whole path, exactly (no query).
    pub path: Option<String>,
    /// Matched against the path (no query), anywhere in it unless anchored.
    pub path_regex: Option<Pattern>,
    /// The request's method is one of these (case-sensitive, as RFC 9110 §9.1 says).
    pub methods: Option<Vec<http::Method>>,
    /// Each named field must match as given.
    pub headers: Vec<(http::HeaderName, FieldMatch)>,
    /// Each named query parameter (percent-decoded) must match as given.
    pub query: Vec<(String, FieldMatch)>,
    /// The client's address is in one of these ranges.
    pub client_cidrs: Option<crate::access::Ranges>,
    /// The TLS client's SNI (TLS listeners only): exact or `*.suffix`, as `host`.
    pub sni: Option<HostMatch>,
    /// Clients this route refuses (403) once it matches.
    pub access: crate::access::Access,
    /// What the route does with a request it matches.
    pub action: RouteAction,
    /// Overrides the listener's `upgrade` list for requests this route matches.
    pub upgrade: Option<Vec<String>>,
    /// What replaces the matched `path_prefix` before forwarding (`strip_prefix`: `""`).
    pub rewrite_prefix: Option<String>,
    /// Override the listener's header rules for requests this route matches.
    pub request_headers: Option<HeaderRules>,
    pub response_headers: Option<HeaderRules>,
    /// Applies to requests this route matches, after the listener's own.
    pub rate_limit: Option<RateLimitConfig>,
    /// Overrides the listener's `compress` for requests this route matches.
    pub compress: Option<CompressConfig>,
    /// Overrides the listener's `basic_auth` for requests this route matches.
    pub basic_auth: Option<BasicAuthConfig>,
}

/// What a route does with a request: forward it to a pool, or answer it itself.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    Pool(String),
    Redirect(Redirect),
    Respond(Respond),
}

impl RouteAction {
    /// The pool a forwarding route names.
    pub fn pool(&self) -> Option<&str> {
        match self {
            RouteAction::Pool(p) => Some(p),
            _ => None,
        }
    }
}

/// `redirect = { to = "https://${host}${request_uri}", status = 301 }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    /// `to`, split at its variables.
    pub to: Vec<UrlPiece>,
    /// 301, 302, 303, 307 or 308.
    pub status: http::StatusCode,
}

/// A piece of a redirect's `to`.
#[derive(Debug, Clone, PartialEq)]
pub enum UrlPiece {
    Text(String),
    /// `${host}`: the request's host without its port (an IPv6 address in brackets).
    Host,
    /// `${path}`: the path as routed (dot-segments resolved), without the query.
    Path,
    /// `${query}`: the query without its `?` (empty when there is none).
    Query,
    /// `${request_uri}`: the path and query as the client sent them.
    RequestUri,
}

/// `respond = { status = 503, body = "...", content_type = "...", headers = { ... } }`: a
/// response ballast makes itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Respond {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
    /// `content_type` first, then `headers`.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// A route's regular expression (`path_regex`, or a header or query value's), compiled once
/// at load. The `regex` crate matches in linear time (no backtracking), so nothing a
/// client sends can make matching slow.
#[derive(Debug, Clone)]
pub struct Pattern(pub regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// What a route asks of a request header or query parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldMatch {
    /// Some field line (or parameter) has exactly this value.
    Equals(String),
    Present,
    Absent,
    /// Some field line's (or parameter's) value matches.
    Regex(Pattern),
}

/// `rate_limit`: a token bucket per key.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: RateKey,
    /// Keys tracked at most (buckets idle long enough to be full are dropped first).
    pub max_keys: usize,
    /// IPv6 client addresses are counted by their first this many bits (1 to 128).
    pub ipv6_prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    /// A header's value; requests without it are counted by client address.
    Header(http::HeaderName),
}

/// `request_headers` / `response_headers`: fields removed, then fields set (replacing any
/// of the same name).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderRules {
    pub remove: Vec<http::HeaderName>,
    pub set: Vec<(http::HeaderName, Template)>,
}

impl HeaderRules {
    pub fn uses_request_id(&self) -> bool {
        self.set
            .iter()
            .any(|(_, t)| t.0.contains(&Piece::RequestId))
    }
}

/// A header value with variables: `"${client_ip}"`, `"${request_id}"`, `"${listener}"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(pub Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Checked and converted once, when the config is read: a value without variables is
    /// then a reference-count increment per request.
    Text(http::HeaderValue),
    ClientIp,
    RequestId,
    Listener,
}

/// Host part of a route, lower-cased, without port.
#[derive(Debug, Clone, PartialEq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`; it matches `a.example.com`, not
    /// `example.com`.
    Suffix(String),
}

impl HostMatch {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    RoundRobin,
    LeastConn,
    Random,
    Hash,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
    Path,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub hash_key: Option<HashKey>,
    pub backends: Vec<BackendConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub passive: PassiveConfig,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub retries: u32,
    /// Idle connections kept per backend at most; `None` (the default): as many as the
    /// backend had in use at once lately, so that steady load opens no new connections.
    pub max_idle_per_backend: Option<usize>,
    /// Overrides the listener's `request_buffering` for this pool.
    pub request_buffering: Option<usize>,
    /// What the backends speak.
    pub protocol: UpstreamProtocol,
    /// TLS to the backends; `None`: plain TCP.
    pub tls: Option<UpstreamTls>,
    /// Send a PROXY protocol header with the client's address on each backend connection;
    /// such connections then serve one client connection only.
    pub send_proxy: Option<crate::proxy_protocol::Version>,
    /// Backends written as `HOST:PORT`: each A/AAAA record of the name is a backend. Their
    /// addresses are not part of the file; the control plane adds them (see
    /// [`PoolConfig::with_resolved`]).
    pub names: Vec<NamedBackend>,
    /// How names are resolved (ignored when `names` is empty).
    pub dns: DnsConfig,
    /// A backend that becomes healthy ramps from a small share of its weight to all of it
    /// over this time; `None`: full weight at once.
    pub slow_start: Option<Duration>,
    /// What happens when no backend (primary or backup) is available.
    pub when_all_down: WhenAllDown,
    /// Envoy's panic mode: when fewer than this share (0..=1) of the primaries are
    /// available, requests go to every primary that is not draining, ignoring health.
    pub panic_threshold: Option<f64>,
    /// Which failures are retried (when `retries` > 0).
    pub retry_on: RetryOn,
    /// Caps retries at a share of the pool's requests over a sliding window.
    pub retry_budget: Option<RetryBudgetConfig>,
    /// Requests a request waits in the pool's queue while every eligible backend is at its
    /// `max_connections`, before 503 (`reason=queue_timeout`).
    pub queue_timeout: Duration,
    /// Requests that may wait in the queue; beyond it, 503 at once (`reason=queue_full`).
    pub max_queue: usize,
    /// `algorithm = "hash"`: consistent hashing with bounded loads. No backend takes more
    /// than this percentage of the average in-flight load; a key moves on along the ring
    /// only while its own backend is over that bound.
    pub hash_balance_factor: Option<u32>,
    /// A pause before each retry; `None`: retry at once.
    pub retry_backoff: Option<Duration>,
    /// Sessions kept on one backend by a cookie ballast sets (`balance::sticky`).
    pub sticky: Option<StickyConfig>,
}

/// `basic_auth = { realm, users_file }` on a listener or route (`basic_auth`).
#[derive(Debug, Clone, PartialEq)]
pub struct BasicAuthConfig {
    pub realm: String,
    /// Watched: an edit reloads, with the new users.
    pub users_file: PathBuf,
    pub users: crate::basic_auth::Users,
}

/// `compress = { types, min_size, algorithms }` on a listener or route (`proxy::compress`).
#[derive(Debug, Clone, PartialEq)]
pub struct CompressConfig {
    /// Media types compressed: exact, or `type/*`.
    pub types: Vec<TypeMatch>,
    /// A response whose `Content-Length` is below this is sent as it is.
    pub min_size: u64,
    /// Offered, in the server's order of preference.
    pub algorithms: Vec<Encoding>,
}

/// A media type in `compress.types`, lower case: `application/json`, or `text/*` (kept as
/// the prefix `text/`).
#[derive(Debug, Clone, PartialEq)]
pub enum TypeMatch {
    Exact(String),
    Prefix(String),
}

impl TypeMatch {
    /// Whether a `Content-Type` value (parameters ignored, case-insensitive) matches.
    pub fn matches(&self, content_type: &[u8]) -> bool {
        let end = content_type
            .iter()
            .position(|b| *b == b';')
            .unwrap_or(content_type.len());
        let media = content_type[..end].trim_ascii();
        match self {
            TypeMatch::Exact(t) => media.eq_ignore_ascii_case(t.as_bytes()),
            TypeMatch::Prefix(p) => {
                media.len() > p.len() && media[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
        }
    }
}

/// A content coding ballast compresses with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Zstd,
    Br,
    Gzip,
}

impl Encoding {
    /// The `Content-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Zstd => "zstd",
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }

    /// The names `Accept-Encoding` may give it (`x-gzip` is gzip, RFC 9110 §8.4.1.3).
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Encoding::Zstd => &["zstd"],
            Encoding::Br => &["br"],
            Encoding::Gzip => &["gzip", "x-gzip"],
        }
    }
}

/// `sticky = { cookie, ttl, pass_cookie }` on a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct StickyConfig {
    /// The cookie's name.
    pub cookie: String,
    /// `Max-Age`; `None`: a session cookie (gone when the browser closes).
    pub ttl: Option<Duration>,
    /// Forward the cookie to the backend too (by default it is removed).
    pub pass_cookie: bool,
}

impl PoolConfig {
    /// Whether any backend has a `max_connections` limit (and so the pool a queue).
    pub fn has_limits(&self) -> bool {
        self.backends.iter().any(|b| b.max_connections.is_some())
    }
}

/// `when_all_down`: what a pool with no available backend does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenAllDown {
    /// 503 (`reason=no_healthy_backend`).
    #[default]
    Reject,
    /// Send to every backend that is not draining, ignoring health and ejection.
    FailOpen,
}

/// `retry_on`: the failures a request is retried for, on another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn {
    /// The backend could not be reached (connect, TLS or handshake failure), or a pooled
    /// connection closed before the request was written: the request never left.
    pub connect_failure: bool,
    /// The backend closed or reset the connection before a response head.
    pub reset: bool,
    /// Statuses answered by the backend that are retried (502, 503, 504).
    pub statuses: [bool; 3],
    /// `non_idempotent`: after a reset or a retried status, also resend methods that are not
    /// idempotent (POST, PATCH, ...), which the backend may already have acted on. Off by
    /// default, as in nginx (`proxy_next_upstream non_idempotent`).
    pub non_idempotent: bool,
}

impl Default for RetryOn {
    /// What ballast retried before `retry_on` existed.
    fn default() -> Self {
        RetryOn {
            connect_failure: true,
            reset: true,
            statuses: [false; 3],
            non_idempotent: false,
        }
    }
}

impl RetryOn {
    /// Whether a response with `status` is retried.
    #[inline]
    pub fn status(&self, status: u16) -> bool {
        match status {
            502..=504 => self.statuses[(status - 502) as usize],
            _ => false,
        }
    }

    pub fn any_status(&self) -> bool {
        self.statuses.iter().any(|s| *s)
    }
}

/// `retry_budget` and `retry_budget_min`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed as a share of requests over the window.
    pub ratio: f64,
    /// Retries per second always allowed, however few requests came.
    pub min_per_second: u32,
}

impl PoolConfig {
    /// This pool with the resolved addresses of its names appended as ordinary backends, in
    /// name order then address order; an address already listed keeps its first entry.
    pub fn with_resolved<'a>(
        &self,
        resolved: impl Fn(&NamedBackend) -> Option<&'a [std::net::IpAddr]>,
    ) -> PoolConfig {
        let mut out = self.clone();
        for n in &self.names {
            for ip in resolved(n).unwrap_or_default() {
                let address = SocketAddr::new(*ip, n.port);
                if !out.backends.iter().any(|b| b.address == address) {
                    out.backends.push(BackendConfig {
                        address,
                        weight: n.weight,
                        backup: n.backup,
                        max_connections: n.max_connections,
                        host: Some(n.host.clone()),
                    });
                }
            }
        }
        out
    }
}

/// A backend entry written as `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedBackend {
    pub host: String,
    pub port: u16,
    /// The weight of every address the name resolves to.
    pub weight: u32,
    /// Every address the name resolves to is a backup.
    pub backup: bool,
    /// The limit of every address the name resolves to.
    pub max_connections: Option<u32>,
}

impl std::fmt::Display for NamedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// DNS discovery settings of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    /// Re-resolve period (at least 1s).
    pub interval: Duration,
    /// How long an empty answer or NXDOMAIN for a name that resolved before is ignored
    /// (the last good addresses stay) before the pool follows it.
    pub grace: Duration,
    /// Name servers; empty: /etc/resolv.conf.
    pub resolvers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, one request at a time per pooled connection.
    Http1,
    /// HTTP/2 (prior knowledge, or ALPN over TLS): requests multiplexed on one connection.
    H2,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// Trust anchors for the backends' certificates.
    pub ca: Option<tls::CaBundle>,
    /// Name sent as SNI and verified; `None`: the backend's IP address is verified.
    pub sni: Option<String>,
    /// Accept any certificate (warned about at every load).
    pub insecure_skip_verify: bool,
    /// The pool carries a `mode = "tcp"` listener's bytes: no ALPN is offered (they are not
    /// HTTP). Set by validation from the listeners that use the pool.
    pub for_tcp: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
    /// Gets traffic only while no primary (non-backup) backend of its pool is available.
    pub backup: bool,
    /// Requests in flight to this backend at most (the pool's `max_connections` unless the
    /// backend sets its own); `None`: no limit.
    pub max_connections: Option<u32>,
    /// The DNS name this address was resolved from (a `HOST:PORT` entry); `None` for an
    /// address written in the file. TLS to the backend verifies this name by default.
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Tcp,
    Http {
        path: String,
        /// Host header sent with the probe; `None` sends the backend address.
        host: Option<String>,
        expect_status: Range<u16>,
    },
}

/// Passive ejection (nginx `max_fails`/`fail_timeout`): after `max_fails` consecutive
/// failed connections a backend gets no traffic for `fail_timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassiveConfig {
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

/// One problem in a config file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                p.line,
                p.column,
                p.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml_str(&text, path),
            Err(e) => Err(ConfigError {
                file: path.to_path_buf(),
                problems: vec![Problem {
                    line: 0,
                    column: 0,
                    message: format!("cannot read file: {e}"),
                }],
            }),
        }
    }

    /// Parses and validates `text`; `file` labels errors and anchors relative paths.
    /// `${env:NAME}` reads the process environment.
    pub fn from_toml_str(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let mut v = validate::Validator {
            text,
            base: file.parent().unwrap_or(Path::new("")),
            problems: Vec::new(),
        };
        let config = match toml::de::DeTable::parse(text) {
            Ok(mut doc) => {
                let mut env_problems = Vec::new();
                let used = env::expand(doc.get_mut(), &env, &mut env_problems);
                // A string left unexpanded would also fail its own check: report the cause
                // alone.
                let expanded = env_problems.is_empty();
                for (span, message) in env_problems {
                    v.push(span, message);
                }
                match FileConfig::deserialize(toml::de::Deserializer::from(doc)) {
                    Ok(raw) if expanded => v.config(raw, used.into_iter().collect()),
                    Ok(_) => None,
                    Err(e) => {
                        v.push(e.span().unwrap_or(0..0), e.message().trim_end().to_string());
                        None
                    }
                }
            }
            Err(e) => {
                v.push(e.span().unwrap_or(0..0), e.message().trim_end().to_string());
                None
            }
        };
        v.problems.sort_by_key(|p| (p.line, p.column));
        match config {
            Some(c) if v.problems.is_empty() => Ok(c),
            _ => Err(ConfigError {
                file: file.to_path_buf(),
                problems: v.problems,
            }),
        }
    }

    /// Every file besides the config file whose contents are part of the config (TLS
    /// certificates, keys, CA bundles): an edit of one reloads like an edit of the config.
    pub fn referenced_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .admin
            .iter()
            .filter_map(|a| a.token_file.clone())
            .collect();
        for l in &self.listeners {
            let auths = l
                .basic_auth
                .iter()
                .chain(l.routes.iter().filter_map(|r| r.basic_auth.as_ref()));
            files.extend(auths.map(|a| a.users_file.clone()));
            if let Some(t) = &l.tls {
                for c in &t.certificates {
                    files.push(c.cert_path.clone());
                    files.push(c.key_path.clone());
                }
                files.extend(t.client_ca.as_ref().map(|c| c.path.clone()));
                files.extend(t.session_tickets.as_ref().map(|k| k.path.clone()));
                // Watched before the first issuance too: `acme` makes the folder at start.
                if let Some(a) = &t.acme {
                    files.push(a.cert_path());
                    files.push(a.key_path());
                }
            }
        }
        for p in &self.pools {
            files.extend(
                p.tls
                    .as_ref()
                    .and_then(|t| t.ca.as_ref())
                    .map(|c| c.path.clone()),
            );
        }
        files.sort();
        files.dedup();
        files
    }

    /// Warnings about what loaded but needs attention (certificates near expiry, backends
    /// whose certificates are not verified).
    pub fn warnings(&self) -> Vec<String> {
        let insecure = self
            .pools
            .iter()
            .filter(|p| p.tls.as_ref().is_some_and(|t| t.insecure_skip_verify))
            .map(|p| format!("pools.{}.tls: insecure_skip_verify = true: backend certificates are NOT verified; anyone on the path can impersonate these backends", p.name));
        self.listeners
            .iter()
            .filter_map(|l| l.tls.as_ref().map(|t| (l, t)))
            .flat_map(|(l, t)| {
                t.certificates.iter().filter_map(move |c| {
                    c.expiry_warning()
                        .map(|w| format!("listeners.{}.tls: {w}", l.name))
                })
            })
            .chain(insecure)
            .chain(self.listeners.iter().filter_map(|l| {
                let a = l.tls.as_ref()?.acme.as_ref()?;
                let e = a.stored_error.as_ref()?;
                Some(format!(
                    "listeners.{}.tls.acme: {e}; a new certificate will be ordered",
                    l.name
                ))
            }))
            .collect()
    }

    /// No listener, no pool: what runs before the first config is applied.
    pub fn empty() -> Config {
        Config {
            global: Global {
                worker_threads: None,
                shutdown_timeout: defaults::SHUTDOWN_TIMEOUT,
                handover_socket: None,
            },
            admin: None,
            log: LogConfig::default(),
            access_log: None,
            listeners: Vec::new(),
            pools: Vec::new(),
            env_vars: Vec::new(),
        }
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// One line for `--check` and logs.
    pub fn summary(&self) -> String {
        let backends: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        let names: usize = self.pools.iter().map(|p| p.names.len()).sum();
        let names = match names {
            0 => String::new(),
            n => format!(", {n} name(s) resolved by DNS"),
        };
        format!(
            "{} listener(s), {} pool(s), {} backend(s){names}",
            self.listeners.len(),
            self.pools.len(),
            backends
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Config::from_toml_str(text, Path::new("t.toml")) {
            Ok(_) => vec![],
            Err(e) => e.to_string().lines().map(String::from).collect(),
        }
    }

    const GOOD: &str = r#"
[listeners.web]
bind = "127.0.0.1:8080"
pool = "app"

[[listeners.web.routes]]
host = "*.example.com"
path_prefix = "/api/"
pool = "app"

[pools.app]
algorithm = "round_robin"
backends = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3 }]
"#;

    #[test]
    fn names_expand_to_their_resolved_addresses_with_the_entry_weight() {
        let text = "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n[pools.app]\nbackends = [\"10.0.0.1:80\", { address = \"app:80\", weight = 3 }, \"db.internal:5432\"]\n";
        let c = Config::from_toml_str(text, Path::new("t.toml")).unwrap();
        let p = &c.pools[0];
        assert_eq!(p.backends.len(), 1);
        assert_eq!(p.names.len(), 2);
        let app: Vec<std::net::IpAddr> =
            vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let expanded = p.with_resolved(|n| (n.host == "app").then_some(app.as_slice()));
        let got: Vec<(String, u32)> = expanded
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect();
        // 10.0.0.1:80 is listed already and keeps its own weight; the unresolved name adds
        // nothing.
        assert_eq!(
            got,
            [
                ("10.0.0.1:80".to_string(), 1),
                ("10.0.0.2:80".to_string(), 3)
            ]
        );
    }

    #[test]
    fn parses_a_good_file() {
        let c = Config::from_toml_str(GOOD, Path::new("t.toml")).expect("valid");
        assert_eq!(
            c.listeners[0].routes[0].host,
            Some(HostMatch::Suffix(".example.com".into()))
        );
        assert_eq!(c.pools[0].backends[1].weight, 3);
        assert_eq!(c.pools[0].retries, defaults::RETRIES);
    }

    #[test]
    fn reports_every_semantic_error_with_its_position() {
        let text = "[listeners.web]\nbind = \"nope\"\npool = \"missing\"\n\n[pools.app]\nbackends = []\nconnect_timeout = \"3 parsecs\"\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(
            errs[0].starts_with("t.toml:2:8: listeners.web.bind: invalid address"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("t.toml:3:8: listeners.web.pool: unknown pool \"missing\""),
            "{errs:?}"
        );
        assert!(
            errs[2]
                .starts_with("t.toml:6:12: pools.app.backends: a pool needs at least one backend"),
            "{errs:?}"
        );
        assert!(
            errs[3].starts_with("t.toml:7:19: pools.app.connect_timeout: invalid duration"),
            "{errs:?}"
        );
    }

    #[test]
    fn an_empty_file_is_refused() {
        // What a reload reads mid-save (truncated, not yet written): never applied.
        let errs = errors("");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("t.toml:1:1: no listeners"), "{errs:?}");
    }

    #[test]
    fn host_match_is_case_insensitive_and_suffix_needs_a_label() {
        let m = HostMatch::Suffix(".example.com".into());
        assert!(m.matches("a.EXAMPLE.com"));
        assert!(!m.matches("example.com"));
        assert!(!m.matches("xexample.com"));
        assert!(HostMatch::Exact("api.example.com".into()).matches("API.example.com"));
    }

    #[test]
    fn sizes_take_binary_units() {
        use validate::parse_size;
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size(" 1 MiB "), Ok(1 << 20));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("10 parsecs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(validate::line_col("ab\ncé\nx", 7), (3, 1));
        assert_eq!(validate::line_col("ab\ncé\nx", 3), (2, 1));
        assert_eq!(validate::line_col("", 5), (1, 1));
    }
}
