//! `cargo build --release --bins && cargo run --release -p bench -- all [--quick]`
//!
//! Measures, side by side in one run on loopback: direct TCP (the limit), our
//! server and agent, and the upstream Go server and agent (built from the Go
//! module pinned in `tests/interop`), each driven by the same client through
//! the gRPC frontend and through HTTP CONNECT on a Unix socket. Prints a table
//! and writes JSON.

mod cluster;
mod floor;
mod setup;
mod soak;
mod workloads;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use setup::{Binaries, Impl, SetupKind};

#[derive(Parser, Debug)]
#[command(about = "Tunnel benchmark: direct TCP vs ours vs upstream")]
struct Args {
    /// What to run: all, or a comma-separated list of throughput, latency,
    /// concurrency, churn, isolation; or `cluster` alone: kubectl through
    /// each tunnel on a real control plane (needs `KUBE_E2E_BIN` and root);
    /// or `soak` alone: ours for `--soak-duration` under churn and restarts,
    /// sampling memory, descriptors and tasks
    /// (`dest` is internal: the destination servers' own process).
    #[arg(default_value = "all")]
    what: String,
    /// Small sizes; finishes in under two minutes.
    #[arg(long)]
    quick: bool,
    /// Comma-separated setups.
    #[arg(
        long,
        default_value = "direct,tls-floor,ours-grpc,ours-quic-grpc,upstream-grpc,ours-connect,ours-quic-connect,upstream-connect"
    )]
    setups: String,
    /// Bytes moved per direction in the throughput rows (MiB).
    #[arg(long)]
    bulk_mib: Option<usize>,
    /// Round trips for the established-connection latency.
    #[arg(long)]
    latency_iters: Option<usize>,
    /// Fresh connections for the dial latency.
    #[arg(long)]
    fresh_iters: Option<usize>,
    /// Concurrent connection counts, comma-separated.
    #[arg(long)]
    concurrency: Option<String>,
    /// Open/close cycles for churn.
    #[arg(long)]
    churn_cycles: Option<usize>,
    /// Parallel workers for churn.
    #[arg(long, default_value_t = 16)]
    churn_workers: usize,
    /// Per-step timeout.
    #[arg(long, default_value = "120s", value_parser = konnectivity_runtime::duration::parse)]
    timeout: Duration,
    /// Rounds for the throughput and latency rows. Every setup is up at once
    /// and each round visits each setup in turn: one transfer per direction
    /// (the table shows the median; single transfers vary by up to 30% on a
    /// shared machine) and an equal share of the latency samples.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Pause this long with every connection of the concurrency row open and
    /// idle, before the burst: time to attach a profiler or read
    /// `/proc/<pid>/smaps`. The step timeout must cover it.
    #[arg(long, value_parser = konnectivity_runtime::duration::parse)]
    hold_idle: Option<Duration>,
    /// `cluster`: egress modes, comma-separated (grpc-uds, connect-uds,
    /// connect-mtls).
    #[arg(long, default_value = "grpc-uds,connect-uds")]
    cluster_modes: String,
    /// `cluster`: sequential `kubectl logs` for the latency row.
    #[arg(long, default_value_t = 100)]
    cluster_logs: usize,
    /// `cluster`: MB sent through `kubectl exec -i`.
    #[arg(long, default_value_t = 200)]
    cluster_exec_mb: usize,
    /// `cluster`: MB downloaded through `kubectl port-forward`.
    #[arg(long, default_value_t = 100)]
    cluster_port_forward_mb: usize,
    /// `soak`: how long.
    #[arg(long, default_value = "30m", value_parser = konnectivity_runtime::duration::parse)]
    soak_duration: Duration,
    /// `soak`: between samples.
    #[arg(long, default_value = "10s", value_parser = konnectivity_runtime::duration::parse)]
    soak_sample: Duration,
    /// `soak`: between restarts of the churned agent.
    #[arg(long, default_value = "1m", value_parser = konnectivity_runtime::duration::parse)]
    soak_agent_restart: Duration,
    /// `soak`: between server restarts.
    #[arg(long, default_value = "10m", value_parser = konnectivity_runtime::duration::parse)]
    soak_server_restart: Duration,
    /// `floor-in`/`floor-out` (internal): CA, certificate and key files,
    /// the Unix socket and the peer address of the floor's relays.
    #[arg(long, hide = true)]
    floor_ca: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    floor_cert: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    floor_key: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    floor_uds: Option<std::path::PathBuf>,
    #[arg(long, hide = true)]
    floor_peer: Option<std::net::SocketAddr>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results.json")]
    json: String,
}

