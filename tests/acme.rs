//! ACME against a real CA: Debian's `pebble` (the ACME test server) on loopback, with
//! `pebble-challtestsrv` answering its DNS queries with 127.0.0.1, so pebble really
//! validates the challenges against ballast's listeners. Covered: issuance by http-01 and
//! by tls-alpn-01; renewal with the old certificate serving throughout; a CA that refuses
//! an order and a CA that is down (old certificate kept, one log line per attempt, retried);
//! two ballast processes sharing one `storage` (one order per renewal, both serve it).
//!
//! Pebble issues certificates valid for 30 s here, so renewal (at two thirds of the
//! lifetime) comes 20 s after issuance.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::tls::{any_name, connect, served_cert, Pki};
use support::{eventually, metric, Backend, Ballast};

const DOMAIN: &str = "a.ballast.test";
/// Pebble's certificate lifetime in these tests.
const VALIDITY_S: u64 = 30;
/// Issuance, renewal, retries: each within this.
const LONG: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn installed() -> bool {
    let ok = ["pebble", "pebble-challtestsrv"].iter().all(|c| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        eprintln!(
            "SKIPPED: pebble is not installed (.ci/run installs the Debian package `pebble`)"
        );
    }
    ok
}

/// A child process (ours) killed by PID on drop, its output collected.
struct Proc {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let out = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    out.lock().expect("log").push(line);
                }
            });
        }
        Proc { child, out }
    }

    fn count(&self, needle: &str) -> usize {
        let out = self.out.lock().expect("log");
        out.iter().filter(|l| l.contains(needle)).count()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(p: &mut Proc, port: u16, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let exited = p.child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && start.elapsed() < Duration::from_secs(20),
            "{what} did not start ({exited:?}):\n{}",
            p.out.lock().expect("log").join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// pebble and its DNS server. Its own HTTPS uses a certificate from a test CA,
/// `ca` (ballast's `directory_ca`).
struct Pebble {
    pebble: Option<Proc>,
    _dns: Proc,
    pki: Pki,
    config: PathBuf,
    dns_port: u16,
    port: u16,
}

impl Pebble {
    /// Validates http-01 on `http_port` and tls-alpn-01 on `tls_port`; refuses orders that
    /// name a domain in `blocked`.
    fn start(http_port: u16, tls_port: u16, blocked: &[&str]) -> Option<Pebble> {
        if !installed() {
            return None;
        }
        let pki = Pki::new("pebble");
        let leaf = pki.issue("pebble-https", &["localhost", "127.0.0.1"]);
        let dns_port = free_port();
        let dns_mgmt = free_port();
        let mut dns = Proc::spawn(Command::new("pebble-challtestsrv").args([
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &format!("127.0.0.1:{dns_mgmt}"),
        ]));
        wait_listening(&mut dns, dns_mgmt, "pebble-challtestsrv");
        let port = free_port();
        let config = pki.dir.path().join("pebble.json");
        let json = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{}", free_port()),
            "certificate": leaf.cert,
            "privateKey": leaf.key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "domainBlocklist": blocked,
            "certificateValidityPeriod": VALIDITY_S,
        }});
        std::fs::write(&config, json.to_string()).expect("pebble config");
        let mut p = Pebble {
            pebble: None,
            _dns: dns,
            pki,
            config,
            dns_port,
            port,
        };
        p.up();
        Some(p)
    }

    /// Starts pebble (a fresh CA each time: it keeps no state).
    fn up(&mut self) {
        let mut pebble = Proc::spawn(
            Command::new("pebble")
                .arg("-config")
                .arg(&self.config)
                .arg("-dnsserver")
                .arg(format!("127.0.0.1:{}", self.dns_port))
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0")
                // Every order validates against ballast, none reuses an earlier one's.
                .env("PEBBLE_AUTHZREUSE", "0"),
        );
        wait_listening(&mut pebble, self.port, "pebble");
        self.pebble = Some(pebble);
    }

    /// A CA outage: pebble stops (killed by PID).
    fn down(&mut self) {
        self.pebble = None;
    }

    fn directory(&self) -> String {
        format!("https://localhost:{}/dir", self.port)
    }

    /// The same CA under another directory URL (as staging and production are two).
    fn directory_by_ip(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// Orders pebble received (its log names each new-order request).
    fn orders(&self) -> usize {
        self.pebble
            .as_ref()
            .map_or(0, |p| p.count("POST /order-plz"))
    }
}

