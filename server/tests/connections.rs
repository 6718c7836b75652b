//! Connection limits of `hexmatch serve`, against the real binary: a
//! client that trickles its headers or says nothing is cut off at the
//! header-read timeout, an idle keep-alive connection is closed at the
//! (longer) idle timeout, requests hyper cannot parse get JSON errors, and
//! at the process's file limit, under a slowloris, ordinary requests keep
//! being answered.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Node;

fn addr(node: &Node) -> String {
    node.base.trim_start_matches("http://").to_owned()
}

/// Whether the server closed `s`: a read returns end-of-stream (or the
/// connection was reset) within `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A 408 or other bytes before the close: keep reading.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn a_client_trickling_its_headers_is_cut_off() {
    let node = Node::spawn(&["--header-read-timeout-ms", "500"]);
    let mut s = TcpStream::connect(addr(&node)).expect("connect");
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    // One more header byte every 100 ms: each byte arrives well within
    // the timeout, the whole head never does.
    let started = Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(20) {
        if s.write_all(b"X").is_err() || closed_within(&mut s, Duration::from_millis(100)) {
            cut = true;
            break;
        }
    }
    assert!(cut, "a trickling client kept its connection for 20 s");
}

/// Sends one request on `s` and reads its answer (one read: the answers
/// here are small).
fn answer(s: &mut TcpStream, request: &[u8]) -> String {
    s.write_all(request).expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).expect("an answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Between requests the idle timeout applies, not the header-read one: a
/// keep-alive connection outlives the header timeout, serves a second
/// request, and is closed once idle past the idle timeout.
#[test]
fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let node = Node::spawn(&[
        "--header-read-timeout-ms",
        "300",
        "--idle-timeout-ms",
        "2500",
    ]);
    let mut s = TcpStream::connect(addr(&node)).expect("connect");
    let get = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n";
    let first = answer(&mut s, get);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        !closed_within(&mut s, Duration::from_millis(1200)),
        "closed at the header-read timeout while idle"
    );
    let second = answer(&mut s, get);
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    let idle = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(20)),
        "an idle keep-alive connection stayed open for 20 s"
    );
    assert!(
        idle.elapsed() >= Duration::from_secs(2),
        "closed after {:?}",
        idle.elapsed()
    );
}

/// A new connection that sends nothing is closed at the header-read
/// timeout, not the longer idle one.
#[test]
fn a_silent_new_connection_is_closed_at_the_header_timeout() {
    let node = Node::spawn(&[
        "--header-read-timeout-ms",
        "300",
        "--idle-timeout-ms",
        "60000",
    ]);
    let mut s = TcpStream::connect(addr(&node)).expect("connect");
    assert!(
        closed_within(&mut s, Duration::from_secs(20)),
        "a silent connection stayed open for 20 s"
    );
}

/// A body sent after `100 Continue` is part of the request, not the next
/// head: an upload slower than the header-read timeout is not cut off.
#[test]
fn a_slow_body_after_100_continue_is_not_cut_off() {
    let node = Node::spawn(&["--header-read-timeout-ms", "300"]);
    let mut s = TcpStream::connect(addr(&node)).expect("connect");
    let body = br#"{"lat": 41.88, "lon": -87.63}"#;
    let head = format!(
        "PUT /v1/drivers/slow HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    let cont = answer(&mut s, head.as_bytes());
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont}");
    // The body, one byte every 40 ms: over a second in all, four header
    // timeouts; the answer comes after the last byte.
    let (last, slow) = body.split_last().expect("a body");
    for b in slow {
        s.write_all(&[*b]).expect("the connection stays open");
        std::thread::sleep(Duration::from_millis(40));
    }
    let done = answer(&mut s, &[*last]);
    assert!(done.starts_with("HTTP/1.1 200"), "{done}");
}

/// The answers hyper writes itself, for requests it cannot parse, carry the
/// JSON error shape of every other error.
#[test]
fn unparsable_requests_get_json_errors() {
    let node = Node::spawn(&[]);
    let long_uri = format!(
        "GET /v1/drivers/nearest?lat=1&x={} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(70_000)
    );
    let many_headers = format!(
        "GET /livez HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..150)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<Vec<_>>()
            .concat()
    );
    // Well past the read buffer: hyper checks the head's size only while
    // it is incomplete, so a head that arrives whole in one last read of
    // the buffer's growth (here, 500 KB sometimes) is parsed.
    let huge_header = format!(
        "GET /livez HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(2_000_000)
    );
    for (request, status, code) in [
        (long_uri.as_str(), "414", "uri_too_long"),
        (many_headers.as_str(), "431", "headers_too_large"),
        (huge_header.as_str(), "431", "headers_too_large"),
        (
            "GARBAGE\u{1} / HTTP/1.1\r\n\r\n",
            "400",
            "malformed_request",
        ),
        (
            "GET /livez HTTP/1.1\r\nno colon here\r\n\r\n",
            "400",
            "malformed_request",
        ),
    ] {
        let mut s = TcpStream::connect(addr(&node)).expect("connect");
        // The server may answer and close before it has read everything.
        let _ = s.write_all(request.as_bytes());
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut text = Vec::new();
        let _ = s.read_to_end(&mut text);
        let text = String::from_utf8_lossy(&text);
        let (head, body) = text.split_once("\r\n\r\n").expect("a full answer");
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{code}: {head}"
        );
        assert!(head.contains("content-type: application/json"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        assert_eq!(v["error"]["code"], code, "{text}");
    }
    // The server still answers.
    let mut s = TcpStream::connect(addr(&node)).expect("connect");
    let ok = answer(&mut s, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

/// The finding: with the file limit at 1024, 1,100 slow connections made
/// every other request time out. Here too: the server runs at 1024 open
/// files and 1,100 slow clients hold connections; ordinary requests are
/// still answered.
#[test]
fn under_a_slowloris_at_the_file_limit_requests_are_answered() {
    raise_own_file_limit(4096);
    let node = Node::spawn_with_fd_limit(1024, &["--header-read-timeout-ms", "500"]);
    let target = addr(&node);
    let mut slow: Vec<TcpStream> = Vec::new();
    for _ in 0..1_100 {
        // Past the cap the kernel's backlog holds them; the connect itself
        // succeeds either way.
        if let Ok(mut s) = TcpStream::connect(&target) {
            let _ = s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n");
            slow.push(s);
        }
    }
    assert!(slow.len() >= 1_000, "only {} slow connections", slow.len());
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    for _ in 0..3 {
        let r = http
            .get(format!("{}/livez", node.base))
            .send()
            .expect("answered under the slowloris");
        assert_eq!(r.status(), 200);
    }
    let metrics = http
        .get(format!("{}/metrics", node.base))
        .send()
        .expect("metrics")
        .text()
        .expect("text");
    let open: f64 = metrics
        .lines()
        .find(|l| l.starts_with("hexmatch_process_open_fds "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("open fds reported");
    assert!(open < 1024.0, "{open} descriptors open at a limit of 1024");
    drop(slow);
}

/// Makes sure this test process may open `n` files (the slow clients'
/// sockets), raising its soft limit with `prlimit` when it is lower.
fn raise_own_file_limit(n: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("limits");
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0);
    if soft >= n {
        return;
    }
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={n}:"))
        .status()
        .expect("prlimit runs");
    assert!(
        status.success(),
        "could not raise the open-file limit to {n}"
    );
}
