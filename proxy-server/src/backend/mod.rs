//! The agent side of the server: agent streams ([`agent::AgentLink`]), the
//! registry that picks one for a dial ([`registry::AgentRegistry`]), selection
//! strategies, and agent authentication.

pub mod agent;
pub mod auth;
pub mod registry;
pub mod service;
pub mod strategy;
