//! Answering the CA's challenges, on every replica that shares `storage`: the answers are
//! files there, written by whichever replica placed the order.
//!
//! - http-01: `GET /.well-known/acme-challenge/TOKEN` on any HTTP listener, before routing,
//!   `allow_from`, authentication, `redirect_https` and rate limits (the CA's validators
//!   come from addresses nobody lists). The answer is `storage/http-01/TOKEN`.
//! - tls-alpn-01 (RFC 8737): a handshake that offers only ALPN `acme-tls/1` gets the
//!   self-signed certificate in `storage/tls-alpn-01/NAME.pem`, and the connection ends
//!   after the handshake.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The `storage` folders of this process's http-01 certificates. Read only by requests
/// under [`HTTP01_PREFIX`].
static HTTP01_STORAGE: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

pub(super) fn set_http01_storage(dirs: Vec<PathBuf>) {
    if let Ok(mut d) = HTTP01_STORAGE.write() {
        *d = dirs;
    }
}

/// For a request to `path`: `None` if ballast does not answer it (not a challenge path,
/// or no http-01 certificate configured: the request is routed as any other); else the
/// key authorization to send, `Some(None)` for an unknown token (404).
pub fn http01_answer(path: &str) -> Option<Option<Vec<u8>>> {
    let token = path.strip_prefix(HTTP01_PREFIX)?;
    let dirs = HTTP01_STORAGE.read().ok()?;
    if dirs.is_empty() {
        return None;
    }
    // Tokens are base64url (RFC 8555 §8.1): nothing else reaches the file system.
    let valid = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Some(None);
    }
    Some(
        dirs.iter()
            .find_map(|d| std::fs::read(d.join("http-01").join(token)).ok()),
    )
}

/// Where the http-01 answer for `token` goes.
pub(super) fn http01_path(storage: &Path, token: &str) -> PathBuf {
    storage.join("http-01").join(token)
}

/// Where the tls-alpn-01 certificate for `name` goes.
pub(super) fn tls_alpn_path(storage: &Path, name: &str) -> PathBuf {
    storage.join("tls-alpn-01").join(format!("{name}.pem"))
}

/// The tls-alpn-01 certificate for `name` (RFC 8737 §3): self-signed, `name` its only SAN,
/// the critical acmeIdentifier extension holding SHA-256 of the key authorization.
/// Returned as one PEM: certificate, then key.
pub(super) fn tls_alpn_certificate(name: &str, digest: &[u8]) -> Result<String, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
}

/// The resolver's side of tls-alpn-01: which names it may answer for, and where.
#[derive(Debug, Clone)]
pub struct TlsAlpnAnswers {
    pub storage: PathBuf,
    pub domains: Vec<String>,
}

impl TlsAlpnAnswers {
    /// The challenge certificate for `sni`, if one is pending. Read from the file on each
    /// `acme-tls/1` handshake for a configured name (nothing else reaches here), so a
    /// replica answers for an order another one placed.
    pub fn lookup(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let name = sni?.trim_end_matches('.').to_ascii_lowercase();
        if !self.domains.contains(&name) {
            return None;
        }
        let pem = std::fs::read(tls_alpn_path(&self.storage, &name)).ok()?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .ok()?;
        let key = PrivateKeyDer::from_pem_slice(&pem).ok()?;
        // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki,
        // which refuses the critical acmeIdentifier extension this certificate must carry.
        let signer = crate::tls::provider()
            .key_provider
            .load_private_key(key)
            .ok()?;
        Some(Arc::new(CertifiedKey::new(chain, signer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_that_could_leave_the_folder_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("http-01")).expect("mkdir");
        std::fs::write(dir.path().join("http-01").join("tok_en-1"), b"answer").expect("write");
        std::fs::write(dir.path().join("secret"), b"no").expect("write");
        set_http01_storage(vec![dir.path().to_path_buf()]);
        assert_eq!(http01_answer("/other"), None);
        assert_eq!(
            http01_answer("/.well-known/acme-challenge/tok_en-1"),
            Some(Some(b"answer".to_vec()))
        );
        for bad in ["../secret", "..%2fsecret", "", "a/b", "a.b"] {
            assert_eq!(
                http01_answer(&format!("{HTTP01_PREFIX}{bad}")),
                Some(None),
                "{bad}"
            );
        }
        set_http01_storage(Vec::new());
        assert_eq!(http01_answer("/.well-known/acme-challenge/tok_en-1"), None);
    }

    #[test]
    fn the_challenge_certificate_carries_the_critical_acme_identifier() {
        let digest = [7u8; 32];
        let pem = tls_alpn_certificate("a.example.org", &digest).expect("cert");
        let der = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .expect("one")
            .expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier");
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(&ext.value[..2], &[0x04, 0x20]);
        assert_eq!(&ext.value[2..], &digest);
    }

    #[test]
    fn the_resolver_reads_a_written_challenge_certificate_for_a_listed_name_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = tls_alpn_certificate("a.example.org", &[1u8; 32]).expect("cert");
        std::fs::create_dir_all(dir.path().join("tls-alpn-01")).expect("mkdir");
        std::fs::write(tls_alpn_path(dir.path(), "a.example.org"), pem).expect("write");
        let answers = TlsAlpnAnswers {
            storage: dir.path().into(),
            domains: vec!["a.example.org".into(), "b.example.org".into()],
        };
        assert!(answers.lookup(Some("A.example.org.")).is_some());
        assert!(
            answers.lookup(Some("b.example.org")).is_none(),
            "nothing pending"
        );
        assert!(
            answers.lookup(Some("c.example.org")).is_none(),
            "not listed"
        );
        assert!(answers.lookup(None).is_none());
    }
}
