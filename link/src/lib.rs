//! The multiplexed link between a proxy server and a proxy agent, as a state
//! machine with no sockets, tasks or clocks in it.
//!
//! One link carries many tunnelled connections: the server asks for a dial
//! (`DIAL_REQ`), the agent opens it and names it (`DIAL_RSP` with a
//! `connectID`), both sides send `DATA` and `WINDOW` credit for it, and either
//! side closes it (`CLOSE_REQ` from the server, `CLOSE_RSP` from the agent) or
//! gives up a dial (`DIAL_CLS`). Packets cross in flight, so each end must
//! tell a late packet for a connection that just closed (quietly dropped)
//! from one for an id that never existed (a peer's mistake, answered with a
//! close and charged to its budget).
//!
//! [`Link`] holds one end's part of that: the bounded dial/connection
//! [`table`], the recently closed ids and abandoned dials, the agent's id
//! allocation, and what each received packet means ([`Link::receive`]). The
//! proxy server's agent stream and the proxy agent's server stream are thin
//! drivers around it: they own the sockets, queues, metrics and logs, and do
//! what the returned [`Event`] says. The state machine is tested by driving a
//! server end and an agent end against each other in memory, and fuzzed the
//! same way (`fuzz/fuzz_targets/link.rs`).

mod end;
pub mod table;

pub use end::{Event, Link, Received, Role, RECENT};
pub use table::{Pending, RecentlyClosed, Table, TableError};

#[cfg(test)]
mod tests;
