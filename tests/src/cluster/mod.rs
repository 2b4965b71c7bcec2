//! A real control plane for end-to-end tests: etcd, kube-apiserver, kwok as
//! the kubelet of each node, metrics-server, and real kubectl, with our tunnel
//! (or the upstream one) as kube-apiserver's `cluster` egress.
//!
//! The components are built by `tests/cluster/build.sh` from the Go module
//! registry; `KUBE_E2E_BIN` names their directory. See `net` for the network
//! layout: nodes in network namespaces whose kubelet addresses the control
//! plane cannot reach except through the tunnel.

pub mod control_plane;
pub mod net;
pub mod node;
pub mod pki;
pub mod tunnel;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use control_plane::{ApiServer, Bins, Egress, Etcd, Kubectl, Output};
pub use net::{Net, NodeNet, CONTROL_PLANE_IP};
pub use node::Node;
pub use pki::ClusterPki;
pub use tunnel::{Mode, Side, Tunnel};

/// Where metrics-server listens: node 1's kubelet address, another port, so
/// the aggregator reaches it through the tunnel (`destHost` picks node 1).
pub const METRICS_SERVER_PORT: u16 = 4443;

/// The whole cluster. Fields drop in order: processes first, the network last.
pub struct Cluster {
    /// kube-apiserver (restarted for each egress configuration).
    pub api: Option<ApiServer>,
    /// The nodes, in order.
    pub nodes: Vec<Node>,
    /// Nodes, pods, metrics-server and its APIService are all registered.
    registered: bool,
    metrics_server: Option<crate::process::Proc>,
    /// etcd.
    pub etcd: Etcd,
    /// kubectl with the admin kubeconfig.
    pub kubectl: Kubectl,
    /// Certificates.
    pub pki: ClusterPki,
    /// The built components.
    pub bins: Bins,
    api_port: u16,
    /// The egress kube-apiserver last started with.
    egress: Option<Egress>,
    /// Bridge, namespaces, routes.
    pub net: Net,
    /// Scratch space (sockets, configs, logs, etcd data). Dropped after the
    /// network; the processes above were killed (not awaited) before both.
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Builds the network and PKI and starts etcd; nothing Kubernetes yet.
    pub async fn prepare(bins: Bins, nodes: usize) -> anyhow::Result<Cluster> {
        let net = Net::create(nodes).map_err(|e| anyhow::anyhow!("test network: {e}"))?;
        let dir = tempfile::Builder::new().prefix("knp-cluster-").tempdir()?;
        let pki = ClusterPki::new(dir.path())?;
        let etcd = Etcd::start(&bins, dir.path()).await?;
        let api_port = control_plane::free_port(&CONTROL_PLANE_IP.to_string());
        let kubeconfig = dir.path().join("admin.kubeconfig");
        control_plane::write_kubeconfig(
            &kubeconfig,
            &format!("https://{CONTROL_PLANE_IP}:{api_port}"),
            &pki,
            &pki.admin,
        )?;
        let kubectl = Kubectl {
            bin: bins.get("kubectl"),
            kubeconfig,
            timeout: Duration::from_secs(120),
        };
        Ok(Cluster {
            api: None,
            nodes: Vec::new(),
            registered: false,
            metrics_server: None,
            etcd,
            kubectl,
            pki,
            bins,
            api_port,
            egress: None,
            net,
            dir,
        })
    }

    /// (Re)starts kube-apiserver with `egress` as its `cluster` egress; on
    /// the first start also registers the nodes (kwok) and metrics-server.
    pub async fn start_apiserver(&mut self, egress: &Egress) -> anyhow::Result<()> {
        self.restart_apiserver_with(egress).await?;
        if !self.registered {
            // All or nothing: a partial registration would make every later
            // setup fail for a reason it does not show.
            anyhow::ensure!(
                self.nodes.is_empty(),
                "an earlier cluster registration failed half-way"
            );
            let kwok_config = self.bins.0.join("kwok-config");
            for n in self.net.nodes.clone() {
                let node = Node::start(
                    &self.bins,
                    self.dir.path(),
                    &self.pki,
                    &self.kubectl,
                    &kwok_config,
                    n,
                )
                .await?;
                self.nodes.push(node);
            }
            self.start_metrics_server().await?;
            self.registered = true;
        }
        self.wait_metrics_api().await
    }

    /// Starts kube-apiserver again with the egress it last had (after
    /// `api.take()` stopped it), waiting for `/readyz` only.
    pub async fn restart_apiserver(&mut self) -> anyhow::Result<()> {
        let egress = self
            .egress
            .clone()
            .context("kube-apiserver never started")?;
        self.restart_apiserver_with(&egress).await
    }

