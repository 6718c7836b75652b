//! Area queries: the drivers inside a box, a polygon or a region, by id a
//! page at a time; a region's counts; counts per H3 cell of a box; and
//! the region (service area) that narrows a nearest query or a claim.
//!
//! In a cluster, a region's drivers are all held by its owner (routing
//! sends the request there); a box, a polygon or a density may cover
//! every node's regions, so this node asks every other node for its own
//! page (or counts) over the peer channel and merges them: by driver id,
//! the newer fix of a driver seen on two nodes during a handoff.

use std::collections::BTreeMap;

use hexmatch::{
    Area, AreaPolygon, AreaQuery, CellIndex, CellSet, DriverId, LatLonBox, MAX_AREA_LIMIT,
    RegionId, Resolution,
};

use super::{Scope, Service};
use crate::cluster::Cluster;
use crate::cluster::peer::PeerClient;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::wire::{
    AreaIn, AreaOut, CountsOut, DEFAULT_REGION, DensityCell, DensityOut, DriverOut, RegionStatsOut,
    parse_caps, parse_statuses, parse_vehicle,
};

/// The page size when a query names none.
pub const DEFAULT_AREA_LIMIT: usize = 1000;

fn unknown_region(id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::UnknownRegion,
        format!("no region {id:?}; GET /v1/regions lists them"),
    )
}

impl Service {
    /// The cells of region `id`: `None` for the single region `default` of
    /// a server without `--regions` (it holds every driver).
    ///
    /// # Errors
    /// `unknown_region` for an id that names no region.
    pub fn region_cells(&self, id: &str) -> ApiResult<Option<CellSet>> {
        let Some(map) = &self.regions else {
            return if id == DEFAULT_REGION {
                Ok(None)
            } else {
                Err(unknown_region(id))
            };
        };
        let rid = RegionId::new(id).map_err(|_| unknown_region(id))?;
        match map.cells_of(&rid)? {
            Some(cells) => Ok(Some(cells)),
            None => Err(unknown_region(id)),
        }
    }

    /// The validated area query of a request.
    fn area_query(&self, body: &AreaIn) -> ApiResult<AreaQuery> {
        let area = match (&body.bbox, &body.region, &body.geometry) {
            (Some([w, s, e, n]), None, None) => Area::Box(LatLonBox::new(*w, *s, *e, *n)?),
            (None, Some(region), None) => match self.region_cells(region)? {
                Some(cells) => Area::Cells(cells),
                None => Area::Box(LatLonBox::new(-180.0, -90.0, 180.0, 90.0)?),
            },
            (None, None, Some(geometry)) => Area::Polygon(AreaPolygon::from_geojson(geometry)?),
            _ => {
                return Err(ApiError::invalid_parameter(
                    "name exactly one area: bbox, region or geometry",
                ));
            }
        };
        let limit = body.limit.unwrap_or(DEFAULT_AREA_LIMIT);
        let mut q = AreaQuery::new(area, limit).map_err(|_| {
            ApiError::invalid_parameter(format!("limit={limit} is not in 1..={MAX_AREA_LIMIT}"))
        })?;
        q.statuses = parse_statuses(body.status.as_deref())?;
        q.vehicle = parse_vehicle(body.vehicle.as_deref())?;
        q.capabilities = parse_caps(body.capabilities.as_deref())?.unwrap_or_default();
        q.after = body
            .cursor
            .as_deref()
            .map(|c| {
                DriverId::new(c).map_err(|_| {
                    ApiError::invalid_parameter(format!(
                        "cursor {c:?} is not a driver id (pass the previous page's next_cursor)"
                    ))
                })
            })
            .transpose()?;
        Ok(q)
    }

    /// One page of the drivers inside an area, by id, across the cluster
    /// for a box or a polygon (`Scope::Cluster`), else from this node.
    ///
    /// # Errors
    /// `invalid_parameter`, `invalid_position` or `unknown_region` for a
    /// bad query; `unavailable` when a node does not answer.
    pub async fn drivers_within(&self, body: AreaIn, scope: Scope) -> ApiResult<AreaOut> {
        let q = self.area_query(&body)?;
        let engine = std::sync::Arc::clone(&self.engine);
        let local = spawn_blocking(move || engine.within(&q)).await??;
        let mut out = AreaOut {
            next_cursor: local.next.as_ref().map(ToString::to_string),
            drivers: local.drivers.into_iter().map(DriverOut::from).collect(),
        };
        let Some(cluster) = self.cluster().filter(|_| scope == Scope::Cluster) else {
            return Ok(out);
        };
        if body.region.is_some() {
            // Routing brought the request to the region's owner.
            return Ok(out);
        }
        let asked = &body;
        let pages = ask_others(cluster, "an area query", |peer, url| async move {
            peer.within(&url, asked).await
        })
        .await?;
        let mut more = out.next_cursor.is_some();
        for page in pages {
            more |= page.next_cursor.is_some();
            out.drivers.extend(page.drivers);
        }
        // A driver handed off between nodes can briefly show on both: keep
        // the newer fix.
        out.drivers
            .sort_by(|a, b| a.driver_id.cmp(&b.driver_id).then_with(|| b.ts.cmp(&a.ts)));
        out.drivers
            .dedup_by(|later, first| later.driver_id == first.driver_id);
        let limit = body.limit.unwrap_or(DEFAULT_AREA_LIMIT);
        more |= out.drivers.len() > limit;
        out.drivers.truncate(limit);
        out.next_cursor = if more {
            out.drivers.last().map(|d| d.driver_id.to_string())
        } else {
            None
        };
        Ok(out)
    }

