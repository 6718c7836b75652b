//! `hexmatch replay positions`: a recorded position log through the engine.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hexmatch::{
    Applied, DriverId, DriverUpdate, Engine, EngineConfig, NearestQuery, Position, Timestamp,
};

use crate::CliError;

/// Arguments of `hexmatch replay positions`.
#[derive(Debug, clap::Args)]
pub(crate) struct PositionsArgs {
    /// The CSV position log (for example `data/nyharbor_ais_positions.csv`).
    file: PathBuf,
    /// Fail on the first bad row instead of reporting and skipping it.
    #[arg(long)]
    strict: bool,
    /// H3 resolution of the engine's partition cells.
    #[arg(long, default_value_t = 6, env = "HEXMATCH_RESOLUTION")]
    resolution: u8,
    /// How many nearest drivers to show for each sample point.
    #[arg(long, default_value_t = 5)]
    k: usize,
}

/// Column positions found in the header line.
struct Columns {
    id: usize,
    ts: Option<usize>,
    lat: usize,
    lon: usize,
}

impl Columns {
    fn from_header(path: &Path, header: &str) -> Result<Self, CliError> {
        let names: Vec<&str> = header.split(',').map(str::trim).collect();
        let find = |wanted: &[&str]| names.iter().position(|n| wanted.contains(n));
        let missing = |what: &str| {
            CliError::input(
                path,
                1,
                format!("header has no {what} column (found: {header})"),
            )
        };
        Ok(Self {
            id: find(&["driver_id", "vehicle_id"])
                .ok_or_else(|| missing("driver_id or vehicle_id"))?,
            ts: find(&["ts", "timestamp"]),
            lat: find(&["lat"]).ok_or_else(|| missing("lat"))?,
            lon: find(&["lon"]).ok_or_else(|| missing("lon"))?,
        })
    }

    fn parse(&self, line: &str) -> Result<DriverUpdate, String> {
        let fields: Vec<&str> = line.split(',').collect();
        let field = |i: usize, name: &str| {
            fields
                .get(i)
                .copied()
                .ok_or_else(|| format!("missing {name} field"))
        };
        let number = |i: usize, name: &str| -> Result<f64, String> {
            let raw = field(i, name)?;
            raw.trim()
                .parse::<f64>()
                .map_err(|_| format!("{name} {raw:?} is not a number"))
        };
        let id = DriverId::new(field(self.id, "id")?.trim()).map_err(|e| e.to_string())?;
        let pos = Position::new(number(self.lat, "lat")?, number(self.lon, "lon")?)
            .map_err(|e| e.to_string())?;
        let ts = match self.ts {
            Some(i) => Some(Timestamp::parse(field(i, "ts")?.trim()).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(DriverUpdate::location(id, pos, ts))
    }
}

/// Counts of a replay.
#[derive(Debug, Default)]
struct Tally {
    rows: usize,
    applied: usize,
    stale: usize,
    rejected: usize,
}

/// Runs `hexmatch replay positions`.
pub(crate) fn positions(args: &PositionsArgs) -> Result<(), CliError> {
    let engine = Engine::new(EngineConfig {
        resolution: args.resolution,
        ..EngineConfig::default()
    })
    .map_err(|e| CliError::Input(format!("--resolution: {e}")))?;
    let k_query = NearestQuery::new(
        Position::new(0.0, 0.0).map_err(|e| CliError::Other(e.to_string()))?,
        args.k,
    )
    .map_err(|e| CliError::Input(format!("--k: {e}")))?;
    let file = File::open(&args.file)
        .map_err(|e| CliError::Input(format!("{}: {e}", args.file.display())))?;
    let mut lines = BufReader::new(file).lines();
    let read_err = |line: usize, e: std::io::Error| CliError::input(&args.file, line, e);
    let header = match lines.next() {
        Some(h) => h.map_err(|e| read_err(1, e))?,
        None => {
            return Err(CliError::input(
                &args.file,
                1,
                "the file is empty; expected a header line",
            ));
        }
    };
    let columns = Columns::from_header(&args.file, &header)?;

    let started = Instant::now();
    let mut tally = Tally::default();
    let mut samples: Vec<Position> = Vec::new();
    let mut first_errors: Vec<String> = Vec::new();
    for (i, line) in lines.enumerate() {
        let line_no = i + 2;
        let line = line.map_err(|e| read_err(line_no, e))?;
        if line.trim().is_empty() {
            continue;
        }
        tally.rows += 1;
        let update = match columns.parse(&line) {
            Ok(u) => u,
            Err(msg) if args.strict => return Err(CliError::input(&args.file, line_no, msg)),
            Err(msg) => {
                tally.rejected += 1;
                if first_errors.len() < 10 {
                    first_errors.push(format!("{}:{line_no}: {msg}", args.file.display()));
                }
                continue;
            }
        };
        if tally.rows % 10_007 == 0 {
            samples.push(update.pos);
        }
        match engine
            .upsert(&update)
            .map_err(|e| CliError::Other(e.to_string()))?
        {
            Applied::Applied(_) => tally.applied += 1,
            Applied::Stale { .. } => tally.stale += 1,
        }
    }
    let elapsed = started.elapsed();
    for e in &first_errors {
        eprintln!("skipped {e}");
    }
    print_summary(&args.file, &tally, &engine, elapsed);
    print_samples(&engine, &samples, &k_query)
}

fn print_summary(file: &Path, t: &Tally, engine: &Engine, elapsed: std::time::Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let counts = engine.counts();
    println!("replayed {}", file.display());
    println!("  rows      {:>10}", t.rows);
    println!("  applied   {:>10}", t.applied);
    println!("  stale     {:>10}", t.stale);
    println!("  rejected  {:>10}", t.rejected);
    println!(
        "  drivers   {:>10}  in {} H3 cells",
        counts.total(),
        engine.cell_count()
    );
    println!(
        "  time      {:>10.3} s  ({:.0} updates/s)",
        secs,
        t.rows as f64 / secs
    );
}

fn print_samples(
    engine: &Engine,
    samples: &[Position],
    template: &NearestQuery,
) -> Result<(), CliError> {
    for pos in samples.iter().take(5) {
        let q = NearestQuery {
            pos: *pos,
            ..template.clone()
        };
        let started = Instant::now();
        let near = engine
            .nearest(&q)
            .map_err(|e| CliError::Other(e.to_string()))?;
        let took = started.elapsed();
        println!(
            "nearest {} to ({:.5}, {:.5}) in {:.1} µs:",
            q.k,
            pos.lat(),
            pos.lon(),
            took.as_secs_f64() * 1e6
        );
        for n in near {
            println!("  {:<12} {:>9.1} m  last seen {}", n.id, n.distance_m, n.ts);
        }
    }
    Ok(())
}
