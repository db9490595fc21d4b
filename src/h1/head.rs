//! Request and response heads: httparse finds the lines, this module applies the rules
//! httparse leaves to its caller (RFC 9112 §3, §5, §6; RFC 9110 §7.2, §7.6.1, §10.1.1) and
//! says how the message's body is framed.
//!
//! A parse is all-or-nothing over the bytes received so far: `Ok(None)` means "the head is
//! not complete yet, read more" (unless the buffer already holds `max_head` bytes, which is
//! a rejection), `Ok(Some((head, len)))` means the head took the first `len` bytes, and any
//! bytes after it are the body or a pipelined next request.

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

use super::pass::{valid_value, Known, PassFields};
use super::request_fields::{self, RequestFields, RequestName};
use super::Rejection;

/// Size limits for a head, from the listener's `max_header_size` and `max_headers`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes in the whole head, request line and blank line included.
    pub max_head: usize,
    /// Header field lines.
    pub max_headers: usize,
}

/// How a message's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a request without length or coding, a HEAD answer, 1xx/204/304.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// A response without a length: the body ends when the backend closes.
    UntilClose,
    /// After a 101 or a 2xx to CONNECT, bytes flow both ways untouched.
    Tunnel,
}

/// A parsed request head and what it implies for the connection.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub target: Uri,
    pub version: Version,
    /// Every field line, as the head's bytes and an index into them.
    pub fields: RequestFields,
    /// Never `UntilClose` or `Tunnel` for a request.
    pub framing: Framing,
    /// The client may send another request on this connection afterwards.
    pub keep_alive: bool,
    /// HTTP/1.1 `Expect: 100-continue`.
    pub expect_continue: bool,
    /// HTTP/1.1 `Upgrade` with `Connection: upgrade`.
    pub upgrade: bool,
}

/// A parsed response head from a backend.
#[derive(Debug)]
pub struct ResponseHead {
    pub version: Version,
    pub status: StatusCode,
    pub fields: ResponseFields,
    pub framing: Framing,
    /// A 1xx other than 101: the final response follows on the same connection.
    pub interim: bool,
    /// The backend connection can carry another request after this response.
    pub keep_alive: bool,
}

/// A response's fields, in the form its way on needs.
#[derive(Debug, Clone)]
pub enum ResponseFields {
    /// Every field line, hop-by-hop ones included, names lowercased: a tunnel's answer
    /// (101, or a 2xx to CONNECT), which the tunnel reads `Upgrade` from and relays whole.
    Map(HeaderMap),
    /// Every other answer: the fields a client is sent, already written (see [`PassFields`]).
    Pass(PassFields),
}

impl ResponseFields {
    /// The fields as a map (what a `Pass` would be sent as, `Content-Length` included).
    pub fn to_header_map(&self) -> HeaderMap {
        match self {
            ResponseFields::Map(map) => map.clone(),
            ResponseFields::Pass(pass) => pass.to_header_map(),
        }
    }
}

/// Longest request target, as hyper (and the `http` crate) allow.
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// Longest field name, as `HeaderName` allows.
const MAX_NAME: usize = u16::MAX as usize;

/// The `Connection` options that matter to framing (RFC 9110 §7.6.1).
#[derive(Default)]
struct ConnectionOptions {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
}

/// What the field lines say about framing, gathered in one pass.
#[derive(Default)]
struct Fields {
    connection: ConnectionOptions,
    content_length: Option<Result<u64, ()>>,
    /// `Some` when any `Transfer-Encoding` line is present.
    codings: Option<Codings>,
    hosts: usize,
    host_valid: bool,
    expect: Option<bool>,
    upgrade: bool,
}

/// The transfer codings named across all `Transfer-Encoding` lines, in order.
#[derive(Default)]
struct Codings {
    chunked_count: usize,
    last_is_chunked: bool,
    other: bool,
}

/// Parses a request head from the start of `buf`.
pub fn parse_request(
    buf: &[u8],
    limits: &Limits,
) -> Result<Option<(RequestHead, usize)>, Rejection> {
    parse_request_in(buf, None, limits)
}

