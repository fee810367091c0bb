//! Explain: why a task is where it is, in terms a user can act on.
//!
//! For a queued task this inspects the live workers the way the planner does and names the
//! first obstacle: nobody serves the queue, nobody carries a required label, no worker is big
//! enough, or every eligible worker is busy (with the resource that is short).

use std::cmp::Reverse;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{
    AttemptFailure, Fence, Millis, TaskId, TaskState, TaskStateKind, WorkerId, WorkerStatus,
};
use crate::state::{missing_label, SchedulerState};

/// Why a task is in its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Explanation {
    /// Waiting on dependencies that have not succeeded.
    Waiting {
        /// The unmet dependencies.
        on: Vec<TaskId>,
    },
    /// Ready, not yet placed.
    Queued {
        /// When it became ready.
        since: Millis,
        /// Ready tasks in the same queue that go first (higher priority, or same and older).
        ahead: u64,
        /// What keeps it from being placed, if anything beyond its turn.
        blocker: Option<Blocker>,
    },
    /// Not eligible before `until`.
    Delayed {
        /// When it becomes Queued.
        until: Millis,
        /// The failure it is backing off from (`None`: it was submitted with `not_before`).
        after_failure: Option<AttemptFailure>,
    },
    /// Placed, start not confirmed yet.
    Assigned {
        /// The worker.
        worker: WorkerId,
        /// Attempt number.
        attempt: u32,
        /// Fencing token.
        fence: Fence,
        /// When.
        at: Millis,
        /// Attempt deadline.
        deadline: Option<Millis>,
    },
    /// Running on a worker.
    Running {
        /// The worker.
        worker: WorkerId,
        /// Attempt number.
        attempt: u32,
        /// Fencing token.
        fence: Fence,
        /// When it started.
        started_at: Millis,
        /// Attempt deadline.
        deadline: Option<Millis>,
    },
    /// Finished.
    Finished {
        /// The terminal state.
        state: TaskStateKind,
        /// When.
        at: Millis,
        /// What ended it.
        detail: String,
    },
}

/// What keeps a queued task from being placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Blocker {
    /// An operator paused the task's queue.
    QueuePaused {
        /// The queue.
        queue: String,
        /// When it was paused (log time).
        since: Millis,
    },
    /// No alive worker subscribes to the queue.
    NoWorkerForQueue {
        /// The queue.
        queue: String,
    },
    /// Workers serve the queue, but none carries this label.
    MissingLabel {
        /// The queue.
        queue: String,
        /// `key=value`.
        label: String,
    },
    /// No eligible worker is big enough even when idle.
    TooLarge {
        /// The resource.
        resource: String,
        /// What the task needs.
        need: u64,
        /// The largest capacity among eligible workers.
        largest: u64,
    },
    /// A worker has room, but the planner holds it back for a larger task that goes first
    /// (a reservation against starvation) and no other worker has room.
    Reserved {
        /// The worker held back.
        worker: WorkerId,
        /// The task it is held for.
        for_task: TaskId,
    },
    /// Eligible workers exist, but none has room now.
    Busy {
        /// Eligible workers.
        eligible: u32,
        /// The first short resource on the roomiest worker (`None`: all slots are taken).
        short: Option<(String, u64, u64)>,
    },
}

