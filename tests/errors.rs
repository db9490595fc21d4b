//! Bad input and failing backends: every case gets a clear status, a logged reason, and
//! the daemon keeps serving everyone else.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{get, Backend, Ballast, Client, TestConfig};

fn config(backends: &[String], listener_extra: &str, pool_extra: &str) -> String {
    TestConfig::addresses(backends)
        .listener(listener_extra)
        .pool(pool_extra)
        .build()
}

/// Reads from `stream` until EOF or `limit`; returns what arrived.
async fn read_all(stream: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_gives_502_with_reason_in_log() {
    let (_reserved, dead) = support::refusing_addr();
    let lb = Ballast::start(&config(&[dead.to_string()], "", ""));
    let r = get(lb.addr("web"), "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.body, "502 Bad Gateway\n");
    // Logs are written by a thread of their own: wait for the line, don't assume it.
    assert!(
        lb.wait_for_log("request failed", Duration::from_secs(2)),
        "{}",
        lb.logs()
    );
    let line = lb
        .lines()
        .into_iter()
        .find(|l| l.contains("request failed"))
        .unwrap();
    assert!(
        line.contains("pool=app")
            && line.contains(&format!("backend={dead}"))
            && line.contains("reason=connect_failed"),
        "{line}"
    );
    // Still refused, still a 502 (an ejected pool of one is tried anyway), never a hang.
    assert_eq!(get(lb.addr("web"), "/").await.status, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_resets_gives_502() {
    let addr = support::rude_backend().await;
    let lb = Ballast::start(&config(&[addr.to_string()], "", ""));
    let r = get(lb.addr("web"), "/").await;
    assert_eq!(r.status, 502);
    assert!(
        lb.wait_for_log("reason=upstream_failed", Duration::from_secs(2)),
        "{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_backend_gives_503() {
    let a = Backend::start("a").await;
    a.set_healthy(false);
    let checks = "[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\n";
    let lb = Ballast::start(&config(&[a.addr.to_string()], "", checks));
    assert!(lb.wait_for_log("backend is unhealthy", Duration::from_secs(3)));
    let r = get(lb.addr("web"), "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, "503 Service Unavailable\n")
    );
    assert!(lb.wait_for_log("reason=no_healthy_backend", Duration::from_secs(2)));
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gives_504_after_response_timeout() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(
        &[a.addr.to_string()],
        "",
        "response_timeout = \"300ms\"",
    ));
    let start = Instant::now();
    let r = get(lb.addr("web"), "/slow/3000").await;
    let took = start.elapsed();
    assert_eq!(r.status, 504);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(lb.wait_for_log("reason=response_timeout", Duration::from_secs(2)));
    assert_eq!(a.hits(), 1, "a timed-out request is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_is_cut_after_the_header_timeout() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(
        &[a.addr.to_string()],
        "request_header_timeout = \"400ms\"\nkeepalive_timeout = \"400ms\"",
        "",
    ));
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let start = Instant::now();
    let got = read_all(&mut s, Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    assert!(!got.contains("200 OK"), "{got}");
    // An idle keep-alive connection is closed by its own timer.
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let got = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "idle connection kept {:?}",
        start.elapsed()
    );
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_malformed_requests_get_400() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&[a.addr.to_string()], "max_header_size = 8192", ""));
    let addr = lb.addr("web");

    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let got = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");

    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        b"\x00\x01\x02 / HTTP/9\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(garbage).await.unwrap();
        let got = read_all(&mut s, Duration::from_secs(5)).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{garbage:?} -> {got}");
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let got = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(got.starts_with("HTTP/1.1 400"), "two Host fields -> {got}");
    assert_eq!(a.hits(), 0, "bad requests never reach a backend");
    assert_eq!(
        get(addr, "/").await.status,
        200,
        "and everyone else is still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_queues_extra_clients() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&[a.addr.to_string()], "max_connections = 2", ""));
    let addr = lb.addr("web");
    let mut c1 = Client::connect(addr).await.unwrap();
    let mut c2 = Client::connect(addr).await.unwrap();
    assert_eq!(c1.get("/").await.unwrap().status, 200);
    assert_eq!(c2.get("/").await.unwrap().status, 200);
    // The third connection waits in the backlog while two are open...
    let third = tokio::spawn(async move { get(addr, "/").await });
    let waited = tokio::time::timeout(Duration::from_millis(500), async {
        while !third.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "a third connection was served beyond max_connections"
    );
    // ... and is served as soon as one closes.
    drop(c1);
    let r = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served")
        .unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_removed() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&[a.addr.to_string()], "", ""));
    let r = support::get_with(
        lb.addr("web"),
        "/headers",
        &[
            ("host", "app.example.com:8080"),
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "secret"),
            ("keep-alive", "timeout=5"),
            ("x-end-to-end", "kept"),
        ],
    )
    .await;
    let h = r.body;
    assert!(h.contains("host: app.example.com:8080\n"), "{h}");
    assert!(
        h.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\n"),
        "{h}"
    );
    assert!(h.contains("x-forwarded-proto: http\n"), "{h}");
    assert!(
        h.contains("x-forwarded-host: app.example.com:8080\n"),
        "{h}"
    );
    assert!(h.contains("x-end-to-end: kept\n"), "{h}");
    assert!(!h.contains("x-private") && !h.contains("keep-alive"), "{h}");
}

