//! Response compression (`compress` on a listener or route): zstd, brotli or gzip, chosen
//! by the client's `Accept-Encoding` (q-values, then the config's order), streamed through
//! an encoder frame by frame.
//!
//! What is never compressed (RFC 9110 and what peers do): a response that already has a
//! `Content-Encoding`, a range (206 or `Content-Range`), a bodiless one (HEAD, 1xx, 204,
//! 304), an upgrade or tunnel, one marked `Cache-Control: no-transform`, a type the config
//! does not list, and one whose known length is below `min_size`. A response that could
//! be compressed gets `Vary: Accept-Encoding` whether or not this client takes it, so caches
//! keep the two apart. A compressed response loses `Content-Length` and `Accept-Ranges`,
//! and a strong `ETag` becomes weak (the bytes differ; the meaning does not).
//!
//! Memory: each encoder holds its compression window (about 256 KiB for gzip), for as long
//! as its response streams, and a slow reader keeps it. At most [`MAX_ENCODERS`] exist at
//! once; past that, responses go out uncompressed. Each encoder's output is bounded by the
//! frame it was given. A response that goes quiet (the backend is slow: server-sent
//! events, long polling) has what was compressed so far flushed to the client rather than
//! held for more input.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use async_compression::tokio::write::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::StatusCode;
use tokio::io::AsyncWrite;

use crate::config::{CompressConfig, Encoding};

/// Encoders alive at once, at most (see the module's doc).
pub const MAX_ENCODERS: usize = 256;

static ENCODERS: AtomicUsize = AtomicUsize::new(0);

/// What the request asked for, decided before it is forwarded.
#[derive(Debug)]
pub struct Negotiated<'a> {
    pub config: &'a CompressConfig,
    /// The encoding the client takes that ranks first; `None`: it takes none we offer.
    pub encoding: Option<Encoding>,
    /// A HEAD request: its response has no body to compress.
    pub head: bool,
}

/// The encoding `Accept-Encoding` (its lines) prefers among `offered` (in the server's
/// order of preference, which breaks ties). An encoding with `q=0` is refused; one not
/// named takes the `*` entry's q-value, if there is one.
pub fn negotiate(accept: &[&[u8]], offered: &[Encoding]) -> Option<Encoding> {
    let mut best: Option<(Encoding, u16)> = None;
    for &encoding in offered {
        let mut named = None;
        let mut any = None;
        for item in accept.iter().flat_map(|l| l.split(|b| *b == b',')) {
            let mut parts = item.split(|b| *b == b';');
            let token = parts.next().unwrap_or_default().trim_ascii();
            let q = parts
                .find_map(|p| {
                    let p = p.trim_ascii();
                    let (k, v) = p.split_at(p.iter().position(|b| *b == b'=')?);
                    k.eq_ignore_ascii_case(b"q").then(|| qvalue(&v[1..]))
                })
                .unwrap_or(Some(1000));
            let Some(q) = q else { continue };
            if encoding
                .names()
                .iter()
                .any(|n| token.eq_ignore_ascii_case(n.as_bytes()))
            {
                named = Some(named.map_or(q, |old: u16| old.max(q)));
            } else if token == b"*" {
                any = Some(q);
            }
        }
        let q = named.or(any).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((encoding, q));
        }
    }
    best.map(|(e, _)| e)
}

/// A q-value in thousandths (`0.8` → 800); `None` if malformed (the entry is skipped).
fn qvalue(v: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(v.trim_ascii()).ok()?;
    let q: f32 = text.parse().ok()?;
    (0.0..=1.0)
        .contains(&q)
        .then(|| (q * 1000.0).round() as u16)
}

/// Decides for a response and edits its fields; returns the encoder for its body, if it is
/// to be compressed. `length`: the body's length when known apart from `Content-Length`
/// (a response ballast made); `tunnel`: the response hands the connection to a tunnel.
pub fn start(
    status: StatusCode,
    headers: &mut HeaderMap,
    length: Option<u64>,
    negotiated: &Negotiated<'_>,
    tunnel: bool,
) -> Option<Box<Encoder>> {
    let config = negotiated.config;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status == StatusCode::PARTIAL_CONTENT;
    if bodiless || tunnel || headers.contains_key(header::CONTENT_RANGE) {
        return None;
    }
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    let no_transform = headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|d| d.trim_ascii().eq_ignore_ascii_case(b"no-transform"))
    });
    let listed = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| config.types.iter().any(|m| m.matches(t.as_bytes())));
    let too_small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| {
            std::str::from_utf8(v.as_bytes())
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .or(length)
        .is_some_and(|n| n < config.min_size);
    if encoded || no_transform || !listed || too_small {
        return None;
    }
    add_vary(headers);
    let encoding = negotiated.encoding.filter(|_| !negotiated.head)?;
    let encoder = Encoder::new(encoding)?;
    headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(encoding.token()),
    );
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::ACCEPT_RANGES);
    if let Some(etag) = headers.get(header::ETAG) {
        if etag.as_bytes().starts_with(b"\"") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                headers.insert(header::ETAG, v);
            }
        }
    }
    Some(Box::new(encoder))
}

