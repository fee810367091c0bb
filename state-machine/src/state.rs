//! The replicated scheduler state and its deterministic `apply`.
//!
//! # Shape
//! The *records* — one [`Meta`], one [`Task`] per task, one [`Worker`] per worker — are the
//! whole truth; they are what the `raft` crate persists and snapshots. Everything else here is
//! an *index* derived from the records and rebuilt by [`SchedulerState::from_records`]:
//! ready buckets (per queue and placement shape, ordered by priority then id), unmet
//! dependency counts, dependents, timers (delayed tasks, attempt deadlines), finished tasks
//! (for retention), per-worker load, the idempotency-key map and per-state counters.
//!
//! # Determinism
//! No clock, randomness or I/O; hash maps are only used for point lookups, never iterated.
//! Log time is `max(previous, command.now)`. Every state change of a task goes through
//! [`SchedulerState::transition`], which keeps the indexes in step and records the changed
//! record and an event, so the store can persist exactly what changed and the node can notify
//! workers and watchers.
//!
//! # Files
//! This file holds the state, its queries and the apply dispatch; the rest is split by job:
//! `index` (the derived indexes and placement fit checks), `tasks` (submit, cancel and every
//! task state transition), `workers` (register, drain, end, assign and reports), `time`
//! (advancing log time: deadlines and delays; retention purge) and `lifecycle` (the operator's
//! commands: retry a task, undrain or remove a worker, pause or resume a queue).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{Command, Op, Output, Response};
use crate::error::Rejection;
use crate::model::{
    ApiToken, DeathReason, Fence, Meta, Millis, PausedQueue, Resources, Task, TaskId, TaskState,
    TaskStateKind, Worker, WorkerId, WorkerStatus,
};
use crate::record::RecordKey;

mod index;
mod lifecycle;
pub use lifecycle::MAX_PAUSED_QUEUES;
mod tasks;
mod time;
mod tokens;
pub use tokens::{valid_token_name, MAX_TOKENS, MAX_TOKEN_TTL_MS};
mod workers;

pub(crate) use index::{misfit, missing_label, Indexes, Load, Shape};

/// A state change of one task, produced by apply for watchers and worker streams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// The task.
    pub task: TaskId,
    /// Its new state.
    pub state: TaskStateKind,
    /// Its attempt number after the change.
    pub attempt: u32,
    /// Holder of the new state (Assigned/Running) with its fencing token.
    pub holder: Option<(WorkerId, Fence)>,
    /// Holder before the change, when it differs from the new one: that worker must stop
    /// (its attempt was cancelled, timed out, or taken away).
    pub revoked_from: Option<(WorkerId, Fence)>,
}

/// What an apply changed: the records to write (or delete) and the events to publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Records written or deleted (look them up with [`SchedulerState::record`]).
    pub records: BTreeSet<RecordKey>,
    /// Task state changes, in apply order.
    pub events: Vec<TaskEvent>,
}

/// The scheduler's replicated state. See the module docs.
#[derive(Clone, Debug)]
pub struct SchedulerState {
    pub(crate) meta: Meta,
    /// Boxed so the map's nodes stay small (memory per task matters at millions of tasks).
    pub(crate) tasks: BTreeMap<TaskId, Box<Task>>,
    pub(crate) workers: BTreeMap<WorkerId, Worker>,
    /// Replicated API tokens by name.
    pub(crate) tokens: BTreeMap<String, ApiToken>,
    /// Token names by secret digest (a point lookup per authenticated request).
    pub(crate) token_digests: std::collections::HashMap<[u8; 32], String>,
    /// Paused queues by name.
    pub(crate) paused: BTreeMap<String, PausedQueue>,
    pub(crate) idx: Indexes,
    /// The cluster's command version (see [`crate::COMMAND_VERSION`]).
    pub(crate) cluster_version: u32,
    changes: Changes,
}

impl Default for SchedulerState {
    fn default() -> Self {
        SchedulerState::new()
    }
}
impl SchedulerState {
    /// An empty state.
    pub fn new() -> Self {
        SchedulerState {
            meta: Meta::initial(),
            tasks: BTreeMap::new(),
            workers: BTreeMap::new(),
            tokens: BTreeMap::new(),
            token_digests: std::collections::HashMap::new(),
            paused: BTreeMap::new(),
            idx: Indexes::default(),
            cluster_version: crate::BASE_COMMAND_VERSION,
            changes: Changes::default(),
        }
    }

    /// The cluster's command version: operations of kinds up to it are accepted.
    pub fn cluster_version(&self) -> u32 {
        self.cluster_version
    }

