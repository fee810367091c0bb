//! Exactly-once acceptance and fencing.
//!
//! Execution is at-least-once (a paused worker may still run an attempt that was given to
//! someone else), but acceptance is exactly-once and fenced:
//!
//! * **double completions** — per task: at most one *fresh* acceptance (`CompleteOk` with
//!   `duplicate = false`) per fence, and accepted success reports for one fence only; in the
//!   audit log no task leaves Succeeded, Failed or UpstreamFailed once there (Cancelled is
//!   the cancellation property's). Counted per task.
//! * **stale accepted** — a fresh acceptance must be of the attempt that the final state
//!   shows (a success: the final fence; a failure report: an earlier fence than the final
//!   success), must not have been invoked after a higher fence of the task was already
//!   observed (`ExecStart`, or an Assigned/Running change, strictly earlier in time), and
//!   must come from the worker the audit log shows holding that fence. Also invalid: one
//!   fence held by two workers, or a new assignment whose fence does not exceed the task's
//!   previous one (**fence reuse**).
//!
//! Both rely on workers learning only committed assignments (an `ExecStart` proves the
//! attempt's assignment was committed). Overlapping executions of *different* attempts
//! are allowed and only counted (`exec_overlaps`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use state_machine::TaskStateKind;

use super::facts::{Answer, Facts};
use super::{Counts, Findings, Property, PropertyResult, Verdict};

/// More than one acceptance per attempt or per task; terminal states that change.
pub(crate) fn double_completions(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    // First description per offending task: the count is of tasks, not of events.
    let mut offences: BTreeMap<u64, String> = BTreeMap::new();

    let mut fresh: BTreeMap<(u64, u64), Vec<(u64, &str)>> = BTreeMap::new();
    let mut success_fences: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for c in &f.completes {
        if let Answer::Ok { t, duplicate } = c.answer {
            if !duplicate {
                fresh.entry((c.task, c.fence)).or_default().push((t, c.worker));
            }
            if c.success {
                success_fences.entry(c.task).or_default().insert(c.fence);
            }
        }
    }
    for ((task, fence), oks) in fresh.iter().filter(|(_, oks)| oks.len() > 1) {
        offences.entry(*task).or_insert_with(|| {
            format!("task {task}: {} reports for fence {fence} were each accepted as new: {oks:?} (t, worker)", oks.len())
        });
    }
    for (task, fences) in success_fences.iter().filter(|(_, fs)| fs.len() > 1) {
        offences.entry(*task).or_insert_with(|| {
            format!(
                "task {task}: success accepted for {} different fences {fences:?}",
                fences.len()
            )
        });
    }

    let mut terminal: HashMap<u64, (u64, TaskStateKind)> = HashMap::new();
    for c in &f.applied {
        if let Some(&(index, state)) = terminal.get(&c.task) {
            offences.entry(c.task).or_insert_with(|| {
                format!(
                    "task {}: became {state} at index {index}, then {} at index {}",
                    c.task, c.state, c.index
                )
            });
        } else if c.state.is_terminal() && c.state != TaskStateKind::Cancelled {
            terminal.insert(c.task, (c.index, c.state));
        }
    }

    let mut findings = Findings::default();
    for (_, msg) in offences {
        findings.push(|| msg);
    }
    counts.double_completions = findings.count();
    let mut notes = vec![format!(
        "{} attempt(s) with a fresh acceptance; {} task(s) with an accepted success",
        fresh.len(),
        success_fences.len()
    )];
    notes.extend(f.gap_note());
    findings.into_result(Property::DoubleCompletions, Verdict::Valid, notes)
}

