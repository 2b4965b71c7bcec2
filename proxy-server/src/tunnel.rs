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

/// A QUIC tunnel's end: the stream itself closes with its halves; this
/// counts the connection out.
struct QuicGuard {
    link: Arc<AgentLink>,
    connect_id: i64,
}

impl Drop for QuicGuard {
    fn drop(&mut self) {
        self.link.quic_conn_left(self.connect_id);
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
    /// A connection on the agent's gRPC stream: `DATA` packets within the
    /// agent's credit, `WINDOW` grants back, `CLOSE_REQ` to close.
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
                info: info.clone(),
                way: SendWay::Stream {
                    credit,
                    kill,
                    _guard: guard.clone(),
                },
            },
            rx: TunnelReceiver {
                link,
                connect_id,
                info,
                way: RecvWay::Stream {
                    inbox,
                    _guard: guard,
                },
            },
        }
    }

    /// A connection on a QUIC stream of its own: QUIC's flow control, a
    /// finish to close.
    pub(crate) fn quic(
        link: Arc<AgentLink>,
        connect_id: i64,
        (send, recv): (quinn::SendStream, quinn::RecvStream),
        info: Arc<ConnInfo>,
    ) -> Self {
        let guard = Arc::new(QuicGuard {
            link: link.clone(),
            connect_id,
        });
        Tunnel {
            tx: TunnelSender {
                link: link.clone(),
                connect_id,
                info: info.clone(),
                way: SendWay::Quic {
                    send: Arc::new(tokio::sync::Mutex::new(send)),
                    credit: Arc::new(Credit::unlimited()),
                    _guard: guard.clone(),
                },
            },
            rx: TunnelReceiver {
                link,
                connect_id,
                info,
                way: RecvWay::Quic {
                    recv,
                    _guard: guard,
                },
            },
        }
    }

    /// The agent's connection id.
    pub fn connect_id(&self) -> i64 {
        self.tx.connect_id
    }
}

/// How a sender's bytes travel.
#[derive(Clone)]
enum SendWay {
    /// `DATA` on the agent's gRPC stream.
    Stream {
        credit: Arc<Credit>,
        kill: CancellationToken,
        _guard: Arc<CloseGuard>,
    },
    /// The connection's own QUIC stream.
    Quic {
        send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
        /// Unlimited: QUIC's stream window holds the writer back instead.
        credit: Arc<Credit>,
        _guard: Arc<QuicGuard>,
    },
}

/// Sends a connection's bytes to the agent, within the agent's credit.
#[derive(Clone)]
pub struct TunnelSender {
    link: Arc<AgentLink>,
    connect_id: i64,
    info: Arc<ConnInfo>,
    way: SendWay,
}

impl TunnelSender {
    /// The connection's credit, for relays that read a socket.
    pub fn credit(&self) -> &Credit {
        match &self.way {
            SendWay::Stream { credit, .. } | SendWay::Quic { credit, .. } => credit,
        }
    }

    /// Sends one chunk. Waits for credit when flow control is on.
    pub async fn send(&self, data: Bytes) -> Result<(), Closed> {
        if let SendWay::Stream { credit, kill, .. } = &self.way {
            if credit.is_limited() {
                tokio::select! {
                    _ = credit.wait(1) => {}
                    _ = kill.cancelled() => return Err(Closed),
                    _ = self.link.closed.cancelled() => return Err(Closed),
                }
            }
            credit.consume(data.len());
        }
        self.send_counted(data).await
    }

    /// Sends one chunk whose credit the caller already took (a relay that
    /// read exactly the credit it was given).
    pub async fn send_counted(&self, data: Bytes) -> Result<(), Closed> {
        let n = data.len() as u64;
        let sent = match &self.way {
            SendWay::Stream { kill, .. } => {
                if kill.is_cancelled() {
                    return Err(Closed);
                }
                self.link.send(packet::data(self.connect_id, data)).await
            }
            SendWay::Quic { send, .. } => send.lock().await.write_chunk(data).await.is_ok(),
        };
        if !sent {
            return Err(Closed);
        }
        self.link
            .metrics()
            .bytes
            .with_label_values(&["to_agent"])
            .inc_by(n);
        self.info.sent(n);
        self.link.bytes_to_agent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Closes the connection: `CLOSE_REQ` (the receiver ends when the agent
    /// answers), or a QUIC stream finish (the receiver ends when the
    /// destination has said all it will).
    pub async fn close(&self) {
        match &self.way {
            SendWay::Stream { .. } => {
                self.link.send(packet::close_request(self.connect_id)).await;
            }
            SendWay::Quic { send, .. } => {
                let _ = send.lock().await.finish();
            }
        }
    }
}

/// How a receiver's bytes arrive.
enum RecvWay {
    /// Queued by the task that reads the agent's gRPC stream.
    Stream {
        inbox: ConnInbox,
        _guard: Arc<CloseGuard>,
    },
    /// Read from the connection's own QUIC stream.
    Quic {
        recv: quinn::RecvStream,
        _guard: Arc<QuicGuard>,
    },
}

/// Largest chunk read from a QUIC stream at once.
const QUIC_CHUNK: usize = 128 * 1024;

/// Receives a connection's bytes from the agent.
pub struct TunnelReceiver {
    link: Arc<AgentLink>,
    connect_id: i64,
    info: Arc<ConnInfo>,
    way: RecvWay,
}

impl TunnelReceiver {
    /// The next chunk with its share of the server's held bytes, for a relay
    /// that queues it again before the transport takes it.
    pub async fn recv_held(&mut self) -> Option<(Bytes, Hold)> {
        match &mut self.way {
            RecvWay::Stream { inbox, .. } => inbox.recv_held().await,
            // Bytes wait in QUIC's window, not in the server's held count.
            RecvWay::Quic { recv, .. } => match recv.read_chunk(QUIC_CHUNK, true).await {
                Ok(Some(chunk)) => Some((chunk.bytes, Hold::default())),
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(connect_id = self.connect_id, error = %e, "QUIC stream ended");
                    None
                }
            },
        }
    }
}

impl Inbound for TunnelReceiver {
    /// The next chunk, or `None` once the connection is closed.
    async fn recv(&mut self) -> Option<Bytes> {
        self.recv_held().await.map(|(data, _)| data)
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
        if let RecvWay::Stream { inbox, .. } = &mut self.way {
            if let Some(g) = inbox.written(n) {
                self.link.send(packet::window(self.connect_id, g)).await;
            }
        }
    }
}
