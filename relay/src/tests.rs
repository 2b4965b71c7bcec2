//! Credit, queues, the held count and the copies, in memory.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::*;

#[tokio::test]
async fn sender_stops_at_the_window_and_resumes_on_grant() {
    let credit = Arc::new(Credit::new(10));
    assert_eq!(credit.wait(64).await, 10);
    credit.consume(25);
    let c2 = credit.clone();
    let waiter = tokio::spawn(async move { c2.wait(64).await });
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "must wait while credit is negative");
    credit.grant(10);
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished(), "still -5");
    credit.grant(20);
    assert_eq!(waiter.await.unwrap(), 15);
}

#[tokio::test]
async fn a_lagging_connection_pins_few_shared_buffers() {
    let (entry, mut inbox) = connection(true, CancellationToken::new(), None);
    let shared = Bytes::from(vec![1u8; 64 * 1024]);
    let within = |b: &Bytes| {
        let range = shared.as_ptr() as usize..shared.as_ptr() as usize + shared.len();
        range.contains(&(b.as_ptr() as usize))
    };
    let stall = std::time::Duration::from_secs(1);
    for i in 0..20 {
        let chunk = shared.slice(i * 1024..(i + 1) * 1024);
        assert!(matches!(
            entry.deliver(chunk, stall).await,
            Delivery::Queued
        ));
    }
    let mut queued = Vec::new();
    for _ in 0..20 {
        queued.push(inbox.recv().await.expect("queued chunk"));
    }
    let pinned = queued.iter().filter(|b| within(b)).count();
    assert_eq!(pinned, PINNED_CHUNKS);
    assert!(queued
        .iter()
        .enumerate()
        .all(|(i, b)| b[..] == shared[i * 1024..(i + 1) * 1024]));
}

/// Many connections whose readers do not read: together they hold at
/// most the limit (plus one chunk each, the first, which a reader that
/// keeps up always gets); a reader that keeps up is never refused; bytes
/// taken out or dropped with a connection leave the count.
#[tokio::test]
async fn held_bytes_over_all_connections_stay_within_the_limit() {
    let cost = 1024 + CHUNK_COST;
    let held = Held::new(10 * cost);
    let stall = std::time::Duration::from_secs(1);
    let chunk = Bytes::from(vec![7u8; 1024]);
    let mut conns: Vec<_> = (0..8)
        .map(|_| connection(true, CancellationToken::new(), Some(held.clone())))
        .collect();
    let mut over = 0;
    for _ in 0..4 {
        for (entry, _) in &conns {
            match entry.deliver(chunk.clone(), stall).await {
                Delivery::Queued => {}
                Delivery::OverLimit => over += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(held.bytes() <= 10 * cost, "{} held", held.bytes());
    assert_eq!(over, 32 - 10);
    // A reader that keeps up: its queue is empty, so it is served even
    // at the limit.
    let (entry, inbox) = &mut conns[0];
    while entry.tx.queued() > 0 {
        inbox.recv().await.unwrap();
    }
    for _ in 0..100 {
        assert_eq!(entry.deliver(chunk.clone(), stall).await, Delivery::Queued);
        inbox.recv().await.unwrap();
    }
    // A chunk handed on with its share still counts until dropped.
    entry.deliver(chunk.clone(), stall).await;
    let before = held.bytes();
    let (_, share) = inbox.recv_held().await.unwrap();
    assert_eq!(held.bytes(), before);
    drop(share);
    assert_eq!(held.bytes(), before - cost);
    // Dropping the connections gives back what they held.
    conns.clear();
    assert_eq!(held.bytes(), 0);
}

/// With flow control, a queue of many small chunks never holds up the
/// caller (the shared stream): it takes them at once up to
/// `QUEUE_BYTES`, counting each chunk's cost, then says the connection
/// is stalled, at once. Taking chunks out makes room again.
#[tokio::test(start_paused = true)]
async fn a_queue_of_small_chunks_is_bounded_in_bytes_and_never_waits() {
    let (entry, mut inbox) = connection(true, CancellationToken::new(), None);
    let stall = std::time::Duration::from_secs(5);
    let start = tokio::time::Instant::now();
    let tiny = Bytes::from_static(b"log line\n");
    let fits = QUEUE_BYTES / (tiny.len() + CHUNK_COST);
    for _ in 0..fits {
        assert_eq!(entry.deliver(tiny.clone(), stall).await, Delivery::Queued);
    }
    assert!(fits > QUEUE_PACKETS * 10);
    assert_eq!(entry.deliver(tiny.clone(), stall).await, Delivery::Stalled);
    assert_eq!(start.elapsed(), std::time::Duration::ZERO, "deliver waited");
    inbox.recv().await.unwrap();
    assert_eq!(entry.deliver(tiny.clone(), stall).await, Delivery::Queued);
}

#[tokio::test]
async fn unlimited_credit_never_waits() {
    let c = Credit::unlimited();
    c.consume(1 << 40);
    assert_eq!(c.wait(7).await, 7);
    assert!(!c.is_limited());
}

#[test]
fn grants_are_batched_to_a_quarter_window() {
    let mut g = Grants::default();
    assert_eq!(g.written((WINDOW / 8) as usize), None);
    assert_eq!(g.written((WINDOW / 8) as usize), Some(WINDOW / 4));
    assert_eq!(g.written(1), None);
}

#[tokio::test]
async fn relay_moves_bytes_within_credit() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    let expect = data.clone();
    tokio::spawn(async move {
        b.write_all(&data).await.unwrap();
    });
    let credit = Credit::new(100_000);
    let mut got = Vec::new();
    let mut chunks = 0;
    // Never grant: the reader must stop after 100_000 bytes.
    let res = tokio::time::timeout(std::time::Duration::from_millis(200), async {
        socket_to_tunnel(Buffered(a), &credit, |c| {
            got.extend_from_slice(&c);
            chunks += 1;
            async { true }
        })
        .await
    })
    .await;
    assert!(res.is_err(), "should be waiting for credit");
    assert_eq!(got.len(), 100_000);
    assert_eq!(&got[..], &expect[..100_000]);
    assert!(chunks >= 2);
}
