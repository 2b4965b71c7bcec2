//! A server end and an agent end driven against each other in memory, with
//! packets in flight between them, as the drivers would.

use std::collections::VecDeque;

use bytes::Bytes;
use konnectivity_proto::budget::Mistake;
use konnectivity_proto::{packet, DialReason, Message, Packet};

use crate::{Event, Link, Role, TableError};

/// Both ends and the packets in flight each way. Connection state is just
/// the connection id here; dial state the address asked for.
struct Pair {
    server: Link<&'static str, i64>,
    agent: Link<&'static str, i64>,
    to_agent: VecDeque<Packet>,
    to_server: VecDeque<Packet>,
    /// What each end was handed, in order.
    at_server: Vec<String>,
    at_agent: Vec<String>,
    mistakes: Vec<(Role, Mistake)>,
}

impl Pair {
    fn new(limit: usize) -> Self {
        Self {
            server: Link::new(Role::Server, limit, limit),
            agent: Link::new(Role::Agent, limit, limit),
            to_agent: VecDeque::new(),
            to_server: VecDeque::new(),
            at_server: Vec::new(),
            at_agent: Vec::new(),
            mistakes: Vec::new(),
        }
    }

    fn dial(&mut self, address: &'static str, random: i64) {
        let p = self.server.dial(address, random, address).unwrap();
        self.to_agent.push_back(p);
    }

    /// Delivers the next packet towards the agent. The agent accepts every
    /// dial it is asked for and connects it at once unless `hold` is set.
    fn deliver_to_agent(&mut self, hold: bool) {
        let p = self.to_agent.pop_front().expect("a packet in flight");
        let r = self.agent.receive(Message::from_packet(p).unwrap());
        if let Some(m) = r.mistake {
            self.mistakes.push((Role::Agent, m));
        }
        self.to_server.extend(r.reply);
        match r.event {
            Event::DialRequested { random, address } => {
                self.at_agent.push(format!("dial {address}"));
                match self.agent.accept_dial(random, "dialling") {
                    Ok(()) if !hold => self.agent_connect(random),
                    Ok(()) => {}
                    Err(p) => self.to_server.push_back(p),
                }
            }
            Event::Data {
                connect_id, data, ..
            } => self
                .at_agent
                .push(format!("data {connect_id} {}", data.len())),
            Event::Closed { connect_id, .. } => self.at_agent.push(format!("closed {connect_id}")),
            Event::DialClosed(d) => self.at_agent.push(format!("cancelled {}", d.random)),
            Event::Nothing => {}
            other => panic!("agent got {other:?}"),
        }
    }

    fn agent_connect(&mut self, random: i64) {
        let dial = self.agent.take_dial(random).expect("pending on the agent");
        let conn = self.agent.table().highest_conn() + 1;
        match self.agent.connected(dial, conn) {
            Ok((id, _, p)) => {
                assert_eq!(id, conn);
                self.to_server.push_back(p);
            }
            Err(d) => self
                .to_server
                .push_back(packet::dial_failed(d.random, "too many connections")),
        }
    }

    fn deliver_to_server(&mut self) {
        let p = self.to_server.pop_front().expect("a packet in flight");
        let r = self.server.receive(Message::from_packet(p).unwrap());
        if let Some(m) = r.mistake {
            self.mistakes.push((Role::Server, m));
        }
        self.to_agent.extend(r.reply);
        match r.event {
            Event::Answered { dial, connect_id } => {
                match self.server.establish(dial, connect_id, connect_id) {
                    Ok(address) => self.at_server.push(format!("open {address} {connect_id}")),
                    Err((_, e, close)) => {
                        self.at_server.push(format!("refused {e}"));
                        self.to_agent.push_back(close);
                    }
                }
            }
            Event::DialFailed { dial, reason, .. } => self
                .at_server
                .push(format!("failed {} {reason}", dial.random)),
            Event::Data {
                connect_id, data, ..
            } => self
                .at_server
                .push(format!("data {connect_id} {}", data.len())),
            Event::Closed { connect_id, .. } => self.at_server.push(format!("closed {connect_id}")),
            Event::Drain => self.at_server.push("drain".into()),
            Event::Nothing | Event::Grant { .. } => {}
            other => panic!("server got {other:?}"),
        }
    }

    /// Delivers everything in flight, both ways, until nothing is.
    fn settle(&mut self) {
        while !self.to_agent.is_empty() || !self.to_server.is_empty() {
            while !self.to_agent.is_empty() {
                self.deliver_to_agent(false);
            }
            while !self.to_server.is_empty() {
                self.deliver_to_server();
            }
        }
    }

    fn open_ids(link: &Link<&'static str, i64>) -> Vec<i64> {
        let mut ids: Vec<i64> = link.table().conns().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }

    /// Both ends agree on what is open, nothing is pending, nobody erred.
    fn assert_agree(&self) {
        assert_eq!(Self::open_ids(&self.server), Self::open_ids(&self.agent));
        assert_eq!(self.server.table().pending_len(), 0);
        assert_eq!(self.agent.table().pending_len(), 0);
        assert_eq!(self.mistakes, []);
    }
}

#[test]
fn a_dial_opens_a_connection_both_ends_agree_on_and_either_end_closes_it() {
    let mut p = Pair::new(8);
    p.dial("10.0.0.1:10250", 7);
    p.dial("10.0.0.2:10250", 8);
    p.settle();
    assert_eq!(
        p.at_server,
        ["open 10.0.0.1:10250 1", "open 10.0.0.2:10250 2"]
    );
    assert_eq!(Pair::open_ids(&p.agent), [1, 2]);
    // Bytes and credit both ways.
    p.to_agent
        .push_back(packet::data(1, Bytes::from_static(b"GET /")));
    p.to_server
        .push_back(packet::data(2, Bytes::from_static(b"200 OK")));
    p.to_server.push_back(packet::window(1, 4096));
    p.settle();
    assert_eq!(p.at_agent.last().unwrap(), "data 1 5");
    assert_eq!(p.at_server.last().unwrap(), "data 2 6");
    // The server closes 1, the agent closes 2.
    let (_, close) = p.server.close(1).unwrap();
    p.to_agent.push_back(close);
    let (_, close) = p.agent.close(2).unwrap();
    p.to_server.push_back(close);
    p.settle();
    assert_eq!(p.at_agent.last().unwrap(), "closed 1");
    assert_eq!(p.at_server.last().unwrap(), "closed 2");
    p.assert_agree();
    assert_eq!(Pair::open_ids(&p.server), []);
}

/// The frontend gave up while the agent was connecting: the agent's answer
/// crosses the server's `DIAL_CLS`, and the connection it opened is closed,
/// not leaked (the reference leaks it).
#[test]
fn a_dial_given_up_while_the_agent_answers_leaves_nothing_open() {
    let mut p = Pair::new(8);
    p.dial("10.0.0.1:80", 5);
    p.deliver_to_agent(false); // the agent connects and answers
    let (dial, cls) = p.server.abandon_dial(5).unwrap();
    assert_eq!(dial.value, "10.0.0.1:80");
    p.to_agent.push_back(cls);
    p.settle();
    assert_eq!(p.at_server, Vec::<String>::new());
    assert_eq!(p.at_agent, ["dial 10.0.0.1:80", "closed 1"]);
    p.assert_agree();
    assert_eq!(Pair::open_ids(&p.agent), []);
}

/// Given up before the agent connected: the agent cancels its dial.
#[test]
fn a_dial_given_up_before_the_agent_connects_is_cancelled_there() {
    let mut p = Pair::new(8);
    p.dial("10.0.0.1:80", 5);
    p.deliver_to_agent(true);
    let (_, cls) = p.server.abandon_dial(5).unwrap();
    p.to_agent.push_back(cls);
    p.settle();
    assert_eq!(p.at_agent, ["dial 10.0.0.1:80", "cancelled 5"]);
    p.assert_agree();
}

/// Both ends close the same connection at once, and packets for it are
/// still in flight both ways: nobody errs, nothing stays open.
#[test]
fn closes_that_cross_and_late_packets_are_not_mistakes() {
    let mut p = Pair::new(8);
    p.dial("10.0.0.1:80", 1);
    p.settle();
    p.to_agent
        .push_back(packet::data(1, Bytes::from_static(b"late")));
    p.to_server
        .push_back(packet::data(1, Bytes::from_static(b"late")));
    let (_, close) = p.server.close(1).unwrap();
    p.to_agent.push_back(close);
    p.to_agent.push_back(packet::window(1, 10));
    let (_, close) = p.agent.close(1).unwrap();
    p.to_server.push_back(close);
    p.to_server.push_back(packet::window(1, 10));
    p.settle();
    p.assert_agree();
    assert_eq!(Pair::open_ids(&p.server), []);
    // Neither end handed the late bytes on.
    assert!(!p.at_agent.iter().any(|e| e.starts_with("data")));
    assert!(!p.at_server.iter().any(|e| e.starts_with("data")));
}

