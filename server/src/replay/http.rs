//! Replays against a running server: a small blocking client of the v1 API
//! (`API.md`) and the simulation [`Backend`] on top of it.
//!
//! Only the URL the user gives is ever contacted. Plain `http://` only (the
//! client is built without TLS).

use std::time::Duration;

use hexmatch::sim::{Backend, SimError};
use hexmatch::{
    BatchOrder, BatchOutcome, ClaimRequest, DriverUpdate, Error, Match, MatchEvent, MatchState,
    OrderId, Position, Status, Timestamp,
};
use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Most items per `POST /v1/locations` (the server accepts 10 000).
pub(crate) const LOCATION_CHUNK: usize = 1000;

/// A client of one server.
#[derive(Debug)]
pub(crate) struct Http {
    client: Client,
    base: String,
    token: Option<String>,
}

/// One item of `POST /v1/locations`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LocationItem {
    pub(crate) driver_id: String,
    pub(crate) lat: f64,
    pub(crate) lon: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<&'static str>,
}

impl LocationItem {
    pub(crate) fn from_update(u: &DriverUpdate) -> Self {
        Self {
            driver_id: u.id.to_string(),
            lat: u.pos.lat(),
            lon: u.pos.lon(),
            ts: u.ts.map(Timestamp::as_millis),
            status: u.status.map(Status::as_str),
        }
    }
}

/// Response of `POST /v1/locations`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Tally {
    pub(crate) applied: usize,
    pub(crate) stale: usize,
    pub(crate) rejected: Vec<RejectedItem>,
}

/// A rejected item of `POST /v1/locations`.
#[derive(Debug, Deserialize)]
pub(crate) struct RejectedItem {
    pub(crate) index: usize,
    pub(crate) error: ErrorDetail,
}

/// The `error` of an error body.
#[derive(Debug, Deserialize)]
pub(crate) struct ErrorDetail {
    pub(crate) code: String,
    pub(crate) message: String,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

/// One driver of `GET /v1/drivers/nearest`.
#[derive(Debug, Deserialize)]
pub(crate) struct NearestDriver {
    pub(crate) driver_id: String,
    pub(crate) distance_m: f64,
    pub(crate) ts: String,
}

#[derive(Debug, Deserialize)]
struct NearestOut {
    drivers: Vec<NearestDriver>,
}

#[derive(Debug, Serialize)]
struct LatLon {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Serialize)]
struct OrderIn<'a> {
    order_id: &'a str,
    pickup: LatLon,
    #[serde(skip_serializing_if = "Option::is_none")]
    vehicle: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    capabilities: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    radius_m: Option<f64>,
    hold_ms: u64,
}

impl<'a> OrderIn<'a> {
    fn new(order: &'a OrderId, r: &ClaimRequest) -> Self {
        Self {
            order_id: order.as_str(),
            pickup: LatLon {
                lat: r.pickup.lat(),
                lon: r.pickup.lon(),
            },
            vehicle: r.vehicle.map(hexmatch::Vehicle::as_str),
            capabilities: r.capabilities.names().collect(),
            radius_m: r.radius_m,
            hold_ms: r.hold_ms,
        }
    }
}

#[derive(Debug, Serialize)]
struct BatchIn<'a> {
    orders: Vec<OrderIn<'a>>,
    candidates: usize,
}

#[derive(Debug, Deserialize)]
struct MatchOut {
    order_id: String,
    driver_id: String,
    distance_m: f64,
    state: String,
    reserved_until: String,
    created_at: String,
    pickup: MatchPickup,
    ended_at: Option<String>,
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MatchPickup {
    lat: f64,
    lon: f64,
}

#[derive(Debug, Deserialize)]
struct BatchOut {
    matches: Vec<MatchOut>,
    unmatched: Vec<String>,
}

impl MatchOut {
    fn into_match(self) -> Result<Match, String> {
        let time = |s: &str| Timestamp::parse(s).map_err(|e| e.to_string());
        let state = match self.state.as_str() {
            "reserved" => MatchState::Reserved,
            "confirmed" => MatchState::Confirmed,
            "released" => MatchState::Released,
            "expired" => MatchState::Expired,
            "completed" => MatchState::Completed,
            other => return Err(format!("unknown match state {other:?}")),
        };
        Ok(Match {
            order_id: OrderId::new(&self.order_id).map_err(|e| e.to_string())?,
            driver_id: hexmatch::DriverId::new(&self.driver_id).map_err(|e| e.to_string())?,
            pickup: Position::new(self.pickup.lat, self.pickup.lon).map_err(|e| e.to_string())?,
            distance_m: self.distance_m,
            state,
            created_at: time(&self.created_at)?,
            reserved_until: time(&self.reserved_until)?,
            ended_at: self.ended_at.as_deref().map(time).transpose()?,
            reason: self.reason,
        })
    }
}

/// What went wrong with a request.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server answered with an error body.
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// No usable answer (connection refused, timeout, unreadable body, …).
    Transport(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Api {
                status,
                code,
                message,
            } => write!(f, "HTTP {status} {code}: {message}"),
            Self::Transport(m) => f.write_str(m),
        }
    }
}

