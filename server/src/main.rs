//! `hexmatch` — the command line of the hexmatch driver-matching engine.
//!
//! - `hexmatch serve`: the HTTP API (see `hexmatch_server`).
//! - `hexmatch replay positions FILE`: streams a recorded position log
//!   through the engine (or a server) and reports what it applied.
//! - `hexmatch replay trips FILE`: replays recorded trips through a
//!   simulated fleet and a dispatch policy (`hexmatch::sim`).

mod replay;

use std::process::ExitCode;

/// mimalloc instead of the system allocator: a request allocates a few
/// dozen small blocks (JSON strings, headers, futures), and glibc's malloc
/// and free were a fifth of the server's instructions per request
/// (callgrind, at `bd3e875`, which brought mimalloc in).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// hexmatch: exact nearest-driver search and atomic matching, in memory.
#[derive(Debug, Parser)]
#[command(name = "hexmatch", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API.
    #[command(
        after_help = "Environment: every flag also reads HEXMATCH_<FLAG> (e.g. HEXMATCH_BIND); \
RUST_LOG sets the log filter (default info, e.g. RUST_LOG=hexmatch_server=debug); \
HEXMATCH_LOG_JSON=1 writes JSON log lines. An unknown HEXMATCH_* variable is named in a warning at start."
    )]
    Serve(Box<hexmatch_server::ServeArgs>),
    /// Replay recorded data through the engine.
    #[command(subcommand)]
    Replay(ReplayCommand),
}

#[derive(Debug, Subcommand)]
enum ReplayCommand {
    /// Stream a position log (CSV with columns `driver_id` or `vehicle_id`,
    /// optional `ts` or `timestamp`, `lat`, `lon`) into an in-process engine
    /// or a server (`--server`), as fast as possible or at its recorded
    /// pace (`--realtime`), then show the nearest drivers to a few points.
    Positions(replay::PositionsArgs),
    /// Replay recorded trips through a simulated fleet and a dispatch
    /// policy, in process or against a server (`--server`): a summary, a
    /// JSON report (`--report`) and plots (`--plot`).
    Trips(Box<replay::TripsArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Replay(ReplayCommand::Positions(args)) => replay::positions(&args),
        Command::Replay(ReplayCommand::Trips(args)) => replay::trips(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hexmatch: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn serve(args: hexmatch_server::ServeArgs) -> Result<(), CliError> {
    hexmatch_server::telemetry::init_logging();
    for unknown in hexmatch_server::config::unknown_env_vars(std::env::vars().map(|(k, _)| k)) {
        let meant = unknown.closest.as_deref().unwrap_or("-");
        tracing::warn!(variable = %unknown.name, did_you_mean = %meant, "unknown HEXMATCH_ variable, ignored");
    }
    let config = args.resolve().map_err(|e| CliError::Input(e.to_string()))?;
    spawn_memory_return();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if config.workers > 0 {
        builder.worker_threads(config.workers);
    }
    let runtime = builder
        .build()
        .map_err(|e| CliError::Other(format!("tokio runtime: {e}")))?;
    runtime
        .block_on(hexmatch_server::run(config))
        .map_err(|e| match e.exit_code() {
            2 => CliError::Input(e.to_string()),
            _ => CliError::Other(e.to_string()),
        })
}

/// How often the server hands freed memory back to the operating system.
const MEMORY_RETURN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Hands memory the server freed back to the operating system, every
/// [`MEMORY_RETURN_INTERVAL`], on a thread of its own.
///
/// mimalloc returns a freed range only after a delay, and only when an
/// allocating thread passes by later; a server that has just dropped a
/// fleet (expiry, a big batch, a load) and then idles keeps it.
/// `benches/scripts/rss_churn.sh` (1M drivers in over HTTP, then expired,
/// on a 2-vCPU Xeon): RSS with none left is 276 MB without this and
/// 37–43 MB with it, near the 21 MB of a fresh server.
fn spawn_memory_return() {
    let spawned = std::thread::Builder::new()
        .name("memory-return".into())
        .spawn(|| {
            loop {
                std::thread::sleep(MEMORY_RETURN_INTERVAL);
                purge_freed_memory();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no memory-return thread; freed memory may stay resident");
    }
}

/// Purges every arena range mimalloc holds free (`mi_collect(true)`).
#[allow(unsafe_code)]
fn purge_freed_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any
    // thread at any time; it only releases memory no allocation owns.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// A failure of a command, with the exit status it maps to.
#[derive(Debug)]
enum CliError {
    /// Bad input: the message names the file and line. Exit status 2.
    Input(String),
    /// Anything else. Exit status 1.
    Other(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Input(_) => 2,
            Self::Other(_) => 1,
        }
    }

    fn input(path: &std::path::Path, line: usize, msg: impl std::fmt::Display) -> Self {
        Self::Input(format!("{}:{line}: {msg}", path.display()))
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Input(m) | Self::Other(m) => f.write_str(m),
        }
    }
}
