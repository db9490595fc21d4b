//! The server name (SNI) a TLS client asks for, read from the raw bytes of its ClientHello
//! (RFC 8446 §4.1.2, RFC 6066 §3).
//!
//! rustls checks the name during the handshake, but its unbuffered API, which ballast's
//! server stream uses, does not hand it back; a route's `sni` matcher needs it. So this
//! reads it from the records before rustls consumes them. Everything is bounded by what the
//! caller holds (a TLS stream holds at most one handshake message); malformed input is
//! [`Hello::Invalid`], never a panic (`fuzz/` runs it on arbitrary bytes).

/// What the bytes at the start of a TLS connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A whole ClientHello, and the host name it asks for, if any.
    Sni(Option<Box<str>>),
    /// A ClientHello may follow, but not all of it has arrived.
    Incomplete,
    /// Not a TLS ClientHello.
    Invalid,
}

/// Handshake records carry at most this much (RFC 8446 §5.1).
const MAX_FRAGMENT: usize = 16_384;
/// A ClientHello longer than this is refused (rustls's own limit for a handshake message).
const MAX_HELLO: usize = 0x1_0000;

/// The SNI of the ClientHello at the start of `bytes`, which may span several records.
pub fn sni(bytes: &[u8]) -> Hello {
    // The common case: the whole message in the first record, read in place.
    let mut joined = Vec::new();
    let mut rest = bytes;
    loop {
        let Some(header) = rest.get(..5) else {
            return Hello::Incomplete;
        };
        // A handshake record, of TLS 1.0 to 1.3 (the record version says little).
        if header[0] != 22 || header[1] != 3 {
            return Hello::Invalid;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_FRAGMENT {
            return Hello::Invalid;
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            return Hello::Incomplete;
        };
        rest = &rest[5 + len..];
        let message: &[u8] = if joined.is_empty() && message_complete(fragment) {
            fragment
        } else {
            joined.extend_from_slice(fragment);
            if !message_complete(&joined) {
                if joined.len() > MAX_HELLO + 4 {
                    return Hello::Invalid;
                }
                continue;
            }
            &joined
        };
        return match parse(message) {
            Some(name) => Hello::Sni(name),
            None => Hello::Invalid,
        };
    }
}

/// Whether `m` holds a whole handshake message (type, 24-bit length, body).
fn message_complete(m: &[u8]) -> bool {
    m.len() >= 4 && m.len() >= 4 + u24(&m[1..4])
}

fn u24(b: &[u8]) -> usize {
    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
}

/// Reads a ClientHello message: `Some(name)` (or `Some(None)` without SNI), `None` if it
/// is malformed.
fn parse(m: &[u8]) -> Option<Option<Box<str>>> {
    if m.first() != Some(&1) {
        return None;
    }
    let len = u24(m.get(1..4)?);
    if len > MAX_HELLO {
        return None;
    }
    let mut r = Reader(m.get(4..4 + len)?);
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    if r.0.is_empty() {
        return Some(None); // no extensions (TLS 1.2 allows it)
    }
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (name_type, name); the host_name entry (type 0) counts.
        let mut list = Reader(Reader(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.take(1)?[0];
            let name = list.vec16()?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return None;
                }
                return Some(Some(name.to_ascii_lowercase().into()));
            }
        }
        return Some(None);
    }
    Some(None)
}

/// A cursor over bytes; every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(self.take(1)?[0]);
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with `sni` (or none), split into records of `fragment` bytes.
    fn hello(sni: Option<&str>, fragment: usize) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut ext = Vec::new();
        // An extension before server_name (supported_versions).
        ext.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
        if let Some(name) = sni {
            let n = name.len() as u16;
            ext.extend_from_slice(&[0, 0]);
            ext.extend_from_slice(&(n + 5).to_be_bytes());
            ext.extend_from_slice(&(n + 3).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&n.to_be_bytes());
            ext.extend_from_slice(name.as_bytes());
        }
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut message = vec![1];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in message.chunks(fragment) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn the_name_is_read_from_one_record_or_several() {
        let want = Hello::Sni(Some("api.example.com".into()));
        assert_eq!(sni(&hello(Some("API.example.com"), 16_384)), want);
        assert_eq!(
            sni(&hello(Some("api.example.com"), 7)),
            want,
            "7-byte records"
        );
        assert_eq!(sni(&hello(None, 16_384)), Hello::Sni(None));
        // Trailing bytes (the client's next flight) do not matter.
        let mut more = hello(Some("a.b"), 16_384);
        more.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
        assert_eq!(sni(&more), Hello::Sni(Some("a.b".into())));
    }

    #[test]
    fn every_prefix_is_incomplete_and_garbage_is_invalid() {
        for fragment in [16_384, 10] {
            let whole = hello(Some("x.example"), fragment);
            for cut in 0..whole.len() {
                assert_eq!(sni(&whole[..cut]), Hello::Incomplete, "cut at {cut}");
            }
        }
        assert_eq!(sni(b"GET / HTTP/1.1\r\n\r\n"), Hello::Invalid);
        assert_eq!(sni(&[22, 3, 1, 0, 0]), Hello::Invalid, "an empty record");
        let mut bad = hello(Some("x.example"), 16_384);
        bad[5] = 2; // a ServerHello
        assert_eq!(sni(&bad), Hello::Invalid);
        // A name length past its extension.
        let mut bad = hello(Some("x.example"), 16_384);
        let at = bad.len() - "x.example".len() - 1;
        bad[at] = 200;
        assert_eq!(sni(&bad), Hello::Invalid);
        let mut bad = hello(Some("x example"), 16_384);
        assert_eq!(sni(&bad), Hello::Invalid, "a space in the name");
        bad.truncate(3);
        assert_eq!(sni(&bad), Hello::Incomplete);
    }
}
