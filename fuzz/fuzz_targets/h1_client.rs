//! Arbitrary bytes as a backend's answer to ballast's own HTTP/1.1 client
//! (`ballast::h1::client`), read through a scripted stream that hands them over in pieces
//! and is not ready every other time. Never panics, never loops, and:
//! - the exchange ends in a bounded number of polls (every read makes progress);
//! - the head it returns is the first final head a one-shot parse finds (interim 1xx heads
//!   skipped), and the body data and verdict are what a one-shot decode of the rest gives;
//! - a connection is given back only after a keep-alive response whose body ended well,
//!   and then only what was read is behind it: if the stream holds more, the idle check
//!   refuses the connection.
//!
//! The first input byte picks the piece size and the request method.
#![no_main]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use ballast::h1::client::{ClientConfig, Conn};
use ballast::h1::{self, BodyDecoder, Framing, Limits};
use bytes::Bytes;
use http::Method;
use http_body::Body;
use http_body_util::Empty;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

const LIMITS: Limits = Limits {
    max_head: 2048,
    max_headers: 32,
};

/// A backend that sends `input` in pieces of `step` bytes, is not ready every other read,
/// and takes whatever is written.
struct Script {
    input: Vec<u8>,
    at: usize,
    step: usize,
    stall: bool,
}

impl AsyncRead for Script {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.stall = !self.stall;
        if self.stall {
            return Poll::Pending;
        }
        let n = self.step.min(self.input.len() - self.at).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Script {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The first final head in `input` (interim ones skipped), with where its body begins.
fn final_head(input: &[u8], method: &Method) -> Option<Result<(h1::ResponseHead, usize), ()>> {
    let mut at = 0;
    loop {
        match h1::parse_response(&input[at..], &LIMITS, method, false) {
            Ok(Some((head, len))) if head.interim => at += len,
            Ok(Some((head, len))) => return Some(Ok((head, at + len))),
            Ok(None) => return None,
            Err(_) => return Some(Err(())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(control % 13) + 1;
    let method = [Method::GET, Method::HEAD, Method::POST, Method::DELETE][usize::from(control >> 6)].clone();
    let config = ClientConfig { limits: LIMITS, read_size: 512 };
    let io = Script { input: input.to_vec(), at: 0, step, stall: false };
    let conn = Conn::new(io, CancellationToken::new(), config);
    let req = http::Request::builder().method(method.clone()).uri("/").header("host", "b")
        .body(Empty::<Bytes>::new()).expect("a valid request");
    let mut cx = Context::from_waker(Waker::noop());
    // Each read moves at least one byte every second poll: this many polls always suffice.
    let bound = 4 * input.len() + 16;

    let mut exchange = conn.send(req);
    let mut polled = None;
    for _ in 0..bound {
        if let Poll::Ready(r) = Pin::new(&mut exchange).poll(&mut cx) {
            polled = Some(r);
            break;
        }
    }
    let polled = polled.expect("the exchange did not end");
    let expected = final_head(input, &method);
    let resp = match (polled, expected) {
        (Ok(mut resp), Some(Ok((head, body_at)))) => {
            assert_eq!(resp.status(), head.status);
            // The fields ride in the map (a tunnel) or, written for the client, in the body.
            let mut got = resp.headers().clone();
            if let Some(fields) = resp.body_mut().take_fields() {
                fields.append_to(&mut got);
            }
            assert_eq!(got, head.fields.to_header_map());
            (resp, head, body_at)
        }
        (Err(_), Some(Err(()))) | (Err(_), None) => return,
        (Ok(resp), other) => panic!("client accepted {} where a one-shot parse gives {:?}", resp.status(), other.map(|o| o.map(|(h, _)| h.status))),
        (Err(e), Some(Ok((head, _)))) => panic!("client failed ({}) where a one-shot parse gives {}", e.error, head.status),
    };
    let (resp, head, body_at) = resp;
    if head.framing == Framing::Tunnel {
        return;
    }

    // The body, read the way the proxy reads it.
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut verdict = None;
    for _ in 0..bound {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(d) = frame.into_data() {
                    got.extend_from_slice(&d);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                verdict = Some(false);
                break;
            }
            Poll::Ready(None) => {
                verdict = Some(true);
                break;
            }
            Poll::Pending => {}
        }
    }
    let verdict = verdict.expect("the body did not end");

    // The same bytes decoded at once.
    let rest = &input[body_at..];
    let mut decoder = BodyDecoder::new(head.framing, LIMITS.max_head);
    let mut want = Vec::new();
    let mut at = 0;
    let mut ok = true;
    while !decoder.is_done() {
        match decoder.decode(&rest[at..]) {
            Ok(d) => {
                want.extend_from_slice(&rest[at..][d.data]);
                at += d.consumed;
                if at == rest.len() && !decoder.is_done() {
                    ok = decoder.end_of_input().is_ok();
                    break;
                }
            }
            Err(_) => {
                ok = false;
                break;
            }
        }
    }
    assert_eq!(verdict, ok, "body verdict differs from a one-shot decode");
    if ok {
        assert_eq!(got, want, "body data differ from a one-shot decode");
    } else {
        let n = got.len().min(want.len());
        assert_eq!(got[..n], want[..n], "body data differ before the error");
    }

    if let Some(mut conn) = body.take_conn() {
        assert!(ok && head.keep_alive, "a connection given back after a broken or closing response");
        let leftover = rest.len() - at;
        // Bytes the client has not read yet make the idle check refuse it.
        if leftover > 0 {
            // Two checks: the script is not ready every other time.
            let refused = !conn.is_reusable() || !conn.is_reusable();
            assert!(refused, "{leftover} stray bytes behind a kept connection");
        }
    }
});
