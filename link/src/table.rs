//! The dial/connection table of one link end: pending dials and open
//! connections, bounded, and the recently closed ids.
//!
//! A dial is *pending* from `DIAL_REQ` until its `DIAL_RSP` or `DIAL_CLS`; a
//! successful `DIAL_RSP` turns it into an *established* connection keyed by the
//! agent's `connectID`. The only way to establish a connection is to consume the
//! [`Pending`] value taken out of the table ([`Table::take_pending`] then
//! [`Table::establish`]), so a dial can never be answered twice. Both maps are
//! bounded; a full table refuses new dials instead of growing.

use std::collections::{HashMap, HashSet, VecDeque};

/// Why the table refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// A dial with this id is already pending on this stream.
    #[error("dial id {0} is already pending")]
    DuplicateDial(i64),
    /// The pending-dial limit was reached.
    #[error("too many pending dials (limit {0})")]
    TooManyPending(usize),
    /// The connection limit was reached.
    #[error("too many connections (limit {0})")]
    TooManyConnections(usize),
    /// The agent reused a connectID that is still open.
    #[error("connectID {0} is already in use")]
    DuplicateConnection(i64),
    /// connectID 0 means "no connection" and cannot be established.
    #[error("connectID 0 is not a connection")]
    ZeroConnectId,
    /// The stream ended: its table was drained and takes nothing new.
    #[error("the stream has ended")]
    Ended,
}

/// A pending dial taken out of the table, waiting to be established or failed.
#[derive(Debug)]
#[must_use = "a taken dial must be established or answered"]
pub struct Pending<P> {
    /// The dial id.
    pub random: i64,
    /// What the owner stored with the dial.
    pub value: P,
}

/// Pending dials (by dial id) and established connections (by connectID).
#[derive(Debug)]
pub struct Table<P, C> {
    pending: HashMap<i64, P>,
    conns: HashMap<i64, C>,
    max_pending: usize,
    max_conns: usize,
    highest: i64,
    /// Drained: the stream ended, nothing new comes in.
    ended: bool,
}

impl<P, C> Table<P, C> {
    /// An empty table with the given limits.
    pub fn new(max_pending: usize, max_conns: usize) -> Self {
        Self {
            pending: HashMap::new(),
            conns: HashMap::new(),
            max_pending,
            max_conns,
            highest: 0,
            ended: false,
        }
    }

    /// Records a dial as pending.
    pub fn add_pending(&mut self, random: i64, value: P) -> Result<(), TableError> {
        if self.ended {
            return Err(TableError::Ended);
        }
        if self.pending.contains_key(&random) {
            return Err(TableError::DuplicateDial(random));
        }
        if self.pending.len() >= self.max_pending {
            return Err(TableError::TooManyPending(self.max_pending));
        }
        self.pending.insert(random, value);
        Ok(())
    }

    /// Takes a pending dial out (on `DIAL_RSP` or `DIAL_CLS`). `None` when the
    /// dial is unknown or was already answered or cancelled.
    pub fn take_pending(&mut self, random: i64) -> Option<Pending<P>> {
        self.pending
            .remove(&random)
            .map(|value| Pending { random, value })
    }

    /// Turns a taken dial into an established connection, handing back the
    /// dial's value so the caller can answer it. On error the pending dial is
    /// handed back so the caller can fail it.
    pub fn establish(
        &mut self,
        pending: Pending<P>,
        connect_id: i64,
        conn: C,
    ) -> Result<P, (Pending<P>, TableError)> {
        if self.ended {
            return Err((pending, TableError::Ended));
        }
        if connect_id == 0 {
            return Err((pending, TableError::ZeroConnectId));
        }
        if self.conns.contains_key(&connect_id) {
            return Err((pending, TableError::DuplicateConnection(connect_id)));
        }
        if self.conns.len() >= self.max_conns {
            return Err((pending, TableError::TooManyConnections(self.max_conns)));
        }
        self.conns.insert(connect_id, conn);
        self.highest = self.highest.max(connect_id);
        Ok(pending.value)
    }

    /// The highest connectID ever established here (0 before the first).
    /// Agents hand out ids counting up from 1, so a packet for an id in
    /// `1..=highest` that is not open is most likely late for a connection
    /// that closed; one above it is for a connection that never existed.
    pub fn highest_conn(&self) -> i64 {
        self.highest
    }

    /// An established connection.
    pub fn conn(&self, connect_id: i64) -> Option<&C> {
        self.conns.get(&connect_id)
    }

    /// Is `connect_id` established?
    pub fn has_conn(&self, connect_id: i64) -> bool {
        self.conns.contains_key(&connect_id)
    }

    /// Removes an established connection (on close).
    pub fn remove_conn(&mut self, connect_id: i64) -> Option<C> {
        self.conns.remove(&connect_id)
    }

    /// Number of pending dials.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Number of established connections.
    pub fn conns_len(&self) -> usize {
        self.conns.len()
    }

    /// Every established connection (for diagnostics).
    pub fn conns(&self) -> impl Iterator<Item = (i64, &C)> {
        self.conns.iter().map(|(id, c)| (*id, c))
    }

    /// Every pending dial (for diagnostics).
    pub fn pending(&self) -> impl Iterator<Item = (i64, &P)> {
        self.pending.iter().map(|(id, p)| (*id, p))
    }

