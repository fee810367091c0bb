//! The worker runtime: register, receive assignments, run them, report, survive failovers.
//!
//! A [`Worker`] turns a [`Handler`] (what to do with one task: [`crate::exec::ShellHandler`]
//! runs a shell command; tests and benchmarks pass closures) into a cluster worker:
//!
//! The protocol is decided by a pure state machine (`core`: inputs in, effects out, no I/O,
//! no clock reads) and carried out by a thin async actor (`runtime`). Each point below names
//! the core input that triggers it and the effect that carries it out.
//!
//! 1. **Session.** RegisterWorker with the worker id and a random `instance` chosen once per
//!    process, then Heartbeat every `heartbeat_interval_ms` from the answer, and open the
//!    assignment stream. (Effect `Register` → the runtime's register loop → input
//!    `Registered` → effects `StartHeartbeat` and `OpenStream`.)
//! 2. **Assignments.** Each [`pb::Assignment`] is deduplicated by `(task, fence)`: the server
//!    resends what the worker holds whenever the stream reopens, and an attempt must run at most
//!    once per process. A new attempt runs at once and reports `Started` if it is still
//!    running 10 ms later (unless the assignment says it was already confirmed); a job that
//!    ends sooner sends only its final report. (Input `Assignment` → effects `StartJob` and
//!    `ScheduleStartReport`; input `StartDue` → a queued Started report.)
//! 3. **Reports.** Started/Succeeded/Failed reports go through one queue: while a Report RPC is
//!    in flight, new reports accumulate and leave together in the next one. A report that could
//!    not be delivered is sent again with the same fencing token, which the server answers with
//!    `duplicate` if the first one was applied: nothing is lost and nothing counts twice. A
//!    report refused as stale (the attempt was taken away) is dropped, never retried. (Input
//!    `JobEnded` → effect `SendReports`; input `ReportAnswered` with a verdict per report, or
//!    unreachable → effect `RetryReportsLater` → input `ReportRetry`.)
//! 4. **Stopping.** A job is told to stop (see [`StopReason`]) on a Revoke, on a Resync that no
//!    longer lists it, at its deadline (then reported as a retryable "timed out" failure), when
//!    the session is lost, and at shutdown. A stopped job's outcome is not reported, except for
//!    the deadline. (Inputs `Revoke`, `Resync`, `DeadlinePassed`, `HeartbeatFailed` /
//!    `StreamEnded` with a lost session, `Tick` / `StopNow` → effect `StopJob`; a Resync
//!    listing an attempt the worker never received → effect `FetchTask` → input `Recovered`.)
//! 5. **Failover.** When the stream ends or a call fails with UNAVAILABLE, the worker reopens
//!    the stream (the client routes it to the new leader or any live node) with the same
//!    session and keeps running what it holds. When the server says the session is gone
//!    (NOT_FOUND / FAILED_PRECONDITION: the leader expired it and requeued its tasks), the
//!    worker stops everything it holds, drops pending reports, and registers again. (Input
//!    `StreamEnded` → effect `ReopenStreamLater` → input `Reopen` → effect `OpenStream`; a
//!    lost session → effects `StopNetwork`, `StopJob`..., `Register`.)
//! 6. **Shutdown.** [`WorkerHandle::shutdown`] drains: DrainWorker (no new work), finish what it
//!    holds within the drain grace, stop the rest, DeregisterWorker (the server requeues what
//!    is left), return. (Input `Drain` → effect `DrainWorker`; input `Tick` at the end of the
//!    drain grace → `StopJob`s; the runtime leaves when the core says it should exit.)
//!
//! # Invariants
//!
//! * Every `(task, fence)` runs at most once per worker process: it is either held, or in the
//!   bounded set of recently finished attempts. The only exception is an attempt the worker
//!   stopped on a server's say-so and the server then hands back (same fence): it runs again.
//! * A job entry lives until its handler returned, so a job's process is never orphaned by
//!   forgetting it; dropping the worker (or aborting it) stops every job.
//! * All state is owned by one task (the actor) and decided by the core; network calls run in
//!   spawned tasks and report back through its channel as core inputs, tagged with the session
//!   or stream generation they belong to, so a late answer about an old session changes
//!   nothing.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use tokio::sync::watch;

