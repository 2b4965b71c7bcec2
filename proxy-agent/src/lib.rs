//! Konnectivity proxy agent, as a library: `main.rs` parses flags and calls
//! [`run`]; tests call [`bind`] with port 0 and [`BoundAgent::run`] with their
//! own shutdown.
//!
//! - [`agent`]: the supervisor holding `serverCount` server streams, and drain.
//! - [`stream`]: one server stream: dials, closes, relaying bytes.
//! - [`config`], [`metrics`].

pub mod agent;
pub mod config;
pub mod diagnostics;
pub mod metrics;
pub mod stream;

pub use agent::{bind, run, BoundAgent};
pub use config::Config;
