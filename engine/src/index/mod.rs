//! The sharded spatial index of drivers: every driver's record, found by
//! id (the driver map) or by place (the cells).
//!
//! # Layout
//! - Every H3 cell at the partition resolution that has ever held a driver
//!   is a [`Shard`](shard::Shard) (`shard`): a slab of driver records plus
//!   an R-tree of the **available** ones (`rtree::ShardTree`), behind its
//!   own `RwLock`.
//! - A small top-level rstar R-tree holds each shard's cell as a 3D
//!   bounding box ([`Cells`], with the rest of the cell geometry in
//!   `cells`); the search walks it nearest box first (see `search`). It changes
//!   only when a cell gets its first driver.
//! - Filter summaries (`filter`): each shard publishes the union of its
//!   available drivers' traits (its tree root's) when a write guard
//!   ([`Shard::write`](shard::Shard::write)) on it drops, so a search can
//!   skip a shard without its lock; and, when one appeared or went, the
//!   combinations of traits its drivers have, which the index counts so
//!   that a filter no available driver passes is answered without a
//!   shard.
//! - A striped map `hash(DriverId) → (shard index, slot)` (`drivers`) finds
//!   a driver for moves (the record holds the id, and lookups check it).
//!   The shard index is a place in the append-only
//!   [`ShardTable`](shard::ShardTable).
//! - `update` writes one driver through the map (an update, a status
//!   change, a removal); `bulk` loads many into an empty index at once;
//!   `config` holds the engine's settings ([`EngineConfig`]).
//!
//! The index knows nothing of matches: the engine decides a driver's
//! status under its matching book, then sets it here.
//!
//! # Locks and their order
//! `driver stripe → cells → shard`, all after the engine's matching book.
//! A thread may skip levels but never takes an earlier lock while holding
//! a later one, and never holds two shard locks at once. Searches take
//! `cells` (read) and one shard (read) at a time, so writers in one cell
//! never stall readers in another.

mod bulk;
mod cells;
mod config;
mod drivers;
mod shard;
mod update;

use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::fast::FixedState;
use h3o::{CellIndex, Resolution};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use crate::driver::Driver;
use crate::filter::{FleetTraits, Traits};
use crate::ids::DriverId;
use crate::position::Position;
use crate::time::Timestamp;

pub(crate) use bulk::check_loadable;
pub(crate) use cells::{CellEntry, Cells};
pub use config::EngineConfig;
pub use shard::StatusCounts;
pub(crate) use shard::{Record, Shard, ShardData};
pub use update::Applied;

use cells::cell_bbox;
use drivers::{Found, MapKey, STRIPES, Stripe, StripeMap};
use shard::ShardTable;

/// The index: the shards by cell (with the top-level tree of their cells)
/// and by index, and the striped driver map.
#[derive(Debug)]
pub(crate) struct Index {
    resolution: Resolution,
    cells: RwLock<Cells>,
    shard_table: ShardTable,
    stripes: Box<[Stripe]>,
    /// How many shards have each filter attribute (see `filter`).
    fleet: FleetTraits,
    id_hasher: FixedState,
    /// `u64::MAX`; tests narrow it to force hash collisions.
    id_hash_mask: u64,
}

