//! The real-cluster suite: kube-apiserver, etcd, kwok kubelets in node network
//! namespaces, metrics-server, and real kubectl, with the tunnel as
//! kube-apiserver's only way to the nodes. Every case runs in every egress
//! mode (GRPC over a Unix socket, HTTPConnect over a Unix socket and over
//! mutual-TLS TCP), with our server and agents, then with the upstream agent
//! under our server, our agent under the upstream server, and last the
//! upstream server and agent together (the baseline that tells a fault of
//! ours from one of the environment).
//!
//! Run it with `bash tests/cluster/run.sh` (builds the components first).
//! Without them (`KUBE_E2E_BIN` unset) it says why and skips, unless
//! `KUBE_E2E_REQUIRED=1`, where that is a failure. `KUBE_E2E_SETUPS` picks
//! setups by substring (e.g. `grpc-uds server=ours agent=ours`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tests::cluster::{self, Bins, Cluster, Mode, Node, Side, Tunnel};

#[path = "cluster/diagnose.rs"]
mod diagnose;
#[path = "cluster/kube.rs"]
mod kube;
use tokio::io::{AsyncBufReadExt, BufReader};

/// One pairing of server and agent in one egress mode.
#[derive(Debug, Clone, Copy)]
struct Setup {
    mode: Mode,
    server: Side,
    agent: Side,
}

impl Setup {
    fn name(&self) -> String {
        format!(
            "{} server={} agent={}",
            self.mode.name(),
            self.server.name(),
            self.agent.name()
        )
    }
}

/// Whether a group of cases beyond the setups runs (`kubernetes-api`:
/// TokenReview, Leases, manifests; `diagnose`: the diagnose command): always,
/// unless `KUBE_E2E_SETUPS` names setups and not this group.
fn group_selected(group: &str) -> bool {
    match std::env::var("KUBE_E2E_SETUPS") {
        Ok(f) => f.split(',').any(|f| group.contains(f.trim())),
        Err(_) => true,
    }
}

fn setups() -> Vec<Setup> {
    let mut v = Vec::new();
    // Upstream with upstream last: the baseline that tells a fault of ours
    // from one of the environment.
    for (server, agent) in [
        (Side::Ours, Side::Ours),
        (Side::Ours, Side::Upstream),
        (Side::Upstream, Side::Ours),
        (Side::Upstream, Side::Upstream),
    ] {
        for mode in Mode::ALL {
            v.push(Setup {
                mode,
                server,
                agent,
            });
        }
    }
    if let Ok(filter) = std::env::var("KUBE_E2E_SETUPS") {
        v.retain(|s| filter.split(',').any(|f| s.name().contains(f.trim())));
    }
    v
}

#[derive(Default)]
struct Report {
    passed: usize,
    failed: Vec<String>,
    /// The direct-path case ran (once, in the first setup that gets the
    /// kubelets up).
    network_checked: bool,
}

impl Report {
    /// A set-up step's value, or its failure recorded as `[setup] what`.
    fn step<T>(&mut self, setup: &str, what: &str, r: anyhow::Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                println!("FAIL [{setup}] {what}: {e:#}");
                self.failed.push(format!("[{setup}] {what}"));
                None
            }
        }
    }

    async fn case<F>(&mut self, setup: &str, name: &str, limit: Duration, f: F)
    where
        F: Future<Output = anyhow::Result<()>>,
    {
        let start = Instant::now();
        let result = match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("timed out after {limit:?}")),
        };
        let took = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("ok   [{setup}] {name} ({took:.1} s)");
            }
            Err(e) => {
                println!("FAIL [{setup}] {name} ({took:.1} s): {e:#}");
                self.failed.push(format!("[{setup}] {name}"));
            }
        }
    }
}

