//! Bad input to `hexmatch serve` outside HTTP, as tables that grow, one
//! per channel:
//!
//! - **Settings**: flags, `HEXMATCH_*` variables, the `--config` file, the
//!   tokens, secret, key and regions files — the real binary exits with the
//!   documented status (2 for bad usage or input, 1 for anything else) and
//!   a message that names the problem (and the file and line of a bad
//!   file).
//! - **Driver CSV** (`--load-drivers`): the binary exits 2 naming the file
//!   and line.
//! - **The Redis location stream**: an invalid entry is dead-lettered with
//!   its error code and fields, acknowledged, and changes nothing.
//! - **Snapshots**: garbled manifests, chunks, match records and keys of
//!   the wrong type; a restore skips what it cannot trust (falling back to
//!   the previous generation, or starting empty) or refuses with an error
//!   naming the key, and never loads half a snapshot.
//!
//! Every row checks that state is unchanged: for the binary, it never
//! served and wrote no Redis key; for the stream, the engine's drivers and
//! matches; for a restore, the engine holds exactly the fallback (or
//! nothing) and Redis is left as it was. One private `redis-server`
//! (`--save ''`, unix socket) serves every row; all rows run, and the
//! failures are reported together.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{RedisServer, redis_config, unique_prefix};
use hexmatch::{
    ChunkInfo, Driver, DriverId, Engine, EngineConfig, Manifest, Position, SNAPSHOT_FORMAT, Status,
    Timestamp, Vehicle,
};
use hexmatch_server::persist::Persistence;

/// The suite may grow, never shrink.
const MIN_ROWS: usize = 100;

// ---------------------------------------------------------------------------
// Settings and driver files: the real binary.
// ---------------------------------------------------------------------------

/// One run of `hexmatch serve` that must fail. In `args`, `env` and `says`,
/// `{file}` is the row's file (written from `file`), `{dir}` a directory,
/// `{busy}` an address already in use, `{redis}` the private Redis.
struct Cli {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    file: Option<&'static [u8]>,
    exit: i32,
    says: &'static [&'static str],
}

const fn cli(
    name: &'static str,
    args: &'static [&'static str],
    exit: i32,
    says: &'static [&'static str],
) -> Cli {
    Cli {
        name,
        args,
        env: &[],
        file: None,
        exit,
        says,
    }
}

const fn cli_file(
    name: &'static str,
    args: &'static [&'static str],
    file: &'static [u8],
    exit: i32,
    says: &'static [&'static str],
) -> Cli {
    Cli {
        name,
        args,
        env: &[],
        file: Some(file),
        exit,
        says,
    }
}

const fn cli_env(
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
    exit: i32,
    says: &'static [&'static str],
) -> Cli {
    Cli {
        name,
        args: &[],
        env,
        file: None,
        exit,
        says,
    }
}

/// A region file that parses (rows that fail before regions are read).
const REGIONS: &[u8] = br#"{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"name":"a"},"geometry":{"type":"Polygon","coordinates":[[[-87.7,41.8],[-87.6,41.8],[-87.6,41.9],[-87.7,41.9],[-87.7,41.8]]]}}]}"#;

