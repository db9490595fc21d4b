//! The TOML file as serde sees it: no invariants, only shapes.
//!
//! Nothing outside `config/` uses these types. Values that need a precise error location
//! (addresses, durations, pool references) are kept as [`Spanned`] strings and checked in
//! [`super::validate`], so that one pass can report every semantic error with its line and
//! column instead of stopping at the first.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type Text = Spanned<String>;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub global: FileGlobal,
    pub admin: Option<FileAdmin>,
    pub log: Option<FileLog>,
    pub access_log: Option<FileAccessLog>,
    #[serde(default)]
    pub listeners: BTreeMap<Text, FileListener>,
    #[serde(default)]
    pub pools: BTreeMap<Text, FilePool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileGlobal {
    pub worker_threads: Option<Spanned<u32>>,
    pub shutdown_timeout: Option<Text>,
    pub handover_socket: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub bind: Text,
    pub token: Option<Text>,
    pub token_file: Option<Text>,
    pub metrics: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    pub format: Option<Text>,
    pub level: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAccessLog {
    pub path: Option<Text>,
    pub format: Option<Text>,
    pub buffer: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub bind: Text,
    pub pool: Text,
    #[serde(default)]
    pub routes: Vec<Spanned<FileRoute>>,
    pub max_connections: Option<Spanned<u32>>,
    pub request_header_timeout: Option<Text>,
    pub send_timeout: Option<Text>,
    pub max_header_size: Option<Spanned<u32>>,
    pub max_headers: Option<Spanned<u32>>,
    pub keepalive_timeout: Option<Text>,
    pub request_body_timeout: Option<Text>,
    pub request_buffering: Option<Spanned<FileSize>>,
    pub max_request_body: Option<Spanned<FileSize>>,
    pub response_buffer: Option<Spanned<FileSize>>,
    pub upgrade: Option<Spanned<Vec<Text>>>,
    pub allow_connect: Option<bool>,
    pub max_connections_per_client: Option<Spanned<u32>>,
    pub tls: Option<Spanned<FileTls>>,
    pub redirect_https: Option<bool>,
    pub redirect_https_port: Option<Spanned<u16>>,
    pub h2c: Option<bool>,
    pub mode: Option<Spanned<FileMode>>,
    pub accept_proxy: Option<Spanned<Vec<Text>>>,
    pub splice: Option<bool>,
    pub access_log: Option<bool>,
    pub request_id: Option<bool>,
    pub request_headers: Option<FileHeaderRules>,
    pub response_headers: Option<FileHeaderRules>,
    pub rate_limit: Option<Spanned<FileRateLimit>>,
    pub allow_from: Option<Spanned<Vec<Text>>>,
    pub deny_from: Option<Spanned<Vec<Text>>>,
    pub trusted_proxies: Option<Spanned<Vec<Text>>>,
    pub compress: Option<Spanned<FileCompress>>,
    pub basic_auth: Option<Spanned<FileBasicAuth>>,
    #[serde(default)]
    pub sni_routes: Vec<Spanned<FileSniRoute>>,
    pub sni_required: Option<Spanned<bool>>,
}

/// `{ sni = "*.example.com", pool = "web" }` on a `mode = "tcp"` listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSniRoute {
    pub sni: Text,
    pub pool: Text,
}

/// `{ realm = "Staff", users_file = "/etc/ballast/htpasswd" }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBasicAuth {
    pub realm: Option<Text>,
    pub users_file: Text,
}

/// `{ types = ["text/*"], min_size = "1KiB", algorithms = ["zstd", "br", "gzip"] }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCompress {
    pub types: Option<Spanned<Vec<Text>>>,
    pub min_size: Option<Spanned<FileSize>>,
    pub algorithms: Option<Spanned<Vec<Text>>>,
}

