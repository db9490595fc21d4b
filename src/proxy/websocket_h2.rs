//! WebSocket over HTTP/2 (RFC 8441). A browser that already holds an HTTP/2 connection to
//! the host opens a WebSocket as an extended CONNECT stream (`:protocol = websocket`)
//! instead of a new HTTP/1.1 connection; ballast advertises `SETTINGS_ENABLE_CONNECT_PROTOCOL`
//! on its HTTP/2 listeners for that.
//!
//! Backends keep speaking HTTP/1.1: the request becomes the `GET` with `Upgrade: websocket`
//! and a fresh `Sec-WebSocket-Key` they know, the backend's `101` is checked against that
//! key (a wrong `Sec-WebSocket-Accept` is a 502) and becomes the client's `200`, and the
//! stream and the backend's connection are joined as any tunnel (`tunnel`). The route's
//! `upgrade` list applies as on HTTP/1.1.

use base64::Engine;
use http::header::{HeaderValue, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION};
use http::{Method, Request};
use ring::rand::SecureRandom;

/// What an extended CONNECT asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Extended {
    /// Not an extended CONNECT.
    No,
    /// A WebSocket, now an HTTP/1.1 Upgrade request; the `Sec-WebSocket-Accept` the
    /// backend must answer with.
    WebSocket(HeaderValue),
    /// Another protocol, which ballast cannot carry to an HTTP/1.1 backend.
    Other,
}

/// Turns an HTTP/2 client's WebSocket (extended CONNECT) into the HTTP/1.1 Upgrade request
/// a backend expects; anything else is left as it is.
pub fn translate<B>(req: &mut Request<B>) -> Extended {
    if req.method() != Method::CONNECT {
        return Extended::No;
    }
    let Some(protocol) = req.extensions_mut().remove::<hyper::ext::Protocol>() else {
        return Extended::No;
    };
    if !protocol.as_str().eq_ignore_ascii_case("websocket") {
        return Extended::Other;
    }
    let mut nonce = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut nonce).is_err() {
        return Extended::Other;
    }
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    let accept = accept_for(&key);
    *req.method_mut() = Method::GET;
    let headers = req.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    // The client sent its version (RFC 8441 §5); 13 is the only one there is.
    if !headers.contains_key(SEC_WEBSOCKET_VERSION) {
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    match HeaderValue::from_str(&key) {
        Ok(v) => {
            headers.insert(SEC_WEBSOCKET_KEY, v);
            Extended::WebSocket(accept)
        }
        Err(_) => Extended::Other,
    }
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2).
pub fn accept_for(key: &str) -> HeaderValue {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    let encoded = base64::engine::general_purpose::STANDARD.encode(digest.as_ref());
    // Base64 is always a valid field value.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_value_is_rfc_6455s() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn an_extended_connect_becomes_an_upgrade_and_nothing_else_does() {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("https://example.com/chat")
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .body(())
            .unwrap();
        let Extended::WebSocket(accept) = translate(&mut req) else {
            panic!("not translated");
        };
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert_eq!(req.headers()["sec-websocket-version"], "13");
        let key = req.headers()["sec-websocket-key"].to_str().unwrap();
        assert_eq!(accept, accept_for(key));

        let mut plain = Request::builder()
            .method(Method::CONNECT)
            .uri("example.com:443")
            .body(())
            .unwrap();
        assert_eq!(translate(&mut plain), Extended::No);
        let mut other = Request::builder()
            .method(Method::CONNECT)
            .uri("https://example.com/")
            .extension(hyper::ext::Protocol::from_static("connect-udp"))
            .body(())
            .unwrap();
        assert_eq!(translate(&mut other), Extended::Other);
    }
}
