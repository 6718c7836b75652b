//! HTTP API, `/metrics`: the documented Prometheus series, checked against
//! known traffic. Alone in its test binary, so that one server is the only
//! writer of a process-wide metrics recorder.

#![allow(
    clippy::float_cmp, // positions must round-trip exactly through JSON
    clippy::too_many_lines
)]

use hexmatch_tests::http::{TestServer, metric_sum, poll_until, t_str, test_config};

async fn manual() -> TestServer {
    TestServer::start_manual(test_config()).await
}
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_documented_series() {
    let srv = manual().await;
    for i in 0..3 {
        srv.put_driver(
            &format!("m{i}"),
            &json!({"lat": 41.88, "lon": -87.63 + f64::from(i) * 0.001}),
        )
        .await;
    }
    srv.put_driver(
        "mbusy",
        &json!({"lat": 41.88, "lon": -87.64, "status": "busy"}),
    )
    .await;
    let v = srv
        .post_json(
            "/v1/drivers/m0/location",
            &json!({"lat": 41.881, "lon": -87.63, "ts": t_str(5)}),
        )
        .await
        .expect(200);
    assert_eq!(v["applied"], json!(true));
    srv.claim(&json!({"order_id": "o1", "pickup": {"lat": 41.88, "lon": -87.63}}))
        .await
        .expect(201);
    for _ in 0..3 {
        srv.get("/v1/drivers/nearest?lat=41.88&lon=-87.63")
            .await
            .expect(200);
    }
    // A method of the client's own invention is counted as `other`, so
    // clients cannot create label values.
    let brew = reqwest::Method::from_bytes(b"BREW").unwrap();
    let r = srv
        .send(srv.request(brew, "/v1/drivers/nearest?lat=41.88&lon=-87.63"))
        .await;
    assert_eq!(r.status.as_u16(), 405, "{}", r.body);

    // Gauges may be refreshed by the background task: poll until they agree.
    let text = poll_until("metrics to reflect the drivers", async || {
        let r = srv.get("/metrics").await;
        assert_eq!(r.status.as_u16(), 200, "{}", r.body);
        let available = metric_sum(&r.body, "hexmatch_drivers", &[("status", "available")]);
        (available == Some(2.0)).then_some(r)
    })
    .await;
    assert!(
        text.content_type().starts_with("text/plain"),
        "metrics content type {:?}",
        text.content_type()
    );
    let body = &text.body;
    assert_eq!(
        metric_sum(body, "hexmatch_drivers", &[("status", "reserved")]),
        Some(1.0)
    );
    assert_eq!(
        metric_sum(body, "hexmatch_drivers", &[("status", "busy")]),
        Some(1.0)
    );
    // Counters are at least what this server saw (a process-wide recorder
    // may also count other servers of the same test binary).
    let applied = metric_sum(
        body,
        "hexmatch_location_updates_total",
        &[("result", "applied")],
    );
    assert!(applied.is_some_and(|n| n >= 1.0), "{applied:?}");
    let requests = metric_sum(body, "hexmatch_http_requests_total", &[]);
    assert!(requests.is_some_and(|n| n >= 6.0), "{requests:?}");
    let route = ("route", "/v1/drivers/nearest");
    let nearest_ok = metric_sum(
        body,
        "hexmatch_http_requests_total",
        &[route, ("method", "GET"), ("status", "200")],
    );
    assert!(nearest_ok.is_some_and(|n| n >= 3.0), "{nearest_ok:?}");
    let other = metric_sum(
        body,
        "hexmatch_http_requests_total",
        &[("method", "other"), ("status", "405")],
    );
    assert!(other.is_some_and(|n| n >= 1.0), "{other:?}\n{body}");
    assert!(
        !body.contains("BREW"),
        "a client-made method label:\n{body}"
    );
    let matches = metric_sum(body, "hexmatch_matches_total", &[]);
    assert!(matches.is_some_and(|n| n >= 1.0), "{matches:?}");
    // Latency histogram (per route).
    assert!(
        body.contains("hexmatch_http_request_duration_seconds_bucket")
            || body.contains("hexmatch_http_request_duration_seconds{"),
        "latency is neither a histogram nor a summary:\n{body}"
    );
    // Every series has its help text, and the build and the process are there.
    for name in [
        "hexmatch_drivers",
        "hexmatch_http_requests_total",
        "hexmatch_location_updates_total",
        "hexmatch_http_request_duration_seconds",
        "hexmatch_process_resident_memory_bytes",
        "hexmatch_build_info",
    ] {
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no help for {name}:\n{body}"
        );
    }
    let rss = metric_sum(body, "hexmatch_process_resident_memory_bytes", &[]);
    assert!(rss.is_some_and(|b| b > 1e6), "{rss:?}");
    let fds = metric_sum(body, "hexmatch_process_open_fds", &[]);
    assert!(fds.is_some_and(|n| n >= 3.0), "{fds:?}");
    assert_eq!(
        metric_sum(
            body,
            "hexmatch_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    srv.shutdown().await;
}
