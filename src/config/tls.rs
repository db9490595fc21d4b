//! TLS files as configuration: certificates, keys and CA bundles, read and checked when the
//! config is loaded.
//!
//! Loading them here, with the rest of the config, gives one rule for every change: a
//! reload (SIGHUP, admin, an edit of the config file *or* of a certificate file) re-reads
//! everything, and either all of it is valid and applies, or none of it does and the running
//! certificates keep serving. Equality compares file contents, so a renewed certificate under
//! the same path is a change, and an untouched one is not.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// A certificate is flagged when it expires within this many days.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// A certificate chain and its private key, checked to belong together.
#[derive(Clone)]
pub struct CertPair {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// DNS names from the leaf's subjectAltName, lower case; `*.example.org` kept as written.
    pub names: Vec<String>,
    /// Expiry of the leaf, seconds since the Unix epoch.
    pub not_after: i64,
    pub key: Arc<CertifiedKey>,
    /// The files' bytes, so that equality means "same contents".
    pem: Arc<(Vec<u8>, Vec<u8>)>,
}

impl PartialEq for CertPair {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.pem == other.pem
    }
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair")
            .field("cert", &self.cert_path)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl CertPair {
    /// Days until expiry (negative once expired).
    pub fn days_left(&self) -> i64 {
        (self.not_after - unix_now()).div_euclid(86_400)
    }

    /// A warning for an expired certificate or one expiring soon.
    pub fn expiry_warning(&self) -> Option<String> {
        let days = self.days_left();
        if self.not_after <= unix_now() {
            Some(format!(
                "certificate {} has expired",
                self.cert_path.display()
            ))
        } else if days < EXPIRY_WARNING_DAYS {
            Some(format!(
                "certificate {} expires in {days} day(s)",
                self.cert_path.display()
            ))
        } else {
            None
        }
    }
}

/// A bundle of CA certificates: trust anchors for client certificates (mTLS) or backends.
#[derive(Clone)]
pub struct CaBundle {
    pub path: PathBuf,
    pub roots: Arc<RootCertStore>,
    pem: Arc<Vec<u8>>,
}

impl PartialEq for CaBundle {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.pem == other.pem
    }
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .field("anchors", &self.roots.len())
            .finish()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Reads a PEM certificate chain and its key; fails with a message naming the file at fault.
pub fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertPair, String> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            cert_path.display()
        ));
    };
    let (names, not_after) =
        leaf_facts(leaf).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    if names.is_empty() {
        return Err(format!(
            "{}: the certificate has no DNS names in subjectAltName; clients match SAN names, not the CN",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key_path.display()))?;
    let provider = crate::tls::provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{}: the key does not match the certificate {}",
            key_path.display(),
            cert_path.display()
        ),
        other => format!("{}: unusable private key: {other}", key_path.display()),
    })?;
    Ok(CertPair {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        names,
        not_after,
        key: Arc::new(key),
        pem: Arc::new((cert_pem, key_pem)),
    })
}

/// The leaf's SAN DNS names (lower case) and expiry.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    Ok((dns_names(&cert)?, cert.validity().not_after.timestamp()))
}

/// A certificate's DNS names from subjectAltName, lower case.
pub fn dns_names(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    match cert.subject_alternative_name() {
        Ok(Some(san)) => Ok(san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect()),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(format!("unreadable subjectAltName: {e}")),
    }
}

/// Reads a PEM bundle of CA certificates.
pub fn load_ca(path: &Path) -> Result<CaBundle, String> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            path.display()
        ));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    Ok(CaBundle {
        path: path.to_path_buf(),
        roots: Arc::new(roots),
        pem: Arc::new(pem),
    })
}

/// `session_ticket_keys_file`: keys to encrypt TLS session tickets with, shared by every
/// replica that reads the same file (`tls::tickets`). Debug never shows them.
#[derive(Clone, PartialEq)]
pub struct TicketKeys {
    pub path: PathBuf,
    bytes: Arc<Vec<u8>>,
}

/// One key in the file: 80 bytes, as nginx's `ssl_session_ticket_key` (`openssl rand 80`).
pub const TICKET_KEY_LEN: usize = 80;
/// More keys than this is a mistake (a file of the wrong kind), not a rotation.
const MAX_TICKET_KEYS: usize = 16;

impl TicketKeys {
    /// The keys, newest (the one that encrypts) first.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.bytes.chunks_exact(TICKET_KEY_LEN)
    }
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("path", &self.path)
            .field("keys", &(self.bytes.len() / TICKET_KEY_LEN))
            .finish()
    }
}

/// Reads a session ticket key file: one or more 80-byte keys, back to back.
pub fn load_ticket_keys(path: &Path) -> Result<TicketKeys, String> {
    let bytes = read(path)?;
    let n = bytes.len() / TICKET_KEY_LEN;
    if bytes.is_empty() || bytes.len() % TICKET_KEY_LEN != 0 || n > MAX_TICKET_KEYS {
        return Err(format!(
            "{}: {} bytes: the file must hold 1 to {MAX_TICKET_KEYS} keys of {TICKET_KEY_LEN} random bytes each, newest first (make one with: openssl rand {TICKET_KEY_LEN} > FILE)",
            path.display(),
            bytes.len()
        ));
    }
    Ok(TicketKeys {
        path: path.to_path_buf(),
        bytes: Arc::new(bytes),
    })
}
