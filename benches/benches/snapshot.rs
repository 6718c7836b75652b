//! Snapshot encode and restore at 1M drivers (target: ≤ 0.5 s each),
//! in-process (no Redis: this is the engine's share of a snapshot).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use hexmatch::{Engine, EngineConfig};
use hexmatch_benches::{build_engine, city_drivers};

const N: usize = 1_000_000;
const CHUNK: usize = 50_000;

fn snapshot(c: &mut Criterion) {
    let (engine, _clock) = build_engine(city_drivers(N, 7));
    let snap = engine.snapshot(1, CHUNK);
    let bytes: usize = snap.chunks.iter().map(Vec::len).sum();
    eprintln!(
        "snapshot of {N} drivers: {} chunks, {:.1} MB ({:.1} bytes/driver)",
        snap.chunks.len(),
        bytes as f64 / 1e6,
        bytes as f64 / N as f64
    );
    let mut g = c.benchmark_group("snapshot_1m");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("encode", |b| {
        b.iter(|| black_box(engine.snapshot(2, CHUNK)));
    });
    g.bench_function("decode_and_restore", |b| {
        b.iter(|| {
            let fresh = Engine::new(EngineConfig::default()).expect("valid config");
            black_box(
                fresh
                    .restore_snapshot(&snap.manifest, &snap.chunks)
                    .expect("restores"),
            )
        });
    });
    g.bench_function("decode_only", |b| {
        b.iter(|| {
            black_box(
                hexmatch::decode_snapshot(&snap.manifest, &snap.chunks)
                    .expect("decodes")
                    .len(),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, snapshot);
criterion_main!(benches);
