//! HTTP/2: clients by ALPN over TLS and by prior knowledge (h2c) on a plain listener,
//! backends over HTTP/1.1 and HTTP/2, gRPC with a real grpcio client and server, GOAWAY on
//! shutdown, and the known HTTP/2 abuse patterns bounded.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::tls::{connect, Pki};
use support::{start_backends, Backend, Ballast, TestConfig, WAIT};

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn h2_handshake<S>(io: S) -> H2
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// GET over an HTTP/2 connection: (status, x-backend, body).
async fn h2_get(sender: &mut H2, uri: &str) -> Result<(u16, String, String), hyper::Error> {
    sender.ready().await?;
    let req = http::Request::get(uri).body(Full::default()).unwrap();
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, backend, String::from_utf8_lossy(&body).into_owned()))
}

fn tls_config(backends: &[&Backend], pki: &Pki, pool: &str) -> String {
    let cert = pki.issue("server", &["localhost"]);
    TestConfig::new(backends)
        .admin()
        .listener(&format!(
            "[listeners.web.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
            cert.cert.display(),
            cert.key.display()
        ))
        .pool(pool)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_over_tls_reaches_http1_backends_with_streams_multiplexed() {
    let [a, b] = start_backends(["a", "b"]).await;
    let pki = Pki::new("h2");
    let lb = Ballast::start(&tls_config(&[&a, &b], &pki, ""));
    let tls = connect(lb.addr("web"), Some("localhost"), &pki.client(&["h2"]))
        .await
        .expect("handshake");
    assert_eq!(support::tls::alpn(&tls).as_deref(), Some("h2"));
    let sender = h2_handshake(tls).await;
    // 20 concurrent streams on the one connection, each a slow request: they overlap, so
    // the total takes about one request's time, not twenty.
    let started = Instant::now();
    let calls = (0..20).map(|_| {
        let mut s = sender.clone();
        tokio::spawn(async move { h2_get(&mut s, "https://localhost/slow/300").await })
    });
    let calls: Vec<_> = calls.collect();
    let mut seen = std::collections::BTreeMap::new();
    for c in calls {
        let (status, backend, _) = c.await.unwrap().expect("stream");
        assert_eq!(status, 200);
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&10), "{seen:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "streams were not concurrent: {:?}",
        started.elapsed()
    );
    // The backend got HTTP/1.1 with Host taken from :authority, marked https.
    let mut s = sender.clone();
    let (_, _, headers) = h2_get(&mut s, "https://localhost/headers").await.unwrap();
    assert!(headers.contains("host: localhost\n"), "{headers}");
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    let (_, _, version) = h2_get(&mut s, "https://localhost/version").await.unwrap();
    assert_eq!(version, "HTTP/1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_opt_in_and_http11_still_works_beside_it() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).listener("h2c = true").build());
    let mut h2 = h2_handshake(TcpStream::connect(lb.addr("web")).await.unwrap()).await;
    let (status, backend, _) = h2_get(&mut h2, "http://test.local/").await.expect("h2c");
    assert_eq!((status, backend.as_str()), (200, "a"));
    assert_eq!(support::get(lb.addr("web"), "/").await.body, "a");
    drop(lb);
    // Without h2c, the preface is not a valid HTTP/1.1 request: refused, nothing forwarded.
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let hits = a.hits();
    let r = support::raw_request(lb.addr("web"), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(
        r.is_none_or(|r| r.status_text().0 >= 400),
        "h2c accepted without opt-in"
    );
    assert_eq!(a.hits(), hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_an_h2_backend_are_multiplexed_on_one_upstream_connection() {
    let a = Backend::start_h2("a").await;
    let pki = Pki::new("h2up");
    let lb = Ballast::start(&tls_config(&[&a], &pki, "protocol = \"h2\""));
    let tls = connect(lb.addr("web"), Some("localhost"), &pki.client(&["h2"]))
        .await
        .expect("handshake");
    let sender = h2_handshake(tls).await;
    let calls = (0..16).map(|_| {
        let mut s = sender.clone();
        tokio::spawn(async move { h2_get(&mut s, "https://localhost/slow/200").await })
    });
    let calls: Vec<_> = calls.collect();
    for c in calls {
        assert_eq!(c.await.unwrap().expect("stream").0, 200);
    }
    let mut s = sender.clone();
    let (_, _, version) = h2_get(&mut s, "https://localhost/version").await.unwrap();
    assert_eq!(version, "HTTP/2.0");
    // 16 concurrent requests, one connection to the backend (plus none for health checks:
    // this pool has none).
    assert_eq!(a.connections(), 1, "upstream h2 connection not shared");
    // An HTTP/1.1 client reaches the h2 backend too.
    let tls = connect(
        lb.addr("web"),
        Some("localhost"),
        &pki.client(&["http/1.1"]),
    )
    .await
    .expect("handshake");
    let r = support::tls::get_h1(tls, "localhost", "/version")
        .await
        .expect("h1");
    assert_eq!(r.body, "HTTP/2.0");
}

/// Runs the grpcio peer script; `None` (and a SKIPPED line) if grpcio is not installed.
fn grpc_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: python3 grpcio is not installed (.ci/run installs it with pip)");
    }
    ok
}

struct GrpcServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl GrpcServer {
    fn start(name: &str) -> GrpcServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_peer.py"))
            .args(["server", name])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start grpc server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("grpc server said {line:?}"));
        GrpcServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_pass_with_trailers() {
    if !grpc_available() {
        return;
    }
    let one = GrpcServer::start("one");
    let two = GrpcServer::start("two");
    let config = TestConfig::addresses([one.addr, two.addr])
        .admin()
        .listener("h2c = true")
        .pool("protocol = \"h2\"")
        .build();
    let lb = Ballast::start(&config);
    for round in 0..2 {
        let out = std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/grpc_peer.py"))
            .args(["client", &lb.addr("web").to_string()])
            .output()
            .expect("run grpc client");
        assert!(
            out.status.success(),
            "client failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            lb.logs()
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client json");
        assert_eq!(v["unary"], "unary:hello", "{v}");
        let who = v["unary_trailer"].as_str().unwrap_or("");
        assert!(
            who == "unary-one" || who == "unary-two",
            "round {round}: {v}"
        );
        assert_eq!(
            v["server_stream"],
            serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"])
        );
        assert!(
            v["server_stream_trailer"]
                .as_str()
                .unwrap_or("")
                .starts_with("stream-"),
            "{v}"
        );
        assert_eq!(v["client_stream"], "got:71001", "{v}");
        assert!(
            v["client_stream_trailer"]
                .as_str()
                .unwrap_or("")
                .starts_with("sum-"),
            "{v}"
        );
        assert_eq!(v["bidi"], serde_json::json!(["echo:x", "echo:y", "echo:z"]));
        // A gRPC error travels in trailers (grpc-status), with its metadata.
        assert!(
            v["fail"]
                .as_str()
                .unwrap_or("")
                .starts_with("FAILED_PRECONDITION refused by "),
            "{v}"
        );
        assert_eq!(v["fail_trailer"], "on-purpose", "{v}");
    }
    // An application error in trailers is not a backend failure.
    let logs = lb.logs();
    assert!(!logs.contains("backend failed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_goaway_and_lets_open_streams_finish() {
    let [a] = start_backends(["a"]).await;
    let mut lb = Ballast::start(&TestConfig::new(&[&a]).listener("h2c = true").build());
    let sender = h2_handshake(TcpStream::connect(lb.addr("web")).await.unwrap()).await;
    let mut s = sender.clone();
    let slow = tokio::spawn(async move { h2_get(&mut s, "http://test.local/slow/1000").await });
    support::eventually(WAIT, async || a.in_flight() == 1)
        .await
        .expect("request in flight");
    lb.signal("TERM");
    let (status, _, body) = slow.await.unwrap().expect("the open stream finished");
    assert_eq!((status, body.as_str()), (200, "a"));
    // After GOAWAY the connection takes no new stream.
    let mut s = sender.clone();
    assert!(h2_get(&mut s, "http://test.local/").await.is_err());
    assert_eq!(lb.wait_exit(WAIT), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_keeps_its_other_streams_when_a_backend_drains() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .admin()
            .listener("h2c = true")
            .build(),
    );
    let sender = h2_handshake(TcpStream::connect(lb.addr("web")).await.unwrap()).await;
    // One slow stream on each backend.
    let mut s1 = sender.clone();
    let mut s2 = sender.clone();
    let r1 = tokio::spawn(async move { h2_get(&mut s1, "http://test.local/slow/800").await });
    let r2 = tokio::spawn(async move { h2_get(&mut s2, "http://test.local/slow/800").await });
    support::eventually(WAIT, async || a.in_flight() == 1 && b.in_flight() == 1)
        .await
        .expect("both in flight");
    assert_eq!(
        support::admin_backend(lb.admin(), a.addr, "drain").await,
        200
    );
    // New streams on the same client connection go to b while a's stream finishes.
    let mut s = sender.clone();
    for _ in 0..4 {
        assert_eq!(h2_get(&mut s, "http://test.local/").await.unwrap().1, "b");
    }
    let mut got: Vec<String> = vec![
        r1.await.unwrap().expect("stream 1").1,
        r2.await.unwrap().expect("stream 2").1,
    ];
    got.sort();
    assert_eq!(got, ["a", "b"]);
}

// ---- abuse: raw frames on an h2c connection ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET http://test.local/` (static-table indices, authority as a literal).
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 10];
    b.extend_from_slice(b"test.local");
    b
}

/// A literal header field `x-pad: <n bytes>` (not indexed, new name).
fn pad_field(n: usize) -> Vec<u8> {
    let mut b = vec![0x00, 5];
    b.extend_from_slice(b"x-pad");
    // HPACK integer with a 7-bit prefix.
    if n < 127 {
        b.push(n as u8);
    } else {
        b.push(127);
        let mut rest = n - 127;
        while rest >= 128 {
            b.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        b.push(rest as u8);
    }
    b.extend(std::iter::repeat_n(b'a', n));
    b
}

const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// Writes `chunks` until the server closes or stops reading (a write blocked for 2 s), while
/// reading what it sends. Returns (chunks written, GOAWAY error code if one came).
async fn flood(addr: SocketAddr, chunks: impl Iterator<Item = Vec<u8>>) -> (usize, Option<u32>) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut goaway = None;
        // Stop after 2 MB: a flood's replies are not worth keeping.
        while all.len() < 2 << 20 {
            match tokio::time::timeout(WAIT, rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => all.extend_from_slice(&buf[..n]),
                _ => break,
            }
            let mut at = 0;
            while at + 9 <= all.len() {
                let len = ((all[at] as usize) << 16)
                    | ((all[at + 1] as usize) << 8)
                    | all[at + 2] as usize;
                if all[at + 3] == GOAWAY && at + 9 + 8 <= all.len() {
                    let code = &all[at + 13..at + 17];
                    goaway = Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
                }
                at += 9 + len;
            }
            if goaway.is_some() {
                break;
            }
        }
        goaway
    });
    let _ = wr.write_all(PREFACE).await;
    let _ = wr.write_all(&frame(SETTINGS, 0, 0, &[])).await;
    let mut written = 0;
    for chunk in chunks {
        match tokio::time::timeout(Duration::from_secs(2), wr.write_all(&chunk)).await {
            Ok(Ok(())) => written += 1,
            _ => break,
        }
    }
    drop(wr);
    let goaway = reader.await.unwrap_or(None);
    (written, goaway)
}

/// Ballast still answers another client at once, and its memory stayed bounded.
async fn assert_unharmed(lb: &Ballast, rss_before: u64, what: &str) {
    let started = Instant::now();
    assert_eq!(
        support::get(lb.addr("web"), "/").await.status,
        200,
        "{what}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{what}: slow to answer others"
    );
    lb.assert_memory_bounded(rss_before, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_reaches_few_backend_requests() {
    let [a] = start_backends(["a"]).await;
    a.set_delay(50);
    let lb = Ballast::start(&TestConfig::new(&[&a]).listener("h2c = true").build());
    let rss = lb.rss_kib();
    // 20,000 streams opened and cancelled at once, 100 per write.
    let batches = (0..200u32).map(|batch| {
        let mut chunk = Vec::new();
        for i in 0..100u32 {
            let id = 2 * (batch * 100 + i) + 1;
            chunk.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &get_block()));
            chunk.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        chunk
    });
    let (written, goaway) = flood(lb.addr("web"), batches).await;
    assert_eq!(
        goaway,
        Some(0xb),
        "no GOAWAY(ENHANCE_YOUR_CALM) after {written} batches"
    );
    assert!(
        a.hits() < 2000,
        "{} of 20000 reset streams reached the backend",
        a.hits()
    );
    assert_unharmed(&lb, rss, "rapid reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_cut_and_reaches_no_backend() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).listener("h2c = true").build());
    let rss = lb.rss_kib();
    // One header block that never ends: 4 KiB CONTINUATION frames, up to 100 MiB.
    let first = std::iter::once(frame(HEADERS, END_STREAM, 1, &get_block()));
    let rest = (0..25_600).map(|_| frame(CONTINUATION, 0, 1, &pad_field(4000)));
    let (written, goaway) = flood(lb.addr("web"), first.chain(rest)).await;
    assert!(written < 25_600, "the whole 100 MiB header block was read");
    assert!(goaway.is_some(), "no GOAWAY after {written} frames");
    assert_eq!(a.hits(), 0);
    assert_unharmed(&lb, rss, "CONTINUATION flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_ping_floods_stall_only_the_flooder() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("h2c = true\nsend_timeout = \"2s\"")
            .build(),
    );
    let rss = lb.rss_kib();
    for (what, kind, payload) in [("SETTINGS", SETTINGS, vec![]), ("PING", PING, vec![7u8; 8])] {
        // 1,000,000 frames in batches of 1000, never reading the ACKs.
        let batches = (0..1000).map(|_| {
            let f = frame(kind, 0, 0, &payload);
            f.repeat(1000)
        });
        let started = Instant::now();
        let (written, _) = flood(lb.addr("web"), batches).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: flood not bounded"
        );
        eprintln!("{what} flood: {written} of 1000 batches written before ballast stopped reading");
        assert_unharmed(&lb, rss, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_resets_its_upload_blames_no_backend_but_a_broken_backend_is_blamed() {
    let [a] = start_backends(["a"]).await;
    let rude = support::rude_backend().await;
    // Pool `app` is the good backend; pool `bad` (route /bad) the one that hangs up.
    let config = TestConfig::new(&[&a])
        .admin()
        .listener("h2c = true\nrequest_buffering = 0\n[[listeners.web.routes]]\npath_prefix = \"/bad\"\npool = \"bad\"")
        .pool(&format!("[pools.bad]\nbackends = [\"{rude}\"]\nretries = 0"))
        .build();
    let lb = Ballast::start(&config);
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, http_body_util::channel::Channel<Bytes, std::io::Error>>(TokioIo::new(
            TcpStream::connect(lb.addr("web")).await.unwrap(),
        ))
        .await
        .unwrap();
    tokio::spawn(conn);
    for round in 0..3 {
        let (mut tx, body) = http_body_util::channel::Channel::new(4);
        let req = http::Request::post("http://test.local/upload")
            .body(body)
            .unwrap();
        let mut s = sender.clone();
        let call = tokio::spawn(async move { s.send_request(req).await });
        for _ in 0..4 {
            tx.send_data(Bytes::from(vec![b'x'; 16 * 1024]))
                .await
                .unwrap();
        }
        support::eventually(WAIT, async || a.in_flight() == 1)
            .await
            .expect("upload reached the backend");
        // The client gives up mid-body: hyper resets the stream (RST_STREAM).
        tx.abort(std::io::Error::other("client gave up"));
        let _ = call.await;
        support::eventually(WAIT, async || a.in_flight() == 0)
            .await
            .unwrap_or_else(|| panic!("round {round}: backend request not ended"));
    }
    assert_eq!(a.hits(), 3, "an aborted upload was retried");
    assert_eq!(
        support::backend_state(lb.admin(), "app", a.addr).await,
        "healthy"
    );
    assert!(!lb.logs().contains("backend failed"), "{}", lb.logs());
    // The other side of the line: a backend that hangs up on an h2 client's request is
    // blamed (502, logged, ejected).
    let mut h2 = h2_handshake(TcpStream::connect(lb.addr("web")).await.unwrap()).await;
    let (status, _, _) = h2_get(&mut h2, "http://test.local/bad").await.unwrap();
    assert_eq!(status, 502);
    assert!(lb.wait_for_log("backend failed", WAIT));
    assert!(lb.logs().contains("ejected=true"), "{}", lb.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_concurrency_limit_are_refused() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).listener("h2c = true").build());
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let (peak, counter) = (peak.clone(), a.in_flight_counter());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(
                    counter.load(std::sync::atomic::Ordering::SeqCst),
                    std::sync::atomic::Ordering::SeqCst,
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // 300 slow requests opened at once, ignoring the server's SETTINGS (128 streams).
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let mut burst = PREFACE.to_vec();
    burst.extend(frame(SETTINGS, 0, 0, &[]));
    let mut block = vec![0x82, 0x86, 0x04, 10];
    block.extend_from_slice(b"/slow/1500");
    block.extend_from_slice(&[0x01, 10]);
    block.extend_from_slice(b"test.local");
    for i in 0..300u32 {
        burst.extend(frame(HEADERS, END_STREAM | END_HEADERS, 2 * i + 1, &block));
    }
    s.write_all(&burst).await.unwrap();
    // Read frames until every stream was answered one way or the other.
    let (mut refused, mut answered, mut buf) = (0, 0, Vec::new());
    let started = Instant::now();
    while refused + answered < 300 && started.elapsed() < WAIT {
        let mut chunk = [0u8; 16384];
        let n = match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while at + 9 <= buf.len() {
            let len =
                ((buf[at] as usize) << 16) | ((buf[at + 1] as usize) << 8) | buf[at + 2] as usize;
            if at + 9 + len > buf.len() {
                break;
            }
            let (kind, flags) = (buf[at + 3], buf[at + 4]);
            if kind == RST_STREAM {
                refused += 1;
            } else if (kind == HEADERS || kind == 0) && flags & END_STREAM != 0 {
                answered += 1;
            }
            at += 9 + len;
        }
        buf.drain(..at);
    }
    watcher.abort();
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(peak <= 128, "{peak} requests in flight on one connection");
    assert!(answered >= 100, "only {answered} answered");
    assert!(
        refused >= 300 - 128,
        "only {refused} streams refused (answered {answered})"
    );
    // The connection survives the client's mistake for what was accepted, and others are
    // served.
    assert_eq!(support::get(lb.addr("web"), "/").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_gets_goaway_after_keepalive_timeout() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("h2c = true\nkeepalive_timeout = \"400ms\"")
            .build(),
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let mut first = PREFACE.to_vec();
    first.extend(frame(SETTINGS, 0, 0, &[]));
    first.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_block()));
    s.write_all(&first).await.unwrap();
    let started = Instant::now();
    // Read frames (the answer, SETTINGS, ...) until GOAWAY or the close.
    let mut buf = Vec::new();
    let mut goaway_at = None;
    while goaway_at.is_none() && started.elapsed() < WAIT {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(WAIT, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        let mut at = 0;
        while at + 9 <= buf.len() {
            let len =
                ((buf[at] as usize) << 16) | ((buf[at + 1] as usize) << 8) | buf[at + 2] as usize;
            if buf[at + 3] == GOAWAY {
                goaway_at = Some(started.elapsed());
            }
            at += 9 + len;
        }
    }
    let at = goaway_at.expect("no GOAWAY on an idle connection");
    // Sampled four times per timeout: between 1 and 1.25 timeouts after the last stream.
    assert!(at >= Duration::from_millis(350), "GOAWAY too early: {at:?}");
    assert!(at < Duration::from_secs(5), "GOAWAY too late: {at:?}");
    assert_eq!(a.hits(), 1);
}

/// HTTP/2 in the access log and the counters: the host comes from `:authority`, and a
/// stream the client resets while waiting is logged as 499 `client_closed`, counted, and
/// not held against the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_logged_and_a_reset_stream_is_the_clients() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .admin()
            .head("[access_log]\npath = \"access.log\"\n")
            .listener("h2c = true")
            .pool("passive = { max_fails = 1, fail_timeout = \"30s\" }")
            .build(),
    );
    let log = lb.dir.path().join("access.log");
    let mut h2 = h2_handshake(TcpStream::connect(lb.addr("web")).await.unwrap()).await;
    let (status, _, _) = h2_get(&mut h2, "http://shop.example/first").await.unwrap();
    assert_eq!(status, 200);
    // A second stream on the same connection: the client gives up after 200 ms, which
    // resets the stream (RST_STREAM CANCEL).
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        h2_get(&mut h2, "http://shop.example/slow/1500"),
    )
    .await;
    assert!(gave_up.is_err());
    let lines = support::eventually(WAIT, async || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
            >= 2
    })
    .await;
    assert!(
        lines.is_some(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let v: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v[0]["protocol"], "HTTP/2.0");
    assert_eq!(v[0]["host"], "shop.example");
    assert_eq!(v[0]["path"], "/first");
    assert_eq!(v[0]["status"], 200);
    assert_eq!(v[1]["path"], "/slow/1500");
    assert_eq!(v[1]["status"], 499, "{}", v[1]);
    assert_eq!(v[1]["termination"], "client_closed");
    assert_eq!(
        support::backend_state(lb.admin(), "app", a.addr).await,
        "healthy"
    );
    let page = support::get(lb.admin(), "/metrics").await.body;
    assert!(
        page.contains("ballast_pool_failures_total{pool=\"app\",reason=\"client_closed\"} 1"),
        "{page}"
    );
    assert!(page.contains(&format!(
        "ballast_backend_failures_total{{pool=\"app\",backend=\"{}\"}} 0",
        a.addr
    )));
    let (status, _, _) = h2_get(&mut h2, "http://shop.example/after").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_reset_while_queued_free_their_places_and_blame_no_backend() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .admin()
            .listener("h2c = true")
            .pool("max_connections = 1\nqueue_timeout = \"30s\"")
            .build(),
    );
    let admin = lb.admin();
    let queued = async || {
        let (_, status) = support::admin_call(admin, "GET", "/status", None).await;
        status["pools"]["app"]["queued"].as_u64().unwrap_or(0)
    };
    let holder = tokio::spawn(support::get(lb.addr("web"), "/slow/3000"));
    assert!(support::eventually(WAIT, async || a.in_flight() == 1)
        .await
        .is_some());
    // Three streams of one connection queue behind it; the client resets two of them.
    let h2 = h2_handshake(TcpStream::connect(lb.addr("web")).await.unwrap()).await;
    let streams: Vec<_> = (0..3)
        .map(|_| {
            let mut s = h2.clone();
            tokio::spawn(async move { h2_get(&mut s, "http://test.local/").await })
        })
        .collect();
    assert!(
        support::eventually(WAIT, async || queued().await == 3)
            .await
            .is_some(),
        "the streams did not queue"
    );
    streams[0].abort();
    streams[1].abort();
    assert!(
        support::eventually(WAIT, async || queued().await == 1)
            .await
            .is_some(),
        "reset streams still hold queue places"
    );
    assert_eq!(holder.await.unwrap().status, 200);
    let [_, _, kept] = <[_; 3]>::try_from(streams).unwrap();
    let (status, backend, _) = kept.await.unwrap().expect("the kept stream is answered");
    assert_eq!((status, backend.as_str()), (200, "a"));
    assert_eq!(a.hits(), 2, "a reset stream reached the backend");
    assert_eq!(
        support::backend_state(admin, "app", a.addr).await,
        "healthy"
    );
    let page = support::get(admin, "/metrics").await.body;
    let closed = [("pool", "app"), ("reason", "client_closed")];
    assert_eq!(
        support::metric(&page, "ballast_pool_failures_total", &closed),
        2.0
    );
    assert_eq!(
        support::metric(&page, "ballast_pool_failures_total", &[]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_an_h2_clients_headers_and_query() {
    let [app, canary] = start_backends(["app", "canary"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(
                "h2c = true\nroutes = [{ headers = { \"X-Canary\" = \"1\" }, query = { v = \"2\" }, methods = [\"GET\"], pool = \"canary\" }]",
            )
            .named_pool("canary", &canary)
            .build(),
    );
    let mut h2 = h2_handshake(TcpStream::connect(lb.addr("web")).await.unwrap()).await;
    for (target, canary_field, expected) in [
        ("/?v=2", true, "canary"),
        ("/?v=2", false, "app"),
        ("/?v=3", true, "app"),
    ] {
        let mut req = http::Request::get(format!("http://test.local{target}"));
        if canary_field {
            req = req.header("x-canary", "1");
        }
        h2.ready().await.expect("ready");
        let r = h2
            .send_request(req.body(Full::default()).unwrap())
            .await
            .expect("h2 answer");
        assert_eq!(
            r.headers()["x-backend"],
            expected,
            "{target} {canary_field}"
        );
    }
}
