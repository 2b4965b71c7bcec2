//! Our server's QUIC offer: a QUIC connection tied to this stream by its
//! ticket (the exchange is [`konnectivity_quic`]'s), and the dials that come
//! on its streams, each relayed on its own QUIC stream.
//!
//! The gRPC stream stays: its control packets (heartbeats, `DRAIN`) keep
//! flowing on it, and the server sends dials on it whenever no QUIC
//! connection is tied. So a QUIC connection that cannot be opened (UDP
//! blocked: found within [`konnectivity_quic::HELLO_TIMEOUT`]) or is lost
//! costs nothing but its retry, [`RETRY_FIRST`] later and then less often.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use konnectivity_proto::{packet, DialReason, Message};
use konnectivity_quic::{self as quic, CloseCode};
use konnectivity_relay::ConnInfo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::dial::{connect, outcome, CLOSE_DRAIN};
use super::{ServerLink, Settings};

/// First wait before a failed or lost QUIC connection is tried again ...
pub const RETRY_FIRST: Duration = Duration::from_secs(10);
/// ... doubling up to this.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Largest read from a destination or a QUIC stream at once.
const CHUNK: usize = 128 * 1024;

/// What the server's answer offered.
#[derive(Debug, Clone)]
pub struct Offer {
    /// UDP port of the server's QUIC endpoint.
    pub port: u16,
    /// Names this stream in the hello.
    pub ticket: String,
}

impl Settings {
    /// The agent's one QUIC endpoint (a UDP socket shared by its servers'
    /// connections), bound on first use.
    fn quic_endpoint(&self) -> Result<quinn::Endpoint, String> {
        self.quic
            .get_or_init(|| {
                quinn::Endpoint::client("[::]:0".parse().expect("address"))
                    .or_else(|_| quinn::Endpoint::client("0.0.0.0:0".parse().expect("address")))
                    .map_err(|e| format!("bind a UDP socket: {e}"))
            })
            .clone()
    }
}

