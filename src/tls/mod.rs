//! rustls configurations built from the validated config: the server side of a TLS
//! listener (certificate by SNI, versions, ALPN, client certificates), and the client side
//! of TLS to backends.
//!
//! A listener builds its [`rustls::ServerConfig`] once per accept loop. A reload that
//! changes a certificate (or its file's contents) starts a new accept loop with a new
//! config, so new handshakes use the new certificate while open connections keep theirs.
//!
//! Cipher suites: rustls offers only TLS 1.3, and TLS 1.2 with ECDHE key exchange and AEAD
//! ciphers (AES-GCM, ChaCha20-Poly1305). RSA key exchange, CBC, RC4 and 3DES do not exist in
//! it, so there is nothing to switch off; a unit test pins that.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;

use crate::config::{AcmeChallenge, TlsConfig, TlsVersion, UpstreamProtocol, UpstreamTls};

pub mod client_hello;
mod server_stream;
pub mod tickets;

pub use server_stream::{accept, ServerStream};

#[cfg(all(feature = "tls-aws-lc", not(feature = "tls-ring")))]
pub use rustls::crypto::aws_lc_rs as crypto;
/// The crypto under every TLS config: ring unless built with `tls-aws-lc` alone (Cargo.toml
/// says why).
#[cfg(feature = "tls-ring")]
pub use rustls::crypto::ring as crypto;
#[cfg(not(any(feature = "tls-aws-lc", feature = "tls-ring")))]
compile_error!("build with the feature tls-aws-lc (the default) or tls-ring");

/// The crypto provider every TLS config uses; with `rsa-aws-lc` (default), RSA private keys
/// sign through aws-lc-rs (see [`RsaByAwsLc`]).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(unused_mut)] // mutated only with `rsa-aws-lc`
    let mut provider = crypto::default_provider();
    #[cfg(feature = "rsa-aws-lc")]
    {
        provider.key_provider = &RsaByAwsLc;
    }
    Arc::new(provider)
}

/// Loads RSA private keys with aws-lc-rs and every other key with the provider's own
/// loader. Why: an RSA-2048 signature (one per full handshake with an RSA certificate)
/// takes 590 us with ring and 246 us with aws-lc-rs on this machine, while ring is the
/// faster for the record layer and ECDSA; the signing key is the one piece rustls lets a
/// provider take from elsewhere (`CryptoProvider::key_provider`).
#[cfg(feature = "rsa-aws-lc")]
#[derive(Debug)]
struct RsaByAwsLc;

#[cfg(feature = "rsa-aws-lc")]
impl rustls::crypto::KeyProvider for RsaByAwsLc {
    fn load_private_key(
        &self,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        match rustls::crypto::aws_lc_rs::sign::RsaSigningKey::new(&key) {
            Ok(rsa) => Ok(Arc::new(rsa)),
            // Not an RSA key (or not one aws-lc-rs takes): the provider's own loader decides.
            Err(_) => crypto::default_provider()
                .key_provider
                .load_private_key(key),
        }
    }
}

/// Builds the server config for a TLS listener.
pub fn server_config(t: &TlsConfig) -> Result<Arc<ServerConfig>, rustls::Error> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(versions)?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::clone(&ca.roots), provider())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver::new(t)));
    config.alpn_protocols = t.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if t.acme
        .as_ref()
        .is_some_and(|a| a.challenge == AcmeChallenge::TlsAlpn01)
    {
        // Offered only to a client that asks for nothing else: the CA's validator.
        config
            .alpn_protocols
            .push(crate::acme::ACME_TLS_ALPN.to_vec());
    }
    // Stateless resumption: a returning client skips the expensive signature. The keys
    // outlive this config (`tickets`).
    config.ticketer = tickets::ticketer(t.session_tickets.as_ref())?;
    Ok(Arc::new(config))
}

/// TLS to a pool's backends: the connector and the name to send and verify.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: tokio_rustls::TlsConnector,
    /// `None`: verify the backend's IP address (and send no SNI).
    pub sni: Option<ServerName<'static>>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("sni", &self.sni)
            .finish()
    }
}

