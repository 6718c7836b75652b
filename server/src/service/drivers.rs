//! Drivers and locations: upserts, moves, batches (HTTP, WebSocket, Redis
//! stream, other nodes), removal, and the handoff of drivers that cross
//! into a region another node owns.
//!
//! # Handoff
//! A node that receives an update for a driver it does not know asks
//! every other node to hand the driver over first. A node that holds it
//! returns it and stops offering it. A driver in a match stays with the
//! node of its match, wherever it goes, until the match ends: its updates
//! are sent there, never applied to a copy. The update applies only once
//! every node that could hold the driver has answered; a node that does
//! not answer counts only while it still holds a lease. Until then the
//! update is refused with `unavailable`, logged and counted
//! (`hexmatch_handoff_failures_total`), so a driver is never offered by
//! two nodes.

use std::collections::HashMap;
use std::sync::Arc;

use hexmatch::{Applied, Driver, DriverId, DriverUpdate, Engine, OrderId};
use metrics::counter;

use super::journal::Before;
use super::{Scope, Service};
use crate::cluster::{Cluster, Owner};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::persist::journal::Change;
use crate::persist::{DeadLetter, Persistence, StreamEntry};
use crate::wire::{
    BatchTally, DriverOut, DriverPut, DriverPutOut, DriverStatusChange, HandoffAnswer,
    HandoffRequest, LocationIn, LocationItem, LocationOut, NotApplied, PeerUpdate, PeerUpdates,
};

/// How much earlier than the peer timeout a handoff's deadline falls.
const HANDOFF_MARGIN_MS: i64 = 1_000;

/// Batches up to this many updates apply on the calling task; larger
/// ones on a blocking thread.
const INLINE_UPDATES: usize = 64;

/// Counts one applied or stale update.
fn count_update(applied: &Applied) {
    let result = match applied {
        Applied::Applied(_) => "applied",
        Applied::Stale { .. } => "stale",
    };
    counter!("hexmatch_location_updates_total", "result" => result).increment(1);
}

/// What applying updates did beyond the drivers themselves: the orders
/// whose match a driver's status ended (their durable records must go),
/// and, for events, the status changes and the moves.
#[derive(Debug, Default)]
pub(super) struct Effects {
    /// Orders whose match a status ended.
    pub(super) ended: Vec<OrderId>,
    /// Status changes of known drivers (`None`: events are off).
    pub(super) statuses: Option<Vec<DriverStatusChange>>,
    /// Drivers as each applied update left them (`None`: no zones).
    pub(super) moved: Option<Vec<Driver>>,
}

impl Effects {
    /// Effects that record what `svc`'s events need.
    pub(super) fn for_service(svc: &Service) -> Self {
        Self {
            ended: Vec::new(),
            statuses: svc.events.is_on().then(Vec::new),
            moved: svc.zones.is_some().then(Vec::new),
        }
    }
}

/// Validates and applies one update with its count: the same rules for a
/// batch, the WebSocket and the Redis stream.
///
/// A status that ends the driver's match (offline or busy while reserved)
/// adds the order to `out.ended`: its durable record must go too.
fn apply_one(
    engine: &Engine,
    update: ApiResult<DriverUpdate>,
    out: &mut Effects,
) -> ApiResult<Applied> {
    // Only a status can end a match or change a status: a plain move
    // reads nothing first.
    let was = update
        .as_ref()
        .ok()
        .filter(|u| u.status.is_some())
        .and_then(|u| engine.driver(&u.id));
    let outcome = update.and_then(|u| engine.upsert(&u).map_err(ApiError::from));
    if let Some(order) = was.as_ref().and_then(|d| d.order_id.clone())
        && engine.get_match(&order).is_none_or(|m| !m.state.is_live())
    {
        out.ended.push(order);
    }
    match &outcome {
        Ok(applied) => {
            count_update(applied);
            if let Applied::Applied(d) = applied {
                if let (Some(statuses), Some(was)) = (&mut out.statuses, &was)
                    && was.status != d.status
                {
                    statuses.push(DriverStatusChange {
                        driver_id: d.id.clone(),
                        previous: was.status,
                        status: d.status,
                        order_id: d.order_id.clone(),
                    });
                }
                if let Some(moved) = &mut out.moved {
                    moved.push(d.clone());
                }
            }
        }
        Err(_) => counter!("hexmatch_location_updates_total", "result" => "rejected").increment(1),
    }
    outcome
}

