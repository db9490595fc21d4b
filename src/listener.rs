//! Accept loops: one per bound listener, one task per downstream connection.
//!
//! A listener holds a semaphore of `max_connections` permits; when they are all taken it
//! stops accepting and new connections wait in the kernel's backlog (HAProxy's `maxconn`).
//! `max_connections_per_client`, when set, bounds what one address may hold of them.
//! hyper enforces the header size limit (431) and malformed requests (400); the socket
//! wrapper [`TimedStream`] runs the keep-alive, request-head and send timeouts; the request
//! path runs the body timeout.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::net::{ConnPhase, ReadLimits, TimedStream};
use crate::proxy::http::{handle, ConnCtx};
use crate::state::Live;

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
    let config = Arc::new(config);
    let name: Arc<str> = config.name.as_str().into();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let per_client = config
        .max_connections_per_client
        .map(|max| Arc::new(PerClient::new(max)));
    let mut builder = http1::Builder::new();
    builder
        .writev(false)
        .max_header_size(config.max_header_size)
        .max_headers(config.max_headers)
        // One knob for both directions in hyper: the read buffer must hold a request head,
        // the write buffer is what a slow reader can make ballast hold.
        .max_buf_size(config.response_buffer.max(config.max_header_size));
    let read_limits = ReadLimits {
        header_timeout: config.request_header_timeout,
        keepalive_timeout: config.keepalive_timeout,
    };
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
        let slot = match &per_client {
            Some(table) => match PerClient::acquire(table, peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    refuse_over_limit(&stream, &name, peer, table.max);
                    continue;
                }
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        crate::net::limit_unsent(&stream, config.response_buffer);
        let phase = Arc::new(ConnPhase::default());
        let ctx = Arc::new(ConnCtx {
            live: Arc::clone(&live),
            listener: Arc::clone(&name),
            config: Arc::clone(&config),
            peer,
            proto: "http",
            tracker: tracker.clone(),
            phase: Arc::clone(&phase),
        });
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let io = TimedStream::downstream(stream, config.send_timeout, phase, read_limits);
        tracker.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let svc = service_fn(move |req| handle(req, Arc::clone(&ctx)));
            let conn = builder
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
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
                // hyper's message names the step; the cause (e.g. one of our timeouts) is its source.
                let cause = std::error::Error::source(&e).map(|c| c.to_string());
                tracing::debug!(client = %peer, error = %e, cause = cause.as_deref().unwrap_or("-"), "client connection ended with an error");
            }
        });
    }
    tracing::info!(listener = %name, "listener stopped accepting");
}

/// Open connections per client address, for `max_connections_per_client`.
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of its address's count; given back on drop.
struct ClientSlot {
    table: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn new(max: usize) -> PerClient {
        PerClient {
            max,
            open: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(table: &Arc<PerClient>, ip: IpAddr) -> Option<ClientSlot> {
        let mut open = table.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= table.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: Arc::clone(table),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                // Entries live only while the address has connections: memory follows load.
                open.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over its address's limit with 429 (best effort, without reading or
/// waiting) and closes it.
fn refuse_over_limit(stream: &TcpStream, listener: &str, peer: SocketAddr, max: usize) {
    let _ = stream.try_write(
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 22\r\nconnection: close\r\n\r\n429 Too Many Requests\n",
    );
    if let Some(suppressed) = crate::log_limit::allow((listener, "max_connections_per_client")) {
        tracing::info!(listener, client = %peer, max, suppressed, reason = %"too_many_connections", "connection refused: client is at max_connections_per_client");
    }
}
