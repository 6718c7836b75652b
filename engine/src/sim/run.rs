//! [`Simulation`]: the discrete-event loop.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::Instant;

use crate::driver::DriverUpdate;
use crate::error::Error;
use crate::ids::{DriverId, OrderId};
use crate::matching::{
    BatchOrder, BatchOutcome, ClaimRequest, MAX_HOLD_MS, Match, MatchEvent, MatchState,
};
use crate::position::Position;
use crate::time::Timestamp;

use super::backend::{Backend, SimError};
use super::dispatch::{Dispatch, DispatchContext};
use super::report::{self, OPERATIONS, Report};
use super::trips::Trip;

/// Settings of a simulation.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Driving speed, km/h (default 25, a city average).
    pub speed_kmh: f64,
    /// Driven distance over straight-line distance, ≥ 1 (default 1.3).
    pub detour: f64,
    /// How often a moving driver sends its position, ms (default 5 s).
    pub update_every_ms: u64,
    /// If set, idle drivers also send their (unchanged) position this
    /// often, ms, so a server's driver TTL does not remove them. Changes no
    /// result (default off).
    pub heartbeat_ms: Option<u64>,
    /// How long an order waits for a driver to be confirmed before it is
    /// lost, ms; it must be assigned strictly before its time + patience
    /// (default 5 min).
    pub patience_ms: u64,
    /// How long a claim holds a driver before it expires unconfirmed, ms
    /// (default 30 s).
    pub hold_ms: u64,
    /// How long a driver takes to accept (confirm) a reservation, ms
    /// (default 0: at once). With `accept_ms ≥ hold_ms` every reservation
    /// expires: [`Engine::expire_matches`](crate::Engine::expire_matches)
    /// frees the driver when the hold ends, and the order waits again from
    /// then on (or is lost, if its patience ran out meanwhile).
    pub accept_ms: u64,
    /// Search radius of every claim, m; `None` = the engine's limit.
    pub radius_m: Option<f64>,
    /// Interval of the [`SimOutcome::timeline`], ms (default 60 s).
    pub sample_every_ms: u64,
    /// Seed of the fleet placement ([`Fleet::Sampled`]); reported.
    pub seed: u64,
    /// Measure engine latency and wall time (default on). Off, the report
    /// has zeros there and is byte-for-byte reproducible.
    pub timings: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            speed_kmh: 25.0,
            detour: 1.3,
            update_every_ms: 5_000,
            heartbeat_ms: None,
            patience_ms: 300_000,
            hold_ms: 30_000,
            accept_ms: 0,
            radius_m: None,
            sample_every_ms: 60_000,
            seed: 1,
            timings: true,
        }
    }
}

impl SimConfig {
    fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Config(m));
        if !(self.speed_kmh.is_finite() && self.speed_kmh > 0.0) {
            return bad(format!("speed {} km/h must be positive", self.speed_kmh));
        }
        if !(self.detour.is_finite() && self.detour >= 1.0) {
            return bad(format!("detour factor {} must be at least 1", self.detour));
        }
        if let Some(r) = self.radius_m.filter(|r| !(r.is_finite() && *r > 0.0)) {
            return bad(format!("radius {r} m must be positive"));
        }
        if !(1..=MAX_HOLD_MS).contains(&self.hold_ms) {
            return bad(format!(
                "hold {} ms is not in 1..={MAX_HOLD_MS}",
                self.hold_ms
            ));
        }
        for (name, v) in [
            ("update interval", self.update_every_ms),
            ("patience", self.patience_ms),
            ("sample interval", self.sample_every_ms),
            ("heartbeat", self.heartbeat_ms.unwrap_or(1)),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1 ms"));
            }
        }
        Ok(())
    }
}

/// Where the drivers start.
#[derive(Debug, Clone, PartialEq)]
pub enum Fleet {
    /// This many drivers, each at the pickup of a trip drawn uniformly (with
    /// replacement) by a generator seeded with [`SimConfig::seed`].
    Sampled(usize),
    /// One driver at each of these positions.
    At(Vec<Position>),
}

/// The fate of one order.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// A driver was confirmed and made the trip.
    Served(Service),
    /// Nobody was confirmed before its patience ran out.
    Unserved {
        /// When it gave up.
        gave_up_at: Timestamp,
    },
}

/// How a served order was served.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    /// The driver.
    pub driver: DriverId,
    /// When the driver confirmed.
    pub confirmed_at: Timestamp,
    /// When the driver reached the pickup.
    pub pickup_at: Timestamp,
    /// When the driver reached the drop-off.
    pub dropoff_at: Timestamp,
    /// Driven metres to the pickup (detour included).
    pub pickup_m: f64,
    /// Driven metres with the passenger (detour included).
    pub loaded_m: f64,
}

