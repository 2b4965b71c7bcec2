//! Frontend clients: a gRPC `ProxyService` client (what kube-apiserver's
//! konnectivity client does, written from the protocol) and an HTTP CONNECT
//! client, over a Unix socket or mutual-TLS TCP.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use konnectivity_proto::wire::proxy_service_client::ProxyServiceClient;
use konnectivity_proto::{ids, packet, Message, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::pki::Pki;

/// A gRPC channel to a frontend Unix socket.
pub async fn grpc_uds(path: &Path) -> Channel {
    try_grpc_uds(path)
        .await
        .expect("connect to frontend socket")
}

/// A gRPC channel to a frontend Unix socket, or the connect error.
pub async fn try_grpc_uds(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// Client TLS for the frontend (our frontend certificate, or `identity`).
pub fn frontend_tls(
    pki: &Pki,
    identity: Option<(&Path, &Path)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let id = identity.or(Some((
        pki.frontend.cert.as_path(),
        pki.frontend.key.as_path(),
    )));
    konnectivity_runtime::tls::client_config(&pki.ca, id, alpn).expect("client tls")
}

/// A gRPC channel to a mutual-TLS TCP frontend.
pub async fn grpc_tls(addr: SocketAddr, pki: &Pki) -> Channel {
    let tls = tokio_rustls::TlsConnector::from(frontend_tls(pki, None, &[b"h2"]));
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls.connect(name, tcp).await?))
            }
        }))
        .await
        .expect("connect to frontend")
}

/// One tunnelled connection over a `ProxyService.Proxy` stream (one dial per
/// stream, like kube-apiserver's single-use client).
pub struct GrpcConn {
    tx: mpsc::Sender<Packet>,
    inbound: tonic::Streaming<Packet>,
    /// The connection id the agent chose.
    pub connect_id: i64,
    /// Set when a CLOSE_RSP arrived.
    pub closed: bool,
}

impl GrpcConn {
    /// Dials `address`; `Err` carries the `DIAL_RSP` error text.
    pub async fn dial(ch: &Channel, address: &str) -> Result<GrpcConn, String> {
        let mut client = ProxyServiceClient::new(ch.clone());
        let (tx, rx) = mpsc::channel(16);
        let random = ids::random_dial_id();
        tx.send(packet::dial_request(address, random))
            .await
            .expect("queue dial");
        let mut inbound = client
            .proxy(ReceiverStream::new(rx))
            .await
            .map_err(|s| format!("grpc: {s}"))?
            .into_inner();
        loop {
            let p = inbound
                .next()
                .await
                .ok_or("stream ended before DIAL_RSP")?
                .map_err(|s| format!("grpc: {s}"))?;
            match Message::from_packet(p).map_err(|e| e.to_string())? {
                Message::DialResponse {
                    random: r,
                    connect_id,
                    error,
                } if r == random => {
                    if !error.is_empty() {
                        return Err(error);
                    }
                    return Ok(GrpcConn {
                        tx,
                        inbound,
                        connect_id,
                        closed: false,
                    });
                }
                Message::CloseDial { .. } => return Err("DIAL_CLS".into()),
                _ => continue,
            }
        }
    }

    /// Sends bytes.
    pub async fn send(&self, data: impl Into<Bytes>) {
        self.tx
            .send(packet::data(self.connect_id, data.into()))
            .await
            .expect("send DATA");
    }

    /// Sends a raw packet on the stream.
    pub async fn send_packet(&self, p: Packet) {
        self.tx.send(p).await.expect("send packet");
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

    /// Sends `CLOSE_REQ` and waits (bounded) for `CLOSE_RSP`.
    pub async fn close(mut self) -> bool {
        let _ = self.tx.send(packet::close_request(self.connect_id)).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.recv().await.is_some() {}
            self.closed
        })
        .await
        .unwrap_or(false)
    }
}

/// Sends `CONNECT target` on `s` and reads the response head byte by byte (so
/// no tunnel byte is consumed). `Ok(head)` on 200, `Err((status, whole
/// response))` otherwise.
pub async fn connect_on<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: &str,
) -> Result<Vec<u8>, (u16, String)> {
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| (0, e.to_string()))?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => {
                return Err((
                    0,
                    format!("closed during head: {}", String::from_utf8_lossy(&head)),
                ))
            }
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if status == 200 {
        Ok(head)
    } else {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        Err((status, format!("{text}{}", String::from_utf8_lossy(&rest))))
    }
}