    /// Rebuild a state (records and every index) from its records alone.
    pub fn from_records(
        meta: Meta,
        tasks: impl IntoIterator<Item = Task>,
        workers: impl IntoIterator<Item = Worker>,
        tokens: impl IntoIterator<Item = ApiToken>,
        queues: impl IntoIterator<Item = PausedQueue>,
    ) -> Self {
        let mut s = SchedulerState::new();
        s.meta = meta;
        for q in queues {
            s.paused.insert(q.queue.clone(), q);
        }
        for t in tokens {
            s.token_digests.insert(t.secret_sha256, t.name.clone());
            s.tokens.insert(t.name.clone(), t);
        }
        for w in workers {
            if let WorkerStatus::Dead { at, .. } = w.status {
                s.idx.dead_workers.insert((at, w.spec.id.clone()));
            } else {
                s.idx.loads.insert(w.spec.id.clone(), Load::default());
            }
            s.workers.insert(w.spec.id.clone(), w);
        }
        for t in tasks {
            s.tasks.insert(t.id, Box::new(t));
        }
        let ids: Vec<TaskId> = s.tasks.keys().copied().collect();
        for id in ids {
            let task = &s.tasks[&id];
            if let Some(k) = &task.spec.idempotency_key {
                s.idx.by_key.insert(k.clone(), id);
            }
            if matches!(task.state, TaskState::Waiting) {
                let unmet = s.unmet_deps(task);
                s.idx.unmet.insert(id, unmet.len() as u32);
                for d in unmet {
                    s.idx.dependents.entry(d).or_default().push(id);
                }
            }
            let task = &s.tasks[&id];
            Self::index_state(&mut s.idx, id, &task.spec, &task.state);
        }
        s
    }

    // ----- read access -------------------------------------------------------------------

    /// Current log time.
    pub fn log_time(&self) -> Millis {
        self.meta.log_time
    }

