//! Deterministic tests of the worker core: build a core, feed inputs, assert the exact effects.

use super::*;

#[test]
fn recent_is_bounded() {
    let mut r = Recent::default();
    for i in 0..(RECENT_CAPACITY as u64 + 10) {
        r.insert((i, 1));
    }
    assert!(!r.contains(&(0, 1)));
    assert!(r.contains(&(RECENT_CAPACITY as u64 + 9, 1)));
    assert_eq!(r.len(), RECENT_CAPACITY);
}

const SESSION: Session = Session {
    id: 7,
    heartbeat_interval: Duration::from_millis(100),
    ttl: Duration::from_millis(1000),
};

fn core() -> Core {
    Core::new(CoreConfig {
        id: "w".into(),
        drain_grace: Duration::from_secs(30),
        stop_grace: Duration::from_secs(10),
    })
}

/// A registered core whose stream is open; returns it and the stream generation.
fn registered() -> (Core, u64) {
    let mut c = core();
    let fx = c.step(Input::Registered { session: SESSION, requeued: vec![] });
    assert_eq!(
        fx,
        vec![
            Effect::Event(WorkerEvent::Registered { session: 7, requeued: vec![] }),
            Effect::StartHeartbeat(SESSION),
            Effect::OpenStream { gen: 2 },
        ]
    );
    assert_eq!(
        c.step(Input::StreamOpened { gen: 2 }),
        vec![Effect::Event(WorkerEvent::StreamOpened)]
    );
    (c, 2)
}

fn assignment(task: u64, fence: u64) -> pb::Assignment {
    pb::Assignment { task, fence, attempt: 1, name: "t".into(), ..Default::default() }
}

fn job(task: u64, fence: u64) -> Job {
    Job {
        task,
        fence,
        attempt: 1,
        name: "t".into(),
        payload: vec![],
        metadata: Default::default(),
        deadline_ms: 0,
        worker_id: "w".into(),
    }
}

fn succeeded() -> PbOutcome {
    PbOutcome::Succeeded(pb::Succeeded { result: b"ok".to_vec() })
}

fn final_report(task: u64, fence: u64, outcome: PbOutcome) -> PendingReport {
    PendingReport::new(task, fence, outcome, Role::Final)
}

/// The effects without the events.
fn actions(fx: Vec<Effect>) -> Vec<Effect> {
    fx.into_iter().filter(|e| !matches!(e, Effect::Event(_))).collect()
}

/// Starts `(task, fence)` on a registered core, asserting the exact effects.
fn start(c: &mut Core, gen: u64, task: u64, fence: u64) {
    let fx = c.step(Input::Assignment { gen, assignment: assignment(task, fence) });
    assert_eq!(
        fx,
        vec![
            Effect::ScheduleStartReport { task, fence },
            Effect::Event(WorkerEvent::ExecStart { task, attempt: 1, fence }),
            Effect::StartJob(job(task, fence)),
        ]
    );
}

fn end_ok(c: &mut Core, task: u64, fence: u64) -> Vec<Effect> {
    c.step(Input::JobEnded { task, fence, outcome: Outcome::Succeeded(b"ok".to_vec()) })
}

#[test]
fn a_new_assignment_starts_a_job() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    assert_eq!(c.stats().executed, 1);
}

#[test]
fn a_duplicate_assignment_is_ignored() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    assert_eq!(c.step(Input::Assignment { gen, assignment: assignment(1, 10) }), vec![]);
    // An older fence of a held task is ignored too; a newer one replaces it.
    assert_eq!(c.step(Input::Assignment { gen, assignment: assignment(1, 9) }), vec![]);
    let fx = actions(c.step(Input::Assignment { gen, assignment: assignment(1, 11) }));
    assert_eq!(
        fx,
        vec![
            Effect::StopJob { task: 1, fence: 10, reason: StopReason::Revoked },
            Effect::ScheduleStartReport { task: 1, fence: 11 },
            Effect::StartJob(job(1, 11)),
        ]
    );
}

