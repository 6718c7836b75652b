//! Every JSON shape the server reads or writes, defined once and used by
//! the handlers, the peer client between nodes, `hexmatch replay
//! --server` and the tests: `Serialize + Deserialize`, with typed fields
//! (ids, statuses, vehicles and timestamps are engine types, written as
//! their text).
//!
//! Client requests keep their free-form fields (`vehicle: "car"`) so that
//! a bad value gets its precise error code on conversion rather than a
//! generic `invalid_json`; conversion validates everything, so a request
//! that fails it is rejected before it reaches the engine and changes
//! nothing. Shapes that only nodes send ([`PeerOrder`], [`PeerUpdate`],
//! [`HandoffAnswer`]) are typed throughout.

use std::fmt::Display;
use std::str::FromStr;

use hexmatch::{
    BatchOrder, Capabilities, ClaimRequest, Driver, DriverId, DriverUpdate, Match, MatchState,
    Neighbor, OrderId, Position, Status, StatusCounts, StatusSet, Timestamp, Vehicle,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};

pub use crate::error::{ErrorBody, ErrorDetail};

/// A `T` read only from a JSON object. serde's derived structs also accept
/// a positional array (`[41.9, -87.7]` for `{"lat": …, "lon": …}`), which
/// the API does not: a body, item or field that should be an object and is
/// anything else is `invalid_json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Only<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        deserializer
            .deserialize_map(Only(std::marker::PhantomData))
            .map(Object)
    }
}

/// `deserialize_with` for a field that must be a JSON object.
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Object::deserialize(d).map(|o| o.0)
}

/// `deserialize_with` for an array whose items must be JSON objects.
fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Object<T>>::deserialize(d).map(|v| v.into_iter().map(|o| o.0).collect())
}

/// The region of every position on a node without a region map.
pub const DEFAULT_REGION: &str = "default";

/// Serde for values written as their text (`Display`) and read back with
/// `FromStr`: ids, statuses, vehicles, timestamps.
mod text {
    use super::{Deserialize, Deserializer, Display, FromStr, Serializer};

    pub(super) fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(super) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// [`text`] for optional values.
mod opt_text {
    use super::{Deserialize, Deserializer, Display, FromStr, Serializer};

    // serde hands `serialize_with` functions a reference.
    #[allow(clippy::ref_option)]
    pub(super) fn serialize<T: Display, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let raw = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        raw.map(|r| r.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Values written as one of a fixed set of names.
trait Named: Copy + 'static {
    const ALL: &'static [Self];
    fn name(self) -> &'static str;

    /// The value named `raw`.
    fn from_name(raw: &str) -> Result<Self, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|v| v.name() == raw)
            .ok_or_else(|| format!("unknown name {raw:?}"))
    }
}

impl Named for Status {
    const ALL: &'static [Self] = &[Self::Available, Self::Reserved, Self::Busy, Self::Offline];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Named for MatchState {
    const ALL: &'static [Self] = &[
        Self::Reserved,
        Self::Confirmed,
        Self::Released,
        Self::Expired,
        Self::Completed,
    ];
    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// Serde for [`Named`] values (every status, including `reserved`, which
/// clients may not set but nodes and responses carry).
mod named {
    use super::{Deserialize, Deserializer, Named, Serializer};

    // serde hands `serialize_with` functions a reference.
    #[allow(clippy::trivially_copy_pass_by_ref)]
    pub(super) fn serialize<T: Named, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.name())
    }

    pub(super) fn deserialize<'de, T: Named, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        T::from_name(&raw).map_err(serde::de::Error::custom)
    }
}

/// Timestamps as RFC 3339 text (integer milliseconds are read too).
mod ts {
    use super::{Deserialize, Deserializer, Serializer, Timestamp};

