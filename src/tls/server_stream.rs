//! A TLS listener's side of a connection, on rustls's unbuffered API, holding no buffer
//! while the connection waits.
//!
//! Why not tokio-rustls (which ballast still uses towards backends): its `ServerConnection`
//! keeps a deframer buffer of at least 4 KiB for the connection's whole life (rustls sizes
//! it before every read and has no call to give it back). That was 40% of what an idle TLS
//! client cost ballast (BENCHMARKS.md, issue 24). Here ballast owns the three buffers:
//! ciphertext read and not yet processed, plaintext a reader had no room for, and
//! ciphertext not yet sent. Each is given back when it is empty and the connection waits on
//! its socket (a read that would block, or [`Transport::poll_readable`]), as
//! `h1::server` does with its own buffer for plaintext connections.
//!
//! It behaves as tokio-rustls's server stream did, which the rest of ballast was written
//! against: a read after the peer's `close_notify` is end of file, and end of file without
//! one is an `UnexpectedEof` error; shutdown sends `close_notify`; a write is accepted once
//! it is encrypted, and the next write or flush sends what the socket would not take yet; a
//! handshake or record error is `InvalidData` carrying the `rustls::Error`, after rustls's
//! alert is sent (best effort).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client_hello::{self, Hello};
use crate::h1::server::Transport;

/// Bytes asked of the socket per read, at least (more when a longer record is arriving, or
/// the buffer already grew for one).
const READ_CHUNK: usize = 4096;
/// The most ciphertext held for one incomplete message: a handshake message may span
/// records up to 64 KiB (rustls's own limit for its buffered API), plus one whole record.
const MAX_INCOMING: usize = 0x1_0000 + MAX_RECORD;
/// A TLS record on the wire at most: header, 16 KiB of plaintext, and the allowed expansion.
const MAX_RECORD: usize = 5 + 16_384 + 256;
/// Plaintext encrypted per write at most (four full records): a larger write is accepted in
/// parts, so the ciphertext held for one write stays bounded.
const MAX_WRITE: usize = 4 * 16_384;

/// A server-side TLS stream over `IO`, after its handshake ([`accept`]).
pub struct ServerStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed (reads go into its spare capacity, which is
    /// never zeroed). Empty, with no allocation, while the connection waits.
    incoming: Vec<u8>,
    /// Decrypted bytes a reader's buffer had no room for: `plain[plain_at..]`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Ciphertext to send: `out[out_at..]`.
    out: Vec<u8>,
    out_at: usize,
    /// The socket reached end of file.
    eof: bool,
    /// The peer's `close_notify` arrived: reads end there.
    peer_closed: bool,
    /// Our `close_notify` is queued: no more writes.
    closed: bool,
}

/// The TLS handshake on `io` as the server, with `config`. Not bounded in time: the caller
/// puts a timeout around it. With `read_sni`, also the name the client sent as SNI
/// (rustls checks it but does not give it back here; see [`super::client_hello`]).
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    io: IO,
    read_sni: bool,
) -> io::Result<(ServerStream<IO>, Option<Box<str>>)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut stream = ServerStream {
        io,
        conn,
        incoming: Vec::new(),
        plain: Vec::new(),
        plain_at: 0,
        out: Vec::new(),
        out_at: 0,
        eof: false,
        peer_closed: false,
        closed: false,
    };
    let mut hello = read_sni.then_some(Hello::Incomplete);
    std::future::poll_fn(|cx| stream.poll_handshake(cx, &mut hello)).await?;
    let sni = match hello {
        Some(Hello::Sni(name)) => name,
        _ => None,
    };
    Ok((stream, sni))
}

