//! Drivers: [`Driver`], its [`Status`], [`Vehicle`] class and [`Capabilities`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::ids::{DriverId, OrderId};
use crate::position::Position;
use crate::time::Timestamp;

/// Where a driver stands in the matching life cycle.
///
/// ```text
/// Available ──claim──▶ Reserved ──confirm──▶ Busy ──complete/release──▶ Available
///     ▲                   │ release / expiry                 
///     └───────────────────┘            any ──▶ Offline (releases a match)
/// ```
/// Only `Available` drivers are offered by nearest queries and claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Online and free: offered to nearest queries and claims.
    Available,
    /// Held for one order until it is confirmed, released or expires.
    Reserved,
    /// On a job (a confirmed match, or marked busy by the driver's app).
    Busy,
    /// Not working.
    Offline,
}

impl Status {
    /// The API name: `available`, `reserved`, `busy`, `offline`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Available => "available",
            Self::Reserved => "reserved",
            Self::Busy => "busy",
            Self::Offline => "offline",
        }
    }
}

impl FromStr for Status {
    type Err = Error;
    /// Parses the statuses a client may set: `available`, `busy`, `offline`
    /// (`reserved` is set only by matching).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "available" => Ok(Self::Available),
            "busy" => Ok(Self::Busy),
            "offline" => Ok(Self::Offline),
            _ => Err(Error::InvalidParameter(format!(
                "status {s:?} is not one of available, busy, offline"
            ))),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A driver's vehicle class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
#[repr(u8)]
pub enum Vehicle {
    /// A car (the default).
    #[default]
    Car,
    /// A bicycle.
    Bike,
    /// A scooter or motorbike.
    Scooter,
    /// A van.
    Van,
    /// A truck.
    Truck,
    /// On foot.
    Walker,
}

impl Vehicle {
    /// Every vehicle class, in declaration order.
    pub const ALL: [Self; 6] = [
        Self::Car,
        Self::Bike,
        Self::Scooter,
        Self::Van,
        Self::Truck,
        Self::Walker,
    ];

    /// The API name: `car`, `bike`, `scooter`, `van`, `truck`, `walker`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Car => "car",
            Self::Bike => "bike",
            Self::Scooter => "scooter",
            Self::Van => "van",
            Self::Truck => "truck",
            Self::Walker => "walker",
        }
    }
}

impl FromStr for Vehicle {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                Error::InvalidParameter(format!(
                    "vehicle {s:?} is not one of car, bike, scooter, van, truck, walker"
                ))
            })
    }
}

impl fmt::Display for Vehicle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of driver capabilities, stored as a bitset so filtering on the hot
/// path is one AND.
///
/// Known names: see [`Capabilities::NAMES`].
///
/// ```
/// # use hexmatch::Capabilities;
/// let driver: Capabilities = "cash,large_items".parse()?;
/// let wanted: Capabilities = "cash".parse()?;
/// assert!(driver.contains(wanted));
/// assert_eq!(driver.names().collect::<Vec<_>>(), ["cash", "large_items"]);
/// # Ok::<(), hexmatch::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(u16);

impl Capabilities {
    /// The capability names, bit 0 first.
    pub const NAMES: [&'static str; 12] = [
        "cash",
        "card",
        "large_items",
        "pets",
        "wheelchair",
        "child_seat",
        "refrigerated",
        "fragile",
        "alcohol",
        "pharmacy",
        "documents",
        "hazmat",
    ];

    /// The empty set.
    pub const NONE: Self = Self(0);

    /// Builds a set from names.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming the first unknown capability.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut bits = 0u16;
        for name in names {
            let bit = Self::NAMES.iter().position(|n| *n == name).ok_or_else(|| {
                Error::InvalidParameter(format!(
                    "unknown capability {name:?}; known: {}",
                    Self::NAMES.join(", ")
                ))
            })?;
            bits |= 1 << bit;
        }
        Ok(Self(bits))
    }

    /// Whether every capability of `required` is in `self`.
    #[inline]
    pub const fn contains(self, required: Self) -> bool {
        self.0 & required.0 == required.0
    }

    /// The raw bits (bit i = `NAMES[i]`).
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// The set from raw bits; bits without a name are dropped.
    pub const fn from_bits_truncate(bits: u16) -> Self {
        Self(bits & ((1 << Self::NAMES.len()) - 1))
    }

    /// The names in the set, in bit order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| *n)
    }
}

