//! The per-stream dial/connection table and the recently-closed set, driven
//! by an arbitrary sequence of what peers can make a link do (dials, answers,
//! cancels, closes for any ids), checked against a plain model: same answers,
//! limits never exceeded, a dial answered at most once.
#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};

use konnectivity_link::{RecentlyClosed, Table};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

const MAX_PENDING: usize = 8;
const MAX_CONNS: usize = 6;
const RECENT: usize = 5;

#[derive(Arbitrary, Debug)]
enum Op {
    /// DIAL_REQ with this id.
    Dial(u8),
    /// DIAL_RSP for this dial: connected as `connect_id`, or failed.
    Answer {
        random: u8,
        connect_id: u8,
        ok: bool,
    },
    /// DIAL_CLS for this dial.
    Cancel(u8),
    /// CLOSE_REQ / CLOSE_RSP for this connection.
    Close(u8),
    /// DATA or WINDOW for this connection.
    Data(u8),
    /// The stream ended.
    Drain,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut table: Table<u32, u32> = Table::new(MAX_PENDING, MAX_CONNS);
    let mut recent = RecentlyClosed::new(RECENT);
    let mut m_pending: HashMap<i64, u32> = HashMap::new();
    let mut m_conns: HashMap<i64, u32> = HashMap::new();
    let mut m_recent: VecDeque<i64> = VecDeque::new();
    let mut answered: HashSet<u32> = HashSet::new();
    // Drained: the stream ended and the table takes nothing new.
    let mut m_ended = false;
    let mut next = 0u32;
    let close = |id: i64, recent: &mut RecentlyClosed, m_recent: &mut VecDeque<i64>| {
        recent.insert(id);
        if !m_recent.contains(&id) {
            if m_recent.len() == RECENT {
                m_recent.pop_front();
            }
            m_recent.push_back(id);
        }
    };
    for op in ops {
        match op {
            Op::Dial(r) => {
                let r = r as i64;
                next += 1;
                let ok = table.add_pending(r, next).is_ok();
                let m_ok = !m_ended && !m_pending.contains_key(&r) && m_pending.len() < MAX_PENDING;
                assert_eq!(ok, m_ok);
                if m_ok {
                    m_pending.insert(r, next);
                }
            }
            Op::Answer {
                random,
                connect_id,
                ok,
            } => {
                let (r, c) = (random as i64, connect_id as i64);
                let taken = table.take_pending(r);
                assert_eq!(taken.as_ref().map(|p| p.value), m_pending.remove(&r));
                let Some(p) = taken else { continue };
                assert!(answered.insert(p.value), "dial {} answered twice", p.value);
                if !ok {
                    continue;
                }
                let v = p.value;
                let res = table.establish(p, c, v);
                let m_ok =
                    !m_ended && c != 0 && !m_conns.contains_key(&c) && m_conns.len() < MAX_CONNS;
                assert_eq!(res.is_ok(), m_ok);
                if m_ok {
                    m_conns.insert(c, v);
                }
            }
            Op::Cancel(r) => {
                let r = r as i64;
                let taken = table.take_pending(r).map(|p| p.value);
                assert_eq!(taken, m_pending.remove(&r));
                if let Some(v) = taken {
                    assert!(answered.insert(v));
                }
            }
            Op::Close(c) => {
                let c = c as i64;
                assert_eq!(table.remove_conn(c), m_conns.remove(&c));
                close(c, &mut recent, &mut m_recent);
            }
            Op::Data(c) => {
                let c = c as i64;
                assert_eq!(table.conn(c).copied(), m_conns.get(&c).copied());
                assert_eq!(recent.contains(c), m_recent.contains(&c));
                if !table.has_conn(c) && !recent.contains(c) {
                    // An unknown id is answered with a close and remembered.
                    close(c, &mut recent, &mut m_recent);
                }
            }
            Op::Drain => {
                let (pending, conns) = table.drain();
                assert_eq!(pending.len(), m_pending.len());
                assert_eq!(conns.len(), m_conns.len());
                for p in pending {
                    assert!(answered.insert(p.value));
                }
                m_pending.clear();
                m_conns.clear();
                m_ended = true;
            }
        }
        assert!(table.pending_len() <= MAX_PENDING && table.conns_len() <= MAX_CONNS);
        assert_eq!(table.pending_len(), m_pending.len());
        assert_eq!(table.conns_len(), m_conns.len());
        assert!(recent.len() <= RECENT);
        assert_eq!(recent.len(), m_recent.len());
    }
});