/// `{ requests_per_second = 100, burst = 200, key = "client_ip", max_keys = 100000,
/// ipv6_prefix = 64 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    pub requests_per_second: Spanned<f64>,
    pub burst: Option<Spanned<u32>>,
    pub key: Option<Text>,
    pub max_keys: Option<Spanned<u32>>,
    pub ipv6_prefix: Option<Spanned<u8>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileMode {
    Http,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub certificates: Option<Spanned<Vec<FileCertificate>>>,
    pub min_version: Option<Text>,
    pub alpn: Option<Spanned<Vec<Text>>>,
    pub client_ca: Option<Text>,
    pub strict_sni: Option<bool>,
    pub session_ticket_keys_file: Option<Text>,
    pub acme: Option<Spanned<FileAcme>>,
}

/// `[listeners.NAME.tls.acme]`: see `crate::acme`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAcme {
    pub domains: Spanned<Vec<Text>>,
    pub email: Option<Text>,
    pub directory: Option<Text>,
    pub directory_ca: Option<Text>,
    pub challenge: Option<Text>,
    pub storage: Option<Text>,
    pub retry_after: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertificate {
    pub cert: Text,
    pub key: Text,
}

/// What a route's `headers` or `query` entry asks of the request: a string (that value,
/// exactly), `true` (present), `false` (absent), or `{ regex = "..." }`.
#[derive(Debug)]
pub enum FileFieldMatch {
    Equals(String),
    Present(bool),
    Regex(String),
}

impl<'de> Deserialize<'de> for FileFieldMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileFieldMatch;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a value to equal (a string), true (present), false (absent) or { regex = \"...\" }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileFieldMatch, E> {
                Ok(FileFieldMatch::Equals(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<FileFieldMatch, E> {
                Ok(FileFieldMatch::Present(v))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<FileFieldMatch, A::Error> {
                let mut regex = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "regex" || regex.is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "unknown or repeated key {key:?}: the only key here is `regex`"
                        )));
                    }
                    regex = Some(map.next_value::<String>()?);
                }
                regex
                    .map(FileFieldMatch::Regex)
                    .ok_or_else(|| serde::de::Error::custom("missing `regex`"))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A byte size, written as an integer or as text with a unit (`"64KiB"`, `"1MiB"`, `"0"`).
