//! An HTTP/1.1 client's request fields as the head's own bytes and an index into them, so
//! that a request ballast only relays is written to its backend without an `http::HeaderMap`.
//!
//! Why: building the map (a name lookup, a hash and an insert per field), taking the
//! hop-by-hop fields out of it, inserting `X-Forwarded-*` (three more hashes and inserts) and
//! walking it again to write the backend's head cost about 2,600 of the 23,400 instructions
//! of a proxied keep-alive request (callgrind, issue 24; BENCHMARKS.md), and each value was
//! a reference-counted `Bytes` dropped through its vtable, an indirect branch the profile
//! showed mispredicted. nginx and HAProxy relay the request's lines the same way.
//!
//! The parse (`h1::head`) checks every value as `HeaderValue` checks it and records what
//! each field is to the way through ([`Role`]). [`RequestFields::write_relayed`] then writes
//! what the map path (`proxy::headers::remove_hop_by_hop`, `add_forwarded`) would have sent:
//! - hop-by-hop fields, the fields `Connection` names, `Expect` (ballast answers it) and the
//!   framing fields (ballast writes its own) are left out;
//! - `X-Forwarded-For` gets the client appended, its lines folded into one;
//! - `X-Forwarded-Proto` and `X-Forwarded-Host` are ballast's, whatever the client sent;
//! - every other line goes as it came, names in the client's case.
//!
//! [`RequestFields::to_header_map`] gives the map the parse used to give, every line
//! included, for what needs one: header rules, hash and rate-limit keys taken from fields,
//! an HTTP/2 backend, upgrades. The request path decides which (`proxy::http::prepare`).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use super::pass::{append_lines, same_lowercase};

/// Fields a map made from the lines has room for beyond them (`X-Forwarded-For`,
/// `-Proto`, `-Host`, a request id): sized for the lines only, it would grow (rehash) on
/// the first insert (callgrind: ~1,200 instructions a request).
const ADDED_FIELDS: usize = 4;

/// What a request field is to the way through ballast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Relayed as it came.
    Pass,
    /// `Host`: relayed, and copied into `X-Forwarded-Host`.
    Host,
    /// `Content-Length`: ballast writes the body's framing itself; written back only for a
    /// request sent without a body.
    ContentLength,
    /// `X-Forwarded-For`: folded, with the client appended.
    ForwardedFor,
    /// Never relayed: hop-by-hop (the fixed ones, `Upgrade`, `Connection`, and what it
    /// names),
    /// `Expect`, `Transfer-Encoding`, and the `X-Forwarded-Proto` and `-Host` that ballast
    /// sets itself.
    Drop,
}

/// The names the request path treats apart from the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RequestName {
    Connection,
    ContentLength,
    TransferEncoding,
    Upgrade,
    Host,
    Expect,
    ForwardedFor,
    /// `X-Forwarded-Proto`, `X-Forwarded-Host`: set by ballast.
    ForwardedSet,
    /// `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`.
    HopByHop,
    Other,
}

impl RequestName {
    /// Compares by length first: most names are none of these, and cost one `match`.
    pub(super) fn of(name: &[u8]) -> RequestName {
        let is = |known: &[u8]| same_lowercase(name, known);
        match name.len() {
            2 if is(b"te") => RequestName::HopByHop,
            4 if is(b"host") => RequestName::Host,
            6 if is(b"expect") => RequestName::Expect,
            7 if is(b"upgrade") => RequestName::Upgrade,
            7 if is(b"trailer") => RequestName::HopByHop,
            10 if is(b"connection") => RequestName::Connection,
            10 if is(b"keep-alive") => RequestName::HopByHop,
            14 if is(b"content-length") => RequestName::ContentLength,
            15 if is(b"x-forwarded-for") => RequestName::ForwardedFor,
            16 if is(b"proxy-connection") => RequestName::HopByHop,
            16 if is(b"x-forwarded-host") => RequestName::ForwardedSet,
            17 if is(b"transfer-encoding") => RequestName::TransferEncoding,
            17 if is(b"x-forwarded-proto") => RequestName::ForwardedSet,
            _ => RequestName::Other,
        }
    }

    /// The role of a field with this name that `Connection` does not name.
    pub(super) fn role(self) -> Role {
        match self {
            RequestName::Other => Role::Pass,
            RequestName::Host => Role::Host,
            RequestName::ContentLength => Role::ContentLength,
            RequestName::ForwardedFor => Role::ForwardedFor,
            RequestName::Connection
            | RequestName::Upgrade
            | RequestName::TransferEncoding
            | RequestName::Expect
            | RequestName::ForwardedSet
            | RequestName::HopByHop => Role::Drop,
        }
    }
}

