//! An HTTP/1.1 server connection on ballast's own framing: reads request heads, hands each
//! request to a service with a streaming body, writes the response, and repeats while the
//! connection may be kept alive.
//!
//! What it is for (issue 10): a connection holds a read buffer only while a message is in
//! flight (an idle keep-alive connection holds none: no parking step is needed), and the
//! service runs inside the connection's task. It serves HTTP/1.1 on ballast's listeners,
//! plain or TLS (`listener::Conn::serve_own_h1`); `tests/h1_server.rs` also drives it
//! alone, with hyper's client and with raw bytes.
//!
//! Shape of one exchange, all in the caller's task:
//! 1. read until a head parses (`head_timeout` from the first byte, or from the start for a
//!    new connection; `keepalive_timeout` for the wait before a later request's first byte);
//!    a refused head is answered with its status and the connection closed;
//! 2. call the service; meanwhile a feeder reads the request body from the socket into a
//!    one-chunk channel (so a slow service holds at most one read's worth), and the first
//!    poll of the body sends `100 Continue` when the client asked for it;
//! 3. write the response (length, chunked, or until close for an HTTP/1.0 client), still
//!    feeding the request body (a backend may stream its answer while the upload goes on);
//! 4. keep the connection if both sides asked for it, the request body was read to its end
//!    before the response began (if not, the response says `Connection: close`) and
//!    nothing failed; bytes already read past the request (pipelining) are kept.
//!
//! Write stalls are the stream's business (ballast's `TimedStream` bounds them).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    encode, BodyDecoder, BodyError, Framing, Limits, PassFields, Rejection, RequestFields,
    RequestHead,
};

/// The limits and timers of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    pub limits: Limits,
    /// For a request head to arrive in full: from its first byte, or from the connection's
    /// start for its first request.
    pub head_timeout: Duration,
    /// Between the end of a response and the first byte of the next request.
    pub keepalive_timeout: Duration,
    /// How much one read asks for while a message is in flight.
    pub read_size: usize,
    /// Once shutdown begins, how long a connection that has sent nothing yet is still
    /// given for its first request (the client reached a listening socket, so it was never
    /// refused; `head_timeout` bounds it too).
    pub first_request_grace: Duration,
    /// Hand each request's fields to the service as lines (`RequestBody::take_fields`) and
    /// leave the request's map empty, for a service that relays them without a map
    /// (`h1::RequestFields`); otherwise the map holds them, as hyper's server gives them.
    pub relay_fields: bool,
}

/// A stream the server can wait on holding no buffer: `poll_readable` is ready when a read
/// would not block. The default is "ready at once" (the wait then happens inside a read,
/// with the read buffer already reserved); TCP streams wait for readiness.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }
}

impl Transport for tokio::net::TcpStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl Transport for tokio::io::DuplexStream {}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        (**self).poll_readable(cx)
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Ending<IO> {
    /// The client closed, or the connection was not to be kept (either side said close,
    /// an unread request body, shutdown), or the keep-alive wait ran out.
    Closed,
    /// A head was refused and answered with this status.
    Refused(Rejection),
    /// A head did not arrive within `head_timeout` (a partial one is answered 408).
    HeadTimeout,
    /// Protocols switched (101, or 2xx to CONNECT): the stream, with any bytes read past
    /// the request head.
    Upgraded { io: IO, read_ahead: Bytes },
    /// The response body failed mid-way; the connection was closed without completing it.
    ResponseFailed,
    /// Reading or writing the socket failed.
    Io(std::io::Error),
}

/// Why a request body could not be read. Each is the client's doing.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body: {0}")]
    Framing(#[from] BodyError),
    #[error("reading the request body: {0}")]
    Io(std::io::Error),
}

/// A request body read from the client's connection as the service polls it.
#[derive(Debug)]
pub struct RequestBody {
    rx: Option<mpsc::Receiver<Result<Bytes, RequestBodyError>>>,
    /// Told on the first poll, for `Expect: 100-continue`.
    wanted: Option<Arc<Notify>>,
    hint: SizeHint,
    /// The request's fields, with `ServerConfig::relay_fields`, until the service takes them.
    fields: Option<RequestFields>,
}

impl RequestBody {
    fn empty() -> Self {
        RequestBody {
            rx: None,
            wanted: None,
            hint: SizeHint::with_exact(0),
            fields: None,
        }
    }

