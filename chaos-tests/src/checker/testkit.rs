//! Builders for synthetic histories used by the checker's unit tests.
//!
//! [`H`] stamps each event one millisecond after the previous one (so any permutation of a
//! built history sorts back to the same order), hands out op ids, and numbers the changes of
//! each audit-log index. [`healthy`] is a complete, valid run that exercises every property;
//! violation tests start from it (or from a small history) and break exactly one thing.

use std::collections::HashMap;

use super::{check, Expectations, Property, Report, Verdict};
use crate::history::{fault, Event, EventKind, OpId};

/// A history under construction.
#[derive(Clone, Debug, Default)]
pub(crate) struct H {
    pub events: Vec<Event>,
    /// Time of the last event.
    pub t: u64,
    next_op: OpId,
    seqs: HashMap<u64, u32>,
}

impl H {
    pub fn new() -> Self {
        H::default()
    }

    /// Appends `kind` one millisecond after the previous event; returns its time.
    pub fn push(&mut self, kind: EventKind) -> u64 {
        self.t += 1;
        self.events.push(Event::new(self.t, kind));
        self.t
    }

    /// Lets `ms` milliseconds pass.
    pub fn skip(&mut self, ms: u64) {
        self.t += ms;
    }

    fn op(&mut self) -> OpId {
        self.next_op += 1;
        self.next_op
    }

    /// Removes the events for which `drop` is true.
    pub fn remove(&mut self, mut drop: impl FnMut(&EventKind) -> bool) {
        let before = self.events.len();
        self.events.retain(|e| !drop(&e.kind));
        assert!(self.events.len() < before, "the mutation matched nothing");
    }

    /// Edits events in place; panics if none matched (`edit` returns whether it changed one).
    pub fn edit(&mut self, mut edit: impl FnMut(&mut EventKind) -> bool) {
        let mut n = 0;
        for e in &mut self.events {
            if edit(&mut e.kind) {
                n += 1;
            }
        }
        assert!(n > 0, "the mutation matched nothing");
    }

    pub fn submit_invoke(&mut self, key: &str, priority: i32, deps: &[&str]) -> OpId {
        let op = self.op();
        self.push(EventKind::SubmitInvoke {
            op,
            key: key.into(),
            priority,
            deps: deps.iter().map(|d| d.to_string()).collect(),
        });
        op
    }

    pub fn submit_ok_for(&mut self, op: OpId, key: &str, id: u64) -> u64 {
        self.push(EventKind::SubmitOk { op, key: key.into(), id })
    }

    pub fn submit_unknown_for(&mut self, op: OpId, key: &str) {
        self.push(EventKind::SubmitUnknown {
            op,
            key: key.into(),
            reason: "deadline exceeded".into(),
        });
    }

    pub fn submit_fail_for(&mut self, op: OpId, key: &str) {
        self.push(EventKind::SubmitFail { op, key: key.into(), reason: "invalid argument".into() });
    }

    /// Invoke and acknowledgement.
    pub fn submit_ok(&mut self, key: &str, priority: i32, deps: &[&str], id: u64) -> OpId {
        let op = self.submit_invoke(key, priority, deps);
        self.submit_ok_for(op, key, id);
        op
    }

    pub fn cancel_invoke(&mut self, id: u64) -> OpId {
        let op = self.op();
        self.push(EventKind::CancelInvoke { op, id });
        op
    }

    pub fn cancel_ok(&mut self, op: OpId, id: u64) -> u64 {
        self.push(EventKind::CancelOk { op, id })
    }

    pub fn cancel_fail(&mut self, op: OpId, id: u64) {
        self.push(EventKind::CancelFail {
            op,
            id,
            reason: "a finished task cannot be cancelled".into(),
        });
    }

    pub fn exec_start(&mut self, worker: &str, task: u64, attempt: u32, fence: u64) -> u64 {
        self.push(EventKind::ExecStart { worker: worker.into(), task, attempt, fence })
    }

