//! Nearest drivers and matching: `GET /v1/drivers/nearest`,
//! `POST /v1/matches`, `GET /v1/matches/{id}`, confirm / release / complete,
//! `POST /v1/matches/batch`.

use std::borrow::Cow;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use hexmatch::{Capabilities, NearestQuery, OrderId, Position};
use utoipa::IntoParams;

use super::AppState;
use super::extract::{IdPath, JsonBody, OptionalJsonBody};
use super::forward::served_by;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::service::{Claimed, Nearest, Scope};
use crate::wire::{BatchIn, BatchOut, MatchOut, NearestOut, OrderIn, ReleaseIn, parse_vehicle};

/// Largest `k` over HTTP.
const MAX_K_HTTP: usize = 100;

/// Query of `GET /v1/drivers/nearest`. Parameters arrive as text and are
/// parsed here, so each bad one gets its own error.
#[derive(Debug, Default, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct NearestParams<'a> {
    /// Latitude of the query point, degrees (-90..=90).
    #[param(value_type = f64, required = true, minimum = -90, maximum = 90, example = 41.8781)]
    lat: Option<Cow<'a, str>>,
    /// Longitude of the query point, degrees (-180..=180).
    #[param(value_type = f64, required = true, minimum = -180, maximum = 180, example = -87.6298)]
    lon: Option<Cow<'a, str>>,
    /// How many drivers, 1..=100 (default 10).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100, example = 5)]
    k: Option<Cow<'a, str>>,
    /// Search radius in metres (default: the server's max radius).
    #[param(value_type = Option<f64>, exclusive_minimum = 0, example = 3000)]
    radius_m: Option<Cow<'a, str>>,
    /// Only this vehicle class: car, bike, scooter, van, truck or walker.
    #[param(value_type = Option<String>, example = "car")]
    vehicle: Option<Cow<'a, str>>,
    /// Comma-separated capabilities every driver must have (e.g.
    /// `wheelchair,pets`).
    #[param(value_type = Option<String>)]
    capabilities: Option<Cow<'a, str>>,
    /// Only drivers in this region (a service area, `GET /v1/regions`).
    #[param(value_type = Option<String>)]
    region: Option<Cow<'a, str>>,
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
    pub(super) fn from_query(query: Option<&'a str>) -> ApiResult<Self> {
        let mut p = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let slot = match &*key {
                "lat" => &mut p.lat,
                "lon" => &mut p.lon,
                "k" => &mut p.k,
                "radius_m" => &mut p.radius_m,
                "vehicle" => &mut p.vehicle,
                "capabilities" => &mut p.capabilities,
                "region" => &mut p.region,
                other => {
                    return Err(ApiError::invalid_parameter(format!(
                        "unknown query parameter {other:?}; expected lat, lon, k, radius_m, vehicle, capabilities, region"
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

    pub(super) fn parse(&self) -> ApiResult<NearestQuery> {
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

/// The nearest answer, written directly, with the nodes that answered.
pub(super) fn nearest_response(found: &Nearest) -> Response {
    let resp = (
        [(header::CONTENT_TYPE, "application/json")],
        NearestOut::json(&found.drivers),
    )
        .into_response();
    if found.asked.is_empty() {
        return resp;
    }
    served_by(resp, &found.asked.join(","))
}

/// The k nearest available drivers, exact by great-circle distance.
#[utoipa::path(get, path = "/v1/drivers/nearest", tag = "matching", params(NearestParams),
    responses(
        (status = 200, description = "Nearest first; ties by driver_id", body = NearestOut),
        (status = 400, description = "invalid_parameter, invalid_position", body = ErrorBody),
        (status = 404, description = "unknown_region", body = ErrorBody),
    ))]
pub(super) async fn nearest(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    // The whole request rather than `Query` and `HeaderMap` extractors:
    // they would copy every parameter and every header.
    let params = NearestParams::from_query(req.uri().query())?;
    let mut q = params.parse()?;
    if let Some(region) = &params.region {
        q.within = state.svc.region_cells(region)?;
    }
    let found = state.svc.nearest(&q, Scope::Cluster).await?;
    Ok(nearest_response(&found))
}

/// A claim's answer: 201 when made now, 200 for a repeat.
pub(super) fn claimed_response(c: Claimed) -> Response {
    let status = if c.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let resp = (status, Json(c.m)).into_response();
    match c.by {
        Some(by) => served_by(resp, &by),
        None => resp,
    }
}

/// Reserves the nearest eligible driver for an order, atomically.
#[utoipa::path(post, path = "/v1/matches", tag = "matching", request_body = OrderIn,
    responses(
        (status = 201, description = "A driver was reserved", body = MatchOut),
        (status = 200, description = "The order already had this match (idempotent repeat)", body = MatchOut),
        (status = 400, description = "invalid_json, invalid_id, invalid_position, invalid_parameter", body = ErrorBody),
        (status = 404, description = "unknown_region", body = ErrorBody),
        (status = 409, description = "no_driver_available, order_conflict", body = ErrorBody),
        (status = 503, description = "unavailable: Redis or a node needed is down", body = ErrorBody),
    ))]
pub(super) async fn create_match(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<OrderIn>,
) -> ApiResult<Response> {
    state.svc.claim(body).await.map(claimed_response)
}

/// Reads a match.
#[utoipa::path(get, path = "/v1/matches/{order_id}", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "The match, in its current state", body = MatchOut),
        (status = 400, description = "invalid_id", body = ErrorBody),
        (status = 404, description = "unknown_order", body = ErrorBody),
    ))]