fn main() {
    match cluster::unavailable() {
        Some(why) if std::env::var("KUBE_E2E_REQUIRED").as_deref() == Ok("1") => {
            println!("cluster suite cannot run: {why}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
        Some(why) => {
            println!("SKIPPED: cluster suite: {why}");
            return;
        }
        None => {}
    }
    if setups().is_empty() && !group_selected("kubernetes-api") && !group_selected("diagnose") {
        println!("KUBE_E2E_SETUPS matches no setup");
        println!("0 passed, 1 failed");
        std::process::exit(1);
    }
    // Children talk to 198.51.100.0/24 and loopback only; a proxy configured
    // for the machine must not take that traffic.
    std::env::set_var("NO_PROXY", "198.51.100.0/24,127.0.0.1,localhost");
    std::env::set_var("no_proxy", "198.51.100.0/24,127.0.0.1,localhost");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let report = rt.block_on(run());
    println!();
    for f in &report.failed {
        println!("failed: {f}");
    }
    println!("{} passed, {} failed", report.passed, report.failed.len());
    if !report.failed.is_empty() {
        std::process::exit(1);
    }
}

async fn run() -> Report {
    let mut report = Report::default();
    let bins = Bins(std::env::var_os("KUBE_E2E_BIN").expect("checked").into());
    let mut cluster = match Cluster::prepare(bins, 2).await {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL cluster set-up: {e:#}");
            report.failed.push("cluster set-up".into());
            return report;
        }
    };
    for setup in setups() {
        run_setup(&mut cluster, setup, &mut report).await;
    }
    if group_selected("kubernetes-api") {
        kube::run(&mut cluster, &mut report).await;
    }
    if group_selected("diagnose") {
        diagnose::run(&mut cluster, &mut report).await;
    }
    report
}

async fn run_setup(cluster: &mut Cluster, setup: Setup, report: &mut Report) {
    let name = setup.name();
    println!("== {name}");
    let started = Tunnel::start(
        &cluster.bins,
        cluster.dir.path(),
        &cluster.pki,
        setup.mode,
        setup.server,
        setup.agent,
        &cluster.net.nodes,
    )
    .await;
    let Some(tunnel) = report.step(&name, "tunnel start", started) else {
        return;
    };
    let up = cluster.start_apiserver(&tunnel.egress).await;
    if report.step(&name, "kube-apiserver start", up).is_none() {
        return;
    }
    let mut tunnel = tunnel;
    let c = &*cluster;
    if !c.nodes.is_empty() && !report.network_checked {
        // Once, with the kubelets up: the tunnel is the only way to them.
        report.network_checked = true;
        report
            .case(
                "network",
                "the control plane cannot reach a kubelet directly",
                Duration::from_secs(20),
                direct_path_fails(c),
            )
            .await;
    }
    let (n1, n2) = (c.node("node-1"), c.node("node-2"));
    let short = Duration::from_secs(60);
    let dials_before = egress_dials(c, &tunnel)
        .await
        .map(|d| (d.0, d.1))
        .unwrap_or((0.0, 0.0));

    // `logs -f` starts first and is checked again after the other cases, at
    // least a minute later, having been idle meanwhile.
    let mut follow = None;
    report
        .case(&name, "logs -f streams appended lines", short, async {
            follow = Some(Follow::start(c, n2).await?);
            Ok(())
        })
        .await;

    report
        .case(
            &name,
            "logs (exact lines, both nodes)",
            short,
            logs_exact(c),
        )
        .await;
    for ws in [true, false] {
        let via = if ws { "WebSocket" } else { "SPDY" };
        report
            .case(
                &name,
                &format!("exec runs in the node's namespace ({via})"),
                short,
                exec_netns(c, n1, ws),
            )
            .await;
        report
            .case(
                &name,
                &format!("exec -i with 50 MB of stdin ({via})"),
                Duration::from_secs(180),
                exec_stdin(c, n1, ws, 50 << 20),
            )
            .await;
        report
            .case(
                &name,
                &format!("exec -it with a terminal ({via})"),
                short,
                exec_tty(c, n2, ws),
            )
            .await;
    }
    report
        .case(
            &name,
            "cp from the pod, byte-identical",
            short,
            cp_from(c, n1),
        )
        .await;
    report
        .case(
            &name,
            "cp into the pod, byte-identical",
            short,
            cp_into(c, n2),
        )
        .await;
    report.case(&name, "attach", short, attach(c, n1)).await;
    report
        .case(
            &name,
            "port-forward: 100 MB hash-checked, 8 parallel requests",
            Duration::from_secs(180),
            port_forward(c, n2),
        )
        .await;
    report
        .case(&name, "nodes/proxy", short, nodes_proxy(c))
        .await;
    report
        .case(
            &name,
            "top node / top pod (aggregated API)",
            Duration::from_secs(120),
            top(c),
        )
        .await;
    report
        .case(
            &name,
            "egress dial metrics rise, no dial failures (over QUIC when server and agents are ours)",
            short,
            egress_metrics(c, &tunnel, dials_before),
        )
        .await;
    report
        .case(
            &name,
            "logs -f survives a minute idle",
            Duration::from_secs(120),
            async {
                let f = follow.take().context("logs -f did not start")?;
                f.after_idle(n2, Duration::from_secs(60)).await
            },
        )
        .await;
    drop(follow);

    report
        .case(&name, "routing and agent loss: node 2's agent killed -> node 2 fails fast, node 1 works; back -> works", Duration::from_secs(90), agent_killed(c, &mut tunnel))
        .await;
    report
        .case(
            &name,
            "server restarted -> works again without restarting kube-apiserver",
            Duration::from_secs(120),
            server_restart(c, &mut tunnel),
        )
        .await;
    tunnel.stop().await;
}

// --- cases -----------------------------------------------------------------

async fn direct_path_fails(c: &Cluster) -> anyhow::Result<()> {
    ensure!(c.nodes.len() == 2, "{} nodes registered", c.nodes.len());
    for n in &c.nodes {
        let addr = format!("{}:10250", n.net.kubelet_ip);
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&addr),
        )
        .await;
        // Refused by the route, not by a missing listener or a slow path.
        match r {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::HostUnreachable => {}
            Ok(Ok(_)) => bail!("the control plane reached {addr} directly"),
            Ok(Err(e)) => bail!("connecting to {addr} failed, but not as unreachable: {e}"),
            Err(_) => bail!("connecting to {addr} hung instead of failing as unreachable"),
        }
        // ... while the node itself serves it.
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &n.net.netns, "bash", "-c"])
            .arg(format!("exec 3<>/dev/tcp/{}/10250", n.net.kubelet_ip))
            .output()?;
        ensure!(
            out.status.success(),
            "kubelet {addr} not listening in its node namespace"
        );
    }
    Ok(())
}

