//! Hostile peers against the real `proxy-server` process: floods of packets
//! for connections that never existed, malformed and oversized packets, from
//! a hand-driven agent and a hand-driven frontend. Each offender is cut off
//! with a log line and a metric, the server's memory stays within a stated
//! bound (measured on the process, so other tests do not blur it), and a
//! tunnel through a correct agent keeps moving bytes throughout.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use konnectivity_proto::{packet, Packet, PacketType};
use tests::client::{self, FakeAgent, GrpcConn};
use tests::cluster::{http_get, metric_sum};
use tests::inproc::{Agent, Listen, Server};
use tests::pki::Pki;
use tests::process::{rss_kib, Proc};
use tests::{dest, init_logs};
use tokio::sync::mpsc;

/// How much a flood may raise the server's peak memory, in KiB. The server
/// holds nothing per unknown id beyond the bounded recently-closed set; what
/// it does hold is the packets in flight on one HTTP/2 connection (its
/// windows are 16 MiB per connection), the allocator's slack and metrics.
const FLOOD_BOUND_KIB: u64 = 16 * 1024;

struct Spawned {
    proc: Proc,
    agent_addr: SocketAddr,
    health: SocketAddr,
    uds: std::path::PathBuf,
    _good: Proc,
}

impl Spawned {
    /// A server process with one correct agent connected.
    async fn start(pki: &Pki) -> Spawned {
        Self::start_with(pki, &[]).await
    }

    /// [`Spawned::start`] with extra server flags.
    async fn start_with(pki: &Pki, extra: &[&str]) -> Spawned {
        Self::start_both(pki, extra, &[]).await
    }

    /// A server with `extra` flags and one agent with `agent_extra`.
    async fn start_both(pki: &Pki, extra: &[&str], agent_extra: &[&str]) -> Spawned {
        Self::start_mode(pki, "grpc", extra, agent_extra).await
    }

    /// A server in frontend `mode` (`grpc`, `http-connect`) on a Unix
    /// socket, with `extra` flags, and one agent with `agent_extra`.
    async fn start_mode(pki: &Pki, mode: &str, extra: &[&str], agent_extra: &[&str]) -> Spawned {
        let uds = pki.path("hostile.sock");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let proc = Proc::spawn(&[], &Server::args(pki, mode, Listen::Uds, &uds, &extra));
        let field = |f: &'static str| {
            let proc = &proc;
            async move {
                proc.log_field("proxy-server started", f)
                    .await
                    .parse::<SocketAddr>()
                    .unwrap()
            }
        };
        let agent_addr = field("agent").await;
        let health = field("health").await;
        let good = Proc::spawn(&[], &Agent::args(pki, agent_addr, "good", agent_extra));
        let s = Spawned {
            proc,
            agent_addr,
            health,
            uds: uds.into(),
            _good: good,
        };
        s.wait_agents(1).await;
        s
    }

    async fn metrics(&self) -> String {
        http_get(&self.health.to_string(), "/metrics")
            .await
            .unwrap_or_default()
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }

    async fn wait_agents(&self, n: usize) {
        tests::eventually(Duration::from_secs(20), "agents connected", || async {
            let ready = self
                .metric(
                    "konnectivity_network_proxy_server_ready_backend_connections",
                    &[],
                )
                .await;
            (ready == n as f64).then_some(())
        })
        .await
    }

    /// (resident, peak resident) of the server process, KiB.
    fn memory(&self) -> (u64, u64) {
        rss_kib(self.proc.child.id()).expect("server memory")
    }

    async fn cut_offs(&self, peer: &str, reason: &str) -> f64 {
        self.metric(
            "konnectivity_network_proxy_server_peers_cut_off_total",
            &[("peer", peer), ("reason", reason)],
        )
        .await
    }
}

/// An echo tunnel through the correct agent; `round_trip` checks it moves.
struct Witness(GrpcConn);

impl Witness {
    async fn open(s: &Spawned) -> Witness {
        let echo = dest::echo().await;
        let ch = client::grpc_uds(&s.uds).await;
        Witness(GrpcConn::dial(&ch, &echo.to_string()).await.expect("dial"))
    }

