//! A simulation small enough to work out by hand, checked number by number.
//!
//! Everything happens on the equator. The unit `u` is 0.01° of longitude
//! (1 111.951 m by haversine); positions are given as `x` in units. With a
//! detour factor of 1.5 and a speed chosen so that 1.5·u takes exactly 100 s
//! (60.045 km/h), a leg of `k` units lasts `k · 100 s` and drives `1.5·k·u`.
//!
//! Drivers: A at x = 0, B at x = 10. Patience 200 s. Nearest-now.
//!
//! | trip | appears | pickup → drop-off | what happens |
//! |---|---|---|---|
//! | t1 | 0 s  | 1 → 3 | A (1 u away) at once; picks up at 100 s, drops off at 300 s |
//! | t2 | 0 s  | 8 → 8 | B (2 u away) at once; picks up and drops off at 200 s |
//! | t3 | 50 s | 5 → 6 | nobody idle; at 200 s B (at 8, 3 u away) frees up and takes it; picks up at 500 s, drops off at 600 s |
//! | t4 | 60 s | 0 → 2 | nobody idle; at 200 s t3 is older and takes B; gives up at 260 s (A frees at 300 s) |
//!
//! So: 4 trips, 3 served (75 %), waits 100, 200, 450 s (mean 250, nearest-
//! rank p50 200, p90 450, p99 450); pickups 1.5, 3, 4.5 u = 1.668, 3.336,
//! 5.004 km (mean 3.336); empty 9 u = 10.008 km; loaded (3 + 0 + 1.5) u =
//! 5.004 km; driving time A 300 s + B 600 s over 2 drivers × 600 s = 0.75.

use hexmatch::sim::{
    BatchPolicy, Dispatch, Fate, Fleet, LocalBackend, NearestPolicy, SimConfig, SimOutcome,
    Simulation, Trip,
};
use hexmatch::{EARTH_RADIUS_M, EngineConfig, OrderId, Position, Status, Timestamp};

/// Metres in one unit (0.01° on the equator).
const U_M: f64 = EARTH_RADIUS_M * std::f64::consts::PI / 180.0 * 0.01;
const DETOUR: f64 = 1.5;
/// km/h at which `DETOUR · U_M` metres take 100 s.
const SPEED_KMH: f64 = DETOUR * U_M / 100.0 * 3.6;
/// 2026-01-05T08:00:00Z.
const T0: i64 = 1_767_600_000_000;

fn at(x: f64) -> Position {
    Position::new(0.0, x * 0.01).expect("test setup")
}

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_millis(T0 + secs * 1000).expect("test setup")
}

fn trip(id: &str, appears_s: i64, from: f64, to: f64) -> Trip {
    Trip {
        id: OrderId::new(id).expect("test setup"),
        pickup_time: ts(appears_s),
        pickup: at(from),
        dropoff_time: ts(appears_s + 600),
        dropoff: at(to),
    }
}

fn trips() -> Vec<Trip> {
    // Deliberately out of order: the simulation sorts by (time, id).
    vec![
        trip("t4", 60, 0.0, 2.0),
        trip("t2", 0, 8.0, 8.0),
        trip("t3", 50, 5.0, 6.0),
        trip("t1", 0, 1.0, 3.0),
    ]
}

fn config() -> SimConfig {
    SimConfig {
        speed_kmh: SPEED_KMH,
        detour: DETOUR,
        patience_ms: 200_000,
        sample_every_ms: 100_000,
        seed: 7,
        timings: false,
        ..SimConfig::default()
    }
}

/// Runs the scenario; checks the engine's view of the fleet at the end.
fn simulate(policy: Box<dyn Dispatch>) -> SimOutcome {
    let backend = LocalBackend::new(EngineConfig::default()).expect("test setup");
    let mut sim = Simulation::new(
        config(),
        trips(),
        Fleet::At(vec![at(0.0), at(10.0)]),
        policy,
        backend,
    )
    .expect("test setup");
    while sim.step().expect("test setup").is_some() {}
    let engine_view: Vec<(Status, Position)> = ["d00001", "d00002"]
        .iter()
        .map(|id| {
            let d = sim
                .backend()
                .engine()
                .driver(&id.parse().expect("test setup"))
                .expect("test setup");
            (d.status, d.pos)
        })
        .collect();
    assert_eq!(
        engine_view,
        [(Status::Available, at(3.0)), (Status::Available, at(6.0))]
    );
    assert_eq!(sim.backend().engine().live_matches(), 0);
    sim.finish()
}

#[test]
fn the_hand_computed_scenario_gives_exactly_its_report() {
    let outcome = simulate(Box::new(NearestPolicy));
    let expected = r#"{
  "trips": 4,
  "served": 3,
  "unserved": 1,
  "served_pct": 75.0,
  "wait_s": {
    "mean": 250.0,
    "p50": 200.0,
    "p90": 450.0,
    "p99": 450.0
  },
  "pickup_km": {
    "mean": 3.336,
    "p50": 3.336,
    "p90": 5.004
  },
  "empty_km_total": 10.008,
  "loaded_km_total": 5.004,
  "utilisation": 0.75,
  "engine_ns": {
    "claim": {
      "p50": 0,
      "p99": 0
    },
    "claim_batch": {
      "p50": 0,
      "p99": 0
    },
    "complete": {
      "p50": 0,
      "p99": 0
    },
    "confirm": {
      "p50": 0,
      "p99": 0
    },
    "expire_matches": {
      "p50": 0,
      "p99": 0
    },
    "update_location": {
      "p50": 0,
      "p99": 0
    }
  },
  "wall_s": 0.0,
  "seed": 7,
  "policy": "nearest",
  "drivers": 2
}
"#;
    assert_eq!(outcome.report.to_json(), expected);
}

