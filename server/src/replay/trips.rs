//! `hexmatch replay trips`: recorded trips through the matching engine, in
//! process or against a server, with a report and plots.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hexmatch::EngineConfig;
use hexmatch::sim::{
    Backend, BatchPolicy, Dispatch, Fleet, LocalBackend, NearestPolicy, OPERATIONS, SimConfig,
    SimError, SimOutcome, Simulation, fold_onto_day, parse_trips,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::http::{Http, HttpBackend};
use super::pace::{Millis, Pace, Pacer};
use super::plot;
use crate::CliError;

/// Samples of the fleet timeline a replay aims for (it never samples more
/// often than once a minute).
const TIMELINE_POINTS: u64 = 2000;

/// Dispatch policies of the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PolicyArg {
    /// Each order claims the nearest available driver at once.
    Nearest,
    /// Orders collect over `--window`, then are assigned together at the
    /// least total pickup distance.
    Batch,
}

/// Arguments of `hexmatch replay trips`.
#[derive(Debug, clap::Args)]
pub(crate) struct TripsArgs {
    /// The trips CSV (`trip_id,pickup_time,pickup_lat,pickup_lon,dropoff_time,dropoff_lat,dropoff_lon`,
    /// for example `data/chicago_trips.csv`).
    file: PathBuf,
    /// Drivers in the fleet, each starting at the pickup of a trip drawn with `--seed`.
    #[arg(long, default_value_t = 300)]
    drivers: usize,
    /// Driving speed, km/h.
    #[arg(long, default_value_t = 25.0)]
    speed_kmh: f64,
    /// Driven distance over straight-line distance (≥ 1).
    #[arg(long, default_value_t = 1.3)]
    detour: f64,
    /// Claim only drivers within this distance of the pickup, km (default:
    /// the engine's limit, 500 km).
    #[arg(long, value_name = "KM")]
    radius_km: Option<f64>,
    /// Dispatch policy.
    #[arg(long, value_enum, default_value_t = PolicyArg::Nearest)]
    policy: PolicyArg,
    /// Batch window (`--policy batch`), e.g. 10s.
    #[arg(long, default_value = "10s")]
    window: Millis,
    /// Nearest drivers each order of a batch considers, 1–100 (in process;
    /// a server uses its own, 16).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=100))]
    candidates: u8,
    /// How long an order waits for a driver before it is lost, e.g. 5m.
    #[arg(long, default_value = "5m")]
    patience: Millis,
    /// How long a claim holds a driver unconfirmed.
    #[arg(long, default_value = "30s")]
    hold: Millis,
    /// How long a driver takes to confirm a reservation (≥ --hold: all
    /// expire). Against a server, holds run on the server's own clock.
    #[arg(long, default_value = "0s")]
    accept: Millis,
    /// How often a moving driver reports its position.
    #[arg(long, default_value = "5s")]
    update_every: Millis,
    /// Seed of the fleet placement: the same seed and input give the same report.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fold the trips onto one day by time of day (the Chicago sample has
    /// about 8 trips a day over 4 years).
    #[arg(long)]
    fold_day: bool,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Write an SVG with the wait-time histogram and the fleet over time here.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Replay through the HTTP API of the server at this URL
    /// (`http://127.0.0.1:8080`) instead of an in-process engine.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// Bearer token for `--server`.
    #[arg(long, env = "HEXMATCH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Pace against the wall clock: `max` (as fast as possible) or a factor
    /// such as `60x` (a simulated minute per second).
    #[arg(long, default_value = "max")]
    realtime: Pace,
    /// Fail on the first bad row (exit status 2) instead of reporting and skipping it.
    #[arg(long)]
    strict: bool,
    /// Do not measure latencies and wall time: the report is then
    /// byte-for-byte the same on every run with the same input and seed.
    #[arg(long)]
    no_timings: bool,
    /// H3 resolution of the in-process engine's partition cells.
    #[arg(long, default_value_t = 6, env = "HEXMATCH_RESOLUTION")]
    resolution: u8,
}

fn sim_error(e: SimError) -> CliError {
    match e {
        SimError::Config(m) => CliError::Input(m),
        other => CliError::Other(other.to_string()),
    }
}

