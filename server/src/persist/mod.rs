//! Redis persistence: snapshots, restore on boot, durable reservations and
//! location ingestion from a Redis Stream.
//!
//! # Keys (prefix `p`, region `r`)
//! | key | what |
//! | --- | --- |
//! | `p:r:snap:manifest` / `…:manifest:prev` | current and previous snapshot manifest |
//! | `p:r:snap:gen` | generation counter (`INCR`) |
//! | `p:r:snap:g{gen}:{i}` | chunk `i` of generation `gen` |
//! | `p:r:matches` | hash: order id → durable record of each live match |
//! | `p:locations` / `p:locations:dead` | update stream (group `hexmatch`) / dead letters |
//!
//! # Guarantees
//! - A snapshot's chunks are written first, then the manifest is switched
//!   with `MULTI`/`EXEC` (the old one kept as `prev`); chunks two
//!   generations old are `UNLINK`ed. A reader never sees a half-written
//!   snapshot, and a corrupt one falls back to `prev`.
//! - Every match change is written through before the HTTP response.
//!   Changes to one order are serialised by a per-order lock.
//!   - A claim reserves in memory, then writes. If the write fails it
//!     releases the driver and answers 503.
//!   - Confirm, release and complete write first, then act in memory. If
//!     the write fails, memory is untouched and the answer is 503.
//!   - Where Redis and memory could still diverge, the hash is resynced in
//!     full once Redis answers again (an expiry whose delete failed, a
//!     driver-side end).
//!
//!   The divergence is always toward "held": a restart may hold a driver
//!   until its reservation lapses, but never gives it to a second order.
//! - While Redis is down, match requests are refused with 503
//!   `unavailable` before anything changes. Locations and nearest keep
//!   serving from memory, and `/readyz` says `degraded`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hexmatch::{Driver, DriverUpdate, DurableMatch, Engine, Manifest, OrderId, Position, Status};
use metrics::{counter, gauge, histogram};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisResult, Value};
use tokio::sync::{Mutex, MutexGuard};

/// Drivers per snapshot chunk: about 1–2 MB per chunk before compression.
pub const CHUNK_DRIVERS: usize = 50_000;
const ORDER_LOCKS: usize = 256;

/// A connection to Redis plus what the server needs to know about it.
pub struct Persistence {
    conn: ConnectionManager,
    /// Blocking stream reads (`XREADGROUP … BLOCK`) hold a multiplexed
    /// connection until they return, so they get one of their own.
    stream_conn: ConnectionManager,
    prefix: String,
    region: String,
    node_id: String,
    up: AtomicBool,
    needs_resync: AtomicBool,
    order_locks: Box<[Mutex<()>]>,
    /// In a cluster, match writes are fenced by region leases.
    fence: std::sync::OnceLock<Arc<dyn Fence>>,
    /// Snapshots and durable writes that failed in a row, and why.
    health: parking_lot::Mutex<Health>,
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

/// Writes (or deletes) a match record only while the lease is ours, and
/// takes the order's cluster-wide record: a live record is written only if
/// no other region holds the order. KEYS: lease, matches hash, order key.
/// ARGV: token, order, record (empty = delete), region, order key TTL.
/// Returns 1 when written, 0 when the lease is not (or no longer) the
/// token's, and the holding region when another region holds the order.
const FENCED_PUT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end
local holder = redis.call('GET', KEYS[3])
if holder and holder ~= ARGV[4] then return holder end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
return 1
";

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

/// Region leases that fence match writes in a cluster (implemented by
/// the cluster layer above, which owns the leases).
pub trait Fence: Send + Sync + std::fmt::Debug {
    /// The lease of the region of `pos` if this node serves it now, else
    /// the region's name (or why there is none).
    ///
    /// # Errors
    /// The region, when this node does not hold its lease.
    fn lease(&self, pos: Position) -> Result<Lease, String>;