/// [`parse_request`] over bytes already in a `Bytes`: the target and the field values are
/// slices of `buf` (no copy, no allocation each), as hyper's server does.
pub fn parse_request_shared(
    buf: &Bytes,
    limits: &Limits,
) -> Result<Option<(RequestHead, usize)>, Rejection> {
    parse_request_in(buf, Some(buf), limits)
}

/// The bytes of `part` (a subslice of the parsed buffer) as a `Bytes`: a slice of `shared`
/// when there is one, else a copy.
fn bytes_of(shared: Option<&Bytes>, part: &[u8]) -> Bytes {
    match shared {
        Some(shared) => shared.slice_ref(part),
        None => Bytes::copy_from_slice(part),
    }
}

fn parse_request_in(
    buf: &[u8],
    shared: Option<&Bytes>,
    limits: &Limits,
) -> Result<Option<(RequestHead, usize)>, Rejection> {
    // Bytes past the limit are never looked at: the verdict must not depend on them (a
    // connection reads at most `max_head` bytes for a head).
    let buf = &buf[..buf.len().min(limits.max_head)];
    let (mut inline, mut heap) = (header_slots(), Vec::new());
    let slots = slots(&mut inline, &mut heap, limits.max_headers);
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() == limits.max_head => return Err(too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(request_syntax(e)),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Rejection::bad_request("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| Rejection::bad_request("invalid method"))?;
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let target = request_target(&method, target, shared)?;

    // No map: each line's place in `buf` and its role (see `h1::request_fields`). httparse
    // took only token characters for names, as `HeaderName` does.
    let mut lines = request_fields::Builder::with_capacity(req.headers.len());
    let mut named: smallvec::SmallVec<[&[u8]; 4]> = smallvec::SmallVec::new();
    let mut fields = Fields::default();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.len() > MAX_NAME || !valid_value(h.value) {
            return Err(Rejection::bad_request("invalid header field name or value"));
        }
        let kind = RequestName::of(name);
        fields.note(kind, h.value);
        if kind == RequestName::Connection {
            named.extend(elements(h.value).filter(|o| {
                !o.eq_ignore_ascii_case(b"close") && !o.eq_ignore_ascii_case(b"keep-alive")
            }));
        }
        lines.push(buf, name, h.value, kind.role());
    }
    if !named.is_empty() {
        lines.drop_named(buf, &named);
    }

    let framing = request_framing(version, &fields)?;
    if version == Version::HTTP_11 && fields.hosts != 1 {
        return Err(Rejection::bad_request(
            "an HTTP/1.1 request needs exactly one Host field",
        ));
    }
    if fields.hosts > 1 || (fields.hosts == 1 && !fields.host_valid) {
        return Err(Rejection::bad_request("invalid Host field"));
    }
    let expect_continue = match fields.expect {
        _ if version == Version::HTTP_10 => false,
        None => false,
        Some(true) => true,
        Some(false) => {
            return Err(Rejection {
                status: StatusCode::EXPECTATION_FAILED,
                reason: "only the 100-continue expectation is supported",
            })
        }
    };
    // Both Transfer-Encoding and Content-Length: chunked decides, the length is removed
    // before forwarding, and the connection closes after the response (RFC 9112 §6.3 ¶3,
    // HAProxy's way): nothing after this request on the connection is trusted.
    let both = fields.codings.is_some() && fields.content_length.is_some();
    let keep_alive = !both
        && !fields.connection.close
        && (version == Version::HTTP_11 || fields.connection.keep_alive);
    let upgrade = version == Version::HTTP_11 && fields.upgrade && fields.connection.upgrade;
    // The offsets are into `buf`, which starts where `shared` does.
    let head = match shared {
        Some(shared) => shared.clone(),
        None => Bytes::copy_from_slice(&buf[..len]),
    };
    let fields = lines.finish(head, fields.connection.close, fields.upgrade, both);
    Ok(Some((
        RequestHead {
            method,
            target,
            version,
            fields,
            framing,
            keep_alive,
            expect_continue,
            upgrade,
        },
        len,
    )))
}

/// Parses a backend's response head to a request with `method`; `upgrade` says whether
/// that request asked to upgrade (a 101 is only valid then).
pub fn parse_response(
    buf: &[u8],
    limits: &Limits,
    method: &Method,
    upgrade: bool,
) -> Result<Option<(ResponseHead, usize)>, Rejection> {
    let buf = &buf[..buf.len().min(limits.max_head)];
    let (mut inline, mut heap) = (header_slots(), Vec::new());
    let slots = slots(&mut inline, &mut heap, limits.max_headers);
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, slots)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < limits.max_head => return Ok(None),
        Ok(httparse::Status::Partial) => {
            return Err(Rejection::bad_gateway("response head too large"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::bad_gateway("too many response header fields"))
        }
        Err(_) => return Err(Rejection::bad_gateway("malformed response head")),
    };
    let (Some(minor), Some(code)) = (res.version, res.code) else {
        return Err(Rejection::bad_gateway("incomplete status line"));
    };
    let status =
        StatusCode::from_u16(code).map_err(|_| Rejection::bad_gateway("invalid status code"))?;
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // One pass for what the fields say about framing and which fields `Connection` names;
    // the lines a client is sent are written in a second one, which needs the names.
    let mut fields = Fields::default();
    let mut named: smallvec::SmallVec<[&[u8]; 4]> = smallvec::SmallVec::new();
    // What each name is, found once for both passes.
    let mut kinds: smallvec::SmallVec<[Known; 32]> = smallvec::SmallVec::new();
    for h in res.headers.iter() {
        if !valid_value(h.value) {
            return Err(Rejection::bad_gateway("invalid response header field"));
        }
        let kind = Known::of(h.name.as_bytes());
        kinds.push(kind);
        match kind {
            Known::Connection => {
                fields.connection_options(h.value);
                named.extend(elements(h.value).filter(|o| {
                    !o.eq_ignore_ascii_case(b"close") && !o.eq_ignore_ascii_case(b"keep-alive")
                }));
            }
            Known::ContentLength => fields.length(h.value),
            Known::TransferEncoding => fields.transfer_codings(h.value),
            Known::Upgrade => fields.upgrade = true,
            Known::HopByHop | Known::Date | Known::Other => {}
        }
    }
    let interim = status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS;
    let framing = response_framing(version, status, method, upgrade, &fields)?;
    let keep_alive = !matches!(framing, Framing::UntilClose | Framing::Tunnel)
        && !fields.connection.close
        && (version == Version::HTTP_11 || fields.connection.keep_alive);
    let fields = if framing == Framing::Tunnel {
        let mut headers = HeaderMap::with_capacity(res.headers.len());
        for h in res.headers.iter() {
            let (name, value) = field(h.name, h.value, None)
                .ok_or(Rejection::bad_gateway("invalid response header field"))?;
            headers.append(name, value);
        }
        ResponseFields::Map(headers)
    } else if interim {
        // Dropped by the client: nothing to write.
        ResponseFields::Pass(PassFields::default())
    } else {
        let length = fields.content_length.and_then(Result::ok);
        ResponseFields::Pass(PassFields::build(
            res.headers
                .iter()
                .zip(kinds)
                .map(|(h, kind)| (h.name.as_bytes(), h.value, kind)),
            &named,
            length,
            len,
        ))
    };
    Ok(Some((
        ResponseHead {
            version,
            status,
            fields,
            framing,
            interim,
            keep_alive,
        },
        len,
    )))
}

