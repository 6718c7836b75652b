//! Matching: atomic reservations that never double-book. This module
//! holds the match book and the matching API's types; the engine's
//! matching operations (`engine/matches.rs`) run under the book.
//!
//! All match state lives in one [`MatchBook`] behind a mutex that is the
//! first lock in the engine's lock order (book → driver stripe → shard).
//! A claim searches *without* the book (searches are the expensive part),
//! then takes the book and reserves the best candidate under its shard's
//! write lock, re-checking that it is still available and eligible; a
//! candidate lost to a concurrent claim is skipped and, if all are lost,
//! the claim searches again. Every change of a driver's status by matching
//! happens under the book, so "a driver holds at most one live match" and
//! "a reserved driver is never offered" are invariants of one critical
//! section, not of a protocol between several.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasher;

use foldhash::fast::FixedState;
use h3o::CellIndex;
use hashbrown::HashTable;

use crate::area::CellSet;
use crate::driver::{Capabilities, Status, Vehicle};
use crate::error::{Error, Result};
use crate::ids::{DriverId, OrderId};
use crate::position::Position;
use crate::search::{NearestQuery, validate_radius};
use crate::time::Timestamp;

/// The longest a reservation may be held: one hour.
pub const MAX_HOLD_MS: u64 = 3_600_000;

/// A match's life-cycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchState {
    /// The driver is held for the order until `reserved_until`.
    Reserved,
    /// The order was confirmed; the driver is busy with it.
    Confirmed,
    /// Released by the client, or because the driver went offline or was removed.
    Released,
    /// Not confirmed before `reserved_until`.
    Expired,
    /// The job is done; the driver is available again.
    Completed,
}

impl MatchState {
    /// The API name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Confirmed => "confirmed",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Completed => "completed",
        }
    }

    /// Whether the match still holds its driver.
    pub const fn is_live(self) -> bool {
        matches!(self, Self::Reserved | Self::Confirmed)
    }
}

/// What an order asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRequest {
    /// Pickup position.
    pub pickup: Position,
    /// Required vehicle class, if any.
    pub vehicle: Option<Vehicle>,
    /// Required capabilities.
    pub capabilities: Capabilities,
    /// Search radius in metres; `None` = the engine's `max_radius_m`.
    pub radius_m: Option<f64>,
    /// How long the reservation holds before it expires, in milliseconds.
    pub hold_ms: u64,
    /// Only drivers in these partition cells (a region's), if set.
    pub within: Option<CellSet>,
}

impl ClaimRequest {
    /// A request with no filters and the default hold of 30 s.
    pub fn new(pickup: Position) -> Self {
        Self {
            pickup,
            vehicle: None,
            capabilities: Capabilities::NONE,
            radius_m: None,
            hold_ms: 30_000,
            within: None,
        }
    }

    /// Checks the radius and the hold.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a radius or a hold out of range.
    pub fn validate(&self) -> Result<()> {
        if let Some(r) = self.radius_m {
            validate_radius(r)?;
        }
        if !(1..=MAX_HOLD_MS).contains(&self.hold_ms) {
            return Err(Error::InvalidParameter(format!(
                "hold_ms {} is not in 1..={MAX_HOLD_MS}",
                self.hold_ms
            )));
        }
        Ok(())
    }

    /// Whether a driver in partition cell `cell` may serve this request.
    pub(crate) fn admits_cell(&self, cell: CellIndex) -> bool {
        self.within
            .as_ref()
            .is_none_or(|cells| cells.contains(cell))
    }

    /// The nearest query for `k` candidates of this request: its pickup,
    /// radius and filters.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for `k` out of range.
    pub fn query(&self, k: usize) -> Result<NearestQuery> {
        let mut q = NearestQuery::new(self.pickup, k)?;
        q.radius_m = self.radius_m;
        q.vehicle = self.vehicle;
        q.capabilities = self.capabilities;
        q.within.clone_from(&self.within);
        Ok(q)
    }
}

/// A driver reserved (or once reserved) for an order.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// The order.
    pub order_id: OrderId,
    /// The driver.
    pub driver_id: DriverId,
    /// The order's pickup.
    pub pickup: Position,
    /// Great-circle distance from the driver to the pickup at reservation, metres.
    pub distance_m: f64,
    /// Current state.
    pub state: MatchState,
    /// When the match was made.
    pub created_at: Timestamp,
    /// When an unconfirmed reservation lapses.
    pub reserved_until: Timestamp,
    /// When it was released, expired or completed.
    pub ended_at: Option<Timestamp>,
    /// Why it ended, for released matches (`client`, `driver_offline`, …).
    pub reason: Option<String>,
}

