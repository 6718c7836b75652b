//! Persistence against a real Redis: restart, round trip, corruption,
//! outage and stream ingestion. Each test runs its own `redis-server`
//! (unix socket, `--save ''`) or uses `REDIS_URL` with a unique key prefix.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{RedisServer, poll, unique_prefix};
use hexmatch::{
    Capabilities, ClaimRequest, Driver, DriverId, Engine, EngineConfig, OrderId, Position, Status,
    Timestamp, Vehicle,
};
use hexmatch_server::Server;
use redis::Commands;
use serde_json::{Value, json};

use common::redis_config as config;

async fn wait_ready(server: &Server) {
    let url = format!("http://{}/readyz", server.addr());
    for _ in 0..400 {
        if reqwest::get(&url).await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server never became ready");
}

async fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("http://{}{path}", server.addr()))
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn sorted_drivers(e: &Engine) -> Vec<Driver> {
    let mut d = e.drivers();
    d.sort_by(|a, b| a.id.cmp(&b.id));
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_drivers_and_live_matches() {
    restart_restores(false).await;
}

/// A node upgraded from the key layout before hash tags (`p:default:…`)
/// restores from the old keys once, and writes the new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_from_the_layout_before_hash_tags() {
    restart_restores(true).await;
}

/// Moves every key of the `default` namespace to the layout before hash
/// tags.
fn to_layout_before_tags(url: &str, prefix: &str) {
    let mut c = RedisServer::conn(url);
    let tagged = format!("{prefix}:{{ns:default}}:");
    let keys: Vec<String> = c.keys(format!("{tagged}*")).expect("keys");
    assert!(keys.len() >= 3, "{keys:?}");
    for k in keys {
        let old = format!("{prefix}:default:{}", &k[tagged.len()..]);
        let _: () = c.rename(&k, old).expect("rename");
    }
}

async fn restart_restores(layout_before_tags: bool) {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("restart");
    let a = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    wait_ready(&a).await;
    let (status, body) = post(
        &a,
        "/v1/locations",
        &Value::Array(common::chicago_drivers(2000, true)),
    )
    .await;
    assert_eq!((status, &body["applied"]), (200, &json!(2000)));
    for (i, o) in ["o1", "o2", "o3"].iter().enumerate() {
        let pickup = json!({"lat": 41.88 + i as f64 * 0.02, "lon": -87.63});
        let (s, _) = post(
            &a,
            "/v1/matches",
            &json!({"order_id": o, "pickup": pickup, "hold_ms": 600_000}),
        )
        .await;
        assert_eq!(s, 201);
    }
    assert_eq!(post(&a, "/v1/matches/o2/confirm", &json!({})).await.0, 200);
    assert_eq!(post(&a, "/v1/matches/o3/release", &json!({})).await.0, 200);
    let before = sorted_drivers(a.engine());
    let matches_before: Vec<_> = ["o1", "o2"]
        .iter()
        .map(|o| a.engine().get_match(&OrderId::new(o).expect("id")))
        .collect();
    a.shutdown().await; // writes a final snapshot
    if layout_before_tags {
        to_layout_before_tags(&url, &prefix);
    }

    let b = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    wait_ready(&b).await;
    assert_eq!(sorted_drivers(b.engine()), before);
    for (o, m) in ["o1", "o2"].iter().zip(matches_before) {
        let m = m.expect("was live");
        let back = b
            .engine()
            .get_match(&OrderId::new(o).expect("id"))
            .expect("restored");
        assert_eq!(
            (back.driver_id, back.state, back.reserved_until),
            (m.driver_id, m.state, m.reserved_until)
        );
    }
    assert!(
        b.engine()
            .get_match(&OrderId::new("o3").expect("id"))
            .is_none(),
        "released matches are not restored"
    );
    // The live matches are in the tagged layout now.
    let mut c = RedisServer::conn(&url);
    let mut live: Vec<String> = c
        .hkeys(format!("{prefix}:{{ns:default}}:matches"))
        .expect("hkeys");
    live.sort();
    assert_eq!(live, ["o1", "o2"]);
    b.shutdown().await;
}