/// Header slots on the stack for up to this many fields (the default `max_headers`); a
/// larger limit takes them from the heap.
const INLINE_HEADERS: usize = 100;

type Slot<'b> = MaybeUninit<httparse::Header<'b>>;

fn header_slots<'b>() -> [Slot<'b>; INLINE_HEADERS] {
    [const { MaybeUninit::uninit() }; INLINE_HEADERS]
}

/// Exactly `max` slots for httparse, which refuses a head with more fields than slots.
fn slots<'s, 'b>(
    inline: &'s mut [Slot<'b>; INLINE_HEADERS],
    heap: &'s mut Vec<httparse::Header<'b>>,
    max: usize,
) -> &'s mut [Slot<'b>] {
    if max <= INLINE_HEADERS {
        &mut inline[..max]
    } else {
        heap.reserve_exact(max);
        &mut heap.spare_capacity_mut()[..max]
    }
}

fn too_large() -> Rejection {
    Rejection {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        reason: "request head larger than max_header_size",
    }
}

fn request_syntax(e: httparse::Error) -> Rejection {
    use httparse::Error as E;
    match e {
        E::TooManyHeaders => Rejection {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            reason: "more header fields than max_headers",
        },
        // httparse cannot tell `HTTP/1.2` from `http/1.1` or garbage; 400 as hyper answers.
        E::Version => Rejection::bad_request("invalid or unsupported HTTP version"),
        E::HeaderName => {
            Rejection::bad_request("invalid header field name (whitespace before ':', or obs-fold)")
        }
        E::HeaderValue => Rejection::bad_request("invalid header field value"),
        E::NewLine => Rejection::bad_request("invalid line ending"),
        E::Token => Rejection::bad_request("invalid method or request target"),
        E::Status => Rejection::bad_request("invalid request line"),
    }
}