async fn logs_exact(c: &Cluster) -> anyhow::Result<()> {
    for n in &c.nodes {
        logs_exact_on(c, n).await?;
    }
    Ok(())
}

/// `kubectl logs` of `n`'s pod gives exactly its lines.
async fn logs_exact_on(c: &Cluster, n: &Node) -> anyhow::Result<()> {
    let out = c
        .kubectl
        .run(&["logs", &n.pod])
        .await
        .checked("kubectl logs")?;
    let want: String = n.log_lines().iter().map(|l| format!("{l}\n")).collect();
    ensure!(
        out == want,
        "kubectl logs {}: got {out:?}, want {want:?}",
        n.pod
    );
    Ok(())
}

fn ws_env(ws: bool) -> Vec<(&'static str, &'static str)> {
    // Explicit both ways, whatever the caller's environment says.
    let v = if ws { "true" } else { "false" };
    vec![("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", v)]
}

async fn exec_netns(c: &Cluster, n: &Node, ws: bool) -> anyhow::Result<()> {
    let out = c
        .kubectl
        .run_with(
            &["exec", &n.pod, "--", "readlink", "/proc/self/ns/net"],
            &ws_env(ws),
            None,
        )
        .await
        .checked("kubectl exec")?;
    let want = n.netns_id();
    ensure!(
        out.trim() == want,
        "exec ran in {out:?}, the node's namespace is {want:?}"
    );
    Ok(())
}

async fn exec_stdin(c: &Cluster, n: &Node, ws: bool, size: usize) -> anyhow::Result<()> {
    let data = tests::pattern(size, 7);
    let want = tests::sha256_hex(&data);
    // kwok never closes the command's stdin, so the command reads exactly
    // `size` bytes.
    let script = format!("head -c {size} | sha256sum");
    let out = c
        .kubectl
        .run_with(
            &["exec", "-i", &n.pod, "--", "sh", "-c", &script],
            &ws_env(ws),
            Some(&data),
        )
        .await
        .checked("kubectl exec -i")?;
    ensure!(
        out.starts_with(&want),
        "sha256 on the node {out:?}, sent {want}"
    );
    Ok(())
}

