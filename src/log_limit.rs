//! Rate limits for repeated warnings on the data path.
//!
//! A storm of failing requests (a backend down under load, a crowd of hostile clients) would
//! otherwise write one line per request: that costs CPU, floods the journal and hides the
//! first, useful line. Each key, such as (pool, backend, reason), may log once per
//! [`WINDOW`]; the next line that gets through says how many were suppressed meanwhile.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const WINDOW: Duration = Duration::from_secs(1);
/// Keys are bounded by the config (pools × backends × reasons), but a config that changes
/// often could still grow the table; past this size it starts over.
const MAX_KEYS: usize = 4096;

struct Entry {
    logged_at: Instant,
    suppressed: u64,
}

fn table() -> &'static Mutex<HashMap<u64, Entry>> {
    static TABLE: OnceLock<Mutex<HashMap<u64, Entry>>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

/// Whether a line for `key` may be logged now: `Some(n)` with the number of lines suppressed
/// since the last one, or `None` to drop this one.
pub fn allow(key: impl Hash) -> Option<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    let key = h.finish();
    let now = Instant::now();
    let mut table = table().lock().unwrap_or_else(|p| p.into_inner());
    if table.len() >= MAX_KEYS && !table.contains_key(&key) {
        table.clear();
    }
    match table.get_mut(&key) {
        Some(e) if now.duration_since(e.logged_at) < WINDOW => {
            e.suppressed += 1;
            None
        }
        Some(e) => {
            let n = e.suppressed;
            e.logged_at = now;
            e.suppressed = 0;
            Some(n)
        }
        None => {
            table.insert(
                key,
                Entry {
                    logged_at: now,
                    suppressed: 0,
                },
            );
            Some(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_window_then_the_suppressed_count() {
        let key = ("pool", "10.0.0.1:80", "connect_failed", "unit-test");
        assert_eq!(allow(key), Some(0));
        assert_eq!(allow(key), None);
        assert_eq!(allow(key), None);
        assert_eq!(allow(("other", "key")), Some(0), "keys are independent");
        // Age the entry instead of sleeping.
        {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            let mut t = table().lock().unwrap();
            t.get_mut(&h.finish()).unwrap().logged_at -= WINDOW;
        }
        assert_eq!(allow(key), Some(2));
        assert_eq!(allow(key), None);
    }
}
