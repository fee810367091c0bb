//! The domain model: tasks, workers, resources and the states they move through.
//!
//! Every type here is plain data with serde derives; the transitions live in [`crate::state`].
//! Illegal states are unrepresentable where it is cheap: a task's worker and fencing token exist
//! only inside the `Assigned` / `Running` variants, a terminal task carries its outcome.
//!
//! Time is "log time": milliseconds since the Unix epoch, stamped by the Raft leader into each
//! command (see [`crate::command::Command::now`]). Nothing in this crate reads a clock.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as stamped by the leader into a command.
pub type Millis = u64;

/// A task id: assigned at apply from a monotonic counter, never reused (even after purge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A fencing token: issued with every assignment from one global counter, so it is strictly
/// increasing per task (and unique across tasks). Workers pass it back with every report and
/// may hand it to the systems their task writes to, so those can reject a stale attempt too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Fence(pub u64);

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A worker id, chosen by the worker (e.g. `host-a.gpu-0`). Validated by
/// [`crate::validate::worker_id`]: 1..=128 bytes of `[A-Za-z0-9._:@-]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkerId(pub String);

impl WorkerId {
    /// Borrow the id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for WorkerId {
    fn from(s: &str) -> Self {
        WorkerId(s.to_string())
    }
}

/// Resources a task needs or a worker offers. `named` holds counters such as `gpu = 1`.
///
/// A worker's free resources are its capacity minus the sum over the tasks it holds; the
/// invariant checker verifies that this never goes below zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    pub cpu_milli: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Named counters (`gpu`, `license`, ...). Absent means zero.
    pub named: BTreeMap<String, u64>,
}

impl Resources {
    /// True when every amount in `self` is at most the one in `available`.
    pub fn fits_in(&self, available: &Resources) -> bool {
        self.shortfall(available).is_none()
    }

    /// The first resource (in a stable order: cpu, memory, named by name) for which `self`
    /// needs more than `available` offers, with the amounts needed and available.
    pub fn shortfall(&self, available: &Resources) -> Option<(String, u64, u64)> {
        if self.cpu_milli > available.cpu_milli {
            return Some(("cpu".into(), self.cpu_milli, available.cpu_milli));
        }
        if self.memory_mib > available.memory_mib {
            return Some(("memory".into(), self.memory_mib, available.memory_mib));
        }
        for (name, &need) in &self.named {
            let have = available.named.get(name).copied().unwrap_or(0);
            if need > have {
                return Some((name.clone(), need, have));
            }
        }
        None
    }

    /// Add `other` to `self` (saturating; amounts are validated far below overflow).
    pub fn add(&mut self, other: &Resources) {
        self.cpu_milli = self.cpu_milli.saturating_add(other.cpu_milli);
        self.memory_mib = self.memory_mib.saturating_add(other.memory_mib);
        for (name, &n) in &other.named {
            let e = self.named.entry(name.clone()).or_insert(0);
            *e = e.saturating_add(n);
        }
    }

    /// Subtract `other` from `self`; zero named counters are removed so that equal amounts
    /// compare equal however they were reached.
    pub fn sub(&mut self, other: &Resources) {
        self.cpu_milli = self.cpu_milli.saturating_sub(other.cpu_milli);
        self.memory_mib = self.memory_mib.saturating_sub(other.memory_mib);
        for (name, &n) in &other.named {
            if let Some(e) = self.named.get_mut(name) {
                *e = e.saturating_sub(n);
                if *e == 0 {
                    self.named.remove(name);
                }
            }
        }
    }

    /// `self - other`, saturating at zero per resource.
    pub fn minus(&self, other: &Resources) -> Resources {
        let mut r = self.clone();
        r.sub(other);
        r
    }
}

