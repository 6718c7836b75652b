//! Latency percentiles that Criterion's means do not give.
//!
//! On the 1M-driver clustered city set (see `hexmatch_benches::city_drivers`):
//! 1. resident memory per driver after a bulk load;
//! 2. nearest k = 10, 200k queries timed one by one, on the freshly
//!    bulk-loaded engine;
//! 3. single-thread move throughput (after one full cycle of warm-up
//!    moves) and move percentiles;
//! 4. nearest k = 10 again, quiet, on the now "lived-in" engine (the
//!    number the nearest p50 target is checked against), then with
//!    filters: 1 % and 0.1 % of drivers match, and nobody matches;
//! 5. nearest k = 10 while a second thread moves drivers continuously,
//!    with the writer's achieved moves/s;
//! 6. claim latency (each claim timed, its release not);
//! 7. with `HEXMATCH_BENCH_10M=1`, memory per driver (and quiet nearest
//!    k = 10 percentiles) at 10M drivers.
//!
//! Run: `cargo bench -p hexmatch-benches --bench latency`. Under
//! `cargo bench -- --test` it runs a tiny version (10k drivers, 1k queries)
//! as a smoke test. Percentiles include the cost of reading the clock
//! twice (printed as "timer overhead").

use std::hint::black_box;
use std::time::{Duration, Instant};

use hexmatch::{
    Applied, Capabilities, ClaimRequest, Engine, EngineConfig, ManualClock, NearestQuery, OrderId,
    Position, Vehicle,
};
use hexmatch_benches::{
    MemoryReport, Mover, Percentiles, build_engine, chicago_bounds, chicago_pickups, city_drivers,
    measure_build, with_writer,
};

const SEED: u64 = 20_261_124;

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Plan {
    drivers: usize,
    warmup_queries: usize,
    queries: usize,
    /// Queries timed for each filter.
    filtered_queries: usize,
    moves: usize,
    timed_moves: usize,
    claims: usize,
    smoke: bool,
}

const FULL: Plan = Plan {
    drivers: 1_000_000,
    warmup_queries: 20_000,
    queries: 200_000,
    filtered_queries: 20_000,
    moves: 1_000_000,
    timed_moves: 200_000,
    claims: 50_000,
    smoke: false,
};

const SMOKE: Plan = Plan {
    drivers: 10_000,
    warmup_queries: 100,
    queries: 1_000,
    filtered_queries: 200,
    moves: 10_000,
    timed_moves: 1_000,
    claims: 1_000,
    smoke: true,
};

/// A target line: `name: measured (target) ok|MISS`.
fn verdict(plan: Plan, name: &str, measured: &str, target: &str, met: bool) {
    let mark = if plan.smoke {
        "(smoke run)"
    } else if met {
        "ok"
    } else {
        "MISS"
    };
    println!("  {name:<44} {measured:>14}   target {target:<26} {mark}");
}

