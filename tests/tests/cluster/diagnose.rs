//! `kubectl konnectivity diagnose` against the real cluster: each hop broken
//! in turn (as an operator would meet it), and the command must name that
//! hop, with its exit code, within its 5 s limit; then everything healthy
//! again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;
use tests::cluster::tunnel::Extra;
use tests::cluster::{Cluster, Mode, Side, Tunnel};
use tests::process::binary;

use super::Report;

/// The command's own limit; a run must end within it (plus start-up).
const LIMIT_MS: u64 = 5000;

/// One run's outcome.
struct Run {
    code: i32,
    json: Value,
    /// The process's own time, start to exit, as the operator waits for it.
    wall: Duration,
}

impl Run {
    fn failed_hop(&self) -> &str {
        self.json["failed_hop"].as_str().unwrap_or("none")
    }

    fn hop(&self, name: &str) -> &Value {
        self.json["hops"]
            .as_array()
            .and_then(|h| h.iter().find(|c| c["name"] == name))
            .unwrap_or(&Value::Null)
    }

    fn expect(&self, hop: Option<(&str, i32)>, needle: &str) -> anyhow::Result<()> {
        // The limit holds for the whole process; exec and exit on a loaded
        // two-core machine get a little on top.
        let wall = self.wall.as_millis() as u64;
        ensure!(
            wall <= LIMIT_MS + 250,
            "the run took {wall} ms, over its {LIMIT_MS} ms limit:\n{:#}",
            self.json
        );
        match hop {
            None => ensure!(
                self.code == 0 && self.json["healthy"] == true,
                "want healthy (exit 0), got exit {}:\n{:#}",
                self.code,
                self.json
            ),
            Some((name, code)) => {
                ensure!(
                    self.failed_hop() == name && self.code == code,
                    "want hop {name} (exit {code}), got {} (exit {}):\n{:#}",
                    self.failed_hop(),
                    self.code,
                    self.json
                );
                let text = self.hop(name).to_string();
                ensure!(
                    text.contains(needle),
                    "hop {name} does not mention {needle:?}:\n{:#}",
                    self.hop(name)
                );
            }
        }
        Ok(())
    }
}

/// The command with kube-apiserver's flags.
struct Diagnose {
    egress: PathBuf,
    admin: String,
    kubeconfig: PathBuf,
    ca: PathBuf,
    client: (PathBuf, PathBuf),
}

impl Diagnose {
    fn argv(&self, node: &str, egress: &Path) -> Vec<String> {
        let f = |p: &Path| p.display().to_string();
        vec![
            "diagnose".into(),
            node.into(),
            format!("--kubeconfig={}", f(&self.kubeconfig)),
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--egress-selector-config-file={}", f(egress)),
            format!("--admin-address={}", self.admin),
            format!("--kubelet-certificate-authority={}", f(&self.ca)),
            format!("--kubelet-client-certificate={}", f(&self.client.0)),
            format!("--kubelet-client-key={}", f(&self.client.1)),
        ]
    }

    async fn run_with(&self, node: &str, egress: &Path) -> anyhow::Result<Run> {
        let mut argv = self.argv(node, egress);
        argv.push("-o".into());
        argv.push("json".into());
        let started = std::time::Instant::now();
        let out = tokio::process::Command::new(binary("kubectl-konnectivity"))
            .args(&argv)
            .output()
            .await
            .context("run kubectl-konnectivity")?;
        let wall = started.elapsed();
        let code = out.status.code().unwrap_or(-1);
        let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "exit {code}, no JSON: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        ensure!(
            json["exit_code"] == code,
            "exit code {code} differs from the report's {}",
            json["exit_code"]
        );
        Ok(Run { code, json, wall })
    }

    async fn run(&self, node: &str) -> anyhow::Result<Run> {
        self.run_with(node, &self.egress).await
    }

    /// The text output, printed (the README shows two of these).
    async fn show(&self, node: &str) {
        if let Ok(out) = tokio::process::Command::new(binary("kubectl-konnectivity"))
            .args(self.argv(node, &self.egress))
            .output()
            .await
        {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                println!("     | {l}");
            }
        }
    }
}