    // serde hands `serialize_with` functions a reference.
    #[allow(clippy::trivially_copy_pass_by_ref)]
    pub(super) fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        match t.rfc3339() {
            Some(text) => s.serialize_str(text.as_str()),
            None => s.collect_str(t),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// [`ts`] for optional timestamps.
mod opt_ts {
    use super::{Deserialize, Deserializer, Serializer, Timestamp};

    // serde hands `serialize_with` functions a reference.
    #[allow(clippy::ref_option)]
    pub(super) fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::ts::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Timestamp>, D::Error> {
        let raw = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        raw.map(|r| Timestamp::parse(&r))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

/// Capabilities as a list of names.
mod caps {
    use super::{Capabilities, Deserialize, Deserializer, Serializer};

    // serde hands `serialize_with` functions a reference.
    #[allow(clippy::trivially_copy_pass_by_ref)]
    pub(super) fn serialize<S: Serializer>(c: &Capabilities, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(c.names())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Capabilities, D::Error> {
        let names = <Vec<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        Capabilities::from_names(names.iter().map(AsRef::as_ref)).map_err(serde::de::Error::custom)
    }
}

/// A timestamp in a request: RFC 3339 text or integer Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TsIn {
    /// Unix milliseconds.
    Millis(i64),
    /// RFC 3339, e.g. `2026-11-25T10:00:00.250Z`.
    Text(String),
}

impl TsIn {
    fn parse(&self) -> ApiResult<Timestamp> {
        match self {
            Self::Millis(ms) => Timestamp::from_millis(*ms),
            Self::Text(s) => Timestamp::parse(s),
        }
        .map_err(ApiError::from)
    }
}

/// A position in a request or response.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LatLon {
    /// Latitude, degrees in [-90, 90].
    pub lat: f64,
    /// Longitude, degrees in [-180, 180].
    pub lon: f64,
}

impl LatLon {
    /// The position, validated.
    ///
    /// # Errors
    /// `invalid_position` when out of range or not finite.
    pub fn parse(self) -> ApiResult<Position> {
        Position::new(self.lat, self.lon).map_err(ApiError::from)
    }
}

impl From<Position> for LatLon {
    fn from(p: Position) -> Self {
        Self {
            lat: p.lat(),
            lon: p.lon(),
        }
    }
}

/// A vehicle class by name (`None` stays `None`).
///
/// # Errors
/// `invalid_parameter` for an unknown class.
pub fn parse_vehicle(v: Option<&str>) -> ApiResult<Option<Vehicle>> {
    v.map(str::parse).transpose().map_err(ApiError::from)
}

/// Capabilities by name (`None` stays `None`).
///
/// # Errors
/// `invalid_parameter` for an unknown capability.
pub fn parse_caps(c: Option<&[String]>) -> ApiResult<Option<Capabilities>> {
    c.map(|names| Capabilities::from_names(names.iter().map(String::as_str)))
        .transpose()
        .map_err(ApiError::from)
}

/// A status a client may set (`reserved` is set by matching only).
///
/// # Errors
/// `invalid_parameter` for `reserved` or an unknown status.
pub fn parse_status(s: Option<&str>) -> ApiResult<Option<Status>> {
    match s {
        Some("reserved") => Err(ApiError::invalid_parameter(
            "status reserved is set by matching, not by clients",
        )),
        other => other.map(str::parse).transpose().map_err(ApiError::from),
    }
}

/// Body of `PUT /v1/drivers/{driver_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DriverPut {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Time of the fix; missing = now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<TsIn>,
    /// `available`, `busy` or `offline`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `car`, `bike`, `scooter`, `van`, `truck` or `walker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<String>,
    /// Capability names, e.g. `["cash", "large_items"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
}

impl DriverPut {
    /// The validated update of driver `id`.
    ///
    /// # Errors
    /// The first invalid field's error.
    pub fn into_update(self, id: DriverId) -> ApiResult<DriverUpdate> {
        Ok(DriverUpdate {
            id,
            pos: LatLon {
                lat: self.lat,
                lon: self.lon,
            }
            .parse()?,
            ts: self.ts.as_ref().map(TsIn::parse).transpose()?,
            status: parse_status(self.status.as_deref())?,
            vehicle: parse_vehicle(self.vehicle.as_deref())?,
            capabilities: parse_caps(self.capabilities.as_deref())?,
        })
    }
}

/// Body of `POST /v1/drivers/{driver_id}/location`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationIn {
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Time of the fix; missing = now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<TsIn>,
}

impl LocationIn {
    /// The validated location update of driver `id`.
    ///
    /// # Errors
    /// The first invalid field's error.
    pub fn into_update(self, id: DriverId) -> ApiResult<DriverUpdate> {
        let pos = LatLon {
            lat: self.lat,
            lon: self.lon,
        }
        .parse()?;
        let ts = self.ts.as_ref().map(TsIn::parse).transpose()?;
        Ok(DriverUpdate::location(id, pos, ts))
    }
}

/// One item of `POST /v1/locations` or of the WebSocket stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocationItem {
    /// The driver (created if unknown).
    pub driver_id: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Time of the fix; missing = now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<TsIn>,
    /// Optional status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Optional vehicle class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<String>,
    /// Optional capabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
}

impl LocationItem {
    /// Builds an item from a Redis stream entry's string fields, with the
    /// same names and rules as the JSON body (an unknown field is an error,
    /// as `deny_unknown_fields` makes it over HTTP).
    ///
    /// # Errors
    /// `invalid_json` for a missing, unknown, repeated or unreadable field.
    pub fn from_stream_fields(fields: &[(String, String)]) -> ApiResult<Self> {
        let (mut driver_id, mut lat, mut lon) = (None, None, None);
        let mut item = Self {
            driver_id: String::new(),
            lat: 0.0,
            lon: 0.0,
            ts: None,
            status: None,
            vehicle: None,
            capabilities: None,
        };
        let number = |name: &str, raw: &str| {
            raw.trim()
                .parse::<f64>()
                .map_err(|_| ApiError::invalid_json(format!("{name} {raw:?} is not a number")))
        };
        for (i, (name, raw)) in fields.iter().enumerate() {
            if fields[..i].iter().any(|(seen, _)| seen == name) {
                return Err(ApiError::invalid_json(format!("duplicate field `{name}`")));
            }
            match name.as_str() {
                "driver_id" => driver_id = Some(raw.clone()),
                "lat" => lat = Some(number("lat", raw)?),
                "lon" => lon = Some(number("lon", raw)?),
                "ts" if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) => {
                    item.ts = Some(
                        raw.parse()
                            .map_or_else(|_| TsIn::Text(raw.clone()), TsIn::Millis),
                    );
                }
                "ts" => item.ts = Some(TsIn::Text(raw.clone())),
                "status" => item.status = Some(raw.clone()),
                "vehicle" => item.vehicle = Some(raw.clone()),
                "capabilities" => {
                    item.capabilities = Some(
                        raw.split(',')
                            .map(str::trim)
                            .filter(|c| !c.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    );
                }
                other => return Err(ApiError::invalid_json(format!("unknown field `{other}`"))),
            }
        }
        let missing = |f: &str| ApiError::invalid_json(format!("missing field `{f}`"));
        item.driver_id = driver_id.ok_or_else(|| missing("driver_id"))?;
        item.lat = lat.ok_or_else(|| missing("lat"))?;
        item.lon = lon.ok_or_else(|| missing("lon"))?;
        Ok(item)
    }

