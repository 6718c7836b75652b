//! One Redis connection for a single server and for Redis Cluster, the key
//! layout that keeps every multi-key command in one hash slot, and durable
//! writes acknowledged by replicas (`WAIT`).
//!
//! # Which backend
//! `--redis-url` names one server (`redis://host:port`,
//! `redis+unix:///path`) or, comma-separated, several nodes of a Redis
//! Cluster. A single URL whose server reports `cluster_enabled:1` is taken
//! as a seed node of a cluster too. The cluster client follows `MOVED` and
//! `ASK`, and finds the promoted replica after a failover.
//!
//! # Hash tags
//! Redis Cluster runs a script or a `MULTI` only when all its keys hash to
//! one slot. Keys therefore carry a hash tag (the part in braces) naming
//! what they belong to; see [`Keys`]. Scripts never span two tags.
//!
//! # Durability
//! With [`Durability::replicas`] > 0, a durable write is sent in one
//! pipeline with `WAIT replicas timeout`, on the connection of the master
//! that took it; the write counts as made only when that many replicas
//! have it. A master that dies after the answer then loses nothing that
//! was acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A connection to a single Redis or to a Redis Cluster; cheap to clone
/// (both multiplex one connection per server and reconnect by themselves).
#[derive(Clone)]
pub enum RedisConn {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterHandle),
}

/// Timeouts in a row after which a cluster connection is rebuilt.
const TIMEOUTS_BEFORE_REBUILD: u32 = 3;

/// A Redis Cluster connection that rebuilds itself. After a master was
/// killed and came back as a replica, redis-rs's cluster connection was
/// seen to time out every request for good (its repairs never finished):
/// three timeouts in a row make a new connection
/// from the seed nodes, in the background, which then replaces it.
#[derive(Clone)]
pub struct ClusterHandle {
    client: Arc<ClusterClient>,
    conn: Arc<parking_lot::RwLock<ClusterConnection>>,
    timeouts: Arc<AtomicU32>,
    rebuilding: Arc<AtomicBool>,
}

impl ClusterHandle {
    fn current(&self) -> ClusterConnection {
        self.conn.read().clone()
    }

