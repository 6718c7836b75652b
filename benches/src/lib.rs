//! Workload generators shared by the hexmatch benches.
//!
//! Everything here is deterministic: the same `n` and seed give the same
//! drivers, moves and query points on every machine, so two bench runs
//! measure the same work.
//!
//! - [`city_drivers`] — N drivers in a 60 × 60 km square centred on Chicago,
//!   ~70 % of them around 40 Gaussian hot spots, the rest uniform.
//! - [`country_drivers`] — N drivers uniform over the continental US box.
//! - [`chicago_pickups`] — real pickup points from `data/chicago_trips.csv`,
//!   the query points for the city set; [`random_positions`] for the country set.
//! - [`Mover`] — an endless stream of location updates moving drivers a few
//!   hundred metres, with strictly increasing timestamps ([`next_ts`]);
//!   [`with_writer`] applies them from a second thread while a bench runs.
//! - [`build_engine`], [`measure_build`], [`rss_bytes`] — engines on a manual
//!   clock, and resident memory per driver.
//! - [`candidate_graph`] — the sparse order × driver graph that
//!   [`Engine::claim_batch`] hands to [`hexmatch::assign_min_cost`].
//! - [`Percentiles`] — latency percentiles of individually timed operations.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::fs;
use std::hint::black_box;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use hexmatch::{
    Capabilities, Driver, DriverId, DriverUpdate, EARTH_RADIUS_M, Engine, EngineConfig,
    ManualClock, NearestQuery, Position, Status, Timestamp, Vehicle,
};

/// Metres per degree of latitude (and of longitude on the equator).
pub const M_PER_DEG: f64 = EARTH_RADIUS_M * PI / 180.0;

/// The centre of the city set: Chicago's Loop, `(lat, lon)`.
pub const CHICAGO_CENTER: (f64, f64) = (41.88, -87.63);

/// Half the side of the city square, in metres (the square is 60 × 60 km).
pub const CITY_HALF_SIDE_M: f64 = 30_000.0;

/// Number of Gaussian hot spots in the city set.
pub const HOT_SPOTS: usize = 40;

/// Share of city drivers drawn from the hot spots (the rest are uniform).
pub const CLUSTERED_SHARE: f64 = 0.7;

/// The continental United States bounding box (ocean and borders included).
pub const US_BOUNDS: Bounds = Bounds {
    lat_min: 24.5,
    lat_max: 49.4,
    lon_min: -124.8,
    lon_max: -66.9,
};

/// The timestamp every generated driver starts with (2025-11-24, Unix ms).
/// Moves from [`next_ts`] are all later than this.
pub const BASE_TS_MS: i64 = 1_764_000_000_000;

/// How far a [`Mover`] moves a driver at most, in metres.
pub const DEFAULT_STEP_M: f64 = 300.0;

// ---------------------------------------------------------------------------
// Random numbers

/// `SplitMix64`: a tiny, fast, seedable generator, plenty for workloads
/// (not for anything cryptographic).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed; equal seeds give equal streams.
    pub const fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform in `0..n` (`n` must be positive).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// A standard normal deviate (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
    }

    /// Shuffles a slice in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

// ---------------------------------------------------------------------------
// Geometry

/// A latitude/longitude box, in degrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// Southern edge.
    pub lat_min: f64,
    /// Northern edge.
    pub lat_max: f64,
    /// Western edge.
    pub lon_min: f64,
    /// Eastern edge.
    pub lon_max: f64,
}

impl Bounds {
    /// The square of `2 · half_side_m` metres on a side centred on `(lat, lon)`.
    pub fn around(lat: f64, lon: f64, half_side_m: f64) -> Self {
        let dlat = half_side_m / M_PER_DEG;
        let dlon = half_side_m / (M_PER_DEG * lat.to_radians().cos());
        Self {
            lat_min: lat - dlat,
            lat_max: lat + dlat,
            lon_min: lon - dlon,
            lon_max: lon + dlon,
        }
    }

