//! The status page at `GET /` in a real headless browser: Debian's Chromium, driven over
//! WebDriver (chromedriver, plain HTTP + JSON). The test loads the page, checks that every
//! backend is shown with its state, clicks "Drain", sees the state change on the page and
//! in `/status`, and saves screenshots (wide and narrow) to the test's output directory.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::Full;
use serde_json::{json, Value};
use support::{backend_state, eventually, get, start_backends, Ballast, Client, TestConfig};

/// W3C WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver on an ephemeral port, in a process group of its own; the whole group
/// (chromedriver and the Chromium it started) is killed on drop. A test that panics never
/// closes its session, and killing chromedriver alone left its browsers running.
struct Driver {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(group) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        let _ = self.child.wait();
    }
}

impl Driver {
    /// `None` when chromedriver or Chromium is not installed.
    fn start() -> Option<Driver> {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];
        if !chromium.iter().any(|p| std::path::Path::new(p).exists()) {
            return None;
        }
        let mut child = Command::new("chromedriver")
            .arg("--port=0")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // "ChromeDriver was started successfully on port 38379."
        let mut out = BufReader::new(child.stdout.take()?);
        let mut line = String::new();
        let port = loop {
            line.clear();
            if out.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(rest) = line.split("on port ").nth(1) {
                if let Ok(p) = rest.trim().trim_end_matches('.').parse::<u16>() {
                    if p != 0 {
                        break p;
                    }
                }
            }
        };
        // Keep draining its output so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
        Some(Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut c = Client::connect(self.addr)
            .await
            .expect("connect to chromedriver");
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::from(body.map(|b| b.to_string()).unwrap_or_default()))
            .unwrap();
        let r = c.request(req).await.expect("webdriver request");
        let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        assert!(
            r.status < 500 || method == "GET",
            "{method} {path}: {} {}",
            r.status,
            r.body
        );
        v
    }
}

/// How often `text` and `click` look an element up again after it went stale.
const STALE_RETRIES: usize = 5;

/// Whether a WebDriver answer says the element was replaced since it was found.
fn is_stale(v: &Value) -> bool {
    v.get("error").and_then(Value::as_str) == Some("stale element reference")
}

/// One browser session.
struct Session<'d> {
    driver: &'d Driver,
    id: String,
}

