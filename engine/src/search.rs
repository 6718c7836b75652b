//! Exact k-nearest search over the shards.
//!
//! # Algorithm
//! Depth-first, nearest box first, over two levels: the top-level R-tree
//! of cells, then each cell's shard tree as its turn comes. At every node
//! the children within the current cut (the k-th best so far, or the
//! radius) are measured, and the walk descends into them nearest first,
//! stopping at the first one beyond the cut: the cut only shrinks, so a
//! child beyond it stays beyond it. A cell's box bounds every driver in
//! it from below, so the search visits only the cells that could still
//! hold a better answer: one or two in a dense city, however many it takes
//! in a sparse country, with no cost for empty cells in between.
//!
//! Filters prune at every level through the summaries (`filter`): the
//! index's before the first cell (a filter nobody matches costs a few
//! atomic loads), a shard's before its cell is measured (no lock taken), a
//! child's before its box is measured, then each item's own traits. A
//! query without filters skips the checks below the shards.
//!
//! Chord order equals great-circle order, so the result is exact. To agree
//! to the last bit with a haversine oracle, the walk keeps every candidate
//! within a hair (1e-9 relative, ~6 µm absolute) of the k-th chord (the k
//! best in a max-heap, near ties beside it), then ranks the survivors by
//! haversine metres and driver id.
//!
//! Cost: O(c·log n) for c visited cells of n drivers each; no queue, and no
//! allocation but the result (the candidate buffers are kept per thread).
//! Unfiltered k = 10 among 1M drivers is about 11.4k instructions, a
//! sixth of it the ten haversine distances of the ranking.

use std::cell::RefCell;

use rstar::{AABB, DefaultParams, ParentNode, RTreeNode, RTreeParams};

use crate::area::CellSet;
use crate::driver::{Capabilities, Vehicle};
use crate::error::{Error, Result};
use crate::filter::Traits;
use crate::ids::DriverId;
use crate::index::{CellEntry, Cells, Index, ShardData};
use crate::position::{DistanceFrom, EARTH_RADIUS_M, Position, chord_of_metres, chord2};
use crate::rtree::{M, NodeRef};
use crate::time::Timestamp;

/// The largest `k` the engine accepts (the HTTP API allows 1..=100).
pub const MAX_K: usize = 10_000;

/// A nearest-drivers query.
#[derive(Debug, Clone, PartialEq)]
pub struct NearestQuery {
    /// Where to search from.
    pub pos: Position,
    /// How many drivers to return at most.
    pub k: usize,
    /// Search no farther than this, in metres; `None` = the engine's
    /// `max_radius_m`.
    pub radius_m: Option<f64>,
    /// Only this vehicle class, if set.
    pub vehicle: Option<Vehicle>,
    /// Only drivers having all of these.
    pub capabilities: Capabilities,
    /// Only drivers in these partition cells (a region's), if set.
    pub within: Option<CellSet>,
}

impl NearestQuery {
    /// The `k` nearest available drivers to `pos`, with no filter.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `1 <= k <= MAX_K`.
    pub fn new(pos: Position, k: usize) -> Result<Self> {
        if !(1..=MAX_K).contains(&k) {
            return Err(Error::InvalidParameter(format!(
                "k = {k} is not in 1..={MAX_K}"
            )));
        }
        Ok(Self {
            pos,
            k,
            radius_m: None,
            vehicle: None,
            capabilities: Capabilities::NONE,
            within: None,
        })
    }

    /// Limits the search to `radius_m` metres.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless the radius is a positive finite number.
    pub fn with_radius(mut self, radius_m: f64) -> Result<Self> {
        validate_radius(radius_m)?;
        self.radius_m = Some(radius_m);
        Ok(self)
    }

    /// Keeps only drivers of this vehicle class.
    #[must_use]
    pub fn with_vehicle(mut self, vehicle: Vehicle) -> Self {
        self.vehicle = Some(vehicle);
        self
    }