mod core;
mod runtime;

pub use runtime::{Worker, WorkerController, WorkerHandle};

/// How long running tasks may take to finish at shutdown, unless configured.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);
/// How long stopped tasks get to exit before the worker leaves anyway, unless configured.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// How a worker presents itself and shuts down.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Worker id, 1..128 of `[A-Za-z0-9._:@/-]`; the same id after a restart takes over (and
    /// requeues) what the previous process held.
    pub id: String,
    /// Random per process: the same instance re-registering is a reconnect that keeps the
    /// session and the held tasks.
    pub instance: u64,
    /// Queues served (at least one).
    pub queues: Vec<String>,
    /// Labels offered to tasks that require them.
    pub labels: HashMap<String, String>,
    /// Resources offered.
    pub capacity: pb::Resources,
    /// Tasks run at the same time at most.
    pub slots: u32,
    /// At shutdown, how long running tasks may take to finish before they are stopped.
    pub drain_grace: Duration,
    /// After stopping the remaining tasks, how long to wait for them to exit.
    pub stop_grace: Duration,
}

impl WorkerConfig {
    /// A worker on the `default` queue with one slot, no labels and no resources.
    pub fn new(id: impl Into<String>) -> Self {
        WorkerConfig {
            id: id.into(),
            instance: rand::random(),
            queues: vec!["default".to_string()],
            labels: HashMap::new(),
            capacity: pb::Resources::default(),
            slots: 1,
            drain_grace: DEFAULT_DRAIN_GRACE,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }

    fn spec(&self) -> pb::WorkerSpec {
        pb::WorkerSpec {
            id: self.id.clone(),
            queues: self.queues.clone(),
            labels: self.labels.clone(),
            capacity: Some(self.capacity.clone()),
            slots: self.slots,
        }
    }
}

/// `hostname-pid`: unique per process on a host, readable in listings.
pub fn default_worker_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let host: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .take(100)
        .collect();
    let host = if host.is_empty() { "worker".to_string() } else { host };
    format!("{host}-{}", std::process::id())
}

/// One attempt to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Task id.
    pub task: u64,
    /// The attempt's fencing token: strictly increasing per task; pass it to side effects
    /// that must not happen twice.
    pub fence: u64,
    /// Attempt number (1-based).
    pub attempt: u32,
    /// The task's name (handler / kind).
    pub name: String,
    /// The task's payload.
    pub payload: Vec<u8>,
    /// The task's metadata.
    pub metadata: HashMap<String, String>,
    /// Attempt deadline, unix ms (0 = none). The runtime enforces it.
    pub deadline_ms: u64,
    /// The id of the worker running it.
    pub worker_id: String,
}

/// What a job produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success, with a result (bounded by the server's result limit).
    Succeeded(Vec<u8>),
    /// Failure; `retryable = false` fails the task at once.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// Why a job is told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The server took the attempt away (cancel, timeout, reassignment) or no longer lists it.
    Revoked,
    /// The attempt's deadline passed (reported as a retryable "timed out" failure).
    Deadline,
    /// The worker's session expired; the server requeued the task.
    SessionLost,
    /// The worker is shutting down (or was dropped).
    Shutdown,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Revoked => "revoked",
            StopReason::Deadline => "deadline",
            StopReason::SessionLost => "session lost",
            StopReason::Shutdown => "shutdown",
        })
    }
}

/// Tells a running job to stop. Handlers should watch it and return soon after it fires
/// (their outcome is then ignored, except after the deadline).
#[derive(Debug)]
pub struct StopSignal(watch::Receiver<Option<StopReason>>);

impl StopSignal {
    /// A signal and the sender that fires it (for handlers tested on their own).
    pub fn new() -> (watch::Sender<Option<StopReason>>, StopSignal) {
        let (tx, rx) = watch::channel(None);
        (tx, StopSignal(rx))
    }

    /// Waits until the job must stop. A dropped sender counts as [`StopReason::Shutdown`].
    pub async fn stopped(&mut self) -> StopReason {
        match self.0.wait_for(Option::is_some).await {
            Ok(r) => r.unwrap_or(StopReason::Shutdown),
            Err(_) => StopReason::Shutdown,
        }
    }

