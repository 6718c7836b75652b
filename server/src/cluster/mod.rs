//! Regions owned by nodes: leases and fencing in Redis, the versioned
//! region → node map, routing decisions ([`Cluster::owner`],
//! [`Cluster::resolve_owner`], `remote_owners_within`) and the
//! typed peer channel between nodes ([`peer`]).
//!
//! # Keys (prefix `p`)
//! | key | what |
//! | --- | --- |
//! | `p:lease:{region}` | `node\|epoch` of the owner, with a TTL (`SET NX PX`) |
//! | `p:epoch:{region}` | fencing epoch, `INCR`ed on every takeover |
//! | `p:cluster:owners` | hash: region → `node\|epoch` of its latest owner |
//! | `p:cluster:nodes` | hash: node id → URL |
//! | `p:cluster:version` | map version, `INCR`ed on every ownership change |
//! | `p:order:{order}` | region whose owner holds the order's match |
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
//! - A taker restores a region from its previous owner's snapshot and
//!   match records only after that owner's lease is gone, so every write
//!   the old owner acknowledged is in what the taker reads.

pub(crate) mod geo;
pub mod peer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hexmatch::{Driver, Engine, Position, RegionId, RegionMap};
use parking_lot::RwLock;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisResult, Script};

use self::peer::PeerClient;
use crate::persist::{Fence, Lease, Persistence};

const ACQUIRE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local prev = redis.call('HGET', KEYS[3], ARGV[3])
local e = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. '|' .. e
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[3], token)
local v = redis.call('INCR', KEYS[4])
return {e, prev or '', v}
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

/// How long a node waits for another's answer.
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
}