    /// Whether `(lat, lon)` lies inside (edges included).
    pub fn contains(&self, lat: f64, lon: f64) -> bool {
        (self.lat_min..=self.lat_max).contains(&lat) && (self.lon_min..=self.lon_max).contains(&lon)
    }

    /// A point uniform in latitude and longitude (not in area: at the US
    /// box's scale that over-weights the north a little, which is fine for a
    /// "sparse" workload).
    pub fn random_position(&self, rng: &mut SplitMix64) -> Position {
        let lat = rng.range(self.lat_min, self.lat_max);
        let lon = rng.range(self.lon_min, self.lon_max);
        Position::new(lat, lon).expect("a point inside valid bounds is a valid position")
    }
}

/// The city square: 60 × 60 km centred on [`CHICAGO_CENTER`].
pub fn chicago_bounds() -> Bounds {
    Bounds::around(CHICAGO_CENTER.0, CHICAGO_CENTER.1, CITY_HALF_SIDE_M)
}

/// `(lat, lon)` moved by `north_m` and `east_m` metres (flat-earth offset,
/// accurate to well under a metre at the distances used here).
pub fn offset(lat: f64, lon: f64, north_m: f64, east_m: f64) -> (f64, f64) {
    (
        lat + north_m / M_PER_DEG,
        lon + east_m / (M_PER_DEG * lat.to_radians().cos()),
    )
}

/// `n` points uniform in `bounds` (query points for the country set).
pub fn random_positions(bounds: Bounds, n: usize, seed: u64) -> Vec<Position> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| bounds.random_position(&mut rng)).collect()
}

