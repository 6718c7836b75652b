//! Writing drivers through the driver map: an update ([`Index::apply`]),
//! a status change, a removal. Each takes the driver's stripe, then its
//! shard's write lock (two shard locks never at once).

use h3o::CellIndex;

use crate::driver::{Capabilities, Driver, DriverUpdate, Status, Vehicle};
use crate::error::{Error, Result};
use crate::ids::DriverId;
use crate::position::Position;
use crate::time::Timestamp;

use super::Index;
use super::drivers::{Found, Loc, MapKey, StripeMap};
use super::shard::{Moved, Record};

/// What an update did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The update was applied; the driver as it now is.
    Applied(Driver),
    /// The update was older than the driver's last applied `ts` and was ignored.
    Stale {
        /// The `ts` of the update that is kept.
        current_ts: Timestamp,
    },
}

/// An update as it is applied: its `ts`, the engine-clock time now, and
/// the unit vector of its position.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    ts: Timestamp,
    now: Timestamp,
    v: [f64; 3],
}

impl Index {
    /// Applies an update with an already-decided status (None = keep, or the
    /// default for a new driver) at engine-clock time `now`. Caller holds
    /// the book if statuses change. An unknown driver is created only if
    /// `create`.
    pub(crate) fn apply(
        &self,
        u: &DriverUpdate,
        status: Option<Status>,
        create: bool,
        now: Timestamp,
    ) -> Result<Applied> {
        let ts = u.ts.unwrap_or(now);
        let v = u.pos.to_unit_vector();
        let MapKey { h, stripe } = self.id_hash(&u.id);
        let mut stripe = stripe.lock();
        // `None` when another id has the same hash and this one is new.
        if let Some(found) = stripe.find(&u.id, h)
            && let Some(applied) =
                self.apply_known(u, status, Arrival { ts, now, v }, found, h, &mut stripe)
        {
            return Ok(applied);
        }
        {
            if !create {
                return Err(Error::UnknownDriver(u.id.to_string()));
            }
            let rec = Record {
                id: u.id.clone(),
                pos: u.pos,
                ts,
                seen: now,
                status: status.unwrap_or(Status::Available),
                vehicle: u.vehicle.unwrap_or_default(),
                caps: u.capabilities.unwrap_or_default(),
            };
            let driver = rec.to_driver();
            let shard = self.shard_for(u.pos.cell(self.resolution));
            let slot = self.write(&shard).insert(rec, v);
            stripe.add(
                &u.id,
                h,
                Loc {
                    shard: shard.idx,
                    slot,
                },
            );
            Ok(Applied::Applied(driver))
        }
    }

    /// [`apply`](Self::apply) to a driver the map may hold at `loc` (`None`
    /// if the record there has another id); `v` is the new position's
    /// unit vector. The caller holds its stripe.
    fn apply_known(
        &self,
        u: &DriverUpdate,
        status: Option<Status>,
        Arrival { ts, now, v }: Arrival,
        Found { loc, place }: Found,
        h: u64,
        stripe: &mut StripeMap,
    ) -> Option<Applied> {
        let shard = self.shard(loc.shard);
        // Most moves stay well inside their cell: skip the H3 lookup then.
        let cell = if shard.inner.contains(&v) {
            shard.cell
        } else {
            u.pos.cell(self.resolution)
        };
        let update_rec = |rec: &mut Record| {
            rec.pos = u.pos;
            rec.ts = ts;
            rec.seen = now;
            if let Some(s) = status {
                rec.status = s;
            }
            if let Some(v) = u.vehicle {
                rec.vehicle = v;
            }
            if let Some(c) = u.capabilities {
                rec.caps = c;
            }
        };
        let mut old = self.write(shard);
        let Some(current) = old.record(loc.slot) else {
            unreachable!("driver map points at an empty slot");
        };
        if current.id != u.id {
            return None;
        }
        if ts < current.ts {
            return Some(Applied::Stale {
                current_ts: current.ts,
            });
        }
        if shard.cell == cell {
            let driver = old.modify(loc.slot, Some(Moved { pos: u.pos, v }), |rec| {
                update_rec(rec);
                rec.to_driver()
            });
            return Some(Applied::Applied(driver.unwrap_or_else(|| unreachable!())));
        }
        // Crossing into another cell: take it out, then put it in the new
        // shard (never holding two shard locks).
        let Some(mut rec) = old.take(loc.slot) else {
            unreachable!()
        };
        drop(old);
        update_rec(&mut rec);
        let driver = rec.to_driver();
        let shard = self.shard_for(cell);
        let slot = self.write(&shard).insert(rec, v);
        stripe.set(
            place,
            &u.id,
            h,
            Loc {
                shard: shard.idx,
                slot,
            },
        );
        Some(Applied::Applied(driver))
    }

    /// Changes a driver's status if it is currently `from`, keeping the
    /// R-tree in step. Returns the driver's position when it changed.
    /// The caller holds the matching book.
    pub(crate) fn transition(&self, id: &DriverId, from: Status, to: Status) -> Option<Position> {
        self.modify_if(id, |rec, _| rec.status == from, to)
    }

    /// Sets a driver's status whatever it was (restore). True if the driver exists.
    pub(crate) fn force_status(&self, id: &DriverId, to: Status) -> bool {
        self.modify_if(id, |_, _| true, to).is_some()
    }

    /// Reserves `id` if it is available and still passes the filters
    /// (its cell among those `in_cell` admits).
    pub(crate) fn reserve_if_eligible(
        &self,
        id: &DriverId,
        vehicle: Option<Vehicle>,
        caps: Capabilities,
        in_cell: impl Fn(CellIndex) -> bool,
    ) -> Option<Position> {
        self.modify_if(
            id,
            |rec, cell| {
                rec.status == Status::Available
                    && vehicle.is_none_or(|v| v == rec.vehicle)
                    && rec.caps.contains(caps)
                    && in_cell(cell)
            },
            Status::Reserved,
        )
    }

    fn modify_if(
        &self,
        id: &DriverId,
        cond: impl Fn(&Record, CellIndex) -> bool,
        to: Status,
    ) -> Option<Position> {
        let MapKey { h, stripe } = self.id_hash(id);
        let stripe = stripe.lock();
        let Found { loc, .. } = stripe.find(id, h)?;
        let shard = self.shard(loc.shard);
        let mut data = self.write(shard);
        let rec = data.record(loc.slot)?;
        if rec.id != *id || !cond(rec, shard.cell) {
            return None;
        }
        data.modify(loc.slot, None, |rec| {
            rec.status = to;
            rec.pos
        })
    }

    /// Removes a driver if `cond` holds for its record. Returns the driver
    /// as it was, or `None` if unknown (or `cond` failed). The caller holds
    /// the matching book, and ends the driver's match.
    pub(crate) fn remove_where(
        &self,
        id: &DriverId,
        cond: impl Fn(&Record) -> bool,
    ) -> Option<Driver> {
        let MapKey { h, stripe } = self.id_hash(id);
        let mut stripe = stripe.lock();
        let Found { loc, place } = stripe.find(id, h)?;
        let rec = {
            let mut data = self.write(self.shard(loc.shard));
            let rec = data.record(loc.slot)?;
            if rec.id != *id || !cond(rec) {
                return None;
            }
            data.take(loc.slot)?
        };
        stripe.remove(place, id, h);
        drop(stripe);
        Some(rec.to_driver())
    }
}
