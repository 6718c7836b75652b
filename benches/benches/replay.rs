//! The whole Chicago trip file through a simulated fleet, as
//! `hexmatch replay trips data/chicago_trips.csv --fold-day --realtime max`
//! does in process: parse the CSV, fold it onto one day, simulate 300
//! drivers serving all 11,615 trips, build the report. Target: well under
//! 5 s per replay.
//!
//! Run: `cargo bench -p hexmatch-benches --bench replay` (about a minute).
//! `cargo bench -p hexmatch-benches --bench replay -- --test` runs each
//! replay once as a smoke test. The CLI itself, for comparison:
//! `time target/release/hexmatch replay trips data/chicago_trips.csv --fold-day`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use hexmatch::EngineConfig;
use hexmatch::sim::{
    BatchPolicy, Dispatch, Fleet, LocalBackend, NearestPolicy, SimConfig, Simulation,
    fold_onto_day, parse_trips,
};
use hexmatch_benches::chicago_trips_path;

/// One replay of the folded Chicago day, from the CSV text to the report.
fn replay(text: &str, policy: Box<dyn Dispatch>) -> hexmatch::sim::Report {
    let mut trips = parse_trips(text).expect("the bundled file parses").trips;
    fold_onto_day(&mut trips);
    let backend = LocalBackend::new(EngineConfig::default()).expect("default config");
    let sim = Simulation::new(
        SimConfig::default(),
        trips,
        Fleet::Sampled(300),
        policy,
        backend,
    )
    .expect("valid setup");
    sim.run().expect("the replay runs").report
}

fn chicago_day(c: &mut Criterion) {
    let text = std::fs::read_to_string(chicago_trips_path()).expect("data/chicago_trips.csv");
    let mut group = c.benchmark_group("replay_chicago_day");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("nearest_300_drivers", |b| {
        b.iter(|| black_box(replay(black_box(&text), Box::new(NearestPolicy))));
    });
    group.bench_function("batch_10s_300_drivers", |b| {
        b.iter(|| black_box(replay(black_box(&text), Box::new(BatchPolicy::default()))));
    });
    group.finish();
}

criterion_group!(benches, chicago_day);
criterion_main!(benches);
