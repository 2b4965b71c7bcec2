//! Certificates, keys, CA bundles and token files rotated on disk while a
//! tunnel carries traffic: the server and the agent use the new files for
//! new connections within seconds, without a restart, and the open tunnel
//! never misses a round trip.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tests::client::{self, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};

/// Replaces `path` with the contents of `from` the way a Secret update
/// does: written aside, then renamed into place.
fn rotate(from: &Path, path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The certificate a TLS listener presents to a new connection offering
/// `alpn` (DER).
async fn presented_with(addr: SocketAddr, pki: &Pki, alpn: &[u8]) -> Option<Vec<u8>> {
    let tls = tokio_rustls::TlsConnector::from(client::frontend_tls(
        pki,
        Some((pki.agent.cert.as_path(), pki.agent.key.as_path())),
        &[alpn],
    ));
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let s = tls.connect(name, tcp).await.ok()?;
    Some(s.get_ref().1.peer_certificates()?.first()?.to_vec())
}

/// The certificate the agent listener presents (DER).
async fn presented(addr: SocketAddr, pki: &Pki) -> Option<Vec<u8>> {
    presented_with(addr, pki, b"h2").await
}

/// `args` with each flag of `files` set to that path instead of its
/// value there (added if absent).
fn with_files(mut args: Vec<String>, files: &[(&str, &Path)]) -> Vec<String> {
    args.retain(|a| !files.iter().any(|(f, _)| a.starts_with(&format!("{f}="))));
    args.extend(files.iter().map(|(f, p)| format!("{f}={}", p.display())));
    args
}

/// Waits until `agent` holds a stream to the server.
async fn connects(agent: &Agent, what: &str, limit: Duration) {
    let open = agent.metrics.open_server_connections.clone();
    tests::wait_for(limit, what, || open.get() == 1).await;
}

fn der(pem_path: &Path) -> Vec<u8> {
    konnectivity_runtime::tls::load_certs("certificate", pem_path).unwrap()[0].to_vec()
}

#[tokio::test]
async fn rotated_certificates_and_cas_apply_to_new_connections_and_open_tunnels_keep_moving() {
    init_logs();
    let pki = Pki::new();
    let dir = pki.dir.path();
    let (cert, key, client_ca) = (
        dir.join("live-server.crt"),
        dir.join("live-server.key"),
        dir.join("live-agents-ca.crt"),
    );
    rotate(&pki.server.cert, &cert);
    rotate(&pki.server.key, &key);
    rotate(&pki.ca, &client_ca);
    let uds = pki.path("reload.sock");
    let args = with_files(
        Server::args(&pki, "grpc", Listen::Uds, &uds, &[]),
        &[
            ("--cluster-cert", &cert),
            ("--cluster-key", &key),
            ("--cluster-ca-cert", &client_ca),
        ],
    );
    let server = Server::start_args(args).await;
    let _agent = Agent::start(&pki, server.agent_addr, "steady", &[]).await;
    server.wait_agents(1).await;

    // Load: round trips on one open tunnel, all through the rotations.
    let load = RoundTrips::start(Path::new(&uds)).await;

    // 1. The server's certificate and key: the next handshake presents the
    // new certificate.
    let next = pki.issue("server-2", &["localhost", "127.0.0.1"]);
    assert_eq!(
        presented(server.agent_addr, &pki).await,
        Some(der(&pki.server.cert))
    );
    rotate(&next.key, &key);
    rotate(&next.cert, &cert);
    let want = der(&next.cert);
    tests::eventually(Duration::from_secs(10), "the new certificate", || async {
        (presented(server.agent_addr, &pki).await.as_ref() == Some(&want)).then_some(())
    })
    .await;

    // 2. The CA bundle for agent certificates: an agent from another CA is
    // refused until that CA joins the bundle, then it connects.
    let rogue_args = with_files(
        Agent::args(&pki, server.agent_addr, "rogue", &[]),
        &[
            ("--agent-cert", &pki.rogue.cert),
            ("--agent-key", &pki.rogue.key),
        ],
    );
    let _rogue = Agent::start_args(rogue_args).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.metrics.ready_backend_connections.get(), 1);
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(&pki.ca).unwrap(),
        std::fs::read_to_string(&pki.rogue_ca).unwrap()
    );
    write(&client_ca, &bundle);
    server.wait_agents(2).await;

    // 3. The agent's own CA file: an agent that trusts the wrong CA cannot
    // connect until its file is replaced, then it does, without a restart.
    let agent_ca = dir.join("live-agent-trust.crt");
    rotate(&pki.rogue_ca, &agent_ca);
    let late_args = with_files(
        Agent::args(&pki, server.agent_addr, "late", &[]),
        &[("--ca-cert", &agent_ca)],
    );
    let late = Agent::start_args(late_args).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(late.metrics.open_server_connections.get(), 0);
    rotate(&pki.ca, &agent_ca);
    connects(
        &late,
        "the agent with its new CA file",
        Duration::from_secs(10),
    )
    .await;
    server.wait_agents(3).await;

    load.finish(100).await;
}

