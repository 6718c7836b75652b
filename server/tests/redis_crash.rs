//! Crash test: `hexmatch serve` as a child process, killed with SIGKILL in
//! the middle of ingestion, restarted on the same Redis. Drivers come back
//! (up to the last snapshot) and every acknowledged reservation is intact.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::{Node, RedisServer, poll, unique_prefix};
use serde_json::{Value, json};

fn start_node(url: &str, prefix: &str) -> Node {
    Node::spawn(&[
        "--redis-url",
        url,
        "--redis-prefix",
        prefix,
        "--snapshot-interval-ms",
        "200",
        "--driver-ttl-s",
        "0",
    ])
}

fn post(http: &reqwest::blocking::Client, url: String, body: &Value) -> (u16, Value) {
    let r = http.post(url).json(body).send().expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Acknowledged reservations (every fourth confirmed): (order, driver, state).
fn make_matches(
    http: &reqwest::blocking::Client,
    base: &str,
) -> Vec<(String, String, &'static str)> {
    let mut held = Vec::new();
    for i in 0..40 {
        let order = format!("o{i}");
        let pickup = json!({"lat": 41.80 + f64::from(i) * 0.005, "lon": -87.65});
        let body = json!({"order_id": order, "pickup": pickup, "hold_ms": 3_600_000});
        let (s, m) = post(http, format!("{base}/v1/matches"), &body);
        assert_eq!(s, 201, "{m}");
        let mut state = "reserved";
        if i % 4 == 0 {
            assert_eq!(
                post(
                    http,
                    format!("{base}/v1/matches/{order}/confirm"),
                    &json!({})
                )
                .0,
                200
            );
            state = "confirmed";
        }
        held.push((
            order,
            m["driver_id"].as_str().expect("driver").to_owned(),
            state,
        ));
    }
    held
}

/// Posts location batches until stopped; counts the accepted ones.
fn ingest_until_stopped(base: &str, all: &[Value], stop: &AtomicBool, sent: &AtomicUsize) {
    let http = reqwest::blocking::Client::new();
    for round in 0..2000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let shift = 0.0001 * f64::from(round % 7);
        let moved: Vec<Value> = all
            .iter()
            .take(200)
            .map(|d| json!({"driver_id": d["driver_id"], "lat": d["lat"].as_f64().unwrap_or(0.0) + shift, "lon": d["lon"]}))
            .collect();
        if http
            .post(format!("{base}/v1/locations"))
            .json(&moved)
            .send()
            .is_ok()
        {
            sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// After the restart: every driver and acknowledged match is back, and new
/// orders never get a held driver.
fn check_restored(http: &reqwest::blocking::Client, base: &str, held: &[(String, String, &str)]) {
    let regions: Value = http
        .get(format!("{base}/v1/regions"))
        .send()
        .expect("sent")
        .json()
        .expect("json");
    assert_eq!(
        regions[0]["drivers"].as_u64(),
        Some(3000),
        "every driver of the last snapshot is back"
    );
    for (order, driver, state) in held {
        let m: Value = http
            .get(format!("{base}/v1/matches/{order}"))
            .send()
            .expect("sent")
            .json()
            .expect("json");
        assert_eq!(
            (m["driver_id"].as_str(), m["state"].as_str()),
            (Some(driver.as_str()), Some(*state)),
            "{order}"
        );
        let d: Value = http
            .get(format!("{base}/v1/drivers/{driver}"))
            .send()
            .expect("sent")
            .json()
            .expect("json");
        let want = if *state == "reserved" {
            "reserved"
        } else {
            "busy"
        };
        assert_eq!(
            (d["status"].as_str(), d["order_id"].as_str()),
            (Some(want), Some(order.as_str()))
        );
    }
    let held_drivers: HashSet<&str> = held.iter().map(|(_, d, _)| d.as_str()).collect();
    for i in 0..100 {
        let pickup = json!({"lat": 41.80 + f64::from(i) * 0.002, "lon": -87.65});
        let (s, m) = post(
            http,
            format!("{base}/v1/matches"),
            &json!({"order_id": format!("new{i}"), "pickup": pickup}),
        );
        assert_eq!(s, 201, "{m}");
        assert!(
            !held_drivers.contains(m["driver_id"].as_str().expect("driver")),
            "{m} reuses a held driver"
        );
    }
}

#[test]
fn sigkill_mid_ingest_loses_no_acknowledged_reservation() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("crash");
    let http = reqwest::blocking::Client::new();
    let mut node = start_node(&url, &prefix);
    let all = common::chicago_drivers(3000, false);
    assert_eq!(
        post(
            &http,
            format!("{}/v1/locations", node.base),
            &Value::Array(all.clone())
        )
        .0,
        200
    );
    let held = make_matches(&http, &node.base);
    poll(30, "a full snapshot", || {
        let text = http
            .get(format!("{}/metrics", node.base))
            .send()
            .ok()?
            .text()
            .ok()?;
        let n: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("hexmatch_snapshot_drivers "))?
            .trim()
            .parse()
            .ok()?;
        (n >= 3000.0).then_some(())
    });

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, sent, base) = (Arc::clone(&stop), Arc::clone(&sent), node.base.clone());
        std::thread::spawn(move || ingest_until_stopped(&base, &all, &stop, &sent))
    };
    poll(30, "ingestion under way", || {
        (sent.load(Ordering::Relaxed) >= 5).then_some(())
    });
    node.signal("KILL");
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");

    let node = start_node(&url, &prefix);
    check_restored(&http, &node.base, &held);
}