    /// The request's fields, when the server hands them over as lines (see
    /// `ServerConfig::relay_fields`).
    pub fn fields(&self) -> Option<&RequestFields> {
        self.fields.as_ref()
    }

    /// Takes the request's fields (see [`RequestBody::fields`]).
    pub fn take_fields(&mut self) -> Option<RequestFields> {
        self.fields.take()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        if let Some(wanted) = self.wanted.take() {
            wanted.notify_one();
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let left = self
                    .hint
                    .exact()
                    .map(|n| n.saturating_sub(data.len() as u64));
                if let Some(left) = left {
                    self.hint.set_exact(left);
                    if left == 0 {
                        // A sized body's last bytes: it ends here, so a reader that stops at
                        // the declared length (hyper's client does) sees the end too.
                        self.rx = None;
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.rx = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.rx = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What every connection of one server shares: its limits and timers, and its shutdown
/// signal. One reference in each connection's future, not two.
#[derive(Debug, Clone)]
pub struct Server {
    pub config: ServerConfig,
    /// Closes an idle keep-alive connection at once and makes the current exchange the
    /// last (its response says `Connection: close`); a new connection's first request is
    /// still awaited.
    pub shutdown: CancellationToken,
}

/// What a service answers with: a response, and the fields of a backend's response that
/// it relays already written for an HTTP/1.1 client (see [`PassFields`]). The head sent is
/// the status line, those fields, then the response's map (what the service added), then
/// the framing field.
pub trait Reply {
    type Body: Body<Data = Bytes>;

    fn into_response(self) -> (Response<Self::Body>, Option<PassFields>);
}

/// A response with every field in its map.
impl<B: Body<Data = Bytes>> Reply for Response<B> {
    type Body = B;

    fn into_response(self) -> (Response<B>, Option<PassFields>) {
        (self, None)
    }
}

/// A response and a backend's fields relayed with it.
pub struct Relayed<B> {
    pub response: Response<B>,
    pub fields: Option<PassFields>,
}

impl<B: Body<Data = Bytes>> Reply for Relayed<B> {
    type Body = B;

    fn into_response(self) -> (Response<B>, Option<PassFields>) {
        (self.response, self.fields)
    }
}

/// Serves requests on `io` until the connection ends (see [`Server::shutdown`] for how
/// shutdown ends it).
///
/// Not an `async fn`: one moves its arguments into new locals and keeps both copies in its
/// future, and this future is most of what an idle connection holds.
#[allow(clippy::manual_async_fn)] // see above: the size of the future
pub fn serve<'a, IO, S, F, R>(
    mut io: IO,
    server: &'a Server,
    mut service: S,
) -> impl Future<Output = Ending<IO>> + 'a
where
    IO: Transport + 'a,
    S: FnMut(Request<RequestBody>) -> F + 'a,
    F: Future<Output = R>,
    R: Reply,
{
    async move {
        // Empty (no allocation) whenever nothing is in flight.
        let mut buf = BytesMut::new();
        let mut first = true;
        // Kept for the connection's life: a timer and a shutdown waiter registered anew for
        // each request cost ~350 instructions a request (callgrind).
        let mut waits = pin!(Waits {
            timer: tokio::time::sleep_until(Instant::now() + server.config.head_timeout),
            stop: server.shutdown.cancelled(),
        });
        'requests: loop {
            // The rare endings leave this block as a small `Early`, so no `HeadRead` (a whole
            // head wide) stays in the future across their awaits: held there, it was part of
            // every idle connection's task.
            let early = 'early: {
                let head = match read_head(&mut io, &mut buf, &server.config, first, waits.as_mut())
                    .await
                {
                    HeadRead::Head(head) => head,
                    HeadRead::Closed => return Ending::Closed,
                    HeadRead::Stopped => break 'early Early::Stopped,
                    HeadRead::Io(e) => return Ending::Io(e),
                    HeadRead::TimedOut { partial } => break 'early Early::TimedOut { partial },
                    HeadRead::Refused(rejection) => break 'early Early::Refused(rejection),
                };
                first = false;
                // Boxed: an async fn is as large as its largest state, and the exchange (service,
                // feeder, writer) is several KiB; unboxed, every idle connection would carry it.
                // Written into a box allocated first: `Box::pin(exchange(..))` built the future on
                // the stack and copied all of it (then 13.7 KiB) into the box, every request
                // (callgrind: ~14,000 of 48,700 instructions per proxied request).
                let slot = Box::new_uninit();
                let fut = Box::into_pin(Box::write(
                    slot,
                    exchange(
                        &mut io,
                        &mut buf,
                        head,
                        &server.config,
                        &server.shutdown,
                        &mut service,
                    ),
                ));
                // Only the small `unread` outlives this match: the `Exchange` held across the
                // awaits below took room in every state of this future.
                let unread = match fut.await {
                    Exchange::KeepAlive => {
                        if buf.is_empty() {
                            // Give the buffer back while idle; a pipelined request keeps it.
                            buf = BytesMut::new();
                        }
                        continue 'requests;
                    }
                    Exchange::Close { unread } => unread,
                    Exchange::Upgrade => {
                        return Ending::Upgraded {
                            io,
                            read_ahead: buf.freeze(),
                        }
                    }
                    Exchange::Failed => return Ending::ResponseFailed,
                    Exchange::Io(e) => return Ending::Io(e),
                };
                if io.shutdown().await.is_ok() && unread {
                    // Boxed, as the answers below: a rare path whose state would otherwise
                    // size every idle connection's future.
                    Box::pin(linger(&mut io)).await;
                }
                return Ending::Closed;
            };
            return Box::pin(end_early(io, early)).await;
        }
    }
}

/// How [`serve`] ends before a request reached the service.
enum Early {
    /// Shutdown began while the connection, served before, waited for a request.
    Stopped,
    TimedOut {
        partial: bool,
    },
    Refused(Rejection),
}

/// Answers a head that timed out or was refused, and ends the connection.
async fn end_early<IO: Transport>(mut io: IO, early: Early) -> Ending<IO> {
    match early {
        Early::Stopped => {
            // A request may be on its way as the connection closes: close our side first
            // and read what still comes, so the client sees the close (and resends, as HTTP
            // clients do on a reused connection) rather than a reset.
            if io.shutdown().await.is_ok() {
                linger(&mut io).await;
            }
            Ending::Closed
        }
        Early::TimedOut { partial } => {
            if partial {
                let _ = answer(&mut io, StatusCode::REQUEST_TIMEOUT).await;
            }
            Ending::HeadTimeout
        }
        Early::Refused(rejection) => {
            // A body may follow the refused head: linger so the answer is not reset.
            if answer(&mut io, rejection.status).await.is_ok() {
                linger(&mut io).await;
            }
            Ending::Refused(rejection)
        }
    }
}

// Returned once per request and matched at once; boxing the head would allocate per request.
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(RequestHead),
    Closed,
    /// Shutdown began while the connection, served before, waited for a request.
    Stopped,
    TimedOut {
        partial: bool,
    },
    Refused(Rejection),
    Io(std::io::Error),
}

/// A head is complete only once an empty line follows a line end: without `\n\n` or
/// `\n\r\n` in the buffer there is nothing to parse yet.
fn may_be_complete(buf: &[u8]) -> bool {
    // A head usually arrives whole, its blank line last: no need to scan for it.
    if buf.ends_with(b"\n\r\n") || buf.ends_with(b"\n\n") {
        return true;
    }
    let mut rest = buf;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        rest = &rest[i + 1..];
        match rest {
            [b'\n', ..] | [b'\r', b'\n', ..] => return true,
            _ => {}
        }
    }
    false
}

