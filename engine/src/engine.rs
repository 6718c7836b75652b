//! The [`Engine`]: the front that owns the index and the matching book,
//! and keeps the two in step.
//!
//! The index (`index`) holds the drivers and knows nothing of matches;
//! the book (`matching`) holds the matches and knows nothing of where
//! drivers are. The engine's methods decide under the book what a change
//! means for a match, and apply it to the index. This file keeps positions
//! current (upsert, remove, TTL sweep, bulk load) and answers reads and
//! searches; `engine/matches.rs` claims, confirms, releases, completes and
//! expires matches, and restores them; `engine/batch.rs` serves windows of
//! orders together; `engine/snapshots.rs` takes and loads snapshots of the
//! drivers.
//!
//! # Locks and their order
//! `matching book → driver stripe → cells → shard`. A thread may skip
//! levels but never takes an earlier lock while holding a later one, and
//! never holds two shard locks at once. Searches take `cells` (read) and one
//! shard (read) at a time, so writers in one cell never stall readers in
//! another. Every change of a driver's status by matching happens under
//! the book.

mod batch;
mod matches;
mod snapshots;

pub use batch::{EDGE_BUDGET_PER_CANDIDATE, GROUP_RESOLUTION};

use std::sync::Arc;

use h3o::{CellIndex, Resolution};
use parking_lot::Mutex;

use crate::area::{self, Area, AreaPage, AreaQuery, LatLonBox};
use crate::driver::{Driver, DriverUpdate, Status};
use crate::error::{Error, Result};
use crate::ids::DriverId;
use crate::index::{Applied, EngineConfig, Index, Record, StatusCounts};
use crate::matching::{DriverEnd, MatchBook, MatchEvent, StatusRequest};
use crate::position::Position;
use crate::search::{self, NearestQuery, Neighbor};
use crate::time::{Clock, SystemClock, Timestamp};

/// The engine: the sharded index plus the matching book.
///
/// `Send + Sync` with a `&self` API: share one `Arc<Engine>` between
/// threads, or own one in a simulation.
///
/// ```
/// use hexmatch::{DriverId, DriverUpdate, Engine, NearestQuery, Position};
///
/// let engine = Engine::new(Default::default())?;
/// for (id, lat, lon) in [("a", 41.88, -87.63), ("b", 41.91, -87.66), ("c", 41.70, -87.60)] {
///     let pos = Position::new(lat, lon)?;
///     engine.upsert(&DriverUpdate::location(DriverId::new(id)?, pos, None))?;
/// }
/// let near = engine.nearest(&NearestQuery::new(Position::new(41.89, -87.64)?, 2)?)?;
/// let ids: Vec<_> = near.iter().map(|n| n.id.as_str()).collect();
/// assert_eq!(ids, ["a", "b"]);
/// # Ok::<(), hexmatch::Error>(())
/// ```
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    /// The drivers; its locks come after the book.
    index: Index,
    /// Every match; the first lock of all.
    book: Mutex<MatchBook>,
}

