//! Nearest drivers and matching: nearest queries, claims, confirm /
//! release / complete, batches.
//!
//! # Across nodes
//! - **Nearest** is exact over the cluster: this node answers from its
//!   engine, then asks the owners of every region whose lower bound is
//!   within its k-th distance (or the radius), and merges by
//!   (distance, id), the engine's own ranking.
//! - **A claim** is coordinated by the pickup's owner. If no other node
//!   can hold a nearer driver, the engine's atomic claim is exact.
//!   Otherwise it gathers candidates across nodes and reserves the first
//!   on the node that holds it, trying the next when one was taken
//!   meanwhile.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;

use hexmatch::{BatchOrder, DriverId, NearestQuery, Neighbor, OrderId};
use metrics::counter;

use super::{Scope, Service};
use crate::cluster::{Cluster, Owner};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::persist::{Persistence, WriteError};
use crate::wire::{BatchIn, BatchOut, MatchOut, OrderIn, PeerOrder, ReserveRequest};

/// Candidates gathered for a claim across nodes.
const CLAIM_CANDIDATES: usize = 8;
/// Gathers tried before a claim gives up.
const CLAIM_ROUNDS: usize = 3;
/// Candidate drivers per order of a batch, unless the request says.
const BATCH_CANDIDATES: usize = 16;

/// A cluster batch's searches (and then its reservations) run this many at
/// a time.
const BATCH_SEARCHES_AT_ONCE: usize = 32;

/// A nearest answer and the nodes that contributed to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nearest {
    /// Nearest first; ties by driver id.
    pub drivers: Vec<Neighbor>,
    /// The nodes asked, this one first (empty outside a cluster).
    pub asked: Vec<String>,
}

/// A claim's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// The match.
    pub m: MatchOut,
    /// Whether it was made now (false: the order already had it).
    pub created: bool,
    /// The node that holds it (in a cluster).
    pub by: Option<String>,
}

/// A durable-write failure as the client sees it.
fn unavailable(e: &WriteError) -> ApiError {
    match e {
        WriteError::NotOwner { region } => ApiError::new(
            ErrorCode::NotOwner,
            format!("this node no longer holds the lease of region {region}"),
        ),
        WriteError::OrderTaken { order, region } => ApiError::new(
            ErrorCode::OrderConflict,
            format!("order {order} already has a match, held in region {region}"),
        ),
        WriteError::NotReplicated(n) => ApiError::unavailable(format!(
            "the change could not be made durable in Redis: {n}"
        )),
        WriteError::Redis(e) => ApiError::unavailable(format!(
            "the change could not be made durable in Redis: {e}"
        )),
    }
}

fn unknown(order: &OrderId) -> ApiError {
    hexmatch::Error::UnknownOrder(order.to_string()).into()
}

fn count_end(state: &str) {
    counter!("hexmatch_match_ends_total", "state" => state.to_owned()).increment(1);
}

impl Service {
    /// The exact `k` nearest eligible drivers: over the whole cluster with
    /// [`Scope::Cluster`], of this node's engine with [`Scope::Local`].
    ///
    /// # Errors
    /// Invalid query; `unavailable` when a node within reach did not answer.
    pub async fn nearest(&self, q: &NearestQuery, scope: Scope) -> ApiResult<Nearest> {
        match (self.cluster(), scope) {
            // A query narrowed to a region was routed to its owner, which
            // holds all of the region's drivers.
            (Some(cluster), Scope::Cluster) if q.within.is_none() => self.gather(cluster, q).await,
            _ => Ok(Nearest {
                drivers: self.engine.nearest(q)?,
                asked: Vec::new(),
            }),
        }
    }

