//! Writing heads and chunk framing. ballast always writes HTTP/1.1 with CRLF line ends and
//! its own framing field: `Transfer-Encoding` in the map is skipped, and so is
//! `Content-Length` unless `framing` is `Empty` (a message without a body: a HEAD or 304
//! answer keeps the length of what it describes); the field `framing` implies is written.
//! That is how a re-framed body can never carry a stale length.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode};

use super::client::RelayedHead;
use super::{Framing, PassFields};

/// The end of a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk and an empty trailer section.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// `METHOD target HTTP/1.1`, the fields, the framing field, the blank line.
pub fn request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: Framing,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    fields(out, headers, framing);
}

/// `METHOD target HTTP/1.1`, the relayed lines and what ballast adds to them (see
/// `h1::RequestFields::write_relayed`), the framing field, the blank line.
pub fn relayed_request_head(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    relayed: &RelayedHead<'_>,
    framing: Framing,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    relayed.fields.write_relayed(
        out,
        relayed.client,
        relayed.proto,
        framing == Framing::Empty,
    );
    framing_field(out, framing);
}

/// `HTTP/1.1 code reason`, the relayed fields (`passed`), the fields of the map, the
/// framing field, the blank line. For an answer without a body (HEAD, 1xx, 204, 304) pass
/// `Empty`: a `Content-Length` in the map, or relayed, is kept.
pub fn response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    passed: Option<&PassFields>,
    headers: &HeaderMap,
    framing: Framing,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(passed) = passed {
        out.extend_from_slice(passed.lines());
        if let (Some(n), Framing::Empty) = (passed.content_length(), framing) {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    fields(out, headers, framing);
}

/// The size line that starts a chunk of `len` bytes (`len` > 0: a zero size is the end).
pub fn chunk_start(out: &mut Vec<u8>, len: usize) {
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        let nibble = (len >> (shift * 4)) & 0xf;
        out.push(b"0123456789abcdef"[nibble]);
    }
    out.extend_from_slice(CHUNK_END);
}

/// The last chunk with `trailers` as its trailer section (framing fields in it are skipped:
/// they mean nothing there).
pub fn last_chunk_with_trailers(out: &mut Vec<u8>, trailers: &HeaderMap) {
    out.extend_from_slice(b"0\r\n");
    fields(out, trailers, Framing::UntilClose);
}

fn fields(out: &mut Vec<u8>, headers: &HeaderMap, framing: Framing) {
    for (name, value) in headers {
        if name == TRANSFER_ENCODING || (name == CONTENT_LENGTH && framing != Framing::Empty) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    framing_field(out, framing);
}

/// The field `framing` calls for, then the blank line that ends the head.
fn framing_field(out: &mut Vec<u8>, framing: Framing) {
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose | Framing::Tunnel => {}
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::{parse_request, parse_response, BodyDecoder, Limits};

    const LIMITS: Limits = Limits {
        max_head: 4096,
        max_headers: 16,
    };

    #[test]
    fn heads_are_written_with_their_own_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "a".parse().unwrap());
        headers.append("x-a", "1".parse().unwrap());
        headers.append("x-a", "2".parse().unwrap());
        headers.insert("content-length", "999".parse().unwrap());
        headers.insert("transfer-encoding", "gzip".parse().unwrap());
        let mut out = Vec::new();
        request_head(&mut out, &Method::POST, "/p?q", &headers, Framing::Chunked);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "POST /p?q HTTP/1.1\r\nhost: a\r\nx-a: 1\r\nx-a: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let (head, len) = parse_request(&out, &LIMITS).unwrap().unwrap();
        assert_eq!((head.framing, len), (Framing::Chunked, out.len()));

        out.clear();
        response_head(
            &mut out,
            StatusCode::NOT_FOUND,
            None,
            &headers,
            Framing::Length(3),
        );
        assert!(out.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
        let (head, _) = parse_response(&out, &LIMITS, &Method::GET, false)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Length(3));

        out.clear();
        response_head(&mut out, StatusCode::OK, None, &headers, Framing::Empty);
        let head = String::from_utf8(out.clone()).unwrap();
        assert!(head.contains("content-length: 999\r\n"), "{head}");
        assert!(!head.contains("transfer-encoding"), "{head}");

        out.clear();
        response_head(
            &mut out,
            StatusCode::from_u16(599).unwrap(),
            None,
            &HeaderMap::new(),
            Framing::Empty,
        );
        assert_eq!(out, b"HTTP/1.1 599 \r\n\r\n");
    }

    #[test]
    fn chunks_round_trip_through_the_decoder() {
        for len in [1usize, 9, 15, 16, 255, 256, 4096, 65_535, 100_000] {
            let mut out = Vec::new();
            chunk_start(&mut out, len);
            assert_eq!(
                std::str::from_utf8(&out[..out.len() - 2]).unwrap(),
                format!("{len:x}")
            );
            out.extend(std::iter::repeat_n(b'z', len));
            out.extend_from_slice(CHUNK_END);
            out.extend_from_slice(LAST_CHUNK);
            let mut d = BodyDecoder::new(Framing::Chunked, 64);
            let mut data = 0;
            let mut at = 0;
            while !d.is_done() {
                let step = d.decode(&out[at..]).unwrap();
                data += step.data.len();
                at += step.consumed;
            }
            assert_eq!((data, at), (len, out.len()));
        }
    }
}
