//! Building packets and reading them back as a validated [`Message`].
//!
//! A `Packet` carries its kind twice: in `type` and in which `payload` field is
//! set. [`Message::from_packet`] checks they agree, so the rest of the code never
//! sees a `DATA` packet without data. Unknown `type` values are not errors: the
//! protocol says they must be ignored, so they come back as [`Message::Unknown`].

use bytes::Bytes;

use crate::reason::DialReason;
use crate::wire::{self, packet::Payload, PacketType};
use crate::Packet;

/// Why a packet could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The packet has a known `type` but no payload.
    #[error("{0:?} packet has no payload")]
    MissingPayload(PacketType),
    /// The payload field does not match the `type` field.
    #[error("{kind:?} packet carries a {payload} payload")]
    Mismatch {
        /// The declared type.
        kind: PacketType,
        /// Name of the payload actually present.
        payload: &'static str,
    },
}

/// A packet, validated and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `DIAL_REQ`: open a connection to `address`.
    DialRequest {
        /// Always "tcp" from real peers.
        protocol: String,
        /// `host:port`.
        address: String,
        /// Dial id chosen by the frontend (or the server in HTTP CONNECT mode).
        random: i64,
    },
    /// `DIAL_RSP`: the dial's outcome.
    DialResponse {
        /// The dial id from the request.
        random: i64,
        /// Non-zero on success.
        connect_id: i64,
        /// Empty on success.
        error: String,
        /// Why it failed, when the peer sent it typed (our extension).
        reason: Option<DialReason>,
    },
    /// `DATA`: bytes for an established connection.
    Data {
        /// Connection id.
        connect_id: i64,
        /// The bytes.
        data: Bytes,
    },
    /// `CLOSE_REQ`.
    CloseRequest {
        /// Connection id.
        connect_id: i64,
    },
    /// `CLOSE_RSP`, solicited or not.
    CloseResponse {
        /// Connection id.
        connect_id: i64,
        /// Set when the id was unknown.
        error: String,
    },
    /// `DIAL_CLS`: a pending dial was abandoned.
    CloseDial {
        /// The dial id.
        random: i64,
    },
    /// `DRAIN`: the agent is shutting down.
    Drain,
    /// `WINDOW` extension: flow-control credit for one connection, or a heartbeat
    /// when `connect_id` is 0.
    Window {
        /// Connection id (0 = heartbeat).
        connect_id: i64,
        /// Bytes granted.
        bytes: i64,
    },
    /// A `type` value this implementation does not know; ignore it.
    Unknown(i32),
}

fn payload_name(p: &Payload) -> &'static str {
    match p {
        Payload::DialRequest(_) => "dialRequest",
        Payload::DialResponse(_) => "dialResponse",
        Payload::Data(_) => "data",
        Payload::CloseRequest(_) => "closeRequest",
        Payload::CloseResponse(_) => "closeResponse",
        Payload::CloseDial(_) => "closeDial",
        Payload::Drain(_) => "drain",
        Payload::Window(_) => "window",
    }
}

