//! Regions owned by nodes: leases and fencing in Redis, the versioned
//! region → node map, routing decisions ([`Cluster::owner`],
//! [`Cluster::resolve_owner`], `remote_owners_within`) and the
//! typed peer channel between nodes ([`peer`]).
//!
//! # Keys (prefix `p`; the braces are Redis Cluster hash tags)
//! | key | what |
//! | --- | --- |
//! | `p:{region:r}:lease` | `node\|epoch` of the owner, with a TTL |
//! | `p:{region:r}:epoch` | fencing epoch, `INCR`ed on every takeover |
//! | `p:{cluster}:owners` | hash: region → `node\|epoch` of its latest owner |
//! | `p:{cluster}:nodes` | hash: node id → URL |
//! | `p:{cluster}:version` | map version, `INCR`ed on every ownership change |
//! | `p:{order:o}` | `region\|lease` whose owner holds the order's match |
//!
//! A takeover is two scripts, each in one slot: the lease and epoch in the
//! region's slot, then the map in its own (recording the new owner only
//! over an older epoch). With `--redis-replicas`, each waits for the
//! replicas (`WAIT`) before the lease is served.
//!
//! # Invariants
//! - A node serves a region (answers from memory, writes its matches)
//!   only while it holds the lease, by its own clock: a lease renewed at
//!   `t` counts until `t + ttl − ttl/10`, before Redis drops it at
//!   `t' + ttl` (`t' ≥ t`).
//! - Every match write goes through a script that checks the lease value
//!   `node|epoch` first ([`crate::persist::Persistence::put_match`], with
//!   this cluster as its [`crate::persist::Fence`]). A
//!   paused owner that lost its lease therefore cannot acknowledge a
//!   reservation, even if its clock has not noticed yet.
//! - A taker restores a region from the region's own snapshot and match
//!   records only after the previous owner's lease is gone, so every write
//!   the old owner acknowledged is in what the taker reads. A region's
//!   snapshot is switched in by a script that checks its lease, so an
//!   owner that lost the region cannot overwrite it.

pub(crate) mod geo;
pub mod peer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hexmatch::{Engine, Position, RegionId, RegionMap};
use parking_lot::RwLock;
use redis::{AsyncCommands, RedisResult, Value};

use self::peer::PeerClient;
use crate::persist::conn::{self, ConnOptions, Durability, Keys, RedisConn};
use crate::persist::{Fence, Lease, Persistence};

/// Takes a lease that is free or names this node (granted to it, with
/// the answer lost: this node does not hold it, see [`Cluster::wanted`]).
/// KEYS: lease, epoch. ARGV: node, TTL ms. Returns the new epoch, or nil
/// when another node holds the lease.
const ACQUIRE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^(.*)|%d+$') ~= ARGV[1] then return false end
local e = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. e, 'PX', ARGV[2])
return e
";

/// Records a region's new owner in the map, unless an owner of a newer
/// epoch is recorded. KEYS: owners, version. ARGV: region, token, epoch.
/// Returns {1, previous owner's token or ''} when recorded, {0, newer}.
const RECORD_OWNER: &str = r"
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if prev then
  local e = tonumber(string.match(prev, '|(%d+)$'))
  if e and e >= tonumber(ARGV[3]) then return {0, prev} end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCR', KEYS[2])
return {1, prev or ''}
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const GIVE_UP: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The longest a node waits for another's answer; never longer than
/// the lease TTL (a silent owner has lost its regions by then).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// A lease this node holds.
#[derive(Debug, Clone)]
struct Held {
    epoch: u64,
    token: String,
    /// Until when this node may act on it, by its own clock.
    deadline: Instant,
}

/// The region → node map as last read from Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterMap {
    /// Incremented on every ownership change.
    pub version: u64,
    /// Region → (node, epoch) of its latest owner.
    pub owners: HashMap<String, (String, u64)>,
    /// Node → URL.
    pub nodes: HashMap<String, String>,
}

/// Who serves a region, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node, under a live lease.
    Local,
    /// Another node, at this URL.
    Remote {
        /// Its id.
        node: String,
        /// Where it listens.
        url: String,
    },
    /// Nobody now (a lease lapsed and no one has taken it yet).
    Nobody,
}