#[test]
fn a_revoke_stops_the_job_and_its_outcome_is_not_reported() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    let revoke = pb::Revoke { task: 1, fence: 10, ..Default::default() };
    assert_eq!(
        c.step(Input::Revoke { gen, revoke }),
        vec![
            Effect::StopJob { task: 1, fence: 10, reason: StopReason::Revoked },
            Effect::Event(WorkerEvent::Stopping {
                task: 1,
                fence: 10,
                reason: StopReason::Revoked
            }),
        ]
    );
    assert_eq!(
        end_ok(&mut c, 1, 10),
        vec![Effect::Event(WorkerEvent::ExecEnd {
            task: 1,
            fence: 10,
            success: false,
            stopped: Some(StopReason::Revoked),
        })]
    );
    // The start-report delay passing now sends nothing either.
    assert_eq!(c.step(Input::StartDue { task: 1, fence: 10 }), vec![]);
    assert_eq!(c.stats().stopped, 1);
}

#[test]
fn a_resync_without_the_job_stops_it_and_one_with_an_unknown_attempt_reads_it() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    let resync = pb::Resync { tasks: vec![2], fences: vec![20] };
    assert_eq!(
        actions(c.step(Input::Resync { gen, resync })),
        vec![
            Effect::StopJob { task: 1, fence: 10, reason: StopReason::Revoked },
            Effect::FetchTask { gen, task: 2, fence: 20 },
        ]
    );
    // Read back: ours, running; it runs without a new Started report.
    let task = pb::Task {
        id: 2,
        fence: 20,
        worker: "w".into(),
        state: pb::TaskState::Running as i32,
        attempt: 1,
        spec: Some(pb::TaskSpec { name: "t".into(), ..Default::default() }),
        ..Default::default()
    };
    let fx = c.step(Input::Recovered { gen, task: 2, fence: 20, found: Some(Box::new(task)) });
    assert_eq!(actions(fx), vec![Effect::StartJob(job(2, 20))]);
}

#[test]
fn a_stale_report_is_dropped_never_retried() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    let report = final_report(1, 10, succeeded());
    assert_eq!(actions(end_ok(&mut c, 1, 10)), vec![Effect::SendReports(vec![report.clone()])]);
    let answer = ReportRpc::Answered(vec![Verdict::Refused { error: "stale".into(), stale: true }]);
    assert_eq!(
        c.step(Input::ReportAnswered { batch: vec![report], answer }),
        vec![Effect::Event(WorkerEvent::ReportAnswered {
            task: 1,
            fence: 10,
            kind: ReportKind::Succeeded,
            answer: ReportAnswer::Rejected { error: "stale".into(), stale: true },
        })]
    );
    assert_eq!(c.step(Input::ReportRetry), vec![]);
    assert_eq!(c.stats().rejected, 1);
    // Finished: a resend of the assignment is ignored.
    assert_eq!(c.step(Input::Assignment { gen, assignment: assignment(1, 10) }), vec![]);
}

#[test]
fn an_undelivered_report_is_resent_with_the_same_fence_and_a_duplicate_answer_counts() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    let report = final_report(1, 10, succeeded());
    assert_eq!(actions(end_ok(&mut c, 1, 10)), vec![Effect::SendReports(vec![report.clone()])]);
    let answer = ReportRpc::Unreachable("down".into());
    assert_eq!(
        c.step(Input::ReportAnswered { batch: vec![report.clone()], answer }),
        vec![
            Effect::Event(WorkerEvent::ReportAnswered {
                task: 1,
                fence: 10,
                kind: ReportKind::Succeeded,
                answer: ReportAnswer::Unknown { error: "down".into() },
            }),
            Effect::RetryReportsLater,
        ]
    );
    assert_eq!(
        c.step(Input::ReportRetry),
        vec![
            Effect::Event(WorkerEvent::ReportSent {
                task: 1,
                fence: 10,
                kind: ReportKind::Succeeded
            }),
            Effect::SendReports(vec![report.clone()]),
        ]
    );
    let answer = ReportRpc::Answered(vec![Verdict::Duplicate]);
    assert_eq!(
        c.step(Input::ReportAnswered { batch: vec![report], answer }),
        vec![Effect::Event(WorkerEvent::ReportAnswered {
            task: 1,
            fence: 10,
            kind: ReportKind::Succeeded,
            answer: ReportAnswer::Accepted { duplicate: true },
        })]
    );
    assert_eq!(c.stats().succeeded, 1);
    assert_eq!(c.step(Input::Assignment { gen, assignment: assignment(1, 10) }), vec![]);
}

