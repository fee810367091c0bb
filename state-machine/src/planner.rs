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
//!   and named resources.
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
use std::collections::{BTreeSet, BinaryHeap};

use crate::command::Assignment;
use crate::model::{Resources, TaskId, WorkerId, WorkerStatus};
use crate::state::{missing_label, Bucket, SchedulerState};

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

struct Cursor<'a> {
    bucket: &'a Bucket,
    iter: std::collections::btree_set::Iter<'a, (Reverse<i32>, TaskId)>,
    /// Workers (indexes into the view) serving the queue with the labels; computed lazily.
    eligible: Option<Vec<usize>>,
}

/// Plan one round. Pure: the same state and policy always give the same plan.
pub fn plan(state: &SchedulerState, policy: &PlanPolicy) -> Plan {
    let mut out = Plan::default();
    let mut workers: Vec<WorkerView> = Vec::new();
    for w in state.workers.values() {
        if w.status != WorkerStatus::Alive {
            continue;
        }
        let load = state.idx.loads.get(&w.spec.id);
        let used_slots = load.map_or(0, |l| l.tasks.len() as u64);
        workers.push(WorkerView {
            id: &w.spec.id,
            capacity: &w.spec.capacity,
            free: load.map_or_else(|| w.spec.capacity.clone(), |l| w.spec.capacity.minus(&l.used)),
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

    let mut cursors: Vec<Cursor> = state
        .idx
        .buckets
        .values()
        .map(|b| Cursor { bucket: b, iter: b.tasks.iter(), eligible: None })
        .collect();
    // Max-heap on (priority, smaller id first).
    let mut heads: BinaryHeap<(i32, Reverse<TaskId>, usize)> = BinaryHeap::new();
    for (c, cur) in cursors.iter_mut().enumerate() {
        if let Some((Reverse(p), id)) = cur.iter.next() {
            heads.push((*p, Reverse(*id), c));
        }
    }

    while out.assignments.len() < policy.max_assignments && !open.is_empty() {
        let Some((_, Reverse(task), c)) = heads.pop() else { break };
        let cur = &mut cursors[c];
        let shape = &cur.bucket.shape;
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
            continue; // no worker serves this shape: skip the whole shape
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
                if let Some((Reverse(p), id)) = cur.iter.next() {
                    heads.push((*p, Reverse(*id), c));
                }
            }
            None => {
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
    use crate::model::{TaskSpec, WorkerSpec};

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
    fn a_task_too_large_for_every_worker_reserves_nothing() {
        let mut s = state_with_workers(&[("w1", 1_000, 8)]);
        submit(&mut s, 10, 5_000);
        let small = submit(&mut s, 0, 500);
        let p = plan(&s, &PlanPolicy::default());
        assert!(p.reservations.is_empty());
        assert_eq!(p.assignments, vec![Assignment { task: small, worker: WorkerId("w1".into()) }]);
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