/// Each position moved in a random direction by up to `max_m` metres
/// (uniform over the disc). The real pickups are rounded to about 230
/// distinct points; jittering them gives distinct addresses.
pub fn jitter(positions: &[Position], max_m: f64, seed: u64) -> Vec<Position> {
    let mut rng = SplitMix64::new(seed);
    positions
        .iter()
        .map(|p| {
            let r = max_m * rng.next_f64().sqrt();
            let a = rng.range(0.0, 2.0 * PI);
            let (lat, lon) = offset(p.lat(), p.lon(), r * a.sin(), r * a.cos());
            Position::new(lat, lon).unwrap_or(*p)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Drivers

/// The id of generated driver `i`: `d0000042`. Short enough to be stored
/// inline (no heap allocation), like typical production ids.
pub fn driver_id(i: usize) -> DriverId {
    DriverId::new(&format!("d{i:07}")).expect("generated driver ids are valid")
}

/// The timestamp generated drivers start with ([`BASE_TS_MS`]).
pub fn base_ts() -> Timestamp {
    Timestamp::from_millis(BASE_TS_MS).expect("BASE_TS_MS is in range")
}

/// Capability bits, looked up by name once.
#[derive(Debug, Clone, Copy)]
struct CapBits {
    cash: u16,
    card: u16,
    large_items: u16,
    pets: u16,
    wheelchair: u16,
    child_seat: u16,
    refrigerated: u16,
}

impl CapBits {
    fn new() -> Self {
        let bit = |name: &str| {
            Capabilities::from_names([name])
                .expect("capability names are known to the engine")
                .bits()
        };
        Self {
            cash: bit("cash"),
            card: bit("card"),
            large_items: bit("large_items"),
            pets: bit("pets"),
            wheelchair: bit("wheelchair"),
            child_seat: bit("child_seat"),
            refrigerated: bit("refrigerated"),
        }
    }
}

/// Status, vehicle and capabilities of a generated driver (the mix is
/// documented on [`city_drivers`]).
fn attributes(rng: &mut SplitMix64, bits: CapBits) -> (Status, Vehicle, Capabilities) {
    let s = rng.next_f64();
    let status = if s < 0.5 {
        Status::Available
    } else if s < 0.8 {
        Status::Busy
    } else {
        Status::Offline
    };
    let v = rng.next_f64();
    let vehicle = if v < 0.85 {
        Vehicle::Car
    } else if v < 0.90 {
        Vehicle::Van
    } else if v < 0.94 {
        Vehicle::Scooter
    } else if v < 0.97 {
        Vehicle::Bike
    } else if v < 0.99 {
        Vehicle::Truck
    } else {
        Vehicle::Walker
    };
    let mut caps = 0u16;
    for (p, b) in [
        (0.95, bits.card),
        (0.35, bits.cash),
        (0.10, bits.pets),
        (0.05, bits.child_seat),
        (0.01, bits.wheelchair),
    ] {
        if rng.chance(p) {
            caps |= b;
        }
    }
    if matches!(vehicle, Vehicle::Van | Vehicle::Truck) && rng.chance(0.7) {
        caps |= bits.large_items;
    }
    (status, vehicle, Capabilities::from_bits_truncate(caps))
}

/// Share of drivers with the rare capability (`refrigerated`).
pub const RARE_SHARE: f64 = 0.001;

/// The seed of the rare capability's own stream, mixed with the set's seed.
const RARE_STREAM: u64 = 0x0AAC_0FF1_CE00_0001;

/// Generated driver `i`. The rare capability is drawn from a stream of
/// its own (`rare`), independent of the one for positions and the other
/// attributes.
fn driver(
    i: usize,
    pos: Position,
    rng: &mut SplitMix64,
    rare: &mut SplitMix64,
    bits: CapBits,
) -> Driver {
    let (status, vehicle, mut capabilities) = attributes(rng, bits);
    if rare.chance(RARE_SHARE) {
        capabilities = Capabilities::from_bits_truncate(capabilities.bits() | bits.refrigerated);
    }
    Driver {
        id: driver_id(i),
        pos,
        ts: base_ts(),
        status,
        vehicle,
        capabilities,
        order_id: None,
        reserved_until: None,
    }
}

/// A Gaussian hot spot of the city model.
#[derive(Debug, Clone, Copy)]
struct HotSpot {
    lat: f64,
    lon: f64,
    sigma_m: f64,
}

/// The city model: hot spots with Zipf-like weights plus a uniform share.
#[derive(Debug, Clone)]
struct CityModel {
    bounds: Bounds,
    spots: Vec<HotSpot>,
    /// Cumulative weights, the last one 1.0.
    cumulative: Vec<f64>,
}

impl CityModel {
    fn new(rng: &mut SplitMix64) -> Self {
        let bounds = chicago_bounds();
        let (clat, clon) = CHICAGO_CENTER;
        // The first spot is downtown; the others scatter around it like
        // neighbourhood centres, airports and nightlife districts.
        let mut spots = vec![HotSpot {
            lat: clat,
            lon: clon,
            sigma_m: 1_500.0,
        }];
        while spots.len() < HOT_SPOTS {
            let (north, east) = (rng.normal() * 10_000.0, rng.normal() * 10_000.0);
            if north.abs() > 25_000.0 || east.abs() > 25_000.0 {
                continue;
            }
            let (lat, lon) = offset(clat, clon, north, east);
            spots.push(HotSpot {
                lat,
                lon,
                sigma_m: rng.range(500.0, 3_000.0),
            });
        }
        let weights: Vec<f64> = (0..spots.len())
            .map(|i| 1.0 / ((i + 1) as f64).powf(0.8))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        Self {
            bounds,
            spots,
            cumulative,
        }
    }

    fn sample(&self, rng: &mut SplitMix64) -> Position {
        if !rng.chance(CLUSTERED_SHARE) {
            return self.bounds.random_position(rng);
        }
        let u = rng.next_f64();
        let i = self
            .cumulative
            .partition_point(|&c| c <= u)
            .min(self.spots.len() - 1);
        let s = self.spots[i];
        loop {
            let (lat, lon) = offset(
                s.lat,
                s.lon,
                rng.normal() * s.sigma_m,
                rng.normal() * s.sigma_m,
            );
            if self.bounds.contains(lat, lon) {
                return Position::new(lat, lon).expect("a point inside the city is valid");
            }
        }
    }
}

/// `n` drivers "clustered like a real city" in the 60 × 60 km square around
/// Chicago ([`chicago_bounds`]): 70 % around 40 Gaussian hot spots (sigma
/// 0.5–3 km, downtown the heaviest), 30 % uniform. Ids are
/// [`driver_id`]`(0..n)`, every `ts` is [`base_ts`].
///
/// Status: 50 % available, 30 % busy, 20 % offline. Vehicle: 85 % car, 5 %
/// van, 4 % scooter, 3 % bike, 2 % truck, 1 % walker. Capabilities: card
/// 95 %, cash 35 %, pets 10 %, child seat 5 %, wheelchair 1 %,
/// refrigerated 0.1 % ([`RARE_SHARE`]), and large items for 70 % of vans
/// and trucks. No driver has `hazmat` (nor any other capability), so a
/// filter on it matches nobody.
///
/// Lazy, so an engine can be bulk-loaded without a second copy of the set.
pub fn city_drivers(n: usize, seed: u64) -> impl Iterator<Item = Driver> {
    let mut rng = SplitMix64::new(seed);
    let mut rare = SplitMix64::new(seed ^ RARE_STREAM);
    let model = CityModel::new(&mut rng);
    let bits = CapBits::new();
    (0..n).map(move |i| {
        let pos = model.sample(&mut rng);
        driver(i, pos, &mut rng, &mut rare, bits)
    })
}

/// `n` drivers uniform over the continental US box ([`US_BOUNDS`]), with the
/// same attribute mix as [`city_drivers`].
pub fn country_drivers(n: usize, seed: u64) -> impl Iterator<Item = Driver> {
    let mut rng = SplitMix64::new(seed);
    let mut rare = SplitMix64::new(seed ^ RARE_STREAM);
    let bits = CapBits::new();
    (0..n).map(move |i| {
        let pos = US_BOUNDS.random_position(&mut rng);
        driver(i, pos, &mut rng, &mut rare, bits)
    })
}

// ---------------------------------------------------------------------------
// Query points

/// `data/chicago_trips.csv` at the repository root.
pub fn chicago_trips_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/chicago_trips.csv")
}

/// The pickup positions of a trips CSV (`trip_id,pickup_time,pickup_lat,pickup_lon,…`,
/// one header line), in file order.
///
/// # Errors
/// The file cannot be read, or a row has no valid pickup position.
pub fn load_pickups(path: &Path) -> io::Result<Vec<Position>> {
    let text = fs::read_to_string(path)?;
    let bad = |line: usize, what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}:{line}: {what}", path.display()),
        )
    };
    text.lines()
        .enumerate()
        .skip(1)
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let mut cols = line.split(',').skip(2);
            let mut num = || -> Option<f64> { cols.next()?.trim().parse().ok() };
            let (lat, lon) = num()
                .zip(num())
                .ok_or_else(|| bad(i + 1, "missing pickup_lat/pickup_lon"))?;
            Position::new(lat, lon).map_err(|e| bad(i + 1, &e.to_string()))
        })
        .collect()
}

