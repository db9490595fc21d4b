//! Active health checks: one probe task per (pool, backend), started and stopped as the
//! config changes.
//!
//! Probe tasks only do I/O and feed results to the backend's [`threshold::HealthCounter`].
//! Their interval carries ±5% jitter and the first probe a random offset, so a pool's
//! backends are not probed in lockstep. A task aborted by a reload records nothing, so a
//! probe cut short never counts as a failure.

pub mod threshold;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::balance::backend::Backend;
use crate::config::{HealthCheckConfig, Probe, UpstreamProtocol, UpstreamTls};
use crate::state::Snapshot;
use crate::tls::BackendTls;
use crate::upstream::{self, ConnSettings, UpstreamBody};
use threshold::Transition;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{0}")]
    Upstream(#[source] upstream::ConnectError),
    #[error("HTTP error: {0}")]
    Http(#[source] crate::upstream::UpstreamError),
    #[error("bad request: {0}")]
    Request(#[source] http::Error),
    #[error("unexpected status {0}")]
    Status(u16),
}

/// How a probe reaches the backend: the pool's protocol and TLS.
#[derive(Clone)]
pub struct Transport {
    pub protocol: UpstreamProtocol,
    pub tls: Option<BackendTls>,
    /// The settings `tls` was built from, to tell when they change.
    tls_config: Option<UpstreamTls>,
    /// Backends that expect a PROXY header get a LOCAL one with each HTTP probe.
    pub send_proxy: Option<crate::proxy_protocol::Version>,
}

struct Task {
    backend: Arc<Backend>,
    check: HealthCheckConfig,
    transport: (
        UpstreamProtocol,
        Option<UpstreamTls>,
        Option<crate::proxy_protocol::Version>,
    ),
    handle: JoinHandle<()>,
}

/// The running probe tasks, keyed by (pool, address). Owned by the reload path only.
#[derive(Default)]
pub struct HealthChecks {
    tasks: HashMap<(Arc<str>, SocketAddr), Task>,
}

impl HealthChecks {
    /// Makes the running tasks match `snap`: starts tasks for new backends or changed checks,
    /// stops tasks of removed backends. Returns one receiver per started task that fires after
    /// its first probe, for readiness.
    pub fn reconcile(&mut self, snap: &Snapshot) -> Vec<oneshot::Receiver<()>> {
        type Wanted = (Arc<Backend>, HealthCheckConfig, Transport);
        let mut wanted: HashMap<(Arc<str>, SocketAddr), Wanted> = HashMap::new();
        for pool in snap.pools.values() {
            if let Some(check) = &pool.config.health_check {
                let transport = Transport {
                    protocol: pool.config.protocol,
                    tls: pool.tls.clone(),
                    tls_config: pool.config.tls.clone(),
                    send_proxy: pool.config.send_proxy,
                };
                for b in &pool.backends {
                    wanted.insert(
                        (Arc::clone(&pool.name), b.addr),
                        (Arc::clone(b), check.clone(), transport.clone()),
                    );
                }
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted.get(key).is_some_and(|(b, check, t)| {
                Arc::ptr_eq(b, &task.backend)
                    && *check == task.check
                    && (t.protocol, &t.tls_config, t.send_proxy)
                        == (task.transport.0, &task.transport.1, task.transport.2)
            });
            if !keep {
                task.handle.abort();
            }
            keep
        });
        let mut first_rounds = Vec::new();
        for (key, (backend, check, transport)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            first_rounds.push(rx);
            let handle = tokio::spawn(run(
                Arc::clone(&key.0),
                Arc::clone(&backend),
                check.clone(),
                transport.clone(),
                tx,
            ));
            self.tasks.insert(
                key,
                Task {
                    backend,
                    check,
                    transport: (
                        transport.protocol,
                        transport.tls_config,
                        transport.send_proxy,
                    ),
                    handle,
                },
            );
        }
        first_rounds
    }

    pub fn stop_all(&mut self) {
        for (_, t) in self.tasks.drain() {
            t.handle.abort();
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn run(
    pool: Arc<str>,
    backend: Arc<Backend>,
    check: HealthCheckConfig,
    transport: Transport,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    // First probe soon, spread over a tenth of the interval (at most 100ms).
    let mut delay = check
        .interval
        .min(Duration::from_secs(1))
        .mul_f64(fastrand::f64() / 10.0);
    loop {
        tokio::time::sleep(delay).await;
        let result = probe(backend.addr, backend.tls_name.as_ref(), &check, &transport).await;
        let transition = backend.record_probe(result.is_ok());
        match (transition, &result) {
            (Some(Transition::Up), _) => {
                tracing::info!(pool = %pool, backend = %backend.label, "backend is healthy")
            }
            (Some(Transition::Down), Err(e)) => {
                tracing::warn!(pool = %pool, backend = %backend.label, reason = %e, "backend is unhealthy")
            }
            (_, Err(e)) => {
                tracing::debug!(pool = %pool, backend = %backend.label, reason = %e, "health probe failed")
            }
            _ => {}
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        delay = check.interval.mul_f64(0.95 + fastrand::f64() / 10.0);
    }
}

/// Runs one probe against `addr`, bounded by the check's timeout.
pub async fn probe(
    addr: SocketAddr,
    tls_name: Option<&rustls::pki_types::ServerName<'static>>,
    check: &HealthCheckConfig,
    transport: &Transport,
) -> Result<(), ProbeError> {
    match tokio::time::timeout(check.timeout, probe_inner(addr, tls_name, check, transport)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(check.timeout)),
    }
}

async fn probe_inner(
    addr: SocketAddr,
    tls_name: Option<&rustls::pki_types::ServerName<'static>>,
    check: &HealthCheckConfig,
    transport: &Transport,
) -> Result<(), ProbeError> {
    let Probe::Http {
        path,
        host,
        expect_status,
    } = &check.probe
    else {
        crate::net::connect(addr)
            .await
            .map_err(ProbeError::Connect)?;
        return Ok(());
    };
    // The same way requests go: TLS and HTTP/2 when the pool uses them.
    let settings = ConnSettings {
        connect_timeout: check.timeout,
        idle_timeout: check.timeout,
        max_idle: Some(0),
        send_timeout: check.timeout,
        protocol: transport.protocol,
    };
    let cut = CancellationToken::new();
    // Ends the probe's connection however the probe ends.
    let _close = cut.clone().drop_guard();
    let header = transport
        .send_proxy
        .map(crate::proxy_protocol::encode_local);
    let sender = upstream::connect(
        addr,
        &settings,
        transport.tls.as_ref(),
        tls_name,
        header.as_deref(),
        cut,
    )
    .await
    .map_err(ProbeError::Upstream)?;
    let host = match host {
        Some(h) => h.clone(),
        None => addr.to_string(),
    };
    let mut req =
        http::Request::get(path.as_str()).header(http::header::USER_AGENT, "ballast-health-check");
    req = match transport.protocol {
        UpstreamProtocol::Http1 => req
            .header(http::header::HOST, host)
            .header(http::header::CONNECTION, "close"),
        UpstreamProtocol::H2 => {
            let scheme = if transport.tls.is_some() {
                "https"
            } else {
                "http"
            };
            req.uri(format!("{scheme}://{host}{path}"))
                .version(http::Version::HTTP_2)
        }
    };
    let req = req.body(UpstreamBody::Empty).map_err(ProbeError::Request)?;
    let resp = sender
        .send(req)
        .await
        .map_err(|e| ProbeError::Http(e.into_error()))?;
    let status = resp.status().as_u16();
    if expect_status.contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}
