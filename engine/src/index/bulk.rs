//! Bulk load: many drivers at once, on every core: into an empty index
//! ([`Index::bulk_load`]), or into one in use ([`Index::load`]).

use std::collections::HashMap;
use std::sync::Arc;

use foldhash::fast::FixedState;
use h3o::CellIndex;

use crate::driver::{Driver, Status};
use crate::error::{Error, Result};
use crate::rtree::{Item, ShardTree};
use crate::time::Timestamp;

use super::Index;
use super::cells::CellFinder;
use super::drivers::{Loc, Place, STRIPES};
use super::shard::{Record, Shard, ShardData};

/// Refuses what neither [`Index::bulk_load`] nor [`Index::load`] (named
/// `what` in the error) takes: a reserved driver (reservations come back
/// with their matches), or 2^32 drivers or more at once.
///
/// # Errors
/// [`Error::InvalidParameter`], naming the first reserved driver.
pub(crate) fn check_loadable(drivers: &[Driver], what: &str) -> Result<()> {
    if let Some(d) = drivers.iter().find(|d| d.status == Status::Reserved) {
        return Err(Error::InvalidParameter(format!(
            "driver {} has status reserved; {what} takes no reservations",
            d.id
        )));
    }
    if u32::try_from(drivers.len()).is_err() {
        return Err(Error::InvalidParameter(format!(
            "{what} takes at most 2^32 - 1 drivers at once"
        )));
    }
    Ok(())
}

/// A driver's partition cell and id hash, as bulk load first finds them.
#[derive(Debug, Clone, Copy)]
struct Placed {
    cell: CellIndex,
    hash: u64,
}

/// The drivers bulk load puts in one shard: their indices in the input,
/// in input order (a driver's slot is its place here).
#[derive(Debug)]
struct Group {
    shard: Arc<Shard>,
    members: Vec<u32>,
}

impl Index {
    /// Loads many drivers into an empty index at once, building each
    /// shard's R-tree with its bulk loading (much faster than inserting
    /// one by one); `now` is their last-seen time. Later duplicates of an
    /// id replace earlier ones.
    ///
    /// Both cores share the work: the H3 cells (most of them found without
    /// h3o, see `CellFinder`), the driver map (by stripe) and the shards'
    /// trees (by shard). The maps and slabs are sized exactly.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] if the index already holds drivers or a
    /// driver has status `reserved`.
    pub(crate) fn bulk_load(
        &self,
        drivers: impl IntoIterator<Item = Driver>,
        now: Timestamp,
    ) -> Result<usize> {
        if !self.is_empty() {
            return Err(Error::InvalidParameter(
                "bulk_load needs an empty engine".into(),
            ));
        }
        let drivers: Vec<Driver> = drivers.into_iter().collect();
        check_loadable(&drivers, "bulk_load")?;
        let found = self.cells_and_hashes(&drivers);

        // Group the drivers by cell (input order within each), and give each
        // its shard and slot.
        let mut groups: HashMap<CellIndex, Vec<u32>, FixedState> = HashMap::default();
        for (i, Placed { cell, .. }) in found.iter().enumerate() {
            groups.entry(*cell).or_default().push(i as u32);
        }
        let mut locs = vec![Loc { shard: 0, slot: 0 }; drivers.len()];
        let groups: Vec<Group> = groups
            .into_iter()
            .map(|(cell, members)| {
                let shard = self.shard_for(cell);
                for (slot, &i) in members.iter().enumerate() {
                    locs[i as usize] = Loc {
                        shard: shard.idx,
                        slot: slot as u32,
                    };
                }
                Group { shard, members }
            })
            .collect();

        let replaced = self.fill_driver_map(&drivers, &found, &locs, &groups);

        // The shards, by shard: records (copied: moving them out of
        // `drivers` would be a pass on one core) into exact-size slabs,
        // then the trees.
        drop(found);
        crate::par::par_for_each_vec(groups, |Group { shard, members }| {
            let mut data = ShardData::default();
            let available = members
                .iter()
                .filter(|&&i| drivers[i as usize].status == Status::Available)
                .count();
            let mut items = Vec::with_capacity(available);
            // A little headroom: the first drivers to move in would
            // otherwise copy the whole slab (the pages stay untouched, so
            // resident memory does not grow until they are used).
            data.slots
                .reserve_exact(members.len() + members.len() / 16 + 16);
            for (slot, &i) in members.iter().enumerate() {
                let d = &drivers[i as usize];
                *data.counts.slot(d.status) += 1;
                let rec = Record::of(d, now);
                if rec.status == Status::Available {
                    items.push(rec.item(slot as u32));
                }
                data.slots.push(Some(rec));
            }
            data.tree = ShardTree::bulk_load(items);
            *self.write(&shard) = data;
        });
        drop(drivers);
        for loc in &replaced {
            self.write(self.shard(loc.shard)).take(loc.slot);
        }
        Ok(locs.len() - replaced.len())
    }

