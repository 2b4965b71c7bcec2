//! The relay: moving one connection's bytes between a socket and the tunnel, with
//! per-connection credit so that one slow reader cannot stall a shared stream.
//!
//! The reference protocol multiplexes every connection of an agent on one gRPC
//! stream without flow control, so a receiver either buffers without limit or
//! blocks the whole stream. When both ends are ours they negotiate the
//! `window-v1` feature: each connection starts with [`WINDOW`] bytes of credit
//! in each direction, the sender stops reading its socket when the credit is
//! spent, and the receiver grants credit back (`WINDOW` packets) as it writes
//! bytes out. The receiver's queue therefore never holds more than one window
//! and never blocks the shared stream. With a reference peer there is no
//! credit ([`Credit::unlimited`]) and the receiver's bounded queue plus a stall
//! timeout decide (see the server and agent docs).
//!
//! - [`Credit`] and [`Grants`]: per-connection send credit and batched grants.
//! - [`connection`]: a connection's entry in its stream's table
//!   ([`ConnEntry`]) and its [`ConnInbox`], over the bounded [`queue`].
//! - [`Held`]: bytes held for slow readers, over all connections.
//! - [`socket_to_tunnel`] and [`tunnel_to_socket`]: the two copies.
//! - [`ConnInfo`] and [`Liveness`]: what the admin endpoint shows.

mod conn;
mod copy;
mod credit;
mod held;
pub mod queue;
mod record;

pub use conn::{connection, ConnEntry, ConnInbox, Delivery, Slot};
pub use copy::{socket_to_tunnel, tunnel_to_socket, Buffered, ChunkReader, Inbound};
pub use credit::{Credit, Grants};
pub use held::{Held, Hold, Queued};
pub use record::{ConnInfo, Liveness};

/// Initial credit per connection and direction, in bytes.
pub const WINDOW: i64 = 1 << 20;
/// Largest read from a socket, so the largest `DATA` we produce.
pub const READ_CHUNK: usize = 128 * 1024;
/// First read size; reads grow towards [`READ_CHUNK`] while they come back
/// full, so an idle connection holds a small buffer and a busy one large reads.
pub const FIRST_READ: usize = 8 * 1024;
/// Packets a connection's inbound queue holds without flow control (bytes
/// are bounded by `QUEUE_PACKETS * max message size` then).
pub const QUEUE_PACKETS: usize = 64;
/// With flow control, what a connection's inbound queue may hold, counting
/// [`CHUNK_COST`] per chunk on top of its bytes: two windows. A correct peer
/// stays within one window; a reader that is this far behind (or a peer
/// that ignores its credit) gets the connection closed, never the shared
/// stream held up.
pub const QUEUE_BYTES: usize = 2 * WINDOW as usize;
/// What one queued chunk costs besides its bytes (queue slot, buffer
/// header), so that many tiny chunks count for what they take.
pub const CHUNK_COST: usize = 128;
/// Queued chunks of one connection that may be slices of a shared buffer.
/// A chunk decoded from the shared stream is a slice of that stream's read
/// buffer and keeps all of it alive; once a connection's writer is this far
/// behind, later chunks are copied into their own buffers, so a stalled
/// connection pins at most this many read buffers.
pub const PINNED_CHUNKS: usize = 8;

#[cfg(test)]
mod tests;
