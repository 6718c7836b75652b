//! Helpers shared by hexmatch's integration tests: brute-force oracles for
//! nearest and area queries, and loaders for the sample data in `data/`.

pub mod http;

use std::path::PathBuf;

use hexmatch::{
    Capabilities, CellIndex, Driver, DriverId, DriverUpdate, Engine, NearestQuery, Position,
    Resolution, Status, Timestamp, Vehicle,
};

/// The H3 cell of a position, straight from h3o.
pub fn cell_of(pos: Position, res: Resolution) -> CellIndex {
    h3o::LatLng::new(pos.lat(), pos.lon())
        .expect("a valid position is a valid LatLng")
        .to_cell(res)
}

/// The brute-force answer to a nearest query: every eligible driver ranked
/// by haversine metres, ties by id, the first `k` within the limit (and
/// within the query's cells, if it names them).
pub fn oracle_nearest(
    drivers: &[Driver],
    q: &NearestQuery,
    max_radius_m: f64,
) -> Vec<(DriverId, f64)> {
    let limit = q.radius_m.unwrap_or(max_radius_m);
    let mut all: Vec<(DriverId, f64)> = drivers
        .iter()
        .filter(|d| d.status == Status::Available)
        .filter(|d| q.vehicle.is_none_or(|v| v == d.vehicle))
        .filter(|d| d.capabilities.contains(q.capabilities))
        .filter(|d| {
            q.within
                .as_ref()
                .is_none_or(|cells| cells.contains(cell_of(d.pos, cells.resolution())))
        })
        .map(|d| (d.id.clone(), q.pos.distance_m(d.pos)))
        .filter(|(_, dist)| *dist <= limit)
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(q.k);
    all
}

/// A shape of an area query, as the oracle sees it: longitude/latitude
/// pairs, tested with nothing but comparisons and cross products.
#[derive(Debug, Clone)]
pub enum OracleShape {
    /// West, south, east, north (west > east: across the antimeridian).
    Box(f64, f64, f64, f64),
    /// Rings of `(lon, lat)`, closed; the first is the outer one, the rest holes.
    Polygon(Vec<Vec<(f64, f64)>>),
    /// Partition cells.
    Cells(Vec<CellIndex>),
}

impl OracleShape {
    /// Whether `p` is inside (edges and vertices included).
    pub fn holds(&self, p: Position) -> bool {
        let (x, y) = (p.lon(), p.lat());
        match self {
            Self::Box(w, s, e, n) => {
                let lon_in = if w <= e {
                    *w <= x && x <= *e
                } else {
                    x >= *w || x <= *e
                };
                lon_in && *s <= y && y <= *n
            }
            Self::Polygon(rings) => {
                if rings.iter().any(|r| on_ring(r, x, y)) {
                    return true;
                }
                let inside_outer = rings.first().is_some_and(|r| crosses_odd(r, x, y));
                inside_outer && !rings.iter().skip(1).any(|r| crosses_odd(r, x, y))
            }
            Self::Cells(cells) => cells
                .first()
                .is_some_and(|c| cells.contains(&cell_of(p, c.resolution()))),
        }
    }
}

/// Whether `(x, y)` lies on an edge of the ring.
fn on_ring(ring: &[(f64, f64)], x: f64, y: f64) -> bool {
    ring.windows(2).any(|e| {
        let ((ax, ay), (bx, by)) = (e[0], e[1]);
        let cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax);
        cross == 0.0 && ax.min(bx) <= x && x <= ax.max(bx) && ay.min(by) <= y && y <= ay.max(by)
    })
}

/// The even-odd rule: whether a ray from `(x, y)` eastwards crosses the
/// ring an odd number of times.
fn crosses_odd(ring: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut odd = false;
    for e in ring.windows(2) {
        let ((ax, ay), (bx, by)) = (e[0], e[1]);
        if (ay > y) != (by > y) {
            let at = ax + (y - ay) / (by - ay) * (bx - ax);
            if x < at {
                odd = !odd;
            }
        }
    }
    odd
}

