//! Sticky sessions by a cookie ballast inserts (HAProxy's `cookie SERVERID insert`):
//! `sticky = { cookie = "lb", ttl = "1h" }` on a pool.
//!
//! The cookie names a backend by an opaque id: a stable hash of the pool's name and the
//! backend's address, in 16 hex digits. Stable, so every ballast replica and every restart
//! reads the same id the same way, and a backend keeps its id while other backends come and
//! go (a compose service scaled from 5 to 7 replicas moves no session; `hash` on a cookie
//! would move about 2 in 7). Opaque, so the cookie does not show the backend's address. A
//! value that names no backend of the pool (forged, stale, garbage) counts as no cookie.

use std::net::SocketAddr;

use http::HeaderValue;

use super::policy::hash_key;
use crate::config::StickyConfig;

/// The id of the backend at `addr` in pool `pool`.
pub fn id(pool: &str, addr: SocketAddr) -> u64 {
    let mut key = Vec::with_capacity(pool.len() + 48);
    key.extend_from_slice(pool.as_bytes());
    key.push(b'/');
    key.extend_from_slice(addr.to_string().as_bytes());
    hash_key(&key)
}

/// An id read from a cookie's value: exactly 16 lower-case hex digits.
pub fn decode(value: &str) -> Option<u64> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if value.len() != 16 || !value.bytes().all(lower_hex) {
        return None;
    }
    u64::from_str_radix(value, 16).ok()
}

/// `Set-Cookie` for the backend with `id`: `HttpOnly` and `SameSite=Lax` always, `Secure`
/// on a TLS listener, `Max-Age` when the config has a `ttl`.
pub fn set_cookie(config: &StickyConfig, id: u64, secure: bool) -> Option<HeaderValue> {
    let mut v = format!(
        "{}={id:016x}; Path=/; HttpOnly; SameSite=Lax",
        config.cookie
    );
    if secure {
        v.push_str("; Secure");
    }
    if let Some(ttl) = config.ttl {
        v.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
    }
    HeaderValue::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_opaque_and_read_back_only_as_written() {
        let a: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let b: SocketAddr = "10.0.0.6:8080".parse().unwrap();
        assert_eq!(id("app", a), id("app", a));
        assert_ne!(id("app", a), id("app", b));
        assert_ne!(id("app", a), id("api", a), "per pool");
        let config = StickyConfig {
            cookie: "lb".into(),
            ttl: Some(std::time::Duration::from_secs(3600)),
            pass_cookie: false,
        };
        let cookie = set_cookie(&config, id("app", a), true).unwrap();
        let cookie = cookie.to_str().unwrap();
        assert!(!cookie.contains("10.0.0.5"), "{cookie}");
        assert!(
            cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age=3600"),
            "{cookie}"
        );
        let value = &cookie["lb=".len()..cookie.find(';').unwrap()];
        assert_eq!(decode(value), Some(id("app", a)));
        for bad in [
            "",
            "0",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "0123456789abcdef0",
            " 123456789abcdef",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
        }
        let session = StickyConfig {
            ttl: None,
            ..config
        };
        let plain = set_cookie(&session, 1, false).unwrap();
        assert_eq!(plain, "lb=0000000000000001; Path=/; HttpOnly; SameSite=Lax");
    }
}
