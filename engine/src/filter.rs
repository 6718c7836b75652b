//! Filter summaries: a driver's filterable attributes as a few bits
//! ([`Traits`]), how many of a shard's drivers have each combination of
//! them ([`Combinations`]), and the index-wide summary ([`FleetTraits`]).
//!
//! A query's filters (a vehicle class, capabilities required) are the
//! [`Traits`] a driver must all have. Every tree node, shard and cell
//! carries the union of its available drivers' traits, so a walk skips
//! whatever cannot hold an eligible driver with one AND. A union cannot
//! tell "a wheelchair driver and a pets driver" from "a driver with both",
//! so inside the trees a filter of several attributes is pruned only as
//! far as each of them is absent; the drivers' own traits then decide.
//! The index-wide summary has no such blind spot: it knows every
//! combination some available driver has, so a filter nobody passes
//! (walkers with large items, where both exist but never together) is
//! answered before the first cell.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::driver::{Capabilities, Vehicle};

/// Bit of the first vehicle class; capabilities take the bits below it.
const VEHICLE_SHIFT: u32 = 16;

/// A set of filterable attributes: capability `i` at bit `i`, vehicle class
/// `v` at bit `16 + v`. One driver's traits have exactly one vehicle bit;
/// a summary (a union) has one per class present, and none when empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
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

/// Capabilities a driver can have (the bits of a [`Capabilities`]).
const CAP_BITS: usize = Capabilities::NAMES.len();
/// Capability sets: a [`Capabilities`]' bits index them.
const CAP_SETS: usize = 1 << CAP_BITS;
/// Vehicle classes.
const VEHICLES: usize = Vehicle::ALL.len();

impl Traits {
    /// The combination's place in a table of every vehicle class ×
    /// capability set (one driver's traits: one vehicle bit).
    fn combination(self) -> usize {
        let vehicle = (self.0 >> VEHICLE_SHIFT).trailing_zeros() as usize;
        vehicle * CAP_SETS + self.cap_set()
    }

    /// The capability bits, as a table index.
    fn cap_set(self) -> usize {
        (self.0 & 0xFFFF) as usize
    }

    /// The vehicle class asked for, as a table index; [`VEHICLES`] when
    /// any will do.
    fn vehicle_table(self) -> usize {
        match self.0 >> VEHICLE_SHIFT {
            0 => VEHICLES,
            v => v.trailing_zeros() as usize,
        }
    }
}

/// How many of a shard's available drivers have each combination of
/// traits: kept by its tree, sorted by traits (a shard's drivers share a
/// few combinations), with a flag raised whenever a combination appears
/// or goes, for the shard to tell the index ([`FleetTraits`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Combinations {
    counts: Vec<(Traits, u32)>,
    changed: bool,
}

impl Combinations {
    /// The combinations of these drivers' traits.
    pub(crate) fn of(traits: impl Iterator<Item = Traits>) -> Self {
        let mut all: Vec<Traits> = traits.collect();
        all.sort_unstable();
        let mut counts: Vec<(Traits, u32)> = Vec::new();
        for t in all {
            match counts.last_mut() {
                Some((last, n)) if *last == t => *n += 1,
                _ => counts.push((t, 1)),
            }
        }
        let changed = !counts.is_empty();
        Self { counts, changed }
    }

    /// One more driver with `t`.
    pub(crate) fn add(&mut self, t: Traits) {
        match self.counts.binary_search_by_key(&t, |e| e.0) {
            Ok(i) => self.counts[i].1 += 1,
            Err(i) => {
                self.counts.insert(i, (t, 1));
                self.changed = true;
            }
        }
    }

    /// One driver fewer with `t` (which one of them has).
    pub(crate) fn remove(&mut self, t: Traits) {
        let Ok(i) = self.counts.binary_search_by_key(&t, |e| e.0) else {
            debug_assert!(false, "no driver has {t:?}");
            return;
        };
        if self.counts[i].1 == 1 {
            self.counts.remove(i);
            self.changed = true;
        } else {
            self.counts[i].1 -= 1;
        }
    }