/// Accepted reports from stale attempts or wrong workers; reused fences.
pub(crate) fn stale_accepted(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    counts.stale_rejected =
        f.completes.iter().filter(|c| matches!(c.answer, Answer::Fail { stale: true, .. })).count();

    // Per task, every observation that a fence was given out: (time seen, fence), sorted,
    // with a running maximum so "highest fence seen before t" is a binary search.
    let mut seen: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
    // Who holds each (task, fence), per the audit log and per the workers.
    let mut audit_holder: BTreeMap<(u64, u64), BTreeSet<&str>> = BTreeMap::new();
    let mut exec_holder: BTreeMap<(u64, u64), BTreeSet<&str>> = BTreeMap::new();
    let mut fence_reuse = Findings::default();
    let mut last_assigned: HashMap<u64, (u64, u64)> = HashMap::new();
    for c in f.applied.iter().filter(|c| c.is_held()) {
        let Some(fence) = c.fence else { continue };
        seen.entry(c.task).or_default().push((c.t, fence));
        if let Some(w) = c.worker {
            audit_holder.entry((c.task, fence)).or_default().insert(w);
        }
        if c.state == TaskStateKind::Assigned {
            if let Some(&(prev_fence, prev_index)) = last_assigned.get(&c.task) {
                if fence <= prev_fence {
                    fence_reuse.push(|| {
                        format!(
                            "task {}: assigned with fence {fence} at index {} after fence {prev_fence} at index {prev_index}",
                            c.task, c.index
                        )
                    });
                }
            }
            last_assigned.insert(c.task, (fence, c.index));
        }
    }
    for e in &f.execs {
        seen.entry(e.task).or_default().push((e.t_start, e.fence));
        exec_holder.entry((e.task, e.fence)).or_default().insert(e.worker);
    }
    for (source, holders) in [("the audit log", &audit_holder), ("the workers", &exec_holder)] {
        for ((task, fence), workers) in holders.iter().filter(|(_, w)| w.len() > 1) {
            fence_reuse.push(|| {
                format!("task {task}: fence {fence} held by {workers:?} according to {source}")
            });
        }
    }
    for obs in seen.values_mut() {
        obs.sort_unstable();
        let mut max = 0;
        for o in obs.iter_mut() {
            max = max.max(o.1);
            o.1 = max;
        }
    }
    let highest_seen_before = |task: u64, t: u64| -> Option<(u64, u64)> {
        let obs = seen.get(&task)?;
        let n = obs.partition_point(|&(seen_at, _)| seen_at < t);
        n.checked_sub(1).map(|i| obs[i])
    };

    let mut stale = Findings::default();
    let mut judged = 0usize;
    for c in f.completes.iter().filter(|c| c.accepted_fresh()) {
        judged += 1;
        let what = if c.success { "success" } else { "failure" };
        let head = || {
            format!(
                "op {} ({what} of task {} fence {} by {}, invoked t={})",
                c.op, c.task, c.fence, c.worker, c.t_invoke
            )
        };
        // Against the final state of every node.
        let bad_final = f.final_records(c.task).find(|(_, r)| {
            let final_fence = if r.state == TaskStateKind::Succeeded { r.fence } else { None };
            if c.success {
                final_fence != Some(c.fence)
            } else {
                final_fence.is_some_and(|ff| c.fence >= ff)
            }
        });
        if let Some((node, r)) = bad_final {
            stale.push(|| {
                format!(
                    "{} was accepted, but node {node} ends {} with fence {:?}",
                    head(),
                    r.state,
                    r.fence
                )
            });
            continue;
        }
        if let Some((at, higher)) =
            highest_seen_before(c.task, c.t_invoke).filter(|&(_, fence)| fence > c.fence)
        {
            // `at` is the time of the observation that raised the maximum; report it loosely.
            stale.push(|| {
                format!(
                    "{} was accepted, but fence {higher} of the task was observed by t={at}",
                    head()
                )
            });
            continue;
        }
        if let Some(holders) = audit_holder.get(&(c.task, c.fence)) {
            if !holders.contains(c.worker) {
                stale.push(|| {
                    format!(
                        "{} was accepted, but the audit log gives that fence to {holders:?}",
                        head()
                    )
                });
            }
        }
    }

    // Information: executions of different attempts that overlapped in time.
    let mut by_task: BTreeMap<u64, Vec<(u64, Option<u64>, u64)>> = BTreeMap::new();
    for e in &f.execs {
        by_task.entry(e.task).or_default().push((e.t_start, e.t_end, e.fence));
    }
    counts.exec_overlaps = 0;
    for runs in by_task.values_mut() {
        runs.sort_unstable();
        let mut open: Option<(u64, u64)> = None; // (latest known end, its fence)
        for &(start, end, fence) in runs.iter() {
            if let Some((open_end, open_fence)) = open {
                if start < open_end && fence != open_fence {
                    counts.exec_overlaps += 1;
                }
            }
            if let Some(end) = end {
                if open.is_none_or(|(open_end, _)| end > open_end) {
                    open = Some((end, fence));
                }
            }
        }
    }

    counts.stale_accepted = stale.count();
    counts.fence_reuse = fence_reuse.count();
    let mut findings = stale;
    findings.absorb(fence_reuse);

    let mut notes = vec![format!(
        "{judged} fresh acceptance(s) judged; {} stale report(s) rejected; {} overlapping execution(s) of different attempts",
        counts.stale_rejected, counts.exec_overlaps
    )];
    notes.extend(f.gap_note());
    findings.into_result(Property::StaleAccepted, Verdict::Valid, notes)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Expectations, Property};
    use crate::history::EventKind;

    #[test]
    fn double_completions_valid_on_healthy_run() {
        let (h, e) = healthy();
        assert_valid(&h, &e, Property::DoubleCompletions);
    }

    #[test]
    fn two_fresh_acceptances_of_one_fence() {
        let (mut h, e) = healthy();
        let op = h.complete_invoke("w3", 2, 3, true);
        h.complete_ok(op, 2, 3, false);
        let r = assert_invalid(
            &h,
            &e,
            Property::DoubleCompletions,
            1,
            "task 2: 2 reports for fence 3 were each accepted as new",
        );
        assert_eq!(r.counts.double_completions, 1);
    }

    #[test]
    fn success_accepted_for_two_fences() {
        let (mut h, e) = healthy();
        // The stale report of w1 (fence 1) is answered as a duplicate acceptance.
        h.edit(|k| match k {
            EventKind::CompleteRejected { op, task: 2, fence: 1, .. } => {
                *k = EventKind::CompleteOk { op: *op, task: 2, fence: 1, duplicate: true };
                true
            }
            _ => false,
        });
        assert_invalid(
            &h,
            &e,
            Property::DoubleCompletions,
            1,
            "task 2: success accepted for 2 different fences {1, 3}",
        );
    }

    #[test]
    fn terminal_state_left_in_the_audit_log() {
        let (mut h, e) = healthy();
        h.applied(23, 3, "queued", 2, None, None);
        assert_invalid(
            &h,
            &e,
            Property::DoubleCompletions,
            1,
            "task 3: became succeeded at index 19, then queued at index 23",
        );
    }

    #[test]
    fn stale_accepted_valid_on_healthy_run() {
        let (h, e) = healthy();
        let r = assert_valid(&h, &e, Property::StaleAccepted);
        assert_eq!(r.counts.stale_rejected, 1);
        // w1 finished attempt 1 of task 2 after w3 had started attempt 2.
        assert_eq!(r.counts.exec_overlaps, 1);
    }

    #[test]
    fn accepted_report_of_a_superseded_attempt() {
        let (mut h, e) = healthy();
        // w1's late report (fence 1) is accepted instead of rejected.
        h.edit(|k| match k {
            EventKind::CompleteRejected { op, task: 2, fence: 1, .. } => {
                *k = EventKind::CompleteOk { op: *op, task: 2, fence: 1, duplicate: false };
                true
            }
            _ => false,
        });
        let r = assert_invalid(
            &h,
            &e,
            Property::StaleAccepted,
            1,
            "node 1 ends succeeded with fence Some(3)",
        );
        assert_eq!(r.counts.stale_accepted, 1);
    }

    #[test]
    fn real_time_rule_catches_acceptance_after_a_newer_attempt_started() {
        // No final state disagrees: the only evidence is that fence 2 started before the
        // report for fence 1 was sent.
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.exec_start("w1", 1, 1, 1);
        h.exec_start("w2", 1, 2, 2);
        let op = h.complete_invoke("w1", 1, 1, false);
        h.complete_ok(op, 1, 1, false);
        assert_invalid(
            &h,
            &Expectations::default(),
            Property::StaleAccepted,
            1,
            "fence 2 of the task was observed by t=4",
        );
    }

    #[test]
    fn same_millisecond_is_not_taken_as_order() {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.exec_start("w1", 1, 1, 1);
        h.exec_start("w2", 1, 2, 2);
        let op = h.complete_invoke("w1", 1, 1, false);
        h.complete_ok(op, 1, 1, false);
        // Put the newer start and the report in the same millisecond: no proven order.
        let t = h
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::CompleteInvoke { .. }))
            .unwrap()
            .t_ms;
        for e in &mut h.events {
            if matches!(e.kind, EventKind::ExecStart { fence: 2, .. }) {
                e.t_ms = t;
            }
        }
        assert_valid(&h, &Expectations::default(), Property::StaleAccepted);
    }

    #[test]
    fn accepted_from_a_worker_that_does_not_hold_the_fence() {
        let (mut h, e) = healthy();
        h.edit(|k| match k {
            EventKind::CompleteInvoke { worker, task: 5, .. } => {
                *worker = "w2".into();
                true
            }
            _ => false,
        });
        assert_invalid(
            &h,
            &e,
            Property::StaleAccepted,
            1,
            "the audit log gives that fence to {\"w1\"}",
        );
    }

    #[test]
    fn fence_reuse_is_invalid() {
        let (mut h, e) = healthy();
        // A second worker starts the attempt w3 holds.
        h.exec_start("w2", 2, 2, 3);
        h.exec_end("w2", 2, 3, true);
        let r = assert_invalid(
            &h,
            &e,
            Property::StaleAccepted,
            1,
            "fence 3 held by {\"w2\", \"w3\"} according to the workers",
        );
        assert_eq!((r.counts.fence_reuse, r.counts.stale_accepted), (1, 0));
    }

    #[test]
    fn fence_must_increase_per_assignment() {
        let (mut h, e) = healthy();
        h.edit(|k| match k {
            EventKind::Applied { index: 17, task: 2, fence, .. } => {
                *fence = Some(1);
                true
            }
            _ => false,
        });
        assert_invalid(
            &h,
            &e,
            Property::StaleAccepted,
            2,
            "task 2: assigned with fence 1 at index 17 after fence 1 at index 13",
        );
    }
}
