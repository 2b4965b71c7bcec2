//! The tunnel under test: a proxy server in the control plane's namespace and
//! one agent per node, each side ours or the upstream Go binary, started with
//! the flags both share.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::control_plane::{free_port, Bins, Egress};
use super::net::{NodeNet, CONTROL_PLANE_IP};
use super::pki::ClusterPki;
use crate::process::{binary, Proc};

/// Agent streams connected, as both servers name it.
const READY: &str = "konnectivity_network_proxy_server_ready_backend_connections";

/// Which implementation runs a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Our Rust binary.
    Ours,
    /// The upstream Go binary (v0.36.0, built by `tests/cluster/build.sh`).
    Upstream,
}

impl Side {
    /// `ours` / `upstream`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::Upstream => "upstream",
        }
    }

    fn binary(self, bins: &Bins, role: &str) -> String {
        match self {
            Side::Ours => binary(&format!("proxy-{role}")).display().to_string(),
            Side::Upstream => bins.get(&format!("upstream-{role}")),
        }
    }
}

/// The egress mode kube-apiserver uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// GRPC over a Unix socket.
    GrpcUds,
    /// HTTPConnect over a Unix socket.
    ConnectUds,
    /// HTTPConnect over mutual-TLS TCP.
    ConnectTls,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 3] = [Mode::GrpcUds, Mode::ConnectUds, Mode::ConnectTls];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::GrpcUds => "grpc-uds",
            Mode::ConnectUds => "connect-uds",
            Mode::ConnectTls => "connect-mtls",
        }
    }
}

/// A running server and its agents.
pub struct Tunnel {
    /// Where kube-apiserver reaches the server.
    pub egress: Egress,
    /// The server process.
    pub server: Proc,
    /// One agent per node, in node order.
    pub agents: Vec<Proc>,
    /// The server's metrics endpoint (`127.0.0.1:<port>`).
    pub server_metrics: String,
    /// The server's side.
    pub server_side: Side,
    /// The agents' side.
    pub agent_side: Side,
    agent_port: u16,
    argv: Vec<String>,
    agent_extra: Vec<String>,
    bins: Bins,
}

/// Flags added to the common ones (TokenReview, Leases).
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// For the server.
    pub server: Vec<String>,
    /// For every agent.
    pub agent: Vec<String>,
}

/// The server's flags (kept for restarts, so the ports stay the same).
fn server_argv(
    side: Side,
    bins: &Bins,
    dir: &Path,
    pki: &ClusterPki,
    mode: Mode,
    agent_port: u16,
    health_port: u16,
) -> (Vec<String>, Egress) {
    let frontend_port = free_port("127.0.0.1");
    let f = |p: &Path| p.display().to_string();
    let sock: PathBuf = dir.join("konnectivity-server.sock");
    let mut a = vec![
        side.binary(bins, "server"),
        format!(
            "--mode={}",
            if mode == Mode::GrpcUds {
                "grpc"
            } else {
                "http-connect"
            }
        ),
        format!("--agent-port={agent_port}"),
        format!("--agent-bind-address={CONTROL_PLANE_IP}"),
        format!("--health-port={health_port}"),
        "--health-bind-address=127.0.0.1".into(),
        format!("--admin-port={}", free_port("127.0.0.1")),
        "--admin-bind-address=127.0.0.1".into(),
        format!("--cluster-cert={}", f(&pki.tunnel_server.cert)),
        format!("--cluster-key={}", f(&pki.tunnel_server.key)),
        format!("--cluster-ca-cert={}", f(&pki.ca)),
        "--proxy-strategies=destHost".into(),
        "--server-count=1".into(),
    ];
    let egress = match mode {
        Mode::GrpcUds | Mode::ConnectUds => {
            a.push(format!("--uds-name={}", f(&sock)));
            a.push("--delete-existing-uds-file=true".into());
            a.push("--server-port=0".into());
            if mode == Mode::GrpcUds {
                Egress::GrpcUds(sock)
            } else {
                Egress::ConnectUds(sock)
            }
        }
        Mode::ConnectTls => {
            a.push(format!("--server-port={frontend_port}"));
            a.push("--server-bind-address=127.0.0.1".into());
            a.push(format!("--server-cert={}", f(&pki.tunnel_server.cert)));
            a.push(format!("--server-key={}", f(&pki.tunnel_server.key)));
            a.push(format!("--server-ca-cert={}", f(&pki.ca)));
            Egress::ConnectTls(frontend_port)
        }
    };
    match side {
        Side::Ours => a.push("--log-format=json".into()),
        Side::Upstream => a.push("--v=2".into()),
    }
    (a, egress)
}

/// The agent's flags for `node`: the ones every setup shares.
pub fn agent_argv(
    side: Side,
    bins: &Bins,
    pki: &ClusterPki,
    agent_port: u16,
    node: &NodeNet,
) -> Vec<String> {
    let f = |p: &Path| p.display().to_string();
    let mut a = node.exec_prefix();
    a.extend([
        side.binary(bins, "agent"),
        format!("--proxy-server-host={CONTROL_PLANE_IP}"),
        format!("--proxy-server-port={agent_port}"),
        format!("--ca-cert={}", f(&pki.ca)),
        format!("--agent-cert={}", f(&pki.tunnel_agent.cert)),
        format!("--agent-key={}", f(&pki.tunnel_agent.key)),
        format!("--agent-id={}", node.name),
        format!("--agent-identifiers=host={}", node.kubelet_ip),
        "--health-server-host=127.0.0.1".into(),
        "--health-server-port=8093".into(),
        "--admin-server-port=8094".into(),
        "--sync-interval=200ms".into(),
        "--sync-interval-cap=1s".into(),
    ]);
    match side {
        Side::Ours => a.push("--log-format=json".into()),
        Side::Upstream => {
            a.push("--admin-bind-address=127.0.0.1".into());
            a.push("--probe-interval=200ms".into());
            a.push("--v=2".into());
        }
    }
    a
}

