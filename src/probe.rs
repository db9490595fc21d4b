//! `ballast probe URL`: one HTTP request (GET unless told), exit status 0 on a 2xx answer. It is the health check
//! of the container image, which is built FROM scratch and has no curl.

use std::time::Duration;

use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}: expected http://HOST:PORT/PATH")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("status {0}")]
    Status(http::StatusCode),
    #[error("the body broke off or is larger than 1 MiB")]
    Body,
}

const MAX_BODY: usize = 1024 * 1024;

/// What a successful probe got.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
}

/// Sends `method` to `url` (plain `http://` only) within `timeout`; `Ok` with the status
/// and body when the status is 2xx.
pub async fn probe(
    method: http::Method,
    url: &str,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    match tokio::time::timeout(timeout, request(method, url)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn request(method: http::Method, url: &str) -> Result<Answer, ProbeError> {
    let bad = || ProbeError::Url(url.to_string());
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((authority.host(), port)).await?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::USER_AGENT, "ballast-probe")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|_| bad())?;
    let response = sender.send_request(req).await?;
    let status = response.status();
    if !status.is_success() {
        return Err(ProbeError::Status(status));
    }
    // Bounded: a probe reads status pages, not downloads.
    let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
    let body = http_body_util::BodyExt::collect(limited)
        .await
        .map_err(|_| ProbeError::Body)?
        .to_bytes();
    Ok(Answer { status, body })
}
