//! HTTP CONNECT frontend (`--mode=http-connect`), over a Unix socket or
//! mutual-TLS TCP. One CONNECT per client connection, answered exactly as the
//! reference does: `HTTP/1.1 200 Connection Established\r\n\r\n` and nothing
//! more before tunnel data; 405, 500, 502, 503, 504 by cause otherwise.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use konnectivity_proto::connect::{self, Parsed};
use konnectivity_proto::ids;
use konnectivity_runtime::flow::{self, Buffered, ChunkReader};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{unix, UnixStream};

use tracing::{debug, info, warn, Instrument};

use crate::backend::registry::AgentRegistry;
use crate::frontend::grpc::CLOSE_WAIT;
use crate::listen::TlsConn;
use crate::metrics::Metrics;
use crate::tunnel::{DialError, Tunnel};

/// Longest wait for a complete request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A client connection that splits into a relay reader and a writer. Unix
/// sockets wait for readiness without a read buffer; TLS connections keep one.
pub trait ClientConn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Read side.
    type Reader: ChunkReader;
    /// Write side.
    type Writer: AsyncWrite + Unpin + Send;
    /// Splits the connection for the relay.
    fn split_conn(self) -> (Self::Reader, Self::Writer);
}

impl ClientConn for UnixStream {
    type Reader = unix::OwnedReadHalf;
    type Writer = unix::OwnedWriteHalf;
    fn split_conn(self) -> (Self::Reader, Self::Writer) {
        self.into_split()
    }
}

impl ClientConn for TlsConn {
    type Reader = Buffered<ReadHalf<TlsConn>>;
    type Writer = WriteHalf<TlsConn>;
    fn split_conn(self) -> (Self::Reader, Self::Writer) {
        let (r, w) = tokio::io::split(self);
        (Buffered(r), w)
    }
}

/// Serves one client connection.
pub async fn serve_conn<S: ClientConn>(
    sock: S,
    peer: String,
    registry: Arc<AgentRegistry>,
    metrics: Metrics,
) {
    let gauge = metrics
        .frontend_connections
        .with_label_values(&["http-connect"]);
    gauge.inc();
    let span = tracing::info_span!("connect", %peer, dst.addr = tracing::field::Empty, random = tracing::field::Empty, agent.id = tracing::field::Empty, connect_id = tracing::field::Empty);
    serve_inner(sock, registry).instrument(span).await;
    gauge.dec();
}

async fn read_head<S: AsyncRead + Unpin>(
    sock: &mut S,
    buf: &mut BytesMut,
) -> Result<Parsed, String> {
    loop {
        let parsed = connect::parse_request(buf);
        if parsed != Parsed::Partial {
            return Ok(parsed);
        }
        buf.reserve(4096);
        let n = sock.read_buf(buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("client closed before sending a complete request".into());
        }
    }
}

async fn serve_inner<S: ClientConn>(sock: S, registry: Arc<AgentRegistry>) {
    // Boxed: the request and dial state is freed once the tunnel is open, so
    // the long-lived task is only as large as the relay.
    let Some((sock, tunnel, early)) = Box::pin(open(sock, registry)).await else {
        return;
    };
    relay(sock, tunnel, early).await;
}

/// Reads the CONNECT request and dials; answers errors itself. Returns the
/// socket, the tunnel, and any bytes the client sent after the request head.
async fn open<S: ClientConn>(
    mut sock: S,
    registry: Arc<AgentRegistry>,
) -> Option<(S, Tunnel, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let parsed = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut sock, &mut buf)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            debug!(error = e, "no CONNECT request");
            return None;
        }
        Err(_) => {
            debug!("timed out waiting for the CONNECT request");
            return None;
        }
    };
    let (target, head_len) = match parsed {
        Parsed::Connect { target, head_len } => (target, head_len),
        Parsed::Reject { status, reason } => {
            warn!(status, reason, "CONNECT request refused");
            let _ = sock
                .write_all(&connect::error_response(status, &reason))
                .await;
            let _ = sock.shutdown().await;
            return None;
        }
        Parsed::Partial => return None,
    };
    tracing::Span::current().record("dst.addr", target.as_str());
    let random = ids::random_dial_id();
    tracing::Span::current().record("random", random);
    let tunnel = match registry.dial(&target, random, "http-connect").await {
        Ok(t) => t,
        Err(e) => {
            let body = match &e {
                DialError::NoAgent => format!("currently no tunnels available: {e}"),
                _ => e.to_string(),
            };
            let reason = e.kind();
            info!(status = reason.http_status(), %reason, error = %e, "CONNECT dial failed");
            let _ = sock
                .write_all(&connect::dial_error_response(reason, &body))
                .await;
            let _ = sock.shutdown().await;
            return None;
        }
    };
    tracing::Span::current().record("connect_id", tunnel.connect_id());
    if sock.write_all(connect::ESTABLISHED).await.is_err() {
        return None;
    }
    // A copy, so the head buffer is freed rather than kept alive by a slice.
    let early = Bytes::copy_from_slice(&buf[head_len..]);
    Some((sock, tunnel, early))
}

/// Moves bytes both ways until either side closes.
async fn relay<S: ClientConn>(sock: S, tunnel: Tunnel, early: Bytes) {
    let (tx, mut rx) = (tunnel.tx, tunnel.rx);
    if !early.is_empty() && tx.send(early).await.is_err() {
        return;
    }
    let (reader, mut writer) = sock.split_conn();
    let up = {
        let tx = tx.clone();
        async move {
            let r = flow::socket_to_tunnel(reader, tx.credit(), |b: Bytes| {
                let tx = tx.clone();
                async move { tx.send_counted(b).await.is_ok() }
            })
            .await;
            // Client EOF (no half-close in the protocol): ask the agent to close.
            tx.close().await;
            r
        }
    };
    let down = async {
        if let Err(e) = flow::tunnel_to_socket(&mut rx, &mut writer).await {
            debug!(error = %e, "client write failed");
        }
    };
    tokio::pin!(down);
    tokio::select! {
        _ = &mut down => {}
        r = up => {
            if let Err(e) = r {
                debug!(error = %e, "client read failed");
            }
            // Wait for the agent's CLOSE_RSP, then let the guard clean up.
            let _ = tokio::time::timeout(CLOSE_WAIT, &mut down).await;
        }
    }
    debug!("CONNECT tunnel closed");
}
