//! Hostile and slow clients: whatever a client does wrong is answered (400, 408, 413, 405,
//! 429) or closed, logged as the client's, and never counted against a backend. What a
//! backend does wrong still is. Each test checks both the answer and the backends' state.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{
    backend_state, closed_within, raw_request, read_response, start_backends, Backend, Ballast,
    TestConfig,
};

/// Both backends healthy in /status and nothing in the log that blames one.
async fn assert_nobody_blamed(lb: &Ballast, backends: &[&Backend]) {
    for b in backends {
        assert_eq!(
            backend_state(lb.admin(), "app", b.addr).await,
            "healthy",
            "{} was blamed for a client's fault:\n{}",
            b.name,
            lb.logs()
        );
    }
    let logs = lb.logs();
    assert!(
        !logs.contains("ejected=true") && !logs.contains("backend failed"),
        "a backend was blamed:\n{logs}"
    );
}

/// Every backend still takes traffic: the client's faults left the rotation alone.
async fn assert_all_serve(lb: &Ballast, backends: &[&Backend]) {
    let before: Vec<usize> = backends.iter().map(|b| b.hits()).collect();
    for _ in 0..(2 * backends.len()) {
        assert_eq!(support::get(lb.addr("web"), "/").await.status, 200);
    }
    for (b, n) in backends.iter().zip(before) {
        assert!(
            b.hits() > n,
            "{} got no traffic after the bad requests",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chunked_body_gets_400_and_blames_no_backend() {
    let [a, b] = start_backends(["a", "b"]).await;
    // Buffered (the default) and streamed: the fault is found before and after a backend
    // was chosen.
    for buffering in ["\"64KiB\"", "0"] {
        let lb = Ballast::start(
            &TestConfig::new(&[&a, &b])
                .admin()
                .pool(&format!("request_buffering = {buffering}"))
                .build(),
        );
        for _ in 0..3 {
            let r = raw_request(
                lb.addr("web"),
                b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzzz\r\n\r\n",
            )
            .await
            .expect("an answer to a bad chunked body");
            assert_eq!(r.status, 400, "buffering {buffering}: {}", r.head);
            assert!(
                r.head.to_ascii_lowercase().contains("connection: close"),
                "{}",
                r.head
            );
        }
        assert!(
            lb.wait_for_log("reason=bad_request_body", Duration::from_secs(2)),
            "{}",
            lb.logs()
        );
        assert_nobody_blamed(&lb, &[&a, &b]).await;
        assert_all_serve(&lb, &[&a, &b]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_aborted_by_the_client_ejects_nothing_and_is_not_retried() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&a, &b]).admin().build());
    for _ in 0..3 {
        // Larger than request_buffering: streamed to a backend, then the client leaves.
        // Counted before the first byte: the head may reach a backend while write_all of the
        // body still waits for room in the socket buffer.
        let hits = a.hits() + b.hits();
        let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[b'u'; 100_000]).await.unwrap();
        let reached =
            support::eventually(Duration::from_secs(5), async || a.hits() + b.hits() > hits).await;
        assert!(
            reached.is_some(),
            "the upload reached a backend\n{}",
            lb.logs()
        );
        drop(s);
        support::eventually(Duration::from_secs(5), async || {
            a.in_flight() + b.in_flight() == 0
        })
        .await
        .expect("the backend request ended");
    }
    assert_eq!(a.hits() + b.hits(), 3, "an aborted upload was retried");
    assert_nobody_blamed(&lb, &[&a, &b]).await;
    assert_all_serve(&lb, &[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_host_gets_400() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let r = raw_request(lb.addr("web"), b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("answer");
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(a.hits(), 0, "a request without Host reached the backend");
    // HTTP/1.0 has no such rule.
    let r = raw_request(lb.addr("web"), b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_upgrade_protocols_reach_the_backend() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("[[listeners.web.routes]]\npath_prefix = \"/headers/foo\"\npool = \"app\"\nupgrade = [\"websocket\", \"foo\"]")
            .build(),
    );
    let sent = |path: &str, upgrade: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n\r\n"
        )
    };
    // The backend echoes the header fields it received.
    let r = raw_request(lb.addr("web"), sent("/headers", "h2c").as_bytes())
        .await
        .expect("answer");
    let seen = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
    assert_eq!(r.status, 200);
    assert!(
        !seen.contains("upgrade"),
        "h2c reached the backend:\n{seen}"
    );
    let r = raw_request(
        lb.addr("web"),
        sent("/headers", "h2c, websocket").as_bytes(),
    )
    .await
    .expect("answer");
    let seen = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
    assert!(
        seen.contains("upgrade: websocket\n") && seen.contains("connection: upgrade"),
        "websocket alone should pass:\n{seen}"
    );
    // A route may allow more.
    let r = raw_request(lb.addr("web"), sent("/headers/foo", "foo").as_bytes())
        .await
        .expect("answer");
    let seen = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
    assert!(seen.contains("upgrade: foo\n"), "route allows foo:\n{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_unless_allowed() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let r = raw_request(
        lb.addr("web"),
        b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n",
    )
    .await
    .expect("answer");
    assert_eq!(r.status, 405, "{}", r.head);
    assert_eq!(a.connections(), 0, "CONNECT reached the backend");

    // Allowed: forwarded to the route's backend, and a 2xx opens a tunnel to it.
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("allow_connect = true")
            .build(),
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"CONNECT internal.example:22 HTTP/1.1\r\nHost: internal.example:22\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{}", r.head);
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo through the tunnel")
        .unwrap();
    assert_eq!(&got, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_gets_408_after_request_body_timeout() {
    let [a, b] = start_backends(["a", "b"]).await;
    for buffering in ["\"64KiB\"", "0"] {
        let lb = Ballast::start(
            &TestConfig::new(&[&a, &b])
                .admin()
                .listener("request_body_timeout = \"400ms\"")
                .pool(&format!("request_buffering = {buffering}"))
                .build(),
        );
        let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        let start = Instant::now();
        let r = read_response(&mut s, Duration::from_secs(10))
            .await
            .expect("an answer to a stalled body");
        let took = start.elapsed();
        assert_eq!(r.status, 408, "buffering {buffering}: {}", r.head);
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(5),
            "408 after {took:?}"
        );
        assert!(closed_within(&mut s, Duration::from_secs(5))
            .await
            .is_some());
        assert!(lb.wait_for_log("reason=body_timeout", Duration::from_secs(2)));
        assert_nobody_blamed(&lb, &[&a, &b]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_buffering_the_backend_sees_no_connection_until_the_body_is_complete() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        s.write_all(b"3e8\r\n").await.unwrap();
        s.write_all(&[b'x'; 1000]).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            a.connections(),
            0,
            "the backend was connected before the body was complete"
        );
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(String::from_utf8_lossy(&r.body), "a 10000");
    assert_eq!(a.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_bodies_get_413() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("max_request_body = \"1KiB\"")
            .build(),
    );
    let declared = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{}",
        "x".repeat(2000)
    );
    let r = raw_request(lb.addr("web"), declared.as_bytes())
        .await
        .expect("answer");
    assert_eq!(r.status, 413, "{}", r.head);
    let chunked = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n{}\r\n0\r\n\r\n",
        "x".repeat(2000)
    );
    let r = raw_request(lb.addr("web"), chunked.as_bytes())
        .await
        .expect("answer");
    assert_eq!(r.status, 413, "{}", r.head);
    assert_eq!(a.hits(), 0);
    let ok = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".to_string()
        + &"x".repeat(1000);
    let r = raw_request(lb.addr("web"), ok.as_bytes())
        .await
        .expect("answer");
    assert_eq!(r.status, 200, "{}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_timeout_and_request_header_timeout_act_separately() {
    let a = Backend::start("a").await;
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    // Long keep-alive, short head timeout: an idle connection outlives the head timeout,
    // a slow head on it does not.
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("request_header_timeout = \"300ms\"\nkeepalive_timeout = \"1500ms\"")
            .build(),
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(request).await.unwrap();
    assert_eq!(
        read_response(&mut s, Duration::from_secs(5))
            .await
            .unwrap()
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(request).await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await;
    assert_eq!(
        r.map(|r| r.status),
        Some(200),
        "idle for 800ms was cut by the 300ms head timeout"
    );
    let idle = closed_within(&mut s, Duration::from_secs(10))
        .await
        .expect("idle close");
    assert!(
        idle >= Duration::from_millis(1300) && idle < Duration::from_secs(5),
        "idle connection closed after {idle:?}, keepalive_timeout is 1.5s"
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(request).await.unwrap();
    assert_eq!(
        read_response(&mut s, Duration::from_secs(5))
            .await
            .unwrap()
            .status,
        200
    );
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let slow = closed_within(&mut s, Duration::from_secs(10))
        .await
        .expect("slow head close");
    assert!(
        slow < Duration::from_millis(1200),
        "a slow head was allowed {slow:?}, request_header_timeout is 300ms"
    );
    drop(lb);

    // Short keep-alive, long head timeout: the reverse.
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("request_header_timeout = \"1500ms\"\nkeepalive_timeout = \"300ms\"")
            .build(),
    );
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.write_all(b"Host: x\r\n\r\n").await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5)).await;
    assert_eq!(
        r.map(|r| r.status),
        Some(200),
        "an 800ms head was cut by the 300ms keep-alive timeout"
    );
    let idle = closed_within(&mut s, Duration::from_secs(10))
        .await
        .expect("idle close");
    assert!(
        idle < Duration::from_millis(1200),
        "idle connection kept {idle:?}, keepalive_timeout is 300ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_upload_with_steady_progress_outlives_response_timeout() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .admin()
            .pool("response_timeout = \"300ms\"")
            .build(),
    );
    const CHUNK: usize = 50_000;
    const CHUNKS: usize = 30;
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        CHUNK * CHUNKS
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    for _ in 0..CHUNKS {
        s.write_all(&[b'u'; CHUNK]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = read_response(&mut s, Duration::from_secs(10))
        .await
        .expect("answer");
    assert!(
        start.elapsed() > Duration::from_millis(1200),
        "the upload should take several response timeouts"
    );
    assert_eq!(r.status, 200, "{}\n{}", r.head, lb.logs());
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        format!("a {}", CHUNK * CHUNKS)
    );
    assert_eq!(backend_state(lb.admin(), "app", a.addr).await, "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_breaks_off_an_upload_is_ejected() {
    // The other side of the line: the client sends correctly, the backend closes mid-body.
    let rude_addr = support::rude_backend().await;
    let lb = Ballast::start(&TestConfig::addresses([rude_addr]).admin().build());
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n")
        .await
        .unwrap();
    let writer = async {
        for _ in 0..40 {
            if s.write_all(&[b'u'; 100_000]).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    let r = read_response(&mut s, Duration::from_secs(10)).await;
    assert_eq!(r.map(|r| r.status), Some(502));
    assert!(
        lb.wait_for_log("ejected=true", Duration::from_secs(2)),
        "{}",
        lb.logs()
    );
    assert_eq!(backend_state(lb.admin(), "app", rude_addr).await, "ejected");
}

/// A backend that reads the request and closes without answering (a reset after the
/// request was sent): an idempotent request whose body is in hand goes to another backend;
/// a POST does only with `non_idempotent` in `retry_on` (the backend may have acted on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_body_is_retried_on_another_backend() {
    let rude_addr = support::rude_backend().await;
    let good = Backend::start("good").await;
    let pool = "[pools.app.passive]\nmax_fails = 0";
    let lb = Ballast::start(
        &TestConfig::addresses([rude_addr, good.addr])
            .pool(pool)
            .build(),
    );
    let lenient = Ballast::start(
        &TestConfig::addresses([rude_addr, good.addr])
            .pool(&format!(
                "retry_on = [\"connect_failure\", \"reset\", \"non_idempotent\"]\n{pool}"
            ))
            .build(),
    );
    let upload = |method: &str| {
        format!("{method} /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    };
    let mut posts_failed = 0;
    for _ in 0..4 {
        let r = raw_request(lb.addr("web"), upload("PUT").as_bytes())
            .await
            .expect("answer");
        assert_eq!(r.status_text(), (200, "good 5".into()));
        let r = raw_request(lenient.addr("web"), upload("POST").as_bytes())
            .await
            .expect("answer");
        assert_eq!(r.status_text(), (200, "good 5".into()));
        let r = raw_request(lb.addr("web"), upload("POST").as_bytes())
            .await
            .expect("answer");
        posts_failed += usize::from(r.status == 502);
    }
    // Round robin sends every other request to the rude backend first.
    assert!(
        posts_failed >= 1,
        "a POST the backend had read was sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_client_refuses_the_extra_connection() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("max_connections_per_client = 2")
            .build(),
    );
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
        s.write_all(request).await.unwrap();
        assert_eq!(
            read_response(&mut s, Duration::from_secs(5))
                .await
                .unwrap()
                .status,
            200
        );
        held.push(s);
    }
    let r = raw_request(lb.addr("web"), request).await;
    assert_eq!(r.map(|r| r.status), Some(429));
    assert!(lb.wait_for_log("reason=too_many_connections", Duration::from_secs(2)));
    // A slot freed is a slot usable again.
    held.pop();
    let ok = support::eventually(Duration::from_secs(5), async || {
        raw_request(lb.addr("web"), request).await.map(|r| r.status) == Some(200)
    })
    .await;
    assert!(ok.is_some(), "a freed slot was not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_pipe_nobody_reads_never_stalls_requests() {
    // Each malformed connection logs a debug line; after a few hundred the 64 KiB pipe is
    // full, and a blocking logger would then stop every worker thread. ballast drops lines
    // instead and keeps serving.
    let a = Backend::start("a").await;
    let lb = Ballast::start_with_unread_log(&TestConfig::new(&[&a]).build(), "debug");
    let mut c = support::Client::connect(lb.addr("web")).await.unwrap();
    for i in 0..1500 {
        let mut bad = TcpStream::connect(lb.addr("web")).await.unwrap();
        bad.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), c.get("/"))
            .await
            .unwrap_or_else(|_| panic!("request {i} stalled behind the log"))
            .expect("request");
        assert_eq!(r.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_carry_a_request_past_its_route() {
    let [app, api] = start_backends(["app", "api"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener("[[listeners.web.routes]]\npath_prefix = \"/echo-path/api/\"\npool = \"api\"")
            .pool(&format!("[pools.api]\nbackends = [\"{}\"]", api.addr))
            .build(),
    );
    let cases = [
        // (sent, pool that must answer, path the backend must see)
        ("/echo-path/api/../other?q=1", "app", "/echo-path/other?q=1"),
        ("/echo-path/other/../api/x", "api", "/echo-path/api/x"),
        ("/echo-path/other/%2e%2E/api/x", "api", "/echo-path/api/x"),
        ("/echo-path/api/./x", "api", "/echo-path/api/x"),
    ];
    for (sent, pool, seen) in cases {
        let r = support::get(lb.addr("web"), sent).await;
        assert_eq!((r.backend(), r.body.as_str()), (pool, seen), "{sent}");
    }
    let r = raw_request(
        lb.addr("web"),
        b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .expect("answer");
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(app.hits() + api.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_while_buffering() {
    // curl sends `Expect: 100-continue` and waits for the 100 before the body; ballast
    // reads the body itself (buffering), so it must say 100 itself.
    let a = Backend::start("a").await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let mut s = TcpStream::connect(lb.addr("web")).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let r = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("an interim 100");
    assert_eq!(r.status, 100, "{}", r.head);
    s.write_all(b"hello").await.unwrap();
    let r = read_response(&mut s, Duration::from_secs(5))
        .await
        .expect("answer");
    assert_eq!(r.status_text(), (200, "a 5".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_is_strict_and_backends_get_one_unambiguous_length() {
    let a = Backend::start("a").await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    // Refused before any backend sees them: conflicting or malformed lengths, and transfer
    // codings that do not end in chunked (the body's end would be unknowable).
    for bad in [
        &b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nhello",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n\r\n",
    ] {
        let r = raw_request(lb.addr("web"), bad).await.expect("answer");
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
    }
    assert_eq!(a.hits(), 0, "a malformed message reached the backend");
    // Both Content-Length and chunked: chunked decides (RFC 9112 §6.3) and the backend
    // gets the decoded body with its own, correct length, never the client's claim.
    for both in [
        &b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let r = raw_request(lb.addr("web"), both).await.expect("answer");
        assert_eq!(r.status_text(), (200, "a 5".into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_truncates_its_response_is_ejected() {
    // Promises 1000 bytes, sends 10, closes: an invalid response is the backend's failure.
    let short = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let short_addr = short.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = short.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                .await;
        }
    });
    let lb = Ballast::start(&TestConfig::addresses([short_addr]).admin().build());
    let r = raw_request(lb.addr("web"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        r.is_none(),
        "a truncated body must not look complete: {r:?}"
    );
    assert!(
        lb.wait_for_log("reason=response_truncated", Duration::from_secs(2)),
        "{}",
        lb.logs()
    );
    assert_eq!(
        backend_state(lb.admin(), "app", short_addr).await,
        "ejected"
    );
}