/// This node's view of the cluster.
pub struct Cluster {
    node: String,
    url: String,
    prefix: String,
    regions: RegionMap,
    caps: geo::Caps,
    own: Vec<String>,
    conn: ConnectionManager,
    ttl: Duration,
    held: RwLock<HashMap<String, Held>>,
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
    /// Connects to Redis and registers this node (`node` reachable at
    /// `url`, presenting `secret` to the other nodes).
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
    ) -> Result<Arc<Self>, String> {
        let client =
            redis::Client::open(redis_url).map_err(|e| format!("redis url {redis_url:?}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(ttl / 3))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| format!("redis at {redis_url}: {e}"))?;
        let own = if own.iter().any(|r| r == "*") {
            regions.regions().iter().map(|r| r.id.to_string()).collect()
        } else {
            own.to_vec()
        };
        let peer = PeerClient::new(node, secret, PEER_TIMEOUT)?;
        let this = Arc::new(Self {
            node: node.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            prefix: prefix.to_owned(),
            caps: geo::Caps::new(&regions),
            regions,
            own,
            conn,
            ttl,
            held: RwLock::default(),
            map: RwLock::default(),
            peer,
        });
        let mut conn = this.conn.clone();
        conn.hset::<_, _, _, ()>(this.key("cluster:nodes"), node, &this.url)
            .await
            .map_err(|e| format!("registering node {node}: {e}"))?;
        this.refresh_map().await.map_err(|e| e.to_string())?;
        Ok(this)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    fn lease_key(&self, region: &str) -> String {
        self.key(&format!("lease:{region}"))
    }

    /// The Redis key recording which region holds an order's match.
    fn order_key(&self, order: &str) -> String {
        self.key(&format!("order:{order}"))
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
        let keys: Vec<String> = regions.iter().map(|r| self.lease_key(r)).collect();
        let mut conn = self.conn.clone();
        let tokens: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        Ok(tokens
            .iter()
            .flatten()
            .filter_map(|t| split_token(t))
            .any(|(n, _)| n == node))
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
    /// no node has recorded it, or Redis did not answer).
    pub(crate) async fn order_region(&self, order: &str) -> Option<String> {
        let mut conn = self.conn.clone();
        conn.get::<_, Option<String>>(self.order_key(order))
            .await
            .ok()
            .flatten()
    }

    /// Re-reads the map from Redis.
    ///
    /// # Errors
    /// Redis errors (the cached map stays).
    pub async fn refresh_map(&self) -> RedisResult<Arc<ClusterMap>> {
        let mut conn = self.conn.clone();
        let (version, owners, nodes): (
            Option<u64>,
            HashMap<String, String>,
            HashMap<String, String>,
        ) = redis::pipe()
            .atomic()
            .get(self.key("cluster:version"))
            .hgetall(self.key("cluster:owners"))
            .hgetall(self.key("cluster:nodes"))
            .query_async(&mut conn)
            .await?;
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

    /// Tries to take `region`'s lease. `Ok(None)`: someone holds it.
    /// The lease is not served until the caller records it.
    async fn acquire(&self, region: &str) -> RedisResult<Option<(Held, Option<String>)>> {
        let sent = Instant::now();
        let mut conn = self.conn.clone();
        let got: Option<(u64, String, u64)> = Script::new(ACQUIRE)
            .key(self.lease_key(region))
            .key(self.key(&format!("epoch:{region}")))
            .key(self.key("cluster:owners"))
            .key(self.key("cluster:version"))
            .arg(&self.node)
            .arg(self.ttl.as_millis() as u64)
            .arg(region)
            .invoke_async(&mut conn)
            .await?;
        let Some((epoch, prev, _version)) = got else {
            return Ok(None);
        };
        let held = Held {
            epoch,
            token: format!("{}|{epoch}", self.node),
            deadline: sent + self.ttl.mul_f64(0.9),
        };
        Ok(Some((held, split_token(&prev).map(|(node, _)| node))))
    }

    async fn give_up_one(&self, region: &str, token: &str) {
        let mut conn = self.conn.clone();
        let _: RedisResult<i64> = Script::new(GIVE_UP)
            .key(self.lease_key(region))
            .arg(token)
            .invoke_async(&mut conn)
            .await;
    }

    /// Renews every held lease; returns the regions lost.
    async fn renew(&self) -> Vec<String> {
        let held: Vec<(String, Held)> = self
            .held
            .read()
            .iter()
            .map(|(r, h)| (r.clone(), h.clone()))
            .collect();
        let mut lost = Vec::new();
        let script = Script::new(RENEW);
        for (region, h) in held {
            let sent = Instant::now();
            let mut conn = self.conn.clone();
            let r: RedisResult<i64> = script
                .key(self.lease_key(&region))
                .arg(&h.token)
                .arg(self.ttl.as_millis() as u64)
                .invoke_async(&mut conn)
                .await;
            match r {
                Ok(1) => {
                    if let Some(x) = self.held.write().get_mut(&region) {
                        x.deadline = sent + self.ttl.mul_f64(0.9);
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

    /// Regions to try to take now: this node's own ones not held, and
    /// regions that had an owner whose lease is gone.
    async fn wanted(&self) -> RedisResult<Vec<String>> {
        let map = self.map();
        let mut candidates: Vec<String> = self
            .own
            .iter()
            .chain(map.owners.keys())
            .filter(|r| !self.serves(r))
            .cloned()
            .collect();
        candidates.sort();
        candidates.dedup();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in &candidates {
            pipe.exists(self.lease_key(r));
        }
        let mut conn = self.conn.clone();
        let exists: Vec<bool> = pipe.query_async(&mut conn).await?;
        Ok(candidates
            .into_iter()
            .zip(exists)
            .filter_map(|(r, e)| (!e).then_some(r))
            .collect())
    }

    /// Takes those of `regions` that are free and restores them into
    /// `engine` from their previous owners' snapshots and match records:
    /// each previous owner's snapshot is read once for all the regions
    /// taken from it. Regions another node holds are skipped; a region
    /// whose restore fails is handed back and reported as an error.
    pub async fn take(
        &self,
        regions: &[String],
        engine: &Arc<Engine>,
        persist: &Persistence,
    ) -> Vec<Result<Takeover, String>> {
        let mut out = Vec::new();
        let mut got: Vec<(String, Held, Option<String>)> = Vec::new();
        for region in regions {
            match self.acquire(region).await {
                Ok(Some((held, previous))) => got.push((region.clone(), held, previous)),
                Ok(None) => {}
                Err(e) => out.push(Err(format!("taking {region}: {e}"))),
            }
        }
        let mut by_previous: HashMap<Option<String>, Vec<(String, Held)>> = HashMap::new();
        for (region, held, previous) in got {
            by_previous
                .entry(previous)
                .or_default()
                .push((region, held));
        }
        for (previous, group) in by_previous {
            // Restore before serving: until the lease is recorded below,
            // this node forwards or refuses the region's requests.
            let mut counts: HashMap<String, (usize, usize)> = HashMap::new();
            if let Some(prev) = &previous {
                let wanted: std::collections::HashSet<&str> =
                    group.iter().map(|(r, _)| r.as_str()).collect();
                let region_of = |p: Position| {
                    self.regions
                        .region_of(p)
                        .ok()
                        .filter(|r| wanted.contains(r.as_str()))
                        .map(|r| r.to_string())
                };
                match persist.restore_region(engine, prev, &region_of).await {
                    Ok(c) => counts = c,
                    Err(e) => {
                        // Serve nothing half-restored: hand the leases back.
                        for (region, held) in &group {
                            self.give_up_one(region, &held.token).await;
                            out.push(Err(format!("restoring {region} from {prev}: {e}")));
                        }
                        continue;
                    }
                }
            }
            for (region, held) in group {
                if held.deadline <= Instant::now() {
                    self.give_up_one(&region, &held.token).await;
                    out.push(Err(format!(
                        "restoring {region} outlasted its lease; handed it back"
                    )));
                    continue;
                }
                let (drivers, matches) = counts.get(&region).copied().unwrap_or_default();
                out.push(Ok(Takeover {
                    region: region.clone(),
                    epoch: held.epoch,
                    previous: previous.clone(),
                    drivers,
                    matches,
                }));
                self.held.write().insert(region, held);
            }
        }
        if !out.is_empty() {
            let _ = self.refresh_map().await;
        }
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
        for region in self.renew().await {
            let dropped = drop_region(engine, &self.regions, &region);
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
                    tracing::info!(region = %t.region, epoch = t.epoch, previous = ?t.previous, drivers = t.drivers, matches = t.matches, "took region");
                    taken.push(t);
                }
                Err(e) => tracing::error!(error = %e, "takeover failed"),
            }
        }
        taken
    }

    /// How often [`tick`](Self::tick) should run.
    pub fn tick_interval(&self) -> Duration {
        self.ttl / 3
    }
}

/// Removes from `engine` every driver in `region` (its lease was lost:
/// the new owner restores them). Their matches go with them, without
/// touching Redis, where the new owner now holds them.
fn drop_region(engine: &Engine, regions: &RegionMap, region: &str) -> usize {
    let gone: Vec<Driver> = engine
        .drivers()
        .into_iter()
        .filter(|d| regions.region_of(d.pos).is_ok_and(|r| r.as_str() == region))
        .collect();
    for d in &gone {
        engine.remove(&d.id);
    }
    gone.len()
}

impl Fence for Cluster {
    fn lease(&self, pos: Position) -> Result<Lease, String> {
        let region = self.region_of(pos).map_err(|e| e.to_string())?;
        let region = region.as_str();
        let token = self.token(region).ok_or_else(|| region.to_owned())?;
        Ok(Lease {
            key: self.lease_key(region),
            token,
            region: region.to_owned(),
        })
    }

    fn order_key(&self, order: &str) -> String {
        Cluster::order_key(self, order)
    }
}
