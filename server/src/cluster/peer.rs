//! The peer channel: calls from one node to another, authenticated as a
//! node with the cluster secret, never with a client's token.
//!
//! Node-only operations live under [`INTERNAL_PREFIX`] and answer only to
//! the secret ([`PEER_AUTH`]); a client token opens none of them. A
//! client request forwarded to a region's owner keeps its `/v1` path but
//! carries the secret instead of the client's token, plus
//! [`FORWARDED`] (never forwarded twice).
//!
//! Every call is typed: bodies are [`crate::wire`] shapes, and an error
//! answer is decoded back into its [`ErrorCode`], never recognised by its
//! text.

use std::time::Duration;

use bytes::Bytes;
use hexmatch::{DriverId, NearestQuery, Neighbor};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::wire::{
    AreaIn, AreaOut, BatchTally, DensityIn, DensityOut, DriverOut, HandoffAnswer, HandoffRequest,
    NearestOut, PeerUpdates, ReserveRequest, Reserved,
};

/// Response header naming the node(s) that answered.
pub const SERVED_BY: &str = "x-hexmatch-served-by";
/// Request header of a client request a node forwarded (the sender's map
/// version). Honoured only with the cluster secret.
pub const FORWARDED: &str = "x-hexmatch-forwarded";
/// Request header carrying the cluster secret.
pub const PEER_AUTH: &str = "x-hexmatch-cluster-auth";
/// Request header naming the calling node (for logs).
pub const PEER_NODE: &str = "x-hexmatch-node";
/// Where the node-only operations are served.
pub const INTERNAL_PREFIX: &str = "/internal/v1";

/// A forwarded request's answer, as the owner gave it.
#[derive(Debug, Clone)]
pub struct Forwarded {
    /// Status.
    pub status: StatusCode,
    /// The headers worth passing on (content type, `Retry-After`, served-by).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body.
    pub body: Bytes,
}

/// A client request to forward to a region's owner.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path and query, e.g. `/v1/matches`.
    pub path: &'a str,
    /// The client's headers (only content type, accept and request id are sent).
    pub headers: &'a HeaderMap,
    /// This node's map version.
    pub map_version: u64,
    /// Body.
    pub body: &'a Bytes,
}

/// The typed client of the peer channel.
#[derive(Debug, Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    node: HeaderValue,
    secret: Option<HeaderValue>,
}

impl PeerClient {
    /// A client for node `node` presenting `secret` (none: an insecure
    /// laptop cluster). Calls time out after `timeout`.
    ///
    /// # Errors
    /// The node id or secret cannot be a header value; the client cannot
    /// be built.
    pub fn new(node: &str, secret: Option<&str>, timeout: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let node = HeaderValue::from_str(node).map_err(|_| format!("node id {node:?}"))?;
        let secret = secret
            .map(|s| {
                let mut v = HeaderValue::from_str(s)
                    .map_err(|_| "the cluster secret must be visible ASCII".to_owned())?;
                v.set_sensitive(true);
                Ok::<_, String>(v)
            })
            .transpose()?;
        Ok(Self { http, node, secret })
    }

