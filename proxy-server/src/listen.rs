//! Accept loops: TCP with TLS (handshakes run concurrently, bounded, with a
//! timeout, and every failure is logged with the peer and rustls' reason) and
//! Unix sockets. The loops survive errors: a reset or a bad handshake never
//! ends them, and running out of file descriptors backs off.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use konnectivity_proto::h2watch;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::frontend::authority::AuthorityFix;
use crate::metrics::Metrics;

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once per listener.
const MAX_HANDSHAKES: usize = 256;

/// Who is on the other end of an accepted TLS connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Peer address.
    pub remote_addr: SocketAddr,
    /// Whether the peer presented a (verified) client certificate.
    pub client_cert: bool,
}

/// An accepted, handshaken TLS connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    /// The peer.
    pub fn info(&self) -> &PeerInfo {
        &self.info
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Pauses after an accept error; longer when out of file descriptors.
pub async fn accept_backoff(role: &str, e: &io::Error) {
    let emfile = matches!(e.raw_os_error(), Some(24) | Some(23));
    if emfile {
        warn!(listener = role, error = %e, "out of file descriptors; pausing accepts");
        tokio::time::sleep(Duration::from_millis(500)).await;
    } else {
        debug!(listener = role, error = %e, "accept failed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Told about each refused TLS handshake: the peer and rustls' reason.
pub type OnRefused = Arc<dyn Fn(SocketAddr, &str) + Send + Sync>;

/// Accepts TLS connections on `listener` until `stop`, handing handshaken ones
/// to the returned queue.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<konnectivity_runtime::tls::Reloading<rustls::ServerConfig>>,
    role: &'static str,
    stop: CancellationToken,
    on_refused: Option<OnRefused>,
) -> mpsc::Receiver<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote_addr) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { accept_backoff(role, &e).await; continue; }
                },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            // Certificates rotated on disk apply from the next handshake.
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            let on_refused = on_refused.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let client_cert = tls.get_ref().1.peer_certificates().is_some();
                        let conn = TlsConn {
                            inner: tls,
                            info: PeerInfo {
                                remote_addr,
                                client_cert,
                            },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    // Closed before a ClientHello: a TCP probe (load balancer,
                    // tcpSocket health check), not a refused peer.
                    Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        debug!(listener = role, peer = %remote_addr, error = %e, "connection closed before the TLS handshake");
                    }
                    Ok(Err(e)) => {
                        warn!(listener = role, peer = %remote_addr, error = %e, "TLS handshake failed; connection refused");
                        if let Some(f) = &on_refused {
                            f(remote_addr, &format!("TLS handshake failed: {e}"));
                        }
                    }
                    Err(_) => {
                        warn!(listener = role, peer = %remote_addr, "TLS handshake timed out");
                        if let Some(f) = &on_refused {
                            f(remote_addr, "TLS handshake timed out");
                        }
                    }
                }
            });
        }
    });
    rx
}

/// Accepts gRPC clients on a Unix socket until `stop`, each wrapped in
/// [`AuthorityFix`] (kube-apiserver sends the socket path as `:authority`).
pub fn unix_grpc_incoming(
    listener: tokio::net::UnixListener,
    stop: CancellationToken,
) -> mpsc::Receiver<Result<AuthorityFix<tokio::net::UnixStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { accept_backoff("frontend", &e).await; continue; }
                },
            };
            if tx.send(Ok(AuthorityFix::new(sock))).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// An accepted connection whose HTTP/2 frames are watched both ways
/// ([`konnectivity_proto::h2watch`]): when the HTTP/2 library ends it with an
/// error `GOAWAY` (rapid stream resets, an endless header block, a protocol
/// violation), the `:authority` rewriter refuses its header block, or the
/// peer floods `PING` or `SETTINGS` frames (and is cut off here), the server
/// says so in its log, with the peer and the reason, and counts it in
/// `http2_connection_errors_total{listener,reason}`.
pub struct Watched<S> {
    inner: S,
    output: h2watch::FrameScanner,
    input: h2watch::FrameScanner,
    floods: h2watch::ControlFloods,
    /// Set once the peer was cut off: every later read fails.
    cut_off: Option<h2watch::Flood>,
    listener: &'static str,
    peer: String,
    metrics: Metrics,
}

impl<S> Watched<S> {
    /// Watches `inner`, a connection of `listener` from `peer`.
    pub fn new(inner: S, listener: &'static str, peer: String, metrics: Metrics) -> Self {
        Self {
            inner,
            output: h2watch::FrameScanner::server_output(),
            input: h2watch::FrameScanner::client_input(),
            floods: h2watch::ControlFloods::new(Instant::now()),
            cut_off: None,
            listener,
            peer,
            metrics,
        }
    }

    fn error(&self, reason: &str) {
        self.metrics
            .http2_errors
            .with_label_values(&[self.listener, reason])
            .inc();
    }
}

fn flood_error(f: h2watch::Flood) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: control frames past the budget", f.as_str()),
    )
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Watched<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(f) = this.cut_off {
            return Poll::Ready(Err(flood_error(f)));
        }
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        if let Err(e) = &r {
            // The `:authority` rewriter refuses a header block past its
            // bounds (an endless CONTINUATION chain, an HPACK bomb).
            if e.kind() == io::ErrorKind::InvalidData {
                this.error("INVALID_HEADER_BLOCK");
                warn!(
                    listener = this.listener,
                    peer = %this.peer,
                    error = %e,
                    "HTTP/2 connection ended by the server: invalid header block"
                );
            }
            return Poll::Ready(r);
        }
        let (floods, cut_off) = (&mut this.floods, &mut this.cut_off);
        this.input.scan(&buf.filled()[before..], |seen| {
            if let h2watch::Seen::Frame { kind, flags } = seen {
                if cut_off.is_none() && (kind == h2watch::PING || kind == h2watch::SETTINGS) {
                    *cut_off = floods.received(kind, flags, Instant::now());
                }
            }
        });
        if let Some(f) = this.cut_off {
            this.error(f.as_str());
            warn!(
                listener = this.listener,
                peer = %this.peer,
                reason = f.as_str(),
                "HTTP/2 connection ended by the server: the peer floods control frames (cut off)"
            );
            return Poll::Ready(Err(flood_error(f)));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        let mut goaways = Vec::new();
        let floods = &mut this.floods;
        this.output.scan(&buf[..n], |seen| match seen {
            h2watch::Seen::Frame { kind, .. } => floods.sent(kind),
            h2watch::Seen::Goaway(code) if code != h2watch::NO_ERROR => goaways.push(code),
            h2watch::Seen::Goaway(_) => {}
        });
        for code in goaways {
            let reason = h2watch::reason(code);
            this.error(reason);
            warn!(
                listener = this.listener,
                peer = %this.peer,
                reason,
                "HTTP/2 connection ended by the server for a protocol error (GOAWAY)"
            );
        }
        Poll::Ready(Ok(n))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
