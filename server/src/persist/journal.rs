//! Region journals (cluster mode): every change a node makes to a driver
//! of a region it serves is appended to the region's stream before the
//! change is acknowledged, each region snapshot records the last entry it
//! covers, and a node taking the region over replays the stream from
//! there. Every driver therefore comes back exactly as it was last
//! acknowledged, not as the last snapshot saw it.
//!
//! # Keys (prefix `p`, region `r`)
//! | key | what |
//! | --- | --- |
//! | `p:{region:r}:locations` | stream of driver states and departures |
//! | `p:{region:r}:snap:offset` / `…:offset:prev` | last entry the current / previous snapshot covers |
//!
//! # Entries
//! - A state: `driver_id lat lon ts status vehicle capabilities`, the
//!   fields of the ingestion stream `p:locations`, read by the same
//!   decoder, and `order_id` for a driver in a live match. The status may
//!   be `reserved`, which clients cannot send. A taker loads a driver
//!   with an order only with that order's match (it restores the match
//!   records first): the others are held by matches recorded in regions
//!   other nodes serve.
//! - A departure: `driver_id` and `removed` = `1`. Written when a driver
//!   leaves the region: it moved out, was handed to another node, or was
//!   removed.
//!
//! # Invariants
//! - An entry is appended by a script that first checks the region's lease
//!   (`FENCED_APPEND`), after the change is applied in memory and
//!   before it is acknowledged. A node that lost the lease appends
//!   nothing.
//! - A snapshot's offset is the highest entry id this node had been
//!   answered before the snapshot was taken. Each of those entries was
//!   applied in memory before it was appended, so the snapshot holds it.
//!   Entries after the offset may be in the snapshot too; replaying them
//!   is harmless, since each is a whole state.
//! - The manifest and the offset switch together, and the stream is
//!   trimmed to the previous snapshot's offset in the same script
//!   (`REGION_SWITCH`), so a restore that falls back to the previous
//!   snapshot still finds every entry after it.
//!
//! # Cost
//! One script call per region touched by a request or batch (entries are
//! sent 512 at a time), on the location path of cluster nodes only.

use std::collections::HashMap;

use hexmatch::{Driver, DriverId, OrderId, Status};
use redis::Value;

use super::conn::{self, Durability};
use super::{Persistence, WriteError, bulk_string, parse_entries};
use crate::wire::LocationItem;

/// Appends entries to a region's journal while the region's lease is the
/// token's. KEYS: lease, stream. ARGV: token, then per entry its number of
/// arguments and its field / value pairs. Returns the last entry's id, or
/// 0 when the lease is not (or no longer) the token's.
pub(super) const FENCED_APPEND: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local i, last = 2, ''
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  last = redis.call('XADD', KEYS[2], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return last
";

/// Switches a region's snapshot and its journal offset while the lease is
/// the token's: the current manifest and offset become `prev`, and the
/// journal is trimmed to the entries after the new `prev` offset. KEYS:
/// manifest, prev manifest, lease, offset, prev offset, journal. ARGV: the
/// new manifest, the token, the new offset. Returns the manifest that was
/// `prev` before.
pub(super) const REGION_SWITCH: &str = r"
if redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return redis.error_reply('NOTOWNER this node no longer holds the lease')
end
local cur = redis.call('GET', KEYS[1])
local old = redis.call('GET', KEYS[2])
if cur then
  redis.call('SET', KEYS[2], cur)
  local off = redis.call('GET', KEYS[4])
  if off then
    redis.call('SET', KEYS[5], off)
    redis.call('XTRIM', KEYS[6], 'MINID', off)
  else
    redis.call('DEL', KEYS[5])
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], ARGV[3])
return old
";

/// Entries sent in one script call (a batch may hold thousands).
const ENTRIES_PER_CALL: usize = 512;

/// Entries read per `XRANGE` while replaying.
const ENTRIES_PER_READ: usize = 10_000;

