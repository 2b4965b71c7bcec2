//! `soak`: our server and two agents for a long while (30 minutes by
//! default) under churn: fresh dials from several workers, long-lived
//! streams doing round trips, one agent restarted every minute and the
//! server every ten. Every few seconds each process's resident memory, open
//! descriptors and live tokio tasks are sampled (`/proc` and the
//! `process_*` / `tokio_alive_tasks` metrics), so a leak shows as a figure
//! that keeps growing over one process's life. Not a CI test: it takes its
//! time and reports figures.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tests::client::GrpcConn;
use tokio::process::Child;

use crate::setup::{free_port, spawn, wait_ready};

/// How long and how hard.
pub struct Plan {
    /// Whole run.
    pub duration: Duration,
    /// Between samples.
    pub sample: Duration,
    /// Between restarts of the churned agent.
    pub agent_restart_every: Duration,
    /// Between server restarts.
    pub server_restart_every: Duration,
    /// Workers making fresh dials (each pauses 20 ms between dials).
    pub workers: usize,
    /// Long-lived streams.
    pub streams: usize,
}

/// One of our processes, restartable with the same flags.
struct Component {
    name: &'static str,
    bin: PathBuf,
    args: Vec<String>,
    health: String,
    child: Option<Child>,
    started: Instant,
}

