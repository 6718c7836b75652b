//! The driver map: `hash(DriverId) → Loc` (a driver's shard and slot), in
//! [`STRIPES`] stripes of [`StripeMap`], each behind its own mutex.

use std::collections::HashMap;

use foldhash::fast::FixedState;
use parking_lot::Mutex;

use crate::ids::DriverId;

/// Number of stripes of the driver → location map (a power of two).
pub(super) const STRIPES: usize = 64;

/// A stripe's table is shrunk only above this capacity.
const MIN_SHRINK_CAPACITY: usize = 256;

/// Where a driver's record lives: its shard's index in the
/// [`ShardTable`](super::shard::ShardTable) and its slot there (8 bytes,
/// where an `Arc` and a slot took 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) shard: u32,
    pub(crate) slot: u32,
}

/// One stripe of the driver map. It is keyed by the id's 64-bit hash, not
/// the id: 16-byte entries instead of 32. The record holds the id, and
/// every lookup checks it under the shard lock it takes anyway. An id
/// whose hash another id already holds goes to `collided`, keyed by the
/// id (about one id in 10^7 at 1M drivers; usually empty, and then never
/// probed).
#[derive(Debug, Default)]
pub(crate) struct StripeMap {
    pub(super) by_hash: HashMap<u64, Loc, FixedState>,
    pub(super) collided: HashMap<DriverId, Loc, FixedState>,
}

/// Which table of a [`StripeMap`] holds an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    ByHash,
    Collided,
}

/// What [`StripeMap::find`] found: where the record may be, and which
/// table holds the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Found {
    pub(super) loc: Loc,
    pub(super) place: Place,
}

impl StripeMap {
    /// Where `id` (of hash `h`) may be: a `Collided` answer is certain; a
    /// `ByHash` one holds some id of hash `h`, which the caller checks
    /// against the record.
    pub(super) fn find(&self, id: &DriverId, h: u64) -> Option<Found> {
        if !self.collided.is_empty()
            && let Some(loc) = self.collided.get(id)
        {
            return Some(Found {
                loc: *loc,
                place: Place::Collided,
            });
        }
        self.by_hash.get(&h).map(|loc| Found {
            loc: *loc,
            place: Place::ByHash,
        })
    }

    /// Enters an id that is not in the map.
    pub(super) fn add(&mut self, id: &DriverId, h: u64, loc: Loc) {
        match self.by_hash.entry(h) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(loc);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(id.clone(), loc);
            }
        }
    }

    /// Moves an id that is in the map (at `place`) to `loc`.
    pub(super) fn set(&mut self, place: Place, id: &DriverId, h: u64, loc: Loc) {
        match place {
            Place::ByHash => self.by_hash.insert(h, loc),
            Place::Collided => self.collided.insert(id.clone(), loc),
        };
    }

    /// Removes an id that is in the map (at `place`).
    pub(super) fn remove(&mut self, place: Place, id: &DriverId, h: u64) {
        match place {
            Place::ByHash => self.by_hash.remove(&h),
            Place::Collided => self.collided.remove(id),
        };
        // Give memory back once three quarters of the table are unused
        // (a fleet that came and went); halving the slack keeps the cost
        // of the rehash amortised over the removals that made it.
        let (len, cap) = (self.by_hash.len(), self.by_hash.capacity());
        if cap > MIN_SHRINK_CAPACITY && len * 4 < cap {
            self.by_hash.shrink_to(len * 2);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }
}

/// One stripe of the driver map, locked.
pub(super) type Stripe = Mutex<StripeMap>;

/// An id's key in the driver map: its hash, and the stripe that hash
/// picks.
pub(super) struct MapKey<'a> {
    pub(super) h: u64,
    pub(super) stripe: &'a Stripe,
}
