//! Trip replay and simulation on simulated time.
//!
//! A discrete-event simulation drives the engine's public API the way a
//! dispatch service would: a fleet of drivers moves in straight lines
//! (times a detour factor) at a given speed, sending location updates every
//! few simulated seconds; orders appear at their recorded pickup time; a
//! [`Dispatch`] policy reserves drivers for waiting orders; a driver drives
//! to the pickup, then to the drop-off, and becomes available there; an
//! order nobody takes within its patience is lost.
//!
//! - [`parse_trips`] reads a trips CSV from a `&str` (no I/O here: the
//!   caller reads the file), reporting bad rows with their line numbers;
//!   [`fold_onto_day`] folds sparse multi-year data onto one day.
//! - [`Simulation`] runs it: [`step`](Simulation::step) by step (to pace it,
//!   show progress or look at the engine in between) or all at once with
//!   [`run`](Simulation::run). It yields a [`SimOutcome`]: the [`Report`],
//!   every order's fate, every driven leg and a timeline.
//! - [`Dispatch`] is the policy trait; [`NearestPolicy`] claims the nearest
//!   driver for each order as soon as it can ([`Engine::claim`]),
//!   [`BatchPolicy`] collects orders over a window and assigns them together
//!   at the least total pickup distance ([`Engine::claim_batch`]).
//! - [`Backend`] is the part of the engine's API a simulation uses.
//!   [`LocalBackend`] is an in-process [`Engine`] on a [`ManualClock`]; the
//!   server crate implements it over HTTP, so the same replay can run
//!   against a live server.
//!
//! # Determinism
//!
//! Same input, same [`SimConfig`] (seed included), same policy → the same
//! [`SimOutcome`], and with [`SimConfig::timings`] off the same
//! [`Report::to_json`] bytes. Nothing here iterates a hash map: events are
//! ordered by (time, sequence number), orders by (pickup time, trip id),
//! drivers by index (their ids sort the same way), and the engine breaks
//! distance ties by driver id. The only randomness is the seeded fleet
//! placement ([`Fleet::Sampled`]), from a `SplitMix64` generator whose
//! output is fixed by its definition, not by a crate version. With timings
//! on, only `engine_ns` and `wall_s` differ between runs.
//!
//! ```
//! use hexmatch::sim::{parse_trips, Fleet, LocalBackend, NearestPolicy, SimConfig, Simulation};
//!
//! let csv = "trip_id,pickup_time,pickup_lat,pickup_lon,dropoff_time,dropoff_lat,dropoff_lon\n\
//!            t1,2026-01-05T08:00:00Z,41.880,-87.630,2026-01-05T08:10:00Z,41.900,-87.640\n\
//!            t2,2026-01-05T08:01:00Z,41.870,-87.620,2026-01-05T08:12:00Z,41.860,-87.650\n";
//! let trips = parse_trips(csv)?.trips;
//! let backend = LocalBackend::new(Default::default())?;
//! let config = SimConfig { timings: false, ..SimConfig::default() };
//! let sim = Simulation::new(config, trips, Fleet::Sampled(3), Box::new(NearestPolicy), backend)?;
//! let outcome = sim.run()?;
//! assert_eq!(outcome.report.trips, 2);
//! assert_eq!(outcome.report.served + outcome.report.unserved, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Engine`]: crate::Engine
//! [`Engine::claim`]: crate::Engine::claim
//! [`Engine::claim_batch`]: crate::Engine::claim_batch
//! [`ManualClock`]: crate::ManualClock

mod backend;
mod dispatch;
mod report;
mod run;
mod trips;

pub use backend::{Backend, LocalBackend, SimError};
pub use dispatch::{BatchPolicy, Dispatch, DispatchContext, NearestPolicy};
pub use report::{DistanceStats, Latency, OPERATIONS, Report, WaitStats, percentile};
pub use run::{
    Fate, Fleet, Leg, OrderOutcome, Progress, Sample, Service, SimConfig, SimOutcome, Simulation,
};
pub use trips::{RowError, Trip, TripFile, fold_onto_day, parse_trips};
