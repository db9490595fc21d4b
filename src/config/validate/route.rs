//! A route's table: its matchers, its access lists and its action (a pool, a redirect, or a
//! response of ballast's own), each problem reported at its place.

use super::*;

impl Validator<'_> {
    pub(super) fn route(
        &mut self,
        route: &Spanned<file::FileRoute>,
        rkey: &str,
        l: &file::FileListener,
        pool_names: &HashMap<&str, ()>,
    ) -> RouteConfig {
        let r = route.get_ref();
        let host = r
            .host
            .as_ref()
            .and_then(|h| self.host_match(h, &format!("{rkey}.host")));
        let path_prefix = r.path_prefix.as_ref().and_then(|p| {
            if p.get_ref().starts_with('/') {
                Some(p.get_ref().clone())
            } else {
                self.push(p.span(), format!("{rkey}.path_prefix: must start with '/'"));
                None
            }
        });
        let path = r.path.as_ref().and_then(|p| {
            if r.path_prefix.is_some() {
                self.push(
                    p.span(),
                    format!("{rkey}: path and path_prefix: choose one"),
                );
                None
            } else if p.get_ref().starts_with('/') {
                Some(p.get_ref().clone())
            } else {
                self.push(p.span(), format!("{rkey}.path: must start with '/'"));
                None
            }
        });
        let path_regex = r
            .path_regex
            .as_ref()
            .and_then(|p| self.pattern(p.get_ref(), p.span(), &format!("{rkey}.path_regex")));
        let headers = r.headers.as_ref().map_or_else(Vec::new, |h| {
            h.iter()
                .filter_map(|(name, m)| {
                    let key = format!("{rkey}.headers.{}", name.get_ref());
                    let header = match http::HeaderName::from_bytes(name.get_ref().as_bytes()) {
                        Ok(n) => n,
                        Err(_) => {
                            self.push(name.span(), format!("{key}: not a header name"));
                            return None;
                        }
                    };
                    Some((header, self.field_match(m, &key)?))
                })
                .collect()
        });
        let query = r.query.as_ref().map_or_else(Vec::new, |q| {
            q.iter()
                .filter_map(|(name, m)| {
                    let key = format!("{rkey}.query.{}", name.get_ref());
                    Some((name.get_ref().clone(), self.field_match(m, &key)?))
                })
                .collect()
        });
        let methods = r.methods.as_ref().and_then(|m| self.methods(m, rkey));
        let upgrade = r
            .upgrade
            .as_ref()
            .map(|u| self.upgrade_list(u, &format!("{rkey}.upgrade")));
        let strip = r.strip_prefix.as_ref().is_some_and(|v| *v.get_ref());
        let rewrite_prefix = match (&r.rewrite_prefix, strip) {
            (Some(v), true) => {
                self.push(
                    v.span(),
                    format!("{rkey}: strip_prefix and rewrite_prefix: choose one"),
                );
                None
            }
            (Some(v), false) if !v.get_ref().starts_with('/') => {
                self.push(
                    v.span(),
                    format!("{rkey}.rewrite_prefix: must start with '/'"),
                );
                None
            }
            (Some(v), false) => Some(v.get_ref().clone()),
            (None, true) => Some(String::new()),
            (None, false) => None,
        };
        if rewrite_prefix.is_some() && path_prefix.is_none() {
            let span = r
                .rewrite_prefix
                .as_ref()
                .map(|v| v.span())
                .or_else(|| r.strip_prefix.as_ref().map(|v| v.span()))
                .unwrap_or_else(|| route.span());
            self.push(
                span,
                format!("{rkey}: strip_prefix and rewrite_prefix need a path_prefix"),
            );
        }
        let request_headers = r
            .request_headers
            .as_ref()
            .map(|h| self.header_rules(h, &format!("{rkey}.request_headers")));
        let response_headers = r
            .response_headers
            .as_ref()
            .map(|h| self.header_rules(h, &format!("{rkey}.response_headers")));
        let rate_limit = r
            .rate_limit
            .as_ref()
            .and_then(|v| self.rate_limit(v, &format!("{rkey}.rate_limit")));
        let client_cidrs = r
            .client_cidrs
            .as_ref()
            .and_then(|c| self.ranges(c, &format!("{rkey}.client_cidrs")));
        let sni = r.sni.as_ref().and_then(|h| {
            if l.tls.is_none() {
                self.push(
                    h.span(),
                    format!(
                        "{rkey}.sni: only on a listener with tls (a plain client sends no SNI)"
                    ),
                );
                return None;
            }
            self.host_match(h, &format!("{rkey}.sni"))
        });
        let access = self.access(r.allow_from.as_ref(), r.deny_from.as_ref(), rkey);
        let action = self.action(route, rkey, l, pool_names);
        if r.pool.is_none() && (r.redirect.is_some() || r.respond.is_some()) {
            // Each key that shapes a forwarded request, at its place where it has one.
            let forward_only = [
                ("upgrade", r.upgrade.as_ref().map(|v| v.span())),
                ("strip_prefix", r.strip_prefix.as_ref().map(|v| v.span())),
                (
                    "rewrite_prefix",
                    r.rewrite_prefix.as_ref().map(|v| v.span()),
                ),
                ("rate_limit", r.rate_limit.as_ref().map(|v| v.span())),
                ("compress", r.compress.as_ref().map(|v| v.span())),
                (
                    "request_headers",
                    r.request_headers.as_ref().map(|_| route.span()),
                ),
                (
                    "response_headers",
                    r.response_headers.as_ref().map(|_| route.span()),
                ),
            ];
            for (field, span) in forward_only {
                if let Some(span) = span {
                    self.push(
                        span,
                        format!("{rkey}.{field}: only for a route with a pool; this one answers by itself"),
                    );
                }
            }
        }
        RouteConfig {
            host,
            path_prefix,
            path,
            path_regex,
            methods,
            headers,
            query,
            client_cidrs,
            sni,
            access,
            action,
            upgrade,
            rewrite_prefix,
            request_headers,
            response_headers,
            rate_limit,
            compress: r
                .compress
                .as_ref()
                .and_then(|c| self.compress(c, &format!("{rkey}.compress"))),
            basic_auth: r
                .basic_auth
                .as_ref()
                .and_then(|a| self.basic_auth(a, &format!("{rkey}.basic_auth"))),
        }
    }

    /// `pool`, `redirect` or `respond`: exactly one.
    fn action(
        &mut self,
        route: &Spanned<file::FileRoute>,
        rkey: &str,
        l: &file::FileListener,
        pool_names: &HashMap<&str, ()>,
    ) -> RouteAction {
        let r = route.get_ref();
        // Stands in for a bad action: the config is refused anyway.
        let fallback = RouteAction::Pool(l.pool.get_ref().clone());
        match (&r.pool, &r.redirect, &r.respond) {
            (Some(pool), None, None) => {
                self.known_pool(pool, &format!("{rkey}.pool"), pool_names);
                RouteAction::Pool(pool.get_ref().clone())
            }
            (None, Some(redirect), None) => self
                .redirect(redirect, &format!("{rkey}.redirect"))
                .map_or(fallback, RouteAction::Redirect),
            (None, None, Some(respond)) => self
                .respond(respond, &format!("{rkey}.respond"))
                .map_or(fallback, RouteAction::Respond),
            (None, None, None) => {
                self.push(
                    route.span(),
                    format!("{rkey}: say what the route does: pool = \"...\", redirect = {{ to = \"...\" }} or respond = {{ status = ... }}"),
                );
                fallback
            }
            _ => {
                self.push(
                    route.span(),
                    format!("{rkey}: pool, redirect and respond: choose one"),
                );
                fallback
            }
        }
    }

    /// `redirect = { to, status }`: `to` split at its variables, each fixed part a valid
    /// field value; the status one of the redirect codes (302 when left out).
    fn redirect(&mut self, v: &Spanned<file::FileRedirect>, key: &str) -> Option<Redirect> {
        let r = v.get_ref();
        let to = match parse_url_template(r.to.get_ref()) {
            Ok(pieces) => Some(pieces),
            Err(why) => {
                self.push(r.to.span(), format!("{key}.to: {why}"));
                None
            }
        };
        let status = match &r.status {
            None => Some(http::StatusCode::FOUND),
            Some(s) if [301, 302, 303, 307, 308].contains(s.get_ref()) => {
                http::StatusCode::from_u16(*s.get_ref()).ok()
            }
            Some(s) => {
                self.push(
                    s.span(),
                    format!(
                        "{key}.status: {} is not a redirect; use 301, 302, 303, 307 or 308",
                        s.get_ref()
                    ),
                );
                None
            }
        };
        Some(Redirect {
            to: to?,
            status: status?,
        })
    }

    /// `respond = { status, body, content_type, headers }`.
    fn respond(&mut self, v: &Spanned<file::FileRespond>, key: &str) -> Option<Respond> {
        let r = v.get_ref();
        let body = r.body.as_ref().map_or("", |b| b.get_ref().as_str());
        let status = match &r.status {
            None => Some(http::StatusCode::OK),
            Some(s) if (200..=599).contains(s.get_ref()) => {
                let status = http::StatusCode::from_u16(*s.get_ref()).ok();
                if matches!(s.get_ref(), 204 | 205 | 304) && !body.is_empty() {
                    self.push(
                        s.span(),
                        format!("{key}: a {} response has no body; remove body", s.get_ref()),
                    );
                }
                status
            }
            Some(s) => {
                self.push(
                    s.span(),
                    format!(
                        "{key}.status: {} is not a final status; use 200 to 599",
                        s.get_ref()
                    ),
                );
                None
            }
        };
        let mut headers = Vec::new();
        let content_type = r.content_type.as_ref().map_or(
            (!body.is_empty()).then_some("text/plain; charset=utf-8"),
            |t| Some(t.get_ref().as_str()),
        );
        if let Some(t) = content_type {
            match http::HeaderValue::from_str(t) {
                Ok(value) => headers.push((http::header::CONTENT_TYPE, value)),
                Err(_) => {
                    let span = r.content_type.as_ref().map_or(v.span(), |t| t.span());
                    self.push(span, format!("{key}.content_type: not a valid field value"));
                }
            }
        }
        for (name, value) in r.headers.iter().flatten() {
            let Some(header) = self.rule_header_name(name, &format!("{key}.headers")) else {
                continue;
            };
            if header == http::header::CONTENT_TYPE {
                self.push(
                    name.span(),
                    format!("{key}.headers: set Content-Type with content_type"),
                );
                continue;
            }
            match http::HeaderValue::from_str(value.get_ref()) {
                Ok(v) => headers.push((header, v)),
                Err(_) => self.push(
                    value.span(),
                    format!("{key}.headers.{}: not a valid field value", name.get_ref()),
                ),
            }
        }
        Some(Respond {
            status: status?,
            body: bytes::Bytes::from(body.to_owned()),
            headers,
        })
    }

    /// `allow_from` and `deny_from` of a listener or a route (`key`).
    pub(super) fn access(
        &mut self,
        allow: Option<&Spanned<Vec<Text>>>,
        deny: Option<&Spanned<Vec<Text>>>,
        key: &str,
    ) -> crate::access::Access {
        crate::access::Access {
            allow: allow.and_then(|a| self.ranges(a, &format!("{key}.allow_from"))),
            deny: deny.and_then(|d| self.ranges(d, &format!("{key}.deny_from"))),
        }
    }

    /// A non-empty list of IP ranges (`key` names it).
    pub(super) fn ranges(
        &mut self,
        list: &Spanned<Vec<Text>>,
        key: &str,
    ) -> Option<crate::access::Ranges> {
        if list.get_ref().is_empty() {
            self.push(
                list.span(),
                format!("{key}: list at least one range, or remove the key"),
            );
            return None;
        }
        let ranges = list
            .get_ref()
            .iter()
            .filter_map(|c| {
                let parsed = crate::access::Ranges::parse_one(c.get_ref());
                if parsed.is_none() {
                    self.push(
                        c.span(),
                        format!("{key}: invalid range {:?}: write e.g. \"10.0.0.0/8\", \"2001:db8::/32\" or \"127.0.0.1\"", c.get_ref()),
                    );
                }
                parsed
            })
            .collect();
        Some(crate::access::Ranges::new(ranges))
    }

    /// A route's regular expression, compiled once here. Its size is bounded, so a config
    /// cannot make one that takes much memory to build.
    fn pattern(&mut self, source: &str, span: Range<usize>, key: &str) -> Option<Pattern> {
        match regex::RegexBuilder::new(source)
            .size_limit(PATTERN_SIZE_LIMIT)
            .build()
        {
            Ok(re) => Some(Pattern(re)),
            Err(e) => {
                // The regex crate's message spans several lines (the pattern, a caret, the
                // reason); one line reads better after FILE:LINE:COL.
                let reason = e.to_string();
                let reason = reason
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid")
                    .trim_start_matches("error: ")
                    .to_string();
                self.push(span, format!("{key}: invalid regular expression: {reason}"));
                None
            }
        }
    }

    /// One `headers` or `query` entry's matcher.
    fn field_match(&mut self, m: &Spanned<FileFieldMatch>, key: &str) -> Option<FieldMatch> {
        Some(match m.get_ref() {
            FileFieldMatch::Equals(v) => FieldMatch::Equals(v.clone()),
            FileFieldMatch::Present(true) => FieldMatch::Present,
            FileFieldMatch::Present(false) => FieldMatch::Absent,
            FileFieldMatch::Regex(source) => {
                FieldMatch::Regex(self.pattern(source, m.span(), key)?)
            }
        })
    }

    /// A route's `methods`: tokens, matched case-sensitively. A lower-case standard method
    /// is refused with the upper-case one named: it would never match what clients send.
    fn methods(&mut self, m: &Spanned<Vec<Text>>, rkey: &str) -> Option<Vec<http::Method>> {
        if m.get_ref().is_empty() {
            self.push(
                m.span(),
                format!("{rkey}.methods: list at least one method, or leave the key out"),
            );
            return None;
        }
        let mut methods = Vec::new();
        for t in m.get_ref() {
            let s = t.get_ref();
            let upper = s.to_ascii_uppercase();
            let standard = [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ];
            if *s != upper && standard.contains(&upper.as_str()) {
                self.push(
                    t.span(),
                    format!("{rkey}.methods: {s:?}: methods are case-sensitive; write {upper:?}"),
                );
                continue;
            }
            match http::Method::from_bytes(s.as_bytes()) {
                Ok(method) if !s.is_empty() => methods.push(method),
                _ => self.push(t.span(), format!("{rkey}.methods: invalid method {s:?}")),
            }
        }
        Some(methods)
    }

    /// `host` or `sni`: an exact name or `*.suffix`, no port. `key` names the field.
    pub(super) fn host_match(&mut self, h: &Text, key: &str) -> Option<HostMatch> {
        let s = h.get_ref().to_ascii_lowercase();
        let bad = s.is_empty()
            || s.contains(['/', ':', ' '])
            || s.chars().skip(1).any(|c| c == '*')
            || (s.starts_with('*') && !s.starts_with("*."));
        if bad {
            self.push(
                h.span(),
                format!(
                    "{key}: invalid host {:?}: write an exact name or \"*.example.com\" (no port)",
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
}

/// The redirect of `redirect_https`: the same host and request URI on `https://`, with
/// `port` unless it is 443, as a 308 (which keeps the method and body, unlike 301).
pub(super) fn https_redirect(port: Option<u16>) -> Redirect {
    let mut to = vec![UrlPiece::Text("https://".into()), UrlPiece::Host];
    if let Some(port) = port.filter(|p| *p != 443) {
        to.push(UrlPiece::Text(format!(":{port}")));
    }
    to.push(UrlPiece::RequestUri);
    Redirect {
        to,
        status: http::StatusCode::PERMANENT_REDIRECT,
    }
}

/// A redirect's `to`, split at `${host}`, `${path}`, `${query}` and `${request_uri}`.
fn parse_url_template(text: &str) -> Result<Vec<UrlPiece>, String> {
    let var = |name: &str| match name {
        "host" => Some(UrlPiece::Host),
        "path" => Some(UrlPiece::Path),
        "query" => Some(UrlPiece::Query),
        "request_uri" => Some(UrlPiece::RequestUri),
        _ => None,
    };
    // A Location value: visible ASCII only (a URL percent-encodes the rest).
    let fixed = |part: String| {
        if part.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(UrlPiece::Text(part))
        } else {
            Err(format!("{text:?}: a URL has no spaces, control or non-ASCII characters (percent-encode them)"))
        }
    };
    let pieces = split_template(text, "host, path, query, request_uri", var, fixed)?;
    if pieces.is_empty() {
        return Err("empty: write where to send the client".into());
    }
    Ok(pieces)
}