/// A stream entry id, `ms-seq`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    /// Parses `ms-seq` (a bare `ms` means `ms-0`).
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One change to a driver, as a region's journal records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The driver as it now is.
    Put(Driver),
    /// The driver left the region.
    Gone(DriverId),
}

impl Change {
    /// One line for the logs: the driver, and its status or departure.
    fn describe(&self) -> String {
        match self {
            Self::Put(d) => format!("{} {}", d.id, d.status),
            Self::Gone(id) => format!("{id} gone"),
        }
    }

    /// The entry's field / value pairs.
    fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Gone(id) => vec![("driver_id", id.to_string()), ("removed", "1".to_owned())],
            Self::Put(d) => {
                // `reserved`, and the order of a driver in a match: a taker
                // must not offer (or keep a copy of) a driver held by a
                // match whose record is in another region.
                let mut fields = vec![
                    ("driver_id", d.id.to_string()),
                    ("lat", d.pos.lat().to_string()),
                    ("lon", d.pos.lon().to_string()),
                    ("ts", d.ts.as_millis().to_string()),
                    ("status", d.status.to_string()),
                    ("vehicle", d.vehicle.to_string()),
                    (
                        "capabilities",
                        d.capabilities.names().collect::<Vec<_>>().join(","),
                    ),
                ];
                if let Some(order) = &d.order_id {
                    fields.push(("order_id", order.to_string()));
                }
                fields
            }
        }
    }
}

/// A journal entry as read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// The driver's whole state, with the order of its match if it was
    /// in one.
    Put(Driver),
    /// The driver left the region.
    Gone(DriverId),
}

impl Entry {
    /// Decodes an entry's fields.
    ///
    /// # Errors
    /// A field missing, unknown, repeated or invalid.
    pub fn decode(fields: &[(String, String)]) -> Result<Self, String> {
        if let [(k1, id), (k2, one)] = fields
            && k1 == "driver_id"
            && k2 == "removed"
            && one == "1"
        {
            return DriverId::new(id).map(Self::Gone).map_err(|e| e.to_string());
        }
        // The fields a client sends are parsed as a client's; `reserved`
        // (which clients may not set) and the order are the journal's.
        let mut reserved = false;
        let mut order = None;
        let mut client: Vec<(String, String)> = Vec::with_capacity(fields.len());
        for (k, v) in fields {
            match (k.as_str(), v.as_str()) {
                ("order_id", _) if order.is_some() => return Err("order_id repeated".into()),
                ("order_id", id) => {
                    order = Some(OrderId::new(id).map_err(|e| e.to_string())?);
                }
                ("status", "reserved") => {
                    reserved = true;
                    client.push((k.clone(), Status::Available.to_string()));
                }
                _ => client.push((k.clone(), v.clone())),
            }
        }
        let u = LocationItem::from_stream_fields(&client)
            .and_then(LocationItem::into_update)
            .map_err(|e| e.message().to_owned())?;
        // A state is whole: a field left out would be taken from the
        // driver's previous state, which a replay may not have.
        let (Some(ts), Some(status), Some(vehicle), Some(capabilities)) =
            (u.ts, u.status, u.vehicle, u.capabilities)
        else {
            return Err("a journal state needs ts, status, vehicle and capabilities".into());
        };
        Ok(Self::Put(Driver {
            status: if reserved { Status::Reserved } else { status },
            vehicle,
            capabilities,
            order_id: order,
            ..Driver::available(u.id, u.pos, ts)
        }))
    }
}

