//! Nearest drivers and matching: `GET /v1/drivers/nearest`,
//! `POST /v1/matches`, `GET /v1/matches/{id}`, confirm / release / complete,
//! `POST /v1/matches/batch`.

use std::borrow::Cow;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hexmatch::{BatchOrder, Capabilities, DriverId, NearestQuery, OrderId, Position};
use metrics::counter;
use utoipa::IntoParams;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{IdPath, JsonBody, OptionalJsonBody};
use super::model::{BatchIn, BatchOut, MatchOut, NearestOut, OrderIn, ReleaseIn, parse_vehicle};

/// Largest `k` over HTTP.
const MAX_K_HTTP: usize = 100;
/// Candidates per order in a batch: enough that the optimum over the
/// window is rarely limited by them.
const BATCH_CANDIDATES: usize = 16;

/// Query of `GET /v1/drivers/nearest`. Parameters arrive as text and are
/// parsed here, so each bad one gets its own error.
#[derive(Debug, Default, IntoParams)]
pub(crate) struct NearestParams<'a> {
    /// Latitude of the query point.
    lat: Option<Cow<'a, str>>,
    /// Longitude of the query point.
    lon: Option<Cow<'a, str>>,
    /// How many drivers, 1..=100 (default 10).
    k: Option<Cow<'a, str>>,
    /// Search radius in metres (default: the server's max radius).
    radius_m: Option<Cow<'a, str>>,
    /// Only this vehicle class.
    vehicle: Option<Cow<'a, str>>,
    /// Comma-separated capabilities every driver must have.
    capabilities: Option<Cow<'a, str>>,
}

fn number<T: std::str::FromStr>(name: &str, raw: Option<&str>) -> ApiResult<Option<T>> {
    raw.map(|s| {
        s.trim()
            .parse::<T>()
            .map_err(|_| ApiError::invalid_parameter(format!("{name}={s:?} is not a valid number")))
    })
    .transpose()
}

impl<'a> NearestParams<'a> {
    /// Reads a raw query string (`application/x-www-form-urlencoded`, as
    /// axum's `Query` would, without copying values that need no
    /// decoding). An unknown or repeated parameter is an error.
    fn from_query(query: Option<&'a str>) -> ApiResult<Self> {
        let mut p = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let slot = match &*key {
                "lat" => &mut p.lat,
                "lon" => &mut p.lon,
                "k" => &mut p.k,
                "radius_m" => &mut p.radius_m,
                "vehicle" => &mut p.vehicle,
                "capabilities" => &mut p.capabilities,
                other => {
                    return Err(ApiError::invalid_parameter(format!(
                        "unknown query parameter {other:?}; expected lat, lon, k, radius_m, vehicle, capabilities"
                    )));
                }
            };
            if slot.replace(value).is_some() {
                return Err(ApiError::invalid_parameter(format!(
                    "query parameter {key:?} is given more than once"
                )));
            }
        }
        Ok(p)
    }

    fn parse(&self) -> ApiResult<NearestQuery> {
        let lat: f64 = number("lat", self.lat.as_deref())?
            .ok_or_else(|| ApiError::invalid_parameter("lat is required"))?;
        let lon: f64 = number("lon", self.lon.as_deref())?
            .ok_or_else(|| ApiError::invalid_parameter("lon is required"))?;
        let pos = Position::new(lat, lon)?;
        let k: usize = number("k", self.k.as_deref())?.unwrap_or(10);
        if !(1..=MAX_K_HTTP).contains(&k) {
            return Err(ApiError::invalid_parameter(format!(
                "k={k} is not in 1..={MAX_K_HTTP}"
            )));
        }
        let mut q = NearestQuery::new(pos, k)?;
        if let Some(r) = number::<f64>("radius_m", self.radius_m.as_deref())? {
            q = q.with_radius(r)?;
        }
        q.vehicle = parse_vehicle(self.vehicle.as_deref())?;
        if let Some(c) = &self.capabilities {
            q.capabilities = c.parse::<Capabilities>()?;
        }
        Ok(q)
    }
}

/// The k nearest available drivers, exact by great-circle distance.
#[utoipa::path(get, path = "/v1/drivers/nearest", tag = "matching", params(NearestParams),
    responses(
        (status = 200, description = "Nearest first; ties by driver_id", body = NearestOut),
        (status = 400, description = "invalid_parameter, invalid_position", body = ErrorBody),
    ))]
pub(crate) async fn nearest(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    // The whole request rather than `Query` and `HeaderMap` extractors:
    // they would copy every parameter and every header.
    let q = NearestParams::from_query(req.uri().query())?.parse()?;
    let headers = req.headers();
    if let Some(cluster) = state.cluster.get()
        && !crate::cluster::route::scope_local(headers)
    {
        return crate::cluster::route::nearest(&state, cluster, &q, headers).await;
    }
    let found = state.engine.nearest(&q)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        NearestOut::json(&found),
    )
        .into_response())
}

