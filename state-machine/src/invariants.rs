//! `check_invariants`: the properties every reachable state has. Tests run it after every
//! apply; it is O(state), so production code does not.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{TaskId, TaskState, TaskStateKind, WorkerId, WorkerStatus};
use crate::state::{Load, SchedulerState};

impl SchedulerState {
    /// Verify that records and indexes agree and that the scheduling guarantees hold: every
    /// task is in exactly the index its state calls for; no worker holds more than its slots
    /// or capacity; no task past Waiting has an unsatisfied dependency; fencing tokens and ids
    /// are below their counters; the idempotency map matches the tasks. Returns every
    /// violation found.
    pub fn check_invariants(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        let mut e = |m: String| errs.push(m);

        let mut counts = [0u64; 9];
        let mut queued = 0usize;
        let mut delayed = BTreeSet::new();
        let mut deadlines = BTreeSet::new();
        let mut finished = BTreeSet::new();
        let mut keys = 0usize;
        let mut loads: BTreeMap<WorkerId, Load> = BTreeMap::new();

        for (id, t) in &self.tasks {
            if t.id != *id {
                e(format!("task {id} stored under the wrong id {}", t.id));
            }
            if id.0 >= self.meta.next_task_id {
                e(format!("task {id} >= next_task_id {}", self.meta.next_task_id));
            }
            if t.last_fence.0 >= self.meta.next_fence {
                e(format!(
                    "task {id} fence {} >= next_fence {}",
                    t.last_fence, self.meta.next_fence
                ));
            }
            if t.attempt_base > t.attempt {
                e(format!("task {id} run began at attempt {} > {}", t.attempt_base, t.attempt));
            }
            if (t.attempt == 0) != (t.last_fence.0 == 0) {
                e(format!("task {id} attempt {} with last fence {}", t.attempt, t.last_fence));
            }
            counts[t.state.kind().index()] += 1;
            if let Some(k) = &t.spec.idempotency_key {
                keys += 1;
                if self.idx.by_key.get(k) != Some(id) {
                    e(format!("task {id} key {k:?} maps to {:?}", self.idx.by_key.get(k)));
                }
            }
            let dep_kinds: Vec<(TaskId, Option<TaskStateKind>)> =
                t.deps.iter().map(|d| (*d, self.tasks.get(d).map(|x| x.state.kind()))).collect();
            let unmet = dep_kinds
                .iter()
                .filter(|(_, k)| k.is_some_and(|k| k != TaskStateKind::Succeeded))
                .count() as u32;
            let deps_done = unmet == 0;
            match &t.state {
                TaskState::Waiting => {
                    if self.idx.unmet.get(id) != Some(&unmet) || unmet == 0 {
                        e(format!(
                            "waiting task {id}: unmet {:?}, actual {unmet}",
                            self.idx.unmet.get(id)
                        ));
                    }
                    for (d, k) in &dep_kinds {
                        match k {
                            Some(k) if k.is_terminal() && *k != TaskStateKind::Succeeded => {
                                e(format!("waiting task {id} depends on {d} which is {k}"))
                            }
                            Some(k)
                                if *k != TaskStateKind::Succeeded
                                    && !self
                                        .idx
                                        .dependents
                                        .get(d)
                                        .is_some_and(|v| v.contains(id)) =>
                            {
                                e(format!("waiting task {id} missing from dependents of {d}"));
                            }
                            _ => {}
                        }
                    }
                }
                _ => {
                    if self.idx.unmet.contains_key(id) {
                        e(format!("task {id} is {} but has an unmet count", t.state.kind()));
                    }
                }
            }
            match &t.state {
                TaskState::Queued { .. }
                | TaskState::Delayed { .. }
                | TaskState::Assigned { .. }
                | TaskState::Running { .. }
                | TaskState::Succeeded { .. }
                    if !deps_done =>
                {
                    e(format!("task {id} is {} with unmet dependencies", t.state.kind()));
                }
                _ => {}
            }
            match &t.state {
                TaskState::Queued { .. } => {
                    queued += 1;
                    let hits = self
                        .idx
                        .buckets
                        .values()
                        .filter(|b| b.tasks.contains(&(std::cmp::Reverse(t.spec.priority), *id)))
                        .collect::<Vec<_>>();
                    if hits.len() != 1 {
                        e(format!("queued task {id} is in {} buckets", hits.len()));
                    } else {
                        let s = &hits[0].shape;
                        if s.queue != t.spec.queue
                            || s.labels != t.spec.labels
                            || s.resources != t.spec.resources
                        {
                            e(format!("queued task {id} is in a bucket of another shape"));
                        }
                    }
                }
                TaskState::Delayed { until } => {
                    delayed.insert((*until, *id));
                }
                TaskState::Assigned { worker, fence, deadline, .. }
                | TaskState::Running { worker, fence, deadline, .. } => {
                    if *fence != t.last_fence {
                        e(format!(
                            "task {id} holds fence {fence} but last fence is {}",
                            t.last_fence
                        ));
                    }
                    match self.workers.get(worker) {
                        Some(w) if w.status.is_live() => {}
                        other => e(format!(
                            "task {id} held by {worker} which is {:?}",
                            other.map(|w| &w.status)
                        )),
                    }
                    let l = loads.entry(worker.clone()).or_default();
                    l.tasks.insert(*id);
                    l.used.add(&t.spec.resources);
                    if let Some(d) = deadline {
                        deadlines.insert((*d, *id));
                    }
                }
                TaskState::Succeeded { fence, .. } => {
                    if *fence != t.last_fence {
                        e(format!(
                            "succeeded task {id} fence {fence} != last fence {}",
                            t.last_fence
                        ));
                    }
                    finished.insert((t.state.finished_at().unwrap_or(0), *id));
                }
                TaskState::Waiting => {}
                _ => {
                    finished.insert((t.state.finished_at().unwrap_or(0), *id));
                }
            }
        }
        if counts != self.idx.counts {
            e(format!("state counters {:?} != actual {counts:?}", self.idx.counts));
        }
        let in_buckets: usize = self.idx.buckets.values().map(|b| b.tasks.len()).sum();
        if in_buckets != queued {
            e(format!("{in_buckets} bucket entries for {queued} queued tasks"));
        }
        if self.idx.buckets.values().any(|b| b.tasks.is_empty()) {
            e("an empty bucket was kept".into());
        }
        if delayed != self.idx.delayed {
            e("delayed index differs from the tasks".into());
        }
        if deadlines != self.idx.deadlines {
            e("deadline index differs from the tasks".into());
        }
        if finished != self.idx.finished {
            e("finished index differs from the tasks".into());
        }
        if keys != self.idx.by_key.len() {
            e(format!("{} idempotency keys for {keys} keyed tasks", self.idx.by_key.len()));
        }
        if self.idx.unmet.len() as u64 != counts[TaskStateKind::Waiting.index()] {
            e("unmet index size differs from waiting tasks".into());
        }

        let mut dead = BTreeSet::new();
        for (wid, w) in &self.workers {
            if w.spec.id != *wid {
                e(format!("worker {wid} stored under the wrong id"));
            }
            if w.session >= self.meta.next_session {
                e(format!("worker {wid} session {} >= next_session", w.session));
            }
            let actual = loads.remove(wid).unwrap_or_default();
            match &w.status {
                WorkerStatus::Dead { at, .. } => {
                    dead.insert((*at, wid.clone()));
                    if !actual.tasks.is_empty() {
                        e(format!("dead worker {wid} holds {:?}", actual.tasks));
                    }
                    if self.idx.loads.contains_key(wid) {
                        e(format!("dead worker {wid} has a load entry"));
                    }
                }
                _ => {
                    let Some(l) = self.idx.loads.get(wid) else {
                        e(format!("live worker {wid} has no load entry"));
                        continue;
                    };
                    if *l != actual {
                        e(format!("worker {wid} load {l:?} != actual {actual:?}"));
                    }
                    if actual.tasks.len() as u64 > w.spec.slots as u64 {
                        e(format!(
                            "worker {wid} holds {} tasks in {} slots",
                            actual.tasks.len(),
                            w.spec.slots
                        ));
                    }
                    if !actual.used.fits_in(&w.spec.capacity) {
                        e(format!(
                            "worker {wid} uses {:?} beyond capacity {:?}",
                            actual.used, w.spec.capacity
                        ));
                    }
                }
            }
        }
        for (wid, l) in loads {
            e(format!("tasks {:?} held by unknown worker {wid}", l.tasks));
        }
        if dead != self.idx.dead_workers {
            e("dead-worker index differs from the workers".into());
        }
        let live = self.workers.values().filter(|w| w.status.is_live()).count();
        if live != self.idx.loads.len() {
            e(format!("{} load entries for {live} live workers", self.idx.loads.len()));
        }
        for (name, q) in &self.paused {
            if q.queue != *name {
                e(format!("paused queue {name:?} stored as {:?}", q.queue));
            }
            if q.since > self.meta.log_time {
                e(format!("queue {name:?} paused at {} after log time", q.since));
            }
        }
        if self.paused.len() > crate::state::MAX_PAUSED_QUEUES {
            e(format!("{} paused queues", self.paused.len()));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}
