//! The data plane: hop-by-hop and forwarding headers, the client's address behind trusted
//! proxies, response compression, route rules, errors, the HTTP forwarding path, upgrade tunnels, and the TCP
//! (L4) forwarding path (userspace copy, or splice(2)).

mod abandoned;
pub mod client_addr;
pub mod compress;
pub mod context;
pub mod error;
mod exchange;
pub mod headers;
pub mod http;
pub mod rules;
pub mod sni_peek;
pub mod splice;
pub mod tcp;
pub mod tunnel;
pub mod websocket_h2;

use std::time::{Duration, Instant};

/// Upper bound on backends tried for one request or connection, counting those it never
/// reached.
const MAX_TRIES: usize = 64;

/// Whether the try numbered `attempt` (from 0), which never reached its backend (refused,
/// or closed before a byte was written) or found a reused connection that the backend ended
/// without answering a byte, may be followed by one that `retries` does not count. Such a try has no side effect anywhere, so when most of a pool exits at once the
/// request goes on to the next backend instead of running out of retries on dead replicas;
/// the pool's untried backends, `MAX_TRIES` and `connect_timeout` since the first such
/// failure (`first`, set here: the clock is read only on this path) bound it.
fn may_try_free(attempt: usize, first: &mut Option<Instant>, connect_timeout: Duration) -> bool {
    let first = *first.get_or_insert_with(Instant::now);
    attempt + 1 < MAX_TRIES && first.elapsed() < connect_timeout
}
