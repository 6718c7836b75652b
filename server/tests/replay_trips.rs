//! `hexmatch replay trips` and `replay positions --server` as a user runs
//! them: the summary, the report and plot files, bad input, exit codes, and
//! the same replay through a real server on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hexmatch_server::ServeConfig;

fn hexmatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hexmatch"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn data(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(name)
        .to_str()
        .expect("utf-8 path")
        .to_owned()
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hexmatch-replay-trips-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn temp_file(name: &str, body: &str) -> PathBuf {
    let path = temp_dir().join(name);
    std::fs::write(&path, body).expect("write");
    path
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The first `n` trips of the Chicago file (it is sorted by pickup time).
fn chicago_head(n: usize) -> PathBuf {
    let all = std::fs::read_to_string(data("chicago_trips.csv")).expect("data/");
    let head: Vec<&str> = all.lines().take(n + 1).collect();
    temp_file(&format!("chicago_head_{n}.csv"), &(head.join("\n") + "\n"))
}

/// Runs `f` with a server listening on 127.0.0.1 (an ephemeral port).
fn with_server<T>(f: impl FnOnce(&str, &hexmatch::Engine) -> T) -> T {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let config = ServeConfig {
        bind: "127.0.0.1:0".parse().expect("addr"),
        ..ServeConfig::default()
    };
    let server = rt
        .block_on(hexmatch_server::start(config))
        .expect("server starts");
    let url = format!("http://{}", server.addr());
    let out = f(&url, server.engine());
    rt.block_on(server.shutdown());
    out
}

#[test]
fn replays_the_chicago_day_with_summary_report_and_plot() {
    let dir = temp_dir();
    let report = dir.join("chicago.json");
    let plot = dir.join("chicago.svg");
    let args = |report: &Path| {
        vec![
            "replay".to_owned(),
            "trips".to_owned(),
            data("chicago_trips.csv"),
            "--fold-day".to_owned(),
            "--drivers".to_owned(),
            "250".to_owned(),
            "--update-every".to_owned(),
            "30s".to_owned(),
            "--no-timings".to_owned(),
            "--report".to_owned(),
            report.display().to_string(),
        ]
    };
    let mut first: Vec<String> = args(&report);
    first.extend(["--plot".to_owned(), plot.display().to_string()]);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    let stdout = ok(&hexmatch(&first));
    assert!(
        stdout.contains("trips            11615  folded onto 2013-01-01"),
        "{stdout}"
    );
    assert!(
        stdout.contains("policy         nearest  patience 5m"),
        "{stdout}"
    );
    assert!(stdout.contains("timings      off"), "{stdout}");

    let json = std::fs::read_to_string(&report).expect("report written");
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(v["trips"], 11_615);
    assert_eq!(
        v["served"].as_u64().unwrap() + v["unserved"].as_u64().unwrap(),
        11_615
    );
    assert_eq!(
        (v["drivers"].as_u64(), v["seed"].as_u64()),
        (Some(250), Some(1))
    );
    let served_line = format!(
        "served       {:>9}  ({:.2} %)",
        v["served"].as_u64().unwrap(),
        v["served_pct"].as_f64().unwrap()
    );
    assert!(stdout.contains(&served_line), "{served_line:?} in {stdout}");

    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("Wait for pickup") && svg.contains("Fleet over time"));

    // Same seed, same input: the same report and plot, byte for byte.
    let again = dir.join("chicago_again.json");
    let plot_again = dir.join("chicago_again.svg");
    let mut second: Vec<String> = args(&again);
    second.extend(["--plot".to_owned(), plot_again.display().to_string()]);
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    ok(&hexmatch(&second));
    assert_eq!(std::fs::read(&again).unwrap(), json.as_bytes());
    assert_eq!(std::fs::read(&plot_again).unwrap(), svg.as_bytes());
}

