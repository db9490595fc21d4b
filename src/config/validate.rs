//! File → validated config: every semantic check, each problem located by line and column.
//!
//! One pass over the parsed file collects every problem instead of stopping at the first;
//! values that fail fall back to their default so the pass can go on, and the caller
//! rejects the whole config when any problem was found.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::file::{
    self, FileAcme, FileAlgorithm, FileBackend, FileConfig, FileFieldMatch, FileProbeKind,
    FileSize, FileTls, Text,
};
use super::*;

mod route;

/// Largest compiled route regex (the regex crate's default is 10 MiB): a path or header
/// pattern needs far less, and a config should not make one that costs much memory to build.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A backend entry: a literal address, or a name to resolve.
#[derive(Debug, PartialEq)]
enum BackendAddress {
    Ip(SocketAddr),
    Name(String, u16),
}

/// Parses `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (RFC 1123 host name); says what is wrong.
fn backend_address(text: &str) -> Result<BackendAddress, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(BackendAddress::Ip(a));
    }
    const EXPECTED: &str = "expected IP:PORT or HOST:PORT, e.g. \"10.0.0.5:8000\" or \"app:8000\"";
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("no port; {EXPECTED}"));
    };
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("invalid port {port:?}; {EXPECTED}")),
    };
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "invalid IPv6 address; write it as \"[::1]:{port}\""
        ));
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!(
            "{host:?} is neither an IP address nor a valid host name (letters, digits, '-', '_' in dot-separated labels); {EXPECTED}"
        ));
    }
    // All-numeric dotted names are mistyped IPv4 addresses, not names.
    if host
        .split('.')
        .all(|l| l.bytes().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("{host:?} is not a valid IPv4 address; {EXPECTED}"));
    }
    Ok(BackendAddress::Name(host.to_ascii_lowercase(), port))
}

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    /// Relative file paths (certificates, keys) are relative to the config file's folder.
    pub(super) base: &'a std::path::Path,
    pub(super) problems: Vec<Problem>,
}