impl Message {
    /// Validates and converts a received packet.
    pub fn from_packet(packet: Packet) -> Result<Self, PacketError> {
        let Ok(kind) = PacketType::try_from(packet.r#type) else {
            return Ok(Message::Unknown(packet.r#type));
        };
        // DRAIN has no fields; a peer may omit the empty payload.
        if kind == PacketType::Drain && packet.payload.is_none() {
            return Ok(Message::Drain);
        }
        let payload = packet.payload.ok_or(PacketError::MissingPayload(kind))?;
        let mismatch = |p: &Payload| PacketError::Mismatch {
            kind,
            payload: payload_name(p),
        };
        Ok(match (kind, payload) {
            (PacketType::DialReq, Payload::DialRequest(d)) => Message::DialRequest {
                protocol: d.protocol,
                address: d.address,
                random: d.random,
            },
            (PacketType::DialRsp, Payload::DialResponse(d)) => Message::DialResponse {
                random: d.random,
                connect_id: d.connect_id,
                error: d.error,
                reason: DialReason::from_wire(d.reason),
            },
            (PacketType::Data, Payload::Data(d)) => Message::Data {
                connect_id: d.connect_id,
                data: d.data,
            },
            (PacketType::CloseReq, Payload::CloseRequest(c)) => Message::CloseRequest {
                connect_id: c.connect_id,
            },
            (PacketType::CloseRsp, Payload::CloseResponse(c)) => Message::CloseResponse {
                connect_id: c.connect_id,
                error: c.error,
            },
            (PacketType::DialCls, Payload::CloseDial(c)) => Message::CloseDial { random: c.random },
            (PacketType::Drain, Payload::Drain(_)) => Message::Drain,
            (PacketType::Window, Payload::Window(w)) => Message::Window {
                connect_id: w.connect_id,
                bytes: w.bytes,
            },
            (_, p) => return Err(mismatch(&p)),
        })
    }

    /// Converts back into a wire packet.
    pub fn into_packet(self) -> Packet {
        let (kind, payload) = match self {
            Message::DialRequest {
                protocol,
                address,
                random,
            } => (
                PacketType::DialReq,
                Payload::DialRequest(wire::DialRequest {
                    protocol,
                    address,
                    random,
                }),
            ),
            Message::DialResponse {
                random,
                connect_id,
                error,
                reason,
            } => (
                PacketType::DialRsp,
                Payload::DialResponse(wire::DialResponse {
                    error,
                    connect_id,
                    random,
                    reason: reason.map_or(0, DialReason::to_wire),
                }),
            ),
            Message::Data { connect_id, data } => (
                PacketType::Data,
                Payload::Data(wire::Data {
                    connect_id,
                    error: String::new(),
                    data,
                }),
            ),
            Message::CloseRequest { connect_id } => (
                PacketType::CloseReq,
                Payload::CloseRequest(wire::CloseRequest { connect_id }),
            ),
            Message::CloseResponse { connect_id, error } => (
                PacketType::CloseRsp,
                Payload::CloseResponse(wire::CloseResponse { error, connect_id }),
            ),
            Message::CloseDial { random } => (
                PacketType::DialCls,
                Payload::CloseDial(wire::CloseDial { random }),
            ),
            Message::Drain => (PacketType::Drain, Payload::Drain(wire::Drain {})),
            Message::Window { connect_id, bytes } => (
                PacketType::Window,
                Payload::Window(wire::WindowUpdate { connect_id, bytes }),
            ),
            Message::Unknown(t) => {
                return Packet {
                    r#type: t,
                    payload: None,
                }
            }
        };
        Packet {
            r#type: kind as i32,
            payload: Some(payload),
        }
    }

    /// Short name for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::DialRequest { .. } => "DIAL_REQ",
            Message::DialResponse { .. } => "DIAL_RSP",
            Message::Data { .. } => "DATA",
            Message::CloseRequest { .. } => "CLOSE_REQ",
            Message::CloseResponse { .. } => "CLOSE_RSP",
            Message::CloseDial { .. } => "DIAL_CLS",
            Message::Drain => "DRAIN",
            Message::Window { .. } => "WINDOW",
            Message::Unknown(_) => "UNKNOWN",
        }
    }
}

impl From<Message> for Packet {
    fn from(m: Message) -> Packet {
        m.into_packet()
    }
}

/// `DIAL_REQ` for a TCP destination.
pub fn dial_request(address: impl Into<String>, random: i64) -> Packet {
    Message::DialRequest {
        protocol: "tcp".into(),
        address: address.into(),
        random,
    }
    .into()
}

/// Successful `DIAL_RSP`.
pub fn dial_ok(random: i64, connect_id: i64) -> Packet {
    Message::DialResponse {
        random,
        connect_id,
        error: String::new(),
        reason: None,
    }
    .into()
}

/// Failed `DIAL_RSP` (connectID 0), text only (what reference peers send).
pub fn dial_failed(random: i64, error: impl Into<String>) -> Packet {
    dial_failed_with(random, error, None)
}

/// Failed `DIAL_RSP` with a typed reason for a peer that speaks
/// [`crate::metadata::FEATURE_DIAL_REASON`]; `None` sends text only.
pub fn dial_failed_with(
    random: i64,
    error: impl Into<String>,
    reason: Option<DialReason>,
) -> Packet {
    Message::DialResponse {
        random,
        connect_id: 0,
        error: error.into(),
        reason,
    }
    .into()
}

/// `DATA`.
pub fn data(connect_id: i64, data: Bytes) -> Packet {
    Message::Data { connect_id, data }.into()
}

/// `CLOSE_REQ`.
pub fn close_request(connect_id: i64) -> Packet {
    Message::CloseRequest { connect_id }.into()
}

/// `CLOSE_RSP`, with an error text or empty.
pub fn close_response(connect_id: i64, error: impl Into<String>) -> Packet {
    Message::CloseResponse {
        connect_id,
        error: error.into(),
    }
    .into()
}

