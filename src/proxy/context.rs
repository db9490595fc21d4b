//! What one client connection's requests share: the listener and its settings, the peer's
//! address, the connection's phase and shutdown signal, and the upstream connection that
//! belongs to this client alone (`send_proxy`). Built once per connection by `listener`,
//! read by every step of the request path.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;

use crate::config::ListenerConfig;
use crate::net::ConnPhase;
use crate::state::Live;
use crate::upstream::Sender;

/// Facts about one downstream connection, shared by its requests.
#[derive(Debug)]
pub struct ConnCtx {
    pub live: Live,
    pub listener: Arc<str>,
    /// The listener's settings when the connection was accepted.
    pub config: Arc<ListenerConfig>,
    pub peer: SocketAddr,
    /// The client's address as it goes into `X-Forwarded-For`.
    pub forwarded_for: HeaderValue,
    /// The address the client connected to (from a PROXY header when there was one).
    pub local: SocketAddr,
    /// Where upgrade tunnels are spawned, so a graceful shutdown waits for them too.
    pub tracker: tokio_util::task::TaskTracker,
    /// Busy while a request is served, idle after: the socket's read timers follow it.
    pub phase: ConnPhase,
    /// This client connection's own upstream connection, for pools with `send_proxy`
    /// (made on first use: most connections never need one).
    pub private: std::sync::OnceLock<Arc<PrivateConn>>,
    /// Fires when the connection must close after its current request (shutdown).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The listener's counters.
    pub stats: Arc<crate::stats::ListenerStats>,
}

impl ConnCtx {
    /// `"http"` or `"https"`, for `X-Forwarded-Proto`: the listener's TLS settings say.
    pub fn proto(&self) -> &'static str {
        if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// The phase lives in the context: one allocation per connection, not two.
impl crate::net::HasPhase for ConnCtx {
    fn phase(&self) -> &ConnPhase {
        &self.phase
    }
}

/// An upstream connection that belongs to one client connection: with `send_proxy` its
/// PROXY header names that client, so it must never carry another client's requests. It is
/// kept for the client's next request to the same backend, and closes with the client.
#[derive(Default)]
pub struct PrivateConn(std::sync::Mutex<Option<(SocketAddr, Sender)>>);

impl PrivateConn {
    pub(super) fn take(&self, addr: SocketAddr) -> Option<Sender> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (a, mut s) = slot.take()?;
        (a == addr && s.is_usable()).then_some(s)
    }

    pub(super) fn put(&self, addr: SocketAddr, sender: Sender) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((addr, sender));
    }
}

impl std::fmt::Debug for PrivateConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateConn")
    }
}