impl Index {
    /// An empty index of partition cells at `resolution`.
    pub(crate) fn new(resolution: Resolution) -> Self {
        Self {
            resolution,
            cells: RwLock::new(Cells::default()),
            shard_table: ShardTable::default(),
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(StripeMap::default()))
                .collect(),
            fleet: FleetTraits::default(),
            id_hasher: FixedState::with_seed(0x9e37_79b9_7f4a_7c15),
            id_hash_mask: u64::MAX,
        }
    }

    /// What the index keeps allocated: slot-table entries of every shard,
    /// tree nodes of every shard, and driver-map buckets.
    #[cfg(test)]
    pub(crate) fn retained(&self) -> (usize, usize, usize) {
        let (mut slots, mut nodes) = (0, 0);
        for shard in self.shards() {
            let data = shard.data.read();
            slots += data.slots.capacity();
            nodes += data.tree.nodes_allocated();
        }
        let buckets = self
            .stripes
            .iter()
            .map(|s| s.lock().by_hash.capacity())
            .sum();
        (slots, nodes, buckets)
    }

    /// Narrows every id hash to `mask`, so that ids collide.
    #[cfg(test)]
    pub(crate) fn set_id_hash_mask(&mut self, mask: u64) {
        self.id_hash_mask = mask;
    }

    /// The partition resolution.
    pub(crate) fn resolution(&self) -> Resolution {
        self.resolution
    }

    /// The shards whose cell boxes meet `area` (a box of unit vectors).
    pub(crate) fn shards_meeting(&self, area: &rstar::AABB<[f64; 3]>) -> Vec<Arc<Shard>> {
        self.cells
            .read()
            .tree
            .locate_in_envelope_intersecting(*area)
            .map(|entry| Arc::clone(&entry.shard))
            .collect()
    }

    /// The shards of these cells that exist.
    pub(crate) fn shards_of(&self, cells: &[CellIndex]) -> Vec<Arc<Shard>> {
        let guard = self.cells.read();
        cells
            .iter()
            .filter_map(|c| guard.by_cell.get(c).cloned())
            .collect()
    }

    /// The H3 partition cell of a position.
    pub(crate) fn cell_of(&self, pos: Position) -> CellIndex {
        pos.cell(self.resolution)
    }

    /// The id's hash (the driver map's key) and its stripe.
    fn id_hash(&self, id: &DriverId) -> MapKey<'_> {
        let h = self.id_hasher.hash_one(id) & self.id_hash_mask;
        MapKey {
            h,
            stripe: &self.stripes[Self::stripe_of(h)],
        }
    }

    fn stripe_of(h: u64) -> usize {
        (h >> 7) as usize & (STRIPES - 1)
    }

    /// The shard at `idx` of the shard table. Every index in the driver map
    /// is there: shards are entered in the table before any driver map entry
    /// refers to them, and never leave.
    fn shard(&self, idx: u32) -> &Arc<Shard> {
        self.shard_table
            .get(idx)
            .unwrap_or_else(|| unreachable!("driver map points at a missing shard"))
    }

    /// The shard of `cell`, created (and entered in the top-level tree) on
    /// first use. Must not be called while holding a shard lock.
    fn shard_for(&self, cell: CellIndex) -> Arc<Shard> {
        if let Some(s) = self.cells.read().by_cell.get(&cell) {
            return Arc::clone(s);
        }
        let mut cells = self.cells.write();
        if let Some(s) = cells.by_cell.get(&cell) {
            return Arc::clone(s);
        }
        let idx = u32::try_from(cells.by_cell.len())
            .unwrap_or_else(|_| unreachable!("more than 4 billion partition cells"));
        let shard = Arc::new(Shard::new(cell, idx));
        self.shard_table.push(Arc::clone(&shard));
        cells.by_cell.insert(cell, Arc::clone(&shard));
        cells.tree.insert(CellEntry {
            bbox: cell_bbox(cell),
            shard: Arc::clone(&shard),
        });
        shard
    }

    /// The cells and their top-level tree, read-locked (for a search).
    pub(crate) fn read_cells(&self) -> RwLockReadGuard<'_, Cells> {
        self.cells.read()
    }

    /// Whether some available driver has every attribute of `required`
    /// (exact whenever no shard is being written).
    pub(crate) fn may_have(&self, required: Traits) -> bool {
        self.fleet.admit(required)
    }

    /// The index-wide summary, for tests: the union of every shard's.
    #[cfg(test)]
    pub(crate) fn fleet_traits(&self) -> Traits {
        self.fleet.union()
    }

    /// Takes a shard's write lock; see [`Shard::write`].
    fn write<'a>(&'a self, shard: &'a Shard) -> shard::ShardWrite<'a> {
        shard.write(&self.fleet)
    }

    /// The driver as the index holds it (no order or reservation filled
    /// in), or `None` if unknown.
    pub(crate) fn driver(&self, id: &DriverId) -> Option<Driver> {
        let MapKey { h, stripe } = self.id_hash(id);
        let stripe = stripe.lock();
        let Found { loc, .. } = stripe.find(id, h)?;
        let data = self.shard(loc.shard).data.read();
        let rec = data.record(loc.slot)?;
        if rec.id != *id {
            return None;
        }
        Some(rec.to_driver())
    }

    /// The ids of the drivers last updated before `cutoff` (engine clock),
    /// read shard by shard.
    pub(crate) fn ids_unseen_since(&self, cutoff: Timestamp) -> Vec<DriverId> {
        let mut stale_ids = Vec::new();
        for shard in self.shards() {
            let data = shard.data.read();
            stale_ids.extend(
                data.records()
                    .filter(|r| r.seen < cutoff)
                    .map(|r| r.id.clone()),
            );
        }
        stale_ids
    }

    pub(crate) fn shards(&self) -> Vec<Arc<Shard>> {
        self.cells.read().by_cell.values().cloned().collect()
    }

    /// Calls `f` with every driver (no order or reservation filled in),
    /// shard by shard under one short read lock each. `f` runs under that
    /// lock, so it must take no lock.
    pub(crate) fn for_each_driver(&self, mut f: impl FnMut(Driver)) {
        for shard in self.shards() {
            let data = shard.data.read();
            for rec in data.records() {
                f(rec.to_driver());
            }
        }
    }

    /// Counts of drivers by status.
    pub(crate) fn counts(&self) -> StatusCounts {
        let mut total = StatusCounts::default();
        for shard in self.shards() {
            total.add(&shard.data.read().counts);
        }
        total
    }

    /// Number of drivers known.
    pub(crate) fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no driver is known.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of partition cells that have held drivers.
    pub(crate) fn cell_count(&self) -> usize {
        self.cells.read().by_cell.len()
    }

    /// Per-cell driver counts.
    pub(crate) fn cell_counts(&self) -> Vec<(CellIndex, StatusCounts)> {
        self.shards()
            .into_iter()
            .map(|s| (s.cell, s.data.read().counts))
            .collect()
    }
}