#[test]
fn a_refused_batch_is_resent_one_by_one_and_a_refused_result_becomes_a_failure() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    start(&mut c, gen, 2, 20);
    start(&mut c, gen, 3, 30);
    let r1 = final_report(1, 10, succeeded());
    assert_eq!(actions(end_ok(&mut c, 1, 10)), vec![Effect::SendReports(vec![r1.clone()])]);
    assert_eq!(actions(end_ok(&mut c, 2, 20)), vec![]);
    assert_eq!(actions(end_ok(&mut c, 3, 30)), vec![]);
    let r2 = final_report(2, 20, succeeded());
    let r3 = final_report(3, 30, succeeded());
    let ok = ReportRpc::Answered(vec![Verdict::Applied]);
    let fx = c.step(Input::ReportAnswered { batch: vec![r1], answer: ok });
    assert_eq!(actions(fx), vec![Effect::SendReports(vec![r2.clone(), r3.clone()])]);
    let refused = ReportRpc::Refused { error: "big".into(), message: "big".into(), too_big: true };
    let fx = c.step(Input::ReportAnswered {
        batch: vec![r2.clone(), r3.clone()],
        answer: refused.clone(),
    });
    let solo = |r: &PendingReport| PendingReport { mode: SendMode::Solo, ..r.clone() };
    assert_eq!(actions(fx), vec![Effect::SendReports(vec![solo(&r2)])]);
    let fx = c.step(Input::ReportAnswered { batch: vec![solo(&r2)], answer: refused });
    let failed = PendingReport {
        outcome: PbOutcome::Failed(pb::Failed {
            message: "result refused by the server: big".into(),
            retryable: false,
        }),
        ..solo(&r2)
    };
    assert_eq!(actions(fx), vec![Effect::SendReports(vec![failed])]);
}

#[test]
fn losing_the_session_stops_everything_drops_pending_reports_and_registers_again() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    start(&mut c, gen, 2, 20);
    start(&mut c, gen, 3, 30);
    let r1 = final_report(1, 10, succeeded());
    assert_eq!(actions(end_ok(&mut c, 1, 10)), vec![Effect::SendReports(vec![r1.clone()])]);
    assert_eq!(actions(end_ok(&mut c, 2, 20)), vec![]); // queued behind the RPC in flight
    let fx =
        c.step(Input::HeartbeatFailed { session: 7, error: "gone".into(), session_lost: true });
    assert_eq!(
        actions(fx),
        vec![
            Effect::StopNetwork,
            Effect::StopJob { task: 3, fence: 30, reason: StopReason::SessionLost },
            Effect::Register,
        ]
    );
    assert_eq!(c.session(), None);
    // The in-flight answer arrives: nothing more is sent (the queued report was dropped).
    let answer = ReportRpc::Answered(vec![Verdict::Refused { error: "stale".into(), stale: true }]);
    assert_eq!(actions(c.step(Input::ReportAnswered { batch: vec![r1], answer })), vec![]);
    // A second failure of the old session changes nothing.
    let fx =
        c.step(Input::HeartbeatFailed { session: 7, error: "gone".into(), session_lost: true });
    assert_eq!(fx, vec![]);
    // A new session opens a new stream generation.
    let fx = c.step(Input::Registered { session: Session { id: 8, ..SESSION }, requeued: vec![] });
    assert_eq!(actions(fx)[1], Effect::OpenStream { gen: gen + 3 });
}