/// RFC 9112 §3.2: origin-form for most methods, absolute-form for any, authority-form only
/// for CONNECT, asterisk-form only for OPTIONS.
fn request_target(method: &Method, target: &str, shared: Option<&Bytes>) -> Result<Uri, Rejection> {
    if target.len() > MAX_TARGET {
        return Err(Rejection {
            status: StatusCode::URI_TOO_LONG,
            reason: "request target too long",
        });
    }
    let invalid = || Rejection::bad_request("invalid request target");
    let uri = Uri::from_maybe_shared(bytes_of(shared, target.as_bytes())).map_err(|_| invalid())?;
    let form_ok = if method == Method::CONNECT {
        uri.scheme().is_none() && uri.authority().is_some() && !target.starts_with('/')
    } else if target == "*" {
        method == Method::OPTIONS
    } else {
        target.starts_with('/') || (uri.scheme().is_some() && uri.authority().is_some())
    };
    if form_ok {
        Ok(uri)
    } else {
        Err(invalid())
    }
}

fn field(name: &str, value: &[u8], shared: Option<&Bytes>) -> Option<(HeaderName, HeaderValue)> {
    let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
    let value = HeaderValue::from_maybe_shared(bytes_of(shared, value)).ok()?;
    Some((name, value))
}

/// The elements of a comma-separated field value, whitespace trimmed, empty ones skipped.
fn elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
}

impl Fields {
    fn note(&mut self, name: RequestName, value: &[u8]) {
        match name {
            RequestName::Connection => self.connection_options(value),
            RequestName::ContentLength => self.length(value),
            RequestName::TransferEncoding => self.transfer_codings(value),
            RequestName::Host => {
                self.hosts += 1;
                self.host_valid = value.is_empty()
                    || http::uri::Authority::try_from(value).is_ok_and(|a| {
                        a.as_str().len() == value.len() && !a.as_str().contains('@')
                    });
            }
            RequestName::Expect => {
                let ok = value.eq_ignore_ascii_case(b"100-continue");
                self.expect = Some(self.expect.unwrap_or(true) && ok);
            }
            RequestName::Upgrade => self.upgrade = true,
            RequestName::ForwardedFor
            | RequestName::ForwardedSet
            | RequestName::HopByHop
            | RequestName::Other => {}
        }
    }