impl Failure {
    /// The engine error an API error code stands for, where the simulation
    /// must tell it apart; anything else is a backend failure.
    fn into_sim_error(self, what: &str) -> SimError {
        match self {
            Self::Api { code, message, .. } => match code.as_str() {
                "no_driver_available" => SimError::Engine(Error::NoDriverAvailable),
                "reservation_expired" => SimError::Engine(Error::ReservationExpired(message)),
                "order_conflict" => SimError::Engine(Error::OrderConflict(message)),
                "unknown_order" => SimError::Engine(Error::UnknownOrder(message)),
                "unknown_driver" => SimError::Engine(Error::UnknownDriver(message)),
                "invalid_parameter" => SimError::Engine(Error::InvalidParameter(message)),
                _ => SimError::Backend(format!("{what}: {code}: {message}")),
            },
            Self::Transport(m) => SimError::Backend(format!("{what}: {m}")),
        }
    }
}

impl Http {
    /// A client of the server at `base` (`http://host:port`, no path).
    pub(crate) fn new(base: &str, token: Option<String>) -> Result<Self, String> {
        let url = reqwest::Url::parse(base).map_err(|e| format!("--server {base:?}: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "--server {base:?}: only http:// URLs are supported (this build has no TLS)"
            ));
        }
        if url.host_str().is_none() {
            return Err(format!("--server {base:?}: the URL has no host"));
        }
        let client = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// The server's base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn send<T: DeserializeOwned>(request: RequestBuilder) -> Result<T, Failure> {
        let response = request
            .send()
            .map_err(|e| Failure::Transport(e.to_string()))?;
        Self::read(response)
    }

    fn read<T: DeserializeOwned>(response: Response) -> Result<T, Failure> {
        let status = response.status();
        let bytes = response
            .bytes()
            .map_err(|e| Failure::Transport(format!("reading the response: {e}")))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                Failure::Transport(format!("unexpected response (HTTP {status}): {e}"))
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(Failure::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            }),
            Err(_) => Err(Failure::Transport(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ))),
        }
    }

    /// `POST /v1/locations` with one JSON array.
    pub(crate) fn post_locations(&self, items: &[LocationItem]) -> Result<Tally, Failure> {
        Self::send(self.request(Method::POST, "/v1/locations").json(items))
    }

    /// `DELETE /v1/drivers/{id}`; an unknown driver is fine.
    fn delete_driver(&self, id: &str) -> Result<(), Failure> {
        let response = self
            .request(Method::DELETE, &format!("/v1/drivers/{id}"))
            .send()
            .map_err(|e| Failure::Transport(e.to_string()))?;
        if response.status().is_success() || response.status().as_u16() == 404 {
            Ok(())
        } else {
            Self::read::<serde_json::Value>(response).map(|_| ())
        }
    }

    /// `GET /v1/drivers/nearest`.
    pub(crate) fn nearest(&self, pos: Position, k: usize) -> Result<Vec<NearestDriver>, Failure> {
        // Numbers only: nothing to escape.
        let path = format!(
            "/v1/drivers/nearest?lat={}&lon={}&k={k}",
            pos.lat(),
            pos.lon()
        );
        let out: NearestOut = Self::send(self.request(Method::GET, &path))?;
        Ok(out.drivers)
    }

    fn post_match(&self, path: &str) -> Result<Match, SimError> {
        let out: MatchOut = Self::send(self.request(Method::POST, path))
            .map_err(|f| f.into_sim_error(&format!("POST {path}")))?;
        out.into_match()
            .map_err(|e| SimError::Backend(format!("POST {path}: {e}")))
    }
}

/// The simulation's [`Backend`] over a server's HTTP API: drivers and moves
/// as `POST /v1/locations` (chunks of [`LOCATION_CHUNK`]), claims as
/// `POST /v1/matches` and `/v1/matches/batch`, then `/confirm` and
/// `/complete`. The server keeps its own clock and sweeps reservations
/// itself.
#[derive(Debug)]
pub(crate) struct HttpBackend {
    http: Http,
}

impl HttpBackend {
    pub(crate) fn new(http: Http) -> Self {
        Self { http }
    }

