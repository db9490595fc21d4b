//! The access log: one line per HTTP request or TCP connection, in JSON or the Apache/nginx
//! "combined" format, to standard output or a file.
//!
//! The data path never waits for it. A finished request hands its [`Entry`] (a few
//! reference-counted fields, no formatting) to a bounded queue with `try_send`; one writer
//! thread formats and writes in batches, flushing whenever the queue runs empty. When the
//! sink cannot keep up (a full disk, a stalled pipe) lines are dropped and counted in
//! `ballast_access_log_dropped_total` instead of stalling requests, as HAProxy does with a
//! full log buffer. The writer polls the queue every 20 ms rather than sleeping in `recv`:
//! a sleeping receiver is woken by each send, which costs a context switch per request.
//! `SIGUSR1` asks the writer to reopen its file (logrotate's `postrotate`); the reopen
//! happens at its next poll even when no request arrives.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Method, Version};

use crate::config::{AccessLogConfig, AccessLogFormat};

/// What one request (or TCP connection) did. Filled in along the request path; formatted
/// only on the writer thread.
#[derive(Debug, Clone)]
pub struct Entry {
    /// When the request head (or the connection) arrived.
    pub time: SystemTime,
    pub listener: Arc<str>,
    /// The connection's peer.
    pub client: SocketAddr,
    /// The client a trusted proxy's `X-Forwarded-For` or `Forwarded` named (then logged as
    /// `client`, and the connection's own address as `peer`).
    pub forwarded: Option<std::net::IpAddr>,
    /// `None` for a TCP connection.
    pub request: Option<RequestLine>,
    /// The response status; 0 for a TCP connection.
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pool: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    /// Backends tried (retries + 1); 0 when none was.
    pub attempts: u32,
    pub connect: Option<Duration>,
    /// From sending the request to the response head.
    pub header: Option<Duration>,
    pub total: Duration,
    /// `ok`, or what ended it early: the `reason` words of the error log.
    pub termination: &'static str,
    /// `X-Request-Id` (listeners with `request_id`).
    pub request_id: Option<http::HeaderValue>,
}

/// The parts of an HTTP request the log shows, copied out of the request into one small
/// allocation. (Keeping hyper's `Uri` and `HeaderValue`s instead would keep the slice of
/// the connection's read buffer they point into alive until the line is written, and hyper
/// would then allocate a fresh read buffer for the next request.)
#[derive(Debug, Clone)]
pub struct RequestLine {
    pub method: Method,
    pub version: Version,
    /// Target, host, referer and user agent, back to back.
    fields: Box<[u8]>,
    /// Where each of them is in `fields`; `None`: the header was absent.
    ranges: [Option<(u32, u32)>; 4],
}

impl RequestLine {
    pub fn new(
        method: Method,
        version: Version,
        target: &[u8],
        host: Option<&[u8]>,
        referer: Option<&[u8]>,
        user_agent: Option<&[u8]>,
    ) -> RequestLine {
        let parts = [Some(target), host, referer, user_agent];
        let mut fields = Vec::with_capacity(parts.iter().flatten().map(|p| p.len()).sum());
        let mut ranges = [None; 4];
        for (range, part) in ranges.iter_mut().zip(parts) {
            if let Some(p) = part {
                let start = fields.len() as u32;
                fields.extend_from_slice(p);
                *range = Some((start, fields.len() as u32));
            }
        }
        RequestLine {
            method,
            version,
            fields: fields.into_boxed_slice(),
            ranges,
        }
    }

    fn field(&self, i: usize) -> Option<&[u8]> {
        let (start, end) = self.ranges[i]?;
        self.fields.get(start as usize..end as usize)
    }

    /// Path and query as the client sent them.
    pub fn target(&self) -> &[u8] {
        self.field(0).unwrap_or(b"")
    }

    pub fn host(&self) -> Option<&[u8]> {
        self.field(1)
    }

    pub fn referer(&self) -> Option<&[u8]> {
        self.field(2)
    }

    pub fn user_agent(&self) -> Option<&[u8]> {
        self.field(3)
    }
}

/// A handle to the running log; cheap to clone. The writer thread ends once every handle
/// (and so every sender) is gone, after writing what is queued.
#[derive(Debug, Clone)]
pub struct AccessLog(Arc<Handle>);