    /// One task.
    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id).map(|t| &**t)
    }

    /// All tasks in id order, from `from` (inclusive).
    pub fn tasks_from(&self, from: TaskId) -> impl Iterator<Item = &Task> {
        self.tasks.range(from..).map(|(_, t)| &**t)
    }

    /// Tasks with ids below `below`, newest (highest id) first.
    pub fn tasks_before(&self, below: TaskId) -> impl Iterator<Item = &Task> {
        self.tasks.range(..below).rev().map(|(_, t)| &**t)
    }

    /// Number of task records.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The task submitted with an idempotency key, if it is still retained.
    pub fn task_by_key(&self, key: &str) -> Option<TaskId> {
        self.idx.by_key.get(key).copied()
    }

    /// One worker.
    pub fn worker(&self, id: &WorkerId) -> Option<&Worker> {
        self.workers.get(id)
    }

    /// All workers in id order.
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values()
    }

    /// Tasks held by a live worker (Assigned or Running), in id order.
    pub fn held_by(&self, worker: &WorkerId) -> impl Iterator<Item = &Task> {
        self.idx
            .loads
            .get(worker)
            .into_iter()
            .flat_map(|l| l.tasks.iter())
            .filter_map(|id| self.tasks.get(id).map(|t| &**t))
    }

    /// Resources used by a live worker's tasks.
    pub fn worker_used(&self, worker: &WorkerId) -> Option<&Resources> {
        self.idx.loads.get(worker).map(|l| &l.used)
    }

    /// Number of tasks per state, indexed like [`TaskStateKind::ALL`].
    pub fn counts(&self) -> [u64; 9] {
        self.idx.counts
    }

    /// Number of tasks in one state.
    pub fn count(&self, kind: TaskStateKind) -> u64 {
        self.idx.counts[kind.index()]
    }

    /// Paused queues, by name.
    pub fn paused_queues(&self) -> impl Iterator<Item = &PausedQueue> {
        self.paused.values()
    }

    /// When `queue` was paused, if it is paused.
    pub fn queue_paused_since(&self, queue: &str) -> Option<Millis> {
        self.paused.get(queue).map(|q| q.since)
    }

    /// Queued tasks per queue, in queue-name order.
    pub fn queue_depths(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for b in self.idx.buckets.values() {
            *out.entry(b.shape.queue.clone()).or_insert(0) += b.tasks.len() as u64;
        }
        out
    }

    /// Per queue with queued tasks: when its earliest-submitted queued task became ready
    /// (for the oldest-queued-task age). Walks the ready buckets once.
    pub fn oldest_queued(&self) -> BTreeMap<String, Millis> {
        let mut first: BTreeMap<String, TaskId> = BTreeMap::new();
        for b in self.idx.buckets.values() {
            if let Some(id) = b.tasks.iter().map(|(_, id)| *id).min() {
                let e = first.entry(b.shape.queue.clone()).or_insert(id);
                *e = (*e).min(id);
            }
        }
        first
            .into_iter()
            .filter_map(|(q, id)| match self.task(id).map(|t| &t.state) {
                Some(TaskState::Queued { since }) => Some((q, *since)),
                _ => None,
            })
            .collect()
    }

    /// The earliest log time at which [`Op::AdvanceTime`] has something to do.
    pub fn next_timer(&self) -> Option<Millis> {
        let d = self.idx.delayed.first().map(|(t, _)| *t);
        let x = self.idx.deadlines.first().map(|(t, _)| *t);
        match (d, x) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the oldest retained finished task finished (what retention would purge first).
    pub fn oldest_finished(&self) -> Option<Millis> {
        self.idx.finished.first().map(|(t, _)| *t)
    }

    /// Unmet dependencies of a task (those that have not succeeded), in the task's order.
    pub fn unmet_deps(&self, task: &Task) -> Vec<TaskId> {
        task.deps
            .iter()
            .copied()
            .filter(|d| {
                self.tasks.get(d).is_some_and(|t| t.state.kind() != TaskStateKind::Succeeded)
            })
            .collect()
    }

    /// Take what the applies since the last call changed.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    // ----- apply -------------------------------------------------------------------------

    /// Apply one command. Deterministic; never panics on any decodable command.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        if cmd.now > self.meta.log_time {
            self.meta.log_time = cmd.now;
            self.touch(RecordKey::Meta);
        }
        let now = self.meta.log_time;
        self.apply_op(now, &cmd.op)
    }

    fn apply_op(&mut self, now: Millis, op: &Op) -> Response {
        // A kind some member may not decode is refused (a batch's items are judged one by
        // one); the leader raises the version first, so this holds only against races.
        let exempt = matches!(op, Op::Batch(_) | Op::SetClusterVersion { .. });
        if !exempt && op.version() > self.cluster_version {
            return Err(Rejection::ClusterVersion {
                kind: op.kind().to_string(),
                needed: op.version(),
                current: self.cluster_version,
            });
        }
        match op {
            Op::SetClusterVersion { version } => {
                if *version > self.cluster_version {
                    self.cluster_version = *version;
                    self.touch(RecordKey::ClusterVersion);
                }
                Ok(Output::ClusterVersion { version: self.cluster_version })
            }
            Op::Submit { tasks } => self.submit(now, tasks),
            Op::Cancel { ids, reason } => Ok(self.cancel(now, ids, reason)),
            Op::RegisterWorker { spec, instance } => self.register_worker(now, spec, *instance, ""),
            Op::RegisterWorkerAs { spec, instance, owner } => {
                self.register_worker(now, spec, *instance, owner)
            }
            Op::DrainWorker { worker } => self.drain_worker(now, worker),
            Op::DeregisterWorker { worker, session } => {
                self.end_worker(now, worker, *session, DeathReason::Left)
            }
            Op::ExpireWorker { worker, session } => {
                self.end_worker(now, worker, *session, DeathReason::Expired)
            }
            Op::Assign { assignments, .. } => Ok(self.assign(now, assignments)),
            Op::Report { worker, reports } => Ok(self.report(now, worker, reports)),
            Op::AdvanceTime => Ok(self.advance_time(now)),
            Op::Purge { finished_before, limit } => Ok(self.purge(*finished_before, *limit)),
            Op::CreateToken { token } => self.create_token(now, token),
            Op::RevokeToken { name } => self.revoke_token(name),
            Op::RetryTask { task, with_dependents } => {
                self.retry_task(now, *task, *with_dependents)
            }
            Op::UndrainWorker { worker } => self.undrain_worker(worker),
            Op::RemoveWorker { worker } => self.remove_worker(worker),
            Op::PauseQueue { queue } => self.pause_queue(now, queue),
            Op::ResumeQueue { queue } => self.resume_queue(queue),
            Op::Batch(ops) => Ok(Output::Batch(
                ops.iter()
                    .map(|op| match op {
                        Op::Batch(_) => Err(Rejection::invalid("batch", "batches do not nest")),
                        op => self.apply_op(now, op),
                    })
                    .collect(),
            )),
        }
    }

    fn touch(&mut self, key: RecordKey) {
        self.changes.records.insert(key);
    }
}