    async fn restart_apiserver_with(&mut self, egress: &Egress) -> anyhow::Result<()> {
        if let Some(old) = self.api.take() {
            old.stop().await;
        }
        let api = ApiServer::start(
            &self.bins,
            self.dir.path(),
            &self.pki,
            &self.etcd,
            self.api_port,
            egress,
            &self.kubectl,
        )
        .await?;
        self.api = Some(api);
        self.egress = Some(egress.clone());
        Ok(())
    }

    /// Waits until the aggregator calls the metrics API available (it
    /// reaches metrics-server through the tunnel).
    async fn wait_metrics_api(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let out = self
                .kubectl
                .run(&[
                    "get",
                    "apiservice",
                    "v1beta1.metrics.k8s.io",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
                ])
                .await;
            if out.stdout.trim() == "True" {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "metrics API not available after 90 s ({} {}); metrics-server log:\n{}",
                    out.stdout,
                    out.stderr,
                    self.metrics_server_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn start_metrics_server(&mut self) -> anyhow::Result<()> {
        let n = &self.net.nodes[0];
        let kc = self.kubectl.kubeconfig.display().to_string();
        let mut argv = n.exec_prefix();
        argv.extend([
            self.bins.get("metrics-server"),
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            format!("--bind-address={}", n.kubelet_ip),
            format!("--secure-port={METRICS_SERVER_PORT}"),
            format!(
                "--cert-dir={}",
                self.dir.path().join("metrics-server").display()
            ),
            "--kubelet-insecure-tls".into(),
            "--kubelet-use-node-status-port".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--metric-resolution=15s".into(),
        ]);
        self.metrics_server = Some(crate::process::Proc::spawn_cmd(&argv, &[]));
        self.kubectl
            .apply(&format!(
                "apiVersion: v1
kind: Service
metadata: {{name: metrics-server, namespace: kube-system}}
spec:
  type: ExternalName
  externalName: {}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {{name: v1beta1.metrics.k8s.io}}
spec:
  service: {{name: metrics-server, namespace: kube-system, port: {METRICS_SERVER_PORT}}}
  group: metrics.k8s.io
  version: v1beta1
  insecureSkipTLSVerify: true
  groupPriorityMinimum: 100
  versionPriority: 100
",
                n.kubelet_ip
            ))
            .await
    }

    /// metrics-server's log so far.
    pub fn metrics_server_log(&self) -> String {
        self.metrics_server
            .as_ref()
            .map(|p| p.logs().join("\n"))
            .unwrap_or_default()
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.net.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }
}

/// Why the cluster suite cannot run here (`None`: it can).
pub fn unavailable() -> Option<String> {
    let Some(dir) = std::env::var_os("KUBE_E2E_BIN") else {
        return Some(
            "KUBE_E2E_BIN is not set (run `bash tests/cluster/run.sh`, which builds the components)"
                .into(),
        );
    };
    let dir = PathBuf::from(dir);
    let missing_tool = ["ip", "script"].into_iter().find(|t| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    });
    if let Some(t) = missing_tool {
        return Some(format!("`{t}` is not installed (iproute2, bsdutils)"));
    }
    let ours = crate::process::binary_dir();
    for b in ["proxy-server", "proxy-agent", "pod-http"] {
        if !ours.join(b).exists() {
            return Some(format!(
                "{} is missing (cargo build --workspace --bins)",
                ours.join(b).display()
            ));
        }
    }
    for b in [
        "kube-apiserver",
        "kubectl",
        "etcd",
        "kwok",
        "metrics-server",
        "upstream-server",
        "upstream-agent",
        "kwok-config",
    ] {
        if !dir.join(b).exists() {
            return Some(format!("{} is missing", dir.join(b).display()));
        }
    }
    if !nix_root() {
        return Some("needs root for network namespaces".into());
    }
    None
}

fn nix_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// A plain HTTP/1.1 GET on `addr`; the body, or `None` on any failure.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Some(dechunk(body));
        }
        Some(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The sum of the samples of metric `name` in Prometheus text whose labels
/// include every `key="value"` of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            if !labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_match_labels() {
        let text = "# HELP x\nx{a=\"1\",b=\"2\"} 3\nx{a=\"1\",b=\"3\"} 4\nxy 9\nx 1\n";
        assert_eq!(metric_sum(text, "x", &[("a", "1")]), 7.0);
        assert_eq!(metric_sum(text, "x", &[("b", "3")]), 4.0);
        assert_eq!(metric_sum(text, "x", &[]), 8.0);
        assert_eq!(metric_sum(text, "y", &[]), 0.0);
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
