//! Regions: named groups of partition cells, built from `GeoJSON` polygons.
//!
//! Each partition cell belongs to the region whose polygon contains the
//! cell's centre (h3o's `ContainsCentroid` tiling), so neighbouring regions
//! never share a cell and leave no gap along a shared border: every cell
//! whose centre is inside some polygon has exactly one region. Where
//! polygons overlap (simplified borders can leave slivers), the first
//! feature in the file wins. Cells in no polygon go to a default region
//! per resolution-1 parent cell (`outside-<cell>`), or are refused, as
//! chosen by [`Outside`].
//!
//! Regions must be coarse next to the partition cell: a polygon smaller
//! than about one cell may own none (see [`RegionMap::empty_regions`]).

use std::collections::HashMap;

use foldhash::fast::FixedState;
use h3o::geom::{ContainmentMode, TilerBuilder};
use h3o::{CellIndex, Resolution};
use serde_json::Value;

use crate::area::CellSet;
use crate::error::{Error, Result};
use crate::ids::RegionId;
use crate::position::Position;

/// What happens to a cell that lies in no region's polygon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outside {
    /// It belongs to a default region named after its resolution-1 parent cell.
    #[default]
    DefaultRegion,
    /// Positions there are refused ([`Error::InvalidPosition`]).
    Reject,
}

/// One region: its id, display name and cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Stable id (`<prefix>-<feature id>`).
    pub id: RegionId,
    /// The feature's `name` property, if any.
    pub name: String,
    /// Partition cells owned, sorted.
    pub cells: Vec<CellIndex>,
}

/// Partition cell → region, for one partition resolution.
#[derive(Debug, Clone)]
pub struct RegionMap {
    resolution: Resolution,
    regions: Vec<Region>,
    /// Each region's cells as an area, in `regions`' order: built once,
    /// handed out as a shared copy.
    areas: Vec<CellSet>,
    by_cell: HashMap<CellIndex, usize, FixedState>,
    outside: Outside,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidParameter(format!("region GeoJSON: {}", msg.into()))
}

/// The rings of a `GeoJSON` `Polygon` coordinate array as a geo polygon;
/// the error says what is wrong.
fn polygon(coords: &Value) -> std::result::Result<geo::Polygon<f64>, String> {
    let rings = coords
        .as_array()
        .ok_or("a polygon is not an array of rings")?;
    let mut rings = rings.iter().map(|ring| {
        let points = ring
            .as_array()
            .ok_or("a ring is not an array of positions")?;
        let coords = points
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([lon, lat, ..]) => match (lon.as_f64(), lat.as_f64()) {
                    (Some(lon), Some(lat)) if Position::new(lat, lon).is_ok() => {
                        Ok(geo::coord! { x: lon, y: lat })
                    }
                    _ => Err(format!("position {p} is not a valid [lon, lat]")),
                },
                _ => Err(format!("position {p} is not [lon, lat]")),
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Ok(geo::LineString::new(coords))
    });
    let exterior = rings.next().ok_or("a polygon has no ring")??;
    let holes = rings.collect::<std::result::Result<Vec<_>, String>>()?;
    Ok(geo::Polygon::new(exterior, holes))
}

/// The polygons of a `GeoJSON` `Polygon` or `MultiPolygon` geometry; the
/// error says what is wrong.
pub(crate) fn polygons(geometry: &Value) -> std::result::Result<Vec<geo::Polygon<f64>>, String> {
    let coords = &geometry["coordinates"];
    match geometry["type"].as_str() {
        Some("Polygon") => Ok(vec![polygon(coords)?]),
        Some("MultiPolygon") => coords
            .as_array()
            .ok_or("MultiPolygon coordinates are not an array")?
            .iter()
            .map(polygon)
            .collect(),
        other => Err(format!(
            "geometry type {other:?} is not Polygon or MultiPolygon"
        )),
    }
}

