//! The service layer: the one place where a location update, a nearest
//! query, a claim or a match change is validated and applied. HTTP, the
//! WebSocket stream, the Redis stream and other nodes (through the peer
//! routes) all call it; none of them touches the engine, Redis or the
//! cluster directly.
//!
//! [`Service`] holds what every operation shares: the engine, the
//! settings, the region map and, once connected, Redis persistence and
//! this node's view of the cluster.
//!
//! - [`drivers`](Service::put_driver): driver upserts, moves, batches,
//!   stream entries, and the handoff of drivers between nodes.
//! - [`matches`](Service::claim): nearest, claims, confirm / release /
//!   complete, batches, exact across regions and nodes.
//! - [`ops`](Service::readiness): readiness, regions and the cluster view.
//! - [`areas`](Service::drivers_within): drivers in a box, a polygon or a
//!   region, region counts, density per H3 cell, and the region that
//!   narrows a nearest query or a claim.
//! - [`events`]: the event bus every transition above publishes to
//!   ([`Service::events`]), read by the SSE feed, the Redis stream and
//!   the webhooks ([`webhooks`]); [`zones`] finds where drivers enter and
//!   leave zones.

mod areas;
mod drivers;
pub mod events;
mod journal;
mod matches;
mod ops;
pub mod webhooks;
pub mod zones;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use hexmatch::{Engine, RegionMap};

pub use self::areas::DEFAULT_AREA_LIMIT;
pub use self::drivers::apply_stream_entries;
pub use self::events::{EventBus, Read, TypeFilter};
pub use self::matches::{Claimed, Nearest};
pub use self::zones::Zones;
use crate::cluster::Cluster;
use crate::config::ServeConfig;
use crate::error::{ApiError, ErrorCode};
use crate::persist::Persistence;
use crate::wire::{DEFAULT_REGION, MatchOut};

/// Whether an operation may reach other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole cluster (a client's request).
    Cluster,
    /// This node only (another node's request, made on its own behalf).
    Local,
}

/// What every operation shares.
#[derive(Debug)]
pub struct Service {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The server's settings.
    pub config: ServeConfig,
    /// Regions from `--regions` (a `GeoJSON` file), if configured.
    pub regions: Option<RegionMap>,
    /// The events this node emits.
    pub events: Arc<EventBus>,
    /// Zones whose crossings are announced (none: no zones, or events off).
    zones: Option<Zones>,
    ready: AtomicBool,
    startup_problem: parking_lot::Mutex<Option<String>>,
    persist: OnceLock<Arc<Persistence>>,
    cluster: OnceLock<Arc<Cluster>>,
    driver_locks: crate::persist::stripes::StripedLocks,
}

impl Service {
    /// A service for `engine` under `config`, not yet ready. With events
    /// on, the regions of `regions` are zones.
    pub fn new(engine: Arc<Engine>, config: ServeConfig, regions: Option<RegionMap>) -> Self {
        let events = Arc::new(EventBus::new(
            config.event_backlog,
            &config.node_id,
            Arc::clone(engine.clock()),
        ));
        let zones = if events.is_on() {
            // Without a zone file this cannot fail.
            Zones::new(regions.as_ref(), None).ok().flatten()
        } else {
            None
        };
        Self {
            engine,
            config,
            regions,
            events,
            zones,
            ready: AtomicBool::new(false),
            startup_problem: parking_lot::Mutex::new(None),
            persist: OnceLock::new(),
            cluster: OnceLock::new(),
            driver_locks: journal::driver_locks(),
        }
    }

    /// Sets the zones (the regions and the named zones of `--zones`);
    /// ignored with events off.
    #[must_use]
    pub fn with_zones(mut self, zones: Option<Zones>) -> Self {
        if self.events.is_on() {
            self.zones = zones;
        }
        self
    }

    /// Whether start-up (the snapshot restore) is done.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks start-up done: requests are served from now on.
    pub fn set_ready(&self) {
        *self.startup_problem.lock() = None;
        self.ready.store(true, Ordering::Release);
    }

    /// Records why start-up cannot finish yet (shown by `/readyz`).
    pub fn set_startup_problem(&self, problem: String) {
        *self.startup_problem.lock() = Some(problem);
    }

    /// Redis persistence, once connected and restored.
    pub fn persist(&self) -> Option<&Arc<Persistence>> {
        self.persist.get()
    }

    /// Sets Redis persistence (once).
    pub fn set_persist(&self, p: Arc<Persistence>) {
        let _ = self.persist.set(p);
    }

    /// This node's view of the cluster, once joined.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Sets the cluster view (once).
    pub fn set_cluster(&self, c: Arc<Cluster>) {
        let _ = self.cluster.set(c);
    }

    /// The region a position belongs to: from the region map when one is
    /// configured (cells in no polygon go to an `outside-<cell>` region),
    /// else the single region `default`.
    pub fn region_name(&self, pos: hexmatch::Position) -> String {
        self.regions
            .as_ref()
            .and_then(|r| r.region_of(pos).ok())
            .map_or_else(|| DEFAULT_REGION.to_owned(), |id| id.to_string())
    }

    /// A match as the API shows it, with its region.
    pub fn match_out(&self, m: hexmatch::Match) -> MatchOut {
        let region = self.region_name(m.pickup);
        MatchOut { region, ..m.into() }
    }

    /// The persistence layer that match changes must go through: `Ok(None)`
    /// when running memory-only, an error (503) while Redis is configured
    /// but down, so no match changes without being durable.
    fn durable(&self) -> Result<Option<&Arc<Persistence>>, ApiError> {
        if self.config.redis_url.is_none() {
            return Ok(None);
        }
        match self.persist.get() {
            Some(p) if p.is_up() => Ok(Some(p)),
            _ => Err(ApiError::new(
                ErrorCode::Unavailable,
                "Redis is unreachable; match changes are refused until it returns",
            )),
        }
    }
}
