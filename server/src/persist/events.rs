//! The event stream in Redis: every event of this node appended to
//! `<prefix>:events` (`XADD … MAXLEN ~ N`), for consumers that read it
//! with consumer groups.
//!
//! One background task appends, fed by a bounded channel from the event
//! bus (which drops and counts when it is full: a request never waits
//! for Redis). It takes what has queued, up to [`BATCH`] events, and
//! appends them in one pipeline, in id order. A batch Redis refuses is
//! tried again after a pause, [`ATTEMPTS`] times in all, then dropped and
//! counted (`hexmatch_events_dropped_total{sink="redis",reason="undelivered"}`).
//!
//! Each entry's fields: `id` (the event id on its node), `node`, `type`,
//! `event` (the event's JSON, as on the SSE feed).

use std::sync::Arc;
use std::time::Duration;

use metrics::counter;
use redis::RedisResult;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Persistence;
use crate::wire::SharedEvent;

/// Most events appended in one round trip.
pub const BATCH: usize = 256;

/// Tries of one batch before it is dropped.
pub const ATTEMPTS: u32 = 5;

impl Persistence {
    /// The stream events go to: `<prefix>:events`.
    pub fn events_key(&self) -> String {
        self.keys.events()
    }

    /// Appends `events` to the event stream in one pipeline, capping it
    /// near `maxlen` entries.
    ///
    /// # Errors
    /// Redis errors.
    pub async fn append_events(
        &self,
        events: &[Arc<SharedEvent>],
        maxlen: usize,
    ) -> RedisResult<()> {
        let key = self.events_key();
        let mut pipe = redis::pipe();
        for e in events {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(maxlen)
                .arg("*")
                .arg("id")
                .arg(e.event.id)
                .arg("node")
                .arg(&e.event.node)
                .arg("type")
                .arg(e.event_type().as_str())
                .arg("event")
                .arg(e.json())
                .ignore();
        }
        let mut conn = self.conn.clone();
        pipe.query_async::<()>(&mut conn).await
    }

    /// Starts the task that appends the events of `rx` to the stream
    /// (see the module doc).
    pub fn spawn_event_stream(
        self: &Arc<Self>,
        mut rx: mpsc::Receiver<Arc<SharedEvent>>,
        maxlen: usize,
    ) -> JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let written = counter!("hexmatch_event_stream_appended_total");
            let failures = counter!("hexmatch_event_stream_failures_total");
            let dropped = counter!("hexmatch_events_dropped_total", "sink" => "redis", "reason" => "undelivered");
            let mut batch = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match me.append_events(&batch, maxlen).await {
                        Ok(()) => {
                            written.increment(batch.len() as u64);
                            break;
                        }
                        Err(e) => {
                            failures.increment(1);
                            if attempt >= ATTEMPTS {
                                tracing::warn!(error = %e, events = batch.len(), "events not appended to the Redis stream; dropped");
                                dropped.increment(batch.len() as u64);
                                break;
                            }
                            tracing::debug!(error = %e, attempt, "appending events to the Redis stream failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        }
                    }
                }
                batch.clear();
            }
        })
    }
}
