//! Every transition and every rejection of `apply`, one behaviour per test. Invariants are
//! checked after every apply by the harness in `common`.

mod common;

use common::*;
use state_machine::*;

// ----- submit ---------------------------------------------------------------------------

#[test]
fn submit_creates_queued_tasks_with_monotonic_ids() {
    let mut h = H::new();
    let a = h.submit1(spec("a"));
    let b = h.submit1(spec("b"));
    assert_eq!((a, b), (TaskId(1), TaskId(2)));
    assert!(matches!(h.task(a).state, TaskState::Queued { since: 1_000 }));
    assert_eq!(h.s.count(TaskStateKind::Queued), 2);
}

#[test]
fn submit_reports_changed_records_and_events() {
    let mut h = H::new();
    h.s.take_changes();
    let id = h.submit1(spec("a"));
    let ch = h.s.take_changes();
    assert!(ch.records.contains(&RecordKey::of_task(id)));
    assert!(ch.records.contains(&RecordKey::Meta));
    assert_eq!(ch.events.len(), 1);
    assert_eq!(ch.events[0].task, id);
    assert_eq!(ch.events[0].state, TaskStateKind::Queued);
}

#[test]
fn batch_dependencies_by_position_wait_and_forward_references_work() {
    let mut h = H::new();
    // position 0 depends on position 1 (a forward reference).
    let ids = h.submit(vec![nt(spec("child"), vec![DepRef::Batch(1)]), nt(spec("parent"), vec![])]);
    assert_eq!(ids, vec![TaskId(1), TaskId(2)]);
    assert_eq!(h.kind(ids[0]), TaskStateKind::Waiting);
    assert_eq!(h.kind(ids[1]), TaskStateKind::Queued);
    assert_eq!(h.task(ids[0]).deps, vec![ids[1]]);
}

#[test]
fn unknown_dependency_is_refused_and_changes_nothing() {
    let mut h = H::new();
    h.submit1(spec("a"));
    let before = h.s.digest();
    let r = h.apply(Op::Submit {
        tasks: vec![nt(spec("ok"), vec![]), nt(spec("b"), vec![DepRef::Id(TaskId(99))])],
    });
    assert_eq!(
        r,
        Err(Rejection::UnknownDependency {
            field: "tasks[1].depends_on[0]".into(),
            task: TaskId(99)
        })
    );
    assert_eq!(h.s.digest(), before, "a rejected batch must change nothing");
    assert_eq!(h.s.task_count(), 1);
}

#[test]
fn cycle_in_batch_is_refused() {
    let mut h = H::new();
    h.submit1(spec("a"));
    let before = h.s.digest();
    let r = h.apply(Op::Submit {
        tasks: vec![nt(spec("a"), vec![DepRef::Batch(1)]), nt(spec("b"), vec![DepRef::Batch(0)])],
    });
    assert_eq!(r, Err(Rejection::DependencyCycle { positions: vec![0, 1] }));
    assert_eq!(h.s.digest(), before, "a rejected batch must change nothing");
}

#[test]
fn self_and_duplicate_dependencies_are_refused() {
    let mut h = H::new();
    let a = h.submit1(spec("a"));
    let r = h.apply(Op::Submit { tasks: vec![nt(spec("b"), vec![DepRef::Id(a), DepRef::Id(a)])] });
    assert!(
        matches!(r, Err(Rejection::InvalidArgument { ref field, .. }) if field == "tasks[0].depends_on[1]")
    );
    let r = h.apply(Op::Submit { tasks: vec![nt(spec("b"), vec![DepRef::Batch(0)])] });
    assert!(
        matches!(r, Err(Rejection::InvalidArgument { ref reason, .. }) if reason.contains("itself"))
    );
    // An id and a position that resolve to the same (deduplicated) task are duplicates too.
    let keyed_id = h.submit1(keyed("k", "key-a"));
    assert_eq!(keyed_id, TaskId(2));
    let r = h.apply(Op::Submit {
        tasks: vec![
            nt(keyed("k", "key-a"), vec![]),
            nt(spec("c"), vec![DepRef::Batch(0), DepRef::Id(TaskId(2))]),
        ],
    });
    assert!(
        matches!(r, Err(Rejection::InvalidArgument { ref reason, .. }) if reason.contains("duplicate"))
    );
}

#[test]
fn limits_are_enforced_at_apply() {
    let mut h = H::new();
    let mut big = spec("a");
    big.payload = vec![0; (1 << 20) + 1];
    let r = h.apply(Op::Submit { tasks: vec![nt(big, vec![])] });
    assert_eq!(r, Err(Rejection::limit("tasks[0].payload", 1 << 20, (1 << 20) + 1)));
    let r = h.apply(Op::Submit { tasks: vec![] });
    assert!(matches!(r, Err(Rejection::InvalidArgument { ref field, .. }) if field == "tasks"));
}

#[test]
fn idempotency_key_returns_the_existing_task() {
    let mut h = H::new();
    let first = h.submit1(keyed("a", "k1"));
    let r = h.apply(Op::Submit {
        tasks: vec![nt(keyed("a", "k1"), vec![]), nt(keyed("b", "k2"), vec![DepRef::Batch(0)])],
    });
    let Ok(Output::Submitted(v)) = r else { panic!("{r:?}") };
    assert_eq!(v[0], Submitted { id: first, created: false, state: TaskStateKind::Queued });
    assert!(v[1].created);
    assert_eq!(h.task(v[1].id).deps, vec![first]);
    assert_eq!(h.s.task_count(), 2);
    assert_eq!(h.s.task_by_key("k1"), Some(first));
}

