//! SNI passthrough on TCP listeners (`sni_routes`): the pool is chosen by the host name a
//! TLS client's ClientHello asks for, and TLS is not terminated. Every byte read here, the
//! ClientHello included, is forwarded to the backend as it came, so the TLS session runs
//! end to end between the client and the backend (Traefik's `HostSNI`, HAProxy's
//! `req.ssl_sni`).
//!
//! The reading is bounded in size ([`MAX_PEEK`]) and time (the listener's
//! `request_header_timeout`), and a ClientHello split over several records or TCP segments
//! is read whole (`tls::client_hello`). Bytes that are not a ClientHello, or not all of one
//! in time, are forwarded too, to the listener's pool, unless `sni_required` refuses them:
//! the same as HAProxy, whose rules run on what arrived once `inspect-delay` ends.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::tcp::ClientConn;
use crate::tls::client_hello::{self, Hello};

/// The most read before deciding. Real ClientHellos are a few hundred bytes to 2 KiB
/// (post-quantum key shares included); this leaves room for large session tickets while
/// keeping what a thousand slow clients can make ballast hold small.
pub const MAX_PEEK: usize = 16 * 1024;

/// What the start of a TCP client's bytes said.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    /// A whole ClientHello, and the host name it asks for, if any.
    Hello(Option<Box<str>>),
    /// No ClientHello to route by; why, for the log.
    NotHello(&'static str),
    /// The client closed, or its connection failed, before sending a byte: nothing to
    /// forward.
    Gone,
}

/// Reads the start of `client`'s bytes until they hold a whole ClientHello or show they do
/// not, within `timeout`. What was read stays in `client`, to be sent to the backend first.
pub async fn peek(client: &mut ClientConn, timeout: Duration) -> Peeked {
    match client {
        ClientConn::Copy(stream) => {
            let mut seen = Vec::new();
            let peeked = read_hello(stream, &mut seen, timeout).await;
            stream.put_back(&seen);
            peeked
        }
        // The bytes read past a PROXY header are already in `prefix`, which is written to
        // the backend before splicing starts.
        ClientConn::Splice(stream, prefix) => read_hello(stream, prefix, timeout).await,
    }
}

/// Reads from `r` onto `seen` (which may already hold the first bytes) until
/// `client_hello::sni` can decide.
async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
    seen: &mut Vec<u8>,
    timeout: Duration,
) -> Peeked {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !seen.is_empty() {
            match client_hello::sni(seen) {
                Hello::Sni(name) => return Peeked::Hello(name),
                Hello::Invalid => return Peeked::NotHello("not a TLS ClientHello"),
                Hello::Incomplete => {}
            }
        }
        let room = MAX_PEEK.saturating_sub(seen.len());
        if room == 0 {
            return Peeked::NotHello("no whole ClientHello in the first 16 KiB");
        }
        // Straight into `seen`: no buffer of its own in the connection's future.
        seen.reserve(room.min(4096));
        let mut limited = (&mut *r).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(seen)).await {
            Err(_) => {
                return Peeked::NotHello("no whole ClientHello within request_header_timeout")
            }
            Ok(Ok(0) | Err(_)) if seen.is_empty() => return Peeked::Gone,
            Ok(Ok(0) | Err(_)) => return Peeked::NotHello("closed before a whole ClientHello"),
            Ok(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A ClientHello for `api.example.com` in one record (the fuzz corpus's seed, made by
    /// openssl).
    fn hello() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fuzz/corpus/client_hello/openssl"
        ))
        .expect("the seed ClientHello")
    }

    #[tokio::test]
    async fn a_hello_split_over_segments_is_read_whole() {
        let bytes = hello();
        let (mut w, mut r) = tokio::io::duplex(64);
        let feed = bytes.clone();
        tokio::spawn(async move {
            for piece in feed.chunks(7) {
                w.write_all(piece).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        let mut seen = Vec::new();
        let peeked = read_hello(&mut r, &mut seen, Duration::from_secs(5)).await;
        assert_eq!(peeked, Peeked::Hello(Some("api.example.com".into())));
        assert_eq!(seen, bytes, "every byte read is kept to forward");
    }

    #[tokio::test]
    async fn a_partial_hello_stops_at_the_timeout_and_a_silent_close_is_gone() {
        let bytes = hello();
        let (mut w, mut r) = tokio::io::duplex(64 * 1024);
        w.write_all(&bytes[..20]).await.unwrap();
        let mut seen = Vec::new();
        let peeked = read_hello(&mut r, &mut seen, Duration::from_millis(200)).await;
        assert_eq!(
            peeked,
            Peeked::NotHello("no whole ClientHello within request_header_timeout")
        );
        assert_eq!(seen, bytes[..20]);

        let (w, mut r) = tokio::io::duplex(64);
        drop(w);
        let mut seen = Vec::new();
        assert_eq!(
            read_hello(&mut r, &mut seen, Duration::from_secs(3)).await,
            Peeked::Gone
        );
    }

    #[tokio::test]
    async fn other_bytes_and_endless_records_are_not_a_hello() {
        let (mut w, mut r) = tokio::io::duplex(64 * 1024);
        w.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut seen = Vec::new();
        let peeked = read_hello(&mut r, &mut seen, Duration::from_secs(5)).await;
        assert_eq!(peeked, Peeked::NotHello("not a TLS ClientHello"));
        assert_eq!(seen, b"GET / HTTP/1.1\r\n");

        // Handshake records that never complete a message: refused at the bound, having
        // read no more than it.
        let (mut w, mut r) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            // A ClientHello header announcing 60,000 bytes, then 1 KiB records of it.
            let mut first = vec![22, 3, 1, 0, 8, 1, 0, 0xea, 0x60];
            first.extend_from_slice(&[0; 4]);
            let _ = w.write_all(&first).await;
            loop {
                let mut record = vec![22, 3, 1, 4, 0];
                record.extend_from_slice(&[0; 1024]);
                if w.write_all(&record).await.is_err() {
                    return;
                }
            }
        });
        let mut seen = Vec::new();
        let peeked = read_hello(&mut r, &mut seen, Duration::from_secs(5)).await;
        assert_eq!(
            peeked,
            Peeked::NotHello("no whole ClientHello in the first 16 KiB")
        );
        assert_eq!(seen.len(), MAX_PEEK);
    }
}
