//! `proxy-server` and `proxy-agent` run in this process through their library
//! entry points, with the real flag parsing, on port 0.

use std::net::SocketAddr;

use clap::Parser;
use konnectivity_runtime::shutdown::Shutdown;
use proxy_server::FrontendAddr;
use tokio::task::JoinHandle;

use crate::pki::Pki;

/// Frontend listener kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Unix socket in the PKI temp dir.
    Uds,
    /// TCP with mutual TLS on 127.0.0.1:0.
    Tls,
}

/// A running in-process server.
pub struct Server {
    /// Frontend address.
    pub frontend: FrontendAddr,
    /// Agent listener.
    pub agent_addr: SocketAddr,
    /// The agents' QUIC endpoint (UDP), when offered.
    pub agent_quic: Option<SocketAddr>,
    /// Health listener.
    pub health: SocketAddr,
    /// Admin listener, when separate from health.
    pub admin: Option<SocketAddr>,
    /// Metrics.
    pub metrics: proxy_server::metrics::Metrics,
    /// Stops it.
    pub shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Server flags for this PKI, port 0 everywhere, plus `extra`.
    pub fn args(pki: &Pki, mode: &str, listen: Listen, uds: &str, extra: &[String]) -> Vec<String> {
        let mut a = vec![
            "proxy-server".to_string(),
            format!("--mode={mode}"),
            "--agent-port=0".into(),
            "--agent-bind-address=127.0.0.1".into(),
            "--health-port=0".into(),
            "--health-bind-address=127.0.0.1".into(),
            "--admin-port=0".into(),
            "--admin-bind-address=127.0.0.1".into(),
            format!("--cluster-cert={}", pki.server.cert.display()),
            format!("--cluster-key={}", pki.server.key.display()),
        ];
        match listen {
            Listen::Uds => {
                a.push(format!("--uds-name={uds}"));
                a.push("--delete-existing-uds-file=true".into());
            }
            Listen::Tls => {
                a.push("--server-port=0".into());
                a.push("--server-bind-address=127.0.0.1".into());
                a.push(format!("--server-cert={}", pki.server.cert.display()));
                a.push(format!("--server-key={}", pki.server.key.display()));
                a.push(format!("--server-ca-cert={}", pki.ca.display()));
            }
        }
        a.extend(extra.iter().cloned());
        a
    }

    /// Starts a server; `extra` flags are appended.
    pub async fn start(pki: &Pki, mode: &str, listen: Listen, extra: &[&str]) -> Server {
        let uds = pki.path(&format!("proxy-{}.sock", rand_suffix()));
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_args(Self::args(pki, mode, listen, &uds, &extra)).await
    }

    /// Starts a server from full flags.
    pub async fn start_args(args: Vec<String>) -> Server {
        let args = proxy_server::config::Args::try_parse_from(args).expect("server flags");
        let config = proxy_server::Config::from_args(args).expect("server config");
        let bound = proxy_server::bind(config).await.expect("server bind");
        let shutdown = Shutdown::new();
        Server {
            frontend: bound.frontend_addr(),
            agent_addr: bound.agent_addr(),
            agent_quic: bound.agent_quic_addr(),
            health: bound.health_addr(),
            admin: bound.admin_addr(),
            metrics: bound.metrics(),
            shutdown: shutdown.clone(),
            task: tokio::spawn(bound.run(shutdown)),
        }
    }

    /// The Unix socket path (panics for TCP frontends).
    pub fn uds(&self) -> std::path::PathBuf {
        match &self.frontend {
            FrontendAddr::Unix(p) => p.clone(),
            FrontendAddr::Tcp(_) => panic!("not a Unix frontend"),
        }
    }

    /// The TCP frontend address (panics for Unix frontends).
    pub fn tcp(&self) -> SocketAddr {
        match &self.frontend {
            FrontendAddr::Tcp(a) => *a,
            FrontendAddr::Unix(_) => panic!("not a TCP frontend"),
        }
    }

    /// Waits until `n` agent streams are connected.
    pub async fn wait_agents(&self, n: i64) {
        let m = self.metrics.clone();
        crate::eventually(
            std::time::Duration::from_secs(20),
            "agents to connect",
            || {
                let v = m.ready_backend_connections.get();
                async move { (v >= n).then_some(()) }
            },
        )
        .await
    }

    /// Waits until `n` agent streams have a QUIC connection tied to them.
    pub async fn wait_quic(&self, n: i64) {
        let m = self.metrics.clone();
        crate::eventually(
            std::time::Duration::from_secs(20),
            "agents' QUIC connections",
            || {
                let v = m.quic_connections.get();
                async move { (v >= n).then_some(()) }
            },
        )
        .await
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) {
        self.shutdown.now();
        let _ = self.task.await;
    }
}

/// A running in-process agent.
pub struct Agent {
    /// Health listener.
    pub health: SocketAddr,
    /// Metrics.
    pub metrics: proxy_agent::metrics::Metrics,
    /// Stops it.
    pub shutdown: Shutdown,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// Agent flags connecting to `server` as `id`, plus `extra`.
    pub fn args(pki: &Pki, server: SocketAddr, id: &str, extra: &[&str]) -> Vec<String> {
        let mut a = vec![
            "proxy-agent".to_string(),
            format!("--proxy-server-host={}", server.ip()),
            format!("--proxy-server-port={}", server.port()),
            format!("--ca-cert={}", pki.ca.display()),
            format!("--agent-cert={}", pki.agent.cert.display()),
            format!("--agent-key={}", pki.agent.key.display()),
            format!("--agent-id={id}"),
            "--health-server-host=127.0.0.1".into(),
            "--health-server-port=0".into(),
            "--admin-bind-address=127.0.0.1".into(),
            "--admin-server-port=0".into(),
            "--sync-interval=50ms".into(),
            "--sync-interval-cap=500ms".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Starts an agent.
    pub async fn start(pki: &Pki, server: SocketAddr, id: &str, extra: &[&str]) -> Agent {
        Self::start_args(Self::args(pki, server, id, extra)).await
    }

    /// Starts an agent from full flags.
    pub async fn start_args(args: Vec<String>) -> Agent {
        let args = proxy_agent::config::Args::try_parse_from(args).expect("agent flags");
        let config = proxy_agent::Config::from_args(args).expect("agent config");
        let bound = proxy_agent::bind(config).await.expect("agent bind");
        let shutdown = Shutdown::new();
        Agent {
            health: bound.health_addr(),
            metrics: bound.metrics(),
            shutdown: shutdown.clone(),
            task: tokio::spawn(bound.run(shutdown)),
        }
    }

    /// Stops the agent at once and waits for it.
    pub async fn stop(self) {
        self.shutdown.now();
        let _ = self.task.await;
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A server with a Unix-socket frontend and one agent named "agent",
/// connected. `server_extra` and `agent_extra` are appended flags.
pub async fn pair(
    pki: &Pki,
    mode: &str,
    server_extra: &[&str],
    agent_extra: &[&str],
) -> (Server, Agent) {
    let server = Server::start(pki, mode, Listen::Uds, server_extra).await;
    let agent = Agent::start(pki, server.agent_addr, "agent", agent_extra).await;
    server.wait_agents(1).await;
    (server, agent)
}