    /// Adds many drivers to an index that may hold others and serve
    /// searches and writes meanwhile (a takeover's restore), entering each
    /// shard's new drivers in its tree at once ([`ShardTree::extend`]: a
    /// rebuild by bulk loading where they are many) instead of one by one.
    /// `now` is their last-seen time; none is reserved.
    ///
    /// Returns the indices of the drivers it did not add because the
    /// index holds their id (from before, entered meanwhile by a
    /// concurrent write, or earlier in `drivers`), in input order: the
    /// caller applies them as updates.
    ///
    /// Three passes, each on every core, none holding a lock the next
    /// needs (locks are taken in the index's order):
    /// 1. by shard: the records go into the slabs, not yet into the trees,
    ///    so no search sees a driver the driver map does not know;
    /// 2. by stripe: each id enters the driver map, unless it is there
    ///    already (its record is then a loser);
    /// 3. by shard: the losers' records go, and the new available
    ///    drivers enter the tree: those still as pass 1 left them (a write
    ///    since has entered a driver it moved or changed itself).
    pub(crate) fn load(&self, drivers: &[Driver], now: Timestamp) -> Vec<usize> {
        debug_assert!(drivers.iter().all(|d| d.status != Status::Reserved));
        let found = self.cells_and_hashes(drivers);
        let mut by_cell: HashMap<CellIndex, Vec<u32>, FixedState> = HashMap::default();
        for (i, Placed { cell, .. }) in found.iter().enumerate() {
            by_cell.entry(*cell).or_default().push(i as u32);
        }
        let groups: Vec<Group> = by_cell
            .into_iter()
            .map(|(cell, members)| Group {
                shard: self.shard_for(cell),
                members,
            })
            .collect();
        let locs = self.load_records(drivers, &groups, now);
        let losers = self.enter_ids(drivers, &found, &locs);
        let mut lost = vec![false; drivers.len()];
        for &i in &losers {
            lost[i] = true;
        }
        self.index_loaded(drivers, &groups, &locs, &lost);
        losers
    }

    /// [`Index::load`]'s first pass, by shard: the records into the slabs,
    /// not the trees. Returns each driver's place.
    fn load_records(&self, drivers: &[Driver], groups: &[Group], now: Timestamp) -> Vec<Loc> {
        let placed = crate::par::par_map(groups, 2, |Group { shard, members }| {
            let mut data = self.write(shard);
            members
                .iter()
                .map(|&i| {
                    let d = &drivers[i as usize];
                    data.insert_unindexed(Record::of(d, now))
                })
                .collect::<Vec<u32>>()
        });
        let mut locs = vec![Loc { shard: 0, slot: 0 }; drivers.len()];
        for (Group { shard, members }, slots) in groups.iter().zip(&placed) {
            for (&i, &slot) in members.iter().zip(slots) {
                locs[i as usize] = Loc {
                    shard: shard.idx,
                    slot,
                };
            }
        }
        locs
    }

    /// [`Index::load`]'s second pass, by stripe: each id into the driver
    /// map, unless it is there already. Returns the drivers whose id was
    /// (the losers), in input order.
    fn enter_ids(&self, drivers: &[Driver], found: &[Placed], locs: &[Loc]) -> Vec<usize> {
        let mut by_stripe: Vec<Vec<u32>> = vec![Vec::new(); STRIPES];
        for (i, Placed { hash: h, .. }) in found.iter().enumerate() {
            by_stripe[Self::stripe_of(*h)].push(i as u32);
        }
        let jobs: Vec<(usize, Vec<u32>)> = by_stripe.into_iter().enumerate().collect();
        let mut losers: Vec<usize> = crate::par::par_map(&jobs, 2, |(s, members)| {
            let mut stripe = self.stripes[*s].lock();
            let mut losers = Vec::new();
            for &i in members {
                let i = i as usize;
                let (id, h) = (&drivers[i].id, found[i].hash);
                let known = stripe.find(id, h).is_some_and(|f| {
                    f.place == Place::Collided
                        || self
                            .shard(f.loc.shard)
                            .data
                            .read()
                            .record(f.loc.slot)
                            .is_some_and(|r| r.id == *id)
                });
                if known {
                    losers.push(i);
                } else {
                    stripe.add(id, h, locs[i]);
                }
            }
            losers
        })
        .into_iter()
        .flatten()
        .collect();
        losers.sort_unstable();
        losers
    }