/// Reads until a request head parses, the connection closes, or a timer or shutdown ends
/// the wait. A hand-written future, not an `async fn`: this is the state an idle connection
/// sleeps in, so its size is part of every idle connection (an async fn keeps its
/// arguments and its locals apart, and its `select!` over async blocks was larger still).
fn read_head<'a, 't, R: Transport>(
    rd: &'a mut R,
    buf: &'a mut BytesMut,
    config: &'a ServerConfig,
    first: bool,
    waits: std::pin::Pin<&'a mut Waits<'t>>,
) -> ReadHead<'a, 't, R> {
    let limit = if first || !buf.is_empty() {
        config.head_timeout
    } else {
        config.keepalive_timeout
    };
    ReadHead {
        rd,
        buf,
        config,
        waits,
        deadline: Instant::now() + limit,
        grace_until: None,
        first,
        unparsed: true,
    }
}

struct ReadHead<'a, 't, R> {
    rd: &'a mut R,
    buf: &'a mut BytesMut,
    config: &'a ServerConfig,
    waits: std::pin::Pin<&'a mut Waits<'t>>,
    deadline: Instant,
    /// Set once shutdown began while a new connection waited for its first byte.
    grace_until: Option<Instant>,
    first: bool,
    /// Bytes arrived since the last parse attempt.
    unparsed: bool,
}