    /// The validated update.
    ///
    /// # Errors
    /// The first invalid field's error.
    pub fn into_update(self) -> ApiResult<DriverUpdate> {
        let id = DriverId::new(&self.driver_id)?;
        DriverPut {
            lat: self.lat,
            lon: self.lon,
            ts: self.ts,
            status: self.status,
            vehicle: self.vehicle,
            capabilities: self.capabilities,
        }
        .into_update(id)
    }
}

impl From<&DriverUpdate> for LocationItem {
    /// The item that applies `u` (timestamps as Unix milliseconds).
    fn from(u: &DriverUpdate) -> Self {
        Self {
            driver_id: u.id.to_string(),
            lat: u.pos.lat(),
            lon: u.pos.lon(),
            ts: u.ts.map(|t| TsIn::Millis(t.as_millis())),
            status: u.status.map(|s| s.as_str().to_owned()),
            vehicle: u.vehicle.map(|v| v.as_str().to_owned()),
            capabilities: u
                .capabilities
                .map(|c| c.names().map(str::to_owned).collect()),
        }
    }
}

/// A driver as the API shows it (and as nodes hand it over).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DriverOut {
    /// Id.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub driver_id: DriverId,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Last applied fix time (RFC 3339).
    #[serde(with = "ts")]
    #[schema(value_type = String)]
    pub ts: Timestamp,
    /// `available`, `reserved`, `busy` or `offline`.
    #[serde(with = "named")]
    #[schema(value_type = String)]
    pub status: Status,
    /// Vehicle class.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub vehicle: Vehicle,
    /// Capability names.
    #[serde(with = "caps")]
    #[schema(value_type = Vec<String>)]
    pub capabilities: Capabilities,
    /// The order it is reserved for or busy with.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub order_id: Option<OrderId>,
    /// When its reservation lapses (RFC 3339).
    #[serde(default, with = "opt_ts", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub reserved_until: Option<Timestamp>,
}

impl From<Driver> for DriverOut {
    fn from(d: Driver) -> Self {
        Self {
            driver_id: d.id,
            lat: d.pos.lat(),
            lon: d.pos.lon(),
            ts: d.ts,
            status: d.status,
            vehicle: d.vehicle,
            capabilities: d.capabilities,
            order_id: d.order_id,
            reserved_until: d.reserved_until,
        }
    }
}

/// Why an update was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NotApplied {
    /// Older than the driver's last applied fix.
    Stale,
}

/// Response of `PUT /v1/drivers/{driver_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DriverPutOut {
    /// The driver as it now is.
    pub driver: DriverOut,
    /// Whether the update was applied (false: it was stale).
    pub applied: bool,
    /// `stale` when not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<NotApplied>,
}

/// Response of `POST /v1/drivers/{driver_id}/location`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LocationOut {
    /// Whether the update was applied.
    pub applied: bool,
    /// `stale` when not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<NotApplied>,
}

/// A rejected item of a batch or stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Rejected {
    /// Position of the item (0-based).
    pub index: usize,
    /// Why it was rejected.
    pub error: ErrorDetail,
}

/// Response of `POST /v1/locations` and ack frame of the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BatchTally {
    /// Items applied.
    pub applied: usize,
    /// Items older than the driver's last update (ignored).
    pub stale: usize,
    /// Items rejected, with the reason.
    pub rejected: Vec<Rejected>,
}

impl BatchTally {
    /// Records item `index` as rejected with `error`.
    pub fn reject(&mut self, index: usize, error: &ApiError) {
        self.rejected.push(Rejected {
            index,
            error: error.detail(),
        });
    }
}

// Ids and times are written straight into the JSON, without a `String`
// each: a response holds up to 100 drivers.
/// One driver of a nearest result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NeighborOut {
    /// Id.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub driver_id: DriverId,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Great-circle distance from the query point, metres.
    pub distance_m: f64,
    /// Vehicle class.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub vehicle: Vehicle,
    /// Last fix time (RFC 3339).
    #[serde(with = "ts")]
    #[schema(value_type = String)]
    pub ts: Timestamp,
}

impl NeighborOut {
    /// The engine's neighbour (capabilities are not on the wire: none).
    ///
    /// # Errors
    /// `invalid_position` for a position out of range.
    pub fn into_neighbor(self) -> Result<Neighbor, ApiError> {
        Ok(Neighbor {
            id: self.driver_id,
            pos: LatLon {
                lat: self.lat,
                lon: self.lon,
            }
            .parse()?,
            distance_m: self.distance_m,
            vehicle: self.vehicle,
            capabilities: Capabilities::NONE,
            ts: self.ts,
        })
    }
}

impl From<Neighbor> for NeighborOut {
    fn from(n: Neighbor) -> Self {
        Self {
            driver_id: n.id,
            lat: n.pos.lat(),
            lon: n.pos.lon(),
            distance_m: n.distance_m,
            vehicle: n.vehicle,
            ts: n.ts,
        }
    }
}

/// Response of `GET /v1/drivers/nearest`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NearestOut {
    /// Nearest first.
    pub drivers: Vec<NeighborOut>,
}

