//! `hexmatch replay`: recorded data through the engine, in process or
//! against a running server.
//!
//! - `replay positions` (here): a position log, as fast as possible or at
//!   its recorded pace, then a few nearest queries.
//! - `replay trips` ([`trips`]): recorded trips through a simulated fleet
//!   and a dispatch policy ([`hexmatch::sim`]), with a report and plots.
//! - [`http`]: the blocking client both use with `--server URL`;
//!   [`pace`]: durations and `--realtime`; [`plot`]: the SVG.

mod http;
mod pace;
mod plot;
mod trips;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hexmatch::{
    Applied, DriverId, DriverUpdate, Engine, EngineConfig, NearestQuery, Position, Timestamp,
};
use hexmatch_server::load::{ID_COLUMNS, TS_COLUMNS};

use self::http::{Http, LOCATION_CHUNK, LocationItem};
use self::pace::{Pace, Pacer};
pub(crate) use self::trips::{TripsArgs, trips};
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
    /// Send the updates to the server at this URL (`http://127.0.0.1:8080`)
    /// as `POST /v1/locations` batches instead of an in-process engine.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// Bearer token for `--server`.
    #[arg(long, env = "HEXMATCH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Pace by the rows' timestamps: `max` (as fast as possible), `1x`
    /// (the recorded pace) or faster, e.g. `60x`.
    #[arg(long, default_value = "max")]
    realtime: Pace,
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
            id: find(&ID_COLUMNS).ok_or_else(|| missing("driver_id or vehicle_id"))?,
            ts: find(&TS_COLUMNS),
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

/// Where the updates go.
enum Sink {
    /// An in-process engine.
    Local(Box<Engine>),
    /// A server, in batches of [`LOCATION_CHUNK`]; each item keeps its line.
    Remote {
        http: Http,
        batch: Vec<(usize, LocationItem)>,
    },
}

impl Sink {
    fn apply(
        &mut self,
        line: usize,
        update: &DriverUpdate,
        tally: &mut Tally,
        errors: &mut Vec<String>,
        path: &Path,
    ) -> Result<(), CliError> {
        match self {
            Self::Local(engine) => {
                match engine
                    .upsert(update)
                    .map_err(|e| CliError::Other(e.to_string()))?
                {
                    Applied::Applied(_) => tally.applied += 1,
                    Applied::Stale { .. } => tally.stale += 1,
                }
                Ok(())
            }
            Self::Remote { batch, .. } => {
                batch.push((line, LocationItem::from(update)));
                if batch.len() >= LOCATION_CHUNK {
                    self.flush(tally, errors, path)?;
                }
                Ok(())
            }
        }
    }

    /// Sends the pending batch, if any.
    fn flush(
        &mut self,
        tally: &mut Tally,
        errors: &mut Vec<String>,
        path: &Path,
    ) -> Result<(), CliError> {
        let Self::Remote { http, batch } = self else {
            return Ok(());
        };
        if batch.is_empty() {
            return Ok(());
        }
        let items: Vec<LocationItem> = batch.iter().map(|(_, item)| item.clone()).collect();
        let result = http
            .post_locations(&items)
            .map_err(|e| CliError::Other(format!("POST {}/v1/locations: {e}", http.base())))?;
        tally.applied += result.applied;
        tally.stale += result.stale;
        tally.rejected += result.rejected.len();
        for r in result.rejected {
            if errors.len() < 10 {
                let line = batch.get(r.index).map_or(0, |(l, _)| *l);
                errors.push(format!(
                    "{}:{line}: server rejected it: {}: {}",
                    path.display(),
                    r.error.code,
                    r.error.message
                ));
            }
        }
        batch.clear();
        Ok(())
    }
}

