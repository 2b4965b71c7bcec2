//! What an operator relies on: bad configuration exits before binding,
//! SIGTERM drains and a second signal exits at once, a dead server is noticed
//! in seconds, dial timeouts and frontend hang-ups clean up.

use std::time::{Duration, Instant};

use tests::client::{self, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::process::{binary, Proc};
use tests::{dest, init_logs};

#[tokio::test]
async fn bad_flags_and_unreadable_certificates_exit_2_with_one_line() {
    let pki = Pki::new();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "proxy-server",
            vec![
                "--cluster-cert=/nonexistent/cert.pem".into(),
                format!("--cluster-key={}", pki.server.key.display()),
                format!("--uds-name={}", pki.path("x.sock")),
                "--agent-port=0".into(),
            ],
            "/nonexistent/cert.pem",
        ),
        (
            "proxy-server",
            vec![
                format!("--cluster-cert={}", pki.server.cert.display()),
                format!("--cluster-key={}", pki.agent.key.display()),
                format!("--uds-name={}", pki.path("y.sock")),
            ],
            "certificate",
        ),
        ("proxy-server", vec!["--mode=ftp".into()], "--mode=ftp"),
        (
            // The TCP frontend is mutual TLS or nothing.
            "proxy-server",
            vec![
                format!("--cluster-cert={}", pki.server.cert.display()),
                format!("--cluster-key={}", pki.server.key.display()),
                "--server-port=0".into(),
                format!("--server-cert={}", pki.server.cert.display()),
                format!("--server-key={}", pki.server.key.display()),
                "--agent-port=0".into(),
            ],
            "--server-ca-cert",
        ),
        (
            "proxy-agent",
            vec![
                format!("--ca-cert={}", pki.ca.display()),
                "--sync-interval=20s".into(),
            ],
            "--sync-interval",
        ),
        ("proxy-agent", vec![], "--ca-cert is required"),
    ];
    for (bin, args, needle) in cases {
        let out = std::process::Command::new(binary(bin))
            .args(&args)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {err}");
        assert!(err.contains(needle), "{bin} {args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    // The socket was never created: nothing was bound.
    assert!(!std::path::Path::new(&pki.path("x.sock")).exists());
}

#[tokio::test]
async fn sigterm_drains_and_a_second_signal_exits_at_once() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let mut agent = Proc::spawn(
        &[],
        &Agent::args(&pki, server.agent_addr, "term", &["--grace-period=1h"]),
    );
    server.wait_agents(1).await;
    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut open = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");

    agent.signal("TERM");
    agent.wait_log(&["draining"], Duration::from_secs(10)).await;
    // Still serving the open connection during the grace period.
    open.send(&b"after TERM"[..]).await.expect("send");
    assert_eq!(&open.recv().await.expect("echo")[..], b"after TERM");
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "must not exit while a connection is open"
    );

    agent.signal("TERM");
    let exited = tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
        .await
        .expect("second signal must end the agent long before its 1 h grace period")
        .expect("wait");
    assert!(exited.success(), "{exited:?}");
    assert!(open.read_to_end().await.is_empty());
}

#[tokio::test]
async fn agent_notices_a_frozen_server_within_seconds() {
    init_logs();
    let pki = Pki::new();
    let uds = pki.path("frozen.sock");
    let server = Proc::spawn(&[], &Server::args(&pki, "grpc", Listen::Uds, &uds, &[]));
    let agent_addr = server
        .log_field("proxy-server started", "agent")
        .await
        .parse()
        .unwrap();
    let agent = Agent::start(&pki, agent_addr, "watcher", &[]).await;
    let open = agent.metrics.open_server_connections.clone();
    tests::wait_for(Duration::from_secs(20), "agent connected", || {
        let n = open.get();
        n == 1
    })
    .await;
    // Freeze the server: its sockets stay open, nothing answers (a dead path
    // without FIN or RST). The reference would notice after its 1 h keepalive.
    server.signal("STOP");
    let frozen = Instant::now();
    tests::eventually(
        Duration::from_secs(20),
        "agent to drop the silent stream",
        || {
            let n = open.get();
            async move { (n == 0).then_some(()) }
        },
    )
    .await;
    eprintln!("dead server noticed after {:?}", frozen.elapsed());
    server.signal("CONT");
}

#[tokio::test]
async fn dial_timeout_on_the_agent_is_504_over_http_connect() {
    init_logs();
    let pki = Pki::new();
    let (server, _agent) =
        tests::inproc::pair(&pki, "http-connect", &[], &["--dial-timeout=1s"]).await;
    let (hang, _fill, _listener) = dest::hanging();
    let (status, body, reason) =
        client::refused(client::connect_uds(&server.uds(), &hang.to_string()).await);
    assert_eq!(status, 504, "{body}");
    assert_eq!(reason, client::DialReason::Timeout);
    assert!(body.contains("i/o timeout"), "{body}");
}

