//! One end of the link: what a received packet means, and the packets the
//! end's own decisions (dial, answer, close) put on the wire.

use bytes::Bytes;
use konnectivity_proto::budget::Mistake;
use konnectivity_proto::ids::ConnectIds;
use konnectivity_proto::{packet, DialReason, Message, Packet};

use crate::table::{Pending, RecentlyClosed, Table, TableError};

/// Closed connection ids (and abandoned dials) remembered per end, so that
/// packets still in flight for them are dropped quietly.
pub const RECENT: usize = 256;

/// Which end of the link this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The proxy server: it asks for dials, the agent answers them.
    Server,
    /// The proxy agent: it carries out dials and names the connections.
    Agent,
}

/// What a received packet asks of the driver.
#[derive(Debug)]
pub enum Event<P, C> {
    /// Nothing beyond the reply, if any: a late packet for a connection that
    /// closed, a heartbeat, a packet type this end does not know.
    Nothing,
    /// Bytes for an open connection.
    Data {
        /// The connection.
        connect_id: i64,
        /// Its state.
        conn: C,
        /// The bytes.
        data: Bytes,
    },
    /// Send credit for an open connection (`WINDOW`).
    Grant {
        /// The connection's state.
        conn: C,
        /// Bytes granted.
        bytes: i64,
    },
    /// Server end: the agent opened the connection for one of its dials. The
    /// driver builds the connection's state and calls [`Link::establish`].
    Answered {
        /// The dial, taken out of the table.
        dial: Pending<P>,
        /// The agent's name for the connection.
        connect_id: i64,
    },
    /// Server end: the agent could not open the connection.
    DialFailed {
        /// The dial, taken out of the table.
        dial: Pending<P>,
        /// The agent's text.
        error: String,
        /// Why, typed when the agent sent it so, else read from the text.
        reason: DialReason,
    },
    /// The peer gave up a pending dial (`DIAL_CLS`).
    DialClosed(Pending<P>),
    /// The peer closed an open connection; it is out of the table.
    Closed {
        /// The connection.
        connect_id: i64,
        /// Its state.
        conn: C,
        /// The peer's error text, if it gave one.
        error: String,
    },
    /// Agent end: the server asks for a dial. The driver calls
    /// [`Link::accept_dial`], dials, and then [`Link::connected`].
    DialRequested {
        /// The dial id.
        random: i64,
        /// `host:port`.
        address: String,
    },
    /// Server end: the agent is going away (`DRAIN`).
    Drain,
}

/// The outcome of [`Link::receive`].
#[derive(Debug)]
#[must_use = "the event and the reply must be acted on"]
pub struct Received<P, C> {
    /// What the driver must do.
    pub event: Event<P, C>,
    /// A control packet to send back at once.
    pub reply: Option<Packet>,
    /// The packet named an id this end does not hold: its kind (`DATA`,
    /// `WINDOW`, ...), for the unknown-packet metric.
    pub unknown: Option<&'static str>,
    /// The peer made a mistake: an id that never existed, or a packet its
    /// role may not send. Charged to its budget by the driver.
    pub mistake: Option<Mistake>,
}

impl<P, C> Received<P, C> {
    fn event(event: Event<P, C>) -> Self {
        Self {
            event,
            reply: None,
            unknown: None,
            mistake: None,
        }
    }

    fn nothing() -> Self {
        Self::event(Event::Nothing)
    }

    fn reply(mut self, p: Packet) -> Self {
        self.reply = Some(p);
        self
    }

    fn not_allowed() -> Self {
        Self {
            mistake: Some(Mistake::NotAllowed),
            ..Self::nothing()
        }
    }
}

/// One end's dials and connections, and the rules for what the other end
/// sends. `P` is what the driver keeps with a pending dial, `C` with an open
/// connection (cloned out for `DATA` and `WINDOW`, so it should be a handle).
#[derive(Debug)]
pub struct Link<P, C> {
    role: Role,
    table: Table<P, C>,
    /// Connections closed recently; late packets for them are dropped quietly.
    recent: RecentlyClosed,
    /// Server end: dials it gave up; a late `DIAL_RSP` for them is expected.
    abandoned: RecentlyClosed,
    /// Agent end: its connection ids.
    ids: ConnectIds,
}

impl<P, C: Clone> Link<P, C> {
    /// An empty end with its limits.
    pub fn new(role: Role, max_pending: usize, max_conns: usize) -> Self {
        Self {
            role,
            table: Table::new(max_pending, max_conns),
            recent: RecentlyClosed::new(RECENT),
            abandoned: RecentlyClosed::new(RECENT),
            ids: ConnectIds::new(),
        }
    }