/// The drivers of a region as its journal leaves them: `base` (a
/// snapshot's drivers) with `entries` applied in order. Each state
/// replaces the driver's; each departure removes it; a driver whose last
/// state fails `stays` (it is outside the region now) is dropped. The
/// base's drivers the journal does not name are kept as they are.
pub fn replay(
    mut base: Vec<Driver>,
    entries: impl IntoIterator<Item = Entry>,
    stays: impl Fn(&Driver) -> bool,
) -> Vec<Driver> {
    // Each driver's last entry (`None`: gone). Journals are short next to
    // their snapshots, so the base is read once, in place, and hashed not
    // at all when the journal is empty.
    let mut last: HashMap<DriverId, Option<Driver>> = HashMap::new();
    for entry in entries {
        match entry {
            Entry::Put(d) => last.insert(d.id.clone(), Some(d)),
            Entry::Gone(id) => last.insert(id, None),
        };
    }
    if last.is_empty() {
        return base;
    }
    for now in last.values_mut() {
        if now.as_ref().is_some_and(|d| !stays(d)) {
            *now = None;
        }
    }
    base.retain_mut(|d| match last.remove(&d.id) {
        Some(Some(now)) => {
            *d = now;
            true
        }
        Some(None) => false,
        None => true,
    });
    // Drivers that arrived after the snapshot.
    base.extend(last.into_values().flatten());
    base
}

/// The last entry this node appended to (or replayed from) each region's
/// journal.
#[derive(Debug, Default)]
pub(super) struct Tails(parking_lot::Mutex<HashMap<String, EntryId>>);

impl Tails {
    fn advance(&self, region: &str, id: EntryId) {
        let mut tails = self.0.lock();
        let tail = tails.entry(region.to_owned()).or_default();
        *tail = (*tail).max(id);
    }

    /// Where a snapshot of `region` taken now starts to be behind.
    pub(super) fn offset(&self, region: &str) -> EntryId {
        self.0.lock().get(region).copied().unwrap_or_default()
    }

    /// Forgets a region this node no longer serves.
    pub(super) fn forget(&self, region: &str) {
        self.0.lock().remove(region);
    }

    /// Starts a region taken over at the last entry replayed.
    pub(super) fn start(&self, region: &str, id: EntryId) {
        self.0.lock().insert(region.to_owned(), id);
    }
}

impl Persistence {
    /// Appends `changes` (each with its region) to the regions' journals,
    /// in order within each region, each region's under its lease; the
    /// changes were applied in memory when [`Persistence::losses`] was
    /// `since`. Without a fence (a single node) there is nothing to do.
    ///
    /// # Errors
    /// `NotOwner` when this node does not hold a region's lease (any
    /// more), or lost a lease since the changes were applied (a takeover
    /// after that loss restored a state without them); Redis errors.
    /// Changes already applied in memory stay: the caller answers 503 and
    /// the client's retry is journalled.
    pub async fn journal(
        &self,
        changes: Vec<(String, Change)>,
        since: u64,
    ) -> Result<(), WriteError> {
        self.journal_with(changes, since, Durability::default())
            .await
    }

    /// [`Persistence::journal`], done only once the replicas required of
    /// durable writes have the entries: for departures (a driver that
    /// moved out, was handed over or removed). A departure lost with a
    /// Redis master would bring the driver back, available, in the region
    /// it left while another node offers it too.
    ///
    /// # Errors
    /// As [`Persistence::journal`], and `NotReplicated`.
    pub async fn journal_durably(
        &self,
        changes: Vec<(String, Change)>,
        since: u64,
    ) -> Result<(), WriteError> {
        self.journal_with(changes, since, self.durability).await
    }

