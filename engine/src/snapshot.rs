//! Snapshots: a versioned, chunked, checksummed encoding of the engine's
//! drivers, and the durable record of a match.
//!
//! # Format (version 2)
//! A snapshot is a [`Manifest`] plus chunks. Each chunk is
//! `b"HXC2" ‖ zstd(postcard(Vec<driver>))` holding at most
//! `drivers_per_chunk` drivers, so no single stored value is huge. A
//! driver records the order of its live match, if any (a cluster node
//! taking the region over must not offer a driver another node holds in
//! a match). The manifest lists every chunk's length, CRC-32 and driver
//! count; it is itself `b"HXM1" ‖ postcard(manifest) ‖ crc32 (LE)`.
//!
//! Version 1 (chunks `b"HXC1"`, drivers without their order) is still
//! read: its drivers come back with no order.
//!
//! Decoding trusts nothing: lengths, checksums, counts, magic, the
//! decompressed size (capped, so a small chunk cannot expand into
//! gigabytes) and every field (ids, positions, timestamps, enums) are
//! checked, and every failure is an [`Error::CorruptSnapshot`] naming what
//! failed — never a panic.
//! [`Engine::restore_snapshot`](crate::Engine::restore_snapshot) decodes
//! *all* chunks before loading any, so a bad snapshot is never half-loaded.

use std::borrow::Cow;

use h3o::{CellIndex, Resolution};
use serde::{Deserialize, Serialize};

use crate::area::CellSet;
use crate::driver::{Capabilities, Driver, Status, Vehicle};
use crate::error::{Error, Result};
use crate::ids::{DriverId, OrderId};
use crate::matching::{ClaimRequest, Match, MatchState};
use crate::position::Position;
use crate::time::Timestamp;

/// The format version this build writes (it also reads version 1).
pub const SNAPSHOT_FORMAT: u16 = 2;
/// Chunks of format 2: drivers with their orders.
const CHUNK_MAGIC: &[u8; 4] = b"HXC2";
/// Chunks of format 1: drivers without their orders.
const CHUNK_MAGIC_V1: &[u8; 4] = b"HXC1";
const MANIFEST_MAGIC: &[u8; 4] = b"HXM1";
const MATCH_MAGIC: &[u8; 4] = b"HXR1";
/// Upper bound on one encoded driver, for the decompression cap (two ids
/// of at most 64 bytes, and the rest).
const MAX_DRIVER_BYTES: usize = 192;
/// Most chunks a manifest may list.
const MAX_CHUNKS: usize = 1 << 20;

fn corrupt(msg: impl Into<String>) -> Error {
    Error::CorruptSnapshot(msg.into())
}

/// What a reader needs to fetch and check a snapshot's chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version ([`SNAPSHOT_FORMAT`]).
    pub format: u16,
    /// Generation number chosen by the writer (increases per snapshot).
    pub generation: u64,
    /// When the snapshot was taken (Unix ms, engine clock).
    pub taken_at_ms: i64,
    /// The engine's H3 partition resolution.
    pub resolution: u8,
    /// Total drivers in all chunks.
    pub drivers: u64,
    /// The chunks, in order.
    pub chunks: Vec<ChunkInfo>,
}

/// One chunk's length, checksum and driver count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    /// Encoded length in bytes.
    pub len: u64,
    /// CRC-32 (IEEE) of the encoded bytes.
    pub crc32: u32,
    /// Drivers in the chunk.
    pub drivers: u32,
}

/// A snapshot ready to store: the manifest and the encoded chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The manifest.
    pub manifest: Manifest,
    /// Encoded chunks, as listed in the manifest.
    pub chunks: Vec<Vec<u8>>,
}

/// A driver as stored: its own fields, then the order of its live match
/// (format 2). Postcard writes a nested struct's fields in line, so a
/// format-1 record is exactly [`DriverFields`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DriverRec<'a> {
    #[serde(borrow)]
    fields: DriverFields<'a>,
    #[serde(borrow)]
    order: Option<Cow<'a, str>>,
}

/// A stored driver's own fields: all that format 1 stored of it.
/// Decoding borrows the id from the decompressed chunk (no `String` per
/// driver); the wire format is postcard's `str` either way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DriverFields<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    lat: f64,
    lon: f64,
    ts: i64,
    status: u8,
    vehicle: u8,
    caps: u16,
}

const STATUSES: [Status; 4] = [
    Status::Available,
    Status::Reserved,
    Status::Busy,
    Status::Offline,
];

fn status_code(s: Status) -> u8 {
    STATUSES.iter().position(|x| *x == s).unwrap_or(0) as u8
}

