//! HTTP API, `GET /v1/locations/stream`: a real WebSocket client sends
//! update frames; the server acks by count (`ack_every`) and by time (at
//! least once per second while updates arrive). Bad frames are rejected
//! items, not disconnects, and change nothing; frame indexes count over the
//! whole connection. Real data: Chicago pickups streamed in, then a nearest
//! query over HTTP equals the oracle.

#![allow(
    clippy::float_cmp, // positions must round-trip exactly through JSON
    clippy::too_many_lines
)]

use hexmatch::{Driver, NearestQuery, Position};
use hexmatch_tests::http::{
    AckTotals, ServeConfig, TestServer, chicago_drivers, f64_of, latlon, str_of, t, t_str,
    test_config,
};
use hexmatch_tests::oracle_nearest;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_is_acked_with_ack_every_1() {
    let srv = TestServer::start_manual(test_config()).await;
    srv.put_driver(
        "old",
        &json!({"lat": 41.88, "lon": -87.63, "ts": t_str(1000)}),
    )
    .await;
    let mut ws = srv.ws("ack_every=1").await;

    // New driver with attributes.
    ws.send_json(&json!({"driver_id": "w1", "lat": 41.9, "lon": -87.65,
                         "ts": t(10).as_millis(), "vehicle": "scooter",
                         "capabilities": ["pets"], "status": "available"}))
        .await;
    assert_eq!(
        ws.next_ack().await,
        json!({"applied": 1, "stale": 0, "rejected": []})
    );
    let d = srv.driver("w1").await;
    assert_eq!(str_of(&d, "vehicle"), "scooter");
    assert_eq!(str_of(&d, "ts"), t_str(10));

    // Stale.
    let before = srv.snapshot(&[]);
    ws.send_json(&json!({"driver_id": "old", "lat": 0.0, "lon": 0.0, "ts": t_str(999)}))
        .await;
    assert_eq!(
        ws.next_ack().await,
        json!({"applied": 0, "stale": 1, "rejected": []})
    );
    assert_eq!(srv.snapshot(&[]), before);

    // Not JSON: a rejected item with its index; the connection stays up.
    let i = ws.send_text("this is not json").await;
    assert_eq!(i, 2);
    let mut totals = AckTotals::default();
    totals.add(&ws.next_ack().await);
    assert_eq!(totals.rejected, [(2, "invalid_json".to_owned())]);
    assert_eq!((totals.applied, totals.stale), (0, 0));
    assert_eq!(srv.snapshot(&[]), before);

    // A move of an existing driver.
    ws.send_json(&json!({"driver_id": "old", "lat": 41.7, "lon": -87.7, "ts": t_str(2000)}))
        .await;
    assert_eq!(
        ws.next_ack().await,
        json!({"applied": 1, "stale": 0, "rejected": []})
    );
    let d = srv.driver("old").await;
    assert_eq!((f64_of(&d, "lat"), f64_of(&d, "lon")), (41.7, -87.7));
    ws.close().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_rejected_items_and_change_nothing() {
    let srv = TestServer::start_manual(test_config()).await;
    srv.put_driver("d1", &json!({"lat": 41.88, "lon": -87.63, "ts": t_str(0)}))
        .await;
    let mut ws = srv.ws("ack_every=1").await;
    let before = srv.snapshot(&[]);
    let frames: [(&str, &[&str]); 10] = [
        ("{\"driver_id\": \"x1\", \"lat\": ", &["invalid_json"]),
        ("[]", &["invalid_json", "invalid_parameter"]),
        (
            r#"{"driver_id": "x2", "lat": 91, "lon": 0}"#,
            &["invalid_position"],
        ),
        (
            r#"{"driver_id": "x 3", "lat": 1, "lon": 0}"#,
            &["invalid_id"],
        ),
        (
            r#"{"driver_id": "x4", "lat": 1, "lon": 0, "ts": "soon"}"#,
            &["invalid_timestamp"],
        ),
        (
            r#"{"driver_id": "x5", "lat": 1, "lon": 0, "status": "reserved"}"#,
            &["invalid_parameter"],
        ),
        (
            r#"{"driver_id": "x6", "lat": 1, "lon": 0, "vehicle": "boat"}"#,
            &["invalid_parameter"],
        ),
        (
            r#"{"driver_id": "x7", "lat": 1, "lon": 0, "capabilities": ["x"]}"#,
            &["invalid_parameter"],
        ),
        (
            r#"{"lat": 1, "lon": 0}"#,
            &["invalid_json", "invalid_parameter", "invalid_id"],
        ),
        (
            r#"{"driver_id": "d1", "lat": 1, "lon": 500, "ts": 5}"#,
            &["invalid_position"],
        ),
    ];
    for (i, (frame, codes)) in frames.iter().enumerate() {
        let index = ws.send_text(frame).await;
        assert_eq!(index, i as u64);
        let mut totals = AckTotals::default();
        totals.add(&ws.next_ack().await);
        assert_eq!((totals.applied, totals.stale), (0, 0), "{frame}");
        assert_eq!(totals.rejected.len(), 1, "{frame}");
        let (idx, code) = &totals.rejected[0];
        assert_eq!(*idx, i as u64, "{frame}");
        assert!(codes.contains(&code.as_str()), "{frame}: {code}");
        assert_eq!(srv.snapshot(&[]), before, "{frame} changed state");
    }
    // Still connected and working.
    ws.send_json(&json!({"driver_id": "ok", "lat": 41.9, "lon": -87.6}))
        .await;
    assert_eq!(
        ws.next_ack().await,
        json!({"applied": 1, "stale": 0, "rejected": []})
    );
    srv.driver("ok").await;
    ws.close().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_by_count_and_by_time() {
    let srv = TestServer::start_manual(test_config()).await;
    // ack_every=4, 10 frames: acks (by count, or by the one-second timer
    // when it fires first) cover exactly the 10 frames; index counts over
    // the whole connection.
    let mut ws = srv.ws("ack_every=4").await;
    for i in 0..10 {
        if i == 6 {
            ws.send_text("{oops").await;
        } else {
            ws.send_json(&json!({"driver_id": format!("c{i}"), "lat": 41.8, "lon": -87.6}))
                .await;
        }
    }
    let totals = ws.acks_until(10).await;
    assert_eq!(totals.applied, 9);
    assert_eq!(totals.stale, 0);
    assert_eq!(totals.rejected, [(6, "invalid_json".to_owned())]);
    assert!(totals.frames >= 2, "10 frames with ack_every=4: {totals:?}");
    assert_eq!(srv.engine().len(), 9);
    ws.close().await;

    // Default ack_every (100): three updates are acked by the timer.
    let mut ws = srv.ws("").await;
    for i in 0..3 {
        ws.send_json(&json!({"driver_id": format!("t{i}"), "lat": 41.8, "lon": -87.6}))
            .await;
    }
    let totals = ws.acks_until(3).await;
    assert_eq!((totals.applied, totals.stale), (3, 0));
    assert!(totals.rejected.is_empty());
    ws.close().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chicago_drivers_answer_nearest_like_the_oracle() {
    let srv = TestServer::start_manual(test_config()).await;
    let rows = chicago_drivers(2000);
    let mut ws = srv.ws("ack_every=100").await;
    for (_, body) in &rows {
        ws.send_json(body).await;
    }
    let totals = ws.acks_until(rows.len() as u64).await;
    assert_eq!(totals.applied, rows.len() as u64, "{totals:?}");
    ws.close().await;
    let drivers: Vec<Driver> = rows.into_iter().map(|(d, _)| d).collect();
    for d in drivers.iter().step_by(97) {
        let p = Position::new(d.pos.lat() + 0.002, d.pos.lon() + 0.003).unwrap();
        let want = oracle_nearest(&drivers, &NearestQuery::new(p, 30).unwrap(), 500_000.0);
        let got = srv.nearest(&format!("{}&k=30", latlon(p))).await;
        assert_eq!(got.len(), want.len());
        for (g, (id, dist)) in got.iter().zip(&want) {
            assert_eq!(str_of(g, "driver_id"), id.as_str());
            assert!((f64_of(g, "distance_m") - dist).abs() <= 1e-6);
        }
    }
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_needs_a_token_when_auth_is_on() {
    let srv = TestServer::start_manual(ServeConfig {
        api_tokens: vec!["tok".into()],
        ..test_config()
    })
    .await;
    for token in [None, Some("wrong")] {
        let refused = srv.ws_try("ack_every=1", token).await;
        let r = refused.expect_err("handshake without a valid token accepted");
        r.expect_error(401, "unauthorized");
    }
    let mut ws = match srv.ws_try("ack_every=1", Some("tok")).await {
        Ok(ws) => ws,
        Err(r) => panic!("handshake with the token refused: {r:?}"),
    };
    ws.send_json(&json!({"driver_id": "a1", "lat": 41.8, "lon": -87.6}))
        .await;
    assert_eq!(ws.next_ack().await["applied"], json!(1));
    ws.close().await;
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ack_every_is_refused() {
    let srv = TestServer::start_manual(test_config()).await;
    for query in ["ack_every=0", "ack_every=-1", "ack_every=many"] {
        let r = srv
            .ws_try(query, None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{query} accepted"));
        r.expect_error(400, "invalid_parameter");
    }
    srv.shutdown().await;
}

/// A WebSocket is not a request head: once upgraded, the connection
/// outlives the header-read timeout and keeps taking frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_outlives_the_header_read_timeout() {
    let srv = TestServer::start_manual(ServeConfig {
        header_read_timeout_ms: 200,
        idle_timeout_ms: 400,
        ..test_config()
    })
    .await;
    let mut ws = srv.ws("ack_every=1").await;
    for id in ["late", "later"] {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        ws.send_json(&json!({"driver_id": id, "lat": 41.9, "lon": -87.65}))
            .await;
        assert_eq!(
            ws.next_ack().await,
            json!({"applied": 1, "stale": 0, "rejected": []})
        );
    }
    srv.shutdown().await;
}