impl ServerLink {
    /// Keeps a QUIC connection tied to this stream while it lives. With
    /// `strict` (`--transport=quic`) a QUIC connection that fails ends the
    /// stream instead of leaving it on gRPC.
    pub(super) async fn run_quic(self: Arc<Self>, offer: Offer, strict: Option<CancellationToken>) {
        let m = self.metrics().clone();
        let mut delay = RETRY_FIRST;
        loop {
            match self.connect_quic(&offer).await {
                Ok(conn) => {
                    delay = RETRY_FIRST;
                    m.quic_connections.inc();
                    info!(server = %conn.remote_address(), "QUIC connected; connections travel over QUIC");
                    let why = self.serve_quic(&conn).await;
                    m.quic_connections.dec();
                    if self.closed.is_cancelled() {
                        conn.close(CloseCode::Done.code(), b"stream ended");
                        return;
                    }
                    m.quic_failures.with_label_values(&["lost"]).inc();
                    warn!(reason = %why, "QUIC connection lost; connections travel over the gRPC stream");
                }
                Err((reason, e)) => {
                    m.quic_failures.with_label_values(&[reason]).inc();
                    warn!(error = %e, retry_in = ?delay, "QUIC unavailable; connections travel over the gRPC stream");
                }
            }
            if let Some(stop) = &strict {
                warn!("no QUIC connection and --transport=quic: dropping the stream");
                stop.cancel();
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.closed.cancelled() => return,
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// Opens a QUIC connection to the server and says the hello.
    async fn connect_quic(
        &self,
        offer: &Offer,
    ) -> Result<quinn::Connection, (&'static str, String)> {
        let cfg = &self.settings.config;
        let failed = |e: String| ("connect", e);
        let endpoint = self.settings.quic_endpoint().map_err(failed)?;
        let host = cfg.server.host.as_str();
        let addr = tokio::net::lookup_host((host, offer.port))
            .await
            .map_err(|e| failed(format!("resolve {host}: {e}")))?
            .next()
            .ok_or_else(|| failed(format!("{host} has no address")))?;
        let config =
            quic::client_config(&self.settings.tls.current()).map_err(|e| failed(e.to_string()))?;
        let connecting = endpoint
            .connect_with(config, addr, host)
            .map_err(|e| failed(e.to_string()))?;
        let conn = match tokio::time::timeout(quic::HELLO_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(failed(format!("{addr}: {e}"))),
            Err(_) => {
                return Err(failed(format!(
                    "{addr}: no answer within {:?} (UDP blocked?)",
                    quic::HELLO_TIMEOUT
                )))
            }
        };
        quic::hello(&conn, &offer.ticket)
            .await
            .map_err(|e| ("hello", e.to_string()))?;
        Ok(conn)
    }

    /// Serves the server's dials on `conn` until it closes or the stream
    /// ends; why it ended.
    async fn serve_quic(self: &Arc<Self>, conn: &quinn::Connection) -> String {
        loop {
            tokio::select! {
                s = conn.accept_bi() => match s {
                    Ok((send, recv)) => {
                        let span = tracing::info_span!("conn", agent.id = %self.settings.config.agent_id, transport = "quic", dst.addr = tracing::field::Empty, random = tracing::field::Empty, connect_id = tracing::field::Empty);
                        tokio::spawn(self.clone().quic_dial(send, recv).instrument(span));
                    }
                    Err(e) => return e.to_string(),
                },
                _ = self.closed.cancelled() => return "the stream ended".into(),
            }
        }
    }

    /// One dial on its own stream: the server's `DIAL_REQ`, our `DIAL_RSP`,
    /// then the connection's bytes.
    async fn quic_dial(self: Arc<Self>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let request = tokio::time::timeout(quic::HELLO_TIMEOUT, quic::read_packet(&mut recv)).await;
        let (address, random) = match request.map(|r| r.map(Message::from_packet)) {
            Ok(Ok(Ok(Message::DialRequest {
                address, random, ..
            }))) => (address, random),
            other => {
                debug!(?other, "QUIC stream without a dial request; reset");
                self.metrics()
                    .unknown_packets
                    .with_label_values(&["quic"])
                    .inc();
                let _ = send.reset(CloseCode::BadHello.code());
                let _ = recv.stop(CloseCode::BadHello.code());
                return;
            }
        };
        let span = tracing::Span::current();
        span.record("dst.addr", address.as_str());
        span.record("random", random);
        let cfg = &self.settings.config;
        let m = self.metrics().clone();
        m.dials.with_label_values(&["quic"]).inc();
        let pending = Pending::add(&self);
        let started = Instant::now();
        let result = tokio::select! {
            r = Box::pin(tokio::time::timeout(cfg.dial_timeout, connect(&address, &cfg.allowed))) => r,
            _ = send.stopped() => {
                debug!("dial given up by the server");
                return;
            }
        };
        m.dial_duration.observe(started.elapsed().as_secs_f64());
        let info = ConnInfo::new(&address, &self.server_id);
        let opened = outcome(&address, result, cfg).and_then(|tcp| {
            let connect_id = self.quic_ids.fetch_add(1, Ordering::Relaxed) + 1;
            let mut conns = self.quic_conns();
            if conns.len() >= cfg.max_conns {
                return Err((
                    DialReason::Exhausted,
                    "too many connections on this agent stream".to_string(),
                ));
            }
            conns.insert(connect_id, info.clone());
            Ok((tcp, connect_id))
        });
        drop(pending);
        let (tcp, connect_id) = match opened {
            Ok(opened) => opened,
            Err((reason, text)) => {
                self.count_failure(&address, reason, &text);
                let answer = packet::dial_failed_with(random, text, Some(reason));
                if quic::write_packet(&mut send, answer).await.is_ok() {
                    let _ = send.finish();
                }
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        span.record("connect_id", connect_id);
        m.open_endpoint_connections.inc();
        if quic::write_packet(&mut send, packet::dial_ok(random, connect_id))
            .await
            .is_ok()
        {
            debug!("connected");
            self.relay_quic(tcp, send, recv, &info).await;
            debug!("closed");
        } else {
            debug!("dial given up by the server after it connected");
        }
        self.quic_conns().remove(&connect_id);
        m.open_endpoint_connections.dec();
    }

    /// Relays a destination connection and its QUIC stream both ways until
    /// both directions have ended. A side's end, or its failure, is passed on
    /// as a half close (a stream finish, a TCP write shutdown) after what it
    /// said; a destination that stops reading stops the server's direction.
    async fn relay_quic(
        &self,
        tcp: TcpStream,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        info: &ConnInfo,
    ) {
        let m = self.metrics();
        let (mut reader, mut writer) = tcp.into_split();
        // When the server stops reading (its frontend left), what the
        // destination still says is read and dropped: a destination blocked
        // on its writes would stop reading what the server still sends it,
        // and closing a socket with unread bytes resets it, which can drop
        // what the destination has not read yet. Once the server's side has
        // ended too, the destination has CLOSE_DRAIN to finish.
        let stopped = send.stopped();
        let down_done = CancellationToken::new();
        let up = async {
            tokio::pin!(stopped);
            let drain_over = async {
                down_done.cancelled().await;
                tokio::time::sleep(CLOSE_DRAIN).await;
            };
            tokio::pin!(drain_over);
            let mut relaying = true;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let read = tokio::select! {
                    r = reader.read(&mut buf) => r,
                    _ = &mut stopped, if relaying => {
                        relaying = false;
                        continue;
                    }
                    _ = &mut drain_over, if !relaying => return,
                };
                let n = match read {
                    Ok(0) => 0,
                    Ok(n) => n,
                    Err(e) => {
                        debug!(error = %e, "destination read failed");
                        0
                    }
                };
                if n == 0 {
                    // The end (or a reset after an answer: the answer
                    // still goes out; a reset stream would drop it).
                    if relaying {
                        let _ = send.finish();
                    }
                    return;
                }
                if relaying {
                    if send.write_all(&buf[..n]).await.is_err() {
                        relaying = false;
                        continue;
                    }
                    m.bytes.with_label_values(&["to_server"]).inc_by(n as u64);
                    info.sent(n as u64);
                }
            }
        };
        let down = async {
            loop {
                match recv.read_chunk(CHUNK, true).await {
                    Ok(Some(chunk)) => {
                        if let Err(e) = writer.write_all(&chunk.bytes).await {
                            debug!(error = %e, "destination write failed");
                            let _ = recv.stop(CloseCode::Done.code());
                            break;
                        }
                        let n = chunk.bytes.len() as u64;
                        m.bytes.with_label_values(&["to_endpoint"]).inc_by(n);
                        info.delivered(n);
                    }
                    Ok(None) => {
                        let _ = writer.shutdown().await;
                        break;
                    }
                    Err(e) => {
                        debug!(error = %e, "QUIC stream from the server ended");
                        let _ = writer.shutdown().await;
                        break;
                    }
                }
            }
            down_done.cancel();
        };
        tokio::join!(up, down);
    }
}

/// A dial in progress on a QUIC stream: counted in the metric and in
/// [`ServerLink::busy`] (a draining agent waits for it).
struct Pending<'a>(&'a ServerLink);

impl<'a> Pending<'a> {
    fn add(link: &'a ServerLink) -> Self {
        link.quic_pending.fetch_add(1, Ordering::Relaxed);
        link.metrics().pending_endpoint_dials.inc();
        Pending(link)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.quic_pending.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics().pending_endpoint_dials.dec();
    }
}
