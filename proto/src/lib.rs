//! Konnectivity wire protocol: the gRPC services and `Packet` message (generated
//! from `proto/konnectivity.proto`), plus protocol logic that needs no sockets
//! and no clock, so it is unit-tested in memory and easy to fuzz:
//!
//! - [`packet`]: constructors and a validated, typed view ([`Message`]) of a `Packet`.
//! - [`ids`]: connection-id and dial-id allocation.
//! - [`metadata`]: stream metadata names and the `agentIdentifiers` encoding.
//! - [`budget`]: how many protocol mistakes a peer may make before it is cut off.
//! - [`h2watch`]: watches a server's HTTP/2 frames both ways: the `GOAWAY` frames (and their error
//!   codes) it writes, and the `PING`/`SETTINGS` floods a peer sends.
//! - [`grpc`]: `Packet` streams straight on HTTP/2 bodies (no codec copies),
//!   served through tonic's router and opened on tonic's `Channel`.
//! - [`authority`]: the `:authority` rewriter for gRPC on the Unix socket (HTTP/2
//!   frames and HPACK, bounded).
//! - [`connect`]: the HTTP CONNECT request parser and the dial-error -> status map.
//! - [`policy`]: `--allowed-destinations`, the address ranges and ports a dial may reach.
//! - [`reason`]: why a dial failed, typed ([`DialReason`]), read from a peer's text or
//!   carried on the wire between our own peers.

pub mod authority;
pub mod budget;
pub mod connect;
pub mod grpc;
pub mod h2watch;
pub mod ids;
pub mod metadata;
pub mod packet;
pub mod policy;
pub mod reason;

/// Generated protobuf and tonic code. The proto file has no package, so prost
/// writes it to `_.rs`.
#[allow(clippy::all, missing_docs)]
pub mod wire {
    tonic::include_proto!("_");
}

pub use packet::{Message, PacketError};
pub use reason::DialReason;
pub use wire::{Packet, PacketType};

/// gRPC method path of the frontend service.
pub const PROXY_METHOD: &str = "/ProxyService/Proxy";
/// gRPC method path of the agent service.
pub const CONNECT_METHOD: &str = "/AgentService/Connect";
