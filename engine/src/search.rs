//! Exact k-nearest search over the shards.
//!
//! # Algorithm
//! Best-first over two levels. The top-level R-tree yields shards in
//! increasing order of the distance from the query to their cell's box,
//! which is a lower bound for every driver in that shard. Each shard's
//! R-tree is walked nearest box first, opening only boxes within the
//! current k-th best (`Walk::shard`). Both walks stop as soon as the next
//! lower bound exceeds the current k-th best (or the radius). So the
//! search visits only the cells that could still hold a better answer: one
//! or two in a dense city, however many it takes in a sparse country, with
//! no cost for empty cells in between.
//!
//! Chord order equals great-circle order, so the result is exact. To agree
//! to the last bit with a haversine oracle, the walk keeps every candidate
//! within a hair (1e-9 relative, ~6 µm absolute) of the k-th chord, then
//! ranks the survivors by haversine metres and driver id.
//!
//! Cost: O(c·log n) for c visited cells of n drivers each; no allocation
//! beyond the candidate list, one node queue per visited cell and the
//! result.

use std::collections::BinaryHeap;

use rstar::{AABB, ParentNode, RTreeNode};

use crate::driver::{Capabilities, Vehicle};
use crate::error::{Error, Result};
use crate::ids::DriverId;
use crate::index::{CellEntry, Cells, Index, ShardData};
use crate::position::{EARTH_RADIUS_M, Position, chord_of_metres, chord2};
use crate::rtree::{Item, NodeRef};
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
/// that and never cost a record read). Small, because candidates shift
/// on every sorted insert.
#[derive(Clone, Copy)]
struct Candidate {
    d2: f64,
    slot: u32,
    found: u32,
}

/// [`Candidate::found`] of a candidate whose record is not read yet.
const UNREAD: u32 = u32::MAX;

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

/// An entry of a best-first queue, nearest first: a tree node, or (in the
/// walk over cells) a cell.
struct Pending<N> {
    d2: f64,
    next: N,
}

impl<N> PartialEq for Pending<N> {
    fn eq(&self, other: &Self) -> bool {
        self.d2.total_cmp(&other.d2).is_eq()
    }
}

impl<N> Eq for Pending<N> {}

impl<N> PartialOrd for Pending<N> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<N> Ord for Pending<N> {
    /// Reversed: `BinaryHeap` is a max-heap, the walk wants the nearest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.d2.total_cmp(&self.d2)
    }
}

/// What the walk over cells queues: a node of the top-level tree, or a cell.
enum CellStep<'a> {
    Node(&'a ParentNode<CellEntry>),
    Cell(&'a CellEntry),
}

/// The state of one query's walk.
struct Walk<'q> {
    q: &'q NearestQuery,
    qv: [f64; 3],
    cands: Vec<Candidate>,
    /// The records' fields of candidates that survived their shard's walk.
    found: Vec<Neighbor>,
    /// Nothing farther than this (squared chord) can still be in the answer.
    cut2: f64,
}

