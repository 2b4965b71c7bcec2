//! Choosing a stream for a dial, against pretend agents.

use super::*;
use crate::backend::agent::test_link;
use futures::StreamExt;
use konnectivity_proto::{packet, Message, Packet};
use tokio_util::sync::CancellationToken;

/// A stream that has ended but is still listed (its reader has not yet
/// removed it, as during an agent's exit) gets no dial: the dial goes to the
/// live stream and is answered there.
#[tokio::test(flavor = "current_thread")]
async fn a_dial_skips_a_stream_that_has_ended_but_is_still_listed() {
    let registry = AgentRegistry::new(
        vec![Strategy::Default],
        Duration::from_secs(30),
        Metrics::new(),
    );
    let (gone, mut gone_rx) = test_link(1, "gone", 8);
    let (live, mut live_rx) = test_link(2, "live", 8);
    let ended = futures::stream::empty::<Result<Packet, tonic::Status>>();
    assert!(gone
        .clone()
        .serve(ended, CancellationToken::new())
        .await
        .is_none());
    registry.add(gone.clone());
    registry.add(live.clone());

    // The live agent answers every dial it is asked for.
    let (answers, inbound) = futures::channel::mpsc::unbounded();
    let agent = tokio::spawn(async move {
        let mut connect_id = 0;
        while let Some(p) = live_rx.recv().await {
            if let Ok(Message::DialRequest { random, .. }) = Message::from_packet(p) {
                connect_id += 1;
                let _ = answers.unbounded_send(Ok(packet::dial_ok(random, connect_id)));
            }
        }
    });
    let serving = tokio::spawn(
        live.clone()
            .serve(inbound.boxed(), CancellationToken::new()),
    );
    // Two dials: the list's rotation starts each at another stream.
    for (random, connect_id) in [(7, 1), (8, 2)] {
        let tunnel = registry.dial("10.0.0.1:80", random, "grpc").await;
        let tunnel = tunnel.expect("the dial goes to the live agent and is answered");
        assert_eq!(tunnel.connect_id(), connect_id);
    }
    assert!(
        gone_rx.try_recv().is_err(),
        "a DIAL_REQ went to the ended stream"
    );
    assert_eq!(
        registry.preview("10.0.0.1:80").unwrap().link.agent_id,
        "live"
    );
    live.closed.cancel();
    serving.abort();
    agent.abort();
}
