//! Area queries over HTTP, with auth on, on the Chicago trips' pickups and
//! the Chicago community areas as regions: `GET /v1/drivers` by box and by
//! region, `POST /v1/drivers/within` by polygon, paged to the end, equal
//! the brute-force oracle; a region's stats and the density per H3 cell
//! equal their counts; `region=` narrows nearest queries and claims; bad
//! queries get a specific error.

use std::collections::BTreeMap;

use hexmatch::{
    Capabilities, CellSet, Driver, NearestQuery, Position, RegionId, RegionMap, Resolution, Status,
    Vehicle,
};
use hexmatch_server::ServeConfig;
use hexmatch_tests::http::{Api, TestServer, test_config};
use hexmatch_tests::{
    OracleShape, cell_of, data_path, driver, load_chicago_pickups, oracle_nearest, oracle_within,
};
use serde_json::{Value, json};

const TOKEN: &str = "areas-token";
const RES: u8 = 7;

/// Three thousand drivers at the recorded pickups (many share a
/// community area's centroid), with statuses, vehicles and capabilities
/// that vary by index.
fn fleet() -> Vec<Driver> {
    load_chicago_pickups()
        .into_iter()
        .take(3000)
        .enumerate()
        .map(|(i, (_, pos))| {
            let status = match i % 9 {
                0 => Status::Busy,
                4 => Status::Offline,
                _ => Status::Available,
            };
            let vehicle = if i % 5 == 0 {
                Vehicle::Van
            } else {
                Vehicle::Car
            };
            let caps = if i % 3 == 0 {
                "wheelchair".parse().expect("known")
            } else {
                Capabilities::NONE
            };
            driver(&format!("c{i:04}"), pos, status, vehicle, caps)
        })
        .collect()
}

async fn start(drivers: &[Driver]) -> TestServer {
    let srv = TestServer::start(ServeConfig {
        api_tokens: vec![TOKEN.into()],
        resolution: RES,
        regions: Some(data_path("chicago_community_areas.geojson")),
        ..test_config()
    })
    .await
    .with_token(TOKEN);
    let items: Vec<Value> = drivers
        .iter()
        .map(|d| {
            json!({
                "driver_id": d.id.as_str(),
                "lat": d.pos.lat(),
                "lon": d.pos.lon(),
                "status": d.status.as_str(),
                "vehicle": d.vehicle.as_str(),
                "capabilities": d.capabilities.names().collect::<Vec<_>>(),
            })
        })
        .collect();
    let tally = srv
        .post_json("/v1/locations", &json!(items))
        .await
        .expect(200);
    assert_eq!(tally["applied"], drivers.len(), "{tally}");
    srv
}

/// Every page of an area query, checking sizes and cursors.
async fn pages(api: &Api, get: Option<&str>, post: Option<Value>, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = match (&get, &post) {
            (Some(query), _) => {
                let after = cursor
                    .as_ref()
                    .map(|c| format!("&cursor={c}"))
                    .unwrap_or_default();
                api.get(&format!("/v1/drivers?{query}&limit={limit}{after}"))
                    .await
                    .expect(200)
            }
            (None, Some(body)) => {
                let mut body = body.clone();
                body["limit"] = json!(limit);
                if let Some(c) = &cursor {
                    body["cursor"] = json!(c);
                }
                api.post_json("/v1/drivers/within", &body).await.expect(200)
            }
            (None, None) => unreachable!("a query or a body"),
        };
        let drivers = page["drivers"].as_array().expect("drivers");
        assert!(drivers.len() <= limit, "{page}");
        ids.extend(
            drivers
                .iter()
                .map(|d| d["driver_id"].as_str().expect("id").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(drivers.len(), limit, "a cursor only after a full page");
                cursor = Some(next.to_owned());
            }
            None => return ids,
        }
    }
}

fn strings(ids: Vec<hexmatch::DriverId>) -> Vec<String> {
    ids.into_iter().map(|id| id.to_string()).collect()
}

