//! `ProxyService.Proxy`: the gRPC frontend kube-apiserver uses over a Unix
//! socket. Each frontend stream may carry several dials (the single-use client
//! sends one); each established connection gets its own task that moves the
//! agent's bytes to the frontend, so connections of one stream do not wait on
//! each other's agents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use konnectivity_link::RecentlyClosed;
use konnectivity_proto::budget::{Budget, Mistake};
use konnectivity_proto::grpc::{self, Incoming, Replies};
use konnectivity_proto::{metadata, packet, Message, Packet};
use konnectivity_relay::queue;
use konnectivity_relay::{Hold, Inbound};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn, Instrument};

use crate::backend::registry::AgentRegistry;
use crate::metrics::Metrics;
use crate::tunnel::{DialError, TunnelSender};

/// How long a frontend's `CLOSE_REQ` waits for the agent's `CLOSE_RSP` before
/// the connection is closed anyway.
pub const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Dials plus connections one frontend stream may hold.
pub const MAX_PER_STREAM: usize = 1024;
/// Packets queued towards one frontend stream.
const OUT_QUEUE: usize = 64;
/// Connection ids of one frontend stream remembered after they close, so
/// the frontend's packets in flight for them are not taken for mistakes.
const RECENT: usize = 64;

/// Packets towards one frontend stream; `DATA` carries its share of the
/// server's held bytes (`--max-buffered-bytes`) until HTTP/2 takes it.
#[derive(Clone)]
struct Out(queue::Sender<(Packet, Hold)>);

impl Out {
    /// Queues a control packet (or DATA whose bytes are not counted).
    async fn send(&self, p: Packet) -> Result<(), ()> {
        self.0.send((p, Hold::default())).await.map_err(drop)
    }

    /// Queues DATA that still counts as held.
    async fn send_held(&self, p: Packet, held: Hold) -> Result<(), ()> {
        self.0.send((p, held)).await.map_err(drop)
    }
}

/// The gRPC frontend service.
pub struct GrpcFrontend {
    /// Where dials go.
    pub registry: Arc<AgentRegistry>,
    /// Metrics.
    pub metrics: Metrics,
    /// Cancelled to end every frontend stream.
    pub stop: CancellationToken,
}

impl grpc::Handler for GrpcFrontend {
    const SERVICE: &'static str = "ProxyService";
    const METHOD: &'static str = konnectivity_proto::PROXY_METHOD;

    async fn call(
        self: Arc<Self>,
        req: Request<Incoming<tonic::body::Body>>,
    ) -> Result<Response<Replies>, Status> {
        let (out_tx, out_rx) = queue::queue(OUT_QUEUE);
        let features = req
            .metadata()
            .get(metadata::FEATURES)
            .and_then(|v| v.to_str().ok());
        let stream = FrontendStream {
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            out: Out(out_tx),
            gone: self.stop.child_token(),
            book: Arc::default(),
            typed_reasons: metadata::has_feature(features, metadata::FEATURE_DIAL_REASON),
        };
        let span = tracing::debug_span!("frontend", mode = "grpc");
        let fut = stream.serve(req.into_inner()).instrument(span);
        tokio::spawn(fut);
        // A DATA packet's share of the server's held bytes ends here, where
        // HTTP/2 takes it (within the frontend's flow-control window).
        let replies = futures::stream::unfold(out_rx, |mut rx| async move {
            rx.recv().await.map(|(p, _held)| (Ok(p), rx))
        });
        let replies: Replies = Box::pin(replies);
        Ok(Response::new(replies))
    }
}

/// An established connection of a frontend stream.
struct Conn {
    tx: TunnelSender,
    /// Cancelled when the frontend sends `CLOSE_REQ`.
    closing: CancellationToken,
}

/// The dials and connections of one frontend stream, shared by the task that
/// reads the stream and the connections' own tasks. The lock is short and
/// never held across an await, so a dial registers its connection directly
/// instead of a round trip through the reading task.
struct Book {
    pending: HashMap<i64, CancellationToken>,
    conns: HashMap<i64, Arc<Conn>>,
    recent: RecentlyClosed,
}

impl Default for Book {
    fn default() -> Self {
        Self {
            pending: HashMap::new(),
            conns: HashMap::new(),
            recent: RecentlyClosed::new(RECENT),
        }
    }
}

type SharedBook = Arc<Mutex<Book>>;

fn lock(book: &SharedBook) -> std::sync::MutexGuard<'_, Book> {
    book.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes a registered connection from its stream's book when its task ends.
struct Registered {
    book: SharedBook,
    connect_id: i64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut book = lock(&self.book);
        book.conns.remove(&self.connect_id);
        book.recent.insert(self.connect_id);
    }
}

