//! `compare` — hexmatch side by side with what users would pick instead.
//!
//! One command loads the same drivers (the clustered 60 × 60 km Chicago set
//! of `hexmatch_benches::city_drivers`; its available half, since only
//! available drivers are offered) into:
//!
//! - hexmatch in-process ([`hexmatch::Engine::nearest`] from N threads);
//! - hexmatch over HTTP on loopback: the real server
//!   (`hexmatch_server::start`) in its own tokio runtime, queried by a bare
//!   keep-alive HTTP/1.1 client ([`http`]);
//! - Redis: a private `redis-server` the harness starts (no persistence),
//!   GEOADD, then `GEOSEARCH … BYRADIUS r m ASC COUNT k WITHDIST`, with the
//!   radius from hexmatch's k-th distance ("oracle", Redis's best case),
//!   one radius for the whole query set (its largest oracle radius:
//!   "fixed", what a one-round-trip client sends), or doubled from a start
//!   radius until k are found ("expand") ([`redis_peer`]);
//! - PostGIS, when the local PostgreSQL has it: a scratch database with a
//!   GiST index on a geography column, `ORDER BY geog <-> point LIMIT k`
//!   ([`pg`]).
//!
//! It checks that every peer's answers agree with hexmatch's exact ones
//! (up to ties within a tolerance: Redis stores 52-bit geohashes), then
//! runs the same jittered Chicago pickups against each system at each
//! concurrency for a fixed time, and prints throughput, latency
//! percentiles, server CPU per query and the ratios hexmatch ÷ peer.
//! Everything talks to loopback only, and everything it starts it stops.
//!
//! ```sh
//! cargo run --release -p hexmatch-benches --bin compare -- --drivers 100000 --seconds 3
//! ```
#![allow(
    clippy::doc_markdown,
    reason = "product names (PostGIS, PostgreSQL, GiST, GEOSEARCH) are prose here, not code"
)]

mod answers;
mod http;
mod peers;
mod pg;
mod redis_peer;
mod timing;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hexmatch::Status;
use hexmatch_benches::{chicago_pickups, city_drivers, jitter, measure_build};
use hexmatch_server::ServeConfig;

use crate::answers::{Agreement, Answer, Case};
use crate::peers::Conn;
use crate::timing::{Plan, Timed, run_clients, run_in_process, schedstat_ns, threads_cpu_ns};

/// Seed of the driver set (the same as the latency bench's).
const DRIVER_SEED: u64 = 7;
/// Seed of the pickup jitter.
const JITTER_SEED: u64 = 0x5EED;
/// Name prefix of the server runtime's threads (for their CPU time).
const SERVER_THREADS: &str = "hexmatch-srv";
/// Connections used for the agreement check.
const CHECK_CONNS: usize = 4;

/// hexmatch vs Redis GEOSEARCH vs PostGIS on the same drivers and queries.
#[derive(Debug, Parser)]
#[command(name = "compare", version, about)]
struct Args {
    /// Drivers in the clustered Chicago set (half of them available).
    #[arg(long, default_value_t = 1_000_000)]
    drivers: usize,
    /// Seconds each system is timed at each concurrency.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Untimed seconds before each timed run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Concurrent clients, comma-separated (each value is one run per system).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
    /// Drivers per query (1..=100, the HTTP API's range).
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Systems to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "hexmatch,http,redis,redis-fixed,redis-expand,postgis"
    )]
    systems: Vec<System>,
    /// Worker threads of the client runtime (the server runtime has one
    /// per core, as `hexmatch serve` does).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// Largest random offset of the query points from the real pickups, metres.
    #[arg(long, default_value_t = 300.0)]
    jitter_m: f64,
    /// Distances closer than this count as a tie when checking answers, metres.
    #[arg(long, default_value_t = 0.5)]
    tolerance_m: f64,
    /// First radius of the expanding Redis search, metres (doubled until k
    /// are found). Small, because GEOSEARCH sorts everything inside the
    /// radius: in a dense city a generous first radius costs more than a
    /// few extra round trips.
    #[arg(long, default_value_t = 50.0)]
    expand_from_m: f64,
    /// The `redis-server` binary to start.
    #[arg(
        long,
        env = "HEXMATCH_COMPARE_REDIS_SERVER",
        default_value = "redis-server"
    )]
    redis_server: PathBuf,
    /// Use this Redis (loopback or unix socket only) instead of starting one;
    /// the harness writes one key, `hexmatch-compare:<pid>:drivers`, and deletes it after.
    #[arg(long, env = "HEXMATCH_COMPARE_REDIS_URL")]
    redis_url: Option<String>,
    /// PostgreSQL (loopback or unix socket only) in which to create, use and
    /// drop a scratch database `hexmatch_compare_<pid>`.
    #[arg(
        long,
        env = "HEXMATCH_COMPARE_PG",
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    )]
    postgres: String,
}

