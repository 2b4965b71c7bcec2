//! Per-connection send credit (the `WINDOW` extension): the sender's
//! [`Credit`] and the receiver's batched [`Grants`].

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::WINDOW;

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
