//! A TCP stream with the timeouts that tokio's lacks, for both sides of the proxy.
//!
//! - A write that stays blocked for `write_timeout` fails: a client that stops reading a
//!   response (nginx's `send_timeout`), or a backend that stops reading a request body
//!   (nginx's `proxy_send_timeout`), must not hold a connection forever. The timer exists
//!   only while a write is blocked, so a connection with steady progress never trips it.
//! - On the client side, reads are bounded by the connection's [`ConnPhase`]: an idle
//!   keep-alive connection waits `keepalive_timeout` for the first byte of its next request,
//!   and from that byte (or from the accept) the head must be complete within
//!   `request_header_timeout`. hyper's own header timer starts when the connection goes idle,
//!   so it cannot tell the two apart; that is why the timers live here. A TLS handshake
//!   over this stream happens in the head phase, so the same timer bounds it.
//! - [`limit_unsent`] caps what the kernel queues unsent on a socket.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

const HEAD: u64 = 0;
const BUSY: u64 = 1;
const IDLE: u64 = 2;

/// Where a client connection is between requests: waiting for (the rest of) a request
/// head, serving a request, or idle. The request path moves it to busy and back to idle; the
/// stream moves it from idle to head when a byte arrives. Each change also bumps a counter,
/// so the stream re-arms its timer even when it missed a round trip through busy.
///
/// An HTTP/2 connection carries many requests at once, so it has no single phase: once
/// [`ConnPhase::multiplexed`] it stays busy for the read timers (HTTP/2 frames such as PINGs
/// flow at any time) and instead counts its open requests, for the connection's own idle
/// timeout.
#[derive(Debug, Default)]
pub struct ConnPhase {
    /// `changes << 2 | state`. Only the connection's own task writes it, until multiplexed.
    word: AtomicU64,
    multiplexed: AtomicBool,
    /// Open requests on a multiplexed connection (HTTP/2 caps them far below `u32::MAX`;
    /// 32 bits keep the phase, and the context holding it, a size class smaller).
    active: std::sync::atomic::AtomicU32,
    /// The client asked to close after the current response (`Connection: close`).
    closing: AtomicBool,
}

impl ConnPhase {
    fn set(&self, state: u64) {
        let changes = self.word.load(Ordering::Relaxed) >> 2;
        self.word
            .store(((changes + 1) << 2) | state, Ordering::Relaxed);
    }

    /// The connection speaks HTTP/2 from now on: no more per-request read timers.
    pub fn multiplexed(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
        self.set(BUSY);
    }

    /// A request head was received.
    pub fn busy(&self) {
        if self.multiplexed.load(Ordering::Relaxed) {
            self.active.fetch_add(1, Ordering::Relaxed);
        } else {
            self.set(BUSY);
        }
    }

    /// The response to the current request is complete; the next one may come.
    pub fn idle(&self) {
        if self.multiplexed.load(Ordering::Relaxed) {
            self.active.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.set(IDLE);
        }
    }

    /// The client asked to close after the current response: hyper closes the connection
    /// once it is sent, so no keep-alive timer is armed for it (see `arm_if_idle`).
    pub fn closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn is_multiplexed(&self) -> bool {
        self.multiplexed.load(Ordering::Relaxed)
    }

    /// Requests open on a multiplexed connection.
    pub fn active(&self) -> usize {
        usize::try_from(self.active.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    fn load(&self) -> u64 {
        self.word.load(Ordering::Relaxed)
    }
}

/// Client-side read limits.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
}

/// What holds a connection's [`ConnPhase`]: the connection's context, so the phase needs
/// no allocation of its own.
pub trait HasPhase: Send + Sync + 'static {
    fn phase(&self) -> &ConnPhase;
}

