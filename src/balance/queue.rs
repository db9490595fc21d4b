//! A pool's queue: requests that found every eligible backend at its `max_connections`
//! wait here, first in first out, until a backend frees a slot or `queue_timeout` passes
//! (HAProxy's per-server `maxconn` with its queue).
//!
//! Why a queue and not a 503 at once: a Synapse worker or an API unit that slows down when
//! too many requests hit it serves best when the excess waits in front of it for a moment;
//! a short burst then costs latency instead of errors. The bound (`max_queue`) and the
//! timeout keep a long overload from piling up memory and stale requests.
//!
//! Waiters are woken by [`tokio::sync::Notify`], which wakes the longest-waiting one first;
//! a lease on a limited backend notifies one waiter when it ends. A request that arrives
//! while others wait joins the queue behind them instead of taking the free slot first, and
//! a waiter that looks on its own (see `proxy::http::wait_in_queue`) does so only when no
//! one older is waiting: arrival numbers keep the order.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Queue {
    notify: Notify,
    waiting: AtomicUsize,
    /// Arrival numbers of the requests waiting now, oldest first.
    order: Mutex<BTreeSet<u64>>,
    next: AtomicU64,
}

/// A place in the queue; leaving (by a pick, a timeout or the client going away) drops it.
#[derive(Debug)]
pub struct Ticket<'a> {
    queue: &'a Queue,
    number: u64,
}

impl Ticket<'_> {
    /// Whether no request that is still waiting arrived before this one.
    pub fn is_first(&self) -> bool {
        self.queue.lock_order().first() == Some(&self.number)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queue.lock_order().remove(&self.number);
        self.queue.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Queue {
    /// Requests waiting now (for `/status` and metrics).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Takes a place if fewer than `max` wait.
    pub fn enter(&self, max: usize) -> Option<Ticket<'_>> {
        self.waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock_order().insert(number);
        Some(Ticket {
            queue: self,
            number,
        })
    }

    /// A slot was freed: the longest waiter gets to look.
    pub fn slot_freed(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.notify.notify_one();
        }
    }

    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    fn lock_order(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        // A set of numbers holds no invariant a panic could break half-way.
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }
}