/// `kubectl logs` of the node's pod while the fault is in place: it must fail
/// (kube-apiserver meets the same broken hop); its message is printed, the
/// words operators see.
async fn kubectl_fails(kubectl: &tests::cluster::Kubectl, node: &str) -> anyhow::Result<()> {
    let pod = format!("app-{node}");
    for argv in [
        vec!["logs", pod.as_str()],
        vec!["exec", pod.as_str(), "--", "true"],
    ] {
        let out = kubectl.run(&argv).await;
        println!(
            "     kubectl {}: {}",
            argv[..2].join(" "),
            out.stderr.trim()
        );
        ensure!(
            !out.ok(),
            "kubectl {} worked, so the fault is not on kube-apiserver's path: {}",
            argv[0],
            out.stdout
        );
    }
    Ok(())
}

/// node-1's kubelet restarted serving `leaf`: the diagnose run (shown when
/// `show`), with `kubectl logs` and `exec` failing, then the kubelet back on
/// its own certificate.
async fn with_kubelet_cert(
    cluster: &mut Cluster,
    d: &Diagnose,
    leaf: &konnectivity_runtime::pki::Leaf,
    show: bool,
) -> anyhow::Result<Run> {
    let n = cluster
        .nodes
        .iter_mut()
        .find(|n| n.net.name == "node-1")
        .context("node-1")?;
    n.start_kubelet(Some(leaf)).await?;
    let r = d.run("node-1").await;
    let k = kubectl_fails(&cluster.kubectl, "node-1").await;
    if show {
        d.show("node-1").await;
    }
    n.start_kubelet(None).await?;
    k?;
    r
}

