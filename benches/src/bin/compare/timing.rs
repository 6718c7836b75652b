//! Timed runs: `c` clients issue the same query set as fast as they can
//! for a fixed time, each query timed on its own; and the servers' CPU
//! time over the run, from `/proc/…/schedstat`.

use std::fs;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hexmatch::Engine;
use hexmatch_benches::Percentiles;

use crate::answers::Case;
use crate::peers::Conn;

/// One system at one concurrency.
#[derive(Debug, Clone)]
pub(crate) struct Timed {
    /// The system's name in the table.
    pub(crate) system: String,
    /// Concurrent clients.
    pub(crate) concurrency: usize,
    /// Queries answered in the timed window (warm-up excluded).
    pub(crate) queries: u64,
    /// Queries that failed.
    pub(crate) errors: u64,
    /// The timed window.
    pub(crate) elapsed: Duration,
    /// Latency of each query.
    pub(crate) latency: Option<Percentiles>,
    /// CPU time the server spent in the window (ns), where measurable.
    pub(crate) server_cpu_ns: Option<u64>,
    /// Round trips per query (Redis with an expanding radius makes several).
    pub(crate) round_trips: f64,
}

impl Timed {
    /// Queries per second.
    pub(crate) fn qps(&self) -> f64 {
        self.queries as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The run plan shared by every system.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Untimed seconds before the window.
    pub(crate) warmup: Duration,
    /// The timed window.
    pub(crate) window: Duration,
}

/// CPU time of one thread or single-threaded process, from its
/// `schedstat` (nanoseconds on the CPU).
pub(crate) fn schedstat_ns(path: &Path) -> Option<u64> {
    fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time of every thread of process `pid` (or of this process) whose
/// name starts with `prefix` (every thread when `None`).
pub(crate) fn threads_cpu_ns(pid: Option<u32>, prefix: Option<&str>) -> Option<u64> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".to_owned(),
    };
    let mut total = 0;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if let Some(prefix) = prefix {
            let comm = fs::read_to_string(path.join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
        }
        total += schedstat_ns(&path.join("schedstat")).unwrap_or(0);
    }
    Some(total)
}

/// The calling thread's CPU time.
fn this_thread_cpu_ns() -> Option<u64> {
    schedstat_ns(Path::new("/proc/thread-self/schedstat"))
}

/// What one client did in the window.
struct ClientRun {
    samples: Vec<u64>,
    errors: u64,
    round_trips: u64,
    first: Instant,
    last: Instant,
    cpu_ns: Option<u64>,
}

fn merge(
    system: &str,
    concurrency: usize,
    runs: Vec<ClientRun>,
    server_cpu_ns: Option<u64>,
) -> Timed {
    let first = runs.iter().map(|r| r.first).min();
    let last = runs.iter().map(|r| r.last).max();
    let elapsed = first
        .zip(last)
        .map_or(Duration::ZERO, |(f, l)| l.saturating_duration_since(f));
    let errors = runs.iter().map(|r| r.errors).sum();
    let trips: u64 = runs.iter().map(|r| r.round_trips).sum();
    let mut samples: Vec<u64> = runs.into_iter().flat_map(|r| r.samples).collect();
    let queries = samples.len() as u64;
    Timed {
        system: system.to_owned(),
        concurrency,
        queries,
        errors,
        elapsed,
        latency: Percentiles::of(&mut samples),
        server_cpu_ns,
        round_trips: trips as f64 / queries.max(1) as f64,
    }
}

/// Where client `w` of `c` starts in the query set, so clients do not
/// ask the same query at the same moment.
fn start_index(w: usize, c: usize, len: usize) -> usize {
    w * len / c.max(1)
}

/// hexmatch in-process: `c` threads calling [`Engine::nearest`]. The
/// "server CPU" is the query threads' own CPU time.
pub(crate) fn run_in_process(engine: &Engine, cases: &[Case], c: usize, plan: Plan) -> Timed {
    let warm_end = Instant::now() + Duration::from_millis(20) + plan.warmup;
    let end = warm_end + plan.window;
    let runs: Vec<ClientRun> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..c)
            .map(|w| {
                s.spawn(move || {
                    let mut i = start_index(w, c, cases.len());
                    while Instant::now() < warm_end {
                        black_box(engine.nearest(&cases[i].query).ok());
                        i = (i + 1) % cases.len();
                    }
                    let cpu0 = this_thread_cpu_ns();
                    let first = Instant::now();
                    let mut samples = Vec::with_capacity(1 << 20);
                    let mut errors = 0;
                    let mut last = first;
                    while last < end {
                        let t0 = Instant::now();
                        let found = engine.nearest(&cases[i].query);
                        last = Instant::now();
                        errors += u64::from(black_box(found).is_err());
                        samples.push((last - t0).as_nanos() as u64);
                        i = (i + 1) % cases.len();
                    }
                    let cpu_ns = this_thread_cpu_ns()
                        .zip(cpu0)
                        .map(|(b, a)| b.saturating_sub(a));
                    ClientRun {
                        samples,
                        errors,
                        round_trips: 0,
                        first,
                        last,
                        cpu_ns,
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("query threads do not panic"))
            .collect()
    });
    let cpu = runs.iter().map(|r| r.cpu_ns).sum::<Option<u64>>();
    let mut t = merge("hexmatch in-process", c, runs, cpu);
    t.round_trips = 0.0;
    t
}

/// A network peer: `conns` (one per client) query the server for the
/// window; `server_cpu` reads the server's CPU time.
pub(crate) async fn run_clients(
    system: &str,
    conns: Vec<Conn>,
    cases: Arc<[Case]>,
    plan: Plan,
    server_cpu: impl Fn() -> Option<u64>,
) -> Timed {
    let c = conns.len();
    let warm_end = tokio::time::Instant::now() + Duration::from_millis(20) + plan.warmup;
    let end = (warm_end + plan.window).into_std();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, mut conn)| {
            let cases = Arc::clone(&cases);
            tokio::spawn(async move {
                let mut i = start_index(w, c, cases.len());
                let warm_std = warm_end.into_std();
                while Instant::now() < warm_std {
                    black_box(conn.nearest(&cases[i]).await.ok());
                    i = (i + 1) % cases.len();
                }
                let trips0 = conn.round_trips();
                let first = Instant::now();
                let mut samples = Vec::with_capacity(1 << 18);
                let mut errors = 0;
                let mut last = first;
                while last < end {
                    let t0 = Instant::now();
                    let got = conn.nearest(&cases[i]).await;
                    last = Instant::now();
                    if black_box(got).is_err() {
                        errors += 1;
                        if errors > 1000 {
                            break;
                        }
                    } else {
                        samples.push((last - t0).as_nanos() as u64);
                    }
                    i = (i + 1) % cases.len();
                }
                let run = ClientRun {
                    samples,
                    errors,
                    round_trips: conn.round_trips() - trips0,
                    first,
                    last,
                    cpu_ns: None,
                };
                // The connection is handed back so that it (and a
                // per-connection server process, like a PostgreSQL
                // backend) outlives the final CPU reading.
                (run, conn)
            })
        })
        .collect();
    tokio::time::sleep_until(warm_end).await;
    let cpu0 = server_cpu();
    let mut runs = Vec::with_capacity(c);
    let mut open = Vec::with_capacity(c);
    for t in tasks {
        let (run, conn) = t.await.expect("client tasks do not panic");
        runs.push(run);
        open.push(conn);
    }
    let cpu = server_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    drop(open);
    merge(system, c, runs, cpu)
}