/// A system under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum System {
    /// hexmatch in-process.
    Hexmatch,
    /// hexmatch over HTTP on loopback.
    Http,
    /// Redis GEOSEARCH with the "oracle" radius (one round trip).
    Redis,
    /// Redis GEOSEARCH with one radius for all queries: the largest
    /// oracle radius of the set (one round trip).
    RedisFixed,
    /// Redis GEOSEARCH with an expanding radius.
    RedisExpand,
    /// PostGIS KNN.
    Postgis,
}

/// Everything the report prints.
#[derive(Default)]
struct Report {
    runs: Vec<Timed>,
    agreement: Vec<(String, Agreement)>,
    /// system, items stored, bytes, load seconds.
    memory: Vec<(String, usize, Option<u64>, f64)>,
    notes: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            print_report(&args, &report);
            if report.agreement.iter().all(|(_, a)| a.ok()) {
                ExitCode::SUCCESS
            } else {
                eprintln!("compare: some answers disagree with hexmatch's (see above)");
                ExitCode::from(3)
            }
        }
        Err(e) => {
            eprintln!("compare: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<Report, String> {
    if !(1..=100).contains(&args.k) {
        return Err(format!("--k {} is not in 1..=100", args.k));
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        return Err("--concurrency needs positive values".into());
    }
    if let Some(url) = &args.redis_url
        && !redis_peer::is_local(url)
    {
        return Err(format!(
            "--redis-url {url} is not on this machine (loopback or unix socket only)"
        ));
    }
    let plan = Plan {
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        window: Duration::from_secs_f64(args.seconds.max(0.1)),
    };
    let (server_rt, client_rt) = runtimes(args.client_threads)?;

    // The server as `hexmatch serve` runs it (logging included), memory only.
    hexmatch_server::telemetry::init_logging();
    let config = ServeConfig {
        bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        driver_ttl_s: 0,
        ..ServeConfig::default()
    };
    let server = server_rt
        .block_on(hexmatch_server::start(config))
        .map_err(|e| format!("starting the hexmatch server: {e}"))?;
    let engine = Arc::clone(server.engine());

    let n = args.drivers;
    let mut report = Report::default();
    load_hexmatch(&engine, n, &mut report)?;
    let available: Vec<(String, f64, f64)> = city_drivers(n, DRIVER_SEED)
        .filter(|d| d.status == Status::Available)
        .map(|d| (d.id.to_string(), d.pos.lat(), d.pos.lon()))
        .collect();

    let points = jitter(&chicago_pickups(), args.jitter_m, JITTER_SEED);
    let (cases, expected) = answers::cases(&engine, server.addr(), &points, args.k);
    let cases: Arc<[Case]> = cases.into();
    println!(
        "queries: {} pickups from data/chicago_trips.csv, jittered by up to {} m, k = {}",
        cases.len(),
        args.jitter_m,
        args.k
    );

    let wants = |s: System| args.systems.contains(&s);
    if wants(System::Hexmatch) {
        for &c in &args.concurrency {
            let t = run_in_process(&engine, &cases, c, plan);
            print_run(&t);
            report.runs.push(t);
        }
    }
    if wants(System::Http) {
        let addr = server.addr();
        client_rt.block_on(http_runs(addr, args, plan, &cases, &expected, &mut report))?;
    }
    if wants(System::Redis) || wants(System::RedisExpand) {
        let max_m = engine.config().max_radius_m;
        redis_runs(
            args,
            plan,
            &client_rt,
            &available,
            &cases,
            &expected,
            max_m,
            &mut report,
        )?;
    }
    if wants(System::Postgis) {
        client_rt.block_on(postgis_runs(
            args,
            plan,
            &available,
            &cases,
            &expected,
            &mut report,
        ));
    }
    server_rt.block_on(server.shutdown());
    Ok(report)
}

/// The server runtime (one worker per core, as `hexmatch serve` has) and
/// the client runtime.
fn runtimes(
    client_threads: usize,
) -> Result<(tokio::runtime::Runtime, tokio::runtime::Runtime), String> {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(SERVER_THREADS)
        .enable_all()
        .build()
        .map_err(|e| format!("server runtime: {e}"))?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads.max(1))
        .thread_name("compare-client")
        .enable_all()
        .build()
        .map_err(|e| format!("client runtime: {e}"))?;
    Ok((server_rt, client_rt))
}

