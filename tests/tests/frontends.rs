//! Requests through every frontend kind: gRPC and HTTP CONNECT, each over a
//! Unix socket and over mutual-TLS TCP; bulk transfers both ways; dial errors.

use tests::client::{self, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

async fn setup(mode: &str, listen: Listen) -> (Pki, Server, Agent) {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, mode, listen, &[]).await;
    let agent = Agent::start(&pki, server.agent_addr, "agent-1", &[]).await;
    server.wait_agents(1).await;
    (pki, server, agent)
}

async fn grpc_channel(pki: &Pki, server: &Server, listen: Listen) -> tonic::transport::Channel {
    match listen {
        Listen::Uds => client::grpc_uds(&server.uds()).await,
        Listen::Tls => client::grpc_tls(server.tcp(), pki).await,
    }
}

async fn grpc_get(listen: Listen) {
    let (pki, server, _agent) = setup("grpc", listen).await;
    let dst = dest::http("hello from the node").await;
    let ch = grpc_channel(&pki, &server, listen).await;
    let mut conn = GrpcConn::dial(&ch, &dst.to_string()).await.expect("dial");
    assert!(conn.connect_id > 0);
    conn.send(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..])
        .await
        .expect("send");
    let body = String::from_utf8(conn.read_to_end().await).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.ends_with("hello from the node"), "{body}");
    assert!(conn.closed, "destination close must arrive as CLOSE_RSP");
}

#[tokio::test]
async fn http_get_through_grpc_on_unix_socket() {
    grpc_get(Listen::Uds).await;
}

#[tokio::test]
async fn http_get_through_grpc_on_mtls_tcp() {
    grpc_get(Listen::Tls).await;
}

#[tokio::test]
async fn http_get_through_http_connect_on_unix_socket() {
    let (_pki, server, _agent) = setup("http-connect", Listen::Uds).await;
    let dst = dest::http("hello over connect").await;
    let mut s = client::connect_uds(&server.uds(), &dst.to_string())
        .await
        .expect("CONNECT");
    let resp = client::http_get(&mut s).await;
    assert!(resp.ends_with("hello over connect"), "{resp}");
}

#[tokio::test]
async fn http_get_through_http_connect_on_mtls_tcp() {
    let (pki, server, _agent) = setup("http-connect", Listen::Tls).await;
    let dst = dest::http("hello over tls connect").await;
    let mut s = client::connect_tls(server.tcp(), &pki, &dst.to_string())
        .await
        .expect("CONNECT");
    let resp = client::http_get(&mut s).await;
    assert!(resp.ends_with("hello over tls connect"), "{resp}");
}

#[tokio::test]
async fn twenty_mib_down_and_up_intact_over_grpc() {
    let (pki, server, _agent) = setup("grpc", Listen::Uds).await;
    let dst = dest::bulk("bulk").await;
    let ch = grpc_channel(&pki, &server, Listen::Uds).await;

    let mut down = GrpcConn::dial(&ch, &dst.to_string()).await.expect("dial");
    down.send(format!("GET {} 7\n", 20 * MIB))
        .await
        .expect("send");
    let got = down.read_to_end().await;
    assert_eq!(got.len(), 20 * MIB);
    assert_eq!(
        tests::sha256_hex(&got),
        tests::sha256_hex(&tests::pattern(20 * MIB, 7))
    );

    let mut up = GrpcConn::dial(&ch, &dst.to_string()).await.expect("dial");
    let data = tests::pattern(20 * MIB, 9);
    up.send(format!("PUT {}\n", data.len()))
        .await
        .expect("send");
    for chunk in data.chunks(256 * 1024) {
        up.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("send");
    }
    let answer = String::from_utf8(up.read_to_end().await).unwrap();
    assert_eq!(answer.trim(), tests::sha256_hex(&data));
}

#[tokio::test]
async fn twenty_mib_down_and_up_intact_over_http_connect() {
    let (_pki, server, _agent) = setup("http-connect", Listen::Uds).await;
    let dst = dest::bulk("bulk").await;

    let mut s = client::connect_uds(&server.uds(), &dst.to_string())
        .await
        .expect("CONNECT");
    s.write_all(format!("GET {} 3\n", 20 * MIB).as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), 20 * MIB);
    assert_eq!(
        tests::sha256_hex(&got),
        tests::sha256_hex(&tests::pattern(20 * MIB, 3))
    );

    let mut s = client::connect_uds(&server.uds(), &dst.to_string())
        .await
        .expect("CONNECT");
    let data = tests::pattern(20 * MIB, 4);
    s.write_all(format!("PUT {}\n", data.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(&data).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer.trim(), tests::sha256_hex(&data));
}

