//! HTTP API, `GET /v1/drivers/nearest`: on real data (every pickup of
//! `data/chicago_trips.csv` as a driver, loaded through `POST /v1/locations`)
//! the answer over HTTP equals the brute-force oracle — ids, order, and
//! distances to 1e-6 m — with and without filters and radii; defaults;
//! and every documented parameter error, none of which changes state.

#![allow(
    clippy::float_cmp, // positions must round-trip exactly through JSON
    clippy::too_many_lines
)]

use std::fmt::Write as _;

use hexmatch::{Capabilities, Driver, NearestQuery, Position, Vehicle};
use hexmatch_tests::http::{
    TestServer, check_driver_shape, chicago_drivers, f64_of, latlon, str_of, t_str, test_config,
};
use hexmatch_tests::oracle_nearest;
use serde_json::{Value, json};

const MAX_RADIUS_M: f64 = 500_000.0;

/// One query, as URL parameters and as an engine query for the oracle.
struct Q {
    params: String,
    query: NearestQuery,
}

fn q(pos: Position, k: Option<usize>) -> Q {
    let mut params = latlon(pos);
    if let Some(k) = k {
        write!(params, "&k={k}").expect("writing to a String");
    }
    Q {
        params,
        query: NearestQuery::new(pos, k.unwrap_or(10)).expect("valid k"),
    }
}

impl Q {
    fn radius(mut self, r: f64) -> Self {
        write!(self.params, "&radius_m={r}").expect("writing to a String");
        self.query = self.query.with_radius(r).expect("valid radius");
        self
    }
    fn vehicle(mut self, v: Vehicle) -> Self {
        write!(self.params, "&vehicle={v}").expect("writing to a String");
        self.query = self.query.with_vehicle(v);
        self
    }
    fn caps(mut self, names: &str) -> Self {
        write!(self.params, "&capabilities={names}").expect("writing to a String");
        self.query = self
            .query
            .with_capabilities(names.parse::<Capabilities>().expect("known names"));
        self
    }
}

