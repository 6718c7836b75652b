//! Fixes stamped by a device whose clock runs ahead: a `ts` more than
//! `max_clock_skew_ms` (default 5 min) ahead of the server's clock is
//! refused with `invalid_timestamp` on every way in (PUT, location,
//! batch, WebSocket), and changes nothing, so a bad phone clock cannot
//! freeze a driver at a stale position.

// Positions must round-trip exactly through JSON.
#![allow(clippy::float_cmp)]

use hexmatch::DriverId;
use hexmatch_tests::http::{TestServer, f64_of, str_of, t_str, test_config};
use serde_json::json;

const LOOP: (f64, f64) = (41.8786, -87.6251);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fix_stamped_in_the_future_is_refused_on_every_way_in() {
    let srv = TestServer::start_manual(test_config()).await;

    // The finding: one PUT stamped 2100 was accepted, and every correct
    // update after it was stale, `offline` included.
    let before = srv.snapshot(&[]);
    let r = srv
        .put_json(
            "/v1/drivers/poison",
            &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": "2100-01-01T00:00:00Z"}),
        )
        .await;
    r.expect_error(400, "invalid_timestamp");
    let message = str_of(&r.json()["error"], "message").to_owned();
    assert!(message.contains("73 years ahead"), "{message}");
    assert_eq!(srv.snapshot(&[]), before, "a refused PUT changed state");

    // Up to the limit is accepted; a millisecond past it is not.
    srv.put_driver(
        "d1",
        &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(300_000)}),
    )
    .await;
    let r = srv
        .post_json(
            "/v1/drivers/d1/location",
            &json!({"lat": 41.9, "lon": -87.6, "ts": t_str(300_001)}),
        )
        .await;
    r.expect_error(400, "invalid_timestamp");
    let d = srv.driver("d1").await;
    assert_eq!(f64_of(&d, "lat"), LOOP.0, "a refused move moved the driver");

    // A driver told offline with a correct clock goes offline.
    srv.put_driver("d2", &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(0)}))
        .await;
    let r = srv
        .put_json(
            "/v1/drivers/d2",
            &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": "2100-01-01T00:00:00Z", "status": "available"}),
        )
        .await;
    r.expect_error(400, "invalid_timestamp");
    let d = srv
        .put_driver(
            "d2",
            &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(1_000), "status": "offline"}),
        )
        .await;
    assert_eq!(d["status"], "offline", "{d}");

    // A batch: the future item is rejected with its index, the others apply.
    let tally = srv
        .post_json(
            "/v1/locations",
            &json!([
                {"driver_id": "b1", "lat": LOOP.0, "lon": LOOP.1, "ts": "2100-01-01T00:00:00Z"},
                {"driver_id": "b2", "lat": LOOP.0, "lon": LOOP.1, "ts": t_str(2_000)},
            ]),
        )
        .await
        .expect(200);
    assert_eq!(tally["applied"], 1, "{tally}");
    assert_eq!(tally["rejected"][0]["index"], 0, "{tally}");
    assert_eq!(
        tally["rejected"][0]["error"]["code"], "invalid_timestamp",
        "{tally}"
    );
    let b1 = DriverId::new("b1").unwrap();
    assert!(srv.engine().driver(&b1).is_none());

    // The WebSocket stream: the same.
    let mut ws = srv.ws("ack_every=2").await;
    ws.send_json(
        &json!({"driver_id": "w1", "lat": LOOP.0, "lon": LOOP.1, "ts": "2100-01-01T00:00:00Z"}),
    )
    .await;
    ws.send_json(&json!({"driver_id": "w2", "lat": LOOP.0, "lon": LOOP.1, "ts": t_str(3_000)}))
        .await;
    let ack = ws.next_ack().await;
    assert_eq!(ack["applied"], 1, "{ack}");
    assert_eq!(ack["rejected"][0]["index"], 0, "{ack}");
    assert_eq!(
        ack["rejected"][0]["error"]["code"], "invalid_timestamp",
        "{ack}"
    );
    ws.close().await;
    assert!(srv.engine().driver(&DriverId::new("w1").unwrap()).is_none());
    srv.shutdown().await;
}

/// The setting is the server's: a wider skew admits what the default refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowed_skew_is_a_setting() {
    let srv = TestServer::start_manual(hexmatch_tests::http::ServeConfig {
        max_clock_skew_ms: 3_600_000,
        ..test_config()
    })
    .await;
    srv.put_driver(
        "d1",
        &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(3_000_000)}),
    )
    .await;
    let r = srv
        .put_json(
            "/v1/drivers/d2",
            &json!({"lat": LOOP.0, "lon": LOOP.1, "ts": t_str(3_600_001)}),
        )
        .await;
    r.expect_error(400, "invalid_timestamp");
    srv.shutdown().await;
}
