//! An HTTP/1.1 client connection on ballast's own framing, for the requests ballast sends to
//! its backends.
//!
//! Why not hyper's client (issue 24): hyper runs each backend connection in a task of its
//! own and hands every request and response across a channel to it, so a proxied request
//! wakes two tasks per direction and holds hyper's per-connection buffers for the
//! connection's life. Profiles put that task at a third of the instructions of a proxied
//! HTTP/1.1 request. Here nothing runs on its own: the request's task polls the
//! [`Exchange`] (it writes the head and body and reads the response head), and whoever polls
//! the [`ResponseBody`] (the client connection's task, as it writes to the client) reads the
//! rest and keeps a request body that is still streaming moving. An idle connection is its
//! socket and a cancellation token; the read buffer exists only while a response is in
//! flight.
//!
//! What the request path relies on:
//! - A request whose connection failed before any of it was written comes back whole in
//!   [`SendError::take_message`] (when its body was not yet read), so it can go to another
//!   backend whatever its method.
//! - A response may begin before the request body has been sent in full (an early `413`, or
//!   a backend that streams its answer while the upload goes on): the body then keeps the
//!   upload going, and the connection is not reused unless both ended cleanly.
//! - Interim responses (`100 Continue`, `103 Early Hints`) are read and dropped, as hyper's
//!   client does; a `101` or a 2xx to `CONNECT` hands the stream, with any bytes read past
//!   the head, to a tunnel ([`ResponseBody::into_upgraded`]).
//! - The connection's cancellation token (a backend's drain timeout) ends it mid-request.
//! - A connection is reused only when its response was read to the end of its framing,
//!   nothing followed it, both sides allowed keep-alive and the upload completed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{
    encode, parse_response, BodyDecoder, BodyError, Framing, Limits, PassFields, Rejection,
    RequestFields, ResponseFields,
};

/// Request bytes gathered into one write: the head, and body data that fits beside it.
const WRITE_COALESCE: usize = 16 * 1024;

/// What a response's first read asks for (see `Conn::poll_fill`).
const FIRST_READ: usize = 4 * 1024;

/// The limits a backend's responses are read with.
#[derive(Debug, Clone, Copy)]
pub struct ClientConfig {
    /// Response heads (and trailers) larger than this, or with more fields, are refused.
    pub limits: Limits,
    /// How much one read asks for; also the most response data read ahead of its reader.
    pub read_size: usize,
}

/// Why an exchange failed. Which side is to blame is the caller's call: a request body
/// failure is the client's (its cause is recorded where the body was read).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("writing to the backend: {0}")]
    Write(#[source] io::Error),
    #[error("reading from the backend: {0}")]
    Read(#[source] io::Error),
    #[error("backend closed the connection before a complete response head")]
    ClosedBeforeHead,
    #[error("invalid response head: {0}")]
    Head(Rejection),
    #[error("invalid response body: {0}")]
    Body(BodyError),
    #[error("request body failed: {0}")]
    RequestBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("request body did not match its declared length")]
    RequestLength,
    #[error("connection cut by a drain timeout")]
    Cut,
}

/// A connection to a backend, idle between requests.
pub struct Conn<IO> {
    io: IO,
    config: ClientConfig,
    cut: CancellationToken,
    /// Registered once per connection (not per request), on the first wait.
    cut_wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    /// A connection over `io`, ended mid-request when `cut` fires.
    pub fn new(io: IO, cut: CancellationToken, config: ClientConfig) -> Self {
        Conn {
            io,
            config,
            cut,
            cut_wait: None,
        }
    }

    /// Whether an idle connection can carry a request: not cut, and nothing to read (the
    /// backend has not closed it, and sent nothing unasked). Costs no system call while the
    /// runtime has seen no readiness on the socket since the last read that came up empty.
    pub fn is_reusable(&mut self) -> bool {
        if self.cut.is_cancelled() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        // Pending: nothing to read. Anything else (an end, stray bytes, an error) ends it.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Starts sending `req`; the future resolves with the response head.
    pub fn send<B>(self, req: Request<B>) -> Exchange<IO, B>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let head = EncodedHead::new(&parts, &body);
        self.send_encoded(head, body)
    }