#[test]
fn idempotency_key_with_a_different_body_is_refused_and_changes_nothing() {
    let mut h = H::new();
    let dep = h.submit1(spec("dep"));
    let mut t = NewTask::new(keyed("a", "k1"));
    t.depends_on = vec![DepRef::Id(dep)];
    t.delay_ms = 500;
    let first = h.submit(vec![t.clone()])[0];
    // The same body again (its relative delay included) is the same task.
    h.now += 10_000;
    assert_eq!(h.submit(vec![t.clone()]), vec![first]);
    let before = h.s.task_count();
    let conflict =
        |field: &str| Rejection::KeyConflict { key: "k1".into(), task: first, field: field.into() };
    let mut other = t.clone();
    other.spec.payload = b"something else".to_vec();
    assert_eq!(h.apply(Op::Submit { tasks: vec![other] }), Err(conflict("payload")));
    let mut other = t.clone();
    other.spec.priority = 9;
    // In a batch, the conflict refuses every task of it.
    let r = h.apply(Op::Submit { tasks: vec![NewTask::new(spec("new")), other] });
    assert_eq!(r, Err(conflict("priority")));
    let mut other = t.clone();
    other.depends_on = vec![];
    assert_eq!(h.apply(Op::Submit { tasks: vec![other] }), Err(conflict("depends_on")));
    let mut other = t.clone();
    other.spec.name = "b".into();
    let e = h.apply(Op::Submit { tasks: vec![other] }).unwrap_err();
    assert_eq!(e, conflict("name"));
    let text = e.to_string();
    assert!(text.contains("\"k1\"") && text.contains(&format!("task {first}")), "{text}");
    assert_eq!(h.s.task_count(), before, "nothing was created");
}

#[test]
fn not_before_delays_until_log_time_passes() {
    let mut h = H::new();
    let mut s = spec("later");
    s.not_before = Some(5_000);
    let id = h.submit1(s);
    assert!(matches!(h.task(id).state, TaskState::Delayed { until: 5_000 }));
    assert_eq!(h.s.next_timer(), Some(5_000));
    h.now = 4_999;
    assert_eq!(h.apply(Op::AdvanceTime), Ok(Output::Advanced { promoted: 0, timed_out: 0 }));
    assert_eq!(h.kind(id), TaskStateKind::Delayed);
    h.now = 5_000;
    assert_eq!(h.apply(Op::AdvanceTime), Ok(Output::Advanced { promoted: 1, timed_out: 0 }));
    assert_eq!(h.kind(id), TaskStateKind::Queued);
}

#[test]
fn depending_on_a_failed_task_is_upstream_failed_at_once() {
    let mut h = H::new();
    h.worker("w1", 4);
    let mut s = spec("a");
    s.retry.max_attempts = 1;
    let a = h.submit1(s);
    let f = h.assign(a, "w1").unwrap();
    h.fail("w1", a, f, true).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Failed);
    let b = h.submit(vec![nt(spec("b"), vec![DepRef::Id(a)])])[0];
    assert!(matches!(h.task(b).state, TaskState::UpstreamFailed { upstream, .. } if upstream == a));
}

#[test]
fn depending_on_a_succeeded_task_is_ready() {
    let mut h = H::new();
    h.worker("w1", 4);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    h.complete("w1", a, f).unwrap();
    let b = h.submit(vec![nt(spec("b"), vec![DepRef::Id(a)])])[0];
    assert_eq!(h.kind(b), TaskStateKind::Queued);
}

// ----- assign -------------------------------------------------------------------------

#[test]
fn assign_issues_increasing_fences_and_counts_attempts() {
    let mut h = H::new();
    h.worker("w1", 4);
    let a = h.submit1(spec("a"));
    let b = h.submit1(spec("b"));
    let fa = h.assign(a, "w1").unwrap();
    let fb = h.assign(b, "w1").unwrap();
    assert!(fb > fa);
    assert_eq!(h.task(a).attempt, 1);
    assert!(
        matches!(&h.task(a).state, TaskState::Assigned { worker, fence, .. } if worker.as_str() == "w1" && *fence == fa)
    );
    assert_eq!(h.s.held_by(&w("w1")).count(), 2);
}

#[test]
fn assign_revalidates_everything() {
    let mut h = H::new();
    h.worker("w1", 1);
    let a = h.submit1(spec("a"));
    let b = h.submit1(spec("b"));
    assert_eq!(h.assign(TaskId(77), "w1"), Err(Rejection::TaskNotFound { task: TaskId(77) }));
    assert_eq!(h.assign(a, "nope"), Err(Rejection::WorkerNotFound { worker: w("nope") }));
    h.assign(a, "w1").unwrap();
    assert!(matches!(
        h.assign(a, "w1"),
        Err(Rejection::InvalidState { state: TaskStateKind::Assigned, .. })
    ));
    assert!(
        matches!(h.assign(b, "w1"), Err(Rejection::DoesNotFit { ref reason, .. }) if reason.contains("slots"))
    );

    let mut q = spec("other-queue");
    q.queue = "gpu".into();
    let c = h.submit1(q);
    h.worker("w2", 4);
    assert!(
        matches!(h.assign(c, "w2"), Err(Rejection::DoesNotFit { ref reason, .. }) if reason.contains("queue"))
    );

    let mut l = spec("labelled");
    l.labels.insert("zone".into(), "eu".into());
    let d = h.submit1(l);
    assert!(
        matches!(h.assign(d, "w2"), Err(Rejection::DoesNotFit { ref reason, .. }) if reason.contains("zone=eu"))
    );

    let mut r = spec("hungry");
    r.resources.cpu_milli = 9_000;
    let e = h.submit1(r);
    assert!(
        matches!(h.assign(e, "w2"), Err(Rejection::DoesNotFit { ref reason, .. }) if reason.contains("cpu"))
    );

    h.apply(Op::DrainWorker { worker: w("w2") }).unwrap();
    assert!(matches!(h.assign(b, "w2"), Err(Rejection::WorkerUnavailable { .. })));
}

