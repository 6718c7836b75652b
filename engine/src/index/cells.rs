//! Cell geometry: the top-level tree of partition cells ([`Cells`], whose
//! entries are boxed by [`cell_bbox`]), each cell's [`InnerDisk`], and the
//! [`CellFinder`] that bulk load uses to find cells mostly without h3o.

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::fast::FixedState;
use h3o::{CellIndex, LatLng, Resolution};
use rstar::{AABB, PointDistance, RTree, RTreeObject};

use crate::position::{Position, chord2};

use super::shard::Shard;

/// Most boundary vertices of an H3 cell (a pentagon crossing icosahedron
/// edges).
const MAX_EDGES: usize = 10;

/// A region inside a cell (the "inner region"): a disk around its centre (one chord
/// comparison), and the cell shrunk by the same margin (one plane test per
/// edge), for points outside the disk.
#[derive(Debug, Clone, Copy)]
pub(super) struct InnerDisk {
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
    pub(super) fn of(cell: CellIndex) -> Self {
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

    pub(super) fn contains(&self, v: &[f64; 3]) -> bool {
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

/// Every shard by its cell, and the top-level tree of their cells' boxes
/// that the search walks.
#[derive(Debug, Default)]
pub(crate) struct Cells {
    pub(super) by_cell: HashMap<CellIndex, Arc<Shard>, FixedState>,
    pub(crate) tree: RTree<CellEntry>,
}

/// A box around the cell's vertices and centre as unit vectors, grown by
/// twice the sagitta of the cell's circumradius (how far the sphere bulges
/// beyond the flat polygon of its vertices) plus a rounding margin, so it
/// contains every point of the cell's spherical polygon.
pub(super) fn cell_bbox(cell: CellIndex) -> AABB<[f64; 3]> {
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

/// Finds the partition cells of many positions, mostly without h3o (about
/// 3k instructions a lookup): it remembers the last cell seen in each
/// small latitude/longitude box, and a position inside that cell's
/// [`InnerDisk`] is in that cell. Every other position goes to h3o. So
/// the answer is always h3o's; the boxes only make it cheaper.
pub(super) struct CellFinder {
    resolution: Resolution,
    last_in_box: HashMap<u64, (CellIndex, InnerDisk), FixedState>,
    disks: HashMap<CellIndex, InnerDisk, FixedState>,
}

impl CellFinder {
    /// Boxes per degree: 0.01° (≈ 1.1 km) boxes, small against a
    /// resolution-6 cell (≈ 7 km across).
    const BOXES_PER_DEGREE: f64 = 100.0;

    pub(super) fn new(resolution: Resolution) -> Self {
        Self {
            resolution,
            last_in_box: HashMap::default(),
            disks: HashMap::default(),
        }
    }

    pub(super) fn cell(&mut self, pos: Position) -> CellIndex {
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

    use crate::testing::pos;

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
}
