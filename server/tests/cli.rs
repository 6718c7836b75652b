//! The `hexmatch` binary as a user runs it: exit codes and messages.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn hexmatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hexmatch"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn temp_csv(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hexmatch-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write");
    path
}

#[test]
fn replays_the_bundled_ais_log() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/nyharbor_ais_positions.csv");
    let out = hexmatch(&["replay", "positions", data.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("applied       150269"), "{stdout}");
    assert!(stdout.contains("drivers          112"), "{stdout}");
    assert!(stdout.contains("nearest 5 to"), "{stdout}");
}

#[test]
fn bad_rows_are_skipped_with_line_numbers_or_fail_in_strict_mode() {
    let csv = temp_csv(
        "bad.csv",
        "driver_id,ts,lat,lon\n\
         a,2026-11-25T10:00:00Z,41.88,-87.63\n\
         b,2026-11-25T10:00:00Z,95.0,-87.63\n\
         a,2026-11-25T09:00:00Z,41.89,-87.63\n\
         c d,2026-11-25T10:00:00Z,41.88,-87.63\n",
    );
    let path = csv.to_str().expect("utf-8 path");
    let out = hexmatch(&["replay", "positions", path]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("applied            1") && stdout.contains("stale              1"),
        "{stdout}"
    );
    assert!(stdout.contains("rejected           2"), "{stdout}");
    assert!(
        stderr.contains("bad.csv:3: invalid position: lat 95"),
        "{stderr}"
    );
    assert!(stderr.contains("bad.csv:5: invalid id"), "{stderr}");

    let out = hexmatch(&["replay", "positions", "--strict", path]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.csv:3: invalid position"), "{stderr}");
}

#[test]
fn usage_and_file_errors_exit_2() {
    let missing = hexmatch(&["replay", "positions", "/nonexistent/file.csv"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/file.csv"));
    let no_header = temp_csv("noheader.csv", "x,y\n1,2\n");
    let out = hexmatch(&["replay", "positions", no_header.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("noheader.csv:1: header has no driver_id or vehicle_id column")
    );
    assert_eq!(hexmatch(&["replay", "positions"]).status.code(), Some(2));
    assert_eq!(hexmatch(&["frobnicate"]).status.code(), Some(2));
    assert!(
        hexmatch(&["replay", "positions", "--help"])
            .status
            .success()
    );
}

#[test]
fn serve_help_names_the_environment_and_a_misspelt_variable_is_named() {
    let out = hexmatch(&["serve", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "RUST_LOG",
        "HEXMATCH_LOG_JSON",
        "HEXMATCH_BIND",
        "--cluster-secret-file",
        "--max-clock-skew-ms",
        "MIMALLOC_ALLOW_THP",
    ] {
        assert!(
            help.contains(word),
            "`serve --help` does not mention {word}:\n{help}"
        );
    }
    // A cluster without Redis fails its config check (exit 2), after the
    // warning about the misspelt variable.
    let out = Command::new(env!("CARGO_BIN_EXE_hexmatch"))
        .args(["serve", "--cluster", "true"])
        .env("HEXMATCH_BIDN", "127.0.0.1:1")
        .output()
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(2));
    let log = String::from_utf8_lossy(&out.stderr);
    let warning = log
        .lines()
        .find(|l| l.contains("HEXMATCH_BIDN"))
        .unwrap_or_else(|| panic!("no warning naming HEXMATCH_BIDN:\n{log}"));
    assert!(warning.contains("HEXMATCH_BIND"), "{warning}");
    assert!(log.contains("--cluster needs"), "{log}");
}

/// `--cluster` is a switch: alone it means true (it demanded a value,
/// `--cluster true`, and refused the plain flag).
#[test]
fn cluster_is_a_plain_switch() {
    for args in [
        &["serve", "--cluster"][..],
        &["serve", "--cluster", "--bind", "127.0.0.1:1"],
    ] {
        let out = hexmatch(args);
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {log}");
        assert!(log.contains("--cluster needs"), "{args:?}: {log}");
    }
}

/// An address in use is named, with what to do (the message was the
/// system's alone: "Address already in use (os error 98)").
#[test]
fn an_address_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = hexmatch(&["serve", "--bind", &addr]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("cannot listen on {addr}")) && log.contains("--bind"),
        "{log}"
    );
}

/// `THP_enabled` of a serving `hexmatch serve` started with `env`, from
/// /proc.
#[cfg(target_os = "linux")]
fn serving_thp_enabled(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hexmatch"));
    cmd.args(["serve", "--bind", "127.0.0.1:0"])
        .env_remove("MIMALLOC_ALLOW_THP")
        .envs(env.iter().copied());
    let node = common::Node::spawn_command(cmd);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", node.pid())).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled in /proc status:\n{status}"))
        .trim()
        .to_owned()
}

/// The server keeps its heap off transparent huge pages (a fault in a
/// huge-page range may compact memory first: bulk loads and takeovers
/// took twice as long), unless the operator says otherwise.
#[cfg(target_os = "linux")]
#[test]
fn serve_keeps_its_heap_off_huge_pages_unless_told() {
    assert_eq!(serving_thp_enabled(&[]), "0");
    assert_eq!(serving_thp_enabled(&[("MIMALLOC_ALLOW_THP", "1")]), "1");
}

/// The systemd unit the README points to starts the binary with flags
/// that exist, and reads the environment file the docs describe.
#[test]
fn the_systemd_unit_names_real_flags() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/hexmatch.service"
    ))
    .expect("docs/hexmatch.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let help = String::from_utf8_lossy(&hexmatch(&["serve", "--help"]).stdout).into_owned();
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/hexmatch"));
    assert_eq!(words.next(), Some("serve"));
    for flag in words.filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "{flag} is not a flag of `serve`");
    }
    for line in unit.lines().filter(|l| l.starts_with("#   HEXMATCH_")) {
        let var = line
            .trim_start_matches("#   ")
            .split('=')
            .next()
            .unwrap_or("");
        assert!(
            help.contains(var) || {
                let flag = format!(
                    "--{}",
                    var.trim_start_matches("HEXMATCH_")
                        .to_lowercase()
                        .replace('_', "-")
                );
                help.contains(&flag)
            },
            "{var} names no flag of `serve`"
        );
    }
}
