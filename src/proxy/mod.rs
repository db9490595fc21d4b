//! The data plane's request handling: header rules, errors, and the HTTP forwarding path.

pub mod error;
pub mod headers;
pub mod http;
pub mod tunnel;