    /// Starts sending a request whose head is already encoded (for `body`'s framing).
    pub fn send_encoded<B>(self, head: EncodedHead, body: B) -> Exchange<IO, B>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // The head's own allocation becomes the write buffer when no retry copy shares it
        // (the usual case); the head's bytes stay in its first `head_len` bytes until
        // something is written, which is all a hand-back needs.
        let mut head = head;
        let head_len = head.bytes.len();
        let out = Vec::from(std::mem::take(&mut head.bytes));
        let left = match head.framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Exchange {
            state: Some(Box::new(State {
                upload: Upload {
                    body: Some(body),
                    unread: None,
                    framing: head.framing,
                    left,
                    out,
                    at: 0,
                    big: Bytes::new(),
                    big_chunk_end: false,
                    wrote: false,
                    touched: false,
                    unflushed: false,
                    outcome: None,
                },
                head,
                head_len,
                buf: BytesMut::new(),
                eof: false,
                decoder: BodyDecoder::new(Framing::Empty, 0),
                keep_alive: false,
                tunnel: false,
                fields: None,
                heard: false,
                conn: self,
            })),
        }
    }

    /// Polls the cut token; `true` once it fired. (The wait asks the token first, and
    /// `is_cancelled` takes the token's mutex: asking here too cost 4 locked instructions a
    /// request.)
    fn cut(&mut self, cx: &mut Context<'_>) -> bool {
        let cut = &self.cut;
        let wait = self
            .cut_wait
            .get_or_insert_with(|| Box::pin(cut.clone().cancelled_owned()));
        wait.as_mut().poll(cx).is_ready()
    }

    /// Reads into `buf`; `head`: the response head is still awaited.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        head: bool,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < 1024 {
            // A response's first read asks for `FIRST_READ`: most answers fit in it, and
            // it stays in the allocator's small classes. A `read_size` (16 KiB) block per
            // response is a jemalloc large class; with 64 exchanges in flight its thread
            // cache overflowed and responses took the arena's locked extent path (callgrind,
            // issue 24). A longer head, and a body's reads, ask for the full `read_size`.
            let want = if head && buf.is_empty() {
                FIRST_READ.min(self.config.read_size)
            } else {
                self.config.read_size
            };
            buf.reserve(want);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, buf)
    }
}

/// A request head encoded once for HTTP/1.1, with the body framing it announces. Cloning
/// it shares the bytes: a retry sends the same head again without building it anew (or
/// keeping a copy of the request's `http` parts for the purpose).
#[derive(Debug, Clone)]
pub struct EncodedHead {
    bytes: Bytes,
    method: Method,
    /// The request asked to switch protocols (a 101 is valid only then; CONNECT is told by
    /// its method).
    upgrade: bool,
    framing: Framing,
}

/// A client's request fields to relay as lines (see `h1::RequestFields::write_relayed`),
/// with what ballast adds to them.
#[derive(Debug)]
pub struct RelayedHead<'a> {
    pub fields: RequestFields,
    /// The client's address, as `X-Forwarded-For` carries it.
    pub client: &'a [u8],
    /// `X-Forwarded-Proto`: `http` or `https`.
    pub proto: &'static str,
}