/// A plain HTTP listener on `http_port` (it answers http-01), a TLS listener on
/// `tls_port` with `[tls.acme]` (more keys in `acme`), both in front of `backend`.
fn config(
    http_port: Option<u16>,
    tls_port: u16,
    pebble: &Pebble,
    storage: &Path,
    acme: &str,
    backend: &Backend,
) -> String {
    // Port 80 as operators set it up: everything else redirected to HTTPS. The CA's
    // validator is answered before the redirect, `deny_from` and the rate limit.
    let plain = http_port.map_or(String::new(), |p| {
        format!(
            "[listeners.plain]\nbind = \"127.0.0.1:{p}\"\npool = \"app\"\nredirect_https = true\n\
             deny_from = [\"127.0.0.0/8\"]\nrate_limit = {{ requests_per_second = 1, burst = 1 }}\n\n"
        )
    });
    format!(
        r#"[admin]
bind = "127.0.0.1:0"

{plain}[listeners.secure]
bind = "127.0.0.1:{tls_port}"
pool = "app"

[listeners.secure.tls.acme]
email = "ops@ballast.test"
directory = "{}"
directory_ca = "{}"
storage = "{}"
retry_after = "1s"
{acme}

[pools.app]
backends = ["{}"]
"#,
        pebble.directory(),
        pebble.pki.ca_path.display(),
        storage.display(),
        backend.addr,
    )
}

/// What each test starts with: pebble validating on `http_port` and `tls_port`, a storage
/// folder, and a backend.
struct Scene {
    pebble: Pebble,
    storage: tempfile::TempDir,
    backend: Backend,
    http_port: u16,
    tls_port: u16,
}

impl Scene {
    /// `None` (said SKIPPED) without pebble. Orders naming a domain in `blocked` are refused.
    async fn start(blocked: &[&str]) -> Option<Scene> {
        let (http_port, tls_port) = (free_port(), free_port());
        let pebble = Pebble::start(http_port, tls_port, blocked)?;
        Some(Scene {
            pebble,
            storage: tempfile::tempdir().expect("storage"),
            backend: Backend::start("app").await,
            http_port,
            tls_port,
        })
    }

    /// A config whose listeners are where pebble validates (a plain one only with
    /// `plain`), with `acme` as the rest of its `[tls.acme]`.
    fn config(&self, plain: bool, acme: &str) -> String {
        let http = plain.then_some(self.http_port);
        config(
            http,
            self.tls_port,
            &self.pebble,
            self.storage.path(),
            acme,
            &self.backend,
        )
    }

    /// The same, on other ports: a second process, not where pebble validates.
    fn config_elsewhere(&self, acme: &str) -> String {
        let (http, tls) = (free_port(), free_port());
        config(
            Some(http),
            tls,
            &self.pebble,
            self.storage.path(),
            acme,
            &self.backend,
        )
    }
}

/// The leaf the TLS listener serves for `DOMAIN`, or `None` if the handshake fails.
async fn served(b: &Ballast, pki: &Pki) -> Option<Vec<u8>> {
    let s = connect(b.addr("secure"), Some(DOMAIN), &any_name(pki))
        .await
        .ok()?;
    Some(served_cert(&s))
}

/// The first certificate `b` serves for `DOMAIN`, once issued (within [`LONG`]).
async fn first_issued(b: &Ballast, pebble: &Pebble, others: &[&Ballast]) -> Vec<u8> {
    let mut cert = None;
    let issued = eventually(LONG, async || {
        cert = served(b, &pebble.pki).await;
        cert.is_some()
    })
    .await;
    let logs: Vec<String> = std::iter::once(b)
        .chain(others.iter().copied())
        .map(|b| b.logs())
        .collect();
    assert!(
        issued.is_some(),
        "no certificate issued:\n{}",
        logs.join("\n")
    );
    cert.expect("issued")
}

