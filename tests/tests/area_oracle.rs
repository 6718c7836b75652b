//! Property tests: `Engine::within`, `counts_within` and `density` equal
//! brute force over every driver, for boxes (across the antimeridian
//! too), polygons with holes, and region cells, with drivers exactly on
//! the edges and at the vertices, every status filter, vehicle and
//! capability filters, and pages of every size walked to the end; after a
//! load and claims, and again after moves, attribute changes and removals.

use std::collections::BTreeMap;

use hexmatch::{
    Area, AreaPolygon, AreaQuery, Capabilities, CellSet, ClaimRequest, Driver, Engine,
    EngineConfig, LatLonBox, OrderId, Position, Resolution, Status, StatusCounts, StatusSet,
    Vehicle,
};
use hexmatch_tests::{Change, OracleShape, apply_changes, cell_of, driver, oracle_within, wrapped};
use proptest::prelude::*;

/// Where drivers are.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// ±0.05° around a centre (a dense city).
    City(f64, f64),
    /// The whole globe.
    World,
    /// Within 1° of the antimeridian.
    Antimeridian,
}

fn point_in(place: Place) -> BoxedStrategy<Position> {
    match place {
        Place::City(lat, lon) => (-0.05f64..0.05, -0.05f64..0.05)
            .prop_map(move |(a, b)| wrapped(lat + a, lon + b))
            .boxed(),
        Place::World => (-89.0f64..=89.0, -180.0f64..=180.0)
            .prop_map(|(a, b)| wrapped(a, b))
            .boxed(),
        Place::Antimeridian => (-60.0f64..60.0, -1.0f64..1.0)
            .prop_map(|(a, b)| wrapped(a, if b < 0.0 { 180.0 + b } else { -180.0 + b }))
            .boxed(),
    }
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![
        ((-80.0f64..80.0), (-179.0f64..179.0)).prop_map(|(a, b)| Place::City(a, b)),
        Just(Place::City(41.88, -87.63)),
        Just(Place::World),
        Just(Place::Antimeridian),
    ]
}

fn attrs() -> impl Strategy<Value = (Status, Vehicle, Capabilities)> {
    (
        prop_oneof![4 => Just(Status::Available), 1 => Just(Status::Busy), 1 => Just(Status::Offline)],
        prop_oneof![3 => Just(Vehicle::Car), 1 => Just(Vehicle::Bike), 1 => Just(Vehicle::Van)],
        (0u16..8).prop_map(Capabilities::from_bits_truncate),
    )
}

/// How a query's shape is drawn: from the drivers' own coordinates (so
/// that some lie exactly on edges and at vertices) picked by these
/// indices, or from fresh points.
#[derive(Debug, Clone)]
enum ShapeSeed {
    /// A box with corners at two points (west and east swapped: across
    /// the antimeridian when west > east).
    Box(Position, Position, bool),
    /// A polygon: the centre, its vertices (sorted by angle about the
    /// centre, so the ring is simple), and whether it has a hole.
    Polygon(Position, Vec<Position>, bool),
    /// The cells of every `n`-th driver.
    Cells(usize),
}

fn shape_seed(place: Place) -> impl Strategy<Value = ShapeSeed> {
    prop_oneof![
        (point_in(place), point_in(place), any::<bool>())
            .prop_map(|(a, b, swap)| ShapeSeed::Box(a, b, swap)),
        (
            point_in(place),
            proptest::collection::vec(point_in(place), 3..10),
            any::<bool>()
        )
            .prop_map(|(c, v, hole)| ShapeSeed::Polygon(c, v, hole)),
        (1usize..4).prop_map(ShapeSeed::Cells),
    ]
}

