//! `GET /api/v1/events`: the applied task changes as Server-Sent Events, resumable.
//!
//! Each event is one applied log entry's changes: `id:` is its log index, `event: batch`, and
//! `data:` its JSON (`index`, `log_time_ms`, `term`, `events` with `task`, `state`, `attempt`,
//! `worker`, and `fence` for admins). `?from=N` starts at index N; a reconnecting client's
//! `Last-Event-ID: N` resumes at N + 1; neither: from now. A start older than this node
//! retains is refused with 410 before the stream opens; the stream is the gRPC
//! `WatchEvents` stream (same roles, same gaplessness).
//!
//! Memory per stream is bounded: at most [`SSE_BUFFER`] frames wait for a slow client. When
//! the buffer is full the stream is dropped with a final `event: close` whose data says why
//! (`{"reason": "slow_consumer", "resume_from": N}`) so the client reconnects from there; the
//! same `close` event ends a stream whose events were compacted away meanwhile. An idle stream
//! gets a `: ping` comment every [`KEEPALIVE`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use proto::pb;
use proto::pb::tasks_server::Tasks as _;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::api::{caller, request, shows_fence, ApiError, Params};
use crate::api::tasks::TasksApi;
use crate::Node;

/// Frames buffered per stream before a slow client is dropped.
pub const SSE_BUFFER: usize = 1024;

/// Idle time after which a comment keeps proxies from closing the stream.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// One batch as an SSE frame.
pub fn frame(b: &pb::EventBatch, fence: bool) -> Bytes {
    let events: Vec<_> = b
        .events
        .iter()
        .map(|e| {
            let mut v = json!({
                "task": e.task,
                "state": proto::convert::state_from_pb("state", e.state).map_or("unspecified", |k| k.as_str()),
                "attempt": e.attempt,
                "worker": e.worker,
                "revoked_worker": e.revoked_worker,
            });
            if fence {
                v["fence"] = json!(e.fence);
            }
            v
        })
        .collect();
    let data = json!({
        "index": b.index, "log_time_ms": b.log_time_ms, "term": b.term, "events": events,
    });
    Bytes::from(format!("id: {}\nevent: batch\ndata: {data}\n\n", b.index))
}

fn close_frame(reason: &str, message: &str, resume_from: Option<u64>) -> Bytes {
    let data = json!({"reason": reason, "message": message, "resume_from": resume_from});
    Bytes::from(format!("event: close\ndata: {data}\n\n"))
}

/// The handler (see the module docs).
pub async fn events(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let who = caller(&node, &headers, "/scheduler.v1.Tasks/WatchEvents")?;
    let p = Params::parse(q, &["from"])?;
    let from = match p.u64("from")? {
        Some(f) => f,
        None => match headers.get("last-event-id") {
            None => 0,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|i| i.saturating_add(1))
                .ok_or_else(|| ApiError::bad("last-event-id", "expected a log index"))?,
        },
    };
    let api = TasksApi::new(node.clone());
    let mut stream = api
        .watch_events(request(pb::WatchEventsRequest { from_index: from }, &who))
        .await?
        .into_inner();
    let fence = shows_fence(&who);
    let (tx, rx) = mpsc::channel::<Bytes>(SSE_BUFFER);
    let (close_tx, close_rx) = oneshot::channel::<Bytes>();
    tokio::spawn(async move {
        let _ = tx.try_send(Bytes::from_static(b": connected\nretry: 2000\n\n"));
        let mut next = from;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(batch)) => {
                        let index = batch.index;
                        match tx.try_send(frame(&batch, fence)) {
                            Ok(()) => next = index + 1,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                let msg = format!(
                                    "the client fell {SSE_BUFFER} events behind; reconnect with Last-Event-ID: {}",
                                    next.saturating_sub(1)
                                );
                                let _ = close_tx.send(close_frame("slow_consumer", &msg, Some(next)));
                                return;
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                    Some(Err(status)) => {
                        let reason = super::api::http_status(status.code()).as_u16().to_string();
                        let _ = close_tx.send(close_frame(&reason, status.message(), None));
                        return;
                    }
                    None => {
                        let _ = close_tx.send(close_frame("stopped", "the node stopped streaming", Some(next)));
                        return;
                    }
                },
                _ = tokio::time::sleep(KEEPALIVE) => {
                    if let Err(mpsc::error::TrySendError::Closed(_)) =
                        tx.try_send(Bytes::from_static(b": ping\n\n"))
                    {
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(rx)
        .chain(futures::stream::once(close_rx).filter_map(|c| async move { c.ok() }))
        .map(Ok::<_, Infallible>);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
