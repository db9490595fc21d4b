//! ballast's own HTTP/1.1 message framing (RFC 9112), for the proxy path.
//!
//! Why not hyper's: hyper's HTTP/1 server keeps an 8 KiB read buffer and a write buffer per
//! connection for the connection's whole life, and hands each request to the proxy through a
//! dispatch loop and a channel. Profiles of ballast (BENCHMARKS.md, issue 10) put most of the
//! remaining CPU gap to HAProxy and nginx, and most of the memory per idle or busy
//! connection, there. HAProxy, nginx and Pingora frame HTTP/1 themselves, with buffers that
//! live only while a message is in flight. This module is that framing: pure functions and
//! small state machines over byte slices, unit-tested case by case, fuzzed
//! (`fuzz/fuzz_targets/h1.rs`) and compared against hyper's verdicts on a corpus
//! (`tests/h1_differential.rs`); and a server connection built on them.
//!
//! - `head`: request and response heads (httparse underneath) with the RFC 9112 checks that
//!   httparse leaves to its caller, and the framing a head implies.
//! - `body`: incremental body decoding (Content-Length, chunked, until close).
//! - `encode`: writing heads and chunk framing.
//! - `pass`: a backend's response fields, written once as the HTTP/1.1 client is sent them
//!   (no `HeaderMap` for a response that is only relayed).
//! - `request_fields`: a client's request fields as the head's bytes and an index, relayed
//!   to an HTTP/1.1 backend without a `HeaderMap` when nothing on the way needs one.
//! - `server`: an HTTP/1.1 server connection over those (`tests/h1_server.rs`); it serves
//!   HTTP/1.1 on ballast's HTTP listeners, plain or TLS (`listener::Conn::serve_own_h1`);
//!   HTTP/2 stays on hyper.
//!
//! # Choices where RFC 9112 lets a recipient choose
//! Where the RFC allows leniency, a proxy that is lenient is a smuggling risk: the backend
//! may read the same bytes differently. So ballast refuses what it may refuse, with one
//! exception that ballast's behaviour before its own codec already pinned (tests/hardening.rs):
//! - `Transfer-Encoding` together with `Content-Length` in a request: chunked decides, the
//!   length is removed before forwarding, and the connection closes after the response
//!   (§6.3 ¶3; HAProxy does the same, nginx refuses). A `Content-Length` that is invalid in
//!   itself is still refused.
//! - `Transfer-Encoding` in an HTTP/1.0 request: 400 (§6.1: framing is faulty).
//! - A transfer coding other than `chunked`: 501 (§6.1); `chunked` not last, or twice: 400.
//! - `Content-Length` that is not digits (a comma list included), or lines that differ:
//!   400; equal lines pass.
//! - HTTP/1.1 without exactly one `Host`: 400 (§3.2, a MUST that hyper does not enforce).
//! - An `Expect` other than `100-continue`: 417 (RFC 9110 §10.1.1); in HTTP/1.0 ignored.
//! - obs-fold, bare CR, whitespace before a field's colon: 400 (§5.1, §5.2, §2.2).
//! - A bare LF ends a line in a head (§2.2 allows it; ballast writes CRLF upstream, so the
//!   backend never sees it), but not in chunked framing, where lenient line endings have
//!   been a smuggling vector: chunk lines and the CRLF after chunk data must be exact.
//! - Chunk sizes: at most 16 hex digits, no overflow; a chunk line (size and extensions) at
//!   most [`body::MAX_CHUNK_LINE`] bytes, all extensions of a body at most
//!   [`body::MAX_CHUNK_EXTENSIONS`]; trailers count against the head size limit and are
//!   dropped (ballast re-frames bodies; extensions and trailers are hop-by-hop here); a
//!   control byte in an extension is refused (hyper skips extensions unread).
//! - A response with an invalid length, obs-fold or bare CR: 502 (§6.3 ¶5, §5.2).

pub mod body;
pub mod client;
pub mod encode;
pub mod head;
pub mod pass;
pub mod request_fields;
pub mod server;

pub use body::{BodyDecoder, BodyError, Decoded};
pub use head::{
    parse_request, parse_request_shared, parse_response, Framing, Limits, RequestHead,
    ResponseFields, ResponseHead,
};
pub use pass::PassFields;
pub use request_fields::RequestFields;

use http::StatusCode;

/// Why a message was refused: the status to answer with (4xx/5xx for a request, 502 for a
/// backend's response) and a reason for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Rejection {
    pub(crate) const fn bad_request(reason: &'static str) -> Self {
        Rejection {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    pub(crate) const fn bad_gateway(reason: &'static str) -> Self {
        Rejection {
            status: StatusCode::BAD_GATEWAY,
            reason,
        }
    }
}
