//! Server streams and their memory: how many a node serves at once, and how many bytes each
//! one (and all of them together) may hold for a client that reads slower than they fill.
//!
//! Every server stream (`WatchEvents` and the SSE endpoint built on it, `WatchTask`, the
//! worker assignment stream) takes a slot when it opens: beyond `limits.max_streams` it is
//! refused with RESOURCE_EXHAUSTED before anything is read. Its messages pass through a
//! queue that counts their memory ([`Footprint`]: as built in memory, several times their
//! encoded size) until the transport takes them. When a stream holds more than
//! `limits.stream_buffer_kib` (or the node's streams together hold more than
//! `limits.stream_buffer_total_mib`), the next message waits: the producer reads no further
//! (every stream reads from the retained event log or the state at its own cursor, so waiting
//! costs no memory, and a client catching up from an old index just reads at its own pace).
//! When the client takes nothing at all for `limits.stream_stall_timeout` while its stream is
//! full, the node drops what the client has not taken and ends the stream with
//! RESOURCE_EXHAUSTED (reason `limit_exceeded`): "stream fell behind ... Resume from index N
//! (WatchEvents from_index = N)", N being the first index the client did not get (event
//! streams), or "Open the stream again" (`WatchTask`, assignment streams, which resend the
//! current state when opened). The slot is freed once the client reads the status or
//! disconnects.
//!
//! A stream always may hold one message, however large (a single batch can exceed the bound).
//! What the transport itself buffers per stream (HTTP/2 flow control windows) comes on top and
//! is bounded by the windows.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::Stream;
use prometheus_client::metrics::gauge::Gauge;
use proto::pb;
use tokio::sync::Notify;
use tonic::Status;

use crate::error::NodeError;
use crate::limits::{Limit, LimitMetrics};

/// What a stream serves, for the open-streams gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// `Tasks/WatchEvents` (and `GET /api/v1/events`).
    Events,
    /// `Tasks/WatchTask`.
    Task,
    /// `Workers/OpenAssignments`.
    Assignments,
}

impl StreamKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Events => "events",
            StreamKind::Task => "task",
            StreamKind::Assignments => "assignments",
        }
    }
}

/// The node's stream limits and counts.
pub struct Streams {
    max_streams: usize,
    per_stream: usize,
    total: usize,
    stall: Duration,
    open: Arc<AtomicUsize>,
    buffered: Arc<AtomicUsize>,
    metrics: LimitMetrics,
}

impl Streams {
    /// At most `max_streams` open, each holding at most `per_stream` bytes, all together at
    /// most `total` bytes; a full stream whose client takes nothing for `stall` is ended.
    pub fn new(
        max_streams: usize,
        per_stream: usize,
        total: usize,
        stall: Duration,
        metrics: LimitMetrics,
    ) -> Self {
        Streams {
            max_streams,
            per_stream,
            total,
            stall,
            open: Arc::new(AtomicUsize::new(0)),
            buffered: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }

    /// Streams open now.
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Bytes all streams hold now.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    /// A new stream of `kind`, or RESOURCE_EXHAUSTED when the node serves `max_streams`.
    pub fn open<T>(&self, kind: StreamKind) -> Result<(StreamTx<T>, StreamRx<T>), NodeError> {
        let taken = self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.max_streams).then_some(n + 1)
        });
        if taken.is_err() {
            let msg = format!(
                "this node serves {} streams, its limit (limits.max_streams, --max-streams); \
                 close streams you no longer read, or use another node",
                self.max_streams
            );
            self.metrics.refused(Limit::Streams, &msg);
            return Err(NodeError::Exhausted(msg));
        }
        let gauge = self.metrics.streams(kind.as_str());
        gauge.inc();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                receiver_gone: false,
                sender_gone: false,
                consumer: None,
            }),
            writable: Notify::new(),
            per_stream: self.per_stream,
            total: self.total,
            stall: self.stall,
            buffered: self.buffered.clone(),
            buffered_gauge: self.metrics.buffered_gauge(),
            metrics: self.metrics.clone(),
        });
        let slot = Slot { open: self.open.clone(), gauge };
        Ok((StreamTx { shared: shared.clone() }, StreamRx { shared, _slot: slot }))
    }
}

