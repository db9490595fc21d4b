//! Arbitrary header fields through the proxy's header rules: never panics, and no
//! hop-by-hop field survives `remove_hop_by_hop`. The input's first line also goes through
//! `normalize_path`: no panic, and what comes out has no dot-segment left.
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

use ballast::proxy::headers;

fuzz_target!(|data: &[u8]| {
    if let Some(first) = data.split(|b| *b == b'\n').next() {
        if let Ok(Some(path)) = std::str::from_utf8(first).map(headers::normalize_path).unwrap_or(Ok(None)) {
            assert!(path.starts_with('/'));
            assert_eq!(headers::normalize_path(&path), Ok(None), "{path} still has dot-segments");
        }
    }
    let mut map = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        map.append(name, value);
    }
    if let Some(host) = map.get(http::header::HOST).and_then(|h| h.to_str().ok()) {
        let _ = headers::host_without_port(host);
    }
    let _ = headers::cookie(&map, "session");
    headers::remove_hop_by_hop(&mut map);
    for h in ["connection", "keep-alive", "te", "transfer-encoding", "upgrade", "trailer"] {
        assert!(!map.contains_key(h), "{h} survived");
    }
    headers::add_forwarded(&mut map, &headers::client_header(std::net::Ipv4Addr::LOCALHOST.into()), "http");
    assert!(map.contains_key("x-forwarded-for"));
});
