//! The data plane: hop-by-hop and forwarding headers, route rules, errors, the HTTP forwarding path, upgrade tunnels, and the
//! TCP (L4) forwarding path (userspace copy, or splice(2)).

mod abandoned;
pub mod error;
mod exchange;
pub mod headers;
pub mod http;
pub mod rules;
pub mod splice;
pub mod tcp;
pub mod tunnel;
