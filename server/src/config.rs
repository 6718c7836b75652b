//! `hexmatch serve` settings: defaults, then an optional TOML file, then
//! `HEXMATCH_*` environment variables and flags (flags win).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything `hexmatch serve` can be told.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// This node's id (shown in `/v1/regions` and `/v1/cluster`).
    pub node_id: String,
    /// H3 resolution of the partition cells (0–15).
    pub resolution: u8,
    /// Drivers silent this long are removed; 0 disables the sweep.
    pub driver_ttl_s: u64,
    /// How far a query without `radius_m` searches, metres.
    pub max_radius_m: f64,
    /// Largest accepted request body.
    pub body_limit_bytes: usize,
    /// Bearer tokens accepted on `/v1`; empty = no auth.
    pub api_tokens: Vec<String>,
    /// Named client tokens with scopes (`[[tokens]]` in a config or
    /// tokens file).
    pub tokens: Vec<ClientToken>,
    /// A file holding the HS256 secret JWTs may be signed with.
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// A PEM file of the RSA public key JWTs may be signed with (RS256).
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    /// A PEM file of the EC P-256 public key JWTs may be signed with (ES256).
    pub jwt_es256_public_key_file: Option<PathBuf>,
    /// The issuer (`iss`) JWTs must name, if set.
    pub jwt_issuer: Option<String>,
    /// The audience (`aud`) JWTs must name, if set.
    pub jwt_audience: Option<String>,
    /// Requests per second per client (token, else IP); 0 = no limit.
    pub rate_limit_per_s: u32,
    /// Burst allowed above the rate.
    pub rate_limit_burst: u32,
    /// Requests handled at once; more are refused with 503 `overloaded`.
    pub max_in_flight: usize,
    /// Requests taking longer fail with 503 `timeout`.
    pub request_timeout_ms: u64,
    /// How often reservations and silent drivers are expired.
    pub sweep_interval_ms: u64,
    /// Most items in one `POST /v1/locations` or batch of orders.
    pub max_batch_items: usize,
    /// CSV of drivers to load at start (`driver_id,lat,lon[,vehicle][,status]`
    /// and more, or a position log's `vehicle_id,timestamp,lat,lon`), or a
    /// trips CSV (`trip_id,…,dropoff_lat,dropoff_lon`) seeding one driver at
    /// each drop-off.
    pub load_drivers: Option<PathBuf>,
    /// Redis for snapshots, durable matches and location streams: one URL,
    /// or comma-separated nodes of a Redis Cluster; `None` = memory only.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key.
    pub redis_prefix: String,
    /// Replicas that must have a durable write (match records, leases)
    /// before it is acknowledged (`WAIT`); 0 = the master's answer.
    pub redis_replicas: u32,
    /// How long to wait for those replicas, in ms; a write they did not
    /// take in time is refused with 503.
    pub redis_wait_ms: u64,
    /// How often to snapshot to Redis.
    pub snapshot_interval_ms: u64,
    /// Whether to read location updates from the Redis stream.
    pub ingest_stream: bool,
    /// `GeoJSON` `FeatureCollection` of region polygons; none = one region.
    pub regions: Option<PathBuf>,
    /// Run as one node of a cluster: own regions under Redis leases and
    /// route requests for the others to their owners. Needs `redis_url`
    /// and `regions`.
    pub cluster: bool,
    /// The URL other nodes reach this one at; default `http://` + the bound address.
    pub advertise_url: Option<String>,
    /// Regions this node takes at start when free (`*` = every region of
    /// the file); other regions it takes only when their owner's lease
    /// lapses, or when a request first touches an unowned one.
    pub own_regions: Vec<String>,
    /// How long a region lease lasts without renewal (renewed every third).
    pub lease_ttl_ms: u64,
    /// Threads serving requests; 0 = one per core.
    pub workers: usize,
    /// How long ended matches stay readable (`GET /v1/matches/{id}`).
    pub match_retention_s: u64,
    /// At most this many ended matches are kept; past it the oldest are
    /// forgotten before their retention ends.
    pub max_ended_matches: usize,
    /// Time a client has to send a request's head, in ms, counted from its
    /// first byte (from the accept, for a new connection).
    pub header_read_timeout_ms: u64,
    /// How long a keep-alive connection may sit idle between requests, in
    /// ms.
    pub idle_timeout_ms: u64,
    /// Connections open at once; 0 = the process's file limit less 128.
    pub max_connections: usize,
    /// How far ahead of this server's clock a fix's `ts` may be; a later
    /// one is refused with `invalid_timestamp`.
    pub max_clock_skew_ms: u64,
    /// The secret nodes of a cluster present to each other (never a client
    /// token). Required in cluster mode unless `insecure_cluster`.
    pub cluster_secret: Option<Secret>,
    /// Runs a cluster without a secret: any caller that names itself a
    /// node reaches the node-only operations. For a laptop, never for a
    /// network.
    pub insecure_cluster: bool,
    /// Events held for SSE resumption (`Last-Event-ID`); 0 turns events
    /// off (no feed, no Redis stream, no webhooks).
    pub event_backlog: usize,
    /// With Redis, events also go to the stream `<redis_prefix>:events`,
    /// capped near this many entries (`XADD … MAXLEN ~`); 0 = no stream.
    pub event_stream_maxlen: usize,
    /// `GeoJSON` `FeatureCollection` of named zones whose entries and exits
    /// are announced (`driver.entered`, `driver.left`).
    pub zones: Option<PathBuf>,
    /// URLs every event is sent to (`POST`, in small batches), signed.
    pub webhooks: Vec<String>,
    /// The key of the webhooks' HMAC-SHA256 signature; required with
    /// webhooks.
    pub webhook_secret: Option<Secret>,
    /// Events queued per webhook while it is slow or down; past it they
    /// are dropped and counted.
    pub webhook_queue: usize,
}

