//! Requests between nodes: forwarding to a region's owner, the exact
//! nearest search across regions, claims that reserve on the owner of the
//! chosen driver, and driver handoff when a driver crosses into a region
//! another node owns.
//!
//! Every response of a cluster node says who answered in
//! `x-hexmatch-served-by` (several ids, comma-separated, when a search
//! merged answers). A forwarded request carries `x-hexmatch-forwarded`
//! (the sender's map version) and is never forwarded again: a node that
//! does not own the region any more answers 421 `not_owner`, and the
//! sender re-reads the map and tries once more.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hexmatch::{
    Capabilities, DriverId, DriverUpdate, NearestQuery, OrderId, Position, Status, Timestamp,
    Vehicle,
};
use serde::{Deserialize, Serialize};

use super::{Cluster, Owner};
use crate::api::{ApiError, AppState};

/// Response header naming the node(s) that answered.
pub const SERVED_BY: &str = "x-hexmatch-served-by";
/// Request header of a request sent by another node.
pub const FORWARDED: &str = "x-hexmatch-forwarded";
/// Request header asking for this node's own answer only (`local`).
pub const SCOPE: &str = "x-hexmatch-scope";

/// Candidates gathered for a claim across nodes.
const CLAIM_CANDIDATES: usize = 8;
/// Gathers tried before a claim gives up.
const CLAIM_ROUNDS: usize = 3;

/// Whether the request asks for this node's own answer only.
pub(crate) fn scope_local(headers: &HeaderMap) -> bool {
    headers.get(SCOPE).is_some_and(|v| v.as_bytes() == b"local")
}

fn served_by(mut resp: Response, node: &str) -> Response {
    if !resp.headers().contains_key(SERVED_BY)
        && let Ok(v) = HeaderValue::from_str(node)
    {
        resp.headers_mut().insert(SERVED_BY, v);
    }
    resp
}

/// What the router needs to know about a request to route it.
enum Kind {
    /// Carries a position (`lat`/`lon`, or `pickup`): goes to its region's owner.
    Position,
    /// Names an order: goes to the owner of the order's match.
    Order(String),
    /// Served here.
    Here,
}

fn classify(method: &Method, path: &str) -> Kind {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::PUT, ["v1", "drivers", _])
        | (&Method::POST, ["v1", "drivers", _, "location"] | ["v1", "matches"]) => Kind::Position,
        (&Method::GET, ["v1", "matches", order])
        | (&Method::POST, ["v1", "matches", order, "confirm" | "release" | "complete"]) => {
            Kind::Order((*order).to_owned())
        }
        _ => Kind::Here,
    }
}

/// The position a body names, if it parses: `lat`/`lon` at the top, or
/// `pickup.lat`/`pickup.lon`. Anything else is left to the handler, which
/// gives the precise error.
fn position_in(bytes: &[u8]) -> Option<Position> {
    #[derive(Deserialize)]
    struct LatLon {
        lat: f64,
        lon: f64,
    }
    #[derive(Deserialize)]
    struct Probe {
        lat: Option<f64>,
        lon: Option<f64>,
        pickup: Option<LatLon>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    let ((Some(lat), Some(lon), _) | (_, _, Some(LatLon { lat, lon }))) = (p.lat, p.lon, p.pickup)
    else {
        return None;
    };
    Position::new(lat, lon).ok()
}

/// The routing step of every `/v1` request (run by the API's gate
/// middleware): serves here what this node owns, forwards the rest to the
/// owner.
pub(crate) async fn route(state: &AppState, req: Request, next: Next) -> Response {
    let Some(cluster) = state.cluster.get().cloned() else {
        return next.run(req).await;
    };
    let node = cluster.node().to_owned();
    let forwarded = req.headers().contains_key(FORWARDED);
    let region = match classify(req.method(), req.uri().path()) {
        Kind::Here => None,
        Kind::Position => {
            let (parts, bytes) = match buffered(state, req).await {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            let region = position_in(&bytes)
                .and_then(|p| cluster.region_of(p).ok())
                .map(|r| r.to_string());
            let req = Request::from_parts(parts, Body::from(bytes));
            return match region {
                Some(region) => dispatch(state, &cluster, &region, req, forwarded, next).await,
                None => served_by(next.run(req).await, &node),
            };
        }
        Kind::Order(order) => order_region(state, &cluster, &order).await,
    };
    match region {
        Some(region) => dispatch(state, &cluster, &region, req, forwarded, next).await,
        None => served_by(next.run(req).await, &node),
    }
}

/// The request's head and its whole body, within the body limit.
async fn buffered(
    state: &AppState,
    req: Request,
) -> Result<(axum::http::request::Parts, Bytes), Response> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, state.config.body_limit_bytes).await {
        Ok(bytes) => Ok((parts, bytes)),
        Err(_) => Err(ApiError::new("payload_too_large", "request body too large").into_response()),
    }
}

