//! What a request is sent on, and what comes back: one type over ballast's own HTTP/1.1
//! client ([`crate::h1::client`]) and hyper's HTTP/2 client, so the request path has one
//! shape for both.
//!
//! HTTP/1.1 connections are owned by the request that uses them: [`Sender::send`] moves the
//! connection into the exchange, the response body carries it, and the body gives it back
//! ([`UpstreamIncoming::take_conn`]) once read to the end. An HTTP/2 [`Sender`] is a handle
//! on the backend's shared connection, whose task hyper runs.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http2, TrySendError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::UpstreamProtocol;
use crate::h1::client::{self, ClientError, EncodedHead, RelayedHead};
use crate::net::TimedStream;
use crate::request_body::UpstreamBody;

/// A backend connection's stream: plain TCP or TLS over it, both with timed writes.
pub enum UpIo {
    Plain(TimedStream),
    /// Boxed: a TLS session is large, and most backends are plain.
    Tls(Box<tokio_rustls::client::TlsStream<TimedStream>>),
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An HTTP/1.1 connection to a backend, idle or about to carry a request.
pub type H1Conn = client::Conn<UpIo>;
type H1Body = client::ResponseBody<UpIo, UpstreamBody>;
type H2Sending = Pin<
    Box<
        dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>> + Send,
    >,
>;

/// A connection to a backend, ready to carry a request.
pub enum Sender {
    H1(H1Conn),
    /// A handle on the backend's shared HTTP/2 connection.
    H2(http2::SendRequest<UpstreamBody>),
}

impl Sender {
    /// Whether it can take a request now: an idle HTTP/1.1 connection the backend has not
    /// closed, an HTTP/2 connection that is open and below its stream limit.
    pub fn is_usable(&mut self) -> bool {
        match self {
            Sender::H1(c) => c.is_reusable(),
            Sender::H2(s) => !s.is_closed() && s.is_ready(),
        }
    }

    /// Sends `req` (see [`Sender::send_outgoing`]).
    pub fn send(self, req: Request<UpstreamBody>) -> Sending {
        match self {
            Sender::H1(conn) => Sending::H1(conn.send(req)),
            Sender::H2(mut s) => Sending::H2(Box::pin(s.try_send_request(req)), Some(s)),
        }
    }

    /// Sends a request made for this pool's protocol. The future owns what it needs (it can
    /// outlive its caller: see `proxy::abandoned`); a request that never reached the wire
    /// comes back in the error.
    pub fn send_outgoing(self, out: Outgoing) -> Sending {
        match (self, out) {
            (Sender::H1(conn), Outgoing::H1(head, body)) => {
                Sending::H1(conn.send_encoded(head, body))
            }
            (sender, Outgoing::H2(req)) => sender.send(req),
            // Never made: a pool's requests and connections share its protocol.
            (Sender::H2(_), out @ Outgoing::H1(..)) => Sending::Refused(Some(SendError {
                error: UpstreamError::Protocol,
                request: Some(Box::new(out)),
                silent: false,
            })),
        }
    }
}

/// A request ready for a pool's protocol. For HTTP/1.1 the head is encoded once: a retry
/// sends the same bytes again, so nothing of the request is copied to keep it.
pub enum Outgoing {
    H1(EncodedHead, UpstreamBody),
    H2(Request<UpstreamBody>),
}

impl Outgoing {
    /// `relayed`: the client's fields as lines, which `req`'s map does not hold (see
    /// `h1::RequestFields`).
    pub fn new(
        req: Request<UpstreamBody>,
        relayed: Option<RelayedHead<'_>>,
        protocol: UpstreamProtocol,
    ) -> Outgoing {
        match (protocol, relayed) {
            (UpstreamProtocol::Http1, None) => {
                let (parts, body) = req.into_parts();
                Outgoing::H1(EncodedHead::new(&parts, &body), body)
            }
            (UpstreamProtocol::Http1, Some(relayed)) => {
                let (parts, body) = req.into_parts();
                Outgoing::H1(EncodedHead::relayed(&parts, &relayed, &body), body)
            }
            (UpstreamProtocol::H2, None) => Outgoing::H2(req),
            // The request path sends lines only to HTTP/1.1 pools (`Router::relays_fields`);
            // should one reach an HTTP/2 pool, it gets the map of what they say.
            (UpstreamProtocol::H2, Some(relayed)) => {
                let mut req = req;
                *req.headers_mut() = relayed.fields.relayed_map(relayed.client, relayed.proto);
                Outgoing::H2(req)
            }
        }
    }

    pub fn method(&self) -> &http::Method {
        match self {
            Outgoing::H1(head, _) => head.method(),
            Outgoing::H2(req) => req.method(),
        }
    }

    pub fn body(&self) -> &UpstreamBody {
        match self {
            Outgoing::H1(_, body) => body,
            Outgoing::H2(req) => req.body(),
        }
    }

