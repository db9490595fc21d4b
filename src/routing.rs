//! Where a request goes: per listener, a [`Router`] of routes in file order (host, path
//! prefix or exact path, path regex, methods, header and query fields, client address, SNI:
//! every matcher a route has must hold), each with a [`Rule`]: who may use it, and its
//! [`Action`] (forward to a [`Target`], redirect, or answer). Then the listener's default.
//! Built with each config generation (see `state`), read by the request path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::access::{Access, Ranges};
use crate::balance::Pool;
use crate::basic_auth::Gate;
use crate::config::{
    BasicAuthConfig, CompressConfig, FieldMatch, HashKey, HeaderRules, HostMatch, ListenerConfig,
    Pattern, RateKey, RateLimitConfig, Redirect, Respond, RouteAction, UpstreamProtocol,
};
use crate::rate_limit::RateLimiter;
use crate::stats::ListenerStats;

#[derive(Debug)]
struct Route {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    path: Option<String>,
    path_regex: Option<Pattern>,
    methods: Option<Vec<http::Method>>,
    headers: Vec<(http::HeaderName, FieldMatch)>,
    query: Vec<(String, FieldMatch)>,
    client_cidrs: Option<Ranges>,
    sni: Option<HostMatch>,
    rule: Rule,
}

/// What a matched route does.
#[derive(Debug)]
pub struct Rule {
    /// The route's `allow_from` / `deny_from`: a client it refuses gets a 403.
    pub access: Access,
    /// The route's own `basic_auth`; `None`: the listener's applies, if any.
    pub auth: Option<Arc<Gate>>,
    pub action: Action,
}

#[derive(Debug)]
pub enum Action {
    Forward(Target),
    Redirect(Redirect),
    Respond(Respond),
}

/// What routing reads of a request.
pub struct RequestView<'a> {
    /// Without port.
    pub host: Option<&'a str>,
    /// Normalized (dot-segments resolved), without the query.
    pub path: &'a str,
    pub method: &'a http::Method,
    pub headers: Fields<'a>,
    pub query: Option<&'a str>,
    /// The client's address.
    pub client: IpAddr,
    /// The TLS client's SNI, where a route reads it.
    pub sni: Option<&'a str>,
}

/// A request's fields, wherever they are: in its map, or as the lines an HTTP/1.1 client
/// sent when the listener relays them (`h1::RequestFields`). Matching reads either, so a
/// route on a header costs the fast path nothing.
#[derive(Clone, Copy)]
pub enum Fields<'a> {
    Map(&'a http::HeaderMap),
    Lines(&'a crate::h1::RequestFields),
}

impl<'a> Fields<'a> {
    /// The values of field `name`, line by line.
    pub fn lines(&self, name: &http::HeaderName) -> smallvec::SmallVec<[&'a [u8]; 2]> {
        match *self {
            Fields::Map(map) => map.get_all(name).iter().map(|v| v.as_bytes()).collect(),
            Fields::Lines(lines) => lines.values(name.as_str().as_bytes()).collect(),
        }
    }

    /// Whether some value of field `name` passes `test`.
    fn any(&self, name: &http::HeaderName, test: &dyn Fn(&[u8]) -> bool) -> bool {
        match self {
            Fields::Map(map) => map.get_all(name).iter().any(|v| test(v.as_bytes())),
            Fields::Lines(lines) => lines.values(name.as_str().as_bytes()).any(test),
        }
    }
}

impl Route {
    /// Every matcher the route has holds; the dearer ones last.
    fn matches(&self, req: &RequestView<'_>) -> bool {
        self.host
            .as_ref()
            .is_none_or(|m| req.host.is_some_and(|h| m.matches(h)))
            && self
                .methods
                .as_ref()
                .is_none_or(|ms| ms.contains(req.method))
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| req.path.starts_with(p.as_str()))
            && self.path.as_ref().is_none_or(|p| req.path == p)
            && self
                .headers
                .iter()
                .all(|(name, m)| m.holds(|want| req.headers.any(name, want)))
            && self.query.iter().all(|(name, m)| {
                let mut values = form_urlencoded::parse(req.query.unwrap_or("").as_bytes())
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v);
                m.holds(|want| values.any(|v| want(v.as_bytes())))
            })
            && self
                .client_cidrs
                .as_ref()
                .is_none_or(|r| r.contains(req.client))
            && self
                .sni
                .as_ref()
                .is_none_or(|m| req.sni.is_some_and(|s| m.matches(s)))
            && self
                .path_regex
                .as_ref()
                .is_none_or(|re| re.0.is_match(req.path))
    }
}

