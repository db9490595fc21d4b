//! Secrets and the environment: `${env:NAME}` in a running daemon, `$${` and request
//! variables side by side, the admin token from `token_file` rotated while running, and the
//! probes that must work without the token (`/ready`, `/live`) next to the calls that must
//! not (`/status`, `/metrics`, lame duck, reload, drain).

mod support;

use std::process::Command;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_fill_a_running_config_beside_request_variables() {
    let [a] = start_backends(["a"]).await;
    let config = TestConfig::addresses(["${env:BALLAST_T_APP}"])
        .listener(
            r#"request_headers = { set = { "X-Ip" = "${client_ip}", "X-Literal" = "$${client_ip}", "X-Env" = "${env:BALLAST_T_DEPLOY:-dev}", "X-Region" = "${env:BALLAST_T_REGION}" } }"#,
        )
        .build();
    let lb = Ballast::start_with(
        &config,
        &[
            ("BALLAST_T_APP", &a.addr.to_string()),
            // A value with `${` in it stays text: it is not read as a request variable.
            ("BALLAST_T_REGION", "eu-${west}"),
        ],
    );
    let r = get(lb.addr("web"), "/headers/x").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen: Vec<&str> = r.body.lines().collect();
    assert!(seen.contains(&"x-ip: 127.0.0.1"), "{seen:?}");
    assert!(seen.contains(&"x-literal: ${client_ip}"), "{seen:?}");
    assert!(seen.contains(&"x-env: dev"), "{seen:?}");
    assert!(seen.contains(&"x-region: eu-${west}"), "{seen:?}");
    assert_eq!(a.hits(), 1, "the backend came from the environment");
}

fn token_config(token_file: &std::path::Path) -> String {
    TestConfig::addresses(["127.0.0.1:9"])
        .head(&format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_applies_while_running() {
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("admin-token");
    std::fs::write(&file, "first-token\n").unwrap();
    let lb = Ballast::start(&token_config(&file));
    let admin = lb.admin();
    assert_eq!(
        admin_call(admin, "GET", "/status", Some("first-token"))
            .await
            .0,
        200
    );
    assert_eq!(admin_call(admin, "GET", "/status", None).await.0, 401);
    // Rotate the way Kubernetes and Docker do: a new file renamed over the old one.
    let tmp = secrets.path().join(".admin-token.new");
    std::fs::write(&tmp, "second-token\n").unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    // The watch reloads; the new token works and the old one no longer does.
    assert!(
        eventually(WAIT, async || admin_call(
            admin,
            "GET",
            "/status",
            Some("second-token")
        )
        .await
        .0 == 200)
        .await
        .is_some(),
        "the new token was never accepted; log:\n{}",
        lb.logs()
    );
    assert_eq!(
        admin_call(admin, "GET", "/status", Some("first-token"))
            .await
            .0,
        401
    );
    assert_eq!(
        admin_call(admin, "GET", "/metrics", Some("first-token"))
            .await
            .0,
        401
    );
    // The reload is logged, and the token's value is not.
    assert!(lb.wait_for_log("config reloaded", WAIT));
    assert!(!lb.logs().contains("second-token") && !lb.logs().contains("first-token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_need_no_token_and_everything_else_does() {
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("admin-token");
    std::fs::write(&file, "s3cret\n").unwrap();
    let lb = Ballast::start(&token_config(&file));
    let admin = lb.admin();
    // What Docker's HEALTHCHECK and a Kubernetes probe send: no credentials.
    assert_eq!(admin_call(admin, "GET", "/ready", None).await.0, 200);
    assert_eq!(admin_call(admin, "GET", "/live", None).await.0, 200);
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("POST", "/reload"),
        ("POST", "/lame-duck"),
        ("POST", "/pools/app/backends/127.0.0.1:9/drain"),
    ] {
        assert_eq!(
            admin_call(admin, method, path, None).await.0,
            401,
            "{method} {path}"
        );
        assert_eq!(
            admin_call(admin, method, path, Some("wrong")).await.0,
            401,
            "{method} {path}"
        );
    }
    let ballast_probe = |args: &[&str]| {
        let out = Command::new(ballast_bin())
            .arg("probe")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The image's HEALTHCHECK and the readiness probe, as shipped.
    let (ok, err) = ballast_probe(&[&format!("http://{admin}/ready")]);
    assert!(ok, "{err}");
    // The preStop hook needs the token: without it 401, with --token-file or --header it
    // enters lame duck.
    let lame = format!("http://{admin}/lame-duck?wait=0s");
    let (ok, err) = ballast_probe(&["--method", "POST", &lame]);
    assert!(!ok && err.contains("status 401"), "{err}");
    let (ok, err) = ballast_probe(&[
        "--header",
        "Authorization: Bearer s3cret",
        &format!("http://{admin}/status"),
    ]);
    assert!(ok, "{err}");
    let (ok, err) = ballast_probe(&[
        "--method",
        "POST",
        "--token-file",
        file.to_str().unwrap(),
        &lame,
    ]);
    assert!(ok, "{err}");
    let (ok, err) = ballast_probe(&[&format!("http://{admin}/ready")]);
    assert!(!ok && err.contains("status 503"), "lame duck: {err}");
    let (ok, _) = ballast_probe(&[&format!("http://{admin}/live")]);
    assert!(ok, "still alive in lame duck");
    // Bad arguments are refused before any request.
    let (ok, err) = ballast_probe(&["--token-file", "/nonexistent/token", &lame]);
    assert!(
        !ok && err.contains("--token-file /nonexistent/token"),
        "{err}"
    );
    let (ok, err) = ballast_probe(&["--header", "no colon", &lame]);
    assert!(!ok && err.contains("expected \"Name: value\""), "{err}");
}