    /// Keeps only drivers with all of these capabilities.
    #[must_use]
    pub fn with_capabilities(mut self, caps: Capabilities) -> Self {
        self.capabilities = caps;
        self
    }

    /// Keeps only drivers in these partition cells (a region's: see
    /// [`RegionMap::cells_of`](crate::RegionMap::cells_of)).
    #[must_use]
    pub fn within(mut self, cells: CellSet) -> Self {
        self.within = Some(cells);
        self
    }
}

pub(crate) fn validate_radius(radius_m: f64) -> Result<()> {
    if radius_m.is_finite() && radius_m > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidParameter(format!(
            "radius_m {radius_m} must be a positive number of metres"
        )))
    }
}

/// One driver in a nearest result.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbor {
    /// The driver.
    pub id: DriverId,
    /// Its position.
    pub pos: Position,
    /// Great-circle distance from the query, in metres.
    pub distance_m: f64,
    /// Its vehicle class.
    pub vehicle: Vehicle,
    /// Its capabilities.
    pub capabilities: Capabilities,
    /// Timestamp of its last applied update.
    pub ts: Timestamp,
}

/// A candidate during the walk: its squared chord, its slot in the shard
/// being walked, and, once that shard's walk ends, the index of its
/// record's fields in [`Walk::found`] (most candidates are dropped before
/// that and never cost a record read). Small, because candidates move in
/// the heap of the k best.
#[derive(Clone, Copy)]
struct Candidate {
    d2: f64,
    slot: u32,
    found: u32,
}

/// [`Candidate::found`] of a candidate whose record is not read yet.
const UNREAD: u32 = u32::MAX;
/// [`Candidate::found`] of a candidate whose record is gone.
const LOST: u32 = u32::MAX - 1;

/// Restores a max-heap on `d2` (the k best candidates) after a push.
#[inline]
fn sift_up(heap: &mut [Candidate]) {
    let Some((&moving, _)) = heap.split_last() else {
        return;
    };
    let mut at = heap.len() - 1;
    while at > 0 {
        let parent = (at - 1) / 2;
        let Some(&up) = heap.get(parent) else { break };
        if up.d2 >= moving.d2 {
            break;
        }
        heap[at] = up;
        at = parent;
    }
    heap[at] = moving;
}

/// Restores a max-heap on `d2` after its top was replaced.
#[inline]
fn sift_down(heap: &mut [Candidate]) {
    sift_down_from(heap, 0);
}

#[inline]
fn sift_down_from(heap: &mut [Candidate], mut at: usize) {
    let Some(&moving) = heap.get(at) else {
        return;
    };
    loop {
        let left = 2 * at + 1;
        let Some(&l) = heap.get(left) else { break };
        let (child, c) = match heap.get(left + 1) {
            Some(&r) if r.d2 > l.d2 => (left + 1, r),
            _ => (left, l),
        };
        if c.d2 <= moving.d2 {
            break;
        }
        heap[at] = c;
        at = child;
    }
    heap[at] = moving;
}

/// Makes a max-heap on `d2` of any order.
fn heapify(heap: &mut [Candidate]) {
    for at in (0..heap.len() / 2).rev() {
        sift_down_from(heap, at);
    }
}

/// The squared chord below which a candidate must be kept, given the
/// squared chord of the current k-th best.
#[inline]
fn keep_below(d2: f64) -> f64 {
    let c = d2.sqrt() * (1.0 + 1e-9) + 1e-12;
    c * c
}

/// The squared distance from `q` to the nearest point of the box (0
/// inside it). rstar's `AABB::distance_2` computes the same through its
/// generic per-component folds, which did not inline: they were a sixth
/// of a query's instructions (callgrind).
#[inline]
fn box_d2(b: &AABB<[f64; 3]>, q: &[f64; 3]) -> f64 {
    crate::rtree::Aabb {
        lo: b.lower(),
        hi: b.upper(),
    }
    .d2(q)
}