/// An amount in the unit users write it in: millicores for cpu, MiB for memory.
fn amount(resource: &str, n: u64) -> String {
    match resource {
        "cpu" => format!("{n}m"),
        "memory" => format!("{n}MiB"),
        _ => n.to_string(),
    }
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocker::QueuePaused { queue, .. } => write!(
                f,
                "queue {queue:?} is paused; nothing of it is placed until `schedctl queue resume {queue}`"
            ),
            Blocker::NoWorkerForQueue { queue } => {
                write!(f, "no alive worker serves queue {queue:?}; start one with --queue {queue}")
            }
            Blocker::MissingLabel { queue, label } => {
                write!(f, "no alive worker on queue {queue:?} has label {label}")
            }
            Blocker::TooLarge { resource, need, largest } => write!(
                f,
                "needs {} {resource} but the largest eligible worker offers {}",
                amount(resource, *need),
                amount(resource, *largest)
            ),
            Blocker::Reserved { worker, for_task } => write!(
                f,
                "worker {worker} has room but is held back for task {for_task}, a larger task \
                 that goes first (so that large tasks are not starved); this one is placed when \
                 another worker has room or task {for_task} has started"
            ),
            Blocker::Busy { eligible, short: None } => {
                write!(f, "all slots of the {eligible} eligible workers are taken")
            }
            Blocker::Busy { eligible, short: Some((r, need, free)) } => write!(
                f,
                "the {eligible} eligible workers are busy: needs {} {r}, at most {} free",
                amount(r, *need),
                amount(r, *free)
            ),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Explanation::Waiting { on } => {
                let ids: Vec<String> = on.iter().map(|t| t.to_string()).collect();
                write!(f, "waiting on dependencies {}", ids.join(", "))
            }
            Explanation::Queued { ahead, blocker: Some(b), .. } => {
                write!(f, "queued ({ahead} ahead): {b}")
            }
            Explanation::Queued { ahead, blocker: None, .. } => {
                write!(f, "queued ({ahead} ahead): a worker has room; it will be placed in turn")
            }
            // The time itself is a separate field (`until`): only a client knows the reader's
            // clock and time zone to print it in.
            Explanation::Delayed { after_failure: Some(fl), .. } => write!(
                f,
                "backing off after attempt {} failed ({}: {})",
                fl.attempt, fl.kind, fl.message
            ),
            Explanation::Delayed { after_failure: None, .. } => {
                write!(f, "delayed: submitted to run no earlier than a given time")
            }
            // The sentence leaves the fencing token out: it is a credential of the holder,
            // shown only in the structured field to callers allowed to see it.
            Explanation::Assigned { worker, attempt, .. } => write!(
                f,
                "assigned to worker {worker} (attempt {attempt}); waiting for it to start"
            ),
            Explanation::Running { worker, attempt, .. } => {
                write!(f, "running on worker {worker} (attempt {attempt})")
            }
            Explanation::Finished { state, detail, .. } => write!(f, "{state}: {detail}"),
        }
    }
}

impl SchedulerState {
    /// Why `id` is where it is; `None` if there is no such task.
    pub fn explain(&self, id: TaskId) -> Option<Explanation> {
        let task = self.task(id)?;
        Some(match &task.state {
            TaskState::Waiting => Explanation::Waiting { on: self.unmet_deps(task) },
            TaskState::Queued { since } => {
                let key = (Reverse(task.spec.priority), id);
                let ahead = self
                    .idx
                    .buckets
                    .values()
                    .filter(|b| b.shape.queue == task.spec.queue)
                    .map(|b| b.tasks.range(..key).count() as u64)
                    .sum();
                Explanation::Queued { since: *since, ahead, blocker: self.blocker(id) }
            }
            TaskState::Delayed { until } => Explanation::Delayed {
                until: *until,
                after_failure: task
                    .last_failure
                    .as_deref()
                    .cloned()
                    .filter(|f| f.attempt == task.attempt && task.attempt > 0),
            },
            TaskState::Assigned { worker, fence, at, deadline } => Explanation::Assigned {
                worker: worker.clone(),
                attempt: task.attempt,
                fence: *fence,
                at: *at,
                deadline: *deadline,
            },
            TaskState::Running { worker, fence, started_at, deadline, .. } => {
                Explanation::Running {
                    worker: worker.clone(),
                    attempt: task.attempt,
                    fence: *fence,
                    started_at: *started_at,
                    deadline: *deadline,
                }
            }
            TaskState::Succeeded { at, worker, .. } => Explanation::Finished {
                state: TaskStateKind::Succeeded,
                at: *at,
                detail: format!("completed by worker {worker} (attempt {})", task.attempt),
            },
            TaskState::Failed { at } => Explanation::Finished {
                state: TaskStateKind::Failed,
                at: *at,
                detail: match &task.last_failure {
                    Some(f) => format!(
                        "attempt {} of {} on worker {} ended by {}: {}",
                        f.attempt,
                        task.attempt_base + task.spec.retry.max_attempts,
                        f.worker,
                        f.kind,
                        f.message
                    ),
                    None => "failed".into(),
                },
            },
            TaskState::Cancelled { at, reason } => Explanation::Finished {
                state: TaskStateKind::Cancelled,
                at: *at,
                detail: if reason.is_empty() { "no reason given".into() } else { reason.clone() },
            },
            TaskState::UpstreamFailed { at, upstream } => Explanation::Finished {
                state: TaskStateKind::UpstreamFailed,
                at: *at,
                detail: format!("dependency {upstream} did not succeed"),
            },
        })
    }