fn regions() -> RegionMap {
    let text = std::fs::read_to_string(data_path("chicago_community_areas.geojson"))
        .expect("data/ is in the repository");
    RegionMap::from_geojson(
        &text,
        RES,
        "chicago-community-areas",
        hexmatch::Outside::DefaultRegion,
    )
    .expect("valid regions")
}

fn region_cells(map: &RegionMap, id: &str) -> CellSet {
    map.cells_of(&RegionId::new(id).expect("valid"))
        .expect("small")
        .expect("a region of the map")
}

/// `region=` lists the Loop's drivers, and its stats count them.
async fn check_region(srv: &TestServer, drivers: &[Driver]) {
    let all = [
        Status::Available,
        Status::Reserved,
        Status::Busy,
        Status::Offline,
    ];
    // A region: the Loop (community area 32).
    let map = regions();
    let loop_id = "chicago-community-areas-32";
    let cells = region_cells(&map, loop_id);
    let shape = OracleShape::Cells(cells.cells().to_vec());
    let want = strings(oracle_within(
        drivers,
        &shape,
        &all,
        None,
        Capabilities::NONE,
    ));
    assert!(!want.is_empty());
    assert_eq!(
        pages(srv, Some(&format!("region={loop_id}")), None, 1000).await,
        want
    );
    let stats = srv
        .get(&format!("/v1/regions/{loop_id}/stats"))
        .await
        .expect(200);
    let count = |st: Status| {
        drivers
            .iter()
            .filter(|d| d.status == st && shape.holds(d.pos))
            .count()
    };
    assert_eq!(stats["region"], loop_id);
    assert_eq!(stats["name"], "LOOP");
    assert_eq!(stats["cells"], cells.cells().len());
    assert_eq!(stats["drivers"]["available"], count(Status::Available));
    assert_eq!(stats["drivers"]["reserved"], count(Status::Reserved));
    assert_eq!(stats["drivers"]["busy"], count(Status::Busy));
    assert_eq!(stats["drivers"]["offline"], count(Status::Offline));
    assert_eq!(stats["drivers"]["total"], want.len());
}

