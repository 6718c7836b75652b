//! The cluster, end to end: `hexmatch serve --cluster` processes on
//! loopback ports sharing one real Redis, Chicago's community areas as
//! regions spread across them, drivers from the trips data.
//!
//! - Any node answers nearest queries, area queries and claims exactly
//!   as one node holding every driver would (a brute-force oracle), on
//!   region borders included.
//! - SIGKILL a node: another takes its regions after the lease lapses and
//!   every reservation acknowledged before the kill survives, never given
//!   to a second order.
//! - A stale owner (stopped with `SIGSTOP` until its lease went elsewhere) cannot
//!   acknowledge a reservation, and Redis refuses its fenced writes.
//! - A driver that moves into another node's region is handed over, never
//!   held by two nodes, and a client token opens no node-to-node call.
//! - Each node emits the events of what it serves, on its own feed and on
//!   the shared Redis stream.
//!
//! - On a Redis Cluster (three masters, one replica each) with
//!   `--redis-replicas 1`: a killed Redis master loses no acknowledged
//!   match, one order still makes one match across slots, and a write the
//!   replica did not take is never acknowledged.
//!
//! Every node runs in the production configuration: client tokens
//! (`--api-tokens`) and the cluster secret (`HEXMATCH_CLUSTER_SECRET`) on.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::redis_cluster::RedisCluster;
use common::{Node, RedisServer, poll, unique_prefix};
use hexmatch::Position;
use serde_json::{Value, json};

const REGIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/chicago_community_areas.geojson"
);
/// Community areas average ≈ 8 km²: resolution 8 cells (≈ 0.7 km²) give
/// each of them cells of its own.
const RESOLUTION: u8 = 8;
const LEASE_TTL_MS: u64 = 1500;
const TRIPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/chicago_trips.csv");
/// The client token every test request carries.
const TOKEN: &str = "client-token-1";
/// The secret the nodes share; never a client's.
const SECRET: &str = "cluster-secret-for-tests-0123456789";

/// Region ids as the server names them (file stem prefix).
fn region_ids() -> Vec<String> {
    let mut ids: Vec<String> = region_map()
        .regions()
        .iter()
        .filter(|r| !r.cells.is_empty())
        .map(|r| r.id.to_string())
        .collect();
    ids.sort();
    ids
}

fn start(redis: &str, prefix: &str, node: &str, own: &[String]) -> Node {
    start_args(redis, prefix, node, own, false, LEASE_TTL_MS, &[])
}

/// A node in the production configuration, with `extra` flags.
fn start_args(
    redis: &str,
    prefix: &str,
    node: &str,
    own: &[String],
    ingest: bool,
    lease_ttl_ms: u64,
    extra: &[&str],
) -> Node {
    let own = if own.is_empty() {
        String::new()
    } else {
        own.join(",")
    };
    let resolution = RESOLUTION.to_string();
    let ttl = lease_ttl_ms.to_string();
    let mut args = vec![
        "--api-tokens",
        TOKEN,
        "--cluster",
        "true",
        "--node-id",
        node,
        "--redis-url",
        redis,
        "--redis-prefix",
        prefix,
        "--regions",
        REGIONS,
        "--resolution",
        &resolution,
        "--lease-ttl-ms",
        &ttl,
        "--driver-ttl-s",
        "0",
        "--ingest-stream",
        if ingest { "true" } else { "false" },
    ];
    if !own.is_empty() {
        args.extend(["--own-regions", &own]);
    }
    if !extra.contains(&"--snapshot-interval-ms") {
        args.extend(["--snapshot-interval-ms", "300"]);
    }
    args.extend(extra);
    Node::spawn_with_env(&args, &[("HEXMATCH_CLUSTER_SECRET", SECRET)])
}

/// Two nodes `a` and `b` on one Redis (the test's own, or `REDIS_URL`),
/// the regions spread over them round-robin, settled; each started with
/// a lease of `ttl_ms` and `extra` flags.
struct TwoNodes {
    _redis: Option<RedisServer>,
    url: String,
    prefix: String,
    own: HashMap<usize, Vec<String>>,
    a: Node,
    b: Node,
}

fn two_nodes(test: &str, ttl_ms: u64, extra: &[&str]) -> TwoNodes {
    let (redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix(test);
    let own = spread(&region_ids(), 2);
    let a = start_args(&url, &prefix, "a", &own[&0], false, ttl_ms, extra);
    let b = start_args(&url, &prefix, "b", &own[&1], false, ttl_ms, extra);
    wait_settled(&http(), &[&a, &b], &own);
    TwoNodes {
        _redis: redis,
        url,
        prefix,
        own,
        a,
        b,
    }
}

/// A client that sends the client token.
fn http() -> reqwest::blocking::Client {
    client_with(Some(TOKEN))
}

fn client_with(token: Option<&str>) -> reqwest::blocking::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .default_headers(headers)
        .build()
        .expect("client")
}

/// Status, JSON body and `x-hexmatch-served-by` of a request.
fn send(rb: reqwest::blocking::RequestBuilder) -> (u16, Value, String) {
    let r = rb.send().expect("request sent");
    let status = r.status().as_u16();
    let by = r
        .headers()
        .get("x-hexmatch-served-by")
        .map(|v| v.to_str().expect("ascii").to_owned())
        .unwrap_or_default();
    (status, r.json().unwrap_or(Value::Null), by)
}

fn get(http: &reqwest::blocking::Client, url: &str) -> (u16, Value, String) {
    send(http.get(url))
}

fn post(http: &reqwest::blocking::Client, url: &str, body: &Value) -> (u16, Value, String) {
    send(http.post(url).json(body))
}