/// Most children of a node of either tree: a shard tree's [`M`], and the
/// top-level rstar tree's (its default parameters).
const MAX_CHILDREN: usize = M;
const _: () = assert!(<DefaultParams as RTreeParams>::MAX_SIZE <= MAX_CHILDREN);

/// A node's children within the cut, handed out nearest box first: the
/// walk descends into them in this order, and stops at the first one
/// beyond the cut (which shrinks as it goes). Each is a key: its squared
/// distance with the lowest four bits replaced by the child's index. The
/// key without the index is a hair below the distance, so still a lower
/// bound; and since distances are never negative, keys order as their
/// bits do, so the least key is the nearest child, ties by index.
///
/// Child `i`'s key sits at `keys[i]`, infinity for a child beyond the
/// cut, skipped by the filters or already taken: measuring the children
/// is one pass with no branch, and each pick takes the least of at most
/// [`MAX_CHILDREN`] keys, which beats sorting them: the cut usually stops
/// the walk after the first one or two.
struct Ranked {
    keys: [f64; MAX_CHILDREN],
}

/// The bits of a [`Ranked`] key that hold the child's index.
const CHILD_BITS: u64 = 0xF;
const _: () = assert!(MAX_CHILDREN as u64 <= CHILD_BITS + 1);
const _: () = assert!(MAX_CHILDREN.is_power_of_two());

impl Ranked {
    /// Ranks a node's children by their squared distances `d2s` (in
    /// child order; infinity for a child the filters skip), keeping
    /// those within `cut2`. Children past [`MAX_CHILDREN`] are not read
    /// (no node has them).
    #[inline]
    fn new(d2s: impl Iterator<Item = f64>, cut2: f64) -> Self {
        let mut keys = [f64::INFINITY; MAX_CHILDREN];
        for (i, (key, d2)) in keys.iter_mut().zip(d2s).enumerate() {
            if d2 <= cut2 {
                *key = f64::from_bits((d2.to_bits() & !CHILD_BITS) | i as u64);
            }
        }
        Self { keys }
    }

    /// Takes the nearest child left, if it is within `cut2`.
    #[inline]
    fn next_within(&mut self, cut2: f64) -> Option<usize> {
        let bits = self.least().to_bits();
        if f64::from_bits(bits & !CHILD_BITS) > cut2 {
            return None;
        }
        let i = (bits & CHILD_BITS) as usize;
        if let Some(k) = self.keys.get_mut(i) {
            *k = f64::INFINITY;
        }
        Some(i)
    }

    /// The least key, by halving: each step's comparisons are independent,
    /// so the compiler does them two at a time (`minpd`), and keys are never
    /// NaN, so the plain comparison is exact.
    #[inline]
    fn least(&self) -> f64 {
        let mut m = self.keys;
        let mut half = MAX_CHILDREN;
        while half > 1 {
            half /= 2;
            for i in 0..half {
                m[i] = if m[i + half] < m[i] {
                    m[i + half]
                } else {
                    m[i]
                };
            }
        }
        m[0]
    }
}

/// The buffers of a walk, kept by each thread from one query to the next:
/// a query then allocates only its result.
#[derive(Default)]
struct Scratch {
    best: Vec<Candidate>,
    ties: Vec<Candidate>,
    order: Vec<(u64, u32)>,
}

/// Candidates kept in a thread's [`Scratch`] between queries at most; a
/// larger `k` gives its excess back.
const SCRATCH_KEEP: usize = 1024;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The state of one query's walk.
struct Walk<'q> {
    k: usize,
    qv: [f64; 3],
    /// What the filters require of a driver.
    required: Traits,
    /// The only cells to open, if the query names them.
    within: Option<&'q CellSet>,
    /// The k nearest candidates so far, as a max-heap on `d2`: the k-th
    /// best is at the top.
    best: Vec<Candidate>,
    /// Candidates beyond the k best but within the cut: (near) ties of the
    /// k-th, kept for the exact ranking. Usually none.
    ties: Vec<Candidate>,
    /// The ranking's keys (see `rank`).
    order: Vec<(u64, u32)>,
    /// The records' fields of candidates that survived their shard's walk:
    /// the result, once the candidates pushed out later are dropped.
    found: Vec<Neighbor>,
    /// Nothing farther than this (squared chord) can still be in the answer.
    cut2: f64,
}

