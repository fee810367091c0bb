//! Prometheus metrics through the `prometheus-client` crate, and the bodies of `/healthz`
//! (liveness: [`health`]) and `/readyz` (readiness: [`readiness`]).
//!
//! Two kinds of series:
//!
//! * **Counted** as things happen ([`Metrics`]): assignments, expiries, gRPC and HTTP
//!   requests by method and code with their latency, task completions by outcome with their
//!   run time and end-to-end time, elections. Task outcomes are counted by the leader only
//!   (from the applied event stream, see [`follow_events`]), so `sum()` over nodes counts each
//!   completion once.
//! * **Read at scrape time** ([`render`]): this node's Raft position, the log's fsync
//!   histogram, its data disk (free bytes, size, the floor and `disk_low`, see
//!   [`crate::disk`]), process metrics, and — on the leader only, so `sum()` over the nodes is right —
//!   the cluster-wide gauges: tasks per state, queue depth and the age of the oldest queued
//!   task per queue, workers by status, replication lag per follower. A queue seen once keeps
//!   its series at 0 after it empties instead of vanishing.
//!
//! Times are in seconds and sizes in bytes, as Prometheus' naming rules ask; the page passes
//! `promtool check metrics` (tested). It is served as OpenMetrics when the scraper asks for it
//! (`Accept: application/openmetrics-text`), else in the Prometheus text format 0.0.4.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use state_machine::{TaskState, TaskStateKind};

use crate::Node;

/// Label set of a family: `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets (seconds) of latencies measured in log time or on the wire: 1 ms .. 30 s.
const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Buckets (seconds) of task run and end-to-end times: 1 ms .. 1 h.
const TASK_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

fn task_histogram() -> Histogram {
    Histogram::new(TASK_BUCKETS)
}