async fn exec_tty(c: &Cluster, n: &Node, ws: bool) -> anyhow::Result<()> {
    // `KUBE_E2E_TTY_RUNS` repeats it (the command exits at once, which is
    // when output could be lost at the end of a connection).
    let runs: usize = std::env::var("KUBE_E2E_TTY_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut failed = Vec::new();
    for i in 0..runs {
        if let Err(e) = exec_tty_once(c, n, ws).await {
            failed.push(format!("run {i}: {e:#}"));
        }
    }
    ensure!(
        failed.is_empty(),
        "{} of {runs} failed; first: {}",
        failed.len(),
        failed[0]
    );
    Ok(())
}

async fn exec_tty_once(c: &Cluster, n: &Node, ws: bool) -> anyhow::Result<()> {
    // `script` gives kubectl a terminal, so `-t` is really used.
    // The pause before the command exits: without it, over SPDY, the
    // terminal output sometimes never reached kubectl (seen in earlier
    // sessions with our server and agents and with both mixed pairings).
    // Not reproduced since: on 2026-12-07, 100 runs without the pause all
    // passed (half over each protocol): our pair with the agent before its
    // end-of-connection fixes (40) and after (20), our server with the
    // upstream agent (20), the upstream pair (20). Not attributed, so the
    // pause stays; `KUBE_E2E_TTY_PAUSE=0 KUBE_E2E_TTY_RUNS=20` looks for it.
    let pause = std::env::var("KUBE_E2E_TTY_PAUSE").unwrap_or_else(|_| "1".into());
    let cmd = format!(
        "{} --kubeconfig={} exec -it {} -- sh -c 'tty; echo exec-tty-done; sleep {pause}'",
        c.kubectl.bin,
        c.kubectl.kubeconfig.display(),
        n.pod
    );
    let mut p = tokio::process::Command::new("script");
    p.args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .envs(ws_env(ws))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = p.spawn()?;
    let out = tokio::time::timeout(Duration::from_secs(40), child.wait_with_output())
        .await
        .context("kubectl exec -it did not finish")??;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("/dev/pts/") && text.contains("exec-tty-done"),
        "kubectl exec -it: {:?}\nstdout: {text}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn cp_from(c: &Cluster, n: &Node) -> anyhow::Result<()> {
    let data = tests::pattern(3 << 20, 11);
    std::fs::write(n.rootfs.join("from-pod.bin"), &data)?;
    let local = c.dir.path().join("copied-from-pod.bin");
    let _ = std::fs::remove_file(&local);
    c.kubectl
        .run(&[
            "cp",
            &format!("default/{}:from-pod.bin", n.pod),
            &local.display().to_string(),
        ])
        .await
        .checked("kubectl cp from the pod")?;
    let got = std::fs::read(&local)?;
    ensure!(
        got.len() == data.len() && tests::sha256_hex(&got) == tests::sha256_hex(&data),
        "copied {} bytes, want {}, or the content differs",
        got.len(),
        data.len()
    );
    Ok(())
}

async fn cp_into(c: &Cluster, n: &Node) -> anyhow::Result<()> {
    // kwok never closes the command's stdin, so the pod's `tar x` ends only
    // when the archive ends on a tar record (10,240 bytes): one header, the
    // data and the 1,024-byte end marker add up to 100 records.
    let size = 100 * 10_240 - 1_536;
    let data = tests::pattern(size, 13);
    let local = c.dir.path().join("to-pod.bin");
    std::fs::write(&local, &data)?;
    let remote = n.rootfs.join("into-pod.bin");
    let _ = std::fs::remove_file(&remote);
    c.kubectl
        .run(&[
            "cp",
            &local.display().to_string(),
            &format!("default/{}:into-pod.bin", n.pod),
        ])
        .await
        .checked("kubectl cp into the pod")?;
    let got = std::fs::read(&remote).context("file on the node")?;
    ensure!(
        tests::sha256_hex(&got) == tests::sha256_hex(&data),
        "content differs ({} bytes)",
        got.len()
    );
    Ok(())
}

/// A kubectl that keeps running; its stdout lines are collected.
struct Streaming {
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Streaming {
    fn start(c: &Cluster, args: &[&str]) -> anyhow::Result<Streaming> {
        let mut cmd = c.kubectl.command(args, &[]);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let sink = lines.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(pipe).lines();
                while let Ok(Some(l)) = r.next_line().await {
                    sink.lock().expect("lines").push(l);
                }
            });
        }
        Ok(Streaming { child, lines })
    }

    fn has(&self, needle: &str) -> Option<String> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .find(|l| l.contains(needle))
            .cloned()
    }

    async fn wait_for(&mut self, needle: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(l) = self.has(needle) {
                return Ok(l);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "kubectl exited ({status}) before {needle:?}; output: {:?}",
                    self.lines.lock().expect("lines")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} within {limit:?}; output: {:?}",
                    self.lines.lock().expect("lines")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `kubectl logs -f` on one pod.
struct Follow {
    stream: Streaming,
    last_append: Instant,
    n: usize,
}

impl Follow {
    async fn start(c: &Cluster, n: &Node) -> anyhow::Result<Follow> {
        let mut stream = Streaming::start(c, &["logs", "-f", &n.pod])?;
        let last = n.log_lines().last().cloned().context("no log lines")?;
        stream.wait_for(&last, Duration::from_secs(20)).await?;
        let mut f = Follow {
            stream,
            last_append: Instant::now(),
            n: 0,
        };
        f.append_and_see(n).await?;
        Ok(f)
    }

    async fn append_and_see(&mut self, n: &Node) -> anyhow::Result<()> {
        self.n += 1;
        let line = format!("followed line {} at {:?}", self.n, Instant::now());
        n.append_log(&line);
        self.last_append = Instant::now();
        self.stream.wait_for(&line, Duration::from_secs(10)).await?;
        Ok(())
    }

    async fn after_idle(mut self, n: &Node, idle: Duration) -> anyhow::Result<()> {
        let since = self.last_append.elapsed();
        if since < idle {
            tokio::time::sleep(idle - since).await;
        }
        self.append_and_see(n).await
    }
}

async fn attach(c: &Cluster, n: &Node) -> anyhow::Result<()> {
    let mut s = Streaming::start(c, &["attach", &n.pod, "-c", "app"])?;
    // attach follows from the end: append until a line arrives.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        i += 1;
        let line = format!("attached line {i}");
        n.append_attach(&line);
        if s.wait_for(&line, Duration::from_millis(700)).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = s.child.try_wait() {
            bail!(
                "kubectl attach exited: {status}; output: {:?}",
                s.lines.lock().expect("lines")
            );
        }
        if Instant::now() > deadline {
            bail!(
                "nothing attached within 30 s; output: {:?}",
                s.lines.lock().expect("lines")
            );
        }
    }
}