impl Walk<'_> {
    /// Walks the cells, descending nearest box first into each node of the
    /// top-level tree, and walks each cell's shard as its turn comes: a
    /// cell's box bounds every driver in it from below. A cell whose
    /// shard's summary cannot satisfy the filters is never measured.
    fn cells(&mut self, cells: &Cells) {
        let root = cells.tree.root();
        if box_d2(&root.envelope(), &self.qv) <= self.cut2 {
            self.cell_node(root);
        }
    }

    fn cell_node(&mut self, node: &ParentNode<CellEntry>) {
        let children = node.children();
        let (qv, required, within) = (self.qv, self.required, self.within);
        let d2s = children.iter().map(|child| match child {
            RTreeNode::Leaf(entry)
                if entry.shard.traits().admits(required)
                    && within.is_none_or(|cells| cells.contains(entry.shard.cell)) =>
            {
                box_d2(&entry.bbox, &qv)
            }
            RTreeNode::Leaf(_) => f64::INFINITY,
            RTreeNode::Parent(p) => box_d2(&p.envelope(), &qv),
        });
        let mut ranked = Ranked::new(d2s, self.cut2);
        while let Some(i) = ranked.next_within(self.cut2) {
            match &children[i] {
                RTreeNode::Leaf(entry) => self.shard(&entry.shard.data.read()),
                RTreeNode::Parent(p) => self.cell_node(p),
            }
        }
    }

    /// Keeps a candidate within the cut. Among the k best it goes into
    /// the heap, pushing the old k-th out (to the ties, if still within the
    /// new cut); beyond them, to the ties.
    // Left to itself the compiler calls this from the leaf loop, and the
    // call costs more than the work of most candidates (callgrind).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn keep(&mut self, d2: f64, slot: u32) {
        let new = Candidate {
            d2,
            slot,
            found: UNREAD,
        };
        let best = &mut self.best;
        if best.len() < self.k {
            best.push(new);
            sift_up(best);
            if best.len() == self.k {
                self.tighten();
            }
        } else if let Some(top) = best.first_mut()
            && d2 < top.d2
        {
            let out = std::mem::replace(top, new);
            sift_down(best);
            self.tighten();
            if out.d2 <= self.cut2 {
                self.ties.push(out);
            }
        } else {
            self.ties.push(new);
        }
    }

    /// The k-th best changed: the cut follows it, and ties beyond the new
    /// cut go.
    #[inline]
    fn tighten(&mut self) {
        if let Some(kth) = self.best.first() {
            self.cut2 = self.cut2.min(keep_below(kth.d2));
        }
        if !self.ties.is_empty() {
            let cut2 = self.cut2;
            self.ties.retain(|c| c.d2 <= cut2);
        }
    }

    /// Walks one shard's tree, descending nearest box first into the
    /// children whose box is within the cut and whose summary can satisfy
    /// the filters (an inner node holds its children's boxes and summaries,
    /// so ranking them reads no child).
    /// Exact: an item within the final cut lies in boxes that were within
    /// every earlier cut (the cut only shrinks), so all of them were opened.
    fn shard(&mut self, data: &ShardData) {
        if !data.tree.traits().admits(self.required) {
            return;
        }
        let (root, bbox) = data.tree.root();
        if bbox.d2(&self.qv) <= self.cut2 {
            // Without filters, no summary or item needs checking.
            if self.required.is_empty() {
                self.tree_node::<false>(data, root);
            } else {
                self.tree_node::<true>(data, root);
            }
        }
        // The survivors found in this shard read their records now, under
        // the same read lock that the walk held; in the order `rank` reads
        // them, so that its records mostly stay where they are.
        let mut lost = false;
        for c in self.best.iter_mut().rev().chain(&mut self.ties) {
            if c.found != UNREAD {
                continue;
            }
            let rec = data.record(c.slot);
            match (rec, u32::try_from(self.found.len())) {
                (Some(rec), Ok(at)) if at != UNREAD && at != LOST => {
                    c.found = at;
                    self.found.push(Neighbor {
                        id: rec.id.clone(),
                        pos: rec.pos,
                        // Set by `rank`.
                        distance_m: 0.0,
                        vehicle: rec.vehicle,
                        capabilities: rec.caps,
                        ts: rec.ts,
                    });
                }
                _ => {
                    c.found = LOST;
                    lost = true;
                }
            }
        }
        if lost {
            self.best.retain(|c| c.found != LOST);
            self.ties.retain(|c| c.found != LOST);
            heapify(&mut self.best);
        }
    }

    /// Offers a leaf's items (kept if near enough and eligible), or
    /// descends into an inner node's children (`FILTERED`: whether the
    /// query has filters to check).
    fn tree_node<const FILTERED: bool>(&mut self, data: &ShardData, node: NodeRef) {
        match node {
            NodeRef::Leaf(leaf) => {
                let qv = self.qv;
                for item in data.tree.items(leaf) {
                    let d2 = chord2(&item.v, &qv);
                    if d2 <= self.cut2 && (!FILTERED || item.traits.has(self.required)) {
                        self.keep(d2, item.slot);
                    }
                }
            }
            NodeRef::Inner(inner) => {
                let c = data.tree.children(inner);
                let (qv, required) = (self.qv, self.required);
                let d2s = c.boxes.iter().zip(c.traits).map(|(b, t)| {
                    if !FILTERED || t.has(required) {
                        b.d2(&qv)
                    } else {
                        f64::INFINITY
                    }
                });
                let mut ranked = Ranked::new(d2s, self.cut2);
                while let Some(i) = ranked.next_within(self.cut2) {
                    self.tree_node::<FILTERED>(data, c.node(i));
                }
            }
        }
    }

    /// The answer: the records of the candidates still standing (a record
    /// read for a candidate that a later shard pushed out is dropped), by
    /// haversine metres within `limit_m`, ties by driver id, the first k.
    /// The ranking sorts small keys, then moves each chosen record once.
    fn rank(&mut self, from: Position, limit_m: f64) -> Vec<Neighbor> {
        let mut out = std::mem::take(&mut self.found);
        let from = DistanceFrom::new(from);
        // (metres' bits, index in `out`): metres are never negative, so
        // their bits order them as the numbers do.
        let order = &mut self.order;
        order.clear();
        // The heap of the k best has its farthest first: read backwards,
        // the candidates come nearly in order, and insertion moves little.
        for c in self.best.iter().rev().chain(&self.ties) {
            let Some(n) = out.get(c.found as usize) else {
                continue;
            };
            let m = from.to(n.pos);
            if m > limit_m {
                continue;
            }
            // Insertion by (metres, id): a dozen keys, no call.
            let key = (m.to_bits(), c.found);
            let after =
                |e: &(u64, u32)| e.0 > key.0 || (e.0 == key.0 && out[e.1 as usize].id > n.id);
            order.push(key);
            let mut at = order.len() - 1;
            while at > 0 && after(&order[at - 1]) {
                order[at] = order[at - 1];
                at -= 1;
            }
            order[at] = key;
        }
        order.truncate(self.k);
        // Step i swaps into place the record `order[i]` names, following
        // the earlier steps that moved it away (each step records in
        // `order` where it took its record from).
        for i in 0..order.len() {
            let mut from = order[i].1 as usize;
            while from < i {
                from = order[from].1 as usize;
            }
            order[i].1 = from as u32;
            if from != i {
                out.swap(i, from);
            }
            if let Some(n) = out.get_mut(i) {
                n.distance_m = f64::from_bits(order[i].0);
            }
        }
        out.truncate(order.len());
        out
    }
}