    /// Counts timeouts in a row; past the limit, rebuilds once at a time.
    fn observe<T>(&self, r: &RedisResult<T>) {
        match r {
            Err(e) if e.is_timeout() => {
                let n = self.timeouts.fetch_add(1, Ordering::AcqRel) + 1;
                if n >= TIMEOUTS_BEFORE_REBUILD && !self.rebuilding.swap(true, Ordering::AcqRel) {
                    let this = self.clone();
                    tokio::spawn(async move {
                        match this.client.get_async_connection().await {
                            Ok(fresh) => {
                                *this.conn.write() = fresh;
                                this.timeouts.store(0, Ordering::Release);
                                tracing::warn!(
                                    "rebuilt the Redis Cluster connection after {n} timeouts in a row"
                                );
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "could not rebuild the Redis Cluster connection");
                            }
                        }
                        this.rebuilding.store(false, Ordering::Release);
                    });
                }
            }
            Err(_) => {}
            Ok(_) => self.timeouts.store(0, Ordering::Release),
        }
    }
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(h) => {
                let (mut c, h) = (h.current(), h.clone());
                Box::pin(async move {
                    let r = c.req_packed_command(cmd).await;
                    h.observe(&r);
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(h) => {
                let (mut c, h) = (h.current(), h.clone());
                Box::pin(async move {
                    let r = c.req_packed_commands(cmd, offset, count).await;
                    h.observe(&r);
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(h) => h.current().get_db(),
        }
    }
}

/// How a connection waits and retries.
#[derive(Debug, Clone, Copy)]
pub struct ConnOptions {
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time to wait for an answer.
    pub response_timeout: Duration,
    /// Retries of a command whose connection failed.
    pub retries: usize,
}

/// Connects to the Redis (or Redis Cluster) that `url` names.
///
/// # Errors
/// A bad URL, or no server answered.
pub async fn connect(url: &str, opts: ConnOptions) -> Result<RedisConn, String> {
    let urls = crate::config::redis_seeds(url)?;
    let cluster = urls.len() > 1 || reports_cluster(&urls[0], opts).await?;
    if cluster {
        let client = ClusterClientBuilder::new(urls.iter().map(String::as_str))
            .connection_timeout(opts.connect_timeout)
            .response_timeout(opts.response_timeout)
            .retries(opts.retries as u32)
            .max_retry_wait(500)
            .build()
            .map_err(|e| format!("redis cluster: {e}"))?;
        let conn = client
            .get_async_connection()
            .await
            .map_err(|e| format!("redis cluster at {}: {e}", redacted(&urls[0])))?;
        return Ok(RedisConn::Cluster(ClusterHandle {
            client: Arc::new(client),
            conn: Arc::new(parking_lot::RwLock::new(conn)),
            timeouts: Arc::default(),
            rebuilding: Arc::default(),
        }));
    }
    let client = redis::Client::open(urls[0].as_str()).map_err(|e| format!("redis url: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.response_timeout))
        .set_number_of_retries(opts.retries)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client, config)
        .await
        .map(RedisConn::Single)
        .map_err(|e| format!("redis at {}: {e}", redacted(&urls[0])))
}

/// Whether the server at `url` runs in cluster mode (`INFO cluster`).
async fn reports_cluster(url: &str, opts: ConnOptions) -> Result<bool, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis url: {e}"))?;
    let probe = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut conn)
            .await
    };
    match tokio::time::timeout(opts.connect_timeout + opts.response_timeout, probe).await {
        Ok(Ok(info)) => Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1")),
        Ok(Err(e)) => Err(format!("redis at {}: {e}", redacted(url))),
        Err(_) => Err(format!("redis at {}: no answer", redacted(url))),
    }
}

/// `url` without its password.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://…@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// How many replicas must hold a durable write before it is acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durability {
    /// Replicas that must acknowledge (`WAIT`); 0 = the master's answer
    /// suffices.
    pub replicas: u32,
    /// How long to wait for them; a write they did not all take in time
    /// is reported as not made.
    pub timeout: Duration,
}

/// A durable write that Redis took but too few replicas acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotReplicated {
    /// Replicas that had it when `WAIT` returned.
    pub acked: u32,
    /// Replicas required.
    pub wanted: u32,
}

impl std::fmt::Display for NotReplicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} replicas acknowledged the write in time",
            self.acked, self.wanted
        )
    }
}

/// Runs `script` (`EVAL`, one hash slot) and, when `durability` asks for
/// replicas, `WAIT` in the same pipeline on the same master. Returns the
/// script's answer, and whether the replicas fell short.
///
/// # Errors
/// Redis errors.
pub async fn eval_durable(
    conn: &mut RedisConn,
    durability: Durability,
    script: &str,
    keys: &[&str],
    args: &[&[u8]],
) -> RedisResult<(Value, Option<NotReplicated>)> {
    let mut pipe = redis::pipe();
    let eval = pipe.cmd("EVAL").arg(script).arg(keys.len());
    for k in keys {
        eval.arg(*k);
    }
    for a in args {
        eval.arg(*a);
    }
    if durability.replicas > 0 {
        pipe.cmd("WAIT")
            .arg(durability.replicas)
            .arg(durability.timeout.as_millis() as u64);
    }
    let mut answers: Vec<Value> = pipe.query_async(conn).await?;
    let short = if durability.replicas > 0 {
        let acked = match answers.pop() {
            Some(Value::Int(n)) => u32::try_from(n).unwrap_or(0),
            _ => 0,
        };
        (acked < durability.replicas).then_some(NotReplicated {
            acked,
            wanted: durability.replicas,
        })
    } else {
        None
    };
    let value = answers.pop().unwrap_or(Value::Nil);
    Ok((value, short))
}