/// A backend's response fields reach the client as the backend wrote them (case, order,
/// repeats), less its hop-by-hop fields and those its `Connection` names; ballast writes the
/// framing and `Date` itself. The same with header rules on the route, where the fields go
/// through a map: the rules see and edit the backend's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_response_fields_pass_without_hop_by_hop_ones() {
    let (backend, _) = support::scripted_backend(|_, head| {
        let body: &[u8] = if head.starts_with("HEAD ") {
            b""
        } else {
            b"hello"
        };
        Some(
            [
                &b"HTTP/1.1 200 OK\r\nX-Mixed-Case: One\r\nConnection: keep-alive, X-Private\r\n\
                   X-Private: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\n\
                   Set-Cookie: a=1\r\nset-cookie: b=2\r\nTrailer: x-t\r\nX-Secret: s\r\n\
                   Content-Length: 5\r\n\r\n"[..],
                body,
            ]
            .concat(),
        )
    })
    .await;
    let routes = r#"routes = [
  { path_prefix = "/ruled", pool = "app", response_headers = { set = { "X-Added" = "yes" }, remove = ["X-Secret"] } },
]"#;
    let lb = Ballast::start(&config(&[backend.to_string()], routes, ""));
    let web = lb.addr("web");
    let exchange = |request: &'static str| async move {
        let r = support::raw_request(web, request.as_bytes())
            .await
            .expect("a response");
        (r.head, String::from_utf8_lossy(&r.body).into_owned())
    };

    let (head, body) = exchange("GET /plain HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(body, "hello");
    let fields: Vec<&str> = head.lines().skip(1).collect();
    // The backend's fields in its order and case, then ballast's own.
    assert_eq!(
        fields[..4],
        [
            "X-Mixed-Case: One",
            "Set-Cookie: a=1",
            "set-cookie: b=2",
            "X-Secret: s"
        ],
        "{head}"
    );
    assert!(fields.contains(&"content-length: 5"), "{head}");
    assert_eq!(
        fields
            .iter()
            .filter(|f| f.to_ascii_lowercase().starts_with("date: "))
            .count(),
        1,
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-connection",
        "trailer",
        "connection",
    ] {
        assert!(!lower.contains(gone), "{gone} in {head}");
    }

    // HEAD: no body, the backend's length kept.
    let mut s = TcpStream::connect(web).await.unwrap();
    s.write_all(b"HEAD /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let all = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(all.ends_with("\r\n\r\n"), "no body: {all}");
    assert!(all.lines().any(|l| l == "content-length: 5"), "{all}");

    // Response rules edit the backend's fields.
    let (head, body) = exchange("GET /ruled HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(body, "hello");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("x-added: yes") && lower.contains("x-mixed-case: one"),
        "{head}"
    );
    assert_eq!(lower.matches("set-cookie: ").count(), 2, "{head}");
    for gone in [
        "x-secret",
        "x-private",
        "keep-alive",
        "proxy-connection",
        "trailer",
    ] {
        assert!(!lower.contains(gone), "{gone} in {head}");
    }
}

/// An HTTP/1.1 request's fields reach an HTTP/1.1 backend as the client wrote them, less
/// the hop-by-hop ones, with ballast's `X-Forwarded-*` (the relayed lines of
/// `h1::RequestFields`); a listener whose routes edit request fields takes the map path,
/// and the backend is told the same things.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_request_fields_reach_the_backend_as_written() {
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    let (backend, _) = support::scripted_backend(move |_, head| {
        seen.lock().unwrap().push(head.to_owned());
        Some(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
    })
    .await;
    const REQUEST: &str = "GET /p?q=1 HTTP/1.1\r\nHost: x\r\nX-Mixed-Case: One\r\n\
        Connection: keep-alive, X-Private, Host\r\nX-Private: secret\r\nKeep-Alive: 5\r\n\
        X-Forwarded-For: 10.0.0.1\r\nAccept: a\r\nx-forwarded-for: 10.0.0.2\r\n\
        X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nTE: trailers\r\n\r\n";
    let expected = |lines: &[&str]| {
        let mut all = vec![
            "GET /p?q=1 HTTP/1.1",
            "x-forwarded-for: 10.0.0.1, 10.0.0.2, 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: x",
        ];
        all.extend_from_slice(lines);
        all.sort_unstable();
        all.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let sorted = |head: &str| {
        let mut lines: Vec<String> = head.lines().map(str::to_owned).collect();
        lines.sort_unstable();
        lines
    };

    // What the backend saw of REQUEST through a daemon whose listener has `routes`.
    let backend_saw = async |routes: &str| {
        let lb = Ballast::start(&config(&[backend.to_string()], routes, ""));
        let r = support::raw_request(lb.addr("web"), REQUEST.as_bytes())
            .await
            .expect("a response");
        assert!(r.head.starts_with("HTTP/1.1 204"), "{}", r.head);
        heads
            .lock()
            .unwrap()
            .pop()
            .expect("the backend saw the request")
    };

    // Relayed: the client's order and case, ballast's fields after them.
    let head = backend_saw("").await;
    let lines: Vec<&str> = head.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "GET /p?q=1 HTTP/1.1",
            "Host: x",
            "X-Mixed-Case: One",
            "Accept: a"
        ],
        "{head}"
    );
    assert_eq!(
        sorted(&head),
        expected(&["Host: x", "X-Mixed-Case: One", "Accept: a"]),
        "{head}"
    );

    // A route with request header rules: the map path, names lowercased, the same fields.
    let routes = r#"routes = [
  { path_prefix = "/", pool = "app", request_headers = { set = { "X-Added" = "yes" } } },
]"#;
    let head = backend_saw(routes).await;
    assert_eq!(
        sorted(&head),
        expected(&["host: x", "x-mixed-case: One", "accept: a", "x-added: yes"]),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_through_in_bounded_memory() {
    const SIZE: u64 = 1 << 30; // 1 GiB
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&[a.addr.to_string()], "", ""));
    let rss_before = lb.peak_rss_kib();
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 256 * 1024];
    let mut sent = 0u64;
    let start = Instant::now();
    while sent < SIZE {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "upload took too long"
        );
    }
    let got = read_all(&mut s, Duration::from_secs(30)).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.ends_with(&format!("a {SIZE}")),
        "backend received every byte: {got}"
    );
    lb.assert_memory_bounded(rss_before, "a 1 GiB request body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_kept_alive_and_reused() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&[a.addr.to_string()], "", ""));
    let addr = lb.addr("web");
    // Sequential requests from several client connections share one upstream connection.
    for _ in 0..5 {
        let mut c = Client::connect(addr).await.unwrap();
        for _ in 0..10 {
            assert_eq!(c.get("/").await.unwrap().status, 200);
        }
    }
    assert_eq!(a.hits(), 50);
    assert_eq!(
        a.connections(),
        1,
        "one pooled upstream connection served all 50 requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_through_in_bounded_memory() {
    const SIZE: u64 = 512 << 20; // 512 MiB
    let a = Backend::start("a").await;
    let lb = Ballast::start(&config(&[a.addr.to_string()], "", ""));
    let rss_before = lb.peak_rss_kib();
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let req = format!("GET /download/{SIZE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // Read slowly at first so that back-pressure, not buffering, has to hold the body.
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("download stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
        if total < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "download took too long"
        );
    }
    // Chunked framing adds a few bytes per chunk on top of the head.
    assert!(
        total > SIZE && total < SIZE + SIZE / 100,
        "received {total} bytes for {SIZE}"
    );
    lb.assert_memory_bounded(rss_before, "a 512 MiB response body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_after_send_timeout() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(
        &TestConfig::addresses([a.addr])
            .admin()
            .listener("send_timeout = \"500ms\"")
            .build(),
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"GET /download/1073741824 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Never read: socket buffers fill, ballast's writes block, the timeout fires.
    let status = async || {
        let (_, v) = support::admin_call(lb.admin(), "GET", "/status", None).await;
        v["pools"]["app"]["backends"][0]["in_flight"].as_u64()
    };
    support::eventually(Duration::from_secs(5), async || status().await == Some(1))
        .await
        .expect("the download is in flight");
    let cut =
        support::eventually(Duration::from_secs(10), async || status().await == Some(0)).await;
    assert!(
        cut.is_some(),
        "the stalled download was never cut:\n{}",
        lb.logs()
    );
    assert!(
        lb.wait_for_log("client did not read for 500ms", Duration::from_secs(2)),
        "{}",
        lb.logs()
    );
    drop(s);
    // The client's slowness, not the backend's: nothing marked, nothing ejected.
    assert_eq!(
        support::backend_state(lb.admin(), "app", a.addr).await,
        "healthy"
    );
    assert!(!lb.logs().contains("backend failed"), "{}", lb.logs());
    assert_eq!(get(lb.addr("web"), "/").await.status, 200);
}
