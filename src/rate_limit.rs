//! Request rate limits (`rate_limit` on a listener or a route): a token bucket per key
//! (the client's address, or a header's value), refilled at `requests_per_second` up to
//! `burst`. A request that finds its bucket empty gets 429 with `Retry-After`.
//!
//! Memory is bounded whatever the clients do: keys are stored as 64-bit hashes (with a
//! per-process random seed, so a client cannot aim collisions), at most `max_keys` of them.
//! A bucket that has been idle long enough to be full again holds no information and is
//! dropped first when room is needed (swept at most once a second); when every entry is
//! still in use, an arbitrary one goes (a flood of new addresses then resets some buckets
//! to full: the limit fails open for a few keys rather than letting memory grow, and the
//! flood costs each request constant time, not a scan).
//!
//! IPv6 clients are counted per network (`ipv6_prefix`, /64 by default), not per address:
//! a single host or subscriber is usually handed a whole /64, and counting each of its
//! 2^64 addresses apart would let it step around its limit and churn the table.
//!
//! The table is split into shards, each under its own lock, so requests of different keys
//! rarely wait for each other.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{RateKey, RateLimitConfig};

const SHARDS: usize = 16;

#[derive(Debug)]
pub struct RateLimiter {
    pub config: RateLimitConfig,
    start: Instant,
    seed: std::collections::hash_map::RandomState,
    shards: Vec<Mutex<Shard>>,
}

#[derive(Debug, Default)]
struct Shard {
    table: HashMap<u64, Bucket>,
    /// When (ms since `start`) the table was last swept for full-again buckets.
    swept_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// Milliseconds since `start` at the last refill.
    at_ms: u64,
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            config,
            start: Instant::now(),
            seed: Default::default(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// The key a request is counted under: its header's value, or (no such header, or
    /// `client_ip`) the client's address.
    pub fn key_of(&self, headers: &http::HeaderMap, client: IpAddr) -> u64 {
        let mut h = self.seed.build_hasher();
        match &self.config.key {
            RateKey::Header(name) => match headers.get(name) {
                Some(v) => {
                    1u8.hash(&mut h);
                    v.as_bytes().hash(&mut h);
                }
                None => self.client(client).hash(&mut h),
            },
            RateKey::ClientIp => self.client(client).hash(&mut h),
        }
        h.finish()
    }

    /// The client as it is counted: an IPv4 address (also when written as an IPv4-mapped
    /// IPv6 one), or an IPv6 address cut to `ipv6_prefix` bits.
    fn client(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u32::from(self.config.ipv6_prefix.min(128));
                    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                    IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
                }
            },
        }
    }

    /// Takes a token for `key`, or says how long until one is there.
    pub fn check(&self, key: u64) -> Result<(), Duration> {
        let rate = self.config.requests_per_second;
        let burst = f64::from(self.config.burst);
        let shard = &self.shards[(key as usize) % SHARDS];
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: a bucket's time never goes backwards.
        let now = self.start.elapsed().as_millis() as u64;
        let cap = self.config.max_keys.div_ceil(SHARDS).max(1);
        if !shard.table.contains_key(&key) && shard.table.len() >= cap {
            self.make_room(&mut shard, now);
        }
        let b = shard.table.entry(key).or_insert(Bucket {
            tokens: burst,
            at_ms: now,
        });
        let elapsed = now.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at_ms = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    /// Keys tracked now (for tests and `/status`).
    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).table.len())
            .sum()
    }

    /// Makes room for one key. At most once a second per shard, a sweep drops the buckets
    /// that are full again (they hold no information); otherwise, or if the sweep freed
    /// nothing, one entry goes, whichever the table yields first. So a flood of new
    /// addresses costs each request O(1) here, not a scan of the shard.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        if now.saturating_sub(shard.swept_ms) >= 1000 {
            shard.swept_ms = now;
            let refill_ms = (f64::from(self.config.burst) / self.config.requests_per_second
                * 1000.0)
                .ceil() as u64;
            let before = shard.table.len();
            shard
                .table
                .retain(|_, b| now.saturating_sub(b.at_ms) < refill_ms);
            if shard.table.len() < before {
                return;
            }
        }
        if let Some(any) = shard.table.keys().next().copied() {
            shard.table.remove(&any);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32, max_keys: usize) -> RateLimiter {
        RateLimiter::new(RateLimitConfig {
            requests_per_second: rate,
            burst,
            key: RateKey::ClientIp,
            max_keys,
            ipv6_prefix: 64,
        })
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let l = limiter(1.0, 3, 10);
        let ok = (0..10).filter(|_| l.check(7).is_ok()).count();
        assert_eq!(ok, 3);
        let wait = l.check(7).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(l.check(8).is_ok(), "another key has its own bucket");
    }

    #[test]
    fn the_table_never_holds_more_than_max_keys() {
        let l = limiter(1.0, 5, 64);
        for k in 0..10_000u64 {
            let _ = l.check(k.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        assert!(l.keys() <= 64, "{}", l.keys());
    }

    #[test]
    fn ipv6_clients_count_per_prefix_and_mapped_ipv4_as_ipv4() {
        let l = limiter(1.0, 1, 64);
        let none = http::HeaderMap::new();
        let key = |ip: &str| l.key_of(&none, ip.parse().unwrap());
        assert_eq!(key("2001:db8:0:1::1"), key("2001:db8:0:1:ffff::9"));
        assert_ne!(key("2001:db8:0:1::1"), key("2001:db8:0:2::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        let mut whole = limiter(1.0, 1, 64);
        whole.config.ipv6_prefix = 128;
        let key = |ip: &str| whole.key_of(&none, ip.parse().unwrap());
        assert_ne!(key("2001:db8:0:1::1"), key("2001:db8:0:1::2"));
    }
}
