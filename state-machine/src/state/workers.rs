//! Applying worker commands: register, drain, deregister/expire, assign and reports.
//!
//! Assignments are decisions made by the leader's planner and re-validated here against the
//! current state (fit, fencing, session); a stale one is rejected as a value, never applied.
//! Reports are fenced by the attempt's token, so a report from a revoked attempt cannot
//! change the task.

use super::{misfit, SchedulerState};
use crate::command::{Assignment, Output, Report, ReportKind, ReportOutcome, Response};
use crate::error::Rejection;
use crate::model::{
    DeathReason, FailureKind, Fence, Millis, TaskId, TaskState, Worker, WorkerId, WorkerSpec,
    WorkerStatus,
};
use crate::record::RecordKey;
use crate::validate::{self, HARD};

impl SchedulerState {
    pub(super) fn register_worker(
        &mut self,
        now: Millis,
        spec: &WorkerSpec,
        instance: u64,
        owner: &str,
    ) -> Response {
        validate::worker_spec(spec, &HARD)?;
        let id = spec.id.clone();
        if let Some(w) = self.workers.get(&id) {
            // Another token cannot take over (and requeue) a live worker's tasks. A worker
            // registered before authentication was on (no owner) is claimed by the first token.
            if w.status.is_live() && !w.owner.is_empty() && w.owner != owner {
                return Err(Rejection::WorkerOwned { worker: id });
            }
        }
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
                if w.spec != *spec || w.owner != owner {
                    let w = self.workers.get_mut(&id).expect("worker");
                    w.spec = spec.clone();
                    w.owner = owner.to_string();
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
                owner: owner.to_string(),
            },
        );
        self.idx.loads.entry(id.clone()).or_default();
        self.touch(RecordKey::Worker(id));
        Ok(Output::Registered { session, requeued })
    }

    /// Requeue (or fail) every task a worker holds, as a lost attempt.
    pub(super) fn take_back(&mut self, now: Millis, worker: &WorkerId, why: &str) -> Vec<TaskId> {
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

    pub(super) fn drain_worker(&mut self, now: Millis, worker: &WorkerId) -> Response {
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

    pub(super) fn end_worker(
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

    pub(super) fn assign(&mut self, now: Millis, assignments: &[Assignment]) -> Output {
        let out = assignments.iter().map(|a| self.assign_one(now, a)).collect();
        Output::Assigned(out)
    }

    pub(super) fn assign_one(&mut self, now: Millis, a: &Assignment) -> Result<Fence, Rejection> {
        let task = self.tasks.get(&a.task).ok_or(Rejection::TaskNotFound { task: a.task })?;
        if !matches!(task.state, TaskState::Queued { .. }) {
            return Err(Rejection::InvalidState {
                task: a.task,
                state: task.state.kind(),
                reason: "only a queued task can be assigned".into(),
            });
        }
        if self.paused.contains_key(&task.spec.queue) {
            // Planned before the pause was applied: the pause wins.
            return Err(Rejection::InvalidState {
                task: a.task,
                state: task.state.kind(),
                reason: format!("queue {:?} is paused", task.spec.queue),
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

    pub(super) fn report(&mut self, now: Millis, worker: &WorkerId, reports: &[Report]) -> Output {
        Output::Reported(reports.iter().map(|r| self.report_one(now, worker, r)).collect())
    }

    pub(super) fn report_one(
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
}
