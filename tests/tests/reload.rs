//! Certificates, keys and CA bundles rotated on disk while a tunnel carries
//! traffic: the server and the agent use the new files for new connections
//! within seconds, without a restart, and the open tunnel never misses a
//! round trip. (Bearer token files are re-read on every agent connection;
//! `auth.rs` covers them.)

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

/// The certificate the agent listener presents to a new connection (DER).
async fn presented(addr: SocketAddr, pki: &Pki) -> Option<Vec<u8>> {
    let tls = tokio_rustls::TlsConnector::from(client::frontend_tls(
        pki,
        Some((pki.agent.cert.as_path(), pki.agent.key.as_path())),
        &[b"h2"],
    ));
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let s = tls.connect(name, tcp).await.ok()?;
    Some(s.get_ref().1.peer_certificates()?.first()?.to_vec())
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
    let mut args = Server::args(&pki, "grpc", Listen::Uds, &uds, &[]);
    args.retain(|a| !a.starts_with("--cluster-cert") && !a.starts_with("--cluster-key"));
    args.extend([
        format!("--cluster-cert={}", cert.display()),
        format!("--cluster-key={}", key.display()),
        format!("--cluster-ca-cert={}", client_ca.display()),
    ]);
    let server = Server::start_args(args).await;
    let _agent = Agent::start(&pki, server.agent_addr, "steady", &[]).await;
    server.wait_agents(1).await;

    // Load: round trips on one open tunnel, all through the rotations.
    let echo = dest::echo().await;
    let ch = client::grpc_uds(Path::new(&uds)).await;
    let mut tunnel = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
    let stop = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, trips) = (stop.clone(), trips.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("trip {}", trips.load(Ordering::Relaxed));
                tunnel.send(msg.clone().into_bytes()).await.expect("send");
                let got = tokio::time::timeout(Duration::from_secs(5), tunnel.recv())
                    .await
                    .expect("round trip within 5 s")
                    .expect("tunnel open");
                assert_eq!(&got[..], msg.as_bytes());
                trips.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

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
    let mut rogue_args = Agent::args(&pki, server.agent_addr, "rogue", &[]);
    rogue_args.retain(|a| !a.starts_with("--agent-cert") && !a.starts_with("--agent-key"));
    rogue_args.extend([
        format!("--agent-cert={}", pki.rogue.cert.display()),
        format!("--agent-key={}", pki.rogue.key.display()),
    ]);
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
    let mut late_args = Agent::args(&pki, server.agent_addr, "late", &[]);
    late_args.retain(|a| !a.starts_with("--ca-cert"));
    late_args.push(format!("--ca-cert={}", agent_ca.display()));
    let late = Agent::start_args(late_args).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(late.metrics.open_server_connections.get(), 0);
    rotate(&pki.ca, &agent_ca);
    let open = late.metrics.open_server_connections.clone();
    tests::wait_for(
        Duration::from_secs(10),
        "the agent with its new CA file",
        || open.get() == 1,
    )
    .await;
    server.wait_agents(3).await;

    stop.store(true, Ordering::Relaxed);
    load.await
        .expect("no round trip failed during the rotations");
    let trips = trips.load(Ordering::Relaxed);
    eprintln!("{trips} round trips on the open tunnel during the rotations");
    assert!(trips > 100, "{trips} round trips");
}