    /// The exact k nearest across the cluster: this node's answer first,
    /// then the owners of every region whose lower bound is within the
    /// k-th distance found (or the radius), asked in parallel and merged
    /// by (distance, id). Each driver comes with the node that holds it.
    async fn gather_held(
        &self,
        cluster: &Cluster,
        q: &NearestQuery,
    ) -> ApiResult<(Vec<(Neighbor, String)>, Vec<String>)> {
        let local = self.engine.nearest(q)?;
        let reach = q.radius_m.unwrap_or(self.config.max_radius_m);
        let bound = if local.len() == q.k {
            local.last().map_or(reach, |n| n.distance_m)
        } else {
            reach
        };
        let node = cluster.node().to_owned();
        let mut all: Vec<(Neighbor, String)> =
            local.into_iter().map(|n| (n, node.clone())).collect();
        let mut asked = vec![node];
        let remotes = cluster.remote_owners_within(q.pos, bound);
        if remotes.is_empty() {
            return Ok((all, asked));
        }
        // A driver exactly at the bound may still win its tie by id.
        let radius = (bound * (1.0 + 1e-12) + 1e-6).min(reach);
        let mut remote_q = q.clone();
        remote_q.radius_m = Some(radius);
        let peer = cluster.peer();
        let calls = remotes.iter().map(|(n, url)| {
            let remote_q = &remote_q;
            async move {
                let drivers = peer.nearest(url, remote_q).await.map_err(|e| {
                    ApiError::unavailable(format!("node {n} did not answer a border search: {e}"))
                })?;
                Ok::<_, ApiError>((n.clone(), drivers))
            }
        });
        for r in futures_util::future::join_all(calls).await {
            let (n, drivers) = r?;
            all.extend(drivers.into_iter().map(|d| (d, n.clone())));
            asked.push(n);
        }
        // A driver handed off between nodes can briefly show on both: keep
        // the newer fix.
        all.sort_by(|a, b| a.0.id.cmp(&b.0.id).then_with(|| b.0.ts.cmp(&a.0.ts)));
        all.dedup_by(|later, first| later.0.id == first.0.id);
        all.sort_by(|a, b| {
            a.0.distance_m
                .total_cmp(&b.0.distance_m)
                .then_with(|| a.0.id.cmp(&b.0.id))
        });
        all.truncate(q.k);
        Ok((all, asked))
    }

    async fn gather(&self, cluster: &Cluster, q: &NearestQuery) -> ApiResult<Nearest> {
        let (found, asked) = self.gather_held(cluster, q).await?;
        Ok(Nearest {
            drivers: found.into_iter().map(|(n, _)| n).collect(),
            asked,
        })
    }

    /// Reserves the nearest eligible driver for an order (`POST
    /// /v1/matches`); repeating an order returns its match.
    ///
    /// # Errors
    /// `no_driver_available`, `order_conflict`, invalid input; `unavailable`
    /// when Redis or a node needed is down.
    pub async fn claim(&self, body: OrderIn) -> ApiResult<Claimed> {
        let order = self.order(body)?;
        if let Some(cluster) = self.cluster() {
            return self.claim_across(cluster, &order).await;
        }
        let _serial = self.lock_order(&order.order_id).await?;
        self.claim_here(&order, None).await
    }

    /// The validated order of a request, narrowed to its region's cells
    /// when it names one.
    ///
    /// # Errors
    /// The first invalid field's error; `unknown_region`.
    pub fn order(&self, body: OrderIn) -> ApiResult<BatchOrder> {
        let region = body.region.clone();
        let mut order = body.parse()?;
        if let Some(region) = region {
            order.request.within = self.region_cells(&region)?;
        }
        Ok(order)
    }

    /// Another node's reserve call: `driver` (or this node's own nearest)
    /// for `order`, here.
    ///
    /// # Errors
    /// `driver_not_available`, `not_owner`, …
    pub async fn reserve_for_peer(&self, req: ReserveRequest) -> ApiResult<Claimed> {
        let order = req.order.into_order()?;
        let _serial = self.lock_order(&order.order_id).await?;
        self.claim_here(&order, req.driver_id.as_ref()).await
    }

