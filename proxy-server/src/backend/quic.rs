//! The UDP endpoint where our own agents tie a QUIC connection to their gRPC
//! stream (the exchange is [`konnectivity_quic`]'s), and dials over it: one
//! QUIC stream per connection.
//!
//! Everything a stranger can do here is bounded: at most [`HANDSHAKES`]
//! handshakes and hellos at once (more are refused), each within
//! [`konnectivity_quic::HELLO_TIMEOUT`]; a peer without a certificate from
//! the agent CA (when one is required), without our ALPN, or without the
//! ticket of a live stream is refused and counted
//! (`quic_refused_total{reason}`); datagrams that are not QUIC are dropped
//! by the QUIC stack.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use konnectivity_link::TableError;
use konnectivity_proto::{packet, DialReason, Message};
use konnectivity_quic::{self as quic, CloseCode};
use konnectivity_relay::ConnInfo;
use konnectivity_runtime::tls::Reloading;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::agent::AgentLink;
use super::registry::AgentRegistry;
use crate::metrics::Metrics;
use crate::tunnel::{DialError, Tunnel};

/// Handshakes and hellos in progress at once; further attempts are refused
/// until one ends.
pub const HANDSHAKES: usize = 256;

/// Binds the agents' UDP endpoint with the agent listener's TLS identity.
pub fn bind(
    addr: SocketAddr,
    tls: &Reloading<rustls::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    let config = quic::server_config(&tls.current())?;
    Ok(quinn::Endpoint::server(config, addr)?)
}

/// Accepts agents' QUIC connections until `stop`. Each new connection takes
/// the agent listener's TLS files of the moment (rotated files apply).
pub async fn serve(
    endpoint: quinn::Endpoint,
    tls: Arc<Reloading<rustls::ServerConfig>>,
    registry: Arc<AgentRegistry>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            metrics.quic_refused.with_label_values(&["busy"]).inc();
            incoming.refuse();
            continue;
        };
        let config = match quic::server_config(&tls.current()) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                warn!(error = %e, "QUIC connection refused: the agent TLS configuration does not suit QUIC");
                incoming.refuse();
                continue;
            }
        };
        let peer = incoming.remote_address();
        let (registry, metrics) = (registry.clone(), metrics.clone());
        let span = tracing::info_span!("quic", %peer);
        tokio::spawn(
            async move {
                let tied = tie(incoming, config, &registry, &metrics).await;
                drop(permit);
                let Some((link, conn)) = tied else { return };
                let why = conn.closed().await;
                link.detach_quic(&conn);
                if !link.closed.is_cancelled() {
                    info!(agent.id = %link.agent_id, reason = %why, "agent QUIC connection closed; its dials go over the gRPC stream again");
                }
            }
            .instrument(span),
        );
    }
    endpoint.close(CloseCode::Done.code(), b"server stopping");
}

/// Completes a new connection's handshake and hello and ties it to the agent
/// stream its ticket names.
async fn tie(
    incoming: quinn::Incoming,
    config: Arc<quinn::ServerConfig>,
    registry: &AgentRegistry,
    metrics: &Metrics,
) -> Option<(Arc<AgentLink>, quinn::Connection)> {
    let refused = |reason: &str| metrics.quic_refused.with_label_values(&[reason]).inc();
    let handshake = match incoming.accept_with(config) {
        Ok(c) => c,
        Err(e) => {
            refused("handshake");
            debug!(error = %e, "QUIC connection refused");
            return None;
        }
    };
    let conn = match tokio::time::timeout(quic::HELLO_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            refused("handshake");
            info!(error = %e, "QUIC handshake failed");
            return None;
        }
        Err(_) => {
            refused("handshake");
            info!(timeout = ?quic::HELLO_TIMEOUT, "QUIC handshake not done in time");
            return None;
        }
    };
    let (ticket, answer) = match quic::read_hello(&conn).await {
        Ok(hello) => hello,
        Err(e) => {
            refused("hello");
            info!(error = %e, "QUIC connection without a valid hello refused");
            conn.close(CloseCode::BadHello.code(), b"bad hello");
            return None;
        }
    };
    let link = registry
        .by_ticket(&ticket)
        .filter(|link| link.attach_quic(conn.clone()));
    let Some(link) = link else {
        refused("unknown_ticket");
        info!("QUIC hello names no agent stream of this server; refused");
        conn.close(CloseCode::UnknownTicket.code(), b"unknown ticket");
        return None;
    };
    if let Err(e) = quic::accept(answer).await {
        link.detach_quic(&conn);
        info!(error = %e, "QUIC hello could not be answered");
        return None;
    }
    info!(agent.id = %link.agent_id, stream = link.serial, "agent QUIC connection tied to its stream; dials go over QUIC");
    Some((link, conn))
}

impl AgentLink {
    /// The QUIC connection dials go over, if one is tied to this stream.
    pub fn quic(&self) -> Option<quinn::Connection> {
        self.quic.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ties the agent's QUIC connection to this stream (replacing an older
    /// one, which is closed). False when the stream has already ended.
    pub fn attach_quic(&self, conn: quinn::Connection) -> bool {
        let mut quic = self.quic.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.is_cancelled() {
            return false;
        }
        if let Some(old) = quic.replace(conn) {
            old.close(CloseCode::Replaced.code(), b"replaced");
        } else {
            self.settings.metrics.quic_connections.inc();
        }
        true
    }

    /// Unties `conn` (it closed); dials go over the gRPC stream again.
    pub fn detach_quic(&self, conn: &quinn::Connection) {
        let mut quic = self.quic.lock().unwrap_or_else(|e| e.into_inner());
        if quic
            .as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *quic = None;
            self.settings.metrics.quic_connections.dec();
        }
    }

