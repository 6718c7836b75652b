//! Filter summaries: a driver's filterable attributes as a few bits
//! ([`Traits`]), and the index-wide count of shards having each bit
//! ([`FleetTraits`]).
//!
//! A query's filters (a vehicle class, capabilities required) are the
//! [`Traits`] a driver must all have. Every tree node, shard and cell
//! carries the union of its available drivers' traits, so a walk skips
//! whatever cannot hold an eligible driver with one AND. A union cannot
//! tell "a wheelchair driver and a pets driver" from "a driver with both",
//! so a filter of several attributes is pruned only as far as each of
//! them is absent; the drivers' own traits then decide.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::driver::{Capabilities, Vehicle};

/// Bit of the first vehicle class; capabilities take the bits below it.
const VEHICLE_SHIFT: u32 = 16;

/// A set of filterable attributes: capability `i` at bit `i`, vehicle class
/// `v` at bit `16 + v`. One driver's traits have exactly one vehicle bit;
/// a summary (a union) has one per class present, and none when empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Traits(u32);

impl Traits {
    /// No attribute: the summary of nothing, or what a query without
    /// filters requires.
    pub(crate) const NONE: Self = Self(0);

    /// A driver's traits.
    #[inline]
    pub(crate) fn of(vehicle: Vehicle, caps: Capabilities) -> Self {
        Self(u32::from(caps.bits()) | 1 << (VEHICLE_SHIFT + vehicle as u32))
    }

    /// What a driver must have to pass the filters: the vehicle class, if
    /// one is asked for, and every capability asked for.
    pub(crate) fn required(vehicle: Option<Vehicle>, caps: Capabilities) -> Self {
        let v = vehicle.map_or(0, |v| 1 << (VEHICLE_SHIFT + v as u32));
        Self(u32::from(caps.bits()) | v)
    }

    /// The vehicle class of one driver's traits.
    #[cfg(test)]
    pub(crate) fn vehicle(self) -> Vehicle {
        let i = (self.0 >> VEHICLE_SHIFT).trailing_zeros() as usize;
        Vehicle::ALL.get(i).copied().unwrap_or_default()
    }

    /// The capabilities in the set.
    #[cfg(test)]
    pub(crate) fn capabilities(self) -> Capabilities {
        Capabilities::from_bits_truncate(self.0 as u16)
    }

    /// Whether the set is empty (a summary of no driver).
    #[inline]
    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every attribute of `required` is in the set: for one
    /// driver, whether it passes; for a summary, whether a driver under it
    /// may pass (never `false` when one does).
    #[inline]
    pub(crate) fn has(self, required: Self) -> bool {
        self.0 & required.0 == required.0
    }

    /// Whether a summary may hold a driver passing `required`: not empty,
    /// and [`has`](Self::has) it.
    #[inline]
    pub(crate) fn admits(self, required: Self) -> bool {
        !self.is_empty() && self.has(required)
    }

    /// The union of two sets.
    #[inline]
    #[must_use]
    pub(crate) fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The set's bits (for the index-wide counts).
    fn bits(self) -> u32 {
        self.0
    }
}

/// A shard's summary, read by searches without the shard's lock and
/// written under its write lock.
#[derive(Debug, Default)]
pub(crate) struct AtomicTraits(AtomicU32);

