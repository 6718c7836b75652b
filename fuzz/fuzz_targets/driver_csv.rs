//! Untrusted CSV for `--load-drivers`: errors with a line number, never panics.
#![no_main]

use hexmatch::Timestamp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("hexmatch-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("drivers.csv");
    if std::fs::write(&path, data).is_ok() {
        let _ = hexmatch_server::load::read_drivers(&path, Timestamp::EPOCH);
    }
});
