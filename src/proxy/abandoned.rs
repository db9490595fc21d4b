//! Exchanges whose client went away: finished in the background, within bounds, so that the
//! backend connection goes back to the pool instead of being closed.
//!
//! A client that hangs up while its request is at a backend (a browser navigating away, a
//! load generator stopping) makes hyper drop the request's future, or the response body.
//! Dropping either closes the backend connection: hyper cannot tell the backend to stop, so
//! it gives the connection up. The next request then pays a new connection (a TCP, perhaps a
//! TLS handshake) and the backend sees a reset. HAProxy by default lets such a response
//! finish and keeps the connection; so does ballast, for responses that are cheap to finish:
//! at most [`FINISH_BYTES`] left to read within [`FINISH_TIME`]. Anything bigger or slower is
//! closed as before.
//!
//! Only pooled HTTP/1.1 connections whose request was in hand (no client body still
//! streaming) are finished; an HTTP/2 stream is cancelled by dropping it without harm to the
//! connection. Nothing here blames the backend: a failure while finishing just closes the
//! connection. The finishing request still counts as in flight (a new [`Lease`]), so
//! least-connections sees the backend's real load.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Body;

use crate::balance::backend::{Backend, Lease};
use crate::upstream::{ConnSettings, SendResult, Sender, Sending, UpstreamIncoming};

/// The most response body read and thrown away to keep one backend connection.
pub const FINISH_BYTES: u64 = 256 * 1024;
/// How long a response whose client left may take to finish (head and body together).
pub const FINISH_TIME: Duration = Duration::from_secs(5);

/// Where a finished connection goes back to, and what tells that it must not.
pub struct Home {
    pub backend: Arc<Backend>,
    pub settings: ConnSettings,
    /// The backend's cut count when the request was sent: a cut since (drain timeout,
    /// removal) means the connection is not to be kept.
    pub cuts: u64,
}

impl Home {
    /// Finishes `body` and returns its connection to the backend's pool, in a task of its
    /// own. Does nothing (the connection closes) when the rest of the body is known to be
    /// large, or it holds no pooled HTTP/1.1 connection (an HTTP/2 stream, a failed body).
    pub fn finish_body(self, body: UpstreamIncoming) {
        if body.size_hint().lower() > FINISH_BYTES || !body.holds_h1_conn() {
            return;
        }
        self.spawn(async move { Some(body) });
    }

    fn spawn<F>(self, head: F)
    where
        F: Future<Output = Option<UpstreamIncoming>> + Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let lease = Lease::new(Arc::clone(&self.backend));
        runtime.spawn(async move {
            let finished = tokio::time::timeout(FINISH_TIME, async {
                let mut body = head.await?;
                let mut read = 0u64;
                while let Some(frame) = body.frame().await {
                    let frame = frame.ok()?;
                    if let Some(data) = frame.data_ref() {
                        read += data.len() as u64;
                        if read > FINISH_BYTES {
                            return None;
                        }
                    }
                }
                body.take_conn()
            })
            .await;
            if let Ok(Some(sender)) = finished {
                let backend = lease.backend();
                if backend.cuts() == self.cuts && !backend.is_draining() {
                    backend.conns.put(sender, &self.settings, backend.in_flight());
                    tracing::debug!(backend = %backend.label, "kept a backend connection after its client left");
                }
            }
        });
    }
}

/// A request on its way to a backend, up to its response head. It owns the connection, so
/// that if it is dropped unfinished (the client left) it can go on in the background.
pub struct InFlight {
    sending: Option<Sending>,
    /// `None`: dropping an unfinished request closes its connection.
    home: Option<Home>,
}

impl InFlight {
    /// Sends `req` on `sender`. `home` says where the connection may be finished into;
    /// `None` when it must not be (a streamed body, a connection private to this client).
    pub fn send(sender: Sender, out: crate::upstream::Outgoing, home: Option<Home>) -> InFlight {
        let home = home.filter(|_| matches!(sender, Sender::H1(_)));
        InFlight {
            sending: Some(sender.send_outgoing(out)),
            home,
        }
    }

    /// Gives up on the request: dropping it now closes the connection (a response timeout).
    pub fn abandon(&mut self) {
        self.home = None;
    }
}

impl Future for InFlight {
    /// Polling again after it resolved is a caller's bug, never a network condition: it
    /// stays pending.
    type Output = SendResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(sending) = self.sending.as_mut() else {
            return Poll::Pending;
        };
        let result = std::task::ready!(Pin::new(sending).poll(cx));
        self.sending = None;
        Poll::Ready(result)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let (Some(sending), Some(home)) = (self.sending.take(), self.home.take()) {
            home.spawn(async move {
                let resp = sending.await.ok()?;
                // A 101 or other upgrade has no body to finish and no connection to keep.
                if resp.status().is_informational() {
                    return None;
                }
                let body = resp.into_body();
                (body.size_hint().lower() <= FINISH_BYTES).then_some(body)
            });
        }
    }
}
