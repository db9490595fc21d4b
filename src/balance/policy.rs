//! Backend selection: pure, weight-aware pick functions. No I/O, no locks.
//!
//! Selection has two phases (pingora's `build`/`iter`): [`Selector::build`] does the
//! allocation and weight expansion when a pool is built (startup, reload), and
//! [`Selector::pick`] runs per request with an atomic `fetch_add` and a short scan. The
//! caller passes a `load(i)` closure that returns the in-flight count of backend `i`, or
//! `None` when that backend must not be chosen (unhealthy, draining, ejected, already tried).
//!
//! `least_conn` scans every backend in pools of up to [`LEAST_CONN_EXACT_MAX`]; in larger
//! ones it takes the less loaded of two backends drawn by weight (the power of two choices,
//! Envoy's `LEAST_REQUEST`): O(log n) per pick instead of O(n), and no shared structure that
//! every request would have to update (an ordered tree of loads, HAProxy's way, is written
//! twice per request by every thread).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Algorithm;

/// Virtual nodes per backend on the consistent-hash ring (on average; weights scale it).
const RING_POINTS_PER_BACKEND: usize = 160;
/// Above this many steps the smooth weighted schedule is built with a cheaper interleave.
const SMOOTH_BUILD_LIMIT: usize = 20_000_000;
/// Up to this many backends `least_conn` finds the least loaded exactly (a scan of 32 costs
/// about what two weighted draws do); above it, it samples.
pub const LEAST_CONN_EXACT_MAX: usize = 32;
/// Pairs drawn before a sampling pick gives up and scans (most backends unavailable).
const SAMPLED_PAIRS: usize = 4;

#[derive(Debug)]
enum Schedule {
    /// Backend indices in smooth weighted round-robin order (nginx's algorithm, precomputed).
    RoundRobin { order: Vec<u32> },
    /// `sampled`: cumulative weights, for pools too large to scan on every pick.
    LeastConn { sampled: Option<Vec<u64>> },
    /// Cumulative weights for weighted random draws (power of two choices).
    Random { cumulative: Vec<u64> },
    /// Sorted (point, backend index) ring.
    Hash { ring: Vec<(u64, u32)> },
}

#[derive(Debug)]
pub struct Selector {
    schedule: Schedule,
    weights: Vec<u32>,
    cursor: AtomicUsize,
}

impl Selector {
    /// `ids` are the stable identities of the backends (their addresses), used to place them
    /// on the hash ring so that a backend keeps its keys whatever its position in the list.
    pub fn build(algorithm: Algorithm, weights: &[u32], ids: &[&str]) -> Selector {
        debug_assert_eq!(weights.len(), ids.len());
        let weights: Vec<u32> = weights.iter().map(|w| (*w).max(1)).collect();
        let schedule = match algorithm {
            Algorithm::RoundRobin => Schedule::RoundRobin {
                order: smooth_weighted_order(&weights),
            },
            Algorithm::LeastConn => Schedule::LeastConn {
                sampled: (weights.len() > LEAST_CONN_EXACT_MAX).then(|| cumulative(&weights)),
            },
            Algorithm::Random => Schedule::Random {
                cumulative: cumulative(&weights),
            },
            Algorithm::Hash => Schedule::Hash {
                ring: build_ring(&weights, ids),
            },
        };
        Selector {
            schedule,
            weights,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Picks a backend index. `key` is the request's hash (only used by the hash policy;
    /// `None` there falls back to round robin). Returns `None` when `load` rejects all.
    pub fn pick(&self, key: Option<u64>, load: impl Fn(usize) -> Option<usize>) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        match &self.schedule {
            Schedule::RoundRobin { order } => {
                // Each skipped slot consumes a cursor value, so the order among the backends
                // that remain follows the schedule instead of piling onto the next one.
                for _ in 0..order.len().min(2 * n) {
                    let slot = self.cursor.fetch_add(1, Ordering::Relaxed) % order.len();
                    let i = order[slot] as usize;
                    if load(i).is_some() {
                        return Some(i);
                    }
                }
                let start = self.cursor.load(Ordering::Relaxed);
                (0..n).map(|k| (start + k) % n).find(|&i| load(i).is_some())
            }
            Schedule::LeastConn { sampled: None } => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                self.least_loaded((0..n).map(|k| (start + k) % n), &load)
            }
            Schedule::LeastConn {
                sampled: Some(cumulative),
            }
            | Schedule::Random { cumulative } => self.two_choices(cumulative, &load),
            Schedule::Hash { ring } => match key {
                Some(key) => {
                    let start = ring.partition_point(|(p, _)| *p < key);
                    (0..ring.len())
                        .map(|k| ring[(start + k) % ring.len()].1 as usize)
                        .find(|&i| load(i).is_some())
                }
                None => {
                    let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                    (0..n).map(|k| (start + k) % n).find(|&i| load(i).is_some())
                }
            },
        }
    }

