//! The planner: a pure function from the replicated state to placement decisions.
//!
//! It runs only on the leader; its output becomes one [`Op::Assign`](crate::Op::Assign)
//! command, which every replica re-validates at apply. Because the log records the decisions,
//! a change of policy never changes how the log replays.
//!
//! # Policy
//! * **Strict priority, FIFO within a priority.** Ready tasks are considered best first
//!   (higher priority, then lower id) across all queues, so a worker serving several queues
//!   always gets the best task it can take.
//! * **Eligibility.** A worker can take a task when it is Alive (not draining), serves the
//!   task's queue, carries every required label, has a free slot and enough free cpu, memory
//!   and named resources. Tasks of a paused queue are not considered at all.
//! * **Spreading.** Among eligible workers the least loaded (fraction of slots in use) wins;
//!   ties go to the smaller worker id, so plans are deterministic.
//! * **No starvation of large tasks (reservation).** When the best remaining task of a shape
//!   fits on no worker *now*, but would fit on some eligible worker's *total* capacity, the
//!   planner reserves one such worker for it: the first by id that is not already reserved.
//!   A reserved worker receives nothing else this round, so it drains until the large task
//!   fits; since the choice depends only on ids and priority order, the same worker is
//!   reserved round after round. At most `max_reservations` workers are held back per round.
//!   A task that fits no eligible worker's total capacity is left alone (and `explain` says
//!   so) rather than holding capacity forever.
//!
//! # Cost
//! Tasks are grouped by *shape* (queue, labels, resources): tasks of one shape are
//! interchangeable, so when the best of a shape cannot be placed, the rest of the shape is
//! skipped in O(1). The work per round is O(shapes × workers) to compute eligibility plus
//! O(log n) per assignment made — it does not grow with the number of queued tasks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::iter::Peekable;

use crate::command::{Assignment, Report, ReportKind};
use crate::model::{Millis, Resources, TaskId, TaskState, WorkerId, WorkerStatus};
use crate::state::{missing_label, SchedulerState, Shape};

/// Knobs of one planning round.
#[derive(Clone, Debug)]
pub struct PlanPolicy {
    /// Upper bound on assignments per round (one log entry).
    pub max_assignments: usize,
    /// Upper bound on workers held back for large tasks per round.
    pub max_reservations: usize,
}

impl Default for PlanPolicy {
    fn default() -> Self {
        PlanPolicy { max_assignments: 4096, max_reservations: 16 }
    }
}

/// A worker held back for a task that does not fit anywhere yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The waiting task.
    pub task: TaskId,
    /// The worker kept free for it.
    pub worker: WorkerId,
}

/// The result of a round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Decisions, best task first.
    pub assignments: Vec<Assignment>,
    /// Workers held back this round.
    pub reservations: Vec<Reservation>,
}

struct WorkerView<'a> {
    id: &'a WorkerId,
    capacity: &'a Resources,
    free: Resources,
    slots: u64,
    used_slots: u64,
    reserved: bool,
}

impl WorkerView<'_> {
    fn load_key(&self) -> u64 {
        self.used_slots * 1_000_000 / self.slots.max(1)
    }
}

type ReadyKey = (Reverse<i32>, TaskId);

/// Walks one shape's ready tasks best first: the state's bucket merged with the tasks an
/// [`Overlay`] adds to that shape.
struct Cursor<'a> {
    shape: &'a Shape,
    base: Option<Peekable<std::collections::btree_set::Iter<'a, ReadyKey>>>,
    extra: Peekable<std::slice::Iter<'a, ReadyKey>>,
    /// Workers (indexes into the view) serving the queue with the labels; computed lazily.
    eligible: Option<Vec<usize>>,
}

impl Cursor<'_> {
    /// The next task, best first, and whether it comes from the overlay.
    fn next(&mut self) -> Option<(i32, TaskId, bool)> {
        let from_base = match (self.base.as_mut().and_then(|b| b.peek()), self.extra.peek()) {
            (None, None) => return None,
            (Some(b), Some(e)) => b < e,
            (b, _) => b.is_some(),
        };
        let (Reverse(p), id) =
            if from_base { self.base.as_mut().and_then(|b| b.next()) } else { self.extra.next() }?;
        Some((*p, *id, !from_base))
    }
}