#[test]
fn assignments_in_one_command_share_capacity() {
    let mut h = H::new();
    h.worker("w1", 1);
    let a = h.submit1(spec("a"));
    let b = h.submit1(spec("b"));
    let r = h.apply(Op::Assign {
        assignments: vec![
            Assignment { task: a, worker: w("w1") },
            Assignment { task: b, worker: w("w1") },
        ],
        planned_at: 0,
    });
    let Ok(Output::Assigned(v)) = r else { panic!() };
    assert!(v[0].is_ok());
    assert!(matches!(v[1], Err(Rejection::DoesNotFit { .. })));
}

// ----- reports --------------------------------------------------------------------------

#[test]
fn start_then_complete_and_repeat_is_idempotent() {
    let mut h = H::new();
    h.worker("w1", 2);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    assert_eq!(
        h.report("w1", a, f, ReportKind::Started),
        Ok(ReportOutcome::Accepted(TaskStateKind::Running))
    );
    assert_eq!(
        h.report("w1", a, f, ReportKind::Started),
        Ok(ReportOutcome::Duplicate(TaskStateKind::Running))
    );
    assert_eq!(h.complete("w1", a, f), Ok(ReportOutcome::Accepted(TaskStateKind::Succeeded)));
    assert_eq!(h.complete("w1", a, f), Ok(ReportOutcome::Duplicate(TaskStateKind::Succeeded)));
    assert!(
        matches!(&h.task(a).state, TaskState::Succeeded { result, fence, .. } if result == b"ok" && *fence == f)
    );
    assert_eq!(h.s.held_by(&w("w1")).count(), 0);
}

#[test]
fn completion_may_skip_start() {
    let mut h = H::new();
    h.worker("w1", 2);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    assert_eq!(h.complete("w1", a, f), Ok(ReportOutcome::Accepted(TaskStateKind::Succeeded)));
}

#[test]
fn completion_releases_dependents_in_the_same_apply() {
    let mut h = H::new();
    h.worker("w1", 4);
    let ids = h.submit(vec![
        nt(spec("a"), vec![]),
        nt(spec("b"), vec![]),
        nt(spec("c"), vec![DepRef::Batch(0), DepRef::Batch(1)]),
    ]);
    let fa = h.assign(ids[0], "w1").unwrap();
    let fb = h.assign(ids[1], "w1").unwrap();
    h.complete("w1", ids[0], fa).unwrap();
    assert_eq!(h.kind(ids[2]), TaskStateKind::Waiting, "still waiting on b");
    assert_eq!(h.s.explain(ids[2]), Some(Explanation::Waiting { on: vec![ids[1]] }));
    h.s.take_changes();
    h.complete("w1", ids[1], fb).unwrap();
    let ch = h.s.take_changes();
    assert_eq!(h.kind(ids[2]), TaskStateKind::Queued);
    assert!(ch.events.iter().any(|e| e.task == ids[2] && e.state == TaskStateKind::Queued));
}

#[test]
fn stale_fence_and_wrong_worker_are_rejected() {
    let mut h = H::new();
    h.worker("w1", 2);
    h.worker("w2", 2);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    assert_eq!(
        h.complete("w1", a, Fence(f.0 + 100)),
        Err(Rejection::StaleFence { task: a, current: Some(f), given: Fence(f.0 + 100) })
    );
    assert_eq!(
        h.complete("w2", a, f),
        Err(Rejection::WrongWorker { task: a, holder: Some(w("w1")), given: w("w2") })
    );
    assert_eq!(h.kind(a), TaskStateKind::Assigned);
}

#[test]
fn refusal_texts_never_name_the_current_token_or_holder() {
    let mut h = H::new();
    h.worker("holder-w1", 2);
    h.worker("w2", 2);
    for i in 0..5 {
        h.submit1(spec(&format!("filler-{i}")));
    }
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "holder-w1").unwrap();
    assert_ne!(a.0, f.0, "the task id must not look like the token");
    let given = Fence(f.0 + 1000);
    let stale = h.complete("w2", a, given).unwrap_err().to_string();
    let stale_own = h.complete("holder-w1", a, given).unwrap_err().to_string();
    let wrong = h.complete("w2", a, f).unwrap_err().to_string();
    for text in [&stale, &stale_own, &wrong] {
        assert!(!text.contains("holder-w1"), "leaks the holder: {text}");
        let numbers: Vec<&str> = text.split(|c: char| !c.is_ascii_digit()).collect();
        assert!(!numbers.contains(&f.0.to_string().as_str()), "leaks the token: {text}");
    }
    assert!(stale_own.contains("stale fencing token"), "{stale_own}");
    assert!(wrong.contains("another worker"), "{wrong}");
}

