//! Who may call what. Every `/v1` request passes [`v1_gate`] first, in
//! this order (one middleware rather than several: each layer costs an
//! allocation and a boxed future per request):
//!
//! 1. **Credentials.** A request carrying the cluster secret
//!    ([`PEER_AUTH`]) is a node's; a wrong secret is refused. Any other
//!    request is a client's: when tokens are configured it needs one of
//!    them as `Authorization: Bearer`. Peer headers a client copies
//!    ([`FORWARDED`]) are dropped, so they change nothing.
//! 2. **Scope**: a named token (`--tokens-file`) opens only the routes of
//!    its scopes (`read`, `locations`, `matches`, `admin`); 403
//!    `forbidden` otherwise. Its name goes into the request's log span.
//! 3. **Rate limit**, per client: keyed on the verified token when tokens
//!    are configured, else on the peer address; an unverified header
//!    never creates a bucket. Nodes are not limited: the node a client
//!    reached has already counted the request.
//! 4. **Readiness**: 503 `not_ready` until start-up (the snapshot
//!    restore) is done, so no update races it.
//! 5. **Cluster routing** ([`super::forward`]).
//!
//! The node-only routes under `/internal/v1` pass [`peer_gate`] instead,
//! which admits the cluster secret only: a client token, however valid,
//! gets 403 `forbidden`.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};

use super::AppState;
use crate::cluster::peer::{FORWARDED, PEER_AUTH, PEER_NODE};
use crate::config::{ClientToken, ServeConfig, TokenScope};
use crate::error::{ApiError, ErrorCode};

/// The rate-limit key of a client, as the gate verified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// The configured token at this index.
    Token(usize),
    /// A JWT's subject, by its hash.
    Subject(u64),
    /// A client of a server without tokens, by address.
    Peer(IpAddr),
    /// No address known (in-process tests).
    Unknown,
}

/// The per-client rate limiter.
pub type Limiter = governor::DefaultKeyedRateLimiter<ClientKey>;

/// The limiter `config` asks for (`None`: no rate limit).
pub(super) fn limiter(config: &ServeConfig) -> Option<Limiter> {
    let per_s = NonZeroU32::new(config.rate_limit_per_s)?;
    let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
    Some(RateLimiter::keyed(
        Quota::per_second(per_s).allow_burst(burst),
    ))
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// A client, verified.
    Client(ClientKey),
    /// A client with a valid JWT: its subject and scopes.
    Jwt(ClientKey, ClientToken),
    /// Another node of the cluster.
    Node,
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

/// Whether the request is a node's: `Some(true)` with the right secret
/// (or, in an insecure cluster, when it names its node), `Some(false)`
/// with a wrong one, `None` when it does not claim to be a node.
fn node_credential(config: &ServeConfig, headers: &HeaderMap) -> Option<bool> {
    if !config.cluster {
        // No nodes to hear from: peer headers are a client's, and mean nothing.
        return None;
    }
    match (headers.get(PEER_AUTH), &config.cluster_secret) {
        (Some(sent), Some(secret)) => Some(constant_time_eq(
            sent.as_bytes(),
            secret.expose().as_bytes(),
        )),
        (Some(_), None) => Some(false),
        (None, None) if config.insecure_cluster => headers.contains_key(PEER_NODE).then_some(true),
        (None, _) => None,
    }
}

fn client_key(tokens: &[ClientToken], req: &Request) -> Result<ClientKey, ApiError> {
    if tokens.is_empty() {
        return Ok(req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(ClientKey::Unknown, |c| ClientKey::Peer(c.0.ip())));
    }
    let Some(sent) = bearer(req.headers()) else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing Authorization: Bearer <token>",
        ));
    };
    tokens
        .iter()
        .position(|t| constant_time_eq(t.token.expose().as_bytes(), sent.as_bytes()))
        .map(ClientKey::Token)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "the bearer token is not valid"))
}

