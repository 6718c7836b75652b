//! Logging (tracing) and the Prometheus recorder.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds: 50 µs … 5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// The process-wide Prometheus recorder, installed on first use. Several
/// servers in one process (tests) share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)
                .map_or_else(
                    |_| PrometheusBuilder::new().build_recorder(),
                    PrometheusBuilder::build_recorder,
                );
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// Every metric's `# HELP` line (and unit), and the build's info.
fn describe() {
    use metrics::{Unit, describe_gauge, describe_histogram, gauge};
    describe_counters();
    let gauges = [
        ("hexmatch_cells", "Partition cells that have held drivers."),
        ("hexmatch_drivers", "Drivers, by status."),
        (
            "hexmatch_event_feed_clients",
            "SSE clients connected to /v1/events.",
        ),
        (
            "hexmatch_matches_live",
            "Matches holding a driver (reserved or confirmed).",
        ),
        (
            "hexmatch_redis_up",
            "1 while the last Redis health check answered, else 0.",
        ),
        (
            "hexmatch_snapshot_bytes",
            "Size of the last snapshot written.",
        ),
        (
            "hexmatch_snapshot_drivers",
            "Drivers in the last snapshot written.",
        ),
        (
            "hexmatch_build_info",
            "Always 1; the labels name the build.",
        ),
    ];
    for (name, help) in gauges {
        describe_gauge!(name, help);
    }
    describe_gauge!(
        "hexmatch_snapshot_taken_at_seconds",
        Unit::Seconds,
        "When the last snapshot written was taken (Unix time)."
    );
    let histograms = [
        (
            "hexmatch_http_request_duration_seconds",
            "HTTP request latency, by route and method.",
        ),
        (
            "hexmatch_takeover_restore_seconds",
            "Time to restore the regions of one takeover (the lease TTL must exceed it).",
        ),
        (
            "hexmatch_snapshot_duration_seconds",
            "Time to take and store a snapshot.",
        ),
    ];
    for (name, help) in histograms {
        describe_histogram!(name, Unit::Seconds, help);
    }
    gauge!("hexmatch_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    process::describe();
}

/// The process's own metrics, read from `/proc/self` when `/metrics` renders.
pub mod process {
    use metrics::{Unit, describe_gauge, gauge};

    pub(super) fn describe() {
        describe_gauge!(
            "hexmatch_process_resident_memory_bytes",
            Unit::Bytes,
            "Resident memory of the process."
        );
        describe_gauge!(
            "hexmatch_process_open_fds",
            "File descriptors the process has open (connections included)."
        );
        describe_gauge!(
            "hexmatch_process_cpu_seconds",
            Unit::Seconds,
            "CPU time the process has used, user and system."
        );
    }

    /// Sets the process gauges (Linux; elsewhere they stay unset).
    pub fn refresh() {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status")
            && let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        {
            gauge!("hexmatch_process_resident_memory_bytes").set(kb * 1024.0);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge!("hexmatch_process_open_fds").set(fds.count() as f64);
        }
        // utime and stime, fields 14 and 15, in clock ticks (100 a second
        // on Linux); the command name before them may hold spaces.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r)
        {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
            if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
                gauge!("hexmatch_process_cpu_seconds").set((user + system) / 100.0);
            }
        }
    }
}

/// Installs a `tracing` subscriber: `RUST_LOG` filter (default `info`),
/// JSON lines when `HEXMATCH_LOG_JSON=1`.
pub fn init_logging() {
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if std::env::var("HEXMATCH_LOG_JSON").is_ok_and(|v| v == "1") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The counters' `# HELP` lines.
fn describe_counters() {
    use metrics::describe_counter;
    let counters = [
        (
            "hexmatch_drivers_expired_total",
            "Drivers removed after sending no update for the driver TTL.",
        ),
        (
            "hexmatch_events_total",
            "Events published on this node's bus, by type.",
        ),
        (
            "hexmatch_events_dropped_total",
            "Events a sink lost, by sink (redis, webhook-<n>) and reason (queue_full: its queue was full; undelivered: every try failed).",
        ),
        (
            "hexmatch_event_feed_gaps_total",
            "Gaps announced on SSE feeds (events a client asked for were no longer held).",
        ),
        (
            "hexmatch_event_stream_appended_total",
            "Events appended to the Redis event stream.",
        ),
        (
            "hexmatch_event_stream_failures_total",
            "Appends of a batch of events to the Redis stream that failed.",
        ),
        (
            "hexmatch_webhook_deliveries_total",
            "Events a webhook receiver accepted (2xx), by hook.",
        ),
        (
            "hexmatch_webhook_failures_total",
            "Webhook POSTs that failed (no answer, or not 2xx), by hook.",
        ),
        (
            "hexmatch_forwarded_total",
            "Requests forwarded to the node that owns their region.",
        ),
        (
            "hexmatch_handoff_failures_total",
            "Driver updates refused because a node that may hold the driver did not hand it over.",
        ),
        (
            "hexmatch_http_requests_total",
            "HTTP requests, by route, method and status.",
        ),
        (
            "hexmatch_http_shed_total",
            "/v1 requests refused at once because too many were in flight.",
        ),
        (
            "hexmatch_location_updates_total",
            "Location updates, by result (applied, stale, rejected).",
        ),
        ("hexmatch_match_confirms_total", "Reservations confirmed."),
        (
            "hexmatch_match_ends_total",
            "Matches ended, by state (released, expired, completed).",
        ),
        (
            "hexmatch_matches_total",
            "Claims, by result (created, repeated, an error code, batch).",
        ),
        ("hexmatch_redis_errors_total", "Redis commands that failed."),
        (
            "hexmatch_region_takeovers_total",
            "Regions this node took over.",
        ),
        (
            "hexmatch_restore_warnings_total",
            "Problems met while restoring (skipped, never half-loaded).",
        ),
        ("hexmatch_snapshot_failures_total", "Snapshots that failed."),
        ("hexmatch_snapshots_total", "Snapshots written."),
        (
            "hexmatch_stream_entries_total",
            "Entries read from the Redis location stream.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, help);
    }
}