/// The framing field `body` calls for: none, its exact length, or chunked.
fn framing_of<B: Body>(body: &B) -> Framing {
    if body.is_end_stream() {
        Framing::Empty
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else {
        Framing::Chunked
    }
}

impl EncodedHead {
    /// `parts` as an HTTP/1.1 head with the relayed lines of `relayed` for its fields (the
    /// map in `parts` is not read): origin-form target, and the framing field `body` calls
    /// for. CONNECT and upgrades never come this way (`proxy::http::prepare`).
    pub fn relayed<B: Body>(
        parts: &http::request::Parts,
        relayed: &RelayedHead<'_>,
        body: &B,
    ) -> EncodedHead {
        let framing = framing_of(body);
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut out = Vec::with_capacity(512.max(relayed.fields.lines_len() + 256));
        encode::relayed_request_head(&mut out, &parts.method, target, relayed, framing);
        EncodedHead {
            bytes: Bytes::from(out),
            method: parts.method.clone(),
            upgrade: false,
            framing,
        }
    }

    /// `parts` as an HTTP/1.1 head: origin-form target (authority-form for CONNECT), the
    /// fields, and the framing field `body` calls for (none, its exact length, or chunked).
    pub fn new<B: Body>(parts: &http::request::Parts, body: &B) -> EncodedHead {
        let framing = framing_of(body);
        let target = if parts.method == Method::CONNECT {
            parts.uri.authority().map_or("", |a| a.as_str())
        } else {
            parts.uri.path_and_query().map_or("/", |pq| pq.as_str())
        };
        let mut out = Vec::with_capacity(512);
        encode::request_head(&mut out, &parts.method, target, &parts.headers, framing);
        EncodedHead {
            bytes: Bytes::from(out),
            method: parts.method.clone(),
            upgrade: parts.headers.contains_key(http::header::UPGRADE),
            framing,
        }
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The head as written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A request that failed, with the request itself (its head and its untouched body) when
/// none of it reached the backend.
#[derive(Debug)]
pub struct SendError<B> {
    pub error: ClientError,
    pub request: Option<(EncodedHead, B)>,
    /// The connection ended (closed, reset, or a write failed) before the backend sent a
    /// byte of an answer. On a connection that served before, that is the race of a request
    /// sent just as the backend closed the idle connection (or died): it did not answer it.
    pub silent: bool,
}

/// A request on its way, up to its response head.
pub struct Exchange<IO, B> {
    state: Option<Box<State<IO, B>>>,
}

/// One exchange's state, boxed: it moves from the request future into the response body,
/// and lives in neither when idle.
struct State<IO, B> {
    conn: Conn<IO>,
    /// What the request head says (its bytes moved to the upload's buffer).
    head: EncodedHead,
    /// The head's length at the start of the upload's buffer.
    head_len: usize,
    upload: Upload<B>,
    /// Response bytes read and not yet handed on.
    buf: BytesMut,
    eof: bool,
    decoder: BodyDecoder,
    keep_alive: bool,
    tunnel: bool,
    /// The response's fields as a client is sent them, until taken (see
    /// [`ResponseBody::take_fields`]); the response's map then stays empty.
    fields: Option<PassFields>,
    /// Some byte of an answer (an interim one included) has arrived.
    heard: bool,
}

/// The request head and body on their way out.
struct Upload<B> {
    /// `None` once the body has ended (or had none).
    body: Option<B>,
    /// A body that ended without being polled (an empty one): kept to hand back.
    unread: Option<B>,
    framing: Framing,
    /// What a `Length` body still owes.
    left: u64,
    /// Bytes to write, from `at`: the head, chunk lines, small data.
    out: Vec<u8>,
    at: usize,
    /// A large data frame, written after `out` without a copy.
    big: Bytes,
    big_chunk_end: bool,
    /// Some byte was accepted by the socket.
    wrote: bool,
    /// The body has been polled (a request handed back must have all of it).
    touched: bool,
    unflushed: bool,
    /// How the upload ended: `Some(true)` sent in full, `Some(false)` abandoned.
    outcome: Option<bool>,
}

enum UploadError {
    Write(io::Error),
    Body(Box<dyn std::error::Error + Send + Sync>),
    Length,
}

impl<B> Upload<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Writes what is queued and what the body has ready; ready once all is sent.
    fn poll<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), UploadError>> {
        loop {
            // Gather what the body has ready behind what is queued, up to one write's worth.
            let mut body_pending = false;
            while self.big.is_empty() && self.out.len() - self.at < WRITE_COALESCE {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                if body.is_end_stream() {
                    self.finish_body()?;
                    continue;
                }
                self.touched = true;
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => {
                        body_pending = true;
                        break;
                    }
                    Poll::Ready(None) => self.finish_body()?,
                    Poll::Ready(Some(Err(e))) => {
                        self.body = None;
                        return Poll::Ready(Err(UploadError::Body(e.into())));
                    }
                    Poll::Ready(Some(Ok(frame))) => self.queue(frame)?,
                }
            }
            if self.at < self.out.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.out[self.at..]))
                    .map_err(UploadError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(UploadError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.wrote = true;
                self.unflushed = true;
                self.at += n;
                if self.at == self.out.len() {
                    self.out.clear();
                    self.at = 0;
                }
                continue;
            }
            if !self.big.is_empty() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.big))
                    .map_err(UploadError::Write)?;
                if n == 0 {
                    return Poll::Ready(Err(UploadError::Write(io::ErrorKind::WriteZero.into())));
                }
                self.wrote = true;
                self.unflushed = true;
                self.big.advance(n);
                if self.big.is_empty() && self.big_chunk_end {
                    self.big_chunk_end = false;
                    self.out.extend_from_slice(encode::CHUNK_END);
                }
                continue;
            }
            // Everything queued is written: make sure it left (TLS keeps records until a
            // flush), then wait for the body, or be done.
            if self.unflushed {
                ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(UploadError::Write)?;
                self.unflushed = false;
            }
            if self.body.is_none() {
                return Poll::Ready(Ok(()));
            }
            if body_pending {
                return Poll::Pending;
            }
        }
    }

    fn queue(&mut self, frame: Frame<Bytes>) -> Result<(), UploadError> {
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers end the body; only chunked framing can carry them (hyper's rule).
                if let Ok(trailers) = frame.into_trailers() {
                    self.finish_with(Some(&trailers))?;
                }
                return Ok(());
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        let chunked = match self.framing {
            Framing::Length(_) => {
                self.left = self
                    .left
                    .checked_sub(data.len() as u64)
                    .ok_or(UploadError::Length)?;
                false
            }
            Framing::Chunked => {
                encode::chunk_start(&mut self.out, data.len());
                true
            }
            _ => return Err(UploadError::Length),
        };
        if data.len() <= WRITE_COALESCE.saturating_sub(self.out.len() - self.at) {
            self.out.extend_from_slice(&data);
            if chunked {
                self.out.extend_from_slice(encode::CHUNK_END);
            }
        } else {
            self.big = data;
            self.big_chunk_end = chunked;
        }
        Ok(())
    }

    fn finish_body(&mut self) -> Result<(), UploadError> {
        self.finish_with(None)
    }

    fn finish_with(&mut self, trailers: Option<&HeaderMap>) -> Result<(), UploadError> {
        let body = self.body.take();
        if !self.touched {
            self.unread = body;
        }
        match self.framing {
            Framing::Chunked => match trailers {
                Some(t) => encode::last_chunk_with_trailers(&mut self.out, t),
                None => self.out.extend_from_slice(encode::LAST_CHUNK),
            },
            Framing::Length(_) if self.left != 0 => return Err(UploadError::Length),
            _ => {}
        }
        Ok(())
    }
}

