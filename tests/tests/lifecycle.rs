//! Agents and servers going away: killed agents, pending dials on them,
//! server restarts, and draining.

use std::time::{Duration, Instant};

use konnectivity_proto::{packet, Message};
use tests::client::{self, FakeAgent, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::process::Proc;
use tests::{dest, init_logs};

const MIB: usize = 1 << 20;

#[tokio::test]
async fn killed_agent_closes_its_connections_at_once() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let mut agent = Proc::spawn(&[], &Agent::args(&pki, server.agent_addr, "doomed", &[]));
    server.wait_agents(1).await;
    let dst = dest::bulk("bulk").await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut c = GrpcConn::dial(&ch, &dst.to_string()).await.expect("dial");
    // A transfer far larger than anything buffered on the way.
    c.send(format!("GET {} 1\n", 1024 * MIB))
        .await
        .expect("send");
    let mut got = 0;
    while got < 4 * MIB {
        got += c.recv().await.expect("data").len();
    }
    agent.kill().await;
    let killed = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(1), c.read_to_end())
        .await
        .expect("the client must see the close within a second of the kill");
    assert!(
        got + rest.len() < 1024 * MIB,
        "transfer cannot have completed"
    );
    assert!(c.closed, "close arrives as CLOSE_RSP");
    eprintln!("close seen {:?} after the kill", killed.elapsed());
    assert_eq!(server.metrics.established_connections.get(), 0);
    server.wait_agents(0).await;
}

#[tokio::test]
async fn pending_dial_fails_at_once_when_its_agent_goes_away() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &["--dial-timeout=60s"]).await;
    let mut fake = FakeAgent::connect(server.agent_addr, &pki, "silent")
        .await
        .expect("fake agent");
    assert!(fake.headers.get("serverid").is_some());
    assert_eq!(fake.headers.get("servercount").unwrap(), "1");
    server.wait_agents(1).await;
    let ch = client::grpc_uds(&server.uds()).await;
    let dial = tokio::spawn(async move {
        let started = Instant::now();
        let r = GrpcConn::dial(&ch, "10.0.0.5:10250").await;
        (r.err(), started.elapsed())
    });
    // The agent receives the dial and never answers it.
    match fake.recv_significant().await {
        Some(Message::DialRequest { address, .. }) => assert_eq!(address, "10.0.0.5:10250"),
        other => panic!("expected DIAL_REQ, got {other:?}"),
    }
    assert_eq!(server.metrics.pending_dials.get(), 1);
    let gone = Instant::now();
    drop(fake);
    let (err, _) = tokio::time::timeout(Duration::from_secs(5), dial)
        .await
        .expect("dial must fail long before its 60 s timeout")
        .unwrap();
    let err = err.expect("dial fails");
    assert!(err.to_string().contains("went away"), "{err}");
    assert_eq!(err.reason(), Some(tests::client::DialReason::AgentLost));
    eprintln!(
        "pending dial failed {:?} after the agent left",
        gone.elapsed()
    );
    assert_eq!(server.metrics.pending_dials.get(), 0);
}

#[tokio::test]
async fn agent_reconnects_after_a_server_restart() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let port = server.agent_addr.port();
    let agent = Agent::start(&pki, server.agent_addr, "survivor", &[]).await;
    server.wait_agents(1).await;
    server.stop().await;
    tests::wait_for(Duration::from_secs(10), "agent to notice", || {
        let v = agent.metrics.open_server_connections.get();
        v == 0
    })
    .await;

    let restarted = Server::start(
        &pki,
        "grpc",
        Listen::Uds,
        &[&format!("--agent-port={port}")],
    )
    .await;
    restarted.wait_agents(1).await;
    let dst = dest::http("after restart").await;
    let ch = client::grpc_uds(&restarted.uds()).await;
    let mut c = GrpcConn::dial(&ch, &dst.to_string())
        .await
        .expect("dial after restart");
    c.send(&b"GET / HTTP/1.1\r\n\r\n"[..]).await.expect("send");
    let body = String::from_utf8(c.read_to_end().await).unwrap();
    assert!(body.ends_with("after restart"), "{body}");
}