/// What a client token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenScope {
    /// Reads: nearest, drivers, matches, regions, the cluster.
    Read,
    /// Driver positions and statuses: PUT a driver, locations, the stream.
    Locations,
    /// Claims, confirm, release, complete, batches.
    Matches,
    /// Everything, removing drivers included.
    Admin,
}

impl TokenScope {
    /// Its name in files and messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Locations => "locations",
            Self::Matches => "matches",
            Self::Admin => "admin",
        }
    }
}

/// A client token with a name (for logs and rate limits) and scopes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientToken {
    /// Who holds it.
    pub name: String,
    /// The bearer token itself.
    pub token: Secret,
    /// What it may do.
    pub scopes: Vec<TokenScope>,
}

impl ClientToken {
    /// Whether it may do what `scope` covers.
    pub fn allows(&self, scope: TokenScope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == TokenScope::Admin)
    }
}

/// The body of a `--tokens-file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<ClientToken>,
}

/// A secret setting: compared, sent, never printed.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The shortest secret accepted.
    pub const MIN_LEN: usize = 16;

    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself, for comparing and sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            node_id: "node-1".to_owned(),
            resolution: 6,
            driver_ttl_s: 120,
            max_radius_m: 500_000.0,
            body_limit_bytes: 8 * 1024 * 1024,
            api_tokens: Vec::new(),
            tokens: Vec::new(),
            jwt_hs256_secret_file: None,
            jwt_rs256_public_key_file: None,
            jwt_es256_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            rate_limit_per_s: 0,
            rate_limit_burst: 100,
            max_in_flight: 1024,
            request_timeout_ms: 10_000,
            sweep_interval_ms: 1000,
            max_batch_items: 10_000,
            load_drivers: None,
            redis_url: None,
            redis_prefix: "hexmatch".to_owned(),
            redis_replicas: 0,
            redis_wait_ms: 1_000,
            snapshot_interval_ms: 30_000,
            ingest_stream: true,
            regions: None,
            cluster: false,
            advertise_url: None,
            own_regions: Vec::new(),
            lease_ttl_ms: 5_000,
            workers: 0,
            match_retention_s: 3_600,
            max_ended_matches: 1_000_000,
            max_clock_skew_ms: 300_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 0,
            cluster_secret: None,
            insecure_cluster: false,
            event_backlog: 10_000,
            event_stream_maxlen: 100_000,
            zones: None,
            webhooks: Vec::new(),
            webhook_secret: None,
            webhook_queue: 10_000,
        }
    }
}

