//! DNS discovery: a backend written as `HOST:PORT` stands for every A/AAAA record of HOST.
//!
//! One task per (pool, name) re-resolves every `resolve_interval` and reports a changed
//! address set to the control plane as an [`Update`]; the control plane applies it exactly
//! like a file edit (same snapshot build, same backend reuse, same draining of what left).
//! This module only decides *which* addresses a name has, and shields the pool from DNS
//! trouble:
//! - a resolver failure (timeout, SERVFAIL, refused) keeps the last good set, with one
//!   warning per outage;
//! - NXDOMAIN or an empty answer for a name that resolved before is ignored for
//!   `resolve_grace`, then followed (a scaled-to-zero service empties its pool);
//! - a name that never resolved leaves its part of the pool empty; the pool waits.
//!
//! Resolution goes through hickory-resolver with its cache off: each round asks the server,
//! because the answer *is* the set of replicas (Docker's DNS gives a 600 s TTL).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::TokioResolver;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DnsConfig, NamedBackend};

/// Most addresses one name adds to a pool. Each is a backend with its own health-check
/// task; a name answering with more (a misconfigured or hostile zone) is cut here, sorted
/// by address so every ballast instance keeps the same ones.
pub const MAX_ADDRESSES_PER_NAME: usize = 512;

/// Resolved addresses per (pool, name), as the control plane last applied them.
pub type Resolved = HashMap<NameKey, Vec<IpAddr>>;

/// One name entry of one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NameKey {
    pub pool: Arc<str>,
    pub host: String,
    pub port: u16,
}

impl NameKey {
    pub fn new(pool: &str, n: &NamedBackend) -> NameKey {
        NameKey {
            pool: pool.into(),
            host: n.host.clone(),
            port: n.port,
        }
    }
}

/// "This name of this pool now has these addresses" (sorted, deduplicated).
#[derive(Debug)]
pub struct Update {
    pub key: NameKey,
    pub addrs: Vec<IpAddr>,
}

/// The running resolver tasks, reconciled with each config generation.
pub struct Discovery {
    tasks: HashMap<(NameKey, DnsConfig), CancellationToken>,
    updates: mpsc::Sender<Update>,
}

impl Discovery {
    /// A discovery with no task yet; updates arrive on the returned receiver.
    pub fn new() -> (Discovery, mpsc::Receiver<Update>) {
        let (tx, rx) = mpsc::channel(64);
        (
            Discovery {
                tasks: HashMap::new(),
                updates: tx,
            },
            rx,
        )
    }

