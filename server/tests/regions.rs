//! Regions from `data/nyc_boroughs.geojson` over HTTP (ids are the file stem
//! plus the feature id: `nyc-boroughs-1` …): `/v1/regions` lists
//! the boroughs with their cells and drivers, water falls in an `outside-`
//! region, and a match carries its pickup's region.

use hexmatch_server::ServeConfig;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boroughs_are_regions() {
    let config = ServeConfig {
        bind: "127.0.0.1:0".parse().expect("valid"),
        resolution: 7,
        regions: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/nyc_boroughs.geojson").into()),
        ..ServeConfig::default()
    };
    let server = hexmatch_server::start(config).await.expect("starts");
    let base = format!("http://{}", server.addr());
    let http = reqwest::Client::new();
    let drivers = json!([
        {"driver_id": "times-square", "lat": 40.758, "lon": -73.9855},
        {"driver_id": "harbour", "lat": 40.66, "lon": -74.05},
    ]);
    let r = http
        .post(format!("{base}/v1/locations"))
        .json(&drivers)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);

    let regions: Vec<Value> = http
        .get(format!("{base}/v1/regions"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = regions
        .iter()
        .filter_map(|r| r["region"].as_str())
        .collect();
    assert_eq!(
        &ids[..5],
        [
            "nyc-boroughs-1",
            "nyc-boroughs-2",
            "nyc-boroughs-3",
            "nyc-boroughs-4",
            "nyc-boroughs-5"
        ],
        "{regions:?}"
    );
    assert_eq!(
        (regions[0]["name"].as_str(), regions[0]["drivers"].as_u64()),
        (Some("Manhattan"), Some(1))
    );
    assert!(regions[0]["cells"].as_u64().expect("cells") > 10);
    let outside: Vec<&Value> = regions
        .iter()
        .filter(|r| {
            r["region"]
                .as_str()
                .is_some_and(|s| s.starts_with("outside-"))
        })
        .collect();
    assert_eq!(outside.len(), 1, "{regions:?}");
    assert_eq!(outside[0]["drivers"].as_u64(), Some(1));

    let order = json!({"order_id": "o1", "pickup": {"lat": 40.7580, "lon": -73.9850}});
    let m: Value = http
        .post(format!("{base}/v1/matches"))
        .json(&order)
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(
        (m["driver_id"].as_str(), m["region"].as_str()),
        (Some("times-square"), Some("nyc-boroughs-1"))
    );
    let cluster: Value = http
        .get(format!("{base}/v1/cluster"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(cluster["regions"].as_array().map(Vec::len), Some(5));
    server.shutdown().await;
}

#[tokio::test]
async fn a_bad_regions_file_fails_the_start() {
    let dir = std::env::temp_dir().join(format!("hexmatch-regions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("bad.geojson");
    std::fs::write(
        &file,
        r#"{"features": [{"geometry": {"type": "Point", "coordinates": [0, 0]}}]}"#,
    )
    .expect("write");
    let config = ServeConfig {
        bind: "127.0.0.1:0".parse().expect("valid"),
        regions: Some(file),
        ..ServeConfig::default()
    };
    let err = hexmatch_server::start(config).await.expect_err("refused");
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("bad.geojson") && err.to_string().contains("Point"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
