//! The QUIC transport between our own agent and server, end to end: real
//! QUIC connections on loopback UDP, real destinations, both frontends.
//!
//! - Our agent and server tie a QUIC connection to the agent's stream and
//!   every connection travels on a QUIC stream of its own (counted by
//!   transport on both sides); bytes arrive intact both ways and every
//!   connection is counted out when it closes.
//! - Without an offer (a server with QUIC turned off, as for a reference
//!   server) the agent stays on the gRPC stream; an agent told
//!   `--transport=quic` refuses such a server; `--transport=grpc` never asks.
//! - UDP that does not get through (the agent reaches the server's TCP port
//!   through a balancer on another address, where no UDP endpoint listens):
//!   the agent says so, stays on gRPC, and its dials work.
//! - Strangers on the UDP port: garbage datagrams, a QUIC client with a
//!   certificate from another CA, one with a valid certificate and a ticket
//!   that names no stream, one that never says hello. Each is refused and
//!   counted; the agent's connections keep working over QUIC meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use tests::balancer::Balancer;
use tests::client::{self, GrpcConn};
use tests::inproc::{pair, Agent, Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;

fn dials(server: &Server, transport: &str) -> u64 {
    server.metrics.dials.with_label_values(&[transport]).get()
}

/// Waits until no connection is open on either side.
async fn all_closed(server: &Server, agent: &Agent) {
    let (s, a) = (server.metrics.clone(), agent.metrics.clone());
    tests::wait_for(Duration::from_secs(10), "every connection closed", || {
        s.established_connections.get() == 0 && a.open_endpoint_connections.get() == 0
    })
    .await;
}

/// One echo round trip of `msg` through an HTTP CONNECT frontend on `uds`.
async fn echo_round_trip(uds: &std::path::Path, echo: SocketAddr, msg: &[u8]) {
    let mut s = client::connect_uds(uds, &echo.to_string())
        .await
        .expect("CONNECT");
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

/// An echo round trip and a 20 MiB download and upload through an HTTP
/// CONNECT frontend on `uds`.
async fn connect_traffic(uds: &std::path::Path) {
    let (echo, bulk) = (dest::echo().await, dest::bulk("bulk").await);
    echo_round_trip(uds, echo, b"over quic").await;

    let mut s = client::connect_uds(uds, &bulk.to_string())
        .await
        .expect("CONNECT");
    s.write_all(format!("GET {} 5\n", 20 * MIB).as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(
        tests::sha256_hex(&got),
        tests::sha256_hex(&tests::pattern(20 * MIB, 5))
    );

    let mut s = client::connect_uds(uds, &bulk.to_string())
        .await
        .expect("CONNECT");
    let data = tests::pattern(20 * MIB, 6);
    s.write_all(format!("PUT {}\n", data.len()).as_bytes())
        .await
        .unwrap();
    s.write_all(&data).await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer.trim(), tests::sha256_hex(&data));
}

#[tokio::test]
async fn connections_travel_on_quic_streams_of_their_own_through_both_frontends() {
    init_logs();
    let pki = Pki::new();

    // HTTP CONNECT.
    let (server, agent) = pair(&pki, "http-connect", &[], &[]).await;
    server.wait_quic(1).await;
    assert_eq!(agent.metrics.quic_connections.get(), 1);
    connect_traffic(&server.uds()).await;
    assert_eq!(dials(&server, "quic"), 3);
    assert_eq!(dials(&server, "grpc"), 0);
    assert_eq!(
        agent.metrics.dials.with_label_values(&["quic"]).get(),
        3,
        "the agent served them on QUIC streams"
    );
    all_closed(&server, &agent).await;

    // gRPC frontend: ten connections open at once, each its own stream; a
    // refused dial is answered with its reason.
    let (server, agent) = pair(&pki, "grpc", &[], &[]).await;
    server.wait_quic(1).await;
    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut conns = Vec::new();
    for i in 0..10 {
        let c = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
        c.send(format!("hello {i}")).await.expect("send");
        conns.push(c);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let want = format!("hello {i}");
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.extend_from_slice(&c.recv().await.expect("echo"));
        }
        assert_eq!(got, want.as_bytes());
    }
    let closed = dest::closed_port().await;
    match GrpcConn::dial(&ch, &closed.to_string()).await {
        Err(client::Error::Dial { reason, .. }) => {
            assert_eq!(reason, client::DialReason::Refused)
        }
        other => panic!("dial of a closed port: {:?}", other.map(|c| c.connect_id)),
    }
    assert_eq!(dials(&server, "quic"), 11);
    assert_eq!(dials(&server, "grpc"), 0);
    for c in conns {
        c.close().await;
    }
    all_closed(&server, &agent).await;
}

#[tokio::test]
async fn without_an_offer_the_agent_stays_on_grpc() {
    init_logs();
    let pki = Pki::new();
    let echo = dest::echo().await;

    // A server that does not offer QUIC (as a reference server never does).
    let (server, agent) = pair(&pki, "http-connect", &["--enable-agent-quic=false"], &[]).await;
    assert!(server.agent_quic.is_none());
    echo_round_trip(&server.uds(), echo, b"ping").await;
    assert_eq!((dials(&server, "grpc"), dials(&server, "quic")), (1, 0));
    assert_eq!(agent.metrics.quic_connections.get(), 0);
    // An agent that wants QUIC or nothing refuses it, and says why.
    let strict = Agent::start(&pki, server.agent_addr, "strict", &["--transport=quic"]).await;
    let m = strict.metrics.clone();
    tests::wait_for(Duration::from_secs(10), "the refusal", || {
        m.server_connection_failures
            .with_label_values(&["no_quic"])
            .get()
            > 0
    })
    .await;
    assert_eq!(server.metrics.ready_backend_connections.get(), 1);

    // An agent told --transport=grpc never asks a server that offers it.
    let (server, agent) = pair(&pki, "http-connect", &[], &["--transport=grpc"]).await;
    echo_round_trip(&server.uds(), echo, b"ping").await;
    assert_eq!((dials(&server, "grpc"), dials(&server, "quic")), (1, 0));
    assert_eq!(server.metrics.quic_connections.get(), 0);
    assert_eq!(
        agent
            .metrics
            .quic_failures
            .with_label_values(&["connect"])
            .get(),
        0
    );
}

#[tokio::test]
async fn an_agent_whose_udp_does_not_get_through_stays_on_grpc() {
    init_logs();
    let pki = Pki::new();
    // The server's TCP port is reached through a balancer on 127.0.0.2;
    // its QUIC endpoint listens on 127.0.0.1 only, so the agent's QUIC
    // packets to 127.0.0.2 reach nothing.
    let leaf = pki.issue("server-2", &["localhost", "127.0.0.1", "127.0.0.2"]);
    let mut args = Server::args(&pki, "http-connect", Listen::Uds, &pki.path("s.sock"), &[]);
    for a in args.iter_mut() {
        if a.starts_with("--cluster-cert=") {
            *a = format!("--cluster-cert={}", leaf.cert.display());
        } else if a.starts_with("--cluster-key=") {
            *a = format!("--cluster-key={}", leaf.key.display());
        }
    }
    let server = Server::start_args(args).await;
    let lb = Balancer::start_on("127.0.0.2", &[server.agent_addr]).await;
    let agent = Agent::start(&pki, lb.addr, "far", &[]).await;
    server.wait_agents(1).await;
    let m = agent.metrics.clone();
    tests::wait_for(Duration::from_secs(20), "the agent to give QUIC up", || {
        m.quic_failures.with_label_values(&["connect"]).get() > 0
    })
    .await;
    let echo = dest::echo().await;
    echo_round_trip(&server.uds(), echo, b"still here").await;
    assert_eq!((dials(&server, "grpc"), dials(&server, "quic")), (1, 0));
    assert_eq!(server.metrics.quic_connections.get(), 0);
}

/// A QUIC client endpoint presenting `identity` (certificate, key) to the
/// server, trusting `pki.ca`.
fn stranger(
    pki: &Pki,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> (quinn::Endpoint, quinn::ClientConfig) {
    let tls = konnectivity_runtime::tls::client_config(&pki.ca, identity, &[]).expect("TLS");
    let config = konnectivity_quic::client_config(&tls).expect("QUIC TLS");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("UDP");
    (endpoint, config)
}

fn refused(server: &Server, reason: &str) -> u64 {
    server
        .metrics
        .quic_refused
        .with_label_values(&[reason])
        .get()
}

#[tokio::test]
async fn strangers_on_the_quic_port_are_refused_and_counted_and_the_agent_keeps_moving() {
    init_logs();
    let pki = Pki::new();
    let ca = format!("--cluster-ca-cert={}", pki.ca.display());
    let (server, agent) = pair(&pki, "http-connect", &[&ca], &[]).await;
    server.wait_quic(1).await;
    let udp: SocketAddr = server.agent_quic.expect("QUIC offered");
    let echo = dest::echo().await;
    let uds = server.uds();

    // Garbage datagrams of every size, some shaped like QUIC long headers.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..2_000usize {
        let mut d = tests::pattern(1 + (i * 37) % 1400, i as u64);
        if i % 2 == 0 {
            d[0] = 0xc0 | (d[0] & 0x0f);
        }
        junk.send_to(&d, udp).unwrap();
    }
    echo_round_trip(&uds, echo, b"ping").await;

    // A certificate from another CA: refused in the handshake.
    let (endpoint, config) = stranger(&pki, Some((&pki.rogue.cert, &pki.rogue.key)));
    let conn = endpoint.connect_with(config, udp, "localhost").unwrap();
    let established = async { conn.await?.accept_uni().await.map(|_| ()) };
    assert!(established.await.is_err(), "a rogue certificate got in");
    // No certificate at all.
    let (endpoint, config) = stranger(&pki, None);
    let conn = endpoint.connect_with(config, udp, "localhost").unwrap();
    let established = async { conn.await?.accept_uni().await.map(|_| ()) };
    assert!(established.await.is_err(), "no certificate got in");
    let s = server.metrics.clone();
    tests::wait_for(Duration::from_secs(10), "both handshakes refused", || {
        s.quic_refused.with_label_values(&["handshake"]).get() >= 2
    })
    .await;

    // A valid certificate and a ticket that names no stream.
    let (endpoint, config) = stranger(&pki, Some((&pki.agent.cert, &pki.agent.key)));
    let conn = endpoint
        .connect_with(config.clone(), udp, "localhost")
        .unwrap()
        .await
        .expect("a valid certificate is admitted to the hello");
    match konnectivity_quic::hello(&conn, &konnectivity_quic::new_ticket()).await {
        Err(konnectivity_quic::Error::Refused(why)) => assert_eq!(why, "unknown ticket"),
        other => panic!("an unknown ticket: {other:?}"),
    }
    assert_eq!(refused(&server, "unknown_ticket"), 1);

    // A valid certificate and no hello: dropped after the hello timeout.
    let silent = endpoint
        .connect_with(config, udp, "localhost")
        .unwrap()
        .await
        .expect("handshake");
    let why = tokio::time::timeout(Duration::from_secs(20), silent.closed())
        .await
        .expect("a silent QUIC connection is closed");
    assert!(
        matches!(&why, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == konnectivity_quic::CloseCode::BadHello.code()),
        "{why}"
    );
    assert_eq!(refused(&server, "hello"), 1);

    // Through all of it the agent's connections kept their QUIC streams.
    echo_round_trip(&uds, echo, b"ping").await;
    assert_eq!(server.metrics.quic_connections.get(), 1);
    assert_eq!(dials(&server, "quic"), 2);
    assert_eq!(dials(&server, "grpc"), 0);
    all_closed(&server, &agent).await;
}