impl<IO, B> State<IO, B>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Moves the upload on while it lasts. An error the backend caused while writing only
    /// stops the upload (its answer may already be on the way); a body error is returned.
    fn drive_upload(&mut self, cx: &mut Context<'_>) -> Result<(), ClientError> {
        if self.upload.outcome.is_some() {
            return Ok(());
        }
        let polled = self.upload.poll(&mut self.conn.io, cx);
        match polled {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(())) => {
                self.upload.outcome = Some(true);
                Ok(())
            }
            Poll::Ready(Err(UploadError::Write(e))) => {
                self.upload.outcome = Some(false);
                if self.upload.wrote {
                    tracing::trace!(error = %e, "backend stopped reading the request");
                    Ok(())
                } else {
                    Err(ClientError::Write(e))
                }
            }
            Poll::Ready(Err(UploadError::Body(e))) => {
                self.upload.outcome = Some(false);
                Err(ClientError::RequestBody(e))
            }
            Poll::Ready(Err(UploadError::Length)) => {
                self.upload.outcome = Some(false);
                Err(ClientError::RequestLength)
            }
        }
    }

    /// Reads up to the final response head (interim ones are dropped).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<http::response::Parts, ClientError>> {
        self.drive_upload(cx)?;
        loop {
            if !self.buf.is_empty() {
                let sent = &self.head;
                match parse_response(
                    &self.buf,
                    &self.conn.config.limits,
                    &sent.method,
                    sent.upgrade,
                ) {
                    Ok(Some((head, len))) => {
                        self.buf.advance(len);
                        if head.interim {
                            continue;
                        }
                        let limits = &self.conn.config.limits;
                        self.decoder = BodyDecoder::new(head.framing, limits.max_head);
                        self.keep_alive = head.keep_alive;
                        self.tunnel = head.framing == Framing::Tunnel;
                        let (mut parts, ()) = Response::new(()).into_parts();
                        parts.status = head.status;
                        parts.version = head.version;
                        match head.fields {
                            ResponseFields::Map(map) => parts.headers = map,
                            ResponseFields::Pass(pass) => self.fields = Some(pass),
                        }
                        return Poll::Ready(Ok(parts));
                    }
                    Ok(None) => {}
                    Err(r) => return Poll::Ready(Err(ClientError::Head(r))),
                }
            }
            if self.eof {
                return Poll::Ready(Err(ClientError::ClosedBeforeHead));
            }
            let filled = match self.conn.poll_fill(cx, &mut self.buf, true) {
                Poll::Ready(filled) => filled,
                // The cut is asked only before waiting: a head that is already here is read
                // (a cut then ends the body's next wait), and asking takes two mutexes.
                Poll::Pending if self.conn.cut(cx) => return Poll::Ready(Err(ClientError::Cut)),
                Poll::Pending => return Poll::Pending,
            };
            match filled {
                Ok(0) => self.eof = true,
                Ok(_) => self.heard = true,
                Err(e) => return Poll::Ready(Err(ClientError::Read(e))),
            }
        }
    }

    /// The request, when none of it reached the backend and its body was not read.
    fn hand_back(&mut self) -> Option<(EncodedHead, B)> {
        if self.upload.wrote || self.upload.touched {
            return None;
        }
        let body = self.upload.body.take().or(self.upload.unread.take())?;
        // Nothing was written or queued behind the head: the buffer still starts with it.
        let bytes = Bytes::copy_from_slice(self.upload.out.get(..self.head_len)?);
        let head = EncodedHead {
            bytes,
            ..self.head.clone()
        };
        Some((head, body))
    }

    /// Reads the response body: the next piece of data, or its end.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ClientError>>> {
        loop {
            if self.decoder.is_done() {
                return Poll::Ready(None);
            }
            if !self.buf.is_empty() {
                let decoded = match self.decoder.decode(&self.buf) {
                    Ok(d) => d,
                    Err(e) => return Poll::Ready(Some(Err(ClientError::Body(e)))),
                };
                let piece = self.buf.split_to(decoded.consumed);
                if !decoded.data.is_empty() {
                    return Poll::Ready(Some(Ok(piece.freeze().slice(decoded.data))));
                }
                continue;
            }
            if self.eof {
                return Poll::Ready(match self.decoder.end_of_input() {
                    Ok(()) => None,
                    Err(e) => Some(Err(ClientError::Body(e))),
                });
            }
            if self.conn.cut(cx) {
                return Poll::Ready(Some(Err(ClientError::Cut)));
            }
            // An early response: the upload goes on beside it.
            if let Err(e) = self.drive_upload(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            match ready!(self.conn.poll_fill(cx, &mut self.buf, false)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(ClientError::Read(e)))),
            }
        }
    }

    /// Whether the connection can carry another request now that the response is done.
    fn reusable(&self) -> bool {
        self.decoder.is_done()
            && self.keep_alive
            && !self.tunnel
            && !self.eof
            && self.buf.is_empty()
            && self.upload.outcome == Some(true)
    }
}

