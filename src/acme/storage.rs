//! What `storage` holds, and how it is written so that every replica sharing it reads
//! whole files only:
//!
//! ```text
//! storage/
//!   lock, lease                  the renewal lock (below)
//!   account-<hash>.json          the ACME account, one per directory URL
//!   http-01/<token>              key authorizations, answered by every replica
//!   tls-alpn-01/<name>.pem       challenge certificates (certificate and key)
//!   <first domain>/
//!     cert.pem -> ..data/cert.pem
//!     key.pem  -> ..data/key.pem
//!     ..data   -> ..<serial>/    swapped by one rename
//! ```
//!
//! The certificate and its key change together: both are written into a new folder and
//! the `..data` link is renamed over, as Kubernetes does for volumes, so a reload never sees
//! a new key beside an old certificate. The config watcher knows that swap already.
//! Files are mode 0600, folders 0700.
//!
//! The lock: `flock` on `lock` serialises the replicas of one host (or of any file system
//! that shares `flock`); `lease` names the holder and an expiry, for file systems that do
//! not, and so that a holder that died mid-order without its lock being released blocks
//! the others only until the lease ends.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a lease lasts; an order is cut at half of it, so a live holder never outlasts
/// its own lease.
pub const LEASE: Duration = Duration::from_secs(600);

/// Makes `dir` (and its parents) with mode 0700 if it is missing.
pub fn make_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it, synced, then
/// renamed over. Mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Installs a new certificate and key in `cert_dir` (see the module docs), with the
/// directory URL of the CA that issued them ([`issuer`]).
pub fn install_certificate(
    cert_dir: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
    directory: &str,
) -> io::Result<()> {
    make_dir(cert_dir)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let version = format!("..{stamp}");
    let folder = cert_dir.join(&version);
    make_dir(&folder)?;
    write_atomic(&folder.join("cert.pem"), cert_pem)?;
    write_atomic(&folder.join("key.pem"), key_pem)?;
    write_atomic(&folder.join(ISSUER), directory.as_bytes())?;
    let link_tmp = cert_dir.join("..data_tmp");
    let _ = fs::remove_file(&link_tmp);
    std::os::unix::fs::symlink(&version, &link_tmp)?;
    let previous = fs::read_link(cert_dir.join("..data")).ok();
    fs::rename(&link_tmp, cert_dir.join("..data"))?;
    for name in ["cert.pem", "key.pem"] {
        let link = cert_dir.join(name);
        if fs::read_link(&link).is_err() {
            // First issuance (or a plain file someone put there): make the link.
            let tmp = cert_dir.join(format!(".{name}.link"));
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(Path::new("..data").join(name), &tmp)?;
            fs::rename(&tmp, &link)?;
        }
    }
    if let Some(old) = previous.filter(|p| *p != Path::new(&version)) {
        // Readers that opened the old files keep them; new opens follow the link.
        let _ = fs::remove_dir_all(cert_dir.join(old));
    }
    Ok(())
}

/// Beside a certificate: the directory URL of the CA that issued it.
const ISSUER: &str = "directory";

/// The directory URL of the CA that issued the certificate in `cert_dir`: a certificate
/// from Let's Encrypt's staging CA is not kept once the config names production.
pub fn issuer(cert_dir: &Path) -> Option<String> {
    fs::read_to_string(cert_dir.join("..data").join(ISSUER)).ok()
}

/// This process, as a lease names it.
pub fn holder() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{host}:{}", std::process::id())
}

/// The renewal lock, held while it lives.
#[derive(Debug)]
pub struct Lease {
    /// Holds the `flock`; closing it releases it.
    _lock: File,
    lease: PathBuf,
}

impl Lease {
    /// The lock, or `None` while another replica holds it.
    pub fn acquire(storage: &Path) -> io::Result<Option<Lease>> {
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(storage.join("lock"))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let lease = storage.join("lease");
        let me = holder();
        let now = unix_now();
        let record = format!("{me} {}\n", now + LEASE.as_secs());
        // Made with O_EXCL, which NFS honours where it may not share flock: of two
        // replicas that both got here, one makes the file and the other finds it.
        for _ in 0..2 {
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&lease)
            {
                Ok(mut f) => {
                    f.write_all(record.as_bytes())?;
                    f.sync_all()?;
                    return Ok(Some(Lease { _lock: lock, lease }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let text = fs::read_to_string(&lease).unwrap_or_default();
                    let mut words = text.split_whitespace();
                    let who = words.next();
                    let until = words.next().and_then(|u| u.parse::<u64>().ok());
                    // Another holder's live lease: wait. Ours (left by an earlier attempt of
                    // this process), expired, or left half-written by a holder that died:
                    // take it over.
                    let live = match (who, until) {
                        (Some(w), Some(u)) => w != me && u > now,
                        // Being written this moment, unless it has been like this a while.
                        _ => fs::metadata(&lease)
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| {
                                t.elapsed().is_ok_and(|age| age < Duration::from_secs(10))
                            }),
                    };
                    if live {
                        return Ok(None);
                    }
                    let _ = fs::remove_file(&lease);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lease);
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lease_waits_for_the_first_and_a_stale_one_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Lease::acquire(dir.path()).expect("io").expect("free");
        assert!(
            Lease::acquire(dir.path()).expect("io").is_none(),
            "held by flock"
        );
        drop(first);
        assert!(!dir.path().join("lease").exists(), "released on drop");
        // A holder elsewhere (no shared flock) whose lease is live, then one that expired.
        write_atomic(
            &dir.path().join("lease"),
            format!("other:1 {}\n", unix_now() + 60).as_bytes(),
        )
        .expect("write");
        assert!(
            Lease::acquire(dir.path()).expect("io").is_none(),
            "live lease"
        );
        write_atomic(
            &dir.path().join("lease"),
            format!("other:1 {}\n", unix_now() - 1).as_bytes(),
        )
        .expect("write");
        let taken = Lease::acquire(dir.path()).expect("io");
        assert!(taken.is_some(), "expired lease");
        drop(taken);
        // One another replica is writing this moment (made, still empty): wait.
        std::fs::write(dir.path().join("lease"), b"").expect("write");
        assert!(
            Lease::acquire(dir.path()).expect("io").is_none(),
            "a lease being written"
        );
    }

    #[test]
    fn a_certificate_swap_is_one_rename_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let cert_dir = dir.path().join("example.org");
        install_certificate(&cert_dir, b"cert one", b"key one", "https://a/dir").expect("first");
        assert_eq!(issuer(&cert_dir).as_deref(), Some("https://a/dir"));
        assert_eq!(
            fs::read(cert_dir.join("cert.pem")).expect("read"),
            b"cert one"
        );
        install_certificate(&cert_dir, b"cert two", b"key two", "https://b/dir").expect("second");
        assert_eq!(issuer(&cert_dir).as_deref(), Some("https://b/dir"));
        assert_eq!(
            fs::read(cert_dir.join("cert.pem")).expect("read"),
            b"cert two"
        );
        assert_eq!(
            fs::read(cert_dir.join("key.pem")).expect("read"),
            b"key two"
        );
        let mode = fs::metadata(cert_dir.join("key.pem"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let versions = fs::read_dir(&cert_dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir() && !t.is_symlink()))
            .count();
        assert_eq!(versions, 1, "the old version is removed");
    }
}
