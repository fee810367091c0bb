//! The history of a chaos run: what every actor did and saw, one JSON object per line.
//!
//! A history is the only contract between the harness (which drives real node processes,
//! workers and faults) and the [`checker`](crate::checker), which judges it afterwards without
//! any network or processes. Everything the checker concludes must follow from these events,
//! so the rules below matter as much as the types.
//!
//! # Recording rules
//!
//! * **Time.** `t_ms` is milliseconds since the start of the run on a monotonic clock that all
//!   processes of the run share ([`RunClock`]: `CLOCK_MONOTONIC` is system-wide on Linux).
//!   Never use a faked or wall clock. Real-time order between two events is only claimed when
//!   their `t_ms` differ: events in the same millisecond are treated as concurrent, so a coarse
//!   clock can hide a violation but never invent one.
//! * **Operations.** Every client or worker request is an *invoke* event followed by at most one
//!   *completion* event with the same `op` id. Op ids are unique within a run across all
//!   processes (give each process its own range). Invokes are recorded *before* the request is
//!   sent; completions after the answer arrived.
//! * **Outcomes are classified conservatively** (Jepsen's ok/fail/info). `*Ok`: the server said
//!   it happened. `*Fail`/`CompleteRejected`: the server proved it did nothing. `*Unknown`: a
//!   timeout, a broken connection, `UNAVAILABLE` after sending — the operation may or may not
//!   have happened and is never assumed absent. An invoke without any completion (the process
//!   was killed) counts as unknown.
//! * **Workers** record `ExecStart` when they begin an attempt they were given and `ExecEnd`
//!   when its payload returns. The checker relies on workers learning only *committed*
//!   assignments: an `ExecStart` of fence `f` proves that attempt `f` was granted.
//! * **Retries** reuse the idempotency key and the same arguments (priority, deps) as the
//!   first attempt; each retry is a new op.
//! * **Audit log.** `Applied` events mirror the server's task-change stream in log order. Each
//!   log entry is observed completely or not at all; a range the observer did not see
//!   (reconnect, late subscription) is declared with `AuditGap`. Without a gap the observed
//!   log is taken to be complete, so an observer that silently skips entries produces false
//!   alarms.
//! * **Faults.** `FaultStart` is written once the fault is actually in place (a fault that
//!   could not be installed is a `HarnessError`, not a `FaultStart`); every `FaultStart` gets a
//!   `FaultEnd` when it is healed (for a kill: when the node was restarted).
//! * **Final reads.** After the final heal, for every node the harness writes one `FinalTask`
//!   per task the node holds (the complete listing) and then the node's `Digest`. A node that
//!   wrote either is a *reporting node*, and its listing is taken as complete, so report only
//!   current members, and only after they caught up. Retention (purge) must be off, or purged
//!   tasks look lost.
//!
//! # File format
//!
//! One [`Event`] per line (JSON Lines), the kind tagged by `type`:
//!
//! ```text
//! {"t_ms":1200,"type":"submit_invoke","op":7,"key":"k-7","priority":3,"deps":["k-2"]}
//! {"t_ms":1203,"type":"submit_ok","op":7,"key":"k-7","id":42}
//! ```
//!
//! [`HistoryWriter`] writes each line with a single `write` on a file opened for append, so a
//! process killed with SIGKILL never leaves an event half-recorded in the page cache, and
//! several processes could share one file. Each process normally writes its own file and
//! [`read_histories`] merges them by time.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Identifies one operation: an invoke and its completion share it.
pub type OpId = u64;

/// One thing that happened during a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the run started, on the run's shared monotonic clock.
    pub t_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// An event at `t_ms`.
    pub fn new(t_ms: u64, kind: EventKind) -> Self {
        Event { t_ms, kind }
    }
}