fn print_memory(label: &str, m: Option<MemoryReport>) -> Option<f64> {
    let Some(m) = m else {
        println!("{label}: RSS not readable on this system");
        return None;
    };
    println!(
        "{label}: RSS {:.1} MiB -> {:.1} MiB, {:.0} bytes/driver (build {:.2?})",
        m.rss_before as f64 / 1_048_576.0,
        m.rss_after as f64 / 1_048_576.0,
        m.bytes_per_driver(),
        m.build_time
    );
    Some(m.bytes_per_driver())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Times each query; returns the percentiles.
fn time_queries(engine: &Engine, queries: &[NearestQuery], n: usize, skip: usize) -> Percentiles {
    let mut samples = Vec::with_capacity(n);
    for q in queries.iter().cycle().skip(skip).take(n) {
        let start = Instant::now();
        let out = engine.nearest(q).expect("constructed queries are valid");
        samples.push(nanos(start.elapsed()));
        black_box(out);
    }
    Percentiles::of(&mut samples).expect("at least one query")
}

/// The cost of the two clock reads around each timed operation.
fn timer_overhead_ns() -> f64 {
    let n = 200_000u32;
    let start = Instant::now();
    for _ in 0..n {
        black_box(Instant::now().elapsed());
    }
    start.elapsed().as_nanos() as f64 / f64::from(n)
}

/// Single-thread moves: after a warm-up, the rate over `plan.moves` moves
/// (not individually timed), then the percentiles of `plan.timed_moves`
/// individually timed ones.
fn single_thread_moves(plan: Plan, engine: &Engine) -> (f64, Percentiles) {
    let n = plan.drivers;
    let mut mover = Mover::from_drivers(city_drivers(n, SEED), |_| true, chicago_bounds(), 1);
    // Warm-up: one full cycle, so every driver has moved once since the
    // bulk load. The first move out of or into a bulk-loaded (exactly sized)
    // node or slot vector reallocates it; after that the trees are in their
    // steady, "lived-in" state.
    for _ in 0..mover.len() {
        black_box(engine.upsert(&mover.next_update()).expect("valid move"));
    }
    let start = Instant::now();
    for _ in 0..plan.moves {
        black_box(engine.upsert(&mover.next_update()).expect("valid move"));
    }
    let rate = plan.moves as f64 / start.elapsed().as_secs_f64();
    let mut samples = Vec::with_capacity(plan.timed_moves);
    let mut stale = 0usize;
    for _ in 0..plan.timed_moves {
        let u = mover.next_update();
        let start = Instant::now();
        let applied = engine.upsert(&u).expect("valid move");
        samples.push(nanos(start.elapsed()));
        stale += usize::from(matches!(applied, Applied::Stale { .. }));
    }
    assert_eq!(stale, 0, "every generated move has a newer ts");
    (
        rate,
        Percentiles::of(&mut samples).expect("at least one move"),
    )
}

/// Nearest percentiles while a second thread moves drivers continuously;
/// also the writer's moves/s.
fn nearest_with_writer(
    plan: Plan,
    engine: &Engine,
    queries: &[NearestQuery],
) -> (Percentiles, f64) {
    let mover = Mover::from_drivers(
        city_drivers(plan.drivers, SEED),
        |_| true,
        chicago_bounds(),
        2,
    );
    let (busy, writer) = with_writer(engine, mover, || {
        black_box(time_queries(engine, queries, plan.warmup_queries, 0));
        time_queries(engine, queries, plan.queries, plan.warmup_queries)
    });
    println!(
        "concurrent writer:          {} moves in {:.2?} = {:.0} moves/s",
        writer.moves,
        writer.elapsed,
        writer.moves_per_sec()
    );
    (busy, writer.moves_per_sec())
}

/// Claim latency: each claim timed, its release not; ended matches are
/// aged past their retention and purged every 10k claims.
fn claims(plan: Plan, engine: &Engine, clock: &ManualClock, pickups: &[Position]) -> Percentiles {
    let mut samples = Vec::with_capacity(plan.claims);
    let retention = EngineConfig::default().match_retention_ms;
    for (i, &p) in pickups.iter().cycle().take(plan.claims).enumerate() {
        let id = OrderId::new(&format!("lat{i}")).expect("valid order id");
        let req = ClaimRequest::new(p);
        let start = Instant::now();
        let claimed = engine.claim(&id, &req);
        samples.push(nanos(start.elapsed()));
        claimed.expect("a driver is available");
        engine.release(&id, None).expect("a live match releases");
        if i % 10_000 == 9_999 {
            clock.advance(retention + 1);
            engine.expire_matches();
        }
    }
    Percentiles::of(&mut samples).expect("at least one claim")
}

/// The filtered cases: a name, the filter, and whether drivers match it.
struct FilterCase {
    name: &'static str,
    vehicle: Option<Vehicle>,
    caps: &'static str,
    /// `None` for a filter nobody matches.
    target_p50_ns: Option<u64>,
}

const FILTERS: [FilterCase; 4] = [
    FilterCase {
        name: "wheelchair (1 %)",
        vehicle: None,
        caps: "wheelchair",
        target_p50_ns: Some(4_000),
    },
    FilterCase {
        name: "refrigerated (0.1 %)",
        vehicle: None,
        caps: "refrigerated",
        target_p50_ns: Some(8_000),
    },
    FilterCase {
        name: "hazmat (nobody)",
        vehicle: None,
        caps: "hazmat",
        target_p50_ns: None,
    },
    FilterCase {
        name: "walker + large_items (nobody)",
        vehicle: Some(Vehicle::Walker),
        caps: "large_items",
        target_p50_ns: None,
    },
];

/// The target p50 of a filter nobody matches.
const NONE_MATCH_P50_NS: u64 = 5_000;

/// Quiet nearest k = 10 with each filter of [`FILTERS`], in that order.
fn filtered(plan: Plan, engine: &Engine, pickups: &[Position]) -> Vec<Percentiles> {
    FILTERS
        .iter()
        .map(|f| {
            let caps: Capabilities = f.caps.parse().expect("known capabilities");
            let queries: Vec<NearestQuery> = pickups
                .iter()
                .map(|&p| {
                    let q = NearestQuery::new(p, 10)
                        .expect("valid k")
                        .with_capabilities(caps);
                    match f.vehicle {
                        Some(v) => q.with_vehicle(v),
                        None => q,
                    }
                })
                .collect();
            let warmup = plan.filtered_queries / 10;
            black_box(time_queries(engine, &queries, warmup, 0));
            let pct = time_queries(engine, &queries, plan.filtered_queries, warmup);
            println!("nearest k=10, {:<30} {pct}", format!("{}:", f.name));
            pct
        })
        .collect()
}

/// What the run measured, for the target summary.
struct Results {
    quiet: Percentiles,
    filtered: Vec<Percentiles>,
    busy: Percentiles,
    writer_rate: f64,
    move_rate: f64,
    bytes_per_driver: Option<f64>,
    claims: Percentiles,
}

fn report_targets(plan: Plan, r: &Results) {
    let us = |ns: u64| format!("{:.2} µs", ns as f64 / 1000.0);
    println!("\ntargets at {} drivers:", plan.drivers);
    let v = |name: &str, measured: String, target: &str, met: bool| {
        verdict(plan, name, &measured, target, met);
    };
    v(
        "nearest k=10 p50, quiet",
        us(r.quiet.p50),
        "≤ 1.5 µs",
        r.quiet.p50 <= 1_500,
    );
    for (f, pct) in FILTERS.iter().zip(&r.filtered) {
        let target = f.target_p50_ns.unwrap_or(NONE_MATCH_P50_NS);
        v(
            &format!("nearest k=10 p50, {}", f.name),
            us(pct.p50),
            &format!("≤ {} µs", target / 1000),
            pct.p50 <= target,
        );
    }
    v(
        "nearest k=10 p50, with writer",
        us(r.busy.p50),
        "≤ 3 µs",
        r.busy.p50 <= 3_000,
    );
    v(
        "nearest k=10 p99, with writer",
        us(r.busy.p99),
        "≤ 15 µs",
        r.busy.p99 <= 15_000,
    );
    v(
        "concurrent writer",
        format!("{:.0}/s", r.writer_rate),
        "≥ 250k moves/s",
        r.writer_rate >= 250_000.0,
    );
    v(
        "move, one thread",
        format!("{:.0}/s", r.move_rate),
        "≥ 500k moves/s",
        r.move_rate >= 500_000.0,
    );
    if let Some(b) = r.bytes_per_driver {
        v(
            "memory",
            format!("{b:.0} B/driver"),
            "≤ 200 B/driver",
            b <= 200.0,
        );
    }
    v(
        "claim p99",
        us(r.claims.p99),
        "≤ 20 µs",
        r.claims.p99 <= 20_000,
    );
}

/// Memory per driver and quiet nearest percentiles at 10M drivers.
fn ten_million(plan: Plan, queries: &[NearestQuery]) {
    let n = 10_000_000;
    println!("\nbuilding {n} drivers (HEXMATCH_BENCH_10M=1)…");
    let ((engine, _clock), mem) = measure_build(n, || build_engine(city_drivers(n, SEED)));
    let b = print_memory(&format!("memory at {n}"), mem);
    black_box(time_queries(&engine, queries, plan.warmup_queries, 0));
    let quiet = time_queries(&engine, queries, plan.queries / 4, plan.warmup_queries);
    println!("nearest k=10 at {n}, quiet: {quiet}");
    if let Some(b) = b {
        verdict(
            plan,
            "memory at 10M",
            &format!("{b:.0} B/driver"),
            "≤ 200 B/driver",
            b <= 200.0,
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` (CI) passes
    // nothing, and gets the smoke run too.
    let args: Vec<String> = std::env::args().collect();
    let plan = if args.iter().any(|a| a == "--test") || !args.iter().any(|a| a == "--bench") {
        SMOKE
    } else {
        FULL
    };
    let n = plan.drivers;
    println!(
        "hexmatch latency: {n} clustered city drivers{}",
        if plan.smoke { " (smoke run)" } else { "" }
    );

    // Memory first, on a fresh process heap.
    let ((engine, clock), mem) = measure_build(n, || build_engine(city_drivers(n, SEED)));
    let bytes_per_driver = print_memory(&format!("memory at {n}"), mem);
    let counts = engine.counts();
    println!(
        "engine: {} drivers, {} available, {} cells",
        counts.total(),
        counts.available,
        engine.cell_count()
    );
    println!(
        "timer overhead: {:.0} ns per timed operation",
        timer_overhead_ns()
    );

    let pickups = chicago_pickups();
    let queries: Vec<NearestQuery> = pickups
        .iter()
        .map(|&p| NearestQuery::new(p, 10).expect("valid k"))
        .collect();

    black_box(time_queries(&engine, &queries, plan.warmup_queries, 0));
    let fresh = time_queries(&engine, &queries, plan.queries, plan.warmup_queries);
    println!("nearest k=10, bulk-loaded:  {fresh}");

    let (move_rate, move_pct) = single_thread_moves(plan, &engine);
    println!("move, one thread:           {move_pct}");
    println!("move, one thread:           {move_rate:.0} moves/s");

    // Quiet again, now that every driver has moved at least once.
    black_box(time_queries(&engine, &queries, plan.warmup_queries, 0));
    let quiet = time_queries(&engine, &queries, plan.queries, plan.warmup_queries);
    println!("nearest k=10, quiet:        {quiet}");
    let filtered = filtered(plan, &engine, &pickups);

    let (busy, writer_rate) = nearest_with_writer(plan, &engine, &queries);
    println!("nearest k=10, with writer:  {busy}");

    let claims = claims(plan, &engine, &clock, &pickups);
    println!("claim (release untimed):    {claims}");

    report_targets(
        plan,
        &Results {
            quiet,
            filtered,
            busy,
            writer_rate,
            move_rate,
            bytes_per_driver,
            claims,
        },
    );

    if std::env::var("HEXMATCH_BENCH_10M").is_ok_and(|v| v == "1") {
        if plan.smoke {
            println!("\nHEXMATCH_BENCH_10M=1 is ignored in a smoke run");
        } else {
            drop(engine);
            ten_million(plan, &queries);
        }
    }
}
