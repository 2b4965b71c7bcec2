//! A Konnectivity client: dial a destination through a `proxy-server` the way
//! kube-apiserver's egress dialer does, in either mode (gRPC `ProxyService`, one
//! dial per stream; or HTTP CONNECT) over either transport (a Unix socket, or
//! mutual-TLS TCP).
//!
//! ```no_run
//! # async fn run() -> Result<(), konnectivity_client::Error> {
//! use konnectivity_client::{Frontend, Mode, Transport};
//! let frontend = Frontend::new(
//!     Mode::Grpc,
//!     Transport::Unix("/etc/kubernetes/konnectivity-server/konnectivity-server.socket".into()),
//! );
//! let tunnel = frontend.dial("10.0.0.5:10250").await?;
//! // `tunnel` is an AsyncRead + AsyncWrite byte stream to the kubelet.
//! # Ok(()) }
//! ```
//!
//! Every failure is an [`Error`] whose [`Error::hop`] says which side failed:
//! reaching the server ([`Hop::Frontend`]), the server itself ([`Hop::Server`]:
//! no agent, agent unresponsive) or the agent's own dial ([`Hop::Agent`]:
//! refused, timeout, no route, DNS). Against our server the dial's reason
//! arrives typed (`dial-reason-v1`); against the reference it is read from the
//! error text, which both word the same way.
//!
//! The client never waits forever: [`Frontend::timeout`] bounds each stage
//! (connect, TLS, the server's answer) and a stage that runs out is an
//! [`Error::Timeout`] naming it.

mod connect;
mod grpc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use connect::{connect_on, ConnectStream};
pub use grpc::{channel, GrpcConn, GrpcStream};
pub use konnectivity_proto::reason::{DialReason, Side};
use tokio::io::{AsyncRead, AsyncWrite};

/// How the frontend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `ProxyService.Proxy` over HTTP/2.
    Grpc,
    /// `CONNECT host:port HTTP/1.1`.
    HttpConnect,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Grpc => "gRPC",
            Mode::HttpConnect => "HTTP CONNECT",
        })
    }
}

/// Where the frontend listens.
#[derive(Clone)]
pub enum Transport {
    /// A Unix socket (kube-apiserver's `transport.uds.udsName`).
    Unix(PathBuf),
    /// TCP with mutual TLS (`transport.tcp.url` with a `tlsConfig`).
    Tls {
        /// `host:port`.
        addr: String,
        /// The name the server's certificate must carry.
        server_name: rustls::pki_types::ServerName<'static>,
        /// Trust roots and the client certificate. The ALPN list is set by
        /// the mode (`h2` for gRPC, `http/1.1` for CONNECT).
        config: Arc<rustls::ClientConfig>,
    },
}

impl Transport {
    /// The socket path or address, for messages.
    pub fn target(&self) -> String {
        match self {
            Transport::Unix(p) => p.display().to_string(),
            Transport::Tls { addr, .. } => addr.clone(),
        }
    }
}

/// A stage of a dial, for [`Error::Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Opening the socket or TCP connection to the server.
    Connect,
    /// The TLS handshake with the server.
    Tls,
    /// Waiting for the server to answer a probe ([`Frontend::reach`]).
    Answer,
    /// Waiting for the server to answer the dial (it asks an agent, which
    /// dials the destination).
    Dial,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connecting to the proxy-server",
            Stage::Tls => "the TLS handshake with the proxy-server",
            Stage::Answer => "waiting for the proxy-server to answer",
            Stage::Dial => "waiting for the proxy-server to answer the dial",
        })
    }
}

/// Which side of the path failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Reaching the proxy-server: socket, TCP, TLS, or the mode it speaks.
    Frontend,
    /// The proxy-server: no agent, agent unresponsive or lost, limits.
    Server,
    /// The agent's dial of the destination.
    Agent,
}

/// Why a dial through the proxy-server failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket or TCP address could not be opened.
    #[error("cannot reach the proxy-server at {target}: {source}")]
    Connect {
        /// The socket path or address.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake with the server failed, or the server rejected our
    /// client certificate.
    #[error("TLS with the proxy-server at {target} failed: {detail}")]
    Tls {
        /// The address.
        target: String,
        /// rustls' words.
        detail: String,
    },
    /// The server answered, but not in the expected mode, or broke the
    /// protocol.
    #[error("the proxy-server at {target} did not speak {mode}: {detail}")]
    Protocol {
        /// The socket path or address.
        target: String,
        /// The mode we spoke.
        mode: Mode,
        /// What went wrong.
        detail: String,
    },
    /// A stage did not finish in time.
    #[error("timed out after {after:?} {stage}")]
    Timeout {
        /// The stage.
        stage: Stage,
        /// The limit.
        after: Duration,
    },
    /// The server answered the dial with an error.
    #[error("dial {address}: {message}")]
    Dial {
        /// The destination.
        address: String,
        /// The error text (the agent's words when the agent failed).
        message: String,
        /// Why.
        reason: DialReason,
        /// The reason came typed from the server rather than from the text.
        typed: bool,
        /// The HTTP status, in CONNECT mode.
        status: Option<u16>,
    },
}