impl<R: Transport> Future for ReadHead<'_, '_, R> {
    type Output = HeadRead;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<HeadRead> {
        let this = self.get_mut();
        let config = this.config;
        let limits = &config.limits;
        loop {
            if std::mem::take(&mut this.unparsed) {
                let buf = &mut *this.buf;
                let window = &buf[..buf.len().min(limits.max_head)];
                if may_be_complete(window) {
                    // Parse from shared memory: the target and field values become slices
                    // of the head (no copy each); what follows the head goes back into
                    // `buf`.
                    let head = buf.split().freeze();
                    match super::parse_request_shared(&head, limits) {
                        Ok(Some((parsed, len))) => {
                            buf.extend_from_slice(&head[len..]);
                            return Poll::Ready(HeadRead::Head(parsed));
                        }
                        Ok(None) => {
                            // Not complete after all (empty lines before the request line).
                            let mut again = BytesMut::with_capacity(head.len() + config.read_size);
                            again.extend_from_slice(&head);
                            *buf = again;
                        }
                        Err(rejection) => return Poll::Ready(HeadRead::Refused(rejection)),
                    }
                } else if buf.len() >= limits.max_head {
                    // Too large (431), or already malformed (400): the parser says which.
                    if let Err(rejection) = super::parse_request(buf, limits) {
                        return Poll::Ready(HeadRead::Refused(rejection));
                    }
                }
            }
            let was_empty = this.buf.is_empty();
            // While nothing of a request has arrived, shutdown ends the wait: at once for a
            // connection that was served before, after `first_request_grace` for a new one.
            let due = match this.grace_until {
                Some(grace) if was_empty => grace.min(this.deadline),
                _ => this.deadline,
            };
            arm(this.waits.as_mut().timer(), due);
            // Biased: a read that is ready wins over a timer or shutdown that is ready too.
            let woke =
                if let Poll::Ready(r) = poll_read_more(this.rd, this.buf, config.read_size, cx) {
                    Woke::Read(r)
                } else if was_empty
                    && this.grace_until.is_none()
                    && this.waits.as_mut().stop().poll(cx).is_ready()
                {
                    if !this.first {
                        Woke::Stop
                    } else {
                        this.grace_until = Some(Instant::now() + config.first_request_grace);
                        // Again, with the grace's timer armed.
                        continue;
                    }
                } else if poll_expire(this.waits.as_mut().timer(), due, cx).is_ready() {
                    Woke::Timer
                } else {
                    return Poll::Pending;
                };
            return Poll::Ready(match woke {
                Woke::Read(Ok(0)) => HeadRead::Closed,
                Woke::Stop => HeadRead::Stopped,
                Woke::Read(Ok(_)) => {
                    if was_empty && !this.first {
                        // The next request began: its head gets `head_timeout` from here.
                        this.deadline = Instant::now() + config.head_timeout;
                    }
                    this.unparsed = true;
                    continue;
                }
                Woke::Read(Err(e)) => HeadRead::Io(e),
                Woke::Timer if was_empty && (!this.first || this.grace_until.is_some()) => {
                    HeadRead::Closed
                }
                Woke::Timer => HeadRead::TimedOut {
                    partial: !was_empty,
                },
            });
        }
    }
}

/// What ended one wait of [`read_head`].
enum Woke {
    Read(std::io::Result<usize>),
    Stop,
    Timer,
}

/// Reads more of a head into `buf`. A buffer with nothing reserved (a connection between
/// requests) waits for readiness first and reserves only then: a reserved buffer costs its
/// first page even unread.
fn poll_read_more<R: Transport>(
    rd: &mut R,
    buf: &mut BytesMut,
    read_size: usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() == 0 {
        std::task::ready!(rd.poll_readable(cx))?;
    }
    buf.reserve(read_size);
    tokio_util::io::poll_read_buf(std::pin::Pin::new(rd), cx, buf)
}

pin_project_lite::pin_project! {
    /// What a connection waits on between requests besides its socket. Owned here and
    /// pinned once in the connection's future (references to the two, held separately,
    /// were 16 bytes more of every idle connection). `timer` is the head or keep-alive deadline; see [`arm`].
    struct Waits<'t> {
        #[pin]
        timer: tokio::time::Sleep,
        #[pin]
        stop: tokio_util::sync::WaitForCancellationFuture<'t>,
    }
}

