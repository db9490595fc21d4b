//! The client's request body on its way to a backend: buffered or streamed, with a read
//! timeout, a size limit, and a record of whose fault it was when it failed.
//!
//! Why this exists: when the upstream client fails to send a request, its error alone does
//! not say whether the backend broke the connection or the client's body did (bad chunk
//! framing, a body that ends early, a client that stalls or goes away). Blaming the backend for the
//! client's faults ejects healthy backends; one hostile client could empty a pool. So every
//! body failure is first recorded in a shared [`BodyWatch`], and the request path asks it
//! before it counts anything against a backend.
//!
//! [`prepare`] reads up to `request_buffering` bytes before a backend is chosen (nginx's and
//! HAProxy's request buffering): a slow uploader then costs a buffer here, not a worker
//! there, and a buffered body can be re-sent on a retry. Larger bodies stream after the
//! buffered prefix.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// What a client did wrong with its request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientFault {
    #[error("request body is malformed")]
    Malformed,
    #[error("client closed the connection before the request body was complete")]
    Aborted,
    #[error("request body stalled for {0:?}")]
    Timeout(Duration),
    #[error("request body is larger than {0} bytes")]
    TooLarge(u64),
}

/// How a request body may be read.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Longest wait for the next piece of the body.
    pub read_timeout: Duration,
    /// Largest body accepted.
    pub max_size: Option<u64>,
    /// Bytes read before a backend is chosen; 0: stream from the first byte.
    pub buffer: usize,
}

/// Shared between a streamed body (owned by the upstream client) and the request path.
#[derive(Debug, Default)]
pub struct BodyWatch {
    /// Body bytes read from the client so far (for the access log and metrics).
    received: std::sync::atomic::AtomicU64,
    fault: OnceLock<ClientFault>,
    done: OnceLock<()>,
    finished: Notify,
    /// The client's body was read to its end (nothing of it is left on the connection).
    read_all: std::sync::atomic::AtomicBool,
}

impl BodyWatch {
    /// Body bytes read from the client so far.
    pub fn received(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the whole body has been read from the client.
    pub fn read_all(&self) -> bool {
        self.read_all.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The client's fault, if its body failed.
    pub fn fault(&self) -> Option<ClientFault> {
        self.fault.get().copied()
    }

    /// Completes once the whole body has been handed to the backend connection (then the
    /// response timeout starts). Never completes if the body fails.
    pub async fn finished(&self) {
        loop {
            let notified = self.finished.notified();
            if self.done.get().is_some() {
                return;
            }
            notified.await;
        }
    }

    fn fail(&self, fault: ClientFault) -> BodyError {
        let _ = self.fault.set(fault);
        BodyError(fault)
    }

    fn finish(&self) {
        if self.done.set(()).is_ok() {
            self.finished.notify_waiters();
        }
    }
}

/// The error a failed client body gives the upstream client; the cause is in the [`BodyWatch`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(ClientFault);

/// A request body as sent upstream.
pub enum UpstreamBody {
    Empty,
    /// Read completely before sending: can be sent again on a retry.
    /// The data, then the trailers (gRPC and other HTTP/2 clients may send some).
    Full(Option<Bytes>, Option<http::HeaderMap>),
    Stream(ClientBody),
}

impl UpstreamBody {
    /// A copy to send again, when the body is in hand.
    pub fn try_clone(&self) -> Option<UpstreamBody> {
        match self {
            UpstreamBody::Empty => Some(UpstreamBody::Empty),
            UpstreamBody::Full(b, t) => Some(UpstreamBody::Full(b.clone(), t.clone())),
            UpstreamBody::Stream(_) => None,
        }
    }

    /// The watch of a streamed body, which the request path must consult on failure.
    pub fn watch(&self) -> Option<Arc<BodyWatch>> {
        match self {
            UpstreamBody::Stream(s) => Some(Arc::clone(&s.watch)),
            _ => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Full(b, t) => Poll::Ready(match b.take() {
                Some(b) => Some(Ok(Frame::data(b))),
                None => t.take().map(|t| Ok(Frame::trailers(t))),
            }),
            UpstreamBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Full(b, t) => b.is_none() && t.is_none(),
            UpstreamBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Full(b, _) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpstreamBody::Stream(s) => s.size_hint(),
        }
    }
}

/// Reads the body of a request before its backend is chosen, as far as `limits.buffer`
/// allows. A body that fits comes back [`UpstreamBody::Full`]; a longer one streams on after
/// what was read. Fails only for the client's faults; nothing has touched a backend yet.
pub async fn prepare(body: ClientStream, limits: BodyLimits) -> Result<UpstreamBody, ClientFault> {
    if body.is_end_stream() {
        return Ok(UpstreamBody::Empty);
    }
    let declared = body.size_hint().exact();
    if let (Some(len), Some(max)) = (declared, limits.max_size) {
        if len > max {
            return Err(ClientFault::TooLarge(max));
        }
    }
    let mut stream = ClientBody::new(body, limits);
    if declared.is_some_and(|len| len > limits.buffer as u64) || limits.buffer == 0 {
        return Ok(UpstreamBody::Stream(stream));
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    let mut trailers = None;
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut stream).poll_frame(cx)).await {
            None => return Ok(UpstreamBody::Full(Some(buf.freeze()), trailers)),
            Some(Err(BodyError(fault))) => return Err(fault),
            Some(Ok(frame)) => {
                // Trailers end a body. They reach an HTTP/2 backend; an HTTP/1.1 backend gets
                // them only in a chunked body (hyper's rule).
                let data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        continue;
                    }
                };
                buf.extend_from_slice(&data);
                if buf.len() > limits.buffer {
                    stream.prefix = Some(buf.freeze());
                    return Ok(UpstreamBody::Stream(stream));
                }
            }
        }
    }
}

