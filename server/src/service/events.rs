//! The event bus: every event this node emits, in order, for the SSE
//! feed, the Redis stream and the webhooks.
//!
//! # Layout
//! - A **ring** of the last `--event-backlog` events, behind one mutex.
//!   Ids are given under that mutex, so they are contiguous (1, 2, … from
//!   the node's start) and the ring finds an id by subtraction.
//! - **Subscribers** (SSE clients) hold a cursor, the last id they were
//!   sent, and read the ring from there, at most [`READ_BATCH`] events
//!   at a time, waiting on a `watch` channel when they have caught up. A
//!   subscriber holds nothing else: one that falls behind the ring is
//!   told by an [`Read::Gap`] and goes on from the oldest event held, so
//!   a slow client costs no memory.
//! - **Sinks** (the Redis stream, each webhook) get every event through a
//!   bounded channel, offered under the ring's mutex so they see the ids
//!   in order. A full channel drops the event and counts it
//!   (`hexmatch_events_dropped_total{sink}`); publishing never waits.
//!
//! # Cost
//! With the feed off (`--event-backlog 0`) publishing is one branch. On,
//! an event is built (ids and a match or driver cloned), then one short
//! mutex hold: a push, a pop when full, a `try_send` per sink. Its JSON
//! is written once, by the first consumer that needs it
//! ([`SharedEvent::json`]), never on the request's path.

use std::collections::VecDeque;
use std::sync::Arc;

use hexmatch::Clock;
use metrics::{Counter, counter};
use tokio::sync::{mpsc, watch};

use crate::wire::{DriverStatusChange, Event, EventData, EventType, SharedEvent};

/// Most events a subscriber takes from the ring at once.
pub const READ_BATCH: usize = 256;

/// What a subscriber read from the ring.
#[derive(Debug)]
pub enum Read {
    /// Events after the cursor, oldest first (at most [`READ_BATCH`]).
    Events(Vec<Arc<SharedEvent>>),
    /// Events after the cursor are no longer held (or the cursor names an
    /// id this node has not given, as after a restart): the feed goes on
    /// from `first_id`.
    Gap {
        /// The oldest event held, or the next id when none is.
        first_id: u64,
    },
    /// Nothing after the cursor yet.
    CaughtUp,
}

/// A consumer fed through a bounded channel.
#[derive(Debug)]
struct Sink {
    tx: mpsc::Sender<Arc<SharedEvent>>,
    dropped: Counter,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Arc<SharedEvent>>,
    /// The id the next event gets.
    next_id: u64,
    sinks: Vec<Sink>,
}

/// The bus of one node (see the module doc).
#[derive(Debug)]
pub struct EventBus {
    capacity: usize,
    node: String,
    clock: Arc<dyn Clock>,
    ring: parking_lot::Mutex<Ring>,
    /// The last id given; subscribers wait on it.
    newest: watch::Sender<u64>,
    /// Set when the server shuts down: subscribers end their feeds.
    closed: watch::Sender<bool>,
    published: [Counter; EventType::ALL.len()],
}

impl EventBus {
    /// A bus holding the last `capacity` events of node `node`, stamped
    /// by `clock`; `capacity` 0 turns events off.
    pub fn new(capacity: usize, node: &str, clock: Arc<dyn Clock>) -> Self {
        Self {
            capacity,
            node: node.to_owned(),
            clock,
            ring: parking_lot::Mutex::new(Ring {
                events: VecDeque::new(),
                next_id: 1,
                sinks: Vec::new(),
            }),
            newest: watch::Sender::new(0),
            closed: watch::Sender::new(false),
            published: EventType::ALL
                .map(|t| counter!("hexmatch_events_total", "type" => t.as_str())),
        }
    }

    /// Whether events are on.
    pub fn is_on(&self) -> bool {
        self.capacity > 0
    }