/// The 11,615 real pickup points of `data/chicago_trips.csv`: the query
/// points for the city set (cycle through them).
///
/// # Panics
/// If the file is missing or malformed.
pub fn chicago_pickups() -> Vec<Position> {
    let path = chicago_trips_path();
    let pickups = load_pickups(&path)
        .unwrap_or_else(|e| panic!("reading pickups from {}: {e}", path.display()));
    assert!(!pickups.is_empty(), "{} has no trips", path.display());
    pickups
}

// ---------------------------------------------------------------------------
// Engines and memory

/// A default-config engine on a [`ManualClock`] standing at [`base_ts`],
/// bulk-loaded with `drivers`. The manual clock lets the match benches
/// age released matches past their retention and purge them.
///
/// One setting differs from the default: any `ts` ahead of the clock is
/// accepted (`max_future_ms`). Moves carry timestamps from [`next_ts`],
/// 1 ms apart, which run minutes ahead of the standing clock after a few
/// hundred thousand moves.
pub fn build_engine(drivers: impl IntoIterator<Item = Driver>) -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(base_ts()));
    let config = EngineConfig {
        max_future_ms: u64::MAX,
        ..EngineConfig::default()
    };
    let engine = Engine::with_clock(config, clock.clone()).expect("the config is valid");
    engine
        .bulk_load(drivers)
        .expect("generated drivers are never reserved and the engine is empty");
    (engine, clock)
}

