//! Header rewriting between downstream and upstream: pure functions over `HeaderMap`s.
//!
//! Hop-by-hop fields (RFC 9110 §7.6.1: `Connection` and every field it names, plus the
//! classic `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`)
//! describe one connection and are never forwarded; hyper re-frames bodies on each side.
//! `X-Forwarded-For` gets the client address appended, `X-Forwarded-Proto` and
//! `X-Forwarded-Host` are set, and `Host` is kept as the client sent it.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The fixed hop-by-hop fields (besides `Connection` and the fields it names).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop fields, including those listed in `Connection` (but `Host`). Returns whether
/// `Connection` said `close`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // One pass over the names first: most messages carry none, and then nothing is hashed.
    let mut connection = false;
    let mut fixed = false;
    for name in headers.keys() {
        connection |= name == header::CONNECTION;
        fixed |= is_hop_by_hop(name);
    }
    let mut close = false;
    if connection {
        // The values are reference-counted: cloning them frees the map for the removals.
        // Nearly every message has one `Connection` line (`keep-alive` from backends,
        // `close`), so `more` stays empty and unallocated.
        let mut values = headers.get_all(header::CONNECTION).iter();
        let first = values.next().cloned();
        let more: Vec<HeaderValue> = values.cloned().collect();
        headers.remove(header::CONNECTION);
        for value in first.iter().chain(&more) {
            // By bytes: a value with obs-text still names fields by its other elements (a
            // value read as `&str` or not at all let such a line name nothing, where the
            // relayed path, `h1::RequestFields`, left the named fields out).
            for token in value
                .as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
            {
                if token.eq_ignore_ascii_case(b"close") {
                    // An option, not a field name: nothing to look up.
                    close = true;
                } else if !token.is_empty()
                    && !token.eq_ignore_ascii_case(b"keep-alive")
                    && !token.eq_ignore_ascii_case(b"host")
                {
                    // `keep-alive` is in the fixed list below. `Host` stays: a request needs
                    // it end to end (RFC 9110 §7.6.1 forbids naming it), and a client that
                    // names it must not send the backend a request without one. The rest is
                    // looked up by `&str`: lower-cased on the stack, no `HeaderName`
                    // allocated. A name is ASCII: a token that is not UTF-8 names nothing.
                    if let Ok(token) = std::str::from_utf8(token) {
                        headers.remove(token);
                    }
                }
            }
        }
    }
    if fixed {
        for name in [
            &KEEP_ALIVE,
            &PROXY_CONNECTION,
            &header::TE,
            &header::TRAILER,
            &header::TRANSFER_ENCODING,
            &header::UPGRADE,
        ] {
            headers.remove(name);
        }
    }
    close
}

/// Sets the `X-Forwarded-*` fields for a request from `client` received over `proto`
/// (`"http"` or `"https"`).
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, proto: &'static str) {
    // hyper sizes a request's map for the fields it parsed: make room for all three at once,
    // or the inserts below grow (rehash) it twice (callgrind: ~1,600 instructions a request).
    headers.reserve(3);
    // Every line counts (RFC 9110 §5.3: lines of one name are one comma-separated list);
    // taking the first alone lost the rest of a chain sent over several lines.
    let mut prev = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .map(HeaderValue::as_bytes)
        .filter(|v| !v.is_empty())
        .peekable();
    let xff = if prev.peek().is_some() {
        let ip = client.as_bytes();
        let mut v = Vec::with_capacity(64);
        for p in prev {
            v.extend_from_slice(p);
            v.extend_from_slice(b", ");
        }
        v.extend_from_slice(ip);
        HeaderValue::from_bytes(&v)
    } else {
        // The connection's own copy: a reference count, not a formatted address per request.
        Ok(client.clone())
    };
    // Several X-Forwarded-For lines are folded into one, so the chain stays in order.
    if let Ok(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
}

/// A client address as an `X-Forwarded-For` element, made once per connection.
pub fn client_header(ip: IpAddr) -> HeaderValue {
    let text = match ip {
        // Written straight into a stack buffer: `Display` plus `to_string` cost ~1,600
        // instructions, which shows in connection-per-request load (callgrind).
        IpAddr::V4(v4) => {
            let mut out = [0u8; 15]; // 255.255.255.255
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out[len] = b'.';
                    len += 1;
                }
                let mut digits = itoa::Buffer::new();
                let digits = digits.format(octet).as_bytes();
                out[len..len + digits.len()].copy_from_slice(digits);
                len += digits.len();
            }
            HeaderValue::from_bytes(&out[..len])
        }
        IpAddr::V6(_) => HeaderValue::from_str(&ip.to_string()),
    };
    text.unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The request's host name without port, lower-case comparison is left to the router.
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    // By bytes: `rsplit_once` with a `char` pattern cost ~190 instructions a request.
    match host.bytes().rposition(|b| b == b':') {
        Some(colon) if host.as_bytes()[colon + 1..].iter().all(u8::is_ascii_digit) => {
            &host[..colon]
        }
        _ => host,
    }
}

/// A request path that climbs above the root with `..`.
#[derive(Debug, PartialEq, Eq)]
pub struct PathAboveRoot;

