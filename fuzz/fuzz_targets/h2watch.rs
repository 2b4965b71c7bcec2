//! The HTTP/2 frame watcher (`proto::h2watch`) on arbitrary bytes, in either
//! direction (a client's input after its preface, a server's output), read in
//! pieces of arbitrary size. What it reports must not depend on the cuts and
//! must equal what a plain parse of the whole input finds; the control-frame
//! budget fed those frames never panics and, with a small burst and no
//! refill, cuts off exactly at the first uncovered PING or SETTINGS.
#![no_main]

use std::time::Instant;

use konnectivity_proto::budget::Budget;
use konnectivity_proto::h2watch::{
    ControlFloods, FrameScanner, Seen, CLIENT_PREFACE, GOAWAY, PING, SETTINGS,
};
use libfuzzer_sys::fuzz_target;

/// The frames and GOAWAY codes in `bytes`, parsed in one go.
fn model(mut bytes: &[u8], client: bool) -> Vec<Seen> {
    if client {
        bytes = &bytes[CLIENT_PREFACE.min(bytes.len())..];
    }
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        out.push(Seen::Frame {
            kind: bytes[3],
            flags: bytes[4],
        });
        let payload = &bytes[9..];
        if bytes[3] == GOAWAY && len >= 8 && payload.len() >= 8 {
            out.push(Seen::Goaway(u32::from_be_bytes([
                payload[4], payload[5], payload[6], payload[7],
            ])));
        }
        if payload.len() < len {
            break;
        }
        bytes = &payload[len..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [mode, cut_seed, rest @ ..] = data else {
        return;
    };
    let client = mode & 1 == 1;
    let scanner = || {
        if client {
            FrameScanner::client_input()
        } else {
            FrameScanner::server_output()
        }
    };
    // Cut into reads of 1..=64 bytes, sizes from a generator seeded by the
    // input.
    let mut x = u32::from(*cut_seed) | 0x100;
    let mut s = scanner();
    let mut seen = Vec::new();
    let mut bytes = rest;
    while !bytes.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x as usize % 64 + 1).min(bytes.len());
        s.scan(&bytes[..n], |e| seen.push(e));
        bytes = &bytes[n..];
    }
    let mut whole = Vec::new();
    scanner().scan(rest, |e| whole.push(e));
    assert_eq!(seen, whole, "cuts changed what was seen");
    assert_eq!(whole, model(rest, client), "differs from a plain parse");

    // A budget of 3 and no refill: the fourth PING or SETTINGS not covered
    // by server output is cut off, and nothing else ever is.
    let now = Instant::now();
    let mut floods = ControlFloods::with_budget(Budget::with_rate(3, 0, now));
    let mut charged = 0;
    let mut sent = false;
    for e in whole {
        let Seen::Frame { kind, flags } = e else {
            continue;
        };
        // Use the flags' top bit as "the server sent DATA before this".
        if flags & 0x80 != 0 {
            floods.sent(0);
            sent = true;
        }
        let cut = floods.received(kind, flags, now);
        let costs = match kind {
            PING if flags & 1 == 0 => !std::mem::take(&mut sent),
            SETTINGS if flags & 1 == 0 => true,
            _ => false,
        };
        if costs {
            charged += 1;
        }
        assert_eq!(cut.is_some(), costs && charged > 3, "kind {kind} flags {flags}");
    }
});
