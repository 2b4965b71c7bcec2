//! One node: kwok serving the kubelet API on the node's InternalIP inside the
//! node's network namespace (with a serving certificate from the cluster CA,
//! so kube-apiserver verifies it through the tunnel), the pod it runs, and
//! what that pod's logs, exec, attach and port-forward reach.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::control_plane::{Bins, Kubectl};
use super::net::NodeNet;
use super::pki::ClusterPki;
use crate::process::{binary, Proc};
use konnectivity_runtime::pki::Leaf;

/// The port the pod's port-forward cases ask for.
pub const POD_PORT: u16 = 8080;
/// Where the stand-in pod's HTTP server listens inside the node namespace.
const POD_HTTP: &str = "127.0.0.1:18080";

/// A running node.
pub struct Node {
    /// Its network.
    pub net: NodeNet,
    /// The pod scheduled on it.
    pub pod: String,
    /// The pod's container log (CRI format), what `kubectl logs` shows.
    pub log_file: PathBuf,
    /// What `kubectl attach` follows.
    pub attach_file: PathBuf,
    lines: std::sync::Mutex<Vec<String>>,
    /// The exec working directory (the "container filesystem").
    pub rootfs: PathBuf,
    kwok: Proc,
    kwok_argv: Vec<String>,
    kwok_home: String,
    _pod_http: Proc,
}

/// One CRI log line.
pub fn cri_line(text: &str) -> String {
    format!("2026-01-01T00:00:00.000000000Z stdout F {text}\n")
}

impl Node {
    /// The lines `kubectl logs` shows now.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Appends a line to the container log.
    pub fn append_log(&self, text: &str) {
        let mut lines = self.lines.lock().expect("lines");
        append(&self.log_file, &cri_line(text));
        lines.push(text.to_string());
    }

    /// Appends a line to what `kubectl attach` follows.
    pub fn append_attach(&self, text: &str) {
        append(&self.attach_file, &cri_line(text));
    }

