//! The sharded spatial index and the [`Engine`] that owns it.
//!
//! # Layout
//! - Every H3 cell at the partition resolution that has ever held a driver
//!   is a [`Shard`]: a slab of driver records plus an R-tree of the
//!   **available** ones (`rtree::ShardTree`), behind its own `RwLock`.
//! - A small top-level rstar R-tree holds each shard's cell as a 3D bounding box;
//!   the search walks it best-first (see `search`). It changes only when a
//!   cell gets its first driver.
//! - A striped map `hash(DriverId) → (shard index, slot)` finds a driver
//!   for moves (the record holds the id, and lookups check it).
//!
//! # Locks and their order
//! `matching book → driver stripe → cells → shard`. A thread may skip
//! levels but never takes an earlier lock while holding a later one, and
//! never holds two shard locks at once. Searches take `cells` (read) and one
//! shard (read) at a time, so writers in one cell never stall readers in
//! another.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use foldhash::fast::FixedState;
use h3o::{CellIndex, LatLng, Resolution};
use parking_lot::{Mutex, RwLock};
use rstar::{AABB, PointDistance, RTree, RTreeObject};

pub(crate) use crate::rtree::Item;
use crate::rtree::ShardTree;

use crate::driver::{Capabilities, Driver, DriverUpdate, Status, Vehicle};
use crate::error::{Error, Result};
use crate::ids::DriverId;
use crate::matching::{MatchBook, MatchEvent};
use crate::position::{Position, chord2};
use crate::time::{Clock, SystemClock, Timestamp};

/// Number of stripes of the driver → location map (a power of two).
const STRIPES: usize = 64;

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// H3 resolution of the partition cells (0–15; default 6, ≈ 36 km²).
    pub resolution: u8,
    /// How far a nearest query or claim without `radius_m` searches, in metres
    /// (default 500 km).
    pub max_radius_m: f64,
    /// Drivers with no update for this long are removed by
    /// [`Engine::expire_drivers`] (default 120 s).
    pub driver_ttl_ms: u64,
    /// How long released, expired and completed matches stay readable
    /// (default 1 h).
    pub match_retention_ms: u64,
    /// At most this many ended matches are kept readable (default 1M,
    /// a few hundred MB): past it, the oldest are forgotten before their
    /// retention ends (in runs of 8192), so a high claim rate cannot grow
    /// memory without bound.
    pub max_ended_matches: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            resolution: 6,
            max_radius_m: 500_000.0,
            driver_ttl_ms: 120_000,
            match_retention_ms: 3_600_000,
            max_ended_matches: 1_000_000,
        }
    }
}

impl EngineConfig {
    fn validate(&self) -> Result<Resolution> {
        let res = Resolution::try_from(self.resolution).map_err(|_| {
            Error::InvalidParameter(format!(
                "H3 resolution {} is not in 0..=15",
                self.resolution
            ))
        })?;
        if !(self.max_radius_m.is_finite() && self.max_radius_m > 0.0) {
            return Err(Error::InvalidParameter(format!(
                "max_radius_m {} must be a positive number",
                self.max_radius_m
            )));
        }
        if self.driver_ttl_ms == 0 {
            return Err(Error::InvalidParameter(
                "driver_ttl_ms must be positive".into(),
            ));
        }
        Ok(res)
    }
}

