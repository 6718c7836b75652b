//! Area queries: the drivers inside a latitude/longitude box, a polygon or
//! a region's partition cells, filtered by status, vehicle and
//! capabilities, listed by driver id a page at a time; and counts per H3
//! cell of a box, at any resolution.
//!
//! # Shapes and their edges
//! - [`LatLonBox`]: `west ≤ lon ≤ east` and `south ≤ lat ≤ north`, edges
//!   included. A box whose `west` is east of its `east` crosses the
//!   antimeridian (`lon ≥ west` or `lon ≤ east`).
//! - [`AreaPolygon`]: a `GeoJSON` `Polygon` or `MultiPolygon`, its edges
//!   straight lines in longitude/latitude as RFC 7946 defines them, holes
//!   excluded; a point on an edge or a vertex (of the outer ring or of a
//!   hole) is inside. The test is `geo`'s, on exact orientation
//!   predicates, so "on the edge" is decided without rounding.
//! - [`CellSet`]: the partition cells of a region. A driver is inside when
//!   its shard's cell is in the set, which is how a region owns a driver
//!   everywhere else (routing, ownership, statistics); no geometry is
//!   tested.
//!
//! # Algorithm
//! A box or a polygon is first bounded by a box of unit vectors
//! ([`LatLonBox::unit_box`], exact bounds of the trigonometry, widened by
//! a rounding margin); the top-level tree of cell boxes yields every shard
//! whose cell box meets it (a cell box contains its cell, so no shard that
//! holds a driver inside is missed). A region's cells are looked up
//! directly. Each candidate shard is then read under its read lock, one
//! at a time, and every record is tested exactly.
//!
//! A page keeps the drivers whose id follows the cursor, and of those the
//! `limit` smallest ids (a selection, not a sort of everything): O(n) for
//! the n drivers in the candidate shards, plus O(limit · log limit).
//! Listing by id makes the cursor stable while drivers move: a page never
//! repeats an id of an earlier page, and a driver present from the first
//! page to the last, and inside the area throughout, appears exactly once.

use std::sync::Arc;

use geo::{BoundingRect, Intersects};
use h3o::{CellIndex, Resolution};
use rstar::AABB;
use serde_json::Value;

use crate::driver::{Capabilities, Driver, Status, Vehicle};
use crate::error::{Error, Result};
use crate::filter::Traits;
use crate::ids::DriverId;
use crate::index::{Index, Record, Shard, StatusCounts};
use crate::position::Position;

/// The largest page an area query returns.
pub const MAX_AREA_LIMIT: usize = 10_000;

/// A latitude/longitude box, edges included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLonBox {
    west: f64,
    south: f64,
    east: f64,
    north: f64,
}

impl LatLonBox {
    /// The box from `west` to `east` and `south` to `north`, in degrees.
    /// `west > east` is a box across the antimeridian.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a corner that is not a valid
    /// position, or `south > north`.
    pub fn new(west: f64, south: f64, east: f64, north: f64) -> Result<Self> {
        for (lat, lon) in [(south, west), (north, east)] {
            Position::new(lat, lon).map_err(|_| {
                Error::InvalidParameter(format!(
                    "bbox corner lon {lon}, lat {lat} is not a valid position \
                     (lon in -180..=180, lat in -90..=90)"
                ))
            })?;
        }
        if south > north {
            return Err(Error::InvalidParameter(format!(
                "bbox south {south} is north of its north {north}"
            )));
        }
        Ok(Self {
            west,
            south,
            east,
            north,
        })
    }

    /// Western edge, degrees.
    pub const fn west(&self) -> f64 {
        self.west
    }

    /// Southern edge, degrees.
    pub const fn south(&self) -> f64 {
        self.south
    }

    /// Eastern edge, degrees.
    pub const fn east(&self) -> f64 {
        self.east
    }

    /// Northern edge, degrees.
    pub const fn north(&self) -> f64 {
        self.north
    }

    /// Whether the box holds `p` (edges included).
    pub fn contains(&self, p: Position) -> bool {
        let (lat, lon) = (p.lat(), p.lon());
        let lon_in = if self.west <= self.east {
            self.west <= lon && lon <= self.east
        } else {
            lon >= self.west || lon <= self.east
        };
        lon_in && self.south <= lat && lat <= self.north
    }