/// Hypothetical changes to plan against without changing the state: tasks that would be
/// ready, and capacity that would be free.
#[derive(Default)]
struct Overlay<'a> {
    /// Extra ready tasks by shape, each list best first.
    ready: BTreeMap<Shape, Vec<ReadyKey>>,
    /// A worker, with the resources and slots it would release.
    freed: Option<(&'a WorkerId, Resources, u64)>,
}

/// Plan one round. Pure: the same state and policy always give the same plan.
pub fn plan(state: &SchedulerState, policy: &PlanPolicy) -> Plan {
    plan_with(state, policy, &Overlay::default())
}

/// Plan for the completions in `reports` before they are committed, so that the tasks they
/// release can be assigned in the same log entry as the completion instead of one commit
/// later (a dependent step then costs one commit, not two).
///
/// Returns the assignments of *released* tasks that [`plan`] would make on the state after
/// `Op::Report { worker, reports }` applied at time `now` (a property test checks exactly
/// that). Everything else is left to the regular planner round. Reports that cannot be
/// accepted free nothing; a `Failed` report anywhere in the list returns nothing, because a
/// failure may requeue its task and the overlay does not model that.
///
/// Proposing `[Report, Assign]` together is safe whatever happens in between: apply
/// re-validates every assignment, so a speculation made stale by an earlier entry is refused
/// and the task simply waits for the next round.
pub fn plan_after_reports(
    state: &SchedulerState,
    worker: &WorkerId,
    reports: &[Report],
    now: Millis,
    policy: &PlanPolicy,
) -> Vec<Assignment> {
    if reports.iter().any(|r| matches!(r.outcome, ReportKind::Failed { .. })) {
        return Vec::new();
    }
    let mut done: BTreeSet<TaskId> = BTreeSet::new();
    let mut freed = Resources::default();
    for r in reports {
        let ReportKind::Succeeded { .. } = r.outcome else { continue };
        let Some(task) = state.task(r.task) else { continue };
        if task.state.holder() == Some((worker, r.fence)) && done.insert(r.task) {
            freed.add(&task.spec.resources);
        }
    }
    // Waiting dependents whose last unmet dependencies are among `done`.
    let mut satisfied: BTreeMap<TaskId, u32> = BTreeMap::new();
    for t in &done {
        for d in state.idx.dependents.get(t).into_iter().flatten() {
            if state.idx.unmet.contains_key(d) {
                *satisfied.entry(*d).or_default() += 1;
            }
        }
    }
    let mut overlay = Overlay::default();
    for (d, n) in satisfied {
        let task = state.task(d).expect("indexed dependents exist");
        let ready = state.idx.unmet[&d] == n
            && matches!(SchedulerState::ready_state(now, &task.spec), TaskState::Queued { .. });
        if ready {
            let list = overlay.ready.entry(Shape::of(&task.spec)).or_default();
            list.push((Reverse(task.spec.priority), d));
        }
    }
    if overlay.ready.is_empty() {
        return Vec::new();
    }
    for list in overlay.ready.values_mut() {
        list.sort_unstable();
    }
    overlay.freed = Some((worker, freed, done.len() as u64));
    let mut p = plan_with(state, policy, &overlay);
    // The released tasks are the ones still Waiting in `state`.
    p.assignments.retain(|a| state.idx.unmet.contains_key(&a.task));
    p.assignments
}

