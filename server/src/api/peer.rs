//! Node-to-node calls of a cluster: `POST /v1/cluster/reserve` (reserve
//! the driver another node's search chose) and `POST /v1/cluster/handoff`
//! (hand over drivers that moved into another node's regions). They sit
//! under `/v1`, behind the same auth, and are documented so the `OpenAPI`
//! document stays exactly what is served.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use hexmatch::DriverId;

use super::AppState;
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::JsonBody;
use super::model::{MatchOut, OrderIn};
use crate::cluster::route::{Handoff, ReserveIn, hand_over};

/// Reserves one named driver for an order on the node that holds it.
#[utoipa::path(post, path = "/v1/cluster/reserve", tag = "cluster", request_body = ReserveIn,
    responses(
        (status = 201, description = "Reserved", body = MatchOut),
        (status = 200, description = "The order already had this match", body = MatchOut),
        (status = 400, description = "invalid_json, invalid_id, invalid_position, invalid_parameter", body = ErrorBody),
        (status = 409, description = "driver_not_available, order_conflict", body = ErrorBody),
        (status = 421, description = "not_owner: this node lost the driver's region", body = ErrorBody),
    ))]
pub(crate) async fn reserve(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<ReserveIn>,
) -> ApiResult<(StatusCode, Json<MatchOut>)> {
    let driver = DriverId::new(&body.driver_id)?;
    let order: OrderIn =
        serde_json::from_value(body.order).map_err(|e| ApiError::invalid_json(e.to_string()))?;
    let order = order.parse()?;
    let _serial = match state.durable()? {
        Some(p) => Some(p.lock_order(&order.order_id).await),
        None => None,
    };
    super::claim_here(&state, &order, Some(&driver)).await
}

/// Hands over drivers that now report from another node's regions: returns
/// those held here and stops offering them (a driver in a match stays
/// until the match ends).
#[utoipa::path(post, path = "/v1/cluster/handoff", tag = "cluster", request_body = Handoff,
    responses(
        (status = 200, description = "The drivers held here", body = Handoff),
        (status = 400, description = "invalid_json", body = ErrorBody),
    ))]
pub(crate) async fn handoff(
    State(state): State<AppState>,
    JsonBody(ask): JsonBody<Handoff>,
) -> Json<Handoff> {
    Json(hand_over(&state, &ask))
}
