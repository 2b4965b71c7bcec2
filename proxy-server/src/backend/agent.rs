//! One agent stream on the server: its dial/connection table, the task that
//! reads its packets, and the per-connection queues that keep one slow
//! frontend from stalling the others.
//!
//! Packets from the agent are dispatched to per-connection bounded queues
//! ([`relay::QUEUE_PACKETS`]). With an agent that negotiated `window-v1`, the
//! agent never has more than one window in flight per connection, so a queue
//! never fills and the stream is never held up. With a reference agent (no flow
//! control) a full queue holds up this agent's stream for at most
//! `--stall-timeout`; then only that connection is closed (`CLOSE_REQ` to the
//! agent, the frontend sees the close), with a warning and the
//! `stalled_connections_closed_total` metric.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use konnectivity_link::{Event, Link, Pending, Role, TableError};
use konnectivity_proto::budget::{Budget, Mistake};
use konnectivity_proto::metadata::AgentIdentifiers;
use konnectivity_proto::{Message, Packet};
use konnectivity_quic::CloseCode;
use konnectivity_relay::{self as relay, ConnInfo, Liveness, Slot};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::tunnel::{DialError, Tunnel};

/// Settings every agent stream shares.
#[derive(Clone)]
pub struct LinkSettings {
    /// Metrics.
    pub metrics: Metrics,
    /// How long a full connection queue may hold up the stream.
    pub stall_timeout: Duration,
    /// Pending dials allowed.
    pub max_pending: usize,
    /// Connections allowed.
    pub max_conns: usize,
    /// Bytes held for frontends over all connections, against
    /// `--max-buffered-bytes`.
    pub held: Arc<relay::Held>,
}

/// A dial waiting for its `DIAL_RSP`.
pub(crate) struct PendingDial {
    reply: oneshot::Sender<Result<Tunnel, DialError>>,
    started: Instant,
    info: Arc<ConnInfo>,
}

