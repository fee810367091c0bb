//! The operator's lifecycle commands: retry (alone and with dependents), undrain, remove a
//! worker, pause and resume a queue. Invariants are checked after every apply by the harness.

mod common;

use common::*;
use state_machine::*;

fn once(name: &str) -> TaskSpec {
    let mut s = spec(name);
    s.retry.max_attempts = 1;
    s
}

/// Run `id` on `worker` and fail it for good (its policy allows one attempt).
fn run_and_fail(h: &mut H, id: TaskId, worker: &str) -> Fence {
    let f = h.assign(id, worker).expect("assign");
    h.fail(worker, id, f, true).expect("fail");
    assert_eq!(h.kind(id), TaskStateKind::Failed);
    f
}

fn retry(h: &mut H, task: TaskId, with_dependents: bool) -> Result<Output, Rejection> {
    h.apply(Op::RetryTask { task, with_dependents })
}

// ----- retry ------------------------------------------------------------------------------

#[test]
fn a_failed_task_runs_again_with_a_new_attempt_and_a_larger_fence() {
    let mut h = H::new();
    h.worker("w1", 4);
    let a = h.submit1(once("a"));
    let f1 = run_and_fail(&mut h, a, "w1");
    h.s.take_changes();
    assert_eq!(retry(&mut h, a, false), Ok(Output::Retried(vec![(a, TaskStateKind::Queued)])));
    let ch = h.s.take_changes();
    assert_eq!(ch.events.len(), 1, "the retry is an event on the stream");
    assert_eq!((ch.events[0].task, ch.events[0].state), (a, TaskStateKind::Queued));
    let t = h.task(a);
    assert_eq!((t.attempt, t.attempt_base), (1, 1));
    assert_eq!(t.last_failure.as_ref().map(|f| f.attempt), Some(1), "history is kept");
    // A late report of the old attempt changes nothing.
    assert!(h.complete("w1", a, f1).is_err());
    assert_eq!(h.kind(a), TaskStateKind::Queued);
    let f2 = h.assign(a, "w1").unwrap();
    assert!(f2 > f1);
    assert_eq!(h.task(a).attempt, 2);
    h.complete("w1", a, f2).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Succeeded);
}

#[test]
fn a_retried_run_gets_its_whole_retry_policy_again() {
    let mut h = H::new();
    h.worker("w1", 4);
    let mut s = spec("a");
    s.retry.max_attempts = 2;
    s.retry.initial_backoff_ms = 0;
    let a = h.submit1(s);
    for _ in 0..2 {
        let f = h.assign(a, "w1").unwrap();
        h.fail("w1", a, f, true).unwrap();
    }
    assert_eq!(h.kind(a), TaskStateKind::Failed);
    retry(&mut h, a, false).unwrap();
    let f = h.assign(a, "w1").unwrap();
    h.fail("w1", a, f, true).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Queued, "attempt 3 is the first of the new run");
    let f = h.assign(a, "w1").unwrap();
    h.fail("w1", a, f, true).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Failed);
    assert_eq!(h.task(a).attempt, 4);
    let text = h.s.explain(a).unwrap().to_string();
    assert!(text.contains("attempt 4 of 4"), "{text}");
}

#[test]
fn retry_is_refused_for_unfinished_and_succeeded_tasks() {
    let mut h = H::new();
    h.worker("w1", 4);
    let q = h.submit1(spec("queued"));
    let before = h.s.digest();
    let r = retry(&mut h, q, false);
    assert!(
        matches!(&r, Err(Rejection::InvalidState { state: TaskStateKind::Queued, .. })),
        "{r:?}"
    );
    assert!(r.unwrap_err().to_string().contains("is queued"));
    assert_eq!(h.s.digest(), before, "a refused retry changes nothing");
    let f = h.assign(q, "w1").unwrap();
    assert!(matches!(
        retry(&mut h, q, true),
        Err(Rejection::InvalidState { state: TaskStateKind::Assigned, .. })
    ));
    h.complete("w1", q, f).unwrap();
    let r = retry(&mut h, q, false);
    assert!(matches!(&r, Err(Rejection::InvalidState { state: TaskStateKind::Succeeded, .. })));
    assert!(r.unwrap_err().to_string().contains("submit a new task"));
    assert_eq!(retry(&mut h, TaskId(99), false), Err(Rejection::TaskNotFound { task: TaskId(99) }));
}

