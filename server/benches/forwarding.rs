//! The cost of a forwarded request against a local one, on
//! loopback: two `hexmatch serve --cluster` processes on one private
//! Redis; node `a` owns every Chicago community area, node `b` none. The
//! same sequential requests (one keep-alive connection) go to `a`
//! (served locally) and to `b` (forwarded to `a`, or for nearest, asked
//! of `a` by `b`'s border search), and the latencies are compared.
//!
//! `cargo bench -p hexmatch-server --bench forwarding` (5 000 requests per
//! case). Without the `--bench` flag (under `cargo test --all-targets`, as
//! CI runs it) it makes 100 requests per case as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

const REGIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/chicago_community_areas.geojson"
);

/// The client token, and the secret the nodes share (the production
/// configuration: both on).
const TOKEN: &str = "bench-token";
const SECRET: &str = "bench-cluster-secret-0123456789";

fn node(redis: &str, id: &str, own: &str) -> common::Node {
    let mut args = vec![
        "--api-tokens",
        TOKEN,
        "--cluster",
        "true",
        "--node-id",
        id,
        "--redis-url",
        redis,
        "--redis-prefix",
        "bench-forwarding",
        "--regions",
        REGIONS,
        "--resolution",
        "8",
        "--driver-ttl-s",
        "0",
        "--ingest-stream",
        "false",
    ];
    if !own.is_empty() {
        args.extend(["--own-regions", own]);
    }
    common::Node::spawn_with_env(&args, &[("HEXMATCH_CLUSTER_SECRET", SECRET)])
}

/// Sorted latencies of `n` calls of `f`, in microseconds.
fn time(n: usize, mut f: impl FnMut(usize)) -> Vec<f64> {
    let mut out: Vec<f64> = (0..n)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = if quick { 100 } else { 5_000 };
    let redis = common::RedisServer::start();
    let a = node(&redis.url, "a", "*");
    let b = node(&redis.url, "b", "");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().expect("header"),
    );
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()
        .expect("client");
    common::poll(30, "b to see a", || {
        let c: Value = http
            .get(format!("{}/v1/cluster", b.base))
            .send()
            .ok()?
            .json()
            .ok()?;
        (c["regions"].as_array().map_or(0, Vec::len) > 50).then_some(())
    });
    let drivers = common::chicago_drivers(2_000, false);
    for batch in drivers.chunks(500) {
        let r = http
            .post(format!("{}/v1/locations", a.base))
            .json(&batch)
            .send()
            .expect("load");
        assert!(r.status().is_success());
    }
    let move_to = |base: &str| {
        let (http, drivers) = (&http, &drivers);
        let base = base.to_owned();
        move |i: usize| {
            let d = &drivers[i % drivers.len()];
            let r = http
                .post(format!(
                    "{base}/v1/drivers/{}/location",
                    d["driver_id"].as_str().expect("id")
                ))
                .json(&json!({"lat": d["lat"], "lon": d["lon"]}))
                .send()
                .expect("sent");
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    let nearest_at = |base: &str| {
        let (http, drivers) = (&http, &drivers);
        let base = base.to_owned();
        move |i: usize| {
            let d = &drivers[(i * 7) % drivers.len()];
            let r = http
                .get(format!(
                    "{base}/v1/drivers/nearest?lat={}&lon={}&k=10",
                    d["lat"], d["lon"]
                ))
                .send()
                .expect("sent");
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    println!("forwarded vs local, {n} sequential requests each, loopback, 2 nodes + redis");
    println!(
        "{:<28} {:>9} {:>9} {:>9}",
        "case", "p50 µs", "p99 µs", "mean µs"
    );
    let mut rows = Vec::new();
    for (name, lat) in [
        ("location, local", time(n, move_to(&a.base))),
        ("location, forwarded", time(n, move_to(&b.base))),
        ("nearest k=10, local", time(n, nearest_at(&a.base))),
        ("nearest k=10, via b", time(n, nearest_at(&b.base))),
    ] {
        let mean = lat.iter().sum::<f64>() / lat.len() as f64;
        println!(
            "{name:<28} {:>9.0} {:>9.0} {:>9.0}",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            mean
        );
        rows.push(pct(&lat, 0.5));
    }
    println!(
        "p50 ratio forwarded/local: location {:.2}x, nearest {:.2}x",
        rows[1] / rows[0],
        rows[3] / rows[2]
    );
}
