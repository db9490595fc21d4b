//! Response bodies on their way to the client: the backend's (which holds the request's
//! lease and gives the upstream connection back once read to the end), and the wrapper
//! that ends the request's account when the client side is done with it.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::Either;
use hyper::body::{Body, Frame, SizeHint};

use super::attempt::log_backend_failure;
use super::Inner;
use crate::balance::backend::Lease;
use crate::balance::Pool;
use crate::proxy::abandoned;
use crate::proxy::compress::Encoder;
use crate::proxy::context::Extras;
use crate::proxy::error::ProxyError;
use crate::proxy::exchange::{BytesIn, Exchange};
use crate::proxy::headers;
use crate::request_body::BodyWatch;
use crate::upstream::{ConnSettings, UpstreamError, UpstreamIncoming};

/// A response body on its way to the client. Once hyper has finished with it (dropped it),
/// the request is over: the connection is idle and its keep-alive timer runs, and the
/// request is counted and logged (see [`Exchange`]).
pub struct ProxyBody {
    pub(super) inner: Inner,
    pub(super) ex: Box<Exchange>,
    /// Compresses the body on its way (`compress`); `None` for most responses.
    pub(super) encoder: Option<Box<Encoder>>,
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Bodies that are empty by framing (HEAD, 204, 304) are never polled to the end.
        if self.encoder.is_none() && self.inner.is_end_stream() {
            self.ex.complete = true;
        }
    }
}

pub(super) fn upstream_response(
    resp: Response<UpstreamIncoming>,
    lease: Lease,
    (settings, home): (ConnSettings, Option<(Arc<Extras>, IpAddr)>),
    pool: &Pool,
    cuts: u64,
    watch: Option<Arc<BodyWatch>>,
) -> Response<Inner> {
    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers);
    let body = UpstreamResponseBody {
        inner: Some(body),
        settings,
        home,
        lease,
        pool: Arc::clone(&pool.name),
        passive: pool.config.passive,
        cuts,
        watch,
    };
    Response::from_parts(parts, Either::Left(body))
}

/// A backend's response body on its way to the client. It holds the [`Lease`], so the
/// request counts as in flight until the body is done, and gives the upstream connection back
/// to the pool once the body has been read to the end.
pub struct UpstreamResponseBody {
    /// `None` once handed to [`abandoned`] to be finished. It carries the connection, and
    /// gives it back once read to the end.
    inner: Option<UpstreamIncoming>,
    settings: ConnSettings,
    /// Where the connection goes back to: the client's own slot (`send_proxy`, for the
    /// client its PROXY header names), else the backend's pool.
    home: Option<(Arc<Extras>, IpAddr)>,
    lease: Lease,
    /// For reporting a body the backend broke off: it counts against the backend.
    pool: Arc<str>,
    passive: crate::config::PassiveConfig,
    /// The backend's cut count when the response began, to tell our drain cut apart.
    cuts: u64,
    /// A request body still streaming when the response began: if it fails, the upstream
    /// connection (and so this body) breaks by the client's fault.
    watch: Option<Arc<BodyWatch>>,
}

impl UpstreamResponseBody {
    /// See [`ProxyBody::take_fields`].
    pub(super) fn take_fields(&mut self) -> Option<crate::h1::PassFields> {
        self.inner.as_mut()?.take_fields()
    }

