//! Redis persistence: snapshots, restore on boot, durable reservations and
//! location ingestion from a Redis Stream, on a single Redis or a Redis
//! Cluster ([`conn`]).
//!
//! # Keys (prefix `p`, namespace `n`: `default`, or in a cluster the node id)
//! | key | what |
//! | --- | --- |
//! | `p:{ns:n}:snap:manifest` / `…:manifest:prev` | current and previous snapshot manifest |
//! | `p:{ns:n}:snap:gen` | generation counter (`INCR`) |
//! | `p:{ns:n}:snap:g{gen}:{i}` | chunk `i` of generation `gen` |
//! | `p:{ns:n}:matches` | hash: order id → durable record of each live match (one node) |
//! | `p:{region:r}:matches` | the same, per region (cluster: written under the region's lease) |
//! | `p:{order:o}` | `region\|lease` holding order `o`'s match (cluster) |
//! | `p:{region:r}:snap:…` | a region's snapshot, as above (cluster) |
//! | `p:{region:r}:locations`, `…:snap:offset` | a region's journal and the entry its snapshot covers ([`journal`]) |
//! | `p:locations` / `p:locations:dead` | update stream (group `hexmatch`) / dead letters |
//! | `p:events` | every node's events, capped with `MAXLEN ~` ([`events`]) |
//!
//! A single node's first restore after an upgrade reads the layout before
//! hash tags (`p:n:…`) when the tagged keys are absent.
//!
//! # Guarantees
//! - A snapshot's chunks are written first, then the manifest is switched
//!   by one script (the old one kept as `prev`; in a cluster, only while the
//!   region's lease is this node's); chunks two generations old are
//!   `UNLINK`ed. A reader never sees a half-written snapshot, and a
//!   corrupt one falls back to `prev`.
//! - Every match change is written through before the HTTP response, and
//!   with `--redis-replicas N` only once `N` replicas have it (`WAIT`).
//!   Changes to one order are serialised by a per-order lock.
//!   - A claim reserves in memory, then writes; a repeat of the claim
//!     writes again. If Redis refuses the write (a lease lost, the order
//!     held elsewhere) the driver is released; if the outcome is unknown
//!     (no answer, too few replicas) the driver stays held for the order
//!     and the records are resynced. Either way the answer is 503.
//!   - Confirm, release and complete write first, then act in memory. If
//!     the write fails, memory is untouched and the answer is 503.
//!   - Where Redis and memory could still diverge, the records are resynced
//!     once Redis answers again (an expiry whose delete failed, a
//!     driver-side end, a write the replicas did not confirm). A resync
//!     skips the orders whose change is under way (their lock is held),
//!     whose engine state is older than Redis's until the change acts. In a
//!     cluster the resync only writes: a record the node does not know may
//!     belong to a region it dropped while losing the lease.
//!
//!   The divergence is always toward "held": a restart may hold a driver
//!   until its reservation lapses, but never gives it to a second order.
//! - In a cluster, an order's record (`p:{order:o}`) is taken before its
//!   match is written; a twin claim in another region finds it taken. The
//!   match itself is written by a script that first checks the region's
//!   lease, in the lease's slot.
//! - While Redis is down, match requests are refused with 503
//!   `unavailable` before anything changes. Locations and nearest keep
//!   serving from memory, and `/readyz` says `degraded`.

pub mod conn;
pub mod events;
pub mod journal;
pub mod stripes;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hexmatch::{Driver, DurableMatch, Engine, Manifest, OrderId, Position, Status};
use metrics::{counter, gauge, histogram};
use redis::{AsyncCommands, RedisResult, Value};
use tokio::sync::MutexGuard;

pub use self::conn::{ConnOptions, Durability, Keys, NotReplicated, RedisConn};

/// Region snapshots stored at once (each is a few round trips).
const STORES_AT_ONCE: usize = 16;

/// Regions read at once in a takeover's restore.
const RESTORE_READS_AT_ONCE: usize = 8;

/// Drivers per snapshot chunk: about 1–2 MB per chunk before compression.
pub const CHUNK_DRIVERS: usize = 50_000;
const ORDER_LOCKS: usize = 256;

/// A connection to Redis plus what the server needs to know about it.
pub struct Persistence {
    conn: RedisConn,
    /// Blocking stream reads (`XREADGROUP … BLOCK`) hold a multiplexed
    /// connection until they return, so they get one of their own.
    stream_conn: RedisConn,
    keys: Keys,
    /// The namespace of this node's snapshots (and, alone, its matches).
    ns: String,
    durability: Durability,
    node_id: String,
    up: AtomicBool,
    needs_resync: AtomicBool,
    order_locks: stripes::StripedLocks,
    /// In a cluster, match writes are fenced by region leases.
    fence: std::sync::OnceLock<Arc<dyn Fence>>,
    /// Snapshots and durable writes that failed in a row, and why.
    health: parking_lot::Mutex<Health>,
    /// In a cluster: the region whose hash holds each live match this node
    /// wrote or restored. A match stays in that region's hash (under its
    /// lease) however far its driver moves, so its later writes go there
    /// too, and losing that region means losing the match.
    homes: parking_lot::Mutex<HashMap<String, String>>,
    /// In a cluster: the last journal entry of each region served.
    tails: journal::Tails,
}

/// A Redis command that failed, with the key it was about.
#[derive(Debug)]
pub struct KeyError {
    /// The key.
    pub key: String,
    /// What Redis said.
    pub error: redis::RedisError,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.error.code() == Some("WRONGTYPE") {
            write!(
                f,
                "key {} holds a value of the wrong type; remove or rename it ({})",
                self.key, self.error
            )
        } else {
            write!(f, "{}: {}", self.key, self.error)
        }
    }
}

impl std::error::Error for KeyError {}

/// Failures in a row after which the node reports itself degraded.
pub const FAILURES_BEFORE_DEGRADED: u32 = 3;

/// What recent snapshots and durable writes say about Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Snapshots that failed since the last good one.
    pub snapshot_failures: u32,
    /// Durable match writes that failed since the last good one.
    pub write_failures: u32,
    /// Why the last one failed.
    pub last_error: Option<String>,
    /// When the last good snapshot was taken (Unix ms, this node's clock).
    pub last_snapshot_ms: Option<i64>,
}

impl Health {
    /// Why the node should not be trusted with traffic now, if it should not.
    pub fn degraded_reason(&self) -> Option<String> {
        let why = self.last_error.as_deref().unwrap_or("unknown error");
        if self.snapshot_failures >= FAILURES_BEFORE_DEGRADED {
            return Some(format!(
                "the last {} snapshots failed: {why}",
                self.snapshot_failures
            ));
        }
        if self.write_failures >= FAILURES_BEFORE_DEGRADED {
            return Some(format!(
                "the last {} durable writes failed: {why}",
                self.write_failures
            ));
        }
        None
    }
}

/// How long an order's region record outlives its last write.
const ORDER_KEY_TTL_MS: u64 = 24 * 3600 * 1000;

/// Switches a node's snapshot manifest: the current one becomes `prev`.
/// KEYS: manifest, prev. ARGV: the new manifest. Returns the `prev`
/// replaced (its generation's chunks are no longer referenced). A region's
/// snapshot switches with its journal offset instead
/// ([`journal::REGION_SWITCH`]).
const SWITCH_MANIFEST: &str = r"
local cur = redis.call('GET', KEYS[1])
local old = redis.call('GET', KEYS[2])
if cur then redis.call('SET', KEYS[2], cur) end
redis.call('SET', KEYS[1], ARGV[1])
return old
";

/// Writes (or deletes, for an empty record) a match record in its
/// region's hash only while the region's lease is ours. KEYS: lease,
/// region matches. ARGV: token, order, record. Returns 1 when done, 0 when
/// the lease is not (or no longer) the token's.
const FENCED_PUT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[2], ARGV[2])
else
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
end
return 1
";

/// Takes an order's cluster-wide record for a region. KEYS: order key.
/// ARGV: region, value (`region|lease token`), TTL ms. Returns 1 when
/// taken now, 2 when the region held it already (the value is renewed),
/// and the holder's value when another region holds it.
const TAKE_ORDER: &str = r"
local h = redis.call('GET', KEYS[1])
if h and string.match(h, '^[^|]*') ~= ARGV[1] then return h end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if h then return 2 end
return 1
";

