//! Real data: the NY Harbor AIS log and the Chicago trips from `data/`,
//! replayed into the engine; nearest queries checked against the oracle.

use hexmatch::{
    Capabilities, Driver, DriverId, DriverUpdate, Engine, EngineConfig, NearestQuery, Status,
    Vehicle,
};
use hexmatch_tests::{load_ais, load_chicago_pickups, oracle_nearest};

/// Streams every AIS report through `upsert` (vessels as drivers, in
/// recorded order, with their recorded timestamps), then checks nearest
/// queries from every 97th report's position against the oracle over each
/// vessel's last position.
#[test]
fn ais_stream_then_nearest_matches_oracle() {
    let rows = load_ais();
    assert_eq!(
        rows.len(),
        150_269,
        "data/nyharbor_ais_positions.csv is the documented file"
    );
    let engine = Engine::new(EngineConfig {
        resolution: 7,
        ..Default::default()
    })
    .expect("valid config");
    let mut last: std::collections::HashMap<String, Driver> = std::collections::HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        let id = DriverId::new(&r.vehicle_id).expect("MMSI ids are valid");
        // Every fifth vessel (by MMSI) is busy, so the status filter is exercised.
        let busy = r.vehicle_id.bytes().map(u32::from).sum::<u32>() % 5 == 0;
        let mut u = DriverUpdate::location(id.clone(), r.pos, Some(r.ts));
        u.status = Some(if busy {
            Status::Busy
        } else {
            Status::Available
        });
        let applied = engine.upsert(&u).expect("valid update");
        assert!(
            matches!(applied, hexmatch::Applied::Applied(_)),
            "row {i}: rows are in time order, none is stale"
        );
        last.insert(
            r.vehicle_id.clone(),
            hexmatch_tests::driver(
                &r.vehicle_id,
                r.pos,
                u.status.expect("set"),
                Vehicle::Car,
                Capabilities::NONE,
            ),
        );
    }
    assert_eq!(engine.len(), 112);
    let drivers: Vec<Driver> = last.into_values().collect();
    let mut checked = 0;
    for r in rows.iter().step_by(97) {
        for k in [1, 5, 20] {
            let q = NearestQuery::new(r.pos, k).expect("valid");
            let got: Vec<_> = engine
                .nearest(&q)
                .expect("ok")
                .into_iter()
                .map(|n| (n.id, n.distance_m))
                .collect();
            assert_eq!(
                got,
                oracle_nearest(&drivers, &q, engine.config().max_radius_m)
            );
            checked += 1;
        }
    }
    assert!(checked > 4000);
}

/// Chicago pickups as drivers (289 distinct points, so many exact ties),
/// queried from the drop-off side of the city with radii and k up to 100.
#[test]
fn chicago_pickups_with_ties_match_oracle() {
    let pickups = load_chicago_pickups();
    assert_eq!(pickups.len(), 11_615);
    let drivers: Vec<Driver> = pickups
        .iter()
        .enumerate()
        .map(|(i, (trip, pos))| {
            let status = if i % 3 == 0 {
                Status::Busy
            } else {
                Status::Available
            };
            let vehicle = if i % 7 == 0 {
                Vehicle::Van
            } else {
                Vehicle::Car
            };
            hexmatch_tests::driver(
                trip,
                *pos,
                status,
                vehicle,
                Capabilities::from_bits_truncate((i % 4) as u16),
            )
        })
        .collect();
    let engine = Engine::new(EngineConfig::default()).expect("valid");
    engine.bulk_load(drivers.clone()).expect("load");
    for (i, (_, pos)) in pickups.iter().enumerate().step_by(53) {
        let mut q = NearestQuery::new(*pos, 1 + i % 100).expect("valid");
        if i % 2 == 0 {
            q = q.with_radius(500.0 + (i % 5000) as f64).expect("valid");
        }
        if i % 3 == 0 {
            q = q.with_vehicle(Vehicle::Van);
        }
        let got: Vec<_> = engine
            .nearest(&q)
            .expect("ok")
            .into_iter()
            .map(|n| (n.id, n.distance_m))
            .collect();
        assert_eq!(
            got,
            oracle_nearest(&drivers, &q, engine.config().max_radius_m),
            "query {q:?}"
        );
    }
}