/// Tallies one item's outcome.
fn tally_one(tally: &mut BatchTally, index: usize, outcome: ApiResult<Applied>) {
    match outcome {
        Ok(Applied::Applied(_)) => tally.applied += 1,
        Ok(Applied::Stale { .. }) => tally.stale += 1,
        Err(e) => tally.reject(index, &e),
    }
}

/// Applies Redis stream entries (one field per API field, all strings;
/// `capabilities` comma-separated) on a single node, with the same
/// validation as HTTP. Returns every entry id (to acknowledge), the
/// invalid entries (for the dead-letter stream) and the orders whose
/// match a driver's status ended (their records go). Emits no events:
/// [`Service::stream_applier`] does.
pub fn apply_stream_entries(
    engine: &Engine,
    entries: Vec<StreamEntry>,
) -> crate::persist::Ingested {
    let mut out = Effects::default();
    let (ids, dead) = apply_entries(engine, entries, &mut out);
    (ids, dead, out.ended)
}

fn apply_entries(
    engine: &Engine,
    entries: Vec<StreamEntry>,
    out: &mut Effects,
) -> (Vec<String>, Vec<DeadLetter>) {
    let mut ids = Vec::with_capacity(entries.len());
    let mut dead = Vec::new();
    for (id, fields) in entries {
        let update = LocationItem::from_stream_fields(&fields).and_then(LocationItem::into_update);
        if let Err(e) = apply_one(engine, update, out) {
            dead.push(DeadLetter {
                id: id.clone(),
                fields,
                code: e.code(),
                message: e.message().to_owned(),
            });
        }
        ids.push(id);
    }
    (ids, dead)
}

impl Service {
    /// How a single node applies Redis stream entries: as
    /// [`apply_stream_entries`], emitting the events of what they did.
    pub fn stream_applier(
        self: &Arc<Self>,
    ) -> impl Fn(&Engine, Vec<StreamEntry>) -> crate::persist::Ingested + Send + Sync + 'static
    {
        let svc = Arc::clone(self);
        move |engine, entries| {
            let mut out = Effects::for_service(&svc);
            let (ids, dead) = apply_entries(engine, entries, &mut out);
            let ended = svc.publish_effects(&mut out);
            (ids, dead, ended)
        }
    }
}

impl Service {
    /// Creates or replaces a driver (`PUT /v1/drivers/{id}`).
    ///
    /// # Errors
    /// Invalid fields; `unavailable` when a handoff from another node failed.
    pub async fn put_driver(&self, id: DriverId, body: DriverPut) -> ApiResult<DriverPutOut> {
        let update = body.into_update(id.clone())?;
        if let Some(url) = self.adopt_one(&id).await? {
            let applied = self.send_to_holder(&url, &update).await?;
            let driver = self
                .cluster()
                .ok_or_else(|| ApiError::internal("a holder without a cluster"))?
                .peer()
                .driver(&url, &id)
                .await?
                .ok_or_else(|| {
                    ApiError::unavailable(format!("driver {id} changed hands meanwhile; retry"))
                })?;
            return Ok(DriverPutOut {
                driver,
                applied,
                reason: (!applied).then_some(NotApplied::Stale),
            });
        }
        // A status change may end the driver's match: keep Redis in step.
        let before = self.before([&id]);
        let mut out = Effects::for_service(self);
        let applied = apply_one(&self.engine, Ok(update), &mut out)?;
        let ended = self.publish_effects(&mut out);
        if let Some(p) = self.persist() {
            p.sync_orders(&self.engine, &ended).await;
        }
        if matches!(applied, Applied::Applied(_)) {
            self.journal(before).await?;
        }
        Ok(match applied {
            Applied::Applied(d) => DriverPutOut {
                driver: d.into(),
                applied: true,
                reason: None,
            },
            Applied::Stale { .. } => DriverPutOut {
                driver: self
                    .engine
                    .driver(&id)
                    .ok_or_else(|| ApiError::from(hexmatch::Error::UnknownDriver(id.to_string())))?
                    .into(),
                applied: false,
                reason: Some(NotApplied::Stale),
            },
        })
    }