/// What every clone shares: cloning an `AccessLog` (once per request) is one reference
/// count, not a sender and a config.
#[derive(Debug)]
struct Handle {
    tx: SyncSender<Entry>,
    shared: Arc<Shared>,
    config: AccessLogConfig,
}

#[derive(Debug, Default)]
struct Shared {
    dropped: AtomicU64,
    written: AtomicU64,
    reopen: AtomicBool,
    /// Write or reopen errors, reported once per outage.
    failing: AtomicBool,
}

impl AccessLog {
    /// Opens the sink (a file is created if missing, appended to otherwise) and starts
    /// the writer thread.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<AccessLog> {
        let sink = Sink::open(config.path.as_ref())?;
        let (tx, rx) = sync_channel(config.buffer);
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            rx,
            sink,
            shared: Arc::clone(&shared),
            path: config.path.clone(),
            format: LineFormat::new(config.format),
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        Ok(AccessLog(Arc::new(Handle {
            tx,
            shared,
            config: config.clone(),
        })))
    }

    /// The settings it was started with.
    pub fn config(&self) -> &AccessLogConfig {
        &self.0.config
    }

    /// Queues one line; never blocks, never wakes a thread. A full queue drops it (and
    /// counts it).
    #[inline]
    pub fn log(&self, entry: Entry) {
        match self.0.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.0.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Asks the writer to reopen its file (after logrotate moved it).
    pub fn reopen(&self) {
        self.0.shared.reopen.store(true, Ordering::Relaxed);
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.shared.dropped.load(Ordering::Relaxed)
    }

    /// Lines written.
    pub fn written(&self) -> u64 {
        self.0.shared.written.load(Ordering::Relaxed)
    }
}

enum Sink {
    Stdout(std::io::Stdout),
    File(std::fs::File),
}

impl Sink {
    fn open(path: Option<&PathBuf>) -> std::io::Result<Sink> {
        match path {
            None => Ok(Sink::Stdout(std::io::stdout())),
            Some(p) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map(Sink::File),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.lock().write_all(buf),
            Sink::File(f) => f.write_all(buf),
        }
    }
}

struct Writer {
    rx: Receiver<Entry>,
    sink: Sink,
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    format: LineFormat,
}

/// Bytes formatted before they are written in one go.
const BATCH_BYTES: usize = 64 * 1024;

/// How long the writer sleeps once the queue is empty: the most a line waits to be
/// written, and what bounds the queue's size needed (`buffer` lines per interval).
const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

impl Writer {
    fn run(mut self) {
        let mut buf = Vec::with_capacity(BATCH_BYTES);
        loop {
            if self.shared.reopen.swap(false, Ordering::Relaxed) {
                self.reopen();
            }
            // Never blocks in `recv`: a blocked receiver would be woken by every request's
            // `try_send`, a context switch per request (measured: +18 us a request when
            // sharing a core with the proxy). It polls instead, taking everything queued.
            let mut lines = 0u64;
            let mut gone = false;
            loop {
                match self.rx.try_recv() {
                    Ok(e) => {
                        self.format.write(&e, &mut buf);
                        lines += 1;
                        if buf.len() >= BATCH_BYTES {
                            self.write(&mut buf, &mut lines);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        gone = true;
                        break;
                    }
                }
            }
            self.write(&mut buf, &mut lines);
            if gone {
                return;
            }
            std::thread::sleep(FLUSH_INTERVAL);
        }
    }

    /// Writes the batch in `buf` (holding `lines` lines) and empties both.
    fn write(&mut self, buf: &mut Vec<u8>, lines: &mut u64) {
        if buf.is_empty() {
            return;
        }
        match self.sink.write_all(buf) {
            Ok(()) => {
                self.shared.written.fetch_add(*lines, Ordering::Relaxed);
                if self.shared.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("access log: writing works again");
                }
            }
            Err(e) => {
                self.shared.dropped.fetch_add(*lines, Ordering::Relaxed);
                if !self.shared.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, "access log: write failed; dropping lines until it works again");
                }
            }
        }
        buf.clear();
        *lines = 0;
    }

    fn reopen(&mut self) {
        let Some(path) = &self.path else { return };
        match Sink::open(Some(path)) {
            Ok(s) => {
                self.sink = s;
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(e) => {
                // Keep writing to the old file: losing lines is worse than a late rotation.
                tracing::error!(path = %path.display(), error = %e, "access log: cannot reopen; still writing to the old file");
            }
        }
    }
}