impl RegionMap {
    /// Builds the map from a `GeoJSON` `FeatureCollection` of `Polygon` or
    /// `MultiPolygon` features. Region ids are `<prefix>-<feature id>` (the
    /// feature's `id`, else its index); names come from `properties.name`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for malformed `GeoJSON`, a bad resolution or
    /// prefix, an invalid polygon, or a duplicate region id.
    pub fn from_geojson(
        text: &str,
        resolution: u8,
        prefix: &str,
        outside: Outside,
    ) -> Result<Self> {
        let resolution = Resolution::try_from(resolution)
            .map_err(|_| bad(format!("resolution {resolution} is not in 0..=15")))?;
        let doc: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let features = doc["features"]
            .as_array()
            .ok_or_else(|| bad("not a FeatureCollection"))?;
        let mut regions = Vec::with_capacity(features.len());
        let mut by_cell: HashMap<CellIndex, usize, FixedState> = HashMap::default();
        for (i, f) in features.iter().enumerate() {
            let key = match &f["id"] {
                Value::Number(n) => n.to_string(),
                Value::String(s) => s.clone(),
                _ => i.to_string(),
            };
            let id = RegionId::new(&format!("{prefix}-{key}"))?;
            if regions.iter().any(|r: &Region| r.id == id) {
                return Err(bad(format!("region {id} appears twice")));
            }
            let mut tiler = TilerBuilder::new(resolution)
                .containment_mode(ContainmentMode::ContainsCentroid)
                .build();
            for p in polygons(&f["geometry"]).map_err(bad)? {
                tiler.add(p).map_err(|e| bad(format!("region {id}: {e}")))?;
            }
            let index = regions.len();
            let mut cells: Vec<CellIndex> = tiler
                .into_coverage()
                .filter(|c| *by_cell.entry(*c).or_insert(index) == index)
                .collect();
            cells.sort_unstable();
            cells.dedup();
            let name = f["properties"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            regions.push(Region { id, name, cells });
        }
        let areas = regions
            .iter()
            .map(|r| CellSet::new(resolution, r.cells.iter().copied()))
            .collect::<Result<_>>()?;
        Ok(Self {
            resolution,
            regions,
            areas,
            by_cell,
            outside,
        })
    }

    /// The regions, in file order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Regions whose polygons are too small to own any cell at this resolution.
    pub fn empty_regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(|r| r.cells.is_empty())
    }

    /// The partition resolution the map was built for.
    pub fn resolution(&self) -> Resolution {
        self.resolution
    }

    /// The region of a partition cell (of this map's resolution).
    ///
    /// # Errors
    /// [`Error::InvalidPosition`] for a cell in no region under
    /// [`Outside::Reject`]; [`Error::InvalidParameter`] for a cell of
    /// another resolution.
    pub fn region_of_cell(&self, cell: CellIndex) -> Result<RegionId> {
        if cell.resolution() != self.resolution {
            return Err(Error::InvalidParameter(format!(
                "cell {cell} is at resolution {}, the region map at {}",
                cell.resolution(),
                self.resolution
            )));
        }
        if let Some(&i) = self.by_cell.get(&cell) {
            return Ok(self.regions[i].id.clone());
        }
        match self.outside {
            Outside::Reject => Err(Error::InvalidPosition(format!(
                "cell {cell} is in no region"
            ))),
            Outside::DefaultRegion => {
                let parent = cell.parent(Resolution::One).unwrap_or(cell);
                RegionId::new(&format!("outside-{parent}"))
            }
        }
    }

    /// The partition cells of region `id`, as an area: a named region's
    /// cells, or those of a default region (`outside-<cell>`: the cells
    /// under that resolution-1 cell that no polygon owns). `None` for an
    /// id that names no region of this map.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a default region of more than a
    /// million partition cells (a partition resolution above 8).
    pub fn cells_of(&self, id: &RegionId) -> Result<Option<CellSet>> {
        if let Some(at) = self.regions.iter().position(|r| r.id == *id) {
            return Ok(self.areas.get(at).cloned());
        }
        let Some(parent) = id
            .as_str()
            .strip_prefix("outside-")
            .and_then(|c| c.parse::<CellIndex>().ok())
            .filter(|c| {
                c.resolution() == Resolution::One && self.outside == Outside::DefaultRegion
            })
        else {
            return Ok(None);
        };
        if parent.children_count(self.resolution) > 1_000_000 {
            return Err(Error::InvalidParameter(format!(
                "region {id} holds more than a million partition cells; \
                 name a region of the map instead"
            )));
        }
        CellSet::new(
            self.resolution,
            parent
                .children(self.resolution)
                .filter(|c| !self.by_cell.contains_key(c)),
        )
        .map(Some)
    }