impl Tunnel {
    /// Starts the server and one agent per node and waits until every agent
    /// is connected.
    pub async fn start(
        bins: &Bins,
        dir: &Path,
        pki: &ClusterPki,
        mode: Mode,
        server_side: Side,
        agent_side: Side,
        nodes: &[NodeNet],
    ) -> anyhow::Result<Tunnel> {
        Self::start_with(
            bins,
            dir,
            pki,
            mode,
            (server_side, agent_side),
            nodes,
            Extra::default(),
        )
        .await
    }

    /// [`Tunnel::start`] with `extra` flags (kept for restarts).
    pub async fn start_with(
        bins: &Bins,
        dir: &Path,
        pki: &ClusterPki,
        mode: Mode,
        (server_side, agent_side): (Side, Side),
        nodes: &[NodeNet],
        extra: Extra,
    ) -> anyhow::Result<Tunnel> {
        let agent_port = free_port(&CONTROL_PLANE_IP.to_string());
        let health_port = free_port("127.0.0.1");
        let (mut argv, egress) =
            server_argv(server_side, bins, dir, pki, mode, agent_port, health_port);
        argv.extend(extra.server);
        let server = Proc::spawn_cmd(&argv, &[]);
        let mut t = Tunnel {
            egress,
            server,
            agents: Vec::new(),
            server_metrics: format!("127.0.0.1:{health_port}"),
            server_side,
            agent_side,
            agent_port,
            argv,
            agent_extra: extra.agent,
            bins: bins.clone(),
        };
        t.wait_listening().await?;
        for n in nodes {
            let mut a = agent_argv(agent_side, bins, pki, agent_port, n);
            a.extend(t.agent_extra.iter().cloned());
            t.agents.push(Proc::spawn_cmd(&a, &[]));
        }
        t.wait_agents(nodes.len()).await?;
        Ok(t)
    }

    async fn wait_listening(&self) -> anyhow::Result<()> {
        let addr = format!("{CONTROL_PLANE_IP}:{}", self.agent_port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{} server not listening on {addr}; log:\n{}",
                    self.server_side.name(),
                    self.server.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Restarts a stopped agent (node index `i`) with its flags.
    pub fn start_agent(&mut self, i: usize, pki: &ClusterPki, node: &NodeNet) {
        let mut a = agent_argv(self.agent_side, &self.bins, pki, self.agent_port, node);
        a.extend(self.agent_extra.iter().cloned());
        self.agents[i] = Proc::spawn_cmd(&a, &[]);
    }

    /// One more agent in `node`'s namespace (not in [`Tunnel::agents`]), as
    /// `id`, with its own health and admin ports and `extra` flags instead of
    /// the tunnel's.
    pub fn extra_agent(
        &self,
        side: Side,
        pki: &ClusterPki,
        node: &NodeNet,
        id: &str,
        ports: (u16, u16),
        extra: &[String],
    ) -> Proc {
        let mut a = agent_argv(side, &self.bins, pki, self.agent_port, node);
        a.extend([
            format!("--agent-id={id}"),
            format!("--health-server-port={}", ports.0),
            format!("--admin-server-port={}", ports.1),
        ]);
        a.extend(extra.iter().cloned());
        Proc::spawn_cmd(&a, &[])
    }

    /// The server's admin endpoint (`127.0.0.1:<port>`).
    pub fn server_admin(&self) -> String {
        let port = self
            .argv
            .iter()
            .find_map(|a| a.strip_prefix("--admin-port="))
            .unwrap_or("0");
        format!("127.0.0.1:{port}")
    }

    /// The agent listener (`198.51.100.1:<port>`).
    pub fn agent_addr(&self) -> String {
        format!("{CONTROL_PLANE_IP}:{}", self.agent_port)
    }

    /// Kills the server and starts it again with the same flags and ports.
    pub async fn restart_server(&mut self) -> anyhow::Result<()> {
        self.server.kill().await;
        self.server = Proc::spawn_cmd(&self.argv, &[]);
        self.wait_listening().await
    }

    /// The server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        super::http_get(&self.server_metrics, "/metrics")
            .await
            .unwrap_or_default()
    }

    /// Waits until the server counts exactly `n` connected agents (after one
    /// was stopped).
    pub async fn wait_agents_exactly(&self, n: usize) -> anyhow::Result<()> {
        self.wait_ready(n, |ready| ready == n as f64).await
    }

    /// Waits until the server counts at least `n` connected agents.
    pub async fn wait_agents(&self, n: usize) -> anyhow::Result<()> {
        self.wait_ready(n, |ready| ready >= n as f64).await
    }

    async fn wait_ready(&self, n: usize, done: impl Fn(f64) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = super::metric_sum(&self.metrics().await, READY, &[]);
            if done(ready) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                let agent_logs: Vec<String> = self.agents.iter().map(|a| a.tail(20)).collect();
                anyhow::bail!(
                    "want {n} agents connected, the server reports {ready} after 30 s\nserver log:\n{}\nagent logs:\n{}",
                    self.server.tail(20),
                    agent_logs.join("\n---\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server and every agent and waits until they are gone (the
    /// next tunnel reuses the agents' ports in the node namespaces).
    pub async fn stop(mut self) {
        for a in &mut self.agents {
            a.kill().await;
        }
        self.server.kill().await;
    }
}