impl Session<'_> {
    async fn new(driver: &Driver) -> Session<'_> {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1200,700"]
            }
        }}});
        let v = driver.call("POST", "/session", Some(caps)).await;
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Session { driver, id }
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        self.driver.call(method, &path, body).await["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// The element `css` selects, if it exists now.
    async fn find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().map(str::to_owned)
    }

    /// The text of the element `css` selects, or "" when it does not exist (yet).
    ///
    /// A refresh can replace an element found a moment ago (a row whose backend changed,
    /// a pool card that became "No backends."), so it can be gone by the next command
    /// ("stale element reference"): then it is looked up again.
    async fn text(&self, css: &str) -> String {
        for _ in 0..STALE_RETRIES {
            let Some(e) = self.find(css).await else {
                return String::new();
            };
            let v = self.cmd("GET", &format!("/element/{e}/text"), None).await;
            if !is_stale(&v) {
                return v.as_str().unwrap_or("").to_string();
            }
        }
        panic!("{css} went stale {STALE_RETRIES} times in a row");
    }

    /// Clicks the element `css` selects, looking it up again if a refresh replaced it
    /// between the lookup and the click (a lost click would otherwise pass silently).
    async fn click(&self, css: &str) {
        for _ in 0..STALE_RETRIES {
            let e = self
                .find(css)
                .await
                .unwrap_or_else(|| panic!("no element {css}"));
            let v = self
                .cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
                .await;
            if !is_stale(&v) {
                assert!(v.get("error").is_none(), "click {css}: {v}");
                return;
            }
        }
        panic!("{css} went stale {STALE_RETRIES} times in a row");
    }

    async fn screenshot(&self, to: &std::path::Path) {
        let v = self.cmd("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot data"))
            .expect("base64 png");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(to, png).expect("save screenshot");
        println!("screenshot: {}", to.display());
    }

    async fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    async fn close(self) {
        self.driver
            .call("DELETE", &format!("/session/{}", self.id), None)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_backends_and_drains_one_with_a_click() {
    let Some(driver) = Driver::start() else {
        println!("SKIPPED: status page browser test (chromedriver or chromium is not installed; .ci/run installs Debian's chromium and chromium-driver)");
        return;
    };
    let bs = start_backends(["a", "b"]).await;
    // A TLS listener with a certificate, and an ACME certificate whose CA does not answer:
    // the certificates table shows the one's expiry and the other's failed attempt.
    let pki = support::tls::Pki::new("page");
    let leaf = pki.issue("page", &["page.example.org"]);
    let storage = tempfile::tempdir().unwrap();
    let secure = format!(
        "[listeners.secure]\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         [listeners.secure.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
         [listeners.secure.tls.acme]\ndomains = [\"acme.example.org\"]\nchallenge = \"tls-alpn-01\"\n\
         directory = \"https://127.0.0.1:9/dir\"\nstorage = \"{}\"\n",
        leaf.cert.display(),
        leaf.key.display(),
        storage.path().display()
    );
    let lb = Ballast::start(
        &TestConfig::new(&[&bs[0], &bs[1]])
            .admin()
            .head(&secure)
            .pool("[pools.app.health_check]\nkind = \"http\"\npath = \"/health\"\ninterval = \"500ms\"\n")
            .build(),
    );
    for _ in 0..10 {
        assert_eq!(get(lb.addr("web"), "/").await.status, 200);
    }
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    std::fs::create_dir_all(&out).unwrap();

    let s = Session::new(&driver).await;
    s.goto(&format!("http://{}/", lb.admin())).await;
    let row = |b: &support::Backend, rest: &str| format!("tr[data-backend=\"{}\"] {rest}", b.addr);

    // Both backends appear, healthy, with their counts.
    for b in &bs {
        let shown = eventually(Duration::from_secs(10), async || {
            s.text(&row(b, ".state")).await == "healthy"
        })
        .await;
        assert!(shown.is_some(), "backend {} not shown as healthy", b.addr);
    }
    assert!(s
        .text("section[data-pool=\"app\"] h2")
        .await
        .contains("2 of 2 healthy"));
    assert!(s
        .text("#version")
        .await
        .starts_with(env!("CARGO_PKG_VERSION")));
    assert!(s.text("#reload-text").await.contains("none since start"));
    let certs = s.text("#certificates").await;
    assert!(
        certs.contains("page.example.org") && certs.contains("days"),
        "certificates: {certs}"
    );
    let failed = eventually(Duration::from_secs(10), async || {
        let t = s.text("#certificates").await;
        t.contains("acme.example.org") && t.contains("failed at")
    })
    .await;
    assert!(
        failed.is_some(),
        "the ACME row: {}",
        s.text("#certificates").await
    );
    let requests: u64 = s
        .text(&row(&bs[0], "td[data-label=\"Requests\"]"))
        .await
        .parse()
        .unwrap();
    assert!(requests >= 4, "requests shown: {requests}");
    assert!(s
        .text(&row(&bs[0], "td[data-label=\"Last check\"]"))
        .await
        .contains("pass"));
    s.screenshot(&out.join("healthy.png")).await;

    // Drain b with its button: the page shows it draining, and so does the API.
    s.click(&row(&bs[1], "button[data-action=\"drain\"]")).await;
    let drained = eventually(Duration::from_secs(10), async || {
        s.text(&row(&bs[1], ".state")).await == "draining"
    })
    .await;
    assert!(drained.is_some(), "the page never showed the drain");
    assert_eq!(
        backend_state(lb.admin(), "app", bs[1].addr).await,
        "draining"
    );
    assert!(s
        .text("section[data-pool=\"app\"] h2")
        .await
        .contains("1 of 2 healthy"));
    assert_eq!(s.text(&row(&bs[1], "button")).await, "Enable");
    s.screenshot(&out.join("draining.png")).await;

    // On a phone-sized screen every backend is still there, as a card.
    s.resize(400, 900).await;
    assert_eq!(s.text(&row(&bs[0], ".state")).await, "healthy");
    s.screenshot(&out.join("narrow.png")).await;

    // And back: Enable puts it in rotation again.
    s.resize(1200, 700).await;
    s.click(&row(&bs[1], "button[data-action=\"enable\"]"))
        .await;
    let enabled = eventually(Duration::from_secs(10), async || {
        s.text(&row(&bs[1], ".state")).await == "healthy"
    })
    .await;
    assert!(enabled.is_some());

    // The page follows changes made elsewhere (its periodic refresh): a drain through the
    // API shows up without a reload or a click.
    let (status, _) = support::admin_call(
        lb.admin(),
        "POST",
        &format!("/pools/app/backends/{}/drain", bs[0].addr),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let followed = eventually(Duration::from_secs(10), async || {
        s.text(&row(&bs[0], ".state")).await == "draining"
    })
    .await;
    assert!(followed.is_some(), "the page did not refresh itself");
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_asks_for_it_and_then_works() {
    let Some(driver) = Driver::start() else {
        println!("SKIPPED: status page token test (chromedriver or chromium is not installed)");
        return;
    };
    let [b] = start_backends(["a"]).await;
    let lb = Ballast::start(
        &TestConfig::new(&[&b])
            .head("[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n")
            .build(),
    );
    let s = Session::new(&driver).await;
    s.goto(&format!("http://{}/", lb.admin())).await;
    // The page's first /status call gets 401 and prompts for the token.
    let prompted = eventually(Duration::from_secs(10), async || {
        s.cmd("GET", "/alert/text", None).await.is_string()
    })
    .await;
    assert!(prompted.is_some(), "no token prompt");
    s.cmd("POST", "/alert/text", Some(json!({"text": "s3cret"})))
        .await;
    s.cmd("POST", "/alert/accept", Some(json!({}))).await;
    let shown = eventually(Duration::from_secs(10), async || {
        s.text(&format!("tr[data-backend=\"{}\"] .state", b.addr))
            .await
            == "healthy"
    })
    .await;
    assert!(shown.is_some(), "the page did not load with the token");
    s.close().await;
}
