//! One partition cell's drivers: the [`Record`]s in a slab, the R-tree of
//! the available ones and the counts by status ([`ShardData`]), the
//! [`Shard`] that locks them (written through a [`ShardWrite`], which
//! keeps the shard's filter summary in step), and the [`ShardTable`] of
//! every shard by index.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use h3o::CellIndex;
use parking_lot::{Mutex, RwLock, RwLockWriteGuard};

use crate::driver::{Capabilities, Driver, Status, Vehicle};
use crate::filter::{AtomicTraits, FleetTraits, Traits};
use crate::ids::DriverId;
use crate::position::Position;
use crate::rtree::{Item, ShardTree};
use crate::time::Timestamp;

use super::cells::InnerDisk;

/// Counts of drivers by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Available drivers.
    pub available: usize,
    /// Reserved drivers.
    pub reserved: usize,
    /// Busy drivers.
    pub busy: usize,
    /// Offline drivers.
    pub offline: usize,
}

impl StatusCounts {
    /// All drivers.
    pub fn total(&self) -> usize {
        self.available + self.reserved + self.busy + self.offline
    }

    /// Counts one more driver of status `s`.
    pub(crate) fn count(&mut self, s: Status) {
        *self.slot(s) += 1;
    }

    /// Adds `other`'s counts.
    pub(crate) fn add(&mut self, other: &Self) {
        self.available += other.available;
        self.reserved += other.reserved;
        self.busy += other.busy;
        self.offline += other.offline;
    }

    pub(super) fn slot(&mut self, s: Status) -> &mut usize {
        match s {
            Status::Available => &mut self.available,
            Status::Reserved => &mut self.reserved,
            Status::Busy => &mut self.busy,
            Status::Offline => &mut self.offline,
        }
    }
}

/// One driver as stored in its shard.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) id: DriverId,
    pub(crate) pos: Position,
    pub(crate) ts: Timestamp,
    /// Engine-clock time of the last applied update (for the TTL).
    pub(crate) seen: Timestamp,
    pub(crate) status: Status,
    pub(crate) vehicle: Vehicle,
    pub(crate) caps: Capabilities,
}

impl Record {
    /// The record of a driver (no order or reservation: those are the
    /// match book's), last seen at `seen`.
    pub(super) fn of(d: &Driver, seen: Timestamp) -> Self {
        Self {
            id: d.id.clone(),
            pos: d.pos,
            ts: d.ts,
            seen,
            status: d.status,
            vehicle: d.vehicle,
            caps: d.capabilities,
        }
    }

    pub(super) fn item(&self, slot: u32) -> Item {
        Item {
            v: self.pos.to_unit_vector(),
            slot,
            traits: self.traits(),
        }
    }

    /// Its vehicle class and capabilities, as the filters see them.
    pub(crate) fn traits(&self) -> Traits {
        Traits::of(self.vehicle, self.caps)
    }

    pub(crate) fn to_driver(&self) -> Driver {
        Driver {
            id: self.id.clone(),
            pos: self.pos,
            ts: self.ts,
            status: self.status,
            vehicle: self.vehicle,
            capabilities: self.caps,
            order_id: None,
            reserved_until: None,
        }
    }
}

/// A record's new position and its unit vector, when the caller of
/// [`ShardData::modify`] already has them (a move).
#[derive(Debug, Clone, Copy)]
pub(super) struct Moved {
    pub(super) pos: Position,
    pub(super) v: [f64; 3],
}

/// The drivers of one partition cell.
#[derive(Debug, Default)]
pub(crate) struct ShardData {
    pub(super) slots: Vec<Option<Record>>,
    free: Vec<u32>,
    pub(crate) tree: ShardTree,
    pub(crate) counts: StatusCounts,
}

impl ShardData {
    pub(crate) fn record(&self, slot: u32) -> Option<&Record> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// Stores a record; `v` is its position's unit vector.
    pub(super) fn insert(&mut self, rec: Record, v: [f64; 3]) -> u32 {
        let item = (rec.status == Status::Available).then(|| rec.traits());
        let slot = self.insert_unindexed(rec);
        if let Some(traits) = item {
            self.tree.insert(Item { v, slot, traits });
        }
        slot
    }

