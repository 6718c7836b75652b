//! `examples/dispatch.py`, the standard-library Python client of the
//! README, run against a real server with auth on and the Chicago
//! drivers: it follows the event feed, reserves a driver per order and
//! confirms each one when the feed announces it.

use std::process::Command;

use hexmatch_server::ServeConfig;
use hexmatch_tests::http::{TestServer, test_config};
use hexmatch_tests::{data_path, load_chicago_pickups};
use serde_json::{Value, json};

const TOKEN: &str = "example-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_reserves_and_confirms_from_the_event_feed() {
    let srv = TestServer::start(ServeConfig {
        api_tokens: vec![TOKEN.into()],
        ..test_config()
    })
    .await
    .with_token(TOKEN);
    let drivers: Vec<Value> = load_chicago_pickups()
        .into_iter()
        .take(2000)
        .map(|(trip, pos)| json!({"driver_id": format!("d-{trip}"), "lat": pos.lat(), "lon": pos.lon()}))
        .collect();
    srv.post_json("/v1/locations", &json!(drivers))
        .await
        .expect(200);
    let script = data_path("../examples/dispatch.py");
    let base = srv.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--url", &base, "--token", TOKEN, "--count", "20"])
            .args([
                "--orders",
                data_path("chicago_trips.csv").to_str().expect("utf-8"),
            ])
            .output()
            .expect("python3 runs")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("orders 20, reserved 20, confirmed 20, driver.status events 40"),
        "{stdout}"
    );
    for i in [0, 19] {
        let m = srv.get(&format!("/v1/matches/py-{i:04}")).await.expect(200);
        assert_eq!(m["state"], "confirmed", "{m}");
    }
}