/// Releases a stream slot when the stream is dropped.
struct Slot {
    open: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

struct Item<T> {
    msg: Result<T, Status>,
    bytes: usize,
    resume_from: u64,
}

struct Queue<T> {
    items: VecDeque<Item<T>>,
    bytes: usize,
    receiver_gone: bool,
    sender_gone: bool,
    consumer: Option<Waker>,
}

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    writable: Notify,
    per_stream: usize,
    total: usize,
    stall: Duration,
    buffered: Arc<AtomicUsize>,
    buffered_gauge: Gauge,
    metrics: LimitMetrics,
}

impl<T> Shared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<T>> {
        // Every mutation is a push, a pop or a clear: a panic cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.buffered.fetch_sub(bytes, Ordering::AcqRel);
            self.buffered_gauge.dec_by(bytes as i64);
        }
    }

    fn take(&self, bytes: usize) {
        if bytes > 0 {
            self.buffered.fetch_add(bytes, Ordering::AcqRel);
            self.buffered_gauge.inc_by(bytes as i64);
        }
    }

    /// Whether a message of `bytes` fits now (a stream holding nothing always fits one).
    fn fits(&self, q: &Queue<T>, bytes: usize) -> Result<(), Limit> {
        if q.bytes == 0 {
            return Ok(());
        }
        if q.bytes + bytes > self.per_stream {
            return Err(Limit::StreamBuffer);
        }
        if self.buffered.load(Ordering::Acquire) + bytes > self.total {
            return Err(Limit::StreamBufferTotal);
        }
        Ok(())
    }
}

/// The stream's client went away (or the stream was ended): stop producing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// The producing side of a bounded stream.
pub struct StreamTx<T> {
    shared: Arc<Shared<T>>,
}

/// The memory a queued message holds (estimated from its parts, without encoding it).
pub trait Footprint {
    /// Bytes.
    fn footprint(&self) -> usize;
}

impl Footprint for pb::EventBatch {
    fn footprint(&self) -> usize {
        size_of::<Self>()
            + self.events.capacity() * size_of::<pb::TaskEvent>()
            + self.events.iter().map(|e| e.worker.len() + e.revoked_worker.len()).sum::<usize>()
    }
}

impl Footprint for pb::Task {
    fn footprint(&self) -> usize {
        // Strings and bytes dominate; their encoded length is their heap size.
        size_of::<Self>() + prost::Message::encoded_len(self)
    }
}

impl Footprint for pb::WorkerMessage {
    fn footprint(&self) -> usize {
        size_of::<Self>() + prost::Message::encoded_len(self)
    }
}

impl<T: Footprint> StreamTx<T> {
    fn push(&self, q: &mut Queue<T>, msg: Result<T, Status>, bytes: usize, resume_from: u64) {
        q.bytes += bytes;
        self.shared.take(bytes);
        q.items.push_back(Item { msg, bytes, resume_from });
        if let Some(w) = q.consumer.take() {
            w.wake();
        }
    }

    /// Queue `msg`, waiting while the stream holds its bound; end the stream when its client
    /// takes nothing for the stall timeout (see the module docs). An error is queued at once.
    /// `Err(Closed)`: the client is gone or the stream ended; stop producing.
    pub async fn send(&self, msg: Result<T, Status>) -> Result<(), Closed> {
        self.enqueue(msg, None).await
    }

    /// [`StreamTx::send`] for a message of log index `index`: a stream ended for falling
    /// behind names the index its client resumes from (the oldest one it did not get).
    pub async fn send_resumable(&self, msg: T, index: u64) -> Result<(), Closed> {
        self.enqueue(Ok(msg), Some(index)).await
    }

    async fn enqueue(&self, msg: Result<T, Status>, index: Option<u64>) -> Result<(), Closed> {
        let bytes = msg.as_ref().map_or(0, |m| m.footprint());
        let mut stalled = false;
        loop {
            let writable = self.shared.writable.notified();
            {
                let mut q = self.shared.lock();
                if q.receiver_gone || q.sender_gone {
                    return Err(Closed);
                }
                match self.shared.fits(&q, bytes) {
                    Ok(()) => {
                        self.push(&mut q, msg, bytes, index.unwrap_or(0));
                        return Ok(());
                    }
                    Err(_) if msg.is_err() => {
                        self.push(&mut q, msg, 0, index.unwrap_or(0));
                        return Ok(());
                    }
                    Err(limit) if stalled => {
                        self.end(&mut q, limit, bytes, index);
                        return Err(Closed);
                    }
                    Err(_) => {}
                }
            }
            // Progress (the transport took a message) wakes this; a client that takes
            // nothing for the whole stall timeout has its stream ended on the next pass.
            stalled = tokio::time::timeout(self.shared.stall, writable).await.is_err();
        }
    }

