//! The public gRPC services (`scheduler.v1`). Handlers are thin: convert the request,
//! validate with the configured limits, call [`crate::Node::write`] or [`crate::Node::read`],
//! convert back. Failures are [`crate::error::NodeError`]s, turned into statuses by the one
//! table in [`crate::error`].

pub mod cluster;
pub mod peer;
pub mod tasks;
pub mod workers;

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Response, Status};

use crate::error::NodeResult;
use crate::streams::{StreamKind, StreamTx};
use crate::Node;

/// A server stream of `T`.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Turn a handler result into a gRPC answer, counting it.
pub(crate) fn answer<T>(node: &Node, r: NodeResult<T>) -> Result<Response<T>, Status> {
    node.metrics.record_request(r.is_err());
    r.map(Response::new).map_err(Status::from)
}

/// A plain channel-backed server stream of at most `capacity` queued messages (snapshot
/// downloads: admin-only, chunks of known size).
pub(crate) fn channel<T: Send + 'static>(
    capacity: usize,
) -> (tokio::sync::mpsc::Sender<Result<T, Status>>, BoxStream<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (tx, Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// A new server stream of `kind`, bounded in bytes ([`crate::streams`]); RESOURCE_EXHAUSTED
/// when the node serves its limit of streams.
pub(crate) fn open_stream<T: Send + 'static>(
    node: &Node,
    kind: StreamKind,
) -> Result<(StreamTx<T>, BoxStream<T>), Status> {
    let (tx, rx) = answer(node, node.streams.open(kind))?.into_inner();
    Ok((tx, Box::pin(rx)))
}

/// Wait until something past `cursor` is applied, the client left, the node stops, or a
/// second passed (so callers re-check slow-changing conditions). `false`: stop streaming.
pub(crate) async fn wait_more<T>(
    node: &Node,
    applied: &mut watch::Receiver<u64>,
    cursor: u64,
    tx: &StreamTx<T>,
) -> bool {
    let mut stopping = node.stopping.clone();
    tokio::select! {
        r = applied.wait_for(|a| *a > cursor) => r.is_ok(),
        _ = tx.closed() => false,
        _ = stopping.wait_for(|s| *s) => false,
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
    }
}
