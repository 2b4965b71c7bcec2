//! The agent side of the server: agent streams ([`agent::AgentLink`]), the
//! registry that picks one for a dial ([`registry::AgentRegistry`]), selection
//! strategies, agent authentication, and the QUIC endpoint our own agents
//! tie to their streams ([`quic`]).

pub mod agent;
pub mod auth;
pub mod quic;
pub mod registry;
pub mod service;
pub mod strategy;