    fn connection_options(&mut self, value: &[u8]) {
        for option in elements(value) {
            if option.eq_ignore_ascii_case(b"close") {
                self.connection.close = true;
            } else if option.eq_ignore_ascii_case(b"keep-alive") {
                self.connection.keep_alive = true;
            } else if option.eq_ignore_ascii_case(b"upgrade") {
                self.connection.upgrade = true;
            }
        }
    }

    fn length(&mut self, value: &[u8]) {
        self.content_length = Some(match self.content_length {
            Some(Err(())) => Err(()),
            prev => content_length(value, prev.and_then(Result::ok)),
        });
    }

    fn transfer_codings(&mut self, value: &[u8]) {
        let codings = self.codings.get_or_insert_with(Codings::default);
        for coding in elements(value) {
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            codings.chunked_count += usize::from(chunked);
            codings.other |= !chunked;
            codings.last_is_chunked = chunked;
        }
    }
}

/// One `Content-Length` line, checked against the value of earlier lines. Repeated lines
/// with one value pass; a comma list in one line does not (RFC 9110 §8.6 lets a recipient
/// refuse it, and hyper does too).
fn content_length(digits: &[u8], prev: Option<u64>) -> Result<u64, ()> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    let n = digits
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(())?;
    match prev {
        Some(p) if p != n => Err(()),
        _ => Ok(n),
    }
}