/// Reserves the nearest eligible driver for an order, atomically.
#[utoipa::path(post, path = "/v1/matches", tag = "matching", request_body = OrderIn,
    responses(
        (status = 201, description = "A driver was reserved", body = MatchOut),
        (status = 200, description = "The order already had this match (idempotent repeat)", body = MatchOut),
        (status = 400, description = "invalid_json, invalid_id, invalid_position, invalid_parameter", body = ErrorBody),
        (status = 409, description = "no_driver_available, order_conflict", body = ErrorBody),
    ))]
pub(crate) async fn create_match(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<OrderIn>,
) -> ApiResult<Response> {
    if let Some(cluster) = state.cluster.get()
        && !crate::cluster::route::scope_local(&headers)
    {
        let raw = serde_json::to_value(&body).unwrap_or_default();
        let order = body.parse()?;
        return crate::cluster::route::claim(&state, cluster, raw, &order, &headers).await;
    }
    let order = body.parse()?;
    let _serial = match state.durable()? {
        Some(p) => Some(p.lock_order(&order.order_id).await),
        None => None,
    };
    claim_here(&state, &order, None)
        .await
        .map(IntoResponse::into_response)
}

/// Claims on this node: the nearest eligible driver, or exactly `driver`
/// (a reservation asked for by another node's search), made durable
/// before the answer. The caller holds the order's lock.
pub(crate) async fn claim_here(
    state: &AppState,
    order: &BatchOrder,
    driver: Option<&DriverId>,
) -> ApiResult<(StatusCode, Json<MatchOut>)> {
    let durable = state.durable()?;
    let result = match driver {
        None => state.engine.claim(&order.order_id, &order.request),
        Some(d) => state
            .engine
            .claim_driver(&order.order_id, &order.request, d),
    };
    let outcome = match &result {
        Ok((_, true)) => "created",
        Ok((_, false)) => "repeated",
        Err(e) => e.code(),
    };
    counter!("hexmatch_matches_total", "result" => outcome).increment(1);
    let (m, created) = result?;
    if let (Some(p), true) = (durable, created) {
        // Durable before the response; if Redis refuses, undo and say so.
        let rec = state.engine.durable_match(&m.order_id);
        if let Some(Err(e)) = match &rec {
            Some(rec) => Some(p.put_match(rec).await),
            None => None,
        } {
            let _ = state
                .engine
                .release(&m.order_id, Some("persistence_failed"));
            return Err(unavailable(&e));
        }
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(state.match_out(m))))
}

fn unavailable(e: &redis::RedisError) -> ApiError {
    if crate::persist::is_not_owner(e) {
        return ApiError::new(
            "not_owner",
            format!("this node no longer owns the region: {e}"),
        );
    }
    ApiError::new(
        "unavailable",
        format!("the change could not be made durable in Redis: {e}"),
    )
}

/// Runs a confirm / release / complete so that Redis never says less than
/// memory: with persistence, the order's new durable state is written
/// first (`durable_first` turns the current record into it, or `None` to
/// delete it), then the engine acts; if the engine refuses, the record is
/// synced back to what the engine holds.
async fn transition(
    state: &AppState,
    order: &OrderId,
    durable_first: impl FnOnce(hexmatch::DurableMatch) -> Option<hexmatch::DurableMatch>,
    act: impl FnOnce(&hexmatch::Engine) -> hexmatch::Result<hexmatch::Match>,
) -> ApiResult<hexmatch::Match> {
    let Some(p) = state.durable()? else {
        return act(&state.engine).map_err(ApiError::from);
    };
    let _serial = p.lock_order(order).await;
    let current = state
        .engine
        .durable_match(order)
        .ok_or_else(|| unknown(order))?;
    if current.m.state.is_live() {
        let written = match durable_first(current) {
            Some(next) => p.put_match(&next).await,
            None => p.del_match(order).await,
        };
        written.map_err(|e| unavailable(&e))?;
    }
    let result = act(&state.engine);
    if result.is_err() {
        p.sync_order(&state.engine, order).await;
    }
    result.map_err(ApiError::from)
}

fn unknown(order: &OrderId) -> ApiError {
    hexmatch::Error::UnknownOrder(order.to_string()).into()
}

/// Reads a match.
#[utoipa::path(get, path = "/v1/matches/{order_id}", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, body = MatchOut),
        (status = 400, description = "invalid_id", body = ErrorBody),
        (status = 404, description = "unknown_order", body = ErrorBody),
    ))]
pub(crate) async fn get_match(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
) -> ApiResult<Json<MatchOut>> {
    state
        .engine
        .get_match(&order)
        .map(|m| Json(state.match_out(m)))
        .ok_or_else(|| unknown(&order))
}

fn count_end(state: &str) {
    counter!("hexmatch_match_ends_total", "state" => state.to_owned()).increment(1);
}

/// Confirms a reservation: the driver becomes busy.
#[utoipa::path(post, path = "/v1/matches/{order_id}/confirm", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, body = MatchOut),
        (status = 404, description = "unknown_order", body = ErrorBody),
        (status = 409, description = "order_conflict (not reserved), reservation_expired", body = ErrorBody),
    ))]
