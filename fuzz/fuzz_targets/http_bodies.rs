//! Untrusted HTTP bodies through the real router, the node-only routes
//! included (with the cluster secret): every response is a status with a
//! body, never a panic, and the server keeps answering.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use hexmatch::{Engine, EngineConfig};
use hexmatch_server::config::Secret;
use hexmatch_server::http::{HttpState, app};
use hexmatch_server::service::Service;
use hexmatch_server::telemetry::metrics_handle;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ROUTES: [(&str, &str); 9] = [
    ("PUT", "/v1/drivers/d1"),
    ("POST", "/v1/drivers/d1/location"),
    ("POST", "/v1/locations"),
    ("POST", "/v1/matches"),
    ("POST", "/v1/matches/batch"),
    ("POST", "/v1/matches/o1/release"),
    ("POST", "/internal/v1/reserve"),
    ("POST", "/internal/v1/handoff"),
    ("POST", "/internal/v1/locations"),
];

const SECRET: &str = "fuzzing-cluster-secret-0123";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let (method, path) = ROUTES[usize::from(selector) % ROUTES.len()];
    let content_type = if selector & 0x80 == 0 { "application/json" } else { "application/x-ndjson" };
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("config"));
    // Cluster mode only for the peer routes' gate; no Redis, no peers.
    let config = hexmatch_server::ServeConfig {
        cluster: true,
        cluster_secret: Some(Secret::new(SECRET)),
        ..hexmatch_server::ServeConfig::default()
    };
    let svc = Arc::new(Service::new(engine, config, None));
    svc.set_ready();
    let router = app(Arc::new(HttpState::new(svc, metrics_handle()).expect("state")));
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .header("x-hexmatch-cluster-auth", SECRET)
        .body(Body::from(body.to_vec()))
        .expect("request");
    let resp = runtime().block_on(router.oneshot(req)).expect("infallible");
    assert!(resp.status().as_u16() < 500 || resp.status().as_u16() == 503, "{}", resp.status());
});