    /// A request to another node, authenticated as this node.
    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let mut rb = self
            .http
            .request(method, url)
            .header(PEER_NODE, self.node.clone());
        if let Some(s) = &self.secret {
            rb = rb.header(PEER_AUTH, s.clone());
        }
        rb
    }

    /// Sends a node-only call and decodes its answer (or its error).
    async fn call<T: DeserializeOwned>(&self, rb: RequestBuilder, url: &str) -> ApiResult<T> {
        let resp = rb.send().await.map_err(|e| unreachable(url, &e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| unreachable(url, &e))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::unavailable(format!("node at {url} answered an unreadable body: {e}"))
            });
        }
        Err(decode_error(status, &bytes, url))
    }

    async fn post<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
        body: &B,
    ) -> ApiResult<T> {
        let url = format!("{base}{INTERNAL_PREFIX}{path}");
        self.call(self.request(Method::POST, &url).json(body), &url)
            .await
    }

    /// The node's own page of an area query (no fan-out of its own).
    ///
    /// # Errors
    /// `unavailable` when the node does not answer; its own error otherwise.
    pub async fn within(&self, base: &str, q: &AreaIn) -> ApiResult<AreaOut> {
        self.post(base, "/within", q).await
    }

    /// The node's own counts per H3 cell of a box (no fan-out of its own).
    ///
    /// # Errors
    /// `unavailable` when the node does not answer; its own error otherwise.
    pub async fn density(&self, base: &str, bbox: [f64; 4], res: u8) -> ApiResult<DensityOut> {
        self.post(base, "/density", &DensityIn { bbox, res }).await
    }

    /// The owner's own nearest answer (no fan-out of its own).
    ///
    /// # Errors
    /// The node did not answer, or answered with an error.
    pub async fn nearest(&self, base: &str, q: &NearestQuery) -> ApiResult<Vec<Neighbor>> {
        let url = format!("{base}{INTERNAL_PREFIX}/nearest?{}", query_string(q));
        let out: NearestOut = self.call(self.request(Method::GET, &url), &url).await?;
        out.drivers
            .into_iter()
            .map(crate::wire::NeighborOut::into_neighbor)
            .collect()
    }

    /// Reserves a driver on the node that holds it.
    ///
    /// # Errors
    /// `driver_not_available`, `not_owner`, `order_conflict`, `unavailable` …
    pub async fn reserve(&self, base: &str, req: &ReserveRequest) -> ApiResult<Reserved> {
        self.post(base, "/reserve", req).await
    }

    /// Asks a node to hand over drivers.
    ///
    /// # Errors
    /// The node did not answer, or answered with an error.
    pub async fn handoff(&self, base: &str, req: &HandoffRequest) -> ApiResult<HandoffAnswer> {
        self.post(base, "/handoff", req).await
    }

    /// Applies location updates on the owner of their regions.
    ///
    /// # Errors
    /// The node did not answer, or answered with an error.
    pub async fn locations(&self, base: &str, req: &PeerUpdates) -> ApiResult<BatchTally> {
        self.post(base, "/locations", req).await
    }

    /// A driver a node holds (`None`: not there).
    ///
    /// # Errors
    /// The node did not answer, or answered with another error.
    pub async fn driver(&self, base: &str, id: &DriverId) -> ApiResult<Option<DriverOut>> {
        let url = format!("{base}{INTERNAL_PREFIX}/drivers/{id}");
        match self.call(self.request(Method::GET, &url), &url).await {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == ErrorCode::UnknownDriver => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes a driver a node holds (`false`: not there).
    ///
    /// # Errors
    /// The node did not answer, or answered with another error.
    pub async fn remove_driver(&self, base: &str, id: &DriverId) -> ApiResult<bool> {
        let url = format!("{base}{INTERNAL_PREFIX}/drivers/{id}");
        let resp = self
            .request(Method::DELETE, &url)
            .send()
            .await
            .map_err(|e| unreachable(&url, &e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(true);
        }
        let bytes = resp.bytes().await.map_err(|e| unreachable(&url, &e))?;
        match decode_error(status, &bytes, &url) {
            e if e.code() == ErrorCode::UnknownDriver => Ok(false),
            e => Err(e),
        }
    }

    /// Forwards a client request to the owner of its region, as this node.
    ///
    /// # Errors
    /// `unavailable` when the node does not answer.
    pub async fn forward(&self, base: &str, f: Forward<'_>) -> ApiResult<Forwarded> {
        let url = format!("{base}{}", f.path);
        let mut rb = self
            .request(f.method.clone(), &url)
            .header(FORWARDED, f.map_version)
            .body(f.body.clone());
        for name in [
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("x-request-id"),
        ] {
            if let Some(v) = f.headers.get(&name) {
                rb = rb.header(name, v);
            }
        }
        let resp = rb.send().await.map_err(|e| unreachable(&url, &e))?;
        let status = resp.status();
        let mut headers = Vec::new();
        for name in [
            header::CONTENT_TYPE,
            header::RETRY_AFTER,
            HeaderName::from_static(SERVED_BY),
        ] {
            if let Some(v) = resp.headers().get(&name) {
                headers.push((name, v.clone()));
            }
        }
        let body = resp.bytes().await.map_err(|e| unreachable(&url, &e))?;
        metrics::counter!("hexmatch_forwarded_total").increment(1);
        Ok(Forwarded {
            status,
            headers,
            body,
        })
    }
}

fn unreachable(url: &str, e: &reqwest::Error) -> ApiError {
    ApiError::unavailable(format!("node at {url} did not answer: {e}"))
}

/// A node's error answer as one of our errors: its code when the body is
/// the error shape, else `unavailable` naming the status.
fn decode_error(status: StatusCode, bytes: &[u8], url: &str) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => body.error.into(),
        Err(_) => ApiError::unavailable(format!(
            "node at {url} answered {status}: {}",
            String::from_utf8_lossy(bytes)
        )),
    }
}

/// The query string of a nearest query (the public parameters).
pub fn query_string(q: &NearestQuery) -> String {
    use std::fmt::Write as _;
    let p = q.pos;
    let mut s = format!("lat={}&lon={}&k={}", p.lat(), p.lon(), q.k);
    if let Some(r) = q.radius_m {
        let _ = write!(s, "&radius_m={r}");
    }
    if let Some(v) = q.vehicle {
        let _ = write!(s, "&vehicle={v}");
    }
    let caps: Vec<&str> = q.capabilities.names().collect();
    if !caps.is_empty() {
        let _ = write!(s, "&capabilities={}", caps.join(","));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_decode_to_their_code() {
        let body =
            br#"{"error":{"code":"driver_not_available","message":"driver d is not available"}}"#;
        let e = decode_error(StatusCode::CONFLICT, body, "http://n");
        assert_eq!(e.code(), ErrorCode::DriverNotAvailable);
        assert_eq!(e.message(), "driver d is not available");
        // Not the error shape (a proxy's page, an unknown code): unavailable.
        for body in [
            &b"<html>bad gateway</html>"[..],
            br#"{"error":{"code":"made_up","message":"x"}}"#,
        ] {
            let e = decode_error(StatusCode::BAD_GATEWAY, body, "http://n");
            assert_eq!(e.code(), ErrorCode::Unavailable);
        }
    }

    #[test]
    fn nearest_queries_round_trip_through_the_query_string() {
        let mut q = NearestQuery::new(hexmatch::Position::new(41.9, -87.6).unwrap(), 7).unwrap();
        q.radius_m = Some(1234.5);
        q.vehicle = Some(hexmatch::Vehicle::Van);
        q.capabilities = "cash,large_items".parse().unwrap();
        let s = query_string(&q);
        assert_eq!(
            s,
            "lat=41.9&lon=-87.6&k=7&radius_m=1234.5&vehicle=van&capabilities=cash,large_items"
        );
    }
}