impl DriverRec<'_> {
    fn from_driver(d: &Driver) -> Self {
        Self {
            fields: DriverFields {
                id: Cow::Owned(d.id.to_string()),
                lat: d.pos.lat(),
                lon: d.pos.lon(),
                ts: d.ts.as_millis(),
                status: status_code(d.status),
                vehicle: d.vehicle as u8,
                caps: d.capabilities.bits(),
            },
            order: d.order_id.as_ref().map(|o| Cow::Owned(o.to_string())),
        }
    }

    fn into_driver(self) -> Result<Driver> {
        let Self { fields: f, order } = self;
        let status = *STATUSES
            .get(usize::from(f.status))
            .ok_or_else(|| corrupt(format!("status code {}", f.status)))?;
        let vehicle = *Vehicle::ALL
            .get(usize::from(f.vehicle))
            .ok_or_else(|| corrupt(format!("vehicle code {}", f.vehicle)))?;
        let check = |e: Error| corrupt(format!("driver {:?}: {e}", f.id));
        Ok(Driver {
            id: DriverId::new(&f.id).map_err(check)?,
            pos: Position::new(f.lat, f.lon).map_err(check)?,
            ts: Timestamp::from_millis(f.ts).map_err(check)?,
            status,
            vehicle,
            capabilities: Capabilities::from_bits_truncate(f.caps),
            order_id: order
                .as_deref()
                .map(OrderId::new)
                .transpose()
                .map_err(check)?,
            reserved_until: None,
        })
    }
}

fn with_crc(mut bytes: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Splits `magic ‖ body ‖ crc32` after checking magic and checksum.
fn checked_body<'a>(bytes: &'a [u8], magic: [u8; 4], what: &str) -> Result<&'a [u8]> {
    if bytes.len() < 8 || bytes[..4] != magic {
        return Err(corrupt(format!(
            "{what}: bad magic or too short ({} bytes)",
            bytes.len()
        )));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err(corrupt(format!("{what}: checksum mismatch")));
    }
    Ok(&body[4..])
}

impl Manifest {
    /// Encodes the manifest with its magic and checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MANIFEST_MAGIC.to_vec();
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        with_crc(out)
    }

    /// Decodes and checks a manifest.
    ///
    /// # Errors
    /// [`Error::CorruptSnapshot`] on a bad magic, checksum, version or shape.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let body = checked_body(bytes, *MANIFEST_MAGIC, "manifest")?;
        let m: Self = postcard::from_bytes(body).map_err(|e| corrupt(format!("manifest: {e}")))?;
        if !(1..=SNAPSHOT_FORMAT).contains(&m.format) {
            return Err(corrupt(format!(
                "manifest format {} (this build reads 1 to {SNAPSHOT_FORMAT})",
                m.format
            )));
        }
        if m.chunks.len() > MAX_CHUNKS {
            return Err(corrupt(format!("manifest lists {} chunks", m.chunks.len())));
        }
        let sum: u64 = m.chunks.iter().map(|c| u64::from(c.drivers)).sum();
        if sum != m.drivers {
            return Err(corrupt(format!(
                "manifest counts {} drivers but its chunks hold {sum}",
                m.drivers
            )));
        }
        Ok(m)
    }
}

fn encode_chunk(drivers: &[DriverRec]) -> Vec<u8> {
    let raw = postcard::to_stdvec(drivers).unwrap_or_default();
    let mut out = CHUNK_MAGIC.to_vec();
    out.extend(zstd::bulk::compress(&raw, 1).unwrap_or_default());
    out
}

fn decode_chunk(i: usize, info: ChunkInfo, bytes: &[u8]) -> Result<Vec<Driver>> {
    if bytes.len() as u64 != info.len {
        return Err(corrupt(format!(
            "chunk {i}: {} bytes, manifest says {}",
            bytes.len(),
            info.len
        )));
    }
    if crc32fast::hash(bytes) != info.crc32 {
        return Err(corrupt(format!("chunk {i}: checksum mismatch")));
    }
    let v1 = match bytes.get(..4) {
        Some(m) if m == CHUNK_MAGIC => false,
        Some(m) if m == CHUNK_MAGIC_V1 => true,
        _ => return Err(corrupt(format!("chunk {i}: bad magic"))),
    };
    let cap = (info.drivers as usize)
        .saturating_mul(MAX_DRIVER_BYTES)
        .max(64);
    let raw = zstd::bulk::decompress(&bytes[4..], cap)
        .map_err(|e| corrupt(format!("chunk {i}: zstd: {e}")))?;
    let postcard_error = |e: postcard::Error| corrupt(format!("chunk {i}: {e}"));
    let recs: Vec<DriverRec> = if v1 {
        postcard::from_bytes::<Vec<DriverFields>>(&raw)
            .map_err(postcard_error)?
            .into_iter()
            .map(|fields| DriverRec {
                fields,
                order: None,
            })
            .collect()
    } else {
        postcard::from_bytes(&raw).map_err(postcard_error)?
    };
    if recs.len() != info.drivers as usize {
        return Err(corrupt(format!(
            "chunk {i}: {} drivers, manifest says {}",
            recs.len(),
            info.drivers
        )));
    }
    recs.into_iter().map(DriverRec::into_driver).collect()
}

