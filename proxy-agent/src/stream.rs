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
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use konnectivity_link::{Event, Link, Role};
use konnectivity_proto::budget::Mistake;
use konnectivity_proto::grpc::{self, Incoming};
use konnectivity_proto::metadata::{self, HEARTBEAT_INTERVAL, HEARTBEAT_MISSES};
use konnectivity_proto::policy::Destinations;
use konnectivity_proto::{packet, DialReason, Message, Packet};
use konnectivity_relay::{self as relay, ConnInbox, ConnInfo, Credit, Inbound, Liveness, Slot};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn, Instrument};

use crate::config::Config;
use crate::metrics::Metrics;

/// Packets queued towards the server, shared by the stream's connections.
const OUT_QUEUE: usize = 256;
/// How long a closing connection keeps moving what was sent before the close:
/// the destination's last bytes after it reset the connection (our write to
/// it failed), or the client's last bytes after the server closed it. Both
/// normally take no time; this bounds a peer that keeps sending or stops
/// reading.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// Capacity of the control lane towards the server (answers, grants, closes).
const CONTROL_QUEUE: usize = 1024;
/// HTTP/2 windows: large enough that one connection can fill the link.
const STREAM_WINDOW: u32 = 8 << 20;
const CONN_WINDOW: u32 = 16 << 20;
/// Largest gRPC message accepted from the server.
const MAX_MESSAGE: usize = 16 << 20;

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
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// TCP, TLS or HTTP/2 towards the server failed.
    #[error("connect to server {addr}: {source}")]
    Connect {
        /// host:port.
        addr: String,
        /// The transport error (its chain says TCP, TLS or HTTP/2).
        source: tonic::transport::Error,
    },
    /// The server answered the `Connect` call with an error status.
    #[error("server {addr} refused the agent stream: {code:?}: {message}")]
    Refused {
        /// host:port.
        addr: String,
        /// gRPC code.
        code: tonic::Code,
        /// Server's message.
        message: String,
    },
    /// A required response header is missing or invalid.
    #[error("server {addr}: {problem}")]
    Header {
        /// host:port.
        addr: String,
        /// What is wrong.
        problem: String,
    },
    /// The service-account token file could not be read.
    #[error("read token {path}: {source}")]
    Token {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl OpenError {
    /// Label for the failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            OpenError::Connect { .. } => "connect",
            OpenError::Refused { .. } => "refused",
            OpenError::Header { .. } => "bad_headers",
            OpenError::Token { .. } => "token",
        }
    }
}

/// A freshly opened stream, before it is served.
pub struct Opened {
    /// The server's id.
    pub server_id: String,
    /// How many servers the server says exist.
    pub server_count: u32,
    /// The stream's state.
    pub link: Arc<ServerLink>,
    inbound: Incoming<tonic::body::Body>,
}

impl Opened {
    /// Serves the stream until it ends or `stop` is cancelled.
    pub async fn serve(self, stop: CancellationToken) {
        let link = self.link.clone();
        link.serve(self.inbound, stop).await;
    }
}