/// A region taken over, and what was restored into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    /// The region.
    pub region: String,
    /// The new fencing epoch.
    pub epoch: u64,
    /// The node that owned it before, if any.
    pub previous: Option<String>,
    /// Drivers restored from the previous owner's snapshot.
    pub drivers: usize,
    /// Live matches restored from its records.
    pub matches: usize,
    /// How long the restore took (of every region taken with it).
    pub restore: Duration,
}

/// This node's view of the cluster.
pub struct Cluster {
    node: String,
    url: String,
    regions: RegionMap,
    caps: geo::Caps,
    own: Vec<String>,
    conn: RedisConn,
    keys: Keys,
    durability: Durability,
    ttl: Duration,
    held: RwLock<HashMap<String, Held>>,
    /// Times leases were lost (see [`Fence::losses`]).
    losses: std::sync::atomic::AtomicU64,
    /// When the soonest lease this node wants but another holds lapses,
    /// as last read: the next tick comes then, not a whole period later.
    next_lapse: parking_lot::Mutex<Option<Instant>>,
    /// Regions a [`take`](Self::take) is acquiring and restoring now: a
    /// second take of one would restore it twice.
    taking: parking_lot::Mutex<std::collections::HashSet<String>>,
    map: RwLock<Arc<ClusterMap>>,
    peer: PeerClient,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn split_token(token: &str) -> Option<(String, u64)> {
    let (node, epoch) = token.rsplit_once('|')?;
    Some((node.to_owned(), epoch.parse().ok()?))
}

impl Cluster {
    /// Connects to Redis (or Redis Cluster) and registers this node (`node`
    /// reachable at `url`, presenting `secret` to the other nodes); lease
    /// changes wait for `durability`'s replicas.
    ///
    /// # Errors
    /// Redis cannot be reached, or the URL is bad.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect(
        redis_url: &str,
        prefix: &str,
        node: &str,
        url: &str,
        regions: RegionMap,
        own: &[String],
        ttl: Duration,
        secret: Option<&str>,
        durability: Durability,
    ) -> Result<Arc<Self>, String> {
        let conn = conn::connect(
            redis_url,
            ConnOptions {
                connect_timeout: Duration::from_secs(2),
                response_timeout: ttl / 3 + durability.timeout,
                retries: 1,
            },
        )
        .await?;
        let own = if own.iter().any(|r| r == "*") {
            regions.regions().iter().map(|r| r.id.to_string()).collect()
        } else {
            own.to_vec()
        };
        let peer = PeerClient::new(node, secret, PEER_TIMEOUT.min(ttl))?;
        let this = Arc::new(Self {
            node: node.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            caps: geo::Caps::new(&regions),
            regions,
            own,
            conn,
            keys: Keys::new(prefix),
            durability,
            ttl,
            held: RwLock::default(),
            losses: std::sync::atomic::AtomicU64::new(0),
            next_lapse: parking_lot::Mutex::new(None),
            taking: parking_lot::Mutex::default(),
            map: RwLock::default(),
            peer,
        });
        let mut conn = this.conn.clone();
        conn.hset::<_, _, _, ()>(this.keys.map("nodes"), node, &this.url)
            .await
            .map_err(|e| format!("registering node {node}: {e}"))?;
        this.refresh_map().await.map_err(|e| e.to_string())?;
        Ok(this)
    }