struct ReadTimer {
    owner: std::sync::Arc<dyn HasPhase>,
    limits: ReadLimits,
    /// The phase word the timer was armed for.
    armed_for: u64,
    /// When the current phase's limit runs out (the timer may be set earlier; see
    /// `poll_expired`).
    due: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

pub struct TimedStream {
    inner: TcpStream,
    write_timeout: Duration,
    /// Names the peer and the setting in the timeout error, e.g. `client` / `send_timeout`.
    /// A reference, not the pair: every pooled and client stream carries it.
    write_names: &'static (&'static str, &'static str),
    write_blocked: Option<Pin<Box<Sleep>>>,
    /// Boxed: most streams (backends, TCP clients, HTTP/1.1 clients once past TLS) have
    /// none, and an idle connection's stream should not carry its room.
    read: Option<Box<ReadTimer>>,
}

impl TimedStream {
    /// A backend connection: only writes are timed (reads wait for the response timeout,
    /// which the request path runs).
    pub fn upstream(inner: TcpStream, write_timeout: Duration) -> TimedStream {
        TimedStream {
            inner,
            write_timeout,
            write_names: &("backend", "response_timeout"),
            write_blocked: None,
            read: None,
        }
    }

    /// A client connection of a TCP listener: only writes are timed (idle connections are
    /// the TCP proxy's business).
    pub fn tcp_client(inner: TcpStream, write_timeout: Duration) -> TimedStream {
        TimedStream {
            write_names: &("client", "send_timeout"),
            ..TimedStream::upstream(inner, write_timeout)
        }
    }

    /// A client connection, its reads bounded by the phase `owner` holds and `limits`.
    pub fn downstream(
        inner: TcpStream,
        write_timeout: Duration,
        owner: std::sync::Arc<dyn HasPhase>,
        limits: ReadLimits,
    ) -> TimedStream {
        TimedStream {
            read: Some(Box::new(ReadTimer {
                owner,
                limits,
                armed_for: u64::MAX,
                due: Instant::now(),
                timer: None,
            })),
            write_names: &("client", "send_timeout"),
            ..TimedStream::upstream(inner, write_timeout)
        }
    }

    /// Stops timing reads: ballast's own HTTP/1.1 server runs the head and keep-alive
    /// timers itself (an `h2c` listener's connection turned out to speak HTTP/1.1).
    pub fn untime_reads(&mut self) {
        self.read = None;
    }

    /// Maps a pending write to a timeout error once the peer has not read for too long.
    fn check_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.write_blocked = None;
            return polled;
        }
        let timeout = self.write_timeout;
        let timer = self
            .write_blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.write_blocked = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not read for {timeout:?} ({})",
                    self.write_names.0, self.write_names.1
                ),
            )));
        }
        Poll::Pending
    }
}

impl ReadTimer {
    /// Starts the keep-alive timer as soon as a response is done (hyper flushes it last),
    /// not at the next read: hyper does not read again after a response when its last read
    /// found nothing, so without this an idle connection's timer would only start when some
    /// other timer or byte woke it.
    ///
    /// Not on a connection about to close: arming moves the timer earlier than any other,
    /// and tokio then wakes its driver with a write(2) to an eventfd, one syscall per
    /// connection for a timer that never fires (measured with `Connection: close` load).
    fn arm_if_idle(&mut self, cx: &mut Context<'_>) {
        let word = self.owner.phase().load();
        if word & 3 == IDLE
            && self.armed_for != word
            && !self.owner.phase().closing.load(Ordering::Relaxed)
        {
            // Arms and registers the waker; an expiry is reported by the next read.
            let _ = self.poll_expired(cx);
        }
    }

    /// Called when a read is pending: fails it once the current phase has lasted too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let word = self.owner.phase().load();
        let (limit, what) = match word & 3 {
            HEAD => (
                self.limits.header_timeout,
                "request head not complete within request_header_timeout",
            ),
            IDLE => (
                self.limits.keepalive_timeout,
                "no new request within keepalive_timeout",
            ),
            _ => return Poll::Pending,
        };
        if self.armed_for != word {
            self.armed_for = word;
            self.due = Instant::now() + limit;
            match &mut self.timer {
                // Coalesced: a timer that fires no later than `due` is left alone and moved
                // to `due` when it fires. A busy connection then touches the timer wheel
                // about once per timer period, not once per request.
                Some(t) if !t.is_elapsed() && t.deadline() <= self.due => {}
                Some(t) => t.as_mut().reset(self.due),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(self.due))),
            }
        }
        loop {
            let Some(timer) = self.timer.as_mut() else {
                return Poll::Pending;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if timer.deadline() < self.due {
                // Fired for an earlier phase: on to this phase's deadline.
                timer.as_mut().reset(self.due);
                continue;
            }
            return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, what));
        }
    }
}