/// The leaf's DNS names and its issuer's common name.
fn facts(der: &[u8]) -> (Vec<String>, String) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("x509");
    let names = ballast::config::tls::dns_names(&cert).expect("SAN");
    (names, cert.issuer().to_string())
}

/// When two thirds of the certificate's lifetime have passed (Unix seconds).
fn two_thirds(der: &[u8]) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("x509");
    let v = cert.validity();
    let (from, to) = (v.not_before.timestamp(), v.not_after.timestamp());
    from + (to - from) * 2 / 3
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

async fn metrics(b: &Ballast) -> String {
    support::get(b.admin(), "/metrics").await.body
}

/// http-01: no certificate until pebble validated the token on the plain listener; then
/// the issued one, from storage, 0600; then renewal, with a handshake every few ms
/// throughout and none failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issues_then_renews_with_the_old_certificate_serving_throughout() {
    let Some(sc) = Scene::start(&[]).await else {
        return;
    };
    let (pebble, storage) = (&sc.pebble, &sc.storage);
    let b = Ballast::start(&sc.config(
        true,
        &format!("domains = [\"{DOMAIN}\"]\nchallenge = \"http-01\""),
    ));
    let first = first_issued(&b, pebble, &[]).await;
    let (names, issuer) = facts(&first);
    assert_eq!(names, [DOMAIN]);
    assert!(issuer.contains("Pebble"), "issuer {issuer}");
    assert_eq!(pebble.orders(), 1);
    // The key is private; requests go through to the backend over the new certificate.
    use std::os::unix::fs::PermissionsExt;
    let key = storage.path().join(DOMAIN).join("key.pem");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let s = connect(b.addr("secure"), Some(DOMAIN), &any_name(&pebble.pki))
        .await
        .expect("tls");
    let reply = support::tls::get_h1(s, DOMAIN, "/").await.expect("request");
    assert_eq!(reply.backend(), "app");
    // The challenge answer was removed after the order; unknown tokens are 404, and a
    // path that tries to leave the folder never reaches it.
    let plain = std::net::SocketAddr::from(([127, 0, 0, 1], sc.http_port));
    for _ in 0..3 {
        // Past the rate limit's burst, and from a denied address: still answered.
        let reply = support::get(plain, "/.well-known/acme-challenge/nothing").await;
        assert_eq!(reply.status, 404);
    }
    let elsewhere = support::get(plain, "/").await.status;
    assert_eq!(elsewhere, 403, "deny_from applies to every other path");
    assert_eq!(
        support::get(plain, "/.well-known/acme-challenge/..%2F..%2Faccount")
            .await
            .status,
        404
    );
    let page = metrics(&b).await;
    let expiry = metric(
        &page,
        "ballast_tls_certificate_expiry_timestamp_seconds",
        &[("listener", "secure"), ("name", DOMAIN)],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry > now && expiry <= now + VALIDITY_S as f64 + 1.0,
        "{expiry} vs {now}"
    );

    // Renewal: handshakes all along, each served the old or the new certificate.
    let start = Instant::now();
    let mut handshakes = 0;
    let renewed = loop {
        assert!(start.elapsed() < LONG, "not renewed:\n{}", b.logs());
        let now = served(&b, &pebble.pki).await;
        handshakes += 1;
        let now = now.unwrap_or_else(|| panic!("handshake {handshakes} failed during renewal"));
        if now != first {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(facts(&renewed).0, [DOMAIN]);
    // Renewed at two thirds of the old certificate's lifetime, not before (the watch and
    // this loop add up to a second or two after it).
    let due = two_thirds(&first);
    let seen = unix_now();
    assert!(
        seen >= due && seen <= due + 5,
        "renewed at {seen}, due at {due}"
    );
    assert_eq!(pebble.orders(), 2, "one order per renewal");
    let status = support::get(b.admin(), "/status").await.body;
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    let renewal = &status["listeners"]["secure"]["tls"]["acme"]["renewal"];
    assert_eq!(renewal["last_result"], "issued", "{renewal}");
    assert_eq!(renewal["issued_total"], 2, "{renewal}");
    assert!(renewal["next_check"].as_u64().is_some(), "{renewal}");
}

/// tls-alpn-01: pebble validates on the TLS listener itself; no plain listener exists.
/// A client that asks for `acme-tls/1` when no order is pending gets no handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_issues_on_the_tls_listener_alone() {
    let Some(sc) = Scene::start(&[]).await else {
        return;
    };
    let (pebble, storage) = (&sc.pebble, &sc.storage);
    let acme =
        format!("domains = [\"{DOMAIN}\", \"www.ballast.test\"]\nchallenge = \"tls-alpn-01\"");
    let b = Ballast::start(&sc.config(false, &acme));
    let cert = first_issued(&b, pebble, &[]).await;
    let mut names = facts(&cert).0;
    names.sort();
    assert_eq!(names, ["a.ballast.test", "www.ballast.test"]);
    assert_eq!(pebble.orders(), 1);
    // No pending challenge: `acme-tls/1` alone is refused, not answered with the
    // certificate or served HTTP.
    let acme_only = {
        let mut c = rustls::ClientConfig::builder_with_provider(ballast::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ballast::tls::NoVerify::new()))
            .with_no_client_auth();
        c.alpn_protocols = vec![b"acme-tls/1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(c))
    };
    assert!(connect(b.addr("secure"), Some(DOMAIN), &acme_only)
        .await
        .is_err());
    // The challenge answers were removed.
    let left = std::fs::read_dir(storage.path().join("tls-alpn-01"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0);
}

/// A CA that refuses (a blocked name) and a CA that is down: each attempt fails with one
/// log line and one count, the certificate already issued keeps serving, and the attempt
/// is retried with backoff until the CA is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_and_outage_keep_the_old_certificate_and_retry() {
    let Some(mut sc) = Scene::start(&["blocked.ballast.test"]).await else {
        return;
    };
    // The config with `list` as its domains.
    let domains = |list: &str| format!("domains = [{list}]\nchallenge = \"http-01\"");
    let b = Ballast::start(&sc.config(true, &domains(&format!("\"{DOMAIN}\""))));
    let issued = first_issued(&b, &sc.pebble, &[]).await;

    // Refusal: the config now asks for a name the CA will not certify.
    let failed = "ACME: certificate order failed";
    let failures_logged = || b.lines().iter().filter(|l| l.contains(failed)).count();
    b.save_config(
        &sc.config(
            true,
            &domains(&format!("\"{DOMAIN}\", \"blocked.ballast.test\"")),
        ),
        support::Save::Rename,
    );
    assert!(
        b.wait_for_log_count(failed, 2, LONG),
        "no retried failure:\n{}",
        b.logs()
    );
    let failures = failures_logged();
    let logged = b.lines().join("\n");
    assert!(
        logged.contains("blocked.ballast.test"),
        "the CA's reason is logged:\n{logged}"
    );
    assert_eq!(
        served(&b, &sc.pebble.pki).await.as_deref(),
        Some(&issued[..])
    );
    let counted = metric(
        &metrics(&b).await,
        "ballast_acme_renewal_failures_total",
        &[("listener", "secure")],
    );
    // One count per logged attempt (a further attempt may land between the two reads).
    let failures_after = failures_logged();
    assert!(
        (failures as f64..=failures_after as f64).contains(&counted),
        "{counted} counted, {failures}..{failures_after} logged"
    );

    // Outage: back to the good name, with the CA down; the old certificate renews only
    // once the CA is back (a new pebble: the stored account is unknown to it and is made
    // again).
    sc.pebble.down();
    let before = failures_logged();
    b.save_config(
        &sc.config(
            true,
            &domains(&format!("\"{DOMAIN}\", \"www.ballast.test\"")),
        ),
        support::Save::Rename,
    );
    assert!(
        b.wait_for_log_count(failed, before + 2, LONG),
        "no failure while the CA is down:\n{}",
        b.logs()
    );
    assert_eq!(
        served(&b, &sc.pebble.pki).await.as_deref(),
        Some(&issued[..])
    );
    sc.pebble.up();
    let renewed = eventually(LONG, async || {
        served(&b, &sc.pebble.pki)
            .await
            .is_some_and(|c| facts(&c).0.len() == 2)
    })
    .await;
    assert!(
        renewed.is_some(),
        "not issued after the CA came back:\n{}",
        b.logs()
    );
}