/// Counters and histograms of one node, in a registry encoded on every scrape.
pub struct Metrics {
    registry: Registry,
    assignments: Counter,
    assignments_refused: Counter,
    assignments_ahead: Counter,
    expirations: Counter,
    expiry_requeues: Counter,
    assign_latency: Histogram,
    requests: Counter,
    request_errors: Counter,
    rpc_requests: Family<Labels, Counter>,
    rpc_latency: HistogramFamily,
    http_requests: Family<Labels, Counter>,
    completions: Family<Labels, Counter>,
    task_run: Histogram,
    task_e2e: Histogram,
    term_changes: Counter,
    elections_won: Counter,
    /// Queues seen in some scrape: their series stay (at 0) once they are empty.
    known_queues: Mutex<BTreeSet<String>>,
    /// Resource limits: refusals, open connections and streams ([`crate::limits`]).
    limits: crate::limits::LimitMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every counted series, at zero.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("raftsched");
        let assignments = Counter::default();
        r.register("assignments", "Assignments accepted (leader)", assignments.clone());
        let assignments_refused = Counter::default();
        r.register(
            "assignments_refused",
            "Planned assignments refused at apply (leader)",
            assignments_refused.clone(),
        );
        let assignments_ahead = Counter::default();
        r.register(
            "assignments_ahead",
            "Assignments made in the entry of the completion that released the task (leader)",
            assignments_ahead.clone(),
        );
        let expirations = Counter::default();
        r.register("worker_expirations", "Worker sessions expired (leader)", expirations.clone());
        let expiry_requeues = Counter::default();
        r.register(
            "worker_expiry_requeues",
            "Tasks requeued by worker expiries (leader)",
            expiry_requeues.clone(),
        );
        let assign_latency = latency_histogram();
        r.register_with_unit(
            "assignment_latency",
            "Time from queued to assigned, in log time (leader)",
            Unit::Seconds,
            assign_latency.clone(),
        );
        let requests = Counter::default();
        r.register("requests", "Public API requests handled", requests.clone());
        let request_errors = Counter::default();
        r.register(
            "request_errors",
            "Public API requests answered with an error",
            request_errors.clone(),
        );
        let rpc_requests = Family::<Labels, Counter>::default();
        r.register(
            "grpc_requests",
            "gRPC requests by method and status code (streams count when they end)",
            rpc_requests.clone(),
        );
        let rpc_latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        r.register_with_unit(
            "grpc_request_duration",
            "gRPC request duration by method and status code (streams: until they end)",
            Unit::Seconds,
            rpc_latency.clone(),
        );
        let http_requests = Family::<Labels, Counter>::default();
        r.register(
            "http_requests",
            "HTTP requests by route and status code",
            http_requests.clone(),
        );
        let completions = Family::<Labels, Counter>::default();
        r.register(
            "task_completions",
            "Tasks that reached a terminal state, by outcome (leader)",
            completions.clone(),
        );
        let task_run = task_histogram();
        r.register_with_unit(
            "task_run_duration",
            "Run time of the attempt that ended a task: start to end, in log time (leader)",
            Unit::Seconds,
            task_run.clone(),
        );
        let task_e2e = task_histogram();
        r.register_with_unit(
            "task_end_to_end_duration",
            "Submission to terminal state, in log time (leader)",
            Unit::Seconds,
            task_e2e.clone(),
        );
        let term_changes = Counter::default();
        r.register(
            "term_changes",
            "Raft terms this node entered (each is an election somewhere)",
            term_changes.clone(),
        );
        let elections_won = Counter::default();
        r.register("elections_won", "Times this node became leader", elections_won.clone());
        let limits = crate::limits::LimitMetrics::new();
        r.register(
            "limit_refusals",
            "Connections, streams and requests refused (or streams ended) by a resource limit, by limit",
            limits.refusals.clone(),
        );
        r.register(
            "connections",
            "Open connections by listener (client, peer, http)",
            limits.connections.clone(),
        );
        r.register("streams", "Open server streams by kind", limits.streams.clone());
        r.register_with_unit(
            "stream_buffered",
            "Messages server streams hold for clients that have not read them yet",
            Unit::Bytes,
            limits.buffered.clone(),
        );
        r.register(
            "idle_connections_closed",
            "Connections closed after limits.idle_timeout without a request",
            limits.idle_closed.clone(),
        );
        for outcome in ["succeeded", "failed", "cancelled", "upstream_failed"] {
            let _ = completions.get_or_create(&vec![("outcome", outcome.to_string())]);
        }
        Metrics {
            registry: r,
            assignments,
            assignments_refused,
            assignments_ahead,
            expirations,
            expiry_requeues,
            assign_latency,
            requests,
            request_errors,
            rpc_requests,
            rpc_latency,
            http_requests,
            completions,
            task_run,
            task_e2e,
            term_changes,
            elections_won,
            known_queues: Mutex::new(BTreeSet::new()),
            limits,
        }
    }

    /// The outcome of one Assign at apply. A task planned ahead of the completion that
    /// released it was queued and assigned by the same entry: 0 in the latency histogram.
    /// (The planner loop observes its own assignments' latency.)
    pub fn record_assignments<T, E>(&self, results: &[Result<T, E>], ahead: bool) {
        let accepted = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.assignments.inc_by(accepted);
        self.assignments_refused.inc_by(results.len() as u64 - accepted);
        if ahead {
            self.assignments_ahead.inc_by(accepted);
            for _ in 0..accepted {
                self.observe_assign_latency(0);
            }
        }
    }

    /// The resource-limit series (shared handles).
    pub fn limits(&self) -> &crate::limits::LimitMetrics {
        &self.limits
    }

    /// One worker expiry and the tasks it requeued.
    pub fn record_expiry(&self, requeued: u64) {
        self.expirations.inc();
        self.expiry_requeues.inc_by(requeued);
    }

    /// Time a task spent queued before it was assigned (log time, ms).
    pub fn observe_assign_latency(&self, ms: u64) {
        self.assign_latency.observe(ms as f64 / 1e3);
    }

    /// One API request handled (and whether it failed).
    pub fn record_request(&self, failed: bool) {
        self.requests.inc();
        if failed {
            self.request_errors.inc();
        }
    }

    /// One gRPC call to `method` (`Service/Method`) ended with `code` after `took`.
    pub fn record_rpc(&self, method: &str, code: tonic::Code, took: Duration) {
        let labels = vec![("method", method.to_string()), ("code", code_name(code).to_string())];
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_latency.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// One HTTP request to `route` (the route pattern, not the raw path) answered `status`.
    pub fn record_http(&self, route: &str, status: u16) {
        let labels = vec![("route", route.to_string()), ("code", status.to_string())];
        self.http_requests.get_or_create(&labels).inc();
    }

    /// A task reached a terminal state (leader): outcome, run time and end-to-end time.
    fn record_completion(&self, task: &state_machine::Task) {
        let (outcome, run) = match &task.state {
            TaskState::Succeeded { at, started_at, .. } => {
                ("succeeded", Some(at.saturating_sub(*started_at)))
            }
            TaskState::Failed { .. } => ("failed", None),
            TaskState::Cancelled { .. } => ("cancelled", None),
            TaskState::UpstreamFailed { .. } => ("upstream_failed", None),
            _ => return,
        };
        self.completions.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
        if let Some(ms) = run {
            self.task_run.observe(ms as f64 / 1e3);
        }
        let e2e = task.updated_at.saturating_sub(task.submitted_at);
        self.task_e2e.observe(e2e as f64 / 1e3);
    }
}

