//! gRPC mode: one `ProxyService.Proxy` stream per dial, as kube-apiserver's
//! single-use client opens them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use konnectivity_proto::wire::proxy_service_client::ProxyServiceClient;
use konnectivity_proto::{ids, metadata, packet, DialReason, Message, Packet};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{open, tls_cause, within, Error, Mode, Stage, Transport};

/// Packets queued towards the server on one stream.
const OUT_QUEUE: usize = 16;
/// Bytes buffered between a [`GrpcStream`] and its connection.
const STREAM_BUFFER: usize = 64 * 1024;
/// How long a close waits for the server's `CLOSE_RSP`.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// An HTTP/2 channel to the frontend. Each [`GrpcConn::dial`] opens one
/// stream on it; a channel may carry many.
pub async fn channel(transport: &Transport, limit: Duration) -> Result<Channel, Error> {
    let t = transport.clone();
    let target = transport.target();
    // tonic keeps a connector's error behind its own; the slot keeps ours.
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None::<Error>));
    let slot = failed.clone();
    let ch = Endpoint::from_static("http://konnectivity-server")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (t, slot) = (t.clone(), slot.clone());
            async move {
                match open(&t, b"h2", limit).await {
                    Ok(io) => Ok(hyper_util::rt::TokioIo::new(io)),
                    Err(e) => {
                        let text = e.to_string();
                        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        Err(std::io::Error::other(text))
                    }
                }
            }
        }))
        .await;
    ch.map_err(|e| {
        let ours = failed.lock().unwrap_or_else(|p| p.into_inner()).take();
        ours.unwrap_or_else(|| Error::Protocol {
            target,
            mode: Mode::Grpc,
            detail: e.to_string(),
        })
    })
}

/// Proves that a gRPC server answers on `ch`: a call of a method no server
/// serves comes back `UNIMPLEMENTED` from ours and from the reference alike,
/// without dialing anything or leaving a trace in the server's log.
pub(crate) async fn probe(ch: Channel) -> Result<(), Error> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tls_or_protocol(Some(&e), || e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/konnectivity.Diagnose/Probe");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc.unary(tonic::Request::new(()), path, codec).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
        Err(s) => Err(status_error(&s)),
    }
}

/// A gRPC status as our error: a rustls failure inside it is a TLS error
/// (the server refused our certificate), anything else a protocol error.
fn status_error(s: &tonic::Status) -> Error {
    use std::error::Error as _;
    tls_or_protocol(s.source(), || format!("{:?}: {}", s.code(), s.message()))
}