    /// Drop what the client has not taken and queue the final status (module docs).
    fn end(&self, q: &mut Queue<T>, limit: Limit, bytes: usize, index: Option<u64>) {
        let behind = q.bytes + bytes;
        let from = index.map(|i| q.items.front().map_or(i, |it| it.resume_from));
        let dropped: usize = q.items.drain(..).map(|i| i.bytes).sum();
        q.bytes = 0;
        self.shared.release(dropped);
        let which = match limit {
            Limit::StreamBufferTotal => format!(
                "this node's streams together may hold {} bytes (limits.stream_buffer_total_mib)",
                self.shared.total
            ),
            _ => format!(
                "one stream may hold {} bytes (limits.stream_buffer_kib)",
                self.shared.per_stream
            ),
        };
        let next = match from {
            Some(f) => format!("Resume from index {f} (WatchEvents from_index = {f})"),
            None => "Open the stream again".to_string(),
        };
        let msg = format!(
            "stream fell behind: the client took nothing for {} while {behind} bytes waited; \
             {which}. {next}",
            humantime::format_duration(self.shared.stall)
        );
        self.shared.metrics.refused(limit, &msg);
        self.push(q, Err(NodeError::Exhausted(msg).into()), 0, 0);
        q.sender_gone = true;
    }
}

impl<T> StreamTx<T> {
    /// Completes when the client is gone (or the stream ended).
    pub async fn closed(&self) {
        loop {
            let writable = self.shared.writable.notified();
            {
                let q = self.shared.lock();
                if q.receiver_gone {
                    return;
                }
            }
            writable.await;
        }
    }
}

impl<T> Drop for StreamTx<T> {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.sender_gone = true;
        if let Some(w) = q.consumer.take() {
            w.wake();
        }
    }
}

/// The consuming side: the stream the transport reads. Holds the stream's slot.
pub struct StreamRx<T> {
    shared: Arc<Shared<T>>,
    _slot: Slot,
}

