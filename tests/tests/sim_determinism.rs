//! Same seed + same input → the same report, on real data
//! (`data/chicago_trips.csv` folded onto one day).
//!
//! How "byte-identical" holds: with `SimConfig::timings` off (the CLI's
//! `--no-timings`), the whole JSON report is compared byte for byte, and so
//! is every order's fate, every leg and the timeline. With timings on, the
//! only fields that may differ are the two that measure the machine,
//! `engine_ns` and `wall_s`; everything else is compared byte for byte
//! after removing exactly those two keys.

use hexmatch::EngineConfig;
use hexmatch::sim::{
    BatchPolicy, Dispatch, Fleet, LocalBackend, NearestPolicy, SimConfig, SimOutcome, Simulation,
    Trip, fold_onto_day, parse_trips,
};
use hexmatch_tests::data_path;
use serde_json::Value;

fn chicago_folded() -> Vec<Trip> {
    let text = std::fs::read_to_string(data_path("chicago_trips.csv")).expect("test setup");
    let mut trips = parse_trips(&text).expect("test setup").trips;
    fold_onto_day(&mut trips);
    trips
}

fn simulate(trips: Vec<Trip>, seed: u64, timings: bool, policy: Box<dyn Dispatch>) -> SimOutcome {
    let config = SimConfig {
        seed,
        timings,
        update_every_ms: 30_000,
        ..SimConfig::default()
    };
    let backend = LocalBackend::new(EngineConfig::default()).expect("test setup");
    Simulation::new(config, trips, Fleet::Sampled(220), policy, backend)
        .expect("test setup")
        .run()
        .expect("test setup")
}

fn nearest() -> Box<dyn Dispatch> {
    Box::new(NearestPolicy)
}

fn batch() -> Box<dyn Dispatch> {
    Box::new(BatchPolicy::default())
}

/// The report as JSON with the two timing keys removed.
fn without_timings(json: &str) -> String {
    let mut v: Value = serde_json::from_str(json).expect("test setup");
    let map = v.as_object_mut().expect("test setup");
    assert!(map.remove("engine_ns").is_some() && map.remove("wall_s").is_some());
    serde_json::to_string_pretty(&v).expect("test setup")
}

#[test]
fn same_seed_same_input_gives_byte_identical_outcomes() {
    let trips = chicago_folded();
    for policy in [nearest as fn() -> Box<dyn Dispatch>, batch] {
        let a = simulate(trips.clone(), 42, false, policy());
        let b = simulate(trips.clone(), 42, false, policy());
        assert_eq!(a.report.to_json(), b.report.to_json());
        assert_eq!(a, b, "orders, legs and timeline too");
        // The input's order does not matter: the simulation sorts it.
        let mut reversed = trips.clone();
        reversed.reverse();
        let c = simulate(reversed, 42, false, policy());
        assert_eq!(a, c);
        // Not vacuous: this is a real, busy day.
        assert_eq!(a.report.trips, 11_615);
        assert!(
            a.report.served > 9_000 && a.report.unserved > 0,
            "{:?}",
            a.report
        );
    }
}

#[test]
fn with_timings_only_engine_ns_and_wall_s_differ() {
    let trips = chicago_folded();
    let timed = simulate(trips.clone(), 42, true, nearest());
    let again = simulate(trips.clone(), 42, true, nearest());
    let untimed = simulate(trips, 42, false, nearest());
    assert_eq!(
        without_timings(&timed.report.to_json()),
        without_timings(&again.report.to_json())
    );
    assert_eq!(
        without_timings(&timed.report.to_json()),
        without_timings(&untimed.report.to_json())
    );
    assert_eq!((timed.orders, timed.legs), (untimed.orders, untimed.legs));
    // The timings were really taken, and are zero when off.
    let claim = timed.report.engine_ns["claim"];
    assert!(claim.p50 > 0 && claim.p99 >= claim.p50);
    assert!(timed.report.wall_s > 0.0);
    assert!(
        untimed
            .report
            .engine_ns
            .values()
            .all(|l| l.p50 == 0 && l.p99 == 0)
    );
    assert_eq!(untimed.report.wall_s.to_bits(), 0f64.to_bits());
}

#[test]
fn the_seed_matters() {
    let trips = chicago_folded();
    let a = simulate(trips.clone(), 1, false, nearest());
    let b = simulate(trips, 2, false, nearest());
    assert_ne!(a.report.to_json(), b.report.to_json());
    assert_eq!((a.report.seed, b.report.seed), (1, 2));
}

#[test]
fn the_report_has_exactly_the_stable_keys() {
    let r = simulate(chicago_folded(), 3, true, batch()).report;
    let v: Value = serde_json::from_str(&r.to_json()).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let mut top = keys(&v);
    top.sort();
    assert_eq!(
        top,
        [
            "drivers",
            "empty_km_total",
            "engine_ns",
            "loaded_km_total",
            "pickup_km",
            "policy",
            "seed",
            "served",
            "served_pct",
            "trips",
            "unserved",
            "utilisation",
            "wait_s",
            "wall_s"
        ]
    );
    assert_eq!(keys(&v["wait_s"]), ["mean", "p50", "p90", "p99"]);
    assert_eq!(keys(&v["pickup_km"]), ["mean", "p50", "p90"]);
    assert_eq!(
        keys(&v["engine_ns"]),
        [
            "claim",
            "claim_batch",
            "complete",
            "confirm",
            "expire_matches",
            "update_location"
        ]
    );
    for op in keys(&v["engine_ns"]) {
        assert_eq!(keys(&v["engine_ns"][&op]), ["p50", "p99"]);
    }
    assert_eq!(v["policy"], "batch");
    assert_eq!(v["drivers"], 220);
}

#[test]
fn heartbeats_change_no_result() {
    // The CLI turns heartbeats on against a server (so its driver TTL
    // keeps idle drivers); they must not change what is simulated.
    let trips = chicago_folded();
    let run = |heartbeat_ms: Option<u64>| {
        let config = SimConfig {
            heartbeat_ms,
            timings: false,
            update_every_ms: 30_000,
            ..SimConfig::default()
        };
        let backend = LocalBackend::new(EngineConfig::default()).unwrap();
        Simulation::new(
            config,
            trips.clone(),
            Fleet::Sampled(220),
            nearest(),
            backend,
        )
        .unwrap()
        .run()
        .unwrap()
    };
    let quiet = run(None);
    let chatty = run(Some(60_000));
    assert_eq!(quiet.report.to_json(), chatty.report.to_json());
    assert_eq!((quiet.orders, quiet.legs), (chatty.orders, chatty.legs));
}
