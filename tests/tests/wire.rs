//! The wire shapes between nodes and clients (`hexmatch_server::wire`):
//! every typed shape survives a round trip through JSON exactly, and no
//! decoder panics on random or mutated bytes (untrusted bytes arrive on
//! the peer routes and in Redis stream entries).

// The strategies build values valid by construction.
#![allow(clippy::unwrap_used)]

use hexmatch::{
    BatchOrder, Capabilities, ClaimRequest, Driver, DriverId, DriverUpdate, Match, MatchState,
    OrderId, Position, Status, Timestamp, Vehicle,
};
use hexmatch_server::error::ErrorBody;
use hexmatch_server::wire::{
    BatchTally, DriverOut, HandoffAnswer, HandoffRequest, LocationItem, MatchOut, NearestOut,
    PeerOrder, PeerUpdate, PeerUpdates, ReserveRequest, Reserved,
};
use proptest::prelude::*;

const STATUSES: [Status; 4] = [
    Status::Available,
    Status::Reserved,
    Status::Busy,
    Status::Offline,
];
const STATES: [MatchState; 5] = [
    MatchState::Reserved,
    MatchState::Confirmed,
    MatchState::Released,
    MatchState::Expired,
    MatchState::Completed,
];

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:-]{1,64}"
}

fn position() -> impl Strategy<Value = Position> {
    (-90.0..=90.0_f64, -180.0..=180.0_f64).prop_map(|(lat, lon)| Position::new(lat, lon).unwrap())
}

fn ts() -> impl Strategy<Value = Timestamp> {
    (0..=253_402_300_799_999_i64).prop_map(|ms| Timestamp::from_millis(ms).unwrap())
}

fn caps() -> impl Strategy<Value = Capabilities> {
    proptest::sample::subsequence(Capabilities::NAMES[..6].to_vec(), 0..4)
        .prop_map(|names| Capabilities::from_names(names).unwrap())
}

fn driver() -> impl Strategy<Value = Driver> {
    (
        id(),
        position(),
        ts(),
        0..STATUSES.len(),
        0..Vehicle::ALL.len(),
        caps(),
        proptest::option::of((id(), ts())),
    )
        .prop_map(|(id, pos, ts, s, v, capabilities, held)| Driver {
            id: DriverId::new(&id).unwrap(),
            pos,
            ts,
            status: STATUSES[s],
            vehicle: Vehicle::ALL[v],
            capabilities,
            order_id: held.as_ref().map(|(o, _)| OrderId::new(o).unwrap()),
            reserved_until: held.map(|(_, t)| t),
        })
}

fn a_match() -> impl Strategy<Value = Match> {
    (
        (id(), id(), position(), 0.0..2.0e7_f64, 0..STATES.len()),
        (
            ts(),
            ts(),
            proptest::option::of(ts()),
            proptest::option::of("[ -~]{0,40}"),
        ),
    )
        .prop_map(
            |((o, d, pickup, distance_m, s), (created_at, reserved_until, ended_at, reason))| {
                Match {
                    order_id: OrderId::new(&o).unwrap(),
                    driver_id: DriverId::new(&d).unwrap(),
                    pickup,
                    distance_m,
                    state: STATES[s],
                    created_at,
                    reserved_until,
                    ended_at,
                    reason,
                }
            },
        )
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    let json = serde_json::to_vec(v).unwrap();
    serde_json::from_slice(&json).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Drivers as nodes hand them over, matches as nodes reserve them:
    /// exactly what was sent, every status included.
    #[test]
    fn typed_shapes_round_trip_exactly(d in driver(), m in a_match(), region in "[a-z-]{1,20}") {
        let out = DriverOut::from(d.clone());
        prop_assert_eq!(round_trip(&out), out.clone());
        let answer = HandoffAnswer { drivers: vec![out] };
        prop_assert_eq!(round_trip(&answer), answer);
        let m_out = MatchOut { region, ..MatchOut::from(m.clone()) };
        prop_assert_eq!(round_trip(&m_out).into_match().unwrap(), m.clone());
        let reserved = Reserved { m: m_out, created: true };
        prop_assert_eq!(round_trip(&reserved), reserved);
    }

    #[test]
    fn peer_orders_and_updates_round_trip_exactly(
        o in id(), pickup in position(), v in proptest::option::of(0..Vehicle::ALL.len()),
        c in caps(), radius in proptest::option::of(1.0..1.0e6_f64), hold in 1..3_600_000_u64,
        d in driver(), with_ts in any::<bool>(),
    ) {
        let mut request = ClaimRequest::new(pickup);
        request.vehicle = v.map(|i| Vehicle::ALL[i]);
        request.capabilities = c;
        request.radius_m = radius;
        request.hold_ms = hold;
        let order = BatchOrder { order_id: OrderId::new(&o).unwrap(), request };
        let peer = PeerOrder::from(&order);
        let back = round_trip(&ReserveRequest { driver_id: Some(d.id.clone()), order: peer });
        prop_assert_eq!(back.driver_id.as_ref(), Some(&d.id));
        prop_assert_eq!(back.order.into_order().unwrap(), order);
        let update = DriverUpdate {
            id: d.id.clone(),
            pos: d.pos,
            ts: with_ts.then_some(d.ts),
            status: Some(d.status),
            vehicle: Some(d.vehicle),
            capabilities: Some(d.capabilities),
        };
        let updates = PeerUpdates { updates: vec![PeerUpdate::from(&update)] };
        let back = round_trip(&updates).updates.remove(0).into_update().unwrap();
        prop_assert_eq!(back, update.clone());
        // A client-shaped item of the same update validates to it.
        let item = round_trip(&LocationItem::from(&update));
        if d.status != Status::Reserved {
            prop_assert_eq!(item.into_update().unwrap(), update);
        }
    }

    /// Random and mutated bytes give errors, never panics.
    #[test]
    fn wire_decoders_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        d in driver(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        fields in proptest::collection::vec(("[a-z_]{1,14}", "[ -~]{0,30}"), 0..8),
    ) {
        let valid = serde_json::to_vec(&HandoffAnswer { drivers: vec![DriverOut::from(d)] }).unwrap();
        let mut mutated = valid.clone();
        for (at, b) in edits {
            if !mutated.is_empty() {
                let i = at % mutated.len();
                mutated[i] = b;
            }
        }
        for input in [&bytes, &mutated] {
            let _ = serde_json::from_slice::<PeerUpdates>(input);
            let _ = serde_json::from_slice::<ReserveRequest>(input);
            let _ = serde_json::from_slice::<HandoffRequest>(input);
            let _ = serde_json::from_slice::<HandoffAnswer>(input);
            let _ = serde_json::from_slice::<Reserved>(input);
            let _ = serde_json::from_slice::<BatchTally>(input);
            let _ = serde_json::from_slice::<NearestOut>(input);
            let _ = serde_json::from_slice::<ErrorBody>(input);
            if let Ok(item) = serde_json::from_slice::<LocationItem>(input) {
                let _ = item.into_update();
            }
        }
        let fields: Vec<(String, String)> = fields;
        if let Ok(item) = LocationItem::from_stream_fields(&fields) {
            let _ = item.into_update();
        }
    }
}