    /// A connection on a QUIC stream ended.
    pub(crate) fn quic_conn_left(&self, connect_id: i64) {
        self.quic_table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open
            .remove(&connect_id);
        // Saturating: the stream's end resets the load to 0.
        let _ = self
            .load
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        self.settings.metrics.established_connections.dec();
    }
}

/// An agent stream's dials and connections on QUIC streams, within the
/// same limits as those on its gRPC stream (`--max-pending-dials-per-agent`,
/// `--max-connections-per-agent`).
#[derive(Default)]
pub struct QuicTable {
    /// Pending dials by dial id.
    pub pending: HashMap<i64, Arc<ConnInfo>>,
    /// Open connections by the agent's connection id.
    pub open: HashMap<i64, Arc<ConnInfo>>,
}

/// A QUIC dial in the table until it is answered either way.
struct PendingDial<'a> {
    link: &'a AgentLink,
    random: i64,
}

impl<'a> PendingDial<'a> {
    fn add(link: &'a AgentLink, random: i64, info: Arc<ConnInfo>) -> Result<Self, TableError> {
        let mut t = link.quic_table.lock().unwrap_or_else(|e| e.into_inner());
        if t.pending.contains_key(&random) {
            return Err(TableError::DuplicateDial(random));
        }
        if t.pending.len() >= link.settings.max_pending {
            return Err(TableError::TooManyPending(link.settings.max_pending));
        }
        t.pending.insert(random, info);
        link.settings.metrics.pending_dials.inc();
        Ok(PendingDial { link, random })
    }
}

impl Drop for PendingDial<'_> {
    fn drop(&mut self) {
        let mut t = self
            .link
            .quic_table
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        t.pending.remove(&self.random);
        self.link.settings.metrics.pending_dials.dec();
    }
}

/// Opens the connection the agent answered with, within the limit.
fn establish(link: &AgentLink, connect_id: i64, info: Arc<ConnInfo>) -> Result<(), TableError> {
    let mut t = link.quic_table.lock().unwrap_or_else(|e| e.into_inner());
    if t.open.contains_key(&connect_id) {
        return Err(TableError::DuplicateConnection(connect_id));
    }
    if t.open.len() >= link.settings.max_conns {
        return Err(TableError::TooManyConnections(link.settings.max_conns));
    }
    t.open.insert(connect_id, info);
    Ok(())
}

/// Dials `address` on a QUIC stream of `link`'s connection: `DIAL_REQ`,
/// the agent's `DIAL_RSP`, and then the stream is the connection. Dropping
/// the future gives the dial up (the stream is reset; the agent closes what
/// it opened).
pub(crate) async fn dial(
    link: &Arc<AgentLink>,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    address: &str,
    random: i64,
    frontend: &'static str,
) -> Result<Tunnel, DialError> {
    let m = &link.settings.metrics;
    let info = ConnInfo::new(address, frontend);
    let pending = PendingDial::add(link, random, info.clone()).map_err(DialError::Refused)?;
    m.dials.with_label_values(&["quic"]).inc();
    let started = Instant::now();
    let gone = |e: quic::Error| {
        debug!(error = %e, "QUIC dial stream failed");
        m.dial_failures.with_label_values(&["agent_gone"]).inc();
        DialError::AgentGone(link.agent_id.clone())
    };
    quic::write_packet(&mut send, packet::dial_request(address, random))
        .await
        .map_err(gone)?;
    let answer = quic::read_packet(&mut recv).await.map_err(gone)?;
    drop(pending);
    m.dial_duration.observe(started.elapsed().as_secs_f64());
    match Message::from_packet(answer) {
        Ok(Message::DialResponse {
            random: r,
            connect_id,
            error,
            reason,
        }) if r == random => {
            if error.is_empty() && connect_id != 0 {
                if let Err(e) = establish(link, connect_id, info.clone()) {
                    m.dial_failures.with_label_values(&["too_many"]).inc();
                    warn!(connect_id, error = %e, "cannot accept agent connection");
                    let _ = send.reset(CloseCode::Done.code());
                    return Err(DialError::Refused(e));
                }
                link.load.fetch_add(1, Ordering::Relaxed);
                m.established_connections.inc();
                return Ok(Tunnel::quic(link.clone(), connect_id, (send, recv), info));
            }
            m.dial_failures.with_label_values(&["error_response"]).inc();
            let reason = reason.unwrap_or_else(|| DialReason::from_text(&error));
            Err(DialError::Agent {
                agent: link.agent_id.clone(),
                error,
                reason,
            })
        }
        other => {
            m.bad_packets.with_label_values(&["agent"]).inc();
            warn!(answer = ?other.map(|m| m.kind()), "agent answered a QUIC dial with something other than its DIAL_RSP");
            let _ = send.reset(CloseCode::BadHello.code());
            Err(DialError::Agent {
                agent: link.agent_id.clone(),
                error: "the agent's answer to the dial was not a dial response".into(),
                reason: DialReason::Other,
            })
        }
    }
}