/// What happened. Field names are part of the on-disk format; extend, don't rename.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    // ---- client operations -------------------------------------------------------------
    /// A client sends a submission.
    SubmitInvoke {
        /// Operation id.
        op: OpId,
        /// Idempotency key: the same key must always name the same task.
        key: String,
        /// Priority (higher first).
        priority: i32,
        /// Dependencies, by the idempotency keys of earlier submissions.
        deps: Vec<String>,
    },
    /// The submission was acknowledged with the task's id (new or deduplicated).
    SubmitOk {
        /// Operation id.
        op: OpId,
        /// Same key as the invoke.
        key: String,
        /// The task id the server answered.
        id: u64,
    },
    /// The server proved it did nothing (validation error, or refused before proposing).
    SubmitFail {
        /// Operation id.
        op: OpId,
        /// Same key as the invoke.
        key: String,
        /// The error, for humans.
        reason: String,
    },
    /// Outcome unknown (timeout, broken connection): the task may exist.
    SubmitUnknown {
        /// Operation id.
        op: OpId,
        /// Same key as the invoke.
        key: String,
        /// The error, for humans.
        reason: String,
    },
    /// A client asks to cancel a task.
    CancelInvoke {
        /// Operation id.
        op: OpId,
        /// The task.
        id: u64,
    },
    /// The task is cancelled (now, or by an earlier retry of the same cancel).
    CancelOk {
        /// Operation id.
        op: OpId,
        /// Same task as the invoke.
        id: u64,
    },
    /// The server refused the cancel (for example: the task had already finished).
    CancelFail {
        /// Operation id.
        op: OpId,
        /// Same task as the invoke.
        id: u64,
        /// The error, for humans.
        reason: String,
    },
    /// Outcome unknown.
    CancelUnknown {
        /// Operation id.
        op: OpId,
        /// Same task as the invoke.
        id: u64,
        /// The error, for humans.
        reason: String,
    },

    // ---- worker side ---------------------------------------------------------------------
    /// A worker begins executing an attempt it was given.
    ExecStart {
        /// The worker's id.
        worker: String,
        /// The task.
        task: u64,
        /// The attempt number the server gave.
        attempt: u32,
        /// The attempt's fencing token.
        fence: u64,
    },
    /// The worker's execution of an attempt ended (before it reports).
    ExecEnd {
        /// The worker's id.
        worker: String,
        /// The task.
        task: u64,
        /// The attempt's fencing token.
        fence: u64,
        /// Whether the payload succeeded.
        success: bool,
    },
    /// A worker reports the end of an attempt, quoting its fencing token.
    CompleteInvoke {
        /// Operation id.
        op: OpId,
        /// The reporting worker.
        worker: String,
        /// The task.
        task: u64,
        /// The attempt's fencing token.
        fence: u64,
        /// True for a success report, false for a failure report (which, when accepted,
        /// sends the task to a retry or to Failed).
        success: bool,
    },
    /// The report was accepted.
    CompleteOk {
        /// Operation id.
        op: OpId,
        /// Same task as the invoke.
        task: u64,
        /// Same fence as the invoke.
        fence: u64,
        /// True when the server answered "already accepted" (a retry of a report that was
        /// accepted before): nothing changed this time.
        duplicate: bool,
    },
    /// The report was rejected; nothing changed.
    CompleteRejected {
        /// Operation id.
        op: OpId,
        /// Same task as the invoke.
        task: u64,
        /// Same fence as the invoke.
        fence: u64,
        /// The error, for humans.
        reason: String,
        /// True when rejected because the fence is stale or the worker does not hold it.
        stale: bool,
    },
    /// Outcome unknown.
    CompleteUnknown {
        /// Operation id.
        op: OpId,
        /// Same task as the invoke.
        task: u64,
        /// Same fence as the invoke.
        fence: u64,
        /// The error, for humans.
        reason: String,
    },

    // ---- the server's authoritative change log -----------------------------------------
    /// One task state change, from the server's change stream, in log order.
    Applied {
        /// Raft log index of the entry that made the change.
        index: u64,
        /// Position of this change among the changes of the same entry (0-based). One entry
        /// can change a task twice (a Started and a Succeeded report in one batch), so
        /// `(index, seq)` identifies a change; seeing it twice (after a reconnect) is fine,
        /// seeing two different contents for it means replicas disagree.
        #[serde(default)]
        seq: u32,
        /// The task.
        task: u64,
        /// New state: waiting, queued, delayed, assigned, running, succeeded, failed,
        /// cancelled or upstream_failed.
        state: String,
        /// Attempt number after the change.
        attempt: u32,
        /// Fence of the holder (assigned/running), or of the accepted attempt (succeeded).
        fence: Option<u64>,
        /// The holder (assigned/running) or the worker whose completion was accepted.
        worker: Option<String>,
        /// Term of the log entry, when the observer knows it. Lets the priority check use
        /// "the leader plans again only after its previous Assign entry was applied".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        term: Option<u64>,
        /// For assignments: the applied index of the state the leader's planner looked at,
        /// when the server exposes it. Makes the priority check exact.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plan_index: Option<u64>,
    },
    /// The observer missed the log entries `from_index..=to_index`.
    AuditGap {
        /// First missed index.
        from_index: u64,
        /// Last missed index (inclusive).
        to_index: u64,
    },

    // ---- faults and cluster observations ---------------------------------------------
    /// A fault is in place. `fault` is one of [`fault::ALL`].
    FaultStart {
        /// Fault id, unique in the run; its `FaultEnd` quotes it.
        id: u64,
        /// The kind of fault.
        fault: String,
        /// What it hit (node, worker or link), for humans.
        target: String,
    },
    /// The fault was healed.
    FaultEnd {
        /// Id of the `FaultStart`.
        id: u64,
    },
    /// `node` reported itself as the leader of `term` (its own metrics or status said
    /// "leader"; a follower's belief about who leads is not recorded here).
    LeaderObserved {
        /// The leader.
        node: u64,
        /// Its term.
        term: u64,
    },
    /// The harness itself failed (a fault could not be installed, a final read failed, a
    /// child could not be spawned). Kept apart from system failures: it makes the run
    /// unknown, not invalid.
    HarnessError {
        /// What went wrong.
        what: String,
    },

    // ---- end of run --------------------------------------------------------------------
    /// One task as held by `node` after the final heal (see the module docs).
    FinalTask {
        /// The reporting node.
        node: u64,
        /// The task id.
        id: u64,
        /// Its idempotency key.
        key: Option<String>,
        /// Its state (same names as [`EventKind::Applied`]).
        state: String,
        /// Fence of the accepted completion, if the task succeeded.
        fence: Option<u64>,
    },
    /// A node's state digest at its applied index (written after its `FinalTask` listing).
    Digest {
        /// The reporting node.
        node: u64,
        /// The node's applied log index.
        applied_index: u64,
        /// Hash of its canonical state.
        digest: u64,
    },
}

