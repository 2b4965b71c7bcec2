//! Isolation and partitions as in a real cluster: the control plane (server)
//! and the node (agent, kubelet) live in network namespaces the test creates
//! ([`tests::netns`]). The node can reach the server; the server side has no
//! route to the kubelet's address, which is reachable only through the
//! tunnel. Needs root (CI runs as root and sets `KNP_REQUIRE_NETNS=1`, so a
//! failure to make namespaces fails there); skips with a printed reason
//! elsewhere.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tests::client::{self, Mode};
use tests::init_logs;
use tests::inproc::{Agent, Listen, Server};
use tests::netns::{Pair, KUBELET_IP, SERVER_IP};
use tests::pki::Pki;
use tests::process::{binary, Proc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The test kubelet in the node namespace; killed on drop.
struct Kubelet(std::process::Child);

impl Kubelet {
    fn start(ns: &Pair, pki: &Pki, addr: &str) -> Kubelet {
        let cert = pki.issue("kubelet", &[KUBELET_IP]);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.node])
            .arg(binary("test-kubelet"))
            .args([
                addr,
                &cert.cert.display().to_string(),
                &cert.key.display().to_string(),
            ])
            .spawn()
            .expect("start kubelet");
        Kubelet(child)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server (`mode` on a Unix socket) in the control-plane namespace and
/// one agent in the node namespace, connected.
async fn tunnel(ns: &Pair, pki: &Pki, uds: &str, mode: Mode) -> (Proc, Proc) {
    let flag = match mode {
        Mode::Grpc => "grpc",
        Mode::HttpConnect => "http-connect",
    };
    let mut sargs = Server::args(pki, flag, Listen::Uds, uds, &[]);
    sargs.retain(|a| !a.starts_with("--agent-bind-address"));
    sargs.push(format!("--agent-bind-address={SERVER_IP}"));
    let server = Proc::spawn(&ns.in_cp(), &sargs);
    let agent_addr: SocketAddr = server
        .log_field("proxy-server started", "agent")
        .await
        .parse()
        .unwrap();
    let agent = Proc::spawn(&ns.in_node(), &Agent::args(pki, agent_addr, "node-1", &[]));
    agent
        .wait_log(&["connected to proxy server"], Duration::from_secs(20))
        .await;
    (server, agent)
}

/// A dial through the server's frontend socket in `mode`.
async fn dial(mode: Mode, uds: &str, target: &str) -> Result<client::Tunnel, client::Error> {
    client::Frontend::new(mode, client::Transport::Unix(uds.into()))
        .timeout(Duration::from_secs(20))
        .dial(target)
        .await
}

/// `GET /healthz` on the kubelet through the tunnel, TLS end to end.
async fn kubelet_healthz(
    pki: &Pki,
    uds: &str,
    kubelet: &str,
    mode: Mode,
) -> Result<String, String> {
    let stream = dial(mode, uds, kubelet)
        .await
        .map_err(|e| format!("dial through the tunnel: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(
        konnectivity_runtime::tls::client_config(&pki.ca, None, &[b"http/1.1"]).unwrap(),
    );
    let name = rustls::pki_types::ServerName::try_from(KUBELET_IP).unwrap();
    let mut s = tls
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS to the kubelet over the tunnel: {e}"))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kubelet\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn kubelet_in_a_node_namespace_is_reachable_only_through_the_tunnel() {
    init_logs();
    let Some(ns) = Pair::create_or_skip("isolation") else {
        return;
    };
    let pki = Pki::new();
    let kubelet_addr = format!("{KUBELET_IP}:10250");
    let _kubelet = Kubelet::start(&ns, &pki, &kubelet_addr);

    let uds = pki.path("cp.sock");
    let (server, agent) = tunnel(&ns, &pki, &uds, Mode::HttpConnect).await;

    // The control plane cannot open a connection to the kubelet itself.
    let direct = Command::new("ip")
        .args(["netns", "exec", &ns.cp, "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{KUBELET_IP}/10250"))
        .output()
        .expect("run bash");
    assert!(
        !direct.status.success(),
        "control plane must not reach the kubelet directly"
    );

    // Through the tunnel (HTTP CONNECT on the server's Unix socket, as
    // kube-apiserver does), TLS to the kubelet works end to end.
    let text = kubelet_healthz(&pki, &uds, &kubelet_addr, Mode::HttpConnect)
        .await
        .unwrap();
    assert!(text.ends_with("kubelet in the node namespace"), "{text}");
    drop(agent);
    drop(server);
}

/// The link between control plane and node goes down without a word (packets
/// are lost). Both sides notice within 10 s from heartbeats, the open
/// connection and a dial made during the partition fail cleanly, and once the
/// link is back the agent reconnects and the kubelet is reachable again, with
/// no process restarted. Through HTTP CONNECT and through gRPC (what
/// kube-apiserver uses most).
#[tokio::test]
async fn a_partition_is_noticed_on_both_sides_and_heals_without_restarts() {
    partition(Mode::HttpConnect).await;
}

#[tokio::test]
async fn a_partition_under_the_grpc_frontend_is_noticed_and_heals_without_restarts() {
    partition(Mode::Grpc).await;
}

async fn partition(mode: Mode) {
    init_logs();
    let Some(ns) = Pair::create_or_skip(&format!("partition {mode}")) else {
        return;
    };
    let pki = Pki::new();
    let kubelet_addr = format!("{KUBELET_IP}:10250");
    let _kubelet = Kubelet::start(&ns, &pki, &kubelet_addr);
    let uds = pki.path("partition.sock");
    let (server, agent) = tunnel(&ns, &pki, &uds, mode).await;
    let text = kubelet_healthz(&pki, &uds, &kubelet_addr, mode)
        .await
        .unwrap();
    assert!(text.ends_with("kubelet in the node namespace"), "{text}");
    let mut open = dial(mode, &uds, &kubelet_addr)
        .await
        .expect("open connection");

    ns.set_link(false).expect("link down");
    let cut = Instant::now();
    let deadline = cut + Duration::from_secs(10);
    let pending = {
        let uds = uds.clone();
        let kubelet_addr = kubelet_addr.clone();
        tokio::spawn(async move { dial(mode, &uds, &kubelet_addr).await })
    };
    let left = || deadline.saturating_duration_since(Instant::now());
    agent.wait_log(&["no heartbeat from server"], left()).await;
    server
        .wait_log(&["no heartbeat answer from agent"], left())
        .await;
    eprintln!(
        "{mode}: partition noticed by both sides after {:?}",
        cut.elapsed()
    );
    // The open connection ends (EOF or error), it does not hang.
    let mut buf = [0u8; 64];
    let ended = tokio::time::timeout(left(), open.read(&mut buf)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "{mode}: open connection did not end cleanly within 10 s: {ended:?}"
    );
    // The dial made during the partition fails with the server's answer,
    // not a hang (CONNECT: a 5xx status).
    let dialed = tokio::time::timeout(left(), pending)
        .await
        .expect("the dial made during the partition hung")
        .unwrap();
    match dialed {
        Err(client::Error::Dial {
            status, message, ..
        }) => {
            if mode == Mode::HttpConnect {
                let status = status.unwrap_or(0);
                assert!((500..600).contains(&status), "{status} {message}");
            }
        }
        Err(e) => panic!("{mode}: the dial failed, but not with the server's answer: {e}"),
        Ok(_) => panic!("{mode}: a dial during the partition succeeded"),
    }

    ns.set_link(true).expect("link up");
    let healed = Instant::now();
    let text = tests::eventually(
        Duration::from_secs(45),
        "kubelet reachable again",
        || async { kubelet_healthz(&pki, &uds, &kubelet_addr, mode).await.ok() },
    )
    .await;
    assert!(text.ends_with("kubelet in the node namespace"), "{text}");
    eprintln!(
        "{mode}: reachable again {:?} after the link came back",
        healed.elapsed()
    );
    drop(agent);
    drop(server);
}

/// Loads `rules` with `nft -f -` in a namespace (`prefix`: `ip netns exec NS`).
fn nft(prefix: &[&str], rules: &str) {
    use std::io::Write;
    let mut child = Command::new(prefix[0])
        .args(&prefix[1..])
        .args(["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A firewall on the node that lets TCP through and drops UDP (an nftables
/// rule in the node's namespace): the agent gives QUIC up and says so, and
/// the kubelet is reachable over the gRPC stream meanwhile; once UDP passes
/// again, the agent's next try ties a QUIC connection to its stream and
/// dials travel over it. No restarts.
#[tokio::test]
async fn udp_dropped_by_a_firewall_leaves_the_tunnel_on_grpc_until_it_passes_again() {
    init_logs();
    let Some(ns) = Pair::create_or_skip("udp dropped") else {
        return;
    };
    nft(
        &ns.in_node(),
        "table inet knp_udp {\n chain out {\n  type filter hook output priority 0;\n  meta l4proto udp drop\n }\n}\n",
    );
    let pki = Pki::new();
    let kubelet_addr = format!("{KUBELET_IP}:10250");
    let _kubelet = Kubelet::start(&ns, &pki, &kubelet_addr);
    let uds = pki.path("udp.sock");
    let (server, agent) = tunnel(&ns, &pki, &uds, Mode::HttpConnect).await;
    agent
        .wait_log(&["QUIC unavailable"], Duration::from_secs(10))
        .await;
    let text = kubelet_healthz(&pki, &uds, &kubelet_addr, Mode::HttpConnect)
        .await
        .unwrap();
    assert!(text.ends_with("kubelet in the node namespace"), "{text}");
    assert!(
        !server
            .logs()
            .iter()
            .any(|l| l.contains("dials go over QUIC")),
        "a QUIC connection got through the firewall"
    );

    nft(&ns.in_node(), "delete table inet knp_udp\n");
    server
        .wait_log(&["dials go over QUIC"], Duration::from_secs(30))
        .await;
    agent
        .wait_log(&["QUIC connected"], Duration::from_secs(5))
        .await;
    let text = kubelet_healthz(&pki, &uds, &kubelet_addr, Mode::HttpConnect)
        .await
        .unwrap();
    assert!(text.ends_with("kubelet in the node namespace"), "{text}");
    drop(agent);
    drop(server);
}
