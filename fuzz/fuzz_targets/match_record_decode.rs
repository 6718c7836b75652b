//! Untrusted bytes as a durable match record: errors, never panics; what
//! decodes re-encodes to a record that decodes to the same value.
#![no_main]

use hexmatch::DurableMatch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = DurableMatch::decode(data) {
        let again = DurableMatch::decode(&rec.encode()).expect("re-encoded record decodes");
        assert_eq!(again, rec);
    }
});
