//! The engine's one error type.

use thiserror::Error;

/// Everything that can go wrong in the engine.
///
/// Each variant has a stable [`code`](Error::code) that the server maps to an
/// HTTP status in exactly one place. Invalid input never changes state.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum Error {
    /// A latitude/longitude pair that is not finite or out of range.
    #[error("invalid position: {0}")]
    InvalidPosition(String),
    /// A driver, order or region id that is empty, too long or has a forbidden character.
    #[error("invalid id: {0}")]
    InvalidId(String),
    /// A timestamp that cannot be parsed or is out of range.
    #[error("invalid timestamp: {0}")]
    InvalidTimestamp(String),
    /// Any other parameter out of its documented range (k, radius, hold, config …).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// No driver with this id is known.
    #[error("unknown driver {0}")]
    UnknownDriver(String),
    /// No match with this order id is known.
    #[error("unknown order {0}")]
    UnknownOrder(String),
    /// No eligible driver is available within the search limits.
    #[error("no driver available within the search limits")]
    NoDriverAvailable,
    /// The driver exists but its state does not allow the operation.
    #[error("driver {0} is not available")]
    DriverNotAvailable(String),
    /// The order exists in a state that does not allow the operation, or was
    /// created with different parameters.
    #[error("order conflict: {0}")]
    OrderConflict(String),
    /// The reservation's hold time ran out before it was confirmed.
    #[error("reservation for order {0} has expired")]
    ReservationExpired(String),
    /// Snapshot or durable-record bytes that fail their checks.
    #[error("corrupt snapshot: {0}")]
    CorruptSnapshot(String),
}

impl Error {
    /// The stable, `snake_case` error code of API.md.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidPosition(_) => "invalid_position",
            Self::InvalidId(_) => "invalid_id",
            Self::InvalidTimestamp(_) => "invalid_timestamp",
            Self::InvalidParameter(_) => "invalid_parameter",
            Self::UnknownDriver(_) => "unknown_driver",
            Self::UnknownOrder(_) => "unknown_order",
            Self::NoDriverAvailable => "no_driver_available",
            Self::DriverNotAvailable(_) => "driver_not_available",
            Self::OrderConflict(_) => "order_conflict",
            Self::ReservationExpired(_) => "reservation_expired",
            Self::CorruptSnapshot(_) => "corrupt_snapshot",
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
