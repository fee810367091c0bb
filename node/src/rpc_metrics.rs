//! A tower layer around the gRPC server that counts every call by method and status code and
//! observes its duration ([`crate::metrics::Metrics::record_rpc`]).
//!
//! The status is in the response headers for a "trailers-only" answer (errors before any
//! message, including auth refusals), otherwise in the trailers at the end of the body: the
//! body is wrapped to see them. A stream counts when it ends (or is dropped by the client:
//! CANCELLED). Method labels are bounded: an unknown method (UNIMPLEMENTED) and anything past
//! [`MAX_METHODS`] distinct names is labelled `other`, so random paths cannot grow the page.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use tonic::Code;

use crate::Node;

/// Distinct method labels kept; further names count as `other`.
pub const MAX_METHODS: usize = 256;

/// Counts calls of the wrapped gRPC service into the node's metrics.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    node: Arc<Node>,
    seen: Arc<Mutex<HashSet<String>>>,
}

impl RpcMetricsLayer {
    /// Counts into `node.metrics`.
    pub fn new(node: Arc<Node>) -> Self {
        RpcMetricsLayer { node, seen: Arc::new(Mutex::new(HashSet::new())) }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics { inner, layer: self.clone() }
    }
}

/// The service [`RpcMetricsLayer`] wraps.
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

/// One call being measured; records once, when the status is known or the body dropped.
struct Call {
    layer: RpcMetricsLayer,
    method: String,
    started: Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        let method = if code == Code::Unimplemented {
            "other"
        } else {
            let mut seen = self.layer.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(&self.method) || seen.len() < MAX_METHODS {
                seen.insert(self.method.clone());
                self.method.as_str()
            } else {
                "other"
            }
        };
        self.layer.node.metrics.record_rpc(method, code, self.started.elapsed());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The client went away before the status: what the server sees as CANCELLED.
        self.finish(Code::Cancelled);
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut call = Call {
            layer: self.layer.clone(),
            method: req.uri().path().trim_start_matches('/').to_string(),
            started: Instant::now(),
            done: false,
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = match inner.call(req).await {
                Ok(r) => r,
                Err(e) => {
                    call.finish(Code::Unknown);
                    return Err(e);
                }
            };
            if let Some(code) = status_of(resp.headers()) {
                call.finish(code);
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            let body = tonic::body::Body::new(Measured { inner: body, call });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// A response body that records its call when the trailers pass.
struct Measured {
    inner: tonic::body::Body,
    call: Call,
}

impl Body for Measured {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(status_of) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(s))) => this.call.finish(s.code()),
            Poll::Ready(None) => this.call.finish(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
