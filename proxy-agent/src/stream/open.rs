//! Opening a stream to the server: TLS, the agent's metadata (id,
//! identifiers, token, features), and the server's `serverID`/`serverCount`
//! headers.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use konnectivity_proto::grpc::{self, Incoming};
use konnectivity_proto::{metadata, Packet};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use super::{Offer, ServerLink, Settings, CONTROL_QUEUE, OUT_QUEUE};
use crate::config::Transport;
use tracing::Instrument;

/// HTTP/2 windows: large enough that one connection can fill the link.
const STREAM_WINDOW: u32 = 8 << 20;
const CONN_WINDOW: u32 = 16 << 20;
/// Largest gRPC message accepted from the server.
const MAX_MESSAGE: usize = 16 << 20;

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
    /// `--transport=quic` and the server does not offer QUIC.
    #[error("server {addr} does not offer QUIC (--transport=quic)")]
    NoQuic {
        /// host:port.
        addr: String,
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
            OpenError::NoQuic { .. } => "no_quic",
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
    /// The server's QUIC offer, when it made one and we asked for it.
    pub quic: Option<Offer>,
    inbound: Incoming<tonic::body::Body>,
}

impl Opened {
    /// Serves the stream until it ends or `stop` is cancelled, with a QUIC
    /// connection tied to it when the server offered one.
    pub async fn serve(self, stop: CancellationToken) {
        let link = self.link.clone();
        let stop = stop.child_token();
        if let Some(offer) = self.quic {
            let strict = (link.settings.config.transport == Transport::Quic).then(|| stop.clone());
            tokio::spawn(link.clone().run_quic(offer, strict).in_current_span());
        }
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
    let offered: Vec<&str> = [
        cfg.flow_control.then_some(metadata::FEATURE_FLOW_CONTROL),
        Some(metadata::FEATURE_DIAL_REASON),
        cfg.transport
            .offers_quic()
            .then_some(konnectivity_quic::FEATURE),
    ]
    .into_iter()
    .flatten()
    .collect();
    let offered = offered.join(",");
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
    let quic = if cfg.transport.offers_quic()
        && metadata::has_feature(features, konnectivity_quic::FEATURE)
    {
        let port = header(md, konnectivity_quic::PORT_HEADER, &addr)?;
        let port = port.trim().parse::<u16>().map_err(|_| OpenError::Header {
            addr: addr.clone(),
            problem: format!("QUIC port {port:?} is not a port"),
        })?;
        let ticket = header(md, konnectivity_quic::TICKET_HEADER, &addr)?;
        Some(Offer { port, ticket })
    } else {
        None
    };
    if quic.is_none() && cfg.transport == Transport::Quic {
        return Err(OpenError::NoQuic { addr });
    }
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
        quic,
        inbound: resp.into_inner(),
    })
}