#[derive(Debug)]
pub enum FileSize {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for FileSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size: a number of bytes or a string such as \"64KiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FileSize, E> {
                Ok(FileSize::Bytes(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FileSize, E> {
                Ok(FileSize::Bytes(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileSize, E> {
                Ok(FileSize::Text(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub host: Option<Text>,
    pub path_prefix: Option<Text>,
    pub path: Option<Text>,
    pub path_regex: Option<Text>,
    pub methods: Option<Spanned<Vec<Text>>>,
    pub headers: Option<BTreeMap<Text, Spanned<FileFieldMatch>>>,
    pub query: Option<BTreeMap<Text, Spanned<FileFieldMatch>>>,
    pub client_cidrs: Option<Spanned<Vec<Text>>>,
    pub sni: Option<Text>,
    pub allow_from: Option<Spanned<Vec<Text>>>,
    pub deny_from: Option<Spanned<Vec<Text>>>,
    /// One of `pool`, `redirect` and `respond`.
    pub pool: Option<Text>,
    pub redirect: Option<Spanned<FileRedirect>>,
    pub respond: Option<Spanned<FileRespond>>,
    pub compress: Option<Spanned<FileCompress>>,
    pub basic_auth: Option<Spanned<FileBasicAuth>>,
    pub upgrade: Option<Spanned<Vec<Text>>>,
    pub strip_prefix: Option<Spanned<bool>>,
    pub rewrite_prefix: Option<Text>,
    pub request_headers: Option<FileHeaderRules>,
    pub response_headers: Option<FileHeaderRules>,
    pub rate_limit: Option<Spanned<FileRateLimit>>,
}

/// `{ to = "https://${host}${request_uri}", status = 301 }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRedirect {
    pub to: Text,
    pub status: Option<Spanned<u16>>,
}

/// `{ status = 503, body = "...", content_type = "text/html", headers = { ... } }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRespond {
    pub status: Option<Spanned<u16>>,
    pub body: Option<Text>,
    pub content_type: Option<Text>,
    pub headers: Option<BTreeMap<Text, Text>>,
}

/// `{ set = { "X-Env" = "prod" }, remove = ["X-Debug"] }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderRules {
    #[serde(default)]
    pub set: BTreeMap<Text, Text>,
    #[serde(default)]
    pub remove: Vec<Text>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileAlgorithm {
    RoundRobin,
    LeastConn,
    Random,
    Hash,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub algorithm: Option<FileAlgorithm>,
    pub hash_key: Option<Text>,
    pub backends: Spanned<Vec<Spanned<FileBackend>>>,
    pub health_check: Option<FileHealthCheck>,
    pub passive: Option<FilePassive>,
    pub connect_timeout: Option<Text>,
    pub response_timeout: Option<Text>,
    pub idle_timeout: Option<Text>,
    pub drain_timeout: Option<Text>,
    pub retries: Option<Spanned<u32>>,
    pub max_idle_per_backend: Option<Spanned<u32>>,
    pub request_buffering: Option<Spanned<FileSize>>,
    pub protocol: Option<FileProtocol>,
    pub tls: Option<FileUpstreamTls>,
    pub send_proxy: Option<Text>,
    pub resolve_interval: Option<Text>,
    pub resolve_grace: Option<Text>,
    pub resolvers: Option<Spanned<Vec<Text>>>,
    pub slow_start: Option<Text>,
    pub when_all_down: Option<Text>,
    pub panic_threshold: Option<Text>,
    pub retry_on: Option<Spanned<Vec<Text>>>,
    pub retry_budget: Option<Text>,
    pub retry_budget_min: Option<Spanned<u32>>,
    pub max_connections: Option<Spanned<u32>>,
    pub queue_timeout: Option<Text>,
    pub max_queue: Option<Spanned<u32>>,
    pub hash_balance_factor: Option<Spanned<u32>>,
    pub retry_backoff: Option<Text>,
    pub sticky: Option<Spanned<FileSticky>>,
}

/// `{ cookie = "lb", ttl = "1h", pass_cookie = false }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSticky {
    pub cookie: Text,
    pub ttl: Option<Text>,
    pub pass_cookie: Option<bool>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileProtocol {
    #[serde(rename = "http1")]
    Http1,
    H2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    pub ca: Option<Text>,
    pub sni: Option<Text>,
    pub insecure_skip_verify: Option<bool>,
}

/// A backend is written either as `"ip:port"` / `"host:port"` or as
/// `{ address = "ip:port", weight = 3 }`.
///
/// Not `#[serde(untagged)]`: an untagged enum buffers its input, which loses the spans of
/// the table's `Spanned` fields (so `max_connections` never parsed) and turns every typo
/// or wrong type inside the table into "did not match any variant". Dispatching on the
/// value's kind keeps the table's own errors, at their place.
#[derive(Debug)]
pub enum FileBackend {
    Address(String),
    Detailed(FileBackendTable),
}

impl<'de> Deserialize<'de> for FileBackend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = FileBackend;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address string or a table { address = \"...\", weight = N, backup = true, max_connections = N }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileBackend, E> {
                Ok(FileBackend::Address(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileBackend, A::Error> {
                FileBackendTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(FileBackend::Detailed)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackendTable {
    pub address: String,
    pub weight: Option<i64>,
    pub backup: Option<bool>,
    pub max_connections: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileProbeKind {
    Http,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    pub kind: FileProbeKind,
    pub path: Option<Text>,
    pub host: Option<Text>,
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub rise: Option<Spanned<u32>>,
    pub fall: Option<Spanned<u32>>,
    pub expect_status: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePassive {
    pub max_fails: Option<Spanned<u32>>,
    pub fail_timeout: Option<Text>,
}
