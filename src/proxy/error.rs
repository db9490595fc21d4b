//! Errors at the data-plane edge and the one place that maps them to HTTP statuses.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::request_body::ClientFault;
use crate::upstream::ConnectError;

/// Who caused a failed request: what decides whether a backend is blamed for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something wrong, stalled or went away: never counted against a backend.
    Client,
    /// The backend failed: counted for passive ejection and may be retried elsewhere.
    Backend,
    /// Ballast's own state (no backend available, a reload, a drain).
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy backend in pool {pool}")]
    NoHealthyBackend { pool: Arc<str> },
    #[error("every backend of pool {pool} at max_connections for queue_timeout ({waited:?})")]
    QueueTimeout { pool: Arc<str>, waited: Duration },
    #[error("every backend of pool {pool} at max_connections and its queue full")]
    QueueFull { pool: Arc<str> },
    #[error("{0}")]
    Connect(#[source] ConnectError),
    #[error("upstream failed before responding: {0}")]
    Upstream(#[source] crate::upstream::UpstreamError),
    #[error("no response header within {0:?}")]
    ResponseTimeout(Duration),
    #[error("listener was removed by a reload")]
    ListenerGone,
    #[error("backend was drained and its drain timeout cut the request")]
    DrainCut,
    #[error("{0}")]
    Client(#[source] ClientFault),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoHealthyBackend { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::QueueFull { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(ConnectError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect(
                ConnectError::Io(_) | ConnectError::Tls(_) | ConnectError::Handshake(_),
            ) => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ListenerGone => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::DrainCut => StatusCode::BAD_GATEWAY,
            ProxyError::Client(ClientFault::Malformed | ClientFault::Aborted) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Client(ClientFault::Timeout(_)) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Client(ClientFault::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ProxyError::Connect(_) | ProxyError::Upstream(_) | ProxyError::ResponseTimeout(_) => {
                Side::Backend
            }
            ProxyError::NoHealthyBackend { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::ListenerGone
            | ProxyError::DrainCut => Side::Proxy,
            ProxyError::Client(_) => Side::Client,
        }
    }

    /// Short machine-friendly reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::NoHealthyBackend { .. } => "no_healthy_backend",
            ProxyError::QueueTimeout { .. } => "queue_timeout",
            ProxyError::QueueFull { .. } => "queue_full",
            ProxyError::Connect(ConnectError::Timeout(_)) => "connect_timeout",
            ProxyError::Connect(ConnectError::Io(_)) => "connect_failed",
            ProxyError::Connect(ConnectError::Handshake(_)) => "handshake_failed",
            ProxyError::Connect(ConnectError::Tls(_)) => "tls_failed",
            ProxyError::Upstream(_) => "upstream_failed",
            ProxyError::ResponseTimeout(_) => "response_timeout",
            ProxyError::ListenerGone => "listener_gone",
            ProxyError::DrainCut => "drain_timeout",
            ProxyError::Client(ClientFault::Malformed) => "bad_request_body",
            ProxyError::Client(ClientFault::Aborted) => "client_aborted",
            ProxyError::Client(ClientFault::Timeout(_)) => "body_timeout",
            ProxyError::Client(ClientFault::TooLarge(_)) => "body_too_large",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_is_pinned() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases = [
            (ProxyError::NoHealthyBackend { pool: "p".into() }, 503),
            (
                ProxyError::Connect(ConnectError::Timeout(Duration::from_secs(1))),
                504,
            ),
            (ProxyError::Connect(ConnectError::Io(io())), 502),
            (ProxyError::ResponseTimeout(Duration::from_secs(1)), 504),
            (ProxyError::ListenerGone, 503),
            (ProxyError::DrainCut, 502),
            (ProxyError::Client(ClientFault::Malformed), 400),
            (ProxyError::Client(ClientFault::Aborted), 400),
            (
                ProxyError::Client(ClientFault::Timeout(Duration::from_secs(1))),
                408,
            ),
            (ProxyError::Client(ClientFault::TooLarge(1)), 413),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
        }
    }

    #[test]
    fn only_backend_failures_are_the_backends() {
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases = [
            (ProxyError::Connect(ConnectError::Io(io())), Side::Backend),
            (
                ProxyError::ResponseTimeout(Duration::from_secs(1)),
                Side::Backend,
            ),
            (
                ProxyError::NoHealthyBackend { pool: "p".into() },
                Side::Proxy,
            ),
            (ProxyError::DrainCut, Side::Proxy),
            (ProxyError::ListenerGone, Side::Proxy),
            (ProxyError::Client(ClientFault::Malformed), Side::Client),
            (ProxyError::Client(ClientFault::Aborted), Side::Client),
            (
                ProxyError::Client(ClientFault::Timeout(Duration::from_secs(1))),
                Side::Client,
            ),
            (ProxyError::Client(ClientFault::TooLarge(1)), Side::Client),
        ];
        for (e, side) in cases {
            assert_eq!(e.side(), side, "{e}");
        }
    }

    #[test]
    fn every_error_reason_has_a_slot() {
        let errors = [
            ProxyError::NoHealthyBackend { pool: "p".into() },
            ProxyError::QueueTimeout {
                pool: "p".into(),
                waited: Duration::ZERO,
            },
            ProxyError::QueueFull { pool: "p".into() },
            ProxyError::Connect(ConnectError::Timeout(Duration::ZERO)),
            ProxyError::Connect(ConnectError::Io(
                std::io::ErrorKind::ConnectionRefused.into(),
            )),
            ProxyError::ListenerGone,
            ProxyError::DrainCut,
            ProxyError::ResponseTimeout(std::time::Duration::ZERO),
            ProxyError::Client(ClientFault::Malformed),
            ProxyError::Client(ClientFault::Aborted),
            ProxyError::Client(ClientFault::Timeout(std::time::Duration::ZERO)),
            ProxyError::Client(ClientFault::TooLarge(1)),
        ];
        for e in errors {
            assert!(
                crate::stats::REASONS.contains(&e.reason()),
                "{}",
                e.reason()
            );
        }
    }
}