    /// The pending dials and open connections.
    pub fn table(&self) -> &Table<P, C> {
        &self.table
    }

    /// How many closed connection ids are remembered (at most [`RECENT`]).
    pub fn recently_closed(&self) -> usize {
        self.recent.len()
    }

    /// A packet for `connect_id`, which is not open, is late for a
    /// connection that existed (not a mistake of the peer's). Ids are handed
    /// out counting up, so one at or below the highest ever open here existed.
    fn late(&self, connect_id: i64) -> bool {
        self.recent.contains(connect_id)
            || (connect_id > 0 && connect_id <= self.table.highest_conn())
    }

    /// A packet for `connect_id`, which is not open: counted as unknown, and
    /// a mistake unless late.
    fn unknown(&self, kind: &'static str, connect_id: i64) -> Received<P, C> {
        Received {
            unknown: Some(kind),
            mistake: (!self.late(connect_id)).then_some(Mistake::UnknownConnection),
            ..Received::nothing()
        }
    }

    /// The packet that tells the peer this end closed `connect_id`.
    fn close_packet(&self, connect_id: i64) -> Packet {
        match self.role {
            Role::Server => packet::close_request(connect_id),
            Role::Agent => packet::close_response(connect_id, ""),
        }
    }

    /// Reads one packet from the other end.
    pub fn receive(&mut self, m: Message) -> Received<P, C> {
        match (self.role, m) {
            (_, Message::Data { connect_id, data }) => self.on_data(connect_id, data),
            (_, Message::Window { connect_id, bytes }) if connect_id != 0 => {
                match self.table.conn(connect_id) {
                    Some(c) => Received::event(Event::Grant {
                        conn: c.clone(),
                        bytes,
                    }),
                    None => self.unknown("WINDOW", connect_id),
                }
            }
            // The server's heartbeat, answered so the server can tell an
            // idle agent from a dead stream.
            (Role::Agent, Message::Window { bytes: 0, .. }) => {
                Received::nothing().reply(packet::window(0, 0))
            }
            // The agent's answer to a heartbeat, or an empty grant.
            (_, Message::Window { .. }) => Received::nothing(),
            (_, Message::CloseDial { random }) => match self.table.take_pending(random) {
                Some(dial) => {
                    if self.role == Role::Server {
                        self.abandoned.insert(random);
                    }
                    Received::event(Event::DialClosed(dial))
                }
                // Crossed with this end's answer.
                None => Received::nothing(),
            },
            (
                Role::Server,
                Message::DialResponse {
                    random,
                    connect_id,
                    error,
                    reason,
                },
            ) => self.on_dial_response(random, connect_id, error, reason),
            (Role::Server, Message::CloseResponse { connect_id, error }) => {
                match self.remove(connect_id) {
                    Some(conn) => Received::event(Event::Closed {
                        connect_id,
                        conn,
                        error,
                    }),
                    None => self.unknown("CLOSE_RSP", connect_id),
                }
            }
            (Role::Server, Message::Drain) => Received::event(Event::Drain),
            (
                Role::Agent,
                Message::DialRequest {
                    protocol,
                    address,
                    random,
                },
            ) => match packet::check_protocol(&protocol) {
                Ok(()) => Received::event(Event::DialRequested { random, address }),
                Err(e) => Received::nothing().reply(packet::dial_failed(random, e)),
            },
            (Role::Agent, Message::CloseRequest { connect_id }) => match self.remove(connect_id) {
                Some(conn) => Received::event(Event::Closed {
                    connect_id,
                    conn,
                    error: String::new(),
                })
                .reply(packet::close_response(connect_id, "")),
                None => self
                    .unknown("CLOSE_REQ", connect_id)
                    .reply(packet::close_response(
                        connect_id,
                        packet::UNKNOWN_CONNECT_ID,
                    )),
            },
            (_, Message::Unknown(_)) => Received::nothing(),
            // A request the peer's role may not make.
            _ => Received::not_allowed(),
        }
    }

    fn on_data(&mut self, connect_id: i64, data: Bytes) -> Received<P, C> {
        if let Some(c) = self.table.conn(connect_id) {
            return Received::event(Event::Data {
                connect_id,
                conn: c.clone(),
                data,
            });
        }
        if self.recent.contains(connect_id) {
            return Received::nothing();
        }
        let mut r = self.unknown("DATA", connect_id);
        // Remembered, so a flood for this id is answered once.
        self.recent.insert(connect_id);
        // A connection that never existed: tell the peer to stop. One that
        // did was closed with a close packet already.
        if r.mistake.is_some() {
            r.reply = Some(match self.role {
                Role::Server => packet::close_request(connect_id),
                Role::Agent => packet::close_response(connect_id, "unrecognized connectID"),
            });
        }
        r
    }