impl Validator<'_> {
    pub(super) fn push(&mut self, span: Range<usize>, message: String) {
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
            Ok(d) if d > defaults::MAX_DURATION => {
                self.push(v.span(), format!("{key}: duration must be at most 30 days"));
                default
            }
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

    /// A byte size between `min` and `max`; 0 is allowed when `zero_ok`.
    fn size(
        &mut self,
        value: &Option<Spanned<FileSize>>,
        key: &str,
        (min, max): (u64, u64),
        zero_ok: bool,
    ) -> Option<u64> {
        let v = value.as_ref()?;
        let parsed = match v.get_ref() {
            FileSize::Bytes(n) => u64::try_from(*n).map_err(|_| "must not be negative".to_string()),
            FileSize::Text(t) => parse_size(t),
        };
        match parsed {
            Ok(0) if zero_ok => Some(0),
            Ok(n) if (min..=max).contains(&n) => Some(n),
            Ok(_) => {
                let zero = if zero_ok { " (or 0)" } else { "" };
                self.push(
                    v.span(),
                    format!("{key}: must be between {min} and {max} bytes{zero}"),
                );
                None
            }
            Err(e) => {
                self.push(
                    v.span(),
                    format!("{key}: invalid size: {e}; write e.g. 65536, \"64KiB\" or \"1MiB\""),
                );
                None
            }
        }
    }

    /// An `upgrade` list: protocol tokens, stored lower-case.
    fn upgrade_list(&mut self, value: &Spanned<Vec<Text>>, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for t in value.get_ref() {
            let token = t.get_ref().trim().to_ascii_lowercase();
            let valid = !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
            if valid {
                out.push(token);
            } else {
                self.push(
                    t.span(),
                    format!(
                        "{key}: invalid protocol {:?}: write a token such as \"websocket\"",
                        t.get_ref()
                    ),
                );
            }
        }
        out
    }

    pub(super) fn config(&mut self, raw: FileConfig, env_vars: Vec<String>) -> Option<Config> {
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

        let admin = raw.admin.as_ref().and_then(|a| self.admin(a));
        let log = raw.log.as_ref().map(|l| self.log(l)).unwrap_or_default();
        let access_log = raw.access_log.as_ref().map(|a| self.access_log(a));

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
            let listener = self.listener(name, l, &pool_names, &raw.pools);
            if listener.bind.port() != 0 {
                if let Some(other) = binds.insert(listener.bind, name.get_ref().clone()) {
                    self.push(
                        l.bind.span(),
                        format!(
                            "listeners.{}.bind: address {} is already used by {other}",
                            name.get_ref(),
                            listener.bind
                        ),
                    );
                }
            }
            listeners.push(listener);
        }
        // A pool that carries a TCP listener's bytes offers no ALPN to its backends.
        for l in listeners.iter().filter(|l| l.mode == ListenerMode::Tcp) {
            let used: Vec<&str> = std::iter::once(l.default_pool.as_str())
                .chain(l.sni_routes.iter().map(|r| r.pool.as_str()))
                .collect();
            for p in pools.iter_mut().filter(|p| used.contains(&p.name.as_str())) {
                if let Some(t) = &mut p.tls {
                    t.for_tcp = true;
                }
            }
        }
        self.acme_across_listeners(&raw, &listeners);
        if listeners.is_empty() {
            // Never meant: an empty file is also what a reload sees when it reads a file
            // mid-save (truncated, not yet written). Applying it would close every listener.
            self.push(
                0..0,
                "no listeners: a config needs at least one [listeners.NAME] table".into(),
            );
        }
        Some(Config {
            global,
            admin,
            log,
            access_log,
            listeners,
            pools,
            env_vars,
        })
    }

    /// One `[listeners.NAME]` table; `pools` are the file's pools (for references and for
    /// what a TCP listener's pool may use).
    fn listener(
        &mut self,
        name: &Text,
        l: &file::FileListener,
        pool_names: &HashMap<&str, ()>,
        pools: &BTreeMap<Text, file::FilePool>,
    ) -> ListenerConfig {
        let key = format!("listeners.{}", name.get_ref());
        let bind = self.socket_addr(&l.bind, &format!("{key}.bind"));
        self.known_pool(&l.pool, &format!("{key}.pool"), pool_names);
        let routes: Vec<RouteConfig> = (l.routes.iter().enumerate())
            .map(|(i, r)| self.route(r, &format!("{key}.routes[{i}]"), l, pool_names))
            .collect();
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
        let mode = match l.mode.as_ref().map(|m| *m.get_ref()) {
            Some(file::FileMode::Tcp) => ListenerMode::Tcp,
            _ => ListenerMode::Http,
        };
        if mode == ListenerMode::Tcp {
            self.tcp_listener(name, l, &key, pools);
        } else {
            let tcp_only = [
                ("splice", l.splice.is_some(), ""),
                (
                    "sni_routes",
                    !l.sni_routes.is_empty(),
                    " (an HTTP listener matches sni in its routes)",
                ),
                (
                    "sni_required",
                    l.sni_required.is_some(),
                    " (an HTTP listener matches sni in its routes)",
                ),
            ];
            for (field, _, hint) in tcp_only.iter().filter(|(_, set, _)| *set) {
                self.push(
                    name.span(),
                    format!("{key}.{field}: only used with mode = \"tcp\"{hint}"),
                );
            }
        }
        let sni_routes = (l.sni_routes.iter().enumerate())
            .filter_map(|(i, r)| {
                let rkey = format!("{key}.sni_routes[{i}]");
                let r = r.get_ref();
                self.known_pool(&r.pool, &format!("{rkey}.pool"), pool_names);
                Some(SniRoute {
                    sni: self.host_match(&r.sni, &format!("{rkey}.sni"))?,
                    pool: r.pool.get_ref().clone(),
                })
            })
            .collect();
        let request_headers = l
            .request_headers
            .as_ref()
            .map(|h| self.header_rules(h, &format!("{key}.request_headers")));
        let response_headers = l
            .response_headers
            .as_ref()
            .map(|h| self.header_rules(h, &format!("{key}.response_headers")));
        let uses_id =
            |h: &Option<HeaderRules>| h.as_ref().is_some_and(HeaderRules::uses_request_id);
        let request_id = l.request_id.unwrap_or(false)
            || uses_id(&request_headers)
            || uses_id(&response_headers)
            || routes
                .iter()
                .any(|r| uses_id(&r.request_headers) || uses_id(&r.response_headers));
        if l.tls.is_some() && l.redirect_https == Some(true) {
            self.push(
                name.span(),
                format!("{key}: redirect_https is for plain listeners; this one has tls"),
            );
        }
        if l.tls.is_some() && l.h2c == Some(true) {
            self.push(
                name.span(),
                format!(
                    "{key}: h2c is for plain listeners; with tls, HTTP/2 is negotiated by ALPN"
                ),
            );
        }
        ListenerConfig {
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
            send_timeout: self.duration(
                &l.send_timeout,
                &format!("{key}.send_timeout"),
                defaults::SEND_TIMEOUT,
            ),
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
            keepalive_timeout: self.duration(
                &l.keepalive_timeout,
                &format!("{key}.keepalive_timeout"),
                defaults::KEEPALIVE_TIMEOUT,
            ),
            request_body_timeout: self.duration(
                &l.request_body_timeout,
                &format!("{key}.request_body_timeout"),
                defaults::REQUEST_BODY_TIMEOUT,
            ),
            request_buffering: self.request_buffering(
                &l.request_buffering,
                &format!("{key}.request_buffering"),
            )
            .unwrap_or(defaults::REQUEST_BUFFERING),
            max_request_body: self.size(
                &l.max_request_body,
                &format!("{key}.max_request_body"),
                (1, u64::MAX),
                false,
            ),
            response_buffer: self
                .size(
                    &l.response_buffer,
                    &format!("{key}.response_buffer"),
                    (
                        defaults::MIN_RESPONSE_BUFFER as u64,
                        defaults::MAX_RESPONSE_BUFFER as u64,
                    ),
                    false,
                )
                .map_or(defaults::RESPONSE_BUFFER, |n| n as usize),
            upgrade: match &l.upgrade {
                Some(u) => self.upgrade_list(u, &format!("{key}.upgrade")),
                None => vec!["websocket".to_string()],
            },
            allow_connect: l.allow_connect.unwrap_or(false),
            tls: l.tls.as_ref().and_then(|t| self.tls(t, &key, mode)),
            redirect_https: (l.redirect_https == Some(true)).then(|| {
                route::https_redirect(l.redirect_https_port.as_ref().map(|p| *p.get_ref()))
            }),
            h2c: l.h2c.unwrap_or(false),
            splice: l.splice.unwrap_or(false),
            sni_routes,
            sni_required: l.sni_required.as_ref().is_some_and(|b| *b.get_ref()),
            request_id,
            request_headers,
            response_headers,
            rate_limit: l
                .rate_limit
                .as_ref()
                .and_then(|v| self.rate_limit(v, &format!("{key}.rate_limit"))),
            access_log: l.access_log.unwrap_or(true),
            mode,
            accept_proxy: l
                .accept_proxy
                .as_ref()
                .and_then(|list| self.ranges(list, &format!("{key}.accept_proxy"))),
            access: self.access(l.allow_from.as_ref(), l.deny_from.as_ref(), &key),
            compress: l
                .compress
                .as_ref()
                .and_then(|c| self.compress(c, &format!("{key}.compress"))),
            basic_auth: l
                .basic_auth
                .as_ref()
                .and_then(|a| self.basic_auth(a, &format!("{key}.basic_auth"))),
            trusted_proxies: l
                .trusted_proxies
                .as_ref()
                .and_then(|list| self.ranges(list, &format!("{key}.trusted_proxies"))),
            max_connections_per_client: l.max_connections_per_client.as_ref().and_then(|n| {
                if *n.get_ref() == 0 {
                    self.push(
                        n.span(),
                        format!("{key}.max_connections_per_client: must be at least 1 (omit it for no limit)"),
                    );
                    None
                } else {
                    Some(*n.get_ref() as usize)
                }
            }),
        }
    }

    /// `basic_auth = { realm, users_file }`: the file read now (and watched), each bad line
    /// reported with its own place in the file.
    pub(super) fn basic_auth(
        &mut self,
        v: &Spanned<file::FileBasicAuth>,
        key: &str,
    ) -> Option<BasicAuthConfig> {
        let a = v.get_ref();
        let users_file = self.path(&a.users_file);
        let users = match crate::basic_auth::read_users(&users_file) {
            Ok(u) => u,
            Err(e) => {
                self.push(a.users_file.span(), format!("{key}.users_file: {e}"));
                return None;
            }
        };
        Some(BasicAuthConfig {
            realm: a
                .realm
                .as_ref()
                .map_or_else(|| "ballast".to_string(), |r| r.get_ref().clone()),
            users_file,
            users,
        })
    }

    /// `compress = { types, min_size, algorithms }` of a listener or route (`key`).
    pub(super) fn compress(
        &mut self,
        v: &Spanned<file::FileCompress>,
        key: &str,
    ) -> Option<CompressConfig> {
        let c = v.get_ref();
        let types = match &c.types {
            None => defaults::COMPRESS_TYPES
                .iter()
                .filter_map(|t| media_range(t))
                .collect(),
            Some(list) if list.get_ref().is_empty() => {
                self.push(
                    list.span(),
                    format!("{key}.types: list at least one type, or leave the key out for the default"),
                );
                Vec::new()
            }
            Some(list) => list
                .get_ref()
                .iter()
                .filter_map(|t| {
                    let m = media_range(t.get_ref());
                    if m.is_none() {
                        self.push(
                            t.span(),
                            format!("{key}.types: {:?} is not a media type; write e.g. \"application/json\" or \"text/*\"", t.get_ref()),
                        );
                    }
                    m
                })
                .collect(),
        };
        let min_size = self
            .size(&c.min_size, &format!("{key}.min_size"), (0, u64::MAX), true)
            .unwrap_or(defaults::COMPRESS_MIN_SIZE);
        let algorithms = match &c.algorithms {
            None => vec![Encoding::Zstd, Encoding::Br, Encoding::Gzip],
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.push(
                        list.span(),
                        format!(
                            "{key}.algorithms: list at least one of \"zstd\", \"br\", \"gzip\""
                        ),
                    );
                }
                let mut out = Vec::new();
                for a in list.get_ref() {
                    let e = match a.get_ref().as_str() {
                        "zstd" => Encoding::Zstd,
                        "br" => Encoding::Br,
                        "gzip" => Encoding::Gzip,
                        other => {
                            self.push(
                                a.span(),
                                format!("{key}.algorithms: unknown algorithm {other:?} (\"zstd\", \"br\" or \"gzip\")"),
                            );
                            continue;
                        }
                    };
                    if out.contains(&e) {
                        self.push(
                            a.span(),
                            format!("{key}.algorithms: {:?} is listed twice", a.get_ref()),
                        );
                    } else {
                        out.push(e);
                    }
                }
                out
            }
        };
        Some(CompressConfig {
            types,
            min_size,
            algorithms,
        })
    }

    /// `sticky = { cookie, ttl, pass_cookie }`: the name a cookie token (RFC 6265), the
    /// time a duration.
    fn sticky(&mut self, v: &Spanned<file::FileSticky>, key: &str) -> Option<StickyConfig> {
        let s = v.get_ref();
        let name = s.cookie.get_ref();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !token {
            self.push(
                s.cookie.span(),
                format!("{key}.cookie: {name:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"),
            );
            return None;
        }
        Some(StickyConfig {
            cookie: name.clone(),
            ttl: s
                .ttl
                .as_ref()
                .map(|_| self.duration(&s.ttl, &format!("{key}.ttl"), Duration::ZERO)),
            pass_cookie: s.pass_cookie.unwrap_or(false),
        })
    }

    fn known_pool(&mut self, pool: &Text, key: &str, pool_names: &HashMap<&str, ()>) {
        if !pool_names.contains_key(pool.get_ref().as_str()) {
            self.push(
                pool.span(),
                format!("{key}: unknown pool {:?}", pool.get_ref()),
            );
        }
    }

    /// The `[admin]` table: a token, or a file that holds it.
    fn admin(&mut self, a: &file::FileAdmin) -> Option<AdminConfig> {
        let bind = self.socket_addr(&a.bind, "admin.bind")?;
        let (token, token_file) = match (&a.token, &a.token_file) {
            (Some(t), Some(f)) => {
                self.push(
                    f.span(),
                    "admin.token_file: set admin.token or admin.token_file, not both".into(),
                );
                (Some(t.get_ref().clone()), None)
            }
            (Some(t), None) => {
                if t.get_ref().is_empty() {
                    self.push(t.span(), "admin.token: must not be empty".into());
                }
                (Some(t.get_ref().clone()), None)
            }
            (None, Some(f)) => {
                let path = self.path(f);
                (self.secret_file(f, &path, "admin.token_file"), Some(path))
            }
            (None, None) => (None, None),
        };
        if !bind.ip().is_loopback() && token.is_none() && token_file.is_none() {
            self.push(
                a.bind.span(),
                format!(
                    "admin.bind: {bind} is not a loopback address, so admin.token (or admin.token_file) is required"
                ),
            );
        }
        Some(AdminConfig {
            bind,
            token,
            token_file,
            metrics: a.metrics.unwrap_or(true),
        })
    }

    /// A `*_file` secret (`/run/secrets/NAME`): the file's text without its trailing
    /// newline. The error names the file, never its contents.
    fn secret_file(&mut self, at: &Text, path: &std::path::Path, key: &str) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let secret = text.trim_end_matches(['\r', '\n']);
                if secret.trim().is_empty() {
                    self.push(at.span(), format!("{key}: {} is empty", path.display()));
                    None
                } else {
                    Some(secret.to_string())
                }
            }
            Err(e) => {
                self.push(
                    at.span(),
                    format!("{key}: cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    }

    /// The `[log]` table: the daemon log's format and level.
    fn log(&mut self, l: &file::FileLog) -> LogConfig {
        let mut config = LogConfig::default();
        match l.format.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "text")) => {}
            Some((_, "json")) => config.format = LogFormat::Json,
            Some((f, other)) => self.push(
                f.span(),
                format!("log.format: expected \"text\" or \"json\", got {other:?}"),
            ),
        }
        if let Some(level) = &l.level {
            match tracing_subscriber::EnvFilter::builder().parse(level.get_ref()) {
                Ok(_) if !level.get_ref().trim().is_empty() => config.level = level.get_ref().clone(),
                Ok(_) => self.push(level.span(), "log.level: must not be empty".into()),
                Err(e) => self.push(
                    level.span(),
                    format!("log.level: invalid {:?} ({e}); write e.g. \"info\", \"warn\" or \"info,ballast=debug\"", level.get_ref()),
                ),
            }
        }
        config
    }

    /// The `[access_log]` table.
    fn access_log(&mut self, a: &file::FileAccessLog) -> AccessLogConfig {
        let format = match a.format.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "json")) => AccessLogFormat::Json,
            Some((_, "combined" | "common")) => AccessLogFormat::Combined,
            Some((f, other)) => {
                self.push(
                    f.span(),
                    format!("access_log.format: expected \"json\" or \"combined\", got {other:?}"),
                );
                AccessLogFormat::Json
            }
        };
        let path = a.path.as_ref().and_then(|p| match p.get_ref().as_str() {
            "" => {
                self.push(
                    p.span(),
                    "access_log.path: must not be empty (omit it for standard output)".into(),
                );
                None
            }
            "-" | "stdout" => None,
            _ => Some(self.path(p)),
        });
        let buffer = self.at_least(
            &a.buffer,
            "access_log.buffer",
            1,
            defaults::ACCESS_LOG_BUFFER,
        );
        AccessLogConfig {
            path,
            format,
            buffer: buffer as usize,
        }
    }

    /// `mode = "tcp"`: HTTP-only keys are refused, and its pool must not need HTTP.
    fn tcp_listener(
        &mut self,
        name: &Text,
        l: &file::FileListener,
        key: &str,
        pools: &BTreeMap<Text, file::FilePool>,
    ) {
        let http_only: [(&str, bool); 18] = [
            ("routes", !l.routes.is_empty()),
            ("basic_auth", l.basic_auth.is_some()),
            ("compress", l.compress.is_some()),
            ("trusted_proxies", l.trusted_proxies.is_some()),
            ("request_id", l.request_id.is_some()),
            ("rate_limit", l.rate_limit.is_some()),
            ("request_headers", l.request_headers.is_some()),
            ("response_headers", l.response_headers.is_some()),
            ("redirect_https", l.redirect_https.is_some()),
            ("h2c", l.h2c.is_some()),
            ("upgrade", l.upgrade.is_some()),
            ("allow_connect", l.allow_connect.is_some()),
            ("request_buffering", l.request_buffering.is_some()),
            ("max_request_body", l.max_request_body.is_some()),
            ("request_body_timeout", l.request_body_timeout.is_some()),
            ("keepalive_timeout", l.keepalive_timeout.is_some()),
            ("max_header_size", l.max_header_size.is_some()),
            ("max_headers", l.max_headers.is_some()),
        ];
        for (field, set) in http_only {
            if set {
                self.push(
                    name.span(),
                    format!("{key}.{field}: only used with mode = \"http\" (this listener is mode = \"tcp\")"),
                );
            }
        }
        if l.splice == Some(true) && l.tls.is_some() {
            self.push(
                name.span(),
                format!("{key}.splice: splice(2) moves bytes unread, and with tls ballast decrypts them: use one or the other"),
            );
        }
        // The listener's pool and those of its `sni_routes` carry bytes, not requests.
        let used = std::iter::once((&l.pool, format!("{key}.pool"))).chain(
            (l.sni_routes.iter().enumerate())
                .map(|(i, r)| (&r.get_ref().pool, format!("{key}.sni_routes[{i}].pool"))),
        );
        let mut checked: Vec<&str> = Vec::new();
        for (pool_name, field) in used {
            if checked.contains(&pool_name.get_ref().as_str()) {
                continue;
            }
            checked.push(pool_name.get_ref());
            let Some(pool) = pools
                .iter()
                .find(|(n, _)| n.get_ref() == pool_name.get_ref())
                .map(|(_, p)| p)
            else {
                continue;
            };
            let pkey = format!("pools.{}", pool_name.get_ref());
            if let Some(k) = pool
                .hash_key
                .as_ref()
                .filter(|k| k.get_ref() != "client_ip")
            {
                self.push(
                    k.span(),
                    format!("{pkey}.hash_key: listener {} is mode = \"tcp\", where only client_ip can be hashed", name.get_ref()),
                );
            }
            if l.splice == Some(true) && pool.tls.is_some() {
                self.push(
                    pool_name.span(),
                    format!(
                        "{field}: pool {:?} sets tls, which splice = true cannot carry (splice(2) moves bytes unread)",
                        pool_name.get_ref()
                    ),
                );
            }
            if pool.protocol == Some(file::FileProtocol::H2) {
                self.push(
                    pool_name.span(),
                    format!(
                        "{field}: pool {:?} sets protocol, which mode = \"tcp\" does not use",
                        pool_name.get_ref()
                    ),
                );
            }
        }
    }

    /// A path from the file, resolved against the config file's folder.
    fn path(&self, p: &Text) -> PathBuf {
        let path = std::path::Path::new(p.get_ref());
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    /// `[listeners.NAME.tls]`: reads and checks every file it names.
    fn tls(&mut self, t: &Spanned<FileTls>, key: &str, mode: ListenerMode) -> Option<TlsConfig> {
        let at = t.span();
        let t = t.get_ref();
        let tkey = format!("{key}.tls");
        let mut certificates = Vec::new();
        let listed = t.certificates.as_ref().map_or(&[][..], |c| c.get_ref());
        match &t.certificates {
            Some(c) if c.get_ref().is_empty() && t.acme.is_none() => self.push(
                c.span(),
                format!(
                    "{tkey}.certificates: at least one certificate is needed (or [{tkey}.acme])"
                ),
            ),
            None if t.acme.is_none() => {
                self.push(at, format!("{tkey}: give `certificates` or [{tkey}.acme]"))
            }
            _ => {}
        }
        for (i, c) in listed.iter().enumerate() {
            match tls::load_pair(&self.path(&c.cert), &self.path(&c.key)) {
                Ok(pair) => certificates.push(pair),
                Err(e) => {
                    // Point at the key when the key file is at fault, else at the cert.
                    let at = if e.starts_with(&self.path(&c.key).display().to_string()) {
                        c.key.span()
                    } else {
                        c.cert.span()
                    };
                    self.push(at, format!("{tkey}.certificates[{i}]: {e}"));
                }
            }
        }
        let min_version = match t.min_version.as_ref().map(|v| (v, v.get_ref().as_str())) {
            None | Some((_, "1.2")) => TlsVersion::Tls12,
            Some((_, "1.3")) => TlsVersion::Tls13,
            Some((v, other)) => {
                self.push(
                    v.span(),
                    format!("{tkey}.min_version: {other:?} is not allowed: write \"1.2\" or \"1.3\" (older versions are never offered)"),
                );
                TlsVersion::Tls12
            }
        };
        let alpn = match &t.alpn {
            // TCP: bytes of a protocol ballast does not read; ALPN only if asked for.
            None if mode == ListenerMode::Tcp => Vec::new(),
            None => vec!["h2".to_string(), "http/1.1".to_string()],
            Some(list) if mode == ListenerMode::Tcp => {
                if list.get_ref().is_empty() {
                    self.push(
                        list.span(),
                        format!("{tkey}.alpn: must not be empty (omit it for no ALPN)"),
                    );
                }
                list.get_ref().iter().map(|p| p.get_ref().clone()).collect()
            }
            Some(list) => {
                let mut out = Vec::new();
                for p in list.get_ref() {
                    match p.get_ref().as_str() {
                        proto @ ("h2" | "http/1.1") => out.push(proto.to_string()),
                        other => self.push(
                            p.span(),
                            format!("{tkey}.alpn: unknown protocol {other:?}: ballast speaks \"h2\" and \"http/1.1\""),
                        ),
                    }
                }
                if list.get_ref().is_empty() {
                    self.push(list.span(), format!("{tkey}.alpn: must not be empty"));
                }
                out
            }
        };
        let client_ca = t.client_ca.as_ref().and_then(|p| {
            tls::load_ca(&self.path(p))
                .map_err(|e| self.push(p.span(), format!("{tkey}.client_ca: {e}")))
                .ok()
        });
        let session_tickets = t.session_ticket_keys_file.as_ref().and_then(|p| {
            tls::load_ticket_keys(&self.path(p))
                .map_err(|e| self.push(p.span(), format!("{tkey}.session_ticket_keys_file: {e}")))
                .ok()
        });
        let mut acme = t.acme.as_ref().and_then(|a| self.acme(a, &tkey));
        if let (Some(a), Some(spanned)) = (&acme, &t.acme) {
            // rustls refuses a client whose ALPN list misses all of the server's, and
            // tls-alpn-01 gives the server one: a TCP listener that offers none would start
            // refusing every client that sends ALPN.
            if a.challenge == AcmeChallenge::TlsAlpn01
                && mode == ListenerMode::Tcp
                && alpn.is_empty()
            {
                self.push(
                    spanned.span(),
                    format!("{tkey}.acme: tls-alpn-01 on a TCP listener needs {tkey}.alpn (the protocols its clients offer), or use http-01"),
                );
            }
        }
        if let Some(a) = &mut acme {
            // Issued already: served like a listed certificate (after them, so a listed one
            // stays the default). Not issued yet: `acme` orders it.
            if a.cert_path().exists() || a.key_path().exists() {
                match tls::load_pair(&a.cert_path(), &a.key_path()) {
                    Ok(pair) => certificates.push(pair),
                    Err(e) => a.stored_error = Some(e),
                }
            }
        }
        Some(TlsConfig {
            certificates,
            min_version,
            alpn,
            client_ca,
            strict_sni: t.strict_sni.unwrap_or(false),
            session_tickets,
            acme,
        })
    }

    /// `[listeners.NAME.tls.acme]`: checked without contacting the CA.
    fn acme(&mut self, a: &Spanned<FileAcme>, tkey: &str) -> Option<AcmeConfig> {
        let akey = format!("{tkey}.acme");
        let a = a.get_ref();
        let mut domains: Vec<String> = Vec::new();
        if a.domains.get_ref().is_empty() {
            self.push(
                a.domains.span(),
                format!("{akey}.domains: list at least one DNS name"),
            );
        }
        for d in a.domains.get_ref() {
            let name = d.get_ref().trim_end_matches('.').to_ascii_lowercase();
            let problem = if name.starts_with("*.") {
                Some("a wildcard needs the dns-01 challenge, which ballast does not answer: list each name".to_string())
            } else if name.parse::<std::net::IpAddr>().is_ok() {
                Some("an IP address: ACME certificates here are for DNS names".to_string())
            } else if !is_dns_name(&name) {
                Some("not a DNS name (letters, digits, '-' and '.', labels of 1 to 63)".to_string())
            } else if domains.contains(&name) {
                Some("listed twice".to_string())
            } else {
                None
            };
            match problem {
                Some(p) => self.push(d.span(), format!("{akey}.domains: {:?}: {p}", d.get_ref())),
                None => domains.push(name),
            }
        }
        let email = a.email.as_ref().and_then(|e| {
            let v = e.get_ref().trim();
            match v.split_once('@') {
                Some((user, host))
                    if !user.is_empty()
                        && host.contains('.')
                        && !v.contains(char::is_whitespace) =>
                {
                    Some(v.to_string())
                }
                _ => {
                    self.push(
                        e.span(),
                        format!("{akey}.email: {v:?} is not an email address"),
                    );
                    None
                }
            }
        });
        let directory = match &a.directory {
            None => defaults::ACME_DIRECTORY.to_string(),
            Some(d) => {
                let ok = d
                    .get_ref()
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some());
                if !ok {
                    self.push(
                        d.span(),
                        format!("{akey}.directory: {:?} is not an https:// URL (the CA's directory, for example {})", d.get_ref(), defaults::ACME_DIRECTORY),
                    );
                }
                d.get_ref().clone()
            }
        };
        let directory_ca = a.directory_ca.as_ref().and_then(|p| {
            tls::load_ca(&self.path(p))
                .map_err(|e| self.push(p.span(), format!("{akey}.directory_ca: {e}")))
                .ok()
        });
        let challenge = match a.challenge.as_ref().map(|c| (c, c.get_ref().as_str())) {
            None | Some((_, "http-01")) => AcmeChallenge::Http01,
            Some((_, "tls-alpn-01")) => AcmeChallenge::TlsAlpn01,
            Some((c, other)) => {
                self.push(
                    c.span(),
                    format!("{akey}.challenge: {other:?}: write \"http-01\" or \"tls-alpn-01\""),
                );
                AcmeChallenge::Http01
            }
        };
        let storage = a
            .storage
            .as_ref()
            .map_or_else(|| PathBuf::from(defaults::ACME_STORAGE), |p| self.path(p));
        let retry_after = self.duration(
            &a.retry_after,
            &format!("{akey}.retry_after"),
            defaults::ACME_RETRY_AFTER,
        );
        Some(AcmeConfig {
            domains,
            email,
            directory,
            directory_ca,
            challenge,
            storage,
            retry_after,
            stored_error: None,
        })
    }

    /// What one listener's `acme` cannot see alone: an http-01 challenge needs a plain HTTP
    /// listener to be answered on, and two certificates must not share a folder.
    fn acme_across_listeners(&mut self, raw: &file::FileConfig, listeners: &[ListenerConfig]) {
        let plain_http = listeners
            .iter()
            .any(|l| l.mode == ListenerMode::Http && l.tls.is_none());
        let mut folders: Vec<(PathBuf, &str)> = Vec::new();
        for (name, l) in &raw.listeners {
            let Some(a) = l.tls.as_ref().and_then(|t| t.get_ref().acme.as_ref()) else {
                continue;
            };
            let akey = format!("listeners.{}.tls.acme", name.get_ref());
            let http01 = a
                .get_ref()
                .challenge
                .as_ref()
                .is_none_or(|c| c.get_ref() == "http-01");
            if http01 && !plain_http {
                self.push(
                    a.span(),
                    format!("{akey}: the http-01 challenge is answered on a plain HTTP listener (port 80 for a public CA) and this config has none: add one, or set challenge = \"tls-alpn-01\""),
                );
            }
            let validated = listeners
                .iter()
                .find(|v| v.name == *name.get_ref())
                .and_then(|v| v.tls.as_ref()?.acme.as_ref());
            if let Some(v) = validated {
                let folder = v.cert_dir();
                if let Some((_, other)) = folders.iter().find(|(f, _)| *f == folder) {
                    self.push(
                        a.span(),
                        format!("{akey}: listener {other} already orders the certificate kept in {}: give both the same listener, or a different first domain or storage", folder.display()),
                    );
                } else {
                    folders.push((folder, name.get_ref().as_str()));
                }
            }
        }
    }

    fn request_buffering(&mut self, value: &Option<Spanned<FileSize>>, key: &str) -> Option<usize> {
        self.size(
            value,
            key,
            (1, defaults::MAX_REQUEST_BUFFERING as u64),
            true,
        )
        .map(|n| n as usize)
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
        let mut names: Vec<NamedBackend> = Vec::new();
        if p.backends.get_ref().is_empty() {
            self.push(
                p.backends.span(),
                format!("{key}.backends: a pool needs at least one backend"),
            );
        }
        for (i, b) in p.backends.get_ref().iter().enumerate() {
            let bkey = format!("{key}.backends[{i}]");
            let (addr, weight, backup, own_limit) = match b.get_ref() {
                FileBackend::Address(a) => (a, 1, false, None),
                FileBackend::Detailed(t) => (
                    &t.address,
                    t.weight.unwrap_or(1),
                    t.backup.unwrap_or(false),
                    t.max_connections.as_ref(),
                ),
            };
            let max_connections = match own_limit.or(p.max_connections.as_ref()) {
                Some(v) if *v.get_ref() == 0 => {
                    self.push(
                        v.span(),
                        format!("{bkey}.max_connections: must be at least 1 (leave it out for no limit)"),
                    );
                    None
                }
                v => v.map(|v| *v.get_ref()),
            };
            let parsed = match backend_address(addr) {
                Ok(a) => a,
                Err(why) => {
                    self.push(
                        b.span(),
                        format!("{bkey}: invalid backend address {addr:?}: {why}"),
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
            let weight = weight as u32;
            match parsed {
                BackendAddress::Ip(address) => {
                    if backends.iter().any(|x| x.address == address) {
                        self.push(b.span(), format!("{bkey}: duplicate backend {address}"));
                        continue;
                    }
                    backends.push(BackendConfig {
                        address,
                        weight,
                        backup,
                        max_connections,
                        host: None,
                    });
                }
                BackendAddress::Name(host, port) => {
                    if names.iter().any(|n| n.host == host && n.port == port) {
                        self.push(b.span(), format!("{bkey}: duplicate backend {host}:{port}"));
                        continue;
                    }
                    names.push(NamedBackend {
                        host,
                        port,
                        weight,
                        backup,
                        max_connections,
                    });
                }
            }
        }
        let dns = self.dns(p, &key, !names.is_empty());
        let slow_start = p
            .slow_start
            .as_ref()
            .map(|_| self.duration(&p.slow_start, &format!("{key}.slow_start"), Duration::ZERO))
            .filter(|d| !d.is_zero());
        if slow_start.is_some() && algorithm == Algorithm::Hash {
            if let Some(v) = &p.slow_start {
                self.push(
                    v.span(),
                    format!("{key}.slow_start: not used with algorithm = \"hash\" (a ramp would move keys between backends)"),
                );
            }
        }

        if !backends.is_empty() && names.is_empty() && backends.iter().all(|b| b.backup) {
            self.push(
                p.backends.span(),
                format!("{key}.backends: every backend is a backup; a pool needs a primary"),
            );
        }
        let when_all_down = match &p.when_all_down {
            None => WhenAllDown::Reject,
            Some(v) => match v.get_ref().as_str() {
                "reject" => WhenAllDown::Reject,
                "fail_open" => WhenAllDown::FailOpen,
                other => {
                    self.push(
                        v.span(),
                        format!(
                            "{key}.when_all_down: {other:?}: write \"reject\" or \"fail_open\""
                        ),
                    );
                    WhenAllDown::Reject
                }
            },
        };
        let panic_threshold = p.panic_threshold.as_ref().and_then(|v| {
            self.percent(v, &format!("{key}.panic_threshold"))
                .filter(|r| *r > 0.0)
        });
        let retry_on = match &p.retry_on {
            None => RetryOn::default(),
            Some(list) => self.retry_on(list, &format!("{key}.retry_on")),
        };
        let retry_budget = p.retry_budget.as_ref().and_then(|v| {
            let ratio = self.percent(v, &format!("{key}.retry_budget"))?;
            Some(RetryBudgetConfig {
                ratio,
                min_per_second: p
                    .retry_budget_min
                    .as_ref()
                    .map_or(defaults::RETRY_BUDGET_MIN, |m| *m.get_ref()),
            })
        });
        if let (Some(m), None) = (&p.retry_budget_min, &p.retry_budget) {
            self.push(
                m.span(),
                format!("{key}.retry_budget_min: only used with retry_budget"),
            );
        }

        let limited = p.max_connections.is_some()
            || p.backends.get_ref().iter().any(
                |b| matches!(b.get_ref(), FileBackend::Detailed(t) if t.max_connections.is_some()),
            );
        if !limited {
            for (field, span) in [
                ("queue_timeout", p.queue_timeout.as_ref().map(|v| v.span())),
                ("max_queue", p.max_queue.as_ref().map(|v| v.span())),
            ] {
                if let Some(span) = span {
                    self.push(
                        span,
                        format!("{key}.{field}: only used with max_connections"),
                    );
                }
            }
        }
        let hash_balance_factor = match (&p.hash_balance_factor, algorithm) {
            (None, _) => None,
            (Some(v), Algorithm::Hash) if *v.get_ref() >= 100 => Some(*v.get_ref()),
            (Some(v), Algorithm::Hash) => {
                self.push(
                    v.span(),
                    format!(
                        "{key}.hash_balance_factor: a percentage of the average load, at least 100"
                    ),
                );
                None
            }
            (Some(v), _) => {
                self.push(
                    v.span(),
                    format!("{key}.hash_balance_factor: only used with algorithm = \"hash\""),
                );
                None
            }
        };
        let queue_timeout = self.duration(
            &p.queue_timeout,
            &format!("{key}.queue_timeout"),
            defaults::QUEUE_TIMEOUT,
        );
        let max_queue = p
            .max_queue
            .as_ref()
            .map_or(defaults::MAX_QUEUE, |v| *v.get_ref()) as usize;

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
            names,
            dns,
            slow_start,
            when_all_down,
            panic_threshold,
            retry_on,
            retry_budget,
            queue_timeout,
            max_queue,
            hash_balance_factor,
            sticky: p
                .sticky
                .as_ref()
                .and_then(|v| self.sticky(v, &format!("{key}.sticky"))),
            retry_backoff: p
                .retry_backoff
                .as_ref()
                .map(|_| {
                    self.duration(
                        &p.retry_backoff,
                        &format!("{key}.retry_backoff"),
                        Duration::ZERO,
                    )
                })
                .filter(|d| !d.is_zero()),
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
                .map(|r| *r.get_ref() as usize),
            request_buffering: self
                .request_buffering(&p.request_buffering, &format!("{key}.request_buffering")),
            protocol: match p.protocol {
                None | Some(file::FileProtocol::Http1) => UpstreamProtocol::Http1,
                Some(file::FileProtocol::H2) => UpstreamProtocol::H2,
            },
            tls: p.tls.as_ref().map(|t| self.upstream_tls(t, name, &key)),
            send_proxy: p
                .send_proxy
                .as_ref()
                .and_then(|v| match v.get_ref().as_str() {
                    "v1" => Some(crate::proxy_protocol::Version::V1),
                    "v2" => Some(crate::proxy_protocol::Version::V2),
                    other => {
                        self.push(
                            v.span(),
                            format!("{key}.send_proxy: {other:?}: write \"v1\" or \"v2\""),
                        );
                        None
                    }
                }),
        })
    }

    /// `{ set = { NAME = VALUE }, remove = [NAME] }`: names checked, values parsed into
    /// templates.
    fn header_rules(&mut self, h: &file::FileHeaderRules, key: &str) -> HeaderRules {
        let mut rules = HeaderRules::default();
        for n in &h.remove {
            if let Some(name) = self.rule_header_name(n, &format!("{key}.remove")) {
                rules.remove.push(name);
            }
        }
        for (n, v) in &h.set {
            let Some(name) = self.rule_header_name(n, &format!("{key}.set")) else {
                continue;
            };
            match parse_template(v.get_ref()) {
                Ok(t) => rules.set.push((name, t)),
                Err(why) => self.push(v.span(), format!("{key}.set.{}: {why}", n.get_ref())),
            }
        }
        rules
    }

    /// A field name a rule may touch: not one that frames the message or is hop-by-hop
    /// (changing those would let a rule smuggle or break requests).
    fn rule_header_name(&mut self, n: &Text, key: &str) -> Option<http::HeaderName> {
        let Ok(name) = http::HeaderName::from_bytes(n.get_ref().as_bytes()) else {
            self.push(
                n.span(),
                format!("{key}: {:?} is not a header name", n.get_ref()),
            );
            return None;
        };
        const FRAMING: [&str; 8] = [
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "upgrade",
            "te",
            "trailer",
            "proxy-connection",
        ];
        if FRAMING.contains(&name.as_str()) {
            self.push(
                n.span(),
                format!(
                    "{key}: {name} frames the message or is hop-by-hop; rules cannot change it"
                ),
            );
            return None;
        }
        Some(name)
    }

    /// `rate_limit = { requests_per_second, burst, key, max_keys, ipv6_prefix }`.
    fn rate_limit(
        &mut self,
        v: &Spanned<file::FileRateLimit>,
        key: &str,
    ) -> Option<RateLimitConfig> {
        let r = v.get_ref();
        let rate = *r.requests_per_second.get_ref();
        if !(rate > 0.0 && rate <= 1e9) {
            self.push(
                r.requests_per_second.span(),
                format!("{key}.requests_per_second: must be above 0"),
            );
            return None;
        }
        let burst = match &r.burst {
            Some(b) if *b.get_ref() == 0 => {
                self.push(b.span(), format!("{key}.burst: must be at least 1"));
                return None;
            }
            Some(b) => *b.get_ref(),
            // One second's worth.
            None => rate.ceil().max(1.0) as u32,
        };
        let rate_key = match r.key.as_ref().map(|k| (k, k.get_ref().as_str())) {
            None | Some((_, "client_ip")) => RateKey::ClientIp,
            Some((k, text)) => match text
                .strip_prefix("header:")
                .and_then(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
            {
                Some(name) => RateKey::Header(name),
                None => {
                    self.push(
                        k.span(),
                        format!("{key}.key: {text:?}: write \"client_ip\" or \"header:NAME\""),
                    );
                    return None;
                }
            },
        };
        let max_keys = match &r.max_keys {
            Some(m) if *m.get_ref() == 0 => {
                self.push(m.span(), format!("{key}.max_keys: must be at least 1"));
                return None;
            }
            Some(m) => *m.get_ref(),
            None => defaults::RATE_LIMIT_MAX_KEYS,
        };
        let ipv6_prefix = match &r.ipv6_prefix {
            Some(p) if !(1..=128).contains(p.get_ref()) => {
                self.push(
                    p.span(),
                    format!("{key}.ipv6_prefix: must be 1 to 128 (bits of the address)"),
                );
                return None;
            }
            Some(p) => *p.get_ref(),
            None => defaults::RATE_LIMIT_IPV6_PREFIX,
        };
        Some(RateLimitConfig {
            requests_per_second: rate,
            burst,
            key: rate_key,
            max_keys: max_keys as usize,
            ipv6_prefix,
        })
    }

    /// A share written as `"50%"` (0% to 100%), as a ratio.
    fn percent(&mut self, v: &Text, key: &str) -> Option<f64> {
        let text = v.get_ref().trim();
        let parsed = text
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|n| (0.0..=100.0).contains(n));
        match parsed {
            Some(n) => Some(n / 100.0),
            None => {
                self.push(
                    v.span(),
                    format!("{key}: {text:?}: write a share from \"0%\" to \"100%\""),
                );
                None
            }
        }
    }

    /// `retry_on = ["connect_failure", "reset", "502", "503", "504"]`.
    fn retry_on(&mut self, list: &Spanned<Vec<Text>>, key: &str) -> RetryOn {
        let mut on = RetryOn {
            connect_failure: false,
            reset: false,
            statuses: [false; 3],
            non_idempotent: false,
        };
        for v in list.get_ref() {
            match v.get_ref().as_str() {
                "connect_failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "502" => on.statuses[0] = true,
                "503" => on.statuses[1] = true,
                "504" => on.statuses[2] = true,
                "non_idempotent" => on.non_idempotent = true,
                other => self.push(
                    v.span(),
                    format!("{key}: {other:?}: write connect_failure, reset, \"502\", \"503\", \"504\" or non_idempotent"),
                ),
            }
        }
        on
    }

    /// `resolve_interval`, `resolve_grace` and `resolvers`; only meaningful when the pool
    /// names a backend by host name.
    fn dns(&mut self, p: &file::FilePool, key: &str, has_names: bool) -> DnsConfig {
        if !has_names {
            for (field, span) in [
                (
                    "resolve_interval",
                    p.resolve_interval.as_ref().map(|v| v.span()),
                ),
                ("resolve_grace", p.resolve_grace.as_ref().map(|v| v.span())),
                ("resolvers", p.resolvers.as_ref().map(|v| v.span())),
            ] {
                if let Some(span) = span {
                    self.push(
                        span,
                        format!("{key}.{field}: only used when a backend is written as HOST:PORT"),
                    );
                }
            }
        }
        let ikey = format!("{key}.resolve_interval");
        let mut interval = self.duration(&p.resolve_interval, &ikey, defaults::RESOLVE_INTERVAL);
        if interval < defaults::MIN_RESOLVE_INTERVAL {
            if let Some(v) = &p.resolve_interval {
                self.push(
                    v.span(),
                    format!("{ikey}: must be at least 1s (more often only hammers the resolver)"),
                );
            }
            interval = defaults::RESOLVE_INTERVAL;
        }
        let grace = self.duration(
            &p.resolve_grace,
            &format!("{key}.resolve_grace"),
            defaults::RESOLVE_GRACE,
        );
        let mut resolvers = Vec::new();
        if let Some(list) = &p.resolvers {
            for (i, r) in list.get_ref().iter().enumerate() {
                let rkey = format!("{key}.resolvers[{i}]");
                // A bare IP means port 53, as in resolv.conf.
                let parsed = r.get_ref().parse::<SocketAddr>().ok().or_else(|| {
                    r.get_ref()
                        .parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, 53))
                });
                match parsed {
                    Some(a) => resolvers.push(a),
                    None => self.push(
                        r.span(),
                        format!("{rkey}: invalid resolver {:?}: expected IP or IP:PORT, e.g. \"127.0.0.11:53\"", r.get_ref()),
                    ),
                }
            }
            if list.get_ref().is_empty() {
                self.push(
                    list.span(),
                    format!("{key}.resolvers: leave it out to use /etc/resolv.conf, or name at least one"),
                );
            }
        }
        DnsConfig {
            interval,
            grace,
            resolvers,
        }
    }

    fn upstream_tls(&mut self, t: &file::FileUpstreamTls, name: &Text, key: &str) -> UpstreamTls {
        let tkey = format!("{key}.tls");
        let ca = t.ca.as_ref().and_then(|p| {
            tls::load_ca(&self.path(p))
                .map_err(|e| self.push(p.span(), format!("{tkey}.ca: {e}")))
                .ok()
        });
        let insecure_skip_verify = t.insecure_skip_verify.unwrap_or(false);
        if t.ca.is_none() && !insecure_skip_verify {
            self.push(
                name.span(),
                format!("{tkey}: set ca (a PEM bundle the backends' certificates chain to), or insecure_skip_verify = true"),
            );
        }
        let sni = t.sni.as_ref().and_then(|s| {
            match rustls::pki_types::DnsName::try_from(s.get_ref().as_str()) {
                Ok(_) => Some(s.get_ref().to_ascii_lowercase()),
                Err(_) => {
                    self.push(
                        s.span(),
                        format!("{tkey}.sni: {:?} is not a DNS name", s.get_ref()),
                    );
                    None
                }
            }
        });
        UpstreamTls {
            ca,
            sni,
            insecure_skip_verify,
            for_tcp: false,
        }
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

/// `"prod"`, `"${client_ip}"`, `"id=${request_id} via ${listener}"`.
pub(super) fn parse_template(text: &str) -> Result<Template, String> {
    let var = |name: &str| match name {
        "client_ip" => Some(Piece::ClientIp),
        "request_id" => Some(Piece::RequestId),
        "listener" => Some(Piece::Listener),
        _ => None,
    };
    split_template(text, "client_ip, request_id, listener", var, |part| {
        text_piece(text, &part)
    })
    .map(Template)
}

/// A text with `${name}` variables, split into its pieces: `fixed(part)` for each fixed
/// part, `var(name)` for each variable (`None`: unknown; `names` lists the known ones for
/// the error). `$${` is a literal `${` (the environment pass in `config::env` leaves it so).
pub(super) fn split_template<P>(
    text: &str,
    names: &str,
    var: impl Fn(&str) -> Option<P>,
    fixed: impl Fn(String) -> Result<P, String>,
) -> Result<Vec<P>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        if start > 0 && rest.as_bytes()[start - 1] == b'$' {
            literal.push_str(&rest[..start - 1]);
            literal.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        literal.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("{text:?}: \"${{\" without a closing \"}}\""));
        };
        let Some(variable) = var(&after[..end]) else {
            return Err(format!(
                "{text:?}: unknown variable {:?} ({names}; write $${{ for a literal ${{)",
                &after[..end]
            ));
        };
        if !literal.is_empty() {
            pieces.push(fixed(std::mem::take(&mut literal))?);
        }
        pieces.push(variable);
        rest = &after[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        pieces.push(fixed(literal)?);
    }
    Ok(pieces)
}

/// `type/subtype` or `type/*`, tokens only, lower-cased.
fn media_range(text: &str) -> Option<TypeMatch> {
    let t = text.trim().to_ascii_lowercase();
    let (kind, sub) = t.split_once('/')?;
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    if !token(kind) {
        return None;
    }
    match sub {
        "*" => Some(TypeMatch::Prefix(format!("{kind}/"))),
        s if token(s) => Some(TypeMatch::Exact(t.clone())),
        _ => None,
    }
}

/// The fixed text `part` of the template `text`, as a header value.
fn text_piece(text: &str, part: &str) -> Result<Piece, String> {
    http::HeaderValue::from_str(part)
        .map(Piece::Text)
        .map_err(|_| format!("{text:?}: not a valid header value"))
}

/// `"64KiB"`, `"1 MiB"`, `"512k"`, `"100"`: a number with an optional unit. Units are powers
/// of 1024 (`k`, `KB` and `KiB` all mean 1024, as in nginx).
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown unit {other:?}")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A DNS name ACME can certify: labels of letters, digits and '-', not starting or ending
/// with '-', at least two labels.
fn is_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}
