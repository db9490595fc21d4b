//! `ballast probe URL`: one HTTP request (GET unless told), exit status 0 on a 2xx answer. It is the health check
//! of the container image, which is built FROM scratch and has no curl, and the client of
//! hooks that call the admin endpoint with its token (`--token-file`, `--header`).

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

/// Request header fields from `--header "Name: value"` arguments, plus `Authorization:
/// Bearer <token>` from `--token-file`.
pub fn request_headers(
    args: &[String],
    token_file: Option<&std::path::Path>,
) -> Result<http::HeaderMap, String> {
    let mut map = http::HeaderMap::new();
    for arg in args {
        let bad = || format!("{arg}: expected \"Name: value\"");
        let (name, value) = arg.split_once(':').ok_or_else(bad)?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        let value = http::HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        map.append(name, value);
    }
    if let Some(path) = token_file {
        map.insert(http::header::AUTHORIZATION, bearer_from_file(path)?);
    }
    Ok(map)
}

/// `Authorization: Bearer <token>` with the token read from `path` (a Kubernetes or Docker
/// secret file; its trailing newline is not part of the token).
fn bearer_from_file(path: &std::path::Path) -> Result<http::HeaderValue, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
    let token = text.trim_end_matches(['\r', '\n']);
    if token.trim().is_empty() {
        return Err(format!(
            "--token-file {}: the file is empty",
            path.display()
        ));
    }
    http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| format!("--token-file {}: not a valid header value", path.display()))
}

const MAX_BODY: usize = 1024 * 1024;

/// What a successful probe got.
#[derive(Debug)]
pub struct Answer {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
}

/// Sends `method` with `headers` to `url` (plain `http://` only) within `timeout`; `Ok`
/// with the status and body when the status is 2xx.
pub async fn probe(
    method: http::Method,
    url: &str,
    headers: http::HeaderMap,
    timeout: Duration,
) -> Result<Answer, ProbeError> {
    match tokio::time::timeout(timeout, request(method, url, headers)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

async fn request(
    method: http::Method,
    url: &str,
    headers: http::HeaderMap,
) -> Result<Answer, ProbeError> {
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
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::USER_AGENT, "ballast-probe")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|_| bad())?;
    req.headers_mut().extend(headers);
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
