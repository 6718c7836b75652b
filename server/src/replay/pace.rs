//! Command-line values of the replays: durations (`10s`, `5m`) and the
//! replay pace (`--realtime 60x|max`), and the pacer that sleeps to keep it.

use std::str::FromStr;
use std::time::{Duration, Instant};

use hexmatch::Timestamp;

/// A duration on the command line: a number with a unit `ms`, `s`, `m` or
/// `h` (`500ms`, `10s`, `1.5m`, `2h`); a bare number is seconds.
/// Stored as whole milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Millis(pub(crate) u64);

impl FromStr for Millis {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let scale = match unit.trim() {
            "ms" => 1.0,
            "" | "s" => 1_000.0,
            "m" | "min" => 60_000.0,
            "h" => 3_600_000.0,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?}; use ms, s, m or h (e.g. 10s, 5m)"
                ));
            }
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{s:?} is not a duration like 10s, 5m or 500ms"))?;
        let ms = (value * scale).round();
        if !(0.0..=1e15).contains(&ms) {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(Self(ms as u64))
    }
}

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0;
        if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// How fast a replay runs against the recorded clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pace {
    /// As fast as possible.
    Max,
    /// This many recorded seconds per wall-clock second (`60x`; `1x` is
    /// the recorded pace).
    Times(f64),
}

impl FromStr for Pace {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("max") {
            return Ok(Self::Max);
        }
        let factor: f64 = s
            .strip_suffix(['x', 'X'])
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{s:?} is not a pace like 60x, 1x or max"))?;
        if factor.is_finite() && factor > 0.0 {
            Ok(Self::Times(factor))
        } else {
            Err(format!("{s:?}: the factor must be positive"))
        }
    }
}

impl std::fmt::Display for Pace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Max => f.write_str("max"),
            Self::Times(x) => write!(f, "{x}x"),
        }
    }
}

/// Keeps a replay at its pace: [`wait_for`](Self::wait_for) sleeps until
/// the wall clock has caught up with a recorded time.
#[derive(Debug)]
pub(crate) struct Pacer {
    pace: Pace,
    first: Option<(Timestamp, Instant)>,
}

impl Pacer {
    pub(crate) fn new(pace: Pace) -> Self {
        Self { pace, first: None }
    }

    /// How long to wait before handling recorded time `t`, `elapsed` after
    /// the first recorded time `first` was handled.
    fn due_in(pace: Pace, first: Timestamp, t: Timestamp, elapsed: Duration) -> Duration {
        match pace {
            Pace::Max => Duration::ZERO,
            Pace::Times(factor) => {
                let recorded_ms = (t.as_millis() - first.as_millis()).max(0) as f64;
                let target = Duration::from_secs_f64(recorded_ms / 1000.0 / factor);
                target.saturating_sub(elapsed)
            }
        }
    }

    /// How long until recorded time `t` is due (zero at `max` pace).
    pub(crate) fn due(&mut self, t: Timestamp) -> Duration {
        let (first, started) = *self.first.get_or_insert_with(|| (t, Instant::now()));
        Self::due_in(self.pace, first, t, started.elapsed())
    }

    /// Sleeps until recorded time `t` is due.
    pub(crate) fn wait_for(&mut self, t: Timestamp) {
        let wait = self.due(t);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        let ms = |s: &str| s.parse::<Millis>().map(|m| m.0);
        assert_eq!(ms("10s"), Ok(10_000));
        assert_eq!(ms("5m"), Ok(300_000));
        assert_eq!(ms("1.5m"), Ok(90_000));
        assert_eq!(ms("500ms"), Ok(500));
        assert_eq!(ms("2h"), Ok(7_200_000));
        assert_eq!(ms("30"), Ok(30_000));
        assert_eq!(ms("0s"), Ok(0));
        for bad in ["", "s", "10 parsecs", "-5s", "1e400s", "ten"] {
            assert!(ms(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Millis(300_000).to_string(), "5m");
        assert_eq!(Millis(10_000).to_string(), "10s");
        assert_eq!(Millis(1_500).to_string(), "1500ms");
        assert_eq!(Millis(0).to_string(), "0s");
    }

    #[test]
    fn parses_paces() {
        assert_eq!("max".parse::<Pace>(), Ok(Pace::Max));
        assert_eq!("60x".parse::<Pace>(), Ok(Pace::Times(60.0)));
        assert_eq!("0.5X".parse::<Pace>(), Ok(Pace::Times(0.5)));
        for bad in ["60", "x", "0x", "-2x", "fast"] {
            assert!(bad.parse::<Pace>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pacing_arithmetic() {
        let t = |ms: i64| Timestamp::from_millis(ms).unwrap();
        let first = t(1_000_000);
        // 60x: one recorded minute is due one wall second after the start.
        let at = t(1_060_000);
        let pace = Pace::Times(60.0);
        assert_eq!(
            Pacer::due_in(pace, first, at, Duration::ZERO),
            Duration::from_secs(1)
        );
        assert_eq!(
            Pacer::due_in(pace, first, at, Duration::from_millis(400)),
            Duration::from_millis(600)
        );
        assert_eq!(
            Pacer::due_in(pace, first, at, Duration::from_secs(5)),
            Duration::ZERO
        );
        assert_eq!(
            Pacer::due_in(Pace::Max, first, at, Duration::ZERO),
            Duration::ZERO
        );
        // Times before the first (unsorted input) are due at once.
        assert_eq!(
            Pacer::due_in(pace, first, t(0), Duration::ZERO),
            Duration::ZERO
        );
        let mut pacer = Pacer::new(Pace::Max);
        assert_eq!(pacer.due(at), Duration::ZERO);
    }
}
