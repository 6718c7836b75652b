//! The HTTP API of `../shared/API.md` on axum.
//!
//! [`app`] builds the router: `/v1` routes behind bearer auth, per-client
//! rate limiting and load shedding; ops routes (`/livez`, `/readyz`,
//! `/metrics`, `/openapi.json`, `/docs`) outside them, so health checks
//! answer under load. Every error, axum's own rejections included, is
//! the JSON shape of [`ErrorBody`].

mod drivers;
mod error;
mod extract;
mod matches;
mod model;
mod ops;
mod peer;
mod stream;

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use foldhash::fast::FixedState;
use hexmatch::Engine;
use metrics::{counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;
use tower_governor::GovernorLayer;
use tower_governor::governor::{GovernorConfig, GovernorConfigBuilder};
use tower_governor::key_extractor::KeyExtractor;
use tower_http::compression::CompressionLayer;
use tower_http::compression::predicate::{NotForContentType, Predicate, SizeAbove};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

pub(crate) use drivers::{DeadLetter, apply_stream_entries, ingest_cluster_entries};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub(crate) use matches::claim_here;
pub(crate) use model::BatchTally;

use crate::config::ServeConfig;

/// The rate limiter's configuration type.
pub type Limiter = GovernorConfig<ClientKey, governor::middleware::NoOpMiddleware>;

/// What every handler shares.
#[derive(Debug)]
pub struct Shared {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The server's settings.
    pub config: ServeConfig,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Whether start-up is done (`/readyz`).
    pub ready: AtomicBool,
    /// The per-client rate limiter, if configured.
    pub limiter: Option<Arc<Limiter>>,
    /// Redis persistence, once connected and restored (when configured).
    pub persist: std::sync::OnceLock<Arc<crate::persist::Persistence>>,
    /// Regions from `--regions` (a `GeoJSON` file), if configured.
    pub regions: Option<hexmatch::RegionMap>,
    /// This node's view of the cluster, once joined (`--cluster`).
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// The router's state.
pub type AppState = Arc<Shared>;

impl Shared {
    /// The region a position belongs to: from the region map when one is
    /// configured (cells in no polygon go to an `outside-<cell>` region),
    /// else the single region `default`.
    pub(crate) fn region_name(&self, pos: hexmatch::Position) -> String {
        self.regions
            .as_ref()
            .and_then(|r| r.region_of(pos).ok())
            .map_or_else(|| model::DEFAULT_REGION.to_owned(), |id| id.to_string())
    }

    /// A match as the API shows it, with its region.
    pub(crate) fn match_out(&self, m: hexmatch::Match) -> model::MatchOut {
        let region = self.region_name(m.pickup);
        model::MatchOut { region, ..m.into() }
    }

    /// The persistence layer that match changes must go through: `Ok(None)`
    /// when running memory-only, an error (503) while Redis is configured
    /// but down, so no match changes without being durable.
    pub(crate) fn durable(&self) -> Result<Option<&Arc<crate::persist::Persistence>>, ApiError> {
        if self.config.redis_url.is_none() {
            return Ok(None);
        }
        match self.persist.get() {
            Some(p) if p.is_up() => Ok(Some(p)),
            _ => Err(ApiError::new(
                "unavailable",
                "Redis is unreachable; match changes are refused until it returns",
            )),
        }
    }
}

impl Shared {
    /// State for `engine` under `config`, not yet ready.
    pub fn new(engine: Arc<Engine>, config: ServeConfig, metrics: PrometheusHandle) -> Self {
        let limiter = (config.rate_limit_per_s > 0).then(|| {
            let period = Duration::from_nanos(1_000_000_000 / u64::from(config.rate_limit_per_s));
            let built = GovernorConfigBuilder::default()
                .period(period)
                .burst_size(config.rate_limit_burst.max(1))
                .key_extractor(ClientKey)
                .finish();
            Arc::new(built.unwrap_or_else(|| unreachable!("period and burst are positive")))
        });
        Self {
            engine,
            config,
            metrics,
            ready: AtomicBool::new(false),
            limiter,
            persist: std::sync::OnceLock::new(),
            regions: None,
            cluster: std::sync::OnceLock::new(),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hexmatch",
        description = "Exact nearest-driver search and atomic matching. Errors are `{\"error\": {\"code\", \"message\"}}`; see API.md for the codes.",
    ),
    tags(
        (name = "drivers", description = "Drivers and location updates"),
        (name = "matching", description = "Nearest drivers and matches"),
        (name = "cluster", description = "Regions and nodes"),
        (name = "ops", description = "Health, readiness and metrics"),
    ),
    components(schemas(ErrorBody, ErrorDetail)),
)]
struct ApiDoc;

/// Declares the optional bearer token on `/v1` operations.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        for (path, item) in &mut openapi.paths.paths {
            if !path.starts_with("/v1/") {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                op.security = Some(vec![SecurityRequirement::new(
                    "bearer",
                    Vec::<String>::new(),
                )]);
            }
        }
    }
}