    /// Empties the table (the stream ended): every pending dial and connection,
    /// for the caller to fail and close. From now on it refuses new dials and
    /// connections ([`TableError::Ended`]): a dial registered after the
    /// stream's end would wait for an answer that never comes.
    pub fn drain(&mut self) -> (Vec<Pending<P>>, Vec<(i64, C)>) {
        self.ended = true;
        let pending = self
            .pending
            .drain()
            .map(|(random, value)| Pending { random, value })
            .collect();
        let conns = self.conns.drain().collect();
        (pending, conns)
    }
}

/// Connection ids closed recently, so late packets for them are dropped
/// quietly instead of answered as unknown. Bounded: the oldest id leaves when
/// a new one comes in at the cap, whatever a peer sends; lookups are O(1).
#[derive(Debug)]
pub struct RecentlyClosed {
    order: VecDeque<i64>,
    set: HashSet<i64>,
    cap: usize,
}

impl RecentlyClosed {
    /// An empty set holding at most `cap` ids (memory grows with use, up to
    /// the cap).
    pub fn new(cap: usize) -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            cap,
        }
    }

    /// Remembers `id`, forgetting the oldest at the cap.
    pub fn insert(&mut self, id: i64) {
        if self.cap == 0 || !self.set.insert(id) {
            return;
        }
        if self.order.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id);
    }

    /// Was `id` closed recently?
    pub fn contains(&self, id: i64) -> bool {
        self.set.contains(&id)
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// None remembered?
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dial_is_established_once_and_only_by_consuming_the_pending_value() {
        let mut t: Table<&str, &str> = Table::new(4, 4);
        t.add_pending(10, "frontend-a").unwrap();
        assert_eq!(
            t.add_pending(10, "again"),
            Err(TableError::DuplicateDial(10))
        );
        let p = t.take_pending(10).expect("pending");
        assert!(t.take_pending(10).is_none(), "answered twice");
        assert_eq!(t.establish(p, 1, "conn-a").unwrap(), "frontend-a");
        assert_eq!(t.conn(1), Some(&"conn-a"));
        assert_eq!(t.remove_conn(1), Some("conn-a"));
        assert!(!t.has_conn(1));
    }

    #[test]
    fn the_highest_established_id_is_remembered_after_it_closes() {
        let mut t: Table<(), ()> = Table::new(4, 4);
        assert_eq!(t.highest_conn(), 0);
        for (random, id) in [(1, 5), (2, 3)] {
            t.add_pending(random, ()).unwrap();
            let p = t.take_pending(random).unwrap();
            t.establish(p, id, ()).unwrap();
        }
        t.remove_conn(5);
        assert_eq!(t.highest_conn(), 5);
    }

    #[test]
    fn a_cancelled_dial_cannot_be_established_later() {
        let mut t: Table<(), ()> = Table::new(4, 4);
        t.add_pending(1, ()).unwrap();
        let _cancelled = t.take_pending(1).unwrap();
        // The late DIAL_RSP finds nothing: the caller must close connectID.
        assert!(t.take_pending(1).is_none());
    }

    #[test]
    fn limits_and_bad_ids_are_refused() {
        let mut t: Table<u8, u8> = Table::new(1, 1);
        t.add_pending(1, 1).unwrap();
        assert_eq!(t.add_pending(2, 2), Err(TableError::TooManyPending(1)));
        let p = t.take_pending(1).unwrap();
        let (p, e) = t.establish(p, 0, 0).unwrap_err();
        assert_eq!(e, TableError::ZeroConnectId);
        t.establish(p, 5, 5).unwrap();
        t.add_pending(2, 2).unwrap();
        let p = t.take_pending(2).unwrap();
        let (p, e) = t.establish(p, 5, 6).unwrap_err();
        assert_eq!(e, TableError::DuplicateConnection(5));
        let (_, e) = t.establish(p, 6, 6).unwrap_err();
        assert_eq!(e, TableError::TooManyConnections(1));
    }

    #[test]
    fn drain_returns_everything() {
        let mut t: Table<u8, u8> = Table::new(8, 8);
        t.add_pending(1, 1).unwrap();
        t.add_pending(2, 2).unwrap();
        let p = t.take_pending(2).unwrap();
        t.establish(p, 9, 9).unwrap();
        t.add_pending(3, 3).unwrap();
        let late = t.take_pending(3).unwrap();
        let (pending, conns) = t.drain();
        assert_eq!(pending.len(), 1);
        assert_eq!(conns, vec![(9, 9)]);
        assert_eq!(t.pending_len() + t.conns_len(), 0);
        // The stream has ended: a dial registered now would never be
        // answered, and a dial that connects now has no stream to use.
        assert_eq!(t.add_pending(4, 4), Err(TableError::Ended));
        let (_, e) = t.establish(late, 10, 10).unwrap_err();
        assert_eq!(e, TableError::Ended);
        assert_eq!(t.pending_len() + t.conns_len(), 0);
    }

    #[test]
    fn recently_closed_stays_bounded() {
        let mut r = RecentlyClosed::new(3);
        for id in 1..=100 {
            r.insert(id);
            r.insert(id); // a repeat does not take a second slot
        }
        assert_eq!(r.len(), 3);
        assert!(r.contains(100) && r.contains(98) && !r.contains(97));
    }
}