#[test]
fn a_cancelled_task_can_be_retried() {
    let mut h = H::new();
    let a = h.submit1(spec("a"));
    h.apply(Op::Cancel { ids: vec![a], reason: "oops".into() }).unwrap();
    retry(&mut h, a, false).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Queued);
}

#[test]
fn without_dependents_they_stay_upstream_failed() {
    let mut h = H::new();
    h.worker("w1", 4);
    let ids = h.submit(vec![nt(once("a"), vec![]), nt(spec("b"), vec![DepRef::Batch(0)])]);
    run_and_fail(&mut h, ids[0], "w1");
    assert_eq!(h.kind(ids[1]), TaskStateKind::UpstreamFailed);
    retry(&mut h, ids[0], false).unwrap();
    assert_eq!(h.kind(ids[1]), TaskStateKind::UpstreamFailed);
    // The dependent alone now waits on the retried task.
    assert_eq!(
        retry(&mut h, ids[1], false),
        Ok(Output::Retried(vec![(ids[1], TaskStateKind::Waiting)]))
    );
    let f = h.assign(ids[0], "w1").unwrap();
    h.complete("w1", ids[0], f).unwrap();
    assert_eq!(h.kind(ids[1]), TaskStateKind::Queued);
}

#[test]
fn retrying_a_task_whose_dependency_failed_names_the_dependency() {
    let mut h = H::new();
    h.worker("w1", 4);
    let ids = h.submit(vec![nt(once("a"), vec![]), nt(spec("b"), vec![DepRef::Batch(0)])]);
    run_and_fail(&mut h, ids[0], "w1");
    let before = h.s.digest();
    let r = retry(&mut h, ids[1], true);
    let Err(Rejection::InvalidState { state: TaskStateKind::UpstreamFailed, reason, .. }) = &r
    else {
        panic!("{r:?}")
    };
    assert!(reason.contains(&format!("dependency {} is failed", ids[0])), "{reason}");
    assert_eq!(h.s.digest(), before);
}

/// a -> b -> c, a -> d; e (failed) -> d; f (cancelled by hand) -> g, with f depending on a.
#[test]
fn with_dependents_reruns_the_failed_subtree_that_can_run_and_holds_it_behind_the_root() {
    let mut h = H::new();
    h.worker("w1", 8);
    let ids = h.submit(vec![
        nt(once("a"), vec![]),                                   // 0
        nt(spec("b"), vec![DepRef::Batch(0)]),                   // 1
        nt(spec("c"), vec![DepRef::Batch(1)]),                   // 2
        nt(spec("d"), vec![DepRef::Batch(0), DepRef::Batch(4)]), // 3
        nt(once("e"), vec![]),                                   // 4
        nt(spec("f"), vec![DepRef::Batch(0)]),                   // 5
        nt(spec("g"), vec![DepRef::Batch(5)]),                   // 6
        nt(spec("ok"), vec![]),                                  // 7
    ]);
    let [a, b, c, d, e, f, g, ok] = ids[..] else { unreachable!() };
    h.apply(Op::Cancel { ids: vec![f], reason: "by hand".into() }).unwrap();
    let fo = h.assign(ok, "w1").unwrap();
    h.complete("w1", ok, fo).unwrap();
    run_and_fail(&mut h, e, "w1");
    run_and_fail(&mut h, a, "w1");
    for t in [b, c, d, g] {
        assert_eq!(h.kind(t), TaskStateKind::UpstreamFailed, "task {t}");
    }
    let r = retry(&mut h, a, true).unwrap();
    assert_eq!(
        r,
        Output::Retried(vec![
            (a, TaskStateKind::Queued),
            (b, TaskStateKind::Waiting),
            (c, TaskStateKind::Waiting),
        ])
    );
    // d also needs e, which failed; g needs f, which someone cancelled: both stay.
    assert_eq!(h.kind(d), TaskStateKind::UpstreamFailed);
    assert_eq!(h.kind(f), TaskStateKind::Cancelled);
    assert_eq!(h.kind(g), TaskStateKind::UpstreamFailed);
    // Nothing but a is placed before a succeeds.
    let placed: Vec<TaskId> = h.plan_and_assign().into_iter().map(|(t, ..)| t).collect();
    assert_eq!(placed, vec![a]);
    let fa = h.task(a).last_fence;
    h.complete("w1", a, fa).unwrap();
    assert_eq!(h.kind(b), TaskStateKind::Queued);
    assert_eq!(h.kind(c), TaskStateKind::Waiting);
    // Failing a again fails the subtree again.
    let fb = h.assign(b, "w1").unwrap();
    h.fail("w1", b, fb, false).unwrap();
    assert_eq!(h.kind(c), TaskStateKind::UpstreamFailed);
}