    /// Stores a record without entering it in the tree, even if it is
    /// available: a load enters a shard's new drivers in its tree at once
    /// (see `Index::load`). Until then searches do not see it; writes
    /// through the driver map handle it as usual (a move or a change of
    /// status or attributes enters it in the tree).
    pub(super) fn insert_unindexed(&mut self, rec: Record) -> u32 {
        *self.counts.slot(rec.status) += 1;
        let slot = if let Some(free) = self.free.pop() {
            free
        } else {
            // A shard would need 4 billion drivers in one cell to overflow.
            self.slots.push(None);
            (self.slots.len() - 1) as u32
        };
        self.slots[slot as usize] = Some(rec);
        slot
    }

    pub(super) fn take(&mut self, slot: u32) -> Option<Record> {
        let rec = self.slots.get_mut(slot as usize)?.take()?;
        if rec.status == Status::Available {
            self.tree.remove(slot);
        }
        *self.counts.slot(rec.status) -= 1;
        if self.counts.total() == 0 {
            // The last driver left: give the slot table back (no slot is
            // referenced any more, and the tree is empty).
            self.slots = Vec::new();
            self.free = Vec::new();
        } else {
            self.free.push(slot);
        }
        Some(rec)
    }

    /// Applies `f` to a record, keeping the tree and counts in step.
    /// `moved_to` is the new position and its unit vector when the caller
    /// already has them (a move), so the vector is not computed twice.
    pub(super) fn modify<R>(
        &mut self,
        slot: u32,
        moved_to: Option<Moved>,
        f: impl FnOnce(&mut Record) -> R,
    ) -> Option<R> {
        let rec = self.slots.get_mut(slot as usize)?.as_mut()?;
        let (pos, vehicle, caps, was) = (rec.pos, rec.vehicle, rec.caps, rec.status);
        let out = f(rec);
        let now = rec.status;
        let changed = rec.pos != pos || rec.vehicle != vehicle || rec.caps != caps;
        // The tree entry as the record now is, built only when the tree
        // needs it (the vector costs a sine and a cosine).
        let after = |rec: &Record| match moved_to {
            Some(Moved { pos: p, v }) if p == rec.pos => Item {
                v,
                slot,
                traits: rec.traits(),
            },
            _ => rec.item(slot),
        };
        if was != now {
            *self.counts.slot(was) -= 1;
            *self.counts.slot(now) += 1;
        }
        match (was == Status::Available, now == Status::Available) {
            (true, true) if changed => self.tree.update(after(rec)),
            (true, false) => {
                self.tree.remove(slot);
            }
            (false, true) => self.tree.insert(after(rec)),
            _ => {}
        }
        Some(out)
    }

    /// Every record with its slot, for tests.
    #[cfg(test)]
    pub(crate) fn slotted(&self) -> impl Iterator<Item = (u32, &Record)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, r)| Some((slot as u32, r.as_ref()?)))
    }

    pub(crate) fn records(&self) -> impl Iterator<Item = &Record> {
        self.slots.iter().flatten()
    }
}

/// One partition cell's shard.
#[derive(Debug)]
pub(crate) struct Shard {
    pub(crate) cell: CellIndex,
    /// Its index in the index's [`ShardTable`].
    pub(super) idx: u32,
    /// Read it freely; write it only through [`Shard::write`].
    pub(crate) data: RwLock<ShardData>,
    /// The tree's summary (the union of its available drivers' traits),
    /// for searches to skip the shard without taking its lock.
    traits: AtomicTraits,
    /// The combinations of traits its tree had when last published to
    /// the index-wide counts, sorted (locked only by the shard's writer).
    combinations: Mutex<Vec<Traits>>,
    /// A disk around the cell's centre that lies wholly inside the cell:
    /// a move that stays in it needs no H3 lookup.
    pub(super) inner: InnerDisk,
}

impl Shard {
    /// The empty shard of `cell`, at `idx` in the shard table.
    pub(super) fn new(cell: CellIndex, idx: u32) -> Self {
        Self {
            cell,
            idx,
            data: RwLock::new(ShardData::default()),
            traits: AtomicTraits::default(),
            combinations: Mutex::new(Vec::new()),
            inner: InnerDisk::of(cell),
        }
    }

    /// The union of the traits of the shard's available drivers, as of
    /// its last write.
    #[inline]
    pub(crate) fn traits(&self) -> Traits {
        self.traits.load()
    }

    /// Takes the write lock. When the returned guard goes, the shard's
    /// summary and the index-wide summary (`fleet`) follow its tree.
    pub(super) fn write<'a>(&'a self, fleet: &'a FleetTraits) -> ShardWrite<'a> {
        ShardWrite {
            data: self.data.write(),
            shard: self,
            fleet,
        }
    }
}