    /// A box of unit vectors holding every point of this box. Each
    /// coordinate of a unit vector is a product of a latitude factor
    /// (`cos lat` or `sin lat`) and a longitude factor: their ranges over
    /// the box are those at the edges, widened to ±1 (or 1 for `cos lat`)
    /// where an extreme of the function lies inside, and the product of two
    /// ranges is bounded by the products of their ends.
    pub(crate) fn unit_box(&self) -> AABB<[f64; 3]> {
        const MARGIN: f64 = 1e-9;
        let east = if self.west <= self.east {
            self.east
        } else {
            self.east + 360.0
        };
        // Whether some angle `at + 360 k` lies in [lo, hi] (degrees).
        let holds = |at: f64, lo: f64, hi: f64| ((lo - at) / 360.0).ceil() * 360.0 + at <= hi;
        let range = |f: fn(f64) -> f64, lo: f64, hi: f64, max_at: f64, min_at: f64| {
            let (a, b) = (f(lo.to_radians()), f(hi.to_radians()));
            let top = if holds(max_at, lo, hi) { 1.0 } else { a.max(b) };
            let bottom = if holds(min_at, lo, hi) {
                -1.0
            } else {
                a.min(b)
            };
            (bottom, top)
        };
        let cos_lon = range(f64::cos, self.west, east, 0.0, 180.0);
        let sin_lon = range(f64::sin, self.west, east, 90.0, -90.0);
        // Latitudes never wrap: cos lat ≥ 0, with its top at the equator.
        let cos_lat = range(f64::cos, self.south, self.north, 0.0, 180.0);
        let (slo, shi) = (self.south.to_radians().sin(), self.north.to_radians().sin());
        let product = |(a, b): (f64, f64), (c, d): (f64, f64)| {
            let p = [a * c, a * d, b * c, b * d];
            (
                p.iter().copied().fold(f64::INFINITY, f64::min),
                p.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let x = product(cos_lat, cos_lon);
        let y = product(cos_lat, sin_lon);
        AABB::from_corners(
            [x.0 - MARGIN, y.0 - MARGIN, slo - MARGIN],
            [x.1 + MARGIN, y.1 + MARGIN, shi + MARGIN],
        )
    }
}

/// A `GeoJSON` `Polygon` or `MultiPolygon` (edges straight in
/// longitude/latitude; a point on an edge is inside).
#[derive(Debug, Clone, PartialEq)]
pub struct AreaPolygon {
    parts: Vec<geo::Polygon<f64>>,
    bounds: LatLonBox,
}

impl AreaPolygon {
    /// Reads a `GeoJSON` geometry object (`{"type": "Polygon", "coordinates":
    /// …}`, or `MultiPolygon`), or a `Feature` holding one.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming what is wrong: another geometry
    /// type, a ring of fewer than four positions or not closed, a position
    /// that is not `[lon, lat]` in range.
    pub fn from_geojson(geometry: &Value) -> Result<Self> {
        let bad = |msg: String| Error::InvalidParameter(format!("polygon: {msg}"));
        let geometry = match geometry["type"].as_str() {
            Some("Feature") => &geometry["geometry"],
            _ => geometry,
        };
        let parts = crate::region::polygons(geometry).map_err(bad)?;
        for ring in parts
            .iter()
            .flat_map(|p| std::iter::once(p.exterior()).chain(p.interiors()))
        {
            // `geo` closes an open ring itself; RFC 7946 requires it closed.
            let given = ring.0.len();
            if given < 4 {
                return Err(bad(format!(
                    "a ring has {given} positions; a closed ring needs at least 4"
                )));
            }
        }
        let rect = parts
            .iter()
            .filter_map(BoundingRect::bounding_rect)
            .reduce(|a, b| {
                geo::Rect::new(
                    geo::coord! { x: a.min().x.min(b.min().x), y: a.min().y.min(b.min().y) },
                    geo::coord! { x: a.max().x.max(b.max().x), y: a.max().y.max(b.max().y) },
                )
            })
            .ok_or_else(|| bad("no polygon".to_owned()))?;
        let bounds = LatLonBox::new(rect.min().x, rect.min().y, rect.max().x, rect.max().y)?;
        Ok(Self { parts, bounds })
    }

    /// The smallest latitude/longitude box around it.
    pub fn bounds(&self) -> LatLonBox {
        self.bounds
    }

    /// Whether the polygon holds `p` (edges and vertices included).
    pub fn contains(&self, p: Position) -> bool {
        let c = geo::coord! { x: p.lon(), y: p.lat() };
        self.bounds.contains(p) && self.parts.iter().any(|part| part.intersects(&c))
    }
}

/// A set of partition cells (a region's), at the engine's resolution.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CellSet {
    resolution: Resolution,
    cells: Arc<[CellIndex]>,
}

impl CellSet {
    /// The set of `cells`, all at `resolution`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a cell at another resolution.
    pub fn new(resolution: Resolution, cells: impl IntoIterator<Item = CellIndex>) -> Result<Self> {
        let mut cells: Vec<CellIndex> = cells.into_iter().collect();
        if let Some(c) = cells.iter().find(|c| c.resolution() != resolution) {
            return Err(Error::InvalidParameter(format!(
                "cell {c} is at resolution {}, the set at {resolution}",
                c.resolution()
            )));
        }
        cells.sort_unstable();
        cells.dedup();
        Ok(Self {
            resolution,
            cells: cells.into(),
        })
    }

