//! Webhooks: every event sent (`POST`) to each configured URL, signed.
//!
//! # Delivery
//! One task per hook, fed by its own bounded queue from the event bus (a
//! full queue drops the event and counts it: a request never waits for a
//! hook). The task takes what has queued, up to [`BATCH`] events, and
//! POSTs them as one JSON array of events (the shape of the SSE feed's
//! `data`), in id order. A batch the receiver does not answer 2xx in
//! [`TIMEOUT`] is sent again after 100 ms, 200 ms, 400 ms, … (at most
//! [`MAX_BACKOFF`] apart), [`ATTEMPTS`] times in all, then dropped and
//! counted. A batch is delivered at least once: a receiver that answered
//! too late may get it twice, and can tell by the event ids.
//!
//! # Signature
//! `x-hexmatch-signature: sha256=<hex>`, the HMAC-SHA256 of the exact
//! body bytes under `--webhook-secret`. A receiver recomputes it over the
//! body as received and compares in constant time.
//!
//! # Metrics (label `hook`: the hook's position in the flags, from 1)
//! `hexmatch_webhook_deliveries_total` (events delivered),
//! `hexmatch_webhook_failures_total` (attempts that failed),
//! `hexmatch_events_dropped_total{sink="webhook-<n>"}` (events dropped:
//! `reason="queue_full"` or `"undelivered"`).

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use metrics::counter;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::EventBus;
use crate::wire::SharedEvent;

/// Most events in one POST.
pub const BATCH: usize = 100;
/// Tries of one batch before it is dropped.
pub const ATTEMPTS: u32 = 8;
/// How long one POST may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest pause between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The signature's header.
pub const SIGNATURE_HEADER: &str = "x-hexmatch-signature";

/// The header value signing `body` with `secret`: `sha256=<hex>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(e) => unreachable!("HMAC accepts keys of every length: {e}"),
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// The body of a batch: a JSON array of the events.
fn body(batch: &[Arc<SharedEvent>]) -> String {
    let mut out =
        String::with_capacity(2 + batch.iter().map(|e| e.json().len() + 1).sum::<usize>());
    out.push('[');
    for (i, e) in batch.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(e.json());
    }
    out.push(']');
    out
}

/// Starts one delivery task per URL, each fed by a queue of `queue`
/// events from `bus`.
///
/// # Errors
/// The HTTP client cannot be built (no usable TLS or resolver config).
pub fn spawn(
    bus: &EventBus,
    urls: &[String],
    secret: &str,
    queue: usize,
) -> Result<Vec<JoinHandle<()>>, String> {
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| format!("webhook client: {e}"))?;
    let secret: Arc<[u8]> = secret.as_bytes().into();
    Ok(urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let hook = (i + 1).to_string();
            let rx = bus.add_sink(&format!("webhook-{hook}"), queue);
            tokio::spawn(deliver(
                client.clone(),
                url.clone(),
                hook,
                Arc::clone(&secret),
                rx,
            ))
        })
        .collect())
}

/// Delivers one hook's queue until the bus is gone.
async fn deliver(
    client: reqwest::Client,
    url: String,
    hook: String,
    secret: Arc<[u8]>,
    mut rx: mpsc::Receiver<Arc<SharedEvent>>,
) {
    let delivered = counter!("hexmatch_webhook_deliveries_total", "hook" => hook.clone());
    let failures = counter!("hexmatch_webhook_failures_total", "hook" => hook.clone());
    let dropped = counter!("hexmatch_events_dropped_total", "sink" => format!("webhook-{hook}"), "reason" => "undelivered");
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let body = body(&batch);
        let signed = signature(&secret, body.as_bytes());
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            let sent = client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, &signed)
                .body(body.clone())
                .send()
                .await;
            let failure = match sent {
                Ok(r) if r.status().is_success() => {
                    delivered.increment(batch.len() as u64);
                    break;
                }
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            failures.increment(1);
            if attempt == ATTEMPTS {
                tracing::warn!(hook = %hook, error = %failure, events = batch.len(), "webhook batch undelivered; dropped");
                dropped.increment(batch.len() as u64);
                break;
            }
            tracing::debug!(hook = %hook, error = %failure, attempt, "webhook delivery failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