/// The `/v1` routes, documented.
fn v1_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(
            drivers::put_driver,
            drivers::get_driver,
            drivers::delete_driver
        ))
        .routes(routes!(drivers::post_location))
        .routes(routes!(drivers::post_locations))
        .routes(routes!(stream::stream))
        .routes(routes!(matches::nearest))
        .routes(routes!(matches::create_match))
        .routes(routes!(matches::get_match))
        .routes(routes!(matches::confirm))
        .routes(routes!(matches::release))
        .routes(routes!(matches::complete))
        .routes(routes!(matches::batch))
        .routes(routes!(ops::regions))
        .routes(routes!(ops::cluster))
        .routes(routes!(peer::reserve))
        .routes(routes!(peer::handoff))
}

/// The ops routes, documented.
fn ops_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ops::livez))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
}

/// The document served at `/openapi.json`: exactly the routes [`app`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = OpenApiRouter::<AppState>::with_openapi(ApiDoc::openapi())
        .merge(v1_routes())
        .merge(ops_routes())
        .into_openapi();
    utoipa::Modify::modify(&BearerAuth, &mut doc);
    doc
}

/// Builds the router for `state`.
pub fn app(state: AppState) -> Router {
    // Layers are grouped with `ServiceBuilder`, one `Router::layer` call
    // per group: every such call boxes each route once more, which costs
    // an allocation and a boxed future per request.
    //
    // `/v1`, outermost first: token, readiness and cluster routing (one
    // middleware), the per-client rate limit when configured, then one
    // semaphore for all of /v1 with load shedding and the request timeout
    // (`Router::layer` wraps each route on its own, so a plain concurrency
    // limit would count per route).
    let limiter = state.limiter.as_ref().map(|limiter| {
        GovernorLayer::new(Arc::clone(limiter)).error_handler(|e| match e {
            tower_governor::GovernorError::TooManyRequests { wait_time, .. } => {
                ApiError::rate_limited(wait_time).into_response()
            }
            other => ApiError::new("internal", other.to_string()).into_response(),
        })
    });
    let v1 = v1_routes().layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn_with_state(state.clone(), v1_gate))
            .option_layer(limiter)
            .layer(HandleErrorLayer::new(shed_error))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                state.config.max_in_flight.max(1),
            ))
            .timeout(Duration::from_millis(
                state.config.request_timeout_ms.max(1),
            )),
    );
    let (router, _) = v1.merge(ops_routes()).split_for_parts();
    let compress = SizeAbove::new(1024).and(NotForContentType::const_new("text/event-stream"));
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()))
        .fallback(|| async { ApiError::new("not_found", "no such route; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                "method_not_allowed",
                "method not allowed on this route; see /openapi.json",
            )
        })
        // Every route, outermost first.
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(Sequential::default()))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::debug_span!("http", method = %req.method(), uri = %req.uri(), request_id = %id)
                }))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(middleware::from_fn(track_http))
                .layer(CompressionLayer::new().compress_when(compress))
                .layer(DefaultBodyLimit::max(state.config.body_limit_bytes)),
        )
        .with_state(state)
}

/// Maps the load-shedding stack's errors to API errors.
async fn shed_error(err: BoxError) -> ApiError {
    if err.is::<tower::load_shed::error::Overloaded>() {
        counter!("hexmatch_http_shed_total").increment(1);
        ApiError::new("overloaded", "too many requests in flight; retry shortly")
    } else if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            "timeout",
            "the request took longer than the configured timeout",
        )
    } else {
        ApiError::new("internal", err.to_string())
    }
}