// A table: one row per line.
#[rustfmt::skip]
const SETTINGS: &[Cli] = &[
    // Flags.
    cli("flag: unknown flag", &["--no-such-flag"], 2, &["--no-such-flag"]),
    cli("flag: a stray argument", &["extra"], 2, &["unexpected argument 'extra'"]),
    cli("flag: a flag without its value", &["--resolution"], 2, &["--resolution"]),
    cli("flag: bind not an address", &["--bind", "nowhere"], 2, &["'nowhere'", "--bind"]),
    cli("flag: bind without a port", &["--bind", "127.0.0.1"], 2, &["'127.0.0.1'", "--bind"]),
    cli("flag: bind address in use", &["--bind", "{busy}"], 1, &["in use"]),
    cli("flag: resolution 16", &["--resolution", "16"], 2, &["resolution 16 is not in 0..=15"]),
    cli("flag: resolution 256", &["--resolution", "256"], 2, &["'256'", "--resolution"]),
    cli("flag: resolution negative", &["--resolution=-1"], 2, &["'-1'", "--resolution"]),
    cli("flag: max radius 0", &["--max-radius-m", "0"], 2, &["max_radius_m 0 must be a positive number"]),
    cli("flag: max radius negative", &["--max-radius-m=-5"], 2, &["max_radius_m -5 must be a positive number"]),
    cli("flag: max radius NaN", &["--max-radius-m", "NaN"], 2, &["max_radius_m NaN must be a positive number"]),
    cli("flag: max radius infinite", &["--max-radius-m", "inf"], 2, &["max_radius_m inf must be a positive number"]),
    cli("flag: cluster maybe", &["--cluster", "maybe"], 2, &["'maybe'", "--cluster"]),
    cli("flag: ingest-stream yes", &["--ingest-stream", "yes"], 2, &["'yes'", "--ingest-stream"]),
    cli("flag: workers a word", &["--workers", "many"], 2, &["'many'", "--workers"]),
    cli("flag: body limit negative", &["--body-limit-bytes=-1"], 2, &["'-1'", "--body-limit-bytes"]),
    cli("flag: max in flight fractional", &["--max-in-flight", "1.5"], 2, &["'1.5'", "--max-in-flight"]),
    cli("flag: rate limit a word", &["--rate-limit-per-s", "lots"], 2, &["'lots'", "--rate-limit-per-s"]),
    cli("flag: driver ttl negative", &["--driver-ttl-s=-1"], 2, &["'-1'", "--driver-ttl-s"]),
    cli("flag: redis url not a URL", &["--redis-url", "not a url"], 2, &["--redis-url is not a Redis URL"]),
    cli("flag: cluster without regions", &["--cluster", "true"], 2, &["--cluster needs --redis-url and --regions"]),
    cli_file("flag: cluster lease too short", &["--cluster", "true", "--regions", "{file}", "--insecure-cluster", "--lease-ttl-ms", "100"], REGIONS, 2, &["lease_ttl_ms 100 is too short; at least 300"]),
    cli_file("flag: cluster without a secret", &["--cluster", "true", "--regions", "{file}"], REGIONS, 2, &["--cluster needs a cluster secret"]),
    cli("flag: cluster secret too short", &["--cluster-secret", "short"], 2, &["the cluster secret is 5 characters; at least 16"]),
    cli("flag: cluster secret with spaces", &["--cluster-secret", "a secret with spaces 0123"], 2, &["visible ASCII"]),
    cli("flag: cluster secret is a client token", &["--cluster-secret", "shared-secret-0123456789", "--api-tokens", "shared-secret-0123456789"], 2, &["the cluster secret is also a client token"]),
    cli_file("flag: secret and secret file", &["--cluster-secret", "a-long-enough-secret-0123", "--cluster-secret-file", "{file}"], b"another-secret-0123456789", 2, &["--cluster-secret", "cannot be used with"]),
    cli("flag: secret file missing", &["--cluster-secret-file", "/nonexistent/hexmatch.secret"], 2, &["/nonexistent/hexmatch.secret"]),
    cli_file("flag: secret file too short", &["--cluster-secret-file", "{file}"], b"  short\n", 2, &["the cluster secret is 5 characters"]),
    cli("flag: the same token twice", &["--api-tokens", "tok-a,tok-a"], 2, &["repeats another's token"]),
    cli_file("flag: HS256 secret too short", &["--jwt-hs256-secret-file", "{file}"], b"short\n", 2, &["{file}: an HS256 secret needs at least 16 bytes"]),
    cli("flag: HS256 secret file missing", &["--jwt-hs256-secret-file", "/nonexistent/jwt.secret"], 2, &["/nonexistent/jwt.secret"]),
    cli_file("flag: RS256 key not a key", &["--jwt-rs256-public-key-file", "{file}"], b"not a pem file\n", 2, &["{file}: not an RSA public key"]),
    cli_file("flag: ES256 key not a key", &["--jwt-es256-public-key-file", "{file}"], b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", 2, &["{file}: not an EC public key"]),
    cli("flag: regions file missing", &["--regions", "/nonexistent/regions.geojson"], 2, &["/nonexistent/regions.geojson"]),
    cli_file("flag: regions not JSON", &["--regions", "{file}"], b"not json", 2, &["{file}"]),
    cli_file("flag: regions not a feature collection", &["--regions", "{file}"], br#"{"type": "Point", "coordinates": [0, 0]}"#, 2, &["{file}"]),
    // The tokens file.
    cli("tokens file: missing", &["--tokens-file", "/nonexistent/tokens.toml"], 2, &["/nonexistent/tokens.toml"]),
    cli_file("tokens file: not TOML", &["--tokens-file", "{file}"], b"[[tokens]\nname = \"a\"\n", 2, &["{file}", "line 1"]),
    cli_file("tokens file: unknown scope", &["--tokens-file", "{file}"], b"[[tokens]]\nname = \"a\"\ntoken = \"token-a-0123\"\nscopes = [\"write\"]\n", 2, &["{file}", "line 4", "write"]),
    cli_file("tokens file: unknown key", &["--tokens-file", "{file}"], b"[[tokens]]\nname = \"a\"\ntoken = \"token-a-0123\"\nscopes = [\"read\"]\nrole = \"x\"\n", 2, &["{file}", "unknown field `role`"]),
    cli_file("tokens file: token missing", &["--tokens-file", "{file}"], b"[[tokens]]\nname = \"a\"\nscopes = [\"read\"]\n", 2, &["{file}", "missing field `token`"]),
    cli_file("tokens file: two tokens of one name", &["--tokens-file", "{file}"], b"[[tokens]]\nname = \"a\"\ntoken = \"token-a-0123\"\nscopes = [\"read\"]\n[[tokens]]\nname = \"a\"\ntoken = \"token-b-0123\"\nscopes = [\"read\"]\n", 2, &["two client tokens are named \"a\""]),
    cli_file("tokens file: an empty token", &["--tokens-file", "{file}"], b"[[tokens]]\nname = \"a\"\ntoken = \"\"\nscopes = [\"read\"]\n", 2, &["empty name or token"]),
    cli_file("tokens file: a token that is an api token", &["--tokens-file", "{file}", "--api-tokens", "token-a-0123"], b"[[tokens]]\nname = \"a\"\ntoken = \"token-a-0123\"\nscopes = [\"read\"]\n", 2, &["repeats another's token"]),
    // The config file.
    cli("config: missing", &["--config", "/nonexistent/hexmatch.toml"], 2, &["/nonexistent/hexmatch.toml"]),
    cli_file("config: not TOML", &["--config", "{file}"], b"max_in_flight = = 3\n", 2, &["{file}", "line 1"]),
    cli_file("config: unknown key", &["--config", "{file}"], b"node_id = \"n\"\nresoluton = 7\n", 2, &["{file}", "line 2", "unknown field `resoluton`"]),
    cli_file("config: a key in the wrong case", &["--config", "{file}"], b"Resolution = 7\n", 2, &["{file}", "unknown field `Resolution`"]),
    cli_file("config: wrong type", &["--config", "{file}"], b"max_in_flight = \"many\"\n", 2, &["{file}", "line 1"]),
    cli_file("config: bind not an address", &["--config", "{file}"], b"bind = \"nowhere\"\n", 2, &["{file}", "line 1"]),
    cli_file("config: a table for a value", &["--config", "{file}"], b"[bind]\nport = 1\n", 2, &["{file}"]),
    cli_file("config: resolution 16", &["--config", "{file}"], b"resolution = 16\n", 2, &["resolution 16 is not in 0..=15"]),
    cli_file("config: resolution 300", &["--config", "{file}"], b"resolution = 300\n", 2, &["{file}", "line 1"]),
    cli_file("config: max radius negative", &["--config", "{file}"], b"max_radius_m = -1.0\n", 2, &["max_radius_m -1 must be a positive number"]),
    cli_file("config: api tokens as text", &["--config", "{file}"], b"api_tokens = \"t\"\n", 2, &["{file}", "line 1"]),
    cli_file("config: a token with an unknown scope", &["--config", "{file}"], b"[[tokens]]\nname = \"a\"\ntoken = \"token-a-0123\"\nscopes = [\"root\"]\n", 2, &["{file}", "root"]),
    cli_file("config: cluster without regions", &["--config", "{file}"], b"cluster = true\n", 2, &["--cluster needs --redis-url and --regions"]),
    cli_file("config: cluster secret too short", &["--config", "{file}"], b"cluster_secret = \"short\"\n", 2, &["the cluster secret is 5 characters"]),
    // Environment variables.
    cli_env("env: resolution 99", &[("HEXMATCH_RESOLUTION", "99")], 2, &["resolution 99 is not in 0..=15"]),
    cli_env("env: bind not an address", &[("HEXMATCH_BIND", "nowhere")], 2, &["'nowhere'"]),
    cli_env("env: cluster yes", &[("HEXMATCH_CLUSTER", "yes")], 2, &["'yes'"]),
    cli_env("env: ingest stream 2", &[("HEXMATCH_INGEST_STREAM", "2")], 2, &["'2'"]),
    cli_env("env: workers negative", &[("HEXMATCH_WORKERS", "-2")], 2, &["'-2'"]),
    cli_env("env: max radius 0", &[("HEXMATCH_MAX_RADIUS_M", "0")], 2, &["max_radius_m 0 must be a positive number"]),
    cli_env("env: config file missing", &[("HEXMATCH_CONFIG", "/nonexistent/env.toml")], 2, &["/nonexistent/env.toml"]),
    cli_env("env: the same token twice", &[("HEXMATCH_API_TOKENS", "t1,t1")], 2, &["repeats another's token"]),
    cli_env("env: cluster secret too short", &[("HEXMATCH_CLUSTER_SECRET", "short")], 2, &["the cluster secret is 5 characters"]),
];

const fn csv(name: &'static str, file: &'static [u8], says: &'static [&'static str]) -> Cli {
    Cli {
        name,
        args: &["--load-drivers", "{file}"],
        env: &[],
        file: Some(file),
        exit: 2,
        says,
    }
}

// A table: one row per line.
#[rustfmt::skip]
const DRIVER_CSV: &[Cli] = &[
    csv("csv: empty file", b"", &["{file}:1: header needs driver_id (or vehicle_id),lat,lon"]),
    csv("csv: header of other columns", b"id,latitude,longitude\na,41.9,-87.6\n", &["{file}:1: header needs driver_id (or vehicle_id),lat,lon"]),
    csv("csv: header without lon", b"driver_id,lat\na,41.9\n", &["{file}:1: header needs"]),
    csv("csv: lat 91 on line 3", b"driver_id,lat,lon\na,41.9,-87.6\nb,91,-87.7\n", &["{file}:3: invalid position"]),
    csv("csv: lat not a number", b"driver_id,lat,lon\na,abc,-87.6\n", &["{file}:2: \"abc\" is not a number"]),
    csv("csv: lat empty", b"driver_id,lat,lon\na,,-87.6\n", &["{file}:2: \"\" is not a number"]),
    csv("csv: lon NaN", b"driver_id,lat,lon\na,41.9,NaN\n", &["{file}:2: invalid position"]),
    csv("csv: lat infinite", b"driver_id,lat,lon\na,inf,-87.6\n", &["{file}:2: invalid position"]),
    csv("csv: too few fields", b"driver_id,lat,lon\na,41.9\n", &["{file}:2: expected at least 3 fields"]),
    csv("csv: id with a space", b"driver_id,lat,lon\nb 1,41.9,-87.6\n", &["{file}:2: invalid id"]),
    csv("csv: empty id", b"driver_id,lat,lon\n,41.9,-87.6\n", &["{file}:2: invalid id"]),
    csv("csv: id of 65 characters", b"driver_id,lat,lon\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx,41.9,-87.6\n", &["{file}:2: invalid id"]),
    csv("csv: vehicle unknown", b"driver_id,lat,lon,vehicle\na,41.9,-87.6,boat\n", &["{file}:2:", "\"boat\""]),
    csv("csv: status unknown", b"driver_id,lat,lon,status\na,41.9,-87.6,flying\n", &["{file}:2:", "\"flying\""]),
    csv("csv: status reserved", b"driver_id,lat,lon,status\na,41.9,-87.6,reserved\n", &["{file}:2:", "\"reserved\""]),
    csv("csv: bad line after good ones", b"driver_id,lat,lon\na,41.9,-87.6\nb,41.8,-87.6\nc,41.7,-87.6\nd,41.6,-187.6\n", &["{file}:5: invalid position"]),
    csv("csv: not UTF-8", b"driver_id,lat,lon\n\xff\xfe,41.9,-87.6\n", &["{file}", "UTF-8"]),
    csv("csv: trips with a bad drop-off time", b"trip_id,pickup_time,pickup_lat,pickup_lon,dropoff_time,dropoff_lat,dropoff_lon\nt1,2026-11-25T10:00:00Z,41.9,-87.6,tomorrow,41.8,-87.6\n", &["{file}:2: invalid timestamp"]),
    csv("csv: trips with a drop-off off the map", b"trip_id,pickup_time,pickup_lat,pickup_lon,dropoff_time,dropoff_lat,dropoff_lon\nt1,2026-11-25T10:00:00Z,41.9,-87.6,2026-11-25T10:20:00Z,95,-87.6\n", &["{file}:2: invalid position"]),
    Cli {
        name: "csv: missing file",
        args: &["--load-drivers", "/nonexistent/drivers.csv"],
        env: &[],
        file: None,
        exit: 2,
        says: &["/nonexistent/drivers.csv"],
    },
    Cli {
        name: "csv: a directory",
        args: &["--load-drivers", "{dir}"],
        env: &[],
        file: None,
        exit: 2,
        says: &["{dir}"],
    },
];

/// What one run of the binary printed and how it ended.
struct Ran {
    exit: Option<i32>,
    stderr: String,
    served: bool,
}

/// Runs `hexmatch serve` with a clean environment: `--bind 127.0.0.1:0`
/// and the private Redis under `prefix` unless the row sets them. A run
/// that starts serving is killed at once (the input was accepted).
fn run_binary(args: &[String], env: &[(String, String)], redis: &str, prefix: &str) -> Ran {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hexmatch"));
    cmd.env_clear().arg("serve");
    let sets = |flag: &str, var: &str| {
        args.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
            || env.iter().any(|(k, _)| k == var)
    };
    if !sets("--bind", "HEXMATCH_BIND") {
        cmd.args(["--bind", "127.0.0.1:0"]);
    }
    if !sets("--redis-url", "HEXMATCH_REDIS_URL") {
        cmd.env("HEXMATCH_REDIS_URL", redis);
    }
    cmd.args(["--redis-prefix", prefix])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the binary runs");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    let mut served = false;
    let exit = loop {
        while let Ok(line) = rx.try_recv() {
            served |= line.contains("hexmatch serving");
            lines.push(line);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if served || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = reader.join();
    lines.extend(rx.try_iter());
    Ran {
        exit,
        stderr: lines.join("\n"),
        served,
    }
}

/// Runs every row of `rows`; returns the failures.
fn run_cli_rows(rows: &[Cli], redis: &str, dir: &std::path::Path, busy: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let mut conn = RedisServer::conn(redis);
    for (i, row) in rows.iter().enumerate() {
        let file = dir.join(format!("row-{i}"));
        if let Some(body) = row.file {
            std::fs::write(&file, body).expect("write the row's file");
        }
        let fill = |s: &str| {
            s.replace("{file}", &file.display().to_string())
                .replace("{dir}", &dir.display().to_string())
                .replace("{busy}", busy)
                .replace("{redis}", redis)
        };
        let args: Vec<String> = row.args.iter().map(|a| fill(a)).collect();
        let env: Vec<(String, String)> = row
            .env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), fill(v)))
            .collect();
        let prefix = unique_prefix("cli");
        let ran = run_binary(&args, &env, redis, &prefix);
        let mut fail = |what: String| failures.push(format!("{}: {what}", row.name));
        if ran.served {
            fail("started serving (the input was accepted)".into());
        } else if ran.exit != Some(row.exit) {
            fail(format!(
                "exit {:?}, want {}; stderr:\n{}",
                ran.exit, row.exit, ran.stderr
            ));
        }
        for says in row.says {
            let says = fill(says);
            if !ran.stderr.contains(&says) {
                fail(format!("stderr does not say {says:?}:\n{}", ran.stderr));
            }
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .expect("keys");
        if !keys.is_empty() {
            fail(format!("wrote to Redis: {keys:?}"));
        }
    }
    failures
}

// ---------------------------------------------------------------------------
// The Redis location stream.
// ---------------------------------------------------------------------------

/// An entry of `<prefix>:locations` that must be dead-lettered with `code`.
/// `{future}` in a value is a time a day ahead of now, in Unix ms.
struct Entry {
    name: &'static str,
    fields: &'static [(&'static str, &'static str)],
    code: &'static str,
}

const fn entry(
    name: &'static str,
    fields: &'static [(&'static str, &'static str)],
    code: &'static str,
) -> Entry {
    Entry { name, fields, code }
}

// A table: one row per line.
#[rustfmt::skip]
const STREAM: &[Entry] = &[
    entry("stream: id with a space", &[("driver_id", "bad one"), ("lat", "41.9"), ("lon", "-87.6")], "invalid_id"),
    entry("stream: empty id", &[("driver_id", ""), ("lat", "41.9"), ("lon", "-87.6")], "invalid_id"),
    entry("stream: id of 65 characters", &[("driver_id", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"), ("lat", "41.9"), ("lon", "-87.6")], "invalid_id"),
    entry("stream: id not ASCII", &[("driver_id", "café"), ("lat", "41.9"), ("lon", "-87.6")], "invalid_id"),
    entry("stream: lat 91", &[("driver_id", "s1"), ("lat", "91"), ("lon", "-87.6")], "invalid_position"),
    entry("stream: lon -180.5", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-180.5")], "invalid_position"),
    entry("stream: lat NaN", &[("driver_id", "s1"), ("lat", "NaN"), ("lon", "-87.6")], "invalid_position"),
    entry("stream: lat infinite", &[("driver_id", "s2"), ("lat", "inf"), ("lon", "-87.6")], "invalid_position"),
    entry("stream: lat not a number", &[("driver_id", "s1"), ("lat", "north"), ("lon", "-87.6")], "invalid_json"),
    entry("stream: lon empty", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "")], "invalid_json"),
    entry("stream: lat missing", &[("driver_id", "s1"), ("lon", "-87.6")], "invalid_json"),
    entry("stream: lon missing", &[("driver_id", "s2"), ("lat", "41.9")], "invalid_json"),
    entry("stream: id missing", &[("lat", "41.9"), ("lon", "-87.6")], "invalid_json"),
    entry("stream: unknown field", &[("driver_id", "s2"), ("lat", "41.9"), ("lon", "-87.6"), ("colour", "red")], "invalid_json"),
    entry("stream: field name in capitals", &[("driver_id", "s2"), ("LAT", "41.9"), ("lon", "-87.6")], "invalid_json"),
    entry("stream: a field given twice", &[("driver_id", "s1"), ("lat", "41.9"), ("lat", "41.8"), ("lon", "-87.6")], "invalid_json"),
    entry("stream: ts not a time", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-87.6"), ("ts", "yesterday")], "invalid_timestamp"),
    entry("stream: ts past i64", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-87.6"), ("ts", "99999999999999999999")], "invalid_timestamp"),
    entry("stream: ts negative", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-87.6"), ("ts", "-5")], "invalid_timestamp"),
    entry("stream: ts in year 10000", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-87.6"), ("ts", "253402300800000")], "invalid_timestamp"),
    entry("stream: ts a day ahead", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-87.6"), ("ts", "{future}")], "invalid_timestamp"),
    entry("stream: status reserved", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-87.6"), ("status", "reserved")], "invalid_parameter"),
    entry("stream: status unknown", &[("driver_id", "s2"), ("lat", "41.9"), ("lon", "-87.6"), ("status", "asleep")], "invalid_parameter"),
    entry("stream: vehicle unknown", &[("driver_id", "s2"), ("lat", "41.9"), ("lon", "-87.6"), ("vehicle", "boat")], "invalid_parameter"),
    entry("stream: capability unknown", &[("driver_id", "s1"), ("lat", "41.9"), ("lon", "-87.6"), ("capabilities", "cash,teleport")], "invalid_parameter"),
];

/// The engine state a bad entry must leave alone.
fn engine_state(e: &Engine) -> (Vec<Driver>, usize) {
    let mut d = e.drivers();
    d.sort_by(|a, b| a.id.cmp(&b.id));
    (d, e.live_matches())
}

async fn wait_ready(base: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("never ready".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The dead letter of stream entry `id`, once it is there.
async fn dead_letter(
    conn: &mut redis::aio::MultiplexedConnection,
    dead: &str,
    id: &str,
) -> Option<Vec<(String, String)>> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        // Raw XRANGE, so a field given twice is seen twice.
        let reply: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(dead)
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .ok()?;
        let found = reply.into_iter().find_map(|(_, flat)| {
            let pairs: Vec<(String, String)> = flat
                .chunks_exact(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            pairs
                .iter()
                .any(|(k, v)| k == "source_id" && v == id)
                .then_some(pairs)
        });
        if found.is_some() {
            return found;
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first value of field `name` in a stream entry's pairs.
fn field<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn run_stream_rows(url: &str) -> Vec<String> {
    let prefix = unique_prefix("stream");
    let server = hexmatch_server::start(redis_config(url, &prefix))
        .await
        .expect("starts");
    let base = format!("http://{}", server.addr());
    wait_ready(&base).await.expect("ready");
    let stream = format!("{prefix}:locations");
    let dead = format!("{stream}:dead");
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers");
    // Seeds through the stream itself: two drivers.
    for (id, lat) in [("s1", "41.88"), ("s2", "41.95")] {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("driver_id")
            .arg(id)
            .arg("lat")
            .arg(lat)
            .arg("lon")
            .arg("-87.63")
            .query_async(&mut conn)
            .await
            .expect("xadd");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.engine().len() < 2 {
        assert!(Instant::now() < deadline, "the seeds were never applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let future = (now_ms + 86_400_000).to_string();
    let mut failures = Vec::new();
    for row in STREAM {
        let before = engine_state(server.engine());
        let fields: Vec<(&str, String)> = row
            .fields
            .iter()
            .map(|(k, v)| (*k, v.replace("{future}", &future)))
            .collect();
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (k, v) in &fields {
            cmd.arg(*k).arg(v);
        }
        let id: String = cmd.query_async(&mut conn).await.expect("xadd");
        let mut fail = |what: String| failures.push(format!("{}: {what}", row.name));
        match dead_letter(&mut conn, &dead, &id).await {
            None => fail("not dead-lettered".into()),
            Some(e) => {
                let code = field(&e, "error_code");
                if code != Some(row.code) {
                    fail(format!("dead-lettered with {code:?}, want {:?}", row.code));
                }
                if field(&e, "error").is_none_or(str::is_empty) {
                    fail("dead-lettered without a message".into());
                }
                for (k, v) in &fields {
                    if !e.iter().any(|(ek, ev)| ek == k && ev == v) {
                        fail(format!("the dead letter lost field {k}={v:?}"));
                    }
                }
            }
        }
        if engine_state(server.engine()) != before {
            failures.push(format!("{}: changed the state", row.name));
        }
    }
    // Every entry, dead-lettered or not, is acknowledged.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("hexmatch")
            .query_async(&mut conn)
            .await
            .expect("xpending");
        let redis::Value::Array(summary) = pending else {
            panic!("unexpected XPENDING reply {pending:?}")
        };
        if summary.first() == Some(&redis::Value::Int(0)) {
            break;
        }
        if Instant::now() > deadline {
            failures.push(format!("stream: entries left unacknowledged: {summary:?}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown().await;
    failures
}

// ---------------------------------------------------------------------------
// Snapshots: garbled bytes and keys that a restore must not trust.
// ---------------------------------------------------------------------------

/// Postcard's encoding, written by hand: varints, zigzag, strings, floats.
struct Postcard(Vec<u8>);

impl Postcard {
    fn new() -> Self {
        Self(Vec::new())
    }
    fn varint(mut self, mut v: u64) -> Self {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return self;
            }
            self.0.push(byte | 0x80);
        }
    }
    fn int(self, v: i64) -> Self {
        self.varint(((v << 1) ^ (v >> 63)) as u64)
    }
    fn str(self, s: &str) -> Self {
        let mut p = self.varint(s.len() as u64);
        p.0.extend_from_slice(s.as_bytes());
        p
    }
    fn f64(mut self, x: f64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn byte(mut self, b: u8) -> Self {
        self.0.push(b);
        self
    }
}

/// One stored driver: id, lat, lon, ts, status code, vehicle code, caps.
fn driver_rec(id: &str, lat: f64, lon: f64, ts: i64, status: u8, vehicle: u8) -> Vec<u8> {
    Postcard::new()
        .str(id)
        .f64(lat)
        .f64(lon)
        .int(ts)
        .byte(status)
        .byte(vehicle)
        .varint(0)
        .0
}

/// A zstd frame holding `content` in one raw (uncompressed) block.
fn zstd_raw(content: &[u8]) -> Vec<u8> {
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0xa0];
    out.extend_from_slice(&(content.len() as u32).to_le_bytes());
    let header = 1 | ((content.len() as u32) << 3);
    out.extend_from_slice(&header.to_le_bytes()[..3]);
    out.extend_from_slice(content);
    out
}

/// A chunk of `recs` (each a [`driver_rec`]).
fn chunk_of(recs: &[Vec<u8>]) -> Vec<u8> {
    let mut raw = Postcard::new().varint(recs.len() as u64).0;
    for r in recs {
        raw.extend_from_slice(r);
    }
    let mut out = b"HXC1".to_vec();
    out.extend(zstd_raw(&raw));
    out
}

/// A manifest (valid checksum) for generation 2 describing `chunks`,
/// each with the driver count given.
fn manifest_for(chunks: &[(&[u8], u32)]) -> Vec<u8> {
    Manifest {
        format: SNAPSHOT_FORMAT,
        generation: 2,
        taken_at_ms: 1_795_600_800_000,
        resolution: 6,
        drivers: chunks.iter().map(|(_, n)| u64::from(*n)).sum(),
        chunks: chunks
            .iter()
            .map(|(c, n)| ChunkInfo {
                len: c.len() as u64,
                crc32: crc32fast::hash(c),
                drivers: *n,
            })
            .collect(),
    }
    .encode()
}

/// `magic ‖ body ‖ crc32`.
fn sealed(magic: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A durable match record.
#[derive(Clone)]
struct Rec {
    order: &'static str,
    driver: &'static str,
    pickup: (f64, f64),
    state: u8,
    created_at: i64,
}

const NOW_MS: i64 = 1_795_600_800_000;

fn match_record(r: &Rec) -> Vec<u8> {
    let body = Postcard::new()
        .str(r.order)
        .str(r.driver)
        .f64(r.pickup.0)
        .f64(r.pickup.1)
        .f64(41.90)
        .f64(-87.60)
        .f64(12.5)
        .byte(r.state)
        .int(r.created_at)
        .int(r.created_at + 3_600_000_000)
        .byte(0)
        .varint(0)
        .byte(0)
        .varint(3_600_000)
        .0;
    sealed(b"HXR1", &body)
}

fn good_rec() -> Rec {
    Rec {
        order: "o1",
        driver: "b1",
        pickup: (41.90, -87.60),
        state: 0,
        created_at: NOW_MS,
    }
}

/// Keys and bytes of a stored pair of snapshots: generation 1 (drivers
/// a1..a3) is `prev`, generation 2 (b1, b2) is current.
struct Fixture {
    prefix: String,
    manifest: Vec<u8>,
    chunk: Vec<u8>,
}

impl Fixture {
    fn key(&self, suffix: &str) -> String {
        format!("{}:{{ns:default}}:{suffix}", self.prefix)
    }
    fn manifest_key(&self) -> String {
        self.key("snap:manifest")
    }
    fn prev_key(&self) -> String {
        self.key("snap:manifest:prev")
    }
    fn chunk_key(&self) -> String {
        self.key("snap:g2:0")
    }
    fn matches_key(&self) -> String {
        self.key("matches")
    }
}

/// A change made to the stored snapshot before a restore.
enum Damage {
    Set(String, Vec<u8>),
    Del(String),
    /// Replace the key by a hash.
    Hash(String),
    /// Replace the key by a list.
    List(String),
    /// A field of the matches hash.
    Record(String, Vec<u8>),
}

fn set(key: String, bytes: impl Into<Vec<u8>>) -> Damage {
    Damage::Set(key, bytes.into())
}

/// The current manifest and chunk replaced by `chunk`, described
/// consistently (length, checksum) with `drivers` drivers.
fn crafted(f: &Fixture, chunk: Vec<u8>, drivers: u32) -> Vec<Damage> {
    vec![
        set(f.manifest_key(), manifest_for(&[(&chunk, drivers)])),
        set(f.chunk_key(), chunk),
    ]
}

fn one_driver(id: &str, lat: f64, lon: f64, ts: i64, status: u8, vehicle: u8) -> Vec<u8> {
    chunk_of(&[driver_rec(id, lat, lon, ts, status, vehicle)])
}

/// What a restore must do with the damage.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// Skip generation 2 with a warning saying this, load generation 1.
    FallsBack(&'static str),
    /// Skip both generations (warning saying this), load nothing.
    Empty(&'static str),
    /// Refuse: an error saying this; nothing loaded.
    Refused(&'static str),
    /// Load generation 2, skip the match record with a warning saying this.
    RecordSkipped(&'static str),
    /// A node on this data stays `not_ready`, its reason saying this.
    NodeNotReady(&'static str),
}

struct Snap {
    name: &'static str,
    damage: fn(&Fixture) -> Vec<Damage>,
    outcome: Outcome,
}

const fn snap(name: &'static str, damage: fn(&Fixture) -> Vec<Damage>, outcome: Outcome) -> Snap {
    Snap {
        name,
        damage,
        outcome,
    }
}

use Outcome::{Empty, FallsBack, NodeNotReady, RecordSkipped, Refused};

// A table: one row per line.
#[rustfmt::skip]
const SNAPSHOTS: &[Snap] = &[
    // The manifest.
    snap("manifest: empty", |f| vec![set(f.manifest_key(), b"")], FallsBack("bad magic or too short (0 bytes)")),
    snap("manifest: five bytes", |f| vec![set(f.manifest_key(), b"short")], FallsBack("bad magic or too short (5 bytes)")),
    snap("manifest: wrong magic", |f| {
        let mut m = f.manifest.clone();
        m[3] = b'9';
        vec![set(f.manifest_key(), m)]
    }, FallsBack("manifest: bad magic")),
    snap("manifest: a flipped byte", |f| {
        let mut m = f.manifest.clone();
        m[6] ^= 0x5a;
        vec![set(f.manifest_key(), m)]
    }, FallsBack("manifest: checksum mismatch")),
    snap("manifest: last byte cut", |f| {
        let m = f.manifest[..f.manifest.len() - 1].to_vec();
        vec![set(f.manifest_key(), m)]
    }, FallsBack("manifest: checksum mismatch")),
    snap("manifest: garbage under a good checksum", |f| vec![set(f.manifest_key(), sealed(b"HXM1", &[0xff, 0xff, 0xff]))], FallsBack("manifest:")),
    snap("manifest: a format from a newer build", |f| {
        let mut m = Manifest::decode(&f.manifest).expect("the fixture is good");
        m.format = SNAPSHOT_FORMAT + 1;
        vec![set(f.manifest_key(), m.encode())]
    }, FallsBack("manifest format 3")),
    snap("manifest: format 0", |f| {
        let mut m = Manifest::decode(&f.manifest).expect("the fixture is good");
        m.format = 0;
        vec![set(f.manifest_key(), m.encode())]
    }, FallsBack("manifest format 0")),
    snap("manifest: driver count off", |f| {
        let mut m = Manifest::decode(&f.manifest).expect("the fixture is good");
        m.drivers += 1;
        vec![set(f.manifest_key(), m.encode())]
    }, FallsBack("manifest counts 3 drivers but its chunks hold 2")),
    snap("manifest: a generation with no chunks stored", |f| {
        let mut m = Manifest::decode(&f.manifest).expect("the fixture is good");
        m.generation = 99;
        vec![set(f.manifest_key(), m.encode())]
    }, FallsBack("chunk 0 of generation 99 is missing")),
    snap("manifest: one chunk too many", |f| {
        let mut m = Manifest::decode(&f.manifest).expect("the fixture is good");
        m.chunks.push(m.chunks[0]);
        m.drivers *= 2;
        vec![set(f.manifest_key(), m.encode())]
    }, FallsBack("chunk 1 of generation 2 is missing")),
    snap("manifest: chunk length off", |f| {
        let mut m = Manifest::decode(&f.manifest).expect("the fixture is good");
        m.chunks[0].len += 1;
        vec![set(f.manifest_key(), m.encode())]
    }, FallsBack("manifest says")),
    snap("manifest: chunk checksum off", |f| {
        let mut m = Manifest::decode(&f.manifest).expect("the fixture is good");
        m.chunks[0].crc32 ^= 1;
        vec![set(f.manifest_key(), m.encode())]
    }, FallsBack("chunk 0: checksum mismatch")),
    // The chunk.
    snap("chunk: deleted", |f| vec![Damage::Del(f.chunk_key())], FallsBack("chunk 0 of generation 2 is missing")),
    snap("chunk: a hash, not bytes", |f| vec![Damage::Hash(f.chunk_key())], FallsBack("chunk 0 of generation 2 is missing")),
    snap("chunk: empty", |f| vec![set(f.chunk_key(), b"")], FallsBack("chunk 0: 0 bytes")),
    snap("chunk: a flipped byte", |f| {
        let mut c = f.chunk.clone();
        let mid = c.len() / 2;
        c[mid] ^= 0x5a;
        vec![set(f.chunk_key(), c)]
    }, FallsBack("chunk 0: checksum mismatch")),
    snap("chunk: last byte cut", |f| {
        let c = f.chunk[..f.chunk.len() - 1].to_vec();
        vec![set(f.chunk_key(), c)]
    }, FallsBack("manifest says")),
    snap("chunk: wrong magic, described", |f| {
        let mut c = f.chunk.clone();
        c[0] = b'X';
        crafted(f, c, 2)
    }, FallsBack("chunk 0: bad magic")),
    snap("chunk: not zstd, described", |f| crafted(f, b"HXC1 this is not zstd".to_vec(), 1), FallsBack("chunk 0: zstd")),
    snap("chunk: zstd of garbage, described", |f| {
        let mut c = b"HXC1".to_vec();
        c.extend(zstd_raw(&[0x05, 0xff, 0xff]));
        crafted(f, c, 1)
    }, FallsBack("chunk 0:")),
    snap("chunk: expands past its cap, described", |f| {
        let mut c = b"HXC1".to_vec();
        c.extend(zstd_raw(&[0u8; 4096]));
        crafted(f, c, 1)
    }, FallsBack("chunk 0: zstd")),
    snap("chunk: fewer drivers than described", |f| crafted(f, one_driver("c1", 41.9, -87.6, NOW_MS, 0, 0), 2), FallsBack("chunk 0: 1 drivers, manifest says 2")),
    snap("chunk: a driver at lat 91", |f| crafted(f, one_driver("c1", 91.0, -87.6, NOW_MS, 0, 0), 1), FallsBack("invalid position")),
    snap("chunk: a driver at lon NaN", |f| crafted(f, one_driver("c1", 41.9, f64::NAN, NOW_MS, 0, 0), 1), FallsBack("invalid position")),
    snap("chunk: a driver with a bad id", |f| crafted(f, one_driver("bad id", 41.9, -87.6, NOW_MS, 0, 0), 1), FallsBack("invalid id")),
    snap("chunk: a driver with an empty id", |f| crafted(f, one_driver("", 41.9, -87.6, NOW_MS, 0, 0), 1), FallsBack("invalid id")),
    snap("chunk: a driver in year 10000", |f| crafted(f, one_driver("c1", 41.9, -87.6, 253_402_300_800_000, 0, 0), 1), FallsBack("invalid timestamp")),
    snap("chunk: a driver with status code 9", |f| crafted(f, one_driver("c1", 41.9, -87.6, NOW_MS, 9, 0), 1), FallsBack("status code 9")),
    snap("chunk: a driver with vehicle code 9", |f| crafted(f, one_driver("c1", 41.9, -87.6, NOW_MS, 0, 9), 1), FallsBack("vehicle code 9")),
    snap("chunk: one good driver and one bad", |f| {
        let c = chunk_of(&[
            driver_rec("c1", 41.9, -87.6, NOW_MS, 0, 0),
            driver_rec("c2", 41.9, 181.0, NOW_MS, 0, 0),
        ]);
        crafted(f, c, 2)
    }, FallsBack("invalid position")),
    // Both generations.
    snap("both: manifests garbled", |f| vec![set(f.manifest_key(), b"junk"), set(f.prev_key(), b"junk")], Empty("bad magic or too short")),
    snap("both: chunks gone", |f| vec![Damage::Del(f.chunk_key()), Damage::Del(f.key("snap:g1:0"))], Empty("is missing")),
    // Keys of the wrong type.
    snap("keys: the manifest is a hash", |f| vec![Damage::Hash(f.manifest_key())], Refused("WRONGTYPE")),
    snap("keys: prev is a list behind a garbled manifest", |f| vec![set(f.manifest_key(), b"junk"), Damage::List(f.prev_key())], Refused("WRONGTYPE")),
    snap("keys: the matches hash is a string", |f| vec![set(f.matches_key(), b"not a hash")], Refused("WRONGTYPE")),
    snap("node: the manifest is a hash", |f| vec![Damage::Hash(f.manifest_key())], NodeNotReady("snap:manifest")),
    snap("node: the matches hash is a list", |f| vec![Damage::List(f.matches_key())], NodeNotReady(":{ns:default}:matches")),
    // Match records.
    snap("record: garbage", |f| vec![Damage::Record(f.matches_key(), b"garbage".to_vec())], RecordSkipped("bad magic or too short (7 bytes)")),
    snap("record: empty", |f| vec![Damage::Record(f.matches_key(), Vec::new())], RecordSkipped("match record: bad magic or too short (0 bytes)")),
    snap("record: a flipped byte", |f| {
        let mut r = match_record(&good_rec());
        r[10] ^= 0x5a;
        vec![Damage::Record(f.matches_key(), r)]
    }, RecordSkipped("match record: checksum mismatch")),
    snap("record: garbage under a good checksum", |f| vec![Damage::Record(f.matches_key(), sealed(b"HXR1", &[0xff; 3]))], RecordSkipped("match record:")),
    snap("record: state code 9", |f| vec![Damage::Record(f.matches_key(), match_record(&Rec { state: 9, ..good_rec() }))], RecordSkipped("match state code 9")),
    snap("record: pickup at lat 91", |f| vec![Damage::Record(f.matches_key(), match_record(&Rec { pickup: (91.0, 0.0), ..good_rec() }))], RecordSkipped("invalid position")),
    snap("record: a bad order id", |f| vec![Damage::Record(f.matches_key(), match_record(&Rec { order: "bad order", ..good_rec() }))], RecordSkipped("invalid id")),
    snap("record: a bad driver id", |f| vec![Damage::Record(f.matches_key(), match_record(&Rec { driver: "bad driver", ..good_rec() }))], RecordSkipped("invalid id")),
    snap("record: created before 1970", |f| vec![Damage::Record(f.matches_key(), match_record(&Rec { created_at: -1, ..good_rec() }))], RecordSkipped("invalid timestamp")),
    snap("record: an ended match", |f| vec![Damage::Record(f.matches_key(), match_record(&Rec { state: 2, ..good_rec() }))], RecordSkipped("match already ended")),
];

fn driver(id: &str, lat: f64) -> Driver {
    Driver {
        id: DriverId::new(id).expect("id"),
        pos: Position::new(lat, -87.60).expect("pos"),
        ts: Timestamp::from_millis(NOW_MS).expect("ts"),
        status: Status::Available,
        vehicle: Vehicle::Car,
        capabilities: hexmatch::Capabilities::NONE,
        order_id: None,
        reserved_until: None,
    }
}

fn generation_1() -> Vec<Driver> {
    vec![
        driver("a1", 41.80),
        driver("a2", 41.81),
        driver("a3", 41.82),
    ]
}

fn generation_2() -> Vec<Driver> {
    vec![driver("b1", 41.90), driver("b2", 41.91)]
}

fn sorted(mut d: Vec<Driver>) -> Vec<Driver> {
    d.sort_by(|a, b| a.id.cmp(&b.id));
    d
}

/// Stores generations 1 and 2 under a new prefix.
async fn fixture(url: &str) -> (Fixture, Arc<Persistence>) {
    let prefix = unique_prefix("snap");
    let p = common::persistence(url, &prefix, "default", "n1").await;
    for drivers in [generation_1(), generation_2()] {
        let e = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
        e.bulk_load(drivers).expect("load");
        p.write_snapshot(&e).await.expect("snapshot");
    }
    let mut conn = RedisServer::conn(url);
    let manifest: Vec<u8> = redis::cmd("GET")
        .arg(format!("{prefix}:{{ns:default}}:snap:manifest"))
        .query(&mut conn)
        .expect("manifest");
    let chunk: Vec<u8> = redis::cmd("GET")
        .arg(format!("{prefix}:{{ns:default}}:snap:g2:0"))
        .query(&mut conn)
        .expect("chunk of generation 2");
    (
        Fixture {
            prefix,
            manifest,
            chunk,
        },
        p,
    )
}

fn apply(conn: &mut redis::Connection, damage: Vec<Damage>) {
    for d in damage {
        let r: redis::RedisResult<()> = match d {
            Damage::Set(k, v) => redis::cmd("SET").arg(k).arg(v).query(conn),
            Damage::Del(k) => redis::cmd("DEL").arg(k).query(conn),
            Damage::Hash(k) => redis::pipe()
                .del(&k)
                .ignore()
                .hset(&k, "f", "v")
                .ignore()
                .query(conn),
            Damage::List(k) => redis::pipe()
                .del(&k)
                .ignore()
                .rpush(&k, "v")
                .ignore()
                .query(conn),
            Damage::Record(k, v) => redis::cmd("HSET").arg(k).arg("o1").arg(v).query(conn),
        };
        r.expect("damage applied");
    }
}

/// Every key under the prefix, with its serialised value.
fn dump(conn: &mut redis::Connection, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(conn)
        .expect("keys");
    keys.into_iter()
        .map(|k| {
            let v: Vec<u8> = redis::cmd("DUMP").arg(&k).query(conn).expect("dump");
            (k, v)
        })
        .collect()
}

fn ids(drivers: &[Driver]) -> Vec<String> {
    drivers.iter().map(|d| d.id.to_string()).collect()
}

async fn run_snapshot_row(url: &str, row: &Snap) -> Result<(), String> {
    let (f, p) = fixture(url).await;
    let mut conn = RedisServer::conn(url);
    apply(&mut conn, (row.damage)(&f));
    let stored = dump(&mut conn, &f.prefix);
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    let restored = if let NodeNotReady(says) = row.outcome {
        node_not_ready(url, &f.prefix, says).await?;
        None
    } else {
        Some(p.restore(&engine).await)
    };
    let says_in = |warnings: &[String], says: &str| {
        if warnings.iter().any(|w| w.contains(says)) {
            Ok(())
        } else {
            Err(format!("no warning says {says:?}: {warnings:?}"))
        }
    };
    let got = sorted(engine.drivers());
    match (row.outcome, restored) {
        (NodeNotReady(_), _) => {}
        (_, None) => unreachable!("only a node row skips the restore"),
        (FallsBack(says), Some(r)) => {
            let r = r.map_err(|e| format!("refused: {e}"))?;
            says_in(&r.warnings, says)?;
            if !r.warnings.iter().any(|w| w.contains(&f.manifest_key())) {
                return Err(format!(
                    "no warning names {}: {:?}",
                    f.manifest_key(),
                    r.warnings
                ));
            }
            if r.generation != Some(1) || got != sorted(generation_1()) {
                return Err(format!(
                    "loaded generation {:?} with {:?}, want generation 1",
                    r.generation,
                    ids(&got)
                ));
            }
        }
        (Empty(says), Some(r)) => {
            let r = r.map_err(|e| format!("refused: {e}"))?;
            says_in(&r.warnings, says)?;
            if r.generation.is_some() || !got.is_empty() {
                return Err(format!(
                    "loaded generation {:?} with {:?}, want nothing",
                    r.generation,
                    ids(&got)
                ));
            }
        }
        (Refused(says), Some(r)) => match r {
            Ok(r) => return Err(format!("restored {r:?}, want a refusal")),
            Err(e) => {
                if !e.contains(says) || !e.contains(&f.prefix) {
                    return Err(format!(
                        "the refusal {e:?} does not say {says:?} and name the key"
                    ));
                }
            }
        },
        (RecordSkipped(says), Some(r)) => {
            let r = r.map_err(|e| format!("refused: {e}"))?;
            says_in(&r.warnings, says)?;
            if r.generation != Some(2)
                || got != sorted(generation_2())
                || r.matches != 0
                || engine.live_matches() != 0
            {
                return Err(format!(
                    "restored {r:?} with {:?}; want generation 2 and no match",
                    ids(&got)
                ));
            }
        }
    }
    if matches!(row.outcome, Refused(_) | NodeNotReady(_)) && !engine.is_empty() {
        return Err(format!("loaded {:?} after refusing", ids(&got)));
    }
    let after = dump(&mut conn, &f.prefix);
    if after != stored {
        return Err("the restore changed what Redis holds".into());
    }
    Ok(())
}

/// Starts a node on `prefix`; it must stay `not_ready`, its reason saying
/// `says`, refuse `/v1` with `not_ready`, and hold no driver.
async fn node_not_ready(url: &str, prefix: &str, says: &str) -> Result<(), String> {
    let server = hexmatch_server::start(redis_config(url, prefix))
        .await
        .map_err(|e| format!("did not start: {e}"))?;
    let base = format!("http://{}", server.addr());
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        let r = reqwest::get(format!("{base}/readyz"))
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        let reason = body["reason"].as_str().unwrap_or("");
        if status == 200 {
            break Err(format!("became ready: {body}"));
        }
        if status == 503 && body["status"] == "not_ready" && reason.contains(says) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(format!("readyz never named {says:?}: {status} {body}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v1 = reqwest::get(format!("{base}/v1/drivers/nearest?lat=41.9&lon=-87.6"))
        .await
        .map_err(|e| e.to_string())?;
    let v1_status = v1.status().as_u16();
    let v1_body: serde_json::Value = v1.json().await.unwrap_or_default();
    let empty = server.engine().is_empty();
    server.shutdown().await;
    outcome?;
    if v1_status != 503 || v1_body["error"]["code"] != "not_ready" {
        return Err(format!(
            "/v1 answered {v1_status} {v1_body}, want 503 not_ready"
        ));
    }
    if !empty {
        return Err("the node loaded drivers".into());
    }
    Ok(())
}

/// The encoders above write what the engine reads: a hand-made chunk and
/// match record restore, so a row's error is the one its damage causes.
async fn check_the_encoders(url: &str) {
    let (f, p) = fixture(url).await;
    let mut conn = RedisServer::conn(url);
    let chunk = chunk_of(&[
        driver_rec("b1", 41.90, -87.60, NOW_MS, 0, 0),
        driver_rec("c2", 41.95, -87.65, NOW_MS, 2, 3),
    ]);
    apply(&mut conn, crafted(&f, chunk, 2));
    apply(
        &mut conn,
        vec![Damage::Record(f.matches_key(), match_record(&good_rec()))],
    );
    let engine = Arc::new(Engine::new(EngineConfig::default()).expect("engine"));
    let r = p.restore(&engine).await.expect("restores");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!((r.generation, r.drivers, r.matches), (Some(2), 2, 1));
    let c2 = engine
        .driver(&DriverId::new("c2").expect("id"))
        .expect("c2");
    assert_eq!((c2.status, c2.vehicle), (Status::Busy, Vehicle::ALL[3]));
    let b1 = engine
        .driver(&DriverId::new("b1").expect("id"))
        .expect("b1");
    assert_eq!(b1.status, Status::Reserved);
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_refused_as_documented_and_changes_nothing() {
    let rows = SETTINGS.len() + DRIVER_CSV.len() + STREAM.len() + SNAPSHOTS.len();
    assert!(
        rows >= MIN_ROWS,
        "{rows} rows; the suite keeps at least {MIN_ROWS}"
    );
    let mut names = HashSet::new();
    let all = SETTINGS
        .iter()
        .chain(DRIVER_CSV)
        .map(|c| c.name)
        .chain(STREAM.iter().map(|e| e.name))
        .chain(SNAPSHOTS.iter().map(|s| s.name));
    for name in all {
        assert!(names.insert(name), "two rows are named {name:?}");
    }

    let redis = RedisServer::start();
    let url = redis.url.clone();
    let dir = std::env::temp_dir().join(format!("hexmatch-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let busy_addr = busy.local_addr().expect("addr").to_string();

    let mut failures = {
        let (url, dir) = (url.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            let mut f = run_cli_rows(SETTINGS, &url, &dir, &busy_addr);
            f.extend(run_cli_rows(DRIVER_CSV, &url, &dir, &busy_addr));
            f
        })
        .await
        .expect("the binary rows ran")
    };
    drop(busy);

    failures.extend(run_stream_rows(&url).await);

    check_the_encoders(&url).await;
    for row in SNAPSHOTS {
        if let Err(e) = run_snapshot_row(&url, row).await {
            failures.push(format!("{}: {e}", row.name));
        }
    }

    std::fs::remove_dir_all(&dir).ok();
    assert!(
        failures.is_empty(),
        "{} of {rows} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