impl NearestOut {
    /// The JSON of a nearest answer, byte for byte what `serde_json` writes
    /// for a `NearestOut` (a property test checks it), written directly:
    /// the keys are literals and the ids, vehicles and times need no
    /// escaping (ids are `[A-Za-z0-9_.:-]`), so only the numbers go
    /// through `serde_json`. Through the derived `Serialize` this was ~3k
    /// instructions per driver, a quarter of a k = 10 request (callgrind).
    pub fn json(found: &[Neighbor]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + found.len() * 150);
        out.extend_from_slice(b"{\"drivers\":[");
        for (i, n) in found.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"driver_id\":\"");
            out.extend_from_slice(n.id.as_str().as_bytes());
            out.extend_from_slice(b"\",\"lat\":");
            number(&mut out, n.pos.lat());
            out.extend_from_slice(b",\"lon\":");
            number(&mut out, n.pos.lon());
            out.extend_from_slice(b",\"distance_m\":");
            number(&mut out, n.distance_m);
            out.extend_from_slice(b",\"vehicle\":\"");
            out.extend_from_slice(n.vehicle.as_str().as_bytes());
            out.extend_from_slice(b"\",\"ts\":");
            match n.ts.rfc3339() {
                Some(text) => {
                    out.push(b'"');
                    out.extend_from_slice(text.as_str().as_bytes());
                    out.push(b'"');
                }
                None => string(&mut out, &n.ts.to_string()),
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }
}

/// Appends a number as `serde_json` writes it.
fn number(out: &mut Vec<u8>, x: f64) {
    // Writing to a Vec cannot fail, and an f64 always serialises.
    let _ = serde_json::to_writer(&mut *out, &x);
}

/// Appends a string as `serde_json` writes it (quoted, escaped).
fn string(out: &mut Vec<u8>, text: &str) {
    let _ = serde_json::to_writer(&mut *out, text);
}

/// An order: body of `POST /v1/matches` and item of a batch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderIn {
    /// The order id (idempotency key).
    pub order_id: String,
    /// Where to pick up.
    #[serde(deserialize_with = "object")]
    pub pickup: LatLon,
    /// Required vehicle class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<String>,
    /// Required capabilities.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// Search radius in metres.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub radius_m: Option<f64>,
    /// How long to hold the driver, ms (default 30 000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_ms: Option<u64>,
    /// Only drivers in this region (a service area, `GET /v1/regions`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

impl OrderIn {
    /// The validated order.
    ///
    /// # Errors
    /// The first invalid field's error.
    pub fn parse(self) -> ApiResult<BatchOrder> {
        let order_id = OrderId::new(&self.order_id)?;
        let mut request = ClaimRequest::new(self.pickup.parse()?);
        request.vehicle = parse_vehicle(self.vehicle.as_deref())?;
        request.capabilities = parse_caps(self.capabilities.as_deref())?.unwrap_or_default();
        request.radius_m = self.radius_m;
        if let Some(h) = self.hold_ms {
            request.hold_ms = h;
        }
        Ok(BatchOrder { order_id, request })
    }
}

/// A match as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MatchOut {
    /// The order.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub order_id: OrderId,
    /// The driver.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub driver_id: DriverId,
    /// Driver to pickup at reservation, metres.
    pub distance_m: f64,
    /// `reserved`, `confirmed`, `released`, `expired` or `completed`.
    #[serde(with = "named")]
    #[schema(value_type = String)]
    pub state: MatchState,
    /// When an unconfirmed reservation lapses (RFC 3339).
    #[serde(with = "ts")]
    #[schema(value_type = String)]
    pub reserved_until: Timestamp,
    /// The region that owns the pickup.
    pub region: String,
    /// When the match was made (RFC 3339).
    #[serde(with = "ts")]
    #[schema(value_type = String)]
    pub created_at: Timestamp,
    /// The order's pickup.
    #[serde(deserialize_with = "object")]
    pub pickup: LatLon,
    /// When it ended (RFC 3339).
    #[serde(default, with = "opt_ts", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ended_at: Option<Timestamp>,
    /// Why it was released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<Match> for MatchOut {
    fn from(m: Match) -> Self {
        Self {
            order_id: m.order_id,
            driver_id: m.driver_id,
            distance_m: m.distance_m,
            state: m.state,
            reserved_until: m.reserved_until,
            region: DEFAULT_REGION.to_owned(),
            created_at: m.created_at,
            pickup: m.pickup.into(),
            ended_at: m.ended_at,
            reason: m.reason,
        }
    }
}

impl From<&BatchOrder> for OrderIn {
    fn from(o: &BatchOrder) -> Self {
        let r = &o.request;
        let caps: Vec<String> = r.capabilities.names().map(str::to_owned).collect();
        Self {
            order_id: o.order_id.to_string(),
            pickup: r.pickup.into(),
            vehicle: r.vehicle.map(|v| v.as_str().to_owned()),
            capabilities: (!caps.is_empty()).then_some(caps),
            radius_m: r.radius_m,
            hold_ms: Some(r.hold_ms),
            region: None,
        }
    }
}

impl MatchOut {
    /// The engine's match (the region is the server's annotation).
    ///
    /// # Errors
    /// `invalid_position` for a pickup out of range.
    pub fn into_match(self) -> ApiResult<Match> {
        Ok(Match {
            order_id: self.order_id,
            driver_id: self.driver_id,
            pickup: self.pickup.parse()?,
            distance_m: self.distance_m,
            state: self.state,
            created_at: self.created_at,
            reserved_until: self.reserved_until,
            ended_at: self.ended_at,
            reason: self.reason,
        })
    }
}

