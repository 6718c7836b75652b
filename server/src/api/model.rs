//! The JSON shapes of API.md, with their conversions to and from engine
//! types. Validation happens here: a request that fails to convert is
//! rejected before it reaches the engine, so it changes nothing.

use hexmatch::{
    BatchOrder, Capabilities, ClaimRequest, Driver, DriverId, DriverUpdate, Match, Neighbor,
    OrderId, Position, Status, Timestamp, Vehicle,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};

/// The one region until regions are built (issue 7).
pub(crate) const DEFAULT_REGION: &str = "default";

/// A timestamp in a request: RFC 3339 text or integer Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum TsIn {
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
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
pub(crate) struct LatLon {
    /// Latitude, degrees in [-90, 90].
    pub(crate) lat: f64,
    /// Longitude, degrees in [-180, 180].
    pub(crate) lon: f64,
}

impl LatLon {
    fn parse(self) -> ApiResult<Position> {
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

pub(crate) fn parse_vehicle(v: Option<&str>) -> ApiResult<Option<Vehicle>> {
    v.map(str::parse).transpose().map_err(ApiError::from)
}

pub(crate) fn parse_caps(c: Option<&[String]>) -> ApiResult<Option<Capabilities>> {
    c.map(|names| Capabilities::from_names(names.iter().map(String::as_str)))
        .transpose()
        .map_err(ApiError::from)
}

pub(crate) fn parse_status(s: Option<&str>) -> ApiResult<Option<Status>> {
    match s {
        Some("reserved") => Err(ApiError::invalid_parameter(
            "status reserved is set by matching, not by clients",
        )),
        other => other.map(str::parse).transpose().map_err(ApiError::from),
    }
}

/// Body of `PUT /v1/drivers/{driver_id}`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DriverPut {
    /// Latitude.
    pub(crate) lat: f64,
    /// Longitude.
    pub(crate) lon: f64,
    /// Time of the fix; missing = now.
    pub(crate) ts: Option<TsIn>,
    /// `available`, `busy` or `offline`.
    pub(crate) status: Option<String>,
    /// `car`, `bike`, `scooter`, `van`, `truck` or `walker`.
    pub(crate) vehicle: Option<String>,
    /// Capability names, e.g. `["cash", "large_items"]`.
    pub(crate) capabilities: Option<Vec<String>>,
}

impl DriverPut {
    pub(crate) fn into_update(self, id: DriverId) -> ApiResult<DriverUpdate> {
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
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LocationIn {
    /// Latitude.
    pub(crate) lat: f64,
    /// Longitude.
    pub(crate) lon: f64,
    /// Time of the fix; missing = now.
    pub(crate) ts: Option<TsIn>,
}

impl LocationIn {
    pub(crate) fn into_update(self, id: DriverId) -> ApiResult<DriverUpdate> {
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
pub(crate) struct LocationItem {
    /// The driver (created if unknown).
    pub(crate) driver_id: String,
    /// Latitude.
    pub(crate) lat: f64,
    /// Longitude.
    pub(crate) lon: f64,
    /// Time of the fix; missing = now.
    pub(crate) ts: Option<TsIn>,
    /// Optional status.
    pub(crate) status: Option<String>,
    /// Optional vehicle class.
    pub(crate) vehicle: Option<String>,
    /// Optional capabilities.
    pub(crate) capabilities: Option<Vec<String>>,
}

impl LocationItem {
    /// Builds an item from a Redis stream entry's string fields, with the
    /// same names and rules as the JSON body (an unknown field is an error,
    /// as `deny_unknown_fields` makes it over HTTP).
    pub(crate) fn from_stream_fields(fields: &[(String, String)]) -> ApiResult<Self> {
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
        for (name, raw) in fields {
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

    pub(crate) fn into_update(self) -> ApiResult<DriverUpdate> {
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

/// A driver as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct DriverOut {
    /// Id.
    pub(crate) driver_id: String,
    /// Latitude.
    pub(crate) lat: f64,
    /// Longitude.
    pub(crate) lon: f64,
    /// Last applied fix time (RFC 3339).
    pub(crate) ts: String,
    /// `available`, `reserved`, `busy` or `offline`.
    pub(crate) status: &'static str,
    /// Vehicle class.
    pub(crate) vehicle: &'static str,
    /// Capability names.
    pub(crate) capabilities: Vec<&'static str>,
    /// The order it is reserved for or busy with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) order_id: Option<String>,
    /// When its reservation lapses (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reserved_until: Option<String>,
}

impl From<Driver> for DriverOut {
    fn from(d: Driver) -> Self {
        Self {
            driver_id: d.id.to_string(),
            lat: d.pos.lat(),
            lon: d.pos.lon(),
            ts: d.ts.to_string(),
            status: d.status.as_str(),
            vehicle: d.vehicle.as_str(),
            capabilities: d.capabilities.names().collect(),
            order_id: d.order_id.map(|o| o.to_string()),
            reserved_until: d.reserved_until.map(|t| t.to_string()),
        }
    }
}

/// Response of `PUT /v1/drivers/{driver_id}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DriverPutOut {
    /// The driver as it now is.
    pub(crate) driver: DriverOut,
    /// Whether the update was applied (false: it was stale).
    pub(crate) applied: bool,
    /// `stale` when not applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'static str>,
}

/// Response of `POST /v1/drivers/{driver_id}/location`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LocationOut {
    /// Whether the update was applied.
    pub(crate) applied: bool,
    /// `stale` when not applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'static str>,
}

/// A rejected item of a batch or stream.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct Rejected {
    /// Position of the item (0-based).
    pub(crate) index: usize,
    /// Why it was rejected.
    pub(crate) error: super::error::ErrorDetail,
}

/// Response of `POST /v1/locations` and ack frame of the stream.
#[derive(Debug, Default, Serialize, ToSchema)]
pub(crate) struct BatchTally {
    /// Items applied.
    pub(crate) applied: usize,
    /// Items older than the driver's last update (ignored).
    pub(crate) stale: usize,
    /// Items rejected, with the reason.
    pub(crate) rejected: Vec<Rejected>,
}

impl BatchTally {
    /// Records item `index` as rejected.
    pub(crate) fn reject(&mut self, index: usize, code: &'static str, message: String) {
        self.rejected.push(Rejected {
            index,
            error: super::error::ErrorDetail { code, message },
        });
    }
}

// Ids and times are written straight into the JSON, without a `String`
// each: a response holds up to 100 drivers.
/// One driver of a nearest result.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NeighborOut {
    /// Id.
    #[serde(serialize_with = "id_str")]
    #[schema(value_type = String)]
    pub(crate) driver_id: DriverId,
    /// Latitude.
    pub(crate) lat: f64,
    /// Longitude.
    pub(crate) lon: f64,
    /// Great-circle distance from the query point, metres.
    pub(crate) distance_m: f64,
    /// Vehicle class.
    pub(crate) vehicle: &'static str,
    /// Last fix time (RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String)]
    pub(crate) ts: Timestamp,
}

fn id_str<S: serde::Serializer>(id: &DriverId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(id.as_str())
}

// serde hands `serialize_with` functions a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn rfc3339<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    match t.rfc3339() {
        Some(text) => s.serialize_str(text.as_str()),
        None => s.collect_str(t),
    }
}

impl From<Neighbor> for NeighborOut {
    fn from(n: Neighbor) -> Self {
        Self {
            driver_id: n.id,
            lat: n.pos.lat(),
            lon: n.pos.lon(),
            distance_m: n.distance_m,
            vehicle: n.vehicle.as_str(),
            ts: n.ts,
        }
    }
}

/// Response of `GET /v1/drivers/nearest`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NearestOut {
    /// Nearest first.
    pub(crate) drivers: Vec<NeighborOut>,
}

impl NearestOut {
    /// The JSON of a nearest answer, byte for byte what `serde_json` writes
    /// for a `NearestOut` (a property test checks it), written directly:
    /// the keys are literals and the ids, vehicles and times need no
    /// escaping (ids are `[A-Za-z0-9_.:-]`), so only the numbers go
    /// through `serde_json`. Through the derived `Serialize` this was ~3k
    /// instructions per driver, a quarter of a k = 10 request (callgrind).
    pub(crate) fn json(found: &[Neighbor]) -> Vec<u8> {
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
pub(crate) struct OrderIn {
    /// The order id (idempotency key).
    pub(crate) order_id: String,
    /// Where to pick up.
    pub(crate) pickup: LatLon,
    /// Required vehicle class.
    pub(crate) vehicle: Option<String>,
    /// Required capabilities.
    pub(crate) capabilities: Option<Vec<String>>,
    /// Search radius in metres.
    pub(crate) radius_m: Option<f64>,
    /// How long to hold the driver, ms (default 30 000).
    pub(crate) hold_ms: Option<u64>,
}

impl OrderIn {
    pub(crate) fn parse(self) -> ApiResult<BatchOrder> {
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
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct MatchOut {
    /// The order.
    pub(crate) order_id: String,
    /// The driver.
    pub(crate) driver_id: String,
    /// Driver to pickup at reservation, metres.
    pub(crate) distance_m: f64,
    /// `reserved`, `confirmed`, `released`, `expired` or `completed`.
    pub(crate) state: &'static str,
    /// When an unconfirmed reservation lapses (RFC 3339).
    pub(crate) reserved_until: String,
    /// The region that owns the pickup.
    pub(crate) region: String,
    /// When the match was made (RFC 3339).
    pub(crate) created_at: String,
    /// The order's pickup.
    pub(crate) pickup: LatLon,
    /// When it ended (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ended_at: Option<String>,
    /// Why it was released.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

impl From<Match> for MatchOut {
    fn from(m: Match) -> Self {
        Self {
            order_id: m.order_id.to_string(),
            driver_id: m.driver_id.to_string(),
            distance_m: m.distance_m,
            state: m.state.as_str(),
            reserved_until: m.reserved_until.to_string(),
            region: DEFAULT_REGION.to_owned(),
            created_at: m.created_at.to_string(),
            pickup: m.pickup.into(),
            ended_at: m.ended_at.map(|t| t.to_string()),
            reason: m.reason,
        }
    }
}

/// Body of `POST /v1/matches/{order_id}/release`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReleaseIn {
    /// Free-text reason, kept on the match.
    pub(crate) reason: Option<String>,
}

/// Body of `POST /v1/matches/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchIn {
    /// The orders of the window.
    pub(crate) orders: Vec<OrderIn>,
    /// Only `total_distance` is supported.
    pub(crate) objective: Option<String>,
    /// Candidate drivers considered per order, 1..=100 (default 16).
    pub(crate) candidates: Option<usize>,
}

/// Response of `POST /v1/matches/batch`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchOut {
    /// One match per served order.
    pub(crate) matches: Vec<MatchOut>,
    /// Orders that could not be served.
    pub(crate) unmatched: Vec<String>,
}

/// One region of `GET /v1/regions`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RegionOut {
    /// Region id.
    pub(crate) region: String,
    /// The region's name (from the `GeoJSON` file), if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) name: String,
    /// Partition cells holding drivers.
    pub(crate) cells: usize,
    /// Drivers in the region.
    pub(crate) drivers: usize,
    /// Owning node.
    pub(crate) owner: String,
}

/// A region's entry in the cluster map.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RegionOwner {
    /// Region id.
    pub(crate) region: String,
    /// Owning node.
    pub(crate) owner: String,
    /// Lease epoch (fencing token).
    pub(crate) epoch: u64,
}

/// Response of `GET /v1/cluster`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ClusterOut {
    /// This node.
    pub(crate) node_id: String,
    /// Version of the region → node map.
    pub(crate) map_version: u64,
    /// Who owns what.
    pub(crate) regions: Vec<RegionOwner>,
    /// Every node and its URL (cluster mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) nodes: Vec<NodeOut>,
    /// Regions this node serves now, under a live lease (cluster mode).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) serving: Vec<String>,
}

/// A node of `GET /v1/cluster`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NodeOut {
    /// Its id.
    pub(crate) node_id: String,
    /// Where it listens.
    pub(crate) url: String,
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