/// Resident set size of this process in bytes (`VmRSS` of
/// `/proc/self/status`), or `None` where that is not available.
pub fn rss_bytes() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resident memory before and after building something of `drivers` drivers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryReport {
    /// How many drivers were built.
    pub drivers: usize,
    /// RSS before building, bytes.
    pub rss_before: u64,
    /// RSS after building, bytes.
    pub rss_after: u64,
    /// How long building took.
    pub build_time: Duration,
}

impl MemoryReport {
    /// RSS growth per driver, in bytes.
    pub fn bytes_per_driver(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.drivers.max(1) as f64
    }
}

/// Runs `build` and reports the RSS growth it caused, attributed to
/// `drivers` drivers. Pass a lazily generated driver set (like
/// [`city_drivers`]) so the input itself is not counted; transient
/// allocations of the build that the allocator keeps are counted, as they
/// would be in a server.
///
/// Returns `None` in the report's place when RSS is not readable.
pub fn measure_build<T>(drivers: usize, build: impl FnOnce() -> T) -> (T, Option<MemoryReport>) {
    let before = rss_bytes();
    let start = std::time::Instant::now();
    let built = build();
    let build_time = start.elapsed();
    let report = before.zip(rss_bytes()).map(|(b, a)| MemoryReport {
        drivers,
        rss_before: b,
        rss_after: a,
        build_time,
    });
    (built, report)
}

// ---------------------------------------------------------------------------
// Moves

static NEXT_TS: AtomicI64 = AtomicI64::new(BASE_TS_MS + 1);

/// A timestamp later than every one handed out before in this process (and
/// than [`base_ts`]), so every move applies instead of being `Stale`, even
/// when several [`Mover`]s drive the same engine.
pub fn next_ts() -> Timestamp {
    Timestamp::from_millis(NEXT_TS.fetch_add(1, Ordering::Relaxed))
        .expect("timestamps stay in range")
}

/// An endless stream of location updates: each call moves the next driver
/// (in a shuffled, then cyclic order) up to `max_step_m` metres in a random
/// direction, staying inside `bounds`, with a fresh [`next_ts`].
///
/// The mover tracks the positions it sent, so drivers random-walk and the
/// set keeps its shape. Moves of about 300 m cross a resolution-6 cell
/// border a few percent of the time, exercising the cross-shard path too.
#[derive(Debug, Clone)]
pub struct Mover {
    drivers: Vec<(DriverId, Position)>,
    next: usize,
    rng: SplitMix64,
    bounds: Bounds,
    max_step_m: f64,
}

