//! Choosing agents: many concurrent connections over two agents without
//! cross-talk, `destHost` and `defaultRoute` routing.

use tests::client::{self, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};

fn dials(agent: &Agent) -> u64 {
    agent.metrics.dial_duration.get_sample_count()
}

#[tokio::test]
async fn hundred_concurrent_connections_through_two_agents_without_cross_talk() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let a = Agent::start(&pki, server.agent_addr, "agent-a", &[]).await;
    let b = Agent::start(&pki, server.agent_addr, "agent-b", &[]).await;
    server.wait_agents(2).await;
    let dst = dest::bulk("bulk").await;
    let ch = client::grpc_uds(&server.uds()).await;

    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let ch = ch.clone();
        let addr = dst.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = GrpcConn::dial(&ch, &addr).await.expect("dial");
            let n = 64 * 1024 + i as usize * 97;
            c.send(format!("GET {n} {i}\n")).await.expect("send");
            let got = c.read_to_end().await;
            assert_eq!(got.len(), n, "connection {i} length");
            assert_eq!(
                got,
                tests::pattern(n, i),
                "connection {i} got another's bytes"
            );
        }));
    }
    for t in tasks {
        t.await.expect("connection task");
    }
    let (da, db) = (dials(&a), dials(&b));
    assert_eq!(da + db, 100);
    assert!(da >= 20 && db >= 20, "load not spread: a={da} b={db}");
}

#[tokio::test]
async fn dest_host_routes_to_the_agent_that_claims_the_address() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(
        &pki,
        "grpc",
        Listen::Uds,
        &["--proxy-strategies=destHost,default"],
    )
    .await;
    let a = Agent::start(
        &pki,
        server.agent_addr,
        "agent-a",
        &["--agent-identifiers=ipv4=127.0.0.2&host=node-a"],
    )
    .await;
    let b = Agent::start(
        &pki,
        server.agent_addr,
        "agent-b",
        &["--agent-identifiers=ipv4=127.0.0.3"],
    )
    .await;
    server.wait_agents(2).await;
    let on_a = dest::bulk_on("127.0.0.2", "a").await;
    let on_b = dest::bulk_on("127.0.0.3", "b").await;
    let ch = client::grpc_uds(&server.uds()).await;
    for _ in 0..10 {
        for dst in [on_a, on_b] {
            let mut c = GrpcConn::dial(&ch, &dst.to_string()).await.expect("dial");
            c.send(&b"NAME\n"[..]).await.expect("send");
            c.read_to_end().await;
        }
    }
    assert_eq!(dials(&a), 10, "all 127.0.0.2 dials go through agent-a");
    assert_eq!(dials(&b), 10, "all 127.0.0.3 dials go through agent-b");
}

#[tokio::test]
async fn default_route_takes_unmatched_destinations() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(
        &pki,
        "grpc",
        Listen::Uds,
        &["--proxy-strategies=destHost,defaultRoute"],
    )
    .await;
    let a = Agent::start(
        &pki,
        server.agent_addr,
        "agent-a",
        &["--agent-identifiers=ipv4=127.0.0.2"],
    )
    .await;
    let gw = Agent::start(
        &pki,
        server.agent_addr,
        "gateway",
        &["--agent-identifiers=default-route=true"],
    )
    .await;
    server.wait_agents(2).await;
    let elsewhere = dest::bulk_on("127.0.0.4", "x").await;
    let ch = client::grpc_uds(&server.uds()).await;
    for _ in 0..5 {
        let mut c = GrpcConn::dial(&ch, &elsewhere.to_string())
            .await
            .expect("dial");
        c.send(&b"NAME\n"[..]).await.expect("send");
        assert_eq!(c.read_to_end().await, b"x");
    }
    assert_eq!(dials(&gw), 5);
    assert_eq!(dials(&a), 0);
}

#[tokio::test]
async fn default_route_alone_finds_no_agent_without_a_gateway() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(
        &pki,
        "grpc",
        Listen::Uds,
        &["--proxy-strategies=defaultRoute"],
    )
    .await;
    let _a = Agent::start(
        &pki,
        server.agent_addr,
        "agent-a",
        &["--agent-identifiers=ipv4=127.0.0.2"],
    )
    .await;
    server.wait_agents(1).await;
    let ch = client::grpc_uds(&server.uds()).await;
    let err = GrpcConn::dial(&ch, "127.0.0.5:80")
        .await
        .err()
        .expect("no agent");
    assert_eq!(err.message(), Some("No agent available"));
}
