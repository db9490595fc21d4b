//! The data plane: header rules, errors, the HTTP forwarding path, upgrade tunnels, and the
//! TCP (L4) forwarding path (userspace copy, or splice(2)).

mod abandoned;
pub mod error;
mod exchange;
pub mod headers;
pub mod http;
pub mod splice;
pub mod tcp;
pub mod tunnel;