/// Deletes a key only if it still holds the value given. KEYS: the key.
/// ARGV: the value.
const DROP_IF: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Writes live records into a region's matches hash, only while the lease
/// is ours; it deletes nothing (a record this node does not know may be
/// one it dropped with a lease it was losing). KEYS: lease, region
/// matches. ARGV: token, then order / record pairs.
const FENCED_RESYNC: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
return 1
";

/// The region part of an order record's value (`region|token`).
pub fn order_holder_region(value: &str) -> &str {
    value.split('|').next().unwrap_or(value)
}

/// The lease a fenced write must still hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease's Redis key.
    pub key: String,
    /// Its value while this node holds it (`node|epoch`).
    pub token: String,
    /// The region it is the lease of.
    pub region: String,
}

impl Lease {
    /// The value of an order record taken under this lease
    /// (`region|token`; [`order_holder_region`] reads the region back).
    fn order_holder(&self) -> String {
        format!("{}|{}", self.region, self.token)
    }
}

/// Region leases that fence match writes in a cluster (implemented by
/// the cluster layer above, which owns the leases).
pub trait Fence: Send + Sync + std::fmt::Debug {
    /// The region of a position.
    ///
    /// # Errors
    /// Why the position has none.
    fn region_of_pos(&self, pos: Position) -> Result<String, String>;

    /// The lease of `region` if this node serves it now.
    ///
    /// # Errors
    /// The region, when this node does not hold its lease.
    fn lease(&self, region: &str) -> Result<Lease, String>;

    /// The regions this node serves now.
    fn held_regions(&self) -> Vec<String>;

    /// How many times this node has lost leases so far (it counts up
    /// before the regions' drivers and matches are dropped). A match made
    /// in memory before a loss must not be written after it: a later
    /// takeover of the same region by this node restored what Redis held
    /// then, without that match.
    fn losses(&self) -> u64;
}

/// Why a match write was not made.
#[derive(Debug)]
pub enum WriteError {
    /// This node does not hold the lease of the match's region (any more).
    NotOwner {
        /// The region.
        region: String,
    },
    /// Another region's node holds a match for the order.
    OrderTaken {
        /// The order.
        order: String,
        /// The region holding it.
        region: String,
    },
    /// Redis took the write, but fewer replicas than required
    /// acknowledged it in time: it is not durable.
    NotReplicated(NotReplicated),
    /// Redis refused or did not answer.
    Redis(redis::RedisError),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotOwner { region } => {
                write!(f, "this node does not hold the lease of region {region}")
            }
            Self::OrderTaken { order, region } => {
                write!(f, "order {order} is held in region {region}")
            }
            Self::NotReplicated(n) => write!(f, "{n}"),
            Self::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WriteError {}

impl From<redis::RedisError> for WriteError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(e)
    }
}

/// A stream entry that failed validation, for the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The entry's id.
    pub id: String,
    /// Its fields.
    pub fields: Vec<(String, String)>,
    /// Why it was rejected.
    pub code: crate::error::ErrorCode,
    /// The human explanation.
    pub message: String,
}

/// What applying stream entries leaves to do: the entry ids to
/// acknowledge, the invalid entries to dead-letter, and the orders whose
/// match a driver's status ended (their records go).
pub type Ingested = (Vec<String>, Vec<DeadLetter>, Vec<OrderId>);

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("keys", &self.keys)
            .field("ns", &self.ns)
            .finish_non_exhaustive()
    }
}

/// What a restore found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Drivers loaded from the snapshot.
    pub drivers: usize,
    /// Generation loaded, if any.
    pub generation: Option<u64>,
    /// Live matches restored.
    pub matches: usize,
    /// Problems met on the way (corrupt snapshot, bad records).
    pub warnings: Vec<String>,
}

