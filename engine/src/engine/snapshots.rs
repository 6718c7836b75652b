//! Snapshots of the engine's drivers: taking one, and loading one into an
//! empty engine. The encoding is `snapshot`'s.

use crate::driver::Status;
use crate::error::Result;
use crate::snapshot::{Manifest, Snapshot, SnapshotOrigin, SnapshotWriter, decode_snapshot};

use super::Engine;

impl Engine {
    /// Encodes every driver, shard by shard (one short read lock each), in
    /// chunks of at most `drivers_per_chunk`.
    pub fn snapshot(&self, generation: u64, drivers_per_chunk: usize) -> Snapshot {
        let mut writer = SnapshotWriter::default();
        self.for_each_driver_with_order(|d| writer.push(&d));
        let origin = SnapshotOrigin {
            generation,
            taken_at_ms: self.clock.now().as_millis(),
            resolution: self.config.resolution,
        };
        writer.finish(origin, drivers_per_chunk)
    }

    /// Encodes the drivers in parts, one snapshot per part: `part` names
    /// each driver's part, and `parts` lists the parts to encode with the
    /// generation of each. Every listed part gets a snapshot, an empty one
    /// if no driver maps to it; drivers of unlisted parts are left out.
    pub fn snapshot_parts<K: Eq + std::hash::Hash + Clone>(
        &self,
        parts: &[(K, u64)],
        drivers_per_chunk: usize,
        part: impl Fn(&crate::Driver) -> Option<K>,
    ) -> Vec<(K, Snapshot)> {
        let index: std::collections::HashMap<&K, usize> =
            parts.iter().enumerate().map(|(i, (k, _))| (k, i)).collect();
        let mut writers: Vec<SnapshotWriter> =
            parts.iter().map(|_| SnapshotWriter::default()).collect();
        self.for_each_driver_with_order(|d| {
            if let Some(i) = part(&d).and_then(|k| index.get(&k).copied()) {
                writers[i].push(&d);
            }
        });
        let taken_at_ms = self.clock.now().as_millis();
        parts
            .iter()
            .zip(writers)
            .map(|((k, generation), w)| {
                let origin = SnapshotOrigin {
                    generation: *generation,
                    taken_at_ms,
                    resolution: self.config.resolution,
                };
                (k.clone(), w.finish(origin, drivers_per_chunk))
            })
            .collect()
    }

    /// Every driver, with the order of its live match (as the match book
    /// was just before the walk: a match made during it is not named).
    fn for_each_driver_with_order(&self, mut f: impl FnMut(crate::Driver)) {
        let orders = self.book.lock().orders_by_driver();
        self.index.for_each_driver(|mut d| {
            if matches!(d.status, Status::Reserved | Status::Busy) {
                d.order_id = orders.get(&d.id).cloned();
            }
            f(d);
        });
    }