/// CONNECT through a Unix-socket frontend.
pub async fn connect_uds(path: &Path, target: &str) -> Result<UnixStream, (u16, String)> {
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|e| (0, e.to_string()))?;
    connect_on(&mut s, target).await?;
    Ok(s)
}

/// CONNECT through a mutual-TLS TCP frontend.
pub async fn connect_tls(
    addr: SocketAddr,
    pki: &Pki,
    target: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, (u16, String)> {
    let tls = tokio_rustls::TlsConnector::from(frontend_tls(pki, None, &[b"http/1.1"]));
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| (0, e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut s = tls
        .connect(name, tcp)
        .await
        .map_err(|e| (0, e.to_string()))?;
    connect_on(&mut s, target).await?;
    Ok(s)
}

/// Sends an HTTP GET on an established tunnel stream and returns the response.
pub async fn http_get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: dest\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    String::from_utf8_lossy(&out).to_string()
}

/// A hand-driven agent: opens `AgentService.Connect` with our proto crate and
/// lets the test send and receive raw packets (for pending dials that never
/// answer, bad packets, and abrupt disconnects).
pub struct FakeAgent {
    /// Packets to the server.
    pub tx: mpsc::Sender<Packet>,
    /// Packets from the server.
    pub inbound: tonic::Streaming<Packet>,
    /// Response headers.
    pub headers: tonic::metadata::MetadataMap,
}

impl FakeAgent {
    /// Connects with the PKI's agent certificate.
    pub async fn connect(server: SocketAddr, pki: &Pki, id: &str) -> Result<FakeAgent, String> {
        let tls = tokio_rustls::TlsConnector::from(frontend_tls(
            pki,
            Some((pki.agent.cert.as_path(), pki.agent.key.as_path())),
            &[b"h2"],
        ));
        let ch = Endpoint::from_shared(format!("http://{server}"))
            .expect("uri")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let tls = tls.clone();
                async move {
                    let tcp = TcpStream::connect(server).await?;
                    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tls.connect(name, tcp).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client =
            konnectivity_proto::wire::agent_service_client::AgentServiceClient::new(ch);
        let (tx, rx) = mpsc::channel(64);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("agentid", id.parse().expect("ascii"));
        let resp = client.connect(req).await.map_err(|s| s.to_string())?;
        let headers = resp.metadata().clone();
        Ok(FakeAgent {
            tx,
            inbound: resp.into_inner(),
            headers,
        })
    }

    /// The next packet from the server (None when the stream ends).
    pub async fn recv(&mut self) -> Option<Message> {
        let p = self.inbound.next().await?.ok()?;
        Message::from_packet(p).ok()
    }

    /// The next packet that is not a heartbeat/window update.
    pub async fn recv_significant(&mut self) -> Option<Message> {
        loop {
            match self.recv().await? {
                Message::Window { .. } => continue,
                m => return Some(m),
            }
        }
    }

    /// Sends a packet.
    pub async fn send(&self, p: Packet) {
        self.tx.send(p).await.expect("send");
    }
}

/// A plain HTTP GET of `path` on `addr` (health endpoints): status and body.
pub async fn http_status(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect health");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A hand-driven server for agent tests: serves `AgentService.Connect` over
/// TLS on 127.0.0.1:0, answering with `headers` (name, value) and nothing else.
pub async fn fake_server(pki: &Pki, headers: Vec<(&'static str, &'static str)>) -> SocketAddr {
    use konnectivity_proto::wire::agent_service_server::{AgentService, AgentServiceServer};
    use std::pin::Pin;

    struct Fake(Vec<(&'static str, &'static str)>);
    type Out = Pin<Box<dyn futures::Stream<Item = Result<Packet, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl AgentService for Fake {
        type ConnectStream = Out;
        async fn connect(
            &self,
            _req: tonic::Request<tonic::Streaming<Packet>>,
        ) -> Result<tonic::Response<Out>, tonic::Status> {
            let mut resp = tonic::Response::new(Box::pin(futures::stream::pending()) as Out);
            for (k, v) in &self.0 {
                resp.metadata_mut().insert(*k, v.parse().expect("ascii"));
            }
            Ok(resp)
        }
    }

    let files = konnectivity_runtime::tls::ServerTlsFiles {
        cert: pki.server.cert.clone(),
        key: pki.server.key.clone(),
        client_ca: None,
    };
    let cfg = konnectivity_runtime::tls::server_config(&files, &[b"h2"]).expect("tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // The server's own TLS accept loop (its connections carry peer info).
    let rx = proxy_server::listen::tls_incoming(
        listener,
        cfg,
        "fake",
        tokio_util::sync::CancellationToken::new(),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(Fake(headers)))
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    addr
}
