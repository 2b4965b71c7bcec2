//! `bench cluster`: what an operator's `kubectl` sees through each tunnel, on
//! the real control plane of the cluster suite (`tests::cluster`): 100
//! sequential `kubectl logs`, `exec -i` of 200 MB, and a 100 MB port-forward
//! download, ours against the upstream server and agent, in the same run.
//! Needs `KUBE_E2E_BIN` (`tests/cluster/build.sh` prints it) and root.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tests::cluster::{self, Bins, Cluster, Mode, Side, Tunnel};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Runs the cluster rows for `modes` and prints their table.
pub async fn run(
    modes: &[Mode],
    logs_iters: usize,
    exec_mb: usize,
    pf_mb: usize,
) -> anyhow::Result<Value> {
    if let Some(why) = cluster::unavailable() {
        bail!("the cluster rows cannot run: {why}");
    }
    let bins = Bins(
        std::env::var_os("KUBE_E2E_BIN")
            .context("KUBE_E2E_BIN")?
            .into(),
    );
    let mut c = Cluster::prepare(bins, 2).await?;
    let mut rows = Vec::new();
    for &mode in modes {
        for side in [Side::Ours, Side::Upstream] {
            let name = format!("{} {}", side.name(), mode.name());
            eprintln!("== cluster {name}");
            let t = Tunnel::start(
                &c.bins,
                c.dir.path(),
                &c.pki,
                mode,
                side,
                side,
                &c.net.nodes,
            )
            .await?;
            c.start_apiserver(&t.egress).await?;
            // One warm-up request so kube-apiserver's first-use costs are not
            // in the figures.
            c.kubectl
                .run(&["logs", &c.nodes[0].pod])
                .await
                .checked("warm-up")?;
            let logs = logs_latency(&c, logs_iters).await?;
            let exec = exec_stdin(&c, exec_mb).await?;
            let pf = port_forward(&c, pf_mb).await?;
            rows.push(
                json!({"setup": name, "logs_p50_ms": logs.0, "logs_p99_ms": logs.1,
                "exec_mb_s": exec, "port_forward_mb_s": pf}),
            );
            t.stop().await;
        }
    }
    println!();
    println!("| setup | `kubectl logs` p50 / p99, ms ({logs_iters} sequential) | `exec -i` {exec_mb} MB, MB/s | port-forward {pf_mb} MB download, MB/s |");
    println!("|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} / {:.1} | {:.1} | {:.1} |",
            r["setup"].as_str().unwrap_or(""),
            r["logs_p50_ms"].as_f64().unwrap_or(f64::NAN),
            r["logs_p99_ms"].as_f64().unwrap_or(f64::NAN),
            r["exec_mb_s"].as_f64().unwrap_or(f64::NAN),
            r["port_forward_mb_s"].as_f64().unwrap_or(f64::NAN),
        );
    }
    Ok(Value::Array(rows))
}

async fn logs_latency(c: &Cluster, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let pod = &c.nodes[i % c.nodes.len()].pod;
        let out = c.kubectl.run(&["logs", pod]).await;
        let took = out.elapsed.as_secs_f64() * 1000.0;
        out.checked("kubectl logs")?;
        ms.push(took);
    }
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    Ok((pct(0.50), pct(0.99)))
}

async fn exec_stdin(c: &Cluster, mb: usize) -> anyhow::Result<f64> {
    let size = mb * 1_000_000;
    let data = tests::pattern(size, 3);
    let want = tests::sha256_hex(&data);
    let script = format!("head -c {size} | sha256sum");
    let start = Instant::now();
    let out = c
        .kubectl
        .run_with(
            &["exec", "-i", &c.nodes[0].pod, "--", "sh", "-c", &script],
            &[],
            Some(&data),
        )
        .await
        .checked("kubectl exec -i")?;
    let secs = start.elapsed().as_secs_f64();
    if !out.starts_with(&want) {
        bail!("exec -i: sha256 {out:?}, want {want}");
    }
    Ok(mb as f64 / secs)
}

async fn port_forward(c: &Cluster, mb: usize) -> anyhow::Result<f64> {
    let size = mb * 1_000_000;
    let mut cmd = c.kubectl.command(
        &[
            "port-forward",
            &format!("pod/{}", c.nodes[0].pod),
            &format!(":{}", cluster::node::POD_PORT),
        ],
        &[],
    );
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .context("port-forward did not start")??
        .context("port-forward exited")?;
    let addr = cluster::node::forwarded_addr(&line).context("local port")?;
    let start = Instant::now();
    cluster::node::get_pattern(&addr, size, false).await?;
    let secs = start.elapsed().as_secs_f64();
    let _ = child.kill().await;
    Ok(mb as f64 / secs)
}