/// [`plan`] on the state changed by `overlay`. With overlay tasks, the round stops once each
/// of them is placed or skipped: what comes after cannot involve them.
fn plan_with(state: &SchedulerState, policy: &PlanPolicy, overlay: &Overlay<'_>) -> Plan {
    let mut out = Plan::default();
    let mut workers: Vec<WorkerView> = Vec::new();
    for w in state.workers.values() {
        if w.status != WorkerStatus::Alive {
            continue;
        }
        let load = state.idx.loads.get(&w.spec.id);
        let mut free =
            load.map_or_else(|| w.spec.capacity.clone(), |l| w.spec.capacity.minus(&l.used));
        let mut used_slots = load.map_or(0, |l| l.tasks.len() as u64);
        if let Some((_, r, k)) = overlay.freed.as_ref().filter(|(id, _, _)| **id == w.spec.id) {
            free.add(r);
            used_slots = used_slots.saturating_sub(*k);
        }
        workers.push(WorkerView {
            id: &w.spec.id,
            capacity: &w.spec.capacity,
            free,
            slots: w.spec.slots as u64,
            used_slots,
            reserved: false,
        });
    }
    // Workers that can take something now, least loaded first.
    let mut open: BTreeSet<(u64, usize)> = workers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.used_slots < w.slots)
        .map(|(i, w)| (w.load_key(), i))
        .collect();

    // One cursor per shape: the state's buckets, each merged with the overlay's tasks of the
    // same shape, then the overlay's shapes that have no bucket yet.
    let mut cursors: Vec<Cursor> = Vec::new();
    let mut merged: BTreeSet<&Shape> = BTreeSet::new();
    let paused = |shape: &Shape| state.paused.contains_key(&shape.queue);
    for b in state.idx.buckets.values().filter(|b| !paused(&b.shape)) {
        let extra = overlay.ready.get(&b.shape).map_or(&[][..], |v| &v[..]);
        if !extra.is_empty() {
            merged.insert(&b.shape);
        }
        cursors.push(Cursor {
            shape: &b.shape,
            base: Some(b.tasks.iter().peekable()),
            extra: extra.iter().peekable(),
            eligible: None,
        });
    }
    for (shape, extra) in &overlay.ready {
        if !merged.contains(shape) && !paused(shape) {
            cursors.push(Cursor {
                shape,
                base: None,
                extra: extra.iter().peekable(),
                eligible: None,
            });
        }
    }
    // Max-heap on (priority, smaller id first).
    let mut heads: BinaryHeap<(i32, Reverse<TaskId>, usize, bool)> = BinaryHeap::new();
    for (c, cur) in cursors.iter_mut().enumerate() {
        if let Some((p, id, extra)) = cur.next() {
            heads.push((p, Reverse(id), c, extra));
        }
    }
    let mut extras_left: usize =
        overlay.ready.iter().filter(|(s, _)| !paused(s)).map(|(_, v)| v.len()).sum();
    let ahead = extras_left > 0;

    while out.assignments.len() < policy.max_assignments
        && !open.is_empty()
        && !(ahead && extras_left == 0)
    {
        let Some((_, Reverse(task), c, extra)) = heads.pop() else { break };
        let cur = &mut cursors[c];
        let shape = cur.shape;
        let eligible = cur.eligible.get_or_insert_with(|| {
            state
                .workers
                .values()
                .filter(|w| w.status == WorkerStatus::Alive)
                .enumerate()
                .filter(|(_, w)| {
                    w.spec.queues.contains(&shape.queue)
                        && missing_label(&shape.labels, &w.spec.labels).is_none()
                })
                .map(|(i, _)| i)
                .collect()
        });
        if eligible.is_empty() {
            // No worker serves this shape: skip the whole shape.
            extras_left -= usize::from(extra) + cur.extra.len();
            continue;
        }
        let need = &shape.resources;
        let fits_now =
            |w: &WorkerView| !w.reserved && w.used_slots < w.slots && need.fits_in(&w.free);
        // Scan the smaller of: the eligible list, or the open set in load order.
        let chosen = if eligible.len() * 4 < open.len() {
            eligible
                .iter()
                .copied()
                .filter(|&i| fits_now(&workers[i]))
                .min_by_key(|&i| (workers[i].load_key(), i))
        } else {
            let elig_set: Option<BTreeSet<usize>> =
                (eligible.len() < workers.len()).then(|| eligible.iter().copied().collect());
            open.iter().map(|&(_, i)| i).find(|&i| {
                elig_set.as_ref().is_none_or(|s| s.contains(&i)) && fits_now(&workers[i])
            })
        };
        match chosen {
            Some(i) => {
                let w = &mut workers[i];
                open.remove(&(w.load_key(), i));
                w.free.sub(need);
                w.used_slots += 1;
                if w.used_slots < w.slots {
                    open.insert((w.load_key(), i));
                }
                out.assignments.push(Assignment { task, worker: w.id.clone() });
                extras_left -= usize::from(extra);
                if let Some((p, id, extra)) = cur.next() {
                    heads.push((p, Reverse(id), c, extra));
                }
            }
            None => {
                // The rest of this shape is skipped too.
                extras_left -= usize::from(extra) + cur.extra.len();
                // Nothing of this shape fits now. Hold a worker back if one could ever fit it.
                if out.reservations.len() < policy.max_reservations {
                    if let Some(&i) = eligible
                        .iter()
                        .find(|&&i| !workers[i].reserved && need.fits_in(workers[i].capacity))
                    {
                        let w = &mut workers[i];
                        w.reserved = true;
                        open.remove(&(w.load_key(), i));
                        out.reservations.push(Reservation { task, worker: w.id.clone() });
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::command::{Command, NewTask, Op, Output};
    use crate::model::{Fence, TaskSpec, WorkerSpec};

    fn state_with_workers(workers: &[(&str, u64, u32)]) -> SchedulerState {
        let mut s = SchedulerState::new();
        for (id, cpu, slots) in workers {
            let spec = WorkerSpec {
                id: WorkerId(id.to_string()),
                queues: vec!["default".into()],
                labels: BTreeMap::new(),
                capacity: Resources {
                    cpu_milli: *cpu,
                    memory_mib: 1 << 20,
                    named: BTreeMap::new(),
                },
                slots: *slots,
            };
            s.apply(&Command::new(1, Op::RegisterWorker { spec, instance: 1 })).unwrap();
        }
        s
    }

    fn submit(s: &mut SchedulerState, prio: i32, cpu: u64) -> TaskId {
        let mut spec = TaskSpec::new("t");
        spec.priority = prio;
        spec.resources.cpu_milli = cpu;
        match s.apply(&Command::new(2, Op::Submit { tasks: vec![NewTask::new(spec)] })) {
            Ok(Output::Submitted(v)) => v[0].id,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn higher_priority_first_then_fifo() {
        let mut s = state_with_workers(&[("w1", 10_000, 2)]);
        let a = submit(&mut s, 0, 0);
        let b = submit(&mut s, 5, 0);
        let c = submit(&mut s, 5, 0);
        let p = plan(&s, &PlanPolicy::default());
        let got: Vec<TaskId> = p.assignments.iter().map(|a| a.task).collect();
        assert_eq!(got, vec![b, c]);
        assert!(!got.contains(&a));
    }

    #[test]
    fn spreads_to_the_least_loaded_worker() {
        let mut s = state_with_workers(&[("w1", 10_000, 4), ("w2", 10_000, 4)]);
        for _ in 0..4 {
            submit(&mut s, 0, 0);
        }
        let p = plan(&s, &PlanPolicy::default());
        let on_w1 = p.assignments.iter().filter(|a| a.worker.as_str() == "w1").count();
        assert_eq!(on_w1, 2);
        assert_eq!(p.assignments.len(), 4);
    }

    #[test]
    fn a_large_task_reserves_a_worker_instead_of_starving() {
        let mut s = state_with_workers(&[("w1", 4_000, 8), ("w2", 4_000, 8)]);
        // Fill both workers partly with small work.
        for _ in 0..2 {
            submit(&mut s, 0, 1_000);
        }
        let first = plan(&s, &PlanPolicy::default());
        s.apply(&Command::new(3, Op::Assign { assignments: first.assignments, planned_at: 0 }))
            .unwrap();
        let big = submit(&mut s, 10, 4_000);
        for _ in 0..6 {
            submit(&mut s, 0, 1_000);
        }
        let p = plan(&s, &PlanPolicy::default());
        assert_eq!(p.reservations[0], Reservation { task: big, worker: WorkerId("w1".into()) });
        assert!(p.assignments.iter().all(|a| a.worker.as_str() == "w2"), "{p:?}");
    }

    #[test]
    fn explain_names_the_reservation_that_holds_a_small_task_back() {
        use crate::explain::{Blocker, Explanation};
        let mut s = state_with_workers(&[("w1", 4_000, 8)]);
        submit(&mut s, 0, 1_000);
        let first = plan(&s, &PlanPolicy::default());
        s.apply(&Command::new(3, Op::Assign { assignments: first.assignments, planned_at: 0 }))
            .unwrap();
        let big = submit(&mut s, 10, 4_000);
        let small = submit(&mut s, 0, 1_000);
        let Some(Explanation::Queued { blocker, .. }) = s.explain(small) else { panic!() };
        assert_eq!(
            blocker,
            Some(Blocker::Reserved { worker: WorkerId("w1".into()), for_task: big })
        );
        let text = blocker.unwrap().to_string();
        assert!(text.contains("held back for task") && !text.contains("fits"), "{text}");
        // With a second worker that has room, the small task is only waiting for its turn.
        let mut s2 = state_with_workers(&[("w1", 4_000, 8), ("w2", 1_000, 8)]);
        submit(&mut s2, 0, 1_000);
        let first = plan(&s2, &PlanPolicy::default());
        s2.apply(&Command::new(3, Op::Assign { assignments: first.assignments, planned_at: 0 }))
            .unwrap();
        submit(&mut s2, 10, 4_000);
        let small = submit(&mut s2, 0, 1_000);
        let Some(Explanation::Queued { blocker, .. }) = s2.explain(small) else { panic!() };
        assert_eq!(blocker, None);
    }

    #[test]
    fn a_task_too_large_for_every_worker_reserves_nothing() {
        let mut s = state_with_workers(&[("w1", 1_000, 8)]);
        submit(&mut s, 10, 5_000);
        let small = submit(&mut s, 0, 500);
        let p = plan(&s, &PlanPolicy::default());
        assert!(p.reservations.is_empty());
        assert_eq!(p.assignments, vec![Assignment { task: small, worker: WorkerId("w1".into()) }]);
    }

    #[test]
    fn a_completion_plans_its_dependent_onto_the_freed_slot_unless_better_work_waits() {
        use crate::command::DepRef;
        let mut s = state_with_workers(&[("w1", 1_000, 1)]);
        let a = submit(&mut s, 0, 0);
        let mut spec = TaskSpec::new("b");
        spec.resources.cpu_milli = 1_000;
        let b = match s.apply(&Command::new(
            3,
            Op::Submit {
                tasks: vec![NewTask { spec, delay_ms: 0, depends_on: vec![DepRef::Id(a)] }],
            },
        )) {
            Ok(Output::Submitted(v)) => v[0].id,
            other => panic!("{other:?}"),
        };
        let first = plan(&s, &PlanPolicy::default());
        let Ok(Output::Assigned(r)) =
            s.apply(&Command::new(4, Op::Assign { assignments: first.assignments, planned_at: 0 }))
        else {
            panic!("assign")
        };
        let fence = *r[0].as_ref().unwrap();
        let w1 = WorkerId("w1".into());
        let done =
            vec![Report { task: a, fence, outcome: ReportKind::Succeeded { result: vec![] } }];
        let ahead = plan_after_reports(&s, &w1, &done, 5, &PlanPolicy::default());
        assert_eq!(ahead, vec![Assignment { task: b, worker: w1.clone() }]);
        // A stale token frees nothing and releases nothing.
        let stale = vec![Report { fence: Fence(fence.0 + 1), ..done[0].clone() }];
        assert!(plan_after_reports(&s, &w1, &stale, 5, &PlanPolicy::default()).is_empty());
        // A queued task of higher priority gets the slot first: no speculation for b.
        submit(&mut s, 5, 0);
        assert!(plan_after_reports(&s, &w1, &done, 5, &PlanPolicy::default()).is_empty());
    }

    #[test]
    fn respects_the_round_limit() {
        let mut s = state_with_workers(&[("w1", 10_000, 100)]);
        for _ in 0..50 {
            submit(&mut s, 0, 0);
        }
        let p = plan(&s, &PlanPolicy { max_assignments: 7, max_reservations: 0 });
        assert_eq!(p.assignments.len(), 7);
    }
}