impl FieldMatch {
    /// Whether the matcher holds, given `any(test)`: true if some value of the field or
    /// parameter passes `test`.
    fn holds(&self, any: impl FnOnce(&dyn Fn(&[u8]) -> bool) -> bool) -> bool {
        match self {
            FieldMatch::Equals(s) => any(&|v| v == s.as_bytes()),
            FieldMatch::Present => any(&|_| true),
            FieldMatch::Absent => !any(&|_| true),
            FieldMatch::Regex(re) => {
                any(&|v| std::str::from_utf8(v).is_ok_and(|v| re.0.is_match(v)))
            }
        }
    }
}

/// Where a route sends a request, and what it lets through.
#[derive(Debug)]
pub struct Target {
    pub pool: Arc<Pool>,
    /// `Upgrade` protocols forwarded (lower case); others are removed from the request.
    pub upgrade: Vec<String>,
    /// `strip_prefix` / `rewrite_prefix`: the matched path prefix and what replaces it.
    pub rewrite: Option<(String, String)>,
    /// The route's header rules, else the listener's.
    pub request_headers: Option<HeaderRules>,
    pub response_headers: Option<HeaderRules>,
    /// The route's own rate limit (the listener's is on the [`Router`]).
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// Response compression: the route's, else the listener's.
    pub compress: Option<CompressConfig>,
}

impl Target {
    /// What this target does to a request needs no map of its fields (see
    /// [`Router::relays_fields`]).
    fn relays_fields(&self) -> bool {
        self.request_headers.is_none()
            && self.pool.config.protocol == UpstreamProtocol::Http1
            && !matches!(
                self.pool.hash_key(),
                Some(HashKey::Header(_) | HashKey::Cookie(_))
            )
            && self.pool.config.sticky.is_none()
            && relays_fields(self.rate_limit.as_deref())
    }
}

/// A rate limit keyed by the client, not by a field, needs no map.
fn relays_fields(limit: Option<&RateLimiter>) -> bool {
    limit.is_none_or(|l| !matches!(l.config.key, RateKey::Header(_)))
}

/// A listener's routes in file order, first match wins, then the listener's default pool.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    default: Target,
    /// The listener's `allow_from` / `deny_from`, checked before routing; `None`: open.
    pub access: Option<Access>,
    /// The listener's `trusted_proxies`.
    pub trusted_proxies: Option<Ranges>,
    /// The listener's `basic_auth`, for requests no route with its own matches.
    pub auth: Option<Arc<Gate>>,
    /// The listener's counters, carried over from the previous router of the same name.
    pub stats: Arc<ListenerStats>,
    /// The listener's rate limit, for every request on it.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// Nothing on this listener reads or edits a request's fields beyond `Host`, so an
    /// HTTP/1.1 client's lines can be relayed without a map (`h1::RequestFields`): no header
    /// rules or request ids, no hash or rate-limit key taken from a field,
    /// and HTTP/1.1 backends only. (Routes read the lines as they are: [`Fields`].)
    pub relays_fields: bool,
    /// A TCP listener's `sni_routes`, each with its pool.
    sni_routes: Box<[(HostMatch, Arc<Pool>)]>,
}

