//! Zones: where drivers enter and leave, for `driver.entered` and
//! `driver.left`.
//!
//! A zone is a region of the region map (`--regions`), or a named zone of
//! the zone file (`--zones`, a `GeoJSON` `FeatureCollection` of `Polygon`
//! and `MultiPolygon` features: airports, stations, no-go areas). A point
//! on a zone's boundary is inside it; edges are straight lines in
//! longitude and latitude.
//!
//! # Tracking
//! Each driver's zones (its region, and the indices of the named zones
//! holding it) are kept with the `ts` of the update that put it there, in
//! 64 striped maps. An update compares its zones with those and keeps the
//! newer by `ts`, as the engine does, so two updates of one driver racing
//! each other announce the crossings of the one the engine kept. A driver
//! seen for the first time enters every zone it is in; one removed (by a
//! client, the TTL sweep or a handoff to another node) leaves them all.
//!
//! # Cost
//! Only with zones configured. Per applied update: one striped map probe,
//! a bounding-box test per named zone and a point-in-polygon test per box
//! hit, and the region of the new position. The region is found without
//! H3 while the driver stays in a disk around the centre of the partition
//! cell it was last found in, inside that cell (one haversine
//! distance); only a driver that leaves it costs an H3 cell and the
//! region map's lookup, which also give the next disk. Memory: one entry
//! per driver (its id, `ts`, region id, disk, and a list of named zones,
//! empty for most).

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::FixedState;
use geo::{BoundingRect, Intersects};
use h3o::{CellIndex, LatLng};
use hexmatch::{Driver, DriverId, Position, RegionId, RegionMap, Timestamp};
use serde_json::Value;

use crate::wire::{EventData, LatLon, ZoneCrossing, ZoneKind};

/// Striped maps of tracked drivers.
const STRIPES: usize = 64;

/// A named zone of the zone file.
#[derive(Debug)]
struct NamedZone {
    id: String,
    name: String,
    shape: geo::MultiPolygon<f64>,
    bbox: geo::Rect<f64>,
}

/// A disk inside a partition cell, around its centre: a position within
/// it is in that cell, and so in the cell's region.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Disk {
    centre: Position,
    radius_m: f64,
}

impl Disk {
    /// The disk of `cell`: its radius is 98 % of the least distance from
    /// the centre to an edge, each edge's distance the height of the
    /// triangle it makes with the centre (from the triangle's sides, as
    /// on a plane: a cell's few kilometres bend by far less than the 2 %
    /// margin).
    fn of(cell: CellIndex) -> Option<Self> {
        let c = LatLng::from(cell);
        let centre = Position::new(c.lat(), c.lng()).ok()?;
        let vertices: Vec<Position> = cell
            .boundary()
            .iter()
            .filter_map(|v| Position::new(v.lat(), v.lng()).ok())
            .collect();
        let n = vertices.len();
        if n < 3 {
            return None;
        }
        let mut least = f64::INFINITY;
        for i in 0..n {
            let (u, v) = (vertices[i], vertices[(i + 1) % n]);
            let (a, b, e) = (centre.distance_m(u), centre.distance_m(v), u.distance_m(v));
            let s = (a + b + e) / 2.0;
            let area = (s * (s - a) * (s - b) * (s - e)).max(0.0).sqrt();
            if e > 0.0 {
                least = least.min(2.0 * area / e);
            }
        }
        least.is_finite().then_some(Self {
            centre,
            radius_m: 0.98 * least,
        })
    }

    fn holds(self, p: Position) -> bool {
        self.centre.distance_m(p) < self.radius_m
    }
}

/// Where a driver was last seen.
#[derive(Debug)]
struct Tracked {
    ts: Timestamp,
    region: Option<RegionId>,
    /// A disk inside the cell the region was found for.
    disk: Option<Disk>,
    /// Indices of the named zones holding it, ascending.
    zones: Vec<u16>,
}

/// One zone a driver entered or left.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    /// Whether it entered (else left).
    pub entered: bool,
    /// The event's payload.
    pub crossing: ZoneCrossing,
}

impl Crossing {
    /// The event announcing it.
    pub fn into_event(self) -> EventData {
        if self.entered {
            EventData::DriverEntered(self.crossing)
        } else {
            EventData::DriverLeft(self.crossing)
        }
    }
}

