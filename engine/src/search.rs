//! Exact k-nearest search over the shards.
//!
//! # Algorithm
//! Best-first over two levels. The top-level R-tree yields shards in
//! increasing order of the distance from the query to their cell's box,
//! which is a lower bound for every driver in that shard. Each shard's
//! R-tree yields its available drivers in increasing chord distance. Both
//! walks stop as soon as the next lower bound exceeds the current k-th best
//! (or the radius). So the search visits only the cells that could still
//! hold a better answer: one or two in a dense city, however many it
//! takes in a sparse country, with no cost for empty cells in between.
//!
//! Chord order equals great-circle order, so the result is exact. To agree
//! to the last bit with a haversine oracle, the walk keeps every candidate
//! within a hair (1e-9 relative, ~6 µm absolute) of the k-th chord, then
//! ranks the survivors by haversine metres and driver id.
//!
//! Cost: O(c·log n) for c visited cells of n drivers each; no allocation
//! beyond the candidate list and the result.

use crate::driver::{Capabilities, Vehicle};
use crate::error::{Error, Result};
use crate::ids::DriverId;
use crate::index::Engine;
use crate::position::{EARTH_RADIUS_M, Position, chord_of_metres};
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

/// A candidate during the walk: the squared chord and the record's fields.
struct Candidate {
    d2: f64,
    n: Neighbor,
}

/// The squared chord below which a candidate must be kept, given the
/// squared chord of the current k-th best.
#[inline]
fn keep_below(d2: f64) -> f64 {
    let c = d2.sqrt() * (1.0 + 1e-9) + 1e-12;
    c * c
}

impl Engine {
    /// The `k` nearest available drivers passing the query's filters, by
    /// great-circle distance, ties broken by driver id.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an invalid `k` or radius (only possible
    /// when the query was built by hand rather than through its constructors).
    pub fn nearest(&self, q: &NearestQuery) -> Result<Vec<Neighbor>> {
        if !(1..=MAX_K).contains(&q.k) {
            return Err(Error::InvalidParameter(format!(
                "k = {} is not in 1..={MAX_K}",
                q.k
            )));
        }
        if let Some(r) = q.radius_m {
            validate_radius(r)?;
        }
        let limit_m = q.radius_m.unwrap_or(self.config.max_radius_m);
        let qv = q.pos.to_unit_vector();
        let limit2 = keep_below(chord_of_metres(limit_m).powi(2));
        let mut cands: Vec<Candidate> = Vec::with_capacity(q.k + 4);
        let mut cut2 = limit2;

        let cells = self.cells.read();
        for (entry, cell_d2) in cells.tree.nearest_neighbor_iter_with_distance_2(qv) {
            if cell_d2 > cut2 {
                break;
            }
            let data = entry.shard.data.read();
            for (item, d2) in data.tree.nearest_neighbor_iter_with_distance_2(qv) {
                if d2 > cut2 {
                    break;
                }
                if q.vehicle.is_some_and(|v| v != item.vehicle)
                    || !item.caps.contains(q.capabilities)
                {
                    continue;
                }
                let Some(rec) = data.record(item.slot) else {
                    continue;
                };
                let at = cands.partition_point(|c| c.d2 <= d2);
                cands.insert(
                    at,
                    Candidate {
                        d2,
                        n: Neighbor {
                            id: rec.id.clone(),
                            pos: rec.pos,
                            distance_m: 0.0,
                            vehicle: rec.vehicle,
                            capabilities: rec.caps,
                            ts: rec.ts,
                        },
                    },
                );
                if cands.len() >= q.k {
                    cut2 = cut2.min(keep_below(cands[q.k - 1].d2));
                    let keep = cands.partition_point(|c| c.d2 <= cut2);
                    cands.truncate(keep);
                }
            }
        }
        drop(cells);

        let mut out: Vec<Neighbor> = cands
            .into_iter()
            .map(|mut c| {
                c.n.distance_m = q.pos.distance_m(c.n.pos);
                c.n
            })
            .filter(|n| n.distance_m <= limit_m)
            .collect();
        out.sort_unstable_by(|a, b| {
            a.distance_m
                .total_cmp(&b.distance_m)
                .then_with(|| a.id.cmp(&b.id))
        });
        out.truncate(q.k);
        Ok(out)
    }
}

/// Half the Earth's circumference: no two points are farther apart.
pub const MAX_DISTANCE_M: f64 = EARTH_RADIUS_M * std::f64::consts::PI;
