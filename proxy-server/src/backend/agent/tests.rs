//! The agent stream's driver against a pretend agent: the overflow of
//! control packets, unknown ids, late packets and the mistake budget.

use super::*;
use konnectivity_proto::packet;

fn link(queue: usize) -> (Arc<AgentLink>, mpsc::Receiver<Packet>) {
    test_link(1, "a", queue)
}

#[tokio::test(flavor = "current_thread")]
async fn control_packets_for_an_agent_that_does_not_read_stay_bounded_and_in_order() {
    let (l, mut rx) = link(1);
    let n = LATER_MAX + 100;
    for id in 1..=n as i64 {
        l.send_later(packet::close_request(id));
    }
    // One in the queue, LATER_MAX waiting, the rest dropped and counted;
    // one flusher task, not one per packet.
    assert_eq!(l.waiting_control_packets(), LATER_MAX);
    assert_eq!(l.metrics().control_dropped.get(), 99);
    // The agent reads again: everything kept arrives, in order.
    let mut got = Vec::new();
    while got.len() < LATER_MAX + 1 {
        match rx.recv().await.map(Message::from_packet) {
            Some(Ok(Message::CloseRequest { connect_id })) => got.push(connect_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, (1..=(LATER_MAX as i64 + 1)).collect::<Vec<_>>());
    assert_eq!(l.waiting_control_packets(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_data_for_unknown_ids_does_not_grow_the_link() {
    let (l, mut rx) = link(16);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    for id in 1..=10_000 {
        l.dispatch(Message::Data {
            connect_id: id,
            data: Bytes::from_static(b"x"),
        })
        .await;
    }
    assert_eq!(l.state().recently_closed(), konnectivity_link::RECENT);
    assert_eq!(
        l.metrics()
            .unknown_packets
            .with_label_values(&["DATA"])
            .get(),
        10_000
    );
    drop(l);
    drain.abort();
}

fn cut_offs(l: &AgentLink) -> u64 {
    l.metrics()
        .peers_cut_off
        .with_label_values(&["agent", "unknown_connection"])
        .get()
}

/// Late packets for connections that existed, and answers to dials the
/// frontend gave up on, cost the agent nothing, however many.
#[tokio::test(flavor = "current_thread")]
async fn late_packets_for_closed_connections_and_abandoned_dials_are_not_mistakes() {
    let (l, mut rx) = link(64);
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    // Three dials answered and closed at once (their frontends left),
    // one dial abandoned before its answer.
    for random in 1..=3 {
        drop(l.begin_dial("10.0.0.1:80", random, "test").await.unwrap());
    }
    drop(l.begin_dial("10.0.0.1:80", 100, "test").await.unwrap());
    l.abandon_dial(100);
    let mut packets: Vec<Packet> = (1..=3).map(|r| packet::dial_ok(r, r)).collect();
    for i in 0..3 * konnectivity_proto::budget::BURST as i64 {
        let id = 1 + i % 3;
        packets.push(match i % 4 {
            0 => packet::data(id, Bytes::from_static(b"late")),
            1 => packet::window(id, 4096),
            2 => packet::close_response(id, ""),
            _ => packet::dial_ok(100, 7),
        });
    }
    let served = l
        .clone()
        .serve(
            futures::stream::iter(packets.into_iter().map(Ok)),
            CancellationToken::new(),
        )
        .await;
    assert_eq!(served, None, "a correct agent was cut off");
    assert_eq!(cut_offs(&l), 0);
    drain.abort();
}

/// Packets for connections that never existed spend the budget, each
/// kind on its own; the stream then ends at once, with the metric, and
/// later packets are not read.
#[tokio::test(flavor = "current_thread")]
async fn an_agent_flooding_unknown_connections_is_cut_off() {
    type Make = fn(i64) -> Packet;
    let kinds: [(&str, Make); 4] = [
        ("DATA", |id| packet::data(id, Bytes::from_static(b"x"))),
        ("WINDOW", |id| packet::window(id, 1)),
        ("DIAL_RSP", |id| packet::dial_ok(id, 5)),
        ("CLOSE_RSP", |id| packet::close_response(id, "")),
    ];
    for (kind, make) in kinds {
        let (l, mut rx) = link(64);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let read = Arc::new(AtomicUsize::new(0));
        let counted = read.clone();
        let flood = futures::stream::iter((0..100_000i64).map(move |i| {
            counted.fetch_add(1, Ordering::Relaxed);
            Ok(make(1_000_000 + i))
        }));
        let served = l.clone().serve(flood, CancellationToken::new()).await;
        assert_eq!(served, Some(Mistake::UnknownConnection), "{kind}");
        assert_eq!(cut_offs(&l), 1, "{kind}");
        let read = read.load(Ordering::Relaxed);
        let burst = konnectivity_proto::budget::BURST as usize;
        // The burst, plus whatever refilled while the test ran.
        assert!(
            read > burst && read < burst + 1000,
            "{kind}: read {read} packets"
        );
        assert!(l.closed.is_cancelled(), "{kind}");
        drain.abort();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_dial_on_a_stream_that_has_ended_fails_at_once() {
    let (l, mut rx) = link(8);
    // The agent's stream ends; a dial chosen just before (the registry still
    // held the stream) comes in afterwards.
    let inbound = futures::stream::empty::<Result<Packet, tonic::Status>>();
    assert!(l
        .clone()
        .serve(inbound, CancellationToken::new())
        .await
        .is_none());
    match l.begin_dial("10.0.0.1:80", 7, "grpc").await {
        Err(DialError::AgentGone(agent)) => assert_eq!(agent, "a"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!(
            "a dial on an ended stream was accepted: it would wait for an answer that never comes"
        ),
    }
    assert_eq!(l.snapshot().pending.len(), 0);
    assert_eq!(l.metrics().pending_dials.get(), 0);
    assert!(rx.try_recv().is_err(), "no DIAL_REQ on an ended stream");
}