/// The seed URLs of `url`: comma-separated URLs name cluster nodes.
///
/// # Errors
/// A part that is not a Redis URL (the message never repeats the URL,
/// which may hold a password).
pub fn redis_seeds(url: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err("--redis-url is empty".to_owned());
    }
    for (i, u) in urls.iter().enumerate() {
        if let Err(e) = redis::Client::open(u.as_str()) {
            let which = if urls.len() > 1 {
                format!("part {} of --redis-url", i + 1)
            } else {
                "--redis-url".to_owned()
            };
            return Err(format!(
                "{which} is not a Redis URL (redis://, rediss:// or unix://): {e}"
            ));
        }
    }
    Ok(urls)
}

/// Flags of `hexmatch serve`; each also reads `HEXMATCH_<FLAG>`.
#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (`snake_case` keys).
    #[arg(long, env = "HEXMATCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "HEXMATCH_BIND")]
    pub bind: Option<SocketAddr>,
    /// This node's id [default: node-1].
    #[arg(long, env = "HEXMATCH_NODE_ID")]
    pub node_id: Option<String>,
    /// H3 resolution of the partition cells, 0–15 [default: 6].
    #[arg(long, env = "HEXMATCH_RESOLUTION")]
    pub resolution: Option<u8>,
    /// Remove drivers silent this many seconds; 0 = never [default: 120].
    #[arg(long, env = "HEXMATCH_DRIVER_TTL_S")]
    pub driver_ttl_s: Option<u64>,
    /// Search limit for queries without `radius_m`, metres [default: 500000].
    #[arg(long, env = "HEXMATCH_MAX_RADIUS_M")]
    pub max_radius_m: Option<f64>,
    /// Largest request body in bytes [default: 8 MiB].
    #[arg(long, env = "HEXMATCH_BODY_LIMIT_BYTES")]
    pub body_limit_bytes: Option<usize>,
    /// Comma-separated bearer tokens for /v1 (empty: no auth).
    #[arg(long, env = "HEXMATCH_API_TOKENS", value_delimiter = ',')]
    pub api_tokens: Option<Vec<String>>,
    /// Requests per second per client; 0 = unlimited [default: 0].
    #[arg(long, env = "HEXMATCH_RATE_LIMIT_PER_S")]
    pub rate_limit_per_s: Option<u32>,
    /// Burst above the rate [default: 100].
    #[arg(long, env = "HEXMATCH_RATE_LIMIT_BURST")]
    pub rate_limit_burst: Option<u32>,
    /// Requests in flight before shedding load [default: 1024].
    #[arg(long, env = "HEXMATCH_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Request timeout in ms [default: 10000].
    #[arg(long, env = "HEXMATCH_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Expiry sweep interval in ms [default: 1000].
    #[arg(long, env = "HEXMATCH_SWEEP_INTERVAL_MS")]
    pub sweep_interval_ms: Option<u64>,
    /// Most items per batch request [default: 10000].
    #[arg(long, env = "HEXMATCH_MAX_BATCH_ITEMS")]
    pub max_batch_items: Option<usize>,
    /// CSV of drivers, of positions (`vehicle_id,timestamp,lat,lon`, as
    /// `replay positions` reads) or of trips (one driver per drop-off) to
    /// load at start.
    #[arg(long, env = "HEXMATCH_LOAD_DRIVERS")]
    pub load_drivers: Option<PathBuf>,
    /// Redis URL for persistence (`redis://host:port`, `redis+unix:///path`),
    /// or comma-separated URLs of Redis Cluster nodes; none = memory only.
    #[arg(long, env = "HEXMATCH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key [default: hexmatch].
    #[arg(long, env = "HEXMATCH_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// Replicas that must acknowledge a durable write (match records,
    /// leases) before it is answered, with `WAIT` [default: 0].
    #[arg(long, env = "HEXMATCH_REDIS_REPLICAS")]
    pub redis_replicas: Option<u32>,
    /// How long a durable write waits for those replicas, in ms; past it
    /// the request is refused with 503 [default: 1000].
    #[arg(long, env = "HEXMATCH_REDIS_WAIT_MS")]
    pub redis_wait_ms: Option<u64>,
    /// Snapshot interval in ms [default: 30000].
    #[arg(long, env = "HEXMATCH_SNAPSHOT_INTERVAL_MS")]
    pub snapshot_interval_ms: Option<u64>,
    /// Read location updates from the Redis stream `<prefix>:locations`
    /// (`--ingest-stream` alone means true) [default: true].
    #[arg(long, env = "HEXMATCH_INGEST_STREAM", num_args = 0..=1, default_missing_value = "true")]
    pub ingest_stream: Option<bool>,
    /// `GeoJSON` of region polygons (e.g. `data/nyc_boroughs.geojson`); cells
    /// are assigned by centre; cells in no polygon form `outside-<cell>` regions.
    #[arg(long, env = "HEXMATCH_REGIONS")]
    pub regions: Option<PathBuf>,
    /// Run as a cluster node (needs --redis-url and --regions; `--cluster`
    /// alone means true) [default: false].
    #[arg(long, env = "HEXMATCH_CLUSTER", num_args = 0..=1, default_missing_value = "true")]
    pub cluster: Option<bool>,
    /// URL other nodes reach this one at [default: `http://` + the bound address].
    #[arg(long, env = "HEXMATCH_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Comma-separated regions to take at start when free; `*` = all.
    #[arg(long, env = "HEXMATCH_OWN_REGIONS", value_delimiter = ',')]
    pub own_regions: Option<Vec<String>>,
    /// Region lease time-to-live in ms [default: 5000].
    #[arg(long, env = "HEXMATCH_LEASE_TTL_MS")]
    pub lease_ttl_ms: Option<u64>,
    /// Threads serving requests; 0 = one per core [default: 0].
    #[arg(long, env = "HEXMATCH_WORKERS")]
    pub workers: Option<usize>,
    /// How long ended matches stay readable, seconds [default: 3600].
    #[arg(long, env = "HEXMATCH_MATCH_RETENTION_S")]
    pub match_retention_s: Option<u64>,
    /// Most ended matches kept readable [default: 1000000].
    #[arg(long, env = "HEXMATCH_MAX_ENDED_MATCHES")]
    pub max_ended_matches: Option<usize>,
    /// Time a client has to send a request's head, in ms, from its first
    /// byte (from the accept, for a new connection) [default: 10000].
    #[arg(long, env = "HEXMATCH_HEADER_READ_TIMEOUT_MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// How long a keep-alive connection may sit idle between requests, in
    /// ms [default: 60000].
    #[arg(long, env = "HEXMATCH_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Connections open at once [default: 0 = the process's file limit
    /// less 128].
    #[arg(long, env = "HEXMATCH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// How far ahead of the server's clock a location's `ts` may be, in ms;
    /// a later one is refused with `invalid_timestamp` [default: 300000].
    #[arg(long, env = "HEXMATCH_MAX_CLOCK_SKEW_MS")]
    pub max_clock_skew_ms: Option<u64>,
    /// The secret cluster nodes present to each other (at least 16
    /// characters, never a client token); required with --cluster. Prefer
    /// the environment variable or --cluster-secret-file to a flag, which
    /// other users of the machine can read.
    #[arg(long, env = "HEXMATCH_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// A TOML file of named client tokens with scopes: `[[tokens]]` tables
    /// of `name`, `token` and `scopes` (`read`, `locations`, `matches`,
    /// `admin`).
    #[arg(long, env = "HEXMATCH_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Accept JWTs signed with the HS256 secret in this file.
    #[arg(long, env = "HEXMATCH_JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<PathBuf>,
    /// Accept JWTs signed with the RSA key whose public half is in this PEM file (RS256).
    #[arg(long, env = "HEXMATCH_JWT_RS256_PUBLIC_KEY_FILE")]
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    /// Accept JWTs signed with the P-256 key whose public half is in this PEM file (ES256).
    #[arg(long, env = "HEXMATCH_JWT_ES256_PUBLIC_KEY_FILE")]
    pub jwt_es256_public_key_file: Option<PathBuf>,
    /// The issuer (`iss`) JWTs must name.
    #[arg(long, env = "HEXMATCH_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The audience (`aud`) JWTs must name.
    #[arg(long, env = "HEXMATCH_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// A file holding the cluster secret (surrounding whitespace ignored).
    #[arg(
        long,
        env = "HEXMATCH_CLUSTER_SECRET_FILE",
        conflicts_with = "cluster_secret"
    )]
    pub cluster_secret_file: Option<PathBuf>,
    /// Runs a cluster with no secret: anyone who names themselves a node
    /// reaches the node-only operations. For a laptop only.
    #[arg(long, env = "HEXMATCH_INSECURE_CLUSTER")]
    pub insecure_cluster: bool,
    /// Events held for `GET /v1/events` to resume from (`Last-Event-ID`);
    /// 0 turns events off: no feed, no Redis stream, no webhooks
    /// [default: 10000].
    #[arg(long, env = "HEXMATCH_EVENT_BACKLOG")]
    pub event_backlog: Option<usize>,
    /// With --redis-url, events also go to the stream
    /// `<redis-prefix>:events`, capped near this many entries (`MAXLEN ~`);
    /// 0 = no stream [default: 100000].
    #[arg(long, env = "HEXMATCH_EVENT_STREAM_MAXLEN")]
    pub event_stream_maxlen: Option<usize>,
    /// `GeoJSON` `FeatureCollection` of named zones (polygons; a point on
    /// the boundary is inside): `driver.entered` / `driver.left` are
    /// announced for them, as for the regions of --regions.
    #[arg(long, env = "HEXMATCH_ZONES")]
    pub zones: Option<PathBuf>,
    /// A URL every event is sent to (`POST`), as a JSON array of events (repeat
    /// the flag for several; comma-separated in the environment). Signed
    /// with `x-hexmatch-signature: sha256=<hex HMAC-SHA256 of the body>`,
    /// retried with backoff; needs --webhook-secret.
    #[arg(long = "webhook", env = "HEXMATCH_WEBHOOKS", value_delimiter = ',')]
    pub webhooks: Option<Vec<String>>,
    /// The key of the webhooks' signature.
    #[arg(long, env = "HEXMATCH_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Events queued per webhook while it is slow or down; past it they
    /// are dropped and counted in `hexmatch_events_dropped_total`
    /// [default: 10000].
    #[arg(long, env = "HEXMATCH_WEBHOOK_QUEUE")]
    pub webhook_queue: Option<usize>,
}

