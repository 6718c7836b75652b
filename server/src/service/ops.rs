//! Readiness, regions and the cluster view.

use std::collections::BTreeMap;

use super::Service;
use crate::wire::{
    ClusterOut, DEFAULT_REGION, NodeOut, ReadyOut, ReadyStatus, RedisStatus, RegionOut, RegionOwner,
};

impl Service {
    /// Readiness: start-up done, Redis (when configured) reachable, and
    /// snapshots and durable writes not failing again and again.
    pub fn readiness(&self) -> ReadyOut {
        let redis = match (&self.config.redis_url, self.persist()) {
            (None, _) => RedisStatus::Disabled,
            (Some(_), Some(p)) if p.is_up() => RedisStatus::Up,
            (Some(_), _) => RedisStatus::Down,
        };
        let health = self.persist().map(|p| p.health());
        let (status, reason) = if !self.is_ready() {
            let problem = self
                .startup_problem
                .lock()
                .clone()
                .unwrap_or_else(|| "connecting to Redis, restoring the snapshot".to_owned());
            (
                ReadyStatus::NotReady,
                Some(format!("start-up is not finished: {problem}")),
            )
        } else if redis == RedisStatus::Down {
            (
                ReadyStatus::Degraded,
                Some("Redis is unreachable: serving from memory, match changes refused".to_owned()),
            )
        } else if let Some(why) = health
            .as_ref()
            .and_then(crate::persist::Health::degraded_reason)
        {
            (ReadyStatus::Degraded, Some(why))
        } else {
            (ReadyStatus::Ready, None)
        };
        let now_ms = self.engine.clock().now().as_millis();
        ReadyOut {
            status,
            redis,
            reason,
            last_snapshot_age_s: health
                .as_ref()
                .and_then(|h| h.last_snapshot_ms)
                .map(|t| (now_ms - t).max(0) as f64 / 1000.0),
            snapshot_failures: health.as_ref().map(|h| h.snapshot_failures),
            write_failures: health.as_ref().map(|h| h.write_failures),
        }
    }

    /// Every region this node knows, with its cells, drivers and owner.
    pub fn regions(&self) -> Vec<RegionOut> {
        let owner = self.config.node_id.clone();
        let map_now = self.cluster().map(|c| c.map());
        let owner_of = |region: &str| match &map_now {
            Some(m) => m
                .owners
                .get(region)
                .map_or_else(String::new, |(node, _)| node.clone()),
            None => owner.clone(),
        };
        let occupied: Vec<_> = self
            .engine
            .cell_counts()
            .into_iter()
            .filter(|(_, c)| c.total() > 0)
            .collect();
        let Some(map) = &self.regions else {
            let drivers = occupied.iter().map(|(_, c)| c.total()).sum();
            return vec![RegionOut {
                region: DEFAULT_REGION.to_owned(),
                name: String::new(),
                cells: occupied.len(),
                drivers,
                owner,
            }];
        };
        // Drivers per region, and the occupied cells outside every polygon.
        let mut drivers: BTreeMap<String, usize> = BTreeMap::new();
        let mut outside_cells: BTreeMap<String, usize> = BTreeMap::new();
        for (cell, counts) in &occupied {
            let Ok(region) = map.region_of_cell(*cell) else {
                continue;
            };
            let region = region.to_string();
            *drivers.entry(region.clone()).or_default() += counts.total();
            if region.starts_with("outside-") {
                *outside_cells.entry(region).or_default() += 1;
            }
        }
        let mut out: Vec<RegionOut> = map
            .regions()
            .iter()
            .map(|r| RegionOut {
                region: r.id.to_string(),
                name: r.name.clone(),
                cells: r.cells.len(),
                drivers: drivers.get(r.id.as_str()).copied().unwrap_or(0),
                owner: owner_of(r.id.as_str()),
            })
            .collect();
        out.extend(outside_cells.into_iter().map(|(region, cells)| RegionOut {
            drivers: drivers.get(&region).copied().unwrap_or(0),
            owner: owner_of(&region),
            region,
            name: String::new(),
            cells,
        }));
        out
    }

