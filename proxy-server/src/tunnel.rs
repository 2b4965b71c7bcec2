//! What a frontend holds once a dial succeeds: a [`Tunnel`] to one connection
//! on one agent stream, split into a sender and a receiver half. Frontends see
//! only this API, never agent packets, so another transport between server and
//! agent (a QUIC stream per connection) can sit behind it without touching the
//! frontends.
//!
//! Dropping both halves closes the connection on the agent (`CLOSE_REQ`)
//! unless the agent closed it first.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use konnectivity_link::TableError;
use konnectivity_proto::{packet, DialReason};
use konnectivity_relay::{ConnInbox, ConnInfo, Credit, Hold, Inbound};
use tokio_util::sync::CancellationToken;

use crate::backend::agent::AgentLink;

/// Why a dial failed. The text is what a frontend sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// No agent could take the dial. The text is the reference's, which
    /// clients match.
    #[error("No agent available")]
    NoAgent,
    /// The agent tried and failed (refused, unreachable, timeout ...).
    #[error("{error}")]
    Agent {
        /// The agent that dialled.
        agent: String,
        /// The agent's error text.
        error: String,
        /// Why, typed by the agent or read from its text.
        reason: DialReason,
    },
    /// The agent stream ended while the dial was pending.
    #[error("agent {0} went away while dialing")]
    AgentGone(String),
    /// The agent did not answer within --dial-timeout.
    #[error("dial timeout: no answer from agent {agent} within {timeout:?}")]
    Timeout {
        /// The agent.
        agent: String,
        /// The timeout.
        timeout: std::time::Duration,
    },
    /// The agent dropped the dial (`DIAL_CLS`).
    #[error("dial closed by agent")]
    DialClosed,
    /// The agent stream's limits were reached.
    #[error("agent stream refused the dial: {0}")]
    Refused(TableError),
    /// The server's `--allowed-destinations` for this agent refuse the
    /// destination; no `DIAL_REQ` was sent.
    #[error("dial tcp {address}: not allowed by --allowed-destinations on the server for agent {agent} ({policy})")]
    Forbidden {
        /// The agent the dial would have gone to.
        agent: String,
        /// The destination.
        address: String,
        /// The list that applies to the agent.
        policy: String,
    },
    /// The frontend cancelled the dial.
    #[error("dial cancelled by frontend")]
    Cancelled,
}

impl DialError {
    /// Why, as a type: what a CONNECT client's status and a typed-reason
    /// frontend's `DIAL_RSP` say.
    pub fn kind(&self) -> DialReason {
        match self {
            DialError::NoAgent => DialReason::NoAgent,
            DialError::Agent { reason, .. } => *reason,
            DialError::AgentGone(_) => DialReason::AgentLost,
            DialError::Timeout { .. } => DialReason::AgentUnresponsive,
            DialError::Refused(_) => DialReason::Exhausted,
            DialError::Forbidden { .. } => DialReason::Forbidden,
            DialError::DialClosed | DialError::Cancelled => DialReason::Other,
        }
    }

    /// The agent that failed the dial, when one was involved.
    pub fn agent(&self) -> Option<&str> {
        match self {
            DialError::Agent { agent, .. }
            | DialError::AgentGone(agent)
            | DialError::Timeout { agent, .. }
            | DialError::Forbidden { agent, .. } => Some(agent),
            _ => None,
        }
    }

    /// Label for the `dial_failure_count` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::NoAgent => "no_agent",
            DialError::Agent { .. } => "error_response",
            DialError::AgentGone(_) => "agent_gone",
            DialError::Timeout { .. } => "timeout",
            DialError::DialClosed => "backend_close",
            DialError::Refused(_) => "too_many",
            DialError::Cancelled => "frontend_close",
            DialError::Forbidden { .. } => "forbidden",
        }
    }
}

/// The connection ended on the agent side.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("connection closed")]
pub struct Closed;

/// Closes the connection on the agent when the last half is dropped.
struct CloseGuard {
    link: Arc<AgentLink>,
    connect_id: i64,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.link.remove_conn(self.connect_id, true);
    }
}