    /// A copy to send again, when the body is in hand.
    pub fn try_clone(&self) -> Option<Outgoing> {
        match self {
            Outgoing::H1(head, body) => Some(Outgoing::H1(head.clone(), body.try_clone()?)),
            Outgoing::H2(req) => {
                let mut copy = Request::new(req.body().try_clone()?);
                *copy.method_mut() = req.method().clone();
                *copy.uri_mut() = req.uri().clone();
                *copy.version_mut() = req.version();
                *copy.headers_mut() = req.headers().clone();
                Some(Outgoing::H2(copy))
            }
        }
    }
}

/// A request on its way to its response head: see [`Sender::send`].
pub enum Sending {
    H1(client::Exchange<UpIo, UpstreamBody>),
    H2(H2Sending, Option<http2::SendRequest<UpstreamBody>>),
    /// Failed before it started.
    Refused(Option<SendError>),
}

/// The response head of a request, or why there is none.
pub type SendResult = Result<Response<UpstreamIncoming>, SendError>;

impl Future for Sending {
    type Output = SendResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SendResult> {
        match self.get_mut() {
            Sending::H1(exchange) => Pin::new(exchange).poll(cx).map(|r| match r {
                Ok(resp) => Ok(resp.map(UpstreamIncoming::H1)),
                Err(e) => Err(SendError {
                    error: UpstreamError::H1(e.error),
                    request: e
                        .request
                        .map(|(head, body)| Box::new(Outgoing::H1(head, body))),
                    silent: e.silent,
                }),
            }),
            Sending::H2(fut, handle) => fut.as_mut().poll(cx).map(|r| match r {
                Ok(resp) => Ok(resp.map(|b| UpstreamIncoming::H2(b, handle.take()))),
                Err(mut e) => Err(SendError {
                    request: e.take_message().map(|r| Box::new(Outgoing::H2(r))),
                    error: UpstreamError::H2(e.into_error()),
                    silent: false,
                }),
            }),
            Sending::Refused(e) => match e.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

/// A failed send, with the request when it never reached the backend.
pub struct SendError {
    error: UpstreamError,
    /// Boxed: it is rare, and the error travels in every send's result.
    request: Option<Box<Outgoing>>,
    /// See `h1::client::SendError::silent` (HTTP/1.1 only).
    silent: bool,
}

impl SendError {
    /// The request, if it never reached the wire: it may go to another backend.
    pub fn take_message(&mut self) -> Option<Outgoing> {
        self.request.take().map(|r| *r)
    }

    /// The connection ended before the backend sent any byte of an answer.
    pub fn silent(&self) -> bool {
        self.silent
    }

    pub fn into_error(self) -> UpstreamError {
        self.error
    }
}

/// What went wrong on a backend connection.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    H1(ClientError),
    #[error(transparent)]
    H2(hyper::Error),
    #[error("an HTTP/1.1 request reached an HTTP/2 connection")]
    Protocol,
    /// The backend's `101` to a WebSocket from an HTTP/2 client did not carry the
    /// `Sec-WebSocket-Accept` that answers the key ballast sent (`proxy::websocket_h2`).
    #[error("the backend's Sec-WebSocket-Accept does not answer the key ballast sent")]
    WebSocketAccept,
    /// ballast's own compressor failed on the way out (`proxy::compress`).
    #[error("compressing the response: {0}")]
    Compress(std::io::Error),
}

/// A backend's response body.
pub enum UpstreamIncoming {
    H1(H1Body),
    /// The body, and the connection's handle until it is given back.
    H2(Incoming, Option<http2::SendRequest<UpstreamBody>>),
}

impl UpstreamIncoming {
    /// The connection, once the body has been read to its end and the connection can
    /// carry another request (an HTTP/2 handle can at once).
    pub fn take_conn(&mut self) -> Option<Sender> {
        match self {
            UpstreamIncoming::H1(b) => b.take_conn().map(Sender::H1),
            UpstreamIncoming::H2(_, handle) => handle.take().map(Sender::H2),
        }
    }

    /// The fields of an HTTP/1.1 backend's response, written for an HTTP/1.1 client (see
    /// `h1::PassFields`); an HTTP/2 backend's response has them in its map.
    pub fn take_fields(&mut self) -> Option<crate::h1::PassFields> {
        match self {
            UpstreamIncoming::H1(b) => b.take_fields(),
            UpstreamIncoming::H2(..) => None,
        }
    }

    /// Whether this is an HTTP/1.1 body that still holds its connection: only such a one
    /// is worth finishing to keep the connection (a failed one holds none).
    pub fn holds_h1_conn(&self) -> bool {
        matches!(self, UpstreamIncoming::H1(b) if b.holds_conn())
    }
}

impl Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        match self.get_mut() {
            UpstreamIncoming::H1(b) => Pin::new(b).poll_frame(cx).map_err(UpstreamError::H1),
            UpstreamIncoming::H2(b, _) => Pin::new(b).poll_frame(cx).map_err(UpstreamError::H2),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamIncoming::H1(b) => b.is_end_stream(),
            UpstreamIncoming::H2(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamIncoming::H1(b) => b.size_hint(),
            UpstreamIncoming::H2(b, _) => b.size_hint(),
        }
    }
}