    fn post_updates(&self, updates: &[DriverUpdate]) -> Result<(), SimError> {
        for chunk in updates.chunks(LOCATION_CHUNK) {
            let items: Vec<LocationItem> = chunk.iter().map(LocationItem::from_update).collect();
            let tally = self
                .http
                .post_locations(&items)
                .map_err(|f| f.into_sim_error("POST /v1/locations"))?;
            if let Some(r) = tally.rejected.first() {
                return Err(SimError::Backend(format!(
                    "POST /v1/locations rejected the update of {}: {}: {}",
                    items.get(r.index).map_or("?", |i| i.driver_id.as_str()),
                    r.error.code,
                    r.error.message
                )));
            }
        }
        Ok(())
    }
}

impl Backend for HttpBackend {
    fn set_time(&mut self, _now: Timestamp) {}

    fn add_drivers(&mut self, drivers: &[DriverUpdate]) -> Result<(), SimError> {
        // A driver left by an earlier run has later timestamps, which would
        // make these updates stale: start from a clean slate.
        for d in drivers {
            self.http
                .delete_driver(d.id.as_str())
                .map_err(|f| f.into_sim_error(&format!("DELETE /v1/drivers/{}", d.id)))?;
        }
        let available: Vec<DriverUpdate> = drivers
            .iter()
            .map(|d| DriverUpdate {
                status: Some(Status::Available),
                ..d.clone()
            })
            .collect();
        self.post_updates(&available)
    }

    fn move_drivers(&mut self, updates: &[DriverUpdate]) -> Result<(), SimError> {
        self.post_updates(updates)
    }

    fn claim(&mut self, order: &OrderId, request: &ClaimRequest) -> Result<Match, SimError> {
        let out: MatchOut = Http::send(
            self.http
                .request(Method::POST, "/v1/matches")
                .json(&OrderIn::new(order, request)),
        )
        .map_err(|f| f.into_sim_error("POST /v1/matches"))?;
        out.into_match()
            .map_err(|e| SimError::Backend(format!("POST /v1/matches: {e}")))
    }

    fn claim_batch(
        &mut self,
        orders: &[BatchOrder],
        candidates: usize,
    ) -> Result<BatchOutcome, SimError> {
        let body = BatchIn {
            orders: orders
                .iter()
                .map(|o| OrderIn::new(&o.order_id, &o.request))
                .collect(),
            candidates,
        };
        let out: BatchOut = Http::send(
            self.http
                .request(Method::POST, "/v1/matches/batch")
                .json(&body),
        )
        .map_err(|f| f.into_sim_error("POST /v1/matches/batch"))?;
        let bad = |e: String| SimError::Backend(format!("POST /v1/matches/batch: {e}"));
        Ok(BatchOutcome {
            matches: out
                .matches
                .into_iter()
                .map(|m| m.into_match().map_err(bad))
                .collect::<Result<_, _>>()?,
            unmatched: out
                .unmatched
                .iter()
                .map(|o| OrderId::new(o).map_err(|e| bad(e.to_string())))
                .collect::<Result<_, _>>()?,
        })
    }

    fn confirm(&mut self, order: &OrderId) -> Result<Match, SimError> {
        self.http
            .post_match(&format!("/v1/matches/{order}/confirm"))
    }

    fn complete(&mut self, order: &OrderId) -> Result<Match, SimError> {
        self.http
            .post_match(&format!("/v1/matches/{order}/complete"))
    }

    fn expire_matches(&mut self) -> Result<Vec<MatchEvent>, SimError> {
        // The server sweeps expired reservations on its own clock; a late
        // confirm comes back as `reservation_expired`.
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_are_accepted() {
        assert!(Http::new("http://127.0.0.1:8080", None).is_ok());
        assert_eq!(
            Http::new("http://127.0.0.1:8080/", None).unwrap().base(),
            "http://127.0.0.1:8080"
        );
        for bad in [
            "https://127.0.0.1:8080",
            "127.0.0.1:8080",
            "ftp://x",
            "not a url",
        ] {
            assert!(Http::new(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_codes_map_back_to_engine_errors() {
        let api = |code: &str| Failure::Api {
            status: 409,
            code: code.into(),
            message: "m".into(),
        };
        assert_eq!(
            api("no_driver_available").into_sim_error("x"),
            SimError::Engine(Error::NoDriverAvailable)
        );
        assert_eq!(
            api("reservation_expired").into_sim_error("x").code(),
            "reservation_expired"
        );
        assert_eq!(
            api("overloaded").into_sim_error("x").code(),
            "backend_error"
        );
        assert_eq!(
            Failure::Transport("refused".into())
                .into_sim_error("POST /v1/matches")
                .to_string(),
            "backend: POST /v1/matches: refused"
        );
    }
}
