//! Lower bounds on the distance from a point to a region, so a search
//! asks only the owners of regions that could hold a nearer driver.
//!
//! Each region is covered by a spherical cap: a centre and the largest
//! angle from it to any vertex of the region's cells. H3 cell edges are
//! great-circle arcs (straight lines in the gnomonic projection the grid
//! is drawn in), and a cap narrower than a hemisphere is convex, so a cap
//! that holds every vertex holds every cell. The great-circle distance
//! from a point to anything in the cap is then at least
//! `R · max(0, angle(point, centre) − cap angle)`.

use std::collections::HashMap;
use std::str::FromStr;

use hexmatch::{CellIndex, EARTH_RADIUS_M, Position, RegionId, RegionMap};

/// Slack added to every cap (radians, ≈ 1 mm) against rounding.
const SLACK_RAD: f64 = 1e-10;

/// A spherical cap: unit-vector centre and angular radius.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cap {
    centre: [f64; 3],
    angle: f64,
}

fn unit(lat_deg: f64, lon_deg: f64) -> [f64; 3] {
    let (lat, lon) = (lat_deg.to_radians(), lon_deg.to_radians());
    [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
}

fn angle(a: [f64; 3], b: [f64; 3]) -> f64 {
    let cross = [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ];
    let sin = (cross[0] * cross[0] + cross[1] * cross[1] + cross[2] * cross[2]).sqrt();
    let cos = a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    sin.atan2(cos)
}

impl Cap {
    /// The cap around `cells` (none: `None`).
    pub(crate) fn of_cells(cells: &[CellIndex]) -> Option<Self> {
        if cells.is_empty() {
            return None;
        }
        let mut sum = [0.0; 3];
        for &c in cells {
            let ll = h3o::LatLng::from(c);
            let u = unit(ll.lat(), ll.lng());
            for (s, x) in sum.iter_mut().zip(u) {
                *s += x;
            }
        }
        let norm = (sum[0] * sum[0] + sum[1] * sum[1] + sum[2] * sum[2]).sqrt();
        let centre = if norm > 1e-12 {
            [sum[0] / norm, sum[1] / norm, sum[2] / norm]
        } else {
            // Cells spread evenly over the sphere: any centre, whole-sphere cap.
            return Some(Self {
                centre: [0.0, 0.0, 1.0],
                angle: std::f64::consts::PI,
            });
        };
        let mut widest: f64 = 0.0;
        for &c in cells {
            for v in c.boundary().iter() {
                widest = widest.max(angle(centre, unit(v.lat(), v.lng())));
            }
        }
        let angle = if widest >= std::f64::consts::FRAC_PI_2 {
            // Not convex any more: claim the whole sphere, which is safe.
            std::f64::consts::PI
        } else {
            widest + SLACK_RAD
        };
        Some(Self { centre, angle })
    }

    /// A lower bound on the great-circle distance, in metres, from `p` to
    /// any point of the cap.
    pub(crate) fn min_distance_m(&self, p: Position) -> f64 {
        let gap = angle(self.centre, unit(p.lat(), p.lon())) - self.angle;
        (gap.max(0.0) * EARTH_RADIUS_M * (1.0 - 1e-12)).max(0.0)
    }
}

/// Caps of every region a map can name: the file's regions up front, the
/// `outside-<cell>` ones from their resolution-1 cell.
#[derive(Debug, Default)]
pub(crate) struct Caps {
    by_region: HashMap<RegionId, Cap>,
}

impl Caps {
    /// The caps of the regions of `map`.
    pub(crate) fn new(map: &RegionMap) -> Self {
        let by_region = map
            .regions()
            .iter()
            .filter_map(|r| Cap::of_cells(&r.cells).map(|c| (r.id.clone(), c)))
            .collect();
        Self { by_region }
    }

    /// The cap of `region`; `None` for a region with no cells, or an
    /// unknown id (which then cannot be pruned and is always asked).
    pub(crate) fn get(&self, region: &str) -> Option<Cap> {
        if let Some(c) = RegionId::new(region)
            .ok()
            .and_then(|id| self.by_region.get(&id))
        {
            return Some(*c);
        }
        let cell = CellIndex::from_str(region.strip_prefix("outside-")?).ok()?;
        Cap::of_cells(&[cell])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use h3o::{LatLng, Resolution};

    fn pos(lat: f64, lon: f64) -> Position {
        Position::new(lat, lon).unwrap()
    }

    /// The bound never exceeds the true distance to any point inside the
    /// cells: checked on a dense sample of points of the cells' interiors
    /// and boundaries, from query points near and far.
    #[test]
    fn the_bound_is_below_every_distance_into_the_region() {
        let origin = LatLng::new(41.88, -87.63)
            .unwrap()
            .to_cell(Resolution::Seven);
        let cells: Vec<CellIndex> = origin.grid_disk::<Vec<_>>(2);
        let cap = Cap::of_cells(&cells).unwrap();
        let mut inside = Vec::new();
        for &c in &cells {
            let ll = LatLng::from(c);
            inside.push(pos(ll.lat(), ll.lng()));
            for v in c.boundary().iter() {
                inside.push(pos(v.lat(), v.lng()));
            }
            // Children need not lie inside their parent: keep the points
            // that do fall in one of the cells.
            for child in c.children(Resolution::Ten) {
                let ll = LatLng::from(child);
                if cells.contains(&ll.to_cell(Resolution::Seven)) {
                    inside.push(pos(ll.lat(), ll.lng()));
                }
            }
        }
        let mut tight = 0;
        for (lat, lon) in [
            (41.88, -87.63),
            (41.95, -87.63),
            (41.88, -87.40),
            (42.5, -88.0),
            (-41.88, 92.37),
            (41.80, -87.70),
        ] {
            let q = pos(lat, lon);
            let bound = cap.min_distance_m(q);
            let truth = inside
                .iter()
                .map(|p| q.distance_m(*p))
                .fold(f64::INFINITY, f64::min);
            assert!(bound <= truth, "{q:?}: bound {bound} > {truth}");
            if bound > 0.0 && bound > truth * 0.5 {
                tight += 1;
            }
        }
        // And it prunes: far points get a useful bound.
        assert!(tight >= 2, "the bound is too loose to prune anything");
    }

    #[test]
    fn outside_regions_get_their_resolution_1_cell() {
        let caps = Caps::default();
        let cell = LatLng::new(0.0, 0.0).unwrap().to_cell(Resolution::One);
        let cap = caps.get(&format!("outside-{cell}")).unwrap();
        assert!(cap.min_distance_m(pos(0.0, 0.0)) <= 0.0);
        assert!(cap.min_distance_m(pos(45.0, 90.0)) > 1e6);
        assert!(caps.get("outside-nonsense").is_none());
        assert!(caps.get("chicago-1").is_none());
    }
}