/// Body of `POST /v1/matches/{order_id}/release`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseIn {
    /// Free-text reason, kept on the match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Body of `POST /v1/matches/batch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchIn {
    /// The orders of the window.
    #[serde(deserialize_with = "objects")]
    pub orders: Vec<OrderIn>,
    /// Only `total_distance` is supported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
    /// How many of its own nearest eligible drivers each order sees at
    /// first, 1..=100 (default 16). Each order also gets a private
    /// candidate no earlier order has, and orders left unserved see more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub candidates: Option<usize>,
}

/// Response of `POST /v1/matches/batch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchOut {
    /// One match per served order.
    pub matches: Vec<MatchOut>,
    /// Orders that could not be served.
    pub unmatched: Vec<String>,
}

/// One region of `GET /v1/regions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegionOut {
    /// Region id.
    pub region: String,
    /// The region's name (from the `GeoJSON` file), if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Partition cells holding drivers.
    pub cells: usize,
    /// Drivers in the region.
    pub drivers: usize,
    /// Owning node.
    pub owner: String,
}

/// A region's entry in the cluster map.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegionOwner {
    /// Region id.
    pub region: String,
    /// Owning node.
    pub owner: String,
    /// Lease epoch (fencing token).
    pub epoch: u64,
}

/// Response of `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClusterOut {
    /// This node.
    pub node_id: String,
    /// Version of the region → node map.
    pub map_version: u64,
    /// Who owns what.
    pub regions: Vec<RegionOwner>,
    /// Every node and its URL (cluster mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeOut>,
    /// Regions this node serves now, under a live lease (cluster mode).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serving: Vec<String>,
    /// The same regions with the epoch of the lease this node holds
    /// (cluster mode): two nodes never hold one epoch of a region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<RegionOwner>,
}

/// A node of `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NodeOut {
    /// Its id.
    pub node_id: String,
    /// Where it listens.
    pub url: String,
}

/// Body of `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReadyOut {
    /// `ready`, `not_ready` or `degraded`.
    pub status: ReadyStatus,
    /// `up`, `down` or `disabled` (memory only).
    pub redis: RedisStatus,
    /// Why it is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the last good snapshot (with Redis, once one was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_snapshot_age_s: Option<f64>,
    /// Snapshots that failed since the last good one (with Redis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_failures: Option<u32>,
    /// Durable match writes that failed since the last good one (with Redis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_failures: Option<u32>,
}

/// Readiness of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyStatus {
    /// Serving.
    Ready,
    /// Start-up is not finished.
    NotReady,
    /// Serving from memory while Redis is unreachable.
    Degraded,
}

/// Redis as a node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedisStatus {
    /// Reachable.
    Up,
    /// Configured but unreachable.
    Down,
    /// Not configured: memory only.
    Disabled,
}

/// An order as one node sends it to another: validated, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerOrder {
    /// The order id.
    #[serde(with = "text")]
    pub order_id: OrderId,
    /// Where to pick up.
    #[serde(deserialize_with = "object")]
    pub pickup: LatLon,
    /// Required vehicle class.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<Vehicle>,
    /// Required capabilities.
    #[serde(with = "caps")]
    pub capabilities: Capabilities,
    /// Search radius in metres.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_m: Option<f64>,
    /// How long to hold the driver, ms.
    pub hold_ms: u64,
}

impl From<&BatchOrder> for PeerOrder {
    fn from(o: &BatchOrder) -> Self {
        let r = &o.request;
        Self {
            order_id: o.order_id.clone(),
            pickup: r.pickup.into(),
            vehicle: r.vehicle,
            capabilities: r.capabilities,
            radius_m: r.radius_m,
            hold_ms: r.hold_ms,
        }
    }
}

impl PeerOrder {
    /// The engine's order.
    ///
    /// # Errors
    /// `invalid_position` for a pickup out of range (never sent by a node).
    pub fn into_order(self) -> ApiResult<BatchOrder> {
        let mut request = ClaimRequest::new(self.pickup.parse()?);
        request.vehicle = self.vehicle;
        request.capabilities = self.capabilities;
        request.radius_m = self.radius_m;
        request.hold_ms = self.hold_ms;
        Ok(BatchOrder {
            order_id: self.order_id,
            request,
        })
    }
}

/// Body of the node-only reserve call: reserve `driver_id` (or, when
/// `None`, the nearest eligible driver this node holds) for `order`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// The driver the asking node's search chose; `None`: this node's
    /// own nearest.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub driver_id: Option<DriverId>,
    /// The order.
    pub order: PeerOrder,
}

/// Answer of the node-only reserve call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reserved {
    /// The match.
    #[serde(rename = "match")]
    pub m: MatchOut,
    /// Whether it was made now (false: the order already had it).
    pub created: bool,
}

/// Body of the node-only handoff call: the drivers now reporting from the
/// asking node's regions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffRequest {
    /// Their ids.
    pub driver_ids: Vec<String>,
    /// When the asker stops waiting (Unix ms): a node that reads the
    /// request later (it was paused) hands nothing over, since the asker
    /// no longer takes the drivers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
}

/// Answer of the handoff call: the drivers the answering node held. It
/// no longer offers them (a driver in a match stays there, held, until
/// the match ends).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HandoffAnswer {
    /// The drivers as they were there.
    pub drivers: Vec<DriverOut>,
}

