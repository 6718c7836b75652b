//! Starting, running and stopping `hexmatch serve`: builds the engine and
//! the [`Service`], loads or restores the drivers, binds the HTTP
//! listener, and runs the background loops (expiry sweep, metrics
//! upkeep, Redis health, snapshots, stream ingestion, cluster leases).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hexmatch::{Clock, Engine, EngineConfig, SystemClock};
use metrics::counter;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::ServeConfig;
use crate::http::{self, HttpState};
use crate::persist::{Durability, Fence, Persistence};
use crate::service::Service;
use crate::telemetry;

/// Why the server could not start.
#[derive(Debug)]
pub enum ServerError {
    /// A setting is invalid (exit status 2).
    Config(String),
    /// An input file is bad; the message names file and line (exit status 2).
    Input(String),
    /// The listening address could not be bound (exit status 1).
    Bind {
        /// The address of `--bind`.
        addr: SocketAddr,
        /// What the system said.
        error: std::io::Error,
    },
    /// Another system error (exit status 1).
    Io(std::io::Error),
}

impl ServerError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Input(_) => 2,
            Self::Bind { .. } | Self::Io(_) => 1,
        }
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config(m) => write!(f, "bad configuration: {m}"),
            Self::Input(m) => f.write_str(m),
            Self::Bind { addr, error } if error.kind() == std::io::ErrorKind::AddrInUse => write!(
                f,
                "cannot listen on {addr}: another process is listening there ({error}); \
                 stop it or choose another --bind"
            ),
            Self::Bind { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
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
    state: Arc<HttpState>,
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
        // Open event feeds would hold their connections, and the drain.
        self.state.svc.events.close();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Err(e) = (&mut self.serving).await {
            tracing::error!(error = %e, "server task failed");
        }
        for task in &self.background {
            task.abort();
        }
        if let Some(p) = self.state.svc.persist() {
            match p.write_snapshot(&self.engine).await {
                Ok(bytes) => tracing::info!(bytes, "final snapshot written"),
                Err(e) => tracing::error!(error = %e, "final snapshot failed"),
            }
        }
        // Hand the regions back so another node takes them at once.
        if let Some(c) = self.state.svc.cluster() {
            c.give_up().await;
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
    let engine_config = EngineConfig {
        resolution: config.resolution,
        max_radius_m: config.max_radius_m,
        // 0 disables the sweep; the engine itself wants a positive TTL.
        driver_ttl_ms: config.driver_ttl_s.max(1).saturating_mul(1000),
        match_retention_ms: config.match_retention_s.saturating_mul(1000),
        max_ended_matches: config.max_ended_matches,
        max_future_ms: config.max_clock_skew_ms,
    };
    let engine = Arc::new(
        Engine::with_clock(engine_config, clock).map_err(|e| ServerError::Config(e.to_string()))?,
    );
    config.check().map_err(ServerError::Config)?;
    // The recorder first: metric handles taken before it would count nowhere.
    let metrics = telemetry::metrics_handle();
    let svc = build_service(&engine, &config)?;
    let state = Arc::new(HttpState::new(Arc::clone(&svc), metrics).map_err(ServerError::Config)?);
    // Read the driver file before binding, so a bad file fails the start.
    let initial = match &config.load_drivers {
        Some(path) => Some((
            path.clone(),
            crate::load::read_drivers(path, engine.clock().now()).map_err(ServerError::Input)?,
        )),
        None => None,
    };
    if config.redis_url.is_none()
        && let Some((path, drivers)) = initial.clone()
    {
        load_initial(&engine, &path, drivers)?;
    }
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|error| ServerError::Bind {
            addr: config.bind,
            error,
        })?;
    let addr = listener.local_addr().map_err(ServerError::Io)?;
    let mut background = vec![spawn_sweeper(&svc), spawn_upkeep(&state)];
    background.extend(spawn_webhooks(&svc)?);
    match config.redis_url.clone() {
        None => svc.set_ready(),
        Some(url) if config.cluster => background.push(tokio::spawn(boot_cluster(
            Arc::clone(&svc),
            url,
            addr,
            initial,
        ))),
        Some(url) => background.push(tokio::spawn(boot_with_redis(
            Arc::clone(&svc),
            url,
            initial,
        ))),
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let app = http::app(Arc::clone(&state));
    let limits = http::listen::ConnLimits {
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(config.idle_timeout_ms.max(1)),
        max_connections: match config.max_connections {
            0 => http::listen::default_max_connections(
                http::listen::open_files_limit().unwrap_or(1024),
            ),
            n => n,
        },
    };
    tracing::info!(
        max_connections = limits.max_connections,
        header_read_timeout_ms = config.header_read_timeout_ms,
        idle_timeout_ms = config.idle_timeout_ms,
        "connection limits"
    );
    let serving = tokio::spawn(async move {
        http::listen::serve(listener, app, limits, async {
            let _ = stopped.await;
        })
        .await;
        Ok(())
    });
    if let Some(url) = &config.redis_url {
        tracing::info!(%addr, redis = %url, "hexmatch serving; restoring from redis");
    } else {
        tracing::info!(%addr, redis = "disabled (memory only)", "hexmatch serving");
    }
    Ok(Server {
        addr,
        engine,
        state,
        stop: Some(stop),
        serving,
        background,
    })
}

/// Reads the region polygons of `--regions`.
fn read_regions(
    path: &std::path::Path,
    resolution: u8,
) -> Result<hexmatch::RegionMap, ServerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServerError::Input(format!("{}: {e}", path.display())))?;
    let prefix = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("region")
        .replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let map = hexmatch::RegionMap::from_geojson(
        &text,
        resolution,
        &prefix,
        hexmatch::Outside::DefaultRegion,
    )
    .map_err(|e| ServerError::Input(format!("{}: {e}", path.display())))?;
    for r in map.empty_regions() {
        tracing::warn!(region = %r.id, name = %r.name, resolution, "region is smaller than a partition cell and owns none");
    }
    tracing::info!(regions = map.regions().len(), file = %path.display(), "loaded regions");
    Ok(map)
}

