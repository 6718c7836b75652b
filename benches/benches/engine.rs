//! Criterion benches of the engine on city-scale workloads.
//!
//! Groups (see `benches/README.md` for what each one tells you):
//! - `nearest_1m` — nearest k = 1 / 10 / 50, unfiltered and filtered (35 %,
//!   5 %, 1 % and 0.1 % of drivers match, and filters nobody matches), on
//!   1M clustered drivers (500k available);
//! - `move_1m` — location updates of existing drivers;
//! - `nearest_1m_with_writer` — nearest k = 10 while another thread moves
//!   drivers as fast as it can (its rate is printed);
//! - `nearest_k10_by_size` — city 10k / 100k / 1M and country 10k / 100k /
//!   1M, unfiltered and with a filter nobody matches; with `HEXMATCH_BENCH_10M=1` also both at 10M (about 4 GB of RAM
//!   and a few more minutes);
//! - `claim_1m` — claim + release of a fresh order;
//! - `batch_1m` — `claim_batch` of 1000 orders × 10 candidates at
//!   scattered pickups, and the assignment alone on the orders' own
//!   nearest;
//! - `batch_competing_1m` — `claim_batch` of 1000 orders × 10 candidates at
//!   one pickup, and within 100 m of one pickup;
//! - `region_lookup` — the region of a position (H3 cell, then the cell →
//!   region table) for the 77 Chicago community areas, at resolutions 6 and 8.
//!
//! The 1M engine is built once (bulk load) and shared by every group.

use std::hint::black_box;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use hexmatch::{
    Applied, BatchOrder, Capabilities, ClaimRequest, Engine, EngineConfig, ManualClock,
    NearestQuery, OrderId, Outside, Position, RegionMap, Status, Vehicle, assign_greedy,
    assign_min_cost,
};
use hexmatch_benches::{
    Mover, US_BOUNDS, build_engine, candidate_graph, chicago_bounds, chicago_pickups, city_drivers,
    country_drivers, jitter, random_positions, with_writer,
};

/// Seed of the driver sets (the same one for every size, so the 10k set is
/// drawn from the same city model as the 1M set).
const SEED: u64 = 20_261_124;
/// The big city set.
const BIG: usize = 1_000_000;
/// Orders per batch and candidates per order.
const BATCH: usize = 1_000;
const CANDIDATES: usize = 10;

/// Which drivers a mover moves.
type Keep = fn(&hexmatch::Driver) -> bool;

/// The shared 1M-driver city engine and its query points.
struct World {
    engine: Engine,
    clock: Arc<ManualClock>,
    pickups: Vec<Position>,
}

impl World {
    /// Releases a batch's matches and purges them, so the next batch
    /// finds the same fleet.
    fn release_batch(&self, out: &hexmatch::BatchOutcome) {
        for m in &out.matches {
            self.engine
                .release(&m.order_id, None)
                .expect("a live match releases");
        }
        self.purge_matches();
    }

    /// Ages ended matches past their retention and purges them, so the
    /// match book does not grow with every claim the benches make.
    fn purge_matches(&self) {
        self.clock
            .advance(EngineConfig::default().match_retention_ms + 1);
        self.engine.expire_matches();
    }
}

static CITY: LazyLock<World> = LazyLock::new(|| {
    let start = Instant::now();
    let (engine, clock) = build_engine(city_drivers(BIG, SEED));
    let counts = engine.counts();
    eprintln!(
        "built the {BIG}-driver city engine in {:.2?}: {} available, {} cells",
        start.elapsed(),
        counts.available,
        engine.cell_count()
    );
    World {
        engine,
        clock,
        pickups: chicago_pickups(),
    }
});

/// A mover over the 1M city drivers that `keep` accepts.
fn city_mover(keep: impl Fn(&hexmatch::Driver) -> bool, seed: u64) -> Mover {
    Mover::from_drivers(city_drivers(BIG, SEED), keep, chicago_bounds(), seed)
}

/// Cycles through `queries` one per iteration.
fn bench_queries(b: &mut criterion::Bencher<'_>, engine: &Engine, queries: &[NearestQuery]) {
    let mut it = queries.iter().cycle();
    b.iter(|| {
        let q = it
            .next()
            .expect("a cycle over a non-empty slice is endless");
        black_box(engine.nearest(q).expect("constructed queries are valid"))
    });
}

/// A capability set by name.
fn caps(names: &str) -> Capabilities {
    names.parse().expect("known capabilities")
}

