//! HTTP API, matching: `POST /v1/matches`, `GET /v1/matches/{id}`,
//! `…/confirm`, `…/release`, `…/complete`, `POST /v1/matches/batch`; the
//! driver side of each transition; reservation expiry on simulated time;
//! every documented error (with "a rejected request changes no state");
//! and concurrent claims that must never double-book a driver.

#![allow(
    clippy::float_cmp, // positions must round-trip exactly through JSON
    clippy::too_many_lines
)]

use std::collections::{BTreeMap, BTreeSet};

use hexmatch::{MAX_HOLD_MS, Position, Status};
use hexmatch_tests::http::{
    Api, ServeConfig, TestServer, check_match_shape, f64_of, latlon, opt, poll_until, pos_of,
    str_of, t, t_str, test_config, ts_of,
};
use reqwest::Method;
use serde_json::{Value, json};

/// A point on the parallel through the Loop, `u` hundredths of a degree east.
fn at(u: f64) -> Position {
    Position::new(41.88, -87.70 + u * 0.01).expect("a valid test position")
}

fn pickup(p: Position) -> Value {
    json!({"lat": p.lat(), "lon": p.lon()})
}

async fn put_at(api: &Api, id: &str, p: Position) -> Value {
    api.put_driver(id, &json!({"lat": p.lat(), "lon": p.lon(), "ts": t_str(0)}))
        .await
}

