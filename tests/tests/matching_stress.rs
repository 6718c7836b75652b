//! Multi-threaded stress test of matching: claimers, confirmers and
//! releasers race with movers, status flips and expiry over a shared
//! engine. A clock that ticks on every read gives every match event a
//! unique time taken under the matching lock, so the history can be
//! checked exactly afterwards: no driver is ever held by two live
//! matches, no order ever holds two drivers, and every reservation is
//! accounted for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use hexmatch::{
    ClaimRequest, Clock, DriverId, DriverUpdate, Engine, EngineConfig, Match, MatchState, OrderId,
    Position, Status, Timestamp,
};

/// Each read returns a new millisecond: a total order of engine events.
#[derive(Debug)]
struct TickClock(AtomicI64);

impl Clock for TickClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.0.fetch_add(1, Ordering::SeqCst)).expect("in range")
    }
}

/// A tiny deterministic generator per thread.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const DRIVERS: usize = 60;
const CLAIMERS: usize = 4;
const ROUNDS: usize = 1500;

fn driver_id(i: u64) -> DriverId {
    DriverId::new(&format!("d{i}")).expect("valid")
}

fn near_loop(rng: &mut Rng) -> Position {
    Position::new(41.87 + rng.unit() * 0.03, -87.64 + rng.unit() * 0.03).expect("valid")
}

#[test]
fn concurrent_claims_never_double_book() {
    let clock = Arc::new(TickClock(AtomicI64::new(1_000_000)));
    let config = EngineConfig {
        driver_ttl_ms: u64::MAX / 4,
        match_retention_ms: u64::MAX / 4,
        ..Default::default()
    };
    let engine = Arc::new(Engine::with_clock(config, clock).expect("valid config"));
    let mut rng = Rng(7);
    for i in 0..DRIVERS as u64 {
        engine
            .upsert(&DriverUpdate::location(
                driver_id(i),
                near_loop(&mut rng),
                None,
            ))
            .expect("valid");
    }
    let created: Arc<Mutex<Vec<Match>>> = Arc::default();

    let mut handles = Vec::new();
    for t in 0..CLAIMERS {
        let (engine, created) = (Arc::clone(&engine), Arc::clone(&created));
        handles.push(thread::spawn(move || claimer(&engine, &created, t)));
    }
    {
        let engine = Arc::clone(&engine);
        handles.push(thread::spawn(move || mover(&engine)));
    }
    for h in handles {
        h.join().expect("no thread panicked");
    }

    let created = created.lock().expect("no poison").clone();
    check_history(&engine, &created);
}

/// Claims orders (half of them raced by a twin thread on the same id),
/// then confirms, releases, completes or abandons each. Confirmed trips
/// are completed a few rounds later and abandoned holds run out, so the
/// drivers do not drain however the threads are scheduled.
fn claimer(engine: &Engine, created: &Mutex<Vec<Match>>, t: usize) {
    let mut rng = Rng(1000 + t as u64);
    let mut on_trip = std::collections::VecDeque::new();
    for n in 0..ROUNDS {
        // Half the orders are shared between two threads, racing on one id.
        let order = if n % 2 == 0 {
            format!("s{}-{}", t / 2, n)
        } else {
            format!("t{t}-{n}")
        };
        let order = OrderId::new(&order).expect("valid");
        let req = ClaimRequest {
            hold_ms: 1 + rng.below(400),
            ..ClaimRequest::new(near_loop(&mut rng))
        };
        match engine.claim(&order, &req) {
            Ok((m, true)) => created.lock().expect("no poison").push(m),
            Ok((_, false)) => {}
            // The twin thread asked with a different hold or pickup.
            Err(e) => assert!(
                matches!(e.code(), "no_driver_available" | "order_conflict"),
                "{e}"
            ),
        }
        // Whatever state the order is in, these either work or
        // fail with a specific error; they never panic.
        let _ = match rng.below(4) {
            0 => engine.confirm(&order).map(|_| on_trip.push_back(order)),
            1 => engine.release(&order, None).map(|_| ()),
            2 => engine
                .confirm(&order)
                .and_then(|_| engine.complete(&order))
                .map(|_| ()),
            _ => Ok(()),
        };
        if on_trip.len() > 2 {
            let _ = engine.complete(&on_trip.pop_front().expect("not empty"));
        }
        if n % 8 == 0 {
            engine.expire_matches();
        }
    }
}

