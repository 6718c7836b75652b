//! Shorthands the unit tests share: valid positions and ids from literals.

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
