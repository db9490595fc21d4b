//! What one client connection's requests share: the listener and its settings, the peer's
//! address, the connection's phase and shutdown signal, and what few connections need (the
//! TLS SNI, the upstream connection of `send_proxy`). Built once per connection by
//! `listener`, read by every step of the request path.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::HeaderValue;

use crate::config::ListenerConfig;
use crate::net::ConnPhase;
use crate::state::Live;
use crate::upstream::Sender;

/// What every connection of one accept loop shares, made once per accept loop (a reload
/// that changes a listener starts a new loop with its own). Apart from [`ConnCtx`] so that
/// each connection holds one pointer to it, not six.
#[derive(Debug)]
pub struct ListenerCtx {
    pub live: Live,
    pub name: Arc<str>,
    /// The listener's settings when the loop started.
    pub config: Arc<ListenerConfig>,
    /// Where upgrade tunnels are spawned, so a graceful shutdown waits for them too.
    pub tracker: tokio_util::task::TaskTracker,
    /// Fires when connections must close after their current request (shutdown).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The listener's counters.
    pub stats: Arc<crate::stats::ListenerStats>,
}

/// Facts about one downstream connection, shared by its requests. Small on purpose: an
/// idle keep-alive connection holds it (`listener::tests` pins its size class).
#[derive(Debug)]
pub struct ConnCtx {
    pub listener: Arc<ListenerCtx>,
    pub peer: SocketAddr,
    /// The client's address as it goes into `X-Forwarded-For`.
    pub forwarded_for: HeaderValue,
    /// The address the client connected to (from a PROXY header when there was one).
    pub local: SocketAddr,
    /// Busy while a request is served, idle after: the socket's read timers follow it.
    pub phase: ConnPhase,
    /// What few connections need: made at the TLS handshake when the client sent SNI, or
    /// on first use by `send_proxy`. One pointer here keeps the context in its size class.
    pub extras: std::sync::OnceLock<Arc<Extras>>,
}

impl ConnCtx {
    /// The listener's settings when the connection was accepted.
    pub fn config(&self) -> &ListenerConfig {
        &self.listener.config
    }

    /// The client's SNI (TLS only).
    pub fn sni(&self) -> Option<&str> {
        self.extras.get().and_then(|e| e.sni.as_deref())
    }

    /// `"http"` or `"https"`, for `X-Forwarded-Proto`: the listener's TLS settings say.
    pub fn proto(&self) -> &'static str {
        if self.config().tls.is_some() {
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

/// What a connection learns after accept, or needs rarely.
#[derive(Default)]
pub struct Extras {
    /// The name the TLS client sent as SNI (a route's `sni` matches it).
    pub sni: Option<Box<str>>,
    /// With `send_proxy`, the upstream connection that belongs to this client alone: its
    /// PROXY header names this client, so it must never carry another client's requests.
    /// It is kept for the client's next request to the same backend, and closes with the
    /// client.
    upstream: std::sync::Mutex<Option<(SocketAddr, IpAddr, Sender)>>,
}

impl Extras {
    pub fn with_sni(sni: Box<str>) -> Extras {
        Extras {
            sni: Some(sni),
            upstream: Default::default(),
        }
    }

    /// The client's own upstream connection to `addr`, if one is kept for `client` (the
    /// address its PROXY header names) and usable.
    pub(super) fn take(&self, addr: SocketAddr, client: IpAddr) -> Option<Sender> {
        let mut slot = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        let (a, c, mut s) = slot.take()?;
        (a == addr && c == client && s.is_usable()).then_some(s)
    }

    pub(super) fn put(&self, addr: SocketAddr, client: IpAddr, sender: Sender) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some((addr, client, sender));
    }
}

impl std::fmt::Debug for Extras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extras").field("sni", &self.sni).finish()
    }
}