/// The brute-force answer to an area query: the ids of the drivers inside
/// `shape` that pass the filters, sorted.
pub fn oracle_within(
    drivers: &[Driver],
    shape: &OracleShape,
    statuses: &[Status],
    vehicle: Option<Vehicle>,
    caps: Capabilities,
) -> Vec<DriverId> {
    let mut ids: Vec<DriverId> = drivers
        .iter()
        .filter(|d| statuses.contains(&d.status))
        .filter(|d| vehicle.is_none_or(|v| v == d.vehicle))
        .filter(|d| d.capabilities.contains(caps))
        .filter(|d| shape.holds(d.pos))
        .map(|d| d.id.clone())
        .collect();
    ids.sort();
    ids
}

/// `lat` clamped to ±90° and `lon` wrapped once into ±180°.
pub fn wrapped(lat: f64, lon: f64) -> Position {
    let lon = if lon > 180.0 {
        lon - 360.0
    } else if lon < -180.0 {
        lon + 360.0
    } else {
        lon
    };
    Position::new(lat.clamp(-90.0, 90.0), lon).expect("clamped and wrapped")
}

/// A change to the `i`-th driver (modulo their number) after a load.
#[derive(Debug, Clone)]
pub enum Change {
    /// A move by this many degrees of latitude and longitude.
    Move(usize, f64, f64),
    /// New status, vehicle and capabilities, in place.
    Attributes(usize, (Status, Vehicle, Capabilities)),
    /// A removal.
    Remove(usize),
}

/// Applies `changes` to the engine and to `drivers` alike. A reserved
/// driver is left as it is (its match is the test's to end).
pub fn apply_changes(engine: &Engine, drivers: &mut Vec<Driver>, changes: &[Change]) {
    for c in changes {
        if drivers.is_empty() {
            return;
        }
        let (Change::Move(i, ..) | Change::Attributes(i, _) | Change::Remove(i)) = c;
        let i = i % drivers.len();
        let d = &mut drivers[i];
        if d.status == Status::Reserved {
            continue;
        }
        let mut u = DriverUpdate::location(d.id.clone(), d.pos, Some(d.ts));
        match c {
            Change::Move(_, dlat, dlon) => {
                d.pos = wrapped(d.pos.lat() + dlat, d.pos.lon() + dlon);
                u.pos = d.pos;
            }
            Change::Attributes(_, (status, vehicle, caps)) => {
                (d.status, d.vehicle, d.capabilities) = (*status, *vehicle, *caps);
                u.status = Some(*status);
                u.vehicle = Some(*vehicle);
                u.capabilities = Some(*caps);
            }
            Change::Remove(_) => {
                assert!(engine.remove(&d.id).is_some(), "{} is known", d.id);
                drivers.swap_remove(i);
                continue;
            }
        }
        engine.upsert(&u).expect("valid update");
    }
}

/// A driver record with the given fields and no match.
pub fn driver(
    id: &str,
    pos: Position,
    status: Status,
    vehicle: Vehicle,
    caps: Capabilities,
) -> Driver {
    Driver {
        id: DriverId::new(id).expect("test ids are valid"),
        pos,
        ts: Timestamp::EPOCH,
        status,
        vehicle,
        capabilities: caps,
        order_id: None,
        reserved_until: None,
    }
}

/// Path of a file in the repository's `data/` folder.
pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("data")
        .join(name)
}

/// One row of `data/nyharbor_ais_positions.csv`.
#[derive(Debug, Clone)]
pub struct AisRow {
    /// The vessel's MMSI.
    pub vehicle_id: String,
    /// Report time.
    pub ts: Timestamp,
    /// Reported position.
    pub pos: Position,
}

/// Reads the AIS position log (the CSV is plain: no quoting, no empty fields).
pub fn load_ais() -> Vec<AisRow> {
    let text = std::fs::read_to_string(data_path("nyharbor_ais_positions.csv"))
        .expect("data/ is in the repository");
    text.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            AisRow {
                vehicle_id: f[0].to_owned(),
                ts: Timestamp::parse(f[1]).expect("valid time"),
                pos: Position::new(f[2].parse().expect("lat"), f[3].parse().expect("lon"))
                    .expect("valid position"),
            }
        })
        .collect()
}

/// Pickup positions of `data/chicago_trips.csv`, with trip ids.
pub fn load_chicago_pickups() -> Vec<(String, Position)> {
    let text = std::fs::read_to_string(data_path("chicago_trips.csv"))
        .expect("data/ is in the repository");
    text.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let pos = Position::new(f[2].parse().expect("lat"), f[3].parse().expect("lon"))
                .expect("valid position");
            (f[0].to_owned(), pos)
        })
        .collect()
}