    pub fn exec_end(&mut self, worker: &str, task: u64, fence: u64, success: bool) {
        self.push(EventKind::ExecEnd { worker: worker.into(), task, fence, success });
    }

    pub fn complete_invoke(&mut self, worker: &str, task: u64, fence: u64, success: bool) -> OpId {
        let op = self.op();
        self.push(EventKind::CompleteInvoke { op, worker: worker.into(), task, fence, success });
        op
    }

    pub fn complete_ok(&mut self, op: OpId, task: u64, fence: u64, duplicate: bool) -> u64 {
        self.push(EventKind::CompleteOk { op, task, fence, duplicate })
    }

    pub fn complete_rejected(&mut self, op: OpId, task: u64, fence: u64, stale: bool) {
        self.push(EventKind::CompleteRejected {
            op,
            task,
            fence,
            reason: "stale fence".into(),
            stale,
        });
    }

    pub fn complete_unknown(&mut self, op: OpId, task: u64, fence: u64) {
        self.push(EventKind::CompleteUnknown {
            op,
            task,
            fence,
            reason: "connection reset".into(),
        });
    }

    /// The next change of entry `index`.
    pub fn applied(
        &mut self,
        index: u64,
        task: u64,
        state: &str,
        attempt: u32,
        fence: Option<u64>,
        worker: Option<&str>,
    ) {
        let seq = self.seqs.entry(index).or_default();
        let s = *seq;
        *seq += 1;
        self.applied_seq(index, s, task, state, attempt, fence, worker);
    }

    /// A change with an explicit position in its entry (for re-observations).
    #[allow(clippy::too_many_arguments)]
    pub fn applied_seq(
        &mut self,
        index: u64,
        seq: u32,
        task: u64,
        state: &str,
        attempt: u32,
        fence: Option<u64>,
        worker: Option<&str>,
    ) {
        self.push(EventKind::Applied {
            index,
            seq,
            task,
            state: state.into(),
            attempt,
            fence,
            worker: worker.map(Into::into),
            term: None,
            plan_index: None,
        });
    }

    /// Re-observation helper: same as [`H::applied_seq`] with seq 0.
    pub fn applied_at(
        &mut self,
        index: u64,
        task: u64,
        state: &str,
        attempt: u32,
        fence: Option<u64>,
        worker: Option<&str>,
    ) {
        self.applied_seq(index, 0, task, state, attempt, fence, worker);
    }

    pub fn gap(&mut self, from_index: u64, to_index: u64) {
        self.push(EventKind::AuditGap { from_index, to_index });
    }

    pub fn fault_start(&mut self, id: u64, kind: &str, target: &str) -> u64 {
        self.push(EventKind::FaultStart { id, fault: kind.into(), target: target.into() })
    }

    pub fn fault_end(&mut self, id: u64) {
        self.push(EventKind::FaultEnd { id });
    }

    pub fn leader(&mut self, node: u64, term: u64) {
        self.push(EventKind::LeaderObserved { node, term });
    }

    pub fn harness_error(&mut self, what: &str) {
        self.push(EventKind::HarnessError { what: what.into() });
    }

    pub fn final_task(
        &mut self,
        node: u64,
        id: u64,
        key: Option<&str>,
        state: &str,
        fence: Option<u64>,
    ) {
        self.push(EventKind::FinalTask {
            node,
            id,
            key: key.map(Into::into),
            state: state.into(),
            fence,
        });
    }

    pub fn digest(&mut self, node: u64, applied_index: u64, digest: u64) {
        self.push(EventKind::Digest { node, applied_index, digest });
    }

    /// Every node in `nodes` lists the same tasks `(id, key, state, fence)`, then reports
    /// the same digest at `applied_index`.
    pub fn finals(
        &mut self,
        nodes: &[u64],
        tasks: &[(u64, &str, &str, Option<u64>)],
        applied_index: u64,
    ) {
        for &n in nodes {
            for &(id, key, state, fence) in tasks {
                self.final_task(n, id, Some(key), state, fence);
            }
            self.digest(n, applied_index, 0xfeed_f00d);
        }
    }
}

