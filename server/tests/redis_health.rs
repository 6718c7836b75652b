//! Readiness tells the truth about persistence, against a real Redis:
//! snapshots that keep failing make the node `degraded` (and it recovers
//! by itself), a failed generation leaves no keys, a garbled generation
//! counter is repaired by the next snapshot, a key of the wrong type is
//! named, and drivers loaded at start are snapshotted before the node
//! says it is ready.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{RedisServer, unique_prefix};
use hexmatch_server::{ServeConfig, Server};
use redis::Commands;
use serde_json::Value;

use common::redis_config as config;

/// Status and body of `/readyz`.
async fn readyz(server: &Server) -> (u16, Value) {
    let r = reqwest::get(format!("http://{}/readyz", server.addr()))
        .await
        .expect("sent");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

/// Polls `/readyz` until `want` holds for it (30 s at most).
async fn readyz_until(server: &Server, what: &str, want: impl Fn(u16, &Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..600 {
        let (status, body) = readyz(server).await;
        if want(status, &body) {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: /readyz never got there; last: {last}");
}

async fn load(server: &Server, n: usize) {
    let drivers = common::chicago_drivers(n, false);
    let client = reqwest::Client::new();
    for chunk in drivers.chunks(10_000) {
        let r = client
            .post(format!("http://{}/v1/locations", server.addr()))
            .json(&chunk)
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 200);
    }
}

/// Generations of the snapshot chunk keys in Redis, and those the two
/// manifests name.
fn generations(conn: &mut redis::Connection, prefix: &str) -> (HashSet<u64>, HashSet<u64>) {
    let keys: Vec<String> = conn
        .keys(format!("{prefix}:{{ns:default}}:snap:g*"))
        .expect("keys");
    let stored = keys
        .iter()
        .filter_map(|k| k.rsplit(":snap:g").next()?.split(':').next()?.parse().ok())
        .collect();
    let mut named = HashSet::new();
    for m in ["snap:manifest", "snap:manifest:prev"] {
        // A manifest key of the wrong type names nothing.
        let raw: Option<Vec<u8>> = conn
            .get(format!("{prefix}:{{ns:default}}:{m}"))
            .unwrap_or(None);
        if let Some(m) = raw.and_then(|b| hexmatch::Manifest::decode(&b).ok()) {
            named.insert(m.generation);
        }
    }
    (stored, named)
}

/// Only the generations the manifests name have chunks in Redis (an
/// in-flight snapshot may add its own for a moment: polled).
async fn assert_no_chunks_of_failed_generations(conn: &mut redis::Connection, prefix: &str) {
    let mut last = (HashSet::new(), HashSet::new());
    for _ in 0..200 {
        last = generations(conn, prefix);
        if last.0.is_subset(&last.1) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "chunks of failed generations left: stored {:?}, named {:?}",
        last.0, last.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_snapshots_make_the_node_degraded_until_they_succeed_and_leave_nothing() {
    // Its own Redis: the test changes its memory limit.
    let redis = RedisServer::start();
    let prefix = unique_prefix("oom");
    let server = hexmatch_server::start(config(&redis.url, &prefix))
        .await
        .expect("starts");
    readyz_until(&server, "ready", |s, _| s == 200).await;
    load(&server, 120_000).await;
    readyz_until(&server, "a snapshot of the drivers", |_, b| {
        b["snapshot_failures"] == 0 && b["last_snapshot_age_s"].as_f64().is_some_and(|a| a < 0.5)
    })
    .await;

    // Redis at its memory limit refuses every write that needs memory.
    let mut conn = RedisServer::conn(&redis.url);
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut conn)
        .expect("info");
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .exec(&mut conn)
        .expect("policy");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 64 * 1024)
        .exec(&mut conn)
        .expect("maxmemory");
    let body = readyz_until(&server, "degraded", |s, b| {
        s == 503 && b["status"] == "degraded"
    })
    .await;
    let reason = body["reason"].as_str().expect("a reason");
    assert!(reason.contains("snapshots failed"), "{body}");
    assert!(body["snapshot_failures"].as_u64() >= Some(3), "{body}");

    // Memory back: the next snapshot succeeds and the node is ready again.
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(0)
        .exec(&mut conn)
        .expect("maxmemory");
    readyz_until(&server, "ready again", |s, b| {
        s == 200 && b["status"] == "ready" && b["snapshot_failures"] == 0
    })
    .await;
    assert_no_chunks_of_failed_generations(&mut conn, &prefix).await;
    server.shutdown().await;
}

/// A snapshot refused after its chunks were written (here: the manifest
/// key holds a hash) leaves none of its chunks behind, names the key, and
/// the node recovers once the key is right again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_refused_after_its_chunks_leaves_none_of_them() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("leftover");
    let server = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    readyz_until(&server, "ready", |s, _| s == 200).await;
    load(&server, 60_000).await;
    readyz_until(&server, "a snapshot of the drivers", |_, b| {
        b["snapshot_failures"] == 0 && b["last_snapshot_age_s"].as_f64().is_some_and(|a| a < 0.5)
    })
    .await;
    let mut conn = RedisServer::conn(&url);
    let manifest_key = format!("{prefix}:{{ns:default}}:snap:manifest");
    // Swap the manifest for a hash between two snapshots.
    let _: () = redis::cmd("RENAME")
        .arg(&manifest_key)
        .arg(format!("{manifest_key}:saved"))
        .query(&mut conn)
        .expect("rename");
    let _: () = conn.hset(&manifest_key, "not", "a manifest").expect("hset");
    let body = readyz_until(&server, "degraded", |s, b| {
        s == 503 && b["status"] == "degraded"
    })
    .await;
    let reason = body["reason"].as_str().expect("a reason");
    assert!(
        reason.contains(&manifest_key) && reason.contains("wrong type"),
        "{body}"
    );
    let _: () = conn.del(&manifest_key).expect("del");
    let _: () = redis::cmd("RENAME")
        .arg(format!("{manifest_key}:saved"))
        .arg(&manifest_key)
        .query(&mut conn)
        .expect("rename back");
    readyz_until(&server, "ready again", |s, b| {
        s == 200 && b["snapshot_failures"] == 0
    })
    .await;
    assert_no_chunks_of_failed_generations(&mut conn, &prefix).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_generation_counter_is_repaired_by_the_next_snapshot() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("gen");
    let server = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    readyz_until(&server, "ready", |s, _| s == 200).await;
    load(&server, 1_000).await;
    let mut conn = RedisServer::conn(&url);
    let gen_key = format!("{prefix}:{{ns:default}}:snap:gen");
    let _: () = conn.set(&gen_key, "garbage").expect("set");
    let before = generations(&mut conn, &prefix).1;
    // A snapshot after the garbling, under a generation past every named one.
    for _ in 0..600 {
        let named = generations(&mut conn, &prefix).1;
        if named.iter().max() > before.iter().max() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = generations(&mut conn, &prefix).1;
    assert!(
        after.iter().max() > before.iter().max(),
        "no snapshot since: {before:?} -> {after:?}"
    );
    let counter: u64 = conn.get(&gen_key).expect("a number again");
    assert!(counter >= *after.iter().max().expect("a generation"));
    let (status, body) = readyz(&server).await;
    assert_eq!(
        (status, &body["snapshot_failures"]),
        (200, &Value::from(0)),
        "{body}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_the_wrong_type_is_named_until_it_is_fixed() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("wrongtype");
    let mut conn = RedisServer::conn(&url);
    let matches_key = format!("{prefix}:{{ns:default}}:matches");
    let _: () = conn.set(&matches_key, "not a hash").expect("set");
    let server = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    let body = readyz_until(&server, "the key named", |s, b| {
        s == 503
            && b["reason"]
                .as_str()
                .is_some_and(|r| r.contains(&matches_key))
    })
    .await;
    assert_eq!(body["status"], "not_ready", "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("wrong type")),
        "{body}"
    );
    let _: () = conn.del(&matches_key).expect("del");
    readyz_until(&server, "ready once fixed", |s, _| s == 200).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_loaded_at_start_are_snapshotted_before_ready() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("loadsnap");
    let dir = std::env::temp_dir().join(format!("hexmatch-loadsnap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let csv = dir.join("drivers.csv");
    std::fs::write(
        &csv,
        "driver_id,lat,lon\nd1,41.88,-87.63\nd2,41.89,-87.62\n",
    )
    .expect("csv");
    let server = hexmatch_server::start(ServeConfig {
        load_drivers: Some(csv),
        // No interval snapshot during the test.
        snapshot_interval_ms: 3_600_000,
        ..config(&url, &prefix)
    })
    .await
    .expect("starts");
    readyz_until(&server, "ready", |s, _| s == 200).await;
    let mut conn = RedisServer::conn(&url);
    let raw: Option<Vec<u8>> = conn
        .get(format!("{prefix}:{{ns:default}}:snap:manifest"))
        .expect("get");
    let manifest = hexmatch::Manifest::decode(&raw.expect("a snapshot at start")).expect("valid");
    assert_eq!(manifest.drivers, 2);
    server.shutdown().await;
    std::fs::remove_dir_all(&dir).ok();
}

/// A node with no drivers snapshots like any other (it used to fail every
/// interval on an empty pipeline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_node_snapshots_without_errors() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("empty");
    let server = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    let mut conn = RedisServer::conn(&url);
    let body = readyz_until(&server, "three snapshots", |_, _| {
        generations(&mut RedisServer::conn(&url), &prefix)
            .1
            .iter()
            .any(|g| *g >= 3)
    })
    .await;
    assert_eq!(body["snapshot_failures"], 0, "{body}");
    let raw: Option<Vec<u8>> = conn
        .get(format!("{prefix}:{{ns:default}}:snap:manifest"))
        .expect("get");
    let manifest = hexmatch::Manifest::decode(&raw.expect("a manifest")).expect("valid");
    assert_eq!(manifest.drivers, 0);
    server.shutdown().await;
}
