//! A pool's retry budget: retries may add at most a share of the requests the pool saw over
//! a sliding window, plus a small allowance per second.
//!
//! Why: with `retries = 1` and one of two backends answering 503 to everything, every other
//! request is sent twice, so an outage adds half again to the load on the survivors, just
//! when they can least take it. Linkerd and Envoy cap retries this way; the shape (a ratio
//! over 10 s plus a minimum per second) is Linkerd's.
//!
//! The window is ten one-second buckets under one lock. Only pools with `retry_budget` have
//! a budget, and the lock is held for a few additions per request.

use std::sync::Mutex;
use std::time::Instant;

use crate::config::RetryBudgetConfig;

/// Seconds the window covers.
pub const WINDOW_SECONDS: u64 = 10;

#[derive(Debug)]
pub struct RetryBudget {
    start: Instant,
    window: Mutex<[Bucket; WINDOW_SECONDS as usize]>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    /// The second (since `start`) this bucket counts; older contents are stale.
    second: u64,
    requests: u64,
    retries: u64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            start: Instant::now(),
            window: Mutex::new([Bucket::default(); WINDOW_SECONDS as usize]),
        }
    }
}

impl RetryBudget {
    /// Counts a request (its first attempt).
    pub fn request(&self) {
        self.with_bucket(|b| b.requests += 1);
    }

    /// Whether one more retry fits; if so, it is counted.
    pub fn try_retry(&self, cfg: &RetryBudgetConfig) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock, so no bucket is newer than `now`.
        let now = self.start.elapsed().as_secs();
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in window
            .iter()
            .filter(|b| now.saturating_sub(b.second) < WINDOW_SECONDS)
        {
            requests += b.requests;
            retries += b.retries;
        }
        let allowed =
            cfg.ratio * requests as f64 + f64::from(cfg.min_per_second) * WINDOW_SECONDS as f64;
        if (retries as f64) < allowed {
            Self::bucket(&mut window, now).retries += 1;
            true
        } else {
            false
        }
    }

    fn with_bucket(&self, f: impl FnOnce(&mut Bucket)) {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.start.elapsed().as_secs();
        f(Self::bucket(&mut window, now));
    }

    /// The bucket for second `now`, emptied if it last counted an older second.
    fn bucket(window: &mut [Bucket; WINDOW_SECONDS as usize], now: u64) -> &mut Bucket {
        let b = &mut window[(now % WINDOW_SECONDS) as usize];
        if b.second != now {
            *b = Bucket {
                second: now,
                ..Bucket::default()
            };
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_ratio_plus_the_allowance() {
        let budget = RetryBudget::default();
        let cfg = RetryBudgetConfig {
            ratio: 0.2,
            min_per_second: 1,
        };
        let mut granted = 0;
        for _ in 0..1000 {
            budget.request();
            if budget.try_retry(&cfg) {
                granted += 1;
            }
        }
        // 20% of 1,000 plus 1/s over the 10 s window (all within one second here).
        assert!((200..=210).contains(&granted), "{granted}");
    }

    #[test]
    fn the_allowance_alone_admits_a_few_retries_with_no_requests() {
        let budget = RetryBudget::default();
        let cfg = RetryBudgetConfig {
            ratio: 0.0,
            min_per_second: 2,
        };
        let granted = (0..100).filter(|_| budget.try_retry(&cfg)).count();
        assert_eq!(granted, 20);
    }
}