async fn channel(s: &Settings) -> Result<Channel, OpenError> {
    let cfg = &s.config;
    let host = cfg.server.host.clone();
    let port = cfg.server.port;
    let addr = format!("{host}:{port}");
    let uri_host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let endpoint = Endpoint::from_shared(format!("http://{uri_host}:{port}"))
        .map_err(|source| OpenError::Connect {
            addr: addr.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(cfg.keepalive_time)
        .keep_alive_timeout(cfg.keepalive_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(grpc::MAX_FRAME)
        .tcp_nodelay(true);
    // Certificates rotated on disk apply from the next connection.
    let tls = tokio_rustls::TlsConnector::from(s.tls.current());
    let user_timeout = cfg.keepalive_time.min(cfg.keepalive_timeout * 2);
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        let host = host.clone();
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // Unacknowledged data for this long means the path is dead.
            let _ = socket2::SockRef::from(&tcp).set_tcp_user_timeout(Some(user_timeout));
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| OpenError::Connect { addr, source })
}

fn header(md: &tonic::metadata::MetadataMap, key: &str, addr: &str) -> Result<String, OpenError> {
    let mut all = md.get_all(key).iter();
    let (Some(v), None) = (all.next(), all.next()) else {
        return Err(OpenError::Header {
            addr: addr.into(),
            problem: format!("response header {key} missing or repeated"),
        });
    };
    v.to_str().map(String::from).map_err(|_| OpenError::Header {
        addr: addr.into(),
        problem: format!("response header {key} is not text"),
    })
}

/// Opens one stream to the server (through whatever balancer is in front).
pub async fn open(s: &Arc<Settings>) -> Result<Opened, OpenError> {
    let cfg = &s.config;
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let mut ch = channel(s).await?;
    let (out_tx, out_rx) = mpsc::channel::<Packet>(OUT_QUEUE);
    let (control_tx, control_rx) = mpsc::channel::<Packet>(CONTROL_QUEUE);
    let mut md = tonic::metadata::MetadataMap::new();
    let ascii = |v: &str, what: &str| {
        v.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>()
            .map_err(|_| OpenError::Header {
                addr: addr.clone(),
                problem: format!("{what} is not valid metadata text"),
            })
    };
    md.insert(metadata::AGENT_ID, ascii(&cfg.agent_id, "--agent-id")?);
    let ids = cfg.identifiers.encode();
    if !ids.is_empty() {
        md.insert(
            metadata::AGENT_IDENTIFIERS,
            ascii(&ids, "--agent-identifiers")?,
        );
    }
    if let Some(path) = &cfg.token_path {
        let token = std::fs::read_to_string(path).map_err(|source| OpenError::Token {
            path: path.display().to_string(),
            source,
        })?;
        md.insert(
            metadata::AUTHORIZATION,
            ascii(&format!("Bearer {}", token.trim()), "the token")?,
        );
    }
    let offered = if cfg.flow_control {
        [
            metadata::FEATURE_FLOW_CONTROL,
            metadata::FEATURE_DIAL_REASON,
        ]
        .join(",")
    } else {
        metadata::FEATURE_DIAL_REASON.to_string()
    };
    md.insert(metadata::FEATURES, ascii(&offered, "features")?);
    // Control packets overtake queued DATA: heartbeat answers, dial answers,
    // grants and closes the server asked for are not stuck behind a burst.
    let outgoing = futures::stream::select_with_strategy(
        ReceiverStream::new(control_rx),
        ReceiverStream::new(out_rx),
        |_: &mut ()| futures::stream::PollNext::Left,
    )
    .map(Ok);
    let resp = grpc::call(
        &mut ch,
        konnectivity_proto::CONNECT_METHOD,
        md,
        outgoing,
        MAX_MESSAGE,
    )
    .await
    .map_err(|st| OpenError::Refused {
        addr: addr.clone(),
        code: st.code(),
        message: st.message().to_string(),
    })?;
    let md = resp.metadata();
    let server_id = header(md, metadata::SERVER_ID, &addr)?;
    let count_text = header(md, metadata::SERVER_COUNT, &addr)?;
    let server_count = count_text
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|c| *c > 0)
        .ok_or_else(|| OpenError::Header {
            addr: addr.clone(),
            problem: format!("serverCount {count_text:?} is not a positive number"),
        })?;
    let features = md.get(metadata::FEATURES).and_then(|v| v.to_str().ok());
    let flow = cfg.flow_control && metadata::has_feature(features, metadata::FEATURE_FLOW_CONTROL);
    let dial_reason = metadata::has_feature(features, metadata::FEATURE_DIAL_REASON);
    let link = Arc::new(ServerLink::new(
        server_id.clone(),
        (flow, dial_reason),
        addr,
        (out_tx, control_tx),
        s.clone(),
    ));
    Ok(Opened {
        server_id,
        server_count,
        link,
        inbound: resp.into_inner(),
    })
}

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
}

impl ServerLink {
    /// A stream's state: `features` are `window-v1` and `dial-reason-v1`
    /// as negotiated, `lanes` the DATA and control queues towards the server.
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

    /// Open connections plus dials in progress on this stream.
    pub fn busy(&self) -> usize {
        let st = self.state();
        st.table().conns_len() + st.table().pending_len()
    }

