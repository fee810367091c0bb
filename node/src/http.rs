//! A minimal HTTP/1.1 server for probes and scraping. One request per connection; request
//! heads are bounded; anything else is 404/405.
//!
//! * `GET /metrics`: Prometheus text ([`metrics::render`]). With authentication on it needs
//!   `authorization: Bearer <secret>` of a reader (or submitter, admin) token: 401 without
//!   a valid one, 403 for another role. The probes below stay open.
//! * `GET /healthz`: liveness. 200 while the process is up and serving HTTP, even on a leader
//!   cut off from its majority or with no leader known; 503 only after a fatal Raft error,
//!   while the process shuts down. JSON body with role, leader, term and applied index. Restart
//!   the process when this fails; do not route on it.
//! * `GET /readyz`: readiness. 200 only when this node can serve a linearizable read now: it is
//!   the leader and a quorum acknowledged it within an election timeout, or a follower that
//!   heard from its leader within an election timeout. Otherwise 503. Plain-text body, e.g.
//!   `ready: leader, quorum ack 12 ms ago` or `not ready: leader without a quorum ack for
//!   1234 ms`. Route requests on this; the gRPC health service reports the same
//!   (see [`crate::server`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::debug;

use crate::auth::{AuthError, Need};
use crate::tls::NodeTls;
use crate::{metrics, Node};

/// Serve until `node` stops; over TLS (same certificate as gRPC) when `tls` is given.
pub async fn serve(listener: TcpListener, node: Arc<Node>, tls: Option<Arc<NodeTls>>) {
    let mut stopping = node.stopping.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let node = node.clone();
                let acceptor = tls.as_ref().map(|t| t.http_acceptor());
                tokio::spawn(async move {
                    let served = async {
                        match acceptor {
                            Some(a) => match a.accept(stream).await {
                                Ok(s) => handle(s, node).await,
                                Err(e) => Err(e),
                            },
                            None => handle(stream, node).await,
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(5), served).await {
                        Ok(Err(e)) => debug!(error = %e, "http connection failed"),
                        Err(e) => debug!(error = %e, "http request timed out"),
                        Ok(Ok(())) => {}
                    }
                });
            }
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    node: Arc<Node>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return respond(&mut stream, 431, "text/plain", "request head too large\n").await;
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") if node.tokens.is_some() => {
            let header = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case(proto::auth::AUTHORIZATION_KEY))
                .map(|(_, v)| v.trim());
            let tokens = node.tokens.as_ref().expect("checked");
            match tokens.authorize(header, Need::Reader, "GET /metrics") {
                Ok(_) => {
                    let body = metrics::render(&node);
                    respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
                }
                Err(e @ (AuthError::Missing | AuthError::Unknown)) => {
                    respond(&mut stream, 401, "text/plain", &format!("{e}\n")).await
                }
                Err(e) => respond(&mut stream, 403, "text/plain", &format!("{e}\n")).await,
            }
        }
        ("GET", "/metrics") => {
            let body = metrics::render(&node);
            respond(&mut stream, 200, "text/plain; version=0.0.4", &body).await
        }
        ("GET", "/healthz") => {
            let (ok, body) = metrics::health(&node);
            respond(&mut stream, if ok { 200 } else { 503 }, "application/json", &body).await
        }
        ("GET", "/readyz") => {
            let (ok, body) = metrics::readiness(&node).await;
            respond(&mut stream, if ok { 200 } else { 503 }, "text/plain", &body).await
        }
        ("GET", _) => {
            let body = "not found: try /metrics, /healthz or /readyz\n";
            respond(&mut stream, 404, "text/plain", body).await
        }
        _ => respond(&mut stream, 405, "text/plain", "only GET is supported\n").await,
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