    /// Moves a known driver (`POST /v1/drivers/{id}/location`).
    ///
    /// # Errors
    /// Invalid fields, `unknown_driver`; `unavailable` when a handoff failed.
    pub async fn post_location(&self, id: DriverId, body: LocationIn) -> ApiResult<LocationOut> {
        let u = body.into_update(id)?;
        if let Some(url) = self.adopt_one(&u.id).await? {
            let applied = self.send_to_holder(&url, &u).await?;
            return Ok(LocationOut {
                applied,
                reason: (!applied).then_some(NotApplied::Stale),
            });
        }
        let before = self.before([&u.id]);
        let applied = self.engine.update_location(&u.id, u.pos, u.ts)?;
        count_update(&applied);
        if let Applied::Applied(d) = &applied {
            self.track_zones(d);
        }
        if matches!(applied, Applied::Applied(_)) {
            self.journal(before).await?;
        }
        Ok(match applied {
            Applied::Applied(_) => LocationOut {
                applied: true,
                reason: None,
            },
            Applied::Stale { .. } => LocationOut {
                applied: false,
                reason: Some(NotApplied::Stale),
            },
        })
    }

    /// A driver, from this node or (with [`Scope::Cluster`]) any node.
    ///
    /// # Errors
    /// `unknown_driver`.
    pub async fn driver(&self, id: &DriverId, scope: Scope) -> ApiResult<DriverOut> {
        if let Some(d) = self.engine.driver(id) {
            return Ok(d.into());
        }
        if let (Some(cluster), Scope::Cluster) = (self.cluster(), scope) {
            let answers = cluster
                .ask_every_peer(|peer, url| async move { peer.driver(&url, id).await })
                .await;
            if let Some(d) = answers.into_iter().find_map(|(_, a)| a.ok().flatten()) {
                return Ok(d);
            }
        }
        Err(hexmatch::Error::UnknownDriver(id.to_string()).into())
    }

    /// Removes a driver; an active match is released.
    ///
    /// # Errors
    /// `unknown_driver`.
    pub async fn remove_driver(&self, id: &DriverId, scope: Scope) -> ApiResult<()> {
        let before = self.before([id]);
        if let Some((gone, event)) = self.engine.remove(id) {
            self.forget_zones(&gone);
            if let Some(ev) = event {
                counter!("hexmatch_match_ends_total", "state" => "released").increment(1);
                self.emit_match(&ev.m);
                if let Some(p) = self.persist() {
                    p.sync_order(&self.engine, &ev.m.order_id).await;
                }
            }
            return self.journal(before).await;
        }
        if let (Some(cluster), Scope::Cluster) = (self.cluster(), scope) {
            let answers = cluster
                .ask_every_peer(|peer, url| async move { peer.remove_driver(&url, id).await })
                .await;
            if answers.iter().any(|(_, a)| matches!(a, Ok(true))) {
                return Ok(());
            }
        }
        Err(hexmatch::Error::UnknownDriver(id.to_string()).into())
    }

    /// Applies a batch of update items (`POST /v1/locations`, the
    /// WebSocket, the Redis stream). On a cluster node, items of regions
    /// other nodes own go to their owners, one call per owner, and drivers
    /// new here are handed over first. Rejected items come back sorted by
    /// index.
    ///
    /// # Errors
    /// Only when the apply task itself fails (a bug).
    pub async fn apply_items(&self, items: Vec<ApiResult<LocationItem>>) -> ApiResult<BatchTally> {
        let updates = items
            .into_iter()
            .map(|item| item.and_then(LocationItem::into_update))
            .collect();
        self.apply_updates(updates, Scope::Cluster).await
    }

    /// Applies updates another node sent: only those of regions this node
    /// owns; the rest are rejected `not_owner` (never forwarded again).
    ///
    /// # Errors
    /// As [`Service::apply_items`].
    pub async fn apply_peer_updates(&self, body: PeerUpdates) -> ApiResult<BatchTally> {
        let updates = body
            .updates
            .into_iter()
            .map(PeerUpdate::into_update)
            .collect();
        self.apply_updates(updates, Scope::Local).await
    }

