//! The link state machine: a server end and an agent end driven against each
//! other, with packets in flight both ways, by an arbitrary sequence of what
//! their drivers may do (dial, give up, connect, fail, close, send bytes and
//! credit, heartbeat, drain, deliver the next packet) and, optionally,
//! arbitrary packets injected into either end.
//!
//! Always: no panic, tables and remembered ids within their limits, a dial
//! answered at most once, bytes and credit handed to the connection they
//! name. With only correct peers (nothing injected): neither end ever charges
//! the other a mistake, and once everything in flight is delivered and every
//! held dial connected, both ends hold the same connections and no dial.
#![no_main]

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use konnectivity_link::{Event, Link, Role, RECENT};
use konnectivity_proto::{packet, Message, Packet};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

const SERVER_PENDING: usize = 6;
const SERVER_CONNS: usize = 5;
const AGENT_PENDING: usize = 4;
const AGENT_CONNS: usize = 7;

#[derive(Arbitrary, Debug)]
enum Op {
    Dial,
    Abandon(u8),
    ServerClose(u8),
    AgentClose(u8),
    AgentConnect(u8),
    AgentFail(u8),
    ServerData(u8),
    AgentData(u8),
    ServerGrant(u8),
    AgentGrant(u8),
    Heartbeat,
    Drain,
    ToAgent,
    ToServer,
    Inject { to_agent: bool, bytes: Vec<u8> },
}

struct Ends {
    server: Link<(), i64>,
    agent: Link<(), ()>,
    to_agent: VecDeque<Packet>,
    to_server: VecDeque<Packet>,
    next_random: i64,
    answered: HashSet<i64>,
    mistakes: usize,
}

fn nth<P, C: Clone>(link: &Link<P, C>, k: u8, pending: bool) -> Option<i64> {
    let mut ids: Vec<i64> = if pending {
        link.table().pending().map(|(id, _)| id).collect()
    } else {
        link.table().conns().map(|(id, _)| id).collect()
    };
    ids.sort();
    (!ids.is_empty()).then(|| ids[k as usize % ids.len()])
}

fn within<C: Clone>(l: &Link<(), C>, pending: usize, conns: usize) {
    assert!(l.table().pending_len() <= pending);
    assert!(l.table().conns_len() <= conns);
    assert!(l.recently_closed() <= RECENT);
}

impl Ends {
    fn check(&self) {
        within(&self.server, SERVER_PENDING, SERVER_CONNS);
        within(&self.agent, AGENT_PENDING, AGENT_CONNS);
    }

    fn answer_once(&mut self, random: i64) {
        assert!(self.answered.insert(random), "dial {random} answered twice");
    }

    fn agent_receives(&mut self, p: Packet) {
        let Ok(m) = Message::from_packet(p) else { return };
        let r = self.agent.receive(m);
        self.mistakes += r.mistake.is_some() as usize;
        self.to_server.extend(r.reply);
        match r.event {
            Event::DialRequested { random, .. } => {
                if let Err(refusal) = self.agent.accept_dial(random, ()) {
                    self.to_server.push_back(refusal);
                }
            }
            Event::Data { connect_id, .. } => assert!(self.agent.table().has_conn(connect_id)),
            Event::Closed { connect_id, .. } => assert!(!self.agent.table().has_conn(connect_id)),
            Event::Grant { .. } | Event::DialClosed(_) | Event::Nothing => {}
            other => panic!("the agent's end was handed {other:?}"),
        }
    }

    fn server_receives(&mut self, p: Packet) {
        let Ok(m) = Message::from_packet(p) else { return };
        let r = self.server.receive(m);
        self.mistakes += r.mistake.is_some() as usize;
        self.to_agent.extend(r.reply);
        match r.event {
            Event::Answered { dial, connect_id } => {
                self.answer_once(dial.random);
                if let Err((_, _, close)) = self.server.establish(dial, connect_id, connect_id) {
                    self.to_agent.push_back(close);
                }
            }
            Event::DialFailed { dial, .. } => self.answer_once(dial.random),
            Event::DialClosed(dial) => self.answer_once(dial.random),
            Event::Data { connect_id, conn, .. } => assert_eq!(conn, connect_id),
            Event::Closed { connect_id, conn, .. } => assert_eq!(conn, connect_id),
            Event::Grant { .. } | Event::Drain | Event::Nothing => {}
            other => panic!("the server's end was handed {other:?}"),
        }
    }

    fn agent_connect(&mut self, random: i64) {
        let dial = self.agent.take_dial(random).expect("pending");
        match self.agent.connected(dial, ()) {
            Ok((id, (), answer)) => {
                assert!(id > 0 && self.agent.table().has_conn(id));
                self.to_server.push_back(answer);
            }
            Err(d) => self
                .to_server
                .push_back(packet::dial_failed(d.random, "too many connections")),
        }
    }

