//! Upgraded connections: after the backend answers `101 Switching Protocols` (or a 2xx to
//! an allowed `CONNECT`), bytes are copied both ways until either side closes.
//!
//! Only the protocols a route allows (`upgrade`, default `["websocket"]`) are passed on; any
//! other `Upgrade` token is removed, so a client cannot open a raw tunnel to a backend and
//! talk past ballast's routing.
//!
//! The tunnel holds the backend's [`Lease`], so an open WebSocket counts as in flight for
//! least_conn and for draining, and it ends when a drain timeout cuts the backend.

use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::balance::backend::Lease;

/// The `Upgrade` value to forward for a request that asks for a protocol switch
/// (`Connection: upgrade` plus `Upgrade: ...`): the requested protocols that `allowed` lists
/// (lower-case names; a token's `/version` suffix is ignored for the match), in the client's
/// order. `None` when nothing allowed was asked for.
pub fn requested_upgrade(headers: &HeaderMap, allowed: &[String]) -> Option<HeaderValue> {
    if allowed.is_empty() {
        return None;
    }
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    let mut kept = String::new();
    let offered = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim);
    for token in offered {
        let name = token.split('/').next().unwrap_or(token);
        if allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            if !kept.is_empty() {
                kept.push_str(", ");
            }
            kept.push_str(token);
        }
    }
    HeaderValue::from_str(&kept)
        .ok()
        .filter(|_| !kept.is_empty())
}

/// Puts back the two fields that carry a protocol switch across the proxy.
pub fn restore_upgrade_headers(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// A client stream that can carry a tunnel once ballast's own HTTP/1.1 server hands it over.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientIo for T {}

/// Where the client's side of a tunnel comes from: hyper's server (HTTP/2) resolves an
/// `OnUpgrade`; ballast's own HTTP/1.1 server sends its stream once the response head is
/// written ([`OwnUpgrade`]).
pub enum ClientUpgrade {
    Hyper(OnUpgrade),
    Own(SwitchedStream),
    /// An HTTP/2 WebSocket made an HTTP/1.1 Upgrade (`websocket_h2`): the backend's
    /// `Sec-WebSocket-Accept` must be this.
    H2WebSocket(OnUpgrade, HeaderValue),
}

/// Put in a request's extensions by the listener (only for a request that asks to switch
/// protocols): the receiving end of its stream once switched.
#[derive(Clone)]
pub struct OwnUpgrade(pub Arc<Mutex<Option<SwitchedStream>>>);

/// The receiving end of a client stream handed over after a protocol switch.
pub type SwitchedStream = oneshot::Receiver<Box<dyn ClientIo>>;

impl ClientUpgrade {
    /// The client side of `req`'s upgrade, whichever server read it.
    pub fn of<B>(req: &mut http::Request<B>) -> ClientUpgrade {
        let own = req
            .extensions_mut()
            .remove::<OwnUpgrade>()
            .and_then(|o| o.0.lock().unwrap_or_else(|p| p.into_inner()).take());
        match own {
            Some(rx) => ClientUpgrade::Own(rx),
            None => ClientUpgrade::Hyper(hyper::upgrade::on(req)),
        }
    }

    /// For an HTTP/2 WebSocket: the `Sec-WebSocket-Accept` the backend must send.
    pub fn expected_accept(&self) -> Option<&HeaderValue> {
        match self {
            ClientUpgrade::H2WebSocket(_, accept) => Some(accept),
            _ => None,
        }
    }

    async fn resolve(self) -> Result<Box<dyn ClientIo>, String> {
        match self {
            ClientUpgrade::Hyper(on) | ClientUpgrade::H2WebSocket(on, _) => match on.await {
                Ok(up) => Ok(Box::new(TokioIo::new(up))),
                Err(e) => Err(e.to_string()),
            },
            ClientUpgrade::Own(rx) => rx
                .await
                .map_err(|_| "client connection ended before switching".to_string()),
        }
    }
}

/// The backend's side of a tunnel: hyper's HTTP/2 client resolves an `OnUpgrade`;
/// ballast's own HTTP/1.1 client hands over its stream with the bytes read past the head.
pub enum BackendUpgrade {
    Hyper(OnUpgrade),
    Own(Box<dyn ClientIo>),
    /// The response did not leave a stream to switch to.
    Missing,
}

impl BackendUpgrade {
    async fn resolve(self) -> Result<Box<dyn ClientIo>, String> {
        match self {
            BackendUpgrade::Hyper(on) => match on.await {
                Ok(up) => Ok(Box::new(TokioIo::new(up))),
                Err(e) => Err(e.to_string()),
            },
            BackendUpgrade::Own(io) => Ok(io),
            BackendUpgrade::Missing => Err("the backend's connection was not handed over".into()),
        }
    }
}

/// Copies between the client's and the backend's upgraded connections until one side
/// closes or the backend's connections are cut. The task runs on `tracker`, so a graceful
/// shutdown waits for open tunnels (up to its timeout) like for any other connection.
pub fn spawn(client: ClientUpgrade, backend: BackendUpgrade, lease: Lease, tracker: &TaskTracker) {
    tracker.spawn(async move {
        let b = lease.backend();
        let cut = b.cut_token();
        let backend = backend.resolve();
        let (mut client, upstream) = match tokio::try_join!(client.resolve(), backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(backend = %b.label, error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut upstream = upstream;
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                if let Err(e) = r {
                    tracing::debug!(backend = %b.label, error = %e, "upgraded connection ended with an error");
                }
            }
            _ = cut.cancelled() => {
                tracing::debug!(backend = %b.label, "upgraded connection cut");
            }
        }
        drop(lease);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(connection: &str, upgrade: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_str(connection).unwrap(),
        );
        h.insert(header::UPGRADE, HeaderValue::from_str(upgrade).unwrap());
        h
    }

    #[test]
    fn only_allowed_protocols_are_kept() {
        let ws = vec!["websocket".to_string()];
        assert_eq!(
            requested_upgrade(&offer("Upgrade", "WebSocket"), &ws).unwrap(),
            "WebSocket"
        );
        assert_eq!(requested_upgrade(&offer("upgrade", "h2c"), &ws), None);
        assert_eq!(
            requested_upgrade(&offer("keep-alive, upgrade", "h2c, websocket"), &ws).unwrap(),
            "websocket"
        );
        assert_eq!(
            requested_upgrade(&offer("keep-alive", "websocket"), &ws),
            None
        );
        assert_eq!(requested_upgrade(&offer("upgrade", "websocket"), &[]), None);
        let foo = vec!["foo".to_string()];
        assert_eq!(
            requested_upgrade(&offer("upgrade", "foo/2, bar"), &foo).unwrap(),
            "foo/2"
        );
    }
}