/// How a task is retried after a failed attempt.
///
/// Attempt `n` (1-based) that fails with attempts left is retried after the base delay
/// `min(initial_backoff_ms * (multiplier_permille/1000)^(n-1), max_backoff_ms)` less a jitter
/// of up to [`RetryPolicy::JITTER_PERMILLE`] of it. The jitter is a hash of the task id and
/// the attempt, not a random draw: apply stays a pure function of the log, yet tasks that
/// failed together (a dependency outage) spread their retries instead of returning in
/// lockstep. Integer arithmetic keeps apply deterministic across platforms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Total attempts allowed, including the first (1 = never retry).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_backoff_ms: u64,
    /// Growth factor per attempt in thousandths (2000 = doubling).
    pub multiplier_permille: u32,
    /// Upper bound on any single delay.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 1_000,
            multiplier_permille: 2_000,
            max_backoff_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    /// Largest share of a base delay the jitter takes off, in thousandths.
    pub const JITTER_PERMILLE: u64 = 200;

    /// The base delay before attempt `failed_attempt + 1`, without jitter.
    pub fn base_backoff_after(&self, failed_attempt: u32) -> u64 {
        let mut delay = self.initial_backoff_ms.min(self.max_backoff_ms);
        for _ in 1..failed_attempt {
            delay = ((delay as u128 * self.multiplier_permille as u128) / 1000)
                .min(self.max_backoff_ms as u128) as u64;
            if delay >= self.max_backoff_ms {
                break;
            }
        }
        delay
    }

    /// The delay before attempt `failed_attempt + 1` of `task`: the base delay less its
    /// deterministic jitter (between 80% and 100% of the base).
    pub fn backoff_after(&self, task: TaskId, failed_attempt: u32) -> u64 {
        let base = self.base_backoff_after(failed_attempt);
        let share = mix64(task.0 ^ (u64::from(failed_attempt) << 40)) % (Self::JITTER_PERMILLE + 1);
        base - (base as u128 * share as u128 / 1000) as u64
    }
}

/// SplitMix64's finaliser: a fixed, well-spread hash of one integer.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Everything a client says about a task, minus its dependencies (which are resolved to ids at
/// submit and kept in [`Task::deps`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The handler or kind of task (`resize-image`); not unique.
    pub name: String,
    /// Opaque input for the worker.
    pub payload: Vec<u8>,
    /// The queue it waits in; workers subscribe to queues.
    pub queue: String,
    /// Higher runs first; FIFO (by task id) within a priority.
    pub priority: i32,
    /// What the task occupies on its worker while it holds it.
    pub resources: Resources,
    /// Labels a worker must carry (all of them, with equal values) to take this task.
    pub labels: BTreeMap<String, String>,
    /// Retries after failure, timeout or worker loss.
    pub retry: RetryPolicy,
    /// Per-attempt time limit from assignment; `None` = no limit.
    pub timeout_ms: Option<u64>,
    /// The task is not assigned before this log time.
    pub not_before: Option<Millis>,
    /// Free-form annotations, returned with the task.
    pub metadata: BTreeMap<String, String>,
    /// Same key -> same task: a resubmission returns the existing id.
    pub idempotency_key: Option<String>,
}

impl TaskSpec {
    /// A spec with the given name and defaults everywhere else (queue `default`, priority 0).
    pub fn new(name: impl Into<String>) -> Self {
        TaskSpec {
            name: name.into(),
            payload: Vec::new(),
            queue: crate::DEFAULT_QUEUE.to_string(),
            priority: 0,
            resources: Resources::default(),
            labels: BTreeMap::new(),
            retry: RetryPolicy::default(),
            timeout_ms: None,
            not_before: None,
            metadata: BTreeMap::new(),
            idempotency_key: None,
        }
    }
}

/// Why an attempt ended without success.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The worker reported a failure it considers worth retrying.
    Error,
    /// The worker reported a failure that must not be retried.
    Fatal,
    /// The attempt ran past the task's timeout.
    Timeout,
    /// The worker holding it stopped heartbeating, restarted, or left.
    WorkerLost,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Error => "error",
            FailureKind::Fatal => "fatal error",
            FailureKind::Timeout => "timeout",
            FailureKind::WorkerLost => "worker lost",
        })
    }
}

/// The record of one failed attempt (the last one is kept on the task).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptFailure {
    /// Which attempt (1-based).
    pub attempt: u32,
    /// Its fencing token; a repeated failure report with this token is answered idempotently.
    pub fence: Fence,
    /// The worker that held it.
    pub worker: WorkerId,
    /// What happened.
    pub kind: FailureKind,
    /// The worker's message (truncated to [`crate::limits::HARD.max_error_bytes`]).
    pub message: String,
    /// When it was recorded.
    pub at: Millis,
}