impl Persistence {
    /// Connects (with automatic reconnection) to the Redis or Redis
    /// Cluster `url` names ([`conn`]); snapshots go under namespace `ns`,
    /// durable writes wait for `durability`'s replicas.
    ///
    /// # Errors
    /// The URL is invalid or Redis cannot be reached now.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ns: &str,
        node_id: &str,
        durability: Durability,
    ) -> Result<Arc<Self>, String> {
        let opts = ConnOptions {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2) + durability.timeout,
            retries: 2,
        };
        let conn = conn::connect(url, opts).await?;
        let stream_conn = conn::connect(url, opts).await?;
        Ok(Arc::new(Self {
            conn,
            stream_conn,
            keys: Keys::new(prefix),
            ns: ns.to_owned(),
            durability,
            node_id: node_id.to_owned(),
            up: AtomicBool::new(true),
            needs_resync: AtomicBool::new(false),
            order_locks: stripes::StripedLocks::new(ORDER_LOCKS),
            fence: std::sync::OnceLock::new(),
            health: parking_lot::Mutex::default(),
            homes: parking_lot::Mutex::default(),
            tails: journal::Tails::default(),
        }))
    }

    /// A key of this node's namespace.
    fn key(&self, suffix: &str) -> String {
        self.keys.ns(&self.ns, suffix)
    }

    /// Fences every later match write with `fence`'s leases.
    pub fn set_fence(&self, fence: Arc<dyn Fence>) {
        let _ = self.fence.set(fence);
    }

    /// The stream location updates are read from.
    pub fn stream_key(&self) -> String {
        self.keys.stream()
    }

    /// Whether the last command or health check reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Recent snapshot and write outcomes.
    pub fn health(&self) -> Health {
        self.health.lock().clone()
    }

    /// Counts a durable write's outcome (a lost lease is not Redis's fault).
    fn note_write<T>(&self, r: Result<T, WriteError>) -> Result<T, WriteError> {
        let mut h = self.health.lock();
        match &r {
            Ok(_) => h.write_failures = 0,
            Err(WriteError::NotOwner { .. } | WriteError::OrderTaken { .. }) => {}
            Err(WriteError::Redis(e)) => {
                h.write_failures += 1;
                h.last_error = Some(e.to_string());
            }
            Err(WriteError::NotReplicated(n)) => {
                h.write_failures += 1;
                h.last_error = Some(n.to_string());
                counter!("hexmatch_redis_not_replicated_total").increment(1);
            }
        }
        r
    }

    fn note<T>(&self, r: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &r {
            if e.is_io_error()
                || e.is_timeout()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
            {
                self.up.store(false, Ordering::Release);
            }
            counter!("hexmatch_redis_errors_total").increment(1);
        }
        r
    }

    /// Serialises changes to one order (claim, confirm, release, …).
    pub async fn lock_order(&self, order: &OrderId) -> MutexGuard<'_, ()> {
        self.order_locks.lock(order.as_str()).await
    }

    /// The order locks no change holds now, taken (`None` where one is
    /// held): while they are held, no order of theirs changes.
    fn idle_stripes(&self) -> Vec<Option<MutexGuard<'_, ()>>> {
        self.order_locks.try_lock_each()
    }

    /// Writes an order's durable record (a live match) or deletes it (ended).
    ///
    /// # Errors
    /// Redis errors, too few replicas, or a lease lost; the caller decides
    /// whether to undo or answer 503.
    pub async fn put_match(&self, rec: &DurableMatch) -> Result<(), WriteError> {
        let r = self.put_match_unnoted(rec, None).await;
        self.note_write(r)
    }

    /// [`Persistence::put_match`] for a match made in memory when
    /// [`Persistence::losses`] was `since`: in a cluster, refused
    /// (`NotOwner`) if this node has lost a lease since.
    ///
    /// # Errors
    /// As [`Persistence::put_match`].
    pub async fn put_match_since(&self, rec: &DurableMatch, since: u64) -> Result<(), WriteError> {
        let r = self.put_match_unnoted(rec, Some(since)).await;
        self.note_write(r)
    }

    /// How many times this node has lost region leases (0 outside a
    /// cluster): read before a match is made in memory, and given to
    /// [`Persistence::put_match_since`].
    pub fn losses(&self) -> u64 {
        self.fence.get().map_or(0, |f| f.losses())
    }

    async fn put_match_unnoted(
        &self,
        rec: &DurableMatch,
        since: Option<u64>,
    ) -> Result<(), WriteError> {
        if let Some(fence) = self.fence.get() {
            return self.put_match_fenced(fence.as_ref(), rec, since).await;
        }
        // A single node's records: its own hash, no lease.
        let key = self.key("matches");
        let mut pipe = redis::pipe();
        if rec.m.state.is_live() {
            pipe.hset(&key, rec.m.order_id.as_str(), rec.encode())
        } else {
            pipe.hdel(&key, rec.m.order_id.as_str())
        };
        self.write_pipe(pipe.ignore()).await
    }

    /// Sends `pipe` (whose answers are ignored) and, when replicas are
    /// required, `WAIT` on the same connection.
    async fn write_pipe(&self, pipe: &mut redis::Pipeline) -> Result<(), WriteError> {
        if self.durability.replicas > 0 {
            pipe.cmd("WAIT")
                .arg(self.durability.replicas)
                .arg(self.durability.timeout.as_millis() as u64);
        }
        let mut conn = self.conn.clone();
        let acked: Vec<i64> = self.note(pipe.query_async(&mut conn).await)?;
        match acked.first() {
            Some(&n) if n < i64::from(self.durability.replicas) => {
                Err(self.not_replicated(NotReplicated {
                    acked: u32::try_from(n).unwrap_or(0),
                    wanted: self.durability.replicas,
                }))
            }
            _ => Ok(()),
        }
    }

    /// Marks the records for a full resync (a write Redis has, but its
    /// replicas may not) and reports the write as not made.
    fn not_replicated(&self, n: NotReplicated) -> WriteError {
        self.needs_resync.store(true, Ordering::Release);
        WriteError::NotReplicated(n)
    }

    /// In a cluster: takes the order's record for the driver's region, then
    /// writes the match into the region's hash only if this node still
    /// holds the region's lease, checked by Redis in the same script.
    async fn put_match_fenced(
        &self,
        fence: &dyn Fence,
        rec: &DurableMatch,
        since: Option<u64>,
    ) -> Result<(), WriteError> {
        if !rec.m.state.is_live() {
            // Deleted where the record is (never where the driver is now).
            return self.del_match_unnoted(&rec.m.order_id).await;
        }
        let order = rec.m.order_id.as_str();
        let home = self.homes.lock().get(order).cloned();
        let region = match home {
            Some(r) => r,
            None => fence
                .region_of_pos(rec.driver_pos)
                .map_err(|region| WriteError::NotOwner { region })?,
        };
        let lease = fence
            .lease(&region)
            .map_err(|region| WriteError::NotOwner { region })?;
        // A loss since the match was made: the lease read above may be of
        // a later takeover, whose restore did not see this match. (Read
        // after the lease: a takeover counts its loss before it starts.)
        if since.is_some_and(|g| g != fence.losses()) {
            return Err(WriteError::NotOwner { region });
        }
        let order_key = self.keys.order(order);
        let value = lease.order_holder();
        let ttl = ORDER_KEY_TTL_MS.to_string();
        let mut conn = self.conn.clone();
        let (taken, short) = self.note(
            conn::eval_durable(
                &mut conn,
                self.durability,
                TAKE_ORDER,
                &[&order_key],
                &[lease.region.as_bytes(), value.as_bytes(), ttl.as_bytes()],
            )
            .await,
        )?;
        tracing::debug!(
            order,
            region = lease.region,
            driver = %rec.m.driver_id,
            taken = ?taken,
            short = ?short,
            "order record taken"
        );
        let (created, lease) = match taken {
            Value::Int(1) => (true, lease),
            Value::Int(_) => (false, lease),
            Value::BulkString(holder) => {
                let holder = String::from_utf8_lossy(&holder);
                let region = order_holder_region(&holder);
                // Taken by this node, in this lease, for the region its
                // driver was in then (the write's outcome was not known,
                // and the driver has moved since): the record goes there.
                match fence.lease(region) {
                    Ok(l) if holder == l.order_holder() => (false, l),
                    _ => {
                        return Err(WriteError::OrderTaken {
                            order: order.to_owned(),
                            region: region.to_owned(),
                        });
                    }
                }
            }
            other => {
                return Err(WriteError::Redis(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "unexpected answer to the order script",
                    format!("{other:?}"),
                ))));
            }
        };
        // The order's record names this region from now on: every later
        // write of this match goes to its hash, wherever the driver goes,
        // even when the outcome of the write below is not known.
        self.homes
            .lock()
            .insert(order.to_owned(), lease.region.clone());
        let written = match short {
            Some(n) => Err(self.not_replicated(n)),
            None => self.fenced_write(&lease, order, &rec.encode()).await,
        };
        // Free the order for a twin elsewhere only when Redis refused the
        // write (nothing was written), and only if the order's record is
        // still the one taken here. A write that may have been made (not
        // replicated in time, or no answer) keeps the order held: a live
        // record without its order's record would let a twin match it twice.
        if matches!(written, Err(WriteError::NotOwner { .. })) && created {
            self.homes.lock().remove(order);
            let _ = self
                .note(
                    conn::eval_durable(
                        &mut conn,
                        Durability::default(),
                        DROP_IF,
                        &[&order_key],
                        &[value.as_bytes()],
                    )
                    .await,
                )
                .ok();
        }
        written
    }

    /// Writes (or with an empty record deletes) `order`'s record in the
    /// region's hash, fenced by `lease`.
    async fn fenced_write(
        &self,
        lease: &Lease,
        order: &str,
        record: &[u8],
    ) -> Result<(), WriteError> {
        let hash = self.keys.region(&lease.region, "matches");
        let answer = self.note(
            conn::eval_durable(
                &mut self.conn.clone(),
                self.durability,
                FENCED_PUT,
                &[&lease.key, &hash],
                &[lease.token.as_bytes(), order.as_bytes(), record],
            )
            .await,
        );
        tracing::debug!(
            order,
            region = lease.region,
            token = lease.token,
            live = !record.is_empty(),
            answer = ?answer,
            "match record written"
        );
        let (done, short) = answer?;
        match (done, short) {
            (Value::Int(1), None) => Ok(()),
            (Value::Int(1), Some(n)) => Err(self.not_replicated(n)),
            _ => Err(WriteError::NotOwner {
                region: lease.region.clone(),
            }),
        }
    }

    /// Writes many live records (a batch): one pipelined round trip on a
    /// single node, one fenced write each in a cluster.
    ///
    /// # Errors
    /// Redis errors, too few replicas, or a lease lost.
    pub async fn put_matches(&self, recs: &[DurableMatch]) -> Result<(), WriteError> {
        if recs.is_empty() {
            return Ok(());
        }
        if self.fence.get().is_some() {
            for rec in recs {
                self.put_match(rec).await?;
            }
            return Ok(());
        }
        let key = self.key("matches");
        let mut pipe = redis::pipe();
        for rec in recs {
            pipe.hset(&key, rec.m.order_id.as_str(), rec.encode())
                .ignore();
        }
        let r = self.write_pipe(&mut pipe).await;
        self.note_write(r)
    }

    /// Deletes the durable record of a match that ended (`rec`, its last
    /// live state).
    ///
    /// # Errors
    /// Redis errors, too few replicas, or a lease lost.
    pub async fn end_match(&self, rec: &DurableMatch) -> Result<(), WriteError> {
        let mut ended = rec.clone();
        ended.m.state = hexmatch::MatchState::Released;
        self.put_match(&ended).await
    }

    /// Deletes an order's durable record; in a cluster, in the region its
    /// order record names.
    ///
    /// # Errors
    /// Redis errors, or a lease lost.
    pub async fn del_match(&self, order: &OrderId) -> Result<(), WriteError> {
        let r = self.del_match_unnoted(order).await;
        self.note_write(r)
    }

    async fn del_match_unnoted(&self, order: &OrderId) -> Result<(), WriteError> {
        let Some(fence) = self.fence.get() else {
            let mut conn = self.conn.clone();
            let r = conn
                .hdel::<_, _, ()>(self.key("matches"), order.as_str())
                .await;
            return self.note(r).map_err(WriteError::Redis);
        };
        let home = self.homes.lock().get(order.as_str()).cloned();
        let region = if let Some(r) = home {
            r
        } else {
            let mut conn = self.conn.clone();
            let holder: Option<String> =
                self.note(conn.get(self.keys.order(order.as_str())).await)?;
            let Some(holder) = holder else {
                // No record names the region: nothing to delete.
                return Ok(());
            };
            order_holder_region(&holder).to_owned()
        };
        let lease = fence
            .lease(&region)
            .map_err(|region| WriteError::NotOwner { region })?;
        self.fenced_write(&lease, order.as_str(), &[]).await?;
        self.homes.lock().remove(order.as_str());
        Ok(())
    }

    /// Brings one order's record in line with the engine (best effort; a
    /// failure schedules a full resync).
    pub async fn sync_order(&self, engine: &Engine, order: &OrderId) {
        let r = match engine.durable_match(order) {
            Some(rec) => self.put_match(&rec).await,
            None => self.del_match(order).await,
        };
        if r.is_err() {
            self.needs_resync.store(true, Ordering::Release);
        }
    }

    /// The region whose hash holds `order`'s record, as far as this node
    /// knows (it wrote or restored the record).
    pub fn home_of(&self, order: &str) -> Option<String> {
        self.homes.lock().get(order).cloned()
    }

    /// [`Persistence::sync_order`] for each of `orders` (those a driver's
    /// status ended, say).
    pub async fn sync_orders(&self, engine: &Engine, orders: &[OrderId]) {
        for order in orders {
            self.sync_order(engine, order).await;
        }
    }

    /// Forgets which live matches `region`'s hash holds (its lease was
    /// lost) and returns their orders: their drivers leave this node with
    /// the region, wherever they are now.
    pub fn release_region(&self, region: &str) -> Vec<String> {
        self.tails.forget(region);
        let mut homes = self.homes.lock();
        let orders: Vec<String> = homes
            .iter()
            .filter(|(_, r)| *r == region)
            .map(|(o, _)| o.clone())
            .collect();
        for o in &orders {
            homes.remove(o);
        }
        orders
    }

    /// Marks the match records as possibly behind the engine.
    pub fn schedule_resync(&self) {
        self.needs_resync.store(true, Ordering::Release);
    }

    /// Brings the match records in line with the engine's live matches: a
    /// single node's hash is rewritten to exactly them; in a cluster, the
    /// hash of every region this node serves gets them written (under the
    /// region's lease) and keeps any other record, toward "held".
    ///
    /// An order whose change is under way (its lock is held) is left as it
    /// is, and resynced next time: a confirmation or an end writes Redis
    /// before it acts in memory, so until it acts the engine's state of
    /// that order is older than Redis's, and writing it back would undo an
    /// acknowledged change. The other orders' locks are held until the
    /// writes are made.
    ///
    /// # Errors
    /// Redis errors (the resync stays scheduled).
    pub async fn resync_matches(&self, engine: &Engine) -> RedisResult<()> {
        self.needs_resync.store(false, Ordering::Release);
        let stripes = self.idle_stripes();
        let settled = |order: &str| stripes[self.order_locks.stripe(order)].is_some();
        if !stripes.iter().all(Option::is_some) {
            self.needs_resync.store(true, Ordering::Release);
        }
        let records: Vec<DurableMatch> = engine
            .durable_matches()
            .into_iter()
            .filter(|r| settled(r.m.order_id.as_str()))
            .collect();
        let r = if let Some(fence) = self.fence.get() {
            self.resync_regions(fence.as_ref(), records).await
        } else {
            self.resync_node(records, &settled).await
        };
        if r.is_err() {
            self.needs_resync.store(true, Ordering::Release);
        }
        r
    }

    /// A single node's hash made to hold exactly `records` among the
    /// `settled` orders (the others are left as they are).
    async fn resync_node(
        &self,
        records: Vec<DurableMatch>,
        settled: &(dyn Fn(&str) -> bool + Sync),
    ) -> RedisResult<()> {
        let key = self.key("matches");
        let mut conn = self.conn.clone();
        let present: Vec<String> = self.note(conn.hkeys(&key).await)?;
        let live: std::collections::HashSet<&str> =
            records.iter().map(|r| r.m.order_id.as_str()).collect();
        let gone: Vec<&String> = present
            .iter()
            .filter(|o| settled(o) && !live.contains(o.as_str()))
            .collect();
        if gone.is_empty() && records.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        if !gone.is_empty() {
            pipe.hdel(&key, gone).ignore();
        }
        for rec in &records {
            pipe.hset(&key, rec.m.order_id.as_str(), rec.encode())
                .ignore();
        }
        match self.write_pipe(&mut pipe).await {
            Err(WriteError::Redis(e)) => Err(e),
            // Not replicated: a resync is scheduled again.
            _ => Ok(()),
        }
    }

    async fn resync_regions(
        &self,
        fence: &dyn Fence,
        records: Vec<DurableMatch>,
    ) -> RedisResult<()> {
        // The leases first, then the matches: a region lost and taken
        // back meanwhile refuses these tokens, so a match dropped with it
        // is never written into its new epoch's records.
        let leases: HashMap<String, Lease> = fence
            .held_regions()
            .into_iter()
            .filter_map(|r| Some((r.clone(), fence.lease(&r).ok()?)))
            .collect();
        let mut by_region: HashMap<String, Vec<DurableMatch>> =
            leases.keys().map(|r| (r.clone(), Vec::new())).collect();
        // Records whose region is not known here (the order's record may
        // not have been taken) go one by one, taking the order's record
        // first, as a claim does.
        let mut loose = Vec::new();
        for rec in records {
            match self.home_of(rec.m.order_id.as_str()) {
                Some(region) => {
                    if let Some(recs) = by_region.get_mut(&region) {
                        recs.push(rec);
                    }
                }
                None => loose.push(rec),
            }
        }
        for rec in loose {
            match self.put_match_fenced(fence, &rec, None).await {
                Ok(()) => {}
                Err(WriteError::Redis(e)) => return Err(e),
                Err(WriteError::NotReplicated(_)) => self.schedule_resync(),
                Err(e) => {
                    tracing::warn!(order = %rec.m.order_id, error = %e, "live match not resynced");
                }
            }
        }
        for (region, recs) in by_region {
            let Some(lease) = leases.get(&region) else {
                continue;
            };
            let hash = self.keys.region(&region, "matches");
            let encoded = encode_records(&recs);
            let mut args: Vec<&[u8]> = vec![lease.token.as_bytes()];
            args.extend(record_args(&encoded));
            self.note(
                conn::eval_durable(
                    &mut self.conn.clone(),
                    self.durability,
                    FENCED_RESYNC,
                    &[&lease.key, &hash],
                    &args,
                )
                .await,
            )?;
        }
        Ok(())
    }

    /// Takes a snapshot and stores it under a new generation, then switches
    /// the manifest. Returns the encoded size in bytes. A failure leaves
    /// no key of the new generation behind, and is counted in
    /// [`Persistence::health`] (a good snapshot resets the count).
    ///
    /// # Errors
    /// The failed command and its key.
    pub async fn write_snapshot(&self, engine: &Arc<Engine>) -> Result<usize, KeyError> {
        let r = self.try_write_snapshot(engine).await;
        let mut h = self.health.lock();
        match &r {
            Ok((_, taken_at_ms)) => {
                h.snapshot_failures = 0;
                h.last_snapshot_ms = Some(*taken_at_ms);
            }
            Err(e) => {
                h.snapshot_failures += 1;
                h.last_error = Some(e.to_string());
                counter!("hexmatch_snapshot_failures_total").increment(1);
            }
        }
        r.map(|(bytes, _)| bytes)
    }

    /// The next snapshot generation of `place`. A counter that holds
    /// something other than a number (garbled by hand or by another
    /// program) is repaired: set past every generation the manifests name.
    async fn next_generation(&self, place: &SnapPlace) -> Result<u64, KeyError> {
        let key = place.key("snap:gen");
        let at = |error| KeyError {
            key: key.clone(),
            error,
        };
        let mut conn = self.conn.clone();
        let error = match self.note(conn.incr(&key, 1).await) {
            Ok(g) => return Ok(g),
            // Only a value that is not a number can be repaired; every
            // other refusal (a cluster failing over, a lost connection) is
            // reported as it is.
            Err(e) if e.to_string().contains("not an integer") => e,
            Err(e) => return Err(at(e)),
        };
        // A refusal by Redis itself: only a plain string can be repaired.
        let kind: String = self
            .note(redis::cmd("TYPE").arg(&key).query_async(&mut conn).await)
            .map_err(at)?;
        if kind != "string" {
            return Err(at(error));
        }
        let mut next = 1;
        for manifest in [place.key("snap:manifest"), place.key("snap:manifest:prev")] {
            let raw: Option<Vec<u8>> = conn.get(&manifest).await.unwrap_or(None);
            if let Some(m) = raw.as_deref().and_then(|b| Manifest::decode(b).ok()) {
                next = next.max(m.generation + 1);
            }
        }
        self.note(conn.set::<_, _, ()>(&key, next).await)
            .map_err(at)?;
        tracing::warn!(key = %key, generation = next, error = %error, "the snapshot generation counter was not a number; repaired");
        Ok(next)
    }

    /// One snapshot of every driver under this node's namespace, or in a
    /// cluster one per region this node serves, each under the region's
    /// keys and switched in only while its lease is ours. Returns the
    /// bytes written and when the snapshot was taken.
    async fn try_write_snapshot(&self, engine: &Arc<Engine>) -> Result<(usize, i64), KeyError> {
        let started = Instant::now();
        let task_failed = |e: tokio::task::JoinError| KeyError {
            key: self.key("snap:manifest"),
            error: redis::RedisError::from((
                redis::ErrorKind::Client,
                "snapshot task failed",
                e.to_string(),
            )),
        };
        let mut offsets: HashMap<String, (Lease, journal::EntryId)> = HashMap::new();
        let snaps: Vec<(SnapPlace, hexmatch::Snapshot)> = match self.fence.get() {
            None => {
                let place = SnapPlace::Ns(self.keys.clone(), self.ns.clone());
                let generation = self.next_generation(&place).await?;
                let e = Arc::clone(engine);
                let snap =
                    tokio::task::spawn_blocking(move || e.snapshot(generation, CHUNK_DRIVERS))
                        .await
                        .map_err(task_failed)?;
                vec![(place, snap)]
            }
            Some(fence) => {
                // One generation per region, asked for all at once.
                let asks = fence.held_regions().into_iter().map(|region| async move {
                    let place = SnapPlace::Region(self.keys.clone(), region.clone());
                    self.next_generation(&place).await.map(|g| (region, g))
                });
                let parts = futures_util::future::try_join_all(asks).await?;
                // Read before the snapshot is taken: every journal entry up
                // to these offsets is in it (see [`journal`]). The leases
                // too: a region lost and taken back meanwhile refuses them,
                // so an older state never replaces a newer epoch's snapshot.
                offsets = parts
                    .iter()
                    .filter_map(|(r, _)| {
                        Some((r.clone(), (fence.lease(r).ok()?, self.tails.offset(r))))
                    })
                    .collect();
                let (e, f) = (Arc::clone(engine), Arc::clone(fence));
                let snaps = tokio::task::spawn_blocking(move || {
                    e.snapshot_parts(&parts, CHUNK_DRIVERS, |d| f.region_of_pos(d.pos).ok())
                })
                .await
                .map_err(task_failed)?;
                snaps
                    .into_iter()
                    .map(|(region, snap)| (SnapPlace::Region(self.keys.clone(), region), snap))
                    .collect()
            }
        };
        // Each region's snapshot in its own slot: stored side by side, at
        // most `STORES_AT_ONCE` at a time.
        let (mut bytes, mut drivers, mut taken_at_ms, mut first_error) = (0, 0, 0, None);
        let stores = snaps.into_iter().filter_map(|(place, snap)| {
            let fenced = match &place {
                // Not held when the snapshot began: the owner snapshots it.
                SnapPlace::Region(_, region) => Some(offsets.get(region)?.clone()),
                SnapPlace::Ns(..) => None,
            };
            Some(async move {
                let fenced = fenced.as_ref().map(|(l, o)| (l, *o));
                let stored = self.store_snapshot(&place, &snap, fenced).await;
                (stored, snap.manifest.drivers, snap.manifest.taken_at_ms)
            })
        });
        let mut stores = futures_util::stream::iter(stores).buffer_unordered(STORES_AT_ONCE);
        while let Some((stored, n, at)) = stores.next().await {
            match stored {
                Ok(b) => bytes += b,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            drivers += n;
            taken_at_ms = at;
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        histogram!("hexmatch_snapshot_duration_seconds").record(started.elapsed().as_secs_f64());
        gauge!("hexmatch_snapshot_bytes").set(bytes as f64);
        gauge!("hexmatch_snapshot_drivers").set(drivers as f64);
        gauge!("hexmatch_snapshot_taken_at_seconds").set(taken_at_ms as f64 / 1000.0);
        counter!("hexmatch_snapshots_total").increment(1);
        Ok((bytes, taken_at_ms))
    }

    /// Stores one snapshot at `place`: its chunks, then the manifest
    /// switch (for a region, fenced by its lease and with the journal
    /// offset the snapshot covers); a generation that did not
    /// become current leaves no key behind, and the one two generations
    /// old is unlinked. Returns the bytes written.
    async fn store_snapshot(
        &self,
        place: &SnapPlace,
        snap: &hexmatch::Snapshot,
        fenced: Option<(&Lease, journal::EntryId)>,
    ) -> Result<usize, KeyError> {
        let generation = snap.manifest.generation;
        let chunk_keys: Vec<String> = (0..snap.chunks.len())
            .map(|i| place.chunk_key(generation, i))
            .collect();
        let written = self
            .write_generation(place, snap, &chunk_keys, fenced)
            .await;
        if written.is_err() && !chunk_keys.is_empty() {
            // Nothing refers to this generation: leave none of it behind.
            let mut conn = self.conn.clone();
            let _ = conn.unlink::<_, ()>(&chunk_keys).await;
        }
        let previous = written?;
        // The generation before the previous one is no longer referenced.
        if let Some(old) = previous.as_deref().and_then(|b| Manifest::decode(b).ok()) {
            let keys: Vec<String> = (0..old.chunks.len())
                .map(|i| place.chunk_key(old.generation, i))
                .collect();
            if !keys.is_empty() {
                let mut conn = self.conn.clone();
                let _ = self.note(conn.unlink::<_, ()>(keys).await);
            }
        }
        Ok(snap.manifest.encode().len() + snap.chunks.iter().map(Vec::len).sum::<usize>())
    }

    /// Writes a snapshot's chunks, then switches the manifest (the current
    /// one becomes `prev`). Returns the manifest that was `prev` before.
    async fn write_generation(
        &self,
        place: &SnapPlace,
        snap: &hexmatch::Snapshot,
        chunk_keys: &[String],
        fenced: Option<(&Lease, journal::EntryId)>,
    ) -> Result<Option<Vec<u8>>, KeyError> {
        let mut conn = self.conn.clone();
        let (manifest_key, prev_key) =
            (place.key("snap:manifest"), place.key("snap:manifest:prev"));
        if !chunk_keys.is_empty() {
            let mut pipe = redis::pipe();
            for (key, chunk) in chunk_keys.iter().zip(&snap.chunks) {
                pipe.set(key, chunk.as_slice()).ignore();
            }
            self.note(pipe.query_async::<()>(&mut conn).await)
                .map_err(|error| KeyError {
                    key: chunk_keys[0].clone(),
                    error,
                })?;
        }
        // One read each first, so that a key of the wrong type is named (a
        // region's keys are only ever written by this code).
        let named: &[&String] = if fenced.is_none() {
            &[&manifest_key, &prev_key]
        } else {
            &[]
        };
        for key in named {
            self.note(conn.get::<_, Option<Vec<u8>>>(key).await)
                .map_err(|error| KeyError {
                    key: (*key).clone(),
                    error,
                })?;
        }
        // Then one script in the place's slot (not a MULTI, whose MOVED a
        // Redis Cluster client does not follow).
        let manifest = snap.manifest.encode();
        let mut keys = vec![manifest_key.clone(), prev_key.clone()];
        let mut args: Vec<Vec<u8>> = vec![manifest];
        let script = match fenced {
            None => SWITCH_MANIFEST,
            Some((lease, offset)) => {
                keys.push(lease.key.clone());
                keys.extend(["snap:offset", "snap:offset:prev", "locations"].map(|s| place.key(s)));
                args.push(lease.token.clone().into_bytes());
                args.push(offset.to_string().into_bytes());
                journal::REGION_SWITCH
            }
        };
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let (previous, _) = self
            .note(conn::eval_durable(&mut conn, Durability::default(), script, &keys, &args).await)
            .map_err(|error| KeyError {
                key: manifest_key.clone(),
                error,
            })?;
        Ok(match previous {
            Value::BulkString(b) => Some(b),
            _ => None,
        })
    }

    /// Reads and checks the snapshot under `manifest_key`.
    async fn read_snapshot(
        &self,
        manifest_key: &str,
        chunk_key: &(dyn Fn(u64, usize) -> String + Sync),
    ) -> Result<Option<(Manifest, Vec<Vec<u8>>)>, ReadError> {
        let redis = |error: redis::RedisError| {
            ReadError::Redis(
                KeyError {
                    key: manifest_key.to_owned(),
                    error,
                }
                .to_string(),
            )
        };
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = self.note(conn.get(manifest_key).await).map_err(redis)?;
        let Some(raw) = raw else { return Ok(None) };
        let manifest = Manifest::decode(&raw)
            .map_err(|e| ReadError::Damaged(format!("{manifest_key}: {e}")))?;
        let keys: Vec<String> = (0..manifest.chunks.len())
            .map(|i| chunk_key(manifest.generation, i))
            .collect();
        let chunks: Vec<Option<Vec<u8>>> = if keys.is_empty() {
            Vec::new()
        } else {
            self.note(redis::cmd("MGET").arg(&keys).query_async(&mut conn).await)
                .map_err(redis)?
        };
        let chunks = chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                c.ok_or_else(|| {
                    ReadError::Damaged(format!(
                        "{manifest_key}: chunk {i} of generation {} is missing",
                        manifest.generation
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((manifest, chunks)))
    }

    /// Restores the latest good snapshot (falling back to the previous
    /// generation) and then the live matches, into an empty engine. When
    /// none of this node's tagged keys exist, the layout before hash tags
    /// is read instead, and the matches are rewritten in the new one.
    ///
    /// # Errors
    /// Only when Redis cannot be read at all; corrupt data is reported in
    /// [`Restored::warnings`] and skipped, never loaded half-way.
    pub async fn restore(&self, engine: &Arc<Engine>) -> Result<Restored, String> {
        let mut out = Restored::default();
        let ns = self.ns.clone();
        let tagged = |suffix: &str| self.keys.ns(&ns, suffix);
        let legacy = |suffix: &str| self.keys.legacy_ns(&ns, suffix);
        let mut conn = self.conn.clone();
        let exists = |key: String| {
            let mut conn = conn.clone();
            async move {
                self.note(conn.exists::<_, bool>(&key).await)
                    .map_err(|error| KeyError { key, error }.to_string())
            }
        };
        let upgrade = !exists(tagged("snap:manifest")).await?
            && !exists(tagged("matches")).await?
            && (exists(legacy("snap:manifest")).await? || exists(legacy("matches")).await?);
        let key_of: &(dyn Fn(&str) -> String + Sync) = if upgrade { &legacy } else { &tagged };
        let chunk_key = |g: u64, i: usize| key_of(&format!("snap:g{g}:{i}"));
        // Every read that can refuse the restore comes before the engine
        // is touched, so a refused restore leaves it empty.
        let key = key_of("matches");
        let raw: HashMap<String, Vec<u8>> = self
            .note(conn.hgetall(&key).await)
            .map_err(|error| KeyError { key, error }.to_string())?;
        for key in [key_of("snap:manifest"), key_of("snap:manifest:prev")] {
            match self.read_snapshot(&key, &chunk_key).await {
                Ok(None) => {}
                Ok(Some((manifest, chunks))) => {
                    let e = Arc::clone(engine);
                    let m = manifest.clone();
                    let loaded =
                        tokio::task::spawn_blocking(move || e.restore_snapshot(&m, &chunks))
                            .await
                            .map_err(|e| e.to_string())?;
                    match loaded {
                        Ok(n) => {
                            out.drivers = n;
                            out.generation = Some(manifest.generation);
                            break;
                        }
                        Err(e) => out.warnings.push(format!("{key}: {e}")),
                    }
                }
                Err(ReadError::Damaged(e)) => out.warnings.push(e),
                Err(ReadError::Redis(e)) => return Err(e),
            }
        }
        let mut records = Vec::with_capacity(raw.len());
        for (order, bytes) in raw {
            match DurableMatch::decode(&bytes) {
                Ok(r) => records.push(r),
                Err(e) => out.warnings.push(format!("match record {order:?}: {e}")),
            }
        }
        let report = engine.restore_matches(records);
        out.matches = report.restored;
        out.warnings.extend(
            report
                .skipped
                .into_iter()
                .map(|(o, why)| format!("match {o}: {why}")),
        );
        if !out.warnings.is_empty() {
            counter!("hexmatch_restore_warnings_total").increment(out.warnings.len() as u64);
        }
        if upgrade {
            tracing::info!(
                drivers = out.drivers,
                matches = out.matches,
                "restored from the key layout before hash tags; the next snapshot uses the new one"
            );
            self.resync_matches(engine)
                .await
                .map_err(|e| format!("rewriting the matches in the new key layout: {e}"))?;
        }
        Ok(out)
    }

    /// Restores `regions`, taken over (cluster mode): each region's
    /// latest good snapshot (its drivers that `region_of` maps to the
    /// region), with the region's journal replayed from the offset that
    /// snapshot covers, then the live matches in each region's records,
    /// loaded into a running engine. Returns (drivers, matches) restored
    /// per region.
    ///
    /// # Errors
    /// Redis cannot be read, or both of a region's snapshots are corrupt;
    /// then nothing is loaded.
    pub async fn restore_region(
        &self,
        engine: &Arc<Engine>,
        regions: &[String],
        region_of: &(dyn Fn(hexmatch::Position) -> Option<String> + Sync),
    ) -> Result<HashMap<String, (usize, usize)>, String> {
        // Every read comes before the engine is touched; the regions are
        // read side by side (each in its own slots), and their snapshots
        // decoded off the runtime's threads.
        let started = std::time::Instant::now();
        let reads: Vec<_> = regions
            .iter()
            .map(|region| self.read_region(region))
            .collect();
        let read: Vec<_> = futures_util::stream::iter(reads)
            .buffer_unordered(RESTORE_READS_AT_ONCE)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let fetched = started.elapsed();
        let drivers = replay_regions(read, region_of);
        let hashes = futures_util::future::join_all(regions.iter().map(|region| {
            let mut conn = self.conn.clone();
            let key = self.keys.region(region, "matches");
            async move {
                let raw: RedisResult<HashMap<String, Vec<u8>>> = conn.hgetall(&key).await;
                self.note(raw)
                    .map(|raw| (region, raw))
                    .map_err(|error| KeyError { key, error }.to_string())
            }
        }))
        .await;
        let mut records: Vec<(String, DurableMatch)> = Vec::new();
        for hash in hashes {
            let (region, raw) = hash?;
            for (order, bytes) in raw {
                match DurableMatch::decode(&bytes) {
                    Ok(r) if r.m.state.is_live() => records.push((region.clone(), r)),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%order, region, error = %e, "match record not restored");
                    }
                }
            }
        }
        let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
        let mut all = Vec::with_capacity(drivers.iter().map(|(_, f, _)| f.len()).sum());
        for (region, finals, tail) in drivers {
            counts.entry(region.clone()).or_default().0 = finals.len();
            all.extend(finals);
            self.tails.start(&region, tail);
        }
        // Matches first: a driver of a live match is never in the engine
        // as available, where a claim of a region served already (across
        // a border) could take it.
        let report = engine.restore_matches(records.iter().map(|(_, r)| r.clone()));
        for (order, why) in &report.skipped {
            tracing::warn!(%order, why, "match not restored in takeover");
        }
        let read = started.elapsed();
        let e = Arc::clone(engine);
        let loaded = tokio::task::spawn_blocking(move || upsert_drivers(&e, all))
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            regions = regions.len(),
            drivers = loaded,
            read_ms = read.as_millis() as u64,
            fetch_ms = fetched.as_millis() as u64,
            load_ms = started.elapsed().saturating_sub(read).as_millis() as u64,
            "regions restored"
        );
        let mut homes = self.homes.lock();
        for (region, r) in &records {
            if !report.skipped.iter().any(|(o, _)| *o == r.m.order_id) {
                counts.entry(region.clone()).or_default().1 += 1;
                homes.insert(r.m.order_id.to_string(), region.clone());
            }
        }
        Ok(counts)
    }

    /// What a takeover reads of `region`: its latest good snapshot, and
    /// the journal entries after the offset that snapshot covers.
    async fn read_region(
        &self,
        region: &str,
    ) -> Result<(String, Vec<Driver>, Vec<journal::Entry>, journal::EntryId), String> {
        let (base, offset) = self.region_snapshot(region).await?;
        let (entries, tail) = self.journal_after(region, offset).await.map_err(|error| {
            let key = self.keys.region(region, "locations");
            KeyError { key, error }.to_string()
        })?;
        Ok((region.to_owned(), base, entries, tail))
    }

    /// A region's latest good snapshot (the previous one when the latest
    /// is damaged; none when it has none) and the journal offset it
    /// covers.
    ///
    /// # Errors
    /// Redis cannot be read, or both snapshots are damaged.
    async fn region_snapshot(
        &self,
        region: &str,
    ) -> Result<(Vec<Driver>, journal::EntryId), String> {
        let place = SnapPlace::Region(self.keys.clone(), region.to_owned());
        let chunk_key = |g: u64, i: usize| place.chunk_key(g, i);
        let mut problems = Vec::new();
        let mut found = None;
        for (manifest, offset) in [
            ("snap:manifest", "snap:offset"),
            ("snap:manifest:prev", "snap:offset:prev"),
        ] {
            let key = place.key(manifest);
            match self.read_snapshot(&key, &chunk_key).await {
                Ok(None) => {}
                Ok(Some((manifest, chunks))) => match tokio::task::spawn_blocking(move || {
                    hexmatch::decode_snapshot(&manifest, &chunks)
                })
                .await
                .map_err(|e| e.to_string())?
                {
                    Ok(all) => {
                        found = Some((all, offset));
                        break;
                    }
                    Err(e) => problems.push(format!("{key}: {e}")),
                },
                Err(ReadError::Damaged(e) | ReadError::Redis(e)) => problems.push(e),
            }
        }
        let Some((drivers, offset_suffix)) = found else {
            // No snapshot: the whole journal is the region.
            return if problems.is_empty() {
                Ok((Vec::new(), journal::EntryId::default()))
            } else {
                Err(problems.join("; "))
            };
        };
        let key = place.key(offset_suffix);
        let mut conn = self.conn.clone();
        let raw: Option<String> = self
            .note(conn.get(&key).await)
            .map_err(|error| KeyError { key, error }.to_string())?;
        // A snapshot written before journals had none: replay them all.
        let offset = raw
            .as_deref()
            .and_then(journal::EntryId::parse)
            .unwrap_or_default();
        Ok((drivers, offset))
    }

    /// Pings Redis; on recovery, runs a pending resync.
    pub async fn check_health(&self, engine: &Engine) {
        let mut conn = self.conn.clone();
        let ok = redis::cmd("PING")
            .query_async::<Value>(&mut conn)
            .await
            .is_ok();
        let was = self.up.swap(ok, Ordering::AcqRel);
        gauge!("hexmatch_redis_up").set(if ok { 1.0 } else { 0.0 });
        if ok && !was {
            tracing::info!("redis is reachable again");
            self.needs_resync.store(true, Ordering::Release);
        } else if !ok && was {
            tracing::warn!("redis is unreachable: match requests are refused until it returns");
        }
        if ok
            && self.needs_resync.load(Ordering::Acquire)
            && let Err(e) = self.resync_matches(engine).await
        {
            tracing::warn!(error = %e, "resync of matches failed; will retry");
        }
    }

    /// Reads one batch from the stream: new entries, or (with
    /// `reclaim_idle`) entries of consumers idle that long (XAUTOCLAIM).
    pub(crate) async fn read_batch(
        &self,
        count: usize,
        block_ms: u64,
        reclaim_idle: Option<Duration>,
    ) -> RedisResult<Vec<StreamEntry>> {
        let mut conn = self.stream_conn.clone();
        let stream = self.stream_key();
        let reply: Value = if let Some(idle) = reclaim_idle {
            let v: Value = self.note(
                redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg("hexmatch")
                    .arg(&self.node_id)
                    .arg(idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut conn)
                    .await,
            )?;
            // [next-id, [entries…], deleted-ids]: the entries are the second item.
            match v {
                Value::Array(mut parts) if parts.len() >= 2 => parts.swap_remove(1),
                _ => Value::Nil,
            }
        } else {
            let v: Value = self.note(
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("hexmatch")
                    .arg(&self.node_id)
                    .arg("COUNT")
                    .arg(count)
                    .arg("BLOCK")
                    .arg(block_ms)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await,
            )?;
            first_stream_entries(v)
        };
        Ok(parse_entries(reply))
    }

    /// Acknowledges applied entries and dead-letters invalid ones, in the
    /// background on the shared connection so the reader does not wait. A
    /// lost ack leaves entries pending; XAUTOCLAIM re-delivers them, and
    /// re-applying a position is harmless (an older `ts` is ignored).
    pub fn ack_in_background(&self, ids: &[String], dead: Vec<DeadLetter>) {
        let stream = self.stream_key();
        // The dead-letter stream and the stream are two slots of a Redis
        // Cluster: one pipeline each, dead letters first.
        let mut pipe = redis::pipe();
        for DeadLetter {
            id,
            fields,
            code,
            message,
        } in dead
        {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(format!("{stream}:dead"))
                .arg("*")
                .arg("source_id")
                .arg(id)
                .arg("error_code")
                .arg(code.as_str())
                .arg("error")
                .arg(message);
            for (k, v) in fields {
                cmd.arg(k).arg(v);
            }
            pipe.add_command(cmd).ignore();
        }
        let mut ack = redis::pipe();
        ack.cmd("XACK")
            .arg(&stream)
            .arg("hexmatch")
            .arg(ids)
            .ignore();
        let mut conn = self.conn.clone();
        tokio::spawn(async move {
            let mut sent = Ok(());
            if !pipe.is_empty() {
                sent = pipe.query_async::<()>(&mut conn).await;
            }
            if sent.is_ok() {
                sent = ack.query_async::<()>(&mut conn).await;
            }
            if let Err(e) = sent {
                counter!("hexmatch_redis_errors_total").increment(1);
                tracing::warn!(error = %e, "stream ack failed; entries stay pending until reclaimed");
            }
        });
    }

    /// Reads one batch (new entries, or with `reclaim_idle` those of dead
    /// consumers), applies it with the HTTP validation, dead-letters the
    /// invalid entries and acknowledges all. Returns how many it handled.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn ingest_once(
        &self,
        engine: &Arc<Engine>,
        apply: impl Fn(&Engine, Vec<StreamEntry>) -> Ingested + Send + 'static,
        count: usize,
        block_ms: u64,
        reclaim_idle: Option<Duration>,
    ) -> RedisResult<usize> {
        let entries = self.read_batch(count, block_ms, reclaim_idle).await?;
        let n = entries.len();
        if n > 0 {
            let e = Arc::clone(engine);
            let (ids, dead, ended) = tokio::task::spawn_blocking(move || apply(&e, entries))
                .await
                .map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "ingest task failed",
                        e.to_string(),
                    ))
                })?;
            self.sync_orders(engine, &ended).await;
            self.ack_in_background(&ids, dead);
            counter!("hexmatch_stream_entries_total").increment(n as u64);
        }
        Ok(n)
    }

    /// Ingests continuously: this task reads batches ahead while one worker
    /// thread applies them in order (so a driver's updates never overtake
    /// each other), acks going out in the background. Reclaims entries of
    /// dead consumers every `reclaim_every`. Returns after `limit` entries
    /// (all applied), or on the first Redis error.
    ///
    /// # Errors
    /// Redis errors (the caller retries).
    pub async fn ingest(
        self: &Arc<Self>,
        engine: &Arc<Engine>,
        apply: impl Fn(&Engine, Vec<StreamEntry>) -> Ingested + Send + 'static,
        limit: Option<usize>,
        reclaim_every: Duration,
    ) -> RedisResult<usize> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<StreamEntry>>(2);
        let (me, e) = (Arc::clone(self), Arc::clone(engine));
        let runtime = tokio::runtime::Handle::current();
        let worker = std::thread::spawn(move || {
            while let Some(batch) = rx.blocking_recv() {
                let n = batch.len();
                let (ids, dead, ended) = apply(&e, batch);
                let _guard = runtime.enter();
                if !ended.is_empty() {
                    let (me, e) = (Arc::clone(&me), Arc::clone(&e));
                    tokio::spawn(async move { me.sync_orders(&e, &ended).await });
                }
                me.ack_in_background(&ids, dead);
                counter!("hexmatch_stream_entries_total").increment(n as u64);
            }
        });
        let mut total = 0;
        let mut last_reclaim = Instant::now();
        let result = loop {
            if limit.is_some_and(|l| total >= l) {
                break Ok(total);
            }
            let reclaim = (last_reclaim.elapsed() >= reclaim_every).then(|| {
                last_reclaim = Instant::now();
                reclaim_every
            });
            match self.read_batch(2000, 1000, reclaim).await {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => {
                    total += batch.len();
                    if tx.send(batch).await.is_err() {
                        break Ok(total);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        drop(tx);
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        result
    }

    /// Creates the consumer group (and the stream) if missing.
    ///
    /// # Errors
    /// Redis errors other than "group exists".
    pub async fn ensure_group(&self) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        let r: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream_key())
            .arg("hexmatch")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => self.note(other),
        }
    }
}