pub(crate) async fn confirm(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
) -> ApiResult<Json<MatchOut>> {
    let now = state.engine.clock().now();
    let confirmed = |mut rec: hexmatch::DurableMatch| {
        if rec.m.state == hexmatch::MatchState::Reserved && rec.m.reserved_until > now {
            rec.m.state = hexmatch::MatchState::Confirmed;
        }
        Some(rec)
    };
    let m = transition(&state, &order, confirmed, |e| e.confirm(&order)).await?;
    counter!("hexmatch_match_confirms_total").increment(1);
    Ok(Json(state.match_out(m)))
}

/// Releases a reserved or confirmed match; the driver is available again.
#[utoipa::path(post, path = "/v1/matches/{order_id}/release", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    request_body(content = Option<ReleaseIn>, description = "Optional reason"),
    responses(
        (status = 200, body = MatchOut),
        (status = 404, description = "unknown_order", body = ErrorBody),
        (status = 409, description = "order_conflict (already ended), reservation_expired", body = ErrorBody),
    ))]
pub(crate) async fn release(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
    OptionalJsonBody(body): OptionalJsonBody<ReleaseIn>,
) -> ApiResult<Json<MatchOut>> {
    if body.reason.as_ref().is_some_and(|r| r.len() > 256) {
        return Err(ApiError::invalid_parameter(
            "reason is longer than 256 bytes",
        ));
    }
    let m = transition(
        &state,
        &order,
        |_| None,
        |e| e.release(&order, body.reason.as_deref()),
    )
    .await?;
    count_end("released");
    Ok(Json(state.match_out(m)))
}

/// Completes a confirmed match (extension): the driver is available again.
#[utoipa::path(post, path = "/v1/matches/{order_id}/complete", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, body = MatchOut),
        (status = 404, description = "unknown_order", body = ErrorBody),
        (status = 409, description = "order_conflict (not confirmed)", body = ErrorBody),
    ))]
pub(crate) async fn complete(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
) -> ApiResult<Json<MatchOut>> {
    let m = transition(&state, &order, |_| None, |e| e.complete(&order)).await?;
    count_end("completed");
    Ok(Json(state.match_out(m)))
}

/// Serves a window of orders, minimising the summed pickup distance.
#[utoipa::path(post, path = "/v1/matches/batch", tag = "matching", request_body = BatchIn,
    responses(
        (status = 200, body = BatchOut),
        (status = 400, description = "invalid_json, invalid_parameter (objective, duplicate order, too many orders), invalid_id, invalid_position", body = ErrorBody),
    ))]
pub(crate) async fn batch(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<BatchIn>,
) -> ApiResult<Json<BatchOut>> {
    if let Some(o) = body.objective.as_deref().filter(|o| *o != "total_distance") {
        return Err(ApiError::invalid_parameter(format!(
            "objective {o:?} is not supported; use total_distance"
        )));
    }
    let max = state.config.max_batch_items;
    if body.orders.len() > max {
        return Err(ApiError::invalid_parameter(format!(
            "{} orders; at most {max} per batch",
            body.orders.len()
        )));
    }
    let body_candidates = body.candidates;
    let orders = body
        .orders
        .into_iter()
        .map(OrderIn::parse)
        .collect::<ApiResult<Vec<_>>>()?;
    let durable = state.durable()?;
    let was_live: std::collections::HashSet<OrderId> = orders
        .iter()
        .filter(|o| {
            state
                .engine
                .get_match(&o.order_id)
                .is_some_and(|m| m.state.is_live())
        })
        .map(|o| o.order_id.clone())
        .collect();
    let engine = state.engine.clone();
    let candidates = body_candidates.unwrap_or(BATCH_CANDIDATES);
    let out = tokio::task::spawn_blocking(move || engine.claim_batch(&orders, candidates))
        .await
        .map_err(|e| ApiError::new("internal", format!("batch task failed: {e}")))??;
    if let Some(p) = durable {
        // Durable before the response: write the new matches in one round
        // trip; if Redis refuses, release them and say so.
        let fresh: Vec<&OrderId> = out
            .matches
            .iter()
            .map(|m| &m.order_id)
            .filter(|o| !was_live.contains(*o))
            .collect();
        let records: Vec<_> = fresh
            .iter()
            .filter_map(|o| state.engine.durable_match(o))
            .collect();
        if let Err(e) = p.put_matches(&records).await {
            for o in fresh {
                let _ = state.engine.release(o, Some("persistence_failed"));
            }
            return Err(unavailable(&e));
        }
    }
    counter!("hexmatch_matches_total", "result" => "batch").increment(out.matches.len() as u64);
    Ok(Json(BatchOut {
        matches: out
            .matches
            .into_iter()
            .map(|m| state.match_out(m))
            .collect(),
        unmatched: out.unmatched.into_iter().map(|o| o.to_string()).collect(),
    }))
}
