//! Applying the operator's lifecycle commands: retry a finished task (alone or with the failed
//! subtree of its dependents), undrain or remove a worker, pause or resume a queue.
//!
//! # Retry
//! A retry starts a new *run* of a task that ended Failed, Cancelled or UpstreamFailed. The
//! task keeps its id, its attempt counter and its last failure; the next assignment is attempt
//! `attempt + 1` with a fencing token from the global counter, so tokens stay strictly
//! increasing and a report from any earlier attempt is stale. `attempt_base` records where the
//! run began, so the retry policy (max attempts, backoff) counts only this run's attempts.
//!
//! A retried task goes back to Waiting when a dependency has not succeeded yet, else to Queued
//! (Delayed while `not_before` lies ahead). A dependency that itself ended without success
//! would only fail it again, so that retry is refused, naming the dependency.
//!
//! With dependents, the re-run set is the retried task plus every transitive dependent that
//! ended Failed or UpstreamFailed, less (to a fixpoint) those that also depend on a task that
//! ended without success and is not re-run: those would fail again at once. Cancelled
//! dependents were stopped by someone on purpose and stay cancelled. Members are moved in
//! dependency order, so each dependent waits on the re-run tasks it depends on and none can be
//! assigned before they succeed again. Finding dependents that are no longer waiting takes one
//! pass over all tasks (the dependents index only holds waiting tasks).
//!
//! # Queues
//! A paused queue is a record of its own. The planner skips its ready tasks and apply refuses
//! an assignment of one (the leader may have planned it before the pause was applied), so no
//! task of a paused queue starts an attempt after the pause; attempts already made carry on.

use std::collections::{BTreeMap, BTreeSet};

use super::SchedulerState;
use crate::command::{Output, Response};
use crate::error::Rejection;
use crate::model::{Millis, PausedQueue, TaskId, TaskState, TaskStateKind, WorkerId, WorkerStatus};
use crate::record::RecordKey;
use crate::validate::{self, HARD};

/// Most queues that can be paused at once (a bound on the state an admin can create).
pub const MAX_PAUSED_QUEUES: usize = 1_024;

/// Failed, Cancelled or UpstreamFailed: ended without success.
fn ended_badly(kind: TaskStateKind) -> bool {
    matches!(kind, TaskStateKind::Failed | TaskStateKind::Cancelled | TaskStateKind::UpstreamFailed)
}

impl SchedulerState {
    pub(super) fn retry_task(
        &mut self,
        now: Millis,
        id: TaskId,
        with_dependents: bool,
    ) -> Response {
        let task = self.tasks.get(&id).ok_or(Rejection::TaskNotFound { task: id })?;
        let kind = task.state.kind();
        if !ended_badly(kind) {
            let reason = if kind == TaskStateKind::Succeeded {
                "a succeeded task is not run again; submit a new task instead".to_string()
            } else {
                "only a failed, cancelled or upstream-failed task can be retried; this one has \
                 not finished (cancel it first to run it anew)"
                    .to_string()
            };
            return Err(Rejection::InvalidState { task: id, state: kind, reason });
        }
        let only_root = BTreeSet::from([id]);
        if let Some((dep, dep_kind)) = self.failed_dep_outside(id, &only_root) {
            return Err(Rejection::InvalidState {
                task: id,
                state: kind,
                reason: format!(
                    "its dependency {dep} is {dep_kind} and would fail it again; retry task \
                     {dep} with its dependents instead"
                ),
            });
        }
        let rerun = if with_dependents { self.rerun_set(id) } else { only_root };

        // Dependency order within the set (Kahn): a member moves after the members it needs.
        let mut needs: BTreeMap<TaskId, usize> = BTreeMap::new();
        let mut feeds: BTreeMap<TaskId, Vec<TaskId>> = BTreeMap::new();
        for &t in &rerun {
            let deps: Vec<TaskId> =
                self.tasks[&t].deps.iter().copied().filter(|d| rerun.contains(d)).collect();
            needs.insert(t, deps.len());
            for d in deps {
                feeds.entry(d).or_default().push(t);
            }
        }
        let mut ready: Vec<TaskId> =
            needs.iter().filter(|(_, n)| **n == 0).map(|(t, _)| *t).rev().collect();
        while let Some(t) = ready.pop() {
            self.restart(now, t);
            for f in feeds.remove(&t).unwrap_or_default() {
                let n = needs.get_mut(&f).expect("member");
                *n -= 1;
                if *n == 0 {
                    ready.push(f);
                }
            }
        }
        let states = std::iter::once(id)
            .chain(rerun.iter().copied().filter(|t| *t != id))
            .map(|t| (t, self.tasks[&t].state.kind()))
            .collect();
        Ok(Output::Retried(states))
    }

