//! Accept loops: one per bound listener, one task per downstream connection.
//!
//! A listener holds a semaphore of `max_connections` permits; when they are all taken it
//! stops accepting and new connections wait in the kernel's backlog (HAProxy's `maxconn`).
//! hyper enforces the request-header timeout (which also ends idle keep-alive connections),
//! the header size limit (431) and malformed requests (400); `SendTimeout` cuts a client
//! that stops reading.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::proxy::http::{handle, ConnCtx};
use crate::state::Live;

/// hyper's own default read buffer limit.
const DEFAULT_MAX_BUF: usize = 400 * 1024;

/// Binds `addr` with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Accepts connections on `listener` until `stop_accepting` fires. Connection tasks are
/// spawned on `tracker`; when `shutdown` fires they finish their current request, answer
/// it with `Connection: close`, and close. The two tokens differ when a reload changes a
/// listener's settings: the old loop stops accepting, a new one takes over the same socket,
/// and the old loop's connections carry on.
pub async fn run(
    listener: Arc<TcpListener>,
    config: ListenerConfig,
    live: Live,
    stop_accepting: CancellationToken,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let name: Arc<str> = config.name.as_str().into();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .writev(false)
        .header_read_timeout(config.request_header_timeout)
        .max_header_size(config.max_header_size)
        .max_headers(config.max_headers);
    if config.max_header_size + 8192 > DEFAULT_MAX_BUF {
        builder.max_buf_size(config.max_header_size + 8192);
    }
    loop {
        // `biased`: once told to stop, never accept again, even if a connection is ready.
        let permit = tokio::select! {
            biased;
            _ = stop_accepting.cancelled() => break,
            p = Arc::clone(&limit).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop_accepting.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::error!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let ctx = Arc::new(ConnCtx {
            live: Arc::clone(&live),
            listener: Arc::clone(&name),
            peer,
            proto: "http",
            tracker: tracker.clone(),
        });
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let send_timeout = config.send_timeout;
        tracker.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| handle(req, Arc::clone(&ctx)));
            let io = TokioIo::new(SendTimeout::new(stream, send_timeout));
            let conn = builder.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    // Finish the request in progress, answer it with `Connection: close`.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // hyper's message names the step; the cause (e.g. our send timeout) is its source.
                let cause = std::error::Error::source(&e).map(|c| c.to_string());
                tracing::debug!(client = %peer, error = %e, cause = cause.as_deref().unwrap_or("-"), "client connection ended with an error");
            }
        });
    }
    tracing::info!(listener = %name, "listener stopped accepting");
}

/// The client side of a connection, failing a write that stays blocked for `timeout`: a
/// client that stops reading a response must not hold the connection and its backend
/// request forever (nginx's `send_timeout`). The timer exists only while a write is blocked.
struct SendTimeout {
    inner: TcpStream,
    timeout: Duration,
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SendTimeout {
    fn new(inner: TcpStream, timeout: Duration) -> SendTimeout {
        SendTimeout {
            inner,
            timeout,
            blocked: None,
        }
    }

    /// Maps a pending write to a timeout error once the client has not read for too long.
    fn check<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.blocked = None;
            return polled;
        }
        let timeout = self.timeout;
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.blocked = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("client did not read for {timeout:?} (send_timeout)"),
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for SendTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
