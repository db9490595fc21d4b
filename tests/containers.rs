//! What the container image and the Kubernetes manifests rely on: `ballast probe` (the
//! image's health check), `ballast demo-backend` (the compose replica), the admin
//! endpoint's lame-duck mode (the preStop hook), and the manifests themselves, validated
//! offline. docker/e2e.sh runs the image itself under docker-compose.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn probe(args: &[&str]) -> (bool, String) {
    let out = Command::new(ballast_bin())
        .arg("probe")
        .args(args)
        .output()
        .expect("run ballast probe");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exits_zero_only_on_a_2xx_answer() {
    let b = Backend::start("b").await;
    let (ok, err) = probe(&[&format!("http://{}/health", b.addr)]);
    assert!(ok, "{err}");
    let out = Command::new(ballast_bin())
        .args([
            "probe",
            "--body",
            &format!("http://{}/echo-path?x=1", b.addr),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/echo-path?x=1");
    let (ok, err) = probe(&[&format!("http://{}/status/503", b.addr)]);
    assert!(!ok);
    assert!(err.contains("status 503"), "{err}");
    let (_guard, refused) = refusing_addr();
    let (ok, err) = probe(&[&format!("http://{refused}/")]);
    assert!(!ok);
    assert!(err.contains("probe http://"), "{err}");
    let (ok, err) = probe(&["https://example.com/"]);
    assert!(!ok);
    assert!(err.contains("expected http://HOST:PORT/PATH"), "{err}");
    // A server that accepts and never answers: the timeout ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let started = Instant::now();
    let (ok, err) = probe(&[
        "--timeout",
        "300ms",
        &format!("http://{}/", silent.local_addr().unwrap()),
    ]);
    assert!(!ok);
    assert!(err.contains("no answer within 300ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_fails_readiness_and_keeps_serving() {
    let b = Backend::start("b").await;
    let lb = Ballast::start(&TestConfig::new(&[&b]).admin().build());
    let admin = lb.admin();
    let ready = format!("http://{admin}/ready");
    assert!(probe(&[&ready]).0);
    // The preStop hook of config/kubernetes/deployment.yaml, with a shorter wait.
    let started = Instant::now();
    let (ok, err) = probe(&[
        "--method",
        "POST",
        &format!("http://{admin}/lame-duck?wait=400ms"),
    ]);
    assert!(ok, "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the hook is held for the wait"
    );
    let (ok, err) = probe(&[&ready]);
    assert!(!ok && err.contains("status 503"), "{err}");
    // Still serving: only readiness changed.
    assert_eq!(get(lb.addr("web"), "/").await.status, 200);
    assert!(lb.wait_for_log("lame duck", WAIT));
    let (status, _) = admin_call(admin, "POST", "/lame-duck?wait=1h", None).await;
    assert_eq!(status, 400, "waits are bounded");
}

#[test]
fn demo_backend_answers_with_its_host_name_and_drains_on_sigterm() {
    let mut child = Command::new(ballast_bin())
        .args([
            "demo-backend",
            "--bind",
            "127.0.0.1:0",
            "--lame-duck",
            "300ms",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start demo-backend");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("first line");
    // "demo backend NAME on ADDR"
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: std::net::SocketAddr = addr.parse().expect("address in the first line");
    let r = rt.block_on(get(addr, "/x"));
    assert_eq!(r.body, format!("hello from {} (path /x)\n", host.trim()));
    assert_eq!(rt.block_on(get(addr, "/health")).status, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    line.clear();
    out.read_line(&mut line).expect("lame duck line");
    assert!(line.contains("failing /health"), "{line}");
    // During the lame duck: still serving, health failing.
    assert_eq!(rt.block_on(get(addr, "/health")).status, 503);
    assert_eq!(rt.block_on(get(addr, "/")).status, 200);
    let status = child.wait().expect("exit");
    assert!(status.success(), "{status}");
}

const MANIFESTS: [&str; 4] = [
    "configmap.yaml",
    "deployment.yaml",
    "service.yaml",
    "pdb.yaml",
];

const SECRET_PATH: &str = "/run/secrets/ballast/admin-token";

/// The ballast.toml of config/kubernetes/configmap.yaml, with the Secret's mount point
/// replaced by `token_file`.
fn configmap_toml(token_file: &std::path::Path) -> String {
    configmap_toml_of("configmap.yaml", token_file)
}

/// The ballast.toml of the ConfigMap in `file` (under config/kubernetes).
fn configmap_toml_of(file: &str, token_file: &std::path::Path) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes");
    let cm = std::fs::read_to_string(dir.join(file)).unwrap();
    let toml: String = cm
        .split_once("ballast.toml: |\n")
        .expect("ballast.toml in the ConfigMap")
        .1
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(
        toml.contains(SECRET_PATH),
        "the ConfigMap reads the Secret's token"
    );
    toml.replace(SECRET_PATH, &token_file.display().to_string())
}

/// What the kubelet mounts from the Secret `ballast-admin`: a file `admin-token`.
fn mounted_secret(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("admin-token");
    std::fs::write(&path, "k8s-admin-token").unwrap();
    path
}

/// The exec command of `key` (`readinessProbe:`, `livenessProbe:`, `preStop:`) in
/// deployment.yaml, written as a JSON-style list on one line or as a YAML list.
fn exec_command(deployment: &str, key: &str) -> Vec<String> {
    let after = deployment.split_once(key).expect(key).1;
    let (_, rest) = after.split_once("command:").expect("an exec command");
    let rest = rest.trim_start_matches(' ');
    if rest.starts_with('[') {
        let list = &rest[..rest.find(']').expect("]") + 1];
        return serde_json::from_str(list).expect("a JSON-style list");
    }
    rest.lines()
        .skip(1)
        .map(str::trim)
        .take_while(|l| l.starts_with("- "))
        .map(|l| l[2..].to_string())
        .collect()
}

/// The ConfigMap's config and the Deployment's probes and preStop hook, run as the
/// kubelet runs them, with the admin token set: readiness and liveness pass without the
/// token, the hook sends it from the mounted Secret and turns readiness off, and the
/// token scrapes /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_probes_and_hook_run_with_the_admin_token() {
    let app = Backend::start("app").await;
    let secret = tempfile::tempdir().unwrap();
    let token_file = mounted_secret(secret.path());
    let config = configmap_toml(&token_file)
        .replace("0.0.0.0:9000", "127.0.0.1:0")
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace(
            "app-headless.default.svc.cluster.local:8000",
            &format!("localhost:{}", app.addr.port()),
        );
    let lb = Ballast::start(&config);
    let admin = lb.admin();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes");
    let deployment = std::fs::read_to_string(dir.join("deployment.yaml")).unwrap();
    let run = |key: &str| {
        let argv: Vec<String> = exec_command(&deployment, key)
            .into_iter()
            .map(|a| {
                a.replace("/usr/local/bin/ballast", ballast_bin())
                    .replace("127.0.0.1:9000", &admin.to_string())
                    .replace(SECRET_PATH, &token_file.display().to_string())
                    .replace("wait=10s", "wait=100ms")
            })
            .collect();
        let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run("readinessProbe:");
    assert!(ok, "readiness with a token set: {err}");
    let (ok, err) = run("livenessProbe:");
    assert!(ok, "liveness: {err}");
    // The Prometheus scrape: the token as bearer credentials.
    let (status, _) = admin_call(admin, "GET", "/metrics", Some("k8s-admin-token")).await;
    assert_eq!(status, 200);
    assert_eq!(admin_call(admin, "GET", "/metrics", None).await.0, 401);
    let (ok, err) = run("preStop:");
    assert!(ok, "the preStop hook: {err}");
    let (ok, err) = run("readinessProbe:");
    assert!(
        !ok && err.contains("503"),
        "not ready after the hook: {err}"
    );
    let (ok, err) = run("livenessProbe:");
    assert!(ok, "still live: {err}");
    assert_eq!(get(lb.addr("web"), "/").await.status, 200, "still serving");
}

#[test]
fn kubernetes_manifests_validate_offline() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes");
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for m in MANIFESTS {
        assert!(kustomization.contains(m), "kustomization lists {m}");
    }
    // The config inside the ConfigMap is a valid ballast config, with its Secret mounted.
    let secret = tempfile::tempdir().unwrap();
    let (ok, err) = check_config(&configmap_toml(&mounted_secret(secret.path())));
    assert!(ok, "the ConfigMap's ballast.toml: {err}");

    kubernetes_validate(&MANIFESTS.map(|m| dir.join(m)), 5);
}

/// Runs `kubernetes-validate --strict` on `files`, which hold `resources` resources; says
/// SKIPPED when it is not installed.
fn kubernetes_validate(files: &[std::path::PathBuf], resources: usize) {
    let found = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if !found.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: kubernetes-validate is not installed (.ci/run installs it with pip); only the embedded config was checked");
        return;
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches(" passed for resource ").count(),
        resources,
        "{text}"
    );
    assert!(!text.contains("ERROR"), "{text}");
}

/// config/kubernetes/acme, the overlay README's ACME section applies: its kustomization
/// names its files and the base; its patches name what the base has; its ConfigMap's
/// config passes `--check`; the full resources in it validate offline.
#[test]
fn kubernetes_acme_overlay_validates_offline() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kubernetes");
    let dir = root.join("acme");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    let kustomization = read(&dir.join("kustomization.yaml"));
    for m in [
        "- ../",
        "pvc.yaml",
        "configmap.yaml",
        "deployment-patch.yaml",
        "service-patch.yaml",
    ] {
        assert!(kustomization.contains(m), "the overlay lists {m}");
    }
    let deployment = read(&root.join("deployment.yaml"));
    let patch = read(&dir.join("deployment-patch.yaml"));
    for (what, needle) in [
        (
            "the Deployment",
            "kind: Deployment\nmetadata:\n  name: ballast\n",
        ),
        ("its container", "        - name: ballast\n"),
    ] {
        assert!(
            deployment.contains(needle) && patch.contains(needle),
            "{what} is named as in the base"
        );
    }
    assert!(
        patch.contains("mountPath: /var/lib/ballast/acme")
            && patch.contains("claimName: ballast-acme")
    );
    assert!(read(&dir.join("pvc.yaml")).contains("name: ballast-acme"));
    let service = read(&dir.join("service-patch.yaml"));
    assert!(
        read(&root.join("service.yaml")).contains("kind: Service\nmetadata:\n  name: ballast\n")
    );
    assert!(
        service.contains("targetPort: https")
            && patch.contains("- name: https\n              containerPort: 8443")
    );
    let secret = tempfile::tempdir().unwrap();
    let toml = configmap_toml_of("acme/configmap.yaml", &mounted_secret(secret.path()));
    assert!(
        toml.contains("[listeners.https.tls.acme]") && toml.contains("bind = \"0.0.0.0:8443\"")
    );
    let (ok, err) = check_config(&toml);
    assert!(ok, "the overlay's ballast.toml: {err}");

    kubernetes_validate(&["pvc.yaml", "configmap.yaml"].map(|m| dir.join(m)), 2);
}

/// docker/compose.acme.yml over docker/compose.yml, as README runs them: compose merges
/// them into the ports and volume README describes, and the config it mounts passes
/// `--check` with the variables README exports.
#[test]
fn the_compose_acme_override_merges_and_its_config_checks() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let env = [
        ("BALLAST_ADMIN_TOKEN", "example-token"),
        ("BALLAST_DOMAIN", "example.com"),
        ("BALLAST_ACME_EMAIL", "ops@example.com"),
    ];
    let config = root.join("docker/compose-acme/ballast.toml");
    let out = Command::new(support::ballast_bin())
        .arg("--config")
        .arg(&config)
        .arg("--check")
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let have = Command::new("docker-compose").arg("version").output();
    if !have.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: docker-compose config (docker-compose is not installed); only the config was checked");
        return;
    }
    let out = Command::new("docker-compose")
        .current_dir(root)
        .args([
            "-f",
            "docker/compose.yml",
            "-f",
            "docker/compose.acme.yml",
            "config",
        ])
        .envs(env)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "docker/compose-acme:/etc/ballast:ro",
        "acme:/var/lib/ballast/acme:rw",
        "published: 80\n      target: 8080",
        "published: 443\n      target: 8443",
        "BALLAST_DOMAIN: example.com",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
}
