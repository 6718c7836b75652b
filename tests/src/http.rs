//! The harness of the HTTP integration tests (`tests/tests/http_*.rs`): a
//! real `hexmatch-server` started in-process on `127.0.0.1:0`, a real HTTP
//! client and a real WebSocket client, plus small JSON, polling and
//! state-snapshot helpers.
//!
//! Nothing here sleeps to synchronise: [`poll_until`] retries a check until
//! it holds or a generous deadline passes (the deadline only turns a hang
//! into a failure; no test asserts on wall-clock speed).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hexmatch::{
    Capabilities, Driver, Engine, ManualClock, Match, OrderId, Position, Status, Timestamp, Vehicle,
};
pub use hexmatch_server::ServeConfig;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long [`poll_until`] and the WebSocket helpers wait before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The start of simulated time for servers on a [`ManualClock`]:
/// `2026-11-25T10:00:00.000Z`.
pub const T0_MS: i64 = 1_795_600_800_000;

/// [`T0_MS`] plus `ms`, as a timestamp.
pub fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis(T0_MS + ms).unwrap()
}

/// [`T0_MS`] plus `ms`, as the API prints it (RFC 3339, UTC, milliseconds).
pub fn t_str(ms: i64) -> String {
    t(ms).to_string()
}

/// A config for tests: an ephemeral port, a fast background sweep, every
/// other field at its default.
pub fn test_config() -> ServeConfig {
    ServeConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        sweep_interval_ms: 20,
        ..ServeConfig::default()
    }
}

/// A cheap, cloneable handle to talk to one server: base URL, HTTP client
/// and the bearer token to send (if any).
#[derive(Debug, Clone)]
pub struct Api {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The HTTP client (keeps connections alive).
    pub client: Client,
    /// Sent as `Authorization: Bearer <token>` on every request when set.
    pub token: Option<String>,
}

/// A response read to the end: status, headers and body text.
#[derive(Debug, Clone)]
pub struct Resp {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The body as text.
    pub body: String,
}

impl Resp {
    /// The `Content-Type` header, or `""`.
    pub fn content_type(&self) -> &str {
        self.headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body parsed as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "response ({}) is not JSON: {e}; body: {:?}",
                self.status, self.body
            )
        })
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json_opt(&self) -> Option<Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// Asserts the status and a JSON content type, and returns the JSON body.
    pub fn expect(&self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.body
        );
        assert!(
            self.content_type().starts_with("application/json"),
            "content type {:?} is not JSON; body: {}",
            self.content_type(),
            self.body
        );
        self.json()
    }

    /// Asserts an API error: the status, `Content-Type: application/json`
    /// and a body `{"error": {"code": code, "message": non-empty}}`.
    pub fn expect_error(&self, status: u16, code: &str) {
        self.expect_error_in(status, &[code]);
    }

    /// Like [`Resp::expect_error`], for cases where the contract allows
    /// more than one code (the status is still exact). Returns the code.
    pub fn expect_error_in(&self, status: u16, codes: &[&str]) -> String {
        let v = self.expect(status);
        let err = v
            .get("error")
            .unwrap_or_else(|| panic!("no \"error\" object in {v}"));
        let code = err["code"]
            .as_str()
            .unwrap_or_else(|| panic!("error.code is not a string in {v}"));
        assert!(
            codes.contains(&code),
            "error code {code:?} is not one of {codes:?}; body: {v}"
        );
        let message = err["message"]
            .as_str()
            .unwrap_or_else(|| panic!("error.message is not a string in {v}"));
        assert!(!message.is_empty(), "empty error message in {v}");
        code.to_owned()
    }
}