/// Bulk-loads the city set into the server's engine, noting time and memory.
fn load_hexmatch(engine: &hexmatch::Engine, n: usize, report: &mut Report) -> Result<(), String> {
    let (loaded, mem) = measure_build(n, || engine.bulk_load(city_drivers(n, DRIVER_SEED)));
    loaded.map_err(|e| format!("bulk load: {e}"))?;
    let counts = engine.counts();
    let build_s = mem.map_or(0.0, |m| m.build_time.as_secs_f64());
    println!(
        "hexmatch: {} drivers ({} available) in {} cells, bulk-loaded in {build_s:.2} s",
        counts.total(),
        counts.available,
        engine.cell_count(),
    );
    report.memory.push((
        format!("hexmatch (all {n} drivers, RSS growth)"),
        n,
        mem.map(|m| m.rss_after.saturating_sub(m.rss_before)),
        build_s,
    ));
    Ok(())
}

/// Runs every case once over `conns` and returns the answers in case order.
async fn answers_of(conns: Vec<Conn>, cases: &Arc<[Case]>) -> Result<Vec<Answer>, String> {
    let n = conns.len();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, mut conn)| {
            let cases = Arc::clone(cases);
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (w..cases.len()).step_by(n) {
                    out.push((i, conn.nearest(&cases[i]).await?));
                }
                Ok::<_, String>(out)
            })
        })
        .collect();
    let mut all = vec![Vec::new(); cases.len()];
    for t in tasks {
        for (i, a) in t.await.map_err(|e| e.to_string())?? {
            all[i] = a;
        }
    }
    Ok(all)
}

fn check(name: &str, expected: &[Answer], got: &[Answer], tol: f64, report: &mut Report) {
    let a = Agreement::of(expected, got, tol);
    println!(
        "{name}: {} answers checked: {} identical, {} equal up to ties within {tol} m, {} differ (max |Δd| {:.3} m)",
        a.checked, a.same, a.tied, a.differ, a.max_dev_m
    );
    for e in &a.examples {
        println!("  differs: {e}");
    }
    report.agreement.push((name.to_owned(), a));
}