async fn check_against_oracle(srv: &TestServer, drivers: &[Driver], q: &Q) {
    let got = srv.nearest(&q.params).await;
    let want = oracle_nearest(drivers, &q.query, MAX_RADIUS_M);
    let got_ids: Vec<&str> = got.iter().map(|d| str_of(d, "driver_id")).collect();
    let want_ids: Vec<&str> = want.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(got_ids, want_ids, "ids for {}", q.params);
    for (g, (id, dist)) in got.iter().zip(&want) {
        let gd = f64_of(g, "distance_m");
        assert!(
            (gd - dist).abs() <= 1e-6,
            "{}: {id} at {gd} m, oracle {dist} m",
            q.params
        );
        let d = drivers
            .iter()
            .find(|d| &d.id == id)
            .expect("the oracle returns known drivers");
        assert_eq!(f64_of(g, "lat"), d.pos.lat(), "{id}");
        assert_eq!(f64_of(g, "lon"), d.pos.lon(), "{id}");
        assert_eq!(str_of(g, "vehicle"), d.vehicle.as_str(), "{id}");
        assert_eq!(str_of(g, "ts"), d.ts.to_string(), "{id}");
    }
    for w in got.windows(2) {
        assert!(f64_of(&w[0], "distance_m") <= f64_of(&w[1], "distance_m"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_over_http_equals_the_oracle_on_chicago_pickups() {
    let srv = TestServer::start_manual(test_config()).await;
    let rows = chicago_drivers(usize::MAX);
    assert!(rows.len() > 10_000, "expected the whole file");
    // Two requests: the batch limit is 10 000 items.
    let mut applied = 0;
    for chunk in rows.chunks(6000) {
        let items: Vec<Value> = chunk.iter().map(|(_, v)| v.clone()).collect();
        let v = srv
            .post_json("/v1/locations", &Value::Array(items))
            .await
            .expect(200);
        assert_eq!(v["stale"], json!(0), "{v}");
        assert_eq!(v["rejected"], json!([]), "{v}");
        applied += v["applied"].as_u64().unwrap();
    }
    assert_eq!(applied, rows.len() as u64);
    let drivers: Vec<Driver> = rows.into_iter().map(|(d, _)| d).collect();
    // A spot check of one record.
    let d = srv.driver(drivers[3].id.as_str()).await;
    check_driver_shape(&d);
    assert_eq!(str_of(&d, "status"), "busy");

    // Pickup spots (many drivers share each one: ties by id), points
    // between them, and points outside the city.
    let mut points: Vec<Position> = drivers
        .iter()
        .step_by(drivers.len() / 12)
        .map(|d| d.pos)
        .collect();
    points.extend(
        drivers
            .iter()
            .step_by(drivers.len() / 6)
            .map(|d| Position::new(d.pos.lat() + 0.0037, d.pos.lon() - 0.0051).unwrap()),
    );
    points.push(Position::new(43.0389, -87.9065).unwrap()); // Milwaukee, ~130 km
    points.push(Position::new(41.5, -88.5).unwrap());
    for (i, p) in points.iter().enumerate() {
        let queries = [
            q(*p, None),
            q(*p, Some(1)),
            q(*p, Some(100)),
            q(*p, Some(25)).vehicle(Vehicle::ALL[i % 6]),
            q(*p, Some(10)).caps("cash,card"),
            q(*p, Some(50)).radius(1500.0),
            q(*p, Some(5))
                .vehicle(Vehicle::Scooter)
                .caps("large_items")
                .radius(3000.0),
        ];
        for query in &queries {
            check_against_oracle(&srv, &drivers, query).await;
        }
    }
    // Beyond max_radius_m (500 km) nobody is offered; a small radius far
    // from everyone is empty too.
    assert!(srv.nearest("lat=0&lon=0&k=100").await.is_empty());
    assert!(
        srv.nearest("lat=40.7128&lon=-74.006&radius_m=1000")
            .await
            .is_empty()
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_defaults_ties_and_statuses() {
    let srv = TestServer::start_manual(test_config()).await;
    let base = Position::new(41.88, -87.63).unwrap();
    // 15 available drivers east of the base, 11 m apart; two more exactly
    // at the base (a tie, broken by id); and three that are not available.
    for i in 0..15 {
        srv.put_driver(
            &format!("e{i:02}"),
            &json!({"lat": 41.88, "lon": -87.63 + 0.0001 * f64::from(i + 1)}),
        )
        .await;
    }
    for id in ["tie-b", "tie-a"] {
        srv.put_driver(id, &json!({"lat": 41.88, "lon": -87.63, "vehicle": "bike"}))
            .await;
    }
    for (id, status) in [("s-busy", "busy"), ("s-off", "offline")] {
        srv.put_driver(
            id,
            &json!({"lat": 41.88, "lon": -87.63, "status": status, "ts": t_str(0)}),
        )
        .await;
    }
    srv.put_driver("s-res", &json!({"lat": 41.88, "lon": -87.63}))
        .await;
    srv.claim(
        &json!({"order_id": "o1", "pickup": {"lat": 41.88, "lon": -87.63},
                      "vehicle": "car", "radius_m": 1}),
    )
    .await
    .expect(201);
    assert_eq!(str_of(&srv.driver("s-res").await, "status"), "reserved");

    let all = srv.nearest(&latlon(base)).await;
    assert_eq!(all.len(), 10, "default k is 10");
    let ids: Vec<&str> = all.iter().map(|d| str_of(d, "driver_id")).collect();
    assert_eq!(&ids[..4], ["tie-a", "tie-b", "e00", "e01"]);
    for d in &all {
        for key in ["driver_id", "lat", "lon", "distance_m", "vehicle", "ts"] {
            assert!(d.get(key).is_some(), "{key} missing in {d}");
        }
    }
    assert_eq!(
        srv.nearest_ids(&format!("{}&k=100", latlon(base)))
            .await
            .len(),
        17
    );
    assert_eq!(
        srv.nearest_ids(&format!("{}&k=100&vehicle=bike", latlon(base)))
            .await,
        ["tie-a", "tie-b"]
    );
    // 0.0005° of longitude here is about 41.4 m: e00..e03 are within 35 m.
    assert_eq!(
        srv.nearest_ids(&format!("{}&k=100&radius_m=35&vehicle=car", latlon(base)))
            .await,
        ["e00", "e01", "e02", "e03"]
    );
    // Empty capability list = no filter.
    assert_eq!(
        srv.nearest_ids(&format!("{}&k=100&capabilities=", latlon(base)))
            .await
            .len(),
        17
    );
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_rejects_bad_parameters_without_changing_state() {
    let srv = TestServer::start_manual(test_config()).await;
    srv.put_driver("d1", &json!({"lat": 41.88, "lon": -87.63}))
        .await;
    let number_codes = &["invalid_parameter", "invalid_position"][..];
    let cases: &[(&str, &[&str])] = &[
        ("lon=-87.63", &["invalid_parameter"]),
        ("lat=41.88", &["invalid_parameter"]),
        ("", &["invalid_parameter"]),
        ("lat=91&lon=0", &["invalid_position"]),
        ("lat=-90.0001&lon=0", &["invalid_position"]),
        ("lat=0&lon=180.5", &["invalid_position"]),
        ("lat=0&lon=-181", &["invalid_position"]),
        ("lat=NaN&lon=0", number_codes),
        ("lat=inf&lon=0", number_codes),
        ("lat=north&lon=0", number_codes),
        ("lat=41.88&lon=-87.63&k=0", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&k=101", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&k=-1", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&k=ten", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&radius_m=-5", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&radius_m=0", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&radius_m=far", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&vehicle=boat", &["invalid_parameter"]),
        (
            "lat=41.88&lon=-87.63&capabilities=teleport",
            &["invalid_parameter"],
        ),
        (
            "lat=41.88&lon=-87.63&capabilities=cash,teleport",
            &["invalid_parameter"],
        ),
        ("lat=41.88&lon=-87.63&kk=3", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&lat=41.89", &["invalid_parameter"]),
        ("lat=41.88&lon=-87.63&k=1&k=2", &["invalid_parameter"]),
    ];
    let before = srv.snapshot(&[]);
    for (query, codes) in cases {
        let r = srv.get(&format!("/v1/drivers/nearest?{query}")).await;
        assert_eq!(r.status.as_u16(), 400, "{query}: {}", r.body);
        r.expect_error_in(400, codes);
        assert_eq!(srv.snapshot(&[]), before, "{query} changed state");
    }
    // Values are percent-decoded (`%2D` is `-`, `%63ar` is `car`, `+` a space).
    let got = srv
        .nearest("lat=41.88&lon=%2D87.63&vehicle=%63ar&k=+3")
        .await;
    assert_eq!(got.len(), 1);
    // The limits themselves are valid.
    for k in [1, 100] {
        let got = srv.nearest(&format!("lat=41.88&lon=-87.63&k={k}")).await;
        assert_eq!(got.len(), 1);
    }
    srv.shutdown().await;
}
