//! The Kubernetes API cases: agents authenticated by service-account token
//! (TokenReview against the real kube-apiserver), and server Leases published
//! by servers and counted by agents, ours and upstream in both directions.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{ensure, Context};
use tests::cluster::tunnel::Extra;
use tests::cluster::{metric_sum, Cluster, Mode, Side, Tunnel, CONTROL_PLANE_IP};
use tests::poll_until;
use tokio::net::{TcpListener, TcpStream};

use super::{logs_exact, logs_exact_on, Report};

const AUDIENCE: &str = "system:konnectivity-server";
const REFUSED: &str = "konnectivity_network_proxy_server_agent_refused_total";
const READY: &str = "konnectivity_network_proxy_server_ready_backend_connections";
const KNOWN: &str = "konnectivity_network_proxy_agent_known_server_count";
/// Health and admin ports of the one-off agents in node-1's namespace.
const EXTRA_PORTS: (u16, u16) = (18093, 18094);

/// Service accounts, a second namespace, and the Secrets tokens are bound to
/// (deleting one revokes its tokens).
const OBJECTS: &str = "apiVersion: v1
kind: Namespace
metadata: {name: other-ns}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: konnectivity-agent, namespace: kube-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: other-agent, namespace: kube-system}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: konnectivity-agent, namespace: other-ns}
---
apiVersion: v1
kind: Secret
metadata: {name: agent-token-1, namespace: kube-system}
---
apiVersion: v1
kind: Secret
metadata: {name: agent-token-2, namespace: kube-system}
";

async fn token(
    c: &Cluster,
    ns: &str,
    sa: &str,
    audience: &str,
    bound_secret: Option<&str>,
) -> anyhow::Result<String> {
    let aud = format!("--audience={audience}");
    let mut args = vec!["create", "token", sa, "-n", ns, &aud, "--duration=1h"];
    let bound;
    if let Some(s) = bound_secret {
        bound = format!("--bound-object-name={s}");
        args.extend(["--bound-object-kind=Secret", &bound]);
    }
    let out = c.kubectl.run(&args).await.checked("kubectl create token")?;
    Ok(out.trim().to_string())
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    // Rewritten in place by rename, as the kubelet rotates projected tokens.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &p)?;
    Ok(p)
}

fn kubeconfig(c: &Cluster) -> String {
    format!("--kubeconfig={}", c.kubectl.kubeconfig.display())
}

/// Every TokenReview case, then every Lease case.
pub async fn run(cluster: &mut Cluster, report: &mut Report) {
    let name = "kubernetes-api";
    println!("== {name}");
    if cluster.api.is_none() {
        // Run alone (KUBE_E2E_SETUPS): bring the control plane up once
        // through a plain tunnel.
        let up = async {
            let t = Tunnel::start(
                &cluster.bins,
                cluster.dir.path(),
                &cluster.pki,
                Mode::GrpcUds,
                Side::Ours,
                Side::Ours,
                &cluster.net.nodes,
            )
            .await?;
            let r = cluster.start_apiserver(&t.egress).await;
            t.stop().await;
            r
        };
        if report
            .step(name, "kube-apiserver start", up.await)
            .is_none()
        {
            return;
        }
    }
    let mut tokens = None;
    report
        .case(
            name,
            "service accounts and tokens created",
            Duration::from_secs(60),
            async {
                cluster.kubectl.apply(OBJECTS).await?;
                tokens = Some(Tokens::create(cluster).await?);
                Ok(())
            },
        )
        .await;
    let Some(tokens) = tokens else { return };
    token_review(cluster, report, &tokens).await;
    for (servers, agent) in [
        ([Side::Ours, Side::Ours, Side::Upstream], Side::Ours),
        ([Side::Ours, Side::Ours, Side::Upstream], Side::Upstream),
    ] {
        leases(cluster, report, servers, agent).await;
    }
    manifests(cluster, report).await;
}

struct Tokens {
    /// Right service account and audience, bound to Secret agent-token-1.
    good_1: String,
    /// The same, bound to agent-token-2 (the rotated token).
    good_2: String,
    /// Right service account and audience, never shown to the server
    /// before (no cached review can admit it).
    fresh: Vec<String>,
    wrong_audience: String,
    wrong_sa: String,
    wrong_ns: String,
}

