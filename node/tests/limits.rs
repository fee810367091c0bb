//! Resource limits against real `schedulerd` processes on loopback: unread event streams do
//! not grow a node's memory beyond what the stream limits allow (the slow streams end with
//! RESOURCE_EXHAUSTED naming where to resume, a reading stream keeps going); connections
//! beyond the cap are closed while the node stays reachable, idle ones are closed after the
//! idle timeout; an oversized submit is refused before it costs the leader its heartbeats.
//! Every wait polls a condition with a deadline; every load loop is bounded.

mod common;

use std::time::Duration;

use common::*;
use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use proto::pb::tasks_client::TasksClient;
use tokio::io::AsyncReadExt;
use tonic::Code;

/// The value of one sample line of node `i`'s /metrics page (0 when absent).
async fn metric(c: &Cluster, i: usize, sample: &str) -> f64 {
    let http = c.nodes[i].http.clone().expect("an HTTP port");
    let page = http_get(&http, "/metrics").await.expect("the metrics page").1;
    page.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn term(addr: &str) -> u64 {
    let mut c = ClusterClient::new(channel(addr).await);
    c.status(pb::ClusterStatusRequest {}).await.expect("cluster status").into_inner().term
}

/// A fresh connection (its own channel, so one stream's flow control does not touch others).
async fn fresh_tasks(addr: &str) -> TasksClient<Ch> {
    TasksClient::new(channel(addr).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l1_unread_event_streams_keep_memory_bounded_and_end_with_the_resume_index() {
    const BUFFER_KIB: u64 = 256;
    const STREAMS: usize = 60;
    const BATCHES: usize = 100;
    const BATCH: usize = 1000;
    let c = Cluster::start(
        3,
        &["--stream-buffer-kib", &BUFFER_KIB.to_string(), "--stream-stall-timeout", "1s"],
    )
    .await;
    let leader = c.wait_leader().await;
    // Streams on one follower; the other follower, applying the same entries, is the control.
    let (busy, control) = ((leader + 1) % 3, (leader + 2) % 3);
    let addr = c.nodes[busy].addr.clone();

    // The reading stream, on a connection of its own.
    let mut reader = fresh_tasks(&addr)
        .await
        .watch_events(pb::WatchEventsRequest { from_index: 0 })
        .await
        .expect("a reading stream")
        .into_inner();
    let (seen_tx, mut seen) = tokio::sync::watch::channel(0u64);
    let reading = tokio::spawn(async move {
        while let Ok(Some(b)) = reader.message().await {
            seen_tx.send_replace(b.index);
        }
    });

    // Slow streams that are never read, 20 per connection.
    let mut slow = Vec::new();
    for conn in 0..STREAMS / 20 {
        let client = fresh_tasks(&addr).await;
        for _ in 0..20 {
            let s = client
                .clone()
                .watch_events(pb::WatchEventsRequest { from_index: 0 })
                .await
                .unwrap_or_else(|e| panic!("slow stream on connection {conn}: {e}"))
                .into_inner();
            slow.push(s);
        }
    }
    let rss = |i: usize| c.nodes[i].rss_bytes().expect("the node's RSS");
    let (busy_before, control_before) = (rss(busy), rss(control));

    // Load: each batch is one event batch of BATCH events for every stream.
    let addrs = c.addrs();
    let mut last_index = 0;
    for b in 0..BATCHES {
        let tasks: Vec<pb::TaskSpec> = (0..BATCH)
            .map(|i| pb::TaskSpec {
                name: format!("l1-{b}-{i}"),
                queue: "nobody-serves-this".into(),
                ..Default::default()
            })
            .collect();
        last_index = submit_batch(&addrs, tasks).await.log_index;
    }

    // The reading stream saw everything.
    tokio::time::timeout(Duration::from_secs(60), seen.wait_for(|i| *i >= last_index))
        .await
        .expect("the reading stream keeps up within 60 s")
        .expect("the reading stream is open");

    // Memory: the busy node grew by at most what its streams may hold beyond what the
    // control node (same entries, no streams) grew.
    let busy_growth = rss(busy).saturating_sub(busy_before);
    let control_growth = rss(control).saturating_sub(control_before);
    let per_stream = (BUFFER_KIB << 10) + (256 << 10);
    let allowed = control_growth + STREAMS as u64 * per_stream + (32 << 20);
    assert!(
        busy_growth <= allowed,
        "the node with {STREAMS} unread streams grew by {} MiB, the control by {} MiB; allowed {} MiB",
        busy_growth >> 20,
        control_growth >> 20,
        allowed >> 20
    );
    // A second after they filled up, the node ended every slow stream.
    let sample = "raftsched_limit_refusals_total{limit=\"stream_buffer\"}";
    let ended = wait_until("every slow stream ended", Duration::from_secs(30), || async {
        let n = metric(&c, busy, sample).await;
        (n >= STREAMS as f64).then_some(n)
    })
    .await;
    assert!(ended.is_ok(), "{ended:?}");

    // Each slow stream delivers what it had taken, then RESOURCE_EXHAUSTED with the index
    // to resume from; resuming there continues without a gap.
    for (k, mut s) in slow.into_iter().enumerate() {
        let mut last = None;
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(30), s.message()).await {
                Ok(Ok(Some(b))) => last = Some(b.index),
                Ok(Ok(None)) => panic!("slow stream {k} ended without a status"),
                Ok(Err(status)) => break status,
                Err(_) => panic!("slow stream {k} neither ended nor delivered within 30 s"),
            }
        };
        assert_eq!(status.code(), Code::ResourceExhausted, "stream {k}: {status:?}");
        let msg = status.message();
        assert!(msg.contains("stream fell behind"), "stream {k}: {msg}");
        let from: u64 = msg
            .rsplit("from_index = ")
            .next()
            .and_then(|t| t.trim_end_matches(')').parse().ok())
            .unwrap_or_else(|| panic!("stream {k} names no index: {msg}"));
        assert!(last.is_none_or(|l| l < from), "stream {k}: got {last:?}, resume at {from}");
        if k == 0 {
            let mut again = fresh_tasks(&addr)
                .await
                .watch_events(pb::WatchEventsRequest { from_index: from })
                .await
                .expect("resuming at the index given")
                .into_inner();
            let first = again.message().await.expect("a batch").expect("a batch");
            assert!(first.index >= from && first.index <= last_index, "{} vs {from}", first.index);
        }
    }
    assert!(!reading.is_finished(), "the reading stream is still open");
    reading.abort();
}

/// Whether the server closed `s` (end of file or reset) within `within`; what the server
/// sends before (its HTTP/2 settings) is read and ignored.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l2_connections_beyond_the_cap_are_closed_and_idle_ones_time_out() {
    const CAP: usize = 16;
    const IDLE: Duration = Duration::from_secs(4);
    let c =
        Cluster::start(1, &["--max-connections", &CAP.to_string(), "--idle-timeout", "4s"]).await;
    c.wait_leader().await;
    let addr = c.nodes[0].addr.clone();

    // A stream keeps its connection busy: it outlives the idle timeout.
    let mut watch = fresh_tasks(&addr)
        .await
        .watch_events(pb::WatchEventsRequest { from_index: 0 })
        .await
        .expect("a watch stream")
        .into_inner();

    // Raw connections that never speak: the cap takes some, the rest are closed at once.
    let mut raw = Vec::new();
    for _ in 0..40 {
        raw.push(tokio::net::TcpStream::connect(&addr).await.expect("the port accepts"));
    }
    // Refused connections are closed right away, long before the idle timeout.
    let checked = futures::future::join_all(raw.into_iter().map(|mut s| async move {
        let closed = closed_within(&mut s, Duration::from_millis(500)).await;
        (s, closed)
    }))
    .await;
    let refused = checked.iter().filter(|(_, closed)| *closed).count();
    let mut held: Vec<_> =
        checked.into_iter().filter(|(_, closed)| !closed).map(|(s, _)| s).collect();
    assert!(held.len() < CAP, "at most the cap stays open besides the stream: {}", held.len());
    assert!(refused >= 40 - CAP, "connections beyond the cap were closed: {refused}");
    let counted = metric(&c, 0, "raftsched_limit_refusals_total{limit=\"connections\"}").await;
    assert!(counted >= refused as f64, "refusals counted: {counted} < {refused}");
    let open = metric(&c, 0, "raftsched_connections{listener=\"client\"}").await;
    assert!(open as usize <= CAP, "open connections within the cap: {open}");
    // The HTTP port and the process are fine meanwhile.
    let healthz = http_get(c.nodes[0].http.as_deref().unwrap(), "/healthz").await;
    assert!(healthz.is_some_and(|(_, b)| b.contains("\"ok\"")), "the node is alive");

    // The silent connections are closed after the idle timeout.
    let closed =
        futures::future::join_all(held.iter_mut().map(|s| closed_within(s, IDLE * 3))).await;
    assert!(closed.iter().all(|c| *c), "idle connections were closed: {closed:?}");
    let idle = metric(&c, 0, "raftsched_idle_connections_closed_total").await;
    assert!(idle >= 1.0, "idle closes are counted: {idle}");

    // With the slots free again a normal client is served, and the busy stream still runs.
    let ids = submit(&c.addrs(), vec![spec("after-the-cap", 0)]).await;
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let b = watch.message().await.expect("the stream is open").expect("a batch");
            if b.events.iter().any(|e| e.task == ids[0]) {
                return b;
            }
        }
    })
    .await
    .expect("the stream that outlived the idle timeout delivers the new task");
    assert!(got.index > 0);
}

