//! The engine's matching operations: claims (one order or one named
//! driver), confirm, release, complete, expiry, and the durable records
//! that restore live matches after a restart. Windows of orders served
//! together are in `engine/batch.rs`.
//!
//! A claim searches *without* the book (searches are the expensive part),
//! then takes the book and reserves the best candidate under its shard's
//! write lock, re-checking that it is still available and eligible; a
//! candidate lost to a concurrent claim is skipped and, if all are lost,
//! the claim searches again. Every status change here happens under the
//! book.

use crate::driver::{DriverUpdate, Status};
use crate::error::{Error, Result};
use crate::ids::{DriverId, OrderId};
use crate::matching::{ClaimRequest, Match, MatchBook, MatchEvent, MatchState, RestoreReport};
use crate::position::Position;
use crate::snapshot::DurableMatch;
use crate::time::Timestamp;

use super::Engine;

/// How many candidates a claim asks the index for at once.
const CLAIM_CANDIDATES: usize = 4;

/// How many times a claim searches again after losing every candidate to
/// concurrent claims before it gives up.
const CLAIM_ATTEMPTS: usize = 64;

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
        let orders: Vec<OrderId> = self.book.lock().live_orders();
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
            } else if book.holds_driver(&r.m.driver_id) {
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
            if !self.index.force_status(&r.m.driver_id, status) {
                let u = DriverUpdate::location(
                    r.m.driver_id.clone(),
                    r.driver_pos,
                    Some(r.m.created_at),
                );
                if self
                    .index
                    .apply(&u, Some(status), true, self.clock.now())
                    .is_err()
                {
                    report
                        .skipped
                        .push((order, "could not recreate its driver".to_owned()));
                    continue;
                }
                report.drivers_recreated += 1;
            }
            book.restore(r.m, r.request);
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
                if let Some(pos) =
                    self.index
                        .reserve_if_eligible(&c.id, req.vehicle, req.capabilities, |cell| {
                            req.admits_cell(cell)
                        })
                {
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
            .index
            .reserve_if_eligible(driver, req.vehicle, req.capabilities, |cell| {
                req.admits_cell(cell)
            })
            .ok_or_else(not_available)?;
        let reach = req.radius_m.unwrap_or(self.config.max_radius_m);
        if req.pickup.distance_m(pos) > reach {
            self.index
                .transition(driver, Status::Reserved, Status::Available);
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
            .index
            .transition(&m.driver_id, Status::Reserved, Status::Busy)
            .is_none()
        {
            unreachable!("a reserved match's driver is reserved");
        }
        book.confirm(order, m.reserved_until)
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
        self.index.transition(&m.driver_id, from, Status::Available);
        book.end(order, to, reason, now, self.config.max_ended_matches)
            .ok_or_else(|| Error::UnknownOrder(order.to_string()))
    }

    fn expire_one(&self, book: &mut MatchBook, order: &OrderId, now: Timestamp) -> Option<Match> {
        let driver = book.live_match(order)?.driver_id.clone();
        self.index
            .transition(&driver, Status::Reserved, Status::Available);
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
        let due: Vec<OrderId> = book.due(now);
        let events = due
            .iter()
            .filter_map(|o| self.expire_one(&mut book, o, now))
            .map(|m| MatchEvent { m })
            .collect();
        let forgotten = book.take_forgotten(now, self.config.match_retention_ms);
        drop(book);
        drop(forgotten);
        events
    }

    /// Number of live (reserved or confirmed) matches.
    pub fn live_matches(&self) -> usize {
        self.book.lock().live_count()
    }

    /// Drops drivers this engine no longer answers for, with their live
    /// matches, which are forgotten rather than ended: whoever answers for
    /// them now (another node of a cluster, restoring them from durable
    /// records) still holds those matches live, and this engine must not
    /// answer for them as ended. Returns how many drivers were dropped.
    pub fn evict(&self, ids: &[DriverId]) -> usize {
        let mut book = self.book.lock();
        ids.iter()
            .filter(|id| {
                book.forget_driver(id);
                self.index.remove_where(id, |_| true).is_some()
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use h3o::Resolution;

    use super::*;
    use crate::area::CellSet;
    use crate::driver::Vehicle;
    use crate::matching::{MAX_HOLD_MS, SEGMENT_LEN};
    use crate::search::NearestQuery;
    use crate::testing::{did, oid, pos};
    use crate::{DriverUpdate, EngineConfig, ManualClock};

    struct Fixture {
        engine: Engine,
        clock: Arc<ManualClock>,
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

    /// A claim narrowed to cells reserves the nearest driver in them, not
    /// a nearer one outside; a named claim outside them is refused.
    #[test]
    fn a_claim_narrowed_to_cells_reserves_only_there() {
        let f = fixture();
        let e = &f.engine;
        let far_pos = pos(41.88, -87.50);
        e.upsert(&DriverUpdate::location(did("far"), far_pos, None))
            .unwrap();
        let far = e.cell_of(far_pos);
        assert_ne!(far, e.cell_of(pos(41.88, -87.63)), "another cell");
        let res = Resolution::try_from(e.config().resolution).unwrap();
        let req = ClaimRequest {
            within: Some(CellSet::new(res, [far]).unwrap()),
            ..pickup()
        };
        let (m, _) = e.claim(&oid("o1"), &req).unwrap();
        assert_eq!(m.driver_id, did("far"));
        let err = e.claim_driver(&oid("o2"), &req, &did("d1")).unwrap_err();
        assert!(matches!(err, Error::DriverNotAvailable(_)), "{err}");
        assert_eq!(status(&f, "d1"), Status::Available);
    }

    fn status(f: &Fixture, d: &str) -> Status {
        f.engine.driver(&did(d)).unwrap().status
    }

    #[test]
    fn evicted_drivers_take_their_live_matches_along_unended() {
        let f = fixture();
        let (m, _) = f.engine.claim(&oid("o1"), &pickup()).unwrap();
        f.engine.confirm(&oid("o1")).unwrap();
        let (m2, _) = f.engine.claim(&oid("o2"), &pickup()).unwrap();
        assert_eq!((m.driver_id.as_str(), m2.driver_id.as_str()), ("d1", "d2"));
        assert_eq!(f.engine.evict(&[did("d1"), did("d2"), did("nobody")]), 2);
        // Gone, and neither match is known here, live or ended.
        for (d, o) in [("d1", "o1"), ("d2", "o2")] {
            assert!(f.engine.driver(&did(d)).is_none());
            assert!(f.engine.get_match(&oid(o)).is_none(), "{o}");
        }
        assert_eq!(f.engine.live_matches(), 0);
        assert!(f.engine.durable_matches().is_empty());
        // The deadline of the reserved one went too: nothing expires.
        f.clock.advance(MAX_HOLD_MS + 1);
        assert!(f.engine.expire_matches().is_empty());
        // The others stay as they were.
        assert_eq!(status(&f, "d3"), Status::Available);
        assert_eq!(f.engine.len(), 1);
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
        assert_eq!(book.live_len(), 0);
        assert!(
            book.ended_len() <= SEGMENT_LEN,
            "{} ended kept",
            book.ended_len()
        );
        assert!(book.ended_len() >= 100);
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
        let ended_before = engine.book.lock().ended_len();
        let (again, created) = engine.claim(&last, &pickup()).unwrap();
        assert!(created);
        assert_eq!(engine.get_match(&last), Some(again.clone()));
        engine.release(&last, None).unwrap();
        assert_eq!(
            engine.get_match(&last).map(|m| m.created_at),
            Some(again.created_at)
        );
        // Ending again in the same segment replaces the order's entry.
        assert_eq!(engine.book.lock().ended_len(), ended_before);
        // Past the retention every segment goes.
        clock.advance(engine.config().match_retention_ms);
        engine.expire_matches();
        assert_eq!(engine.book.lock().ended_len(), 0);
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
    fn remove_unmatched_keeps_a_driver_in_a_match() {
        let f = fixture();
        let (m, _) = f.engine.claim(&oid("o1"), &pickup()).unwrap();
        assert!(f.engine.remove_unmatched(&m.driver_id).is_none());
        assert_eq!(
            f.engine.get_match(&oid("o1")).unwrap().state,
            MatchState::Reserved
        );
        assert_eq!(
            f.engine.driver(&m.driver_id).unwrap().order_id,
            Some(oid("o1"))
        );
        // Once the match ends, the driver goes.
        f.engine.release(&oid("o1"), None).unwrap();
        let gone = f.engine.remove_unmatched(&m.driver_id).unwrap();
        assert_eq!(gone.id, m.driver_id);
        assert!(f.engine.driver(&m.driver_id).is_none());
        assert!(f.engine.remove_unmatched(&m.driver_id).is_none());
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
}
