//! Cluster routing of client requests, the last step of the `/v1` gate:
//! a request that names a region (`region` in a claim, an area query or
//! a nearest query, a region's stats) goes to that region's owner; one
//! that names a position (driver PUT, location, claim) to the owner of
//! its region; one that names an order to the owner of the region
//! recorded for the order. The rest is served here.
//!
//! A forwarded request travels over the peer channel
//! ([`PeerClient::forward`](crate::cluster::peer::PeerClient::forward)):
//! the node's secret instead of the client's token, plus `FORWARDED`. It
//! is never forwarded twice: a node that does not own the region (any
//! more) answers 421 `not_owner`. The sender then re-reads the map and
//! tries the owner it names; an owner that does not answer within the
//! lease TTL is treated the same way, until a new owner serves the
//! region or twice the lease TTL plus a second has passed (503). Every
//! response of a cluster node says who answered in `x-hexmatch-served-by`.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hexmatch::{OrderId, Position};
use serde::Deserialize;

use super::AppState;
use crate::cluster::peer::{FORWARDED, Forward, Forwarded, SERVED_BY};
use crate::cluster::{Cluster, Owner};
use crate::error::{ApiError, ErrorCode};

/// What the router needs to know about a request to route it.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// Carries a position (`lat`/`lon`, or `pickup`): goes to its region's owner.
    Position,
    /// Names an order: goes to the owner of the order's match.
    Order(String),
    /// May name a region in its query string (`region=`): goes to its
    /// owner if it does.
    RegionQuery,
    /// Names a region in its path: goes to its owner.
    Region(String),
    /// Served here.
    Here,
}

fn classify(method: &Method, path: &str) -> Kind {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::PUT, ["v1", "drivers", _])
        | (
            &Method::POST,
            ["v1", "drivers", _, "location"] | ["v1", "matches"] | ["v1", "drivers", "within"],
        ) => Kind::Position,
        (&Method::GET, ["v1", "drivers"] | ["v1", "drivers", "nearest"]) => Kind::RegionQuery,
        (&Method::GET, ["v1", "regions", region, "stats"]) => Kind::Region((*region).to_owned()),
        (&Method::GET, ["v1", "matches", order])
        | (&Method::POST, ["v1", "matches", order, "confirm" | "release" | "complete"]) => {
            Kind::Order((*order).to_owned())
        }
        _ => Kind::Here,
    }
}

/// The region a query string names (`region=`), if any.
fn region_param(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "region")
        .map(|(_, v)| v.into_owned())
}

/// The region a body names (`"region": "…"` at the top), if it parses.
fn region_in(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        region: Option<String>,
    }
    serde_json::from_slice::<Probe>(bytes).ok()?.region
}

/// The position a body names, if it parses: `lat`/`lon` at the top, or
/// `pickup.lat`/`pickup.lon`. Anything else is left to the handler, which
/// gives the precise error.
fn position_in(bytes: &[u8]) -> Option<Position> {
    #[derive(Deserialize)]
    struct LatLon {
        lat: f64,
        lon: f64,
    }
    #[derive(Deserialize)]
    struct Probe {
        lat: Option<f64>,
        lon: Option<f64>,
        pickup: Option<LatLon>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    let ((Some(lat), Some(lon), _) | (_, _, Some(LatLon { lat, lon }))) = (p.lat, p.lon, p.pickup)
    else {
        return None;
    };
    Position::new(lat, lon).ok()
}

/// `resp` naming who answered (`node`: one id, or several comma-separated),
/// unless it already does.
pub(super) fn served_by(mut resp: Response, node: &str) -> Response {
    if !resp.headers().contains_key(SERVED_BY)
        && let Ok(v) = HeaderValue::from_str(node)
    {
        resp.headers_mut().insert(SERVED_BY, v);
    }
    resp
}

/// Serves here what this node owns, forwards the rest to the owner.
pub(super) async fn route(state: &AppState, req: Request, next: Next) -> Response {
    let Some(cluster) = state.svc.cluster().cloned() else {
        return next.run(req).await;
    };
    let region = match classify(req.method(), req.uri().path()) {
        Kind::Here => None,
        Kind::RegionQuery => region_param(req.uri().query()),
        Kind::Region(region) => Some(region),
        Kind::Position => {
            let (parts, bytes) = match buffered(state, req).await {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            let region = region_in(&bytes).or_else(|| {
                position_in(&bytes)
                    .and_then(|p| cluster.region_of(p).ok())
                    .map(|r| r.to_string())
            });
            let req = Request::from_parts(parts, Body::from(bytes));
            return match region {
                Some(region) => dispatch(state, &cluster, &region, req, next).await,
                None => served_by(next.run(req).await, cluster.node()),
            };
        }
        Kind::Order(order) => match order_region(state, &cluster, &order).await {
            Ok(region) => region,
            Err(resp) => return served_by(resp, cluster.node()),
        },
    };
    match region {
        Some(region) => dispatch(state, &cluster, &region, req, next).await,
        None => served_by(next.run(req).await, cluster.node()),
    }
}

/// The request's head and its whole body, within the body limit.
async fn buffered(
    state: &AppState,
    req: Request,
) -> Result<(axum::http::request::Parts, Bytes), Response> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, state.svc.config.body_limit_bytes).await {
        Ok(bytes) => Ok((parts, bytes)),
        Err(_) => {
            Err(ApiError::new(ErrorCode::PayloadTooLarge, "request body too large").into_response())
        }
    }
}