/// Decodes and checks every chunk of a snapshot.
///
/// # Errors
/// [`Error::CorruptSnapshot`] naming the first chunk or field that fails.
pub fn decode_snapshot(manifest: &Manifest, chunks: &[impl AsRef<[u8]>]) -> Result<Vec<Driver>> {
    if chunks.len() != manifest.chunks.len() {
        return Err(corrupt(format!(
            "{} chunks, manifest lists {}",
            chunks.len(),
            manifest.chunks.len()
        )));
    }
    let jobs: Vec<(usize, ChunkInfo, &[u8])> = manifest
        .chunks
        .iter()
        .zip(chunks)
        .enumerate()
        .map(|(i, (info, bytes))| (i, *info, bytes.as_ref()))
        .collect();
    let decoded = crate::par::par_map(&jobs, 2, |(i, info, bytes)| decode_chunk(*i, *info, bytes));
    let mut out = Vec::with_capacity(usize::try_from(manifest.drivers).unwrap_or(0).min(1 << 24));
    for part in decoded {
        out.extend(part?);
    }
    Ok(out)
}

/// Where a snapshot comes from, as its manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SnapshotOrigin {
    /// Generation number chosen by the writer.
    pub(crate) generation: u64,
    /// When the snapshot was taken (Unix ms, engine clock).
    pub(crate) taken_at_ms: i64,
    /// The engine's H3 partition resolution.
    pub(crate) resolution: u8,
}

/// The drivers of a snapshot being taken, gathered one by one and
/// encoded at the end.
#[derive(Debug, Default)]
pub(crate) struct SnapshotWriter {
    recs: Vec<DriverRec<'static>>,
}

impl SnapshotWriter {
    /// Adds a driver.
    pub(crate) fn push(&mut self, d: &Driver) {
        self.recs.push(DriverRec::from_driver(d));
    }

    /// The snapshot of every driver added, in chunks of at most
    /// `drivers_per_chunk`.
    pub(crate) fn finish(self, origin: SnapshotOrigin, drivers_per_chunk: usize) -> Snapshot {
        let per = drivers_per_chunk.max(1);
        let recs = self.recs;
        let parts: Vec<&[DriverRec]> = recs.chunks(per).collect();
        let chunks: Vec<Vec<u8>> = crate::par::par_map(&parts, 2, |p| encode_chunk(p));
        let infos = recs
            .chunks(per)
            .zip(&chunks)
            .map(|(r, c)| ChunkInfo {
                len: c.len() as u64,
                crc32: crc32fast::hash(c),
                drivers: r.len() as u32,
            })
            .collect();
        Snapshot {
            manifest: Manifest {
                format: SNAPSHOT_FORMAT,
                generation: origin.generation,
                taken_at_ms: origin.taken_at_ms,
                resolution: origin.resolution,
                drivers: recs.len() as u64,
                chunks: infos,
            },
            chunks,
        }
    }
}

/// The durable record of a live match: enough to restore it, and its
/// driver, after a crash.
#[derive(Debug, Clone, PartialEq)]
pub struct DurableMatch {
    /// The match.
    pub m: Match,
    /// What the order asked for (for idempotent repeats after restore).
    pub request: ClaimRequest,
    /// Where the driver was when the match was made (to recreate a driver
    /// that is missing from an older snapshot).
    pub driver_pos: Position,
}

#[derive(Debug, Serialize, Deserialize)]
struct MatchRec {
    order_id: String,
    driver_id: String,
    pickup: (f64, f64),
    driver_pos: (f64, f64),
    distance_m: f64,
    state: u8,
    created_at: i64,
    reserved_until: i64,
    vehicle: Option<u8>,
    caps: u16,
    radius_m: Option<f64>,
    hold_ms: u64,
}

const MATCH_STATES: [MatchState; 5] = [
    MatchState::Reserved,
    MatchState::Confirmed,
    MatchState::Released,
    MatchState::Expired,
    MatchState::Completed,
];