#[tokio::test]
async fn frontend_hang_up_closes_the_connection_on_the_agent() {
    init_logs();
    let pki = Pki::new();
    let (server, agent) = tests::inproc::pair(&pki, "grpc", &[], &[]).await;
    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let c = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
    assert_eq!(agent.metrics.open_endpoint_connections.get(), 1);
    // The frontend stream ends without CLOSE_REQ (kube-apiserver restarted).
    drop(c);
    drop(ch);
    let open = agent.metrics.open_endpoint_connections.clone();
    tests::wait_for(Duration::from_secs(10), "agent to close the orphan", || {
        let n = open.get();
        n == 0
    })
    .await;
    assert_eq!(server.metrics.established_connections.get(), 0);
}

#[tokio::test]
async fn agent_requires_server_id_and_server_count_headers() {
    init_logs();
    let pki = Pki::new();
    for (headers, missing) in [
        (vec![("servercount", "1")], "serverid"),
        (vec![("serverid", "s1")], "servercount"),
        (
            vec![("serverid", "s1"), ("servercount", "zero")],
            "servercount",
        ),
    ] {
        let addr = client::fake_server(&pki, headers).await;
        let agent = Agent::start(&pki, addr, "strict", &[]).await;
        let failures = agent.metrics.server_connection_failures.clone();
        tests::eventually(
            Duration::from_secs(10),
            "refusal of a server without headers",
            || {
                let n = failures.with_label_values(&["bad_headers"]).get();
                async move { (n >= 1).then_some(()) }
            },
        )
        .await;
        assert_eq!(
            agent.metrics.open_server_connections.get(),
            0,
            "missing {missing}"
        );
        agent.stop().await;
    }
    // With both headers the same fake server is accepted.
    let addr = client::fake_server(&pki, vec![("serverid", "s1"), ("servercount", "1")]).await;
    let agent = Agent::start(&pki, addr, "strict", &[]).await;
    let open = agent.metrics.open_server_connections.clone();
    tests::eventually(
        Duration::from_secs(10),
        "agent to accept a proper server",
        || {
            let n = open.get();
            async move { (n == 1).then_some(()) }
        },
    )
    .await;
}

/// A log collector that went away (stderr is a pipe nobody reads any more)
/// must not keep a component from shutting down: every log line then fails
/// to write, including the one announcing the signal.
#[tokio::test]
async fn sigterm_still_stops_both_binaries_when_stderr_is_a_broken_pipe() {
    let pki = Pki::new();
    let uds = pki.path("broken-stderr.sock");
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let runs = [
        Server::args(&pki, "grpc", Listen::Uds, &uds, &[]),
        Agent::args(&pki, closed_port, "broken-stderr", &[]),
    ];
    for args in runs {
        let mut child = tokio::process::Command::new(binary(&args[0]))
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        // Close the read end: from now on every write to stderr fails (EPIPE).
        drop(child.stderr.take());
        if args[0] == "proxy-server" {
            let path = std::path::PathBuf::from(&uds);
            tests::eventually(Duration::from_secs(20), "frontend socket", || {
                let up = path.exists().then_some(());
                async move { up }
            })
            .await;
        } else {
            // Let it fail (and fail to log) a few connection attempts.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let pid = child.id().expect("pid").to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let exited = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} ignored SIGTERM with a broken stderr", args[0]))
            .expect("wait");
        assert!(exited.success(), "{}: {exited:?}", args[0]);
    }
}

/// A log collector that stalls (stderr is a pipe nobody reads, still open)
/// must not stall the server: once the pipe is full, log lines are dropped
/// and counted instead of holding its workers in `write(2)`. The server logs
/// everything at trace level (`RUST_LOG=trace`, HTTP/2 frames included), so
/// 300 dials write far more than the pipe and the buffer hold.
#[tokio::test]
async fn a_stalled_log_pipe_drops_lines_instead_of_stalling_the_server() {
    use std::io::BufRead;
    init_logs();
    let pki = Pki::new();
    let uds = pki.path("stalled-stderr.sock");
    let args = Server::args(&pki, "grpc", Listen::Uds, &uds, &["--v=5".into()]);
    let (reader, writer) = std::io::pipe().expect("pipe");
    let mut cmd = tokio::process::Command::new(binary(&args[0]));
    cmd.args(&args[1..])
        .arg("--log-format=json")
        .env("RUST_LOG", "trace")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(writer))
        .kill_on_drop(true);
    let _server = cmd.spawn().expect("spawn");
    drop(cmd);
    // Read up to the line with the ports, then never again (the pipe stays
    // open, so writes block rather than fail).
    let mut reader = std::io::BufReader::new(reader);
    let started = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        while reader.read_line(&mut line).expect("read") > 0 {
            if line.contains("proxy-server started") {
                let v: serde_json::Value = serde_json::from_str(&line).expect("json");
                return (v, reader);
            }
            line.clear();
        }
        panic!("server exited before it started");
    });
    let (started, _unread) = tokio::time::timeout(Duration::from_secs(20), started)
        .await
        .expect("server started")
        .expect("reader");
    let field = |f: &str| started["fields"][f].as_str().expect(f).to_string();
    let agent_addr = field("agent").parse().expect("agent address");
    let health = field("health");
    let _agent = Agent::start(&pki, agent_addr, "stalled-log", &[]).await;
    let echo = dest::echo().await.to_string();
    let ch = client::grpc_uds(std::path::Path::new(&uds)).await;
    let first = tests::eventually(Duration::from_secs(20), "a tunnel", || async {
        GrpcConn::dial(&ch, &echo).await.ok()
    })
    .await;
    drop(first);
    for i in 0..300 {
        let round = async {
            let mut c = GrpcConn::dial(&ch, &echo).await.expect("dial");
            let msg = format!("dial {i}");
            c.send(msg.clone().into_bytes()).await.expect("send");
            assert_eq!(&c.recv().await.expect("echo")[..], msg.as_bytes());
        };
        tokio::time::timeout(Duration::from_secs(10), round)
            .await
            .unwrap_or_else(|_| panic!("dial {i} stalled: the server waits on its log pipe"));
    }
    let text = tests::cluster::http_get(&health, "/metrics")
        .await
        .expect("metrics");
    let dropped = tests::cluster::metric_sum(&text, "log_lines_dropped_total", &[]);
    assert!(
        dropped > 0.0,
        "no log line dropped: the pipe never filled?\n{text}"
    );
    eprintln!("{dropped} log lines dropped while stderr was not read");
}