/// A complete, valid run on nodes 1-3 with workers w1-w3 that exercises every property:
/// priorities with a visible lower-priority competitor, a dependency, an acknowledged
/// cancel, a leader kill followed by a duplicate completion, a worker pause whose late
/// completion is rejected as stale, and a submission whose outcome was unknown but whose
/// task exists at the end.
///
/// Tasks: 1 = "a" (p1), 2 = "b" (p5), 3 = "c" (p3, after "a"), 4 = "d" (p0, cancelled),
/// 5 = "e" (p2, submit unknown).
pub(crate) fn healthy() -> (H, Expectations) {
    let mut h = H::new();
    h.leader(1, 1);

    let op = h.submit_invoke("d", 0, &[]);
    h.applied(9, 4, "queued", 0, None, None);
    h.submit_ok_for(op, "d", 4);
    let op = h.submit_invoke("a", 1, &[]);
    h.applied(10, 1, "queued", 0, None, None);
    h.submit_ok_for(op, "a", 1);
    let op = h.submit_invoke("b", 5, &[]);
    h.applied(11, 2, "queued", 0, None, None);
    h.submit_ok_for(op, "b", 2);
    let op = h.submit_invoke("c", 3, &["a"]);
    h.applied(12, 3, "waiting", 0, None, None);
    h.submit_ok_for(op, "c", 3);

    // One planning round: the two best queued tasks; "d" (p0) stays queued.
    h.applied(13, 2, "assigned", 1, Some(1), Some("w1"));
    h.applied(13, 1, "assigned", 1, Some(2), Some("w2"));
    h.exec_start("w1", 2, 1, 1);
    h.exec_start("w2", 1, 1, 2);

    let op = h.cancel_invoke(4);
    h.applied(14, 4, "cancelled", 0, None, None);
    h.cancel_ok(op, 4);

    // The leader dies while w2 reports; the report was applied but its answer is lost.
    h.fault_start(1, fault::KILL_LEADER, "n1");
    h.exec_end("w2", 1, 2, true);
    let op = h.complete_invoke("w2", 1, 2, true);
    h.applied(15, 1, "succeeded", 1, Some(2), Some("w2"));
    h.applied(15, 3, "queued", 0, None, None);
    h.complete_unknown(op, 1, 2);
    h.skip(150);
    h.leader(2, 2);
    let op = h.complete_invoke("w2", 1, 2, true);
    h.complete_ok(op, 1, 2, true);
    h.fault_end(1);

    // w1 is paused past its lease: task 2 moves to w3, w1's late report is rejected.
    h.fault_start(2, fault::WORKER_PAUSE, "w1");
    h.applied(16, 2, "queued", 1, None, None);
    h.applied(17, 2, "assigned", 2, Some(3), Some("w3"));
    h.applied(17, 3, "assigned", 1, Some(4), Some("w2"));
    h.exec_start("w3", 2, 2, 3);
    h.exec_start("w2", 3, 1, 4);
    h.fault_end(2);
    h.exec_end("w1", 2, 1, true);
    let op = h.complete_invoke("w1", 2, 1, true);
    h.complete_rejected(op, 2, 1, true);
    h.exec_end("w3", 2, 3, true);
    let op = h.complete_invoke("w3", 2, 3, true);
    h.applied(18, 2, "succeeded", 2, Some(3), Some("w3"));
    h.complete_ok(op, 2, 3, false);
    h.exec_end("w2", 3, 4, true);
    let op = h.complete_invoke("w2", 3, 4, true);
    h.applied(19, 3, "succeeded", 1, Some(4), Some("w2"));
    h.complete_ok(op, 3, 4, false);

    // A submission times out, but the task was created and runs.
    let op = h.submit_invoke("e", 2, &[]);
    h.applied(20, 5, "queued", 0, None, None);
    h.submit_unknown_for(op, "e");
    h.applied(21, 5, "assigned", 1, Some(5), Some("w1"));
    h.exec_start("w1", 5, 1, 5);
    h.exec_end("w1", 5, 5, true);
    let op = h.complete_invoke("w1", 5, 5, true);
    h.applied(22, 5, "succeeded", 1, Some(5), Some("w1"));
    h.complete_ok(op, 5, 5, false);

    h.finals(
        &[1, 2, 3],
        &[
            (1, "a", "succeeded", Some(2)),
            (2, "b", "succeeded", Some(3)),
            (3, "c", "succeeded", Some(4)),
            (4, "d", "cancelled", None),
            (5, "e", "succeeded", Some(5)),
        ],
        22,
    );

    let expect = Expectations {
        min_leader_changes: 1,
        min_stale_rejections: 1,
        min_recovered: 1,
        fault_kinds: vec![fault::KILL_LEADER.into(), fault::WORKER_PAUSE.into()],
        cancels: true,
        deps: true,
        priorities: true,
        ..Expectations::default()
    };
    (h, expect)
}