    /// How many events the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Publishes the event `data()` builds, if events are on. Never
    /// waits: a sink whose channel is full loses it (counted).
    pub fn publish(&self, data: impl FnOnce() -> EventData) {
        if self.capacity == 0 {
            return;
        }
        let data = data();
        let kind = data.event_type() as usize;
        let time = self.clock.now();
        let id = {
            let mut ring = self.ring.lock();
            let id = ring.next_id;
            ring.next_id += 1;
            let event = Arc::new(SharedEvent::new(Event {
                id,
                node: self.node.clone(),
                time,
                data,
            }));
            for sink in &ring.sinks {
                if sink.tx.try_send(Arc::clone(&event)).is_err() {
                    sink.dropped.increment(1);
                }
            }
            if ring.events.len() == self.capacity {
                ring.events.pop_front();
            }
            ring.events.push_back(event);
            id
        };
        self.published[kind].increment(1);
        self.newest.send_replace(id);
    }

    /// Adds a consumer fed through a channel of `queue` events (a full
    /// channel drops, counted as `hexmatch_events_dropped_total{sink}`).
    /// It gets the events published from now on.
    pub fn add_sink(&self, sink: &str, queue: usize) -> mpsc::Receiver<Arc<SharedEvent>> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        self.ring.lock().sinks.push(Sink {
            tx,
            dropped: counter!("hexmatch_events_dropped_total", "sink" => sink.to_owned(), "reason" => "queue_full"),
        });
        rx
    }

    /// The id of the newest event (0 before the first).
    pub fn newest_id(&self) -> u64 {
        self.ring.lock().next_id - 1
    }

    /// The events after `cursor` (see [`Read`]).
    pub fn read_after(&self, cursor: u64) -> Read {
        let ring = self.ring.lock();
        let newest = ring.next_id - 1;
        if cursor > newest {
            // An id from before a restart: everything held is new to it.
            return Read::Gap {
                first_id: ring.events.front().map_or(ring.next_id, |e| e.event.id),
            };
        }
        if cursor == newest {
            return Read::CaughtUp;
        }
        let Some(first) = ring.events.front().map(|e| e.event.id) else {
            return Read::Gap {
                first_id: ring.next_id,
            };
        };
        if cursor + 1 < first {
            return Read::Gap { first_id: first };
        }
        // Ids are contiguous: the event after the cursor is at this offset.
        let from = (cursor + 1 - first) as usize;
        Read::Events(
            ring.events
                .range(from..)
                .take(READ_BATCH)
                .cloned()
                .collect(),
        )
    }

    /// A receiver that changes with every event published.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }

    /// A receiver that turns `true` when the server shuts down.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Ends every subscriber's feed (shutdown: an open SSE response would
    /// hold the connection, and the drain, forever).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

impl super::Service {
    /// Announces a match as it now is (`match.<state>`).
    pub(super) fn emit_match(&self, m: &hexmatch::Match) {
        self.events
            .publish(|| EventData::of_match(self.match_out(m.clone())));
    }

    /// Announces a status change of a driver.
    pub(super) fn emit_status(
        &self,
        driver: &hexmatch::DriverId,
        previous: hexmatch::Status,
        status: hexmatch::Status,
        order: Option<&hexmatch::OrderId>,
    ) {
        self.events.publish(|| {
            EventData::DriverStatus(DriverStatusChange {
                driver_id: driver.clone(),
                previous,
                status,
                order_id: order.cloned(),
            })
        });
    }

    /// Announces what a match change did: the match, and its driver's
    /// status change (`previous` → what the match's state leaves it in;
    /// none when the driver is gone).
    pub(super) fn emit_match_change(&self, m: &hexmatch::Match, previous: hexmatch::Status) {
        use hexmatch::{MatchState, Status};
        if !self.events.is_on() {
            return;
        }
        let (status, order) = match m.state {
            MatchState::Reserved => (Status::Reserved, Some(&m.order_id)),
            MatchState::Confirmed => (Status::Busy, Some(&m.order_id)),
            _ => (Status::Available, None),
        };
        let gone = m.reason.as_deref() == Some("driver_removed");
        if !gone && previous != status {
            self.emit_status(&m.driver_id, previous, status, order);
        }
        self.emit_match(m);
    }