fn authenticate(
    config: &ServeConfig,
    tokens: &[ClientToken],
    jwt: Option<&super::jwt::JwtVerifier>,
    req: &Request,
) -> Result<Caller, ApiError> {
    match node_credential(config, req.headers()) {
        Some(true) => return Ok(Caller::Node),
        Some(false) => {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the cluster secret is not valid",
            ));
        }
        None => {}
    }
    let Some(jwt) = jwt else {
        return client_key(tokens, req).map(Caller::Client);
    };
    let Some(sent) = bearer(req.headers()) else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "missing Authorization: Bearer <token>",
        ));
    };
    // Static tokens first; then the token must be a valid JWT.
    if !tokens.is_empty()
        && let Ok(key) = client_key(tokens, req)
    {
        return Ok(Caller::Client(key));
    }
    let token = jwt.verify(sent)?;
    let key = ClientKey::Subject(std::hash::BuildHasher::hash_one(
        &foldhash::fast::FixedState::default(),
        &token.name,
    ));
    Ok(Caller::Jwt(key, token))
}

/// The scope a `/v1` request needs.
fn required_scope(method: &Method, path: &str) -> TokenScope {
    // The second segment is enough (`/v1/<resource>/…`); no allocation.
    let resource = path.trim_start_matches('/').split('/').nth(1).unwrap_or("");
    match (method, resource) {
        // An area query with its area in the body reads.
        (&Method::POST, "drivers") if path == "/v1/drivers/within" => TokenScope::Read,
        (&Method::DELETE, _) => TokenScope::Admin,
        // The WebSocket stream writes locations, though it opens with a GET.
        (_, "locations") | (&Method::PUT | &Method::POST, "drivers") => TokenScope::Locations,
        (&Method::GET | &Method::HEAD, _) => TokenScope::Read,
        (_, "matches") => TokenScope::Matches,
        _ => TokenScope::Admin,
    }
}

/// 403 unless the token's scopes cover the request.
fn check_scope(token: &ClientToken, req: &Request) -> Result<(), ApiError> {
    let needed = required_scope(req.method(), req.uri().path());
    if token.allows(needed) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::Forbidden,
        format!(
            "the token {:?} has no {} scope, which {} {} needs",
            token.name,
            needed.as_str(),
            req.method(),
            req.uri().path()
        ),
    ))
}

/// The gate of every `/v1` request (see the module doc).
pub(super) async fn v1_gate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let config = &state.svc.config;
    let caller = match authenticate(config, &state.tokens, state.jwt.as_ref(), &req) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let (key, token) = match &caller {
        Caller::Client(key @ ClientKey::Token(i)) => (Some(*key), state.tokens.get(*i)),
        Caller::Client(key) => (Some(*key), None),
        Caller::Jwt(key, token) => (Some(*key), Some(token)),
        Caller::Node => (None, None),
    };
    if let Some(token) = token {
        tracing::Span::current().record("client", token.name.as_str());
        if let Err(e) = check_scope(token, &req) {
            return e.into_response();
        }
    }
    if let Some(key) = key {
        if let Some(limiter) = &state.limiter
            && let Err(not_until) = limiter.check_key(&key)
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return ApiError::rate_limited(round_up_s(wait)).into_response();
        }
        // Only cluster routing reads it.
        if config.cluster {
            req.headers_mut().remove(FORWARDED);
        }
    }
    if !state.svc.is_ready() {
        return ApiError::new(
            ErrorCode::NotReady,
            "start-up is not finished (restoring the snapshot)",
        )
        .into_response();
    }
    super::forward::route(&state, req, next).await
}

/// The gate of the node-only routes: the cluster secret, nothing else.
pub(super) async fn peer_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let config = &state.svc.config;
    match node_credential(config, req.headers()) {
        Some(true) if config.cluster => {}
        Some(false) => {
            return ApiError::new(ErrorCode::Unauthorized, "the cluster secret is not valid")
                .into_response();
        }
        _ => {
            return ApiError::new(
                ErrorCode::Forbidden,
                "a node-to-node operation: it answers only to the cluster's nodes",
            )
            .into_response();
        }
    }
    if !state.svc.is_ready() {
        return ApiError::new(ErrorCode::NotReady, "start-up is not finished").into_response();
    }
    next.run(req).await
}