/// One field line: where its name and value are in the head, and its role.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
    role: Role,
}

/// A request's field lines: the head's bytes and, per line, where its name and value are.
#[derive(Debug, Clone)]
pub struct RequestFields {
    /// The bytes the offsets point into (the head, and maybe what followed it).
    head: Bytes,
    fields: Vec<Field>,
    /// `Connection` said `close`.
    close: bool,
    /// An `Upgrade` line came.
    upgrade: bool,
    /// A `Content-Length` beside a `Transfer-Encoding`: chunked decides, and the length is
    /// left out of the map too.
    length_dropped: bool,
}

/// Builds a [`RequestFields`] line by line, during the parse.
pub(super) struct Builder {
    fields: Vec<Field>,
}

impl Builder {
    pub(super) fn with_capacity(n: usize) -> Builder {
        Builder {
            fields: Vec::with_capacity(n),
        }
    }

    /// A line whose `name` and `value` are subslices of `base`.
    pub(super) fn push(&mut self, base: &[u8], name: &[u8], value: &[u8], role: Role) {
        let at = |part: &[u8]| (part.as_ptr() as usize - base.as_ptr() as usize) as u32;
        self.fields.push(Field {
            name: at(name),
            name_len: name.len() as u32,
            value: at(value),
            value_len: value.len() as u32,
            role,
        });
    }

    /// Marks as dropped every field whose name is one of `named` (`Connection`'s options),
    /// but `Host`: a request needs it end to end, and a client that names it must not get a
    /// request without one to the backend (RFC 9110 §7.6.1 forbids naming such a field).
    pub(super) fn drop_named(&mut self, base: &[u8], named: &[&[u8]]) {
        for f in self.fields.iter_mut().filter(|f| f.role != Role::Host) {
            let name = &base[f.name as usize..][..f.name_len as usize];
            if named.iter().any(|n| n.eq_ignore_ascii_case(name)) {
                f.role = Role::Drop;
            }
        }
    }

    /// The fields over `head`, the bytes the offsets were taken against.
    pub(super) fn finish(
        self,
        head: Bytes,
        close: bool,
        upgrade: bool,
        length_dropped: bool,
    ) -> RequestFields {
        RequestFields {
            head,
            fields: self.fields,
            close,
            upgrade,
            length_dropped,
        }
    }
}

impl RequestFields {
    fn name(&self, f: &Field) -> &[u8] {
        &self.head[f.name as usize..][..f.name_len as usize]
    }

    fn value(&self, f: &Field) -> &[u8] {
        &self.head[f.value as usize..][..f.value_len as usize]
    }

    /// Bytes from the head's start to the end of its last field value: room enough for the
    /// lines as relayed, less what ballast adds.
    pub fn lines_len(&self) -> usize {
        self.fields
            .last()
            .map_or(0, |f| (f.value + f.value_len) as usize)
    }