/// One order's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderOutcome {
    /// The order (trip) id.
    pub order_id: OrderId,
    /// When it appeared.
    pub requested_at: Timestamp,
    /// What became of it.
    pub fate: Fate,
}

/// One straight drive of one driver.
#[derive(Debug, Clone, PartialEq)]
pub struct Leg {
    /// Who drove.
    pub driver: DriverId,
    /// For which order.
    pub order: OrderId,
    /// With the passenger (`true`) or to the pickup (`false`).
    pub loaded: bool,
    /// Start.
    pub from: Position,
    /// End.
    pub to: Position,
    /// Departure.
    pub start: Timestamp,
    /// Arrival: `start` + `driven_m` at the configured speed, rounded to the ms.
    pub end: Timestamp,
    /// `detour · haversine(from, to)`, metres.
    pub driven_m: f64,
}

/// The fleet at one instant of the [`SimOutcome::timeline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The instant.
    pub at: Timestamp,
    /// Drivers available.
    pub idle: usize,
    /// Drivers reserved, on the way to a pickup or carrying a passenger.
    pub serving: usize,
    /// Orders waiting for a driver.
    pub waiting: usize,
    /// Orders served so far.
    pub served: usize,
    /// Orders lost so far.
    pub unserved: usize,
}

/// Where a running simulation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Simulated time now.
    pub now: Timestamp,
    /// Orders in the input.
    pub trips: usize,
    /// Orders that have appeared.
    pub arrived: usize,
    /// Orders served so far.
    pub served: usize,
    /// Orders lost so far.
    pub unserved: usize,
    /// Orders waiting now.
    pub waiting: usize,
    /// Drivers idle now.
    pub idle: usize,
}

/// Everything a simulation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOutcome {
    /// The summary.
    pub report: Report,
    /// Every order, in simulation order (pickup time, then trip id).
    pub orders: Vec<OrderOutcome>,
    /// Every leg driven, in order of departure.
    pub legs: Vec<Leg>,
    /// The fleet every [`SimConfig::sample_every_ms`] from the first order's
    /// time to the end.
    pub timeline: Vec<Sample>,
    /// Each driver's position at the end, in driver order.
    pub final_positions: Vec<(DriverId, Position)>,
}

/// What a driver is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    Idle,
    Reserved { order: usize },
    Driving { order: usize, leg: usize },
}

#[derive(Debug)]
struct DriverState {
    id: DriverId,
    pos: Position,
    task: Task,
    last_update: Timestamp,
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotYet,
    Waiting,
    Reserved { driver: usize },
    EnRoute { driver: usize },
    Done,
    Unserved,
}

#[derive(Debug)]
struct OrderState {
    phase: Phase,
    /// Bumped at every reservation, so a stale confirm event is ignored.
    generation: u32,
    request: ClaimRequest,
    confirmed_at: Option<Timestamp>,
    pickup_at: Option<Timestamp>,
    dropoff_at: Option<Timestamp>,
    pickup_m: f64,
    loaded_m: f64,
    driver: Option<usize>,
    gave_up_at: Option<Timestamp>,
}

/// A scheduled event. The derived order only breaks ties that the
/// sequence number has already broken; it never decides anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A driver accepts (order, reservation generation).
    Confirm(usize, u32),
    /// A driver reaches the end of its leg.
    Arrive(usize),
    /// An order's patience runs out.
    GiveUp(usize),
    /// Moving drivers report their positions (a wake-up, not work).
    Tick,
    /// A batch window closes (a wake-up, not work).
    Window,
    /// An unconfirmed reservation's hold ends: the step's expiry sweep
    /// frees it on time (a wake-up, not work).
    HoldEnds,
}

impl Event {
    /// Whether the event is work that keeps the simulation going (wake-ups
    /// alone do not).
    fn is_work(self) -> bool {
        matches!(self, Self::Confirm(..) | Self::Arrive(_) | Self::GiveUp(_))
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Claim = 0,
    ClaimBatch = 1,
    Complete = 2,
    Confirm = 3,
    ExpireMatches = 4,
    UpdateLocation = 5,
}

/// Latency samples per operation (indexed like [`OPERATIONS`]).
#[derive(Debug, Default)]
struct Timings {
    enabled: bool,
    samples: [Vec<u64>; 6],
}

impl Timings {
    fn time<T>(&mut self, op: Op, per: usize, f: impl FnOnce() -> T) -> T {
        if !self.enabled {
            return f();
        }
        let start = Instant::now();
        let out = f();
        let ns = start.elapsed().as_nanos() / per.max(1) as u128;
        self.samples[op as usize].push(u64::try_from(ns).unwrap_or(u64::MAX));
        out
    }
}

/// A backend whose operations are timed.
struct Timed<'a, B: Backend> {
    inner: &'a mut B,
    timings: &'a mut Timings,
}