/// Moves drivers, flips their status, removes some and runs the expiry sweep.
fn mover(engine: &Engine) {
    let mut rng = Rng(99);
    for _ in 0..ROUNDS * 3 {
        let id = driver_id(rng.below(DRIVERS as u64));
        let mut u = DriverUpdate::location(id, near_loop(&mut rng), None);
        u.status = match rng.below(20) {
            0 => Some(Status::Offline),
            1 => Some(Status::Busy),
            2..=5 => Some(Status::Available),
            _ => None,
        };
        engine.upsert(&u).expect("valid update");
        if rng.below(50) == 0 {
            engine.remove(&driver_id(rng.below(DRIVERS as u64)));
        }
        engine.expire_matches();
    }
}

/// Checks the recorded history and the final state.
fn check_history(engine: &Engine, created: &[Match]) {
    // Drivers are freed as fast as they are taken, so nearly every round
    // makes a match whatever the scheduling; a few hundred is the floor
    // below which the test would mean little.
    assert!(
        created.len() > 500,
        "the test made too few matches to mean anything: {}",
        created.len()
    );
    // An order claimed again after its match ended (the twin thread may do
    // that) has its record replaced, so the book must hold, for every
    // order, exactly the latest match created for it: a record nobody was
    // told about, or a lost one, fails here.
    let mut latest: HashMap<&OrderId, &Match> = HashMap::new();
    for m in created {
        let slot = latest.entry(&m.order_id).or_insert(m);
        assert!(
            slot.created_at != m.created_at || std::ptr::eq(*slot, m),
            "order created twice at once: {m:?}"
        );
        if m.created_at > slot.created_at {
            *slot = m;
        }
    }
    let mut by_driver: HashMap<DriverId, Vec<Match>> = HashMap::new();
    for m in latest.values() {
        let now = engine
            .get_match(&m.order_id)
            .expect("kept for the retention");
        assert_eq!(
            (now.created_at, &now.driver_id),
            (m.created_at, &m.driver_id),
            "the book's record of {} is not the latest match created for it",
            m.order_id
        );
        by_driver.entry(m.driver_id.clone()).or_default().push(now);
    }
    // No driver held by two matches at once: intervals [created, ended) are disjoint.
    for (driver, mut ms) in by_driver {
        ms.sort_by_key(|m| m.created_at);
        for w in ms.windows(2) {
            let end = w[0].ended_at.unwrap_or_else(|| {
                panic!("{driver}: live match {:?} followed by {:?}", w[0], w[1])
            });
            assert!(
                end <= w[1].created_at,
                "{driver} double-booked: {:?} and {:?}",
                w[0],
                w[1]
            );
        }
    }
    // The final state is consistent: each live match's driver is in the
    // matching state, and no other driver is reserved.
    let live: Vec<Match> = latest
        .keys()
        .filter_map(|o| engine.get_match(o))
        .filter(|m| m.state.is_live())
        .collect();
    assert_eq!(live.len(), engine.live_matches());
    for m in &live {
        let d = engine
            .driver(&m.driver_id)
            .expect("a live match's driver exists");
        let want = if m.state == MatchState::Reserved {
            Status::Reserved
        } else {
            Status::Busy
        };
        assert_eq!((d.status, d.order_id.as_ref()), (want, Some(&m.order_id)));
    }
    let reserved = live
        .iter()
        .filter(|m| m.state == MatchState::Reserved)
        .count();
    assert_eq!(engine.counts().reserved, reserved);
}