    /// [`Index::load`]'s third pass, by shard: the losers' records out, and
    /// the new available drivers into the tree, those still as the first
    /// pass left them (a write since has entered a driver it moved or
    /// changed itself).
    fn index_loaded(&self, drivers: &[Driver], groups: &[Group], locs: &[Loc], lost: &[bool]) {
        crate::par::par_map(groups, 2, |Group { shard, members }| {
            let mut data = self.write(shard);
            let mut items = Vec::new();
            for &i in members {
                let (d, loc) = (&drivers[i as usize], locs[i as usize]);
                let ours = data.record(loc.slot).filter(|r| r.id == d.id);
                if lost[i as usize] {
                    // Not in the driver map: nothing but this pass writes it.
                    if ours.is_some() {
                        data.take(loc.slot);
                    }
                    continue;
                }
                let untouched = ours.filter(|r| r.status == Status::Available && r.pos == d.pos);
                if let Some(rec) = untouched
                    && !data.tree.holds(loc.slot)
                {
                    items.push(Item {
                        v: d.pos.to_unit_vector(),
                        slot: loc.slot,
                        traits: rec.traits(),
                    });
                }
            }
            data.tree.extend(items);
        });
    }

    /// Bulk load: enters every driver in the (empty) driver map, one
    /// stripe per task. `found` holds each driver's id hash, `locs` its
    /// place, `groups` each shard's drivers.
    fn fill_driver_map(
        &self,
        drivers: &[Driver],
        found: &[Placed],
        locs: &[Loc],
        groups: &[Group],
    ) -> Vec<Loc> {
        // The driver map, one stripe per task, in input order: a later
        // duplicate replaces an earlier one. Returns the replaced locations.
        let mut by_stripe: Vec<Vec<u32>> = vec![Vec::new(); STRIPES];
        for (i, Placed { hash: h, .. }) in found.iter().enumerate() {
            by_stripe[Self::stripe_of(*h)].push(i as u32);
        }
        // Which input driver a location holds (to tell a duplicate id from
        // another id of the same hash).
        let group_of_shard: HashMap<u32, usize, FixedState> = groups
            .iter()
            .enumerate()
            .map(|(g, Group { shard, .. })| (shard.idx, g))
            .collect();
        let driver_at =
            |loc: Loc| groups[group_of_shard[&loc.shard]].members[loc.slot as usize] as usize;
        let jobs: Vec<(usize, Vec<u32>)> = by_stripe.into_iter().enumerate().collect();
        crate::par::par_map(&jobs, 2, |(s, members)| {
            let mut map = self.stripes[*s].lock();
            map.by_hash.reserve(members.len());
            let mut replaced = Vec::new();
            for &i in members {
                let (i, h) = (i as usize, found[i as usize].hash);
                let id = &drivers[i].id;
                match map.by_hash.entry(h) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(locs[i]);
                    }
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        if drivers[driver_at(*e.get())].id == *id {
                            replaced.push(e.insert(locs[i]));
                        } else if let Some(old) = map.collided.insert(id.clone(), locs[i]) {
                            replaced.push(old);
                        }
                    }
                }
            }
            replaced
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Each driver's partition cell and id hash, on every core.
    fn cells_and_hashes(&self, drivers: &[Driver]) -> Vec<Placed> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let parts: Vec<&[Driver]> = drivers
            .chunks(drivers.len().div_ceil(threads).max(4096))
            .collect();
        crate::par::par_map(&parts, 2, |part| {
            let mut finder = CellFinder::new(self.resolution);
            part.iter()
                .map(|d| Placed {
                    cell: finder.cell(d.pos),
                    hash: self.id_hash(&d.id).h,
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }
}
