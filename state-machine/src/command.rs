//! Commands (the Raft log payload) and their responses.
//!
//! A command is a *decision* the leader made, stamped with the leader's clock (`now`). Apply is
//! a deterministic function of (state, command): every replica computes the same response and
//! the same next state. Business failures are values: a rejected command is still applied (it
//! changes nothing, or only what its accepted items change) and its rejection is the response.

use serde::{Deserialize, Serialize};

use crate::error::Rejection;
use crate::model::{
    ApiToken, Fence, Millis, Role, TaskId, TaskSpec, TaskStateKind, WorkerId, WorkerSpec,
};

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The leader's wall clock when it proposed the command. Apply uses
    /// `max(log_time, now)`, so a leader with a slow clock never moves time backwards.
    pub now: Millis,
    /// What to do.
    pub op: Op,
}

impl Command {
    /// A command with the given time.
    pub fn new(now: Millis, op: Op) -> Self {
        Command { now, op }
    }
}

/// The operations of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Submit a batch of tasks atomically: either every task is valid and the batch is
    /// accepted, or nothing changes and the first problem is returned.
    Submit {
        /// The tasks, in order; dependencies may point into the batch by position.
        tasks: Vec<NewTask>,
    },
    /// Cancel tasks; dependents that can no longer run become UpstreamFailed.
    Cancel {
        /// Tasks to cancel.
        ids: Vec<TaskId>,
        /// Free text recorded on the task.
        reason: String,
    },
    /// Register a worker, or re-register after a reconnect (same `instance`) or a restart (new
    /// `instance`: what the previous instance held is requeued).
    RegisterWorker {
        /// The worker's description.
        spec: WorkerSpec,
        /// The worker process's nonce.
        instance: u64,
    },
    /// Stop giving a worker new tasks; it keeps what it holds.
    DrainWorker {
        /// Which worker.
        worker: WorkerId,
    },
    /// A worker leaves gracefully; whatever it still holds is requeued.
    DeregisterWorker {
        /// Which worker.
        worker: WorkerId,
        /// Its session (a stale session is rejected).
        session: u64,
    },
    /// The leader saw no heartbeat within the TTL; the worker's tasks are requeued with a new
    /// attempt. Quoting the session makes a decision about an old session harmless.
    ExpireWorker {
        /// Which worker.
        worker: WorkerId,
        /// The session the leader timed out.
        session: u64,
    },
    /// Placement decisions made by the leader's planner; each is re-validated at apply.
    Assign {
        /// task -> worker pairs.
        assignments: Vec<Assignment>,
        /// The applied log index of the state the planner looked at (recorded for audits: a
        /// task that became ready after it could not have been considered, except one
        /// released earlier in the same entry, for which the leader planned ahead).
        planned_at: u64,
    },
    /// Progress reports from one worker, each carrying the attempt's fencing token.
    Report {
        /// The reporting worker.
        worker: WorkerId,
        /// Started / Succeeded / Failed, in order.
        reports: Vec<Report>,
    },
    /// Apply every time-based transition due at `now`: Delayed tasks whose time has come become
    /// Queued; attempts past their deadline fail with a timeout.
    AdvanceTime,
    /// Several independent operations in one log entry (the leader groups concurrent
    /// requests). Each is applied in order, with the same `now`, exactly as if it were its own
    /// entry, and gets its own response; batches do not nest.
    Batch(Vec<Op>),
    /// Retention: remove terminal tasks that finished before `finished_before`, and dead
    /// workers that died before it; at most `limit` tasks.
    Purge {
        /// Cut-off in log time.
        finished_before: Millis,
        /// Upper bound on tasks removed by this command.
        limit: u32,
    },
    /// [`Op::RegisterWorker`] by an authenticated caller: the session is bound to `owner`
    /// (the token's name). While the worker is live, a registration of the same id by another
    /// owner is refused. (A variant of its own, last, so entries written before it still
    /// decode.)
    RegisterWorkerAs {
        /// The worker's description.
        spec: WorkerSpec,
        /// The worker process's nonce.
        instance: u64,
        /// The token that registers it.
        owner: String,
    },
    /// Create a replicated API token. Creating the same token again (same name, role, secret
    /// digest and prefix) is a no-op, so a retried create is safe; another token of that name
    /// is refused. (Appended after the variants older entries use, so they still decode.)
    CreateToken {
        /// The token.
        token: NewToken,
    },
    /// Revoke a replicated token: from the apply on, it is refused everywhere.
    RevokeToken {
        /// Its name.
        name: String,
    },
    /// Run a Failed, Cancelled or UpstreamFailed task again, as a new run: it keeps its id,
    /// its attempt counter (the next attempt is `attempt + 1`) and its last failure, and its
    /// retry policy starts over. It returns to Waiting when a dependency has not succeeded
    /// (refused when one has ended without success: retry that one instead), else to Queued
    /// (or Delayed until `not_before`). With `with_dependents`, every transitive dependent
    /// that ended Failed or UpstreamFailed is run again too, unless it also depends on
    /// another task that ended without success; those dependents wait for this task again.
    /// Costs one pass over all tasks when `with_dependents` is set.
    RetryTask {
        /// The task.
        task: TaskId,
        /// Also re-run the failed subtree of dependents.
        with_dependents: bool,
    },
    /// The reverse of [`Op::DrainWorker`]: a draining worker takes new tasks again.
    UndrainWorker {
        /// Which worker.
        worker: WorkerId,
    },
    /// Delete a dead worker's record (a live one is refused: it holds or may take tasks, and
    /// would register again on its next heartbeat).
    RemoveWorker {
        /// Which worker.
        worker: WorkerId,
    },
    /// Stop placing the queue's tasks: the planner skips it and apply refuses assignments of
    /// its tasks; tasks already assigned or running carry on. Pausing twice is a no-op.
    PauseQueue {
        /// The queue.
        queue: String,
    },
    /// Place the queue's tasks again. Resuming a queue that is not paused is a no-op.
    ResumeQueue {
        /// The queue.
        queue: String,
    },
    /// Raise the cluster's command version: from the apply on, operations of kinds up to
    /// `version` are accepted. The leader proposes it only once every member reports that it
    /// applies `version` (see [`Op::version`]). It never lowers the version.
    SetClusterVersion {
        /// The new version.
        version: u32,
    },
}