impl<B: Backend> Backend for Timed<'_, B> {
    fn set_time(&mut self, now: Timestamp) {
        self.inner.set_time(now);
    }

    fn add_drivers(&mut self, drivers: &[DriverUpdate]) -> Result<(), SimError> {
        self.inner.add_drivers(drivers)
    }

    fn move_drivers(&mut self, updates: &[DriverUpdate]) -> Result<(), SimError> {
        self.timings.time(Op::UpdateLocation, updates.len(), || {
            self.inner.move_drivers(updates)
        })
    }

    fn claim(&mut self, order: &OrderId, request: &ClaimRequest) -> Result<Match, SimError> {
        self.timings
            .time(Op::Claim, 1, || self.inner.claim(order, request))
    }

    fn claim_batch(
        &mut self,
        orders: &[BatchOrder],
        candidates: usize,
    ) -> Result<BatchOutcome, SimError> {
        self.timings.time(Op::ClaimBatch, 1, || {
            self.inner.claim_batch(orders, candidates)
        })
    }

    fn confirm(&mut self, order: &OrderId) -> Result<Match, SimError> {
        self.timings
            .time(Op::Confirm, 1, || self.inner.confirm(order))
    }

    fn complete(&mut self, order: &OrderId) -> Result<Match, SimError> {
        self.timings
            .time(Op::Complete, 1, || self.inner.complete(order))
    }

    fn expire_matches(&mut self) -> Result<Vec<MatchEvent>, SimError> {
        self.timings
            .time(Op::ExpireMatches, 1, || self.inner.expire_matches())
    }
}

/// A discrete-event simulation of a fleet serving recorded trips through a
/// [`Backend`] and a [`Dispatch`] policy. See the [module docs](super).
///
/// Time starts at the earliest pickup. Each [`step`](Self::step) handles
/// one instant: orders appearing, drivers arriving, reservations lapsing,
/// then the policy, then position reports. The simulation ends when every
/// order is served or lost and every trip is driven.
pub struct Simulation<B: Backend> {
    config: SimConfig,
    policy: Box<dyn Dispatch>,
    backend: B,
    timings: Timings,
    started: Option<Instant>,

    trips: Vec<Trip>,
    orders: Vec<OrderState>,
    order_index: HashMap<OrderId, usize>,
    drivers: Vec<DriverState>,
    driver_index: HashMap<DriverId, usize>,
    legs: Vec<Leg>,

    t0: Timestamp,
    now: Timestamp,
    next_trip: usize,
    events: BinaryHeap<Reverse<(Timestamp, u64, Event)>>,
    seq: u64,
    work_pending: usize,
    tick_at: Option<Timestamp>,
    window_at: Option<Timestamp>,
    /// Waiting orders by index (= by pickup time, then trip id).
    waiting: BTreeSet<usize>,
    /// Something changed that may let the policy assign more.
    dirty: bool,
    idle: usize,
    moving: usize,
    reserved: usize,
    served: usize,
    unserved: usize,
    timeline: Vec<Sample>,
    next_sample: Timestamp,
    finished: bool,
}