/// The region of an order held by another node, from Redis; `None` when
/// this node holds its live match or nobody holds one (then the handler
/// answers). An ended match here does not stop the search: it may be a
/// twin claim that lost the order to another node.
///
/// # Errors
/// 503 when Redis cannot say where the order is (answering `unknown_order`
/// then could deny a match that exists).
async fn order_region(
    state: &AppState,
    cluster: &Cluster,
    order: &str,
) -> Result<Option<String>, Response> {
    let Ok(id) = OrderId::new(order) else {
        return Ok(None);
    };
    let here = state.svc.engine.get_match(&id);
    if here.as_ref().is_some_and(|m| m.state.is_live()) {
        return Ok(None);
    }
    match cluster.order_region(order).await {
        Ok(None) if here.is_some() => Ok(None),
        Ok(other) => Ok(other),
        Err(e) => {
            tracing::warn!(order, error = %e, "could not read the order's record");
            Err(ApiError::unavailable(format!(
                "cannot tell which node holds order {order} now (Redis: {e}); retry"
            ))
            .into_response())
        }
    }
}

/// Serves `req` here if this node owns `region`, else forwards it.
async fn dispatch(
    state: &AppState,
    cluster: &Cluster,
    region: &str,
    req: Request,
    next: Next,
) -> Response {
    let node = cluster.node();
    // Only a node can have set this: the gate drops it from clients.
    let forwarded = req.headers().contains_key(FORWARDED);
    let persist = state.svc.persist().map(AsRef::as_ref);
    match cluster
        .resolve_owner(region, &state.svc.engine, persist)
        .await
    {
        Owner::Local if forwarded => served_by(next.run(req).await, node),
        Owner::Local => served_by(for_client(next.run(req).await, region), node),
        _ if forwarded => ApiError::new(
            ErrorCode::NotOwner,
            format!("node {node} does not own region {region}"),
        )
        .into_response(),
        Owner::Nobody => no_owner(region),
        Owner::Remote { url, .. } => {
            let (parts, bytes) = match buffered(state, req).await {
                Ok(x) => x,
                Err(resp) => return resp,
            };
            forward_until_served(cluster, region, url, parts, bytes, next).await
        }
    }
}

/// Forwards a request to `region`'s owner at `url`. When the owner does not
/// answer (each call times out within the lease TTL) or no longer owns the
/// region, re-reads the map until it names a new owner and sends it there
/// (or serves it here). Gives up with 503 after twice the lease TTL plus a
/// second: by then a silent owner's lease has lapsed and another node has
/// had a renewal period and a second to restore the region.
async fn forward_until_served(
    cluster: &Cluster,
    region: &str,
    url: String,
    parts: axum::http::request::Parts,
    bytes: Bytes,
    next: Next,
) -> Response {
    let ttl = cluster.lease_ttl();
    let deadline = std::time::Instant::now() + ttl * 2 + std::time::Duration::from_secs(1);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", axum::http::uri::PathAndQuery::as_str);
    let mut target = Some(url);
    let mut tried = String::new();
    // An attempt that got no answer may have made its change.
    let mut unsure = false;
    let transition = is_match_transition(&parts.method, parts.uri.path());
    loop {
        let failure = match target.take() {
            Some(url) => {
                tried.clone_from(&url);
                let f = Forward {
                    method: &parts.method,
                    path,
                    headers: &parts.headers,
                    map_version: cluster.map().version,
                    body: &bytes,
                };
                match cluster.peer().forward(&url, f).await {
                    Ok(resp) if resp.status != StatusCode::MISDIRECTED_REQUEST => {
                        return after_retry(response_of(resp), unsure && transition);
                    }
                    // Stale map: the node says it does not own the region.
                    Ok(_) => no_owner(region),
                    // A dead or paused owner.
                    Err(e) => {
                        unsure = true;
                        e.into_response()
                    }
                }
            }
            None => no_owner(region),
        };
        if std::time::Instant::now() >= deadline {
            return failure;
        }
        let _ = cluster.refresh_map().await;
        match cluster.owner(region) {
            Owner::Local => {
                let req = Request::from_parts(parts, Body::from(bytes));
                let resp = for_client(next.run(req).await, region);
                return served_by(after_retry(resp, unsure && transition), cluster.node());
            }
            Owner::Remote { url, .. } => target = Some(url),
            Owner::Nobody => {}
        }
        if target.as_ref().is_none_or(|u| *u == tried)
            || failure.status() == StatusCode::MISDIRECTED_REQUEST
        {
            // Nobody new serves it yet (the lease has not lapsed, or a
            // takeover or its restore is under way).
            tokio::time::sleep(ttl / 10).await;
        }
    }
}