/// The command version of the first release: every kind of operation it knows. A state
/// without a recorded cluster version runs at this version.
pub const BASE_COMMAND_VERSION: u32 = 1;

/// The newest command version this build applies: the largest [`Op::version`] of any kind.
///
/// # Rolling upgrades
/// A node of an older build cannot decode a kind of operation added after it, so a leader
/// must never put one in the log while such a node is a member. Every kind has the version
/// that introduced it; the replicated *cluster version* is the largest version every member
/// applies. A leader asked for an operation above the cluster version first asks every member
/// for its version and proposes [`Op::SetClusterVersion`] when all have it; otherwise the
/// request is refused. Apply refuses such operations too (a deterministic
/// [`crate::Rejection::ClusterVersion`]), so no race can let one through.
pub const COMMAND_VERSION: u32 = 2;

impl Op {
    /// The command version that introduced this kind of operation (for a batch, the largest of
    /// its operations). Every new variant gets the next version when it is added.
    pub fn version(&self) -> u32 {
        match self {
            Op::Submit { .. }
            | Op::Cancel { .. }
            | Op::RegisterWorker { .. }
            | Op::DrainWorker { .. }
            | Op::DeregisterWorker { .. }
            | Op::ExpireWorker { .. }
            | Op::Assign { .. }
            | Op::Report { .. }
            | Op::AdvanceTime
            | Op::Purge { .. }
            | Op::RegisterWorkerAs { .. }
            | Op::CreateToken { .. }
            | Op::RevokeToken { .. } => BASE_COMMAND_VERSION,
            Op::RetryTask { .. }
            | Op::UndrainWorker { .. }
            | Op::RemoveWorker { .. }
            | Op::PauseQueue { .. }
            | Op::ResumeQueue { .. }
            | Op::SetClusterVersion { .. } => 2,
            Op::Batch(ops) => ops.iter().map(Op::version).max().unwrap_or(BASE_COMMAND_VERSION),
        }
    }

