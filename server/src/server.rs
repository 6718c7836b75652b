//! Starting, running and stopping `hexmatch serve`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hexmatch::{Clock, Engine, EngineConfig, SystemClock};
use metrics::counter;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{self, Shared};
use crate::config::ServeConfig;
use crate::telemetry;

/// Why the server could not start.
#[derive(Debug)]
pub enum ServerError {
    /// A setting is invalid (exit status 2).
    Config(String),
    /// An input file is bad; the message names file and line (exit status 2).
    Input(String),
    /// The socket could not be bound, or similar (exit status 1).
    Io(std::io::Error),
}

impl ServerError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Input(_) => 2,
            Self::Io(_) => 1,
        }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(m) => write!(f, "bad configuration: {m}"),
            Self::Input(m) => f.write_str(m),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// A running server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    engine: Arc<Engine>,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Server {
    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine it serves.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Stops accepting connections, lets in-flight requests finish, then
    /// stops the background tasks.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.serving).await {
            tracing::error!(error = %e, "server task failed");
        }
        for task in &self.background {
            task.abort();
        }
    }
}

/// Starts a server on the system clock.
///
/// # Errors
/// See [`ServerError`].
pub async fn start(config: ServeConfig) -> Result<Server, ServerError> {
    start_with_clock(config, Arc::new(SystemClock)).await
}

/// Starts a server reading time from `clock` (tests, simulations).
///
/// # Errors
/// See [`ServerError`].
pub async fn start_with_clock(
    config: ServeConfig,
    clock: Arc<dyn Clock>,
) -> Result<Server, ServerError> {
    if config.redis_url.is_some() {
        return Err(ServerError::Config(
            "--redis-url was given, but Redis persistence is not built yet; run without it (memory only)".into(),
        ));
    }
    let engine_config = EngineConfig {
        resolution: config.resolution,
        max_radius_m: config.max_radius_m,
        // 0 disables the sweep; the engine itself wants a positive TTL.
        driver_ttl_ms: config.driver_ttl_s.max(1).saturating_mul(1000),
        ..EngineConfig::default()
    };
    let engine = Arc::new(
        Engine::with_clock(engine_config, clock).map_err(|e| ServerError::Config(e.to_string()))?,
    );
    let state = Arc::new(Shared::new(
        Arc::clone(&engine),
        config.clone(),
        telemetry::metrics_handle(),
    ));
    if let Some(path) = &config.load_drivers {
        let drivers =
            crate::load::read_drivers(path, engine.clock().now()).map_err(ServerError::Input)?;
        let n = engine
            .bulk_load(drivers)
            .map_err(|e| ServerError::Input(format!("{}: {e}", path.display())))?;
        tracing::info!(drivers = n, file = %path.display(), "loaded drivers");
    }
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(ServerError::Io)?;
    let addr = listener.local_addr().map_err(ServerError::Io)?;
    state.ready.store(true, Ordering::Release);
    let background = vec![spawn_sweeper(&state), spawn_upkeep(&state)];
    let (stop, stopped) = oneshot::channel::<()>();
    let app = api::app(state).into_make_service_with_connect_info::<SocketAddr>();
    let serving = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    tracing::info!(%addr, redis = "disabled (memory only)", "hexmatch serving");
    Ok(Server {
        addr,
        engine,
        stop: Some(stop),
        serving,
        background,
    })
}

/// Expires reservations (and silent drivers, if a TTL is set) periodically.
fn spawn_sweeper(state: &Arc<Shared>) -> JoinHandle<()> {
    let engine = Arc::clone(&state.engine);
    let ttl_on = state.config.driver_ttl_s > 0;
    let every = Duration::from_millis(state.config.sweep_interval_ms.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let engine = Arc::clone(&engine);
            // The driver scan is O(drivers): keep it off the async workers.
            let swept = tokio::task::spawn_blocking(move || {
                let matches = engine.expire_matches();
                let drivers = if ttl_on {
                    engine.expire_drivers()
                } else {
                    Vec::new()
                };
                (matches.len(), drivers.len())
            })
            .await;
            if let Ok((matches, drivers)) = swept {
                counter!("hexmatch_match_ends_total", "state" => "expired")
                    .increment(matches as u64);
                counter!("hexmatch_drivers_expired_total").increment(drivers as u64);
            }
        }
    })
}

/// Keeps the metrics histograms and the rate limiter's memory bounded.
fn spawn_upkeep(state: &Arc<Shared>) -> JoinHandle<()> {
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            state.metrics.run_upkeep();
            if let Some(limiter) = &state.limiter {
                limiter.limiter().retain_recent();
            }
        }
    })
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully.
///
/// # Errors
/// See [`ServerError`].
pub async fn run(config: ServeConfig) -> Result<(), ServerError> {
    let server = start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