/// Runs `hexmatch replay positions`.
pub(crate) fn positions(args: &PositionsArgs) -> Result<(), CliError> {
    let mut sink = match &args.server {
        Some(url) => Sink::Remote {
            http: Http::new(url, args.api_token.clone()).map_err(CliError::Input)?,
            batch: Vec::with_capacity(LOCATION_CHUNK),
        },
        None => Sink::Local(Box::new(
            Engine::new(EngineConfig {
                resolution: args.resolution,
                ..EngineConfig::default()
            })
            .map_err(|e| CliError::Input(format!("--resolution: {e}")))?,
        )),
    };
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
    if columns.ts.is_none() && args.realtime != Pace::Max {
        return Err(CliError::input(
            &args.file,
            1,
            format!(
                "--realtime {} needs a ts or timestamp column to pace by",
                args.realtime
            ),
        ));
    }

    let started = Instant::now();
    let mut tally = Tally::default();
    let mut first_errors: Vec<String> = Vec::new();
    let samples = stream(
        args,
        lines,
        &columns,
        &mut sink,
        &mut tally,
        &mut first_errors,
    )?;
    let elapsed = started.elapsed();
    for e in &first_errors {
        eprintln!("skipped {e}");
    }
    match &sink {
        Sink::Local(engine) => {
            print_summary(&args.file, &tally, Some(engine), elapsed);
            print_samples(&samples, &k_query, |q| {
                engine
                    .nearest(q)
                    .map(|near| {
                        near.into_iter()
                            .map(|n| (n.id.to_string(), n.distance_m, n.ts.to_string()))
                            .collect()
                    })
                    .map_err(|e| CliError::Other(e.to_string()))
            })
        }
        Sink::Remote { http, .. } => {
            println!("sent to {}", http.base());
            print_summary(&args.file, &tally, None, elapsed);
            print_samples(&samples, &k_query, |q| {
                http.nearest(q.pos, q.k.min(100))
                    .map(|near| {
                        near.into_iter()
                            .map(|n| (n.driver_id.to_string(), n.distance_m, n.ts.to_string()))
                            .collect()
                    })
                    .map_err(|e| CliError::Other(format!("GET /v1/drivers/nearest: {e}")))
            })
        }
    }
}

/// Reads the rows after the header and applies them, at the requested
/// pace; returns a few positions of the log to query at the end.
fn stream(
    args: &PositionsArgs,
    lines: impl Iterator<Item = std::io::Result<String>>,
    columns: &Columns,
    sink: &mut Sink,
    tally: &mut Tally,
    first_errors: &mut Vec<String>,
) -> Result<Vec<Position>, CliError> {
    let mut pacer = Pacer::new(args.realtime);
    let mut samples: Vec<Position> = Vec::new();
    for (i, line) in lines.enumerate() {
        let line_no = i + 2;
        let line = line.map_err(|e| CliError::input(&args.file, line_no, e))?;
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
        if tally.rows.is_multiple_of(10_007) {
            samples.push(update.pos);
        }
        if let Some(ts) = update.ts
            && !pacer.due(ts).is_zero()
        {
            // Send what is due before waiting for what is not.
            sink.flush(tally, first_errors, &args.file)?;
            pacer.wait_for(ts);
        }
        sink.apply(line_no, &update, tally, first_errors, &args.file)?;
    }
    sink.flush(tally, first_errors, &args.file)?;
    Ok(samples)
}

fn print_summary(file: &Path, t: &Tally, engine: Option<&Engine>, elapsed: std::time::Duration) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!("replayed {}", file.display());
    println!("  rows      {:>10}", t.rows);
    println!("  applied   {:>10}", t.applied);
    println!("  stale     {:>10}", t.stale);
    println!("  rejected  {:>10}", t.rejected);
    if let Some(engine) = engine {
        println!(
            "  drivers   {:>10}  in {} H3 cells",
            engine.counts().total(),
            engine.cell_count()
        );
    }
    println!(
        "  time      {:>10.3} s  ({:.0} updates/s)",
        secs,
        t.rows as f64 / secs
    );
}

/// One nearest driver as printed: id, metres, last seen.
type Near = (String, f64, String);

fn print_samples(
    samples: &[Position],
    template: &NearestQuery,
    mut nearest: impl FnMut(&NearestQuery) -> Result<Vec<Near>, CliError>,
) -> Result<(), CliError> {
    for pos in samples.iter().take(5) {
        let q = NearestQuery {
            pos: *pos,
            ..template.clone()
        };
        let started = Instant::now();
        let near = nearest(&q)?;
        let took = started.elapsed();
        println!(
            "nearest {} to ({:.5}, {:.5}) in {:.1} µs:",
            q.k,
            pos.lat(),
            pos.lon(),
            took.as_secs_f64() * 1e6
        );
        for (id, distance_m, ts) in near {
            println!("  {id:<12} {distance_m:>9.1} m  last seen {ts}");
        }
    }
    Ok(())
}
