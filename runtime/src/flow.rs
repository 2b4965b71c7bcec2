//! Moving one connection's bytes between a socket and the tunnel, with
//! per-connection credit so that one slow reader cannot stall a shared stream.
//!
//! The reference protocol multiplexes every connection of an agent on one gRPC
//! stream without flow control, so a receiver either buffers without limit or
//! blocks the whole stream. When both ends are ours they negotiate the
//! `window-v1` feature: each connection starts with [`WINDOW`] bytes of credit
//! in each direction, the sender stops reading its socket when the credit is
//! spent, and the receiver grants credit back (`WINDOW` packets) as it writes
//! bytes out. The receiver's queue therefore never holds more than one window
//! and never blocks the shared stream. With a reference peer there is no
//! credit ([`Credit::unlimited`]) and the receiver's bounded queue plus a stall
//! timeout decide (see the server and agent docs).

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::queue;

/// Initial credit per connection and direction, in bytes.
pub const WINDOW: i64 = 1 << 20;
/// Largest read from a socket, so the largest `DATA` we produce.
pub const READ_CHUNK: usize = 128 * 1024;
/// First read size; reads grow towards [`READ_CHUNK`] while they come back
/// full, so an idle connection holds a small buffer and a busy one large reads.
pub const FIRST_READ: usize = 8 * 1024;
/// Packets a connection's inbound queue holds without flow control (bytes
/// are bounded by `QUEUE_PACKETS * max message size` then).
pub const QUEUE_PACKETS: usize = 64;
/// With flow control, what a connection's inbound queue may hold, counting
/// [`CHUNK_COST`] per chunk on top of its bytes: two windows. A correct peer
/// stays within one window; a reader that is this far behind (or a peer
/// that ignores its credit) gets the connection closed, never the shared
/// stream held up.
pub const QUEUE_BYTES: usize = 2 * WINDOW as usize;
/// What one queued chunk costs besides its bytes (queue slot, buffer
/// header), so that many tiny chunks count for what they take.
pub const CHUNK_COST: usize = 128;
/// Queued chunks of one connection that may be slices of a shared buffer.
/// A chunk decoded from the shared stream is a slice of that stream's read
/// buffer and keeps all of it alive; once a connection's writer is this far
/// behind, later chunks are copied into their own buffers, so a stalled
/// connection pins at most this many read buffers.
pub const PINNED_CHUNKS: usize = 8;

/// Send credit of one connection in one direction.
#[derive(Debug)]
pub struct Credit {
    /// `None` = unlimited (peer without flow control).
    avail: Option<Mutex<i64>>,
    notify: Notify,
}

impl Credit {
    /// Credit of `initial` bytes.
    pub fn new(initial: i64) -> Self {
        Self {
            avail: Some(Mutex::new(initial)),
            notify: Notify::new(),
        }
    }

    /// No limit: the peer does not speak `window-v1`.
    pub fn unlimited() -> Self {
        Self {
            avail: None,
            notify: Notify::new(),
        }
    }

    /// Waits until some credit is available and returns how much (capped at
    /// `max`). Unlimited credit returns `max` at once.
    pub async fn wait(&self, max: usize) -> usize {
        let Some(avail) = &self.avail else {
            return max;
        };
        loop {
            let notified = self.notify.notified();
            {
                let a = *avail.lock().unwrap_or_else(|e| e.into_inner());
                if a > 0 {
                    return (a as usize).min(max);
                }
            }
            notified.await;
        }
    }

    /// Spends `n` bytes. Credit may go negative when a peer's message was larger
    /// than the credit left (a frontend writes whole messages); sending then
    /// waits until grants bring it back above zero.
    pub fn consume(&self, n: usize) {
        if let Some(avail) = &self.avail {
            *avail.lock().unwrap_or_else(|e| e.into_inner()) -= n as i64;
        }
    }

    /// Adds `n` bytes granted by the receiver.
    pub fn grant(&self, n: i64) {
        if let Some(avail) = &self.avail {
            let mut a = avail.lock().unwrap_or_else(|e| e.into_inner());
            *a = a.saturating_add(n);
        }
        self.notify.notify_waiters();
    }

    /// Is this credit limited (flow control on)?
    pub fn is_limited(&self) -> bool {
        self.avail.is_some()
    }
}

/// Receiver side: counts bytes written out and says when to grant them back,
/// batching grants to a quarter window.
#[derive(Debug, Default)]
pub struct Grants {
    unacked: i64,
}

