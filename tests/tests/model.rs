//! Model-based test: random sequences of upserts, moves, status changes,
//! removals, clock advances and TTL sweeps, applied both to the engine and
//! to a plain map; after every step the two agree on every driver and on
//! nearest queries, with and without filters (drivers have two of the
//! capabilities and two vehicle classes, so a query may match all, some
//! or none of them).

use std::collections::BTreeMap;
use std::sync::Arc;

use hexmatch::{
    Applied, Capabilities, Clock, Driver, DriverId, DriverUpdate, Engine, EngineConfig,
    ManualClock, NearestQuery, Position, Status, Timestamp, Vehicle,
};
use hexmatch_tests::oracle_nearest;
use proptest::prelude::*;

const IDS: usize = 24;
const TTL_MS: u64 = 60_000;

#[derive(Debug, Clone)]
enum Op {
    Upsert {
        id: usize,
        lat: f64,
        lon: f64,
        ts_back: Option<u16>,
        status: Option<Status>,
        vehicle: Option<Vehicle>,
        caps: Option<u16>,
    },
    Remove(usize),
    Advance(u32),
    Expire,
    Nearest {
        lat: f64,
        lon: f64,
        k: usize,
        radius: Option<f64>,
        vehicle: Option<Vehicle>,
        caps: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Positions in a ~100 km box over a cell-rich area, so moves cross cells.
    let lat = 41.5f64..42.3;
    let lon = -88.2f64..-87.2;
    prop_oneof![
        8 => (0..IDS, lat.clone(), lon.clone(), proptest::option::weighted(0.2, 0u16..5000),
              proptest::option::weighted(0.4, prop_oneof![Just(Status::Available), Just(Status::Busy), Just(Status::Offline)]),
              proptest::option::weighted(0.3, prop_oneof![Just(Vehicle::Car), Just(Vehicle::Bike)]),
              proptest::option::weighted(0.3, 0u16..4))
            .prop_map(|(id, lat, lon, ts_back, status, vehicle, caps)| Op::Upsert { id, lat, lon, ts_back, status, vehicle, caps }),
        1 => (0..IDS).prop_map(Op::Remove),
        2 => (0u32..40_000).prop_map(Op::Advance),
        1 => Just(Op::Expire),
        3 => (lat, lon, 1usize..8, proptest::option::weighted(0.3, 500.0f64..40_000.0),
              proptest::option::weighted(0.3, prop_oneof![Just(Vehicle::Car), Just(Vehicle::Bike), Just(Vehicle::Van)]),
              prop_oneof![2 => Just(0u16), 1 => 1u16..8])
            .prop_map(|(lat, lon, k, radius, vehicle, caps)| Op::Nearest { lat, lon, k, radius, vehicle, caps }),
    ]
}

/// What the model keeps per driver: the driver plus the clock time of its
/// last applied update.
type Model = BTreeMap<usize, (Driver, Timestamp)>;

fn id(i: usize) -> DriverId {
    DriverId::new(&format!("m{i}")).expect("valid")
}

fn upsert(
    engine: &Engine,
    model: &mut Model,
    op: &Op,
    now: Timestamp,
) -> Result<(), TestCaseError> {
    let Op::Upsert {
        id: i,
        lat,
        lon,
        ts_back,
        status,
        vehicle,
        caps,
    } = op
    else {
        unreachable!("called for upserts")
    };
    let pos = Position::new(*lat, *lon).expect("in range");
    let ts = ts_back.map(|b| now.minus_millis(u64::from(b)));
    let u = DriverUpdate {
        id: id(*i),
        pos,
        ts,
        status: *status,
        vehicle: *vehicle,
        capabilities: caps.map(Capabilities::from_bits_truncate),
    };
    let got = engine.upsert(&u).expect("valid update");
    let ts = ts.unwrap_or(now);
    match model.get_mut(i) {
        Some((d, _)) if ts < d.ts => {
            prop_assert_eq!(got, Applied::Stale { current_ts: d.ts });
        }
        Some((d, seen)) => {
            d.pos = pos;
            d.ts = ts;
            d.status = status.unwrap_or(d.status);
            d.vehicle = vehicle.unwrap_or(d.vehicle);
            d.capabilities = u.capabilities.unwrap_or(d.capabilities);
            *seen = now;
            prop_assert_eq!(got, Applied::Applied(d.clone()));
        }
        None => {
            let d = Driver {
                id: id(*i),
                pos,
                ts,
                status: status.unwrap_or(Status::Available),
                vehicle: vehicle.unwrap_or_default(),
                capabilities: u.capabilities.unwrap_or_default(),
                order_id: None,
                reserved_until: None,
            };
            prop_assert_eq!(&got, &Applied::Applied(d.clone()));
            model.insert(*i, (d, now));
        }
    }
    Ok(())
}

fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let clock = Arc::new(ManualClock::new(
        Timestamp::from_millis(1_000_000_000).expect("valid"),
    ));
    let engine = Engine::with_clock(
        EngineConfig {
            driver_ttl_ms: TTL_MS,
            resolution: 6,
            ..Default::default()
        },
        clock.clone(),
    )
    .expect("valid config");
    let mut model: Model = BTreeMap::new();
    for op in ops {
        let now = clock.now();
        match op {
            Op::Upsert { .. } => upsert(&engine, &mut model, op, now)?,
            Op::Remove(i) => {
                let got = engine.remove(&id(*i)).map(|(d, ev)| {
                    assert!(ev.is_none(), "no matches in this test");
                    d
                });
                prop_assert_eq!(got, model.remove(i).map(|(d, _)| d));
            }
            Op::Advance(ms) => clock.advance(u64::from(*ms)),
            Op::Expire => {
                let cutoff = now.minus_millis(TTL_MS);
                let mut got: Vec<DriverId> = engine
                    .expire_drivers()
                    .into_iter()
                    .map(|(d, _)| d.id)
                    .collect();
                got.sort();
                let mut want: Vec<DriverId> = model
                    .iter()
                    .filter(|(_, (_, seen))| *seen < cutoff)
                    .map(|(_, (d, _))| d.id.clone())
                    .collect();
                want.sort();
                model.retain(|_, (_, seen)| *seen >= cutoff);
                prop_assert_eq!(got, want);
            }
            Op::Nearest {
                lat,
                lon,
                k,
                radius,
                vehicle,
                caps,
            } => {
                let q = NearestQuery {
                    radius_m: *radius,
                    vehicle: *vehicle,
                    capabilities: Capabilities::from_bits_truncate(*caps),
                    ..NearestQuery::new(Position::new(*lat, *lon).expect("in range"), *k)
                        .expect("valid k")
                };
                let drivers: Vec<Driver> = model.values().map(|(d, _)| d.clone()).collect();
                let got: Vec<_> = engine
                    .nearest(&q)
                    .expect("valid")
                    .into_iter()
                    .map(|n| (n.id, n.distance_m))
                    .collect();
                prop_assert_eq!(
                    got,
                    oracle_nearest(&drivers, &q, engine.config().max_radius_m)
                );
            }
        }
        // After every step: every id agrees, and the counts add up.
        for i in 0..IDS {
            prop_assert_eq!(engine.driver(&id(i)), model.get(&i).map(|(d, _)| d.clone()));
        }
        let counts = engine.counts();
        prop_assert_eq!(counts.total(), model.len());
        prop_assert_eq!(
            counts.available,
            model
                .values()
                .filter(|(d, _)| d.status == Status::Available)
                .count()
        );
        prop_assert_eq!(engine.len(), model.len());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn engine_agrees_with_a_plain_map(ops in proptest::collection::vec(op(), 1..120)) {
        run(&ops)?;
    }
}