/// The region of an order held by another node, from Redis; `None` when
/// this node holds it or nobody does (then the handler answers).
async fn order_region(state: &AppState, cluster: &Cluster, order: &str) -> Option<String> {
    let id = OrderId::new(order).ok()?;
    if state.engine.get_match(&id).is_some() {
        return None;
    }
    cluster.order_region(order).await
}

/// Serves `req` here if this node owns `region`, else forwards it.
async fn dispatch(
    state: &AppState,
    cluster: &Arc<Cluster>,
    region: &str,
    req: Request,
    forwarded: bool,
    next: Next,
) -> Response {
    let node = cluster.node().to_owned();
    match resolve_owner(state, cluster, region).await {
        Owner::Local => served_by(next.run(req).await, &node),
        _ if forwarded => ApiError::new(
            "not_owner",
            format!("node {node} does not own region {region}"),
        )
        .into_response(),
        Owner::Nobody => no_owner(region),
        Owner::Remote { url, .. } => {
            let (parts, bytes) = match buffered(state, req).await {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", axum::http::uri::PathAndQuery::as_str);
            let first = forward(cluster, &url, &parts.method, path, &parts.headers, &bytes).await;
            match first {
                Ok(resp) if !is_not_owner(&resp) => resp,
                _ => {
                    // Stale map or a dead owner: re-read it and try once more.
                    let _ = cluster.refresh_map().await;
                    match cluster.owner(region) {
                        Owner::Local => {
                            let req = Request::from_parts(parts, Body::from(bytes));
                            served_by(next.run(req).await, &node)
                        }
                        Owner::Remote { url, .. } => {
                            forward(cluster, &url, &parts.method, path, &parts.headers, &bytes)
                                .await
                                .unwrap_or_else(IntoResponse::into_response)
                        }
                        Owner::Nobody => no_owner(region),
                    }
                }
            }
        }
    }
}

/// The owner of `region`; a region nobody has ever owned is taken by
/// this node on first use (if another node beat it to it, the re-read map
/// names that node).
async fn resolve_owner(state: &AppState, cluster: &Cluster, region: &str) -> Owner {
    let owner = cluster.owner(region);
    if owner != Owner::Nobody {
        return owner;
    }
    if let Some(p) = state.persist.get()
        && cluster.take_unowned(region, &state.engine, p).await
    {
        return Owner::Local;
    }
    cluster.owner(region)
}

fn no_owner(region: &str) -> Response {
    let mut resp = ApiError::new(
        "unavailable",
        format!("region {region} has no live owner now (a takeover is in progress); retry"),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

fn is_not_owner(resp: &Response) -> bool {
    resp.status() == StatusCode::MISDIRECTED_REQUEST
}

/// Sends a request to another node, copying what matters of the original
/// (auth, content type, request id), and returns its response as ours.
async fn forward(
    cluster: &Cluster,
    url: &str,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let mut rb = cluster
        .http()
        .request(method.clone(), format!("{url}{path}"))
        .header(FORWARDED, cluster.map().version)
        .body(body.clone());
    for name in [
        header::AUTHORIZATION,
        header::CONTENT_TYPE,
        header::ACCEPT,
        header::HeaderName::from_static("x-request-id"),
    ] {
        if let Some(v) = headers.get(&name) {
            rb = rb.header(name, v);
        }
    }
    if let Some(v) = headers.get(SCOPE) {
        rb = rb.header(SCOPE, v);
    }
    let resp = rb.send().await.map_err(|e| unreachable_node(url, &e))?;
    let status = resp.status();
    let mut out = Response::builder().status(status);
    for name in [
        header::CONTENT_TYPE,
        header::RETRY_AFTER,
        header::HeaderName::from_static(SERVED_BY),
    ] {
        if let Some(v) = resp.headers().get(&name) {
            out = out.header(name, v);
        }
    }
    let bytes = resp.bytes().await.map_err(|e| unreachable_node(url, &e))?;
    metrics::counter!("hexmatch_forwarded_total").increment(1);
    out.body(Body::from(bytes))
        .map_err(|e| ApiError::new("internal", e.to_string()))
}

fn unreachable_node(url: &str, e: &reqwest::Error) -> ApiError {
    ApiError::new("unavailable", format!("node at {url} did not answer: {e}"))
}

/// One driver of a nearest answer, as it travels between nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Near {
    /// Id.
    pub(crate) driver_id: String,
    /// Latitude.
    pub(crate) lat: f64,
    /// Longitude.
    pub(crate) lon: f64,
    /// Great-circle distance from the query point, metres.
    pub(crate) distance_m: f64,
    /// Vehicle class.
    pub(crate) vehicle: String,
    /// Last fix time (RFC 3339).
    pub(crate) ts: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct NearAnswer {
    drivers: Vec<Near>,
}

fn near_of(n: &hexmatch::Neighbor) -> Near {
    Near {
        driver_id: n.id.to_string(),
        lat: n.pos.lat(),
        lon: n.pos.lon(),
        distance_m: n.distance_m,
        vehicle: n.vehicle.as_str().to_owned(),
        ts: n.ts.to_string(),
    }
}

/// The query string of a nearest query, with `radius_m` set to `radius`.
fn nearest_query_string(q: &NearestQuery, radius: f64) -> String {
    let p = q.pos;
    let mut s = format!(
        "lat={}&lon={}&k={}&radius_m={radius}",
        p.lat(),
        p.lon(),
        q.k
    );
    if let Some(v) = q.vehicle {
        let _ = write!(s, "&vehicle={}", v.as_str());
    }
    let caps: Vec<&str> = q.capabilities.names().collect();
    if !caps.is_empty() {
        let _ = write!(s, "&capabilities={}", caps.join(","));
    }
    s
}

/// The exact k nearest across the cluster: this node's answer first, then
/// the owners of every region whose lower bound is within the k-th
/// distance found (or the radius), asked in parallel and merged by
/// (distance, id). Returns the merged drivers, each with the node that
/// holds it, and the nodes asked.
async fn gather(
    state: &AppState,
    cluster: &Cluster,
    q: &NearestQuery,
    headers: &HeaderMap,
) -> Result<(Vec<(Near, String)>, Vec<String>), ApiError> {
    let local = state.engine.nearest(q)?;
    let reach = q.radius_m.unwrap_or(state.config.max_radius_m);
    let bound = if local.len() == q.k {
        local.last().map_or(reach, |n| n.distance_m)
    } else {
        reach
    };
    let node = cluster.node().to_owned();
    let mut all: Vec<(Near, String)> = local
        .into_iter()
        .map(|n| (near_of(&n), node.clone()))
        .collect();
    let mut asked = vec![node];
    let remotes = cluster.remote_owners_within(q.pos, bound);
    if remotes.is_empty() {
        return Ok((all, asked));
    }
    // A driver exactly at the bound may still win its tie by id.
    let radius = (bound * (1.0 + 1e-12) + 1e-6).min(reach);
    let path = format!("/v1/drivers/nearest?{}", nearest_query_string(q, radius));
    let mut local_headers = headers.clone();
    local_headers.insert(SCOPE, HeaderValue::from_static("local"));
    let calls = remotes.iter().map(|(n, url)| {
        let (path, local_headers) = (&path, &local_headers);
        async move {
            let resp = forward(
                cluster,
                url,
                &Method::GET,
                path,
                local_headers,
                &Bytes::new(),
            )
            .await?;
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .map_err(|e| ApiError::new("unavailable", e.to_string()))?;
            if status != StatusCode::OK {
                return Err(ApiError::new(
                    "unavailable",
                    format!(
                        "node {n} answered {status} to a border search: {}",
                        String::from_utf8_lossy(&bytes)
                    ),
                ));
            }
            let answer: NearAnswer = serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::new("unavailable", format!("node {n}: {e}")))?;
            Ok::<_, ApiError>((n.clone(), answer.drivers))
        }
    });
    for r in futures_util::future::join_all(calls).await {
        let (n, drivers) = r?;
        all.extend(drivers.into_iter().map(|d| (d, n.clone())));
        asked.push(n);
    }
    // A driver handed off between nodes can briefly show on both: keep
    // the newer fix.
    all.sort_by(|a, b| {
        a.0.driver_id
            .cmp(&b.0.driver_id)
            .then_with(|| b.0.ts.cmp(&a.0.ts))
    });
    all.dedup_by(|later, first| later.0.driver_id == first.0.driver_id);
    all.sort_by(|a, b| {
        a.0.distance_m
            .total_cmp(&b.0.distance_m)
            .then_with(|| a.0.driver_id.cmp(&b.0.driver_id))
    });
    all.truncate(q.k);
    Ok((all, asked))
}

/// `GET /v1/drivers/nearest` on a cluster node: the exact answer over
/// every region the search reaches.
pub(crate) async fn nearest(
    state: &AppState,
    cluster: &Cluster,
    q: &NearestQuery,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (found, asked) = gather(state, cluster, q, headers).await?;
    let body = NearAnswer {
        drivers: found.into_iter().map(|(n, _)| n).collect(),
    };
    let mut resp = axum::Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&asked.join(",")) {
        resp.headers_mut().insert(SERVED_BY, v);
    }
    Ok(resp)
}

/// Body of `POST /v1/cluster/reserve`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReserveIn {
    /// The driver to reserve (chosen by the asking node's search).
    pub(crate) driver_id: String,
    /// The order, as in `POST /v1/matches`.
    #[schema(value_type = Object)]
    pub(crate) order: serde_json::Value,
}

