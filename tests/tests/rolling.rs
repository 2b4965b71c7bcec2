//! Rolling restarts under steady load, as a Deployment or DaemonSet update
//! does them: fresh dials every 10 ms and long downloads run throughout.
//!
//! - Three servers behind one address for agents and one for frontends (a
//!   balancer standing in for a Service): each server in turn leaves the
//!   rotation (its pod is terminating), gets SIGTERM, drains, exits and comes
//!   back with the same flags, and rejoins the rotation once its agent has
//!   connected (ready). Not one fresh dial fails, and the downloads that were
//!   on a draining server finish within its grace period.
//! - Two agents for the same nodes: each in turn gets SIGTERM, drains (new
//!   dials go to the other one), finishes its downloads and exits, and comes
//!   back. Not one fresh dial or download fails.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tests::balancer::Balancer;
use tests::client;
use tests::cluster::{http_get, metric_sum};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::process::Proc;
use tests::{dest, init_logs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The two tests take turns: each alone keeps both cores busy (three or two
/// processes under load plus the load itself), and run together on two cores
/// their dials waited past any fair limit.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What the load saw.
#[derive(Default)]
struct Tally {
    dials: AtomicU64,
    downloads: AtomicU64,
    /// Dials and downloads started and not yet done.
    in_flight: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// Fresh dials every 10 ms (an echo each) and a 16 MiB download started
/// every 500 ms and read slowly (about 2 s each), all through HTTP CONNECT on
/// `front`, until `stop`.
fn load(
    front: SocketAddr,
    pki: Arc<Pki>,
    echo: SocketAddr,
    bulk: SocketAddr,
    stop: Arc<AtomicBool>,
) -> (Arc<Tally>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    {
        let (tally, pki, stop) = (tally.clone(), pki.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let (tally, pki) = (tally.clone(), pki.clone());
                tally.in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let msg = format!("dial {i}");
                    let started = tokio::time::Instant::now();
                    let r = tokio::time::timeout(Duration::from_secs(10), async {
                        // Each stage within 8 s, so a stuck dial says where.
                        let mut t = client::Frontend::new(
                            client::Mode::HttpConnect,
                            client::tls_transport(front, &pki),
                        )
                        .timeout(Duration::from_secs(8))
                        .dial(&echo.to_string())
                        .await
                        .map_err(|e| e.to_string())?;
                        t.write_all(msg.as_bytes())
                            .await
                            .map_err(|e| e.to_string())?;
                        let mut got = vec![0u8; msg.len()];
                        t.read_exact(&mut got)
                            .await
                            .map_err(|e| format!("echo after {:?}: {e}", started.elapsed()))?;
                        (got == msg.as_bytes())
                            .then_some(())
                            .ok_or_else(|| "wrong echo".to_string())
                    })
                    .await;
                    match r {
                        Ok(Ok(())) => {
                            tally.dials.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => tally.fail(format!("{msg}: {e}")),
                        Err(_) => tally.fail(format!("{msg}: timed out (no echo within 10 s)")),
                    }
                    tally.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        }));
    }
    {
        let (tally, stop) = (tally.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (tally, pki) = (tally.clone(), pki.clone());
                tally.in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    const N: usize = 16 << 20;
                    let r = tokio::time::timeout(Duration::from_secs(30), async {
                        let mut t = client::connect_tls(front, &pki, &bulk.to_string())
                            .await
                            .map_err(|e| e.to_string())?;
                        t.write_all(format!("GET {N} {i}\n").as_bytes())
                            .await
                            .map_err(|e| e.to_string())?;
                        let mut buf = vec![0u8; 1 << 20];
                        let (mut want, mut got) = (tests::Pattern::new(i), 0);
                        loop {
                            let n = t.read(&mut buf).await.map_err(|e| e.to_string())?;
                            if n == 0 {
                                break;
                            }
                            if !want.matches(&buf[..n]) {
                                return Err(format!("corrupt after {got} bytes"));
                            }
                            got += n;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        (got == N)
                            .then_some(())
                            .ok_or_else(|| format!("{got} of {N} bytes"))
                    })
                    .await;
                    match r {
                        Ok(Ok(())) => {
                            tally.downloads.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => tally.fail(format!("download {i}: {e}")),
                        Err(_) => tally.fail(format!("download {i}: timed out")),
                    }
                    tally.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    (tally, tasks)
}

/// Ends the load and waits for what it started (downloads take a few s).
async fn finish(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>, tally: &Tally) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    tests::wait_for(
        Duration::from_secs(40),
        "the last dials and downloads",
        || tally.in_flight.load(Ordering::Relaxed) == 0,
    )
    .await;
    let failures = tally.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// One of three servers: fixed ports, so it comes back where it was.
struct Member {
    args: Vec<String>,
    proc: Proc,
    agent_port: SocketAddr,
    frontend: SocketAddr,
    health: SocketAddr,
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Member {
    fn start(pki: &Pki, i: usize) -> Member {
        let (agent_port, frontend, health) = (free_addr(), free_addr(), free_addr());
        let mut args = Server::args(pki, "http-connect", Listen::Tls, "", &[]);
        args.retain(|a| {
            !a.starts_with("--agent-port")
                && !a.starts_with("--server-port")
                && !a.starts_with("--health-port")
        });
        args.extend([
            format!("--agent-port={}", agent_port.port()),
            format!("--server-port={}", frontend.port()),
            format!("--health-port={}", health.port()),
            format!("--server-id=server-{i}"),
            "--server-count=3".into(),
            "--grace-period=20s".into(),
        ]);
        Member {
            proc: Proc::spawn(&[], &args),
            args,
            agent_port,
            frontend,
            health,
        }
    }

    async fn agents(&self) -> f64 {
        let text = http_get(&self.health.to_string(), "/metrics")
            .await
            .unwrap_or_default();
        metric_sum(
            &text,
            "konnectivity_network_proxy_server_ready_backend_connections",
            &[],
        )
    }

    async fn wait_agents(&self, n: f64) {
        tests::eventually(Duration::from_secs(30), "agents on a server", || async {
            (self.agents().await == n).then_some(())
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_three_servers_fails_no_dial_and_lets_downloads_finish() {
    let _turn = ONE_AT_A_TIME.lock().await;
    init_logs();
    let pki = Arc::new(Pki::new());
    let mut members: Vec<Member> = (0..3).map(|i| Member::start(&pki, i)).collect();
    for m in &members {
        m.proc
            .wait_log(&["proxy-server started"], Duration::from_secs(20))
            .await;
    }
    let agents_lb =
        Balancer::start(&members.iter().map(|m| m.agent_port).collect::<Vec<_>>()).await;
    let front_lb = Balancer::start(&members.iter().map(|m| m.frontend).collect::<Vec<_>>()).await;
    // One agent for the node, finding all three servers through one address.
    let _agent = Agent::start(&pki, agents_lb.addr, "node-1", &[]).await;
    for m in &members {
        m.wait_agents(1.0).await;
    }
    let (echo, bulk) = (dest::echo().await, dest::bulk("bulk").await);
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = load(front_lb.addr, pki.clone(), echo, bulk, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    for (i, member) in members.iter_mut().enumerate() {
        // Terminating: out of the Service's endpoints, then SIGTERM.
        front_lb.set(i, false);
        agents_lb.set(i, false);
        tokio::time::sleep(Duration::from_millis(500)).await;
        member.proc.signal("TERM");
        let exited = tokio::time::timeout(Duration::from_secs(30), member.proc.child.wait())
            .await
            .expect("a draining server exits within its grace period")
            .unwrap();
        assert!(exited.success(), "server {i}: {exited:?}");
        let drained = member.proc.logs().join("\n");
        assert!(
            !drained.contains("grace period over"),
            "server {i} cut off open connections"
        );
        // The new pod: same flags, ready once its agent is back.
        member.proc = Proc::spawn(&[], &member.args);
        member
            .proc
            .wait_log(&["proxy-server started"], Duration::from_secs(20))
            .await;
        agents_lb.set(i, true);
        member.wait_agents(1.0).await;
        front_lb.set(i, true);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    finish(&stop, tasks, &tally).await;
    let (dials, downloads) = (
        tally.dials.load(Ordering::Relaxed),
        tally.downloads.load(Ordering::Relaxed),
    );
    eprintln!("rolling restart of 3 servers: {dials} dials, {downloads} downloads, none failed");
    assert!(
        dials > 500 && downloads > 10,
        "{dials} dials, {downloads} downloads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_two_agents_fails_no_dial_and_lets_downloads_finish() {
    let _turn = ONE_AT_A_TIME.lock().await;
    init_logs();
    let pki = Arc::new(Pki::new());
    let server = Server::start(&pki, "http-connect", Listen::Tls, &[]).await;
    let agent_args = |id: &str| Agent::args(&pki, server.agent_addr, id, &["--grace-period=20s"]);
    let mut agents = [
        Proc::spawn(&[], &agent_args("node-a")),
        Proc::spawn(&[], &agent_args("node-b")),
    ];
    server.wait_agents(2).await;
    let (echo, bulk) = (dest::echo().await, dest::bulk("bulk").await);
    let stop = Arc::new(AtomicBool::new(false));
    let (tally, tasks) = load(server.tcp(), pki.clone(), echo, bulk, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    for (i, id) in ["node-a", "node-b"].into_iter().enumerate() {
        agents[i].signal("TERM");
        let exited = tokio::time::timeout(Duration::from_secs(30), agents[i].child.wait())
            .await
            .expect("a draining agent exits once its downloads finish")
            .unwrap();
        assert!(exited.success(), "{id}: {exited:?}");
        agents[i] = Proc::spawn(&[], &agent_args(id));
        server.wait_agents(2).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    finish(&stop, tasks, &tally).await;
    let (dials, downloads) = (
        tally.dials.load(Ordering::Relaxed),
        tally.downloads.load(Ordering::Relaxed),
    );
    eprintln!("rolling restart of 2 agents: {dials} dials, {downloads} downloads, none failed");
    assert!(
        dials > 300 && downloads > 5,
        "{dials} dials, {downloads} downloads"
    );
}