    async fn apply_updates(
        &self,
        updates: Vec<ApiResult<DriverUpdate>>,
        scope: Scope,
    ) -> ApiResult<BatchTally> {
        let (mut local, tally) = match self.cluster() {
            None => (
                updates.into_iter().enumerate().collect(),
                BatchTally::default(),
            ),
            Some(cluster) => self.split_by_owner(cluster, updates, scope).await,
        };
        let mut tally = tally;
        if let Some(cluster) = self.cluster() {
            let ids: Vec<DriverId> = local
                .iter()
                .filter_map(|(_, u)| u.as_ref().ok().map(|u| u.id.clone()))
                .collect();
            let adopted = self.adopt(cluster, &ids).await;
            if let Some(e) = adopted.failed {
                for (_, u) in &mut local {
                    if u.as_ref().is_ok_and(|u| e.ids.contains(&u.id)) {
                        *u = Err(e.error.clone());
                    }
                }
            }
            // Drivers another node holds in a match: their updates go there.
            let mut remote: HashMap<String, (Vec<usize>, Vec<PeerUpdate>)> = HashMap::new();
            local.retain(|(i, u)| {
                let Some(url) = u.as_ref().ok().and_then(|u| adopted.held.get(&u.id)) else {
                    return true;
                };
                let e = remote.entry(url.clone()).or_default();
                e.0.push(*i);
                e.1.extend(u.as_ref().ok().map(PeerUpdate::from));
                false
            });
            send_to_peers(cluster, remote, &mut tally).await;
        }
        let n_local = local.len();
        let before = self.before(
            local
                .iter()
                .filter_map(|(_, u)| u.as_ref().ok().map(|u| &u.id)),
        );
        let journalled = !before.drivers.is_empty();
        let mut out = Effects::for_service(self);
        let apply = move |engine: &Engine, mut tally: BatchTally| {
            let mut applied = Vec::new();
            for (i, update) in local {
                let id = journalled
                    .then(|| update.as_ref().ok().map(|u| u.id.clone()))
                    .flatten();
                let outcome = apply_one(engine, update, &mut out);
                if let (Some(id), Ok(Applied::Applied(_))) = (id, &outcome) {
                    applied.push((i, id));
                }
                tally_one(&mut tally, i, outcome);
            }
            (tally, applied, out)
        };
        // A few updates take microseconds: no thread hop for them (a
        // WebSocket frame is one update).
        let (mut tally, applied, mut out) = if n_local <= INLINE_UPDATES {
            apply(&self.engine, tally)
        } else {
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || apply(&engine, tally))
                .await
                .map_err(|e| ApiError::internal(format!("batch task failed: {e}")))?
        };
        let ended = self.publish_effects(&mut out);
        // Matches a driver's status ended: their records go, as after a
        // `PUT /v1/drivers/{id}`.
        if let Some(p) = self.persist() {
            p.sync_orders(&self.engine, &ended).await;
        }
        let done: std::collections::HashSet<&DriverId> = applied.iter().map(|(_, id)| id).collect();
        let before = Before {
            drivers: before
                .drivers
                .into_iter()
                .filter(|(id, _)| done.contains(id))
                .collect(),
            since: before.since,
        };
        if let Err(e) = self.journal(before).await {
            // Applied here but not durable: not acknowledged either.
            for (i, _) in &applied {
                tally.applied -= 1;
                tally.reject(*i, &e);
            }
        }
        tally.rejected.sort_by_key(|r| r.index);
        Ok(tally)
    }

    /// Splits updates by region owner: returns those to apply here (with
    /// their index), and the tally of the rest, sent to their owners in one
    /// call per owner (or rejected: `not_owner` for a node's batch,
    /// `unavailable` when the owner is unknown or did not answer).
    async fn split_by_owner(
        &self,
        cluster: &Cluster,
        updates: Vec<ApiResult<DriverUpdate>>,
        scope: Scope,
    ) -> (Vec<(usize, ApiResult<DriverUpdate>)>, BatchTally) {
        let mut local = Vec::new();
        let mut remote: HashMap<String, (Vec<usize>, Vec<PeerUpdate>)> = HashMap::new();
        let mut tally = BatchTally::default();
        for (i, update) in updates.into_iter().enumerate() {
            let u = match update {
                Ok(u) => u,
                Err(e) => {
                    local.push((i, Err(e)));
                    continue;
                }
            };
            // The node holding a driver in a match keeps it, wherever it
            // goes, until the match ends.
            if self
                .engine
                .driver(&u.id)
                .is_some_and(|d| d.order_id.is_some())
            {
                local.push((i, Ok(u)));
                continue;
            }
            let Ok(region) = cluster.region_of(u.pos) else {
                // The engine gives the precise error.
                local.push((i, Ok(u)));
                continue;
            };
            let region = region.to_string();
            match cluster
                .resolve_owner(&region, &self.engine, self.persist().map(AsRef::as_ref))
                .await
            {
                Owner::Local => local.push((i, Ok(u))),
                _ if scope == Scope::Local => tally.reject(
                    i,
                    &ApiError::new(
                        ErrorCode::NotOwner,
                        format!("node {} does not own region {region}", cluster.node()),
                    ),
                ),
                Owner::Nobody => tally.reject(
                    i,
                    &ApiError::unavailable(format!("region {region} has no live owner now; retry")),
                ),
                Owner::Remote { url, .. } => {
                    let e = remote.entry(url).or_default();
                    e.0.push(i);
                    e.1.push(PeerUpdate::from(&u));
                }
            }
        }
        send_to_peers(cluster, remote, &mut tally).await;
        (local, tally)
    }

    /// Cluster mode: applies Redis stream entries like a batch (split by
    /// region owner), then acknowledges them all and dead-letters the
    /// invalid ones.
    pub async fn ingest_cluster_entries(&self, p: &Persistence, entries: Vec<StreamEntry>) {
        let items = entries
            .iter()
            .map(|(_, fields)| LocationItem::from_stream_fields(fields))
            .collect();
        let n = entries.len();
        let tally = match self.apply_items(items).await {
            Ok(t) => t,
            Err(e) => {
                // Not acknowledged: the entries are re-delivered later.
                tracing::warn!(error = %e, "stream batch failed");
                return;
            }
        };
        // An entry refused for now (no live owner, an owner that did not
        // answer, a journal that could not take it) stays pending: it is
        // delivered again, never dead-lettered.
        let (retry, invalid): (Vec<_>, Vec<_>) = tally
            .rejected
            .into_iter()
            .partition(|r| r.error.code == ErrorCode::Unavailable);
        let dead: Vec<DeadLetter> = invalid
            .into_iter()
            .filter_map(|r| {
                let (id, fields) = entries.get(r.index)?;
                Some(DeadLetter {
                    id: id.clone(),
                    fields: fields.clone(),
                    code: r.error.code,
                    message: r.error.message,
                })
            })
            .collect();
        let retry: std::collections::HashSet<usize> = retry.iter().map(|r| r.index).collect();
        let ids: Vec<String> = entries
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !retry.contains(i))
            .map(|(_, (id, _))| id)
            .collect();
        p.ack_in_background(&ids, dead);
        counter!("hexmatch_stream_entries_total").increment(n as u64);
    }

    /// [`Service::adopt`] for one driver, as an error for the request.
    /// Returns the URL of the node that holds the driver in a match (its
    /// update goes there), if one does.
    async fn adopt_one(&self, id: &DriverId) -> ApiResult<Option<String>> {
        let Some(cluster) = self.cluster() else {
            return Ok(None);
        };
        let mut adopted = self.adopt(cluster, std::slice::from_ref(id)).await;
        match adopted.failed {
            None => Ok(adopted.held.remove(id)),
            Some(failed) => Err(failed.error),
        }
    }

    /// Sends one update to the node that holds its driver in a match.
    /// Returns whether it applied (`false`: stale).
    async fn send_to_holder(&self, url: &str, u: &DriverUpdate) -> ApiResult<bool> {
        let cluster = self
            .cluster()
            .ok_or_else(|| ApiError::internal("a holder without a cluster"))?;
        let tally = cluster
            .peer()
            .locations(
                url,
                &PeerUpdates {
                    updates: vec![PeerUpdate::from(u)],
                },
            )
            .await?;
        if let Some(r) = tally.rejected.into_iter().next() {
            return Err(ApiError::from(r.error));
        }
        Ok(tally.applied == 1)
    }

    /// Before this node applies updates of drivers it does not know, asks
    /// every other node for them: they hand over what they hold (and stop
    /// offering it), and the driver is recreated here with its vehicle,
    /// capabilities and status before the update applies. A driver another
    /// node holds in a match stays there: its update goes to that node.
    /// Returns those, and the drivers whose handoff could not be confirmed
    /// (see the module doc).
    async fn adopt(&self, cluster: &Cluster, ids: &[DriverId]) -> Adopted {
        let mut out = Adopted::default();
        let unknown: Vec<DriverId> = ids
            .iter()
            .filter(|id| self.engine.driver(id).is_none())
            .cloned()
            .collect();
        if unknown.is_empty() {
            return out;
        }
        // Short of the peer timeout, so the answering node never hands a
        // driver over after this node gave up waiting (clocks within that
        // margin of each other).
        let budget = crate::cluster::PEER_TIMEOUT.as_millis() as i64 - HANDOFF_MARGIN_MS;
        let ask = HandoffRequest {
            driver_ids: unknown.iter().map(ToString::to_string).collect(),
            deadline_ms: Some(self.engine.clock().now().as_millis() + budget),
        };
        let ask = &ask;
        let answers = cluster
            .ask_every_peer(|peer, url| async move { peer.handoff(&url, ask).await })
            .await;
        let mut found: HashMap<DriverId, DriverOut> = HashMap::new();
        let mut silent = Vec::new();
        let mut unreachable = Vec::new();
        for (node, answer) in answers {
            match answer {
                Ok(HandoffAnswer { drivers }) => {
                    for d in drivers {
                        if d.order_id.is_some() {
                            // Kept by its match's node, which gets its updates.
                            if let Some(url) = cluster.map().nodes.get(&node) {
                                out.held.insert(d.driver_id.clone(), url.clone());
                            } else {
                                unreachable.push(d.driver_id.clone());
                            }
                            continue;
                        }
                        let newer = found.get(&d.driver_id).is_none_or(|x| d.ts > x.ts);
                        if newer {
                            found.insert(d.driver_id.clone(), d);
                        }
                    }
                }
                Err(e) => silent.push((node, e)),
            }
        }
        if !unreachable.is_empty() {
            out.failed = Some(HandoffFailed {
                error: ApiError::unavailable(
                    "the driver is held in a match by a node that left the map; retry",
                ),
                ids: unreachable,
            });
            return out;
        }
        for d in found
            .values()
            .filter(|d| !out.held.contains_key(&d.driver_id))
        {
            match d.handed_over() {
                Ok(u) if self.engine.driver(&u.id).is_none() => {
                    tracing::debug!(driver_id = %u.id, "driver handed over to this node");
                    let _ = self.engine.upsert(&u);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(driver_id = %d.driver_id, error = %e, "handed-over driver is invalid");
                }
            }
        }
        // A node that did not answer may still offer the drivers, unless
        // it holds no lease any more (then nobody is served from its memory).
        let mut blocking = Vec::new();
        for (node, e) in silent {
            if cluster.holds_any_lease(&node).await.unwrap_or(true) {
                blocking.push((node, e));
            }
        }
        if blocking.is_empty() {
            return out;
        }
        let ids: Vec<DriverId> = unknown
            .into_iter()
            .filter(|id| !found.contains_key(id) && !out.held.contains_key(id))
            .collect();
        if ids.is_empty() {
            return out;
        }
        let nodes: Vec<&str> = blocking.iter().map(|(n, _)| n.as_str()).collect();
        for (node, e) in &blocking {
            tracing::warn!(node = %node, drivers = ids.len(), error = %e, "driver handoff failed; their updates are refused until it succeeds");
        }
        counter!("hexmatch_handoff_failures_total").increment(ids.len() as u64);
        out.failed = Some(HandoffFailed {
            error: ApiError::unavailable(format!(
                "the driver may still be offered by node(s) {}, which did not answer the handoff; retry",
                nodes.join(", ")
            )),
            ids,
        });
        out
    }

    /// Hands over the drivers another node asks for: returns them and
    /// removes those not in a match (a matched driver stays, held, until
    /// its match ends). The departures are journalled before anything is
    /// removed or answered, so no taker of their region brings them back;
    /// a driver a claim reserved meanwhile stays, and is answered as held.
    ///
    /// # Errors
    /// `unavailable` when the departures could not be journalled; nothing
    /// is handed over then, and the asker keeps refusing the update.
    pub async fn hand_over(&self, ask: &HandoffRequest) -> ApiResult<HandoffAnswer> {
        let mut out = HandoffAnswer::default();
        if let Some(deadline) = ask.deadline_ms
            && self.engine.clock().now().as_millis() > deadline
        {
            // The asker has given up: handing over now would lose the drivers.
            tracing::warn!(
                drivers = ask.driver_ids.len(),
                "handoff request read after its deadline; nothing handed over"
            );
            return Ok(out);
        }
        let asked: Vec<DriverId> = ask
            .driver_ids
            .iter()
            .filter_map(|id| DriverId::new(id).ok())
            .collect();
        // Held until the drivers are gone: a change of one of them now
        // journals after their departure, and finds them gone.
        let _locked = self
            .driver_locks
            .lock_all(asked.iter().map(DriverId::as_str))
            .await;
        let mut leaving = Vec::new();
        for id in asked {
            let Some(d) = self.engine.driver(&id) else {
                continue;
            };
            if d.order_id.is_none() {
                leaving.push(id);
            }
            out.drivers.push(d.into());
        }
        let before = self.before(&leaving);
        let departures = before
            .drivers
            .into_iter()
            .filter_map(|(id, region)| Some((region?, Change::Gone(id))))
            .collect();
        if let Some(p) = self.persist() {
            p.journal_durably(departures, before.since)
                .await
                .map_err(|e| {
                    ApiError::unavailable(format!("the handoff could not be journalled: {e}"))
                })?;
        }
        // A claim may have reserved a driver while its departure was
        // journalled: that driver stays with its match (a removal would end
        // an acknowledged match), and the asker is told it is held.
        for id in &leaving {
            if let Some(gone) = self.engine.remove_unmatched(id) {
                self.forget_zones(&gone);
                tracing::debug!(driver_id = %id, "driver handed over to another node");
            } else if let Some(d) = self.engine.driver(id)
                && let Some(entry) = out.drivers.iter_mut().find(|x| x.driver_id == *id)
            {
                *entry = d.into();
            }
        }
        Ok(out)
    }
}

