//! Area queries: `GET /v1/drivers` (a box or a region),
//! `POST /v1/drivers/within` (a polygon, a box or a region),
//! `GET /v1/regions/{region}/stats`, `GET /v1/density`.

use axum::Json;
use axum::extract::{Query, State};
use hexmatch::RegionId;
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::extract::{IdPath, JsonBody};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::service::Scope;
use crate::wire::{AreaIn, AreaOut, DensityOut, RegionStatsOut};

/// Query of `GET /v1/drivers`: exactly one of `bbox` and `region`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AreaParams {
    /// `west,south,east,north` in degrees, edges included (west > east
    /// crosses the antimeridian).
    #[param(example = "-87.70,41.85,-87.60,41.92")]
    bbox: Option<String>,
    /// A region id (`GET /v1/regions`).
    region: Option<String>,
    /// Comma-separated statuses to keep (default: all):
    /// available, reserved, busy, offline.
    #[param(example = "available,reserved")]
    status: Option<String>,
    /// Only this vehicle class.
    vehicle: Option<String>,
    /// Comma-separated capabilities every driver must have.
    capabilities: Option<String>,
    /// Page size, 1..=10000 (default 1000).
    #[param(minimum = 1, maximum = 10000, example = 500)]
    limit: Option<usize>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
}

/// Four comma-separated numbers: `west,south,east,north`.
fn parse_bbox(raw: &str) -> ApiResult<[f64; 4]> {
    let bad = || {
        ApiError::invalid_parameter(format!(
            "bbox={raw:?} is not four numbers west,south,east,north"
        ))
    };
    let numbers = raw
        .split(',')
        .map(|x| x.trim().parse::<f64>().map_err(|_| bad()))
        .collect::<ApiResult<Vec<_>>>()?;
    <[f64; 4]>::try_from(numbers).map_err(|_| bad())
}

fn list(raw: Option<&String>) -> Option<Vec<String>> {
    raw.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::invalid_parameter(e.body_text()))
}

/// The drivers inside a box or a region, by id, a page at a time.
#[utoipa::path(get, path = "/v1/drivers", tag = "areas", params(AreaParams),
    responses(
        (status = 200, description = "A page of drivers by driver_id; next_cursor while more remain", body = AreaOut),
        (status = 400, description = "invalid_parameter (no area or two, a bad bbox, status, vehicle, capability, limit or cursor)", body = ErrorBody),
        (status = 404, description = "unknown_region", body = ErrorBody),
        (status = 503, description = "unavailable: a node did not answer", body = ErrorBody),
    ))]
pub(super) async fn list_drivers(
    State(state): State<AppState>,
    params: Result<Query<AreaParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<AreaOut>> {
    let p = query(params)?;
    let body = AreaIn {
        bbox: p.bbox.as_deref().map(parse_bbox).transpose()?,
        region: p.region,
        geometry: None,
        status: list(p.status.as_ref()),
        vehicle: p.vehicle,
        capabilities: list(p.capabilities.as_ref()),
        limit: p.limit,
        cursor: p.cursor,
    };
    state
        .svc
        .drivers_within(body, Scope::Cluster)
        .await
        .map(Json)
}

/// The drivers inside a `GeoJSON` polygon (or a box, or a region), by id,
/// a page at a time.
#[utoipa::path(post, path = "/v1/drivers/within", tag = "areas", request_body = AreaIn,
    responses(
        (status = 200, description = "A page of drivers by driver_id; next_cursor while more remain", body = AreaOut),
        (status = 400, description = "invalid_json, invalid_parameter (no area or two, a bad polygon, status, vehicle, capability, limit or cursor)", body = ErrorBody),
        (status = 404, description = "unknown_region", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 503, description = "unavailable: a node did not answer", body = ErrorBody),
    ))]
pub(super) async fn drivers_within(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<AreaIn>,
) -> ApiResult<Json<AreaOut>> {
    state
        .svc
        .drivers_within(body, Scope::Cluster)
        .await
        .map(Json)
}

/// A region's drivers by status.
#[utoipa::path(get, path = "/v1/regions/{region}/stats", tag = "areas",
    params(("region" = String, Path, description = "Region id (`GET /v1/regions`)")),
    responses(
        (status = 200, description = "The region's drivers by status, its cells and owner", body = RegionStatsOut),
        (status = 404, description = "unknown_region", body = ErrorBody),
    ))]
pub(super) async fn region_stats(
    State(state): State<AppState>,
    IdPath(region): IdPath<RegionId>,
) -> ApiResult<Json<RegionStatsOut>> {
    state.svc.region_stats(region.as_str()).map(Json)
}

/// Query of `GET /v1/density`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct DensityParams {
    /// H3 resolution of the cells, 0..=15.
    #[param(required = true, minimum = 0, maximum = 15, example = 8)]
    res: Option<u8>,
    /// `west,south,east,north` in degrees.
    #[param(required = true, example = "-87.70,41.85,-87.60,41.92")]
    bbox: Option<String>,
}

/// Drivers by status per H3 cell, inside a box.
#[utoipa::path(get, path = "/v1/density", tag = "areas", params(DensityParams),
    responses(
        (status = 200, description = "The cells holding drivers inside the box, by cell index", body = DensityOut),
        (status = 400, description = "invalid_parameter (res, bbox, or more than 100000 cells)", body = ErrorBody),
        (status = 503, description = "unavailable: a node did not answer", body = ErrorBody),
    ))]
pub(super) async fn density(
    State(state): State<AppState>,
    params: Result<Query<DensityParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<DensityOut>> {
    let p = query(params)?;
    let res = p
        .res
        .ok_or_else(|| ApiError::invalid_parameter("res is required"))?;
    let bbox = parse_bbox(
        p.bbox
            .as_deref()
            .ok_or_else(|| ApiError::invalid_parameter("bbox is required"))?,
    )?;
    state.svc.density(bbox, res, Scope::Cluster).await.map(Json)
}