    /// A dependency of `id` that ended without success and is not in `rerun`.
    fn failed_dep_outside(
        &self,
        id: TaskId,
        rerun: &BTreeSet<TaskId>,
    ) -> Option<(TaskId, TaskStateKind)> {
        self.tasks[&id].deps.iter().find_map(|d| {
            let k = self.tasks.get(d)?.state.kind();
            (ended_badly(k) && !rerun.contains(d)).then_some((*d, k))
        })
    }

    /// `root` and the dependents that a retry with dependents runs again (see module docs).
    fn rerun_set(&self, root: TaskId) -> BTreeSet<TaskId> {
        let mut rev: BTreeMap<TaskId, Vec<TaskId>> = BTreeMap::new();
        for t in self.tasks.values() {
            if matches!(t.state.kind(), TaskStateKind::Failed | TaskStateKind::UpstreamFailed) {
                for d in &t.deps {
                    rev.entry(*d).or_default().push(t.id);
                }
            }
        }
        let mut set = BTreeSet::from([root]);
        let mut work = vec![root];
        while let Some(x) = work.pop() {
            for &c in rev.get(&x).into_iter().flatten() {
                if set.insert(c) {
                    work.push(c);
                }
            }
        }
        loop {
            let drop: Vec<TaskId> = set
                .iter()
                .copied()
                .filter(|&t| t != root && self.failed_dep_outside(t, &set).is_some())
                .collect();
            if drop.is_empty() {
                return set;
            }
            for t in drop {
                set.remove(&t);
            }
        }
    }

    /// Move one finished task into a new run: Waiting on its unmet dependencies, or ready.
    fn restart(&mut self, now: Millis, id: TaskId) {
        let unmet = self.unmet_deps(&self.tasks[&id]);
        let task = self.tasks.get_mut(&id).expect("restarting a known task");
        task.attempt_base = task.attempt;
        let state = if unmet.is_empty() {
            Self::ready_state(now, &task.spec)
        } else {
            self.idx.unmet.insert(id, unmet.len() as u32);
            for d in unmet {
                // An entry left from an earlier wait (the task was cancelled while waiting) is
                // valid again; a second one would be counted twice on release.
                let v = self.idx.dependents.entry(d).or_default();
                if !v.contains(&id) {
                    v.push(id);
                }
            }
            TaskState::Waiting
        };
        self.transition(now, id, state);
    }

    pub(super) fn undrain_worker(&mut self, worker: &WorkerId) -> Response {
        let Some(w) = self.workers.get_mut(worker) else {
            return Err(Rejection::WorkerNotFound { worker: worker.clone() });
        };
        match w.status {
            WorkerStatus::Draining { .. } => {
                w.status = WorkerStatus::Alive;
                self.touch(RecordKey::Worker(worker.clone()));
            }
            WorkerStatus::Alive => {}
            WorkerStatus::Dead { .. } => {
                return Err(Rejection::WorkerUnavailable {
                    worker: worker.clone(),
                    status: "dead".into(),
                    reason: "a dead worker cannot be undrained; it takes tasks again once its \
                             process registers"
                        .into(),
                })
            }
        }
        Ok(Output::WorkerUpdated { requeued: Vec::new() })
    }

    pub(super) fn remove_worker(&mut self, worker: &WorkerId) -> Response {
        let Some(w) = self.workers.get(worker) else {
            return Err(Rejection::WorkerNotFound { worker: worker.clone() });
        };
        let WorkerStatus::Dead { at, .. } = w.status else {
            return Err(Rejection::WorkerUnavailable {
                worker: worker.clone(),
                status: w.status.as_str().into(),
                reason: "only a dead worker's record can be removed; stop the worker process \
                         (it deregisters) or wait until its heartbeats expire, then remove it"
                    .into(),
            });
        };
        self.idx.dead_workers.remove(&(at, worker.clone()));
        self.workers.remove(worker);
        self.touch(RecordKey::Worker(worker.clone()));
        Ok(Output::WorkerRemoved)
    }

    pub(super) fn pause_queue(&mut self, now: Millis, queue: &str) -> Response {
        validate::ident("queue", queue, &HARD)?;
        if let Some(q) = self.paused.get(queue) {
            return Ok(Output::QueueUpdated { paused_since: Some(q.since), changed: false });
        }
        if self.paused.len() >= MAX_PAUSED_QUEUES {
            return Err(Rejection::limit(
                "paused queues",
                MAX_PAUSED_QUEUES as u64,
                self.paused.len() as u64 + 1,
            ));
        }
        self.paused.insert(queue.to_string(), PausedQueue { queue: queue.to_string(), since: now });
        self.touch(RecordKey::Queue(queue.to_string()));
        Ok(Output::QueueUpdated { paused_since: Some(now), changed: true })
    }

    pub(super) fn resume_queue(&mut self, queue: &str) -> Response {
        validate::ident("queue", queue, &HARD)?;
        let changed = self.paused.remove(queue).is_some();
        if changed {
            self.touch(RecordKey::Queue(queue.to_string()));
        }
        Ok(Output::QueueUpdated { paused_since: None, changed })
    }
}
