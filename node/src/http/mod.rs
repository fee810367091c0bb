//! The HTTP port, on axum: probes, metrics, the JSON API and the dashboard.
//!
//! * `GET /metrics`: Prometheus text ([`metrics::render`]; OpenMetrics when the scraper's
//!   `Accept` asks for it). With authentication on it needs `authorization: Bearer <secret>`
//!   of a reader (or submitter, admin) token: 401 without a valid one, 403 for another role.
//!   The probes below stay open.
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
//! * `/api/v1/...`: the JSON API ([`api`]), with the gRPC API's roles.
//! * `/`: the dashboard ([`ui`]), static files embedded in the binary (no network needed).
//!
//! Connections: HTTP/1.1, one request each (TLS with the gRPC certificate when TLS is on, handshake bounded to
//! 5 s); request heads must arrive within 5 s and are bounded by hyper's limits; bodies of
//! the API's POSTs are bounded ([`api::MAX_BODY_BYTES`]). Event streams stay open and are
//! bounded per stream ([`sse`]). At most `limits.max_connections` connections are open; one
//! more is closed at once and counted (`raftsched_limit_refusals_total{limit="connections"}`).

pub mod api;
pub mod sse;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tracing::debug;

use crate::auth::{AuthError, Caller, Need};
use crate::tls::NodeTls;
use crate::{metrics, Node};

/// How long a client may take for the TLS handshake and for each request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve until `node` stops; over TLS (same certificate as gRPC) when `tls` is given. Also
/// runs the metrics' event follower ([`metrics::follow_events`]).
pub async fn serve(listener: TcpListener, node: Arc<Node>, tls: Option<Arc<NodeTls>>) {
    tokio::spawn(metrics::follow_events(node.clone()));
    let app = router(node.clone());
    let mut stopping = node.stopping.clone();
    // The same connection cap as the gRPC ports (crate::conn): event streams stay open.
    let max = node.cfg.limits.max_connections;
    let cap = Arc::new(tokio::sync::Semaphore::new(max));
    let limits = node.metrics.limits().clone();
    let open = limits.connections("http");
    let mut backoff = false;
    loop {
        if std::mem::take(&mut backoff) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, from) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors, most likely: back off, do not spin.
                        debug!(error = %e, "accept failed");
                        backoff = true;
                        continue;
                    }
                };
                let Ok(permit) = cap.clone().try_acquire_owned() else {
                    let msg = format!(
                        "closed a connection from {from}: {max} connections are open on the http \
                         port (limits.max_connections, --max-connections)"
                    );
                    limits.refused(crate::limits::Limit::Connections, &msg);
                    continue;
                };
                open.inc();
                let open = open.clone();
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let acceptor = tls.as_ref().map(|t| t.http_acceptor());
                let stopping = node.stopping.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let served = match acceptor {
                        Some(a) => match tokio::time::timeout(HEAD_TIMEOUT, a.accept(stream)).await {
                            Ok(Ok(s)) => serve_connection(s, app, stopping).await,
                            Ok(Err(e)) => Err(format!("tls handshake: {e}")),
                            Err(_) => Err("tls handshake timed out".into()),
                        },
                        None => serve_connection(stream, app, stopping).await,
                    };
                    if let Err(e) = served {
                        debug!(error = %e, "http connection failed");
                    }
                    open.dec();
                });
            }
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

async fn serve_connection<S>(
    io: S,
    app: Router,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        // One request per connection, as the probes' clients have always seen it (they read
        // until the server closes); the dashboard's few requests do not need reuse.
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::select! {
        r = conn.as_mut() => return r.map_err(|e| e.to_string()),
        _ = stop => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
    Ok(())
}

/// The whole HTTP application of `node`.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .merge(api::routes())
        .merge(ui::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(node.clone(), count))
        .with_state(node)
}

/// Counts every answer by route pattern (never the raw path: bounded labels) and code.
async fn count(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    node.metrics.record_http(&route, resp.status().as_u16());
    resp
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "not found: try /, /api/v1/cluster, /metrics, /healthz or /readyz\n".into(),
    )
}

fn text(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

async fn healthz(State(node): State<Arc<Node>>) -> Response {
    let (ok, body) = metrics::health(&node);
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let (ok, body) = metrics::readiness(&node).await;
    text(if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

async fn metrics_page(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&node, &headers, Need::Reader, "GET /metrics") {
        return auth_refusal(e, false);
    }
    let open = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let (ctype, body) = if open {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics::render_openmetrics(&node),
        )
    } else {
        ("text/plain; version=0.0.4; charset=utf-8", metrics::render(&node))
    };
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

/// The caller of an HTTP request that needs `need`: `Ok(None)` with authentication off.
pub fn authorize(
    node: &Node,
    headers: &HeaderMap,
    need: Need,
    what: &str,
) -> Result<Option<Caller>, AuthError> {
    let Some(tokens) = &node.tokens else { return Ok(None) };
    if need == Need::Open {
        return Ok(None);
    }
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    tokens.authorize(header, need, what).map(Some)
}

/// 401 (no or unknown token) or 403 (wrong role), as text or JSON.
pub fn auth_refusal(e: AuthError, json: bool) -> Response {
    let code = match e {
        AuthError::Missing | AuthError::Unknown => StatusCode::UNAUTHORIZED,
        _ => StatusCode::FORBIDDEN,
    };
    let mut resp = if json {
        let reason =
            if code == StatusCode::UNAUTHORIZED { "unauthenticated" } else { "permission_denied" };
        api::error_body(code, &e.to_string(), reason, None)
    } else {
        text(code, format!("{e}\n"))
    };
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}