/// A match that ended without a client call (expiry, driver offline or
/// removed): the server turns these into metrics and events.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchEvent {
    /// The match as it now is (state `expired`, `released` or `completed`).
    pub m: Match,
}

/// Why a driver's match ends from the driver's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DriverEnd {
    Removed,
    Offline,
    Busy,
    Completed,
}

/// What a client's status request means for a driver that may hold a
/// match ([`MatchBook::status_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusRequest {
    /// The status to apply (`None`: keep the driver's).
    pub(crate) status: Option<Status>,
    /// How the driver's match ends if the update applies.
    pub(crate) end: Option<DriverEnd>,
}

/// A match in the book, with the request that made it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) m: Match,
    pub(crate) request: ClaimRequest,
}

/// All match state. Guarded by the engine's book mutex.
#[derive(Debug, Default)]
pub(crate) struct MatchBook {
    /// Live (reserved or confirmed) matches by order.
    live: HashMap<OrderId, Entry, FixedState>,
    /// Live matches by driver.
    by_driver: HashMap<DriverId, OrderId, FixedState>,
    /// Reserved matches by deadline.
    deadlines: BTreeSet<(Timestamp, OrderId)>,
    /// Ended matches, readable until their retention passes.
    ended: EndedLog,
}

/// Ended matches in the order they ended, in segments of at most
/// [`SEGMENT_LEN`] entries.
///
/// One table of every ended match would rehash all of them, under the
/// book's lock, each time it doubled: at 30k claims/s and an hour's
/// retention that is a stall of tens of milliseconds for every claim (the
/// 105 ms p99 of the HTTP claim load measured at `c397bfb`), and memory
/// without bound. Segments bound the work of one insert to rehashing one
/// segment, forgetting is dropping whole segments from the front, and
/// [`EngineConfig::max_ended_matches`](crate::EngineConfig::max_ended_matches)
/// bounds the memory: past it, the oldest segment is forgotten early.
#[derive(Debug, Default)]
struct EndedLog {
    segments: VecDeque<Segment>,
    len: usize,
}

/// A run of ended matches: the entries in the order they ended (an order
/// that ends again within the run replaces its entry), and an index of
/// them by order id holding only 4-byte positions. A table of whole
/// entries would copy them on every doubling (a 1.6 MB move at the last
/// one) and keep a second copy of each order id.
#[derive(Debug)]
pub(crate) struct Segment {
    /// The latest `ended_at` in it.
    newest: Timestamp,
    /// Reserved whole at creation: never reallocated.
    entries: Vec<Entry>,
    /// Positions in `entries`, hashed by their entry's order id.
    index: HashTable<u32>,
}

/// Entries per segment of the [`EndedLog`]: small enough that a segment's
/// index grows cheaply, large enough that a lookup scans few segments.
pub(crate) const SEGMENT_LEN: usize = 8192;

fn order_hash(order: &OrderId) -> u64 {
    FixedState::default().hash_one(order)
}

impl Segment {
    fn new() -> Self {
        Self {
            newest: Timestamp::default(),
            entries: Vec::with_capacity(SEGMENT_LEN),
            index: HashTable::with_capacity(SEGMENT_LEN),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&self, order: &OrderId) -> Option<&Entry> {
        let i = self.index.find(order_hash(order), |&i| {
            self.entries[i as usize].m.order_id == *order
        })?;
        self.entries.get(*i as usize)
    }

    /// Adds an ended match, or replaces the entry of its order.
    fn put(&mut self, e: Entry) {
        let Self { entries, index, .. } = self;
        let found = index.entry(
            order_hash(&e.m.order_id),
            |&i| entries[i as usize].m.order_id == e.m.order_id,
            |&i| order_hash(&entries[i as usize].m.order_id),
        );
        match found {
            hashbrown::hash_table::Entry::Occupied(at) => entries[*at.get() as usize] = e,
            hashbrown::hash_table::Entry::Vacant(slot) => {
                // A segment holds at most SEGMENT_LEN entries.
                slot.insert(entries.len() as u32);
                entries.push(e);
            }
        }
    }
}

impl EndedLog {
    /// Appends an ended match; past `max` entries, forgets the oldest
    /// segment and returns it.
    fn push(&mut self, e: Entry, max: usize) -> Option<Segment> {
        let start_new = self.segments.back().is_none_or(|s| s.len() >= SEGMENT_LEN);
        if start_new {
            self.segments.push_back(Segment::new());
        }
        let seg = self.segments.back_mut()?;
        seg.newest = seg.newest.max(e.m.ended_at.unwrap_or_default());
        let before = seg.len();
        seg.put(e);
        self.len += seg.len() - before;
        if self.len > max && self.segments.len() > 1 {
            let old = self.segments.pop_front()?;
            self.len -= old.len();
            return Some(old);
        }
        None
    }

