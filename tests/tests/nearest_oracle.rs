//! Property tests: `Engine::nearest` equals a brute-force haversine oracle
//! on dense cities, sparse countries, the antimeridian and the poles, with
//! filters of every selectivity (all drivers match, half, a few, a rare
//! capability, nobody), radii and region cells, at several partition
//! resolutions; after
//! a bulk load, upserts, or a load into an engine holding half of them
//! already, and again after moves, changes of attributes and status, and
//! removals.

use hexmatch::{
    Capabilities, CellSet, Driver, Engine, EngineConfig, MAX_DISTANCE_M, NearestQuery, Position,
    Resolution, Status, Vehicle,
};
use hexmatch_tests::{Change, apply_changes, cell_of, driver, oracle_nearest, wrapped};
use proptest::prelude::*;

/// Where points are drawn from.
#[derive(Debug, Clone, Copy)]
enum Area {
    /// ±0.05° around a centre anywhere on Earth (a dense city).
    City(f64, f64),
    /// The whole globe (a sparse world).
    World,
    /// Within 1° of the antimeridian.
    Antimeridian,
    /// Within 2° of a pole.
    Pole(bool),
}

fn point_in(area: Area) -> BoxedStrategy<Position> {
    match area {
        Area::City(lat, lon) => (-0.05f64..0.05, -0.05f64..0.05)
            .prop_map(move |(a, b)| wrapped(lat + a, lon + b))
            .boxed(),
        Area::World => (-90.0f64..=90.0, -180.0f64..=180.0)
            .prop_map(|(a, b)| wrapped(a, b))
            .boxed(),
        Area::Antimeridian => (-60.0f64..60.0, -1.0f64..1.0)
            .prop_map(|(a, b)| wrapped(a, if b < 0.0 { 180.0 + b } else { -180.0 + b }))
            .boxed(),
        Area::Pole(north) => (0.0f64..2.0, -180.0f64..=180.0)
            .prop_map(move |(a, b)| wrapped(if north { 90.0 - a } else { -90.0 + a }, b))
            .boxed(),
    }
}

fn area() -> impl Strategy<Value = Area> {
    prop_oneof![
        ((-89.0f64..89.0), (-180.0f64..180.0)).prop_map(|(a, b)| Area::City(a, b)),
        Just(Area::City(41.88, -87.63)),
        Just(Area::World),
        Just(Area::Antimeridian),
        any::<bool>().prop_map(Area::Pole),
    ]
}

/// Status, vehicle (never a walker) and capabilities: each of the first
/// three capabilities for half the drivers, the fifth (wheelchair) for one
/// in 32, the fourth and the sixth and above for nobody.
fn attrs() -> impl Strategy<Value = (Status, Vehicle, Capabilities)> {
    (
        prop_oneof![6 => Just(Status::Available), 1 => Just(Status::Busy), 1 => Just(Status::Offline)],
        prop_oneof![4 => Just(Vehicle::Car), 1 => Just(Vehicle::Bike), 1 => Just(Vehicle::Van)],
        (0u16..8, 0u8..32).prop_map(|(c, r)| {
            Capabilities::from_bits_truncate(c | if r == 0 { 1 << 4 } else { 0 })
        }),
    )
}

/// A query's filters: often none (everybody matches), else a vehicle
/// class (walkers: nobody) and capabilities from the five lowest, which
/// drivers have from half of them to nobody.
fn filters() -> impl Strategy<Value = (Option<Vehicle>, Capabilities)> {
    (
        proptest::option::weighted(
            0.3,
            prop_oneof![
                Just(Vehicle::Car),
                Just(Vehicle::Bike),
                Just(Vehicle::Van),
                Just(Vehicle::Walker)
            ],
        ),
        proptest::option::weighted(0.4, (1u16..32).prop_map(Capabilities::from_bits_truncate)),
    )
        .prop_map(|(v, c)| (v, c.unwrap_or(Capabilities::NONE)))
}

/// Drivers in an area; some share exact positions to exercise ties.
fn drivers_in(area: Area) -> impl Strategy<Value = Vec<Driver>> {
    let one = (point_in(area), attrs());
    proptest::collection::vec(one, 0..250)
        .prop_flat_map(|v| {
            let n = v.len();
            (Just(v), proptest::collection::vec(any::<bool>(), n))
        })
        .prop_map(|(v, dup)| {
            let mut out: Vec<Driver> = Vec::with_capacity(v.len());
            for (i, ((pos, (status, vehicle, caps)), dup)) in v.into_iter().zip(dup).enumerate() {
                let pos = if dup && i > 0 { out[i / 2].pos } else { pos };
                out.push(driver(&format!("d{i:03}"), pos, status, vehicle, caps));
            }
            out
        })
}

fn query_in(area: Area) -> impl Strategy<Value = NearestQuery> {
    (
        point_in(area),
        1usize..25,
        proptest::option::weighted(0.3, 10.0f64..3_000_000.0),
        filters(),
    )
        .prop_map(|(pos, k, radius_m, (vehicle, capabilities))| NearestQuery {
            pos,
            k,
            radius_m,
            vehicle,
            capabilities,
            within: None,
        })
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (any::<usize>(), -0.01f64..0.01, -0.01f64..0.01)
            .prop_map(|(i, a, b)| Change::Move(i, a, b)),
        2 => (any::<usize>(), attrs()).prop_map(|(i, a)| Change::Attributes(i, a)),
        1 => any::<usize>().prop_map(Change::Remove),
    ]
}

