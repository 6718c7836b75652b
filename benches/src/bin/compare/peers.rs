//! One client connection to any of the network systems, so a timed run
//! treats them alike.

use crate::answers::{Answer, Case};
use crate::{http, pg, redis_peer};

/// A client connection to one system.
pub(crate) enum Conn {
    /// hexmatch over HTTP.
    Http(http::Client),
    /// Redis GEOSEARCH.
    Redis(redis_peer::Client),
    /// PostGIS KNN.
    Pg(pg::Client),
}

impl Conn {
    /// The k nearest drivers to the case's point.
    pub(crate) async fn nearest(&mut self, case: &Case) -> Result<Answer, String> {
        match self {
            Self::Http(c) => c.nearest(case).await,
            Self::Redis(c) => c.nearest(case).await,
            Self::Pg(c) => c.nearest(case).await,
        }
    }

    /// Requests sent so far (more than queries for an expanding search).
    pub(crate) fn round_trips(&self) -> u64 {
        match self {
            Self::Http(c) => c.round_trips,
            Self::Redis(c) => c.round_trips,
            Self::Pg(c) => c.round_trips,
        }
    }
}