impl DurableMatch {
    /// Encodes the record (magic, postcard, CRC-32).
    pub fn encode(&self) -> Vec<u8> {
        let rec = MatchRec {
            order_id: self.m.order_id.to_string(),
            driver_id: self.m.driver_id.to_string(),
            pickup: (self.m.pickup.lat(), self.m.pickup.lon()),
            driver_pos: (self.driver_pos.lat(), self.driver_pos.lon()),
            distance_m: self.m.distance_m,
            state: MATCH_STATES
                .iter()
                .position(|s| *s == self.m.state)
                .unwrap_or(0) as u8,
            created_at: self.m.created_at.as_millis(),
            reserved_until: self.m.reserved_until.as_millis(),
            vehicle: self.request.vehicle.map(|v| v as u8),
            caps: self.request.capabilities.bits(),
            radius_m: self.request.radius_m,
            hold_ms: self.request.hold_ms,
        };
        let mut out = MATCH_MAGIC.to_vec();
        out.extend(postcard::to_stdvec(&rec).unwrap_or_default());
        // A request narrowed to cells carries them after the record, where
        // a reader that does not know them stops reading.
        if let Some(cells) = &self.request.within {
            let raw: Vec<u64> = cells.cells().iter().map(|c| u64::from(*c)).collect();
            let within = (u8::from(cells.resolution()), raw);
            out.extend(postcard::to_stdvec(&within).unwrap_or_default());
        }
        with_crc(out)
    }

