//! `GET /v1/locations/stream`: location updates over a WebSocket, one JSON
//! object per text frame, acknowledged in batches.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::drivers::decode_item;
use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::wire::BatchTally;

/// Query of the stream.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamParams {
    /// Send an ack after this many updates (1..=10000, default 100); an ack
    /// also goes out at least once a second while updates arrive.
    #[param(minimum = 1, maximum = 10000, example = 100)]
    ack_every: Option<usize>,
}

/// Upgrades to a WebSocket of location updates.
#[utoipa::path(get, path = "/v1/locations/stream", tag = "drivers", params(StreamParams),
    responses(
        (status = 101, description = "Switching to WebSocket. Client frames: one update object each (as in `POST /v1/locations`). Server frames: `{applied, stale, rejected}` acks covering the updates since the previous ack; `rejected[].index` counts frames from 0 over the connection."),
        (status = 400, description = "invalid_parameter", body = ErrorBody),
        (status = 426, description = "upgrade_required (not a WebSocket handshake)", body = ErrorBody),
    ))]
pub(super) async fn stream(
    State(state): State<AppState>,
    params: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Query(params) = params.map_err(|e| ApiError::invalid_parameter(e.body_text()))?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            ErrorCode::UpgradeRequired,
            format!("this endpoint is a WebSocket: {}", e.body_text()),
        )
    })?;
    let ack_every = params.ack_every.unwrap_or(100);
    if !(1..=10_000).contains(&ack_every) {
        return Err(ApiError::invalid_parameter(format!(
            "ack_every={ack_every} is not in 1..=10000"
        )));
    }
    Ok(ws.on_upgrade(move |socket| run(state, socket, ack_every)))
}

async fn run(state: AppState, mut socket: WebSocket, ack_every: usize) {
    let mut tally = BatchTally::default();
    let mut pending = 0usize;
    let mut index = 0usize;
    // The first timed ack is due a second from now, not at once.
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let item = match msg {
                    Some(Ok(Message::Text(t))) => decode_item(&t),
                    Some(Ok(Message::Binary(_))) => Err(ApiError::invalid_json("binary frame; send each update as a text frame")),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                };
                match state.svc.apply_items(vec![item]).await {
                    Ok(one) => {
                        tally.applied += one.applied;
                        tally.stale += one.stale;
                        if let Some(r) = one.rejected.into_iter().next() {
                            tally.reject(index, &r.error.into());
                        }
                    }
                    Err(e) => tally.reject(index, &e),
                }
                index += 1;
                pending += 1;
                if pending >= ack_every && !send_ack(&mut socket, &mut tally, &mut pending).await {
                    break;
                }
            }
            _ = tick.tick() => {
                if pending > 0 && !send_ack(&mut socket, &mut tally, &mut pending).await {
                    break;
                }
            }
        }
    }
    if pending > 0 {
        let _ = send_ack(&mut socket, &mut tally, &mut pending).await;
    }
}

/// Sends the ack for the updates since the last one; false if the socket is gone.
async fn send_ack(socket: &mut WebSocket, tally: &mut BatchTally, pending: &mut usize) -> bool {
    let body = serde_json::to_string(&std::mem::take(tally)).unwrap_or_else(|_| "{}".to_owned());
    *pending = 0;
    socket.send(Message::Text(body.into())).await.is_ok()
}