/// An established connection through an agent.
pub struct Tunnel {
    /// Sending half.
    pub tx: TunnelSender,
    /// Receiving half.
    pub rx: TunnelReceiver,
}

impl Tunnel {
    pub(crate) fn new(
        link: Arc<AgentLink>,
        connect_id: i64,
        inbox: ConnInbox,
        credit: Arc<Credit>,
        kill: CancellationToken,
        info: Arc<ConnInfo>,
    ) -> Self {
        let guard = Arc::new(CloseGuard {
            link: link.clone(),
            connect_id,
        });
        Tunnel {
            tx: TunnelSender {
                link: link.clone(),
                connect_id,
                credit,
                kill,
                info: info.clone(),
                _guard: guard.clone(),
            },
            rx: TunnelReceiver {
                link,
                connect_id,
                inbox,
                info,
                _guard: guard,
            },
        }
    }

    /// The agent's connection id.
    pub fn connect_id(&self) -> i64 {
        self.tx.connect_id
    }
}

/// Sends a connection's bytes to the agent, within the agent's credit.
#[derive(Clone)]
pub struct TunnelSender {
    link: Arc<AgentLink>,
    connect_id: i64,
    credit: Arc<Credit>,
    kill: CancellationToken,
    info: Arc<ConnInfo>,
    _guard: Arc<CloseGuard>,
}

impl TunnelSender {
    /// The connection's credit, for relays that read a socket.
    pub fn credit(&self) -> &Credit {
        &self.credit
    }

    /// Sends one `DATA`. Waits for credit when flow control is on.
    pub async fn send(&self, data: Bytes) -> Result<(), Closed> {
        if self.credit.is_limited() {
            tokio::select! {
                _ = self.credit.wait(1) => {}
                _ = self.kill.cancelled() => return Err(Closed),
                _ = self.link.closed.cancelled() => return Err(Closed),
            }
        }
        self.credit.consume(data.len());
        self.send_counted(data).await
    }

    /// Sends one `DATA` whose credit the caller already took (a relay that
    /// read exactly the credit it was given).
    pub async fn send_counted(&self, data: Bytes) -> Result<(), Closed> {
        if self.kill.is_cancelled() {
            return Err(Closed);
        }
        let n = data.len() as u64;
        if self.link.send(packet::data(self.connect_id, data)).await {
            self.link
                .metrics()
                .bytes
                .with_label_values(&["to_agent"])
                .inc_by(n);
            self.info.sent(n);
            self.link.bytes_to_agent.fetch_add(n, Ordering::Relaxed);
            Ok(())
        } else {
            Err(Closed)
        }
    }

    /// Asks the agent to close (`CLOSE_REQ`); the receiver ends when it answers.
    pub async fn close(&self) {
        self.link.send(packet::close_request(self.connect_id)).await;
    }
}

/// Receives a connection's bytes from the agent.
pub struct TunnelReceiver {
    link: Arc<AgentLink>,
    connect_id: i64,
    inbox: ConnInbox,
    info: Arc<ConnInfo>,
    _guard: Arc<CloseGuard>,
}

impl TunnelReceiver {
    /// The next chunk with its share of the server's held bytes, for a relay
    /// that queues it again before the transport takes it.
    pub async fn recv_held(&mut self) -> Option<(Bytes, Hold)> {
        self.inbox.recv_held().await
    }
}

impl Inbound for TunnelReceiver {
    /// The next chunk, or `None` once the connection is closed.
    async fn recv(&mut self) -> Option<Bytes> {
        self.inbox.recv().await
    }

    /// Reports `n` bytes delivered to the frontend: counts them and grants
    /// credit back to the agent when flow control is on.
    async fn delivered(&mut self, n: usize) {
        self.link
            .metrics()
            .bytes
            .with_label_values(&["to_frontend"])
            .inc_by(n as u64);
        self.info.delivered(n as u64);
        if let Some(g) = self.inbox.written(n) {
            self.link.send(packet::window(self.connect_id, g)).await;
        }
    }
}
