//! Bad input over HTTP and the WebSocket stream, as tables that grow: each
//! row is one malformed request — a JSON or NDJSON body, a query string, a
//! path id, a header or content type, a method, a credential — or one bad
//! WebSocket handshake or frame, with the status and error code
//! `docs/API.md` documents for it. Every row also checks that the engine
//! state (every driver record, the live matches, the seeded orders'
//! matches) is the same after the request as before it: a rejected request
//! changes nothing.
//!
//! One server on a manual clock serves every row; all rows run, and the
//! failures are reported together. Adding a case is adding one row.

#![allow(clippy::too_many_lines)]

use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use hexmatch_server::config::{ClientToken, Secret, TokenScope};
use hexmatch_tests::http::{DEADLINE, ServeConfig, TestServer, test_config};
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The suite may grow, never shrink.
const MIN_ROWS: usize = 150;

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "reader-token-0123456789";
const JSON: Option<&str> = Some("application/json");
const NDJSON: Option<&str> = Some("application/x-ndjson");
const NONE: Option<&str> = None;
const BODY_LIMIT: usize = 4096;
const MAX_BATCH: usize = 5;
/// Orders whose matches every row compares before and after.
const ORDERS: &[&str] = &[
    "o-live", "o-conf", "o-done", "o1", "o-far", "o-veh", "o-arr", "A", "B",
];
/// The seeds' fix time: the manual clock's start.
const T0: &str = "2026-11-25T10:00:00Z";
/// 5 min 1 s ahead of the manual clock: beyond the allowed skew.
const FUTURE: &str = "2026-11-25T10:05:01Z";
/// An hour before the seeds' fixes: stale.
const PAST: &str = "2026-11-25T09:00:00Z";
/// Where the seeded drivers stand.
const D1: (f64, f64) = (41.8786, -87.6251);
const D2: (f64, f64) = (41.95, -87.65);
const D3: (f64, f64) = (41.80, -87.60);
const D4: (f64, f64) = (41.70, -87.55);

/// Whose credentials a request carries.
#[derive(Debug, Clone, Copy)]
enum Auth {
    /// A token with every scope.
    Admin,
    /// A token with the `read` scope only.
    Reader,
    /// No `Authorization` header.
    Anonymous,
    /// This `Authorization` header, verbatim.
    Header(&'static str),
}

/// What a row must get.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// An error response with this status and code.
    Error(u16, &'static str),
    /// An error response with this status and one of these codes, where
    /// the contract leaves the code open between them.
    ErrorIn(u16, &'static [&'static str]),
    /// `200` from a batch: nothing applied, `stale` items ignored as
    /// stale, and exactly one item rejected, at `index`, with `code`.
    Item {
        index: u64,
        stale: u64,
        code: &'static str,
    },
}

fn err(status: u16, code: &'static str) -> Want {
    Want::Error(status, code)
}

fn err_in(status: u16, codes: &'static [&'static str]) -> Want {
    Want::ErrorIn(status, codes)
}

/// The first (and only) item of a batch is rejected with `code`.
fn item(code: &'static str) -> Want {
    Want::Item {
        index: 0,
        stale: 0,
        code,
    }
}

/// A stale item, then an item rejected with `code` (so at index 1).
fn item_after_stale(code: &'static str) -> Want {
    Want::Item {
        index: 1,
        stale: 1,
        code,
    }
}

/// One HTTP request that must be refused.
#[derive(Debug, Clone)]
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    auth: Auth,
    want: Want,
}

/// A row: `request` is `"METHOD /path?query"`.
fn case(
    name: &'static str,
    request: impl AsRef<str>,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    want: Want,
) -> Case {
    let (method, path) = request
        .as_ref()
        .split_once(' ')
        .expect("a request is \"METHOD /path\"");
    Case {
        name,
        method: Method::from_bytes(method.as_bytes()).expect("a method"),
        path: path.to_owned(),
        content_type,
        headers: Vec::new(),
        body: body.into(),
        auth: Auth::Admin,
        want,
    }
}

impl Case {
    fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.headers.push((name, value));
        self
    }
}

/// `base` with the fields of `extra` added or replaced, as JSON text.
fn with(base: &Value, extra: &Value) -> String {
    let mut b = base.clone();
    let (Some(b_obj), Some(e_obj)) = (b.as_object_mut(), extra.as_object()) else {
        panic!("with() takes two objects");
    };
    b_obj.extend(e_obj.clone());
    b.to_string()
}

/// Valid JSON followed by whitespace, past the body limit.
fn padded(v: &Value) -> String {
    format!("{v}{}", " ".repeat(BODY_LIMIT + 100))
}

/// A valid batch item for a new driver.
fn new_item(id: &str) -> Value {
    json!({"driver_id": id, "lat": 41.9, "lon": -87.7})
}

/// A batch item for `d1` older than its last fix (ignored as stale).
fn stale_item() -> Value {
    json!({"driver_id": "d1", "lat": 41.0, "lon": -87.0, "ts": PAST})
}

/// A JSON array of `stale_item()` and `bad`.
fn after_stale(bad: &Value) -> String {
    json!([stale_item(), bad]).to_string()
}