/// Checks `h` and returns the report, with the property's verdict for convenience.
pub(crate) fn judge(h: &H, expect: &Expectations, property: Property) -> (Report, Verdict) {
    let report = check(&h.events, expect);
    let verdict = report.property(property).verdict.clone();
    (report, verdict)
}

/// Asserts `property` is invalid with `violations` violations and that some example
/// mentions `needle`; returns the report.
#[track_caller]
pub(crate) fn assert_invalid(
    h: &H,
    expect: &Expectations,
    property: Property,
    violations: usize,
    needle: &str,
) -> Report {
    let (report, verdict) = judge(h, expect, property);
    match &verdict {
        Verdict::Invalid(examples) => {
            assert!(
                examples.iter().any(|e| e.contains(needle)),
                "no example mentions {needle:?}:\n{report}"
            );
        }
        other => panic!("{property} should be invalid, is {other:?}:\n{report}"),
    }
    assert_eq!(report.property(property).violations, violations, "{report}");
    report
}

/// Asserts `property` is valid.
#[track_caller]
pub(crate) fn assert_valid(h: &H, expect: &Expectations, property: Property) -> Report {
    let (report, verdict) = judge(h, expect, property);
    assert_eq!(verdict, Verdict::Valid, "{report}");
    report
}

/// Asserts `property` is unknown with a reason mentioning `needle`.
#[track_caller]
pub(crate) fn assert_unknown(
    h: &H,
    expect: &Expectations,
    property: Property,
    needle: &str,
) -> Report {
    let (report, verdict) = judge(h, expect, property);
    match &verdict {
        Verdict::Unknown(why) => {
            assert!(why.contains(needle), "{why:?} lacks {needle:?}:\n{report}")
        }
        other => panic!("{property} should be unknown, is {other:?}:\n{report}"),
    }
    report
}

/// How the simulated leader picks queued tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Planner {
    /// Highest priority first, FIFO within a priority (the documented policy).
    Priority,
    /// Oldest first, ignoring priority (a plausible bug).
    Fifo,
}