    /// The combinations present, in order.
    pub(crate) fn present(&self) -> impl Iterator<Item = Traits> + '_ {
        self.counts.iter().map(|e| e.0)
    }

    /// Whether a combination appeared or went since the flag was last
    /// cleared.
    #[inline]
    pub(crate) fn changed(&self) -> bool {
        self.changed
    }

    /// Clears the flag.
    pub(crate) fn clear_changed(&mut self) {
        self.changed = false;
    }

    /// How many drivers have `t`, for tests.
    #[cfg(test)]
    pub(crate) fn count(&self, t: Traits) -> u32 {
        self.counts
            .binary_search_by_key(&t, |e| e.0)
            .map_or(0, |i| self.counts[i].1)
    }
}

/// The index-wide summary, exact: which combinations of traits some
/// shard has, and for every filter, whether one of them passes it. A
/// search whose filter no available driver passes ends here, before the
/// first cell, however common each of its attributes is.
///
/// Two tables of counters, written only when a shard gains or loses a
/// combination (its last driver with it went, or its first came):
/// - `shards_with[c]`: how many shards have a driver with exactly the
///   combination `c` (vehicle class × capability set);
/// - `covering[t][r]`: how many combinations some shard has pass the
///   filter "vehicle class `t` (or any, the last table) and every
///   capability of `r`". A combination's arrival (its first shard) adds
///   one to the entry of each subset of its capabilities, in its class's
///   table and in the any-class table; its departure takes them off.
///
/// A filter is then one read: `covering[t][r] > 0`. A combination of `n`
/// capabilities touches `2 · 2ⁿ` counters when it appears or goes
/// fleet-wide, which real fleets do rarely (a driver's combination is
/// usually shared by many).
#[derive(Debug)]
pub(crate) struct FleetTraits {
    shards_with: Box<[AtomicU32]>,
    covering: Box<[AtomicU32]>,
}

impl Default for FleetTraits {
    fn default() -> Self {
        let zeros = |n: usize| (0..n).map(|_| AtomicU32::new(0)).collect();
        Self {
            shards_with: zeros(VEHICLES * CAP_SETS),
            covering: zeros((VEHICLES + 1) * CAP_SETS),
        }
    }
}