/// `POST /v1/matches` on the node that owns the pickup: searches the
/// cluster, then reserves the nearest candidate on the node that holds
/// it, trying the next when one was taken meanwhile.
pub(crate) async fn claim(
    state: &AppState,
    cluster: &Cluster,
    body: serde_json::Value,
    order: &hexmatch::BatchOrder,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let node = cluster.node().to_owned();
    let req = &order.request;
    let mut q = NearestQuery::new(req.pickup, CLAIM_CANDIDATES)?;
    q.radius_m = req.radius_m;
    q.vehicle = req.vehicle;
    q.capabilities = req.capabilities;
    let persist = state.durable()?;
    let _serial = match persist {
        Some(p) => Some(p.lock_order(&order.order_id).await),
        None => None,
    };
    // Idempotent by order id across nodes: an order held elsewhere is
    // answered by its holder.
    if state.engine.get_match(&order.order_id).is_none()
        && let Some(region) = cluster.order_region(order.order_id.as_str()).await
        && let Owner::Remote { url, .. } = cluster.owner(&region)
    {
        let mut h = headers.clone();
        h.insert(SCOPE, HeaderValue::from_static("local"));
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        return forward(cluster, &url, &Method::POST, "/v1/matches", &h, &bytes).await;
    }
    for _ in 0..CLAIM_ROUNDS {
        let (candidates, asked) = gather(state, cluster, &q, headers).await?;
        if asked.len() == 1 {
            // Nobody else can hold a nearer driver: the engine's own
            // atomic claim is exact.
            let (status, out) = crate::api::claim_here(state, order, None).await?;
            return Ok(served_by((status, out).into_response(), &node));
        }
        if candidates.is_empty() {
            break;
        }
        for (cand, holder) in &candidates {
            let Ok(driver) = DriverId::new(&cand.driver_id) else {
                continue;
            };
            if *holder == node {
                match crate::api::claim_here(state, order, Some(&driver)).await {
                    Ok((status, out)) => {
                        return Ok(served_by((status, out).into_response(), &node));
                    }
                    Err(e) if e.code() == "driver_not_available" => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            let Some(url) = cluster.map().nodes.get(holder).cloned() else {
                continue;
            };
            let reserve = ReserveIn {
                driver_id: cand.driver_id.clone(),
                order: body.clone(),
            };
            let bytes = Bytes::from(serde_json::to_vec(&reserve).unwrap_or_default());
            let resp = forward(
                cluster,
                &url,
                &Method::POST,
                "/v1/cluster/reserve",
                headers,
                &bytes,
            )
            .await?;
            match resp.status() {
                // Taken meanwhile, or the holder lost the region: next one.
                StatusCode::CONFLICT | StatusCode::MISDIRECTED_REQUEST => {
                    let (parts, body) = resp.into_parts();
                    let bytes = axum::body::to_bytes(body, usize::MAX)
                        .await
                        .unwrap_or_default();
                    let text = String::from_utf8_lossy(&bytes);
                    if !(text.contains("driver_not_available") || text.contains("not_owner")) {
                        return Ok(Response::from_parts(parts, Body::from(bytes)));
                    }
                }
                _ => return Ok(resp),
            }
        }
    }
    Err(hexmatch::Error::NoDriverAvailable.into())
}

/// A driver as handed from one node to another.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub(crate) struct HandedDriver {
    /// Id.
    pub(crate) driver_id: String,
    /// Latitude.
    pub(crate) lat: f64,
    /// Longitude.
    pub(crate) lon: f64,
    /// Last fix (RFC 3339).
    pub(crate) ts: String,
    /// Status there (`reserved` or `busy` while the old node keeps its match).
    pub(crate) status: String,
    /// Vehicle class.
    pub(crate) vehicle: String,
    /// Capabilities.
    pub(crate) capabilities: Vec<String>,
}

impl HandedDriver {
    pub(crate) fn of(d: &hexmatch::Driver) -> Self {
        Self {
            driver_id: d.id.to_string(),
            lat: d.pos.lat(),
            lon: d.pos.lon(),
            ts: d.ts.to_string(),
            status: d.status.as_str().to_owned(),
            vehicle: d.vehicle.as_str().to_owned(),
            capabilities: d.capabilities.names().map(str::to_owned).collect(),
        }
    }

    /// The update that recreates it here. A driver the old node keeps for
    /// its match is busy here until it ends, so it is never offered twice.
    fn update(&self) -> Option<DriverUpdate> {
        let status = match self.status.parse::<Status>().ok()? {
            Status::Reserved => Status::Busy,
            s => s,
        };
        Some(DriverUpdate {
            id: DriverId::new(&self.driver_id).ok()?,
            pos: Position::new(self.lat, self.lon).ok()?,
            ts: Some(Timestamp::parse(&self.ts).ok()?),
            status: Some(status),
            vehicle: Some(self.vehicle.parse::<Vehicle>().ok()?),
            capabilities: Some(self.capabilities.join(",").parse::<Capabilities>().ok()?),
        })
    }
}

/// Body of `POST /v1/cluster/handoff` and its answer.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Handoff {
    /// Asked: the drivers now in the asker's regions.
    #[serde(default)]
    pub(crate) driver_ids: Vec<String>,
    /// Answered: those this node held (removed here unless in a match).
    #[serde(default)]
    pub(crate) drivers: Vec<HandedDriver>,
}

