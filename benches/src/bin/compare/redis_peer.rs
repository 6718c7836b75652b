//! Redis GEO: a private `redis-server` started by the harness (never the
//! machine's), loaded with pipelined GEOADD, queried with
//! `GEOSEARCH key FROMLONLAT lon lat BYRADIUS r m ASC COUNT k WITHDIST`.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use crate::answers::{Answer, Case, from_redis_metres};

/// GEOADD members per command, and commands per pipeline, when loading.
const MEMBERS_PER_GEOADD: usize = 1_000;
const GEOADDS_PER_PIPELINE: usize = 16;

/// A `redis-server` child process on a free loopback port, with no
/// persistence; killed (and its directory removed) on drop.
pub(crate) struct PrivateRedis {
    child: Child,
    dir: PathBuf,
    /// `redis://127.0.0.1:PORT/`.
    pub(crate) url: String,
}

impl PrivateRedis {
    /// Starts `bin` and waits until it answers PING.
    pub(crate) fn start(bin: &Path) -> Result<Self, String> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("finding a free port: {e}"))?
            .port();
        let dir =
            std::env::temp_dir().join(format!("hexmatch-compare-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let child = Command::new(bin)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let me = Self {
            child,
            dir,
            url: format!("redis://127.0.0.1:{port}/"),
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(addr) {
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server did not answer on {addr} within 10 s (log: {})",
                    me.dir.join("redis.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// The server's process id (for its CPU time).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking `PING` over a fresh connection.
fn ping(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Whether `url` names a Redis on this machine (loopback or a unix socket).
pub(crate) fn is_local(url: &str) -> bool {
    let Ok(info) = redis::Client::open(url).map(|c| c.get_connection_info().clone()) else {
        return false;
    };
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, _) => {
            host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        redis::ConnectionAddr::Unix(_) => true,
        _ => false,
    }
}

/// A connection with no response timeout (the crate's default is 500 ms,
/// which a long load pipeline can exceed).
pub(crate) async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("redis url {url}: {e}"))?;
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("connecting to {url}: {e}"))
}

/// `used_memory` of `INFO memory`, bytes.
pub(crate) async fn used_memory(conn: &mut MultiplexedConnection) -> Result<u64, String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|e| format!("INFO memory: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "INFO memory has no used_memory".to_owned())
}

/// Loads `(id, lat, lon)` into the GEO set `key` with pipelined GEOADD.
pub(crate) async fn load(
    conn: &mut MultiplexedConnection,
    key: &str,
    drivers: &[(String, f64, f64)],
) -> Result<(), String> {
    for batch in drivers.chunks(MEMBERS_PER_GEOADD * GEOADDS_PER_PIPELINE) {
        let mut pipe = redis::pipe();
        for chunk in batch.chunks(MEMBERS_PER_GEOADD) {
            let cmd = pipe.cmd("GEOADD").arg(key);
            for (id, lat, lon) in chunk {
                cmd.arg(*lon).arg(*lat).arg(id);
            }
            cmd.ignore();
        }
        pipe.query_async::<()>(conn)
            .await
            .map_err(|e| format!("GEOADD: {e}"))?;
    }
    Ok(())
}

/// How the GEOSEARCH radius is chosen (see the README).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Radius {
    /// hexmatch's k-th distance × 1.01 + 1 m: one round trip with the
    /// smallest radius that holds the k nearest — Redis's best case, a
    /// radius no real client knows in advance.
    Oracle,
    /// One radius for every query: the largest oracle radius of the query
    /// set, so every query of the set gets its k in one round trip. What a
    /// client that must answer in one round trip uses: the radius sized
    /// for the sparsest pickup it serves, sent everywhere.
    Fixed(f64),
    /// What a client does without an oracle: start at this radius and
    /// double it until k drivers are found (or the max radius is reached).
    Expand {
        /// The first radius, metres.
        from_m: f64,
        /// The largest radius, metres.
        max_m: f64,
    },
}

/// One client connection (its own multiplexed connection, so clients do
/// not queue behind each other inside the driver).
pub(crate) struct Client {
    conn: MultiplexedConnection,
    key: String,
    k: usize,
    radius: Radius,
    /// GEOSEARCH commands sent.
    pub(crate) round_trips: u64,
}

impl Client {
    /// A client of the GEO set `key`.
    pub(crate) async fn connect(
        url: &str,
        key: &str,
        k: usize,
        radius: Radius,
    ) -> Result<Self, String> {
        Ok(Self {
            conn: connect(url).await?,
            key: key.to_owned(),
            k,
            radius,
            round_trips: 0,
        })
    }

    /// The k nearest members to the case's point.
    pub(crate) async fn nearest(&mut self, case: &Case) -> Result<Answer, String> {
        match self.radius {
            Radius::Oracle => self.geosearch(case, case.oracle_radius_m).await,
            Radius::Fixed(r) => self.geosearch(case, r).await,
            Radius::Expand { from_m, max_m } => {
                let mut r = from_m.min(max_m);
                loop {
                    let found = self.geosearch(case, r).await?;
                    if found.len() >= self.k || r >= max_m {
                        return Ok(found);
                    }
                    r = (r * 2.0).min(max_m);
                }
            }
        }
    }

    async fn geosearch(&mut self, case: &Case, radius_m: f64) -> Result<Answer, String> {
        self.round_trips += 1;
        let found: Vec<(String, f64)> = redis::cmd("GEOSEARCH")
            .arg(&self.key)
            .arg("FROMLONLAT")
            .arg(case.lon())
            .arg(case.lat())
            .arg("BYRADIUS")
            .arg(radius_m)
            .arg("m")
            .arg("ASC")
            .arg("COUNT")
            .arg(self.k)
            .arg("WITHDIST")
            .query_async(&mut self.conn)
            .await
            .map_err(|e| format!("GEOSEARCH: {e}"))?;
        Ok(found
            .into_iter()
            .map(|(id, d)| (id, from_redis_metres(d)))
            .collect())
    }
}