impl Walk<'_> {
    /// Walks the cells nearest box first, and each cell's shard as its
    /// turn comes: a cell's box bounds every driver in it from below, so
    /// the walk ends at the first cell beyond the cut.
    fn cells(&mut self, cells: &Cells) {
        let root = cells.tree.root();
        let mut queue = BinaryHeap::with_capacity(64);
        queue.push(Pending {
            d2: box_d2(&root.envelope(), &self.qv),
            next: CellStep::Node(root),
        });
        while let Some(Pending { d2, next }) = queue.pop() {
            if d2 > self.cut2 {
                break;
            }
            match next {
                CellStep::Cell(entry) => self.shard(&entry.shard.data.read()),
                CellStep::Node(node) => {
                    for child in node.children() {
                        let (d2, next) = match child {
                            RTreeNode::Leaf(entry) => {
                                (box_d2(&entry.bbox, &self.qv), CellStep::Cell(entry))
                            }
                            RTreeNode::Parent(p) => {
                                (box_d2(&p.envelope(), &self.qv), CellStep::Node(p))
                            }
                        };
                        if d2 <= self.cut2 {
                            queue.push(Pending { d2, next });
                        }
                    }
                }
            }
        }
    }

    /// Offers one tree item: kept if near enough and eligible.
    #[inline]
    fn offer(&mut self, item: &Item) {
        let d2 = chord2(&item.v, &self.qv);
        if d2 > self.cut2
            || self.q.vehicle.is_some_and(|v| v != item.vehicle)
            || !item.caps.contains(self.q.capabilities)
        {
            return;
        }
        let at = self.cands.partition_point(|c| c.d2 <= d2);
        self.cands.insert(
            at,
            Candidate {
                d2,
                slot: item.slot,
                found: UNREAD,
            },
        );
        let k = self.q.k;
        if self.cands.len() >= k {
            self.cut2 = self.cut2.min(keep_below(self.cands[k - 1].d2));
            let keep = self.cands.partition_point(|c| c.d2 <= self.cut2);
            self.cands.truncate(keep);
        }
    }

    /// Walks one shard's tree best-first, nearest box first, queueing only
    /// nodes whose box is within the cut (an inner node holds its
    /// children's boxes, so ranking them reads no child).
    /// Exact: an item within the final cut lies in boxes that were within
    /// every earlier cut (the cut only shrinks), so all of them were opened.
    fn shard(&mut self, data: &ShardData) {
        let mut queue = BinaryHeap::with_capacity(32);
        let (root, bbox) = data.tree.root();
        queue.push(Pending {
            d2: bbox.d2(&self.qv),
            next: root,
        });
        while let Some(Pending { d2, next: node }) = queue.pop() {
            if d2 > self.cut2 {
                break;
            }
            match node {
                NodeRef::Leaf(leaf) => {
                    for item in data.tree.items(leaf) {
                        self.offer(item);
                    }
                }
                NodeRef::Inner(inner) => {
                    for (child, b) in data.tree.children(inner) {
                        let d2 = b.d2(&self.qv);
                        if d2 <= self.cut2 {
                            queue.push(Pending { d2, next: child });
                        }
                    }
                }
            }
        }
        // The survivors found in this shard read their records now, under
        // the same read lock that the walk held.
        let found = &mut self.found;
        self.cands.retain_mut(|c| {
            if c.found != UNREAD {
                return true;
            }
            let Some(rec) = data.record(c.slot) else {
                return false;
            };
            c.found = u32::try_from(found.len()).unwrap_or(UNREAD);
            found.push(Neighbor {
                id: rec.id.clone(),
                pos: rec.pos,
                distance_m: 0.0,
                vehicle: rec.vehicle,
                capabilities: rec.caps,
                ts: rec.ts,
            });
            c.found != UNREAD
        });
    }
}

/// The `k` nearest available drivers of `index` passing the query's
/// filters, by great-circle distance, ties broken by driver id. A query
/// without a radius searches as far as `max_radius_m`.
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
    let limit_m = q.radius_m.unwrap_or(max_radius_m);
    let mut walk = Walk {
        q,
        qv: q.pos.to_unit_vector(),
        cands: Vec::with_capacity(q.k + 4),
        found: Vec::with_capacity(q.k + 4),
        cut2: keep_below(chord_of_metres(limit_m).powi(2)),
    };
    walk.cells(&index.read_cells());

    // A read record belongs to one candidate still standing, or to
    // none (a later shard pushed its candidate out). The order does not
    // matter: the survivors are ranked by metres below.
    let mut wanted = vec![false; walk.found.len()];
    for c in &walk.cands {
        if let Some(w) = wanted.get_mut(c.found as usize) {
            *w = true;
        }
    }
    let mut out = Vec::with_capacity(walk.cands.len());
    for (mut n, w) in walk.found.into_iter().zip(wanted) {
        if w {
            n.distance_m = q.pos.distance_m(n.pos);
            if n.distance_m <= limit_m {
                out.push(n);
            }
        }
    }
    out.sort_unstable_by(|a, b| {
        a.distance_m
            .total_cmp(&b.distance_m)
            .then_with(|| a.id.cmp(&b.id))
    });
    out.truncate(q.k);
    Ok(out)
}

/// Half the Earth's circumference: no two points are farther apart.
pub const MAX_DISTANCE_M: f64 = EARTH_RADIUS_M * std::f64::consts::PI;