/// Where a task is in its life. Data of a state lives inside its variant.
///
/// ```text
///   submit ──► Waiting ──(deps succeeded)──► Queued ◄──(backoff / not_before passed)── Delayed
///                 │                            │ assign                                 ▲
///                 │                            ▼                                        │
///                 │                         Assigned ──start──► Running ──fail/timeout/─┘
///                 │                            │                   │      worker lost
///                 ▼                            └──────complete─────┴──► Succeeded
///          UpstreamFailed          (any non-terminal) ──cancel──► Cancelled
///                                  (attempts exhausted / fatal) ──► Failed
///
///   Failed / Cancelled / UpstreamFailed ──retry──► Waiting / Queued / Delayed (a new run)
/// ```
/// Every non-terminal state has a way out: Waiting ends when its dependencies end; Queued when a
/// worker fits (or it is cancelled; a paused queue is resumed by an operator); Delayed when log
/// time passes `until`; Assigned and Running when the worker reports, the attempt times out, or
/// the worker is expired. Terminal states other than Succeeded are left only by an explicit
/// retry ([`crate::Op::RetryTask`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Some dependency has not succeeded yet.
    Waiting,
    /// Ready; waiting for a worker.
    Queued {
        /// When it became ready.
        since: Millis,
    },
    /// Not eligible before `until` (retry backoff, or `not_before`).
    Delayed {
        /// Log time at which it becomes Queued.
        until: Millis,
    },
    /// Given to a worker that has not confirmed the start yet.
    Assigned {
        /// The holder.
        worker: WorkerId,
        /// This attempt's fencing token.
        fence: Fence,
        /// When the assignment was applied.
        at: Millis,
        /// When the attempt times out, if the task has a timeout.
        deadline: Option<Millis>,
    },
    /// The worker confirmed it runs the task.
    Running {
        /// The holder.
        worker: WorkerId,
        /// This attempt's fencing token.
        fence: Fence,
        /// When the assignment was applied.
        assigned_at: Millis,
        /// When the worker's start was applied.
        started_at: Millis,
        /// When the attempt times out, if the task has a timeout.
        deadline: Option<Millis>,
    },
    /// Terminal: completed by the current attempt.
    Succeeded {
        /// When the completion was applied.
        at: Millis,
        /// When the accepted attempt started (its assignment time if it never reported a start).
        started_at: Millis,
        /// The worker whose completion was accepted.
        worker: WorkerId,
        /// The accepted attempt's fencing token.
        fence: Fence,
        /// The worker's (bounded) result.
        result: Vec<u8>,
    },
    /// Terminal: attempts exhausted or a fatal error; the cause is in `Task::last_failure`.
    Failed {
        /// When it failed.
        at: Millis,
    },
    /// Terminal: cancelled by a client.
    Cancelled {
        /// When the cancellation was applied.
        at: Millis,
        /// Who/why, as given by the client.
        reason: String,
    },
    /// Terminal: a dependency ended Failed, Cancelled or UpstreamFailed.
    UpstreamFailed {
        /// When it was decided.
        at: Millis,
        /// The dependency whose failure this follows.
        upstream: TaskId,
    },
}

/// The state's name without its data: for filters, counters and events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TaskStateKind {
    Waiting,
    Queued,
    Delayed,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    UpstreamFailed,
}

impl TaskStateKind {
    /// All kinds, in lifecycle order.
    pub const ALL: [TaskStateKind; 9] = [
        TaskStateKind::Waiting,
        TaskStateKind::Queued,
        TaskStateKind::Delayed,
        TaskStateKind::Assigned,
        TaskStateKind::Running,
        TaskStateKind::Succeeded,
        TaskStateKind::Failed,
        TaskStateKind::Cancelled,
        TaskStateKind::UpstreamFailed,
    ];

    /// Lower-case name used on the CLI and in metrics (`upstream_failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStateKind::Waiting => "waiting",
            TaskStateKind::Queued => "queued",
            TaskStateKind::Delayed => "delayed",
            TaskStateKind::Assigned => "assigned",
            TaskStateKind::Running => "running",
            TaskStateKind::Succeeded => "succeeded",
            TaskStateKind::Failed => "failed",
            TaskStateKind::Cancelled => "cancelled",
            TaskStateKind::UpstreamFailed => "upstream_failed",
        }
    }

    /// Parse the name produced by [`TaskStateKind::as_str`] (also accepts `upstreamfailed`).
    pub fn parse(s: &str) -> Option<Self> {
        let norm: String =
            s.to_ascii_lowercase().chars().filter(|c| *c != '_' && *c != '-').collect();
        TaskStateKind::ALL.into_iter().find(|k| k.as_str().replace('_', "") == norm)
    }

    /// Succeeded, Failed, Cancelled and UpstreamFailed: nothing changes them except an explicit
    /// retry (of the last three).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStateKind::Succeeded
                | TaskStateKind::Failed
                | TaskStateKind::Cancelled
                | TaskStateKind::UpstreamFailed
        )
    }

    /// Position in [`TaskStateKind::ALL`] (for counters).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TaskStateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TaskState {
    /// The state's name.
    pub fn kind(&self) -> TaskStateKind {
        match self {
            TaskState::Waiting => TaskStateKind::Waiting,
            TaskState::Queued { .. } => TaskStateKind::Queued,
            TaskState::Delayed { .. } => TaskStateKind::Delayed,
            TaskState::Assigned { .. } => TaskStateKind::Assigned,
            TaskState::Running { .. } => TaskStateKind::Running,
            TaskState::Succeeded { .. } => TaskStateKind::Succeeded,
            TaskState::Failed { .. } => TaskStateKind::Failed,
            TaskState::Cancelled { .. } => TaskStateKind::Cancelled,
            TaskState::UpstreamFailed { .. } => TaskStateKind::UpstreamFailed,
        }
    }

    /// The worker and fence of an attempt in progress.
    pub fn holder(&self) -> Option<(&WorkerId, Fence)> {
        match self {
            TaskState::Assigned { worker, fence, .. }
            | TaskState::Running { worker, fence, .. } => Some((worker, *fence)),
            _ => None,
        }
    }

    /// When a terminal state was reached.
    pub fn finished_at(&self) -> Option<Millis> {
        match self {
            TaskState::Succeeded { at, .. }
            | TaskState::Failed { at }
            | TaskState::Cancelled { at, .. }
            | TaskState::UpstreamFailed { at, .. } => Some(*at),
            _ => None,
        }
    }

    /// True for the four end states.
    pub fn is_terminal(&self) -> bool {
        self.kind().is_terminal()
    }
}