/// Where a snapshot lives: a node's namespace, or (in a cluster) a region.
#[derive(Debug, Clone)]
enum SnapPlace {
    /// `p:{ns:n}:…`.
    Ns(Keys, String),
    /// `p:{region:r}:…`, beside the region's lease.
    Region(Keys, String),
}

impl SnapPlace {
    fn key(&self, suffix: &str) -> String {
        match self {
            Self::Ns(k, ns) => k.ns(ns, suffix),
            Self::Region(k, r) => k.region(r, suffix),
        }
    }

    fn chunk_key(&self, generation: u64, i: usize) -> String {
        self.key(&format!("snap:g{generation}:{i}"))
    }
}

/// One stream entry: its id and its fields as strings.
pub type StreamEntry = (String, Vec<(String, String)>);

/// Why a stored snapshot could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadError {
    /// Redis did not answer.
    Redis(String),
    /// The data is there but damaged (bad manifest, missing chunk).
    Damaged(String),
}

/// Each region's drivers as last acknowledged: its snapshot with its
/// journal replayed over it, keeping only the drivers now in the region.
/// Regions are shared among the cores (a takeover's CPU work: the region
/// of every driver is looked up).
fn replay_regions(
    read: Vec<(String, Vec<Driver>, Vec<journal::Entry>, journal::EntryId)>,
    region_of: &(dyn Fn(hexmatch::Position) -> Option<String> + Sync),
) -> Vec<(String, Vec<Driver>, journal::EntryId)> {
    let one = |(region, base, entries, tail): (
        String,
        Vec<Driver>,
        Vec<journal::Entry>,
        journal::EntryId,
    )| {
        // A snapshot's drivers were in its region when it was taken; only
        // those the journal moved since may have left it.
        let finals = journal::replay(base, entries, |d| {
            region_of(d.pos).as_deref() == Some(region.as_str())
        });
        (region, finals, tail)
    };
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if threads < 2 || read.len() < 2 {
        return read.into_iter().map(one).collect();
    }
    let mut hands: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, r) in read.into_iter().enumerate() {
        hands[i % threads].push(r);
    }
    let one = &one;
    std::thread::scope(|s| {
        let workers: Vec<_> = hands
            .into_iter()
            .map(|hand| s.spawn(move || hand.into_iter().map(one).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// Loads restored drivers into a running engine, which may already hold
/// other regions: with [`Engine::load`], so each shard's tree is built at
/// once. A driver this engine holds in a live match keeps its status (the
/// match here is its truth, and a snapshot's copy, say held `busy` by a
/// node it had moved to, would end it); only its position is updated. A
/// driver in a match without that match here (its order named, or
/// `reserved`, which a snapshot of format 1 stored without the order) is
/// not loaded: its match's record is in another region's hash (the
/// region it was claimed in), whose owner holds it; loaded, it would be
/// offered a second time, or keep a copy that takes the driver's updates.
pub fn upsert_drivers(engine: &Engine, mut drivers: Vec<Driver>) -> usize {
    // One pass over the live matches, not a match lookup per driver.
    let matched: std::collections::HashSet<hexmatch::DriverId> = engine
        .durable_matches()
        .into_iter()
        .map(|r| r.m.driver_id)
        .collect();
    drivers.retain(|d| {
        if matched.contains(&d.id) {
            // Held by its match; only its position is the journal's.
            let _ = engine.update_location(&d.id, d.pos, Some(d.ts));
            return false;
        }
        if d.order_id.is_some() || d.status == Status::Reserved {
            tracing::debug!(driver_id = %d.id, order_id = ?d.order_id, "driver in a match held elsewhere not restored");
            return false;
        }
        true
    });
    // No driver left is reserved, so the load cannot fail.
    engine.load(drivers).unwrap_or(0)
}

/// Each record with its order id, encoded.
fn encode_records(recs: &[DurableMatch]) -> Vec<(String, Vec<u8>)> {
    recs.iter()
        .map(|r| (r.m.order_id.to_string(), r.encode()))
        .collect()
}

/// Order / record pairs as script arguments.
fn record_args(encoded: &[(String, Vec<u8>)]) -> Vec<&[u8]> {
    encoded
        .iter()
        .flat_map(|(order, rec)| [order.as_bytes(), rec.as_slice()])
        .collect()
}

fn bulk_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// The entries of the first stream of an XREADGROUP reply (RESP2 array of
/// `[key, entries]`, or a RESP3 map `key → entries`).
fn first_stream_entries(v: Value) -> Value {
    match v {
        Value::Array(streams) => streams
            .into_iter()
            .next()
            .and_then(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .unwrap_or(Value::Nil),
        Value::Map(streams) => streams
            .into_iter()
            .next()
            .map_or(Value::Nil, |(_, entries)| entries),
        _ => Value::Nil,
    }
}

/// Parses `[[id, [field, value, …]], …]` without building a map per entry
/// (redis-rs's `StreamReadReply` does, and that halves ingestion speed).
/// Malformed entries are skipped; a deleted entry (nil fields) gets none.
fn parse_entries(v: Value) -> Vec<StreamEntry> {
    let Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(mut pair) = entry else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = bulk_string(pair.pop()?)?;
            let flat: Vec<String> = match fields {
                Value::Array(f) => f.into_iter().filter_map(bulk_string).collect(),
                _ => Vec::new(),
            };
            let fields = flat
                .chunks_exact(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            Some((id, fields))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use hexmatch::{ClaimRequest, DriverId, EngineConfig, OrderId};

    use super::*;

    fn reserved(id: &str, pos: Position, engine: &Engine) -> Driver {
        Driver {
            status: Status::Reserved,
            ..Driver::available(DriverId::new(id).expect("id"), pos, engine.clock().now())
        }
    }

    /// A taker restores a region whose snapshot holds a driver reserved
    /// by a match recorded in another region's hash (the driver moved
    /// after the claim): the driver stays with that match's node. Loaded
    /// here, even as available, it would be offered a second time.
    #[test]
    fn a_reserved_driver_is_loaded_only_with_its_match() {
        let engine = Engine::new(EngineConfig::default()).expect("engine");
        let p = Position::new(41.88, -87.63).expect("pos");
        let q = Position::new(41.89, -87.62).expect("pos");
        let now = engine.clock().now();
        let free = Driver::available(DriverId::new("free").expect("id"), p, now);
        assert_eq!(
            upsert_drivers(&engine, vec![free, reserved("elsewhere", p, &engine)]),
            1
        );
        assert!(
            engine
                .driver(&DriverId::new("elsewhere").expect("id"))
                .is_none()
        );

        // Its match here: the driver keeps it and takes the position.
        let order = OrderId::new("o1").expect("order");
        let (m, _) = engine.claim(&order, &ClaimRequest::new(p)).expect("claims");
        upsert_drivers(&engine, vec![reserved(m.driver_id.as_str(), q, &engine)]);
        let d = engine.driver(&m.driver_id).expect("kept");
        assert_eq!(
            (d.status, d.order_id, d.pos),
            (Status::Reserved, Some(order), q)
        );
    }

    /// A busy driver whose state names the order of a match recorded in
    /// another region's hash (confirmed on the node that holds that
    /// region) is not loaded: a busy copy here took the driver's updates,
    /// and a client's `available` for it offered the driver a second
    /// time. A driver busy on its own (no order) is loaded as it is.
    #[test]
    fn a_busy_driver_of_a_match_held_elsewhere_is_not_loaded() {
        let engine = Engine::new(EngineConfig::default()).expect("engine");
        let p = Position::new(41.88, -87.63).expect("pos");
        let now = engine.clock().now();
        let busy = |id: &str, order: Option<&str>| Driver {
            status: Status::Busy,
            order_id: order.map(|o| OrderId::new(o).expect("order")),
            ..Driver::available(DriverId::new(id).expect("id"), p, now)
        };
        assert_eq!(
            upsert_drivers(
                &engine,
                vec![busy("held-elsewhere", Some("o-far")), busy("off-app", None)]
            ),
            1
        );
        assert!(
            engine
                .driver(&DriverId::new("held-elsewhere").expect("id"))
                .is_none()
        );
        let d = engine
            .driver(&DriverId::new("off-app").expect("id"))
            .expect("loaded");
        assert_eq!((d.status, d.order_id), (Status::Busy, None));
    }
}