    /// The first obstacle to placing a queued task right now (see module docs).
    fn blocker(&self, id: TaskId) -> Option<Blocker> {
        let spec = &self.task(id)?.spec;
        if let Some(q) = self.paused.get(&spec.queue) {
            return Some(Blocker::QueuePaused { queue: q.queue.clone(), since: q.since });
        }
        let on_queue: Vec<_> = self
            .workers
            .values()
            .filter(|w| w.status == WorkerStatus::Alive && w.spec.queues.contains(&spec.queue))
            .collect();
        if on_queue.is_empty() {
            return Some(Blocker::NoWorkerForQueue { queue: spec.queue.clone() });
        }
        let eligible: Vec<_> = on_queue
            .iter()
            .filter(|w| missing_label(&spec.labels, &w.spec.labels).is_none())
            .collect();
        if eligible.is_empty() {
            let label = missing_label(&spec.labels, &on_queue[0].spec.labels).unwrap_or_default();
            return Some(Blocker::MissingLabel { queue: spec.queue.clone(), label });
        }
        if !eligible.iter().any(|w| spec.resources.fits_in(&w.spec.capacity)) {
            // Name the resource that the best-fitting worker lacks.
            let (resource, need, _) = spec.resources.shortfall(&eligible[0].spec.capacity)?;
            let largest = eligible
                .iter()
                .map(|w| match resource.as_str() {
                    "cpu" => w.spec.capacity.cpu_milli,
                    "memory" => w.spec.capacity.memory_mib,
                    r => w.spec.capacity.named.get(r).copied().unwrap_or(0),
                })
                .max()
                .unwrap_or(0);
            return Some(Blocker::TooLarge { resource, need, largest });
        }
        let mut short = None;
        let mut any_slot = false;
        let mut roomy: Vec<&WorkerId> = Vec::new();
        for w in &eligible {
            let load = self.idx.loads.get(&w.spec.id);
            let used = load.map_or(0, |l| l.tasks.len() as u64);
            if used >= w.spec.slots as u64 {
                continue;
            }
            any_slot = true;
            let free =
                load.map_or_else(|| w.spec.capacity.clone(), |l| w.spec.capacity.minus(&l.used));
            match spec.resources.shortfall(&free) {
                None => roomy.push(&w.spec.id),
                Some(s) => {
                    if short.as_ref().is_none_or(|(_, _, f): &(String, u64, u64)| s.2 > *f) {
                        short = Some(s);
                    }
                }
            }
        }
        if !roomy.is_empty() {
            return self.reserved_blocker(id, &roomy);
        }
        Some(Blocker::Busy {
            eligible: eligible.len() as u32,
            short: if any_slot { short } else { None },
        })
    }

    /// Workers have room for `id`; the planner may still hold every one of them back for
    /// larger tasks. Asks the planner itself, so explain and placement cannot disagree.
    fn reserved_blocker(&self, id: TaskId, roomy: &[&WorkerId]) -> Option<Blocker> {
        let plan = crate::planner::plan(self, &crate::planner::PlanPolicy::default());
        if plan.assignments.iter().any(|a| a.task == id) {
            return None;
        }
        let held: Vec<_> =
            plan.reservations.iter().filter(|r| roomy.contains(&&r.worker)).collect();
        // Held back only if every worker with room is reserved; otherwise it is just its turn.
        if held.len() < roomy.len() {
            return None;
        }
        held.first().map(|r| Blocker::Reserved { worker: r.worker.clone(), for_task: r.task })
    }
}