/// The density per resolution-8 cell of a box counts its drivers.
async fn check_density(srv: &TestServer, drivers: &[Driver], (w, s, e, n): (f64, f64, f64, f64)) {
    // Density at resolution 8 over the box.
    let res8 = Resolution::Eight;
    let density = srv
        .get(&format!("/v1/density?res=8&bbox={w},{s},{e},{n}"))
        .await
        .expect(200);
    let inside = OracleShape::Box(w, s, e, n);
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for d in drivers.iter().filter(|d| inside.holds(d.pos)) {
        *want.entry(cell_of(d.pos, res8).to_string()).or_default() += 1;
    }
    let got: BTreeMap<String, u64> = density["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .map(|c| {
            (
                c["cell"].as_str().expect("cell").to_owned(),
                c["total"].as_u64().expect("total"),
            )
        })
        .collect();
    assert_eq!(density["res"], 8);
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn area_queries_equal_the_oracle_on_chicago() {
    let mut drivers = fleet();
    let srv = start(&drivers).await;
    // Claims reserve a few drivers.
    for (i, (lat, lon)) in [(41.88, -87.63), (41.95, -87.66), (41.79, -87.60)]
        .into_iter()
        .enumerate()
    {
        let m = srv
            .claim(&json!({"order_id": format!("o{i}"), "pickup": {"lat": lat, "lon": lon}}))
            .await
            .expect(201);
        let id = m["driver_id"].as_str().expect("id");
        let d = drivers
            .iter_mut()
            .find(|d| d.id.as_str() == id)
            .expect("a fleet driver");
        d.status = Status::Reserved;
    }
    let all = [
        Status::Available,
        Status::Reserved,
        Status::Busy,
        Status::Offline,
    ];

    // A box over the Loop and the near north side, edges on real pickups.
    let (w, s, e, n) = (-87.6426, 41.8781, -87.6195, 41.9002);
    let shape = OracleShape::Box(w, s, e, n);
    let want = strings(oracle_within(
        &drivers,
        &shape,
        &all,
        None,
        Capabilities::NONE,
    ));
    assert!(want.len() > 100, "a busy box: {}", want.len());
    let got = pages(&srv, Some(&format!("bbox={w},{s},{e},{n}")), None, 37).await;
    assert_eq!(got, want);

    // Filtered: available or reserved vans with a wheelchair ramp.
    let statuses = [Status::Available, Status::Reserved];
    let wheelchair: Capabilities = "wheelchair".parse().expect("known");
    let want = strings(oracle_within(
        &drivers,
        &shape,
        &statuses,
        Some(Vehicle::Van),
        wheelchair,
    ));
    let query = format!(
        "bbox={w},{s},{e},{n}&status=available,reserved&vehicle=van&capabilities=wheelchair"
    );
    assert_eq!(pages(&srv, Some(&query), None, 5).await, want);

    // A polygon with a hole, by POST.
    let outer = vec![
        (-87.70, 41.85),
        (-87.60, 41.85),
        (-87.60, 41.95),
        (-87.70, 41.95),
        (-87.70, 41.85),
    ];
    let hole = vec![
        (-87.66, 41.88),
        (-87.63, 41.88),
        (-87.63, 41.91),
        (-87.66, 41.91),
        (-87.66, 41.88),
    ];
    let rings: Vec<Vec<[f64; 2]>> = [&outer, &hole]
        .iter()
        .map(|r| r.iter().map(|&(x, y)| [x, y]).collect())
        .collect();
    let body = json!({"geometry": {"type": "Polygon", "coordinates": rings}});
    let shape = OracleShape::Polygon(vec![outer, hole]);
    let want = strings(oracle_within(
        &drivers,
        &shape,
        &all,
        None,
        Capabilities::NONE,
    ));
    assert!(want.len() > 100, "{}", want.len());
    assert_eq!(pages(&srv, None, Some(body), 250).await, want);

    check_region(&srv, &drivers).await;
    check_density(&srv, &drivers, (w, s, e, n)).await;
}

/// `region=` narrows nearest to the region's drivers, and a claim to
/// them: a pickup at the Loop's edge gets a driver in the Loop even with
/// nearer ones across the border.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_narrows_nearest_and_claims() {
    let drivers = fleet();
    let srv = start(&drivers).await;
    let map = regions();
    let loop_id = "chicago-community-areas-32";
    let cells = region_cells(&map, loop_id);
    let res = Resolution::try_from(RES).expect("valid");
    // Just north of the Loop, across the river.
    let pickup = Position::new(41.8905, -87.6315).expect("valid");
    let q = NearestQuery::new(pickup, 20).expect("valid");
    let unnarrowed = oracle_nearest(&drivers, &q, 50_000.0);
    let mut narrowed_q = q.clone();
    narrowed_q.within = Some(cells.clone());
    let want = oracle_nearest(&drivers, &narrowed_q, 50_000.0);
    assert!(!want.is_empty());
    assert_ne!(
        unnarrowed.first(),
        want.first(),
        "someone nearer outside the Loop"
    );
    let got = srv
        .nearest(&format!(
            "lat={}&lon={}&k=20&region={loop_id}",
            pickup.lat(),
            pickup.lon()
        ))
        .await;
    let got: Vec<(String, f64)> = got
        .iter()
        .map(|d| {
            (
                d["driver_id"].as_str().expect("id").to_owned(),
                d["distance_m"].as_f64().expect("m"),
            )
        })
        .collect();
    let want_pairs: Vec<(String, f64)> = want.iter().map(|(id, m)| (id.to_string(), *m)).collect();
    assert_eq!(got, want_pairs);

    let order = json!({
        "order_id": "loop-1",
        "pickup": {"lat": pickup.lat(), "lon": pickup.lon()},
        "region": loop_id,
    });
    let m = srv.claim(&order).await.expect(201);
    assert_eq!(m["driver_id"].as_str(), Some(want[0].0.as_str()));
    let d = drivers
        .iter()
        .find(|d| d.id == want[0].0)
        .expect("a fleet driver");
    assert!(cells.contains(cell_of(d.pos, res)));
    // The same request again is the same match; without the region it is
    // another request.
    let again = srv.claim(&order).await.expect(200);
    assert_eq!(again["driver_id"], m["driver_id"]);
    srv.claim(&json!({"order_id": "loop-1", "pickup": {"lat": pickup.lat(), "lon": pickup.lon()}}))
        .await
        .expect_error(409, "order_conflict");
}