impl<IO, B> Future for Exchange<IO, B>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = Result<Response<ResponseBody<IO, B>>, SendError<B>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(state) = self.state.as_mut() else {
            // Polled after it resolved: a caller's bug, never a network condition.
            return Poll::Pending;
        };
        let polled = ready!(state.poll_head(cx));
        let Some(mut state) = self.state.take() else {
            return Poll::Pending;
        };
        Poll::Ready(match polled {
            Ok(parts) => {
                // The upload may have ended while the head was read.
                let _ = state.drive_upload(cx);
                Ok(Response::from_parts(
                    parts,
                    ResponseBody {
                        state: Some(state),
                        ended: false,
                    },
                ))
            }
            Err(error) => Err(SendError {
                request: state.hand_back(),
                silent: !state.heard
                    && matches!(
                        error,
                        ClientError::ClosedBeforeHead
                            | ClientError::Read(_)
                            | ClientError::Write(_)
                    ),
                error,
            }),
        })
    }
}

/// A response body being read from the backend. When it has been read to its end, and the
/// connection can carry another request, [`ResponseBody::take_conn`] gives it back.
pub struct ResponseBody<IO, B> {
    /// `None` once failed or taken apart.
    state: Option<Box<State<IO, B>>>,
    /// Read to its end (not failed) before the state went.
    ended: bool,
}

impl<IO, B> ResponseBody<IO, B>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Whether it still holds its connection (not failed, not taken apart).
    pub fn holds_conn(&self) -> bool {
        self.state.is_some()
    }

    /// The connection, if the response has ended and it can be reused.
    pub fn take_conn(&mut self) -> Option<Conn<IO>> {
        if !self.state.as_ref()?.reusable() {
            return None;
        }
        self.ended = true;
        self.state.take().map(|s| s.conn)
    }

    /// The response's fields, written as an HTTP/1.1 client is sent them. A response carries
    /// its fields here, not in its map, unless it opened a tunnel (101, or a 2xx to
    /// `CONNECT`): that one has every field in its map.
    pub fn take_fields(&mut self) -> Option<PassFields> {
        self.state.as_mut()?.fields.take()
    }

    /// After a `101` (or a 2xx to `CONNECT`): the stream and the bytes read past the head.
    pub fn into_upgraded(mut self) -> Option<(IO, Bytes)> {
        let state = self.state.take().filter(|s| s.tunnel)?;
        let State { conn, buf, .. } = *state;
        Some((conn.io, buf.freeze()))
    }
}

impl<IO, B> Body for ResponseBody<IO, B>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let Some(state) = self.state.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(state.poll_data(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => Poll::Ready(None),
            Some(Err(e)) => {
                self.state = None;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            Some(s) => s.decoder.is_done(),
            None => self.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.state.as_ref().and_then(|s| s.decoder.remaining()) {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