struct FrontendStream {
    registry: Arc<AgentRegistry>,
    metrics: Metrics,
    out: Out,
    /// Cancelled when the frontend stream ends: every dial and connection of
    /// it is then abandoned or closed.
    gone: CancellationToken,
    book: SharedBook,
    /// The frontend offered `dial-reason-v1` (our client): failed dials carry
    /// their reason typed.
    typed_reasons: bool,
}

impl FrontendStream {
    async fn serve(mut self, mut inbound: Incoming<tonic::body::Body>) {
        let gauge = self
            .metrics
            .frontend_connections
            .with_label_values(&["grpc"]);
        gauge.inc();
        let mut budget = Budget::new(std::time::Instant::now());
        loop {
            // Yield when the task's budget is spent (the HTTP/2 body is not
            // a tokio resource; see `AgentLink::serve`).
            tokio::task::coop::consume_budget().await;
            tokio::select! {
                next = inbound.next() => match next {
                    Some(Ok(p)) => {
                        let mistake = match Message::from_packet(p) {
                            Ok(m) => self.on_message(m).await,
                            Err(e) => {
                                self.metrics.bad_packets.with_label_values(&["frontend"]).inc();
                                if budget.total() < 10 {
                                    warn!(error = %e, "malformed packet from frontend ignored");
                                }
                                Some(Mistake::Malformed)
                            }
                        };
                        if let Some(mistake) = mistake {
                            if !budget.charge(std::time::Instant::now()) {
                                let detail = format!(
                                    "{} mistakes: packets for unknown connections, malformed or not allowed",
                                    budget.total()
                                );
                                self.cut_off(mistake, &detail);
                                break;
                            }
                        }
                    }
                    Some(Err(status)) if status.code() == tonic::Code::ResourceExhausted => {
                        self.cut_off(Mistake::Oversized, status.message());
                        break;
                    }
                    Some(Err(status)) => {
                        debug!(code = ?status.code(), "frontend stream ended with error");
                        break;
                    }
                    None => break,
                },
                _ = self.gone.cancelled() => break,
            }
        }
        // Abandon pending dials (DIAL_CLS to their agents) and close
        // established connections (CLOSE_REQ to their agents).
        self.gone.cancel();
        gauge.dec();
    }

    /// Counts and logs the end of a stream whose frontend made too many
    /// protocol mistakes, or one it may not make at all (`last`).
    fn cut_off(&self, last: Mistake, detail: &str) {
        self.metrics
            .peers_cut_off
            .with_label_values(&["frontend", last.as_str()])
            .inc();
        warn!(last = %last, detail, "frontend stream cut off");
    }

    fn conn(&self, connect_id: i64) -> Option<Arc<Conn>> {
        lock(&self.book).conns.get(&connect_id).cloned()
    }

    async fn reply(&self, p: Packet) {
        let _ = self.out.send(p).await;
    }

    /// A packet for a connection of this stream that is not open: a mistake
    /// unless it closed recently.
    fn unknown(&self, kind: &'static str, connect_id: i64) -> Option<Mistake> {
        self.metrics
            .unknown_packets
            .with_label_values(&[kind])
            .inc();
        debug!(
            connect_id,
            kind, "packet from frontend for unknown connection"
        );
        (!lock(&self.book).recent.contains(connect_id)).then_some(Mistake::UnknownConnection)
    }

    /// Handles one packet; returns the frontend's mistake, if it made one.
    async fn on_message(&mut self, m: Message) -> Option<Mistake> {
        match m {
            Message::DialRequest {
                protocol,
                address,
                random,
            } => {
                if let Err(e) = packet::check_protocol(&protocol) {
                    self.reply(packet::dial_failed(random, e)).await;
                    return None;
                }
                let cancel = {
                    let mut book = lock(&self.book);
                    if book.pending.len() + book.conns.len() >= MAX_PER_STREAM
                        || book.pending.contains_key(&random)
                    {
                        None
                    } else {
                        let cancel = self.gone.child_token();
                        book.pending.insert(random, cancel.clone());
                        Some(cancel)
                    }
                };
                let Some(cancel) = cancel else {
                    self.reply(packet::dial_failed(
                        random,
                        "too many dials on this frontend stream, or a duplicate dial id",
                    ))
                    .await;
                    return None;
                };
                let dial = Dial {
                    registry: self.registry.clone(),
                    out: self.out.clone(),
                    book: self.book.clone(),
                    cancel,
                    address,
                    random,
                    typed_reasons: self.typed_reasons,
                };
                let span = tracing::info_span!("conn", dst.addr = %dial.address, random, agent.id = tracing::field::Empty, connect_id = tracing::field::Empty);
                let fut = dial.run().instrument(span);
                tokio::spawn(fut);
            }
            Message::Data { connect_id, data } => match self.conn(connect_id) {
                Some(conn) => {
                    // Waiting here is per frontend stream: the single-use
                    // client has one connection per stream, so this is that
                    // connection's own backpressure.
                    let _ = conn.tx.send(data).await;
                }
                None => return self.unknown("DATA", connect_id),
            },
            Message::CloseRequest { connect_id } => match self.conn(connect_id) {
                Some(conn) => {
                    conn.tx.close().await;
                    // The connection's pump gives up after CLOSE_WAIT (no
                    // timer task per close: at thousands of closes a second
                    // those piled up for CLOSE_WAIT each).
                    conn.closing.cancel();
                }
                None => {
                    self.reply(packet::close_response(
                        connect_id,
                        packet::UNKNOWN_CONNECT_ID,
                    ))
                    .await;
                    return self.unknown("CLOSE_REQ", connect_id);
                }
            },
            Message::CloseDial { random } => {
                let pending = lock(&self.book).pending.remove(&random);
                if let Some(c) = pending {
                    c.cancel();
                }
            }
            Message::Unknown(t) => debug!(packet_type = t, "unknown packet type ignored"),
            other => {
                debug!(
                    kind = other.kind(),
                    "packet not valid from a frontend; ignored"
                );
                return Some(Mistake::NotAllowed);
            }
        }
        None
    }
}