/// A task as stored in the replicated state (one record per task).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Its id.
    pub id: TaskId,
    /// What the client asked for.
    pub spec: TaskSpec,
    /// Resolved dependency ids (all existed at submit).
    pub deps: Vec<TaskId>,
    /// When it was submitted.
    pub submitted_at: Millis,
    /// When its state last changed.
    pub updated_at: Millis,
    /// Attempts started so far (assignments made); the next one is `attempt + 1`.
    pub attempt: u32,
    /// The fencing token of the latest assignment (`Fence(0)` before the first one).
    pub last_fence: Fence,
    /// The latest failed attempt, if any (survives into later states for `explain`).
    pub last_failure: Option<Box<AttemptFailure>>,
    /// Where it is now.
    pub state: TaskState,
    /// Attempts made before the latest manual retry ([`crate::Op::RetryTask`]); 0 if it was
    /// never retried. The retry policy counts only the attempts after it, so a retried task
    /// gets its whole policy again while `attempt` (and the fencing tokens) keep counting.
    pub attempt_base: u32,
}

impl Task {
    /// Attempts made since the task was submitted or last retried by hand: what the retry
    /// policy's `max_attempts` and backoff count.
    pub fn attempts_in_run(&self) -> u32 {
        self.attempt.saturating_sub(self.attempt_base)
    }
}

/// A paused queue: the planner gives none of its tasks to workers until it is resumed; tasks
/// already assigned or running carry on. One record per paused queue; resuming deletes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedQueue {
    /// The queue's name.
    pub queue: String,
    /// Log time of the pause.
    pub since: Millis,
}

/// A worker's self-description, sent at registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Its chosen id.
    pub id: WorkerId,
    /// Queues it takes tasks from (at least one).
    pub queues: Vec<String>,
    /// Labels tasks may require.
    pub labels: BTreeMap<String, String>,
    /// What it offers in total.
    pub capacity: Resources,
    /// Maximum tasks held at once.
    pub slots: u32,
}

/// Whether a worker takes new work.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerStatus {
    /// Takes new assignments.
    Alive,
    /// Keeps what it holds, gets nothing new.
    Draining {
        /// When the drain was applied.
        since: Millis,
    },
    /// Expired or left; holds nothing.
    Dead {
        /// When.
        at: Millis,
        /// Why.
        reason: DeathReason,
    },
}

/// Why a worker is dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeathReason {
    /// The leader saw no heartbeat within the TTL.
    Expired,
    /// It deregistered itself (graceful shutdown).
    Left,
}

impl WorkerStatus {
    /// `alive`, `draining` or `dead`.
    pub fn as_str(&self) -> &'static str {
        match self {
            WorkerStatus::Alive => "alive",
            WorkerStatus::Draining { .. } => "draining",
            WorkerStatus::Dead { .. } => "dead",
        }
    }

    /// Alive or draining (it may hold tasks).
    pub fn is_live(&self) -> bool {
        !matches!(self, WorkerStatus::Dead { .. })
    }
}

