//! The HTTP CONNECT request-head parser, on whatever a frontend client sends.
//! Whatever the bytes, the answer is Partial, Connect or Reject, never a
//! panic; a Connect's head lies within the input, and the same head with
//! different early tunnel bytes after it parses the same.
#![no_main]

use konnectivity_proto::connect::{parse_request, Parsed, MAX_HEAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Parsed::Partial => assert!(data.len() < MAX_HEAD, "partial past the head limit"),
        Parsed::Connect { target, head_len } => {
            assert!(head_len <= data.len());
            assert!(
                target.rsplit_once(':').is_some(),
                "target {target:?} has no port"
            );
            let mut other = data[..head_len].to_vec();
            other.extend_from_slice(b"\x16\x03\x01 tunnel bytes");
            assert_eq!(
                parse_request(&other),
                Parsed::Connect { target, head_len },
                "early tunnel data changed the parse"
            );
        }
        Parsed::Reject { status, reason } => {
            assert!((400..600).contains(&status), "status {status}");
            assert!(!reason.is_empty());
        }
    }
});
