//! ACME (RFC 8555): certificates ordered and renewed by ballast, for `[listeners.NAME.tls.acme]`.
//!
//! The design keeps one path for a new certificate: an order ends with the certificate and
//! its key written into `storage` (see [`storage`]), and the config watcher's reload
//! serves them, exactly as an operator's `cp` of a renewed file would. A certificate that
//! is already in `storage` is loaded with the config, like any listed one.
//!
//! Several replicas may share `storage` (a volume, a PVC). Each runs the same task per
//! certificate: sleep until renewal is due, take the lock ([`storage::Lease`]), look again
//! (another replica may have renewed meanwhile: then there is nothing to order), order,
//! install. Challenge answers are files in `storage`, so whichever replica the CA reaches
//! answers. Without shared storage each replica orders its own certificate.
//!
//! When: at two thirds of the certificate's lifetime, or inside the window the CA's ARI
//! (RFC 9773, `renewalInfo`) suggests when it offers one. A failed attempt is logged once,
//! counted, and retried after `retry_after`, doubling up to [`MAX_BACKOFF`]; the running
//! certificate keeps serving throughout.

mod challenge;
mod order;
pub mod storage;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::CertificateIdentifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

pub use challenge::{http01_answer, TlsAlpnAnswers, ACME_TLS_ALPN, HTTP01_PREFIX};

use crate::config::{AcmeChallenge, AcmeConfig, Config};

/// The longest wait between two failed attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// A task looks at its certificate at least this often (an ARI window can move, a file
/// can be replaced by hand).
const MAX_SLEEP: Duration = Duration::from_secs(6 * 3600);
/// How often a replica that found the lock taken looks again.
const LOCK_POLL: Duration = Duration::from_secs(5);

/// What `/status` and the metrics show of one listener's ACME certificate.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub domains: Vec<String>,
    /// Seconds since the Unix epoch.
    pub last_attempt: Option<u64>,
    /// `issued` or `failed`.
    pub last_result: Option<&'static str>,
    pub last_error: Option<String>,
    /// When the task next looks at the certificate (and orders if it is due).
    pub next_check: Option<u64>,
    pub failures_total: u64,
    pub issued_total: u64,
}

static STATUS: Mutex<BTreeMap<String, Status>> = Mutex::new(BTreeMap::new());

/// Every listener's ACME status, by listener name.
pub fn statuses() -> BTreeMap<String, Status> {
    STATUS.lock().map(|s| s.clone()).unwrap_or_default()
}

fn update_status(listener: &str, f: impl FnOnce(&mut Status)) {
    if let Ok(mut all) = STATUS.lock() {
        f(all.entry(listener.to_string()).or_default());
    }
}

/// The running tasks, one per listener with `acme`; owned by the control plane.
#[derive(Default)]
pub struct Manager {
    running: HashMap<String, (AcmeConfig, CancellationToken)>,
}

impl Manager {
    /// Starts, restarts or stops tasks to match `config`. Makes each `storage`'s folders
    /// here, before the config watcher looks for them.
    pub fn reconcile(&mut self, config: &Config) {
        let wanted: HashMap<String, AcmeConfig> = config
            .listeners
            .iter()
            .filter_map(|l| {
                let mut a = l.tls.as_ref()?.acme.clone()?;
                a.stored_error = None;
                Some((l.name.clone(), a))
            })
            .collect();
        self.running.retain(|name, (cfg, stop)| {
            let keep = wanted.get(name) == Some(cfg);
            if !keep {
                stop.cancel();
            }
            keep
        });
        if let Ok(mut all) = STATUS.lock() {
            all.retain(|name, _| wanted.contains_key(name));
        }
        for (name, cfg) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            for dir in [cfg.storage.clone(), cfg.cert_dir()] {
                if let Err(e) = storage::make_dir(&dir) {
                    tracing::warn!(listener = %name, folder = %dir.display(), error = %e, "ACME: cannot make the storage folder");
                }
            }
            update_status(&name, |s| s.domains = cfg.domains.clone());
            let stop = CancellationToken::new();
            tokio::spawn(run(name.clone(), cfg.clone(), stop.clone()));
            self.running.insert(name, (cfg, stop));
        }
        let mut http01: Vec<_> = self
            .running
            .values()
            .filter(|(c, _)| c.challenge == AcmeChallenge::Http01)
            .map(|(c, _)| c.storage.clone())
            .collect();
        http01.sort();
        http01.dedup();
        challenge::set_http01_storage(http01);
    }

    pub fn stop_all(&mut self) {
        for (_, (_, stop)) in self.running.drain() {
            stop.cancel();
        }
        challenge::set_http01_storage(Vec::new());
    }
}

