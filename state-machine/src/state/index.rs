//! The derived indexes of [`SchedulerState`] and the placement fit checks.
//!
//! Everything here is rebuilt from the records alone (see [`SchedulerState::from_records`]):
//! a task is counted and indexed for exactly its current state, and every state change goes
//! through `unindex_state` for the old state and `index_state` for the new one. Hash maps are
//! only used for point lookups, never iterated, so their order never leaks into apply.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use super::SchedulerState;
use crate::model::{Millis, Resources, TaskId, TaskSpec, TaskState, WorkerId, WorkerSpec};

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

impl SchedulerState {
    pub(super) fn index_state(idx: &mut Indexes, id: TaskId, spec: &TaskSpec, state: &TaskState) {
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

    pub(super) fn unindex_state(idx: &mut Indexes, id: TaskId, spec: &TaskSpec, state: &TaskState) {
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
