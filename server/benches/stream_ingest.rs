//! Throughput of location ingestion from a Redis Stream (target:
//! ≥ 200 000 updates/s): a private redis-server, N entries added with
//! pipelined XADD, then drained through `Persistence::ingest_once`
//! (XREADGROUP COUNT 2000, read ahead of one ordered applier thread, acks in the background) into an engine.
//!
//! `cargo bench -p hexmatch-server --bench stream_ingest` (300k entries).
//! Without the `--bench` flag that `cargo bench` passes (that is, under
//! `cargo test --all-targets`, as CI runs it) it runs a 2k-entry smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Instant;

use hexmatch::{Engine, EngineConfig};
use hexmatch_server::persist::Persistence;

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let n: usize = if quick { 2_000 } else { 300_000 };
    let redis = common::RedisServer::start();
    let mut conn = common::RedisServer::conn(&redis.url);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let p = runtime
        .block_on(Persistence::connect(
            &redis.url,
            "bench",
            "default",
            "n1",
            hexmatch_server::persist::Durability::default(),
        ))
        .expect("connects");
    runtime.block_on(p.ensure_group()).expect("group");

    let added = Instant::now();
    for start in (0..n).step_by(10_000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 10_000).min(n) {
            let lat = 41.7 + (i % 1000) as f64 * 0.0003;
            let lon = -87.8 + (i / 1000 % 1000) as f64 * 0.0003;
            pipe.cmd("XADD")
                .arg(p.stream_key())
                .arg("*")
                .arg("driver_id")
                .arg(format!("d{}", i % 100_000))
                .arg("lat")
                .arg(lat.to_string())
                .arg("lon")
                .arg(lon.to_string())
                .ignore();
        }
        let () = pipe.query(&mut conn).expect("xadd");
    }
    let add_s = added.elapsed().as_secs_f64();

    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("config"));
    let started = Instant::now();
    let p2 = std::sync::Arc::clone(&p);
    let done = runtime
        .block_on(p2.ingest(
            &engine,
            hexmatch_server::service::apply_stream_entries,
            Some(n),
            std::time::Duration::from_secs(3600),
        ))
        .expect("ingest");
    assert_eq!(done, n);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "stream ingest: {n} updates in {secs:.3} s = {:.0} updates/s (XADD of the input: {:.0}/s); {} drivers",
        n as f64 / secs,
        n as f64 / add_s,
        engine.len()
    );
}