    /// A region's drivers by status, from this node (routing brings the
    /// request to the region's owner).
    ///
    /// # Errors
    /// `unknown_region`.
    pub fn region_stats(&self, id: &str) -> ApiResult<RegionStatsOut> {
        let cells = self.region_cells(id)?;
        let (counts, n_cells) = match &cells {
            Some(set) => (
                self.engine.counts_within(&Area::Cells(set.clone()))?,
                set.cells().len(),
            ),
            None => (self.engine.counts(), self.engine.cell_count()),
        };
        let name = self
            .regions
            .as_ref()
            .and_then(|m| m.regions().iter().find(|r| r.id.as_str() == id))
            .map(|r| r.name.clone())
            .unwrap_or_default();
        let owner = match self.cluster() {
            Some(c) => c
                .map()
                .owners
                .get(id)
                .map_or_else(String::new, |(node, _)| node.clone()),
            None => self.config.node_id.clone(),
        };
        Ok(RegionStatsOut {
            region: id.to_owned(),
            name,
            owner,
            cells: n_cells,
            drivers: counts.into(),
        })
    }

    /// Counts by status per H3 cell of `res` of the drivers inside `bbox`,
    /// summed over the cluster (`Scope::Cluster`), else this node's.
    ///
    /// # Errors
    /// `invalid_parameter` for a bad box or resolution, or too many cells;
    /// `unavailable` when a node does not answer.
    pub async fn density(&self, bbox: [f64; 4], res: u8, scope: Scope) -> ApiResult<DensityOut> {
        let [w, s, e, n] = bbox;
        let area = LatLonBox::new(w, s, e, n)?;
        let resolution = Resolution::try_from(res)
            .map_err(|_| ApiError::invalid_parameter(format!("res={res} is not in 0..=15")))?;
        let engine = std::sync::Arc::clone(&self.engine);
        let local = spawn_blocking(move || engine.density(&area, resolution)).await??;
        let mut per_cell: BTreeMap<CellIndex, CountsOut> = local
            .into_iter()
            .map(|(cell, counts)| (cell, counts.into()))
            .collect();
        if let Some(cluster) = self.cluster().filter(|_| scope == Scope::Cluster) {
            let answers = ask_others(cluster, "a density query", |peer, url| async move {
                peer.density(&url, bbox, res).await
            })
            .await?;
            for answer in answers {
                for c in answer.cells {
                    let cell = c.cell.parse::<CellIndex>().map_err(|e| {
                        ApiError::new(
                            ErrorCode::Internal,
                            format!("a node sent cell {}: {e}", c.cell),
                        )
                    })?;
                    per_cell.entry(cell).or_default().add(&c.drivers);
                }
            }
        }
        Ok(DensityOut {
            res,
            cells: per_cell
                .into_iter()
                .map(|(cell, drivers)| {
                    let centre = hexmatch::LatLng::from(cell);
                    DensityCell {
                        cell: cell.to_string(),
                        lat: centre.lat(),
                        lon: centre.lng(),
                        drivers,
                    }
                })
                .collect(),
        })
    }
}

/// Asks every other node of the cluster in parallel (`call` with its
/// URL); `unavailable`, naming the node and `what` it was asked, when one
/// does not answer.
async fn ask_others<'a, T, F, Fut>(cluster: &'a Cluster, what: &str, call: F) -> ApiResult<Vec<T>>
where
    F: Fn(&'a PeerClient, String) -> Fut,
    Fut: std::future::Future<Output = ApiResult<T>>,
{
    let peer = cluster.peer();
    let others: Vec<(String, String)> = cluster
        .map()
        .nodes
        .iter()
        .filter(|(node, _)| node.as_str() != cluster.node())
        .map(|(node, url)| (node.clone(), url.clone()))
        .collect();
    let calls = others.into_iter().map(|(node, url)| {
        let answer = call(peer, url);
        async move {
            answer.await.map_err(|e| {
                ApiError::unavailable(format!("node {node} did not answer {what}: {e}"))
            })
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect()
}

/// Runs engine work that may take milliseconds off the async workers.
async fn spawn_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("an area query failed: {e}")))
}