    /// This node, the region → node map and lease epochs.
    pub fn cluster_view(&self) -> ClusterOut {
        let node = self.config.node_id.clone();
        if let Some(c) = self.cluster() {
            let map = c.map();
            let mut regions: Vec<RegionOwner> = map
                .owners
                .iter()
                .map(|(region, (owner, epoch))| RegionOwner {
                    region: region.clone(),
                    owner: owner.clone(),
                    epoch: *epoch,
                })
                .collect();
            regions.sort_by(|a, b| a.region.cmp(&b.region));
            let mut nodes: Vec<NodeOut> = map
                .nodes
                .iter()
                .map(|(n, url)| NodeOut {
                    node_id: n.clone(),
                    url: url.clone(),
                })
                .collect();
            nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            let held = c.held();
            return ClusterOut {
                serving: held.iter().map(|(r, _)| r.clone()).collect(),
                leases: held
                    .into_iter()
                    .map(|(region, epoch)| RegionOwner {
                        region,
                        owner: node.clone(),
                        epoch,
                    })
                    .collect(),
                node_id: node,
                map_version: map.version,
                regions,
                nodes,
            };
        }
        let ids: Vec<String> = match &self.regions {
            Some(map) => map.regions().iter().map(|r| r.id.to_string()).collect(),
            None => vec![DEFAULT_REGION.to_owned()],
        };
        ClusterOut {
            node_id: node.clone(),
            map_version: 1,
            regions: ids
                .into_iter()
                .map(|region| RegionOwner {
                    region,
                    owner: node.clone(),
                    epoch: 1,
                })
                .collect(),
            nodes: Vec::new(),
            serving: Vec::new(),
            leases: Vec::new(),
        }
    }
}

impl Service {
    /// Sets the gauges that are read from the engine rather than counted
    /// (drivers per status, live matches, cells), before `/metrics` renders.
    pub fn refresh_gauges(&self) {
        use metrics::gauge;
        let counts = self.engine.counts();
        for (status, n) in [
            ("available", counts.available),
            ("reserved", counts.reserved),
            ("busy", counts.busy),
            ("offline", counts.offline),
        ] {
            gauge!("hexmatch_drivers", "status" => status).set(n as f64);
        }
        gauge!("hexmatch_matches_live").set(self.engine.live_matches() as f64);
        gauge!("hexmatch_cells").set(self.engine.cell_count() as f64);
    }
}

impl Service {
    /// Expires reservations not confirmed in time and (with a driver TTL)
    /// drivers that went silent, then brings Redis in step.
    pub async fn sweep(&self) {
        let engine = std::sync::Arc::clone(&self.engine);
        let ttl_on = self.config.driver_ttl_s > 0;
        // The driver scan is O(drivers): keep it off the async workers.
        let swept = tokio::task::spawn_blocking(move || {
            let expired = engine.expire_matches();
            let drivers = if ttl_on {
                engine.expire_drivers()
            } else {
                Vec::new()
            };
            (expired, drivers)
        })
        .await;
        let Ok((expired, drivers)) = swept else {
            return;
        };
        metrics::counter!("hexmatch_match_ends_total", "state" => "expired")
            .increment(expired.len() as u64);
        metrics::counter!("hexmatch_drivers_expired_total").increment(drivers.len() as u64);
        for (i, e) in expired.iter().enumerate() {
            self.emit_match_change(&e.m, hexmatch::Status::Reserved);
            yield_every(i).await;
        }
        for (i, (d, ended)) in drivers.iter().enumerate() {
            self.events.publish(|| {
                crate::wire::EventData::DriverExpired(crate::wire::DriverOut::from(d.clone()))
            });
            self.forget_zones(d);
            if let Some(e) = ended {
                self.emit_match(&e.m);
            }
            yield_every(i).await;
        }
        let ended = expired.iter().map(|e| &e.m.order_id).chain(
            drivers
                .iter()
                .filter_map(|(_, e)| e.as_ref().map(|e| &e.m.order_id)),
        );
        if let Some(p) = self.persist() {
            for order in ended {
                if p.del_match(order).await.is_err() {
                    p.schedule_resync();
                }
            }
        }
    }
}

/// Lets other tasks run every 1024 items of a long loop on an async
/// worker (a sweep that removed many drivers announces each one).
async fn yield_every(i: usize) {
    if i % 1024 == 1023 {
        tokio::task::yield_now().await;
    }
}
