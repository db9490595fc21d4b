//! Validated configuration: what the daemon runs on.
//!
//! [`Config::from_toml_str`] turns the TOML text into immutable, checked values, or into a
//! [`ConfigError`] listing every problem as `FILE:LINE:COLUMN: what is wrong`. Syntax and type
//! errors come from the TOML parser (one at a time, as serde stops at the first); every
//! semantic error (bad address, bad duration, unknown pool, duplicate bind, empty pool, zero
//! weight, ...) is collected in a single pass. `Config` is `PartialEq` so a reload can tell
//! that nothing changed.

mod file;
pub mod watch;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use file::{FileAlgorithm, FileBackend, FileConfig, FileProbeKind, Text};
use toml::Spanned;

/// Defaults, in one place so `config/ballast.toml` and the code agree.
pub mod defaults {
    use std::time::Duration;
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const MAX_CONNECTIONS: u32 = 10_000;
    pub const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    pub const MAX_HEADER_SIZE: u32 = 64 * 1024;
    pub const MAX_HEADERS: u32 = 100;
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const RETRIES: u32 = 1;
    pub const MAX_IDLE_PER_BACKEND: u32 = 128;
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
    pub const RISE: u32 = 2;
    pub const FALL: u32 = 3;
    pub const PASSIVE_MAX_FAILS: u32 = 1;
    pub const PASSIVE_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    /// hyper refuses a read buffer below 8 KiB, so headers can't be limited below that.
    pub const MIN_HEADER_SIZE: u32 = 8 * 1024;
    pub const MAX_WEIGHT: i64 = 1000;
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub global: Global,
    pub admin: Option<AdminConfig>,
    /// Sorted by name.
    pub listeners: Vec<ListenerConfig>,
    /// Sorted by name.
    pub pools: Vec<PoolConfig>,
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
    pub token: Option<String>,
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
    pub max_header_size: usize,
    pub max_headers: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub host: Option<HostMatch>,
    pub path_prefix: Option<String>,
    pub pool: String,
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
    pub max_idle_per_backend: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
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
#[derive(Debug, Clone, PartialEq)]
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

