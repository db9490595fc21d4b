//! `ballast --check`: exit codes and `FILE:LINE:COLUMN: message` errors for bad configs.

mod support;

use std::process::Command;

const BASE: &str = "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\n\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n";

/// Runs `--check` on `text`; returns (exit code, stdout, stderr with the temp path replaced
/// by `F`).
fn check(text: &str) -> (i32, String, String) {
    check_env(text, &[])
}

/// `check` with environment variables set for the run.
fn check_env(text: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(support::ballast_bin())
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .envs(env.iter().copied())
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

/// `ballast --config path --check` passes, for a config shipped in the repository.
fn assert_shipped_config_checks(path: &str) {
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
fn the_commented_example_config_is_valid() {
    assert_shipped_config_checks(concat!(env!("CARGO_MANIFEST_DIR"), "/config/ballast.toml"));
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
fn backend_tables_take_every_documented_key_and_their_errors_point_inside() {
    // The form config/ballast.toml documents (it never parsed: "did not match any variant").
    let text = BASE.replace(
        "[\"127.0.0.1:9001\"]",
        "[\"127.0.0.1:9001\", { address = \"127.0.0.1:9004\", backup = true, max_connections = 50, weight = 2 }]",
    );
    let (code, out, err) = check(&text);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 backend(s)"), "{out}");
    assert_error(
        &BASE.replace(
            "[\"127.0.0.1:9001\"]",
            "[{ adress = \"127.0.0.1:9001\" }]",
        ),
        &["F:6:15: unknown field `adress`, expected one of `address`, `weight`, `backup`, `max_connections`"],
    );
    assert_error(
        &BASE.replace(
            "[\"127.0.0.1:9001\"]",
            "[{ address = \"127.0.0.1:9001\", weight = \"3\" }]",
        ),
        &["F:6:52: invalid type: string \"3\", expected i64"],
    );
    assert_error(
        &BASE.replace("[\"127.0.0.1:9001\"]", "[9001]"),
        &["F:6:13: invalid type: integer `9001`, expected an address string or a table"],
    );
    assert_error(
        "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\nrequest_buffering = true\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n",
        &["F:4:21: invalid type: boolean `true`, expected a size: a number of bytes or a string such as \"64KiB\""],
    );
}

#[test]
fn environment_variables_fill_string_values_and_check_names_them() {
    let text = "[admin]\nbind = \"127.0.0.1:${env:BALLAST_T_ADMIN_PORT:-9000}\"\ntoken = \"${env:BALLAST_T_TOKEN}\"\n[listeners.web]\nbind = \"${env:BALLAST_T_BIND}\"\npool = \"app\"\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n";
    let env = [
        ("BALLAST_T_BIND", "127.0.0.1:8080"),
        ("BALLAST_T_TOKEN", "s3cret-value"),
    ];
    let (code, out, err) = check_env(text, &env);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "F: environment variables read: BALLAST_T_ADMIN_PORT, BALLAST_T_BIND, BALLAST_T_TOKEN"
        ),
        "{out}"
    );
    assert!(
        !out.contains("s3cret") && !err.contains("s3cret"),
        "values never printed:\n{out}{err}"
    );

    // A missing variable without a default: an error at its string.
    let (code, _, err) = check_env(text, &env[..1]);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "F:3:9: admin.token: environment variable BALLAST_T_TOKEN is not set (write ${env:BALLAST_T_TOKEN:-default} to give a default)"
    );
    // The value goes through the same checks as a written one.
    let (code, _, err) = check_env(text, &[("BALLAST_T_BIND", "nowhere"), env[1]]);
    assert_eq!(code, 1);
    assert!(err.starts_with("F:5:8: listeners.web.bind: "), "{err}");
    // $${ is a literal ${: not a variable, not an error.
    let literal = text.replace("${env:BALLAST_T_TOKEN}", "$${env:BALLAST_T_TOKEN}");
    let (code, out, err) = check_env(&literal, &env[..1]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("BALLAST_T_TOKEN"), "{out}");
    assert_error(
        &format!("{BASE}retry_backoff = \"${{env:BALLAST_T_NO_SUCH\"\n"),
        &["F:7:17: pools.app.retry_backoff: \"${env:\" without a closing \"}\""],
    );
}