impl BackendTls {
    pub fn new(t: &UpstreamTls, protocol: UpstreamProtocol) -> Result<BackendTls, rustls::Error> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let mut config = if t.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify::new()))
                .with_no_client_auth()
        } else {
            let roots =
                t.ca.as_ref()
                    .map(|c| Arc::clone(&c.roots))
                    .unwrap_or_else(|| Arc::new(rustls::RootCertStore::empty()));
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        config.alpn_protocols = match protocol {
            _ if t.for_tcp => Vec::new(),
            UpstreamProtocol::H2 => vec![b"h2".to_vec()],
            UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        };
        let sni = match &t.sni {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|e| rustls::Error::General(e.to_string()))?,
            ),
            None => None,
        };
        Ok(BackendTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            sni,
        })
    }

    /// The name to present to and verify for the backend at `ip`.
    /// The name sent as SNI and verified: the pool's `sni` if set, else the DNS name the
    /// backend was found by (as nginx's `proxy_ssl_name` defaults to the upstream's host),
    /// else its IP address.
    pub fn server_name(
        &self,
        ip: std::net::IpAddr,
        backend_name: Option<&ServerName<'static>>,
    ) -> ServerName<'static> {
        self.sni
            .clone()
            .or_else(|| backend_name.cloned())
            .unwrap_or(ServerName::IpAddress(ip.into()))
    }
}

/// `insecure_skip_verify`: signatures are still checked (the handshake needs them), the
/// certificate's chain and name are not. (Tests use it too, to see which certificate a
/// server picked whatever name it carries.)
#[derive(Debug)]
pub struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl NoVerify {
    pub fn new() -> NoVerify {
        NoVerify(provider())
    }
}

impl Default for NoVerify {
    fn default() -> NoVerify {
        NoVerify::new()
    }
}

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Picks the certificate for a handshake by SNI: an exact SAN name first, then a wildcard
/// (`*.example.org` covers one label: `a.example.org`, not `a.b.example.org`), else the
/// first certificate, unless `strict_sni` refuses the handshake.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `example.org` for `*.example.org`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// tls-alpn-01: the challenge certificates (`crate::acme`).
    acme: Option<crate::acme::TlsAlpnAnswers>,
}

impl SniResolver {
    pub fn new(t: &TlsConfig) -> SniResolver {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // Earlier entries win a name that several certificates carry.
        for pair in &t.certificates {
            for name in &pair.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name.clone()),
                }
                .or_insert_with(|| Arc::clone(&pair.key));
            }
        }
        SniResolver {
            exact,
            wildcard,
            default: (!t.strict_sni)
                .then(|| t.certificates.first().map(|p| Arc::clone(&p.key)))
                .flatten(),
            acme: t
                .acme
                .as_ref()
                .filter(|a| a.challenge == AcmeChallenge::TlsAlpn01)
                .map(|a| crate::acme::TlsAlpnAnswers {
                    storage: a.storage.clone(),
                    domains: a.domains.clone(),
                }),
        }
    }

    /// The certificate for `sni`, or `None` to refuse the handshake.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let found = sni.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(k) = self.exact.get(&name) {
                return Some(Arc::clone(k));
            }
            let (_, parent) = name.split_once('.')?;
            self.wildcard.get(parent).map(Arc::clone)
        });
        found.or_else(|| self.default.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(acme) = &self.acme {
            // RFC 8737: the validator offers `acme-tls/1` alone and gets the challenge
            // certificate, or no handshake.
            if hello
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| p == crate::acme::ACME_TLS_ALPN))
            {
                return acme.lookup(hello.server_name());
            }
        }
        let key = self.lookup(hello.server_name());
        if key.is_none() {
            tracing::debug!(
                sni = hello.server_name().unwrap_or("-"),
                "TLS handshake refused: no certificate for this name (strict_sni, or an ACME certificate not issued yet)"
            );
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RSA test of `tests/tls.rs` passes on ring alone too; this pins that RSA keys go
    /// to aws-lc-rs (the speed is in BENCHMARKS.md) and what else stays on ring.
    #[cfg(feature = "rsa-aws-lc")]
    #[test]
    fn rsa_keys_load_through_aws_lc_and_the_rest_of_the_provider_stays() {
        use rustls::pki_types::pem::PemObject;
        let p = provider();
        assert_eq!(format!("{:?}", p.key_provider), "RsaByAwsLc");
        let own = crypto::default_provider();
        assert_eq!(
            format!("{:?}", p.cipher_suites),
            format!("{:?}", own.cipher_suites)
        );
        let pem = include_str!("../../tests/fixtures/test-only-rsa2048.key");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("fixture key");
        let signer = p.key_provider.load_private_key(key).expect("RSA key");
        assert_eq!(signer.algorithm(), rustls::SignatureAlgorithm::RSA);
    }

    #[test]
    fn only_ecdhe_aead_suites_are_offered() {
        for suite in provider().cipher_suites.iter() {
            let name = format!("{:?}", suite.suite());
            let tls13 = name.starts_with("TLS13_");
            let ecdhe_aead = name.starts_with("TLS_ECDHE_")
                && (name.contains("_GCM_") || name.contains("CHACHA20_POLY1305"));
            assert!(tls13 || ecdhe_aead, "weak suite offered: {name}");
            assert!(
                !name.contains("CBC") && !name.starts_with("TLS_RSA_"),
                "{name}"
            );
        }
    }
}
