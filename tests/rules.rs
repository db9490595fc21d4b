//! L7 rules (issue 25): routes that match on the whole request (path, regex, methods,
//! header and query fields, the client's address; SNI is in `tls.rs`), routes that answer
//! by themselves (`redirect`, `respond`), and `allow_from` / `deny_from` on listeners and
//! routes. Real daemon, real backends, requests as a client sends them; each case beside
//! its opposite, so that each test can fail.

mod support;

use std::net::IpAddr;

use support::*;

/// Which backend answered a raw request with these extra field lines (its `x-backend`
/// field), or the status if not 200.
async fn answered(web: std::net::SocketAddr, method: &str, target: &str, fields: &str) -> String {
    let sent =
        format!("{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{fields}\r\n");
    let r = raw_request(web, sent.as_bytes()).await.expect("answer");
    if r.status != 200 {
        return r.status.to_string();
    }
    r.head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-backend: ")
                .map(String::from)
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_on_exact_paths_path_regexes_and_methods_all_together() {
    let [app, exact, writes, regex] = start_backends(["app", "exact", "writes", "regex"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(
                r#"routes = [
  { path = "/robots.txt", methods = ["GET", "HEAD"], pool = "exact" },
  { path_prefix = "/api/", methods = ["POST", "PUT"], pool = "writes" },
  { path_regex = "^/users/[0-9]+/avatar$", pool = "regex" },
]"#,
            )
            .named_pool("exact", &exact)
            .named_pool("writes", &writes)
            .named_pool("regex", &regex)
            .build(),
    );
    let web = lb.addr("web");
    let cases = [
        ("GET", "/robots.txt", "exact"),
        ("POST", "/robots.txt", "app"),
        ("OPTIONS", "/robots.txt", "app"),
        ("GET", "/robots.txt/x", "app"),
        // The query is not part of the path.
        ("GET", "/robots.txt?x=1", "exact"),
        ("POST", "/api/items", "writes"),
        ("PUT", "/api/items/1", "writes"),
        ("GET", "/api/items", "app"),
        ("GET", "/users/42/avatar", "regex"),
        ("GET", "/users/42/avatar?size=2", "regex"),
        ("GET", "/users/x/avatar", "app"),
        ("GET", "/users/42/avatar/big", "app"),
        // Matched after dot-segments are resolved, as prefixes are.
        ("GET", "/users/7/../42/avatar", "regex"),
        ("GET", "/static/../robots.txt", "exact"),
    ];
    let mut seen = Vec::new();
    for (method, target, _) in cases {
        seen.push(answered(web, method, target, "").await);
    }
    let expected: Vec<String> = cases.iter().map(|c| c.2.to_string()).collect();
    assert_eq!(seen, expected, "{cases:?}");
    // A hostile path is matched in linear time: a long one costs no more than its length.
    let long = format!("/users/{}x/avatar", "1".repeat(6000));
    assert_eq!(answered(web, "GET", &long, "").await, "app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_on_headers_and_query_parameters() {
    let [app, canary, curl, v2] = start_backends(["app", "canary", "curl", "v2"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(
                r#"routes = [
  { headers = { "X-Canary" = "1", "X-Debug" = false }, pool = "canary" },
  { headers = { "User-Agent" = { regex = "^curl/" } }, pool = "curl" },
  { query = { "version" = "2", "preview" = true }, pool = "v2" },
]"#,
            )
            .named_pool("canary", &canary)
            .named_pool("curl", &curl)
            .named_pool("v2", &v2)
            .build(),
    );
    let web = lb.addr("web");
    let cases = [
        ("/", "X-Canary: 1\r\n", "canary"),
        ("/", "x-canary: 1\r\n", "canary"),
        ("/", "X-Canary: 0\r\nX-Canary: 1\r\n", "canary"),
        ("/", "X-Canary: 1\r\nX-Debug: yes\r\n", "app"),
        ("/", "X-Canary: 11\r\n", "app"),
        ("/", "User-Agent: curl/8.5.0\r\n", "curl"),
        ("/", "User-Agent: Mozilla/5.0 curl/8\r\n", "app"),
        ("/?version=2&preview", "", "v2"),
        ("/?preview=1&version=%32", "", "v2"),
        ("/?version=2", "", "app"),
        ("/?version=20&preview", "", "app"),
        ("/", "", "app"),
    ];
    let mut seen = Vec::new();
    for (target, fields, _) in cases {
        seen.push(answered(web, "GET", target, fields).await);
    }
    let expected: Vec<String> = cases.iter().map(|c| c.2.to_string()).collect();
    assert_eq!(seen, expected, "{cases:?}");
}

/// Method, target and field lines of one raw request; the reply (the body read by its
/// `Content-Length`).
async fn reply(web: std::net::SocketAddr, method: &str, target: &str, fields: &str) -> RawReply {
    let sent = format!("{method} {target} HTTP/1.1\r\n{fields}\r\n");
    raw_request(web, sent.as_bytes())
        .await
        .unwrap_or_else(|| panic!("an answer to {method} {target}"))
}

/// The value of field `name` in a response head.
fn field_of(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_and_respond_routes_answer_by_themselves_and_no_backend_sees_a_request() {
    let [app] = start_backends(["app"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(
                r#"routes = [
  { host = "www.example.com", redirect = { to = "https://example.com${request_uri}", status = 301 } },
  { path = "/old", redirect = { to = "/new?from=${path}&${query}" } },
  { path_regex = "^//", redirect = { to = "${request_uri}", status = 308 } },
  { path = "/robots.txt", respond = { body = "User-agent: *\nDisallow: /\n" } },
  { path_prefix = "/maintenance/", respond = { status = 503, body = "<h1>Back soon</h1>", content_type = "text/html", headers = { "Retry-After" = "120", "Cache-Control" = "no-store" } } },
  { path = "/gone", respond = { status = 410 } },
]"#,
            )
            .build(),
    );
    let web = lb.addr("web");
    let location = |r: &RawReply| field_of(&r.head, "location").unwrap_or_default();

    // www → apex, the path and query kept; the host's port is not.
    let r = reply(web, "GET", "/a/b?x=1", "Host: www.example.com:8080\r\n").await;
    assert_eq!(
        (r.status, location(&r)),
        (301, "https://example.com/a/b?x=1".into())
    );
    // A moved path, 302 when no status is given; `${path}` and `${query}` apart.
    let r = reply(web, "GET", "/old?id=7", "Host: x\r\n").await;
    assert_eq!(
        (r.status, location(&r)),
        (302, "/new?from=/old&id=7".into())
    );
    // A path that would make `Location` a link to another host keeps one slash.
    let r = reply(web, "GET", "//evil.example/x", "Host: x\r\n").await;
    assert_eq!((r.status, location(&r)), (308, "/evil.example/x".into()));

    let r = reply(web, "GET", "/robots.txt", "Host: x\r\n").await;
    assert_eq!(
        r.status_text(),
        (200, "User-agent: *\nDisallow: /\n".into())
    );
    assert_eq!(
        field_of(&r.head, "content-type").as_deref(),
        Some("text/plain; charset=utf-8"),
        "the default type of a body"
    );
    // Any method: the route has no `methods`. The body is not read, so the connection
    // closes after the answer.
    let r = reply(
        web,
        "POST",
        "/robots.txt",
        "Host: x\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert_eq!(r.status, 200);

    let r = reply(web, "GET", "/maintenance/x", "Host: x\r\n").await;
    assert_eq!(r.status_text(), (503, "<h1>Back soon</h1>".into()));
    assert_eq!(
        field_of(&r.head, "content-type").as_deref(),
        Some("text/html")
    );
    assert_eq!(field_of(&r.head, "retry-after").as_deref(), Some("120"));
    assert_eq!(
        field_of(&r.head, "cache-control").as_deref(),
        Some("no-store")
    );

    let r = reply(web, "GET", "/gone", "Host: x\r\n").await;
    assert_eq!(r.status_text(), (410, String::new()));
    assert_eq!(field_of(&r.head, "content-type"), None, "no body, no type");

    // HEAD gets the head of the same answer, without its body.
    let mut c = Client::connect(web).await.expect("connect");
    let head = c
        .request(
            http::Request::head("/robots.txt")
                .header("host", "x")
                .body(Default::default())
                .expect("request"),
        )
        .await
        .expect("HEAD answered");
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(head.headers["content-length"], "26");

    assert_eq!(app.hits(), 0, "every answer above was ballast's own");
    let r = reply(web, "GET", "/other", "Host: x\r\n").await;
    assert_eq!(
        r.status_text(),
        (200, "app".into()),
        "the rest goes to the pool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_needs_a_host_where_it_names_one() {
    let [app] = start_backends(["app"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(r#"routes = [{ path_prefix = "/", redirect = { to = "https://${host}${request_uri}" } }]"#)
            .build(),
    );
    let web = lb.addr("web");
    // HTTP/1.0 may leave Host out: there is nothing to redirect to.
    let r = raw_request(web, b"GET /x HTTP/1.0\r\n\r\n")
        .await
        .expect("answer");
    assert_eq!(r.status, 400);
    // An IPv6 literal keeps its brackets; a host that is no host name is refused.
    let r = reply(web, "GET", "/x", "Host: [::1]:8080\r\n").await;
    assert_eq!(
        field_of(&r.head, "location").as_deref(),
        Some("https://[::1]/x")
    );
    let r = reply(web, "GET", "/x", "Host: a_b@c\r\n").await;
    assert_eq!(r.status, 400);
    assert_eq!(app.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_from_and_deny_from_refuse_clients_before_any_backend() {
    let [app, admin, canary] = start_backends(["app", "admin", "canary"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(
                r#"deny_from = ["127.0.0.66"]
routes = [
  { path_prefix = "/admin/", allow_from = ["127.0.0.4/30"], deny_from = ["127.0.0.6"], pool = "admin" },
  { client_cidrs = ["127.0.0.8/29"], pool = "canary" },
]"#,
            )
            .named_pool("admin", &admin)
            .named_pool("canary", &canary)
            .build(),
    );
    let web = lb.addr("web");
    let from = |last: u8| IpAddr::from([127, 0, 0, last]);
    let cases = [
        (1, "/", "200 app"),
        (66, "/", "403"),
        (66, "/admin/x", "403"),
        (5, "/admin/x", "200 admin"),
        (6, "/admin/x", "403"),
        (1, "/admin/x", "403"),
        (9, "/", "200 canary"),
        (15, "/x", "200 canary"),
        (16, "/", "200 app"),
        (9, "/admin/x", "403"),
    ];
    let mut seen = Vec::new();
    for (last, path, _) in cases {
        let r = get_from(from(last), web, path, "").await.expect("answer");
        seen.push(match r.status {
            200 => format!("200 {}", String::from_utf8_lossy(&r.body)),
            403 => {
                // Refused before the body: the connection closes.
                assert_eq!(field_of(&r.head, "connection").as_deref(), Some("close"));
                "403".to_string()
            }
            other => other.to_string(),
        });
    }
    let expected: Vec<&str> = cases.iter().map(|c| c.2).collect();
    assert_eq!(seen, expected, "{cases:?}");
    assert_eq!((app.hits(), admin.hits(), canary.hits()), (2, 1, 2));
    assert!(
        lb.wait_for_log("reason=denied", WAIT),
        "refusals are logged:\n{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_hold_ipv6_clients_named_by_a_proxy_header() {
    let [app] = start_backends(["app"]).await;
    // The test can only connect from loopback: the client addresses come from PROXY
    // headers, which ballast trusts from 127.0.0.1.
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(
                r#"accept_proxy = ["127.0.0.1"]
allow_from = ["2001:db8::/32", "10.0.0.0/8"]
deny_from = ["2001:db8:bad::/48"]"#,
            )
            .build(),
    );
    let web = lb.addr("web");
    let status_from = async |client: &str| {
        let family = if client.contains(':') { "TCP6" } else { "TCP4" };
        let to = if client.contains(':') {
            "2001:db8::80"
        } else {
            "10.9.9.9"
        };
        let head = format!(
            "PROXY {family} {client} {to} 40000 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        raw_request(web, head.as_bytes())
            .await
            .expect("answer")
            .status
    };
    assert_eq!(status_from("2001:db8:1::1").await, 200);
    assert_eq!(
        status_from("2001:db8:bad::1").await,
        403,
        "denied inside the allowed range"
    );
    assert_eq!(
        status_from("2001:db9::1").await,
        403,
        "outside the allowed range"
    );
    assert_eq!(status_from("10.1.2.3").await, 200);
    assert_eq!(status_from("11.1.2.3").await, 403);
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_closes_a_refused_client_at_accept() {
    let [app] = start_backends(["app"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener("mode = \"tcp\"\ndeny_from = [\"127.0.0.2\"]")
            .build(),
    );
    let web = lb.addr("web");
    let allowed = get_from(IpAddr::from([127, 0, 0, 1]), web, "/", "").await;
    assert_eq!(allowed.map(|r| r.status), Some(200));
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind");
    let mut s = socket.connect(web).await.expect("the kernel accepts first");
    use tokio::io::AsyncWriteExt;
    // The write may race the close; only what comes back counts.
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        closed_within(&mut s, WAIT).await.is_some(),
        "closed, unanswered"
    );
    assert_eq!(app.hits(), 1, "the refused client reached no backend");
    assert!(lb.wait_for_log("connection refused by allow_from / deny_from", WAIT));
}

/// Which backend answered (`x-backend`) and the `X-Forwarded-For` it got, for a request
/// from loopback address `from` carrying `fields`; or the status when not 200.
async fn seen_from(web: std::net::SocketAddr, from: [u8; 4], path: &str, fields: &str) -> String {
    let r = get_from(IpAddr::from(from), web, path, fields)
        .await
        .expect("answer");
    if r.status != 200 {
        return r.status.to_string();
    }
    let backend = field_of(&r.head, "x-backend").unwrap_or_default();
    let body = String::from_utf8_lossy(&r.body);
    let xff = body
        .lines()
        .find_map(|l| l.strip_prefix("x-forwarded-for: "))
        .unwrap_or("-");
    format!("{backend} [{xff}]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_names_the_client_and_nobody_else_can() {
    let [app, vip] = start_backends(["app", "vip"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(
                r#"trusted_proxies = ["127.0.0.2", "10.0.0.0/8"]
deny_from = ["198.51.100.66"]
routes = [
  { path_prefix = "/internal/", allow_from = ["10.0.0.0/8"], pool = "app" },
  { client_cidrs = ["203.0.113.0/24", "2001:db8::/32"], pool = "vip" },
]"#,
            )
            .named_pool("vip", &vip)
            .build(),
    );
    let web = lb.addr("web");
    let proxy = [127, 0, 0, 2];
    let stranger = [127, 0, 0, 1];
    let cases: [([u8; 4], &str, &str, &str); 12] = [
        // The right-most address the trusted proxies did not write is the client.
        (
            proxy,
            "/headers",
            "X-Forwarded-For: 1.1.1.1, 203.0.113.7\r\n",
            "vip [1.1.1.1, 203.0.113.7, 127.0.0.2]",
        ),
        (
            proxy,
            "/headers",
            "X-Forwarded-For: 203.0.113.7, 10.9.9.9\r\n",
            "vip [203.0.113.7, 10.9.9.9, 127.0.0.2]",
        ),
        (
            proxy,
            "/headers",
            "X-Forwarded-For: 192.0.2.1\r\n",
            "app [192.0.2.1, 127.0.0.2]",
        ),
        (
            proxy,
            "/headers",
            "Forwarded: for=\"[2001:db8::7]:4711\"\r\n",
            "vip [127.0.0.2]",
        ),
        // A trusted proxy that names nobody: it is the client.
        (proxy, "/headers", "", "app [127.0.0.2]"),
        (proxy, "/", "X-Forwarded-For: 198.51.100.66\r\n", "403"),
        (
            proxy,
            "/internal/x",
            "X-Forwarded-For: 10.1.2.3\r\n",
            "app [-]",
        ),
        (
            proxy,
            "/internal/x",
            "X-Forwarded-For: 192.0.2.1\r\n",
            "403",
        ),
        // Anyone else's word counts for nothing, and its chain is not passed on.
        (
            stranger,
            "/headers",
            "X-Forwarded-For: 203.0.113.7\r\n",
            "app [127.0.0.1]",
        ),
        (
            stranger,
            "/headers",
            "Forwarded: for=203.0.113.7\r\n",
            "app [127.0.0.1]",
        ),
        (
            stranger,
            "/",
            "X-Forwarded-For: 198.51.100.66\r\n",
            "app [-]",
        ),
        (
            stranger,
            "/internal/x",
            "X-Forwarded-For: 10.1.2.3\r\n",
            "403",
        ),
    ];
    let mut seen = Vec::new();
    for (from, path, fields, _) in cases {
        seen.push(seen_from(web, from, path, fields).await);
    }
    let expected: Vec<&str> = cases.iter().map(|c| c.3).collect();
    assert_eq!(seen, expected);
    // The stranger's Forwarded line did not reach the backend either.
    let r = get_from(
        IpAddr::from(stranger),
        web,
        "/headers",
        "Forwarded: for=203.0.113.7\r\n",
    )
    .await
    .expect("answer");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("forwarded: for"),
        "{r:?}"
    );
    // The log names the client and the proxy it came through.
    assert!(
        lb.wait_for_log("client=198.51.100.66 (via 127.0.0.2:", WAIT),
        "{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hashing_and_per_client_limits_count_the_client_a_trusted_proxy_names() {
    let [a, b] = start_backends(["a", "b"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a, &b])
            .listener(
                "trusted_proxies = [\"127.0.0.2\"]\nmax_connections_per_client = 1\nrate_limit = { requests_per_second = 0.05, burst = 1 }",
            )
            .pool("algorithm = \"hash\"\nhash_key = \"client_ip\"")
            .build(),
    );
    let web = lb.addr("web");
    let proxy = IpAddr::from([127, 0, 0, 2]);
    // Each client has its own bucket (refills are 20 s apart: none happens here); the
    // proxy's address is not one.
    let status = async |client: &str| {
        let fields = format!("X-Forwarded-For: {client}\r\n");
        get_from(proxy, web, "/", &fields).await.expect("answer")
    };
    let mut backends = std::collections::BTreeSet::new();
    for i in 1..=20u8 {
        let r = status(&format!("203.0.113.{i}")).await;
        assert_eq!(r.status, 200, "client {i}");
        backends.insert(field_of(&r.head, "x-backend").unwrap_or_default());
    }
    assert_eq!(
        status("203.0.113.1").await.status,
        429,
        "the same client again"
    );
    // `hash` on client_ip spreads the proxy's clients (on the proxy alone, one backend
    // would take all twenty).
    assert_eq!(backends.len(), 2, "{backends:?}");

    // max_connections_per_client = 1 holds a direct client, not the proxy.
    let connect_from = async |ip: IpAddr| {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(std::net::SocketAddr::new(ip, 0)).expect("bind");
        socket.connect(web).await.expect("connect")
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(proxy).await);
    }
    for (i, s) in held.iter_mut().enumerate() {
        use tokio::io::AsyncWriteExt;
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 192.0.2.{i}\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let r = read_response(s, WAIT)
            .await
            .expect("the proxy's connections all served");
        assert_eq!(r.status, 200, "the proxy's connection {i}");
    }
    let direct = IpAddr::from([127, 0, 0, 3]);
    // Accepted in order: the first is admitted before the second is looked at.
    let _first = connect_from(direct).await;
    let mut second = connect_from(direct).await;
    use tokio::io::AsyncWriteExt;
    let _ = second.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = read_response(&mut second, WAIT).await;
    assert_eq!(
        r.map(|r| r.status),
        Some(429),
        "a second connection from one client"
    );
    assert!(
        lb.wait_for_log("client is at max_connections_per_client", WAIT),
        "refused by the connection limit, not the rate limit:\n{}",
        lb.logs()
    );
    assert!(
        !lb.logs().contains("client=127.0.0.2"),
        "the proxy was never held to it"
    );
}

/// A request with `cookie` (or none) on a fresh connection: which backend answered, and the
/// `lb` value of the `Set-Cookie` it came with, if any.
async fn sticky_get(
    web: std::net::SocketAddr,
    path: &str,
    cookie: Option<&str>,
) -> (String, Option<String>) {
    let fields = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
    let r = reply(web, "GET", path, &format!("Host: x\r\n{fields}")).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let backend = field_of(&r.head, "x-backend").unwrap_or_default();
    let set = field_of(&r.head, "set-cookie");
    if let Some(set) = &set {
        assert!(
            set.ends_with("; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600"),
            "{set}"
        );
    }
    let value = set.and_then(|s| s.strip_prefix("lb=")?.split(';').next().map(String::from));
    (backend, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_keeps_a_session_on_its_backend_until_it_drains() {
    let [a, b, c] = start_backends(["a", "b", "c"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a, &b, &c])
            .admin()
            .pool("sticky = { cookie = \"lb\", ttl = \"1h\" }")
            .build(),
    );
    let web = lb.addr("web");
    let (home, cookie) = sticky_get(web, "/", None).await;
    let cookie = cookie.expect("the first answer sets the cookie");
    assert_eq!(cookie.len(), 16, "an opaque id, not an address: {cookie}");
    let session = format!("lb={cookie}");
    // Round robin would move on; the session stays, and the cookie is not set again.
    for _ in 0..6 {
        assert_eq!(
            sticky_get(web, "/", Some(&session)).await,
            (home.clone(), None)
        );
    }
    // The backend never sees ballast's cookie; the application's own pass.
    let r = reply(
        web,
        "GET",
        "/headers",
        &format!("Host: x\r\nCookie: app=1; {session}; other=2\r\n"),
    )
    .await;
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.contains("cookie: app=1; other=2\n"), "{body}");
    assert!(!body.contains("lb="), "{body}");
    // Forged or garbage values count as no cookie: balanced, and a real one set.
    for forged in [
        "lb=0123456789abcdef",
        "lb=../../etc",
        "lb=",
        "lb=0123456789ABCDEF",
    ] {
        let (_, set) = sticky_get(web, "/", Some(forged)).await;
        assert!(set.is_some(), "{forged}: the cookie is rewritten");
    }
    // Drained: the session moves, and the cookie with it.
    let home_addr = [&a, &b, &c]
        .into_iter()
        .find(|x| x.name == home)
        .map(|x| x.addr)
        .expect("a backend by that name");
    assert_eq!(admin_backend(lb.admin(), home_addr, "drain").await, 200);
    let (moved, new_cookie) = sticky_get(web, "/", Some(&session)).await;
    assert_ne!(
        moved, home,
        "a drained backend takes no new session requests"
    );
    let new_cookie = new_cookie.expect("the cookie names the new backend");
    assert_ne!(new_cookie, cookie);
    let new_session = format!("lb={new_cookie}");
    for _ in 0..3 {
        assert_eq!(
            sticky_get(web, "/", Some(&new_session)).await,
            (moved.clone(), None)
        );
    }
}

/// `Authorization: Basic` for `user:password`.
fn basic(pair: &str) -> String {
    use base64::Engine;
    format!(
        "Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_asks_for_credentials_checks_them_and_follows_its_users_file() {
    let [app] = start_backends(["app"]).await;
    let dir = tempfile::tempdir().expect("dir");
    let users = dir.path().join("htpasswd");
    let line = |user: &str, password: &str| {
        format!("{user}:{}\n", bcrypt::hash(password, 4).expect("hash"))
    };
    std::fs::write(&users, format!("# staff\n{}", line("alice", "wonderland"))).expect("write");
    let auth = format!(
        "basic_auth = {{ realm = \"Staff\", users_file = \"{}\" }}",
        users.display()
    );
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(&format!(
                "routes = [{{ path_prefix = \"/admin/\", pool = \"app\", {auth} }}]"
            ))
            .build(),
    );
    let web = lb.addr("web");
    let status = async |path: &str, fields: &str| {
        reply(web, "GET", path, &format!("Host: x\r\n{fields}")).await
    };
    // Open outside the route.
    assert_eq!(status("/", "").await.status, 200);
    let r = status("/admin/x", "").await;
    assert_eq!(r.status, 401);
    assert_eq!(
        field_of(&r.head, "www-authenticate").as_deref(),
        Some("Basic realm=\"Staff\", charset=\"UTF-8\"")
    );
    for wrong in [
        basic("alice:alice"),
        basic("mallory:wonderland"),
        basic("alice"),
        "Authorization: Basic !!!\r\n".to_string(),
        "Authorization: Bearer abc\r\n".to_string(),
    ] {
        assert_eq!(status("/admin/x", &wrong).await.status, 401, "{wrong}");
    }
    let hits = app.hits();
    let r = status("/admin/x", &basic("alice:wonderland")).await;
    assert_eq!(r.status_text(), (200, "app".into()));
    assert_eq!(
        status("/admin/y", &basic("alice:wonderland")).await.status,
        200
    );
    assert_eq!(app.hits(), hits + 2, "refused requests reached no backend");
    let logs = lb.logs();
    assert!(logs.contains("request refused by basic_auth"), "{logs}");
    assert!(
        !logs.contains("wonderland") && !logs.contains("$2"),
        "{logs}"
    );

    // The file is watched: a rename-save (as editors and `htpasswd` do) replaces the users.
    let tmp = dir.path().join(".htpasswd.new");
    std::fs::write(&tmp, line("bob", "builder")).expect("write");
    std::fs::rename(&tmp, &users).expect("rename");
    let swapped = eventually(WAIT, async || {
        status("/admin/x", &basic("bob:builder")).await.status == 200
    })
    .await;
    assert!(swapped.is_some(), "{}", lb.logs());
    assert_eq!(
        status("/admin/x", &basic("alice:wonderland")).await.status,
        401
    );

    // A broken file is refused with its line; the running users stay.
    std::fs::write(&tmp, "bob:{SHA}fEqNCco3Yq9h5ZUglD3CZJT4lBs=\n").expect("write");
    std::fs::rename(&tmp, &users).expect("rename");
    assert!(
        lb.wait_for_log("only bcrypt hashes are accepted", WAIT),
        "{}",
        lb.logs()
    );
    assert_eq!(status("/admin/x", &basic("bob:builder")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_on_a_listener_covers_every_route_without_its_own() {
    let [app] = start_backends(["app"]).await;
    let dir = tempfile::tempdir().expect("dir");
    let users = dir.path().join("htpasswd");
    let hash = bcrypt::hash("pw", 4).expect("hash");
    std::fs::write(&users, format!("u:{hash}\n")).expect("write");
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(&format!(
                "basic_auth = {{ users_file = \"{}\" }}\nroutes = [{{ path = \"/robots.txt\", respond = {{ body = \"ok\" }} }}]",
                users.display()
            ))
            .build(),
    );
    let web = lb.addr("web");
    for path in ["/", "/robots.txt"] {
        let r = reply(web, "GET", path, "Host: x\r\n").await;
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(
            field_of(&r.head, "www-authenticate").as_deref(),
            Some("Basic realm=\"ballast\", charset=\"UTF-8\"")
        );
        let r = reply(web, "GET", path, &format!("Host: x\r\n{}", basic("u:pw"))).await;
        assert_eq!(r.status, 200, "{path}");
    }
}
