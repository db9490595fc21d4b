//! The PROXY protocol (HAProxy's specification, versions 1 and 2): reading the header a
//! trusted balancer in front of ballast puts at the start of a connection, and writing one
//! for backends that want the client's address.
//!
//! The parser is incremental and bounded: [`parse`] says "need more" until a whole header is
//! in the buffer, never looks past it, and refuses anything malformed as soon as it can tell
//! (a v1 line longer than 107 bytes, a bad signature, a v2 length above
//! [`MAX_V2_LEN`]). [`read_header`] drives it off a socket with a deadline. It is written
//! here rather than taken from a crate because the framing (read no further than the
//! header, give back what came with it, bound time and size) is the part that matters, and
//! it is small.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the specification's figure).
pub const V1_MAX: usize = 107;
/// Largest v2 payload (addresses + TLVs) accepted; the format allows 65535, senders
/// use a few hundred bytes at most (AWS, GCP and HAProxy's SSL TLVs included).
pub const MAX_V2_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// `false` for v2 LOCAL (the sender's own connection, e.g. its health check) and v1
    /// UNKNOWN: the socket's own addresses stand.
    pub proxied: bool,
    /// The client, when the header carries an IP address.
    pub source: Option<SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
    /// v2 type-length-value extensions, as sent.
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("connection closed inside the PROXY header")]
    Truncated,
    #[error("PROXY header not complete within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(String),
}

/// Parses a header at the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// header and its length in bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if buf.len() < 16 {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if buf.len() < 6 {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    Err(Error::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, Error> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(Error::V1("no CRLF within 107 bytes"))
        } else if window.contains(&b'\n') || window.contains(&0) {
            Err(Error::V1("stray LF or NUL"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| Error::V1("not ASCII"))?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let proto = parts.next().unwrap_or("");
    if proto == "UNKNOWN" {
        // "the receiver must ignore anything presented before the CRLF".
        return Ok(Some((
            Header {
                version: Version::V1,
                proxied: false,
                source: None,
                destination: None,
                tlvs: Vec::new(),
            },
            len,
        )));
    }
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(Error::V1("protocol is not TCP4, TCP6 or UNKNOWN")),
    };
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(Error::V1(
            "expected 4 fields after the protocol, single spaces",
        ));
    };
    let ip = |s: &str| -> Result<IpAddr, Error> {
        let ip: IpAddr = s.parse().map_err(|_| Error::V1("bad address"))?;
        if ip.is_ipv6() != v6 {
            return Err(Error::V1("address family does not match the protocol"));
        }
        Ok(ip)
    };
    let port = |s: &str| -> Result<u16, Error> {
        let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        let no_leading_zero = s == "0" || !s.starts_with('0');
        match s.parse::<u16>() {
            Ok(p) if digits && no_leading_zero => Ok(p),
            _ => Err(Error::V1("bad port")),
        }
    };
    Ok(Some((
        Header {
            version: Version::V1,
            proxied: true,
            source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
            destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
            tlvs: Vec::new(),
        },
        len,
    )))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, Error> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(Error::V2("version is not 2"));
    }
    let proxied = match ver_cmd & 0x0f {
        0 => false,
        1 => true,
        _ => return Err(Error::V2("command is neither LOCAL nor PROXY")),
    };
    let fam = buf[13];
    let payload_len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if payload_len > MAX_V2_LEN {
        return Err(Error::V2("longer than 4096 bytes"));
    }
    let total = 16 + payload_len;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &buf[16..total];
    let (family, transport) = (fam >> 4, fam & 0x0f);
    if family > 3 || transport > 2 {
        return Err(Error::V2("unknown address family or transport"));
    }
    if proxied && transport == 2 {
        return Err(Error::V2(
            "a datagram (UDP) connection on a stream listener",
        ));
    }
    let addr_len = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if payload.len() < addr_len {
        return Err(Error::V2("address block shorter than its family needs"));
    }
    let (source, destination) = match (family, proxied) {
        (1, true) => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    payload[o],
                    payload[o + 1],
                    payload[o + 2],
                    payload[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([payload[o], payload[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(8))),
                Some(SocketAddr::new(ip(4), port(10))),
            )
        }
        (2, true) => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&payload[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([payload[o], payload[o + 1]]);
            (
                Some(SocketAddr::new(ip(0), port(32))),
                Some(SocketAddr::new(ip(16), port(34))),
            )
        }
        _ => (None, None),
    };
    let mut tlvs = Vec::new();
    let mut rest = &payload[addr_len..];
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(Error::V2("truncated TLV"));
        }
        let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
        if rest.len() < 3 + len {
            return Err(Error::V2("TLV longer than the header"));
        }
        tlvs.push((rest[0], rest[3..3 + len].to_vec()));
        rest = &rest[3 + len..];
    }
    Ok(Some((
        Header {
            version: Version::V2,
            proxied: proxied && source.is_some(),
            source,
            destination,
            tlvs,
        },
        total,
    )))
}

