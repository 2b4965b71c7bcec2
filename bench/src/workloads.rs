//! Destinations and the measured workloads. Everything runs on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::setup::{rss_kib, Running};

/// Destination servers.
#[derive(Clone, Copy)]
pub struct Dests {
    /// `SRC n\n` -> n bytes, then close.
    pub source: SocketAddr,
    /// `SNK n\n` + n bytes -> `ok\n`.
    pub sink: SocketAddr,
    /// Echo until EOF.
    pub echo: SocketAddr,
}

/// Starts the destinations in this process.
pub async fn dests() -> anyhow::Result<Dests> {
    let source = TcpListener::bind("127.0.0.1:0").await?;
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let echo = TcpListener::bind("127.0.0.1:0").await?;
    let d = Dests {
        source: source.local_addr()?,
        sink: sink.local_addr()?,
        echo: echo.local_addr()?,
    };
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = source.accept().await else {
                // EMFILE under 10,000 connections: wait, never stop serving.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (r, mut w) = s.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let mut left: usize = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let buf = vec![0x5au8; 256 * 1024];
                while left > 0 {
                    let k = left.min(buf.len());
                    if w.write_all(&buf[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
                let _ = w.shutdown().await;
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = sink.accept().await else {
                // EMFILE under 10,000 connections: wait, never stop serving.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (r, mut w) = s.into_split();
                let mut r = BufReader::with_capacity(256 * 1024, r);
                let mut line = String::new();
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let n: u64 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let got = tokio::io::copy(&mut (&mut r).take(n), &mut tokio::io::sink()).await;
                if matches!(got, Ok(g) if g == n) {
                    let _ = w.write_all(b"ok\n").await;
                }
                let _ = w.shutdown().await;
            });
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = echo.accept().await else {
                // EMFILE under 10,000 connections: wait, never stop serving.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(d)
}

/// Starts the destinations in a child process (`bench dest`).
pub async fn spawn_dests() -> anyhow::Result<(Dests, tokio::process::Child)> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("dest")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).await?;
    let a: Vec<SocketAddr> = line
        .split_whitespace()
        .map(|x| x.parse())
        .collect::<Result<_, _>>()
        .context("destination addresses")?;
    anyhow::ensure!(a.len() == 3, "bad destination line {line:?}");
    Ok((
        Dests {
            source: a[0],
            sink: a[1],
            echo: a[2],
        },
        child,
    ))
}

const MB: f64 = 1_000_000.0;

/// One connection downloads `n` bytes; MB/s.
pub async fn download(r: &Running, d: &Dests, n: usize) -> anyhow::Result<f64> {
    let mut c = r.connect(d.source).await?;
    let start = Instant::now();
    c.write_all(format!("SRC {n}\n").as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    while got < n {
        let k = c.read(&mut buf).await?;
        anyhow::ensure!(k > 0, "EOF after {got} of {n} bytes");
        got += k;
    }
    let secs = start.elapsed().as_secs_f64();
    c.close().await;
    Ok(n as f64 / MB / secs)
}

/// One connection uploads `n` bytes; MB/s.
pub async fn upload(r: &Running, d: &Dests, n: usize) -> anyhow::Result<f64> {
    let mut c = r.connect(d.sink).await?;
    let start = Instant::now();
    c.write_all(format!("SNK {n}\n").as_bytes()).await?;
    let chunk = vec![0xa5u8; 32 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        c.write_all(&chunk[..k]).await?;
        left -= k;
    }
    let mut ok = [0u8; 3];
    c.read_exact(&mut ok).await?;
    let secs = start.elapsed().as_secs_f64();
    c.close().await;
    Ok(n as f64 / MB / secs)
}

/// The median (the upper one for an even count); `v` must not be empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// p50 and p99 of the samples, in microseconds; `v` must not be empty.
pub fn percentiles(mut v: Vec<Duration>) -> Value {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6;
    json!({"p50_us": p(0.5), "p99_us": p(0.99), "n": v.len()})
}

/// Round trips of 64 bytes on one established connection: one sample each.
pub async fn round_trips(r: &Running, d: &Dests, iters: usize) -> anyhow::Result<Vec<Duration>> {
    let mut c = r.connect(d.echo).await?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        c.write_all(&msg).await?;
        c.read_exact(&mut back).await?;
        v.push(t.elapsed());
    }
    c.close().await;
    Ok(v)
}

/// Fresh connections, as `kubectl logs` opens them: for each, the dial alone
/// (tunnel established) and the dial plus the first response byte.
pub async fn fresh_connections(
    r: &Running,
    d: &Dests,
    iters: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut total = Vec::with_capacity(iters);
    let mut dial = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let mut c = r.connect(d.echo).await?;
        dial.push(t.elapsed());
        c.write_all(b"x").await?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await?;
        total.push(t.elapsed());
        c.close().await;
    }
    Ok((dial, total))
}

fn kib(pid: Option<u32>) -> Value {
    match rss_kib(pid) {
        Some((rss, hwm)) => json!({"rss_kib": rss, "peak_kib": hwm}),
        None => Value::Null,
    }
}

/// `n` connections open at once. Phase one opens them all (each echoes 1 KiB)
/// and measures memory with every connection open and idle; phase two has
/// every connection echo 16 KiB at the same time, for the aggregate throughput.
pub async fn concurrency(
    r: &Arc<Running>,
    d: &Dests,
    n: usize,
    timeout: Duration,
    hold_idle: Option<Duration>,
) -> anyhow::Result<Value> {
    const BURST: usize = 16 * 1024;
    let before_server = rss_kib(r.server_pid).map(|x| x.0);
    let before_agent = rss_kib(r.agent_pid).map(|x| x.0);
    let dialing = Arc::new(Semaphore::new(256));
    let all_open = Arc::new(tokio::sync::Barrier::new(n + 1));
    let all_moved = Arc::new(tokio::sync::Barrier::new(n + 1));
    let moved = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (go, gone) = tokio::sync::watch::channel(false);
    let (release, released) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let r = r.clone();
        let dialing = dialing.clone();
        let (all_open, all_moved, moved) = (all_open.clone(), all_moved.clone(), moved.clone());
        let (mut gone, mut released) = (gone.clone(), released.clone());
        let echo = d.echo;
        tasks.push(tokio::spawn(async move {
            let conn = {
                let _p = dialing.acquire().await;
                r.connect(echo).await
            };
            let mut conn = async {
                let mut c = conn?;
                c.write_all(&[1u8; 1024]).await?;
                let mut back = vec![0u8; 1024];
                c.read_exact(&mut back).await?;
                Ok::<_, anyhow::Error>(c)
            }
            .await;
            all_open.wait().await;
            let _ = gone.wait_for(|g| *g).await;
            if let Ok(c) = conn.as_mut() {
                let burst = async {
                    c.write_all(&vec![2u8; BURST]).await?;
                    let mut back = vec![0u8; BURST];
                    c.read_exact(&mut back).await?;
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                if burst.is_ok() {
                    moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            all_moved.wait().await;
            // Hold the connection until every one is measured.
            let _ = released.wait_for(|r| *r).await;
            match conn {
                Ok(c) => {
                    c.close().await;
                    true
                }
                Err(_) => false,
            }
        }));
    }
    let opened = tokio::time::timeout(timeout, all_open.wait()).await.is_ok();
    let open_phase = start.elapsed().as_secs_f64();
    // Memory with every connection open and idle.
    let server = kib(r.server_pid);
    let agent = kib(r.agent_pid);
    if let Some(h) = hold_idle {
        eprintln!(
            "  holding {n} idle connections for {h:?} (server pid {:?}, agent pid {:?})",
            r.server_pid, r.agent_pid
        );
        tokio::time::sleep(h).await;
    }
    let t0 = Instant::now();
    let _ = go.send(true);
    let burst_done = opened
        && tokio::time::timeout(timeout, all_moved.wait())
            .await
            .is_ok();
    let data_phase = t0.elapsed().as_secs_f64();
    let _ = release.send(true);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut ok = 0;
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout_at(deadline, t).await {
            Ok(Ok(true)) => ok += 1,
            Ok(_) => {}
            Err(_) => abort.abort(),
        }
    }
    let moved = moved.load(std::sync::atomic::Ordering::Relaxed);
    // Does the memory come back once the connections are gone?
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server_after = kib(r.server_pid);
    let agent_after = kib(r.agent_pid);
    let per_conn = |now: &Value, before: Option<u64>| -> Value {
        match (now.get("rss_kib").and_then(Value::as_u64), before) {
            (Some(a), Some(b)) if n > 0 => json!(((a.saturating_sub(b)) * 1024) / n as u64),
            _ => Value::Null,
        }
    };
    Ok(json!({
        "connections": n,
        "all_open": opened,
        "success_rate": ok.min(moved) as f64 / n as f64,
        "open_phase_s": open_phase,
        "opens_per_s": n as f64 / open_phase,
        "data_phase_complete": burst_done,
        "aggregate_mb_s": (moved * 2 * BURST) as f64 / MB / data_phase,
        "server": server,
        "agent": agent,
        "server_bytes_per_conn": per_conn(&server, before_server),
        "agent_bytes_per_conn": per_conn(&agent, before_agent),
        "server_after_close": server_after,
        "agent_after_close": agent_after,
    }))
}

/// Open/close cycles with `workers` in parallel; rate and memory before/after.
pub async fn churn(
    r: &Arc<Running>,
    d: &Dests,
    cycles: usize,
    workers: usize,
) -> anyhow::Result<Value> {
    let before = (kib(r.server_pid), kib(r.agent_pid));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (r, next, failures, echo) = (r.clone(), next.clone(), failures.clone(), d.echo);
        tasks.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            while next.fetch_add(1, Relaxed) < cycles {
                let res = async {
                    let mut c = r.connect(echo).await?;
                    c.write_all(b"x").await?;
                    let mut b = [0u8; 1];
                    c.read_exact(&mut b).await?;
                    c.close().await;
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                if res.is_err() {
                    failures.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.context("churn worker")?;
    }
    let secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = (kib(r.server_pid), kib(r.agent_pid));
    Ok(json!({
        "cycles": cycles,
        "per_second": cycles as f64 / secs,
        "failures": failures.load(std::sync::atomic::Ordering::Relaxed),
        "server_before": before.0, "server_after": after.0,
        "agent_before": before.1, "agent_after": after.1,
    }))
}

/// Throughput of one download while another connection on the same agent
/// has stopped reading, against the same download alone. The two are
/// measured in pairs, alone then with a freshly stalled neighbour, `runs`
/// times, and the result is the median of the pairs' ratios: the machine's
/// speed drifts over seconds, and a pair sees the same drift on both sides.
pub async fn isolation(
    r: &Running,
    d: &Dests,
    n: usize,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let (mut alone, mut with, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let a = download(r, d, n).await?;
        let mut stalled = r.connect(d.source).await?;
        stalled
            .write_all(format!("SRC {}\n", 64usize << 30).as_bytes())
            .await?;
        let mut b = [0u8; 1024];
        stalled.read(&mut b).await?;
        // Let the stalled connection fill every buffer on its way.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let w = match tokio::time::timeout(timeout, download(r, d, n)).await {
            Ok(Ok(mbs)) => mbs,
            Ok(Err(e)) => {
                return Ok(
                    json!({"alone_mb_s": a, "error": e.to_string(), "percent_of_alone": 0.0}),
                )
            }
            Err(_) => {
                return Ok(json!({"alone_mb_s": a,
                    "error": format!("stalled: no completion within {timeout:?}"),
                    "percent_of_alone": 0.0}))
            }
        };
        drop(stalled);
        tokio::time::sleep(Duration::from_millis(200)).await;
        alone.push(a);
        with.push(w);
        ratios.push(100.0 * w / a);
    }
    Ok(json!({
        "alone_mb_s": median(alone),
        "with_stalled_mb_s": median(with),
        "percent_of_alone": median(ratios),
    }))
}
