//! The accept loop: connections, with limits a public deployment can keep.
//!
//! - **Header-read timeout.** A client must send a request's head within
//!   `header_read_timeout` of its first byte, or of the accept for a new
//!   connection (see `http/conn.rs`). So a client that trickles a
//!   header byte at a time (slowloris), or connects and says nothing, is
//!   cut off.
//! - **Idle timeout.** A keep-alive connection may wait `idle_timeout`
//!   for its next request (hyper's timer, which also bounds idle wait plus
//!   head). Longer than the header-read timeout, so a load balancer's
//!   pooled connections are not closed under it.
//! - **Hyper's own answers** to requests it cannot parse (400, 414, 431)
//!   get the JSON error body (see `http/conn.rs`).
//! - **A cap on open connections.** At most `max_connections` at once;
//!   past it the loop stops accepting and new connections wait in the
//!   kernel's backlog until one closes, rather than the process running
//!   out of file descriptors. The default is set from the process's
//!   file limit, leaving room for Redis, peers and files.
//! - **Accept errors back off.** Out of descriptors or memory, the loop
//!   waits 100 ms before it accepts again, and logs the error at most once
//!   every 10 s (counted in `hexmatch_accept_errors_total`).
//! - **Graceful shutdown.** On the signal the loop stops accepting, every
//!   connection finishes its in-flight request and closes, and `serve`
//!   returns when the last one has.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use metrics::{counter, gauge};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt as _;

use super::conn::{ConnPhase, GuardedIo};

/// Limits on connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time a client has to send a request's head, from its first byte.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

/// Descriptors kept free of connections (Redis, peers, files, the listener).
const RESERVED_FDS: usize = 128;

/// The connection cap for a process allowed `fd_limit` open files.
pub fn default_max_connections(fd_limit: usize) -> usize {
    fd_limit.saturating_sub(RESERVED_FDS).max(16)
}

/// The process's soft limit of open files (Linux `/proc/self/limits`),
/// if it can be read and is finite.
pub fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Serves `app` on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Connections hold a receiver; the loop waits for them all to drop it.
    let (signal_tx, signal_rx) = watch::channel(());
    let (close_tx, close_rx) = watch::channel(());
    let mut last_logged: Option<Instant> = None;
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    drop(permit);
                    accept_error(&e, &mut last_logged).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut signal = signal_rx.clone();
        let close = close_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            gauge!("hexmatch_http_connections").increment(1.0);
            let phase = Arc::new(ConnPhase::default());
            let io = GuardedIo::new(stream, Arc::clone(&phase), limits.header_read_timeout);
            let service = app.map_request(move |mut req: Request<Incoming>| {
                phase.request_started();
                req.extensions_mut().insert(ConnectInfo(peer));
                req.map(Body::new)
            });
            let service = TowerToHyperService::new(service);
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.idle_timeout.max(limits.header_read_timeout));
            let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::trace!(error = %e, %peer, "connection ended with an error");
                        }
                        break;
                    }
                    _ = signal.changed() => conn.as_mut().graceful_shutdown(),
                }
            }
            gauge!("hexmatch_http_connections").decrement(1.0);
            drop(close);
        });
    }
    drop(listener);
    let _ = signal_tx.send(());
    drop(signal_rx);
    drop(close_rx);
    close_tx.closed().await;
}

/// Logs (at most every 10 s) and backs off after an accept error.
async fn accept_error(e: &std::io::Error, last_logged: &mut Option<Instant>) {
    counter!("hexmatch_accept_errors_total").increment(1);
    // Errors about one connection (reset, aborted) need no pause; running
    // out of descriptors or memory does, or the loop would spin.
    let transient = matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
    );
    if transient {
        return;
    }
    if last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        tracing::error!(error = %e, "accept failed; backing off (logged at most every 10 s)");
        *last_logged = Some(Instant::now());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_everything_else() {
        assert_eq!(default_max_connections(1024), 896);
        assert_eq!(default_max_connections(100), 16);
        assert!(open_files_limit().is_some_and(|n| n > 0));
    }
}