/// A seeded, correct run of a miniature scheduler: `tasks` submissions in random batches
/// (random priorities; 30% depend on one or two earlier tasks), `workers` worker slots, one
/// leader in term 1 whose planner looks at the current state and records the term, and
/// random completions. About 12 events per task, so 10k tasks make a 100k+ event history.
pub(crate) fn simulated_run(
    tasks: u64,
    workers: usize,
    seed: u64,
    planner: Planner,
) -> (H, Expectations) {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    let mut rng = StdRng::seed_from_u64(seed);
    let mut h = H::new();
    h.leader(1, 1);
    let mut index = 0u64;
    let mut prio: HashMap<u64, i32> = HashMap::new();
    let mut deps: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut dependents: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut done: std::collections::HashSet<u64> = Default::default();
    let mut queued: Vec<(u64, u64)> = Vec::new(); // (task, since)
    let mut running: Vec<(u64, String, u64)> = Vec::new();
    let mut free: Vec<String> = (1..=workers).map(|w| format!("w{w}")).collect();
    let mut fence = 0u64;
    let mut next = 1u64;
    let mut accepted: HashMap<u64, u64> = HashMap::new();

    let push_applied = |h: &mut H,
                        index: u64,
                        seq: u32,
                        task: u64,
                        state: &str,
                        fence: Option<u64>,
                        worker: Option<&str>| {
        h.push(EventKind::Applied {
            index,
            seq,
            task,
            state: state.into(),
            attempt: u32::from(fence.is_some()),
            fence,
            worker: worker.map(Into::into),
            term: Some(1),
            plan_index: None,
        });
    };

    while done.len() < tasks as usize {
        // Submit a batch.
        for _ in 0..rng.random_range(0..8u64).min(tasks + 1 - next) {
            let id = next;
            next += 1;
            let p = rng.random_range(0..10);
            let mut d: Vec<u64> = Vec::new();
            if id > 3 && rng.random_bool(0.3) {
                for _ in 0..rng.random_range(1..=2) {
                    let dep = rng.random_range(id.saturating_sub(50).max(1)..id);
                    if !d.contains(&dep) {
                        d.push(dep);
                    }
                }
            }
            let dep_keys: Vec<String> = d.iter().map(|x| format!("k{x}")).collect();
            let dep_refs: Vec<&str> = dep_keys.iter().map(String::as_str).collect();
            let op = h.submit_invoke(&format!("k{id}"), p, &dep_refs);
            index += 1;
            let ready = d.iter().all(|x| done.contains(x));
            push_applied(
                &mut h,
                index,
                0,
                id,
                if ready { "queued" } else { "waiting" },
                None,
                None,
            );
            if ready {
                queued.push((id, index));
            }
            for &x in d.iter().filter(|x| !done.contains(x)) {
                dependents.entry(x).or_default().push(id);
            }
            prio.insert(id, p);
            deps.insert(id, d);
            h.submit_ok_for(op, &format!("k{id}"), id);
        }
        // One planning round over the current state.
        if !free.is_empty() && !queued.is_empty() {
            match planner {
                Planner::Priority => {
                    queued.sort_by_key(|&(t, since)| (std::cmp::Reverse(prio[&t]), since, t))
                }
                Planner::Fifo => queued.sort_by_key(|&(t, since)| (since, t)),
            }
            let n = free.len().min(queued.len());
            let picked: Vec<(u64, u64)> = queued.drain(..n).collect();
            index += 1;
            for (seq, (task, _)) in picked.into_iter().enumerate() {
                let w = free.pop().expect("a free worker");
                fence += 1;
                push_applied(&mut h, index, seq as u32, task, "assigned", Some(fence), Some(&w));
                h.exec_start(&w, task, 1, fence);
                running.push((task, w, fence));
            }
        }
        // Some running tasks finish.
        let mut i = 0;
        while i < running.len() {
            if !rng.random_bool(0.4) {
                i += 1;
                continue;
            }
            let (task, w, f) = running.swap_remove(i);
            h.exec_end(&w, task, f, true);
            let op = h.complete_invoke(&w, task, f, true);
            index += 1;
            push_applied(&mut h, index, 0, task, "succeeded", Some(f), Some(&w));
            done.insert(task);
            accepted.insert(task, f);
            let mut seq = 1;
            for d in dependents.remove(&task).unwrap_or_default() {
                if deps[&d].iter().all(|x| done.contains(x)) {
                    push_applied(&mut h, index, seq, d, "queued", None, None);
                    seq += 1;
                    queued.push((d, index));
                }
            }
            h.complete_ok(op, task, f, false);
            free.push(w);
        }
    }
    for node in 1..=3 {
        for id in 1..=tasks {
            h.final_task(node, id, Some(&format!("k{id}")), "succeeded", Some(accepted[&id]));
        }
        h.digest(node, index, 0xabcd);
    }
    let expect = Expectations { deps: true, priorities: true, ..Expectations::default() };
    (h, expect)
}