    /// The latest ended match of an order still within its retention.
    fn get(&self, order: &OrderId, now: Timestamp, retention_ms: u64) -> Option<&Entry> {
        self.segments
            .iter()
            .rev()
            .find_map(|s| s.get(order))
            .filter(|e| {
                e.m.ended_at
                    .is_some_and(|t| t.plus_millis(retention_ms) > now)
            })
    }

    /// Takes the segments whose every match is past its retention.
    fn take_forgotten(&mut self, now: Timestamp, retention_ms: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        while self
            .segments
            .front()
            .is_some_and(|s| s.newest.plus_millis(retention_ms) <= now)
        {
            if let Some(old) = self.segments.pop_front() {
                self.len -= old.len();
                out.push(old);
            }
        }
        out
    }
}

impl MatchBook {
    pub(crate) fn live_match_of(&self, driver: &DriverId) -> Option<&Match> {
        let order = self.by_driver.get(driver)?;
        self.live.get(order).map(|e| &e.m)
    }

    /// Decides what a client's status request means for a driver that may
    /// hold a match: the status to apply (None = keep) and the match end
    /// to record if the update applies.
    pub(crate) fn status_request(&self, driver: &DriverId, wanted: Status) -> StatusRequest {
        let decide = |status, end| StatusRequest { status, end };
        let Some(state) = self.live_match_of(driver).map(|m| m.state) else {
            return decide(Some(wanted), None);
        };
        match (state, wanted) {
            (MatchState::Reserved | MatchState::Confirmed, Status::Offline) => {
                decide(Some(Status::Offline), Some(DriverEnd::Offline))
            }
            (MatchState::Reserved, Status::Busy) => {
                decide(Some(Status::Busy), Some(DriverEnd::Busy))
            }
            (MatchState::Confirmed, Status::Available) => {
                decide(Some(Status::Available), Some(DriverEnd::Completed))
            }
            _ => decide(None, None),
        }
    }

    /// Ends the driver's live match, if any, for a driver-side reason.
    pub(crate) fn finish_for_driver(
        &mut self,
        driver: &DriverId,
        why: DriverEnd,
        now: Timestamp,
        max_ended: usize,
    ) -> Option<MatchEvent> {
        let order = self.by_driver.get(driver)?.clone();
        let (state, reason) = match why {
            DriverEnd::Removed => (MatchState::Released, "driver_removed"),
            DriverEnd::Offline => (MatchState::Released, "driver_offline"),
            DriverEnd::Busy => (MatchState::Released, "driver_busy"),
            DriverEnd::Completed => (MatchState::Completed, "completed"),
        };
        let m = self.end(&order, state, Some(reason), now, max_ended)?;
        Some(MatchEvent { m })
    }

    /// Moves a live match to a final state, forgets its driver link and
    /// files it with the ended matches (keeping at most `max_ended`).
    pub(crate) fn end(
        &mut self,
        order: &OrderId,
        state: MatchState,
        reason: Option<&str>,
        now: Timestamp,
        max_ended: usize,
    ) -> Option<Match> {
        let mut e = self.live.remove(order)?;
        if e.m.state == MatchState::Reserved {
            self.deadlines.remove(&(e.m.reserved_until, order.clone()));
        }
        e.m.state = state;
        e.m.ended_at = Some(now);
        e.m.reason = reason.map(str::to_owned);
        self.by_driver.remove(&e.m.driver_id);
        let m = e.m.clone();
        // A forgotten segment is dropped here, under the book: at most
        // SEGMENT_LEN entries, once per SEGMENT_LEN ends past the cap.
        drop(self.ended.push(e, max_ended));
        Some(m)
    }

    /// Forgets the driver's live match, if any, without ending it: no
    /// ended entry is kept.
    pub(crate) fn forget_driver(&mut self, driver: &DriverId) {
        let Some(order) = self.by_driver.remove(driver) else {
            return;
        };
        if let Some(e) = self.live.remove(&order)
            && e.m.state == MatchState::Reserved
        {
            self.deadlines.remove(&(e.m.reserved_until, order));
        }
    }

