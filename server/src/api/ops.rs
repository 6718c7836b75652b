//! Operations and topology: `/livez`, `/readyz`, `/metrics`,
//! `GET /v1/regions`, `GET /v1/cluster`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use metrics::gauge;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::model::{ClusterOut, DEFAULT_REGION, NodeOut, RegionOut, RegionOwner};

/// Liveness: 200 while the process runs.
#[utoipa::path(get, path = "/livez", tag = "ops", responses((status = 200, description = "Alive", body = String)))]
pub(crate) async fn livez() -> &'static str {
    "ok"
}

/// Readiness report.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReadyOut {
    /// `ready`, `not_ready` or `degraded` (Redis down).
    pub(crate) status: &'static str,
    /// `disabled` (memory only), `up` or `down`.
    pub(crate) redis: &'static str,
    /// Why the node is not ready, if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// Readiness: 200 once start-up (driver load, snapshot restore) is done.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, description = "Ready", body = ReadyOut),
    (status = 503, description = "Not ready", body = ReadyOut),
))]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<ReadyOut>) {
    let persist = state.persist.get();
    let redis = match (&state.config.redis_url, persist) {
        (None, _) => "disabled",
        (Some(_), Some(p)) if p.is_up() => "up",
        (Some(_), _) => "down",
    };
    let (status, reason) = if !state.ready.load(Ordering::Acquire) {
        (
            "not_ready",
            Some(
                "start-up is not finished (connecting to Redis, restoring the snapshot)".to_owned(),
            ),
        )
    } else if redis == "down" {
        (
            "degraded",
            Some("Redis is unreachable: serving from memory, match changes refused".to_owned()),
        )
    } else {
        ("ready", None)
    };
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(ReadyOut {
            status,
            redis,
            reason,
        }),
    )
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let counts = state.engine.counts();
    for (status, n) in [
        ("available", counts.available),
        ("reserved", counts.reserved),
        ("busy", counts.busy),
        ("offline", counts.offline),
    ] {
        gauge!("hexmatch_drivers", "status" => status).set(n as f64);
    }
    gauge!("hexmatch_matches_live").set(state.engine.live_matches() as f64);
    gauge!("hexmatch_cells").set(state.engine.cell_count() as f64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Regions with their cell and driver counts.
#[utoipa::path(get, path = "/v1/regions", tag = "cluster", responses((status = 200, body = [RegionOut])))]
pub(crate) async fn regions(State(state): State<AppState>) -> Json<Vec<RegionOut>> {
    let owner = state.config.node_id.clone();
    let map_now = state.cluster.get().map(|c| c.map());
    let owner_of = |region: &str| match &map_now {
        Some(m) => m
            .owners
            .get(region)
            .map_or_else(String::new, |(node, _)| node.clone()),
        None => owner.clone(),
    };
    let occupied: Vec<_> = state
        .engine
        .cell_counts()
        .into_iter()
        .filter(|(_, c)| c.total() > 0)
        .collect();
    let Some(map) = &state.regions else {
        let drivers = occupied.iter().map(|(_, c)| c.total()).sum();
        let out = RegionOut {
            region: DEFAULT_REGION.to_owned(),
            name: String::new(),
            cells: occupied.len(),
            drivers,
            owner,
        };
        return Json(vec![out]);
    };
    // Drivers per region, and the occupied cells outside every polygon.
    let mut drivers: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut outside_cells: std::collections::BTreeMap<String, usize> =
        std::collections::BTreeMap::new();
    for (cell, counts) in &occupied {
        let Ok(region) = map.region_of_cell(*cell) else {
            continue;
        };
        let region = region.to_string();
        *drivers.entry(region.clone()).or_default() += counts.total();
        if region.starts_with("outside-") {
            *outside_cells.entry(region).or_default() += 1;
        }
    }
    let mut out: Vec<RegionOut> = map
        .regions()
        .iter()
        .map(|r| RegionOut {
            region: r.id.to_string(),
            name: r.name.clone(),
            cells: r.cells.len(),
            drivers: drivers.get(r.id.as_str()).copied().unwrap_or(0),
            owner: owner_of(r.id.as_str()),
        })
        .collect();
    out.extend(outside_cells.into_iter().map(|(region, cells)| RegionOut {
        drivers: drivers.get(&region).copied().unwrap_or(0),
        owner: owner_of(&region),
        region,
        name: String::new(),
        cells,
    }));
    Json(out)
}

/// This node, the region → node map and lease epochs.
#[utoipa::path(get, path = "/v1/cluster", tag = "cluster", responses((status = 200, body = ClusterOut)))]
pub(crate) async fn cluster(State(state): State<AppState>) -> Json<ClusterOut> {
    let node = state.config.node_id.clone();
    if let Some(c) = state.cluster.get() {
        let map = c.map();
        let mut regions: Vec<RegionOwner> = map
            .owners
            .iter()
            .map(|(region, (owner, epoch))| RegionOwner {
                region: region.clone(),
                owner: owner.clone(),
                epoch: *epoch,
            })
            .collect();
        regions.sort_by(|a, b| a.region.cmp(&b.region));
        let mut nodes: Vec<NodeOut> = map
            .nodes
            .iter()
            .map(|(n, url)| NodeOut {
                node_id: n.clone(),
                url: url.clone(),
            })
            .collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        return Json(ClusterOut {
            node_id: node,
            map_version: map.version,
            regions,
            nodes,
            serving: c.held().into_iter().map(|(r, _)| r).collect(),
        });
    }
    Json(ClusterOut {
        node_id: node.clone(),
        map_version: 1,
        regions: region_ids(&state)
            .into_iter()
            .map(|region| RegionOwner {
                region,
                owner: node.clone(),
                epoch: 1,
            })
            .collect(),
        nodes: Vec::new(),
        serving: Vec::new(),
    })
}

/// Every region this node knows (one, `default`, without a region map).
fn region_ids(state: &AppState) -> Vec<String> {
    match &state.regions {
        Some(map) => map.regions().iter().map(|r| r.id.to_string()).collect(),
        None => vec![DEFAULT_REGION.to_owned()],
    }
}
