//! `ballast demo`: three built-in backends on ephemeral loopback ports, each answering with
//! its own name, and ballast in front of them. Nothing else needs to be installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::Config;

/// Starts one demo backend on an ephemeral port; it answers every request with
/// `hello from NAME` and has a `/health` endpoint.
pub async fn start_backend(name: String) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let text = if req.uri().path() == "/health" {
                        "ok\n".to_string()
                    } else {
                        format!("hello from {name} (path {})\n", req.uri().path())
                    };
                    async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(text)))) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The demo's config: one listener on `bind`, a round-robin pool of `backends` with HTTP
/// health checks.
pub fn config_text(bind: SocketAddr, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"[listeners.demo]
bind = "{bind}"
pool = "demo"

[pools.demo]
algorithm = "round_robin"
backends = [{}]

[pools.demo.health_check]
kind = "http"
path = "/health"
interval = "2s"
timeout = "1s"
"#,
        list.join(", ")
    )
}

/// Runs the demo until Ctrl-C.
pub async fn run(bind: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(start_backend(format!("demo-backend-{i}")).await?);
    }
    let text = config_text(bind, &backends);
    let config = Config::from_toml_str(&text, &PathBuf::from("<demo>"))?;
    println!("ballast demo: backends {backends:?}");
    println!("try:  for i in 1 2 3 4 5 6; do curl -s http://{bind}/; done");
    println!("Ctrl-C to stop.");
    crate::app::run(config, None, false).await?;
    Ok(())
}