    /// The resolution of its cells.
    pub fn resolution(&self) -> Resolution {
        self.resolution
    }

    /// Its cells, sorted.
    pub fn cells(&self) -> &[CellIndex] {
        &self.cells
    }

    /// Whether `cell` is one of them.
    pub fn contains(&self, cell: CellIndex) -> bool {
        self.cells.binary_search(&cell).is_ok()
    }

    /// Checks that the set is of the index's partition resolution.
    pub(crate) fn check_resolution(&self, index: Resolution) -> Result<()> {
        if self.resolution == index {
            Ok(())
        } else {
            Err(Error::InvalidParameter(format!(
                "the area's cells are at resolution {}, the engine's partition at {index}",
                self.resolution
            )))
        }
    }
}

/// Where an area query looks.
#[derive(Debug, Clone, PartialEq)]
pub enum Area {
    /// A latitude/longitude box.
    Box(LatLonBox),
    /// A polygon.
    Polygon(AreaPolygon),
    /// Partition cells (a region's).
    Cells(CellSet),
}

impl Area {
    /// Whether a driver at `p`, in partition cell `cell`, is inside.
    fn holds(&self, cell: CellIndex, p: Position) -> bool {
        match self {
            Self::Box(b) => b.contains(p),
            Self::Polygon(poly) => poly.contains(p),
            Self::Cells(set) => set.contains(cell),
        }
    }

    /// Every shard that may hold a driver inside, each once.
    fn shards(&self, index: &Index) -> Result<Vec<Arc<Shard>>> {
        let within = |b: &LatLonBox| index.shards_meeting(&b.unit_box());
        match self {
            Self::Box(b) => Ok(within(b)),
            Self::Polygon(poly) => Ok(within(&poly.bounds)),
            Self::Cells(set) => {
                set.check_resolution(index.resolution())?;
                Ok(index.shards_of(set.cells()))
            }
        }
    }
}

/// Which statuses an area query keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSet(u8);

impl StatusSet {
    /// Every status.
    pub const ALL: Self = Self(0b1111);

    /// Exactly these statuses.
    pub fn of(statuses: impl IntoIterator<Item = Status>) -> Self {
        Self(statuses.into_iter().fold(0, |acc, s| acc | Self::bit(s)))
    }

    const fn bit(s: Status) -> u8 {
        match s {
            Status::Available => 1,
            Status::Reserved => 2,
            Status::Busy => 4,
            Status::Offline => 8,
        }
    }

    /// Whether it keeps `s`.
    pub const fn contains(self, s: Status) -> bool {
        self.0 & Self::bit(s) != 0
    }

    /// Whether it keeps nothing.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// One page of the drivers inside an area.
#[derive(Debug, Clone, PartialEq)]
pub struct AreaQuery {
    /// Where to look.
    pub area: Area,
    /// Which statuses to keep.
    pub statuses: StatusSet,
    /// Only this vehicle class, if set.
    pub vehicle: Option<Vehicle>,
    /// Only drivers having all of these.
    pub capabilities: Capabilities,
    /// Only drivers whose id sorts after this one (the previous page's
    /// [`AreaPage::next`]).
    pub after: Option<DriverId>,
    /// The most drivers to return, `1..=MAX_AREA_LIMIT`.
    pub limit: usize,
}

impl AreaQuery {
    /// The first page of every driver in `area`, up to `limit`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `1 <= limit <= MAX_AREA_LIMIT`.
    pub fn new(area: Area, limit: usize) -> Result<Self> {
        let q = Self {
            area,
            statuses: StatusSet::ALL,
            vehicle: None,
            capabilities: Capabilities::NONE,
            after: None,
            limit,
        };
        q.validate()?;
        Ok(q)
    }

