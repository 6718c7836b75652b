//! # hexmatch-server
//!
//! Adapts the pure [`hexmatch`] engine to the world: the HTTP API of
//! `docs/API.md`, Redis persistence, a cluster of nodes that own regions,
//! start-up and graceful shutdown. The `hexmatch` binary (`main.rs`) is a
//! thin CLI over this library, so integration tests start the same server
//! in-process.
//!
//! # Layout
//!
//! Layers, top to bottom; a module imports only from its own layer or
//! below (`.ci/layers.sh` checks it):
//!
//! - [`http`] — the transport: axum routes, extractors, the gate
//!   (credentials, rate limits, readiness, cluster forwarding), `OpenAPI`.
//!   It decodes, calls the service, encodes; nothing else.
//! - [`service`] — the one place a location update, a nearest query, a
//!   claim or a match change is validated and applied, for HTTP, the
//!   WebSocket, the Redis stream and other nodes alike.
//! - [`cluster`] — region leases and fencing, the region → node map,
//!   routing decisions, and the typed peer channel between nodes
//!   ([`cluster::peer`]), which answers only to the cluster secret.
//! - [`persist`] — Redis: snapshots, durable match records, the location
//!   stream, health.
//! - the [`hexmatch`] engine.
//!
//! Beside them, imported by every layer: [`error`] (the one
//! [`ErrorCode`] enum and its HTTP statuses), [`wire`] (every JSON shape,
//! for handlers, peers, `hexmatch replay --server` and tests),
//! [`config`], [`load`] and [`telemetry`]. On top, `boot` builds the
//! layers and runs the background loops ([`start`], [`Server`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), hexmatch_server::ServerError> {
//! let config = hexmatch_server::ServeConfig { bind: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
//! let server = hexmatch_server::start(config).await?;
//! println!("listening on {}", server.addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```

mod boot;
pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod load;
pub mod persist;
pub mod service;
pub mod telemetry;
pub mod wire;

pub use boot::{Server, ServerError, run, start, start_with_clock};
pub use config::{ServeArgs, ServeConfig};
pub use error::{ApiError, ErrorCode};