impl DriverOut {
    /// The update that recreates this driver on another node. A driver
    /// that its old node keeps for a match is busy on the new one until
    /// the match ends, so it is never offered twice.
    ///
    /// # Errors
    /// `invalid_position` for a position out of range.
    pub fn handed_over(&self) -> ApiResult<DriverUpdate> {
        let status = match self.status {
            Status::Reserved => Status::Busy,
            s => s,
        };
        Ok(DriverUpdate {
            id: self.driver_id.clone(),
            pos: LatLon {
                lat: self.lat,
                lon: self.lon,
            }
            .parse()?,
            ts: Some(self.ts),
            status: Some(status),
            vehicle: Some(self.vehicle),
            capabilities: Some(self.capabilities),
        })
    }
}

/// A validated location update as one node sends it to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerUpdate {
    /// The driver.
    #[serde(with = "text")]
    pub driver_id: DriverId,
    /// Position.
    pub pos: LatLon,
    /// Time of the fix; `None`: the applying node's now.
    #[serde(default, with = "opt_ts", skip_serializing_if = "Option::is_none")]
    pub ts: Option<Timestamp>,
    /// New status.
    #[serde(default, with = "opt_named", skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// New vehicle class.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<Vehicle>,
    /// New capabilities.
    #[serde(default, with = "opt_caps", skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
}

impl From<&DriverUpdate> for PeerUpdate {
    fn from(u: &DriverUpdate) -> Self {
        Self {
            driver_id: u.id.clone(),
            pos: u.pos.into(),
            ts: u.ts,
            status: u.status,
            vehicle: u.vehicle,
            capabilities: u.capabilities,
        }
    }
}

impl PeerUpdate {
    /// The engine's update.
    ///
    /// # Errors
    /// `invalid_position` (never sent by a node).
    pub fn into_update(self) -> ApiResult<DriverUpdate> {
        Ok(DriverUpdate {
            id: self.driver_id,
            pos: self.pos.parse()?,
            ts: self.ts,
            status: self.status,
            vehicle: self.vehicle,
            capabilities: self.capabilities,
        })
    }
}

/// Body of the node-only locations call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerUpdates {
    /// The updates, in order.
    pub updates: Vec<PeerUpdate>,
}

/// [`named`] for optional values.
mod opt_named {
    use super::{Deserialize, Deserializer, Named, Serializer};

    // serde hands `serialize_with` functions a reference.
    #[allow(clippy::ref_option)]
    pub(super) fn serialize<T: Named, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::named::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, T: Named, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        let raw = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        raw.map(|raw| T::from_name(&raw))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

/// [`caps`] for optional values.
mod opt_caps {
    use super::{Capabilities, Deserialize, Deserializer, Serializer};

    // serde hands `serialize_with` functions a reference.
    #[allow(clippy::ref_option, clippy::trivially_copy_pass_by_ref)]
    pub(super) fn serialize<S: Serializer>(
        c: &Option<Capabilities>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match c {
            Some(c) => super::caps::serialize(c, s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Capabilities>, D::Error> {
        let names = <Option<Vec<std::borrow::Cow<'de, str>>>>::deserialize(d)?;
        names
            .map(|n| Capabilities::from_names(n.iter().map(AsRef::as_ref)))
            .transpose()
            .map_err(serde::de::Error::custom)
    }
}

/// The kind of an event: its `type` on every feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum EventType {
    /// A driver was reserved for an order.
    #[serde(rename = "match.reserved")]
    MatchReserved,
    /// A reservation was confirmed: the driver is busy with the order.
    #[serde(rename = "match.confirmed")]
    MatchConfirmed,
    /// A match was released (by the client, or by the driver going
    /// offline, busy or away).
    #[serde(rename = "match.released")]
    MatchReleased,
    /// A reservation lapsed unconfirmed.
    #[serde(rename = "match.expired")]
    MatchExpired,
    /// A confirmed match was completed.
    #[serde(rename = "match.completed")]
    MatchCompleted,
    /// A driver silent past the TTL was removed.
    #[serde(rename = "driver.expired")]
    DriverExpired,
    /// A driver's status changed.
    #[serde(rename = "driver.status")]
    DriverStatus,
    /// A driver entered a zone.
    #[serde(rename = "driver.entered")]
    DriverEntered,
    /// A driver left a zone.
    #[serde(rename = "driver.left")]
    DriverLeft,
}

impl EventType {
    /// Every event type.
    pub const ALL: [Self; 9] = [
        Self::MatchReserved,
        Self::MatchConfirmed,
        Self::MatchReleased,
        Self::MatchExpired,
        Self::MatchCompleted,
        Self::DriverExpired,
        Self::DriverStatus,
        Self::DriverEntered,
        Self::DriverLeft,
    ];

    /// Its name on the wire (`match.reserved`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MatchReserved => "match.reserved",
            Self::MatchConfirmed => "match.confirmed",
            Self::MatchReleased => "match.released",
            Self::MatchExpired => "match.expired",
            Self::MatchCompleted => "match.completed",
            Self::DriverExpired => "driver.expired",
            Self::DriverStatus => "driver.status",
            Self::DriverEntered => "driver.entered",
            Self::DriverLeft => "driver.left",
        }
    }

