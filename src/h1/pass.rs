//! A backend's response fields on their way to an HTTP/1.1 client, written as field lines
//! once, while the backend's head is parsed, and copied into the client's head as they are.
//!
//! Why not an `http::HeaderMap`: for a response that ballast only relays, building the map
//! (a name lookup, a hash and an insert per field), taking the hop-by-hop fields out of it
//! and walking it again to write the client's head is work for nothing; relaying the lines
//! saved about 1,000 of the 25,600 instructions of a proxied keep-alive request (callgrind,
//! issue 24; BENCHMARKS.md). nginx and HAProxy relay the lines without a map. A map is still made, by [`PassFields::to_header_map`],
//! where something needs one: the route's response header rules, or an HTTP/2 client.
//!
//! What a map did is done here, in the same pass: each value is checked as `HeaderValue`
//! checks it; the hop-by-hop fields, and the fields `Connection` names, are left out (as
//! `proxy::headers::remove_hop_by_hop` leaves them out of a map); `Transfer-Encoding` and
//! `Content-Length` are left out of the lines, because ballast writes its own framing field,
//! and the length is kept aside for an answer without a body (HEAD, 304), which carries it.
//! Names keep the backend's case, as nginx relays them; HTTP/1.1 names are case-insensitive.

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::HeaderMap;

/// A response's fields, ready to be written to an HTTP/1.1 client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassFields {
    /// `name: value\r\n` for each field passed on, in the backend's order.
    lines: Vec<u8>,
    /// The backend's `Content-Length`, checked; written only for an answer without a body.
    content_length: Option<u64>,
    /// Whether a `Date` line is among the lines.
    date: bool,
}

/// What a field's name means to the way through ballast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Known {
    Connection,
    ContentLength,
    TransferEncoding,
    Upgrade,
    /// `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`: hop-by-hop, and nothing else to us.
    HopByHop,
    Date,
    Other,
}

impl Known {
    /// Compares by length first: most names are none of these, and cost one `match`.
    pub(super) fn of(name: &[u8]) -> Known {
        let is = |known: &[u8]| same_lowercase(name, known);
        match name.len() {
            2 if is(b"te") => Known::HopByHop,
            4 if is(b"date") => Known::Date,
            7 if is(b"upgrade") => Known::Upgrade,
            7 if is(b"trailer") => Known::HopByHop,
            10 if is(b"connection") => Known::Connection,
            10 if is(b"keep-alive") => Known::HopByHop,
            14 if is(b"content-length") => Known::ContentLength,
            16 if is(b"proxy-connection") => Known::HopByHop,
            17 if is(b"transfer-encoding") => Known::TransferEncoding,
            _ => Known::Other,
        }
    }
}