impl EventKind {
    /// The `type` tag written to the file.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SubmitInvoke { .. } => "submit_invoke",
            EventKind::SubmitOk { .. } => "submit_ok",
            EventKind::SubmitFail { .. } => "submit_fail",
            EventKind::SubmitUnknown { .. } => "submit_unknown",
            EventKind::CancelInvoke { .. } => "cancel_invoke",
            EventKind::CancelOk { .. } => "cancel_ok",
            EventKind::CancelFail { .. } => "cancel_fail",
            EventKind::CancelUnknown { .. } => "cancel_unknown",
            EventKind::ExecStart { .. } => "exec_start",
            EventKind::ExecEnd { .. } => "exec_end",
            EventKind::CompleteInvoke { .. } => "complete_invoke",
            EventKind::CompleteOk { .. } => "complete_ok",
            EventKind::CompleteRejected { .. } => "complete_rejected",
            EventKind::CompleteUnknown { .. } => "complete_unknown",
            EventKind::Applied { .. } => "applied",
            EventKind::AuditGap { .. } => "audit_gap",
            EventKind::FaultStart { .. } => "fault_start",
            EventKind::FaultEnd { .. } => "fault_end",
            EventKind::LeaderObserved { .. } => "leader_observed",
            EventKind::HarnessError { .. } => "harness_error",
            EventKind::FinalTask { .. } => "final_task",
            EventKind::Digest { .. } => "digest",
        }
    }

    /// The operation id, for invokes and their completions.
    pub fn op(&self) -> Option<OpId> {
        match self {
            EventKind::SubmitInvoke { op, .. }
            | EventKind::SubmitOk { op, .. }
            | EventKind::SubmitFail { op, .. }
            | EventKind::SubmitUnknown { op, .. }
            | EventKind::CancelInvoke { op, .. }
            | EventKind::CancelOk { op, .. }
            | EventKind::CancelFail { op, .. }
            | EventKind::CancelUnknown { op, .. }
            | EventKind::CompleteInvoke { op, .. }
            | EventKind::CompleteOk { op, .. }
            | EventKind::CompleteRejected { op, .. }
            | EventKind::CompleteUnknown { op, .. } => Some(*op),
            _ => None,
        }
    }

    /// True for the events that start an operation.
    pub fn is_invoke(&self) -> bool {
        matches!(
            self,
            EventKind::SubmitInvoke { .. }
                | EventKind::CancelInvoke { .. }
                | EventKind::CompleteInvoke { .. }
        )
    }
}