/// What a handoff found.
#[derive(Default)]
struct Adopted {
    /// Drivers whose handoff could not be confirmed.
    failed: Option<HandoffFailed>,
    /// Drivers another node holds in a match, with its URL.
    held: HashMap<DriverId, String>,
}

/// Sends updates to other nodes, one call per node (`url` → the items'
/// indices and updates), and counts their answers into `tally` (a node
/// that did not answer: its items are rejected `unavailable`).
async fn send_to_peers(
    cluster: &Cluster,
    remote: HashMap<String, (Vec<usize>, Vec<PeerUpdate>)>,
    tally: &mut BatchTally,
) {
    let peer = cluster.peer();
    let calls = remote
        .into_iter()
        .map(|(url, (indices, updates))| async move {
            let answer = peer.locations(&url, &PeerUpdates { updates }).await;
            (url, indices, answer)
        });
    for (url, indices, answer) in futures_util::future::join_all(calls).await {
        match answer {
            Ok(answer) => {
                tally.applied += answer.applied;
                tally.stale += answer.stale;
                for r in answer.rejected {
                    if let Some(&i) = indices.get(r.index) {
                        tally.reject(i, &ApiError::from(r.error));
                    }
                }
            }
            Err(e) => {
                let e = ApiError::unavailable(format!("the node at {url} did not answer: {e}"));
                for i in indices {
                    tally.reject(i, &e);
                }
            }
        }
    }
}

/// Drivers whose handoff could not be confirmed, and the error their
/// updates get.
struct HandoffFailed {
    ids: Vec<DriverId>,
    error: ApiError,
}