/// The `k` nearest available drivers of `index` passing the query's
/// filters, by great-circle distance, ties broken by driver id. A query
/// without a radius searches as far as `max_radius_m`. A filter that no
/// shard's summary can satisfy is answered before the first cell.
///
/// # Errors
/// [`Error::InvalidParameter`] for an invalid `k` or radius (only possible
/// when the query was built by hand rather than through its constructors).
pub(crate) fn nearest(index: &Index, q: &NearestQuery, max_radius_m: f64) -> Result<Vec<Neighbor>> {
    if !(1..=MAX_K).contains(&q.k) {
        return Err(Error::InvalidParameter(format!(
            "k = {} is not in 1..={MAX_K}",
            q.k
        )));
    }
    if let Some(r) = q.radius_m {
        validate_radius(r)?;
    }
    if let Some(cells) = &q.within {
        cells.check_resolution(index.resolution())?;
    }
    let required = Traits::required(q.vehicle, q.capabilities);
    if !index.may_have(required) {
        return Ok(Vec::new());
    }
    let limit_m = q.radius_m.unwrap_or(max_radius_m);
    let search = |scratch: &mut Scratch| {
        let mut walk = Walk {
            k: q.k,
            qv: q.pos.to_unit_vector(),
            required,
            within: q.within.as_ref(),
            best: std::mem::take(&mut scratch.best),
            ties: std::mem::take(&mut scratch.ties),
            order: std::mem::take(&mut scratch.order),
            found: Vec::with_capacity(q.k + 2),
            cut2: keep_below(chord_of_metres(limit_m).powi(2)),
        };
        walk.best.clear();
        walk.ties.clear();
        walk.cells(&index.read_cells());
        let out = walk.rank(q.pos, limit_m);
        for (mut kept, to) in [
            (walk.best, &mut scratch.best),
            (walk.ties, &mut scratch.ties),
        ] {
            kept.clear();
            kept.shrink_to(SCRATCH_KEEP);
            *to = kept;
        }
        walk.order.clear();
        walk.order.shrink_to(SCRATCH_KEEP);
        scratch.order = walk.order;
        out
    };
    // A nested search (none today) would find the scratch borrowed, and
    // use buffers of its own.
    Ok(SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut scratch) => search(&mut scratch),
        Err(_) => search(&mut Scratch::default()),
    }))
}

