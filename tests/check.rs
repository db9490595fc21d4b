//! `ballast --check`: exit codes and `FILE:LINE:COLUMN: message` errors for bad configs.

mod support;

use std::process::Command;

const BASE: &str = "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\n\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n";

/// Runs `--check` on `text`; returns (exit code, stdout, stderr with the temp path replaced
/// by `F`).
fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(support::ballast_bin())
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .output()
        .unwrap();
    let p = path.display().to_string();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).replace(&p, "F"),
        String::from_utf8_lossy(&out.stderr).replace(&p, "F"),
    )
}

fn assert_error(text: &str, expected: &[&str]) {
    let (code, _, err) = check(text);
    assert_eq!(code, 1, "invalid config must exit 1; stderr:\n{err}");
    for e in expected {
        assert!(err.contains(e), "expected {e:?} in:\n{err}");
    }
    assert_eq!(
        err.lines().count(),
        expected.len(),
        "one line per error:\n{err}"
    );
}

#[test]
fn a_valid_config_passes_with_a_summary() {
    let (code, out, err) = check(BASE);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "F: ok: 1 listener(s), 1 pool(s), 1 backend(s)\n");
}

#[test]
fn the_commented_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/ballast.toml");
    let out = Command::new(support::ballast_bin())
        .args(["--config", path, "--check"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn unknown_key() {
    assert_error(
        &format!("{BASE}bakends = []\n"),
        &["F:7:1: unknown field `bakends`"],
    );
}

#[test]
fn wrong_type() {
    assert_error(
        &format!("{BASE}retries = \"two\"\n"),
        &["F:7:11: invalid type: string \"two\", expected u32"],
    );
}

#[test]
fn toml_syntax_error() {
    assert_error(
        "[listeners.web]\nbind = \"127.0.0.1:8080\npool = \"app\"\n",
        &["F:2:"],
    );
}

#[test]
fn unknown_pool_in_listener_and_route() {
    let text = "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"ap\"\n[[listeners.web.routes]]\nhost = \"a.example.com\"\npool = \"nope\"\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_error(
        text,
        &[
            "F:3:8: listeners.web.pool: unknown pool \"ap\"",
            "F:6:8: listeners.web.routes[0].pool: unknown pool \"nope\"",
        ],
    );
}

#[test]
fn duplicate_bind_address() {
    let text = format!("{BASE}[listeners.other]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\n");
    assert_error(
        &text,
        &["F:2:8: listeners.web.bind: address 127.0.0.1:8080 is already used by other"],
    );
}

#[test]
fn bad_duration() {
    assert_error(
        &format!("{BASE}connect_timeout = \"3 parsecs\"\n"),
        &["F:7:19: pools.app.connect_timeout: invalid duration \"3 parsecs\""],
    );
    assert_error(
        &format!("{BASE}idle_timeout = \"0s\"\n"),
        &["F:7:16: pools.app.idle_timeout: duration must be greater than zero"],
    );
    assert_error(
        &format!("{BASE}drain_timeout = \"500000000y\"\n"),
        &["F:7:17: pools.app.drain_timeout: duration must be at most 30 days"],
    );
}

#[test]
fn empty_pool() {
    let text = BASE.replace("[\"127.0.0.1:9001\"]", "[]");
    assert_error(
        &text,
        &["F:6:12: pools.app.backends: a pool needs at least one backend"],
    );
}

#[test]
fn bad_weight_and_bad_backend_address_and_duplicate() {
    let text = BASE.replace(
        "[\"127.0.0.1:9001\"]",
        "[{ address = \"127.0.0.1:9001\", weight = 0 },\n  \"app\",\n  \"127.0.0.1:9002\", \"127.0.0.1:9002\"]",
    );
    assert_error(
        &text,
        &[
            "F:6:13: pools.app.backends[0].weight: must be between 1 and 1000",
            "F:7:3: pools.app.backends[1]: invalid backend address \"app\": no port; expected IP:PORT or HOST:PORT",
            "F:8:21: pools.app.backends[3]: duplicate backend 127.0.0.1:9002",
        ],
    );
}

#[test]
fn unknown_algorithm() {
    assert_error(&format!("{BASE}algorithm = \"fastest\"\n"), &["F:7:13: unknown variant `fastest`, expected one of `round_robin`, `least_conn`, `random`, `hash`"]);
}

#[test]
fn hash_needs_a_valid_key() {
    assert_error(
        &format!("{BASE}algorithm = \"hash\"\n"),
        &["F:5:8: pools.app: algorithm \"hash\" needs hash_key"],
    );
    assert_error(
        &format!("{BASE}algorithm = \"hash\"\nhash_key = \"header:\"\n"),
        &["F:8:12: pools.app.hash_key: invalid \"header:\""],
    );
    assert_error(
        &format!("{BASE}hash_key = \"path\"\n"),
        &["F:7:12: pools.app.hash_key: only used with algorithm = \"hash\""],
    );
}

#[test]
fn health_check_thresholds_and_status() {
    let text = format!("{BASE}[pools.app.health_check]\nkind = \"http\"\nrise = 0\nexpect_status = \"200-99\"\npath = \"health\"\n");
    assert_error(
        &text,
        &[
            "F:9:8: pools.app.health_check.rise: must be at least 1",
            "F:10:17: pools.app.health_check.expect_status: invalid \"200-99\"",
            "F:11:8: pools.app.health_check.path: must start with '/'",
        ],
    );
}

#[test]
fn admin_on_a_public_address_needs_a_token() {
    let text = format!("[admin]\nbind = \"0.0.0.0:9000\"\n{BASE}");
    assert_error(
        &text,
        &["F:2:8: admin.bind: 0.0.0.0:9000 is not a loopback address, so admin.token is required"],
    );
}

#[test]
fn listener_limits_and_routes() {
    let text = format!(
        "{BASE}[listeners.web2]\nbind = \"[::1]:8081\"\npool = \"app\"\nmax_header_size = 100\nmax_connections = 0\n[[listeners.web2.routes]]\nhost = \"*bad.com\"\npath_prefix = \"api\"\npool = \"app\"\n"
    );
    assert_error(
        &text,
        &[
            "F:10:19: listeners.web2.max_header_size: must be at least 8192 bytes",
            "F:11:19: listeners.web2.max_connections: must be at least 1",
            "F:13:8: listeners.web2.routes[0].host: invalid host \"*bad.com\"",
            "F:14:15: listeners.web2.routes[0].path_prefix: must start with '/'",
        ],
    );
}

#[test]
fn missing_file_is_an_error() {
    let out = Command::new(support::ballast_bin())
        .args(["--config", "/nonexistent/ballast.toml", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/ballast.toml:0:0: cannot read file"));
}

#[test]
fn hardening_keys_are_checked() {
    let text = format!(
        "{BASE}request_buffering = \"64 parsecs\"\n[listeners.web2]\nbind = \"127.0.0.1:8081\"\npool = \"app\"\nrequest_buffering = \"1GiB\"\nresponse_buffer = 100\nmax_request_body = 0\nkeepalive_timeout = \"0s\"\nupgrade = [\"web socket\"]\nmax_connections_per_client = 0\n[[listeners.web2.routes]]\npool = \"app\"\nupgrade = [\"\"]\n"
    );
    assert_error(
        &text,
        &[
            "F:7:21: pools.app.request_buffering: invalid size: unknown unit \"parsecs\"",
            "F:11:21: listeners.web2.request_buffering: must be between 1 and 67108864 bytes (or 0)",
            "F:12:19: listeners.web2.response_buffer: must be between 8192 and 16777216 bytes",
            "F:13:20: listeners.web2.max_request_body: must be between 1 and",
            "F:14:21: listeners.web2.keepalive_timeout: duration must be greater than zero",
            "F:15:12: listeners.web2.upgrade: invalid protocol \"web socket\"",
            "F:16:30: listeners.web2.max_connections_per_client: must be at least 1",
            "F:19:12: listeners.web2.routes[0].upgrade: invalid protocol \"\"",
        ],
    );
    // And the good spellings pass.
    let good = format!(
        "{BASE}request_buffering = 0\n[listeners.web2]\nbind = \"127.0.0.1:8081\"\npool = \"app\"\nrequest_buffering = \"1 MiB\"\nresponse_buffer = \"16k\"\nmax_request_body = \"10MB\"\nkeepalive_timeout = \"75s\"\nrequest_body_timeout = \"1m\"\nupgrade = [\"websocket\", \"h2c\"]\nallow_connect = true\nmax_connections_per_client = 50\n"
    );
    let (code, out, err) = check(&good);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn tls_files_are_checked_and_errors_point_at_their_key() {
    let pki = support::tls::Pki::new("check");
    let good = pki.issue("good", &["localhost"]);
    let other = pki.issue("other", &["localhost"]);
    let year = time::OffsetDateTime::now_utc() + time::Duration::days(365);
    let nosan = pki.make_leaf(&[], year);
    let dir = pki.dir.path();
    std::fs::write(dir.join("nosan.pem"), &nosan.cert_pem).unwrap();
    std::fs::write(dir.join("nosan.key"), &nosan.key_pem).unwrap();
    std::fs::write(dir.join("garbage.pem"), "hello\n").unwrap();
    let d = dir.display();
    let text = format!(
        "[listeners.web]\nbind = \"127.0.0.1:8443\"\npool = \"app\"\n[listeners.web.tls]\ncertificates = [\n  {{ cert = \"{d}/missing.pem\", key = \"{k}\" }},\n  {{ cert = \"{d}/garbage.pem\", key = \"{k}\" }},\n  {{ cert = \"{c}\", key = \"{ok}\" }},\n  {{ cert = \"{d}/nosan.pem\", key = \"{d}/nosan.key\" }},\n]\nmin_version = \"1.1\"\nalpn = [\"h3\"]\nclient_ca = \"{d}/garbage.pem\"\n\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n",
        k = good.key.display(),
        c = good.cert.display(),
        ok = other.key.display(),
    );
    let (code, _, err) = check(&text);
    assert_eq!(code, 1, "{err}");
    let expect = [
        (
            "F:6:12: listeners.web.tls.certificates[0]: cannot read",
            "missing.pem",
        ),
        (
            "F:7:12: listeners.web.tls.certificates[1]:",
            "no PEM certificate",
        ),
        // The mismatched key is blamed on the key, at its own column.
        ("listeners.web.tls.certificates[2]:", "does not match"),
        (
            "F:9:12: listeners.web.tls.certificates[3]:",
            "no DNS names in subjectAltName",
        ),
        (
            "F:11:15: listeners.web.tls.min_version: \"1.1\" is not allowed",
            "",
        ),
        (
            "F:12:9: listeners.web.tls.alpn: unknown protocol \"h3\"",
            "",
        ),
        (
            "F:13:13: listeners.web.tls.client_ca:",
            "no PEM certificate",
        ),
    ];
    for (at, what) in expect {
        assert!(
            err.lines().any(|l| l.contains(at) && l.contains(what)),
            "expected {at:?} … {what:?} in:\n{err}"
        );
    }
    let key_line = err.lines().find(|l| l.contains("does not match")).unwrap();
    let col = 12 + good.cert.display().to_string().len() + 2 + 8;
    assert!(
        key_line.contains(&format!("F:8:{col}:")),
        "{key_line} (want column {col})"
    );
    assert_eq!(err.lines().count(), expect.len(), "{err}");
}

#[test]
fn an_expiring_certificate_passes_the_check_with_a_warning() {
    let pki = support::tls::Pki::new("check");
    let soon = pki.issue_until(
        "soon",
        &["localhost"],
        time::OffsetDateTime::now_utc() + time::Duration::days(3),
    );
    let text = format!(
        "[listeners.web]\nbind = \"127.0.0.1:8443\"\npool = \"app\"\n[listeners.web.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n",
        soon.cert.display(),
        soon.key.display()
    );
    let (code, out, err) = check(&text);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
    assert!(
        err.contains("warning") && err.contains("expires in"),
        "{err}"
    );
}
