//! Agents the server must refuse (no client certificate, a certificate from
//! another CA, a bad token), with the reason in the server's log; the server
//! binary runs as a process so its real log is read.

use std::net::SocketAddr;
use std::time::Duration;

use tests::client;
use tests::init_logs;
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::process::Proc;

const WAIT: Duration = Duration::from_secs(20);

async fn server_proc(pki: &Pki, extra: &[String]) -> (Proc, SocketAddr, SocketAddr) {
    let uds = pki.path("auth.sock");
    let p = Proc::spawn(&[], &Server::args(pki, "grpc", Listen::Uds, &uds, extra));
    let agent: SocketAddr = p
        .log_field("proxy-server started", "agent")
        .await
        .parse()
        .unwrap();
    let health: SocketAddr = p
        .log_field("proxy-server started", "health")
        .await
        .parse()
        .unwrap();
    (p, agent, health)
}

fn without_identity(args: Vec<String>) -> Vec<String> {
    args.into_iter()
        .filter(|a| !a.starts_with("--agent-cert") && !a.starts_with("--agent-key"))
        .collect()
}

#[tokio::test]
async fn agent_without_client_certificate_is_refused_and_logged() {
    init_logs();
    let pki = Pki::new();
    let (server, agent_addr, health) =
        server_proc(&pki, &[format!("--cluster-ca-cert={}", pki.ca.display())]).await;
    let agent =
        Agent::start_args(without_identity(Agent::args(&pki, agent_addr, "anon", &[]))).await;
    let line = server
        .wait_log(&["TLS handshake failed", "peer sent no certificates"], WAIT)
        .await;
    assert!(line.contains("\"listener\":\"agent\""), "{line}");
    assert_eq!(agent.metrics.open_server_connections.get(), 0);
    let (status, body) = client::http_status(health, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no connection to any proxy agent"), "{body}");

    // A properly identified agent is let in.
    let good = Agent::start(&pki, agent_addr, "good", &[]).await;
    tests::wait_for(WAIT, "good agent connected", || {
        let n = good.metrics.open_server_connections.get();
        n == 1
    })
    .await;
    assert_eq!(client::http_status(health, "/readyz").await.0, 200);
}

#[tokio::test]
async fn agent_with_certificate_from_another_ca_is_refused_and_logged() {
    init_logs();
    let pki = Pki::new();
    let (server, agent_addr, _) =
        server_proc(&pki, &[format!("--cluster-ca-cert={}", pki.ca.display())]).await;
    let mut args = without_identity(Agent::args(&pki, agent_addr, "rogue", &[]));
    args.push(format!("--agent-cert={}", pki.rogue.cert.display()));
    args.push(format!("--agent-key={}", pki.rogue.key.display()));
    let agent = Agent::start_args(args).await;
    let line = server
        .wait_log(&["TLS handshake failed", "invalid peer certificate"], WAIT)
        .await;
    assert!(
        line.contains("UnknownIssuer") || line.contains("unknown issuer"),
        "{line}"
    );
    assert_eq!(agent.metrics.open_server_connections.get(), 0);
}

#[tokio::test]
async fn agent_with_a_bad_token_is_refused_and_logged() {
    init_logs();
    let pki = Pki::new();
    let tokens = pki.path("tokens");
    std::fs::write(&tokens, "good-token\n").unwrap();
    let (server, agent_addr, _) =
        server_proc(&pki, &[format!("--agent-tokens-file={tokens}")]).await;

    let bad = pki.path("bad");
    std::fs::write(&bad, "stolen-token\n").unwrap();
    let agent = Agent::start(
        &pki,
        agent_addr,
        "intruder",
        &[&format!("--service-account-token-path={bad}")],
    )
    .await;
    let line = server
        .wait_log(&["agent stream refused", "bearer token not accepted"], WAIT)
        .await;
    assert!(line.contains("intruder"), "{line}");
    assert_eq!(agent.metrics.open_server_connections.get(), 0);

    let good = pki.path("good");
    std::fs::write(&good, "good-token\n").unwrap();
    let ok = Agent::start(
        &pki,
        agent_addr,
        "member",
        &[&format!("--service-account-token-path={good}")],
    )
    .await;
    tests::wait_for(WAIT, "agent with the right token connected", || {
        let n = ok.metrics.open_server_connections.get();
        n == 1
    })
    .await;

    // No token at all is refused too.
    let _none = Agent::start(&pki, agent_addr, "tokenless", &[]).await;
    server
        .wait_log(&["agent stream refused", "no bearer token presented"], WAIT)
        .await;
}