/// Bad area queries: path, status, code, message.
const BAD_GETS: [(&str, u16, &str, &str); 12] = [
    (
        "/v1/drivers?bbox=-87.7,41.8,-87.6",
        400,
        "invalid_parameter",
        "bbox=\"-87.7,41.8,-87.6\" is not four numbers west,south,east,north",
    ),
    (
        "/v1/drivers?bbox=-87.7,41.9,-87.6,41.8",
        400,
        "invalid_parameter",
        "invalid parameter: bbox south 41.9 is north of its north 41.8",
    ),
    (
        "/v1/drivers",
        400,
        "invalid_parameter",
        "name exactly one area: bbox, region or geometry",
    ),
    (
        "/v1/drivers?bbox=-87.7,41.8,-87.6,41.9&region=chicago-community-areas-32",
        400,
        "invalid_parameter",
        "name exactly one area: bbox, region or geometry",
    ),
    (
        "/v1/drivers?region=atlantis",
        404,
        "unknown_region",
        "no region \"atlantis\"; GET /v1/regions lists them",
    ),
    (
        "/v1/drivers?region=chicago-community-areas-32&limit=0",
        400,
        "invalid_parameter",
        "limit=0 is not in 1..=10000",
    ),
    (
        "/v1/drivers?region=chicago-community-areas-32&status=parked",
        400,
        "invalid_parameter",
        "status \"parked\" is not one of available, reserved, busy, offline",
    ),
    (
        "/v1/drivers?region=chicago-community-areas-32&cursor=a%20b",
        400,
        "invalid_parameter",
        "cursor \"a b\" is not a driver id (pass the previous page's next_cursor)",
    ),
    (
        "/v1/regions/atlantis/stats",
        404,
        "unknown_region",
        "no region \"atlantis\"; GET /v1/regions lists them",
    ),
    (
        "/v1/density?bbox=-87.7,41.8,-87.6,41.9",
        400,
        "invalid_parameter",
        "res is required",
    ),
    (
        "/v1/density?res=16&bbox=-87.7,41.8,-87.6,41.9",
        400,
        "invalid_parameter",
        "res=16 is not in 0..=15",
    ),
    (
        "/v1/drivers/nearest?lat=41.88&lon=-87.63&region=atlantis",
        404,
        "unknown_region",
        "no region \"atlantis\"; GET /v1/regions lists them",
    ),
];

/// Bad area queries get a specific error; no token gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_area_queries_are_refused_by_name() {
    let srv = start(&fleet()[..10]).await;
    for (path, status, code, message) in BAD_GETS {
        let r = srv.get(path).await;
        let body = r.expect(status);
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
        assert_eq!(body["error"]["message"], message, "{path}");
    }
    let triangle_of_two =
        json!({"geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}});
    let body = srv
        .post_json("/v1/drivers/within", &triangle_of_two)
        .await
        .expect(400);
    assert_eq!(
        body["error"]["message"],
        "invalid parameter: polygon: a ring has 3 positions; a closed ring needs at least 4"
    );
    let claim =
        json!({"order_id": "o", "pickup": {"lat": 41.88, "lon": -87.63}, "region": "atlantis"});
    srv.claim(&claim).await.expect_error(404, "unknown_region");
    // Nothing was reserved.
    assert_eq!(
        srv.get("/v1/matches/o").await.expect(404)["error"]["code"],
        "unknown_order"
    );
    let anonymous = srv.api_with_token(None);
    anonymous
        .get("/v1/drivers?region=chicago-community-areas-32")
        .await
        .expect_error(401, "unauthorized");
}
