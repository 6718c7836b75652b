//! `icount` — a fixed amount of engine work on a deterministic engine, for
//! instruction counting under `valgrind --tool=callgrind`
//! (`benches/scripts/callgrind.sh`).
//!
//! Every mode builds the same engine (100k clustered Chicago drivers by
//! default), the same query list and the same pre-generated moves; only
//! the loop differs. So `instructions(mode) - instructions(baseline)` is
//! the cost of `ops` operations, stable on a noisy machine.
//!
//! ```sh
//! valgrind --tool=callgrind target/release/icount nearest --ops 20000
//! ```

use std::hint::black_box;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use hexmatch::{Capabilities, DriverUpdate, Engine, NearestQuery, Vehicle};
use hexmatch_benches::{
    Mover, build_engine, chicago_bounds, chicago_pickups, city_drivers, jitter, measure_build,
};

/// Fixed seeds: every run does exactly the same work.
const DRIVER_SEED: u64 = 7;
const JITTER_SEED: u64 = 0x5EED;
const MOVER_SEED: u64 = 11;

/// Runs a fixed number of engine operations (for instruction counts).
#[derive(Debug, Parser)]
#[command(name = "icount", version, about)]
struct Args {
    /// What to run after the set-up.
    #[arg(value_enum)]
    mode: Mode,
    /// How many operations.
    #[arg(long, default_value_t = 20_000)]
    ops: usize,
    /// Drivers in the engine.
    #[arg(long, default_value_t = 100_000)]
    drivers: usize,
    /// k of the nearest queries.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Capabilities the nearest queries require (comma-separated names).
    #[arg(long, default_value = "")]
    capabilities: String,
    /// Vehicle class the nearest queries require.
    #[arg(long)]
    vehicle: Option<String>,
}

/// The operation to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Set-up only: subtract this from the others.
    Baseline,
    /// `nearest` k queries at jittered real pickups, with the filters of
    /// `--capabilities` and `--vehicle` (none by default).
    Nearest,
    /// `upsert` location moves of up to 300 m (every one applies).
    Move,
    /// Snapshots the engine (50k drivers a chunk), then restores it into
    /// a fresh engine `ops` times (count with
    /// `--toggle-collect='*restore_snapshot*'`: the snapshot is set-up).
    Restore,
}

/// The measured loop of `nearest` (a function of its own, never inlined,
/// so `--toggle-collect='icount::run_queries'` counts exactly it).
#[inline(never)]
fn run_queries(engine: &Engine, queries: &[NearestQuery], ops: usize) {
    for q in queries.iter().cycle().take(ops) {
        black_box(engine.nearest(q).expect("valid query"));
    }
}

/// The measured loop of `move` (see [`run_queries`]).
#[inline(never)]
fn run_moves(engine: &Engine, moves: &[DriverUpdate]) {
    for u in moves {
        black_box(engine.upsert(u).expect("valid move"));
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(1..=hexmatch::MAX_K).contains(&args.k) {
        eprintln!("icount: --k {} is out of range", args.k);
        return ExitCode::FAILURE;
    }
    let caps: Capabilities = match args.capabilities.parse() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("icount: --capabilities: {e}");
            return ExitCode::FAILURE;
        }
    };
    let vehicle: Option<Vehicle> = match args.vehicle.as_deref().map(str::parse).transpose() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("icount: --vehicle: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ((engine, _clock), mem) = measure_build(args.drivers, || {
        build_engine(city_drivers(args.drivers, DRIVER_SEED))
    });
    let queries: Vec<NearestQuery> = jitter(&chicago_pickups(), 300.0, JITTER_SEED)
        .into_iter()
        .map(|p| {
            let q = NearestQuery::new(p, args.k)
                .expect("k was checked")
                .with_capabilities(caps);
            match vehicle {
                Some(v) => q.with_vehicle(v),
                None => q,
            }
        })
        .collect();
    let mut mover = Mover::from_drivers(
        city_drivers(args.drivers, DRIVER_SEED),
        |_| true,
        chicago_bounds(),
        MOVER_SEED,
    );
    let moves: Vec<DriverUpdate> = (0..args.ops).map(|_| mover.next_update()).collect();
    match args.mode {
        Mode::Baseline => {}
        Mode::Nearest => run_queries(&engine, &queries, args.ops),
        Mode::Move => run_moves(&engine, &moves),
        Mode::Restore => {
            let snap = engine.snapshot(1, 50_000);
            for _ in 0..args.ops {
                let fresh = Engine::new(hexmatch::EngineConfig::default())
                    .expect("the default config is valid");
                black_box(
                    fresh
                        .restore_snapshot(&snap.manifest, &snap.chunks)
                        .expect("restores"),
                );
            }
        }
    }
    black_box((&queries, &moves));
    println!(
        "{:?} {} ops on {} drivers",
        args.mode, args.ops, args.drivers
    );
    // A fresh process: the engine's memory without a previous build's
    // freed-but-kept heap (`icount baseline --drivers 10000000 --ops 1`).
    if let Some(m) = mem {
        println!(
            "memory: RSS {:.1} MiB -> {:.1} MiB, {:.0} bytes/driver (build {:.2} s)",
            m.rss_before as f64 / 1_048_576.0,
            m.rss_after as f64 / 1_048_576.0,
            m.bytes_per_driver(),
            m.build_time.as_secs_f64()
        );
    }
    ExitCode::SUCCESS
}
