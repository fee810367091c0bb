//! Prometheus metrics. Counters kept by the node live here as atomics; gauges (role, term,
//! indexes, tasks per state, queue depth, workers) are read from Raft and the state when
//! `/metrics` is scraped. Also the bodies of `/healthz` (liveness: [`health`]) and `/readyz`
//! (readiness: [`readiness`]).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::ServerState;
use state_machine::TaskStateKind;

use crate::Node;

const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 30_000];

/// Counters and histograms of one node.
#[derive(Default)]
pub struct Metrics {
    assignments: AtomicU64,
    assignments_refused: AtomicU64,
    assignments_ahead: AtomicU64,
    expirations: AtomicU64,
    expiry_requeues: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_ms: AtomicU64,
    requests: AtomicU64,
    request_errors: AtomicU64,
}

impl Metrics {
    /// The outcome of one Assign at apply. A task planned ahead of the completion that
    /// released it was queued and assigned by the same entry: 0 ms in the latency histogram.
    /// (The planner loop observes its own assignments' latency.)
    pub fn record_assignments<T, E>(&self, results: &[Result<T, E>], ahead: bool) {
        let accepted = results.iter().filter(|r| r.is_ok()).count() as u64;
        self.assignments.fetch_add(accepted, Ordering::Relaxed);
        self.assignments_refused.fetch_add(results.len() as u64 - accepted, Ordering::Relaxed);
        if ahead {
            self.assignments_ahead.fetch_add(accepted, Ordering::Relaxed);
            for _ in 0..accepted {
                self.observe_assign_latency(0);
            }
        }
    }

    /// One worker expiry and the tasks it requeued.
    pub fn record_expiry(&self, requeued: u64) {
        self.expirations.fetch_add(1, Ordering::Relaxed);
        self.expiry_requeues.fetch_add(requeued, Ordering::Relaxed);
    }

    /// Time a task spent queued before it was assigned (log time, ms).
    pub fn observe_assign_latency(&self, ms: u64) {
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// One API request handled (and whether it failed).
    pub fn record_request(&self, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.request_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn line(out: &mut String, name: &str, help: &str, kind: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

/// The `/metrics` page.
pub fn render(node: &Node) -> String {
    let m = node.raft.raft().metrics().borrow().clone();
    let status = node.raft.local_status(false);
    let mut out = String::with_capacity(4096);
    line(&mut out, "raftsched_node_id", "This node's id.", "gauge", node.raft.id());
    line(
        &mut out,
        "raftsched_is_leader",
        "1 if this node is the Raft leader.",
        "gauge",
        u8::from(m.state == ServerState::Leader),
    );
    line(
        &mut out,
        "raftsched_leader_id",
        "The leader this node knows (0 = none).",
        "gauge",
        m.current_leader.unwrap_or(0),
    );
    line(&mut out, "raftsched_term", "Current Raft term.", "gauge", m.current_term);
    line(
        &mut out,
        "raftsched_last_log_index",
        "Last Raft log index.",
        "gauge",
        status.last_log_index,
    );
    line(
        &mut out,
        "raftsched_commit_index",
        "Committed Raft log index.",
        "gauge",
        status.committed_index,
    );
    line(
        &mut out,
        "raftsched_applied_index",
        "Applied Raft log index.",
        "gauge",
        status.applied_index,
    );
    line(
        &mut out,
        "raftsched_snapshot_index",
        "Index of the last snapshot.",
        "gauge",
        status.snapshot_index,
    );
    line(
        &mut out,
        "raftsched_persisted_index",
        "Applied index whose records are written to sled.",
        "gauge",
        node.raft.sm().persisted_index(),
    );

    let (counts, depths, workers) = node.local(|s| {
        let mut w = [0u64; 3];
        for x in s.workers() {
            w[match x.status.as_str() {
                "alive" => 0,
                "draining" => 1,
                _ => 2,
            }] += 1;
        }
        (s.counts(), s.queue_depths(), w)
    });
    let _ = writeln!(
        out,
        "# HELP raftsched_tasks Tasks in the state, by state.\n# TYPE raftsched_tasks gauge"
    );
    for k in TaskStateKind::ALL {
        let _ = writeln!(out, "raftsched_tasks{{state=\"{}\"}} {}", k.as_str(), counts[k.index()]);
    }
    let _ = writeln!(
        out,
        "# HELP raftsched_queue_depth Queued tasks per queue.\n# TYPE raftsched_queue_depth gauge"
    );
    for (q, n) in depths {
        let _ = writeln!(out, "raftsched_queue_depth{{queue=\"{q}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP raftsched_workers Workers by status.\n# TYPE raftsched_workers gauge"
    );
    for (i, name) in ["alive", "draining", "dead"].iter().enumerate() {
        let _ = writeln!(out, "raftsched_workers{{status=\"{name}\"}} {}", workers[i]);
    }

    let c = &node.metrics;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    line(
        &mut out,
        "raftsched_assignments_total",
        "Assignments accepted (leader).",
        "counter",
        get(&c.assignments),
    );
    line(
        &mut out,
        "raftsched_assignments_refused_total",
        "Planned assignments refused at apply (leader).",
        "counter",
        get(&c.assignments_refused),
    );
    line(
        &mut out,
        "raftsched_assignments_ahead_total",
        "Assignments made in the entry of the completion that released the task (leader).",
        "counter",
        get(&c.assignments_ahead),
    );
    line(
        &mut out,
        "raftsched_worker_expirations_total",
        "Worker sessions expired (leader).",
        "counter",
        get(&c.expirations),
    );
    line(
        &mut out,
        "raftsched_worker_expiry_requeues_total",
        "Tasks requeued by expiries (leader).",
        "counter",
        get(&c.expiry_requeues),
    );
    line(
        &mut out,
        "raftsched_requests_total",
        "API requests handled.",
        "counter",
        get(&c.requests),
    );
    line(
        &mut out,
        "raftsched_request_errors_total",
        "API requests answered with an error.",
        "counter",
        get(&c.request_errors),
    );
    let _ = writeln!(
        out,
        "# HELP raftsched_assignment_latency_ms Time from queued to assigned (log time, leader).\n# TYPE raftsched_assignment_latency_ms histogram"
    );
    for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
        let _ = writeln!(
            out,
            "raftsched_assignment_latency_ms_bucket{{le=\"{b}\"}} {}",
            get(&c.latency_buckets[i])
        );
    }
    let count = get(&c.latency_count);
    let _ = writeln!(out, "raftsched_assignment_latency_ms_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "raftsched_assignment_latency_ms_sum {}", get(&c.latency_sum_ms));
    let _ = writeln!(out, "raftsched_assignment_latency_ms_count {count}");

    let log = node.raft.log_stats();
    line(&mut out, "raftsched_log_appends_total", "Raft log append calls.", "counter", log.appends);
    line(
        &mut out,
        "raftsched_log_entries_total",
        "Raft log entries appended.",
        "counter",
        log.entries,
    );
    line(
        &mut out,
        "raftsched_log_syncs_total",
        "fdatasync calls on the Raft log.",
        "counter",
        log.syncs,
    );
    line(
        &mut out,
        "raftsched_log_sync_seconds_total",
        "Time spent in those syncs.",
        "counter",
        log.sync_micros as f64 / 1e6,
    );
    out
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