/// A shard's write lock (see [`Shard::write`]).
pub(super) struct ShardWrite<'a> {
    data: RwLockWriteGuard<'a, ShardData>,
    shard: &'a Shard,
    fleet: &'a FleetTraits,
}

impl Deref for ShardWrite<'_> {
    type Target = ShardData;
    fn deref(&self) -> &ShardData {
        &self.data
    }
}

impl DerefMut for ShardWrite<'_> {
    fn deref_mut(&mut self) -> &mut ShardData {
        &mut self.data
    }
}

impl Drop for ShardWrite<'_> {
    /// Publishes the tree's summary and, if one appeared or went, its
    /// combinations of traits, still under the lock: one shard's changes
    /// reach the index-wide summary in order, and before a search can
    /// read the tree.
    #[inline]
    fn drop(&mut self) {
        let new = self.data.tree.traits();
        if new != self.shard.traits.load() {
            self.shard.traits.store(new);
        }
        if self.data.tree.combinations_changed() {
            self.publish_combinations();
        }
    }
}

impl ShardWrite<'_> {
    /// Tells the index-wide summary which combinations of traits the
    /// shard gained and lost since it last did (rare: out of the way of
    /// the moves that change none).
    #[cold]
    #[inline(never)]
    fn publish_combinations(&mut self) {
        self.data.tree.clear_combinations_changed();
        let now: Vec<Traits> = self.data.tree.combinations().present().collect();
        let mut published = self.shard.combinations.lock();
        self.fleet.changed(&published, &now);
        *published = now;
    }
}

/// Entries in the first chunk of the [`ShardTable`]; chunk `k` holds
/// `FIRST_CHUNK << k`.
const FIRST_CHUNK: usize = 64;
/// Enough chunks for every `u32` index.
const CHUNKS: usize = 27;

/// Every shard by its index, for the driver map: an append-only table of
/// chunks of doubling size, read without a lock. Shards are appended only
/// under the `cells` write lock, and never removed.
#[derive(Debug)]
pub(super) struct ShardTable {
    chunks: [OnceLock<ShardChunk>; CHUNKS],
}

/// One chunk of the [`ShardTable`]: slots set once each.
type ShardChunk = Box<[OnceLock<Arc<Shard>>]>;

/// Where [`ShardTable::locate`] finds an index: its chunk, and its offset
/// in the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkAt {
    chunk: usize,
    offset: usize,
}

impl Default for ShardTable {
    fn default() -> Self {
        Self {
            chunks: std::array::from_fn(|_| OnceLock::new()),
        }
    }
}

impl ShardTable {
    /// The chunk of index `idx`, and its offset there: chunk `k` holds
    /// indices `FIRST_CHUNK·(2^k − 1) .. FIRST_CHUNK·(2^(k+1) − 1)`.
    fn locate(idx: u32) -> ChunkAt {
        let i = idx as usize / FIRST_CHUNK + 1;
        let k = (usize::BITS - 1 - i.leading_zeros()) as usize;
        ChunkAt {
            chunk: k,
            offset: idx as usize - FIRST_CHUNK * ((1 << k) - 1),
        }
    }

    pub(super) fn get(&self, idx: u32) -> Option<&Arc<Shard>> {
        let ChunkAt { chunk: k, offset } = Self::locate(idx);
        self.chunks.get(k)?.get()?.get(offset)?.get()
    }

    /// Stores the shard at its index (which must be unused).
    pub(super) fn push(&self, shard: Arc<Shard>) {
        let ChunkAt { chunk: k, offset } = Self::locate(shard.idx);
        let chunk =
            self.chunks[k].get_or_init(|| (0..FIRST_CHUNK << k).map(|_| OnceLock::new()).collect());
        let stored = chunk[offset].set(shard);
        debug_assert!(stored.is_ok(), "shard index used twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_table_locates_every_index_once() {
        let mut next = 0usize;
        for k in 0..CHUNKS {
            let len = FIRST_CHUNK << k;
            for offset in [0, 1, len / 2, len - 1] {
                let idx = next + offset;
                if let Ok(idx) = u32::try_from(idx) {
                    assert_eq!(
                        ShardTable::locate(idx),
                        ChunkAt { chunk: k, offset },
                        "index {idx}"
                    );
                }
            }
            next += len;
        }
        assert!(next > u32::MAX as usize);
        assert_eq!(ShardTable::locate(u32::MAX).chunk, CHUNKS - 1);
    }
}
