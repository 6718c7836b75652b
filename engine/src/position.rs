//! [`Position`] (validated WGS84 degrees) and the spherical geometry the
//! index is built on.
//!
//! The index stores every point as a unit vector in 3D (Earth-centred,
//! on the unit sphere). The straight-line *chord* between two unit vectors
//! is a strictly increasing function of the great-circle angle
//! (`chord = 2·sin(θ/2)`), so "k nearest by chord" is "k nearest by
//! great-circle distance", with no special case at the antimeridian or the
//! poles. Reported distances are haversine metres.

use std::fmt;

use crate::error::{Error, Result};

/// Mean Earth radius in metres (IUGG), as API.md specifies.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// A validated WGS84 position in degrees: both finite, `lat` in [-90, 90],
/// `lon` in [-180, 180].
#[derive(Clone, Copy, PartialEq, PartialOrd)]
pub struct Position {
    lat: f64,
    lon: f64,
}

impl Position {
    /// Validates a latitude/longitude pair in degrees.
    ///
    /// # Errors
    /// [`Error::InvalidPosition`] when either is NaN, infinite or out of range.
    ///
    /// ```
    /// # use hexmatch::Position;
    /// let loop_ = Position::new(41.8786, -87.6251)?;
    /// assert_eq!(loop_.lat(), 41.8786);
    /// assert!(Position::new(f64::NAN, 0.0).is_err());
    /// assert!(Position::new(0.0, 180.5).is_err());
    /// # Ok::<(), hexmatch::Error>(())
    /// ```
    pub fn new(lat: f64, lon: f64) -> Result<Self> {
        if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
            return Err(Error::InvalidPosition(format!(
                "lat {lat} is not a finite number in [-90, 90]"
            )));
        }
        if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
            return Err(Error::InvalidPosition(format!(
                "lon {lon} is not a finite number in [-180, 180]"
            )));
        }
        // Normalise -0.0 so equal positions hash and compare alike.
        Ok(Self {
            lat: lat + 0.0,
            lon: lon + 0.0,
        })
    }

    /// Latitude in degrees.
    pub const fn lat(self) -> f64 {
        self.lat
    }

    /// Longitude in degrees.
    pub const fn lon(self) -> f64 {
        self.lon
    }

    /// The point as a unit vector (x towards 0°N 0°E, z towards the North Pole).
    pub fn to_unit_vector(self) -> [f64; 3] {
        let (slat, clat) = self.lat.to_radians().sin_cos();
        let (slon, clon) = self.lon.to_radians().sin_cos();
        [clat * clon, clat * slon, slat]
    }

    /// Great-circle distance in metres (haversine formula, mean Earth radius).
    pub fn distance_m(self, other: Self) -> f64 {
        DistanceFrom::new(self).to(other)
    }

    /// The H3 cell containing this position at `resolution`.
    pub(crate) fn cell(self, resolution: h3o::Resolution) -> h3o::CellIndex {
        // Range-checked in `new`, so the conversion cannot fail; fall back to
        // the origin rather than panic if h3o ever tightens its checks.
        h3o::LatLng::new(self.lat, self.lon)
            .unwrap_or_else(|_| h3o::LatLng::new(0.0, 0.0).unwrap_or_else(|_| unreachable!()))
            .to_cell(resolution)
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.lat, self.lon)
    }
}

/// Squared chord length on the unit sphere between two unit vectors.
/// Haversine distances from one position, its own trigonometry done once
/// (a search ranks its candidates with it). [`Position::distance_m`] is
/// this very computation, so both agree to the last bit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DistanceFrom {
    lon: f64,
    lat: f64,
    cos_lat: f64,
}

impl DistanceFrom {
    pub(crate) fn new(from: Position) -> Self {
        let lat = from.lat.to_radians();
        Self {
            lon: from.lon,
            lat,
            cos_lat: lat.cos(),
        }
    }

    /// Haversine metres to `other`.
    #[inline]
    pub(crate) fn to(&self, other: Position) -> f64 {
        let lat2 = other.lat.to_radians();
        let dlat = lat2 - self.lat;
        let dlon = (other.lon - self.lon).to_radians();
        let h = (dlat / 2.0).sin().powi(2) + self.cos_lat * lat2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_M * h.sqrt().min(1.0).asin()
    }
}

#[inline]
pub(crate) fn chord2(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    let (dx, dy, dz) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    dx * dx + dy * dy + dz * dz
}

/// The chord length on the unit sphere of a great-circle distance in metres
/// (2 for anything at or beyond half the circumference).
pub(crate) fn chord_of_metres(m: f64) -> f64 {
    let angle = m / EARTH_RADIUS_M;
    if angle >= std::f64::consts::PI {
        2.0
    } else {
        2.0 * (angle / 2.0).sin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_every_invalid_coordinate() {
        for (lat, lon) in [
            (f64::NAN, 0.0),
            (0.0, f64::NAN),
            (f64::INFINITY, 0.0),
            (0.0, f64::NEG_INFINITY),
            (90.000_001, 0.0),
            (-91.0, 0.0),
            (0.0, 180.000_001),
            (0.0, -181.0),
        ] {
            let err = Position::new(lat, lon).unwrap_err();
            assert_eq!(err.code(), "invalid_position", "({lat}, {lon})");
        }
        assert!(Position::new(90.0, 180.0).is_ok());
        assert!(Position::new(-90.0, -180.0).is_ok());
    }

    #[test]
    fn distance_matches_known_values() {
        let a = Position::new(0.0, 0.0).unwrap();
        let b = Position::new(0.0, 1.0).unwrap();
        let one_degree = EARTH_RADIUS_M * std::f64::consts::PI / 180.0;
        assert!((a.distance_m(b) - one_degree).abs() < 1e-6);
        // Across the antimeridian: 0.2° of longitude on the equator.
        let w = Position::new(0.0, 179.9).unwrap();
        let e = Position::new(0.0, -179.9).unwrap();
        assert!((w.distance_m(e) - 0.2 * one_degree).abs() < 1e-6);
        // Antipodes.
        let n = Position::new(90.0, 0.0).unwrap();
        let s = Position::new(-90.0, 0.0).unwrap();
        assert!((n.distance_m(s) - EARTH_RADIUS_M * std::f64::consts::PI).abs() < 1e-6);
    }

    #[test]
    fn chord_is_monotone_with_distance() {
        let p = Position::new(41.88, -87.63).unwrap();
        let v = p.to_unit_vector();
        for i in 1..200 {
            let q =
                Position::new(41.88 + f64::from(i) * 0.3 - 30.0, -87.63 + f64::from(i)).unwrap();
            let c = chord2(&v, &q.to_unit_vector()).sqrt();
            let expect = chord_of_metres(p.distance_m(q));
            assert!((c - expect).abs() < 1e-12, "{c} vs {expect}");
        }
        assert!((chord_of_metres(1e9) - 2.0).abs() < 1e-15);
    }
}