/// Before this node applies updates of drivers it does not know, asks
/// every other node for them: they hand over what they hold (and stop
/// offering it), and the driver is recreated here with its vehicle,
/// capabilities and status before the update applies. So a driver moving
/// between regions keeps its attributes and is never offered by two nodes.
pub(crate) async fn adopt(state: &AppState, cluster: &Cluster, ids: &[DriverId]) {
    let unknown: Vec<String> = ids
        .iter()
        .filter(|id| state.engine.driver(id).is_none())
        .map(ToString::to_string)
        .collect();
    if unknown.is_empty() {
        return;
    }
    let ask = Handoff {
        driver_ids: unknown,
        drivers: Vec::new(),
    };
    let Ok(bytes) = serde_json::to_vec(&ask) else {
        return;
    };
    let bytes = Bytes::from(bytes);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let calls = cluster.peers().into_iter().map(|(_, url)| {
        let (bytes, headers) = (&bytes, &headers);
        async move {
            let resp = forward(
                cluster,
                &url,
                &Method::POST,
                "/v1/cluster/handoff",
                headers,
                bytes,
            )
            .await
            .ok()?;
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .ok()?;
            serde_json::from_slice::<Handoff>(&body).ok()
        }
    });
    let mut found: HashMap<String, HandedDriver> = HashMap::new();
    for answer in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
    {
        for d in answer.drivers {
            let newer = found.get(&d.driver_id).is_none_or(|x| d.ts > x.ts);
            if newer {
                found.insert(d.driver_id.clone(), d);
            }
        }
    }
    for d in found.values() {
        if let Some(u) = d.update()
            && state.engine.driver(&u.id).is_none()
        {
            let _ = state.engine.upsert(&u);
        }
    }
}

