//! Agent metadata: the `agentIdentifiers` value, the features list and a
//! dial address's host, on whatever an agent or frontend sends. Identifiers
//! that parse come back equal after encoding; nothing panics.
#![no_main]

use konnectivity_proto::metadata::{dest_host, has_feature, AgentIdentifiers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    if let Ok(ids) = AgentIdentifiers::parse(&s) {
        let again = AgentIdentifiers::parse(&ids.encode()).expect("our encoding parses");
        assert_eq!(again, ids, "identifiers changed through encode");
        let host = dest_host(&s);
        let _ = ids.serves_host(host);
    }
    let _ = has_feature(Some(&s), "dial-reason-v1");
    let host = dest_host(&s);
    assert!(s.contains(host), "dest_host invented {host:?}");
});
