//! Cluster mode: every driver change this node acknowledges is first in
//! its region's journal ([`crate::persist::journal`]), so a node taking
//! the region over brings the driver back exactly as acknowledged.
//!
//! A change is journalled where the driver is after it. A driver that
//! left a region this node serves (moved out, handed over, removed) also
//! gets a departure in that region, so no taker brings it back there.
//! Drivers outside every region this node serves (a matched driver held
//! here while its updates go to another region) are not journalled.
//!
//! Two changes of one driver can race (a move and a release, two moves,
//! a move and a handoff). Each append writes the driver's state as read
//! when it is written, and a driver's reads and appends are serialised by
//! a lock per driver (striped, [`StripedLocks`]): the last entry in each
//! region is then always the engine's latest state there. Without it, a
//! state read before a move could land after the move's departure, and a
//! taker would bring the driver back in the region it left.

use hexmatch::{Driver, DriverId};
use metrics::counter;

use super::Service;
use crate::error::{ApiError, ApiResult};
use crate::persist::journal::Change;
use crate::persist::stripes::StripedLocks;

/// Where drivers were before a change: each id with the region it was in
/// (if this node serves it), and when ([`crate::persist::Persistence::losses`]).
#[derive(Debug, Default)]
pub(super) struct Before {
    pub(super) drivers: Vec<(DriverId, Option<String>)>,
    pub(super) since: u64,
}

/// How many locks serialise drivers' journal appends.
const DRIVER_LOCK_STRIPES: usize = 256;

/// Striped locks over driver ids: a driver's journal appends, and the
/// reads of the state they write, happen one at a time.
pub(super) fn driver_locks() -> StripedLocks {
    StripedLocks::new(DRIVER_LOCK_STRIPES)
}

impl Service {
    /// The region this node serves that holds each of `ids` now (`None`:
    /// unknown here, or in no region this node serves). Empty without a
    /// cluster: nothing is journalled then.
    pub(super) fn before<'a>(&self, ids: impl IntoIterator<Item = &'a DriverId>) -> Before {
        let (Some(_), Some(p)) = (self.cluster(), self.persist()) else {
            return Before::default();
        };
        // Read first: a loss after this refuses the journal write.
        let since = p.losses();
        Before {
            drivers: ids
                .into_iter()
                .map(|id| (id.clone(), self.served_region_of(id)))
                .collect(),
            since,
        }
    }

    fn served_region_of(&self, id: &DriverId) -> Option<String> {
        self.served_region(&self.engine.driver(id)?)
    }

    /// The region holding `d`, if this node serves it.
    fn served_region(&self, d: &Driver) -> Option<String> {
        let cluster = self.cluster()?;
        let region = cluster.region_of(d.pos).ok()?.to_string();
        cluster.serves(&region).then_some(region)
    }

    /// Appends to the journals what became of each driver of `before`:
    /// its state in the region it is in now, and its departure from the
    /// region it was in, if different.
    ///
    /// # Errors
    /// `unavailable` when a journal could not take the changes (Redis
    /// down, or the lease lost meanwhile): the change is applied in memory
    /// but not acknowledged; the client's retry journals it.
    pub(super) async fn journal(&self, before: Before) -> ApiResult<()> {
        let Some(p) = self.persist() else {
            return Ok(());
        };
        if before.drivers.is_empty() {
            return Ok(());
        }
        // Held until the entries are written: see the module doc.
        let _locked = self
            .driver_locks
            .lock_all(before.drivers.iter().map(|(id, _)| id.as_str()))
            .await;
        let mut changes = Vec::with_capacity(before.drivers.len());
        for (id, was) in before.drivers {
            // One read: the state journalled is the one whose region it names.
            let now = self
                .engine
                .driver(&id)
                .and_then(|d| Some((self.served_region(&d)?, d)));
            if let Some(was) = was.filter(|w| now.as_ref().map(|(r, _)| r) != Some(w)) {
                changes.push((was, Change::Gone(id.clone())));
            }
            if let Some((region, d)) = now {
                changes.push((region, Change::Put(d)));
            }
        }
        // A departure lost with a Redis master would bring the driver back
        // where it was, while it is elsewhere: departures wait for the
        // replicas.
        let departs = changes.iter().any(|(_, c)| matches!(c, Change::Gone(_)));
        let written = if departs {
            p.journal_durably(changes, before.since).await
        } else {
            p.journal(changes, before.since).await
        };
        written.map_err(|e| {
            counter!("hexmatch_journal_failures_total").increment(1);
            ApiError::unavailable(format!(
                "the change could not be written to its region's journal: {e}; retry"
            ))
        })
    }

    /// [`Service::journal`] for a change already acknowledged by other
    /// means (a match change, written through its record): a failure is
    /// logged and counted, and the driver's next update journals it.
    pub(super) async fn journal_quietly(&self, before: Before) {
        if let Err(e) = self.journal(before).await {
            tracing::warn!(error = %e, "driver change not journalled");
        }
    }
}
