//! Bad input gets a clear answer and costs nothing else: garbage on the agent
//! port and on the frontend socket, requests that are not CONNECT, packets for
//! unknown connections, malformed packets. After each, a real tunnel works.

use std::time::Duration;

use bytes::Bytes;
use konnectivity_proto::{packet, Message, Packet, PacketType};
use tests::client::{self, FakeAgent, GrpcConn};
use tests::inproc::{Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const GARBAGE: &[u8] =
    b"\x00\xff\x16\x03\x01 this is not TLS, HTTP/2 or HTTP at all \r\n\r\n\xde\xad\xbe\xef";

async fn works_over_grpc(server: &Server) {
    let dst = dest::http("still fine").await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut c = GrpcConn::dial(&ch, &dst.to_string()).await.expect("dial");
    c.send(&b"GET / HTTP/1.1\r\n\r\n"[..]).await.expect("send");
    let body = String::from_utf8(c.read_to_end().await).unwrap();
    assert!(body.ends_with("still fine"), "{body}");
}

/// Reads until the peer closes (or 10 s); returns what arrived.
async fn drain<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn garbage_on_the_agent_port_and_frontend_socket_is_dropped() {
    init_logs();
    let pki = Pki::new();
    let (server, _agent) = tests::inproc::pair(&pki, "grpc", &[], &[]).await;

    let mut t = TcpStream::connect(server.agent_addr).await.unwrap();
    t.write_all(GARBAGE).await.unwrap();
    drain(&mut t).await;

    let mut u = UnixStream::connect(server.uds()).await.unwrap();
    u.write_all(GARBAGE).await.unwrap();
    drain(&mut u).await;

    works_over_grpc(&server).await;
    assert_eq!(server.metrics.ready_backend_connections.get(), 1);
}

#[tokio::test]
async fn http_connect_refuses_other_methods_and_garbage_with_a_status() {
    init_logs();
    let pki = Pki::new();
    let (server, _agent) = tests::inproc::pair(&pki, "http-connect", &[], &[]).await;

    let mut u = UnixStream::connect(server.uds()).await.unwrap();
    u.write_all(b"GET http://10.0.0.5:10250/ HTTP/1.1\r\nHost: 10.0.0.5\r\n\r\n")
        .await
        .unwrap();
    let resp = String::from_utf8_lossy(&drain(&mut u).await).to_string();
    assert!(resp.starts_with("HTTP/1.1 405 "), "{resp}");
    assert!(resp.contains("only CONNECT"), "{resp}");

    let mut u = UnixStream::connect(server.uds()).await.unwrap();
    u.write_all(GARBAGE).await.unwrap();
    let resp = String::from_utf8_lossy(&drain(&mut u).await).to_string();
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");

    let mut u = UnixStream::connect(server.uds()).await.unwrap();
    u.write_all(b"CONNECT no-port-here HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let resp = String::from_utf8_lossy(&drain(&mut u).await).to_string();
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");

    let dst = dest::http("connect still fine").await;
    let mut s = client::connect_uds(&server.uds(), &dst.to_string())
        .await
        .expect("CONNECT");
    assert!(client::http_get(&mut s)
        .await
        .ends_with("connect still fine"));
}

#[tokio::test]
async fn frontend_packets_for_unknown_connections_are_answered_and_harmless() {
    init_logs();
    let pki = Pki::new();
    let (server, _agent) = tests::inproc::pair(&pki, "grpc", &[], &[]).await;
    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut c = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");

    // DATA for a connection this stream does not have: ignored and counted.
    c.send_packet(packet::data(
        c.connect_id + 1000,
        Bytes::from_static(b"stray"),
    ))
    .await
    .expect("send");
    // A packet whose type and payload disagree: ignored and counted.
    let mut bad = packet::data(c.connect_id, Bytes::from_static(b"x"));
    bad.r#type = PacketType::CloseReq as i32;
    c.send_packet(bad).await.expect("send");
    // An unknown packet type: ignored.
    c.send_packet(Packet {
        r#type: 42,
        payload: None,
    })
    .await
    .expect("send");
    // CLOSE_REQ for an unknown connection: answered with the reference error.
    c.send_packet(packet::close_request(c.connect_id + 2000))
        .await
        .expect("send");

    // The real connection still echoes.
    c.send(&b"ping"[..]).await.expect("send");
    let got = c.recv().await.expect("echo");
    assert_eq!(&got[..], b"ping");
    assert_eq!(
        server
            .metrics
            .unknown_packets
            .with_label_values(&["DATA"])
            .get(),
        1
    );
    assert_eq!(
        server
            .metrics
            .bad_packets
            .with_label_values(&["frontend"])
            .get(),
        1
    );
}

#[tokio::test]
async fn unknown_close_request_gets_the_reference_error() {
    init_logs();
    let pki = Pki::new();
    let (server, _agent) = tests::inproc::pair(&pki, "grpc", &[], &[]).await;
    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let c = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
    let mut raw = konnectivity_proto::wire::proxy_service_client::ProxyServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(packet::close_request(424242)).await.unwrap();
    let mut inbound = raw
        .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let p = tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut inbound),
    )
    .await
    .expect("answer")
    .expect("packet")
    .expect("ok");
    assert_eq!(
        Message::from_packet(p).unwrap(),
        Message::CloseResponse {
            connect_id: 424242,
            error: "Unknown connectID".into()
        }
    );
    assert!(c.close().await);
}

