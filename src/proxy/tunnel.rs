//! Upgraded connections: after the backend answers `101 Switching Protocols` (or a 2xx to
//! an allowed `CONNECT`), bytes are copied both ways until either side closes.
//!
//! Only the protocols a route allows (`upgrade`, default `["websocket"]`) are passed on; any
//! other `Upgrade` token is removed, so a client cannot open a raw tunnel to a backend and
//! talk past ballast's routing.
//!
//! The tunnel holds the backend's [`Lease`], so an open WebSocket counts as in flight for
//! least_conn and for draining, and it ends when a drain timeout cuts the backend: a
//! WebSocket with a close frame 1001 to each side, written between two frames.

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
/// A WebSocket (`websocket`) that a drain timeout cuts gets a close frame 1001 ("going
/// away") on both sides first, where each stands between frames (`FrameCursor`).
pub fn spawn(
    client: ClientUpgrade,
    backend: BackendUpgrade,
    lease: Lease,
    tracker: &TaskTracker,
    websocket: bool,
) {
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
        if websocket {
            websocket_tunnel(client, upstream, &cut, &b.label).await;
            drop(lease);
            return;
        }
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

/// A close frame with status 1001 (RFC 6455 §5.5.1, §7.4.1) as a server sends it.
const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// The same as a client sends it: masked (RFC 6455 §5.3), here with a zero mask, which
/// leaves the payload as it is; the mask's value protects browsers, not proxies.
const CLOSE_GOING_AWAY_MASKED: [u8; 8] = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE9];

/// A WebSocket tunnel: bytes copied both ways, each direction's frame boundaries followed,
/// so that a cut can end it with a close frame instead of in the middle of a message.
async fn websocket_tunnel(
    client: Box<dyn ClientIo>,
    upstream: Box<dyn ClientIo>,
    cut: &tokio_util::sync::CancellationToken,
    label: &str,
) {
    use tokio::io::AsyncWriteExt;
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let (mut to_backend, mut to_client) = (FrameCursor::default(), FrameCursor::default());
    tokio::select! {
        r = async {
            tokio::try_join!(
                pump(&mut client_rd, &mut up_wr, &mut to_backend),
                pump(&mut up_rd, &mut client_wr, &mut to_client),
            )
        } => {
            if let Err(e) = r {
                tracing::debug!(backend = %label, error = %e, "WebSocket ended with an error");
            }
        }
        _ = cut.cancelled() => {
            // Each side gets the close frame only between two frames: written into a
            // frame, it would be part of that frame's payload.
            let said = (to_client.at_boundary(), to_backend.at_boundary());
            let bounded = std::time::Duration::from_secs(1);
            let _ = tokio::time::timeout(bounded, async {
                if said.0 {
                    let _ = client_wr.write_all(&CLOSE_GOING_AWAY).await;
                }
                if said.1 {
                    let _ = up_wr.write_all(&CLOSE_GOING_AWAY_MASKED).await;
                }
                let _ = client_wr.shutdown().await;
                let _ = up_wr.shutdown().await;
            })
            .await;
            tracing::debug!(backend = %label, close_frames = ?said, "WebSocket cut by drain_timeout: closed with 1001");
        }
    }
}

/// Copies `from` to `to` until EOF (then shuts `to` down), telling `cursor` every byte
/// written, and only those: a write cancelled by a cut leaves the cursor true.
async fn pump<R, W>(from: &mut R, to: &mut W, cursor: &mut FrameCursor) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // As `copy_bidirectional`'s: an idle WebSocket holds two of these.
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        let mut at = 0;
        while at < n {
            let written = to.write(&buf[at..n]).await?;
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            cursor.feed(&buf[at..at + written]);
            at += written;
        }
    }
}

/// Where a WebSocket byte stream stands: in a frame's header, in its payload, or between
/// frames (RFC 6455 §5.2). It reads headers only; payloads are counted, not looked at.
#[derive(Debug, Default)]
struct FrameCursor {
    /// The current frame's header so far (at most 14 bytes: 2, an 8-byte length, a mask).
    header: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: u64,
}

impl FrameCursor {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                self.payload_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some(payload) = self.header_done() {
                self.have = 0;
                self.payload_left = payload;
            }
        }
    }

    /// The payload length, once the header is whole.
    fn header_done(&self) -> Option<u64> {
        if self.have < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let len7 = self.header[1] & 0x7f;
        let extended = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if self.have < 2 + extended + if masked { 4 } else { 0 } {
            return None;
        }
        Some(match len7 {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        })
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }
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
    fn the_frame_cursor_follows_frames_across_any_split() {
        // A masked 5-byte text frame, a 300-byte binary frame (16-bit length), and a
        // close frame with an 8-byte length field.
        let mut stream = vec![0x81, 0x85, 1, 2, 3, 4];
        stream.extend_from_slice(b"hello");
        stream.extend_from_slice(&[0x82, 126, 0x01, 0x2c]);
        stream.extend_from_slice(&[7u8; 300]);
        stream.extend_from_slice(&[0x88, 127, 0, 0, 0, 0, 0, 0, 0, 2, 0x03, 0xE8]);
        let boundaries = [0, 11, 315, stream.len()];
        for piece in [1, 2, 3, 7, 64, stream.len()] {
            let mut c = FrameCursor::default();
            let mut fed = 0;
            for chunk in stream.chunks(piece) {
                c.feed(chunk);
                fed += chunk.len();
                assert_eq!(
                    c.at_boundary(),
                    boundaries.contains(&fed),
                    "pieces of {piece}, after {fed} bytes"
                );
            }
        }
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