/// Fault kinds a `FaultStart` may name. A name outside [`fault::ALL`] makes the history
/// malformed, so a typo cannot silently drop a leader fault from the failover measurement;
/// add new kinds here.
pub mod fault {
    /// SIGKILL of the leader (restarted later on the same data dir).
    pub const KILL_LEADER: &str = "kill-leader";
    /// SIGKILL of a follower.
    pub const KILL_FOLLOWER: &str = "kill-follower";
    /// SIGSTOP of the leader.
    pub const PAUSE_LEADER: &str = "pause-leader";
    /// SIGSTOP of a follower.
    pub const PAUSE_FOLLOWER: &str = "pause-follower";
    /// A network partition with the leader on the majority side (or not involving it).
    pub const PARTITION: &str = "partition";
    /// A network partition that leaves the leader in a minority.
    pub const PARTITION_LEADER_MINORITY: &str = "partition-leader-minority";
    /// SIGSTOP of a worker process (typically past its lease).
    pub const WORKER_PAUSE: &str = "worker-pause";
    /// SIGKILL of every node at once, then restart.
    pub const CLUSTER_RESTART: &str = "cluster-restart";
    /// Adding/promoting/removing members.
    pub const MEMBERSHIP_CHANGE: &str = "membership-change";
    /// Every member restarted, one at a time, from an older command version to this build's.
    pub const ROLLING_UPGRADE: &str = "rolling-upgrade";

    /// Every known kind.
    pub const ALL: [&str; 10] = [
        KILL_LEADER,
        KILL_FOLLOWER,
        PAUSE_LEADER,
        PAUSE_FOLLOWER,
        PARTITION,
        PARTITION_LEADER_MINORITY,
        WORKER_PAUSE,
        CLUSTER_RESTART,
        MEMBERSHIP_CHANGE,
        ROLLING_UPGRADE,
    ];

    /// Kinds that take the leader away, after which failover time is measured.
    pub const LEADER_FAULTS: [&str; 4] =
        [KILL_LEADER, PAUSE_LEADER, PARTITION_LEADER_MINORITY, CLUSTER_RESTART];

    /// Whether `kind` is in [`ALL`].
    pub fn is_known(kind: &str) -> bool {
        ALL.contains(&kind)
    }

    /// Whether `kind` is in [`LEADER_FAULTS`].
    pub fn is_leader_fault(kind: &str) -> bool {
        LEADER_FAULTS.contains(&kind)
    }
}

/// The run's time base: milliseconds since the run started on `CLOCK_MONOTONIC`.
///
/// The harness starts one clock and hands [`RunClock::start_ns`] to every child process
/// (for example through [`RunClock::ENV`]); since the monotonic clock is system-wide, all
/// processes then stamp events on one time line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunClock {
    start_ns: u64,
}

impl RunClock {
    /// Conventional environment variable carrying [`RunClock::start_ns`] to child processes.
    pub const ENV: &'static str = "RAFTSCHED_RUN_START_NS";

    /// A clock whose zero is now.
    pub fn start() -> Self {
        RunClock { start_ns: monotonic_ns() }
    }

    /// A clock whose zero is `start_ns` (a value from another process's [`RunClock::start_ns`]).
    pub fn from_start_ns(start_ns: u64) -> Self {
        RunClock { start_ns }
    }

