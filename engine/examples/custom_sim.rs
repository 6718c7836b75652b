//! A custom simulation on the `hexmatch` library: synthetic trips made in
//! code, a dispatch policy of our own next to the built-in ones, and a look
//! at the engine between steps.
//!
//! Run: `cargo run --release -p hexmatch --example custom_sim`
//!
//! The policy, `RadiusFirst`, is nearest-now with a limit: an order only
//! takes a driver within `radius_m`, so no driver crosses the city to
//! fetch one passenger while the orders near it wait. Orders farther from
//! every idle driver keep waiting (and may be lost) instead.

use hexmatch::sim::{
    Backend, BatchPolicy, Dispatch, DispatchContext, Fleet, LocalBackend, NearestPolicy, SimConfig,
    SimError, Simulation, Trip,
};
use hexmatch::{
    ClaimRequest, EngineConfig, Error, Match, NearestQuery, OrderId, Position, Timestamp,
};

/// Nearest-now, but only within `radius_m` of the pickup.
struct RadiusFirst {
    radius_m: f64,
}

impl Dispatch for RadiusFirst {
    fn name(&self) -> &'static str {
        "radius-first"
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
        for order in ctx.waiting {
            if out.len() == ctx.idle_drivers {
                break;
            }
            let request = ClaimRequest {
                radius_m: Some(self.radius_m),
                ..order.request.clone()
            };
            match backend.claim(&order.order_id, &request) {
                Ok(m) => out.push(m),
                Err(SimError::Engine(Error::NoDriverAvailable)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// A tiny deterministic generator for the synthetic city.
struct Lcg(u64);

impl Lcg {
    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Two hours of trips in a 20 × 20 km city: most start downtown in the
/// morning rush and go outwards.
fn synthetic_trips(n: usize) -> Result<Vec<Trip>, Error> {
    let mut rng = Lcg(2026);
    let start = Timestamp::parse("2026-03-02T07:00:00Z")?;
    let downtown = (41.88, -87.63);
    (0..n)
        .map(|i| {
            let at = start.plus_millis((rng.next() * 7_200_000.0) as u64);
            let (spread_pick, spread_drop) = if rng.next() < 0.7 {
                (0.02, 0.09)
            } else {
                (0.09, 0.02)
            };
            let pickup = Position::new(
                downtown.0 + (rng.next() - 0.5) * spread_pick * 2.0,
                downtown.1 + (rng.next() - 0.5) * spread_pick * 2.0,
            )?;
            let dropoff = Position::new(
                downtown.0 + (rng.next() - 0.5) * spread_drop * 2.0,
                downtown.1 + (rng.next() - 0.5) * spread_drop * 2.0,
            )?;
            Ok(Trip {
                id: OrderId::new(&format!("o{i:05}"))?,
                pickup_time: at,
                pickup,
                dropoff_time: at.plus_millis(1_200_000),
                dropoff,
            })
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let trips = synthetic_trips(900)?;
    let config = SimConfig {
        speed_kmh: 30.0,
        patience_ms: 240_000,
        timings: false,
        seed: 11,
        ..SimConfig::default()
    };
    let downtown = Position::new(41.88, -87.63)?;

    // Step by step with our own policy, looking at the engine every
    // simulated half hour: how many drivers are free within 2 km of downtown.
    let backend = LocalBackend::new(EngineConfig::default())?;
    let policy = Box::new(RadiusFirst { radius_m: 4_000.0 });
    let mut sim = Simulation::new(
        config.clone(),
        trips.clone(),
        Fleet::Sampled(150),
        policy,
        backend,
    )?;
    let mut next_look = trips
        .iter()
        .map(|t| t.pickup_time)
        .min()
        .unwrap_or_default();
    while let Some(now) = sim.step()? {
        if now >= next_look {
            let near = sim
                .backend()
                .engine()
                .nearest(&NearestQuery::new(downtown, 150)?.with_radius(2_000.0)?)?;
            let p = sim.progress();
            println!(
                "{now}: {:>3} idle ({:>3} within 2 km of downtown), {:>4} served, {:>3} lost, {:>2} waiting",
                p.idle,
                near.len(),
                p.served,
                p.unserved,
                p.waiting
            );
            next_look = next_look.plus_millis(1_800_000);
        }
    }
    let custom = sim.finish().report;

    // The built-in policies on the same trips and fleet, for comparison.
    let mut rows = vec![custom];
    for policy in [
        Box::new(NearestPolicy) as Box<dyn Dispatch>,
        Box::new(BatchPolicy::default()),
    ] {
        let backend = LocalBackend::new(EngineConfig::default())?;
        let sim = Simulation::new(
            config.clone(),
            trips.clone(),
            Fleet::Sampled(150),
            policy,
            backend,
        )?;
        rows.push(sim.run()?.report);
    }
    println!("\npolicy         served %   wait p50 s   wait p90 s   pickup km mean   empty km");
    for r in &rows {
        println!(
            "{:<14} {:>8.2}   {:>10.1}   {:>10.1}   {:>14.3}   {:>8.1}",
            r.policy, r.served_pct, r.wait_s.p50, r.wait_s.p90, r.pickup_km.mean, r.empty_km_total
        );
    }
    Ok(())
}