/// A worker as stored in the replicated state (one record per worker).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    /// What it registered with.
    pub spec: WorkerSpec,
    /// A nonce picked by the worker process: a registration with the same id and a different
    /// instance is a restart, and whatever the previous instance held is requeued.
    pub instance: u64,
    /// Issued at each new registration (from a global counter); heartbeats and the leader's
    /// expiry decisions quote it, so a decision about an old session cannot hit a new one.
    pub session: u64,
    /// Alive / Draining / Dead.
    pub status: WorkerStatus,
    /// When this session registered.
    pub registered_at: Millis,
    /// The token that registered it (empty: registered without authentication). Only that
    /// token may act for the worker while it is live.
    pub owner: String,
}

/// What a token may do. The method table (which RPC needs which role) is the node's; the
/// state machine only stores the role of the tokens it replicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read tasks, events, workers and cluster status.
    Reader,
    /// Reader, plus submit and cancel tasks.
    Submitter,
    /// Run tasks: the Workers service for its own worker ids.
    Worker,
    /// Everything, including membership, leader transfer, snapshots and tokens.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 4] = [Role::Reader, Role::Submitter, Role::Worker, Role::Admin];

    /// The spelling in token files, commands and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Submitter => "submitter",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token created through the API and replicated (tokens of a node's token file are not).
/// Only the SHA-256 of the secret is stored; the secret itself never enters the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Unique name (1-64 of `[A-Za-z0-9._-@]`); what workers are bound to and logs show.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the secret.
    pub secret_sha256: [u8; 32],
    /// Worker tokens: the worker ids it may act for start with this.
    pub worker_id_prefix: Option<String>,
    /// Log time of the creation.
    pub created_at: Millis,
    /// Log time after which it is no longer accepted (`None`: never expires).
    pub expires_at: Option<Millis>,
}

impl ApiToken {
    /// Whether it has expired at `now` (unix ms).
    pub fn expired_at(&self, now: Millis) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }
}

/// Counters that must survive restarts and snapshots (one record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The next task id to hand out.
    pub next_task_id: u64,
    /// The next fencing token.
    pub next_fence: u64,
    /// The next worker session.
    pub next_session: u64,
    /// The largest `now` applied so far; log time never moves backwards.
    pub log_time: Millis,
}

impl Meta {
    /// Counters start at 1 so that 0 can mean "none".
    pub fn initial() -> Self {
        Meta { next_task_id: 1, next_fence: 1, next_session: 1, log_time: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 100,
            multiplier_permille: 2000,
            max_backoff_ms: 500,
        };
        assert_eq!(p.base_backoff_after(1), 100);
        assert_eq!(p.base_backoff_after(2), 200);
        assert_eq!(p.base_backoff_after(3), 400);
        assert_eq!(p.base_backoff_after(4), 500);
        assert_eq!(p.base_backoff_after(40), 500);
    }

    #[test]
    fn jitter_is_deterministic_bounded_and_spread() {
        let p = RetryPolicy::default();
        let mut seen = std::collections::BTreeSet::new();
        for id in 1..200u64 {
            for attempt in 1..5 {
                let base = p.base_backoff_after(attempt);
                let d = p.backoff_after(TaskId(id), attempt);
                assert_eq!(d, p.backoff_after(TaskId(id), attempt), "same inputs, same delay");
                assert!(d <= base && d >= base - base / 5, "{d} outside 80-100% of {base}");
                if attempt == 1 {
                    seen.insert(d);
                }
            }
        }
        assert!(seen.len() > 50, "tasks failing together retry at spread times: {seen:?}");
        let none = RetryPolicy { initial_backoff_ms: 0, ..p };
        assert_eq!(none.backoff_after(TaskId(7), 1), 0, "no backoff stays no backoff");
    }

    #[test]
    fn resources_shortfall_names_the_resource() {
        let mut need = Resources { cpu_milli: 500, memory_mib: 100, named: BTreeMap::new() };
        need.named.insert("gpu".into(), 2);
        let mut have = Resources { cpu_milli: 1000, memory_mib: 1000, named: BTreeMap::new() };
        have.named.insert("gpu".into(), 1);
        assert_eq!(need.shortfall(&have), Some(("gpu".into(), 2, 1)));
        have.named.insert("gpu".into(), 2);
        assert!(need.fits_in(&have));
        let mut used = Resources::default();
        used.add(&need);
        used.sub(&need);
        assert_eq!(used, Resources::default());
    }

    #[test]
    fn state_kind_parses_its_names() {
        for k in TaskStateKind::ALL {
            assert_eq!(TaskStateKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(TaskStateKind::parse("UpstreamFailed"), Some(TaskStateKind::UpstreamFailed));
        assert_eq!(TaskStateKind::parse("nope"), None);
    }
}
