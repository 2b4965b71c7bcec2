//! The tunnels under test, started as real processes, and the one client that
//! drives them all: direct TCP (the limit), the TLS floor (a bare mutual-TLS
//! pipe with the tunnel's hops), our server and agent, the upstream Go server
//! and agent, each through the gRPC frontend on a Unix socket and through
//! HTTP CONNECT on a Unix socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use tests::client::{self, GrpcConn, Transport};

/// Per-stage limit of the benchmark's client.
const DIAL_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
use tests::pki::Pki;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};

/// Which implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    /// No tunnel.
    Direct,
    /// Our Rust server and agent, connections on the agent's gRPC stream.
    Ours,
    /// Our Rust server and agent, each connection on a QUIC stream.
    OursQuic,
    /// The upstream Go server and agent.
    Upstream,
    /// The floor: a bare mutual-TLS pipe with the tunnel's hops
    /// ([`crate::floor`]).
    Floor,
}

/// Which frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// No frontend (direct TCP).
    None,
    /// gRPC `ProxyService` on a Unix socket.
    Grpc,
    /// HTTP CONNECT on a Unix socket.
    Connect,
}

/// One column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupKind {
    /// Implementation.
    pub imp: Impl,
    /// Frontend.
    pub front: Front,
}

impl SetupKind {
    /// Name used in the table and in `--setups`.
    pub fn name(&self) -> &'static str {
        match (self.imp, self.front) {
            (Impl::Direct, _) => "direct",
            (Impl::Floor, _) => "tls-floor",
            (Impl::Ours, Front::Grpc) => "ours-grpc",
            (Impl::Ours, _) => "ours-connect",
            (Impl::OursQuic, Front::Grpc) => "ours-quic-grpc",
            (Impl::OursQuic, _) => "ours-quic-connect",
            (Impl::Upstream, Front::Grpc) => "upstream-grpc",
            (Impl::Upstream, _) => "upstream-connect",
        }
    }

    /// Parses a `--setups` entry.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (imp, front) = match s {
            "direct" => (Impl::Direct, Front::None),
            "tls-floor" => (Impl::Floor, Front::None),
            "ours-grpc" => (Impl::Ours, Front::Grpc),
            "ours-connect" => (Impl::Ours, Front::Connect),
            "ours-quic-grpc" => (Impl::OursQuic, Front::Grpc),
            "ours-quic-connect" => (Impl::OursQuic, Front::Connect),
            "upstream-grpc" => (Impl::Upstream, Front::Grpc),
            "upstream-connect" => (Impl::Upstream, Front::Connect),
            _ => bail!("unknown setup {s:?}"),
        };
        Ok(SetupKind { imp, front })
    }
}

/// A started setup.
pub struct Running {
    /// What it is.
    pub kind: SetupKind,
    uds: PathBuf,
    /// Server process id (RSS is read from /proc).
    pub server_pid: Option<u32>,
    /// Agent process id.
    pub agent_pid: Option<u32>,
    children: Vec<Child>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
    }
}

/// CPU time a process's live threads have used so far, in seconds: the sum
/// of `/proc/<pid>/task/*/schedstat` (nanoseconds on the CPU), finer than the
/// 10 ms ticks of `/proc/<pid>/stat`. A thread that exits between two
/// readings takes its time with it; the runtimes' worker threads live as long
/// as the process.
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()? {
        let Ok(task) = task else { continue };
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        ns += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

pub use tests::process::rss_kib;

pub(crate) fn free_port() -> u16 {
    for _ in 0..200 {
        let port = 20000 + (std::process::id() as u16 ^ rand_u16()) % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port")
}

fn rand_u16() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static N: AtomicU16 = AtomicU16::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (t as u16).wrapping_add(N.fetch_add(7919, Ordering::Relaxed))
}

/// Where the binaries are.
pub struct Binaries {
    /// Our release binaries.
    pub ours: PathBuf,
    /// Upstream binaries built from the pinned Go module.
    pub upstream: PathBuf,
}

impl Binaries {
    /// Finds our binaries next to this one; builds the upstream ones with `go
    /// build` in `tests/interop` (the module that pins them) when asked for.
    pub fn prepare(need_upstream: bool) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let ours = exe.parent().context("exe dir")?.to_path_buf();
        for b in ["proxy-server", "proxy-agent"] {
            if !ours.join(b).exists() {
                bail!(
                    "{} missing: run `cargo build --release --bins` first",
                    ours.join(b).display()
                );
            }
        }
        let upstream = ours.join("upstream");
        if need_upstream {
            let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop");
            for (name, pkg) in [
                (
                    "upstream-server",
                    "sigs.k8s.io/apiserver-network-proxy/cmd/server",
                ),
                (
                    "upstream-agent",
                    "sigs.k8s.io/apiserver-network-proxy/cmd/agent",
                ),
            ] {
                let status = std::process::Command::new("go")
                    .args(["build", "-o"])
                    .arg(upstream.join(name))
                    .arg(pkg)
                    .current_dir(&interop)
                    .status()
                    .context("run go build (is Go installed?)")?;
                if !status.success() {
                    bail!("go build {pkg} failed");
                }
            }
        }
        Ok(Binaries { ours, upstream })
    }
}