/// An nftables table in the node's namespace that drops everything sent to
/// the kubelet port (the agent's SYNs go unanswered).
fn drop_rule(node: &tests::cluster::NodeNet, add: bool) -> anyhow::Result<()> {
    let mut argv = node.exec_prefix();
    argv.extend(["nft".into(), "-f".into(), "-".into()]);
    let rules = if add {
        "table inet knp_diagnose {\n chain out {\n  type filter hook output priority 0;\n  tcp dport 10250 drop\n }\n}\n"
    } else {
        "delete table inet knp_diagnose\n"
    };
    use std::io::Write;
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("nft")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Every fault, one hop at a time.
pub async fn run(cluster: &mut Cluster, report: &mut Report) {
    let name = "diagnose";
    println!("== {name}");
    let started = Tunnel::start(
        &cluster.bins,
        cluster.dir.path(),
        &cluster.pki,
        Mode::GrpcUds,
        Side::Ours,
        Side::Ours,
        &cluster.net.nodes,
    )
    .await;
    let Some(tunnel) = report.step(name, "tunnel start", started) else {
        return;
    };
    let up = cluster.start_apiserver(&tunnel.egress).await;
    if report.step(name, "kube-apiserver start", up).is_none() {
        return;
    }
    let mut tunnel = tunnel;
    let dir = cluster.dir.path().join("diagnose");
    let _ = std::fs::create_dir_all(&dir);
    let egress = dir.join("egress.yaml");
    let config = tunnel.egress.config(&cluster.pki);
    let wrong = dir.join("egress-wrong-socket.yaml");
    let written = std::fs::write(&egress, &config).and_then(|_| {
        std::fs::write(
            &wrong,
            config.replace("konnectivity-server.sock", "konnectivity-server-typo.sock"),
        )
    });
    if report
        .step(
            name,
            "write egress files",
            written.map_err(anyhow::Error::from),
        )
        .is_none()
    {
        return;
    }
    let pki = &cluster.pki;
    let d = Diagnose {
        egress,
        admin: tunnel.server_admin(),
        kubeconfig: cluster.kubectl.kubeconfig.clone(),
        ca: pki.ca.clone(),
        client: (
            pki.kubelet_client.cert.clone(),
            pki.kubelet_client.key.clone(),
        ),
    };
    let limit = Duration::from_secs(60);

    report
        .case(name, "healthy: every hop ok, exit 0", limit, async {
            for node in ["node-1", "node-2"] {
                d.run(node).await?.expect(None, "")?;
            }
            d.show("node-1").await;
            Ok(())
        })
        .await;

    report
        .case(
            name,
            "still healthy after the agents idled past the silence limit (they answer heartbeats)",
            limit,
            async {
                tokio::time::sleep(Duration::from_secs(12)).await;
                d.run("node-2").await?.expect(None, "")
            },
        )
        .await;

    report
        .case(
            name,
            "wrong socket path in the egress configuration -> hop 1",
            limit,
            async {
                d.run_with("node-1", &wrong)
                    .await?
                    .expect(Some(("egress-config", 11)), "konnectivity-server-typo.sock")
            },
        )
        .await;

    let nodes = cluster.net.nodes.clone();
    report
        .case(name, "no agent for the node -> hop 3", limit, async {
            tunnel.agents[1].kill().await;
            tunnel.wait_agents_exactly(1).await?;
            let r = d.run("node-2").await;
            let k = kubectl_fails(&cluster.kubectl, "node-2").await;
            tunnel.start_agent(1, pki, &nodes[1]);
            tunnel.wait_agents(2).await?;
            k?;
            r?.expect(Some(("server", 13)), "no connected agent serves")
        })
        .await;

    report
        .case(
            name,
            "agent refused (it does not trust the server's CA) -> hop 3 with the refusal",
            limit,
            async {
                tunnel.agents[1].kill().await;
                tunnel.wait_agents_exactly(1).await?;
                let mut rogue = tunnel.extra_agent(
                    Side::Ours,
                    pki,
                    &nodes[1],
                    "node-2",
                    (18093, 18094),
                    &[format!("--ca-cert={}", pki.front_proxy_ca.display())],
                );
                let r = async {
                    // The refusal is recorded once the agent has tried.
                    tests::poll_until(Duration::from_secs(20), "a refusal", || async {
                        let r = d.run("node-2").await.ok()?;
                        r.hop("server")
                            .to_string()
                            .contains("TLS handshake failed")
                            .then_some(r)
                    })
                    .await
                }
                .await;
                if r.is_ok() {
                    d.show("node-2").await;
                }
                rogue.kill().await;
                tunnel.start_agent(1, pki, &nodes[1]);
                tunnel.wait_agents(2).await?;
                r?.expect(Some(("server", 13)), "refused")
            },
        )
        .await;

    report
        .case(
            name,
            "agent connected, kubelet down (refused) -> hop 4",
            limit,
            async {
                let n = cluster
                    .nodes
                    .iter_mut()
                    .find(|n| n.net.name == "node-1")
                    .context("node-1")?;
                n.stop_kubelet().await;
                let r = d.run("node-1").await;
                let k = kubectl_fails(&cluster.kubectl, "node-1").await;
                n.start_kubelet(None).await?;
                k?;
                r?.expect(Some(("dial", 14)), "connection refused")
            },
        )
        .await;

    report
        .case(
            name,
            "kubelet unreachable (drop rule in the node namespace) -> hop 4 timeout, within the limit",
            limit,
            async {
                drop_rule(&nodes[0], true)?;
                let r = d.run("node-1").await;
                let k = kubectl_fails(&cluster.kubectl, "node-1").await;
                drop_rule(&nodes[0], false)?;
                k?;
                r?.expect(Some(("dial", 14)), "did not answer")
            },
        )
        .await;

    report
        .case(
            name,
            "kubelet certificate for the wrong address -> hop 5",
            limit,
            async {
                let wrong_ip = nodes[1].kubelet_ip;
                let leaf = cluster
                    .pki
                    .serving("kubelet-node-1-wrong-address", wrong_ip)?;
                with_kubelet_cert(cluster, &d, &leaf, true)
                    .await?
                    .expect(Some(("kubelet-tls", 15)), "not valid for the address")
            },
        )
        .await;

    report
        .case(name, "kubelet certificate expired -> hop 5", limit, async {
            let ip = nodes[0].kubelet_ip;
            let leaf = cluster.pki.serving_between(
                "kubelet-node-1-expired",
                ip,
                (2020, 1, 1),
                (2021, 1, 1),
            )?;
            let r = with_kubelet_cert(cluster, &d, &leaf, false).await?;
            r.expect(Some(("kubelet-tls", 15)), "has expired")?;
            ensure!(
                r.hop("kubelet-tls").to_string().contains("2021-01-01"),
                "the evidence shows the certificate's end of validity:\n{:#}",
                r.hop("kubelet-tls")
            );
            Ok(())
        })
        .await;

    report
        .case(
            name,
            "server not running (killed, socket left behind) -> hop 2",
            Duration::from_secs(90),
            async {
                tunnel.server.kill().await;
                let r = d.run("node-1").await;
                let k = kubectl_fails(&cluster.kubectl, "node-1").await;
                tunnel.restart_server().await?;
                k?;
                tunnel.wait_agents(2).await?;
                r?.expect(Some(("frontend", 12)), "cannot reach the proxy-server")
            },
        )
        .await;

    report
        .case(name, "healthy again after every fault", limit, async {
            tests::poll_until(Duration::from_secs(30), "healthy", || async {
                let r = d.run("node-1").await.ok()?;
                (r.code == 0).then_some(r)
            })
            .await?
            .expect(None, "")
        })
        .await;
    tunnel.stop().await;
    let d = mtls(cluster, report, d).await;
    if let Some(d) = d {
        bad_token(cluster, report, d).await;
    }
}

/// A server that authenticates agents by service-account token, and an agent
/// whose token kube-apiserver does not vouch for: the refusal and its reason
/// show at hop 3.
async fn bad_token(cluster: &mut Cluster, report: &mut Report, mut d: Diagnose) {
    let name = "diagnose token";
    println!("== {name}");
    let extra = Extra {
        server: vec![
            "--agent-namespace=kube-system".into(),
            "--agent-service-account=konnectivity-agent".into(),
            "--authentication-audience=system:konnectivity-server".into(),
            format!("--kubeconfig={}", cluster.kubectl.kubeconfig.display()),
        ],
        agent: Vec::new(),
    };
    // No agents of the tunnel's own: the one below is refused.
    let started = Tunnel::start_with(
        &cluster.bins,
        cluster.dir.path(),
        &cluster.pki,
        Mode::GrpcUds,
        (Side::Ours, Side::Ours),
        &[],
        extra,
    )
    .await;
    let Some(tunnel) = report.step(name, "tunnel start", started) else {
        return;
    };
    let dir = cluster.dir.path().join("diagnose");
    let token = dir.join("bad-token");
    let egress = dir.join("egress-token.yaml");
    let written = std::fs::write(&token, "not-a-token-kube-apiserver-issued\n")
        .and_then(|_| std::fs::write(&egress, tunnel.egress.config(&cluster.pki)));
    if report
        .step(name, "write files", written.map_err(anyhow::Error::from))
        .is_none()
    {
        return;
    }
    let mut agent = tunnel.extra_agent(
        Side::Ours,
        &cluster.pki,
        &cluster.net.nodes[0],
        "node-1",
        (18093, 18094),
        &[format!("--service-account-token-path={}", token.display())],
    );
    d.egress = egress;
    d.admin = tunnel.server_admin();
    report
        .case(
            name,
            "agent with a token kube-apiserver does not vouch for -> hop 3 with the reason",
            Duration::from_secs(60),
            async {
                let r = tests::poll_until(Duration::from_secs(20), "a refusal", || async {
                    let r = d.run("node-1").await.ok()?;
                    r.hop("server")
                        .to_string()
                        .contains("token_not_authenticated")
                        .then_some(r)
                })
                .await?;
                r.expect(Some(("server", 13)), "token_not_authenticated")
            },
        )
        .await;
    agent.kill().await;
    tunnel.stop().await;
}

/// HTTP CONNECT over mutual-TLS TCP: healthy, then a client certificate the
/// server does not trust (refused after the handshake, as TLS 1.3 does).
async fn mtls(cluster: &mut Cluster, report: &mut Report, mut d: Diagnose) -> Option<Diagnose> {
    let name = "diagnose connect-mtls";
    println!("== {name}");
    let started = Tunnel::start(
        &cluster.bins,
        cluster.dir.path(),
        &cluster.pki,
        Mode::ConnectTls,
        Side::Ours,
        Side::Ours,
        &cluster.net.nodes,
    )
    .await;
    let tunnel = report.step(name, "tunnel start", started)?;
    let pki = &cluster.pki;
    let dir = cluster.dir.path().join("diagnose");
    let config = tunnel.egress.config(pki);
    let good = dir.join("egress-mtls.yaml");
    let untrusted = dir.join("egress-mtls-untrusted-client.yaml");
    let written = std::fs::write(&good, &config).and_then(|_| {
        std::fs::write(
            &untrusted,
            config
                .replace(
                    &pki.tunnel_frontend.cert.display().to_string(),
                    &pki.proxy_client.cert.display().to_string(),
                )
                .replace(
                    &pki.tunnel_frontend.key.display().to_string(),
                    &pki.proxy_client.key.display().to_string(),
                ),
        )
    });
    report.step(
        name,
        "write egress files",
        written.map_err(anyhow::Error::from),
    )?;
    d.egress = good;
    d.admin = tunnel.server_admin();
    let limit = Duration::from_secs(60);
    report
        .case(name, "healthy: every hop ok, exit 0", limit, async {
            d.run("node-2").await?.expect(None, "")
        })
        .await;
    report
        .case(
            name,
            "client certificate from another CA -> hop 2",
            limit,
            async {
                d.run_with("node-2", &untrusted)
                    .await?
                    .expect(Some(("frontend", 12)), "TLS")
            },
        )
        .await;
    tunnel.stop().await;
    Some(d)
}