    async fn journal_with(
        &self,
        changes: Vec<(String, Change)>,
        since: u64,
        durability: Durability,
    ) -> Result<(), WriteError> {
        let Some(fence) = self.fence.get() else {
            return Ok(());
        };
        if changes.is_empty() {
            return Ok(());
        }
        let mut by_region: Vec<(String, Vec<Change>)> = Vec::new();
        for (region, change) in changes {
            match by_region.iter_mut().find(|(r, _)| *r == region) {
                Some((_, v)) => v.push(change),
                None => by_region.push((region, vec![change])),
            }
        }
        let leases: Vec<_> = by_region.iter().map(|(r, _)| fence.lease(r)).collect();
        // Read after the leases: a takeover counts its loss before it starts.
        if fence.losses() != since {
            let region = by_region.swap_remove(0).0;
            return Err(WriteError::NotOwner { region });
        }
        let appends =
            by_region
                .into_iter()
                .zip(leases)
                .map(|((region, changes), lease)| async move {
                    let lease = lease.map_err(|region| WriteError::NotOwner { region })?;
                    let stream = self.keys.region(&region, "locations");
                    for part in changes.chunks(ENTRIES_PER_CALL) {
                        let encoded: Vec<Vec<(&str, String)>> =
                            part.iter().map(Change::fields).collect();
                        let counts: Vec<String> =
                            encoded.iter().map(|f| (f.len() * 2).to_string()).collect();
                        let mut args: Vec<&[u8]> = vec![lease.token.as_bytes()];
                        for (fields, count) in encoded.iter().zip(&counts) {
                            args.push(count.as_bytes());
                            for (k, v) in fields {
                                args.push(k.as_bytes());
                                args.push(v.as_bytes());
                            }
                        }
                        let mut conn = self.conn.clone();
                        let (last, short) = self.note(
                            conn::eval_durable(
                                &mut conn,
                                durability,
                                FENCED_APPEND,
                                &[&lease.key, &stream],
                                &args,
                            )
                            .await,
                        )?;
                        tracing::debug!(
                            region,
                            last = ?last,
                            changes = ?part.iter().map(Change::describe).collect::<Vec<_>>(),
                            "journalled"
                        );
                        match bulk_string(last).as_deref().and_then(EntryId::parse) {
                            Some(id) => self.tails.advance(&region, id),
                            None => {
                                return Err(WriteError::NotOwner {
                                    region: region.clone(),
                                });
                            }
                        }
                        if let Some(n) = short {
                            return Err(self.not_replicated(n));
                        }
                    }
                    Ok(())
                });
        let results = futures_util::future::join_all(appends).await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// The entries of `region`'s journal after `offset`, in order, and the
    /// last id read (`offset` when there are none). Entries that do not
    /// decode are logged and skipped.
    ///
    /// # Errors
    /// Redis errors.
    pub(super) async fn journal_after(
        &self,
        region: &str,
        offset: EntryId,
    ) -> redis::RedisResult<(Vec<Entry>, EntryId)> {
        let stream = self.keys.region(region, "locations");
        let mut conn = self.conn.clone();
        let (mut out, mut last) = (Vec::new(), offset);
        loop {
            let page: Value = self.note(
                redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(format!("({last}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(ENTRIES_PER_READ)
                    .query_async(&mut conn)
                    .await,
            )?;
            let entries = parse_entries(page);
            let n = entries.len();
            for (id, fields) in entries {
                if let Some(id) = EntryId::parse(&id) {
                    last = last.max(id);
                }
                match Entry::decode(&fields) {
                    Ok(e) => out.push(e),
                    Err(e) => tracing::warn!(region, %id, error = %e, "journal entry skipped"),
                }
            }
            if n < ENTRIES_PER_READ {
                return Ok((out, last));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use hexmatch::{Capabilities, Position, Timestamp, Vehicle};

    use super::*;

    fn driver(id: &str, lat: f64, status: Status) -> Driver {
        Driver {
            status,
            vehicle: Vehicle::Van,
            capabilities: Capabilities::from_names(["wheelchair", "cash"]).expect("caps"),
            ..Driver::available(
                DriverId::new(id).expect("id"),
                Position::new(lat, -87.63).expect("pos"),
                Timestamp::from_millis(1_700_000_000_123).expect("ts"),
            )
        }
    }

    fn owned(fields: Vec<(&'static str, String)>) -> Vec<(String, String)> {
        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn a_state_reads_back_as_the_driver_it_was() {
        let d = driver("d1", 41.88, Status::Busy);
        let back = |d: &Driver| Entry::decode(&owned(Change::Put(d.clone()).fields()));
        assert_eq!(back(&d).expect("entry"), Entry::Put(d.clone()));
        // A reserved driver reads back reserved: written available, a
        // taker of a region the driver entered while held by a match
        // recorded elsewhere offered it to a second order.
        let r = driver("d2", 41.88, Status::Reserved);
        assert_eq!(back(&r).expect("entry"), Entry::Put(r.clone()));
        // The order of its match comes back too: without it, a taker
        // kept a busy copy of a driver another node holds in a match.
        for status in [Status::Busy, Status::Reserved] {
            let held = Driver {
                order_id: Some(OrderId::new("o-9").expect("order")),
                ..driver("d4", 41.88, status)
            };
            assert_eq!(back(&held).expect("entry"), Entry::Put(held.clone()));
        }
        let gone = Change::Gone(DriverId::new("d3").expect("id"));
        assert_eq!(
            Entry::decode(&owned(gone.fields())).expect("entry"),
            Entry::Gone(DriverId::new("d3").expect("id"))
        );
    }

    #[test]
    fn partial_or_bad_entries_are_refused() {
        let d = owned(Change::Put(driver("d1", 41.88, Status::Available)).fields());
        for drop in [
            "ts",
            "status",
            "vehicle",
            "capabilities",
            "lat",
            "driver_id",
        ] {
            let partial: Vec<(String, String)> =
                d.iter().filter(|(k, _)| k != drop).cloned().collect();
            assert!(Entry::decode(&partial).is_err(), "without {drop}");
        }
        let bad = |k: &str, v: &str| {
            vec![
                (k.to_owned(), "x".to_owned()),
                ("removed".to_owned(), v.to_owned()),
            ]
        };
        let with = |k: &str, v: &str| {
            let mut f = d.clone();
            f.push((k.to_owned(), v.to_owned()));
            f
        };
        assert!(Entry::decode(&with("order_id", "bad order")).is_err());
        let twice = with("order_id", "o1");
        assert!(
            Entry::decode(&[twice.clone(), vec![("order_id".into(), "o2".into())]].concat())
                .is_err()
        );
        assert!(Entry::decode(&bad("driver_id", "0")).is_err());
        assert!(Entry::decode(&bad("id", "1")).is_err());
        assert!(
            Entry::decode(&[
                ("driver_id".into(), String::new()),
                ("removed".into(), "1".into())
            ])
            .is_err()
        );
    }

    #[test]
    fn replay_keeps_each_driver_s_last_entry() {
        let up = |id: &str, lat: f64| driver(id, lat, Status::Available);
        let gone = |id: &str| Entry::Gone(DriverId::new(id).expect("id"));
        let base = vec![up("a", 41.80), up("b", 41.80), up("c", 41.80)];
        let entries = [
            Entry::Put(up("a", 41.81)),
            gone("b"),
            Entry::Put(up("a", 41.82)),
            Entry::Put(up("d", 41.83)),
            gone("d"),
            Entry::Put(up("d", 41.84)),
            gone("nobody"),
            Entry::Put(up("e", 41.85)),
            Entry::Put(up("f", 41.90)),
        ];
        // "f" moved out of the region; "c", never named, is not asked.
        let stays = |u: &Driver| {
            assert_ne!(u.id.as_str(), "c", "an unchanged driver was checked");
            u.pos.lat() < 41.9
        };
        let mut out: Vec<(String, f64)> = replay(base, entries, stays)
            .into_iter()
            .map(|u| (u.id.to_string(), u.pos.lat()))
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            out,
            [
                ("a".into(), 41.82),
                ("c".into(), 41.80),
                ("d".into(), 41.84),
                ("e".into(), 41.85)
            ]
        );
    }

    #[test]
    fn entry_ids_order_as_redis_orders_them() {
        let id = |s| EntryId::parse(s).expect("id");
        assert!(id("9-5") < id("10-0"));
        assert!(id("10-0") < id("10-1"));
        assert_eq!(id("7"), id("7-0"));
        assert_eq!(id("1700000000000-3").to_string(), "1700000000000-3");
        assert_eq!(EntryId::default().to_string(), "0-0");
        assert!(EntryId::parse("x-1").is_none());
        assert!(EntryId::parse("1-").is_none());
    }
}