#[tokio::test]
async fn text_logs_to_a_pipe_carry_no_colour_codes_and_agents_retry_apart() {
    // Two agents with no server to reach: both log their retries, as text,
    // into a pipe (as into a log collector).
    let pki = Pki::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut logs = Vec::new();
    for id in ["a", "b"] {
        let mut args = Agent::args(
            &pki,
            addr,
            id,
            &["--sync-interval=1s", "--sync-interval-cap=10s"],
        );
        let bin = binary(&args.remove(0));
        let mut child = tokio::process::Command::new(bin)
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        logs.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            // Three retries are logged within about 1 + 2 + 4 s.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
            while String::from_utf8_lossy(&out).matches("retry_in").count() < 3 {
                match tokio::time::timeout_at(deadline, err.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            drop(child);
            String::from_utf8_lossy(&out).into_owned()
        }));
    }
    let mut delays = Vec::new();
    for l in logs {
        let text = l.await.unwrap();
        assert!(
            !text.contains('\u{1b}'),
            "terminal escape codes in a piped log:\n{text}"
        );
        let d: Vec<String> = text
            .lines()
            .filter_map(|l| l.split("retry_in=").nth(1))
            .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
            .collect();
        assert!(d.len() >= 2, "retries not logged:\n{text}");
        delays.push(d);
    }
    // Jitter is seeded per process: a fleet restarted together does not
    // retry in lockstep.
    assert_ne!(
        delays[0], delays[1],
        "two agents retried with identical delays"
    );
}

/// The frontend socket is made `0600` unless `--uds-mode` says otherwise, and
/// that is what another user meets: refused at `0600`, served at `0666`.
#[tokio::test]
async fn frontend_socket_permissions_keep_other_users_out() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    // A directory anyone may enter, so only the socket's own mode decides.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let start = |name: &str, extra: &[String]| {
        let uds = dir.path().join(name).display().to_string();
        Server::start_args(Server::args(&pki, "http-connect", Listen::Uds, &uds, extra))
    };
    let closed = start("default.sock", &[]).await;
    let open = start("open.sock", &["--uds-mode=0666".to_string()]).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&closed.uds()), 0o600);
    assert_eq!(mode(&open.uds()), 0o666);
    // No temporary name is left beside them.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_default();
    let tools = ["setpriv", "curl"].iter().all(|t| {
        std::process::Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if uid != "0" || !tools {
        // CI runs as root with both tools (KNP_REQUIRE_NETNS=1 says so):
        // there the other-user half must run.
        assert_ne!(
            std::env::var("KNP_REQUIRE_NETNS").as_deref(),
            Ok("1"),
            "the other-user half needs root, setpriv and curl (uid {uid}, tools {tools})"
        );
        eprintln!(
            "SKIPPED the other-user half: needs root, setpriv and curl (uid {uid}, tools {tools})"
        );
        return;
    }
    // As user nobody: a plain GET, which the CONNECT frontend answers 405.
    let as_nobody = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                ])
                .args(["-w", "%{http_code}", "--max-time", "5", "--unix-socket"])
                .arg(path)
                .arg("http://localhost/")
                .output()
                .unwrap()
        })
    };
    let refused = as_nobody(closed.uds()).await.unwrap();
    assert_eq!(
        refused.status.code(),
        Some(7),
        "curl exit 7 (could not connect) at 0600: {refused:?}"
    );
    let served = as_nobody(open.uds()).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&served.stdout), "405", "{served:?}");
    closed.stop().await;
    open.stop().await;
}