pub(crate) fn spawn(bin: &Path, args: &[String], capture: bool) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("spawn {}", bin.display()))
}

async fn http_ok(addr: &str, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    out.starts_with(b"HTTP/1.1 200")
}

/// Waits until the server says its agent's QUIC connection is tied.
async fn wait_quic(health: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        let text = tests::cluster::http_get(health, "/metrics").await;
        let tied = text.is_some_and(|t| {
            tests::cluster::metric_sum(
                &t,
                "konnectivity_network_proxy_server_quic_agent_connections",
                &[],
            ) >= 1.0
        });
        if tied {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the agent's QUIC connection was not tied within 6 s")
}

pub(crate) async fn wait_ready(health: &str) -> anyhow::Result<()> {
    for _ in 0..600 {
        if http_ok(health, "/readyz").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("server at {health} never became ready")
}

/// Starts a setup.
pub async fn start(kind: SetupKind, bins: &Binaries, pki: &Pki) -> anyhow::Result<Running> {
    let uds = PathBuf::from(pki.path(&format!("{}.sock", kind.name())));
    let mode = if kind.front == Front::Grpc {
        "grpc"
    } else {
        "http-connect"
    };
    let mut r = Running {
        kind,
        uds: uds.clone(),
        server_pid: None,
        agent_pid: None,
        children: Vec::new(),
    };
    let cert = |p: &Path| p.display().to_string();
    match kind.imp {
        Impl::Direct => {}
        Impl::Floor => {
            let exe = std::env::current_exe()?;
            let files = |cert_file: &Path, key: &Path| {
                vec![
                    format!("--floor-ca={}", cert(&pki.ca)),
                    format!("--floor-cert={}", cert(cert_file)),
                    format!("--floor-key={}", cert(key)),
                ]
            };
            let mut out = Command::new(&exe);
            out.arg("floor-out")
                .args(files(&pki.server.cert, &pki.server.key))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            let mut out = out.spawn().context("spawn floor-out")?;
            let mut line = String::new();
            BufReader::new(out.stdout.take().context("stdout")?)
                .read_line(&mut line)
                .await?;
            let peer: SocketAddr = line.trim().parse().context("floor-out address")?;
            r.agent_pid = out.id();
            r.children.push(out);
            let mut args = vec![
                "floor-in".to_string(),
                format!("--floor-uds={}", uds.display()),
                format!("--floor-peer={peer}"),
            ];
            args.extend(files(&pki.agent.cert, &pki.agent.key));
            let inbound = spawn(&exe, &args, false)?;
            r.server_pid = inbound.id();
            r.children.push(inbound);
            for _ in 0..600 {
                if UnixStream::connect(&uds).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Impl::Ours | Impl::OursQuic => {
            // The test harness's flags (port 0 everywhere), minus the binary name.
            let args = tests::inproc::Server::args(
                pki,
                mode,
                tests::inproc::Listen::Uds,
                &uds.display().to_string(),
                &["--log-format=json".into()],
            );
            let mut server = spawn(&bins.ours.join("proxy-server"), &args[1..], true)?;
            r.server_pid = server.id();
            let stderr = server.stderr.take().context("stderr")?;
            r.children.push(server);
            let mut lines = BufReader::new(stderr).lines();
            let (mut agent_addr, mut health) = (String::new(), String::new());
            while let Some(l) = lines.next_line().await? {
                if l.contains("proxy-server started") {
                    let v: serde_json::Value = serde_json::from_str(&l)?;
                    agent_addr = v["fields"]["agent"].as_str().unwrap_or_default().into();
                    health = v["fields"]["health"].as_str().unwrap_or_default().into();
                    break;
                }
            }
            // Keep draining the log so the server never blocks on it.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let a: SocketAddr = agent_addr.parse().context("server start line")?;
            let args = vec![
                "--proxy-server-host=127.0.0.1".into(),
                format!("--proxy-server-port={}", a.port()),
                format!("--ca-cert={}", cert(&pki.ca)),
                format!("--agent-cert={}", cert(&pki.agent.cert)),
                format!("--agent-key={}", cert(&pki.agent.key)),
                "--agent-id=bench-agent".into(),
                "--health-server-host=127.0.0.1".into(),
                "--health-server-port=0".into(),
                "--admin-server-port=0".into(),
                match kind.imp {
                    Impl::OursQuic => "--transport=quic".into(),
                    _ => "--transport=grpc".into(),
                },
            ];
            let agent = spawn(&bins.ours.join("proxy-agent"), &args, false)?;
            r.agent_pid = agent.id();
            r.children.push(agent);
            wait_ready(&health).await?;
            if kind.imp == Impl::OursQuic {
                wait_quic(&health).await?;
            }
        }
        Impl::Upstream => {
            let (agent_port, health_port, admin_port) = (free_port(), free_port(), free_port());
            let args = vec![
                format!("--mode={mode}"),
                format!("--uds-name={}", uds.display()),
                "--delete-existing-uds-file=true".into(),
                "--server-port=0".into(),
                format!("--agent-port={agent_port}"),
                "--agent-bind-address=127.0.0.1".into(),
                format!("--health-port={health_port}"),
                "--health-bind-address=127.0.0.1".into(),
                format!("--admin-port={admin_port}"),
                "--admin-bind-address=127.0.0.1".into(),
                format!("--cluster-cert={}", cert(&pki.server.cert)),
                format!("--cluster-key={}", cert(&pki.server.key)),
                "--server-id=bench".into(),
                "--v=0".into(),
            ];
            let server = spawn(&bins.upstream.join("upstream-server"), &args, false)?;
            r.server_pid = server.id();
            r.children.push(server);
            let args = vec![
                "--proxy-server-host=127.0.0.1".into(),
                format!("--proxy-server-port={agent_port}"),
                format!("--ca-cert={}", cert(&pki.ca)),
                format!("--agent-cert={}", cert(&pki.agent.cert)),
                format!("--agent-key={}", cert(&pki.agent.key)),
                "--agent-id=bench-agent".into(),
                format!("--health-server-port={}", free_port()),
                format!("--admin-server-port={}", free_port()),
                "--v=0".into(),
            ];
            let agent = spawn(&bins.upstream.join("upstream-agent"), &args, false)?;
            r.agent_pid = agent.id();
            r.children.push(agent);
            wait_ready(&format!("127.0.0.1:{health_port}")).await?;
        }
    }
    Ok(r)
}

/// A connection to a destination, through whatever the setup is.
pub enum Conn {
    /// Direct TCP.
    Tcp(TcpStream),
    /// Through the floor's relays.
    Floor(UnixStream),
    /// HTTP CONNECT tunnel.
    Unix(client::Tunnel),
    /// gRPC tunnel (one HTTP/2 connection per tunnel, as kube-apiserver does).
    Grpc(Box<GrpcConn>, Bytes),
}

impl Running {
    /// Opens a connection to `dst`.
    pub async fn connect(&self, dst: SocketAddr) -> anyhow::Result<Conn> {
        if self.kind.imp == Impl::Floor {
            return Ok(Conn::Floor(crate::floor::connect(&self.uds, dst).await?));
        }
        Ok(match self.kind.front {
            Front::None => {
                let s = TcpStream::connect(dst).await?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Front::Connect => Conn::Unix(
                client::connect_uds(&self.uds, &dst.to_string())
                    .await
                    .map_err(|e| anyhow::anyhow!("CONNECT: {e}"))?,
            ),
            Front::Grpc => {
                let ch = client::channel(&Transport::Unix(self.uds.clone()), DIAL_LIMIT).await?;
                let c = GrpcConn::dial(&ch, &dst.to_string())
                    .await
                    .map_err(|e| anyhow::anyhow!("dial: {e}"))?;
                Conn::Grpc(Box::new(c), Bytes::new())
            }
        })
    }
}

impl Conn {
    /// Writes all of `b`.
    pub async fn write_all(&mut self, b: &[u8]) -> anyhow::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(b).await?,
            Conn::Floor(s) => s.write_all(b).await?,
            Conn::Unix(s) => s.write_all(b).await?,
            Conn::Grpc(c, _) => c.send(Bytes::copy_from_slice(b)).await?,
        }
        Ok(())
    }

    /// Reads some bytes; 0 at EOF.
    pub async fn read(&mut self, buf: &mut [u8]) -> anyhow::Result<usize> {
        Ok(match self {
            Conn::Tcp(s) => s.read(buf).await?,
            Conn::Floor(s) => s.read(buf).await?,
            Conn::Unix(s) => s.read(buf).await?,
            Conn::Grpc(c, left) => {
                if left.is_empty() {
                    match c.recv().await {
                        Some(b) => *left = b,
                        None => return Ok(0),
                    }
                }
                let n = left.len().min(buf.len());
                buf[..n].copy_from_slice(&left[..n]);
                let _ = left.split_to(n);
                n
            }
        })
    }

    /// Reads exactly `buf.len()` bytes.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        let mut off = 0;
        while off < buf.len() {
            let n = self.read(&mut buf[off..]).await?;
            if n == 0 {
                bail!("EOF after {off} of {} bytes", buf.len());
            }
            off += n;
        }
        Ok(())
    }

    /// Closes the connection the way each client does.
    pub async fn close(self) {
        match self {
            Conn::Tcp(mut s) => {
                let _ = s.shutdown().await;
            }
            Conn::Floor(mut s) => {
                let _ = s.shutdown().await;
            }
            Conn::Unix(mut s) => {
                let _ = s.shutdown().await;
            }
            Conn::Grpc(c, _) => {
                c.close().await;
            }
        }
    }
}