impl<'t> Waits<'t> {
    fn timer(self: std::pin::Pin<&mut Self>) -> std::pin::Pin<&mut tokio::time::Sleep> {
        self.project().timer
    }

    fn stop(
        self: std::pin::Pin<&mut Self>,
    ) -> std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'t>> {
        self.project().stop
    }
}

/// Sets `timer` for `due`, unless it is set earlier: moving a timer is a timer-wheel update,
/// and keep-alive deadlines only move later, so a busy connection's timer stays put and
/// fires once per keep-alive period ([`poll_expire`] then moves it on) instead of moving with
/// every request.
fn arm(timer: std::pin::Pin<&mut tokio::time::Sleep>, due: Instant) {
    if timer.deadline() > due {
        timer.reset(due);
    }
}

/// Ready at `due`, with `timer` set by [`arm`] for `due` or earlier.
fn poll_expire(
    mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    due: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if timer.deadline() >= due {
            return Poll::Ready(());
        }
        timer.as_mut().reset(due);
    }
}

enum Exchange {
    KeepAlive,
    /// `unread`: the request body was not read to its end.
    Close {
        unread: bool,
    },
    Upgrade,
    Failed,
    Io(std::io::Error),
}

/// The response head to write and what follows from it.
struct Prepared {
    head: Vec<u8>,
    framing: Framing,
    keep: bool,
    tunnel: bool,
}

/// What the request said about its response and connection.
struct Asked {
    method: Method,
    version: Version,
    keep_alive: bool,
    upgrade: bool,
}

async fn exchange<IO, S, F, R>(
    io: &mut IO,
    buf: &mut BytesMut,
    head: RequestHead,
    config: &ServerConfig,
    shutdown: &CancellationToken,
    service: &mut S,
) -> Exchange
where
    IO: Transport,
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = R>,
    R: Reply,
{
    let RequestHead {
        method,
        target,
        version,
        fields,
        framing,
        keep_alive,
        expect_continue,
        upgrade,
    } = head;
    let asked = Asked {
        method: method.clone(),
        version,
        keep_alive,
        upgrade,
    };
    let mut decoder = BodyDecoder::new(framing, config.limits.max_head);
    let body_follows = !decoder.is_done();
    let (body, tx, wanted) = if body_follows {
        let (tx, rx) = mpsc::channel(1);
        let wanted = expect_continue.then(|| Arc::new(Notify::new()));
        let hint = match framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        };
        let body = RequestBody {
            rx: Some(rx),
            wanted: wanted.clone(),
            hint,
            fields: None,
        };
        (body, Some(tx), wanted)
    } else {
        (RequestBody::empty(), None, None)
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = target;
    *req.version_mut() = version;
    if config.relay_fields {
        req.body_mut().fields = Some(fields);
    } else {
        *req.headers_mut() = fields.to_header_map();
    }
    // Each phase below is its own async fn, awaited once: rustc gives a local that lives
    // across two awaits its own room in this future, but lets the states of futures
    // awaited at different points share room. So the service's future (the whole request
    // path, several KiB) and the response writer's overlap instead of adding up.
    if !body_follows {
        let Some(reply) = respond_watching(service, req, io, buf, config.limits.max_head).await
        else {
            return Exchange::Close { unread: false };
        };
        let (response, fields) = reply.into_response();
        let (mut parts, body) = response.into_parts();
        let prepared = prepare(&mut parts, fields.as_ref(), &body, &asked, true, shutdown);
        let written = write_response(io, prepared.head, body, prepared.framing).await;
        return outcome(written, prepared.tunnel, prepared.keep, Some(true));
    }

    // A body follows: a feeder reads it while the service works and while the response
    // is written, so the stream is split between the two.
    let (mut rd, mut wr) = tokio::io::split(&mut *io);
    let mut feed_done = None;
    let mut feeder = pin!(feed(&mut rd, buf, &mut decoder, tx, config.read_size));
    let reply = match respond_feeding(
        service,
        req,
        feeder.as_mut(),
        &mut feed_done,
        &wanted,
        &mut wr,
    )
    .await
    {
        Ok(reply) => reply,
        Err(e) => return Exchange::Io(e),
    };
    let (response, fields) = reply.into_response();
    let (mut parts, body) = response.into_parts();
    // A request body not read to its end by now (it failed, the service dropped it, or the
    // service answered first) ends the connection: this response says so. Keeping the
    // connection would mean reading the rest of an upload nobody wants.
    let prepared = prepare(
        &mut parts,
        fields.as_ref(),
        &body,
        &asked,
        feed_done == Some(true),
        shutdown,
    );
    let written = write_feeding(
        &mut wr,
        prepared.head,
        body,
        prepared.framing,
        feeder,
        &mut feed_done,
    )
    .await;
    outcome(written, prepared.tunnel, prepared.keep, feed_done)
}

