//! The `:authority` rewriter on a client's HTTP/2 bytes (after a valid
//! preface, or none), read in pieces of arbitrary size. The rewrite must not
//! depend on how the bytes were cut into reads; when it succeeds, every header
//! block it emits decodes, in order, with a fresh HPACK decoder, and carries
//! only valid `:authority` values.
#![no_main]

use konnectivity_proto::authority::rewrite_reads;
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Decodes the header blocks of complete frames in `out`.
fn check_blocks(mut rest: &[u8]) {
    let mut dec = loona_hpack::Decoder::new();
    let mut block: Option<Vec<u8>> = None;
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        if rest.len() < 9 + len {
            return;
        }
        let (kind, flags, payload) = (rest[3], rest[4], &rest[9..9 + len]);
        rest = &rest[9 + len..];
        match (kind, block.as_mut()) {
            (HEADERS, None) => {
                // We emit no padding; a priority is 5 bytes.
                let skip = if flags & 0x20 != 0 { 5 } else { 0 };
                block = Some(payload[skip..].to_vec());
            }
            (CONTINUATION, Some(b)) => b.extend_from_slice(payload),
            // A stray CONTINUATION is handed over as it came; the HTTP/2
            // server ends the connection there.
            (CONTINUATION, None) => return,
            (HEADERS, Some(_)) => panic!("HEADERS emitted inside a header block"),
            _ => continue,
        };
        if flags & END_HEADERS != 0 {
            let b = block.take().expect("block");
            let headers = dec.decode(&b).expect("our header block decodes");
            for (name, value) in headers {
                if name == b":authority" {
                    assert!(http::uri::Authority::try_from(&value[..]).is_ok());
                }
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&control, data)) = input.split_first() else {
        return;
    };
    let mut bytes = Vec::with_capacity(PREFACE.len() + data.len());
    if control & 0x80 == 0 {
        bytes.extend_from_slice(PREFACE);
    }
    bytes.extend_from_slice(data);
    let cut = (control & 0x7f) as usize + 1;
    let whole = rewrite_reads([&bytes[..]]);
    let split = rewrite_reads(bytes.chunks(cut));
    match (&whole, &split) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "rewrite depends on read sizes"),
        (Err(_), Err(_)) => {}
        _ => panic!("outcome depends on read sizes: {whole:?} vs {split:?}"),
    }
    if let Ok(out) = whole {
        if let Some(frames) = out.strip_prefix(PREFACE) {
            check_blocks(frames);
        }
    }
});