async fn manual() -> TestServer {
    TestServer::start_manual(test_config()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_reserves_the_nearest_driver_idempotently() {
    let srv = manual().await;
    put_at(&srv, "near", at(0.1)).await;
    put_at(&srv, "far", at(0.5)).await;
    let body = json!({"order_id": "o1", "pickup": pickup(at(0.0)), "hold_ms": 45_000});
    let r = srv.claim(&body).await;
    let m = r.expect(201);
    check_match_shape(&m);
    assert_eq!(str_of(&m, "order_id"), "o1");
    assert_eq!(str_of(&m, "driver_id"), "near");
    assert_eq!(str_of(&m, "state"), "reserved");
    let expected = at(0.0).distance_m(at(0.1));
    assert!((f64_of(&m, "distance_m") - expected).abs() < 1e-6, "{m}");
    assert_eq!(ts_of(&m, "created_at"), t(0));
    assert_eq!(ts_of(&m, "reserved_until"), t(45_000));
    assert_eq!(pos_of(&m["pickup"]), at(0.0));
    assert!(opt(&m, "ended_at").is_none() && opt(&m, "reason").is_none());

    // The driver is reserved for the order and no longer offered.
    let d = srv.driver("near").await;
    assert_eq!(str_of(&d, "status"), "reserved");
    assert_eq!(str_of(&d, "order_id"), "o1");
    assert_eq!(str_of(&d, "reserved_until"), str_of(&m, "reserved_until"));
    assert_eq!(srv.nearest_ids(&latlon(at(0.0))).await, ["far"]);
    assert_eq!(srv.get_match("o1").await, m);

    // The same request again: 200 and the same match; nothing changes.
    let before = srv.snapshot(&["o1"]);
    srv.clock().advance(10);
    assert_eq!(srv.claim(&body).await.expect(200), m);
    assert_eq!(srv.snapshot(&["o1"]), before);

    // The same order with a different request while live: 409, nothing changes.
    for other in [
        json!({"order_id": "o1", "pickup": pickup(at(0.3)), "hold_ms": 45_000}),
        json!({"order_id": "o1", "pickup": pickup(at(0.0))}),
        json!({"order_id": "o1", "pickup": pickup(at(0.0)), "hold_ms": 45_000, "vehicle": "car"}),
    ] {
        srv.claim(&other).await.expect_error(409, "order_conflict");
        assert_eq!(srv.snapshot(&["o1"]), before, "{other}");
    }

    // A location update of a reserved driver keeps the reservation.
    let v = srv
        .post_json(
            "/v1/drivers/near/location",
            &json!({"lat": 41.881, "lon": -87.699, "ts": t_str(5)}),
        )
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(true));
    let d = srv.driver("near").await;
    assert_eq!(str_of(&d, "status"), "reserved");
    assert_eq!(str_of(&d, "order_id"), "o1");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_honours_filters_and_radius() {
    let srv = manual().await;
    srv.put_driver(
        "car0",
        &json!({"lat": at(0.5).lat(), "lon": at(0.5).lon(), "vehicle": "car"}),
    )
    .await;
    srv.put_driver(
        "van1",
        &json!({"lat": at(0.2).lat(), "lon": at(0.2).lon(), "vehicle": "van",
                "capabilities": ["large_items", "cash"]}),
    )
    .await;
    srv.put_driver(
        "bike2",
        &json!({"lat": at(0.3).lat(), "lon": at(0.3).lon(), "vehicle": "bike",
                "capabilities": ["cash"]}),
    )
    .await;
    let m = srv
        .claim(&json!({"order_id": "big", "pickup": pickup(at(0.0)),
                       "capabilities": ["large_items"]}))
        .await
        .expect(201);
    assert_eq!(str_of(&m, "driver_id"), "van1");
    let m = srv
        .claim(&json!({"order_id": "b", "pickup": pickup(at(0.0)), "vehicle": "bike"}))
        .await
        .expect(201);
    assert_eq!(str_of(&m, "driver_id"), "bike2");
    // car0 is 414 m away: a 300 m radius finds nobody, a 500 m one finds it.
    let before = srv.snapshot(&["r"]);
    srv.claim(&json!({"order_id": "r", "pickup": pickup(at(0.0)), "radius_m": 300}))
        .await
        .expect_error(409, "no_driver_available");
    assert_eq!(srv.snapshot(&["r"]), before);
    srv.get("/v1/matches/r")
        .await
        .expect_error(404, "unknown_order");
    let m = srv
        .claim(&json!({"order_id": "r", "pickup": pickup(at(0.0)), "radius_m": 500}))
        .await
        .expect(201);
    assert_eq!(str_of(&m, "driver_id"), "car0");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_driver_available_creates_nothing() {
    let srv = manual().await;
    let body = json!({"order_id": "o1", "pickup": pickup(at(0.0))});
    // Nobody at all.
    srv.claim(&body)
        .await
        .expect_error(409, "no_driver_available");
    srv.get("/v1/matches/o1")
        .await
        .expect_error(404, "unknown_order");
    // Drivers, but none eligible: busy, offline, wrong vehicle, missing capability.
    srv.put_driver(
        "busy",
        &json!({"lat": 41.88, "lon": -87.70, "status": "busy"}),
    )
    .await;
    srv.put_driver(
        "off",
        &json!({"lat": 41.88, "lon": -87.70, "status": "offline"}),
    )
    .await;
    srv.put_driver(
        "bike",
        &json!({"lat": 41.88, "lon": -87.70, "vehicle": "bike"}),
    )
    .await;
    let before = srv.snapshot(&["o1"]);
    // Only the bike is available and eligible for an unfiltered order.
    for filter in [
        json!({"vehicle": "truck"}),
        json!({"vehicle": "car"}),
        json!({"capabilities": ["cash"]}),
        json!({"vehicle": "bike", "radius_m": 0.5}),
    ] {
        let mut b = json!({"order_id": "o1", "pickup": pickup(at(0.01))});
        b.as_object_mut()
            .unwrap()
            .extend(filter.as_object().unwrap().clone());
        srv.claim(&b).await.expect_error(409, "no_driver_available");
        assert_eq!(srv.snapshot(&["o1"]), before, "{b}");
    }
    // Everyone taken: the second order finds nobody.
    srv.claim(&body).await.expect(201);
    let before = srv.snapshot(&["o1", "o2"]);
    srv.claim(&json!({"order_id": "o2", "pickup": pickup(at(0.0))}))
        .await
        .expect_error(409, "no_driver_available");
    assert_eq!(srv.snapshot(&["o1", "o2"]), before);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_then_complete() {
    let srv = manual().await;
    put_at(&srv, "d1", at(0.0)).await;
    let m = srv
        .claim(&json!({"order_id": "o1", "pickup": pickup(at(0.01))}))
        .await
        .expect(201);
    srv.clock().advance(1000);
    let c = srv.post_empty("/v1/matches/o1/confirm").await.expect(200);
    check_match_shape(&c);
    assert_eq!(str_of(&c, "state"), "confirmed");
    assert_eq!(c["driver_id"], m["driver_id"]);
    assert_eq!(c["created_at"], m["created_at"]);
    assert_eq!(srv.get_match("o1").await, c);
    let d = srv.driver("d1").await;
    assert_eq!(str_of(&d, "status"), "busy");
    assert_eq!(str_of(&d, "order_id"), "o1");
    assert!(srv.nearest_ids(&latlon(at(0.0))).await.is_empty());

    // Confirming twice, or completing/releasing an unknown order: errors, no change.
    let before = srv.snapshot(&["o1"]);
    srv.post_empty("/v1/matches/o1/confirm")
        .await
        .expect_error(409, "order_conflict");
    for action in ["confirm", "release", "complete"] {
        srv.post_empty(&format!("/v1/matches/nope/{action}"))
            .await
            .expect_error(404, "unknown_order");
    }
    assert_eq!(srv.snapshot(&["o1"]), before);

    srv.clock().advance(1000);
    let done = srv.post_empty("/v1/matches/o1/complete").await.expect(200);
    check_match_shape(&done);
    assert_eq!(str_of(&done, "state"), "completed");
    assert_eq!(ts_of(&done, "ended_at"), t(2000));
    assert_eq!(srv.get_match("o1").await, done);
    let d = srv.driver("d1").await;
    assert_eq!(str_of(&d, "status"), "available");
    assert!(opt(&d, "order_id").is_none(), "{d}");
    assert_eq!(srv.nearest_ids(&latlon(at(0.0))).await, ["d1"]);

    // Nothing more can happen to a completed match.
    let before = srv.snapshot(&["o1"]);
    for action in ["confirm", "release", "complete"] {
        srv.post_empty(&format!("/v1/matches/o1/{action}"))
            .await
            .expect_error(409, "order_conflict");
        assert_eq!(srv.snapshot(&["o1"]), before, "{action}");
    }
    // An ended order id may be claimed anew.
    let again = srv
        .claim(&json!({"order_id": "o1", "pickup": pickup(at(0.01))}))
        .await
        .expect(201);
    assert_eq!(str_of(&again, "state"), "reserved");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_needs_a_confirmed_match() {
    let srv = manual().await;
    put_at(&srv, "d1", at(0.0)).await;
    srv.claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    let before = srv.snapshot(&["o1"]);
    srv.post_empty("/v1/matches/o1/complete")
        .await
        .expect_error(409, "order_conflict");
    assert_eq!(srv.snapshot(&["o1"]), before);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_frees_the_driver() {
    let srv = manual().await;
    put_at(&srv, "d1", at(0.0)).await;
    put_at(&srv, "d2", at(0.5)).await;
    // With a reason.
    srv.claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    srv.clock().advance(250);
    let r = srv
        .post_json(
            "/v1/matches/o1/release",
            &json!({"reason": "customer_cancelled"}),
        )
        .await
        .expect(200);
    check_match_shape(&r);
    assert_eq!(str_of(&r, "state"), "released");
    assert_eq!(str_of(&r, "reason"), "customer_cancelled");
    assert_eq!(ts_of(&r, "ended_at"), t(250));
    assert_eq!(srv.get_match("o1").await, r);
    let d = srv.driver("d1").await;
    assert_eq!(str_of(&d, "status"), "available");
    assert!(opt(&d, "order_id").is_none());
    assert_eq!(srv.nearest_ids(&latlon(at(0.0))).await, ["d1", "d2"]);

    // Releasing again: 409; nothing changes.
    let before = srv.snapshot(&["o1"]);
    srv.post_empty("/v1/matches/o1/release")
        .await
        .expect_error(409, "order_conflict");
    srv.post_empty("/v1/matches/o1/confirm")
        .await
        .expect_error(409, "order_conflict");
    assert_eq!(srv.snapshot(&["o1"]), before);

    // Empty body, `{}` body, and release of a confirmed match.
    for (order, body) in [("o2", None), ("o3", Some("{}"))] {
        srv.claim(&json!({"order_id": order, "pickup": pickup(at(0.0))}))
            .await
            .expect(201);
        let r = match body {
            None => {
                srv.post_empty(&format!("/v1/matches/{order}/release"))
                    .await
            }
            Some(b) => {
                srv.raw(
                    Method::POST,
                    &format!("/v1/matches/{order}/release"),
                    Some("application/json"),
                    b,
                )
                .await
            }
        };
        assert_eq!(str_of(&r.expect(200), "state"), "released");
    }
    srv.claim(&json!({"order_id": "o4", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    srv.post_empty("/v1/matches/o4/confirm").await.expect(200);
    let r = srv.post_empty("/v1/matches/o4/release").await.expect(200);
    assert_eq!(str_of(&r, "state"), "released");
    assert_eq!(str_of(&srv.driver("d1").await, "status"), "available");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_release_body_changes_nothing() {
    let srv = manual().await;
    put_at(&srv, "d1", at(0.0)).await;
    srv.claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    let before = srv.snapshot(&["o1"]);
    let r = srv
        .raw(
            Method::POST,
            "/v1/matches/o1/release",
            Some("application/json"),
            r#"{"reason": "#,
        )
        .await;
    r.expect_error(400, "invalid_json");
    assert_eq!(srv.snapshot(&["o1"]), before);
    assert_eq!(str_of(&srv.get_match("o1").await, "state"), "reserved");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_expire_in_the_background() {
    let srv = manual().await; // sweep every 20 ms
    put_at(&srv, "d1", at(0.0)).await;
    let m = srv
        .claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0)), "hold_ms": 1000}))
        .await
        .expect(201);
    assert_eq!(ts_of(&m, "reserved_until"), t(1000));
    // Not yet: one millisecond before the deadline nothing expires.
    srv.clock().advance(999);
    assert_eq!(str_of(&srv.get_match("o1").await, "state"), "reserved");
    srv.clock().advance(1);
    let e = poll_until("the reservation to expire", async || {
        let m = srv.get_match("o1").await;
        (str_of(&m, "state") == "expired").then_some(m)
    })
    .await;
    check_match_shape(&e);
    assert_eq!(e["driver_id"], m["driver_id"]);
    assert_eq!(e["reserved_until"], m["reserved_until"]);
    let d = srv.driver("d1").await;
    assert_eq!(str_of(&d, "status"), "available");
    assert!(opt(&d, "order_id").is_none());
    assert_eq!(srv.nearest_ids(&latlon(at(0.0))).await, ["d1"]);
    // An expired reservation cannot be confirmed or released.
    let before = srv.snapshot(&["o1"]);
    for action in ["confirm", "release"] {
        srv.post_empty(&format!("/v1/matches/o1/{action}"))
            .await
            .expect_error_in(409, &["reservation_expired", "order_conflict"]);
    }
    assert_eq!(srv.snapshot(&["o1"]), before);
    // The order id may be claimed anew.
    srv.claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_after_the_hold_is_reservation_expired() {
    // No background sweep during the test: the deadline is found by confirm.
    let srv = TestServer::start_manual(ServeConfig {
        sweep_interval_ms: 3_600_000,
        ..test_config()
    })
    .await;
    put_at(&srv, "d1", at(0.0)).await;
    put_at(&srv, "d2", at(0.1)).await;
    srv.claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0)), "hold_ms": 500}))
        .await
        .expect(201);
    srv.claim(&json!({"order_id": "o2", "pickup": pickup(at(0.0)), "hold_ms": 500}))
        .await
        .expect(201);
    srv.clock().advance(500);
    srv.post_empty("/v1/matches/o1/confirm")
        .await
        .expect_error(409, "reservation_expired");
    srv.post_empty("/v1/matches/o2/release")
        .await
        .expect_error(409, "reservation_expired");
    for (order, driver) in [("o1", "d1"), ("o2", "d2")] {
        let m = srv.get_match(order).await;
        assert_eq!(str_of(&m, "state"), "expired", "{m}");
        assert_eq!(str_of(&m, "driver_id"), driver);
        assert_eq!(str_of(&srv.driver(driver).await, "status"), "available");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_rejects_bad_input_without_changing_state() {
    let srv = manual().await;
    put_at(&srv, "d1", at(0.0)).await;
    let p = pickup(at(0.0));
    let with = |extra: Value| {
        let mut b = json!({"order_id": "o1", "pickup": p});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b.to_string()
    };
    let shape = [
        "invalid_json",
        "invalid_parameter",
        "invalid_id",
        "invalid_position",
    ];
    let cases: Vec<(String, u16, Vec<&str>)> = vec![
        (
            r#"{"order_id": "o1", "pickup": {"lat": 41.88"#.into(),
            400,
            vec!["invalid_json"],
        ),
        (
            with(json!({"pickup": {"lat": 91.0, "lon": 0.0}})),
            400,
            vec!["invalid_position"],
        ),
        (
            with(json!({"pickup": {"lat": 0.0, "lon": -180.01}})),
            400,
            vec!["invalid_position"],
        ),
        (
            with(json!({"vehicle": "boat"})),
            400,
            vec!["invalid_parameter"],
        ),
        (
            with(json!({"capabilities": ["teleport"]})),
            400,
            vec!["invalid_parameter"],
        ),
        (
            with(json!({"radius_m": -1.0})),
            400,
            vec!["invalid_parameter"],
        ),
        (with(json!({"radius_m": 0})), 400, vec!["invalid_parameter"]),
        (with(json!({"hold_ms": 0})), 400, vec!["invalid_parameter"]),
        (
            with(json!({"hold_ms": MAX_HOLD_MS + 1})),
            400,
            vec!["invalid_parameter"],
        ),
        (with(json!({"hold_ms": -5})), 400, shape.to_vec()),
        (json!({"order_id": "o1"}).to_string(), 400, shape.to_vec()),
        (json!({"pickup": p}).to_string(), 400, shape.to_vec()),
        ("[]".into(), 400, shape.to_vec()),
    ];
    let bad_ids = [json!("a b"), json!(""), json!("x".repeat(65)), json!("ü")];
    let before = srv.snapshot(&["o1"]);
    let json_ct = Some("application/json");
    for (body, status, codes) in &cases {
        let r = srv
            .raw(Method::POST, "/v1/matches", json_ct, body.clone())
            .await;
        assert_eq!(r.status.as_u16(), *status, "{body}: {}", r.body);
        r.expect_error_in(*status, codes);
        assert_eq!(srv.snapshot(&["o1"]), before, "{body} changed state");
    }
    for id in bad_ids {
        srv.claim(&json!({"order_id": id, "pickup": p}))
            .await
            .expect_error(400, "invalid_id");
        assert_eq!(srv.snapshot(&["o1"]), before, "{id} changed state");
    }
    for ct in [Some("text/plain"), None] {
        srv.raw(Method::POST, "/v1/matches", ct, with(json!({})))
            .await
            .expect_error(415, "unsupported_media_type");
        assert_eq!(srv.snapshot(&["o1"]), before);
    }
    srv.get("/v1/matches/o1")
        .await
        .expect_error(404, "unknown_order");
    assert_eq!(str_of(&srv.driver("d1").await, "status"), "available");
    // Sanity: the same order, well-formed, succeeds.
    srv.claim(&json!({"order_id": "o1", "pickup": p, "hold_ms": MAX_HOLD_MS}))
        .await
        .expect(201);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_ids_in_match_paths() {
    let srv = manual().await;
    put_at(&srv, "d1", at(0.0)).await;
    srv.claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    let before = srv.snapshot(&["o1"]);
    let long = "x".repeat(65);
    for bad in ["a%20b", long.as_str(), "caf%C3%A9"] {
        srv.get(&format!("/v1/matches/{bad}"))
            .await
            .expect_error(400, "invalid_id");
        for action in ["confirm", "release", "complete"] {
            srv.post_empty(&format!("/v1/matches/{bad}/{action}"))
                .await
                .expect_error(400, "invalid_id");
        }
    }
    srv.get("/v1/matches/unknown")
        .await
        .expect_error(404, "unknown_order");
    assert_eq!(srv.snapshot(&["o1"]), before);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_or_parking_a_driver_releases_its_match() {
    let srv = manual().await;
    put_at(&srv, "d1", at(0.0)).await;
    put_at(&srv, "d2", at(0.2)).await;
    srv.claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    let r = srv.delete("/v1/drivers/d1").await;
    assert_eq!(r.status.as_u16(), 204, "{}", r.body);
    let m = srv.get_match("o1").await;
    check_match_shape(&m);
    assert_eq!(str_of(&m, "state"), "released");
    assert_eq!(str_of(&m, "reason"), "driver_removed");
    srv.post_empty("/v1/matches/o1/confirm")
        .await
        .expect_error(409, "order_conflict");
    // The order can be served again, by the remaining driver.
    let m = srv
        .claim(&json!({"order_id": "o1", "pickup": pickup(at(0.0))}))
        .await
        .expect(201);
    assert_eq!(str_of(&m, "driver_id"), "d2");
    // The driver goes offline while reserved: released with driver_offline.
    srv.put_driver(
        "d2",
        &json!({"lat": at(0.2).lat(), "lon": at(0.2).lon(), "ts": t_str(10),
                "status": "offline"}),
    )
    .await;
    let m = srv.get_match("o1").await;
    assert_eq!(str_of(&m, "state"), "released");
    assert_eq!(str_of(&m, "reason"), "driver_offline");
    assert_eq!(str_of(&srv.driver("d2").await, "status"), "offline");
    assert_eq!(srv.engine().live_matches(), 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_minimises_total_distance() {
    let srv = manual().await;
    // Greedy nearest-first would give A the driver at 0.9 (0.1 away) and B
    // the one at 2.2 (2.2 away): 2.3 in total. The optimum is 2.1: B gets
    // 0.9 (0.9), A gets 2.2 (1.2).
    put_at(&srv, "x", at(0.9)).await;
    put_at(&srv, "y", at(2.2)).await;
    put_at(&srv, "busy", at(1.0)).await;
    srv.put_driver(
        "busy",
        &json!({"lat": at(1.0).lat(), "lon": at(1.0).lon(), "ts": t_str(1), "status": "busy"}),
    )
    .await;
    let body = json!({
        "orders": [
            {"order_id": "A", "pickup": pickup(at(1.0)), "hold_ms": 60_000},
            {"order_id": "B", "pickup": pickup(at(0.0))},
            {"order_id": "C", "pickup": pickup(at(0.0)), "vehicle": "truck"},
        ],
        "objective": "total_distance",
    });
    let v = srv.post_json("/v1/matches/batch", &body).await.expect(200);
    let matches = v["matches"].as_array().unwrap();
    assert_eq!(matches.len(), 2, "{v}");
    assert_eq!(v["unmatched"], json!(["C"]), "{v}");
    let by_order: BTreeMap<&str, &Value> =
        matches.iter().map(|m| (str_of(m, "order_id"), m)).collect();
    assert_eq!(str_of(by_order["A"], "driver_id"), "y");
    assert_eq!(str_of(by_order["B"], "driver_id"), "x");
    for (order, driver, pick, hold) in [("A", "y", at(1.0), 60_000), ("B", "x", at(0.0), 30_000)] {
        let m = by_order[order];
        check_match_shape(m);
        assert_eq!(str_of(m, "state"), "reserved");
        let expected = pick.distance_m(if driver == "x" { at(0.9) } else { at(2.2) });
        assert!((f64_of(m, "distance_m") - expected).abs() < 1e-6, "{m}");
        assert_eq!(ts_of(m, "reserved_until"), t(hold));
        assert_eq!(&srv.get_match(order).await, m);
        let d = srv.driver(driver).await;
        assert_eq!(str_of(&d, "status"), "reserved");
        assert_eq!(str_of(&d, "order_id"), order);
    }
    srv.get("/v1/matches/C")
        .await
        .expect_error(404, "unknown_order");

    // Without "objective" the same objective applies.
    srv.post_empty("/v1/matches/A/release").await.expect(200);
    srv.post_empty("/v1/matches/B/release").await.expect(200);
    let v = srv
        .post_json(
            "/v1/matches/batch",
            &json!({"orders": [
                {"order_id": "A2", "pickup": pickup(at(1.0))},
                {"order_id": "B2", "pickup": pickup(at(0.0))},
            ]}),
        )
        .await
        .expect(200);
    let got: BTreeSet<(String, String)> = v["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                str_of(m, "order_id").to_owned(),
                str_of(m, "driver_id").to_owned(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [("A2", "y"), ("B2", "x")]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
    assert_eq!(got, want, "{v}");
    assert_eq!(v["unmatched"], json!([]));
    srv.shutdown().await;
}

/// `candidates` bounds how many of its own nearest drivers each order
/// sees at first. Orders A (at 1.0) and B (at 0.0), drivers x (0.9) and y
/// (2.2). With one, both see only x; A also gets x as its private
/// candidate and B gets y, so both are served, A↔x and B↔y (2.3 units).
/// With the default both see both drivers and the optimum is A↔y and B↔x
/// (2.1 units).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_candidates_bound_what_each_order_sees() {
    for (candidates, a_gets, total) in [(json!(1), "x", 2.3), (json!(16), "y", 2.1)] {
        let srv = manual().await;
        put_at(&srv, "x", at(0.9)).await;
        put_at(&srv, "y", at(2.2)).await;
        let body = json!({
            "orders": [
                {"order_id": "A", "pickup": pickup(at(1.0))},
                {"order_id": "B", "pickup": pickup(at(0.0))},
            ],
            "candidates": candidates,
        });
        let v = srv.post_json("/v1/matches/batch", &body).await.expect(200);
        let matches = v["matches"].as_array().unwrap();
        assert_eq!(matches.len(), 2, "candidates {candidates}: {v}");
        let a = matches.iter().find(|m| m["order_id"] == "A").unwrap();
        assert_eq!(
            str_of(a, "driver_id"),
            a_gets,
            "candidates {candidates}: {v}"
        );
        let sum: f64 = matches.iter().map(|m| f64_of(m, "distance_m")).sum();
        let unit = at(0.0).distance_m(at(1.0));
        assert!(
            (sum / unit - total).abs() < 1e-3,
            "candidates {candidates}: {v}"
        );
        srv.shutdown().await;
    }
}

/// Orders at one pickup all get drivers when enough are available: 50,
/// 200 and 1,000 orders at one point, 1,100 drivers around it. Each order's
/// own 16 nearest are the same 16 drivers; the batch still serves every
/// order, with distinct drivers, and the 1,000 take the 1,000 nearest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn co_located_orders_all_get_drivers() {
    let srv = manual().await;
    let here = at(0.0);
    let drivers: Vec<Value> = (0..1_100)
        .map(|i| {
            let r = 0.0001 * f64::from(i + 1).sqrt();
            let a = f64::from(i) * 2.4;
            json!({
                "driver_id": format!("d{i}"),
                "lat": here.lat() + r * a.sin(),
                "lon": here.lon() + r * a.cos(),
                "ts": t_str(0),
            })
        })
        .collect();
    let v = srv
        .post_json("/v1/locations", &json!(drivers))
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(1_100), "{v}");
    let mut nearest: Vec<f64> = drivers
        .iter()
        .map(|d| here.distance_m(Position::new(f64_of(d, "lat"), f64_of(d, "lon")).unwrap()))
        .collect();
    nearest.sort_by(f64::total_cmp);
    for (round, n) in [50, 200, 1_000].into_iter().enumerate() {
        let orders: Vec<Value> = (0..n)
            .map(|i| json!({"order_id": format!("r{round}-{i}"), "pickup": pickup(here)}))
            .collect();
        let v = srv
            .post_json("/v1/matches/batch", &json!({"orders": orders}))
            .await
            .expect(200);
        let matches = v["matches"].as_array().unwrap();
        assert_eq!(
            matches.len(),
            n,
            "{n} orders at one point: {}",
            v["unmatched"]
        );
        assert_eq!(v["unmatched"], json!([]));
        let ids: BTreeSet<&str> = matches.iter().map(|m| str_of(m, "driver_id")).collect();
        assert_eq!(ids.len(), n, "a driver twice");
        let sum: f64 = matches.iter().map(|m| f64_of(m, "distance_m")).sum();
        let best: f64 = nearest[..n].iter().sum();
        assert!(
            (sum - best).abs() < 1e-3 * n as f64,
            "{n} orders: {sum} m, best {best} m"
        );
        for m in matches {
            srv.post_json(
                &format!("/v1/matches/{}/release", str_of(m, "order_id")),
                &json!({}),
            )
            .await
            .expect(200);
        }
    }
    srv.shutdown().await;
}

/// More orders than `--max-batch-items` is 413 `payload_too_large`, and so
/// is a location batch past it; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_past_the_maximum_are_payload_too_large() {
    let srv = TestServer::start_manual(ServeConfig {
        max_batch_items: 100,
        ..test_config()
    })
    .await;
    put_at(&srv, "x", at(0.0)).await;
    let before = srv.snapshot(&["o0", "o100"]);
    let orders: Vec<Value> = (0..101)
        .map(|i| json!({"order_id": format!("o{i}"), "pickup": pickup(at(0.0))}))
        .collect();
    srv.post_json("/v1/matches/batch", &json!({"orders": orders}))
        .await
        .expect_error(413, "payload_too_large");
    let items: Vec<Value> = (0..101)
        .map(|i| json!({"driver_id": format!("n{i}"), "lat": 41.88, "lon": -87.7}))
        .collect();
    srv.post_json("/v1/locations", &json!(items))
        .await
        .expect_error(413, "payload_too_large");
    assert_eq!(srv.snapshot(&["o0", "o100"]), before);
    // At the maximum, both are served.
    let v = srv
        .post_json("/v1/matches/batch", &json!({"orders": orders[..100]}))
        .await
        .expect(200);
    assert_eq!(v["matches"].as_array().unwrap().len(), 1, "{v}");
    srv.post_json("/v1/locations", &json!(items[..100]))
        .await
        .expect(200);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_rejects_bad_input_without_changing_state() {
    let srv = manual().await;
    put_at(&srv, "x", at(0.0)).await;
    put_at(&srv, "y", at(1.0)).await;
    let good = json!({"order_id": "A", "pickup": pickup(at(0.0))});
    let cases: Vec<(Value, &[&str])> = vec![
        (
            json!({"orders": [good], "objective": "fastest"}),
            &["invalid_parameter"],
        ),
        (
            json!({"orders": [good], "objective": 7}),
            &["invalid_parameter", "invalid_json"],
        ),
        (
            json!({"orders": [good, {"order_id": "B", "pickup": {"lat": 100, "lon": 0}}]}),
            &["invalid_position"],
        ),
        (
            json!({"orders": [good, {"order_id": "b b", "pickup": pickup(at(1.0))}]}),
            &["invalid_id"],
        ),
        (
            json!({"orders": [good, {"order_id": "B", "pickup": pickup(at(1.0)), "vehicle": "ufo"}]}),
            &["invalid_parameter"],
        ),
        (
            json!({"orders": [good, {"order_id": "B", "pickup": pickup(at(1.0)), "hold_ms": 0}]}),
            &["invalid_parameter"],
        ),
        // The same order twice in one window.
        (
            json!({"orders": [good, {"order_id": "A", "pickup": pickup(at(1.0))}]}),
            &["invalid_parameter"],
        ),
        (
            json!({"orders": "A"}),
            &["invalid_json", "invalid_parameter"],
        ),
        (json!({}), &["invalid_json", "invalid_parameter"]),
        // Candidates per order must be in 1..=100.
        (
            json!({"orders": [good], "candidates": 0}),
            &["invalid_parameter"],
        ),
        (
            json!({"orders": [good], "candidates": 101}),
            &["invalid_parameter"],
        ),
    ];
    let before = srv.snapshot(&["A", "B"]);
    for (body, codes) in cases {
        let r = srv.post_json("/v1/matches/batch", &body).await;
        assert_eq!(r.status.as_u16(), 400, "{body}: {}", r.body);
        r.expect_error_in(400, codes);
        assert_eq!(srv.snapshot(&["A", "B"]), before, "{body} changed state");
    }
    srv.raw(
        Method::POST,
        "/v1/matches/batch",
        Some("application/json"),
        r#"{"orders": ["#,
    )
    .await
    .expect_error(400, "invalid_json");
    srv.raw(
        Method::POST,
        "/v1/matches/batch",
        Some("text/plain"),
        json!({"orders": [good]}).to_string(),
    )
    .await
    .expect_error(415, "unsupported_media_type");
    assert_eq!(srv.snapshot(&["A", "B"]), before);
    for id in ["x", "y"] {
        assert_eq!(str_of(&srv.driver(id).await, "status"), "available");
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_double_book() {
    const DRIVERS: usize = 20;
    const ORDERS: usize = 200;
    const TASKS: usize = 64;
    let srv = manual().await;
    // Drivers at the first 20 distinct Chicago pickup spots; orders at the
    // pickups of the next 200 trips.
    let pickups = hexmatch_tests::load_chicago_pickups();
    let mut spots: Vec<Position> = Vec::new();
    for (_, p) in &pickups {
        if !spots.contains(p) {
            spots.push(*p);
        }
        if spots.len() == DRIVERS {
            break;
        }
    }
    let drivers: Vec<String> = (0..DRIVERS).map(|i| format!("drv{i:02}")).collect();
    for (id, p) in drivers.iter().zip(&spots) {
        put_at(&srv, id, *p).await;
    }
    let orders: Vec<(String, Position)> = pickups[100..100 + ORDERS]
        .iter()
        .enumerate()
        .map(|(i, (_, p))| (format!("ord{i:03}"), *p))
        .collect();

    let mut tasks = Vec::new();
    for task_no in 0..TASKS {
        let api = srv.api();
        let mine: Vec<(String, Position)> = orders
            .iter()
            .skip(task_no)
            .step_by(TASKS)
            .cloned()
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for (order, p) in mine {
                let body = json!({"order_id": order, "pickup": pickup(p), "hold_ms": 600_000});
                let r = api.claim(&body).await;
                out.push((order, r));
            }
            out
        }));
    }
    let mut created: BTreeMap<String, Value> = BTreeMap::new();
    let mut refused = 0;
    for task in tasks {
        for (order, r) in task.await.unwrap() {
            match r.status.as_u16() {
                201 => {
                    let m = r.expect(201);
                    check_match_shape(&m);
                    assert_eq!(str_of(&m, "order_id"), order);
                    created.insert(order, m);
                }
                409 => {
                    r.expect_error(409, "no_driver_available");
                    refused += 1;
                }
                other => panic!("order {order}: unexpected {other}: {}", r.body),
            }
        }
    }
    assert_eq!(created.len(), DRIVERS.min(ORDERS));
    assert_eq!(refused, ORDERS - created.len());
    let used: BTreeSet<&str> = created.values().map(|m| str_of(m, "driver_id")).collect();
    assert_eq!(used.len(), created.len(), "a driver was matched twice");
    assert_eq!(
        used,
        drivers.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for (order, m) in &created {
        assert_eq!(&srv.get_match(order).await, m);
        let d = srv.driver(str_of(m, "driver_id")).await;
        assert_eq!(str_of(&d, "status"), "reserved");
        assert_eq!(str_of(&d, "order_id"), order);
    }
    for (order, _) in orders.iter().filter(|(o, _)| !created.contains_key(o)) {
        srv.get(&format!("/v1/matches/{order}"))
            .await
            .expect_error(404, "unknown_order");
    }
    assert_eq!(srv.engine().live_matches(), DRIVERS);
    let counts = srv.engine().counts();
    assert_eq!((counts.reserved, counts.available), (DRIVERS, 0));
    assert!(
        srv.engine()
            .drivers()
            .iter()
            .all(|d| d.status == Status::Reserved)
    );

    // Release everything concurrently: every driver is offered again.
    let mut tasks = Vec::new();
    for order in created.keys() {
        let api = srv.api();
        let path = format!("/v1/matches/{order}/release");
        tasks.push(tokio::spawn(async move { api.post_empty(&path).await }));
    }
    for task in tasks {
        assert_eq!(
            str_of(&task.await.unwrap().expect(200), "state"),
            "released"
        );
    }
    assert_eq!(srv.engine().counts().available, DRIVERS);
    assert_eq!(srv.engine().live_matches(), 0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_claims_make_one_match() {
    let srv = manual().await;
    for i in 0..5 {
        put_at(&srv, &format!("d{i}"), at(f64::from(i) * 0.1)).await;
    }
    let body = json!({"order_id": "same", "pickup": pickup(at(0.0))});
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let api = srv.api();
        let body = body.clone();
        tasks.push(tokio::spawn(async move { api.claim(&body).await }));
    }
    let mut statuses = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for task in tasks {
        let r = task.await.unwrap();
        let code = r.status.as_u16();
        assert!(code == 200 || code == 201, "{code}: {}", r.body);
        *statuses.entry(code).or_insert(0) += 1;
        seen.insert(r.expect(code).to_string());
    }
    assert_eq!(statuses.get(&201), Some(&1), "{statuses:?}");
    assert_eq!(seen.len(), 1, "different matches for one order: {seen:?}");
    assert_eq!(srv.engine().live_matches(), 1);
    assert_eq!(srv.engine().counts().reserved, 1);
    srv.shutdown().await;
}
