//! Drivers and locations: `PUT/GET/DELETE /v1/drivers/{id}`,
//! `POST /v1/drivers/{id}/location`, `POST /v1/locations`.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hexmatch::{Applied, DriverId, Engine};
use metrics::counter;
use serde_json::Value;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody, ErrorDetail};
use super::extract::{IdPath, JsonBody, body_bytes, media_type, parse_json, unsupported};
use super::model::{
    BatchTally, DriverOut, DriverPut, DriverPutOut, LocationIn, LocationItem, LocationOut, Rejected,
};
use crate::cluster::route::{ask_peers, scope_local};

pub(crate) fn count_update(applied: &Applied) {
    let result = match applied {
        Applied::Applied(_) => "applied",
        Applied::Stale { .. } => "stale",
    };
    counter!("hexmatch_location_updates_total", "result" => result).increment(1);
}

/// Creates or replaces a driver.
#[utoipa::path(put, path = "/v1/drivers/{driver_id}", tag = "drivers",
    params(("driver_id" = String, Path, description = "1–64 chars of [A-Za-z0-9_.:-]")),
    request_body = DriverPut,
    responses(
        (status = 200, description = "Applied, or ignored as stale", body = DriverPutOut),
        (status = 400, description = "invalid_json, invalid_id, invalid_position, invalid_timestamp, invalid_parameter", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
    ))]
pub(crate) async fn put_driver(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
    JsonBody(body): JsonBody<DriverPut>,
) -> ApiResult<Json<DriverPutOut>> {
    let update = body.into_update(id.clone())?;
    if let Some(cluster) = state.cluster.get() {
        crate::cluster::route::adopt(&state, cluster, std::slice::from_ref(&id)).await;
    }
    // A status change may end the driver's match: keep Redis in step.
    let held = update
        .status
        .and_then(|_| state.engine.driver(&id))
        .and_then(|d| d.order_id);
    let applied = state.engine.upsert(&update)?;
    count_update(&applied);
    if let (Some(order), Some(p)) = (held, state.persist.get()) {
        p.sync_order(&state.engine, &order).await;
    }
    Ok(Json(match applied {
        Applied::Applied(d) => DriverPutOut {
            driver: d.into(),
            applied: true,
            reason: None,
        },
        Applied::Stale { .. } => {
            let current = state
                .engine
                .driver(&id)
                .ok_or_else(|| ApiError::from(hexmatch::Error::UnknownDriver(id.to_string())))?;
            DriverPutOut {
                driver: current.into(),
                applied: false,
                reason: Some("stale"),
            }
        }
    }))
}

/// Reads a driver.
#[utoipa::path(get, path = "/v1/drivers/{driver_id}", tag = "drivers",
    params(("driver_id" = String, Path, description = "Driver id")),
    responses(
        (status = 200, body = DriverOut),
        (status = 400, description = "invalid_id", body = ErrorBody),
        (status = 404, description = "unknown_driver", body = ErrorBody),
    ))]
pub(crate) async fn get_driver(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath<DriverId>,
) -> ApiResult<Response> {
    if let Some(d) = state.engine.driver(&id) {
        return Ok(Json(DriverOut::from(d)).into_response());
    }
    if let Some(cluster) = state.cluster.get()
        && !scope_local(&headers)
        && let Some(found) =
            ask_peers(cluster, Method::GET, &format!("/v1/drivers/{id}"), &headers).await
    {
        return Ok(found);
    }
    Err(hexmatch::Error::UnknownDriver(id.to_string()).into())
}

/// Removes a driver; an active match is released.
#[utoipa::path(delete, path = "/v1/drivers/{driver_id}", tag = "drivers",
    params(("driver_id" = String, Path, description = "Driver id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "invalid_id", body = ErrorBody),
        (status = 404, description = "unknown_driver", body = ErrorBody),
    ))]