    /// The zero of this clock, in raw `CLOCK_MONOTONIC` nanoseconds.
    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    /// Milliseconds since the zero (saturating: never before it).
    pub fn now_ms(&self) -> u64 {
        monotonic_ns().saturating_sub(self.start_ns) / 1_000_000
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Appends events to a JSONL history file.
#[derive(Debug)]
pub struct HistoryWriter {
    file: File,
    path: PathBuf,
    line: Vec<u8>,
}

impl HistoryWriter {
    /// Opens `path` for appending, creating it if needed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("open history file {}", path.display()))?;
        Ok(HistoryWriter { file, path, line: Vec::with_capacity(256) })
    }

    /// Appends one event as one line, with a single write: once this returns, the event
    /// survives a SIGKILL of this process (it is in the page cache; no fsync is done).
    pub fn append(&mut self, event: &Event) -> Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, event).context("encode history event")?;
        self.line.push(b'\n');
        self.file
            .write_all(&self.line)
            .with_context(|| format!("append to history file {}", self.path.display()))
    }

    /// Appends `kind` stamped with `t_ms`.
    pub fn record(&mut self, t_ms: u64, kind: EventKind) -> Result<()> {
        self.append(&Event { t_ms, kind })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Parses JSONL text. Blank lines are skipped. A last line without a trailing newline that
/// does not parse is a write torn by a kill and is dropped; any other bad line is an error
/// naming its line number.
pub fn parse_history(text: &str) -> Result<Vec<Event>> {
    let mut events = Vec::new();
    let torn_tail = !text.is_empty() && !text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(line) {
            Ok(ev) => events.push(ev),
            Err(_) if torn_tail && i + 1 == lines.len() => {}
            Err(e) => return Err(e).with_context(|| format!("history line {}", i + 1)),
        }
    }
    Ok(events)
}

/// Loads one history file (see [`parse_history`]), in file order.
pub fn read_history(path: impl AsRef<Path>) -> Result<Vec<Event>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read history file {}", path.display()))?;
    parse_history(&text).with_context(|| format!("parse history file {}", path.display()))
}