#[test]
fn a_live_worker_is_bound_to_the_token_that_registered_it() {
    let mut h = H::new();
    let reg = |owner: &str, instance: u64| Op::RegisterWorkerAs {
        spec: wspec("gpu-1", 1),
        instance,
        owner: owner.into(),
    };
    let Ok(Output::Registered { session, .. }) = h.apply(reg("pool-a", 1)) else { panic!() };
    // Another token can neither reconnect nor restart (and so requeue) it.
    for instance in [1, 2] {
        assert_eq!(
            h.apply(reg("pool-b", instance)),
            Err(Rejection::WorkerOwned { worker: w("gpu-1") })
        );
    }
    assert_eq!(h.s.worker(&w("gpu-1")).unwrap().owner, "pool-a");
    // Its own token reconnects to the same session.
    assert!(
        matches!(h.apply(reg("pool-a", 1)), Ok(Output::Registered { session: s, .. }) if s == session)
    );
    // Once it is dead, the id is free for another token.
    h.apply(Op::ExpireWorker { worker: w("gpu-1"), session }).unwrap();
    assert!(h.apply(reg("pool-b", 3)).is_ok());
    assert_eq!(h.s.worker(&w("gpu-1")).unwrap().owner, "pool-b");
    // A worker registered before tokens were on is claimed by the first token.
    h.apply(Op::RegisterWorker { spec: wspec("old", 1), instance: 1 }).unwrap();
    assert!(h
        .apply(Op::RegisterWorkerAs { spec: wspec("old", 1), instance: 1, owner: "pool-a".into() })
        .is_ok());
    assert_eq!(h.s.worker(&w("old")).unwrap().owner, "pool-a");
}

#[test]
fn apply_refuses_absurd_resource_amounts_whatever_the_node_checked() {
    let mut h = H::new();
    let mut ws = wspec("greedy", 2);
    ws.capacity.cpu_milli = u64::MAX;
    let r = h.apply(Op::RegisterWorker { spec: ws, instance: 1 });
    assert_eq!(
        r,
        Err(Rejection::invalid(
            "worker.capacity.cpu_milli",
            format!("{} exceeds the maximum of {}", u64::MAX, validate::HARD.max_cpu_milli)
        ))
    );
    let mut ws = wspec("greedy", 2);
    ws.capacity.named.insert("gpu".into(), u64::MAX);
    assert!(matches!(
        h.apply(Op::RegisterWorker { spec: ws, instance: 1 }),
        Err(Rejection::InvalidArgument { field, .. }) if field == "worker.capacity[\"gpu\"]"
    ));
    let mut t = spec("huge");
    t.resources.memory_mib = u64::MAX;
    assert!(matches!(
        h.apply(Op::Submit { tasks: vec![NewTask::new(t)] }),
        Err(Rejection::InvalidArgument { field, .. }) if field == "tasks[0].resources.memory_mib"
    ));
    assert!(h.s.workers().next().is_none(), "nothing was registered");
}

#[test]
fn retryable_failure_backs_off_then_gets_a_new_fence() {
    let mut h = H::new();
    h.worker("w1", 2);
    let a = h.submit1(spec("a"));
    let f1 = h.assign(a, "w1").unwrap();
    assert_eq!(h.fail("w1", a, f1, true), Ok(ReportOutcome::Accepted(TaskStateKind::Delayed)));
    // The default policy: 1 s less its deterministic jitter (at most 20%).
    let until = 1_000 + RetryPolicy::default().backoff_after(a, 1);
    assert!((1_800..=2_000).contains(&until), "{until}");
    assert!(matches!(h.task(a).state, TaskState::Delayed { until: u } if u == until));
    assert_eq!(h.fail("w1", a, f1, true), Ok(ReportOutcome::Duplicate(TaskStateKind::Delayed)));
    assert!(matches!(
        h.s.explain(a),
        Some(Explanation::Delayed { until: u, after_failure: Some(_) }) if u == until
    ));
    h.now = until - 1;
    h.apply(Op::AdvanceTime).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Delayed, "not before the backoff ends");
    h.now = until;
    h.apply(Op::AdvanceTime).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Queued);
    let f2 = h.assign(a, "w1").unwrap();
    assert!(f2 > f1);
    assert_eq!(h.task(a).attempt, 2);
    // The first attempt's late completion is refused.
    assert_eq!(
        h.complete("w1", a, f1),
        Err(Rejection::StaleFence { task: a, current: Some(f2), given: f1 })
    );
}

#[test]
fn attempts_exhausted_fail_the_task_and_cascade() {
    let mut h = H::new();
    h.worker("w1", 2);
    let mut s = spec("a");
    s.retry.max_attempts = 2;
    s.retry.initial_backoff_ms = 0;
    let ids = h.submit(vec![
        nt(s, vec![]),
        nt(spec("b"), vec![DepRef::Batch(0)]),
        nt(spec("c"), vec![DepRef::Batch(1)]),
    ]);
    let f1 = h.assign(ids[0], "w1").unwrap();
    h.fail("w1", ids[0], f1, true).unwrap();
    assert_eq!(h.kind(ids[0]), TaskStateKind::Queued, "zero backoff requeues at once");
    let f2 = h.assign(ids[0], "w1").unwrap();
    h.fail("w1", ids[0], f2, true).unwrap();
    assert_eq!(h.kind(ids[0]), TaskStateKind::Failed);
    assert!(
        matches!(h.task(ids[1]).state, TaskState::UpstreamFailed { upstream, .. } if upstream == ids[0])
    );
    assert!(
        matches!(h.task(ids[2]).state, TaskState::UpstreamFailed { upstream, .. } if upstream == ids[1])
    );
}

#[test]
fn fatal_failure_is_not_retried() {
    let mut h = H::new();
    h.worker("w1", 2);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    h.fail("w1", a, f, false).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Failed);
    assert_eq!(h.task(a).last_failure.as_ref().unwrap().kind, FailureKind::Fatal);
}

