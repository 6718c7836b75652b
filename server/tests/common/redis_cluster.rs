//! A real Redis Cluster for one test: three masters with one replica each,
//! `redis-server --cluster-enabled yes` on free loopback ports, created
//! with `redis-cli --cluster create … --cluster-replicas 1`, persistence
//! off, every process killed on drop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::poll;

/// How long a silent master stays master: failover starts after this.
pub const NODE_TIMEOUT_MS: u64 = 1000;

/// One `redis-server` of the cluster.
struct Member {
    port: u16,
    child: Option<Child>,
    /// Paused with `SIGSTOP`: connected to, it would never answer.
    stopped: bool,
}

impl Member {
    fn live(&self) -> bool {
        self.child.is_some() && !self.stopped
    }
}

/// A connection to the server on `port` that gives up after a second.
fn node_conn(port: u16) -> Option<redis::Connection> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    c.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    Some(c)
}

/// One line of `CLUSTER NODES`.
struct ClusterNode {
    port: u16,
    id: String,
    /// The id of its master (`-` for a master).
    master_id: String,
    /// A master not flagged as failing.
    live_master: bool,
    /// Slot ranges it serves, inclusive.
    slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    fn slot_count(&self) -> u32 {
        self.slots.iter().map(|(a, b)| u32::from(b - a) + 1).sum()
    }
}

/// Three masters and three replicas on loopback.
pub struct RedisCluster {
    members: Vec<Member>,
    dir: PathBuf,
}

/// A loopback port that is free, and whose cluster bus port (+10000) is too.
fn free_port_pair(taken: &[u16]) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        if port >= 55_000 || taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts six servers and joins them into a cluster; returns once every
    /// slot is served and every node says `cluster_state:ok`.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "hexmatch-redis-cluster-{}-{}",
            std::process::id(),
            super::unique_prefix("c")
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut ports = Vec::new();
        for _ in 0..6 {
            let p = free_port_pair(&ports);
            ports.push(p);
        }
        let mut cluster = Self {
            members: ports
                .iter()
                .map(|&port| Member {
                    port,
                    child: None,
                    stopped: false,
                })
                .collect(),
            dir,
        };
        for i in 0..6 {
            cluster.spawn(i);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(30);
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let port = self.members[i].port;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--repl-diskless-sync-delay", "0", "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install it (Debian: apt-get install redis-server)")
            });
        self.members[i].child = Some(child);
        poll(10, "redis-server to answer", || {
            redis::cmd("PING")
                .query::<String>(&mut node_conn(port)?)
                .ok()
        });
    }

    /// The `--redis-url` of the cluster: every node, comma-separated.
    pub fn url(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("redis://127.0.0.1:{}", m.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URL of one live node (a seed, for a single-URL client).
    pub fn seed(&self) -> String {
        let m = self.members.iter().find(|m| m.live()).expect("a live node");
        format!("redis://127.0.0.1:{}", m.port)
    }

    /// A cluster-aware connection for assertions.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        let seeds: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.live())
            .map(|m| format!("redis://127.0.0.1:{}", m.port))
            .collect();
        redis::cluster::ClusterClient::new(seeds)
            .expect("client")
            .get_connection()
            .expect("cluster answers")
    }

    /// `CLUSTER NODES` as a live node sees it.
    fn nodes(&self) -> Option<Vec<ClusterNode>> {
        let port = self.members.iter().find(|m| m.live())?.port;
        let mut c = node_conn(port)?;
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut c).ok()?;
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let port: u16 = f[1].split([':', '@']).nth(1)?.parse().ok()?;
            let master = f[2].contains("master");
            let failed = f[2].contains("fail");
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|x| (x, x)),
                })
                .collect();
            out.push(ClusterNode {
                port,
                id: f[0].to_owned(),
                master_id: f[3].to_owned(),
                live_master: master && !failed,
                slots,
            });
        }
        Some(out)
    }

    /// The port of the master serving `key` now.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot = hexmatch_server::persist::conn::slot(key);
        let nodes = self.nodes().expect("cluster nodes");
        nodes
            .iter()
            .find(|n| n.live_master && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.port)
            .expect("a master serves every slot")
    }

    /// The port of a replica of the master at `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let nodes = self.nodes().expect("cluster nodes");
        let id = nodes
            .iter()
            .find(|n| n.port == port)
            .map(|n| n.id.clone())
            .expect("the master is listed");
        nodes
            .iter()
            .find(|n| n.master_id == id)
            .map(|n| n.port)
            .expect("the master has a replica")
    }

    fn index(&self, port: u16) -> usize {
        self.members
            .iter()
            .position(|m| m.port == port)
            .expect("a member's port")
    }

    /// Sends `sig` (`KILL`, `STOP`, `CONT`) to the server on `port`.
    pub fn signal(&mut self, port: u16, sig: &str) {
        let i = self.index(port);
        let Some(child) = self.members[i].child.as_mut() else {
            return;
        };
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} failed");
        match sig {
            "KILL" => {
                let _ = child.wait();
                self.members[i].child = None;
            }
            "STOP" => self.members[i].stopped = true,
            "CONT" => self.members[i].stopped = false,
            _ => {}
        }
    }

    /// Starts the killed server on `port` again (empty: it rejoins from its
    /// cluster config file, as a replica of whoever took over).
    ///
    /// # Panics
    /// If the server still serves slots: a master without persistence
    /// that comes back before its replica took over is still the master,
    /// empty, and its replica resyncs from it, wiping its slots. Redis's
    /// own warning; call [`RedisCluster::wait_ok`] after a kill first.
    pub fn restart(&mut self, port: u16) {
        let i = self.index(port);
        if self.members[i].child.is_none() {
            let serves = self
                .nodes()
                .is_some_and(|ns| ns.iter().any(|n| n.port == port && n.slot_count() > 0));
            assert!(
                !serves,
                "restarting the master on {port} before its replica took over its slots"
            );
            self.spawn(i);
        }
    }

    /// Waits until every live node reports `cluster_state:ok`, every slot
    /// has a master that is running (a killed master's slots count once
    /// its replica has taken them over) and every live replica is in sync;
    /// returns how long that took.
    pub fn wait_ok(&self, secs: u64) -> Duration {
        let started = Instant::now();
        poll(secs, "the Redis Cluster to be ok", || {
            for m in self.members.iter().filter(|m| m.live()) {
                let mut c = node_conn(m.port)?;
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()?;
                if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    return None;
                }
                // A replica counts once its master link is up (synced).
                let repl: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
                let replica = repl.lines().any(|l| l.trim() == "role:slave");
                if replica && !repl.lines().any(|l| l.trim() == "master_link_status:up") {
                    return None;
                }
            }
            // Until the others flag a killed master as failing (after the
            // node timeout), they still list it as serving its slots.
            let running = |port: u16| self.members.iter().any(|m| m.port == port && m.live());
            let served: u32 = self
                .nodes()?
                .iter()
                .filter(|n| n.live_master && running(n.port))
                .map(ClusterNode::slot_count)
                .sum();
            (served == 16_384).then_some(())
        });
        started.elapsed()
    }

    /// Live masters by port, with how many slots each serves.
    pub fn masters(&self) -> HashMap<u16, u32> {
        self.nodes()
            .expect("cluster nodes")
            .into_iter()
            .filter(|n| n.live_master)
            .map(|n| (n.port, n.slot_count()))
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