impl Api {
    /// The absolute URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request builder with the bearer token (if any) already set.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.client.request(method, self.url(path));
        match &self.token {
            Some(t) => rb.header(AUTHORIZATION, format!("Bearer {t}")),
            None => rb,
        }
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&self, rb: RequestBuilder) -> Resp {
        let r = rb.send().await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.text().await.unwrap();
        Resp {
            status,
            headers,
            body,
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Resp {
        self.send(self.request(Method::GET, path)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Resp {
        self.send(self.request(Method::DELETE, path)).await
    }

    /// `POST path` with no body at all.
    pub async fn post_empty(&self, path: &str) -> Resp {
        self.send(self.request(Method::POST, path)).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Resp {
        self.raw(
            Method::POST,
            path,
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    /// `PUT path` with a JSON body.
    pub async fn put_json(&self, path: &str, body: &Value) -> Resp {
        self.raw(
            Method::PUT,
            path,
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    /// Any method with a raw body and an optional `Content-Type`.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        let mut rb = self.request(method, path).body(body);
        if let Some(ct) = content_type {
            rb = rb.header(CONTENT_TYPE, ct);
        }
        self.send(rb).await
    }

    /// `GET /v1/drivers/{id}`, expecting 200: the driver JSON.
    pub async fn driver(&self, id: &str) -> Value {
        self.get(&format!("/v1/drivers/{id}")).await.expect(200)
    }

    /// `PUT /v1/drivers/{id}` with `body`, expecting `{"applied": true}`:
    /// the driver JSON.
    pub async fn put_driver(&self, id: &str, body: &Value) -> Value {
        let v = self
            .put_json(&format!("/v1/drivers/{id}"), body)
            .await
            .expect(200);
        assert_eq!(v["applied"], json!(true), "PUT {id} not applied: {v}");
        v["driver"].clone()
    }

    /// `GET /v1/matches/{id}`, expecting 200: the match JSON.
    pub async fn get_match(&self, order: &str) -> Value {
        self.get(&format!("/v1/matches/{order}")).await.expect(200)
    }

    /// `GET /v1/drivers/nearest?{query}`, expecting 200: the `drivers` array.
    pub async fn nearest(&self, query: &str) -> Vec<Value> {
        let v = self
            .get(&format!("/v1/drivers/nearest?{query}"))
            .await
            .expect(200);
        v["drivers"]
            .as_array()
            .unwrap_or_else(|| panic!("no drivers array in {v}"))
            .clone()
    }

    /// The ids returned by a nearest query, in order.
    pub async fn nearest_ids(&self, query: &str) -> Vec<String> {
        self.nearest(query)
            .await
            .iter()
            .map(|d| str_of(d, "driver_id").to_owned())
            .collect()
    }

    /// `POST /v1/matches` with `body`: the raw response.
    pub async fn claim(&self, body: &Value) -> Resp {
        self.post_json("/v1/matches", body).await
    }
}

/// A running server with its client. Dereferences to its [`Api`].
pub struct TestServer {
    server: Option<hexmatch_server::Server>,
    addr: SocketAddr,
    api: Api,
    clock: Option<Arc<ManualClock>>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Deref for TestServer {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestServer {
    /// Starts a server on the system clock.
    pub async fn start(config: ServeConfig) -> Self {
        let server = hexmatch_server::start(config).await.unwrap();
        Self::wrap(server, None)
    }

    /// Starts a server on a [`ManualClock`] standing at [`T0_MS`].
    pub async fn start_manual(config: ServeConfig) -> Self {
        let clock = Arc::new(ManualClock::new(t(0)));
        let dyn_clock: Arc<dyn hexmatch::Clock> = clock.clone();
        let server = hexmatch_server::start_with_clock(config, dyn_clock)
            .await
            .unwrap();
        Self::wrap(server, Some(clock))
    }

    fn wrap(server: hexmatch_server::Server, clock: Option<Arc<ManualClock>>) -> Self {
        let addr = server.addr();
        Self {
            server: Some(server),
            addr,
            api: Api {
                base: format!("http://{addr}"),
                client: Client::new(),
                token: None,
            },
            clock,
        }
    }

    /// Sends `Authorization: Bearer <token>` from now on.
    #[must_use]
    pub fn with_token(mut self, token: &str) -> Self {
        self.api.token = Some(token.to_owned());
        self
    }

    /// A clone of the client handle, e.g. to move into tasks.
    pub fn api(&self) -> Api {
        self.api.clone()
    }

    /// The same server seen with another token (or none).
    pub fn api_with_token(&self, token: Option<&str>) -> Api {
        Api {
            token: token.map(str::to_owned),
            ..self.api.clone()
        }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's engine (for whole-state snapshots).
    pub fn engine(&self) -> &Arc<Engine> {
        self.server.as_ref().unwrap().engine()
    }

    /// The manual clock; panics for a server started on the system clock.
    pub fn clock(&self) -> &ManualClock {
        self.clock.as_ref().expect("server runs on a manual clock")
    }

    /// Everything a bad request must leave alone, read from the engine:
    /// every driver record (sorted by id), the number of live matches, and
    /// the given orders' matches.
    pub fn snapshot(&self, orders: &[&str]) -> Snapshot {
        let engine = self.engine();
        let mut drivers = engine.drivers();
        drivers.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        Snapshot {
            drivers,
            live_matches: engine.live_matches(),
            matches: orders
                .iter()
                .map(|o| engine.get_match(&OrderId::new(o).unwrap()))
                .collect(),
        }
    }

    /// `ws://…/v1/locations/stream?{query}` opened with the server's token.
    pub async fn ws(&self, query: &str) -> Ws {
        match self.ws_try(query, self.api.token.as_deref()).await {
            Ok(ws) => ws,
            Err(resp) => panic!("WebSocket handshake refused: {resp:?}"),
        }
    }

    /// Opens the location stream.
    ///
    /// # Errors
    /// A refused handshake: the HTTP response (status, headers, body).
    pub async fn ws_try(&self, query: &str, token: Option<&str>) -> Result<Ws, Resp> {
        let url = format!("ws://{}/v1/locations/stream?{query}", self.addr);
        let mut req = url.into_client_request().unwrap();
        if let Some(t) = token {
            req.headers_mut().insert(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((stream, _)) => Ok(Ws {
                stream,
                next_index: 0,
            }),
            Err(tungstenite::Error::Http(resp)) => {
                let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
                let mut headers = HeaderMap::new();
                for (k, v) in resp.headers() {
                    if let (Ok(k), Ok(v)) = (
                        reqwest::header::HeaderName::from_bytes(k.as_str().as_bytes()),
                        reqwest::header::HeaderValue::from_bytes(v.as_bytes()),
                    ) {
                        headers.append(k, v);
                    }
                }
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err(Resp {
                    status,
                    headers,
                    body,
                })
            }
            Err(e) => panic!("WebSocket connect failed: {e}"),
        }
    }

    /// Shuts the server down gracefully.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// See [`TestServer::snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Every driver, sorted by id.
    pub drivers: Vec<Driver>,
    /// Live (reserved or confirmed) matches.
    pub live_matches: usize,
    /// The requested orders' matches, in the order asked.
    pub matches: Vec<Option<Match>>,
}

/// Counts summed over several ack frames of the location stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckTotals {
    /// Updates applied.
    pub applied: u64,
    /// Updates ignored as stale.
    pub stale: u64,
    /// Rejected frames: (index, error code), sorted by index.
    pub rejected: Vec<(u64, String)>,
    /// How many ack frames were read.
    pub frames: usize,
}

impl AckTotals {
    /// Frames accounted for: applied + stale + rejected.
    pub fn total(&self) -> u64 {
        self.applied + self.stale + self.rejected.len() as u64
    }

    /// Adds one ack frame; panics unless it has the documented shape.
    pub fn add(&mut self, ack: &Value) {
        self.applied += ack["applied"]
            .as_u64()
            .unwrap_or_else(|| panic!("ack without applied: {ack}"));
        self.stale += ack["stale"]
            .as_u64()
            .unwrap_or_else(|| panic!("ack without stale: {ack}"));
        for r in ack["rejected"]
            .as_array()
            .unwrap_or_else(|| panic!("ack without rejected array: {ack}"))
        {
            let index = r["index"]
                .as_u64()
                .unwrap_or_else(|| panic!("rejected item without index: {ack}"));
            let code = r["error"]["code"]
                .as_str()
                .unwrap_or_else(|| panic!("rejected item without error.code: {ack}"));
            assert!(
                r["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "rejected item without error.message: {ack}"
            );
            self.rejected.push((index, code.to_owned()));
        }
        self.rejected.sort();
        self.frames += 1;
    }
}

/// A client of `GET /v1/locations/stream`.
#[derive(Debug)]
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Index of the next frame to send (frames count from 0 per connection).
    pub next_index: u64,
}

impl Ws {
    /// Sends one text frame; returns its index.
    pub async fn send_text(&mut self, text: &str) -> u64 {
        self.stream.send(Message::text(text)).await.unwrap();
        let i = self.next_index;
        self.next_index += 1;
        i
    }

    /// Sends one update object as a text frame; returns its index.
    pub async fn send_json(&mut self, v: &Value) -> u64 {
        self.send_text(&v.to_string()).await
    }

    /// The next ack frame (JSON text), skipping pings; panics on close or
    /// after [`DEADLINE`].
    pub async fn next_ack(&mut self) -> Value {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.stream.next())
                .await
                .expect("no ack frame before the deadline")
                .expect("the server closed the stream")
                .expect("WebSocket error");
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("ack is not JSON ({e}): {t}"));
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                other => panic!("unexpected frame from the server: {other:?}"),
            }
        }
    }

    /// Reads acks until they account for `n` frames in total; panics if
    /// they account for more.
    pub async fn acks_until(&mut self, n: u64) -> AckTotals {
        let mut totals = AckTotals::default();
        while totals.total() < n {
            let ack = self.next_ack().await;
            totals.add(&ack);
        }
        assert_eq!(totals.total(), n, "acks cover more frames than sent");
        totals
    }

    /// Sends a close frame and waits for the server's close (or the end).
    pub async fn close(mut self) {
        self.stream.close(None).await.ok();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.next()).await {
                Ok(None | Some(Err(_) | Ok(Message::Close(_)))) => return,
                Ok(Some(Ok(_))) => {}
                Err(elapsed) => panic!("the server did not close the stream: {elapsed}"),
            }
        }
    }
}

/// Retries `check` until it returns `Some`, or panics after [`DEADLINE`]
/// naming `what`. Waits 5 ms between tries.
pub async fn poll_until<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `v[key]` as a string; panics if missing.
pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key:?} is not a string in {v}"))
}

/// `v[key]` as a number; panics if missing.
pub fn f64_of(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key:?} is not a number in {v}"))
}

/// `v[key]` unless it is missing or `null` (optional fields may be either).
pub fn opt<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

/// Parses an API timestamp, asserting the documented form: RFC 3339 in
/// UTC with exactly three fractional digits (`2026-11-25T10:00:00.250Z`).
pub fn ts_of(v: &Value, key: &str) -> Timestamp {
    let s = str_of(v, key);
    let b = s.as_bytes();
    assert!(
        b.len() == 24 && b[10] == b'T' && b[19] == b'.' && b[23] == b'Z',
        "{key} = {s:?} is not RFC 3339 UTC with milliseconds"
    );
    Timestamp::parse(s).unwrap_or_else(|e| panic!("{key} = {s:?}: {e}"))
}

/// A driver's capabilities as a set of names.
pub fn caps_of(v: &Value) -> BTreeSet<String> {
    v["capabilities"]
        .as_array()
        .unwrap_or_else(|| panic!("capabilities is not an array in {v}"))
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

/// A set of names, for comparing with [`caps_of`].
pub fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Asserts the documented shape of a `Driver` object.
pub fn check_driver_shape(d: &Value) {
    str_of(d, "driver_id");
    let lat = f64_of(d, "lat");
    let lon = f64_of(d, "lon");
    assert!(Position::new(lat, lon).is_ok(), "bad position in {d}");
    ts_of(d, "ts");
    let status = str_of(d, "status");
    assert!(
        ["available", "reserved", "busy", "offline"].contains(&status),
        "bad status in {d}"
    );
    let vehicle = str_of(d, "vehicle");
    assert!(vehicle.parse::<Vehicle>().is_ok(), "bad vehicle in {d}");
    for c in caps_of(d) {
        assert!(
            Capabilities::NAMES.contains(&c.as_str()),
            "bad capability in {d}"
        );
    }
    if status == "reserved" {
        str_of(d, "order_id");
        ts_of(d, "reserved_until");
    }
}

/// Asserts the documented shape of a `Match` object.
pub fn check_match_shape(m: &Value) {
    str_of(m, "order_id");
    str_of(m, "driver_id");
    assert!(f64_of(m, "distance_m") >= 0.0, "negative distance in {m}");
    let state = str_of(m, "state");
    assert!(
        ["reserved", "confirmed", "released", "expired", "completed"].contains(&state),
        "bad state in {m}"
    );
    let created = ts_of(m, "created_at");
    let until = ts_of(m, "reserved_until");
    assert!(
        created < until,
        "reserved_until not after created_at in {m}"
    );
    assert_eq!(str_of(m, "region"), "default", "region in {m}");
    let pickup = &m["pickup"];
    assert!(
        Position::new(f64_of(pickup, "lat"), f64_of(pickup, "lon")).is_ok(),
        "bad pickup in {m}"
    );
    let ended = matches!(state, "released" | "expired" | "completed");
    assert_eq!(
        opt(m, "ended_at").is_some(),
        ended,
        "ended_at vs state in {m}"
    );
    if ended {
        ts_of(m, "ended_at");
    }
}

/// The position of a JSON object with `lat`/`lon`.
pub fn pos_of(v: &Value) -> Position {
    Position::new(f64_of(v, "lat"), f64_of(v, "lon")).unwrap()
}

/// `lat=..&lon=..` for a position (shortest round-trip float text).
pub fn latlon(p: Position) -> String {
    format!("lat={}&lon={}", p.lat(), p.lon())
}

/// One synthetic-attribute driver per Chicago pickup (the first `n` rows
/// of `data/chicago_trips.csv`): the engine record for the oracle and the
/// matching JSON update for the API. Attributes follow the row index:
/// every 7th driver is busy, every 11th offline; vehicles cycle over all
/// six classes; capabilities over subsets of `cash`, `card`, `large_items`;
/// `ts` is [`T0_MS`] plus the index, sent as integer Unix milliseconds.
pub fn chicago_drivers(n: usize) -> Vec<(Driver, Value)> {
    crate::load_chicago_pickups()
        .into_iter()
        .take(n)
        .enumerate()
        .map(|(i, (id, pos))| {
            let status = if i % 7 == 3 {
                Status::Busy
            } else if i % 11 == 5 {
                Status::Offline
            } else {
                Status::Available
            };
            let vehicle = Vehicle::ALL[i % Vehicle::ALL.len()];
            let caps = Capabilities::from_bits_truncate(((i * 5) % 8) as u16);
            let ts = T0_MS + i as i64;
            let mut d = crate::driver(&id, pos, status, vehicle, caps);
            d.ts = Timestamp::from_millis(ts).unwrap();
            let body = json!({
                "driver_id": id,
                "lat": pos.lat(),
                "lon": pos.lon(),
                "ts": ts,
                "status": status.to_string(),
                "vehicle": vehicle.as_str(),
                "capabilities": caps.names().collect::<Vec<_>>(),
            });
            (d, body)
        })
        .collect()
}

/// Parses Prometheus text: the sum of every sample of metric `name`
/// (exactly that name) whose labels include all of `labels`; `None` if
/// there is no such sample.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, rest) = if let Some(i) = line.find('{') {
            let close = line.rfind('}').unwrap();
            (&line[..i], (&line[i + 1..close], &line[close + 1..]))
        } else {
            let sp = line.find(' ').unwrap_or(line.len());
            (&line[..sp], ("", &line[sp..]))
        };
        if series != name {
            continue;
        }
        let (label_text, value_text) = rest;
        if !labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let value: f64 = value_text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        *sum.get_or_insert(0.0) += value;
    }
    sum
}