fn mixed_drivers(n: usize) -> Vec<Driver> {
    (0..n)
        .map(|i| Driver {
            id: DriverId::new(&format!("drv-{i:07}")).expect("id"),
            pos: Position::new(
                41.6 + (i % 1009) as f64 * 0.0004,
                -87.9 + (i % 997) as f64 * 0.0004,
            )
            .expect("pos"),
            ts: Timestamp::from_millis(1_700_000_000_000 + i as i64).expect("ts"),
            status: [
                Status::Available,
                Status::Available,
                Status::Busy,
                Status::Offline,
            ][i % 4],
            vehicle: Vehicle::ALL[i % 6],
            capabilities: Capabilities::from_bits_truncate((i % 16) as u16),
            order_id: None,
            reserved_until: None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_120k_drivers_and_matches_is_exact() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("roundtrip");
    let p = common::persistence(&url, &prefix, "default", "n1").await;
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    engine.bulk_load(mixed_drivers(120_000)).expect("load");
    for i in 0..100 {
        let pickup = Position::new(41.7 + f64::from(i) * 0.002, -87.7).expect("pos");
        let req = ClaimRequest {
            hold_ms: 3_600_000,
            ..ClaimRequest::new(pickup)
        };
        engine
            .claim(&OrderId::new(&format!("o{i}")).expect("id"), &req)
            .expect("claims");
    }
    p.write_snapshot(&engine).await.expect("snapshot");
    p.resync_matches(&engine).await.expect("matches");

    let back = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    let restored = p.restore(&back).await.expect("restores");
    assert!(restored.warnings.is_empty(), "{:?}", restored.warnings);
    assert_eq!((restored.drivers, restored.matches), (120_000, 100));
    assert_eq!(sorted_drivers(&back), sorted_drivers(&engine));
    assert_eq!(back.counts(), engine.counts());
    let mut conn = RedisServer::conn(&url);
    let chunks: Vec<String> = conn
        .keys(format!("{prefix}:{{ns:default}}:snap:g[0-9]*"))
        .expect("keys");
    assert_eq!(chunks.len(), 3, "120k drivers in chunks of 50k");
}

/// A resync (after a failed write or an outage) must not undo a change
/// under way: a confirmation writes Redis first and acts in memory after,
/// so in between the engine still says "reserved". A resync that wrote
/// the engine's view then would leave Redis saying "reserved" for a match
/// whose confirmation was acknowledged. It leaves that order alone, syncs
/// every other, and comes back for it once the change is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_never_undoes_a_change_under_way() {
    use hexmatch::{DurableMatch, MatchState};
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("resync");
    let p = common::persistence(&url, &prefix, "default", "n1").await;
    let engine = Engine::new(EngineConfig::default()).expect("engine");
    engine.bulk_load(mixed_drivers(2_000)).expect("load");
    let orders: Vec<OrderId> = (0..12)
        .map(|i| OrderId::new(&format!("order-{i}")).expect("id"))
        .collect();
    for (i, o) in orders.iter().enumerate() {
        let pickup = Position::new(41.7 + i as f64 * 0.01, -87.7).expect("pos");
        let req = ClaimRequest {
            hold_ms: 3_600_000,
            ..ClaimRequest::new(pickup)
        };
        engine.claim(o, &req).expect("claims");
    }
    p.resync_matches(&engine).await.expect("resync");
    let hash = format!("{prefix}:{{ns:default}}:matches");
    let mut conn = RedisServer::conn(&url);
    let state = |conn: &mut redis::Connection, o: &OrderId| {
        let raw: Option<Vec<u8>> = conn.hget(&hash, o.as_str()).expect("hget");
        raw.map(|b| DurableMatch::decode(&b).expect("a record").m.state)
    };

    // The confirmation of the first order, under way: written, not acted.
    let confirming = &orders[0];
    let serial = p.lock_order(confirming).await;
    let mut rec = engine.durable_match(confirming).expect("live");
    rec.m.state = MatchState::Confirmed;
    p.put_match(&rec).await.expect("written first");
    // The other records were lost (a write failed): the resync's work.
    for o in &orders[1..] {
        let _: () = conn.hdel(&hash, o.as_str()).expect("hdel");
    }
    p.resync_matches(&engine).await.expect("resync");
    assert_eq!(
        state(&mut conn, confirming),
        Some(MatchState::Confirmed),
        "the resync undid an acknowledged confirmation"
    );
    for o in &orders[1..] {
        assert_eq!(
            state(&mut conn, o),
            Some(MatchState::Reserved),
            "{o} resynced"
        );
    }

    // The confirmation acts and lets go; its record is lost meanwhile. The
    // next health check resyncs the order it skipped.
    engine.confirm(confirming).expect("confirms");
    drop(serial);
    let _: () = conn.hdel(&hash, confirming.as_str()).expect("hdel");
    p.check_health(&engine).await;
    assert_eq!(state(&mut conn, confirming), Some(MatchState::Confirmed));
}

/// A reserved driver going offline in a batch (`POST /v1/locations`) or on
/// the Redis stream ends its match, and the match's record goes, as after
/// `PUT /v1/drivers/{id}`. A live record left behind would bring the match
/// back on restart, for a driver that a second order may hold by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_ending_its_match_in_a_batch_or_the_stream_deletes_the_record() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("side-end");
    let a = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    wait_ready(&a).await;
    let (status, _) = post(
        &a,
        "/v1/locations",
        &Value::Array(common::chicago_drivers(500, true)),
    )
    .await;
    assert_eq!(status, 200);
    let mut held = Vec::new();
    for (i, o) in ["by-batch", "by-stream"].iter().enumerate() {
        let pickup = json!({"lat": 41.88 + i as f64 * 0.03, "lon": -87.63});
        let (s, m) = post(
            &a,
            "/v1/matches",
            &json!({"order_id": o, "pickup": pickup, "hold_ms": 600_000}),
        )
        .await;
        assert_eq!(s, 201, "{m}");
        held.push(m["driver_id"].as_str().expect("driver").to_owned());
    }
    let hash = format!("{prefix}:{{ns:default}}:matches");
    let mut conn = RedisServer::conn(&url);
    let record = |conn: &mut redis::Connection, o: &str| {
        conn.hexists::<_, _, bool>(&hash, o).expect("hexists")
    };
    assert!(record(&mut conn, "by-batch") && record(&mut conn, "by-stream"));

    let offline = json!([{"driver_id": held[0], "lat": 41.9, "lon": -87.65, "status": "offline"}]);
    let (status, tally) = post(&a, "/v1/locations", &offline).await;
    assert_eq!((status, &tally["applied"]), (200, &json!(1)), "{tally}");
    let _: String = redis::cmd("XADD")
        .arg(format!("{prefix}:locations"))
        .arg("*")
        .arg(&[
            ("driver_id", held[1].as_str()),
            ("lat", "41.9"),
            ("lon", "-87.65"),
            ("status", "offline"),
        ])
        .query(&mut conn)
        .expect("xadd");
    let ended = |o: &str| {
        a.engine()
            .get_match(&OrderId::new(o).expect("id"))
            .is_some_and(|m| !m.state.is_live())
    };
    poll(10, "both matches ended by their drivers", || {
        (ended("by-batch") && ended("by-stream")).then_some(())
    });
    poll(10, "both records gone", || {
        let mut conn = RedisServer::conn(&url);
        (!record(&mut conn, "by-batch") && !record(&mut conn, "by-stream")).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_snapshot_falls_back_to_the_previous_generation_or_starts_empty() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("corrupt");
    let p = common::persistence(&url, &prefix, "default", "n1").await;
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    engine.bulk_load(mixed_drivers(1000)).expect("load");
    p.write_snapshot(&engine).await.expect("gen 1");
    engine.remove(&DriverId::new("drv-0000000").expect("id"));
    p.write_snapshot(&engine).await.expect("gen 2");
    let mut conn = RedisServer::conn(&url);
    // Flip a byte in the middle of generation 2's chunk.
    let () = conn
        .setrange(format!("{prefix}:{{ns:default}}:snap:g2:0"), 100, "\u{1}")
        .expect("setrange");
    let back = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    let r = p.restore(&back).await.expect("restore runs");
    assert_eq!(
        (r.generation, r.drivers),
        (Some(1), 1000),
        "fell back to generation 1"
    );
    assert!(
        r.warnings.iter().any(|w| w.contains("checksum")),
        "{:?}",
        r.warnings
    );

    // Truncate generation 1 too: nothing loads, the error is reported, no panic.
    let () = conn
        .set(format!("{prefix}:{{ns:default}}:snap:g1:0"), "short")
        .expect("set");
    let empty = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    let r = p.restore(&empty).await.expect("restore runs");
    assert_eq!((r.generation, r.drivers), (None, 0));
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert!(empty.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_refuses_matches_keeps_serving_and_recovers() {
    // This test stops its Redis, so it always runs a private one.
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("outage");
    let server = hexmatch_server::start(config(&redis.url, &prefix))
        .await
        .expect("starts");
    wait_ready(&server).await;
    assert_eq!(
        post(
            &server,
            "/v1/locations",
            &Value::Array(common::chicago_drivers(500, true))
        )
        .await
        .0,
        200
    );
    let order =
        json!({"order_id": "before", "pickup": {"lat": 41.88, "lon": -87.63}, "hold_ms": 600_000});
    assert_eq!(post(&server, "/v1/matches", &order).await.0, 201);

    redis.stop();
    let readyz = format!("http://{}/readyz", server.addr());
    let degraded = async {
        for _ in 0..400 {
            let r = reqwest::get(&readyz).await.expect("server answers");
            if r.status() == 503 {
                return r.json::<Value>().await.expect("json");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("readyz never reported the outage");
    }
    .await;
    assert_eq!(
        (degraded["status"].as_str(), degraded["redis"].as_str()),
        (Some("degraded"), Some("down"))
    );
    let during = json!({"order_id": "during", "pickup": {"lat": 41.88, "lon": -87.63}});
    let (s, body) = post(&server, "/v1/matches", &during).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (503, Some("unavailable"))
    );
    assert!(
        server
            .engine()
            .get_match(&OrderId::new("during").expect("id"))
            .is_none(),
        "refused means unchanged"
    );
    let (s, _) = post(&server, "/v1/matches/before/release", &json!({})).await;
    assert_eq!(
        s, 503,
        "ending a match is refused too while it cannot be made durable"
    );
    let near = reqwest::get(format!(
        "http://{}/v1/drivers/nearest?lat=41.88&lon=-87.63&k=3",
        server.addr()
    ))
    .await
    .expect("sent");
    assert_eq!(near.status(), 200, "nearest keeps serving from memory");
    assert_eq!(
        post(
            &server,
            "/v1/drivers/c000001/location",
            &json!({"lat": 41.9, "lon": -87.6})
        )
        .await
        .0,
        200
    );

    redis.restart(); // empty: it keeps nothing on disk
    let url = redis.url.clone();
    let live = tokio::task::spawn_blocking(move || {
        poll(20, "resync and snapshot after recovery", || {
            let mut c = RedisServer::conn(&url);
            let matches: Vec<String> = c.hkeys(format!("{prefix}:{{ns:default}}:matches")).ok()?;
            let manifest: Option<Vec<u8>> = c
                .get(format!("{prefix}:{{ns:default}}:snap:manifest"))
                .ok()?;
            (matches == ["before"] && manifest.is_some()).then_some(matches)
        })
    })
    .await
    .expect("poll");
    assert_eq!(live, ["before"]);
    assert_eq!(reqwest::get(&readyz).await.expect("sent").status(), 200);
    assert_eq!(
        post(&server, "/v1/matches", &during).await.0,
        201,
        "matching works again"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_updates_are_applied_acknowledged_or_dead_lettered() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("stream");
    let server = hexmatch_server::start(config(&url, &prefix))
        .await
        .expect("starts");
    wait_ready(&server).await;
    let stream = format!("{prefix}:locations");
    let mut conn = RedisServer::conn(&url);
    let mut pipe = redis::pipe();
    common::xadd_drivers(
        &mut pipe,
        &stream,
        &common::chicago_drivers(1500, true),
        &[("capabilities", "cash,pets")],
    );
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("driver_id")
        .arg("bad one")
        .arg("lat")
        .arg("1")
        .arg("lon")
        .arg("1")
        .ignore();
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("driver_id")
        .arg("x")
        .arg("lat")
        .arg("91")
        .arg("lon")
        .arg("1")
        .ignore();
    pipe.cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("driver_id")
        .arg("y")
        .arg("lat")
        .arg("1")
        .arg("lon")
        .arg("1")
        .arg("colour")
        .arg("red")
        .ignore();
    let () = pipe.query(&mut conn).expect("xadd");
    let engine = Arc::clone(server.engine());
    let dead = format!("{stream}:dead");
    let url2 = url.clone();
    tokio::task::spawn_blocking(move || {
        poll(20, "ingestion", || {
            let mut c = RedisServer::conn(&url2);
            let dead_len: usize = c.xlen(&dead).ok()?;
            (engine.len() == 1500 && dead_len == 3).then_some(())
        });
    })
    .await
    .expect("poll");
    let d = server
        .engine()
        .driver(&DriverId::new("c000001").expect("id"))
        .expect("ingested");
    assert_eq!(d.capabilities, "cash,pets".parse().expect("caps"));
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("hexmatch")
        .query(&mut conn)
        .expect("xpending");
    let redis::Value::Array(summary) = pending else {
        panic!("unexpected XPENDING reply {pending:?}")
    };
    assert_eq!(
        summary.first(),
        Some(&redis::Value::Int(0)),
        "everything acknowledged"
    );
    let entries: redis::streams::StreamRangeReply =
        conn.xrange_all(format!("{stream}:dead")).expect("xrange");
    let codes: Vec<String> = entries
        .ids
        .iter()
        .map(|e| e.get::<String>("error_code").expect("code"))
        .collect();
    assert_eq!(codes, ["invalid_id", "invalid_position", "invalid_json"]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_consumer_are_reclaimed() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("reclaim");
    let p = common::persistence(&url, &prefix, "default", "alive").await;
    p.ensure_group().await.expect("group");
    let mut conn = RedisServer::conn(&url);
    for i in 0..20 {
        let _: String = conn
            .xadd(
                p.stream_key(),
                "*",
                &[
                    ("driver_id", format!("r{i}")),
                    ("lat", "41.9".into()),
                    ("lon", "-87.6".into()),
                ],
            )
            .expect("xadd");
    }
    // A consumer reads them and dies before acknowledging.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("hexmatch")
        .arg("dead-node")
        .arg("COUNT")
        .arg(100)
        .arg("STREAMS")
        .arg(p.stream_key())
        .arg(">")
        .query(&mut conn)
        .expect("read");
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    assert_eq!(
        p.ingest_once(
            &engine,
            hexmatch_server::service::apply_stream_entries,
            100,
            10,
            None
        )
        .await
        .expect("read new"),
        0,
        "nothing new for us"
    );
    assert_eq!(
        p.ingest_once(
            &engine,
            hexmatch_server::service::apply_stream_entries,
            100,
            10,
            Some(Duration::ZERO)
        )
        .await
        .expect("reclaim"),
        20
    );
    assert_eq!(engine.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_redis_answers_and_restore_is_done_v1_is_not_ready() {
    // Its own Redis, stopped before the node starts.
    let mut redis = RedisServer::start();
    redis.stop();
    let prefix = unique_prefix("boot");
    let server = hexmatch_server::start(config(&redis.url, &prefix))
        .await
        .expect("starts without redis");
    let base = format!("http://{}", server.addr());
    let ready = reqwest::get(format!("{base}/readyz")).await.expect("sent");
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.json::<Value>().await.expect("json")["status"],
        "not_ready"
    );
    let r = reqwest::get(format!("{base}/v1/drivers/nearest?lat=41.88&lon=-87.63"))
        .await
        .expect("sent");
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "not_ready"
    );
    assert_eq!(
        reqwest::get(format!("{base}/livez"))
            .await
            .expect("sent")
            .status(),
        200,
        "alive all the same"
    );

    redis.restart();
    wait_ready(&server).await;
    let r = reqwest::get(format!("{base}/v1/drivers/nearest?lat=41.88&lon=-87.63"))
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    server.shutdown().await;
}
