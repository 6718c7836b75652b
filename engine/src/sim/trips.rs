//! Trips: the [`Trip`] record, the CSV reader and folding onto one day.

use std::collections::HashMap;
use std::fmt;

use crate::ids::OrderId;
use crate::position::Position;
use crate::time::Timestamp;

/// One recorded trip: an order that appears at `pickup_time`.
#[derive(Debug, Clone, PartialEq)]
pub struct Trip {
    /// The trip's id, used as the order id.
    pub id: OrderId,
    /// When the order appears.
    pub pickup_time: Timestamp,
    /// Where the passenger waits.
    pub pickup: Position,
    /// When the recorded trip ended (kept for reference; the simulation
    /// drives the trip at its own speed).
    pub dropoff_time: Timestamp,
    /// Where the trip ends.
    pub dropoff: Position,
}

/// A bad row of a trips file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    /// 1-based line number (the header is line 1).
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for RowError {}

/// What [`parse_trips`] read.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TripFile {
    /// The valid trips, in file order.
    pub trips: Vec<Trip>,
    /// The bad rows, in file order; each was skipped.
    pub rejected: Vec<RowError>,
}

/// The columns a trips file must have (in any order; others are ignored).
const COLUMNS: [&str; 7] = [
    "trip_id",
    "pickup_time",
    "pickup_lat",
    "pickup_lon",
    "dropoff_time",
    "dropoff_lat",
    "dropoff_lon",
];

/// Parses a trips CSV (the layout of `data/chicago_trips.csv`): a header
/// naming the columns `trip_id, pickup_time, pickup_lat, pickup_lon,
/// dropoff_time, dropoff_lat, dropoff_lon` in any order (others ignored),
/// then one trip per line. Times are RFC 3339 or Unix milliseconds. No
/// quoting; blank lines are skipped.
///
/// A bad row (wrong field count, bad id, time or coordinate, a drop-off
/// before its pickup, a repeated trip id) is skipped and listed in
/// [`TripFile::rejected`] with its line number; the caller decides whether
/// that fails the run.
///
/// # Errors
/// A [`RowError`] for line 1 when the header lacks a column or the text is empty.
///
/// ```
/// use hexmatch::sim::parse_trips;
/// let csv = "trip_id,pickup_time,pickup_lat,pickup_lon,dropoff_time,dropoff_lat,dropoff_lon\n\
///            a,2026-01-05T08:00:00Z,41.88,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
///            b,2026-01-05T08:00:00Z,95.00,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n";
/// let file = parse_trips(csv)?;
/// assert_eq!(file.trips.len(), 1);
/// assert_eq!(file.rejected[0].to_string(), "line 3: pickup: invalid position: lat 95 is not a finite number in [-90, 90]");
/// # Ok::<(), hexmatch::sim::RowError>(())
/// ```
pub fn parse_trips(text: &str) -> Result<TripFile, RowError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, h)| h).unwrap_or_default();
    let columns = Columns::from_header(header)?;
    let mut file = TripFile::default();
    let mut first_line: HashMap<OrderId, usize> = HashMap::new();
    for (i, line) in lines {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = columns
            .parse(line)
            .and_then(|trip| match first_line.get(&trip.id) {
                Some(first) => Err(format!(
                    "duplicate trip_id {} (first on line {first})",
                    trip.id
                )),
                None => Ok(trip),
            });
        match parsed {
            Ok(trip) => {
                first_line.insert(trip.id.clone(), line_no);
                file.trips.push(trip);
            }
            Err(message) => file.rejected.push(RowError {
                line: line_no,
                message,
            }),
        }
    }
    Ok(file)
}

/// Where each needed column is.
struct Columns {
    index: [usize; 7],
    needed: usize,
}

