//! Control packets (`CLOSE_REQ`, `DIAL_CLS`) sent from places that cannot
//! wait for room towards the agent (a `Drop`): a bounded overflow list,
//! flushed in order by one task at a time.

use std::collections::VecDeque;
use std::sync::Arc;

use konnectivity_proto::Packet;
use tokio::sync::mpsc;
use tracing::warn;

use super::AgentLink;

/// Control packets that may wait for room towards one agent.
pub const LATER_MAX: usize = 4096;

/// Control packets waiting for room, and whether a task is flushing them.
#[derive(Default)]
pub(super) struct Later {
    packets: VecDeque<Packet>,
    flushing: bool,
}

impl AgentLink {
    /// Queues a control packet (`CLOSE_REQ`, `DIAL_CLS`) from a context that
    /// cannot wait (a `Drop`). When the queue towards the agent is full the
    /// packet waits in a bounded overflow list that one task at a time
    /// flushes, in order; past [`LATER_MAX`] packets the agent has not read
    /// for a long while and further ones are dropped (counted, and the
    /// stream's end cleans up everything anyway).
    pub fn send_later(self: &Arc<Self>, p: Packet) {
        let p = match self.out.try_send(p) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => return,
            Err(mpsc::error::TrySendError::Full(p)) => p,
        };
        let start = {
            let mut later = self.later.lock().unwrap_or_else(|e| e.into_inner());
            if later.packets.len() >= LATER_MAX {
                drop(later);
                self.settings.metrics.control_dropped.inc();
                warn!(
                    agent.id = %self.agent_id,
                    waiting = LATER_MAX,
                    "control packet dropped: the agent has not read its queue for a long while"
                );
                return;
            }
            later.packets.push_back(p);
            !std::mem::replace(&mut later.flushing, true)
        };
        if start {
            let link = self.clone();
            tokio::spawn(async move {
                loop {
                    let next = {
                        let mut later = link.later.lock().unwrap_or_else(|e| e.into_inner());
                        let next = later.packets.pop_front();
                        if next.is_none() {
                            later.flushing = false;
                        }
                        next
                    };
                    let Some(p) = next else { return };
                    if !link.send(p).await {
                        let mut later = link.later.lock().unwrap_or_else(|e| e.into_inner());
                        later.packets.clear();
                        later.flushing = false;
                        return;
                    }
                }
            });
        }
    }

    /// Control packets waiting for room in the queue towards the agent.
    pub fn waiting_control_packets(&self) -> usize {
        self.later
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .packets
            .len()
    }
}
