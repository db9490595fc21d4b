//! TLS termination: certificate by SNI, ALPN, versions and suites, live certificate
//! reload, mutual TLS, hostile handshakes, the https redirect, WebSocket over TLS.
//! Certificates are made per test with rcgen; the daemon and backends are real.

mod support;

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::tls::{alpn, connect, get_h1, served_cert, Leaf, Pki};
use support::{read_head, start_backends, Backend, Ballast, TestConfig, WAIT};

/// `[listeners.web.tls]` with these certificates, plus `extra` keys.
fn tls_listener(certs: &[&Leaf], extra: &str) -> String {
    let list: Vec<String> = certs
        .iter()
        .map(|c| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.cert.display(),
                c.key.display()
            )
        })
        .collect();
    format!(
        "[listeners.web.tls]\ncertificates = [{}]\n{extra}",
        list.join(", ")
    )
}

fn start(backends: &[&Backend], certs: &[&Leaf], extra: &str) -> Ballast {
    Ballast::start(
        &TestConfig::new(backends)
            .admin()
            .listener(&tls_listener(certs, extra))
            .build(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_exact_then_wildcard_then_the_default() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("sni");
    let first = pki.issue("first", &["www.example.com", "example.com"]);
    let wild = pki.issue("wild", &["*.example.org"]);
    let exact = pki.issue("exact", &["api.example.org"]);
    let lb = start(&[&a], &[&first, &wild, &exact], "");
    // Checks which certificate is served, whether or not it covers the name asked for.
    let any = support::tls::any_name(&pki);
    let cases: [(Option<&str>, &Leaf); 6] = [
        (Some("www.example.com"), &first),
        (Some("example.com"), &first),
        (Some("x.example.org"), &wild),
        // An exact name wins over a wildcard that also covers it.
        (Some("api.example.org"), &exact),
        // A wildcard covers one label only; unknown names get the default (the first).
        (Some("a.b.example.org"), &first),
        (None, &first),
    ];
    for (sni, want) in cases {
        let s = connect(lb.addr("web"), sni, &any).await.expect("handshake");
        assert_eq!(served_cert(&s), want.der, "sni {sni:?}");
    }
    // A verifying client accepts the wildcard for its name, and the request goes through,
    // marked as https.
    let client = pki.client(&["http/1.1"]);
    connect(lb.addr("web"), Some("x.example.org"), &client)
        .await
        .expect("wildcard verifies");
    let s = connect(lb.addr("web"), Some("www.example.com"), &client)
        .await
        .expect("handshake");
    let r = get_h1(s, "www.example.com", "/headers")
        .await
        .expect("request");
    assert_eq!(r.status, 200);
    assert!(r.body.contains("x-forwarded-proto: https"), "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_the_sni_the_client_sent_over_http11_and_h2() {
    let [app, api] = start_backends(["app", "api"]).await;
    let pki = Pki::new("sni-route");
    let cert = pki.issue("c", &["*.example.org"]);
    let lb = Ballast::start(
        &TestConfig::new(&[&app])
            .listener(r#"routes = [{ sni = "api.example.org", pool = "api" }]"#)
            .listener(&tls_listener(&[&cert], ""))
            .named_pool("api", &api)
            .build(),
    );
    let web = lb.addr("web");
    let h1 = pki.client(&["http/1.1"]);
    // The SNI decides, whatever the Host says.
    let s = connect(web, Some("api.example.org"), &h1)
        .await
        .expect("handshake");
    let r = get_h1(s, "www.example.org", "/").await.expect("request");
    assert_eq!(r.body, "api");
    let s = connect(web, Some("www.example.org"), &h1)
        .await
        .expect("handshake");
    let r = get_h1(s, "api.example.org", "/").await.expect("request");
    assert_eq!(r.body, "app");
    // No SNI at all matches no `sni` route.
    let s = connect(web, None, &support::tls::any_name(&pki))
        .await
        .expect("handshake");
    assert_eq!(
        get_h1(s, "api.example.org", "/")
            .await
            .expect("request")
            .body,
        "app"
    );
    // HTTP/2: every stream of the connection.
    let s = connect(web, Some("API.example.org"), &pki.client(&["h2"]))
        .await
        .expect("handshake");
    assert_eq!(alpn(&s).as_deref(), Some("h2"));
    let r = support::tls::get_h2(s, "www.example.org", "/")
        .await
        .expect("h2 request");
    assert_eq!(r.body, "api", "SNI is matched without regard to case");
    assert_eq!((app.hits(), api.hits()), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_set_over_tls_is_secure() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("sticky");
    let cert = pki.issue("c", &["localhost"]);
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener(&tls_listener(&[&cert], ""))
            .pool("sticky = { cookie = \"srv\" }")
            .build(),
    );
    let s = connect(
        lb.addr("web"),
        Some("localhost"),
        &pki.client(&["http/1.1"]),
    )
    .await
    .expect("handshake");
    let r = get_h1(s, "localhost", "/").await.expect("request");
    let set = r.headers["set-cookie"].to_str().unwrap_or_default();
    assert!(set.starts_with("srv="), "{set}");
    assert!(
        set.ends_with("; Path=/; HttpOnly; SameSite=Lax; Secure"),
        "{set}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_and_http11() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("alpn");
    let cert = pki.issue("c", &["localhost"]);
    let lb = start(&[&a], &[&cert], "");
    let both = connect(
        lb.addr("web"),
        Some("localhost"),
        &pki.client(&["h2", "http/1.1"]),
    )
    .await
    .expect("handshake");
    assert_eq!(alpn(&both).as_deref(), Some("h2"));
    let h1 = connect(
        lb.addr("web"),
        Some("localhost"),
        &pki.client(&["http/1.1"]),
    )
    .await
    .expect("handshake");
    assert_eq!(alpn(&h1).as_deref(), Some("http/1.1"));
    assert_eq!(get_h1(h1, "localhost", "/").await.expect("h1").body, "a");
    // No ALPN at all: HTTP/1.1.
    let none = connect(lb.addr("web"), Some("localhost"), &pki.client(&[]))
        .await
        .expect("handshake");
    assert_eq!(alpn(&none), None);
    assert_eq!(
        get_h1(none, "localhost", "/").await.expect("h1").status,
        200
    );
    // Only what the listener offers: `alpn = ["http/1.1"]` never agrees to h2.
    drop(lb);
    let lb = start(&[&a], &[&cert], "alpn = [\"http/1.1\"]\n");
    let s = connect(
        lb.addr("web"),
        Some("localhost"),
        &pki.client(&["h2", "http/1.1"]),
    )
    .await
    .expect("handshake");
    assert_eq!(alpn(&s).as_deref(), Some("http/1.1"));
}

/// Runs `openssl s_client` with `args` against `addr`; true if a session was established.
fn openssl_connects(addr: std::net::SocketAddr, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let established = out.status.success() && !text.contains("Cipher is (NONE)");
    (established, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_versions_and_weak_suites_are_refused() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: openssl is not installed (.ci/run installs it)");
        return;
    }
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("versions");
    let cert = pki.issue("c", &["localhost"]);
    let lb = start(&[&a], &[&cert], "");
    let addr = lb.addr("web");
    // Controls: what must work does.
    let (ok, out) = openssl_connects(addr, &["-tls1_3"]);
    assert!(ok, "TLS 1.3 refused:\n{out}");
    let (ok, out) = openssl_connects(
        addr,
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
    );
    assert!(ok, "TLS 1.2 ECDHE-GCM refused:\n{out}");
    // TLS 1.1 and 1.0 (the client allowed to offer them): the server answers with a
    // protocol_version alert.
    for v in ["-tls1_1", "-tls1"] {
        let (ok, out) = openssl_connects(addr, &[v, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(!ok, "{v} accepted:\n{out}");
        // The server's refusal is an alert (rustls sends handshake_failure).
        assert!(
            out.contains("SSL alert number"),
            "{v}: not refused by the server:\n{out}"
        );
    }
    // TLS 1.2 with only CBC or RSA key exchange on offer: no shared suite.
    for suite in ["ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256", "AES256-SHA"] {
        let (ok, out) = openssl_connects(addr, &["-tls1_2", "-cipher", suite]);
        assert!(!ok, "{suite} accepted:\n{out}");
        assert!(
            out.contains("SSL alert number"),
            "{suite}: not refused by the server:\n{out}"
        );
    }
    // min_version = "1.3": a TLS 1.2-only client is refused.
    drop(lb);
    let lb = start(&[&a], &[&cert], "min_version = \"1.3\"\n");
    let r = connect(lb.addr("web"), Some("localhost"), &pki.client_tls12()).await;
    assert!(r.is_err(), "TLS 1.2 accepted with min_version 1.3");
    assert!(connect(lb.addr("web"), Some("localhost"), &pki.client(&[]))
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_certificate_serves_tls_1_3_and_1_2_and_its_signatures_verify() {
    // RSA keys sign through aws-lc-rs under the ring provider (`rsa-aws-lc`): the clients
    // (ring) check the handshake signature (PSS in TLS 1.3, PSS or PKCS#1 in TLS 1.2) and
    // the chain; an ECDSA certificate beside it still loads through ring.
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("rsa");
    let rsa = pki.issue_rsa("rsa", &["localhost"]);
    let ecdsa = pki.issue("ecdsa", &["ec.example.com"]);
    let lb = start(&[&a], &[&rsa, &ecdsa], "");
    for (label, client) in [
        ("1.3", pki.client(&["http/1.1"])),
        ("1.2", pki.client_tls12()),
    ] {
        let s = connect(lb.addr("web"), Some("localhost"), &client)
            .await
            .unwrap_or_else(|e| panic!("TLS {label} handshake with the RSA certificate: {e}"));
        assert_eq!(served_cert(&s), rsa.der, "TLS {label}: the RSA certificate");
        let reply = get_h1(s, "localhost", "/").await.expect("request");
        assert_eq!(reply.status, 200, "TLS {label}");
    }
    let s = connect(lb.addr("web"), Some("ec.example.com"), &pki.client(&[]))
        .await
        .expect("the ECDSA certificate beside it");
    assert_eq!(served_cert(&s), ecdsa.der);
}

/// Writes `contents` to `path` the way editors and certbot do: a new file renamed over it.
fn rename_save(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write tmp");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_serves_the_next_handshake_and_a_broken_one_is_refused() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("reload");
    let first = pki.issue("site", &["localhost"]);
    let lb = start(&[&a], &[&first], "");
    let client = pki.client(&["http/1.1"]);
    let held = connect(lb.addr("web"), Some("localhost"), &client)
        .await
        .expect("handshake");
    assert_eq!(served_cert(&held), first.der);

    // Renewal: new certificate and key, saved by rename (key first, then cert, as certbot
    // does; the moment in between is refused and the old pair keeps serving).
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(90);
    let second = pki.make_leaf(&["localhost"], later);
    rename_save(&first.key, &second.key_pem);
    rename_save(&first.cert, &second.cert_pem);
    let served = support::eventually(WAIT, async || {
        let s = connect(lb.addr("web"), Some("localhost"), &client).await;
        s.is_ok_and(|s| served_cert(&s) == second.der)
    })
    .await;
    assert!(
        served.is_some(),
        "new certificate not served:\n{}",
        lb.logs()
    );
    // The connection opened before keeps working on its old session.
    assert_eq!(
        get_h1(held, "localhost", "/")
            .await
            .expect("old conn")
            .status,
        200
    );

    // A broken replacement: refused with the file named, the second keeps serving.
    // An edit can raise more than one reload (and the key-first renewal above may have been
    // refused for a mismatch on the way): wait for one more rejection naming the problem.
    let rejections = |needle: &str| {
        lb.lines()
            .iter()
            .filter(|l| l.contains("reload rejected") && l.contains(needle))
            .count()
    };
    let rejected_with = async |needle: &str, before: usize| {
        support::eventually(WAIT, async || rejections(needle) > before)
            .await
            .is_some()
    };
    let named = format!("{}: not a", first.cert.display());
    let before = rejections(&named);
    rename_save(
        &first.cert,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    assert!(
        rejected_with(&named, before).await,
        "no rejection naming the file:\n{}",
        lb.logs()
    );
    let s = connect(lb.addr("web"), Some("localhost"), &client)
        .await
        .expect("still serving");
    assert_eq!(served_cert(&s), second.der);

    // A key that does not match: refused, naming the key file.
    let third = pki.make_leaf(&["localhost"], later);
    let named = format!("{}: the key does not match", first.key.display());
    let before = rejections(&named);
    rename_save(&first.cert, &third.cert_pem);
    assert!(rejected_with(&named, before).await, "{}", lb.logs());
    let s = connect(lb.addr("web"), Some("localhost"), &client)
        .await
        .expect("still serving");
    assert_eq!(served_cert(&s), second.der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swap_like_kubernetes_secrets_reloads_the_certificate() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("k8s");
    // A Kubernetes secret volume: tls.crt -> ..data/tls.crt, ..data -> ..v1; an update
    // writes ..v2 and renames a new ..data symlink over the old one.
    let vol = pki.dir.path().join("secret");
    let write_version = |v: &str, leaf: &Leaf| {
        let d = vol.join(v);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(d.join("tls.key"), &leaf.key_pem).unwrap();
    };
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(90);
    let v1 = pki.make_leaf(&["localhost"], later);
    let v2 = pki.make_leaf(&["localhost"], later);
    write_version("..v1", &v1);
    std::os::unix::fs::symlink("..v1", vol.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", vol.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", vol.join("tls.key")).unwrap();
    let files = Leaf {
        cert: vol.join("tls.crt"),
        key: vol.join("tls.key"),
        der: v1.der.clone(),
        cert_pem: String::new(),
        key_pem: String::new(),
    };
    let lb = start(&[&a], &[&files], "");
    let client = pki.client(&[]);
    let s = connect(lb.addr("web"), Some("localhost"), &client)
        .await
        .expect("handshake");
    assert_eq!(served_cert(&s), v1.der);
    write_version("..v2", &v2);
    std::os::unix::fs::symlink("..v2", vol.join("..data_tmp")).unwrap();
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    let served = support::eventually(WAIT, async || {
        let s = connect(lb.addr("web"), Some("localhost"), &client).await;
        s.is_ok_and(|s| served_cert(&s) == v2.der)
    })
    .await;
    assert!(
        served.is_some(),
        "swapped certificate not served:\n{}",
        lb.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_accepts_a_good_client_and_rejects_others() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("mtls");
    let server = pki.issue("server", &["localhost"]);
    let clients_ca = Pki::new("clients");
    let extra = format!("client_ca = \"{}\"\n", clients_ca.ca_path.display());
    let lb = start(&[&a], &[&server], &extra);
    let year = time::OffsetDateTime::now_utc() + time::Duration::days(365);

    let good = clients_ca.make_leaf(&["client.example"], year);
    let s = connect(
        lb.addr("web"),
        Some("localhost"),
        &pki.client_with_cert(&good),
    )
    .await
    .expect("handshake with a good client certificate");
    assert_eq!(
        get_h1(s, "localhost", "/").await.expect("request").body,
        "a"
    );

    // No certificate, and one from another CA: no request gets through. (With TLS 1.3 the
    // client learns it was refused on its first read, so check the request, not the
    // handshake.)
    let stranger = pki.make_leaf(&["client.example"], year);
    let without = pki.client(&["http/1.1"]);
    let with_other = pki.client_with_cert(&stranger);
    for (what, client) in [("no certificate", &without), ("another CA", &with_other)] {
        let refused = match connect(lb.addr("web"), Some("localhost"), client).await {
            Err(_) => true,
            Ok(s) => get_h1(s, "localhost", "/").await.is_err(),
        };
        assert!(refused, "{what}: request got through");
    }
    assert_eq!(a.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_are_closed_and_touch_no_backend() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("hostile");
    let cert = pki.issue("c", &["localhost"]);
    let lb = start(&[&a], &[&cert], "strict_sni = true\n");
    drop(lb);
    // Short head timeout so the stalled handshake is cut quickly.
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .admin()
            .listener("request_header_timeout = \"500ms\"")
            .listener(&tls_listener(&[&cert], "strict_sni = true\n"))
            .build(),
    );
    let addr = lb.addr("web");
    let closed = |mut s: TcpStream| async move {
        let mut buf = [0u8; 512];
        // Whatever the server answers (an alert at most), the connection ends.
        let mut total = 0;
        loop {
            match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => {
                    total += n;
                    assert!(total < 4096, "server kept talking");
                }
                Err(_) => return false,
            }
        }
    };
    // Plain HTTP to the TLS port.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(s).await, "plain HTTP not closed");
    // Garbage where a ClientHello should be.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0x10, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
    ])
    .await
    .unwrap();
    assert!(closed(s).await, "garbage ClientHello not closed");
    // A truncated ClientHello, then silence: cut by request_header_timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .await
    .unwrap();
    let started = std::time::Instant::now();
    assert!(closed(s).await, "stalled handshake not cut");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut too late: {:?}",
        started.elapsed()
    );
    let cut = support::eventually(WAIT, async || {
        lb.lines()
            .iter()
            .any(|l| l.contains("TLS handshake") && l.contains("request_header_timeout"))
    })
    .await;
    assert!(cut.is_some(), "{}", lb.logs());
    // strict_sni: an unknown name, and no name at all, are refused.
    let client = support::tls::any_name(&pki);
    assert!(connect(addr, Some("unknown.example"), &client)
        .await
        .is_err());
    assert!(connect(addr, None, &client).await.is_err());
    // A known name still works, and no backend saw any of the above.
    let s = connect(addr, Some("localhost"), &pki.client(&[]))
        .await
        .expect("handshake");
    assert_eq!(
        get_h1(s, "localhost", "/").await.expect("request").status,
        200
    );
    assert_eq!(a.hits(), 1);
    assert_eq!(
        support::backend_state(lb.admin(), "app", a.addr).await,
        "healthy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_listener_can_redirect_everything_to_https() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener("redirect_https = true\nredirect_https_port = 8443")
            .build(),
    );
    let r = support::get_with(
        lb.addr("web"),
        "/some/path?q=1",
        &[("host", "shop.example:8080")],
    )
    .await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some("https://shop.example:8443/some/path?q=1")
    );
    assert_eq!(a.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echo_works_over_tls() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("ws");
    let cert = pki.issue("c", &["localhost"]);
    let lb = start(&[&a], &[&cert], "");
    let mut s = connect(
        lb.addr("web"),
        Some("localhost"),
        &pki.client(&["http/1.1"]),
    )
    .await
    .expect("handshake");
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"hello over tls"[..], &[0u8, 1, 2, 255][..]] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_certificate_loads_with_a_warning_in_the_log_and_status() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("expiry");
    let soon = pki.issue_until(
        "soon",
        &["localhost"],
        time::OffsetDateTime::now_utc() + time::Duration::days(5),
    );
    let lb = start(&[&a], &[&soon], "");
    assert!(lb.wait_for_log("expires in", WAIT), "{}", lb.logs());
    let (status, body) = support::admin_call(lb.admin(), "GET", "/status", None).await;
    assert_eq!(status, 200);
    let cert = &body["listeners"]["web"]["tls"]["certificates"][0];
    assert!(
        cert["warning"]
            .as_str()
            .is_some_and(|w| w.contains("expires in")),
        "{body}"
    );
    assert!(
        cert["days_left"]
            .as_i64()
            .is_some_and(|d| (3..=5).contains(&d)),
        "{body}"
    );
    // It serves all the same.
    let s = connect(lb.addr("web"), Some("localhost"), &pki.client(&[]))
        .await
        .expect("handshake");
    assert_eq!(
        get_h1(s, "localhost", "/").await.expect("request").status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_tls_are_verified_against_the_pool_ca() {
    let pki = Pki::new("backend");
    let leaf = pki.issue("backend", &["backend.internal"]);
    let backend = support::tls::backend(&leaf, "127.0.0.1:0").await;
    let config = |tls: &str| {
        TestConfig::addresses([backend])
            .admin()
            .pool(&format!("retries = 0\n[pools.app.tls]\n{tls}"))
            .build()
    };
    // The right CA and name: verified, and the name is sent as SNI.
    let ok = format!(
        "ca = \"{}\"\nsni = \"backend.internal\"",
        pki.ca_path.display()
    );
    let lb = Ballast::start(&config(&ok));
    let r = support::get(lb.addr("web"), "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "tls-backend sni=backend.internal")
    );
    drop(lb);
    // Another CA: the handshake fails, 502, blamed on the backend.
    let other = Pki::new("other");
    let wrong = format!(
        "ca = \"{}\"\nsni = \"backend.internal\"",
        other.ca_path.display()
    );
    let lb = Ballast::start(&config(&wrong));
    assert_eq!(support::get(lb.addr("web"), "/").await.status, 502);
    assert!(lb.wait_for_log("reason=tls_failed", WAIT), "{}", lb.logs());
    drop(lb);
    // A name the certificate does not carry: refused too.
    let wrong_name = format!(
        "ca = \"{}\"\nsni = \"other.internal\"",
        pki.ca_path.display()
    );
    let lb = Ballast::start(&config(&wrong_name));
    assert_eq!(support::get(lb.addr("web"), "/").await.status, 502);
    drop(lb);
    // insecure_skip_verify: works with any certificate, and says so loudly at load.
    let lb = Ballast::start(&config("insecure_skip_verify = true"));
    assert_eq!(support::get(lb.addr("web"), "/").await.status, 200);
    assert!(lb.logs().contains("NOT verified"), "{}", lb.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_and_their_failures_are_counted_in_metrics() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("metrics");
    let leaf = pki.issue("leaf", &["www.example.com"]);
    let lb = start(&[&a], &[&leaf], "");
    let client = pki.client(&["http/1.1"]);
    for _ in 0..2 {
        let s = connect(lb.addr("web"), Some("www.example.com"), &client)
            .await
            .expect("handshake");
        let r = get_h1(s, "www.example.com", "/").await.expect("request");
        assert_eq!(r.status, 200);
    }
    // Plain HTTP on the TLS port: not a ClientHello, the handshake fails.
    let mut plain = TcpStream::connect(lb.addr("web")).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut rest)).await;
    let counted = support::eventually(WAIT, async || {
        let page = support::get(lb.admin(), "/metrics").await.body;
        page.contains("ballast_listener_tls_handshakes_total{listener=\"web\"} 2")
            && page.contains("ballast_listener_tls_handshake_failures_total{listener=\"web\"} 1")
    })
    .await;
    assert!(
        counted.is_some(),
        "{}",
        support::get(lb.admin(), "/metrics").await.body
    );
}

/// Reads one response (head, then a `Content-Length` body) from `s`; `None` once closed.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(String, String)> {
    let head = read_head(s).await?;
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    Some((head, String::from_utf8_lossy(&body).to_string()))
}

/// HTTP/1.1 over TLS runs on ballast's own server: pipelined keep-alive requests are
/// answered in order, an idle connection is closed after `keepalive_timeout`, and a client
/// that sends part of a head gets 408 after `request_header_timeout` and reaches no backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_pipelining_and_both_timers_hold_over_tls() {
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("timers");
    let cert = pki.issue("c", &["localhost"]);
    let keepalive = Duration::from_millis(300);
    let head_timeout = Duration::from_millis(400);
    let lb = Ballast::start(
        &TestConfig::new(&[&a])
            .listener(&format!(
                "keepalive_timeout = \"300ms\"\nrequest_header_timeout = \"400ms\"\n{}",
                tls_listener(&[&cert], "")
            ))
            .build(),
    );
    let client = pki.client(&["http/1.1"]);

    let mut s = connect(lb.addr("web"), Some("localhost"), &client)
        .await
        .expect("handshake");
    let req = "GET /one HTTP/1.1\r\nHost: localhost\r\n\r\n";
    s.write_all(format!("{req}{req}").as_bytes()).await.unwrap();
    for _ in 0..2 {
        let (head, body) = read_response(&mut s).await.expect("a response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "a");
    }
    // A third request on the same connection, after the pipelined pair.
    s.write_all(req.as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s).await.expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(a.hits(), 3);
    // Then idle: closed by the server once keepalive_timeout has passed, not before.
    let idle_from = std::time::Instant::now();
    assert!(
        read_response(&mut s).await.is_none(),
        "no response expected"
    );
    let waited = idle_from.elapsed();
    assert!(
        waited >= keepalive - Duration::from_millis(100),
        "closed after {waited:?}, before keepalive_timeout"
    );

    // Part of a head, then nothing: 408 once request_header_timeout has passed.
    let mut slow = connect(lb.addr("web"), Some("localhost"), &client)
        .await
        .expect("handshake");
    let sent_at = std::time::Instant::now();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    let (head, _) = read_response(&mut slow).await.expect("a 408");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    // The timer runs from the connection's start, a little before the bytes were sent.
    let waited = sent_at.elapsed();
    assert!(
        waited >= head_timeout - Duration::from_millis(200),
        "408 after {waited:?}"
    );
    assert!(
        read_response(&mut slow).await.is_none(),
        "closed after the 408"
    );
    assert_eq!(a.hits(), 3, "the partial head reached a backend");
}

/// What `hey` reports: (status, count) pairs and its error lines.
type HeyReport = (Vec<(u16, usize)>, Vec<String>);

/// Runs Debian's `hey` (Go's net/http) with `args`; `None` if it could not run.
fn hey(args: &[&str]) -> Option<HeyReport> {
    let out = std::process::Command::new("hey")
        .args(["-n", "300", "-c", "10", "-t", "10"])
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let section = |title: &str| -> Vec<String> {
        text.split_once(title)
            .map(|(_, rest)| {
                rest.lines()
                    .skip(1)
                    .take_while(|l| l.starts_with("  ["))
                    .map(|l| l.trim().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let statuses = section("Status code distribution:")
        .iter()
        .filter_map(|l| {
            let (code, rest) = l.trim_start_matches('[').split_once(']')?;
            let n = rest.split_whitespace().next()?.parse().ok()?;
            Some((code.parse().ok()?, n))
        })
        .collect();
    Some((statuses, section("Error distribution:")))
}

/// Go's `hey` sends its URL's host and port as the server name. rustls refuses that
/// (README, "Known limit"; the issue note says why no route around it was taken): every
/// handshake gets illegal_parameter, ballast keeps serving, and the log stays at a line a
/// second. Given a host name (`-host`), the same load is served in full, over HTTP/2 and
/// HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hey_with_a_host_port_server_name_is_refused_cleanly_and_served_with_a_name() {
    if std::process::Command::new("hey")
        .arg("-h")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: hey is not installed (.ci/run installs Debian's hey)");
        return;
    }
    let [a] = start_backends(["a"]).await;
    let pki = Pki::new("hey");
    let cert = pki.issue("c", &["localhost"]);
    let lb = start(&[&a], &[&cert], "");
    let url = format!("https://127.0.0.1:{}/", lb.addr("web").port());
    let started = std::time::Instant::now();
    let (statuses, errors) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || hey(&["-h2", &url])
    })
    .await
    .unwrap()
    .expect("run hey");
    let secs = started.elapsed().as_secs() + 1;
    // All refused, and refused for this reason only (or, once rustls serves such names,
    // all served: then this test says so and the README's limit can go).
    let served: usize = statuses
        .iter()
        .filter(|(c, _)| *c == 200)
        .map(|(_, n)| n)
        .sum();
    if served == 300 {
        eprintln!("NOTE: rustls now serves a host:port server name; drop README's known limit");
    } else {
        assert_eq!(served, 0, "{statuses:?} {errors:?}");
        assert!(
            !errors.is_empty() && errors.iter().all(|e| e.contains("illegal parameter")),
            "{errors:?}"
        );
        let lines = lb.lines();
        let rustls = lines.iter().filter(|l| l.contains("Illegal SNI")).count() as u64;
        let ours = lines
            .iter()
            .filter(|l| l.contains("reason=invalid_sni"))
            .count() as u64;
        assert!(
            rustls <= secs + 1 && ours <= secs + 1,
            "{rustls} and {ours} lines in {secs}s"
        );
    }
    for args in [
        vec!["-h2", "-host", "localhost"],
        vec!["-host", "localhost"],
    ] {
        let url = url.clone();
        let (statuses, errors) = tokio::task::spawn_blocking(move || {
            let mut args = args.clone();
            args.push(&url);
            hey(&args)
        })
        .await
        .unwrap()
        .expect("run hey");
        assert_eq!(statuses, vec![(200, 300)], "{errors:?}");
    }
}
