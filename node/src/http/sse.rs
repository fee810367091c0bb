//! `GET /api/v1/events`: the applied task changes as Server-Sent Events, resumable.
//!
//! Each event is one applied log entry's changes: `id:` is its log index, `event: batch`, and
//! `data:` its JSON (`index`, `log_time_ms`, `term`, `events` with `task`, `state`, `attempt`,
//! `worker`, and `fence` for admins). `?from=N` starts at index N; a reconnecting client's
//! `Last-Event-ID: N` resumes at N + 1; neither: from now. A start older than this node
//! retains is refused with 410 before the stream opens; the stream is the gRPC
//! `WatchEvents` stream (same roles, same gaplessness).
//!
//! Memory per stream is bounded: at most [`SSE_BUFFER`] frames, and at most
//! `limits.stream_buffer_kib` of them (one frame always fits), wait for a slow client; the
//! gRPC stream underneath is bounded the same way ([`crate::streams`]). When the buffer is
//! full the stream is dropped with a final `event: close` whose data says why
//! (`{"reason": "slow_consumer", "resume_from": N}`) so the client reconnects from there; the
//! same `close` event ends a stream whose events were compacted away meanwhile. An idle stream
//! gets a `: ping` comment every [`KEEPALIVE`].

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
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
    let stream = api
        .watch_events(request(pb::WatchEventsRequest { from_index: from }, &who))
        .await?
        .into_inner();
    let max_bytes = node.cfg.limits.stream_buffer_bytes;
    let body =
        pump(stream, shows_fence(&who), from, SSE_BUFFER, max_bytes).map(Ok::<_, Infallible>);
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

/// Turns a gRPC event stream into SSE frames: a task forwards each batch into a buffer of
/// `capacity` frames and `max_bytes` bytes (one frame always fits) and ends the stream with a
/// `close` event when the buffer is full (slow client), the stream fails, or it ends. The
/// frames are read from the returned stream.
pub fn pump<S>(
    mut stream: S,
    fence: bool,
    from: u64,
    capacity: usize,
    max_bytes: usize,
) -> impl Stream<Item = Bytes>
where
    S: Stream<Item = Result<pb::EventBatch, tonic::Status>> + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(capacity);
    let held = Arc::new(AtomicUsize::new(0));
    let taken = held.clone();
    let (close_tx, close_rx) = oneshot::channel::<Bytes>();
    tokio::spawn(async move {
        let _ = tx.try_send(Bytes::from_static(b": connected\nretry: 2000\n\n"));
        let mut next = from;
        loop {
            tokio::select! {
                item = stream.next() => match item {
                    Some(Ok(batch)) => {
                        let index = batch.index;
                        let f = frame(&batch, fence);
                        let len = f.len();
                        let now = held.load(Ordering::Acquire);
                        let sent = if now > 0 && now + len > max_bytes {
                            Err(mpsc::error::TrySendError::Full(f))
                        } else {
                            held.fetch_add(len, Ordering::AcqRel);
                            tx.try_send(f).inspect_err(|_| {
                                held.fetch_sub(len, Ordering::AcqRel);
                            })
                        };
                        match sent {
                            Ok(()) => next = index + 1,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                let msg = format!(
                                    "the client fell behind (more than {capacity} events or {max_bytes} bytes waiting); reconnect with Last-Event-ID: {}",
                                    next.saturating_sub(1)
                                );
                                let _ = close_tx.send(close_frame("slow_consumer", &msg, Some(next)));
                                return;
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                    Some(Err(status)) => {
                        let reason = status
                            .metadata()
                            .get(proto::status::REASON_KEY)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("error")
                            .to_string();
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
    tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(move |b| {
            taken.fetch_sub(b.len(), Ordering::AcqRel);
            b
        })
        .chain(futures::stream::once(close_rx).filter_map(|c| async move { c.ok() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(index: u64) -> Result<pb::EventBatch, tonic::Status> {
        Ok(pb::EventBatch { index, ..Default::default() })
    }

    async fn collect(s: impl Stream<Item = Bytes>) -> Vec<String> {
        s.map(|b| String::from_utf8_lossy(&b).into_owned()).collect().await
    }

    #[tokio::test]
    async fn a_slow_client_is_dropped_with_a_close_event_naming_where_to_resume() {
        // Nobody reads while 10 batches arrive for a buffer of 4 frames.
        let events = futures::stream::iter((5..15).map(batch)).chain(futures::stream::pending());
        let out = pump(Box::pin(events), false, 5, 4, usize::MAX);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let frames = collect(out).await;
        // The hello, three batches (5, 6, 7), then the close.
        assert_eq!(frames.len(), 5, "{frames:?}");
        assert!(frames[1].starts_with("id: 5\n") && frames[3].starts_with("id: 7\n"), "{frames:?}");
        let close = &frames[4];
        assert!(close.starts_with("event: close\n"), "{close}");
        assert!(
            close.contains("\"reason\":\"slow_consumer\"") && close.contains("\"resume_from\":8"),
            "{close}"
        );
    }

    #[tokio::test]
    async fn a_slow_client_is_dropped_when_its_frames_pass_the_byte_bound() {
        // Room for many frames, but only ~2 frames' bytes: the third batch ends the stream.
        let one = frame(&pb::EventBatch { index: 5, ..Default::default() }, false).len();
        let events = futures::stream::iter((5..15).map(batch)).chain(futures::stream::pending());
        let out = pump(Box::pin(events), false, 5, 1024, 2 * one + 40);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let frames = collect(out).await;
        let close = frames.last().unwrap();
        assert!(close.contains("\"reason\":\"slow_consumer\""), "{frames:?}");
        assert!(frames.len() <= 5, "at most the hello, a few batches and the close: {frames:?}");
    }

    #[tokio::test]
    async fn a_failed_stream_ends_with_its_reason() {
        let status: tonic::Status =
            crate::error::NodeError::OutOfRange("events before 9 are gone".into()).into();
        let events = futures::stream::iter(vec![batch(1), Err(status)]);
        let frames = collect(pump(Box::pin(events), false, 1, 16, usize::MAX)).await;
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert!(
            frames[2].contains("\"reason\":\"out_of_range\"") && frames[2].contains("gone"),
            "{frames:?}"
        );
    }
}
