//! The query set, hexmatch's exact answers to it, and the agreement check
//! of every peer against those answers.

use hexmatch::{EARTH_RADIUS_M, Engine, NearestQuery, Position};
use hyper::Uri;

/// A nearest answer as every client reports it: driver ids with their
/// distances in metres on the mean Earth radius, nearest first.
pub(crate) type Answer = Vec<(String, f64)>;

/// One query of the set, in every form a client needs.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    /// The engine's query.
    pub(crate) query: NearestQuery,
    /// `GET /v1/drivers/nearest?...` for the HTTP client. The coordinates
    /// are printed shortest-round-trip, so the server parses the very same
    /// `f64`s as the in-process query.
    pub(crate) uri: Uri,
    /// Radius for Redis in "oracle" mode: hexmatch's k-th distance
    /// × 1.01 + 1 m (see the README).
    pub(crate) oracle_radius_m: f64,
}

impl Case {
    /// Latitude of the query point.
    pub(crate) fn lat(&self) -> f64 {
        self.query.pos.lat()
    }

    /// Longitude of the query point.
    pub(crate) fn lon(&self) -> f64 {
        self.query.pos.lon()
    }
}

/// The cases for `points` with `k`, and hexmatch's exact answers to them.
pub(crate) fn cases(
    engine: &Engine,
    addr: std::net::SocketAddr,
    points: &[Position],
    k: usize,
) -> (Vec<Case>, Vec<Answer>) {
    points
        .iter()
        .map(|&pos| {
            let query = NearestQuery::new(pos, k).expect("k was validated");
            let found = engine
                .nearest(&query)
                .expect("a constructed query is valid");
            let max = engine.config().max_radius_m;
            let oracle_radius_m = if found.len() < k {
                max
            } else {
                found.last().map_or(max, |n| n.distance_m * 1.01 + 1.0)
            };
            let uri = format!(
                "http://{addr}/v1/drivers/nearest?lat={}&lon={}&k={k}",
                pos.lat(),
                pos.lon()
            )
            .parse()
            .expect("a formatted URI parses");
            let answer = found
                .into_iter()
                .map(|n| (n.id.to_string(), n.distance_m))
                .collect();
            (
                Case {
                    query,
                    uri,
                    oracle_radius_m,
                },
                answer,
            )
        })
        .unzip()
}

/// Redis computes distances on a sphere of radius 6 372 797.560856 m
/// (`geohash_helper.c`); hexmatch and PostGIS use the mean radius.
pub(crate) const REDIS_EARTH_RADIUS_M: f64 = 6_372_797.560_856;

/// Converts a Redis distance to metres on hexmatch's sphere.
pub(crate) fn from_redis_metres(d: f64) -> f64 {
    d * (EARTH_RADIUS_M / REDIS_EARTH_RADIUS_M)
}

/// How one answer compares with hexmatch's.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// The same ids in the same order.
    Same,
    /// Different order or membership, but only among drivers whose
    /// distances are within the tolerance of each other (ties after the
    /// peer's rounding).
    Tied,
    /// A real difference.
    Differs(String),
}

/// The agreement of one system's answers with hexmatch's.
#[derive(Debug, Clone, Default)]
pub(crate) struct Agreement {
    /// Queries compared.
    pub(crate) checked: usize,
    /// Identical id lists.
    pub(crate) same: usize,
    /// Equal up to ties within the tolerance.
    pub(crate) tied: usize,
    /// Real differences.
    pub(crate) differ: usize,
    /// Largest |distance difference| at equal rank, metres.
    pub(crate) max_dev_m: f64,
    /// A few of the differences, for the report.
    pub(crate) examples: Vec<String>,
}

impl Agreement {
    /// Compares `got[i]` with `expected[i]` for every `i`.
    pub(crate) fn of(expected: &[Answer], got: &[Answer], tolerance_m: f64) -> Self {
        let mut a = Self::default();
        for (i, (e, g)) in expected.iter().zip(got).enumerate() {
            a.checked += 1;
            let dev = e
                .iter()
                .zip(g)
                .map(|(x, y)| (x.1 - y.1).abs())
                .fold(0.0, f64::max);
            if dev.is_finite() {
                a.max_dev_m = a.max_dev_m.max(dev);
            }
            match verdict(e, g, tolerance_m) {
                Verdict::Same => a.same += 1,
                Verdict::Tied => a.tied += 1,
                Verdict::Differs(why) => {
                    a.differ += 1;
                    if a.examples.len() < 5 {
                        a.examples.push(format!("query {i}: {why}"));
                    }
                }
            }
        }
        a
    }

    /// Whether every answer agreed (same or tied).
    pub(crate) fn ok(&self) -> bool {
        self.differ == 0
    }
}

fn verdict(expected: &Answer, got: &Answer, tol: f64) -> Verdict {
    if expected.len() != got.len() {
        return Verdict::Differs(format!(
            "{} drivers instead of {}",
            got.len(),
            expected.len()
        ));
    }
    for (rank, (e, g)) in expected.iter().zip(got).enumerate() {
        if (e.1 - g.1).abs() > tol {
            return Verdict::Differs(format!(
                "rank {rank}: {} at {:.3} m instead of {} at {:.3} m",
                g.0, g.1, e.0, e.1
            ));
        }
    }
    if expected.iter().zip(got).all(|(e, g)| e.0 == g.0) {
        return Verdict::Same;
    }
    // Different ids at equal distances (within `tol`): a tie, unless a
    // driver hexmatch ranks well inside the k is missing.
    let kth = expected.last().map_or(0.0, |e| e.1);
    for e in expected {
        if !got.iter().any(|g| g.0 == e.0) && e.1 < kth - tol {
            return Verdict::Differs(format!(
                "{} at {:.3} m is missing (k-th at {kth:.3} m)",
                e.0, e.1
            ));
        }
    }
    Verdict::Tied
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ans(items: &[(&str, f64)]) -> Answer {
        items.iter().map(|(i, d)| ((*i).to_owned(), *d)).collect()
    }

    #[test]
    fn verdicts() {
        let e = ans(&[("a", 1.0), ("b", 2.0), ("c", 3.0)]);
        assert_eq!(verdict(&e, &e, 0.5), Verdict::Same);
        let swapped = ans(&[("a", 1.0), ("c", 2.1), ("b", 2.2)]);
        assert_eq!(
            verdict(&e, &swapped, 0.5),
            Verdict::Differs("rank 2: b at 2.200 m instead of c at 3.000 m".into())
        );
        let tie = ans(&[("a", 1.0), ("b", 2.0), ("d", 3.2)]);
        assert_eq!(verdict(&e, &tie, 0.5), Verdict::Tied);
        let short = ans(&[("a", 1.0)]);
        assert!(matches!(verdict(&e, &short, 0.5), Verdict::Differs(_)));
    }
}
