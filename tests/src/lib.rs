//! Helpers shared by hexmatch's integration tests: a brute-force oracle for
//! nearest queries and loaders for the sample data in `data/`.

pub mod http;

use std::path::PathBuf;

use hexmatch::{
    Capabilities, Driver, DriverId, NearestQuery, Position, Status, Timestamp, Vehicle,
};

/// The brute-force answer to a nearest query: every eligible driver ranked
/// by haversine metres, ties by id, the first `k` within the limit.
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
        .map(|d| (d.id.clone(), q.pos.distance_m(d.pos)))
        .filter(|(_, dist)| *dist <= limit)
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(q.k);
    all
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
