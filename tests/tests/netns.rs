//! Isolation as in a real cluster: the control plane (server) and the node
//! (agent, kubelet) live in network namespaces this test creates. The node can
//! reach the server; the server side has no route to the kubelet's address,
//! which is reachable only through the tunnel. Needs root (CI runs as root);
//! skips with a printed reason where namespaces cannot be made.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tests::client;
use tests::init_logs;
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::process::{binary, Proc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_IP: &str = "10.200.0.1";
const NODE_IP: &str = "10.200.0.2";
const KUBELET_IP: &str = "10.201.0.10";

struct Namespaces {
    cp: String,
    node: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Namespaces {
    fn create() -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        // Built first so that an early return drops it and removes what was made.
        let ns = Namespaces {
            cp: format!("knp-cp-{id}"),
            node: format!("knp-node-{id}"),
        };
        let (va, vb) = (format!("kcp{id}"), format!("knd{id}"));
        ip(&["netns", "add", &ns.cp])?;
        ip(&["netns", "add", &ns.node])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &ns.cp])?;
        ip(&["link", "set", &vb, "netns", &ns.node])?;
        ip(&[
            "-n",
            &ns.cp,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            &va,
        ])?;
        ip(&[
            "-n",
            &ns.node,
            "addr",
            "add",
            &format!("{NODE_IP}/24"),
            "dev",
            &vb,
        ])?;
        for (n, dev) in [(&ns.cp, &va), (&ns.node, &vb)] {
            ip(&["-n", n, "link", "set", dev, "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        // The kubelet's address lives on the node only (on its loopback
        // device); the control plane namespace has no route to it.
        ip(&[
            "-n",
            &ns.node,
            "addr",
            "add",
            &format!("{KUBELET_IP}/32"),
            "dev",
            "lo",
        ])?;
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.cp]);
        let _ = ip(&["netns", "del", &self.node]);
    }
}

#[tokio::test]
async fn kubelet_in_a_node_namespace_is_reachable_only_through_the_tunnel() {
    init_logs();
    let ns = match Namespaces::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED: cannot create network namespaces here ({e})");
            return;
        }
    };
    let pki = Pki::new();
    let kubelet_cert = pki.issue("kubelet", &[KUBELET_IP]);
    let kubelet_addr = format!("{KUBELET_IP}:10250");

    let cp = ["ip", "netns", "exec", ns.cp.as_str()];
    let node = ["ip", "netns", "exec", ns.node.as_str()];

    let kubelet = Command::new("ip")
        .args(["netns", "exec", &ns.node])
        .arg(binary("test-kubelet"))
        .args([
            &kubelet_addr,
            &kubelet_cert.cert.display().to_string(),
            &kubelet_cert.key.display().to_string(),
        ])
        .spawn()
        .expect("start kubelet");
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kubelet = KillOnDrop(kubelet);

    let uds = pki.path("cp.sock");
    let mut sargs = Server::args(&pki, "http-connect", Listen::Uds, &uds, &[]);
    sargs.retain(|a| !a.starts_with("--agent-bind-address"));
    sargs.push(format!("--agent-bind-address={SERVER_IP}"));
    let server = Proc::spawn(&cp, &sargs);
    let agent_addr: SocketAddr = server
        .log_field("proxy-server started", "agent")
        .await
        .parse()
        .unwrap();

    let agent = Proc::spawn(&node, &Agent::args(&pki, agent_addr, "node-1", &[]));
    agent
        .wait_log(&["connected to proxy server"], Duration::from_secs(20))
        .await;

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
    let stream = client::connect_uds(std::path::Path::new(&uds), &kubelet_addr)
        .await
        .expect("CONNECT through the tunnel");
    let tls = tokio_rustls::TlsConnector::from(
        konnectivity_runtime::tls::client_config(&pki.ca, None, &[b"http/1.1"]).unwrap(),
    );
    let name = rustls::pki_types::ServerName::try_from(KUBELET_IP).unwrap();
    let mut s = tls
        .connect(name, stream)
        .await
        .expect("TLS to the kubelet over the tunnel");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: kubelet\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.ends_with("kubelet in the node namespace"), "{text}");
    drop(agent);
    drop(server);
}
