//! Upgraded connections (WebSocket and any other `Upgrade:` protocol): after the backend
//! answers `101 Switching Protocols`, bytes are copied both ways until either side closes.
//!
//! The tunnel holds the backend's [`Lease`], so an open WebSocket counts as in flight for
//! least_conn and for draining, and it ends when a drain timeout cuts the backend.

use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::balance::backend::Lease;

/// The `Upgrade` value of a request that asks for a protocol switch (`Connection: upgrade`
/// plus `Upgrade: ...`), to be forwarded although both fields are hop-by-hop.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Puts back the two fields that carry a protocol switch across the proxy.
pub fn restore_upgrade_headers(headers: &mut HeaderMap, upgrade: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, upgrade);
}

/// Copies between the client's and the backend's upgraded connections until one side
/// closes or the backend's connections are cut. The task runs on `tracker`, so a graceful
/// shutdown waits for open tunnels (up to its timeout) like for any other connection.
pub fn spawn(client: OnUpgrade, backend: OnUpgrade, lease: Lease, tracker: &TaskTracker) {
    tracker.spawn(async move {
        let b = lease.backend();
        let cut = b.cut_token();
        let (client, upstream) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(backend = %b.label, error = %e, "upgrade did not complete");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
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