/// `Vary: Accept-Encoding`, unless the response varies on it (or on everything) already.
fn add_vary(headers: &mut HeaderMap) {
    let varies = headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|t| {
            let t = t.trim_ascii();
            t == b"*" || t.eq_ignore_ascii_case(b"accept-encoding")
        })
    });
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// One response's encoder; its output collects in a `Vec` that each step empties.
pub struct Encoder {
    codec: Codec,
    /// Input taken since the last flush.
    unflushed: bool,
    finished: bool,
    /// The body's trailers, sent after the compressed data ends.
    trailers: Option<HeaderMap>,
}

enum Codec {
    Zstd(ZstdEncoder<Vec<u8>>),
    /// Boxed: brotli's state is 5.6 KB inline, the others' a few hundred bytes.
    Br(Box<BrotliEncoder<Vec<u8>>>),
    Gzip(GzipEncoder<Vec<u8>>),
}

impl Encoder {
    /// `None` when [`MAX_ENCODERS`] are in use.
    fn new(encoding: Encoding) -> Option<Encoder> {
        let taken = ENCODERS.fetch_add(1, Ordering::Relaxed);
        if taken >= MAX_ENCODERS {
            ENCODERS.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let out = Vec::new();
        let codec = match encoding {
            // zstd's level 3 with a 512 KiB window (its default at this level is 2 MiB).
            Encoding::Zstd => Codec::Zstd(ZstdEncoder::with_quality_and_params(
                out,
                Level::Precise(3),
                &[async_compression::zstd::CParameter::window_log(19)],
            )),
            // Quality 4: what on-the-fly brotli is run at (11, the crate's default, is for
            // precompressed files and costs tens of times more).
            Encoding::Br => Codec::Br(Box::new(BrotliEncoder::with_quality(
                out,
                Level::Precise(4),
            ))),
            // zlib's default level.
            Encoding::Gzip => Codec::Gzip(GzipEncoder::with_quality(out, Level::Precise(6))),
        };
        Some(Encoder {
            codec,
            unflushed: false,
            finished: false,
            trailers: None,
        })
    }

    /// The stream is finished (its trailer produced).
    pub fn is_done(&self) -> bool {
        self.finished
    }

    pub fn keep_trailers(&mut self, trailers: Option<HeaderMap>) {
        self.trailers = trailers;
    }

    pub fn take_trailers(&mut self) -> Option<HeaderMap> {
        self.trailers.take()
    }

    fn writer(&mut self) -> Pin<&mut (dyn AsyncWrite + Send + Unpin)> {
        match &mut self.codec {
            Codec::Zstd(e) => Pin::new(e),
            Codec::Br(e) => Pin::new(&mut **e),
            Codec::Gzip(e) => Pin::new(e),
        }
    }

    fn output(&mut self) -> Bytes {
        let out = match &mut self.codec {
            Codec::Zstd(e) => e.get_mut(),
            Codec::Br(e) => e.get_mut(),
            Codec::Gzip(e) => e.get_mut(),
        };
        Bytes::from(std::mem::take(out))
    }

    /// Compresses `data`; returns what the encoder has produced so far (often nothing).
    pub fn push(&mut self, cx: &mut Context<'_>, mut data: &[u8]) -> io::Result<Bytes> {
        while !data.is_empty() {
            match ready(self.writer().poll_write(cx, data))? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => data = &data[n..],
            }
            self.unflushed = true;
        }
        Ok(self.output())
    }

    /// Everything taken so far, compressed and flushed (the body went quiet).
    pub fn flush(&mut self, cx: &mut Context<'_>) -> io::Result<Bytes> {
        if !self.unflushed {
            return Ok(Bytes::new());
        }
        ready(self.writer().poll_flush(cx))?;
        self.unflushed = false;
        Ok(self.output())
    }

    /// The end of the stream (the encoding's trailer); empty once finished.
    pub fn finish(&mut self, cx: &mut Context<'_>) -> io::Result<Bytes> {
        if self.finished {
            return Ok(Bytes::new());
        }
        ready(self.writer().poll_shutdown(cx))?;
        self.finished = true;
        Ok(self.output())
    }
}