    /// Pending dials, and each connection with its record and the chunks
    /// queued towards the destination (for the admin endpoint).
    pub fn snapshot(&self) -> (usize, Vec<(i64, Arc<ConnInfo>, usize)>) {
        let st = self.state();
        let conns = st
            .table()
            .conns()
            .map(|(id, s)| (id, s.info.clone(), s.conn.tx.queued()))
            .collect();
        (st.table().pending_len(), conns)
    }

    /// Takes a dial that ended out of the table; false when it was no longer
    /// there (cancelled by the server).
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

    async fn dial(self: Arc<Self>, address: String, random: i64, cancel: CancellationToken) {
        let cfg = &self.settings.config;
        let m = self.metrics().clone();
        let started = Instant::now();
        let result = tokio::select! {
            // Boxed: the connect state (resolver included) is freed once the
            // dial is done instead of sizing the long-lived relay task.
            r = Box::pin(tokio::time::timeout(cfg.dial_timeout, connect(&address, &cfg.allowed))) => r,
            _ = cancel.cancelled() => {
                self.take_dial(random);
                debug!("dial aborted");
                return;
            }
        };
        m.dial_duration.observe(started.elapsed().as_secs_f64());
        let Some(pending) = self.take_dial(random) else {
            debug!("dial finished after it was cancelled; dropped");
            return;
        };
        let tcp = match result {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(Dial::Forbidden)) => {
                let text = format!(
                    "dial tcp {address}: not allowed by --allowed-destinations on the agent ({})",
                    cfg.allowed
                );
                self.dial_failed(&address, random, DialReason::Forbidden, text)
                    .await;
                return;
            }
            Ok(Err(Dial::Io(e))) => {
                let (reason, text) = dial_error_text(&address, &e);
                self.dial_failed(&address, random, reason, text).await;
                return;
            }
            Err(_) => {
                let text = format!("dial tcp {address}: i/o timeout");
                self.dial_failed(&address, random, DialReason::Timeout, text)
                    .await;
                return;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (conn, inbox) = relay::connection(self.flow, self.closed.child_token(), None);
        let (credit, kill) = (conn.credit.clone(), conn.kill.clone());
        let info = ConnInfo::new(&address, &self.server_id);
        let slot = Slot {
            conn,
            info: info.clone(),
        };
        let connected = self.state().connected(pending, slot);
        let Ok((connect_id, _, answer)) = connected else {
            let text = "too many connections on this agent stream".to_string();
            self.dial_failed(&address, random, DialReason::Exhausted, text)
                .await;
            return;
        };
        m.open_endpoint_connections.inc();
        tracing::Span::current().record("connect_id", connect_id);
        if !self.send_control(answer).await {
            return;
        }
        debug!("connected");
        self.relay(tcp, connect_id, inbox, credit, kill, info).await;
    }

    /// Answers a failed dial: counted, logged, and its reason typed for a
    /// server that speaks `dial-reason-v1`.
    async fn dial_failed(&self, address: &str, random: i64, reason: DialReason, text: String) {
        // The reference's label values, and ours for a policy refusal.
        let label = match reason {
            DialReason::Timeout => "timeout",
            DialReason::Forbidden => "forbidden",
            _ => "unknown",
        };
        self.metrics()
            .endpoint_dial_failures
            .with_label_values(&[label])
            .inc();
        info!(%reason, error = text, "dial failed");
        self.settings
            .events
            .dial_failed(address, &self.server_id, reason, &text);
        let typed = self.dial_reason.then_some(reason);
        self.send_control(packet::dial_failed_with(random, text, typed))
            .await;
    }

    async fn relay(
        self: Arc<Self>,
        tcp: TcpStream,
        connect_id: i64,
        inbox: ConnInbox,
        credit: Arc<Credit>,
        kill: CancellationToken,
        info: Arc<ConnInfo>,
    ) {
        let (reader, writer) = tcp.into_split();
        let up = relay::socket_to_tunnel(reader, &credit, |b: Bytes| {
            let n = b.len() as u64;
            let link = self.clone();
            let info = info.clone();
            async move {
                let ok = link.send(packet::data(connect_id, b)).await;
                link.metrics()
                    .bytes
                    .with_label_values(&["to_server"])
                    .inc_by(n);
                info.sent(n);
                ok
            }
        });
        let mut inbound = ConnInbound {
            link: self.clone(),
            connect_id,
            inbox,
            info: info.clone(),
        };
        let down = relay::tunnel_to_socket(&mut inbound, writer);
        tokio::pin!(up, down);
        tokio::select! {
            _ = kill.cancelled() => {
                // Closed by the server (the client hung up): what the
                // client sent before that is queued and still goes to the
                // destination, as TCP would deliver it before the FIN.
                let _ = tokio::time::timeout(CLOSE_DRAIN, &mut down).await;
            }
            r = &mut up => if let Err(e) = r { debug!(error = %e, "destination read failed") },
            r = &mut down => if let Err(e) = r {
                debug!(error = %e, "destination write failed");
                // A destination that closed while bytes to it were still
                // coming is reset by its kernel, and our write fails; what
                // it wrote before closing is still in our socket and must
                // go out first (an `exec` command's last output).
                tokio::select! {
                    _ = kill.cancelled() => {}
                    _ = tokio::time::sleep(CLOSE_DRAIN) => {}
                    r = &mut up => if let Err(e) = r { debug!(error = %e, "destination read failed") },
                }
            },
        }
        // The destination closed, or failed: tell the server, unless the
        // server closed it first.
        if let Some(close) = self.close_conn(connect_id) {
            self.send(close).await;
        }
        debug!("closed");
    }
}

struct ConnInbound {
    link: Arc<ServerLink>,
    connect_id: i64,
    inbox: ConnInbox,
    info: Arc<ConnInfo>,
}

impl Inbound for ConnInbound {
    async fn recv(&mut self) -> Option<Bytes> {
        self.inbox.recv().await
    }

