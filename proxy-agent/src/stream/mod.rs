//! One stream to one proxy server: opening it (TLS, metadata, the server's
//! `serverID`/`serverCount` headers), serving the server's dial and close
//! requests, and relaying each destination connection's bytes.
//!
//! Every destination connection has its own bounded queue towards its socket.
//! With a server that negotiated `window-v1` the server never sends more than
//! one window ahead, so the queue never fills. With a reference server a full
//! queue holds up this stream for at most `--stall-timeout`, after which only
//! that connection is closed.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use konnectivity_link::{Event, Link, Role};
use konnectivity_proto::budget::Mistake;
use konnectivity_proto::metadata::{HEARTBEAT_INTERVAL, HEARTBEAT_MISSES};
use konnectivity_proto::{packet, Message, Packet};
use konnectivity_relay::{self as relay, ConnInfo, Liveness, Slot};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::Config;
use crate::metrics::Metrics;

mod dial;
mod open;
mod quic;
#[cfg(test)]
mod tests;

pub use open::{open, OpenError, Opened};
pub use quic::Offer;

/// Packets queued towards the server, shared by the stream's connections.
const OUT_QUEUE: usize = 256;
/// Capacity of the control lane towards the server (answers, grants, closes).
const CONTROL_QUEUE: usize = 1024;

/// What every stream shares.
pub struct Settings {
    /// Configuration.
    pub config: Config,
    /// TLS towards the server.
    pub tls: Arc<konnectivity_runtime::tls::Reloading<rustls::ClientConfig>>,
    /// Metrics.
    pub metrics: Metrics,
    /// Recent dial and stream failures, for the admin endpoint.
    pub events: crate::diagnostics::Events,
    /// The QUIC endpoint, bound on first use.
    pub quic: std::sync::OnceLock<Result<quinn::Endpoint, String>>,
}