/// The zones of a node and the drivers' places in them.
#[derive(Debug)]
pub struct Zones {
    /// Whether the regions of the region map count as zones.
    regions: bool,
    region_names: HashMap<RegionId, String>,
    named: Vec<NamedZone>,
    tracked: Vec<parking_lot::Mutex<HashMap<DriverId, Tracked, FixedState>>>,
    hasher: FixedState,
}

fn bad(msg: impl std::fmt::Display) -> String {
    format!("zone GeoJSON: {msg}")
}

/// A `GeoJSON` `Polygon` coordinate array as a geo polygon.
fn polygon(coords: &Value) -> Result<geo::Polygon<f64>, String> {
    let rings = coords
        .as_array()
        .ok_or_else(|| bad("a polygon is not an array of rings"))?;
    let mut rings = rings.iter().map(|ring| {
        let points = ring
            .as_array()
            .ok_or_else(|| bad("a ring is not an array of positions"))?;
        let coords = points
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([lon, lat, ..]) => match (lon.as_f64(), lat.as_f64()) {
                    (Some(lon), Some(lat)) if hexmatch::Position::new(lat, lon).is_ok() => {
                        Ok(geo::coord! { x: lon, y: lat })
                    }
                    _ => Err(bad(format!("position {p} is not a valid [lon, lat]"))),
                },
                _ => Err(bad(format!("position {p} is not [lon, lat]"))),
            })
            .collect::<Result<Vec<_>, String>>()?;
        if coords.len() < 4 {
            return Err(bad("a ring has fewer than 4 positions"));
        }
        Ok(geo::LineString::new(coords))
    });
    let exterior = rings.next().ok_or_else(|| bad("a polygon has no ring"))??;
    let holes = rings.collect::<Result<Vec<_>, String>>()?;
    Ok(geo::Polygon::new(exterior, holes))
}

fn shape(geometry: &Value) -> Result<geo::MultiPolygon<f64>, String> {
    let coords = &geometry["coordinates"];
    match geometry["type"].as_str() {
        Some("Polygon") => Ok(geo::MultiPolygon::new(vec![polygon(coords)?])),
        Some("MultiPolygon") => coords
            .as_array()
            .ok_or_else(|| bad("MultiPolygon coordinates are not an array"))?
            .iter()
            .map(polygon)
            .collect::<Result<Vec<_>, String>>()
            .map(geo::MultiPolygon::new),
        other => Err(bad(format!(
            "geometry type {other:?} is not Polygon or MultiPolygon"
        ))),
    }
}