#[test]
fn bad_rows_are_skipped_with_line_numbers_or_fail_in_strict_mode() {
    let csv = temp_file(
        "bad_trips.csv",
        "trip_id,pickup_time,pickup_lat,pickup_lon,dropoff_time,dropoff_lat,dropoff_lon\n\
         a,2026-01-05T08:00:00Z,41.88,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
         b,2026-01-05T08:00:00Z,95.0,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n\
         c,2026-01-05T08:01:00Z,41.87,-87.62,2026-01-05T08:11:00Z,41.86,-87.65\n\
         a,2026-01-05T08:02:00Z,41.88,-87.63,2026-01-05T08:10:00Z,41.90,-87.64\n",
    );
    let path = csv.to_str().expect("utf-8");
    let out = hexmatch(&["replay", "trips", path, "--drivers", "3"]);
    let stdout = ok(&out);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("bad_trips.csv:3: pickup: invalid position: lat 95"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad_trips.csv:5: duplicate trip_id a (first on line 2)"),
        "{stderr}"
    );
    assert!(stdout.contains("trips                2"), "{stdout}");
    assert!(
        stdout.contains("bad rows             2  skipped"),
        "{stdout}"
    );

    let out = hexmatch(&["replay", "trips", path, "--strict"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("bad_trips.csv:3: pickup: invalid position"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn usage_and_file_errors_exit_2() {
    let missing = hexmatch(&["replay", "trips", "/nonexistent/trips.csv"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("/nonexistent/trips.csv"));

    let no_header = temp_file("no_header.csv", "id,when\n1,2\n");
    let out = hexmatch(&["replay", "trips", no_header.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no_header.csv:1: header has no trip_id column"),
        "{}",
        text(&out.stderr)
    );

    let trips = chicago_head(20);
    let trips = trips.to_str().expect("utf-8");
    for bad in [
        vec!["--speed-kmh", "0"],
        vec!["--detour", "0.5"],
        vec!["--patience", "0s"],
        vec!["--patience", "5 fortnights"],
        vec!["--realtime", "fast"],
        vec!["--policy", "random"],
        vec!["--policy", "batch", "--candidates", "0"],
        vec!["--policy", "batch", "--window", "0s"],
        vec!["--server", "https://127.0.0.1:1"],
    ] {
        let mut args = vec!["replay", "trips", trips];
        args.extend(&bad);
        let out = hexmatch(&args);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
    }
    assert!(hexmatch(&["replay", "trips", "--help"]).status.success());
}

#[test]
fn the_same_replay_through_a_server_gives_the_same_report() {
    let trips = chicago_head(400);
    let dir = temp_dir();
    for policy in ["nearest", "batch"] {
        let local = dir.join(format!("local_{policy}.json"));
        let remote = dir.join(format!("remote_{policy}.json"));
        let args = |report: &Path| {
            vec![
                "replay".to_owned(),
                "trips".to_owned(),
                trips.display().to_string(),
                "--fold-day".to_owned(),
                "--drivers".to_owned(),
                "30".to_owned(),
                "--policy".to_owned(),
                policy.to_owned(),
                "--no-timings".to_owned(),
                "--report".to_owned(),
                report.display().to_string(),
            ]
        };
        let local_args = args(&local);
        ok(&hexmatch(
            &local_args.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let stdout = with_server(|url, engine| {
            let mut remote_args = args(&remote);
            remote_args.extend(["--server".to_owned(), url.to_owned()]);
            let out = ok(&hexmatch(
                &remote_args.iter().map(String::as_str).collect::<Vec<_>>(),
            ));
            // The server saw the fleet, and every match ended.
            assert_eq!(engine.len(), 30);
            assert_eq!(engine.live_matches(), 0);
            assert_eq!(engine.counts().available, 30);
            out
        });
        assert!(stdout.contains("served"), "{stdout}");
        let local = std::fs::read_to_string(&local).expect("local report");
        let remote = std::fs::read_to_string(&remote).expect("remote report");
        assert_eq!(
            local, remote,
            "{policy}: in-process and server replays differ"
        );
        let v: serde_json::Value = serde_json::from_str(&local).expect("JSON");
        assert!(v["served"].as_u64().unwrap() > 100, "{local}");
    }
}

#[test]
fn a_second_replay_against_the_same_server_starts_clean() {
    let trips = chicago_head(60);
    let trips = trips.to_str().expect("utf-8");
    with_server(|url, engine| {
        let run = || {
            text(
                &hexmatch(&[
                    "replay",
                    "trips",
                    trips,
                    "--drivers",
                    "10",
                    "--no-timings",
                    "--server",
                    url,
                ])
                .stdout,
            )
        };
        let first = run();
        let second = run();
        assert!(first.contains("served"), "{first}");
        assert_eq!(first, second);
        assert_eq!(engine.len(), 10);
    });
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let trips = chicago_head(5);
    let out = hexmatch(&[
        "replay",
        "trips",
        trips.to_str().expect("utf-8"),
        "--server",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("backend: DELETE /v1/drivers/d00001"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn positions_go_to_a_server_in_batches() {
    let all = std::fs::read_to_string(data("nyharbor_ais_positions.csv")).expect("data/");
    let head: Vec<&str> = all.lines().take(2501).collect();
    let file = temp_file("ais_head.csv", &(head.join("\n") + "\n"));
    let vessels: std::collections::BTreeSet<&str> = head[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap())
        .collect();
    with_server(|url, engine| {
        let out = hexmatch(&[
            "replay",
            "positions",
            file.to_str().expect("utf-8"),
            "--server",
            url,
        ]);
        let stdout = ok(&out);
        assert!(stdout.contains(&format!("sent to {url}")), "{stdout}");
        assert!(stdout.contains("rows            2500"), "{stdout}");
        assert!(stdout.contains("applied         2500"), "{stdout}");
        assert_eq!(engine.len(), vessels.len());
    });
    // The in-process replay of the same rows agrees.
    let stdout = ok(&hexmatch(&[
        "replay",
        "positions",
        file.to_str().expect("utf-8"),
    ]));
    assert!(stdout.contains("applied         2500"), "{stdout}");
    assert!(
        stdout.contains(&format!("drivers   {:>10}", vessels.len())),
        "{stdout}"
    );
}

#[test]
fn positions_realtime_needs_timestamps() {
    let file = temp_file("no_ts.csv", "driver_id,lat,lon\na,41.88,-87.63\n");
    let out = hexmatch(&[
        "replay",
        "positions",
        file.to_str().expect("utf-8"),
        "--realtime",
        "60x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no_ts.csv:1: --realtime 60x needs a ts or timestamp column"),
        "{}",
        text(&out.stderr)
    );
}