/// What a call to [`ServerStream::process`] is for.
enum Job<'a, 'b> {
    /// The handshake, or a read: decrypted bytes go to the buffer while it has room, and to
    /// `plain` without one.
    Read(Option<&'a mut ReadBuf<'b>>),
    /// Encrypt these bytes.
    Write(&'a [u8]),
    /// Queue `close_notify`.
    Close,
}

/// Where [`ServerStream::process`] stopped.
enum Stop {
    /// Nothing more happens without more bytes from the peer (a read's buffer got nothing).
    NeedData,
    /// A read's buffer got bytes, or a write's bytes were encrypted, or `close_notify` was
    /// queued.
    Done,
    /// Both sides have sent `close_notify`.
    Closed,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerStream<IO> {
    /// The stream under TLS.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// The protocol ALPN chose, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// `hello`: while `Some(Incomplete)`, the ClientHello's SNI is read from the records
    /// before rustls consumes them. Once rustls has consumed any (a ClientHello split over
    /// records rustls takes one by one), it stays unknown.
    fn poll_handshake(
        &mut self,
        cx: &mut Context<'_>,
        hello: &mut Option<Hello>,
    ) -> Poll<io::Result<()>> {
        loop {
            let unread = self.incoming.len();
            if hello.as_ref() == Some(&Hello::Incomplete) && unread > 0 {
                *hello = Some(client_hello::sni(&self.incoming));
            }
            if let Err(e) = self.process(&mut Job::Read(None)) {
                self.send_alert(cx);
                return Poll::Ready(Err(e));
            }
            if self.incoming.len() < unread && hello.as_ref() == Some(&Hello::Incomplete) {
                *hello = Some(Hello::Sni(None));
            }
            let flushed = self.poll_send(cx)?;
            if !self.conn.is_handshaking() {
                // The last flight (TLS 1.3: the session tickets) goes out before the stream
                // is handed on, as tokio-rustls did.
                return flushed.map(Ok);
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            if ready!(self.poll_receive(cx))? == 0 {
                self.eof = true;
            }
        }
    }

    /// Hands what `incoming` holds to rustls until `job` is done or rustls needs more bytes
    /// from the peer; what rustls has to send goes to `out`.
    fn process(&mut self, job: &mut Job<'_, '_>) -> io::Result<Stop> {
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let stop = match state {
                Err(e) => Err(invalid(e)),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut delivered = false;
                    loop {
                        let room = match job {
                            Job::Read(Some(buf)) => buf.remaining(),
                            _ => 0,
                        };
                        // A reader's full buffer leaves the rest with rustls for the next read
                        // (so a peer cannot make ballast hold more than one record's worth).
                        if room == 0 && delivered {
                            break;
                        }
                        let Some(record) = traffic.next_record() else {
                            break;
                        };
                        let payload = record.map_err(invalid)?.payload;
                        let n = room.min(payload.len());
                        if let Job::Read(Some(buf)) = job {
                            buf.put_slice(&payload[..n]);
                            delivered = true;
                        }
                        if n < payload.len() {
                            if self.plain_at == self.plain.len() {
                                self.plain.clear();
                                self.plain_at = 0;
                            }
                            self.plain.extend_from_slice(&payload[n..]);
                        }
                    }
                    Ok(delivered.then_some(Stop::Done))
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.out, &mut encode);
                    Ok(None)
                }
                // The encoded bytes are in `out`, sent in order before anything written later.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Stop::NeedData)),
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(None)
                }
                Ok(ConnectionState::Closed) => Ok(Some(Stop::Closed)),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match job {
                    Job::Read(_) => Ok(Some(Stop::NeedData)),
                    Job::Write(data) => {
                        let start = self.out.len();
                        // Header, content type and tag per record; rustls says if it needs more.
                        let mut need = data.len() + (data.len() / 16_384 + 1) * 64;
                        loop {
                            self.out.resize(start + need, 0);
                            match traffic.encrypt(data, &mut self.out[start..]) {
                                Ok(n) => {
                                    self.out.truncate(start + n);
                                    break Ok(Some(Stop::Done));
                                }
                                Err(EncryptError::InsufficientSize(e))
                                    if e.required_size > need =>
                                {
                                    need = e.required_size;
                                }
                                Err(e) => {
                                    self.out.truncate(start);
                                    break Err(io::Error::other(e));
                                }
                            }
                        }
                    }
                    Job::Close => {
                        let start = self.out.len();
                        self.out.resize(start + 64, 0);
                        match traffic.queue_close_notify(&mut self.out[start..]) {
                            Ok(n) => {
                                self.out.truncate(start + n);
                                self.closed = true;
                                Ok(Some(Stop::Done))
                            }
                            Err(e) => {
                                self.out.truncate(start);
                                Err(io::Error::other(e))
                            }
                        }
                    }
                },
                // ballast never enables 0-RTT (`max_early_data_size` is 0), so rustls refuses
                // early data itself; any other state is one this code does not know.
                Ok(_) => Err(invalid(rustls::Error::General(
                    "unexpected TLS state".into(),
                ))),
            };
            self.discard(discard);
            if let Some(stop) = stop? {
                return Ok(stop);
            }
        }
    }

    /// Removes `n` processed bytes from the front of `incoming`.
    fn discard(&mut self, n: usize) {
        if n >= self.incoming.len() {
            self.incoming.clear();
        } else if n > 0 {
            self.incoming.drain(..n);
        }
    }

    /// Reads ciphertext from the socket into `incoming`: with room for the rest of the
    /// record that has begun, or at least [`READ_CHUNK`] bytes.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let held = &self.incoming;
        let record_rest = match held[..] {
            [_, _, _, hi, lo, ..] => {
                (5 + usize::from(u16::from_be_bytes([hi, lo]))).saturating_sub(held.len())
            }
            _ => 0,
        };
        // Room for the rest of a record that has begun, or a read's worth; `reserve` keeps
        // the buffer when it already has that much room (no copy of a partial record).
        let want = if record_rest > 0 {
            record_rest
        } else {
            READ_CHUNK
        };
        if held.len() + want > MAX_INCOMING + READ_CHUNK {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message too large",
            )));
        }
        self.incoming.reserve(want);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.incoming)
    }

    /// Writes `out` to the socket; ready when all of it is sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out.clear();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// After a TLS error: sends the alert rustls queued for it, if the socket takes it now.
    /// Nothing more is processed (the bytes that failed would fail again).
    fn send_alert(&mut self, cx: &mut Context<'_>) {
        while let Ok(ConnectionState::EncodeTlsData(mut encode)) =
            self.conn.process_tls_records(&mut []).state
        {
            encode_into(&mut self.out, &mut encode);
        }
        let _ = self.poll_send(cx);
    }

    /// Gives back every buffer that holds nothing: the connection is about to wait.
    fn release_idle(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if self.plain_at == self.plain.len() {
            self.plain = Vec::new();
            self.plain_at = 0;
        }
        if self.out_at == self.out.len() {
            self.out = Vec::new();
            self.out_at = 0;
        }
    }

    /// `incoming` holds at least one whole record.
    fn holds_record(&self) -> bool {
        match self.incoming[..] {
            [_, _, _, hi, lo, ..] => {
                self.incoming.len() >= 5 + usize::from(u16::from_be_bytes([hi, lo]))
            }
            _ => false,
        }
    }

    /// For tests: bytes of buffer this stream holds.
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.out.capacity()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.plain_at < this.plain.len() {
            let n = buf.remaining().min(this.plain.len() - this.plain_at);
            buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
            this.plain_at += n;
            return Poll::Ready(Ok(()));
        }
        loop {
            let stop = match this.process(&mut Job::Read(Some(buf))) {
                Ok(stop) => stop,
                Err(e) => {
                    this.send_alert(cx);
                    return Poll::Ready(Err(e));
                }
            };
            // What rustls had to say on reading (a key update's answer) goes out now if the
            // socket takes it, or with the next write or flush.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if matches!(stop, Stop::Done | Stop::Closed) || this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            match this.poll_receive(cx) {
                Poll::Pending => {
                    this.release_idle();
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // What an earlier write left goes first: at most one write's ciphertext is held.
        ready!(this.poll_send(cx))?;
        let data = &buf[..buf.len().min(MAX_WRITE)];
        match this.process(&mut Job::Write(data))? {
            Stop::Done => {}
            Stop::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Stop::NeedData => {
                return Poll::Ready(Err(io::Error::other("TLS handshake not complete")));
            }
        }
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            this.process(&mut Job::Close)?;
            this.closed = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// ballast's own HTTP/1.1 server waits for a request by the socket's readiness, holding no
/// buffer, unless a read would answer at once: decrypted bytes are waiting, a whole record
/// is, or the peer has closed.
impl<IO: Transport> Transport for ServerStream<IO> {
    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.plain_at < self.plain.len()
            || !self.conn.wants_read()
            || self.holds_record()
            || self.peer_closed
            || self.eof
        {
            return Poll::Ready(Ok(()));
        }
        self.release_idle();
        self.io.poll_readable(cx)
    }
}

/// Appends a handshake record (or alert) rustls has ready to `out`.
fn encode_into<Data>(out: &mut Vec<u8>, encode: &mut rustls::unbuffered::EncodeTlsData<'_, Data>) {
    let start = out.len();
    loop {
        match encode.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(need)) => out.resize(start + need.required_size, 0),
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return;
            }
        }
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};

    /// A server config for `localhost` (self-signed) and a client that trusts it.
    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, tokio_rustls::TlsConnector) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).expect("key");
        let mut server = ServerConfig::builder_with_provider(super::super::provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .expect("server config");
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let mut client = rustls::ClientConfig::builder_with_provider(super::super::provider())
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        (
            Arc::new(server),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
        )
    }

    type Client<IO> = tokio_rustls::client::TlsStream<IO>;

    /// `poll_readable` polled once: what a waiting server would see now.
    async fn poll_readable_once<IO: Transport>(
        server: &mut ServerStream<IO>,
    ) -> Poll<io::Result<()>> {
        std::future::poll_fn(|cx| Poll::Ready(server.poll_readable(cx))).await
    }

    /// Both ends of a handshaken connection over an in-memory pipe of `pipe` bytes.
    async fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
        pipe: usize,
    ) -> (ServerStream<DuplexStream>, Client<DuplexStream>) {
        let (a, b) = tokio::io::duplex(pipe);
        handshake(versions, a, b).await
    }

    /// Both ends over loopback TCP (which waits for readiness in `poll_readable`).
    async fn tcp_pair() -> (ServerStream<TcpStream>, Client<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.expect("accept");
        handshake(&[&rustls::version::TLS13], server, client.expect("connect")).await
    }

    async fn handshake<IO: AsyncRead + AsyncWrite + Unpin>(
        versions: &[&'static rustls::SupportedProtocolVersion],
        server_io: IO,
        client_io: IO,
    ) -> (ServerStream<IO>, Client<IO>) {
        let (server_config, connector) = configs(versions);
        let name = ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(
            accept(server_config, server_io, true),
            connector.connect(name, client_io)
        );
        let (server, sni) = server.expect("server handshake");
        // Read from the records as they arrive (in pieces, through a small pipe).
        assert_eq!(sni.as_deref(), Some("localhost"), "the client's SNI");
        (server, client.expect("client handshake"))
    }

    const BOTH: [&[&rustls::SupportedProtocolVersion]; 2] =
        [&[&rustls::version::TLS13], &[&rustls::version::TLS12]];

    #[tokio::test]
    async fn bytes_pass_both_ways_in_any_size_and_alpn_is_chosen() {
        for versions in BOTH {
            // A pipe smaller than a record: reads and writes are partial all the way.
            let (mut server, mut client) = pair(versions, 1000).await;
            assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
            let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let down: Vec<u8> = up.iter().rev().copied().collect();
            let (up2, down2) = (up.clone(), down.clone());
            let client_side = async move {
                client.write_all(&up2).await.expect("client writes");
                client.flush().await.expect("client flushes");
                let mut got = vec![0u8; down2.len()];
                client.read_exact(&mut got).await.expect("client reads");
                assert!(got == down2, "the client got other bytes");
                client
            };
            let server_side = async move {
                // A reader with a small buffer: records larger than it are handed out in parts.
                let mut got = Vec::new();
                let mut small = [0u8; 1000];
                while got.len() < up.len() {
                    let n = server.read(&mut small).await.expect("server reads");
                    assert!(n > 0, "early end of file");
                    got.extend_from_slice(&small[..n]);
                }
                assert!(got == up, "the server got other bytes");
                server.write_all(&down).await.expect("server writes");
                server.flush().await.expect("server flushes");
                server
            };
            let (_client, _server) = tokio::join!(client_side, server_side);
        }
    }

    #[tokio::test]
    async fn close_notify_is_end_of_file_both_ways_and_a_bare_eof_is_an_error() {
        for versions in BOTH {
            let (mut server, mut client) = pair(versions, 64 * 1024).await;
            client.write_all(b"last words").await.expect("write");
            client.shutdown().await.expect("client close_notify");
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("clean end");
            assert_eq!(got, b"last words");
            server
                .write_all(b"reply")
                .await
                .expect("a write after the peer closed");
            server.shutdown().await.expect("server close_notify");
            let mut reply = Vec::new();
            client
                .read_to_end(&mut reply)
                .await
                .expect("clean end at the client");
            assert_eq!(reply, b"reply");

            // The transport ends with no close_notify: a truncation, as tokio-rustls said.
            let (mut server, client) = pair(versions, 64 * 1024).await;
            drop(client);
            let err = server.read(&mut [0u8; 16]).await.expect_err("truncated");
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
    }

    #[tokio::test]
    async fn a_waiting_connection_holds_no_buffer() {
        let (mut server, mut client) = tcp_pair().await;
        client.write_all(&[7u8; 20_000]).await.expect("write");
        let mut got = [0u8; 20_000];
        server.read_exact(&mut got).await.expect("read");
        server.write_all(&[9u8; 20_000]).await.expect("write");
        server.flush().await.expect("flush");
        assert!(server.buffered_capacity() > 0);
        // Waiting for the next request gives every buffer back.
        let waited = poll_readable_once(&mut server).await;
        assert!(
            waited.is_pending(),
            "nothing was sent, so nothing is readable"
        );
        assert_eq!(server.buffered_capacity(), 0);
        // And a read that would block does too.
        let mut byte = [0u8; 1];
        let read = std::future::poll_fn(|cx| {
            Poll::Ready(Pin::new(&mut server).poll_read(cx, &mut ReadBuf::new(&mut byte)))
        })
        .await;
        assert!(read.is_pending());
        assert_eq!(server.buffered_capacity(), 0);
        let mut reply = [0u8; 20_000];
        client
            .read_exact(&mut reply)
            .await
            .expect("the reply arrived");
        // Still usable afterwards.
        client.write_all(b"next").await.expect("write");
        let mut next = [0u8; 4];
        server.read_exact(&mut next).await.expect("read");
        assert_eq!(&next, b"next");
    }

    /// A pipe whose own readiness never comes: `poll_readable` can only be ready from what
    /// the TLS stream already holds.
    struct NeverReady(DuplexStream);

    impl AsyncRead for NeverReady {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for NeverReady {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl Transport for NeverReady {
        fn poll_readable(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn poll_readable_is_ready_when_a_read_would_answer_at_once() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (mut server, mut client) =
            handshake(&[&rustls::version::TLS13], NeverReady(a), NeverReady(b)).await;
        let idle = poll_readable_once(&mut server).await;
        assert!(idle.is_pending(), "nothing sent yet");
        // Two records, both in the pipe before the server reads; a reader with room for the
        // first only, so the second stays a whole record in `incoming`.
        client.write_all(b"first").await.expect("write");
        client.write_all(b"second").await.expect("write");
        client.flush().await.expect("flush");
        let mut five = [0u8; 5];
        server.read_exact(&mut five).await.expect("read");
        let ready = poll_readable_once(&mut server).await;
        assert!(ready.is_ready(), "the second record is already here");
        let mut six = [0u8; 6];
        server.read_exact(&mut six).await.expect("read");
        assert_eq!(&six, b"second");
        // A record larger than the reader's buffer: the rest is held decrypted.
        client.write_all(&[1u8; 3000]).await.expect("write");
        client.flush().await.expect("flush");
        let mut part = [0u8; 1000];
        server.read_exact(&mut part).await.expect("read");
        let ready = poll_readable_once(&mut server).await;
        assert!(ready.is_ready(), "2,000 decrypted bytes wait");
        let mut rest = [0u8; 2000];
        server.read_exact(&mut rest).await.expect("read");
        let idle = poll_readable_once(&mut server).await;
        assert!(idle.is_pending(), "all read");
        // The peer's close_notify: a read would answer (end of file) at once.
        client.shutdown().await.expect("close_notify");
        let mut byte = [0u8; 1];
        assert_eq!(server.read(&mut byte).await.expect("clean end"), 0);
        let ready = poll_readable_once(&mut server).await;
        assert!(ready.is_ready(), "the peer closed");
    }

    #[tokio::test]
    async fn a_client_that_is_not_speaking_tls_fails_the_handshake_at_once() {
        let (server_config, _) = configs(&[&rustls::version::TLS13]);
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        b.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let err = accept(server_config, a, true).await.err().expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.get_ref().is_some_and(|e| e.is::<rustls::Error>()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_key_update_from_the_client_is_followed() {
        let (mut server, mut client) = pair(&[&rustls::version::TLS13], 64 * 1024).await;
        client
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        client.write_all(b"after the update").await.expect("write");
        client.flush().await.expect("flush");
        let mut got = [0u8; 16];
        server
            .read_exact(&mut got)
            .await
            .expect("read under the new key");
        assert_eq!(&got, b"after the update");
        server.write_all(b"ok").await.expect("write");
        server.flush().await.expect("flush");
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).await.expect("read");
        assert_eq!(&ok, b"ok");
    }
}