impl Zones {
    /// Zones of `regions` (when given) and of the zone file's `GeoJSON`
    /// text (when given): zone ids are the features' `id` (else their
    /// index), names their `properties.name`. `None` when there are none.
    ///
    /// # Errors
    /// Malformed `GeoJSON`, a geometry that is not a polygon, a
    /// duplicate id, or more than 65,536 zones.
    pub fn new(regions: Option<&RegionMap>, geojson: Option<&str>) -> Result<Option<Self>, String> {
        let named = match geojson {
            None => Vec::new(),
            Some(text) => parse_named(text)?,
        };
        if regions.is_none() && named.is_empty() {
            return Ok(None);
        }
        let region_names = regions
            .map(|m| {
                m.regions()
                    .iter()
                    .map(|r| (r.id.clone(), r.name.clone()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Some(Self {
            regions: regions.is_some(),
            region_names,
            named,
            tracked: (0..STRIPES)
                .map(|_| parking_lot::Mutex::default())
                .collect(),
            hasher: FixedState::default(),
        }))
    }

    /// How many named zones there are.
    pub fn named_zones(&self) -> usize {
        self.named.len()
    }

    fn stripe(&self, id: &DriverId) -> &parking_lot::Mutex<HashMap<DriverId, Tracked, FixedState>> {
        let h = self.hasher.hash_one(id) as usize;
        &self.tracked[h % STRIPES]
    }

    /// The zones a driver at `d` is in; `was` (its last place) saves the
    /// region lookup while it stays in its disk.
    fn place(&self, d: &Driver, regions: Option<&RegionMap>, was: Option<&Tracked>) -> Tracked {
        let (region, disk) = match (self.regions, regions) {
            (true, Some(map)) => match was.and_then(|w| Some((w.region.clone(), w.disk?))) {
                Some((region, disk)) if disk.holds(d.pos) => (region, Some(disk)),
                _ => match LatLng::new(d.pos.lat(), d.pos.lon()) {
                    Ok(ll) => {
                        let cell = ll.to_cell(map.resolution());
                        (map.region_of_cell(cell).ok(), Disk::of(cell))
                    }
                    Err(_) => (None, None),
                },
            },
            _ => (None, None),
        };
        let point = geo::Point::new(d.pos.lon(), d.pos.lat());
        let zones = self
            .named
            .iter()
            .enumerate()
            .filter(|(_, z)| z.bbox.intersects(&point) && z.shape.intersects(&point))
            .map(|(i, _)| i as u16)
            .collect();
        Tracked {
            ts: d.ts,
            region,
            disk,
            zones,
        }
    }

    /// Records the driver as `d` (an update just applied) and returns the
    /// zones it entered and left since its last recorded update (nothing
    /// when a newer update of it was recorded first).
    pub fn track(&self, d: &Driver, regions: Option<&RegionMap>) -> Vec<Crossing> {
        let mut stripe = self.stripe(&d.id).lock();
        let was = stripe.get_mut(&d.id);
        if was.as_ref().is_some_and(|t| t.ts > d.ts) {
            return Vec::new();
        }
        let now = self.place(d, regions, was.as_deref());
        if let Some(t) = was
            && t.region == now.region
            && t.zones == now.zones
        {
            // Most updates: nothing crossed.
            *t = now;
            return Vec::new();
        }
        let was = stripe.insert(d.id.clone(), now).unwrap_or(Tracked {
            ts: d.ts,
            region: None,
            disk: None,
            zones: Vec::new(),
        });
        let Some(now) = stripe.get(&d.id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        self.diff(d, &was, now, false, &mut out);
        self.diff(d, now, &was, true, &mut out);
        out
    }

    /// Forgets a driver that is gone and returns the zones it left.
    pub fn forget(&self, d: &Driver) -> Vec<Crossing> {
        let Some(was) = self.stripe(&d.id).lock().remove(&d.id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let none = Tracked {
            ts: d.ts,
            region: None,
            disk: None,
            zones: Vec::new(),
        };
        self.diff(d, &was, &none, false, &mut out);
        out
    }

    /// Pushes a crossing for each zone of `a` not in `b` (`entered`: into
    /// `a`, else out of it).
    fn diff(&self, d: &Driver, a: &Tracked, b: &Tracked, entered: bool, out: &mut Vec<Crossing>) {
        let position = LatLon {
            lat: d.pos.lat(),
            lon: d.pos.lon(),
        };
        if let Some(r) = &a.region
            && b.region.as_ref() != Some(r)
        {
            out.push(Crossing {
                entered,
                crossing: ZoneCrossing {
                    driver_id: d.id.clone(),
                    zone: r.to_string(),
                    name: self.region_names.get(r).cloned().unwrap_or_default(),
                    kind: ZoneKind::Region,
                    position,
                },
            });
        }
        for &i in &a.zones {
            if b.zones.binary_search(&i).is_err()
                && let Some(z) = self.named.get(usize::from(i))
            {
                out.push(Crossing {
                    entered,
                    crossing: ZoneCrossing {
                        driver_id: d.id.clone(),
                        zone: z.id.clone(),
                        name: z.name.clone(),
                        kind: ZoneKind::Zone,
                        position,
                    },
                });
            }
        }
    }
}

fn parse_named(text: &str) -> Result<Vec<NamedZone>, String> {
    let doc: Value = serde_json::from_str(text).map_err(bad)?;
    let features = doc["features"]
        .as_array()
        .ok_or_else(|| bad("not a FeatureCollection"))?;
    if features.len() > usize::from(u16::MAX) + 1 {
        return Err(bad(format!("{} zones; at most 65536", features.len())));
    }
    let mut zones: Vec<NamedZone> = Vec::with_capacity(features.len());
    for (i, f) in features.iter().enumerate() {
        let id = match &f["id"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => i.to_string(),
        };
        if zones.iter().any(|z| z.id == id) {
            return Err(bad(format!("zone {id} appears twice")));
        }
        let shape = shape(&f["geometry"]).map_err(|e| format!("{e} (zone {id})"))?;
        let bbox = shape
            .bounding_rect()
            .ok_or_else(|| bad(format!("zone {id} is empty")))?;
        let name = f["properties"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        zones.push(NamedZone {
            id,
            name,
            shape,
            bbox,
        });
    }
    Ok(zones)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexmatch::{Capabilities, Position, Status, Vehicle};

    const SQUARE: &str = r#"{"type":"FeatureCollection","features":[
        {"type":"Feature","id":"airport","properties":{"name":"Airport"},
         "geometry":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,1],[0,0]]]}},
        {"type":"Feature","properties":{},
         "geometry":{"type":"Polygon","coordinates":[[[0.5,0.5],[2,0.5],[2,2],[0.5,2],[0.5,0.5]]]}}
    ]}"#;