impl Component {
    async fn start(&mut self) -> anyhow::Result<()> {
        self.child = Some(spawn(&self.bin, &self.args, false)?);
        self.started = Instant::now();
        if self.name == "server" {
            // Ready means "has an agent"; serving is enough to go on.
            for _ in 0..600 {
                if tests::cluster::http_get(&self.health, "/healthz")
                    .await
                    .is_some()
                {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::bail!("server never served /healthz");
        }
        wait_ready(&self.health)
            .await
            .with_context(|| format!("{} ready", self.name))
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGTERM (drain), then a kill if it is still there after 10 s.
    async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
        self.start().await
    }

    async fn sample(&self) -> Value {
        let pid = self.pid();
        let (rss, _) = tests::process::rss_kib(pid).unwrap_or((0, 0));
        let fds = pid
            .and_then(|p| std::fs::read_dir(format!("/proc/{p}/fd")).ok())
            .map_or(0, |d| d.count());
        let metrics = tests::cluster::http_get(&self.health, "/metrics")
            .await
            .unwrap_or_default();
        let tasks = tests::cluster::metric_sum(&metrics, "tokio_alive_tasks", &[]);
        json!({
            "pid": pid,
            "age_s": self.started.elapsed().as_secs(),
            "rss_kib": rss,
            "fds": fds,
            "tasks": tasks,
        })
    }
}

#[derive(Default)]
struct Counters {
    dials_ok: AtomicU64,
    dials_failed: AtomicU64,
    round_trips: AtomicU64,
    streams_broken: AtomicU64,
}

/// Runs the plan; returns the samples, counters and a summary.
pub async fn run(
    plan: &Plan,
    bins: &crate::setup::Binaries,
    pki: &tests::pki::Pki,
    echo: std::net::SocketAddr,
) -> anyhow::Result<Value> {
    let uds = pki.path("soak.sock");
    let (agent_port, server_health) = (free_port(), free_port());
    let mut args = tests::inproc::Server::args(pki, "grpc", tests::inproc::Listen::Uds, &uds, &[]);
    args.retain(|a| !a.starts_with("--agent-port") && !a.starts_with("--health-port"));
    args.extend([
        format!("--agent-port={agent_port}"),
        format!("--health-port={server_health}"),
        "--grace-period=2s".into(),
    ]);
    let mut server = Component {
        name: "server",
        bin: bins.ours.join("proxy-server"),
        args: args[1..].to_vec(),
        health: format!("127.0.0.1:{server_health}"),
        child: None,
        started: Instant::now(),
    };
    server.start().await?;
    let agent = |name: &'static str| {
        let health = free_port();
        let server = std::net::SocketAddr::from(([127, 0, 0, 1], agent_port));
        let mut args = tests::inproc::Agent::args(pki, server, name, &[]);
        args.retain(|a| !a.starts_with("--health-server-port"));
        args.push(format!("--health-server-port={health}"));
        Component {
            name,
            bin: bins.ours.join("proxy-agent"),
            args: args[1..].to_vec(),
            health: format!("127.0.0.1:{health}"),
            child: None,
            started: Instant::now(),
        }
    };
    let mut steady = agent("steady-agent");
    let mut churned = agent("churned-agent");
    steady.start().await?;
    churned.start().await?;

    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + plan.duration;
    let mut load = Vec::new();
    for _ in 0..plan.workers {
        let (c, uds) = (counters.clone(), uds.clone());
        load.push(tokio::spawn(async move {
            let ch = tests::client::grpc_uds(std::path::Path::new(&uds)).await;
            while Instant::now() < deadline {
                let ok = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut conn = GrpcConn::dial(&ch, &echo.to_string()).await.ok()?;
                    conn.send(&b"soak: one fresh dial"[..]).await.ok()?;
                    let got = conn.recv().await?;
                    conn.close().await;
                    (&got[..] == b"soak: one fresh dial").then_some(())
                })
                .await;
                match ok {
                    Ok(Some(())) => c.dials_ok.fetch_add(1, Ordering::Relaxed),
                    _ => c.dials_failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for _ in 0..plan.streams {
        let (c, uds) = (counters.clone(), uds.clone());
        load.push(tokio::spawn(async move {
            let ch = tests::client::grpc_uds(std::path::Path::new(&uds)).await;
            while Instant::now() < deadline {
                let Ok(mut conn) = GrpcConn::dial(&ch, &echo.to_string()).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while Instant::now() < deadline {
                    let trip = tokio::time::timeout(Duration::from_secs(10), async {
                        conn.send(&b"soak: a long stream"[..]).await.ok()?;
                        conn.recv().await
                    })
                    .await;
                    if !matches!(trip, Ok(Some(_))) {
                        c.streams_broken.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    c.round_trips.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    let (mut next_agent, mut next_server) = (
        started + plan.agent_restart_every,
        started + plan.server_restart_every,
    );
    let mut restarts = (0u32, 0u32);
    while Instant::now() < deadline {
        tokio::time::sleep(plan.sample).await;
        let now = Instant::now();
        if now >= next_agent {
            churned.restart().await?;
            restarts.0 += 1;
            next_agent = now + plan.agent_restart_every;
        }
        if now >= next_server {
            server.restart().await?;
            restarts.1 += 1;
            next_server = now + plan.server_restart_every;
        }
        let s = json!({
            "t_s": started.elapsed().as_secs(),
            "server": server.sample().await,
            "steady-agent": steady.sample().await,
            "churned-agent": churned.sample().await,
            "dials_ok": counters.dials_ok.load(Ordering::Relaxed),
            "dials_failed": counters.dials_failed.load(Ordering::Relaxed),
        });
        eprintln!("  {s}");
        samples.push(s);
    }
    for l in load {
        let _ = l.await;
    }
    let summary = summarize(&samples);
    Ok(json!({
        "plan": {
            "duration_s": plan.duration.as_secs(),
            "agent_restart_every_s": plan.agent_restart_every.as_secs(),
            "server_restart_every_s": plan.server_restart_every.as_secs(),
            "workers": plan.workers,
            "streams": plan.streams,
        },
        "agent_restarts": restarts.0,
        "server_restarts": restarts.1,
        "dials_ok": counters.dials_ok.load(Ordering::Relaxed),
        "dials_failed": counters.dials_failed.load(Ordering::Relaxed),
        "round_trips": counters.round_trips.load(Ordering::Relaxed),
        "streams_broken": counters.streams_broken.load(Ordering::Relaxed),
        "summary": summary,
        "samples": samples,
    }))
}

/// Per process (component and pid) that lived past a minute: its figures a
/// minute into its life and at its last sample, and the largest seen.
fn summarize(samples: &[Value]) -> Value {
    let mut out = Vec::new();
    for name in ["server", "steady-agent", "churned-agent"] {
        let mut by_pid: Vec<(u64, Vec<&Value>)> = Vec::new();
        for s in samples {
            let c = &s[name];
            let Some(pid) = c["pid"].as_u64() else {
                continue;
            };
            if c["age_s"].as_u64().unwrap_or(0) < 60 {
                continue;
            }
            match by_pid.iter_mut().find(|(p, _)| *p == pid) {
                Some((_, v)) => v.push(c),
                None => by_pid.push((pid, vec![c])),
            }
        }
        for (pid, v) in by_pid {
            let (first, last) = (v[0], v[v.len() - 1]);
            let max = |k: &str| v.iter().filter_map(|c| c[k].as_f64()).fold(0.0, f64::max) as u64;
            out.push(json!({
                "process": name,
                "pid": pid,
                "from_age_s": first["age_s"],
                "to_age_s": last["age_s"],
                "rss_kib": [first["rss_kib"], last["rss_kib"], max("rss_kib")],
                "fds": [first["fds"], last["fds"], max("fds")],
                "tasks": [first["tasks"], last["tasks"], max("tasks")],
            }));
        }
    }
    Value::Array(out)
}

/// Prints the summary: one line per process, first / last / max.
pub fn print(result: &Value) {
    println!(
        "soak: {} dials ok, {} failed (across {} agent and {} server restarts); {} round trips on long streams, {} streams broken",
        result["dials_ok"], result["dials_failed"], result["agent_restarts"], result["server_restarts"],
        result["round_trips"], result["streams_broken"]
    );
    println!("process        pid      ages (s)     RSS KiB first/last/max   fds first/last/max   tasks first/last/max");
    for r in result["summary"].as_array().into_iter().flatten() {
        let three = |k: &str| {
            r[k].as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .unwrap_or_default()
        };
        println!(
            "{:<14} {:<8} {:>4}-{:<6} {:>26} {:>20} {:>22}",
            r["process"].as_str().unwrap_or(""),
            r["pid"],
            r["from_age_s"],
            r["to_age_s"],
            three("rss_kib"),
            three("fds"),
            three("tasks")
        );
    }
}