/// A request body as the client's connection delivers it: from hyper's server (HTTP/2, and
/// HTTP/1.1 over TLS) or from ballast's own HTTP/1.1 server ([`crate::h1::server`]). Either
/// way a failure is the client's, classified here.
pub enum ClientStream {
    Hyper(Incoming),
    H1(crate::h1::server::RequestBody),
}

impl ClientStream {
    /// The request's fields as lines, from ballast's HTTP/1.1 server (see
    /// `h1::server::ServerConfig::relay_fields`); `None` when the request's map holds them.
    pub fn take_fields(&mut self) -> Option<crate::h1::RequestFields> {
        match self {
            ClientStream::H1(body) => body.take_fields(),
            ClientStream::Hyper(_) => None,
        }
    }
}

impl Body for ClientStream {
    type Data = Bytes;
    type Error = ClientFault;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientFault>>> {
        match self.get_mut() {
            ClientStream::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| classify(&e)))),
            ClientStream::H1(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|e| classify_h1(&e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientStream::Hyper(b) => b.is_end_stream(),
            ClientStream::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientStream::Hyper(b) => b.size_hint(),
            ClientStream::H1(b) => b.size_hint(),
        }
    }
}

/// The client's body read as a stream: bounded gaps between reads, bounded size, failures
/// recorded in its [`BodyWatch`].
pub struct ClientBody {
    /// Read while buffering, sent first.
    prefix: Option<Bytes>,
    inner: ClientStream,
    limits: BodyLimits,
    received: u64,
    /// Runs while we wait for the client, and only then: time the backend takes to accept
    /// what was already sent is not the client's.
    gap: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    watch: Arc<BodyWatch>,
}

impl ClientBody {
    fn new(inner: ClientStream, limits: BodyLimits) -> ClientBody {
        ClientBody {
            prefix: None,
            inner,
            limits,
            received: 0,
            gap: None,
            waiting: false,
            watch: Arc::default(),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if this.watch.fault().is_some() {
            // Already failed; hyper should not ask again, but never yield data after an error.
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    this.watch
                        .received
                        .store(this.received, std::sync::atomic::Ordering::Relaxed);
                    if let Some(max) = this.limits.max_size.filter(|m| this.received > *m) {
                        return Poll::Ready(Some(Err(this.watch.fail(ClientFault::TooLarge(max)))));
                    }
                }
                this.waiting = false;
                if this.inner.is_end_stream() {
                    // A sized body's last bytes: a client may not ask for the end.
                    this.watch
                        .read_all
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(fault))) => Poll::Ready(Some(Err(this.watch.fail(fault)))),
            Poll::Ready(None) => {
                this.watch
                    .read_all
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                this.watch.finish();
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timeout = this.limits.read_timeout;
                let gap = match &mut this.gap {
                    Some(gap) => {
                        if !this.waiting {
                            gap.as_mut().reset(Instant::now() + timeout);
                        }
                        gap
                    }
                    None => this.gap.insert(Box::pin(tokio::time::sleep(timeout))),
                };
                this.waiting = true;
                match gap.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(this.watch.fail(ClientFault::Timeout(timeout)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(p) = &self.prefix {
            let len = p.len() as u64;
            // Upper first: `set_lower` refuses a lower bound above the upper one.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(len));
            }
            hint.set_lower(hint.lower().saturating_add(len));
        }
        hint
    }
}

/// The same for ballast's own server: bad framing, or a connection that ended early or
/// failed under the read.
fn classify_h1(e: &crate::h1::server::RequestBodyError) -> ClientFault {
    use crate::h1::server::RequestBodyError;
    match e {
        RequestBodyError::Framing(crate::h1::BodyError::Incomplete) => ClientFault::Aborted,
        RequestBodyError::Framing(_) => ClientFault::Malformed,
        RequestBodyError::Io(io) => match io.kind() {
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                ClientFault::Malformed
            }
            _ => ClientFault::Aborted,
        },
    }
}

/// Whose fault a failed body read was: hyper reports both bad framing and an early end as
/// a body error; the I/O error inside tells them apart.
fn classify(e: &hyper::Error) -> ClientFault {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
                    ClientFault::Malformed
                }
                _ => ClientFault::Aborted,
            };
        }
        source = s.source();
    }
    if e.is_parse() {
        ClientFault::Malformed
    } else {
        ClientFault::Aborted
    }
}