impl<T> Stream for StreamRx<T> {
    type Item = Result<T, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let shared = &self.shared;
        let mut q = shared.lock();
        if let Some(item) = q.items.pop_front() {
            q.bytes -= item.bytes;
            drop(q);
            shared.release(item.bytes);
            shared.writable.notify_waiters();
            return Poll::Ready(Some(item.msg));
        }
        if q.sender_gone {
            return Poll::Ready(None);
        }
        q.consumer = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<T> Drop for StreamRx<T> {
    fn drop(&mut self) {
        let dropped = {
            let mut q = self.shared.lock();
            q.receiver_gone = true;
            let bytes = q.bytes;
            q.items.clear();
            q.bytes = 0;
            bytes
        };
        self.shared.release(dropped);
        self.shared.writable.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::time::Duration;

    fn batch(index: u64, events: usize) -> pb::EventBatch {
        pb::EventBatch {
            index,
            events: vec![pb::TaskEvent::default(); events],
            ..Default::default()
        }
    }

    const STALL: Duration = Duration::from_millis(50);

    fn streams(max: usize, per_stream: usize, total: usize) -> Streams {
        Streams::new(max, per_stream, total, STALL, LimitMetrics::new())
    }

    #[tokio::test]
    async fn an_event_stream_that_falls_behind_ends_with_the_index_to_resume_from() {
        let one = batch(0, 100).footprint();
        let s = streams(10, 3 * one, 100 * one);
        let (tx, mut rx) = s.open::<pb::EventBatch>(StreamKind::Events).unwrap();
        tx.send_resumable(batch(1, 100), 1).await.unwrap();
        // The transport took the first; the next three wait for a client that does not read.
        assert_eq!(rx.next().await.unwrap().unwrap().index, 1);
        for i in 2..=4 {
            tx.send_resumable(batch(i, 100), i).await.unwrap();
        }
        assert_eq!(s.buffered_bytes(), 3 * one);
        // The fourth is one too many: it waits for the client, which takes nothing.
        let started = tokio::time::Instant::now();
        assert_eq!(tx.send_resumable(batch(5, 100), 5).await, Err(Closed));
        assert!(started.elapsed() >= STALL, "ended only after the stall timeout");
        assert_eq!(s.buffered_bytes(), 0, "what waited is dropped at once");
        let end = rx.next().await.unwrap().unwrap_err();
        assert_eq!(end.code(), tonic::Code::ResourceExhausted);
        assert!(end.message().contains("stream fell behind"), "{}", end.message());
        assert!(end.message().contains("from_index = 2"), "resume after the last taken: {end:?}");
        assert!(rx.next().await.is_none());
        assert_eq!(s.metrics.refusals(Limit::StreamBuffer), 1);
    }

    #[tokio::test]
    async fn a_stream_always_holds_one_message_however_large() {
        let s = streams(10, 16, 16);
        let (tx, mut rx) = s.open::<pb::EventBatch>(StreamKind::Events).unwrap();
        tx.send_resumable(batch(7, 1000), 7).await.unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap().index, 7);
    }

    #[tokio::test]
    async fn the_node_wide_bound_ends_the_stream_that_is_behind() {
        let one = batch(0, 100).footprint();
        let s = streams(10, 10 * one, 3 * one);
        let (a, _ra) = s.open::<pb::EventBatch>(StreamKind::Events).unwrap();
        let (b, _rb) = s.open::<pb::EventBatch>(StreamKind::Events).unwrap();
        a.send_resumable(batch(1, 100), 1).await.unwrap();
        a.send_resumable(batch(2, 100), 2).await.unwrap();
        b.send_resumable(batch(1, 100), 1).await.unwrap();
        assert_eq!(b.send_resumable(batch(2, 100), 2).await, Err(Closed));
        assert_eq!(s.metrics.refusals(Limit::StreamBufferTotal), 1);
        assert_eq!(s.buffered_bytes(), 2 * one, "only a's messages remain");
    }

    #[tokio::test]
    async fn a_waiting_stream_continues_when_its_client_reads() {
        let one = batch(0, 100).footprint();
        let s = Streams::new(10, 2 * one, 100 * one, Duration::from_secs(30), LimitMetrics::new());
        let (tx, mut rx) = s.open::<pb::EventBatch>(StreamKind::Task).unwrap();
        let producer = tokio::spawn(async move {
            for i in 1..=10 {
                tx.send(Ok(batch(i, 100))).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!producer.is_finished(), "the producer waits for the reader");
        assert!(s.buffered_bytes() <= 2 * one);
        let got: Vec<u64> = rx.by_ref().take(10).map(|m| m.unwrap().index).collect().await;
        assert_eq!(got, (1..=10).collect::<Vec<_>>());
        producer.await.unwrap();
        assert!(rx.next().await.is_none());
    }

    #[tokio::test]
    async fn streams_beyond_the_limit_are_refused_and_slots_come_back() {
        let s = streams(2, 1 << 20, 1 << 20);
        let a = s.open::<pb::Task>(StreamKind::Task).unwrap();
        let _b = s.open::<pb::Task>(StreamKind::Assignments).unwrap();
        let Err(e) = s.open::<pb::Task>(StreamKind::Events) else { panic!("a third stream") };
        assert!(e.to_string().contains("limits.max_streams"), "{e}");
        assert_eq!(s.open_count(), 2);
        drop(a);
        assert_eq!(s.open_count(), 1);
        assert!(s.open::<pb::Task>(StreamKind::Events).is_ok());
        // A client that goes away releases its messages and stops the producer.
        let (tx, rx) = s.open::<pb::Task>(StreamKind::Events).unwrap();
        tx.send(Ok(pb::Task::default())).await.unwrap();
        drop(rx);
        assert_eq!(tx.send(Ok(pb::Task::default())).await, Err(Closed));
        tokio::time::timeout(Duration::from_secs(1), tx.closed()).await.unwrap();
        assert_eq!(s.buffered_bytes(), 0);
    }
}
