//! The QUIC transport between our own proxy server and agents.
//!
//! It is negotiated on the agent's gRPC stream, so a reference peer never sees
//! anything new: our agent offers [`FEATURE`] in the features header; our
//! server answers with it, its UDP port and a ticket (a random secret naming
//! that one stream). The agent then opens a QUIC connection (ALPN [`ALPN`],
//! the same CA and client certificate as its gRPC stream) and sends the ticket
//! on its first stream, the hello; the server ties the connection to the
//! stream the ticket names and answers `ok`.
//!
//! From then on the server opens one bidirectional QUIC stream per dial: a
//! `DIAL_REQ` packet, the agent's `DIAL_RSP`, then the connection's bytes both
//! ways, with QUIC's per-stream flow control instead of `WINDOW` packets and a
//! stream finish instead of `CLOSE_REQ`/`CLOSE_RSP`. A lost packet or a slow
//! reader on one connection holds up no other. The gRPC stream keeps the
//! control packets (`DRAIN`, heartbeats) and carries the dials again whenever
//! the QUIC connection is gone.

use std::sync::Arc;
use std::time::Duration;

use konnectivity_proto::Packet;
use prost::Message as _;
use quinn::{RecvStream, SendStream, VarInt};

/// The feature our agent offers and our server answers (features header).
pub const FEATURE: &str = "quic-v1";
/// Server -> agent response header: the UDP port of the server's QUIC endpoint.
pub const PORT_HEADER: &str = "x-konnectivity-rs-quic-port";
/// Server -> agent response header: the ticket that names this stream.
pub const TICKET_HEADER: &str = "x-konnectivity-rs-quic-ticket";
/// Our own ALPN: a QUIC peer that does not speak it is refused in the
/// handshake.
pub const ALPN: &[u8] = b"konnectivity-rs-quic/1";
/// Largest dial frame (`DIAL_REQ`, `DIAL_RSP`) either side reads.
pub const MAX_FRAME: usize = 64 * 1024;
/// How long a new connection has to complete its handshake and hello, and
/// how long an agent waits for them before it stays on gRPC.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Streams the server may have open on one agent's connection: one per
/// tunnelled connection.
pub const MAX_STREAMS: u32 = 16_384;
/// Receive window of one stream (one tunnelled connection).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Receive window of the whole connection: bounds what one peer can make the
/// other buffer, however many streams are open.
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// A ping this often keeps the path (and its NAT mappings) alive ...
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// ... and this much silence means it is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a ticket, before hex.
const TICKET_BYTES: usize = 16;

/// Why a QUIC connection was closed, as its close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// The stream or process ended normally.
    Done = 0,
    /// The hello did not come in time or was malformed.
    BadHello = 1,
    /// The hello's ticket names no agent stream of this server.
    UnknownTicket = 2,
    /// A newer connection took over the same agent stream.
    Replaced = 3,
}

impl CloseCode {
    /// As a QUIC application close code.
    pub fn code(self) -> VarInt {
        VarInt::from_u32(self as u32)
    }
}

/// What went wrong on a QUIC connection or stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A TLS configuration QUIC cannot use.
    #[error("QUIC TLS configuration: {0}")]
    Tls(String),
    /// Connecting failed.
    #[error("QUIC connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("QUIC connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing a stream failed.
    #[error("QUIC write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading a stream failed.
    #[error("QUIC read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Reading a stream to its end failed.
    #[error("QUIC read: {0}")]
    ReadToEnd(#[from] quinn::ReadToEndError),
    /// The stream had finished.
    #[error("QUIC stream closed")]
    Closed(#[from] quinn::ClosedStream),
    /// A frame larger than [`MAX_FRAME`], or one that does not decode.
    #[error("bad frame: {0}")]
    Frame(String),
    /// The other side did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server did not accept the hello.
    #[error("hello refused: {0}")]
    Refused(String),
}

/// The transport settings both ends use.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS))
        // The agent opens exactly one stream (the hello).
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT.try_into().expect("idle timeout fits QUIC"),
        ));
    Arc::new(t)
}

/// The server's QUIC configuration from its agent-port TLS configuration
/// (same certificate, same client CA), speaking only [`ALPN`].
pub fn server_config(tls: &rustls::ServerConfig) -> Result<quinn::ServerConfig, Error> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    // An agent whose address changes keeps its connection.
    config.migration(true);
    Ok(config)
}

/// The agent's QUIC configuration from its gRPC TLS configuration (same CA,
/// same client certificate), speaking only [`ALPN`].
pub fn client_config(tls: &rustls::ClientConfig) -> Result<quinn::ClientConfig, Error> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// A new random ticket (hex).
pub fn new_ticket() -> String {
    let bytes: [u8; TICKET_BYTES] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes one length-prefixed packet.
pub async fn write_packet(send: &mut SendStream, p: Packet) -> Result<(), Error> {
    let body = p.encode_to_vec();
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one length-prefixed packet of at most [`MAX_FRAME`] bytes.
pub async fn read_packet(recv: &mut RecvStream) -> Result<Packet, Error> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(Error::Frame(format!("{len} bytes (at most {MAX_FRAME})")));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Packet::decode(body.as_slice()).map_err(|e| Error::Frame(e.to_string()))
}

/// Agent side: sends the hello with `ticket` on a new stream and waits for
/// the server's `ok`, at most [`HELLO_TIMEOUT`].
pub async fn hello(conn: &quinn::Connection, ticket: &str) -> Result<(), Error> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(ticket.as_bytes()).await?;
        send.finish()?;
        let answer = recv.read_to_end(16).await?;
        if answer == b"ok" {
            Ok(())
        } else {
            Err(Error::Refused(
                String::from_utf8_lossy(&answer).into_owned(),
            ))
        }
    };
    match tokio::time::timeout(HELLO_TIMEOUT, exchange).await {
        Ok(Err(Error::ReadToEnd(quinn::ReadToEndError::Read(
            quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c)),
        )))) => Err(Error::Refused(
            String::from_utf8_lossy(&c.reason).into_owned(),
        )),
        Ok(r) => r,
        Err(_) => Err(Error::Timeout(HELLO_TIMEOUT)),
    }
}

/// Server side: the hello of a new connection, at most [`HELLO_TIMEOUT`]:
/// its ticket and the stream to answer it on ([`accept`]). The caller
/// closes the connection with [`CloseCode::BadHello`] on error.
pub async fn read_hello(conn: &quinn::Connection) -> Result<(String, SendStream), Error> {
    let exchange = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let ticket = recv.read_to_end(2 * TICKET_BYTES).await?;
        let ticket = String::from_utf8(ticket)
            .ok()
            .filter(|t| t.len() == 2 * TICKET_BYTES && t.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| Error::Frame("the hello is not a ticket".into()))?;
        Ok((ticket, send))
    };
    tokio::time::timeout(HELLO_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout(HELLO_TIMEOUT))?
}

/// Server side: accepts a hello.
pub async fn accept(mut send: SendStream) -> Result<(), Error> {
    send.write_all(b"ok").await?;
    send.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests;