/// Rate-limit key: the bearer token when one is sent, else the peer IP.
#[derive(Debug, Clone, Copy)]
pub struct ClientKey;

impl KeyExtractor for ClientKey {
    type Key = String;

    fn extract<T>(
        &self,
        req: &axum::http::Request<T>,
    ) -> Result<Self::Key, tower_governor::GovernorError> {
        if let Some(token) = bearer(req.headers()) {
            return Ok(format!("token:{token}"));
        }
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        Ok(peer.unwrap_or_else(|| "unknown".to_owned()))
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares in time independent of where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What every `/v1` request passes first, in this order: the bearer token
/// (when tokens are configured), readiness (503 `not_ready` until start-up,
/// the snapshot restore, is done, so no update races it), then the cluster
/// router. One middleware rather than three: each layer costs an
/// allocation and a boxed future per request.
async fn v1_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(refused) = check_token(&state.config.api_tokens, req.headers()) {
        return refused;
    }
    if !state.ready.load(Ordering::Acquire) {
        return ApiError::new(
            "not_ready",
            "start-up is not finished (restoring the snapshot)",
        )
        .into_response();
    }
    crate::cluster::route::route(&state, req, next).await
}

/// The 401 for a request without a valid bearer token, when tokens are
/// configured.
fn check_token(tokens: &[String], headers: &HeaderMap) -> Option<Response> {
    if tokens.is_empty() {
        return None;
    }
    match bearer(headers) {
        Some(t)
            if tokens
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), t.as_bytes())) =>
        {
            None
        }
        Some(_) => {
            Some(ApiError::new("unauthorized", "the bearer token is not valid").into_response())
        }
        None => Some(
            ApiError::new("unauthorized", "missing Authorization: Bearer <token>").into_response(),
        ),
    }
}

/// One route's metric handles, for one method and status.
struct RouteMetrics {
    route: Box<str>,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

thread_local! {
    /// Metric handles by (hash of the route, method, status), per request
    /// thread: registering a labelled metric allocates its labels and
    /// looks it up in the recorder's registry, on every request. Bounded:
    /// routes are templates, methods outside the standard ones share one
    /// label, statuses are few.
    static ROUTE_METRICS: RefCell<
        HashMap<(u64, &'static str, u16), RouteMetrics, FixedState>,
    > = RefCell::default();
}

/// The `method` label: standard methods by name, any other as `other`, so
/// a client cannot create label values.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Per-route request counts and latency histograms.
async fn track_http(req: Request, next: Next) -> Response {
    let started = Instant::now();
    // A clone of the matched path is a reference count, not a copy.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let method = method_label(req.method());
    let resp = next.run(req).await;
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let status = resp.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    let record = |m: &RouteMetrics| {
        m.requests.increment(1);
        m.duration.record(elapsed);
    };
    ROUTE_METRICS.with_borrow_mut(|cache| {
        let hash = BuildHasher::hash_one(&FixedState::default(), route);
        match cache.get(&(hash, method, status)) {
            Some(m) if *m.route == *route => record(m),
            // Two routes whose hashes collide: the second goes uncached.
            Some(_) => record(&route_metrics(route, method, status)),
            None => {
                let m = route_metrics(route, method, status);
                record(&m);
                cache.insert((hash, method, status), m);
            }
        }
    });
    resp
}

fn route_metrics(route: &str, method: &'static str, status: u16) -> RouteMetrics {
    RouteMetrics {
        route: route.into(),
        requests: counter!("hexmatch_http_requests_total", "route" => route.to_owned(), "method" => method, "status" => status.to_string()),
        duration: histogram!("hexmatch_http_request_duration_seconds", "route" => route.to_owned(), "method" => method),
    }
}

/// Request ids `1`, `2`, … per process (a client's own `x-request-id` header is kept).
#[derive(Debug, Clone, Default)]
struct Sequential(Arc<AtomicU64>);

impl MakeRequestId for Sequential {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        Some(RequestId::new(HeaderValue::from(n)))
    }
}