    /// The less loaded (per unit of weight) of two backends drawn by weight; a few pairs are
    /// drawn when the first holds no available backend, then every backend is scanned.
    fn two_choices(
        &self,
        cumulative: &[u64],
        load: &impl Fn(usize) -> Option<usize>,
    ) -> Option<usize> {
        let n = self.weights.len();
        let total = cumulative.last().copied().unwrap_or(0).max(1);
        let draw = || {
            let r = fastrand::u64(..total);
            cumulative.partition_point(|c| *c <= r).min(n - 1)
        };
        for _ in 0..SAMPLED_PAIRS {
            if let Some(i) = self.least_loaded([draw(), draw()].into_iter(), load) {
                return Some(i);
            }
        }
        let start = fastrand::usize(..n);
        self.least_loaded((0..n).map(|k| (start + k) % n), load)
    }

    /// The candidate with the fewest in-flight requests per unit of weight; the first one
    /// wins ties, and callers rotate where they start so ties spread evenly.
    fn least_loaded(
        &self,
        candidates: impl Iterator<Item = usize>,
        load: &impl Fn(usize) -> Option<usize>,
    ) -> Option<usize> {
        let mut best: Option<(usize, u64)> = None;
        for i in candidates {
            let Some(l) = load(i) else { continue };
            let l = l as u64;
            best = match best {
                // l / w_i < l_best / w_best  <=>  l * w_best < l_best * w_i
                Some((b, lb))
                    if l * u64::from(self.weights[b]) >= lb * u64::from(self.weights[i]) =>
                {
                    Some((b, lb))
                }
                _ => Some((i, l)),
            };
        }
        best.map(|(i, _)| i)
    }
}

/// Running sums of the weights, for weighted draws by binary search.
fn cumulative(weights: &[u32]) -> Vec<u64> {
    weights
        .iter()
        .scan(0u64, |acc, w| {
            *acc += u64::from(*w);
            Some(*acc)
        })
        .collect()
}