/// Regions a node serves now.
fn serving(http: &reqwest::blocking::Client, node: &Node) -> HashSet<String> {
    let (_, c, _) = get(http, &format!("{}/v1/cluster", node.base));
    c["serving"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every node sees `nodes` nodes and the regions are served
/// as `want` says.
fn wait_settled(
    http: &reqwest::blocking::Client,
    nodes: &[&Node],
    want: &HashMap<usize, Vec<String>>,
) {
    poll(30, "the cluster to settle", || {
        nodes
            .iter()
            .enumerate()
            .all(|(i, n)| {
                let (_, c, _) = get(http, &format!("{}/v1/cluster", n.base));
                let mine = serving(http, n);
                let owned: usize = want.values().map(Vec::len).sum();
                c["nodes"].as_array().map_or(0, Vec::len) == nodes.len()
                    && c["regions"].as_array().map_or(0, Vec::len) >= owned
                    && want[&i].iter().all(|r| mine.contains(r))
            })
            .then_some(())
    });
}

/// `(id, position)` of the drivers loaded.
type Fleet = Vec<(String, Position)>;

/// Loads `n` drivers at Chicago trip pickups, in batches sent to the nodes
/// in turn (each batch split by region owner).
fn load(http: &reqwest::blocking::Client, nodes: &[&Node], n: usize) -> Fleet {
    let drivers = common::chicago_drivers(n, false);
    for (i, batch) in drivers.chunks(400).enumerate() {
        let node = nodes[i % nodes.len()];
        let (status, tally, _) = post(
            http,
            &format!("{}/v1/locations", node.base),
            &Value::Array(batch.to_vec()),
        );
        assert_eq!(status, 200, "{tally}");
        assert_eq!(
            tally["applied"].as_u64(),
            Some(batch.len() as u64),
            "{tally}"
        );
    }
    drivers
        .iter()
        .map(|d| {
            (
                d["driver_id"].as_str().expect("id").to_owned(),
                Position::new(
                    d["lat"].as_f64().expect("lat"),
                    d["lon"].as_f64().expect("lon"),
                )
                .expect("valid"),
            )
        })
        .collect()
}

/// The oracle: the `k` nearest of `fleet` (not in `taken`) within
/// `radius`, by (great-circle distance, id).
fn oracle(
    fleet: &Fleet,
    taken: &HashSet<String>,
    q: Position,
    k: usize,
    radius: f64,
) -> Vec<(String, f64)> {
    let mut all: Vec<(String, f64)> = fleet
        .iter()
        .filter(|(id, _)| !taken.contains(id))
        .map(|(id, p)| (id.clone(), q.distance_m(*p)))
        .filter(|(_, d)| *d <= radius)
        .collect();
    all.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// Query points: midpoints of drivers in different regions (on or near
/// borders), and a grid over the city.
fn query_points(fleet: &Fleet, regions: &hexmatch::RegionMap, n: usize) -> Vec<Position> {
    let mut out = Vec::new();
    for w in fleet.windows(2) {
        let (a, b) = (w[0].1, w[1].1);
        if regions.region_of(a).ok() != regions.region_of(b).ok() {
            out.push(
                Position::new(
                    f64::midpoint(a.lat(), b.lat()),
                    f64::midpoint(a.lon(), b.lon()),
                )
                .expect("valid"),
            );
        }
        if out.len() >= n / 2 {
            break;
        }
    }
    let side = ((n - out.len()) as f64).sqrt().ceil() as usize;
    for i in 0..side {
        for j in 0..side {
            let lat = 41.65 + 0.36 * (i as f64 + 0.5) / side as f64;
            let lon = -87.85 + 0.33 * (j as f64 + 0.5) / side as f64;
            out.push(Position::new(lat, lon).expect("valid"));
        }
    }
    out
}

fn region_map() -> hexmatch::RegionMap {
    let text = std::fs::read_to_string(REGIONS).expect("regions file");
    hexmatch::RegionMap::from_geojson(
        &text,
        RESOLUTION,
        "chicago-community-areas",
        hexmatch::Outside::DefaultRegion,
    )
    .expect("valid regions")
}

/// Splits the regions over `nodes` round-robin, so neighbours often
/// belong to different nodes.
fn spread(regions: &[String], nodes: usize) -> HashMap<usize, Vec<String>> {
    let mut out: HashMap<usize, Vec<String>> = HashMap::new();
    for (i, r) in regions.iter().enumerate() {
        out.entry(i % nodes).or_default().push(r.clone());
    }
    out
}

#[test]
fn any_node_answers_exactly_as_one_node_would() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("cluster3");
    let regions = region_ids();
    let own = spread(&regions, 3);
    let a = start(&url, &prefix, "a", &own[&0]);
    let b = start(&url, &prefix, "b", &own[&1]);
    let c = start(&url, &prefix, "c", &own[&2]);
    let nodes = [&a, &b, &c];
    let http = &http();
    wait_settled(http, &nodes, &own);

    let fleet = load(http, &nodes, 3000);
    let map = region_map();
    // Every region's drivers live on its owner only.
    let (_, listed, _) = get(http, &format!("{}/v1/regions", b.base));
    let owners: HashMap<String, String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["region"].as_str().expect("id").to_owned(),
                r["owner"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        for r in &own[&i] {
            assert_eq!(owners[r], ["a", "b", "c"][i], "{r}");
        }
        let _ = n;
    }

    check_nearest(http, &nodes, &fleet, &map);

    check_areas(http, &nodes, &fleet, &map);

    check_claims(http, &nodes, &fleet, &map);
}

/// Every page of `GET /v1/drivers?{query}` from `node`, by id.
fn area_pages(http: &reqwest::blocking::Client, node: &Node, query: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after = String::new();
    loop {
        let url = format!("{}/v1/drivers?{query}&limit=400{after}", node.base);
        let (status, page, _) = get(http, &url);
        assert_eq!(status, 200, "{page}");
        ids.extend(
            page["drivers"]
                .as_array()
                .expect("drivers")
                .iter()
                .map(|d| d["driver_id"].as_str().expect("id").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => after = format!("&cursor={next}"),
            None => return ids,
        }
    }
}

/// Area queries to every node: a box over regions of all three nodes is
/// gathered from all of them; `region=` goes to the region's owner, and
/// narrows nearest queries there; stats and density count the same
/// drivers.
fn check_areas(
    http: &reqwest::blocking::Client,
    nodes: &[&Node; 3],
    fleet: &Fleet,
    map: &hexmatch::RegionMap,
) {
    let (w, s, e, n) = (-87.70, 41.85, -87.60, 41.95);
    let mut in_box: Vec<String> = fleet
        .iter()
        .filter(|(_, p)| (w..=e).contains(&p.lon()) && (s..=n).contains(&p.lat()))
        .map(|(id, _)| id.clone())
        .collect();
    in_box.sort();
    assert!(in_box.len() > 400, "more than a page: {}", in_box.len());
    let res = hexmatch::Resolution::try_from(RESOLUTION).expect("valid");
    let cell = |p: Position| {
        hexmatch::LatLng::new(p.lat(), p.lon())
            .expect("valid")
            .to_cell(res)
    };
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            area_pages(http, node, &format!("bbox={w},{s},{e},{n}")),
            in_box,
            "box at node {i}"
        );
        let (status, density, by) = get(
            http,
            &format!("{}/v1/density?res=7&bbox={w},{s},{e},{n}", node.base),
        );
        assert_eq!(status, 200, "{density}");
        let total: u64 = density["cells"]
            .as_array()
            .expect("cells")
            .iter()
            .map(|c| c["total"].as_u64().expect("total"))
            .sum();
        assert_eq!(total as usize, in_box.len(), "density at node {i} ({by})");
    }
    // Three busy regions, each asked at every node.
    let mut busiest: Vec<(usize, String)> = map
        .regions()
        .iter()
        .map(|r| {
            let held = fleet
                .iter()
                .filter(|(_, p)| r.cells.contains(&cell(*p)))
                .count();
            (held, r.id.to_string())
        })
        .collect();
    busiest.sort_by(|a, b| b.cmp(a));
    let none = HashSet::new();
    for (held, region) in busiest.iter().take(3) {
        let cells = map
            .cells_of(&hexmatch::RegionId::new(region).expect("valid"))
            .expect("small")
            .expect("known");
        let mut want: Vec<String> = fleet
            .iter()
            .filter(|(_, p)| cells.contains(cell(*p)))
            .map(|(id, _)| id.clone())
            .collect();
        want.sort();
        assert_eq!(want.len(), *held);
        let inside: Fleet = fleet
            .iter()
            .filter(|(_, p)| cells.contains(cell(*p)))
            .cloned()
            .collect();
        let from = inside[0].1;
        for (i, node) in nodes.iter().enumerate() {
            assert_eq!(
                area_pages(http, node, &format!("region={region}")),
                want,
                "{region} at node {i}"
            );
            let (status, stats, _) = get(http, &format!("{}/v1/regions/{region}/stats", node.base));
            assert_eq!(status, 200, "{stats}");
            assert_eq!(stats["drivers"]["total"].as_u64(), Some(*held as u64));
            let url = format!(
                "{}/v1/drivers/nearest?lat={}&lon={}&k=5&region={region}",
                node.base,
                from.lat(),
                from.lon()
            );
            let (status, body, _) = get(http, &url);
            assert_eq!(status, 200, "{body}");
            let got: Vec<String> = body["drivers"]
                .as_array()
                .expect("drivers")
                .iter()
                .map(|d| d["driver_id"].as_str().expect("id").to_owned())
                .collect();
            let want: Vec<String> = oracle(&inside, &none, from, 5, 500_000.0)
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            assert_eq!(got, want, "nearest in {region} at node {i}");
        }
    }
}

/// Nearest queries to every node, several k and radii, against the oracle.
fn check_nearest(
    http: &reqwest::blocking::Client,
    nodes: &[&Node; 3],
    fleet: &Fleet,
    map: &hexmatch::RegionMap,
) {
    let nodes = *nodes;
    let none = HashSet::new();
    let mut fanned_out = 0;
    let mut checked = 0;
    for (qi, q) in query_points(fleet, map, 60).into_iter().enumerate() {
        let node = nodes[qi % 3];
        for (k, radius) in [(1, None), (10, None), (25, Some(1500.0))] {
            let mut url = format!(
                "{}/v1/drivers/nearest?lat={}&lon={}&k={k}",
                node.base,
                q.lat(),
                q.lon()
            );
            if let Some(r) = radius {
                url = format!("{url}&radius_m={r}");
            }
            let (status, body, by) = get(http, &url);
            assert_eq!(status, 200, "{body}");
            let got: Vec<(String, f64)> = body["drivers"]
                .as_array()
                .expect("drivers")
                .iter()
                .map(|d| {
                    (
                        d["driver_id"].as_str().expect("id").to_owned(),
                        d["distance_m"].as_f64().expect("distance"),
                    )
                })
                .collect();
            let want = oracle(fleet, &none, q, k, radius.unwrap_or(500_000.0));
            assert_eq!(
                got, want,
                "query {q:?} k={k} radius={radius:?} at {}",
                node.base
            );
            if by.contains(',') {
                fanned_out += 1;
            }
            checked += 1;
        }
    }
    assert!(
        fanned_out * 5 >= checked,
        "only {fanned_out} of {checked} queries crossed nodes: the test would not check merging"
    );
}

/// Claims at border points, sent to rotating nodes: each reserves the
/// globally nearest driver not yet reserved; then every node finds every
/// order, and a confirm through another node works.
fn check_claims(
    http: &reqwest::blocking::Client,
    nodes: &[&Node; 3],
    fleet: &Fleet,
    map: &hexmatch::RegionMap,
) {
    let nodes = *nodes;
    let (a, c) = (nodes[0], nodes[2]);
    // Claims at border points, sent to rotating nodes: each reserves the
    // globally nearest driver not yet reserved.
    let mut taken: HashSet<String> = HashSet::new();
    let mut orders: BTreeMap<String, String> = BTreeMap::new();
    let mut forwarded = 0;
    for (i, q) in query_points(fleet, map, 40)
        .into_iter()
        .enumerate()
        .take(40)
    {
        let node = nodes[i % 3];
        let order = format!("o{i}");
        let (status, m, by) = post(
            http,
            &format!("{}/v1/matches", node.base),
            &json!({"order_id": order, "pickup": {"lat": q.lat(), "lon": q.lon()}, "hold_ms": 600_000}),
        );
        assert_eq!(status, 201, "{m}");
        let want = oracle(fleet, &taken, q, 1, 500_000.0);
        assert_eq!(
            (
                m["driver_id"].as_str().expect("driver"),
                m["distance_m"].as_f64()
            ),
            (want[0].0.as_str(), Some(want[0].1)),
            "claim {order} at {q:?} via {}",
            node.base
        );
        if !by.split(',').any(|n| n == ["a", "b", "c"][i % 3]) {
            forwarded += 1;
        }
        taken.insert(want[0].0.clone());
        orders.insert(order, want[0].0.clone());
    }
    assert!(forwarded > 0, "no claim was served by another node");
    // Repeating a claim anywhere returns the same match; every node finds
    // every order; the drivers are reserved where they live.
    for (i, (order, driver)) in orders.iter().enumerate() {
        for node in &nodes {
            let (status, m, _) = get(http, &format!("{}/v1/matches/{order}", node.base));
            assert_eq!(status, 200, "{order} via {}: {m}", node.base);
            assert_eq!(m["driver_id"].as_str(), Some(driver.as_str()));
        }
        let (_, d, _) = get(http, &format!("{}/v1/drivers/{driver}", nodes[i % 3].base));
        assert_eq!(d["status"], "reserved", "{d}");
        assert_eq!(d["order_id"].as_str(), Some(order.as_str()));
    }
    // Confirm through a node that probably does not hold the match.
    let (order, driver) = orders.iter().next().expect("an order");
    let (status, m, _) = post(
        http,
        &format!("{}/v1/matches/{order}/confirm", c.base),
        &json!({}),
    );
    assert_eq!(
        (status, m["state"].as_str()),
        (200, Some("confirmed")),
        "{m}"
    );
    let (_, d, _) = get(http, &format!("{}/v1/drivers/{driver}", a.base));
    assert_eq!(d["status"], "busy");
}

/// Waits until `survivor` serves every region in `regions`; returns how long.
fn wait_takeover(
    http: &reqwest::blocking::Client,
    survivor: &Node,
    regions: &[String],
    secs: u64,
) -> Duration {
    let started = Instant::now();
    poll(secs, "the takeover", || {
        let now = serving(http, survivor);
        regions.iter().all(|r| now.contains(r)).then_some(())
    });
    started.elapsed()
}

/// Claims at the positions of drivers of node 0's regions (so they are
/// reserved on node 0), through node 1.
fn claim_on(
    http: &reqwest::blocking::Client,
    via: &Node,
    fleet: &Fleet,
    regions: &HashSet<String>,
    map: &hexmatch::RegionMap,
    n: usize,
    tag: &str,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (id, p) in fleet {
        if out.len() == n {
            break;
        }
        if !map
            .region_of(*p)
            .is_ok_and(|r| regions.contains(r.as_str()))
        {
            continue;
        }
        let order = format!("{tag}-{id}");
        let (status, m, _) = post(
            http,
            &format!("{}/v1/matches", via.base),
            &json!({"order_id": order, "pickup": {"lat": p.lat(), "lon": p.lon()}, "hold_ms": 600_000}),
        );
        if status == 201 {
            out.push((order, m["driver_id"].as_str().expect("driver").to_owned()));
        }
    }
    out
}

#[test]
fn a_killed_node_s_regions_are_taken_over_with_every_reservation() {
    let TwoNodes {
        _redis,
        own,
        mut a,
        b,
        ..
    } = two_nodes("failover", LEASE_TTL_MS, &[]);
    let http = &http();
    let fleet = load(http, &[&a, &b], 2000);
    let map = region_map();
    let a_regions: HashSet<String> = own[&0].iter().cloned().collect();
    let held = claim_on(http, &b, &fleet, &a_regions, &map, 30, "before");
    assert!(held.len() >= 20, "only {} reservations made", held.len());
    // Let a snapshot include every driver (they are in the records anyway).
    std::thread::sleep(Duration::from_millis(800));

    a.signal("KILL");
    let took = wait_takeover(http, &b, &own[&0], 30);
    eprintln!(
        "takeover after SIGKILL: {took:?} (lease {LEASE_TTL_MS} ms, renewed every {} ms)",
        LEASE_TTL_MS / 3
    );

    // Every acknowledged reservation is there, with its driver reserved.
    for (order, driver) in &held {
        let (status, m, _) = get(http, &format!("{}/v1/matches/{order}", b.base));
        assert_eq!(status, 200, "{order} lost in the takeover: {m}");
        assert_eq!(
            (m["driver_id"].as_str(), m["state"].as_str()),
            (Some(driver.as_str()), Some("reserved"))
        );
        let (_, d, _) = get(http, &format!("{}/v1/drivers/{driver}", b.base));
        assert_eq!(
            (d["status"].as_str(), d["order_id"].as_str()),
            (Some("reserved"), Some(order.as_str()))
        );
    }
    // The drivers of a's regions came back from its snapshot.
    let in_a = fleet
        .iter()
        .filter(|(_, p)| {
            map.region_of(*p)
                .is_ok_and(|r| a_regions.contains(r.as_str()))
        })
        .count();
    let (_, listed, _) = get(http, &format!("{}/v1/regions", b.base));
    let restored: u64 = listed
        .as_array()
        .expect("array")
        .iter()
        .filter(|r| a_regions.contains(r["region"].as_str().unwrap_or("")))
        .map(|r| r["drivers"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(restored as usize, in_a);
    // New claims at the same spots never get a driver already held.
    let reserved: HashSet<&String> = held.iter().map(|(_, d)| d).collect();
    let after = claim_on(http, &b, &fleet, &a_regions, &map, 30, "after");
    assert!(!after.is_empty());
    for (order, driver) in &after {
        assert!(!reserved.contains(driver), "{driver} given to {order} too");
    }
}

/// A counter from a node's `/metrics` (0 when absent).
fn metric(http: &reqwest::blocking::Client, node: &Node, name: &str) -> f64 {
    let text = http
        .get(format!("{}/metrics", node.base))
        .send()
        .and_then(reqwest::blocking::Response::text)
        .unwrap_or_default();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Node `a` is killed just after drivers of its regions moved, left,
/// arrived, changed status and crossed into `b`'s regions, all after its
/// last snapshot: the taker serves every driver exactly as acknowledged
/// (position, status), none that left, and each region's count.
#[test]
#[allow(clippy::too_many_lines)]
fn a_taker_serves_every_driver_as_last_acknowledged() {
    // Snapshots far apart: the changes below land after the last one.
    let slow = ["--snapshot-interval-ms", "3000"];
    let TwoNodes {
        _redis,
        own,
        mut a,
        b,
        ..
    } = two_nodes("exact", LEASE_TTL_MS, &slow);
    let http = &http();
    let map = region_map();
    let in_a = |p: &Position| {
        map.region_of(*p)
            .is_ok_and(|r| own[&0].iter().any(|x| x == r.as_str()))
    };
    let fleet = load(http, &[&a, &b], 1500);
    let mut want: BTreeMap<String, (Position, &str)> = fleet
        .iter()
        .map(|(id, p)| (id.clone(), (*p, "available")))
        .collect();
    let mine: Vec<(String, Position)> = fleet.iter().filter(|(_, p)| in_a(p)).cloned().collect();
    let theirs: Vec<Position> = fleet
        .iter()
        .filter(|(_, p)| !in_a(p))
        .map(|(_, p)| *p)
        .collect();
    assert!(
        mine.len() > 300 && theirs.len() > 300,
        "{} / {}",
        mine.len(),
        theirs.len()
    );

    // Right after a snapshot of a's regions, so the next is 3 s away.
    let before = metric(http, &a, "hexmatch_snapshots_total");
    poll(10, "a snapshot", || {
        (metric(http, &a, "hexmatch_snapshots_total") > before).then_some(())
    });
    let put = |via: &Node, id: &str, p: Position, status: Option<&str>| {
        let mut body = json!({"lat": p.lat(), "lon": p.lon()});
        if let Some(s) = status {
            body["status"] = json!(s);
        }
        let (code, out, _) = send(
            http.put(format!("{}/v1/drivers/{id}", via.base))
                .json(&body),
        );
        assert_eq!(code, 200, "{id}: {out}");
    };
    // Moved within a's regions (often into another of them), through b.
    for (i, (id, _)) in mine.iter().enumerate().take(200) {
        let to = mine[(i + 7) % mine.len()].1;
        put(&b, id, to, None);
        want.insert(id.clone(), (to, "available"));
    }
    // Removed.
    for (id, _) in mine.iter().skip(200).take(30) {
        let (code, out, _) = send(http.delete(format!("{}/v1/drivers/{id}", a.base)));
        assert_eq!(code, 204, "{id}: {out}");
        want.remove(id);
    }
    // New, and gone offline.
    for (i, (_, p)) in mine.iter().skip(230).take(30).enumerate() {
        let id = format!("arrived-{i}");
        put(&a, &id, *p, None);
        want.insert(id, (*p, "available"));
    }
    for (id, p) in mine.iter().skip(260).take(20) {
        put(&a, id, *p, Some("offline"));
        want.insert(id.clone(), (*p, "offline"));
    }
    // Crossed into b's regions: handed over, and gone from a's.
    for (i, (id, _)) in mine.iter().skip(280).take(20).enumerate() {
        let to = theirs[i * 5];
        put(&a, id, to, None);
        want.insert(id.clone(), (to, "available"));
    }
    // Matched, confirmed (busy), moved and completed: available again.
    // (Trip pickups share positions: whoever is there.)
    let p = mine[290].1;
    let (code, m, _) = post(
        http,
        &format!("{}/v1/matches", b.base),
        &json!({"order_id": "exact-1", "pickup": {"lat": p.lat(), "lon": p.lon()}, "radius_m": 1}),
    );
    assert_eq!(code, 201, "{m}");
    let id = m["driver_id"].as_str().expect("driver").to_owned();
    for step in ["confirm", "complete"] {
        if step == "complete" {
            put(&b, &id, mine[291].1, None);
        }
        let (code, out, _) = post(
            http,
            &format!("{}/v1/matches/exact-1/{step}", b.base),
            &json!({}),
        );
        assert_eq!(code, 200, "{step}: {out}");
    }
    want.insert(id, (mine[291].1, "available"));
    a.signal("KILL");
    wait_takeover(http, &b, &own[&0], 30);

    let mut wrong = Vec::new();
    for (id, (p, status)) in &want {
        let (code, d, _) = get(http, &format!("{}/v1/drivers/{id}", b.base));
        let got = (d["lat"].as_f64(), d["lon"].as_f64(), d["status"].as_str());
        if code != 200 || got != (Some(p.lat()), Some(p.lon()), Some(*status)) {
            wrong.push(format!("{id}: want {p:?} {status}, got {code} {got:?}"));
        }
    }
    for (id, _) in mine.iter().skip(200).take(30) {
        let (code, d, _) = get(http, &format!("{}/v1/drivers/{id}", b.base));
        if code != 404 {
            wrong.push(format!("{id} was removed, got {code} {d}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong of {}:\n{}",
        wrong.len(),
        want.len(),
        wrong.join("\n")
    );
    // And nothing else: each region holds exactly the drivers it should.
    let mut per_region: BTreeMap<String, u64> = BTreeMap::new();
    for (p, _) in want.values() {
        *per_region
            .entry(map.region_of(*p).expect("region").to_string())
            .or_default() += 1;
    }
    let (_, listed, _) = get(http, &format!("{}/v1/regions", b.base));
    let listed: BTreeMap<String, u64> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| Some((r["region"].as_str()?.to_owned(), r["drivers"].as_u64()?)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(listed, per_region);
}

/// Each snapshot trims its region's journal to what the previous snapshot
/// does not cover: a steady fleet's journals shrink to their last entries.
#[test]
fn snapshots_trim_the_region_journals() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("trim");
    let regions = region_ids();
    let a = start(&url, &prefix, "a", &["*".to_owned()]);
    let http = &http();
    wait_settled(http, &[&a], &[(0, regions.clone())].into());
    let fleet = load(http, &[&a], 800);
    let mut redis = RedisServer::conn(&url);
    // Every region's, the one of positions outside the polygons included.
    let journals: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:{{region:*}}:locations"))
        .query(&mut redis)
        .expect("keys");
    let xinfo = |redis: &mut redis::Connection, key: &str, field: &str| -> u64 {
        let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(key)
            .query(redis)
            .unwrap_or_default();
        match info.get(field) {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        }
    };
    let added: u64 = journals
        .iter()
        .map(|j| xinfo(&mut redis, j, "entries-added"))
        .sum();
    assert_eq!(added, fleet.len() as u64, "every driver journalled once");
    poll(10, "the journals to be trimmed", || {
        let left: u64 = journals
            .iter()
            .map(|j| xinfo(&mut redis, j, "length"))
            .sum();
        (left <= journals.len() as u64).then_some(())
    });
}

/// Node `a` owning every region with 1,000 drivers (snapshotted), node
/// `b` on standby, on one Redis.
struct OwnerAndStandby {
    _redis: Option<RedisServer>,
    url: String,
    prefix: String,
    a: Node,
    b: Node,
    fleet: Fleet,
    regions: Vec<String>,
}

fn owner_and_standby(test: &str) -> OwnerAndStandby {
    let (redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix(test);
    let regions = region_ids();
    let a = start(&url, &prefix, "a", &["*".to_owned()]);
    let b = start(&url, &prefix, "b", &[]);
    let all: HashMap<usize, Vec<String>> = [(0, regions.clone()), (1, Vec::new())].into();
    wait_settled(&http(), &[&a, &b], &all);
    let fleet = load(&http(), &[&a], 1000);
    std::thread::sleep(Duration::from_millis(800));
    OwnerAndStandby {
        _redis: redis,
        url,
        prefix,
        a,
        b,
        fleet,
        regions,
    }
}

#[test]
fn a_stale_owner_cannot_acknowledge_reservations() {
    let OwnerAndStandby {
        _redis,
        url,
        prefix,
        mut a,
        b,
        fleet,
        regions,
    } = owner_and_standby("fencing");
    let http = &http();

    // Pause a past its lease: b takes everything over.
    a.signal("STOP");
    wait_takeover(http, &b, &regions, 30);
    // b reserves every driver near one spot.
    let (id0, p0) = fleet[0].clone();
    let mut b_orders = Vec::new();
    for i in 0..5 {
        let (status, m, by) = post(
            http,
            &format!("{}/v1/matches", b.base),
            &json!({"order_id": format!("b{i}"), "pickup": {"lat": p0.lat(), "lon": p0.lon()}, "hold_ms": 600_000}),
        );
        assert_eq!((status, by.as_str()), (201, "b"), "{m}");
        b_orders.push(m["driver_id"].as_str().expect("driver").to_owned());
    }
    assert!(b_orders.contains(&id0) || fleet.iter().any(|(id, _)| b_orders.contains(id)));

    // a wakes up believing nothing happened and is asked at once.
    a.signal("CONT");
    let mut a_answers = Vec::new();
    for i in 0..5 {
        let (status, m, by) = post(
            http,
            &format!("{}/v1/matches", a.base),
            &json!({"order_id": format!("a{i}"), "pickup": {"lat": p0.lat(), "lon": p0.lon()}, "hold_ms": 600_000}),
        );
        a_answers.push((status, m, by));
    }
    // Whatever a answered, it acknowledged nothing itself, and nothing
    // acknowledged took a driver b holds.
    for (status, m, by) in &a_answers {
        if *status == 201 || *status == 200 {
            assert_ne!(by, "a", "the stale owner acknowledged {m}");
            let d = m["driver_id"].as_str().expect("driver");
            assert!(!b_orders.iter().any(|x| x == d), "{d} double-booked: {m}");
        }
    }
    // And Redis holds exactly one live record per reserved driver.
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut conn = client.get_connection().expect("redis");
    let mut drivers = HashSet::new();
    for (_, rec) in live_records(&mut conn, &prefix) {
        assert!(drivers.insert(rec.m.driver_id.to_string()), "{:?}", rec.m);
    }
    assert!(drivers.len() >= 5);
}

/// The fence itself, below the HTTP layer: a node whose lease was taken
/// while it was not looking (its own clock still says the lease is
/// good) has every match write refused by Redis, and the new owner
/// restored what the old one had acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)]
async fn redis_refuses_writes_of_a_fenced_off_owner() {
    use hexmatch::{ClaimRequest, DriverId, DriverUpdate, Engine, EngineConfig, OrderId};
    use hexmatch_server::cluster::Cluster;
    use redis::AsyncCommands;
    use std::sync::Arc;

    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("fence");
    let map = region_map();
    let region = map.regions()[0].clone();
    let spot = {
        let ll = h3o::LatLng::from(region.cells[0]);
        Position::new(ll.lat(), ll.lng()).expect("valid")
    };
    let ttl = Duration::from_secs(60);
    let engine = |n: &str| {
        let e = Engine::new(EngineConfig {
            resolution: RESOLUTION,
            ..EngineConfig::default()
        })
        .expect("engine");
        for i in 0..3 {
            e.upsert(&DriverUpdate::location(
                DriverId::new(&format!("{n}{i}")).expect("id"),
                spot,
                None,
            ))
            .expect("upsert");
        }
        Arc::new(e)
    };
    let own = [region.id.to_string()];
    let join = |node: &'static str| {
        let (url, prefix, map, own) = (url.clone(), prefix.clone(), map.clone(), own.clone());
        async move {
            let c = Cluster::connect(
                &url,
                &prefix,
                node,
                "http://127.0.0.1:9",
                map,
                &own,
                ttl,
                Some(SECRET),
                hexmatch_server::persist::Durability::default(),
            )
            .await
            .expect("cluster");
            let p = common::persistence(&url, &prefix, node, node).await;
            p.set_fence(Arc::clone(&c) as Arc<dyn hexmatch_server::persist::Fence>);
            (c, p)
        }
    };
    let (x, px) = join("x").await;
    let ex = engine("d");
    assert_eq!(x.tick(&ex, &px).await.len(), 1, "x takes the region");
    let reserve = |e: &Engine, order: &str| {
        let order = OrderId::new(order).expect("id");
        e.claim(&order, &ClaimRequest::new(spot)).expect("claim");
        e.durable_match(&order).expect("record")
    };
    let first = reserve(&ex, "o1");
    px.put_match(&first).await.expect("x holds the lease");

    // x stalls past its lease (here: the lease disappears under it), and y
    // takes the region with a new epoch, restoring x's acknowledged match.
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let lease = format!("{prefix}:{{region:{}}}:lease", region.id);
    conn.del::<_, ()>(&lease).await.expect("del");
    let (y, py) = join("y").await;
    let ey = engine("e");
    let taken = y.tick(&ey, &py).await;
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (
            taken[0].previous.as_deref(),
            taken[0].epoch,
            taken[0].matches
        ),
        (Some("x"), 2, 1)
    );
    assert_eq!(
        ey.get_match(&first.m.order_id).map(|m| m.driver_id),
        Some(first.m.driver_id.clone())
    );

    // x still believes it owns the region; Redis disagrees.
    assert!(x.serves(region.id.as_str()));
    let second = reserve(&ex, "o2");
    let err = px.put_match(&second).await.expect_err("fenced");
    assert!(
        matches!(&err, hexmatch_server::persist::WriteError::NotOwner { region: r } if *r == region.id.as_str()),
        "{err}"
    );
    let stored: Option<Vec<u8>> = conn
        .hget(format!("{prefix}:{{region:{}}}:matches", region.id), "o2")
        .await
        .expect("hget");
    assert!(stored.is_none(), "a fenced write landed");
    let routed: Option<String> = conn
        .get(format!("{prefix}:{{order:o2}}"))
        .await
        .expect("get");
    assert!(routed.is_none());
    // Changing the match it had is refused the same way.
    let mut confirmed = first.clone();
    confirmed.m.state = hexmatch::MatchState::Confirmed;
    assert!(px.put_match(&confirmed).await.is_err());
    // y, the owner, writes.
    let third = reserve(&ey, "o3");
    py.put_match(&third).await.expect("y holds the lease");
}

/// Stream ingestion in a cluster: both nodes read the shared stream, and
/// each update ends up on the owner of its region, whichever node read it.
#[test]
fn stream_updates_reach_the_owner_of_their_region() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("cluster-stream");
    let regions = region_ids();
    let own = spread(&regions, 2);
    // A long lease: this test is about routing, and a lease lost under the
    // load of the other tests would drop updates applied since the last
    // snapshot (takeover restores from snapshots; ARCHITECTURE.md).
    let a = start_args(&url, &prefix, "a", &own[&0], true, 10_000, &[]);
    let b = start_args(&url, &prefix, "b", &own[&1], true, 10_000, &[]);
    let http = &http();
    wait_settled(http, &[&a, &b], &own);
    let drivers = common::chicago_drivers(1500, true);
    let mut conn = common::RedisServer::conn(&url);
    let mut pipe = redis::pipe();
    common::xadd_drivers(&mut pipe, &format!("{prefix}:locations"), &drivers, &[]);
    // One invalid entry goes to the dead letters, not to a node.
    pipe.cmd("XADD")
        .arg(format!("{prefix}:locations"))
        .arg("*")
        .arg("driver_id")
        .arg("bad")
        .arg("lat")
        .arg("95")
        .arg("lon")
        .arg("0")
        .ignore();
    let () = pipe.query(&mut conn).expect("xadd");
    let held = |node: &Node| -> u64 {
        let (_, listed, _) = get(http, &format!("{}/v1/regions", node.base));
        listed
            .as_array()
            .expect("array")
            .iter()
            .map(|r| r["drivers"].as_u64().unwrap_or(0))
            .sum()
    };
    poll(30, "every update applied", || {
        (held(&a) + held(&b) == drivers.len() as u64).then_some(())
    });
    // The owners as Redis records them (a node's cached map can lag).
    let owner_of: HashMap<String, String> = {
        let raw: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("{prefix}:{{cluster}}:owners"))
            .query(&mut conn)
            .expect("owners");
        raw.into_iter()
            .map(|(r, token)| (r, token.split('|').next().unwrap_or("").to_owned()))
            .collect()
    };
    // Each node holds only drivers of regions it owns.
    for (node, id) in [(&a, "a"), (&b, "b")] {
        let (_, listed, _) = get(http, &format!("{}/v1/regions", node.base));
        for r in listed.as_array().expect("array") {
            if r["drivers"].as_u64().unwrap_or(0) > 0 {
                let region = r["region"].as_str().expect("id");
                assert_eq!(owner_of.get(region).map(String::as_str), Some(id), "{r}");
            }
        }
    }
    // The invalid entry may be read after the last valid one is applied.
    poll(30, "the invalid entry dead-lettered", || {
        let dead: usize = redis::cmd("XLEN")
            .arg(format!("{prefix}:locations:dead"))
            .query(&mut conn)
            .expect("xlen");
        (dead == 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let dead: usize = redis::cmd("XLEN")
        .arg(format!("{prefix}:locations:dead"))
        .query(&mut conn)
        .expect("xlen");
    assert_eq!(dead, 1, "only the invalid entry");
}

/// Drivers a node holds, per region, as its `/v1/regions` says.
fn held_by(http: &reqwest::blocking::Client, node: &Node) -> HashMap<String, u64> {
    let (_, regions, _) = get(http, &format!("{}/v1/regions", node.base));
    regions
        .as_array()
        .expect("regions")
        .iter()
        .filter_map(|r| Some((r["region"].as_str()?.to_owned(), r["drivers"].as_u64()?)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Updates sent over the WebSocket stream of one node go to the owners
/// of their regions, as `POST /v1/locations` items do.
#[test]
fn websocket_updates_reach_the_owner_of_their_region() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let TwoNodes {
        _redis, own, a, b, ..
    } = two_nodes("ws", LEASE_TTL_MS, &[]);
    let http = &http();
    let map = region_map();
    let in_a = position_in(&map, &own[&0], None, 0.0);
    let in_b = position_in(&map, &own[&1], None, 0.0);
    let ack: Value = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let ws_url = format!(
                "{}/v1/locations/stream?ack_every=2",
                b.base.replacen("http", "ws", 1)
            );
            let mut req = ws_url.into_client_request().expect("request");
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {TOKEN}").parse().expect("header"),
            );
            let (mut ws, _) = tokio_tungstenite::connect_async(req)
                .await
                .expect("upgrade");
            for (id, p) in [("ws-a", in_a), ("ws-b", in_b)] {
                let frame = json!({"driver_id": id, "lat": p.lat(), "lon": p.lon()});
                ws.send(Message::text(frame.to_string()))
                    .await
                    .expect("send");
            }
            loop {
                if let Message::Text(t) = ws.next().await.expect("an ack").expect("frame") {
                    break serde_json::from_str(t.as_str()).expect("json");
                }
            }
        });
    assert_eq!(
        (
            ack["applied"].as_u64(),
            ack["rejected"].as_array().map(Vec::len)
        ),
        (Some(2), Some(0)),
        "{ack}"
    );
    let region = |p: Position| map.region_of(p).expect("region").to_string();
    assert_eq!(held_by(http, &a), [(region(in_a), 1)].into());
    assert_eq!(held_by(http, &b), [(region(in_b), 1)].into());
}

/// A batch sent to one node is served from every node's drivers: orders
/// at the positions of drivers of both nodes' regions each get a driver
/// at their pickup (the least total distance, 0), reserved on the node
/// that holds it; sent again, the same matches come back.
#[test]
fn a_batch_is_served_from_the_drivers_of_every_node() {
    let TwoNodes {
        _redis, own, a, b, ..
    } = two_nodes("batch", LEASE_TTL_MS, &[]);
    let http = &http();
    let fleet = load(http, &[&a, &b], 1500);
    let map = region_map();
    let node_of = |p: &Position| {
        let r = map.region_of(*p).expect("region").to_string();
        if own[&0].contains(&r) { "a" } else { "b" }
    };
    // Twelve distinct pickups on each node's side.
    let mut pickups: Vec<Position> = Vec::new();
    for side in ["a", "b"] {
        let mut taken = 0;
        for (_, p) in &fleet {
            if taken < 12 && node_of(p) == side && !pickups.contains(p) {
                pickups.push(*p);
                taken += 1;
            }
        }
    }
    let mut orders: Vec<Value> = pickups
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"order_id": format!("b-{i}"), "pickup": {"lat": p.lat(), "lon": p.lon()}, "radius_m": 1, "hold_ms": 600_000}))
        .collect();
    // Lake Michigan: nobody within a metre.
    orders.push(json!({"order_id": "lake", "pickup": {"lat": 41.9, "lon": -87.5}, "radius_m": 1}));
    let body = json!({ "orders": orders });
    let (status, out, _) = post(http, &format!("{}/v1/matches/batch", a.base), &body);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["unmatched"], json!(["lake"]), "{out}");
    let matches = out["matches"].as_array().expect("matches").clone();
    assert_eq!(matches.len(), pickups.len(), "{out}");
    let mut drivers = HashSet::new();
    for m in &matches {
        assert_eq!(m["distance_m"].as_f64(), Some(0.0), "{m}");
        let driver = m["driver_id"].as_str().expect("driver");
        assert!(drivers.insert(driver.to_owned()), "{driver} twice: {out}");
        let i: usize = m["order_id"].as_str().expect("order")[2..]
            .parse()
            .expect("index");
        // Reserved on the node whose region holds it, for this order.
        let holder = if node_of(&pickups[i]) == "a" { &a } else { &b };
        let (status, d, by) = get(http, &format!("{}/v1/drivers/{driver}", holder.base));
        assert_eq!((status, by.as_str()), (200, node_of(&pickups[i])), "{d}");
        assert_eq!(
            (d["status"].as_str(), d["order_id"].as_str()),
            (Some("reserved"), m["order_id"].as_str()),
            "{d}"
        );
    }
    // Idempotent by order id across nodes, sent through the other node.
    let (status, again, _) = post(http, &format!("{}/v1/matches/batch", b.base), &body);
    assert_eq!(status, 200, "{again}");
    let pairs = |v: &Value| -> BTreeMap<String, String> {
        v["matches"]
            .as_array()
            .expect("matches")
            .iter()
            .map(|m| {
                (
                    m["order_id"].as_str().unwrap_or("").to_owned(),
                    m["driver_id"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(pairs(&again), pairs(&out));
}

/// A position of the trips data in one of `regions`, at least `apart_m`
/// from `avoid`.
fn position_in(
    map: &hexmatch::RegionMap,
    regions: &[String],
    avoid: Option<Position>,
    apart_m: f64,
) -> Position {
    common::chicago_drivers(3000, false)
        .iter()
        .map(|d| {
            Position::new(
                d["lat"].as_f64().expect("lat"),
                d["lon"].as_f64().expect("lon"),
            )
            .expect("valid")
        })
        .find(|p| {
            map.region_of(*p)
                .is_ok_and(|r| regions.iter().any(|x| x == r.as_str()))
                && avoid.is_none_or(|a| a.distance_m(*p) >= apart_m)
        })
        .expect("a trip pickup in those regions")
}

/// The messages of a node's event feed, read on a thread: `(event, data)`.
fn event_feed(node: &Node) -> std::sync::mpsc::Receiver<(String, Value)> {
    use std::io::BufRead;
    let resp = reqwest::blocking::Client::new()
        .get(format!("{}/v1/events", node.base))
        .bearer_auth(TOKEN)
        .send()
        .expect("the feed answers");
    assert_eq!(resp.status(), 200);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in std::io::BufReader::new(resp).lines() {
            let Ok(line) = line else { return };
            if let Some(e) = line.strip_prefix("event: ") {
                e.clone_into(&mut event);
            } else if let Some(d) = line.strip_prefix("data: ") {
                let data = serde_json::from_str(d).expect("json data");
                if tx.send((event.clone(), data)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next `n` messages of a feed, or panics after 10 s.
fn next_events(rx: &std::sync::mpsc::Receiver<(String, Value)>, n: usize) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    (0..n)
        .map(|i| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| panic!("event {i} of {n}: {e}"))
        })
        .collect()
}

/// A driver created in a's region, moved into b's and claimed there,
/// every request sent through the other node: a announces the driver
/// entering and leaving its region, b its arrival, the reservation and
/// the status change; each on its own feed, both on the Redis stream.
#[test]
fn each_node_emits_the_events_of_what_it_serves() {
    let t = two_nodes("events", LEASE_TTL_MS, &[]);
    let (a, b) = (&t.a, &t.b);
    let http = &http();
    let map = region_map();
    let here = position_in(&map, &t.own[&0], None, 0.0);
    let there = position_in(&map, &t.own[&1], Some(here), 3000.0);
    let (region_a, region_b) = (
        map.region_of(here).expect("a region").to_string(),
        map.region_of(there).expect("a region").to_string(),
    );
    let on_a = event_feed(a);
    let on_b = event_feed(b);
    for (p, via) in [(here, b), (there, a)] {
        let (status, body, _) = send(
            http.put(format!("{}/v1/drivers/mover", via.base))
                .json(&json!({"lat": p.lat(), "lon": p.lon()})),
        );
        assert_eq!(status, 200, "{body}");
    }
    let (status, m, by) = post(
        http,
        &format!("{}/v1/matches", a.base),
        &json!({"order_id": "o1", "pickup": {"lat": there.lat(), "lon": there.lon()}}),
    );
    assert_eq!((status, by.as_str()), (201, "b"), "{m}");

    let kinds = |got: &[(String, Value)]| -> Vec<(String, String, String)> {
        got.iter()
            .map(|(event, e)| {
                assert_eq!(event, &e["type"], "{e}");
                (
                    e["node"].as_str().expect("node").to_owned(),
                    event.clone(),
                    e["data"]["zone"]
                        .as_str()
                        .or(e["data"]["order_id"].as_str())
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    };
    let got_a = kinds(&next_events(&on_a, 2));
    let s = |x: &str| x.to_owned();
    assert_eq!(
        got_a,
        [
            (s("a"), s("driver.entered"), region_a.clone()),
            (s("a"), s("driver.left"), region_a.clone()),
        ]
    );
    let got_b = kinds(&next_events(&on_b, 3));
    assert_eq!(
        got_b,
        [
            (s("b"), s("driver.entered"), region_b.clone()),
            (s("b"), s("driver.status"), s("o1")),
            (s("b"), s("match.reserved"), s("o1")),
        ]
    );
    // Both nodes append to the one stream.
    let key = format!("{}:events", t.prefix);
    let nodes: Vec<String> = poll(10, "five events on the stream", || {
        let mut c = RedisServer::conn(&t.url);
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query(&mut c)
            .ok()?;
        let nodes: Vec<String> = entries
            .iter()
            .filter_map(|(_, f)| f.iter().find(|(k, _)| k == "node").map(|(_, v)| v.clone()))
            .collect();
        (nodes.len() >= 5).then_some(nodes)
    });
    assert_eq!(nodes.iter().filter(|n| *n == "a").count(), 2, "{nodes:?}");
    assert_eq!(nodes.iter().filter(|n| *n == "b").count(), 3, "{nodes:?}");
}

/// A driver moved into a region another node owns, with client tokens
/// and the cluster secret on: the old node stops offering it, so two
/// orders, one at each position, never both get it.
#[test]
fn a_driver_moved_across_nodes_is_never_offered_twice() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("handoff");
    let regions = region_ids();
    let own = spread(&regions, 3);
    let a = start(&url, &prefix, "a", &own[&0]);
    let b = start(&url, &prefix, "b", &own[&1]);
    let c = start(&url, &prefix, "c", &own[&2]);
    let http = &http();
    wait_settled(http, &[&a, &b, &c], &own);
    let map = region_map();
    let old = position_in(&map, &own[&0], None, 0.0);
    let new = position_in(&map, &own[&1], Some(old), 3000.0);

    // Created on a's region, then moved into b's; both sent through c.
    for (p, ts) in [(old, 1_000), (new, 2_000)] {
        let (status, body, _) = send(
            http.put(format!("{}/v1/drivers/mover", c.base))
                .json(&json!({"lat": p.lat(), "lon": p.lon(), "ts": ts})),
        );
        assert_eq!(status, 200, "{body}");
    }
    // Every node sees it where it went.
    for n in [&a, &b, &c] {
        let (status, d, _) = get(http, &format!("{}/v1/drivers/mover", n.base));
        assert_eq!(status, 200, "{d}");
        assert_eq!(
            (d["lat"].as_f64(), d["lon"].as_f64()),
            (Some(new.lat()), Some(new.lon())),
            "{d}"
        );
    }
    // One order at each position, each within 500 m of it only.
    let mut won = Vec::new();
    for (order, p, via) in [("o-old", old, &a), ("o-new", new, &b)] {
        let (status, m, by) = post(
            http,
            &format!("{}/v1/matches", via.base),
            &json!({"order_id": order, "pickup": {"lat": p.lat(), "lon": p.lon()}, "radius_m": 500}),
        );
        if status == 201 {
            assert_eq!(m["driver_id"], "mover", "{m}");
            won.push((order, by));
        } else {
            assert_eq!(
                (status, m["error"]["code"].as_str()),
                (409, Some("no_driver_available")),
                "{m}"
            );
        }
    }
    assert_eq!(won.len(), 1, "the driver was reserved for {won:?}");
    assert_eq!(won[0].0, "o-new", "reserved at its old position: {won:?}");
    let confirmed = ["o-old", "o-new"]
        .iter()
        .filter(|o| {
            let (status, _, _) = post(
                http,
                &format!("{}/v1/matches/{o}/confirm", c.base),
                &json!({}),
            );
            status == 200
        })
        .count();
    assert_eq!(confirmed, 1);
}

/// Node-to-node operations answer to the cluster secret only: a client
/// token, a made-up secret or a client's copy of the peer headers opens
/// none of them, on a cluster node or on a single node.
#[test]
#[allow(clippy::too_many_lines)]
fn a_client_token_opens_no_node_to_node_call() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("peerauth");
    let regions = region_ids();
    let own = spread(&regions, 2);
    let a = start(&url, &prefix, "a", &own[&0]);
    let b = start(&url, &prefix, "b", &own[&1]);
    let single = Node::spawn(&["--api-tokens", TOKEN]);
    let http = &http();
    wait_settled(http, &[&a, &b], &own);
    let fleet = load(http, &[&a, &b], 300);
    let single_fleet: Vec<Value> = common::chicago_drivers(300, false);
    let (status, tally, _) = post(
        http,
        &format!("{}/v1/locations", single.base),
        &Value::Array(single_fleet),
    );
    assert_eq!(status, 200, "{tally}");

    let ids: Vec<&str> = fleet.iter().map(|(id, _)| id.as_str()).collect();
    let map = region_map();
    // A driver a holds: b's own answer alone would not have it.
    let (far_id, far) = fleet
        .iter()
        .find(|(_, p)| {
            map.region_of(*p)
                .is_ok_and(|r| own[&0].iter().any(|x| x == r.as_str()))
        })
        .cloned()
        .expect("a driver in a's regions");
    let pickup = fleet[0].1;
    let order = json!({"order_id": "sneaky", "pickup": {"lat": pickup.lat(), "lon": pickup.lon()}});
    let count = |node: &Node| -> u64 {
        let (_, regions, _) = get(http, &format!("{}/v1/regions", node.base));
        regions
            .as_array()
            .expect("regions")
            .iter()
            .filter_map(|r| r["drivers"].as_u64())
            .sum()
    };
    let before: Vec<u64> = [&a, &b, &single].iter().map(|n| count(n)).collect();
    let calls = [
        ("/v1/cluster/handoff", json!({"driver_ids": ids})),
        (
            "/v1/cluster/reserve",
            json!({"driver_id": far_id, "order": order}),
        ),
        ("/internal/v1/handoff", json!({"driver_ids": ids})),
        (
            "/internal/v1/reserve",
            json!({"driver_id": far_id, "order": order}),
        ),
    ];
    let wrong_secret = client_with(None);
    for node in [&a, &b, &single] {
        for (path, body) in &calls {
            let target = format!("{}{path}", node.base);
            let (status, answer, _) = post(http, &target, body);
            assert!(
                [403, 404].contains(&status),
                "{path} answered {status} to a client token: {answer}"
            );
            if path.starts_with("/internal") {
                assert_eq!(
                    (status, answer["error"]["code"].as_str()),
                    (403, Some("forbidden")),
                    "{path}: {answer}"
                );
            }
            let (status, answer, _) = send(
                wrong_secret
                    .post(&target)
                    .header("x-hexmatch-cluster-auth", "guess")
                    .json(body),
            );
            // 401 on a cluster node; a single node has no nodes to hear
            // from, and refuses it as any client (403, or 404 off /internal).
            assert!(
                [401, 403, 404].contains(&status),
                "{path} answered {status} to a made-up secret: {answer}"
            );
        }
    }
    let after: Vec<u64> = [&a, &b, &single].iter().map(|n| count(n)).collect();
    assert_eq!(before, after, "drivers were removed by client calls");
    let (status, m, _) = get(http, &format!("{}/v1/matches/sneaky", a.base));
    assert_eq!(status, 404, "a client reserved a driver of its choice: {m}");

    // Peer headers copied by a client change nothing: a position in b's
    // regions sent to a with `x-hexmatch-forwarded` is still forwarded,
    // and `x-hexmatch-scope: local` still gets the whole cluster's answer.
    let in_b = position_in(&map, &own[&1], None, 0.0);
    let (status, body, by) = send(
        http.put(format!("{}/v1/drivers/fwd", a.base))
            .header("x-hexmatch-forwarded", "1")
            .json(&json!({"lat": in_b.lat(), "lon": in_b.lon()})),
    );
    assert_eq!((status, by.as_str()), (200, "b"), "{body}");
    let (status, near, _) = send(
        http.get(format!(
            "{}/v1/drivers/nearest?lat={}&lon={}&k=1",
            b.base,
            far.lat(),
            far.lon()
        ))
        .header("x-hexmatch-scope", "local"),
    );
    assert_eq!(status, 200, "{near}");
    assert_eq!(near["drivers"][0]["driver_id"], far_id.as_str(), "{near}");
}

/// A handoff that fails leaves no second copy: while the node holding a
/// driver does not answer (paused, its lease still live), the node the
/// driver moved to refuses the update with `unavailable`, counts it, and
/// holds no copy; once the holder answers again, the same update hands
/// the driver over.
#[test]
fn a_failed_handoff_refuses_the_update_and_leaves_one_copy() {
    // Leases outlive the peer timeout (5 s), so the paused node still owns
    // its regions when the handoff gives up.
    let TwoNodes {
        _redis,
        own,
        mut a,
        b,
        ..
    } = two_nodes("handoff-fail", 20_000, &[]);
    let http = &http();
    let map = region_map();
    let old = position_in(&map, &own[&0], None, 0.0);
    let new = position_in(&map, &own[&1], Some(old), 3000.0);
    let put = |p: Position, ts: i64| {
        send(
            http.put(format!("{}/v1/drivers/mover", b.base))
                .json(&json!({"lat": p.lat(), "lon": p.lon(), "ts": ts})),
        )
    };
    let (status, body, by) = put(old, 1_000);
    assert_eq!((status, by.as_str()), (200, "a"), "{body}");

    a.signal("STOP");
    let (status, body, _) = put(new, 2_000);
    a.signal("CONT");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    // b holds no copy; a still has the driver where it was.
    // Drivers in b's regions, as b counts them.
    let in_b = || {
        let (_, regions, _) = get(http, &format!("{}/v1/regions", b.base));
        regions
            .as_array()
            .expect("regions")
            .iter()
            .filter(|r| r["owner"] == "b")
            .filter_map(|r| r["drivers"].as_u64())
            .sum::<u64>()
    };
    assert_eq!(in_b(), 0, "b took a copy of a driver a still offers");
    let (status, d, by) = get(http, &format!("{}/v1/drivers/mover", a.base));
    assert_eq!((status, by.as_str()), (200, "a"), "{d}");
    assert_eq!(d["lat"].as_f64(), Some(old.lat()), "{d}");
    let metrics = http
        .get(format!("{}/metrics", b.base))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    let failures: f64 = metrics
        .lines()
        .find(|l| l.starts_with("hexmatch_handoff_failures_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "no handoff failure counted:\n{metrics}");

    // The holder answers again: the same update now hands the driver over.
    let (status, body, by) = put(new, 2_000);
    assert_eq!((status, by.as_str()), (200, "b"), "{body}");
    assert_eq!(in_b(), 1);
    let (status, d, _) = get(http, &format!("{}/v1/drivers/mover", a.base));
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["lat"].as_f64(), Some(new.lat()), "{d}");
}

/// A driver claimed on its node while that node is handing it over to the
/// owner of the region it entered: the handoff journals the departure
/// first, and a claim can reserve the driver in that moment. The claim is
/// acknowledged, so the driver stays with its match: it is not removed
/// (which ended the match in memory and left its record live), and the
/// asker sends the update to the match's node instead of offering a copy.
#[test]
fn a_driver_claimed_while_it_is_handed_over_stays_with_its_match() {
    // A private Redis: its writes are paused below.
    let redis = RedisServer::start();
    let prefix = unique_prefix("handoff-claim");
    let own = spread(&region_ids(), 2);
    let a = start_args(&redis.url, &prefix, "a", &own[&0], false, 20_000, &[]);
    let b = start_args(&redis.url, &prefix, "b", &own[&1], false, 20_000, &[]);
    let http = &http();
    wait_settled(http, &[&a, &b], &own);
    let map = region_map();
    let old = position_in(&map, &own[&0], None, 0.0);
    let new = position_in(&map, &own[&1], Some(old), 3000.0);
    let (status, body, by) = send(
        http.put(format!("{}/v1/drivers/mover", a.base))
            .json(&json!({"lat": old.lat(), "lon": old.lon(), "ts": 1_000})),
    );
    assert_eq!((status, by.as_str()), (200, "a"), "{body}");

    // Writes wait for a second: the handoff stops at its departure, and
    // the claim reserves the driver meanwhile, then waits at its record.
    let mut conn = RedisServer::conn(&redis.url);
    let (moved, claimed) = std::thread::scope(|s| {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1000)
            .arg("WRITE")
            .query(&mut conn)
            .expect("client pause");
        let moved = s.spawn(|| {
            send(
                http.post(format!("{}/v1/drivers/mover/location", b.base))
                    .json(&json!({"lat": new.lat(), "lon": new.lon(), "ts": 2_000})),
            )
        });
        std::thread::sleep(Duration::from_millis(300));
        let claimed = post(
            http,
            &format!("{}/v1/matches", a.base),
            &json!({"order_id": "o-held", "pickup": {"lat": old.lat(), "lon": old.lon()}, "radius_m": 500}),
        );
        (moved.join().expect("the move"), claimed)
    });
    let (status, m, _) = claimed;
    assert_eq!(
        (status, m["driver_id"].as_str()),
        (201, Some("mover")),
        "{m}"
    );
    // The move applied where the driver is held, or was refused; either
    // way the acknowledged match holds the driver.
    assert!([200, 503].contains(&moved.0), "{:?}", moved.1);
    for n in [&a, &b] {
        let (status, m, _) = get(http, &format!("{}/v1/matches/o-held", n.base));
        assert_eq!(
            (status, m["state"].as_str(), m["driver_id"].as_str()),
            (200, Some("reserved"), Some("mover")),
            "{m}"
        );
    }
    // No copy of the driver is offered anywhere else.
    for p in [new, old] {
        let (status, m, _) = post(
            http,
            &format!("{}/v1/matches", b.base),
            &json!({"order_id": format!("o-{}", p.lat()), "pickup": {"lat": p.lat(), "lon": p.lon()}, "radius_m": 500}),
        );
        assert_eq!(
            (status, m["error"]["code"].as_str()),
            (409, Some("no_driver_available")),
            "{m}"
        );
    }
}

/// Where a test's driver `mover` goes after its claim: `away`, 3 km from
/// where it was claimed, in another region (`away_region`).
struct Trip {
    away: Position,
    away_region: String,
}

/// Puts driver `mover` at a trip's `home` in `regions` through `node`, and
/// claims it there for `order` (201).
fn mover_claimed(
    http: &reqwest::blocking::Client,
    node: &Node,
    regions: &[String],
    order: &str,
) -> Trip {
    let map = region_map();
    let home = position_in(&map, regions, None, 0.0);
    let home_region = map.region_of(home).expect("a region").to_string();
    let others: Vec<String> = regions
        .iter()
        .filter(|r| **r != home_region)
        .cloned()
        .collect();
    let away = position_in(&map, &others, Some(home), 3000.0);
    let away_region = map.region_of(away).expect("a region").to_string();
    let (status, body, _) = send(
        http.put(format!("{}/v1/drivers/mover", node.base))
            .json(&json!({"lat": home.lat(), "lon": home.lon(), "ts": 1_000})),
    );
    assert_eq!(status, 200, "{body}");
    let (status, m, _) = post(
        http,
        &format!("{}/v1/matches", node.base),
        &json!({"order_id": order, "pickup": {"lat": home.lat(), "lon": home.lon()}, "radius_m": 500}),
    );
    assert_eq!(
        (status, m["driver_id"].as_str()),
        (201, Some("mover")),
        "{m}"
    );
    Trip { away, away_region }
}

/// A node that loses one region's lease drops the drivers in that region,
/// but not a driver that is there while held by a match whose record is
/// in a region the node still serves: that match is still this node's to
/// answer for, and forgetting it lost an acknowledged reservation.
#[test]
fn a_lost_region_keeps_the_drivers_of_matches_held_elsewhere() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("lost-region");
    let regions = region_ids();
    let a = start(&url, &prefix, "a", &regions);
    let http = &http();
    let own: HashMap<usize, Vec<String>> = [(0, regions.clone())].into_iter().collect();
    wait_settled(http, &[&a], &own);
    let Trip { away, away_region } = mover_claimed(http, &a, &regions, "o-away");
    // On its way, the driver enters another region of the same node.
    let (status, body, _) = send(
        http.post(format!("{}/v1/drivers/mover/location", a.base))
            .json(&json!({"lat": away.lat(), "lon": away.lon(), "ts": 2_000})),
    );
    assert_eq!(status, 200, "{body}");

    // That region's lease lapses (as when its Redis master dies); the node
    // notices at its next renewal, and takes the region back.
    let epoch = |region: &str| {
        let (_, c, _) = get(http, &format!("{}/v1/cluster", a.base));
        c["leases"]
            .as_array()?
            .iter()
            .find(|l| l["region"] == region)?["epoch"]
            .as_u64()
    };
    let before = epoch(&away_region).expect("a serves the region");
    let mut conn = RedisServer::conn(&url);
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:{{region:{away_region}}}:lease"))
        .query(&mut conn)
        .expect("del");
    poll(20, "the region taken back", || {
        epoch(&away_region).filter(|e| *e > before)
    });

    let (status, m, _) = get(http, &format!("{}/v1/matches/o-away", a.base));
    assert_eq!(
        (status, m["state"].as_str(), m["driver_id"].as_str()),
        (200, Some("reserved"), Some("mover")),
        "{m}"
    );
    let (status, d, _) = get(http, &format!("{}/v1/drivers/mover", a.base));
    assert_eq!(
        (status, d["order_id"].as_str(), d["lat"].as_f64()),
        (200, Some("o-away"), Some(away.lat())),
        "{d}"
    );
    let (status, m, _) = post(
        http,
        &format!("{}/v1/matches/o-away/confirm", a.base),
        &json!({}),
    );
    assert_eq!(
        (status, m["state"].as_str()),
        (200, Some("confirmed")),
        "{m}"
    );
}

/// A lease Redis granted this node without the answer reaching it (the
/// acquire timed out after Redis ran it, or the node restarted under the
/// same id) names the node until it lapses. The node takes it at its next
/// tick, under a new epoch, instead of leaving the region unserved for a
/// whole lease; a lease naming another node stays that node's.
#[test]
fn a_lease_naming_this_node_that_it_does_not_hold_is_taken_at_once() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("orphan-lease");
    let regions = region_ids();
    let (mine, theirs) = (regions[0].clone(), regions[1].clone());
    let key = |region: &str, what: &str| format!("{prefix}:{{region:{region}}}:{what}");
    let mut conn = RedisServer::conn(&url);
    for (region, node) in [(&mine, "a"), (&theirs, "b")] {
        let _: () = redis::cmd("SET")
            .arg(key(region, "epoch"))
            .arg(7)
            .query(&mut conn)
            .expect("set epoch");
        let _: () = redis::cmd("SET")
            .arg(key(region, "lease"))
            .arg(format!("{node}|7"))
            .arg("PX")
            .arg(120_000)
            .query(&mut conn)
            .expect("set lease");
    }
    let a = start(&url, &prefix, "a", &regions[..2]);
    let http = &http();
    // A few ticks (a third of the lease each), not the lease's 120 s.
    poll(10, "the lease naming a taken", || {
        serving(http, &a).contains(&mine).then_some(())
    });
    let (_, c, _) = get(http, &format!("{}/v1/cluster", a.base));
    let epoch = c["leases"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["region"] == mine.as_str()))
        .and_then(|l| l["epoch"].as_u64());
    assert!(epoch.is_some_and(|e| e > 7), "{c}");
    assert!(!serving(http, &a).contains(&theirs), "{c}");
    let lease: String = redis::cmd("GET")
        .arg(key(&theirs, "lease"))
        .query(&mut conn)
        .expect("get lease");
    assert_eq!(lease, "b|7");
}

/// A driver confirmed (busy) in a match of one node, standing in another
/// region of that node which a second node then takes over, stays with
/// its match: the taker does not restore a busy copy of it. A copy took
/// the driver's updates, and a client's `available` for it there offered
/// the driver to a second order while the first was still confirmed.
#[test]
fn a_taker_keeps_no_copy_of_a_driver_busy_in_a_match_held_elsewhere() {
    let (_redis, url) = RedisServer::from_env_or_start();
    let prefix = unique_prefix("busy-copy");
    let regions = region_ids();
    let a = start(&url, &prefix, "a", &regions);
    let b = start(&url, &prefix, "b", &[]);
    let http = &http();
    let own: HashMap<usize, Vec<String>> = [(0, regions.clone()), (1, Vec::new())]
        .into_iter()
        .collect();
    wait_settled(http, &[&a, &b], &own);
    let Trip { away, away_region } = mover_claimed(http, &a, &regions, "o-busy");
    let (status, m, _) = post(
        http,
        &format!("{}/v1/matches/o-busy/confirm", a.base),
        &json!({}),
    );
    assert_eq!(
        (status, m["state"].as_str()),
        (200, Some("confirmed")),
        "{m}"
    );
    // On the trip, the driver enters another region of a (journalled
    // there, busy), and a snapshot of that region follows.
    let (status, body, _) = send(
        http.post(format!("{}/v1/drivers/mover/location", a.base))
            .json(&json!({"lat": away.lat(), "lon": away.lon(), "ts": 2_000})),
    );
    assert_eq!(status, 200, "{body}");
    std::thread::sleep(Duration::from_millis(700));

    // That region's lease goes to b (as when a's renewal is lost and b
    // takes it; a lease naming b that b does not hold is taken at once).
    let mut conn = RedisServer::conn(&url);
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:{{region:{away_region}}}:lease"))
        .arg("b|1")
        .arg("PX")
        .arg(60_000)
        .query(&mut conn)
        .expect("set lease");
    poll(20, "b serving the region", || {
        serving(http, &b).contains(&away_region).then_some(())
    });
    poll(20, "a no longer serving it", || {
        (!serving(http, &a).contains(&away_region)).then_some(())
    });

    // b answers for the driver with a's match, not with a copy of its own.
    let (status, d, _) = get(http, &format!("{}/v1/drivers/mover", b.base));
    assert_eq!(
        (status, d["status"].as_str(), d["order_id"].as_str()),
        (200, Some("busy"), Some("o-busy")),
        "{d}"
    );
    // The driver's app says it is free, through b; then an order there.
    let (status, body, _) =
        send(http.put(format!("{}/v1/drivers/mover", b.base)).json(
            &json!({"lat": away.lat(), "lon": away.lon(), "ts": 3_000, "status": "available"}),
        ));
    assert_eq!(status, 200, "{body}");
    let (_, second, _) = post(
        http,
        &format!("{}/v1/matches", b.base),
        &json!({"order_id": "o-next", "pickup": {"lat": away.lat(), "lon": away.lon()}, "radius_m": 300}),
    );
    let (_, first, _) = get(http, &format!("{}/v1/matches/o-busy", a.base));
    let live = |m: &Value| {
        m["driver_id"] == "mover" && matches!(m["state"].as_str(), Some("reserved" | "confirmed"))
    };
    assert!(
        !(live(&first) && live(&second)),
        "mover in two live matches: {first} and {second}"
    );
}

/// Asks each of `nodes` for `order`'s match and asserts that each answers
/// with `driver`; returns the answers.
fn every_node_answers(
    http: &reqwest::blocking::Client,
    nodes: &[&Node],
    order: &str,
    driver: &str,
) -> Vec<Value> {
    nodes
        .iter()
        .map(|node| {
            let (status, m, _) = get(http, &format!("{}/v1/matches/{order}", node.base));
            assert_eq!(
                (status, m["driver_id"].as_str()),
                (200, Some(driver)),
                "{order} via {}: {m}",
                node.base
            );
            m
        })
        .collect()
}

/// Every live match record in Redis, over the hash of every region ever
/// owned (those of the regions file, and `outside-…` regions taken on
/// first use).
fn live_records(
    conn: &mut dyn redis::ConnectionLike,
    prefix: &str,
) -> Vec<(String, hexmatch::DurableMatch)> {
    let mut out = Vec::new();
    let owned: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}:{{cluster}}:owners"))
        .query(conn)
        .expect("owners");
    for region in owned {
        let recs: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
            .arg(format!("{prefix}:{{region:{region}}}:matches"))
            .query(conn)
            .expect("hgetall");
        out.extend(
            recs.into_iter()
                .map(|(o, b)| (o, hexmatch::DurableMatch::decode(&b).expect("record"))),
        );
    }
    out
}

/// One order id claimed at the same moment with two pickups in regions
/// of different nodes makes one match, never two: the order's record is
/// taken atomically before a node acknowledges it, and the twin gets
/// `order_conflict` (or the same match).
#[test]
fn twin_claims_of_one_order_on_two_nodes_make_one_match() {
    let TwoNodes {
        _redis,
        url,
        prefix,
        own,
        a,
        b,
    } = two_nodes("twins", LEASE_TTL_MS, &[]);
    let http = &http();
    let fleet = load(http, &[&a, &b], 2000);
    let map = region_map();
    let in_a = position_in(&map, &own[&0], None, 0.0);
    let in_b = position_in(&map, &own[&1], Some(in_a), 5000.0);
    let mut doubled = Vec::new();
    for i in 0..40 {
        let order = format!("twin-{i}");
        let answers: Vec<(u16, Value, String)> = std::thread::scope(|s| {
            let calls: Vec<_> = [(in_a, &a), (in_b, &b)]
                .into_iter()
                .map(|(p, node)| {
                    let order = order.clone();
                    s.spawn(move || {
                        post(
                            http,
                            &format!("{}/v1/matches", node.base),
                            &json!({"order_id": order, "pickup": {"lat": p.lat(), "lon": p.lon()}, "radius_m": 3000, "hold_ms": 600_000}),
                        )
                    })
                })
                .collect();
            calls
                .into_iter()
                .map(|c| c.join().expect("thread"))
                .collect()
        });
        let drivers: HashSet<String> = answers
            .iter()
            .filter(|(status, _, _)| *status == 201 || *status == 200)
            .map(|(_, m, _)| m["driver_id"].as_str().expect("driver").to_owned())
            .collect();
        for (status, body, _) in &answers {
            assert!([200, 201, 409].contains(status), "{order}: {status} {body}");
        }
        if drivers.len() > 1 {
            doubled.push((order.clone(), drivers.clone()));
        }
        // Either node now answers with the one match (the twin that lost
        // routes to the holder).
        if let Some(driver) = drivers.iter().next() {
            for m in every_node_answers(http, &[&a, &b], &order, driver) {
                assert_eq!(m["state"], "reserved", "{m}");
            }
        }
    }
    assert!(doubled.is_empty(), "orders with two drivers: {doubled:?}");
    // Redis holds at most one live record per order, over both nodes.
    let client = redis::Client::open(url.as_str()).expect("url");
    let mut conn = client.get_connection().expect("redis");
    let mut orders = HashSet::new();
    for (order, _) in live_records(&mut conn, &prefix) {
        assert!(orders.insert(order.clone()), "{order} recorded twice");
    }
    let _ = fleet;
}

const NODE_IDS: [&str; 3] = ["a", "b", "c"];

/// Three nodes (`a`, `b`, `c`, the regions spread over them) on a Redis
/// Cluster of three masters with a replica each, durable writes waiting
/// for one replica, with 3,000 drivers loaded.
struct OnRedisCluster {
    redis: RedisCluster,
    prefix: String,
    own: HashMap<usize, Vec<String>>,
    nodes: Vec<Node>,
    fleet: Fleet,
}

fn three_on_redis_cluster(test: &str) -> OnRedisCluster {
    let redis = RedisCluster::start();
    let url = redis.url();
    let prefix = unique_prefix(test);
    let own = spread(&region_ids(), 3);
    let durable = ["--redis-replicas", "1", "--redis-wait-ms", "1000"];
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            start_args(
                &url,
                &prefix,
                NODE_IDS[i],
                &own[&i],
                false,
                LEASE_TTL_MS,
                &durable,
            )
        })
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_settled(&http(), &refs, &own);
    let fleet = load(&http(), &refs, 3000);
    OnRedisCluster {
        redis,
        prefix,
        own,
        nodes,
        fleet,
    }
}

/// Claims `order` at `p` through `via`: status, driver (on success), and
/// who served it.
fn claim_at(
    http: &reqwest::blocking::Client,
    via: &Node,
    order: &str,
    p: Position,
) -> (u16, Option<String>, Value) {
    let (status, m, _) = post(
        http,
        &format!("{}/v1/matches", via.base),
        &json!({"order_id": order, "pickup": {"lat": p.lat(), "lon": p.lon()}, "radius_m": 5000, "hold_ms": 600_000}),
    );
    let driver = m["driver_id"].as_str().map(str::to_owned);
    (status, driver, m)
}

/// Three nodes on a real Redis Cluster (three masters with a replica
/// each), durable writes waiting for one replica. The Redis master that
/// holds a busy region's lease and match records is killed; its replica
/// takes over. Every match acknowledged before, during and after the
/// failover is in Redis and readable from every node afterwards, with one
/// driver per order and one order per driver; twin claims of one order
/// on two nodes (different slots for the order and the regions) still
/// make one match.
#[test]
#[allow(clippy::too_many_lines)]
fn a_redis_master_s_death_loses_no_acknowledged_match() {
    let OnRedisCluster {
        mut redis,
        prefix,
        own,
        nodes,
        fleet,
    } = three_on_redis_cluster("rc");
    let http = &http();
    let map = region_map();

    // Pickups: the positions of every fifth driver, each claimed once.
    let pickups: Vec<Position> = fleet.iter().step_by(5).map(|(_, p)| *p).collect();
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut next = 0;
    // Claims pickup `n` through node `n % 3`, recording what is acknowledged.
    let claim = |n: usize, tag: &str, acked: &mut Vec<(String, String)>| {
        let order = format!("{tag}-{n}");
        let (status, driver, body) =
            claim_at(http, &nodes[n % 3], &order, pickups[n % pickups.len()]);
        if status == 201 {
            acked.push((order, driver.expect("a driver")));
        }
        (status, body)
    };
    for _ in 0..40 {
        let (status, body) = claim(next, "before", &mut acked);
        next += 1;
        assert!([201, 409].contains(&status), "{status} {body}");
    }
    assert!(acked.len() >= 30, "{}", acked.len());

    // The master holding the busiest region's lease and records dies.
    let busiest = {
        let mut count: HashMap<String, usize> = HashMap::new();
        for (_, p) in &fleet {
            if let Ok(r) = map.region_of(*p) {
                *count.entry(r.to_string()).or_default() += 1;
            }
        }
        count
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .expect("a region")
            .0
    };
    let victim = redis.master_of(&format!("{prefix}:{{region:{busiest}}}:lease"));
    let masters_before = redis.masters().len();
    let killed_at = Instant::now();
    redis.signal(victim, "KILL");
    // Its replica takes over; the dead server comes back empty as the new
    // master's replica. Until then the shard has no replica, and writes
    // that must reach one are refused (503), never acknowledged. Claims go
    // on throughout, in the busiest region too.
    let in_busiest = position_in(&map, std::slice::from_ref(&busiest), None, 0.0);
    let (failover, back_after, refused) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let took = redis.wait_ok(30);
            redis.restart(victim);
            took
        });
        let mut refused = 0;
        let back_after = loop {
            let (status, body) = claim(next, "during", &mut acked);
            next += 1;
            if status != 201 && status != 409 {
                assert_eq!(status, 503, "{body}");
                refused += 1;
            }
            let order = format!("busiest-{next}");
            let (status, driver, body) = claim_at(http, &nodes[next % 3], &order, in_busiest);
            if status == 201 {
                acked.push((order, driver.expect("a driver")));
                break killed_at.elapsed();
            }
            assert!([503, 409].contains(&status), "{status} {body}");
            assert!(
                killed_at.elapsed() < Duration::from_secs(40),
                "the busiest region never came back: {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        (watcher.join().expect("watcher"), back_after, refused)
    });
    assert_eq!(
        redis.masters().len(),
        masters_before,
        "the replica took over"
    );
    redis.wait_ok(30);
    // Regions dropped while their shard had no master come back as their
    // leases lapse and are taken again: a 503 meanwhile is retried.
    for _ in 0..20 {
        let retry_until = Instant::now() + Duration::from_secs(10);
        let (status, body) = loop {
            let (status, body) = claim(next, "after", &mut acked);
            if status != 503 || Instant::now() > retry_until {
                break (status, body);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        next += 1;
        assert!([201, 409].contains(&status), "{status} {body}");
    }

    // Twins: one order at two pickups in regions of different nodes.
    let in_a = position_in(&map, &own[&0], None, 0.0);
    let in_b = position_in(&map, &own[&1], Some(in_a), 5000.0);
    for i in 0..10 {
        let order = format!("twin-{i}");
        let answers: Vec<(u16, Option<String>, Value)> = std::thread::scope(|s| {
            let calls: Vec<_> = [(in_a, &nodes[0]), (in_b, &nodes[1])]
                .into_iter()
                .map(|(p, node)| {
                    let order = order.clone();
                    s.spawn(move || claim_at(http, node, &order, p))
                })
                .collect();
            calls
                .into_iter()
                .map(|c| c.join().expect("thread"))
                .collect()
        });
        let drivers: HashSet<&String> = answers
            .iter()
            .filter(|(status, _, _)| [200, 201].contains(status))
            .filter_map(|(_, d, _)| d.as_ref())
            .collect();
        for (status, _, body) in &answers {
            assert!([200, 201, 409].contains(status), "{order}: {status} {body}");
        }
        assert_eq!(drivers.len(), 1, "{order}: {answers:?}");
        acked.push((order, (*drivers.iter().next().expect("one")).clone()));
    }

    // Every acknowledged match is in Redis and readable from every node.
    let mut conn = redis.conn();
    let records: HashMap<String, hexmatch::DurableMatch> =
        live_records(&mut conn, &prefix).into_iter().collect();
    let mut by_driver: HashMap<String, String> = HashMap::new();
    for (order, rec) in &records {
        let driver = rec.m.driver_id.to_string();
        assert!(
            by_driver.insert(driver.clone(), order.clone()).is_none(),
            "{driver} is in two live matches"
        );
    }
    for (order, driver) in &acked {
        let rec = records.get(order).unwrap_or_else(|| {
            let holder: Option<String> = redis::cmd("GET")
                .arg(format!("{prefix}:{{order:{order}}}"))
                .query(&mut conn)
                .expect("get");
            let (_, m, _) = get(http, &format!("{}/v1/matches/{order}", nodes[0].base));
            panic!("acknowledged match {order} lost: order record {holder:?}, {m}")
        });
        assert_eq!(rec.m.driver_id.as_str(), driver, "{order}");
        every_node_answers(http, &nodes.iter().collect::<Vec<_>>(), order, driver);
    }
    eprintln!(
        "redis master killed: {} matches acknowledged, none lost; {refused} claims refused \
         meanwhile; the busiest region served again after {back_after:?}; the Redis Cluster \
         was whole again after {failover:?}",
        acked.len()
    );
}

/// `WAIT` is what makes an acknowledgment durable: with the replica of
/// the master holding a single node's records paused, a claim is refused
/// (503) instead of acknowledged. Its driver stays held for the order (the
/// master may have the record: freeing the driver would let a second
/// order take it while that record lives). The master then dies and the
/// paused replica takes over: every match that was acknowledged is
/// restored on restart, and no driver is in two matches.
#[test]
fn a_write_the_replica_did_not_take_is_never_acknowledged() {
    let mut redis = RedisCluster::start();
    let prefix = unique_prefix("rc-wait");
    let seed = redis.seed();
    let args = |load: bool| {
        let mut v = vec![
            "--api-tokens".to_owned(),
            TOKEN.to_owned(),
            "--redis-url".to_owned(),
            seed.clone(),
            "--redis-prefix".to_owned(),
            prefix.clone(),
            "--redis-replicas".to_owned(),
            "1".to_owned(),
            "--redis-wait-ms".to_owned(),
            "300".to_owned(),
            "--snapshot-interval-ms".to_owned(),
            "200".to_owned(),
            "--driver-ttl-s".to_owned(),
            "0".to_owned(),
            "--ingest-stream".to_owned(),
            "false".to_owned(),
        ];
        if load {
            v.extend(["--load-drivers".to_owned(), TRIPS.to_owned()]);
        }
        v
    };
    let spawn = |load: bool| {
        let a = args(load);
        Node::spawn(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let mut node = spawn(true);
    let http = &http();
    let p = position_in(&region_map(), &region_ids(), None, 0.0);
    let mut acked = Vec::new();
    for i in 0..5 {
        let order = format!("kept-{i}");
        // A replica slow to answer (other tests share the cores) makes a
        // 503 whose claim stays held; the client's retry acknowledges it.
        let (status, driver, body) = poll(10, "the claim acknowledged", || {
            let (status, driver, body) = claim_at(http, &node, &order, p);
            (status != 503).then_some((status, driver, body))
        });
        assert!([200, 201].contains(&status), "{body}");
        acked.push((order, driver.expect("driver")));
    }
    let master = redis.master_of(&format!("{prefix}:{{ns:default}}:matches"));
    let replica = redis.replica_of(master);
    redis.signal(replica, "STOP");
    let (status, _, body) = claim_at(http, &node, "refused", p);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    // The refused claim's outcome is unknown: its driver stays held for it.
    let (status, m, _) = get(http, &format!("{}/v1/matches/refused", node.base));
    assert_eq!(
        (status, m["state"].as_str()),
        (200, Some("reserved")),
        "{m}"
    );
    let held = m["driver_id"].as_str().expect("driver").to_owned();
    assert!(
        acked.iter().all(|(_, d)| *d != held),
        "{held} double-booked"
    );
    // The client's retry finds the match made, but it is not acknowledged
    // until its record is written: still 503 while the replica is paused.
    let (status, _, body) = claim_at(http, &node, "refused", p);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "a repeat acknowledged without its record: {body}"
    );
    // The master dies with the write only it had; the replica takes over.
    redis.signal(master, "KILL");
    redis.signal(replica, "CONT");
    redis.wait_ok(30);
    node.signal("KILL");
    let node = spawn(false);
    for (order, driver) in &acked {
        let (status, m, _) = get(http, &format!("{}/v1/matches/{order}", node.base));
        assert_eq!(
            (status, m["driver_id"].as_str()),
            (200, Some(driver.as_str())),
            "acknowledged {order}: {m}"
        );
    }
    // The refused claim's record may have reached the replica after all
    // (it was in flight when the replica paused): then its driver is held
    // until the reservation lapses, never given to a second order.
    let (status, m, _) = get(http, &format!("{}/v1/matches/refused", node.base));
    if status == 200 {
        let held = m["driver_id"].as_str().expect("driver");
        assert!(
            acked.iter().all(|(_, d)| d != held),
            "{held} double-booked: {m}"
        );
    }
}

/// A claim forwarded to an owner paused past its lease is not held for
/// the pause: the call times out within the lease TTL, and the claim goes
/// to the node that took the region over, within twice the TTL plus a
/// second (5 s peer timeouts used to hold it for the whole pause).
#[test]
fn a_claim_forwarded_to_a_paused_owner_goes_to_the_new_owner() {
    let OwnerAndStandby {
        _redis,
        mut a,
        b,
        fleet,
        ..
    } = owner_and_standby("paused-owner");
    let http = &http();

    a.signal("STOP");
    let p = fleet[0].1;
    let sent = Instant::now();
    let (status, m, by) = post(
        http,
        &format!("{}/v1/matches", b.base),
        &json!({"order_id": "through-b", "pickup": {"lat": p.lat(), "lon": p.lon()}, "hold_ms": 600_000}),
    );
    let waited = sent.elapsed();
    a.signal("CONT");
    assert_eq!((status, by.as_str()), (201, "b"), "{m}");
    let bound = Duration::from_millis(2 * LEASE_TTL_MS + 1000);
    assert!(
        waited <= bound,
        "the client waited {waited:?} (bound {bound:?})"
    );
    eprintln!("a claim through a paused owner was served by its successor after {waited:?}");
}

/// One client operation as the fault test records it.
#[derive(Debug, Clone)]
struct Op {
    /// When it was answered, since the test began.
    at: Duration,
    kind: &'static str,
    order: String,
    /// The driver the answer named.
    driver: Option<String>,
    /// HTTP status; 0 when no answer came (the outcome is unknown).
    status: u16,
}

/// A node's `GET /v1/cluster` at one moment: the leases it serves under.
#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    node: String,
    leases: Vec<(String, u64)>,
}

/// A small deterministic generator (xorshift64*), so a failing history
/// can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// The longest stretch in which no node served a region, after one kind
/// of fault: how long, which region, from when, and the last node that
/// served it before (for the failure message).
#[derive(Debug, Clone, Default)]
struct Gap {
    len: Duration,
    region: String,
    from: Duration,
    last_server: Option<String>,
}

/// What each fault did to the regions: the longest stretch in which no
/// node served a region, from the samples, per fault that preceded it.
fn unavailability(
    samples: &[Sample],
    regions: &[String],
    faults: &[(Duration, &'static str)],
    end: Duration,
) -> HashMap<&'static str, Gap> {
    let mut served: HashMap<&str, Vec<(Duration, &str)>> = HashMap::new();
    for s in samples {
        for (r, _) in &s.leases {
            served
                .entry(r.as_str())
                .or_default()
                .push((s.at, s.node.as_str()));
        }
    }
    let mut worst: HashMap<&'static str, Gap> = HashMap::new();
    let start = faults.first().map_or(Duration::ZERO, |f| f.0);
    for r in regions {
        let mut times = served.remove(r.as_str()).unwrap_or_default();
        times.retain(|(t, _)| *t >= start);
        times.sort();
        times.push((end, ""));
        let (mut last, mut by) = (start, None);
        for (t, node) in times {
            let gap = t.saturating_sub(last);
            // Charge the gap to the last fault injected before it began.
            if let Some((_, kind)) = faults
                .iter()
                .rev()
                .find(|(at, _)| *at <= last + Duration::from_millis(150))
            {
                let w = worst.entry(kind).or_default();
                if gap > w.len {
                    *w = Gap {
                        len: gap,
                        region: r.clone(),
                        from: last,
                        last_server: by.map(str::to_owned),
                    };
                }
            }
            (last, by) = (t, Some(node));
        }
    }
    worst
}

/// Jepsen-style, in short: three nodes on a Redis Cluster (three masters
/// with a replica each, `--redis-replicas 1`), client tokens and the
/// cluster secret on. Clients claim (some orders sent at once through two
/// nodes with two pickups), confirm, release, complete and move drivers
/// across region borders while a nemesis kills a Redis master (its
/// replica takes over; the master comes back as a replica), pauses a
/// node past its lease and resumes it, and kills a node. The checker then
/// asserts over the recorded history: no order answered with two drivers,
/// no driver in two live matches and no order live in two regions' records,
/// no acknowledged match lost, never two
/// nodes serving one region under one epoch nor an older epoch after a
/// newer one, and each region's unavailability within the lease TTL, the
/// longest restore and a second (plus, for a Redis master, the failover
/// Redis took). `HEXMATCH_FAULT_SECS` sets the length (default 20 s);
/// `benches/scripts/fault_injection.sh` runs it longer.
#[test]
#[allow(clippy::too_many_lines)]
fn faults_never_double_book_and_lose_nothing_acknowledged() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    let secs: u64 = std::env::var("HEXMATCH_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let OnRedisCluster {
        mut redis,
        prefix,
        own,
        mut nodes,
        fleet,
    } = three_on_redis_cluster("faults");
    let regions = region_ids();
    let ids = NODE_IDS;
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let http = &http();
    std::thread::sleep(Duration::from_millis(800)); // a snapshot of every region

    let began = Instant::now();
    let stop = AtomicBool::new(false);
    let history: Mutex<Vec<Op>> = Mutex::new(Vec::new());
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let short = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .default_headers(
            [(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {TOKEN}").parse().expect("header"),
            )]
            .into_iter()
            .collect(),
        )
        .build()
        .expect("client");
    let mut faults: Vec<(Duration, &'static str)> = Vec::new();
    // Node faults: what, which node, how many regions it served then.
    let mut hit: Vec<(&str, &str, usize)> = Vec::new();
    // How long Redis took to fail over, each time a master was killed.
    let mut failovers: Vec<Duration> = Vec::new();
    // Each node's restore time so far (summed over its takeovers: an
    // upper bound of its longest), read before it is killed and at the end.
    let mut restored: HashMap<&str, f64> = HashMap::new();
    let restore_sum = |node: &Node| metric(http, node, "hexmatch_takeover_restore_seconds_sum");
    let end = std::thread::scope(|s| {
        // Clients.
        for c in 0..3u64 {
            let (stop, history, fleet, bases) = (&stop, &history, &fleet, &bases);
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c + 1));
                let mut mine: Vec<(String, &'static str)> = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let via = &bases[rng.below(3)];
                    let roll = rng.below(100);
                    let claim = |order: &str, via: &str, p: Position| {
                        let body = json!({"order_id": order, "pickup": {"lat": p.lat(), "lon": p.lon()}, "radius_m": 4000, "hold_ms": 600_000});
                        http.post(format!("{via}/v1/matches")).json(&body)
                    };
                    let (kind, order, rbs) = if roll < 5 {
                        // Twins: one new order sent at the same moment
                        // through two nodes, with two pickups.
                        n += 1;
                        let order = format!("c{c}-{n}");
                        let (p, q) = (fleet[rng.below(fleet.len())].1, fleet[rng.below(fleet.len())].1);
                        let twin = claim(&order, &bases[rng.below(3)], q);
                        let first = claim(&order, via, p);
                        ("claim", order, vec![first, twin])
                    } else if roll < 45 || mine.is_empty() {
                        n += 1;
                        let order = format!("c{c}-{n}");
                        let p = fleet[rng.below(fleet.len())].1;
                        let first = claim(&order, via, p);
                        ("claim", order, vec![first])
                    } else if roll < 85 {
                        let (order, state) = mine[rng.below(mine.len())].clone();
                        let kind = match (state, rng.below(3)) {
                            ("reserved", 0) => "confirm",
                            ("confirmed", _) => "complete",
                            _ => "release",
                        };
                        let path = format!("{via}/v1/matches/{order}/{kind}");
                        (kind, order, vec![http.post(path).json(&json!({}))])
                    } else {
                        // Any driver, on duty, in a match or not, moves to
                        // any position: often into another node's region.
                        let (id, _) = &fleet[rng.below(fleet.len())];
                        let p = fleet[rng.below(fleet.len())].1;
                        let body = json!({"lat": p.lat(), "lon": p.lon()});
                        ("move", id.clone(), vec![http.post(format!("{via}/v1/drivers/{id}/location")).json(&body)])
                    };
                    let send = |rb: reqwest::blocking::RequestBuilder| match rb.send() {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            (status, r.json::<Value>().unwrap_or(Value::Null))
                        }
                        Err(_) => (0, Value::Null),
                    };
                    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
                        let sent: Vec<_> = rbs.into_iter().map(|rb| s.spawn(move || send(rb))).collect();
                        sent.into_iter().map(|h| h.join().expect("a request")).collect()
                    });
                    for (status, body) in answers {
                        let driver = body["driver_id"].as_str().map(str::to_owned);
                        if kind != "move" && [200, 201].contains(&status) {
                            let state = match body["state"].as_str() {
                                Some("reserved") => "reserved",
                                Some("confirmed") => "confirmed",
                                _ => "ended",
                            };
                            mine.retain(|(o, _)| *o != order);
                            if state != "ended" {
                                mine.push((order.clone(), state));
                            }
                        }
                        history.lock().expect("history").push(Op {
                            at: began.elapsed(),
                            kind,
                            order: order.clone(),
                            driver,
                            status,
                        });
                    }
                }
            });
        }
        // The samplers, one per node: a paused node must not delay the
        // samples of the others.
        for (i, base) in bases.iter().enumerate() {
            let (stop, samples, short) = (&stop, &samples, &short);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let answer = short
                        .get(format!("{base}/v1/cluster"))
                        .send()
                        .and_then(reqwest::blocking::Response::json::<Value>);
                    if let Ok(c) = answer {
                        let leases = c["leases"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .map(|l| {
                                        let r = l["region"].as_str().unwrap_or("").to_owned();
                                        (r, l["epoch"].as_u64().unwrap_or(0))
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        samples.lock().expect("samples").push(Sample {
                            at: began.elapsed(),
                            node: ids[i].to_owned(),
                            leases,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        // The nemesis. A node fault hits the node serving the most regions
        // in the latest samples.
        let busiest_node = || {
            let samples = samples.lock().expect("samples");
            (0..3)
                .map(|i| {
                    let held = samples
                        .iter()
                        .rev()
                        .find(|s| s.node == ids[i])
                        .map_or(0, |s| s.leases.len());
                    (held, i)
                })
                .max()
                .expect("three nodes")
        };
        let step = Duration::from_secs(secs) / 5;
        let mut rounds = 0;
        while began.elapsed() + step * 2 <= Duration::from_secs(secs) || rounds == 0 {
            std::thread::sleep(step);
            let busiest = &own[&0][rounds % own[&0].len()];
            let victim = redis.master_of(&format!("{prefix}:{{region:{busiest}}}:lease"));
            faults.push((began.elapsed(), "redis master killed"));
            redis.signal(victim, "KILL");
            failovers.push(redis.wait_ok(30));
            redis.restart(victim);
            redis.wait_ok(30);
            std::thread::sleep(step);
            let (held, victim) = busiest_node();
            faults.push((began.elapsed(), "node paused past its lease"));
            hit.push(("node paused past its lease", ids[victim], held));
            nodes[victim].signal("STOP");
            std::thread::sleep(Duration::from_millis(2 * LEASE_TTL_MS));
            nodes[victim].signal("CONT");
            rounds += 1;
        }
        std::thread::sleep(step / 2);
        let (held, victim) = busiest_node();
        faults.push((began.elapsed(), "node killed"));
        hit.push(("node killed", ids[victim], held));
        restored.insert(ids[victim], restore_sum(&nodes[victim]));
        nodes[victim].signal("KILL");
        std::thread::sleep(step.max(Duration::from_secs(4)));
        // The end of the observed window: the samplers stop now. Joining
        // the clients can take seconds more (a request in flight runs to
        // its timeout), and counting those seconds as a region unserved
        // after its last sample failed runs that had no such gap.
        let end = began.elapsed();
        stop.store(true, Ordering::Relaxed);
        end
    });
    let history = history.into_inner().expect("history");
    let samples = samples.into_inner().expect("samples");

    // The node killed is gone: the reads below go to a survivor.
    let survivor = bases
        .iter()
        .zip(ids)
        .find(|(_, id)| {
            !hit.iter()
                .any(|(kind, n, _)| *kind == "node killed" && n == id)
        })
        .map(|(b, _)| b.clone())
        .expect("a survivor");

    // 1. No order answered with two drivers.
    let mut claimed: HashMap<&str, &str> = HashMap::new();
    for op in history
        .iter()
        .filter(|o| o.kind == "claim" && [200, 201].contains(&o.status))
    {
        let d = op.driver.as_deref().expect("a driver");
        let first = claimed.entry(op.order.as_str()).or_insert(d);
        assert_eq!(*first, d, "order {} answered with two drivers", op.order);
    }
    // 2. No acknowledged match lost: an order whose last acknowledged
    // operation left it live, with no later operation of unknown outcome,
    // is live on the survivors with the same driver.
    let mut last: HashMap<&str, &Op> = HashMap::new();
    let mut unknown: HashSet<&str> = HashSet::new();
    for op in history.iter().filter(|o| o.kind != "move") {
        if op.status == 0 || op.status >= 500 {
            unknown.insert(op.order.as_str());
        } else if [200, 201].contains(&op.status) {
            last.insert(op.order.as_str(), op);
        }
    }
    let mut live_drivers: HashMap<String, String> = HashMap::new();
    let mut checked = 0;
    for (order, op) in &last {
        if unknown.contains(order) || !["claim", "confirm"].contains(&op.kind) {
            continue;
        }
        // The final reads come after the faults healed; a 503 while the
        // last takeover settles is retried, an answer is final.
        let read = || get(http, &format!("{survivor}/v1/matches/{order}"));
        let (mut status, mut m, _) = read();
        let deadline = Instant::now() + Duration::from_secs(10);
        while status == 503 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            (status, m, _) = read();
        }
        let driver = claimed[order];
        if status == 404 {
            let mut conn = redis.conn();
            let holder: Option<String> = redis::cmd("GET")
                .arg(format!("{prefix}:{{order:{order}}}"))
                .query(&mut conn)
                .expect("get");
            let rec = live_records(&mut conn, &prefix)
                .into_iter()
                .find(|(o, _)| o == order);
            let via_b = bases
                .iter()
                .map(|b| {
                    short
                        .get(format!("{b}/v1/matches/{order}"))
                        .send()
                        .map_or_else(|e| e.to_string(), |r| r.text().unwrap_or_default())
                })
                .collect::<Vec<_>>();
            let ops: Vec<_> = history.iter().filter(|o| o.order == *order).collect();
            eprintln!(
                "{order} is unknown to the nodes; its order record: {holder:?}; its match \
                 record: {rec:?}; the nodes say {via_b:?}; its operations: {ops:?}"
            );
        }
        assert_eq!(
            (status, m["driver_id"].as_str()),
            (200, Some(driver)),
            "match {order}, acknowledged ({}) at {:?}, lost: {m}",
            op.kind,
            op.at
        );
        let want = if op.kind == "claim" {
            "reserved"
        } else {
            "confirmed"
        };
        let ops: Vec<&Op> = history.iter().filter(|o| o.order == *order).collect();
        assert_eq!(m["state"], want, "{order}: {m}; its operations: {ops:?}");
        checked += 1;
    }
    // 3. No driver in two live matches and no order live in two regions,
    // over every region's records.
    let mut conn = redis.conn();
    let mut live_orders: HashSet<String> = HashSet::new();
    for (order, rec) in live_records(&mut conn, &prefix) {
        assert!(
            live_orders.insert(order.clone()),
            "order {order} live in two regions' records"
        );
        if let Some(other) = live_drivers.insert(rec.m.driver_id.to_string(), order.clone()) {
            panic!(
                "driver {} in two live matches: {order} and {other}",
                rec.m.driver_id
            );
        }
    }
    // 4. One node per region and epoch, and never an older epoch served
    // after a newer one (allowing for the sampler's 100 ms rounds).
    let mut holder: HashMap<(&str, u64), &str> = HashMap::new();
    let mut newest: HashMap<&str, (u64, Duration)> = HashMap::new();
    let mut by_time: Vec<&Sample> = samples.iter().collect();
    by_time.sort_by_key(|s| s.at);
    for s in &by_time {
        for (r, e) in &s.leases {
            let h = holder.entry((r.as_str(), *e)).or_insert(s.node.as_str());
            assert_eq!(*h, s.node, "{r} epoch {e} served by {h} and {}", s.node);
            let (top, since) = newest.entry(r.as_str()).or_insert((*e, s.at));
            if *e > *top {
                (*top, *since) = (*e, s.at);
            }
            assert!(
                *e == *top || s.at <= *since + Duration::from_millis(250),
                "{r}: epoch {e} served by {} at {:?}, after epoch {top} at {since:?}",
                s.node,
                s.at
            );
        }
    }
    // 5. Unavailability per fault.
    let worst = unavailability(&samples, &regions, &faults, end);
    let ops = history.len();
    let acked = history
        .iter()
        .filter(|o| [200, 201].contains(&o.status))
        .count();
    for (i, node) in nodes.iter().enumerate() {
        restored.entry(ids[i]).or_insert_with(|| restore_sum(node));
    }
    let restore = Duration::from_secs_f64(restored.values().copied().fold(0.0, f64::max));
    let failover = failovers.iter().copied().max().unwrap_or_default();
    let longest: HashMap<&str, Duration> = worst.iter().map(|(k, g)| (*k, g.len)).collect();
    eprintln!(
        "fault injection: {ops} operations ({acked} acknowledged, {checked} live matches checked), \
         {} faults (node faults: {hit:?}, as (fault, node, regions it served)); longest \
         unavailability per fault: {longest:?}; longest restore at most {restore:?}; Redis \
         failovers {failovers:?}",
        faults.len()
    );
    let ttl = Duration::from_millis(LEASE_TTL_MS);
    for (kind, gap) in &worst {
        // The lease lapses (its owner went silent just after renewing it),
        // the regions are restored, and a second for the rest; a Redis
        // master's death adds the failover, during which no lease in its
        // slots can be renewed or taken.
        let bound = match *kind {
            "redis master killed" => failover + ttl + restore + Duration::from_secs(1),
            _ => ttl + restore + Duration::from_secs(1),
        };
        assert!(
            gap.len <= bound,
            "{kind}: a region unserved for {:?} (bound {bound:?}): {} from {:?} after the \
             start, last served by {:?}; faults at {faults:?}",
            gap.len,
            gap.region,
            gap.from,
            gap.last_server
        );
    }
}