#[test]
fn report_on_an_unknown_task_or_after_the_end_is_refused() {
    let mut h = H::new();
    h.worker("w1", 2);
    assert_eq!(
        h.complete("w1", TaskId(5), Fence(1)),
        Err(Rejection::TaskNotFound { task: TaskId(5) })
    );
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    h.apply(Op::Cancel { ids: vec![a], reason: "stop".into() }).unwrap();
    assert!(matches!(
        h.complete("w1", a, f),
        Err(Rejection::InvalidState { state: TaskStateKind::Cancelled, .. })
    ));
    let b = h.submit1(spec("b"));
    assert_eq!(
        h.complete("w1", b, Fence(1)),
        Err(Rejection::StaleFence { task: b, current: None, given: Fence(1) })
    );
}

#[test]
fn oversized_result_is_refused() {
    let mut h = H::new();
    h.worker("w1", 2);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    let r = h.report("w1", a, f, ReportKind::Succeeded { result: vec![0; (1 << 20) + 1] });
    assert!(matches!(r, Err(Rejection::LimitExceeded { .. })));
    assert_eq!(h.kind(a), TaskStateKind::Assigned);
}

// ----- cancel ---------------------------------------------------------------------------

#[test]
fn cancel_cascades_and_is_idempotent() {
    let mut h = H::new();
    let ids = h.submit(vec![
        nt(spec("a"), vec![]),
        nt(spec("b"), vec![DepRef::Batch(0)]),
        nt(spec("c"), vec![DepRef::Batch(1)]),
    ]);
    let r = h.apply(Op::Cancel { ids: vec![ids[0]], reason: "user".into() });
    assert_eq!(
        r,
        Ok(Output::Cancelled(vec![Ok(CancelOutcome::Cancelled {
            dependents: vec![ids[1], ids[2]]
        })]))
    );
    let r = h.apply(Op::Cancel { ids: vec![ids[0], TaskId(42)], reason: "again".into() });
    assert_eq!(
        r,
        Ok(Output::Cancelled(vec![
            Ok(CancelOutcome::AlreadyCancelled),
            Err(Rejection::TaskNotFound { task: TaskId(42) })
        ]))
    );
}

#[test]
fn cancelling_a_running_task_revokes_it_from_its_worker() {
    let mut h = H::new();
    h.worker("w1", 1);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    h.report("w1", a, f, ReportKind::Started).unwrap();
    h.s.take_changes();
    h.apply(Op::Cancel { ids: vec![a], reason: "".into() }).unwrap();
    let ch = h.s.take_changes();
    assert_eq!(ch.events[0].revoked_from, Some((w("w1"), f)));
    assert_eq!(h.s.held_by(&w("w1")).count(), 0, "the slot is free again");
}

#[test]
fn a_finished_task_cannot_be_cancelled() {
    let mut h = H::new();
    h.worker("w1", 1);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    h.complete("w1", a, f).unwrap();
    let r = h.apply(Op::Cancel { ids: vec![a], reason: "".into() });
    assert!(
        matches!(r, Ok(Output::Cancelled(ref v)) if matches!(v[0], Err(Rejection::InvalidState { state: TaskStateKind::Succeeded, .. })))
    );
}

// ----- workers ----------------------------------------------------------------------------

#[test]
fn reconnect_keeps_session_and_tasks_restart_requeues() {
    let mut h = H::new();
    let s1 = h.worker_spec(wspec("w1", 2), 7);
    let a = h.submit1(spec("a"));
    let f = h.assign(a, "w1").unwrap();
    // Same instance: a reconnect.
    assert_eq!(h.worker_spec(wspec("w1", 2), 7), s1);
    assert_eq!(h.kind(a), TaskStateKind::Assigned);
    // New instance: a restart; the old attempt is lost.
    let r = h.apply(Op::RegisterWorker { spec: wspec("w1", 2), instance: 8 });
    let Ok(Output::Registered { session: s2, requeued }) = r else { panic!("{r:?}") };
    assert!(s2 > s1);
    assert_eq!(requeued, vec![a]);
    assert_eq!(h.kind(a), TaskStateKind::Queued);
    assert_eq!(h.task(a).last_failure.as_ref().unwrap().kind, FailureKind::WorkerLost);
    assert_eq!(
        h.complete("w1", a, f),
        Err(Rejection::StaleFence { task: a, current: None, given: f })
    );
}

#[test]
fn reconnect_cannot_shrink_below_what_is_held() {
    let mut h = H::new();
    h.worker_spec(wspec("w1", 2), 1);
    let a = h.submit1(spec("a"));
    let b = h.submit1(spec("b"));
    h.assign(a, "w1").unwrap();
    h.assign(b, "w1").unwrap();
    let r = h.apply(Op::RegisterWorker { spec: wspec("w1", 1), instance: 1 });
    assert!(
        matches!(r, Err(Rejection::InvalidArgument { ref field, .. }) if field == "worker.slots")
    );
}

#[test]
fn invalid_worker_registration_names_the_field() {
    let mut h = H::new();
    let mut s = wspec("w 1", 1);
    let r = h.apply(Op::RegisterWorker { spec: s.clone(), instance: 1 });
    assert!(matches!(r, Err(Rejection::InvalidArgument { ref field, .. }) if field == "worker.id"));
    s.id = w("w1");
    s.queues.clear();
    let r = h.apply(Op::RegisterWorker { spec: s.clone(), instance: 1 });
    assert!(
        matches!(r, Err(Rejection::InvalidArgument { ref field, .. }) if field == "worker.queues")
    );
    s.queues = vec!["q".into()];
    s.slots = 0;
    let r = h.apply(Op::RegisterWorker { spec: s, instance: 1 });
    assert!(
        matches!(r, Err(Rejection::InvalidArgument { ref field, .. }) if field == "worker.slots")
    );
}

