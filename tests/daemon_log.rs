//! The daemon log: `[log] format` and `level` applied on reload, JSON lines that parse,
//! and the lines a remote peer can cause bounded: dependencies' warnings (rustls' "Illegal
//! SNI hostname" per bad handshake) and the accept loop's "Too many open files".

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::tls::Pki;
use support::*;

fn with_log(log: &str) -> String {
    // A backend that refuses: these tests never forward a request.
    TestConfig::addresses(["127.0.0.1:9"])
        .admin()
        .head(&format!("[log]\n{log}\n"))
        .build()
}

/// Waits until the log has more than `seen` lines and one of the new ones contains
/// `needle`; returns the lines after `seen`.
fn lines_after(lb: &Ballast, seen: usize, needle: &str) -> Vec<String> {
    assert!(
        lb.wait_for_log_count(
            needle,
            lb.lines()[..seen]
                .iter()
                .filter(|l| l.contains(needle))
                .count()
                + 1,
            WAIT
        ),
        "no new {needle:?} line; log:\n{}",
        lb.logs()
    );
    lb.lines()[seen..].to_vec()
}

/// Saves the config with `log` as its `[log]` table, reloads, and returns the line that
/// reports the reload.
async fn reload_with_log(lb: &Ballast, log: &str) -> String {
    let seen = lb.lines().len();
    lb.save_config(&with_log(log), Save::Rename);
    let (status, _) = admin_call(lb.admin(), "POST", "/reload", None).await;
    assert_eq!(status, 200);
    let after = lines_after(lb, seen, "config reloaded");
    after
        .into_iter()
        .find(|l| l.contains("config reloaded"))
        .expect("the reload line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_parse_and_a_reload_switches_between_text_and_json() {
    let lb = Ballast::start(&with_log("format = \"json\""));
    // Every line since the format applied is one JSON object with the same fields the
    // text format writes as key=value.
    let lines = lb.lines();
    let first_json = lines
        .iter()
        .position(|l| l.starts_with('{'))
        .expect("JSON lines");
    for line in &lines[first_json..] {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        assert!(
            v["message"].is_string() && v["target"].is_string(),
            "{line}"
        );
    }
    let bound = lines
        .iter()
        .find(|l| l.contains("listener bound") && l.contains("\"web\""))
        .expect("listener bound line");
    let v: serde_json::Value = serde_json::from_str(bound).unwrap();
    assert_eq!(v["listener"], "web");
    assert_eq!(v["addr"], lb.addr("web").to_string());

    // Reload to text: the line that reports the reload is already text.
    let reloaded = reload_with_log(&lb, "format = \"text\"").await;
    assert!(!reloaded.starts_with('{'), "{reloaded}");
    assert!(reloaded.contains(" generation="), "{reloaded}");

    // And back.
    let reloaded = reload_with_log(&lb, "format = \"json\"\nlevel = \"info\"").await;
    let v: serde_json::Value = serde_json::from_str(&reloaded).unwrap();
    assert!(
        v["generation"].as_u64().is_some_and(|g| g >= 2),
        "{reloaded}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_level_comes_from_the_config_and_a_reload_changes_it() {
    // Without --log: the config's level rules.
    let lb = Ballast::start_config_level(&with_log("level = \"info\""));
    lb.save_config(&with_log("level = \"error\""), Save::Rename);
    let (status, _) = admin_call(lb.admin(), "POST", "/reload", None).await;
    assert_eq!(status, 200);
    let seen = lb.lines().len();
    // An error line still shows (a rejected reload), an info one no longer does.
    lb.save_config("[listeners.web]\nbind = 1\n", Save::Rename);
    let (status, _) = admin_call(lb.admin(), "POST", "/reload", None).await;
    assert_eq!(status, 422);
    let after = lines_after(&lb, seen, "reload rejected");
    lb.save_config(&with_log("level = \"info\"\n"), Save::Rename);
    let (status, _) = admin_call(lb.admin(), "POST", "/reload", None).await;
    assert_eq!(status, 200);
    // Back at info: the reload that switched is the first line logged again.
    let again = lines_after(&lb, seen, "config reloaded");
    assert!(
        !after.iter().any(|l| l.contains("INFO")),
        "no info line while the level was error: {after:?}"
    );
    assert!(
        again.iter().any(|l| l.contains("config reloaded")),
        "{again:?}"
    );
}

#[test]
fn a_bad_log_table_is_refused_at_its_place() {
    let (ok, err) = check_config(&with_log("format = \"xml\"\nlevel = \"info,=[\""));
    assert!(!ok);
    assert!(
        err.contains(":5:10: log.format: expected \"text\" or \"json\", got \"xml\""),
        "{err}"
    );
    assert!(
        err.contains(":6:9: log.level: invalid \"info,=[\""),
        "{err}"
    );
}

/// A TLS 1.3 ClientHello whose server_name extension carries `sni` byte for byte (a
/// host:port, a space, non-ASCII bytes): what Go's `hey` and other clients send, and what
/// no TLS library's client API lets a test write.
fn client_hello(sni: &[u8]) -> Vec<u8> {
    fn u16be(n: usize) -> [u8; 2] {
        (n as u16).to_be_bytes()
    }
    fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend(kind.to_be_bytes());
        out.extend(u16be(body.len()));
        out.extend(body);
    }
    let mut names = vec![0u8]; // host_name
    names.extend(u16be(sni.len()));
    names.extend(sni);
    let mut server_name = u16be(names.len()).to_vec();
    server_name.extend(names);
    let mut ext = Vec::new();
    extension(&mut ext, 0x0000, &server_name);
    extension(&mut ext, 0x000a, &[0, 2, 0, 0x1d]); // groups: x25519
    extension(&mut ext, 0x000d, &[0, 6, 4, 3, 8, 4, 4, 1]); // signature algorithms
    extension(&mut ext, 0x002b, &[4, 3, 4, 3, 3]); // versions: 1.3, 1.2
    let mut share = vec![0, 36, 0, 0x1d, 0, 32];
    share.extend([9u8; 32]);
    extension(&mut ext, 0x0033, &share); // key share
    let mut body = vec![3, 3];
    body.extend([7u8; 32]); // random
    body.push(32);
    body.extend([5u8; 32]); // legacy session id
    body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2b]); // suites
    body.extend([1, 0]); // no compression
    body.extend(u16be(ext.len()));
    body.extend(ext);
    let mut hello = vec![1, 0];
    hello.extend(u16be(body.len()));
    hello.extend(body);
    let mut record = vec![0x16, 3, 1];
    record.extend(u16be(hello.len()));
    record.extend(hello);
    record
}