impl ServeArgs {
    /// Resolves the settings: defaults < file < environment and flags.
    ///
    /// # Errors
    /// [`ConfigError::File`] when a file cannot be read or parsed,
    /// [`ConfigError::Invalid`] for settings that do not go together.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let mut c = match &self.config {
            Some(path) => read_file(path)?,
            None => ServeConfig::default(),
        };
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        take!(
            bind,
            node_id,
            resolution,
            driver_ttl_s,
            max_radius_m,
            body_limit_bytes,
            api_tokens
        );
        take!(
            rate_limit_per_s,
            rate_limit_burst,
            max_in_flight,
            request_timeout_ms,
            sweep_interval_ms,
            max_batch_items
        );
        take!(redis_prefix, snapshot_interval_ms, ingest_stream);
        take!(redis_replicas, redis_wait_ms);
        take!(event_backlog, event_stream_maxlen, webhooks, webhook_queue);
        take!(cluster, own_regions, lease_ttl_ms);
        take!(header_read_timeout_ms, idle_timeout_ms, max_connections);
        take!(
            workers,
            match_retention_s,
            max_ended_matches,
            max_clock_skew_ms
        );
        if self.advertise_url.is_some() {
            c.advertise_url = self.advertise_url;
        }
        if self.load_drivers.is_some() {
            c.load_drivers = self.load_drivers;
        }
        if self.redis_url.is_some() {
            c.redis_url = self.redis_url;
        }
        if self.regions.is_some() {
            c.regions = self.regions;
        }
        if self.zones.is_some() {
            c.zones = self.zones;
        }
        if let Some(s) = self.webhook_secret {
            c.webhook_secret = Some(Secret(s));
        }
        macro_rules! take_some {
            ($($field:ident),*) => { $( if self.$field.is_some() { c.$field = self.$field.clone(); } )* };
        }
        take_some!(
            jwt_hs256_secret_file,
            jwt_rs256_public_key_file,
            jwt_es256_public_key_file,
            jwt_issuer,
            jwt_audience
        );
        if let Some(path) = &self.tokens_file {
            let file = |message: String| ConfigError::File {
                path: path.clone(),
                message,
            };
            let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
            let parsed: TokensFile = toml::from_str(&text).map_err(|e| file(e.to_string()))?;
            c.tokens.extend(parsed.tokens);
        }
        if let Some(s) = self.cluster_secret {
            c.cluster_secret = Some(Secret(s));
        }
        if let Some(path) = &self.cluster_secret_file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.clone(),
                message: e.to_string(),
            })?;
            c.cluster_secret = Some(Secret(text.trim().to_owned()));
        }
        c.insecure_cluster |= self.insecure_cluster;
        c.api_tokens.retain(|t| !t.is_empty());
        c.own_regions.retain(|r| !r.trim().is_empty());
        c.check().map_err(ConfigError::Invalid)?;
        Ok(c)
    }
}