    /// The region of a position.
    ///
    /// # Errors
    /// As [`region_of_cell`](Self::region_of_cell).
    pub fn region_of(&self, pos: Position) -> Result<RegionId> {
        self.region_of_cell(pos.cell(self.resolution))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> String {
        std::fs::read_to_string(format!("{}/../data/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    /// Ray casting on the plane of lon/lat: inside an odd number of rings.
    fn inside(poly: &geo::Polygon<f64>, lon: f64, lat: f64) -> bool {
        let ring_hits = |ring: &geo::LineString<f64>| {
            ring.lines()
                .filter(|l| {
                    let (a, b) = (l.start, l.end);
                    (a.y > lat) != (b.y > lat)
                        && lon < a.x + (lat - a.y) * (b.x - a.x) / (b.y - a.y)
                })
                .count()
        };
        let hits =
            ring_hits(poly.exterior()) + poly.interiors().iter().map(ring_hits).sum::<usize>();
        hits % 2 == 1
    }

    #[test]
    fn boroughs_partition_cells_and_match_point_in_polygon() {
        let text = data("nyc_boroughs.geojson");
        let map = RegionMap::from_geojson(&text, 7, "nyc", Outside::DefaultRegion).unwrap();
        let ids: Vec<&str> = map.regions().iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["nyc-1", "nyc-2", "nyc-3", "nyc-4", "nyc-5"]);
        assert_eq!(map.regions()[0].name, "Manhattan");
        assert_eq!(map.empty_regions().count(), 0);
        // No cell in two regions.
        let total: usize = map.regions().iter().map(|r| r.cells.len()).sum();
        assert_eq!(total, map.by_cell.len());
        // Oracle: a cell's region is the borough whose polygon holds its centre.
        let doc: Value = serde_json::from_str(&text).unwrap();
        let boroughs: Vec<Vec<geo::Polygon<f64>>> = doc["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| polygons(&f["geometry"]).unwrap())
            .collect();
        for region in map.regions() {
            for cell in &region.cells {
                let c = h3o::LatLng::from(*cell);
                let owner = boroughs
                    .iter()
                    .position(|b| b.iter().any(|p| inside(p, c.lng(), c.lat())));
                assert_eq!(
                    owner.map(|i| format!("nyc-{}", i + 1)).as_deref(),
                    Some(region.id.as_str()),
                    "{cell}"
                );
            }
        }
        // The harbour is in no borough: a default region, or refused.
        let harbour = Position::new(40.66, -74.05).unwrap();
        assert!(
            map.region_of(harbour)
                .unwrap()
                .as_str()
                .starts_with("outside-")
        );
        let strict = RegionMap::from_geojson(&text, 7, "nyc", Outside::Reject).unwrap();
        assert_eq!(
            strict.region_of(harbour).unwrap_err().code(),
            "invalid_position"
        );
        let times_square = Position::new(40.758, -73.9855).unwrap();
        assert_eq!(strict.region_of(times_square).unwrap().as_str(), "nyc-1");
    }

    /// A named region's cells are its own; a default region's are the
    /// cells under its resolution-1 cell that no polygon owns.
    #[test]
    fn cells_of_named_and_default_regions() {
        let map = RegionMap::from_geojson(
            &data("nyc_boroughs.geojson"),
            6,
            "nyc",
            Outside::DefaultRegion,
        )
        .unwrap();
        let manhattan = &map.regions()[0];
        let set = map.cells_of(&manhattan.id).unwrap().unwrap();
        assert_eq!(set.cells(), &manhattan.cells[..]);
        let outside_pos = Position::new(40.9, -73.2).unwrap();
        let outside = map.region_of(outside_pos).unwrap();
        assert!(outside.as_str().starts_with("outside-"), "{outside}");
        let set = map.cells_of(&outside).unwrap().unwrap();
        assert!(set.contains(outside_pos.cell(Resolution::Six)));
        assert!(set.cells().iter().all(|c| !map.by_cell.contains_key(c)));
        assert!(
            set.cells()
                .iter()
                .all(|c| map.region_of_cell(*c).unwrap() == outside)
        );
        assert_eq!(
            map.cells_of(&RegionId::new("nyc-9").unwrap()).unwrap(),
            None
        );
        // A default region nobody's position named yet has its cells too.
        let elsewhere = RegionId::new("outside-8126fffffffffff").unwrap();
        let set = map.cells_of(&elsewhere).unwrap().unwrap();
        assert!(!set.cells().is_empty());
    }

    #[test]
    fn small_polygons_own_no_cell_at_a_coarse_resolution() {
        let text = data("chicago_community_areas.geojson");
        let coarse = RegionMap::from_geojson(&text, 6, "chi", Outside::DefaultRegion).unwrap();
        let fine = RegionMap::from_geojson(&text, 9, "chi", Outside::DefaultRegion).unwrap();
        assert!(
            coarse.empty_regions().count() > 20,
            "most community areas are smaller than a res-6 cell"
        );
        assert_eq!(fine.empty_regions().count(), 0);
        assert_eq!(fine.regions().len(), 77);
    }

    #[test]
    fn malformed_geojson_is_refused_with_a_reason() {
        for bad_doc in [
            "",
            "{}",
            r#"{"features": [{"geometry": {"type": "Point", "coordinates": [0, 0]}}]}"#,
            r#"{"features": [{"geometry": {"type": "Polygon", "coordinates": [[[0, 95], [1, 1], [0, 0]]]}}]}"#,
            r#"{"features": [{"id": 1, "geometry": {"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,0]]]}}, {"id": 1, "geometry": {"type": "Polygon", "coordinates": [[[0,0],[1,0],[1,1],[0,0]]]}}]}"#,
        ] {
            let err = RegionMap::from_geojson(bad_doc, 6, "x", Outside::Reject).unwrap_err();
            assert_eq!(err.code(), "invalid_parameter", "{bad_doc}");
        }
        assert!(RegionMap::from_geojson("{\"features\": []}", 16, "x", Outside::Reject).is_err());
    }
}