/// `DIAL_CLS`.
pub fn close_dial(random: i64) -> Packet {
    Message::CloseDial { random }.into()
}

/// `DRAIN`.
pub fn drain() -> Packet {
    Message::Drain.into()
}

/// `WINDOW` credit grant (extension).
pub fn window(connect_id: i64, bytes: i64) -> Packet {
    Message::Window { connect_id, bytes }.into()
}

/// Checks a `DIAL_REQ` protocol: only "tcp" is carried. The error is the
/// `DIAL_RSP` text for anything else.
pub fn check_protocol(protocol: &str) -> Result<(), String> {
    if protocol == "tcp" {
        Ok(())
    } else {
        Err(format!("protocol {protocol:?} not supported, only tcp"))
    }
}

/// Error text the reference answers for an unknown connection id.
pub const UNKNOWN_CONNECT_ID: &str = "Unknown connectID";
/// Error text of a dial the server could not place on any agent.
pub const NO_AGENT: &str = "No agent available";

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn every_message_round_trips_through_bytes() {
        let msgs = vec![
            Message::DialRequest {
                protocol: "tcp".into(),
                address: "10.0.0.5:10250".into(),
                random: 42,
            },
            Message::DialResponse {
                random: 42,
                connect_id: 7,
                error: String::new(),
                reason: None,
            },
            Message::DialResponse {
                random: 43,
                connect_id: 0,
                error: "dial tcp 10.0.0.5:1: connect: connection refused".into(),
                reason: Some(DialReason::Refused),
            },
            Message::Data {
                connect_id: 7,
                data: Bytes::from_static(b"hello"),
            },
            Message::CloseRequest { connect_id: 7 },
            Message::CloseResponse {
                connect_id: 7,
                error: UNKNOWN_CONNECT_ID.into(),
            },
            Message::CloseDial { random: 42 },
            Message::Drain,
            Message::Window {
                connect_id: 7,
                bytes: 1 << 20,
            },
        ];
        for m in msgs {
            let bytes = m.clone().into_packet().encode_to_vec();
            let back = Packet::decode(bytes.as_slice()).expect("decode");
            assert_eq!(Message::from_packet(back).expect("valid"), m);
        }
    }

    #[test]
    fn field_numbers_match_the_reference() {
        // DATA{connectID=7, data="hi"}: type=4 (field 1 varint), payload field 4
        // (length-delimited) holding connectID (field 1) and data (field 3).
        let bytes = data(7, Bytes::from_static(b"hi")).encode_to_vec();
        assert_eq!(
            bytes,
            vec![0x08, 0x04, 0x22, 0x06, 0x08, 0x07, 0x1a, 0x02, b'h', b'i']
        );
        // DIAL_REQ: type 0 is the proto3 default and is not written; payload field 2.
        let bytes = dial_request("a:1", 5).encode_to_vec();
        assert_eq!(
            bytes,
            vec![
                0x12, 0x0c, 0x0a, 0x03, b't', b'c', b'p', 0x12, 0x03, b'a', b':', b'1', 0x18, 0x05
            ]
        );
        // DIAL_RSP: connectID is field 2, random field 3.
        let bytes = dial_ok(9, 3).encode_to_vec();
        assert_eq!(bytes, vec![0x08, 0x01, 0x1a, 0x04, 0x10, 0x03, 0x18, 0x09]);
    }

    #[test]
    fn only_tcp_is_dialled() {
        assert_eq!(check_protocol("tcp"), Ok(()));
        assert_eq!(
            check_protocol("udp"),
            Err("protocol \"udp\" not supported, only tcp".to_string())
        );
    }

    #[test]
    fn unknown_type_is_ignored_not_rejected() {
        let p = Packet {
            r#type: 55,
            payload: None,
        };
        assert_eq!(Message::from_packet(p), Ok(Message::Unknown(55)));
    }

    #[test]
    fn mismatched_or_missing_payload_is_an_error() {
        let mut p = data(1, Bytes::new());
        p.r#type = PacketType::CloseReq as i32;
        assert!(matches!(
            Message::from_packet(p),
            Err(PacketError::Mismatch {
                payload: "data",
                ..
            })
        ));
        let p = Packet {
            r#type: PacketType::Data as i32,
            payload: None,
        };
        assert_eq!(
            Message::from_packet(p),
            Err(PacketError::MissingPayload(PacketType::Data))
        );
        let p = Packet {
            r#type: PacketType::Drain as i32,
            payload: None,
        };
        assert_eq!(Message::from_packet(p), Ok(Message::Drain));
    }
}