    fn release_conn(&mut self) {
        if let Some(sender) = self.inner.as_mut().and_then(UpstreamIncoming::take_conn) {
            let backend = self.lease.backend();
            match &self.home {
                Some((slot, client)) => slot.put(backend.addr, *client, sender),
                None => backend
                    .conns
                    .put(sender, &self.settings, backend.in_flight()),
            }
        }
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release_conn(),
            Poll::Ready(Some(Err(e))) => {
                // A broken body leaves the connection unusable. A client that leaves just stops
                // polling, so unless our own drain timeout cut it or the client's streamed
                // request body failed under it, the backend broke it: a truncated response.
                // (The body keeps no connection after an error: nothing goes back.)
                let backend = this.lease.backend();
                let client_fault = this.watch.as_ref().is_some_and(|w| w.fault().is_some());
                if backend.cuts() == this.cuts && !client_fault {
                    let ejected = backend.record_failure(&this.passive);
                    log_backend_failure(
                        &this.pool,
                        &backend.label,
                        "response_truncated",
                        e,
                        ejected,
                        0,
                    );
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl ProxyBody {
    /// The fields of an HTTP/1.1 backend's response, already written as an HTTP/1.1 client
    /// is sent them; the response's map holds only what ballast added. `None` for any
    /// other response (ballast's own, an HTTP/2 backend's, a tunnel's), or once taken.
    pub fn take_fields(&mut self) -> Option<crate::h1::PassFields> {
        match &mut self.inner {
            Either::Left(b) => b.take_fields(),
            Either::Right(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = UpstreamError;

    #[inline]
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        if this.encoder.is_some() {
            return this.poll_encoded(cx);
        }
        this.poll_inner(cx)
    }

    fn is_end_stream(&self) -> bool {
        match &self.encoder {
            None => self.inner.is_end_stream(),
            Some(e) => e.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.encoder {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

impl ProxyBody {
    /// The next frame of the body as it came, with the exchange's account kept.
    #[inline]
    fn poll_inner(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = self;
        let polled = match &mut this.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx),
            Either::Right(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.ex.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.ex.complete = true,
            Poll::Ready(Some(Err(_))) => {
                // The client's own streamed body failing breaks the response too: its fault.
                let fault = match &this.ex.bytes_in {
                    BytesIn::Streamed(w) => w.fault(),
                    BytesIn::Known(_) => None,
                };
                this.ex.termination =
                    fault.map_or("response_truncated", |f| ProxyError::Client(f).reason());
            }
            Poll::Pending => {}
        }
        polled
    }

    /// The next frame of the compressed body. The encoder takes the body's data as it
    /// comes; what it has produced is sent when there is some, and flushed whenever the
    /// body has nothing new, so a slow stream is not held back. Trailers follow the end of
    /// the compressed data.
    fn poll_encoded(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        loop {
            match self.encoder.as_deref_mut() {
                None => return Poll::Ready(None),
                Some(e) if e.is_done() => {
                    return Poll::Ready(e.take_trailers().map(|t| Ok(Frame::trailers(t))));
                }
                Some(_) => {}
            }
            // `ex.bytes_out` counts what the client was sent: the compressed bytes.
            let polled = self.inner_frame(cx);
            let Some(encoder) = self.encoder.as_deref_mut() else {
                return Poll::Ready(None);
            };
            let step = match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => encoder.push(cx, &data),
                    Err(frame) => {
                        encoder.keep_trailers(frame.into_trailers().ok());
                        encoder.finish(cx)
                    }
                },
                Poll::Ready(None) => encoder.finish(cx),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Pending => match encoder.flush(cx) {
                    Ok(out) if out.is_empty() => return Poll::Pending,
                    other => other,
                },
            };
            match step {
                Ok(out) if out.is_empty() => {}
                Ok(out) => {
                    self.ex.bytes_out += out.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Err(e) => {
                    // ballast's own failure, not the backend's: its own reason, so the
                    // pool's `response_truncated` count stays the backend's alone.
                    self.ex.termination = "compress_failed";
                    let pool = self.ex.pool.as_ref().map_or("-", |p| &*p.name);
                    tracing::warn!(pool = %pool, reason = %"compress_failed", error = %e, "compressing a response failed: the response is cut");
                    return Poll::Ready(Some(Err(UpstreamError::Compress(e))));
                }
            }
        }
    }

    /// [`Self::poll_inner`] without counting the bytes (the compressed ones count).
    fn inner_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let before = self.ex.bytes_out;
        let polled = self.poll_inner(cx);
        self.ex.bytes_out = before;
        polled
    }
}

impl Drop for UpstreamResponseBody {
    fn drop(&mut self) {
        // Bodies that are empty by framing (HEAD, 204, 304) may never be polled.
        if self.is_end_stream() {
            self.release_conn();
            return;
        }
        // The client left mid-body: a small rest is read in the background so the
        // connection can be kept, unless it is this client's own or its upload broke.
        let upload_done = self
            .watch
            .as_ref()
            .is_none_or(|w| w.read_all() && w.fault().is_none());
        if self.home.is_some() || !upload_done {
            return;
        }
        if let Some(body) = self.inner.take() {
            let home = abandoned::Home {
                backend: Arc::clone(self.lease.backend()),
                settings: self.settings,
                cuts: self.cuts,
            };
            home.finish_body(body);
        }
    }
}