/// One dial of a frontend stream, then its connection's agent-to-frontend pump.
struct Dial {
    registry: Arc<AgentRegistry>,
    out: Out,
    book: SharedBook,
    cancel: CancellationToken,
    address: String,
    random: i64,
    typed_reasons: bool,
}

impl Dial {
    async fn run(self) {
        let random = self.random;
        let result = tokio::select! {
            // Boxed: freed once answered, so the pump task stays small.
            r = Box::pin(self.registry.dial(&self.address, random, "grpc")) => r,
            _ = self.cancel.cancelled() => Err(DialError::Cancelled),
        };
        let tunnel = match result {
            Ok(t) => t,
            Err(e) => {
                if !matches!(e, DialError::Cancelled) {
                    let reason = e.kind();
                    info!(%reason, error = %e, "dial failed");
                    let typed = self.typed_reasons.then_some(reason);
                    let _ = self
                        .out
                        .send(packet::dial_failed_with(random, e.to_string(), typed))
                        .await;
                } else {
                    debug!("dial cancelled by frontend");
                }
                lock(&self.book).pending.remove(&random);
                return;
            }
        };
        let connect_id = tunnel.connect_id();
        tracing::Span::current().record("connect_id", connect_id);
        debug!("connection established");
        // Cancelled when the frontend asks to close (not a child token: the
        // stream's own `cancel` is watched separately).
        let closing = CancellationToken::new();
        // Register before answering so the frontend's first DATA finds it.
        // connectIDs are unique per agent stream only: two dials of one
        // frontend stream through two agents may get the same id.
        let accepted = {
            let mut book = lock(&self.book);
            book.pending.remove(&random);
            match book.conns.entry(connect_id) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Arc::new(Conn {
                        tx: tunnel.tx.clone(),
                        closing: closing.clone(),
                    }));
                    true
                }
            }
        };
        if !accepted {
            warn!(
                connect_id,
                "connectID already in use on this frontend stream; dial refused"
            );
            let _ = self
                .out
                .send(packet::dial_failed(
                    random,
                    format!("connectID {connect_id} already in use on this frontend stream"),
                ))
                .await;
            // Dropping the tunnel closes it on the agent.
            return;
        }
        let _registered = Registered {
            book: self.book.clone(),
            connect_id,
        };
        if self.cancel.is_cancelled() {
            // The frontend stream ended meanwhile.
            return;
        }
        if self
            .out
            .send(packet::dial_ok(random, connect_id))
            .await
            .is_err()
        {
            return;
        }
        let mut rx = tunnel.rx;
        drop(tunnel.tx);
        // After the frontend's CLOSE_REQ, wait CLOSE_WAIT for the agent's
        // CLOSE_RSP, then close anyway (one timer, not restarted per chunk).
        let give_up = async {
            closing.cancelled().await;
            tokio::time::sleep(CLOSE_WAIT).await;
        };
        tokio::pin!(give_up);
        loop {
            let chunk = tokio::select! {
                c = rx.recv_held() => c,
                _ = self.cancel.cancelled() => None,
                _ = &mut give_up => None,
            };
            let Some((chunk, held)) = chunk else { break };
            let n = chunk.len();
            if self
                .out
                .send_held(packet::data(connect_id, chunk), held)
                .await
                .is_err()
            {
                return;
            }
            rx.delivered(n).await;
        }
        // The agent closed (or the frontend asked and the agent answered).
        if !self.cancel.is_cancelled() {
            let _ = self.out.send(packet::close_response(connect_id, "")).await;
        }
    }
}
