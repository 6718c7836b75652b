//! Memory of a big batch, against the real binary: 10,000 orders at one
//! pickup with 11,468 drivers around it are all served, and the server's
//! peak resident memory grows by less than the bound docs/API.md states.

mod common;

use common::Node;
use serde_json::{Value, json};

/// The stated bound on what one batch of 10,000 orders adds to the peak.
const PEAK_BOUND_MIB: u64 = 128;

#[test]
fn ten_thousand_co_located_orders_are_served_within_the_memory_bound() {
    let node = Node::spawn(&[]);
    let http = reqwest::blocking::Client::new();
    let (lat, lon) = (41.8786, -87.6251);
    let drivers: Vec<Value> = (0..11_468)
        .map(|i| {
            let r = 0.0001 * f64::from(i + 1).sqrt();
            let a = f64::from(i) * 2.4;
            json!({"driver_id": format!("d{i}"), "lat": lat + r * a.sin(), "lon": lon + r * a.cos()})
        })
        .collect();
    for chunk in drivers.chunks(5_000) {
        let r = http
            .post(format!("{}/v1/locations", node.base))
            .json(chunk)
            .send()
            .expect("locations");
        assert_eq!(r.status(), 200);
    }
    let (_, loaded_peak) = node.memory_mib();
    let orders: Vec<Value> = (0..10_000)
        .map(|i| json!({"order_id": format!("o{i}"), "pickup": {"lat": lat, "lon": lon}}))
        .collect();
    let r = http
        .post(format!("{}/v1/matches/batch", node.base))
        .json(&json!({"orders": orders}))
        .send()
        .expect("batch");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().expect("json");
    assert_eq!(v["matches"].as_array().expect("matches").len(), 10_000);
    assert_eq!(v["unmatched"], json!([]));
    let (_, peak) = node.memory_mib();
    assert!(
        peak <= loaded_peak + PEAK_BOUND_MIB,
        "a 10,000-order batch took the peak from {loaded_peak} to {peak} MiB"
    );
}
