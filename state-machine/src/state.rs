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

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::command::{
    Assignment, CancelOutcome, Command, DepRef, NewTask, Op, Output, Report, ReportKind,
    ReportOutcome, Response, Submitted,
};
use crate::error::Rejection;
use crate::model::{
    AttemptFailure, DeathReason, FailureKind, Fence, Meta, Millis, Resources, Task, TaskId,
    TaskSpec, TaskState, TaskStateKind, Worker, WorkerId, WorkerSpec, WorkerStatus,
};
use crate::record::RecordKey;
use crate::validate::{self, HARD};

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

/// The shape that decides which workers can take a task: its queue, required labels and
/// resources. Tasks of one shape are interchangeable for placement.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Shape {
    pub queue: String,
    pub labels: BTreeMap<String, String>,
    pub resources: Resources,
}

impl Shape {
    pub(crate) fn of(spec: &TaskSpec) -> Shape {
        Shape {
            queue: spec.queue.clone(),
            labels: spec.labels.clone(),
            resources: spec.resources.clone(),
        }
    }
}

fn shape_hash(spec: &TaskSpec) -> u64 {
    // Only used for lookups (never iterated), so the hasher's algorithm does not leak into
    // any observable order.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec.queue.hash(&mut h);
    spec.labels.hash(&mut h);
    spec.resources.hash(&mut h);
    h.finish()
}

/// Ready tasks of one shape, best first: higher priority, then lower id (FIFO).
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    pub shape: Shape,
    pub tasks: BTreeSet<(Reverse<i32>, TaskId)>,
}

/// What a live worker currently holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Load {
    pub used: Resources,
    pub tasks: BTreeSet<TaskId>,
}

/// The derived indexes (see the module docs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Indexes {
    pub by_key: HashMap<String, TaskId>,
    /// Waiting task -> number of dependencies that have not succeeded.
    pub unmet: HashMap<TaskId, u32>,
    /// Dependency -> tasks that were waiting on it (entries of tasks that left Waiting by
    /// another path are skipped when read).
    pub dependents: HashMap<TaskId, Vec<TaskId>>,
    /// Ready buckets by id; `bucket_ids` finds a shape's bucket via its hash.
    pub buckets: BTreeMap<u32, Bucket>,
    pub bucket_ids: HashMap<u64, Vec<u32>>,
    pub next_bucket: u32,
    pub delayed: BTreeSet<(Millis, TaskId)>,
    pub deadlines: BTreeSet<(Millis, TaskId)>,
    pub finished: BTreeSet<(Millis, TaskId)>,
    pub dead_workers: BTreeSet<(Millis, WorkerId)>,
    /// Live (alive or draining) workers' load.
    pub loads: HashMap<WorkerId, Load>,
    pub counts: [u64; 9],
}

impl Indexes {
    /// The ready bucket holding tasks of `spec`'s shape, if there is one.
    pub(crate) fn bucket_of(&self, spec: &TaskSpec) -> Option<u32> {
        self.bucket_ids.get(&shape_hash(spec))?.iter().copied().find(|b| {
            let s = &self.buckets[b].shape;
            s.queue == spec.queue && s.labels == spec.labels && s.resources == spec.resources
        })
    }
}