/// Whether a request confirms, releases or completes a match: sent again
/// after an attempt that got no answer, it may find that attempt's work
/// done, and its answer does not tell the outcome.
fn is_match_transition(method: &axum::http::Method, path: &str) -> bool {
    *method == axum::http::Method::POST
        && path.starts_with("/v1/matches/")
        && ["/confirm", "/release", "/complete"]
            .iter()
            .any(|end| path.ends_with(end))
}

/// The answer to a match change sent again after an attempt that got no
/// answer (`unsure`): `unknown_order` or `order_conflict` then may only
/// mean that the first attempt made the change, so the client hears 503
/// (outcome unknown; read the match) instead.
fn after_retry(resp: Response, unsure: bool) -> Response {
    let ambiguous = matches!(resp.status(), StatusCode::NOT_FOUND | StatusCode::CONFLICT);
    if !(unsure && ambiguous) {
        return resp;
    }
    let mut resp = ApiError::unavailable(
        "an earlier attempt got no answer from the match's node and may have made this change; \
         read the match (GET /v1/matches/{order_id}) before retrying",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// A client's request served here: a lease lost while it ran (421
/// `not_owner`, which tells a forwarding node to route again) becomes 503
/// with `Retry-After` for the client, who cannot route.
fn for_client(resp: Response, region: &str) -> Response {
    if resp.status() == StatusCode::MISDIRECTED_REQUEST {
        let mut resp = ApiError::unavailable(format!(
            "region {region} changed hands during the request; retry"
        ))
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    }
    resp
}

/// The owner's answer as ours.
fn response_of(f: Forwarded) -> Response {
    let mut resp = Response::new(Body::from(f.body));
    *resp.status_mut() = f.status;
    resp.headers_mut().extend(f.headers);
    resp
}

fn no_owner(region: &str) -> Response {
    let mut resp = ApiError::unavailable(format!(
        "region {region} has no live owner now (a takeover is in progress); retry"
    ))
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_what_they_name() {
        assert_eq!(classify(&Method::PUT, "/v1/drivers/d1"), Kind::Position);
        assert_eq!(
            classify(&Method::POST, "/v1/drivers/d1/location"),
            Kind::Position
        );
        assert_eq!(classify(&Method::POST, "/v1/matches"), Kind::Position);
        assert_eq!(
            classify(&Method::GET, "/v1/matches/o1"),
            Kind::Order("o1".into())
        );
        assert_eq!(
            classify(&Method::POST, "/v1/matches/o1/confirm"),
            Kind::Order("o1".into())
        );
        assert_eq!(
            classify(&Method::GET, "/v1/drivers/nearest"),
            Kind::RegionQuery
        );
        assert_eq!(classify(&Method::GET, "/v1/drivers"), Kind::RegionQuery);
        assert_eq!(
            classify(&Method::POST, "/v1/drivers/within"),
            Kind::Position
        );
        assert_eq!(
            classify(&Method::GET, "/v1/regions/chi-1/stats"),
            Kind::Region("chi-1".into())
        );
        for (m, p) in [
            (Method::POST, "/v1/matches/batch"),
            (Method::GET, "/v1/density"),
            (Method::GET, "/v1/drivers/d1"),
            (Method::POST, "/v1/locations"),
            (Method::GET, "/v1/cluster"),
        ] {
            assert_eq!(classify(&m, p), Kind::Here, "{m} {p}");
        }
    }

    #[test]
    fn regions_are_found_in_the_query_or_the_body() {
        assert_eq!(
            region_param(Some("lat=1&lon=2&region=chi-1")).as_deref(),
            Some("chi-1")
        );
        assert_eq!(region_param(Some("lat=1&lon=2")), None);
        assert_eq!(region_param(None), None);
        let body = br#"{"order_id":"o","pickup":{"lat":1,"lon":2},"region":"chi-2"}"#;
        assert_eq!(region_in(body).as_deref(), Some("chi-2"));
        assert_eq!(region_in(br#"{"order_id":"o"}"#), None);
    }

    #[test]
    fn positions_are_found_at_the_top_or_in_the_pickup() {
        let p = position_in(br#"{"lat": 41.9, "lon": -87.6, "ts": 5}"#).unwrap();
        assert_eq!((p.lat(), p.lon()), (41.9, -87.6));
        let p = position_in(br#"{"order_id":"o","pickup":{"lat":1,"lon":2}}"#).unwrap();
        assert_eq!((p.lat(), p.lon()), (1.0, 2.0));
        assert!(position_in(br#"{"lat": 91, "lon": 0}"#).is_none());
        assert!(position_in(b"not json").is_none());
        assert!(position_in(br#"{"lat": 1}"#).is_none());
    }
}
