//! Watches the HTTP/2 frames of a server's connection, both ways, without
//! taking part in the protocol: the `GOAWAY` frames the HTTP/2 library writes
//! (so the server can say when and why it ended a connection), and the
//! control frames the peer sends (so a `PING` or `SETTINGS` flood is cut off).
//!
//! The HTTP/2 library ends an abusive connection (rapid stream resets, a
//! header block without end, a protocol violation) with a `GOAWAY` and tells
//! the application nothing; it answers every `PING` and acknowledges every
//! `SETTINGS`, however many, and only stops reading when the peer does not
//! read the answers. A peer that does read them keeps a worker busy for as
//! long as it likes. [`ControlFloods`] is the policy that ends that.
//!
//! The scanner reads frame headers only and skips payloads, so it costs a few
//! comparisons per read or write. No sockets and no clock: the time is an
//! argument.

use std::time::Instant;

use crate::budget::Budget;

/// Length of an HTTP/2 frame header.
const FRAME_HEADER: usize = 9;
/// The client connection preface, before the client's first frame.
pub const CLIENT_PREFACE: usize = 24;
/// Frame types this module tells apart.
pub const DATA: u8 = 0;
/// `HEADERS`.
pub const HEADERS: u8 = 1;
/// `SETTINGS`.
pub const SETTINGS: u8 = 4;
/// `PING`.
pub const PING: u8 = 6;
/// `GOAWAY`.
pub const GOAWAY: u8 = 7;
/// The `ACK` flag of `SETTINGS` and `PING`.
pub const ACK: u8 = 1;
/// The graceful `GOAWAY` (shutdown), not an error.
pub const NO_ERROR: u32 = 0;

/// The RFC 9113 name of an HTTP/2 error code.
pub fn reason(code: u32) -> &'static str {
    match code {
        0 => "NO_ERROR",
        1 => "PROTOCOL_ERROR",
        2 => "INTERNAL_ERROR",
        3 => "FLOW_CONTROL_ERROR",
        4 => "SETTINGS_TIMEOUT",
        5 => "STREAM_CLOSED",
        6 => "FRAME_SIZE_ERROR",
        7 => "REFUSED_STREAM",
        8 => "CANCEL",
        9 => "COMPRESSION_ERROR",
        10 => "CONNECT_ERROR",
        11 => "ENHANCE_YOUR_CALM",
        12 => "INADEQUATE_SECURITY",
        13 => "HTTP_1_1_REQUIRED",
        _ => "UNKNOWN",
    }
}

/// What the scanner found in the bytes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A frame header: its type and flags.
    Frame {
        /// Frame type.
        kind: u8,
        /// Frame flags.
        flags: u8,
    },
    /// A `GOAWAY` whose error code is now complete.
    Goaway(u32),
}

/// Follows the frames of one direction of one connection.
#[derive(Debug, Default)]
pub struct FrameScanner {
    /// Preface bytes still to skip.
    preface: usize,
    header: [u8; FRAME_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// In a `GOAWAY` payload: its first 8 bytes (last stream id, error code).
    goaway: Option<([u8; 8], usize)>,
}

impl FrameScanner {
    /// A scanner at the start of a server's output (its first frame).
    pub fn server_output() -> Self {
        Self::default()
    }

    /// A scanner at the start of what a client sends (the preface first).
    pub fn client_input() -> Self {
        Self {
            preface: CLIENT_PREFACE,
            ..Self::default()
        }
    }

    /// Takes the next bytes; calls `seen` for each frame header and each
    /// complete `GOAWAY` error code in them.
    pub fn scan(&mut self, mut bytes: &[u8], mut seen: impl FnMut(Seen)) {
        if self.preface > 0 {
            let n = self.preface.min(bytes.len());
            self.preface -= n;
            bytes = &bytes[n..];
        }
        while !bytes.is_empty() {
            if let Some((mut head, got)) = self.goaway.take() {
                let n = (8 - got).min(bytes.len());
                head[got..got + n].copy_from_slice(&bytes[..n]);
                bytes = &bytes[n..];
                self.left -= n;
                if got + n == 8 {
                    seen(Seen::Goaway(u32::from_be_bytes([
                        head[4], head[5], head[6], head[7],
                    ])));
                } else {
                    self.goaway = Some((head, got + n));
                }
                continue;
            }
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < FRAME_HEADER {
                break;
            }
            self.have = 0;
            let h = self.header;
            self.left = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            seen(Seen::Frame {
                kind: h[3],
                flags: h[4],
            });
            if h[3] == GOAWAY && self.left >= 8 {
                self.goaway = Some(([0; 8], 0));
            }
        }
    }

    /// The error codes of the `GOAWAY` frames complete in `bytes`.
    pub fn goaways(&mut self, bytes: &[u8]) -> Vec<u32> {
        let mut found = Vec::new();
        self.scan(bytes, |s| {
            if let Seen::Goaway(code) = s {
                found.push(code);
            }
        });
        found
    }
}

/// Which control frame flood a peer was cut off for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flood {
    /// `PING` frames with nothing sent in between.
    Ping,
    /// `SETTINGS` frames.
    Settings,
}

impl Flood {
    /// Metric label and log text.
    pub fn as_str(self) -> &'static str {
        match self {
            Flood::Ping => "PING_FLOOD",
            Flood::Settings => "SETTINGS_FLOOD",
        }
    }
}