pub(crate) async fn delete_driver(
    State(state): State<AppState>,
    headers: HeaderMap,
    IdPath(id): IdPath<DriverId>,
) -> ApiResult<StatusCode> {
    let Some((_, event)) = state.engine.remove(&id) else {
        if let Some(cluster) = state.cluster.get()
            && !scope_local(&headers)
            && ask_peers(
                cluster,
                Method::DELETE,
                &format!("/v1/drivers/{id}"),
                &headers,
            )
            .await
            .is_some()
        {
            return Ok(StatusCode::NO_CONTENT);
        }
        return Err(hexmatch::Error::UnknownDriver(id.to_string()).into());
    };
    if let Some(ev) = event {
        counter!("hexmatch_match_ends_total", "state" => "released").increment(1);
        if let Some(p) = state.persist.get() {
            p.sync_order(&state.engine, &ev.m.order_id).await;
        }
    }
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
pub(crate) async fn post_location(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
    JsonBody(body): JsonBody<LocationIn>,
) -> ApiResult<Json<LocationOut>> {
    let u = body.into_update(id)?;
    if let Some(cluster) = state.cluster.get() {
        crate::cluster::route::adopt(&state, cluster, std::slice::from_ref(&u.id)).await;
    }
    let applied = state.engine.update_location(&u.id, u.pos, u.ts)?;
    count_update(&applied);
    Ok(Json(match applied {
        Applied::Applied(_) => LocationOut {
            applied: true,
            reason: None,
        },
        Applied::Stale { .. } => LocationOut {
            applied: false,
            reason: Some("stale"),
        },
    }))
}

/// Validates and applies one raw update object (HTTP batch, WebSocket or
/// Redis stream: the same rules everywhere).
fn apply_value(engine: &Engine, item: Result<Value, ApiError>) -> Result<Applied, ApiError> {
    let item = item.and_then(|v| {
        serde_json::from_value::<LocationItem>(v).map_err(|e| ApiError::invalid_json(e.to_string()))
    });
    apply_location_item(engine, item)
}

/// The one place a batch, WebSocket or stream update is validated and
/// applied, with its `hexmatch_location_updates_total` count.
fn apply_location_item(engine: &Engine, item: ApiResult<LocationItem>) -> ApiResult<Applied> {
    let outcome = item
        .and_then(LocationItem::into_update)
        .and_then(|u| engine.upsert(&u).map_err(ApiError::from));
    match &outcome {
        Ok(applied) => count_update(applied),
        Err(_) => counter!("hexmatch_location_updates_total", "result" => "rejected").increment(1),
    }
    outcome
}

/// A stream entry that failed validation: id, its fields, error code and message.
pub(crate) type DeadLetter = (String, Vec<(String, String)>, &'static str, String);

/// Applies Redis stream entries (one field per API field, all strings;
/// `capabilities` comma-separated) with the same validation as HTTP.
/// Returns every entry id (to acknowledge) and the invalid entries (for the
/// dead-letter stream).
pub(crate) fn apply_stream_entries(
    engine: &Engine,
    entries: Vec<crate::persist::StreamEntry>,
) -> (Vec<String>, Vec<DeadLetter>) {
    let mut ids = Vec::with_capacity(entries.len());
    let mut dead = Vec::new();
    for (id, fields) in entries {
        if let Err(e) = apply_location_item(engine, LocationItem::from_stream_fields(&fields)) {
            dead.push((id.clone(), fields, e.code(), e.to_string()));
        }
        ids.push(id);
    }
    (ids, dead)
}

/// Applies one raw item to the engine, tallying the outcome.
pub(crate) fn apply_item(
    engine: &Engine,
    index: usize,
    item: Result<Value, ApiError>,
    tally: &mut BatchTally,
) {
    match apply_value(engine, item) {
        Ok(Applied::Applied(_)) => tally.applied += 1,
        Ok(Applied::Stale { .. }) => tally.stale += 1,
        Err(e) => {
            tally.rejected.push(Rejected {
                index,
                error: ErrorDetail {
                    code: e.code(),
                    message: e.to_string(),
                },
            });
        }
    }
}

/// Applies a batch of raw update objects: on a cluster node, split by
/// region owner first (the others' items go to them, one request per
/// owner) and drivers new here adopted from the other nodes. Rejected
/// items come back sorted by index.
pub(crate) async fn apply_batch(
    state: &AppState,
    items: Vec<Result<Value, ApiError>>,
    headers: &HeaderMap,
) -> ApiResult<BatchTally> {
    let (items, mut tally): (crate::cluster::route::LocalItems, BatchTally) =
        match state.cluster.get() {
            None => (
                items.into_iter().enumerate().collect(),
                BatchTally::default(),
            ),
            Some(cluster) => {
                let (local, tally) =
                    crate::cluster::route::split_batch(state, cluster, items, headers).await;
                let ids: Vec<DriverId> = local
                    .iter()
                    .filter_map(|(_, v)| v.as_ref().ok())
                    .filter_map(|v| v["driver_id"].as_str())
                    .filter_map(|s| DriverId::new(s).ok())
                    .collect();
                crate::cluster::route::adopt(state, cluster, &ids).await;
                (local, tally)
            }
        };
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || {
        for (i, item) in items {
            apply_item(&engine, i, item, &mut tally);
        }
        tally.rejected.sort_by_key(|r| r.index);
        tally
    })
    .await
    .map_err(|e| ApiError::new("internal", format!("batch task failed: {e}")))
}

/// Cluster mode: applies Redis stream entries like a batch (split by
/// region owner), then acknowledges them all and dead-letters the invalid
/// ones.
pub(crate) async fn ingest_cluster_entries(
    state: &AppState,
    p: &crate::persist::Persistence,
    entries: Vec<crate::persist::StreamEntry>,
) {
    let items: Vec<Result<Value, ApiError>> = entries
        .iter()
        .map(|(_, fields)| {
            LocationItem::from_stream_fields(fields).and_then(|item| {
                serde_json::to_value(item).map_err(|e| ApiError::invalid_json(e.to_string()))
            })
        })
        .collect();
    let n = entries.len();
    let tally = match apply_batch(state, items, &HeaderMap::new()).await {
        Ok(t) => t,
        Err(e) => {
            // Not acknowledged: the entries are re-delivered later.
            tracing::warn!(error = %e, "stream batch failed");
            return;
        }
    };
    let dead: Vec<DeadLetter> = tally
        .rejected
        .into_iter()
        .filter_map(|r| {
            let (id, fields) = entries.get(r.index)?;
            Some((id.clone(), fields.clone(), r.error.code, r.error.message))
        })
        .collect();
    let ids: Vec<String> = entries.into_iter().map(|(id, _)| id).collect();
    p.ack_in_background(&ids, dead);
    counter!("hexmatch_stream_entries_total").increment(n as u64);
}

/// Applies a batch of location updates (JSON array or NDJSON).
#[utoipa::path(post, path = "/v1/locations", tag = "drivers",
    request_body(content(
        (Vec<LocationItem> = "application/json"),
        (LocationItem = "application/x-ndjson"),
    ), description = "A JSON array of updates, or one update per line (NDJSON)"),
    responses(
        (status = 200, description = "Valid items applied even when others are rejected", body = BatchTally),
        (status = 400, description = "invalid_json (not an array), invalid_parameter (too many items)", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody),
        (status = 415, description = "unsupported_media_type", body = ErrorBody),
    ))]
pub(crate) async fn post_locations(
    State(state): State<AppState>,
    req: Request,
) -> ApiResult<Json<BatchTally>> {
    let headers = req.headers().clone();
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
    let items: Vec<Result<Value, ApiError>> = if ndjson {
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| ApiError::invalid_json("NDJSON body is not UTF-8"))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str::<Value>(l).map_err(|e| ApiError::invalid_json(e.to_string()))
            })
            .collect()
    } else {
        parse_json::<Vec<Value>>(&bytes)?
            .into_iter()
            .map(Ok)
            .collect()
    };
    let max = state.config.max_batch_items;
    if items.len() > max {
        return Err(ApiError::invalid_parameter(format!(
            "{} items; at most {max} per request",
            items.len()
        )));
    }
    let tally = apply_batch(&state, items, &headers).await;
    Ok(Json(tally?))
}
