//! Conservation on real data (`data/chicago_trips.csv` folded onto one
//! day): every order is served or lost, no driver is ever on two trips at
//! once, every driven leg starts where the previous one ended and is as
//! long as its end points say, the report's totals are the sums of the
//! legs, and the engine ends where the simulation says it does.

use std::collections::BTreeMap;

use hexmatch::sim::{
    BatchPolicy, Dispatch, Fate, Fleet, Leg, LocalBackend, NearestPolicy, OrderOutcome, Service,
    SimConfig, SimOutcome, Simulation, Trip, fold_onto_day, parse_trips,
};
use hexmatch::{DriverId, EngineConfig, Position, Status};
use hexmatch_tests::data_path;

fn chicago_folded() -> Vec<Trip> {
    let text = std::fs::read_to_string(data_path("chicago_trips.csv")).expect("test setup");
    let file = parse_trips(&text).expect("test setup");
    assert!(file.rejected.is_empty(), "{:?}", file.rejected.first());
    let mut trips = file.trips;
    fold_onto_day(&mut trips);
    trips
}

/// The first `n` trips of the folded day (by time, then id).
fn first_trips(n: usize) -> Vec<Trip> {
    let mut trips = chicago_folded();
    trips.sort_by(|a, b| (a.pickup_time, &a.id).cmp(&(b.pickup_time, &b.id)));
    trips.truncate(n);
    trips
}

/// Drivers at the drop-offs of every 37th trip: given, not sampled.
fn fleet(trips: &[Trip], n: usize) -> Vec<Position> {
    trips
        .iter()
        .step_by(37)
        .map(|t| t.dropoff)
        .cycle()
        .take(n)
        .collect()
}

/// Runs to the end, checking the engine against the simulation there.
fn run(
    config: SimConfig,
    trips: Vec<Trip>,
    fleet: &[Position],
    policy: Box<dyn Dispatch>,
) -> SimOutcome {
    let backend = LocalBackend::new(EngineConfig::default()).expect("test setup");
    let mut sim = Simulation::new(config, trips, Fleet::At(fleet.to_vec()), policy, backend)
        .expect("test setup");
    while sim.step().expect("test setup").is_some() {}
    let engine = sim.backend().engine();
    assert_eq!(engine.live_matches(), 0);
    assert_eq!(engine.counts().available, fleet.len());
    sim.finish()
}

/// A served order and how it was served.
type Served<'a> = (&'a OrderOutcome, &'a Service);

/// Every conservation law, on one outcome.
fn check(outcome: &SimOutcome, trips: &[Trip], fleet: &[Position], config: &SimConfig) {
    let served = check_orders(outcome, trips, config);
    check_legs(outcome, trips, &served, config);
    check_drivers(outcome, fleet, &served);
    check_report(outcome, trips, fleet, &served);
}

/// Orders: each exactly once, served or lost, and lost exactly when its
/// patience (or a hold it was waiting on) ran out.
fn check_orders<'a>(
    outcome: &'a SimOutcome,
    trips: &[Trip],
    config: &SimConfig,
) -> Vec<Served<'a>> {
    let r = &outcome.report;
    assert_eq!(r.trips, trips.len());
    assert_eq!(outcome.orders.len(), trips.len());
    let served: Vec<Served<'a>> = outcome
        .orders
        .iter()
        .filter_map(|o| match &o.fate {
            Fate::Served(s) => Some((o, s)),
            Fate::Unserved { .. } => None,
        })
        .collect();
    assert_eq!(r.served, served.len());
    assert_eq!(r.served + r.unserved, r.trips);
    for o in &outcome.orders {
        if let Fate::Unserved { gave_up_at } = o.fate {
            let deadline = o.requested_at.plus_millis(config.patience_ms);
            if config.accept_ms == 0 {
                assert_eq!(
                    gave_up_at, deadline,
                    "{} gives up when its patience ends",
                    o.order_id
                );
            } else {
                // Reserved (before the deadline) but never confirmed: it is
                // lost when that hold ends, if that is later.
                assert!(
                    deadline <= gave_up_at && gave_up_at < deadline.plus_millis(config.hold_ms),
                    "{}: gave up at {gave_up_at}, deadline {deadline}",
                    o.order_id
                );
            }
        }
    }
    served
}