/// The Redis key layout under one prefix. Every key's hash tag names what
/// it belongs to, so each script and `MULTI` touches one slot:
///
/// | key | tag | what |
/// | --- | --- | --- |
/// | `p:{ns:N}:…` | a namespace: a node id, or `default` | snapshots (manifests, generation counter, chunks); a single node's matches |
/// | `p:{region:R}:lease` / `:epoch` / `:matches` | a region | its lease, its fencing epoch, its live matches (cluster) |
/// | `p:{region:R}:snap:…` / `:locations` | a region | its snapshot and journal offset, its journal (cluster) |
/// | `p:{order:O}` | an order | the region (and lease) holding its match (cluster) |
/// | `p:{cluster}:owners` / `:nodes` / `:version` | the map | the region → node map |
/// | `p:locations` / `p:locations:dead` | — | the location stream and its dead letters (one key per command) |
/// | `p:events` | — | every node's events ([`super::events`]) |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The layout under `prefix` (without braces: see
    /// [`crate::config`]'s check).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// A key of namespace `ns` (snapshots, a single node's matches).
    pub fn ns(&self, ns: &str, suffix: &str) -> String {
        format!("{}:{{ns:{ns}}}:{suffix}", self.prefix)
    }

    /// The same key in the layout before hash tags (`p:ns:suffix`), read
    /// once on a single node's first restore after an upgrade.
    pub fn legacy_ns(&self, ns: &str, suffix: &str) -> String {
        format!("{}:{ns}:{suffix}", self.prefix)
    }

    /// A key of region `region` (lease, epoch, matches).
    pub fn region(&self, region: &str, suffix: &str) -> String {
        format!("{}:{{region:{region}}}:{suffix}", self.prefix)
    }

    /// The record of which region holds `order`'s match.
    pub fn order(&self, order: &str) -> String {
        format!("{}:{{order:{order}}}", self.prefix)
    }

    /// A key of the cluster map.
    pub fn map(&self, suffix: &str) -> String {
        format!("{}:{{cluster}}:{suffix}", self.prefix)
    }

    /// The location stream producers append to.
    pub fn stream(&self) -> String {
        format!("{}:locations", self.prefix)
    }

    /// The stream of this cluster's events.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }
}

/// The slot Redis Cluster gives `key` (CRC16 of its hash tag, mod 16384).
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16_xmodem(tagged.unwrap_or(bytes)) % 16384
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 == 0 {
                crc << 1
            } else {
                (crc << 1) ^ 0x1021
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_redis_cluster_specification() {
        // The specification's own example: CRC16("123456789") = 0x31C3.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        // An empty tag is no tag: the whole key is hashed.
        assert_eq!(slot("foo{}{bar}"), crc16_xmodem(b"foo{}{bar}") % 16384);
    }

    #[test]
    fn every_script_s_keys_share_a_slot() {
        let k = Keys::new("hexmatch");
        // A region's fenced write: its lease, epoch and matches.
        for r in ["loop", "near-west-side", "outside-88264e64dffffff"] {
            let s = slot(&k.region(r, "lease"));
            assert_eq!(s, slot(&k.region(r, "epoch")));
            assert_eq!(s, slot(&k.region(r, "matches")));
            // Its journal, and the snapshot switch that trims it.
            for suffix in [
                "locations",
                "snap:manifest",
                "snap:offset:prev",
                "snap:g3:1",
            ] {
                assert_eq!(s, slot(&k.region(r, suffix)), "{suffix}");
            }
        }
        // A snapshot's manifest switch and its chunks.
        let s = slot(&k.ns("node-a", "snap:manifest"));
        for suffix in [
            "snap:manifest:prev",
            "snap:gen",
            "snap:g7:0",
            "snap:g7:12",
            "matches",
        ] {
            assert_eq!(s, slot(&k.ns("node-a", suffix)), "{suffix}");
        }
        // The map.
        let s = slot(&k.map("owners"));
        assert_eq!(s, slot(&k.map("nodes")));
        assert_eq!(s, slot(&k.map("version")));
        // Regions and orders spread over the slots instead of piling on one.
        let slots: std::collections::HashSet<u16> = (0..100)
            .map(|i| slot(&k.order(&format!("order-{i}"))))
            .collect();
        assert!(slots.len() > 90, "{}", slots.len());
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redacted("redis://user:pw@h:1"), "redis://…@h:1");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }
}