impl FleetTraits {
    /// Records that a shard's combinations went from `old` to `new` (both
    /// sorted). The caller holds that shard's write lock, so one shard's
    /// changes come in order, and calls this before its new tree can be
    /// read: a combination is counted before any search can find its
    /// driver, and uncounted only once none can.
    pub(crate) fn changed(&self, old: &[Traits], new: &[Traits]) {
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), b) if b.is_none_or(|b| a < b) => {
                    self.shard_lost(*a);
                    i += 1;
                }
                (_, Some(b)) => {
                    self.shard_gained(*b);
                    j += 1;
                }
                (_, None) => unreachable!("one side is left"),
            }
        }
    }

    fn shard_gained(&self, t: Traits) {
        if self.shards_with[t.combination()].fetch_add(1, Ordering::AcqRel) == 0 {
            self.cover(t, |c| {
                c.fetch_add(1, Ordering::AcqRel);
            });
        }
    }

    fn shard_lost(&self, t: Traits) {
        if self.shards_with[t.combination()].fetch_sub(1, Ordering::AcqRel) == 1 {
            self.cover(t, |c| {
                c.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }

    /// Calls `f` on every `covering` counter of a combination: each
    /// subset of its capabilities, in its class's table and the any-class
    /// one.
    fn cover(&self, t: Traits, f: impl Fn(&AtomicU32)) {
        let caps = t.cap_set();
        let tables = [t.combination() / CAP_SETS, VEHICLES];
        let mut sub = caps;
        loop {
            for table in tables {
                f(&self.covering[table * CAP_SETS + sub]);
            }
            if sub == 0 {
                break;
            }
            sub = (sub - 1) & caps;
        }
    }

    /// Whether some available driver has every attribute of `required`.
    /// Exact at every moment no shard is being written.
    #[inline]
    pub(crate) fn admit(&self, required: Traits) -> bool {
        let at = required.vehicle_table() * CAP_SETS + required.cap_set();
        self.covering[at].load(Ordering::Acquire) > 0
    }

    /// The union of the combinations some shard has, for tests.
    #[cfg(test)]
    pub(crate) fn union(&self) -> Traits {
        let mut all = Traits::NONE;
        for (c, n) in self.shards_with.iter().enumerate() {
            if n.load(Ordering::Acquire) > 0 {
                let caps = Capabilities::from_bits_truncate((c % CAP_SETS) as u16);
                all = all.union(Traits::of(Vehicle::ALL[c / CAP_SETS], caps));
            }
        }
        all
    }
}

/// Property-test strategies for traits, shared by the tests of the
/// modules that keep summaries.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    use super::Traits;
    use crate::driver::{Capabilities, Vehicle};

    /// A driver's traits: one of the first `vehicles` classes and any of
    /// the first `caps` capabilities.
    pub(crate) fn traits(vehicles: usize, caps: u32) -> impl Strategy<Value = Traits> {
        (0..vehicles, 0u16..1 << caps)
            .prop_map(|(v, c)| Traits::of(Vehicle::ALL[v], Capabilities::from_bits_truncate(c)))
    }

    /// A filter: maybe one of the first `vehicles` classes, and any of the
    /// first `caps` capabilities.
    pub(crate) fn required(vehicles: usize, caps: u32) -> impl Strategy<Value = Traits> {
        (prop::option::of(0..vehicles), 0u16..1 << caps).prop_map(|(v, c)| {
            Traits::required(
                v.map(|v| Vehicle::ALL[v]),
                Capabilities::from_bits_truncate(c),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
    fn combinations_count_and_flag_arrivals_and_departures() {
        let a = Traits::of(Vehicle::Car, "cash".parse().unwrap());
        let b = Traits::of(Vehicle::Walker, Capabilities::NONE);
        let mut c = Combinations::of([b, a, b].into_iter());
        assert!(c.changed());
        c.clear_changed();
        assert_eq!(c.present().collect::<Vec<_>>(), {
            let mut v = vec![a, b];
            v.sort();
            v
        });
        assert_eq!((c.count(a), c.count(b)), (1, 2));
        c.remove(b);
        c.add(a);
        assert!(!c.changed(), "counts moved, no combination came or went");
        c.remove(b);
        assert!(c.changed());
        assert_eq!(c.present().collect::<Vec<_>>(), [a]);
        assert!(!Combinations::of(std::iter::empty()).changed());
    }

    /// A driver's traits: one of three vehicle classes and any of four
    /// capabilities.
    fn traits() -> impl Strategy<Value = Traits> {
        strategies::traits(3, 4)
    }

    /// A filter: any vehicle class or one of four (one nobody has), and
    /// any of five capabilities (one nobody has).
    fn required() -> impl Strategy<Value = Traits> {
        strategies::required(4, 5)
    }

    proptest! {
        /// After any sequence of shards' changes, the fleet admits a
        /// filter exactly when a combination some shard has passes it.
        #[test]
        fn fleet_admits_exactly_what_some_shard_has(
            steps in prop::collection::vec(
                (0usize..4, prop::collection::btree_set(traits(), 0..6)),
                1..40,
            ),
            probes in prop::collection::vec(required(), 40),
        ) {
            let fleet = FleetTraits::default();
            let mut shards: [Vec<Traits>; 4] = Default::default();
            for (shard, new) in steps {
                let new: Vec<Traits> = new.into_iter().collect();
                fleet.changed(&shards[shard], &new);
                shards[shard] = new;
                for r in probes.iter().chain(&[Traits::NONE]) {
                    let some = shards.iter().flatten().any(|t| t.has(*r));
                    prop_assert_eq!(fleet.admit(*r), some, "{:?}", r);
                }
            }
            let union = shards.iter().flatten().fold(Traits::NONE, |u, t| u.union(*t));
            prop_assert_eq!(fleet.union(), union);
            // Every shard empties: nothing is admitted, nothing counted.
            for s in &mut shards {
                fleet.changed(s, &[]);
                s.clear();
            }
            prop_assert!(!fleet.admit(Traits::NONE));
            prop_assert!(fleet.covering.iter().all(|c| c.load(Ordering::Relaxed) == 0));
        }
    }
}
