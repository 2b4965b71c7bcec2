//! `cargo run -p tests --bin demo`: starts a proxy-server, a proxy-agent and a
//! sample destination on loopback with generated certificates, sends requests
//! through the tunnel over both frontends, and prints what happened.

use tests::client::{self, GrpcConn};
use tests::dest;
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pki = Pki::new();
    println!("1. certificates generated in {}", pki.dir.path().display());

    let grpc = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    println!(
        "2. proxy-server (grpc mode): frontend {}, agents on {}, health on {}",
        grpc.uds().display(),
        grpc.agent_addr,
        grpc.health
    );
    let agent = Agent::start(&pki, grpc.agent_addr, "demo-node", &[]).await;
    grpc.wait_agents(1).await;
    println!(
        "3. proxy-agent 'demo-node' connected (health on {})",
        agent.health
    );

    let kubelet = dest::http("hello from the node side").await;
    println!("4. sample destination (a stand-in kubelet) on {kubelet}");

    let ch = client::grpc_uds(&grpc.uds()).await;
    let mut conn = GrpcConn::dial(&ch, &kubelet.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("dial: {e}"))?;
    println!(
        "5. gRPC DIAL_REQ {kubelet} -> DIAL_RSP connectID={}",
        conn.connect_id
    );
    conn.send(&b"GET /healthz HTTP/1.1\r\nHost: kubelet\r\n\r\n"[..])
        .await
        .expect("send");
    let resp = String::from_utf8_lossy(&conn.read_to_end().await).to_string();
    println!(
        "   response through the tunnel:\n   | {}",
        resp.replace("\r\n", "\n   | ")
    );
    println!(
        "   destination closed -> CLOSE_RSP received: {}",
        conn.closed
    );

    let connect = Server::start(&pki, "http-connect", Listen::Uds, &[]).await;
    let _agent2 = Agent::start(&pki, connect.agent_addr, "demo-node", &[]).await;
    connect.wait_agents(1).await;
    let mut s = client::connect_uds(&connect.uds(), &kubelet.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("CONNECT failed: {e}"))?;
    println!(
        "6. HTTP CONNECT {kubelet} on {} -> 200 Connection Established",
        connect.uds().display()
    );
    let resp = client::http_get(&mut s).await;
    println!(
        "   response through the tunnel:\n   | {}",
        resp.replace("\r\n", "\n   | ")
    );

    let closed = dest::closed_port().await;
    match GrpcConn::dial(&ch, &closed.to_string()).await {
        Err(e) => println!("7. dial to a closed port {closed} -> DIAL_RSP error: {e}"),
        Ok(_) => println!("7. unexpected: dial to a closed port succeeded"),
    }

    let (status, metrics) = client::http_status(grpc.health, "/metrics").await;
    println!("8. server /metrics ({status}), selected lines:");
    for l in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && (l.contains("ready_backend_connections")
                || l.contains("dial_failure_count")
                || l.contains("relayed_bytes_total")
                || l.contains("established_connections"))
    }) {
        println!("   {l}");
    }
    grpc.stop().await;
    connect.stop().await;
    agent.stop().await;
    println!("done");
    Ok(())
}
