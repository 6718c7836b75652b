//! Untrusted HTTP bodies through the real router: every response is a
//! status with a body, never a panic, and the server keeps answering.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::Request;
use hexmatch::{Engine, EngineConfig};
use hexmatch_server::api::{Shared, app};
use hexmatch_server::telemetry::metrics_handle;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ROUTES: [(&str, &str); 6] = [
    ("PUT", "/v1/drivers/d1"),
    ("POST", "/v1/drivers/d1/location"),
    ("POST", "/v1/locations"),
    ("POST", "/v1/matches"),
    ("POST", "/v1/matches/batch"),
    ("POST", "/v1/matches/o1/release"),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let (method, path) = ROUTES[usize::from(selector) % ROUTES.len()];
    let content_type = if selector & 0x80 == 0 { "application/json" } else { "application/x-ndjson" };
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("config"));
    let state = Arc::new(Shared::new(engine, hexmatch_server::ServeConfig::default(), metrics_handle()));
    state.ready.store(true, std::sync::atomic::Ordering::Release);
    let router = app(state);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(Body::from(body.to_vec()))
        .expect("request");
    let resp = runtime().block_on(router.oneshot(req)).expect("infallible");
    assert!(resp.status().as_u16() < 500 || resp.status().as_u16() == 503, "{}", resp.status());
});