    /// Enters a new reserved match, with its deadline.
    pub(crate) fn insert(&mut self, m: Match, request: ClaimRequest) {
        self.deadlines
            .insert((m.reserved_until, m.order_id.clone()));
        self.by_driver
            .insert(m.driver_id.clone(), m.order_id.clone());
        self.live.insert(m.order_id.clone(), Entry { m, request });
    }

    /// An order's live match, or else its latest ended one within the
    /// retention.
    pub(crate) fn find(
        &self,
        order: &OrderId,
        now: Timestamp,
        retention_ms: u64,
    ) -> Option<&Entry> {
        self.live
            .get(order)
            .or_else(|| self.ended.get(order, now, retention_ms))
    }

    /// The existing match for an order that a new claim must return, or a conflict.
    pub(crate) fn existing(&self, order: &OrderId, req: &ClaimRequest) -> Option<Result<Match>> {
        let e = self.live.get(order)?;
        if e.request == *req {
            Some(Ok(e.m.clone()))
        } else {
            Some(Err(Error::OrderConflict(format!(
                "order {order} already has a live match made with different parameters"
            ))))
        }
    }

    /// An order's live match.
    pub(crate) fn live_match(&self, order: &OrderId) -> Option<&Match> {
        self.live.get(order).map(|e| &e.m)
    }

    /// Whether the driver holds a live match.
    pub(crate) fn holds_driver(&self, driver: &DriverId) -> bool {
        self.by_driver.contains_key(driver)
    }

    /// The order of each driver in a live match.
    pub(crate) fn orders_by_driver(&self) -> HashMap<DriverId, OrderId, FixedState> {
        self.by_driver.clone()
    }

    /// The orders of every live match.
    pub(crate) fn live_orders(&self) -> Vec<OrderId> {
        self.by_driver.values().cloned().collect()
    }

    /// Number of live (reserved or confirmed) matches.
    pub(crate) fn live_count(&self) -> usize {
        self.by_driver.len()
    }

    /// Marks the reserved match of `order` (held until `reserved_until`)
    /// confirmed, its driver already busy: its deadline goes.
    pub(crate) fn confirm(&mut self, order: &OrderId, reserved_until: Timestamp) -> Result<Match> {
        self.deadlines.remove(&(reserved_until, order.clone()));
        let e = self
            .live
            .get_mut(order)
            .ok_or_else(|| Error::UnknownOrder(order.to_string()))?;
        e.m.state = MatchState::Confirmed;
        Ok(e.m.clone())
    }

    /// Puts a restored live match back, with its deadline if it is
    /// reserved (its driver already set reserved or busy).
    pub(crate) fn restore(&mut self, m: Match, request: ClaimRequest) {
        let order = m.order_id.clone();
        let confirmed = m.state == MatchState::Confirmed;
        let until = m.reserved_until;
        self.insert(m, request);
        if confirmed {
            self.deadlines.remove(&(until, order));
        }
    }

    /// The orders whose reservation's hold ran out by `now`.
    pub(crate) fn due(&self, now: Timestamp) -> Vec<OrderId> {
        self.deadlines
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Takes the ended matches past their retention, for the caller to
    /// drop once it has let go of the book.
    pub(crate) fn take_forgotten(&mut self, now: Timestamp, retention_ms: u64) -> Vec<Segment> {
        self.ended.take_forgotten(now, retention_ms)
    }

    /// Number of live matches by order.
    #[cfg(test)]
    pub(crate) fn live_len(&self) -> usize {
        self.live.len()
    }

    /// Number of ended matches kept.
    #[cfg(test)]
    pub(crate) fn ended_len(&self) -> usize {
        self.ended.len
    }
}

/// One order of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOrder {
    /// The order id.
    pub order_id: OrderId,
    /// What it asks for.
    pub request: ClaimRequest,
}

/// The outcome of [`Engine::claim_batch`](crate::Engine::claim_batch).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchOutcome {
    /// One match per served order (new or, for orders that already had a
    /// live match, the existing one).
    pub matches: Vec<Match>,
    /// Orders that could not be served.
    pub unmatched: Vec<OrderId>,
}

/// What [`Engine::restore_matches`](crate::Engine::restore_matches) did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreReport {
    /// Live matches restored.
    pub restored: usize,
    /// Drivers recreated from a match record because the snapshot lacked them.
    pub drivers_recreated: usize,
    /// Records not restored, with why (ended, duplicate order, driver already matched).
    pub skipped: Vec<(OrderId, String)>,
}