    fn lease_key(&self, region: &str) -> String {
        self.keys.region(region, "lease")
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The region map.
    pub fn regions(&self) -> &RegionMap {
        &self.regions
    }

    /// The typed client of the peer channel.
    pub fn peer(&self) -> &PeerClient {
        &self.peer
    }

    /// The map as last read.
    pub fn map(&self) -> Arc<ClusterMap> {
        Arc::clone(&self.map.read())
    }

    /// Regions this node serves now, with their epochs.
    pub fn held(&self) -> Vec<(String, u64)> {
        let now = Instant::now();
        let mut out: Vec<(String, u64)> = self
            .held
            .read()
            .iter()
            .filter(|(_, h)| h.deadline > now)
            .map(|(r, h)| (r.clone(), h.epoch))
            .collect();
        out.sort();
        out
    }

    /// The region of a position.
    ///
    /// # Errors
    /// A position in no region when the map rejects those.
    pub fn region_of(&self, pos: Position) -> hexmatch::Result<RegionId> {
        self.regions.region_of(pos)
    }

    /// The lease token (`node|epoch`) of `region` if this node serves it now.
    pub(crate) fn token(&self, region: &str) -> Option<String> {
        let held = self.held.read();
        let h = held.get(region)?;
        (h.deadline > Instant::now()).then(|| h.token.clone())
    }

    /// Whether this node serves `region` now.
    pub fn serves(&self, region: &str) -> bool {
        self.token(region).is_some()
    }

    /// Who serves `region`, from the cached map.
    pub fn owner(&self, region: &str) -> Owner {
        if self.serves(region) {
            return Owner::Local;
        }
        let map = self.map.read();
        match map.owners.get(region) {
            Some((node, _)) if *node != self.node => match map.nodes.get(node) {
                Some(url) => Owner::Remote {
                    node: node.clone(),
                    url: url.clone(),
                },
                None => Owner::Nobody,
            },
            _ => Owner::Nobody,
        }
    }

    /// The owner of `region`; a region nobody has ever owned is taken by
    /// this node on first use (if another node beat it to it, the re-read
    /// map names that node). Without Redis persistence nothing is taken.
    pub async fn resolve_owner(
        &self,
        region: &str,
        engine: &Arc<Engine>,
        persist: Option<&Persistence>,
    ) -> Owner {
        let owner = self.owner(region);
        if owner != Owner::Nobody {
            return owner;
        }
        if let Some(p) = persist
            && self.take_unowned(region, engine, p).await
        {
            return Owner::Local;
        }
        self.owner(region)
    }

    /// Whether `node` holds any region's lease now, by Redis (the map's
    /// owners of record are checked against their live leases).
    ///
    /// # Errors
    /// Redis errors.
    pub async fn holds_any_lease(&self, node: &str) -> RedisResult<bool> {
        let regions: Vec<String> = self
            .map()
            .owners
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(r, _)| r.clone())
            .collect();
        if regions.is_empty() {
            return Ok(false);
        }
        Ok(self
            .leases(&regions)
            .await?
            .iter()
            .flatten()
            .filter_map(|t| split_token(t))
            .any(|(n, _)| n == node))
    }

    /// The lease token of each of `regions` (`None`: free), read at once,
    /// one read per lease: in a Redis Cluster they live in many slots.
    async fn leases(&self, regions: &[String]) -> RedisResult<Vec<Option<String>>> {
        let reads = regions.iter().map(|r| {
            let mut conn = self.conn.clone();
            let key = self.lease_key(r);
            async move { conn.get::<_, Option<String>>(key).await }
        });
        futures_util::future::join_all(reads)
            .await
            .into_iter()
            .collect()
    }

    /// URLs of every other registered node.
    fn peers(&self) -> Vec<(String, String)> {
        self.map
            .read()
            .nodes
            .iter()
            .filter(|(n, _)| **n != self.node)
            .map(|(n, u)| (n.clone(), u.clone()))
            .collect()
    }

