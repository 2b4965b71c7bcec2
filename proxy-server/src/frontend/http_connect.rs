//! HTTP CONNECT frontend (`--mode=http-connect`), over a Unix socket or
//! mutual-TLS TCP. One CONNECT per client connection, answered exactly as the
//! reference does: `HTTP/1.1 200 Connection Established\r\n\r\n` and nothing
//! more before tunnel data; 405, 500, 502, 503, 504 by cause otherwise.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use konnectivity_proto::connect::{self, Parsed};
use konnectivity_proto::ids;
use konnectivity_relay::{self as relay, Buffered, ChunkReader};
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
    serve_inner(sock, registry, &metrics).instrument(span).await;
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

async fn serve_inner<S: ClientConn>(sock: S, registry: Arc<AgentRegistry>, metrics: &Metrics) {
    // Boxed: the request and dial state is freed once the tunnel is open, so
    // the long-lived task is only as large as the relay.
    let Some((sock, tunnel, early)) = Box::pin(open(sock, registry, metrics)).await else {
        return;
    };
    relay(sock, tunnel, early).await;
}

/// Reads the CONNECT request and dials; answers errors itself. Returns the
/// socket, the tunnel, and any bytes the client sent after the request head.
async fn open<S: ClientConn>(
    mut sock: S,
    registry: Arc<AgentRegistry>,
    metrics: &Metrics,
) -> Option<(S, Tunnel, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let parsed = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut sock, &mut buf)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            debug!(error = e, "no CONNECT request");
            return None;
        }
        Err(_) => {
            // A client that trickles its head (one byte a second) holds a
            // task and a buffer; it gets HEAD_TIMEOUT in all, not per byte.
            metrics
                .peers_cut_off
                .with_label_values(&["frontend", "slow_request"])
                .inc();
            warn!(
                timeout = ?HEAD_TIMEOUT,
                received = buf.len(),
                "CONNECT request head not complete in time; closing"
            );
            let _ = sock
                .write_all(&connect::error_response(
                    408,
                    "request head not complete in time",
                ))
                .await;
            let _ = sock.shutdown().await;
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
            let r = relay::socket_to_tunnel(reader, tx.credit(), |b: Bytes| {
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
        let r = relay::tunnel_to_socket(&mut rx, &mut writer).await;
        if let Err(e) = &r {
            debug!(error = %e, "client write failed");
        }
        r
    };
    tokio::pin!(down, up);
    tokio::select! {
        r = &mut down => if r.is_err() {
            // The client reset the connection: what it sent before that is
            // still in our socket and goes to the agent first (bounded).
            let _ = tokio::time::timeout(CLOSE_WAIT, &mut up).await;
        },
        r = &mut up => {
            if let Err(e) = r {
                debug!(error = %e, "client read failed");
            }
            // Wait for the agent's CLOSE_RSP, then let the guard clean up.
            let _ = tokio::time::timeout(CLOSE_WAIT, &mut down).await;
        }
    }
    debug!("CONNECT tunnel closed");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::strategy::Strategy;
    use tokio::time::Instant;

    /// Slowloris: the head arrives one byte a second and never ends. The
    /// client is answered 408 and closed at HEAD_TIMEOUT from its first
    /// byte, counted and logged (paused time: no real wait).
    #[tokio::test(start_paused = true)]
    async fn a_head_trickling_one_byte_a_second_is_cut_off_at_the_head_timeout() {
        let metrics = Metrics::new();
        let registry = Arc::new(AgentRegistry::new(
            vec![Strategy::Default],
            Duration::from_secs(10),
            metrics.clone(),
        ));
        let (client, server) = UnixStream::pair().unwrap();
        let served = tokio::spawn(serve_conn(server, "slow".into(), registry, metrics.clone()));
        let (mut rd, mut wr) = client.into_split();
        let head = b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\nX-Slow: ";
        let trickle = tokio::spawn(async move {
            for b in head.iter().chain(std::iter::repeat(&b'a')) {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let start = Instant::now();
        let mut answer = Vec::new();
        rd.read_to_end(&mut answer).await.unwrap();
        let took = start.elapsed();
        assert!(
            took >= HEAD_TIMEOUT && took < HEAD_TIMEOUT + Duration::from_secs(2),
            "closed after {took:?}"
        );
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        served.await.unwrap();
        trickle.abort();
        assert_eq!(
            metrics
                .peers_cut_off
                .with_label_values(&["frontend", "slow_request"])
                .get(),
            1
        );
        assert_eq!(
            metrics
                .frontend_connections
                .with_label_values(&["http-connect"])
                .get(),
            0
        );
    }
}