impl Tokens {
    async fn create(c: &Cluster) -> anyhow::Result<Tokens> {
        let (ks, ka) = ("kube-system", "konnectivity-agent");
        let mut fresh = Vec::new();
        for _ in 0..3 {
            fresh.push(token(c, ks, ka, AUDIENCE, None).await?);
        }
        Ok(Tokens {
            good_1: token(c, ks, ka, AUDIENCE, Some("agent-token-1")).await?,
            good_2: token(c, ks, ka, AUDIENCE, Some("agent-token-2")).await?,
            fresh,
            wrong_audience: token(c, ks, ka, "some-other-audience", None).await?,
            wrong_sa: token(c, ks, "other-agent", AUDIENCE, None).await?,
            wrong_ns: token(c, "other-ns", ka, AUDIENCE, None).await?,
        })
    }
}

async fn refused(t: &Tunnel, reason: &str) -> f64 {
    metric_sum(&t.metrics().await, REFUSED, &[("reason", reason)])
}

async fn ready(t: &Tunnel) -> f64 {
    metric_sum(&t.metrics().await, READY, &[])
}

/// Starts a one-off agent in node-1's namespace with `token` (or none) and
/// waits until the server refuses it for `reason`; the two node agents stay
/// connected, and the server logs the reason once per refusal.
async fn expect_refusal(
    c: &Cluster,
    t: &Tunnel,
    side: Side,
    token: Option<&str>,
    reason: &str,
) -> anyhow::Result<()> {
    let before = refused(t, reason).await;
    let mut extra = Vec::new();
    if let Some(tok) = token {
        let p = write(c.dir.path(), "intruder-token", tok)?;
        extra.push(format!("--service-account-token-path={}", p.display()));
    }
    let mut agent = t.extra_agent(
        side,
        &c.pki,
        &c.net.nodes[0],
        "intruder",
        EXTRA_PORTS,
        &extra,
    );
    let seen = poll_until(
        Duration::from_secs(20),
        &format!("a refusal for {reason}"),
        || async { (refused(t, reason).await > before).then_some(()) },
    )
    .await;
    let still = ready(t).await;
    agent.kill().await;
    seen.with_context(|| format!("server log:\n{}", t.server.tail(10)))?;
    ensure!(
        still == 2.0,
        "{still} agents connected, want the 2 node agents only"
    );
    let lines = t
        .server
        .logs()
        .into_iter()
        .filter(|l| l.contains("agent stream refused") && l.contains(reason))
        .count();
    ensure!(lines >= 1, "no log line names {reason}");
    if let Some(secret) = token.filter(|t| t.len() >= 8) {
        ensure!(
            !t.server.logs().iter().any(|l| l.contains(secret)),
            "the token appears in the server log"
        );
    }
    Ok(())
}

/// Starts a one-off agent with `token` and waits until it is admitted (a
/// third agent stream), then stops it.
async fn expect_admission(c: &Cluster, t: &Tunnel, side: Side, token: &str) -> anyhow::Result<()> {
    let p = write(c.dir.path(), "guest-token", token)?;
    let mut a = t.extra_agent(
        side,
        &c.pki,
        &c.net.nodes[0],
        "guest",
        EXTRA_PORTS,
        &[format!("--service-account-token-path={}", p.display())],
    );
    let r = t.wait_agents(3).await;
    a.kill().await;
    r?;
    t.wait_agents_exactly(2).await
}