/// The service's response to a request without a body, the client watched meanwhile: one
/// that closes gives up its request (`None`; the service is dropped, as hyper's server
/// does), and bytes of a pipelined request are kept for later.
async fn respond_watching<IO, S, F, R>(
    service: &mut S,
    req: Request<RequestBody>,
    io: &mut IO,
    buf: &mut BytesMut,
    max_head: usize,
) -> Option<R>
where
    IO: Transport,
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = R>,
{
    let mut respond = pin!(service(req));
    tokio::select! {
        biased;
        resp = &mut respond => Some(resp),
        gone = watch_client(io, buf, max_head) => {
            if gone {
                return None;
            }
            // A pipelined backlog of a full head: stop watching.
            Some(respond.await)
        }
    }
}

/// The service's response to a request with a body, the body fed to it meanwhile (and
/// `100 Continue` sent once it first asks for the body, if the client expects it).
async fn respond_feeding<W, S, F, R>(
    service: &mut S,
    req: Request<RequestBody>,
    mut feeder: std::pin::Pin<&mut impl Future<Output = bool>>,
    feed_done: &mut Option<bool>,
    wanted: &Option<Arc<Notify>>,
    wr: &mut W,
) -> std::io::Result<R>
where
    W: AsyncWrite + Unpin,
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = R>,
{
    let mut respond = pin!(service(req));
    let mut continue_sent = false;
    loop {
        tokio::select! {
            // The feeder first: a body that ended by the time the response is ready is
            // noted as read, so the connection is kept.
            biased;
            ok = &mut feeder, if feed_done.is_none() => *feed_done = Some(ok),
            resp = &mut respond => return Ok(resp),
            _ = notified(wanted), if !continue_sent && feed_done.is_none() => {
                continue_sent = true;
                wr.write_all(CONTINUE).await?;
                wr.flush().await?;
            }
        }
    }
}