/// Packets for ids that never existed are mistakes, answered so the peer
/// stops, and a flood for one id is answered once.
#[test]
fn packets_for_ids_that_never_existed_are_mistakes_and_answered() {
    let mut server: Link<(), i64> = Link::new(Role::Server, 4, 4);
    let data = || Message::Data {
        connect_id: 99,
        data: Bytes::new(),
    };
    let r = server.receive(data());
    assert_eq!(
        (r.unknown, r.mistake),
        (Some("DATA"), Some(Mistake::UnknownConnection))
    );
    assert_eq!(r.reply, Some(packet::close_request(99)));
    // The rest are for an id now remembered as closed.
    for _ in 0..3 {
        let r = server.receive(data());
        assert_eq!((r.unknown, r.mistake, r.reply), (None, None, None));
    }
    let r = server.receive(Message::from_packet(packet::dial_ok(42, 3)).unwrap());
    assert_eq!(r.mistake, Some(Mistake::UnknownConnection));
    assert_eq!(
        r.reply,
        Some(packet::close_request(3)),
        "its connection must not leak"
    );
    let r = server.receive(Message::from_packet(packet::window(5, 1)).unwrap());
    assert_eq!(
        (r.unknown, r.mistake),
        (Some("WINDOW"), Some(Mistake::UnknownConnection))
    );
    let r = server.receive(Message::from_packet(packet::close_response(6, "")).unwrap());
    assert_eq!(
        (r.unknown, r.mistake),
        (Some("CLOSE_RSP"), Some(Mistake::UnknownConnection))
    );

    let mut agent: Link<(), i64> = Link::new(Role::Agent, 4, 4);
    let r = agent.receive(Message::from_packet(packet::close_request(8)).unwrap());
    assert_eq!(r.mistake, Some(Mistake::UnknownConnection));
    assert_eq!(
        r.reply,
        Some(packet::close_response(8, packet::UNKNOWN_CONNECT_ID))
    );
    let r = agent.receive(Message::from_packet(packet::data(8, Bytes::new())).unwrap());
    assert_eq!(r.mistake, Some(Mistake::UnknownConnection));
    assert_eq!(
        r.reply,
        Some(packet::close_response(8, "unrecognized connectID"))
    );
}

#[test]
fn requests_a_role_may_not_make_are_mistakes() {
    let mut server: Link<(), i64> = Link::new(Role::Server, 4, 4);
    for p in [packet::dial_request("a:1", 1), packet::close_request(1)] {
        let r = server.receive(Message::from_packet(p).unwrap());
        assert_eq!(r.mistake, Some(Mistake::NotAllowed));
    }
    let mut agent: Link<(), i64> = Link::new(Role::Agent, 4, 4);
    for p in [
        packet::dial_ok(1, 1),
        packet::close_response(1, ""),
        packet::drain(),
    ] {
        let r = agent.receive(Message::from_packet(p).unwrap());
        assert_eq!(r.mistake, Some(Mistake::NotAllowed));
    }
    // A heartbeat is answered by the agent, and the answer is nothing to
    // the server.
    let r = agent.receive(Message::from_packet(packet::window(0, 0)).unwrap());
    assert_eq!(r.reply, Some(packet::window(0, 0)));
    let r = server.receive(Message::from_packet(packet::window(0, 0)).unwrap());
    assert!(matches!(r.event, Event::Nothing) && r.reply.is_none() && r.mistake.is_none());
}

/// Limits on either end turn into clean failures at the server end, and
/// the connection of an answer the server cannot take is closed on the agent.
#[test]
fn full_tables_refuse_cleanly_at_both_ends() {
    let mut p = Pair::new(0);
    // The agent holds two dials at most, the server one connection.
    p.server = Link::new(Role::Server, 8, 1);
    p.agent = Link::new(Role::Agent, 2, 8);
    for (address, random) in [("a:1", 1), ("a:2", 2), ("a:3", 3)] {
        p.dial(address, random);
        p.deliver_to_agent(true);
    }
    p.settle();
    assert_eq!(p.at_server, [format!("failed 3 {}", DialReason::Other)]);
    // Both held dials connect; the server takes the first and closes the
    // second on the agent.
    p.agent_connect(1);
    p.agent_connect(2);
    p.settle();
    assert_eq!(
        p.at_server[1..],
        [
            "open a:1 1".to_string(),
            format!("refused {}", TableError::TooManyConnections(1))
        ]
    );
    p.assert_agree();
    assert_eq!(Pair::open_ids(&p.agent), [1]);
}

#[test]
fn a_bad_protocol_is_refused_by_the_agent() {
    let mut agent: Link<(), i64> = Link::new(Role::Agent, 4, 4);
    let mut req = packet::dial_request("a:1", 9);
    if let Some(konnectivity_proto::wire::packet::Payload::DialRequest(d)) = &mut req.payload {
        d.protocol = "udp".into();
    }
    let r = agent.receive(Message::from_packet(req).unwrap());
    assert!(matches!(r.event, Event::Nothing));
    match r.reply.map(Message::from_packet) {
        Some(Ok(Message::DialResponse {
            random: 9, error, ..
        })) => assert!(!error.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn remembered_ids_stay_bounded() {
    let mut server: Link<(), i64> = Link::new(Role::Server, 4, 4);
    for id in 1..=10_000 {
        let _ = server.receive(Message::Data {
            connect_id: id,
            data: Bytes::new(),
        });
    }
    assert_eq!(server.recently_closed(), crate::RECENT);
}