impl Error {
    /// Which side failed.
    pub fn hop(&self) -> Hop {
        match self {
            Error::Connect { .. } | Error::Tls { .. } | Error::Protocol { .. } => Hop::Frontend,
            Error::Timeout { stage, .. } => match stage {
                Stage::Connect | Stage::Tls | Stage::Answer => Hop::Frontend,
                Stage::Dial => Hop::Server,
            },
            Error::Dial { reason, .. } => match reason.side() {
                Side::Server => Hop::Server,
                Side::Agent => Hop::Agent,
            },
        }
    }

    /// The dial's reason, when the server answered with one.
    pub fn reason(&self) -> Option<DialReason> {
        match self {
            Error::Dial { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// The server's error text for a failed dial.
    pub fn message(&self) -> Option<&str> {
        match self {
            Error::Dial { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// A byte stream to the destination.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An established tunnel: bytes written go to the destination.
pub type Tunnel = Box<dyn Io>;

/// A proxy-server frontend to dial through.
#[derive(Clone)]
pub struct Frontend {
    /// The mode.
    pub mode: Mode,
    /// The transport.
    pub transport: Transport,
    /// The limit for each stage of a dial.
    pub timeout: Duration,
}

impl Frontend {
    /// A frontend with the default 30 s limit per stage (kube-apiserver's
    /// own dial timeout).
    pub fn new(mode: Mode, transport: Transport) -> Self {
        Frontend {
            mode,
            transport,
            timeout: Duration::from_secs(30),
        }
    }

    /// The same frontend with another limit per stage.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Dials `address` (`host:port`) through the server.
    pub async fn dial(&self, address: &str) -> Result<Tunnel, Error> {
        match self.mode {
            Mode::Grpc => {
                let ch = grpc::channel(&self.transport, self.timeout).await?;
                let conn = GrpcConn::dial_within(&ch, address, self.timeout)
                    .await
                    .map_err(|e| self.in_mode(e))?;
                Ok(Box::new(conn.into_stream()))
            }
            Mode::HttpConnect => Ok(Box::new(
                connect::dial(&self.transport, address, self.timeout).await?,
            )),
        }
    }

    /// Reaches the server without dialing: opens the socket or TCP
    /// connection, does the TLS handshake, and in gRPC mode makes a call
    /// any gRPC server answers (so the mode and a refused client
    /// certificate show here). In CONNECT mode nothing is sent: a refused
    /// client certificate or the wrong mode only shows once a dial is sent.
    pub async fn reach(&self) -> Result<(), Error> {
        match self.mode {
            Mode::Grpc => {
                let ch = grpc::channel(&self.transport, self.timeout).await?;
                within(self.timeout, Stage::Answer, grpc::probe(ch))
                    .await
                    .map_err(|e| self.in_mode(e))
            }
            Mode::HttpConnect => open(&self.transport, b"http/1.1", self.timeout)
                .await
                .map(drop),
        }
    }

    fn in_mode(&self, e: Error) -> Error {
        match e {
            Error::Protocol { detail, .. } => Error::Protocol {
                target: self.transport.target(),
                mode: self.mode,
                detail,
            },
            e => e,
        }
    }
}

/// Runs `fut` within `limit`, or fails with a timeout for `stage`.
async fn within<T>(
    limit: Duration,
    stage: Stage,
    fut: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(Error::Timeout {
            stage,
            after: limit,
        }))
}

/// rustls' error somewhere in an error's source chain (a refused client
/// certificate arrives as an alert on the first read, wrapped in an I/O or
/// transport error).
fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(t.to_string());
            }
            // Through hyper's connection task the alert arrives as text
            // (rustls' words for a refused handshake or certificate).
            let text = io.to_string();
            if io.kind() == std::io::ErrorKind::InvalidData && text.contains("fatal alert") {
                return Some(text);
            }
        }
        cur = err.source();
    }
    None
}

/// Opens the transport: the socket, or TCP plus the TLS handshake with `alpn`.
async fn open(transport: &Transport, alpn: &[u8], limit: Duration) -> Result<Box<dyn Io>, Error> {
    let target = transport.target();
    match transport {
        Transport::Unix(path) => {
            within(limit, Stage::Connect, async {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|source| Error::Connect {
                        target: target.clone(),
                        source,
                    })?;
                Ok(Box::new(s) as Box<dyn Io>)
            })
            .await
        }
        Transport::Tls {
            addr,
            server_name,
            config,
        } => {
            let tcp = within(limit, Stage::Connect, async {
                let s = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|source| Error::Connect {
                        target: target.clone(),
                        source,
                    })?;
                let _ = s.set_nodelay(true);
                Ok(s)
            })
            .await?;
            let mut cfg = (**config).clone();
            cfg.alpn_protocols = vec![alpn.to_vec()];
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
            within(limit, Stage::Tls, async {
                let s = tls
                    .connect(server_name.clone(), tcp)
                    .await
                    .map_err(|e| Error::Tls {
                        target: target.clone(),
                        detail: tls_cause(&e).unwrap_or_else(|| e.to_string()),
                    })?;
                Ok(Box::new(s) as Box<dyn Io>)
            })
            .await
        }
    }
}