async fn port_forward(c: &Cluster, n: &Node) -> anyhow::Result<()> {
    let port = cluster::node::POD_PORT.to_string();
    let mut s = Streaming::start(
        c,
        &[
            "port-forward",
            &format!("pod/{}", n.pod),
            &format!(":{port}"),
        ],
    )?;
    let line = s
        .wait_for("Forwarding from 127.0.0.1:", Duration::from_secs(20))
        .await?;
    let addr = cluster::node::forwarded_addr(&line).context("local port")?;
    cluster::node::get_pattern(&addr, 100_000_000, true)
        .await
        .context("100 MB download")?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            cluster::node::get_pattern(&addr, (4 << 20) + i, true).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        t.await?.with_context(|| format!("parallel request {i}"))?;
    }
    Ok(())
}

async fn nodes_proxy(c: &Cluster) -> anyhow::Result<()> {
    for n in &c.nodes {
        let path = format!(
            "/api/v1/nodes/{0}/proxy/metrics/nodes/{0}/metrics/resource",
            n.net.name
        );
        let out = c
            .kubectl
            .run(&["get", "--raw", &path])
            .await
            .checked("nodes/proxy")?;
        ensure!(
            out.contains("node_cpu_usage_seconds_total"),
            "{path}: {out:.300}"
        );
    }
    Ok(())
}