    /// Calls every other registered node at once, `call(peer client, its
    /// URL)`; the answers, each with its node's id.
    pub async fn ask_every_peer<'a, T, F, Fut>(&'a self, call: F) -> Vec<(String, T)>
    where
        F: Fn(&'a PeerClient, String) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let calls = self.peers().into_iter().map(|(node, url)| {
            let answer = call(&self.peer, url);
            async move { (node, answer.await) }
        });
        futures_util::future::join_all(calls).await
    }

    /// Owners of regions that could hold a point within `bound_m` of `p`,
    /// other than this node: `(node, url)`, deduplicated.
    pub(crate) fn remote_owners_within(&self, p: Position, bound_m: f64) -> Vec<(String, String)> {
        let map = self.map.read();
        let mut out: Vec<(String, String)> = Vec::new();
        for (region, (node, _)) in &map.owners {
            if *node == self.node && self.serves(region) {
                continue;
            }
            let reach = self
                .caps
                .get(region)
                .map_or(0.0, |cap| cap.min_distance_m(p));
            if reach > bound_m {
                continue;
            }
            if let Some(url) = map.nodes.get(node)
                && *node != self.node
                && !out.iter().any(|(n, _)| n == node)
            {
                out.push((node.clone(), url.clone()));
            }
        }
        out.sort();
        out
    }

    /// The region whose owner holds `order`'s match, from Redis (`None`:
    /// no node has recorded it).
    ///
    /// # Errors
    /// Redis did not answer.
    pub(crate) async fn order_region(&self, order: &str) -> RedisResult<Option<String>> {
        let mut conn = self.conn.clone();
        let holder: Option<String> = conn.get(self.keys.order(order)).await?;
        Ok(holder.map(|h| crate::persist::order_holder_region(&h).to_owned()))
    }

    /// Re-reads the map from Redis.
    ///
    /// # Errors
    /// Redis errors (the cached map stays).
    pub async fn refresh_map(&self) -> RedisResult<Arc<ClusterMap>> {
        // Three reads, not a MULTI: a Redis Cluster client follows a
        // MOVED for a command, not for a transaction, and the map is
        // advisory (fencing is by lease).
        let (mut c1, mut c2, mut c3) = (self.conn.clone(), self.conn.clone(), self.conn.clone());
        let (version, owners, nodes) = futures_util::future::join3(
            c1.get::<_, Option<u64>>(self.keys.map("version")),
            c2.hgetall::<_, HashMap<String, String>>(self.keys.map("owners")),
            c3.hgetall::<_, HashMap<String, String>>(self.keys.map("nodes")),
        )
        .await;
        let (version, owners, nodes) = (version?, owners?, nodes?);
        let map = Arc::new(ClusterMap {
            version: version.unwrap_or(0),
            owners: owners
                .into_iter()
                .filter_map(|(r, t)| split_token(&t).map(|o| (r, o)))
                .collect(),
            nodes,
        });
        *self.map.write() = Arc::clone(&map);
        Ok(map)
    }

    /// Tries to take `region`'s lease and records it in the map.
    /// `Ok(None)`: someone holds it. The lease is not served until the
    /// caller records it.
    ///
    /// # Errors
    /// Redis errors, or too few replicas took the lease (it is handed back).
    async fn acquire(&self, region: &str) -> Result<Option<(Held, Option<String>)>, String> {
        let sent = Instant::now();
        let mut conn = self.conn.clone();
        let lease = self.lease_key(region);
        let epoch_key = self.keys.region(region, "epoch");
        let ttl = (self.ttl.as_millis() as u64).to_string();
        let (got, short) = conn::eval_durable(
            &mut conn,
            self.durability,
            ACQUIRE,
            &[&lease, &epoch_key],
            &[self.node.as_bytes(), ttl.as_bytes()],
        )
        .await
        .map_err(|e| e.to_string())?;
        let Value::Int(epoch) = got else {
            return Ok(None);
        };
        let epoch = epoch as u64;
        let token = format!("{}|{epoch}", self.node);
        if let Some(n) = short {
            self.give_up_one(region, &token).await;
            return Err(format!("lease of {region}: {n}"));
        }
        let (owners, version) = (self.keys.map("owners"), self.keys.map("version"));
        let epoch_arg = epoch.to_string();
        let recorded = conn::eval_durable(
            &mut conn,
            self.durability,
            RECORD_OWNER,
            &[&owners, &version],
            &[region.as_bytes(), token.as_bytes(), epoch_arg.as_bytes()],
        )
        .await;
        let prev = match recorded {
            Ok((Value::Array(v), None)) if v.first() == Some(&Value::Int(1)) => match v.get(1) {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => String::new(),
            },
            other => {
                self.give_up_one(region, &token).await;
                return Err(format!("recording the owner of {region}: {other:?}"));
            }
        };
        let held = Held {
            epoch,
            token,
            deadline: sent + self.ttl.mul_f64(0.9),
        };
        Ok(Some((held, split_token(&prev).map(|(node, _)| node))))
    }

    async fn give_up_one(&self, region: &str, token: &str) {
        let mut conn = self.conn.clone();
        let lease = self.lease_key(region);
        let _ = conn::eval_durable(
            &mut conn,
            Durability::default(),
            GIVE_UP,
            &[&lease],
            &[token.as_bytes()],
        )
        .await;
    }

    /// Renews every held lease; returns the regions lost. A renewal too
    /// few replicas took does not extend the lease's deadline.
    async fn renew(&self) -> Vec<String> {
        let held: Vec<(String, Held)> = self
            .held
            .read()
            .iter()
            .map(|(r, h)| (r.clone(), h.clone()))
            .collect();
        let mut lost = Vec::new();
        let ttl = (self.ttl.as_millis() as u64).to_string();
        // All at once: each lease lives in its own slot.
        let renewals = held.into_iter().map(|(region, h)| {
            let ttl = &ttl;
            async move {
                let sent = Instant::now();
                let mut conn = self.conn.clone();
                let lease = self.lease_key(&region);
                let r = conn::eval_durable(
                    &mut conn,
                    self.durability,
                    RENEW,
                    &[&lease],
                    &[h.token.as_bytes(), ttl.as_bytes()],
                )
                .await;
                (region, h, sent, r)
            }
        });
        for (region, h, sent, r) in futures_util::future::join_all(renewals).await {
            match r {
                Ok((Value::Int(1), None)) => {
                    if let Some(x) = self.held.write().get_mut(&region) {
                        x.deadline = sent + self.ttl.mul_f64(0.9);
                    }
                }
                Ok((Value::Int(1), Some(n))) => {
                    tracing::warn!(region, %n, "lease renewal not replicated");
                    if h.deadline <= Instant::now() {
                        lost.push(region);
                    }
                }
                Ok(_) => lost.push(region),
                // Redis unreachable: keep serving until the deadline passes,
                // then stop (the lease may be gone by then).
                Err(e) => {
                    tracing::warn!(region, error = %e, "lease renewal failed");
                    if h.deadline <= Instant::now() {
                        lost.push(region);
                    }
                }
            }
        }
        if !lost.is_empty() {
            let mut held = self.held.write();
            for r in &lost {
                held.remove(r);
            }
        }
        lost
    }

    /// Gives up every lease (graceful shutdown, after the final snapshot),
    /// so another node can take the regions at once.
    pub async fn give_up(&self) {
        let held: Vec<(String, Held)> = self.held.write().drain().collect();
        for (region, h) in held {
            self.give_up_one(&region, &h.token).await;
        }
    }

    /// Regions to try to take now, of this node's own ones and those that
    /// had an owner, held by nobody: their lease is gone, or names this
    /// node, which does not hold it (Redis granted it, but the answer was
    /// lost; or this node restarted). Such a lease would otherwise leave
    /// its region unserved until it lapsed.
    async fn wanted(&self) -> RedisResult<Vec<String>> {
        let map = self.map();
        let mut candidates: Vec<String> = {
            let held = self.held.read();
            self.own
                .iter()
                .chain(map.owners.keys())
                .filter(|r| !held.contains_key(*r))
                .cloned()
                .collect()
        };
        candidates.sort();
        candidates.dedup();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let read = Instant::now();
        let reads = candidates.iter().map(|r| {
            let (mut c1, mut c2) = (self.conn.clone(), self.conn.clone());
            let key = self.lease_key(r);
            async move {
                let (holder, ttl) = futures_util::future::join(
                    c1.get::<_, Option<String>>(&key),
                    c2.pttl::<_, i64>(&key),
                )
                .await;
                Ok::<_, redis::RedisError>((holder?, ttl?))
            }
        });
        let leases: Vec<(Option<String>, i64)> = futures_util::future::join_all(reads)
            .await
            .into_iter()
            .collect::<RedisResult<_>>()?;
        let orphaned = |holder: &Option<String>| {
            holder
                .as_deref()
                .and_then(split_token)
                .is_some_and(|(node, _)| node == self.node)
        };
        // PTTL: -2 when the key is gone (free), else the milliseconds left.
        *self.next_lapse.lock() = leases
            .iter()
            .filter(|(holder, _)| !orphaned(holder))
            .filter_map(|&(_, ms)| u64::try_from(ms).ok())
            .min()
            .map(|ms| read + Duration::from_millis(ms));
        Ok(candidates
            .into_iter()
            .zip(leases)
            .filter_map(|(r, (holder, ms))| (ms == -2 || orphaned(&holder)).then_some(r))
            .collect())
    }

    /// Takes those of `regions` that are free and restores them into
    /// `engine` from their own snapshots and match records. Regions
    /// another node holds are skipped; when the restore fails, or outlasts
    /// a lease, the region is handed back and reported as an error.
    pub async fn take(
        &self,
        regions: &[String],
        engine: &Arc<Engine>,
        persist: &Persistence,
    ) -> Vec<Result<Takeover, String>> {
        let mut out = Vec::new();
        let mut got: Vec<(String, Held, Option<String>)> = Vec::new();
        // A region another take is acquiring is left to it: ACQUIRE grants
        // a lease naming this node again.
        let taking = Taking::enter(&self.taking, regions);
        // All at once: each lease is two scripts in its own slot, and the
        // regions of a failed node must be served again within a lease.
        let acquired = futures_util::future::join_all(
            taking
                .regions
                .iter()
                .map(|region| async move { (region, self.acquire(region).await) }),
        )
        .await;
        for (region, result) in acquired {
            match result {
                Ok(Some((held, previous))) => got.push((region.clone(), held, previous)),
                Ok(None) => {}
                Err(e) => out.push(Err(format!("taking {region}: {e}"))),
            }
        }
        if got.is_empty() {
            return out;
        }
        // Restore before serving: until the lease is recorded below, this
        // node forwards or refuses the regions' requests.
        let names: Vec<String> = got.iter().map(|(r, _, _)| r.clone()).collect();
        let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let region_of = |p: Position| {
            self.regions
                .region_of(p)
                .ok()
                .filter(|r| wanted.contains(r.as_str()))
                .map(|r| r.to_string())
        };
        let restoring = Instant::now();
        let counts = match persist.restore_region(engine, &names, &region_of).await {
            Ok(c) => c,
            Err(e) => {
                // Serve nothing half-restored: hand the leases back.
                for (region, held, _) in &got {
                    self.give_up_one(region, &held.token).await;
                    out.push(Err(format!("restoring {region}: {e}")));
                }
                return out;
            }
        };
        let restore = restoring.elapsed();
        metrics::histogram!("hexmatch_takeover_restore_seconds").record(restore.as_secs_f64());
        let mut late = Vec::new();
        for (region, held, previous) in got {
            if held.deadline <= Instant::now() {
                self.give_up_one(&region, &held.token).await;
                out.push(Err(format!(
                    "restoring {region} outlasted its lease; handed it back"
                )));
                late.push(region);
                continue;
            }
            let (drivers, matches) = counts.get(&region).copied().unwrap_or_default();
            out.push(Ok(Takeover {
                region: region.clone(),
                epoch: held.epoch,
                previous,
                drivers,
                matches,
                restore,
            }));
            self.held.write().insert(region, held);
        }
        if !late.is_empty() {
            // What was restored of them leaves again, as after a lost
            // lease: another node restores it, and this node must neither
            // offer those drivers nor answer for those matches.
            self.losses
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            for region in late {
                let orders = persist.release_region(&region);
                drop_region(engine, &self.regions, &region, &orders, &|o| {
                    persist.home_of(o)
                });
            }
        }
        let _ = self.refresh_map().await;
        out
    }

    /// Takes `region` on first use when nobody has ever owned it (regions
    /// outside every polygon, or regions no node lists). Returns whether
    /// this node serves it now.
    async fn take_unowned(
        &self,
        region: &str,
        engine: &Arc<Engine>,
        persist: &Persistence,
    ) -> bool {
        if self.serves(region) {
            return true;
        }
        if self.map().owners.contains_key(region) {
            return false;
        }
        match self.take(&[region.to_owned()], engine, persist).await.pop() {
            Some(Ok(t)) => {
                tracing::info!(
                    region,
                    epoch = t.epoch,
                    "took an unowned region on first use"
                );
                true
            }
            None => {
                let _ = self.refresh_map().await;
                false
            }
            Some(Err(e)) => {
                tracing::warn!(region, error = %e, "could not take an unowned region");
                false
            }
        }
    }

    /// One round of upkeep: renew leases (dropping the drivers of regions
    /// lost), re-read the map, and take over free regions this node wants.
    /// Returns the takeovers made.
    pub async fn tick(&self, engine: &Arc<Engine>, persist: &Persistence) -> Vec<Takeover> {
        // Read again below; a tick that cannot read the leases waits a period.
        *self.next_lapse.lock() = None;
        let lost = self.renew().await;
        if !lost.is_empty() {
            // Counted before anything is dropped: a claim made before
            // this loss cannot be written after it.
            self.losses
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        for region in lost {
            let orders = persist.release_region(&region);
            let dropped = drop_region(engine, &self.regions, &region, &orders, &|o| {
                persist.home_of(o)
            });
            tracing::warn!(region, dropped, "lease lost: stopped serving the region");
        }
        if let Err(e) = self.refresh_map().await {
            tracing::warn!(error = %e, "could not read the cluster map");
            return Vec::new();
        }
        let wanted = match self.wanted().await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the leases");
                return Vec::new();
            }
        };
        let mut taken = Vec::new();
        for result in self.take(&wanted, engine, persist).await {
            match result {
                Ok(t) => {
                    tracing::info!(region = %t.region, epoch = t.epoch, previous = ?t.previous, drivers = t.drivers, matches = t.matches, restore_ms = t.restore.as_millis() as u64, "took region");
                    taken.push(t);
                }
                Err(e) => tracing::error!(error = %e, "takeover failed"),
            }
        }
        taken
    }

    /// How long a lease lasts without renewal.
    pub fn lease_ttl(&self) -> Duration {
        self.ttl
    }

    /// How often [`tick`](Self::tick) should run.
    pub fn tick_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// How long to wait before the next [`tick`](Self::tick): the tick
    /// interval, or less when a lease this node wants lapses sooner (a
    /// silent owner's regions are taken as soon as Redis drops its lease).
    pub fn until_next_tick(&self) -> Duration {
        let interval = self.tick_interval();
        match *self.next_lapse.lock() {
            // A few milliseconds after Redis expires it.
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .saturating_add(Duration::from_millis(5))
                .min(interval),
            None => interval,
        }
    }
}

