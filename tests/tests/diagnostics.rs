//! The server's admin endpoint JSON (`/debug/...`): agents, connections, the
//! route a dial would take, and recent refusals and dial failures, checked
//! against a real server and agent on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tests::client::{self, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};

const WAIT: Duration = Duration::from_secs(20);

async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = client::http_status(addr, path).await;
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, v)
}

#[tokio::test]
async fn admin_endpoint_shows_agents_connections_routes_and_failures() {
    init_logs();
    let pki = Pki::new();
    let ca = format!("--cluster-ca-cert={}", pki.ca.display());
    let server = Server::start(
        &pki,
        "grpc",
        Listen::Uds,
        &[&ca, "--proxy-strategies=destHost"],
    )
    .await;
    let agent = Agent::start(
        &pki,
        server.agent_addr,
        "node-a",
        &["--agent-identifiers=ipv4=127.0.0.1&host=node-a"],
    )
    .await;
    server.wait_agents(1).await;

    let (status, agents) = get(server.health, "/debug/agents").await;
    assert_eq!(status, 200, "{agents}");
    let a = &agents["agents"][0];
    assert_eq!(a["agent_id"], "node-a", "{agents}");
    assert_eq!(a["identifiers"]["ipv4"][0], "127.0.0.1", "{agents}");
    assert_eq!(a["identifiers"]["host"][0], "node-a", "{agents}");
    assert_eq!(a["draining"], false);
    assert_eq!(a["flow_control"], true);
    // Idle, the agent still answers the server's heartbeats: its last
    // packet is newer than its stream.
    tests::poll_until(WAIT, "a heartbeat answer", || async {
        let (_, agents) = get(server.health, "/debug/agents").await;
        let a = &agents["agents"][0];
        let age = a["age_seconds"].as_f64()?;
        let silent = a["last_packet_seconds_ago"].as_f64()?;
        (age - silent > 1.0).then_some(())
    })
    .await
    .expect("the idle agent answers heartbeats");

    // The route: by destHost to node-a; nothing for an unknown host.
    let (_, route) = get(server.health, "/debug/route?address=127.0.0.1:10250").await;
    assert_eq!(route["strategy"], "destHost", "{route}");
    assert_eq!(route["agent"]["agent_id"], "node-a", "{route}");
    let (_, none) = get(server.health, "/debug/route?address=10.9.9.9:10250").await;
    assert!(none["agent"].is_null(), "{none}");
    assert_eq!(none["agents_connected"], 1, "{none}");
    let (status, _) = get(server.health, "/debug/route").await;
    assert_eq!(status, 400);

    // An open connection with bytes both ways.
    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut conn = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
    conn.send(&b"hello"[..]).await.expect("send");
    assert_eq!(conn.recv().await.as_deref(), Some(&b"hello"[..]));
    let (_, conns) = get(server.health, "/debug/connections").await;
    let c = &conns["connections"][0];
    assert_eq!(c["destination"], echo.to_string(), "{conns}");
    assert_eq!(c["agent_id"], "node-a");
    assert_eq!(c["frontend"], "grpc");
    assert_eq!(c["connect_id"], conn.connect_id);
    assert_eq!(c["bytes_to_agent"], 5, "{conns}");
    assert_eq!(c["bytes_to_frontend"], 5, "{conns}");
    assert!(conn.close().await);

    // A refused dial and a dial nobody can serve, with their reasons.
    let closed = dest::closed_port().await;
    let err = GrpcConn::dial(&ch, &closed.to_string())
        .await
        .err()
        .expect("refused");
    assert_eq!(err.reason(), Some(client::DialReason::Refused));
    let _ = GrpcConn::dial(&ch, "10.9.9.9:10250")
        .await
        .err()
        .expect("no agent");
    let (_, events) = get(server.health, "/debug/events").await;
    let fails = events["dial_failures"].as_array().expect("list").clone();
    assert_eq!(fails.len(), 2, "{events}");
    assert_eq!(fails[0]["reason"], "refused", "{events}");
    assert_eq!(fails[0]["agent_id"], "node-a");
    assert_eq!(fails[0]["destination"], closed.to_string());
    assert!(fails[0]["message"]
        .as_str()
        .unwrap()
        .contains("connection refused"));
    assert_eq!(fails[1]["reason"], "no_agent", "{events}");

    // An agent with a certificate from another CA: refused at TLS, recorded.
    let mut args = Agent::args(&pki, server.agent_addr, "rogue", &[]);
    args.retain(|a| !a.starts_with("--agent-cert") && !a.starts_with("--agent-key"));
    args.push(format!("--agent-cert={}", pki.rogue.cert.display()));
    args.push(format!("--agent-key={}", pki.rogue.key.display()));
    let rogue = Agent::start_args(args).await;
    let refusal = tests::poll_until(WAIT, "TLS refusal recorded", || async {
        let (_, events) = get(server.health, "/debug/events").await;
        events["refusals"]
            .as_array()
            .and_then(|r| r.first().cloned())
    })
    .await
    .expect("refusal");
    assert_eq!(refusal["reason"], "tls", "{refusal}");
    assert!(
        refusal["message"]
            .as_str()
            .unwrap()
            .contains("TLS handshake failed"),
        "{refusal}"
    );
    rogue.stop().await;
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn diagnostics_are_not_on_a_separate_health_port() {
    init_logs();
    let pki = Pki::new();
    let mut args = Server::args(&pki, "grpc", Listen::Uds, &pki.path("d.sock"), &[]);
    // Distinct admin address: loopback port 0 vs health on another name.
    args.retain(|a| !a.starts_with("--health-bind-address"));
    args.push("--health-bind-address=localhost".into());
    let server = Server::start_args(args).await;
    let (status, _) = client::http_status(server.health, "/debug/agents").await;
    assert_eq!(status, 404);
    let (status, _) = client::http_status(server.health, "/healthz").await;
    assert_eq!(status, 200);
    let admin = server.admin.expect("a separate admin listener");
    let (status, body) = client::http_status(admin, "/debug/agents").await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn agent_admin_endpoint_shows_servers_connections_and_failures() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let agent = Agent::start(&pki, server.agent_addr, "node-a", &[]).await;
    server.wait_agents(1).await;
    let (status, servers) = get(agent.health, "/debug/servers").await;
    assert_eq!(status, 200, "{servers}");
    assert_eq!(servers["agent_id"], "node-a");
    let s = &servers["servers"][0];
    assert_eq!(s["address"], server.agent_addr.to_string(), "{servers}");
    assert_eq!(
        s["dial_reasons"], true,
        "typed reasons negotiated: {servers}"
    );
    assert_eq!(s["flow_control"], true);

    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut conn = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
    conn.send(&b"abc"[..]).await.expect("send");
    assert_eq!(conn.recv().await.as_deref(), Some(&b"abc"[..]));
    let (_, conns) = get(agent.health, "/debug/connections").await;
    let c = &conns["connections"][0];
    assert_eq!(c["destination"], echo.to_string(), "{conns}");
    assert_eq!(c["connect_id"], conn.connect_id);
    assert_eq!(c["bytes_to_destination"], 3, "{conns}");
    assert_eq!(c["bytes_to_server"], 3, "{conns}");
    assert!(conn.close().await);

    let closed = dest::closed_port().await;
    let _ = GrpcConn::dial(&ch, &closed.to_string())
        .await
        .err()
        .expect("refused");
    let (_, events) = get(agent.health, "/debug/events").await;
    let f = &events["dial_failures"][0];
    assert_eq!(f["reason"], "refused", "{events}");
    assert_eq!(f["destination"], closed.to_string());
    agent.stop().await;
    server.stop().await;
}

/// One grep follows one request: the server's and the agent's log lines for
/// a connection carry the same connectID, dial id and agent id.
#[tokio::test]
async fn both_logs_carry_the_connection_and_agent_ids() {
    use tests::process::Proc;
    init_logs();
    let pki = Pki::new();
    let uds = pki.path("logs.sock");
    let mut sargs = Server::args(&pki, "grpc", Listen::Uds, &uds, &[]);
    sargs.push("--v=4".into());
    let server = Proc::spawn(&[], &sargs);
    let agent_addr: SocketAddr = server
        .log_field("proxy-server started", "agent")
        .await
        .parse()
        .unwrap();
    let mut aargs = Agent::args(&pki, agent_addr, "node-logs", &[]);
    aargs.push("--v=4".into());
    let agent = Proc::spawn(&[], &aargs);
    agent.wait_log(&["connected to proxy server"], WAIT).await;
    let http = dest::http("hello").await;
    let ch = client::grpc_uds(std::path::Path::new(&uds)).await;
    let mut conn = GrpcConn::dial(&ch, &http.to_string()).await.expect("dial");
    conn.send(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..])
        .await
        .expect("send");
    let _ = conn.read_to_end().await;
    let id = format!("\"connect_id\":{}", conn.connect_id);
    let spans = |line: &str| -> Value {
        let v: Value = serde_json::from_str(line).expect("json");
        v["span"].clone()
    };
    let s = server
        .wait_log(&[&id, "connection established"], WAIT)
        .await;
    let a = agent.wait_log(&[&id, "connected"], WAIT).await;
    let (s, a) = (spans(&s), spans(&a));
    assert_eq!(s["agent.id"], "node-logs", "{s}");
    assert_eq!(a["agent.id"], "node-logs", "{a}");
    assert_eq!(s["random"], a["random"], "the dial id differs: {s} {a}");
    assert_eq!(s["dst.addr"], a["dst.addr"]);

    // A failed dial: both sides' "dial failed" lines share the dial id.
    let closed = dest::closed_port().await;
    let _ = GrpcConn::dial(&ch, &closed.to_string())
        .await
        .err()
        .expect("refused");
    let dst = format!("\"dst.addr\":\"{closed}\"");
    let s = spans(&server.wait_log(&[&dst, "dial failed"], WAIT).await);
    let a = spans(&agent.wait_log(&[&dst, "dial failed"], WAIT).await);
    assert_eq!(s["random"], a["random"], "{s} {a}");
    assert_eq!(s["agent.id"], "node-logs", "{s}");
}
