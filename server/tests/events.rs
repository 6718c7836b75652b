//! The event feed against a real server on 127.0.0.1:0: every event type
//! produced by the action that causes it and seen on the SSE feed, on the
//! Redis stream (a private `redis-server`) and by a loopback webhook
//! receiver that checks the signature; resumption with `Last-Event-ID`;
//! gaps announced; the feed behind the token gate.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RedisServer, unique_prefix};
use hexmatch::{ManualClock, Timestamp};
use hexmatch_server::{ServeConfig, Server};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const TIMES_SQUARE: (f64, f64) = (40.758, -73.9855);
const BROOKLYN: (f64, f64) = (40.6782, -73.9442);
const SECRET: &str = "webhook-test-secret";

/// One named zone around Times Square.
const MIDTOWN: &str = r#"{"type":"FeatureCollection","features":[
  {"type":"Feature","id":"midtown","properties":{"name":"Midtown"},
   "geometry":{"type":"Polygon","coordinates":[[[-73.99,40.755],[-73.98,40.755],[-73.98,40.762],[-73.99,40.762],[-73.99,40.755]]]}}
]}"#;

fn boroughs() -> std::path::PathBuf {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../data/nyc_boroughs.geojson").into()
}

/// A server-sent message.
#[derive(Debug, Clone)]
struct Msg {
    id: Option<String>,
    event: String,
    data: String,
}

impl Msg {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("data is JSON")
    }
}

/// A reader of a `text/event-stream` response.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(base: &str, query: &str, headers: &[(&str, &str)]) -> Self {
        let mut req = reqwest::Client::new().get(format!("{base}/v1/events{query}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("feed answers");
        assert_eq!(resp.status(), 200, "the feed opens");
        assert_eq!(
            resp.headers()["content-type"].to_str().expect("ascii"),
            "text/event-stream"
        );
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next message (comments skipped), or `None` past the deadline.
    async fn next(&mut self, deadline: Instant) -> Option<Msg> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut msg = Msg {
                    id: None,
                    event: "message".to_owned(),
                    data: String::new(),
                };
                let mut any = false;
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        msg.id = Some(v.trim().to_owned());
                        any = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        v.trim().clone_into(&mut msg.event);
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        msg.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        any = true;
                    }
                }
                if any {
                    return Some(msg);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = tokio::time::timeout(left, self.resp.chunk()).await.ok()?;
            let chunk = chunk.expect("stream reads")?;
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    /// Messages until `done` says so, or panics after 10 s.
    async fn until(&mut self, what: &str, mut done: impl FnMut(&[Msg]) -> bool) -> Vec<Msg> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while !done(&got) {
            match self.next(deadline).await {
                Some(m) => got.push(m),
                None => panic!("timed out waiting for {what}; got {got:#?}"),
            }
        }
        got
    }
}

/// Each request a webhook receiver got: its signature header and body.
type Received = Arc<parking_lot::Mutex<Vec<(Option<String>, bytes::Bytes)>>>;

/// A loopback webhook receiver: answers 200 and keeps each request's
/// signature header and body.
struct Receiver {
    url: String,
    got: Received,
}

impl Receiver {
    async fn start() -> Self {
        Self::failing_first(0).await
    }

    /// A receiver that answers its first `n` requests 500 (and keeps
    /// nothing of them).
    async fn failing_first(n: usize) -> Self {
        let got: Received = Arc::default();
        let kept = Arc::clone(&got);
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: bytes::Bytes| async move {
                    use std::sync::atomic::Ordering;
                    if refused.fetch_add(1, Ordering::SeqCst) < n {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let sig = headers
                        .get("x-hexmatch-signature")
                        .map(|v| v.to_str().expect("ascii").to_owned());
                    kept.lock().push((sig, body));
                    axum::http::StatusCode::OK
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, got }
    }

    /// Every event received, each request's signature checked.
    fn events(&self) -> Vec<Value> {
        let got = self.got.lock();
        let mut out = Vec::new();
        for (sig, body) in got.iter() {
            let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
            mac.update(body);
            let want = mac
                .finalize()
                .into_bytes()
                .iter()
                .fold(String::new(), |mut hex, b| {
                    use std::fmt::Write as _;
                    let _ = write!(hex, "{b:02x}");
                    hex
                });
            assert_eq!(
                sig.as_deref(),
                Some(format!("sha256={want}").as_str()),
                "every POST is signed"
            );
            let batch: Vec<Value> = serde_json::from_slice(body).expect("a JSON array");
            out.extend(batch);
        }
        out
    }
}

async fn send(
    method: reqwest::Method,
    base: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, format!("{base}{path}"));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    send(reqwest::Method::POST, base, path, Some(body)).await
}