#[tokio::test]
async fn agent_data_for_unknown_connection_is_closed_and_others_keep_working() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let mut fake = FakeAgent::connect(server.agent_addr, &pki, "confused")
        .await
        .expect("fake");
    server.wait_agents(1).await;
    fake.send(packet::data(31337, Bytes::from_static(b"who am i")))
        .await;
    match fake.recv_significant().await {
        Some(Message::CloseRequest { connect_id }) => assert_eq!(connect_id, 31337),
        other => panic!("expected CLOSE_REQ for the unknown id, got {other:?}"),
    }
    // Malformed packet from the agent: counted and ignored, the stream stays.
    let mut bad = packet::dial_ok(1, 1);
    bad.r#type = PacketType::Data as i32;
    fake.send(bad).await;
    // The same stream still serves a dial end to end.
    let ch = client::grpc_uds(&server.uds()).await;
    let dial = tokio::spawn(async move { GrpcConn::dial(&ch, "10.1.1.1:80").await });
    let Some(Message::DialRequest { random, .. }) = fake.recv_significant().await else {
        panic!("expected DIAL_REQ");
    };
    fake.send(packet::dial_ok(random, 9)).await;
    let conn = dial.await.unwrap().expect("dial through the fake agent");
    assert_eq!(conn.connect_id, 9);
    assert_eq!(
        server
            .metrics
            .bad_packets
            .with_label_values(&["agent"])
            .get(),
        1
    );
    assert_eq!(server.metrics.ready_backend_connections.get(), 1);
}

async fn next_message(inbound: &mut tonic::Streaming<Packet>) -> Message {
    let p = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(inbound))
        .await
        .expect("answer");
    Message::from_packet(p.expect("packet").expect("ok")).unwrap()
}

/// connectIDs are unique per agent stream only. Two dials on one frontend
/// stream that land on two agents answering the same id must not cross: the
/// second is refused and closed on its agent, the first keeps working.
#[tokio::test]
async fn colliding_connect_ids_on_one_frontend_stream_do_not_cross() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let a = FakeAgent::connect(server.agent_addr, &pki, "fake-a")
        .await
        .expect("a");
    let b = FakeAgent::connect(server.agent_addr, &pki, "fake-b")
        .await
        .expect("b");
    server.wait_agents(2).await;
    let mut agents = [a, b];
    let ch = client::grpc_uds(&server.uds()).await;
    let mut raw = konnectivity_proto::wire::proxy_service_client::ProxyServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(packet::dial_request("10.9.9.1:80", 1001))
        .await
        .unwrap();
    let mut inbound = raw
        .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Whichever agent got the first dial is `i`; the second dial goes to the other.
    let (i, first) = {
        let [a, b] = &mut agents;
        tokio::select! {
            m = a.recv_significant() => (0, m),
            m = b.recv_significant() => (1, m),
        }
    };
    let j = 1 - i;
    assert!(
        matches!(first, Some(Message::DialRequest { random: 1001, .. })),
        "{first:?}"
    );
    tx.send(packet::dial_request("10.9.9.2:80", 1002))
        .await
        .unwrap();
    let second = agents[j].recv_significant().await;
    assert!(
        matches!(second, Some(Message::DialRequest { random: 1002, .. })),
        "{second:?}"
    );

    agents[i].send(packet::dial_ok(1001, 7)).await;
    assert_eq!(
        next_message(&mut inbound).await,
        Message::DialResponse {
            random: 1001,
            connect_id: 7,
            error: String::new(),
            reason: None,
        }
    );
    agents[j].send(packet::dial_ok(1002, 7)).await;
    match next_message(&mut inbound).await {
        Message::DialResponse {
            random: 1002,
            connect_id: 0,
            error,
            ..
        } => {
            assert!(error.contains("already in use"), "{error}")
        }
        other => panic!("expected the second dial refused, got {other:?}"),
    }
    match agents[j].recv_significant().await {
        Some(Message::CloseRequest { connect_id: 7 }) => {}
        other => panic!("expected CLOSE_REQ for the refused connection, got {other:?}"),
    }
    // The first connection still carries data to its own agent.
    tx.send(packet::data(7, bytes::Bytes::from_static(b"to the first")))
        .await
        .unwrap();
    match agents[i].recv_significant().await {
        Some(Message::Data {
            connect_id: 7,
            data,
        }) => assert_eq!(&data[..], b"to the first"),
        other => panic!("expected DATA on the first agent, got {other:?}"),
    }
}