    fn step(&mut self, op: Op) -> bool {
        match op {
            Op::Dial => {
                self.next_random += 1;
                if let Ok(p) = self.server.dial("10.0.0.1:80", self.next_random, ()) {
                    self.to_agent.push_back(p);
                }
            }
            Op::Abandon(k) => {
                if let Some(r) = nth(&self.server, k, true) {
                    let (dial, cls) = self.server.abandon_dial(r).unwrap();
                    self.answer_once(dial.random);
                    self.to_agent.push_back(cls);
                }
            }
            Op::ServerClose(k) => {
                if let Some(id) = nth(&self.server, k, false) {
                    let (_, close) = self.server.close(id).unwrap();
                    self.to_agent.push_back(close);
                }
            }
            Op::AgentClose(k) => {
                if let Some(id) = nth(&self.agent, k, false) {
                    let (_, close) = self.agent.close(id).unwrap();
                    self.to_server.push_back(close);
                }
            }
            Op::AgentConnect(k) => {
                if let Some(r) = nth(&self.agent, k, true) {
                    self.agent_connect(r);
                }
            }
            Op::AgentFail(k) => {
                if let Some(r) = nth(&self.agent, k, true) {
                    let _failed = self.agent.take_dial(r).unwrap();
                    self.to_server
                        .push_back(packet::dial_failed(r, "dial tcp: connection refused"));
                }
            }
            Op::ServerData(k) | Op::ServerGrant(k) => {
                let data = matches!(op, Op::ServerData(_));
                if let Some(id) = nth(&self.server, k, false) {
                    self.to_agent.push_back(if data {
                        packet::data(id, Bytes::from_static(b"x"))
                    } else {
                        packet::window(id, 1)
                    });
                }
            }
            Op::AgentData(k) | Op::AgentGrant(k) => {
                let data = matches!(op, Op::AgentData(_));
                if let Some(id) = nth(&self.agent, k, false) {
                    self.to_server.push_back(if data {
                        packet::data(id, Bytes::from_static(b"x"))
                    } else {
                        packet::window(id, 1)
                    });
                }
            }
            Op::Heartbeat => self.to_agent.push_back(packet::window(0, 0)),
            Op::Drain => self.to_server.push_back(packet::drain()),
            Op::ToAgent => {
                if let Some(p) = self.to_agent.pop_front() {
                    self.agent_receives(p);
                }
            }
            Op::ToServer => {
                if let Some(p) = self.to_server.pop_front() {
                    self.server_receives(p);
                }
            }
            Op::Inject { to_agent, bytes } => {
                let Ok(p) = Packet::decode(bytes.as_slice()) else {
                    return false;
                };
                if to_agent {
                    self.agent_receives(p);
                } else {
                    self.server_receives(p);
                }
                return true;
            }
        }
        false
    }

    /// Delivers everything in flight and connects every held dial, until
    /// nothing moves.
    fn settle(&mut self) {
        loop {
            while let Some(p) = self.to_agent.pop_front() {
                self.agent_receives(p);
            }
            while let Some(p) = self.to_server.pop_front() {
                self.server_receives(p);
            }
            if let Some(r) = nth(&self.agent, 0, true) {
                self.agent_connect(r);
            } else if self.to_agent.is_empty() {
                return;
            }
            self.check();
        }
    }
}

fn open<C: Clone>(l: &Link<(), C>) -> Vec<i64> {
    let mut ids: Vec<i64> = l.table().conns().map(|(id, _)| id).collect();
    ids.sort();
    ids
}

fuzz_target!(|ops: Vec<Op>| {
    // Fewer operations than remembered ids: with correct peers nothing in
    // flight can outlive its end's memory of it.
    if ops.len() >= RECENT {
        return;
    }
    let mut e = Ends {
        server: Link::new(Role::Server, SERVER_PENDING, SERVER_CONNS),
        agent: Link::new(Role::Agent, AGENT_PENDING, AGENT_CONNS),
        to_agent: VecDeque::new(),
        to_server: VecDeque::new(),
        next_random: 0,
        answered: HashSet::new(),
        mistakes: 0,
    };
    let mut injected = false;
    for op in ops {
        injected |= e.step(op);
        e.check();
    }
    e.settle();
    if !injected {
        assert_eq!(e.mistakes, 0, "a correct peer was charged a mistake");
        assert_eq!(open(&e.server), open(&e.agent));
        assert_eq!(e.server.table().pending_len(), 0);
        assert_eq!(e.agent.table().pending_len(), 0);
    }
});