/// Formats entries as lines. Keeps the last second's timestamp text: every line of a busy
/// second shares it, so a line's time costs a copy and three digits.
pub struct LineFormat {
    format: AccessLogFormat,
    /// (Unix second, its text): RFC 3339 up to the seconds (JSON), or the combined
    /// format's `30/Nov/2026:13:06:16 +0000`.
    second: Option<(u64, String)>,
}

impl LineFormat {
    pub fn new(format: AccessLogFormat) -> LineFormat {
        LineFormat {
            format,
            second: None,
        }
    }

    /// Appends `e` as one line.
    pub fn write(&mut self, e: &Entry, out: &mut Vec<u8>) {
        let since = e
            .time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        if self.second.as_ref().is_none_or(|(s, _)| *s != secs) {
            let whole = std::time::UNIX_EPOCH + Duration::from_secs(secs);
            let text = match self.format {
                // "2026-11-30T13:06:16Z" without its "Z".
                AccessLogFormat::Json => {
                    let mut t = humantime::format_rfc3339_seconds(whole).to_string();
                    t.pop();
                    t
                }
                AccessLogFormat::Combined => time::OffsetDateTime::from(whole)
                    .format(time::macros::format_description!(
                        "[day]/[month repr:short]/[year]:[hour]:[minute]:[second] +0000"
                    ))
                    .unwrap_or_default(),
            };
            self.second = Some((secs, text));
        }
        let stamp = self.second.as_ref().map_or("", |(_, t)| t.as_str());
        match self.format {
            AccessLogFormat::Json => json(e, stamp, since.subsec_millis(), out),
            AccessLogFormat::Combined => combined(e, stamp, out),
        }
    }
}

fn json(e: &Entry, second: &str, millis: u32, out: &mut Vec<u8>) {
    /// Borrows everything: a line costs no allocation beyond the output buffer.
    #[derive(serde::Serialize)]
    struct Line<'a> {
        time: &'a str,
        listener: &'a str,
        client: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        peer: Option<&'a str>,
        method: Option<&'a str>,
        host: Option<std::borrow::Cow<'a, str>>,
        path: Option<std::borrow::Cow<'a, str>>,
        protocol: Option<&'static str>,
        status: Option<u16>,
        bytes_in: u64,
        bytes_out: u64,
        pool: Option<&'a str>,
        backend: Option<&'a str>,
        attempts: u32,
        connect_ms: Option<f64>,
        header_ms: Option<f64>,
        total_ms: f64,
        termination: &'a str,
        user_agent: Option<std::borrow::Cow<'a, str>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<std::borrow::Cow<'a, str>>,
    }
    let mut time = [0u8; 32];
    let time = {
        let mut w = Small(&mut time, 0);
        w.push(second.as_bytes());
        w.push(b".");
        w.push(&[
            b'0' + (millis / 100 % 10) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
        ]);
        w.push(b"Z");
        w.len()
    };
    let mut client = [0u8; 64];
    let client = {
        let mut w = Small(&mut client, 0);
        let _ = match e.forwarded {
            Some(ip) => std::fmt::Write::write_fmt(&mut w, format_args!("{ip}")),
            None => std::fmt::Write::write_fmt(&mut w, format_args!("{}", e.client)),
        };
        w.len()
    };
    let mut peer = [0u8; 64];
    let peer = e.forwarded.map(|_| {
        let mut w = Small(&mut peer, 0);
        let _ = std::fmt::Write::write_fmt(&mut w, format_args!("{}", e.client));
        w.len()
    });
    let text = String::from_utf8_lossy;
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let r = e.request.as_ref();
    let line = Line {
        time: std::str::from_utf8(time).unwrap_or(""),
        listener: &e.listener,
        client: std::str::from_utf8(client).unwrap_or(""),
        peer: peer.map(|p| std::str::from_utf8(p).unwrap_or("")),
        method: r.map(|r| r.method.as_str()),
        host: r.and_then(|r| r.host().map(text)),
        path: r.map(|r| text(r.target())),
        protocol: r.map(|r| version(r.version)),
        status: (e.status != 0).then_some(e.status),
        bytes_in: e.bytes_in,
        bytes_out: e.bytes_out,
        pool: e.pool.as_deref(),
        backend: e.backend.as_deref(),
        attempts: e.attempts,
        connect_ms: ms(e.connect),
        header_ms: ms(e.header),
        total_ms: e.total.as_secs_f64() * 1000.0,
        termination: e.termination,
        user_agent: r.and_then(|r| r.user_agent().map(text)),
        request_id: e.request_id.as_ref().map(|v| text(v.as_bytes())),
    };
    // Serializing plain fields to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// A fixed buffer on the stack written like a `Vec`; what does not fit is cut off.