/// `name` equals `lower` (lowercase letters and `-`) but for case, eight bytes at a time.
/// Setting bit 5 lowercases a letter and keeps `-`; of the bytes a field name may hold
/// (tokens), only the letter's own two cases map onto a letter, and only `-` onto `-`.
pub(super) fn same_lowercase(name: &[u8], lower: &[u8]) -> bool {
    if name.len() != lower.len() {
        return false;
    }
    let mut a = name.chunks_exact(8);
    let mut b = lower.chunks_exact(8);
    for (x, y) in (&mut a).zip(&mut b) {
        let x = u64::from_le_bytes(x.try_into().unwrap_or_default());
        let y = u64::from_le_bytes(y.try_into().unwrap_or_default());
        if x | 0x2020_2020_2020_2020 != y {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}

/// A field value `HeaderValue` accepts: visible ASCII, obs-text, spaces and tabs.
///
/// Eight bytes at a time: a word with no byte below 0x20 and none equal to 0x7f is valid
/// as it is (bytes from 0x80 up are obs-text), and only a word with one of those (a tab,
/// or a bad byte) is looked at byte by byte. Byte by byte throughout, the check was about
/// 240 instructions of a typical response.
pub(super) fn valid_value(value: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let byte_ok = |b: &u8| (*b >= 0x20 && *b != 0x7f) || *b == b'\t';
    let mut words = value.chunks_exact(8);
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // Exact tests for "some byte is below 0x20" and "some byte is 0x7f".
        let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        let del = x ^ (ONES * 0x7f);
        let has_del = del.wrapping_sub(ONES) & !del & HIGHS;
        if (below_space | has_del) != 0 && !word.iter().all(byte_ok) {
            return false;
        }
    }
    words.remainder().iter().all(byte_ok)
}

impl PassFields {
    /// The fields of `headers` (name, value, and what the name means) that a client is
    /// sent, `Connection`'s `named` fields left out; `content_length` is the checked length.
    pub(super) fn build<'h>(
        headers: impl Iterator<Item = (&'h [u8], &'h [u8], Known)>,
        named: &[&[u8]],
        content_length: Option<u64>,
        capacity: usize,
    ) -> PassFields {
        let mut lines = Vec::with_capacity(capacity);
        let mut date = false;
        for (name, value, known) in headers {
            match known {
                Known::Other | Known::Date => {
                    if named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                        continue;
                    }
                    date |= known == Known::Date;
                }
                _ => continue,
            }
            lines.extend_from_slice(name);
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(value);
            lines.extend_from_slice(b"\r\n");
        }
        PassFields {
            lines,
            content_length,
            date,
        }
    }

    /// The field lines, each ending in CRLF.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// The backend's `Content-Length`, for an answer without a body.
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// Whether the backend sent `Date`.
    pub fn has_date(&self) -> bool {
        self.date
    }

    /// The same fields as a map, `Content-Length` included: what a map-based path (header
    /// rules, HTTP/2 to the client) would have had.
    pub fn to_header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::new();
        self.append_to(&mut map);
        map
    }

    /// Appends the fields to `map` (after what it holds).
    pub fn append_to(&self, map: &mut HeaderMap) {
        append_lines(&self.lines, map);
        if let Some(n) = self.content_length {
            map.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// Appends to `map` the fields of `lines`, field lines as ballast writes them
/// (`name: value`, each ending in CRLF, names and values already checked).
pub(super) fn append_lines(lines: &[u8], map: &mut HeaderMap) {
    for line in lines.split(|&b| b == b'\n') {
        let Some(line) = line.strip_suffix(b"\r") else {
            continue;
        };
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 2..]);
        // Both were checked when the lines were made; a failure cannot happen.
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_known_whatever_their_case() {
        for (name, known) in [
            ("Connection", Known::Connection),
            ("CONTENT-LENGTH", Known::ContentLength),
            ("transfer-encoding", Known::TransferEncoding),
            ("Upgrade", Known::Upgrade),
            ("TE", Known::HopByHop),
            ("Trailer", Known::HopByHop),
            ("Keep-Alive", Known::HopByHop),
            ("Proxy-Connection", Known::HopByHop),
            ("Date", Known::Date),
            ("Content-Type", Known::Other),
            ("connectioN2", Known::Other),
            ("content_length", Known::Other),
            ("Content-Lengtx", Known::Other),
            ("Transfer-EncodinG", Known::TransferEncoding),
            ("Transfer-Encodinh", Known::Other),
            ("DATE", Known::Date),
            ("Dat`", Known::Other),
            ("tf", Known::Other),
        ] {
            assert_eq!(Known::of(name.as_bytes()), known, "{name}");
        }
    }

    fn fields(list: &[(&str, &str)], named: &[&str], length: Option<u64>) -> PassFields {
        let named: Vec<&[u8]> = named.iter().map(|n| n.as_bytes()).collect();
        PassFields::build(
            list.iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes(), Known::of(n.as_bytes()))),
            &named,
            length,
            64,
        )
    }

    #[test]
    fn hop_by_hop_framing_and_named_fields_stay_behind() {
        let f = fields(
            &[
                ("Content-Type", "text/plain"),
                ("Connection", "close, X-Private"),
                ("X-Private", "secret"),
                ("Keep-Alive", "timeout=5"),
                ("Transfer-Encoding", "chunked"),
                ("Content-Length", "12"),
                ("Set-Cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("Date", "Mon, 07 Dec 2026 10:00:00 GMT"),
            ],
            &["X-Private"],
            Some(12),
        );
        assert_eq!(
            String::from_utf8_lossy(f.lines()),
            "Content-Type: text/plain\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\
             Date: Mon, 07 Dec 2026 10:00:00 GMT\r\n"
        );
        assert_eq!((f.content_length(), f.has_date()), (Some(12), true));
        let map = f.to_header_map();
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
        assert_eq!(map["content-length"], "12");
        assert_eq!(map["content-type"], "text/plain");
        assert!(!map.contains_key("x-private") && !map.contains_key("connection"));
        // A `Date` that `Connection` names is hop-by-hop too: ballast then writes its own.
        let f = fields(&[("Date", "x"), ("Connection", "date")], &["date"], None);
        assert_eq!((f.lines(), f.has_date()), (&b""[..], false));
    }

    #[test]
    fn values_are_checked_as_a_header_value_is() {
        assert!(valid_value(b"a b\tc \x80\xff"));
        assert!(!valid_value(b"a\x7f"));
        assert!(!valid_value(b"a\x00"));
        assert!(!valid_value(b"a\rb"));
        assert!(!valid_value(b"a\nb"));
        // Every byte, at every position of a word and in the remainder, against
        // `HeaderValue`'s own verdict.
        for b in 0..=255u8 {
            for at in 0..19 {
                let mut v = b"Mon, 07 Dec 2026 1".to_vec();
                v.insert(at, b);
                assert_eq!(
                    valid_value(&v),
                    HeaderValue::from_bytes(&v).is_ok(),
                    "byte {b:#x} at {at}"
                );
            }
        }
    }
}