/// Two processes, one `storage`: one order per issuance and per renewal, whichever
/// process holds the lock; both serve the certificate through their watch. Only the first
/// process listens where pebble validates: it answers the other's tokens from storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_storage_place_one_order_per_renewal() {
    let Some(sc) = Scene::start(&[]).await else {
        return;
    };
    let pebble = &sc.pebble;
    let acme = format!("domains = [\"{DOMAIN}\"]\nchallenge = \"http-01\"");
    let one = Ballast::start(&sc.config(true, &acme));
    let two = Ballast::start(&sc.config_elsewhere(&acme));
    let both_serve = async |want: Option<&[u8]>| -> Option<Vec<u8>> {
        let a = served(&one, &pebble.pki).await?;
        let b = served(&two, &pebble.pki).await?;
        (a == b && want.is_none_or(|w| w != a)).then_some(a)
    };
    let mut first = None;
    let issued = eventually(LONG, async || {
        first = both_serve(None).await;
        first.is_some()
    })
    .await;
    assert!(
        issued.is_some(),
        "not served by both:\n{}\n{}",
        one.logs(),
        two.logs()
    );
    let first = first.expect("issued");
    let ordering = "ACME: ordering a certificate";
    assert_eq!(pebble.orders(), 1);
    assert_eq!(
        one.lines()
            .iter()
            .chain(two.lines().iter())
            .filter(|l| l.contains(ordering))
            .count(),
        1
    );

    let mut second = None;
    let renewed = eventually(LONG, async || {
        second = both_serve(Some(&first)).await;
        second.is_some()
    })
    .await;
    assert!(
        renewed.is_some(),
        "renewal not served by both:\n{}\n{}",
        one.logs(),
        two.logs()
    );
    assert_eq!(pebble.orders(), 2, "one order per renewal");
    assert_eq!(
        one.lines()
            .iter()
            .chain(two.lines().iter())
            .filter(|l| l.contains(ordering))
            .count(),
        2
    );
}