    /// Loads a snapshot into an empty engine. Everything is decoded and
    /// checked first; nothing is loaded unless all of it is good.
    /// Drivers stored as `reserved` come back `available`: reservations are
    /// restored from their durable records ([`Engine::restore_matches`]).
    ///
    /// # Errors
    /// [`Error::CorruptSnapshot`](crate::Error::CorruptSnapshot);
    /// [`Error::InvalidParameter`](crate::Error::InvalidParameter) if the
    /// engine is not empty.
    pub fn restore_snapshot(
        &self,
        manifest: &Manifest,
        chunks: &[impl AsRef<[u8]>],
    ) -> Result<usize> {
        let mut drivers = decode_snapshot(manifest, chunks)?;
        for d in &mut drivers {
            if d.status == Status::Reserved {
                d.status = Status::Available;
            }
        }
        self.bulk_load(drivers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{Capabilities, Driver, DriverUpdate, Vehicle};
    use crate::ids::DriverId;
    use crate::position::Position;
    use crate::testing::{did, pos};
    use crate::time::Timestamp;
    use crate::{ClaimRequest, EngineConfig, OrderId, decode_snapshot};

    /// Every status, in the order of their snapshot codes.
    const STATUSES: [Status; 4] = [
        Status::Available,
        Status::Reserved,
        Status::Busy,
        Status::Offline,
    ];

    fn engine_with(n: usize) -> Engine {
        let e = Engine::new(EngineConfig::default()).unwrap();
        for i in 0..n {
            let mut u = DriverUpdate::location(
                DriverId::new(&format!("d{i}")).unwrap(),
                Position::new(
                    41.6 + (i % 97) as f64 * 0.004,
                    -87.9 + (i % 89) as f64 * 0.004,
                )
                .unwrap(),
                Some(Timestamp::from_millis(1_000 + i as i64).unwrap()),
            );
            u.status = Some(STATUSES[i % 4]).filter(|s| *s != Status::Reserved);
            u.vehicle = Some(Vehicle::ALL[i % 6]);
            u.capabilities = Some(Capabilities::from_bits_truncate((i % 7) as u16));
            e.upsert(&u).unwrap();
        }
        e
    }

    fn sorted(mut v: Vec<Driver>) -> Vec<Driver> {
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    #[test]
    fn round_trip_is_exact() {
        let e = engine_with(2_500);
        let snap = e.snapshot(7, 1000);
        assert_eq!(snap.chunks.len(), 3);
        let manifest = Manifest::decode(&snap.manifest.encode()).unwrap();
        assert_eq!(manifest, snap.manifest);
        let back = Engine::new(EngineConfig::default()).unwrap();
        assert_eq!(
            back.restore_snapshot(&manifest, &snap.chunks).unwrap(),
            2_500
        );
        assert_eq!(sorted(back.drivers()), sorted(e.drivers()));
        assert_eq!(back.counts(), e.counts());
    }

    #[test]
    fn parts_hold_exactly_their_drivers() {
        let e = engine_with(1_000);
        // Three parts by the id's number mod 4; part 3 is not listed, and
        // part 9 has no driver.
        let part = |d: &Driver| d.id.as_str()[1..].parse::<u32>().ok().map(|n| n % 4);
        let parts = [(0, 5), (1, 6), (2, 7), (9, 8)];
        let snaps = e.snapshot_parts(&parts, 100, part);
        assert_eq!(snaps.len(), 4);
        for ((k, snap), (listed, generation)) in snaps.into_iter().zip(parts) {
            assert_eq!((k, snap.manifest.generation), (listed, generation));
            let got = sorted(decode_snapshot(&snap.manifest, &snap.chunks).unwrap());
            let want = sorted(
                e.drivers()
                    .into_iter()
                    .filter(|d| part(d) == Some(k))
                    .map(|mut d| {
                        d.order_id = None;
                        d.reserved_until = None;
                        d
                    })
                    .collect(),
            );
            assert_eq!(got, want, "part {k}");
            assert_eq!(got.is_empty(), k == 9);
        }
    }

    #[test]
    fn every_corruption_is_reported_and_nothing_loads() {
        let e = engine_with(300);
        let snap = e.snapshot(1, 100);
        let back = Engine::new(EngineConfig::default()).unwrap();
        // Flip each byte of the second chunk in turn: always rejected.
        for i in 0..snap.chunks[1].len() {
            let mut chunks = snap.chunks.clone();
            chunks[1][i] ^= 0x5a;
            let err = back.restore_snapshot(&snap.manifest, &chunks).unwrap_err();
            assert_eq!(err.code(), "corrupt_snapshot");
        }
        // Truncations of a chunk and of the manifest.
        for cut in 0..snap.chunks[0].len() {
            let mut chunks = snap.chunks.clone();
            chunks[0].truncate(cut);
            assert!(back.restore_snapshot(&snap.manifest, &chunks).is_err());
        }
        let m = snap.manifest.encode();
        for cut in 0..m.len() {
            assert!(Manifest::decode(&m[..cut]).is_err());
        }
        // A missing chunk.
        assert!(
            back.restore_snapshot(&snap.manifest, &snap.chunks[..2])
                .is_err()
        );
        assert!(back.is_empty(), "nothing was half-loaded");
    }

    /// A snapshot names the order of each driver in a live match, so a
    /// node taking the region over can tell it is held elsewhere.
    #[test]
    fn a_snapshot_names_the_orders_of_matched_drivers() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        for (i, lat) in [41.880, 41.881, 41.950].into_iter().enumerate() {
            e.upsert(&DriverUpdate::location(
                did(&format!("d{i}")),
                pos(lat, -87.63),
                None,
            ))
            .unwrap();
        }
        let (o1, o2) = (OrderId::new("o1").unwrap(), OrderId::new("o2").unwrap());
        let m1 = e
            .claim(&o1, &ClaimRequest::new(pos(41.880, -87.63)))
            .unwrap()
            .0;
        e.confirm(&o1).unwrap();
        let m2 = e
            .claim(&o2, &ClaimRequest::new(pos(41.881, -87.63)))
            .unwrap()
            .0;
        let snap = e.snapshot(1, 2);
        let mut orders: Vec<(String, Option<String>)> =
            decode_snapshot(&snap.manifest, &snap.chunks)
                .unwrap()
                .into_iter()
                .map(|d| (d.id.to_string(), d.order_id.map(|o| o.to_string())))
                .collect();
        orders.sort();
        let mut want = vec![
            (m1.driver_id.to_string(), Some("o1".to_owned())),
            (m2.driver_id.to_string(), Some("o2".to_owned())),
            ("d2".to_owned(), None),
        ];
        want.sort();
        assert_eq!(orders, want);
    }
}
