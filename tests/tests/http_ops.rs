//! HTTP API, operations and cross-cutting behaviour: `/livez`, `/readyz`,
//! `/v1/regions`, `/v1/cluster`, `/openapi.json`, `/docs`;
//! unknown routes and methods; bearer-token auth; per-client rate limits;
//! the body limit; load shedding; `load_drivers` at start-up; graceful
//! shutdown. Every rejection is checked to change no state.

#![allow(
    clippy::float_cmp, // positions must round-trip exactly through JSON
    clippy::too_many_lines
)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use hexmatch::{DriverId, Position, Vehicle};
use hexmatch_tests::http::{
    DEADLINE, ServeConfig, TestServer, poll_until, str_of, t_str, test_config,
};
use reqwest::Method;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn manual() -> TestServer {
    TestServer::start_manual(test_config()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_and_readyz() {
    let srv = manual().await;
    let r = srv.get("/livez").await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    let v = srv.get("/readyz").await.expect(200);
    assert_eq!(v["status"], json!("ready"), "{v}");
    assert_eq!(v["redis"], json!("disabled"), "{v}");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_and_cluster_describe_this_node() {
    let srv = manual().await;
    let v = srv.get("/v1/regions").await.expect(200);
    let regions = v.as_array().unwrap_or_else(|| panic!("not an array: {v}"));
    assert_eq!(regions.len(), 1, "{v}");
    assert_eq!(regions[0]["region"], json!("default"));
    assert_eq!(regions[0]["owner"], json!("node-1"));
    assert_eq!(regions[0]["drivers"], json!(0));
    assert!(regions[0]["cells"].is_u64(), "{v}");

    // Drivers in three distinct H3 cells (all available, so "drivers" is
    // the same whether it counts all drivers or the available ones).
    let spots = [
        (41.88, -87.63),
        (41.88, -87.6301),
        (41.97, -87.90),
        (40.71, -74.0),
    ];
    for (i, (lat, lon)) in spots.iter().enumerate() {
        srv.put_driver(&format!("r{i}"), &json!({"lat": lat, "lon": lon}))
            .await;
    }
    let cells: BTreeSet<_> = spots
        .iter()
        .map(|(lat, lon)| srv.engine().cell_of(Position::new(*lat, *lon).unwrap()))
        .collect();
    let v = srv.get("/v1/regions").await.expect(200);
    let r = &v[0];
    assert_eq!(r["drivers"], json!(4), "{v}");
    let n = r["cells"].as_u64().unwrap();
    assert!(
        n >= cells.len() as u64,
        "{n} cells for {} occupied: {v}",
        cells.len()
    );

    let c = srv.get("/v1/cluster").await.expect(200);
    assert_eq!(
        c,
        json!({"node_id": "node-1", "map_version": 1,
               "regions": [{"region": "default", "owner": "node-1", "epoch": 1}]})
    );
    srv.shutdown().await;

    // A configured node id is reported.
    let srv = TestServer::start_manual(ServeConfig {
        node_id: "node-7".into(),
        ..test_config()
    })
    .await;
    let v = srv.get("/v1/regions").await.expect(200);
    assert_eq!(v[0]["owner"], json!("node-7"));
    let c = srv.get("/v1/cluster").await.expect(200);
    assert_eq!(c["node_id"], json!("node-7"));
    assert_eq!(c["regions"][0]["owner"], json!("node-7"));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_are_json_errors() {
    let srv = manual().await;
    for path in ["/nope", "/v1/nope", "/v1/drivers/d1/nope", "/v2/regions"] {
        srv.get(path).await.expect_error(404, "not_found");
    }
    for (method, path) in [
        (Method::DELETE, "/v1/regions"),
        (Method::POST, "/v1/cluster"),
        (Method::PATCH, "/v1/drivers/d1"),
        (Method::POST, "/v1/drivers/d1"),
        (Method::GET, "/v1/matches"),
        (Method::GET, "/v1/matches/o1/confirm"),
        (Method::PUT, "/v1/locations"),
        (Method::POST, "/livez"),
    ] {
        let r = srv.send(srv.request(method.clone(), path)).await;
        assert_eq!(r.status.as_u16(), 405, "{method} {path}: {}", r.body);
        r.expect_error(405, "method_not_allowed");
    }
    assert!(srv.engine().is_empty());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_guards_v1_but_not_ops() {
    let srv = TestServer::start_manual(ServeConfig {
        api_tokens: vec!["tok-a".into(), "tok-b".into()],
        ..test_config()
    })
    .await;
    let anon = srv.api_with_token(None);
    let a = srv.api_with_token(Some("tok-a"));
    let b = srv.api_with_token(Some("tok-b"));
    let wrong = srv.api_with_token(Some("tok-c"));

    let body = json!({"lat": 41.88, "lon": -87.63});
    // Without a valid token nothing is read or written.
    for api in [&anon, &wrong] {
        api.put_json("/v1/drivers/d1", &body)
            .await
            .expect_error(401, "unauthorized");
        api.get("/v1/regions")
            .await
            .expect_error(401, "unauthorized");
        api.get("/v1/drivers/nearest?lat=1&lon=1")
            .await
            .expect_error(401, "unauthorized");
        api.claim(&json!({"order_id": "o1", "pickup": body}))
            .await
            .expect_error(401, "unauthorized");
        api.get("/v1/matches/o1")
            .await
            .expect_error(401, "unauthorized");
    }
    // Other schemes and malformed headers.
    for header in [
        "Basic dG9rLWE6",
        "tok-a",
        "Bearer",
        "Bearer  tok-a x",
        "bearer-tok-a",
    ] {
        let r = anon
            .send(
                anon.request(Method::GET, "/v1/regions")
                    .header(AUTHORIZATION, header),
            )
            .await;
        r.expect_error(401, "unauthorized");
    }
    assert!(
        srv.engine().is_empty(),
        "an unauthorised PUT created a driver"
    );
    a.get("/v1/drivers/d1")
        .await
        .expect_error(404, "unknown_driver");

    // Either token works.
    a.put_driver("d1", &body).await;
    assert_eq!(str_of(&b.driver("d1").await, "driver_id"), "d1");
    // An unauthorised DELETE does not delete.
    anon.delete("/v1/drivers/d1")
        .await
        .expect_error(401, "unauthorized");
    b.driver("d1").await;

    // Ops endpoints stay open.
    for path in ["/livez", "/readyz", "/metrics", "/openapi.json"] {
        let r = anon.get(path).await;
        assert_eq!(r.status.as_u16(), 200, "{path}: {}", r.body);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_per_client_and_spares_ops() {
    let srv = TestServer::start_manual(ServeConfig {
        api_tokens: vec!["tok-a".into(), "tok-b".into()],
        rate_limit_per_s: 1,
        rate_limit_burst: 2,
        ..test_config()
    })
    .await;
    let a = srv.api_with_token(Some("tok-a"));
    let b = srv.api_with_token(Some("tok-b"));
    // The burst allows two requests at once.
    a.get("/v1/regions").await.expect(200);
    a.get("/v1/regions").await.expect(200);
    // Then, at 1 per second, one of the next requests is refused (all of
    // them unless the machine is very slow).
    let mut limited = None;
    for _ in 0..20 {
        let r = a.get("/v1/regions").await;
        if r.status.as_u16() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    }
    let r = limited.expect("no 429 after 22 requests at 1/s with burst 2");
    r.expect_error(429, "rate_limited");
    let retry = r
        .headers
        .get(RETRY_AFTER)
        .expect("429 without Retry-After")
        .to_str()
        .unwrap();
    let secs: u64 = retry
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {retry:?} is not whole seconds"));
    assert!((1..=60).contains(&secs), "Retry-After {secs}");

    // A refused write changes nothing (drain the bucket again first).
    let refused = poll_until("a refused PUT", async || {
        let r = a
            .put_json("/v1/drivers/late", &json!({"lat": 41.88, "lon": -87.63}))
            .await;
        match r.status.as_u16() {
            429 => Some(r),
            200 => {
                // Let through: undo it so the check below stays meaningful.
                assert_eq!(b.delete("/v1/drivers/late").await.status.as_u16(), 204);
                None
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    })
    .await;
    refused.expect_error(429, "rate_limited");
    assert!(
        srv.engine()
            .driver(&DriverId::new("late").unwrap())
            .is_none()
    );

    // Another client has its own bucket.
    b.get("/v1/regions").await.expect(200);
    // Ops endpoints are not limited.
    for _ in 0..10 {
        let r = a.get("/livez").await;
        assert_eq!(r.status.as_u16(), 200, "{}", r.body);
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_by_peer_without_tokens() {
    let srv = TestServer::start_manual(ServeConfig {
        rate_limit_per_s: 1,
        rate_limit_burst: 2,
        ..test_config()
    })
    .await;
    let r = poll_until("a 429 for an anonymous client", async || {
        let r = srv.get("/v1/cluster").await;
        match r.status.as_u16() {
            429 => Some(r),
            200 => None,
            other => panic!("unexpected {other}: {}", r.body),
        }
    })
    .await;
    r.expect_error(429, "rate_limited");
    assert!(
        r.headers.contains_key(RETRY_AFTER),
        "429 without Retry-After"
    );
    srv.shutdown().await;
}

/// Without tokens a client is its address: a made-up bearer token per
/// request never gets a bucket of its own (it used to, and 20 of 20
/// requests went through at 1/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_tokens_share_their_address_s_bucket() {
    let srv = TestServer::start_manual(ServeConfig {
        rate_limit_per_s: 1,
        rate_limit_burst: 2,
        ..test_config()
    })
    .await;
    let started = std::time::Instant::now();
    let mut passed = 0_u64;
    for i in 0..20 {
        let r = srv
            .api_with_token(Some(&format!("made-up-{i}")))
            .get("/v1/cluster")
            .await;
        match r.status.as_u16() {
            200 => passed += 1,
            429 => r.expect_error(429, "rate_limited"),
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    // The bucket holds 2 and refills 1 a second.
    let allowed = 2 + started.elapsed().as_secs() + 1;
    assert!(
        passed <= allowed,
        "{passed} of 20 passed; at most {allowed} may"
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_is_enforced_on_every_json_route() {
    let srv = TestServer::start_manual(ServeConfig {
        body_limit_bytes: 1024,
        ..test_config()
    })
    .await;
    srv.put_driver("d1", &json!({"lat": 41.88, "lon": -87.63, "ts": t_str(0)}))
        .await;
    // Valid JSON, padded with whitespace past the limit.
    let pad = |v: Value| format!("{v}{}", " ".repeat(2000));
    let cases = [
        (
            Method::PUT,
            "/v1/drivers/big",
            pad(json!({"lat": 41.88, "lon": -87.63})),
        ),
        (
            Method::POST,
            "/v1/drivers/d1/location",
            pad(json!({"lat": 41.9, "lon": -87.6, "ts": t_str(9)})),
        ),
        (
            Method::POST,
            "/v1/locations",
            pad(json!([{"driver_id": "big", "lat": 41.88, "lon": -87.63}])),
        ),
        (
            Method::POST,
            "/v1/matches",
            pad(json!({"order_id": "o1", "pickup": {"lat": 41.88, "lon": -87.63}})),
        ),
        (
            Method::POST,
            "/v1/matches/batch",
            pad(json!({"orders": [{"order_id": "o1", "pickup": {"lat": 41.88, "lon": -87.63}}]})),
        ),
    ];
    let before = srv.snapshot(&["o1"]);
    for (method, path, body) in cases {
        let r = srv
            .raw(method.clone(), path, Some("application/json"), body)
            .await;
        assert_eq!(r.status.as_u16(), 413, "{method} {path}: {}", r.body);
        r.expect_error(413, "payload_too_large");
        assert_eq!(srv.snapshot(&["o1"]), before, "{method} {path}");
    }
    // Just under the limit is fine.
    let body = json!({"lat": 41.88, "lon": -87.63});
    let under = format!("{body}{}", " ".repeat(1000 - body.to_string().len()));
    srv.raw(
        Method::PUT,
        "/v1/drivers/big",
        Some("application/json"),
        under,
    )
    .await
    .expect(200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_shed_beyond_max_in_flight() {
    let srv = TestServer::start_manual(ServeConfig {
        max_in_flight: 1,
        request_timeout_ms: 600_000,
        ..test_config()
    })
    .await;
    // One request stays in flight: headers sent, body incomplete.
    let head = format!(
        "POST /v1/locations HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n[{{\"driver_id\": \"slow\", ",
        srv.addr()
    );
    let addr = srv.addr();
    let start_slow = async || {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.flush().await.unwrap();
        conn
    };
    let mut slow = start_slow().await;

    // Once the server has taken it up, a second request to the same route
    // is refused at once...
    let r = poll_until("503 while a request is in flight", async || {
        // On a busy machine a probe can reach the limit before the slow
        // request does, and the slow one is shed instead: any answer on its
        // connection means it is not in flight, so it is sent again.
        let mut byte = [0u8; 1];
        match slow.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            _ => {
                slow = start_slow().await;
                return None;
            }
        }
        let r = srv
            .raw(
                Method::POST,
                "/v1/locations",
                Some("application/json"),
                "[]",
            )
            .await;
        match r.status.as_u16() {
            503 => Some(r),
            200 => None,
            other => panic!("unexpected {other}: {}", r.body),
        }
    })
    .await;
    r.expect_error(503, "overloaded");
    // ...and so is one to any other /v1 route: the limit is on requests in
    // flight in the server, not per route.
    let r = srv.get("/v1/regions").await;
    assert_eq!(
        r.status.as_u16(),
        503,
        "GET /v1/regions served while max_in_flight=1 requests are in flight \
         (the limit is per route, not global?): {}",
        r.body
    );
    r.expect_error(503, "overloaded");
    // A shed write changes nothing.
    let r = srv
        .put_json("/v1/drivers/shed", &json!({"lat": 41.88, "lon": -87.63}))
        .await;
    r.expect_error(503, "overloaded");
    assert!(srv.engine().is_empty());

    // Once the slow request is gone, requests are served again.
    drop(slow);
    poll_until("service after the slow request ended", async || {
        let a = srv.get("/v1/regions").await.status.as_u16();
        let b = srv
            .raw(
                Method::POST,
                "/v1/locations",
                Some("application/json"),
                "[]",
            )
            .await
            .status
            .as_u16();
        (a == 200 && b == 200).then_some(())
    })
    .await;
    srv.put_driver("shed", &json!({"lat": 41.88, "lon": -87.63}))
        .await;
    assert!(
        srv.engine()
            .driver(&DriverId::new("slow").unwrap())
            .is_none(),
        "the aborted batch applied"
    );
    srv.shutdown().await;
}

/// Reads one HTTP/1.1 response (head and `Content-Length` body) from a raw
/// connection: (status, body).
async fn read_response(conn: &mut tokio::net::TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.expect("reading the response");
            assert!(n > 0, "connection closed before a full response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().expect("a numeric Content-Length"));
                if buf.len() >= end + 4 + len {
                    let status = head[9..12].parse().expect("a status line");
                    return (status, text[end + 4..end + 4 + len].to_owned());
                }
            }
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .expect("no response before the deadline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_time_out_and_change_nothing() {
    let srv = TestServer::start_manual(ServeConfig {
        request_timeout_ms: 200,
        ..test_config()
    })
    .await;
    let mut slow = tokio::net::TcpStream::connect(srv.addr()).await.unwrap();
    let head = format!(
        "POST /v1/locations HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n[{{\"driver_id\": \"slow\", \"lat\": 41.88, ",
        srv.addr()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // The server answers by itself once the timeout passes.
    let (status, body) = read_response(&mut slow).await;
    assert!(
        [408, 503, 504].contains(&status),
        "a timed-out request got {status}: {body}"
    );
    let v: Value = serde_json::from_str(&body).expect("the timeout error is JSON");
    assert!(v["error"]["code"].is_string(), "{v}");
    assert!(srv.engine().is_empty(), "the timed-out batch applied");
    // Other requests are unaffected.
    srv.put_driver("fast", &json!({"lat": 41.88, "lon": -87.63}))
        .await;
    srv.shutdown().await;
}

/// Every route of API.md (plus the `complete` extension), with its methods.
const ROUTES: &[(&str, &[&str])] = &[
    ("/v1/drivers/{driver_id}", &["put", "get", "delete"]),
    ("/v1/drivers/{driver_id}/location", &["post"]),
    ("/v1/locations", &["post"]),
    ("/v1/locations/stream", &["get"]),
    ("/v1/drivers/nearest", &["get"]),
    ("/v1/matches", &["post"]),
    ("/v1/matches/batch", &["post"]),
    ("/v1/matches/{order_id}", &["get"]),
    ("/v1/matches/{order_id}/confirm", &["post"]),
    ("/v1/matches/{order_id}/release", &["post"]),
    ("/v1/matches/{order_id}/complete", &["post"]),
    ("/v1/regions", &["get"]),
    ("/v1/cluster", &["get"]),
    ("/livez", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
];

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_every_route() {
    let srv = manual().await;
    let doc = srv.get("/openapi.json").await.expect(200);
    let version = str_of(&doc, "openapi");
    assert!(version.starts_with("3."), "openapi {version}");
    assert!(doc["info"]["title"].is_string(), "no info.title");
    let paths = doc["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("no paths object"));
    for (path, methods) in ROUTES {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} missing from openapi paths {:?}", paths.keys()));
        for m in *methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing from openapi");
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_describes_only_implemented_routes() {
    let srv = manual().await;
    let doc = srv.get("/openapi.json").await.expect(200);
    let paths = doc["paths"].as_object().unwrap().clone();
    for (template, item) in &paths {
        // Fill path parameters with a valid but unknown id.
        let mut path = String::new();
        let mut rest = template.as_str();
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').unwrap() + open;
            path.push_str(&rest[..open]);
            path.push_str("zz-unknown");
            rest = &rest[close + 1..];
        }
        path.push_str(rest);
        for m in HTTP_METHODS.iter().filter(|m| item.get(**m).is_some()) {
            let method: Method = m.to_uppercase().parse().unwrap();
            // An event stream never ends: a bad filter answers at once,
            // and still shows the route is there.
            let streams = item[*m]["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some();
            let path = if streams {
                format!("{path}?types=no-such-type")
            } else {
                path.clone()
            };
            let r = srv.raw(method, &path, Some("application/json"), "{}").await;
            let code = r
                .json_opt()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
            assert!(
                !(r.status.as_u16() == 404 && code.as_deref() == Some("not_found"))
                    && r.status.as_u16() != 405,
                "openapi documents {m} {template}, but the server has no such route: {} {}",
                r.status,
                r.body
            );
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_are_served_offline() {
    let srv = manual().await;
    let mut page = None;
    for path in ["/docs", "/docs/"] {
        let r = srv.get(path).await;
        if r.status.as_u16() == 200 {
            page = Some((path, r));
            break;
        }
    }
    let (path, r) = page.expect("neither /docs nor /docs/ returns 200");
    assert!(
        r.content_type().starts_with("text/html"),
        "{path}: content type {:?}",
        r.content_type()
    );
    let html = r.body.as_str();
    let lower = html.to_lowercase();
    assert!(
        lower.contains("<html") && lower.contains("swagger"),
        "{html}"
    );
    // Offline: every script and stylesheet comes from this server.
    let base = if path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    for attr in ["src=\"", "href=\""] {
        for piece in html.split(attr).skip(1) {
            let url = &piece[..piece.find('"').unwrap()];
            assert!(
                !url.starts_with("http://")
                    && !url.starts_with("https://")
                    && !url.starts_with("//"),
                "/docs loads {url} from another host"
            );
            let is_asset = [".js", ".css"].iter().any(|e| url.ends_with(e));
            if is_asset {
                let asset = if url.starts_with('/') {
                    url.to_owned()
                } else {
                    format!("{base}{}", url.trim_start_matches("./"))
                };
                let r = srv.get(&asset).await;
                assert_eq!(r.status.as_u16(), 200, "{asset}: {}", r.status);
            }
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_are_loaded_at_start_up() {
    let dir = std::env::temp_dir().join(format!("hexmatch-http-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("drivers.csv");
    let pickups = hexmatch_tests::load_chicago_pickups();
    let mut csv = String::from("driver_id,lat,lon,vehicle,status\n");
    for (i, (id, p)) in pickups.iter().take(300).enumerate() {
        let vehicle = Vehicle::ALL[i % Vehicle::ALL.len()];
        let status = if i % 10 == 0 { "offline" } else { "available" };
        writeln!(csv, "{id},{},{},{vehicle},{status}", p.lat(), p.lon()).unwrap();
    }
    std::fs::write(&good, csv).unwrap();
    let srv = TestServer::start_manual(ServeConfig {
        load_drivers: Some(good.clone()),
        ..test_config()
    })
    .await;
    assert_eq!(srv.engine().len(), 300);
    let (id0, p0) = &pickups[0];
    let d = srv.driver(id0).await;
    assert_eq!(str_of(&d, "status"), "offline");
    assert_eq!(str_of(&d, "vehicle"), "car");
    assert_eq!(
        Position::new(d["lat"].as_f64().unwrap(), d["lon"].as_f64().unwrap()).unwrap(),
        *p0
    );
    let d = srv.driver(&pickups[3].0).await;
    assert_eq!(str_of(&d, "vehicle"), Vehicle::ALL[3].as_str());
    assert_eq!(str_of(&d, "status"), "available");
    let v = srv.get("/v1/regions").await.expect(200);
    assert_eq!(v[0]["drivers"], json!(300));
    srv.shutdown().await;

    // The short form (driver_id,lat,lon) loads available cars.
    let short = dir.join("short.csv");
    std::fs::write(
        &short,
        "driver_id,lat,lon\ns1,41.88,-87.63\ns2,41.89,-87.64\n",
    )
    .unwrap();
    let srv = TestServer::start_manual(ServeConfig {
        load_drivers: Some(short.clone()),
        ..test_config()
    })
    .await;
    let d = srv.driver("s2").await;
    assert_eq!(
        (str_of(&d, "status"), str_of(&d, "vehicle")),
        ("available", "car")
    );
    srv.shutdown().await;

    // A bad file fails start-up instead of starting half-loaded.
    for (name, text) in [
        (
            "badlat.csv",
            "driver_id,lat,lon\nb1,41.88,-87.63\nb2,123.0,-87.63\n",
        ),
        ("badid.csv", "driver_id,lat,lon\nb 1,41.88,-87.63\n"),
        (
            "badvehicle.csv",
            "driver_id,lat,lon,vehicle\nb1,41.88,-87.63,boat\n",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let started = hexmatch_server::start(ServeConfig {
            load_drivers: Some(path),
            ..test_config()
        })
        .await;
        assert!(started.is_err(), "{name} was accepted");
    }
    let missing = hexmatch_server::start(ServeConfig {
        load_drivers: Some(dir.join("does-not-exist.csv")),
        ..test_config()
    })
    .await;
    assert!(missing.is_err(), "a missing file was accepted");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_listening() {
    let srv = manual().await;
    let addr = srv.addr();
    assert_eq!(srv.get("/livez").await.status.as_u16(), 200);
    srv.shutdown().await;
    // A fresh client (no pooled connection) cannot connect any more.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = client.get(format!("http://{addr}/livez")).send().await;
    assert!(r.is_err(), "still serving after shutdown: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json() {
    // A sample across layers (router, extractors, handlers, middleware):
    // the body is the error object and the content type is JSON.
    let srv = TestServer::start_manual(ServeConfig {
        body_limit_bytes: 64,
        ..test_config()
    })
    .await;
    let samples = [
        srv.get("/missing").await,
        // A plain GET of the WebSocket route (no upgrade).
        srv.get("/v1/locations/stream").await,
        srv.send(srv.request(Method::DELETE, "/livez")).await,
        srv.get("/v1/drivers/nearest").await,
        srv.raw(Method::PUT, "/v1/drivers/x", Some("text/plain"), "{}")
            .await,
        srv.raw(
            Method::PUT,
            "/v1/drivers/x",
            Some("application/json"),
            " ".repeat(100),
        )
        .await,
    ];
    for r in samples {
        assert!(r.status.is_client_error(), "{}: {}", r.status, r.body);
        let ct = r
            .headers
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(
            ct.as_deref()
                .is_some_and(|c| c.starts_with("application/json")),
            "{}: content type {ct:?}",
            r.status
        );
        let v = r.json();
        assert!(
            v["error"]["code"].is_string() && v["error"]["message"].is_string(),
            "{v}"
        );
    }
    srv.shutdown().await;
}