fn request_framing(version: Version, fields: &Fields) -> Result<Framing, Rejection> {
    if let Some(codings) = &fields.codings {
        if version == Version::HTTP_10 {
            return Err(Rejection::bad_request(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if let Some(Err(())) = fields.content_length {
            return Err(Rejection::bad_request("invalid Content-Length"));
        }
        if !codings.last_is_chunked {
            return Err(Rejection::bad_request(
                "chunked is not the final transfer coding",
            ));
        }
        if codings.chunked_count > 1 {
            return Err(Rejection::bad_request("chunked applied more than once"));
        }
        if codings.other {
            return Err(Rejection {
                status: StatusCode::NOT_IMPLEMENTED,
                reason: "transfer coding other than chunked",
            });
        }
        return Ok(Framing::Chunked);
    }
    match fields.content_length {
        None => Ok(Framing::Empty),
        Some(Ok(n)) => Ok(Framing::Length(n)),
        Some(Err(())) => Err(Rejection::bad_request("invalid Content-Length")),
    }
}

fn response_framing(
    version: Version,
    status: StatusCode,
    method: &Method,
    upgrade: bool,
    fields: &Fields,
) -> Result<Framing, Rejection> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return if upgrade {
            Ok(Framing::Tunnel)
        } else {
            Err(Rejection::bad_gateway(
                "101 to a request that did not ask to upgrade",
            ))
        };
    }
    if status.is_informational()
        || *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if *method == Method::CONNECT && status.is_success() {
        return Ok(Framing::Tunnel);
    }
    if let Some(codings) = &fields.codings {
        // RFC 9112 §6.1: in HTTP/1.0 the framing is faulty; §6.3 ¶4: a response whose final
        // coding is not chunked ends at close. Either way the length is not trusted.
        if version == Version::HTTP_11 && codings.last_is_chunked {
            if codings.chunked_count > 1 {
                return Err(Rejection::bad_gateway("chunked applied more than once"));
            }
            return Ok(Framing::Chunked);
        }
        return Ok(Framing::UntilClose);
    }
    match fields.content_length {
        None => Ok(Framing::UntilClose),
        Some(Ok(n)) => Ok(Framing::Length(n)),
        Some(Err(())) => Err(Rejection::bad_gateway("invalid Content-Length in response")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_head: 1024,
        max_headers: 8,
    };

    fn req(raw: &str) -> Result<(RequestHead, usize), Rejection> {
        match parse_request(raw.as_bytes(), &LIMITS) {
            Ok(Some(parsed)) => Ok(parsed),
            Ok(None) => panic!("incomplete: {raw:?}"),
            Err(e) => Err(e),
        }
    }

    fn status(raw: &str) -> u16 {
        match req(raw) {
            Ok((head, _)) => panic!("accepted {raw:?} as {head:?}"),
            Err(e) => e.status.as_u16(),
        }
    }

    fn framing(raw: &str) -> Framing {
        match req(raw) {
            Ok((head, _)) => head.framing,
            Err(e) => panic!("rejected {raw:?}: {e}"),
        }
    }

    #[test]
    fn content_length_and_transfer_encoding() {
        let h = "POST / HTTP/1.1\r\nHost: a\r\n";
        assert_eq!(framing(&format!("{h}\r\n")), Framing::Empty);
        assert_eq!(
            framing(&format!("{h}Content-Length: 5\r\n\r\n")),
            Framing::Length(5)
        );
        assert_eq!(
            framing(&format!("{h}Content-Length: 0\r\n\r\n")),
            Framing::Length(0)
        );
        assert_eq!(
            framing(&format!("{h}Transfer-Encoding: chunked\r\n\r\n")),
            Framing::Chunked
        );
        assert_eq!(
            framing(&format!("{h}Transfer-Encoding: CHUNKED\r\n\r\n")),
            Framing::Chunked
        );
        // Both, in either order: chunked decides, the length is dropped, the connection
        // closes after the response; an invalid length is refused all the same.
        for both in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
        ] {
            let (head, _) = req(&format!("{h}{both}\r\n\r\n")).unwrap();
            assert_eq!(head.framing, Framing::Chunked, "{both}");
            assert!(!head.keep_alive, "{both}");
            assert!(
                !head.fields.to_header_map().contains_key("content-length"),
                "{both}"
            );
        }
        assert_eq!(
            status(&format!(
                "{h}Transfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n"
            )),
            400
        );
        // chunked not last, twice, unknown codings, empty.
        assert_eq!(
            status(&format!("{h}Transfer-Encoding: chunked, gzip\r\n\r\n")),
            400
        );
        assert_eq!(status(&format!("{h}Transfer-Encoding: gzip\r\n\r\n")), 400);
        assert_eq!(
            status(&format!("{h}Transfer-Encoding: chunked, chunked\r\n\r\n")),
            400
        );
        assert_eq!(
            status(&format!(
                "{h}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            400
        );
        assert_eq!(
            status(&format!("{h}Transfer-Encoding: gzip, chunked\r\n\r\n")),
            501
        );
        assert_eq!(
            status(&format!(
                "{h}Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            501
        );
        assert_eq!(status(&format!("{h}Transfer-Encoding: \r\n\r\n")), 400);
        assert_eq!(
            status(&format!("{h}Transfer-Encoding: chunked;x=1\r\n\r\n")),
            400
        );
        // HTTP/1.0 cannot use Transfer-Encoding.
        assert_eq!(
            status("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
    }

    #[test]
    fn duplicate_and_invalid_lengths() {
        let h = "POST / HTTP/1.1\r\nHost: a\r\n";
        assert_eq!(
            framing(&format!(
                "{h}Content-Length: 7\r\nContent-Length: 7\r\n\r\n"
            )),
            Framing::Length(7)
        );
        assert_eq!(
            framing(&format!("{h}Content-Length: 007\r\n\r\n")),
            Framing::Length(7)
        );
        for bad in [
            "Content-Length: 7\r\nContent-Length: 8",
            "Content-Length: 7, 8",
            "Content-Length: 7, 7",
            "Content-Length: 8\r\nContent-Length: 7, 7",
            "Content-Length: +7",
            "Content-Length: -1",
            "Content-Length: 0x10",
            "Content-Length: 1 2",
            "Content-Length: 1.0",
            "Content-Length: ",
            "Content-Length: 7,",
            "Content-Length: ,7",
            "Content-Length: 18446744073709551616",
            "Content-Length: 99999999999999999999999",
        ] {
            assert_eq!(status(&format!("{h}{bad}\r\n\r\n")), 400, "{bad:?}");
        }
        assert_eq!(
            framing(&format!("{h}Content-Length: 18446744073709551615\r\n\r\n")),
            Framing::Length(u64::MAX)
        );
    }

    #[test]
    fn obs_fold_bare_cr_and_spaces_in_names_are_refused() {
        // obs-fold (a field line continued on the next line).
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\t2\r\n\r\n"),
            400
        );
        // Bare CR in a value, in the request line, as a line end.
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r2\r\n\r\n"),
            400
        );
        assert_eq!(status("GET /\r HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\rHost: a\r\n\r\n"), 400);
        // Whitespace between a name and its colon, or inside a name.
        assert_eq!(status("GET / HTTP/1.1\r\nHost : a\r\n\r\n"), 400);
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 5\r\n\r\n"),
            400
        );
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nX A: 1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\n Host: a\r\n\r\n"), 400);
        // Control characters in a value; NUL in the target.
        assert_eq!(
            status("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\x002\r\n\r\n"),
            400
        );
        assert_eq!(status("GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
    }

    #[test]
    fn bare_lf_ends_head_lines() {
        let raw = "GET /x HTTP/1.1\nHost: a\nX-A: 1\n\nnext";
        let (head, len) = req(raw).unwrap();
        assert_eq!(len, raw.len() - "next".len());
        assert_eq!(head.target, "/x");
        assert_eq!(head.fields.to_header_map()["x-a"], "1");
    }

    #[test]
    fn request_line_forms_and_versions() {
        assert_eq!(status("GET / HTTP/1.2\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2.0\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / http/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET  / HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1 \r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("G(T / HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET x HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET * HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET a.example:80 HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n"), 400);
        let ok = |raw: &str| req(raw).map(|(h, _)| h.target.to_string());
        assert_eq!(ok("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n"), Ok("*".into()));
        assert_eq!(
            ok("CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"),
            Ok("a.example:443".into())
        );
        assert_eq!(
            ok("GET http://a.example/p?q HTTP/1.1\r\nHost: a.example\r\n\r\n"),
            Ok("http://a.example/p?q".into())
        );
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_TARGET)
        );
        let limits = Limits {
            max_head: 1 << 20,
            max_headers: 8,
        };
        assert_eq!(
            parse_request(long.as_bytes(), &limits).unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
    }

    #[test]
    fn host_rules() {
        assert_eq!(status("GET / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a b\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"), 400);
        assert!(req("GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n").is_ok());
        assert!(req("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").is_ok());
        assert!(req("GET / HTTP/1.1\r\nHost:\r\n\r\n").is_ok());
        assert!(req("GET / HTTP/1.0\r\n\r\n").is_ok());
        assert_eq!(status("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
    }

    #[test]
    fn keep_alive_by_version_and_connection() {
        let ka = |raw: &str| req(raw).unwrap().0.keep_alive;
        assert!(ka("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, CLOSE\r\n\r\n"
        ));
        assert!(!ka(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(
            "GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"
        ));
        assert!(!ka("GET / HTTP/1.0\r\nConnection: keep-alives\r\n\r\n"));
    }

    #[test]
    fn pipelined_requests_are_parsed_one_after_another() {
        let raw = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut at = 0;
        let mut seen = Vec::new();
        while at < raw.len() {
            let (head, len) = parse_request(&raw[at..], &LIMITS).unwrap().unwrap();
            at += len;
            if let Framing::Length(n) = head.framing {
                at += n as usize;
            }
            seen.push(head.target.to_string());
        }
        assert_eq!(seen, ["/1", "/2", "/3"]);
    }

    #[test]
    fn partial_heads_wait_and_oversized_ones_are_refused() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for end in 0..raw.len() {
            assert!(
                parse_request(&raw[..end], &LIMITS).unwrap().is_none(),
                "{end}"
            );
        }
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: {}\r\n\r\n",
            "a".repeat(1000)
        );
        assert_eq!(status(&big), 431);
        let unfinished = format!("GET / HTTP/1.1\r\nX-A: {}", "a".repeat(1100));
        assert_eq!(
            parse_request(unfinished.as_bytes(), &LIMITS)
                .unwrap_err()
                .status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let many: String = (0..9).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
            431
        );
    }

    #[test]
    fn header_limits_above_the_inline_slots() {
        let limits = Limits {
            max_head: 1 << 16,
            max_headers: INLINE_HEADERS + 50,
        };
        let head = |n: usize| {
            let fields: String = (1..n).map(|i| format!("X-{i}: 1\r\n")).collect();
            format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n")
        };
        let (parsed, _) = parse_request(head(150).as_bytes(), &limits)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.fields.len(), 150);
        assert_eq!(
            parse_request(head(151).as_bytes(), &limits)
                .unwrap_err()
                .status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn expect_continue() {
        let ec = |raw: &str| req(raw).map(|(h, _)| h.expect_continue);
        assert_eq!(
            ec("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n"),
            Ok(true)
        );
        assert_eq!(ec("PUT / HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(false));
        // HTTP/1.0: ignored (RFC 9110 §10.1.1).
        assert_eq!(
            ec("PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"),
            Ok(false)
        );
        assert_eq!(
            status("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n"),
            417
        );
        assert_eq!(
            status("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nExpect: x\r\n\r\n"),
            417
        );
    }

    #[test]
    fn upgrade_needs_the_connection_option_and_http_1_1() {
        let up = |raw: &str| req(raw).unwrap().0.upgrade;
        assert!(up(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!up(
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"
        ));
        assert!(!up(
            "GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        ));
    }

    fn res(raw: &str, method: Method, upgrade: bool) -> Result<ResponseHead, Rejection> {
        parse_response(raw.as_bytes(), &LIMITS, &method, upgrade).map(|r| r.unwrap().0)
    }

    #[test]
    fn responses_without_bodies() {
        let cl = "Content-Length: 10\r\n";
        let te = "Transfer-Encoding: chunked\r\n";
        for (line, method) in [
            ("HTTP/1.1 200 OK", Method::HEAD),
            ("HTTP/1.1 204 No Content", Method::GET),
            ("HTTP/1.1 304 Not Modified", Method::GET),
            ("HTTP/1.1 100 Continue", Method::PUT),
            ("HTTP/1.1 103 Early Hints", Method::GET),
        ] {
            for extra in [cl, te, ""] {
                let head = res(&format!("{line}\r\n{extra}\r\n"), method.clone(), false).unwrap();
                assert_eq!(head.framing, Framing::Empty, "{line} {extra:?}");
                assert!(head.keep_alive, "{line} {extra:?}");
            }
        }
        assert!(
            res("HTTP/1.1 100 Continue\r\n\r\n", Method::PUT, false)
                .unwrap()
                .interim
        );
        assert!(
            !res("HTTP/1.1 204 No\r\n\r\n", Method::PUT, false)
                .unwrap()
                .interim
        );
    }

    #[test]
    fn response_framing() {
        let f = |raw: &str| res(raw, Method::GET, false).map(|h| (h.framing, h.keep_alive));
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Length(3), true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\n\r\n"),
            Ok((Framing::UntilClose, false))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::UntilClose, false))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok((Framing::UntilClose, false))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Length(3), false))
        );
        assert_eq!(
            f("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Length(3), true))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Length(3), false))
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r2\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert_eq!(
                f(bad).unwrap_err().status,
                StatusCode::BAD_GATEWAY,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn upgrade_and_connect_responses_open_tunnels() {
        let head = res(
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            Method::GET,
            true,
        )
        .unwrap();
        assert_eq!((head.framing, head.keep_alive), (Framing::Tunnel, false));
        let head = res("HTTP/1.1 200 OK\r\n\r\n", Method::CONNECT, false).unwrap();
        assert_eq!(head.framing, Framing::Tunnel);
        let head = res(
            "HTTP/1.1 407 No\r\nContent-Length: 0\r\n\r\n",
            Method::CONNECT,
            false,
        )
        .unwrap();
        assert_eq!(head.framing, Framing::Length(0));
    }
}