    /// A short name of the kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Submit { .. } => "submit",
            Op::Cancel { .. } => "cancel",
            Op::RegisterWorker { .. } | Op::RegisterWorkerAs { .. } => "register worker",
            Op::DrainWorker { .. } => "drain worker",
            Op::DeregisterWorker { .. } => "deregister worker",
            Op::ExpireWorker { .. } => "expire worker",
            Op::Assign { .. } => "assign",
            Op::Report { .. } => "report",
            Op::AdvanceTime => "advance time",
            Op::Purge { .. } => "purge",
            Op::CreateToken { .. } => "create token",
            Op::RevokeToken { .. } => "revoke token",
            Op::RetryTask { .. } => "retry task",
            Op::UndrainWorker { .. } => "undrain worker",
            Op::RemoveWorker { .. } => "remove worker",
            Op::PauseQueue { .. } => "pause queue",
            Op::ResumeQueue { .. } => "resume queue",
            Op::SetClusterVersion { .. } => "set cluster version",
            Op::Batch(_) => "batch",
        }
    }
}

/// A token to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewToken {
    /// Unique name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the secret (the client made the secret; it is never sent to the log).
    pub secret_sha256: [u8; 32],
    /// Worker tokens only: the worker ids it may act for start with this.
    pub worker_id_prefix: Option<String>,
    /// Lifetime from the apply's log time (`None`: until revoked).
    pub ttl_ms: Option<u64>,
}

impl Op {
    /// For an entry that assigns: the applied index the planner looked at. For a batch with
    /// several assignments, the earliest (a lower bound of what every planner saw).
    pub fn planned_at(&self) -> Option<u64> {
        match self {
            Op::Assign { planned_at, .. } => Some(*planned_at),
            Op::Batch(ops) => ops.iter().filter_map(Op::planned_at).min(),
            _ => None,
        }
    }

    /// A rough size in bytes, to bound how much goes into one log entry.
    pub fn size_hint(&self) -> usize {
        match self {
            Op::Submit { tasks } => {
                tasks.iter().map(|t| 128 + t.spec.payload.len() + 16 * t.depends_on.len()).sum()
            }
            Op::Report { reports, .. } => reports
                .iter()
                .map(|r| match &r.outcome {
                    ReportKind::Succeeded { result } => 64 + result.len(),
                    ReportKind::Failed { message, .. } => 64 + message.len(),
                    ReportKind::Started => 32,
                })
                .sum(),
            Op::Cancel { ids, reason } => 32 + 8 * ids.len() + reason.len(),
            Op::Assign { assignments, .. } => 32 * assignments.len(),
            Op::Batch(ops) => ops.iter().map(Op::size_hint).sum(),
            _ => 128,
        }
    }
}

/// A dependency as written by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DepRef {
    /// A task that already exists.
    Id(TaskId),
    /// The task at this position of the same batch.
    Batch(u32),
}

/// A task in a submit batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewTask {
    /// Everything but the dependencies.
    pub spec: TaskSpec,
    /// Dependencies by id or batch position.
    pub depends_on: Vec<DepRef>,
    /// Delay relative to the log time of the submit (0 = none): folded into
    /// `spec.not_before` at apply, so it is measured by the leader's clock, not the client's.
    pub delay_ms: u64,
}

impl NewTask {
    /// A task without dependencies or delay.
    pub fn new(spec: TaskSpec) -> Self {
        NewTask { spec, depends_on: Vec::new(), delay_ms: 0 }
    }

