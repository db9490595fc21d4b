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

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::balance::backend::Backend;
use crate::config::{HealthCheckConfig, Probe};
use crate::state::Snapshot;
use threshold::Transition;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP error: {0}")]
    Http(#[source] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[source] http::Error),
    #[error("unexpected status {0}")]
    Status(u16),
}

struct Task {
    backend: Arc<Backend>,
    check: HealthCheckConfig,
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
        let mut wanted: HashMap<(Arc<str>, SocketAddr), (Arc<Backend>, HealthCheckConfig)> =
            HashMap::new();
        for pool in snap.pools.values() {
            if let Some(check) = &pool.config.health_check {
                for b in &pool.backends {
                    wanted.insert(
                        (Arc::clone(&pool.name), b.addr),
                        (Arc::clone(b), check.clone()),
                    );
                }
            }
        }
        self.tasks.retain(|key, task| {
            let keep = wanted
                .get(key)
                .is_some_and(|(b, check)| Arc::ptr_eq(b, &task.backend) && *check == task.check);
            if !keep {
                task.handle.abort();
            }
            keep
        });
        let mut first_rounds = Vec::new();
        for (key, (backend, check)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            first_rounds.push(rx);
            let handle = tokio::spawn(run(
                Arc::clone(&key.0),
                Arc::clone(&backend),
                check.clone(),
                tx,
            ));
            self.tasks.insert(
                key,
                Task {
                    backend,
                    check,
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
        let result = probe(backend.addr, &check).await;
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
pub async fn probe(addr: SocketAddr, check: &HealthCheckConfig) -> Result<(), ProbeError> {
    match tokio::time::timeout(check.timeout, probe_inner(addr, &check.probe)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(check.timeout)),
    }
}

async fn probe_inner(addr: SocketAddr, probe: &Probe) -> Result<(), ProbeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(ProbeError::Connect)?;
    let Probe::Http {
        path,
        host,
        expect_status,
    } = probe
    else {
        return Ok(());
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(ProbeError::Http)?;
    let conn = tokio::spawn(conn);
    let host = match host {
        Some(h) => h.clone(),
        None => addr.to_string(),
    };
    let req = http::Request::get(path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "ballast-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(ProbeError::Request)?;
    let resp = sender.send_request(req).await.map_err(ProbeError::Http);
    conn.abort();
    let status = resp?.status().as_u16();
    if expect_status.contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}
