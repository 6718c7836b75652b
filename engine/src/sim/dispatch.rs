//! Dispatch policies: who gets which waiting order, and when.

use crate::error::Error;
use crate::matching::{BatchOrder, Match};
use crate::time::Timestamp;

use super::backend::{Backend, SimError};

/// What a policy sees when it is asked to assign drivers.
#[derive(Debug, Clone, Copy)]
pub struct DispatchContext<'a> {
    /// The simulated time.
    pub now: Timestamp,
    /// The orders waiting for a driver, oldest first (ties by trip id),
    /// each with the claim request the simulation would make for it.
    pub waiting: &'a [BatchOrder],
    /// How many drivers are idle (available) now.
    pub idle_drivers: usize,
}

/// A dispatch policy: reserves drivers for waiting orders through a
/// [`Backend`].
///
/// The simulation calls [`assign`](Self::assign) when it may help: for a
/// policy without a window, after every change (an order arrived, a driver
/// became free); for a windowed policy, at every multiple of the window
/// (counted from the first order's time) while orders wait. It then
/// confirms each returned match (after [`SimConfig::accept_ms`]) and sends
/// the driver off.
///
/// Contract: every returned [`Match`] is a fresh reservation (state
/// `reserved`) for an order of `ctx.waiting`, at most one per order, of a
/// driver that was idle. Anything else stops the simulation with
/// [`SimError::Policy`]. A policy must not leave reservations it does not
/// return.
///
/// [`SimConfig::accept_ms`]: super::SimConfig::accept_ms
pub trait Dispatch {
    /// The name in the report (`nearest`, `batch`, …).
    fn name(&self) -> &str;

    /// `None`: assign as soon as anything changes. `Some(ms)`: assign at
    /// multiples of this window only.
    fn window_ms(&self) -> Option<u64>;

    /// Reserves drivers for some of the waiting orders.
    ///
    /// # Errors
    /// Any backend error other than the expected "no driver available".
    fn assign(
        &mut self,
        backend: &mut dyn Backend,
        ctx: &DispatchContext<'_>,
    ) -> Result<Vec<Match>, SimError>;
}

/// Nearest-now: each waiting order, oldest first, claims the nearest
/// available driver ([`Engine::claim`](crate::Engine::claim)) as soon as
/// one exists. Greedy: an order never waits for a better driver, and an
/// earlier order may take the driver a later one needed more.
#[derive(Debug, Clone, Copy, Default)]
pub struct NearestPolicy;

impl Dispatch for NearestPolicy {
    fn name(&self) -> &'static str {
        "nearest"
    }

    fn window_ms(&self) -> Option<u64> {
        None
    }

    fn assign(
        &mut self,
        backend: &mut dyn Backend,
        ctx: &DispatchContext<'_>,
    ) -> Result<Vec<Match>, SimError> {
        let mut out = Vec::new();
        let mut idle = ctx.idle_drivers;
        for order in ctx.waiting {
            if idle == 0 {
                break;
            }
            match backend.claim(&order.order_id, &order.request) {
                Ok(m) => {
                    idle -= 1;
                    out.push(m);
                }
                // Nobody in reach of this order (a radius or filter); a
                // later order may still find someone.
                Err(SimError::Engine(Error::NoDriverAvailable)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// Batch window: orders collect for `window_ms`, then the whole window is
/// assigned at once ([`Engine::claim_batch`](crate::Engine::claim_batch)):
/// as many orders as possible, at the least total pickup distance, each
/// order considering its `candidates` nearest available drivers.
///
/// Over one window and one set of available drivers, this never needs more
/// total pickup distance than nearest-now for the same number of served
/// orders, *provided* `candidates` is at least the number of orders in the
/// window (then every driver nearest-now would pick is among the
/// candidates). With fewer candidates the optimum is over a sparser graph
/// and that guarantee is lost. Over a whole simulation nothing of the kind
/// holds: different choices lead to different futures.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// Length of the window, ms.
    pub window_ms: u64,
    /// Nearest drivers considered per order, 1..=100 (the server uses 16).
    pub candidates: usize,
}

impl Default for BatchPolicy {
    /// A 10 s window, 16 candidates per order (as the server's batch endpoint).
    fn default() -> Self {
        Self {
            window_ms: 10_000,
            candidates: 16,
        }
    }
}

impl Dispatch for BatchPolicy {
    fn name(&self) -> &'static str {
        "batch"
    }

    fn window_ms(&self) -> Option<u64> {
        Some(self.window_ms)
    }

    fn assign(
        &mut self,
        backend: &mut dyn Backend,
        ctx: &DispatchContext<'_>,
    ) -> Result<Vec<Match>, SimError> {
        if ctx.idle_drivers == 0 || ctx.waiting.is_empty() {
            return Ok(Vec::new());
        }
        Ok(backend.claim_batch(ctx.waiting, self.candidates)?.matches)
    }
}
