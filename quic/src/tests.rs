//! The hello and the dial framing between two real QUIC endpoints on
//! loopback.

use super::*;
use konnectivity_proto::{packet, Message};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

fn tls() -> (rustls::ServerConfig, rustls::ClientConfig) {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der: CertificateDer<'static> = c.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (server, client)
}

async fn pair() -> (quinn::Connection, quinn::Connection, quinn::Endpoint) {
    let (server_tls, client_tls) = tls();
    let server = quinn::Endpoint::server(
        server_config(&server_tls).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = client
        .connect_with(
            client_config(&client_tls).unwrap(),
            server.local_addr().unwrap(),
            "localhost",
        )
        .unwrap();
    let (c, s) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
    (c.unwrap(), s.unwrap(), server)
}

#[tokio::test]
async fn a_hello_with_a_ticket_is_answered_and_a_dial_frame_round_trips() {
    let (agent, server, _endpoint) = pair().await;
    let ticket = new_ticket();
    assert_eq!(ticket.len(), 32);
    let t = ticket.clone();
    let serving = tokio::spawn(async move {
        let (got, answer) = read_hello(&server).await.unwrap();
        assert_eq!(got, t);
        accept(answer).await.unwrap();
        // The server's dial on its own stream.
        let (mut send, mut recv) = server.open_bi().await.unwrap();
        write_packet(&mut send, packet::dial_request("10.0.0.1:443", 7))
            .await
            .unwrap();
        let answer = Message::from_packet(read_packet(&mut recv).await.unwrap()).unwrap();
        assert!(matches!(
            answer,
            Message::DialResponse {
                random: 7,
                connect_id: 1,
                ..
            }
        ));
        send.write_all(b"ping").await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(16).await.unwrap()
    });
    hello(&agent, &ticket).await.unwrap();
    let (mut send, mut recv) = agent.accept_bi().await.unwrap();
    let req = Message::from_packet(read_packet(&mut recv).await.unwrap()).unwrap();
    let Message::DialRequest {
        address, random, ..
    } = req
    else {
        panic!("{req:?}")
    };
    assert_eq!((address.as_str(), random), ("10.0.0.1:443", 7));
    write_packet(&mut send, packet::dial_ok(7, 1))
        .await
        .unwrap();
    assert_eq!(recv.read_to_end(16).await.unwrap(), b"ping");
    send.write_all(b"pong").await.unwrap();
    send.finish().unwrap();
    assert_eq!(serving.await.unwrap(), b"pong");
}

#[tokio::test]
async fn a_refused_hello_says_why_and_bad_frames_are_errors() {
    let (agent, server, _endpoint) = pair().await;
    let closing = server.clone();
    tokio::spawn(async move {
        let _ = read_hello(&closing).await;
        closing.close(CloseCode::UnknownTicket.code(), b"unknown ticket");
    });
    match hello(&agent, &new_ticket()).await {
        Err(Error::Refused(why)) => assert_eq!(why, "unknown ticket"),
        other => panic!("{other:?}"),
    }

    // A frame announcing more than MAX_FRAME, and one that is not a packet.
    let (agent, server, _endpoint) = pair().await;
    tokio::spawn(async move {
        for frame in [
            ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec(),
            [3u32.to_be_bytes().to_vec(), vec![0xff, 0xff, 0xff]].concat(),
        ] {
            let (mut send, _recv) = server.open_bi().await.unwrap();
            send.write_all(&frame).await.unwrap();
            send.finish().unwrap();
            send.stopped().await.ok();
        }
    });
    for _ in 0..2 {
        let (_send, mut recv) = agent.accept_bi().await.unwrap();
        assert!(matches!(read_packet(&mut recv).await, Err(Error::Frame(_))));
    }
}