impl Engine {
    /// An empty engine on the system clock.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an invalid config.
    pub fn new(config: EngineConfig) -> Result<Self> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// An empty engine reading time from `clock` (a [`ManualClock`](crate::ManualClock)
    /// for simulations and replays).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an invalid config.
    pub fn with_clock(config: EngineConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let resolution = config.validate()?;
        Ok(Self {
            config,
            clock,
            index: Index::new(resolution),
            book: Mutex::new(MatchBook::default()),
        })
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The engine's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The H3 partition cell of a position.
    pub fn cell_of(&self, pos: Position) -> CellIndex {
        self.index.cell_of(pos)
    }

    /// Inserts or updates a driver (`PUT /v1/drivers/{id}`, location updates,
    /// stream ingestion).
    ///
    /// A driver crossing a cell border moves between shards. An update whose
    /// `ts` is older than the driver's last applied one is ignored and
    /// reported as [`Applied::Stale`]. Setting `offline` or `busy` on a
    /// reserved driver releases its reservation; setting `available` on a
    /// driver busy with a confirmed match completes the match; `available`
    /// on a reserved driver keeps the reservation.
    ///
    /// The returned driver's `order_id` and `reserved_until` are filled in
    /// only for updates that set a status; a plain location update never
    /// takes the matching lock. [`driver`](Self::driver) gives the full view.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when the update asks for status `reserved`.
    pub fn upsert(&self, update: &DriverUpdate) -> Result<Applied> {
        if update.status == Some(Status::Reserved) {
            return Err(Error::InvalidParameter(
                "status reserved is set by matching, not by clients".into(),
            ));
        }
        let Some(wanted) = update.status else {
            // Plain location update: no matching state can change, and the
            // book is not touched (it is the hot path).
            let now = self.clock.now();
            self.check_not_ahead(update.ts, now)?;
            return self.index.apply(update, None, true, now);
        };
        let mut book = self.book.lock();
        let now = self.clock.now();
        self.check_not_ahead(update.ts, now)?;
        let StatusRequest {
            status: effective,
            end: transition,
        } = book.status_request(&update.id, wanted);
        let applied = self.index.apply(update, effective, true, now)?;
        if let (Applied::Applied(_), Some(t)) = (&applied, transition) {
            let ev = book.finish_for_driver(&update.id, t, now, self.config.max_ended_matches);
            debug_assert!(ev.is_some());
        }
        drop(book);
        Ok(self.decorate(applied))
    }

    /// Moves a known driver (`POST /v1/drivers/{id}/location`): like
    /// [`upsert`](Self::upsert) with only a position and `ts` (so it never
    /// takes the matching lock), but an unknown driver is an error rather
    /// than created.
    ///
    /// # Errors
    /// [`Error::UnknownDriver`] if no driver has this id.
    pub fn update_location(
        &self,
        id: &DriverId,
        pos: Position,
        ts: Option<Timestamp>,
    ) -> Result<Applied> {
        let now = self.clock.now();
        self.check_not_ahead(ts, now)?;
        self.index.apply(
            &DriverUpdate::location(id.clone(), pos, ts),
            None,
            false,
            now,
        )
    }

    /// Refuses a fix stamped more than `max_future_ms` ahead of `now`.
    /// Inlined into every update; the refusal is built out of line.
    #[inline]
    fn check_not_ahead(&self, ts: Option<Timestamp>, now: Timestamp) -> Result<()> {
        let Some(ts) = ts else { return Ok(()) };
        let ahead_ms = ts.as_millis().saturating_sub(now.as_millis());
        if ahead_ms <= 0 || ahead_ms.unsigned_abs() <= self.config.max_future_ms {
            return Ok(());
        }
        Err(self.too_far_ahead(ts, now, ahead_ms.unsigned_abs()))
    }

    #[cold]
    #[inline(never)]
    fn too_far_ahead(&self, ts: Timestamp, now: Timestamp, ahead_ms: u64) -> Error {
        Error::InvalidTimestamp(format!(
            "ts {ts} is {} ahead of the server's clock ({now}); at most {} ahead is accepted",
            crate::time::span(ahead_ms),
            crate::time::span(self.config.max_future_ms),
        ))
    }

    fn decorate(&self, applied: Applied) -> Applied {
        match applied {
            Applied::Applied(d) => Applied::Applied(self.with_match(d)),
            stale @ Applied::Stale { .. } => stale,
        }
    }

    /// Fills in the driver's current order, if any.
    fn with_match(&self, mut d: Driver) -> Driver {
        if matches!(d.status, Status::Reserved | Status::Busy) {
            let book = self.book.lock();
            if let Some(m) = book.live_match_of(&d.id) {
                d.order_id = Some(m.order_id.clone());
                if m.state == crate::MatchState::Reserved {
                    d.reserved_until = Some(m.reserved_until);
                }
            }
        }
        d
    }

    /// The driver as the engine knows it, or `None` if unknown.
    pub fn driver(&self, id: &DriverId) -> Option<Driver> {
        let d = self.index.driver(id)?;
        Some(self.with_match(d))
    }

    /// Removes a driver, releasing its match if it has one. Returns the
    /// driver as it was, or `None` if unknown.
    pub fn remove(&self, id: &DriverId) -> Option<(Driver, Option<MatchEvent>)> {
        self.remove_where(id, |_| true)
    }

    /// Removes a driver unless it is in a live match: a claim may have
    /// reserved it since the caller last looked. Returns the driver as it
    /// was, or `None` if it is unknown or matched (then it stays as is).
    pub fn remove_unmatched(&self, id: &DriverId) -> Option<Driver> {
        let book = self.book.lock();
        if book.live_match_of(id).is_some() {
            return None;
        }
        let driver = self.index.remove_where(id, |_| true);
        drop(book);
        driver
    }

    /// Removes a driver if `cond` holds for its record, ending its match
    /// (under the book, taken first).
    fn remove_where(
        &self,
        id: &DriverId,
        cond: impl Fn(&Record) -> bool,
    ) -> Option<(Driver, Option<MatchEvent>)> {
        let mut book = self.book.lock();
        let driver = self.index.remove_where(id, cond)?;
        let now = self.clock.now();
        let event =
            book.finish_for_driver(id, DriverEnd::Removed, now, self.config.max_ended_matches);
        Some((driver, event))
    }

    /// Removes every driver whose last update was applied more than
    /// `driver_ttl_ms` before the clock's now, releasing their matches.
    /// Returns what it removed.
    pub fn expire_drivers(&self) -> Vec<(Driver, Option<MatchEvent>)> {
        let cutoff = self.clock.now().minus_millis(self.config.driver_ttl_ms);
        let stale_ids = self.index.ids_unseen_since(cutoff);
        // Re-check under the lock: a fresh update may have arrived meanwhile.
        stale_ids
            .iter()
            .filter_map(|id| self.remove_where(id, |r| r.seen < cutoff))
            .collect()
    }

    /// Counts of drivers by status.
    pub fn counts(&self) -> StatusCounts {
        self.index.counts()
    }

    /// Number of drivers known.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no driver is known.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Number of partition cells that have held drivers.
    pub fn cell_count(&self) -> usize {
        self.index.cell_count()
    }

    /// Per-cell driver counts (for region statistics).
    pub fn cell_counts(&self) -> Vec<(CellIndex, StatusCounts)> {
        self.index.cell_counts()
    }

    /// One page of the drivers inside an area, by id, with their orders
    /// filled in (see [`area`](crate::Area) for the shapes and their
    /// edges). Each shard is read under its own read lock, so a page is
    /// not one instant's picture: a driver moving meanwhile may be missed
    /// or seen at its old or new place, never twice.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a limit out of range, or cells of
    /// another resolution than the engine's partition.
    pub fn within(&self, q: &AreaQuery) -> Result<AreaPage> {
        let mut page = area::within(&self.index, q)?;
        page.drivers = page
            .drivers
            .into_iter()
            .map(|d| self.with_match(d))
            .collect();
        Ok(page)
    }

    /// Counts by status of every driver inside an area.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for cells of another resolution than
    /// the engine's partition.
    pub fn counts_within(&self, area: &Area) -> Result<StatusCounts> {
        area::counts_within(&self.index, area)
    }

    /// Counts by status of the drivers inside a box, per H3 cell of
    /// `resolution` (any, 0–15), sorted by cell; cells without drivers
    /// are left out.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] when more than
    /// [`MAX_DENSITY_CELLS`](crate::MAX_DENSITY_CELLS) cells would be listed.
    pub fn density(
        &self,
        area: &LatLonBox,
        resolution: Resolution,
    ) -> Result<Vec<(CellIndex, StatusCounts)>> {
        area::density(&self.index, area, resolution)
    }

    /// Every driver (in no particular order), read shard by shard.
    pub fn drivers(&self) -> Vec<Driver> {
        let mut out: Vec<Driver> = Vec::new();
        self.index.for_each_driver(|d| out.push(d));
        out.into_iter().map(|d| self.with_match(d)).collect()
    }

    /// Loads many drivers into an empty engine at once, building each
    /// shard's R-tree with its bulk loading (much faster than inserting
    /// one by one). Later duplicates of an id replace earlier ones.
    ///
    /// Both cores share the work: the H3 cells, the driver map (by stripe)
    /// and the shards' trees (by shard). The maps and slabs are sized
    /// exactly.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the engine already holds drivers or a
    /// driver has status `reserved` (reservations are restored with their
    /// matches, not here).
    /// A driver stamped further ahead of the clock than `max_future_ms`
    /// (a snapshot written by a node whose clock ran ahead, or data from
    /// before this guard) is loaded as if stamped now, so its next correct
    /// update is not stale.
    pub fn bulk_load(&self, drivers: impl IntoIterator<Item = Driver>) -> Result<usize> {
        let now = self.clock.now();
        let drivers = drivers.into_iter().map(self.not_ahead_of(now));
        self.index.bulk_load(drivers, now)
    }

    /// What a load does to each driver's timestamp: one further ahead of
    /// `now` than `max_future_ms` becomes `now`.
    fn not_ahead_of(&self, now: Timestamp) -> impl Fn(Driver) -> Driver + use<> {
        let latest = now.plus_millis(self.config.max_future_ms);
        move |mut d| {
            if d.ts > latest {
                d.ts = now;
            }
            d
        }
    }

    /// Adds many drivers to an engine that may hold others and be serving
    /// meanwhile (a region taken over from another node): each shard's new
    /// drivers enter its tree at once, by bulk loading where they are many,
    /// instead of one at a time. Searches see each new driver once the
    /// driver map knows it and its shard's tree has it.
    ///
    /// A driver whose id the engine holds (from before, from a concurrent
    /// write, or earlier in `drivers`) is applied as an update instead, in
    /// order, like [`upsert`](Self::upsert) (an older one is ignored).
    /// Timestamps too far ahead of the clock are taken as now, as in
    /// [`bulk_load`](Self::bulk_load). Returns how many drivers were
    /// added or updated.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if a driver has status `reserved`, or
    /// there are 2^32 drivers or more (nothing is loaded then).
    pub fn load(&self, drivers: impl IntoIterator<Item = Driver>) -> Result<usize> {
        let now = self.clock.now();
        let drivers: Vec<Driver> = drivers.into_iter().map(self.not_ahead_of(now)).collect();
        crate::index::check_loadable(&drivers, "load")?;
        let known = self.index.load(&drivers, now);
        let mut applied = drivers.len() - known.len();
        for i in known {
            let d = &drivers[i];
            let update = DriverUpdate {
                id: d.id.clone(),
                pos: d.pos,
                ts: Some(d.ts),
                status: Some(d.status),
                vehicle: Some(d.vehicle),
                capabilities: Some(d.capabilities),
            };
            if let Ok(Applied::Applied(_)) = self.upsert(&update) {
                applied += 1;
            }
        }
        Ok(applied)
    }

    /// The `k` nearest available drivers passing the query's filters, by
    /// great-circle distance, ties broken by driver id.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an invalid `k` or radius (only possible
    /// when the query was built by hand rather than through its constructors).
    pub fn nearest(&self, q: &NearestQuery) -> Result<Vec<Neighbor>> {
        search::nearest(&self.index, q, self.config.max_radius_m)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    use crate::testing::{did as id, pos, scattered};

    /// A fleet that comes and goes leaves no capacity behind: slot tables
    /// and trees of emptied shards are dropped, and the driver map shrinks.
    #[test]
    fn memory_is_given_back_when_the_fleet_leaves() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let n = 100_000;
        let ids: Vec<DriverId> = (0..n).map(|i| id(&format!("c{i}"))).collect();
        for (i, d) in ids.iter().enumerate() {
            let (a, b) = ((i as f64 * 0.618_034) % 1.0, (i as f64 * 0.754_878) % 1.0);
            let p = pos(41.6 + 0.5 * a, -87.9 + 0.5 * b);
            e.upsert(&DriverUpdate::location(d.clone(), p, None))
                .unwrap();
        }
        let (slots, nodes, buckets) = e.index.retained();
        assert!(
            slots >= n && nodes > n / 16 && buckets >= n,
            "{slots} {nodes} {buckets}"
        );
        for d in &ids {
            e.remove(d).unwrap();
        }
        let (slots, nodes, left) = e.index.retained();
        assert_eq!(slots, 0, "slot tables kept");
        assert!(
            nodes <= 2 * e.index.shards().len(),
            "{nodes} tree nodes kept"
        );
        assert!(
            left * 4 < buckets,
            "{left} of {buckets} driver-map buckets kept"
        );
        // And the engine still works.
        e.upsert(&DriverUpdate::location(
            ids[0].clone(),
            pos(41.88, -87.63),
            None,
        ))
        .unwrap();
        let near = e
            .nearest(&NearestQuery::new(pos(41.88, -87.63), 1).unwrap())
            .unwrap();
        assert_eq!(near[0].id, ids[0]);
    }

    #[test]
    fn bulk_load_keeps_the_last_duplicate() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let driver = |name: &str, lat: f64, status: Status| Driver {
            status,
            ..Driver::available(id(name), pos(lat, -87.63), Timestamp::EPOCH)
        };
        let loaded = e
            .bulk_load([
                driver("a", 41.88, Status::Available),
                driver("b", 41.89, Status::Available),
                // Same cell, then another cell (30 km north).
                driver("a", 41.881, Status::Busy),
                driver("b", 42.15, Status::Available),
            ])
            .unwrap();
        assert_eq!(loaded, 2);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e.counts(),
            StatusCounts {
                available: 1,
                busy: 1,
                ..Default::default()
            }
        );
        assert_eq!(e.driver(&id("a")).unwrap().pos, pos(41.881, -87.63));
        assert_eq!(e.driver(&id("b")).unwrap().pos, pos(42.15, -87.63));
        let near = e
            .nearest(&crate::NearestQuery::new(pos(41.88, -87.63), 5).unwrap())
            .unwrap();
        let ids: Vec<_> = near.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["b"]);
        // The freed slots are reused.
        e.upsert(&DriverUpdate::location(id("c"), pos(41.88, -87.63), None))
            .unwrap();
        assert_eq!(e.len(), 3);
    }

    #[test]
    fn small_moves_in_place_keep_the_tree_exact() {
        // Many tiny moves (most stay inside their leaf's box, so they are
        // made in place), then every available driver must be found where
        // it now is, and nowhere else.
        let e = Engine::new(EngineConfig::default()).unwrap();
        let n = 3000;
        let start = |i: u32| scattered(i, 41.85, -87.65, 0.05);
        let drivers =
            (0..n).map(|i| Driver::available(id(&format!("d{i}")), start(i), Timestamp::EPOCH));
        e.bulk_load(drivers).unwrap();
        let mut at: Vec<Position> = (0..n).map(start).collect();
        for step in 0..30_000u32 {
            let i = step * 7919 % n;
            let f = f64::from(step);
            let p = at[i as usize];
            let q = pos(
                p.lat() + ((f * 0.3).sin()) * 2e-5,
                p.lon() + ((f * 0.7).cos()) * 2e-5,
            );
            at[i as usize] = q;
            e.upsert(&DriverUpdate::location(id(&format!("d{i}")), q, None))
                .unwrap();
        }
        let shards = e.index.shards();
        let mut in_trees = 0;
        for shard in &shards {
            let data = shard.data.read();
            data.tree.check();
            for item in data.tree.iter() {
                let rec = data.record(item.slot).unwrap();
                // Bit-exact: the item's vector is computed from the record's position.
                assert!(
                    item.v
                        .iter()
                        .zip(rec.pos.to_unit_vector())
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                );
                assert_eq!(data.tree.get(item.slot), Some(item));
                in_trees += 1;
            }
        }
        assert_eq!(in_trees, n as usize);
        for (i, p) in at.iter().enumerate().step_by(97) {
            let near = e
                .nearest(&crate::NearestQuery::new(*p, 1).unwrap())
                .unwrap();
            assert!(near[0].distance_m.abs() < 1e-9, "d{i}");
        }
    }

    /// Every shard's published summary is its tree's, the index-wide one
    /// is their union and admits exactly the filters some available driver
    /// passes; the trees' own invariants hold.
    fn check_summaries(e: &Engine) {
        use crate::{Capabilities, Vehicle};
        let mut union = crate::filter::Traits::NONE;
        for shard in e.index.shards() {
            let data = shard.data.read();
            data.tree.check();
            assert_eq!(shard.traits(), data.tree.traits(), "shard {}", shard.cell);
            union = union.union(shard.traits());
        }
        assert_eq!(e.index.fleet_traits(), union);
        // The index-wide answer is exact for every filter.
        let mut present: Vec<crate::filter::Traits> = Vec::new();
        for shard in e.index.shards() {
            present.extend(shard.data.read().tree.iter().map(|it| it.traits));
        }
        present.sort_unstable();
        present.dedup();
        for v in Vehicle::ALL.map(Some).into_iter().chain([None]) {
            for caps in 0..1u16 << Capabilities::NAMES.len() {
                let r = crate::filter::Traits::required(v, Capabilities::from_bits_truncate(caps));
                let some = present.iter().any(|t| t.has(r));
                assert_eq!(e.index.may_have(r), some, "{v:?} {caps:#b}");
            }
        }
    }

    /// Summaries follow status changes, attribute changes, moves across
    /// cells and removals, in both directions: a filter nobody matches any
    /// more is answered at the top again.
    #[test]
    fn summaries_follow_every_change() {
        use crate::{Capabilities, NearestQuery, Vehicle};
        let e = Engine::new(EngineConfig::default()).unwrap();
        let wheelchair: Capabilities = "wheelchair".parse().unwrap();
        let at = |i: u32| scattered(i, 41.6, -87.9, 0.5);
        let drivers = (0..2000u32).map(|i| Driver {
            vehicle: if i % 50 == 0 {
                Vehicle::Van
            } else {
                Vehicle::Car
            },
            capabilities: if i % 100 == 0 {
                wheelchair
            } else {
                Capabilities::NONE
            },
            ..Driver::available(id(&format!("d{i}")), at(i), Timestamp::EPOCH)
        });
        e.bulk_load(drivers).unwrap();
        check_summaries(&e);
        let q = NearestQuery::new(pos(41.85, -87.65), 3).unwrap();
        let vans_with_wheelchairs = q
            .clone()
            .with_vehicle(Vehicle::Van)
            .with_capabilities(wheelchair);
        assert_eq!(e.nearest(&vans_with_wheelchairs).unwrap().len(), 3);
        // The wheelchair vans go busy, or lose the wheelchair, or move far
        // away, or leave: none is left.
        for (n, i) in (0..2000u32).step_by(100).enumerate() {
            let d = id(&format!("d{i}"));
            let mut u = DriverUpdate::location(d.clone(), at(i), None);
            match n % 4 {
                0 => u.status = Some(Status::Busy),
                1 => u.capabilities = Some(Capabilities::NONE),
                2 => u.pos = pos(48.85, 2.35),
                _ => {
                    e.remove(&d).unwrap();
                    continue;
                }
            }
            e.upsert(&u).unwrap();
            check_summaries(&e);
        }
        assert!(e.nearest(&vans_with_wheelchairs).unwrap().is_empty());
        let paris: Vec<String> = (0..2000u32)
            .step_by(100)
            .enumerate()
            .filter(|(n, _)| n % 4 == 2)
            .map(|(_, i)| format!("d{i}"))
            .collect();
        let found = e
            .nearest(&vans_with_wheelchairs.clone().with_radius(1e7).unwrap())
            .unwrap();
        assert_eq!(found.len(), 3);
        assert!(
            found
                .iter()
                .all(|n| paris.iter().any(|p| p == n.id.as_str())),
            "only the ones in Paris"
        );
        // Attributes come back without a move: the summaries grow again.
        for i in (0..2000u32).step_by(100).filter(|i| i % 400 == 100) {
            let mut u = DriverUpdate::location(id(&format!("d{i}")), at(i), None);
            u.capabilities = Some(wheelchair);
            e.upsert(&u).unwrap();
        }
        check_summaries(&e);
        assert_eq!(e.nearest(&vans_with_wheelchairs).unwrap().len(), 3);
        // Everybody leaves: every summary is empty.
        for i in 0..2000u32 {
            e.remove(&id(&format!("d{i}")));
        }
        check_summaries(&e);
        assert_eq!(e.index.fleet_traits(), crate::filter::Traits::NONE);
    }

    /// A filter nobody matches ends at the top even when each of its
    /// attributes is common: walkers and large items both exist, never
    /// together, until one walker takes large items, and again after it
    /// drops them.
    #[test]
    fn a_combination_nobody_has_ends_at_the_top() {
        use crate::filter::Traits;
        use crate::{Capabilities, NearestQuery, Vehicle};
        let e = Engine::new(EngineConfig::default()).unwrap();
        let large: Capabilities = "large_items".parse().unwrap();
        let at = |i: u32| scattered(i, 41.6, -87.9, 0.5);
        let drivers = (0..1000u32).map(|i| Driver {
            vehicle: if i % 2 == 0 {
                Vehicle::Walker
            } else {
                Vehicle::Van
            },
            capabilities: if i % 2 == 0 {
                Capabilities::NONE
            } else {
                large
            },
            ..Driver::available(id(&format!("d{i}")), at(i), Timestamp::EPOCH)
        });
        e.bulk_load(drivers).unwrap();
        let walker_large = Traits::required(Some(Vehicle::Walker), large);
        assert!(!e.index.may_have(walker_large));
        check_summaries(&e);
        let q = NearestQuery::new(pos(41.85, -87.65), 3)
            .unwrap()
            .with_vehicle(Vehicle::Walker)
            .with_capabilities(large);
        assert!(e.nearest(&q).unwrap().is_empty());
        let mut u = DriverUpdate::location(id("d10"), at(10), None);
        u.capabilities = Some(large);
        e.upsert(&u).unwrap();
        assert!(e.index.may_have(walker_large));
        check_summaries(&e);
        let found = e.nearest(&q).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].id.as_str(), "d10");
        u.capabilities = Some(Capabilities::NONE);
        e.upsert(&u).unwrap();
        assert!(!e.index.may_have(walker_large));
        check_summaries(&e);
    }

    /// A load into a running engine while another thread moves, changes
    /// and removes some of the same drivers: every id ends up in one
    /// record, found through the driver map, and in its shard's tree
    /// exactly when available; the summaries and trees hold their
    /// invariants; and nearest equals a scan of the engine's own drivers.
    #[test]
    fn a_load_races_writes_to_the_same_drivers() {
        use crate::{Capabilities, NearestQuery, Vehicle};
        let e = Engine::new(EngineConfig::default()).unwrap();
        let at = |i: u32, shift: f64| {
            let p = scattered(i, 41.7, -87.8, 0.3);
            pos(p.lat() + shift, p.lon())
        };
        let n = 20_000u32;
        let driver = |i: u32| Driver {
            vehicle: Vehicle::ALL[i as usize % 6],
            capabilities: Capabilities::from_bits_truncate((i % 7) as u16),
            ..Driver::available(id(&format!("d{i}")), at(i, 0.0), Timestamp::EPOCH)
        };
        // A quarter are known before the load.
        for i in (0..n).step_by(4) {
            e.upsert(&DriverUpdate::location(
                id(&format!("d{i}")),
                at(i, 0.01),
                None,
            ))
            .unwrap();
        }
        std::thread::scope(|s| {
            s.spawn(|| e.load((0..n).map(driver)).unwrap());
            s.spawn(|| {
                for i in (0..n).step_by(3) {
                    let d = id(&format!("d{i}"));
                    match i % 9 {
                        0 => {
                            e.remove(&d);
                        }
                        3 => {
                            let mut u = DriverUpdate::location(d, at(i, 0.02), None);
                            u.status = Some(Status::Busy);
                            let _ = e.upsert(&u);
                        }
                        _ => {
                            let _ = e.update_location(&d, at(i, 0.03), None);
                        }
                    }
                }
            });
        });
        check_summaries(&e);
        let mut ids = std::collections::HashSet::new();
        let mut available = Vec::new();
        for shard in e.index.shards() {
            let data = shard.data.read();
            for (slot, rec) in data.slotted() {
                assert!(ids.insert(rec.id.clone()), "{} twice", rec.id);
                assert_eq!(
                    e.driver(&rec.id).map(|d| d.pos),
                    Some(rec.pos),
                    "{}",
                    rec.id
                );
                let in_tree = data.tree.holds(slot);
                assert_eq!(in_tree, rec.status == Status::Available, "{}", rec.id);
                if in_tree {
                    available.push(rec.to_driver());
                }
            }
        }
        assert_eq!(ids.len(), e.len());
        // Removed before the load came to them, or after: either way each
        // id is there at most once, and every id not removed is there.
        for i in (0..n).filter(|i| i % 9 != 0) {
            assert!(e.driver(&id(&format!("d{i}"))).is_some(), "d{i}");
        }
        for i in (0..n).step_by(97) {
            let q = NearestQuery::new(at(i, 0.005), 10).unwrap();
            let got: Vec<_> = e.nearest(&q).unwrap().into_iter().map(|x| x.id).collect();
            let mut want: Vec<_> = available
                .iter()
                .map(|d| (q.pos.distance_m(d.pos), d.id.clone()))
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            let want: Vec<_> = want.into_iter().take(10).map(|x| x.1).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn a_load_with_a_reservation_changes_nothing() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        e.upsert(&DriverUpdate::location(id("a"), pos(41.8, -87.6), None))
            .unwrap();
        let drivers = [
            Driver::available(id("b"), pos(41.81, -87.6), Timestamp::EPOCH),
            Driver {
                status: Status::Reserved,
                ..Driver::available(id("c"), pos(41.82, -87.6), Timestamp::EPOCH)
            },
        ];
        let err = e.load(drivers).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidParameter(m) if m.contains("driver c has status reserved")),
            "{err}"
        );
        assert_eq!(e.len(), 1);
        assert!(e.driver(&id("b")).is_none());
    }

    #[test]
    fn driver_map_survives_hash_collisions() {
        // Four distinct hashes for all ids: nearly every id collides.
        for bulk in [false, true] {
            let mut e = Engine::new(EngineConfig::default()).unwrap();
            e.index.set_id_hash_mask(0x3);
            let mut model: HashMap<String, (Position, Status)> = HashMap::new();
            let at = |x: u32| scattered(x, 41.0, -88.0, 1.5);
            if bulk {
                // Duplicates of d5 and d17: the later ones win.
                let drivers: Vec<Driver> = (0..200)
                    .chain([5, 17])
                    .enumerate()
                    .map(|(n, i)| {
                        Driver::available(id(&format!("d{i}")), at(n as u32), Timestamp::EPOCH)
                    })
                    .collect();
                assert_eq!(e.bulk_load(drivers.clone()).unwrap(), 200);
                for d in drivers {
                    model.insert(d.id.to_string(), (d.pos, Status::Available));
                }
            }
            for step in 0..4000u32 {
                let name = format!("d{}", step * 7919 % 300);
                let key = id(&name);
                match step % 7 {
                    0 => {
                        let gone = e.remove(&key).map(|(d, _)| d.id.to_string());
                        assert_eq!(gone, model.remove(&name).map(|_| name.clone()));
                    }
                    1 => {
                        let status = if step % 2 == 0 {
                            Status::Busy
                        } else {
                            Status::Available
                        };
                        let mut u = DriverUpdate::location(key.clone(), at(step), None);
                        u.status = Some(status);
                        e.upsert(&u).unwrap();
                        model.insert(name.clone(), (at(step), status));
                    }
                    _ => {
                        let p = at(step);
                        e.upsert(&DriverUpdate::location(key.clone(), p, None))
                            .unwrap();
                        let status = model.get(&name).map_or(Status::Available, |m| m.1);
                        model.insert(name.clone(), (p, status));
                    }
                }
                assert_eq!(e.len(), model.len(), "step {step}");
                if step % 200 == 0 || step == 3999 {
                    for i in 0..300 {
                        let name = format!("d{i}");
                        let got = e.driver(&id(&name)).map(|d| (d.pos, d.status));
                        assert_eq!(got, model.get(&name).copied(), "{name} at step {step}");
                    }
                }
            }
            let available = model.values().filter(|m| m.1 == Status::Available).count();
            assert_eq!(e.counts().available, available);
            assert_eq!(e.counts().total(), model.len());
            let q = crate::NearestQuery::new(pos(41.7, -87.2), 1000).unwrap();
            assert_eq!(e.nearest(&q).unwrap().len(), available);
        }
    }

    #[test]
    fn config_is_validated() {
        for bad in [
            EngineConfig {
                resolution: 16,
                ..Default::default()
            },
            EngineConfig {
                max_radius_m: f64::NAN,
                ..Default::default()
            },
            EngineConfig {
                max_radius_m: 0.0,
                ..Default::default()
            },
            EngineConfig {
                driver_ttl_ms: 0,
                ..Default::default()
            },
        ] {
            assert_eq!(Engine::new(bad).unwrap_err().code(), "invalid_parameter");
        }
    }

    #[test]
    fn moves_across_cells_and_ignores_stale_updates() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let t = |ms| Some(Timestamp::from_millis(ms).unwrap());
        let a = id("a");
        e.upsert(&DriverUpdate::location(
            a.clone(),
            pos(41.88, -87.63),
            t(1000),
        ))
        .unwrap();
        // 30 km away: a different res-6 cell.
        let far = pos(42.15, -87.63);
        assert!(matches!(
            e.upsert(&DriverUpdate::location(a.clone(), far, t(2000)))
                .unwrap(),
            Applied::Applied(_)
        ));
        assert_eq!(e.cell_count(), 2);
        let stale = e
            .upsert(&DriverUpdate::location(
                a.clone(),
                pos(41.0, -87.0),
                t(1500),
            ))
            .unwrap();
        assert_eq!(
            stale,
            Applied::Stale {
                current_ts: Timestamp::from_millis(2000).unwrap()
            }
        );
        assert_eq!(e.driver(&a).unwrap().pos, far);
        assert_eq!(e.counts().available, 1);
        assert_eq!(e.len(), 1);
        // Equal timestamps apply (a re-send is not older).
        assert!(matches!(
            e.upsert(&DriverUpdate::location(
                a.clone(),
                pos(42.0, -87.6),
                t(2000)
            ))
            .unwrap(),
            Applied::Applied(_)
        ));
        assert!(e.remove(&a).is_some());
        assert!(e.driver(&a).is_none() && e.is_empty());
        assert!(e.remove(&a).is_none());
    }

    #[test]
    fn update_location_refuses_unknown_drivers() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let err = e
            .update_location(&id("ghost"), pos(1.0, 1.0), None)
            .unwrap_err();
        assert_eq!(err.code(), "unknown_driver");
        assert!(e.is_empty());
        e.upsert(&DriverUpdate::location(id("a"), pos(1.0, 1.0), None))
            .unwrap();
        let moved = e.update_location(&id("a"), pos(2.0, 2.0), None).unwrap();
        assert!(matches!(moved, Applied::Applied(d) if d.pos == pos(2.0, 2.0)));
    }

    #[test]
    fn clients_cannot_set_reserved() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let mut u = DriverUpdate::location(id("a"), pos(0.0, 0.0), None);
        u.status = Some(Status::Reserved);
        assert_eq!(e.upsert(&u).unwrap_err().code(), "invalid_parameter");
        assert!(e.is_empty());
    }

    #[test]
    fn ttl_sweep_removes_only_silent_drivers() {
        let clock = Arc::new(crate::ManualClock::new(
            Timestamp::from_millis(1_000_000).unwrap(),
        ));
        let e = Engine::with_clock(
            EngineConfig {
                driver_ttl_ms: 10_000,
                ..Default::default()
            },
            clock.clone(),
        )
        .unwrap();
        e.upsert(&DriverUpdate::location(id("old"), pos(1.0, 1.0), None))
            .unwrap();
        clock.advance(6_000);
        e.upsert(&DriverUpdate::location(id("new"), pos(1.0, 1.001), None))
            .unwrap();
        clock.advance(6_000);
        let removed: Vec<_> = e.expire_drivers().into_iter().map(|(d, _)| d.id).collect();
        assert_eq!(removed, [id("old")]);
        assert!(e.driver(&id("new")).is_some());
        clock.advance(6_000);
        assert_eq!(e.expire_drivers().len(), 1);
        assert!(e.is_empty());
    }

    #[test]
    fn bulk_load_builds_searchable_shards() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let drivers = (0..1000).map(|i| Driver {
            status: if i % 2 == 0 {
                Status::Available
            } else {
                Status::Busy
            },
            ..Driver::available(
                id(&format!("d{i}")),
                pos(41.6 + f64::from(i) * 0.0004, -87.9 + f64::from(i) * 0.0003),
                Timestamp::EPOCH,
            )
        });
        assert_eq!(e.bulk_load(drivers.clone()).unwrap(), 1000);
        assert_eq!(
            e.counts(),
            StatusCounts {
                available: 500,
                busy: 500,
                ..Default::default()
            }
        );
        assert_eq!(
            e.bulk_load(drivers).unwrap_err().code(),
            "invalid_parameter"
        );
        assert_eq!(e.driver(&id("d7")).unwrap().status, Status::Busy);
    }

    /// A fix stamped more than `max_future_ms` ahead of the clock is
    /// refused and changes nothing; the driver keeps taking correct
    /// updates. A bulk load (a restore) stamps such a driver now.
    #[test]
    fn fixes_from_the_future_are_refused_and_restored_as_now() {
        let now = Timestamp::from_millis(1_795_600_800_000).unwrap();
        let clock = Arc::new(crate::ManualClock::new(now));
        let e = Engine::with_clock(EngineConfig::default(), clock).unwrap();
        let at = |ms: u64| {
            DriverUpdate::location(id("d"), pos(41.88, -87.63), Some(now.plus_millis(ms)))
        };
        let year_2100 = Timestamp::parse("2100-01-01T00:00:00Z").unwrap();
        let far = DriverUpdate::location(id("d"), pos(41.88, -87.63), Some(year_2100));
        let err = e.upsert(&far).unwrap_err();
        assert_eq!(err.code(), "invalid_timestamp");
        assert!(err.to_string().contains("73 years ahead"), "{err}");
        assert!(e.driver(&id("d")).is_none());
        assert!(matches!(
            e.upsert(&at(300_000)).unwrap(),
            Applied::Applied(_)
        ));
        assert_eq!(
            e.upsert(&at(300_001)).unwrap_err().code(),
            "invalid_timestamp"
        );
        assert_eq!(
            e.update_location(&id("d"), pos(41.9, -87.6), Some(year_2100))
                .unwrap_err()
                .code(),
            "invalid_timestamp"
        );
        let mut offline = at(300_000);
        offline.status = Some(Status::Offline);
        assert!(matches!(e.upsert(&offline).unwrap(), Applied::Applied(_)));

        let fresh = Engine::with_clock(
            EngineConfig::default(),
            Arc::new(crate::ManualClock::new(now)),
        )
        .unwrap();
        let driver =
            |name: &str, ts: Timestamp| Driver::available(id(name), pos(41.88, -87.63), ts);
        fresh
            .bulk_load([
                driver("late", year_2100),
                driver("ok", now.plus_millis(1000)),
            ])
            .unwrap();
        assert_eq!(fresh.driver(&id("late")).unwrap().ts, now);
        assert_eq!(fresh.driver(&id("ok")).unwrap().ts, now.plus_millis(1000));
    }

    #[test]
    fn spans_read_as_people_say_them() {
        use crate::time::span;
        assert_eq!(span(1_500), "1.5 s");
        assert_eq!(span(300_000), "5 min");
        assert_eq!(span(7_200_000), "2 h");
        assert_eq!(span(3 * 86_400_000), "3 days");
        assert_eq!(span(74 * 31_557_600_000), "74 years");
    }
}