struct Small<'a>(&'a mut [u8], usize);

impl<'a> Small<'a> {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.0.len() - self.1);
        self.0[self.1..self.1 + n].copy_from_slice(&bytes[..n]);
        self.1 += n;
    }

    /// The bytes written.
    fn len(self) -> &'a [u8] {
        let Small(buf, n) = self;
        &buf[..n]
    }
}

impl std::fmt::Write for Small<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

/// `client - - [time] "request" status bytes "referer" "user-agent"`, nginx's `combined`.
/// A TCP connection shows `"TCP"` as its request and `-` as its status.
fn combined(e: &Entry, stamp: &str, out: &mut Vec<u8>) {
    let _ = write!(
        out,
        "{} - - [{stamp}] \"",
        e.forwarded.unwrap_or(e.client.ip())
    );
    match &e.request {
        Some(r) => {
            escape(r.method.as_str().as_bytes(), out);
            out.push(b' ');
            escape(r.target(), out);
            out.push(b' ');
            out.extend_from_slice(version(r.version).as_bytes());
        }
        None => out.extend_from_slice(b"TCP"),
    }
    out.extend_from_slice(b"\" ");
    if e.status == 0 {
        out.push(b'-');
    } else {
        let _ = write!(out, "{}", e.status);
    }
    let _ = write!(out, " {} \"", e.bytes_out);
    let header = |v: Option<&[u8]>, out: &mut Vec<u8>| match v {
        Some(v) => escape(v, out),
        None => out.push(b'-'),
    };
    header(e.request.as_ref().and_then(|r| r.referer()), out);
    out.extend_from_slice(b"\" \"");
    header(e.request.as_ref().and_then(|r| r.user_agent()), out);
    out.extend_from_slice(b"\"\n");
}

/// nginx's escaping: `"`, `\` and bytes outside printable ASCII become `\xHH`, so a client
/// cannot forge a field or a line.
fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

fn version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            listener: "web".into(),
            client: "192.0.2.7:5555".parse().unwrap(),
            forwarded: None,
            request: Some(RequestLine::new(
                Method::GET,
                Version::HTTP_11,
                b"/a?b=1",
                Some(b"example.com"),
                None,
                Some(b"curl/8 \"x\""),
            )),
            status: 200,
            bytes_in: 0,
            bytes_out: 12,
            pool: Some("app".into()),
            backend: Some("10.0.0.1:80".into()),
            attempts: 1,
            connect: None,
            header: Some(Duration::from_millis(3)),
            total: Duration::from_millis(4),
            termination: "ok",
            request_id: None,
        }
    }

    #[test]
    fn combined_format_escapes_what_a_client_controls() {
        let mut out = Vec::new();
        LineFormat::new(AccessLogFormat::Combined).write(&entry(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "192.0.2.7 - - [14/Nov/2023:22:13:20 +0000] \"GET /a?b=1 HTTP/1.1\" 200 12 \"-\" \"curl/8 \\x22x\\x22\"\n"
        );
    }

    #[test]
    fn json_has_every_field() {
        let mut out = Vec::new();
        LineFormat::new(AccessLogFormat::Json).write(&entry(), &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["path"], "/a?b=1");
        assert_eq!(v["status"], 200);
        assert_eq!(v["backend"], "10.0.0.1:80");
        assert_eq!(v["header_ms"], 3.0);
        assert_eq!(v["connect_ms"], serde_json::Value::Null);
        assert_eq!(v["termination"], "ok");
    }
}