    /// The Redis key recording which region holds an order's match.
    fn order_key(&self, order: &str) -> String;
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

/// How stream entries are applied: entry ids to acknowledge, and the
/// invalid entries to dead-letter (given by the service layer above).
pub type ApplyEntries = fn(&Engine, Vec<StreamEntry>) -> (Vec<String>, Vec<DeadLetter>);

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence")
            .field("prefix", &self.prefix)
            .field("region", &self.region)
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
    /// Connects (with automatic reconnection) to `url`.
    ///
    /// # Errors
    /// The URL is invalid or Redis cannot be reached now.
    pub async fn connect(
        url: &str,
        prefix: &str,
        region: &str,
        node_id: &str,
    ) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis url {url:?}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(|e| format!("redis at {url}: {e}"))?;
        let stream_conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| format!("redis at {url}: {e}"))?;
        Ok(Arc::new(Self {
            conn,
            stream_conn,
            prefix: prefix.to_owned(),
            region: region.to_owned(),
            node_id: node_id.to_owned(),
            up: AtomicBool::new(true),
            needs_resync: AtomicBool::new(false),
            order_locks: (0..ORDER_LOCKS).map(|_| Mutex::new(())).collect(),
            fence: std::sync::OnceLock::new(),
            health: parking_lot::Mutex::default(),
        }))
    }

    fn key(&self, suffix: &str) -> String {
        self.key_of(&self.region, suffix)
    }

    /// A key of the namespace `ns` (a region, or in a cluster a node id).
    fn key_of(&self, ns: &str, suffix: &str) -> String {
        format!("{}:{ns}:{suffix}", self.prefix)
    }

    fn chunk_key(&self, generation: u64, i: usize) -> String {
        self.chunk_key_of(&self.region, generation, i)
    }

    fn chunk_key_of(&self, ns: &str, generation: u64, i: usize) -> String {
        self.key_of(ns, &format!("snap:g{generation}:{i}"))
    }

    /// Fences every later match write with `fence`'s leases.
    pub fn set_fence(&self, fence: Arc<dyn Fence>) {
        let _ = self.fence.set(fence);
    }

    /// The stream location updates are read from.
    pub fn stream_key(&self) -> String {
        format!("{}:locations", self.prefix)
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
        let h = order
            .as_str()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
        self.order_locks[(h % ORDER_LOCKS as u64) as usize]
            .lock()
            .await
    }

    /// Writes an order's durable record (a live match) or deletes it (ended).
    ///
    /// # Errors
    /// Redis errors, or a lease lost; the caller decides whether to undo
    /// or answer 503.
    pub async fn put_match(&self, rec: &DurableMatch) -> Result<(), WriteError> {
        let r = self.put_match_unnoted(rec).await;
        self.note_write(r)
    }

    async fn put_match_unnoted(&self, rec: &DurableMatch) -> Result<(), WriteError> {
        if let Some(fence) = self.fence.get() {
            return self.put_match_fenced(fence.as_ref(), rec).await;
        }
        let mut conn = self.conn.clone();
        let key = self.key("matches");
        let r = if rec.m.state.is_live() {
            conn.hset::<_, _, _, ()>(key, rec.m.order_id.as_str(), rec.encode())
                .await
        } else {
            conn.hdel::<_, _, ()>(key, rec.m.order_id.as_str()).await
        };
        Ok(self.note(r)?)
    }

    /// In a cluster: writes the record only if this node still holds the
    /// lease of the driver's region, checked by Redis in the same script
    /// that writes, and records the order's region for routing.
    async fn put_match_fenced(
        &self,
        fence: &dyn Fence,
        rec: &DurableMatch,
    ) -> Result<(), WriteError> {
        let lease = fence
            .lease(rec.driver_pos)
            .map_err(|region| WriteError::NotOwner { region })?;
        let record = if rec.m.state.is_live() {
            rec.encode()
        } else {
            Vec::new()
        };
        let mut conn = self.conn.clone();
        let done: redis::Value = self.note(
            redis::Script::new(FENCED_PUT)
                .key(&lease.key)
                .key(self.key("matches"))
                .key(fence.order_key(rec.m.order_id.as_str()))
                .arg(&lease.token)
                .arg(rec.m.order_id.as_str())
                .arg(record)
                .arg(&lease.region)
                .arg(ORDER_KEY_TTL_MS)
                .invoke_async(&mut conn)
                .await,
        )?;
        match done {
            redis::Value::Int(1) => Ok(()),
            redis::Value::BulkString(holder) => Err(WriteError::OrderTaken {
                order: rec.m.order_id.to_string(),
                region: String::from_utf8_lossy(&holder).into_owned(),
            }),
            _ => Err(WriteError::NotOwner {
                region: lease.region,
            }),
        }
    }

    /// Writes many live records in one pipelined round trip.
    ///
    /// # Errors
    /// Redis errors, or a lease lost.
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
        let mut conn = self.conn.clone();
        let r = self.note(pipe.query_async::<()>(&mut conn).await);
        self.note_write(r.map_err(WriteError::Redis))
    }

    /// Deletes an order's durable record.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn del_match(&self, order: &OrderId) -> Result<(), WriteError> {
        let mut conn = self.conn.clone();
        let r = conn
            .hdel::<_, _, ()>(self.key("matches"), order.as_str())
            .await;
        let r = self.note(r).map_err(WriteError::Redis);
        self.note_write(r)
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

    /// Marks the matches hash as possibly behind the engine.
    pub fn schedule_resync(&self) {
        self.needs_resync.store(true, Ordering::Release);
    }

    /// Rewrites the matches hash to exactly the engine's live matches.
    ///
    /// # Errors
    /// Redis errors (the resync stays scheduled).
    pub async fn resync_matches(&self, engine: &Engine) -> RedisResult<()> {
        self.needs_resync.store(false, Ordering::Release);
        let key = self.key("matches");
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        for rec in engine.durable_matches() {
            pipe.hset(&key, rec.m.order_id.as_str(), rec.encode())
                .ignore();
        }
        let mut conn = self.conn.clone();
        let r = self.note(pipe.query_async::<()>(&mut conn).await);
        if r.is_err() {
            self.needs_resync.store(true, Ordering::Release);
        }
        r
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

    /// The next snapshot generation. A counter that holds something other
    /// than a number (garbled by hand or by another program) is repaired:
    /// set past every generation the manifests name.
    async fn next_generation(&self) -> Result<u64, KeyError> {
        let key = self.key("snap:gen");
        let at = |error| KeyError {
            key: key.clone(),
            error,
        };
        let mut conn = self.conn.clone();
        let error = match self.note(conn.incr(&key, 1).await) {
            Ok(g) => return Ok(g),
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                return Err(at(e));
            }
            Err(e) => e,
        };
        // A refusal by Redis itself: only a plain string can be repaired.
        let kind: String = self
            .note(redis::cmd("TYPE").arg(&key).query_async(&mut conn).await)
            .map_err(at)?;
        if kind != "string" {
            return Err(at(error));
        }
        let mut next = 1;
        for manifest in [self.key("snap:manifest"), self.key("snap:manifest:prev")] {
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

    async fn try_write_snapshot(&self, engine: &Arc<Engine>) -> Result<(usize, i64), KeyError> {
        let started = Instant::now();
        let generation = self.next_generation().await?;
        let e = Arc::clone(engine);
        let snap = tokio::task::spawn_blocking(move || e.snapshot(generation, CHUNK_DRIVERS))
            .await
            .map_err(|e| KeyError {
                key: self.key("snap:manifest"),
                error: redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "snapshot task failed",
                    e.to_string(),
                )),
            })?;
        let chunk_keys: Vec<String> = (0..snap.chunks.len())
            .map(|i| self.chunk_key(generation, i))
            .collect();
        let written = self.write_generation(&snap, &chunk_keys).await;
        if written.is_err() && !chunk_keys.is_empty() {
            // Nothing refers to this generation: leave none of it behind.
            let mut conn = self.conn.clone();
            let _ = conn.unlink::<_, ()>(&chunk_keys).await;
        }
        let previous = written?;
        // The generation before the previous one is no longer referenced.
        if let Some(old) = previous.as_deref().and_then(|b| Manifest::decode(b).ok()) {
            let keys: Vec<String> = (0..old.chunks.len())
                .map(|i| self.chunk_key(old.generation, i))
                .collect();
            if !keys.is_empty() {
                let mut conn = self.conn.clone();
                let _ = self.note(conn.unlink::<_, ()>(keys).await);
            }
        }
        let manifest_len = snap.manifest.encode().len();
        let bytes = manifest_len + snap.chunks.iter().map(Vec::len).sum::<usize>();
        histogram!("hexmatch_snapshot_duration_seconds").record(started.elapsed().as_secs_f64());
        gauge!("hexmatch_snapshot_bytes").set(bytes as f64);
        gauge!("hexmatch_snapshot_drivers").set(snap.manifest.drivers as f64);
        gauge!("hexmatch_snapshot_taken_at_seconds").set(snap.manifest.taken_at_ms as f64 / 1000.0);
        counter!("hexmatch_snapshots_total").increment(1);
        Ok((bytes, snap.manifest.taken_at_ms))
    }

    /// Writes a snapshot's chunks, then switches the manifest (the current
    /// one becomes `prev`). Returns the manifest that was `prev` before.
    async fn write_generation(
        &self,
        snap: &hexmatch::Snapshot,
        chunk_keys: &[String],
    ) -> Result<Option<Vec<u8>>, KeyError> {
        let mut conn = self.conn.clone();
        let (manifest_key, prev_key) = (self.key("snap:manifest"), self.key("snap:manifest:prev"));
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
        let at = |key: &String| {
            let key = key.clone();
            move |error| KeyError { key, error }
        };
        // One command each, so that a refusal names its key.
        let current: Option<Vec<u8>> = self
            .note(conn.get(&manifest_key).await)
            .map_err(at(&manifest_key))?;
        let previous: Option<Vec<u8>> = self
            .note(conn.get(&prev_key).await)
            .map_err(at(&prev_key))?;
        let manifest = snap.manifest.encode();
        let mut switch = redis::pipe();
        switch.atomic();
        if let Some(cur) = &current {
            switch.set(&prev_key, cur.as_slice()).ignore();
        }
        switch.set(&manifest_key, manifest.as_slice()).ignore();
        self.note(switch.query_async::<()>(&mut conn).await)
            .map_err(at(&manifest_key))?;
        Ok(previous)
    }

    /// Reads and checks the snapshot under `manifest_key`.
    async fn read_snapshot(
        &self,
        ns: &str,
        manifest_key: &str,
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
            .map(|i| self.chunk_key_of(ns, manifest.generation, i))
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
    /// generation) and then the live matches, into an empty engine.
    ///
    /// # Errors
    /// Only when Redis cannot be read at all; corrupt data is reported in
    /// [`Restored::warnings`] and skipped, never loaded half-way.
    pub async fn restore(&self, engine: &Arc<Engine>) -> Result<Restored, String> {
        let mut out = Restored::default();
        // Every read that can refuse the restore comes before the engine
        // is touched, so a refused restore leaves it empty.
        let mut conn = self.conn.clone();
        let key = self.key("matches");
        let raw: HashMap<String, Vec<u8>> = self
            .note(conn.hgetall(&key).await)
            .map_err(|error| KeyError { key, error }.to_string())?;
        for key in [self.key("snap:manifest"), self.key("snap:manifest:prev")] {
            match self.read_snapshot(&self.region, &key).await {
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
        Ok(out)
    }

    /// Restores regions taken over from node `prev` (cluster mode): the
    /// drivers of `prev`'s latest good snapshot and the live matches of its
    /// records whose position `region_of` maps to a region being taken,
    /// loaded into a running engine; the matches are then copied to this
    /// node's records. Returns (drivers, matches) restored per region.
    ///
    /// # Errors
    /// Redis cannot be read, or both of `prev`'s snapshots are corrupt.
    pub async fn restore_region(
        &self,
        engine: &Arc<Engine>,
        prev: &str,
        region_of: &(dyn Fn(hexmatch::Position) -> Option<String> + Sync),
    ) -> Result<HashMap<String, (usize, usize)>, String> {
        let mut drivers = None;
        let mut problems = Vec::new();
        for suffix in ["snap:manifest", "snap:manifest:prev"] {
            let key = self.key_of(prev, suffix);
            match self.read_snapshot(prev, &key).await {
                Ok(None) => {}
                Ok(Some((manifest, chunks))) => match hexmatch::decode_snapshot(&manifest, &chunks)
                {
                    Ok(all) => {
                        drivers = Some(all);
                        break;
                    }
                    Err(e) => problems.push(format!("{key}: {e}")),
                },
                Err(ReadError::Damaged(e) | ReadError::Redis(e)) => problems.push(e),
            }
        }
        if drivers.is_none() && !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
        let mine: Vec<hexmatch::Driver> = drivers
            .unwrap_or_default()
            .into_iter()
            .filter(|d| match region_of(d.pos) {
                Some(r) => {
                    counts.entry(r).or_default().0 += 1;
                    true
                }
                None => false,
            })
            .collect();
        let e = Arc::clone(engine);
        tokio::task::spawn_blocking(move || upsert_drivers(&e, mine))
            .await
            .map_err(|e| e.to_string())?;
        let mut conn = self.conn.clone();
        let raw: HashMap<String, Vec<u8>> = self
            .note(conn.hgetall(self.key_of(prev, "matches")).await)
            .map_err(|e| e.to_string())?;
        let records: Vec<(String, DurableMatch)> = raw
            .values()
            .filter_map(|b| DurableMatch::decode(b).ok())
            .filter(|r| r.m.state.is_live())
            .filter_map(|r| region_of(r.driver_pos).map(|region| (region, r)))
            .collect();
        let report = engine.restore_matches(records.iter().map(|(_, r)| r.clone()));
        for (order, why) in &report.skipped {
            tracing::warn!(%order, why, "match not restored in takeover");
        }
        for (region, r) in &records {
            if !report.skipped.iter().any(|(o, _)| *o == r.m.order_id) {
                counts.entry(region.clone()).or_default().1 += 1;
            }
        }
        // Ours now: written unfenced, as the leases are not served yet.
        if !records.is_empty() {
            let key = self.key("matches");
            let mut pipe = redis::pipe();
            for (_, rec) in &records {
                pipe.hset(&key, rec.m.order_id.as_str(), rec.encode())
                    .ignore();
            }
            self.note(pipe.query_async::<()>(&mut conn).await)
                .map_err(|e| e.to_string())?;
        }
        Ok(counts)
    }

    /// Pings Redis; on recovery, runs a pending resync.
    pub async fn check_health(&self, engine: &Engine) {
        let mut conn = self.conn.clone();
        let ok = redis::cmd("PING")
            .query_async::<String>(&mut conn)
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
        pipe.cmd("XACK")
            .arg(&stream)
            .arg("hexmatch")
            .arg(ids)
            .ignore();
        let mut conn = self.conn.clone();
        tokio::spawn(async move {
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
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
        apply: ApplyEntries,
        count: usize,
        block_ms: u64,
        reclaim_idle: Option<Duration>,
    ) -> RedisResult<usize> {
        let entries = self.read_batch(count, block_ms, reclaim_idle).await?;
        let n = entries.len();
        if n > 0 {
            let e = Arc::clone(engine);
            let (ids, dead) = tokio::task::spawn_blocking(move || apply(&e, entries))
                .await
                .map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "ingest task failed",
                        e.to_string(),
                    ))
                })?;
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
        apply: ApplyEntries,
        limit: Option<usize>,
        reclaim_every: Duration,
    ) -> RedisResult<usize> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<StreamEntry>>(2);
        let (me, e) = (Arc::clone(self), Arc::clone(engine));
        let runtime = tokio::runtime::Handle::current();
        let worker = std::thread::spawn(move || {
            while let Some(batch) = rx.blocking_recv() {
                let n = batch.len();
                let (ids, dead) = apply(&e, batch);
                let _guard = runtime.enter();
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

/// Loads restored drivers into a running engine one by one (it may already
/// hold other regions, so bulk loading does not apply). Reserved drivers
/// come back available; their matches set them reserved again.
pub fn upsert_drivers(engine: &Engine, drivers: Vec<Driver>) -> usize {
    let mut n = 0;
    for d in drivers {
        let status = match d.status {
            Status::Reserved => Status::Available,
            s => s,
        };
        let u = DriverUpdate {
            id: d.id,
            pos: d.pos,
            ts: Some(d.ts),
            status: Some(status),
            vehicle: Some(d.vehicle),
            capabilities: Some(d.capabilities),
        };
        // A fix stamped too far ahead of this node's clock comes back as
        // if stamped now, so the driver's next correct update is not stale.
        let applied = match engine.upsert(&u) {
            Err(hexmatch::Error::InvalidTimestamp(_)) => {
                engine.upsert(&DriverUpdate { ts: None, ..u })
            }
            other => other,
        };
        if applied.is_ok() {
            n += 1;
        }
    }
    n
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