#[test]
fn with_dependents_reruns_failed_dependents_and_resets_their_runs() {
    let mut h = H::new();
    h.worker("w1", 8);
    // b fails on its own first; then a (which b depends on) is rerun with dependents.
    let a = h.submit1(spec("a"));
    let ids = h.submit(vec![nt(once("b"), vec![DepRef::Id(a)])]);
    let b = ids[0];
    let fa = h.assign(a, "w1").unwrap();
    h.complete("w1", a, fa).unwrap();
    run_and_fail(&mut h, b, "w1");
    // a succeeded: it cannot be retried; b can, and runs at once.
    assert!(retry(&mut h, a, true).is_err());
    assert_eq!(retry(&mut h, b, true), Ok(Output::Retried(vec![(b, TaskStateKind::Queued)])));
    assert_eq!(h.task(b).attempt_base, 1);
}

#[test]
fn a_dependent_cancelled_while_waiting_and_retried_is_released_once() {
    let mut h = H::new();
    h.worker("w1", 8);
    let ids = h.submit(vec![
        nt(spec("a"), vec![]),
        nt(spec("b"), vec![]),
        nt(spec("c"), vec![DepRef::Batch(0), DepRef::Batch(1)]),
    ]);
    let [a, b, c] = ids[..] else { unreachable!() };
    h.apply(Op::Cancel { ids: vec![c], reason: String::new() }).unwrap();
    retry(&mut h, c, false).unwrap();
    assert_eq!(h.kind(c), TaskStateKind::Waiting);
    let fa = h.assign(a, "w1").unwrap();
    h.complete("w1", a, fa).unwrap();
    assert_eq!(h.kind(c), TaskStateKind::Waiting, "still waits on b");
    let fb = h.assign(b, "w1").unwrap();
    h.complete("w1", b, fb).unwrap();
    assert_eq!(h.kind(c), TaskStateKind::Queued);
}

// ----- workers ----------------------------------------------------------------------------

#[test]
fn undrain_gives_a_drained_worker_tasks_again() {
    let mut h = H::new();
    h.worker("w1", 2);
    h.apply(Op::DrainWorker { worker: w("w1") }).unwrap();
    let a = h.submit1(spec("a"));
    assert!(h.plan_and_assign().is_empty());
    h.apply(Op::UndrainWorker { worker: w("w1") }).unwrap();
    assert_eq!(h.s.worker(&w("w1")).unwrap().status, WorkerStatus::Alive);
    assert_eq!(h.plan_and_assign().len(), 1);
    assert_eq!(h.kind(a), TaskStateKind::Assigned);
    // Undraining an alive worker is a no-op; unknown and dead workers are refused.
    h.apply(Op::UndrainWorker { worker: w("w1") }).unwrap();
    assert_eq!(
        h.apply(Op::UndrainWorker { worker: w("nope") }),
        Err(Rejection::WorkerNotFound { worker: w("nope") })
    );
    let session = h.s.worker(&w("w1")).unwrap().session;
    h.apply(Op::ExpireWorker { worker: w("w1"), session }).unwrap();
    assert!(matches!(
        h.apply(Op::UndrainWorker { worker: w("w1") }),
        Err(Rejection::WorkerUnavailable { .. })
    ));
}

#[test]
fn remove_deletes_a_dead_worker_and_refuses_a_live_one() {
    let mut h = H::new();
    let session = h.worker("w1", 2);
    let a = h.submit1(spec("a"));
    h.assign(a, "w1").unwrap();
    let before = h.s.digest();
    let r = h.apply(Op::RemoveWorker { worker: w("w1") });
    let Err(e @ Rejection::WorkerUnavailable { .. }) = &r else { panic!("{r:?}") };
    assert!(e.to_string().contains("is alive"), "{e}");
    assert_eq!(h.s.digest(), before);
    h.apply(Op::DeregisterWorker { worker: w("w1"), session }).unwrap();
    h.s.take_changes();
    assert_eq!(h.apply(Op::RemoveWorker { worker: w("w1") }), Ok(Output::WorkerRemoved));
    assert!(h.s.worker(&w("w1")).is_none());
    let ch = h.s.take_changes();
    assert!(ch.records.contains(&RecordKey::Worker(w("w1"))));
    assert_eq!(h.s.encode_record(&RecordKey::Worker(w("w1"))), None, "the record is deleted");
    assert_eq!(
        h.apply(Op::RemoveWorker { worker: w("w1") }),
        Err(Rejection::WorkerNotFound { worker: w("w1") })
    );
    // The id can register again from scratch.
    h.worker("w1", 2);
    // Retention after a removal has nothing left to purge for it.
    h.tick(10_000);
    assert!(matches!(
        h.apply(Op::Purge { finished_before: h.now, limit: 10 }),
        Ok(Output::Purged { workers: 0, .. })
    ));
}