/// Reads a header off `stream` within `timeout`. Returns it with the bytes that arrived
/// after it (to be replayed before the rest of the stream).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Header, Vec<u8>), Error> {
    let read = async {
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        loop {
            if let Some((header, len)) = parse(&buf)? {
                return Ok((header, buf.split_off(len)));
            }
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| Error::Io(e.to_string()))?;
            if n == 0 {
                return Err(Error::Truncated);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

/// The pair of addresses as both IPv4, or both IPv6 (IPv4 mapped), as the header needs.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v4 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => Some(SocketAddr::new(IpAddr::V4(ip), a.port())),
        IpAddr::V6(ip) => ip
            .to_ipv4_mapped()
            .map(|ip| SocketAddr::new(IpAddr::V4(ip), a.port())),
    };
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    match (v4(src), v4(dst)) {
        (Some(s), Some(d)) => (s, d),
        _ => (v6(src), v6(dst)),
    }
}

/// A header announcing a client at `src` that connected to `dst`.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(src, dst);
    match version {
        Version::V1 => {
            let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V6(ip) => ip.octets(),
                        IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
                    };
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(s));
                    out.extend_from_slice(&v6(d));
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// A header for ballast's own connections (health checks): v1 `UNKNOWN`, v2 `LOCAL`.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.extend_from_slice(&[0x20, 0x00, 0, 0]);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The examples of the specification (haproxy.org/download/2.9/doc/proxy-protocol.txt).
    #[test]
    fn v1_specification_examples() {
        let (h, n) = parse(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\nGET /")
            .unwrap()
            .unwrap();
        assert_eq!(n, 56);
        assert_eq!(h.source, Some(sa("255.255.255.255:65535")));
        let line = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert!(parse(line).is_err(), "elided address is not an address");
        let tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        let (h, n) = parse(tcp6).unwrap().unwrap();
        assert_eq!(n, 104);
        assert_eq!(h.destination.unwrap().port(), 65535);
        // The specification's worst case, 107 bytes, is UNKNOWN with the longest addresses.
        let max = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(max.len(), V1_MAX);
        assert_eq!(parse(max).unwrap().unwrap().1, V1_MAX);
        let (h, n) = parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap();
        assert_eq!((h.proxied, n), (false, 15));
        let (h, _) = parse(b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.proxied && h.source.is_none());
        let (h, _) = parse(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.source, Some(sa("192.168.0.1:56324")));
        assert_eq!(h.destination, Some(sa("192.168.0.11:443")));
    }

    #[test]
    fn v1_refuses_what_the_specification_forbids() {
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // Incomplete is not an error until 107 bytes pass without CRLF.
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        assert_eq!(parse(b"PRO"), Ok(None));
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(20)).is_err());
    }

    fn v2(cmd: u8, fam: u8, payload: &[u8]) -> Vec<u8> {
        let mut b = V2_SIGNATURE.to_vec();
        b.push(cmd);
        b.push(fam);
        b.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn v2_addresses_tlvs_and_local() {
        // TCP over IPv4, 192.168.0.1:56324 -> 192.168.0.11:443, one TLV (ALPN "h2") and a
        // NOOP TLV, then the client's first bytes.
        let mut payload = vec![192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb];
        payload.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00]);
        let mut bytes = v2(0x21, 0x11, &payload);
        let len = bytes.len();
        bytes.extend_from_slice(b"GET /");
        let (h, n) = parse(&bytes).unwrap().unwrap();
        assert_eq!(n, len);
        assert!(h.proxied);
        assert_eq!(h.source, Some(sa("192.168.0.1:56324")));
        assert_eq!(h.destination, Some(sa("192.168.0.11:443")));
        assert_eq!(h.tlvs, vec![(0x01, b"h2".to_vec()), (0x04, vec![])]);
        // Every prefix of it is "need more".
        for cut in 0..len {
            assert_eq!(parse(&bytes[..cut]), Ok(None), "prefix {cut}");
        }
        // IPv6.
        let mut p6 = Vec::new();
        p6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        p6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        p6.extend_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        let (h, _) = parse(&v2(0x21, 0x21, &p6)).unwrap().unwrap();
        assert_eq!(h.source, Some(sa("[::1]:12345")));
        assert_eq!(h.destination, Some(sa("[2001:db8::1]:80")));
        // LOCAL: the balancer's own connection; addresses (if any) are ignored.
        let (h, n) = parse(&v2(0x20, 0x00, &[])).unwrap().unwrap();
        assert_eq!((h.proxied, h.source, n), (false, None, 16));
        let (h, _) = parse(&v2(0x20, 0x11, &payload)).unwrap().unwrap();
        assert!(!h.proxied && h.source.is_none());
        // UNSPEC with PROXY and AF_UNIX: accepted, no address to use.
        assert!(!parse(&v2(0x21, 0x00, &[])).unwrap().unwrap().0.proxied);
        assert!(
            !parse(&v2(0x21, 0x31, &[0u8; 216]))
                .unwrap()
                .unwrap()
                .0
                .proxied
        );
    }

    #[test]
    fn v2_refuses_malformed_headers() {
        let addr4 = [1u8, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2];
        for (what, bytes) in [
            ("version 1", v2(0x11, 0x11, &addr4)),
            ("command 2", v2(0x22, 0x11, &addr4)),
            ("short IPv4 block", v2(0x21, 0x11, &addr4[..8])),
            ("short IPv6 block", v2(0x21, 0x21, &[0u8; 20])),
            ("UDP", v2(0x21, 0x12, &addr4)),
            ("family 4", v2(0x21, 0x41, &addr4)),
            (
                "truncated TLV",
                v2(0x21, 0x11, &[&addr4[..], &[0x01, 0x00]].concat()),
            ),
            (
                "TLV too long",
                v2(
                    0x21,
                    0x11,
                    &[&addr4[..], &[0x01, 0x00, 0x09, b'x']].concat(),
                ),
            ),
        ] {
            assert!(parse(&bytes).is_err(), "{what} accepted");
        }
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(Error::V2("longer than 4096 bytes")));
        let mut sig = V2_SIGNATURE.to_vec();
        sig[11] = b'X';
        assert_eq!(parse(&sig), Err(Error::NotProxy));
    }

    #[test]
    fn encoding_round_trips_and_matches_the_specification_bytes() {
        let (src, dst) = (sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
        let v1 = encode(Version::V1, src, dst);
        assert_eq!(v1, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
        let v2 = encode(Version::V2, src, dst);
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0x00, 0x0c, 192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb,
        ]);
        assert_eq!(v2, want);
        for version in [Version::V1, Version::V2] {
            for (s, d) in [
                (src, dst),
                (sa("[2001:db8::1]:1"), sa("[::1]:2")),
                (src, sa("[::1]:2")),
            ] {
                let (h, n) = parse(&encode(version, s, d)).unwrap().unwrap();
                let (s2, d2) = same_family(s, d);
                assert_eq!((h.source, h.destination), (Some(s2), Some(d2)));
                assert_eq!(n, encode(version, s, d).len());
            }
            let (h, _) = parse(&encode_local(version)).unwrap().unwrap();
            assert!(!h.proxied);
        }
    }
}
