//! Drivers and locations: `PUT/GET/DELETE /v1/drivers/{id}`,
//! `POST /v1/drivers/{id}/location`, `POST /v1/locations`.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use hexmatch::DriverId;

use super::AppState;
use super::extract::{IdPath, JsonBody, body_bytes, media_type, parse_json, unsupported};
use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::service::Scope;
use crate::wire::{
    BatchTally, DriverOut, DriverPut, DriverPutOut, LocationIn, LocationItem, LocationOut, Object,
};

/// Creates or replaces a driver.
#[utoipa::path(put, path = "/v1/drivers/{driver_id}", tag = "drivers",
    params(("driver_id" = String, Path, description = "1–64 chars of [A-Za-z0-9_.:-]")),
    request_body = DriverPut,
    responses(
        (status = 200, description = "Applied, or ignored as stale", body = DriverPutOut),
        (status = 400, description = "invalid_json, invalid_id, invalid_position, invalid_timestamp, invalid_parameter", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
        (status = 503, description = "unavailable: the driver is held by another node that did not hand it over", body = ErrorBody),
    ))]
pub(super) async fn put_driver(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
    JsonBody(body): JsonBody<DriverPut>,
) -> ApiResult<Json<DriverPutOut>> {
    state.svc.put_driver(id, body).await.map(Json)
}

/// Reads a driver.
#[utoipa::path(get, path = "/v1/drivers/{driver_id}", tag = "drivers",
    params(("driver_id" = String, Path, description = "Driver id")),
    responses(
        (status = 200, description = "The driver as last applied", body = DriverOut),
        (status = 400, description = "invalid_id", body = ErrorBody),
        (status = 404, description = "unknown_driver", body = ErrorBody),
    ))]
pub(super) async fn get_driver(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
) -> ApiResult<Json<DriverOut>> {
    state.svc.driver(&id, Scope::Cluster).await.map(Json)
}

/// Removes a driver; an active match is released.
#[utoipa::path(delete, path = "/v1/drivers/{driver_id}", tag = "drivers",
    params(("driver_id" = String, Path, description = "Driver id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "invalid_id", body = ErrorBody),
        (status = 404, description = "unknown_driver", body = ErrorBody),
    ))]
pub(super) async fn delete_driver(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
) -> ApiResult<StatusCode> {
    state.svc.remove_driver(&id, Scope::Cluster).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Moves a known driver.
#[utoipa::path(post, path = "/v1/drivers/{driver_id}/location", tag = "drivers",
    params(("driver_id" = String, Path, description = "Driver id")),
    request_body = LocationIn,
    responses(
        (status = 200, description = "Applied, or ignored as stale (`reason: stale`)", body = LocationOut),
        (status = 400, description = "invalid_json, invalid_id, invalid_position, invalid_timestamp", body = ErrorBody),
        (status = 404, description = "unknown_driver", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
    ))]
pub(super) async fn post_location(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
    JsonBody(body): JsonBody<LocationIn>,
) -> ApiResult<Json<LocationOut>> {
    state.svc.post_location(id, body).await.map(Json)
}

/// Decodes one update object of a batch or stream.
pub(super) fn decode_item(text: &str) -> ApiResult<LocationItem> {
    serde_json::from_str::<Object<LocationItem>>(text)
        .map(|o| o.0)
        .map_err(|e| ApiError::invalid_json(e.to_string()))
}

/// Applies a batch of location updates (JSON array or NDJSON).
#[utoipa::path(post, path = "/v1/locations", tag = "drivers",
    request_body(content(
        (Vec<LocationItem> = "application/json"),
        (LocationItem = "application/x-ndjson"),
    ), description = "A JSON array of updates, or one update per line (NDJSON)"),
    responses(
        (status = 200, description = "Valid items applied even when others are rejected", body = BatchTally),
        (status = 400, description = "invalid_json (not an array)", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is over --body-limit-bytes or holds more than --max-batch-items items (default 10000)", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
    ))]
pub(super) async fn post_locations(
    State(state): State<AppState>,
    req: Request,
) -> ApiResult<Json<BatchTally>> {
    let ct = media_type(&req);
    let ndjson = match ct.as_deref() {
        Some("application/json") => false,
        Some("application/x-ndjson" | "application/ndjson") => true,
        other => {
            return Err(unsupported(
                other,
                "application/json or application/x-ndjson",
            ));
        }
    };
    let bytes = body_bytes(req, &()).await?;
    let items: Vec<ApiResult<LocationItem>> = if ndjson {
        // Line by line: a line that is not UTF-8 rejects only itself.
        bytes
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.trim_ascii().is_empty())
            .map(|line| {
                std::str::from_utf8(line)
                    .map_err(|_| ApiError::invalid_json("this line is not UTF-8"))
                    .and_then(decode_item)
            })
            .collect()
    } else {
        // Each item on its own, so one bad item rejects only itself.
        parse_json::<Vec<Box<serde_json::value::RawValue>>>(&bytes)?
            .iter()
            .map(|raw| decode_item(raw.get()))
            .collect()
    };
    let max = state.svc.config.max_batch_items;
    if items.len() > max {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("{} items; at most {max} per request", items.len()),
        ));
    }
    state.svc.apply_items(items).await.map(Json)
}