/// The service: the engine, the region map of `--regions` and the zones
/// of `--zones`.
fn build_service(engine: &Arc<Engine>, config: &ServeConfig) -> Result<Arc<Service>, ServerError> {
    let regions = match &config.regions {
        None => None,
        Some(path) => Some(read_regions(path, config.resolution)?),
    };
    let zones = match &config.zones {
        None => None,
        Some(path) => read_zones(path, regions.as_ref())?,
    };
    let svc = Service::new(Arc::clone(engine), config.clone(), regions);
    Ok(Arc::new(if zones.is_some() {
        svc.with_zones(zones)
    } else {
        svc
    }))
}

/// Starts the delivery tasks of `--webhook`.
fn spawn_webhooks(svc: &Service) -> Result<Vec<JoinHandle<()>>, ServerError> {
    let c = &svc.config;
    let Some(secret) = c.webhook_secret.as_ref().filter(|_| !c.webhooks.is_empty()) else {
        return Ok(Vec::new());
    };
    let tasks =
        crate::service::webhooks::spawn(&svc.events, &c.webhooks, secret.expose(), c.webhook_queue)
            .map_err(ServerError::Config)?;
    tracing::info!(hooks = c.webhooks.len(), "delivering events to webhooks");
    Ok(tasks)
}

/// Reads the named zones of `--zones`; the regions of `regions` are
/// zones too.
fn read_zones(
    path: &std::path::Path,
    regions: Option<&hexmatch::RegionMap>,
) -> Result<Option<crate::service::Zones>, ServerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ServerError::Input(format!("{}: {e}", path.display())))?;
    let zones = crate::service::Zones::new(regions, Some(&text))
        .map_err(|e| ServerError::Input(format!("{}: {e}", path.display())))?;
    if let Some(z) = &zones {
        tracing::info!(zones = z.named_zones(), file = %path.display(), "loaded zones");
    }
    Ok(zones)
}

fn load_initial(
    engine: &Engine,
    path: &std::path::Path,
    drivers: Vec<hexmatch::Driver>,
) -> Result<(), ServerError> {
    let n = engine
        .bulk_load(drivers)
        .map_err(|e| ServerError::Input(format!("{}: {e}", path.display())))?;
    tracing::info!(drivers = n, file = %path.display(), "loaded drivers");
    Ok(())
}

/// How many Redis replicas a durable write waits for, and how long.
fn durability(c: &ServeConfig) -> Durability {
    Durability {
        replicas: c.redis_replicas,
        timeout: Duration::from_millis(c.redis_wait_ms),
    }
}