/// Writes the response while the feeder goes on reading the request body.
async fn write_feeding<W, B>(
    wr: &mut W,
    head: Vec<u8>,
    body: B,
    framing: Framing,
    mut feeder: std::pin::Pin<&mut impl Future<Output = bool>>,
    feed_done: &mut Option<bool>,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
{
    let mut writer = pin!(write_response(wr, head, body, framing));
    loop {
        tokio::select! {
            r = &mut writer => return r,
            ok = &mut feeder, if feed_done.is_none() => *feed_done = Some(ok),
        }
    }
}

fn outcome(
    written: Result<(), WriteError>,
    tunnel: bool,
    keep: bool,
    feed_done: Option<bool>,
) -> Exchange {
    match written {
        Err(WriteError::Io(e)) => Exchange::Io(e),
        Err(WriteError::Body) => Exchange::Failed,
        Ok(()) if tunnel => Exchange::Upgrade,
        Ok(()) if keep && feed_done == Some(true) => Exchange::KeepAlive,
        Ok(()) => Exchange::Close {
            unread: feed_done != Some(true),
        },
    }
}

/// Chooses the response's framing and connection fields and encodes its head.
fn prepare<B: Body>(
    parts: &mut http::response::Parts,
    fields: Option<&PassFields>,
    body: &B,
    asked: &Asked,
    request_ok: bool,
    shutdown: &CancellationToken,
) -> Prepared {
    let tunnel = (parts.status == StatusCode::SWITCHING_PROTOCOLS && asked.upgrade)
        || (asked.method == Method::CONNECT && parts.status.is_success());
    let bodiless = asked.method == Method::HEAD
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let framing = if tunnel {
        Framing::Tunnel
    } else if bodiless {
        Framing::Empty
    } else if let Some(n) = body.size_hint().exact() {
        Framing::Length(n)
    } else if asked.version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        Framing::UntilClose
    };
    let mut has_connection = false;
    let says_close = parts.headers.get_all(header::CONNECTION).iter().any(|v| {
        has_connection = true;
        v.as_bytes().eq_ignore_ascii_case(b"close")
    });
    let keep = !tunnel
        && asked.keep_alive
        && request_ok
        && !says_close
        && framing != Framing::UntilClose
        && !shutdown.is_cancelled();
    let headers = &mut parts.headers;
    if !tunnel {
        if !keep {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else if asked.version == Version::HTTP_10 {
            headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        } else if has_connection {
            headers.remove(header::CONNECTION);
        }
    }
    let passed_length = fields.and_then(PassFields::content_length);
    if asked.method == Method::HEAD
        && passed_length.is_none()
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        // What a GET would have carried, as hyper's server does for a sized body.
        if let Some(n) = body.size_hint().exact() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    if !fields.is_some_and(PassFields::has_date) {
        headers.entry(header::DATE).or_insert_with(date);
    }
    let mut head = Vec::with_capacity(256 + fields.map_or(0, |f| f.lines().len()));
    encode::response_head(&mut head, parts.status, fields, headers, framing);
    Prepared {
        head,
        framing,
        keep,
        tunnel,
    }
}

async fn notified(wanted: &Option<Arc<Notify>>) {
    match wanted {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// Reads what the client sends while its request without a body is being served: `true`
/// once it has closed (or its connection failed), `false` once `max` bytes of what follows
/// (pipelined requests) are buffered. Reads into a small buffer on the stack of one poll, so
/// it takes no room in the exchange's future, and a connection whose readiness is stale
/// does not reserve a read buffer for the whole exchange.
async fn watch_client<R: Transport>(rd: &mut R, buf: &mut BytesMut, max: usize) -> bool {
    std::future::poll_fn(|cx| {
        while buf.len() < max {
            if std::task::ready!(rd.poll_readable(cx)).is_err() {
                return Poll::Ready(true);
            }
            let mut chunk = [0u8; 1024];
            let mut chunk = tokio::io::ReadBuf::new(&mut chunk);
            match std::task::ready!(std::pin::Pin::new(&mut *rd).poll_read(cx, &mut chunk)) {
                Ok(()) if !chunk.filled().is_empty() => buf.extend_from_slice(chunk.filled()),
                Ok(()) | Err(_) => return Poll::Ready(true),
            }
        }
        Poll::Ready(false)
    })
    .await
}

/// Reads the request body into the channel; `true` when it was read to its end. Takes the
/// sender: it is dropped at the end, which ends the body for the service.
async fn feed<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    decoder: &mut BodyDecoder,
    tx: Option<mpsc::Sender<Result<Bytes, RequestBodyError>>>,
    read_size: usize,
) -> bool {
    let Some(tx) = tx else { return true };
    loop {
        if buf.is_empty() {
            buf.reserve(read_size);
            match rd.read_buf(buf).await {
                Ok(0) => {
                    let e = decoder
                        .end_of_input()
                        .err()
                        .unwrap_or(BodyError::Incomplete);
                    let _ = tx.send(Err(e.into())).await;
                    return false;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(RequestBodyError::Io(e))).await;
                    return false;
                }
            }
        }
        match decoder.decode(buf) {
            Ok(step) => {
                let data = buf.split_to(step.consumed).freeze().slice(step.data);
                // A service that dropped the body leaves it unread: the connection closes.
                if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                    return false;
                }
                if decoder.is_done() {
                    return true;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return false;
            }
        }
    }
}

enum WriteError {
    Io(std::io::Error),
    Body,
}

async fn write_response<W, B>(
    wr: &mut W,
    head: Vec<u8>,
    body: B,
    framing: Framing,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
{
    if matches!(framing, Framing::Empty | Framing::Tunnel) {
        wr.write_all(&head).await.map_err(WriteError::Io)?;
        // Over TLS a write can leave records in rustls: a flush sends them.
        return wr.flush().await.map_err(WriteError::Io);
    }
    let mut body = pin!(body);
    let mut sent: u64 = 0;
    let mut pending = Some(head);
    loop {
        let frame = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let data = match frame {
            None => break,
            Some(Err(_)) => return Err(WriteError::Body),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Framing::Length(n) = framing {
            if sent > n {
                // More than announced: the client would misread what follows.
                return Err(WriteError::Body);
            }
        }
        let mut out = pending.take().unwrap_or_default();
        if framing == Framing::Chunked {
            encode::chunk_start(&mut out, data.len());
        }
        // Small pieces go out with the head or the chunk line in one write.
        if data.len() <= 4096 {
            out.extend_from_slice(&data);
            if framing == Framing::Chunked {
                out.extend_from_slice(encode::CHUNK_END);
            }
            wr.write_all(&out).await.map_err(WriteError::Io)?;
        } else {
            wr.write_all(&out).await.map_err(WriteError::Io)?;
            wr.write_all(&data).await.map_err(WriteError::Io)?;
            if framing == Framing::Chunked {
                wr.write_all(encode::CHUNK_END)
                    .await
                    .map_err(WriteError::Io)?;
            }
        }
    }
    if let Framing::Length(n) = framing {
        if sent < n {
            return Err(WriteError::Body);
        }
    }
    let mut out = pending.take().unwrap_or_default();
    if framing == Framing::Chunked {
        out.extend_from_slice(encode::LAST_CHUNK);
    }
    if !out.is_empty() {
        wr.write_all(&out).await.map_err(WriteError::Io)?;
    }
    wr.flush().await.map_err(WriteError::Io)
}

/// How long, and how much, [`linger`] reads after ballast closed its side.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// After closing its side with bytes from the client still unread (a refused head, an
/// upload the service did not read), reads and drops what still arrives: closing a socket
/// with unread data sends a reset, and a reset makes the client's kernel discard the answer
/// it has not read yet. Bounded by [`LINGER_TIME`], [`LINGER_BYTES`] or the client's close.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    // On the heap: this rare path must not grow every connection's task.
    let mut sink = vec![0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while left > 0 {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// A response without a body that ends the connection (a refused head, a timeout).
async fn answer<W: AsyncWrite + Unpin>(wr: &mut W, status: StatusCode) -> std::io::Result<()> {
    let mut headers = http::HeaderMap::new();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::DATE, date());
    let mut out = Vec::with_capacity(128);
    encode::response_head(&mut out, status, None, &headers, Framing::Length(0));
    wr.write_all(&out).await?;
    wr.shutdown().await
}

/// The `Date` field (RFC 9110 §6.6.1), formatted once a second per thread.
fn date() -> HeaderValue {
    use std::cell::RefCell;
    use time::macros::format_description;
    thread_local! {
        static CACHE: RefCell<(i64, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let now = time::OffsetDateTime::now_utc();
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != now.unix_timestamp() || cache.1.is_none() {
            let format = format_description!(
                "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
            );
            let value = now
                .format(&format)
                .ok()
                .and_then(|s| HeaderValue::from_str(&s).ok());
            *cache = (now.unix_timestamp(), value);
        }
        cache
            .1
            .clone()
            .unwrap_or(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_may_be_complete_only_after_an_empty_line() {
        assert!(!may_be_complete(b""));
        assert!(!may_be_complete(b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!may_be_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r"));
        assert!(may_be_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(may_be_complete(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(may_be_complete(b"GET / HTTP/1.1\r\n\r\nbody"));
        // Every prefix of a complete head that the parser finds incomplete is said to be
        // possibly incomplete too (never the other way round).
        let raw = b"\r\nGET /x HTTP/1.1\r\nHost: a\nX: 1\r\n\r\n";
        let limits = Limits {
            max_head: 1024,
            max_headers: 8,
        };
        for end in 0..=raw.len() {
            let parsed = crate::h1::parse_request(&raw[..end], &limits);
            if matches!(parsed, Ok(Some(_))) {
                assert!(may_be_complete(&raw[..end]), "{end}");
            }
        }
    }

    #[test]
    fn shared_parsing_slices_the_head_instead_of_copying() {
        let limits = Limits {
            max_head: 1024,
            max_headers: 8,
        };
        let raw = Bytes::from_static(b"GET /p?q HTTP/1.1\r\nHost: a.example\r\nX-A: 1\r\n\r\nrest");
        let (shared, len) = crate::h1::parse_request_shared(&raw, &limits)
            .unwrap()
            .unwrap();
        let (copied, len2) = crate::h1::parse_request(&raw, &limits).unwrap().unwrap();
        assert_eq!(len, len2);
        assert_eq!(
            (shared.target.clone(), shared.fields.to_header_map()),
            (copied.target, copied.fields.to_header_map())
        );
        let host = shared.fields.to_header_map()["host"].as_bytes().as_ptr() as usize;
        let base = raw.as_ptr() as usize;
        assert!(
            (base..base + len).contains(&host),
            "the Host value was copied"
        );
    }
}