// ----- queues -----------------------------------------------------------------------------

#[test]
fn a_paused_queue_gets_no_new_assignments_and_resumes() {
    let mut h = H::new();
    h.worker("w1", 4);
    let running = h.submit1(spec("running"));
    let fr = h.assign(running, "w1").unwrap();
    let a = h.submit1(spec("a"));
    // Planned before the pause, applied after it: refused.
    let stale_plan = plan(&h.s, &PlanPolicy::default());
    assert_eq!(stale_plan.assignments.len(), 1);
    h.s.take_changes();
    assert_eq!(
        h.apply(Op::PauseQueue { queue: "default".into() }),
        Ok(Output::QueueUpdated { paused_since: Some(h.now), changed: true })
    );
    assert!(h.s.take_changes().records.contains(&RecordKey::Queue("default".into())));
    let r = h.apply(Op::Assign { assignments: stale_plan.assignments, planned_at: 0 });
    let Ok(Output::Assigned(v)) = r else { panic!("{r:?}") };
    let Err(e) = &v[0] else { panic!("{v:?}") };
    assert!(e.to_string().contains("queue \"default\" is paused"), "{e}");
    assert!(plan(&h.s, &PlanPolicy::default()).assignments.is_empty());
    let Some(Explanation::Queued { blocker: Some(b), .. }) = h.s.explain(a) else { panic!() };
    assert!(matches!(&b, Blocker::QueuePaused { queue, .. } if queue == "default"));
    assert!(b.to_string().contains("schedctl queue resume default"), "{b}");
    // The running task finishes normally.
    h.complete("w1", running, fr).unwrap();
    // Pausing again changes nothing; other queues are not affected.
    h.tick(5);
    let again = h.apply(Op::PauseQueue { queue: "default".into() });
    assert_eq!(again, Ok(Output::QueueUpdated { paused_since: Some(h.now - 5), changed: false }));
    assert_eq!(h.s.paused_queues().count(), 1);
    assert_eq!(
        h.apply(Op::ResumeQueue { queue: "default".into() }),
        Ok(Output::QueueUpdated { paused_since: None, changed: true })
    );
    assert_eq!(h.s.queue_paused_since("default"), None);
    assert_eq!(h.plan_and_assign().len(), 1);
    assert_eq!(
        h.apply(Op::ResumeQueue { queue: "default".into() }),
        Ok(Output::QueueUpdated { paused_since: None, changed: false })
    );
}

#[test]
fn pause_checks_the_queue_name_and_survives_a_rebuild() {
    let mut h = H::new();
    assert!(matches!(
        h.apply(Op::PauseQueue { queue: String::new() }),
        Err(Rejection::InvalidArgument { .. })
    ));
    assert!(matches!(
        h.apply(Op::PauseQueue { queue: "a b".into() }),
        Err(Rejection::InvalidArgument { .. })
    ));
    h.apply(Op::PauseQueue { queue: "gpu".into() }).unwrap();
    h.apply(Op::PauseQueue { queue: "batch".into() }).unwrap();
    let mut loader = StateLoader::new();
    for (k, v) in h.s.records() {
        loader.add(&k.encode(), &v.encode()).unwrap();
    }
    let rebuilt = loader.finish();
    rebuilt.check_invariants().unwrap();
    let names: Vec<&str> = rebuilt.paused_queues().map(|q| q.queue.as_str()).collect();
    assert_eq!(names, vec!["batch", "gpu"]);
    assert_eq!(rebuilt.digest(), h.s.digest());
}

#[test]
fn the_number_of_paused_queues_is_bounded() {
    let mut h = H::new();
    for i in 0..MAX_PAUSED_QUEUES {
        h.s.apply(&Command::new(h.now, Op::PauseQueue { queue: format!("q{i}") })).unwrap();
    }
    assert!(matches!(
        h.apply(Op::PauseQueue { queue: "one-more".into() }),
        Err(Rejection::LimitExceeded { .. })
    ));
}