    /// Starts a task for each name in `config` that has none, and stops the tasks of names
    /// (or settings) that are gone. A task whose name and settings are unchanged keeps
    /// running, with its memory of the last good answer.
    pub fn reconcile(&mut self, config: &Config) {
        let wanted: Vec<(NameKey, DnsConfig)> = config
            .pools
            .iter()
            .flat_map(|p| {
                p.names
                    .iter()
                    .map(|n| (NameKey::new(&p.name, n), p.dns.clone()))
            })
            .collect();
        self.tasks.retain(|k, token| {
            let keep = wanted.contains(k);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (key, dns) in wanted {
            if self.tasks.contains_key(&(key.clone(), dns.clone())) {
                continue;
            }
            let token = CancellationToken::new();
            tokio::spawn(follow(
                key.clone(),
                dns.clone(),
                self.updates.clone(),
                token.clone(),
            ));
            self.tasks.insert((key, dns), token);
        }
    }

    /// Whether `key` is a name of the current config (stale updates are ignored).
    pub fn is_current(&self, key: &NameKey) -> bool {
        self.tasks.keys().any(|(k, _)| k == key)
    }

    pub fn stop_all(&mut self) {
        for (_, token) in self.tasks.drain() {
            token.cancel();
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// What one lookup said.
#[derive(Debug, PartialEq)]
enum Answer {
    Addrs(Vec<IpAddr>),
    /// NXDOMAIN, or the name exists without A/AAAA records.
    Empty,
    /// The resolver could not answer (timeout, SERVFAIL, refused, no server).
    Failed(String),
}

/// What a name's task remembers between rounds; pure, so the rules are unit-tested.
#[derive(Debug, Default)]
struct Follower {
    /// The set last reported to the control plane (`None`: never resolved).
    reported: Option<Vec<IpAddr>>,
    /// Since when the resolver has been failing (one warning per outage).
    failing_since: Option<Instant>,
    /// Since when the answer has been empty while the last reported set was not.
    empty_since: Option<Instant>,
}

/// What the task does after a round.
#[derive(Debug, PartialEq)]
enum Step {
    Nothing,
    /// Report this set to the control plane.
    Report(Vec<IpAddr>),
    /// Log once: the resolver fails; the last good set stays.
    WarnFailing(String),
    /// Log once: the name answers empty; the last good set stays for the grace period.
    WarnEmpty,
    /// Log once: the name is not resolvable yet; the pool waits.
    WarnNeverResolved(String),
    /// The resolver answers again after an outage.
    Recovered(Vec<IpAddr>, Option<Vec<IpAddr>>),
}

impl Follower {
    fn round(&mut self, answer: Answer, now: Instant, grace: Duration) -> Step {
        match answer {
            Answer::Addrs(addrs) if !addrs.is_empty() => {
                let was_out =
                    self.failing_since.take().is_some() | self.empty_since.take().is_some();
                if self.reported.as_ref() == Some(&addrs) {
                    return if was_out {
                        Step::Recovered(addrs, None)
                    } else {
                        Step::Nothing
                    };
                }
                self.reported = Some(addrs.clone());
                if was_out {
                    Step::Recovered(addrs.clone(), Some(addrs))
                } else {
                    Step::Report(addrs)
                }
            }
            Answer::Addrs(_) | Answer::Empty => {
                self.failing_since = None;
                match &self.reported {
                    Some(last) if !last.is_empty() => match self.empty_since {
                        None => {
                            self.empty_since = Some(now);
                            Step::WarnEmpty
                        }
                        Some(since) if now.duration_since(since) >= grace => {
                            self.empty_since = None;
                            self.reported = Some(Vec::new());
                            Step::Report(Vec::new())
                        }
                        Some(_) => Step::Nothing,
                    },
                    Some(_) => Step::Nothing,
                    None => {
                        // Never resolved: the pool has nothing to keep. Say so once.
                        self.reported = Some(Vec::new());
                        Step::WarnNeverResolved("no A/AAAA records".into())
                    }
                }
            }
            Answer::Failed(why) => {
                if self.failing_since.is_some() {
                    return Step::Nothing;
                }
                self.failing_since = Some(now);
                if self.reported.is_none() {
                    Step::WarnNeverResolved(why)
                } else {
                    Step::WarnFailing(why)
                }
            }
        }
    }
}

/// Resolves `key.host` every `dns.interval` until `stop`, reporting changes to `updates`.
async fn follow(
    key: NameKey,
    dns: DnsConfig,
    updates: mpsc::Sender<Update>,
    stop: CancellationToken,
) {
    let resolver = match resolver(&dns) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(pool = %key.pool, name = %key.host, error = %e, "cannot set up DNS resolution (check /etc/resolv.conf or set resolvers); this name gets no backends");
            return;
        }
    };
    let mut state = Follower::default();
    let mut tick = tokio::time::interval(dns.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            a = lookup(&resolver, &key.host) => a,
        };
        let (pool, name) = (&key.pool, &key.host);
        let report = match state.round(answer, Instant::now(), dns.grace) {
            Step::Nothing => None,
            Step::Report(addrs) => Some(addrs),
            Step::WarnFailing(why) => {
                tracing::warn!(pool = %pool, name = %name, error = %why, "DNS resolution failing: keeping the last known backends until it answers again");
                None
            }
            Step::WarnEmpty => {
                tracing::warn!(pool = %pool, name = %name, grace = ?dns.grace, "DNS answered no addresses for a name that had some: keeping the last known backends for the grace period");
                None
            }
            Step::WarnNeverResolved(why) => {
                tracing::warn!(pool = %pool, name = %name, error = %why, "name does not resolve (yet): it adds no backend until it does");
                None
            }
            Step::Recovered(addrs, report) => {
                tracing::info!(pool = %pool, name = %name, addresses = addrs.len(), "DNS resolution works again");
                report
            }
        };
        if let Some(addrs) = report {
            if addrs.len() == MAX_ADDRESSES_PER_NAME {
                tracing::warn!(pool = %pool, name = %name, limit = MAX_ADDRESSES_PER_NAME, "name has too many addresses: using the first (lowest) ones only");
            }
            let update = Update {
                key: key.clone(),
                addrs,
            };
            if updates.send(update).await.is_err() {
                return;
            }
        }
    }
}

fn resolver(dns: &DnsConfig) -> Result<TokioResolver, hickory_resolver::ResolveError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = if dns.resolvers.is_empty() {
        TokioResolver::builder(provider)?
    } else {
        let servers: Vec<NameServerConfig> = dns
            .resolvers
            .iter()
            .flat_map(|a| {
                [Protocol::Udp, Protocol::Tcp].map(|proto| {
                    let mut ns = NameServerConfig::new(*a, proto);
                    // An NXDOMAIN from the configured server is the answer; asking the next
                    // server about it would only hide it.
                    ns.trust_negative_responses = true;
                    ns
                })
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], servers),
            provider,
        )
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.cache_size = 0;
    opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    // A round must end well before the next one; a dead server is a failure, not a hang.
    opts.timeout = dns.interval.min(Duration::from_secs(2));
    opts.attempts = 2;
    Ok(builder.build())
}

async fn lookup(resolver: &TokioResolver, host: &str) -> Answer {
    // No cache may answer for the server: the answer is the current set of replicas.
    resolver.clear_cache();
    match resolver.lookup_ip(host).await {
        Ok(found) => {
            let mut addrs: Vec<IpAddr> = found.iter().collect();
            addrs.sort();
            addrs.dedup();
            addrs.truncate(MAX_ADDRESSES_PER_NAME);
            Answer::Addrs(addrs)
        }
        Err(e) => match e.proto().map(|p| p.kind()) {
            // NXDOMAIN, or NOERROR without A/AAAA: the server's answer is "none". A
            // SERVFAIL or REFUSED arrives in the same shape and is a failure.
            Some(ProtoErrorKind::NoRecordsFound { response_code, .. })
                if matches!(
                    *response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                Answer::Empty
            }
            _ => Answer::Failed(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    const GRACE: Duration = Duration::from_secs(30);

    #[test]
    fn changes_are_reported_once() {
        let mut f = Follower::default();
        let t = Instant::now();
        let a = ips(&["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            f.round(Answer::Addrs(a.clone()), t, GRACE),
            Step::Report(a.clone())
        );
        assert_eq!(f.round(Answer::Addrs(a.clone()), t, GRACE), Step::Nothing);
        let b = ips(&["10.0.0.2"]);
        assert_eq!(f.round(Answer::Addrs(b.clone()), t, GRACE), Step::Report(b));
    }

    #[test]
    fn failures_keep_the_last_set_and_warn_once_per_outage() {
        let mut f = Follower::default();
        let t = Instant::now();
        let a = ips(&["10.0.0.1"]);
        f.round(Answer::Addrs(a.clone()), t, GRACE);
        assert!(matches!(
            f.round(Answer::Failed("timeout".into()), t, GRACE),
            Step::WarnFailing(_)
        ));
        for k in 1..100 {
            let later = t + Duration::from_secs(k * 60);
            assert_eq!(
                f.round(Answer::Failed("SERVFAIL".into()), later, GRACE),
                Step::Nothing
            );
        }
        // Back with the same set: logged, nothing to apply.
        assert_eq!(
            f.round(Answer::Addrs(a.clone()), t, GRACE),
            Step::Recovered(a.clone(), None)
        );
        // A second outage warns again.
        assert!(matches!(
            f.round(Answer::Failed("timeout".into()), t, GRACE),
            Step::WarnFailing(_)
        ));
    }

    #[test]
    fn an_empty_answer_is_followed_only_after_the_grace_period() {
        let mut f = Follower::default();
        let t = Instant::now();
        let a = ips(&["10.0.0.1"]);
        f.round(Answer::Addrs(a.clone()), t, GRACE);
        assert_eq!(f.round(Answer::Empty, t, GRACE), Step::WarnEmpty);
        assert_eq!(f.round(Answer::Empty, t + GRACE / 2, GRACE), Step::Nothing);
        // A hiccup inside the grace period: back to normal, nothing changed.
        assert_eq!(
            f.round(Answer::Addrs(a.clone()), t + GRACE / 2, GRACE),
            Step::Recovered(a.clone(), None)
        );
        assert_eq!(f.round(Answer::Empty, t + GRACE, GRACE), Step::WarnEmpty);
        assert_eq!(
            f.round(Answer::Addrs(vec![]), t + GRACE * 2, GRACE),
            Step::Report(vec![])
        );
        assert_eq!(f.round(Answer::Empty, t + GRACE * 3, GRACE), Step::Nothing);
        // Names that come back are followed at once.
        assert_eq!(
            f.round(Answer::Addrs(a.clone()), t + GRACE * 3, GRACE),
            Step::Report(a)
        );
    }

    #[test]
    fn a_name_that_never_resolved_warns_once_and_waits() {
        let mut f = Follower::default();
        let t = Instant::now();
        assert!(matches!(
            f.round(Answer::Failed("timeout".into()), t, GRACE),
            Step::WarnNeverResolved(_)
        ));
        assert_eq!(
            f.round(Answer::Failed("timeout".into()), t, GRACE),
            Step::Nothing
        );
        let a = ips(&["10.0.0.9"]);
        assert_eq!(
            f.round(Answer::Addrs(a.clone()), t, GRACE),
            Step::Recovered(a.clone(), Some(a))
        );
    }
}
