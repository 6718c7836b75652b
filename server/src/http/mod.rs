//! The HTTP transport on axum: routes, extractors, middleware and the
//! `OpenAPI` document. A handler decodes the request, calls the
//! [`Service`] and encodes the answer; nothing
//! else.
//!
//! [`app`] builds the router:
//! - `/v1`: the client API of `docs/API.md`, behind the gate (client
//!   token or cluster secret, per-client rate limit, readiness, cluster
//!   routing), load shedding and a timeout; `/v1/events` is the SSE feed
//!   of the event bus (`events.rs`);
//! - `/internal/v1`: the node-only operations of the peer channel
//!   (`internal.rs`), answering only to the cluster secret;
//! - ops routes (`/livez`, `/readyz`, `/metrics`, `/openapi.json`,
//!   `/docs`) outside both, so health checks answer under load.
//!
//! Every error, axum's own rejections included, is the JSON shape of
//! [`ErrorBody`].

mod areas;
mod conn;
mod drivers;
mod events;
mod extract;
mod forward;
mod gate;
mod internal;
pub mod jwt;
pub mod listen;
mod matches;
mod ops;
mod stream;

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::error_handling::HandleErrorLayer;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{BoxError, Router};
use foldhash::fast::FixedState;
use metrics::{counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceBuilder;
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

pub use self::gate::Limiter;
use crate::error::{ApiError, ErrorBody, ErrorCode, ErrorDetail};
use crate::service::Service;

/// What every handler shares: the service, and what only HTTP needs.
#[derive(Debug)]
pub struct HttpState {
    /// The service layer.
    pub svc: Arc<Service>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The per-client rate limiter, if configured.
    pub limiter: Option<Arc<Limiter>>,
    /// The client tokens (none, and no JWT keys: `/v1` is open).
    pub tokens: Vec<crate::config::ClientToken>,
    /// The keys client JWTs are checked against, if any.
    pub jwt: Option<jwt::JwtVerifier>,
}

/// The router's state.
pub type AppState = Arc<HttpState>;

impl HttpState {
    /// State for `svc`, with the rate limiter and credentials its
    /// settings ask for.
    ///
    /// # Errors
    /// A JWT key file that cannot be read or is not a key.
    pub fn new(svc: Arc<Service>, metrics: PrometheusHandle) -> Result<Self, String> {
        let limiter = gate::limiter(&svc.config).map(Arc::new);
        let tokens = svc.config.client_tokens();
        let jwt = jwt::JwtVerifier::from_config(&svc.config)?;
        Ok(Self {
            svc,
            metrics,
            limiter,
            tokens,
            jwt,
        })
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hexmatch",
        description = "Exact nearest-driver search and atomic matching. Errors are `{\"error\": {\"code\", \"message\"}}`; the codes and statuses are listed in docs/API.md of the repository. Limits with their defaults: a request head must arrive within 10 s of its first byte (`--header-read-timeout-ms`), a keep-alive connection idle for 60 s is closed (`--idle-timeout-ms`), a request that is not valid HTTP/1.1 is `400 malformed_request`, a target over 64 KiB `414 uri_too_long`, more than 100 headers or a head over the read buffer (about 400 KiB) `431 headers_too_large`, a body over 8 MiB (`--body-limit-bytes`) or a batch over 10000 items (`--max-batch-items`) `413 payload_too_large`, and a location `ts` more than 5 minutes ahead of the server's clock (`--max-clock-skew-ms`) `400 invalid_timestamp`.",
    ),
    tags(
        (name = "drivers", description = "Drivers and location updates"),
        (name = "matching", description = "Nearest drivers and matches"),
        (name = "areas", description = "Drivers in a box, a polygon or a region; counts per region and per H3 cell"),
        (name = "events", description = "The event feed: matches, drivers, zones"),
        (name = "cluster", description = "Regions and nodes"),
        (name = "ops", description = "Health, readiness and metrics"),
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode, crate::wire::EventGap, crate::wire::EventType)),
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
        .routes(routes!(events::events))
        .routes(routes!(ops::regions))
        .routes(routes!(ops::cluster))
        .routes(routes!(areas::list_drivers))
        .routes(routes!(areas::drivers_within))
        .routes(routes!(areas::region_stats))
        .routes(routes!(areas::density))
}

/// The ops routes, documented.
fn ops_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ops::livez))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
}

/// The document served at `/openapi.json`: exactly the client and ops
/// routes [`app`] serves (the node-only routes are not for clients).
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
    // `/v1`, outermost first: the gate (credentials, rate limit, readiness,
    // cluster routing: one middleware), then one semaphore for all of /v1
    // with load shedding and the request timeout (`Router::layer` wraps
    // each route on its own, so a plain concurrency limit would count per
    // route).
    let config = &state.svc.config;
    let v1 = v1_routes().layer(
        ServiceBuilder::new()
            .layer(middleware::from_fn_with_state(state.clone(), gate::v1_gate))
            .layer(HandleErrorLayer::new(shed_error))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                config.max_in_flight.max(1),
            ))
            .timeout(Duration::from_millis(config.request_timeout_ms.max(1))),
    );
    let internal = internal::routes().layer(middleware::from_fn_with_state(
        state.clone(),
        gate::peer_gate,
    ));
    let (router, _) = v1.merge(ops_routes()).split_for_parts();
    let compress = SizeAbove::new(1024).and(NotForContentType::const_new("text/event-stream"));
    router
        .merge(internal)
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route; see /openapi.json") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
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
                    tracing::debug_span!("http", method = %req.method(), uri = %req.uri(), request_id = %id, client = tracing::field::Empty)
                }))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(middleware::from_fn(track_http))
                .layer(CompressionLayer::new().compress_when(compress))
                .layer(DefaultBodyLimit::max(config.body_limit_bytes)),
        )
        .with_state(state)
}

/// Maps the load-shedding stack's errors to API errors.
async fn shed_error(err: BoxError) -> ApiError {
    if err.is::<tower::load_shed::error::Overloaded>() {
        counter!("hexmatch_http_shed_total").increment(1);
        ApiError::new(
            ErrorCode::Overloaded,
            "too many requests in flight; retry shortly",
        )
    } else if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            ErrorCode::Timeout,
            "the request took longer than the configured timeout",
        )
    } else {
        ApiError::internal(err.to_string())
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