#[test]
fn a_token_file_is_read_and_named_but_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("admin-token");
    std::fs::write(&secret, "file-token-value\n").unwrap();
    let text = format!(
        "[admin]\nbind = \"0.0.0.0:9000\"\ntoken_file = \"{}\"\n{BASE}",
        secret.display()
    );
    let (code, out, err) = check(&text);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("files read: {}", secret.display())),
        "{out}"
    );
    assert!(!out.contains("file-token-value"), "{out}");
    let missing = text.replace("admin-token", "nope");
    let (code, _, err) = check(&missing);
    assert_eq!(code, 1);
    assert!(
        err.contains("F:3:14: admin.token_file: cannot read"),
        "{err}"
    );
    std::fs::write(&secret, "\n").unwrap();
    let (code, _, err) = check(&text);
    assert_eq!(code, 1);
    assert!(
        err.contains("F:3:14: admin.token_file:") && err.contains("is empty"),
        "{err}"
    );
    let both = text.replace("token_file", "token = \"x\"\ntoken_file");
    let (code, _, err) = check(&both);
    assert_eq!(code, 1);
    assert!(
        err.contains("set admin.token or admin.token_file, not both"),
        "{err}"
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
        &["F:2:8: admin.bind: 0.0.0.0:9000 is not a loopback address, so admin.token (or admin.token_file) is required"],
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
fn route_matchers_are_checked_where_they_stand() {
    let text = format!(
        "{BASE}[[listeners.web.routes]]\npath = \"robots.txt\"\npath_regex = \"^/users/(\"\nmethods = [\"get\", \"B@D\"]\npool = \"app\"\n[[listeners.web.routes]]\npath = \"/a\"\npath_prefix = \"/a\"\nmethods = []\npool = \"app\"\n"
    );
    assert_error(
        &text,
        &[
            "F:8:8: listeners.web.routes[0].path: must start with '/'",
            "F:9:14: listeners.web.routes[0].path_regex: invalid regular expression: unclosed group",
            "F:10:12: listeners.web.routes[0].methods: \"get\": methods are case-sensitive; write \"GET\"",
            "F:10:19: listeners.web.routes[0].methods: invalid method \"B@D\"",
            "F:13:8: listeners.web.routes[1]: path and path_prefix: choose one",
            "F:15:11: listeners.web.routes[1].methods: list at least one method, or leave the key out",
        ],
    );
}

#[test]
fn header_and_query_matchers_are_checked_where_they_stand() {
    let text = format!(
        "{BASE}[[listeners.web.routes]]\nheaders = {{ \"Bad Name\" = \"1\", \"X-A\" = {{ regex = \"(\" }} }}\nquery = {{ v = {{ regex = \"[z-a]\" }} }}\npool = \"app\"\n"
    );
    assert_error(
        &text,
        &[
            "F:8:13: listeners.web.routes[0].headers.Bad Name: not a header name",
            "F:8:39: listeners.web.routes[0].headers.X-A: invalid regular expression: unclosed group",
            "F:9:15: listeners.web.routes[0].query.v: invalid regular expression: invalid character class range",
        ],
    );
    // A value of another type is named with what is accepted.
    let text = format!("{BASE}[[listeners.web.routes]]\nquery = {{ v = 3 }}\npool = \"app\"\n");
    let (code, _, err) = check(&text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("F:8:15:")
            && err.contains("true (present), false (absent) or { regex = \"...\" }"),
        "{err}"
    );
}

#[test]
fn redirect_and_respond_routes_are_checked_where_they_stand() {
    let text = format!(
        "{BASE}[[listeners.web.routes]]
redirect = {{ to = \"https://${{hots}}/\", status = 200 }}
[[listeners.web.routes]]
respond = {{ status = 99, headers = {{ \"Content-Length\" = \"3\", \"X-A\" = \"a\\u0001\" }} }}
[[listeners.web.routes]]
path = \"/x\"
[[listeners.web.routes]]
pool = \"app\"
respond = {{ status = 204 }}
[[listeners.web.routes]]
redirect = {{ to = \"a b\" }}
rewrite_prefix = \"/\"
[[listeners.web.routes]]
respond = {{ status = 204, body = \"x\", content_type = \"text/html\", headers = {{ \"content-type\" = \"x\" }} }}
"
    );
    assert_error(
        &text,
        &[
            "F:8:19: listeners.web.routes[0].redirect.to: \"https://${hots}/\": unknown variable \"hots\" (host, path, query, request_uri; write $${ for a literal ${)",
            "F:8:48: listeners.web.routes[0].redirect.status: 200 is not a redirect; use 301, 302, 303, 307 or 308",
            "F:10:22: listeners.web.routes[1].respond.status: 99 is not a final status; use 200 to 599",
            "F:10:38: listeners.web.routes[1].respond.headers: content-length frames the message or is hop-by-hop",
            "F:10:70: listeners.web.routes[1].respond.headers.X-A: not a valid field value",
            "F:11:1: listeners.web.routes[2]: say what the route does: pool = \"...\", redirect = { to = \"...\" } or respond = { status = ... }",
            "F:13:1: listeners.web.routes[3]: pool, redirect and respond: choose one",
            "F:17:19: listeners.web.routes[4].redirect.to: \"a b\": a URL has no spaces, control or non-ASCII characters",
            "F:18:18: listeners.web.routes[4]: strip_prefix and rewrite_prefix need a path_prefix",
            "F:18:18: listeners.web.routes[4].rewrite_prefix: only for a route with a pool; this one answers by itself",
            "F:20:22: listeners.web.routes[5].respond: a 204 response has no body; remove body",
            "F:20:79: listeners.web.routes[5].respond.headers: set Content-Type with content_type",
        ],
    );
}

#[test]
fn address_ranges_and_sni_are_checked_where_they_stand() {
    let text = "[listeners.web]
bind = \"127.0.0.1:8080\"
pool = \"app\"
allow_from = [\"10.0.0.0/8\", \"1.2.3.4/40\"]
deny_from = []
accept_proxy = [\"::1/129\"]
routes = [
  { client_cidrs = [\"10.0.0.0/33\", \"::1\"], sni = \"api.example.com\", pool = \"app\" },
  { allow_from = [], deny_from = [\"x\", \"2001:db8::/32\"], pool = \"app\" },
]

[pools.app]
backends = [\"127.0.0.1:9001\"]
";
    assert_error(
        text,
        &[
            "F:4:29: listeners.web.allow_from: invalid range \"1.2.3.4/40\": write e.g. \"10.0.0.0/8\", \"2001:db8::/32\" or \"127.0.0.1\"",
            "F:5:13: listeners.web.deny_from: list at least one range, or remove the key",
            "F:6:17: listeners.web.accept_proxy: invalid range \"::1/129\"",
            "F:8:21: listeners.web.routes[0].client_cidrs: invalid range \"10.0.0.0/33\"",
            "F:8:50: listeners.web.routes[0].sni: only on a listener with tls (a plain client sends no SNI)",
            "F:9:18: listeners.web.routes[1].allow_from: list at least one range, or remove the key",
            "F:9:35: listeners.web.routes[1].deny_from: invalid range \"x\"",
        ],
    );
    // trusted_proxies: a list of ranges like the others, and for HTTP listeners only.
    let text = "[listeners.web]
bind = \"127.0.0.1:8080\"
pool = \"app\"
trusted_proxies = [\"10.0.0.0/8\", \"proxy.internal\"]

[listeners.db]
bind = \"127.0.0.1:5432\"
pool = \"app\"
mode = \"tcp\"
trusted_proxies = [\"10.0.0.0/8\"]

[pools.app]
backends = [\"127.0.0.1:9001\"]
";
    assert_error(
        text,
        &[
            "F:4:34: listeners.web.trusted_proxies: invalid range \"proxy.internal\"",
            "F:6:12: listeners.db.trusted_proxies: only used with mode = \"http\" (this listener is mode = \"tcp\")",
        ],
    );
    // The good spellings pass: both families, bare addresses, host bits below the prefix.
    let good = "[listeners.web]
bind = \"127.0.0.1:8080\"
pool = \"app\"
allow_from = [\"10.0.0.0/8\", \"192.168.1.7\", \"2001:db8::/32\", \"::1\"]
deny_from = [\"10.6.6.6/24\"]
routes = [{ client_cidrs = [\"fd00::/8\"], allow_from = [\"10.0.0.0/8\"], pool = \"app\" }]

[pools.app]
backends = [\"127.0.0.1:9001\"]
";
    let (code, _, err) = check(good);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn sticky_is_checked_where_it_stands() {
    let text = format!("{BASE}sticky = {{ cookie = \"my cookie\", ttl = \"0s\" }}\n");
    assert_error(
        &text,
        &["F:7:21: pools.app.sticky.cookie: \"my cookie\" is not a cookie name"],
    );
    let text = format!("{BASE}sticky = {{ cookie = \"lb\", ttl = \"soon\" }}\n");
    assert_error(
        &text,
        &["F:7:33: pools.app.sticky.ttl: invalid duration \"soon\""],
    );
    let text = format!("{BASE}sticky = {{ cookie = \"lb\", max_age = 3 }}\n");
    let (code, _, err) = check(&text);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unknown field `max_age`"), "{err}");
}

#[test]
fn compress_is_checked_where_it_stands() {
    let text = "[listeners.web]
bind = \"127.0.0.1:8080\"
pool = \"app\"
compress = { types = [\"text\", \"application/json\"], min_size = \"1 parsec\", algorithms = [\"gzip\", \"deflate\", \"gzip\"] }
routes = [{ path = \"/x\", respond = { status = 204 }, compress = {} }]

[pools.app]
backends = [\"127.0.0.1:9001\"]
";
    assert_error(
        text,
        &[
            "F:4:23: listeners.web.compress.types: \"text\" is not a media type",
            "F:4:63: listeners.web.compress.min_size: invalid size",
            "F:4:97: listeners.web.compress.algorithms: unknown algorithm \"deflate\"",
            "F:4:108: listeners.web.compress.algorithms: \"gzip\" is listed twice",
            "F:5:65: listeners.web.routes[0].compress: only for a route with a pool",
        ],
    );
}

#[test]
fn basic_auth_users_files_are_checked_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = bcrypt::hash("pw", 4).unwrap();
    let cases = [
        (
            format!("a:{good}\nb:$apr1$x$y\n"),
            ":2: user \"b\": only bcrypt hashes are accepted",
        ),
        (
            format!("a:{good}\na:{good}\n"),
            ":2: user \"a\" is listed twice",
        ),
        ("# nobody\n".to_string(), ": no users"),
        (format!("{good}\n"), ":1: expected user:hash"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("htpasswd{i}"));
        std::fs::write(&path, text).unwrap();
        let config = format!(
            "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\nbasic_auth = {{ users_file = \"{}\" }}\n\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n",
            path.display()
        );
        let (code, _, err) = check(&config);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.starts_with("F:4:29: listeners.web.basic_auth.users_file: ")
                && err.contains(&format!("{}{want}", path.display())),
            "{i}: {err}"
        );
        assert!(!err.contains("$2"), "no hash in an error: {err}");
    }
    let (code, _, err) = check(&format!(
        "{BASE}[listeners.web.basic_auth]\nusers_file = \"/nonexistent/htpasswd\"\n"
    ));
    assert_eq!(code, 1);
    assert!(err.contains("cannot read /nonexistent/htpasswd"), "{err}");
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

/// One commented example of a reference config, and how to make it live.
#[derive(Debug)]
enum Example {
    /// `# key = value` (or a multi-line array) in a table that is live: uncommented in
    /// place, replacing the table's own line for that key, if any.
    Key {
        lines: Vec<usize>,
        keys: Vec<String>,
    },
    /// `# [table]` and the example lines under it: uncommented and moved to the end of the
    /// file (in place, a live key after the block would fall into the table).
    Table { lines: Vec<usize> },
    /// `# { address = ... }`: a backend entry, appended to the table's `backends`.
    Entry { line: usize },
}

/// The text of a commented line (`# ` stripped), if it is one.
fn commented(line: &str) -> Option<&str> {
    line.strip_prefix("# ")
}

/// `key = value` that is TOML on its own, or `key = [` opening a multi-line array. Prose
/// that happens to start with a key (`algorithm = "hash" only: ...`) does not parse.
fn key_of(text: &str) -> Option<(String, bool)> {
    let (key, value) = text.split_once(" = ")?;
    if !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') || key.is_empty() {
        return None;
    }
    if value == "[" {
        return Some((key.to_string(), true));
    }
    text.parse::<toml::Table>().ok()?;
    Some((key.to_string(), false))
}

/// Lines `from..` of a multi-line array, through its closing `# ]`.
fn array_lines(lines: &[&str], from: usize) -> Vec<usize> {
    let mut out = vec![from];
    for (j, l) in lines.iter().enumerate().skip(from + 1) {
        out.push(j);
        if commented(l).is_some_and(|t| t.trim() == "]") {
            break;
        }
    }
    out
}

fn examples(lines: &[&str]) -> Vec<Example> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(text) = commented(lines[i]) else {
            i += 1;
            continue;
        };
        let is_header = text.starts_with('[')
            && text.ends_with(']')
            && text[1..text.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.');
        if is_header {
            let mut block = vec![i];
            let mut j = i + 1;
            while let Some(t) = lines.get(j).and_then(|l| commented(l)) {
                match key_of(t) {
                    Some((_, true)) => {
                        let array = array_lines(lines, j);
                        j = *array.last().unwrap_or(&j);
                        block.extend(array);
                    }
                    Some(_) => block.push(j),
                    None => {}
                }
                j += 1;
            }
            found.push(Example::Table { lines: block });
            i = j;
        } else if key_of(text).is_some() {
            // Consecutive example lines form one example: keys that only work together
            // (retry_budget and retry_budget_min) are written together.
            let mut lines_of = Vec::new();
            let mut keys = Vec::new();
            while let Some((key, multi)) = lines.get(i).and_then(|l| commented(l)).and_then(key_of)
            {
                let these = if multi {
                    array_lines(lines, i)
                } else {
                    vec![i]
                };
                i = *these.last().unwrap_or(&i) + 1;
                lines_of.extend(these);
                keys.push(key);
            }
            found.push(Example::Key {
                lines: lines_of,
                keys,
            });
        } else if text.starts_with('{')
            && text.ends_with('}')
            && format!("x = {text}").parse::<toml::Table>().is_ok()
        {
            found.push(Example::Entry { line: i });
            i += 1;
        } else {
            i += 1;
        }
    }
    found
}

/// The live table section around line `at`: from its header to the next header.
fn section(lines: &[&str], at: usize) -> std::ops::Range<usize> {
    let header = |l: &&str| l.starts_with('[');
    let start = (0..=at).rev().find(|&j| header(&lines[j])).unwrap_or(0);
    let end = (at + 1..lines.len())
        .find(|&j| header(&lines[j]))
        .unwrap_or(lines.len());
    start..end
}

/// The reference config with `example` made live.
fn with_example(lines: &[&str], example: &Example) -> String {
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let uncomment = |out: &mut Vec<String>, j: usize| {
        out[j] = commented(lines[j]).unwrap_or(lines[j]).to_string();
    };
    match example {
        Example::Key { lines: ls, keys } => {
            let own = section(lines, ls[0]);
            for j in own {
                if keys
                    .iter()
                    .any(|k| lines[j].starts_with(&format!("{k} = ")))
                {
                    out[j] = String::new();
                }
            }
            for &j in ls {
                uncomment(&mut out, j);
            }
        }
        Example::Table { lines: ls } => {
            let mut moved = vec![String::new()];
            for &j in ls {
                moved.push(commented(lines[j]).unwrap_or(lines[j]).to_string());
                out[j] = String::new();
            }
            out.extend(moved);
        }
        Example::Entry { line } => {
            let entry = commented(lines[*line]).unwrap_or_default();
            let own = section(lines, *line);
            let at = own
                .clone()
                .find(|&j| lines[j].starts_with("backends = ["))
                .expect("a backend entry example sits in a pool with backends");
            let list = lines[at].trim_end();
            out[at] = format!("{}, {entry}]", &list[..list.len() - 1]);
        }
    }
    out.join("\n") + "\n"
}

/// Every commented example of `file` (a reference config shipped in the repository) is
/// made live, alone, and must pass `--check`: a reference whose examples do not parse is
/// a defect. File paths under /etc/ballast/ point at test certificates and secrets.
fn check_every_example(file: &str, min_examples: usize) {
    let text = std::fs::read_to_string(file).unwrap();
    let pki = support::tls::Pki::new("examples");
    pki.issue("example.com", &["example.com"]);
    pki.issue("wildcard.example.org", &["*.example.org"]);
    for ca in ["clients-ca.pem", "backend-ca.pem", "acme-ca.pem"] {
        std::fs::copy(&pki.ca_path, pki.dir.path().join(ca)).unwrap();
    }
    std::fs::write(pki.dir.path().join("admin-token"), "example-token\n").unwrap();
    let hash = bcrypt::hash("example", 4).unwrap();
    std::fs::write(pki.dir.path().join("htpasswd"), format!("alice:{hash}\n")).unwrap();
    std::fs::write(pki.dir.path().join("tickets.key"), [7u8; 80]).unwrap();
    let text = text.replace("/etc/ballast/", &format!("{}/", pki.dir.path().display()));
    let lines: Vec<&str> = text.lines().collect();
    let found = examples(&lines);
    assert!(
        found.len() >= min_examples,
        "{file}: found only {} examples: {found:?}",
        found.len()
    );
    eprintln!("{file}: {} examples: {found:?}", found.len());
    // Examples that only work beside another: a route's `sni` needs the listener's TLS.
    let tls = found.iter().find(
        |e| matches!(e, Example::Table { lines: ls } if lines[ls[0]].ends_with("[listeners.web.tls]")),
    );
    let mut failures = Vec::new();
    for example in &found {
        let needs_tls =
            matches!(example, Example::Key { keys, .. } if keys.iter().any(|k| k == "sni"));
        let candidate = match tls.filter(|_| needs_tls) {
            // The table moves to the end of the file: the lines above keep their places.
            Some(tls) => {
                let with_tls = with_example(&lines, tls);
                let with_tls: Vec<&str> = with_tls.lines().collect();
                with_example(&with_tls, example)
            }
            None => with_example(&lines, example),
        };
        // The variables the examples name, set as a user would.
        let (code, _, err) = check_env(&candidate, &[("BALLAST_ADMIN_TOKEN", "example-token")]);
        if code != 0 {
            failures.push(format!("{example:?}:\n{err}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{file}: {} of {} examples fail --check:\n{}",
        failures.len(),
        found.len(),
        failures.join("\n")
    );
}

#[test]
fn every_commented_example_of_the_reference_config_passes_check() {
    check_every_example(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/ballast.toml"),
        25,
    );
}

#[test]
fn access_log_formats_are_combined_json_and_the_old_name_common() {
    for format in ["combined", "json", "common"] {
        let (code, _, err) = check(&format!("[access_log]\nformat = \"{format}\"\n{BASE}"));
        assert_eq!(code, 0, "{format}: {err}");
    }
    assert_error(
        &format!("[access_log]\nformat = \"clf\"\n{BASE}"),
        &["F:2:10: access_log.format: expected \"json\" or \"combined\", got \"clf\""],
    );
}

#[test]
fn the_starter_config_that_readme_installs_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/starter.toml");
    assert_shipped_config_checks(path);
    // Its commented alternatives parse too.
    check_every_example(path, 0);
    // And README's install steps use it, not the annotated reference.
    let readme = include_str!("../README.md");
    assert!(readme.contains("install -m 644 config/starter.toml /etc/ballast/ballast.toml"));
    assert!(!readme.contains("config/ballast.toml /etc/ballast/ballast.toml"));
}

/// A README block completed into a whole config: listeners without a bind or pool get
/// one, pools a listener names and the block leaves out are added, pools without
/// backends get one. Everything the block itself says stays as written.
fn completed(block: &str) -> Result<String, String> {
    use toml::{Table, Value};
    let mut doc: Table = block.parse().map_err(|e| format!("not TOML: {e}"))?;
    let mut listeners = match doc.remove("listeners") {
        Some(Value::Table(t)) => t,
        _ => Table::new(),
    };
    if listeners.is_empty() {
        listeners.insert("web".into(), Value::Table(Table::new()));
    }
    let mut pools = match doc.remove("pools") {
        Some(Value::Table(t)) => t,
        _ => Table::new(),
    };
    for (i, (_, l)) in listeners.iter_mut().enumerate() {
        let Value::Table(l) = l else { continue };
        l.entry("bind")
            .or_insert_with(|| Value::String(format!("127.0.0.1:{}", 18080 + i)));
        let pool = l
            .entry("pool")
            .or_insert_with(|| Value::String("app".into()))
            .as_str()
            .unwrap_or("app")
            .to_string();
        let mut named = vec![pool];
        if let Some(Value::Array(routes)) = l.get("routes") {
            named.extend(
                routes
                    .iter()
                    .filter_map(|r| r.get("pool").and_then(Value::as_str).map(String::from)),
            );
        }
        for name in named {
            pools
                .entry(name)
                .or_insert_with(|| Value::Table(Table::new()));
        }
    }
    for (_, p) in pools.iter_mut() {
        if let Value::Table(p) = p {
            p.entry("backends")
                .or_insert_with(|| Value::Array(vec![Value::String("127.0.0.1:9001".into())]));
        }
    }
    doc.insert("listeners".into(), Value::Table(listeners));
    doc.insert("pools".into(), Value::Table(pools));
    toml::to_string(&doc).map_err(|e| e.to_string())
}

#[test]
fn every_toml_block_of_the_readme_passes_check() {
    let pki = support::tls::Pki::new("readme");
    pki.issue("example.com", &["example.com", "www.example.com"]);
    let readme = include_str!("../README.md")
        .replace("/etc/ballast/tls/", "/etc/ballast/")
        .replace("/etc/ballast/", &format!("{}/", pki.dir.path().display()));
    let mut blocks = Vec::new();
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("a closed block");
        blocks.push(&body[..end]);
        rest = &body[end..];
    }
    assert!(blocks.len() >= 6, "{} toml blocks", blocks.len());
    let mut failures = Vec::new();
    for block in &blocks {
        match completed(block) {
            Ok(config) => {
                let (code, _, err) = check(&config);
                if code != 0 {
                    failures.push(format!("{block}\n=> {err}"));
                }
            }
            Err(e) => failures.push(format!("{block}\n=> {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "README blocks that fail --check:\n{}",
        failures.join("\n")
    );
}

#[test]
fn sni_routes_errors_point_at_their_place() {
    assert_error(
        "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\nmode = \"tcp\"\n\
         sni_routes = [{ sni = \"a.example:443\", pool = \"app\" }, { sni = \"b.example\", pool = \"nope\" }]\n\
         [pools.app]\nbackends = [\"127.0.0.1:9001\"]\n[pools.h2]\nbackends = [\"127.0.0.1:9002\"]\nprotocol = \"h2\"\n",
        &[
            "F:5:23: listeners.web.sni_routes[0].sni: invalid host \"a.example:443\": write an exact name or \"*.example.com\" (no port)",
            "F:5:84: listeners.web.sni_routes[1].pool: unknown pool \"nope\"",
        ],
    );
    assert_error(
        &format!("{BASE}[listeners.web2]\nbind = \"127.0.0.1:8081\"\npool = \"app\"\nsni_required = true\nsni_routes = [{{ sni = \"a.example\", pool = \"app\" }}]\n"),
        &[
            "F:7:12: listeners.web2.sni_routes: only used with mode = \"tcp\" (an HTTP listener matches sni in its routes)",
            "F:7:12: listeners.web2.sni_required: only used with mode = \"tcp\" (an HTTP listener matches sni in its routes)",
        ],
    );
}

#[test]
fn tls_on_tcp_errors_point_at_their_place() {
    assert_error(
        "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\nmode = \"tcp\"\nsplice = true\n\
         [listeners.web.tls]\ncertificates = []\nalpn = []\n\
         [pools.app]\nbackends = [\"127.0.0.1:9001\"]\n[pools.app.tls]\ninsecure_skip_verify = true\n",
        &[
            "F:1:12: listeners.web.splice: splice(2) moves bytes unread, and with tls ballast decrypts them: use one or the other",
            "F:3:8: listeners.web.pool: pool \"app\" sets tls, which splice = true cannot carry (splice(2) moves bytes unread)",
            "F:7:16: listeners.web.tls.certificates: at least one certificate is needed",
            "F:8:8: listeners.web.tls.alpn: must not be empty (omit it for no ALPN)",
        ],
    );
}

#[test]
fn a_session_ticket_keys_file_is_checked_at_its_place() {
    let dir = tempfile::tempdir().expect("dir");
    let short = dir.path().join("short.key");
    std::fs::write(&short, [7u8; 79]).expect("write");
    let text = |path: &str| {
        format!(
            "[listeners.web]\nbind = \"127.0.0.1:8443\"\npool = \"app\"\n[listeners.web.tls]\ncertificates = []\nsession_ticket_keys_file = \"{path}\"\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n"
        )
    };
    let (code, _, err) = check(&text(&short.display().to_string()));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(":6:28: listeners.web.tls.session_ticket_keys_file: {}: 79 bytes: the file must hold 1 to 16 keys of 80 random bytes each", short.display())),
        "{err}"
    );
    let (_, _, err) = check(&text("/nonexistent/tickets.key"));
    assert!(
        err.contains(":6:28: listeners.web.tls.session_ticket_keys_file: cannot read /nonexistent/tickets.key"),
        "{err}"
    );
}

#[test]
fn splice_on_an_http_listener_says_only_that() {
    assert_error(
        "[listeners.web]\nbind = \"127.0.0.1:8080\"\npool = \"app\"\nsplice = true\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n",
        &["F:1:12: listeners.web.splice: only used with mode = \"tcp\""],
    );
}

/// `[tls.acme]` is checked whole without contacting the CA: names, email, directory,
/// challenge, and what needs other listeners; each error at its place.
#[test]
fn acme_errors_point_at_their_place_and_check_contacts_no_ca() {
    let tls = "[listeners.web]\nbind = \"127.0.0.1:8443\"\npool = \"app\"\n\
               [listeners.web.tls.acme]\n";
    let pools = "[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_error(
        &format!(
            "{tls}domains = [\"*.example.com\", \"10.0.0.1\", \"bad_name.example\", \"a.example.com\", \"A.example.com\"]\n\
             email = \"not an address\"\ndirectory = \"http://acme.example/dir\"\nchallenge = \"dns-01\"\n\
             retry_after = \"0s\"\n{pools}"
        ),
        &[
            "F:5:12: listeners.web.tls.acme.domains: \"*.example.com\": a wildcard needs the dns-01 challenge, which ballast does not answer: list each name",
            "F:5:29: listeners.web.tls.acme.domains: \"10.0.0.1\": an IP address: ACME certificates here are for DNS names",
            "F:5:41: listeners.web.tls.acme.domains: \"bad_name.example\": not a DNS name (letters, digits, '-' and '.', labels of 1 to 63)",
            "F:5:78: listeners.web.tls.acme.domains: \"A.example.com\": listed twice",
            "F:6:9: listeners.web.tls.acme.email: \"not an address\" is not an email address",
            "F:7:13: listeners.web.tls.acme.directory: \"http://acme.example/dir\" is not an https:// URL",
            "F:8:13: listeners.web.tls.acme.challenge: \"dns-01\": write \"http-01\" or \"tls-alpn-01\"",
            "F:9:15: listeners.web.tls.acme.retry_after: duration must be greater than zero",
        ],
    );
    // http-01 (the default) with no plain HTTP listener to answer on; empty domains.
    assert_error(
        &format!("{tls}domains = []\n{pools}"),
        &[
            "F:5:11: listeners.web.tls.acme.domains: list at least one DNS name",
            "F:4:1: listeners.web.tls.acme: the http-01 challenge is answered on a plain HTTP listener (port 80 for a public CA) and this config has none: add one, or set challenge = \"tls-alpn-01\"",
        ],
    );
    // tls-alpn-01 on a TCP listener without alpn would refuse its clients' ALPN.
    assert_error(
        "[listeners.db]\nbind = \"127.0.0.1:6380\"\npool = \"app\"\nmode = \"tcp\"\n\
         [listeners.db.tls.acme]\ndomains = [\"db.example.com\"]\nchallenge = \"tls-alpn-01\"\n\
         [pools.app]\nbackends = [\"127.0.0.1:9001\"]\n",
        &["F:5:1: listeners.db.tls.acme: tls-alpn-01 on a TCP listener needs listeners.db.tls.alpn (the protocols its clients offer), or use http-01"],
    );
    // Neither certificates nor acme.
    assert_error(
        "[listeners.web]\nbind = \"127.0.0.1:8443\"\npool = \"app\"\n[listeners.web.tls]\nmin_version = \"1.2\"\n[pools.app]\nbackends = [\"127.0.0.1:9001\"]\n",
        &["F:4:1: listeners.web.tls: give `certificates` or [listeners.web.tls.acme]"],
    );
    // Valid, with a CA that does not exist: --check passes without reaching it, and
    // makes nothing in storage.
    let storage = tempfile::tempdir().unwrap();
    let (code, _, err) = check(&format!(
        "{tls}domains = [\"a.example.com\"]\nchallenge = \"tls-alpn-01\"\n\
         directory = \"https://127.0.0.1:9/dir\"\nstorage = \"{}/acme\"\n{pools}",
        storage.path().display()
    ));
    assert_eq!(code, 0, "{err}");
    assert!(!storage.path().join("acme").exists());
}
