//! Time: [`Timestamp`] (Unix milliseconds) and the [`Clock`] trait.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// A point in time, in milliseconds since the Unix epoch (UTC).
///
/// Valid range: years 1970 to 9999, so every value prints as RFC 3339.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

/// The largest accepted timestamp: 9999-12-31T23:59:59.999Z.
const MAX_MS: i64 = 253_402_300_799_999;

impl Timestamp {
    /// The Unix epoch.
    pub const EPOCH: Self = Self(0);

    /// Wraps Unix milliseconds.
    ///
    /// # Errors
    /// [`Error::InvalidTimestamp`] outside 1970-01-01 … 9999-12-31.
    pub fn from_millis(ms: i64) -> Result<Self> {
        if (0..=MAX_MS).contains(&ms) {
            Ok(Self(ms))
        } else {
            Err(Error::InvalidTimestamp(format!(
                "{ms} ms is outside 1970-01-01 … 9999-12-31"
            )))
        }
    }

    /// Unix milliseconds.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This time plus `ms` milliseconds, saturating at the valid range.
    #[must_use]
    pub fn plus_millis(self, ms: u64) -> Self {
        let ms = i64::try_from(ms).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(ms).min(MAX_MS))
    }

    /// This time minus `ms` milliseconds, saturating at the epoch.
    #[must_use]
    pub fn minus_millis(self, ms: u64) -> Self {
        let ms = i64::try_from(ms).unwrap_or(i64::MAX);
        Self(self.0.saturating_sub(ms).max(0))
    }

    /// Parses RFC 3339 (`2026-11-25T10:00:00.250Z`, `…+01:00`, or with a
    /// space for the `T`: `2013-01-01 00:15:00-06:00`) or plain Unix
    /// milliseconds (`1764064800250`). A date and time without a zone is
    /// refused, saying so: its instant is unknown.
    ///
    /// # Errors
    /// [`Error::InvalidTimestamp`] naming what is wrong.
    pub fn parse(s: &str) -> Result<Self> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            let ms = s
                .parse::<i64>()
                .map_err(|_| Error::InvalidTimestamp(format!("{s:?} is too large")))?;
            return Self::from_millis(ms);
        }
        parse_rfc3339(s)
            .ok_or_else(|| {
                Error::InvalidTimestamp(if parse_rfc3339(&format!("{s}Z")).is_some() {
                    format!(
                        "{s:?} has no time zone: end it with Z (UTC) or an offset such as -06:00"
                    )
                } else {
                    format!(
                        "{s:?} is neither RFC 3339 (2026-11-25T10:00:00.250Z) nor Unix milliseconds"
                    )
                })
            })
            .and_then(Self::from_millis)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let days_in_month = match mo {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => return None,
    };
    if d < 1 || d > days_in_month || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        // Milliseconds: first three digits, padded; finer digits truncated.
        for k in 0..3 {
            frac_ms = frac_ms * 10
                + b.get(start + k)
                    .filter(|_| start + k < i)
                    .map_or(0, |c| i64::from(c - b'0'));
        }
    }
    let offset_min = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let _ = (h1, h2, m1, m2);
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 60 + om;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    Some(secs * 1000 + frac_ms)
}

/// The RFC 3339 text of a [`Timestamp`] in years 0000–9999, written
/// without the formatting machinery (a server writes one per driver it
/// returns).
#[derive(Clone, Copy)]
pub struct Rfc3339([u8; 24]);

impl Rfc3339 {
    /// The text, e.g. `2026-11-25T10:00:00.250Z`.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Timestamp {
    /// The RFC 3339 text as [`Display`](fmt::Display) writes it, for years
    /// 0000–9999 (`None` outside them).
    pub fn rfc3339(self) -> Option<Rfc3339> {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000);
        let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
        if !(0..=9999).contains(&y) {
            return None;
        }
        let sod = secs.rem_euclid(86_400);
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut v: i64| {
            for i in (at..at + width).rev() {
                b[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
                v /= 10;
            }
        };
        put(0, 4, y);
        put(5, 2, mo);
        put(8, 2, d);
        put(11, 2, sod / 3600);
        put(14, 2, sod / 60 % 60);
        put(17, 2, sod % 60);
        put(20, 3, ms);
        Some(Rfc3339(b))
    }
}