pub(super) async fn get_match(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
) -> ApiResult<Json<MatchOut>> {
    state.svc.get_match(&order).map(Json)
}

/// Confirms a reservation: the driver becomes busy.
#[utoipa::path(post, path = "/v1/matches/{order_id}/confirm", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "Confirmed: the driver is busy", body = MatchOut),
        (status = 404, description = "unknown_order", body = ErrorBody),
        (status = 409, description = "order_conflict (not reserved), reservation_expired", body = ErrorBody),
    ))]
pub(super) async fn confirm(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
) -> ApiResult<Json<MatchOut>> {
    state.svc.confirm(&order).await.map(Json)
}

/// Releases a reserved or confirmed match; the driver is available again.
#[utoipa::path(post, path = "/v1/matches/{order_id}/release", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    request_body(content = Option<ReleaseIn>, description = "Optional reason"),
    responses(
        (status = 200, description = "Released: the driver is available again", body = MatchOut),
        (status = 404, description = "unknown_order", body = ErrorBody),
        (status = 409, description = "order_conflict (already ended), reservation_expired", body = ErrorBody),
    ))]
pub(super) async fn release(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
    OptionalJsonBody(body): OptionalJsonBody<ReleaseIn>,
) -> ApiResult<Json<MatchOut>> {
    state
        .svc
        .release(&order, body.reason.as_deref())
        .await
        .map(Json)
}

/// Completes a confirmed match (extension): the driver is available again.
#[utoipa::path(post, path = "/v1/matches/{order_id}/complete", tag = "matching",
    params(("order_id" = String, Path, description = "Order id")),
    responses(
        (status = 200, description = "Completed: the driver is available again", body = MatchOut),
        (status = 404, description = "unknown_order", body = ErrorBody),
        (status = 409, description = "order_conflict (not confirmed)", body = ErrorBody),
    ))]
pub(super) async fn complete(
    State(state): State<AppState>,
    IdPath(order): IdPath<OrderId>,
) -> ApiResult<Json<MatchOut>> {
    state.svc.complete(&order).await.map(Json)
}

/// Serves a window of orders, minimising the summed pickup distance.
#[utoipa::path(post, path = "/v1/matches/batch", tag = "matching", request_body = BatchIn,
    responses(
        (status = 200, description = "The assignment: each order's match, or why it has none", body = BatchOut),
        (status = 400, description = "invalid_json, invalid_parameter (objective, duplicate order, candidates), invalid_id, invalid_position", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is over --body-limit-bytes or holds more than --max-batch-items orders (default 10000)", body = ErrorBody),
    ))]
pub(super) async fn batch(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<BatchIn>,
) -> ApiResult<Json<BatchOut>> {
    state.svc.batch(body).await.map(Json)
}