/// Hands over the drivers another node asks for: returns them and removes
/// those not in a match (a matched driver stays until its match ends).
pub(crate) fn hand_over(state: &AppState, ask: &Handoff) -> Handoff {
    let mut out = Handoff::default();
    for id in &ask.driver_ids {
        let Ok(id) = DriverId::new(id) else { continue };
        let Some(d) = state.engine.driver(&id) else {
            continue;
        };
        out.drivers.push(HandedDriver::of(&d));
        if d.order_id.is_none() {
            state.engine.remove(&id);
        }
    }
    out
}

/// Asks every other node for a driver (`GET`) or to remove it (`DELETE`);
/// returns the first success.
pub(crate) async fn ask_peers(
    cluster: &Cluster,
    method: Method,
    path: &str,
    headers: &HeaderMap,
) -> Option<Response> {
    let mut h = headers.clone();
    h.insert(SCOPE, HeaderValue::from_static("local"));
    let calls = cluster.peers().into_iter().map(|(_, url)| {
        let (h, method) = (&h, method.clone());
        async move {
            forward(cluster, &url, &method, path, h, &Bytes::new())
                .await
                .ok()
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .find(|r| r.status().is_success())
}

/// The stable code of a remote node's error, as one of ours.
fn known_code(code: &str) -> &'static str {
    const CODES: &[&str] = &[
        "invalid_json",
        "invalid_position",
        "invalid_id",
        "invalid_timestamp",
        "invalid_parameter",
        "unknown_driver",
        "not_owner",
        "unavailable",
        "overloaded",
        "not_ready",
        "rate_limited",
        "unauthorized",
    ];
    CODES
        .iter()
        .find(|c| **c == code)
        .copied()
        .unwrap_or("unavailable")
}

/// Items of a batch that this node applies, with their index in the batch.
pub(crate) type LocalItems = Vec<(usize, Result<serde_json::Value, ApiError>)>;

/// Splits a batch of location updates by region owner: returns the items
/// to apply here, and the tally of the rest, sent to their owners in one
/// request per owner (or rejected: `not_owner` in a batch that was itself
/// forwarded, `unavailable` when the owner is unknown or did not answer).
pub(crate) async fn split_batch(
    state: &AppState,
    cluster: &Cluster,
    items: Vec<Result<serde_json::Value, ApiError>>,
    headers: &HeaderMap,
) -> (LocalItems, crate::api::BatchTally) {
    let forwarded = headers.contains_key(FORWARDED);
    let mut local = Vec::new();
    let mut remote: HashMap<String, (Vec<usize>, Vec<serde_json::Value>)> = HashMap::new();
    let mut tally = crate::api::BatchTally::default();
    for (i, item) in items.into_iter().enumerate() {
        let region = item
            .as_ref()
            .ok()
            .and_then(|v| Position::new(v["lat"].as_f64()?, v["lon"].as_f64()?).ok())
            .and_then(|p| cluster.region_of(p).ok())
            .map(|r| r.to_string());
        let Some(region) = region else {
            // Invalid: the local apply gives the precise error.
            local.push((i, item));
            continue;
        };
        match resolve_owner(state, cluster, &region).await {
            Owner::Local => local.push((i, item)),
            _ if forwarded => tally.reject(
                i,
                "not_owner",
                format!("node {} does not own region {region}", cluster.node()),
            ),
            Owner::Nobody => tally.reject(
                i,
                "unavailable",
                format!("region {region} has no live owner now; retry"),
            ),
            Owner::Remote { url, .. } => {
                if let Ok(v) = item {
                    let e = remote.entry(url).or_default();
                    e.0.push(i);
                    e.1.push(v);
                }
            }
        }
    }
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        h.insert(header::AUTHORIZATION, auth.clone());
    }
    let calls = remote.into_iter().map(|(url, (indices, values))| {
        let h = &h;
        async move {
            let body = Bytes::from(serde_json::to_vec(&values).unwrap_or_default());
            let answer =
                match forward(cluster, &url, &Method::POST, "/v1/locations", h, &body).await {
                    Ok(resp) if resp.status() == StatusCode::OK => {
                        axum::body::to_bytes(resp.into_body(), usize::MAX)
                            .await
                            .ok()
                            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    }
                    _ => None,
                };
            (url, indices, answer)
        }
    });
    for (url, indices, answer) in futures_util::future::join_all(calls).await {
        let Some(answer) = answer else {
            for i in indices {
                tally.reject(
                    i,
                    "unavailable",
                    format!("the owner at {url} did not answer"),
                );
            }
            continue;
        };
        let count = |k: &str| {
            answer[k]
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0)
        };
        tally.applied += count("applied");
        tally.stale += count("stale");
        for r in answer["rejected"].as_array().into_iter().flatten() {
            let Some(&i) = r["index"]
                .as_u64()
                .and_then(|j| usize::try_from(j).ok())
                .and_then(|j| indices.get(j))
            else {
                continue;
            };
            tally.reject(
                i,
                known_code(r["error"]["code"].as_str().unwrap_or("")),
                r["error"]["message"].as_str().unwrap_or("").to_owned(),
            );
        }
    }
    (local, tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_what_they_name() {
        assert!(matches!(
            classify(&Method::PUT, "/v1/drivers/d1"),
            Kind::Position
        ));
        assert!(matches!(
            classify(&Method::POST, "/v1/drivers/d1/location"),
            Kind::Position
        ));
        assert!(matches!(
            classify(&Method::POST, "/v1/matches"),
            Kind::Position
        ));
        assert!(matches!(classify(&Method::GET, "/v1/matches/o1"), Kind::Order(o) if o == "o1"));
        assert!(matches!(
            classify(&Method::POST, "/v1/matches/o1/confirm"),
            Kind::Order(_)
        ));
        for (m, p) in [
            (Method::POST, "/v1/matches/batch"),
            (Method::GET, "/v1/drivers/nearest"),
            (Method::GET, "/v1/drivers/d1"),
            (Method::POST, "/v1/locations"),
            (Method::GET, "/v1/cluster"),
        ] {
            assert!(matches!(classify(&m, p), Kind::Here), "{m} {p}");
        }
    }

    #[test]
    fn positions_are_found_at_the_top_or_in_the_pickup() {
        let p = position_in(br#"{"lat": 41.9, "lon": -87.6, "ts": 5}"#).unwrap();
        assert_eq!((p.lat(), p.lon()), (41.9, -87.6));
        let p = position_in(br#"{"order_id":"o","pickup":{"lat":1,"lon":2}}"#).unwrap();
        assert_eq!((p.lat(), p.lon()), (1.0, 2.0));
        assert!(position_in(br#"{"lat": 91, "lon": 0}"#).is_none());
        assert!(position_in(b"not json").is_none());
        assert!(position_in(br#"{"lat": 1}"#).is_none());
    }
}