#[test]
fn drain_takes_no_new_work_finishes_within_the_grace_then_stops_the_rest() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    start(&mut c, gen, 2, 20);
    let t0 = Instant::now();
    assert_eq!(
        c.step(Input::Drain { now: t0 }),
        vec![Effect::Event(WorkerEvent::Draining), Effect::DrainWorker]
    );
    assert_eq!(c.step(Input::Drain { now: t0 }), vec![]);
    assert_eq!(c.next_wake(), Some(t0 + Duration::from_secs(30)));
    assert_eq!(c.step(Input::Assignment { gen, assignment: assignment(3, 30) }), vec![]);
    let r1 = final_report(1, 10, succeeded());
    assert_eq!(actions(end_ok(&mut c, 1, 10)), vec![Effect::SendReports(vec![r1.clone()])]);
    let ok = ReportRpc::Answered(vec![Verdict::Applied]);
    assert_eq!(actions(c.step(Input::ReportAnswered { batch: vec![r1], answer: ok })), vec![]);
    assert_eq!(c.step(Input::Tick { now: t0 + Duration::from_secs(29) }), vec![]);
    assert!(!c.should_exit(t0 + Duration::from_secs(29)));
    let t1 = t0 + Duration::from_secs(30);
    assert_eq!(
        actions(c.step(Input::Tick { now: t1 })),
        vec![Effect::StopJob { task: 2, fence: 20, reason: StopReason::Shutdown }]
    );
    assert_eq!(c.next_wake(), Some(t1 + Duration::from_secs(10)));
    assert!(!c.should_exit(t1));
    assert!(c.should_exit(t1 + Duration::from_secs(10)));
    assert_eq!(actions(end_ok(&mut c, 2, 20)), vec![]);
    assert!(c.should_exit(t1));
}

#[test]
fn stop_now_stops_every_running_job_at_once() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    let t0 = Instant::now();
    assert_eq!(
        actions(c.step(Input::StopNow { now: t0 })),
        vec![
            Effect::DrainWorker,
            Effect::StopJob { task: 1, fence: 10, reason: StopReason::Shutdown },
        ]
    );
    assert_eq!(c.next_wake(), Some(t0 + Duration::from_secs(10)));
}

#[test]
fn a_deadline_stops_the_job_and_reports_a_retryable_timeout() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    assert_eq!(
        c.step(Input::DeadlinePassed { task: 1, fence: 10 }),
        vec![Effect::StopJob { task: 1, fence: 10, reason: StopReason::Deadline }]
    );
    assert_eq!(c.step(Input::DeadlinePassed { task: 1, fence: 10 }), vec![]);
    let timed_out = final_report(
        1,
        10,
        PbOutcome::Failed(pb::Failed { message: "timed out".into(), retryable: true }),
    );
    assert_eq!(
        end_ok(&mut c, 1, 10),
        vec![
            Effect::Event(WorkerEvent::ExecEnd {
                task: 1,
                fence: 10,
                success: false,
                stopped: Some(StopReason::Deadline),
            }),
            Effect::Event(WorkerEvent::ReportSent { task: 1, fence: 10, kind: ReportKind::Failed }),
            Effect::SendReports(vec![timed_out]),
        ]
    );
}

#[test]
fn inputs_of_an_old_stream_or_session_change_nothing() {
    let (mut c, gen) = registered();
    let fx = c.step(Input::StreamEnded {
        gen,
        error: Some(StreamError { error: "eof".into(), session_lost: false }),
    });
    assert_eq!(actions(fx), vec![Effect::ReopenStreamLater { gen }]);
    assert_eq!(c.step(Input::Reopen { gen }), vec![Effect::OpenStream { gen: gen + 1 }]);
    // Late news from the closed stream.
    assert_eq!(c.step(Input::Assignment { gen, assignment: assignment(1, 10) }), vec![]);
    assert_eq!(c.step(Input::Revoke { gen, revoke: Default::default() }), vec![]);
    assert_eq!(c.step(Input::Resync { gen, resync: Default::default() }), vec![]);
    assert_eq!(c.step(Input::StreamOpened { gen }), vec![]);
    assert_eq!(c.step(Input::StreamEnded { gen, error: None }), vec![]);
    assert_eq!(c.step(Input::Reopen { gen }), vec![]);
    assert_eq!(c.step(Input::Recovered { gen, task: 1, fence: 10, found: None }), vec![]);
    // Another session's heartbeat.
    let fx =
        c.step(Input::HeartbeatFailed { session: 6, error: "gone".into(), session_lost: true });
    assert_eq!(fx, vec![]);
    // The new stream works.
    start(&mut c, gen + 1, 1, 10);
}