#[test]
fn the_hand_computed_scenario_order_by_order() {
    let outcome = simulate(Box::new(NearestPolicy));
    let served = |driver: &str, confirmed: i64, pickup: i64, dropoff: i64, pk: f64, ld: f64| {
        (
            Some(driver.to_owned()),
            Some((ts(confirmed), ts(pickup), ts(dropoff))),
            pk * DETOUR * U_M,
            ld * DETOUR * U_M,
        )
    };
    let got: Vec<_> = outcome
        .orders
        .iter()
        .map(|o| match &o.fate {
            Fate::Served(s) => (
                o.order_id.to_string(),
                (
                    Some(s.driver.to_string()),
                    Some((s.confirmed_at, s.pickup_at, s.dropoff_at)),
                    s.pickup_m,
                    s.loaded_m,
                ),
            ),
            Fate::Unserved { gave_up_at } => (
                o.order_id.to_string(),
                (
                    None,
                    Some((*gave_up_at, *gave_up_at, *gave_up_at)),
                    0.0,
                    0.0,
                ),
            ),
        })
        .collect();
    let want = [
        ("t1", served("d00001", 0, 100, 300, 1.0, 2.0)),
        ("t2", served("d00002", 0, 200, 200, 2.0, 0.0)),
        ("t3", served("d00002", 200, 500, 600, 3.0, 1.0)),
        ("t4", (None, Some((ts(260), ts(260), ts(260))), 0.0, 0.0)),
    ];
    assert_eq!(got.len(), want.len());
    for ((id, g), (wid, w)) in got.iter().zip(want) {
        assert_eq!(id, wid);
        assert_eq!((&g.0, &g.1), (&w.0, &w.1), "{id}");
        assert!(
            (g.2 - w.2).abs() < 1e-6 && (g.3 - w.3).abs() < 1e-6,
            "{id}: {g:?} vs {w:?}"
        );
    }
    // Legs: A 0→1, 1→3; B 10→8, 8→8, 8→5, 5→6, in order of departure.
    let legs: Vec<_> = outcome
        .legs
        .iter()
        .map(|l| {
            (
                l.driver.to_string(),
                l.loaded,
                (l.from.lon() * 100.0).round(),
                (l.to.lon() * 100.0).round(),
                (l.start.as_millis() - T0) / 1000,
                (l.end.as_millis() - T0) / 1000,
            )
        })
        .collect();
    let leg = |d: &str, loaded, from, to, s, e| (d.to_owned(), loaded, from, to, s, e);
    assert_eq!(
        legs,
        [
            leg("d00001", false, 0.0, 1.0, 0, 100),
            leg("d00002", false, 10.0, 8.0, 0, 200),
            leg("d00001", true, 1.0, 3.0, 100, 300),
            leg("d00002", true, 8.0, 8.0, 200, 200),
            leg("d00002", false, 8.0, 5.0, 200, 500),
            leg("d00002", true, 5.0, 6.0, 500, 600),
        ]
    );
    // The timeline: the fleet after everything at 0, 100, …, 600 s.
    let timeline: Vec<_> = outcome
        .timeline
        .iter()
        .map(|s| {
            (
                (s.at.as_millis() - T0) / 1000,
                s.idle,
                s.serving,
                s.waiting,
                s.served,
                s.unserved,
            )
        })
        .collect();
    assert_eq!(
        timeline,
        [
            (0, 0, 2, 0, 2, 0),
            (100, 0, 2, 2, 2, 0),
            (200, 0, 2, 1, 3, 0),
            (300, 1, 1, 0, 3, 1),
            (400, 1, 1, 0, 3, 1),
            (500, 1, 1, 0, 3, 1),
            (600, 2, 0, 0, 3, 1),
        ]
    );
}

#[test]
fn a_batch_window_waits_for_the_window_then_serves_the_same_orders() {
    // A 60 s window, boundaries at 0, 60, 120, … s. At 0 s t1 and t2 get
    // A and B (the optimum is the nearest-now choice here). B frees at
    // 200 s, but the next boundary is 240 s: t3 and t4 both still wait
    // (t4 gives up at 260 s), and with one driver the optimum serves the
    // pickup nearer B (at x = 8): t3 at x = 5 (3 u), not t4 at x = 0 (8 u).
    let policy = BatchPolicy {
        window_ms: 60_000,
        candidates: 16,
    };
    let outcome = simulate(Box::new(policy));
    let r = &outcome.report;
    assert_eq!((r.trips, r.served, r.unserved), (4, 3, 1));
    assert_eq!(r.policy, "batch");
    let t3 = outcome
        .orders
        .iter()
        .find(|o| o.order_id.as_str() == "t3")
        .unwrap();
    let Fate::Served(s) = &t3.fate else {
        panic!("t3 is served: {t3:?}");
    };
    assert_eq!(
        (s.confirmed_at, s.pickup_at, s.dropoff_at),
        (ts(240), ts(540), ts(640))
    );
    // Waits 100, 200 and 490 s.
    assert_eq!(
        (r.wait_s.mean, r.wait_s.p50, r.wait_s.p90),
        (263.333, 200.0, 490.0)
    );
}
