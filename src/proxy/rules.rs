//! What a route changes in the messages it passes: header rules (`request_headers`,
//! `response_headers`), the path prefix (`strip_prefix`, `rewrite_prefix`) and the request
//! id (`X-Request-Id`).
//!
//! Everything here is decided by the config (parsed and checked in `config`); a request
//! whose route has no rules never calls into this module, so the rules cost nothing
//! unless they are used.

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};

use crate::config::{HeaderRules, Piece};

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-sent request id passed through; a longer one (or one with bytes outside
/// visible ASCII) is replaced, so a client cannot push kilobytes into every log line.
const MAX_REQUEST_ID: usize = 128;

/// What `${...}` in a header value stands for, for one request.
pub struct Vars<'a> {
    pub client_ip: &'a HeaderValue,
    pub request_id: Option<&'a HeaderValue>,
    pub listener: &'a str,
}

/// The request's id: the client's `X-Request-Id` when it is sane, else a new random one
/// (128 bits, hex, like nginx's `$request_id`), which is put into `headers`.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let mut given = headers.get_all(&REQUEST_ID).iter();
    if let (Some(v), None) = (given.next(), given.next()) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    let mut hex = [0u8; 32];
    let n = fastrand::u128(..);
    for (i, out) in hex.iter_mut().enumerate() {
        let nibble = (n >> (124 - 4 * i)) & 0xf;
        *out = b"0123456789abcdef"[nibble as usize];
    }
    // 32 hex digits are always a valid field value.
    let id = HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(&REQUEST_ID, id.clone());
    id
}

/// Removes the rule's fields, then sets its fields (replacing every field of that name).
pub fn apply(rules: &HeaderRules, headers: &mut HeaderMap, vars: &Vars<'_>) {
    for name in &rules.remove {
        headers.remove(name);
    }
    // Room for the fields set, so a map sized for the request does not grow one at a time.
    headers.reserve(rules.set.len());
    for (name, template) in &rules.set {
        let value = match template.0.as_slice() {
            [Piece::Text(v)] => Some(v.clone()),
            [Piece::ClientIp] => Some(vars.client_ip.clone()),
            pieces => {
                let mut v = bytes::BytesMut::with_capacity(64);
                for p in pieces {
                    match p {
                        Piece::Text(t) => v.extend_from_slice(t.as_bytes()),
                        Piece::ClientIp => v.extend_from_slice(vars.client_ip.as_bytes()),
                        Piece::RequestId => v.extend_from_slice(
                            vars.request_id.map_or(&b"-"[..], |id| id.as_bytes()),
                        ),
                        Piece::Listener => v.extend_from_slice(vars.listener.as_bytes()),
                    }
                }
                // Checked, but not copied again.
                HeaderValue::from_maybe_shared(v.freeze()).ok()
            }
        };
        // Each piece is a valid value on its own (checked at load, or an id and address
        // ballast made), so this only fails for a listener name with odd bytes: skip it.
        if let Some(value) = value {
            headers.insert(name.clone(), value);
        }
    }
}

/// `path` (which starts with `prefix`) with `prefix` replaced by `replacement`, joined with
/// exactly one `/`; `""` as the replacement strips the prefix. Always starts with `/`.
pub fn rewrite_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let rest = path.get(prefix.len()..).unwrap_or("");
    let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
    out.push_str(replacement);
    match (out.ends_with('/'), rest.starts_with('/')) {
        (true, true) => out.push_str(&rest[1..]),
        (false, false) if !rest.is_empty() => {
            out.push('/');
            out.push_str(rest);
        }
        _ => out.push_str(rest),
    }
    if !out.starts_with('/') {
        out.insert(0, '/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stripped_and_rewritten_with_one_slash() {
        for (path, prefix, with, want) in [
            ("/api/users", "/api", "", "/users"),
            ("/api/users", "/api/", "", "/users"),
            ("/api", "/api", "", "/"),
            ("/api/", "/api/", "", "/"),
            ("/api/users", "/api/", "/v2/", "/v2/users"),
            ("/api/users", "/api", "/v2/", "/v2/users"),
            ("/api/users", "/api", "/v2", "/v2/users"),
            ("/api/users", "/api/", "/v2", "/v2/users"),
            ("/api", "/api", "/v2/", "/v2/"),
            ("/apix", "/api", "", "/x"),
        ] {
            assert_eq!(
                rewrite_prefix(path, prefix, with),
                want,
                "{path} {prefix} {with}"
            );
        }
    }

    #[test]
    fn a_sane_request_id_passes_and_a_hostile_one_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert(&REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&mut h), "abc-123");

        let mut h = HeaderMap::new();
        let long = "x".repeat(MAX_REQUEST_ID + 1);
        h.insert(&REQUEST_ID, HeaderValue::from_str(&long).unwrap());
        let id = request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h.get(&REQUEST_ID), Some(&id), "the new id replaces the old");

        let mut h = HeaderMap::new();
        let a = request_id(&mut h);
        let b = request_id(&mut HeaderMap::new());
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }

    #[test]
    fn set_expands_variables_and_remove_goes_first() {
        let rules = HeaderRules {
            remove: vec![HeaderName::from_static("x-debug")],
            set: vec![
                (
                    HeaderName::from_static("x-debug"),
                    crate::config::Template(vec![Piece::Text(HeaderValue::from_static("no"))]),
                ),
                (
                    HeaderName::from_static("x-who"),
                    crate::config::Template(vec![
                        Piece::ClientIp,
                        Piece::Text(HeaderValue::from_static(" ")),
                        Piece::RequestId,
                        Piece::Text(HeaderValue::from_static(" ")),
                        Piece::Listener,
                    ]),
                ),
            ],
        };
        let mut h = HeaderMap::new();
        h.append("x-debug", HeaderValue::from_static("1"));
        h.append("x-debug", HeaderValue::from_static("2"));
        let ip = HeaderValue::from_static("10.0.0.1");
        let id = HeaderValue::from_static("id7");
        apply(
            &rules,
            &mut h,
            &Vars {
                client_ip: &ip,
                request_id: Some(&id),
                listener: "web",
            },
        );
        assert_eq!(h.get_all("x-debug").iter().collect::<Vec<_>>(), ["no"]);
        assert_eq!(h["x-who"], "10.0.0.1 id7 web");
    }
}