    /// Field lines.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The first value of field `name` (any case).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let name = name.as_bytes();
        self.fields
            .iter()
            .find(|f| f.name_len as usize == name.len() && self.name(f).eq_ignore_ascii_case(name))
            .map(|f| self.value(f))
    }

    /// Every value of field `name` (any case), in order.
    pub fn values<'s, 'n>(
        &'s self,
        name: &'n [u8],
    ) -> impl Iterator<Item = &'s [u8]> + use<'s, 'n> {
        self.fields
            .iter()
            .filter(move |f| {
                f.name_len as usize == name.len() && self.name(f).eq_ignore_ascii_case(name)
            })
            .map(|f| self.value(f))
    }

    /// The `Host` value.
    pub fn host(&self) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| f.role == Role::Host)
            .map(|f| self.value(f))
    }

    /// `Connection: close` was among the options.
    pub fn close(&self) -> bool {
        self.close
    }

    /// An `Upgrade` line came. Such a request takes the map path, where the route's
    /// protocols decide what is forwarded.
    pub fn has_upgrade(&self) -> bool {
        self.upgrade
    }

    /// Every line as a map, names lowercased, in order, repeats kept: what the parse gave
    /// before lines were relayed.
    pub fn to_header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.len() + ADDED_FIELDS);
        for f in &self.fields {
            if self.length_dropped && same_lowercase(self.name(f), b"content-length") {
                continue;
            }
            // Both were checked by the parse (`HeaderName`'s and `HeaderValue`'s rules); a
            // failure cannot happen.
            let name = HeaderName::from_bytes(self.name(f));
            let value = HeaderValue::from_maybe_shared(
                self.head
                    .slice(f.value as usize..(f.value + f.value_len) as usize),
            );
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        map
    }

    /// The fields [`RequestFields::write_relayed`] writes (for a request with a body), as a
    /// map.
    pub fn relayed_map(&self, client: &[u8], proto: &str) -> HeaderMap {
        let mut lines = Vec::with_capacity(self.lines_len() + 128);
        self.write_relayed(&mut lines, client, proto, false);
        let mut map = HeaderMap::with_capacity(self.fields.len() + ADDED_FIELDS);
        append_lines(&lines, &mut map);
        map
    }

    /// Writes the lines a backend is sent (see the module doc), ending each in CRLF, then
    /// `X-Forwarded-For` with `client` appended, `X-Forwarded-Proto: proto` and
    /// `X-Forwarded-Host`. `bodiless`: the request goes without a body, and its
    /// `Content-Length` lines, if any, go with it (as a map's would).
    pub fn write_relayed(&self, out: &mut Vec<u8>, client: &[u8], proto: &str, bodiless: bool) {
        let line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        let mut forwarded_for = false;
        for f in &self.fields {
            match f.role {
                Role::Pass | Role::Host => line(out, self.name(f), self.value(f)),
                Role::ContentLength if bodiless && !self.length_dropped => {
                    line(out, self.name(f), self.value(f))
                }
                Role::ForwardedFor => forwarded_for |= f.value_len > 0,
                Role::ContentLength | Role::Drop => {}
            }
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if forwarded_for {
            // The client's lines, folded in order (RFC 9110 §5.3), then the client.
            for f in self.fields.iter().filter(|f| f.role == Role::ForwardedFor) {
                if f.value_len > 0 {
                    out.extend_from_slice(self.value(f));
                    out.extend_from_slice(b", ");
                }
            }
        }
        out.extend_from_slice(client);
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(proto.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(host) = self.host() {
            line(out, b"x-forwarded-host", host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h1::{parse_request_shared, Limits};

    const LIMITS: Limits = Limits {
        max_head: 4096,
        max_headers: 32,
    };

    fn fields(raw: &str) -> RequestFields {
        let bytes = Bytes::copy_from_slice(raw.as_bytes());
        parse_request_shared(&bytes, &LIMITS)
            .unwrap()
            .unwrap()
            .0
            .fields
    }

    fn relayed(f: &RequestFields, bodiless: bool) -> String {
        let mut out = Vec::new();
        f.write_relayed(&mut out, b"192.0.2.7", "http", bodiless);
        String::from_utf8(out).unwrap()
    }

    /// The relayed head of `raw` parses to the fields the map path sends
    /// (`remove_hop_by_hop`, `Expect` out, `add_forwarded`, `encode::request_head`), for
    /// each framing a backend may be sent; and `relayed_map` is that map, less framing.
    fn relayed_as_mapped(raw: &[u8]) {
        use crate::h1::client::RelayedHead;
        use crate::h1::{encode, parse_request, Framing};
        use crate::proxy::headers;
        let reparse = |out: &[u8]| {
            let limits = Limits {
                max_head: 1 << 20,
                max_headers: 256,
            };
            let (head, len) = parse_request(out, &limits).unwrap().unwrap();
            assert_eq!(len, out.len());
            head
        };
        let shown = String::from_utf8_lossy(raw);
        let client = HeaderValue::from_static("192.0.2.7");
        let head = parse_request_shared(&Bytes::copy_from_slice(raw), &LIMITS)
            .unwrap()
            .unwrap()
            .0;
        for framing in [Framing::Empty, Framing::Length(3), Framing::Chunked] {
            let mut map = head.fields.to_header_map();
            headers::remove_hop_by_hop(&mut map);
            map.remove(http::header::EXPECT);
            headers::add_forwarded(&mut map, &client, "https");
            let mut mapped = Vec::new();
            encode::request_head(&mut mapped, &head.method, "/p?q=1", &map, framing);
            let relayed = RelayedHead {
                fields: head.fields.clone(),
                client: client.as_bytes(),
                proto: "https",
            };
            let mut lines = Vec::new();
            encode::relayed_request_head(&mut lines, &head.method, "/p?q=1", &relayed, framing);
            let (a, b) = (reparse(&mapped), reparse(&lines));
            assert_eq!((&a.target, a.framing), (&b.target, b.framing), "{shown:?}");
            assert_eq!(
                a.fields.to_header_map(),
                b.fields.to_header_map(),
                "{shown:?} {framing:?}: map path {:?}, relayed {:?}",
                String::from_utf8_lossy(&mapped),
                String::from_utf8_lossy(&lines)
            );
            // The map an HTTP/2 backend would get: the same, less the framing fields.
            let mut sent = b.fields.to_header_map();
            sent.remove(http::header::CONTENT_LENGTH);
            sent.remove(http::header::TRANSFER_ENCODING);
            let as_map = relayed.fields.relayed_map(client.as_bytes(), "https");
            assert_eq!(as_map, sent, "{shown:?}");
        }
    }

    /// The fuzz target `h1` checks the same on arbitrary heads.
    #[test]
    fn relayed_lines_say_what_the_map_path_says() {
        for fields in [
            "Host: a\r\n",
            "host: A.example:80\r\nAccept: */*\r\nUser-Agent: x\r\nCookie: a=1\r\ncookie: b=2\r\n",
            "Host: a\r\nConnection: keep-alive, X-Secret, te\r\nX-Secret: 1\r\nTE: trailers\r\n",
            "Host: a\r\nConnection: close\r\nKeep-Alive: 5\r\nProxy-Connection: keep-alive\r\n",
            "Host: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-A: 1\r\nx-forwarded-for: 2.2.2.2, 3.3.3.3\r\n",
            "Host: a\r\nX-Forwarded-For:\r\nX-Forwarded-For: 4.4.4.4\r\n",
            "Host: a\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n",
            "Host: a\r\nConnection: x-forwarded-for, Host\r\nX-Forwarded-For: 1.1.1.1\r\n",
            "Host: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n",
            "Host: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n",
            "Host: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n",
            "Host: a\r\nConnection: content-length\r\nContent-Length: 0\r\n",
            "Host: a\r\nTrailer: x\r\nX-B: 1\r\nX-C: 2\r\nx-b: 3\r\n",
        ] {
            relayed_as_mapped(format!("POST /p?q=1 HTTP/1.1\r\n{fields}\r\n").as_bytes());
        }
        // Found by the fuzz target: obs-text in a `Connection` value that names a field.
        relayed_as_mapped(
            b"GET /p?q=1 HTTP/1.1\r\nHost: a\r\nA: 1\r\nConnection: clo,\xec,*, a\r\n\r\n",
        );
    }

    #[test]
    fn names_are_known_whatever_their_case() {
        for (name, known) in [
            ("Host", RequestName::Host),
            ("X-Forwarded-For", RequestName::ForwardedFor),
            ("x-forwarded-PROTO", RequestName::ForwardedSet),
            ("X-Forwarded-Host", RequestName::ForwardedSet),
            ("EXPECT", RequestName::Expect),
            ("Proxy-Connection", RequestName::HopByHop),
            ("Transfer-Encoding", RequestName::TransferEncoding),
            ("X-Forwarded-Fox", RequestName::Other),
            ("Hosts", RequestName::Other),
        ] {
            assert_eq!(RequestName::of(name.as_bytes()), known, "{name}");
        }
    }

    #[test]
    fn relays_lines_in_order_without_hop_by_hop_ones_and_sets_forwarded_fields() {
        let f = fields(
            "GET / HTTP/1.1\r\nHost: app.example:8080\r\nUser-Agent: t\r\n\
             Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n\
             X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\
             Expect: 100-continue\r\nx-forwarded-for: 10.0.0.2\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(
            relayed(&f, true),
            "Host: app.example:8080\r\nUser-Agent: t\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: app.example:8080\r\n"
        );
        assert!(!f.close());
        assert!(!f.has_upgrade());
        assert_eq!(f.get("user-agent"), Some(&b"t"[..]));
        assert_eq!(f.get("X-SECRET"), Some(&b"1"[..]));
        assert_eq!(f.get("referer"), None);
    }

    #[test]
    fn a_host_named_by_connection_is_kept() {
        let f = fields("GET / HTTP/1.1\r\nHost: a\r\nConnection: close, host\r\n\r\n");
        assert!(f.close());
        assert_eq!(f.host(), Some(&b"a"[..]));
        assert_eq!(
            relayed(&f, true),
            "Host: a\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: a\r\n"
        );
    }

    #[test]
    fn content_length_goes_only_with_a_request_sent_without_a_body() {
        let f = fields("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert!(relayed(&f, true).contains("Content-Length: 0\r\n"));
        assert!(!relayed(&f, false).contains("Content-Length"));
        // With Transfer-Encoding, chunked decides and the length is gone everywhere.
        let f = fields(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(!relayed(&f, true).contains("Content-Length"));
        assert!(!f.to_header_map().contains_key("content-length"));
    }

    #[test]
    fn an_upgrade_is_left_to_the_map_path_and_the_map_keeps_every_line() {
        let f = fields(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
        );
        assert!(f.has_upgrade());
        let map = f.to_header_map();
        assert_eq!(map.len(), 5, "{map:?}");
        assert_eq!(map["upgrade"], "websocket");
        let xa: Vec<_> = map.get_all("x-a").iter().collect();
        assert_eq!(xa, ["1", "2"]);
    }
}