/// The full cycle of nginx's smooth weighted round robin: a 3:1:1 pool yields A B A C A,
/// interleaved rather than A A A B C. Weights are divided by their gcd first so the cycle is
/// as short as possible.
fn smooth_weighted_order(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().fold(0u32, |g, w| gcd(g, *w)).max(1);
    let w: Vec<i64> = weights.iter().map(|x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let steps = total as usize;
    if steps.saturating_mul(w.len()) > SMOOTH_BUILD_LIMIT {
        return interleaved_order(&w);
    }
    let mut current = vec![0i64; w.len()];
    let mut order = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order
}

/// Interleaved weighted round robin: round r includes every backend whose weight is at
/// least r. Linear in the total weight; used for very large pools.
fn interleaved_order(w: &[i64]) -> Vec<u32> {
    let max = w.iter().copied().max().unwrap_or(0);
    let mut order = Vec::new();
    for round in 1..=max {
        for (i, wi) in w.iter().enumerate() {
            if *wi >= round {
                order.push(i as u32);
            }
        }
    }
    order
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn build_ring(weights: &[u32], ids: &[&str]) -> Vec<(u64, u32)> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let budget = (RING_POINTS_PER_BACKEND * weights.len()) as u64;
    let mut ring = Vec::with_capacity(budget as usize + weights.len());
    for (i, (w, id)) in weights.iter().zip(ids).enumerate() {
        let points = (budget * u64::from(*w) / total.max(1)).max(1);
        for p in 0..points {
            ring.push((hash_parts(id.as_bytes(), p), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// A stable 64-bit hash (FNV-1a with a murmur3 finaliser): the same key maps to the same
/// backend across restarts and versions, which `std`'s hasher does not promise.
pub fn hash_key(bytes: &[u8]) -> u64 {
    fmix64(fnv1a(0xcbf2_9ce4_8422_2325, bytes))
}

fn hash_parts(id: &[u8], n: u64) -> u64 {
    fmix64(fnv1a(fnv1a(0xcbf2_9ce4_8422_2325, id), &n.to_le_bytes()))
}

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    fn selector(alg: Algorithm, weights: &[u32]) -> Selector {
        let ids = ids(weights.len());
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        Selector::build(alg, weights, &refs)
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves() {
        let s = selector(Algorithm::RoundRobin, &[3, 1, 1]);
        let picks: Vec<usize> = (0..10).filter_map(|_| s.pick(None, |_| Some(0))).collect();
        assert_eq!(picks, [0, 1, 0, 2, 0, 0, 1, 0, 2, 0]);
    }

    #[test]
    fn round_robin_skips_unavailable_without_doubling_the_next() {
        let s = selector(Algorithm::RoundRobin, &[1, 1, 1]);
        let picks: Vec<usize> = (0..6)
            .filter_map(|_| s.pick(None, |i| (i != 1).then_some(0)))
            .collect();
        assert_eq!(picks, [0, 2, 0, 2, 0, 2]);
    }

    #[test]
    fn least_conn_is_weight_aware_and_rotates_ties() {
        let s = selector(Algorithm::LeastConn, &[1, 2, 1]);
        let loads = [2usize, 3, 2];
        // 3/2 < 2/1, so the weight-2 backend wins despite more in flight.
        assert_eq!(s.pick(None, |i| Some(loads[i])), Some(1));
        let s = selector(Algorithm::LeastConn, &[1, 1, 1]);
        let picks: Vec<usize> = (0..3).filter_map(|_| s.pick(None, |_| Some(0))).collect();
        assert_eq!(picks, [0, 1, 2]);
    }

    #[test]
    fn large_least_conn_pools_sample_by_weight_and_prefer_the_idle() {
        let n = 1000;
        // Weights 1 and 3 alternate; nothing in flight: picks follow the weights.
        let weights: Vec<u32> = (0..n).map(|i| if i % 2 == 0 { 1 } else { 3 }).collect();
        let s = selector(Algorithm::LeastConn, &weights);
        let mut by_weight = [0usize; 2];
        for _ in 0..40_000 {
            if let Some(i) = s.pick(None, |_| Some(0)) {
                by_weight[i % 2] += 1;
            }
        }
        let ratio = by_weight[1] as f64 / by_weight[0] as f64;
        assert!(
            (2.7..3.3).contains(&ratio),
            "3:1 weights, got {by_weight:?}"
        );
        // Half the backends busy: a pick lands on a busy one only when both draws did.
        let s = selector(Algorithm::LeastConn, &vec![1; n]);
        let busy = (0..10_000)
            .filter_map(|_| s.pick(None, |i| Some(if i < n / 2 { 10 } else { 0 })))
            .filter(|i| *i < n / 2)
            .count();
        assert!(
            busy < 3_000,
            "expected about 1/4 busy picks, got {busy} of 10000"
        );
        // One backend left available: found, by the scan after the draws miss.
        for _ in 0..100 {
            assert_eq!(s.pick(None, |i| (i == 777).then_some(5)), Some(777));
        }
        assert_eq!(s.pick(None, |_| None), None);
    }

    #[test]
    fn small_least_conn_pools_are_exact() {
        let n = LEAST_CONN_EXACT_MAX;
        let s = selector(Algorithm::LeastConn, &vec![1; n]);
        for _ in 0..100 {
            assert_eq!(s.pick(None, |i| Some(if i == 7 { 0 } else { 1 })), Some(7));
        }
    }

    #[test]
    fn random_prefers_the_less_loaded_of_two() {
        let s = selector(Algorithm::Random, &[1, 1]);
        let mut hits = [0; 2];
        for _ in 0..1000 {
            if let Some(i) = s.pick(None, |i| Some(if i == 0 { 10 } else { 0 })) {
                hits[i] += 1;
            }
        }
        assert!(
            hits[1] > 700,
            "power of two choices should favour the idle backend: {hits:?}"
        );
        assert_eq!(s.pick(None, |_| None), None);
    }

    #[test]
    fn hash_is_sticky_and_moves_about_one_nth_when_a_backend_leaves() {
        let n = 5;
        let s = selector(Algorithm::Hash, &vec![1; n]);
        let keys: Vec<u64> = (0..10_000u32).map(|k| hash_key(&k.to_le_bytes())).collect();
        let before: Vec<usize> = keys
            .iter()
            .filter_map(|k| s.pick(Some(*k), |_| Some(0)))
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .filter_map(|k| s.pick(Some(*k), |_| Some(0)))
            .collect();
        assert_eq!(before, again);
        let after: Vec<usize> = keys
            .iter()
            .filter_map(|k| s.pick(Some(*k), |i| (i != 2).then_some(0)))
            .collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let on_removed = before.iter().filter(|b| **b == 2).count();
        assert_eq!(moved, on_removed, "only keys of the removed backend move");
        let share = moved as f64 / keys.len() as f64;
        assert!(
            (0.12..0.28).contains(&share),
            "about 1/{n} of keys should move, got {share}"
        );
    }

    #[test]
    fn huge_weights_fall_back_to_interleaving() {
        let order = smooth_weighted_order(&[1000, 999, 1]);
        assert_eq!(order.len(), 2000);
        let w = interleaved_order(&[2, 1]);
        assert_eq!(w, [0, 1, 0]);
    }
}
