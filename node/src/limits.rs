//! Resource limits outside the state machine: what is refused when a limit is hit, how it is
//! counted (`raftsched_limit_refusals_total{limit}`) and logged (at most one line per limit
//! every [`LOG_EVERY`], with the number of refusals it stands for), and the early check of
//! `SubmitTasks` requests.
//!
//! | limit | setting | what happens |
//! |---|---|---|
//! | `connections` | `limits.max_connections` | a connection beyond it is closed right after accept ([`crate::conn`]) |
//! | `streams` | `limits.max_streams` | a stream beyond it is refused, RESOURCE_EXHAUSTED ([`crate::streams`]) |
//! | `stream_buffer` | `limits.stream_buffer_kib` | a stream holding more waits for its client; counted when it is ended, after `limits.stream_stall_timeout` without progress, with RESOURCE_EXHAUSTED |
//! | `stream_buffer_total` | `limits.stream_buffer_total_mib` | the same, for all streams together |
//! | `message_size` | `limits.max_message_mib` | a `SubmitTasks` beyond it is refused, RESOURCE_EXHAUSTED (other calls: tonic's own OUT_OF_RANGE, not counted here) |
//! | `batch_tasks` | `limits.max_batch_tasks` | a `SubmitTasks` with more tasks is refused, RESOURCE_EXHAUSTED (reason `limit_exceeded`) |
//!
//! # Why `SubmitTasks` is checked before decoding
//! A task costs a few bytes on the wire and hundreds decoded: a 5 MB request of a million
//! empty tasks decodes into hundreds of MB of structs, built on a runtime thread that Raft's
//! heartbeats share, for a request that is refused anyway. Long enough to miss heartbeats and
//! start an election. So [`LimitsLayer`] counts the request's tasks on the wire (one pass over
//! the field headers, nothing allocated per task) and refuses an oversized batch before the
//! body is decoded, with the same status the handler's own check gives.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use state_machine::Rejection;
use tracing::warn;

use crate::conn::ConnInfo;
use crate::error::NodeError;

/// The shortest time between two log lines about the same limit.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A limit that refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Open connections per listener.
    Connections,
    /// Open streams per node.
    Streams,
    /// Bytes waiting in one stream.
    StreamBuffer,
    /// Bytes waiting in all streams.
    StreamBufferTotal,
    /// Size of one request.
    MessageSize,
    /// Tasks in one `SubmitTasks`.
    BatchTasks,
}

impl Limit {
    /// Every limit, in label order.
    pub const ALL: [Limit; 6] = [
        Limit::Connections,
        Limit::Streams,
        Limit::StreamBuffer,
        Limit::StreamBufferTotal,
        Limit::MessageSize,
        Limit::BatchTasks,
    ];

    /// The `limit` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Streams => "streams",
            Limit::StreamBuffer => "stream_buffer",
            Limit::StreamBufferTotal => "stream_buffer_total",
            Limit::MessageSize => "message_size",
            Limit::BatchTasks => "batch_tasks",
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// At most one log line per [`LOG_EVERY`]; counts what it left out.
#[derive(Default)]
struct Throttle {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// `Some(suppressed since the last line)` when a line may be written now.
    fn admit(&self) -> Option<u64> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match g.0 {
            Some(last) if now.duration_since(last) < LOG_EVERY => {
                g.1 += 1;
                None
            }
            _ => {
                let suppressed = g.1;
                *g = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// The series about limits, and the throttled log. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct LimitMetrics {
    pub(crate) refusals: Family<Labels, Counter>,
    pub(crate) connections: Family<Labels, Gauge>,
    pub(crate) streams: Family<Labels, Gauge>,
    pub(crate) buffered: Gauge,
    pub(crate) idle_closed: Counter,
    logs: Arc<[Throttle; 6]>,
}

impl LimitMetrics {
    /// Fresh series: every refusal counter and stream gauge at 0.
    pub(crate) fn new() -> Self {
        let m = LimitMetrics {
            refusals: Family::default(),
            connections: Family::default(),
            streams: Family::default(),
            buffered: Gauge::default(),
            idle_closed: Counter::default(),
            logs: Arc::new(Default::default()),
        };
        for l in Limit::ALL {
            let _ = m.refusals.get_or_create(&vec![("limit", l.as_str().to_string())]);
        }
        for k in ["events", "task", "assignments"] {
            let _ = m.streams(k);
        }
        m
    }

    /// Count one refusal by `limit` and log it (throttled) with `why`.
    pub fn refused(&self, limit: Limit, why: &str) {
        self.refusals.get_or_create(&vec![("limit", limit.as_str().to_string())]).inc();
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        if let Some(suppressed) = self.logs[i].admit() {
            warn!(limit = limit.as_str(), suppressed, "limit reached: {why}");
        }
    }

    /// Refusals by `limit` so far.
    pub fn refusals(&self, limit: Limit) -> u64 {
        self.refusals.get_or_create(&vec![("limit", limit.as_str().to_string())]).get()
    }

    /// The open-streams gauge of `kind`.
    pub(crate) fn streams(&self, kind: &str) -> Gauge {
        self.streams.get_or_create(&vec![("kind", kind.to_string())]).clone()
    }

    /// The open-connections gauge of `listener` (`client` or `peer`).
    pub(crate) fn connections(&self, listener: &str) -> Gauge {
        self.connections.get_or_create(&vec![("listener", listener.to_string())]).clone()
    }

    /// Bytes waiting in streams.
    pub(crate) fn buffered_gauge(&self) -> Gauge {
        self.buffered.clone()
    }
}

/// The `SubmitTasks` path, checked by [`LimitsLayer`].
pub const SUBMIT_PATH: &str = "/scheduler.v1.Tasks/SubmitTasks";

/// The number of `tasks` (field 1) in an encoded `SubmitTasksRequest`, counted without
/// decoding them; stops counting past `stop_after`. `None`: not valid protobuf (the decoder
/// reports it).
pub fn count_tasks(mut msg: &[u8], stop_after: usize) -> Option<usize> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut n = 0;
    while !msg.is_empty() && n <= stop_after {
        let key = varint(&mut msg)?;
        let skip = match key & 7 {
            0 => {
                varint(&mut msg)?;
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut msg)?).ok()?,
            5 => 4,
            _ => return None,
        };
        if key >> 3 == 1 && key & 7 == 2 {
            n += 1;
        }
        msg = msg.get(skip..)?;
    }
    Some(n)
}

/// Marks each request's connection busy while it runs (idle connections are closed:
/// [`crate::conn`]) and checks `SubmitTasks` bodies before they are decoded (module docs).
#[derive(Clone)]
pub struct LimitsLayer {
    max_message: usize,
    max_batch_tasks: usize,
    metrics: LimitMetrics,
}

impl LimitsLayer {
    /// Requests up to `max_message` bytes, batches up to `max_batch_tasks` tasks.
    pub fn new(max_message: usize, max_batch_tasks: usize, metrics: LimitMetrics) -> Self {
        LimitsLayer { max_message, max_batch_tasks, metrics }
    }
}

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited { inner, layer: self.clone() }
    }
}