/// Bytes of an encoded message, sent as is (to send what no well-behaved client would build).
#[derive(Clone, Debug, Default)]
struct Raw(Vec<u8>);

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

async fn submit_raw(addr: &str, body: Vec<u8>) -> Result<pb::SubmitTasksResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel(addr).await)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/scheduler.v1.Tasks/SubmitTasks");
    let codec = proto::codec::ProtoCodec::<Raw, pb::SubmitTasksResponse>::default();
    grpc.unary(tonic::Request::new(Raw(body)), path, codec).await.map(|r| r.into_inner())
}

/// Without the check of `SubmitTasks` on the wire (`node::limits`), the leader decoded each
/// million-task request on a runtime thread and this test saw a term change on every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn l3_an_oversized_submit_is_refused_without_a_leader_change() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let leader_addr = c.nodes[leader].addr.clone();
    let before = term(&leader_addr).await;
    // A million tasks named "t": 5 bytes each on the wire, 5 MB, under the message limit.
    let million = [0x0a, 0x03, 0x0a, 0x01, b't'].repeat(1_000_000);
    for attempt in 0..5 {
        let to = if attempt == 4 { &c.nodes[(leader + 1) % 3].addr } else { &leader_addr };
        let e = submit_raw(to, million.clone()).await.expect_err("a million tasks are refused");
        assert_eq!(e.code(), Code::ResourceExhausted, "attempt {attempt}: {e:?}");
        assert!(
            e.message().contains("tasks") && e.message().contains("10000"),
            "names the field and the limit: {}",
            e.message()
        );
    }
    // Larger than the message limit (16 MiB): refused too.
    let huge = [0x0a, 0x03, 0x0a, 0x01, b't'].repeat(4_000_000);
    let e = submit_raw(&leader_addr, huge).await.expect_err("20 MB are refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    // Several election timeouts later, nobody started an election.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in &c.nodes {
        assert_eq!(term(&n.addr).await, before, "node {} changed term", n.id);
    }
    assert_eq!(c.wait_leader().await, leader, "the leader kept its place");
    let refused = metric(&c, leader, "raftsched_limit_refusals_total{limit=\"batch_tasks\"}").await;
    assert!(refused >= 4.0, "refusals counted on the leader: {refused}");

    // A normal batch still goes through.
    let ids = submit(&c.addrs(), vec![spec("after-the-refusals", 0)]).await;
    assert_eq!(ids.len(), 1);
}
