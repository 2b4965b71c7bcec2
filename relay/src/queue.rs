//! A bounded queue for per-connection state: a connection's inbound chunks
//! (the task that reads a shared stream pushes, the connection's writer pops),
//! a frontend stream's outgoing packets.
//!
//! It behaves like a bounded `tokio::sync::mpsc` channel, with one difference
//! that matters at 10,000 connections: it allocates nothing until an item is
//! queued and gives its storage back when it drains, so an idle connection
//! costs a few words instead of a channel block (32 slots, 1-3 KiB).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Storage kept across drains; larger rings are freed when the queue empties.
const KEEP_SLOTS: usize = 4;

#[derive(Debug)]
struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver: a chunk arrived or the last sender left.
    readable: Notify,
    /// Wakes senders: a slot freed up or the receiver left.
    writable: Notify,
    cap: usize,
}

#[derive(Debug)]
struct State<T> {
    items: VecDeque<T>,
    senders: usize,
    rx_closed: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a chunk was not queued; the chunk comes back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    /// The queue holds `cap` items.
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

/// Creates a queue that holds at most `cap` chunks (at least one).
pub fn queue<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            rx_closed: false,
        }),
        readable: Notify::new(),
        writable: Notify::new(),
        cap: cap.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// Pushing side; clones share the queue.
#[derive(Debug)]
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut st = self.shared.lock();
            st.senders -= 1;
            st.senders == 0
        };
        if last {
            self.shared.readable.notify_one();
        }
    }
}

impl<T> Sender<T> {
    /// Items queued now (a snapshot).
    pub fn queued(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// Queues `data` if there is room, without waiting.
    pub fn try_send(&self, data: T) -> Result<(), TrySendError<T>> {
        {
            let mut st = self.shared.lock();
            if st.rx_closed {
                return Err(TrySendError::Closed(data));
            }
            if st.items.len() >= self.shared.cap {
                return Err(TrySendError::Full(data));
            }
            st.items.push_back(data);
        }
        self.shared.readable.notify_one();
        Ok(())
    }

    /// Queues `data`, waiting for room. Gives it back if the receiver is gone.
    pub async fn send(&self, mut data: T) -> Result<(), T> {
        loop {
            let notified = self.shared.writable.notified();
            tokio::pin!(notified);
            // Registered before the check, so a slot freed in between wakes us.
            notified.as_mut().enable();
            match self.try_send(data) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(d)) => return Err(d),
                Err(TrySendError::Full(d)) => data = d,
            }
            notified.await;
        }
    }
}

/// Popping side.
#[derive(Debug)]
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next chunk; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            // `notify_one` leaves a permit when we are not waiting yet.
            let notified = self.shared.readable.notified();
            {
                let mut st = self.shared.lock();
                let was_full = st.items.len() >= self.shared.cap;
                if let Some(d) = st.items.pop_front() {
                    if st.items.is_empty() && st.items.capacity() > KEEP_SLOTS {
                        st.items = VecDeque::new();
                    }
                    drop(st);
                    if was_full {
                        self.shared.writable.notify_waiters();
                    }
                    return Some(d);
                }
                if st.senders == 0 {
                    return None;
                }
            }
            notified.await;
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let left = {
            let mut st = self.shared.lock();
            st.rx_closed = true;
            std::mem::take(&mut st.items)
        };
        // Dropped outside the lock: an item's own `Drop` may use the queue.
        drop(left);
        self.shared.writable.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn bounded_in_order_and_ends_with_the_last_sender() {
        let (tx, mut rx) = queue(2);
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        tx.try_send(Bytes::from_static(b"b")).unwrap();
        assert_eq!(
            tx.try_send(Bytes::from_static(b"c")),
            Err(TrySendError::Full(Bytes::from_static(b"c")))
        );
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { tx2.send(Bytes::from_static(b"c")).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a full queue makes send wait");
        assert_eq!(rx.recv().await.unwrap(), "a");
        waiter.await.unwrap().unwrap();
        assert_eq!(rx.recv().await.unwrap(), "b");
        assert_eq!(rx.recv().await.unwrap(), "c");
        let pending = tokio::spawn(async move { rx.recv().await });
        tokio::task::yield_now().await;
        assert!(!pending.is_finished(), "waits while a sender lives");
        drop(tx);
        assert_eq!(pending.await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_gone_receiver_refuses_and_wakes_waiting_senders() {
        let (tx, rx) = queue(1);
        tx.try_send(Bytes::from_static(b"a")).unwrap();
        let tx2 = tx.clone();
        let waiter = tokio::spawn(async move { tx2.send(Bytes::from_static(b"b")).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(waiter.await.unwrap(), Err(Bytes::from_static(b"b")));
        assert!(matches!(
            tx.try_send(Bytes::new()),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_senders_on_two_threads_lose_nothing_and_keep_order() {
        const SENDERS: u8 = 8;
        const EACH: u32 = 5_000;
        let (tx, mut rx) = queue(4);
        let mut tasks = Vec::new();
        for s in 0..SENDERS {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..EACH {
                    let mut b = vec![s];
                    b.extend_from_slice(&i.to_be_bytes());
                    if i % 2 == 0 {
                        tx.send(Bytes::from(b)).await.unwrap();
                    } else {
                        // The other path: try first, wait only when full.
                        match tx.try_send(Bytes::from(b)) {
                            Ok(()) => {}
                            Err(TrySendError::Full(b)) => tx.send(b).await.unwrap(),
                            Err(TrySendError::Closed(_)) => panic!("receiver alive"),
                        }
                    }
                }
            }));
        }
        drop(tx);
        let mut next = [0u32; SENDERS as usize];
        while let Some(b) = rx.recv().await {
            let s = b[0] as usize;
            let i = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
            assert_eq!(i, next[s], "sender {s} out of order");
            next[s] += 1;
        }
        assert!(next.iter().all(|&n| n == EACH), "all delivered: {next:?}");
        for t in tasks {
            t.await.unwrap();
        }
    }

    #[tokio::test]
    async fn storage_is_given_back_when_drained() {
        let (tx, mut rx) = queue(64);
        for _ in 0..32 {
            tx.try_send(Bytes::from_static(b"x")).unwrap();
        }
        assert!(rx.shared.lock().items.capacity() >= 32);
        for _ in 0..32 {
            rx.recv().await.unwrap();
        }
        assert_eq!(rx.shared.lock().items.capacity(), 0);
    }
}