/// Sends `hello` and returns the first record the server answers with (type, and for an
/// alert its description), or `None` if it closed without one.
async fn answer_to(addr: SocketAddr, hello: &[u8]) -> Option<(u8, u8)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(hello).await.ok()?;
    let mut head = [0u8; 7];
    tokio::time::timeout(WAIT, s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    Some((head[0], head[6]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_sni_handshakes_writes_a_line_a_second() {
    let pki = Pki::new("sni-flood");
    let cert = pki.issue("cert", &["localhost"]);
    let lb = Ballast::start(
        &TestConfig::addresses(["127.0.0.1:9"])
            .listener(&format!(
                "[listeners.web.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
                cert.cert.display(),
                cert.key.display()
            ))
            .build(),
    );
    let addr = lb.addr("web");
    // The hello itself is sound: with a host name in it, the server answers.
    let (kind, _) = answer_to(addr, &client_hello(b"localhost"))
        .await
        .expect("an answer");
    assert_eq!(kind, 0x16, "a ServerHello for a valid name");
    let started = Instant::now();
    let names: [&[u8]; 3] = [
        b"127.0.0.1:8443",
        b"a b.example",
        "bücher.example".as_bytes(),
    ];
    let mut refused = 0;
    for i in 0..300 {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        // rustls answers each with an alert (illegal_parameter: 47): no certificate it
        // could serve, and no setting to serve the default one (see the issue note).
        if answer_to(addr, &client_hello(names[i % 3])).await == Some((0x15, 47)) {
            refused += 1;
        }
    }
    let secs = started.elapsed().as_secs() + 1;
    assert!(refused >= 100, "{refused} refused");
    // One rustls line per second at most, however many handshakes.
    let count = |needle: &str| lb.lines().iter().filter(|l| l.contains(needle)).count() as u64;
    let rustls = count("Illegal SNI hostname");
    assert!(
        rustls >= 1 && rustls <= secs + 1,
        "{rustls} rustls lines in {secs}s for {refused} handshakes"
    );
    let ours = count("reason=invalid_sni");
    assert!(
        ours >= 1 && ours <= secs + 1,
        "{ours} ballast lines in {secs}s"
    );
    // The next line after a quiet second says how many were left out.
    let before = count("Illegal SNI hostname");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    answer_to(addr, &client_hello(b"127.0.0.1:8443")).await;
    answer_to(addr, &client_hello(b"127.0.0.1:8443")).await;
    assert!(lb.wait_for_log_count("Illegal SNI hostname", before as usize + 1, WAIT));
    let last = lb
        .lines()
        .into_iter()
        .rfind(|l| l.contains("Illegal SNI hostname"))
        .unwrap();
    let suppressed: u64 = field(&last, "suppressed")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no suppressed=N in {last}"));
    assert!(suppressed >= 1, "{last}");
    // And serving goes on.
    let (kind, _) = answer_to(addr, &client_hello(b"localhost"))
        .await
        .expect("answer");
    assert_eq!(kind, 0x16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_logs_a_line_a_second_and_serving_recovers() {
    let [a] = start_backends(["a"]).await;
    let lb = Ballast::start(&TestConfig::new(&[&a]).build());
    let web = lb.addr("web");
    assert_eq!(get(web, "/").await.status, 200);
    // Lower the running daemon's limit so that a few hundred connections exhaust it.
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &lb.pid().to_string(), "--nofile=64:64"])
        .output();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED: prlimit (util-linux) could not lower the daemon's descriptor limit: {out:?}"
        );
        return;
    }
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..150 {
        if let Ok(s) = TcpStream::connect(web).await {
            held.push(s);
        }
    }
    // The accept loop now fails with EMFILE and retries every 50 ms for as long as the
    // kernel keeps queueing connections; let it run into the limit for two seconds.
    assert!(lb.wait_for_log("accept failed", WAIT), "{}", lb.logs());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let secs = started.elapsed().as_secs() + 1;
    let failed = lb
        .lines()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count() as u64;
    assert!(
        failed <= secs + 1,
        "{failed} lines in {secs}s:\n{}",
        lb.logs()
    );
    drop(held);
    // Descriptors come back: new clients are served again.
    let mut served = false;
    for _ in 0..100 {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = Client::connect(web).await?;
            Ok::<_, std::io::Error>(c.get("/").await.map(|r| r.status).unwrap_or(0))
        })
        .await
        {
            if r == 200 {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "serving did not recover:\n{}", lb.logs());
}