async fn put(base: &str, path: &str, body: Value) -> (u16, Value) {
    send(reqwest::Method::PUT, base, path, Some(body)).await
}

/// Creates driver `d1`, available in Chicago's Loop.
async fn put_driver_d1(base: &str) {
    let (s, body) = put(base, "/v1/drivers/d1", json!({"lat": 41.88, "lon": -87.63})).await;
    assert_eq!(s, 200, "{body}");
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    send(reqwest::Method::GET, base, path, None).await
}

async fn wait_ready(server: &Server) {
    let url = format!("http://{}/readyz", server.addr());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "server never became ready");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn types(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_owned())
        .collect()
}

fn all_types() -> BTreeSet<String> {
    [
        "match.reserved",
        "match.confirmed",
        "match.released",
        "match.expired",
        "match.completed",
        "driver.expired",
        "driver.status",
        "driver.entered",
        "driver.left",
    ]
    .map(str::to_owned)
    .into()
}

/// (id, type) of each event, in order.
fn ids_and_types(events: &[Value]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["id"].as_u64().expect("id"),
                e["type"].as_str().expect("type").to_owned(),
            )
        })
        .collect()
}

/// Polls `f` (async) until it returns `Some`, or panics after 10 s.
async fn poll_async<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// The events in the Redis stream `key`, each entry's fields checked
/// against its event.
fn stream_events(url: &str, key: &str) -> Option<Vec<Value>> {
    let mut c = RedisServer::conn(url);
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(&mut c)
        .ok()?;
    let events = entries
        .iter()
        .map(|(_, fields)| {
            let field = |k: &str| {
                fields
                    .iter()
                    .find(|(f, _)| f == k)
                    .map(|(_, v)| v.clone())
                    .expect("field")
            };
            let e: Value = serde_json::from_str(&field("event")).expect("json");
            assert_eq!(field("type"), e["type"]);
            assert_eq!(field("id"), e["id"].to_string());
            assert_eq!(field("node"), e["node"]);
            e
        })
        .collect();
    Some(events)
}

/// The events [`cause_every_event`] causes, in order.
const EVERY_EVENT: [&str; 22] = [
    "driver.entered",  // Manhattan
    "driver.entered",  // Midtown
    "driver.status",   // available -> reserved
    "match.reserved",  // o1
    "driver.status",   // reserved -> busy
    "match.confirmed", // o1
    "driver.status",   // busy -> available
    "match.completed", // o1
    "driver.status",   // available -> reserved
    "match.reserved",  // o2
    "driver.status",   // reserved -> available
    "match.released",  // o2
    "driver.status",   // available -> reserved
    "match.reserved",  // o3
    "driver.status",   // reserved -> available
    "match.expired",   // o3
    "driver.left",     // Manhattan
    "driver.left",     // Midtown
    "driver.entered",  // Brooklyn
    "driver.status",   // available -> offline
    "driver.expired",  // TTL
    "driver.left",     // Brooklyn, on removal
];