/// Claims of a token for kube-system/konnectivity-agent with our audience,
/// expiring `exp_in` seconds from now (negative: in the past).
async fn claims(c: &Cluster, exp_in: i64) -> anyhow::Result<serde_json::Value> {
    let uid = c
        .kubectl
        .run(&[
            "get",
            "sa",
            "konnectivity-agent",
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await
        .checked("service account uid")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    Ok(serde_json::json!({
        "aud": [AUDIENCE],
        "exp": now + exp_in,
        "iat": now + exp_in - 3600,
        "nbf": now + exp_in - 3600,
        "iss": "https://kubernetes.default.svc",
        "sub": "system:serviceaccount:kube-system:konnectivity-agent",
        "kubernetes.io": {
            "namespace": "kube-system",
            "serviceaccount": {"name": "konnectivity-agent", "uid": uid.trim()}
        }
    }))
}

async fn token_review(cluster: &mut Cluster, report: &mut Report, tok: &Tokens) {
    let name = "tokenreview server=ours";
    let dir = cluster.dir.path().to_path_buf();
    let written = write(&dir, "agent-token", &tok.good_1);
    let Some(node_token) = report.step(name, "token file", written) else {
        return;
    };
    let extra = Extra {
        server: vec![
            "--agent-namespace=kube-system".into(),
            "--agent-service-account=konnectivity-agent".into(),
            format!("--authentication-audience={AUDIENCE}"),
            kubeconfig(cluster),
        ],
        agent: vec![format!(
            "--service-account-token-path={}",
            node_token.display()
        )],
    };
    let mut tunnel = None;
    report
        .case(
            name,
            "agents with a token for the right service account and audience are admitted (and a client certificate: both checks)",
            Duration::from_secs(60),
            async {
                tunnel = Some(
                    Tunnel::start_with(
                        &cluster.bins,
                        &dir,
                        &cluster.pki,
                        Mode::GrpcUds,
                        (Side::Ours, Side::Ours),
                        &cluster.net.nodes,
                        extra.clone(),
                    )
                    .await?,
                );
                Ok(())
            },
        )
        .await;
    let Some(mut t) = tunnel else { return };
    report
        .case(
            name,
            "kubectl logs through token-authenticated agents",
            Duration::from_secs(120),
            async {
                cluster.start_apiserver(&t.egress).await?;
                logs_exact(cluster).await
            },
        )
        .await;
    let c = &*cluster;
    let cases: [(&str, Option<&str>, &str); 6] = [
        (
            "token for another audience",
            Some(&tok.wrong_audience),
            "token_not_authenticated",
        ),
        (
            "token of another service account",
            Some(&tok.wrong_sa),
            "token_wrong_service_account",
        ),
        (
            "token of another namespace",
            Some(&tok.wrong_ns),
            "token_wrong_namespace",
        ),
        (
            "garbage token",
            Some("not-a-token"),
            "token_not_authenticated",
        ),
        ("empty token file", Some(""), "malformed_token"),
        ("no token", None, "no_token"),
    ];
    for (what, token, reason) in cases {
        report
            .case(
                name,
                &format!("{what}: refused ({reason})"),
                Duration::from_secs(30),
                expect_refusal(c, &t, Side::Ours, token, reason),
            )
            .await;
    }
    report
        .case(
            name,
            "the upstream agent's wrong-audience token is refused too",
            Duration::from_secs(30),
            expect_refusal(
                c,
                &t,
                Side::Upstream,
                Some(&tok.wrong_audience),
                "token_not_authenticated",
            ),
        )
        .await;
    report
        .case(
            name,
            "the upstream agent with a good token is admitted",
            Duration::from_secs(30),
            expect_admission(c, &t, Side::Upstream, &tok.fresh[0]),
        )
        .await;
    report
        .case(
            name,
            "expired token refused (token_not_authenticated); the same token unexpired is admitted",
            Duration::from_secs(60),
            async {
                // Signed here with the service-account key, as kube-apiserver
                // signs: the unexpired twin shows the signing is right.
                let live = c.pki.sign_token(&claims(c, 3600).await?)?;
                expect_admission(c, &t, Side::Ours, &live).await?;
                let expired = c.pki.sign_token(&claims(c, -600).await?)?;
                expect_refusal(c, &t, Side::Ours, Some(&expired), "token_not_authenticated")
                    .await?;
                let said = t
                    .server
                    .logs()
                    .into_iter()
                    .rfind(|l| l.contains("token_not_authenticated"))
                    .unwrap_or_default();
                ensure!(
                    said.contains("expired"),
                    "the refusal does not say expired: {said}"
                );
                Ok(())
            },
        )
        .await;

    report
        .case(
            name,
            "kube-apiserver stopped: a new agent is refused, existing streams carry dials; back: admitted",
            Duration::from_secs(150),
            async {
                let egress = t.egress.clone();
                if let Some(api) = cluster.api.take() {
                    api.stop().await;
                }
                let c = &*cluster;
                let before = refused(&t, "token_review_unavailable").await;
                let p = write(&dir, "late-token", &tok.fresh[1])?;
                let mut late = t.extra_agent(
                    Side::Ours,
                    &c.pki,
                    &c.net.nodes[0],
                    "late-agent",
                    EXTRA_PORTS,
                    &[format!("--service-account-token-path={}", p.display())],
                );
                let r = async {
                    poll_until(Duration::from_secs(20), "a token_review_unavailable refusal", || async {
                        (refused(&t, "token_review_unavailable").await > before).then_some(())
                    })
                    .await?;
                    ensure!(ready(&t).await == 2.0, "the late agent was admitted without a review");
                    // An existing stream still carries a dial to node 1's kubelet.
                    let tests::cluster::Egress::GrpcUds(sock) = &egress else {
                        anyhow::bail!("want the GRPC socket")
                    };
                    let ch = tests::client::grpc_uds(sock).await;
                    let kubelet = format!("{}:10250", c.net.nodes[0].kubelet_ip);
                    let conn = tests::client::GrpcConn::dial(&ch, &kubelet)
                        .await
                        .map_err(|e| anyhow::anyhow!("dial {kubelet} with kube-apiserver down: {e}"))?;
                    conn.close().await;
                    Ok(())
                }
                .await;
                let back = cluster.start_apiserver(&egress).await;
                let admitted = match (&r, &back) {
                    (Ok(()), Ok(())) => t.wait_agents(3).await,
                    _ => Ok(()),
                };
                late.kill().await;
                r?;
                back?;
                admitted?;
                t.wait_agents_exactly(2).await
            },
        )
        .await;

    report
        .case(
            name,
            "token rotation: the file is rewritten, the old token revoked, the server restarted -> agents reconnect with the new token",
            Duration::from_secs(90),
            async {
                let c = &*cluster;
                write(&dir, "agent-token", &tok.good_2)?;
                c.kubectl
                    .run(&["delete", "secret", "-n", "kube-system", "agent-token-1"])
                    .await
                    .checked("delete secret")?;
                // The old token is dead now (a one-off agent with it is refused)...
                expect_refusal(c, &t, Side::Ours, Some(&tok.good_1), "token_not_authenticated").await?;
                // ...so reconnecting works only with the rewritten file.
                t.restart_server().await?;
                t.wait_agents(2).await
            },
        )
        .await;
    t.stop().await;
}

/// A TCP balancer in front of several servers' agent ports, as a cloud load
/// balancer would be: each connection goes to a random backend.
struct Balancer {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(backends: Vec<String>) -> anyhow::Result<Balancer> {
        let l = TcpListener::bind((CONTROL_PLANE_IP, 0)).await?;
        let addr = l.local_addr()?.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                let choice = backends[rand::random_range(0..backends.len())].clone();
                tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&choice).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Ok(Balancer { addr, task })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Each server Lease (by the label) mapped by `f`, sorted.
async fn server_leases<T: Ord>(
    c: &Cluster,
    f: impl Fn(&serde_json::Value) -> T,
) -> anyhow::Result<Vec<T>> {
    let v = c
        .kubectl
        .json(
            &[
                "get",
                "leases",
                "-n",
                "kube-system",
                "-l",
                "k8s-app=konnectivity-server",
                "-o",
                "json",
            ],
            "get leases",
        )
        .await?;
    let mut out: Vec<T> = v["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(f)
        .collect();
    out.sort();
    Ok(out)
}

fn text(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The server Leases as kubectl sees them: (name, holder, duration).
async fn lease_list(c: &Cluster) -> anyhow::Result<Vec<(String, String, i64)>> {
    server_leases(c, |l| {
        (
            text(&l["metadata"]["name"]),
            text(&l["spec"]["holderIdentity"]),
            l["spec"]["leaseDurationSeconds"].as_i64().unwrap_or(-1),
        )
    })
    .await
}

/// (name, renewTime) of each server Lease, by name.
async fn renew_times(c: &Cluster) -> anyhow::Result<Vec<(String, String)>> {
    server_leases(c, |l| {
        (text(&l["metadata"]["name"]), text(&l["spec"]["renewTime"]))
    })
    .await
}

async fn wait_leases(c: &Cluster, ids: &[String]) -> anyhow::Result<()> {
    let want: Vec<_> = ids
        .iter()
        .map(|id| (format!("konnectivity-proxy-server-{id}"), id.clone(), 30))
        .collect();
    let last = Mutex::new(Vec::new());
    let r = poll_until(Duration::from_secs(30), "the server leases", || async {
        let got = lease_list(c).await.ok()?;
        *last.lock().expect("last") = got.clone();
        (got == want).then_some(())
    })
    .await;
    r.with_context(|| format!("leases {:?}, want {want:?}", last.lock().expect("last")))
}

/// The one-off agent's `known_server_count`, read inside node-1's namespace.
async fn known_count(c: &Cluster) -> Option<f64> {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.net.nodes[0].netns,
            "curl",
            "-s",
            "--max-time",
            "2",
        ])
        .arg(format!("http://127.0.0.1:{}/metrics", EXTRA_PORTS.0))
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains(KNOWN).then(|| metric_sum(&text, KNOWN, &[]))
}

async fn wait_known(c: &Cluster, n: f64) -> anyhow::Result<()> {
    let last = Mutex::new(None);
    let r = poll_until(
        Duration::from_secs(30),
        &format!("the agent's server count of {n}"),
        || async {
            let k = known_count(c).await;
            *last.lock().expect("last") = k;
            (k == Some(n)).then_some(())
        },
    )
    .await;
    r.with_context(|| format!("the agent counts {:?}", last.lock().expect("last")))
}

/// Waits until each server in `servers` sees exactly `n` agent streams.
async fn wait_streams(servers: &[&Tunnel], n: f64) -> anyhow::Result<()> {
    for (i, s) in servers.iter().enumerate() {
        poll_until(
            Duration::from_secs(30),
            &format!("{n} agent stream(s) at server {}", i + 1),
            || async { (ready(s).await == n).then_some(()) },
        )
        .await
        .with_context(|| format!("server {} log:\n{}", i + 1, s.server.tail(10)))?;
    }
    Ok(())
}

async fn leases(cluster: &mut Cluster, report: &mut Report, servers: [Side; 3], agent: Side) {
    let name = format!(
        "leases servers={} agent={}",
        servers.map(Side::name).join(","),
        agent.name()
    );
    let c = &*cluster;
    let ids: Vec<String> = (1..=3)
        .map(|i| format!("lease-{}-{i}", agent.name()))
        .collect();
    let mut tunnels = Vec::new();
    report
        .case(
            &name,
            "three servers publish their Leases (holder, 30 s)",
            Duration::from_secs(60),
            async {
                for (side, id) in servers.iter().zip(&ids) {
                    let extra = Extra {
                        server: vec![
                            "--enable-lease-controller".into(),
                            kubeconfig(c),
                            format!("--server-id={id}"),
                        ],
                        agent: Vec::new(),
                    };
                    tunnels.push(
                        Tunnel::start_with(
                            &c.bins,
                            c.dir.path(),
                            &c.pki,
                            Mode::ConnectTls,
                            (*side, agent),
                            &[],
                            extra,
                        )
                        .await?,
                    );
                }
                wait_leases(c, &ids).await
            },
        )
        .await;
    if tunnels.len() != 3 {
        for t in tunnels {
            t.stop().await;
        }
        return;
    }
    let lb = match Balancer::start(tunnels.iter().map(|t| t.agent_addr()).collect()).await {
        Ok(b) => b,
        Err(e) => {
            println!("FAIL [{name}] balancer: {e:#}");
            report.failed.push(format!("[{name}] balancer"));
            return;
        }
    };
    let lb_port = lb
        .addr
        .rsplit_once(':')
        .map(|p| p.1.to_string())
        .unwrap_or_default();
    let mut a = tunnels[0].extra_agent(
        agent,
        &c.pki,
        &c.net.nodes[0],
        "lease-counter",
        EXTRA_PORTS,
        &[
            format!("--proxy-server-port={lb_port}"),
            "--count-server-leases".into(),
            "--v=4".into(),
            kubeconfig(c),
        ],
    );
    report
        .case(
            &name,
            "the agent holds three streams through one balanced address",
            Duration::from_secs(60),
            async {
                wait_known(c, 3.0).await?;
                let all: Vec<&Tunnel> = tunnels.iter().collect();
                wait_streams(&all, 1.0).await
            },
        )
        .await;
    report
        .case(
            &name,
            "every Lease is renewed within a period (renewTime advances) and the agent keeps counting 3",
            Duration::from_secs(60),
            async {
                let before = renew_times(c).await?;
                poll_until(Duration::from_secs(25), "every Lease renewed", || async {
                    let now = renew_times(c).await.ok()?;
                    (now.len() == before.len() && now.iter().zip(&before).all(|(a, b)| a.0 == b.0 && a.1 > b.1))
                        .then_some(())
                })
                .await
                .with_context(|| format!("renew times before: {before:?}"))?;
                wait_known(c, 3.0).await
            },
        )
        .await;
    report
        .case(
            &name,
            "an expired Lease with the label is not counted and is collected",
            Duration::from_secs(60),
            async {
                c.kubectl
                    .apply(
                        "apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: konnectivity-proxy-server-gone, namespace: kube-system, labels: {k8s-app: konnectivity-server}}
spec: {holderIdentity: gone, leaseDurationSeconds: 30, renewTime: '2020-01-01T00:00:00.000000Z'}
",
                    )
                    .await?;
                // Seen by the agent's watch at once, and not counted...
                tokio::time::sleep(Duration::from_secs(1)).await;
                let k = known_count(c).await;
                ensure!(k == Some(3.0), "with an expired Lease the agent counts {k:?}, want 3");
                // ...and collected by one of the servers within a period or two.
                wait_leases(c, &ids).await
            },
        )
        .await;
    if agent == Side::Ours {
        // Better than upstream, whose informer cache lets every Lease expire
        // while kube-apiserver is away and so falls back to one server.
        report
            .case(
                &name,
                "kube-apiserver down longer than a Lease lasts: the agent keeps counting 3 and its streams; back: in sync, Leases renewed",
                Duration::from_secs(200),
                async {
                    if let Some(api) = cluster.api.take() {
                        api.stop().await;
                    }
                    tokio::time::sleep(Duration::from_secs(35)).await;
                    let during = known_count(cluster).await;
                    let streams = {
                        let all: Vec<&Tunnel> = tunnels.iter().collect();
                        wait_streams(&all, 1.0).await
                    };
                    let back = cluster.restart_apiserver().await;
                    ensure!(
                        during == Some(3.0),
                        "the agent counts {during:?} during the outage, want 3; agent log:\n{}",
                        a.logs()
                            .iter()
                            .filter(|l| l.contains("lease") || l.contains("count"))
                            .cloned()
                            .collect::<Vec<_>>()
                            .join("\n")
                    );
                    streams?;
                    back?;
                    // The watch's own backoff (up to 30 s between attempts,
                    // so a fleet of agents does not stampede) sets the pace.
                    poll_until(Duration::from_secs(90), "the agent's lease watch in sync again", || async {
                        let n = a.logs().iter().filter(|l| l.contains("server lease watch in sync")).count();
                        (n >= 2).then_some(())
                    })
                    .await?;
                    wait_leases(cluster, &ids).await?;
                    wait_known(cluster, 3.0).await
                },
            )
            .await;
    }
    let c = &*cluster;
    report
        .case(
            &name,
            "a server stopped gracefully deletes its Lease; the agent settles on two; restarted -> three",
            Duration::from_secs(120),
            async {
                let third = &mut tunnels[2];
                third.server.signal("TERM");
                let _ = tokio::time::timeout(Duration::from_secs(20), third.server.child.wait()).await;
                wait_leases(c, &ids[..2]).await?;
                wait_known(c, 2.0).await?;
                wait_streams(&[&tunnels[0], &tunnels[1]], 1.0).await?;
                tunnels[2].restart_server().await?;
                wait_leases(c, &ids).await?;
                wait_known(c, 3.0).await?;
                let all: Vec<&Tunnel> = tunnels.iter().collect();
                wait_streams(&all, 1.0).await
            },
        )
        .await;
    a.kill().await;
    drop(lb);
    report
        .case(
            &name,
            "every server stopped gracefully -> no Lease left",
            Duration::from_secs(60),
            async {
                for t in &mut tunnels {
                    t.server.signal("TERM");
                    let _ =
                        tokio::time::timeout(Duration::from_secs(20), t.server.child.wait()).await;
                }
                wait_leases(c, &[]).await
            },
        )
        .await;
    for t in tunnels {
        t.stop().await;
    }
}

// --- the deploy/ manifests, literally ----------------------------------------

/// `deploy/` in the repository.
fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The container's command and args of a Pod or DaemonSet in kubectl's JSON.
fn container_argv(obj: &serde_json::Value) -> anyhow::Result<Vec<String>> {
    let spec = if obj["kind"] == "Pod" {
        &obj["spec"]
    } else {
        &obj["spec"]["template"]["spec"]
    };
    let c = &spec["containers"][0];
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = strings(&c["command"]);
    argv.extend(strings(&c["args"]));
    ensure!(
        argv.len() > 1,
        "no command and args in {}",
        obj["metadata"]["name"]
    );
    Ok(argv)
}

/// Maps host paths and placeholders of the manifests to the test's own
/// files; fails when a `forbidden` text is left, so nothing is silently
/// dropped.
struct PathMap {
    pairs: Vec<(String, String)>,
    forbidden: &'static [&'static str],
}

impl PathMap {
    fn apply(&self, arg: &str) -> anyhow::Result<String> {
        let mut out = arg.to_string();
        for (from, to) in &self.pairs {
            out = out.replace(from.as_str(), to);
        }
        ensure!(
            !self.forbidden.iter().any(|f| out.contains(f)),
            "the manifest argument {arg} names a path the test does not map"
        );
        Ok(out)
    }

    fn argv(&self, argv: &[String], binary: &str) -> anyhow::Result<Vec<String>> {
        let mut out = vec![tests::process::binary(binary).display().to_string()];
        for a in &argv[1..] {
            out.push(self.apply(a)?);
        }
        Ok(out)
    }
}

/// The first `key: value` of a YAML text.
fn yaml_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
}

/// Applies `deploy/` with kubectl's kustomize, reads back the DaemonSet, has
/// kube-apiserver validate the server's static pod, and starts our server and
/// agent with exactly those manifests' arguments (paths mapped into the test
/// directory); kube-apiserver uses the manifests' egress configuration.
pub async fn manifests(cluster: &mut Cluster, report: &mut Report) {
    let name = "deploy manifests";
    println!("== {name}");
    let deploy = deploy_dir();
    let mut procs = Vec::new();
    let started = async {
        let c = &*cluster;
        let d = |p: &str| deploy.join(p).display().to_string();
        // The HA overlay holds the base: applying it checks both.
        c.kubectl
            .run(&["apply", "-k", &d("ha")])
            .await
            .checked("kubectl apply -k deploy/ha")?;
        let ds = c
            .kubectl
            .json(
                &[
                    "get",
                    "daemonset",
                    "konnectivity-agent",
                    "-n",
                    "kube-system",
                    "-o",
                    "json",
                ],
                "get the agent DaemonSet",
            )
            .await?;
        let pod = c
            .kubectl
            .json(
                &[
                    "create",
                    "--dry-run=server",
                    "-o",
                    "json",
                    "-f",
                    &d("control-plane/konnectivity-server.yaml"),
                ],
                "kube-apiserver validates the server's static pod",
            )
            .await?;
        let egress_text = std::fs::read_to_string(
            deploy.join("control-plane/egress-selector-configuration.yaml"),
        )?;

        // The test's stand-ins for the control-plane node's files.
        let dir = c.dir.path().join("deploy");
        std::fs::create_dir_all(dir.join("konnectivity-server"))?;
        let server_user = c
            .pki
            .user("konnectivity-server-user", "system:konnectivity-server")?;
        let server_kubeconfig = dir.join("konnectivity-server.conf");
        let api_url = c.api.as_ref().context("kube-apiserver")?.url.clone();
        tests::cluster::control_plane::write_kubeconfig(
            &server_kubeconfig,
            &api_url,
            &c.pki,
            &server_user,
        )?;
        let f = |p: &Path| p.display().to_string();
        let map = PathMap {
            pairs: vec![
                (
                    "/etc/kubernetes/konnectivity-server/".into(),
                    format!("{}/", f(&dir.join("konnectivity-server"))),
                ),
                (
                    "/etc/kubernetes/pki/apiserver.crt".into(),
                    f(&c.pki.tunnel_server.cert),
                ),
                (
                    "/etc/kubernetes/pki/apiserver.key".into(),
                    f(&c.pki.tunnel_server.key),
                ),
                (
                    "/etc/kubernetes/konnectivity-server.conf".into(),
                    f(&server_kubeconfig),
                ),
            ],
            forbidden: &["/etc/kubernetes", "/var/run", "KONNECTIVITY_"],
        };
        // The agent runs as in its pod: in a mount namespace of its own,
        // /var/run/secrets holds the service account's token, CA and
        // namespace, and the projected token; its paths stay literal, and it
        // finds kube-apiserver by the in-cluster variables.
        let agent_map = PathMap {
            pairs: vec![(
                "KONNECTIVITY_SERVER_ADDRESS".into(),
                CONTROL_PLANE_IP.to_string(),
            )],
            forbidden: &["KONNECTIVITY_", "/etc/kubernetes"],
        };
        let volumes = &ds["spec"]["template"]["spec"]["volumes"];
        let projected = &volumes[0]["projected"]["sources"][0]["serviceAccountToken"];
        let (audience, token_name) = (
            projected["audience"]
                .as_str()
                .context("the DaemonSet's projected token has no audience")?,
            projected["path"]
                .as_str()
                .context("the DaemonSet's projected token has no path")?,
        );
        let secrets = dir.join("agent-secrets");
        std::fs::create_dir_all(&secrets)?;
        std::fs::copy(&c.pki.ca, secrets.join("ca.crt"))?;
        write(&secrets, "namespace", "kube-system")?;
        write(
            &secrets,
            "token",
            &token(
                c,
                "kube-system",
                "konnectivity-agent",
                "https://kubernetes.default.svc",
                None,
            )
            .await?,
        )?;
        write(
            &secrets,
            token_name,
            &token(c, "kube-system", "konnectivity-agent", audience, None).await?,
        )?;
        let script = format!(
            "set -e; mount -t tmpfs tmpfs /var/run; \
             mkdir -p /var/run/secrets/kubernetes.io/serviceaccount /var/run/secrets/tokens; \
             cp {s}/ca.crt {s}/token {s}/namespace /var/run/secrets/kubernetes.io/serviceaccount/; \
             cp {s}/{token_name} /var/run/secrets/tokens/; exec \"$@\"",
            s = f(&secrets)
        );
        let api_port = api_url
            .rsplit_once(':')
            .map(|p| p.1.to_string())
            .unwrap_or_default();
        let server_argv = map.argv(&container_argv(&pod)?, "proxy-server")?;
        let agent_argv = agent_map.argv(&container_argv(&ds)?, "proxy-agent")?;
        ensure!(
            agent_argv.iter().any(|a| a == "--count-server-leases"),
            "the HA overlay does not add --count-server-leases"
        );

        // kube-apiserver's egress names the socket the server listens on, in
        // the mode the server runs.
        let uds = map.apply(&yaml_value(&egress_text, "udsName").context("udsName")?)?;
        ensure!(
            server_argv.contains(&format!("--uds-name={uds}")),
            "the egress socket {uds} is not the server's --uds-name"
        );
        ensure!(
            yaml_value(&egress_text, "proxyProtocol").as_deref() == Some("GRPC")
                && server_argv.iter().any(|a| a == "--mode=grpc"),
            "the egress protocol and the server's --mode differ"
        );

        procs.push(tests::process::Proc::spawn_cmd(&server_argv, &[]));
        let probe = &pod["spec"]["containers"][0]["livenessProbe"]["httpGet"];
        let health = format!(
            "{}:{}",
            probe["host"].as_str().unwrap_or("127.0.0.1"),
            probe["port"]
        );
        let path = probe["path"].as_str().unwrap_or("/healthz").to_string();
        poll_until(
            Duration::from_secs(20),
            "the server's liveness probe",
            || async {
                tests::cluster::http_get(&health, &path)
                    .await
                    .filter(|b| b.trim() == "ok")
            },
        )
        .await
        .with_context(|| procs[0].tail(10))?;
        let mut agent = c.net.nodes[0].exec_prefix();
        agent.extend(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
                "sh",
            ]
            .map(String::from),
        );
        agent.extend(agent_argv);
        let env = [
            ("KUBERNETES_SERVICE_HOST", CONTROL_PLANE_IP.to_string()),
            ("KUBERNETES_SERVICE_PORT", api_port),
        ];
        procs.push(tests::process::Proc::spawn_cmd(&agent, &env));
        poll_until(
            Duration::from_secs(30),
            "the agent admitted by token",
            || async {
                let m = tests::cluster::http_get(&health, "/metrics").await?;
                (metric_sum(&m, READY, &[]) == 1.0).then_some(())
            },
        )
        .await
        .with_context(|| {
            format!(
                "server:\n{}\nagent:\n{}",
                procs[0].tail(10),
                procs[1].tail(10)
            )
        })?;
        anyhow::Ok(tests::cluster::Egress::GrpcUds(PathBuf::from(uds)))
    }
    .await;
    let egress = match started {
        Ok(e) => {
            report.passed += 1;
            println!("ok   [{name}] kustomize applies; our server and agent start with the manifests' exact arguments; the agent is admitted by its projected token and counts Leases with the in-cluster config");
            e
        }
        Err(e) => {
            println!("FAIL [{name}] start from the manifests: {e:#}");
            report
                .failed
                .push(format!("[{name}] start from the manifests"));
            return;
        }
    };
    report
        .case(
            name,
            "kubectl logs through the documented deployment (node 1)",
            Duration::from_secs(150),
            async {
                cluster.start_apiserver(&egress).await?;
                logs_exact_on(cluster, cluster.node("node-1")).await
            },
        )
        .await;
    for mut p in procs {
        p.kill().await;
    }
}
