//! Untrusted bytes as a snapshot manifest and chunks: errors, never panics.
#![no_main]

use hexmatch::{Engine, EngineConfig, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as a manifest.
    let _ = Manifest::decode(data);
    // A valid one-chunk manifest describing the input as its chunk, so the
    // chunk decoder (zstd, postcard, field checks) sees arbitrary bytes.
    let manifest = Manifest {
        format: hexmatch::SNAPSHOT_FORMAT,
        generation: 1,
        taken_at_ms: 0,
        resolution: 6,
        drivers: u64::from(data.first().copied().unwrap_or(1)),
        chunks: vec![hexmatch::ChunkInfo {
            len: data.len() as u64,
            crc32: crc32(data),
            drivers: u32::from(data.first().copied().unwrap_or(1)),
        }],
    };
    let engine = Engine::new(EngineConfig::default()).expect("valid config");
    if engine.restore_snapshot(&manifest, &[data]).is_err() {
        assert!(engine.is_empty(), "a rejected snapshot loads nothing");
    }
});

fn crc32(data: &[u8]) -> u32 {
    // IEEE CRC-32, bitwise: the fuzz target avoids extra dependencies.
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
