//! # hexmatch-server
//!
//! Adapts the pure [`hexmatch`] engine to the world: the HTTP API of
//! `API.md` on axum ([`api`]), settings ([`config`]), start-up and
//! graceful shutdown ([`start`], [`Server`]), logging and metrics
//! ([`telemetry`]). The `hexmatch` binary (`main.rs`) is a thin CLI over
//! this library, so integration tests start the same server in-process.
//!
//! ```no_run
//! # async fn demo() -> Result<(), hexmatch_server::ServerError> {
//! let config = hexmatch_server::ServeConfig { bind: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
//! let server = hexmatch_server::start(config).await?;
//! println!("listening on {}", server.addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

pub mod api;
pub mod cluster;
pub mod config;
pub mod load;
pub mod persist;
mod server;
pub mod telemetry;

pub use config::{ServeArgs, ServeConfig};
pub use server::{Server, ServerError, run, start, start_with_clock};