fn nearest(c: &mut Criterion) {
    let w = &*CITY;
    let none = Capabilities::NONE;
    let mut group = c.benchmark_group("nearest_1m");
    group.throughput(Throughput::Elements(1));
    // (name, k, vehicle, capabilities, drivers found: k, or 0 for a filter
    // nobody matches).
    let cases = [
        ("k1", 1, None, none, 1),
        ("k10", 10, None, none, 10),
        ("k50", 50, None, none, 50),
        // 5 % of drivers are vans.
        ("k10_van", 10, Some(Vehicle::Van), none, 10),
        // 35 % of drivers take cash.
        ("k10_cash", 10, None, caps("cash"), 10),
        // 1 % of drivers.
        ("k10_wheelchair", 10, None, caps("wheelchair"), 10),
        // 0.1 % of drivers: one rare capability.
        ("k10_refrigerated", 10, None, caps("refrigerated"), 10),
        // 0.1 % of drivers: two capabilities (1 % and 10 %) together.
        ("k10_wheelchair_pets", 10, None, caps("wheelchair,pets"), 10),
        // Nobody: a capability no driver has.
        ("k10_none_hazmat", 10, None, caps("hazmat"), 0),
        // Nobody: walkers and large items both exist, never together.
        (
            "k10_none_walker_large_items",
            10,
            Some(Vehicle::Walker),
            caps("large_items"),
            0,
        ),
    ];
    for (name, k, vehicle, caps, expect) in cases {
        let queries = queries_at(&w.pickups, k, vehicle, caps);
        let found = w.engine.nearest(&queries[0]).expect("valid query").len();
        assert_eq!(found, expect, "{name}: drivers found in the city set");
        group.bench_function(name, |b| bench_queries(b, &w.engine, &queries));
    }
    group.finish();
}

/// A query of `k` with these filters at each point.
fn queries_at(
    points: &[Position],
    k: usize,
    vehicle: Option<Vehicle>,
    caps: Capabilities,
) -> Vec<NearestQuery> {
    points
        .iter()
        .map(|&p| {
            let q = NearestQuery::new(p, k)
                .expect("valid k")
                .with_capabilities(caps);
            match vehicle {
                Some(v) => q.with_vehicle(v),
                None => q,
            }
        })
        .collect()
}

fn moves(c: &mut Criterion) {
    let w = &*CITY;
    let mut group = c.benchmark_group("move_1m");
    group.throughput(Throughput::Elements(1));
    let cases: [(&str, Keep); 2] = [
        // Every driver reports its position, whatever its status; half of
        // the moves touch an R-tree (available drivers), half only a record.
        ("all_drivers", |_| true),
        // Only available drivers: every move is an R-tree remove + insert.
        ("available_only", |d| d.status == Status::Available),
    ];
    for (i, (name, keep)) in cases.into_iter().enumerate() {
        let mut mover = city_mover(keep, 1 + i as u64);
        for _ in 0..1_000 {
            let applied = w.engine.upsert(&mover.next_update()).expect("valid move");
            assert!(matches!(applied, Applied::Applied(_)), "moves must apply");
        }
        group.bench_function(name, |b| {
            b.iter(|| black_box(w.engine.upsert(&mover.next_update())));
        });
    }
    group.finish();
}

fn nearest_with_writer(c: &mut Criterion) {
    let w = &*CITY;
    let queries: Vec<NearestQuery> = w
        .pickups
        .iter()
        .map(|&p| NearestQuery::new(p, 10).expect("valid k"))
        .collect();
    let mover = city_mover(|_| true, 3);
    let mut group = c.benchmark_group("nearest_1m_with_writer");
    group.throughput(Throughput::Elements(1));
    let ((), writer) = with_writer(&w.engine, mover, || {
        group.bench_function("k10", |b| bench_queries(b, &w.engine, &queries));
    });
    group.finish();
    println!(
        "nearest_1m_with_writer: the writer applied {} moves in {:.2?} = {:.0} moves/s",
        writer.moves,
        writer.elapsed,
        writer.moves_per_sec()
    );
}

