//! The [`Report`] of a simulation and its statistics.

use std::collections::BTreeMap;

use serde::Serialize;

/// The engine operations whose latency a report gives, in report order
/// (keys of `engine_ns`).
pub const OPERATIONS: [&str; 6] = [
    "claim",
    "claim_batch",
    "complete",
    "confirm",
    "expire_matches",
    "update_location",
];

/// Wait times of served orders, seconds: from the order's time to the
/// driver's arrival at the pickup.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct WaitStats {
    /// Mean.
    pub mean: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
}

/// Pickup distances of served orders, km driven (detour included).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct DistanceStats {
    /// Mean.
    pub mean: f64,
    /// Median (nearest rank).
    pub p50: f64,
    /// 90th percentile (nearest rank).
    pub p90: f64,
}

/// Latency of one engine operation, nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Latency {
    /// Median (nearest rank).
    pub p50: u64,
    /// 99th percentile (nearest rank).
    pub p99: u64,
}

/// What a simulation measured. Serialised by [`to_json`](Self::to_json)
/// with exactly these keys, in this order.
///
/// Values are rounded so that the JSON reads well and carries no float
/// noise: seconds to 1 ms, km to 1 m, percentages to 0.01, utilisation to
/// 0.0001. Percentiles are nearest-rank: the p-th percentile of n sorted
/// values is the value at rank ⌈p·n/100⌉.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Orders (trips) in the input.
    pub trips: usize,
    /// Orders a driver was confirmed for (and so picked up and delivered).
    pub served: usize,
    /// Orders nobody was confirmed for within their patience.
    pub unserved: usize,
    /// `100 · served / trips` (0 without trips).
    pub served_pct: f64,
    /// Wait of served orders, s.
    pub wait_s: WaitStats,
    /// Driven distance to each served order's pickup, km.
    pub pickup_km: DistanceStats,
    /// Total km driven empty (to pickups).
    pub empty_km_total: f64,
    /// Total km driven with a passenger.
    pub loaded_km_total: f64,
    /// Share of the fleet's time spent driving (to a pickup or loaded),
    /// from the first order's time to the end of the last trip.
    pub utilisation: f64,
    /// Latency per engine operation (keys [`OPERATIONS`]); all zero when
    /// timings are off. Through a server, this is the HTTP round trip.
    /// `update_location` is the mean per update of each batch of updates
    /// the simulation sends at once.
    pub engine_ns: BTreeMap<&'static str, Latency>,
    /// Wall-clock seconds the simulation took (0 when timings are off).
    pub wall_s: f64,
    /// The seed of the fleet placement.
    pub seed: u64,
    /// The dispatch policy's name.
    pub policy: String,
    /// Drivers in the fleet.
    pub drivers: usize,
}

impl Report {
    /// The report as pretty-printed JSON with a final newline. Identical
    /// reports give identical bytes.
    pub fn to_json(&self) -> String {
        // Serialising plain numbers, strings and maps cannot fail.
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// The nearest-rank `p`-th percentile (`p` in 1..=100) of `sorted`
/// (ascending): the value at rank ⌈p·n/100⌉, or `None` if it is empty.
///
/// ```
/// use hexmatch::sim::percentile;
/// assert_eq!(percentile(&[10, 20, 30], 50), Some(20));
/// assert_eq!(percentile(&[10, 20, 30], 90), Some(30));
/// assert_eq!(percentile::<u64>(&[], 50), None);
/// ```
pub fn percentile<T: Copy>(sorted: &[T], p: u32) -> Option<T> {
    let n = sorted.len();
    let rank = (usize::try_from(p).ok()? * n)
        .div_ceil(100)
        .clamp(1, n.max(1));
    sorted.get(rank - 1).copied()
}

/// Rounds to `decimals` decimal places.
pub(crate) fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// Wait statistics from waits in milliseconds (any order).
pub(crate) fn wait_stats(mut waits_ms: Vec<i64>) -> WaitStats {
    if waits_ms.is_empty() {
        return WaitStats::default();
    }
    waits_ms.sort_unstable();
    let secs = |ms: Option<i64>| round_to(ms.unwrap_or(0) as f64 / 1000.0, 3);
    let sum: i64 = waits_ms.iter().sum();
    WaitStats {
        mean: round_to(sum as f64 / waits_ms.len() as f64 / 1000.0, 3),
        p50: secs(percentile(&waits_ms, 50)),
        p90: secs(percentile(&waits_ms, 90)),
        p99: secs(percentile(&waits_ms, 99)),
    }
}

/// Distance statistics, in km, from distances in metres (any order).
pub(crate) fn distance_stats(mut metres: Vec<f64>) -> DistanceStats {
    if metres.is_empty() {
        return DistanceStats::default();
    }
    metres.sort_unstable_by(f64::total_cmp);
    let km = |m: Option<f64>| round_to(m.unwrap_or(0.0) / 1000.0, 3);
    let sum: f64 = metres.iter().sum();
    DistanceStats {
        mean: round_to(sum / metres.len() as f64 / 1000.0, 3),
        p50: km(percentile(&metres, 50)),
        p90: km(percentile(&metres, 90)),
    }
}

/// Latency percentiles from samples in ns (any order).
pub(crate) fn latency(mut ns: Vec<u64>) -> Latency {
    ns.sort_unstable();
    Latency {
        p50: percentile(&ns, 50).unwrap_or(0),
        p99: percentile(&ns, 99).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), Some(50));
        assert_eq!(percentile(&v, 90), Some(90));
        assert_eq!(percentile(&v, 99), Some(99));
        assert_eq!(percentile(&v, 100), Some(100));
        assert_eq!(percentile(&[7], 1), Some(7));
        assert_eq!(percentile(&[1, 2], 50), Some(1));
        assert_eq!(percentile(&[1, 2], 51), Some(2));
    }

    #[test]
    fn stats_round_and_handle_empty_input() {
        let w = wait_stats(vec![450_000, 100_000, 200_000]);
        assert_eq!((w.mean, w.p50, w.p90, w.p99), (250.0, 200.0, 450.0, 450.0));
        assert_eq!(wait_stats(Vec::new()), WaitStats::default());
        let d = distance_stats(vec![1_234.567_8, 10.0]);
        assert_eq!((d.mean, d.p50, d.p90), (0.622, 0.01, 1.235));
        assert_eq!(latency(Vec::new()), Latency::default());
    }
}
