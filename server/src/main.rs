//! `hexmatch` — the command line of the hexmatch driver-matching engine.
//!
//! Built so far: `hexmatch replay positions FILE`, which streams a recorded
//! position log through the engine in-process and reports what it applied.
//! `serve` (the HTTP API) and `replay trips` are tracked in their own issues
//! and are not here yet.

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