    fn driver(lat: f64, lon: f64, ts: i64) -> Driver {
        Driver {
            id: DriverId::new("d1").unwrap(),
            pos: Position::new(lat, lon).unwrap(),
            ts: Timestamp::from_millis(ts).unwrap(),
            status: Status::Available,
            vehicle: Vehicle::default(),
            capabilities: Capabilities::NONE,
            order_id: None,
            reserved_until: None,
        }
    }

    fn names(c: &[Crossing]) -> Vec<(bool, String)> {
        c.iter()
            .map(|c| (c.entered, c.crossing.zone.clone()))
            .collect()
    }

    #[test]
    fn entering_leaving_and_the_boundary() {
        let z = Zones::new(None, Some(SQUARE)).unwrap().unwrap();
        // Outside both.
        assert!(z.track(&driver(5.0, 5.0, 1), None).is_empty());
        // On the airport's edge: inside it.
        assert_eq!(
            names(&z.track(&driver(0.0, 0.3, 2), None)),
            vec![(true, "airport".to_owned())]
        );
        // Into the overlap: enters zone 1 (by index), stays in the airport.
        assert_eq!(
            names(&z.track(&driver(0.75, 0.75, 3), None)),
            vec![(true, "1".to_owned())]
        );
        // A stale update changes nothing.
        assert!(z.track(&driver(5.0, 5.0, 2), None).is_empty());
        // Out of the airport, still in zone 1.
        assert_eq!(
            names(&z.track(&driver(1.5, 1.5, 4), None)),
            vec![(false, "airport".to_owned())]
        );
        // Removed: leaves what it was in.
        assert_eq!(
            names(&z.forget(&driver(1.5, 1.5, 5))),
            vec![(false, "1".to_owned())]
        );
        assert!(z.forget(&driver(1.5, 1.5, 6)).is_empty());
    }

    /// The point `m` metres from `p` on bearing `deg` (great circle).
    fn towards(p: Position, deg: f64, m: f64) -> Position {
        let (lat, lon, b) = (p.lat().to_radians(), p.lon().to_radians(), deg.to_radians());
        let d = m / hexmatch::EARTH_RADIUS_M;
        let lat2 = (lat.sin() * d.cos() + lat.cos() * d.sin() * b.cos()).asin();
        let lon2 = lon + (b.sin() * d.sin() * lat.cos()).atan2(d.cos() - lat.sin() * lat2.sin());
        let lon2 = (lon2.to_degrees() + 540.0) % 360.0 - 180.0;
        Position::new(lat2.to_degrees(), lon2).unwrap()
    }

    #[test]
    fn a_cell_s_disk_is_inside_the_cell() {
        // Cells all over the globe (pentagons included: every base cell's
        // children), at the partition resolutions in use.
        for res in [4u8, 6, 7, 8, 9] {
            let res = h3o::Resolution::try_from(res).unwrap();
            for base in CellIndex::base_cells() {
                let cell = base.center_child(res).unwrap();
                let disk = Disk::of(cell).unwrap();
                assert!(disk.radius_m > 0.0);
                for step in 0..72 {
                    let p = towards(disk.centre, f64::from(step) * 5.0, disk.radius_m);
                    let found = LatLng::new(p.lat(), p.lon()).unwrap().to_cell(res);
                    assert_eq!(found, cell, "{cell} at {res}: {p:?} on its disk's rim");
                }
            }
        }
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(Zones::new(None, Some("{}")).is_err());
        assert!(
            Zones::new(
                None,
                Some(r#"{"features":[{"geometry":{"type":"Point","coordinates":[0,0]}}]}"#)
            )
            .is_err()
        );
        assert!(Zones::new(None, None).unwrap().is_none());
    }
}