async fn top(c: &Cluster) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(110);
    loop {
        let nodes = c.kubectl.run(&["top", "node", "--no-headers"]).await;
        let pods = c
            .kubectl
            .run(&["top", "pod", "--no-headers", "-n", "default"])
            .await;
        let ok = nodes.ok()
            && pods.ok()
            && c.nodes
                .iter()
                .all(|n| nodes.stdout.contains(&n.net.name) && pods.stdout.contains(&n.pod));
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "kubectl top: nodes {:?} {:?}; pods {:?} {:?}\nmetrics-server log tail: {}",
                nodes.stdout,
                nodes.stderr,
                pods.stdout,
                pods.stderr,
                tail(&c.metrics_server_log(), 10)
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// kube-apiserver's counts of successful and failed egress dials for this
/// tunnel's protocol and transport, and its whole `/metrics` text.
async fn egress_dials(c: &Cluster, t: &Tunnel) -> anyhow::Result<(f64, f64, String)> {
    let (protocol, transport) = t.egress.metric_labels();
    let labels = [("protocol", protocol), ("transport", transport)];
    let text = c
        .kubectl
        .run(&["get", "--raw", "/metrics"])
        .await
        .checked("kube-apiserver /metrics")?;
    let dials = cluster::metric_sum(
        &text,
        "apiserver_egress_dialer_dial_duration_seconds_count",
        &labels,
    );
    let failures =
        cluster::metric_sum(&text, "apiserver_egress_dialer_dial_failure_count", &labels);
    Ok((dials, failures, text))
}

async fn egress_metrics(c: &Cluster, t: &Tunnel, before: (f64, f64)) -> anyhow::Result<()> {
    let (dials, failures, text) = egress_dials(c, t).await?;
    // The cases so far opened dozens of tunnels (exec, cp, port-forward,
    // attach each dial anew).
    ensure!(
        dials >= before.0 + 10.0,
        "egress dials for {:?}: {} at the start of the setup, {dials} now",
        t.egress.metric_labels(),
        before.0
    );
    ensure!(
        failures == before.1,
        "egress dial failures went from {} to {failures}: {}\nserver log:\n{}\nagent logs:\n{}",
        before.1,
        grep(&text, "apiserver_egress_dialer_dial_failure_count{"),
        t.server.tail(15),
        t.agents
            .iter()
            .map(|a| a.tail(15))
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    // Our server with our agents: the dials went over QUIC streams.
    if t.server_side == Side::Ours && t.agent_side == Side::Ours {
        let text = t.metrics().await;
        let quic = cluster::metric_sum(
            &text,
            "konnectivity_network_proxy_server_dials_total",
            &[("transport", "quic")],
        );
        ensure!(
            quic >= 10.0,
            "{quic} dials over QUIC between our server and agents: {}",
            grep(&text, "konnectivity_network_proxy_server_dials_total")
        );
    }
    Ok(())
}

fn grep(text: &str, needle: &str) -> String {
    text.lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn agent_killed(c: &Cluster, t: &mut Tunnel) -> anyhow::Result<()> {
    let (n1, n2) = (c.node("node-1"), c.node("node-2"));
    t.agents[1].kill().await;
    let without = async {
        t.wait_agents_exactly(1).await?;
        let out = c.kubectl.run(&["logs", &n2.pod]).await;
        ensure!(
            !out.ok(),
            "kubectl logs on node 2 worked without its agent: {:?}",
            out.stdout
        );
        // kube-apiserver words it `error dialing backend: ...` for upgrades;
        // for plain requests it passes the gRPC proxy's `No agent available`
        // through, or says `proxy error from <proxy> while dialing <node>,
        // code 500` for HTTP CONNECT.
        let addr = format!("{}:10250", n2.net.kubelet_ip);
        ensure!(
            out.stderr.contains(&addr)
                && [
                    "error dialing backend",
                    "No agent available",
                    "proxy error from"
                ]
                .iter()
                .any(|m| out.stderr.contains(m)),
            "node 2 without agent: {:?}",
            out.stderr
        );
        ensure!(
            out.elapsed < Duration::from_secs(2),
            "node 2 without agent took {:?} to fail",
            out.elapsed
        );
        c.kubectl
            .run(&["logs", &n1.pod])
            .await
            .checked("node 1 while node 2's agent is down")?;
        Ok(())
    }
    .await;
    // The agent comes back whatever happened, for the cases after this one.
    t.start_agent(1, &c.pki, &n2.net);
    t.wait_agents(2).await?;
    without?;
    c.kubectl
        .run(&["logs", &n2.pod])
        .await
        .checked("node 2 after its agent is back")?;
    Ok(())
}

async fn server_restart(c: &Cluster, t: &mut Tunnel) -> anyhow::Result<()> {
    t.restart_server().await?;
    t.wait_agents(2).await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = c.kubectl.run(&["logs", &c.nodes[0].pod]).await;
        if out.ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "kubectl logs still failing after the server restart: {}",
                out.stderr
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