    async fn delivered(&mut self, n: usize) {
        self.link
            .metrics()
            .bytes
            .with_label_values(&["to_endpoint"])
            .inc_by(n as u64);
        self.info.delivered(n as u64);
        if let Some(g) = self.inbox.written(n) {
            self.link
                .send_control(packet::window(self.connect_id, g))
                .await;
        }
    }
}

/// Why [`connect`] did not connect.
enum Dial {
    /// No address of the destination is allowed.
    Forbidden,
    Io(std::io::Error),
}

/// Connects to `address` (`host:port`), trying only the addresses `allowed`
/// lets through, in the resolver's order; the last error if none answers.
async fn connect(address: &str, allowed: &Destinations) -> Result<TcpStream, Dial> {
    if allowed.allows_all() {
        return TcpStream::connect(address).await.map_err(Dial::Io);
    }
    let addrs = tokio::net::lookup_host(address).await.map_err(Dial::Io)?;
    let mut last = None;
    for a in addrs.filter(|a| allowed.allows(*a)) {
        match TcpStream::connect(a).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map(Dial::Io).unwrap_or(Dial::Forbidden))
}

/// The dial error as the reference agent words it (Go's net errors), so that
/// HTTP CONNECT status mapping and humans see the familiar text; and its
/// reason.
fn dial_error_text(address: &str, e: &std::io::Error) -> (DialReason, String) {
    use std::io::ErrorKind::*;
    let text = e.to_string();
    if text.contains("failed to lookup address") {
        let host = konnectivity_proto::metadata::dest_host(address);
        return (
            DialReason::Dns,
            format!("dial tcp: lookup {host}: no such host"),
        );
    }
    let (reason, what) = match e.kind() {
        ConnectionRefused => (DialReason::Refused, "connect: connection refused".into()),
        TimedOut => (DialReason::Timeout, "i/o timeout".into()),
        HostUnreachable => (DialReason::NoRoute, "connect: no route to host".into()),
        NetworkUnreachable => (
            DialReason::NoRoute,
            "connect: network is unreachable".into(),
        ),
        _ if e.raw_os_error() == Some(24) => {
            (DialReason::Exhausted, "socket: too many open files".into())
        }
        _ => (DialReason::Other, text),
    };
    (reason, format!("dial tcp {address}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::dial_error_text;
    use konnectivity_proto::DialReason;
    use std::io::{Error, ErrorKind};

    #[test]
    fn dial_errors_read_like_the_reference_agent() {
        let refused = Error::from(ErrorKind::ConnectionRefused);
        assert_eq!(
            dial_error_text("10.0.0.5:10250", &refused),
            (
                DialReason::Refused,
                "dial tcp 10.0.0.5:10250: connect: connection refused".into()
            )
        );
        let timeout = Error::from(ErrorKind::TimedOut);
        assert_eq!(dial_error_text("a:1", &timeout).0, DialReason::Timeout);
        // The reason read back from the text is the typed one.
        for e in [refused, timeout] {
            let (reason, text) = dial_error_text("10.0.0.5:10250", &e);
            assert_eq!(DialReason::from_text(&text), reason);
        }
        let dns = Error::other("failed to lookup address information: Name or service not known");
        assert_eq!(
            dial_error_text("nowhere.example:80", &dns).1,
            "dial tcp: lookup nowhere.example: no such host"
        );
    }
}

#[cfg(test)]
mod watchdog_tests {
    use super::*;
    use clap::Parser;
    use konnectivity_link::Pending;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    type Inbound = mpsc::UnboundedSender<Result<Packet, tonic::Status>>;
    type Packets = UnboundedReceiverStream<Result<Packet, tonic::Status>>;

    /// A stream's state with a pretend server: what it sends goes in through
    /// the returned sender, the agent's control packets come out of the
    /// receiver. `flow` is `window-v1`, with which servers send heartbeats.
    fn link(
        dir: &std::path::Path,
        flow: bool,
    ) -> (Arc<ServerLink>, Inbound, Packets, mpsc::Receiver<Packet>) {
        let ca = konnectivity_runtime::pki::Ca::new(dir, "test").unwrap();
        let ca_flag = format!("--ca-cert={}", ca.cert.display());
        let args = crate::config::Args::try_parse_from(["proxy-agent", ca_flag.as_str()]).unwrap();
        let config = Config::from_args(args).unwrap();
        let tls = konnectivity_runtime::tls::Reloading::client("agent", &ca.cert, None, &[b"h2"])
            .unwrap();
        let settings = Arc::new(Settings {
            config,
            tls,
            metrics: Metrics::new(),
            events: Default::default(),
        });
        let (out, _) = mpsc::channel(OUT_QUEUE);
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let link = ServerLink::new(
            "s".into(),
            (flow, true),
            "server:1".into(),
            (out, control),
            settings,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(link),
            tx,
            UnboundedReceiverStream::new(rx),
            control_rx,
        )
    }

    /// The agent drops a stream whose server stopped sending heartbeats
    /// after three missed ones, and not before; every heartbeat is answered
    /// and restarts the count. On tokio's paused clock: no real waiting.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_silent_server_is_dropped_after_three_missed_heartbeats_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let (link, server, inbound, mut control) = link(dir.path(), true);
        // An open dial, to see it fail when the stream is dropped.
        link.state()
            .accept_dial(9, link.closed.child_token())
            .unwrap();
        let serving = tokio::spawn(link.clone().serve(inbound, CancellationToken::new()));
        let watchdog = HEARTBEAT_INTERVAL * HEARTBEAT_MISSES;
        // A minute of heartbeats on time: kept, each answered.
        for _ in 0..30 {
            tokio::time::sleep(HEARTBEAT_INTERVAL).await;
            server.send(Ok(packet::window(0, 0))).unwrap();
            assert_eq!(control.recv().await, Some(packet::window(0, 0)));
        }
        assert!(!serving.is_finished() && !link.closed.is_cancelled());
        // Silent for just under the limit: still kept.
        tokio::time::sleep(watchdog - Duration::from_millis(10)).await;
        assert!(!link.closed.is_cancelled());
        // Past it: dropped, and its dial with it.
        let started = tokio::time::Instant::now();
        serving.await.unwrap();
        assert!(started.elapsed() <= Duration::from_millis(10));
        assert!(link.closed.is_cancelled());
        let dial: Option<Pending<CancellationToken>> = link.state().take_dial(9);
        assert!(dial.is_none(), "the stream's dials were not failed");
    }

    /// A reference server sends no heartbeats: its silence is not a fault.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_server_without_heartbeats_is_kept_however_long_it_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        let (link, _server, inbound, _control) = link(dir.path(), false);
        let serving = tokio::spawn(link.clone().serve(inbound, CancellationToken::new()));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!serving.is_finished() && !link.closed.is_cancelled());
    }
}