/// The gRPC code's canonical name (`OK`, `NOT_FOUND`, ...), as dashboards expect.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Follow the applied event stream until the node stops: on the leader, count every task
/// that reaches a terminal state (outcome, run time, end-to-end time); on every node, count
/// term changes and elections won. Spawned with the HTTP server.
pub async fn follow_events(node: Arc<Node>) {
    let events = node.raft.sm().events().clone();
    let mut applied = events.subscribe();
    let mut cursor = events.applied();
    let mut raft = node.raft.raft().metrics();
    let (mut term, mut leading) = {
        let m = raft.borrow();
        (m.current_term, m.state == ServerState::Leader)
    };
    let mut stopping = node.stopping.clone();
    loop {
        {
            let m = raft.borrow_and_update();
            if m.current_term > term {
                node.metrics.term_changes.inc_by(m.current_term - term);
                term = m.current_term;
            }
            let now_leading = m.state == ServerState::Leader;
            if now_leading && !leading {
                node.metrics.elections_won.inc();
            }
            leading = now_leading;
        }
        match events.read_after(cursor, 1_024) {
            Ok((batches, next)) => {
                cursor = next;
                if leading {
                    let ended: Vec<_> = batches
                        .iter()
                        .flat_map(|b| b.events.iter())
                        .filter(|e| e.state.is_terminal())
                        .map(|e| e.task)
                        .collect();
                    if !ended.is_empty() {
                        node.local(|s| {
                            for id in ended {
                                if let Some(t) = s.task(id) {
                                    node.metrics.record_completion(t);
                                }
                            }
                        });
                    }
                }
                if next < events.applied() {
                    continue;
                }
            }
            // Events lost to compaction or a snapshot install: skip to now.
            Err(_) => cursor = events.applied(),
        }
        tokio::select! {
            r = applied.wait_for(|a| *a > cursor) => if r.is_err() { return },
            r = raft.changed() => if r.is_err() { return },
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

/// A histogram whose buckets were counted elsewhere (the log's fsync times).
#[derive(Debug)]
struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone).
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn const_gauge(r: &mut Registry, name: &str, help: &str, v: i64) {
    r.register(name, help, ConstGauge::new(v));
}

/// Encodes one family of gauges computed at scrape time.
fn gauge_family(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) {
    let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    for (labels, v) in rows {
        f.get_or_create(&labels).set(v);
    }
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f),
        None => r.register(name, help, f),
    }
}

/// The `/metrics` page in OpenMetrics text (ends with `# EOF`).
pub fn render_openmetrics(node: &Node) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = encode_registry(&mut out, &node.metrics.registry);
    let _ = encode_registry(&mut out, &scrape_registry(node));
    let _ = encode_registry(&mut out, &process_registry());
    let _ = encode_eof(&mut out);
    out
}