impl FromStr for Capabilities {
    type Err = Error;
    /// Parses a comma-separated list (`"cash,large_items"`; empty = none).
    fn from_str(s: &str) -> Result<Self> {
        Self::from_names(s.split(',').map(str::trim).filter(|n| !n.is_empty()))
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

/// A snapshot of one driver as the engine knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Driver {
    /// The driver's id.
    pub id: DriverId,
    /// Last applied position.
    pub pos: Position,
    /// Timestamp of the last applied update (the client's `ts`).
    pub ts: Timestamp,
    /// Matching status.
    pub status: Status,
    /// Vehicle class.
    pub vehicle: Vehicle,
    /// Capabilities.
    pub capabilities: Capabilities,
    /// The order this driver is reserved for or busy with, if any.
    pub order_id: Option<OrderId>,
    /// When the current reservation lapses, if reserved.
    pub reserved_until: Option<Timestamp>,
}

impl Driver {
    /// An available car with no capabilities and no match: the usual
    /// starting point for [`Engine::bulk_load`](crate::Engine::bulk_load).
    pub fn available(id: DriverId, pos: Position, ts: Timestamp) -> Self {
        Self {
            id,
            pos,
            ts,
            status: Status::Available,
            vehicle: Vehicle::Car,
            capabilities: Capabilities::NONE,
            order_id: None,
            reserved_until: None,
        }
    }
}

/// A full driver upsert (`PUT /v1/drivers/{id}`) or a location update with
/// optional attributes (the batch and stream ingestion paths).
///
/// `None` fields keep the driver's current value, or take the default
/// (available, car, no capabilities) for a new driver.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverUpdate {
    /// Which driver.
    pub id: DriverId,
    /// New position.
    pub pos: Position,
    /// Client timestamp; `None` means the engine clock's now.
    pub ts: Option<Timestamp>,
    /// New status, if any (`reserved` cannot be set by a client).
    pub status: Option<Status>,
    /// New vehicle class, if any.
    pub vehicle: Option<Vehicle>,
    /// New capability set, if any.
    pub capabilities: Option<Capabilities>,
}

impl DriverUpdate {
    /// A plain location update.
    pub fn location(id: DriverId, pos: Position, ts: Option<Timestamp>) -> Self {
        Self {
            id,
            pos,
            ts,
            status: None,
            vehicle: None,
            capabilities: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_names() {
        assert_eq!("van".parse::<Vehicle>().unwrap(), Vehicle::Van);
        assert_eq!("car".parse::<Vehicle>().unwrap().to_string(), "car");
        assert_eq!(
            "boat".parse::<Vehicle>().unwrap_err().code(),
            "invalid_parameter"
        );
        assert_eq!("busy".parse::<Status>().unwrap(), Status::Busy);
        assert_eq!(
            "reserved".parse::<Status>().unwrap_err().code(),
            "invalid_parameter"
        );
        assert_eq!(
            "cash,teleport".parse::<Capabilities>().unwrap_err().code(),
            "invalid_parameter"
        );
        assert_eq!("".parse::<Capabilities>().unwrap(), Capabilities::NONE);
    }

    #[test]
    fn capability_containment() {
        let all: Capabilities = Capabilities::NAMES.join(",").parse().unwrap();
        let some: Capabilities = "pets, hazmat".parse().unwrap();
        assert!(all.contains(some));
        assert!(!some.contains(all));
        assert!(some.contains(Capabilities::NONE));
        assert_eq!(Capabilities::from_bits_truncate(u16::MAX), all);
    }
}