impl Router {
    /// The router for listener `l` over `pools`; `old` is the previous generation's router
    /// of the same listener, whose counters and rate-limit buckets carry over. `None` when
    /// the default pool is missing (validation rules that out).
    pub fn build(
        l: &ListenerConfig,
        pools: &HashMap<Arc<str>, Arc<Pool>>,
        old: Option<&Router>,
    ) -> Option<Router> {
        let default = Arc::clone(pools.get(l.default_pool.as_str())?);
        let routes: Vec<Route> = l
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let action = match &r.action {
                    RouteAction::Pool(pool) => {
                        let kept =
                            old.and_then(|o| o.routes.get(i))
                                .and_then(|o| match &o.rule.action {
                                    Action::Forward(t) => t.rate_limit.as_ref(),
                                    _ => None,
                                });
                        Action::Forward(Target {
                            pool: Arc::clone(pools.get(pool.as_str())?),
                            upgrade: r.upgrade.clone().unwrap_or_else(|| l.upgrade.clone()),
                            rewrite: r.path_prefix.clone().zip(r.rewrite_prefix.clone()),
                            request_headers: r
                                .request_headers
                                .clone()
                                .or_else(|| l.request_headers.clone()),
                            response_headers: r
                                .response_headers
                                .clone()
                                .or_else(|| l.response_headers.clone()),
                            rate_limit: limiter(r.rate_limit.as_ref(), kept),
                            compress: r.compress.clone().or_else(|| l.compress.clone()),
                        })
                    }
                    RouteAction::Redirect(redirect) => Action::Redirect(redirect.clone()),
                    RouteAction::Respond(respond) => Action::Respond(respond.clone()),
                };
                Some(Route {
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    path: r.path.clone(),
                    path_regex: r.path_regex.clone(),
                    methods: r.methods.clone(),
                    headers: r.headers.clone(),
                    query: r.query.clone(),
                    client_cidrs: r.client_cidrs.clone(),
                    sni: r.sni.clone(),
                    rule: Rule {
                        access: r.access.clone(),
                        auth: r.basic_auth.as_ref().map(gate),
                        action,
                    },
                })
            })
            .collect();
        let default = Target {
            pool: default,
            upgrade: l.upgrade.clone(),
            rewrite: None,
            request_headers: l.request_headers.clone(),
            response_headers: l.response_headers.clone(),
            rate_limit: None,
            compress: l.compress.clone(),
        };
        let rate_limit = limiter(
            l.rate_limit.as_ref(),
            old.and_then(|o| o.rate_limit.as_ref()),
        );
        let stats = old.map_or_else(Default::default, |r| Arc::clone(&r.stats));
        let relays_fields = !l.request_id
            && relays_fields(rate_limit.as_deref())
            && default.relays_fields()
            && routes.iter().all(|r| match &r.rule.action {
                Action::Forward(t) => t.relays_fields(),
                Action::Redirect(_) | Action::Respond(_) => true,
            });
        let sni_routes = (l.sni_routes.iter())
            .filter_map(|r| Some((r.sni.clone(), Arc::clone(pools.get(r.pool.as_str())?))))
            .collect();
        Some(Router {
            routes,
            sni_routes,
            default,
            access: (!l.access.is_open()).then(|| l.access.clone()),
            trusted_proxies: l.trusted_proxies.clone(),
            auth: l.basic_auth.as_ref().map(gate),
            stats,
            rate_limit,
            relays_fields,
        })
    }

    pub fn has_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The listener's own pool and rules (all a TCP listener has).
    pub fn default_target(&self) -> &Target {
        &self.default
    }

    /// A TCP listener's pool for a client that asked for `sni`: the first of its
    /// `sni_routes` that matches, else the listener's own.
    pub fn sni_pool(&self, sni: Option<&str>) -> &Arc<Pool> {
        sni.and_then(|name| self.sni_routes.iter().find(|(m, _)| m.matches(name)))
            .map_or(&self.default.pool, |(_, pool)| pool)
    }

    /// The rule of the first route whose matchers all hold; `None`: the listener's default
    /// ([`Router::default_target`]).
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Rule> {
        self.routes.iter().find(|r| r.matches(req)).map(|r| &r.rule)
    }
}