/// The service [`LimitsLayer`] wraps.
#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    layer: LimitsLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type HttpResponse = http::Response<tonic::body::Body>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for Limited<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = HttpResponse>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = BoxFuture<Result<HttpResponse, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let busy = req.extensions().get::<ConnInfo>().map(|c| c.busy());
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let req = if req.uri().path() == SUBMIT_PATH {
                match layer.precheck(req).await {
                    Ok(r) => r,
                    Err(status) => return Ok(status.into_http()),
                }
            } else {
                req
            };
            let resp = inner.call(req).await?;
            let Some(busy) = busy else { return Ok(resp) };
            let (parts, body) = resp.into_parts();
            let body = tonic::body::Body::new(Busy { inner: body, _busy: busy });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

impl LimitsLayer {
    /// The request with its body read, or the refusal.
    async fn precheck(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> Result<http::Request<tonic::body::Body>, tonic::Status> {
        let (parts, mut body) = req.into_parts();
        // One gRPC frame: a flag byte, a 4-byte length, the message.
        let most = self.max_message.saturating_add(5);
        let mut buf = BytesMut::new();
        while let Some(frame) =
            futures::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame =
                frame.map_err(|e| tonic::Status::cancelled(format!("request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                if buf.len() > most {
                    let msg = format!(
                        "the request is larger than {} bytes (limits.max_message_mib); send fewer tasks per request",
                        self.max_message
                    );
                    self.metrics.refused(Limit::MessageSize, &msg);
                    return Err(NodeError::Exhausted(msg).into());
                }
            }
        }
        let buf = buf.freeze();
        if buf.len() >= 5 && buf[0] == 0 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if let Some(msg) = buf.get(5..5 + len) {
                if let Some(n) = count_tasks(msg, usize::MAX) {
                    if n > self.max_batch_tasks {
                        let e = Rejection::limit("tasks", self.max_batch_tasks as u64, n as u64);
                        let msg = format!(
                            "a SubmitTasks request with more than {} tasks (limits.max_batch_tasks): {e}",
                            self.max_batch_tasks
                        );
                        self.metrics.refused(Limit::BatchTasks, &msg);
                        return Err(NodeError::from(e).into());
                    }
                }
            }
        }
        Ok(http::Request::from_parts(parts, tonic::body::Body::new(Full(Some(buf)))))
    }
}

/// A body of one chunk.
struct Full(Option<Bytes>);

impl Body for Full {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// A response body that keeps its connection busy until it is done or dropped.
struct Busy {
    inner: tonic::body::Body,
    _busy: crate::conn::BusyGuard,
}

impl Body for Busy {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use proto::pb;

    #[test]
    fn tasks_are_counted_on_the_wire_as_the_decoder_sees_them() {
        let req = |n: usize| pb::SubmitTasksRequest {
            tasks: (0..n)
                .map(|i| pb::TaskSpec {
                    name: format!("t{i}"),
                    payload: vec![7; i % 300],
                    ..Default::default()
                })
                .collect(),
        };
        for n in [0, 1, 2, 17, 1000] {
            let bytes = req(n).encode_to_vec();
            assert_eq!(count_tasks(&bytes, usize::MAX), Some(n));
        }
        // Stops early: a million tasks are not walked to the end once past the limit.
        let empty = [0x0a, 0x00].repeat(1_000_000);
        assert_eq!(count_tasks(&empty, 10), Some(11));
        assert_eq!(count_tasks(&empty, usize::MAX), Some(1_000_000));
        // Truncated or impossible input is left to the decoder.
        assert_eq!(count_tasks(&[0x0a, 0x05, 0x01], 10), None);
        assert_eq!(count_tasks(&[0x0f], 10), None);
    }

    #[test]
    fn a_limit_logs_at_most_once_per_interval_and_counts_the_rest() {
        let t = Throttle::default();
        assert_eq!(t.admit(), Some(0));
        assert_eq!(t.admit(), None);
        assert_eq!(t.admit(), None);
        *t.state.lock().unwrap() = (Some(Instant::now() - LOG_EVERY), 2);
        assert_eq!(t.admit(), Some(2));
    }
}
