//! Property test: random command sequences applied to the real state and to a small reference
//! model written in the most direct way possible (linear scans, no indexes). After every
//! command the two must agree on every response and on every task's state, attempt and fence,
//! `check_invariants()` must pass, fences must never go backwards, and the state rebuilt from
//! its records must equal the live one.
//!
//! Abstract operations pick their targets by position at execution time (e.g. "the k-th task
//! that is in progress"), so most generated commands hit something real.

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use state_machine::*;

// ----- the reference model ----------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct MTask {
    deps: Vec<u64>,
    spec: TaskSpec,
    kind: TaskStateKind,
    attempt: u32,
    fence: u64,
    holder: Option<String>,
    until: u64,
    deadline: Option<u64>,
    done_fence: Option<(u64, String)>,
    fail_fence: Option<(u64, String)>,
    finished_at: u64,
    /// Attempts before the latest manual retry.
    base: u32,
}

#[derive(Clone, Debug, PartialEq)]
struct MWorker {
    spec: WorkerSpec,
    instance: u64,
    session: u64,
    alive: bool,
    draining: bool,
    died_at: u64,
}

#[derive(Default, Clone, Debug)]
struct Model {
    now: u64,
    next_id: u64,
    next_fence: u64,
    next_session: u64,
    tasks: BTreeMap<u64, MTask>,
    workers: BTreeMap<String, MWorker>,
    paused: std::collections::BTreeSet<String>,
}

/// The outcome shape the model predicts: Ok/Err per item (the exact errors are covered by the
/// unit tests; here we check *whether* each thing was accepted and where it ends up).
#[derive(Debug, PartialEq)]
enum Shape {
    Rejected,
    Items(Vec<bool>),
    Ok,
}

impl Model {
    fn new() -> Self {
        Model { next_id: 1, next_fence: 1, next_session: 1, ..Default::default() }
    }

    fn held(&self, w: &str) -> Vec<u64> {
        self.tasks
            .iter()
            .filter(|(_, t)| t.holder.as_deref() == Some(w))
            .map(|(id, _)| *id)
            .collect()
    }

    fn ready_kind(&self, spec: &TaskSpec) -> (TaskStateKind, u64) {
        match spec.not_before {
            Some(t) if t > self.now => (TaskStateKind::Delayed, t),
            _ => (TaskStateKind::Queued, 0),
        }
    }

    fn set_terminal(&mut self, id: u64, kind: TaskStateKind) {
        let t = self.tasks.get_mut(&id).unwrap();
        t.kind = kind;
        t.holder = None;
        t.deadline = None;
        t.finished_at = self.now;
    }

