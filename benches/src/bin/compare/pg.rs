//! PostGIS: a scratch database (`hexmatch_compare_<pid>`) in a local
//! PostgreSQL, dropped at the end; drivers in a `geography(Point, 4326)`
//! column with a GiST index, queried with the index-assisted KNN
//! `ORDER BY geog <-> point LIMIT k` (sphere distance for geography).

use std::fmt::Write as _;
use std::str::FromStr;

use futures_util::SinkExt;
use hyper::body::Bytes;
use tokio_postgres::config::Host;
use tokio_postgres::{Config, NoTls, Statement};

use crate::answers::{Answer, Case};

/// Rows per COPY message when loading.
const ROWS_PER_COPY_CHUNK: usize = 50_000;

/// The KNN query: `$1` lon, `$2` lat, `$3` k. `ST_Distance(…, false)` is
/// the sphere distance (mean radius 6 371 008.77 m), like hexmatch's.
const KNN_SQL: &str = "SELECT id, ST_Distance(geog, q, false) \
     FROM drivers, (SELECT ST_SetSRID(ST_MakePoint($1, $2), 4326)::geography AS q) AS p \
     ORDER BY geog <-> q LIMIT $3";

/// Whether `config` names a PostgreSQL on this machine.
fn is_local(config: &Config) -> bool {
    !config.get_hosts().is_empty()
        && config.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        })
}

/// The server's message, which `Display` of a database error leaves out.
fn pg_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(
        || e.to_string(),
        |db| format!("{}: {}", db.severity(), db.message()),
    )
}

async fn connect(config: &Config) -> Result<(tokio_postgres::Client, u32), String> {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("connecting to PostgreSQL: {}", pg_error(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    Ok((client, pid.unsigned_abs()))
}

/// The scratch database. Call [`Scratch::drop_database`] when done.
pub(crate) struct Scratch {
    admin: tokio_postgres::Client,
    config: Config,
    name: String,
}

/// What loading cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Loaded {
    /// Seconds for COPY.
    pub(crate) copy_s: f64,
    /// Seconds for `CREATE INDEX … USING gist` and ANALYZE.
    pub(crate) index_s: f64,
    /// `pg_total_relation_size('drivers')`: table plus index, bytes.
    pub(crate) bytes: u64,
}

impl Scratch {
    /// Creates the scratch database in the server `conn_str` names
    /// (libpq key=value or URL form) and installs PostGIS in it.
    pub(crate) async fn create(conn_str: &str) -> Result<Self, String> {
        let base = Config::from_str(conn_str).map_err(|e| format!("{conn_str:?}: {e}"))?;
        if !is_local(&base) {
            return Err(format!(
                "{conn_str:?} is not on this machine; the harness only talks to loopback"
            ));
        }
        let (admin, _) = connect(&base).await?;
        let name = format!("hexmatch_compare_{}", std::process::id());
        // Two statements: CREATE DATABASE cannot run in the implicit
        // transaction of a multi-statement query.
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .map_err(|e| format!("{sql}: {}", pg_error(&e)))?;
        }
        let mut config = base.clone();
        config.dbname(&name);
        let me = Self {
            admin,
            config,
            name,
        };
        let (db, _) = connect(&me.config).await?;
        if let Err(e) = db.batch_execute("CREATE EXTENSION postgis").await {
            drop(db);
            me.drop_database().await;
            return Err(format!(
                "CREATE EXTENSION postgis failed ({}); install it with `apt-get install postgresql-15-postgis-3`",
                pg_error(&e)
            ));
        }
        Ok(me)
    }

    /// Loads `(id, lat, lon)` rows with COPY, then builds the GiST index.
    pub(crate) async fn load(&self, drivers: &[(String, f64, f64)]) -> Result<Loaded, String> {
        let (db, _) = connect(&self.config).await?;
        db.batch_execute(
            "CREATE UNLOGGED TABLE drivers (id text NOT NULL, geog geography(Point, 4326) NOT NULL)",
        )
        .await
        .map_err(|e| e.to_string())?;
        let start = std::time::Instant::now();
        let sink = db
            .copy_in::<_, Bytes>("COPY drivers (id, geog) FROM STDIN")
            .await
            .map_err(|e| format!("COPY: {}", pg_error(&e)))?;
        let mut sink = Box::pin(sink);
        for chunk in drivers.chunks(ROWS_PER_COPY_CHUNK) {
            let mut text = String::with_capacity(chunk.len() * 64);
            for (id, lat, lon) in chunk {
                // Shortest round-trip formatting: the same doubles as the
                // engine's, parsed by PostGIS's WKT reader.
                writeln!(text, "{id}\tSRID=4326;POINT({lon} {lat})")
                    .expect("writing to a String cannot fail");
            }
            sink.send(Bytes::from(text))
                .await
                .map_err(|e| format!("COPY: {}", pg_error(&e)))?;
        }
        sink.as_mut()
            .finish()
            .await
            .map_err(|e| format!("COPY: {}", pg_error(&e)))?;
        let copy_s = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        db.batch_execute("CREATE INDEX drivers_geog ON drivers USING gist (geog); ANALYZE drivers")
            .await
            .map_err(|e| format!("CREATE INDEX: {}", pg_error(&e)))?;
        let index_s = start.elapsed().as_secs_f64();
        let bytes: i64 = db
            .query_one("SELECT pg_total_relation_size('drivers')", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        Ok(Loaded {
            copy_s,
            index_s,
            bytes: bytes.unsigned_abs(),
        })
    }

    /// The plan of one KNN query (to show it uses the GiST index).
    pub(crate) async fn explain(&self, k: usize) -> Result<String, String> {
        let (db, _) = connect(&self.config).await?;
        let rows = db
            .query(
                &format!(
                    "EXPLAIN {}",
                    KNN_SQL
                        .replace("$1", "-87.63")
                        .replace("$2", "41.88")
                        .replace("$3", &k.to_string())
                ),
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// A client connection with the KNN statement prepared.
    pub(crate) async fn client(&self, k: usize) -> Result<Client, String> {
        let (db, backend_pid) = connect(&self.config).await?;
        let knn = db
            .prepare_typed(
                KNN_SQL,
                &[
                    tokio_postgres::types::Type::FLOAT8,
                    tokio_postgres::types::Type::FLOAT8,
                    tokio_postgres::types::Type::INT8,
                ],
            )
            .await
            .map_err(|e| format!("PREPARE: {}", pg_error(&e)))?;
        Ok(Client {
            db,
            knn,
            k: k as i64,
            backend_pid,
            round_trips: 0,
        })
    }

    /// Drops the scratch database (closing any connection left to it).
    pub(crate) async fn drop_database(self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = self.admin.batch_execute(&sql).await {
            eprintln!(
                "warning: could not drop database {}: {}",
                self.name,
                pg_error(&e)
            );
        }
    }
}

/// One client connection.
pub(crate) struct Client {
    db: tokio_postgres::Client,
    knn: Statement,
    k: i64,
    /// The server process serving this connection (for its CPU time).
    pub(crate) backend_pid: u32,
    /// Queries sent.
    pub(crate) round_trips: u64,
}

impl Client {
    /// The k nearest drivers to the case's point.
    pub(crate) async fn nearest(&mut self, case: &Case) -> Result<Answer, String> {
        self.round_trips += 1;
        let rows = self
            .db
            .query(&self.knn, &[&case.lon(), &case.lat(), &self.k])
            .await
            .map_err(|e| format!("KNN query: {}", pg_error(&e)))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, f64>(1)))
            .collect())
    }
}
