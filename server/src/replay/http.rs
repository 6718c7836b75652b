//! Replays against a running server: a small blocking client of the v1 API
//! (`API.md`) and the simulation [`Backend`] on top of it.
//!
//! Only the URL the user gives is ever contacted. Plain `http://` only (the
//! client is built without TLS).

use std::time::Duration;

use hexmatch::sim::{Backend, SimError};
use hexmatch::{
    BatchOrder, BatchOutcome, ClaimRequest, DriverUpdate, Error, Match, MatchEvent, OrderId,
    Position, Status, Timestamp,
};
use hexmatch_server::ErrorCode;
use hexmatch_server::error::ErrorBody;
pub(crate) use hexmatch_server::wire::LocationItem;
use hexmatch_server::wire::{
    BatchIn, BatchOut, BatchTally, MatchOut, NearestOut, NeighborOut, OrderIn,
};
use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::de::DeserializeOwned;

/// Most items per `POST /v1/locations` (the server accepts 10 000).
pub(crate) const LOCATION_CHUNK: usize = 1000;

/// A client of one server.
#[derive(Debug)]
pub(crate) struct Http {
    client: Client,
    base: String,
    token: Option<String>,
}

/// What went wrong with a request.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The server answered with an error body.
    Api {
        status: u16,
        code: ErrorCode,
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
            Self::Api { code, message, .. } => match code {
                ErrorCode::NoDriverAvailable => SimError::Engine(Error::NoDriverAvailable),
                ErrorCode::ReservationExpired => {
                    SimError::Engine(Error::ReservationExpired(message))
                }
                ErrorCode::OrderConflict => SimError::Engine(Error::OrderConflict(message)),
                ErrorCode::UnknownOrder => SimError::Engine(Error::UnknownOrder(message)),
                ErrorCode::UnknownDriver => SimError::Engine(Error::UnknownDriver(message)),
                ErrorCode::InvalidParameter => SimError::Engine(Error::InvalidParameter(message)),
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
    pub(crate) fn post_locations(&self, items: &[LocationItem]) -> Result<BatchTally, Failure> {
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
    pub(crate) fn nearest(&self, pos: Position, k: usize) -> Result<Vec<NeighborOut>, Failure> {
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
            let items: Vec<LocationItem> = chunk.iter().map(LocationItem::from).collect();
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
        let body = OrderIn::from(&BatchOrder {
            order_id: order.clone(),
            request: request.clone(),
        });
        let out: MatchOut = Http::send(self.http.request(Method::POST, "/v1/matches").json(&body))
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
            orders: orders.iter().map(OrderIn::from).collect(),
            objective: None,
            candidates: Some(candidates),
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
                .map(|m| m.into_match().map_err(|e| bad(e.to_string())))
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
        let api = |code: ErrorCode| Failure::Api {
            status: 409,
            code,
            message: "m".into(),
        };
        assert_eq!(
            api(ErrorCode::NoDriverAvailable).into_sim_error("x"),
            SimError::Engine(Error::NoDriverAvailable)
        );
        assert_eq!(
            api(ErrorCode::ReservationExpired)
                .into_sim_error("x")
                .code(),
            "reservation_expired"
        );
        assert_eq!(
            api(ErrorCode::Overloaded).into_sim_error("x").code(),
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