    /// Re-derive Waiting tasks after any change: a waiting task whose deps all succeeded
    /// (or were purged) becomes ready; one with a failed dep fails. Repeat to a fixpoint.
    fn settle(&mut self) {
        loop {
            let mut changed = false;
            let ids: Vec<u64> = self.tasks.keys().copied().collect();
            for id in ids {
                if self.tasks[&id].kind != TaskStateKind::Waiting {
                    continue;
                }
                let deps = self.tasks[&id].deps.clone();
                let kinds: Vec<Option<TaskStateKind>> =
                    deps.iter().map(|d| self.tasks.get(d).map(|t| t.kind)).collect();
                if kinds.iter().any(|k| {
                    matches!(
                        k,
                        Some(
                            TaskStateKind::Failed
                                | TaskStateKind::Cancelled
                                | TaskStateKind::UpstreamFailed
                        )
                    )
                }) {
                    self.set_terminal(id, TaskStateKind::UpstreamFailed);
                    changed = true;
                } else if kinds.iter().all(|k| matches!(k, None | Some(TaskStateKind::Succeeded))) {
                    let (k, until) = self.ready_kind(&self.tasks[&id].spec.clone());
                    let t = self.tasks.get_mut(&id).unwrap();
                    t.kind = k;
                    t.until = until;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
    }

    fn fail_attempt(&mut self, id: u64, lost: bool, fatal: bool) {
        let now = self.now;
        let t = self.tasks.get_mut(&id).unwrap();
        let w = t.holder.take().unwrap();
        t.fail_fence = Some((t.fence, w));
        t.deadline = None;
        let run = t.attempt - t.base;
        if !fatal && run < t.spec.retry.max_attempts {
            let delay = if lost { 0 } else { t.spec.retry.backoff_after(TaskId(id), run) };
            if delay == 0 {
                t.kind = TaskStateKind::Queued;
            } else {
                t.kind = TaskStateKind::Delayed;
                t.until = now + delay;
            }
        } else {
            self.set_terminal(id, TaskStateKind::Failed);
        }
    }

    fn apply(&mut self, cmd: &Command) -> Shape {
        self.now = self.now.max(cmd.now);
        let shape = match &cmd.op {
            Op::Submit { tasks } => self.submit(tasks),
            Op::Cancel { ids, .. } => Shape::Items(
                ids.iter()
                    .map(|id| match self.tasks.get(&id.0).map(|t| t.kind) {
                        None => false,
                        Some(TaskStateKind::Cancelled) => true,
                        Some(k) if k.is_terminal() => false,
                        Some(_) => {
                            self.set_terminal(id.0, TaskStateKind::Cancelled);
                            self.settle();
                            true
                        }
                    })
                    .collect(),
            ),
            Op::RegisterWorker { spec, instance } => self.register(spec, *instance),
            // Ownership is covered by the unit tests; this generator registers without owners.
            Op::RegisterWorkerAs { .. } => panic!("the generator makes no owned registrations"),
            // Tokens touch no task or worker; their unit tests cover them.
            Op::CreateToken { .. } | Op::RevokeToken { .. } => {
                panic!("the generator makes no token commands")
            }
            // The version touches no task or worker; tests/apply.rs covers it.
            Op::SetClusterVersion { .. } => panic!("the generator makes no version commands"),
            Op::DrainWorker { worker } => match self.workers.get_mut(&worker.0) {
                Some(w) if w.alive => {
                    w.draining = true;
                    Shape::Ok
                }
                _ => Shape::Rejected,
            },
            Op::DeregisterWorker { worker, session } | Op::ExpireWorker { worker, session } => {
                match self.workers.get(&worker.0).cloned() {
                    Some(w) if w.session == *session && w.alive => {
                        for t in self.held(&worker.0) {
                            self.fail_attempt(t, true, false);
                        }
                        self.settle();
                        let w = self.workers.get_mut(&worker.0).unwrap();
                        w.alive = false;
                        w.draining = false;
                        w.died_at = self.now;
                        Shape::Ok
                    }
                    // Already gone: either command's goal is met.
                    Some(w) if w.session == *session && !w.alive => Shape::Ok,
                    _ => Shape::Rejected,
                }
            }
            Op::Assign { assignments, .. } => {
                Shape::Items(assignments.iter().map(|a| self.assign(a)).collect())
            }
            Op::Report { worker, reports } => {
                Shape::Items(reports.iter().map(|r| self.report(&worker.0, r)).collect())
            }
            Op::RetryTask { task, with_dependents } => self.retry(task.0, *with_dependents),
            Op::UndrainWorker { worker } => match self.workers.get_mut(&worker.0) {
                Some(w) if w.alive => {
                    w.draining = false;
                    Shape::Ok
                }
                _ => Shape::Rejected,
            },
            Op::RemoveWorker { worker } => match self.workers.get(&worker.0) {
                Some(w) if !w.alive => {
                    self.workers.remove(&worker.0);
                    Shape::Ok
                }
                _ => Shape::Rejected,
            },
            Op::PauseQueue { queue } => {
                self.paused.insert(queue.clone());
                Shape::Ok
            }
            Op::ResumeQueue { queue } => {
                self.paused.remove(queue);
                Shape::Ok
            }
            Op::Batch(_) => unreachable!(
                "the generator makes no batches; see a_batch_equals_its_operations_in_sequence"
            ),
            Op::AdvanceTime => {
                let now = self.now;
                let due: Vec<u64> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.deadline.is_some_and(|d| d <= now))
                    .map(|(id, _)| *id)
                    .collect();
                for id in due {
                    self.fail_attempt(id, false, false);
                }
                self.settle();
                for t in self.tasks.values_mut() {
                    if t.kind == TaskStateKind::Delayed && t.until <= now {
                        t.kind = TaskStateKind::Queued;
                    }
                }
                Shape::Ok
            }
            Op::Purge { finished_before, limit } => {
                let mut victims: Vec<(u64, u64)> = self
                    .tasks
                    .iter()
                    .filter(|(_, t)| t.kind.is_terminal() && t.finished_at < *finished_before)
                    .map(|(id, t)| (t.finished_at, *id))
                    .collect();
                victims.sort();
                for (_, id) in victims.into_iter().take(*limit as usize) {
                    self.tasks.remove(&id);
                }
                self.workers.retain(|_, w| w.alive || w.died_at >= *finished_before);
                Shape::Ok
            }
        };
        shape
    }

    fn ended_badly(&self, id: u64) -> bool {
        self.tasks.get(&id).is_some_and(|t| {
            matches!(
                t.kind,
                TaskStateKind::Failed | TaskStateKind::Cancelled | TaskStateKind::UpstreamFailed
            )
        })
    }

    /// Retry: the root, plus (with dependents) every Failed/UpstreamFailed task that depends
    /// on a member, less those that also depend on a non-member that ended without success.
    fn retry(&mut self, root: u64, with_dependents: bool) -> Shape {
        if !self.ended_badly(root) {
            return Shape::Rejected;
        }
        let blocked = |m: &Model, id: u64, set: &std::collections::BTreeSet<u64>| {
            m.tasks[&id].deps.iter().any(|d| !set.contains(d) && m.ended_badly(*d))
        };
        let mut set = std::collections::BTreeSet::from([root]);
        if blocked(self, root, &set) {
            return Shape::Rejected;
        }
        if with_dependents {
            loop {
                let grow: Vec<u64> = self
                    .tasks
                    .iter()
                    .filter(|(id, t)| {
                        !set.contains(id)
                            && matches!(
                                t.kind,
                                TaskStateKind::Failed | TaskStateKind::UpstreamFailed
                            )
                            && t.deps.iter().any(|d| set.contains(d))
                    })
                    .map(|(id, _)| *id)
                    .collect();
                if grow.is_empty() {
                    break;
                }
                set.extend(grow);
            }
            loop {
                let drop: Vec<u64> =
                    set.iter().copied().filter(|&t| t != root && blocked(self, t, &set)).collect();
                if drop.is_empty() {
                    break;
                }
                for t in drop {
                    set.remove(&t);
                }
            }
        }
        for id in set {
            let t = self.tasks.get_mut(&id).unwrap();
            t.kind = TaskStateKind::Waiting;
            t.base = t.attempt;
        }
        self.settle();
        Shape::Ok
    }

    fn submit(&mut self, batch: &[NewTask]) -> Shape {
        if validate::submit_batch(batch, self.now, &validate::HARD).is_err() {
            return Shape::Rejected;
        }
        let mut ids = Vec::new();
        let mut next = self.next_id;
        for t in batch {
            let existing = t.spec.idempotency_key.as_ref().and_then(|k| {
                self.tasks
                    .iter()
                    .find(|(_, x)| x.spec.idempotency_key.as_ref() == Some(k))
                    .map(|(id, _)| *id)
            });
            match existing {
                Some(id) => ids.push((id, false)),
                None => {
                    ids.push((next, true));
                    next += 1;
                }
            }
        }
        // A matched key must carry the body that created its task (the relative delay
        // aside); anything else rejects the whole batch.
        for (i, t) in batch.iter().enumerate() {
            if ids[i].1 {
                continue;
            }
            let old = &self.tasks[&ids[i].0];
            let (mut a, mut b) = (t.spec.clone(), old.spec.clone());
            if t.delay_ms > 0 {
                a.not_before = None;
                b.not_before = None;
            }
            let mut deps: Vec<u64> = t
                .depends_on
                .iter()
                .map(|d| match d {
                    DepRef::Id(id) => id.0,
                    DepRef::Batch(p) => ids[*p as usize].0,
                })
                .collect();
            deps.sort_unstable();
            deps.dedup();
            let mut had = old.deps.clone();
            had.sort_unstable();
            if a != b || deps != had {
                return Shape::Rejected;
            }
        }
        let mut resolved = Vec::new();
        for (i, t) in batch.iter().enumerate() {
            let mut deps = Vec::new();
            if ids[i].1 {
                for d in &t.depends_on {
                    let id = match d {
                        DepRef::Id(id) if self.tasks.contains_key(&id.0) => id.0,
                        DepRef::Id(_) => return Shape::Rejected,
                        DepRef::Batch(p) => ids[*p as usize].0,
                    };
                    if id == ids[i].0 || deps.contains(&id) {
                        return Shape::Rejected;
                    }
                    deps.push(id);
                }
            }
            resolved.push(deps);
        }
        self.next_id = next;
        for (i, t) in batch.iter().enumerate() {
            if !ids[i].1 {
                continue;
            }
            let mut spec = t.spec.clone();
            if t.delay_ms > 0 {
                spec.not_before = Some(spec.not_before.unwrap_or(0).max(self.now + t.delay_ms));
            }
            self.tasks.insert(
                ids[i].0,
                MTask {
                    deps: resolved[i].clone(),
                    spec,
                    kind: TaskStateKind::Waiting,
                    attempt: 0,
                    fence: 0,
                    holder: None,
                    until: 0,
                    deadline: None,
                    done_fence: None,
                    fail_fence: None,
                    finished_at: 0,
                    base: 0,
                },
            );
        }
        self.settle();
        Shape::Ok
    }

    fn register(&mut self, spec: &WorkerSpec, instance: u64) -> Shape {
        if validate::worker_spec(spec, &validate::HARD).is_err() {
            return Shape::Rejected;
        }
        if let Some(w) = self.workers.get(&spec.id.0).cloned() {
            if w.alive && w.instance == instance {
                let held = self.held(&spec.id.0);
                let used: u64 = held.iter().map(|t| self.tasks[t].spec.resources.cpu_milli).sum();
                if used > spec.capacity.cpu_milli || held.len() as u64 > spec.slots as u64 {
                    return Shape::Rejected;
                }
                self.workers.get_mut(&spec.id.0).unwrap().spec = spec.clone();
                return Shape::Ok;
            }
            if w.alive {
                for t in self.held(&spec.id.0) {
                    self.fail_attempt(t, true, false);
                }
                self.settle();
            }
        }
        let session = self.next_session;
        self.next_session += 1;
        self.workers.insert(
            spec.id.0.clone(),
            MWorker {
                spec: spec.clone(),
                instance,
                session,
                alive: true,
                draining: false,
                died_at: 0,
            },
        );
        Shape::Ok
    }

    fn assign(&mut self, a: &Assignment) -> bool {
        let Some(t) = self.tasks.get(&a.task.0) else { return false };
        let Some(w) = self.workers.get(&a.worker.0) else { return false };
        if t.kind != TaskStateKind::Queued || !w.alive || w.draining {
            return false;
        }
        if self.paused.contains(&t.spec.queue) {
            return false;
        }
        if !w.spec.queues.contains(&t.spec.queue) {
            return false;
        }
        let held = self.held(&a.worker.0);
        let used: u64 = held.iter().map(|x| self.tasks[x].spec.resources.cpu_milli).sum();
        if held.len() as u64 >= w.spec.slots as u64
            || used + t.spec.resources.cpu_milli > w.spec.capacity.cpu_milli
        {
            return false;
        }
        let now = self.now;
        let fence = self.next_fence;
        self.next_fence += 1;
        let t = self.tasks.get_mut(&a.task.0).unwrap();
        t.attempt += 1;
        t.fence = fence;
        t.kind = TaskStateKind::Assigned;
        t.holder = Some(a.worker.0.clone());
        t.deadline = t.spec.timeout_ms.map(|x| now + x);
        true
    }

    fn report(&mut self, worker: &str, r: &Report) -> bool {
        let Some(t) = self.tasks.get(&r.task.0).cloned() else { return false };
        if let ReportKind::Succeeded { result } = &r.outcome {
            if result.len() > validate::HARD.max_result_bytes {
                return false;
            }
        }
        let Some(holder) = t.holder.clone() else {
            let same =
                |f: &Option<(u64, String)>| f.as_ref() == Some(&(r.fence.0, worker.to_string()));
            return match &r.outcome {
                ReportKind::Succeeded { .. } | ReportKind::Started if same(&t.done_fence) => true,
                ReportKind::Failed { .. } if same(&t.fail_fence) => true,
                _ => false,
            };
        };
        if r.fence.0 != t.fence || holder != worker {
            return false;
        }
        match &r.outcome {
            ReportKind::Started => {
                self.tasks.get_mut(&r.task.0).unwrap().kind = TaskStateKind::Running;
            }
            ReportKind::Succeeded { .. } => {
                self.set_terminal(r.task.0, TaskStateKind::Succeeded);
                self.tasks.get_mut(&r.task.0).unwrap().done_fence =
                    Some((r.fence.0, worker.to_string()));
                self.settle();
            }
            ReportKind::Failed { retryable, .. } => {
                self.fail_attempt(r.task.0, false, !retryable);
                self.settle();
            }
        }
        true
    }
}

fn shape_of(r: &Response) -> Shape {
    match r {
        Err(_) => Shape::Rejected,
        Ok(Output::Cancelled(v)) => Shape::Items(v.iter().map(|x| x.is_ok()).collect()),
        Ok(Output::Assigned(v)) => Shape::Items(v.iter().map(|x| x.is_ok()).collect()),
        Ok(Output::Reported(v)) => Shape::Items(v.iter().map(|x| x.is_ok()).collect()),
        Ok(_) => Shape::Ok,
    }
}

// ----- abstract operations ------------------------------------------------------------------

/// (priority, queue, cpu, key, deps (by position?, k), max attempts, backoff, timeout, delay)
type ATask = (i32, u8, u64, Option<u8>, Vec<(bool, u8)>, u32, u64, Option<u64>, Option<u64>);

#[derive(Clone, Debug)]
enum AOp {
    Submit(Vec<ATask>),
    Cancel(u8),
    Register { w: u8, instance: u64, slots: u32, cpu: u64, both_queues: bool },
    Drain(u8),
    Leave { w: u8, expire: bool, stale: bool },
    PlanAssign,
    RandomAssign(u8, u8),
    Report { pick: u8, stale: bool, wrong_worker: bool, outcome: u8 },
    Advance,
    Purge(u32),
    Retry(u8, bool),
    Undrain(u8),
    Remove(u8),
    Pause { q2: bool, resume: bool },
}

fn task_strategy() -> impl Strategy<Value = ATask> {
    (
        -2i32..3,
        0u8..2,
        prop_oneof![Just(0u64), Just(500), Just(2_000), Just(5_000)],
        proptest::option::of(0u8..5),
        proptest::collection::vec((any::<bool>(), 0u8..12), 0..3),
        1u32..4,
        prop_oneof![Just(0u64), Just(50)],
        proptest::option::of(prop_oneof![Just(100u64), Just(300)]),
        proptest::option::of(0u64..400),
    )
}

fn op_strategy() -> impl Strategy<Value = AOp> {
    prop_oneof![
        4 => proptest::collection::vec(task_strategy(), 1..4).prop_map(AOp::Submit),
        1 => any::<u8>().prop_map(AOp::Cancel),
        2 => (0u8..3, 1u64..3, 1u32..4, prop_oneof![Just(1_000u64), Just(4_000)], any::<bool>())
            .prop_map(|(w, instance, slots, cpu, both_queues)| AOp::Register { w, instance, slots, cpu, both_queues }),
        1 => (0u8..3).prop_map(AOp::Drain),
        1 => (0u8..3, any::<bool>(), any::<bool>()).prop_map(|(w, expire, stale)| AOp::Leave { w, expire, stale }),
        4 => Just(AOp::PlanAssign),
        1 => (any::<u8>(), 0u8..3).prop_map(|(t, w)| AOp::RandomAssign(t, w)),
        5 => (any::<u8>(), any::<bool>(), any::<bool>(), 0u8..4)
            .prop_map(|(pick, stale, wrong_worker, outcome)| AOp::Report { pick, stale, wrong_worker, outcome }),
        2 => Just(AOp::Advance),
        1 => (1u32..5).prop_map(AOp::Purge),
        2 => (any::<u8>(), any::<bool>()).prop_map(|(k, d)| AOp::Retry(k, d)),
        1 => (0u8..3).prop_map(AOp::Undrain),
        1 => (0u8..3).prop_map(AOp::Remove),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(q2, resume)| AOp::Pause { q2, resume }),
    ]
}

fn wid(i: u8) -> WorkerId {
    WorkerId(format!("w{i}"))
}

fn concretize(op: &AOp, s: &SchedulerState, now: u64) -> Op {
    let ids: Vec<TaskId> = s.tasks_from(TaskId(0)).map(|t| t.id).collect();
    let pick = |k: u8| ids.get(k as usize % ids.len().max(1)).copied().unwrap_or(TaskId(1));
    match op {
        AOp::Submit(ts) => Op::Submit {
            tasks: ts
                .iter()
                .map(|(prio, q, cpu, key, deps, max_attempts, backoff, timeout, delay)| {
                    let mut spec = TaskSpec::new("t");
                    spec.priority = *prio;
                    spec.queue = if *q == 0 { "default".into() } else { "q2".into() };
                    spec.resources.cpu_milli = *cpu;
                    spec.idempotency_key = key.map(|k| format!("k{k}"));
                    spec.retry.max_attempts = *max_attempts;
                    spec.retry.initial_backoff_ms = *backoff;
                    spec.timeout_ms = *timeout;
                    // Odd delays as absolute not_before, even ones as a relative delay.
                    let relative = delay.filter(|d| d % 2 == 0).unwrap_or(0);
                    spec.not_before = delay.filter(|d| d % 2 == 1).map(|d| now + d);
                    NewTask {
                        spec,
                        delay_ms: relative,
                        depends_on: deps
                            .iter()
                            .map(|(by_pos, k)| {
                                if *by_pos {
                                    DepRef::Batch(*k as u32 % 4)
                                } else {
                                    DepRef::Id(TaskId(*k as u64 + 1))
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
        },
        AOp::Cancel(k) => Op::Cancel { ids: vec![pick(*k)], reason: "test".into() },
        AOp::Register { w, instance, slots, cpu, both_queues } => Op::RegisterWorker {
            spec: WorkerSpec {
                id: wid(*w),
                queues: if *both_queues {
                    vec!["default".into(), "q2".into()]
                } else {
                    vec!["default".into()]
                },
                labels: BTreeMap::new(),
                capacity: Resources { cpu_milli: *cpu, memory_mib: 1_000, named: BTreeMap::new() },
                slots: *slots,
            },
            instance: *instance,
        },
        AOp::Drain(w) => Op::DrainWorker { worker: wid(*w) },
        AOp::Leave { w, expire, stale } => {
            let session = s.worker(&wid(*w)).map_or(1, |x| x.session) + u64::from(*stale);
            if *expire {
                Op::ExpireWorker { worker: wid(*w), session }
            } else {
                Op::DeregisterWorker { worker: wid(*w), session }
            }
        }
        AOp::PlanAssign => {
            Op::Assign { assignments: plan(s, &PlanPolicy::default()).assignments, planned_at: 0 }
        }
        AOp::RandomAssign(t, w) => Op::Assign {
            assignments: vec![Assignment { task: pick(*t), worker: wid(*w) }],
            planned_at: 0,
        },
        AOp::Report { pick: k, stale, wrong_worker, outcome } => {
            let held: Vec<&Task> = s
                .tasks_from(TaskId(0))
                .filter(|t| t.state.holder().is_some() || t.attempt > 0)
                .collect();
            let Some(t) = held.get(*k as usize % held.len().max(1)) else {
                return Op::AdvanceTime;
            };
            let (worker, fence) = match t.state.holder() {
                Some((w, f)) => (w.clone(), f),
                None => (
                    t.last_failure.as_ref().map(|f| f.worker.clone()).unwrap_or_else(|| wid(0)),
                    t.last_fence,
                ),
            };
            let fence = if *stale { Fence(fence.0.saturating_sub(1)) } else { fence };
            let worker = if *wrong_worker { wid(2) } else { worker };
            let outcome = match outcome {
                0 => ReportKind::Started,
                1 => ReportKind::Succeeded { result: vec![1, 2, 3] },
                2 => ReportKind::Failed { message: "x".into(), retryable: true },
                _ => ReportKind::Failed { message: "fatal".into(), retryable: false },
            };
            Op::Report { worker, reports: vec![Report { task: t.id, fence, outcome }] }
        }
        AOp::Retry(k, with_dependents) => {
            // Mostly tasks that ended without success; sometimes any task.
            let done: Vec<TaskId> = s
                .tasks_from(TaskId(0))
                .filter(|t| {
                    matches!(
                        t.state.kind(),
                        TaskStateKind::Failed
                            | TaskStateKind::Cancelled
                            | TaskStateKind::UpstreamFailed
                    )
                })
                .map(|t| t.id)
                .collect();
            let task = match done.get(*k as usize % done.len().max(1)) {
                Some(id) if k % 8 != 0 => *id,
                _ => pick(*k),
            };
            Op::RetryTask { task, with_dependents: *with_dependents }
        }
        AOp::Undrain(w) => Op::UndrainWorker { worker: wid(*w) },
        AOp::Remove(w) => Op::RemoveWorker { worker: wid(*w) },
        AOp::Pause { q2, resume } => {
            let queue = if *q2 { "q2".to_string() } else { "default".to_string() };
            if *resume {
                Op::ResumeQueue { queue }
            } else {
                Op::PauseQueue { queue }
            }
        }
        AOp::Advance => Op::AdvanceTime,
        AOp::Purge(limit) => Op::Purge { finished_before: now.saturating_sub(100), limit: *limit },
    }
}

fn compare(model: &Model, s: &SchedulerState) -> Result<(), String> {
    let real: Vec<u64> = s.tasks_from(TaskId(0)).map(|t| t.id.0).collect();
    let modeled: Vec<u64> = model.tasks.keys().copied().collect();
    if real != modeled {
        return Err(format!("task ids differ: real {real:?} model {modeled:?}"));
    }
    for t in s.tasks_from(TaskId(0)) {
        let m = &model.tasks[&t.id.0];
        let holder = t.state.holder().map(|(w, _)| w.0.clone());
        if t.state.kind() != m.kind
            || t.attempt_base != m.base
            || t.attempt != m.attempt
            || t.last_fence.0 != m.fence
            || holder != m.holder
        {
            return Err(format!(
                "task {}: real ({}, attempt {}, fence {}, {holder:?}) model ({}, attempt {}, fence {}, {:?})",
                t.id, t.state.kind(), t.attempt, t.last_fence, m.kind, m.attempt, m.fence, m.holder
            ));
        }
    }
    for w in s.workers() {
        let Some(m) = model.workers.get(&w.spec.id.0) else {
            return Err(format!("worker {} not in model", w.spec.id));
        };
        let status_ok = match w.status {
            WorkerStatus::Alive => m.alive && !m.draining,
            WorkerStatus::Draining { .. } => m.alive && m.draining,
            WorkerStatus::Dead { .. } => !m.alive,
        };
        if !status_ok || w.session != m.session {
            return Err(format!(
                "worker {}: real {:?} s{} model {m:?}",
                w.spec.id, w.status, w.session
            ));
        }
    }
    if s.workers().count() != model.workers.len() {
        return Err("worker count differs".into());
    }
    let paused: Vec<&String> = s.paused_queues().map(|q| &q.queue).collect();
    if paused != model.paused.iter().collect::<Vec<_>>() {
        return Err(format!("paused queues: real {paused:?} model {:?}", model.paused));
    }
    Ok(())
}

fn run(ops: &[(AOp, u64)]) -> Result<(), TestCaseError> {
    let mut s = newest_state();
    let mut model = Model::new();
    let mut now = 1_000u64;
    for (i, (aop, dt)) in ops.iter().enumerate() {
        now += dt;
        let op = concretize(aop, &s, now);
        let cmd = Command::new(now, op);
        let fences_before: BTreeMap<TaskId, Fence> =
            s.tasks_from(TaskId(0)).map(|t| (t.id, t.last_fence)).collect();
        let resp = s.apply(&cmd);
        let expected = model.apply(&cmd);
        prop_assert_eq!(shape_of(&resp), expected, "step {}: {:?} -> {:?}", i, cmd, resp);
        if let Err(errs) = s.check_invariants() {
            return Err(TestCaseError::fail(format!("step {i} {cmd:?}: invariants {errs:#?}")));
        }
        compare(&model, &s).map_err(|e| TestCaseError::fail(format!("step {i} {cmd:?}: {e}")))?;
        for t in s.tasks_from(TaskId(0)) {
            if let Some(f) = fences_before.get(&t.id) {
                prop_assert!(t.last_fence >= *f, "fence of {} went backwards", t.id);
            }
        }
        if let Op::Assign { assignments, .. } = &cmd.op {
            if let Ok(Output::Assigned(v)) = &resp {
                for (a, r) in assignments.iter().zip(v) {
                    if let Ok(f) = r {
                        prop_assert!(
                            Some(*f) > fences_before.get(&a.task).copied(),
                            "new fence must be larger"
                        );
                    }
                }
            }
        }
    }
    // The state rebuilt from records is the same state.
    let mut loader = StateLoader::new();
    for (k, v) in s.records() {
        loader.add(&k.encode(), &v.encode()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    let rebuilt = loader.finish();
    if let Err(errs) = rebuilt.check_invariants() {
        return Err(TestCaseError::fail(format!("rebuilt state: {errs:#?}")));
    }
    prop_assert_eq!(rebuilt.digest(), s.digest());
    prop_assert_eq!(plan(&rebuilt, &PlanPolicy::default()), plan(&s, &PlanPolicy::default()));
    prop_assert_eq!(rebuilt.next_timer(), s.next_timer());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn apply_agrees_with_the_reference_model(ops in proptest::collection::vec((op_strategy(), 0u64..150), 1..60)) {
        run(&ops)?;
    }
}

/// A plan applied at once is accepted in full (the planner and apply agree on eligibility),
/// and no worker that took a task could have taken a better one that stayed queued.
#[test]
fn plans_apply_cleanly_and_respect_priority() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec((op_strategy(), 0u64..150), 1..50), |ops| {
            let mut s = newest_state();
            let mut now = 1_000;
            for (aop, dt) in &ops {
                now += dt;
                let op = concretize(aop, &s, now);
                let _ = s.apply(&Command::new(now, op));
                let p = plan(&s, &PlanPolicy::default());
                let before = s.clone();
                let r = s.apply(&Command::new(
                    now,
                    Op::Assign { assignments: p.assignments.clone(), planned_at: 0 },
                ));
                if let Ok(Output::Assigned(v)) = &r {
                    prop_assert!(v.iter().all(|x| x.is_ok()), "plan {:?} refused: {:?}", p, v);
                }
                // Priority: for each worker that received tasks, no queued task it could have
                // taken (queue, labels, and size vs. its capacity at plan start) has a strictly
                // higher priority than the lowest it received, unless that task is reserved.
                for a in &p.assignments {
                    let got = before.task(a.task).unwrap().spec.priority;
                    let w = before.worker(&a.worker).unwrap();
                    for t in s.tasks_from(TaskId(0)) {
                        if t.state.kind() != TaskStateKind::Queued
                            || p.reservations.iter().any(|r| r.task == t.id)
                            || s.queue_paused_since(&t.spec.queue).is_some()
                        {
                            continue;
                        }
                        let eligible = w.spec.queues.contains(&t.spec.queue)
                            && t.spec.resources.fits_in(
                                &w.spec.capacity.minus(before.worker_used(&a.worker).unwrap()),
                            );
                        if eligible && t.spec.priority > got {
                            // Allowed only when the better task's shape was blocked elsewhere
                            // first (it could not fit after earlier placements this round).
                            let left = s.worker_used(&a.worker).unwrap();
                            prop_assert!(
                                !t.spec.resources.fits_in(&w.spec.capacity.minus(left))
                                    || s.held_by(&a.worker).count() as u32 >= w.spec.slots,
                                "task {} (prio {}) left queued while {} (prio {}) went to {}",
                                t.id,
                                t.spec.priority,
                                a.task,
                                got,
                                a.worker
                            );
                        }
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

/// Speculative planning for a completion (`plan_after_reports`, computed before the report
/// is applied) makes exactly the assignments of released tasks that the regular planner makes
/// on the state after the report.
#[test]
fn planning_ahead_of_a_completion_matches_planning_after_it() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    let speculated = std::cell::Cell::new(0usize);
    // The general mix, plus many tasks that depend on existing ones and many valid
    // completions: they are what releases dependents.
    #[derive(Clone, Debug)]
    enum Step {
        Any(AOp),
        Complete(u8),
        Dependent { prio: i32, cpu: u64, q2: bool, deps: Vec<u8>, delay: Option<u64> },
    }
    let step = prop_oneof![
        2 => op_strategy().prop_map(Step::Any),
        3 => any::<u8>().prop_map(Step::Complete),
        3 => (
            -2i32..3,
            prop_oneof![Just(0u64), Just(500), Just(2_000), Just(5_000)],
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 1..3),
            proptest::option::weighted(0.2, 1u64..100),
        )
            .prop_map(|(prio, cpu, q2, deps, delay)| Step::Dependent { prio, cpu, q2, deps, delay }),
    ];
    runner
        .run(&proptest::collection::vec((step, 0u64..150), 1..60), |ops| {
            let mut s = newest_state();
            let mut now = 1_000;
            let policy = PlanPolicy::default();
            for (step, dt) in &ops {
                now += dt;
                let op = match step {
                    Step::Any(aop) => concretize(aop, &s, now),
                    Step::Complete(pick) => concretize(
                        &AOp::Report { pick: *pick, stale: false, wrong_worker: false, outcome: 1 },
                        &s,
                        now,
                    ),
                    Step::Dependent { prio, cpu, q2, deps, delay } => {
                        let ids: Vec<TaskId> = s.tasks_from(TaskId(0)).map(|t| t.id).collect();
                        let mut spec = TaskSpec::new("t");
                        spec.priority = *prio;
                        spec.resources.cpu_milli = *cpu;
                        spec.queue = if *q2 { "q2".into() } else { "default".into() };
                        spec.not_before = delay.map(|d| now + d);
                        let mut depends_on: Vec<DepRef> = deps
                            .iter()
                            .filter_map(|k| ids.get(*k as usize % ids.len().max(1)))
                            .map(|id| DepRef::Id(*id))
                            .collect();
                        depends_on.sort_by_key(|d| match d {
                            DepRef::Id(i) => i.0,
                            DepRef::Batch(p) => u64::from(*p),
                        });
                        depends_on.dedup();
                        Op::Submit { tasks: vec![NewTask { spec, delay_ms: 0, depends_on }] }
                    }
                };
                let ahead = match &op {
                    Op::Report { worker, reports } => Some(plan_after_reports(
                        &s,
                        worker,
                        reports,
                        now.max(s.log_time()),
                        &policy,
                    )),
                    _ => None,
                };
                let waiting: Vec<TaskId> = s
                    .tasks_from(TaskId(0))
                    .filter(|t| t.state.kind() == TaskStateKind::Waiting)
                    .map(|t| t.id)
                    .collect();
                let _ = s.apply(&Command::new(now, op));
                if let Some(ahead) = ahead {
                    let released: Vec<TaskId> = waiting
                        .into_iter()
                        .filter(|id| s.task(*id).unwrap().state.kind() == TaskStateKind::Queued)
                        .collect();
                    let mut after = plan(&s, &policy).assignments;
                    after.retain(|a| released.contains(&a.task));
                    prop_assert_eq!(&ahead, &after);
                    speculated.set(speculated.get() + usize::from(!ahead.is_empty()));
                }
                // Keep tasks moving so completions have dependents to release.
                let p = plan(&s, &policy);
                let _ = s.apply(&Command::new(
                    now,
                    Op::Assign { assignments: p.assignments, planned_at: 0 },
                ));
            }
            Ok(())
        })
        .unwrap();
    // The property must have been exercised, not only trivially satisfied.
    assert!(speculated.get() >= 30, "only {} speculative plans were non-empty", speculated.get());
}

/// A batch entry is exactly its operations applied one after another: same responses, same
/// state, same events.
#[test]
fn a_batch_equals_its_operations_in_sequence() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(proptest::collection::vec((op_strategy(), 0u64..150), 1..40), 1usize..6),
            |(ops, group)| {
                let mut single = newest_state();
                let mut batched = newest_state();
                let mut now = 1_000;
                for chunk in ops.chunks(group) {
                    now += chunk[0].1;
                    // Concretize against the single-apply state; both states are equal here.
                    let mut concrete = Vec::new();
                    let mut expected = Vec::new();
                    for (aop, _) in chunk {
                        let op = concretize(aop, &single, now);
                        expected.push(single.apply(&Command::new(now, op.clone())));
                        concrete.push(op);
                    }
                    let single_events = single.take_changes().events;
                    let r = batched.apply(&Command::new(now, Op::Batch(concrete)));
                    prop_assert_eq!(r, Ok(Output::Batch(expected)));
                    prop_assert_eq!(batched.take_changes().events, single_events);
                    prop_assert_eq!(batched.digest(), single.digest());
                }
                Ok(())
            },
        )
        .unwrap();
}

/// A fresh state at this build's command version, so every kind the generator makes is
/// accepted (the version gate has its own tests in tests/apply.rs).
fn newest_state() -> SchedulerState {
    let mut s = SchedulerState::new();
    s.apply(&Command::new(0, Op::SetClusterVersion { version: COMMAND_VERSION }))
        .expect("a fresh state takes any version");
    s.take_changes();
    s
}