fn by_size(c: &mut Criterion) {
    let mut group = c.benchmark_group("nearest_k10_by_size");
    group.throughput(Throughput::Elements(1));
    let pickups = chicago_pickups();
    let city_queries = queries_at(&pickups, 10, None, Capabilities::NONE);
    // A capability no driver has: the search ends at the top, whatever the
    // fleet's size or spread.
    let hazmat = caps("hazmat");
    let city_none = queries_at(&pickups, 10, None, hazmat);
    for n in [10_000, 100_000] {
        let (engine, _clock) = build_engine(city_drivers(n, SEED));
        group.bench_with_input(BenchmarkId::new("city", n), &engine, |b, e| {
            bench_queries(b, e, &city_queries);
        });
        group.bench_with_input(BenchmarkId::new("city_none_match", n), &engine, |b, e| {
            bench_queries(b, e, &city_none);
        });
    }
    group.bench_with_input(BenchmarkId::new("city", BIG), &CITY.engine, |b, e| {
        bench_queries(b, e, &city_queries);
    });
    group.bench_with_input(
        BenchmarkId::new("city_none_match", BIG),
        &CITY.engine,
        |b, e| bench_queries(b, e, &city_none),
    );
    let country_points = random_positions(US_BOUNDS, 10_000, SEED + 1);
    let country_queries = queries_at(&country_points, 10, None, Capabilities::NONE);
    let country_none = queries_at(&country_points, 10, None, hazmat);
    for n in [10_000, 100_000, BIG] {
        let (engine, _clock) = build_engine(country_drivers(n, SEED));
        group.bench_with_input(BenchmarkId::new("country", n), &engine, |b, e| {
            bench_queries(b, e, &country_queries);
        });
        group.bench_with_input(
            BenchmarkId::new("country_none_match", n),
            &engine,
            |b, e| {
                bench_queries(b, e, &country_none);
            },
        );
    }
    if std::env::var_os("HEXMATCH_BENCH_10M").is_some() {
        const HUGE: usize = 10_000_000;
        // One 10M engine at a time: each is about 2 GB.
        let (engine, _clock) = build_engine(city_drivers(HUGE, SEED));
        group.bench_with_input(BenchmarkId::new("city", HUGE), &engine, |b, e| {
            bench_queries(b, e, &city_queries);
        });
        drop(engine);
        let (engine, _clock) = build_engine(country_drivers(HUGE, SEED));
        group.bench_with_input(BenchmarkId::new("country", HUGE), &engine, |b, e| {
            bench_queries(b, e, &country_queries);
        });
    }
    group.finish();
}

fn region_lookup(c: &mut Criterion) {
    let geojson = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/chicago_community_areas.geojson"),
    )
    .expect("data/chicago_community_areas.geojson is part of the repository");
    let pickups = chicago_pickups();
    let mut group = c.benchmark_group("region_lookup");
    group.throughput(Throughput::Elements(1));
    for res in [6, 8] {
        let map = RegionMap::from_geojson(&geojson, res, "chi", Outside::DefaultRegion)
            .expect("the bundled GeoJSON is valid");
        group.bench_with_input(BenchmarkId::new("region_of", res), &map, |b, map| {
            let mut points = pickups.iter().cycle();
            b.iter(|| {
                let p = *points.next().expect("cycle never ends");
                black_box(map.region_of(p))
            });
        });
    }
    group.finish();
}

fn claim(c: &mut Criterion) {
    let w = &*CITY;
    let mut group = c.benchmark_group("claim_1m");
    group.throughput(Throughput::Elements(1));
    let mut pickups = w.pickups.iter().cycle();
    let mut serial = 0u64;
    group.bench_function("claim_release", |b| {
        b.iter_custom(|iters| {
            // Fresh order ids and requests are made outside the timing.
            let orders: Vec<(OrderId, ClaimRequest)> = (0..iters)
                .map(|_| {
                    serial += 1;
                    let p = *pickups.next().expect("endless cycle");
                    let id = OrderId::new(&format!("o{serial}")).expect("valid order id");
                    (id, ClaimRequest::new(p))
                })
                .collect();
            let start = Instant::now();
            for (id, req) in &orders {
                let (m, created) = w.engine.claim(id, req).expect("a driver is available");
                debug_assert!(created);
                black_box(m);
                black_box(w.engine.release(id, None).expect("a live match releases"));
            }
            let elapsed = start.elapsed();
            w.purge_matches();
            elapsed
        });
    });
    group.finish();
}

/// One order at each of `pickups`, with ids `{prefix}-{i}`.
fn orders_at(pickups: &[Position], prefix: &str) -> Vec<BatchOrder> {
    pickups
        .iter()
        .enumerate()
        .map(|(i, &p)| BatchOrder {
            order_id: OrderId::new(&format!("{prefix}-{i}")).expect("valid order id"),
            request: ClaimRequest::new(p),
        })
        .collect()
}