impl Grants {
    /// Records `n` bytes written; returns a grant to send when one is due.
    pub fn written(&mut self, n: usize) -> Option<i64> {
        self.unacked += n as i64;
        if self.unacked >= WINDOW / 4 {
            Some(std::mem::take(&mut self.unacked))
        } else {
            None
        }
    }
}

/// The read side of a relayed socket. Sockets with readiness (TCP and Unix
/// stream halves) wait for data *before* a buffer is allocated, so an idle
/// connection holds no read buffer at all; other readers (TLS) hold one while
/// they wait.
pub trait ChunkReader: Send {
    /// Reads at most `max` bytes into a new buffer; an empty result is EOF.
    fn read_chunk(&mut self, max: usize) -> impl Future<Output = io::Result<Bytes>> + Send;
}

macro_rules! ready_then_read {
    ($($t:ty),*) => {$(
        impl ChunkReader for $t {
            async fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
                loop {
                    self.readable().await?;
                    let mut buf = BytesMut::with_capacity(max);
                    match self.try_read_buf(&mut buf) {
                        Ok(_) => return Ok(buf.freeze()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    )*};
}
ready_then_read!(
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::unix::OwnedReadHalf
);

/// Any [`AsyncRead`] as a [`ChunkReader`] that waits with its buffer allocated.
#[derive(Debug)]
pub struct Buffered<R>(pub R);

impl<R: AsyncRead + Unpin + Send> ChunkReader for Buffered<R> {
    async fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        let mut buf = BytesMut::with_capacity(max);
        self.0.read_buf(&mut buf).await?;
        Ok(buf.freeze())
    }
}

/// Reads `reader` until EOF, handing each chunk to `send` while respecting
/// `credit`. Stops early, without error, when `send` returns false (the tunnel
/// side is gone). Returns the bytes read.
///
/// Read sizes adapt: they double (up to [`READ_CHUNK`]) while reads come back
/// full and halve (down to [`FIRST_READ`]) when they come back mostly empty.
pub async fn socket_to_tunnel<R, F, Fut>(
    mut reader: R,
    credit: &Credit,
    mut send: F,
) -> io::Result<u64>
where
    R: ChunkReader,
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut total = 0u64;
    let mut want = FIRST_READ;
    loop {
        let allowed = credit.wait(want).await;
        let mut chunk = reader.read_chunk(allowed).await?;
        let n = chunk.len();
        if n == 0 {
            return Ok(total);
        }
        if n < allowed / 4 {
            // Do not pin a mostly empty read buffer while the chunk waits in
            // queues: a small copy instead.
            chunk = Bytes::copy_from_slice(&chunk);
        }
        if n == allowed && want < READ_CHUNK {
            want *= 2;
        } else if n < want / 4 && want > FIRST_READ {
            want /= 2;
        }
        total += n as u64;
        credit.consume(n);
        if !send(chunk).await {
            return Ok(total);
        }
    }
}

/// What became of a chunk handed to a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued for the socket.
    Queued,
    /// The connection is already gone; the chunk is dropped.
    Gone,
    /// The queue stayed full for the whole stall timeout (without flow
    /// control), or holds [`QUEUE_BYTES`] (with it): the caller closes this
    /// connection (and only this one).
    Stalled,
    /// The process holds its limit of bytes for slow readers and this
    /// connection's reader is behind (it has chunks waiting): the caller
    /// closes this connection; the chunk is dropped.
    OverLimit,
}

/// Bytes of tunnelled data a process holds for readers that have not taken
/// them yet, over all its connections, against a limit. Each window bounds
/// one connection, but not how many connections a peer opens and leaves
/// unread; this bounds the sum.
#[derive(Debug)]
pub struct Held {
    bytes: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl Held {
    /// A counter with `limit` bytes (0: no limit).
    pub fn new(limit: usize) -> Arc<Held> {
        Arc::new(Held {
            bytes: Default::default(),
            limit,
        })
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The limit (0: none).
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn over(&self, more: usize) -> bool {
        self.limit != 0 && self.bytes() + more > self.limit
    }

    fn hold(self: &Arc<Self>, n: usize) -> Hold {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Hold(Some((self.clone(), n)))
    }
}

/// A chunk in a connection's queue: its cost there, given back when it
/// leaves, and its share of the [`Held`] count, which goes on with it.
#[derive(Debug)]
pub struct Queued {
    hold: Hold,
    bytes: Arc<std::sync::atomic::AtomicUsize>,
    cost: usize,
}

impl Queued {
    /// The chunk leaves the queue; its share of the held count goes on.
    fn taken(mut self) -> Hold {
        std::mem::take(&mut self.hold)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.bytes
            .fetch_sub(self.cost, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One chunk's share of a [`Held`] count, given back when dropped: it
/// travels with the chunk until the chunk is handed to the transport.
#[derive(Debug, Default)]
pub struct Hold(Option<(Arc<Held>, usize)>);

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some((held, n)) = self.0.take() {
            held.bytes
                .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// What the admin endpoint shows about one dial or connection; both sides
/// keep one per connection.
#[derive(Debug)]
pub struct ConnInfo {
    /// `host:port` asked for.
    pub destination: String,
    /// Who asked: on the server the frontend (`grpc`, `http-connect`), on the
    /// agent the server's id.
    pub origin: String,
    /// When the dial began.
    pub started: std::time::Instant,
    /// Bytes this side sent into the tunnel.
    pub to_tunnel: std::sync::atomic::AtomicU64,
    /// Bytes from the tunnel delivered to this side's socket.
    pub from_tunnel: std::sync::atomic::AtomicU64,
}

impl ConnInfo {
    /// A new record, started now.
    pub fn new(destination: &str, origin: &str) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            destination: destination.to_string(),
            origin: origin.to_string(),
            started: std::time::Instant::now(),
            to_tunnel: Default::default(),
            from_tunnel: Default::default(),
        })
    }

    /// Counts bytes sent into the tunnel.
    pub fn sent(&self, n: u64) {
        self.to_tunnel
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts bytes delivered from the tunnel.
    pub fn delivered(&self, n: u64) {
        self.from_tunnel
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// When a shared stream opened and when its peer last sent a packet (the
/// admin endpoint's `age_seconds` and `last_packet_seconds_ago`); one store
/// per packet. On tokio's clock, so the heartbeat watchdogs built on it are
/// tested in paused time.
#[derive(Debug)]
pub struct Liveness {
    /// When the stream opened (wall clock, for display).
    pub connected_at: std::time::SystemTime,
    started: tokio::time::Instant,
    /// Milliseconds after `started` of the last packet.
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            connected_at: std::time::SystemTime::now(),
            started: tokio::time::Instant::now(),
            last_ms: Default::default(),
        }
    }
}

impl Liveness {
    /// Notes that a packet arrived now.
    pub fn seen(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the last packet (or since the stream opened, if none
    /// came yet).
    pub fn since_last(&self) -> std::time::Duration {
        let at = std::time::Duration::from_millis(
            self.last_ms.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.started.elapsed().saturating_sub(at)
    }

    /// How long the stream has been up.
    pub fn age(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

/// A connection-table entry: the connection and what diagnostics show of it.
#[derive(Debug, Clone)]
pub struct Slot {
    /// The connection.
    pub conn: ConnEntry,
    /// Its record.
    pub info: Arc<ConnInfo>,
}

/// The shared-stream side of one tunnelled connection, kept in the stream's
/// connection table: where its inbound chunks go, its send credit (topped up
/// by the peer's `WINDOW` grants) and its kill switch.
#[derive(Debug, Clone)]
pub struct ConnEntry {
    /// The connection's inbound queue.
    pub tx: queue::Sender<(Bytes, Queued)>,
    /// Credit for bytes this side sends on the connection.
    pub credit: Arc<Credit>,
    /// Cancelled to end the connection from the shared stream's side.
    pub kill: CancellationToken,
    /// The process's count of bytes held for slow readers, if it keeps one.
    held: Option<Arc<Held>>,
    /// Bytes (and chunk costs) in the queue now.
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
}

impl ConnEntry {
    /// Hands `data` to the connection's bounded queue from the task that reads
    /// the shared stream. A free slot is taken at once; a full queue holds the
    /// shared stream for at most `stall` (this only happens with a peer that
    /// has no flow control), after which the connection is declared stalled.
    /// With a [`Held`] count at its limit, a connection that is behind is
    /// declared over the limit instead of queueing more.
    pub async fn deliver(&self, data: Bytes, stall: std::time::Duration) -> Delivery {
        use std::sync::atomic::Ordering::Relaxed;
        let queued = self.tx.queued();
        let cost = data.len() + CHUNK_COST;
        // Limited credit means flow control: the queue is bounded in bytes.
        if self.credit.is_limited() && self.queued_bytes.load(Relaxed) + cost > QUEUE_BYTES {
            return Delivery::Stalled;
        }
        let hold = match &self.held {
            Some(held) if queued > 0 && held.over(cost) => return Delivery::OverLimit,
            Some(held) => held.hold(cost),
            None => Hold::default(),
        };
        let hold = Queued {
            hold,
            bytes: self.queued_bytes.clone(),
            cost,
        };
        self.queued_bytes.fetch_add(cost, Relaxed);
        let data = if queued >= PINNED_CHUNKS {
            Bytes::copy_from_slice(&data)
        } else {
            data
        };
        let data = match self.tx.try_send((data, hold)) {
            Ok(()) => return Delivery::Queued,
            Err(queue::TrySendError::Closed(_)) => return Delivery::Gone,
            Err(queue::TrySendError::Full(d)) => d,
        };
        tokio::select! {
            r = tokio::time::timeout(stall, self.tx.send(data)) => match r {
                Ok(Ok(())) => Delivery::Queued,
                Ok(Err(_)) => Delivery::Gone,
                Err(_) => Delivery::Stalled,
            },
            _ = self.kill.cancelled() => Delivery::Gone,
        }
    }
}

/// The connection's own side of its inbound queue: chunks until the queue ends
/// or the connection is killed, and the `WINDOW` grants owed as bytes go out.
#[derive(Debug)]
pub struct ConnInbox {
    rx: queue::Receiver<(Bytes, Queued)>,
    kill: CancellationToken,
    /// `None` without flow control: nothing is ever granted.
    grants: Option<Grants>,
}

impl ConnInbox {
    /// The next chunk, or `None` once the connection is closed or killed.
    /// The chunk no longer counts as held.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.recv_held().await.map(|(data, _)| data)
    }

    /// The next chunk with its share of the held count, for a relay that
    /// queues it again before the transport takes it.
    pub async fn recv_held(&mut self) -> Option<(Bytes, Hold)> {
        let (data, queued) = tokio::select! {
            biased;
            d = self.rx.recv() => d?,
            _ = self.kill.cancelled() => return None,
        };
        Some((data, queued.taken()))
    }

    /// Records `n` bytes written out; returns a grant to send when one is due.
    pub fn written(&mut self, n: usize) -> Option<i64> {
        self.grants.as_mut()?.written(n)
    }
}

/// A new connection's two sides: a bounded queue of [`QUEUE_PACKETS`], one
/// window of credit when `flow_control` is negotiated (unlimited otherwise),
/// `kill` to end it, and the process's [`Held`] count if it keeps one.
pub fn connection(
    flow_control: bool,
    kill: CancellationToken,
    held: Option<Arc<Held>>,
) -> (ConnEntry, ConnInbox) {
    // With credit the window bounds the queue (in bytes, `QUEUE_BYTES`), so
    // a queue of many small chunks never holds up the shared stream; without
    // it, `QUEUE_PACKETS` and the stall timeout do.
    let cap = if flow_control {
        usize::MAX
    } else {
        QUEUE_PACKETS
    };
    let (tx, rx) = queue::queue(cap);
    let queued_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let credit = Arc::new(if flow_control {
        Credit::new(WINDOW)
    } else {
        Credit::unlimited()
    });
    let entry = ConnEntry {
        tx,
        credit,
        kill: kill.clone(),
        held,
        queued_bytes,
    };
    let inbox = ConnInbox {
        rx,
        kill,
        grants: flow_control.then(Grants::default),
    };
    (entry, inbox)
}

/// The receiving side of one tunnelled connection, as a relay sees it.
pub trait Inbound {
    /// The next chunk, or `None` once the connection is closed.
    fn recv(&mut self) -> impl Future<Output = Option<Bytes>> + Send;
    /// `n` bytes were written out: count them, grant credit back.
    fn delivered(&mut self, n: usize) -> impl Future<Output = ()> + Send;
}

/// Writes every chunk from `inbound` to `writer` until the connection closes,
/// reporting each written chunk, then shuts the writer down. Returns the bytes
/// written.
pub async fn tunnel_to_socket<I, W>(inbound: &mut I, mut writer: W) -> io::Result<u64>
where
    I: Inbound,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    while let Some(chunk) = inbound.recv().await {
        writer.write_all(&chunk).await?;
        total += chunk.len() as u64;
        inbound.delivered(chunk.len()).await;
    }
    writer.shutdown().await.ok();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