#[test]
fn started_is_reported_after_the_delay_only_if_still_running_and_not_confirmed() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    let started = PendingReport::new(1, 10, PbOutcome::Started(pb::Started {}), Role::Progress);
    assert_eq!(
        c.step(Input::StartDue { task: 1, fence: 10 }),
        vec![
            Effect::Event(WorkerEvent::ReportSent {
                task: 1,
                fence: 10,
                kind: ReportKind::Started
            }),
            Effect::SendReports(vec![started]),
        ]
    );
    // Already confirmed by the server: no delay, no Started report.
    let a = pb::Assignment { started: true, ..assignment(2, 20) };
    assert_eq!(
        actions(c.step(Input::Assignment { gen, assignment: a })),
        vec![Effect::StartJob(job(2, 20))]
    );
    // A job that ended before the delay sends only its final report.
    start(&mut c, gen, 3, 30);
    end_ok(&mut c, 3, 30);
    assert_eq!(c.step(Input::StartDue { task: 3, fence: 30 }), vec![]);
}

#[test]
fn reports_queued_during_an_rpc_leave_together_bounded_by_the_batch_limit() {
    let (mut c, gen) = registered();
    let n = MAX_REPORT_BATCH as u64 + 10;
    for t in 0..=n {
        start(&mut c, gen, t, 1);
    }
    let first = final_report(0, 1, succeeded());
    assert_eq!(actions(end_ok(&mut c, 0, 1)), vec![Effect::SendReports(vec![first.clone()])]);
    for t in 1..=n {
        assert_eq!(actions(end_ok(&mut c, t, 1)), vec![]);
    }
    let ok = |k| ReportRpc::Answered(vec![Verdict::Applied; k]);
    let fx = actions(c.step(Input::ReportAnswered { batch: vec![first], answer: ok(1) }));
    let [Effect::SendReports(batch)] = &fx[..] else { panic!("{fx:?}") };
    assert_eq!(batch.len(), MAX_REPORT_BATCH);
    assert_eq!(batch[0], final_report(1, 1, succeeded()));
    let fx = actions(
        c.step(Input::ReportAnswered { batch: batch.clone(), answer: ok(MAX_REPORT_BATCH) }),
    );
    let [Effect::SendReports(rest)] = &fx[..] else { panic!("{fx:?}") };
    assert_eq!(rest.len(), 10);
    assert_eq!(c.stats().succeeded, MAX_REPORT_BATCH as u64 + 1);
}

#[test]
fn finished_attempts_are_remembered_and_resends_ignored() {
    let (mut c, gen) = registered();
    start(&mut c, gen, 1, 10);
    let r = final_report(1, 10, succeeded());
    end_ok(&mut c, 1, 10);
    let ok = ReportRpc::Answered(vec![Verdict::Applied]);
    c.step(Input::ReportAnswered { batch: vec![r], answer: ok });
    assert!(c.recent.contains(&(1, 10)));
    assert_eq!(c.step(Input::Assignment { gen, assignment: assignment(1, 10) }), vec![]);
    // A resync listing it reads nothing back.
    let resync = pb::Resync { tasks: vec![1], fences: vec![10] };
    assert_eq!(c.step(Input::Resync { gen, resync }), vec![]);
    // A new attempt of the same task runs.
    start(&mut c, gen, 1, 11);
}