/// The control frames one peer may send: a token bucket
/// ([`Budget`], the same burst and rate as protocol mistakes) over its
/// `SETTINGS` frames and its `PING` frames.
///
/// A `PING` right after the server sent `DATA` or `HEADERS` is free: a gRPC
/// client estimating the bandwidth-delay product sends one per burst of
/// data it receives (grpc-go does, on every connection whose window it sizes
/// itself), so those follow the server's own output and are bounded by it.
/// Keepalive pings are a few a minute. What is left (pings and settings with
/// nothing in between) is a flood past the burst.
#[derive(Debug)]
pub struct ControlFloods {
    budget: Budget,
    /// The server sent `DATA` or `HEADERS` since the peer's last `PING`.
    sent_since_ping: bool,
}

impl ControlFloods {
    /// A fresh budget at `now`.
    pub fn new(now: Instant) -> Self {
        Self::with_budget(Budget::new(now))
    }

    /// With a budget of one's own (tests).
    pub fn with_budget(budget: Budget) -> Self {
        Self {
            budget,
            sent_since_ping: false,
        }
    }

    /// The server wrote a frame of `kind`.
    pub fn sent(&mut self, kind: u8) {
        if kind == DATA || kind == HEADERS {
            self.sent_since_ping = true;
        }
    }

    /// The peer sent a frame: the flood it is cut off for, if this one
    /// spent its budget.
    pub fn received(&mut self, kind: u8, flags: u8, now: Instant) -> Option<Flood> {
        let flood = match kind {
            PING if flags & ACK == 0 => {
                if std::mem::take(&mut self.sent_since_ping) {
                    return None;
                }
                Flood::Ping
            }
            SETTINGS if flags & ACK == 0 => Flood::Settings,
            _ => return None,
        };
        (!self.budget.charge(now)).then_some(flood)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn goaway(code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(debug);
        frame(GOAWAY, 0, &p)
    }

    #[test]
    fn a_goaway_among_other_frames_is_found_whatever_the_write_sizes() {
        let mut out = frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        out.extend(frame(DATA, 0, &[0x5a; 40_000]));
        // A DATA payload that looks like a GOAWAY frame must not count.
        out.extend(frame(DATA, 0, &goaway(1, b"inside data")));
        out.extend(goaway(11, b"too_many_resets"));
        out.extend(frame(PING, 0, &[0; 8]));
        for step in [1, 2, 7, 9, 13, 4096, out.len()] {
            let mut w = FrameScanner::server_output();
            let found: Vec<u32> = out.chunks(step).flat_map(|c| w.goaways(c)).collect();
            assert_eq!(found, vec![11], "writes of {step} bytes");
        }
        assert_eq!(reason(11), "ENHANCE_YOUR_CALM");
    }

    #[test]
    fn a_graceful_goaway_reports_no_error() {
        let mut w = FrameScanner::server_output();
        assert_eq!(w.goaways(&goaway(NO_ERROR, b"")), vec![NO_ERROR]);
        assert!(w.goaways(&frame(PING, 0, &[0; 8])).is_empty());
    }

    #[test]
    fn a_client_s_frames_are_found_after_its_preface() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(SETTINGS, 0, &[]));
        input.extend(frame(HEADERS, 4, &[0x83; 30]));
        input.extend(frame(DATA, 0, &frame(PING, 0, &[0; 8])));
        input.extend(frame(PING, ACK, &[0; 8]));
        for step in [1, 5, 24, 25, input.len()] {
            let mut r = FrameScanner::client_input();
            let mut kinds = Vec::new();
            for c in input.chunks(step) {
                r.scan(c, |s| {
                    if let Seen::Frame { kind, flags } = s {
                        kinds.push((kind, flags));
                    }
                });
            }
            assert_eq!(
                kinds,
                vec![(SETTINGS, 0), (HEADERS, 4), (DATA, 0), (PING, ACK)],
                "reads of {step} bytes"
            );
        }
    }

    #[test]
    fn a_ping_flood_is_cut_off_after_the_burst_but_pings_after_data_are_free() {
        let t0 = Instant::now();
        let mut c = ControlFloods::with_budget(Budget::with_rate(10, 1, t0));
        // Pings that each follow the server's data (bandwidth probes), far
        // more than the burst: free.
        for _ in 0..1000 {
            c.sent(DATA);
            assert_eq!(c.received(PING, 0, t0), None);
        }
        // Answers to the server's own pings and settings cost nothing.
        for _ in 0..1000 {
            assert_eq!(c.received(PING, ACK, t0), None);
            assert_eq!(c.received(SETTINGS, ACK, t0), None);
        }
        // Pings with nothing in between: the burst, then cut off.
        for _ in 0..10 {
            assert_eq!(c.received(PING, 0, t0), None);
        }
        assert_eq!(c.received(PING, 0, t0), Some(Flood::Ping));
        // A second later the bucket has one more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(c.received(PING, 0, t1), None);
        assert_eq!(c.received(PING, 0, t1), Some(Flood::Ping));
    }

    #[test]
    fn a_settings_flood_is_cut_off_whatever_the_server_sends() {
        let t0 = Instant::now();
        let mut c = ControlFloods::with_budget(Budget::with_rate(5, 1, t0));
        for _ in 0..5 {
            c.sent(DATA);
            assert_eq!(c.received(SETTINGS, 0, t0), None);
        }
        c.sent(HEADERS);
        assert_eq!(c.received(SETTINGS, 0, t0), Some(Flood::Settings));
        // Other frames are not this policy's business.
        assert_eq!(c.received(HEADERS, 0, t0), None);
        assert_eq!(c.received(DATA, 0, t0), None);
    }
}