/// Legs: two per served order (to the pickup, then loaded), none for the
/// others; each as long as its end points say (the same computation, so
/// the same bits) and as long in time as that distance at the speed.
fn check_legs(outcome: &SimOutcome, trips: &[Trip], served: &[Served<'_>], config: &SimConfig) {
    let by_id: BTreeMap<&str, &Trip> = trips.iter().map(|t| (t.id.as_str(), t)).collect();
    assert_eq!(by_id.len(), trips.len());
    let mut legs_of: BTreeMap<&str, Vec<&Leg>> = BTreeMap::new();
    for leg in &outcome.legs {
        legs_of.entry(leg.order.as_str()).or_default().push(leg);
    }
    assert_eq!(legs_of.len(), served.len());
    for (o, s) in served {
        let trip = by_id[o.order_id.as_str()];
        let legs = &legs_of[o.order_id.as_str()];
        assert_eq!(legs.len(), 2, "{}", o.order_id);
        let (to_pickup, loaded) = (legs[0], legs[1]);
        assert!(!to_pickup.loaded && loaded.loaded);
        assert_eq!((&to_pickup.driver, &loaded.driver), (&s.driver, &s.driver));
        assert_eq!(to_pickup.to, trip.pickup);
        assert_eq!((loaded.from, loaded.to), (trip.pickup, trip.dropoff));
        assert_eq!(to_pickup.start, s.confirmed_at);
        assert_eq!((to_pickup.end, loaded.start), (s.pickup_at, s.pickup_at));
        assert_eq!(loaded.end, s.dropoff_at);
        assert!(o.requested_at <= s.confirmed_at);
        assert!(s.confirmed_at < o.requested_at.plus_millis(config.patience_ms));
        assert_eq!(
            (s.pickup_m.to_bits(), s.loaded_m.to_bits()),
            (to_pickup.driven_m.to_bits(), loaded.driven_m.to_bits())
        );
    }
    let speed_m_per_ms = config.speed_kmh / 3600.0;
    for leg in &outcome.legs {
        let expected = config.detour * leg.from.distance_m(leg.to);
        assert_eq!(leg.driven_m.to_bits(), expected.to_bits(), "{leg:?}");
        let ms = leg.end.as_millis() - leg.start.as_millis();
        assert_eq!(
            ms,
            (leg.driven_m / speed_m_per_ms).round() as i64,
            "{leg:?}"
        );
    }
}

/// Per driver: legs in time order, never overlapping, each starting where
/// the previous ended (the first where the driver started); the driver
/// ends where its last leg ends; and it is never on two trips at once (its
/// served orders' [confirmed, dropped off] intervals are disjoint).
fn check_drivers(outcome: &SimOutcome, fleet: &[Position], served: &[Served<'_>]) {
    let mut per_driver: BTreeMap<&DriverId, Vec<&Leg>> = BTreeMap::new();
    for leg in &outcome.legs {
        per_driver.entry(&leg.driver).or_default().push(leg);
    }
    assert_eq!(outcome.final_positions.len(), fleet.len());
    for (i, (id, end_pos)) in outcome.final_positions.iter().enumerate() {
        let mut pos = fleet[i];
        let mut free_at = None;
        for leg in per_driver.get(id).map(Vec::as_slice).unwrap_or_default() {
            assert_eq!(leg.from, pos, "{id} teleported");
            if let Some(t) = free_at {
                assert!(
                    leg.start >= t,
                    "{id} started a leg before ending the previous one"
                );
            }
            pos = leg.to;
            free_at = Some(leg.end);
        }
        assert_eq!(*end_pos, pos, "{id}");
    }
    let mut busy: BTreeMap<&DriverId, Vec<(i64, i64)>> = BTreeMap::new();
    for (_, s) in served {
        busy.entry(&s.driver)
            .or_default()
            .push((s.confirmed_at.as_millis(), s.dropoff_at.as_millis()));
    }
    for (id, mut spans) in busy {
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0, "{id} on two trips at once: {w:?}");
        }
    }
}

