//! Helpers shared by the state-machine tests: a tiny harness that applies commands, checks
//! invariants after every apply, and builds specs tersely.
#![allow(dead_code)]

use std::collections::BTreeMap;

use state_machine::*;

pub struct H {
    pub s: SchedulerState,
    pub now: u64,
}

impl H {
    /// A fresh state at this build's command version (every kind of operation accepted).
    pub fn new() -> Self {
        let mut h = H::base();
        h.s.apply(&Command::new(0, Op::SetClusterVersion { version: COMMAND_VERSION }))
            .expect("a fresh state takes any version");
        h.s.take_changes();
        h
    }

    /// A fresh state as a new cluster starts: at the base command version.
    pub fn base() -> Self {
        H { s: SchedulerState::new(), now: 1_000 }
    }

    /// Apply at the current time, check invariants, return the response.
    pub fn apply(&mut self, op: Op) -> Response {
        let r = self.s.apply(&Command::new(self.now, op));
        if let Err(errs) = self.s.check_invariants() {
            panic!("invariants violated: {errs:#?}");
        }
        r
    }

    pub fn tick(&mut self, ms: u64) {
        self.now += ms;
    }

    pub fn submit(&mut self, tasks: Vec<NewTask>) -> Vec<TaskId> {
        match self.apply(Op::Submit { tasks }) {
            Ok(Output::Submitted(v)) => v.into_iter().map(|s| s.id).collect(),
            other => panic!("submit failed: {other:?}"),
        }
    }

    pub fn submit1(&mut self, spec: TaskSpec) -> TaskId {
        self.submit(vec![NewTask::new(spec)])[0]
    }

    pub fn worker(&mut self, id: &str, slots: u32) -> u64 {
        self.worker_spec(wspec(id, slots), 1)
    }

    pub fn worker_spec(&mut self, spec: WorkerSpec, instance: u64) -> u64 {
        match self.apply(Op::RegisterWorker { spec, instance }) {
            Ok(Output::Registered { session, .. }) => session,
            other => panic!("register failed: {other:?}"),
        }
    }

    pub fn assign(&mut self, task: TaskId, worker: &str) -> Result<Fence, Rejection> {
        match self.apply(Op::Assign {
            assignments: vec![Assignment { task, worker: w(worker) }],
            planned_at: 0,
        }) {
            Ok(Output::Assigned(mut v)) => v.remove(0),
            other => panic!("assign: {other:?}"),
        }
    }

    pub fn report(
        &mut self,
        worker: &str,
        task: TaskId,
        fence: Fence,
        outcome: ReportKind,
    ) -> Result<ReportOutcome, Rejection> {
        match self
            .apply(Op::Report { worker: w(worker), reports: vec![Report { task, fence, outcome }] })
        {
            Ok(Output::Reported(mut v)) => v.remove(0),
            other => panic!("report: {other:?}"),
        }
    }

    pub fn complete(
        &mut self,
        worker: &str,
        task: TaskId,
        fence: Fence,
    ) -> Result<ReportOutcome, Rejection> {
        self.report(worker, task, fence, ReportKind::Succeeded { result: b"ok".to_vec() })
    }

    pub fn fail(
        &mut self,
        worker: &str,
        task: TaskId,
        fence: Fence,
        retryable: bool,
    ) -> Result<ReportOutcome, Rejection> {
        self.report(worker, task, fence, ReportKind::Failed { message: "boom".into(), retryable })
    }

    pub fn kind(&self, id: TaskId) -> TaskStateKind {
        self.s.task(id).expect("task exists").state.kind()
    }

    pub fn task(&self, id: TaskId) -> &Task {
        self.s.task(id).expect("task exists")
    }

    /// Plan and apply one round; returns the accepted assignments.
    pub fn plan_and_assign(&mut self) -> Vec<(TaskId, WorkerId, Fence)> {
        let plan = plan(&self.s, &PlanPolicy::default());
        if plan.assignments.is_empty() {
            return vec![];
        }
        let asg = plan.assignments.clone();
        match self.apply(Op::Assign { assignments: plan.assignments, planned_at: 0 }) {
            Ok(Output::Assigned(v)) => asg
                .into_iter()
                .zip(v)
                .map(|(a, r)| (a.task, a.worker, r.expect("a fresh plan applies cleanly")))
                .collect(),
            other => panic!("assign: {other:?}"),
        }
    }
}

pub fn w(id: &str) -> WorkerId {
    WorkerId(id.to_string())
}

pub fn wspec(id: &str, slots: u32) -> WorkerSpec {
    WorkerSpec {
        id: w(id),
        queues: vec!["default".into()],
        labels: BTreeMap::new(),
        capacity: Resources { cpu_milli: 8_000, memory_mib: 16_384, named: BTreeMap::new() },
        slots,
    }
}

pub fn spec(name: &str) -> TaskSpec {
    TaskSpec::new(name)
}

pub fn prio(name: &str, p: i32) -> TaskSpec {
    let mut s = TaskSpec::new(name);
    s.priority = p;
    s
}

pub fn nt(spec: TaskSpec, deps: Vec<DepRef>) -> NewTask {
    NewTask::with_deps(spec, deps)
}

pub fn keyed(name: &str, key: &str) -> TaskSpec {
    let mut s = TaskSpec::new(name);
    s.idempotency_key = Some(key.into());
    s
}