/// Does what causes each event type, in turn, to driver `d1` (the sweep
/// expires what `clock` lets lapse).
async fn cause_every_event(base: &str, clock: &ManualClock) {
    let base = base.to_owned();
    // Appears in Manhattan, inside Midtown: driver.entered twice.
    let (s, _) = put(
        &base,
        "/v1/drivers/d1",
        json!({"lat": TIMES_SQUARE.0, "lon": TIMES_SQUARE.1}),
    )
    .await;
    assert_eq!(s, 200);
    let pickup = json!({"lat": 40.7585, "lon": -73.985});
    // Reserved, confirmed, completed; each with the driver's status.
    let (s, _) = post(
        &base,
        "/v1/matches",
        json!({"order_id": "o1", "pickup": pickup}),
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(
        post(&base, "/v1/matches/o1/confirm", json!({})).await.0,
        200
    );
    assert_eq!(
        post(&base, "/v1/matches/o1/complete", json!({})).await.0,
        200
    );
    // Reserved and released.
    assert_eq!(
        post(
            &base,
            "/v1/matches",
            json!({"order_id": "o2", "pickup": pickup})
        )
        .await
        .0,
        201
    );
    assert_eq!(
        post(
            &base,
            "/v1/matches/o2/release",
            json!({"reason": "rider cancelled"})
        )
        .await
        .0,
        200
    );
    // Reserved, then expired by the sweep.
    assert_eq!(
        post(
            &base,
            "/v1/matches",
            json!({"order_id": "o3", "pickup": pickup, "hold_ms": 1000})
        )
        .await
        .0,
        201
    );
    clock.advance(5_000);
    poll_async("o3 to expire", || async {
        let (_, m) = get(&base, "/v1/matches/o3").await;
        (m["state"] == "expired").then_some(())
    })
    .await;
    // Crosses into Brooklyn: leaves Midtown and Manhattan, enters Brooklyn.
    let (s, _) = post(
        &base,
        "/v1/drivers/d1/location",
        json!({"lat": BROOKLYN.0, "lon": BROOKLYN.1}),
    )
    .await;
    assert_eq!(s, 200);
    // Goes offline.
    let (s, _) = put(
        &base,
        "/v1/drivers/d1",
        json!({"lat": BROOKLYN.0, "lon": BROOKLYN.1, "status": "offline"}),
    )
    .await;
    assert_eq!(s, 200);
    // Silent past the TTL: removed by the sweep.
    clock.advance(61_000);
}

/// The payloads of the events [`cause_every_event`] caused say what
/// happened.
fn check_payloads(on_sse: &[Value]) {
    let find = |t: &str, n: usize| on_sse.iter().filter(|e| e["type"] == t).nth(n).cloned();
    let released = find("match.released", 0).expect("released");
    assert_eq!(released["data"]["order_id"], "o2");
    assert_eq!(released["data"]["reason"], "rider cancelled");
    assert_eq!(released["data"]["driver_id"], "d1");
    assert_eq!(
        find("match.expired", 0).expect("expired")["data"]["order_id"],
        "o3"
    );
    let midtown = find("driver.entered", 1).expect("entered midtown");
    assert_eq!(midtown["data"]["zone"], "midtown");
    assert_eq!(midtown["data"]["name"], "Midtown");
    assert_eq!(midtown["data"]["kind"], "zone");
    let manhattan = find("driver.entered", 0).expect("entered a region");
    assert_eq!(manhattan["data"]["kind"], "region");
    assert_eq!(manhattan["data"]["name"], "Manhattan");
    let brooklyn = find("driver.entered", 2).expect("entered brooklyn");
    assert_eq!(brooklyn["data"]["name"], "Brooklyn");
    let offline = find("driver.status", 7).expect("went offline");
    assert_eq!(offline["data"]["previous"], "available");
    assert_eq!(offline["data"]["status"], "offline");
    let busy = find("driver.status", 1).expect("confirmed");
    assert_eq!(busy["data"]["status"], "busy");
    assert_eq!(busy["data"]["order_id"], "o1");
    let expired = find("driver.expired", 0).expect("ttl");
    assert_eq!(expired["data"]["driver_id"], "d1");
    assert_eq!(expired["data"]["status"], "offline");
    for e in on_sse {
        assert_eq!(e["node"], "node-1");
        Timestamp::parse(e["time"].as_str().expect("time")).expect("RFC 3339");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_reaches_sse_the_redis_stream_and_a_signed_webhook() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("events");
    let hook = Receiver::start().await;
    let dir = std::env::temp_dir().join(format!("hexmatch-zones-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let zones = dir.join("zones.geojson");
    std::fs::write(&zones, MIDTOWN).expect("zones written");
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(now_ms()).unwrap()));
    let config = ServeConfig {
        driver_ttl_s: 60,
        resolution: 7,
        regions: Some(boroughs()),
        zones: Some(zones),
        webhooks: vec![hook.url.clone()],
        webhook_secret: Some(hexmatch_server::config::Secret::new(SECRET)),
        ..common::redis_config(&redis.url, &prefix)
    };
    let server = hexmatch_server::start_with_clock(config, clock.clone())
        .await
        .expect("starts");
    wait_ready(&server).await;
    let base = format!("http://{}", server.addr());
    let mut sse = Sse::open(&base, "", &[]).await;
    cause_every_event(&base, &clock).await;

    let msgs = sse
        .until("every event type on the feed", |got| {
            // The removal, and the zone it took the driver out of.
            got.iter()
                .position(|m| m.event == "driver.expired")
                .is_some_and(|i| got.len() > i + 1)
        })
        .await;
    let on_sse: Vec<Value> = msgs.iter().map(Msg::json).collect();
    for (m, e) in msgs.iter().zip(&on_sse) {
        assert_eq!(m.event, e["type"], "the SSE event name is the type");
        assert_eq!(m.id.as_deref(), Some(e["id"].to_string().as_str()));
    }
    assert_eq!(types(&on_sse), all_types());
    let seq = ids_and_types(&on_sse);
    // Ids follow each other without gaps, from the first.
    for (i, (id, _)) in seq.iter().enumerate() {
        assert_eq!(*id, seq[0].0 + i as u64, "ids are contiguous: {seq:?}");
    }
    let kinds: Vec<&str> = seq.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(kinds, EVERY_EVENT, "{on_sse:#?}");
    check_payloads(&on_sse);

    // The same events, in the same order, on the Redis stream...
    let key = format!("{prefix}:events");
    let (first, want) = (seq[0].0, seq.len());
    let on_redis: Vec<Value> = poll_async("the Redis stream", || {
        let (url, key) = (redis.url.clone(), key.clone());
        async move {
            let events = stream_events(&url, &key)?;
            (events.len() >= want).then_some(events)
        }
    })
    .await;
    // The stream was attached once Redis answered; the feed's events all
    // came after.
    let tail = &on_redis[on_redis.len() - seq.len()..];
    assert_eq!(ids_and_types(tail), seq);
    assert_eq!(tail, &on_sse[..]);

    // ...and at the webhook, every POST signed.
    let on_hook = poll_async("the webhook", || {
        let got = hook.events();
        async move {
            let got: Vec<Value> = got
                .into_iter()
                .filter(|e| e["id"].as_u64() >= Some(first))
                .collect();
            (got.len() >= want).then_some(got)
        }
    })
    .await;
    assert_eq!(on_hook, on_sse);
    server.shutdown().await;
}

/// A memory-only server with `config` changes, on the system clock.
async fn memory_server(change: impl FnOnce(&mut ServeConfig)) -> (Server, String) {
    let mut config = ServeConfig {
        bind: "127.0.0.1:0".parse().expect("valid"),
        driver_ttl_s: 0,
        ..ServeConfig::default()
    };
    change(&mut config);
    let server = hexmatch_server::start(config).await.expect("starts");
    let base = format!("http://{}", server.addr());
    (server, base)
}

/// `n` status changes of driver `d`: each toggles it between available
/// and offline (the driver exists and is available first).
async fn toggle_status(base: &str, d: &str, n: usize) {
    let items: Vec<Value> = (0..n)
        .map(|i| {
            let status = if i % 2 == 0 { "offline" } else { "available" };
            json!({"driver_id": d, "lat": 41.88, "lon": -87.63, "status": status})
        })
        .collect();
    for chunk in items.chunks(5_000) {
        let (s, body) = post(base, "/v1/locations", Value::Array(chunk.to_vec())).await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["applied"].as_u64(), Some(chunk.len() as u64), "{body}");
    }
}

fn ids_of(msgs: &[Msg]) -> Vec<u64> {
    msgs.iter()
        .map(|m| m.id.as_deref().expect("an id").parse().expect("a number"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnection_resumes_from_last_event_id_without_losing_any() {
    let (server, base) = memory_server(|_| {}).await;
    put_driver_d1(&base).await;
    let mut sse = Sse::open(&base, "", &[]).await;
    toggle_status(&base, "d1", 10).await;
    let first = sse.until("ten events", |got| got.len() == 10).await;
    let ids = ids_of(&first);
    // Disconnected after the fourth: six more, and then ten, happen away.
    drop(sse);
    toggle_status(&base, "d1", 10).await;
    let last_seen = ids[3].to_string();
    let mut again = Sse::open(&base, "", &[("Last-Event-ID", &last_seen)]).await;
    let resumed = again.until("sixteen events", |got| got.len() == 16).await;
    let want: Vec<u64> = (ids[4]..ids[4] + 16).collect();
    assert_eq!(ids_of(&resumed), want);
    assert!(resumed.iter().all(|m| m.event == "driver.status"));
    // The query parameter resumes the same way.
    let mut by_query = Sse::open(&base, &format!("?last_event_id={}", ids[9]), &[]).await;
    let rest = by_query.until("ten events", |got| got.len() == 10).await;
    assert_eq!(
        ids_of(&rest),
        (ids[9] + 1..=ids[9] + 10).collect::<Vec<_>>()
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_beyond_the_backlog_is_announced() {
    let (server, base) = memory_server(|c| c.event_backlog = 5).await;
    put_driver_d1(&base).await;
    toggle_status(&base, "d1", 20).await;
    // Events 1..=20 were given; 16..=20 are held.
    let mut sse = Sse::open(&base, "", &[("Last-Event-ID", "2")]).await;
    let got = sse
        .until("the gap and five events", |got| got.len() == 6)
        .await;
    assert_eq!(got[0].event, "gap");
    assert_eq!(got[0].json(), json!({"last_event_id": 2, "first_id": 16}));
    assert_eq!(ids_of(&got[1..]), vec![16, 17, 18, 19, 20]);
    // An id this node never gave (it restarted since) is a gap too.
    let mut sse = Sse::open(&base, "", &[("Last-Event-ID", "999")]).await;
    let got = sse
        .until("the gap and five events", |got| got.len() == 6)
        .await;
    assert_eq!(got[0].json(), json!({"last_event_id": 999, "first_id": 16}));
    assert_eq!(ids_of(&got[1..]), vec![16, 17, 18, 19, 20]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_falls_behind_the_backlog_gets_the_gap() {
    let (server, base) = memory_server(|c| c.event_backlog = 100).await;
    put_driver_d1(&base).await;
    let mut sse = Sse::open(&base, "?types=driver.status", &[]).await;
    // Far more than the socket buffers hold, while the client reads nothing.
    toggle_status(&base, "d1", 100_000).await;
    let got = sse
        .until("a gap", |got| got.iter().any(|m| m.event == "gap"))
        .await;
    let gap = got.last().expect("the gap").json();
    let (last, first) = (
        gap["last_event_id"].as_u64().expect("last"),
        gap["first_id"].as_u64().expect("first"),
    );
    assert!(first > last + 1, "{gap}");
    // Every event before the gap came in order, and the feed goes on
    // from the first id still held.
    let before = ids_of(&got[..got.len() - 1]);
    assert_eq!(before, (1..=last).collect::<Vec<_>>());
    let next = sse.until("the next event", |g| !g.is_empty()).await;
    assert!(ids_of(&next)[0] >= first);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_filter_the_feed() {
    let (server, base) = memory_server(|_| {}).await;
    let (s, body) = get(&base, "/v1/events?types=match.reserve").await;
    assert_eq!(s, 400);
    assert_eq!(body["error"]["code"], "invalid_parameter");
    let mut sse = Sse::open(&base, "?types=match.*", &[]).await;
    put_driver_d1(&base).await;
    let pickup = json!({"lat": 41.88, "lon": -87.63});
    assert_eq!(
        post(
            &base,
            "/v1/matches",
            json!({"order_id": "o1", "pickup": pickup})
        )
        .await
        .0,
        201
    );
    assert_eq!(
        post(&base, "/v1/matches/o1/release", json!({})).await.0,
        200
    );
    let got = sse.until("two match events", |g| g.len() == 2).await;
    let kinds: Vec<&str> = got.iter().map(|m| m.event.as_str()).collect();
    assert_eq!(kinds, ["match.reserved", "match.released"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tokens_the_feed_needs_a_read_token() {
    use hexmatch_server::config::{ClientToken, Secret, TokenScope};
    let named = vec![
        ClientToken {
            name: "dashboard".to_owned(),
            token: Secret::new("read-token-123"),
            scopes: vec![TokenScope::Read],
        },
        ClientToken {
            name: "fleet".to_owned(),
            token: Secret::new("loc-token-123"),
            scopes: vec![TokenScope::Locations],
        },
    ];
    let (server, base) = memory_server(|c| c.tokens = named).await;
    let feed = |token: Option<&'static str>| {
        let base = base.clone();
        async move {
            let mut req = reqwest::Client::new().get(format!("{base}/v1/events"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await.expect("answers").status().as_u16()
        }
    };
    assert_eq!(feed(None).await, 401);
    assert_eq!(feed(Some("wrong")).await, 401);
    assert_eq!(feed(Some("loc-token-123")).await, 403);
    assert_eq!(feed(Some("read-token-123")).await, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_loses_events_counted_and_claims_go_on() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        l.local_addr().expect("addr")
    };
    let (server, base) = memory_server(|c| {
        c.webhooks = vec![format!("http://{dead}/hook")];
        c.webhook_secret = Some(hexmatch_server::config::Secret::new(SECRET));
        c.webhook_queue = 4;
    })
    .await;
    put_driver_d1(&base).await;
    let pickup = json!({"lat": 41.88, "lon": -87.63});
    for i in 0..50 {
        let order = format!("o{i}");
        let (s, _) = post(
            &base,
            "/v1/matches",
            json!({"order_id": order, "pickup": pickup}),
        )
        .await;
        assert_eq!(s, 201);
        let (s, _) = post(&base, &format!("/v1/matches/{order}/release"), json!({})).await;
        assert_eq!(s, 200);
    }
    // The sum over the lines of `name` whose labels include every one of `labels`.
    let metric = |text: &str, name: &str, labels: &[&str]| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    poll_async("drops and failures in /metrics", || async {
        let text = reqwest::get(format!("{base}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let dropped = metric(
            &text,
            "hexmatch_events_dropped_total",
            &["reason=\"queue_full\"", "sink=\"webhook-1\""],
        );
        let failed = metric(&text, "hexmatch_webhook_failures_total", &["hook=\"1\""]);
        (dropped > 0.0 && failed > 0.0).then_some(())
    })
    .await;
    server.shutdown().await;
}

/// The sum of the series of `name` in `/metrics` whose labels include
/// every one of `labels`.
async fn metric(base: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_fails_is_retried_until_it_takes_the_events() {
    let hook = Receiver::failing_first(3).await;
    let (server, base) = memory_server(|c| {
        c.webhooks = vec![hook.url.clone()];
        c.webhook_secret = Some(hexmatch_server::config::Secret::new(SECRET));
    })
    .await;
    put_driver_d1(&base).await;
    toggle_status(&base, "d1", 6).await;
    // Refused three times (100, 200, 400 ms apart), then taken: every
    // event once, in order.
    let got = poll_async("the events, after the retries", || {
        let got = hook.events();
        async move { (got.len() >= 6).then_some(got) }
    })
    .await;
    let ids: Vec<u64> = got.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
    let failed = metric(&base, "hexmatch_webhook_failures_total", &["hook=\"1\""])
        .await
        .expect("metrics");
    assert!(failed >= 3.0, "{failed} failed POSTs counted");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_stream_events_are_dropped_counted_and_updates_go_on() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("events-down");
    let server = hexmatch_server::start(common::redis_config(&redis.url, &prefix))
        .await
        .expect("starts");
    wait_ready(&server).await;
    let base = format!("http://{}", server.addr());
    put_driver_d1(&base).await;
    // Up: the stream takes them.
    toggle_status(&base, "d1", 10).await;
    let key = format!("{prefix}:events");
    poll_async("ten events on the stream", || {
        let (url, key) = (redis.url.clone(), key.clone());
        async move { (stream_events(&url, &key)?.len() == 10).then_some(()) }
    })
    .await;
    // Down: more events than the stream's queue holds; every update is
    // still applied, and the feed still has them.
    redis.stop();
    let mut sse = Sse::open(&base, "", &[]).await;
    toggle_status(&base, "d1", 20_000).await;
    let tail = sse
        .until("the last event on the feed", |g| {
            g.last().and_then(|m| m.id.as_deref()) == Some("20010")
        })
        .await;
    assert!(tail.iter().all(|m| m.event == "driver.status"));
    poll_async("stream drops counted", || async {
        let dropped = metric(
            &base,
            "hexmatch_events_dropped_total",
            &["sink=\"redis\"", "reason=\"queue_full\""],
        )
        .await?;
        (dropped > 0.0).then_some(())
    })
    .await;
    server.shutdown().await;
}

/// The connection timeouts are for requests: a feed open far longer than
/// the header-read and idle timeouts, with nothing to say meanwhile, still
/// delivers the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_feed_outlives_the_connection_timeouts() {
    let (server, base) = memory_server(|c| {
        c.header_read_timeout_ms = 200;
        c.idle_timeout_ms = 200;
    })
    .await;
    put_driver_d1(&base).await;
    let mut sse = Sse::open(&base, "", &[]).await;
    // Five times both timeouts, without an event.
    tokio::time::sleep(Duration::from_secs(1)).await;
    toggle_status(&base, "d1", 1).await;
    let got = sse
        .until("the event after the quiet", |g| !g.is_empty())
        .await;
    assert_eq!(got[0].event, "driver.status");
    server.shutdown().await;
}