/// The report's totals are the legs' sums, its stats the orders', and the
/// timeline adds up.
fn check_report(outcome: &SimOutcome, trips: &[Trip], fleet: &[Position], served: &[Served<'_>]) {
    let r = &outcome.report;
    let sum_km = |loaded: bool| {
        outcome
            .legs
            .iter()
            .filter(|l| l.loaded == loaded)
            .map(|l| l.driven_m)
            .sum::<f64>()
            / 1000.0
    };
    assert!((r.empty_km_total - sum_km(false)).abs() <= 0.0005 + 1e-9);
    assert!((r.loaded_km_total - sum_km(true)).abs() <= 0.0005 + 1e-9);
    let mut waits: Vec<i64> = served
        .iter()
        .map(|(o, s)| s.pickup_at.as_millis() - o.requested_at.as_millis())
        .collect();
    waits.sort_unstable();
    if !waits.is_empty() {
        for (p, reported) in [(50, r.wait_s.p50), (90, r.wait_s.p90), (99, r.wait_s.p99)] {
            let ms = hexmatch::sim::percentile(&waits, p).expect("not empty");
            assert_eq!((reported * 1000.0).round() as i64, ms, "p{p}");
        }
    }
    assert!((0.0..=1.0).contains(&r.utilisation));
    for s in &outcome.timeline {
        assert_eq!(s.idle + s.serving, fleet.len());
        assert!(s.served + s.unserved <= trips.len());
    }
    let last = outcome.timeline.last().expect("the timeline has the end");
    assert_eq!(
        (last.served, last.unserved, last.waiting),
        (r.served, r.unserved, 0)
    );
}

#[test]
fn chicago_day_nearest_now_conserves_everything() {
    let trips = chicago_folded();
    let drivers = fleet(&trips, 250);
    let config = SimConfig {
        update_every_ms: 30_000,
        timings: false,
        ..SimConfig::default()
    };
    let outcome = run(
        config.clone(),
        trips.clone(),
        &drivers,
        Box::new(NearestPolicy),
    );
    check(&outcome, &trips, &drivers, &config);
    // A busy day for 250 drivers: some orders are lost, most are served.
    let r = &outcome.report;
    assert!(r.unserved > 0 && r.served_pct > 80.0, "{r:?}");
}

#[test]
fn chicago_day_batch_window_conserves_everything() {
    let trips = chicago_folded();
    let drivers = fleet(&trips, 250);
    let config = SimConfig {
        update_every_ms: 30_000,
        timings: false,
        ..SimConfig::default()
    };
    let outcome = run(
        config.clone(),
        trips.clone(),
        &drivers,
        Box::new(BatchPolicy {
            window_ms: 30_000,
            candidates: 16,
        }),
    );
    check(&outcome, &trips, &drivers, &config);
    assert_eq!(outcome.report.policy, "batch");
}

#[test]
fn reservations_nobody_confirms_in_time_expire_and_free_their_drivers() {
    // Drivers take 40 s to accept a 30 s hold: every reservation expires,
    // the engine frees the driver, the order waits again, and in the end
    // every order is lost without a single leg driven.
    let trips = first_trips(300);
    let drivers = fleet(&trips, 40);
    let config = SimConfig {
        accept_ms: 40_000,
        hold_ms: 30_000,
        timings: false,
        ..SimConfig::default()
    };
    let outcome = run(
        config.clone(),
        trips.clone(),
        &drivers,
        Box::new(NearestPolicy),
    );
    check(&outcome, &trips, &drivers, &config);
    assert_eq!((outcome.report.served, outcome.report.unserved), (0, 300));
    assert!(outcome.legs.is_empty());
}

#[test]
fn drivers_who_accept_within_the_hold_serve_and_the_wait_includes_it() {
    let trips = first_trips(300);
    let drivers = fleet(&trips, 40);
    let config = SimConfig {
        accept_ms: 20_000,
        hold_ms: 30_000,
        timings: false,
        ..SimConfig::default()
    };
    let outcome = run(
        config.clone(),
        trips.clone(),
        &drivers,
        Box::new(NearestPolicy),
    );
    check(&outcome, &trips, &drivers, &config);
    assert!(outcome.report.served > 0);
    for o in &outcome.orders {
        if let Fate::Served(s) = &o.fate {
            assert!(s.pickup_at >= o.requested_at.plus_millis(20_000));
        }
    }
}

#[test]
fn the_engine_ends_where_the_simulation_says() {
    let trips = first_trips(400);
    let drivers = fleet(&trips, 30);
    let backend = LocalBackend::new(EngineConfig::default()).unwrap();
    let config = SimConfig {
        timings: false,
        ..SimConfig::default()
    };
    let mut sim = Simulation::new(
        config,
        trips,
        Fleet::At(drivers),
        Box::new(NearestPolicy),
        backend,
    )
    .unwrap();
    while sim.step().unwrap().is_some() {}
    let engine_view: Vec<(String, Position, Status)> = sim
        .backend()
        .engine()
        .drivers()
        .into_iter()
        .map(|d| (d.id.to_string(), d.pos, d.status))
        .collect();
    let outcome = sim.finish();
    let mut engine_view = engine_view;
    engine_view.sort_by(|a, b| a.0.cmp(&b.0));
    let sim_view: Vec<(String, Position, Status)> = outcome
        .final_positions
        .iter()
        .map(|(id, p)| (id.to_string(), *p, Status::Available))
        .collect();
    assert_eq!(engine_view, sim_view);
}
