//! Operations and topology: `/livez`, `/readyz`, `/metrics`,
//! `GET /v1/regions`, `GET /v1/cluster`.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use super::AppState;
use crate::wire::{ClusterOut, ReadyOut, ReadyStatus, RegionOut};

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/livez", tag = "ops", responses((status = 200, description = "Alive", body = String)))]
pub(super) async fn livez() -> &'static str {
    "ok"
}

/// Readiness: 200 once start-up is done and Redis (when configured) is
/// reachable; 503 with the reason otherwise.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Ready", body = ReadyOut),
    (status = 503, description = "Not ready, or degraded (Redis unreachable)", body = ReadyOut),
))]
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<ReadyOut>) {
    let r = state.svc.readiness();
    let code = if r.status == ReadyStatus::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text", body = String)))]
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.svc.refresh_gauges();
    crate::telemetry::process::refresh();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Regions with their cells, drivers and owner.
#[utoipa::path(get, path = "/v1/regions", tag = "cluster", responses((status = 200, description = "Every region, with its cells, drivers and owner", body = [RegionOut])))]
pub(super) async fn regions(State(state): State<AppState>) -> Json<Vec<RegionOut>> {
    Json(state.svc.regions())
}

/// This node, the region → node map and lease epochs.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster", responses((status = 200, description = "This node's id, the map version, every region's owner, the nodes, and the regions this node serves with their leases", body = ClusterOut)))]
pub(super) async fn cluster(State(state): State<AppState>) -> Json<ClusterOut> {
    Json(state.svc.cluster_view())
}
