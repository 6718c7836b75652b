//! [`EngineConfig`]: the engine's settings, and their validation.

use h3o::Resolution;

use crate::error::{Error, Result};

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// H3 resolution of the partition cells (0–15; default 6, ≈ 36 km²).
    pub resolution: u8,
    /// How far a nearest query or claim without `radius_m` searches, in metres
    /// (default 500 km).
    pub max_radius_m: f64,
    /// Drivers with no update for this long are removed by
    /// [`Engine::expire_drivers`](crate::Engine::expire_drivers) (default 120 s).
    pub driver_ttl_ms: u64,
    /// How long released, expired and completed matches stay readable
    /// (default 1 h).
    pub match_retention_ms: u64,
    /// At most this many ended matches are kept readable (default 1M,
    /// a few hundred MB): past it, the oldest are forgotten before their
    /// retention ends (in runs of 8192), so a high claim rate cannot grow
    /// memory without bound.
    pub max_ended_matches: usize,
    /// How far ahead of the clock a fix's `ts` may be (default 5 min): a
    /// later one is refused, so one bad device clock cannot freeze a
    /// driver (every correct update after it would be stale).
    pub max_future_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            resolution: 6,
            max_radius_m: 500_000.0,
            driver_ttl_ms: 120_000,
            match_retention_ms: 3_600_000,
            max_ended_matches: 1_000_000,
            max_future_ms: 300_000,
        }
    }
}

impl EngineConfig {
    /// Checks every setting; the partition resolution when all are valid.
    pub(crate) fn validate(&self) -> Result<Resolution> {
        let res = Resolution::try_from(self.resolution).map_err(|_| {
            Error::InvalidParameter(format!(
                "H3 resolution {} is not in 0..=15",
                self.resolution
            ))
        })?;
        if !(self.max_radius_m.is_finite() && self.max_radius_m > 0.0) {
            return Err(Error::InvalidParameter(format!(
                "max_radius_m {} must be a positive number",
                self.max_radius_m
            )));
        }
        if self.driver_ttl_ms == 0 {
            return Err(Error::InvalidParameter(
                "driver_ttl_ms must be positive".into(),
            ));
        }
        Ok(res)
    }
}