/// Connects to Redis (retrying until it answers), restores the snapshot and
/// the live matches, loads `--load-drivers` only on a fresh start, then
/// marks the node ready and starts the persistence loops.
async fn boot_with_redis(
    svc: Arc<Service>,
    url: String,
    initial: Option<(std::path::PathBuf, Vec<hexmatch::Driver>)>,
) {
    let c = &svc.config;
    let p = loop {
        match Persistence::connect(&url, &c.redis_prefix, "default", &c.node_id, durability(c))
            .await
        {
            Ok(p) => match p.restore(&svc.engine).await {
                Ok(r) => {
                    for w in &r.warnings {
                        tracing::error!(warning = %w, "restore problem (the data was skipped, not half-loaded)");
                    }
                    tracing::info!(drivers = r.drivers, matches = r.matches, generation = ?r.generation, "restored from redis");
                    if r.generation.is_none()
                        && r.matches == 0
                        && let Some((path, drivers)) = initial
                        && let Err(e) = load_initial(&svc.engine, &path, drivers)
                    {
                        tracing::error!(error = %e, "could not load drivers");
                    }
                    break p;
                }
                Err(e) => {
                    tracing::error!(error = %e, "restore failed; retrying");
                    svc.set_startup_problem(format!("restore failed: {e}"));
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "redis unreachable at start; retrying");
                svc.set_startup_problem(format!("Redis is unreachable: {e}"));
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    if let Err(e) = p.ensure_group().await {
        tracing::warn!(error = %e, "could not create the stream consumer group");
    }
    svc.set_persist(Arc::clone(&p));
    // Durable before ready: drivers just loaded (or restored) survive a
    // kill before the first interval's snapshot.
    match p.write_snapshot(&svc.engine).await {
        Ok(bytes) => tracing::info!(
            bytes,
            drivers = svc.engine.len(),
            "snapshot after start-up written"
        ),
        Err(e) => tracing::error!(error = %e, "snapshot after start-up failed"),
    }
    svc.set_ready();
    let mut tasks = vec![spawn_health(&svc, &p), spawn_snapshots(&svc, &p)];
    tasks.extend(spawn_event_stream(&svc, &p));
    if c.ingest_stream {
        tasks.push(spawn_ingest(&svc, &p));
    }
    // Tie the loops' lifetime to this task: aborting it (shutdown) stops them.
    let _guard = AbortOnDrop(tasks);
    std::future::pending::<()>().await;
}

/// Joins the cluster: registers this node, takes its regions (restoring
/// each from its previous owner's snapshot and match records), loads
/// `--load-drivers` into the regions it serves when none had data, marks
/// the node ready, then keeps leases, map and takeovers up to date.
async fn boot_cluster(
    svc: Arc<Service>,
    url: String,
    addr: SocketAddr,
    initial: Option<(std::path::PathBuf, Vec<hexmatch::Driver>)>,
) {
    let c = &svc.config;
    let Some(regions) = svc.regions.clone() else {
        tracing::error!("cluster mode needs --regions");
        return;
    };
    let advertise = c
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));
    let ttl = Duration::from_millis(c.lease_ttl_ms);
    let (p, cluster) = loop {
        let joined = async {
            let p =
                Persistence::connect(&url, &c.redis_prefix, &c.node_id, &c.node_id, durability(c))
                    .await?;
            let cluster = crate::cluster::Cluster::connect(
                &url,
                &c.redis_prefix,
                &c.node_id,
                &advertise,
                regions.clone(),
                &c.own_regions,
                ttl,
                c.cluster_secret.as_ref().map(crate::config::Secret::expose),
                durability(c),
            )
            .await?;
            Ok::<_, String>((p, cluster))
        };
        match joined.await {
            Ok(x) => break x,
            Err(e) => tracing::warn!(error = %e, "redis unreachable at start; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    p.set_fence(Arc::clone(&cluster) as Arc<dyn Fence>);
    svc.set_persist(Arc::clone(&p));
    svc.set_cluster(Arc::clone(&cluster));
    let taken = cluster.tick(&svc.engine, &p).await;
    let restored: usize = taken.iter().map(|t| t.drivers + t.matches).sum();
    if restored == 0
        && let Some((path, drivers)) = initial
    {
        let mine: Vec<hexmatch::Driver> = drivers
            .into_iter()
            .filter(|d| {
                cluster
                    .region_of(d.pos)
                    .is_ok_and(|r| cluster.serves(r.as_str()))
            })
            .collect();
        let n = crate::persist::upsert_drivers(&svc.engine, mine);
        tracing::info!(drivers = n, file = %path.display(), "loaded the drivers of this node's regions");
    }
    after_takeover(&svc, &p, taken.len()).await;
    tracing::info!(node = %c.node_id, url = %advertise, serving = ?cluster.held(), "joined the cluster");
    svc.set_ready();
    let mut tasks = vec![spawn_health(&svc, &p), spawn_snapshots(&svc, &p)];
    tasks.extend(spawn_event_stream(&svc, &p));
    if c.ingest_stream {
        if let Err(e) = p.ensure_group().await {
            tracing::warn!(error = %e, "could not create the stream consumer group");
        }
        tasks.push(spawn_cluster_ingest(&svc, &p));
    }
    let (s2, p2, c2) = (Arc::clone(&svc), Arc::clone(&p), Arc::clone(&cluster));
    tasks.push(tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let taken = c2.tick(&s2.engine, &p2).await;
            after_takeover(&s2, &p2, taken.len()).await;
            // Renewals keep their period; a lease lapsing sooner is taken then.
            let period = c2.tick_interval().saturating_sub(started.elapsed());
            tokio::time::sleep(period.min(c2.until_next_tick())).await;
        }
    }));
    let _guard = AbortOnDrop(tasks);
    std::future::pending::<()>().await;
}

/// Cluster mode: every node reads the shared stream in the shared consumer
/// group; each batch is split by region owner like an HTTP batch.
fn spawn_cluster_ingest(svc: &Arc<Service>, p: &Arc<Persistence>) -> JoinHandle<()> {
    let (svc, p) = (Arc::clone(svc), Arc::clone(p));
    tokio::spawn(async move {
        let reclaim_every = Duration::from_secs(30);
        let mut last_reclaim = std::time::Instant::now();
        loop {
            if !p.is_up() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let reclaim = (last_reclaim.elapsed() >= reclaim_every).then(|| {
                last_reclaim = std::time::Instant::now();
                reclaim_every
            });
            match p.read_batch(2000, 1000, reclaim).await {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => svc.ingest_cluster_entries(&p, batch).await,
                Err(e) => {
                    tracing::warn!(error = %e, "stream ingestion failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    })
}

/// After taking regions: this node's records and snapshot must hold them
/// at once, so that if it dies next, the node after it finds them.
async fn after_takeover(svc: &Arc<Service>, p: &Arc<Persistence>, taken: usize) {
    if taken == 0 {
        return;
    }
    counter!("hexmatch_region_takeovers_total").increment(taken as u64);
    if let Err(e) = p.write_snapshot(&svc.engine).await {
        tracing::warn!(error = %e, "snapshot after takeover failed");
    }
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn spawn_health(svc: &Arc<Service>, p: &Arc<Persistence>) -> JoinHandle<()> {
    let (svc, p) = (Arc::clone(svc), Arc::clone(p));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            p.check_health(&svc.engine).await;
        }
    })
}

fn spawn_snapshots(svc: &Arc<Service>, p: &Arc<Persistence>) -> JoinHandle<()> {
    let (svc, p) = (Arc::clone(svc), Arc::clone(p));
    let every = Duration::from_millis(svc.config.snapshot_interval_ms.max(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !p.is_up() {
                continue;
            }
            match p.write_snapshot(&svc.engine).await {
                Ok(bytes) => tracing::debug!(bytes, "snapshot written"),
                Err(e) => {
                    tracing::warn!(error = %e, "snapshot failed; the previous one stays current");
                }
            }
        }
    })
}

/// Events queued for the Redis stream while Redis is slow or down; past it
/// they are dropped and counted.
const EVENT_STREAM_QUEUE: usize = 16_384;

/// Appends this node's events to the Redis stream, when events are on and
/// the stream is wanted.
fn spawn_event_stream(svc: &Arc<Service>, p: &Arc<Persistence>) -> Option<JoinHandle<()>> {
    let maxlen = svc.config.event_stream_maxlen;
    if !svc.events.is_on() || maxlen == 0 {
        return None;
    }
    let rx = svc.events.add_sink("redis", EVENT_STREAM_QUEUE);
    tracing::info!(key = %p.events_key(), maxlen, "appending events to the Redis stream");
    Some(p.spawn_event_stream(rx, maxlen))
}

fn spawn_ingest(svc: &Arc<Service>, p: &Arc<Persistence>) -> JoinHandle<()> {
    let (svc, p) = (Arc::clone(svc), Arc::clone(p));
    tokio::spawn(async move {
        loop {
            if !p.is_up() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if let Err(e) = p
                .ingest(
                    &svc.engine,
                    svc.stream_applier(),
                    None,
                    Duration::from_secs(30),
                )
                .await
            {
                tracing::warn!(error = %e, "stream ingestion failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    })
}

/// Expires reservations (and silent drivers, if a TTL is set) periodically.
fn spawn_sweeper(svc: &Arc<Service>) -> JoinHandle<()> {
    let svc = Arc::clone(svc);
    let every = Duration::from_millis(svc.config.sweep_interval_ms.max(1));
    tokio::spawn(async move {
        // The first sweep comes one interval after start, not at once: a
        // test on a manual clock must not race a sweep it did not ask for.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            svc.sweep().await;
        }
    })
}

/// Keeps the metrics histograms and the rate limiter's memory bounded.
fn spawn_upkeep(state: &Arc<HttpState>) -> JoinHandle<()> {
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            state.metrics.run_upkeep();
            if let Some(limiter) = &state.limiter {
                limiter.retain_recent();
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
