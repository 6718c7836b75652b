//! `gen_drivers` — writes the benches' clustered Chicago driver set as a
//! CSV that `hexmatch serve --load-drivers` reads
//! (`driver_id,lat,lon,vehicle,status,capabilities`, the capabilities
//! separated by `;`), and optionally the jittered real
//! pickups (`lat,lon`) that the HTTP load scripts query.
//!
//! ```sh
//! cargo run --release -p hexmatch-benches --bin gen_drivers -- \
//!     --drivers 1000000 --out target/http-load/drivers.csv --pickups target/http-load/pickups.csv
//! ```

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use hexmatch_benches::{chicago_pickups, city_drivers, jitter};

/// The same seed as the latency bench and `compare`.
const DRIVER_SEED: u64 = 7;
/// The same jitter seed as `compare`.
const JITTER_SEED: u64 = 0x5EED;

/// Writes the clustered Chicago driver set (and query points) as CSV.
#[derive(Debug, Parser)]
#[command(name = "gen_drivers", version, about)]
struct Args {
    /// How many drivers (50 % available, 30 % busy, 20 % offline).
    #[arg(long, default_value_t = 1_000_000)]
    drivers: usize,
    /// The drivers CSV to write.
    #[arg(long)]
    out: PathBuf,
    /// Also write the query points, `lat,lon` per line (no header).
    #[arg(long)]
    pickups: Option<PathBuf>,
    /// Largest random offset of the query points from the real pickups, metres.
    #[arg(long, default_value_t = 300.0)]
    jitter_m: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen_drivers: {e}");
            ExitCode::FAILURE
        }
    }
}

fn create(path: &Path) -> io::Result<BufWriter<File>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    Ok(BufWriter::with_capacity(1 << 20, File::create(path)?))
}

fn run(args: &Args) -> io::Result<()> {
    let mut out = create(&args.out)?;
    writeln!(out, "driver_id,lat,lon,vehicle,status,capabilities")?;
    for d in city_drivers(args.drivers, DRIVER_SEED) {
        // `{}` prints the shortest text that parses back to the same f64.
        writeln!(
            out,
            "{},{},{},{},{},{}",
            d.id,
            d.pos.lat(),
            d.pos.lon(),
            d.vehicle,
            d.status,
            d.capabilities.names().collect::<Vec<_>>().join(";")
        )?;
    }
    out.flush()?;
    if let Some(path) = &args.pickups {
        let mut out = create(path)?;
        for p in jitter(&chicago_pickups(), args.jitter_m, JITTER_SEED) {
            writeln!(out, "{},{}", p.lat(), p.lon())?;
        }
        out.flush()?;
    }
    Ok(())
}