/// The engine's area and the oracle's shape of a seed; `on` are driver
/// positions the seed's points snap to (every other point becomes the
/// nearest listed driver's, so edges pass through drivers).
fn shapes(seed: &ShapeSeed, on: &[Driver], res: Resolution) -> (Area, OracleShape) {
    let snap = |p: Position, i: usize| {
        if on.is_empty() || i % 2 == 1 {
            p
        } else {
            on[(i * 7) % on.len()].pos
        }
    };
    match seed {
        ShapeSeed::Box(a, b, swap) => {
            let (a, b) = (snap(*a, 0), snap(*b, 2));
            let (s, n) = (a.lat().min(b.lat()), a.lat().max(b.lat()));
            let (lo, hi) = (a.lon().min(b.lon()), a.lon().max(b.lon()));
            let (w, e) = if *swap { (hi, lo) } else { (lo, hi) };
            let area = Area::Box(LatLonBox::new(w, s, e, n).expect("valid box"));
            (area, OracleShape::Box(w, s, e, n))
        }
        ShapeSeed::Polygon(c, vertices, hole) => {
            let (cx, cy) = (c.lon(), c.lat());
            let mut outer: Vec<(f64, f64)> = vertices
                .iter()
                .enumerate()
                .map(|(i, p)| snap(*p, i))
                .map(|p| (p.lon(), p.lat()))
                .filter(|&(x, y)| (x, y) != (cx, cy))
                .collect();
            outer.sort_by(|a, b| {
                let angle = |(x, y): (f64, f64)| (y - cy).atan2(x - cx);
                angle(*a).total_cmp(&angle(*b))
            });
            outer.dedup();
            while outer.len() < 3 {
                let k = outer.len() as f64;
                outer.push((cx + 0.01 * (k + 1.0), cy + 0.01 * k));
            }
            outer.push(outer[0]);
            let mut rings = vec![outer.clone()];
            if *hole {
                // Star-shaped about the centre: shrunk towards it, it
                // stays inside.
                rings.push(
                    outer
                        .iter()
                        .map(|&(x, y)| (cx + 0.3 * (x - cx), cy + 0.3 * (y - cy)))
                        .collect(),
                );
            }
            let geojson = serde_json::json!({
                "type": "Polygon",
                "coordinates": rings
                    .iter()
                    .map(|r| r.iter().map(|&(x, y)| vec![x, y]).collect::<Vec<_>>())
                    .collect::<Vec<_>>(),
            });
            let area = Area::Polygon(AreaPolygon::from_geojson(&geojson).expect("valid polygon"));
            (area, OracleShape::Polygon(rings))
        }
        ShapeSeed::Cells(n) => {
            let cells: Vec<_> = on.iter().step_by(*n).map(|d| cell_of(d.pos, res)).collect();
            let set = CellSet::new(res, cells.iter().copied()).expect("cells of res");
            (Area::Cells(set), OracleShape::Cells(cells))
        }
    }
}

/// A query's filters: statuses (each kept with probability ¾), a vehicle,
/// capabilities; and the page size.
type Filters = (Vec<Status>, Option<Vehicle>, Capabilities, usize);

fn filters() -> impl Strategy<Value = Filters> {
    (
        proptest::sample::subsequence(
            vec![
                Status::Available,
                Status::Reserved,
                Status::Busy,
                Status::Offline,
            ],
            0..=4,
        ),
        proptest::option::weighted(
            0.3,
            prop_oneof![
                Just(Vehicle::Car),
                Just(Vehicle::Van),
                Just(Vehicle::Walker)
            ],
        ),
        proptest::option::weighted(0.3, (1u16..8).prop_map(Capabilities::from_bits_truncate)),
        prop_oneof![1usize..5, 5usize..60, Just(10_000usize)],
    )
        .prop_map(|(s, v, c, limit)| (s, v, c.unwrap_or(Capabilities::NONE), limit))
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (any::<usize>(), -0.02f64..0.02, -0.02f64..0.02)
            .prop_map(|(i, a, b)| Change::Move(i, a, b)),
        2 => (any::<usize>(), attrs()).prop_map(|(i, a)| Change::Attributes(i, a)),
        1 => any::<usize>().prop_map(Change::Remove),
    ]
}

type Scenario = (
    u8,
    Vec<Driver>,
    Vec<Position>,
    Vec<(ShapeSeed, Filters)>,
    Vec<Change>,
);

fn scenario() -> impl Strategy<Value = Scenario> {
    (place(), 0u8..=9).prop_flat_map(|(place, res)| {
        (
            Just(res),
            proptest::collection::vec((point_in(place), attrs()), 0..200).prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (p, (s, v, c)))| driver(&format!("d{i:03}"), p, s, v, c))
                    .collect::<Vec<_>>()
            }),
            proptest::collection::vec(point_in(place), 0..6),
            proptest::collection::vec((shape_seed(place), filters()), 1..8),
            proptest::collection::vec(change(), 0..60),
        )
    })
}

/// Walks every page of the query, checking each page's size and cursor.
fn all_pages(engine: &Engine, mut q: AreaQuery) -> Result<Vec<Driver>, TestCaseError> {
    let mut all = Vec::new();
    loop {
        let page = engine.within(&q).expect("valid query");
        prop_assert!(page.drivers.len() <= q.limit);
        prop_assert!(page.drivers.windows(2).all(|w| w[0].id < w[1].id), "by id");
        let full = page.drivers.len() == q.limit;
        all.extend(page.drivers.iter().cloned());
        match page.next {
            Some(next) => {
                prop_assert!(full, "a cursor only after a full page");
                prop_assert_eq!(Some(&next), page.drivers.last().map(|d| &d.id));
                q.after = Some(next);
            }
            None => return Ok(all),
        }
    }
}

fn oracle_counts(drivers: &[Driver], shape: &OracleShape) -> StatusCounts {
    let mut c = StatusCounts::default();
    for d in drivers.iter().filter(|d| shape.holds(d.pos)) {
        match d.status {
            Status::Available => c.available += 1,
            Status::Reserved => c.reserved += 1,
            Status::Busy => c.busy += 1,
            Status::Offline => c.offline += 1,
        }
    }
    c
}