    /// Announces what a client's match change did (`result`), given the
    /// match as it was before (`was`): the change, or the expiry the
    /// engine made instead when the reservation had lapsed.
    pub(super) fn emit_transition(
        &self,
        order: &hexmatch::OrderId,
        was: Option<&hexmatch::Match>,
        result: &hexmatch::Result<hexmatch::Match>,
    ) {
        use hexmatch::{MatchState, Status};
        let Some(was) = was else { return };
        let previous = match was.state {
            MatchState::Reserved => Status::Reserved,
            MatchState::Confirmed => Status::Busy,
            // It had ended already: nothing changed.
            _ => return,
        };
        match result {
            Ok(m) => self.emit_match_change(m, previous),
            Err(hexmatch::Error::ReservationExpired(_)) => {
                if let Some(m) = self
                    .engine
                    .get_match(order)
                    .filter(|m| m.state == MatchState::Expired)
                {
                    self.emit_match_change(&m, previous);
                }
            }
            Err(_) => {}
        }
    }

    /// Publishes what applying updates did (ended matches, status
    /// changes, zone crossings) and hands back the ended orders, whose
    /// durable records must go.
    pub(super) fn publish_effects(
        &self,
        out: &mut super::drivers::Effects,
    ) -> Vec<hexmatch::OrderId> {
        if let Some(moved) = out.moved.take() {
            for d in &moved {
                self.track_zones(d);
            }
        }
        if let Some(statuses) = out.statuses.take() {
            for change in statuses {
                self.events.publish(|| EventData::DriverStatus(change));
            }
            for order in &out.ended {
                if let Some(m) = self.engine.get_match(order) {
                    self.emit_match(&m);
                }
            }
        }
        std::mem::take(&mut out.ended)
    }

    /// Announces the zones a driver entered and left with the update
    /// that left it as `d` (nothing without zones).
    pub(super) fn track_zones(&self, d: &hexmatch::Driver) {
        let Some(zones) = &self.zones else { return };
        if !self.events.is_on() {
            return;
        }
        for crossing in zones.track(d, self.regions.as_ref()) {
            self.events.publish(|| crossing.into_event());
        }
    }

    /// Announces that a driver that is gone left every zone it was in.
    pub(super) fn forget_zones(&self, d: &hexmatch::Driver) {
        let Some(zones) = &self.zones else { return };
        for crossing in zones.forget(d) {
            self.events.publish(|| crossing.into_event());
        }
    }
}

/// Which event types a subscriber wants: `types=match.*,driver.expired`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeFilter(u16);

impl TypeFilter {
    /// Every type.
    pub const ALL: Self = Self((1 << EventType::ALL.len()) - 1);