/// A step of an encoder over a `Vec`, which never waits: `Pending` would be a bug, and is
/// an error rather than a stall.
fn ready<T>(step: Poll<io::Result<T>>) -> io::Result<T> {
    match step {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::Error::other("compressor stalled")),
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        ENCODERS.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Encoding; 3] = [Encoding::Zstd, Encoding::Br, Encoding::Gzip];

    fn pick(accept: &[&str]) -> Option<Encoding> {
        let lines: Vec<&[u8]> = accept.iter().map(|l| l.as_bytes()).collect();
        negotiate(&lines, &ALL)
    }

    #[test]
    fn accept_encoding_is_read_with_q_values_and_the_servers_order_breaks_ties() {
        assert_eq!(pick(&["gzip, deflate, br, zstd"]), Some(Encoding::Zstd));
        assert_eq!(pick(&["gzip, deflate, br"]), Some(Encoding::Br));
        assert_eq!(pick(&["gzip"]), Some(Encoding::Gzip));
        assert_eq!(pick(&["x-gzip"]), Some(Encoding::Gzip));
        assert_eq!(pick(&["GZIP;Q=0.5, br;q=0.4"]), Some(Encoding::Gzip));
        assert_eq!(pick(&["br;q=0, gzip;q=0.1"]), Some(Encoding::Gzip));
        assert_eq!(pick(&["*"]), Some(Encoding::Zstd));
        assert_eq!(pick(&["*;q=0.5, zstd;q=0"]), Some(Encoding::Br));
        assert_eq!(pick(&["gzip;q=0", "br;q=0"]), None);
        assert_eq!(pick(&["identity"]), None);
        assert_eq!(pick(&[]), None);
        assert_eq!(
            pick(&["gzip;q=2, br;q=abc"]),
            None,
            "malformed entries are skipped"
        );
        assert_eq!(
            pick(&["deflate", "gzip ; q=0.9"]),
            Some(Encoding::Gzip),
            "lines are one list"
        );
    }

    fn config() -> CompressConfig {
        CompressConfig {
            types: vec![
                crate::config::TypeMatch::Prefix("text/".into()),
                crate::config::TypeMatch::Exact("application/json".into()),
            ],
            min_size: 1024,
            algorithms: ALL.to_vec(),
        }
    }

    fn decide(fields: &[(&str, &str)], status: u16, head: bool) -> (Option<Encoding>, HeaderMap) {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let config = config();
        let n = Negotiated {
            config: &config,
            encoding: Some(Encoding::Gzip),
            head,
        };
        let status = StatusCode::from_u16(status).unwrap();
        let started = start(status, &mut h, None, &n, false).map(|_| Encoding::Gzip);
        (started, h)
    }

    #[test]
    fn encoders_are_capped_and_given_back() {
        // Made until one is refused (past the cap, a response goes uncompressed). Other
        // tests may hold an encoder meanwhile: count loosely.
        let held: Vec<Encoder> = std::iter::from_fn(|| Encoder::new(Encoding::Gzip))
            .take(MAX_ENCODERS + 1)
            .collect();
        assert!(
            held.len() <= MAX_ENCODERS && held.len() + 8 >= MAX_ENCODERS,
            "{}",
            held.len()
        );
        drop(held);
        assert!(
            Encoder::new(Encoding::Br).is_some(),
            "freed when their responses end"
        );
    }

    #[test]
    fn what_is_never_compressed_and_what_the_fields_become() {
        let html = ("content-type", "text/html; charset=utf-8");
        let (e, h) = decide(
            &[
                html,
                ("content-length", "5000"),
                ("etag", "\"v1\""),
                ("accept-ranges", "bytes"),
            ],
            200,
            false,
        );
        assert_eq!(e, Some(Encoding::Gzip));
        assert_eq!(h["content-encoding"], "gzip");
        assert_eq!(h["vary"], "accept-encoding");
        assert_eq!(h["etag"], "W/\"v1\"");
        assert!(!h.contains_key("content-length") && !h.contains_key("accept-ranges"));
        let (_, h) = decide(
            &[html, ("etag", "W/\"v1\""), ("vary", "Origin")],
            200,
            false,
        );
        assert_eq!(h["etag"], "W/\"v1\"", "a weak ETag stays as it is");
        assert_eq!(
            h.get_all("vary").iter().collect::<Vec<_>>(),
            ["Origin", "accept-encoding"]
        );
        type Case<'a> = (&'a [(&'a str, &'a str)], u16, bool);
        let never: [Case<'_>; 9] = [
            (&[html, ("content-encoding", "br")], 200, false),
            (&[html, ("content-range", "bytes 0-9/100")], 200, false),
            (&[html], 206, false),
            (&[html], 204, false),
            (&[html], 304, false),
            (
                &[html, ("cache-control", "public, no-transform")],
                200,
                false,
            ),
            (&[("content-type", "image/png")], 200, false),
            (&[html, ("content-length", "1023")], 200, false),
            (&[html], 200, true),
        ];
        for (fields, status, head) in never {
            let (e, h) = decide(fields, status, head);
            assert_eq!(e, None, "{fields:?} {status} head={head}");
            assert!(
                !h.contains_key("content-encoding")
                    || fields.iter().any(|f| f.0 == "content-encoding")
            );
        }
        // A HEAD gets the Vary a GET would; a type not listed gets none.
        assert_eq!(decide(&[html], 200, true).1["vary"], "accept-encoding");
        assert!(!decide(&[("content-type", "image/png")], 200, false)
            .1
            .contains_key("vary"));
        let (e, _) = decide(&[("content-type", "Application/JSON")], 200, false);
        assert_eq!(e, Some(Encoding::Gzip), "types compare without case");
        // ballast's own short answers (a 502's text) are known short without the field.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let config = config();
        let n = Negotiated {
            config: &config,
            encoding: Some(Encoding::Gzip),
            head: false,
        };
        assert!(start(StatusCode::BAD_GATEWAY, &mut h, Some(16), &n, false).is_none());
    }
}
