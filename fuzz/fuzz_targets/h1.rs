//! Arbitrary bytes through ballast's HTTP/1.1 framing (`ballast::h1`), as a request stream
//! and as a response. Never panics, and:
//! - reading in pieces gives the same verdict as reading at once (a socket splits bytes
//!   anywhere): the same head length or refusal, the same body data or body error;
//! - decoded body data are never more than the input, and consumed counts stay in bounds;
//! - parsing from shared memory (`parse_request_shared`) gives the same verdict and head;
//! - an accepted HTTP/1.1 request written back out by `h1::encode` parses to the same
//!   method, target, fields and framing;
//! - the fast path's relayed head (`RequestFields::write_relayed`) parses to the same fields
//!   as the map path's (`proxy::headers::remove_hop_by_hop`, `add_forwarded`, then
//!   `encode::request_head`), for every framing a backend may be sent.
//!
//! The first input byte picks the piece size for the split reading and, for the response
//! pass, the request method.
#![no_main]

use ballast::h1::client::RelayedHead;
use ballast::h1::{self, encode, BodyDecoder, Framing, Limits, Rejection};
use ballast::proxy::headers;
use http::{header, HeaderMap, HeaderValue, Method, Version};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_head: 2048,
    max_headers: 32,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let step = usize::from(control % 17) + 1;
    requests(input, step);
    let method = [Method::GET, Method::HEAD, Method::CONNECT, Method::POST][usize::from(control >> 6)].clone();
    response(input, step, &method, control & 0x20 != 0);
});

/// The verdict on one head: its length (or "incomplete") or the refusal.
fn head_at_once(buf: &[u8]) -> Result<Option<(h1::RequestHead, usize)>, Rejection> {
    h1::parse_request(buf, &LIMITS)
}

/// Reads a head the way a connection does: parse what has arrived, read `step` more bytes
/// when incomplete.
fn head_in_pieces(buf: &[u8], step: usize) -> Result<Option<usize>, Rejection> {
    let mut have = step.min(buf.len());
    loop {
        match h1::parse_request(&buf[..have], &LIMITS)? {
            Some((_, len)) => return Ok(Some(len)),
            None if have == buf.len() => return Ok(None),
            None => have = have.saturating_add(step).min(buf.len()),
        }
    }
}

/// Decodes one body; returns the data, the bytes consumed, and whether it ended well
/// (`None` = still open when the input ran out, which `end_of_input` then judges).
fn body(framing: Framing, input: &[u8], step: usize) -> (Vec<u8>, usize, Result<(), h1::BodyError>) {
    let mut decoder = BodyDecoder::new(framing, LIMITS.max_head);
    let mut data = Vec::new();
    let mut at = 0;
    let mut end = step.min(input.len());
    while !decoder.is_done() {
        match decoder.decode(&input[at..end]) {
            Ok(out) => {
                assert!(out.consumed <= end - at, "consumed past the input");
                assert!(out.data.end <= out.consumed, "data outside what was consumed");
                data.extend_from_slice(&input[at..end][out.data]);
                at += out.consumed;
                if at == end {
                    if end == input.len() {
                        let verdict = if decoder.is_done() { Ok(()) } else { decoder.end_of_input() };
                        return (data, at, verdict);
                    }
                    end = end.saturating_add(step).min(input.len());
                }
            }
            Err(e) => return (data, at, Err(e)),
        }
    }
    (data, at, Ok(()))
}

/// Split and whole readings agree on the data and the verdict, and, when the body ended
/// well, on where it ended (after an error, how far each got before it differs by design).
fn same_body(
    whole: (&Vec<u8>, usize, Result<(), h1::BodyError>),
    pieces: (&Vec<u8>, usize, Result<(), h1::BodyError>),
) {
    assert_eq!(whole.2, pieces.2, "body verdict differs in pieces");
    if whole.2.is_ok() {
        assert_eq!(whole, pieces, "body differs in pieces");
    } else {
        // Data handed on before the error: the split reading may have handed on a prefix
        // of the whole reading's, never anything else.
        let n = whole.0.len().min(pieces.0.len());
        assert_eq!(whole.0[..n], pieces.0[..n], "body data differ in pieces");
    }
}