    /// The node namespace's network namespace id, as a process inside it
    /// reads it from `/proc/self/ns/net`.
    pub fn netns_id(&self) -> String {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.net.netns,
                "readlink",
                "/proc/self/ns/net",
            ])
            .output()
            .expect("readlink in the node namespace");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Registers the node and its pod and starts kwok for them; returns once
    /// the pod is Running.
    pub async fn start(
        bins: &Bins,
        dir: &Path,
        pki: &ClusterPki,
        kubectl: &Kubectl,
        kwok_config: &Path,
        net: NodeNet,
    ) -> anyhow::Result<Node> {
        let base = dir.join(&net.name);
        let rootfs = base.join("rootfs");
        let home = base.join("home");
        std::fs::create_dir_all(&rootfs)?;
        std::fs::create_dir_all(&home)?;
        let pod = format!("app-{}", net.name);
        let log_file = base.join("app.log");
        let attach_file = base.join("attach.log");
        let lines: Vec<String> = (1..=3).map(|i| format!("line {i} from {pod}")).collect();
        std::fs::write(
            &log_file,
            lines.iter().map(|l| cri_line(l)).collect::<String>(),
        )?;
        std::fs::write(&attach_file, "")?;
        let debug = base.join("debug.yaml");
        let (pf_ip, pf_port) = POD_HTTP.split_once(':').expect("addr");
        std::fs::write(
            &debug,
            format!(
                "apiVersion: kwok.x-k8s.io/v1alpha1\nkind: ClusterLogs\nmetadata: {{name: logs}}\nspec:\n  logs:\n  - logsFile: {}\n---\napiVersion: kwok.x-k8s.io/v1alpha1\nkind: ClusterAttach\nmetadata: {{name: attach}}\nspec:\n  attaches:\n  - logsFile: {}\n---\napiVersion: kwok.x-k8s.io/v1alpha1\nkind: ClusterExec\nmetadata: {{name: exec}}\nspec:\n  execs:\n  - local:\n      workDir: {}\n      envs:\n      - {{name: NODE_NAME, value: {}}}\n---\napiVersion: kwok.x-k8s.io/v1alpha1\nkind: ClusterPortForward\nmetadata: {{name: pf}}\nspec:\n  forwards:\n  - ports: [{POD_PORT}]\n    target: {{address: {pf_ip}, port: {pf_port}}}\n",
                log_file.display(),
                attach_file.display(),
                rootfs.display(),
                net.name,
            ),
        )?;

        kubectl
            .apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n    metrics.k8s.io/resource-metrics-path: /metrics/nodes/{name}/metrics/resource\n  labels: {{kubernetes.io/hostname: {name}, kubernetes.io/os: linux, type: kwok}}\nspec:\n  podCIDR: {cidr}\n  podCIDRs: [{cidr}]\n",
                name = net.name,
                cidr = net.pod_cidr
            ))
            .await?;

        let serving = pki.kubelet_serving(&net)?;
        let ip = net.kubelet_ip.to_string();
        let mut argv = net.exec_prefix();
        argv.extend([
            bins.get("kwok"),
            format!("--manage-single-node={}", net.name),
            format!("--node-ip={ip}"),
            "--node-port=10250".into(),
            format!("--server-address={ip}:10250"),
            format!("--tls-cert-file={}", serving.cert.display()),
            format!("--tls-private-key-file={}", serving.key.display()),
            format!("--cidr={}", net.pod_cidr),
            "--node-lease-duration-seconds=0".into(),
            format!("--kubeconfig={}", kubectl.kubeconfig.display()),
        ]);
        for entry in std::fs::read_dir(kwok_config)? {
            argv.push(format!("--config={}", entry?.path().display()));
        }
        argv.push(format!("--config={}", debug.display()));
        let kwok_home = home.display().to_string();
        let kwok = Proc::spawn_cmd(&argv, &[("HOME", kwok_home.clone())]);

        let mut http = net.exec_prefix();
        http.push(binary("pod-http").display().to_string());
        http.push(POD_HTTP.into());
        let pod_http = Proc::spawn_cmd(&http, &[]);

        kubectl
            .apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: default\nspec:\n  nodeName: {}\n  containers:\n  - name: app\n    image: app\n",
                net.name
            ))
            .await?;
        let node = Node {
            net,
            pod,
            log_file,
            attach_file,
            lines: std::sync::Mutex::new(lines),
            rootfs,
            kwok,
            kwok_argv: argv,
            kwok_home,
            _pod_http: pod_http,
        };
        node.wait_running(kubectl).await?;
        Ok(node)
    }

    /// Stops the node's kubelet (kwok): its port then refuses connections.
    pub async fn stop_kubelet(&mut self) {
        self.kwok.kill().await;
    }

    /// Starts the kubelet again, serving `serving` (its usual certificate
    /// when `None`), and waits until its port accepts (from inside the
    /// node's namespace).
    pub async fn start_kubelet(&mut self, serving: Option<&Leaf>) -> anyhow::Result<()> {
        self.kwok.kill().await;
        let mut argv = self.kwok_argv.clone();
        if let Some(leaf) = serving {
            for a in argv.iter_mut() {
                if a.starts_with("--tls-cert-file=") {
                    *a = format!("--tls-cert-file={}", leaf.cert.display());
                } else if a.starts_with("--tls-private-key-file=") {
                    *a = format!("--tls-private-key-file={}", leaf.key.display());
                }
            }
        }
        self.kwok = Proc::spawn_cmd(&argv, &[("HOME", self.kwok_home.clone())]);
        let addr = format!("{}:10250", self.net.kubelet_ip);
        let mut probe = self.net.exec_prefix();
        probe.extend([
            "bash".into(),
            "-c".into(),
            format!("exec 3<>/dev/tcp/{}/10250", self.net.kubelet_ip),
        ]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ok = tokio::process::Command::new(&probe[0])
                .args(&probe[1..])
                .output()
                .await
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "kubelet {addr} not listening after 30 s; kwok log:\n{}",
                    self.kwok.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_running(&self, kubectl: &Kubectl) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = kubectl
                .run(&["get", "pod", &self.pod, "-o", "jsonpath={.status.phase}"])
                .await;
            if out.stdout.trim() == "Running" {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "pod {} not Running after 60 s ({} {}); kwok log:\n{}",
                    self.pod,
                    out.stdout,
                    out.stderr,
                    self.kwok.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for append");
    f.write_all(text.as_bytes()).expect("append");
}

/// The local address in kubectl port-forward's `Forwarding from
/// 127.0.0.1:<port> -> ...` line.
pub fn forwarded_addr(line: &str) -> Option<String> {
    let port = line.split("127.0.0.1:").nth(1)?.split_whitespace().next()?;
    Some(format!("127.0.0.1:{port}"))
}

/// `GET /pattern/<n>` from the stand-in pod's HTTP server at `addr` (through
/// a port-forward); reads the whole body and, with `verify`, compares every
/// byte with the test pattern.
pub async fn get_pattern(addr: &str, n: usize, verify: bool) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /pattern/{n} HTTP/1.1\r\nHost: pod\r\n\r\n").as_bytes())
        .await?;
    let mut r = tokio::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).await?;
    anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "status {status:?}");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await?;
        if h == "\r\n" {
            break;
        }
        anyhow::ensure!(!h.is_empty(), "connection closed in the headers");
    }
    let mut want = crate::Pattern::new(n as u64);
    let mut got_buf = vec![0u8; 256 << 10];
    let mut left = n;
    while left > 0 {
        let k = r.read(&mut got_buf[..left.min(256 << 10)]).await?;
        anyhow::ensure!(k > 0, "body ended {left} bytes early");
        if verify {
            anyhow::ensure!(
                want.matches(&got_buf[..k]),
                "body differs within the {k} bytes from byte {}",
                n - left
            );
        }
        left -= k;
    }
    Ok(())
}
