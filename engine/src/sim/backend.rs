//! [`Backend`]: the engine operations a simulation uses, and
//! [`LocalBackend`], an in-process engine on a manual clock.

use std::sync::Arc;

use crate::engine::Engine;
use crate::error::Error;
use crate::ids::OrderId;
use crate::index::EngineConfig;
use crate::matching::{BatchOrder, BatchOutcome, ClaimRequest, Match, MatchEvent};
use crate::time::{ManualClock, Timestamp};
use crate::{DriverUpdate, Status};

/// Why a simulation stopped.
///
/// Separate from [`Error`] because its causes are not API error codes: a
/// bad simulation setting, a dispatch policy breaking its contract, or a
/// backend that could not be reached.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The engine (or a server, mapped back to the engine's codes) refused
    /// an operation the simulation could not handle.
    #[error(transparent)]
    Engine(#[from] Error),
    /// A [`SimConfig`](super::SimConfig) value, fleet or trip list that
    /// cannot be simulated.
    #[error("invalid simulation setting: {0}")]
    Config(String),
    /// A dispatch policy returned a match the simulation cannot accept (an
    /// order that is not waiting, a driver that is not idle, …).
    #[error("dispatch policy {policy}: {message}")]
    Policy {
        /// The policy's name.
        policy: String,
        /// What it did wrong.
        message: String,
    },
    /// The backend failed (for example, a server could not be reached).
    #[error("backend: {0}")]
    Backend(String),
}

impl SimError {
    /// A stable `snake_case` code: the engine's code for
    /// [`SimError::Engine`], else `invalid_config`, `policy_error` or
    /// `backend_error`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Engine(e) => e.code(),
            Self::Config(_) => "invalid_config",
            Self::Policy { .. } => "policy_error",
            Self::Backend(_) => "backend_error",
        }
    }
}

/// The engine operations a simulation performs, so the same simulation can
/// run on an in-process [`Engine`] ([`LocalBackend`]) or against a server
/// (the server crate's HTTP backend).
///
/// Each method mirrors the [`Engine`] method of the same name. Errors the
/// simulation expects — [`Error::NoDriverAvailable`] from a claim,
/// [`Error::ReservationExpired`] from a confirm — must come back as
/// [`SimError::Engine`] with that variant.
pub trait Backend {
    /// The simulated time now; called before every operation at that time.
    /// A backend on a [`ManualClock`] sets its clock; a server, which has
    /// its own clock, ignores it.
    fn set_time(&mut self, now: Timestamp);

    /// Adds drivers (available, at their positions), replacing any with the
    /// same id.
    ///
    /// # Errors
    /// Whatever the backend reports.
    fn add_drivers(&mut self, drivers: &[DriverUpdate]) -> Result<(), SimError>;

    /// Location updates of known drivers, in order ([`Engine::update_location`]).
    ///
    /// # Errors
    /// Whatever the backend reports.
    fn move_drivers(&mut self, updates: &[DriverUpdate]) -> Result<(), SimError>;

    /// [`Engine::claim`]: reserves the nearest eligible driver.
    ///
    /// # Errors
    /// [`Error::NoDriverAvailable`] (as [`SimError::Engine`]) when none is
    /// in reach; whatever else the backend reports.
    fn claim(&mut self, order: &OrderId, request: &ClaimRequest) -> Result<Match, SimError>;

    /// [`Engine::claim_batch`]: assigns a window of orders at the least
    /// total distance, each order looking at its `candidates` nearest drivers.
    ///
    /// # Errors
    /// Whatever the backend reports.
    fn claim_batch(
        &mut self,
        orders: &[BatchOrder],
        candidates: usize,
    ) -> Result<BatchOutcome, SimError>;

    /// [`Engine::confirm`]: the driver accepted; it becomes busy.
    ///
    /// # Errors
    /// [`Error::ReservationExpired`] (as [`SimError::Engine`]) when the hold
    /// ran out; whatever else the backend reports.
    fn confirm(&mut self, order: &OrderId) -> Result<Match, SimError>;

    /// [`Engine::complete`]: the trip is done; the driver is available again.
    ///
    /// # Errors
    /// Whatever the backend reports.
    fn complete(&mut self, order: &OrderId) -> Result<Match, SimError>;

    /// [`Engine::expire_matches`]: ends reservations whose hold ran out. A
    /// server that sweeps by itself may return nothing here.
    ///
    /// # Errors
    /// Whatever the backend reports.
    fn expire_matches(&mut self) -> Result<Vec<MatchEvent>, SimError>;
}

/// An in-process [`Engine`] on a [`ManualClock`] that the simulation sets.
#[derive(Debug)]
pub struct LocalBackend {
    engine: Engine,
    clock: Arc<ManualClock>,
}

impl LocalBackend {
    /// An empty engine with `config`, its clock at the epoch until the
    /// simulation sets it.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for an invalid config.
    pub fn new(config: EngineConfig) -> Result<Self, Error> {
        let clock = Arc::new(ManualClock::new(Timestamp::EPOCH));
        let engine = Engine::with_clock(config, clock.clone())?;
        Ok(Self { engine, clock })
    }

    /// The engine, to inspect it during or after a simulation.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine's clock.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }
}

impl Backend for LocalBackend {
    fn set_time(&mut self, now: Timestamp) {
        self.clock.set(now);
    }

    fn add_drivers(&mut self, drivers: &[DriverUpdate]) -> Result<(), SimError> {
        for d in drivers {
            // Start from a clean slate: a driver of an earlier run keeps
            // nothing (its later timestamps would make these updates stale).
            self.engine.remove(&d.id);
            let mut update = d.clone();
            update.status = Some(Status::Available);
            self.engine.upsert(&update)?;
        }
        Ok(())
    }

    fn move_drivers(&mut self, updates: &[DriverUpdate]) -> Result<(), SimError> {
        for u in updates {
            // The simulation sends increasing timestamps per driver, so an
            // update is never stale; a stale one would change nothing anyway.
            self.engine.update_location(&u.id, u.pos, u.ts)?;
        }
        Ok(())
    }

    fn claim(&mut self, order: &OrderId, request: &ClaimRequest) -> Result<Match, SimError> {
        Ok(self.engine.claim(order, request)?.0)
    }

    fn claim_batch(
        &mut self,
        orders: &[BatchOrder],
        candidates: usize,
    ) -> Result<BatchOutcome, SimError> {
        Ok(self.engine.claim_batch(orders, candidates)?)
    }

    fn confirm(&mut self, order: &OrderId) -> Result<Match, SimError> {
        Ok(self.engine.confirm(order)?)
    }

    fn complete(&mut self, order: &OrderId) -> Result<Match, SimError> {
        Ok(self.engine.complete(order)?)
    }

    fn expire_matches(&mut self) -> Result<Vec<MatchEvent>, SimError> {
        Ok(self.engine.expire_matches())
    }
}
