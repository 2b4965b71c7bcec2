//! One connection whose reader stalls must not stop another connection on the
//! same agent stream (the reference's worst defect, upstream issues 180, 222
//! and 881).

use std::time::Duration;

use tests::client::{self, GrpcConn};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::{dest, init_logs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

const MIB: usize = 1 << 20;
/// Generous bound for a 20 MiB loopback transfer; only a stall reaches it.
const LIMIT: Duration = Duration::from_secs(60);

/// Starts a 512 MiB download on its own gRPC connection (as kube-apiserver's
/// client does), reads its first bytes, and never reads again. The channel is
/// returned too: dropping it would close the stalled connection.
async fn start_stalled_download(server: &Server, dst: &str) -> (Channel, GrpcConn) {
    let ch = client::grpc_uds(&server.uds()).await;
    let mut stalled = GrpcConn::dial(&ch, dst).await.expect("dial");
    stalled
        .send(format!("GET {} 1\n", 512 * MIB))
        .await
        .expect("send");
    stalled.recv().await.expect("first bytes");
    (ch, stalled)
}

async fn download(ch: &tonic::transport::Channel, dst: &str, n: usize, seed: u64) {
    let mut c = GrpcConn::dial(ch, dst).await.expect("dial");
    c.send(format!("GET {n} {seed}\n")).await.expect("send");
    let got = c.read_to_end().await;
    assert_eq!(got.len(), n);
    assert_eq!(
        tests::sha256_hex(&got),
        tests::sha256_hex(&tests::pattern(n, seed))
    );
}

/// With flow control (our agent and server), the stalled connection costs the
/// other nothing: the server's stall timeout is set to an hour, so if
/// isolation depended on closing the stalled connection, this would hang.
#[tokio::test]
async fn stalled_frontend_reader_does_not_stop_another_download() {
    init_logs();
    let pki = Pki::new();
    let (server, _agent) = tests::inproc::pair(
        &pki,
        "grpc",
        &["--stall-timeout=1h"],
        &["--stall-timeout=1h"],
    )
    .await;
    let dst = dest::bulk("bulk").await.to_string();

    let (_stalled_ch, stalled) = start_stalled_download(&server, &dst).await;

    let ch = client::grpc_uds(&server.uds()).await;
    tokio::time::timeout(LIMIT, download(&ch, &dst, 20 * MIB, 2))
        .await
        .expect("the healthy connection must finish while the other is stalled");
    assert_eq!(
        server.metrics.stalled_closed.get(),
        0,
        "nothing needed closing"
    );
    assert_eq!(
        server.metrics.established_connections.get(),
        1,
        "the stalled one is still open"
    );
    drop(stalled);
}

/// Same over HTTP CONNECT, upload direction: a destination that stops reading
/// must not stop another upload through the same agent.
#[tokio::test]
async fn stalled_destination_does_not_stop_another_upload() {
    init_logs();
    let pki = Pki::new();
    let (server, _agent) = tests::inproc::pair(
        &pki,
        "http-connect",
        &["--stall-timeout=1h"],
        &["--stall-timeout=1h"],
    )
    .await;
    let hole = dest::blackhole().await;
    let bulk = dest::bulk("bulk").await;

    let mut stuck = client::connect_uds(&server.uds(), &hole.to_string())
        .await
        .expect("CONNECT");
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; MIB];
        for _ in 0..512 {
            if stuck.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });

    let mut s = client::connect_uds(&server.uds(), &bulk.to_string())
        .await
        .expect("CONNECT");
    let data = tests::pattern(20 * MIB, 5);
    tokio::time::timeout(LIMIT, async {
        s.write_all(format!("PUT {}\n", data.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&data).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer.trim(), tests::sha256_hex(&data));
    })
    .await
    .expect("the healthy upload must finish while the destination of the other is stalled");
    assert!(
        !writer.is_finished(),
        "the stalled upload is held back, not failed"
    );
    writer.abort();
}

/// With a peer that has no flow control (as a reference agent), a full queue
/// holds the stream for at most --stall-timeout; then only the stalled
/// connection is closed and the other finishes.
#[tokio::test]
async fn without_flow_control_only_the_stalled_connection_is_closed() {
    init_logs();
    let pki = Pki::new();
    let server = Server::start(&pki, "grpc", Listen::Uds, &["--stall-timeout=1s"]).await;
    // As a reference agent: no flow control, no QUIC.
    let _agent = Agent::start(
        &pki,
        server.agent_addr,
        "legacy",
        &["--flow-control=false", "--transport=grpc"],
    )
    .await;
    server.wait_agents(1).await;
    let dst = dest::bulk("bulk").await.to_string();

    let (_stalled_ch, stalled) = start_stalled_download(&server, &dst).await;

    let ch = client::grpc_uds(&server.uds()).await;
    tokio::time::timeout(LIMIT, download(&ch, &dst, 20 * MIB, 2))
        .await
        .expect("the healthy connection must finish");
    tests::eventually(
        Duration::from_secs(10),
        "the stalled connection to be closed",
        || {
            let n = server.metrics.stalled_closed.get();
            async move { (n >= 1).then_some(()) }
        },
    )
    .await;
    drop(stalled);
}