    async fn round_trip(&mut self, i: usize) {
        let msg = format!("still moving {i}");
        self.0.send(msg.clone().into_bytes()).await.expect("send");
        let got = tokio::time::timeout(Duration::from_secs(10), self.0.recv())
            .await
            .expect("echo within 10 s while the server is flooded")
            .expect("echo");
        assert_eq!(&got[..], msg.as_bytes());
    }
}

/// Sends `packets` from the fake agent until its stream ends, reading the
/// server's answers meanwhile (an offender that does not read only stalls
/// its own stream). Returns how many were sent and whether the server ended
/// the stream.
async fn flood(fake: FakeAgent, packets: impl Iterator<Item = Packet>) -> (usize, bool) {
    let FakeAgent {
        tx, mut inbound, ..
    } = fake;
    let reader = tokio::spawn(async move {
        // Ends when the server ends the stream.
        while let Ok(Some(_)) = futures::StreamExt::next(&mut inbound).await.transpose() {}
    });
    let mut sent = 0;
    for p in packets {
        if tx.send(p).await.is_err() {
            break;
        }
        sent += 1;
        if reader.is_finished() {
            break;
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .is_ok();
    (sent, ended)
}

#[tokio::test]
async fn an_agent_flooding_unknown_connections_is_cut_off_and_others_keep_moving() {
    init_logs();
    let pki = Pki::new();
    let s = Spawned::start(&pki).await;
    let mut witness = Witness::open(&s).await;
    witness.round_trip(0).await;
    let (_, peak_before) = s.memory();

    let fake = FakeAgent::connect(s.agent_addr, &pki, "flooder")
        .await
        .expect("fake agent");
    s.wait_agents(2).await;
    let payload = Bytes::from(vec![0x5a; 1024]);
    let packets = (0..200_000i64).map(move |i| {
        let id = 1_000_000_000 + i;
        match i % 4 {
            0 => packet::data(id, payload.clone()),
            1 => packet::window(id, 65536),
            2 => packet::dial_ok(id, id),
            _ => packet::close_response(id, ""),
        }
    });
    let flooding = tokio::spawn(flood(fake, packets));
    for i in 1..=20 {
        witness.round_trip(i).await;
    }
    let (sent, ended) = flooding.await.unwrap();
    assert!(ended, "the server did not end the flooding agent's stream");
    assert!(
        sent < 200_000,
        "the whole flood was accepted ({sent} packets)"
    );

    let line = s
        .proc
        .wait_log(&["agent cut off"], Duration::from_secs(10))
        .await;
    assert!(line.contains("flooder"), "log line names the agent: {line}");
    assert_eq!(s.cut_offs("agent", "unknown_connection").await, 1.0);
    s.wait_agents(1).await;
    let (_, peak_after) = s.memory();
    let grown = peak_after.saturating_sub(peak_before);
    eprintln!("flood of {sent} packets: peak memory +{grown} KiB");
    assert!(
        grown < FLOOD_BOUND_KIB,
        "peak memory grew by {grown} KiB under the flood"
    );
    // The correct agent's tunnel and new dials still work.
    witness.round_trip(21).await;
    Witness::open(&s).await.round_trip(0).await;
}

#[tokio::test]
async fn oversized_and_malformed_packets_cut_off_only_their_sender() {
    init_logs();
    let pki = Pki::new();
    let s = Spawned::start(&pki).await;
    let mut witness = Witness::open(&s).await;
    let (_, peak_before) = s.memory();

    // One DATA larger than the 16 MiB message limit: refused from its
    // length prefix, before the server buffers it.
    let big = FakeAgent::connect(s.agent_addr, &pki, "oversized")
        .await
        .expect("fake agent");
    let huge = packet::data(1, Bytes::from(vec![1u8; 17 << 20]));
    let (_, ended) = flood(big, std::iter::once(huge)).await;
    assert!(ended, "the oversized packet's stream was not ended");
    let line = s
        .proc
        .wait_log(&["agent cut off", "oversized"], Duration::from_secs(10))
        .await;
    assert!(line.contains("over the limit"), "{line}");
    assert_eq!(s.cut_offs("agent", "oversized").await, 1.0);
    witness.round_trip(1).await;

    // Packets whose type and payload disagree, without end.
    let bad = FakeAgent::connect(s.agent_addr, &pki, "malformed")
        .await
        .expect("fake agent");
    let packets = (0..100_000i64).map(|i| {
        let mut p = packet::dial_ok(i, i);
        p.r#type = PacketType::Data as i32;
        p
    });
    let (sent, ended) = flood(bad, packets).await;
    assert!(ended && sent < 100_000, "malformed flood not cut off");
    s.proc
        .wait_log(&["agent cut off", "malformed"], Duration::from_secs(10))
        .await;
    assert_eq!(s.cut_offs("agent", "malformed").await, 1.0);

    witness.round_trip(2).await;
    let (_, peak_after) = s.memory();
    let grown = peak_after.saturating_sub(peak_before);
    eprintln!("oversized and malformed packets: peak memory +{grown} KiB");
    assert!(grown < FLOOD_BOUND_KIB, "peak memory grew by {grown} KiB");
    s.wait_agents(1).await;
}

#[tokio::test]
async fn a_frontend_flooding_unknown_connections_or_sending_an_oversized_packet_is_cut_off() {
    init_logs();
    let pki = Pki::new();
    let s = Spawned::start(&pki).await;
    let mut witness = Witness::open(&s).await;
    let (_, peak_before) = s.memory();

    // A raw gRPC frontend stream: packets to send, a task reading answers
    // until the server ends the stream.
    let open = || async {
        let ch = client::grpc_uds(&s.uds).await;
        let mut raw = konnectivity_proto::wire::proxy_service_client::ProxyServiceClient::new(ch);
        let (tx, rx) = mpsc::channel::<Packet>(64);
        let mut inbound = raw
            .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("frontend stream")
            .into_inner();
        let reader = tokio::spawn(async move {
            while let Ok(Some(_)) = futures::StreamExt::next(&mut inbound).await.transpose() {}
        });
        (tx, reader)
    };
    let (tx, reader) = open().await;
    let mut sent = 0;
    for i in 0..100_000i64 {
        let p = if i % 2 == 0 {
            packet::data(5_000_000 + i, Bytes::from_static(b"nobody"))
        } else {
            packet::close_request(5_000_000 + i)
        };
        if tx.send(p).await.is_err() || reader.is_finished() {
            break;
        }
        sent += 1;
    }
    tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the server did not end the flooding frontend stream")
        .unwrap();
    assert!(sent < 100_000, "the whole flood was accepted");
    s.proc
        .wait_log(&["frontend stream cut off"], Duration::from_secs(10))
        .await;
    assert_eq!(s.cut_offs("frontend", "unknown_connection").await, 1.0);
    witness.round_trip(1).await;

    // One DATA over the 16 MiB message limit: refused from its length
    // prefix, before the server buffers it.
    let (tx, reader) = open().await;
    let _ = tx
        .send(packet::data(1, Bytes::from(vec![1u8; 17 << 20])))
        .await;
    tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the server did not end the oversized frontend stream")
        .unwrap();
    s.proc
        .wait_log(
            &["frontend stream cut off", "oversized"],
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(s.cut_offs("frontend", "oversized").await, 1.0);
    witness.round_trip(2).await;
    let (_, peak_after) = s.memory();
    let grown = peak_after.saturating_sub(peak_before);
    eprintln!("frontend flood and oversized packet: peak memory +{grown} KiB");
    assert!(grown < FLOOD_BOUND_KIB, "peak memory grew by {grown} KiB");
}

/// Three frontend streams open 1,000 downloads of 8 MiB each and never read
/// one byte of them (the pending-dial limits raised so that all 3,000 are
/// asked for at once). Each connection's window (1 MiB) bounds it alone; the
/// sum is bounded by `--max-buffered-bytes`: connections whose frontend is
/// behind are closed once the server holds that much, counted and logged,
/// and a frontend that reads is served throughout.
#[tokio::test]
async fn frontends_that_never_read_thousands_of_downloads_are_held_to_the_buffer_limit() {
    init_logs();
    const STREAMS: i64 = 3;
    const PER_STREAM: i64 = 1000;
    const DIALS: i64 = STREAMS * PER_STREAM;
    const LIMIT_MIB: u64 = 64;
    let pki = Pki::new();
    let limit = format!("--max-buffered-bytes={}", LIMIT_MIB << 20);
    let pending = format!("--max-pending-dials-per-agent={DIALS}");
    let agent_pending = format!("--max-pending-dials={DIALS}");
    // The buffer limit is the gRPC stream's: over QUIC, bytes wait in the
    // agent connection's QUIC window instead (64 MiB at most).
    let s = Spawned::start_both(
        &pki,
        &[&limit, &pending],
        &[&agent_pending, "--transport=grpc"],
    )
    .await;
    let mut witness = Witness::open(&s).await;
    let (_, peak_before) = s.memory();
    let bulk = dest::bulk("bulk").await.to_string();

    let mut frontends = Vec::new();
    for f in 0..STREAMS {
        let ch = client::grpc_uds(&s.uds).await;
        let mut raw = konnectivity_proto::wire::proxy_service_client::ProxyServiceClient::new(ch);
        let (tx, rx) = mpsc::channel(1024);
        let inbound = raw
            .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("frontend stream")
            .into_inner();
        for random in 1..=PER_STREAM {
            let random = f * 1_000_000 + random;
            tx.send(packet::dial_request(&bulk, random)).await.unwrap();
        }
        frontends.push((tx, inbound));
    }
    // Read the answers (no data flows before the requests), then ask every
    // connection for 8 MiB and read nothing more.
    for (tx, inbound) in &mut frontends {
        let mut ids = Vec::new();
        while ids.len() < PER_STREAM as usize {
            if let konnectivity_proto::Message::DialResponse {
                connect_id, error, ..
            } = next_message(inbound).await
            {
                assert!(error.is_empty(), "{error}");
                ids.push(connect_id);
            }
        }
        for id in &ids {
            let get = format!("GET {} {id}\n", 8 << 20);
            tx.send(packet::data(*id, Bytes::from(get))).await.unwrap();
        }
    }
    let closed = tests::eventually(
        Duration::from_secs(30),
        "connections closed at the buffer limit",
        || async {
            let n = s
                .metric(
                    "konnectivity_network_proxy_server_buffer_limit_connections_closed_total",
                    &[],
                )
                .await;
            (n > 0.0).then_some(n)
        },
    )
    .await;
    // Let the downloads that are still open fill whatever they can.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 1..=5 {
        witness.round_trip(i).await;
    }
    let (_, peak_after) = s.memory();
    let grown = peak_after.saturating_sub(peak_before);
    eprintln!(
        "{DIALS} unread downloads: {closed} connections closed at the limit, peak memory +{grown} KiB"
    );
    s.proc
        .wait_log(
            &["holds its limit of bytes for frontends"],
            Duration::from_secs(10),
        )
        .await;
    // The limit, the frontend stream's own queue (64 packets of at most
    // 128 KiB) and HTTP/2's windows towards it for each frontend stream,
    // and 24 KiB of state per connection.
    let bound = ((LIMIT_MIB + (8 + 16) * STREAMS as u64) << 10) + 24 * DIALS as u64;
    assert!(
        grown < bound,
        "peak memory grew by {grown} KiB, over {bound} KiB"
    );
    drop(frontends);
}

/// One frontend stream holds at most 1,024 dials and connections: the next
/// dial is refused with a clear answer (not queued, not dropped), the stream
/// and its connections keep working, and a connection closed makes room.
#[tokio::test]
async fn a_frontend_stream_holds_a_bounded_number_of_dials_and_connections() {
    init_logs();
    const CAP: i64 = 1024;
    let pki = Pki::new();
    let s = Spawned::start_both(
        &pki,
        &["--max-pending-dials-per-agent=4096"],
        &["--max-pending-dials=4096"],
    )
    .await;
    let echo = dest::echo().await.to_string();
    let ch = client::grpc_uds(&s.uds).await;
    let mut raw = konnectivity_proto::wire::proxy_service_client::ProxyServiceClient::new(ch);
    let (tx, rx) = mpsc::channel(2048);
    let mut inbound = raw
        .proxy(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("frontend stream")
        .into_inner();
    for random in 1..=CAP + 1 {
        tx.send(packet::dial_request(&echo, random)).await.unwrap();
    }
    let (mut open, mut refused) = (Vec::new(), Vec::new());
    while open.len() + refused.len() < CAP as usize + 1 {
        if let konnectivity_proto::Message::DialResponse {
            random,
            connect_id,
            error,
            ..
        } = next_message(&mut inbound).await
        {
            if error.is_empty() {
                open.push(connect_id);
            } else {
                assert!(
                    error.contains("too many dials on this frontend stream"),
                    "{error}"
                );
                refused.push(random);
            }
        }
    }
    assert_eq!((open.len(), refused.len()), (CAP as usize, 1));
    // A connection of the full stream still moves bytes.
    tx.send(packet::data(open[0], Bytes::from_static(b"ping")))
        .await
        .unwrap();
    match next_message(&mut inbound).await {
        konnectivity_proto::Message::Data { connect_id, data } => {
            assert_eq!((connect_id, &data[..]), (open[0], &b"ping"[..]));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Closing one makes room for one more.
    tx.send(packet::close_request(open[1])).await.unwrap();
    loop {
        if let konnectivity_proto::Message::CloseResponse { connect_id, .. } =
            next_message(&mut inbound).await
        {
            assert_eq!(connect_id, open[1]);
            break;
        }
    }
    tx.send(packet::dial_request(&echo, 5_000)).await.unwrap();
    loop {
        if let konnectivity_proto::Message::DialResponse { random, error, .. } =
            next_message(&mut inbound).await
        {
            assert_eq!((random, error.as_str()), (5_000, ""));
            break;
        }
    }
}

/// The next packet a frontend stream receives, typed (30 s at most).
async fn next_message<S>(inbound: &mut S) -> konnectivity_proto::Message
where
    S: futures::Stream<Item = Result<Packet, tonic::Status>> + Unpin,
{
    let p = tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(inbound))
        .await
        .expect("an answer")
        .expect("stream")
        .expect("packet");
    konnectivity_proto::Message::from_packet(p).unwrap()
}

/// A thousand clients trickle CONNECT request heads at one byte a second and
/// never finish them (slowloris). Meanwhile other clients open tunnels and
/// are served, and the server's memory stays within a few KiB per slow
/// client; at the head timeout (30 s) every slow client is answered 408 and
/// closed, counted and logged.
#[tokio::test]
async fn a_thousand_clients_trickling_connect_heads_are_cut_off_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_logs();
    const SLOW: usize = 1000;
    let pki = Pki::new();
    let s = Spawned::start_mode(&pki, "http-connect", &[], &[]).await;
    let echo = dest::echo().await.to_string();
    let (_, peak_before) = s.memory();
    let (mut readers, mut writers) = (Vec::new(), Vec::new());
    for _ in 0..SLOW {
        let c = tokio::net::UnixStream::connect(&s.uds).await.unwrap();
        let (r, w) = c.into_split();
        readers.push(r);
        writers.push(w);
    }
    let trickle = tokio::spawn(async move {
        let head = b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: 10.0.0.1:80\r\nX-Slow: ";
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            for w in &mut writers {
                let _ = w.write_all(&[*b]).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    // Others are served while the slow heads trickle in.
    for i in 0..10 {
        let mut t = client::connect_uds(&s.uds, &echo).await.expect("CONNECT");
        let msg = format!("served {i}");
        t.write_all(msg.as_bytes()).await.unwrap();
        let mut got = vec![0; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut got))
            .await
            .expect("echo within 10 s")
            .unwrap();
        assert_eq!(got, msg.as_bytes());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (_, peak) = s.memory();
    let grown = peak.saturating_sub(peak_before);
    // A task, a socket and a 1 KiB head buffer per slow client.
    let bound = 32 * SLOW as u64;
    eprintln!("{SLOW} slow CONNECT heads: peak memory +{grown} KiB");
    assert!(
        grown < bound,
        "peak memory grew by {grown} KiB, over {bound} KiB"
    );
    // Every slow client is answered and closed at the head timeout.
    for mut r in readers {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut answer))
            .await
            .expect("closed at the head timeout")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    }
    trickle.abort();
    assert_eq!(s.cut_offs("frontend", "slow_request").await, SLOW as f64);
    s.proc
        .wait_log(
            &["CONNECT request head not complete in time"],
            Duration::from_secs(10),
        )
        .await;
}