impl ServeConfig {
    /// Every client token: each of `api_tokens` (named `token-1`, … with
    /// every scope), then the named ones.
    pub fn client_tokens(&self) -> Vec<ClientToken> {
        self.api_tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ClientToken {
                name: format!("token-{}", i + 1),
                token: Secret(t.clone()),
                scopes: vec![TokenScope::Admin],
            })
            .chain(self.tokens.iter().cloned())
            .collect()
    }

    /// Checks that the settings go together.
    ///
    /// # Errors
    /// A message saying which settings conflict and what to do.
    pub fn check(&self) -> Result<(), String> {
        if self.redis_wait_ms == 0 && self.redis_replicas > 0 {
            return Err("redis_wait_ms must be above 0 when redis_replicas is set (WAIT 0 would wait forever)".to_owned());
        }
        if self.cluster && (self.redis_url.is_none() || self.regions.is_none()) {
            return Err("--cluster needs --redis-url and --regions".to_owned());
        }
        if let Some(url) = &self.redis_url {
            redis_seeds(url)?;
        }
        if self.redis_prefix.is_empty() || self.redis_prefix.contains(['{', '}']) {
            return Err(format!(
                "redis_prefix {:?} must be non-empty and hold no braces (they are Redis Cluster hash tags)",
                self.redis_prefix
            ));
        }
        if !self.webhooks.is_empty() {
            if self.webhook_secret.as_ref().is_none_or(|s| s.0.is_empty()) {
                return Err(
                    "--webhook needs --webhook-secret (the key of the signature receivers check)"
                        .to_owned(),
                );
            }
            if self.event_backlog == 0 {
                return Err("--webhook needs events on; --event-backlog is 0".to_owned());
            }
            if let Some(bad) = self.webhooks.iter().find(|u| !u.starts_with("http://")) {
                return Err(format!(
                    "webhook {bad:?} is not an http:// URL (this build has no TLS client; put a TLS proxy in front of an https receiver)"
                ));
            }
        }
        if self.cluster && self.lease_ttl_ms < 300 {
            return Err(format!(
                "lease_ttl_ms {} is too short; at least 300",
                self.lease_ttl_ms
            ));
        }
        let tokens = self.client_tokens();
        for (i, t) in tokens.iter().enumerate() {
            if t.token.0.is_empty() || t.name.is_empty() {
                return Err(format!("client token {} has an empty name or token", i + 1));
            }
            if tokens[..i].iter().any(|u| u.name == t.name) {
                return Err(format!("two client tokens are named {:?}", t.name));
            }
            if tokens[..i].iter().any(|u| u.token == t.token) {
                return Err(format!("client token {:?} repeats another's token", t.name));
            }
        }
        match &self.cluster_secret {
            None if self.cluster && !self.insecure_cluster => {
                return Err("--cluster needs a cluster secret (--cluster-secret-file, HEXMATCH_CLUSTER_SECRET or --cluster-secret); --insecure-cluster runs without one, on a laptop only".to_owned());
            }
            Some(s) if s.0.len() < Secret::MIN_LEN => {
                return Err(format!(
                    "the cluster secret is {} characters; at least {}",
                    s.0.len(),
                    Secret::MIN_LEN
                ));
            }
            Some(s) if !s.0.bytes().all(|b| b.is_ascii_graphic()) => {
                return Err(
                    "the cluster secret must be visible ASCII (no spaces or control characters)"
                        .to_owned(),
                );
            }
            Some(s) if self.client_tokens().iter().any(|t| t.token == *s) => {
                return Err("the cluster secret is also a client token; it must not be".to_owned());
            }
            _ => {}
        }
        Ok(())
    }
}