    /// Decodes and checks a record.
    ///
    /// # Errors
    /// [`Error::CorruptSnapshot`] naming what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let body = checked_body(bytes, *MATCH_MAGIC, "match record")?;
        let (r, rest): (MatchRec, &[u8]) =
            postcard::take_from_bytes(body).map_err(|e| corrupt(format!("match record: {e}")))?;
        let bad = |e: Error| corrupt(format!("match record {:?}: {e}", r.order_id));
        let state = *MATCH_STATES
            .get(usize::from(r.state))
            .ok_or_else(|| corrupt(format!("match state code {}", r.state)))?;
        let vehicle = match r.vehicle {
            Some(v) => Some(
                *Vehicle::ALL
                    .get(usize::from(v))
                    .ok_or_else(|| corrupt(format!("vehicle code {v}")))?,
            ),
            None => None,
        };
        let pickup = Position::new(r.pickup.0, r.pickup.1).map_err(bad)?;
        let within = if rest.is_empty() {
            None
        } else {
            let (res, raw): (u8, Vec<u64>) = postcard::from_bytes(rest)
                .map_err(|e| corrupt(format!("match record {:?} cells: {e}", r.order_id)))?;
            let res = Resolution::try_from(res)
                .map_err(|e| bad(Error::InvalidParameter(e.to_string())))?;
            let cells = raw
                .into_iter()
                .map(|c| {
                    CellIndex::try_from(c).map_err(|e| bad(Error::InvalidParameter(e.to_string())))
                })
                .collect::<Result<Vec<_>>>()?;
            Some(CellSet::new(res, cells).map_err(bad)?)
        };
        let request = ClaimRequest {
            pickup,
            vehicle,
            capabilities: Capabilities::from_bits_truncate(r.caps),
            radius_m: r.radius_m,
            hold_ms: r.hold_ms,
            within,
        };
        Ok(Self {
            m: Match {
                order_id: OrderId::new(&r.order_id).map_err(bad)?,
                driver_id: DriverId::new(&r.driver_id).map_err(bad)?,
                pickup,
                distance_m: r.distance_m,
                state,
                created_at: Timestamp::from_millis(r.created_at).map_err(bad)?,
                reserved_until: Timestamp::from_millis(r.reserved_until).map_err(bad)?,
                ended_at: None,
                reason: None,
            },
            request,
            driver_pos: Position::new(r.driver_pos.0, r.driver_pos.1).map_err(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes one record as a chunk with a matching manifest entry, and decodes it.
    fn decode_one(rec: DriverRec) -> Result<Vec<Driver>> {
        let chunk = encode_chunk(&[rec]);
        let info = ChunkInfo {
            len: chunk.len() as u64,
            crc32: crc32fast::hash(&chunk),
            drivers: 1,
        };
        decode_chunk(0, info, &chunk)
    }

    #[test]
    fn a_well_formed_chunk_with_bad_fields_is_rejected() {
        let rec = |id: &'static str, lat: f64, status: u8, order: Option<&'static str>| DriverRec {
            fields: DriverFields {
                id: id.into(),
                lat,
                lon: 1.0,
                ts: 0,
                status,
                vehicle: 0,
                caps: 0,
            },
            order: order.map(Cow::from),
        };
        let err = decode_one(rec("bad id", 1.0, 0, None)).unwrap_err();
        assert!(err.to_string().contains("invalid id"), "{err}");
        assert!(decode_one(rec("a", f64::NAN, 9, None)).is_err());
        let rec = rec("a", 1.0, 2, Some("bad order"));
        let err = decode_one(rec).unwrap_err();
        assert!(err.to_string().contains("invalid id"), "{err}");
    }

    /// A busy driver keeps the order of its match through a snapshot; a
    /// driver with none has none.
    #[test]
    fn a_driver_s_order_round_trips() {
        let mut busy = Driver {
            status: Status::Busy,
            ..Driver::available(
                DriverId::new("d1").unwrap(),
                Position::new(41.88, -87.63).unwrap(),
                Timestamp::from_millis(1_700_000_000_000).unwrap(),
            )
        };
        busy.order_id = Some(OrderId::new("o-7").unwrap());
        let free = Driver {
            id: DriverId::new("d2").unwrap(),
            ..busy.clone()
        };
        let free = Driver {
            order_id: None,
            ..free
        };
        let mut w = SnapshotWriter::default();
        w.push(&busy);
        w.push(&free);
        let snap = w.finish(
            SnapshotOrigin {
                generation: 1,
                taken_at_ms: 0,
                resolution: 7,
            },
            1,
        );
        assert_eq!(snap.manifest.format, 2);
        let back = decode_snapshot(&snap.manifest, &snap.chunks).unwrap();
        assert_eq!(back, vec![busy, free]);
    }

    /// A snapshot of format 1 (drivers without orders) is still read.
    #[test]
    fn format_1_is_still_read() {
        let rec = DriverFields {
            id: "d1".into(),
            lat: 41.88,
            lon: -87.63,
            ts: 1_700_000_000_000,
            status: 2,
            vehicle: 3,
            caps: 1,
        };
        let raw = postcard::to_stdvec(&[rec][..]).unwrap();
        let mut chunk = CHUNK_MAGIC_V1.to_vec();
        chunk.extend(zstd::bulk::compress(&raw, 1).unwrap());
        let manifest = Manifest {
            format: 1,
            generation: 3,
            taken_at_ms: 0,
            resolution: 7,
            drivers: 1,
            chunks: vec![ChunkInfo {
                len: chunk.len() as u64,
                crc32: crc32fast::hash(&chunk),
                drivers: 1,
            }],
        };
        let manifest = Manifest::decode(&manifest.encode()).unwrap();
        let back = decode_snapshot(&manifest, &[chunk]).unwrap();
        assert_eq!(back.len(), 1);
        let d = &back[0];
        assert_eq!(
            (d.id.as_str(), d.status, d.vehicle, d.order_id.as_ref()),
            ("d1", Status::Busy, Vehicle::ALL[3], None)
        );
        let future = Manifest {
            format: 3,
            ..manifest
        };
        assert!(Manifest::decode(&future.encode()).is_err());
    }

    #[test]
    fn match_records_round_trip_and_reject_corruption() {
        let r = DurableMatch {
            m: Match {
                order_id: OrderId::new("o1").unwrap(),
                driver_id: DriverId::new("d1").unwrap(),
                pickup: Position::new(41.0, -87.0).unwrap(),
                distance_m: 12.5,
                state: MatchState::Confirmed,
                created_at: Timestamp::from_millis(5).unwrap(),
                reserved_until: Timestamp::from_millis(30_005).unwrap(),
                ended_at: None,
                reason: None,
            },
            request: ClaimRequest {
                vehicle: Some(Vehicle::Van),
                radius_m: Some(900.0),
                ..ClaimRequest::new(Position::new(41.0, -87.0).unwrap())
            },
            driver_pos: Position::new(41.0001, -87.0).unwrap(),
        };
        let bytes = r.encode();
        assert_eq!(DurableMatch::decode(&bytes).unwrap(), r);
        // A request narrowed to cells keeps them.
        let cell = Position::new(41.0, -87.0).unwrap().cell(Resolution::Six);
        let mut narrowed = r.clone();
        narrowed.request.within = Some(CellSet::new(Resolution::Six, [cell]).unwrap());
        let with_cells = narrowed.encode();
        assert_eq!(DurableMatch::decode(&with_cells).unwrap(), narrowed);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(DurableMatch::decode(&b).is_err());
        }
    }
}