impl<B: Backend> std::fmt::Debug for Simulation<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulation")
            .field("policy", &self.policy.name())
            .field("progress", &self.progress())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Simulation<B> {
    /// Sets up a simulation: sorts the trips by (pickup time, id), places
    /// the fleet, and adds the drivers to the backend at the first pickup time.
    ///
    /// # Errors
    /// [`SimError::Config`] for an invalid config, a repeated trip id, or a
    /// sampled fleet without trips to sample from; the backend's error if
    /// it refuses the drivers.
    pub fn new(
        config: SimConfig,
        mut trips: Vec<Trip>,
        fleet: Fleet,
        policy: Box<dyn Dispatch>,
        mut backend: B,
    ) -> Result<Self, SimError> {
        config.validate()?;
        if policy.window_ms() == Some(0) {
            return Err(SimError::Config(
                "the batch window must be at least 1 ms".into(),
            ));
        }
        let started = config.timings.then(Instant::now);
        trips.sort_by(|a, b| {
            a.pickup_time
                .cmp(&b.pickup_time)
                .then_with(|| a.id.cmp(&b.id))
        });
        let mut order_index = HashMap::with_capacity(trips.len());
        for (i, t) in trips.iter().enumerate() {
            if order_index.insert(t.id.clone(), i).is_some() {
                return Err(SimError::Config(format!("trip id {} appears twice", t.id)));
            }
        }
        let positions = match fleet {
            Fleet::At(p) => p,
            Fleet::Sampled(n) => sample_positions(&trips, n, config.seed)?,
        };
        let t0 = trips.first().map_or(Timestamp::EPOCH, |t| t.pickup_time);
        let width = positions.len().to_string().len().max(5);
        let mut drivers = Vec::with_capacity(positions.len());
        let mut driver_index = HashMap::with_capacity(positions.len());
        for (i, pos) in positions.into_iter().enumerate() {
            let id = DriverId::new(&format!("d{:0width$}", i + 1))?;
            driver_index.insert(id.clone(), i);
            drivers.push(DriverState {
                id,
                pos,
                task: Task::Idle,
                last_update: t0,
            });
        }
        let orders = trips
            .iter()
            .map(|t| OrderState {
                phase: Phase::NotYet,
                generation: 0,
                request: ClaimRequest {
                    radius_m: config.radius_m,
                    hold_ms: config.hold_ms,
                    ..ClaimRequest::new(t.pickup)
                },
                confirmed_at: None,
                pickup_at: None,
                dropoff_at: None,
                pickup_m: 0.0,
                loaded_m: 0.0,
                driver: None,
                gave_up_at: None,
            })
            .collect();
        backend.set_time(t0);
        let initial: Vec<DriverUpdate> = drivers
            .iter()
            .map(|d| DriverUpdate::location(d.id.clone(), d.pos, Some(t0)))
            .collect();
        backend.add_drivers(&initial)?;
        let mut sim = Self {
            timings: Timings {
                enabled: config.timings,
                samples: Default::default(),
            },
            started,
            idle: drivers.len(),
            trips,
            orders,
            order_index,
            drivers,
            driver_index,
            legs: Vec::new(),
            t0,
            now: t0,
            next_trip: 0,
            events: BinaryHeap::new(),
            seq: 0,
            work_pending: 0,
            tick_at: None,
            window_at: None,
            waiting: BTreeSet::new(),
            dirty: false,
            moving: 0,
            reserved: 0,
            served: 0,
            unserved: 0,
            timeline: Vec::new(),
            next_sample: t0,
            finished: false,
            policy,
            backend,
            config,
        };
        if sim.config.heartbeat_ms.is_some() {
            sim.schedule_tick();
        }
        Ok(sim)
    }

    /// The backend (for a [`LocalBackend`](super::LocalBackend), its engine).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Where the simulation stands.
    pub fn progress(&self) -> Progress {
        Progress {
            now: self.now,
            trips: self.trips.len(),
            arrived: self.next_trip,
            served: self.served,
            unserved: self.unserved,
            waiting: self.waiting.len(),
            idle: self.idle,
        }
    }

    /// Whether every order is settled and every trip driven.
    pub fn is_finished(&self) -> bool {
        self.finished || (self.work_pending == 0 && self.next_trip == self.trips.len())
    }

    /// The instant the next [`step`](Self::step) will handle, or `None` if
    /// the simulation is over (to pace a replay against the wall clock).
    pub fn next_time(&self) -> Option<Timestamp> {
        if self.is_finished() {
            return None;
        }
        let next_event = self.events.peek().map(|Reverse((t, _, _))| *t);
        let next_order = self.trips.get(self.next_trip).map(|t| t.pickup_time);
        next_event.into_iter().chain(next_order).min()
    }

    /// Handles the next instant at which anything happens. Returns that
    /// instant, or `None` once the simulation is over.
    ///
    /// # Errors
    /// A backend error the simulation cannot handle, or a policy breaking
    /// its contract; the simulation should not be stepped further then.
    pub fn step(&mut self) -> Result<Option<Timestamp>, SimError> {
        let Some(t) = self.next_time() else {
            self.finished = true;
            return Ok(None);
        };
        self.record_samples_before(t);
        self.now = t;
        self.backend.set_time(t);
        if self.reserved > 0 {
            let lapsed = self.timed().expire_matches()?;
            for ev in lapsed {
                self.reservation_lapsed(&ev.m.order_id);
            }
        }
        while self
            .trips
            .get(self.next_trip)
            .is_some_and(|trip| trip.pickup_time == t)
        {
            self.order_appears(self.next_trip);
            self.next_trip += 1;
        }
        loop {
            while let Some(Reverse((at, _, ev))) = self.events.peek().copied() {
                if at != t {
                    break;
                }
                self.events.pop();
                if ev.is_work() {
                    self.work_pending -= 1;
                }
                self.handle(ev)?;
            }
            self.dispatch()?;
            // Zero-length legs and immediate confirms may have scheduled
            // more at this very instant.
            if self
                .events
                .peek()
                .is_none_or(|Reverse((at, _, _))| *at != t)
            {
                break;
            }
        }
        Ok(Some(t))
    }

    /// Runs to the end and returns the outcome.
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub fn run(mut self) -> Result<SimOutcome, SimError> {
        while self.step()?.is_some() {}
        Ok(self.finish())
    }

    /// The outcome so far; after the last [`step`](Self::step), the final one.
    pub fn finish(mut self) -> SimOutcome {
        let end = self.now;
        self.record_samples_before(end.plus_millis(1));
        let mut waits = Vec::new();
        let mut pickup_m = Vec::new();
        let (mut empty_m, mut loaded_m) = (0.0, 0.0);
        let mut driving_ms: u64 = 0;
        for leg in &self.legs {
            driving_ms += u64::try_from(leg.end.as_millis() - leg.start.as_millis()).unwrap_or(0);
            if leg.loaded {
                loaded_m += leg.driven_m;
            } else {
                empty_m += leg.driven_m;
            }
        }
        let orders: Vec<OrderOutcome> = self
            .trips
            .iter()
            .zip(&self.orders)
            .map(|(trip, o)| {
                let fate = match (o.driver, o.confirmed_at, o.pickup_at, o.dropoff_at) {
                    (Some(d), Some(confirmed_at), Some(pickup_at), Some(dropoff_at)) => {
                        waits.push(pickup_at.as_millis() - trip.pickup_time.as_millis());
                        pickup_m.push(o.pickup_m);
                        Fate::Served(Service {
                            driver: self.drivers[d].id.clone(),
                            confirmed_at,
                            pickup_at,
                            dropoff_at,
                            pickup_m: o.pickup_m,
                            loaded_m: o.loaded_m,
                        })
                    }
                    _ => Fate::Unserved {
                        gave_up_at: o.gave_up_at.unwrap_or(end),
                    },
                };
                OrderOutcome {
                    order_id: trip.id.clone(),
                    requested_at: trip.pickup_time,
                    fate,
                }
            })
            .collect();
        let trips = self.trips.len();
        // Delivered orders: after the last step, every confirmed order. (A
        // simulation finished early counts trips still under way as unserved.)
        let served = waits.len();
        let fleet_ms = self.drivers.len() as f64 * (end.as_millis() - self.t0.as_millis()) as f64;
        let engine_ns: BTreeMap<&'static str, report::Latency> = OPERATIONS
            .iter()
            .zip(std::mem::take(&mut self.timings.samples))
            .map(|(name, samples)| (*name, report::latency(samples)))
            .collect();
        let report = Report {
            trips,
            served,
            unserved: trips - served,
            served_pct: if trips == 0 {
                0.0
            } else {
                report::round_to(100.0 * served as f64 / trips as f64, 2)
            },
            wait_s: report::wait_stats(waits),
            pickup_km: report::distance_stats(pickup_m),
            empty_km_total: report::round_to(empty_m / 1000.0, 3),
            loaded_km_total: report::round_to(loaded_m / 1000.0, 3),
            utilisation: if fleet_ms > 0.0 {
                report::round_to(driving_ms as f64 / fleet_ms, 4)
            } else {
                0.0
            },
            engine_ns,
            wall_s: self
                .started
                .map_or(0.0, |s| report::round_to(s.elapsed().as_secs_f64(), 3)),
            seed: self.config.seed,
            policy: self.policy.name().to_owned(),
            drivers: self.drivers.len(),
        };
        SimOutcome {
            report,
            orders,
            legs: self.legs,
            timeline: self.timeline,
            final_positions: self.drivers.into_iter().map(|d| (d.id, d.pos)).collect(),
        }
    }

    fn timed(&mut self) -> Timed<'_, B> {
        Timed {
            inner: &mut self.backend,
            timings: &mut self.timings,
        }
    }

    fn schedule(&mut self, at: Timestamp, ev: Event) {
        if ev.is_work() {
            self.work_pending += 1;
        }
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    /// The first multiple of `every` (counted from the first order's time)
    /// strictly after now.
    fn next_multiple(&self, every: u64) -> Timestamp {
        let since = u64::try_from(self.now.as_millis() - self.t0.as_millis()).unwrap_or(0);
        self.t0.plus_millis((since / every + 1) * every)
    }

    /// Makes sure position reports happen: at the next multiple of the
    /// update interval while anyone moves, else at the next heartbeat.
    fn schedule_tick(&mut self) {
        let every = match self.config.heartbeat_ms {
            Some(h) if self.moving == 0 => h,
            _ => self.config.update_every_ms,
        };
        let at = self.next_multiple(every);
        if self.tick_at.is_none_or(|t| at < t) {
            // An earlier tick supersedes a later one (that event is ignored).
            self.tick_at = Some(at);
            self.schedule(at, Event::Tick);
        }
    }

    fn record_samples_before(&mut self, t: Timestamp) {
        while self.next_sample < t {
            self.timeline.push(Sample {
                at: self.next_sample,
                idle: self.idle,
                serving: self.drivers.len() - self.idle,
                waiting: self.waiting.len(),
                served: self.served,
                unserved: self.unserved,
            });
            self.next_sample = self.next_sample.plus_millis(self.config.sample_every_ms);
        }
    }

    fn order_appears(&mut self, order: usize) {
        self.orders[order].phase = Phase::Waiting;
        self.waiting.insert(order);
        self.dirty = true;
        let give_up = self.now.plus_millis(self.config.patience_ms);
        self.schedule(give_up, Event::GiveUp(order));
    }

    fn handle(&mut self, ev: Event) -> Result<(), SimError> {
        match ev {
            Event::Confirm(order, generation) => {
                let o = &self.orders[order];
                if o.generation == generation && matches!(o.phase, Phase::Reserved { .. }) {
                    self.confirm(order)?;
                }
            }
            Event::Arrive(driver) => self.arrive(driver)?,
            Event::GiveUp(order) => {
                if self.orders[order].phase == Phase::Waiting {
                    self.give_up(order);
                }
            }
            Event::Tick if self.tick_at == Some(self.now) => {
                self.tick_at = None;
                self.report_positions()?;
            }
            Event::Window => {
                self.window_at = None;
                self.dirty = true;
            }
            // A tick superseded by an earlier one; or a hold's end, whose
            // work the expiry sweep at the start of the step has done.
            Event::Tick | Event::HoldEnds => {}
        }
        Ok(())
    }

    fn give_up(&mut self, order: usize) {
        self.waiting.remove(&order);
        let o = &mut self.orders[order];
        o.phase = Phase::Unserved;
        o.gave_up_at = Some(self.now);
        self.unserved += 1;
    }

    /// A reservation ended unconfirmed: the driver is idle again, the
    /// order waits again, or gives up if its patience has run out.
    fn reservation_lapsed(&mut self, order_id: &OrderId) {
        let Some(&order) = self.order_index.get(order_id) else {
            return;
        };
        let Phase::Reserved { driver } = self.orders[order].phase else {
            return;
        };
        self.reserved -= 1;
        self.drivers[driver].task = Task::Idle;
        self.idle += 1;
        self.dirty = true;
        let deadline = self.trips[order]
            .pickup_time
            .plus_millis(self.config.patience_ms);
        if self.now < deadline {
            self.orders[order].phase = Phase::Waiting;
            self.waiting.insert(order);
        } else {
            self.give_up(order);
        }
    }

    fn confirm(&mut self, order: usize) -> Result<(), SimError> {
        let id = self.trips[order].id.clone();
        let Phase::Reserved { driver } = self.orders[order].phase else {
            return Ok(());
        };
        match self.timed().confirm(&id) {
            Ok(_) => {
                self.reserved -= 1;
                self.served += 1;
                let o = &mut self.orders[order];
                o.phase = Phase::EnRoute { driver };
                o.confirmed_at = Some(self.now);
                o.driver = Some(driver);
                let pickup = self.trips[order].pickup;
                self.start_leg(driver, order, pickup, false);
                Ok(())
            }
            Err(SimError::Engine(Error::ReservationExpired(_))) => {
                self.reservation_lapsed(&id);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn start_leg(&mut self, driver: usize, order: usize, to: Position, loaded: bool) {
        let from = self.drivers[driver].pos;
        let driven_m = self.config.detour * from.distance_m(to);
        let speed_m_per_ms = self.config.speed_kmh / 3600.0;
        let duration_ms = (driven_m / speed_m_per_ms).round() as u64;
        let end = self.now.plus_millis(duration_ms);
        let o = &mut self.orders[order];
        if loaded {
            o.loaded_m = driven_m;
        } else {
            o.pickup_m = driven_m;
        }
        self.legs.push(Leg {
            driver: self.drivers[driver].id.clone(),
            order: self.trips[order].id.clone(),
            loaded,
            from,
            to,
            start: self.now,
            end,
            driven_m,
        });
        if !matches!(self.drivers[driver].task, Task::Driving { .. }) {
            self.moving += 1;
        }
        self.drivers[driver].task = Task::Driving {
            order,
            leg: self.legs.len() - 1,
        };
        self.schedule(end, Event::Arrive(driver));
        self.schedule_tick();
    }

    fn arrive(&mut self, driver: usize) -> Result<(), SimError> {
        let Task::Driving { order, leg } = self.drivers[driver].task else {
            return Ok(());
        };
        let (to, loaded) = (self.legs[leg].to, self.legs[leg].loaded);
        let d = &mut self.drivers[driver];
        d.pos = to;
        d.last_update = self.now;
        let update = DriverUpdate::location(d.id.clone(), to, Some(self.now));
        self.timed().move_drivers(&[update])?;
        if loaded {
            let id = self.trips[order].id.clone();
            self.timed().complete(&id)?;
            let o = &mut self.orders[order];
            o.phase = Phase::Done;
            o.dropoff_at = Some(self.now);
            self.drivers[driver].task = Task::Idle;
            self.moving -= 1;
            self.idle += 1;
            self.dirty = true;
        } else {
            self.orders[order].pickup_at = Some(self.now);
            let dropoff = self.trips[order].dropoff;
            self.start_leg(driver, order, dropoff, true);
        }
        Ok(())
    }

    /// Sends the positions of moving drivers (and heartbeats of idle ones).
    fn report_positions(&mut self) -> Result<(), SimError> {
        let now = self.now;
        let heartbeat = self.config.heartbeat_ms;
        let mut updates = Vec::with_capacity(self.moving);
        for d in &mut self.drivers {
            let pos = match d.task {
                Task::Driving { leg, .. } => {
                    let leg = &self.legs[leg];
                    let span = (leg.end.as_millis() - leg.start.as_millis()).max(1) as f64;
                    let f = (now.as_millis() - leg.start.as_millis()) as f64 / span;
                    interpolate(leg.from, leg.to, f.clamp(0.0, 1.0))
                }
                Task::Idle | Task::Reserved { .. } => match heartbeat {
                    Some(h) if d.last_update.plus_millis(h) <= now => d.pos,
                    _ => continue,
                },
            };
            d.last_update = now;
            updates.push(DriverUpdate::location(d.id.clone(), pos, Some(now)));
        }
        if !updates.is_empty() {
            self.timed().move_drivers(&updates)?;
        }
        let more_work = self.work_pending > 0 || self.next_trip < self.trips.len();
        if more_work && (self.moving > 0 || heartbeat.is_some()) {
            self.schedule_tick();
        }
        Ok(())
    }

    /// Asks the policy to assign, if it is due, and acts on its matches.
    fn dispatch(&mut self) -> Result<(), SimError> {
        if self.waiting.is_empty() {
            self.dirty = false;
            return Ok(());
        }
        let window = self.policy.window_ms();
        let due = self.dirty
            && match window {
                None => true,
                Some(w) => {
                    let since =
                        u64::try_from(self.now.as_millis() - self.t0.as_millis()).unwrap_or(0);
                    since % w == 0
                }
            };
        if due {
            self.dirty = false;
            if self.idle > 0 {
                self.assign()?;
            }
        }
        if let Some(w) = window
            && !self.waiting.is_empty()
            && self.window_at.is_none()
        {
            let at = self.next_multiple(w);
            self.window_at = Some(at);
            self.schedule(at, Event::Window);
        }
        Ok(())
    }

    fn assign(&mut self) -> Result<(), SimError> {
        let waiting: Vec<BatchOrder> = self
            .waiting
            .iter()
            .map(|&i| BatchOrder {
                order_id: self.trips[i].id.clone(),
                request: self.orders[i].request.clone(),
            })
            .collect();
        let ctx = DispatchContext {
            now: self.now,
            waiting: &waiting,
            idle_drivers: self.idle,
        };
        let mut timed = Timed {
            inner: &mut self.backend,
            timings: &mut self.timings,
        };
        let matches = self.policy.assign(&mut timed, &ctx)?;
        for m in matches {
            let (order, driver) = self.accept_match(&m)?;
            self.orders[order].phase = Phase::Reserved { driver };
            self.orders[order].generation += 1;
            self.waiting.remove(&order);
            self.drivers[driver].task = Task::Reserved { order };
            self.idle -= 1;
            self.reserved += 1;
            if self.config.accept_ms == 0 {
                self.confirm(order)?;
            } else {
                let at = self.now.plus_millis(self.config.accept_ms);
                let generation = self.orders[order].generation;
                self.schedule(at, Event::Confirm(order, generation));
                if self.config.accept_ms >= self.config.hold_ms {
                    // Wake up when the hold runs out, so the order waits
                    // again from then on, not from the late confirm.
                    let ends = self.now.plus_millis(self.config.hold_ms);
                    self.schedule(ends, Event::HoldEnds);
                }
            }
        }
        Ok(())
    }

    /// Checks a policy's match against the contract of [`Dispatch`].
    fn accept_match(&self, m: &Match) -> Result<(usize, usize), SimError> {
        let fail = |message: String| SimError::Policy {
            policy: self.policy.name().to_owned(),
            message,
        };
        let order = *self
            .order_index
            .get(&m.order_id)
            .ok_or_else(|| fail(format!("matched unknown order {}", m.order_id)))?;
        if !self.waiting.contains(&order) {
            return Err(fail(format!(
                "matched order {} that is not waiting",
                m.order_id
            )));
        }
        let driver = *self
            .driver_index
            .get(&m.driver_id)
            .ok_or_else(|| fail(format!("matched unknown driver {}", m.driver_id)))?;
        if self.drivers[driver].task != Task::Idle {
            return Err(fail(format!(
                "matched driver {} to order {}, but it is not idle",
                m.driver_id, m.order_id
            )));
        }
        if m.state != MatchState::Reserved {
            return Err(fail(format!(
                "returned the {} match of order {}; only new reservations may be returned",
                m.state.as_str(),
                m.order_id
            )));
        }
        Ok((order, driver))
    }
}

/// `n` positions, each the pickup of a trip drawn uniformly with
/// replacement by `SplitMix64(seed)`.
fn sample_positions(trips: &[Trip], n: usize, seed: u64) -> Result<Vec<Position>, SimError> {
    if n > 0 && trips.is_empty() {
        return Err(SimError::Config(
            "cannot place a sampled fleet without trips; give positions".into(),
        ));
    }
    let mut rng = SplitMix64(seed);
    Ok((0..n)
        .map(|_| trips[rng.below(trips.len())].pickup)
        .collect())
}

/// Linear interpolation in degrees (the straight line of a city map),
/// going the short way across the antimeridian.
fn interpolate(a: Position, b: Position, f: f64) -> Position {
    let mut dlon = b.lon() - a.lon();
    if dlon > 180.0 {
        dlon -= 360.0;
    } else if dlon < -180.0 {
        dlon += 360.0;
    }
    let mut lon = a.lon() + dlon * f;
    if lon > 180.0 {
        lon -= 360.0;
    } else if lon < -180.0 {
        lon += 360.0;
    }
    let lat = a.lat() + (b.lat() - a.lat()) * f;
    // Both ends are valid, so this is in range; keep the end point if
    // rounding ever says otherwise.
    Position::new(lat, lon).unwrap_or(if f < 0.5 { a } else { b })
}

/// `SplitMix64` (Steele, Lea & Flood): a tiny seedable generator whose
/// output is fixed by its definition, so a seed means the same fleet on
/// every machine and every version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; `n > 0`).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_its_reference_values() {
        // First outputs for seed 1234567 (from the reference C code).
        let mut r = SplitMix64(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        let mut r = SplitMix64(7);
        assert!((0..1000).all(|_| r.below(3) < 3));
    }

    #[test]
    fn interpolation_goes_the_short_way() {
        let a = Position::new(0.0, 179.0).unwrap();
        let b = Position::new(2.0, -179.0).unwrap();
        let mid = interpolate(a, b, 0.5);
        assert_eq!((mid.lat(), mid.lon()), (1.0, 180.0));
        let q = interpolate(a, b, 0.75);
        assert!((q.lon() + 179.5).abs() < 1e-12, "{q:?}");
        assert_eq!(interpolate(a, b, 1.0), Position::new(2.0, -179.0).unwrap());
    }

    #[test]
    fn invalid_settings_are_refused() {
        let backend = super::super::LocalBackend::new(crate::EngineConfig::default()).unwrap();
        let bad = SimConfig {
            detour: 0.5,
            ..SimConfig::default()
        };
        let err = Simulation::new(
            bad,
            Vec::new(),
            Fleet::Sampled(0),
            Box::new(super::super::NearestPolicy),
            backend,
        )
        .unwrap_err();
        assert_eq!(err.code(), "invalid_config");
        for bad in [
            SimConfig {
                speed_kmh: 0.0,
                ..SimConfig::default()
            },
            SimConfig {
                hold_ms: 0,
                ..SimConfig::default()
            },
            SimConfig {
                patience_ms: 0,
                ..SimConfig::default()
            },
            SimConfig {
                radius_m: Some(f64::NAN),
                ..SimConfig::default()
            },
            SimConfig {
                heartbeat_ms: Some(0),
                ..SimConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let backend = super::super::LocalBackend::new(crate::EngineConfig::default()).unwrap();
        let err = Simulation::new(
            SimConfig::default(),
            Vec::new(),
            Fleet::Sampled(3),
            Box::new(super::super::NearestPolicy),
            backend,
        )
        .unwrap_err();
        assert!(err.to_string().contains("without trips"), "{err}");
    }
}
