//! Frontend clients for the tests: the `konnectivity-client` library with the
//! test PKI's credentials, plus hand-driven peers (a fake agent, a fake
//! server) and small HTTP helpers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
pub use konnectivity_client::{
    channel, connect_on, DialReason, Error, Frontend, GrpcConn, Hop, Mode, Transport, Tunnel,
};
use konnectivity_proto::{Message, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::pki::Pki;

/// Per-stage limit of the test clients.
const LIMIT: Duration = Duration::from_secs(30);

/// A gRPC channel to a frontend Unix socket.
pub async fn grpc_uds(path: &Path) -> Channel {
    channel(&Transport::Unix(path.to_owned()), LIMIT)
        .await
        .expect("connect to frontend socket")
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

/// The mutual-TLS transport to a TCP frontend with the frontend certificate.
pub fn tls_transport(addr: SocketAddr, pki: &Pki) -> Transport {
    Transport::Tls {
        addr: addr.to_string(),
        server_name: rustls::pki_types::ServerName::try_from("localhost").expect("name"),
        config: frontend_tls(pki, None, &[]),
    }
}

/// A gRPC channel to a mutual-TLS TCP frontend.
pub async fn grpc_tls(addr: SocketAddr, pki: &Pki) -> Channel {
    channel(&tls_transport(addr, pki), LIMIT)
        .await
        .expect("connect to frontend")
}

/// CONNECT through a Unix-socket frontend.
pub async fn connect_uds(path: &Path, target: &str) -> Result<Tunnel, Error> {
    Frontend::new(Mode::HttpConnect, Transport::Unix(path.to_owned()))
        .dial(target)
        .await
}

/// CONNECT through a mutual-TLS TCP frontend.
pub async fn connect_tls(addr: SocketAddr, pki: &Pki, target: &str) -> Result<Tunnel, Error> {
    Frontend::new(Mode::HttpConnect, tls_transport(addr, pki))
        .dial(target)
        .await
}

/// The status and text of a failed CONNECT (panics on any other outcome).
pub fn refused(r: Result<Tunnel, Error>) -> (u16, String, DialReason) {
    match r {
        Err(Error::Dial {
            status: Some(status),
            message,
            reason,
            ..
        }) => (status, message, reason),
        Err(e) => panic!("expected a refused dial, got: {e}"),
        Ok(_) => panic!("expected a refused dial, got a tunnel"),
    }
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
    let cfg = konnectivity_runtime::tls::Reloading::server("fake", &files, &[b"h2"]).expect("tls");
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
        None,
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(Fake(headers)))
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    addr
}