    fn validate(&self) -> Result<()> {
        if (1..=MAX_AREA_LIMIT).contains(&self.limit) {
            Ok(())
        } else {
            Err(Error::InvalidParameter(format!(
                "limit = {} is not in 1..={MAX_AREA_LIMIT}",
                self.limit
            )))
        }
    }

    fn keeps(&self, rec: &Record, required: Traits) -> bool {
        self.statuses.contains(rec.status)
            && rec.traits().has(required)
            && self.after.as_ref().is_none_or(|after| rec.id > *after)
    }
}

/// One page of an area query: drivers by id.
#[derive(Debug, Clone, PartialEq)]
pub struct AreaPage {
    /// The drivers, by id (order and reservation not filled in; the engine
    /// fills them).
    pub drivers: Vec<Driver>,
    /// The cursor of the next page (the last id here), if more drivers
    /// were inside.
    pub next: Option<DriverId>,
}

/// The page of `q` in `index`.
pub(crate) fn within(index: &Index, q: &AreaQuery) -> Result<AreaPage> {
    q.validate()?;
    let required = Traits::required(q.vehicle, q.capabilities);
    let mut found: Vec<Driver> = Vec::new();
    if q.statuses.is_empty() {
        return Ok(AreaPage {
            drivers: found,
            next: None,
        });
    }
    for shard in q.area.shards(index)? {
        let data = shard.data.read();
        found.extend(
            data.records()
                .filter(|rec| q.keeps(rec, required) && q.area.holds(shard.cell, rec.pos))
                .map(Record::to_driver),
        );
        // Keep the memory of a large area bounded by twice the page.
        if found.len() > 2 * q.limit.max(1024) {
            keep_smallest(&mut found, q.limit + 1);
        }
    }
    keep_smallest(&mut found, q.limit + 1);
    found.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    let next = if found.len() > q.limit {
        found.truncate(q.limit);
        found.last().map(|d| d.id.clone())
    } else {
        None
    };
    Ok(AreaPage {
        drivers: found,
        next,
    })
}

/// Keeps the `n` drivers of smallest id, in no order.
fn keep_smallest(drivers: &mut Vec<Driver>, n: usize) {
    if drivers.len() > n {
        drivers.select_nth_unstable_by(n, |a, b| a.id.cmp(&b.id));
        drivers.truncate(n);
    }
}

/// Counts by status of the drivers inside `area` (any status, no filter).
pub(crate) fn counts_within(index: &Index, area: &Area) -> Result<StatusCounts> {
    let mut counts = StatusCounts::default();
    for shard in area.shards(index)? {
        let data = shard.data.read();
        if let Area::Cells(_) = area {
            // The whole shard is inside.
            counts.add(&data.counts);
        } else {
            for rec in data.records().filter(|r| area.holds(shard.cell, r.pos)) {
                counts.count(rec.status);
            }
        }
    }
    Ok(counts)
}

/// The most cells a density answer may hold.
pub const MAX_DENSITY_CELLS: usize = 100_000;

/// Counts by status of the drivers inside `area`, per H3 cell of
/// `resolution` (the cell holding each driver's position, as h3o's
/// `LatLng::to_cell` finds it: a cell's parent does not hold all of its
/// points, so partition cells are not rolled up), sorted by cell.
///
/// # Errors
/// [`Error::InvalidParameter`] when the answer would exceed
/// [`MAX_DENSITY_CELLS`] cells (choose a coarser resolution or a smaller
/// box).
pub(crate) fn density(
    index: &Index,
    area: &LatLonBox,
    resolution: Resolution,
) -> Result<Vec<(CellIndex, StatusCounts)>> {
    let mut per_cell: std::collections::BTreeMap<CellIndex, StatusCounts> =
        std::collections::BTreeMap::new();
    for shard in index.shards_meeting(&area.unit_box()) {
        let data = shard.data.read();
        for rec in data.records().filter(|r| area.contains(r.pos)) {
            per_cell
                .entry(rec.pos.cell(resolution))
                .or_default()
                .count(rec.status);
        }
        if per_cell.len() > MAX_DENSITY_CELLS {
            return Err(Error::InvalidParameter(format!(
                "more than {MAX_DENSITY_CELLS} cells of resolution {resolution} hold drivers \
                 in the box; choose a coarser resolution or a smaller box"
            )));
        }
    }
    Ok(per_cell.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::pos;

    fn unit(lat: f64, lon: f64) -> [f64; 3] {
        pos(lat, lon).to_unit_vector()
    }

    fn in_box(b: &AABB<[f64; 3]>, v: [f64; 3]) -> bool {
        (0..3).all(|i| b.lower()[i] <= v[i] && v[i] <= b.upper()[i])
    }

    /// The unit box holds every point of its box, over boxes all over the
    /// globe: across the antimeridian, the equator, to the poles.
    #[test]
    fn unit_boxes_hold_their_boxes() {
        let boxes = [
            (-87.9, 41.6, -87.5, 42.1),
            (170.0, -20.0, -170.0, 10.0),
            (-180.0, -90.0, 180.0, 90.0),
            (-10.0, -5.0, 10.0, 5.0),
            (80.0, 60.0, 100.0, 90.0),
            (-100.0, -90.0, -80.0, -85.0),
            (179.9, 0.0, -179.9, 0.1),
            (0.0, 0.0, 0.0, 0.0),
            (-1.0, 10.0, 359.0 - 360.0, 20.0),
        ];
        for (w, s, e, n) in boxes {
            let b = LatLonBox::new(w, s, e, n).unwrap();
            let ub = b.unit_box();
            let span = if w <= e { e - w } else { e + 360.0 - w };
            for i in 0..=40 {
                for j in 0..=40 {
                    let lat = s + (n - s) * f64::from(i) / 40.0;
                    let mut lon = w + span * f64::from(j) / 40.0;
                    if lon > 180.0 {
                        lon -= 360.0;
                    }
                    assert!(b.contains(pos(lat, lon)), "{lat} {lon} outside {b:?}");
                    assert!(in_box(&ub, unit(lat, lon)), "{lat} {lon} of {b:?}");
                }
            }
        }
    }

    #[test]
    fn a_box_across_the_antimeridian_holds_both_sides() {
        let b = LatLonBox::new(170.0, -10.0, -170.0, 10.0).unwrap();
        assert!(b.contains(pos(0.0, 175.0)));
        assert!(b.contains(pos(0.0, -175.0)));
        assert!(b.contains(pos(10.0, 170.0)), "edges are inside");
        assert!(!b.contains(pos(0.0, 0.0)));
        assert!(!b.contains(pos(10.5, 175.0)));
    }

    #[test]
    fn bad_boxes_are_refused_by_name() {
        let e = LatLonBox::new(-87.0, 42.0, -86.0, 41.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid parameter: bbox south 42 is north of its north 41"
        );
        let e = LatLonBox::new(-190.0, 41.0, -86.0, 42.0).unwrap_err();
        assert!(e.to_string().contains("lon -190, lat 41"), "{e}");
    }

    #[test]
    fn polygon_edges_vertices_and_holes() {
        let doc: Value = serde_json::json!({
            "type": "Polygon",
            "coordinates": [
                [[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0], [0.0, 0.0]],
                [[1.0, 1.0], [2.0, 1.0], [2.0, 2.0], [1.0, 2.0], [1.0, 1.0]]
            ]
        });
        let p = AreaPolygon::from_geojson(&doc).unwrap();
        assert!(p.contains(pos(0.0, 0.0)), "a vertex");
        assert!(p.contains(pos(0.0, 2.5)), "an edge");
        assert!(p.contains(pos(3.0, 3.0)));
        assert!(!p.contains(pos(1.5, 1.5)), "in the hole");
        assert!(p.contains(pos(1.0, 1.5)), "on the hole's edge");
        assert!(!p.contains(pos(4.000_001, 2.0)));
    }

    #[test]
    fn bad_polygons_are_refused_by_name() {
        let cases = [
            (
                serde_json::json!({"type": "Point", "coordinates": [0.0, 0.0]}),
                "polygon: geometry type Some(\"Point\") is not Polygon or MultiPolygon",
            ),
            (
                serde_json::json!({"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]}),
                "polygon: a ring has 3 positions; a closed ring needs at least 4",
            ),
            (
                serde_json::json!({"type": "Polygon", "coordinates": [[[0.0, 0.0], [1.0, 95.0], [1.0, 1.0], [0.0, 0.0]]]}),
                "polygon: position [1.0,95.0] is not a valid [lon, lat]",
            ),
        ];
        for (doc, want) in cases {
            let e = AreaPolygon::from_geojson(&doc).unwrap_err();
            assert_eq!(e.to_string(), format!("invalid parameter: {want}"));
        }
    }
}