/// A bench group for batches: flat sampling, 20 samples of 4 s,
/// throughput per order.
fn batch_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    group
}

/// Runs `iters` batches from `make`, timing only the `claim_batch` calls;
/// each batch's matches are released (untimed) before the next.
fn time_batches(w: &World, iters: u64, mut make: impl FnMut() -> Vec<BatchOrder>) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let orders = make();
        let start = Instant::now();
        let out = w
            .engine
            .claim_batch(&orders, CANDIDATES)
            .expect("a valid batch");
        total += start.elapsed();
        w.release_batch(&out);
    }
    total
}

fn batch(c: &mut Criterion) {
    let w = &*CITY;
    // The real pickups sit on ~230 distinct points; 300 m of jitter makes
    // them distinct addresses, so 1000 orders do not all fight over the
    // same few drivers.
    let pickups = jitter(&w.pickups, 300.0, SEED + 2);
    let windows = pickups.len() / BATCH;
    let mut serial = 0u64;
    let mut make_batch = |window: usize| -> Vec<BatchOrder> {
        serial += 1;
        orders_at(
            &pickups[window * BATCH..(window + 1) * BATCH],
            &format!("b{serial}"),
        )
    };

    let first = make_batch(0);
    let out = w
        .engine
        .claim_batch(&first, CANDIDATES)
        .expect("a valid batch");
    println!(
        "batch_1m: a batch of {BATCH} orders × {CANDIDATES} candidates serves {} and leaves {} unmatched",
        out.matches.len(),
        out.unmatched.len()
    );
    w.release_batch(&out);

    let mut group = batch_group(c, "batch_1m");
    let mut window = 0;
    group.bench_function("claim_batch_1000x10", |b| {
        b.iter_custom(|iters| {
            time_batches(w, iters, || {
                window = (window + 1) % windows;
                make_batch(window)
            })
        });
    });

    // The assignment alone, on each order's own nearest (the graph
    // claim_batch starts from) for window 0.
    let (n_cols, rows) = candidate_graph(&w.engine, &pickups[..BATCH], CANDIDATES);
    let optimal = assign_min_cost(n_cols, &rows);
    let greedy = assign_greedy(n_cols, &rows);
    println!(
        "batch_1m: graph of {} orders, {n_cols} drivers, {} edges; optimal serves {} at {:.1} km, greedy {} at {:.1} km",
        rows.len(),
        rows.iter().map(Vec::len).sum::<usize>(),
        optimal.matched,
        optimal.total_cost as f64 / 1e6,
        greedy.matched,
        greedy.total_cost as f64 / 1e6,
    );
    group.bench_function("assign_min_cost_1000x10", |b| {
        b.iter(|| black_box(assign_min_cost(n_cols, black_box(&rows))));
    });
    group.bench_function("assign_greedy_1000x10", |b| {
        b.iter(|| black_box(assign_greedy(n_cols, black_box(&rows))));
    });
    group.finish();
}

/// Orders that compete for the same drivers: 1000 at one pickup, and 1000
/// scattered within 100 m of it, each in a fresh batch.
fn batch_competing(c: &mut Criterion) {
    let w = &*CITY;
    let mut group = batch_group(c, "batch_competing_1m");
    let mut serial = 0u64;
    let centre = w.pickups[0];
    for (name, spread_m) in [("co_located_1000x10", 0.0), ("within_100m_1000x10", 100.0)] {
        let points = jitter(&vec![centre; BATCH], spread_m, SEED + 3);
        let mut make = || -> Vec<BatchOrder> {
            serial += 1;
            orders_at(&points, &format!("c{serial}"))
        };
        let out = w
            .engine
            .claim_batch(&make(), CANDIDATES)
            .expect("a valid batch");
        println!(
            "batch_competing_1m: {name}: serves {} and leaves {} unmatched, {:.1} km in all",
            out.matches.len(),
            out.unmatched.len(),
            out.matches.iter().map(|m| m.distance_m).sum::<f64>() / 1e3,
        );
        w.release_batch(&out);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| time_batches(w, iters, &mut make));
        });
    }

    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = nearest, moves, nearest_with_writer, by_size, claim, batch, batch_competing, region_lookup
}
criterion_main!(benches);