/// A `HEXMATCH_*` environment variable that no setting reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVar {
    /// Its name.
    pub name: String,
    /// The known variable it most likely meant, if one is close.
    pub closest: Option<String>,
}

/// Variables read outside the flags.
const OTHER_VARS: &[&str] = &["HEXMATCH_LOG_JSON"];

/// The `HEXMATCH_*` names among `names` that `hexmatch serve` does not
/// read, each with the closest known name (a misspelt variable would
/// otherwise be silently ignored).
pub fn unknown_env_vars(names: impl IntoIterator<Item = String>) -> Vec<UnknownVar> {
    use clap::Args as _;
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut known: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env()?.to_str().map(str::to_owned))
        .collect();
    known.extend(OTHER_VARS.iter().map(|v| (*v).to_owned()));
    let mut out: Vec<UnknownVar> = names
        .into_iter()
        .filter(|n| n.starts_with("HEXMATCH_") && !known.contains(n))
        .map(|name| {
            let closest = known
                .iter()
                .map(|k| (edit_distance(&name, k), k))
                .filter(|(d, _)| *d <= 3)
                .min()
                .map(|(_, k)| k.clone());
            UnknownVar { name, closest }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Levenshtein distance of two ASCII-ish names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Why the settings could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A file (the config file, the secret file) cannot be read or parsed.
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Settings that do not go together.
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File { path, message } => write!(f, "{}: {message}", path.display()),
            Self::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ConfigError {}

fn read_file(path: &Path) -> Result<ServeConfig, ConfigError> {
    let file = |message: String| ConfigError::File {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    toml::from_str(&text).map_err(|e| file(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("hexmatch-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "resolution = 7\nnode_id = \"a\"\napi_tokens = [\"t1\"]\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            node_id: Some("b".into()),
            ..ServeArgs::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(
            (c.resolution, c.node_id.as_str(), c.api_tokens.as_slice()),
            (7, "b", ["t1".to_owned()].as_slice())
        );
        assert_eq!(c.max_in_flight, ServeConfig::default().max_in_flight);
        std::fs::write(&file, "resoluton = 7\n").unwrap();
        let err = ServeArgs {
            config: Some(file.clone()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            matches!(&err, ConfigError::File { path, message }
                if *path == file && message.lines().any(|l| l.starts_with("unknown field `resoluton`"))),
            "{err:?}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_misspelt_variable_is_named_with_what_it_meant() {
        let names = [
            "HEXMATCH_BIND",
            "HEXMATCH_BIDN",
            "HEXMATCH_LOG_JSON",
            "HEXMATCH_WHATEVER_ELSE_ENTIRELY",
            "PATH",
        ]
        .map(str::to_owned);
        let unknown = unknown_env_vars(names);
        assert_eq!(
            unknown,
            vec![
                UnknownVar {
                    name: "HEXMATCH_BIDN".into(),
                    closest: Some("HEXMATCH_BIND".into())
                },
                UnknownVar {
                    name: "HEXMATCH_WHATEVER_ELSE_ENTIRELY".into(),
                    closest: None
                },
            ]
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    fn cluster() -> ServeConfig {
        ServeConfig {
            cluster: true,
            redis_url: Some("redis://127.0.0.1:1".into()),
            regions: Some("regions.geojson".into()),
            ..ServeConfig::default()
        }
    }

    #[test]
    fn a_cluster_needs_a_secret_that_is_no_client_token() {
        assert!(cluster().check().is_err(), "no secret");
        let insecure = ServeConfig {
            insecure_cluster: true,
            ..cluster()
        };
        assert_eq!(insecure.check(), Ok(()));
        let short = ServeConfig {
            cluster_secret: Some(Secret::new("short")),
            ..cluster()
        };
        assert!(short.check().is_err());
        let secret = "a-long-enough-cluster-secret";
        let shared = ServeConfig {
            cluster_secret: Some(Secret::new(secret)),
            api_tokens: vec![secret.into()],
            ..cluster()
        };
        assert!(shared.check().is_err(), "a client token as the secret");
        let good = ServeConfig {
            cluster_secret: Some(Secret::new(secret)),
            api_tokens: vec!["client".into()],
            ..cluster()
        };
        assert_eq!(good.check(), Ok(()));
        assert_eq!(format!("{:?}", good.cluster_secret), "Some(Secret(…))");
    }

    #[test]
    fn the_secret_file_is_read_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("hexmatch-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "  from-a-file-0123456789\n").unwrap();
        let c = ServeArgs {
            cluster_secret_file: Some(file),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            c.cluster_secret,
            Some(Secret::new("from-a-file-0123456789"))
        );
        let missing = ServeArgs {
            cluster_secret_file: Some(dir.join("nope")),
            ..ServeArgs::default()
        }
        .resolve();
        assert!(matches!(missing, Err(ConfigError::File { .. })));
        std::fs::remove_dir_all(&dir).ok();
    }
}