#[test]
fn expiry_requeues_with_a_new_attempt_and_rejects_stale_sessions() {
    let mut h = H::new();
    let s = h.worker("w1", 2);
    h.worker("w2", 2);
    let a = h.submit1(spec("a"));
    let f1 = h.assign(a, "w1").unwrap();
    let r = h.apply(Op::ExpireWorker { worker: w("w1"), session: s + 100 });
    assert!(matches!(r, Err(Rejection::WorkerUnavailable { .. })));
    h.s.take_changes();
    let r = h.apply(Op::ExpireWorker { worker: w("w1"), session: s });
    assert_eq!(r, Ok(Output::WorkerUpdated { requeued: vec![a] }));
    let ch = h.s.take_changes();
    assert_eq!(ch.events[0].revoked_from, Some((w("w1"), f1)));
    assert!(matches!(
        h.s.worker(&w("w1")).unwrap().status,
        WorkerStatus::Dead { reason: DeathReason::Expired, .. }
    ));
    // Repeating the same expiry is harmless.
    assert_eq!(
        h.apply(Op::ExpireWorker { worker: w("w1"), session: s }),
        Ok(Output::WorkerUpdated { requeued: vec![] })
    );
    let f2 = h.assign(a, "w2").unwrap();
    assert!(f2 > f1);
    assert!(matches!(h.complete("w1", a, f1), Err(Rejection::StaleFence { .. })));
    assert_eq!(h.complete("w2", a, f2), Ok(ReportOutcome::Accepted(TaskStateKind::Succeeded)));
}

#[test]
fn worker_loss_counts_as_an_attempt() {
    let mut h = H::new();
    let mut s = spec("a");
    s.retry.max_attempts = 1;
    let a = h.submit1(s);
    let sess = h.worker("w1", 1);
    h.assign(a, "w1").unwrap();
    h.apply(Op::ExpireWorker { worker: w("w1"), session: sess }).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Failed);
}

#[test]
fn draining_keeps_tasks_but_takes_no_new_ones_and_deregister_requeues() {
    let mut h = H::new();
    let s = h.worker("w1", 4);
    let a = h.submit1(spec("a"));
    h.assign(a, "w1").unwrap();
    h.apply(Op::DrainWorker { worker: w("w1") }).unwrap();
    assert_eq!(h.kind(a), TaskStateKind::Assigned);
    h.submit1(spec("b"));
    assert!(h.plan_and_assign().is_empty());
    assert_eq!(
        h.apply(Op::DeregisterWorker { worker: w("w1"), session: s }),
        Ok(Output::WorkerUpdated { requeued: vec![a] })
    );
    assert!(matches!(
        h.apply(Op::DrainWorker { worker: w("w1") }),
        Err(Rejection::WorkerUnavailable { .. })
    ));
    assert!(matches!(
        h.apply(Op::DrainWorker { worker: w("zz") }),
        Err(Rejection::WorkerNotFound { .. })
    ));
    // A dead worker can come back with a fresh session.
    let s2 = h.worker("w1", 4);
    assert!(s2 > s);
    assert_eq!(h.s.worker(&w("w1")).unwrap().status, WorkerStatus::Alive);
}

// ----- time -------------------------------------------------------------------------------

#[test]
fn attempt_timeout_fails_the_attempt() {
    let mut h = H::new();
    h.worker("w1", 1);
    let mut s = spec("slow");
    s.timeout_ms = Some(500);
    let a = h.submit1(s);
    let f = h.assign(a, "w1").unwrap();
    assert_eq!(h.s.next_timer(), Some(1_500));
    h.tick(499);
    assert_eq!(h.apply(Op::AdvanceTime), Ok(Output::Advanced { promoted: 0, timed_out: 0 }));
    h.tick(1);
    h.s.take_changes();
    assert_eq!(h.apply(Op::AdvanceTime), Ok(Output::Advanced { promoted: 0, timed_out: 1 }));
    assert_eq!(h.kind(a), TaskStateKind::Delayed);
    assert_eq!(h.task(a).last_failure.as_ref().unwrap().kind, FailureKind::Timeout);
    let ch = h.s.take_changes();
    assert_eq!(ch.events[0].revoked_from, Some((w("w1"), f)));
}

#[test]
fn log_time_never_moves_backwards() {
    let mut h = H::new();
    h.now = 10_000;
    h.submit1(spec("a"));
    h.now = 5_000; // a new leader with a slow clock
    let b = h.submit1(spec("b"));
    assert_eq!(h.s.log_time(), 10_000);
    assert_eq!(h.task(b).submitted_at, 10_000);
}

// ----- purge ------------------------------------------------------------------------------

#[test]
fn purge_removes_old_terminal_tasks_and_frees_keys() {
    let mut h = H::new();
    let sess = h.worker("w1", 4);
    let a = h.submit1(keyed("a", "ka"));
    let b = h.submit1(spec("b"));
    let f = h.assign(a, "w1").unwrap();
    h.complete("w1", a, f).unwrap();
    h.tick(1_000);
    h.apply(Op::ExpireWorker { worker: w("w1"), session: sess }).unwrap();
    h.tick(1_000);
    // Cut-off before the completion: nothing goes.
    assert_eq!(
        h.apply(Op::Purge { finished_before: 1_000, limit: 10 }),
        Ok(Output::Purged { tasks: 0, workers: 0 })
    );
    assert_eq!(
        h.apply(Op::Purge { finished_before: 5_000, limit: 10 }),
        Ok(Output::Purged { tasks: 1, workers: 1 })
    );
    assert!(h.s.task(a).is_none());
    assert_eq!(h.kind(b), TaskStateKind::Queued, "non-terminal tasks stay");
    assert!(h.s.worker(&w("w1")).is_none());
    // The key is free again: a new task, with a new id.
    let a2 = h.submit1(keyed("a", "ka"));
    assert!(a2 > b);
}