impl AtomicTraits {
    #[inline]
    pub(crate) fn load(&self) -> Traits {
        Traits(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn store(&self, t: Traits) {
        self.0.store(t.0, Ordering::Release);
    }
}

/// For each bit of [`Traits`], how many shards have it in their summary:
/// the index-wide summary, exact at every moment a shard is not being
/// written. A search for a filter some bit of which no shard has ends
/// here, before the first cell.
#[derive(Debug, Default)]
pub(crate) struct FleetTraits {
    shards_with: [AtomicU32; 32],
}

impl FleetTraits {
    /// Records that a shard's summary went from `old` to `new`. The caller
    /// holds that shard's write lock, so one shard's changes come in
    /// order; it stores `new` as the shard's summary between
    /// [`FleetTraits::gained`] and [`FleetTraits::lost`].
    ///
    /// Bits are counted before the shard shows them and uncounted after
    /// it stops showing them, so a count is never short of the shards
    /// showing its bit: a reader never misses a shard it could see.
    pub(crate) fn gained(&self, old: Traits, new: Traits) {
        for_each_bit(new.bits() & !old.bits(), |b| {
            self.shards_with[b].fetch_add(1, Ordering::AcqRel);
        });
    }

    /// See [`FleetTraits::gained`].
    pub(crate) fn lost(&self, old: Traits, new: Traits) {
        for_each_bit(old.bits() & !new.bits(), |b| {
            self.shards_with[b].fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Whether some shard's summary has every bit of `required` (each in
    /// some shard: the union of the shards' summaries has them all).
    pub(crate) fn admit(&self, required: Traits) -> bool {
        let mut ok = true;
        for_each_bit(required.bits(), |b| {
            ok &= self.shards_with[b].load(Ordering::Acquire) > 0;
        });
        ok
    }

    /// The union of every shard's summary, for tests.
    #[cfg(test)]
    pub(crate) fn union(&self) -> Traits {
        let mut bits = 0;
        for (b, n) in self.shards_with.iter().enumerate() {
            if n.load(Ordering::Acquire) > 0 {
                bits |= 1 << b;
            }
        }
        Traits(bits)
    }
}

/// Calls `f` with the index of every set bit of `bits`.
#[inline]
fn for_each_bit(mut bits: u32, mut f: impl FnMut(usize)) {
    while bits != 0 {
        f(bits.trailing_zeros() as usize);
        bits &= bits - 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traits_round_trip_and_filter() {
        let all: Capabilities = Capabilities::NAMES.join(",").parse().unwrap();
        for v in Vehicle::ALL {
            for caps in [Capabilities::NONE, "cash,pets".parse().unwrap(), all] {
                let t = Traits::of(v, caps);
                assert_eq!((t.vehicle(), t.capabilities()), (v, caps));
                assert!(t.has(Traits::required(None, caps)));
                assert!(t.has(Traits::required(Some(v), Capabilities::NONE)));
                for other in Vehicle::ALL.into_iter().filter(|o| *o != v) {
                    assert!(!t.has(Traits::required(Some(other), caps)));
                }
            }
        }
        let cash: Capabilities = "cash".parse().unwrap();
        let pets: Capabilities = "pets".parse().unwrap();
        let u = Traits::of(Vehicle::Car, cash).union(Traits::of(Vehicle::Van, pets));
        // A union admits the combination even though no driver has it.
        assert!(u.admits(Traits::required(None, "cash,pets".parse().unwrap())));
        assert!(!u.admits(Traits::required(Some(Vehicle::Bike), Capabilities::NONE)));
        assert!(!Traits::NONE.admits(Traits::NONE));
    }

    #[test]
    fn fleet_counts_follow_shards() {
        let fleet = FleetTraits::default();
        let cash: Capabilities = "cash".parse().unwrap();
        let a = Traits::of(Vehicle::Car, cash);
        let b = Traits::of(Vehicle::Van, Capabilities::NONE);
        // Two shards gain traits, one loses them again.
        for (old, new) in [
            (Traits::NONE, a),
            (Traits::NONE, a.union(b)),
            (a, Traits::NONE),
        ] {
            fleet.gained(old, new);
            fleet.lost(old, new);
        }
        assert_eq!(fleet.union(), a.union(b));
        assert!(fleet.admit(Traits::required(Some(Vehicle::Van), cash)));
        assert!(!fleet.admit(Traits::required(Some(Vehicle::Bike), cash)));
        fleet.lost(a.union(b), Traits::NONE);
        assert_eq!(fleet.union(), Traits::NONE);
        assert!(fleet.admit(Traits::NONE));
    }
}
