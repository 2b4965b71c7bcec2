//! Konnectivity proxy server, as a library: `main.rs` only parses flags and
//! calls [`run`]; tests call [`bind`] with port 0 and then
//! [`BoundServer::run`] with their own shutdown.
//!
//! - [`frontend`]: kube-apiserver's side (gRPC `ProxyService`, HTTP CONNECT).
//! - [`backend`]: agent streams, agent choice, authentication.
//! - [`tunnel`]: the connection handle between the two.
//! - [`listen`]: accept loops (TLS, Unix).
//! - [`diagnostics`]: the admin endpoint's JSON (agents, connections, routes,
//!   recent refusals and dial failures).
//! - [`metrics`], [`config`].

pub mod backend;
pub mod config;
pub mod diagnostics;
pub mod frontend;
pub mod listen;
pub mod metrics;
mod server;
pub mod tunnel;

pub use config::Config;
pub use server::{bind, run, BoundServer, FrontendAddr};
