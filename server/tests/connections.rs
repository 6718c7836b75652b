//! Connection limits of `hexmatch serve`, against the real binary: a
//! client that trickles its headers is cut off, an idle keep-alive
//! connection is closed, and at the process's file limit, under a
//! slowloris, ordinary requests keep being answered.

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

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let node = Node::spawn(&["--header-read-timeout-ms", "500"]);
    let mut s = TcpStream::connect(addr(&node)).expect("connect");
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).expect("a response");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(
        closed_within(&mut s, Duration::from_secs(20)),
        "an idle keep-alive connection stayed open for 20 s"
    );
}

/// The finding: with the file limit at 1024, 1,100 slow connections made
/// every other request time out. Here the limit is 256 and 400 slow
/// clients hold connections; ordinary requests are still answered.
#[test]
fn under_a_slowloris_at_the_file_limit_requests_are_answered() {
    let node = Node::spawn_with_fd_limit(256, &["--header-read-timeout-ms", "500"]);
    let target = addr(&node);
    let mut slow: Vec<TcpStream> = Vec::new();
    for _ in 0..400 {
        // Past the cap the kernel's backlog holds them; the connect itself
        // succeeds either way.
        if let Ok(mut s) = TcpStream::connect(&target) {
            let _ = s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n");
            slow.push(s);
        }
    }
    assert!(slow.len() >= 300, "only {} slow connections", slow.len());
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
    assert!(open < 256.0, "{open} descriptors open at a limit of 256");
    drop(slow);
}