/// A scenario: the resolution, `max_radius_m`, the drivers, the queries
/// (each narrowed, or not, to the cells of every n-th driver), and the
/// changes made before the queries are asked again.
type Scenario = (
    u8,
    f64,
    Vec<Driver>,
    Vec<(NearestQuery, Option<usize>)>,
    Vec<Change>,
);

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        area(),
        0u8..=9,
        prop_oneof![Just(MAX_DISTANCE_M), Just(50_000.0), Just(2_000_000.0)],
    )
        .prop_flat_map(|(area, res, max_r)| {
            (
                Just(res),
                Just(max_r),
                drivers_in(area),
                proptest::collection::vec(
                    (query_in(area), proptest::option::weighted(0.3, 1usize..4)),
                    1..12,
                ),
                proptest::collection::vec(change(), 0..80),
            )
        })
}

/// How a scenario's drivers enter the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// `bulk_load` into the empty engine.
    BulkLoaded,
    /// One `upsert` each.
    Upserted,
    /// Every other one upserted, then all of them given to `load` (the
    /// rest new, those known applied as updates).
    LoadedWhileRunning,
}

fn check(
    (res, max_r, drivers, queries, changes): &Scenario,
    entry: Entry,
) -> Result<(), TestCaseError> {
    let (res, max_r) = (*res, *max_r);
    let engine = Engine::new(EngineConfig {
        resolution: res,
        max_radius_m: max_r,
        ..Default::default()
    })
    .expect("valid config");
    let upsert = |d: &Driver| {
        let mut u = hexmatch::DriverUpdate::location(d.id.clone(), d.pos, Some(d.ts));
        u.status = Some(d.status);
        u.vehicle = Some(d.vehicle);
        u.capabilities = Some(d.capabilities);
        engine.upsert(&u).expect("valid update");
    };
    match entry {
        Entry::BulkLoaded => {
            engine
                .bulk_load(drivers.iter().cloned())
                .expect("bulk load");
        }
        Entry::Upserted => drivers.iter().for_each(upsert),
        Entry::LoadedWhileRunning => {
            drivers.iter().step_by(2).for_each(upsert);
            let n = engine.load(drivers.iter().cloned()).expect("load");
            prop_assert_eq!(n, drivers.len(), "drivers added or updated");
            prop_assert_eq!(engine.len(), drivers.len());
        }
    }
    let mut drivers = drivers.clone();
    for round in ["loaded", "changed"] {
        if round == "changed" {
            apply_changes(&engine, &mut drivers, changes);
        }
        for (q, every) in queries {
            let mut q = q.clone();
            if let Some(n) = every {
                let res = Resolution::try_from(res).expect("0..=9");
                let cells = drivers.iter().step_by(*n).map(|d| cell_of(d.pos, res));
                q.within = Some(CellSet::new(res, cells).expect("cells of res"));
            }
            let q = &q;
            let got: Vec<_> = engine
                .nearest(q)
                .expect("valid query")
                .into_iter()
                .map(|n| (n.id, n.distance_m))
                .collect();
            let want = oracle_nearest(&drivers, q, max_r);
            prop_assert_eq!(got, want, "{} query {:?}", round, q);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn nearest_equals_oracle_bulk_loaded(s in scenario()) {
        check(&s, Entry::BulkLoaded)?;
    }

    #[test]
    fn nearest_equals_oracle_upserted(s in scenario()) {
        check(&s, Entry::Upserted)?;
    }

    #[test]
    fn nearest_equals_oracle_loaded_while_running(s in scenario()) {
        check(&s, Entry::LoadedWhileRunning)?;
    }
}

/// A driver hundreds of km away is found without a radius, and not beyond
/// `max_radius_m`.
#[test]
fn sparse_far_driver_is_found_up_to_max_radius() {
    let p = |lat, lon| Position::new(lat, lon).expect("valid");
    let drivers = vec![driver(
        "far",
        p(45.0, -93.0),
        Status::Available,
        Vehicle::Car,
        Capabilities::NONE,
    )];
    let q = NearestQuery::new(p(41.88, -87.63), 1).expect("valid");
    let dist = q.pos.distance_m(drivers[0].pos);
    assert!(dist > 500_000.0 && dist < 700_000.0, "{dist}");
    let wide = Engine::new(EngineConfig {
        max_radius_m: 1_000_000.0,
        ..Default::default()
    })
    .expect("valid");
    wide.bulk_load(drivers.clone()).expect("load");
    assert_eq!(wide.nearest(&q).expect("ok").len(), 1);
    let narrow = Engine::new(EngineConfig {
        max_radius_m: 400_000.0,
        ..Default::default()
    })
    .expect("valid");
    narrow.bulk_load(drivers).expect("load");
    assert!(narrow.nearest(&q).expect("ok").is_empty());
}