fn check((res, drivers, pickups, queries, changes): &Scenario) -> Result<(), TestCaseError> {
    let engine = Engine::new(EngineConfig {
        resolution: *res,
        ..Default::default()
    })
    .expect("valid config");
    let res = Resolution::try_from(*res).expect("0..=9");
    engine
        .bulk_load(drivers.iter().cloned())
        .expect("bulk load");
    let mut drivers = drivers.clone();
    // Claims make some drivers reserved, with an order to report.
    let mut orders = BTreeMap::new();
    for (i, p) in pickups.iter().enumerate() {
        let order = OrderId::new(&format!("o{i}")).expect("valid");
        if let Ok((m, _)) = engine.claim(&order, &ClaimRequest::new(*p)) {
            let d = drivers
                .iter_mut()
                .find(|d| d.id == m.driver_id)
                .expect("claimed a known driver");
            d.status = Status::Reserved;
            orders.insert(m.driver_id, order);
        }
    }
    for round in ["loaded", "changed"] {
        if round == "changed" {
            apply_changes(&engine, &mut drivers, changes);
        }
        for (seed, (statuses, vehicle, caps, limit)) in queries {
            let (area, shape) = shapes(seed, &drivers, res);
            let mut q = AreaQuery::new(area.clone(), *limit).expect("valid limit");
            q.statuses = StatusSet::of(statuses.iter().copied());
            q.vehicle = *vehicle;
            q.capabilities = *caps;
            let got = all_pages(&engine, q)?;
            let want = oracle_within(&drivers, &shape, statuses, *vehicle, *caps);
            let got_ids: Vec<_> = got.iter().map(|d| d.id.clone()).collect();
            prop_assert_eq!(&got_ids, &want, "{} {:?} {:?}", round, seed, statuses);
            for d in &got {
                prop_assert_eq!(d.order_id.as_ref(), orders.get(&d.id), "{}'s order", d.id);
            }
            let counts = engine.counts_within(&area).expect("valid area");
            prop_assert_eq!(counts, oracle_counts(&drivers, &shape), "{} counts", round);
            if let (Area::Box(b), OracleShape::Box(..)) = (&area, &shape) {
                for r in [0, u8::from(res).saturating_sub(1), u8::from(res) + 2] {
                    let r = Resolution::try_from(r).expect("0..=11");
                    let got = engine.density(b, r).expect("few cells");
                    let mut want: BTreeMap<_, StatusCounts> = BTreeMap::new();
                    for d in drivers.iter().filter(|d| shape.holds(d.pos)) {
                        let cell = want.entry(cell_of(d.pos, r)).or_default();
                        match d.status {
                            Status::Available => cell.available += 1,
                            Status::Reserved => cell.reserved += 1,
                            Status::Busy => cell.busy += 1,
                            Status::Offline => cell.offline += 1,
                        }
                    }
                    let want: Vec<_> = want.into_iter().collect();
                    prop_assert_eq!(got, want, "{} density at {}", round, r);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn area_queries_equal_the_oracle(s in scenario()) {
        check(&s)?;
    }
}

/// The corner, edges and vertices of a shape are inside it.
#[test]
fn drivers_on_edges_and_vertices_are_inside() {
    let engine = Engine::new(EngineConfig::default()).expect("valid config");
    let p = |lat, lon| Position::new(lat, lon).expect("valid");
    let at = [
        ("corner", p(41.8, -87.7)),
        ("edge", p(41.85, -87.7)),
        ("inside", p(41.87, -87.68)),
        ("below", p(41.81, -87.61)),
        ("outside", p(41.85, -87.5999)),
    ];
    engine
        .bulk_load(at.iter().map(|(id, pos)| {
            driver(
                id,
                *pos,
                Status::Available,
                Vehicle::Car,
                Capabilities::NONE,
            )
        }))
        .expect("load");
    let ids = |area: Area| -> Vec<String> {
        let q = AreaQuery::new(area, 10).expect("valid");
        let page = engine.within(&q).expect("valid");
        page.drivers.iter().map(|d| d.id.to_string()).collect()
    };
    let bbox = LatLonBox::new(-87.7, 41.8, -87.6, 41.9).expect("valid");
    assert_eq!(ids(Area::Box(bbox)), ["below", "corner", "edge", "inside"]);
    let triangle = serde_json::json!({"type": "Polygon", "coordinates": [[
        [-87.7, 41.8], [-87.6, 41.9], [-87.7, 41.9], [-87.7, 41.8]
    ]]});
    let poly = AreaPolygon::from_geojson(&triangle).expect("valid");
    assert_eq!(ids(Area::Polygon(poly)), ["corner", "edge", "inside"]);
}