/// What an update did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The update was applied; the driver as it now is.
    Applied(Driver),
    /// The update was older than the driver's last applied `ts` and was ignored.
    Stale {
        /// The `ts` of the update that is kept.
        current_ts: Timestamp,
    },
}

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

    fn slot(&mut self, s: Status) -> &mut usize {
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
    fn item(&self, slot: u32) -> Item {
        Item {
            v: self.pos.to_unit_vector(),
            slot,
            vehicle: self.vehicle,
            caps: self.caps,
        }
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

/// The drivers of one partition cell.
#[derive(Debug, Default)]
pub(crate) struct ShardData {
    slots: Vec<Option<Record>>,
    free: Vec<u32>,
    pub(crate) tree: ShardTree,
    counts: StatusCounts,
}

impl ShardData {
    pub(crate) fn record(&self, slot: u32) -> Option<&Record> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// Stores a record; `v` is its position's unit vector.
    fn insert(&mut self, rec: Record, v: [f64; 3]) -> u32 {
        *self.counts.slot(rec.status) += 1;
        let slot = if let Some(free) = self.free.pop() {
            free
        } else {
            // A shard would need 4 billion drivers in one cell to overflow.
            self.slots.push(None);
            (self.slots.len() - 1) as u32
        };
        if rec.status == Status::Available {
            self.tree.insert(Item {
                v,
                slot,
                vehicle: rec.vehicle,
                caps: rec.caps,
            });
        }
        self.slots[slot as usize] = Some(rec);
        slot
    }

    fn take(&mut self, slot: u32) -> Option<Record> {
        let rec = self.slots.get_mut(slot as usize)?.take()?;
        if rec.status == Status::Available {
            self.tree.remove(slot);
        }
        *self.counts.slot(rec.status) -= 1;
        self.free.push(slot);
        Some(rec)
    }

    /// Applies `f` to a record, keeping the tree and counts in step.
    /// `moved_to` is the new position and its unit vector when the caller
    /// already has them (a move), so the vector is not computed twice.
    fn modify<R>(
        &mut self,
        slot: u32,
        moved_to: Option<(Position, [f64; 3])>,
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
            Some((p, v)) if p == rec.pos => Item {
                v,
                slot,
                vehicle: rec.vehicle,
                caps: rec.caps,
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

    pub(crate) fn records(&self) -> impl Iterator<Item = &Record> {
        self.slots.iter().flatten()
    }
}

/// One partition cell's shard.
#[derive(Debug)]
pub(crate) struct Shard {
    pub(crate) cell: CellIndex,
    /// Its index in the engine's [`ShardTable`].
    idx: u32,
    pub(crate) data: RwLock<ShardData>,
    /// A disk around the cell's centre that lies wholly inside the cell:
    /// a move that stays in it needs no H3 lookup.
    inner: InnerDisk,
}

/// Most boundary vertices of an H3 cell (a pentagon crossing icosahedron
/// edges).
const MAX_EDGES: usize = 10;

/// A region inside a cell (the "inner region"): a disk around its centre (one chord
/// comparison), and the cell shrunk by the same margin (one plane test per
/// edge), for points outside the disk.
#[derive(Debug, Clone, Copy)]
struct InnerDisk {
    center: [f64; 3],
    chord2: f64,
    /// Unit normals of the edges' great circles, pointing inwards.
    edges: [[f64; 3]; MAX_EDGES],
    n_edges: usize,
    /// The sine of the margin: 5 % of the centre's distance to the nearest
    /// edge great circle.
    min_sin: f64,
}

impl InnerDisk {
    /// The disk of radius 95 % of the angular distance `a` from the cell's
    /// centre to the nearest great circle through one of its edges. A cell
    /// is convex, so that distance is a lower bound of the distance to its
    /// boundary; the 5 % covers h3o's rounding along the edges.
    ///
    /// Every point of that disk is on the centre's side of every edge's
    /// great circle, at least `0.05·a` from it; and that is all the disk's
    /// guarantee rests on. So the set of all such points (the cell shrunk
    /// by `0.05·a`) is as safe, and larger: ~90 % of a hexagon's area
    /// against the disk's ~82 %.
    fn of(cell: CellIndex) -> Self {
        let to_vec = |ll: LatLng| {
            Position::new(ll.lat(), ll.lng()).map_or([1.0, 0.0, 0.0], Position::to_unit_vector)
        };
        let center = to_vec(LatLng::from(cell));
        let vertices: Vec<[f64; 3]> = cell.boundary().iter().map(|ll| to_vec(*ll)).collect();
        let mut angle = f64::INFINITY;
        let mut edges = [[0.0; 3]; MAX_EDGES];
        let mut n_edges = 0;
        for (i, a) in vertices.iter().enumerate() {
            let b = vertices[(i + 1) % vertices.len()];
            let n = [
                a[1] * b[2] - a[2] * b[1],
                a[2] * b[0] - a[0] * b[2],
                a[0] * b[1] - a[1] * b[0],
            ];
            let len = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt();
            if len > 0.0 {
                let signed = (center[0] * n[0] + center[1] * n[1] + center[2] * n[2]) / len;
                angle = angle.min(signed.abs().min(1.0).asin());
                if n_edges < MAX_EDGES {
                    let inward = signed.signum() / len;
                    edges[n_edges] = n.map(|x| x * inward);
                    n_edges += 1;
                }
            }
        }
        let radius = if angle.is_finite() { angle * 0.95 } else { 0.0 };
        let chord = 2.0 * (radius / 2.0).sin();
        // A cell with more edges than expected gets no plane test (the disk
        // alone is still exact).
        let n_edges = if vertices.len() <= MAX_EDGES && angle.is_finite() {
            n_edges
        } else {
            0
        };
        Self {
            center,
            chord2: chord * chord,
            edges,
            n_edges,
            min_sin: (angle * 0.05).sin(),
        }
    }

    fn contains(&self, v: &[f64; 3]) -> bool {
        chord2(&self.center, v) < self.chord2
            || (self.n_edges > 0
                && self.edges[..self.n_edges]
                    .iter()
                    .all(|n| n[0] * v[0] + n[1] * v[1] + n[2] * v[2] > self.min_sin))
    }
}

/// A shard in the top-level tree, keyed by a box that contains every point
/// of its cell.
#[derive(Debug)]
pub(crate) struct CellEntry {
    pub(crate) bbox: AABB<[f64; 3]>,
    pub(crate) shard: Arc<Shard>,
}

impl RTreeObject for CellEntry {
    type Envelope = AABB<[f64; 3]>;
    fn envelope(&self) -> Self::Envelope {
        self.bbox
    }
}

impl PointDistance for CellEntry {
    fn distance_2(&self, p: &[f64; 3]) -> f64 {
        self.bbox.distance_2(p)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Cells {
    by_cell: HashMap<CellIndex, Arc<Shard>, FixedState>,
    pub(crate) tree: RTree<CellEntry>,
}

/// A box around the cell's vertices and centre as unit vectors, grown by
/// twice the sagitta of the cell's circumradius (how far the sphere bulges
/// beyond the flat polygon of its vertices) plus a rounding margin, so it
/// contains every point of the cell's spherical polygon.
fn cell_bbox(cell: CellIndex) -> AABB<[f64; 3]> {
    let to_pos = |ll: LatLng| Position::new(ll.lat(), ll.lng()).map(Position::to_unit_vector);
    let center = to_pos(LatLng::from(cell)).unwrap_or([1.0, 0.0, 0.0]);
    let mut lo = center;
    let mut hi = center;
    let mut max_c2: f64 = 0.0;
    for v in cell.boundary().iter().filter_map(|ll| to_pos(*ll).ok()) {
        max_c2 = max_c2.max(chord2(&center, &v));
        for i in 0..3 {
            lo[i] = lo[i].min(v[i]);
            hi[i] = hi[i].max(v[i]);
        }
    }
    // For chord c, the angle θ has 1 - cos θ = c²/2.
    let margin = max_c2 + 1e-9;
    AABB::from_corners(lo.map(|x| x - margin), hi.map(|x| x + margin))
}

/// Where a driver's record lives: its shard's index in the [`ShardTable`]
/// and its slot there (8 bytes, where an `Arc` and a slot took 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) shard: u32,
    pub(crate) slot: u32,
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
struct ShardTable {
    chunks: [OnceLock<ShardChunk>; CHUNKS],
}

/// One chunk of the [`ShardTable`]: slots set once each.
type ShardChunk = Box<[OnceLock<Arc<Shard>>]>;

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
    fn locate(idx: u32) -> (usize, usize) {
        let i = idx as usize / FIRST_CHUNK + 1;
        let k = (usize::BITS - 1 - i.leading_zeros()) as usize;
        (k, idx as usize - FIRST_CHUNK * ((1 << k) - 1))
    }

    fn get(&self, idx: u32) -> Option<&Arc<Shard>> {
        let (k, offset) = Self::locate(idx);
        self.chunks.get(k)?.get()?.get(offset)?.get()
    }

    /// Stores the shard at its index (which must be unused).
    fn push(&self, shard: Arc<Shard>) {
        let (k, offset) = Self::locate(shard.idx);
        let chunk =
            self.chunks[k].get_or_init(|| (0..FIRST_CHUNK << k).map(|_| OnceLock::new()).collect());
        let stored = chunk[offset].set(shard);
        debug_assert!(stored.is_ok(), "shard index used twice");
    }
}

/// One stripe of the driver map. It is keyed by the id's 64-bit hash, not
/// the id: 16-byte entries instead of 32. The record holds the id, and
/// every lookup checks it under the shard lock it takes anyway. An id
/// whose hash another id already holds goes to `collided`, keyed by the
/// id (about one id in 10^7 at 1M drivers; usually empty, and then never
/// probed).
#[derive(Debug, Default)]
pub(crate) struct StripeMap {
    by_hash: HashMap<u64, Loc, FixedState>,
    collided: HashMap<DriverId, Loc, FixedState>,
}

/// Which table of a [`StripeMap`] holds an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    ByHash,
    Collided,
}

impl StripeMap {
    /// Where `id` (of hash `h`) may be: a `Collided` answer is certain; a
    /// `ByHash` one holds some id of hash `h`, which the caller checks
    /// against the record.
    fn find(&self, id: &DriverId, h: u64) -> Option<(Loc, Place)> {
        if !self.collided.is_empty()
            && let Some(loc) = self.collided.get(id)
        {
            return Some((*loc, Place::Collided));
        }
        self.by_hash.get(&h).map(|loc| (*loc, Place::ByHash))
    }

    /// Enters an id that is not in the map.
    fn add(&mut self, id: &DriverId, h: u64, loc: Loc) {
        match self.by_hash.entry(h) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(loc);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(id.clone(), loc);
            }
        }
    }

    /// Moves an id that is in the map (at `place`) to `loc`.
    fn set(&mut self, place: Place, id: &DriverId, h: u64, loc: Loc) {
        match place {
            Place::ByHash => self.by_hash.insert(h, loc),
            Place::Collided => self.collided.insert(id.clone(), loc),
        };
    }

    /// Removes an id that is in the map (at `place`).
    fn remove(&mut self, place: Place, id: &DriverId, h: u64) {
        match place {
            Place::ByHash => self.by_hash.remove(&h),
            Place::Collided => self.collided.remove(id),
        };
    }

    fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }
}

type Stripe = Mutex<StripeMap>;

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
    pub(crate) config: EngineConfig,
    resolution: Resolution,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) cells: RwLock<Cells>,
    shard_table: ShardTable,
    stripes: Box<[Stripe]>,
    id_hasher: FixedState,
    /// `u64::MAX`; tests narrow it to force hash collisions.
    id_hash_mask: u64,
    pub(crate) book: Mutex<MatchBook>,
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
            resolution,
            clock,
            cells: RwLock::new(Cells::default()),
            shard_table: ShardTable::default(),
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(StripeMap::default()))
                .collect(),
            id_hasher: FixedState::with_seed(0x9e37_79b9_7f4a_7c15),
            id_hash_mask: u64::MAX,
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
        pos.cell(self.resolution)
    }

    /// The id's hash (the driver map's key) and its stripe.
    fn id_hash(&self, id: &DriverId) -> (u64, &Stripe) {
        let h = self.id_hasher.hash_one(id) & self.id_hash_mask;
        (h, &self.stripes[Self::stripe_of(h)])
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
        let shard = Arc::new(Shard {
            cell,
            idx,
            inner: InnerDisk::of(cell),
            data: RwLock::new(ShardData::default()),
        });
        self.shard_table.push(Arc::clone(&shard));
        cells.by_cell.insert(cell, Arc::clone(&shard));
        cells.tree.insert(CellEntry {
            bbox: cell_bbox(cell),
            shard: Arc::clone(&shard),
        });
        shard
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
            return self.apply(update, None, true);
        };
        let mut book = self.book.lock();
        let now = self.clock.now();
        let (effective, transition) = book.status_request(&update.id, wanted);
        let applied = self.apply(update, effective, true)?;
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
        self.apply(&DriverUpdate::location(id.clone(), pos, ts), None, false)
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

    /// Applies an update with an already-decided status (None = keep, or the
    /// default for a new driver). Caller holds the book if statuses change.
    /// An unknown driver is created only if `create`.
    pub(crate) fn apply(
        &self,
        u: &DriverUpdate,
        status: Option<Status>,
        create: bool,
    ) -> Result<Applied> {
        let now = self.clock.now();
        let ts = u.ts.unwrap_or(now);
        let v = u.pos.to_unit_vector();
        let (h, stripe) = self.id_hash(&u.id);
        let mut stripe = stripe.lock();
        // `None` when another id has the same hash and this one is new.
        if let Some((loc, place)) = stripe.find(&u.id, h)
            && let Some(applied) =
                self.apply_known(u, status, (ts, now, v), (loc, place, h), &mut stripe)
        {
            return Ok(applied);
        }
        {
            if !create {
                return Err(Error::UnknownDriver(u.id.to_string()));
            }
            let rec = Record {
                id: u.id.clone(),
                pos: u.pos,
                ts,
                seen: now,
                status: status.unwrap_or(Status::Available),
                vehicle: u.vehicle.unwrap_or_default(),
                caps: u.capabilities.unwrap_or_default(),
            };
            let driver = rec.to_driver();
            let shard = self.shard_for(u.pos.cell(self.resolution));
            let slot = shard.data.write().insert(rec, v);
            stripe.add(
                &u.id,
                h,
                Loc {
                    shard: shard.idx,
                    slot,
                },
            );
            Ok(Applied::Applied(driver))
        }
    }

    /// [`apply`](Self::apply) to a driver the map may hold at `loc` (`None`
    /// if the record there has another id); `v` is the new position's
    /// unit vector. The caller holds its stripe.
    fn apply_known(
        &self,
        u: &DriverUpdate,
        status: Option<Status>,
        (ts, now, v): (Timestamp, Timestamp, [f64; 3]),
        (loc, place, h): (Loc, Place, u64),
        stripe: &mut StripeMap,
    ) -> Option<Applied> {
        let shard = self.shard(loc.shard);
        // Most moves stay well inside their cell: skip the H3 lookup then.
        let cell = if shard.inner.contains(&v) {
            shard.cell
        } else {
            u.pos.cell(self.resolution)
        };
        let update_rec = |rec: &mut Record| {
            rec.pos = u.pos;
            rec.ts = ts;
            rec.seen = now;
            if let Some(s) = status {
                rec.status = s;
            }
            if let Some(v) = u.vehicle {
                rec.vehicle = v;
            }
            if let Some(c) = u.capabilities {
                rec.caps = c;
            }
        };
        let mut old = shard.data.write();
        let Some(current) = old.record(loc.slot) else {
            unreachable!("driver map points at an empty slot");
        };
        if current.id != u.id {
            return None;
        }
        if ts < current.ts {
            return Some(Applied::Stale {
                current_ts: current.ts,
            });
        }
        if shard.cell == cell {
            let driver = old.modify(loc.slot, Some((u.pos, v)), |rec| {
                update_rec(rec);
                rec.to_driver()
            });
            return Some(Applied::Applied(driver.unwrap_or_else(|| unreachable!())));
        }
        // Crossing into another cell: take it out, then put it in the new
        // shard (never holding two shard locks).
        let Some(mut rec) = old.take(loc.slot) else {
            unreachable!()
        };
        drop(old);
        update_rec(&mut rec);
        let driver = rec.to_driver();
        let shard = self.shard_for(cell);
        let slot = shard.data.write().insert(rec, v);
        stripe.set(
            place,
            &u.id,
            h,
            Loc {
                shard: shard.idx,
                slot,
            },
        );
        Some(Applied::Applied(driver))
    }

    /// Changes a driver's status if it is currently `from`, keeping the
    /// R-tree in step. Returns the driver's position when it changed.
    /// The caller holds the matching book.
    pub(crate) fn transition(&self, id: &DriverId, from: Status, to: Status) -> Option<Position> {
        self.modify_if(id, |rec| rec.status == from, to)
    }

    /// Sets a driver's status whatever it was (restore). True if the driver exists.
    pub(crate) fn force_status(&self, id: &DriverId, to: Status) -> bool {
        self.modify_if(id, |_| true, to).is_some()
    }

    /// Reserves `id` if it is available and still passes the filters.
    pub(crate) fn reserve_if_eligible(
        &self,
        id: &DriverId,
        vehicle: Option<Vehicle>,
        caps: Capabilities,
    ) -> Option<Position> {
        self.modify_if(
            id,
            |rec| {
                rec.status == Status::Available
                    && vehicle.is_none_or(|v| v == rec.vehicle)
                    && rec.caps.contains(caps)
            },
            Status::Reserved,
        )
    }

    fn modify_if(
        &self,
        id: &DriverId,
        cond: impl Fn(&Record) -> bool,
        to: Status,
    ) -> Option<Position> {
        let (h, stripe) = self.id_hash(id);
        let stripe = stripe.lock();
        let (loc, _) = stripe.find(id, h)?;
        let mut data = self.shard(loc.shard).data.write();
        let rec = data.record(loc.slot)?;
        if rec.id != *id || !cond(rec) {
            return None;
        }
        data.modify(loc.slot, None, |rec| {
            rec.status = to;
            rec.pos
        })
    }

    /// The driver as the engine knows it, or `None` if unknown.
    pub fn driver(&self, id: &DriverId) -> Option<Driver> {
        let d = {
            let (h, stripe) = self.id_hash(id);
            let stripe = stripe.lock();
            let (loc, _) = stripe.find(id, h)?;
            let data = self.shard(loc.shard).data.read();
            let rec = data.record(loc.slot)?;
            if rec.id != *id {
                return None;
            }
            rec.to_driver()
        };
        Some(self.with_match(d))
    }

    /// Removes a driver, releasing its match if it has one. Returns the
    /// driver as it was, or `None` if unknown.
    pub fn remove(&self, id: &DriverId) -> Option<(Driver, Option<MatchEvent>)> {
        self.remove_where(id, |_| true)
    }

    fn remove_where(
        &self,
        id: &DriverId,
        cond: impl Fn(&Record) -> bool,
    ) -> Option<(Driver, Option<MatchEvent>)> {
        let mut book = self.book.lock();
        let (h, stripe) = self.id_hash(id);
        let mut stripe = stripe.lock();
        let (loc, place) = stripe.find(id, h)?;
        let rec = {
            let mut data = self.shard(loc.shard).data.write();
            let rec = data.record(loc.slot)?;
            if rec.id != *id || !cond(rec) {
                return None;
            }
            data.take(loc.slot)?
        };
        stripe.remove(place, id, h);
        drop(stripe);
        let now = self.clock.now();
        let event = book.finish_for_driver(
            id,
            crate::matching::DriverEnd::Removed,
            now,
            self.config.max_ended_matches,
        );
        Some((rec.to_driver(), event))
    }

    /// Removes every driver whose last update was applied more than
    /// `driver_ttl_ms` before the clock's now, releasing their matches.
    /// Returns what it removed.
    pub fn expire_drivers(&self) -> Vec<(Driver, Option<MatchEvent>)> {
        let cutoff = self.clock.now().minus_millis(self.config.driver_ttl_ms);
        let mut stale_ids = Vec::new();
        for shard in self.shards() {
            let data = shard.data.read();
            stale_ids.extend(
                data.records()
                    .filter(|r| r.seen < cutoff)
                    .map(|r| r.id.clone()),
            );
        }
        // Re-check under the lock: a fresh update may have arrived meanwhile.
        stale_ids
            .iter()
            .filter_map(|id| self.remove_where(id, |r| r.seen < cutoff))
            .collect()
    }

    pub(crate) fn shards(&self) -> Vec<Arc<Shard>> {
        self.cells.read().by_cell.values().cloned().collect()
    }

    /// Counts of drivers by status.
    pub fn counts(&self) -> StatusCounts {
        let mut total = StatusCounts::default();
        for shard in self.shards() {
            let c = shard.data.read().counts;
            total.available += c.available;
            total.reserved += c.reserved;
            total.busy += c.busy;
            total.offline += c.offline;
        }
        total
    }

    /// Number of drivers known.
    pub fn len(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no driver is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of partition cells that have held drivers.
    pub fn cell_count(&self) -> usize {
        self.cells.read().by_cell.len()
    }

    /// Per-cell driver counts (for region statistics).
    pub fn cell_counts(&self) -> Vec<(CellIndex, StatusCounts)> {
        self.shards()
            .into_iter()
            .map(|s| (s.cell, s.data.read().counts))
            .collect()
    }

    /// Every driver (in no particular order), read shard by shard.
    pub fn drivers(&self) -> Vec<Driver> {
        let mut out: Vec<Driver> = Vec::new();
        for shard in self.shards() {
            out.extend(shard.data.read().records().map(Record::to_driver));
        }
        out.into_iter().map(|d| self.with_match(d)).collect()
    }

    /// Loads many drivers into an empty engine at once, building each
    /// shard's R-tree with its bulk loading (much faster than inserting
    /// one by one). Later duplicates of an id replace earlier ones.
    ///
    /// Both cores share the work: the H3 cells (most of them found without
    /// h3o, see `CellFinder`), the driver map (by stripe) and the shards'
    /// trees (by shard). The maps and slabs are sized exactly.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the engine already holds drivers or a
    /// driver has status `reserved` (reservations are restored with their
    /// matches, not here).
    pub fn bulk_load(&self, drivers: impl IntoIterator<Item = Driver>) -> Result<usize> {
        if !self.is_empty() {
            return Err(Error::InvalidParameter(
                "bulk_load needs an empty engine".into(),
            ));
        }
        let drivers: Vec<Driver> = drivers.into_iter().collect();
        if let Some(d) = drivers.iter().find(|d| d.status == Status::Reserved) {
            return Err(Error::InvalidParameter(format!(
                "driver {} has status reserved; bulk_load takes no reservations",
                d.id
            )));
        }
        if u32::try_from(drivers.len()).is_err() {
            return Err(Error::InvalidParameter(
                "bulk_load takes at most 2^32 - 1 drivers at once".into(),
            ));
        }
        let now = self.clock.now();
        let found = self.cells_and_hashes(&drivers);

        // Group the drivers by cell (input order within each), and give each
        // its shard and slot.
        let mut groups: HashMap<CellIndex, Vec<u32>, FixedState> = HashMap::default();
        for (i, (cell, _)) in found.iter().enumerate() {
            groups.entry(*cell).or_default().push(i as u32);
        }
        let mut locs = vec![Loc { shard: 0, slot: 0 }; drivers.len()];
        let groups: Vec<(Arc<Shard>, Vec<u32>)> = groups
            .into_iter()
            .map(|(cell, members)| {
                let shard = self.shard_for(cell);
                for (slot, &i) in members.iter().enumerate() {
                    locs[i as usize] = Loc {
                        shard: shard.idx,
                        slot: slot as u32,
                    };
                }
                (shard, members)
            })
            .collect();

        let replaced = self.fill_driver_map(&drivers, &found, &locs, &groups);

        // The shards, by shard: records (copied: moving them out of
        // `drivers` would be a pass on one core) into exact-size slabs,
        // then the trees.
        drop(found);
        crate::par::par_for_each_vec(groups, |(shard, members)| {
            let mut data = ShardData::default();
            let available = members
                .iter()
                .filter(|&&i| drivers[i as usize].status == Status::Available)
                .count();
            let mut items = Vec::with_capacity(available);
            // A little headroom: the first drivers to move in would
            // otherwise copy the whole slab (the pages stay untouched, so
            // resident memory does not grow until they are used).
            data.slots
                .reserve_exact(members.len() + members.len() / 16 + 16);
            for (slot, &i) in members.iter().enumerate() {
                let d = &drivers[i as usize];
                *data.counts.slot(d.status) += 1;
                let rec = Record {
                    id: d.id.clone(),
                    pos: d.pos,
                    ts: d.ts,
                    seen: now,
                    status: d.status,
                    vehicle: d.vehicle,
                    caps: d.capabilities,
                };
                if rec.status == Status::Available {
                    items.push(rec.item(slot as u32));
                }
                data.slots.push(Some(rec));
            }
            data.tree = ShardTree::bulk_load(items);
            *shard.data.write() = data;
        });
        drop(drivers);
        for loc in &replaced {
            self.shard(loc.shard).data.write().take(loc.slot);
        }
        Ok(locs.len() - replaced.len())
    }

    /// Bulk load: enters every driver in the (empty) driver map, one
    /// stripe per task. `found` holds each driver's id hash, `locs` its
    /// place, `groups` each shard's drivers.
    fn fill_driver_map(
        &self,
        drivers: &[Driver],
        found: &[(CellIndex, u64)],
        locs: &[Loc],
        groups: &[(Arc<Shard>, Vec<u32>)],
    ) -> Vec<Loc> {
        // The driver map, one stripe per task, in input order: a later
        // duplicate replaces an earlier one. Returns the replaced locations.
        let mut by_stripe: Vec<Vec<u32>> = vec![Vec::new(); STRIPES];
        for (i, (_, h)) in found.iter().enumerate() {
            by_stripe[Self::stripe_of(*h)].push(i as u32);
        }
        // Which input driver a location holds (to tell a duplicate id from
        // another id of the same hash).
        let group_of_shard: HashMap<u32, usize, FixedState> = groups
            .iter()
            .enumerate()
            .map(|(g, (shard, _))| (shard.idx, g))
            .collect();
        let driver_at = |loc: Loc| groups[group_of_shard[&loc.shard]].1[loc.slot as usize] as usize;
        let jobs: Vec<(usize, Vec<u32>)> = by_stripe.into_iter().enumerate().collect();
        crate::par::par_map(&jobs, 2, |(s, members)| {
            let mut map = self.stripes[*s].lock();
            map.by_hash.reserve(members.len());
            let mut replaced = Vec::new();
            for &i in members {
                let (i, h) = (i as usize, found[i as usize].1);
                let id = &drivers[i].id;
                match map.by_hash.entry(h) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(locs[i]);
                    }
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        if drivers[driver_at(*e.get())].id == *id {
                            replaced.push(e.insert(locs[i]));
                        } else if let Some(old) = map.collided.insert(id.clone(), locs[i]) {
                            replaced.push(old);
                        }
                    }
                }
            }
            replaced
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Each driver's partition cell and id hash, on both cores.
    fn cells_and_hashes(&self, drivers: &[Driver]) -> Vec<(CellIndex, u64)> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let parts: Vec<&[Driver]> = drivers
            .chunks(drivers.len().div_ceil(threads).max(4096))
            .collect();
        crate::par::par_map(&parts, 2, |part| {
            let mut finder = CellFinder::new(self.resolution);
            part.iter()
                .map(|d| (finder.cell(d.pos), self.id_hash(&d.id).0))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Finds the partition cells of many positions, mostly without h3o (about
/// 3k instructions a lookup): it remembers the last cell seen in each
/// small latitude/longitude box, and a position inside that cell's
/// [`InnerDisk`] is in that cell. Every other position goes to h3o. So
/// the answer is always h3o's; the boxes only make it cheaper.
struct CellFinder {
    resolution: Resolution,
    last_in_box: HashMap<u64, (CellIndex, InnerDisk), FixedState>,
    disks: HashMap<CellIndex, InnerDisk, FixedState>,
}

impl CellFinder {
    /// Boxes per degree: 0.01° (≈ 1.1 km) boxes, small against a
    /// resolution-6 cell (≈ 7 km across).
    const BOXES_PER_DEGREE: f64 = 100.0;

    fn new(resolution: Resolution) -> Self {
        Self {
            resolution,
            last_in_box: HashMap::default(),
            disks: HashMap::default(),
        }
    }

    fn cell(&mut self, pos: Position) -> CellIndex {
        let row = ((pos.lat() + 90.0) * Self::BOXES_PER_DEGREE) as u64;
        let col = ((pos.lon() + 180.0) * Self::BOXES_PER_DEGREE) as u64;
        let key = row << 32 | col;
        let v = pos.to_unit_vector();
        if let Some((cell, disk)) = self.last_in_box.get(&key)
            && disk.contains(&v)
        {
            return *cell;
        }
        let cell = pos.cell(self.resolution);
        let disk = *self
            .disks
            .entry(cell)
            .or_insert_with(|| InnerDisk::of(cell));
        self.last_in_box.insert(key, (cell, disk));
        cell
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstar::Envelope;

    fn id(s: &str) -> DriverId {
        DriverId::new(s).unwrap()
    }

    fn pos(lat: f64, lon: f64) -> Position {
        Position::new(lat, lon).unwrap()
    }

    #[test]
    fn cell_boxes_contain_their_cells_points() {
        // Sample points all over the globe, including poles and antimeridian.
        for res in [0u8, 2, 6, 9] {
            let r = Resolution::try_from(res).unwrap();
            for i in 0..2000 {
                let lat = -90.0 + 180.0 * f64::from(i * 7919 % 2000) / 1999.0;
                let lon = -180.0 + 360.0 * f64::from(i * 104_729 % 2000) / 1999.0;
                let p = pos(lat, lon);
                let cell = p.cell(r);
                let b = cell_bbox(cell);
                assert!(
                    b.contains_point(&p.to_unit_vector()),
                    "res {res} {p:?} outside {cell}"
                );
            }
        }
    }

    /// 300 cells scattered over the globe, poles to antimeridian, at each
    /// of resolutions 0, 2, 6 and 9.
    fn globe_cells() -> Vec<(Resolution, CellIndex)> {
        let mut out = Vec::new();
        for res in [0u8, 2, 6, 9] {
            let r = Resolution::try_from(res).unwrap();
            for i in 0..300 {
                let lat = -89.0 + 178.0 * f64::from(i * 7919 % 300) / 299.0;
                let lon = -180.0 + 360.0 * f64::from(i * 104_729 % 300) / 299.0;
                out.push((r, pos(lat, lon).cell(r)));
            }
        }
        out
    }

    #[test]
    fn inner_disks_lie_inside_their_cells() {
        // Points on (just inside) the disk's rim, in 24 directions, for cells
        // all over the globe: h3o must put every one in the same cell.
        for (r, cell) in globe_cells() {
            let disk = InnerDisk::of(cell);
            let c = disk.center;
            // Two unit tangents at the centre.
            let any = if c[2].abs() < 0.9 {
                [0.0, 0.0, 1.0]
            } else {
                [1.0, 0.0, 0.0]
            };
            let cross = |a: [f64; 3], b: [f64; 3]| {
                [
                    a[1] * b[2] - a[2] * b[1],
                    a[2] * b[0] - a[0] * b[2],
                    a[0] * b[1] - a[1] * b[0],
                ]
            };
            let norm = |v: [f64; 3]| {
                let l = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
                [v[0] / l, v[1] / l, v[2] / l]
            };
            let t1 = norm(cross(c, any));
            let t2 = cross(c, t1);
            let angle = 2.0 * (disk.chord2.sqrt() / 2.0).asin() * 0.999;
            for k in 0..24 {
                let phi = f64::from(k) * std::f64::consts::TAU / 24.0;
                let dir = [0, 1, 2].map(|j| t1[j] * phi.cos() + t2[j] * phi.sin());
                let p = norm([0, 1, 2].map(|j| c[j] * angle.cos() + dir[j] * angle.sin()));
                assert!(disk.contains(&p));
                let ll = pos(p[2].asin().to_degrees(), p[1].atan2(p[0]).to_degrees());
                assert_eq!(ll.cell(r), cell, "res {r}: {ll:?} left {cell}");
            }
        }
    }

    #[test]
    fn shard_table_locates_every_index_once() {
        let mut next = 0usize;
        for k in 0..CHUNKS {
            let len = FIRST_CHUNK << k;
            for offset in [0, 1, len / 2, len - 1] {
                let idx = next + offset;
                if let Ok(idx) = u32::try_from(idx) {
                    assert_eq!(ShardTable::locate(idx), (k, offset), "index {idx}");
                }
            }
            next += len;
        }
        assert!(next > u32::MAX as usize);
        assert_eq!(ShardTable::locate(u32::MAX).0, CHUNKS - 1);
    }

    #[test]
    fn cell_finder_agrees_with_h3o() {
        for res in [0u8, 6, 9] {
            let r = Resolution::try_from(res).unwrap();
            let mut finder = CellFinder::new(r);
            // Dense around Chicago (repeated boxes), then all over the globe.
            for i in 0..20_000 {
                let p = if i < 10_000 {
                    let f = f64::from(i);
                    pos(
                        41.6 + (f * 0.618_034).fract() * 0.5,
                        -87.9 + (f * 0.414_214).fract() * 0.5,
                    )
                } else {
                    let lat = -90.0 + 180.0 * f64::from(i * 7919 % 2000) / 1999.0;
                    let lon = -180.0 + 360.0 * f64::from(i * 104_729 % 2000) / 1999.0;
                    pos(lat, lon)
                };
                assert_eq!(finder.cell(p), p.cell(r), "res {res} {p:?}");
            }
        }
    }

    #[test]
    fn bulk_load_keeps_the_last_duplicate() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let driver = |name: &str, lat: f64, status: Status| Driver {
            id: id(name),
            pos: pos(lat, -87.63),
            ts: Timestamp::EPOCH,
            status,
            vehicle: Vehicle::Car,
            capabilities: Capabilities::NONE,
            order_id: None,
            reserved_until: None,
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
        let start = |i: u32| {
            let f = f64::from(i);
            pos(
                41.85 + (f * 0.618_034).fract() * 0.05,
                -87.65 + (f * 0.414_214).fract() * 0.05,
            )
        };
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
        let shards = e.shards();
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

    #[test]
    fn driver_map_survives_hash_collisions() {
        // Four distinct hashes for all ids: nearly every id collides.
        for bulk in [false, true] {
            let mut e = Engine::new(EngineConfig::default()).unwrap();
            e.id_hash_mask = 0x3;
            let mut model: HashMap<String, (Position, Status)> = HashMap::new();
            let at = |x: u32| {
                let f = f64::from(x);
                pos(
                    41.0 + (f * 0.618_034).fract() * 1.5,
                    -88.0 + (f * 0.414_214).fract() * 1.5,
                )
            };
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
    fn shrunk_cells_lie_inside_their_cells() {
        // Points scattered over each cell and a little beyond: wherever the
        // inner region says "inside", h3o must agree.
        let mut inside_only_by_planes = 0;
        for (r, cell) in globe_cells() {
            let region = InnerDisk::of(cell);
            let c = LatLng::from(cell);
            let ll_radius = cell
                .boundary()
                .iter()
                .map(|v| (v.lat() - c.lat()).abs().max((v.lng() - c.lng()).abs()))
                .fold(0.0, f64::max)
                .min(20.0);
            for k in 0..400 {
                let f = f64::from(k);
                let dlat = ((f * 0.618_034).fract() * 2.0 - 1.0) * ll_radius;
                let dlon = ((f * 0.414_214).fract() * 2.0 - 1.0) * ll_radius;
                let Ok(p) = Position::new(c.lat() + dlat, c.lng() + dlon) else {
                    continue;
                };
                let v = p.to_unit_vector();
                if region.contains(&v) {
                    assert_eq!(p.cell(r), cell, "res {r}: {p:?}");
                    if chord2(&region.center, &v) >= region.chord2 {
                        inside_only_by_planes += 1;
                    }
                }
            }
        }
        assert!(inside_only_by_planes > 1000, "{inside_only_by_planes}");
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
            id: id(&format!("d{i}")),
            pos: pos(41.6 + f64::from(i) * 0.0004, -87.9 + f64::from(i) * 0.0003),
            ts: Timestamp::EPOCH,
            status: if i % 2 == 0 {
                Status::Available
            } else {
                Status::Busy
            },
            vehicle: Vehicle::Car,
            capabilities: Capabilities::NONE,
            order_id: None,
            reserved_until: None,
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
}