    /// A task with dependencies.
    pub fn with_deps(spec: TaskSpec, depends_on: Vec<DepRef>) -> Self {
        NewTask { spec, depends_on, delay_ms: 0 }
    }
}

/// One placement decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The task to place.
    pub task: TaskId,
    /// The worker to place it on.
    pub worker: WorkerId,
}

/// One report from a worker about one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The task.
    pub task: TaskId,
    /// The attempt's fencing token.
    pub fence: Fence,
    /// What happened.
    pub outcome: ReportKind,
}

/// What a worker reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportKind {
    /// The worker began executing (acknowledges delivery; Assigned -> Running).
    Started,
    /// It finished successfully, with a bounded result.
    Succeeded {
        /// The result bytes.
        result: Vec<u8>,
    },
    /// It failed.
    Failed {
        /// The error text.
        message: String,
        /// False for errors that no retry can fix.
        retryable: bool,
    },
}

/// The response of a command. `Err` means the whole command was rejected and changed nothing.
pub type Response = Result<Output, Rejection>;

/// Successful outputs, one variant per operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Ids of the submitted tasks, in batch order.
    Submitted(Vec<Submitted>),
    /// One outcome per id.
    Cancelled(Vec<Result<CancelOutcome, Rejection>>),
    /// The worker's session.
    Registered {
        /// Session to quote in heartbeats.
        session: u64,
        /// Tasks the worker holds (after a reconnect) or that were requeued (after a restart).
        requeued: Vec<TaskId>,
    },
    /// Drain / deregister / expire applied.
    WorkerUpdated {
        /// Tasks taken away from the worker and requeued (or failed when out of attempts).
        requeued: Vec<TaskId>,
    },
    /// One outcome per assignment: the fencing token, or why it was refused.
    Assigned(Vec<Result<Fence, Rejection>>),
    /// One outcome per report.
    Reported(Vec<Result<ReportOutcome, Rejection>>),
    /// Time-based transitions applied.
    Advanced {
        /// Delayed -> Queued.
        promoted: u32,
        /// Attempts failed by their deadline.
        timed_out: u32,
    },
    /// A Raft entry that carries no command (leader no-op, membership change).
    Noop,
    /// One response per operation of a [`Op::Batch`], in order.
    Batch(Vec<Response>),
    /// A token exists as asked (`created`: false when an identical create came before).
    TokenCreated {
        /// The stored token.
        token: ApiToken,
        /// Whether this command created it.
        created: bool,
    },
    /// A token was revoked.
    TokenRevoked,
    /// Retention applied.
    Purged {
        /// Tasks removed.
        tasks: u32,
        /// Workers removed.
        workers: u32,
    },
    /// The tasks a retry re-ran (the retried task first, then its dependents in id order),
    /// with their states after it.
    Retried(Vec<(TaskId, TaskStateKind)>),
    /// A worker's record was removed.
    WorkerRemoved,
    /// A queue was paused or resumed.
    QueueUpdated {
        /// Paused since (log time), or `None`: not paused.
        paused_since: Option<Millis>,
        /// False when it already was in the requested state.
        changed: bool,
    },
    /// The cluster's command version after an [`Op::SetClusterVersion`].
    ClusterVersion {
        /// The version now in force.
        version: u32,
    },
}

/// One submitted task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// Its id.
    pub id: TaskId,
    /// False when the idempotency key matched an existing task (nothing new was created).
    pub created: bool,
    /// Its state after the submit.
    pub state: TaskStateKind,
}

/// What cancelling one task did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelOutcome {
    /// It is now Cancelled; `dependents` turned UpstreamFailed.
    Cancelled {
        /// Dependents failed transitively.
        dependents: Vec<TaskId>,
    },
    /// It was already cancelled (a retried cancel).
    AlreadyCancelled,
}

/// What a report did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportOutcome {
    /// Accepted; the task is now in this state.
    Accepted(TaskStateKind),
    /// The same report was accepted before (a retry); nothing changed.
    Duplicate(TaskStateKind),
}