/// The scheduler's replicated state. See the module docs.
#[derive(Clone, Debug)]
pub struct SchedulerState {
    pub(crate) meta: Meta,
    /// Boxed so the map's nodes stay small (memory per task matters at millions of tasks).
    pub(crate) tasks: BTreeMap<TaskId, Box<Task>>,
    pub(crate) workers: BTreeMap<WorkerId, Worker>,
    pub(crate) idx: Indexes,
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
            idx: Indexes::default(),
            changes: Changes::default(),
        }
    }

    /// Rebuild a state (records and every index) from its records alone.
    pub fn from_records(
        meta: Meta,
        tasks: impl IntoIterator<Item = Task>,
        workers: impl IntoIterator<Item = Worker>,
    ) -> Self {
        let mut s = SchedulerState::new();
        s.meta = meta;
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

    /// Queued tasks per queue, in queue-name order.
    pub fn queue_depths(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for b in self.idx.buckets.values() {
            *out.entry(b.shape.queue.clone()).or_insert(0) += b.tasks.len() as u64;
        }
        out
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
        match op {
            Op::Submit { tasks } => self.submit(now, tasks),
            Op::Cancel { ids, reason } => Ok(self.cancel(now, ids, reason)),
            Op::RegisterWorker { spec, instance } => self.register_worker(now, spec, *instance),
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

    fn submit(&mut self, now: Millis, batch: &[NewTask]) -> Response {
        validate::submit_batch(batch, now, &HARD)?;
        let order = validate::topo_order(batch)?;

        // Resolve ids: known idempotency keys keep their task, new tasks get ids in batch
        // order. Nothing is mutated until every check has passed.
        let mut ids = Vec::with_capacity(batch.len());
        let mut created = Vec::with_capacity(batch.len());
        let mut next = self.meta.next_task_id;
        for t in batch {
            match t.spec.idempotency_key.as_ref().and_then(|k| self.idx.by_key.get(k)) {
                Some(&existing) => {
                    ids.push(existing);
                    created.push(false);
                }
                None => {
                    ids.push(TaskId(next));
                    next += 1;
                    created.push(true);
                }
            }
        }
        for (i, t) in batch.iter().enumerate() {
            if !created[i] {
                self.check_same_body(t, ids[i], &ids)?;
            }
        }
        let mut resolved: Vec<Vec<TaskId>> = Vec::with_capacity(batch.len());
        for (i, t) in batch.iter().enumerate() {
            let mut deps = Vec::with_capacity(t.depends_on.len());
            if created[i] {
                for (j, d) in t.depends_on.iter().enumerate() {
                    let id = match d {
                        DepRef::Id(id) => {
                            if !self.tasks.contains_key(id) {
                                return Err(Rejection::UnknownDependency {
                                    field: format!("tasks[{i}].depends_on[{j}]"),
                                    task: *id,
                                });
                            }
                            *id
                        }
                        DepRef::Batch(p) => ids[*p as usize],
                    };
                    if id == ids[i] {
                        return Err(Rejection::invalid(
                            format!("tasks[{i}].depends_on[{j}]"),
                            "a task cannot depend on itself",
                        ));
                    }
                    if deps.contains(&id) {
                        return Err(Rejection::invalid(
                            format!("tasks[{i}].depends_on[{j}]"),
                            format!("duplicate dependency (resolves to task {id})"),
                        ));
                    }
                    deps.push(id);
                }
            }
            resolved.push(deps);
        }

        self.meta.next_task_id = next;
        self.touch(RecordKey::Meta);
        for &pos in &order {
            let i = pos as usize;
            if !created[i] {
                continue;
            }
            let id = ids[i];
            let mut spec = batch[i].spec.clone();
            if batch[i].delay_ms > 0 {
                let at = now.saturating_add(batch[i].delay_ms);
                spec.not_before = Some(spec.not_before.map_or(at, |nb| nb.max(at)));
            }
            let deps = std::mem::take(&mut resolved[i]);
            self.create_task(now, id, spec, deps);
        }
        Ok(Output::Submitted(
            ids.iter()
                .zip(&created)
                .map(|(&id, &created)| Submitted {
                    id,
                    created,
                    state: self.tasks[&id].state.kind(),
                })
                .collect(),
        ))
    }

    /// A keyed submit that matches an existing task must carry the body that created it.
    /// Compared: everything the client sent except the relative `delay_ms` (its absolute
    /// effect depends on when the first submit was applied, so a retry cannot reproduce it).
    fn check_same_body(
        &self,
        t: &NewTask,
        existing: TaskId,
        ids: &[TaskId],
    ) -> Result<(), Rejection> {
        let old = &self.tasks[&existing];
        let (a, b) = (&t.spec, &old.spec);
        let field = if a.name != b.name {
            "name"
        } else if a.payload != b.payload {
            "payload"
        } else if a.queue != b.queue {
            "queue"
        } else if a.priority != b.priority {
            "priority"
        } else if a.resources != b.resources {
            "resources"
        } else if a.labels != b.labels {
            "labels"
        } else if a.retry != b.retry {
            "retry policy"
        } else if a.timeout_ms != b.timeout_ms {
            "timeout"
        } else if a.metadata != b.metadata {
            "metadata"
        } else if t.delay_ms == 0 && a.not_before != b.not_before {
            "not_before"
        } else {
            let mut deps: Vec<TaskId> = t
                .depends_on
                .iter()
                .map(|d| match d {
                    DepRef::Id(id) => *id,
                    DepRef::Batch(p) => ids[*p as usize],
                })
                .collect();
            let mut had = old.deps.clone();
            deps.sort_unstable();
            deps.dedup();
            had.sort_unstable();
            if deps == had {
                return Ok(());
            }
            "depends_on"
        };
        Err(Rejection::KeyConflict {
            key: b.idempotency_key.clone().unwrap_or_default(),
            task: existing,
            field: field.to_string(),
        })
    }

    fn create_task(&mut self, now: Millis, id: TaskId, spec: TaskSpec, deps: Vec<TaskId>) {
        let mut unmet = Vec::new();
        let mut upstream_failed = None;
        for d in &deps {
            match self.tasks[d].state.kind() {
                TaskStateKind::Succeeded => {}
                TaskStateKind::Failed
                | TaskStateKind::Cancelled
                | TaskStateKind::UpstreamFailed => {
                    upstream_failed.get_or_insert(*d);
                }
                _ => unmet.push(*d),
            }
        }
        let state = if let Some(upstream) = upstream_failed {
            TaskState::UpstreamFailed { at: now, upstream }
        } else if !unmet.is_empty() {
            TaskState::Waiting
        } else {
            Self::ready_state(now, &spec)
        };
        if let Some(k) = &spec.idempotency_key {
            self.idx.by_key.insert(k.clone(), id);
        }
        if matches!(state, TaskState::Waiting) {
            self.idx.unmet.insert(id, unmet.len() as u32);
            for d in unmet {
                self.idx.dependents.entry(d).or_default().push(id);
            }
        }
        Self::index_state(&mut self.idx, id, &spec, &state);
        let kind = state.kind();
        self.tasks.insert(
            id,
            Box::new(Task {
                id,
                spec,
                deps,
                submitted_at: now,
                updated_at: now,
                attempt: 0,
                last_fence: Fence(0),
                last_failure: None,
                state,
            }),
        );
        self.touch(RecordKey::of_task(id));
        self.changes.events.push(TaskEvent {
            task: id,
            state: kind,
            attempt: 0,
            holder: None,
            revoked_from: None,
        });
    }

    /// Queued, or Delayed until `not_before` when that is still in the future.
    pub(crate) fn ready_state(now: Millis, spec: &TaskSpec) -> TaskState {
        match spec.not_before {
            Some(t) if t > now => TaskState::Delayed { until: t },
            _ => TaskState::Queued { since: now },
        }
    }

    /// The single way a task's state changes: unindex the old state, index the new one,
    /// record the change and the event. Terminal states also settle dependents.
    fn transition(&mut self, now: Millis, id: TaskId, new: TaskState) {
        self.transition_by(now, id, new, false);
    }

    /// [`Self::transition`]; `by_holder` marks a change the holding worker caused itself (its
    /// completion or failure report), which it need not be told to stop.
    fn transition_by(&mut self, now: Millis, id: TaskId, new: TaskState, by_holder: bool) {
        let task = self.tasks.get_mut(&id).expect("transition of a known task");
        let old = std::mem::replace(&mut task.state, new);
        task.updated_at = now;
        Self::unindex_state(&mut self.idx, id, &task.spec, &old);
        if matches!(old, TaskState::Waiting) {
            self.idx.unmet.remove(&id);
        }
        Self::index_state(&mut self.idx, id, &task.spec, &task.state);
        let holder = task.state.holder().map(|(w, f)| (w.clone(), f));
        let revoked_from = old
            .holder()
            .map(|(w, f)| (w.clone(), f))
            .filter(|h| !by_holder && Some(h) != holder.as_ref());
        let event = TaskEvent {
            task: id,
            state: task.state.kind(),
            attempt: task.attempt,
            holder,
            revoked_from,
        };
        let new_kind = task.state.kind();
        self.touch(RecordKey::of_task(id));
        self.changes.events.push(event);
        match new_kind {
            TaskStateKind::Succeeded => self.release_dependents(now, id),
            TaskStateKind::Failed | TaskStateKind::Cancelled | TaskStateKind::UpstreamFailed => {
                self.fail_dependents(now, id);
            }
            _ => {}
        }
    }

    fn index_state(idx: &mut Indexes, id: TaskId, spec: &TaskSpec, state: &TaskState) {
        idx.counts[state.kind().index()] += 1;
        match state {
            TaskState::Waiting => {}
            TaskState::Queued { .. } => {
                let bid = match idx.bucket_of(spec) {
                    Some(b) => b,
                    None => {
                        let b = idx.next_bucket;
                        idx.next_bucket += 1;
                        idx.buckets
                            .insert(b, Bucket { shape: Shape::of(spec), tasks: BTreeSet::new() });
                        idx.bucket_ids.entry(shape_hash(spec)).or_default().push(b);
                        b
                    }
                };
                idx.buckets
                    .get_mut(&bid)
                    .expect("bucket")
                    .tasks
                    .insert((Reverse(spec.priority), id));
            }
            TaskState::Delayed { until } => {
                idx.delayed.insert((*until, id));
            }
            TaskState::Assigned { worker, deadline, .. }
            | TaskState::Running { worker, deadline, .. } => {
                let load = idx.loads.entry(worker.clone()).or_default();
                load.used.add(&spec.resources);
                load.tasks.insert(id);
                if let Some(d) = deadline {
                    idx.deadlines.insert((*d, id));
                }
            }
            TaskState::Succeeded { at, .. }
            | TaskState::Failed { at }
            | TaskState::Cancelled { at, .. }
            | TaskState::UpstreamFailed { at, .. } => {
                idx.finished.insert((*at, id));
            }
        }
    }

    fn unindex_state(idx: &mut Indexes, id: TaskId, spec: &TaskSpec, state: &TaskState) {
        idx.counts[state.kind().index()] -= 1;
        match state {
            TaskState::Waiting => {}
            TaskState::Queued { .. } => {
                let Some(b) = idx.bucket_of(spec) else { return };
                let bucket = idx.buckets.get_mut(&b).expect("bucket");
                bucket.tasks.remove(&(Reverse(spec.priority), id));
                if bucket.tasks.is_empty() {
                    idx.buckets.remove(&b);
                    let h = shape_hash(spec);
                    let bs = idx.bucket_ids.get_mut(&h).expect("bucket ids");
                    bs.retain(|x| *x != b);
                    if bs.is_empty() {
                        idx.bucket_ids.remove(&h);
                    }
                }
            }
            TaskState::Delayed { until } => {
                idx.delayed.remove(&(*until, id));
            }
            TaskState::Assigned { worker, deadline, .. }
            | TaskState::Running { worker, deadline, .. } => {
                if let Some(load) = idx.loads.get_mut(worker) {
                    load.used.sub(&spec.resources);
                    load.tasks.remove(&id);
                }
                if let Some(d) = deadline {
                    idx.deadlines.remove(&(*d, id));
                }
            }
            TaskState::Succeeded { at, .. }
            | TaskState::Failed { at }
            | TaskState::Cancelled { at, .. }
            | TaskState::UpstreamFailed { at, .. } => {
                idx.finished.remove(&(*at, id));
            }
        }
    }

    /// A dependency succeeded: waiting dependents with nothing else unmet become ready.
    fn release_dependents(&mut self, now: Millis, dep: TaskId) {
        let Some(dependents) = self.idx.dependents.remove(&dep) else { return };
        for t in dependents {
            let Some(n) = self.idx.unmet.get_mut(&t) else { continue };
            *n -= 1;
            if *n == 0 {
                let state = Self::ready_state(now, &self.tasks[&t].spec);
                self.transition(now, t, state);
            }
        }
    }

    /// A dependency ended without success: waiting dependents fail, transitively (each
    /// transition to UpstreamFailed recurses through `transition`; depth is bounded by the
    /// DAG's depth, and an explicit worklist keeps the stack flat).
    fn fail_dependents(&mut self, now: Millis, dep: TaskId) {
        let mut work = vec![dep];
        while let Some(d) = work.pop() {
            let Some(dependents) = self.idx.dependents.remove(&d) else { continue };
            for t in dependents {
                if !self.idx.unmet.contains_key(&t) {
                    continue;
                }
                // Inline transition without the recursive settle, then queue it.
                let task = self.tasks.get_mut(&t).expect("dependent exists");
                let old = std::mem::replace(
                    &mut task.state,
                    TaskState::UpstreamFailed { at: now, upstream: d },
                );
                task.updated_at = now;
                Self::unindex_state(&mut self.idx, t, &task.spec, &old);
                self.idx.unmet.remove(&t);
                Self::index_state(&mut self.idx, t, &task.spec, &task.state);
                let attempt = task.attempt;
                self.touch(RecordKey::of_task(t));
                self.changes.events.push(TaskEvent {
                    task: t,
                    state: TaskStateKind::UpstreamFailed,
                    attempt,
                    holder: None,
                    revoked_from: None,
                });
                work.push(t);
            }
        }
    }

    /// The attempt in progress ended without success: retry (Queued after a worker loss,
    /// Delayed by the backoff otherwise) while attempts remain, else Failed.
    fn fail_attempt(&mut self, now: Millis, id: TaskId, kind: FailureKind, message: String) {
        let task = self.tasks.get_mut(&id).expect("failing a known task");
        let Some((worker, fence)) = task.state.holder().map(|(w, f)| (w.clone(), f)) else {
            return;
        };
        let retryable = kind != FailureKind::Fatal;
        task.last_failure = Some(Box::new(AttemptFailure {
            attempt: task.attempt,
            fence,
            worker,
            kind: kind.clone(),
            message: validate::truncate_message(&message, HARD.max_error_bytes),
            at: now,
        }));
        let next = if retryable && task.attempt < task.spec.retry.max_attempts {
            let delay = if kind == FailureKind::WorkerLost {
                0
            } else {
                task.spec.retry.backoff_after(id, task.attempt)
            };
            if delay == 0 {
                TaskState::Queued { since: now }
            } else {
                TaskState::Delayed { until: now.saturating_add(delay) }
            }
        } else {
            TaskState::Failed { at: now }
        };
        let by_holder = matches!(kind, FailureKind::Error | FailureKind::Fatal);
        self.transition_by(now, id, next, by_holder);
    }

    fn cancel(&mut self, now: Millis, ids: &[TaskId], reason: &str) -> Output {
        let reason = validate::truncate_message(reason, HARD.max_error_bytes);
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some(task) = self.tasks.get(&id) else {
                out.push(Err(Rejection::TaskNotFound { task: id }));
                continue;
            };
            match task.state.kind() {
                TaskStateKind::Cancelled => out.push(Ok(CancelOutcome::AlreadyCancelled)),
                k if k.is_terminal() => out.push(Err(Rejection::InvalidState {
                    task: id,
                    state: k,
                    reason: "a finished task cannot be cancelled".into(),
                })),
                _ => {
                    let first_event = self.changes.events.len();
                    self.transition(
                        now,
                        id,
                        TaskState::Cancelled { at: now, reason: reason.clone() },
                    );
                    let dependents = self.changes.events[first_event + 1..]
                        .iter()
                        .filter(|e| e.state == TaskStateKind::UpstreamFailed)
                        .map(|e| e.task)
                        .collect();
                    out.push(Ok(CancelOutcome::Cancelled { dependents }));
                }
            }
        }
        Output::Cancelled(out)
    }

    fn register_worker(&mut self, now: Millis, spec: &WorkerSpec, instance: u64) -> Response {
        validate::worker_spec(spec, &HARD)?;
        let id = spec.id.clone();
        if let Some(w) = self.workers.get(&id) {
            if w.status.is_live() && w.instance == instance {
                // A reconnect of the same process: keep session, status and tasks. A changed
                // description is taken only if what it holds still fits.
                let load = &self.idx.loads[&id];
                if let Some((res, need, have)) = load.used.shortfall(&spec.capacity) {
                    return Err(Rejection::invalid(
                        "worker.capacity",
                        format!("{res} {have} is below the {need} its running tasks use"),
                    ));
                }
                if (load.tasks.len() as u64) > spec.slots as u64 {
                    return Err(Rejection::invalid(
                        "worker.slots",
                        format!("{} is below the {} tasks it holds", spec.slots, load.tasks.len()),
                    ));
                }
                let session = w.session;
                if w.spec != *spec {
                    self.workers.get_mut(&id).expect("worker").spec = spec.clone();
                    self.touch(RecordKey::Worker(id.clone()));
                }
                return Ok(Output::Registered { session, requeued: Vec::new() });
            }
        }
        // New worker, a restarted process, or a dead worker coming back: a fresh session.
        let requeued = match self.workers.get(&id).map(|w| w.status.clone()) {
            Some(WorkerStatus::Dead { at, .. }) => {
                self.idx.dead_workers.remove(&(at, id.clone()));
                Vec::new()
            }
            Some(_) => self.take_back(now, &id, "worker restarted"),
            None => Vec::new(),
        };
        let session = self.meta.next_session;
        self.meta.next_session += 1;
        self.touch(RecordKey::Meta);
        self.workers.insert(
            id.clone(),
            Worker {
                spec: spec.clone(),
                instance,
                session,
                status: WorkerStatus::Alive,
                registered_at: now,
            },
        );
        self.idx.loads.entry(id.clone()).or_default();
        self.touch(RecordKey::Worker(id));
        Ok(Output::Registered { session, requeued })
    }

    /// Requeue (or fail) every task a worker holds, as a lost attempt.
    fn take_back(&mut self, now: Millis, worker: &WorkerId, why: &str) -> Vec<TaskId> {
        let held: Vec<TaskId> = self
            .idx
            .loads
            .get(worker)
            .map(|l| l.tasks.iter().copied().collect())
            .unwrap_or_default();
        for &t in &held {
            self.fail_attempt(now, t, FailureKind::WorkerLost, why.to_string());
        }
        held
    }

    fn drain_worker(&mut self, now: Millis, worker: &WorkerId) -> Response {
        let Some(w) = self.workers.get_mut(worker) else {
            return Err(Rejection::WorkerNotFound { worker: worker.clone() });
        };
        match w.status {
            WorkerStatus::Alive => {
                w.status = WorkerStatus::Draining { since: now };
                self.touch(RecordKey::Worker(worker.clone()));
            }
            WorkerStatus::Draining { .. } => {}
            WorkerStatus::Dead { .. } => {
                return Err(Rejection::WorkerUnavailable {
                    worker: worker.clone(),
                    status: "dead".into(),
                    reason: "a dead worker cannot be drained".into(),
                })
            }
        }
        Ok(Output::WorkerUpdated { requeued: Vec::new() })
    }

    fn end_worker(
        &mut self,
        now: Millis,
        worker: &WorkerId,
        session: u64,
        reason: DeathReason,
    ) -> Response {
        let Some(w) = self.workers.get(worker) else {
            return Err(Rejection::WorkerNotFound { worker: worker.clone() });
        };
        if w.session != session {
            return Err(Rejection::WorkerUnavailable {
                worker: worker.clone(),
                status: w.status.as_str().into(),
                reason: format!("session {session} is not the current session {}", w.session),
            });
        }
        if !w.status.is_live() {
            // Already gone (expired, or left): the goal of either command is met.
            return Ok(Output::WorkerUpdated { requeued: Vec::new() });
        }
        let why = match reason {
            DeathReason::Expired => "worker missed its heartbeats",
            DeathReason::Left => "worker left",
        };
        let requeued = self.take_back(now, worker, why);
        let w = self.workers.get_mut(worker).expect("worker");
        w.status = WorkerStatus::Dead { at: now, reason };
        self.idx.loads.remove(worker);
        self.idx.dead_workers.insert((now, worker.clone()));
        self.touch(RecordKey::Worker(worker.clone()));
        Ok(Output::WorkerUpdated { requeued })
    }

    fn assign(&mut self, now: Millis, assignments: &[Assignment]) -> Output {
        let out = assignments.iter().map(|a| self.assign_one(now, a)).collect();
        Output::Assigned(out)
    }

    fn assign_one(&mut self, now: Millis, a: &Assignment) -> Result<Fence, Rejection> {
        let task = self.tasks.get(&a.task).ok_or(Rejection::TaskNotFound { task: a.task })?;
        if !matches!(task.state, TaskState::Queued { .. }) {
            return Err(Rejection::InvalidState {
                task: a.task,
                state: task.state.kind(),
                reason: "only a queued task can be assigned".into(),
            });
        }
        let worker = self
            .workers
            .get(&a.worker)
            .ok_or(Rejection::WorkerNotFound { worker: a.worker.clone() })?;
        if worker.status != WorkerStatus::Alive {
            return Err(Rejection::WorkerUnavailable {
                worker: a.worker.clone(),
                status: worker.status.as_str().into(),
                reason: "it takes no new tasks".into(),
            });
        }
        let load = &self.idx.loads[&a.worker];
        if let Some(reason) = misfit(&task.spec, &worker.spec, load) {
            return Err(Rejection::DoesNotFit { task: a.task, worker: a.worker.clone(), reason });
        }
        let fence = Fence(self.meta.next_fence);
        self.meta.next_fence += 1;
        self.touch(RecordKey::Meta);
        let task = self.tasks.get_mut(&a.task).expect("task");
        task.attempt += 1;
        task.last_fence = fence;
        let deadline = task.spec.timeout_ms.map(|t| now.saturating_add(t));
        self.transition(
            now,
            a.task,
            TaskState::Assigned { worker: a.worker.clone(), fence, at: now, deadline },
        );
        Ok(fence)
    }

    fn report(&mut self, now: Millis, worker: &WorkerId, reports: &[Report]) -> Output {
        Output::Reported(reports.iter().map(|r| self.report_one(now, worker, r)).collect())
    }

    fn report_one(
        &mut self,
        now: Millis,
        reporter: &WorkerId,
        r: &Report,
    ) -> Result<ReportOutcome, Rejection> {
        let task = self.tasks.get(&r.task).ok_or(Rejection::TaskNotFound { task: r.task })?;
        if let ReportKind::Succeeded { result } = &r.outcome {
            if result.len() > HARD.max_result_bytes {
                return Err(Rejection::limit(
                    "result",
                    HARD.max_result_bytes as u64,
                    result.len() as u64,
                ));
            }
        }
        let kind = task.state.kind();
        let Some((holder, fence)) = task.state.holder().map(|(w, f)| (w.clone(), f)) else {
            // Not in progress: accept only an exact repeat of what was accepted before.
            let repeat = match (&task.state, &r.outcome) {
                (
                    TaskState::Succeeded { worker, fence, .. },
                    ReportKind::Succeeded { .. } | ReportKind::Started,
                ) => *fence == r.fence && worker == reporter,
                (_, ReportKind::Failed { .. }) => task
                    .last_failure
                    .as_ref()
                    .is_some_and(|f| f.fence == r.fence && f.worker == *reporter),
                _ => false,
            };
            if repeat {
                return Ok(ReportOutcome::Duplicate(kind));
            }
            if r.fence != task.last_fence {
                // An older attempt (or a made-up token): stale, whatever happened since.
                return Err(Rejection::StaleFence { task: r.task, current: None, given: r.fence });
            }
            if kind.is_terminal() {
                return Err(Rejection::InvalidState {
                    task: r.task,
                    state: kind,
                    reason: "the task has finished; the report is not accepted".into(),
                });
            }
            return Err(Rejection::StaleFence { task: r.task, current: None, given: r.fence });
        };
        if r.fence != fence {
            return Err(Rejection::StaleFence {
                task: r.task,
                current: Some(fence),
                given: r.fence,
            });
        }
        if holder != *reporter {
            return Err(Rejection::WrongWorker {
                task: r.task,
                holder: Some(holder),
                given: reporter.clone(),
            });
        }
        match &r.outcome {
            ReportKind::Started => {
                let TaskState::Assigned { worker, fence, at, deadline } = task.state.clone() else {
                    return Ok(ReportOutcome::Duplicate(kind));
                };
                self.transition(
                    now,
                    r.task,
                    TaskState::Running {
                        worker,
                        fence,
                        assigned_at: at,
                        started_at: now,
                        deadline,
                    },
                );
            }
            ReportKind::Succeeded { result } => {
                let started_at = match &task.state {
                    TaskState::Running { started_at, .. } => *started_at,
                    TaskState::Assigned { at, .. } => *at,
                    _ => now,
                };
                self.transition_by(
                    now,
                    r.task,
                    TaskState::Succeeded {
                        at: now,
                        started_at,
                        worker: holder,
                        fence,
                        result: result.clone(),
                    },
                    true,
                );
            }
            ReportKind::Failed { message, retryable } => {
                let kind = if *retryable { FailureKind::Error } else { FailureKind::Fatal };
                self.fail_attempt(now, r.task, kind, message.clone());
            }
        }
        Ok(ReportOutcome::Accepted(self.tasks[&r.task].state.kind()))
    }

    fn advance_time(&mut self, now: Millis) -> Output {
        let mut timed_out = 0;
        while let Some(&(t, id)) = self.idx.deadlines.first() {
            if t > now {
                break;
            }
            let timeout = self.tasks[&id].spec.timeout_ms.unwrap_or(0);
            self.fail_attempt(
                now,
                id,
                FailureKind::Timeout,
                format!("attempt exceeded its {timeout} ms timeout"),
            );
            timed_out += 1;
        }
        let mut promoted = 0;
        while let Some(&(t, id)) = self.idx.delayed.first() {
            if t > now {
                break;
            }
            self.transition(now, id, TaskState::Queued { since: now });
            promoted += 1;
        }
        Output::Advanced { promoted, timed_out }
    }

    fn purge(&mut self, before: Millis, limit: u32) -> Output {
        let mut tasks = 0;
        while tasks < limit {
            let Some(&(at, id)) = self.idx.finished.first() else { break };
            if at >= before {
                break;
            }
            self.idx.finished.remove(&(at, id));
            let task = self.tasks.remove(&id).expect("finished task exists");
            self.idx.counts[task.state.kind().index()] -= 1;
            if let Some(k) = &task.spec.idempotency_key {
                self.idx.by_key.remove(k);
            }
            self.touch(RecordKey::of_task(id));
            tasks += 1;
        }
        let mut workers = 0;
        while let Some((at, id)) = self.idx.dead_workers.first().cloned() {
            if at >= before {
                break;
            }
            self.idx.dead_workers.remove(&(at, id.clone()));
            self.workers.remove(&id);
            self.touch(RecordKey::Worker(id));
            workers += 1;
        }
        Output::Purged { tasks, workers }
    }
}

/// Why `spec` cannot go on a worker with this description and load right now (queue, labels,
/// slots, resources), or `None` if it fits.
pub(crate) fn misfit(spec: &TaskSpec, worker: &WorkerSpec, load: &Load) -> Option<String> {
    if !worker.queues.contains(&spec.queue) {
        return Some(format!("worker does not serve queue {:?}", spec.queue));
    }
    if let Some(l) = missing_label(&spec.labels, &worker.labels) {
        return Some(format!("worker lacks label {l}"));
    }
    if load.tasks.len() as u64 >= worker.slots as u64 {
        return Some(format!("all {} slots are taken", worker.slots));
    }
    let free = worker.capacity.minus(&load.used);
    spec.resources
        .shortfall(&free)
        .map(|(res, need, have)| format!("needs {need} {res}, {have} free"))
}

/// The first required label the worker does not carry, as `k=v`.
pub(crate) fn missing_label(
    required: &BTreeMap<String, String>,
    offered: &BTreeMap<String, String>,
) -> Option<String> {
    required.iter().find(|(k, v)| offered.get(*k) != Some(*v)).map(|(k, v)| format!("{k}={v}"))
}
