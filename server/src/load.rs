//! Loading drivers from CSV at start-up (`--load-drivers`).

use std::path::Path;

use hexmatch::{Capabilities, Driver, DriverId, Position, Status, Timestamp, Vehicle};

/// The id columns of a position log, in order of preference (`replay
/// positions` reads the same).
pub const ID_COLUMNS: [&str; 2] = ["driver_id", "vehicle_id"];

/// The time columns of a position log, in order of preference.
pub const TS_COLUMNS: [&str; 2] = ["ts", "timestamp"];

/// Reads drivers from `path`: either
/// `driver_id,lat,lon[,vehicle][,status][,capabilities][,ts]` rows (the
/// capabilities separated by `;`, as in `cash;pets`), or a trips file (`trip_id,…,dropoff_time,dropoff_lat,dropoff_lon`)
/// of which each drop-off becomes an available driver named after its trip.
/// The columns of a position log (`replay positions`) are read too:
/// `vehicle_id` for `driver_id`, `timestamp` for `ts`; a driver named on
/// several rows is loaded as its last row says.
///
/// # Errors
/// `file:line: what` for the first bad line.
pub fn read_drivers(path: &Path, now: Timestamp) -> Result<Vec<Driver>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let at = |line: usize, msg: String| format!("{}:{line}: {msg}", path.display());
    let first_of = |names: &[&str]| names.iter().find_map(|n| col(n));
    let id = first_of(&ID_COLUMNS);
    let layout = if let (Some(id), Some(lat), Some(lon)) = (id, col("lat"), col("lon")) {
        Layout {
            id,
            lat,
            lon,
            vehicle: col("vehicle"),
            status: col("status"),
            capabilities: col("capabilities"),
            ts: first_of(&TS_COLUMNS),
        }
    } else if let (Some(id), Some(lat), Some(lon)) =
        (col("trip_id"), col("dropoff_lat"), col("dropoff_lon"))
    {
        Layout {
            id,
            lat,
            lon,
            vehicle: None,
            status: None,
            capabilities: None,
            ts: col("dropoff_time"),
        }
    } else {
        return Err(at(
            1,
            "header needs driver_id (or vehicle_id),lat,lon or trip_id,…,dropoff_lat,dropoff_lon"
                .into(),
        ));
    };
    lines
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| layout.parse(line, now).map_err(|msg| at(i + 2, msg)))
        .collect()
}

struct Layout {
    id: usize,
    lat: usize,
    lon: usize,
    vehicle: Option<usize>,
    status: Option<usize>,
    /// Capability names separated by `;`.
    capabilities: Option<usize>,
    ts: Option<usize>,
}

impl Layout {
    fn parse(&self, line: &str, now: Timestamp) -> Result<Driver, String> {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |i: usize| {
            f.get(i)
                .copied()
                .ok_or_else(|| format!("expected at least {} fields", i + 1))
        };
        let num = |i: usize| {
            get(i).and_then(|s| {
                s.parse::<f64>()
                    .map_err(|_| format!("{s:?} is not a number"))
            })
        };
        let opt = |i: Option<usize>| i.and_then(|i| f.get(i).copied()).filter(|s| !s.is_empty());
        let status = match opt(self.status) {
            Some(s) => s.parse::<Status>().map_err(|e| e.to_string())?,
            None => Status::Available,
        };
        Ok(Driver {
            id: DriverId::new(get(self.id)?).map_err(|e| e.to_string())?,
            pos: Position::new(num(self.lat)?, num(self.lon)?).map_err(|e| e.to_string())?,
            ts: opt(self.ts)
                .map(Timestamp::parse)
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or(now),
            status,
            vehicle: opt(self.vehicle)
                .map(str::parse::<Vehicle>)
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or_default(),
            capabilities: opt(self.capabilities)
                .map(|s| {
                    Capabilities::from_names(s.split(';').map(str::trim).filter(|n| !n.is_empty()))
                })
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or_default(),
            order_id: None,
            reserved_until: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_layouts_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("hexmatch-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let drivers = dir.join("d.csv");
        std::fs::write(
            &drivers,
            "driver_id,lat,lon,vehicle,status,capabilities\n\
             a,41.9,-87.6,van,busy,cash;pets\nb,41.8,-87.7,,,\n",
        )
        .unwrap();
        let got = read_drivers(&drivers, Timestamp::EPOCH).unwrap();
        assert_eq!(
            (got[0].vehicle, got[0].status, got[1].vehicle),
            (Vehicle::Van, Status::Busy, Vehicle::Car)
        );
        assert_eq!(
            (got[0].capabilities, got[1].capabilities),
            ("cash,pets".parse().unwrap(), Capabilities::NONE)
        );
        let trips = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/chicago_trips.csv");
        assert_eq!(
            read_drivers(&trips, Timestamp::EPOCH).unwrap().len(),
            11_615
        );
        // A position log, as `replay positions` reads it: the bundled AIS
        // file, a row per fix (the load keeps each vessel's last).
        let ais = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/nyharbor_ais_positions.csv");
        let got = read_drivers(&ais, Timestamp::EPOCH).unwrap();
        let text = std::fs::read_to_string(&ais).unwrap();
        assert_eq!(
            got.len(),
            text.lines().skip(1).filter(|l| !l.is_empty()).count()
        );
        let first = &got[0];
        let row: Vec<&str> = text.lines().nth(1).unwrap().split(',').collect();
        assert_eq!(
            (first.id.as_str(), first.ts, first.pos.lat()),
            (
                row[0],
                Timestamp::parse(row[1]).unwrap(),
                row[2].parse().unwrap()
            )
        );
        std::fs::write(
            &drivers,
            "vehicle_id,timestamp,lat,lon\nv1,2013-01-01 00:15:00-06:00,41.9,-87.6\n",
        )
        .unwrap();
        let got = read_drivers(&drivers, Timestamp::EPOCH).unwrap();
        assert_eq!(got[0].ts, Timestamp::parse("2013-01-01T06:15:00Z").unwrap());
        std::fs::write(
            &drivers,
            "vehicle_id,timestamp,lat,lon\nv1,2013-01-01 00:15:00,41.9,-87.6\n",
        )
        .unwrap();
        let err = read_drivers(&drivers, Timestamp::EPOCH).unwrap_err();
        assert!(
            err.contains("d.csv:2:") && err.contains("has no time zone"),
            "{err}"
        );
        std::fs::write(&drivers, "driver_id,lat,lon\na,41.9,-87.6\nb,91,-87.7\n").unwrap();
        let err = read_drivers(&drivers, Timestamp::EPOCH).unwrap_err();
        assert!(
            err.ends_with("d.csv:3: invalid position: lat 91 is not a finite number in [-90, 90]"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
