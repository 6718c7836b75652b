//! HTTP API, drivers and locations: `PUT /v1/drivers/{id}`,
//! `GET /v1/drivers/{id}`, `DELETE /v1/drivers/{id}`,
//! `POST /v1/drivers/{id}/location`, `POST /v1/locations` (JSON and
//! NDJSON), driver TTL expiry, and every documented error of those routes.
//! After every rejected request the whole engine state is compared with
//! the state before it: a bad request never changes anything.

#![allow(
    clippy::float_cmp, // positions must round-trip exactly through JSON
    clippy::too_many_lines
)]

use hexmatch::Position;
use hexmatch_tests::http::{
    ServeConfig, TestServer, caps_of, check_driver_shape, f64_of, names, opt, poll_until, str_of,
    t, t_str, test_config, ts_of,
};
use reqwest::Method;
use serde_json::{Value, json};

const LOOP: (f64, f64) = (41.8786, -87.6251);

async fn manual() -> TestServer {
    TestServer::start_manual(test_config()).await
}

/// Sends a request that must fail with `status`/`code` (one of `codes`)
/// and change nothing.
async fn rejected(
    srv: &TestServer,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: &str,
    status: u16,
    codes: &[&str],
) {
    let before = srv.snapshot(&[]);
    let r = srv
        .raw(method.clone(), path, content_type, body.to_owned())
        .await;
    let what = format!("{method} {path} {body}");
    assert_eq!(r.status.as_u16(), status, "{what}: {}", r.body);
    r.expect_error_in(status, codes);
    assert_eq!(srv.snapshot(&[]), before, "{what} changed state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_creates_a_driver_and_get_returns_it() {
    let srv = manual().await;
    let r = srv
        .put_json(
            "/v1/drivers/d1",
            &json!({
                "lat": LOOP.0, "lon": LOOP.1, "ts": "2026-11-25T10:00:00.250Z",
                "status": "available", "vehicle": "van", "capabilities": ["large_items", "cash"],
            }),
        )
        .await;
    let v = r.expect(200);
    assert_eq!(v["applied"], json!(true), "{v}");
    assert!(opt(&v, "reason").is_none(), "{v}");
    let d = &v["driver"];
    check_driver_shape(d);
    assert_eq!(str_of(d, "driver_id"), "d1");
    assert_eq!(f64_of(d, "lat"), LOOP.0);
    assert_eq!(f64_of(d, "lon"), LOOP.1);
    assert_eq!(str_of(d, "ts"), "2026-11-25T10:00:00.250Z");
    assert_eq!(str_of(d, "status"), "available");
    assert_eq!(str_of(d, "vehicle"), "van");
    assert_eq!(caps_of(d), names(&["cash", "large_items"]));
    assert!(opt(d, "order_id").is_none() && opt(d, "reserved_until").is_none());

    // GET returns exactly the record PUT reported.
    assert_eq!(&srv.driver("d1").await, d);

    // Minimal body: defaults (available, car, no capabilities), ts = now.
    let d2 = srv
        .put_driver("d2", &json!({"lat": 41.9, "lon": -87.6}))
        .await;
    check_driver_shape(&d2);
    assert_eq!(str_of(&d2, "status"), "available");
    assert_eq!(str_of(&d2, "vehicle"), "car");
    assert!(caps_of(&d2).is_empty());
    assert_eq!(ts_of(&d2, "ts"), t(0), "missing ts means the server's now");

    // ts as integer Unix milliseconds; printed back as RFC 3339.
    let d3 = srv
        .put_driver(
            "d3",
            &json!({"lat": 41.9, "lon": -87.7, "ts": t(1234).as_millis()}),
        )
        .await;
    assert_eq!(str_of(&d3, "ts"), t_str(1234));
    // RFC 3339 with an offset is accepted too.
    let d4 = srv
        .put_driver(
            "d4",
            &json!({"lat": 41.9, "lon": -87.7, "ts": "2026-11-25T11:00:01.500+01:00"}),
        )
        .await;
    assert_eq!(str_of(&d4, "ts"), t_str(1500));

    // The longest valid id, with every allowed punctuation character.
    let long_id = format!("A-b_c.d:{}", "9".repeat(56));
    assert_eq!(long_id.len(), 64);
    let d5 = srv
        .put_driver(&long_id, &json!({"lat": 0.0, "lon": 180.0}))
        .await;
    assert_eq!(str_of(&d5, "driver_id"), long_id);
    assert_eq!(srv.driver(&long_id).await, d5);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_status_controls_who_is_offered() {
    let srv = manual().await;
    let q = format!("lat={}&lon={}&k=5", LOOP.0, LOOP.1);
    srv.put_driver(
        "d1",
        &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t(0).as_millis()}),
    )
    .await;
    assert_eq!(srv.nearest_ids(&q).await, ["d1"]);
    for (i, status) in ["busy", "offline", "available"].into_iter().enumerate() {
        let d = srv
            .put_driver(
                "d1",
                &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t(10 + i as i64).as_millis(),
                        "status": status}),
            )
            .await;
        assert_eq!(str_of(&d, "status"), status);
        assert_eq!(str_of(&srv.driver("d1").await, "status"), status);
        let offered = srv.nearest_ids(&q).await;
        assert_eq!(
            offered.is_empty(),
            status != "available",
            "{status}: {offered:?}"
        );
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_with_an_older_ts_is_stale_and_ignored() {
    let srv = manual().await;
    let current = srv
        .put_driver(
            "d1",
            &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(1000), "vehicle": "car"}),
        )
        .await;
    let before = srv.snapshot(&[]);
    let r = srv
        .put_json(
            "/v1/drivers/d1",
            &json!({"lat": 42.0, "lon": -87.0, "ts": t_str(500), "vehicle": "bike",
                    "status": "offline"}),
        )
        .await;
    let v = r.expect(200);
    assert_eq!(v["applied"], json!(false), "{v}");
    assert_eq!(v["reason"], json!("stale"), "{v}");
    assert_eq!(
        v["driver"], current,
        "a stale PUT reports the current driver"
    );
    assert_eq!(srv.snapshot(&[]), before, "a stale PUT changed state");
    assert_eq!(srv.driver("d1").await, current);

    // An equal ts applies.
    let d = srv
        .put_driver("d1", &json!({"lat": 42.0, "lon": -87.0, "ts": t_str(1000)}))
        .await;
    assert_eq!((f64_of(&d, "lat"), f64_of(&d, "lon")), (42.0, -87.0));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_rejects_bad_input_without_changing_state() {
    let srv = manual().await;
    srv.put_driver(
        "d1",
        &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(0), "vehicle": "van",
                "capabilities": ["cash"]}),
    )
    .await;
    let ok = |extra: Value| {
        let mut b = json!({"lat": 41.9, "lon": -87.7, "ts": t_str(5000)});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    let json_ct = Some("application/json");
    // (body, status, acceptable codes); each is tried on an existing and a new driver.
    let cases: Vec<(String, u16, Vec<&str>)> = vec![
        (r#"{"lat": 41.9, "lon":"#.into(), 400, vec!["invalid_json"]),
        ("not json at all".into(), 400, vec!["invalid_json"]),
        (ok(json!({"lat": 91.0})), 400, vec!["invalid_position"]),
        (ok(json!({"lat": -90.5})), 400, vec!["invalid_position"]),
        (ok(json!({"lon": 180.5})), 400, vec!["invalid_position"]),
        (ok(json!({"lon": -181})), 400, vec!["invalid_position"]),
        (
            ok(json!({"ts": "yesterday"})),
            400,
            vec!["invalid_timestamp"],
        ),
        (
            ok(json!({"ts": "2026-13-01T00:00:00Z"})),
            400,
            vec!["invalid_timestamp"],
        ),
        (ok(json!({"ts": -1})), 400, vec!["invalid_timestamp"]),
        (
            ok(json!({"status": "reserved"})),
            400,
            vec!["invalid_parameter"],
        ),
        (
            ok(json!({"status": "flying"})),
            400,
            vec!["invalid_parameter"],
        ),
        (
            ok(json!({"vehicle": "boat"})),
            400,
            vec!["invalid_parameter"],
        ),
        (
            ok(json!({"capabilities": ["teleport"]})),
            400,
            vec!["invalid_parameter"],
        ),
        (
            ok(json!({"capabilities": ["cash", "teleport"]})),
            400,
            vec!["invalid_parameter"],
        ),
        // Wrong shapes: 400 (never 422); the code is not pinned by the contract.
        (
            r#"{"lon": -87.7}"#.into(),
            400,
            vec!["invalid_json", "invalid_parameter", "invalid_position"],
        ),
        (
            r#"{"lat": "north", "lon": -87.7}"#.into(),
            400,
            vec!["invalid_json", "invalid_parameter", "invalid_position"],
        ),
        (
            "[1, 2]".into(),
            400,
            vec!["invalid_json", "invalid_parameter"],
        ),
    ];
    for id in ["d1", "fresh"] {
        let path = format!("/v1/drivers/{id}");
        for (body, status, codes) in &cases {
            rejected(&srv, Method::PUT, &path, json_ct, body, *status, codes).await;
        }
        // Wrong or missing content type.
        let body = ok(json!({}));
        for ct in [Some("text/plain"), None] {
            rejected(
                &srv,
                Method::PUT,
                &path,
                ct,
                &body,
                415,
                &["unsupported_media_type"],
            )
            .await;
        }
    }
    // Invalid ids in the path.
    let body = ok(json!({}));
    for bad in [
        "a%20b",
        &"x".repeat(65),
        "caf%C3%A9",
        "a%2Fb",
        "semi%3Bcolon",
    ] {
        let path = format!("/v1/drivers/{bad}");
        rejected(
            &srv,
            Method::PUT,
            &path,
            json_ct,
            &body,
            400,
            &["invalid_id"],
        )
        .await;
    }
    srv.get("/v1/drivers/fresh")
        .await
        .expect_error(404, "unknown_driver");
    assert_eq!(srv.engine().len(), 1);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_unknown_or_invalid_driver() {
    let srv = manual().await;
    srv.get("/v1/drivers/nobody")
        .await
        .expect_error(404, "unknown_driver");
    srv.get("/v1/drivers/a%20b")
        .await
        .expect_error(400, "invalid_id");
    srv.get(&format!("/v1/drivers/{}", "x".repeat(65)))
        .await
        .expect_error(400, "invalid_id");
    assert!(srv.engine().is_empty());
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_update_moves_a_known_driver() {
    let srv = manual().await;
    srv.put_driver(
        "d1",
        &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(0), "vehicle": "bike",
                "capabilities": ["card"]}),
    )
    .await;
    let r = srv
        .post_json(
            "/v1/drivers/d1/location",
            &json!({"lat": 41.95, "lon": -87.65, "ts": t_str(1000)}),
        )
        .await;
    let v = r.expect(200);
    assert_eq!(v["applied"], json!(true), "{v}");
    assert!(opt(&v, "reason").is_none(), "{v}");
    let d = srv.driver("d1").await;
    assert_eq!((f64_of(&d, "lat"), f64_of(&d, "lon")), (41.95, -87.65));
    assert_eq!(str_of(&d, "ts"), t_str(1000));
    assert_eq!(
        str_of(&d, "vehicle"),
        "bike",
        "a location update keeps attributes"
    );
    assert_eq!(caps_of(&d), names(&["card"]));
    // The index follows: the nearest driver to the new spot is d1 at 0 m.
    let near = srv.nearest("lat=41.95&lon=-87.65&k=1").await;
    assert_eq!(str_of(&near[0], "driver_id"), "d1");
    assert!(f64_of(&near[0], "distance_m").abs() < 1e-6);

    // Older ts: stale, not an error, nothing changes.
    let before = srv.snapshot(&[]);
    let v = srv
        .post_json(
            "/v1/drivers/d1/location",
            &json!({"lat": 40.0, "lon": -80.0, "ts": t(999).as_millis()}),
        )
        .await
        .expect(200);
    assert_eq!(v, json!({"applied": false, "reason": "stale"}));
    assert_eq!(srv.snapshot(&[]), before);

    // Equal ts applies; missing ts is the server's now.
    let v = srv
        .post_json(
            "/v1/drivers/d1/location",
            &json!({"lat": 41.96, "lon": -87.66, "ts": t_str(1000)}),
        )
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(true));
    srv.clock().advance(5000);
    let v = srv
        .post_json(
            "/v1/drivers/d1/location",
            &json!({"lat": 41.97, "lon": -87.67}),
        )
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(true));
    let d = srv.driver("d1").await;
    assert_eq!(str_of(&d, "ts"), t_str(5000));
    assert_eq!((f64_of(&d, "lat"), f64_of(&d, "lon")), (41.97, -87.67));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_update_errors_change_nothing() {
    let srv = manual().await;
    srv.put_driver("d1", &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(0)}))
        .await;
    let json_ct = Some("application/json");
    let good = json!({"lat": 41.9, "lon": -87.7, "ts": t_str(10)}).to_string();
    // Unknown driver: 404, and the update does not create it.
    rejected(
        &srv,
        Method::POST,
        "/v1/drivers/ghost/location",
        json_ct,
        &good,
        404,
        &["unknown_driver"],
    )
    .await;
    srv.get("/v1/drivers/ghost")
        .await
        .expect_error(404, "unknown_driver");
    let cases: [(&str, u16, &[&str]); 8] = [
        (r#"{"lat": 41.9"#, 400, &["invalid_json"]),
        (r#"{"lat": 91, "lon": 0}"#, 400, &["invalid_position"]),
        (r#"{"lat": 0, "lon": 200}"#, 400, &["invalid_position"]),
        (
            r#"{"lat": 0, "lon": 0, "ts": "noon"}"#,
            400,
            &["invalid_timestamp"],
        ),
        (
            r#"{"lat": 0, "lon": 0, "ts": 253402300800000}"#,
            400,
            &["invalid_timestamp"],
        ),
        (
            r#"{"lat": 0, "lon": 0, "ts": -5}"#,
            400,
            &["invalid_timestamp"],
        ),
        (
            r#"{"lon": 0}"#,
            400,
            &["invalid_json", "invalid_parameter", "invalid_position"],
        ),
        (
            r#"{"lat": null, "lon": 0}"#,
            400,
            &["invalid_json", "invalid_parameter", "invalid_position"],
        ),
    ];
    for (body, status, codes) in cases {
        rejected(
            &srv,
            Method::POST,
            "/v1/drivers/d1/location",
            json_ct,
            body,
            status,
            codes,
        )
        .await;
    }
    for ct in [Some("text/plain"), None] {
        rejected(
            &srv,
            Method::POST,
            "/v1/drivers/d1/location",
            ct,
            &good,
            415,
            &["unsupported_media_type"],
        )
        .await;
    }
    rejected(
        &srv,
        Method::POST,
        "/v1/drivers/a%20b/location",
        json_ct,
        &good,
        400,
        &["invalid_id"],
    )
    .await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_a_driver() {
    let srv = manual().await;
    srv.put_driver("d1", &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(0)}))
        .await;
    let d2 = srv
        .put_driver("d2", &json!({"lat": 41.9, "lon": -87.7, "ts": t_str(0)}))
        .await;
    let r = srv.delete("/v1/drivers/d1").await;
    assert_eq!(r.status.as_u16(), 204, "{}", r.body);
    assert!(r.body.is_empty(), "204 with a body: {:?}", r.body);
    srv.get("/v1/drivers/d1")
        .await
        .expect_error(404, "unknown_driver");
    let q = format!("lat={}&lon={}&k=10", LOOP.0, LOOP.1);
    assert_eq!(srv.nearest_ids(&q).await, ["d2"]);
    assert_eq!(srv.driver("d2").await, d2);

    // Errors change nothing.
    let before = srv.snapshot(&[]);
    srv.delete("/v1/drivers/d1")
        .await
        .expect_error(404, "unknown_driver");
    srv.delete("/v1/drivers/a%20b")
        .await
        .expect_error(400, "invalid_id");
    srv.post_json(
        "/v1/drivers/d1/location",
        &json!({"lat": 41.9, "lon": -87.7}),
    )
    .await
    .expect_error(404, "unknown_driver");
    assert_eq!(srv.snapshot(&[]), before);

    // The id can be used again.
    srv.put_driver("d1", &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(0)}))
        .await;
    assert_eq!(srv.nearest_ids(&q).await, ["d1", "d2"]);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_applies_valid_items_and_reports_the_rest() {
    let srv = manual().await;
    srv.put_driver(
        "d1",
        &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(1000)}),
    )
    .await;
    let d2 = srv
        .put_driver("d2", &json!({"lat": 41.9, "lon": -87.7, "ts": t_str(1000)}))
        .await;
    let items = json!([
        // 0: new driver with attributes, ts as integer ms
        {"driver_id": "n1", "lat": 41.8, "lon": -87.6, "ts": t(100).as_millis(),
         "status": "busy", "vehicle": "bike", "capabilities": ["cash"]},
        // 1: known driver moves
        {"driver_id": "d1", "lat": 41.81, "lon": -87.61, "ts": t_str(2000)},
        // 2: stale
        {"driver_id": "d2", "lat": 45.0, "lon": -80.0, "ts": t_str(500)},
        // 3..: rejected, and none of these ids may appear
        {"driver_id": "n2", "lat": 95.0, "lon": -87.6},
        {"driver_id": "bad id", "lat": 41.8, "lon": -87.6},
        {"driver_id": "n3", "lat": 41.8, "lon": -87.6, "ts": "later"},
        {"driver_id": "n4", "lat": 41.8, "lon": -87.6, "vehicle": "boat"},
        {"driver_id": "n5", "lat": 41.8, "lon": -87.6, "status": "reserved"},
        {"lat": 41.8, "lon": -87.6},
        // 9: new driver, no ts: now
        {"driver_id": "n6", "lat": 41.82, "lon": -87.62},
        // 10: unknown capability
        {"driver_id": "n7", "lat": 41.8, "lon": -87.6, "capabilities": ["flight"]},
    ]);
    let v = srv.post_json("/v1/locations", &items).await.expect(200);
    assert_eq!(v["applied"], json!(3), "{v}");
    assert_eq!(v["stale"], json!(1), "{v}");
    let mut rejected: Vec<(u64, String)> = v["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(
                r["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
            (
                r["index"].as_u64().unwrap(),
                str_of(&r["error"], "code").to_owned(),
            )
        })
        .collect();
    rejected.sort();
    let idx: Vec<u64> = rejected.iter().map(|r| r.0).collect();
    assert_eq!(idx, [3, 4, 5, 6, 7, 8, 10], "{v}");
    let code = |i: u64| rejected.iter().find(|r| r.0 == i).unwrap().1.as_str();
    assert_eq!(code(3), "invalid_position");
    assert_eq!(code(4), "invalid_id");
    assert_eq!(code(5), "invalid_timestamp");
    assert_eq!(code(6), "invalid_parameter");
    assert_eq!(code(7), "invalid_parameter");
    assert!(
        ["invalid_id", "invalid_parameter", "invalid_json"].contains(&code(8)),
        "missing driver_id: {}",
        code(8)
    );
    assert_eq!(code(10), "invalid_parameter");

    let n1 = srv.driver("n1").await;
    assert_eq!(str_of(&n1, "status"), "busy");
    assert_eq!(str_of(&n1, "vehicle"), "bike");
    assert_eq!(caps_of(&n1), names(&["cash"]));
    assert_eq!(str_of(&n1, "ts"), t_str(100));
    let d1 = srv.driver("d1").await;
    assert_eq!((f64_of(&d1, "lat"), f64_of(&d1, "lon")), (41.81, -87.61));
    assert_eq!(srv.driver("d2").await, d2, "stale item changed d2");
    assert_eq!(str_of(&srv.driver("n6").await, "ts"), t_str(0));
    for id in ["n2", "n3", "n4", "n5", "n7"] {
        srv.get(&format!("/v1/drivers/{id}"))
            .await
            .expect_error(404, "unknown_driver");
    }
    assert_eq!(srv.engine().len(), 4);

    // An empty batch is fine.
    let v = srv.post_json("/v1/locations", &json!([])).await.expect(200);
    assert_eq!(v, json!({"applied": 0, "stale": 0, "rejected": []}));
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_accepts_ndjson() {
    let srv = manual().await;
    srv.put_driver("d2", &json!({"lat": 41.9, "lon": -87.7, "ts": t_str(1000)}))
        .await;
    let body = [
        json!({"driver_id": "m1", "lat": 41.8, "lon": -87.6, "ts": t_str(5), "vehicle": "van"}),
        json!({"driver_id": "m2", "lat": -91.0, "lon": -87.6}),
        json!({"driver_id": "d2", "lat": 41.0, "lon": -87.0, "ts": t_str(10)}),
        json!({"driver_id": "m3", "lat": 41.83, "lon": -87.63, "capabilities": ["pets"]}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n")
        // A malformed line is one rejected item (as a bad stream frame is),
        // and blank lines are not items.
        + "\n{\"driver_id\": \"m4\", \"lat\": \n\n";
    let v = srv
        .raw(
            Method::POST,
            "/v1/locations",
            Some("application/x-ndjson"),
            body,
        )
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(2), "{v}");
    assert_eq!(v["stale"], json!(1), "{v}");
    let rej = v["rejected"].as_array().unwrap();
    assert_eq!(rej.len(), 2, "{v}");
    let mut rej: Vec<(u64, &str)> = rej
        .iter()
        .map(|r| (r["index"].as_u64().unwrap(), str_of(&r["error"], "code")))
        .collect();
    rej.sort_unstable();
    assert_eq!(rej, [(1, "invalid_position"), (4, "invalid_json")], "{v}");
    assert_eq!(str_of(&srv.driver("m1").await, "vehicle"), "van");
    assert_eq!(caps_of(&srv.driver("m3").await), names(&["pets"]));
    for id in ["m2", "m4"] {
        srv.get(&format!("/v1/drivers/{id}"))
            .await
            .expect_error(404, "unknown_driver");
    }
    srv.shutdown().await;
}

/// A line of an NDJSON body that is not UTF-8 rejects that line only (it
/// used to reject the whole body), and its message does not repeat its code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_ndjson_line_rejects_only_itself() {
    let srv = manual().await;
    let mut body = Vec::new();
    body.extend_from_slice(br#"{"driver_id": "u1", "lat": 41.8, "lon": -87.6}"#);
    body.extend_from_slice(b"\r\n{\"driver_id\": \"u\xff\xfe\", \"lat\": 41.8, \"lon\": -87.6}\n");
    body.extend_from_slice(br#"{"driver_id": "u3", "lat": 41.81, "lon": -87.61}"#);
    let v = srv
        .raw(
            Method::POST,
            "/v1/locations",
            Some("application/x-ndjson"),
            body,
        )
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(2), "{v}");
    assert_eq!(v["rejected"][0]["index"], json!(1), "{v}");
    assert_eq!(
        v["rejected"][0]["error"]["code"],
        json!("invalid_json"),
        "{v}"
    );
    let message = str_of(&v["rejected"][0]["error"], "message");
    assert!(!message.starts_with("invalid_json"), "{v}");
    for id in ["u1", "u3"] {
        srv.driver(id).await;
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_request_errors_reject_the_whole_request() {
    let srv = TestServer::start_manual(ServeConfig {
        max_batch_items: 5,
        body_limit_bytes: 4096,
        ..test_config()
    })
    .await;
    srv.put_driver("d1", &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(0)}))
        .await;
    let item = |i: usize| json!({"driver_id": format!("b{i}"), "lat": 41.8, "lon": -87.6});
    let six: Vec<Value> = (0..6).map(item).collect();
    let json_ct = Some("application/json");
    let ndjson_ct = Some("application/x-ndjson");
    let six_json = Value::Array(six.clone()).to_string();
    let six_nd = six
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    // More than max_batch_items: 413, and nothing applies.
    rejected(
        &srv,
        Method::POST,
        "/v1/locations",
        json_ct,
        &six_json,
        413,
        &["payload_too_large"],
    )
    .await;
    rejected(
        &srv,
        Method::POST,
        "/v1/locations",
        ndjson_ct,
        &six_nd,
        413,
        &["payload_too_large"],
    )
    .await;
    // Malformed JSON.
    rejected(
        &srv,
        Method::POST,
        "/v1/locations",
        json_ct,
        r#"[{"driver_id": "b0", "lat": 41.8"#,
        400,
        &["invalid_json"],
    )
    .await;
    // Not an array.
    rejected(
        &srv,
        Method::POST,
        "/v1/locations",
        json_ct,
        r#"{"driver_id": "b0", "lat": 41.8, "lon": -87.6}"#,
        400,
        &["invalid_json", "invalid_parameter"],
    )
    .await;
    // Wrong or missing content type.
    let five_json = Value::Array(six[..5].to_vec()).to_string();
    for ct in [Some("text/plain"), Some("application/xml"), None] {
        rejected(
            &srv,
            Method::POST,
            "/v1/locations",
            ct,
            &five_json,
            415,
            &["unsupported_media_type"],
        )
        .await;
    }
    // Too large a body (valid JSON padded with whitespace).
    let padded = format!("{five_json}{}", " ".repeat(5000));
    rejected(
        &srv,
        Method::POST,
        "/v1/locations",
        json_ct,
        &padded,
        413,
        &["payload_too_large"],
    )
    .await;
    let padded_nd = format!("{}{}", six_nd.lines().next().unwrap(), "\n".repeat(5000));
    rejected(
        &srv,
        Method::POST,
        "/v1/locations",
        ndjson_ct,
        &padded_nd,
        413,
        &["payload_too_large"],
    )
    .await;
    assert_eq!(srv.engine().len(), 1);

    // Exactly max_batch_items is fine.
    let v = srv
        .raw(Method::POST, "/v1/locations", json_ct, five_json)
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(5), "{v}");
    assert_eq!(srv.engine().len(), 6);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_drivers_expire_after_the_ttl() {
    let srv = TestServer::start_manual(ServeConfig {
        driver_ttl_s: 2,
        ..test_config()
    })
    .await;
    for id in ["quiet", "chatty"] {
        srv.put_driver(id, &json!({"lat": LOOP.0, "lon": LOOP.1}))
            .await;
    }
    srv.clock().advance(1500);
    let v = srv
        .post_json(
            "/v1/drivers/chatty/location",
            &json!({"lat": LOOP.0, "lon": LOOP.1}),
        )
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(true));
    srv.clock().advance(1000);
    // "quiet" has been silent 2.5 s > 2 s; the background sweep removes it.
    poll_until("the silent driver to expire", async || {
        let r = srv.get("/v1/drivers/quiet").await;
        (r.status.as_u16() == 404).then_some(r)
    })
    .await
    .expect_error(404, "unknown_driver");
    // "chatty" was seen 1 s ago: still there and offered.
    check_driver_shape(&srv.driver("chatty").await);
    let q = format!("lat={}&lon={}", LOOP.0, LOOP.1);
    assert_eq!(srv.nearest_ids(&q).await, ["chatty"]);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_at_the_limits_are_accepted() {
    let srv = manual().await;
    for (i, (lat, lon)) in [(90.0, 0.0), (-90.0, 180.0), (0.0, -180.0), (-33.9, 151.2)]
        .into_iter()
        .enumerate()
    {
        let id = format!("edge{i}");
        let d = srv.put_driver(&id, &json!({"lat": lat, "lon": lon})).await;
        let p = Position::new(lat, lon).unwrap();
        assert_eq!((f64_of(&d, "lat"), f64_of(&d, "lon")), (p.lat(), p.lon()));
    }
    // Across the antimeridian: (0, 179.9999) is nearer to (0, -180) than anything else.
    let near = srv.nearest("lat=0&lon=179.9999&k=1").await;
    assert_eq!(str_of(&near[0], "driver_id"), "edge2");
    srv.shutdown().await;
}