/// Round trips every 10 ms on one open tunnel through the gRPC frontend at
/// `uds`, each within 5 s, until [`RoundTrips::finish`].
struct RoundTrips {
    stop: Arc<AtomicBool>,
    trips: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RoundTrips {
    async fn start(uds: &Path) -> RoundTrips {
        let echo = dest::echo().await;
        let ch = client::grpc_uds(uds).await;
        let mut tunnel = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
        let stop = Arc::new(AtomicBool::new(false));
        let trips = Arc::new(AtomicU64::new(0));
        let (stopped, count) = (stop.clone(), trips.clone());
        let task = tokio::spawn(async move {
            while !stopped.load(Ordering::Relaxed) {
                let msg = format!("trip {}", count.load(Ordering::Relaxed));
                tunnel.send(msg.clone().into_bytes()).await.expect("send");
                let got = tokio::time::timeout(Duration::from_secs(5), tunnel.recv())
                    .await
                    .expect("round trip within 5 s")
                    .expect("tunnel open");
                assert_eq!(&got[..], msg.as_bytes());
                count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        RoundTrips { stop, trips, task }
    }

    /// Stops; no round trip may have failed, and at least `min` were made.
    async fn finish(self, min: u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .expect("no round trip failed during the rotations");
        let trips = self.trips.load(Ordering::Relaxed);
        eprintln!("{trips} round trips on the open tunnel during the rotations");
        assert!(trips > min, "{trips} round trips");
    }
}

/// The agents' refusals the server counted for `reason`.
fn refused(server: &Server, reason: &str) -> u64 {
    server
        .metrics
        .agent_refused
        .with_label_values(&[reason])
        .get()
}

#[tokio::test]
async fn rotated_token_files_apply_to_new_connections_and_open_tunnels_keep_moving() {
    init_logs();
    let pki = Pki::new();
    let dir = pki.dir.path();
    let (accepted, steady_token) = (dir.join("accepted-tokens"), dir.join("steady-token"));
    write(&accepted, "token-1\n");
    write(&steady_token, "token-1\n");
    let tokens_flag = format!("--agent-tokens-file={}", accepted.display());
    let uds = pki.path("tokens.sock");
    let server = Server::start_args(Server::args(
        &pki,
        "grpc",
        Listen::Uds,
        &uds,
        std::slice::from_ref(&tokens_flag),
    ))
    .await;
    let token_flag = |p: &Path| format!("--service-account-token-path={}", p.display());
    let _steady = Agent::start(
        &pki,
        server.agent_addr,
        "steady",
        &[&token_flag(&steady_token)],
    )
    .await;
    server.wait_agents(1).await;
    let load = RoundTrips::start(Path::new(&uds)).await;

    // 1. The server's file: token-1 is replaced by token-2. A new agent with
    // token-1 is refused, one with token-2 admitted; the steady agent's
    // stream, admitted with token-1, carries on.
    write(&accepted, "token-2\n");
    write(&steady_token, "token-2\n");
    let old = dir.join("old-token");
    write(&old, "token-1\n");
    let before = refused(&server, "unauthenticated");
    let _old = Agent::start(&pki, server.agent_addr, "old", &[&token_flag(&old)]).await;
    tests::wait_for(Duration::from_secs(10), "the old token refused", || {
        refused(&server, "unauthenticated") > before
    })
    .await;
    let _new = Agent::start(
        &pki,
        server.agent_addr,
        "new",
        &[&token_flag(&steady_token)],
    )
    .await;
    server.wait_agents(2).await;

    // 2. The agent's file: an agent refused for its token connects once its
    // file holds an accepted one, without a restart.
    let late_token = dir.join("late-token");
    write(&late_token, "token-0\n");
    let before = refused(&server, "unauthenticated");
    let late = Agent::start(&pki, server.agent_addr, "late", &[&token_flag(&late_token)]).await;
    tests::wait_for(Duration::from_secs(10), "the late agent refused", || {
        refused(&server, "unauthenticated") > before
    })
    .await;
    write(&late_token, "token-2\n");
    connects(
        &late,
        "the late agent with its new token",
        Duration::from_secs(20),
    )
    .await;
    server.wait_agents(3).await;
    load.finish(3).await;
}

/// The TCP frontend's certificate and an agent's own client certificate,
/// rotated on disk: new frontend clients are shown the new certificate while
/// a CONNECT tunnel opened before keeps echoing, and an agent refused for its
/// client certificate connects once its files hold one the server trusts.
#[tokio::test]
async fn rotated_frontend_and_agent_client_certificates_apply_without_restarts() {
    init_logs();
    let pki = Pki::new();
    let dir = pki.dir.path();
    let (cert, key) = (dir.join("live-frontend.crt"), dir.join("live-frontend.key"));
    rotate(&pki.server.cert, &cert);
    rotate(&pki.server.key, &key);
    // Agents need a client certificate from the test CA.
    let args = with_files(
        Server::args(&pki, "http-connect", Listen::Tls, "", &[]),
        &[
            ("--server-cert", &cert),
            ("--server-key", &key),
            ("--cluster-ca-cert", &pki.ca),
        ],
    );
    let server = Server::start_args(args).await;
    let _agent = Agent::start(&pki, server.agent_addr, "steady", &[]).await;
    server.wait_agents(1).await;
    let echo = dest::echo().await.to_string();
    let mut before = client::connect_tls(server.tcp(), &pki, &echo)
        .await
        .expect("CONNECT");
    echo_round_trip(&mut before, 1).await;

    // 1. The frontend's certificate.
    assert_eq!(
        presented_with(server.tcp(), &pki, b"http/1.1").await,
        Some(der(&pki.server.cert))
    );
    let next = pki.issue("frontend-2", &["localhost", "127.0.0.1"]);
    rotate(&next.key, &key);
    rotate(&next.cert, &cert);
    let want = der(&next.cert);
    tests::eventually(
        Duration::from_secs(10),
        "the new frontend certificate",
        || async {
            (presented_with(server.tcp(), &pki, b"http/1.1")
                .await
                .as_ref()
                == Some(&want))
            .then_some(())
        },
    )
    .await;
    echo_round_trip(&mut before, 2).await;
    let mut after = client::connect_tls(server.tcp(), &pki, &echo)
        .await
        .expect("CONNECT after the rotation");
    echo_round_trip(&mut after, 9).await;

    // 2. An agent's own certificate: from a CA the server does not trust,
    // then replaced on disk by one it does.
    let (agent_cert, agent_key) = (dir.join("live-agent.crt"), dir.join("live-agent.key"));
    rotate(&pki.rogue.cert, &agent_cert);
    rotate(&pki.rogue.key, &agent_key);
    let late_args = with_files(
        Agent::args(&pki, server.agent_addr, "late", &[]),
        &[("--agent-cert", &agent_cert), ("--agent-key", &agent_key)],
    );
    let late = Agent::start_args(late_args).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(late.metrics.open_server_connections.get(), 0);
    rotate(&pki.agent.key, &agent_key);
    rotate(&pki.agent.cert, &agent_cert);
    connects(
        &late,
        "the agent with its new client certificate",
        Duration::from_secs(20),
    )
    .await;
    server.wait_agents(2).await;
    echo_round_trip(&mut before, 3).await;
}

/// 16 bytes of `n` through an echo tunnel, and back.
async fn echo_round_trip(s: &mut client::Tunnel, n: u8) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&[n; 16]).await.expect("write");
    let mut got = [0u8; 16];
    s.read_exact(&mut got).await.expect("echo");
    assert_eq!(got, [n; 16]);
}
