//! Matching: atomic reservations that never double-book.
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
use hashbrown::HashTable;

use crate::DriverUpdate;
use crate::assign::{Assignment, assign_min_cost};
use crate::driver::{Capabilities, Status, Vehicle};
use crate::error::{Error, Result};
use crate::ids::{DriverId, OrderId};
use crate::index::Engine;
use crate::position::Position;
use crate::search::{NearestQuery, validate_radius};
use crate::snapshot::DurableMatch;
use crate::time::Timestamp;

/// The longest a reservation may be held: one hour.
pub const MAX_HOLD_MS: u64 = 3_600_000;

/// How many candidates a claim asks the index for at once.
const CLAIM_CANDIDATES: usize = 4;

/// How many times a claim searches again after losing every candidate to
/// concurrent claims before it gives up.
const CLAIM_ATTEMPTS: usize = 64;

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
        }
    }

    fn validate(&self) -> Result<()> {
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

    fn query(&self, k: usize) -> Result<NearestQuery> {
        let mut q = NearestQuery::new(self.pickup, k)?;
        q.radius_m = self.radius_m;
        q.vehicle = self.vehicle;
        q.capabilities = self.capabilities;
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

#[derive(Debug)]
struct Entry {
    m: Match,
    request: ClaimRequest,
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
/// 105 ms p99 of the HTTP claim load, benches/README.md), and memory
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
struct Segment {
    /// The latest `ended_at` in it.
    newest: Timestamp,
    /// Reserved whole at creation: never reallocated.
    entries: Vec<Entry>,
    /// Positions in `entries`, hashed by their entry's order id.
    index: HashTable<u32>,
}

/// Entries per segment of the [`EndedLog`]: small enough that a segment's
/// index grows cheaply, large enough that a lookup scans few segments.
const SEGMENT_LEN: usize = 8192;

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
    pub(crate) fn status_request(
        &self,
        driver: &DriverId,
        wanted: Status,
    ) -> (Option<Status>, Option<DriverEnd>) {
        let Some(state) = self.live_match_of(driver).map(|m| m.state) else {
            return (Some(wanted), None);
        };
        match (state, wanted) {
            (MatchState::Reserved | MatchState::Confirmed, Status::Offline) => {
                (Some(Status::Offline), Some(DriverEnd::Offline))
            }
            (MatchState::Reserved, Status::Busy) => (Some(Status::Busy), Some(DriverEnd::Busy)),
            (MatchState::Confirmed, Status::Available) => {
                (Some(Status::Available), Some(DriverEnd::Completed))
            }
            _ => (None, None),
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
    fn end(
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

    fn insert(&mut self, m: Match, request: ClaimRequest) {
        self.deadlines
            .insert((m.reserved_until, m.order_id.clone()));
        self.by_driver
            .insert(m.driver_id.clone(), m.order_id.clone());
        self.live.insert(m.order_id.clone(), Entry { m, request });
    }

    /// An order's live match, or else its latest ended one within the
    /// retention.
    fn find(&self, order: &OrderId, now: Timestamp, retention_ms: u64) -> Option<&Entry> {
        self.live
            .get(order)
            .or_else(|| self.ended.get(order, now, retention_ms))
    }

    /// The existing match for an order that a new claim must return, or a conflict.
    fn existing(&self, order: &OrderId, req: &ClaimRequest) -> Option<Result<Match>> {
        let e = self.live.get(order)?;
        if e.request == *req {
            Some(Ok(e.m.clone()))
        } else {
            Some(Err(Error::OrderConflict(format!(
                "order {order} already has a live match made with different parameters"
            ))))
        }
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

/// The outcome of [`Engine::claim_batch`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchOutcome {
    /// One match per served order (new or, for orders that already had a
    /// live match, the existing one).
    pub matches: Vec<Match>,
    /// Orders that could not be served.
    pub unmatched: Vec<OrderId>,
}

/// What [`Engine::restore_matches`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreReport {
    /// Live matches restored.
    pub restored: usize,
    /// Drivers recreated from a match record because the snapshot lacked them.
    pub drivers_recreated: usize,
    /// Records not restored, with why (ended, duplicate order, driver already matched).
    pub skipped: Vec<(OrderId, String)>,
}

impl Engine {
    /// The durable record of an order's match, live or ended.
    pub fn durable_match(&self, order: &OrderId) -> Option<DurableMatch> {
        let (m, request) = {
            let book = self.book.lock();
            let e = book.find(order, self.clock.now(), self.config.match_retention_ms)?;
            (e.m.clone(), e.request.clone())
        };
        let driver_pos = self.driver(&m.driver_id).map_or(m.pickup, |d| d.pos);
        Some(DurableMatch {
            m,
            request,
            driver_pos,
        })
    }

    /// The durable records of every live match (for a full resync).
    pub fn durable_matches(&self) -> Vec<DurableMatch> {
        let orders: Vec<OrderId> = self.book.lock().by_driver.values().cloned().collect();
        orders
            .iter()
            .filter_map(|o| self.durable_match(o))
            .filter(|d| d.m.state.is_live())
            .collect()
    }

    /// Restores live matches after [`restore_snapshot`](Self::restore_snapshot):
    /// each record's driver is set `reserved` (or `busy` when confirmed),
    /// recreated at its recorded position if the snapshot predates it, and
    /// the match goes back in the book with its deadline. Records are
    /// applied oldest first; a record whose driver is already matched, or
    /// whose order is already live, is skipped and reported.
    pub fn restore_matches(
        &self,
        records: impl IntoIterator<Item = DurableMatch>,
    ) -> RestoreReport {
        let mut records: Vec<DurableMatch> = records.into_iter().collect();
        records.sort_by(|a, b| {
            a.m.created_at
                .cmp(&b.m.created_at)
                .then_with(|| a.m.order_id.cmp(&b.m.order_id))
        });
        let mut report = RestoreReport::default();
        let mut book = self.book.lock();
        for r in records {
            let order = r.m.order_id.clone();
            let skip = if !r.m.state.is_live() {
                Some("match already ended")
            } else if book.existing(&order, &r.request).is_some() {
                Some("order already has a live match")
            } else if book.by_driver.contains_key(&r.m.driver_id) {
                Some("driver already holds another live match")
            } else {
                None
            };
            if let Some(why) = skip {
                report.skipped.push((order, why.to_owned()));
                continue;
            }
            let status = if r.m.state == MatchState::Confirmed {
                Status::Busy
            } else {
                Status::Reserved
            };
            if !self.force_status(&r.m.driver_id, status) {
                let u = DriverUpdate::location(
                    r.m.driver_id.clone(),
                    r.driver_pos,
                    Some(r.m.created_at),
                );
                if self.apply(&u, Some(status), true).is_err() {
                    report
                        .skipped
                        .push((order, "could not recreate its driver".to_owned()));
                    continue;
                }
                report.drivers_recreated += 1;
            }
            let confirmed = r.m.state == MatchState::Confirmed;
            let until = r.m.reserved_until;
            book.insert(r.m, r.request);
            if confirmed {
                book.deadlines.remove(&(until, order));
            }
            report.restored += 1;
        }
        report
    }

    /// Reserves the nearest eligible available driver for `order`.
    ///
    /// Returns the match and whether it was created now (`false`: the order
    /// already had this live match, made with the same request — claims
    /// are idempotent by order id).
    ///
    /// # Errors
    /// - [`Error::InvalidParameter`] for a bad radius or hold;
    /// - [`Error::OrderConflict`] if the order has a live match made with a
    ///   different request;
    /// - [`Error::NoDriverAvailable`] if no eligible driver is in reach.
    pub fn claim(&self, order: &OrderId, req: &ClaimRequest) -> Result<(Match, bool)> {
        req.validate()?;
        if let Some(existing) = self.book.lock().existing(order, req) {
            return existing.map(|m| (m, false));
        }
        for _ in 0..CLAIM_ATTEMPTS {
            let candidates = self.nearest(&req.query(CLAIM_CANDIDATES)?)?;
            if candidates.is_empty() {
                return Err(Error::NoDriverAvailable);
            }
            let mut book = self.book.lock();
            if let Some(existing) = book.existing(order, req) {
                return existing.map(|m| (m, false));
            }
            for c in &candidates {
                if let Some(pos) = self.reserve_if_eligible(&c.id, req.vehicle, req.capabilities) {
                    return Ok((
                        self.book_reservation(&mut book, order, req, &c.id, pos),
                        true,
                    ));
                }
            }
        }
        Err(Error::NoDriverAvailable)
    }

    /// Reserves exactly `driver` for `order`, if it is available, matches
    /// the request's filters and is within its radius. A cluster uses this
    /// to reserve, on the node that owns it, the driver a cross-region
    /// search chose; losing a race for it is an ordinary outcome.
    ///
    /// Returns the match and whether it was created now, as
    /// [`claim`](Self::claim) does.
    ///
    /// # Errors
    /// - [`Error::InvalidParameter`] for a bad radius or hold;
    /// - [`Error::OrderConflict`] if the order has a live match made with a
    ///   different request;
    /// - [`Error::DriverNotAvailable`] if the driver is unknown, not
    ///   available, not eligible or out of reach.
    pub fn claim_driver(
        &self,
        order: &OrderId,
        req: &ClaimRequest,
        driver: &DriverId,
    ) -> Result<(Match, bool)> {
        req.validate()?;
        let mut book = self.book.lock();
        if let Some(existing) = book.existing(order, req) {
            return existing.map(|m| (m, false));
        }
        let not_available = || Error::DriverNotAvailable(driver.to_string());
        let pos = self
            .reserve_if_eligible(driver, req.vehicle, req.capabilities)
            .ok_or_else(not_available)?;
        let reach = req.radius_m.unwrap_or(self.config.max_radius_m);
        if req.pickup.distance_m(pos) > reach {
            self.transition(driver, Status::Reserved, Status::Available);
            return Err(not_available());
        }
        Ok((
            self.book_reservation(&mut book, order, req, driver, pos),
            true,
        ))
    }

    /// Records a reservation of `driver` (already set reserved, at `pos`).
    fn book_reservation(
        &self,
        book: &mut MatchBook,
        order: &OrderId,
        req: &ClaimRequest,
        driver: &DriverId,
        pos: Position,
    ) -> Match {
        let now = self.clock.now();
        let m = Match {
            order_id: order.clone(),
            driver_id: driver.clone(),
            pickup: req.pickup,
            distance_m: req.pickup.distance_m(pos),
            state: MatchState::Reserved,
            created_at: now,
            reserved_until: now.plus_millis(req.hold_ms),
            ended_at: None,
            reason: None,
        };
        book.insert(m.clone(), req.clone());
        m
    }

    /// The match of an order, live or recently ended.
    pub fn get_match(&self, order: &OrderId) -> Option<Match> {
        let book = self.book.lock();
        book.find(order, self.clock.now(), self.config.match_retention_ms)
            .map(|e| e.m.clone())
    }

    /// Confirms a reservation: the driver becomes busy with the order.
    ///
    /// # Errors
    /// [`Error::UnknownOrder`]; [`Error::ReservationExpired`] if the hold ran
    /// out (the match is expired now and the driver freed); [`Error::OrderConflict`]
    /// if the match is not reserved (already confirmed, released, …).
    pub fn confirm(&self, order: &OrderId) -> Result<Match> {
        let mut book = self.book.lock();
        let now = self.clock.now();
        let m = self.live_reserved(&mut book, order, now)?;
        if self
            .transition(&m.driver_id, Status::Reserved, Status::Busy)
            .is_none()
        {
            unreachable!("a reserved match's driver is reserved");
        }
        book.deadlines.remove(&(m.reserved_until, order.clone()));
        let e = book
            .live
            .get_mut(order)
            .ok_or_else(|| Error::UnknownOrder(order.to_string()))?;
        e.m.state = MatchState::Confirmed;
        Ok(e.m.clone())
    }

    /// The reserved match of `order`, expiring it first if its hold ran out.
    fn live_reserved(
        &self,
        book: &mut MatchBook,
        order: &OrderId,
        now: Timestamp,
    ) -> Result<Match> {
        let m = book
            .find(order, now, self.config.match_retention_ms)
            .map(|e| e.m.clone())
            .ok_or_else(|| Error::UnknownOrder(order.to_string()))?;
        if m.state == MatchState::Reserved && m.reserved_until <= now {
            self.expire_one(book, order, now);
            return Err(Error::ReservationExpired(order.to_string()));
        }
        if m.state != MatchState::Reserved {
            return Err(Error::OrderConflict(format!(
                "match for order {order} is {}, not reserved",
                m.state.as_str()
            )));
        }
        Ok(m)
    }

    /// Releases a reserved or confirmed match; the driver is available again.
    ///
    /// # Errors
    /// [`Error::UnknownOrder`]; [`Error::OrderConflict`] if the match already ended.
    pub fn release(&self, order: &OrderId, reason: Option<&str>) -> Result<Match> {
        self.end_live(
            order,
            MatchState::Released,
            Some(reason.unwrap_or("client")),
        )
    }

    /// Completes a confirmed match; the driver is available again where it is.
    ///
    /// # Errors
    /// [`Error::UnknownOrder`]; [`Error::OrderConflict`] unless the match is confirmed.
    pub fn complete(&self, order: &OrderId) -> Result<Match> {
        self.end_live(order, MatchState::Completed, None)
    }

    fn end_live(&self, order: &OrderId, to: MatchState, reason: Option<&str>) -> Result<Match> {
        let mut book = self.book.lock();
        let now = self.clock.now();
        let m = book
            .find(order, now, self.config.match_retention_ms)
            .map(|e| e.m.clone())
            .ok_or_else(|| Error::UnknownOrder(order.to_string()))?;
        if m.state == MatchState::Reserved && m.reserved_until <= now {
            self.expire_one(&mut book, order, now);
            return Err(Error::ReservationExpired(order.to_string()));
        }
        let from = match (m.state, to) {
            (MatchState::Reserved, MatchState::Released) => Status::Reserved,
            (MatchState::Confirmed, MatchState::Released | MatchState::Completed) => Status::Busy,
            (state, _) => {
                return Err(Error::OrderConflict(format!(
                    "match for order {order} is {}; cannot become {}",
                    state.as_str(),
                    to.as_str()
                )));
            }
        };
        self.transition(&m.driver_id, from, Status::Available);
        book.end(order, to, reason, now, self.config.max_ended_matches)
            .ok_or_else(|| Error::UnknownOrder(order.to_string()))
    }

    fn expire_one(&self, book: &mut MatchBook, order: &OrderId, now: Timestamp) -> Option<Match> {
        let driver = book.live.get(order)?.m.driver_id.clone();
        self.transition(&driver, Status::Reserved, Status::Available);
        book.end(
            order,
            MatchState::Expired,
            None,
            now,
            self.config.max_ended_matches,
        )
    }

    /// Expires every reservation whose hold ran out, freeing its driver, and
    /// forgets ended matches past their retention. Returns the expired matches.
    pub fn expire_matches(&self) -> Vec<MatchEvent> {
        let mut book = self.book.lock();
        let now = self.clock.now();
        let due: Vec<OrderId> = book
            .deadlines
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, o)| o.clone())
            .collect();
        let events = due
            .iter()
            .filter_map(|o| self.expire_one(&mut book, o, now))
            .map(|m| MatchEvent { m })
            .collect();
        let forgotten = book
            .ended
            .take_forgotten(now, self.config.match_retention_ms);
        drop(book);
        drop(forgotten);
        events
    }

    /// Number of live (reserved or confirmed) matches.
    pub fn live_matches(&self) -> usize {
        self.book.lock().by_driver.len()
    }

    /// Serves a window of orders together, minimising the summed pickup
    /// distance.
    ///
    /// Each order's `candidates` nearest eligible drivers form a sparse
    /// bipartite graph; an exact min-cost assignment on it serves as many
    /// orders as the graph allows, at the least total distance among those
    /// (see [`assign_min_cost`]). The chosen drivers are then reserved under
    /// the book; a driver taken meanwhile by another claim leaves its order
    /// unmatched rather than silently substituted.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a bad request or `candidates` outside
    /// 1..=100, or an order id twice in the window; nothing is reserved then.
    pub fn claim_batch(&self, orders: &[BatchOrder], candidates: usize) -> Result<BatchOutcome> {
        if !(1..=100).contains(&candidates) {
            return Err(Error::InvalidParameter(format!(
                "candidates {candidates} is not in 1..=100"
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity_and_hasher(
            orders.len(),
            FixedState::default(),
        );
        for o in orders {
            o.request.validate()?;
            if !seen.insert(&o.order_id) {
                return Err(Error::InvalidParameter(format!(
                    "order {} appears twice in the batch",
                    o.order_id
                )));
            }
        }
        let mut out = BatchOutcome::default();
        // Orders that already have a live match keep it.
        let mut fresh = Vec::with_capacity(orders.len());
        {
            let book = self.book.lock();
            for o in orders {
                match book.existing(&o.order_id, &o.request) {
                    Some(Ok(m)) => out.matches.push(m),
                    Some(Err(_)) => out.unmatched.push(o.order_id.clone()),
                    None => fresh.push(o),
                }
            }
        }
        let mut drivers: Vec<DriverId> = Vec::new();
        let mut driver_index: HashMap<DriverId, usize, FixedState> = HashMap::default();
        let mut edges: Vec<Vec<(usize, i64)>> = Vec::with_capacity(fresh.len());
        for o in &fresh {
            let near = self.nearest(&o.request.query(candidates)?)?;
            edges.push(
                near.into_iter()
                    .map(|n| {
                        let next = drivers.len();
                        let j = *driver_index.entry(n.id.clone()).or_insert(next);
                        if j == next {
                            drivers.push(n.id);
                        }
                        (j, cost_mm(n.distance_m))
                    })
                    .collect(),
            );
        }
        let Assignment { pairs, .. } = assign_min_cost(drivers.len(), &edges);
        let mut book = self.book.lock();
        let now = self.clock.now();
        for (o, choice) in fresh.iter().zip(pairs) {
            if let Some(existing) = book.existing(&o.order_id, &o.request) {
                match existing {
                    Ok(m) => out.matches.push(m),
                    Err(_) => out.unmatched.push(o.order_id.clone()),
                }
                continue;
            }
            let reserved = choice.and_then(|j| {
                self.reserve_if_eligible(&drivers[j], o.request.vehicle, o.request.capabilities)
                    .map(|p| (j, p))
            });
            let Some((j, pos)) = reserved else {
                out.unmatched.push(o.order_id.clone());
                continue;
            };
            let m = Match {
                order_id: o.order_id.clone(),
                driver_id: drivers[j].clone(),
                pickup: o.request.pickup,
                distance_m: o.request.pickup.distance_m(pos),
                state: MatchState::Reserved,
                created_at: now,
                reserved_until: now.plus_millis(o.request.hold_ms),
                ended_at: None,
                reason: None,
            };
            book.insert(m.clone(), o.request.clone());
            out.matches.push(m);
        }
        Ok(out)
    }
}

/// A distance in whole millimetres: the assignment works on integers so its
/// optimum is exact.
pub(crate) fn cost_mm(distance_m: f64) -> i64 {
    (distance_m * 1000.0).round() as i64
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{DriverUpdate, EngineConfig, ManualClock};

    struct Fixture {
        engine: Engine,
        clock: Arc<ManualClock>,
    }

    fn pos(lat: f64, lon: f64) -> Position {
        Position::new(lat, lon).unwrap()
    }

    fn oid(s: &str) -> OrderId {
        OrderId::new(s).unwrap()
    }

    fn did(s: &str) -> DriverId {
        DriverId::new(s).unwrap()
    }

    /// Three drivers east of the pickup at 0.001°, 0.002°, 0.003°; d2 is a van with cash.
    fn fixture() -> Fixture {
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_000_000).unwrap()));
        let engine = Engine::with_clock(EngineConfig::default(), clock.clone()).unwrap();
        for (i, name) in ["d1", "d2", "d3"].iter().enumerate() {
            let mut u = DriverUpdate::location(
                did(name),
                pos(41.88, -87.63 + 0.001 * (i as f64 + 1.0)),
                None,
            );
            if *name == "d2" {
                u.vehicle = Some(Vehicle::Van);
                u.capabilities = Some("cash".parse().unwrap());
            }
            engine.upsert(&u).unwrap();
        }
        Fixture { engine, clock }
    }

    fn pickup() -> ClaimRequest {
        ClaimRequest::new(pos(41.88, -87.63))
    }

    fn status(f: &Fixture, d: &str) -> Status {
        f.engine.driver(&did(d)).unwrap().status
    }

    #[test]
    fn claim_reserves_the_nearest_and_is_idempotent() {
        let f = fixture();
        let (m, created) = f.engine.claim(&oid("o1"), &pickup()).unwrap();
        assert!(created);
        assert_eq!(m.driver_id, did("d1"));
        assert_eq!(m.state, MatchState::Reserved);
        assert_eq!(m.reserved_until.as_millis(), 1_030_000);
        let d1_pos = f.engine.driver(&did("d1")).unwrap().pos;
        assert!((m.distance_m - pos(41.88, -87.63).distance_m(d1_pos)).abs() < 1e-9);
        let d1 = f.engine.driver(&did("d1")).unwrap();
        assert_eq!(
            (d1.status, d1.order_id.as_ref(), d1.reserved_until),
            (Status::Reserved, Some(&oid("o1")), Some(m.reserved_until))
        );
        // Same order, same request: same match, not a second driver.
        let (again, created) = f.engine.claim(&oid("o1"), &pickup()).unwrap();
        assert!(!created);
        assert_eq!(again, m);
        // Same order, different request: conflict, nothing changes.
        let other = ClaimRequest {
            hold_ms: 5_000,
            ..pickup()
        };
        assert_eq!(
            f.engine.claim(&oid("o1"), &other).unwrap_err().code(),
            "order_conflict"
        );
        // A reserved driver is not offered.
        let near = f
            .engine
            .nearest(&NearestQuery::new(pos(41.88, -87.63), 3).unwrap())
            .unwrap();
        assert_eq!(
            near.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            ["d2", "d3"]
        );
        assert_eq!(
            f.engine.claim(&oid("o2"), &pickup()).unwrap().0.driver_id,
            did("d2")
        );
    }

    #[test]
    fn claim_applies_filters_and_reports_no_driver() {
        let f = fixture();
        let van = ClaimRequest {
            vehicle: Some(Vehicle::Van),
            ..pickup()
        };
        assert_eq!(
            f.engine.claim(&oid("v"), &van).unwrap().0.driver_id,
            did("d2")
        );
        assert_eq!(
            f.engine.claim(&oid("v2"), &van).unwrap_err(),
            Error::NoDriverAvailable
        );
        let tiny = ClaimRequest {
            radius_m: Some(10.0),
            ..pickup()
        };
        assert_eq!(
            f.engine.claim(&oid("r"), &tiny).unwrap_err().code(),
            "no_driver_available"
        );
        for bad in [
            ClaimRequest {
                radius_m: Some(-1.0),
                ..pickup()
            },
            ClaimRequest {
                radius_m: Some(f64::NAN),
                ..pickup()
            },
            ClaimRequest {
                hold_ms: 0,
                ..pickup()
            },
            ClaimRequest {
                hold_ms: MAX_HOLD_MS + 1,
                ..pickup()
            },
        ] {
            assert_eq!(
                f.engine.claim(&oid("bad"), &bad).unwrap_err().code(),
                "invalid_parameter"
            );
        }
        assert!(f.engine.get_match(&oid("bad")).is_none());
        assert_eq!(f.engine.counts().reserved, 1);
    }

    #[test]
    fn confirm_release_complete_and_their_errors() {
        let f = fixture();
        let o = oid("o1");
        assert_eq!(
            f.engine.confirm(&oid("nope")).unwrap_err().code(),
            "unknown_order"
        );
        assert_eq!(
            f.engine.release(&oid("nope"), None).unwrap_err().code(),
            "unknown_order"
        );
        assert_eq!(
            f.engine.complete(&oid("nope")).unwrap_err().code(),
            "unknown_order"
        );
        f.engine.claim(&o, &pickup()).unwrap();
        assert_eq!(f.engine.complete(&o).unwrap_err().code(), "order_conflict");
        let m = f.engine.confirm(&o).unwrap();
        assert_eq!(m.state, MatchState::Confirmed);
        assert_eq!(status(&f, "d1"), Status::Busy);
        assert_eq!(f.engine.confirm(&o).unwrap_err().code(), "order_conflict");
        // A confirmed match does not expire.
        f.clock.advance(60_000);
        assert!(f.engine.expire_matches().is_empty());
        let m = f.engine.complete(&o).unwrap();
        assert_eq!(m.state, MatchState::Completed);
        assert_eq!(status(&f, "d1"), Status::Available);
        for err in [
            f.engine.release(&o, None),
            f.engine.confirm(&o),
            f.engine.complete(&o),
        ] {
            assert_eq!(err.unwrap_err().code(), "order_conflict");
        }
        // An ended order id can be claimed anew.
        assert!(f.engine.claim(&o, &pickup()).unwrap().1);
        let m = f.engine.release(&o, Some("customer cancelled")).unwrap();
        assert_eq!(
            (m.state, m.reason.as_deref()),
            (MatchState::Released, Some("customer cancelled"))
        );
        assert_eq!(status(&f, "d1"), Status::Available);
        assert_eq!(f.engine.live_matches(), 0);
    }

    #[test]
    fn claim_driver_reserves_exactly_that_driver_or_nothing() {
        let f = fixture();
        let req = pickup();
        // Not the nearest (d1), but the one asked for.
        let (m, created) = f.engine.claim_driver(&oid("a"), &req, &did("d3")).unwrap();
        assert!(created);
        assert_eq!(
            (m.driver_id.as_str(), status(&f, "d3")),
            ("d3", Status::Reserved)
        );
        // Idempotent by order id, whichever driver is named again.
        let (again, created) = f.engine.claim_driver(&oid("a"), &req, &did("d1")).unwrap();
        assert_eq!(
            (again, created, status(&f, "d1")),
            (m, false, Status::Available)
        );
        // Taken, unknown, filtered out or out of reach: driver_not_available,
        // and nothing changes.
        let van = ClaimRequest {
            vehicle: Some(Vehicle::Van),
            ..pickup()
        };
        let near = ClaimRequest {
            radius_m: Some(100.0),
            ..pickup()
        };
        for (order, req, driver) in [
            ("b", &req, "d3"),
            ("c", &req, "nobody"),
            ("d", &van, "d1"),
            ("e", &near, "d2"),
        ] {
            let err = f
                .engine
                .claim_driver(&oid(order), req, &did(driver))
                .unwrap_err();
            assert_eq!(err.code(), "driver_not_available", "{order}");
            assert!(f.engine.get_match(&oid(order)).is_none());
        }
        assert_eq!(
            (status(&f, "d1"), status(&f, "d2")),
            (Status::Available, Status::Available)
        );
        assert_eq!(f.engine.live_matches(), 1);
    }

    #[test]
    fn reservations_expire_and_confirm_after_the_hold_fails() {
        let f = fixture();
        let short = ClaimRequest {
            hold_ms: 1_000,
            ..pickup()
        };
        f.engine.claim(&oid("a"), &short).unwrap();
        f.engine.claim(&oid("b"), &short).unwrap();
        f.clock.advance(999);
        assert!(f.engine.expire_matches().is_empty());
        f.clock.advance(1);
        // Confirming at the deadline is too late: the hold is [created, until).
        assert_eq!(
            f.engine.confirm(&oid("a")).unwrap_err().code(),
            "reservation_expired"
        );
        assert_eq!(
            f.engine.get_match(&oid("a")).unwrap().state,
            MatchState::Expired
        );
        let events = f.engine.expire_matches();
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].m.order_id.as_str(), events[0].m.state),
            ("b", MatchState::Expired)
        );
        assert_eq!(f.engine.counts().available, 3);
        // Ended matches are forgotten after the retention.
        f.clock.advance(f.engine.config().match_retention_ms);
        f.engine.expire_matches();
        assert!(f.engine.get_match(&oid("a")).is_none());
    }

    #[test]
    fn ended_matches_stay_readable_up_to_the_cap_and_a_new_claim_wins() {
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_000_000).unwrap()));
        let config = EngineConfig {
            max_ended_matches: SEGMENT_LEN,
            ..EngineConfig::default()
        };
        let engine = Engine::with_clock(config, clock.clone()).unwrap();
        engine
            .upsert(&DriverUpdate::location(did("d"), pos(41.88, -87.63), None))
            .unwrap();
        let n = 2 * SEGMENT_LEN + 100;
        for i in 0..n {
            let o = oid(&format!("o{i}"));
            engine.claim(&o, &pickup()).unwrap();
            engine.release(&o, None).unwrap();
            clock.advance(1);
        }
        let book = engine.book.lock();
        assert!(book.live.is_empty());
        assert!(
            book.ended.len <= SEGMENT_LEN,
            "{} ended kept",
            book.ended.len
        );
        assert!(book.ended.len >= 100);
        drop(book);
        // The newest are readable, with the error an ended match gives;
        // the oldest were forgotten early, as the cap says.
        let last = oid(&format!("o{}", n - 1));
        assert_eq!(
            engine.get_match(&last).map(|m| m.state),
            Some(MatchState::Released)
        );
        assert!(matches!(
            engine.release(&last, None),
            Err(Error::OrderConflict(_))
        ));
        assert!(engine.get_match(&oid("o0")).is_none());
        assert!(matches!(
            engine.release(&oid("o0"), None),
            Err(Error::UnknownOrder(_))
        ));
        // An ended order claimed again: the new live match is what reads.
        let ended_before = engine.book.lock().ended.len;
        let (again, created) = engine.claim(&last, &pickup()).unwrap();
        assert!(created);
        assert_eq!(engine.get_match(&last), Some(again.clone()));
        engine.release(&last, None).unwrap();
        assert_eq!(
            engine.get_match(&last).map(|m| m.created_at),
            Some(again.created_at)
        );
        // Ending again in the same segment replaces the order's entry.
        assert_eq!(engine.book.lock().ended.len, ended_before);
        // Past the retention every segment goes.
        clock.advance(engine.config().match_retention_ms);
        engine.expire_matches();
        assert_eq!(engine.book.lock().ended.len, 0);
        assert!(engine.get_match(&last).is_none());
    }

    #[test]
    fn driver_side_changes_end_matches() {
        let f = fixture();
        let set = |d: &str, s: Status| {
            let cur = f.engine.driver(&did(d)).unwrap();
            let mut u = DriverUpdate::location(did(d), cur.pos, None);
            u.status = Some(s);
            f.engine.upsert(&u).unwrap()
        };
        // Available on a reserved driver keeps the reservation.
        f.engine.claim(&oid("o1"), &pickup()).unwrap();
        set("d1", Status::Available);
        assert_eq!(status(&f, "d1"), Status::Reserved);
        // Location updates move a reserved driver without offering it.
        f.engine
            .upsert(&DriverUpdate::location(
                did("d1"),
                pos(41.881, -87.63),
                None,
            ))
            .unwrap();
        assert_eq!(status(&f, "d1"), Status::Reserved);
        assert_eq!(
            f.engine.driver(&did("d1")).unwrap().pos,
            pos(41.881, -87.63)
        );
        // Offline releases it.
        set("d1", Status::Offline);
        let m = f.engine.get_match(&oid("o1")).unwrap();
        assert_eq!(
            (m.state, m.reason.as_deref()),
            (MatchState::Released, Some("driver_offline"))
        );
        // Busy on a reserved driver releases too.
        set("d1", Status::Available);
        f.engine.claim(&oid("o2"), &pickup()).unwrap();
        set("d1", Status::Busy);
        assert_eq!(
            f.engine.get_match(&oid("o2")).unwrap().reason.as_deref(),
            Some("driver_busy")
        );
        // Available on a driver busy with a confirmed match completes it.
        set("d1", Status::Available);
        f.engine.claim(&oid("o3"), &pickup()).unwrap();
        f.engine.confirm(&oid("o3")).unwrap();
        set("d1", Status::Available);
        assert_eq!(
            f.engine.get_match(&oid("o3")).unwrap().state,
            MatchState::Completed
        );
        // Removing a driver releases its match.
        f.engine.claim(&oid("o4"), &pickup()).unwrap();
        let (_, ev) = f.engine.remove(&did("d1")).unwrap();
        assert_eq!(ev.unwrap().m.reason.as_deref(), Some("driver_removed"));
        assert_eq!(f.engine.live_matches(), 0);
        // A stale status update changes nothing.
        f.engine.claim(&oid("o5"), &pickup()).unwrap();
        let d2 = f.engine.driver(&did("d2")).unwrap();
        let mut old = DriverUpdate::location(did("d2"), d2.pos, Some(d2.ts.minus_millis(1)));
        old.status = Some(Status::Offline);
        assert!(matches!(
            f.engine.upsert(&old).unwrap(),
            crate::Applied::Stale { .. }
        ));
        assert_eq!(
            f.engine.get_match(&oid("o5")).unwrap().state,
            MatchState::Reserved
        );
    }

    #[test]
    fn matches_survive_snapshot_and_restore() {
        let f = fixture();
        f.engine.claim(&oid("r"), &pickup()).unwrap();
        f.engine.claim(&oid("c"), &pickup()).unwrap();
        f.engine.confirm(&oid("c")).unwrap();
        // A driver created after the snapshot, then reserved.
        let snap = f.engine.snapshot(1, 2);
        f.engine
            .upsert(&DriverUpdate::location(
                did("late"),
                pos(41.88, -87.6305),
                None,
            ))
            .unwrap();
        let (late, _) = f.engine.claim(&oid("l"), &pickup()).unwrap();
        assert_eq!(late.driver_id, did("late"));
        let records: Vec<DurableMatch> = ["r", "c", "l"]
            .iter()
            .map(|o| f.engine.durable_match(&oid(o)).unwrap())
            .collect();
        assert_eq!(f.engine.durable_matches().len(), 3);

        let back = Engine::with_clock(EngineConfig::default(), f.clock.clone()).unwrap();
        back.restore_snapshot(&snap.manifest, &snap.chunks).unwrap();
        let mut with_dupes = records.clone();
        with_dupes.push(records[0].clone());
        let report = back.restore_matches(with_dupes);
        assert_eq!(
            (
                report.restored,
                report.drivers_recreated,
                report.skipped.len()
            ),
            (3, 1, 1)
        );
        for o in ["r", "c", "l"] {
            let (a, b) = (
                f.engine.get_match(&oid(o)).unwrap(),
                back.get_match(&oid(o)).unwrap(),
            );
            assert_eq!(
                (a.driver_id, a.state, a.reserved_until),
                (b.driver_id, b.state, b.reserved_until)
            );
        }
        assert_eq!(back.counts(), f.engine.counts());
        // Nobody restored as held is offered again; the idempotent repeat still works.
        assert!(!back.claim(&oid("r"), &pickup()).unwrap().1);
        assert_eq!(
            back.claim(&oid("new"), &pickup()).unwrap().0.driver_id,
            did("d3")
        );
        assert_eq!(
            back.claim(&oid("new2"), &pickup()).unwrap_err(),
            Error::NoDriverAvailable
        );
        // The restored reservations (r, l) still expire on time, with new's.
        f.clock.advance(30_000);
        assert_eq!(back.expire_matches().len(), 3);
    }

    #[test]
    fn batch_beats_greedy_and_reports_unserved() {
        // Orders at 0.5 (a) and 2 (b, c); drivers at 1 and 3.2 (units of 0.001°).
        // Serving a and b costs 0.5 + 1.2; serving b and c costs 1 + 1.2.
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1).unwrap()));
        let engine = Engine::with_clock(EngineConfig::default(), clock).unwrap();
        let at = |x: f64| pos(0.0, x * 0.001);
        engine
            .upsert(&DriverUpdate::location(did("x1"), at(1.0), None))
            .unwrap();
        engine
            .upsert(&DriverUpdate::location(did("x3"), at(3.2), None))
            .unwrap();
        let order = |o: &str, x: f64| BatchOrder {
            order_id: oid(o),
            request: ClaimRequest::new(at(x)),
        };
        let orders = [order("a", 0.5), order("b", 2.0), order("c", 2.0)];
        let out = engine.claim_batch(&orders, 10).unwrap();
        let by: HashMap<_, _> = out
            .matches
            .iter()
            .map(|m| (m.order_id.as_str(), m.driver_id.as_str()))
            .collect();
        // Two drivers for three orders: a↔x1 and b↔x3 (c loses the tie on
        // nothing: b and c cost the same, so either is optimal).
        assert_eq!(out.matches.len(), 2);
        assert_eq!(out.unmatched.len(), 1);
        assert_eq!(by.get("a"), Some(&"x1"));
        assert_eq!(by.values().filter(|d| **d == "x3").count(), 1);
        let total: f64 = out.matches.iter().map(|m| m.distance_m).sum();
        assert!((total - at(0.5).distance_m(at(1.0)) - at(2.0).distance_m(at(3.2))).abs() < 1e-6);
        assert_eq!(engine.counts().reserved, 2);
        assert_eq!(
            engine
                .claim_batch(&[order("z", 0.0), order("z", 1.0)], 10)
                .unwrap_err()
                .code(),
            "invalid_parameter"
        );
        assert_eq!(
            engine.claim_batch(&orders, 0).unwrap_err().code(),
            "invalid_parameter"
        );
        // Re-running the same window returns the existing matches.
        let again = engine.claim_batch(&orders[..1], 10).unwrap();
        assert_eq!(
            again.matches[0],
            out.matches
                .iter()
                .find(|m| m.order_id.as_str() == "a")
                .unwrap()
                .clone()
        );
    }
}
