//! One tunnelled connection's two sides: the entry the shared stream's
//! reader delivers to (bounded queue, credit, kill switch) and the inbox the
//! connection's writer takes from.

use std::sync::Arc;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::queue;
use crate::{
    ConnInfo, Credit, Grants, Held, Hold, Queued, CHUNK_COST, PINNED_CHUNKS, QUEUE_BYTES,
    QUEUE_PACKETS, WINDOW,
};

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