fn requests(mut input: &[u8], step: usize) {
    // A bounded number of pipelined requests.
    for _ in 0..8 {
        let whole = head_at_once(input);
        let pieces = head_in_pieces(input, step);
        match (&whole, &pieces) {
            (Ok(Some((_, a))), Ok(Some(b))) => assert_eq!(a, b, "head length differs in pieces"),
            (Ok(None), Ok(None)) => {}
            (Err(a), Err(b)) => assert_eq!(a.status, b.status, "refusal differs in pieces"),
            _ => panic!("head verdict differs in pieces: {whole:?} vs {pieces:?}"),
        }
        // Parsing from shared memory (the server's way) gives the same head.
        let shared = h1::parse_request_shared(&bytes::Bytes::copy_from_slice(input), &LIMITS);
        match (&whole, &shared) {
            (Ok(Some((a, la))), Ok(Some((b, lb)))) => {
                assert_eq!(
                    (la, &a.method, &a.target, a.fields.to_header_map(), a.framing),
                    (lb, &b.method, &b.target, b.fields.to_header_map(), b.framing)
                );
            }
            (Ok(None), Ok(None)) => {}
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("shared parse differs: {whole:?} vs {shared:?}"),
        }
        let Ok(Some((head, len))) = whole else { return };
        assert!(len <= input.len() && len <= LIMITS.max_head);
        assert!(!matches!(head.framing, Framing::UntilClose | Framing::Tunnel));
        round_trip(&head);
        relayed_as_mapped(&head);
        let rest = &input[len..];
        let (data, used, verdict) = body(head.framing, rest, usize::MAX);
        let (data2, used2, verdict2) = body(head.framing, rest, step);
        same_body((&data, used, verdict), (&data2, used2, verdict2));
        assert!(data.len() <= used && used <= rest.len());
        if let Framing::Length(n) = head.framing {
            assert!(data.len() as u64 <= n);
        }
        if verdict.is_err() || !head.keep_alive {
            return;
        }
        input = &rest[used..];
    }
}

fn without_framing(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::TRANSFER_ENCODING);
    h
}

fn round_trip(head: &h1::RequestHead) {
    if head.version != Version::HTTP_11 {
        return;
    }
    let target = head.target.to_string();
    let mut out = Vec::new();
    let headers = head.fields.to_header_map();
    encode::request_head(&mut out, &head.method, &target, &headers, head.framing);
    let again = match h1::parse_request(&out, &Limits { max_head: usize::MAX, ..LIMITS }) {
        Ok(Some((again, len))) => {
            assert_eq!(len, out.len());
            again
        }
        other => panic!("re-encoded head {:?} parsed as {other:?}", String::from_utf8_lossy(&out)),
    };
    assert_eq!(again.method, head.method);
    assert_eq!(again.target, head.target);
    assert_eq!(again.framing, head.framing);
    assert_eq!(without_framing(&again.fields.to_header_map()), without_framing(&headers));
    assert_eq!((again.expect_continue, again.upgrade), (head.expect_continue, head.upgrade));
    // Re-encoding never loses keep-alive; it may gain it: a head with both Transfer-Encoding
    // and Content-Length closes after its response, and its re-encoding has one framing.
    assert!(again.keep_alive || !head.keep_alive);
}

/// Parses a head ballast wrote for a backend.
fn reparse(out: &[u8]) -> h1::RequestHead {
    let limits = Limits { max_head: usize::MAX, max_headers: 1024 };
    match h1::parse_request(out, &limits) {
        Ok(Some((again, len))) if len == out.len() => again,
        other => panic!("written head {:?} parsed as {other:?}", String::from_utf8_lossy(out)),
    }
}

fn relayed_as_mapped(head: &h1::RequestHead) {
    // What the request path relays as lines (`proxy::http::prepare`).
    if head.version != Version::HTTP_11
        || head.fields.has_upgrade()
        || head.method == Method::CONNECT
        || head.target.scheme().is_some()
    {
        return;
    }
    let target = head.target.path_and_query().map_or("/", |pq| pq.as_str());
    let client = HeaderValue::from_static("192.0.2.7");
    for framing in [Framing::Empty, Framing::Length(3), Framing::Chunked] {
        let mut map = head.fields.to_header_map();
        headers::remove_hop_by_hop(&mut map);
        map.remove(header::EXPECT);
        headers::add_forwarded(&mut map, &client, "https");
        let mut mapped = Vec::new();
        encode::request_head(&mut mapped, &head.method, target, &map, framing);
        let relayed = RelayedHead { fields: head.fields.clone(), client: client.as_bytes(), proto: "https" };
        let mut lines = Vec::new();
        encode::relayed_request_head(&mut lines, &head.method, target, &relayed, framing);
        let (a, b) = (reparse(&mapped), reparse(&lines));
        assert_eq!((&a.method, &a.target, a.framing), (&b.method, &b.target, b.framing));
        assert_eq!(
            a.fields.to_header_map(),
            b.fields.to_header_map(),
            "map path {:?}, relayed {:?}",
            String::from_utf8_lossy(&mapped),
            String::from_utf8_lossy(&lines)
        );
    }
}

fn response(input: &[u8], step: usize, method: &Method, upgrade: bool) {
    let Ok(Some((head, len))) = h1::parse_response(input, &LIMITS, method, upgrade) else {
        return;
    };
    assert!(len <= input.len());
    if head.framing == Framing::Tunnel {
        assert!(!head.keep_alive);
        return;
    }
    let rest = &input[len..];
    let (data, used, verdict) = body(head.framing, rest, usize::MAX);
    let (data2, used2, verdict2) = body(head.framing, rest, step);
    same_body((&data, used, verdict), (&data2, used2, verdict2));
    if head.framing == Framing::UntilClose {
        assert!(!head.keep_alive);
    }
}