/// A stream's dials and connections at one moment.
pub struct Snapshot {
    /// Pending dials by dial id.
    pub pending: Vec<(i64, Arc<ConnInfo>)>,
    /// Connections by connectID, with the chunks queued towards the frontend
    /// and the transport (`grpc`, `quic`).
    pub conns: Vec<(i64, Arc<ConnInfo>, usize, &'static str)>,
}

/// The server's end of the link.
type LinkState = Link<PendingDial, Slot>;

/// Malformed packets of one stream logged at warning level; the rest are
/// counted only (the budget ends the stream soon after).
const LOGGED_MISTAKES: u64 = 10;
/// Capacity of the packet queue towards the agent, shared by its connections.
pub const OUT_QUEUE: usize = 256;
pub use later::LATER_MAX;

/// One connected agent stream.
pub struct AgentLink {
    /// Process-unique serial of this stream (an agent may hold several).
    pub serial: u64,
    /// The agent's `agentID`.
    pub agent_id: String,
    /// What the agent said about itself.
    pub identifiers: AgentIdentifiers,
    /// `window-v1` negotiated.
    pub flow: bool,
    /// The agent's address.
    pub peer: String,
    /// When the stream was accepted and when the agent last sent a packet.
    pub liveness: Liveness,
    /// Bytes of DATA from the agent.
    pub bytes_from_agent: AtomicU64,
    /// Bytes of DATA to the agent.
    pub bytes_to_agent: AtomicU64,
    draining: AtomicBool,
    /// The reading task is handling a packet (not waiting for the agent).
    busy: AtomicBool,
    pub(super) load: AtomicUsize,
    out: mpsc::Sender<Packet>,
    later: Mutex<later::Later>,
    state: Mutex<LinkState>,
    /// Cancelled when the stream has ended.
    pub closed: CancellationToken,
    pub(super) settings: LinkSettings,
    /// Names this stream to the QUIC endpoint (the agent's hello).
    pub ticket: String,
    /// The agent's QUIC connection, when one is tied to this stream: dials
    /// go over it.
    pub(super) quic: Mutex<Option<quinn::Connection>>,
    /// Dials and connections on QUIC streams (those on the gRPC stream are
    /// in the link's table).
    pub(super) quic_table: Mutex<super::quic::QuicTable>,
}

impl AgentLink {
    /// A link whose outbound packets go to `out`.
    pub fn new(
        serial: u64,
        agent_id: String,
        identifiers: AgentIdentifiers,
        flow: bool,
        peer: String,
        out: mpsc::Sender<Packet>,
        settings: LinkSettings,
    ) -> Self {
        Self {
            serial,
            agent_id,
            identifiers,
            flow,
            peer,
            liveness: Liveness::default(),
            bytes_from_agent: AtomicU64::new(0),
            bytes_to_agent: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            load: AtomicUsize::new(0),
            out,
            later: Mutex::default(),
            state: Mutex::new(Link::new(
                Role::Server,
                settings.max_pending,
                settings.max_conns,
            )),
            closed: CancellationToken::new(),
            settings,
            ticket: konnectivity_quic::new_ticket(),
            quic: Mutex::new(None),
            quic_table: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.settings.metrics
    }

    /// Has the agent announced `DRAIN`?
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Pending dials plus open connections: used to spread load.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// Has the agent been silent for longer than `limit`? Time the reading
    /// task spends handling a packet (waiting on this server's own queues)
    /// does not count as the agent's silence.
    pub fn silent_for(&self, limit: Duration) -> bool {
        !self.busy.load(Ordering::Relaxed) && self.liveness.since_last() > limit
    }

    /// Notes that a packet arrived, and reads it.
    fn seen(&self, p: Packet) -> Result<Message, konnectivity_proto::PacketError> {
        self.liveness.seen();
        Message::from_packet(p)
    }

    /// Packets waiting in the queue towards the agent.
    pub fn queued(&self) -> usize {
        OUT_QUEUE - self.out.capacity()
    }

    /// Pending dials and established connections, for the admin endpoint.
    pub fn snapshot(&self) -> Snapshot {
        let mut snap = {
            let st = self.state();
            Snapshot {
                pending: st
                    .table()
                    .pending()
                    .map(|(r, p)| (r, p.info.clone()))
                    .collect(),
                conns: st
                    .table()
                    .conns()
                    .map(|(id, s)| (id, s.info.clone(), s.conn.tx.queued(), "grpc"))
                    .collect(),
            }
        };
        let quic = self.quic_table.lock().unwrap_or_else(|e| e.into_inner());
        snap.pending
            .extend(quic.pending.iter().map(|(r, i)| (*r, i.clone())));
        snap.conns
            .extend(quic.open.iter().map(|(id, i)| (*id, i.clone(), 0, "quic")));
        snap
    }

    /// Queues a packet for the agent, waiting for room. False when the stream
    /// has ended.
    pub async fn send(&self, p: Packet) -> bool {
        tokio::select! {
            r = self.out.send(p) => r.is_ok(),
            _ = self.closed.cancelled() => false,
        }
    }

    /// Registers a dial and sends `DIAL_REQ`. The receiver yields the tunnel or
    /// the error. [`DialError::AgentGone`] here means the stream ended before
    /// the request was queued: the agent never saw it, and the dial may go to
    /// another agent.
    pub(crate) async fn begin_dial(
        &self,
        address: &str,
        random: i64,
        frontend: &'static str,
    ) -> Result<oneshot::Receiver<Result<Tunnel, DialError>>, DialError> {
        let (reply, rx) = oneshot::channel();
        let started = Instant::now();
        let info = ConnInfo::new(address, frontend);
        let request = self
            .state()
            .dial(
                address,
                random,
                PendingDial {
                    reply,
                    started,
                    info,
                },
            )
            .map_err(|e| match e {
                TableError::Ended => DialError::AgentGone(self.agent_id.clone()),
                e => DialError::Refused(e),
            })?;
        self.load.fetch_add(1, Ordering::Relaxed);
        self.settings.metrics.pending_dials.inc();
        self.settings
            .metrics
            .dials
            .with_label_values(&["grpc"])
            .inc();
        if !self.send(request).await {
            if self.state().take_dial(random).is_some() {
                self.dial_left();
            }
            return Err(DialError::AgentGone(self.agent_id.clone()));
        }
        Ok(rx)
    }

    /// A dial left the table (answered, failed, given up).
    fn dial_left(&self) {
        self.load.fetch_sub(1, Ordering::Relaxed);
        self.settings.metrics.pending_dials.dec();
    }

    /// The agent answered a dial (either way): it left the table, and its
    /// duration is observed.
    fn dial_answered(&self, dial: &Pending<PendingDial>) {
        self.dial_left();
        self.settings
            .metrics
            .dial_duration
            .observe(dial.value.started.elapsed().as_secs_f64());
    }

    /// A connection left the table: its tunnel ends.
    fn conn_left(&self, slot: Slot) {
        self.load.fetch_sub(1, Ordering::Relaxed);
        self.settings.metrics.established_connections.dec();
        slot.conn.kill.cancel();
    }

    /// The frontend gave up on a dial: forget it and tell the agent
    /// (`DIAL_CLS`) so it can abort the dial.
    pub fn abandon_dial(self: &Arc<Self>, random: i64) {
        let abandoned = self.state().abandon_dial(random);
        if let Some((_, close)) = abandoned {
            self.dial_left();
            self.send_later(close);
        }
    }

    /// Removes a connection. With `tell_agent`, sends `CLOSE_REQ`. Returns
    /// whether it was still open.
    pub fn remove_conn(self: &Arc<Self>, connect_id: i64, tell_agent: bool) -> bool {
        let closed = self.state().close(connect_id);
        let Some((slot, close)) = closed else {
            return false;
        };
        self.conn_left(slot);
        if tell_agent {
            self.send_later(close);
        }
        true
    }

    /// Reads the agent's packets until the stream ends, then fails every
    /// pending dial and closes every connection of this stream. An agent that
    /// spends its [`Budget`] of protocol mistakes is cut off; its last mistake
    /// is returned then.
    pub async fn serve<S>(
        self: Arc<Self>,
        mut inbound: S,
        stop: CancellationToken,
    ) -> Option<Mistake>
    where
        S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
    {
        use futures::StreamExt;
        let mut budget = Budget::new(Instant::now());
        let mut cut_off = None;
        loop {
            // The HTTP/2 body is not a tokio resource: while packets keep
            // coming, `next` is always ready and this loop would keep its
            // worker thread for seconds (timers, heartbeats and other tasks
            // on it stalled under a 1 GB burst). Yield when the task's
            // budget is spent.
            tokio::task::coop::consume_budget().await;
            let next = tokio::select! {
                n = inbound.next() => n,
                _ = stop.cancelled() => break,
            };
            match next {
                Some(Ok(p)) => {
                    self.busy.store(true, Ordering::Relaxed);
                    let mistake = match self.seen(p) {
                        Ok(m) => self.dispatch(m).await,
                        Err(e) => {
                            self.settings
                                .metrics
                                .bad_packets
                                .with_label_values(&["agent"])
                                .inc();
                            if budget.total() < LOGGED_MISTAKES {
                                warn!(error = %e, "malformed packet from agent ignored");
                            }
                            Some(Mistake::Malformed)
                        }
                    };
                    // Handled: the agent's silence counts from now.
                    self.liveness.seen();
                    self.busy.store(false, Ordering::Relaxed);
                    if let Some(mistake) = mistake {
                        if !budget.charge(Instant::now()) {
                            let detail = format!(
                                "{} mistakes: packets for unknown connections, malformed or not allowed (forgiven: {} at once, {}/s)",
                                budget.total(),
                                konnectivity_proto::budget::BURST,
                                konnectivity_proto::budget::PER_SECOND
                            );
                            self.cut_off(mistake, &detail);
                            cut_off = Some(mistake);
                            break;
                        }
                    }
                }
                Some(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                    self.cut_off(Mistake::Oversized, status.message());
                    cut_off = Some(Mistake::Oversized);
                    break;
                }
                Some(Err(status)) => {
                    info!(code = ?status.code(), message = status.message(), "agent stream ended with error");
                    break;
                }
                None => {
                    info!("agent stream closed by agent");
                    break;
                }
            }
        }
        self.shut();
        cut_off
    }

    /// Ends the stream's state: pending dials fail at once, connections close.
    fn shut(&self) {
        self.closed.cancel();
        let quic = self.quic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(conn) = quic {
            self.settings.metrics.quic_connections.dec();
            conn.close(CloseCode::Done.code(), b"agent stream ended");
        }
        let (pending, conns) = self.state().shut();
        let m = &self.settings.metrics;
        for p in pending {
            m.pending_dials.dec();
            m.dial_failures.with_label_values(&["agent_gone"]).inc();
            let _ = p
                .value
                .reply
                .send(Err(DialError::AgentGone(self.agent_id.clone())));
        }
        let n = conns.len();
        for (_, slot) in conns {
            m.established_connections.dec();
            slot.conn.kill.cancel();
        }
        self.load.store(0, Ordering::Relaxed);
        if n > 0 {
            info!(
                connections = n,
                "closed the connections of the lost agent stream"
            );
        }
    }

    /// Counts and logs the end of a stream whose agent made too many
    /// protocol mistakes, or one it may not make at all (`last`).
    fn cut_off(&self, last: Mistake, detail: &str) {
        self.settings
            .metrics
            .peers_cut_off
            .with_label_values(&["agent", last.as_str()])
            .inc();
        warn!(last = %last, detail, "agent cut off; closing its stream");
    }

    /// Handles one packet; returns the agent's mistake, if it made one.
    async fn dispatch(self: &Arc<Self>, m: Message) -> Option<Mistake> {
        let r = self.state().receive(m);
        if let Some(kind) = r.unknown {
            self.settings
                .metrics
                .unknown_packets
                .with_label_values(&[kind])
                .inc();
            debug!(kind, "packet for unknown connection or dial ignored");
        }
        if r.mistake == Some(Mistake::NotAllowed) {
            debug!("packet not valid from an agent; ignored");
        }
        // Never a wait here: this task must keep reading, or a full queue
        // towards an agent that is itself waiting to send would hold both
        // sides.
        if let Some(reply) = r.reply {
            self.send_later(reply);
        }
        let m = &self.settings.metrics;
        match r.event {
            Event::Data {
                connect_id,
                conn,
                data,
            } => self.deliver(connect_id, conn, data).await,
            Event::Grant { conn, bytes } => conn.conn.credit.grant(bytes),
            Event::Answered { dial, connect_id } => self.answered(dial, connect_id),
            Event::DialFailed {
                dial,
                error,
                reason,
            } => {
                self.dial_answered(&dial);
                m.dial_failures.with_label_values(&["error_response"]).inc();
                let _ = dial.value.reply.send(Err(DialError::Agent {
                    agent: self.agent_id.clone(),
                    error,
                    reason,
                }));
            }
            Event::DialClosed(dial) => {
                self.dial_left();
                m.dial_failures.with_label_values(&["dial_closed"]).inc();
                let _ = dial.value.reply.send(Err(DialError::DialClosed));
            }
            Event::Closed {
                connect_id,
                conn,
                error,
            } => {
                self.conn_left(conn);
                if !error.is_empty() {
                    debug!(connect_id, error, "agent closed connection with error");
                }
            }
            Event::Drain => {
                if !self.draining.swap(true, Ordering::Relaxed) {
                    info!("agent is draining; new dials prefer other agents");
                }
            }
            // The server's end is never asked to dial.
            Event::DialRequested { .. } | Event::Nothing => {}
        }
        r.mistake
    }

    /// The agent opened the connection for a dial: the frontend gets its
    /// tunnel.
    fn answered(self: &Arc<Self>, dial: Pending<PendingDial>, connect_id: i64) {
        let m = &self.settings.metrics;
        self.dial_answered(&dial);
        let (conn, inbox) = relay::connection(
            self.flow,
            CancellationToken::new(),
            Some(self.settings.held.clone()),
        );
        let (credit, kill) = (conn.credit.clone(), conn.kill.clone());
        let info = dial.value.info.clone();
        let slot = Slot {
            conn,
            info: info.clone(),
        };
        let established = self.state().establish(dial, connect_id, slot);
        match established {
            Ok(dial) => {
                self.load.fetch_add(1, Ordering::Relaxed);
                m.established_connections.inc();
                let tunnel = Tunnel::new(self.clone(), connect_id, inbox, credit, kill, info);
                // If the frontend left meanwhile the tunnel comes back and is
                // dropped here, which closes it on the agent.
                let _ = dial.reply.send(Ok(tunnel));
            }
            Err((dial, e, close)) => {
                m.dial_failures.with_label_values(&["too_many"]).inc();
                warn!(connect_id, error = %e, "cannot accept agent connection");
                let _ = dial.value.reply.send(Err(DialError::Refused(e)));
                self.send_later(close);
            }
        }
    }

    /// Bytes from the agent for an open connection, queued for its frontend.
    async fn deliver(self: &Arc<Self>, connect_id: i64, slot: Slot, data: Bytes) {
        self.bytes_from_agent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let stall = self.settings.stall_timeout;
        match slot.conn.deliver(data, stall).await {
            relay::Delivery::Queued | relay::Delivery::Gone => {}
            relay::Delivery::Stalled => {
                warn!(
                    connect_id,
                    stall_timeout = ?stall,
                    "frontend stopped reading; closing only this connection"
                );
                self.settings.metrics.stalled_closed.inc();
                self.remove_conn(connect_id, true);
            }
            relay::Delivery::OverLimit => {
                let held = &self.settings.held;
                warn!(
                    connect_id,
                    held_bytes = held.bytes(),
                    max_buffered_bytes = held.limit(),
                    "server holds its limit of bytes for frontends and this connection's frontend is behind; closing only this connection"
                );
                self.settings.metrics.buffer_limit_closed.inc();
                self.remove_conn(connect_id, true);
            }
        }
    }
}

/// A link to a pretend agent `agent_id` whose packets arrive on the returned
/// receiver (`queue` of them at most), for the unit tests of the link and its
/// users.
#[cfg(test)]
pub(crate) fn test_link(
    serial: u64,
    agent_id: &str,
    queue: usize,
) -> (Arc<AgentLink>, mpsc::Receiver<Packet>) {
    let (tx, rx) = mpsc::channel(queue);
    let settings = LinkSettings {
        metrics: Metrics::new(),
        stall_timeout: Duration::from_secs(5),
        max_pending: 16,
        max_conns: 16,
        held: relay::Held::new(0),
    };
    let l = AgentLink::new(
        serial,
        agent_id.into(),
        AgentIdentifiers::default(),
        true,
        "peer".into(),
        tx,
        settings,
    );
    (Arc::new(l), rx)
}

mod later;
#[cfg(test)]
mod tests;