/// A TLS error when rustls' refusal is somewhere in `cause`'s chain, else a
/// protocol error saying `detail`.
fn tls_or_protocol(
    cause: Option<&(dyn std::error::Error + 'static)>,
    detail: impl FnOnce() -> String,
) -> Error {
    match cause.and_then(tls_cause) {
        Some(detail) => Error::Tls {
            target: "proxy-server".into(),
            detail,
        },
        None => Error::Protocol {
            target: "proxy-server".into(),
            mode: Mode::Grpc,
            detail: detail(),
        },
    }
}

/// One tunnelled connection over a `ProxyService.Proxy` stream.
pub struct GrpcConn {
    tx: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
    /// The connection id the agent chose.
    pub connect_id: i64,
    /// Set when a `CLOSE_RSP` arrived.
    pub closed: bool,
}

/// The connection is closed.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("tunnelled connection closed")]
pub struct Closed;

impl GrpcConn {
    /// Dials `address` on a new stream of `ch`, waiting up to 30 s for the
    /// answer.
    pub async fn dial(ch: &Channel, address: &str) -> Result<GrpcConn, Error> {
        Self::dial_within(ch, address, Duration::from_secs(30)).await
    }

    /// Dials `address`, waiting up to `limit` for the server's answer.
    pub async fn dial_within(
        ch: &Channel,
        address: &str,
        limit: Duration,
    ) -> Result<GrpcConn, Error> {
        within(limit, Stage::Dial, Self::dial_inner(ch, address)).await
    }

    async fn dial_inner(ch: &Channel, address: &str) -> Result<GrpcConn, Error> {
        let mut client = ProxyServiceClient::new(ch.clone());
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let random = ids::random_dial_id();
        // Room for one packet: cannot fail on a fresh channel.
        let _ = tx.try_send(packet::dial_request(address, random));
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut().insert(
            metadata::FEATURES,
            tonic::metadata::MetadataValue::from_static(metadata::FEATURE_DIAL_REASON),
        );
        let mut inbound = client
            .proxy(req)
            .await
            .map_err(|s| status_error(&s))?
            .into_inner();
        loop {
            let p = inbound
                .next()
                .await
                .ok_or_else(|| Error::Protocol {
                    target: "proxy-server".into(),
                    mode: Mode::Grpc,
                    detail: "stream ended before DIAL_RSP".into(),
                })?
                .map_err(|s| status_error(&s))?;
            let m = Message::from_packet(p).map_err(|e| Error::Protocol {
                target: "proxy-server".into(),
                mode: Mode::Grpc,
                detail: format!("malformed packet: {e}"),
            })?;
            match m {
                Message::DialResponse {
                    random: r,
                    connect_id,
                    error,
                    reason,
                } if r == random => {
                    if error.is_empty() && connect_id != 0 {
                        return Ok(GrpcConn {
                            tx,
                            inbound,
                            connect_id,
                            closed: false,
                        });
                    }
                    return Err(Error::Dial {
                        address: address.to_string(),
                        reason: reason.unwrap_or_else(|| DialReason::from_text(&error)),
                        typed: reason.is_some(),
                        message: error,
                        status: None,
                    });
                }
                Message::CloseDial { random: r } if r == random => {
                    return Err(Error::Dial {
                        address: address.to_string(),
                        message: "the server closed the dial (DIAL_CLS)".into(),
                        reason: DialReason::Other,
                        typed: false,
                        status: None,
                    })
                }
                _ => continue,
            }
        }
    }

    /// Sends bytes.
    pub async fn send(&self, data: impl Into<Bytes>) -> Result<(), Closed> {
        self.tx
            .send(packet::data(self.connect_id, data.into()))
            .await
            .map_err(|_| Closed)
    }

    /// Sends a raw packet on the stream (tests of bad input use it).
    pub async fn send_packet(&self, p: Packet) -> Result<(), Closed> {
        self.tx.send(p).await.map_err(|_| Closed)
    }

    /// The next bytes, or `None` when the connection or stream closed.
    pub async fn recv(&mut self) -> Option<Bytes> {
        loop {
            let p = self.inbound.next().await?.ok()?;
            match Message::from_packet(p).ok()? {
                Message::Data { data, .. } => return Some(data),
                Message::CloseResponse { connect_id, .. } if connect_id == self.connect_id => {
                    self.closed = true;
                    return None;
                }
                _ => continue,
            }
        }
    }

    /// Reads until the connection closes.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(d) = self.recv().await {
            out.extend_from_slice(&d);
        }
        out
    }

    /// Sends `CLOSE_REQ` and waits (bounded) for `CLOSE_RSP`; true if it came.
    pub async fn close(mut self) -> bool {
        let _ = self.tx.send(packet::close_request(self.connect_id)).await;
        tokio::time::timeout(CLOSE_WAIT, async {
            while self.recv().await.is_some() {}
            self.closed
        })
        .await
        .unwrap_or(false)
    }

    /// The connection as a byte stream (a task moves the bytes; dropping or
    /// shutting down the stream closes the connection).
    pub fn into_stream(self) -> GrpcStream {
        let (ours, theirs) = tokio::io::duplex(STREAM_BUFFER);
        tokio::spawn(pump(self, theirs));
        GrpcStream { inner: ours }
    }
}

/// Moves bytes between a connection and the far end of a duplex pipe.
async fn pump(mut conn: GrpcConn, pipe: DuplexStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(pipe);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(n) if n > 0 => {
                    if conn.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        break;
                    }
                }
                // The user closed or dropped the stream.
                _ => {
                    conn.close().await;
                    return;
                }
            },
            d = conn.recv() => match d {
                Some(d) => {
                    if wr.write_all(&d).await.is_err() {
                        conn.close().await;
                        return;
                    }
                }
                None => break,
            },
        }
    }
    let _ = wr.shutdown().await;
}

/// A tunnelled gRPC connection as an `AsyncRead + AsyncWrite` stream.
pub struct GrpcStream {
    inner: DuplexStream,
}

impl AsyncRead for GrpcStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