/// Runs `hexmatch replay trips`.
pub(crate) fn trips(args: &TripsArgs) -> Result<(), CliError> {
    let path = &args.file;
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    let file = parse_trips(&text).map_err(|e| CliError::input(path, e.line, e.message))?;
    if let Some(first) = file.rejected.first().filter(|_| args.strict) {
        return Err(CliError::input(path, first.line, &first.message));
    }
    for bad in file.rejected.iter().take(10) {
        eprintln!("skipped {}:{}: {}", path.display(), bad.line, bad.message);
    }
    if file.rejected.len() > 10 {
        eprintln!("… and {} more bad rows skipped", file.rejected.len() - 10);
    }
    if file.trips.is_empty() {
        return Err(CliError::Input(format!(
            "{}: no valid trips to replay",
            path.display()
        )));
    }
    let mut trips = file.trips;
    let folded = if args.fold_day {
        fold_onto_day(&mut trips)
    } else {
        None
    };
    let first = trips.iter().map(|t| t.pickup_time.as_millis()).min();
    let last = trips.iter().map(|t| t.pickup_time.as_millis()).max();
    let span_ms = u64::try_from(last.unwrap_or(0) - first.unwrap_or(0)).unwrap_or(0);
    let config = SimConfig {
        speed_kmh: args.speed_kmh,
        detour: args.detour,
        update_every_ms: args.update_every.0,
        heartbeat_ms: args.server.as_ref().map(|_| heartbeat_ms(args.realtime)),
        patience_ms: args.patience.0,
        hold_ms: args.hold.0,
        accept_ms: args.accept.0,
        radius_m: args.radius_km.map(|km| km * 1000.0),
        sample_every_ms: (span_ms / TIMELINE_POINTS).div_ceil(60_000).max(1) * 60_000,
        seed: args.seed,
        timings: !args.no_timings,
    };
    let policy: Box<dyn Dispatch> = match args.policy {
        PolicyArg::Nearest => Box::new(NearestPolicy),
        PolicyArg::Batch => Box::new(BatchPolicy {
            window_ms: args.window.0,
            candidates: usize::from(args.candidates),
        }),
    };
    let n_trips = trips.len();
    let fleet = Fleet::Sampled(args.drivers);
    let outcome = if let Some(url) = &args.server {
        let http = Http::new(url, args.api_token.clone()).map_err(CliError::Input)?;
        let backend = HttpBackend::new(http);
        let sim = Simulation::new(config, trips, fleet, policy, backend).map_err(sim_error)?;
        drive(sim, args.realtime, n_trips)
    } else {
        let backend = LocalBackend::new(EngineConfig {
            resolution: args.resolution,
            ..EngineConfig::default()
        })
        .map_err(|e| CliError::Input(format!("--resolution: {e}")))?;
        let sim = Simulation::new(config, trips, fleet, policy, backend).map_err(sim_error)?;
        drive(sim, args.realtime, n_trips)
    }
    .map_err(sim_error)?;
    print_summary(args, &outcome, file.rejected.len(), folded);
    if let Some(out) = &args.report {
        std::fs::write(out, outcome.report.to_json())
            .map_err(|e| CliError::Other(format!("{}: {e}", out.display())))?;
    }
    if let Some(out) = &args.plot {
        let title = format!(
            "{} — {} trips{}, {} drivers, policy {}",
            file_name(path),
            n_trips,
            if folded.is_some() {
                " folded onto one day"
            } else {
                ""
            },
            args.drivers,
            outcome.report.policy
        );
        plot::write_svg(out, &outcome, &title).map_err(CliError::Other)?;
    }
    Ok(())
}

/// How often (simulated ms) idle drivers report to a server, so that its
/// driver TTL (120 s of wall time by default) never removes them: every
/// 60 wall seconds at a known pace, every 10 simulated minutes at `max`
/// (far more often than every 2 wall minutes unless the server crawls;
/// start it with `--driver-ttl-s 0` to be sure). In process nothing
/// expires drivers, so no heartbeats are sent there.
fn heartbeat_ms(pace: Pace) -> u64 {
    match pace {
        Pace::Max => 600_000,
        Pace::Times(f) => ((60_000.0 * f) as u64).max(60_000),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// Steps the simulation to its end at the requested pace, with a progress
/// bar on a terminal.
fn drive<B: Backend>(
    mut sim: Simulation<B>,
    pace: Pace,
    trips: usize,
) -> Result<SimOutcome, SimError> {
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(trips as u64), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} orders  {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut pacer = Pacer::new(pace);
    let mut steps: u64 = 0;
    while let Some(t) = sim.next_time() {
        pacer.wait_for(t);
        sim.step()?;
        steps += 1;
        if steps.is_multiple_of(512) || !matches!(pace, Pace::Max) {
            let p = sim.progress();
            bar.set_position(p.arrived as u64);
            bar.set_message(format!(
                "sim {}  served {}  lost {}  waiting {}  idle {}",
                p.now, p.served, p.unserved, p.waiting, p.idle
            ));
        }
    }
    bar.finish_and_clear();
    Ok(sim.finish())
}

fn print_summary(
    args: &TripsArgs,
    outcome: &SimOutcome,
    rejected: usize,
    folded: Option<hexmatch::Timestamp>,
) {
    let r = &outcome.report;
    println!("replayed {}", args.file.display());
    match folded {
        Some(day) => println!(
            "  trips        {:>9}  folded onto {}",
            r.trips,
            &day.to_string()[..10]
        ),
        None => println!("  trips        {:>9}", r.trips),
    }
    if rejected > 0 {
        println!("  bad rows     {rejected:>9}  skipped");
    }
    println!(
        "  fleet        {:>9}  drivers at {} km/h × {} detour, seed {}",
        r.drivers, args.speed_kmh, args.detour, r.seed
    );
    match args.policy {
        PolicyArg::Nearest => {
            println!("  policy       {:>9}  patience {}", r.policy, args.patience);
        }
        PolicyArg::Batch => println!(
            "  policy       {:>9}  window {}, patience {}",
            r.policy, args.window, args.patience
        ),
    }
    println!("  served       {:>9}  ({:.2} %)", r.served, r.served_pct);
    println!("  unserved     {:>9}", r.unserved);
    println!(
        "  wait s       mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}",
        r.wait_s.mean, r.wait_s.p50, r.wait_s.p90, r.wait_s.p99
    );
    println!(
        "  pickup km    mean {:.3}  p50 {:.3}  p90 {:.3}",
        r.pickup_km.mean, r.pickup_km.p50, r.pickup_km.p90
    );
    println!(
        "  driven km    {:.1} empty, {:.1} loaded",
        r.empty_km_total, r.loaded_km_total
    );
    println!("  utilisation  {:>8.2} %", r.utilisation * 100.0);
    if args.no_timings {
        println!("  timings      off");
        return;
    }
    let what = if args.server.is_some() {
        "HTTP round trip"
    } else {
        "engine"
    };
    for op in OPERATIONS {
        if let Some(l) = r.engine_ns.get(op).filter(|l| l.p99 > 0) {
            println!("  {what} {op:<16} p50 {:>8} ns  p99 {:>9} ns", l.p50, l.p99);
        }
    }
    println!("  wall         {:>9.3} s", r.wall_s);
}
