//! The stream's heartbeat watchdog, on tokio's paused clock.

use super::*;
use clap::Parser;
use konnectivity_link::Pending;
use std::time::Duration;
use tokio_stream::wrappers::UnboundedReceiverStream;

type Inbound = mpsc::UnboundedSender<Result<Packet, tonic::Status>>;
type Packets = UnboundedReceiverStream<Result<Packet, tonic::Status>>;

/// A stream's state with a pretend server: what it sends goes in through
/// the returned sender, the agent's control packets come out of the
/// receiver. `flow` is `window-v1`, with which servers send heartbeats.
fn link(
    dir: &std::path::Path,
    flow: bool,
) -> (Arc<ServerLink>, Inbound, Packets, mpsc::Receiver<Packet>) {
    let ca = konnectivity_runtime::pki::Ca::new(dir, "test").unwrap();
    let ca_flag = format!("--ca-cert={}", ca.cert.display());
    let args = crate::config::Args::try_parse_from(["proxy-agent", ca_flag.as_str()]).unwrap();
    let config = Config::from_args(args).unwrap();
    let tls =
        konnectivity_runtime::tls::Reloading::client("agent", &ca.cert, None, &[b"h2"]).unwrap();
    let settings = Arc::new(Settings {
        config,
        tls,
        metrics: Metrics::new(),
        events: Default::default(),
        quic: Default::default(),
    });
    let (out, _) = mpsc::channel(OUT_QUEUE);
    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let link = ServerLink::new(
        "s".into(),
        (flow, true),
        "server:1".into(),
        (out, control),
        settings,
    );
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Arc::new(link),
        tx,
        UnboundedReceiverStream::new(rx),
        control_rx,
    )
}

/// The agent drops a stream whose server stopped sending heartbeats
/// after three missed ones, and not before; every heartbeat is answered
/// and restarts the count. On tokio's paused clock: no real waiting.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_silent_server_is_dropped_after_three_missed_heartbeats_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let (link, server, inbound, mut control) = link(dir.path(), true);
    // An open dial, to see it fail when the stream is dropped.
    link.state()
        .accept_dial(9, link.closed.child_token())
        .unwrap();
    let serving = tokio::spawn(link.clone().serve(inbound, CancellationToken::new()));
    let watchdog = HEARTBEAT_INTERVAL * HEARTBEAT_MISSES;
    // A minute of heartbeats on time: kept, each answered.
    for _ in 0..30 {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        server.send(Ok(packet::window(0, 0))).unwrap();
        assert_eq!(control.recv().await, Some(packet::window(0, 0)));
    }
    assert!(!serving.is_finished() && !link.closed.is_cancelled());
    // Silent for just under the limit: still kept.
    tokio::time::sleep(watchdog - Duration::from_millis(10)).await;
    assert!(!link.closed.is_cancelled());
    // Past it: dropped, and its dial with it.
    let started = tokio::time::Instant::now();
    serving.await.unwrap();
    assert!(started.elapsed() <= Duration::from_millis(10));
    assert!(link.closed.is_cancelled());
    let dial: Option<Pending<CancellationToken>> = link.state().take_dial(9);
    assert!(dial.is_none(), "the stream's dials were not failed");
}

/// A reference server sends no heartbeats: its silence is not a fault.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_server_without_heartbeats_is_kept_however_long_it_is_silent() {
    let dir = tempfile::tempdir().unwrap();
    let (link, _server, inbound, _control) = link(dir.path(), false);
    let serving = tokio::spawn(link.clone().serve(inbound, CancellationToken::new()));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!serving.is_finished() && !link.closed.is_cancelled());
}
