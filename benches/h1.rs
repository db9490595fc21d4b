//! ballast's HTTP/1.1 framing (`ballast::h1`), the per-message work of the codec route of
//! issue 10:
//! - `parse_request`: the head wrk sends (one field) and a browser-like head (twelve),
//!   copied out of the buffer and (`_shared`) sliced from it;
//! - `parse_response`: a typical backend response head;
//! - `chunked`: decoding a 64 KiB body in 16 KiB chunks, and in 100-byte chunks (framing
//!   cost dominates);
//! - `encode`: writing a request head with its framing field.

use std::hint::black_box;

use ballast::h1::client::RelayedHead;
use ballast::h1::{self, encode, BodyDecoder, Framing, Limits};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::Method;

const LIMITS: Limits = Limits {
    max_head: 16 * 1024,
    max_headers: 100,
};

const WRK: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n";
const BROWSER: &[u8] = b"GET /static/app.js?v=3 HTTP/1.1\r\nHost: www.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: */*\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n\
Referer: https://www.example.com/\r\nConnection: keep-alive\r\n\
Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\nSec-Fetch-Dest: script\r\n\
Sec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-origin\r\nIf-None-Match: \"abc123\"\r\n\r\n";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 30 Nov 2026 21:00:00 GMT\r\n\
Content-Type: text/html\r\nContent-Length: 612\r\nLast-Modified: Mon, 30 Nov 2026 20:00:00 GMT\r\n\
Connection: keep-alive\r\nETag: \"6568-264\"\r\nAccept-Ranges: bytes\r\n\r\n";

fn heads(c: &mut Criterion) {
    let mut group = c.benchmark_group("h1/parse_request");
    for (name, raw) in [("wrk", WRK), ("browser", BROWSER)] {
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| h1::parse_request(black_box(raw), &LIMITS).map(|h| h.map(|(_, len)| len)))
        });
        // The server's way: values are slices of the head, not copies.
        let shared = bytes::Bytes::from_static(raw);
        group.bench_function(format!("{name}_shared"), |b| {
            b.iter(|| {
                h1::parse_request_shared(black_box(&shared), &LIMITS).map(|h| h.map(|(_, len)| len))
            })
        });
    }
    group.finish();
    c.bench_function("h1/parse_response/nginx", |b| {
        b.iter(|| {
            h1::parse_response(black_box(RESPONSE), &LIMITS, &Method::GET, false)
                .map(|h| h.map(|(_, len)| len))
        })
    });
}

fn chunked_body(chunk: usize, total: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let n = chunk.min(left);
        encode::chunk_start(&mut out, n);
        out.extend(std::iter::repeat_n(b'x', n));
        out.extend_from_slice(encode::CHUNK_END);
        left -= n;
    }
    out.extend_from_slice(encode::LAST_CHUNK);
    out
}

fn chunked(c: &mut Criterion) {
    let mut group = c.benchmark_group("h1/chunked_64KiB");
    group.throughput(Throughput::Bytes(64 * 1024));
    for (name, chunk) in [("16KiB_chunks", 16 * 1024), ("100B_chunks", 100)] {
        let body = chunked_body(chunk, 64 * 1024);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut d = BodyDecoder::new(Framing::Chunked, 1024);
                let (mut at, mut data) = (0, 0);
                while !d.is_done() {
                    match d.decode(black_box(&body[at..])) {
                        Ok(step) => {
                            data += step.data.len();
                            at += step.consumed;
                        }
                        Err(_) => break,
                    }
                }
                data
            })
        });
    }
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let Ok(Some((head, _))) = h1::parse_request(BROWSER, &LIMITS) else {
        panic!("the browser head parses");
    };
    let target = head.target.to_string();
    let headers = head.fields.to_header_map();
    let mut out = Vec::with_capacity(1024);
    c.bench_function("h1/encode/request_head_browser", |b| {
        b.iter(|| {
            out.clear();
            encode::request_head(&mut out, &head.method, &target, &headers, head.framing);
            out.len()
        })
    });
    // The same head relayed as lines (`h1::RequestFields`), `X-Forwarded-*` included: what
    // a request costs the HTTP/1.1 fast path after its parse, against the map's
    // `to_header_map` + `request_head` above (which does not yet add those fields).
    let relayed = RelayedHead {
        fields: head.fields.clone(),
        client: b"192.0.2.7",
        proto: "http",
    };
    c.bench_function("h1/encode/relayed_request_head_browser", |b| {
        b.iter(|| {
            out.clear();
            encode::relayed_request_head(&mut out, &head.method, &target, &relayed, head.framing);
            out.len()
        })
    });
    c.bench_function("h1/fields/to_header_map_browser", |b| {
        b.iter(|| black_box(&head.fields).to_header_map().len())
    });
}

criterion_group!(benches, heads, chunked, encoding);
criterion_main!(benches);