// A table: one row per line.
#[rustfmt::skip]
fn http_cases() -> Vec<Case> {
    let put = json!({"lat": 41.9, "lon": -87.7, "ts": T0});
    let loc = json!({"lat": 41.9, "lon": -87.7, "ts": T0});
    let order = json!({"order_id": "o1", "pickup": {"lat": D1.0, "lon": D1.1}});
    let batch_order = json!({"order_id": "A", "pickup": {"lat": D1.0, "lon": D1.1}});
    let long = "x".repeat(65);
    let six_items: Vec<Value> = (0..=MAX_BATCH).map(|i| new_item(&format!("n{i}"))).collect();
    let six_orders: Vec<Value> = (0..=MAX_BATCH)
        .map(|i| json!({"order_id": format!("b{i}"), "pickup": {"lat": D1.0, "lon": D1.1}}))
        .collect();
    let deep = format!(
        r#"{{"lat": 41.9, "lon": -87.7, "capabilities": {}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let e400 = |code| err(400, code);
    vec![
        // ---- PUT /v1/drivers/{id}: the body --------------------------------
        case("put: truncated JSON", "PUT /v1/drivers/d1", JSON, r#"{"lat": 41.9, "lon":"#, e400("invalid_json")),
        case("put: not JSON", "PUT /v1/drivers/d1", JSON, "not json at all", e400("invalid_json")),
        case("put: empty body", "PUT /v1/drivers/d1", JSON, "", e400("invalid_json")),
        case("put: null body", "PUT /v1/drivers/d1", JSON, "null", e400("invalid_json")),
        case("put: array body", "PUT /v1/drivers/d1", JSON, "[1, 2]", e400("invalid_json")),
        case("put: fields as a positional array", "PUT /v1/drivers/d1", JSON, "[41.9, -87.7, null, null, null, null]", e400("invalid_json")),
        case("put: string body", "PUT /v1/drivers/d1", JSON, r#""lat""#, e400("invalid_json")),
        case("put: trailing garbage", "PUT /v1/drivers/d1", JSON, format!("{put} x"), e400("invalid_json")),
        case("put: byte-order mark", "PUT /v1/drivers/d1", JSON, format!("\u{feff}{put}"), e400("invalid_json")),
        case("put: body not UTF-8", "PUT /v1/drivers/d1", JSON, b"{\"lat\": 41.9, \"lon\": -87.7, \"vehicle\": \"c\xffr\"}", e400("invalid_json")),
        case("put: lat above 90", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"lat": 91.0})), e400("invalid_position")),
        case("put: lat below -90", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"lat": -90.5})), e400("invalid_position")),
        case("put: lon above 180", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"lon": 180.5})), e400("invalid_position")),
        case("put: lon below -180", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"lon": -181})), e400("invalid_position")),
        case("put: lat on a new driver out of range", "PUT /v1/drivers/fresh", JSON, with(&put, &json!({"lat": 1000})), e400("invalid_position")),
        case("put: lat beyond f64", "PUT /v1/drivers/d1", JSON, r#"{"lat": 1e999, "lon": 0}"#, err_in(400, &["invalid_json", "invalid_position"])),
        case("put: lat as text", "PUT /v1/drivers/d1", JSON, r#"{"lat": "north", "lon": -87.7}"#, e400("invalid_json")),
        case("put: lat null", "PUT /v1/drivers/d1", JSON, r#"{"lat": null, "lon": -87.7}"#, e400("invalid_json")),
        case("put: lat missing", "PUT /v1/drivers/d1", JSON, r#"{"lon": -87.7}"#, e400("invalid_json")),
        case("put: lon missing", "PUT /v1/drivers/fresh", JSON, r#"{"lat": 41.9}"#, e400("invalid_json")),
        case("put: unknown field", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"colour": "red"})), e400("invalid_json")),
        case("put: driver_id in the body", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"driver_id": "d1"})), e400("invalid_json")),
        case("put: duplicate key", "PUT /v1/drivers/d1", JSON, r#"{"lat": 41.9, "lat": 41.8, "lon": -87.7}"#, e400("invalid_json")),
        case("put: nested past the depth limit", "PUT /v1/drivers/d1", JSON, deep, e400("invalid_json")),
        case("put: ts not a time", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": "yesterday"})), e400("invalid_timestamp")),
        case("put: ts month 13", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": "2026-13-01T00:00:00Z"})), e400("invalid_timestamp")),
        case("put: ts 30 February", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": "2026-02-30T10:00:00Z"})), e400("invalid_timestamp")),
        case("put: ts without a zone", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": "2026-11-25T10:00:00"})), e400("invalid_timestamp")),
        case("put: ts empty text", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": ""})), e400("invalid_timestamp")),
        case("put: ts before 1970", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": -1})), e400("invalid_timestamp")),
        case("put: ts in year 10000", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": 253_402_300_800_000_i64})), e400("invalid_timestamp")),
        case("put: ts beyond the clock skew", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": FUTURE})), e400("invalid_timestamp")),
        case("put: ts beyond the skew on a new driver", "PUT /v1/drivers/fresh", JSON, with(&put, &json!({"ts": FUTURE})), e400("invalid_timestamp")),
        case("put: ts fractional millis", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": 1.5})), err_in(400, &["invalid_json", "invalid_timestamp"])),
        case("put: ts boolean", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"ts": true})), err_in(400, &["invalid_json", "invalid_timestamp"])),
        case("put: status reserved", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"status": "reserved"})), e400("invalid_parameter")),
        case("put: status unknown", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"status": "flying"})), e400("invalid_parameter")),
        case("put: status as a number", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"status": 1})), e400("invalid_json")),
        case("put: vehicle unknown", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"vehicle": "boat"})), e400("invalid_parameter")),
        case("put: vehicle empty", "PUT /v1/drivers/fresh", JSON, with(&put, &json!({"vehicle": ""})), e400("invalid_parameter")),
        case("put: capability unknown", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"capabilities": ["teleport"]})), e400("invalid_parameter")),
        case("put: one capability unknown", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"capabilities": ["cash", "teleport"]})), e400("invalid_parameter")),
        case("put: capabilities as text", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"capabilities": "cash"})), e400("invalid_json")),
        case("put: capability as a number", "PUT /v1/drivers/d1", JSON, with(&put, &json!({"capabilities": [1]})), e400("invalid_json")),
        case("put: gzip body is read as sent", "PUT /v1/drivers/d1", JSON, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", e400("invalid_json"))
            .header("content-encoding", "gzip"),
        // ---- POST /v1/drivers/{id}/location --------------------------------
        case("location: truncated JSON", "POST /v1/drivers/d1/location", JSON, r#"{"lat": 41.9"#, e400("invalid_json")),
        case("location: empty body", "POST /v1/drivers/d1/location", JSON, "", e400("invalid_json")),
        case("location: empty object", "POST /v1/drivers/d1/location", JSON, "{}", e400("invalid_json")),
        case("location: status is not a location field", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"status": "busy"})), e400("invalid_json")),
        case("location: vehicle is not a location field", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"vehicle": "van"})), e400("invalid_json")),
        case("location: fields as a positional array", "POST /v1/drivers/d1/location", JSON, "[41.9, -87.7, null]", e400("invalid_json")),
        case("location: lat above 90", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"lat": 91})), e400("invalid_position")),
        case("location: lon 200", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"lon": 200})), e400("invalid_position")),
        case("location: lon missing", "POST /v1/drivers/d1/location", JSON, r#"{"lat": 41.9}"#, e400("invalid_json")),
        case("location: lat null", "POST /v1/drivers/d1/location", JSON, r#"{"lat": null, "lon": 0}"#, e400("invalid_json")),
        case("location: ts not a time", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"ts": "noon"})), e400("invalid_timestamp")),
        case("location: ts in year 10000", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"ts": 253_402_300_800_000_i64})), e400("invalid_timestamp")),
        case("location: ts negative", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"ts": -5})), e400("invalid_timestamp")),
        case("location: ts beyond the clock skew", "POST /v1/drivers/d1/location", JSON, with(&loc, &json!({"ts": FUTURE})), e400("invalid_timestamp")),
        case("location: unknown driver", "POST /v1/drivers/ghost/location", JSON, loc.to_string(), err(404, "unknown_driver")),
        // ---- POST /v1/locations: the whole request -------------------------
        case("batch: truncated array", "POST /v1/locations", JSON, r#"[{"driver_id": "n1", "lat": 41.8"#, e400("invalid_json")),
        case("batch: an object, not an array", "POST /v1/locations", JSON, new_item("n1").to_string(), e400("invalid_json")),
        case("batch: null", "POST /v1/locations", JSON, "null", e400("invalid_json")),
        case("batch: empty body", "POST /v1/locations", JSON, "", e400("invalid_json")),
        case("batch: NDJSON sent as JSON", "POST /v1/locations", JSON, format!("{}\n{}", new_item("n1"), new_item("n2")), e400("invalid_json")),
        case("batch: more items than allowed", "POST /v1/locations", JSON, Value::Array(six_items.clone()).to_string(), err(413, "payload_too_large")),
        case("batch: more NDJSON lines than allowed", "POST /v1/locations", NDJSON, six_items.iter().map(Value::to_string).collect::<Vec<_>>().join("\n"), err(413, "payload_too_large")),
        // ---- POST /v1/locations: one bad item ------------------------------
        case("item: lat 95", "POST /v1/locations", JSON, json!([{"driver_id": "n1", "lat": 95, "lon": 0}]).to_string(), item("invalid_position")),
        case("item: id with a space", "POST /v1/locations", JSON, json!([{"driver_id": "bad id", "lat": 41.8, "lon": -87.6}]).to_string(), item("invalid_id")),
        case("item: empty id", "POST /v1/locations", JSON, json!([{"driver_id": "", "lat": 41.8, "lon": -87.6}]).to_string(), item("invalid_id")),
        case("item: id of 65 characters", "POST /v1/locations", JSON, json!([{"driver_id": long, "lat": 41.8, "lon": -87.6}]).to_string(), item("invalid_id")),
        case("item: id not ASCII", "POST /v1/locations", JSON, json!([{"driver_id": "café", "lat": 41.8, "lon": -87.6}]).to_string(), item("invalid_id")),
        case("item: id as a number", "POST /v1/locations", JSON, json!([{"driver_id": 7, "lat": 41.8, "lon": -87.6}]).to_string(), item("invalid_json")),
        case("item: id missing", "POST /v1/locations", JSON, json!([{"lat": 41.8, "lon": -87.6}]).to_string(), item("invalid_json")),
        case("item: ts not a time", "POST /v1/locations", JSON, json!([{"driver_id": "n1", "lat": 41.8, "lon": -87.6, "ts": "later"}]).to_string(), item("invalid_timestamp")),
        case("item: ts beyond the clock skew", "POST /v1/locations", JSON, json!([{"driver_id": "d1", "lat": 41.8, "lon": -87.6, "ts": FUTURE}]).to_string(), item("invalid_timestamp")),
        case("item: vehicle unknown", "POST /v1/locations", JSON, json!([{"driver_id": "n1", "lat": 41.8, "lon": -87.6, "vehicle": "boat"}]).to_string(), item("invalid_parameter")),
        case("item: status reserved", "POST /v1/locations", JSON, json!([{"driver_id": "d1", "lat": 41.8, "lon": -87.6, "status": "reserved"}]).to_string(), item("invalid_parameter")),
        case("item: capability unknown", "POST /v1/locations", JSON, json!([{"driver_id": "n1", "lat": 41.8, "lon": -87.6, "capabilities": ["flight"]}]).to_string(), item("invalid_parameter")),
        case("item: unknown field", "POST /v1/locations", JSON, json!([{"driver_id": "n1", "lat": 41.8, "lon": -87.6, "speed": 3}]).to_string(), item("invalid_json")),
        case("item: a number", "POST /v1/locations", JSON, "[5]", item("invalid_json")),
        case("item: null", "POST /v1/locations", JSON, "[null]", item("invalid_json")),
        case("item: an array", "POST /v1/locations", JSON, json!([[new_item("n1")]]).to_string(), item("invalid_json")),
        case("item: fields as a positional array", "POST /v1/locations", JSON, r#"[["n1", 41.9, -87.7, null, null, null, null]]"#, item("invalid_json")),
        case("item: bad position after a stale one", "POST /v1/locations", JSON, after_stale(&json!({"driver_id": "n1", "lat": 0, "lon": 181})), item_after_stale("invalid_position")),
        case("item: bad id after a stale one", "POST /v1/locations", JSON, after_stale(&json!({"driver_id": "a/b", "lat": 0, "lon": 0})), item_after_stale("invalid_id")),
        case("item: reserved status after a stale one", "POST /v1/locations", JSON, after_stale(&json!({"driver_id": "d2", "lat": 0, "lon": 0, "status": "reserved"})), item_after_stale("invalid_parameter")),
        // ---- POST /v1/locations as NDJSON ----------------------------------
        case("ndjson: a line that is not JSON", "POST /v1/locations", NDJSON, "{\"driver_id\": \"n1\", \"lat\": \n", item("invalid_json")),
        case("ndjson: lat 95", "POST /v1/locations", NDJSON, "{\"driver_id\": \"n1\", \"lat\": 95, \"lon\": 0}\n", item("invalid_position")),
        case("ndjson: a line not UTF-8", "POST /v1/locations", NDJSON, b"{\"driver_id\": \"n\xff\xfe\", \"lat\": 41.8, \"lon\": -87.6}\n", item("invalid_json")),
        case("ndjson: blank lines are not items", "POST /v1/locations", NDJSON, "\n\r\n  \n{\"driver_id\": \"bad id\", \"lat\": 1, \"lon\": 1}\n\n", item("invalid_id")),
        case("ndjson: an array line", "POST /v1/locations", Some("application/ndjson"), format!("[{}]\n", new_item("n1")), item("invalid_json")),
        case("ndjson: CRLF line with a bad ts", "POST /v1/locations", NDJSON, "{\"driver_id\": \"n1\", \"lat\": 1, \"lon\": 1, \"ts\": \"soon\"}\r\n", item("invalid_timestamp")),
        case("ndjson: bad line after a stale one", "POST /v1/locations", NDJSON, format!("{}\n{{\"driver_id\": \"n1\", \"lat\": 1, \"lon\": 1, \"vehicle\": \"ufo\"}}\n", stale_item()), item_after_stale("invalid_parameter")),
        // ---- POST /v1/matches ----------------------------------------------
        case("claim: truncated JSON", "POST /v1/matches", JSON, r#"{"order_id": "o1", "pickup": {"lat": 41.88"#, e400("invalid_json")),
        case("claim: an array", "POST /v1/matches", JSON, "[]", e400("invalid_json")),
        case("claim: pickup missing", "POST /v1/matches", JSON, r#"{"order_id": "o1"}"#, e400("invalid_json")),
        case("claim: order_id missing", "POST /v1/matches", JSON, json!({"pickup": order["pickup"]}).to_string(), e400("invalid_json")),
        case("claim: pickup as an array", "POST /v1/matches", JSON, json!({"order_id": "o-arr", "pickup": [41.88, -87.63]}).to_string(), e400("invalid_json")),
        case("claim: pickup without lon", "POST /v1/matches", JSON, with(&order, &json!({"pickup": {"lat": 41.88}})), e400("invalid_json")),
        case("claim: pickup lat 91", "POST /v1/matches", JSON, with(&order, &json!({"pickup": {"lat": 91.0, "lon": 0.0}})), e400("invalid_position")),
        case("claim: pickup lon -180.01", "POST /v1/matches", JSON, with(&order, &json!({"pickup": {"lat": 0.0, "lon": -180.01}})), e400("invalid_position")),
        case("claim: order id with a space", "POST /v1/matches", JSON, with(&order, &json!({"order_id": "a b"})), e400("invalid_id")),
        case("claim: empty order id", "POST /v1/matches", JSON, with(&order, &json!({"order_id": ""})), e400("invalid_id")),
        case("claim: order id of 65 characters", "POST /v1/matches", JSON, with(&order, &json!({"order_id": long})), e400("invalid_id")),
        case("claim: order id not ASCII", "POST /v1/matches", JSON, with(&order, &json!({"order_id": "ü"})), e400("invalid_id")),
        case("claim: order id as a number", "POST /v1/matches", JSON, with(&order, &json!({"order_id": 5})), e400("invalid_json")),
        case("claim: vehicle unknown", "POST /v1/matches", JSON, with(&order, &json!({"vehicle": "boat"})), e400("invalid_parameter")),
        case("claim: capability unknown", "POST /v1/matches", JSON, with(&order, &json!({"capabilities": ["teleport"]})), e400("invalid_parameter")),
        case("claim: radius negative", "POST /v1/matches", JSON, with(&order, &json!({"radius_m": -1.0})), e400("invalid_parameter")),
        case("claim: radius zero", "POST /v1/matches", JSON, with(&order, &json!({"radius_m": 0})), e400("invalid_parameter")),
        case("claim: radius as text", "POST /v1/matches", JSON, with(&order, &json!({"radius_m": "far"})), e400("invalid_json")),
        case("claim: hold zero", "POST /v1/matches", JSON, with(&order, &json!({"hold_ms": 0})), e400("invalid_parameter")),
        case("claim: hold above an hour", "POST /v1/matches", JSON, with(&order, &json!({"hold_ms": 3_600_001})), e400("invalid_parameter")),
        case("claim: hold negative", "POST /v1/matches", JSON, with(&order, &json!({"hold_ms": -5})), err_in(400, &["invalid_parameter", "invalid_json"])),
        case("claim: unknown field", "POST /v1/matches", JSON, with(&order, &json!({"priority": "high"})), e400("invalid_json")),
        case("claim: nobody within the radius", "POST /v1/matches", JSON, json!({"order_id": "o-far", "pickup": {"lat": 0.0, "lon": 0.0}, "radius_m": 1000}).to_string(), err(409, "no_driver_available")),
        case("claim: nobody with the vehicle", "POST /v1/matches", JSON, json!({"order_id": "o-veh", "pickup": order["pickup"], "vehicle": "truck"}).to_string(), err(409, "no_driver_available")),
        case("claim: a live order with another body", "POST /v1/matches", JSON, json!({"order_id": "o-live", "pickup": {"lat": D1.0, "lon": D1.1}}).to_string(), err(409, "order_conflict")),
        // ---- POST /v1/matches/batch ----------------------------------------
        case("batch orders: truncated", "POST /v1/matches/batch", JSON, r#"{"orders": ["#, e400("invalid_json")),
        case("batch orders: empty object", "POST /v1/matches/batch", JSON, "{}", e400("invalid_json")),
        case("batch orders: orders as text", "POST /v1/matches/batch", JSON, r#"{"orders": "A"}"#, e400("invalid_json")),
        case("batch orders: orders null", "POST /v1/matches/batch", JSON, r#"{"orders": null}"#, e400("invalid_json")),
        case("batch orders: unknown field", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order], "window": 3}).to_string(), e400("invalid_json")),
        case("batch orders: objective unknown", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order], "objective": "fastest"}).to_string(), e400("invalid_parameter")),
        case("batch orders: objective a number", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order], "objective": 7}).to_string(), e400("invalid_json")),
        case("batch orders: pickup as an array", "POST /v1/matches/batch", JSON, json!({"orders": [{"order_id": "A", "pickup": [41.88, -87.63]}]}).to_string(), e400("invalid_json")),
        case("batch orders: bad position", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order, {"order_id": "B", "pickup": {"lat": 100, "lon": 0}}]}).to_string(), e400("invalid_position")),
        case("batch orders: bad order id", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order, {"order_id": "b b", "pickup": order["pickup"]}]}).to_string(), e400("invalid_id")),
        case("batch orders: vehicle unknown", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order, {"order_id": "B", "pickup": order["pickup"], "vehicle": "ufo"}]}).to_string(), e400("invalid_parameter")),
        case("batch orders: hold zero", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order, {"order_id": "B", "pickup": order["pickup"], "hold_ms": 0}]}).to_string(), e400("invalid_parameter")),
        case("batch orders: the same order twice", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order, batch_order]}).to_string(), e400("invalid_parameter")),
        case("batch orders: candidates 0", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order], "candidates": 0}).to_string(), e400("invalid_parameter")),
        case("batch orders: candidates 101", "POST /v1/matches/batch", JSON, json!({"orders": [batch_order], "candidates": 101}).to_string(), e400("invalid_parameter")),
        case("batch orders: more orders than allowed", "POST /v1/matches/batch", JSON, json!({"orders": six_orders}).to_string(), err(413, "payload_too_large")),
        // ---- confirm / release / complete ----------------------------------
        case("release: truncated reason", "POST /v1/matches/o-live/release", JSON, r#"{"reason": "#, e400("invalid_json")),
        case("release: reason of 257 bytes", "POST /v1/matches/o-live/release", JSON, json!({"reason": "r".repeat(257)}).to_string(), e400("invalid_parameter")),
        case("release: reason a number", "POST /v1/matches/o-live/release", JSON, r#"{"reason": 5}"#, e400("invalid_json")),
        case("release: unknown field", "POST /v1/matches/o-live/release", JSON, r#"{"why": "x"}"#, e400("invalid_json")),
        case("release: an array", "POST /v1/matches/o-live/release", JSON, "[]", e400("invalid_json")),
        case("release: text body", "POST /v1/matches/o-live/release", Some("text/plain"), "customer cancelled", err(415, "unsupported_media_type")),
        case("release: an ended match", "POST /v1/matches/o-done/release", NONE, "", err(409, "order_conflict")),
        case("confirm: an ended match", "POST /v1/matches/o-done/confirm", NONE, "", err(409, "order_conflict")),
        case("confirm: a confirmed match", "POST /v1/matches/o-conf/confirm", NONE, "", err(409, "order_conflict")),
        case("complete: a reserved match", "POST /v1/matches/o-live/complete", NONE, "", err(409, "order_conflict")),
        case("complete: an ended match", "POST /v1/matches/o-done/complete", NONE, "", err(409, "order_conflict")),
        case("confirm: unknown order", "POST /v1/matches/o-ghost/confirm", NONE, "", err(404, "unknown_order")),
        case("release: unknown order", "POST /v1/matches/o-ghost/release", NONE, "", err(404, "unknown_order")),
        case("complete: unknown order", "POST /v1/matches/o-ghost/complete", NONE, "", err(404, "unknown_order")),
        case("get match: unknown order", "GET /v1/matches/o-ghost", NONE, "", err(404, "unknown_order")),
        // ---- GET /v1/drivers/nearest: the query string ---------------------
        case("nearest: no parameters", "GET /v1/drivers/nearest", NONE, "", e400("invalid_parameter")),
        case("nearest: lat missing", "GET /v1/drivers/nearest?lon=-87.63", NONE, "", e400("invalid_parameter")),
        case("nearest: lon missing", "GET /v1/drivers/nearest?lat=41.88", NONE, "", e400("invalid_parameter")),
        case("nearest: lat empty", "GET /v1/drivers/nearest?lat=&lon=-87.63", NONE, "", e400("invalid_parameter")),
        case("nearest: lat not a number", "GET /v1/drivers/nearest?lat=north&lon=0", NONE, "", e400("invalid_parameter")),
        case("nearest: lat badly escaped", "GET /v1/drivers/nearest?lat=%ZZ&lon=0", NONE, "", e400("invalid_parameter")),
        case("nearest: lat 91", "GET /v1/drivers/nearest?lat=91&lon=0", NONE, "", e400("invalid_position")),
        case("nearest: lat -90.0001", "GET /v1/drivers/nearest?lat=-90.0001&lon=0", NONE, "", e400("invalid_position")),
        case("nearest: lon 180.5", "GET /v1/drivers/nearest?lat=0&lon=180.5", NONE, "", e400("invalid_position")),
        case("nearest: lon -181", "GET /v1/drivers/nearest?lat=0&lon=-181", NONE, "", e400("invalid_position")),
        case("nearest: lat NaN", "GET /v1/drivers/nearest?lat=NaN&lon=0", NONE, "", err_in(400, &["invalid_position", "invalid_parameter"])),
        case("nearest: lat inf", "GET /v1/drivers/nearest?lat=inf&lon=0", NONE, "", err_in(400, &["invalid_position", "invalid_parameter"])),
        case("nearest: lat 1e400", "GET /v1/drivers/nearest?lat=1e400&lon=0", NONE, "", err_in(400, &["invalid_position", "invalid_parameter"])),
        case("nearest: k 0", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&k=0", NONE, "", e400("invalid_parameter")),
        case("nearest: k 101", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&k=101", NONE, "", e400("invalid_parameter")),
        case("nearest: k negative", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&k=-1", NONE, "", e400("invalid_parameter")),
        case("nearest: k a word", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&k=ten", NONE, "", e400("invalid_parameter")),
        case("nearest: k fractional", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&k=1.5", NONE, "", e400("invalid_parameter")),
        case("nearest: k huge", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&k=99999999999999999999999", NONE, "", e400("invalid_parameter")),
        case("nearest: radius negative", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&radius_m=-5", NONE, "", e400("invalid_parameter")),
        case("nearest: radius zero", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&radius_m=0", NONE, "", e400("invalid_parameter")),
        case("nearest: radius a word", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&radius_m=far", NONE, "", e400("invalid_parameter")),
        case("nearest: radius NaN", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&radius_m=NaN", NONE, "", e400("invalid_parameter")),
        case("nearest: vehicle unknown", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&vehicle=boat", NONE, "", e400("invalid_parameter")),
        case("nearest: vehicle empty", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&vehicle=", NONE, "", e400("invalid_parameter")),
        case("nearest: capability unknown", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&capabilities=teleport", NONE, "", e400("invalid_parameter")),
        case("nearest: one capability unknown", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&capabilities=cash,teleport", NONE, "", e400("invalid_parameter")),
        case("nearest: unknown parameter", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&kk=3", NONE, "", e400("invalid_parameter")),
        case("nearest: lat twice", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&lat=41.89", NONE, "", e400("invalid_parameter")),
        case("nearest: k twice", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63&k=1&k=2", NONE, "", e400("invalid_parameter")),
        // ---- ids in paths --------------------------------------------------
        case("path: driver id with a space", "GET /v1/drivers/a%20b", NONE, "", e400("invalid_id")),
        case("path: driver id of 65 characters", format!("GET /v1/drivers/{long}"), NONE, "", e400("invalid_id")),
        case("path: driver id not ASCII", "GET /v1/drivers/caf%C3%A9", NONE, "", e400("invalid_id")),
        case("path: driver id with an escaped slash", "GET /v1/drivers/a%2Fb", NONE, "", e400("invalid_id")),
        case("path: driver id with a semicolon", "GET /v1/drivers/semi%3Bcolon", NONE, "", e400("invalid_id")),
        case("path: driver id with a NUL", "GET /v1/drivers/a%00b", NONE, "", e400("invalid_id")),
        case("path: driver id with a plus", "GET /v1/drivers/a+b", NONE, "", e400("invalid_id")),
        case("path: driver id badly escaped", "GET /v1/drivers/%ZZ", NONE, "", e400("invalid_id")),
        case("path: bad id on PUT", "PUT /v1/drivers/a%20b", JSON, put.to_string(), e400("invalid_id")),
        case("path: long id on PUT", format!("PUT /v1/drivers/{long}"), JSON, put.to_string(), e400("invalid_id")),
        case("path: bad id on DELETE", "DELETE /v1/drivers/a%20b", NONE, "", e400("invalid_id")),
        case("path: bad id on location", "POST /v1/drivers/a%20b/location", JSON, loc.to_string(), e400("invalid_id")),
        case("path: order id with a space", "GET /v1/matches/a%20b", NONE, "", e400("invalid_id")),
        case("path: order id of 65 characters", format!("GET /v1/matches/{long}"), NONE, "", e400("invalid_id")),
        case("path: bad order id on confirm", "POST /v1/matches/caf%C3%A9/confirm", NONE, "", e400("invalid_id")),
        case("path: bad order id on release", "POST /v1/matches/a%20b/release", NONE, "", e400("invalid_id")),
        case("path: bad order id on complete", format!("POST /v1/matches/{long}/complete"), NONE, "", e400("invalid_id")),
        case("path: unknown driver", "GET /v1/drivers/ghost", NONE, "", err(404, "unknown_driver")),
        case("path: delete an unknown driver", "DELETE /v1/drivers/ghost", NONE, "", err(404, "unknown_driver")),
        // ---- routes and methods --------------------------------------------
        case("route: unknown", "GET /nope", NONE, "", err(404, "not_found")),
        case("route: unknown under /v1", "GET /v1/nope", NONE, "", err(404, "not_found")),
        case("route: unknown driver sub-route", "GET /v1/drivers/d1/nope", NONE, "", err(404, "not_found")),
        case("route: empty driver id", "GET /v1/drivers/", NONE, "", err(404, "not_found")),
        case("route: another version", "GET /v2/regions", NONE, "", err(404, "not_found")),
        case("method: PATCH a driver", "PATCH /v1/drivers/d1", JSON, put.to_string(), err(405, "method_not_allowed")),
        case("method: POST a driver", "POST /v1/drivers/d1", JSON, put.to_string(), err(405, "method_not_allowed")),
        case("method: DELETE nearest", "DELETE /v1/drivers/nearest", NONE, "", err(405, "method_not_allowed")),
        case("method: POST nearest", "POST /v1/drivers/nearest", JSON, "{}", err(405, "method_not_allowed")),
        case("method: GET the claims route", "GET /v1/matches", NONE, "", err(405, "method_not_allowed")),
        case("method: DELETE a match", "DELETE /v1/matches/o-live", NONE, "", err(405, "method_not_allowed")),
        case("method: GET confirm", "GET /v1/matches/o-live/confirm", NONE, "", err(405, "method_not_allowed")),
        case("method: PUT locations", "PUT /v1/locations", JSON, "[]", err(405, "method_not_allowed")),
        case("method: DELETE regions", "DELETE /v1/regions", NONE, "", err(405, "method_not_allowed")),
        case("method: POST cluster", "POST /v1/cluster", JSON, "{}", err(405, "method_not_allowed")),
        case("method: POST livez", "POST /livez", NONE, "", err(405, "method_not_allowed")),
        case("stream: a plain GET, no upgrade", "GET /v1/locations/stream", NONE, "", err(426, "upgrade_required")),
        // ---- content types -------------------------------------------------
        case("type: PUT as text", "PUT /v1/drivers/d1", Some("text/plain"), put.to_string(), err(415, "unsupported_media_type")),
        case("type: PUT without a type", "PUT /v1/drivers/fresh", NONE, put.to_string(), err(415, "unsupported_media_type")),
        case("type: PUT as NDJSON", "PUT /v1/drivers/d1", NDJSON, put.to_string(), err(415, "unsupported_media_type")),
        case("type: PUT as JSONP", "PUT /v1/drivers/d1", Some("application/jsonp"), put.to_string(), err(415, "unsupported_media_type")),
        case("type: PUT as a form", "PUT /v1/drivers/d1", Some("application/x-www-form-urlencoded"), "lat=41.9&lon=-87.7", err(415, "unsupported_media_type")),
        case("type: location as text", "POST /v1/drivers/d1/location", Some("text/plain"), loc.to_string(), err(415, "unsupported_media_type")),
        case("type: location without a type", "POST /v1/drivers/d1/location", NONE, loc.to_string(), err(415, "unsupported_media_type")),
        case("type: batch as CSV", "POST /v1/locations", Some("text/csv"), "driver_id,lat,lon\nn1,41.9,-87.7\n", err(415, "unsupported_media_type")),
        case("type: batch as XML", "POST /v1/locations", Some("application/xml"), "[]", err(415, "unsupported_media_type")),
        case("type: batch without a type", "POST /v1/locations", NONE, json!([new_item("n1")]).to_string(), err(415, "unsupported_media_type")),
        case("type: claim as a form", "POST /v1/matches", Some("application/x-www-form-urlencoded"), "order_id=o1", err(415, "unsupported_media_type")),
        case("type: claim without a type", "POST /v1/matches", NONE, order.to_string(), err(415, "unsupported_media_type")),
        case("type: batch of orders as text", "POST /v1/matches/batch", Some("text/plain"), json!({"orders": [batch_order]}).to_string(), err(415, "unsupported_media_type")),
        // ---- bodies past the limit -----------------------------------------
        case("size: PUT", "PUT /v1/drivers/big", JSON, padded(&put), err(413, "payload_too_large")),
        case("size: location", "POST /v1/drivers/d1/location", JSON, padded(&loc), err(413, "payload_too_large")),
        case("size: batch", "POST /v1/locations", JSON, padded(&json!([new_item("big")])), err(413, "payload_too_large")),
        case("size: NDJSON batch", "POST /v1/locations", NDJSON, format!("{}{}", new_item("big"), "\n".repeat(BODY_LIMIT + 100)), err(413, "payload_too_large")),
        case("size: claim", "POST /v1/matches", JSON, padded(&order), err(413, "payload_too_large")),
        case("size: batch of orders", "POST /v1/matches/batch", JSON, padded(&json!({"orders": [batch_order]})), err(413, "payload_too_large")),
        case("size: release", "POST /v1/matches/o-live/release", JSON, padded(&json!({"reason": "x"})), err(413, "payload_too_large")),
        // ---- credentials ---------------------------------------------------
        case("auth: no token on PUT", "PUT /v1/drivers/d1", JSON, put.to_string(), err(401, "unauthorized")).auth(Auth::Anonymous),
        case("auth: no token on nearest", "GET /v1/drivers/nearest?lat=41.88&lon=-87.63", NONE, "", err(401, "unauthorized")).auth(Auth::Anonymous),
        case("auth: no token beats a bad body", "POST /v1/matches", JSON, "{", err(401, "unauthorized")).auth(Auth::Anonymous),
        case("auth: wrong token", "DELETE /v1/drivers/d1", NONE, "", err(401, "unauthorized")).auth(Auth::Header("Bearer not-a-token")),
        case("auth: Basic scheme", "GET /v1/regions", NONE, "", err(401, "unauthorized")).auth(Auth::Header("Basic YWRtaW46eA==")),
        case("auth: scheme without a token", "GET /v1/regions", NONE, "", err(401, "unauthorized")).auth(Auth::Header("Bearer")),
        case("auth: token without a scheme", "GET /v1/regions", NONE, "", err(401, "unauthorized")).auth(Auth::Header(ADMIN)),
        case("auth: token with trailing words", "GET /v1/regions", NONE, "", err(401, "unauthorized")).auth(Auth::Header("Bearer admin-token-0123456789 extra")),
        case("auth: a JWT-shaped stranger", "GET /v1/regions", NONE, "", err(401, "unauthorized")).auth(Auth::Header("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")),
        case("scope: reader moves a driver", "PUT /v1/drivers/d1", JSON, put.to_string(), err(403, "forbidden")).auth(Auth::Reader),
        case("scope: reader posts locations", "POST /v1/locations", JSON, json!([new_item("n1")]).to_string(), err(403, "forbidden")).auth(Auth::Reader),
        case("scope: reader claims", "POST /v1/matches", JSON, order.to_string(), err(403, "forbidden")).auth(Auth::Reader),
        case("scope: reader releases", "POST /v1/matches/o-live/release", NONE, "", err(403, "forbidden")).auth(Auth::Reader),
        case("scope: reader deletes", "DELETE /v1/drivers/d1", NONE, "", err(403, "forbidden")).auth(Auth::Reader),
    ]
}

/// A WebSocket frame sent on an open stream, rejected with `code`.
struct Frame {
    name: &'static str,
    message: Message,
    code: &'static str,
}

fn text(name: &'static str, frame: impl Into<String>, code: &'static str) -> Frame {
    Frame {
        name,
        message: Message::text(frame.into()),
        code,
    }
}

// A table: one row per line.
#[rustfmt::skip]
fn frame_cases() -> Vec<Frame> {
    let long = "x".repeat(65);
    vec![
        text("frame: truncated JSON", "{\"driver_id\": \"x1\", \"lat\": ", "invalid_json"),
        text("frame: empty text", "", "invalid_json"),
        text("frame: an array", "[]", "invalid_json"),
        text("frame: null", "null", "invalid_json"),
        text("frame: two objects", format!("{}{}", new_item("x1"), new_item("x2")), "invalid_json"),
        text("frame: lat 91", r#"{"driver_id": "x2", "lat": 91, "lon": 0}"#, "invalid_position"),
        text("frame: lon 500 on a known driver", r#"{"driver_id": "d1", "lat": 1, "lon": 500}"#, "invalid_position"),
        text("frame: id with a space", r#"{"driver_id": "x 3", "lat": 1, "lon": 0}"#, "invalid_id"),
        text("frame: id of 65 characters", json!({"driver_id": long, "lat": 1, "lon": 0}).to_string(), "invalid_id"),
        text("frame: ts not a time", r#"{"driver_id": "x4", "lat": 1, "lon": 0, "ts": "soon"}"#, "invalid_timestamp"),
        text("frame: ts beyond the clock skew", json!({"driver_id": "d1", "lat": 1, "lon": 0, "ts": FUTURE}).to_string(), "invalid_timestamp"),
        text("frame: status reserved", r#"{"driver_id": "x5", "lat": 1, "lon": 0, "status": "reserved"}"#, "invalid_parameter"),
        text("frame: vehicle unknown", r#"{"driver_id": "x6", "lat": 1, "lon": 0, "vehicle": "boat"}"#, "invalid_parameter"),
        text("frame: capability unknown", r#"{"driver_id": "x7", "lat": 1, "lon": 0, "capabilities": ["x"]}"#, "invalid_parameter"),
        text("frame: fields as a positional array", r#"["x10", 41.9, -87.7, null, null, null, null]"#, "invalid_json"),
        text("frame: id missing", r#"{"lat": 1, "lon": 0}"#, "invalid_json"),
        text("frame: unknown field", r#"{"driver_id": "x8", "lat": 1, "lon": 0, "heading": 90}"#, "invalid_json"),
        Frame {
            name: "frame: binary, even of valid JSON",
            message: Message::binary(new_item("x9").to_string().into_bytes()),
            code: "invalid_json",
        },
        Frame {
            name: "frame: binary garbage",
            message: Message::binary(vec![0xff, 0x00, 0x7b]),
            code: "invalid_json",
        },
    ]
}

/// A WebSocket handshake that must be refused.
struct Handshake {
    name: &'static str,
    query: &'static str,
    auth: Auth,
    want: Want,
}

fn handshake(
    name: &'static str,
    query: &'static str,
    status: u16,
    code: &'static str,
) -> Handshake {
    Handshake {
        name,
        query,
        auth: Auth::Admin,
        want: Want::Error(status, code),
    }
}

// A table: one row per line.
#[rustfmt::skip]
fn handshake_cases() -> Vec<Handshake> {
    vec![
        handshake("handshake: ack_every 0", "ack_every=0", 400, "invalid_parameter"),
        handshake("handshake: ack_every negative", "ack_every=-1", 400, "invalid_parameter"),
        handshake("handshake: ack_every a word", "ack_every=many", 400, "invalid_parameter"),
        handshake("handshake: ack_every 10001", "ack_every=10001", 400, "invalid_parameter"),
        handshake("handshake: ack_every fractional", "ack_every=1.5", 400, "invalid_parameter"),
        handshake("handshake: ack_every empty", "ack_every=", 400, "invalid_parameter"),
        handshake("handshake: unknown parameter", "ack_every=1&batch=3", 400, "invalid_parameter"),
        handshake("handshake: ack_every twice", "ack_every=1&ack_every=2", 400, "invalid_parameter"),
        Handshake {
            auth: Auth::Anonymous,
            ..handshake("handshake: no token", "ack_every=1", 401, "unauthorized")
        },
        Handshake {
            auth: Auth::Header("Bearer wrong"),
            ..handshake("handshake: wrong token", "ack_every=1", 401, "unauthorized")
        },
        Handshake {
            auth: Auth::Reader,
            ..handshake("handshake: token without the locations scope", "ack_every=1", 403, "forbidden")
        },
    ]
}

fn authorization(auth: Auth) -> Option<String> {
    match auth {
        Auth::Admin => Some(format!("Bearer {ADMIN}")),
        Auth::Reader => Some(format!("Bearer {READER}")),
        Auth::Anonymous => None,
        Auth::Header(h) => Some(h.to_owned()),
    }
}

/// Checks an error body: `{"error": {"code", "message"}}` with a JSON
/// content type, the code one of `codes`, a non-empty message.
fn check_error(
    status: u16,
    content_type: &str,
    body: &str,
    want_status: u16,
    codes: &[&str],
) -> Result<(), String> {
    if status != want_status {
        return Err(format!(
            "status {status}, want {want_status}; body {body:?}"
        ));
    }
    if !content_type.starts_with("application/json") {
        return Err(format!(
            "content type {content_type:?} is not JSON; body {body:?}"
        ));
    }
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("body is not JSON ({e}): {body:?}"))?;
    let code = v["error"]["code"].as_str().unwrap_or("(none)");
    if !codes.contains(&code) {
        return Err(format!("code {code:?}, want one of {codes:?}; body {v}"));
    }
    if v["error"]["message"].as_str().is_none_or(str::is_empty) {
        return Err(format!("no error message in {v}"));
    }
    Ok(())
}

/// Checks a batch answer: nothing applied, `stale` stale, one rejection.
fn check_item(body: &str, index: u64, stale: u64, code: &str) -> Result<(), String> {
    let v: Value =
        serde_json::from_str(body).map_err(|e| format!("body is not JSON ({e}): {body:?}"))?;
    let rejected = v["rejected"]
        .as_array()
        .ok_or_else(|| format!("no rejected array in {v}"))?;
    let got = (
        v["applied"].as_u64(),
        v["stale"].as_u64(),
        rejected.len(),
        rejected.first().and_then(|r| r["index"].as_u64()),
        rejected.first().and_then(|r| r["error"]["code"].as_str()),
    );
    let want = (Some(0), Some(stale), 1, Some(index), Some(code));
    if got != want {
        return Err(format!(
            "tally {v}, want applied 0, stale {stale}, rejected [{index}: {code}]"
        ));
    }
    if rejected[0]["error"]["message"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        return Err(format!("no message for the rejected item in {v}"));
    }
    Ok(())
}

async fn run_http(srv: &TestServer, c: &Case) -> Result<(), String> {
    let client = &srv.client;
    let mut rb = client
        .request(c.method.clone(), srv.url(&c.path))
        .body(c.body.clone());
    if let Some(ct) = c.content_type {
        rb = rb.header(CONTENT_TYPE, ct);
    }
    if let Some(a) = authorization(c.auth) {
        rb = rb.header(AUTHORIZATION, a);
    }
    for (name, value) in &c.headers {
        rb = rb.header(*name, *value);
    }
    let r = rb.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = r.status().as_u16();
    let content_type = r
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let challenge = r.headers().get(WWW_AUTHENTICATE).cloned();
    let body = r.text().await.map_err(|e| format!("body not read: {e}"))?;
    match c.want {
        Want::Error(s, code) => check_error(status, &content_type, &body, s, &[code])?,
        Want::ErrorIn(s, codes) => check_error(status, &content_type, &body, s, codes)?,
        Want::Item { index, stale, code } => {
            if status != 200 {
                return Err(format!("status {status}, want 200; body {body:?}"));
            }
            check_item(&body, index, stale, code)?;
        }
    }
    if status == 401 && challenge.as_ref().and_then(|v| v.to_str().ok()) != Some("Bearer") {
        return Err(format!(
            "401 without WWW-Authenticate: Bearer (got {challenge:?})"
        ));
    }
    Ok(())
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens the location stream, or returns the refusal: status, content
/// type and body.
async fn ws_open(
    srv: &TestServer,
    query: &str,
    auth: Auth,
) -> Result<Socket, (u16, String, String)> {
    let url = format!("ws://{}/v1/locations/stream?{query}", srv.addr());
    let mut req = url.into_client_request().expect("a valid URL");
    if let Some(a) = authorization(auth) {
        req.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_str(&a).expect("a header value"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(resp)) => {
            let ct = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((resp.status().as_u16(), ct, body))
        }
        Err(e) => Err((0, String::new(), format!("connect failed: {e}"))),
    }
}

/// The next text frame (an ack), skipping pings and pongs.
async fn next_ack(socket: &mut Socket) -> Result<Value, String> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, socket.next())
            .await
            .map_err(|_| "no ack before the deadline".to_owned())?
            .ok_or("the server closed the stream")?
            .map_err(|e| format!("WebSocket error: {e}"))?;
        match msg {
            Message::Text(t) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| format!("ack is not JSON ({e}): {t}"));
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            other => return Err(format!("unexpected frame from the server: {other:?}")),
        }
    }
}

async fn run_frame(socket: &mut Socket, index: u64, f: &Frame) -> Result<(), String> {
    socket
        .send(f.message.clone())
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let ack = next_ack(socket).await?;
    check_item(&ack.to_string(), index, 0, f.code)
}

async fn seed(srv: &TestServer) {
    let admin = srv.api_with_token(Some(ADMIN));
    for (id, (lat, lon)) in [("d1", D1), ("d2", D2), ("d3", D3), ("d4", D4)] {
        admin
            .put_driver(id, &json!({"lat": lat, "lon": lon, "ts": T0}))
            .await;
    }
    for (order, (lat, lon), driver) in [
        ("o-live", D2, "d2"),
        ("o-conf", D3, "d3"),
        ("o-done", D4, "d4"),
    ] {
        let m = admin
            .claim(
                &json!({"order_id": order, "pickup": {"lat": lat, "lon": lon},
                           "radius_m": 100, "hold_ms": 3_600_000}),
            )
            .await
            .expect(201);
        assert_eq!(m["driver_id"], json!(driver), "seed claim {order}: {m}");
    }
    admin
        .post_empty("/v1/matches/o-conf/confirm")
        .await
        .expect(200);
    admin
        .post_empty("/v1/matches/o-done/release")
        .await
        .expect(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_gets_its_documented_error_and_changes_nothing() {
    let srv = TestServer::start_manual(ServeConfig {
        api_tokens: vec![ADMIN.into()],
        tokens: vec![ClientToken {
            name: "reader".into(),
            token: Secret::new(READER),
            scopes: vec![TokenScope::Read],
        }],
        body_limit_bytes: BODY_LIMIT,
        max_batch_items: MAX_BATCH,
        ..test_config()
    })
    .await;
    seed(&srv).await;

    let http = http_cases();
    let frames = frame_cases();
    let handshakes = handshake_cases();
    let rows = http.len() + frames.len() + handshakes.len();
    assert!(
        rows >= MIN_ROWS,
        "{rows} rows; the suite keeps at least {MIN_ROWS}"
    );
    let mut names = std::collections::HashSet::new();
    for name in http
        .iter()
        .map(|c| c.name)
        .chain(frames.iter().map(|f| f.name))
        .chain(handshakes.iter().map(|h| h.name))
    {
        assert!(names.insert(name), "two rows are named {name:?}");
    }

    let mut failures = Vec::new();
    let mut note = |name: &str,
                    what: Result<(), String>,
                    before: &hexmatch_tests::http::Snapshot,
                    after: hexmatch_tests::http::Snapshot| {
        if let Err(e) = what {
            failures.push(format!("{name}: {e}"));
        }
        if after != *before {
            failures.push(format!("{name}: changed the state"));
        }
    };

    for c in &http {
        let before = srv.snapshot(ORDERS);
        let outcome = run_http(&srv, c).await;
        note(c.name, outcome, &before, srv.snapshot(ORDERS));
    }

    for h in &handshakes {
        let before = srv.snapshot(ORDERS);
        let outcome = match ws_open(&srv, h.query, h.auth).await {
            Ok(_) => Err("the handshake was accepted".to_owned()),
            Err((status, ct, body)) => match h.want {
                Want::Error(s, code) => check_error(status, &ct, &body, s, &[code]),
                Want::ErrorIn(s, codes) => check_error(status, &ct, &body, s, codes),
                Want::Item { .. } => Err("a handshake row wants an error".to_owned()),
            },
        };
        note(h.name, outcome, &before, srv.snapshot(ORDERS));
    }

    // One connection for every frame: indexes count over the connection,
    // and a bad frame never closes it.
    let mut socket = ws_open(&srv, "ack_every=1", Auth::Admin)
        .await
        .unwrap_or_else(|refused| panic!("stream refused: {refused:?}"));
    for (i, f) in frames.iter().enumerate() {
        let before = srv.snapshot(ORDERS);
        let outcome = run_frame(&mut socket, i as u64, f).await;
        note(f.name, outcome, &before, srv.snapshot(ORDERS));
    }
    // Still open and applying after every bad frame.
    socket
        .send(Message::text(
            json!({"driver_id": "after", "lat": 41.9, "lon": -87.6}).to_string(),
        ))
        .await
        .expect("the stream is still open");
    let ack = next_ack(&mut socket).await.expect("an ack");
    assert_eq!(ack, json!({"applied": 1, "stale": 0, "rejected": []}));
    socket.close(None).await.ok();

    assert!(
        failures.is_empty(),
        "{} of {rows} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    srv.shutdown().await;
}
