//! Test PKI and TLS clients: a CA made with rcgen per test, leaf certificates for chosen
//! names written to a temporary folder, and rustls clients that trust that CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A CA and the folder its certificates are written to.
pub struct Pki {
    pub dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pub ca_path: PathBuf,
}

/// A leaf certificate as files, and its DER for comparing what a handshake served.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).expect("ca cert");
        let ca_path = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca_path, ca.pem()).expect("write ca");
        Pki { dir, ca, ca_path }
    }

    /// A leaf for `names`, valid for a year, written as `STEM.pem` / `STEM.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Leaf {
        self.issue_until(
            stem,
            names,
            time::OffsetDateTime::now_utc() + time::Duration::days(365),
        )
    }

    /// A leaf that expires at `not_after`.
    pub fn issue_until(&self, stem: &str, names: &[&str], not_after: time::OffsetDateTime) -> Leaf {
        self.write(stem, self.make_leaf(names, not_after))
    }

    fn write(&self, stem: &str, leaf: Leaf) -> Leaf {
        let cert = self.dir.path().join(format!("{stem}.pem"));
        let key = self.dir.path().join(format!("{stem}.key"));
        std::fs::write(&cert, &leaf.cert_pem).expect("write cert");
        std::fs::write(&key, &leaf.key_pem).expect("write key");
        Leaf { cert, key, ..leaf }
    }

    /// A leaf for `names` with an RSA-2048 key (a fixed test-only key: ring, rcgen's
    /// backend here, cannot generate RSA keys), written under `stem`.
    pub fn issue_rsa(&self, stem: &str, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::from_pem(include_str!("../fixtures/test-only-rsa2048.key"))
            .expect("the RSA fixture key");
        let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(30);
        self.write(stem, self.leaf_with(key, names, not_after))
    }

    /// A leaf held in memory only (for replacing files in a test's own way).
    pub fn make_leaf(&self, names: &[&str], not_after: time::OffsetDateTime) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        self.leaf_with(key, names, not_after)
    }

    /// A leaf for `names` with `key`, signed by the CA.
    fn leaf_with(
        &self,
        key: rcgen::KeyPair,
        names: &[&str],
        not_after: time::OffsetDateTime,
    ) -> Leaf {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        params.not_after = not_after;
        let cert = params.signed_by(&key, &*self.ca).expect("sign leaf");
        Leaf {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("add ca");
        roots
    }

    /// A client trusting this CA, offering `alpn`. Every handshake is a full one, so the
    /// certificate a test sees is the one the server presented then (a resumed session
    /// would show the one of the session it resumed).
    pub fn client(&self, alpn: &[&str]) -> TlsConnector {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        connector(config, alpn)
    }

    /// [`Pki::client`] that keeps its sessions' tickets and resumes with them.
    pub fn client_resuming(&self, alpn: &[&str]) -> TlsConnector {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    /// A client trusting this CA that presents `leaf` as its certificate.
    pub fn client_with_cert(&self, leaf: &Leaf) -> TlsConnector {
        let chain = vec![CertificateDer::from(leaf.der.clone())];
        let key = rustls::pki_types::pem::PemObject::from_pem_slice(leaf.key_pem.as_bytes())
            .map(|k: PrivateKeyDer<'static>| k)
            .expect("client key");
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_client_auth_cert(chain, key)
            .expect("client cert");
        connector(config, &["http/1.1"])
    }

    /// A client trusting this CA that speaks only TLS 1.2.
    pub fn client_tls12(&self) -> TlsConnector {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        connector(config, &["http/1.1"])
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ballast::tls::crypto::default_provider())
}

fn connector(mut config: ClientConfig, alpn: &[&str]) -> TlsConnector {
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// Connects and completes a handshake. `sni = None` connects by IP address, which sends no
/// SNI.
pub async fn connect(
    addr: SocketAddr,
    sni: Option<&str>,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let fut = connector.connect(name, tcp);
    tokio::time::timeout(super::WAIT, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))?
}

/// The leaf certificate the server presented.
pub fn served_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default()
}

pub fn alpn(s: &TlsStream<TcpStream>) -> Option<String> {
    s.get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// GET `path` over HTTP/1.1 on an established stream.
pub async fn get_h1<S>(stream: S, host: &str, path: &str) -> Result<super::Reply, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::Full;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(Full::<bytes::Bytes>::default())
        .expect("request");
    super::reply_of(sender.send_request(req).await?).await
}

/// GET `path` over HTTP/2 on an established stream (ALPN chose `h2`).
pub async fn get_h2<S>(stream: S, authority: &str, path: &str) -> Result<super::Reply, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::Full;
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://{authority}{path}"))
        .body(Full::<bytes::Bytes>::default())
        .expect("request");
    super::reply_of(sender.send_request(req).await?).await
}

/// A client that accepts any server certificate: for tests that look at *which*
/// certificate was served, whatever name it carries.
pub fn any_name(_pki: &Pki) -> TlsConnector {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ballast::tls::NoVerify::new()))
        .with_no_client_auth();
    connector(config, &[])
}

/// An HTTP/1.1 backend behind TLS with `leaf` on `bind`, answering `tls-backend` and the
/// SNI it saw.
pub async fn backend(leaf: &Leaf, bind: &str) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    let chain = vec![rustls::pki_types::CertificateDer::from(leaf.der.clone())];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        ballast::tls::crypto::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_string();
                let svc = hyper::service::service_fn(move |_req| {
                    let body = format!("tls-backend sni={sni}");
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}
