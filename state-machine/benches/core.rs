//! Benchmarks of the pure core (run: `cargo bench -p state-machine --bench core`).
//!
//! * apply of one 1000-task Submit batch (and of the matching Assign and Report batches);
//! * the planner over 100k queued tasks and 1000 workers, placing 10k tasks;
//! * heap bytes per queued task, measured with a counting allocator.
//!
//! Numbers are printed, never asserted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use state_machine::*;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn task(i: u64) -> NewTask {
    let mut spec = TaskSpec::new("bench-task");
    spec.payload = format!("payload-{i}").into_bytes();
    spec.priority = (i % 5) as i32;
    spec.resources.cpu_milli = 100;
    spec.resources.memory_mib = 64;
    NewTask::new(spec)
}

fn worker(i: usize) -> WorkerSpec {
    WorkerSpec {
        id: WorkerId(format!("worker-{i:04}")),
        queues: vec!["default".into()],
        labels: BTreeMap::new(),
        capacity: Resources { cpu_milli: 8_000, memory_mib: 32_768, named: BTreeMap::new() },
        slots: 10,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    // --- apply of a 1000-task batch ---------------------------------------------------
    let mut submit_ms = Vec::new();
    let mut assign_ms = Vec::new();
    let mut report_ms = Vec::new();
    let mut s = SchedulerState::new();
    for i in 0..100 {
        s.apply(&Command::new(1, Op::RegisterWorker { spec: worker(i), instance: 1 }))
            .expect("register");
    }
    let mut now = 10;
    for round in 0..20u64 {
        now += 1;
        let batch: Vec<NewTask> = (0..1000).map(|i| task(round * 1000 + i)).collect();
        let cmd = Command::new(now, Op::Submit { tasks: batch });
        let t = Instant::now();
        let r = s.apply(&cmd);
        submit_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(r.is_ok());
        s.take_changes();

        let plan = plan(&s, &PlanPolicy { max_assignments: 1000, max_reservations: 0 });
        let cmd =
            Command::new(now, Op::Assign { assignments: plan.assignments.clone(), planned_at: 0 });
        let t = Instant::now();
        let Ok(Output::Assigned(fences)) = s.apply(&cmd) else { panic!("assign") };
        assign_ms.push(t.elapsed().as_secs_f64() * 1e3);
        s.take_changes();

        let mut by_worker: BTreeMap<WorkerId, Vec<Report>> = BTreeMap::new();
        for (a, f) in plan.assignments.iter().zip(fences) {
            by_worker.entry(a.worker.clone()).or_default().push(Report {
                task: a.task,
                fence: f.expect("fresh plan"),
                outcome: ReportKind::Succeeded { result: vec![] },
            });
        }
        let t = Instant::now();
        for (w, reports) in by_worker {
            s.apply(&Command::new(now, Op::Report { worker: w, reports })).expect("report");
        }
        report_ms.push(t.elapsed().as_secs_f64() * 1e3);
        s.take_changes();
    }
    let sub = median(submit_ms);
    println!(
        "apply Submit(1000 tasks)          median {sub:8.3} ms   {:>10.0} tasks/s",
        1000.0 / sub * 1e3
    );
    let asg = median(assign_ms);
    println!(
        "apply Assign(1000 assignments)    median {asg:8.3} ms   {:>10.0} assignments/s",
        1000.0 / asg * 1e3
    );
    let rep = median(report_ms);
    println!(
        "apply Report(1000 completions)    median {rep:8.3} ms   {:>10.0} completions/s",
        1000.0 / rep * 1e3
    );

    // --- planner: 100k queued, 1000 workers, place 10k ------------------------------------
    let mut s = SchedulerState::new();
    for i in 0..1000 {
        s.apply(&Command::new(1, Op::RegisterWorker { spec: worker(i), instance: 1 }))
            .expect("register");
    }
    let before = LIVE.load(Ordering::Relaxed);
    for round in 0..100u64 {
        let batch: Vec<NewTask> = (0..1000).map(|i| task(round * 1000 + i)).collect();
        s.apply(&Command::new(2, Op::Submit { tasks: batch })).expect("submit");
        s.take_changes();
    }
    let after = LIVE.load(Ordering::Relaxed);
    let per_task = (after - before) as f64 / 100_000.0;

    let policy = PlanPolicy { max_assignments: 10_000, max_reservations: 16 };
    let mut times = Vec::new();
    let mut placed = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&s, &policy);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        placed = p.assignments.len();
    }
    let pm = median(times);
    println!(
        "plan: 100k queued, 1000 workers    median {pm:8.3} ms   placed {placed} ({:.2} us/assignment)",
        pm * 1e3 / placed as f64
    );

    // A harder shape mix: 10 queues x 4 label sets x 3 sizes, workers split across them.
    let mut s2 = SchedulerState::new();
    for i in 0..1000 {
        let mut w = worker(i);
        w.queues = vec![format!("q{}", i % 10), format!("q{}", (i + 1) % 10)];
        w.labels.insert("zone".into(), format!("z{}", i % 4));
        s2.apply(&Command::new(1, Op::RegisterWorker { spec: w, instance: 1 })).expect("register");
    }
    for round in 0..100u64 {
        let batch: Vec<NewTask> = (0..1000)
            .map(|i| {
                let n = round * 1000 + i;
                let mut t = task(n);
                t.spec.queue = format!("q{}", n % 10);
                t.spec.labels.insert("zone".into(), format!("z{}", n % 4));
                t.spec.resources.cpu_milli = [100, 1_000, 4_000][(n % 3) as usize];
                t
            })
            .collect();
        s2.apply(&Command::new(2, Op::Submit { tasks: batch })).expect("submit");
        s2.take_changes();
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&s2, &policy);
        times.push(t.elapsed().as_secs_f64() * 1e3);
        placed = p.assignments.len();
    }
    let pm = median(times);
    println!("plan: 120 shapes, 100k queued      median {pm:8.3} ms   placed {placed}");

    println!("heap per queued task (payload ~12 B, no deps/labels): {per_task:.0} bytes");
}