#[test]
fn purge_respects_its_limit() {
    let mut h = H::new();
    let ids: Vec<TaskId> = (0..5).map(|i| h.submit1(spec(&format!("t{i}")))).collect();
    h.apply(Op::Cancel { ids: ids.clone(), reason: "".into() }).unwrap();
    h.tick(10);
    assert_eq!(
        h.apply(Op::Purge { finished_before: h.now, limit: 2 }),
        Ok(Output::Purged { tasks: 2, workers: 0 })
    );
    assert_eq!(h.s.task_count(), 3);
}

// ----- explain ----------------------------------------------------------------------------

#[test]
fn explain_names_the_obstacle() {
    let mut h = H::new();
    let mut gpu = spec("train");
    gpu.queue = "gpu".into();
    gpu.resources.named.insert("gpu".into(), 2);
    let t = h.submit1(gpu.clone());
    let blocker = |h: &H| match h.s.explain(t) {
        Some(Explanation::Queued { blocker, .. }) => blocker,
        other => panic!("{other:?}"),
    };
    assert_eq!(blocker(&h), Some(Blocker::NoWorkerForQueue { queue: "gpu".into() }));

    let mut ws = wspec("g1", 2);
    ws.queues = vec!["gpu".into()];
    ws.capacity.named.insert("gpu".into(), 1);
    h.worker_spec(ws.clone(), 1);
    assert_eq!(
        blocker(&h),
        Some(Blocker::TooLarge { resource: "gpu".into(), need: 2, largest: 1 })
    );

    ws.capacity.named.insert("gpu".into(), 2);
    h.worker_spec(ws, 2);
    assert_eq!(blocker(&h), None);
    let text = h.s.explain(t).unwrap().to_string();
    assert!(text.contains("will be placed"), "{text}");

    // Occupy the worker's gpus with another task: now it is busy.
    let other = h.submit1(gpu);
    let f = h.assign(t, "g1").unwrap();
    assert_eq!(
        h.s.explain(other).map(|e| match e {
            Explanation::Queued { blocker, .. } => blocker,
            e => panic!("{e:?}"),
        }),
        Some(Some(Blocker::Busy { eligible: 1, short: Some(("gpu".into(), 2, 0)) }))
    );
    assert!(
        matches!(h.s.explain(t), Some(Explanation::Assigned { attempt: 1, fence, .. }) if fence == f)
    );

    let mut lab = spec("labelled");
    lab.labels.insert("ssd".into(), "yes".into());
    let l = h.submit1(lab);
    h.worker("w1", 1);
    assert_eq!(
        h.s.explain(l).map(|e| match e {
            Explanation::Queued { blocker, .. } => blocker,
            e => panic!("{e:?}"),
        }),
        Some(Some(Blocker::MissingLabel { queue: "default".into(), label: "ssd=yes".into() }))
    );
    assert_eq!(h.s.explain(TaskId(999)), None);
}

#[test]
fn explain_counts_tasks_ahead() {
    let mut h = H::new();
    h.submit1(prio("low", 0));
    h.submit1(prio("high", 5));
    let mid = h.submit1(prio("mid", 1));
    assert!(matches!(h.s.explain(mid), Some(Explanation::Queued { ahead: 1, .. })));
}

// ----- records ----------------------------------------------------------------------------

#[test]
fn state_rebuilt_from_records_is_identical() {
    let mut h = H::new();
    h.worker("w1", 2);
    h.worker("w2", 1);
    let ids = h.submit(vec![
        nt(prio("a", 3), vec![]),
        nt(keyed("b", "kb"), vec![DepRef::Batch(0)]),
        nt(spec("c"), vec![]),
        nt(spec("d"), vec![]),
    ]);
    let mut delayed = spec("later");
    delayed.not_before = Some(99_999);
    h.submit1(delayed);
    let asg = h.plan_and_assign();
    assert!(!asg.is_empty());
    let (t, wk, f) = asg[0].clone();
    h.complete(wk.as_str(), t, f).unwrap();
    h.apply(Op::Cancel { ids: vec![ids[3]], reason: "x".into() }).unwrap();

    let mut loader = StateLoader::new();
    for (k, v) in h.s.records() {
        loader.add(&k.encode(), &v.encode()).unwrap();
    }
    let rebuilt = loader.finish();
    rebuilt.check_invariants().unwrap();
    assert_eq!(rebuilt.digest(), h.s.digest());
    assert_eq!(plan(&rebuilt, &PlanPolicy::default()), plan(&h.s, &PlanPolicy::default()));
    assert_eq!(rebuilt.counts(), h.s.counts());
    assert_eq!(rebuilt.next_timer(), h.s.next_timer());
    assert_eq!(rebuilt.task_by_key("kb"), Some(ids[1]));
}

#[test]
fn changes_name_deleted_records_too() {
    let mut h = H::new();
    let a = h.submit1(spec("a"));
    h.apply(Op::Cancel { ids: vec![a], reason: "".into() }).unwrap();
    h.tick(10);
    h.s.take_changes();
    h.apply(Op::Purge { finished_before: h.now, limit: 10 }).unwrap();
    let ch = h.s.take_changes();
    assert!(ch.records.contains(&RecordKey::of_task(a)));
    assert_eq!(
        h.s.encode_record(&RecordKey::of_task(a)),
        None,
        "the only task of its chunk is gone"
    );
}