    /// Parses a comma-separated list of types, each exact or a prefix
    /// ending in `*` (`match.*`, `driver.*`, `*`).
    ///
    /// # Errors
    /// A pattern that names no event type (the message lists them).
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut bits = 0u16;
        for pattern in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let matched = EventType::ALL
                .iter()
                .enumerate()
                .filter(|(_, t)| match pattern.strip_suffix('*') {
                    Some(prefix) => t.as_str().starts_with(prefix),
                    None => t.as_str() == pattern,
                })
                .fold(0u16, |acc, (i, _)| acc | (1 << i));
            if matched == 0 {
                let names: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
                return Err(format!(
                    "types: {pattern:?} names no event type; the types are {}, and a pattern may end in *",
                    names.join(", ")
                ));
            }
            bits |= matched;
        }
        Ok(if bits == 0 { Self::ALL } else { Self(bits) })
    }

    /// Whether `t` passes.
    pub fn allows(self, t: EventType) -> bool {
        self.0 & (1 << t as usize) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hexmatch::{DriverId, ManualClock, Status, Timestamp};

    fn bus(capacity: usize) -> EventBus {
        let clock = Arc::new(ManualClock::new(Timestamp::from_millis(1_000).unwrap()));
        EventBus::new(capacity, "n1", clock)
    }

    fn status_event() -> EventData {
        EventData::DriverStatus(DriverStatusChange {
            driver_id: DriverId::new("d1").unwrap(),
            previous: Status::Available,
            status: Status::Offline,
            order_id: None,
        })
    }

    fn ids(read: Read) -> Vec<u64> {
        match read {
            Read::Events(v) => v.iter().map(|e| e.event.id).collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn ids_are_contiguous_and_a_cursor_reads_what_follows_it() {
        let b = bus(10);
        for _ in 0..5 {
            b.publish(status_event);
        }
        assert_eq!(b.newest_id(), 5);
        assert_eq!(ids(b.read_after(0)), vec![1, 2, 3, 4, 5]);
        assert_eq!(ids(b.read_after(3)), vec![4, 5]);
        assert!(matches!(b.read_after(5), Read::CaughtUp));
    }

    #[test]
    fn a_cursor_behind_the_ring_or_ahead_of_it_is_a_gap() {
        let b = bus(3);
        for _ in 0..7 {
            b.publish(status_event);
        }
        assert_eq!(ids(b.read_after(4)), vec![5, 6, 7]);
        assert!(matches!(b.read_after(3), Read::Gap { first_id: 5 }));
        assert!(matches!(b.read_after(0), Read::Gap { first_id: 5 }));
        assert!(matches!(b.read_after(99), Read::Gap { first_id: 5 }));
    }

    #[test]
    fn reads_are_bounded() {
        let b = bus(1000);
        for _ in 0..600 {
            b.publish(status_event);
        }
        assert_eq!(ids(b.read_after(0)).len(), READ_BATCH);
    }

    #[test]
    fn off_means_nothing_is_built() {
        let b = bus(0);
        b.publish(|| unreachable!("an event built with events off"));
        assert_eq!(b.newest_id(), 0);
    }

    #[test]
    fn a_full_sink_loses_events_without_blocking() {
        let b = bus(10);
        let mut rx = b.add_sink("test", 2);
        for _ in 0..5 {
            b.publish(status_event);
        }
        assert_eq!(rx.try_recv().unwrap().event.id, 1);
        assert_eq!(rx.try_recv().unwrap().event.id, 2);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn type_patterns_glob_on_the_prefix() {
        let f = TypeFilter::parse("match.*,driver.expired").unwrap();
        assert!(f.allows(EventType::MatchReserved));
        assert!(f.allows(EventType::MatchCompleted));
        assert!(f.allows(EventType::DriverExpired));
        assert!(!f.allows(EventType::DriverStatus));
        assert!(!f.allows(EventType::DriverEntered));
        assert_eq!(TypeFilter::parse("").unwrap(), TypeFilter::ALL);
        assert_eq!(TypeFilter::parse("*").unwrap(), TypeFilter::ALL);
        assert!(TypeFilter::parse("match.reserve").is_err());
        assert!(TypeFilter::parse("order.*").is_err());
    }

    #[test]
    fn an_event_is_json_of_its_envelope() {
        let b = bus(1);
        b.publish(status_event);
        let Read::Events(v) = b.read_after(0) else {
            panic!("one event")
        };
        let back: Event = serde_json::from_str(v[0].json()).unwrap();
        assert_eq!(back, v[0].event);
        let raw: serde_json::Value = serde_json::from_str(v[0].json()).unwrap();
        assert_eq!(raw["type"], "driver.status");
        assert_eq!(raw["data"]["status"], "offline");
        assert_eq!(raw["id"], 1);
        assert_eq!(raw["node"], "n1");
    }
}