/// One connection for the admin endpoint: its id, record, chunks queued
/// towards the destination and transport (`grpc`, `quic`).
pub type ConnSnapshot = (i64, Arc<ConnInfo>, usize, &'static str);

/// The agent's end of the link: a pending dial is its cancel switch.
type State = Link<CancellationToken, Slot>;

/// The agent's state for one server stream.
pub struct ServerLink {
    /// The server's id.
    pub server_id: String,
    /// `window-v1` negotiated.
    pub flow: bool,
    /// `dial-reason-v1` negotiated: failed dials carry their reason typed.
    pub dial_reason: bool,
    /// The address the stream was opened to.
    pub addr: String,
    /// When the stream opened and when the server last sent a packet.
    pub liveness: Liveness,
    out: mpsc::Sender<Packet>,
    /// Packets that go ahead of queued DATA.
    control: mpsc::Sender<Packet>,
    state: Mutex<State>,
    /// Cancelled when the stream has ended.
    pub closed: CancellationToken,
    settings: Arc<Settings>,
    /// Dials in progress on QUIC streams.
    quic_pending: std::sync::atomic::AtomicUsize,
    /// Connections on QUIC streams, by connection id, within `--max-connections`.
    quic_conns: Mutex<std::collections::HashMap<i64, Arc<ConnInfo>>>,
    /// The last connection id given on a QUIC stream.
    quic_ids: std::sync::atomic::AtomicI64,
}

impl ServerLink {
    /// A stream's state, with `window-v1` and `dial-reason-v1` as negotiated
    /// and its DATA and control queues towards the server.
    fn new(
        server_id: String,
        (flow, dial_reason): (bool, bool),
        addr: String,
        (out, control): (mpsc::Sender<Packet>, mpsc::Sender<Packet>),
        settings: Arc<Settings>,
    ) -> Self {
        let cfg = &settings.config;
        Self {
            server_id,
            flow,
            dial_reason,
            addr,
            liveness: Liveness::default(),
            out,
            control,
            state: Mutex::new(Link::new(Role::Agent, cfg.max_pending, cfg.max_conns)),
            closed: CancellationToken::new(),
            settings,
            quic_pending: Default::default(),
            quic_conns: Default::default(),
            quic_ids: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn metrics(&self) -> &Metrics {
        &self.settings.metrics
    }

    /// Queues a packet for the server behind the DATA already queued (DATA
    /// itself, and the close that follows a connection's last DATA). False
    /// once the stream has ended.
    pub async fn send(&self, p: Packet) -> bool {
        tokio::select! {
            r = self.out.send(p) => r.is_ok(),
            _ = self.closed.cancelled() => false,
        }
    }

    /// Queues a control packet ahead of queued DATA. The task that reads the
    /// server's packets sends only these, so a burst of DATA towards the
    /// server never holds up its reading (and its heartbeat watchdog).
    pub async fn send_control(&self, p: Packet) -> bool {
        tokio::select! {
            r = self.control.send(p) => r.is_ok(),
            _ = self.closed.cancelled() => false,
        }
    }

    /// Tells the server this agent is going away (`DRAIN`).
    pub async fn drain(&self) {
        self.send_control(packet::drain()).await;
    }

    /// Open connections plus dials in progress on this stream (and on its
    /// QUIC connection).
    pub fn busy(&self) -> usize {
        let (pending, conns) = self.quic_counts();
        let st = self.state();
        st.table().conns_len() + st.table().pending_len() + pending + conns
    }

    /// Dials in progress and connections open on QUIC streams.
    fn quic_counts(&self) -> (usize, usize) {
        let pending = self.quic_pending.load(std::sync::atomic::Ordering::Relaxed);
        (pending, self.quic_conns().len())
    }

    fn quic_conns(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<i64, Arc<ConnInfo>>> {
        self.quic_conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pending dials, and each connection with its record, the chunks
    /// queued towards the destination and its transport (for the admin
    /// endpoint).
    pub fn snapshot(&self) -> (usize, Vec<ConnSnapshot>) {
        let (mut pending, mut conns) = {
            let st = self.state();
            let conns: Vec<_> = st
                .table()
                .conns()
                .map(|(id, s)| (id, s.info.clone(), s.conn.tx.queued(), "grpc"))
                .collect();
            (st.table().pending_len(), conns)
        };
        pending += self.quic_pending.load(std::sync::atomic::Ordering::Relaxed);
        conns.extend(
            self.quic_conns()
                .iter()
                .map(|(id, info)| (*id, info.clone(), 0, "quic")),
        );
        (pending, conns)
    }

    /// Takes a dial that ended out of the table; `None` when it was no
    /// longer there (cancelled by the server).
    fn take_dial(&self, random: i64) -> Option<konnectivity_link::Pending<CancellationToken>> {
        let p = self.state().take_dial(random);
        if p.is_some() {
            self.metrics().pending_endpoint_dials.dec();
        }
        p
    }

    /// A connection left the table: its relay ends.
    fn conn_left(&self, slot: Slot) {
        slot.conn.kill.cancel();
        self.metrics().open_endpoint_connections.dec();
    }

    /// This agent closes a connection; the `CLOSE_RSP` that tells the
    /// server, or `None` when it was no longer open (closed by the server).
    fn close_conn(&self, connect_id: i64) -> Option<Packet> {
        let closed = self.state().close(connect_id);
        let (slot, close) = closed?;
        self.conn_left(slot);
        Some(close)
    }

    /// Reads the server's packets until the stream ends, `stop` is
    /// cancelled, or (with `window-v1`, whose servers send heartbeats) the
    /// server has been silent for [`HEARTBEAT_MISSES`] heartbeats.
    async fn serve<S>(self: Arc<Self>, mut inbound: S, stop: CancellationToken)
    where
        S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
    {
        let watchdog = HEARTBEAT_INTERVAL * HEARTBEAT_MISSES;
        let mut last_rx = tokio::time::Instant::now();
        loop {
            // Yield when the task's budget is spent: the HTTP/2 body is not
            // a tokio resource, so a burst of packets would keep this
            // worker thread (and its timers) busy for seconds.
            tokio::task::coop::consume_budget().await;
            let deadline = last_rx + watchdog;
            let next = tokio::select! {
                // A packet that is waiting wins: time this side spent in
                // `dispatch` (waiting for room towards the server) is not
                // the server's silence.
                biased;
                n = inbound.next() => n,
                _ = tokio::time::sleep_until(deadline), if self.flow => {
                    warn!(silence = ?watchdog, "no heartbeat from server; dropping the stream");
                    break;
                }
                _ = stop.cancelled() => break,
            };
            last_rx = tokio::time::Instant::now();
            self.liveness.seen();
            match next {
                Some(Ok(p)) => match Message::from_packet(p) {
                    Ok(m) => self.dispatch(m).await,
                    Err(e) => warn!(error = %e, "malformed packet from server ignored"),
                },
                Some(Err(st)) => {
                    info!(code = ?st.code(), message = st.message(), "server stream ended with error");
                    break;
                }
                None => {
                    info!("server closed the stream");
                    break;
                }
            }
        }
        self.closed.cancel();
        let (pending, conns) = self.state().shut();
        self.metrics()
            .pending_endpoint_dials
            .sub(pending.len() as i64);
        for p in pending {
            p.value.cancel();
        }
        for (_, c) in &conns {
            c.conn.kill.cancel();
        }
        self.metrics()
            .open_endpoint_connections
            .sub(conns.len() as i64);
        if !conns.is_empty() {
            info!(
                connections = conns.len(),
                "closed the connections of the lost server stream"
            );
        }
    }

    async fn dispatch(self: &Arc<Self>, m: Message) {
        let r = self.state().receive(m);
        if let Some(kind) = r.unknown {
            self.metrics()
                .unknown_packets
                .with_label_values(&[kind])
                .inc();
            debug!(kind, "packet for unknown connection or dial ignored");
        }
        if r.mistake == Some(Mistake::NotAllowed) {
            debug!("packet not valid from a server; ignored");
        }
        if let Some(reply) = r.reply {
            self.send_control(reply).await;
        }
        match r.event {
            Event::DialRequested { random, address } => {
                let cancel = self.closed.child_token();
                let accepted = self.state().accept_dial(random, cancel.clone());
                if let Err(refusal) = accepted {
                    self.send_control(refusal).await;
                    return;
                }
                self.metrics().pending_endpoint_dials.inc();
                let span = tracing::info_span!("conn", agent.id = %self.settings.config.agent_id, dst.addr = %address, random, connect_id = tracing::field::Empty);
                let fut = self.clone().dial(address, random, cancel).instrument(span);
                tokio::spawn(fut);
            }
            Event::Data {
                connect_id,
                conn,
                data,
            } => self.deliver(connect_id, conn, data).await,
            Event::Grant { conn, bytes } => conn.conn.credit.grant(bytes),
            // The CLOSE_RSP is the reply.
            Event::Closed { conn, .. } => self.conn_left(conn),
            Event::DialClosed(dial) => {
                // The reference agent ignores this; we abort the dial.
                self.metrics().pending_endpoint_dials.dec();
                debug!(random = dial.random, "dial cancelled by server");
                dial.value.cancel();
            }
            // Only the server's end sees answers and drains.
            Event::Answered { .. } | Event::DialFailed { .. } | Event::Drain | Event::Nothing => {}
        }
    }

    /// Bytes from the server for an open connection, queued for its
    /// destination.
    async fn deliver(self: &Arc<Self>, connect_id: i64, slot: Slot, data: Bytes) {
        let stall = self.settings.config.stall_timeout;
        if slot.conn.deliver(data, stall).await == relay::Delivery::Stalled {
            warn!(connect_id, stall_timeout = ?stall, "destination stopped reading; closing only this connection");
            self.metrics().stalled_closed.inc();
            if let Some(close) = self.close_conn(connect_id) {
                self.send_control(close).await;
            }
        }
    }
}
