//! Waiting in a pool's queue for a backend below its `max_connections`, first in first out,
//! following the pool across reloads.

use std::sync::Arc;
use std::time::Duration;

use crate::balance::backend::Lease;
use crate::balance::{NoPick, Pool};
use crate::proxy::error::ProxyError;
use crate::state::Live;

/// How often a queued request looks for a free backend without being woken.
const QUEUE_RECHECK: Duration = Duration::from_millis(250);

/// How waiting in a pool's queue ended without a backend.
pub(super) enum QueueEnd {
    /// Every backend went down or away meanwhile.
    Down,
    /// The queue was full, or `queue_timeout` passed.
    Refused(ProxyError),
}

/// Waits in `pool`'s queue for a backend below its `max_connections`, first in first out:
/// with requests `ahead`, it looks only once woken, so a slot freed for them stays theirs.
///
/// Each look picks from the pool as it is now: once a reload has replaced `pool` (see
/// [`successor`]), a waiting request goes to the new set of backends, and only when that
/// set has none available does it get its 503. The index returned is `pool`'s (what
/// `tried` holds); `usize::MAX` for a backend `pool` does not have.
pub(super) async fn wait_in_queue(
    pool: &Pool,
    live: &Live,
    key: Option<u64>,
    tried: &[usize],
    ahead: bool,
) -> Result<(usize, Lease), QueueEnd> {
    let Some(queue) = pool.queue() else {
        return Err(QueueEnd::Down);
    };
    let Some(ticket) = queue.enter(pool.config.max_queue) else {
        return Err(QueueEnd::Refused(ProxyError::QueueFull {
            pool: Arc::clone(&pool.name),
        }));
    };
    let started = tokio::time::Instant::now();
    let deadline = started + pool.config.queue_timeout;
    // First in the queue after all (those ahead just left): nothing to wait behind.
    let mut look = !ahead || ticket.is_first();
    // Registered before the first look, so a slot freed between a look and the wait is not
    // missed. Notify wakes the oldest registration first, so a waiter keeps its
    // registration until it is woken: registering again on every recheck would send it to
    // the back, behind requests that came later.
    let mut notified = std::pin::pin!(queue.notify().notified());
    notified.as_mut().enable();
    loop {
        if look {
            let picked = match successor(pool, live) {
                None => pool.select(key, tried),
                Some(next) => select_in_successor(pool, &next, key, tried),
            };
            match picked {
                Ok(p) => return Ok(p),
                Err(NoPick::Down) => return Err(QueueEnd::Down),
                Err(NoPick::Full) => {}
            }
        }
        // Slots free up by a lease ending (which wakes the oldest waiter), but also by a
        // backend coming back up or a limit raised by a reload, which wake nobody: the
        // oldest waiter looks again now and then too (only the oldest, to keep the order).
        let recheck = tokio::time::sleep(
            QUEUE_RECHECK.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        );
        tokio::select! {
            () = notified.as_mut() => {
                look = true;
                notified.set(queue.notify().notified());
                notified.as_mut().enable();
            }
            // A reload that lifted the limits leaves no order to keep: everyone looks.
            () = recheck => {
                look = ticket.is_first()
                    || successor(pool, live).is_some_and(|next| next.queue().is_none());
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(QueueEnd::Refused(ProxyError::QueueTimeout {
                    pool: Arc::clone(&pool.name),
                    waited: started.elapsed(),
                }));
            }
        }
    }
}

/// The pool that replaced `pool` in the current generation, when a request queued in `pool`
/// can move to it: the queue carried over (the limits did) or there are no limits any more,
/// and the transport is the same (the request was prepared for `pool`'s protocol, and its
/// TLS settings connect).
fn successor(pool: &Pool, live: &Live) -> Option<Arc<Pool>> {
    let snap = live.load();
    let next = snap.pools.get(&pool.name)?;
    let same_queue = match (pool.queue(), next.queue()) {
        (_, None) => true,
        (Some(here), Some(there)) => std::ptr::eq(here, there),
        (None, Some(_)) => false,
    };
    (!std::ptr::eq(pool, &**next)
        && same_queue
        && next.config.protocol == pool.config.protocol
        && next.config.tls == pool.config.tls)
        .then(|| Arc::clone(next))
}

/// [`Pool::select`] in `next` for a request of `pool`: `tried` (indices into `pool`) is
/// translated to the same backends in `next`, and the index picked back into `pool`'s.
fn select_in_successor(
    pool: &Pool,
    next: &Pool,
    key: Option<u64>,
    tried: &[usize],
) -> Result<(usize, Lease), NoPick> {
    let tried_there: Vec<usize> = tried
        .iter()
        .filter_map(|&i| pool.backends.get(i))
        .filter_map(|b| next.backends.iter().position(|n| Arc::ptr_eq(n, b)))
        .collect();
    let (_, lease) = next.select(key, &tried_there)?;
    let here = pool
        .backends
        .iter()
        .position(|b| Arc::ptr_eq(b, lease.backend()))
        .unwrap_or(usize::MAX);
    Ok((here, lease))
}