impl AsyncRead for TimedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(read) = &mut this.read else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && read.owner.phase().load() & 3 == IDLE {
                    // The first byte of the next request: the head timer starts now.
                    read.owner.phase().set(HEAD);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => read.poll_expired(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncWrite for TimedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check_write(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        if let Some(read) = &mut self.read {
            read.arm_if_idle(cx);
        }
        self.check_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Opens a TCP connection to `addr`, refusing the one the kernel can make to itself.
///
/// When nothing listens on `addr` and its port lies in the local ephemeral range, Linux can
/// pick that same port as the source and complete a "simultaneous open" with itself: the
/// connect succeeds and the socket talks to itself. Measured here, one connect in about nine
/// thousand to a closed loopback port does. A backend that died on this host would then
/// pass a TCP health check and take a client's connection that never gets a byte. Go's
/// dialer makes the same check.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    refuse_self(TcpStream::connect(addr).await?)
}

fn refuse_self(stream: TcpStream) -> io::Result<TcpStream> {
    if stream.local_addr()? == stream.peer_addr()? {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "connected to itself: nothing listens there",
        ));
    }
    Ok(stream)
}

/// Caps the data queued in the kernel but not yet sent on `stream` (`TCP_NOTSENT_LOWAT`).
/// The kernel otherwise grows a socket's send buffer to `tcp_wmem`'s maximum (4 MiB) even
/// for a client whose window is nearly shut: measured, 300 slow readers held 1.1 GiB of
/// ballast's send queues, pushed the machine's TCP memory into pressure, and the dropped
/// packets timed out health probes of healthy backends. Data in flight is not capped, so a
/// fast client over a long link keeps its full window.
/// On a listening socket, the connections it accepts inherit the value; `0` restores the
/// system default (`net.ipv4.tcp_notsent_lowat`).
pub fn limit_unsent(socket: &impl std::os::fd::AsFd, bytes: usize) -> bool {
    let lowat = u32::try_from(bytes).unwrap_or(u32::MAX);
    match socket2::SockRef::from(socket).set_tcp_notsent_lowat(lowat) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT");
            false
        }
    }
}

/// A stream with bytes already read from it put back in front: what a protocol sniff (the
/// HTTP/2 preface) or a PROXY header read consumed beyond what it needed.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Vec<u8>, inner: T) -> Prefixed<T> {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<T> Prefixed<T> {
    /// Puts `bytes` back in front of what is still unread: what an `h2c` listener read to
    /// tell HTTP/2 from HTTP/1.1, or what the client sent right behind a request that
    /// switched protocols (it belongs to the tunnel).
    pub fn put_back(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut prefix = Vec::with_capacity(bytes.len() + self.prefix.len() - self.pos);
        prefix.extend_from_slice(bytes);
        prefix.extend_from_slice(&self.prefix[self.pos..]);
        self.prefix = prefix;
        self.pos = 0;
    }

    /// The stream under the put-back bytes.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// ballast's own HTTP/1.1 server waits for a request's first byte by readiness, holding no
/// buffer.
impl crate::h1::server::Transport for TimedStream {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_read_ready(cx)
    }
}

/// Put-back bytes are ready at once.
impl<T: crate::h1::server::Transport> crate::h1::server::Transport for Prefixed<T> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_readable(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let rest = &this.prefix[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simultaneous open made on purpose: a socket bound to the port it connects to.
    #[tokio::test]
    async fn a_connection_to_itself_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(addr).expect("bind");
        let stream = socket
            .connect(addr)
            .await
            .expect("the kernel connects it to itself");
        let err = refuse_self(stream).expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_connection_to_a_listener_stands() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let stream = connect(listener.local_addr().expect("addr"))
            .await
            .expect("connects");
        assert_ne!(stream.local_addr().ok(), stream.peer_addr().ok());
    }
}