    /// The per-order lock when Redis is configured (held across the claim
    /// and its durable write).
    async fn lock_order(
        &self,
        order: &OrderId,
    ) -> ApiResult<Option<tokio::sync::MutexGuard<'_, ()>>> {
        Ok(match self.durable()? {
            Some(p) => Some(p.lock_order(order).await),
            None => None,
        })
    }

    /// Claims on this node's engine (the nearest, or `driver`), durable
    /// before it returns.
    async fn claim_here(
        &self,
        order: &BatchOrder,
        driver: Option<&DriverId>,
    ) -> ApiResult<Claimed> {
        let durable = self.durable()?;
        let since = durable.map_or(0, |p| p.losses());
        let result = match driver {
            None => self.engine.claim(&order.order_id, &order.request),
            Some(d) => self.engine.claim_driver(&order.order_id, &order.request, d),
        };
        let outcome = match &result {
            Ok((_, true)) => "created",
            Ok((_, false)) => "repeated",
            Err(e) => e.code(),
        };
        counter!("hexmatch_matches_total", "result" => outcome).increment(1);
        let (m, created) = result?;
        if let Some(p) = durable {
            // Durable before the response, a repeat too: the attempt that
            // made the match may have failed to write it.
            let Some(rec) = self.engine.durable_match(&m.order_id) else {
                // Dropped with a region lost meanwhile: never acknowledged.
                return Err(ApiError::unavailable(format!(
                    "the region of order {} changed hands during the claim; retry",
                    m.order_id
                )));
            };
            if let Err(e) = p.put_match_since(&rec, since).await {
                let refused = matches!(
                    e,
                    WriteError::NotOwner { .. } | WriteError::OrderTaken { .. }
                );
                // Undo only the match made here: a takeover since may have
                // restored the order's durable match (made on another
                // node) in its place.
                let ours = self.engine.get_match(&m.order_id).is_some_and(|now| {
                    now.state.is_live()
                        && now.driver_id == m.driver_id
                        && now.created_at == m.created_at
                });
                if created && refused && ours {
                    let _ = self.engine.release(&m.order_id, Some("persistence_failed"));
                } else if !refused {
                    // Redis may have taken the write (no answer, or too few
                    // replicas): the match stays held here, toward "held",
                    // and the records are resynced to it. Releasing it
                    // would leave a live record of a driver offered again.
                    p.schedule_resync();
                }
                return Err(unavailable(&e));
            }
        }
        if created {
            self.emit_match_change(&m, hexmatch::Status::Available);
        }
        Ok(Claimed {
            m: self.match_out(m),
            created,
            by: self.cluster().map(|c| c.node().to_owned()),
        })
    }

    /// A claim on the node that owns the pickup: searches the cluster,
    /// then reserves the nearest candidate on the node that holds it.
    async fn claim_across(&self, cluster: &Cluster, order: &BatchOrder) -> ApiResult<Claimed> {
        let q = order.request.query(CLAIM_CANDIDATES)?;
        let _serial = self.lock_order(&order.order_id).await?;
        let peer = cluster.peer();
        // Idempotent by order id across nodes: an order held elsewhere is
        // answered by its holder.
        if self
            .engine
            .get_match(&order.order_id)
            .is_none_or(|m| !m.state.is_live())
            // Unreadable now: the order's record, taken before any match
            // is written, still refuses a second match.
            && let Ok(Some(region)) = cluster.order_region(order.order_id.as_str()).await
            && let Owner::Remote { url, node } = cluster.owner(&region)
        {
            let reserved = peer
                .reserve(
                    &url,
                    &ReserveRequest {
                        driver_id: None,
                        order: PeerOrder::from(order),
                    },
                )
                .await?;
            return Ok(Claimed {
                m: reserved.m,
                created: reserved.created,
                by: Some(node),
            });
        }
        if order.request.within.is_some() {
            // Routed to the owner of the order's region, which holds all
            // of the region's drivers.
            return self.claim_here(order, None).await;
        }
        // A candidate on a node that did not answer is skipped; if no other
        // could be reserved, the client hears why.
        let mut silent: Option<ApiError> = None;
        for _ in 0..CLAIM_ROUNDS {
            let (candidates, asked) = self.gather_held(cluster, &q).await?;
            if asked.len() == 1 {
                // Nobody else can hold a nearer driver: the engine's own
                // atomic claim is exact.
                return self.claim_here(order, None).await;
            }
            if candidates.is_empty() {
                break;
            }
            for (cand, holder) in &candidates {
                if *holder == cluster.node() {
                    match self.claim_here(order, Some(&cand.id)).await {
                        Ok(c) => return Ok(c),
                        Err(e) if e.code() == ErrorCode::DriverNotAvailable => continue,
                        Err(e) => return Err(e),
                    }
                }
                let Some(url) = cluster.map().nodes.get(holder).cloned() else {
                    continue;
                };
                let ask = ReserveRequest {
                    driver_id: Some(cand.id.clone()),
                    order: PeerOrder::from(order),
                };
                match peer.reserve(&url, &ask).await {
                    Ok(r) => {
                        return Ok(Claimed {
                            m: r.m,
                            created: r.created,
                            by: Some(holder.clone()),
                        });
                    }
                    // Taken meanwhile, or the holder lost the region: next one.
                    Err(e)
                        if matches!(
                            e.code(),
                            ErrorCode::DriverNotAvailable | ErrorCode::NotOwner
                        ) => {}
                    Err(e) if e.code() == ErrorCode::Unavailable => silent = Some(e),
                    Err(e) => return Err(e),
                }
            }
        }
        Err(silent.unwrap_or_else(|| hexmatch::Error::NoDriverAvailable.into()))
    }

    /// A match by order id.
    ///
    /// # Errors
    /// `unknown_order`.
    pub fn get_match(&self, order: &OrderId) -> ApiResult<MatchOut> {
        self.engine
            .get_match(order)
            .map(|m| self.match_out(m))
            .ok_or_else(|| unknown(order))
    }

    /// Applies a match change durably: with Redis, the record is written
    /// (by `durable_first`: the next record, or `None` to delete it) before
    /// the engine acts, under the order's lock.
    async fn transition(
        &self,
        order: &OrderId,
        durable_first: impl FnOnce(hexmatch::DurableMatch) -> Option<hexmatch::DurableMatch>,
        act: impl FnOnce(&hexmatch::Engine) -> hexmatch::Result<hexmatch::Match>,
    ) -> ApiResult<MatchOut> {
        // The match before, for the events of what the change did.
        let was = if self.events.is_on() {
            self.engine.get_match(order)
        } else {
            None
        };
        let act = |engine: &hexmatch::Engine| {
            let result = act(engine);
            self.emit_transition(order, was.as_ref(), &result);
            result
        };
        let Some(p) = self.durable()? else {
            return Ok(self.match_out(act(&self.engine)?));
        };
        let _serial = p.lock_order(order).await;
        let since = p.losses();
        let current = self
            .engine
            .durable_match(order)
            .ok_or_else(|| unknown(order))?;
        let wrote = current.m.state.is_live();
        if wrote {
            let written = match durable_first(current.clone()) {
                Some(next) => p.put_match_since(&next, since).await,
                None => p.end_match(&current).await,
            };
            written.map_err(|e| unavailable(&e))?;
        }
        let result = act(&self.engine);
        if result.is_err() {
            if wrote && self.engine.get_match(order).is_none() {
                // The change is in Redis, but the region changed hands
                // meanwhile and took the match along: the outcome is the
                // new owner's to tell, not `unknown_order`.
                return Err(ApiError::unavailable(format!(
                    "the region of order {order} changed hands during the request; retry"
                )));
            }
            p.sync_order(&self.engine, order).await;
        }
        let m = result?;
        // The driver's status changed with the match: journal it, or a
        // taker would bring it back as the last location update left it.
        let before = self.before([&m.driver_id]);
        self.journal_quietly(before).await;
        Ok(self.match_out(m))
    }

    /// Confirms a reservation: the driver becomes busy.
    ///
    /// # Errors
    /// `unknown_order`, `order_conflict`, `reservation_expired`, `unavailable`.
    pub async fn confirm(&self, order: &OrderId) -> ApiResult<MatchOut> {
        let now = self.engine.clock().now();
        let confirmed = |mut rec: hexmatch::DurableMatch| {
            if rec.m.state == hexmatch::MatchState::Reserved && rec.m.reserved_until > now {
                rec.m.state = hexmatch::MatchState::Confirmed;
            }
            Some(rec)
        };
        let m = self
            .transition(order, confirmed, |e| e.confirm(order))
            .await?;
        counter!("hexmatch_match_confirms_total").increment(1);
        Ok(m)
    }

    /// Releases a match: the driver is available again.
    ///
    /// # Errors
    /// `invalid_parameter` (reason too long), `unknown_order`,
    /// `order_conflict`, `unavailable`.
    pub async fn release(&self, order: &OrderId, reason: Option<&str>) -> ApiResult<MatchOut> {
        if reason.is_some_and(|r| r.len() > 256) {
            return Err(ApiError::invalid_parameter(
                "reason is longer than 256 bytes",
            ));
        }
        let m = self
            .transition(order, |_| None, |e| e.release(order, reason))
            .await?;
        count_end("released");
        Ok(m)
    }

    /// Completes a confirmed match: the driver is available again.
    ///
    /// # Errors
    /// `unknown_order`, `order_conflict`, `unavailable`.
    pub async fn complete(&self, order: &OrderId) -> ApiResult<MatchOut> {
        let m = self
            .transition(order, |_| None, |e| e.complete(order))
            .await?;
        count_end("completed");
        Ok(m)
    }

    /// Serves a window of orders, minimising the summed pickup distance.
    ///
    /// # Errors
    /// Invalid orders or objective; `payload_too_large` past
    /// `max_batch_items` orders; `unavailable`.
    pub async fn batch(&self, body: BatchIn) -> ApiResult<BatchOut> {
        if let Some(o) = body.objective.as_deref().filter(|o| *o != "total_distance") {
            return Err(ApiError::invalid_parameter(format!(
                "objective {o:?} is not supported; use total_distance"
            )));
        }
        let max = self.config.max_batch_items;
        if body.orders.len() > max {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{} orders; at most {max} per batch", body.orders.len()),
            ));
        }
        let orders = body
            .orders
            .into_iter()
            .map(|o| self.order(o))
            .collect::<ApiResult<Vec<_>>>()?;
        let durable = self.durable()?;
        let candidates = body.candidates.unwrap_or(BATCH_CANDIDATES);
        if let Some(cluster) = self.cluster() {
            if orders.iter().any(|o| o.request.within.is_some()) {
                return Err(ApiError::invalid_parameter(
                    "a batch order naming a region is not served in a cluster; \
                     claim it with POST /v1/matches, which goes to the region's owner",
                ));
            }
            return self.batch_across(cluster, orders, candidates).await;
        }
        let was_live: HashSet<OrderId> = orders
            .iter()
            .filter(|o| {
                self.engine
                    .get_match(&o.order_id)
                    .is_some_and(|m| m.state.is_live())
            })
            .map(|o| o.order_id.clone())
            .collect();
        let engine = self.engine.clone();
        let out = tokio::task::spawn_blocking(move || engine.claim_batch(&orders, candidates))
            .await
            .map_err(|e| ApiError::internal(format!("batch task failed: {e}")))??;
        if let Some(p) = durable {
            self.write_batch(p, &out.matches, &was_live).await?;
        }
        for m in out
            .matches
            .iter()
            .filter(|m| !was_live.contains(&m.order_id))
        {
            self.emit_match_change(m, hexmatch::Status::Available);
        }
        counter!("hexmatch_matches_total", "result" => "batch").increment(out.matches.len() as u64);
        Ok(BatchOut {
            matches: out.matches.into_iter().map(|m| self.match_out(m)).collect(),
            unmatched: out.unmatched.into_iter().map(|o| o.to_string()).collect(),
        })
    }

    /// A batch in a cluster: each order's `candidates` nearest eligible
    /// drivers across the cluster (as a nearest query finds them), one
    /// min-total-distance assignment over them, then each chosen driver
    /// reserved on the node that holds it, as a single claim reserves it.
    /// An order whose driver was taken meanwhile, that already has a match
    /// somewhere, or that the assignment left without a driver, is claimed
    /// on its own; an order that still gets none (none in reach, or a node
    /// that did not answer) is unmatched.
    async fn batch_across(
        &self,
        cluster: &Cluster,
        orders: Vec<BatchOrder>,
        candidates: usize,
    ) -> ApiResult<BatchOut> {
        if !(1..=100).contains(&candidates) {
            return Err(ApiError::invalid_parameter(format!(
                "candidates {candidates} is not in 1..=100"
            )));
        }
        let mut seen = HashSet::with_capacity(orders.len());
        for o in &orders {
            o.request.validate()?;
            if !seen.insert(&o.order_id) {
                return Err(ApiError::invalid_parameter(format!(
                    "order {} appears twice in the batch",
                    o.order_id
                )));
            }
        }
        // Orders that have a match somewhere are claimed on their own
        // (their holder answers with it), and take no candidates from the
        // others. Where Redis cannot say, the single claim is the safe way.
        let has_match: Vec<_> = orders
            .iter()
            .map(|o| async move {
                self.engine
                    .get_match(&o.order_id)
                    .is_some_and(|m| m.state.is_live())
                    || !matches!(cluster.order_region(o.order_id.as_str()).await, Ok(None))
            })
            .collect();
        let has_match: Vec<bool> = futures_util::stream::iter(has_match)
            .buffered(BATCH_SEARCHES_AT_ONCE)
            .collect()
            .await;
        let (repeats, orders): (Vec<_>, Vec<_>) = orders
            .into_iter()
            .zip(has_match)
            .partition(|(_, held)| *held);
        let repeats: Vec<BatchOrder> = repeats.into_iter().map(|(o, _)| o).collect();
        let orders: Vec<BatchOrder> = orders.into_iter().map(|(o, _)| o).collect();
        // Every other order's candidates, a bounded number of searches at once.
        let searches: Vec<_> = orders
            .iter()
            .map(|o| async move {
                let q = o.request.query(candidates)?;
                self.gather_held(cluster, &q).await.map(|(found, _)| found)
            })
            .collect();
        let found: Vec<ApiResult<Vec<(Neighbor, String)>>> = futures_util::stream::iter(searches)
            .buffered(BATCH_SEARCHES_AT_ONCE)
            .collect()
            .await;
        // Drivers are the columns; the cost is the pickup distance in mm.
        let mut columns: HashMap<DriverId, usize> = HashMap::new();
        let mut holders: Vec<(DriverId, String)> = Vec::new();
        let rows: Vec<Vec<(usize, i64)>> = found
            .into_iter()
            .map(|r| {
                r.unwrap_or_default()
                    .into_iter()
                    .map(|(n, holder)| {
                        let col = *columns.entry(n.id.clone()).or_insert_with(|| {
                            holders.push((n.id.clone(), holder));
                            holders.len() - 1
                        });
                        (col, (n.distance_m * 1000.0).round() as i64)
                    })
                    .collect()
            })
            .collect();
        let chosen = hexmatch::assign_min_cost(holders.len(), &rows).pairs;
        let reservations: Vec<_> = orders
            .iter()
            .zip(chosen)
            .map(|(order, col)| (order, col.map(|c| &holders[c])))
            .chain(repeats.iter().map(|order| (order, None)))
            .map(|(order, chosen)| async move {
                (order, self.serve_batch_order(cluster, order, chosen).await)
            })
            .collect();
        let done: Vec<(&BatchOrder, ApiResult<Claimed>)> = futures_util::stream::iter(reservations)
            .buffered(BATCH_SEARCHES_AT_ONCE)
            .collect()
            .await;
        let mut out = BatchOut {
            matches: Vec::new(),
            unmatched: Vec::new(),
        };
        for (order, reserved) in done {
            match reserved {
                Ok(c) => out.matches.push(c.m),
                Err(e) => {
                    if e.code() != ErrorCode::NoDriverAvailable {
                        tracing::warn!(order = %order.order_id, error = %e, "batch order not matched");
                    }
                    out.unmatched.push(order.order_id.to_string());
                }
            }
        }
        counter!("hexmatch_matches_total", "result" => "batch").increment(out.matches.len() as u64);
        Ok(out)
    }

    /// One order of a cluster batch: its chosen driver reserved on the
    /// node that holds it; the order claimed on its own when it has no
    /// driver chosen (none left to it, or it has a match already) or its
    /// driver was taken meanwhile.
    async fn serve_batch_order(
        &self,
        cluster: &Cluster,
        order: &BatchOrder,
        chosen: Option<&(DriverId, String)>,
    ) -> ApiResult<Claimed> {
        if let Some((driver, holder)) = chosen {
            match self.reserve_on(cluster, order, driver, holder).await {
                Err(e) if e.code() != ErrorCode::Unavailable => {}
                other => return other,
            }
        }
        self.claim_across(cluster, order).await
    }

    /// Reserves `driver` for `order` on `holder` (this node or another),
    /// under the order's lock there.
    async fn reserve_on(
        &self,
        cluster: &Cluster,
        order: &BatchOrder,
        driver: &DriverId,
        holder: &str,
    ) -> ApiResult<Claimed> {
        if holder == cluster.node() {
            let _serial = self.lock_order(&order.order_id).await?;
            return self.claim_here(order, Some(driver)).await;
        }
        let url = cluster.map().nodes.get(holder).cloned().ok_or_else(|| {
            ApiError::new(ErrorCode::NotOwner, format!("node {holder} left the map"))
        })?;
        let ask = ReserveRequest {
            driver_id: Some(driver.clone()),
            order: PeerOrder::from(order),
        };
        let r = cluster.peer().reserve(&url, &ask).await?;
        Ok(Claimed {
            m: r.m,
            created: r.created,
            by: Some(holder.to_owned()),
        })
    }

    /// Durable before the response: writes a batch's new matches in one
    /// round trip (a single node's batch); if Redis refuses, releases them
    /// and says so.
    async fn write_batch(
        &self,
        p: &Persistence,
        matches: &[hexmatch::Match],
        was_live: &HashSet<OrderId>,
    ) -> ApiResult<()> {
        let fresh: Vec<&OrderId> = matches
            .iter()
            .map(|m| &m.order_id)
            .filter(|o| !was_live.contains(*o))
            .collect();
        let records: Vec<_> = fresh
            .iter()
            .filter_map(|o| self.engine.durable_match(o))
            .collect();
        if let Err(e) = p.put_matches(&records).await {
            for o in fresh {
                let _ = self.engine.release(o, Some("persistence_failed"));
            }
            // Some records may have been written: the resync rewrites a
            // single node's hash to what the engine holds.
            p.schedule_resync();
            return Err(unavailable(&e));
        }
        Ok(())
    }
}