impl Mover {
    /// A mover over `drivers` (their ids and current positions).
    ///
    /// # Panics
    /// If `drivers` is empty.
    pub fn new(
        drivers: impl IntoIterator<Item = (DriverId, Position)>,
        bounds: Bounds,
        max_step_m: f64,
        seed: u64,
    ) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut drivers: Vec<_> = drivers.into_iter().collect();
        assert!(!drivers.is_empty(), "a mover needs drivers");
        rng.shuffle(&mut drivers);
        Self {
            drivers,
            next: 0,
            rng,
            bounds,
            max_step_m,
        }
    }

    /// A mover over generated drivers, keeping those `keep` accepts
    /// (e.g. only the available ones).
    pub fn from_drivers(
        drivers: impl IntoIterator<Item = Driver>,
        keep: impl Fn(&Driver) -> bool,
        bounds: Bounds,
        seed: u64,
    ) -> Self {
        Self::new(
            drivers
                .into_iter()
                .filter(|d| keep(d))
                .map(|d| (d.id, d.pos)),
            bounds,
            DEFAULT_STEP_M,
            seed,
        )
    }

    /// How many drivers it cycles over.
    pub fn len(&self) -> usize {
        self.drivers.len()
    }

    /// Always `false`: a mover has drivers.
    pub fn is_empty(&self) -> bool {
        self.drivers.is_empty()
    }

    /// The next move.
    pub fn next_update(&mut self) -> DriverUpdate {
        let len = self.drivers.len();
        let (id, pos) = &mut self.drivers[self.next];
        self.next = (self.next + 1) % len;
        let r = self.max_step_m * self.rng.next_f64();
        let (s, c) = self.rng.range(0.0, 2.0 * PI).sin_cos();
        for sign in [1.0, -1.0] {
            let (lat, lon) = offset(pos.lat(), pos.lon(), sign * r * s, sign * r * c);
            if self.bounds.contains(lat, lon)
                && let Ok(p) = Position::new(lat, lon)
            {
                *pos = p;
                break;
            }
        }
        DriverUpdate::location(id.clone(), *pos, Some(next_ts()))
    }
}

/// What a background writer ([`with_writer`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Moves applied.
    pub moves: u64,
    /// From the writer's start to its stop.
    pub elapsed: Duration,
}

impl WriterStats {
    /// The writer's achieved rate.
    pub fn moves_per_sec(&self) -> f64 {
        self.moves as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `body` on this thread while a second thread applies `mover`'s
/// moves to `engine` as fast as it can. `body` starts only once the writer
/// has applied its first moves, and the writer stops when `body` returns.
pub fn with_writer<R>(
    engine: &Engine,
    mut mover: Mover,
    body: impl FnOnce() -> R,
) -> (R, WriterStats) {
    let stop = AtomicBool::new(false);
    let started = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let start = Instant::now();
            let mut moves = 0u64;
            loop {
                for _ in 0..64 {
                    let applied = engine.upsert(&mover.next_update());
                    black_box(applied.expect("generated moves are valid"));
                }
                moves += 64;
                started.store(true, Ordering::Release);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            WriterStats {
                moves,
                elapsed: start.elapsed(),
            }
        });
        while !started.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        let out = body();
        stop.store(true, Ordering::Relaxed);
        (
            out,
            writer.join().expect("the writer thread does not panic"),
        )
    })
}

// ---------------------------------------------------------------------------
// Batch matching

/// The graph of each pickup's own `candidates` nearest available drivers,
/// which [`Engine::claim_batch`] starts from before it adds shared windows
/// and widens where orders compete: `(n_cols, rows)` where row
/// i lists `(driver column, pickup distance in mm)`. The input of
/// [`hexmatch::assign_min_cost`].
///
/// # Panics
/// If `candidates` is not a valid `k`.
pub fn candidate_graph(
    engine: &Engine,
    pickups: &[Position],
    candidates: usize,
) -> (usize, Vec<Vec<(usize, i64)>>) {
    let mut columns: HashMap<DriverId, usize> = HashMap::new();
    let rows = pickups
        .iter()
        .map(|&p| {
            let q = NearestQuery::new(p, candidates).expect("candidates is a valid k");
            engine
                .nearest(&q)
                .expect("a constructed query is valid")
                .into_iter()
                .map(|n| {
                    let next = columns.len();
                    let col = *columns.entry(n.id).or_insert(next);
                    (col, (n.distance_m * 1000.0).round() as i64)
                })
                .collect()
        })
        .collect();
    (columns.len(), rows)
}

