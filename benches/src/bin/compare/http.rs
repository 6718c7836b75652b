//! hexmatch over HTTP: the real server (`hexmatch_server::start`) on
//! 127.0.0.1:0 in its own runtime, and a bare keep-alive HTTP/1.1 client
//! (hyper's connection API: one TCP connection per client task, no pool,
//! no redirects, no compression) so the client costs as little as the
//! Redis and PostgreSQL drivers do.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::answers::{Answer, Case};

/// The body of a nearest answer (only what is compared).
#[derive(Deserialize)]
struct NearestOut {
    drivers: Vec<Found>,
}

#[derive(Deserialize)]
struct Found {
    driver_id: String,
    distance_m: f64,
}

/// One keep-alive connection to the server.
pub(crate) struct Client {
    sender: SendRequest<Empty<Bytes>>,
    /// Requests sent.
    pub(crate) round_trips: u64,
}

impl Client {
    /// Connects to `addr` (TCP, `TCP_NODELAY`) and spawns the connection
    /// driver on the current runtime.
    pub(crate) async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server closes.
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            round_trips: 0,
        })
    }

    /// `GET /v1/drivers/nearest` for the case.
    pub(crate) async fn nearest(&mut self, case: &Case) -> Result<Answer, String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection closed: {e}"))?;
        let req = Request::get(case.uri.clone())
            .header(header::HOST, "127.0.0.1")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        self.round_trips += 1;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        let out: NearestOut =
            serde_json::from_slice(&body).map_err(|e| format!("bad nearest body: {e}"))?;
        Ok(out
            .drivers
            .into_iter()
            .map(|d| (d.driver_id, d.distance_m))
            .collect())
    }
}
