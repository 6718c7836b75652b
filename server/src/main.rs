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
HEXMATCH_LOG_JSON=1 writes JSON log lines. An unknown HEXMATCH_* variable is named in a warning at start. \
MIMALLOC_ALLOW_THP=1 lets the heap use transparent huge pages (off by default: bulk loads and takeovers \
are twice as fast on 4 KiB pages)."
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
    let pages = heap_on_small_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args, pages),
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

/// What [`heap_on_small_pages`] did.
#[derive(Debug)]
enum HeapPages {
    /// Transparent huge pages are off for this process.
    Small,
    /// `MIMALLOC_ALLOW_THP` is set: mimalloc follows it.
    AsConfigured,
    /// The kernel refused (or this is not Linux); the heap may use them.
    Unchanged(String),
}

/// Turns transparent huge pages off for this process, before any thread
/// starts, unless `MIMALLOC_ALLOW_THP` says otherwise.
///
/// mimalloc asks for huge pages on its arenas (`madvise(MADV_HUGEPAGE)`),
/// and where the kernel's THP `defrag` setting is `madvise` (the default)
/// a fault in such a range may first compact memory to find a free 2 MiB
/// page. Building a million drivers' trees faults in a few hundred MB:
/// `benches/scripts/takeover.sh` restores 1M drivers in 1.8–2.0 s with
/// huge pages and 0.7 s without (Intel Xeon, 2 vCPUs; the standby's peak
/// RSS 593 MB and 442 MB), and a cold start bulk-loads them in 1.9 s
/// and 1.0 s. HTTP nearest and claims cost the same either way (within
/// the runs' 10 % noise, `benches/scripts/http_load.sh`).
fn heap_on_small_pages() -> HeapPages {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return HeapPages::AsConfigured;
    }
    #[cfg(target_os = "linux")]
    {
        match nix::sys::prctl::set_thp_disable(true) {
            Ok(()) => HeapPages::Small,
            Err(e) => HeapPages::Unchanged(e.to_string()),
        }
    }
    #[cfg(not(target_os = "linux"))]
    HeapPages::Unchanged("not Linux".into())
}

fn serve(args: hexmatch_server::ServeArgs, pages: HeapPages) -> Result<(), CliError> {
    hexmatch_server::telemetry::init_logging();
    match pages {
        HeapPages::Small => tracing::debug!("transparent huge pages off for this process"),
        HeapPages::AsConfigured => {
            tracing::info!("transparent huge pages as MIMALLOC_ALLOW_THP says");
        }
        HeapPages::Unchanged(why) => {
            tracing::warn!(%why, "transparent huge pages could not be turned off");
        }
    }
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
