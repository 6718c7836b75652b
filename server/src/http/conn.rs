//! One connection's byte stream, between the socket and hyper: the
//! header-read deadline and JSON bodies for the errors hyper answers
//! itself.
//!
//! - **Header-read deadline.** A request's head must arrive within
//!   `header_read_timeout` of its first byte (of the accept, for a new
//!   connection). The deadline is armed by the first byte read while the
//!   connection waits for a head, unless that read holds the whole head,
//!   and disarmed when hyper hands the request to the service
//!   ([`ConnPhase::request_started`]). Writing a final response (not a
//!   `100 Continue`) puts the connection back to waiting; between requests
//!   the idle keep-alive timeout (hyper's timer, set by the accept loop)
//!   applies instead. After a `101 Switching Protocols` the stream belongs to the
//!   WebSocket and no deadline applies.
//! - **JSON error bodies.** When hyper cannot parse a request it answers
//!   400, 414 or 431 itself, with an empty body, and closes. Those answers
//!   are recognised on the way out (hyper's exact head: `connection:
//!   close` and `content-length: 0`, which the application's own errors
//!   never combine) and rewritten with the JSON error shape of every other
//!   error: `malformed_request`, `uri_too_long`, `headers_too_large`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::error::{ErrorBody, ErrorCode, ErrorDetail};

/// Where a connection is in its request cycle; shared between the stream
/// and the service that sees the requests.
#[derive(Debug, Default)]
pub(super) struct ConnPhase(AtomicU8);

const WAITING: u8 = 0;
const IN_REQUEST: u8 = 1;
const UPGRADED: u8 = 2;

impl ConnPhase {
    /// Hyper has parsed a request's head: the header deadline is off.
    pub(super) fn request_started(&self) {
        let _ = self
            .0
            .compare_exchange(WAITING, IN_REQUEST, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, phase: u8) {
        self.0.store(phase, Ordering::Relaxed);
    }
}

/// A socket with the header deadline and the error-body rewrite.
pub(super) struct GuardedIo<S> {
    inner: S,
    phase: Arc<ConnPhase>,
    header_read_timeout: Duration,
    /// Armed while a head is awaited and has started (or the connection
    /// is new).
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes of a rewritten error answer not yet written.
    pending: Vec<u8>,
}

impl<S> GuardedIo<S> {
    /// Wraps a new connection; its first head is due within
    /// `header_read_timeout`.
    pub(super) fn new(inner: S, phase: Arc<ConnPhase>, header_read_timeout: Duration) -> Self {
        Self {
            inner,
            phase,
            header_read_timeout,
            deadline: Some(Box::pin(tokio::time::sleep(header_read_timeout))),
            pending: Vec::new(),
        }
    }
}

impl<S: AsyncWrite + Unpin> GuardedIo<S> {
    /// Writes what is left of a rewritten answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.phase.get() != WAITING {
            this.deadline = None;
        } else if let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received within the header-read timeout",
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && this.deadline.is_none()
            && this.phase.get() == WAITING
            && !whole_head(&buf.filled()[before..])
        {
            let mut d = Box::pin(tokio::time::sleep(this.header_read_timeout));
            // Registers the waker, so the deadline fires even if no more
            // bytes come.
            let _ = d.as_mut().poll(cx);
            this.deadline = Some(d);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if let Some(status) = buf.strip_prefix(b"HTTP/1.1 ") {
            if status.starts_with(b"101 ") {
                this.phase.set(UPGRADED);
            } else if !status.starts_with(b"1") && this.phase.get() != UPGRADED {
                // A final answer (not `100 Continue`, after which the body
                // still comes): the next bytes are the next request's.
                this.phase.set(WAITING);
                this.deadline = None;
            }
            if let Some(answer) = rewrite_parse_error(buf) {
                this.pending = answer;
                // The original is consumed whole; the rewrite is written
                // now or on the next write, flush or shutdown.
                let _ = this.poll_pending(cx)?;
                return Poll::Ready(Ok(buf.len()));
            }
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether one read holds a whole request head: it starts with the request
/// line and ends with the blank line. Most requests arrive so, in one
/// packet, and need no deadline: hyper hands them to the service at once.
/// (Blank lines alone, which a parser skips before a request line, do not
/// count, so sending only those cannot dodge the deadline.)
fn whole_head(read: &[u8]) -> bool {
    read.ends_with(b"\r\n\r\n") && !matches!(read.first(), Some(b'\r' | b'\n'))
}

/// Hyper's own answer to a request it could not parse, with the JSON
/// error body added; `None` for any other bytes.
fn rewrite_parse_error(head: &[u8]) -> Option<Vec<u8>> {
    let (code, message) = match head.get(9..13)? {
        b"400 " => (
            ErrorCode::MalformedRequest,
            "the request line or a header is not valid HTTP/1.1",
        ),
        b"414 " => (
            ErrorCode::UriTooLong,
            "the request target (path and query) is too long",
        ),
        b"431 " => (
            ErrorCode::HeadersTooLarge,
            "the request has too many headers, or they are too large",
        ),
        _ => return None,
    };
    let text = std::str::from_utf8(head).ok()?;
    let (head_text, rest) = text.split_once("\r\n\r\n")?;
    let lines: Vec<&str> = head_text.split("\r\n").collect();
    let is_hyper_error = rest.is_empty()
        && lines.contains(&"connection: close")
        && lines.contains(&"content-length: 0");
    if !is_hyper_error {
        return None;
    }
    let body = serde_json::to_string(&ErrorBody {
        error: ErrorDetail {
            code,
            message: message.to_owned(),
        },
    })
    .ok()?;
    let mut out = String::with_capacity(head_text.len() + body.len() + 64);
    for line in lines {
        if line == "content-length: 0" {
            out.push_str("content-type: application/json\r\ncontent-length: ");
            out.push_str(&body.len().to_string());
            out.push_str("\r\n");
        } else {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_error_heads_get_json_bodies() {
        for (status, code) in [
            ("400 Bad Request", "malformed_request"),
            ("414 URI Too Long", "uri_too_long"),
            ("431 Request Header Fields Too Large", "headers_too_large"),
        ] {
            let head = format!(
                "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 21:24:39 GMT\r\n\r\n"
            );
            let out = String::from_utf8(rewrite_parse_error(head.as_bytes()).unwrap()).unwrap();
            let (h, body) = out.split_once("\r\n\r\n").unwrap();
            assert!(h.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{out}");
            assert!(
                h.contains("\r\ncontent-type: application/json\r\n"),
                "{out}"
            );
            assert!(
                h.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
                "{out}"
            );
            assert!(h.contains("\r\nconnection: close\r\n"), "{out}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"]["code"], code, "{out}");
        }
    }

    #[test]
    fn a_whole_head_in_one_read_needs_no_deadline() {
        assert!(whole_head(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(!whole_head(b"GET /livez HTTP/1.1\r\nHost: x\r\n"));
        assert!(!whole_head(b"\r\n\r\n"));
        assert!(!whole_head(b"\r\nGET / HTTP/1.1\r\n\r\n"));
        assert!(!whole_head(b""));
    }

    #[test]
    fn other_answers_pass_unchanged() {
        for head in [
            // The application's own 400: a body, no close.
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n",
            // Hyper's shape but another status.
            "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            // Head and body in one write.
            "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\nx",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 4",
        ] {
            assert_eq!(rewrite_parse_error(head.as_bytes()), None, "{head}");
        }
    }
}