impl Columns {
    fn from_header(header: &str) -> Result<Self, RowError> {
        let names: Vec<&str> = header.split(',').map(str::trim).collect();
        let mut index = [0; 7];
        for (slot, wanted) in index.iter_mut().zip(COLUMNS) {
            *slot = names
                .iter()
                .position(|n| *n == wanted)
                .ok_or_else(|| RowError {
                    line: 1,
                    message: format!(
                        "header has no {wanted} column (expected {}; found: {})",
                        COLUMNS.join(","),
                        header.trim()
                    ),
                })?;
        }
        let needed = index.iter().max().map_or(0, |m| m + 1);
        Ok(Self { index, needed })
    }

    fn parse(&self, line: &str) -> Result<Trip, String> {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < self.needed {
            return Err(format!(
                "expected at least {} fields, found {}",
                self.needed,
                fields.len()
            ));
        }
        let [id, pt, plat, plon, dt, dlat, dlon] = self.index.map(|i| fields[i]);
        let time =
            |name: &str, raw: &str| Timestamp::parse(raw).map_err(|e| format!("{name}: {e}"));
        let number = |name: &str, raw: &str| {
            raw.parse::<f64>()
                .map_err(|_| format!("{name} {raw:?} is not a number"))
        };
        let position = |name: &str, lat: &str, lon: &str| -> Result<Position, String> {
            let (la, lo) = (
                number(&format!("{name}_lat"), lat)?,
                number(&format!("{name}_lon"), lon)?,
            );
            Position::new(la, lo).map_err(|e| format!("{name}: {e}"))
        };
        let trip = Trip {
            id: OrderId::new(id).map_err(|e| format!("trip_id: {e}"))?,
            pickup_time: time("pickup_time", pt)?,
            pickup: position("pickup", plat, plon)?,
            dropoff_time: time("dropoff_time", dt)?,
            dropoff: position("dropoff", dlat, dlon)?,
        };
        if trip.dropoff_time < trip.pickup_time {
            return Err(format!(
                "dropoff_time {} is before pickup_time {}",
                trip.dropoff_time, trip.pickup_time
            ));
        }
        Ok(trip)
    }
}

const DAY_MS: i64 = 86_400_000;