/// A live `basic_auth` (made per config generation: an edited users file reloads).
fn gate(config: &BasicAuthConfig) -> Arc<Gate> {
    Arc::new(Gate::new(&config.realm, config.users.clone()))
}

/// The limiter for `config`: the previous generation's when its settings are the same (a
/// reload does not refill every bucket), else a new one.
fn limiter(
    config: Option<&RateLimitConfig>,
    previous: Option<&Arc<RateLimiter>>,
) -> Option<Arc<RateLimiter>> {
    let config = config?;
    Some(match previous {
        Some(p) if p.config == *config => Arc::clone(p),
        _ => Arc::new(RateLimiter::new(config.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::discovery::Resolved;
    use crate::state::Snapshot;

    /// The pool `router` picks for a request with these parts (fields in a map).
    fn pick(
        router: &Router,
        host: Option<&str>,
        method: &str,
        path: &str,
        fields: &[(&str, &str)],
        query: Option<&str>,
    ) -> String {
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let mut headers = http::HeaderMap::new();
        for (k, v) in fields {
            headers.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let view = RequestView {
            host,
            path,
            method: &method,
            headers: Fields::Map(&headers),
            query,
            client: IpAddr::from([127, 0, 0, 1]),
            sni: None,
        };
        name(router, &view)
    }

    /// The pool the request goes to, or what else its route does.
    fn name(router: &Router, view: &RequestView<'_>) -> String {
        match router.route(view).map(|r| &r.action) {
            None => router.default_target().pool.name.to_string(),
            Some(Action::Forward(t)) => t.pool.name.to_string(),
            Some(Action::Redirect(_)) => "redirect".into(),
            Some(Action::Respond(_)) => "respond".into(),
        }
    }

    /// Listener `web` (default pool `default`) with `routes`, and a pool of one backend for
    /// every pool the routes name.
    fn routed(routes: &str) -> Snapshot {
        let mut pools = vec!["default".to_string()];
        for name in routes
            .split("pool = \"")
            .skip(1)
            .filter_map(|r| r.split('"').next())
        {
            if !pools.iter().any(|p| p == name) {
                pools.push(name.to_string());
            }
        }
        let tables: String = pools
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[pools.{p}]\nbackends = [\"127.0.0.1:{}\"]\n", i + 1))
            .collect();
        snapshot(&format!(
            "[listeners.web]\nbind = \"127.0.0.1:0\"\npool = \"default\"\nroutes = [\n{routes}]\n{tables}"
        ))
    }

    fn snapshot(toml: &str) -> Snapshot {
        let config = Config::from_toml_str(toml, std::path::Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        Snapshot::build(Arc::new(config), None, &Resolved::new(), true, None)
    }

    #[test]
    fn routes_match_host_then_prefix_first_match_wins_then_default() {
        let snap = routed(
            r#"
  { host = "api.example.com", path_prefix = "/v2/", pool = "v2" },
  { host = "api.example.com", pool = "api" },
  { path_prefix = "/static/", pool = "static" },
  { host = "*.example.org", pool = "org" },
  { path_prefix = "/static/never", pool = "never" },
"#,
        );
        let router = &snap.routers["web"];
        let pool = |host: Option<&str>, path: &str| pick(router, host, "GET", path, &[], None);
        assert_eq!(pool(Some("api.example.com"), "/v2/users"), "v2");
        assert_eq!(pool(Some("api.example.com"), "/v1/users"), "api");
        // File order: the host-only route comes before the /static/ one.
        assert_eq!(pool(Some("api.example.com"), "/static/x"), "api");
        assert_eq!(pool(Some("www.example.com"), "/static/x"), "static");
        assert_eq!(pool(None, "/static/never"), "static", "first match wins");
        assert_eq!(pool(Some("a.example.org"), "/"), "org");
        assert_eq!(
            pool(Some("example.org"), "/"),
            "default",
            "a wildcard needs a label"
        );
        assert_eq!(pool(Some("b.a.example.org"), "/"), "org");
        assert_eq!(
            pool(None, "/v2/users"),
            "default",
            "no host matches no host route"
        );
        assert_eq!(pool(Some("other"), "/"), "default");
    }

    #[test]
    fn methods_exact_paths_and_path_regexes_all_hold_for_a_route_to_match() {
        let snap = routed(
            r#"
  { path = "/robots.txt", pool = "exact" },
  { path_prefix = "/api/", methods = ["POST", "PUT"], pool = "writes" },
  { path_regex = "^/users/[0-9]+/avatar$", methods = ["GET"], pool = "avatars" },
  { path_regex = "\\.(css|js)$", pool = "assets" },
"#,
        );
        let router = &snap.routers["web"];
        let pool = |method: &str, path: &str| pick(router, None, method, path, &[], None);
        assert_eq!(pool("GET", "/robots.txt"), "exact");
        assert_eq!(pool("GET", "/robots.txt2"), "default", "path is exact");
        assert_eq!(pool("GET", "/robots"), "default");
        assert_eq!(pool("POST", "/api/x"), "writes");
        assert_eq!(pool("PUT", "/api/x"), "writes");
        assert_eq!(pool("GET", "/api/x"), "default", "a method not listed");
        assert_eq!(
            pool("post", "/api/x"),
            "default",
            "methods are case-sensitive"
        );
        assert_eq!(pool("GET", "/users/42/avatar"), "avatars");
        assert_eq!(pool("GET", "/users/42/avatar/x"), "default", "anchored");
        assert_eq!(pool("HEAD", "/users/42/avatar"), "default");
        assert_eq!(
            pool("GET", "/a/b/site.css"),
            "assets",
            "unanchored: anywhere"
        );
        assert_eq!(pool("DELETE", "/x.js"), "assets");
        assert_eq!(pool("GET", "/x.json"), "default");
    }

    #[test]
    fn header_and_query_matchers_equal_exist_are_absent_or_match_a_regex() {
        let snap = routed(
            r#"
  { headers = { "X-Canary" = "1", "X-Debug" = false }, pool = "canary" },
  { headers = { "user-agent" = { regex = "^curl/" } }, pool = "curl" },
  { query = { "version" = "2" }, pool = "v2" },
  { query = { "preview" = true }, pool = "preview" },
"#,
        );
        let router = &snap.routers["web"];
        assert!(
            router.relays_fields,
            "a header matcher reads the lines as they are"
        );
        let pool = |fields: &[(&str, &str)], query| pick(router, None, "GET", "/", fields, query);
        assert_eq!(pool(&[("x-canary", "1")], None), "canary");
        assert_eq!(
            pool(&[("x-canary", "0"), ("x-canary", "1")], None),
            "canary",
            "any line"
        );
        assert_eq!(
            pool(&[("x-canary", "1"), ("x-debug", "")], None),
            "default",
            "absent"
        );
        assert_eq!(
            pool(&[("x-canary", "10")], None),
            "default",
            "the whole value"
        );
        assert_eq!(pool(&[("User-Agent", "curl/8.5")], None), "curl");
        assert_eq!(pool(&[("User-Agent", "Mozilla curl/8")], None), "default");
        assert_eq!(pool(&[], Some("version=2")), "v2");
        assert_eq!(pool(&[], Some("a=b&version=%32")), "v2", "percent-decoded");
        assert_eq!(pool(&[], Some("version=20")), "default");
        assert_eq!(
            pool(&[], Some("Version=2")),
            "default",
            "names are case-sensitive"
        );
        assert_eq!(
            pool(&[], Some("preview")),
            "preview",
            "present without a value"
        );
        assert_eq!(pool(&[], Some("preview=no")), "preview");
        assert_eq!(pool(&[], None), "default");
    }
}
