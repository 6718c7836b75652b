//! # hexmatch — the engine
//!
//! The pure, synchronous core of hexmatch: an in-memory, H3-partitioned
//! index of drivers that answers *exact* nearest-available-driver queries
//! and reserves drivers for orders atomically. No I/O, no async: the
//! server crate adapts it to HTTP and Redis, simulations use it directly.
//!
//! - [`Engine`] — the index and the matching book; `Send + Sync`, `&self` API.
//! - [`Engine::upsert`], [`Engine::remove`], [`Engine::expire_drivers`],
//!   [`Engine::bulk_load`] — keeping positions current.
//! - [`Engine::nearest`] with a [`NearestQuery`] — exact k nearest by
//!   great-circle distance, with vehicle / capability / radius filters.
//! - [`Engine::claim`], [`Engine::confirm`], [`Engine::release`],
//!   [`Engine::complete`], [`Engine::expire_matches`] — matching; and
//!   [`Engine::claim_batch`] — min-total-distance assignment of a window.
//! - Validated values: [`DriverId`], [`OrderId`], [`RegionId`], [`Position`],
//!   [`Timestamp`]; time comes from a [`Clock`] ([`SystemClock`] or
//!   [`ManualClock`] for simulated time).
//!
//! See `ARCHITECTURE.md` at the repository root for the design and its invariants.
//!
//! ```
//! use hexmatch::{ClaimRequest, DriverId, DriverUpdate, Engine, OrderId, Position};
//!
//! let engine = Engine::new(Default::default())?;
//! let pos = Position::new(41.8786, -87.6251)?;
//! engine.upsert(&DriverUpdate::location(DriverId::new("d1")?, pos, None))?;
//! let (m, created) = engine.claim(&OrderId::new("o1")?, &ClaimRequest::new(pos))?;
//! assert!(created);
//! assert_eq!(m.driver_id.as_str(), "d1");
//! // The same order again returns the same match; nobody else gets d1.
//! assert_eq!(engine.claim(&OrderId::new("o1")?, &ClaimRequest::new(pos))?.0, m);
//! assert!(engine.claim(&OrderId::new("o2")?, &ClaimRequest::new(pos)).is_err());
//! # Ok::<(), hexmatch::Error>(())
//! ```

mod area;
mod assign;
mod driver;
mod engine;
mod error;
mod filter;
mod ids;
mod index;
mod matching;
mod par;
mod position;
mod region;
mod rtree;
mod search;
pub mod sim;
mod snapshot;
#[cfg(test)]
mod testing;
mod time;

pub use area::{
    Area, AreaPage, AreaPolygon, AreaQuery, CellSet, LatLonBox, MAX_AREA_LIMIT, MAX_DENSITY_CELLS,
    StatusSet,
};
pub use assign::{Assignment, assign_greedy, assign_min_cost};
pub use driver::{Capabilities, Driver, DriverUpdate, Status, Vehicle};
pub use engine::{EDGE_BUDGET_PER_CANDIDATE, Engine, GROUP_RESOLUTION};
pub use error::{Error, Result};
pub use h3o::{CellIndex, LatLng, Resolution};
pub use ids::{DriverId, MAX_ID_LEN, OrderId, RegionId};
pub use index::{Applied, EngineConfig, StatusCounts};
pub use matching::{
    BatchOrder, BatchOutcome, ClaimRequest, MAX_HOLD_MS, Match, MatchEvent, MatchState,
    RestoreReport,
};
pub use position::{EARTH_RADIUS_M, Position};
pub use region::{Outside, Region, RegionMap};
pub use search::{MAX_DISTANCE_M, MAX_K, NearestQuery, Neighbor};
pub use snapshot::{ChunkInfo, DurableMatch, Manifest, SNAPSHOT_FORMAT, Snapshot, decode_snapshot};
pub use time::{Clock, ManualClock, Rfc3339, SystemClock, Timestamp};

/// The README's examples, compiled and run as doctests so they stay true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
