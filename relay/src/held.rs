//! The bytes a process holds for readers that have not taken them yet, over
//! all its connections, against `--max-buffered-bytes`.

use std::sync::Arc;

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

    pub(crate) fn over(&self, more: usize) -> bool {
        self.limit != 0 && self.bytes() + more > self.limit
    }

    pub(crate) fn hold(self: &Arc<Self>, n: usize) -> Hold {
        self.bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Hold(Some((self.clone(), n)))
    }
}

/// A chunk in a connection's queue: its cost there, given back when it
/// leaves, and its share of the [`Held`] count, which goes on with it.
#[derive(Debug)]
pub struct Queued {
    pub(crate) hold: Hold,
    pub(crate) bytes: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) cost: usize,
}

impl Queued {
    /// The chunk leaves the queue; its share of the held count goes on.
    pub(crate) fn taken(mut self) -> Hold {
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
