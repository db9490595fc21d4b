//! One HTTP request's account: what it asked, where it went, how long each step took and
//! how it ended. It is written to the counters and the access log when it is dropped, so
//! every request is accounted for exactly once, however it ends: a full response, an error
//! response, a body the backend broke off, or a client that left (logged as 499, nginx's
//! "client closed request").

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::Request;

use super::context::ConnCtx;
use crate::access_log::{AccessLog, Entry, RequestLine};
use crate::balance::backend::Backend;
use crate::balance::Pool;
use crate::h1::RequestFields;
use crate::request_body::{BodyWatch, UpstreamBody};

/// Status logged for a request whose client left before the response head was sent.
const CLIENT_CLOSED: u16 = 499;

pub(super) struct Exchange {
    pub ctx: Arc<ConnCtx>,
    /// Whether ending it marks the connection idle (not for a connection a tunnel took).
    pub armed: bool,
    start: Instant,
    /// Only what the access log needs, and only when there is one.
    log: Option<(AccessLog, SystemTime, RequestLine)>,
    /// The response status; 0 until there is one.
    pub status: u16,
    pub pool: Option<Arc<Pool>>,
    /// The backend that answered (counts its response), or the last one tried.
    pub backend: Option<Arc<Backend>>,
    pub answered: bool,
    pub attempts: u32,
    pub connect: Option<Duration>,
    pub header: Option<Duration>,
    pub bytes_in: BytesIn,
    pub bytes_out: u64,
    /// `ok`, or an error reason.
    pub termination: &'static str,
    /// The response body reached its end.
    pub complete: bool,
    /// `X-Request-Id`, on listeners with `request_id`.
    pub request_id: Option<http::HeaderValue>,
    /// The client a trusted proxy named (`trusted_proxies`), and its address as a field
    /// value; `None`: the connection's peer is the client. Boxed: one pointer in every
    /// request's state, for a case most listeners never have.
    pub forwarded: Option<Box<(std::net::IpAddr, http::HeaderValue)>>,
}

pub(super) enum BytesIn {
    Known(u64),
    Streamed(Arc<BodyWatch>),
}

impl BytesIn {
    pub fn of(body: &UpstreamBody) -> BytesIn {
        match body {
            UpstreamBody::Empty => BytesIn::Known(0),
            UpstreamBody::Full(b, _) => BytesIn::Known(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream(_) => body.watch().map_or(BytesIn::Known(0), BytesIn::Streamed),
        }
    }

    fn get(&self) -> u64 {
        match self {
            BytesIn::Known(n) => *n,
            BytesIn::Streamed(w) => w.received(),
        }
    }
}

impl Exchange {
    /// Starts the account of `req` on `ctx`'s connection; `log`: the access log, if this
    /// listener writes to one.
    /// `fields`: the request's fields when they came as lines (an HTTP/1.1 client's), not
    /// in its map.
    pub fn start<B>(
        ctx: Arc<ConnCtx>,
        req: &Request<B>,
        fields: Option<&RequestFields>,
        log: Option<AccessLog>,
    ) -> Exchange {
        let log = log.map(|log| {
            let h = req.headers();
            let field = |name: http::header::HeaderName| match fields {
                Some(f) => f.get(name.as_str()),
                None => h.get(name).map(|v| v.as_bytes()),
            };
            let uri = req.uri();
            let target = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
            // HTTP/2 carries the host in `:authority`.
            let host = field(http::header::HOST)
                .or_else(|| uri.authority().map(|a| a.as_str().as_bytes()));
            let line = RequestLine::new(
                req.method().clone(),
                req.version(),
                target.as_bytes(),
                host,
                field(http::header::REFERER),
                field(http::header::USER_AGENT),
            );
            (log, SystemTime::now(), line)
        });
        Exchange {
            ctx,
            armed: true,
            start: Instant::now(),
            log,
            status: 0,
            pool: None,
            backend: None,
            answered: false,
            attempts: 0,
            connect: None,
            header: None,
            bytes_in: BytesIn::Known(0),
            bytes_out: 0,
            termination: "ok",
            complete: false,
            request_id: None,
            forwarded: None,
        }
    }

    /// The client's address: a trusted proxy's word for it, else the peer's.
    pub fn client_ip(&self) -> std::net::IpAddr {
        self.forwarded.as_ref().map_or(self.ctx.peer.ip(), |f| f.0)
    }

    /// The client's address as it shows in logs: the peer's with its port, or the one a
    /// trusted proxy named.
    pub fn client_label(&self) -> ClientLabel<'_> {
        ClientLabel(self)
    }
}

/// See [`Exchange::client_label`].
pub(super) struct ClientLabel<'a>(&'a Exchange);

impl std::fmt::Display for ClientLabel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.forwarded.as_deref() {
            Some((ip, _)) => write!(f, "{ip} (via {})", self.0.ctx.peer),
            None => write!(f, "{}", self.0.ctx.peer),
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if self.armed {
            self.ctx.phase.idle();
        }
        let total = self.start.elapsed();
        let (status, termination) = match (self.status, self.termination, self.complete) {
            (0, _, _) => (CLIENT_CLOSED, "client_closed"),
            (s, "ok", false) => (s, "client_closed"),
            (s, t, _) => (s, t),
        };
        let bytes_in = self.bytes_in.get();
        let listener = &self.ctx.listener.stats;
        listener.requests.add(status);
        listener.bytes_in.add(bytes_in);
        listener.bytes_out.add(self.bytes_out);
        if let Some(pool) = &self.pool {
            pool.stats.requests.add(status);
            if termination != "ok" {
                pool.stats.failed(termination);
            }
            pool.latency.total.record(total.as_secs_f64());
            if let Some(d) = self.connect {
                pool.latency.connect.record(d.as_secs_f64());
            }
            if let Some(d) = self.header {
                pool.latency.header.record(d.as_secs_f64());
            }
        }
        if let Some(b) = self.backend.as_ref().filter(|_| self.answered) {
            b.stats.responses.add(status);
            b.stats.bytes_in.add(bytes_in);
            b.stats.bytes_out.add(self.bytes_out);
        }
        if let Some((log, time, line)) = self.log.take() {
            log.log(Entry {
                time,
                listener: Arc::clone(&self.ctx.listener.name),
                client: self.ctx.peer,
                forwarded: self.forwarded.as_ref().map(|f| f.0),
                request: Some(line),
                status,
                bytes_in,
                bytes_out: self.bytes_out,
                pool: self.pool.as_ref().map(|p| Arc::clone(&p.name)),
                backend: self.backend.as_ref().map(|b| Arc::clone(&b.label)),
                attempts: self.attempts,
                connect: self.connect,
                header: self.header,
                total,
                termination,
                request_id: self.request_id.take(),
            });
        }
    }
}