/// Loads several history files (one per process) and merges them into one time line:
/// stable by `t_ms`, so events of one file with equal times keep their file order.
pub fn read_histories<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<Event>> {
    let mut all = Vec::new();
    for p in paths {
        all.extend(read_history(p)?);
    }
    all.sort_by_key(|e| e.t_ms);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Event> {
        let kinds = vec![
            EventKind::SubmitInvoke {
                op: 1,
                key: "k1".into(),
                priority: -3,
                deps: vec!["k0".into()],
            },
            EventKind::SubmitOk { op: 1, key: "k1".into(), id: u64::MAX },
            EventKind::SubmitFail { op: 2, key: "k2".into(), reason: "bad".into() },
            EventKind::SubmitUnknown { op: 3, key: "k3".into(), reason: "timeout".into() },
            EventKind::CancelInvoke { op: 4, id: 9 },
            EventKind::CancelOk { op: 4, id: 9 },
            EventKind::CancelFail { op: 5, id: 9, reason: "finished".into() },
            EventKind::CancelUnknown { op: 6, id: 9, reason: "reset".into() },
            EventKind::ExecStart { worker: "w1".into(), task: 9, attempt: 2, fence: 17 },
            EventKind::ExecEnd { worker: "w1".into(), task: 9, fence: 17, success: true },
            EventKind::CompleteInvoke {
                op: 7,
                worker: "w1".into(),
                task: 9,
                fence: 17,
                success: true,
            },
            EventKind::CompleteOk { op: 7, task: 9, fence: 17, duplicate: true },
            EventKind::CompleteRejected {
                op: 8,
                task: 9,
                fence: 3,
                reason: "stale".into(),
                stale: true,
            },
            EventKind::CompleteUnknown { op: 9, task: 9, fence: 17, reason: "x".into() },
            EventKind::Applied {
                index: 12,
                seq: 1,
                task: 9,
                state: "assigned".into(),
                attempt: 2,
                fence: Some(17),
                worker: Some("w1".into()),
                term: Some(3),
                plan_index: Some(11),
            },
            EventKind::Applied {
                index: 13,
                seq: 0,
                task: 9,
                state: "queued".into(),
                attempt: 2,
                fence: None,
                worker: None,
                term: None,
                plan_index: None,
            },
            EventKind::AuditGap { from_index: 20, to_index: 25 },
            EventKind::FaultStart { id: 1, fault: fault::KILL_LEADER.into(), target: "n1".into() },
            EventKind::FaultEnd { id: 1 },
            EventKind::LeaderObserved { node: 2, term: 4 },
            EventKind::HarnessError { what: "nft missing".into() },
            EventKind::FinalTask {
                node: 1,
                id: 9,
                key: Some("k1".into()),
                state: "succeeded".into(),
                fence: Some(17),
            },
            EventKind::FinalTask {
                node: 1,
                id: 10,
                key: None,
                state: "failed".into(),
                fence: None,
            },
            EventKind::Digest { node: 1, applied_index: 30, digest: 0xdead_beef },
        ];
        kinds.into_iter().enumerate().map(|(i, k)| Event::new(i as u64 * 3, k)).collect()
    }

    #[test]
    fn jsonl_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let events = sample();
        let mut w = HistoryWriter::open(&path).unwrap();
        for e in &events[..5] {
            w.append(e).unwrap();
        }
        drop(w);
        // Reopening appends rather than truncating.
        let mut w = HistoryWriter::open(&path).unwrap();
        for e in &events[5..] {
            w.record(e.t_ms, e.kind.clone()).unwrap();
        }
        let back = read_history(&path).unwrap();
        assert_eq!(back, events);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), events.len());
    }

    #[test]
    fn format_is_flat_and_tagged() {
        let e = Event::new(5, EventKind::SubmitOk { op: 1, key: "a".into(), id: 2 });
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"t_ms":5,"type":"submit_ok","op":1,"key":"a","id":2}"#);
        for e in sample() {
            let v: serde_json::Value = serde_json::to_value(&e).unwrap();
            assert_eq!(v["type"], e.kind.name());
        }
    }

    #[test]
    fn optional_applied_fields_may_be_absent() {
        let line = r#"{"t_ms":1,"type":"applied","index":4,"task":2,"state":"queued","attempt":0,"fence":null,"worker":null}"#;
        let e: Event = serde_json::from_str(line).unwrap();
        match e.kind {
            EventKind::Applied { seq, term, plan_index, .. } => {
                assert_eq!((seq, term, plan_index), (0, None, None));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn torn_last_line_is_dropped_but_bad_middle_line_is_an_error() {
        let good = r#"{"t_ms":1,"type":"fault_end","id":3}"#;
        let torn = format!("{good}\n{{\"t_ms\":2,\"type\":\"fau");
        assert_eq!(parse_history(&torn).unwrap().len(), 1);
        let bad = format!("{good}\nnot json\n{good}\n");
        let err = parse_history(&bad).unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        // A complete (newline-terminated) bad last line is not a torn write.
        assert!(parse_history(&format!("{good}\nnot json\n")).is_err());
    }

    #[test]
    fn merge_orders_by_time_and_keeps_file_order_on_ties() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
        let mut wa = HistoryWriter::open(&a).unwrap();
        let mut wb = HistoryWriter::open(&b).unwrap();
        wa.record(5, EventKind::FaultEnd { id: 1 }).unwrap();
        wa.record(5, EventKind::FaultEnd { id: 2 }).unwrap();
        wa.record(9, EventKind::FaultEnd { id: 3 }).unwrap();
        wb.record(1, EventKind::FaultEnd { id: 4 }).unwrap();
        wb.record(7, EventKind::FaultEnd { id: 5 }).unwrap();
        let merged = read_histories(&[a, b]).unwrap();
        let ids: Vec<u64> = merged
            .iter()
            .map(|e| match e.kind {
                EventKind::FaultEnd { id } => id,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(ids, vec![4, 1, 2, 5, 3]);
    }

    #[test]
    fn run_clock_is_monotonic_and_shareable() {
        let c = RunClock::start();
        let a = c.now_ms();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = c.now_ms();
        assert!(b >= a + 2, "{a} -> {b}");
        let child = RunClock::from_start_ns(c.start_ns());
        assert!(child.now_ms() >= b);
    }

    #[test]
    fn fault_kinds() {
        assert!(fault::is_leader_fault("kill-leader"));
        assert!(!fault::is_leader_fault("kill-follower"));
        assert!(fault::LEADER_FAULTS.iter().all(|k| fault::is_known(k)));
        assert!(!fault::is_known("kill_leader"));
    }
}
