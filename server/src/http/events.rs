//! `GET /v1/events`: the node's events as server-sent events.
//!
//! Each event is one SSE message: `id:` its id, `event:` its type,
//! `data:` its JSON ([`Event`]). A client that reconnects with
//! `Last-Event-ID` (or `?last_event_id=`) gets every event after that id
//! still held in the backlog; if some are no longer held, an `event: gap`
//! message ([`EventGap`]) says so before the feed goes on from the oldest
//! held. A comment line (`: keep-alive`) goes out every 15 s of silence.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{self, KeepAlive, Sse};
use futures_util::Stream;
use metrics::{counter, gauge};
use serde::Deserialize;
use tokio::sync::watch;
use utoipa::IntoParams;

use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::service::{EventBus, Read, TypeFilter};
use crate::wire::{Event, EventGap};

/// How long the feed may be silent before a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Query of the event feed.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct EventParams {
    /// Comma-separated event types to receive; a pattern ending in `*`
    /// matches every type it starts (`match.*`). Default: every type.
    #[param(example = "match.*,driver.expired")]
    types: Option<String>,
    /// Resume after this event id, as the `Last-Event-ID` header does (the
    /// header wins when both are given).
    #[param(example = 41)]
    last_event_id: Option<u64>,
}

/// The node's events as server-sent events.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(
        EventParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id (sent by browsers' EventSource on reconnection)."),
    ),
    responses(
        (status = 200, description = "A `text/event-stream`: one message per event (`id:` its id, `event:` its type, `data:` the event as JSON), an `event: gap` message (data: `EventGap`) when events after the client's last id are no longer held, and `: keep-alive` comments every 15 s of silence.", content_type = "text/event-stream", body = Event),
        (status = 400, description = "invalid_parameter (an unknown event type, a bad Last-Event-ID)", body = ErrorBody),
        (status = 404, description = "not_found: events are off (`--event-backlog 0`)", body = ErrorBody),
    ))]
pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<EventParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Sse<impl Stream<Item = Result<sse::Event, Infallible>>>> {
    let Query(params) = params.map_err(|e| ApiError::invalid_parameter(e.body_text()))?;
    let bus = Arc::clone(&state.svc.events);
    if !bus.is_on() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "events are off on this node (--event-backlog 0)",
        ));
    }
    let filter = match &params.types {
        Some(t) => TypeFilter::parse(t).map_err(ApiError::invalid_parameter)?,
        None => TypeFilter::ALL,
    };
    let header = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid_parameter("Last-Event-ID is not an event id (an integer)")
                })?,
        ),
    };
    // Without an id to resume from, the feed starts with the next event.
    let cursor = header
        .or(params.last_event_id)
        .unwrap_or_else(|| bus.newest_id());
    let feed = Feed::new(bus, cursor, filter);
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        let event = feed.next().await?;
        Some((Ok(event), feed))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive")))
}

/// One client's place in the feed. It holds at most one read of the
/// ring ([`crate::service::events::READ_BATCH`] events) at a time.
struct Feed {
    bus: Arc<EventBus>,
    /// The last id sent (or skipped by the filter).
    cursor: u64,
    filter: TypeFilter,
    pending: VecDeque<sse::Event>,
    newest: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
}

impl Feed {
    fn new(bus: Arc<EventBus>, cursor: u64, filter: TypeFilter) -> Self {
        gauge!("hexmatch_event_feed_clients").increment(1.0);
        Self {
            newest: bus.watch(),
            closing: bus.closing(),
            bus,
            cursor,
            filter,
            pending: VecDeque::new(),
        }
    }

    /// The next message, waiting for events; `None` at shutdown.
    async fn next(&mut self) -> Option<sse::Event> {
        loop {
            if *self.closing.borrow() {
                return None;
            }
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            // Marked before reading: an event published after the read
            // wakes the wait below.
            self.newest.borrow_and_update();
            match self.bus.read_after(self.cursor) {
                Read::Events(events) => {
                    for e in events {
                        self.cursor = e.event.id;
                        let kind = e.event_type();
                        if self.filter.allows(kind) {
                            self.pending.push_back(
                                sse::Event::default()
                                    .id(e.event.id.to_string())
                                    .event(kind.as_str())
                                    .data(e.json()),
                            );
                        }
                    }
                }
                Read::Gap { first_id } => {
                    counter!("hexmatch_event_feed_gaps_total").increment(1);
                    let gap = EventGap {
                        last_event_id: self.cursor,
                        first_id,
                    };
                    self.cursor = first_id.saturating_sub(1);
                    // Its id moves the client's Last-Event-ID past the
                    // gap, so a reconnection is not told again.
                    self.pending.push_back(
                        sse::Event::default()
                            .id(self.cursor.to_string())
                            .event("gap")
                            .data(serde_json::to_string(&gap).unwrap_or_default()),
                    );
                }
                Read::CaughtUp => {
                    tokio::select! {
                        changed = self.newest.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                        }
                        _ = self.closing.changed() => {}
                    }
                }
            }
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        gauge!("hexmatch_event_feed_clients").decrement(1.0);
    }
}