/// The regions one [`Cluster::take`] has entered in [`Cluster::taking`];
/// they leave it when it is dropped.
struct Taking<'a> {
    set: &'a parking_lot::Mutex<std::collections::HashSet<String>>,
    regions: Vec<String>,
}

impl<'a> Taking<'a> {
    /// Enters those of `regions` no other take has entered.
    fn enter(
        set: &'a parking_lot::Mutex<std::collections::HashSet<String>>,
        regions: &[String],
    ) -> Self {
        let mut taking = set.lock();
        let regions = regions
            .iter()
            .filter(|r| taking.insert((*r).clone()))
            .cloned()
            .collect();
        Self { set, regions }
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        let mut taking = self.set.lock();
        for r in &self.regions {
            taking.remove(r);
        }
    }
}

/// Removes from `engine` every driver in `region`, and every driver of a
/// match in `orders` (those whose records are in the region's hash, even
/// if the driver has moved out since): its lease was lost, and the new
/// owner restores them. Their matches go with them, forgotten rather than
/// ended (this node must not answer for them as ended), without touching
/// Redis, where the new owner now holds them.
///
/// A driver in `region` whose match has its record in another region
/// (`home_of` its order) stays: this node still answers for that match.
fn drop_region(
    engine: &Engine,
    regions: &RegionMap,
    region: &str,
    orders: &[String],
    home_of: &dyn Fn(&str) -> Option<String>,
) -> usize {
    let held_elsewhere = |d: &hexmatch::Driver| {
        d.order_id
            .as_ref()
            .and_then(|o| home_of(o.as_str()))
            .is_some_and(|home| home != region)
    };
    let mut gone: Vec<hexmatch::DriverId> = engine
        .drivers()
        .into_iter()
        .filter(|d| regions.region_of(d.pos).is_ok_and(|r| r.as_str() == region))
        .filter(|d| !held_elsewhere(d))
        .map(|d| d.id)
        .collect();
    gone.extend(
        orders
            .iter()
            .filter_map(|o| hexmatch::OrderId::new(o).ok())
            .filter_map(|o| engine.get_match(&o))
            .filter(|m| m.state.is_live())
            .map(|m| m.driver_id),
    );
    gone.sort();
    gone.dedup();
    engine.evict(&gone)
}

impl Fence for Cluster {
    fn region_of_pos(&self, pos: Position) -> Result<String, String> {
        self.region_of(pos)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string())
    }

    fn lease(&self, region: &str) -> Result<Lease, String> {
        let token = self.token(region).ok_or_else(|| region.to_owned())?;
        Ok(Lease {
            key: self.lease_key(region),
            token,
            region: region.to_owned(),
        })
    }

    fn held_regions(&self) -> Vec<String> {
        self.held().into_iter().map(|(r, _)| r).collect()
    }

    fn losses(&self) -> u64 {
        self.losses.load(std::sync::atomic::Ordering::SeqCst)
    }
}
