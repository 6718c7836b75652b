//! `hexmatch` — the command line of the hexmatch driver-matching engine.
//!
//! - `hexmatch serve`: the HTTP API (see `hexmatch_server`).
//! - `hexmatch replay positions FILE`: streams a recorded position log
//!   through the engine in-process and reports what it applied.
//!
//! `replay trips` is tracked in its own issue and is not here yet.

mod replay;

use std::process::ExitCode;

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
    Serve(Box<hexmatch_server::ServeArgs>),
    /// Replay recorded data through the engine.
    #[command(subcommand)]
    Replay(ReplayCommand),
}

#[derive(Debug, Subcommand)]
enum ReplayCommand {
    /// Stream a position log (CSV with columns `driver_id` or `vehicle_id`,
    /// optional `ts` or `timestamp`, `lat`, `lon`) into an in-process engine,
    /// then show the nearest drivers to a few points of the log.
    Positions(replay::PositionsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Replay(ReplayCommand::Positions(args)) => replay::positions(&args),
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
    let config = args.resolve().map_err(CliError::Input)?;
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::Other(format!("tokio runtime: {e}")))?;
    runtime
        .block_on(hexmatch_server::run(config))
        .map_err(|e| match e.exit_code() {
            2 => CliError::Input(e.to_string()),
            _ => CliError::Other(e.to_string()),
        })
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