#[tokio::test]
async fn draining_agent_gets_no_new_dials_but_finishes_open_ones() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let a = Agent::start(&pki, server.agent_addr, "leaving", &["--grace-period=30s"]).await;
    server.wait_agents(1).await;
    let echo = dest::echo().await;
    let ch = client::grpc_uds(&server.uds()).await;
    let mut open = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");

    let b = Agent::start(&pki, server.agent_addr, "staying", &[]).await;
    server.wait_agents(2).await;
    a.shutdown.graceful.cancel();
    // Wait until the server has seen DRAIN: new dials then all go to b.
    let before_b = b.metrics.dial_duration.get_sample_count();
    let a_hist = a.metrics.dial_duration.clone();
    tests::eventually(
        Duration::from_secs(10),
        "dials to avoid the draining agent",
        || {
            let ch = ch.clone();
            let echo = echo.to_string();
            let a_hist = a_hist.clone();
            let a_dials = a_hist.get_sample_count();
            async move {
                let c = GrpcConn::dial(&ch, &echo).await.ok()?;
                c.close().await;
                (a_hist.get_sample_count() == a_dials).then_some(())
            }
        },
    )
    .await;
    for _ in 0..10 {
        let c = GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial");
        c.close().await;
    }
    assert!(b.metrics.dial_duration.get_sample_count() >= before_b + 10);

    // The open connection on the draining agent still works...
    open.send(&b"still here"[..]).await.expect("send");
    assert_eq!(&open.recv().await.expect("echo")[..], b"still here");
    // ...and once it has closed and nothing more arrives, the agent leaves.
    assert_eq!(
        server.metrics.ready_backend_connections.get(),
        2,
        "the draining agent still serves while a connection is open"
    );
    assert!(open.close().await);
    let ready = server.metrics.ready_backend_connections.clone();
    tests::eventually(
        Duration::from_secs(20),
        "the drained agent to leave",
        || {
            let n = ready.get();
            async move { (n == 1).then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn late_dial_response_after_cancel_is_closed_on_the_agent() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let mut fake = FakeAgent::connect(server.agent_addr, &pki, "slow")
        .await
        .expect("fake agent");
    server.wait_agents(1).await;
    let ch = client::grpc_uds(&server.uds()).await;
    // A frontend dials, then gives up (DIAL_CLS) before the agent answers.
    let mut client = konnectivity_proto::wire::proxy_service_client::ProxyServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(packet::dial_request("10.0.0.9:443", 77))
        .await
        .unwrap();
    let _resp = client
        .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let Some(Message::DialRequest { random, .. }) = fake.recv_significant().await else {
        panic!("expected DIAL_REQ")
    };
    tx.send(packet::close_dial(random)).await.unwrap();
    match fake.recv_significant().await {
        Some(Message::CloseDial { random: r }) => assert_eq!(r, random),
        other => panic!("expected DIAL_CLS forwarded to the agent, got {other:?}"),
    }
    // The agent's success arrives late: the server must close it, not leak it.
    fake.send(packet::dial_ok(random, 5)).await;
    match fake.recv_significant().await {
        Some(Message::CloseRequest { connect_id }) => assert_eq!(connect_id, 5),
        other => panic!("expected CLOSE_REQ for the orphan, got {other:?}"),
    }
    assert_eq!(server.metrics.established_connections.get(), 0);
}

/// A frontend's `CLOSE_REQ` completes even when the agent never answers: the
/// server gives up after its close wait, answers `CLOSE_RSP` itself and
/// forgets the connection.
#[tokio::test]
async fn frontend_close_completes_when_the_agent_never_answers() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &[]).await;
    let mut fake = FakeAgent::connect(server.agent_addr, &pki, "mute")
        .await
        .expect("fake agent");
    server.wait_agents(1).await;
    let agent = tokio::spawn(async move {
        let Some(Message::DialRequest { random, .. }) = fake.recv_significant().await else {
            panic!("expected DIAL_REQ")
        };
        fake.send(packet::dial_ok(random, 9)).await;
        match fake.recv_significant().await {
            Some(Message::CloseRequest { connect_id }) => assert_eq!(connect_id, 9),
            other => panic!("expected CLOSE_REQ, got {other:?}"),
        }
        // Never answer; keep the stream open.
        fake
    });
    let ch = client::grpc_uds(&server.uds()).await;
    let mut conn = GrpcConn::dial(&ch, "10.0.0.9:443").await.expect("dial");
    assert_eq!(server.metrics.established_connections.get(), 1);
    conn.send_packet(packet::close_request(conn.connect_id))
        .await
        .expect("send");
    let _fake = agent.await.expect("agent side");
    let rest = tokio::time::timeout(Duration::from_secs(30), conn.read_to_end())
        .await
        .expect("the server must answer the close itself");
    assert!(rest.is_empty());
    assert!(conn.closed, "CLOSE_RSP from the server");
    tests::eventually(Duration::from_secs(10), "connection forgotten", || {
        let n = server.metrics.established_connections.get();
        async move { (n == 0).then_some(()) }
    })
    .await;
}

/// A server in `mode` on a Unix socket with one agent, and a listener for
/// the destination.
async fn connect_setup(mode: &str) -> (Pki, Server, Agent, tokio::net::TcpListener) {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, mode, Listen::Uds, &[]).await;
    let agent = Agent::start(&pki, server.agent_addr, "node", &[]).await;
    server.wait_agents(1).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    (pki, server, agent, l)
}