    /// The event type that announces a match now in `state`.
    pub const fn of_match(state: MatchState) -> Self {
        match state {
            MatchState::Reserved => Self::MatchReserved,
            MatchState::Confirmed => Self::MatchConfirmed,
            MatchState::Released => Self::MatchReleased,
            MatchState::Expired => Self::MatchExpired,
            MatchState::Completed => Self::MatchCompleted,
        }
    }
}

impl Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Payload of `driver.status`: a driver's status changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DriverStatusChange {
    /// The driver.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub driver_id: DriverId,
    /// The status before the change.
    #[serde(with = "named")]
    #[schema(value_type = String)]
    pub previous: Status,
    /// The status now: `available`, `reserved`, `busy` or `offline`.
    #[serde(with = "named")]
    #[schema(value_type = String)]
    pub status: Status,
    /// The order the driver is reserved for or busy with now, if any.
    #[serde(default, with = "opt_text", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub order_id: Option<OrderId>,
}

/// What a zone is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ZoneKind {
    /// A region of the region map (`--regions`).
    Region,
    /// A named zone of the zone file (`--zones`).
    Zone,
}

/// Payload of `driver.entered` and `driver.left`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ZoneCrossing {
    /// The driver.
    #[serde(with = "text")]
    #[schema(value_type = String)]
    pub driver_id: DriverId,
    /// The zone's id: a region id, or the zone file's feature id.
    pub zone: String,
    /// The zone's `name` property (empty when it has none).
    pub name: String,
    /// A region or a named zone.
    pub kind: ZoneKind,
    /// Where the driver is now (for `driver.left` after a removal: where
    /// it was last).
    #[serde(deserialize_with = "object")]
    pub position: LatLon,
}

/// An event's typed payload, under `data`, named by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", content = "data")]
pub enum EventData {
    /// A driver was reserved for an order: the match.
    #[serde(rename = "match.reserved")]
    MatchReserved(MatchOut),
    /// A reservation was confirmed: the match.
    #[serde(rename = "match.confirmed")]
    MatchConfirmed(MatchOut),
    /// A match was released: the match, with its `reason`.
    #[serde(rename = "match.released")]
    MatchReleased(MatchOut),
    /// A reservation lapsed unconfirmed: the match.
    #[serde(rename = "match.expired")]
    MatchExpired(MatchOut),
    /// A confirmed match was completed: the match.
    #[serde(rename = "match.completed")]
    MatchCompleted(MatchOut),
    /// A driver silent past the TTL was removed: the driver as it was.
    #[serde(rename = "driver.expired")]
    DriverExpired(DriverOut),
    /// A driver's status changed.
    #[serde(rename = "driver.status")]
    DriverStatus(DriverStatusChange),
    /// A driver entered a zone.
    #[serde(rename = "driver.entered")]
    DriverEntered(ZoneCrossing),
    /// A driver left a zone.
    #[serde(rename = "driver.left")]
    DriverLeft(ZoneCrossing),
}

impl EventData {
    /// The event of a match as it now is (`match.<state>`).
    pub fn of_match(m: MatchOut) -> Self {
        match m.state {
            MatchState::Reserved => Self::MatchReserved(m),
            MatchState::Confirmed => Self::MatchConfirmed(m),
            MatchState::Released => Self::MatchReleased(m),
            MatchState::Expired => Self::MatchExpired(m),
            MatchState::Completed => Self::MatchCompleted(m),
        }
    }

    /// Its type.
    pub const fn event_type(&self) -> EventType {
        match self {
            Self::MatchReserved(_) => EventType::MatchReserved,
            Self::MatchConfirmed(_) => EventType::MatchConfirmed,
            Self::MatchReleased(_) => EventType::MatchReleased,
            Self::MatchExpired(_) => EventType::MatchExpired,
            Self::MatchCompleted(_) => EventType::MatchCompleted,
            Self::DriverExpired(_) => EventType::DriverExpired,
            Self::DriverStatus(_) => EventType::DriverStatus,
            Self::DriverEntered(_) => EventType::DriverEntered,
            Self::DriverLeft(_) => EventType::DriverLeft,
        }
    }
}

/// One event, as every feed carries it (the SSE `data`, a Redis stream
/// entry's `event` field, an item of a webhook's body):
/// `{"id", "node", "time", "type", "data"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Orders the events of the node that emitted it: 1, 2, … from the
    /// node's start, without gaps.
    pub id: u64,
    /// The node that emitted it.
    pub node: String,
    /// When it happened (RFC 3339, the server's clock).
    #[serde(with = "ts")]
    #[schema(value_type = String)]
    pub time: Timestamp,
    /// The type (`type`) and its payload (`data`).
    #[serde(flatten)]
    pub data: EventData,
}

/// Sent on the SSE feed (`event: gap`) when events the client asked for
/// are no longer held: they are lost to it. The feed goes on from
/// `first_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventGap {
    /// The last event id the client had (its `Last-Event-ID`, or the last
    /// one sent on this connection).
    pub last_event_id: u64,
    /// The oldest event still held, from which the feed goes on.
    pub first_id: u64,
}

/// An event as the bus holds it: shared by every consumer, its JSON
/// written once, by the first that needs it.
#[derive(Debug)]
pub struct SharedEvent {
    /// The event.
    pub event: Event,
    json: std::sync::OnceLock<Box<str>>,
}

impl SharedEvent {
    /// Wraps `event`.
    pub fn new(event: Event) -> Self {
        Self {
            event,
            json: std::sync::OnceLock::new(),
        }
    }

