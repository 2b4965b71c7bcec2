//! etcd and kube-apiserver, the real binaries, in the root network namespace,
//! and kubectl as the client.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::net::{CONTROL_PLANE_IP, SERVICE_CIDR};
use super::pki::{ClusterPki, PROXY_CLIENT_CN};
use crate::process::Proc;
use konnectivity_runtime::pki::Leaf;

/// A free TCP port on `ip` (bound and released at once).
pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The built components' directory (`tests/cluster/build.sh` prints it).
#[derive(Debug, Clone)]
pub struct Bins(pub PathBuf);

impl Bins {
    /// Path of component `name`.
    pub fn get(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

/// etcd on loopback with its data in `dir`.
pub struct Etcd {
    /// Client URL.
    pub url: String,
    _proc: Proc,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub async fn start(bins: &Bins, dir: &Path) -> anyhow::Result<Etcd> {
        let client = free_port("127.0.0.1");
        let peer = free_port("127.0.0.1");
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let argv = vec![
            bins.get("etcd"),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let mut proc = Proc::spawn_cmd(&argv, &[]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", client))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = proc.child.try_wait() {
                anyhow::bail!("etcd exited ({status}):\n{}", proc.tail(10));
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("etcd not listening after 30 s:\n{}", proc.tail(10));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Etcd { url, _proc: proc })
    }
}

/// Where kube-apiserver sends its `cluster` egress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// `GRPC` over a Unix socket.
    GrpcUds(PathBuf),
    /// `HTTPConnect` over a Unix socket.
    ConnectUds(PathBuf),
    /// `HTTPConnect` over mutual-TLS TCP to `127.0.0.1:<port>`.
    ConnectTls(u16),
}

impl Egress {
    /// The EgressSelectorConfiguration for this target.
    pub fn config(&self, pki: &ClusterPki) -> String {
        let (protocol, transport) = match self {
            Egress::GrpcUds(p) => ("GRPC", format!("uds:\n          udsName: {}", p.display())),
            Egress::ConnectUds(p) => (
                "HTTPConnect",
                format!("uds:\n          udsName: {}", p.display()),
            ),
            Egress::ConnectTls(port) => (
                "HTTPConnect",
                format!(
                    "tcp:\n          url: https://127.0.0.1:{port}\n          tlsConfig:\n            caBundle: {}\n            clientKey: {}\n            clientCert: {}",
                    pki.ca.display(),
                    pki.tunnel_frontend.key.display(),
                    pki.tunnel_frontend.cert.display()
                ),
            ),
        };
        format!(
            "apiVersion: apiserver.k8s.io/v1beta1\nkind: EgressSelectorConfiguration\negressSelections:\n- name: cluster\n  connection:\n    proxyProtocol: {protocol}\n    transport:\n        {transport}\n"
        )
    }

    /// kube-apiserver's metric labels for this target (protocol, transport).
    pub fn metric_labels(&self) -> (&'static str, &'static str) {
        match self {
            Egress::GrpcUds(_) => ("grpc", "uds"),
            Egress::ConnectUds(_) => ("http_connect", "uds"),
            Egress::ConnectTls(_) => ("http_connect", "tcp"),
        }
    }
}

/// A kube-apiserver.
pub struct ApiServer {
    /// `https://198.51.100.1:<port>`.
    pub url: String,
    proc: Proc,
}

impl ApiServer {
    /// Starts kube-apiserver with `egress` and waits until `/readyz` passes.
    pub async fn start(
        bins: &Bins,
        dir: &Path,
        pki: &ClusterPki,
        etcd: &Etcd,
        port: u16,
        egress: &Egress,
        kubectl: &Kubectl,
    ) -> anyhow::Result<ApiServer> {
        let egress_file = dir.join("egress-selector.yaml");
        std::fs::write(&egress_file, egress.config(pki))?;
        let cp = CONTROL_PLANE_IP.to_string();
        let f = |p: &Path| p.display().to_string();
        let argv = vec![
            bins.get("kube-apiserver"),
            format!("--etcd-servers={}", etcd.url),
            format!("--bind-address={cp}"),
            format!("--advertise-address={cp}"),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", f(&pki.apiserver.cert)),
            format!("--tls-private-key-file={}", f(&pki.apiserver.key)),
            format!("--client-ca-file={}", f(&pki.ca)),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", f(&pki.service_account_pub)),
            format!(
                "--service-account-signing-key-file={}",
                f(&pki.service_account_key)
            ),
            "--authorization-mode=RBAC".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--kubelet-certificate-authority={}", f(&pki.ca)),
            format!(
                "--kubelet-client-certificate={}",
                f(&pki.kubelet_client.cert)
            ),
            format!("--kubelet-client-key={}", f(&pki.kubelet_client.key)),
            format!("--egress-selector-config-file={}", f(&egress_file)),
            format!("--requestheader-client-ca-file={}", f(&pki.front_proxy_ca)),
            format!("--requestheader-allowed-names={PROXY_CLIENT_CN}"),
            "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
            "--requestheader-group-headers=X-Remote-Group".into(),
            "--requestheader-username-headers=X-Remote-User".into(),
            format!("--proxy-client-cert-file={}", f(&pki.proxy_client.cert)),
            format!("--proxy-client-key-file={}", f(&pki.proxy_client.key)),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let proc = Proc::spawn_cmd(&argv, &[]);
        let mut api = ApiServer {
            url: format!("https://{cp}:{port}"),
            proc,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let out = kubectl.run(&["get", "--raw", "/readyz"]).await;
            if out.ok() && out.stdout.trim() == "ok" {
                return Ok(api);
            }
            if let Ok(Some(status)) = api.proc.child.try_wait() {
                anyhow::bail!("kube-apiserver exited ({status}):\n{}", api.tail(10));
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "kube-apiserver not ready after 90 s: {}\nlast log lines:\n{}",
                    out.stderr,
                    api.tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The last `n` log lines.
    pub fn tail(&self, n: usize) -> String {
        self.proc.tail(n)
    }

    /// Stops it.
    pub async fn stop(mut self) {
        self.proc.signal("TERM");
        let _ = tokio::time::timeout(Duration::from_secs(20), self.proc.child.wait()).await;
        self.proc.kill().await;
    }
}

/// Writes a kubeconfig for `server` with the client certificate `user`.
pub fn write_kubeconfig(
    path: &Path,
    server: &str,
    pki: &ClusterPki,
    user: &Leaf,
) -> anyhow::Result<()> {
    let f = |p: &Path| p.display().to_string();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\ncurrent-context: test\n",
        f(&pki.ca),
        f(&user.cert),
        f(&user.key)
    );
    std::fs::write(path, text)?;
    Ok(())
}

/// The output of one kubectl run.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code (`None`: killed, or timed out).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Output {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// Standard output, or an error with everything kubectl said.
    pub fn checked(self, what: &str) -> anyhow::Result<String> {
        if self.ok() {
            Ok(self.stdout)
        } else {
            anyhow::bail!(
                "{what}: exit {:?} after {:?}\nstdout: {}\nstderr: {}",
                self.code,
                self.elapsed,
                self.stdout.trim(),
                self.stderr.trim()
            )
        }
    }
}

/// Real kubectl with the admin kubeconfig.
#[derive(Debug, Clone)]
pub struct Kubectl {
    /// The binary.
    pub bin: String,
    /// The kubeconfig.
    pub kubeconfig: PathBuf,
    /// Bound on one run.
    pub timeout: Duration,
}

impl Kubectl {
    /// A command line with the kubeconfig set.
    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.bin);
        // Its discovery cache beside the kubeconfig, not in ~/.kube.
        let cache = self.kubeconfig.with_file_name("kubectl-cache");
        c.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", cache.display()))
            .args(args)
            .envs(env.iter().copied())
            .kill_on_drop(true);
        c
    }

    /// Runs kubectl `args` to completion (bounded by `timeout`).
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[], None).await
    }