    /// The reason, if the job was already told to stop.
    pub fn reason(&self) -> Option<StopReason> {
        *self.0.borrow()
    }
}

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Runs one attempt. Implemented for closures `Fn(Job, StopSignal) -> impl Future<Output =
/// Outcome>`.
pub trait Handler: Send + Sync + 'static {
    /// Runs the job until it finishes or `stop` fires.
    fn run(&self, job: Job, stop: StopSignal) -> BoxFuture<Outcome>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Job, StopSignal) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn run(&self, job: Job, stop: StopSignal) -> BoxFuture<Outcome> {
        Box::pin(self(job, stop))
    }
}

/// What a report said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    /// The attempt started.
    Started,
    /// The attempt succeeded.
    Succeeded,
    /// The attempt failed.
    Failed,
}

/// How the server answered a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportAnswer {
    /// Applied now (`duplicate = false`) or before (`duplicate = true`).
    Accepted {
        /// The same report was accepted before.
        duplicate: bool,
    },
    /// Refused: the attempt was taken away, the task finished, or the report was invalid.
    Rejected {
        /// The server's reason.
        error: String,
        /// The attempt was taken away (stale fencing token, or not this worker's); otherwise
        /// the report was invalid or the task had already finished.
        stale: bool,
    },
    /// No answer (the cluster was unreachable); the report stays queued and is sent again.
    Unknown {
        /// What failed.
        error: String,
    },
}

/// What happened inside a worker, for logs, tests and history recorders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    /// A session began.
    Registered {
        /// The session.
        session: u64,
        /// Tasks a previous instance held, now requeued.
        requeued: Vec<u64>,
    },
    /// The server expired the session; everything held was stopped.
    SessionLost {
        /// The lost session.
        session: u64,
    },
    /// The assignment stream is open.
    StreamOpened,
    /// The assignment stream ended; it is reopened.
    StreamClosed {
        /// Why, if it failed.
        error: Option<String>,
    },
    /// An attempt begins executing.
    ExecStart {
        /// Task.
        task: u64,
        /// Attempt number.
        attempt: u32,
        /// Fencing token.
        fence: u64,
    },
    /// An attempt's handler returned.
    ExecEnd {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// Whether it succeeded (a stopped job counts as not succeeded).
        success: bool,
        /// Set when the job had been told to stop.
        stopped: Option<StopReason>,
    },
    /// A job was told to stop.
    Stopping {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// Why.
        reason: StopReason,
    },
    /// A report is being sent (again, if an earlier send had no answer).
    ReportSent {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// What it says.
        kind: ReportKind,
    },
    /// The answer to a report.
    ReportAnswered {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// What it said.
        kind: ReportKind,
        /// The answer.
        answer: ReportAnswer,
    },
    /// The worker stopped taking new work.
    Draining,
    /// The worker left the cluster.
    Deregistered,
}

/// A callback receiving every [`WorkerEvent`]; it runs on the worker's task, keep it short.
pub type EventSink = Arc<dyn Fn(&WorkerEvent) + Send + Sync>;

/// Counters of one worker run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Attempts executed (handler started).
    pub executed: u64,
    /// Success reports accepted.
    pub succeeded: u64,
    /// Failure reports accepted.
    pub failed: u64,
    /// Jobs stopped before they finished.
    pub stopped: u64,
    /// Reports refused by the server (stale attempts).
    pub rejected: u64,
    /// Sessions started (more than one: the session was lost and renewed).
    pub sessions: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ids_are_valid_worker_ids() {
        let id = default_worker_id();
        assert!(id.ends_with(&format!("-{}", std::process::id())));
        assert!(id.len() <= 128);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || "._:@/-".contains(c)), "{id}");
    }

    #[tokio::test]
    async fn stop_signal_fires_and_treats_a_dropped_sender_as_shutdown() {
        let (tx, mut sig) = StopSignal::new();
        assert_eq!(sig.reason(), None);
        tx.send(Some(StopReason::Revoked)).unwrap();
        assert_eq!(sig.stopped().await, StopReason::Revoked);
        let (tx, mut sig) = StopSignal::new();
        drop(tx);
        assert_eq!(sig.stopped().await, StopReason::Shutdown);
    }
}
