//! `ballast demo`: three built-in backends on ephemeral loopback ports, each answering with
//! its own name, and ballast in front of them. Nothing else needs to be installed.
//! `ballast demo-backend`: one such backend alone, answering with its host name: the
//! replica of the docker-compose blueprint (docker/compose.yml).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Starts one demo backend on an ephemeral port; it answers every request with
/// `hello from NAME` and has a `/health` endpoint.
pub async fn start_backend(name: String) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let healthy = Arc::new(AtomicBool::new(true));
    tokio::spawn(serve_backend(
        listener,
        name,
        healthy,
        CancellationToken::new(),
    ));
    Ok(addr)
}

/// `ballast demo-backend`: one demo backend on `bind`, named after the machine's host name
/// (a container's ID in Docker), until SIGTERM or SIGINT. Then it shuts down like a
/// well-behaved replica behind a balancer: for `lame_duck` it keeps serving but fails its
/// `/health` (so balancers stop sending it work before it goes), then stops accepting and
/// finishes what is in flight.
pub async fn run_backend(
    bind: SocketAddr,
    lame_duck: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    use tokio::signal::unix::{signal, SignalKind};
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "demo-backend".into());
    let listener = TcpListener::bind(bind).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    println!("demo backend {name} on {}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let healthy = Arc::new(AtomicBool::new(true));
    let served = tokio::spawn(serve_backend(
        listener,
        name,
        Arc::clone(&healthy),
        stop.clone(),
    ));
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    healthy.store(false, Ordering::Relaxed);
    println!("stopping: failing /health for {lame_duck:?}, then draining");
    tokio::select! {
        _ = tokio::time::sleep(lame_duck) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), served).await;
    Ok(())
}

/// Serves demo requests on `listener` until `stop`; then closes the listener, lets open
/// connections finish their current request, and returns. `/health` answers 200 while
/// `healthy`, else 503.
async fn serve_backend(
    listener: TcpListener,
    name: String,
    healthy: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (name, healthy) = (name.clone(), Arc::clone(&healthy));
        let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let mut response = if req.uri().path() == "/health" {
                http::Response::new(Full::new(Bytes::from_static(b"ok\n")))
            } else {
                let text = format!("hello from {name} (path {})\n", req.uri().path());
                http::Response::new(Full::new(Bytes::from(text)))
            };
            if req.uri().path() == "/health" && !healthy.load(Ordering::Relaxed) {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            async move { Ok::<_, Infallible>(response) }
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The demo's config: one listener on `bind`, a round-robin pool of `backends` with HTTP
/// health checks, the admin endpoint on `admin`, an access log on standard output.
pub fn config_text(bind: SocketAddr, admin: SocketAddr, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"[admin]
bind = "{admin}"

[access_log]
format = "combined"

[listeners.demo]
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
pub async fn run(bind: SocketAddr, admin: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let mut backends = Vec::new();
    for i in 1..=3 {
        backends.push(start_backend(format!("demo-backend-{i}")).await?);
    }
    let text = config_text(bind, admin, &backends);
    let config = Config::from_toml_str(&text, &PathBuf::from("<demo>"))?;
    println!("ballast demo: backends {backends:?}");
    println!("try:  for i in 1 2 3 4 5 6; do curl -s http://{bind}/; done");
    println!("status page: http://{admin}/   metrics: http://{admin}/metrics");
    println!("Ctrl-C to stop.");
    crate::app::run(config, None, false).await?;
    Ok(())
}
