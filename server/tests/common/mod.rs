//! Helpers for the server's Redis tests: a private `redis-server` per test.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Settings of an in-process node on Redis at `url` under `prefix`: an
/// ephemeral port, snapshots every 100 ms, fast sweeps, no driver TTL.
pub fn redis_config(url: &str, prefix: &str) -> hexmatch_server::ServeConfig {
    hexmatch_server::ServeConfig {
        bind: "127.0.0.1:0".parse().expect("valid"),
        redis_url: Some(url.to_owned()),
        redis_prefix: prefix.to_owned(),
        snapshot_interval_ms: 100,
        sweep_interval_ms: 50,
        driver_ttl_s: 0,
        ..hexmatch_server::ServeConfig::default()
    }
}

/// The persistence layer on Redis at `url` under `prefix`: snapshots in
/// namespace `ns`, stream reads as consumer `node`, no replicas awaited.
pub async fn persistence(
    url: &str,
    prefix: &str,
    ns: &str,
    node: &str,
) -> std::sync::Arc<hexmatch_server::persist::Persistence> {
    hexmatch_server::persist::Persistence::connect(
        url,
        prefix,
        ns,
        node,
        hexmatch_server::persist::Durability::default(),
    )
    .await
    .expect("connects")
}

/// A unique key prefix, so tests never touch each other's keys (or those of
/// a shared Redis given by `REDIS_URL`).
pub fn unique_prefix(test: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("hxtest-{test}-{}-{n}", std::process::id())
}

/// A `redis-server` started for one test on a unix socket in a temp dir,
/// with persistence off (`--save ''`), killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    dir: PathBuf,
    /// URL for the redis crate and for `hexmatch serve --redis-url`.
    pub url: String,
}

impl RedisServer {
    /// Starts a private server. Panics with install instructions if
    /// `redis-server` is not on PATH.
    pub fn start() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hexmatch-redis-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("redis+unix://{}", dir.join("redis.sock").display());
        let mut server = Self {
            child: None,
            dir,
            url,
        };
        server.spawn();
        server
    }

    /// `REDIS_URL` if set (a shared server: use unique prefixes, never flush),
    /// else a private server.
    pub fn from_env_or_start() -> (Option<Self>, String) {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.is_empty() => (None, url),
            _ => {
                let s = Self::start();
                let url = s.url.clone();
                (Some(s), url)
            }
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args(["--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install it (Debian: apt-get install redis-server) or set REDIS_URL")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = redis::Client::open(self.url.as_str())
                && let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same socket (empty).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// A synchronous connection for assertions.
    pub fn conn(url: &str) -> redis::Connection {
        redis::Client::open(url)
            .expect("valid url")
            .get_connection()
            .expect("redis answers")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` until it returns `Some`, or panics after `secs` seconds.
pub fn poll<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The first `n` Chicago trips as `{driver_id, lat, lon}` objects for
/// `POST /v1/locations`: at the pickup (`dropoff = false`) or the drop-off.
pub fn chicago_drivers(n: usize, dropoff: bool) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/chicago_trips.csv"
    ))
    .expect("data");
    let (lat, lon) = if dropoff { (5, 6) } else { (2, 3) };
    text.lines()
        .skip(1)
        .take(n)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            serde_json::json!({"driver_id": f[0], "lat": f[lat].parse::<f64>().expect("lat"), "lon": f[lon].parse::<f64>().expect("lon")})
        })
        .collect()
}

/// Queues one `XADD stream * driver_id … lat … lon …` per driver of
/// [`chicago_drivers`] on `pipe`, with `extra` field pairs appended to each.
pub fn xadd_drivers(
    pipe: &mut redis::Pipeline,
    stream: &str,
    drivers: &[serde_json::Value],
    extra: &[(&str, &str)],
) {
    for d in drivers {
        let cmd = pipe
            .cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("driver_id")
            .arg(d["driver_id"].as_str().expect("id"))
            .arg("lat")
            .arg(d["lat"].to_string())
            .arg("lon")
            .arg(d["lon"].to_string());
        for (k, v) in extra {
            cmd.arg(*k).arg(*v);
        }
        cmd.ignore();
    }
}

/// `hexmatch serve` as a child process (bound to 127.0.0.1:0), killed on drop.
pub struct Node {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl Node {
    /// Starts the binary with `serve --bind 127.0.0.1:0` and `args`, waits
    /// for its address in the log and for `/readyz`.
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_with_env(args, &[])
    }

    /// [`Node::spawn`] with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hexmatch"));
        cmd.args(["serve", "--bind", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// [`Node::spawn`] with the process's open-file limit set to `fds`
    /// (through the shell's `ulimit -n`).
    pub fn spawn_with_fd_limit(fds: usize, args: &[&str]) -> Self {
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_hexmatch"))
            .args(["serve", "--bind", "127.0.0.1:0"])
            .args(args);
        Self::spawn_command(cmd)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts `cmd` (a `hexmatch serve`), waits for its address in the log
    /// and for `/readyz`.
    pub fn spawn_command(mut cmd: Command) -> Self {
        use std::io::{BufRead, BufReader};
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("HEXMATCH_TEST_RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("binary runs");
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("server logs its address")
                .expect("utf-8 log");
            if let Some(rest) = line
                .split("addr=")
                .nth(1)
                .filter(|_| line.contains("hexmatch serving"))
            {
                break rest.split_whitespace().next().expect("address").to_owned();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        let verbose = std::env::var_os("HEXMATCH_TEST_LOG").is_some();
        let port = addr.rsplit(':').next().unwrap_or_default().to_owned();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                if verbose {
                    // Which process said it, when several run.
                    eprintln!("[:{port}] {l}");
                }
            }
        });
        let node = Self {
            child,
            base: format!("http://{addr}"),
        };
        let http = reqwest::blocking::Client::new();
        poll(30, "readyz", || {
            http.get(format!("{}/readyz", node.base))
                .send()
                .ok()
                .filter(|r| r.status() == 200)
        });
        node
    }

    /// The process's resident memory now and at its peak (`VmRSS` and
    /// `VmHWM` of `/proc/<pid>/status`), in MiB.
    pub fn memory_mib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the process is alive");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb / 1024)
                .expect("a memory field in kB")
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Sends a signal (`KILL`, `STOP`, `CONT`) to the process.
    pub fn signal(&mut self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
        if sig == "KILL" {
            let _ = self.child.wait();
        }
        if sig == "STOP" {
            // The signal is asynchronous: wait until the process is stopped.
            let stat = format!("/proc/{}/stat", self.child.id());
            poll(10, "the process to stop", || {
                let text = std::fs::read_to_string(&stat).ok()?;
                let state = text.rsplit_once(") ")?.1.chars().next()?;
                (state == 'T').then_some(())
            });
        }
    }
}

impl Drop for Node {
    /// A failed assertion must not leave the server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod redis_cluster;