/// A destination that keeps sending to whoever connects ([`keep_sending`])
/// and reports what each connection sent it once that connection closes
/// (waiting `limit` at most).
fn talking_destination(
    l: tokio::net::TcpListener,
    limit: Duration,
) -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let (heard_tx, heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let heard_tx = heard_tx.clone();
            tokio::spawn(async move {
                let (mut rd, wr) = s.into_split();
                let talker = tokio::spawn(keep_sending(wr));
                let mut got = Vec::new();
                let _ = tokio::time::timeout(limit, rd.read_to_end(&mut got)).await;
                talker.abort();
                let _ = heard_tx.send(got);
            });
        }
    });
    heard
}

/// Writes 1 KiB every 200 us (4 MiB at most) until the peer goes away.
async fn keep_sending<W: tokio::io::AsyncWrite + Unpin>(mut w: W) {
    use tokio::io::AsyncWriteExt;
    let chunk = vec![7u8; 1024];
    for _ in 0..4096 {
        if w.write_all(&chunk).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// A destination that answers and closes at once while bytes to it are still
/// coming (a kubelet whose `exec` command exited while kubectl was still
/// sending: its kernel resets the connection). The answer it wrote first must
/// reach the client every time: the agent's write to the reset socket fails,
/// and what the destination sent before that is still read and forwarded.
#[tokio::test]
async fn an_answer_written_just_before_a_reset_reaches_the_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_pki, server, _agent, l) = connect_setup("http-connect").await;
    let dst = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                // Wait until the client's bytes flow, answer, and close
                // without reading them (unread bytes: the close is a reset).
                let _ = s.readable().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                let _ = s.write_all(b"exit status 0").await;
                drop(s);
            });
        }
    });
    const ROUNDS: usize = 40;
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        let s = client::connect_uds(&server.uds(), &dst.to_string())
            .await
            .expect("CONNECT");
        let (mut rd, wr) = tokio::io::split(s);
        let writer = tokio::spawn(keep_sending(wr));
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
        writer.abort();
        if got != b"exit status 0" {
            lost.push((round, String::from_utf8_lossy(&got).to_string()));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {ROUNDS} answers lost: {lost:?}",
        lost.len()
    );
}

/// The other way round: a client that writes its last bytes and hangs up
/// while the destination is still sending, over either frontend. (CONNECT:
/// the server's write to the client fails; gRPC: `CLOSE_REQ` follows the
/// last `DATA`.) The client's last bytes must still reach the destination.
#[tokio::test]
async fn a_clients_last_bytes_before_it_hangs_up_reach_the_destination() {
    for mode in ["http-connect", "grpc"] {
        let lost = last_words_lost(mode, 40).await;
        assert_eq!(lost, 0, "{mode}: {lost} of 40 last words lost");
    }
}

/// A CONNECT client writes a large last message and hangs up without reading
/// while the destination keeps sending: the server's write to the client
/// fails while part of that message still sits unread in the server's
/// socket. That part must still go to the destination, not be dropped with
/// the failed write.
#[tokio::test]
async fn a_connect_clients_large_last_write_reaches_the_destination_after_it_hangs_up() {
    const LAST: usize = 2 << 20;
    // Without the fix, 2 of 5 rounds lost 121 KiB each.
    const ROUNDS: usize = 20;
    let (_pki, server, _agent, l) = connect_setup("http-connect").await;
    let dst = l.local_addr().unwrap().to_string();
    let mut heard = talking_destination(l, Duration::from_secs(20));
    let last = tests::pattern(LAST, 1);
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        connect_say_and_hang_up(&server.uds(), &dst, &last).await;
        let got = heard.recv().await.unwrap();
        if got != last {
            lost.push((round, LAST - got.len().min(LAST)));
        }
    }
    assert!(lost.is_empty(), "(round, bytes lost) of {ROUNDS}: {lost:?}");
}

/// A CONNECT client that waits for the destination's first byte, writes
/// `last` and hangs up without reading more.
async fn connect_say_and_hang_up(uds: &std::path::Path, dst: &str, last: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = client::connect_uds(uds, dst).await.expect("CONNECT");
    let mut first = [0u8; 1];
    s.read_exact(&mut first)
        .await
        .expect("the destination talks");
    s.write_all(last).await.expect("write");
}

async fn last_words_lost(mode: &str, rounds: usize) -> usize {
    let (_pki, server, _agent, l) = connect_setup(mode).await;
    let dst = l.local_addr().unwrap().to_string();
    let mut heard = talking_destination(l, Duration::from_secs(10));
    let ch = match mode {
        "grpc" => Some(client::grpc_uds(&server.uds()).await),
        _ => None,
    };
    let mut lost = 0;
    for _ in 0..rounds {
        match &ch {
            Some(ch) => {
                let mut c = GrpcConn::dial(ch, &dst).await.expect("dial");
                c.recv().await.expect("the destination talks");
                c.send(&b"goodbye"[..]).await.expect("send");
                c.close().await;
            }
            None => connect_say_and_hang_up(&server.uds(), &dst, b"goodbye").await,
        }
        if !heard.recv().await.unwrap().ends_with(b"goodbye") {
            lost += 1;
        }
    }
    lost
}