    /// Parses and validates `text`; `file` is only used to label errors.
    pub fn from_toml_str(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut v = Validator {
            text,
            problems: Vec::new(),
        };
        let config = match toml::from_str::<FileConfig>(text) {
            Ok(raw) => v.config(raw),
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                v.push(span, e.message().trim_end().to_string());
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

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// One line for `--check` and logs.
    pub fn summary(&self) -> String {
        let backends: usize = self.pools.iter().map(|p| p.backends.len()).sum();
        format!(
            "{} listener(s), {} pool(s), {} backend(s)",
            self.listeners.len(),
            self.pools.len(),
            backends
        )
    }
}

struct Validator<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn push(&mut self, span: Range<usize>, message: String) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem {
            line,
            column,
            message,
        });
    }

    fn duration(&mut self, value: &Option<Text>, key: &str, default: Duration) -> Duration {
        let Some(v) = value else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.push(
                    v.span(),
                    format!("{key}: duration must be greater than zero"),
                );
                default
            }
            Err(e) => {
                self.push(
                    v.span(),
                    format!(
                        "{key}: invalid duration {:?} ({e}); write e.g. \"500ms\", \"2s\", \"1m\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn at_least(&mut self, value: &Option<Spanned<u32>>, key: &str, min: u32, default: u32) -> u32 {
        match value {
            None => default,
            Some(v) if *v.get_ref() >= min => *v.get_ref(),
            Some(v) => {
                self.push(v.span(), format!("{key}: must be at least {min}"));
                default
            }
        }
    }

    fn socket_addr(&mut self, value: &Text, key: &str) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    value.span(),
                    format!(
                        "{key}: invalid address {:?}: expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn config(&mut self, raw: FileConfig) -> Option<Config> {
        let global = Global {
            worker_threads: match &raw.global.worker_threads {
                Some(n) if *n.get_ref() == 0 => {
                    self.push(
                        n.span(),
                        "global.worker_threads: must be at least 1 (omit it for one per core)"
                            .into(),
                    );
                    None
                }
                Some(n) => Some(*n.get_ref() as usize),
                None => None,
            },
            shutdown_timeout: self.duration(
                &raw.global.shutdown_timeout,
                "global.shutdown_timeout",
                defaults::SHUTDOWN_TIMEOUT,
            ),
            handover_socket: raw.global.handover_socket.as_ref().and_then(|p| {
                if p.get_ref().is_empty() {
                    self.push(p.span(), "global.handover_socket: must not be empty".into());
                    None
                } else {
                    Some(PathBuf::from(p.get_ref()))
                }
            }),
        };

        let admin = raw.admin.as_ref().and_then(|a| {
            let bind = self.socket_addr(&a.bind, "admin.bind")?;
            let token = a.token.as_ref().map(|t| t.get_ref().clone());
            if let Some(t) = &a.token {
                if t.get_ref().is_empty() {
                    self.push(t.span(), "admin.token: must not be empty".into());
                }
            }
            if !bind.ip().is_loopback() && token.is_none() {
                self.push(
                    a.bind.span(),
                    format!(
                        "admin.bind: {bind} is not a loopback address, so admin.token is required"
                    ),
                );
            }
            Some(AdminConfig { bind, token })
        });

        let pool_names: HashMap<&str, ()> = raw
            .pools
            .keys()
            .map(|k| (k.get_ref().as_str(), ()))
            .collect();
        let mut pools = Vec::new();
        for (name, p) in &raw.pools {
            pools.extend(self.pool(name, p));
        }

        let mut listeners = Vec::new();
        let mut binds: BTreeMap<SocketAddr, String> = BTreeMap::new();
        if let Some(a) = &admin {
            binds.insert(a.bind, "admin".into());
        }
        for (name, l) in &raw.listeners {
            let key = format!("listeners.{}", name.get_ref());
            let bind = self.socket_addr(&l.bind, &format!("{key}.bind"));
            if let Some(b) = bind {
                if b.port() != 0 {
                    if let Some(other) = binds.insert(b, name.get_ref().clone()) {
                        self.push(
                            l.bind.span(),
                            format!("{key}.bind: address {b} is already used by {other}"),
                        );
                    }
                }
            }
            let check_pool = |v: &mut Self, pool: &Text, what: &str| {
                if !pool_names.contains_key(pool.get_ref().as_str()) {
                    v.push(
                        pool.span(),
                        format!("{what}: unknown pool {:?}", pool.get_ref()),
                    );
                }
            };
            check_pool(self, &l.pool, &format!("{key}.pool"));
            let mut routes = Vec::new();
            for (i, r) in l.routes.iter().enumerate() {
                let rkey = format!("{key}.routes[{i}]");
                check_pool(self, &r.pool, &format!("{rkey}.pool"));
                let host = r.host.as_ref().and_then(|h| self.host_match(h, &rkey));
                let path_prefix = r.path_prefix.as_ref().and_then(|p| {
                    if p.get_ref().starts_with('/') {
                        Some(p.get_ref().clone())
                    } else {
                        self.push(p.span(), format!("{rkey}.path_prefix: must start with '/'"));
                        None
                    }
                });
                routes.push(RouteConfig {
                    host,
                    path_prefix,
                    pool: r.pool.get_ref().clone(),
                });
            }
            let max_header_size = match &l.max_header_size {
                Some(v) if *v.get_ref() < defaults::MIN_HEADER_SIZE => {
                    self.push(
                        v.span(),
                        format!(
                            "{key}.max_header_size: must be at least {} bytes",
                            defaults::MIN_HEADER_SIZE
                        ),
                    );
                    defaults::MAX_HEADER_SIZE
                }
                Some(v) => *v.get_ref(),
                None => defaults::MAX_HEADER_SIZE,
            };
            listeners.push(ListenerConfig {
                name: name.get_ref().clone(),
                bind: bind.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                default_pool: l.pool.get_ref().clone(),
                routes,
                max_connections: self.at_least(
                    &l.max_connections,
                    &format!("{key}.max_connections"),
                    1,
                    defaults::MAX_CONNECTIONS,
                ) as usize,
                request_header_timeout: self.duration(
                    &l.request_header_timeout,
                    &format!("{key}.request_header_timeout"),
                    defaults::REQUEST_HEADER_TIMEOUT,
                ),
                max_header_size: max_header_size as usize,
                max_headers: self.at_least(
                    &l.max_headers,
                    &format!("{key}.max_headers"),
                    1,
                    defaults::MAX_HEADERS,
                ) as usize,
            });
        }
        Some(Config {
            global,
            admin,
            listeners,
            pools,
        })
    }

    fn host_match(&mut self, h: &Text, rkey: &str) -> Option<HostMatch> {
        let s = h.get_ref().to_ascii_lowercase();
        let bad = s.is_empty()
            || s.contains(['/', ':', ' '])
            || s.chars().skip(1).any(|c| c == '*')
            || (s.starts_with('*') && !s.starts_with("*."));
        if bad {
            self.push(
                h.span(),
                format!(
                    "{rkey}.host: invalid host {:?}: write an exact name or \"*.example.com\" (no port)",
                    h.get_ref()
                ),
            );
            return None;
        }
        Some(match s.strip_prefix('*') {
            Some(suffix) => HostMatch::Suffix(suffix.to_string()),
            None => HostMatch::Exact(s),
        })
    }

    fn pool(&mut self, name: &Text, p: &file::FilePool) -> Option<PoolConfig> {
        let key = format!("pools.{}", name.get_ref());
        let algorithm = match p.algorithm.unwrap_or(FileAlgorithm::RoundRobin) {
            FileAlgorithm::RoundRobin => Algorithm::RoundRobin,
            FileAlgorithm::LeastConn => Algorithm::LeastConn,
            FileAlgorithm::Random => Algorithm::Random,
            FileAlgorithm::Hash => Algorithm::Hash,
        };
        let hash_key = match (&p.hash_key, algorithm) {
            (Some(k), Algorithm::Hash) => self.hash_key(k, &key),
            (None, Algorithm::Hash) => {
                self.push(
                    name.span(),
                    format!("{key}: algorithm \"hash\" needs hash_key (client_ip | header:NAME | cookie:NAME | path)"),
                );
                None
            }
            (Some(k), _) => {
                self.push(
                    k.span(),
                    format!("{key}.hash_key: only used with algorithm = \"hash\""),
                );
                None
            }
            (None, _) => None,
        };

        let mut backends: Vec<BackendConfig> = Vec::new();
        if p.backends.get_ref().is_empty() {
            self.push(
                p.backends.span(),
                format!("{key}.backends: a pool needs at least one backend"),
            );
        }
        for (i, b) in p.backends.get_ref().iter().enumerate() {
            let bkey = format!("{key}.backends[{i}]");
            let (addr, weight) = match b.get_ref() {
                FileBackend::Address(a) => (a, 1),
                FileBackend::Detailed(t) => (&t.address, t.weight.unwrap_or(1)),
            };
            let address = match addr.parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    self.push(
                        b.span(),
                        format!("{bkey}: invalid backend address {addr:?}: expected IP:PORT"),
                    );
                    continue;
                }
            };
            if !(1..=defaults::MAX_WEIGHT).contains(&weight) {
                self.push(
                    b.span(),
                    format!(
                        "{bkey}.weight: must be between 1 and {}",
                        defaults::MAX_WEIGHT
                    ),
                );
                continue;
            }
            if backends.iter().any(|x| x.address == address) {
                self.push(b.span(), format!("{bkey}: duplicate backend {address}"));
                continue;
            }
            backends.push(BackendConfig {
                address,
                weight: weight as u32,
            });
        }

        let health_check = p.health_check.as_ref().map(|h| {
            let hkey = format!("{key}.health_check");
            let interval = self.duration(
                &h.interval,
                &format!("{hkey}.interval"),
                defaults::HEALTH_INTERVAL,
            );
            let timeout = self.duration(
                &h.timeout,
                &format!("{hkey}.timeout"),
                defaults::HEALTH_TIMEOUT,
            );
            let probe = match h.kind {
                FileProbeKind::Tcp => {
                    for (field, present) in [
                        ("path", h.path.as_ref()),
                        ("host", h.host.as_ref()),
                        ("expect_status", h.expect_status.as_ref()),
                    ] {
                        if let Some(v) = present {
                            self.push(
                                v.span(),
                                format!("{hkey}.{field}: only used with kind = \"http\""),
                            );
                        }
                    }
                    Probe::Tcp
                }
                FileProbeKind::Http => {
                    let path = match &h.path {
                        Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
                        Some(p) => {
                            self.push(p.span(), format!("{hkey}.path: must start with '/'"));
                            "/".into()
                        }
                        None => "/".into(),
                    };
                    let expect_status = match &h.expect_status {
                        Some(s) => self.status_range(s, &hkey),
                        None => 200..400,
                    };
                    Probe::Http {
                        path,
                        host: h.host.as_ref().map(|h| h.get_ref().clone()),
                        expect_status,
                    }
                }
            };
            HealthCheckConfig {
                probe,
                interval,
                timeout,
                rise: self.at_least(&h.rise, &format!("{hkey}.rise"), 1, defaults::RISE),
                fall: self.at_least(&h.fall, &format!("{hkey}.fall"), 1, defaults::FALL),
            }
        });

        let passive = match &p.passive {
            Some(ps) => PassiveConfig {
                max_fails: ps
                    .max_fails
                    .as_ref()
                    .map(|v| *v.get_ref())
                    .unwrap_or(defaults::PASSIVE_MAX_FAILS),
                fail_timeout: self.duration(
                    &ps.fail_timeout,
                    &format!("{key}.passive.fail_timeout"),
                    defaults::PASSIVE_FAIL_TIMEOUT,
                ),
            },
            None => PassiveConfig {
                max_fails: defaults::PASSIVE_MAX_FAILS,
                fail_timeout: defaults::PASSIVE_FAIL_TIMEOUT,
            },
        };

        Some(PoolConfig {
            name: name.get_ref().clone(),
            algorithm,
            hash_key,
            backends,
            health_check,
            passive,
            connect_timeout: self.duration(
                &p.connect_timeout,
                &format!("{key}.connect_timeout"),
                defaults::CONNECT_TIMEOUT,
            ),
            response_timeout: self.duration(
                &p.response_timeout,
                &format!("{key}.response_timeout"),
                defaults::RESPONSE_TIMEOUT,
            ),
            idle_timeout: self.duration(
                &p.idle_timeout,
                &format!("{key}.idle_timeout"),
                defaults::IDLE_TIMEOUT,
            ),
            drain_timeout: self.duration(
                &p.drain_timeout,
                &format!("{key}.drain_timeout"),
                defaults::DRAIN_TIMEOUT,
            ),
            retries: p
                .retries
                .as_ref()
                .map(|r| *r.get_ref())
                .unwrap_or(defaults::RETRIES),
            max_idle_per_backend: p
                .max_idle_per_backend
                .as_ref()
                .map(|r| *r.get_ref())
                .unwrap_or(defaults::MAX_IDLE_PER_BACKEND)
                as usize,
        })
    }

    fn hash_key(&mut self, k: &Text, key: &str) -> Option<HashKey> {
        let s = k.get_ref();
        let parsed = match s.split_once(':') {
            None if s == "client_ip" => Some(HashKey::ClientIp),
            None if s == "path" => Some(HashKey::Path),
            Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(HashKey::Header),
            Some(("cookie", name)) if !name.is_empty() && !name.contains([';', '=', ' ']) => {
                Some(HashKey::Cookie(name.to_string()))
            }
            _ => None,
        };
        if parsed.is_none() {
            self.push(
                k.span(),
                format!("{key}.hash_key: invalid {s:?}: expected client_ip, path, header:NAME or cookie:NAME"),
            );
        }
        parsed
    }

    fn status_range(&mut self, s: &Text, hkey: &str) -> Range<u16> {
        let text = s.get_ref();
        let parse = |t: &str| {
            t.trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
        };
        let range = match text.split_once('-') {
            Some((a, b)) => parse(a).zip(parse(b)).filter(|(a, b)| a <= b),
            None => parse(text).map(|c| (c, c)),
        };
        match range {
            Some((a, b)) => a..b + 1,
            None => {
                self.push(
                    s.span(),
                    format!("{hkey}.expect_status: invalid {text:?}: expected a status like \"200\" or a range like \"200-399\""),
                );
                200..400
            }
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
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
    fn host_match_is_case_insensitive_and_suffix_needs_a_label() {
        let m = HostMatch::Suffix(".example.com".into());
        assert!(m.matches("a.EXAMPLE.com"));
        assert!(!m.matches("example.com"));
        assert!(!m.matches("xexample.com"));
        assert!(HostMatch::Exact("api.example.com".into()).matches("API.example.com"));
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncé\nx", 7), (3, 1));
        assert_eq!(line_col("ab\ncé\nx", 3), (2, 1));
        assert_eq!(line_col("", 5), (1, 1));
    }
}
