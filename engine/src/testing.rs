//! Shorthands the unit tests share: valid positions and ids from literals,
//! and drivers' positions spread evenly over a square.

use crate::ids::{DriverId, OrderId};
use crate::position::Position;

/// A position the test knows is valid.
pub(crate) fn pos(lat: f64, lon: f64) -> Position {
    Position::new(lat, lon).unwrap()
}

/// An order id the test knows is valid.
pub(crate) fn oid(s: &str) -> OrderId {
    OrderId::new(s).unwrap()
}

/// A driver id the test knows is valid.
pub(crate) fn did(s: &str) -> DriverId {
    DriverId::new(s).unwrap()
}

/// The `i`-th point of an even (golden-ratio) spread over the square of
/// side `span` degrees whose south-west corner is at `lat`, `lon`.
pub(crate) fn scattered(i: u32, lat: f64, lon: f64, span: f64) -> Position {
    let f = f64::from(i);
    pos(
        lat + (f * 0.618_034).fract() * span,
        lon + (f * 0.414_214).fract() * span,
    )
}
