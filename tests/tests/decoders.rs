//! Stable-toolchain fuzzing of the snapshot and match-record decoders:
//! random bytes and mutations of valid encodings must give errors, never
//! panics, and a rejected snapshot must load nothing. (The coverage-guided
//! versions are the cargo-fuzz targets in `fuzz/`.)

use hexmatch::{
    ChunkInfo, ClaimRequest, DriverId, DriverUpdate, DurableMatch, Engine, EngineConfig, Manifest,
    OrderId, Position, SNAPSHOT_FORMAT,
};
use proptest::prelude::*;

fn sample_snapshot() -> hexmatch::Snapshot {
    let engine = Engine::new(EngineConfig::default()).expect("config");
    for i in 0..40 {
        let pos = Position::new(41.8 + f64::from(i) * 0.001, -87.6).expect("pos");
        engine
            .upsert(&DriverUpdate::location(
                DriverId::new(&format!("d{i}")).expect("id"),
                pos,
                None,
            ))
            .expect("upsert");
    }
    // Drivers in matches: their records carry the order.
    for (o, lat) in [("o1", 41.8), ("o2", 41.82)] {
        let order = OrderId::new(o).expect("id");
        let pickup = Position::new(lat, -87.6).expect("pos");
        engine
            .claim(&order, &ClaimRequest::new(pickup))
            .expect("claim");
    }
    engine
        .confirm(&OrderId::new("o1").expect("id"))
        .expect("confirm");
    engine.snapshot(3, 16)
}

fn sample_record() -> Vec<u8> {
    let engine = Engine::new(EngineConfig::default()).expect("config");
    let pos = Position::new(41.8, -87.6).expect("pos");
    engine
        .upsert(&DriverUpdate::location(
            DriverId::new("d").expect("id"),
            pos,
            None,
        ))
        .expect("upsert");
    let order = OrderId::new("o").expect("id");
    engine
        .claim(&order, &ClaimRequest::new(pos))
        .expect("claim");
    engine.durable_match(&order).expect("live").encode()
}

/// Applies (position, xor) edits and an optional truncation to `bytes`.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, x) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] ^= x.max(1);
        }
    }
    if let Some(c) = cut {
        bytes.truncate(c % (bytes.len() + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), n in 0u32..100) {
        let _ = Manifest::decode(&bytes);
        let _ = DurableMatch::decode(&bytes);
        let manifest = Manifest {
            format: SNAPSHOT_FORMAT,
            generation: 1,
            taken_at_ms: 0,
            resolution: 6,
            drivers: u64::from(n),
            chunks: vec![ChunkInfo { len: bytes.len() as u64, crc32: crc32fast::hash(&bytes), drivers: n }],
        };
        let engine = Engine::new(EngineConfig::default()).expect("config");
        prop_assert!(engine.restore_snapshot(&manifest, &[bytes]).is_err());
        prop_assert!(engine.is_empty());
    }

    #[test]
    fn mutated_snapshots_are_rejected_whole(chunk in 0usize..3, edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in proptest::option::of(any::<usize>())) {
        let snap = sample_snapshot();
        let mut chunks = snap.chunks.clone();
        let i = chunk % chunks.len();
        chunks[i] = mutate(chunks[i].clone(), &edits, cut);
        // Two edits of one byte can cancel out; an unchanged input proves nothing.
        prop_assume!(chunks[i] != snap.chunks[i]);
        let engine = Engine::new(EngineConfig::default()).expect("config");
        prop_assert!(engine.restore_snapshot(&snap.manifest, &chunks).is_err());
        prop_assert!(engine.is_empty());
        let manifest = mutate(snap.manifest.encode(), &edits, cut);
        if manifest != snap.manifest.encode() {
            prop_assert!(Manifest::decode(&manifest).is_err());
        }
    }

    #[test]
    fn mutated_match_records_are_rejected(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4), cut in proptest::option::of(any::<usize>())) {
        let original = sample_record();
        let bytes = mutate(original.clone(), &edits, cut);
        prop_assume!(bytes != original);
        prop_assert!(DurableMatch::decode(&bytes).is_err());
    }
}
