//! rustls configurations built from the validated config: the server side of a TLS
//! listener (certificate by SNI, versions, ALPN, client certificates).
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

use crate::config::{TlsConfig, TlsVersion};

/// The crypto provider every TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
    // Stateless resumption: a returning client skips the expensive signature.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
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
        let key = self.lookup(hello.server_name());
        if key.is_none() {
            tracing::debug!(
                sni = hello.server_name().unwrap_or("-"),
                "TLS handshake refused: no certificate for this name (strict_sni)"
            );
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