/// Whole seconds to wait, at least one.
fn round_up_s(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn request(headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().uri("/v1/regions");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    fn config(tokens: &[&str], secret: Option<&str>) -> ServeConfig {
        ServeConfig {
            api_tokens: tokens.iter().map(|t| (*t).to_owned()).collect(),
            cluster: secret.is_some(),
            cluster_secret: secret.map(Secret::new),
            ..ServeConfig::default()
        }
    }

    #[test]
    fn callers_are_told_apart_by_what_they_prove() {
        let c = config(&["tok-a", "tok-b"], Some("the-cluster-secret-1234"));
        let tokens = c.client_tokens();
        let auth =
            |h: &[(&str, &str)]| authenticate(&c, &tokens, None, &request(h)).map_err(|e| e.code());
        assert_eq!(
            auth(&[("authorization", "Bearer tok-b")]),
            Ok(Caller::Client(ClientKey::Token(1)))
        );
        assert_eq!(auth(&[]), Err(ErrorCode::Unauthorized));
        assert_eq!(
            auth(&[("authorization", "Bearer nope")]),
            Err(ErrorCode::Unauthorized)
        );
        assert_eq!(
            auth(&[(PEER_AUTH, "the-cluster-secret-1234")]),
            Ok(Caller::Node)
        );
        // A client token is no node credential, and a wrong secret is refused
        // even beside a valid client token.
        assert_eq!(
            auth(&[(PEER_AUTH, "tok-a"), ("authorization", "Bearer tok-a")]),
            Err(ErrorCode::Unauthorized)
        );
        // Naming a node proves nothing when a secret is configured.
        assert_eq!(auth(&[(PEER_NODE, "a")]), Err(ErrorCode::Unauthorized));
    }

    #[test]
    fn without_tokens_an_unverified_header_creates_no_bucket() {
        let c = config(&[], None);
        let keys: Vec<_> = (0..5)
            .map(|i| {
                let mut r = request(&[("authorization", &format!("Bearer made-up-{i}"))]);
                r.extensions_mut()
                    .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 9], 4000 + i))));
                authenticate(&c, &[], None, &r).unwrap()
            })
            .collect();
        assert!(
            keys.iter()
                .all(|k| *k == Caller::Client(ClientKey::Peer([127, 0, 0, 9].into())))
        );
    }

    #[test]
    fn an_insecure_cluster_admits_named_nodes_only_without_a_secret() {
        let c = ServeConfig {
            cluster: true,
            insecure_cluster: true,
            ..ServeConfig::default()
        };
        assert_eq!(
            node_credential(&c, request(&[(PEER_NODE, "a")]).headers()),
            Some(true)
        );
        assert_eq!(node_credential(&c, request(&[]).headers()), None);
        assert_eq!(
            node_credential(&c, request(&[(PEER_AUTH, "x")]).headers()),
            Some(false)
        );
    }

    #[test]
    fn every_route_needs_the_scope_of_what_it_does() {
        use TokenScope::{Admin, Locations, Matches, Read};
        for (method, path, scope) in [
            (Method::GET, "/v1/drivers/nearest", Read),
            (Method::GET, "/v1/drivers/d1", Read),
            (Method::GET, "/v1/matches/o1", Read),
            (Method::GET, "/v1/regions", Read),
            (Method::GET, "/v1/cluster", Read),
            (Method::GET, "/v1/drivers", Read),
            (Method::POST, "/v1/drivers/within", Read),
            (Method::GET, "/v1/regions/r1/stats", Read),
            (Method::GET, "/v1/density", Read),
            (Method::GET, "/v1/events", Read),
            (Method::PUT, "/v1/drivers/d1", Locations),
            (Method::POST, "/v1/drivers/d1/location", Locations),
            (Method::POST, "/v1/locations", Locations),
            (Method::GET, "/v1/locations/stream", Locations),
            (Method::POST, "/v1/matches", Matches),
            (Method::POST, "/v1/matches/batch", Matches),
            (Method::POST, "/v1/matches/o1/confirm", Matches),
            (Method::POST, "/v1/matches/o1/release", Matches),
            (Method::POST, "/v1/matches/o1/complete", Matches),
            (Method::DELETE, "/v1/drivers/d1", Admin),
        ] {
            assert_eq!(required_scope(&method, path), scope, "{method} {path}");
        }
    }

    #[test]
    fn waits_round_up_to_whole_seconds() {
        assert_eq!(round_up_s(Duration::from_millis(1)), 1);
        assert_eq!(round_up_s(Duration::from_secs(2)), 2);
        assert_eq!(round_up_s(Duration::from_millis(2001)), 3);
    }
}