/// The `/metrics` page in the Prometheus text format 0.0.4 (what `promtool check metrics`
/// and most scrapers read): the OpenMetrics page with counter families named by their
/// `_total` samples, and without `# UNIT` and `# EOF` lines.
pub fn render(node: &Node) -> String {
    to_prometheus_text(&render_openmetrics(node))
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4 (see [`render`]).
pub fn to_prometheus_text(open: &str) -> String {
    let counters: BTreeSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find(|p| line.starts_with(p));
        if let Some(prefix) = meta {
            let rest = &line[prefix.len()..];
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                let _ = writeln!(out, "{prefix}{name}_total {tail}");
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Gauges read from Raft and the state now.
fn scrape_registry(node: &Node) -> Registry {
    let mut r = Registry::with_prefix("raftsched");
    let m = node.raft.raft().metrics().borrow().clone();
    let status = node.raft.local_status(false);
    let leader = m.state == ServerState::Leader;
    gauge_family(
        &mut r,
        "build_info",
        "Build of this node (value 1)",
        None,
        [(
            vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("node_id", node.raft.id().to_string()),
            ],
            1.0,
        )],
    );
    const_gauge(&mut r, "node_id", "This node's id", node.raft.id() as i64);
    const_gauge(&mut r, "is_leader", "1 if this node is the Raft leader", i64::from(leader));
    const_gauge(
        &mut r,
        "leader_id",
        "The leader this node knows (0 = none)",
        m.current_leader.unwrap_or(0) as i64,
    );
    const_gauge(&mut r, "term", "Current Raft term", m.current_term as i64);
    const_gauge(&mut r, "last_log_index", "Last Raft log index", status.last_log_index as i64);
    const_gauge(&mut r, "commit_index", "Committed Raft log index", status.committed_index as i64);
    const_gauge(&mut r, "applied_index", "Applied Raft log index", status.applied_index as i64);
    const_gauge(
        &mut r,
        "snapshot_index",
        "Index of the last snapshot",
        status.snapshot_index as i64,
    );
    const_gauge(
        &mut r,
        "persisted_index",
        "Applied index whose records are written to sled",
        node.raft.sm().persisted_index() as i64,
    );

    let log = node.raft.log_stats();
    r.register("log_appends", "Raft log append calls", ConstCounter::new(log.appends));
    r.register("log_entries", "Raft log entries appended", ConstCounter::new(log.entries));
    r.register_with_unit(
        "log_written",
        "Raft log record bytes written",
        Unit::Bytes,
        ConstCounter::new(log.bytes),
    );
    r.register("log_syncs", "fdatasync calls on the Raft log", ConstCounter::new(log.syncs));
    let mut buckets: Vec<(f64, u64)> = raft::log::SYNC_BUCKETS_MICROS
        .iter()
        .zip(log.sync_buckets.iter())
        .map(|(b, n)| (*b as f64 / 1e6, *n))
        .collect();
    buckets.push((f64::INFINITY, log.sync_buckets[raft::log::SYNC_BUCKETS_MICROS.len()]));
    r.register_with_unit(
        "log_fsync_duration",
        "Time of one fdatasync of the Raft log",
        Unit::Seconds,
        ConstHistogram { sum: log.sync_micros as f64 / 1e6, count: log.syncs, buckets },
    );

    disk_gauges(node, &mut r);
    if leader {
        leader_gauges(node, &mut r, status.last_log_index);
    }
    r
}

/// The data directory's free space, its floor and whether submits are refused for it
/// ([`crate::disk`]).
fn disk_gauges(node: &Node, r: &mut Registry) {
    let d = &node.disk;
    if let (Some(free), Some(total)) = (d.free(), d.total()) {
        r.register_with_unit(
            "disk_free",
            "Free space on the data directory's filesystem, for this server's user",
            Unit::Bytes,
            ConstGauge::new(i64::try_from(free).unwrap_or(i64::MAX)),
        );
        r.register_with_unit(
            "disk_size",
            "Size of the data directory's filesystem",
            Unit::Bytes,
            ConstGauge::new(i64::try_from(total).unwrap_or(i64::MAX)),
        );
    }
    r.register_with_unit(
        "disk_min_free",
        "Free-space floor of the data directory (0 = off): below it new submits are refused",
        Unit::Bytes,
        ConstGauge::new(i64::try_from(d.floor()).unwrap_or(i64::MAX)),
    );
    const_gauge(
        r,
        "disk_low",
        "1 while the free disk space is below the floor and new submits are refused",
        i64::from(d.low().is_some()),
    );
}

/// Cluster-wide gauges, exported by the leader only.
fn leader_gauges(node: &Node, r: &mut Registry, last_log_index: u64) {
    let now = raft::node::now_ms();
    let (counts, depths, oldest, workers) = node.local(|s| {
        let mut w = [0u64; 3];
        for x in s.workers() {
            w[match x.status.as_str() {
                "alive" => 0,
                "draining" => 1,
                _ => 2,
            }] += 1;
        }
        (s.counts(), s.queue_depths(), s.oldest_queued(), w)
    });
    gauge_family(
        r,
        "tasks",
        "Tasks in the state, by state (leader)",
        None,
        TaskStateKind::ALL
            .iter()
            .map(|k| (vec![("state", k.as_str().to_string())], counts[k.index()] as f64)),
    );
    let queues: Vec<String> = {
        let mut known = node.metrics.known_queues.lock().unwrap_or_else(|e| e.into_inner());
        known.extend(depths.keys().cloned());
        known.insert("default".into());
        known.iter().cloned().collect()
    };
    gauge_family(
        r,
        "queue_depth",
        "Queued tasks per queue (leader)",
        None,
        queues
            .iter()
            .map(|q| (vec![("queue", q.clone())], depths.get(q).copied().unwrap_or(0) as f64)),
    );
    gauge_family(
        r,
        "queue_oldest_age",
        "Time since the oldest submitted task still queued in the queue became ready; 0 when empty (leader)",
        Some(Unit::Seconds),
        queues.iter().map(|q| {
            let age = oldest.get(q).map_or(0, |since| now.saturating_sub(*since));
            (vec![("queue", q.clone())], age as f64 / 1e3)
        }),
    );
    gauge_family(
        r,
        "workers",
        "Workers by status (leader)",
        None,
        ["alive", "draining", "dead"]
            .iter()
            .enumerate()
            .map(|(i, s)| (vec![("status", s.to_string())], workers[i] as f64)),
    );
    let me = node.raft.id();
    gauge_family(
        r,
        "replication_lag_entries",
        "Log entries the leader holds that the follower has not matched (leader)",
        None,
        node.raft.members().into_keys().filter(|id| *id != me).map(|id| {
            let matched = node.raft.replication().get(&id).copied().unwrap_or(0);
            (vec![("follower", id.to_string())], last_log_index.saturating_sub(matched) as f64)
        }),
    );
}

/// `process_*` metrics from `/proc/self` (Linux; empty elsewhere).
fn process_registry() -> Registry {
    let mut r = Registry::default();
    let Some(p) = read_proc() else { return r };
    r.register_with_unit(
        "process_cpu",
        "User and system CPU time spent",
        Unit::Seconds,
        ConstCounter::new(p.cpu_seconds),
    );
    r.register_with_unit(
        "process_resident_memory",
        "Resident memory size",
        Unit::Bytes,
        ConstGauge::new(p.rss_bytes as i64),
    );
    r.register_with_unit(
        "process_virtual_memory",
        "Virtual memory size",
        Unit::Bytes,
        ConstGauge::new(p.vsize_bytes as i64),
    );
    r.register_with_unit(
        "process_start_time",
        "Start time of the process since the unix epoch",
        Unit::Seconds,
        ConstGauge::new(p.start_time_seconds),
    );
    r.register("process_open_fds", "Open file descriptors", ConstGauge::new(p.open_fds as i64));
    if let Some(max) = p.max_fds {
        r.register("process_max_fds", "Maximum open file descriptors", ConstGauge::new(max as i64));
    }
    r.register("process_threads", "OS threads", ConstGauge::new(p.threads as i64));
    r
}

struct ProcStats {
    cpu_seconds: f64,
    rss_bytes: u64,
    vsize_bytes: u64,
    start_time_seconds: f64,
    open_fds: u64,
    max_fds: Option<u64>,
    threads: u64,
}

fn read_proc() -> Option<ProcStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field numbers from proc(5), minus 3 (pid, comm and the split).
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let ticks = 100.0; // sysconf(_SC_CLK_TCK) is 100 on every Linux target we build for.
    let page = 4096u64;
    let utime = num(11)?;
    let stime = num(12)?;
    let threads = num(17)?;
    let start_ticks = num(19)?;
    let vsize = num(20)?;
    let rss_pages = num(21)?;
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))
    })?;
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
    });
    Some(ProcStats {
        cpu_seconds: (utime + stime) as f64 / ticks,
        rss_bytes: rss_pages * page,
        vsize_bytes: vsize,
        start_time_seconds: boot as f64 + start_ticks as f64 / ticks,
        open_fds,
        max_fds,
        threads,
    })
}