async fn http_runs(
    addr: SocketAddr,
    args: &Args,
    plan: Plan,
    cases: &Arc<[Case]>,
    expected: &[Answer],
    report: &mut Report,
) -> Result<(), String> {
    let conns = |c: usize| async move {
        let mut v = Vec::with_capacity(c);
        for _ in 0..c {
            v.push(Conn::Http(http::Client::connect(addr).await?));
        }
        Ok::<_, String>(v)
    };
    let got = answers_of(conns(CHECK_CONNS).await?, cases).await?;
    check("hexmatch HTTP", expected, &got, args.tolerance_m, report);
    for &c in &args.concurrency {
        let t = run_clients(
            "hexmatch HTTP",
            conns(c).await?,
            Arc::clone(cases),
            plan,
            || threads_cpu_ns(None, Some(SERVER_THREADS)),
        )
        .await;
        print_run(&t);
        report.runs.push(t);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn redis_runs(
    args: &Args,
    plan: Plan,
    rt: &tokio::runtime::Runtime,
    available: &[(String, f64, f64)],
    cases: &Arc<[Case]>,
    expected: &[Answer],
    max_radius_m: f64,
    report: &mut Report,
) -> Result<(), String> {
    // The private server lives (and is killed on drop) until this returns.
    let private;
    let (url, pid) = if let Some(url) = &args.redis_url {
        (url.clone(), None)
    } else {
        private = redis_peer::PrivateRedis::start(&args.redis_server)?;
        (private.url.clone(), Some(private.pid()))
    };
    let key = format!("hexmatch-compare:{}:drivers", std::process::id());
    rt.block_on(async {
        let mut admin = redis_peer::connect(&url).await?;
        let before = redis_peer::used_memory(&mut admin).await?;
        let start = Instant::now();
        redis_peer::load(&mut admin, &key, available).await?;
        let load_s = start.elapsed().as_secs_f64();
        let after = redis_peer::used_memory(&mut admin).await?;
        println!(
            "redis: {} drivers GEOADDed in {load_s:.2} s ({})",
            available.len(),
            pid.map_or_else(
                || url.clone(),
                |p| format!("private redis-server, pid {p}, {url}")
            )
        );
        report.memory.push((
            "Redis GEO set (available drivers, used_memory growth)".into(),
            available.len(),
            Some(after.saturating_sub(before)),
            load_s,
        ));
        // The smallest single radius that gives every query of the set its
        // k drivers (queries with fewer than k in reach excluded).
        let fixed_m = cases
            .iter()
            .map(|c| c.oracle_radius_m)
            .filter(|&r| r < max_radius_m)
            .fold(0.0_f64, f64::max);
        println!("redis: one radius for all queries (redis-fixed): {fixed_m:.0} m");
        let fixed_name = format!("Redis GEOSEARCH (fixed radius {fixed_m:.0} m)");
        let modes = [
            (
                System::Redis,
                "Redis GEOSEARCH (oracle radius)",
                redis_peer::Radius::Oracle,
            ),
            (
                System::RedisFixed,
                fixed_name.as_str(),
                redis_peer::Radius::Fixed(fixed_m),
            ),
            (
                System::RedisExpand,
                "Redis GEOSEARCH (expanding radius)",
                redis_peer::Radius::Expand {
                    from_m: args.expand_from_m,
                    max_m: max_radius_m,
                },
            ),
        ];
        let result = async {
            for (system, name, radius) in modes {
                if !args.systems.contains(&system) {
                    continue;
                }
                let conns = |c: usize| {
                    let (url, key) = (url.clone(), key.clone());
                    async move {
                        let mut v = Vec::with_capacity(c);
                        for _ in 0..c {
                            v.push(Conn::Redis(
                                redis_peer::Client::connect(&url, &key, args.k, radius).await?,
                            ));
                        }
                        Ok::<_, String>(v)
                    }
                };
                let got = answers_of(conns(CHECK_CONNS).await?, cases).await?;
                check(name, expected, &got, args.tolerance_m, report);
                for &c in &args.concurrency {
                    let t = run_clients(name, conns(c).await?, Arc::clone(cases), plan, || {
                        pid.and_then(|p| threads_cpu_ns(Some(p), None))
                    })
                    .await;
                    print_run(&t);
                    report.runs.push(t);
                }
            }
            Ok::<_, String>(())
        }
        .await;
        // Only our own key, whichever server it is.
        let _: Result<(), _> = redis::cmd("UNLINK").arg(&key).query_async(&mut admin).await;
        result
    })
}

async fn postgis_runs(
    args: &Args,
    plan: Plan,
    available: &[(String, f64, f64)],
    cases: &Arc<[Case]>,
    expected: &[Answer],
    report: &mut Report,
) {
    let scratch = match pg::Scratch::create(&args.postgres).await {
        Ok(s) => s,
        Err(e) => {
            let note = format!("PostGIS not run: {e}");
            println!("{note}");
            report.notes.push(note);
            return;
        }
    };
    let result = async {
        let loaded = scratch.load(available).await?;
        println!(
            "postgis: {} drivers COPYed in {:.2} s, GiST index + ANALYZE in {:.2} s",
            available.len(),
            loaded.copy_s,
            loaded.index_s
        );
        report.memory.push((
            "PostGIS table + GiST index (available drivers)".into(),
            available.len(),
            Some(loaded.bytes),
            loaded.copy_s + loaded.index_s,
        ));
        let plan_text = scratch.explain(args.k).await?;
        if !plan_text.contains("Index Scan using drivers_geog") {
            report.notes.push(format!(
                "PostGIS plan does not use the GiST index:\n{plan_text}"
            ));
        }
        let conns = |c: usize| {
            let scratch = &scratch;
            async move {
                let mut v = Vec::with_capacity(c);
                let mut pids = Vec::with_capacity(c);
                for _ in 0..c {
                    let client = scratch.client(args.k).await?;
                    pids.push(client.backend_pid);
                    v.push(Conn::Pg(client));
                }
                Ok::<_, String>((v, pids))
            }
        };
        let got = answers_of(conns(CHECK_CONNS).await?.0, cases).await?;
        check("PostGIS KNN", expected, &got, args.tolerance_m, report);
        for &c in &args.concurrency {
            let (v, pids) = conns(c).await?;
            let cpu = move || {
                pids.iter()
                    .map(|p| schedstat_ns(std::path::Path::new(&format!("/proc/{p}/schedstat"))))
                    .sum::<Option<u64>>()
            };
            let t = run_clients("PostGIS KNN (GiST)", v, Arc::clone(cases), plan, cpu).await;
            print_run(&t);
            report.runs.push(t);
        }
        Ok::<_, String>(())
    }
    .await;
    if let Err(e) = result {
        let note = format!("PostGIS run failed: {e}");
        println!("{note}");
        report.notes.push(note);
    }
    scratch.drop_database().await;
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn print_run(t: &Timed) {
    let lat = t
        .latency
        .map_or_else(|| "no samples".to_owned(), |p| p.to_string());
    println!(
        "{:<36} c={:<3} {:>10.0} q/s  {lat}{}",
        t.system,
        t.concurrency,
        t.qps(),
        if t.errors > 0 {
            format!("  ERRORS {}", t.errors)
        } else {
            String::new()
        }
    );
}

fn print_report(args: &Args, r: &Report) {
    println!();
    println!(
        "## {} drivers, k = {}, {} s per run after {} s warm-up, client runtime {} thread(s)",
        args.drivers, args.k, args.seconds, args.warmup, args.client_threads
    );
    println!();
    println!(
        "| system | conc | queries | q/s | p50 µs | p99 µs | p99.9 µs | server CPU µs/q | trips/q | in-proc ÷ peer | HTTP ÷ peer |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let qps_of = |prefix: &str, c: usize| {
        r.runs
            .iter()
            .find(|t| t.system.starts_with(prefix) && t.concurrency == c)
            .map(Timed::qps)
    };
    for t in &r.runs {
        let ratio = |base: Option<f64>| {
            base.map_or_else(
                || "–".to_owned(),
                |b| format!("{:.1}×", b / t.qps().max(1e-9)),
            )
        };
        let (p50, p99, p999) = t
            .latency
            .map_or((0.0, 0.0, 0.0), |p| (us(p.p50), us(p.p99), us(p.p999)));
        let cpu = t.server_cpu_ns.map_or_else(
            || "–".to_owned(),
            |ns| format!("{:.1}", ns as f64 / 1000.0 / t.queries.max(1) as f64),
        );
        let trips = if t.round_trips > 0.0 {
            format!("{:.2}", t.round_trips)
        } else {
            "–".to_owned()
        };
        println!(
            "| {}{} | {} | {} | {:.0} | {p50:.1} | {p99:.1} | {p999:.1} | {cpu} | {trips} | {} | {} |",
            t.system,
            if t.errors > 0 {
                format!(" ({} errors)", t.errors)
            } else {
                String::new()
            },
            t.concurrency,
            t.queries,
            t.qps(),
            ratio(qps_of("hexmatch in-process", t.concurrency)),
            ratio(qps_of("hexmatch HTTP", t.concurrency)),
        );
    }
    println!();
    println!(
        "| answers vs hexmatch's exact ones | checked | identical | ties within {} m | differ | max abs Δd (m) |",
        args.tolerance_m
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, a) in &r.agreement {
        println!(
            "| {name} | {} | {} | {} | {} | {:.3} |",
            a.checked, a.same, a.tied, a.differ, a.max_dev_m
        );
    }
    println!();
    println!("| memory | items | bytes | bytes/item | load s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, items, bytes, load_s) in &r.memory {
        let (b, per) = bytes.map_or_else(
            || ("–".to_owned(), "–".to_owned()),
            |b| {
                (
                    b.to_string(),
                    format!("{:.0}", b as f64 / (*items).max(1) as f64),
                )
            },
        );
        println!("| {name} | {items} | {b} | {per} | {load_s:.2} |");
    }
    for n in &r.notes {
        println!();
        println!("note: {n}");
    }
}