    /// The event as JSON (the shape of [`Event`]).
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| {
            // Serialising a struct of strings and numbers cannot fail.
            serde_json::to_string(&self.event)
                .unwrap_or_default()
                .into_boxed_str()
        })
    }

    /// The event's type.
    pub fn event_type(&self) -> EventType {
        self.event.data.event_type()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn neighbor() -> impl Strategy<Value = Neighbor> {
        (
            "[A-Za-z0-9_.:-]{1,64}",
            -90.0..=90.0_f64,
            -180.0..=180.0_f64,
            prop_oneof![Just(0.0), 0.0..1.0_f64, 0.0..2.1e7_f64],
            0..Vehicle::ALL.len(),
            prop_oneof![0..=4_102_444_800_000_i64, 0..=253_402_300_799_999_i64],
        )
            .prop_map(|(id, lat, lon, distance_m, v, ts)| Neighbor {
                id: DriverId::new(&id).unwrap(),
                pos: Position::new(lat, lon).unwrap(),
                distance_m,
                vehicle: Vehicle::ALL[v],
                capabilities: Capabilities::NONE,
                ts: Timestamp::from_millis(ts).unwrap(),
            })
    }

    proptest! {
        /// The hand-written nearest body is exactly `serde_json`'s.
        #[test]
        fn nearest_json_is_serde_json(found in prop::collection::vec(neighbor(), 0..12)) {
            let derived = serde_json::to_vec(&NearestOut {
                drivers: found.iter().cloned().map(Into::into).collect(),
            })
            .unwrap();
            prop_assert_eq!(
                String::from_utf8(NearestOut::json(&found)).unwrap(),
                String::from_utf8(derived).unwrap()
            );
        }
    }
}

/// An area query: exactly one of `bbox`, `region` or `geometry`, with
/// filters and a page. The body of `POST /v1/drivers/within` (and of the
/// node-only area call); `GET /v1/drivers` reads the same fields from its
/// query string.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AreaIn {
    /// `[west, south, east, north]` in degrees, edges included; west > east
    /// crosses the antimeridian.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!([-87.70, 41.85, -87.60, 41.92]))]
    pub bbox: Option<[f64; 4]>,
    /// A region id (`GET /v1/regions`): the drivers in its cells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A `GeoJSON` `Polygon` or `MultiPolygon` (or a `Feature` holding
    /// one), edges straight in longitude/latitude, holes excluded, edges
    /// and vertices included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, example = json!({"type": "Polygon", "coordinates": [[[-87.70, 41.85], [-87.60, 41.85], [-87.65, 41.92], [-87.70, 41.85]]]}))]
    pub geometry: Option<serde_json::Value>,
    /// Only these statuses (default: every status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(["available", "reserved"]))]
    pub status: Option<Vec<String>>,
    /// Only this vehicle class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vehicle: Option<String>,
    /// Only drivers having all of these capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// Page size, 1..=10000 (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10000, example = 500)]
    pub limit: Option<usize>,
    /// The previous page's `next_cursor`: the page starts after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Statuses by name, for an area query (`reserved` included).
///
/// # Errors
/// `invalid_parameter` naming an unknown status.
pub fn parse_statuses(names: Option<&[String]>) -> ApiResult<StatusSet> {
    let Some(names) = names else {
        return Ok(StatusSet::ALL);
    };
    let statuses = names
        .iter()
        .map(|n| match n.trim() {
            "reserved" => Ok(Status::Reserved),
            other => other.parse::<Status>().map_err(|_| {
                ApiError::invalid_parameter(format!(
                    "status {other:?} is not one of available, reserved, busy, offline"
                ))
            }),
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(StatusSet::of(statuses))
}

/// One page of drivers inside an area, by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AreaOut {
    /// The drivers, by `driver_id`.
    pub drivers: Vec<DriverOut>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Drivers by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CountsOut {
    /// Available drivers.
    pub available: usize,
    /// Reserved drivers.
    pub reserved: usize,
    /// Busy drivers.
    pub busy: usize,
    /// Offline drivers.
    pub offline: usize,
    /// All of them.
    pub total: usize,
}

impl From<StatusCounts> for CountsOut {
    fn from(c: StatusCounts) -> Self {
        Self {
            available: c.available,
            reserved: c.reserved,
            busy: c.busy,
            offline: c.offline,
            total: c.total(),
        }
    }
}

impl CountsOut {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Self) {
        self.available += other.available;
        self.reserved += other.reserved;
        self.busy += other.busy;
        self.offline += other.offline;
        self.total += other.total;
    }
}

/// Response of `GET /v1/regions/{region}/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegionStatsOut {
    /// Region id.
    pub region: String,
    /// The region's name (from the `GeoJSON` file), if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The node that owns it (this node's id outside a cluster).
    pub owner: String,
    /// Partition cells in the region.
    pub cells: usize,
    /// Its drivers by status.
    pub drivers: CountsOut,
}

/// One H3 cell of a density answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DensityCell {
    /// The H3 cell index (hexadecimal).
    #[schema(example = "882664c1e5fffff")]
    pub cell: String,
    /// Latitude of its centre.
    pub lat: f64,
    /// Longitude of its centre.
    pub lon: f64,
    /// Its drivers inside the box, by status.
    #[serde(flatten)]
    pub drivers: CountsOut,
}

/// Response of `GET /v1/density`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DensityOut {
    /// The H3 resolution of the cells.
    pub res: u8,
    /// The cells holding drivers inside the box, by cell index.
    pub cells: Vec<DensityCell>,
}

/// Body of the node-only density call: the box and the resolution of
/// `GET /v1/density`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DensityIn {
    /// `[west, south, east, north]`.
    pub bbox: [f64; 4],
    /// The H3 resolution.
    pub res: u8,
}