/// The path with its dot-segments removed (RFC 3986 §5.2.4), `%2e` counting as a dot, so a
/// route's path prefix means what it says: `/api/../admin` would otherwise be routed to the
/// `/api/` pool and then resolve to `/admin` on its backend. `Ok(None)` when there is
/// nothing to remove (the common case, found without allocating); an error when `..` climbs
/// above the root. Paths not starting with `/` (`*`, CONNECT's authority) are left alone.
pub fn normalize_path(path: &str) -> Result<Option<String>, PathAboveRoot> {
    fn dot(seg: &str) -> bool {
        seg == "." || seg.eq_ignore_ascii_case("%2e")
    }
    fn dot_dot(seg: &str) -> bool {
        matches!(seg.len(), 2 | 4 | 6) && {
            let rest = seg.strip_prefix('.').or_else(|| {
                seg.get(..3)
                    .filter(|p| p.eq_ignore_ascii_case("%2e"))
                    .map(|_| &seg[3..])
            });
            rest.is_some_and(dot)
        }
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(None);
    };
    if !rest.contains(['.', '%']) || !rest.split('/').any(|s| dot(s) || dot_dot(s)) {
        return Ok(None);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        if dot(seg) {
        } else if dot_dot(seg) {
            out.pop().ok_or(PathAboveRoot)?;
        } else {
            out.push(seg);
            continue;
        }
        if last {
            // `/a/b/..` is the directory `/a/`.
            out.push("");
        }
    }
    Ok(Some(format!("/{}", out.join("/"))))
}

/// The value of cookie `name` in the request's `Cookie` fields.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Removes cookie `name` from every `Cookie` line, and a line left empty.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    let named = |pair: &str| pair.trim().split_once('=').is_some_and(|(k, _)| k == name);
    let lines: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    if !lines
        .iter()
        .any(|l| l.to_str().is_ok_and(|l| l.split(';').any(named)))
    {
        return;
    }
    headers.remove(header::COOKIE);
    for line in lines {
        let Ok(text) = line.to_str() else {
            headers.append(header::COOKIE, line);
            continue;
        };
        let kept: Vec<&str> = text
            .split(';')
            .filter(|p| !named(p) && !p.trim().is_empty())
            .map(str::trim)
            .collect();
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            if !v.is_empty() {
                headers.append(header::COOKIE, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_removed_from_every_line_and_the_rest_kept() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; lb=x; b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("lb=y"));
        h.append(header::COOKIE, HeaderValue::from_static("lbx=3"));
        remove_cookie(&mut h, "lb");
        let left: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(left, ["a=1; b=2", "lbx=3"]);
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        remove_cookie(&mut h, "lb");
        assert_eq!(h[header::COOKIE], "a=1", "untouched without the cookie");
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("yes"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn client_header_writes_addresses_as_display_does() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.168.100.7",
            "127.0.10.200",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.1.2.3",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(client_header(ip), ip.to_string().as_str(), "{ip}");
        }
    }

    #[test]
    fn every_connection_line_counts_and_close_is_reported_in_any_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-One"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static(" Close , x-two"),
        );
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        assert!(remove_hop_by_hop(&mut h));
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!remove_hop_by_hop(&mut h));
        assert!(h.is_empty());
    }

    #[test]
    fn appends_to_x_forwarded_for_and_sets_proto_and_host() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(
            header::HOST,
            HeaderValue::from_static("app.example.com:8080"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static(""));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        add_forwarded(&mut h, &client_header("192.0.2.7".parse().unwrap()), "http");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 192.0.2.7");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example.com:8080");
        assert_eq!(h[header::HOST], "app.example.com:8080");
    }

    #[test]
    fn host_port_is_removed() {
        assert_eq!(host_without_port("a.example.com:8080"), "a.example.com");
        assert_eq!(host_without_port("a.example.com"), "a.example.com");
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("a:"), "a");
        assert_eq!(host_without_port("a:8x"), "a:8x");
        assert_eq!(host_without_port("a:b:80"), "a:b");
    }

    #[test]
    fn dot_segments_are_removed_and_may_not_climb_above_the_root() {
        let n = |p: &str| normalize_path(p);
        assert_eq!(n("/api/users"), Ok(None));
        assert_eq!(n("/a.b/c%20d/v1.2"), Ok(None));
        assert_eq!(n("/api/../admin"), Ok(Some("/admin".into())));
        assert_eq!(n("/api/%2e%2E/admin"), Ok(Some("/admin".into())));
        assert_eq!(n("/api/.%2e/admin"), Ok(Some("/admin".into())));
        assert_eq!(n("/a/./b/."), Ok(Some("/a/b/".into())));
        assert_eq!(n("/a/b/.."), Ok(Some("/a/".into())));
        assert_eq!(n("/a/%2E/b"), Ok(Some("/a/b".into())));
        assert_eq!(n("/a//../b"), Ok(Some("/a/b".into())));
        assert_eq!(n("/.."), Err(PathAboveRoot));
        assert_eq!(n("/a/../../etc/passwd"), Err(PathAboveRoot));
        assert_eq!(n("*"), Ok(None));
        assert_eq!(n("/..."), Ok(None));
    }

    #[test]
    fn finds_cookie_values() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; session=abc; b=2"),
        );
        assert_eq!(cookie(&h, "session"), Some("abc"));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