/// The `/healthz` answer: (alive, JSON body). Liveness only: 200 while the process runs and
/// serves HTTP, whatever the cluster looks like; 503 only once Raft has stopped with a fatal
/// error (the process is on its way out). Whether this node can serve requests is `/readyz`.
pub fn health(node: &Node) -> (bool, String) {
    let m = node.raft.raft().metrics().borrow().clone();
    let fatal = node.raft.fatal();
    let ok = fatal.is_none();
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "stopped" },
        "node_id": node.raft.id(),
        "role": raft::node::role_name(m.state),
        "leader_id": m.current_leader,
        "term": m.current_term,
        "applied_index": m.last_applied.map_or(0, |l| l.index),
        "error": fatal,
    });
    (ok, body.to_string())
}

/// The `/readyz` answer: (ready, plain-text reason). Ready = this node can serve a
/// linearizable read now ([`raft::node::RaftNode::readiness`]).
pub async fn readiness(node: &Node) -> (bool, String) {
    match node.raft.readiness().await {
        Ok(r) => (true, format!("ready: {r}\n")),
        Err(e) => (false, format!("not ready: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_families_take_their_total_name_in_prometheus_text() {
        let open = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total 3\n\
                    # HELP x_lat Latency.\n# TYPE x_lat histogram\n# UNIT x_lat seconds\n\
                    x_lat_sum 0\n# EOF\n";
        let text = to_prometheus_text(open);
        assert!(text.contains("# HELP x_requests_total Requests.\n"), "{text}");
        assert!(text.contains("# TYPE x_requests_total counter\n"), "{text}");
        assert!(!text.contains("# UNIT") && !text.contains("# EOF"), "{text}");
        assert!(text.contains("# TYPE x_lat histogram\n"), "{text}");
    }

    #[test]
    fn completions_by_outcome_exist_at_zero() {
        let m = Metrics::new();
        let mut out = String::new();
        encode_registry(&mut out, &m.registry).unwrap();
        for o in ["succeeded", "failed", "cancelled", "upstream_failed"] {
            assert!(
                out.contains(&format!("raftsched_task_completions_total{{outcome=\"{o}\"}} 0")),
                "{out}"
            );
        }
        m.record_rpc("scheduler.v1.Tasks/GetTask", tonic::Code::NotFound, Duration::from_millis(3));
        let mut out = String::new();
        encode_registry(&mut out, &m.registry).unwrap();
        assert!(out.contains(
            "raftsched_grpc_requests_total{method=\"scheduler.v1.Tasks/GetTask\",code=\"NOT_FOUND\"} 1"
        ), "{out}");
    }
}