struct Sizes {
    /// How long a download beside a stalled connection may take before the
    /// isolation row calls it stalled (upstream never completes).
    stall: Duration,
    bulk: usize,
    lat: usize,
    fresh: usize,
    conc: Vec<usize>,
    churn: usize,
    iso: usize,
}

fn sizes(a: &Args) -> anyhow::Result<Sizes> {
    let (bulk, lat, fresh, conc, churn, iso) = if a.quick {
        (64, 500, 100, vec![100, 1000], 2000, 32)
    } else {
        (256, 2000, 500, vec![1000, 10000], 100_000, 128)
    };
    Ok(Sizes {
        bulk: a.bulk_mib.unwrap_or(bulk) << 20,
        lat: a.latency_iters.unwrap_or(lat),
        fresh: a.fresh_iters.unwrap_or(fresh),
        conc: match &a.concurrency {
            Some(s) => s
                .split(',')
                .map(|x| x.trim().parse())
                .collect::<Result<_, _>>()?,
            None => conc,
        },
        churn: a.churn_cycles.unwrap_or(churn),
        iso: iso << 20,
        stall: Duration::from_secs(if a.quick { 5 } else { 20 }),
    })
}

/// Median of the numeric results; an error result if none succeeded.
fn median(runs: &[Value]) -> Value {
    let v: Vec<f64> = runs.iter().filter_map(Value::as_f64).collect();
    if v.is_empty() {
        return runs.first().cloned().unwrap_or(Value::Null);
    }
    json!(workloads::median(v))
}

fn want(a: &Args, w: &str) -> bool {
    a.what == "all" || a.what.split(',').any(|x| x == w)
}

