//! The node-only routes of the peer channel, under `/internal/v1`,
//! behind [`super::gate::peer_gate`]: they answer only to the cluster
//! secret. Not in the `OpenAPI` document (they are not for clients); the
//! shapes are [`crate::wire`]'s and the client is
//! [`PeerClient`](crate::cluster::peer::PeerClient).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /internal/v1/nearest?…` | this node's own nearest answer (no fan-out) |
//! | `POST /internal/v1/reserve` | reserve a named driver (or this node's nearest) for an order |
//! | `POST /internal/v1/handoff` | hand over drivers that now report from the caller's regions |
//! | `POST /internal/v1/locations` | apply updates of regions this node owns (never forwarded again) |
//! | `GET`, `DELETE /internal/v1/drivers/{id}` | a driver this node holds |
//! | `POST /internal/v1/within` | this node's own page of an area query |
//! | `POST /internal/v1/density` | this node's own counts per H3 cell of a box |

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hexmatch::DriverId;

use super::AppState;
use super::extract::{IdPath, JsonBody};
use super::matches::{NearestParams, nearest_response};
use crate::cluster::peer::INTERNAL_PREFIX;
use crate::error::ApiResult;
use crate::service::Scope;
use crate::wire::{
    AreaIn, AreaOut, BatchTally, DensityIn, DensityOut, DriverOut, HandoffAnswer, HandoffRequest,
    PeerUpdates, ReserveRequest, Reserved,
};

/// The routes, unprefixed paths under [`INTERNAL_PREFIX`].
pub(super) fn routes() -> Router<AppState> {
    Router::new().nest(
        INTERNAL_PREFIX,
        Router::new()
            .route("/nearest", get(nearest))
            .route("/reserve", post(reserve))
            .route("/handoff", post(handoff))
            .route("/locations", post(locations))
            .route("/drivers/{driver_id}", get(driver).delete(remove_driver))
            .route("/within", post(within))
            .route("/density", post(density)),
    )
}

async fn within(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<AreaIn>,
) -> ApiResult<Json<AreaOut>> {
    state.svc.drivers_within(body, Scope::Local).await.map(Json)
}

async fn density(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<DensityIn>,
) -> ApiResult<Json<DensityOut>> {
    state
        .svc
        .density(body.bbox, body.res, Scope::Local)
        .await
        .map(Json)
}

async fn nearest(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let q = NearestParams::from_query(req.uri().query())?.parse()?;
    let found = state.svc.nearest(&q, Scope::Local).await?;
    Ok(nearest_response(&found))
}

async fn reserve(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<ReserveRequest>,
) -> ApiResult<Json<Reserved>> {
    let c = state.svc.reserve_for_peer(body).await?;
    Ok(Json(Reserved {
        m: c.m,
        created: c.created,
    }))
}

async fn handoff(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<HandoffRequest>,
) -> ApiResult<Json<HandoffAnswer>> {
    state.svc.hand_over(&body).await.map(Json)
}

async fn locations(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<PeerUpdates>,
) -> ApiResult<Json<BatchTally>> {
    state.svc.apply_peer_updates(body).await.map(Json)
}

async fn driver(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
) -> ApiResult<Json<DriverOut>> {
    state.svc.driver(&id, Scope::Local).await.map(Json)
}

async fn remove_driver(
    State(state): State<AppState>,
    IdPath(id): IdPath<DriverId>,
) -> ApiResult<Response> {
    state.svc.remove_driver(&id, Scope::Local).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