    /// Runs kubectl `args` (which ask for `-o json`) and parses its output.
    pub async fn json(&self, args: &[&str], what: &str) -> anyhow::Result<serde_json::Value> {
        let out = self.run(args).await.checked(what)?;
        serde_json::from_str(&out).map_err(|e| anyhow::anyhow!("{what}: not JSON: {e}"))
    }

    /// Runs kubectl with extra environment and optional standard input.
    pub async fn run_with(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Option<&[u8]>,
    ) -> Output {
        let start = std::time::Instant::now();
        let mut c = self.command(args, env);
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = match c.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Output {
                    code: None,
                    stdout: String::new(),
                    stderr: format!("spawn kubectl: {e}"),
                    elapsed: start.elapsed(),
                }
            }
        };
        if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
            let data = data.to_vec();
            tokio::spawn(async move {
                let _ = w.write_all(&data).await;
                let _ = w.shutdown().await;
            });
        }
        match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(o)) => Output {
                code: o.status.code(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
                elapsed: start.elapsed(),
            },
            Ok(Err(e)) => Output {
                code: None,
                stdout: String::new(),
                stderr: format!("wait for kubectl: {e}"),
                elapsed: start.elapsed(),
            },
            Err(_) => Output {
                code: None,
                stdout: String::new(),
                stderr: format!(
                    "kubectl {} timed out after {:?}",
                    args.join(" "),
                    self.timeout
                ),
                elapsed: start.elapsed(),
            },
        }
    }

    /// `kubectl apply -f -` with `yaml`.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        self.run_with(&["apply", "-f", "-"], &[], Some(yaml.as_bytes()))
            .await
            .checked("kubectl apply")?;
        Ok(())
    }
}
