//! Applying task commands: submit and cancel, and the one way a task's state changes.
//!
//! [`SchedulerState::transition`] unindexes the old state, indexes the new one, records the
//! changed record and the event, and settles dependents of a terminal task (success releases
//! them, any other end fails them transitively). Submit checks a whole batch before mutating
//! anything, so a rejected batch leaves the state untouched.

use super::{SchedulerState, TaskEvent};
use crate::command::{CancelOutcome, DepRef, NewTask, Output, Response, Submitted};
use crate::error::Rejection;
use crate::model::{
    AttemptFailure, FailureKind, Fence, Millis, Task, TaskId, TaskSpec, TaskState, TaskStateKind,
};
use crate::record::RecordKey;
use crate::validate::{self, HARD};

impl SchedulerState {
    pub(super) fn submit(&mut self, now: Millis, batch: &[NewTask]) -> Response {
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
    pub(super) fn check_same_body(
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

    pub(super) fn create_task(
        &mut self,
        now: Millis,
        id: TaskId,
        spec: TaskSpec,
        deps: Vec<TaskId>,
    ) {
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
                attempt_base: 0,
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
    pub(super) fn transition(&mut self, now: Millis, id: TaskId, new: TaskState) {
        self.transition_by(now, id, new, false);
    }

    /// [`Self::transition`]; `by_holder` marks a change the holding worker caused itself (its
    /// completion or failure report), which it need not be told to stop.
    pub(super) fn transition_by(
        &mut self,
        now: Millis,
        id: TaskId,
        new: TaskState,
        by_holder: bool,
    ) {
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

    /// A dependency succeeded: waiting dependents with nothing else unmet become ready.
    pub(super) fn release_dependents(&mut self, now: Millis, dep: TaskId) {
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
    pub(super) fn fail_dependents(&mut self, now: Millis, dep: TaskId) {
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
    pub(super) fn fail_attempt(
        &mut self,
        now: Millis,
        id: TaskId,
        kind: FailureKind,
        message: String,
    ) {
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
        let run = task.attempts_in_run();
        let next = if retryable && run < task.spec.retry.max_attempts {
            let delay = if kind == FailureKind::WorkerLost {
                0
            } else {
                task.spec.retry.backoff_after(id, run)
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

    pub(super) fn cancel(&mut self, now: Millis, ids: &[TaskId], reason: &str) -> Output {
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
}