// ---------------------------------------------------------------------------
// Latency statistics

/// Percentiles of individually timed operations, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percentiles {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest sample.
    pub max: u64,
    /// Arithmetic mean.
    pub mean: u64,
}

impl Percentiles {
    /// Percentiles (nearest-rank) of `samples_ns`, which it sorts; `None`
    /// when empty.
    pub fn of(samples_ns: &mut [u64]) -> Option<Self> {
        if samples_ns.is_empty() {
            return None;
        }
        samples_ns.sort_unstable();
        let n = samples_ns.len();
        let rank = |p: f64| samples_ns[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        let sum: u128 = samples_ns.iter().map(|&s| u128::from(s)).sum();
        Some(Self {
            count: n,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: samples_ns[n - 1],
            mean: (sum / n as u128) as u64,
        })
    }
}

impl std::fmt::Display for Percentiles {
    /// `p50 … µs  p90 …  p99 …  p99.9 …  max …  mean …  (n = …)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |ns: u64| ns as f64 / 1000.0;
        write!(
            f,
            "p50 {:7.2} µs  p90 {:7.2}  p99 {:7.2}  p99.9 {:8.2}  max {:9.2}  mean {:7.2}  (n = {})",
            us(self.p50),
            us(self.p90),
            us(self.p99),
            us(self.p999),
            us(self.max),
            us(self.mean),
            self.count
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic_and_in_bounds() {
        let a: Vec<_> = city_drivers(2_000, 7).collect();
        let b: Vec<_> = city_drivers(2_000, 7).collect();
        assert_eq!(a, b);
        let city = chicago_bounds();
        assert!(a.iter().all(|d| city.contains(d.pos.lat(), d.pos.lon())));
        let available = a.iter().filter(|d| d.status == Status::Available).count();
        assert!((900..1100).contains(&available), "{available}");
        let cars = a.iter().filter(|d| d.vehicle == Vehicle::Car).count();
        assert!(cars > 1_500, "{cars}");
        assert!(country_drivers(1_000, 1).all(|d| US_BOUNDS.contains(d.pos.lat(), d.pos.lon())));
    }

    #[test]
    fn city_is_clustered() {
        // Far more drivers within 3 km of downtown than a uniform spread
        // (3 km disc / 3600 km² square ≈ 0.8 %) would put there.
        let centre = Position::new(CHICAGO_CENTER.0, CHICAGO_CENTER.1).unwrap();
        let n = 20_000;
        let near = city_drivers(n, 3)
            .filter(|d| d.pos.distance_m(centre) < 3_000.0)
            .count();
        assert!(near > n / 20, "{near}");
    }

    #[test]
    fn mover_moves_a_little_with_increasing_ts() {
        let mut m = Mover::from_drivers(city_drivers(100, 1), |_| true, chicago_bounds(), 2);
        let start: HashMap<_, _> = city_drivers(100, 1).map(|d| (d.id, d.pos)).collect();
        let mut last = base_ts();
        for _ in 0..100 {
            let u = m.next_update();
            let ts = u.ts.unwrap();
            assert!(ts > last);
            last = ts;
            assert!(u.pos.distance_m(start[&u.id]) <= DEFAULT_STEP_M + 1.0);
        }
    }

    #[test]
    fn pickups_load_and_percentiles_rank() {
        let p = chicago_pickups();
        assert_eq!(p.len(), 11_615);
        let mut s: Vec<u64> = (1..=1000).rev().collect();
        let q = Percentiles::of(&mut s).unwrap();
        assert_eq!(
            (q.p50, q.p90, q.p99, q.p999, q.max),
            (500, 900, 990, 999, 1000)
        );
        assert!(Percentiles::of(&mut []).is_none());
    }
}