/// One certificate's life: wait until due, order under the lock, repeat.
async fn run(listener: String, cfg: AcmeConfig, stop: CancellationToken) {
    let mut failures: u32 = 0;
    let mut ari = AriAnswer::default();
    loop {
        let (wait, replaces) = next_renewal(&cfg, &mut ari).await;
        let pause = wait.min(MAX_SLEEP);
        update_status(&listener, |s| {
            s.next_check = Some(unix_now() + pause.as_secs())
        });
        if !pause.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        let lease = match storage::Lease::acquire(&cfg.storage) {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                // Another replica orders; its certificate arrives through the watch.
                tracing::debug!(listener = %listener, "ACME: another replica holds the renewal lock");
                tokio::select! {
                    _ = tokio::time::sleep(LOCK_POLL) => continue,
                    _ = stop.cancelled() => return,
                }
            }
            Err(e) => {
                let why = format!("the renewal lock in {}: {e}", cfg.storage.display());
                let backoff = failed(&listener, &cfg, &mut failures, why);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        // Under the lock, look again: a certificate another replica just installed is
        // not ordered twice.
        let (wait, _) = next_renewal(&cfg, &mut ari).await;
        if !wait.is_zero() {
            drop(lease);
            continue;
        }
        update_status(&listener, |s| s.last_attempt = Some(unix_now()));
        tracing::info!(listener = %listener, domains = ?cfg.domains, directory = %cfg.directory, "ACME: ordering a certificate");
        let result = tokio::select! {
            r = tokio::time::timeout(storage::LEASE / 2, order::obtain(&cfg, replaces)) => {
                r.unwrap_or_else(|_| Err("the order took longer than 5 minutes".into()))
            }
            _ = stop.cancelled() => return,
        };
        drop(lease);
        match result {
            Ok(()) => {
                failures = 0;
                update_status(&listener, |s| {
                    s.last_result = Some("issued");
                    s.last_error = None;
                    s.issued_total += 1;
                });
                tracing::info!(listener = %listener, folder = %cfg.cert_dir().display(), "ACME: certificate issued and installed");
            }
            Err(why) => {
                let backoff = failed(&listener, &cfg, &mut failures, why);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Logs and counts a failed attempt; returns the wait before the next.
fn failed(listener: &str, cfg: &AcmeConfig, failures: &mut u32, why: String) -> Duration {
    *failures = failures.saturating_add(1);
    let backoff = cfg
        .retry_after
        .saturating_mul(1u32 << (*failures - 1).min(20))
        .min(MAX_BACKOFF);
    tracing::warn!(listener = %listener, domains = ?cfg.domains, error = %why, retry_in = ?backoff, "ACME: certificate order failed; the current certificate (if any) keeps serving");
    update_status(listener, |s| {
        s.last_result = Some("failed");
        s.last_error = Some(why);
        s.failures_total += 1;
        s.next_check = Some(unix_now() + backoff.as_secs());
    });
    backoff
}

/// What renewal needs to know of the stored certificate.
struct Stored {
    names: Vec<String>,
    not_before: u64,
    not_after: u64,
    id: Option<CertificateIdentifier<'static>>,
}

/// The stored certificate, if ballast would serve it (a pair it cannot load is ordered
/// again).
fn stored(cfg: &AcmeConfig) -> Option<Stored> {
    use x509_parser::extensions::ParsedExtension;
    crate::config::tls::load_pair(&cfg.cert_path(), &cfg.key_path()).ok()?;
    let pem = std::fs::read(cfg.cert_path()).ok()?;
    let leaf = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).ok()?;
    let names = crate::config::tls::dns_names(&cert).ok()?;
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0),
            _ => None,
        });
    let id = aki.map(|aki| {
        CertificateIdentifier::new(aki.into(), cert.tbs_certificate.raw_serial().into())
            .into_owned()
    });
    let v = cert.validity();
    Some(Stored {
        names,
        not_before: v.not_before.timestamp().max(0) as u64,
        not_after: v.not_after.timestamp().max(0) as u64,
        id,
    })
}

/// What the CA's ARI said about the stored certificate: asked at most once per
/// [`ARI_REFRESH`] (a replica waiting for another's lock looks every few seconds), and the
/// moment drawn in its window kept, so that looking again does not move it.
#[derive(Default)]
struct AriAnswer {
    /// The certificate it is about.
    id: String,
    asked: Option<std::time::Instant>,
    /// The renewal moment drawn in the window; `None`: no ARI (not offered, or no answer).
    at: Option<u64>,
}

const ARI_REFRESH: Duration = Duration::from_secs(3600);

/// How long until the certificate should be renewed (zero: now), and the certificate it
/// replaces when the CA's ARI chose the time.
async fn next_renewal(
    cfg: &AcmeConfig,
    ari: &mut AriAnswer,
) -> (Duration, Option<CertificateIdentifier<'static>>) {
    let now = unix_now();
    let Some(s) = stored(cfg) else {
        return (Duration::ZERO, None);
    };
    if cfg.domains.iter().any(|d| !s.names.contains(d)) {
        // The config lists a name the certificate lacks.
        return (Duration::ZERO, None);
    }
    if storage::issuer(&cfg.cert_dir()).as_deref() != Some(cfg.directory.as_str()) {
        // Issued by another CA than the config names now (staging, then production).
        return (Duration::ZERO, None);
    }
    let mut at = s.not_before + (s.not_after.saturating_sub(s.not_before)) * 2 / 3;
    let mut replaces = None;
    if let Some(id) = s.id {
        let key = id.to_string();
        let fresh = ari.id == key && ari.asked.is_some_and(|t| t.elapsed() < ARI_REFRESH);
        if !fresh {
            // A random moment in the window, so that many certificates do not all renew at
            // its start (RFC 9773 §4.2).
            let window = ari_window(cfg, &id).await;
            *ari = AriAnswer {
                id: key,
                asked: Some(std::time::Instant::now()),
                at: window.map(|(start, end)| start + fastrand::u64(0..=end - start)),
            };
        }
        if let Some(moment) = ari.at {
            at = moment;
            replaces = Some(id);
        }
    }
    (Duration::from_secs(at.saturating_sub(now)), replaces)
}

/// The CA's suggested renewal window, if it offers ARI and the account exists.
async fn ari_window(cfg: &AcmeConfig, id: &CertificateIdentifier<'_>) -> Option<(u64, u64)> {
    let account = order::existing_account(cfg).await?;
    let (info, _) = account.renewal_info(id).await.ok()?;
    let w = info.suggested_window;
    let start = w.start.unix_timestamp().max(0) as u64;
    let end = w.end.unix_timestamp().max(0) as u64;
    (end >= start).then_some((start, end))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