/// A length of time for people: `45 s`, `12 min`, `5 h`, `3 days`,
/// `74 years` (rounded down, from milliseconds).
pub(crate) fn span(ms: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (31_557_600_000, "years"),
        (86_400_000, "days"),
        (3_600_000, "h"),
        (60_000, "min"),
    ];
    if ms < 120_000 {
        return format!("{:.1} s", ms as f64 / 1000.0);
    }
    // The largest unit of which it is at least two.
    let (size, unit) = UNITS
        .into_iter()
        .find(|(size, _)| ms >= 2 * size)
        .unwrap_or((60_000, "min"));
    format!("{} {unit}", ms / size)
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with millisecond precision: `2026-11-25T10:00:00.250Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rfc3339() {
            Some(text) => f.write_str(text.as_str()),
            None => self.write_general(f),
        }
    }
}

impl Timestamp {
    /// The same text through `fmt`, for any year (the fast writer's
    /// reference in tests).
    fn write_general(self, w: &mut impl fmt::Write) -> fmt::Result {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000);
        let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        write!(
            w,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            sod / 3600,
            sod / 60 % 60,
            sod % 60
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

/// A source of "now". The engine reads time only through this trait, so a
/// simulation or a replay can run on simulated time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(MAX_MS));
        Timestamp(ms.clamp(0, MAX_MS))
    }
}

/// A clock that only moves when told to: for tests, replays and simulations.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(AtomicI64::new(start.0))
    }

    /// Sets the time (it may go backwards; the engine copes).
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }

    /// Moves the time forward by `ms` milliseconds.
    pub fn advance(&self, ms: u64) {
        let now = Timestamp(self.0.load(Ordering::SeqCst));
        self.set(now.plus_millis(ms));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The general formatting the fast writer replaces.
    fn reference(t: Timestamp) -> String {
        let mut out = String::new();
        t.write_general(&mut out).unwrap();
        out
    }

    proptest::proptest! {
        #[test]
        fn the_fast_writer_matches_the_general_formatting(ms in -62_167_219_200_000_i64..253_402_300_800_000) {
            let t = Timestamp(ms);
            let fast = t.rfc3339().expect("years 0000-9999");
            proptest::prop_assert_eq!(fast.as_str(), reference(t));
            proptest::prop_assert_eq!(t.to_string(), reference(t));
            // Valid timestamps (1970 on) read back to themselves.
            if ms >= 0 {
                proptest::prop_assert_eq!(Timestamp::parse(fast.as_str()).expect("parses"), t);
            }
        }
    }

    #[test]
    fn years_outside_four_digits_use_the_general_formatting() {
        for ms in [-62_167_219_200_001_i64, 253_402_300_800_000] {
            let t = Timestamp(ms);
            assert!(t.rfc3339().is_none());
            assert_eq!(t.to_string(), reference(t));
        }
        assert_eq!(
            Timestamp(253_402_300_799_999).rfc3339().unwrap().as_str(),
            "9999-12-31T23:59:59.999Z"
        );
        assert_eq!(
            Timestamp(-62_167_219_200_000).rfc3339().unwrap().as_str(),
            "0000-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn parses_rfc3339_and_millis() {
        let t = Timestamp::parse("2026-11-25T10:00:00.250Z").unwrap();
        assert_eq!(t.as_millis(), 1_795_600_800_250);
        assert_eq!(t.to_string(), "2026-11-25T10:00:00.250Z");
        assert_eq!(Timestamp::parse("1795600800250").unwrap(), t);
        assert_eq!(Timestamp::parse("2026-11-25T11:00:00.25+01:00").unwrap(), t);
        assert_eq!(Timestamp::parse("2026-11-25T10:00:00.250999Z").unwrap(), t);
        assert_eq!(
            Timestamp::parse("1970-01-01T00:00:00Z").unwrap(),
            Timestamp::EPOCH
        );
        assert_eq!(
            Timestamp::parse("2024-02-29T00:00:00Z")
                .unwrap()
                .to_string(),
            "2024-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn rejects_malformed_and_out_of_range() {
        for bad in [
            "",
            "yesterday",
            "2026-11-25",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-25T24:00:00Z",
            "2026-11-25T10:00:00",
            "2026-11-25T10:00:00.Z",
            "2026-11-25T10:00:00+1:00",
            "1969-12-31T23:59:59Z",
            "-5",
            "99999999999999999999",
            "253402300800000",
        ] {
            let err = Timestamp::parse(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_timestamp", "{bad:?}");
        }
        assert!(Timestamp::from_millis(-1).is_err());
    }

    #[test]
    fn display_round_trips_over_many_days() {
        for day in (0..2_930_000).step_by(997) {
            let t = Timestamp::from_millis(day * 86_400_000 + 12_345).unwrap();
            assert_eq!(Timestamp::parse(&t.to_string()).unwrap(), t);
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp::from_millis(1000).unwrap());
        assert_eq!(c.now().as_millis(), 1000);
        c.advance(500);
        assert_eq!(c.now().as_millis(), 1500);
        assert!(SystemClock.now() > Timestamp::from_millis(1_700_000_000_000).unwrap());
    }
}