async fn step<F: std::future::Future<Output = anyhow::Result<Value>>>(
    name: &str,
    timeout: Duration,
    f: F,
) -> Value {
    eprintln!("  {name} ...");
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({"error": format!("{e:#}")}),
        Err(_) => json!({"error": format!("timed out after {timeout:?}")}),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    raise_fd_limit();
    if a.what == "dest" {
        let d = workloads::dests().await?;
        println!("{} {} {}", d.source, d.sink, d.echo);
        std::future::pending::<()>().await;
    }
    if a.what == "floor-in" || a.what == "floor-out" {
        use anyhow::Context;
        let files = floor::Files {
            ca: a.floor_ca.clone().context("--floor-ca")?,
            cert: a.floor_cert.clone().context("--floor-cert")?,
            key: a.floor_key.clone().context("--floor-key")?,
        };
        if a.what == "floor-out" {
            return floor::run_out(files).await;
        }
        let uds = a.floor_uds.clone().context("--floor-uds")?;
        let peer = a.floor_peer.context("--floor-peer")?;
        return floor::run_in(files, &uds, peer).await;
    }
    if a.what == "cluster" {
        let modes = a
            .cluster_modes
            .split(',')
            .map(|m| {
                tests::cluster::Mode::ALL
                    .into_iter()
                    .find(|x| x.name() == m.trim())
                    .ok_or_else(|| anyhow::anyhow!("unknown mode {m:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let rows = cluster::run(
            &modes,
            a.cluster_logs,
            a.cluster_exec_mb,
            a.cluster_port_forward_mb,
        )
        .await?;
        let out = json!({"machine": machine(), "cluster": rows});
        std::fs::write(&a.json, serde_json::to_string_pretty(&out)?)?;
        eprintln!("JSON written to {}", a.json);
        return Ok(());
    }
    if a.what == "soak" {
        let bins = Binaries::prepare(false)?;
        let pki = tests::pki::Pki::new();
        let (dests, _dest_proc) = workloads::spawn_dests().await?;
        let plan = soak::Plan {
            duration: a.soak_duration,
            sample: a.soak_sample,
            agent_restart_every: a.soak_agent_restart,
            server_restart_every: a.soak_server_restart,
            workers: 8,
            streams: 4,
        };
        let result = soak::run(&plan, &bins, &pki, dests.echo).await?;
        soak::print(&result);
        let out = json!({"machine": machine(), "soak": result});
        std::fs::write(&a.json, serde_json::to_string_pretty(&out)?)?;
        eprintln!("JSON written to {}", a.json);
        return Ok(());
    }
    let sz = sizes(&a)?;
    // Thousands of connections need thousands of descriptors (inherited by the
    // server and agent processes).
    let kinds: Vec<SetupKind> = a
        .setups
        .split(',')
        .map(|s| SetupKind::parse(s.trim()))
        .collect::<Result<_, _>>()?;
    let bins = Binaries::prepare(kinds.iter().any(|k| k.imp == Impl::Upstream))?;
    let pki = tests::pki::Pki::new();
    // Destinations run in their own process so that 10,000 connections fit
    // the per-process descriptor limit on both ends.
    let (dests, _dest_proc) = workloads::spawn_dests().await?;
    let mut results = serde_json::Map::new();

    let t = a.timeout;
    // One connection's speed (throughput and latency) is measured in rounds
    // with every setup up at once, each round visiting every setup: the
    // shared machine's state drifts (run to run, latency on this VM moves
    // between two levels), and interleaving spreads that drift over all
    // columns instead of handing it to whichever setup ran at the time.
    let mut up = Vec::new();
    for kind in &kinds {
        eprintln!("== starting {}", kind.name());
        let r = Arc::new(setup::start(*kind, &bins, &pki).await?);
        let idle = json!({"server": rss(r.server_pid), "agent": rss(r.agent_pid)});
        up.push((r, Speed::new(idle)));
    }
    let rounds = a.repeat.max(1);
    for round in 1..=rounds {
        for (r, speed) in &mut up {
            eprintln!("== {} (round {round} of {rounds})", r.kind.name());
            if want(&a, "throughput") {
                speed.transfers(r, &dests, sz.bulk, t).await;
            }
            if want(&a, "latency") {
                speed
                    .latency(
                        r,
                        &dests,
                        sz.lat.div_ceil(rounds),
                        sz.fresh.div_ceil(rounds),
                        t,
                    )
                    .await;
            }
        }
    }

    // Churn and isolation on the same processes, one setup at a time (the
    // others stay up, idle).
    let mut rows = Vec::new();
    let mut running = Vec::new();
    for (r, speed) in up {
        let kind = r.kind;
        eprintln!("== {}", kind.name());
        let mut row = speed.finish();
        if want(&a, "churn") {
            row.insert(
                "churn".into(),
                step(
                    "churn",
                    t * 5,
                    workloads::churn(&r, &dests, sz.churn, a.churn_workers),
                )
                .await,
            );
        }
        if want(&a, "isolation") {
            let v = step(
                "isolation",
                t * 3,
                workloads::isolation(&r, &dests, sz.iso, 9, sz.stall),
            )
            .await;
            row.insert("isolation".into(), v);
        }
        row.insert(
            "final".into(),
            json!({"server": rss(r.server_pid), "agent": rss(r.agent_pid)}),
        );
        rows.push((kind, row));
        running.push(r);
    }
    // Every process above is gone before the concurrency rows, which start
    // fresh processes (bytes per connection must not depend on what earlier
    // rows left in the heap) with nothing else running.
    drop(running);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (kind, mut row) in rows {
        if want(&a, "concurrency") {
            for &n in &sz.conc {
                eprintln!("== {} concurrency {n}", kind.name());
                let fresh = Arc::new(setup::start(kind, &bins, &pki).await?);
                let v = step(
                    &format!("concurrency {n}"),
                    t * 2,
                    workloads::concurrency(&fresh, &dests, n, t, a.hold_idle),
                )
                .await;
                row.insert(format!("concurrency_{n}"), v);
                drop(fresh);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        results.insert(kind.name().into(), Value::Object(row));
    }
    let out = json!({
        "machine": machine(),
        "sizes": {"bulk_bytes": sz.bulk, "latency_iters": sz.lat, "fresh_iters": sz.fresh,
                  "concurrency": sz.conc, "churn_cycles": sz.churn, "isolation_bytes": sz.iso},
        "results": results,
    });
    std::fs::write(&a.json, serde_json::to_string_pretty(&out)?)?;
    print_table(&out, &kinds, &sz);
    eprintln!("JSON written to {}", a.json);
    Ok(())
}

/// Thousands of connections need thousands of descriptors (inherited by the
/// server and agent processes). Root may raise the hard limit; otherwise the
/// soft limit goes up to the hard one.
fn raise_fd_limit() {
    if rlimit::setrlimit(rlimit::Resource::NOFILE, 1 << 18, 1 << 18).is_err() {
        let _ = rlimit::increase_nofile_limit(1 << 18);
    }
}

/// One setup's throughput and latency, gathered over the rounds.
struct Speed {
    row: serde_json::Map<String, Value>,
    downs: Vec<Value>,
    ups: Vec<Value>,
    down_cpu: CpuPerGib,
    up_cpu: CpuPerGib,
    round_trips: Vec<Duration>,
    dials: Vec<Duration>,
    fresh: Vec<Duration>,
}

impl Speed {
    fn new(idle: Value) -> Self {
        let mut row = serde_json::Map::new();
        row.insert("idle".into(), idle);
        Speed {
            row,
            downs: Vec::new(),
            ups: Vec::new(),
            down_cpu: CpuPerGib::default(),
            up_cpu: CpuPerGib::default(),
            round_trips: Vec::new(),
            dials: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// One download and one upload.
    async fn transfers(
        &mut self,
        r: &setup::Running,
        d: &workloads::Dests,
        bytes: usize,
        t: Duration,
    ) {
        let down = workloads::download(r, d, bytes);
        let down = self.down_cpu.measure(r, "download", t, bytes, down).await;
        self.downs.push(down);
        let up = workloads::upload(r, d, bytes);
        let up = self.up_cpu.measure(r, "upload", t, bytes, up).await;
        self.ups.push(up);
    }

    /// Round trips on an established connection, then fresh connections.
    async fn latency(
        &mut self,
        r: &setup::Running,
        d: &workloads::Dests,
        round_trips: usize,
        fresh: usize,
        t: Duration,
    ) {
        let rtt = step("latency (established)", t, async {
            self.round_trips
                .extend(workloads::round_trips(r, d, round_trips.max(1)).await?);
            Ok(Value::Null)
        })
        .await;
        if rtt.get("error").is_some() {
            self.row.insert("latency_established".into(), rtt);
        }
        let f = step("latency (fresh)", t, async {
            let (dial, total) = workloads::fresh_connections(r, d, fresh.max(1)).await?;
            self.dials.extend(dial);
            self.fresh.extend(total);
            Ok(Value::Null)
        })
        .await;
        if f.get("error").is_some() {
            self.row.insert("latency_fresh".into(), f);
        }
    }

    /// The row so far: medians of the transfers, percentiles of all samples.
    /// A step that failed keeps its error in the row.
    fn finish(self) -> serde_json::Map<String, Value> {
        let mut row = self.row;
        if !self.downs.is_empty() {
            row.insert("download_mb_s".into(), median(&self.downs));
            row.insert("upload_mb_s".into(), median(&self.ups));
            row.insert("download_runs".into(), Value::Array(self.downs));
            row.insert("upload_runs".into(), Value::Array(self.ups));
            row.insert("download_cpu_ms_per_gib".into(), self.down_cpu.median());
            row.insert("upload_cpu_ms_per_gib".into(), self.up_cpu.median());
        }
        if !self.round_trips.is_empty() && !row.contains_key("latency_established") {
            row.insert(
                "latency_established".into(),
                workloads::percentiles(self.round_trips),
            );
        }
        if !self.fresh.is_empty() && !row.contains_key("latency_fresh") {
            let mut v = workloads::percentiles(self.fresh);
            v["dial"] = workloads::percentiles(self.dials);
            row.insert("latency_fresh".into(), v);
        }
        row
    }
}

/// CPU the server and the agent spend per GiB moved, over repeated
/// transfers: steadier than throughput on a shared machine, since it does
/// not count time spent waiting for the other processes.
#[derive(Default)]
struct CpuPerGib {
    server: Vec<f64>,
    agent: Vec<f64>,
}

impl CpuPerGib {
    /// Runs one transfer of `bytes` as a step; its MB/s, or its error. The
    /// CPU it cost is recorded only when it completed.
    async fn measure(
        &mut self,
        r: &setup::Running,
        name: &str,
        t: Duration,
        bytes: usize,
        transfer: impl std::future::Future<Output = anyhow::Result<f64>>,
    ) -> Value {
        let before = (setup::cpu_secs(r.server_pid), setup::cpu_secs(r.agent_pid));
        let v = step(name, t, async { transfer.await.map(|v| json!(v)) }).await;
        if v.is_number() {
            let gib = bytes as f64 / f64::from(1u32 << 30);
            let per_gib = |b: Option<f64>, pid| Some((setup::cpu_secs(pid)? - b?) * 1000.0 / gib);
            if let Some(ms) = per_gib(before.0, r.server_pid) {
                self.server.push(ms);
            }
            if let Some(ms) = per_gib(before.1, r.agent_pid) {
                self.agent.push(ms);
            }
        }
        v
    }

    fn median(self) -> Value {
        if self.server.is_empty() || self.agent.is_empty() {
            return Value::Null;
        }
        json!({
            "server": workloads::median(self.server),
            "agent": workloads::median(self.agent),
        })
    }
}

fn rss(pid: Option<u32>) -> Value {
    match setup::rss_kib(pid) {
        Some((r, p)) => json!({"rss_kib": r, "peak_kib": p}),
        None => Value::Null,
    }
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    json!({"cpus": cpus, "cpu": model})
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_f64()
}

fn print_table(out: &Value, kinds: &[SetupKind], sz: &Sizes) {
    let res = &out["results"];
    let direct = res.get("direct");
    // (label, JSON path, scale)
    let mut rows: Vec<(String, Vec<&str>, f64)> = vec![
        ("download MB/s".into(), vec!["download_mb_s"], 1.0),
        ("upload MB/s".into(), vec!["upload_mb_s"], 1.0),
        (
            "download CPU ms/GiB server".into(),
            vec!["download_cpu_ms_per_gib", "server"],
            1.0,
        ),
        (
            "download CPU ms/GiB agent".into(),
            vec!["download_cpu_ms_per_gib", "agent"],
            1.0,
        ),
        (
            "upload CPU ms/GiB server".into(),
            vec!["upload_cpu_ms_per_gib", "server"],
            1.0,
        ),
        (
            "upload CPU ms/GiB agent".into(),
            vec!["upload_cpu_ms_per_gib", "agent"],
            1.0,
        ),
        (
            "established p50 us".into(),
            vec!["latency_established", "p50_us"],
            1.0,
        ),
        (
            "established p99 us".into(),
            vec!["latency_established", "p99_us"],
            1.0,
        ),
        (
            "fresh conn p50 us".into(),
            vec!["latency_fresh", "p50_us"],
            1.0,
        ),
        (
            "fresh conn p99 us".into(),
            vec!["latency_fresh", "p99_us"],
            1.0,
        ),
    ];
    let conc_keys: Vec<String> = sz.conc.iter().map(|n| format!("concurrency_{n}")).collect();
    for k in &conc_keys {
        let k: &'static str = Box::leak(k.clone().into_boxed_str());
        rows.push((format!("{k} success"), vec![k, "success_rate"], 1.0));
        rows.push((format!("{k} opens/s"), vec![k, "opens_per_s"], 1.0));
        rows.push((format!("{k} burst MB/s"), vec![k, "aggregate_mb_s"], 1.0));
        rows.push((
            format!("{k} server peak MiB"),
            vec![k, "server", "peak_kib"],
            1.0 / 1024.0,
        ));
        rows.push((
            format!("{k} agent peak MiB"),
            vec![k, "agent", "peak_kib"],
            1.0 / 1024.0,
        ));
        rows.push((
            format!("{k} server B/conn"),
            vec![k, "server_bytes_per_conn"],
            1.0,
        ));
        rows.push((
            format!("{k} agent B/conn"),
            vec![k, "agent_bytes_per_conn"],
            1.0,
        ));
        rows.push((
            format!("{k} server MiB 3 s after close"),
            vec![k, "server_after_close", "rss_kib"],
            1.0 / 1024.0,
        ));
        rows.push((
            format!("{k} agent MiB 3 s after close"),
            vec![k, "agent_after_close", "rss_kib"],
            1.0 / 1024.0,
        ));
    }
    rows.extend([
        ("churn conn/s".into(), vec!["churn", "per_second"], 1.0),
        (
            "churn server RSS before MiB".into(),
            vec!["churn", "server_before", "rss_kib"],
            1.0 / 1024.0,
        ),
        (
            "churn server RSS after MiB".into(),
            vec!["churn", "server_after", "rss_kib"],
            1.0 / 1024.0,
        ),
        (
            "churn agent RSS before MiB".into(),
            vec!["churn", "agent_before", "rss_kib"],
            1.0 / 1024.0,
        ),
        (
            "churn agent RSS after MiB".into(),
            vec!["churn", "agent_after", "rss_kib"],
            1.0 / 1024.0,
        ),
        (
            "isolation % of alone".into(),
            vec!["isolation", "percent_of_alone"],
            1.0,
        ),
    ]);
    print!("{:<34}", "metric");
    for k in kinds {
        print!("{:>18}", k.name());
    }
    println!();
    for (label, path, scale) in rows {
        print!("{label:<34}");
        for k in kinds {
            let v = res
                .get(k.name())
                .and_then(|r| num(r, &path))
                .map(|x| x * scale);
            let cell = match v {
                Some(x) => {
                    let ratio = direct
                        .and_then(|d| num(d, &path))
                        .filter(|d| *d > 0.0 && k.imp != Impl::Direct)
                        .map(|d| x / (d * scale));
                    match ratio {
                        Some(r) => format!("{x:.1} ({r:.2}x)"),
                        None => format!("{x:.1}"),
                    }
                }
                None => match res.get(k.name()).and_then(|r| {
                    let mut cur = r;
                    for p in &path[..1] {
                        cur = cur.get(*p)?;
                    }
                    cur.get("error").map(|_| ())
                }) {
                    Some(()) => "error".into(),
                    None => "-".into(),
                },
            };
            print!("{cell:>18}");
        }
        println!();
    }
    println!(
        "(x) = ratio to direct TCP. Ours vs upstream: compare the ours-* and upstream-* columns."
    );
    print_floor_ratios(res, kinds);
}

/// Each tunnel's one-connection throughput as a fraction of the TLS floor's
/// in the same rounds.
fn print_floor_ratios(res: &Value, kinds: &[SetupKind]) {
    let Some(floor) = res.get("tls-floor") else {
        return;
    };
    for key in ["download_mb_s", "upload_mb_s"] {
        let Some(f) = num(floor, &[key]).filter(|f| *f > 0.0) else {
            continue;
        };
        let cells: Vec<String> = kinds
            .iter()
            .filter(|k| !matches!(k.imp, Impl::Direct | Impl::Floor))
            .filter_map(|k| {
                let x = num(res.get(k.name())?, &[key])?;
                Some(format!("{} {:.2}x", k.name(), x / f))
            })
            .collect();
        println!("{key} of the TLS floor: {}", cells.join(", "));
    }
}