    fn on_dial_response(
        &mut self,
        random: i64,
        connect_id: i64,
        error: String,
        reason: Option<DialReason>,
    ) -> Received<P, C> {
        let Some(dial) = self.table.take_pending(random) else {
            // This end gave up the dial (or never made it). A connection
            // opened for it must not leak on the agent.
            let mut r = Received {
                unknown: Some("DIAL_RSP"),
                mistake: (!self.abandoned.contains(random)).then_some(Mistake::UnknownConnection),
                ..Received::nothing()
            };
            if connect_id != 0 && error.is_empty() {
                // Its CLOSE_RSP will come back: expected, not a mistake.
                self.recent.insert(connect_id);
                r.reply = Some(packet::close_request(connect_id));
            }
            return r;
        };
        if error.is_empty() && connect_id != 0 {
            return Received::event(Event::Answered { dial, connect_id });
        }
        let error = if error.is_empty() {
            "agent answered without a connection id".to_string()
        } else {
            error
        };
        let reason = reason.unwrap_or_else(|| DialReason::from_text(&error));
        Received::event(Event::DialFailed {
            dial,
            error,
            reason,
        })
    }

    fn remove(&mut self, connect_id: i64) -> Option<C> {
        let conn = self.table.remove_conn(connect_id)?;
        self.recent.insert(connect_id);
        Some(conn)
    }

    /// Server end: registers a dial; the `DIAL_REQ` to send.
    pub fn dial(&mut self, address: &str, random: i64, value: P) -> Result<Packet, TableError> {
        self.table.add_pending(random, value)?;
        Ok(packet::dial_request(address, random))
    }

    /// Takes a pending dial out without telling the peer: its request could
    /// not be sent, or (agent end) its dial ended.
    pub fn take_dial(&mut self, random: i64) -> Option<Pending<P>> {
        self.table.take_pending(random)
    }

    /// Server end: gives up a pending dial; the `DIAL_CLS` that tells the
    /// agent. A late answer for it is expected, and its connection closed.
    pub fn abandon_dial(&mut self, random: i64) -> Option<(Pending<P>, Packet)> {
        let dial = self.table.take_pending(random)?;
        self.abandoned.insert(random);
        Some((dial, packet::close_dial(random)))
    }

    /// Server end: opens the connection the agent answered a dial with. On
    /// error (the id is in use, too many connections) the dial comes back
    /// with the `CLOSE_REQ` that closes the agent's side.
    #[allow(clippy::type_complexity)]
    pub fn establish(
        &mut self,
        dial: Pending<P>,
        connect_id: i64,
        conn: C,
    ) -> Result<P, (Pending<P>, TableError, Packet)> {
        let (dial, e) = match self.table.establish(dial, connect_id, conn) {
            Ok(value) => return Ok(value),
            Err(refused) => refused,
        };
        // The agent's CLOSE_RSP for it will come back: expected.
        self.recent.insert(connect_id);
        Err((dial, e, packet::close_request(connect_id)))
    }

    /// Agent end: records the server's dial as pending, or the `DIAL_RSP`
    /// that refuses it (a repeated id, too many pending dials).
    pub fn accept_dial(&mut self, random: i64, value: P) -> Result<(), Packet> {
        self.table
            .add_pending(random, value)
            .map_err(|e| packet::dial_failed(random, e.to_string()))
    }

    /// Agent end: the dial connected. Names the connection and opens it;
    /// the `DIAL_RSP` to send. The dial comes back when this stream has its
    /// limit of connections.
    pub fn connected(&mut self, dial: Pending<P>, conn: C) -> Result<(i64, P, Packet), Pending<P>> {
        let random = dial.random;
        let table = &self.table;
        let id = self.ids.next_free(|id| table.has_conn(id));
        match self.table.establish(dial, id, conn) {
            Ok(value) => Ok((id, value, packet::dial_ok(random, id))),
            Err((dial, _)) => Err(dial),
        }
    }

    /// This end closes a connection: its state, and the packet that tells
    /// the peer (`CLOSE_REQ` from the server, `CLOSE_RSP` from the agent).
    /// `None` when it was not open (the peer closed it first).
    pub fn close(&mut self, connect_id: i64) -> Option<(C, Packet)> {
        let conn = self.remove(connect_id)?;
        Some((conn, self.close_packet(connect_id)))
    }

    /// The stream ended: every pending dial and open connection, for the
    /// driver to fail and close.
    #[allow(clippy::type_complexity)]
    pub fn shut(&mut self) -> (Vec<Pending<P>>, Vec<(i64, C)>) {
        self.table.drain()
    }
}