#[test]
fn relative_delay_is_measured_from_the_submit_log_time() {
    let mut h = H::new();
    let mut t = NewTask::new(spec("later"));
    t.delay_ms = 250;
    let id = h.submit(vec![t])[0];
    assert_eq!(h.task(id).spec.not_before, Some(1_250));
    assert!(matches!(h.task(id).state, TaskState::Delayed { until: 1_250 }));
}

#[test]
fn a_late_report_from_an_older_attempt_is_stale_even_after_success() {
    let mut h = H::new();
    let s1 = h.worker("w1", 1);
    h.worker("w2", 1);
    let a = h.submit1(spec("a"));
    let f1 = h.assign(a, "w1").unwrap();
    h.apply(Op::ExpireWorker { worker: w("w1"), session: s1 }).unwrap();
    let f2 = h.assign(a, "w2").unwrap();
    h.complete("w2", a, f2).unwrap();
    assert_eq!(
        h.complete("w1", a, f1),
        Err(Rejection::StaleFence { task: a, current: None, given: f1 })
    );
}

#[test]
fn a_workers_own_report_does_not_revoke_its_task() {
    let mut h = H::new();
    h.worker("w1", 2);
    let a = h.submit1(spec("a"));
    let b = h.submit1(spec("b"));
    let fa = h.assign(a, "w1").unwrap();
    let fb = h.assign(b, "w1").unwrap();
    h.s.take_changes();
    h.complete("w1", a, fa).unwrap();
    h.fail("w1", b, fb, true).unwrap();
    let ch = h.s.take_changes();
    assert!(ch.events.iter().all(|e| e.revoked_from.is_none()), "{:?}", ch.events);
    assert!(matches!(h.task(a).state, TaskState::Succeeded { started_at: 1_000, .. }));
}

#[test]
fn planned_at_of_a_batch_is_its_earliest_assign() {
    let assign = |planned_at| Op::Assign { assignments: vec![], planned_at };
    assert_eq!(assign(7).planned_at(), Some(7));
    assert_eq!(Op::AdvanceTime.planned_at(), None);
    let batch = Op::Batch(vec![Op::AdvanceTime, assign(9), assign(4)]);
    assert_eq!(batch.planned_at(), Some(4));
    assert_eq!(Op::Batch(vec![Op::AdvanceTime]).planned_at(), None);
}

// ----- cluster command version ------------------------------------------------------------

/// Rebuild the state from its encoded records, as a restart or a snapshot install does.
fn reloaded(s: &SchedulerState) -> SchedulerState {
    let mut loader = StateLoader::new();
    for (k, v) in s.records() {
        loader.add(&k.encode(), &v.encode()).unwrap();
    }
    loader.finish()
}

#[test]
fn the_cluster_version_starts_at_the_base_and_only_rises() {
    let mut h = H::base();
    h.submit1(spec("a"));
    assert_eq!(h.s.cluster_version(), BASE_COMMAND_VERSION);
    // A state of the first release has no version record: same records, same digest.
    assert!(h.s.records().all(|(k, _)| k != RecordKey::ClusterVersion));
    let before = h.s.digest();

    h.s.take_changes();
    let r = h.apply(Op::SetClusterVersion { version: 2 });
    assert_eq!(r, Ok(Output::ClusterVersion { version: 2 }));
    assert!(h.s.take_changes().records.contains(&RecordKey::ClusterVersion));
    assert_ne!(h.s.digest(), before, "the version is part of the replicated state");
    let back = reloaded(&h.s);
    assert_eq!(back.cluster_version(), 2);
    assert_eq!(back.digest(), h.s.digest());

    // Lowering is ignored, and changes nothing.
    let digest = h.s.digest();
    let r = h.apply(Op::SetClusterVersion { version: 1 });
    assert_eq!(r, Ok(Output::ClusterVersion { version: 2 }));
    assert_eq!(h.s.digest(), digest);
}

#[test]
fn every_kind_has_a_version_within_this_build() {
    let ops = [
        Op::AdvanceTime,
        Op::SetClusterVersion { version: 2 },
        Op::Batch(vec![Op::AdvanceTime, Op::SetClusterVersion { version: 2 }]),
        Op::Batch(vec![]),
    ];
    for op in &ops {
        assert!((BASE_COMMAND_VERSION..=COMMAND_VERSION).contains(&op.version()), "{op:?}");
    }
    assert_eq!(ops[2].version(), 2, "a batch needs its newest operation's version");
    assert_eq!(ops[3].version(), BASE_COMMAND_VERSION);
}

#[test]
fn a_kind_newer_than_the_cluster_version_is_refused_and_changes_nothing() {
    let mut h = H::base();
    h.submit1(spec("a"));
    let before = h.s.digest();
    let pause = Op::PauseQueue { queue: "default".into() };
    assert_eq!(
        h.apply(pause.clone()),
        Err(Rejection::ClusterVersion { kind: "pause queue".into(), needed: 2, current: 1 })
    );
    assert_eq!(h.s.digest(), before);
    // In a batch only the newer item is refused.
    let r =
        h.apply(Op::Batch(vec![Op::Submit { tasks: vec![nt(spec("b"), vec![])] }, pause.clone()]));
    let Ok(Output::Batch(items)) = r else { panic!("{r:?}") };
    assert!(items[0].is_ok());
    assert!(matches!(items[1], Err(Rejection::ClusterVersion { .. })));
    // Raised, it is accepted.
    h.apply(Op::SetClusterVersion { version: 2 }).unwrap();
    assert!(h.apply(pause).is_ok());
}