/// Folds trips onto one day by time of day: each pickup moves to the same
/// time of day on the day (UTC) of the earliest pickup, and its drop-off
/// moves with it. Sparse data (the Chicago sample has about 8 trips a day
/// over 4 years) becomes one busy day. Returns that day's midnight, or
/// `None` when there are no trips.
///
/// The order of `trips` is kept; the simulation sorts by time itself.
///
/// ```
/// # use hexmatch::{OrderId, Position, Timestamp};
/// # use hexmatch::sim::{fold_onto_day, Trip};
/// let t = |s: &str| Timestamp::parse(s).unwrap();
/// let p = Position::new(41.9, -87.6)?;
/// let mut trips = vec![
///     Trip { id: OrderId::new("a")?, pickup_time: t("2013-01-01T09:00:00Z"), pickup: p,
///            dropoff_time: t("2013-01-01T09:20:00Z"), dropoff: p },
///     Trip { id: OrderId::new("b")?, pickup_time: t("2016-06-30T23:45:00Z"), pickup: p,
///            dropoff_time: t("2016-07-01T00:05:00Z"), dropoff: p },
/// ];
/// assert_eq!(fold_onto_day(&mut trips), Some(t("2013-01-01T00:00:00Z")));
/// assert_eq!(trips[1].pickup_time, t("2013-01-01T23:45:00Z"));
/// assert_eq!(trips[1].dropoff_time, t("2013-01-02T00:05:00Z"));
/// # Ok::<(), hexmatch::Error>(())
/// ```
pub fn fold_onto_day(trips: &mut [Trip]) -> Option<Timestamp> {
    let first = trips.iter().map(|t| t.pickup_time.as_millis()).min()?;
    let day = first - first.rem_euclid(DAY_MS);
    for trip in trips.iter_mut() {
        let old = trip.pickup_time.as_millis();
        let shift = u64::try_from(old - (day + old.rem_euclid(DAY_MS))).unwrap_or(0);
        trip.pickup_time = trip.pickup_time.minus_millis(shift);
        trip.dropoff_time = trip.dropoff_time.minus_millis(shift);
    }
    Timestamp::from_millis(day).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "trip_id,pickup_time,pickup_lat,pickup_lon,dropoff_time,dropoff_lat,dropoff_lon";

    #[test]
    fn reads_rows_and_names_every_bad_line() {
        let text = format!(
            "{HEADER}\n\
             a,2026-01-05T08:00:00Z,41.88,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
             \n\
             b,2026-01-05T08:00:00Z,41.88,-87.63,2026-01-05T07:59:00Z,41.90,-87.64\n\
             a,2026-01-05T08:00:00Z,41.88,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
             c,yesterday,41.88,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
             d,2026-01-05T08:00:00Z,x,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
             e e,2026-01-05T08:00:00Z,41.88,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
             f,2026-01-05T08:00:00Z,41.88\n\
             g,1767600000000,41.88,-87.63,1767600600000,41.90,-200\n\
             h,1767600000000,41.88,-87.63,1767600600000,41.90,-87.64\r\n"
        );
        let file = parse_trips(&text).unwrap();
        assert_eq!(
            file.trips.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
            ["a", "h"]
        );
        let got: Vec<String> = file.rejected.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "line 4: dropoff_time 2026-01-05T07:59:00.000Z is before pickup_time 2026-01-05T08:00:00.000Z",
                "line 5: duplicate trip_id a (first on line 2)",
                "line 6: pickup_time: invalid timestamp: \"yesterday\" is neither RFC 3339 (2026-11-25T10:00:00.250Z) nor Unix milliseconds",
                "line 7: pickup_lat \"x\" is not a number",
                "line 8: trip_id: invalid id: order_id contains ' '; allowed are A-Z a-z 0-9 _ . : -",
                "line 9: expected at least 7 fields, found 3",
                "line 10: dropoff: invalid position: lon -200 is not a finite number in [-180, 180]",
            ]
        );
    }

    #[test]
    fn header_columns_may_come_in_any_order() {
        let text = "dropoff_lon,dropoff_lat,dropoff_time,pickup_lon,pickup_lat,pickup_time,trip_id,fare\n\
                    -87.64,41.90,2026-01-05T08:10:00Z,-87.63,41.88,2026-01-05T08:00:00Z,x1,12.5\n";
        let t = &parse_trips(text).unwrap().trips[0];
        assert_eq!(
            (t.id.as_str(), t.pickup.lat(), t.dropoff.lon()),
            ("x1", 41.88, -87.64)
        );
        let err = parse_trips("trip_id,pickup_time\n").unwrap_err();
        assert_eq!(err.line, 1);
        assert!(
            err.message.starts_with("header has no pickup_lat column"),
            "{err}"
        );
        assert_eq!(parse_trips("").unwrap_err().line, 1);
    }

    #[test]
    fn folding_keeps_time_of_day_and_duration() {
        let text = format!(
            "{HEADER}\n\
             a,2014-03-01T10:15:00Z,41.88,-87.63,2014-03-01T10:40:00Z,41.90,-87.64\n\
             b,2013-07-04T02:30:00Z,41.88,-87.63,2013-07-04T02:31:00Z,41.90,-87.64\n"
        );
        let mut trips = parse_trips(&text).unwrap().trips;
        let day = fold_onto_day(&mut trips).unwrap();
        assert_eq!(day.to_string(), "2013-07-04T00:00:00.000Z");
        assert_eq!(trips[0].pickup_time.to_string(), "2013-07-04T10:15:00.000Z");
        assert_eq!(
            trips[0].dropoff_time.to_string(),
            "2013-07-04T10:40:00.000Z"
        );
        assert_eq!(trips[1].pickup_time.to_string(), "2013-07-04T02:30:00.000Z");
        assert_eq!(fold_onto_day(&mut []), None);
    }
}