/// A replica answers the CA for an order another placed: `two` orders a.ballast.test but
/// does not listen where pebble validates; `one` does, and orders only b.ballast.test. Both
/// certificates are issued, so `one` answered `two`'s token from the shared storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_the_challenge_of_an_order_another_placed() {
    let Some(sc) = Scene::start(&[]).await else {
        return;
    };
    let acme = |name: &str| format!("domains = [\"{name}\"]\nchallenge = \"http-01\"");
    let one = Ballast::start(&sc.config(true, &acme("b.ballast.test")));
    let two = Ballast::start(&sc.config_elsewhere(&acme(DOMAIN)));
    // Issued only if `one` answered `two`'s challenge.
    let cert = first_issued(&two, &sc.pebble, &[&one]).await;
    assert_eq!(facts(&cert).0, [DOMAIN]);
    let ordered = two
        .lines()
        .iter()
        .filter(|l| l.contains("ACME: ordering a certificate"))
        .count();
    assert!(ordered >= 1, "two placed the order:\n{}", two.logs());
}

/// A certificate from another directory than the config names (Let's Encrypt's staging,
/// then production) is ordered again at once, not kept until it is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_directory_is_replaced() {
    let Some(sc) = Scene::start(&[]).await else {
        return;
    };
    let pebble = &sc.pebble;
    let staging = sc.config(true, &format!("domains = [\"{DOMAIN}\"]"));
    let b = Ballast::start(&staging);
    let first = first_issued(&b, pebble, &[]).await;
    assert_eq!(pebble.orders(), 1);
    let production = staging.replace(&pebble.directory(), &pebble.directory_by_ip());
    assert_ne!(production, staging);
    b.save_config(&production, support::Save::Rename);
    let replaced = eventually(LONG, async || {
        served(&b, &pebble.pki).await.is_some_and(|c| c != first)
    })
    .await;
    assert!(
        replaced.is_some(),
        "the old directory's certificate stayed:\n{}",
        b.logs()
    );
    // At once, not at the renewal the old certificate was due for anyway.
    assert!(
        unix_now() < two_thirds(&first),
        "replaced only when due:\n{}",
        b.logs()
    );
    assert_eq!(pebble.orders(), 2);
}