#[tokio::test]
async fn dial_to_closed_port_reports_the_agents_error() {
    let (_pki, server, agent) = setup("grpc", Listen::Uds).await;
    let closed = dest::closed_port().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let err = GrpcConn::dial(&ch, &closed.to_string())
        .await
        .err()
        .expect("must fail");
    let text = err.message().expect("the server answered").to_string();
    assert!(text.contains("connection refused"), "{text}");
    assert!(text.contains(&closed.to_string()), "{text}");
    // Our server gives the agent's reason typed, and names the agent's hop.
    assert!(
        matches!(
            err,
            client::Error::Dial {
                reason: client::DialReason::Refused,
                typed: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.hop(), client::Hop::Agent);
    assert_eq!(
        agent
            .metrics
            .endpoint_dial_failures
            .with_label_values(&["unknown"])
            .get(),
        1
    );
    assert_eq!(
        server
            .metrics
            .dial_failures
            .with_label_values(&["error_response"])
            .get(),
        1
    );
}

#[tokio::test]
async fn dial_to_closed_port_over_http_connect_is_502_with_reason() {
    let (_pki, server, _agent) = setup("http-connect", Listen::Uds).await;
    let closed = dest::closed_port().await;
    let (status, body, reason) =
        client::refused(client::connect_uds(&server.uds(), &closed.to_string()).await);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("connection refused"), "{body}");
    assert_eq!(reason, client::DialReason::Refused);
}

#[tokio::test]
async fn no_agent_is_reported_over_grpc_and_http_connect() {
    init_logs();
    let pki = Pki::new();
    let grpc = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let ch = client::grpc_uds(&grpc.uds()).await;
    let err = GrpcConn::dial(&ch, "127.0.0.1:1")
        .await
        .err()
        .expect("must fail");
    assert_eq!(err.message(), Some("No agent available"));
    assert_eq!(err.reason(), Some(client::DialReason::NoAgent));
    assert_eq!(err.hop(), client::Hop::Server);
    assert_eq!(
        grpc.metrics
            .dial_failures
            .with_label_values(&["no_agent"])
            .get(),
        1
    );

    let connect = Server::start(&pki, "http-connect", Listen::Uds, &[]).await;
    let (status, body, reason) =
        client::refused(client::connect_uds(&connect.uds(), "127.0.0.1:1").await);
    assert_eq!(status, 500, "{body}");
    assert_eq!(reason, client::DialReason::NoAgent);
    assert!(body.contains("No agent available"), "{body}");
}

#[tokio::test]
async fn connect_success_response_is_exactly_the_200_line() {
    let (_pki, server, _agent) = setup("http-connect", Listen::Uds).await;
    let dst = dest::echo().await;
    let mut s = tokio::net::UnixStream::connect(server.uds()).await.unwrap();
    let req = format!("CONNECT {dst} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let expected = b"HTTP/1.1 200 Connection Established\r\n\r\n";
    let mut head = vec![0u8; expected.len()];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..], &expected[..]);
    // Nothing else may follow before tunnel data: the first bytes after the
    // head are exactly our echo.
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
}

/// The mutual-TLS TCP frontend lets no one in without a certificate from its
/// client CA, in either mode: the handshake fails, the client is told it was
/// TLS, and the destination never sees a connection.
#[tokio::test]
async fn tcp_frontend_refuses_clients_without_a_trusted_certificate() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for (mode, m) in [
        ("grpc", client::Mode::Grpc),
        ("http-connect", client::Mode::HttpConnect),
    ] {
        let (pki, server, _agent) = setup(mode, Listen::Tls).await;
        let reached = Arc::new(AtomicUsize::new(0));
        let dst = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let reached = reached.clone();
            tokio::spawn(async move {
                while l.accept().await.is_ok() {
                    reached.fetch_add(1, Ordering::Relaxed);
                }
            });
            addr
        };
        let identities = [
            ("no certificate", None),
            (
                "a certificate from another CA",
                Some((pki.rogue.cert.as_path(), pki.rogue.key.as_path())),
            ),
        ];
        for (what, identity) in identities {
            let config = konnectivity_runtime::tls::client_config(&pki.ca, identity, &[]).unwrap();
            let transport = client::Transport::Tls {
                addr: server.tcp().to_string(),
                server_name: rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                config,
            };
            let r = client::Frontend::new(m, transport)
                .timeout(std::time::Duration::from_secs(10))
                .dial(&dst.to_string())
                .await;
            match r {
                Err(e @ client::Error::Tls { .. }) => {
                    assert_eq!(e.hop(), client::Hop::Frontend, "{mode}, {what}: {e}")
                }
                Err(e) => panic!("{mode}, {what}: want a TLS refusal, got {e:?}"),
                Ok(_) => panic!("{mode}, {what}: the frontend let the client in"),
            }
        }
        // A client with the frontend certificate gets through.
        let ok = client::Frontend::new(m, client::tls_transport(server.tcp(), &pki))
            .dial(&dst.to_string())
            .await;
        assert!(ok.is_ok(), "{mode}: {:?}", ok.err());
        tests::wait_for(
            std::time::Duration::from_secs(10),
            "the trusted client's connection",
            || reached.load(Ordering::Relaxed) == 1,
        )
        .await;
    }
}