/// Half the Earth's circumference: no two points are farther apart.
pub const MAX_DISTANCE_M: f64 = EARTH_RADIUS_M * std::f64::consts::PI;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A node's children come nearest key first (ties by index), each
        /// once, while within the cut, which shrinks after every pick.
        #[test]
        fn ranked_hands_out_children_nearest_first(
            d2s in proptest::collection::vec(
                prop_oneof![4 => 0.0f64..4.0, 1 => Just(0.0), 1 => Just(f64::INFINITY)],
                0..=MAX_CHILDREN,
            ),
            cut2 in 0.0f64..4.0,
            shrink in 0.5f64..=1.0,
        ) {
            let key = |i: usize| f64::from_bits(d2s[i].to_bits() & !CHILD_BITS);
            let mut within: Vec<usize> = (0..d2s.len()).filter(|&i| d2s[i] <= cut2).collect();
            within.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
            let mut expect = Vec::new();
            let mut cut = cut2;
            for i in within {
                if key(i) > cut {
                    break;
                }
                expect.push(i);
                cut *= shrink;
            }

            let mut ranked = Ranked::new(d2s.iter().copied(), cut2);
            let mut got = Vec::new();
            let mut cut = cut2;
            while let Some(i) = ranked.next_within(cut) {
                got.push(i);
                cut *= shrink;
            }
            prop_assert_eq!(got, expect);
        }
    }
}
