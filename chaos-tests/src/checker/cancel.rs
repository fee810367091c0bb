//! Cancellation is respected: an acknowledged cancel is final.
//!
//! For every `CancelOk` of task T returned at `t`:
//! * no completion of T accepted as new (`CompleteOk`, `duplicate = false`) was invoked
//!   after `t` (strictly; same millisecond is concurrent);
//! * every reporting node ends with T Cancelled. A T that ends Succeeded means either a
//!   completion was accepted after the cancel or the cancel was acknowledged on a task that
//!   had already finished (the server must refuse that); both are violations.
//!
//! Independently of the clients: in the audit log a Cancelled task never changes again (no
//! later assignment), and a task whose every cancel was *refused* must not end Cancelled.
//! Violations are counted per task.

use std::collections::{BTreeMap, HashMap};

use state_machine::TaskStateKind;

use super::facts::{Answer, CompleteOp, Facts};
use super::{Counts, Expectations, Findings, Property, PropertyResult, Verdict};

/// Acknowledged cancels hold; Cancelled is final.
pub(crate) fn cancellation(
    f: &Facts<'_>,
    expect: &Expectations,
    counts: &mut Counts,
) -> PropertyResult {
    let mut offences: BTreeMap<u64, String> = BTreeMap::new();

    let mut cancelled_at: HashMap<u64, u64> = HashMap::new();
    for c in &f.applied {
        if let Some(&i) = cancelled_at.get(&c.task) {
            offences.entry(c.task).or_insert_with(|| {
                format!(
                    "task {} was cancelled at index {i}, then became {} at index {}",
                    c.task, c.state, c.index
                )
            });
        } else if c.state == TaskStateKind::Cancelled {
            cancelled_at.insert(c.task, c.index);
        }
    }

    let mut fresh: HashMap<u64, Vec<&CompleteOp<'_>>> = HashMap::new();
    for c in f.completes.iter().filter(|c| c.accepted_fresh()) {
        fresh.entry(c.task).or_default().push(c);
    }
    let mut acknowledged = 0usize;
    for cancel in &f.cancels {
        let Answer::Ok { t, .. } = cancel.answer else { continue };
        acknowledged += 1;
        let task = cancel.task;
        if let Some(late) = fresh.get(&task).and_then(|oks| oks.iter().find(|c| c.t_invoke > t)) {
            offences.entry(task).or_insert_with(|| {
                format!(
                    "task {task}: cancel (op {}) acknowledged at t={t}, then a report by {} (fence {}) invoked at t={} was accepted",
                    cancel.op, late.worker, late.fence, late.t_invoke
                )
            });
        }
        for (node, listing) in &f.finals {
            let why = match listing.get(&task).map(|r| r.state) {
                Some(TaskStateKind::Cancelled) => continue,
                Some(TaskStateKind::Succeeded) => {
                    "succeeded (a completion was accepted after the cancel, or the cancel was acknowledged on a finished task)".to_string()
                }
                Some(s) => s.to_string(),
                None => "without the task".to_string(),
            };
            offences.entry(task).or_insert_with(|| {
                format!(
                    "task {task}: cancel (op {}) acknowledged at t={t}, but node {node} ends {why}",
                    cancel.op
                )
            });
        }
    }

    // Only clients cancel: a Cancelled task needs a cancel that did not fail.
    let mut cancel_answers: BTreeMap<u64, bool> = BTreeMap::new();
    for c in &f.cancels {
        let all_failed = cancel_answers.entry(c.task).or_insert(true);
        *all_failed &= matches!(c.answer, Answer::Fail { .. });
    }
    for (&task, _) in cancel_answers.iter().filter(|(_, all_failed)| **all_failed) {
        if let Some((node, _)) =
            f.final_records(task).find(|(_, r)| r.state == TaskStateKind::Cancelled)
        {
            offences.entry(task).or_insert_with(|| {
                format!("task {task}: every cancel was refused, yet node {node} ends cancelled")
            });
        }
    }

    let mut findings = Findings::default();
    for (_, msg) in offences {
        findings.push(|| msg);
    }
    counts.cancel_violations = findings.count();
    let mut notes = vec![format!("{acknowledged} acknowledged cancel(s) judged")];
    if !f.has_final_reads() {
        notes.push("no final reads: the final state of cancelled tasks was not judged".into());
    }
    notes.extend(f.gap_note());
    let otherwise = if expect.cancels && acknowledged == 0 {
        Verdict::Unknown("cancels were expected, but none was acknowledged".into())
    } else {
        Verdict::Valid
    };
    findings.into_result(Property::Cancellation, otherwise, notes)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Expectations, Property};
    use crate::history::EventKind;

    #[test]
    fn cancellation_valid_on_healthy_run() {
        let (h, e) = healthy();
        assert_valid(&h, &e, Property::Cancellation);
    }

    /// Task 1 runs on w1; a cancel is acknowledged while it runs.
    fn cancel_while_running() -> H {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.applied(1, 1, "queued", 0, None, None);
        h.applied(2, 1, "assigned", 1, Some(1), Some("w1"));
        h.exec_start("w1", 1, 1, 1);
        let op = h.cancel_invoke(1);
        h.applied(3, 1, "cancelled", 1, None, None);
        h.cancel_ok(op, 1);
        h.exec_end("w1", 1, 1, true);
        h
    }

    #[test]
    fn cancel_then_rejected_completion_is_valid() {
        let mut h = cancel_while_running();
        let op = h.complete_invoke("w1", 1, 1, true);
        h.complete_rejected(op, 1, 1, true);
        h.finals(&[1, 2], &[(1, "a", "cancelled", None)], 3);
        assert_valid(
            &h,
            &Expectations { cancels: true, ..Default::default() },
            Property::Cancellation,
        );
    }

    #[test]
    fn completion_accepted_after_an_acknowledged_cancel() {
        let mut h = cancel_while_running();
        let op = h.complete_invoke("w1", 1, 1, true);
        h.complete_ok(op, 1, 1, false);
        h.finals(&[1, 2], &[(1, "a", "succeeded", Some(1))], 4);
        let r = assert_invalid(
            &h,
            &Expectations::default(),
            Property::Cancellation,
            1,
            "then a report by w1 (fence 1) invoked at t=",
        );
        assert_eq!(r.counts.cancel_violations, 1);
    }

    #[test]
    fn cancel_acknowledged_on_a_finished_task() {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        let op = h.complete_invoke("w1", 1, 1, true);
        h.complete_ok(op, 1, 1, false);
        let op = h.cancel_invoke(1);
        h.cancel_ok(op, 1);
        h.finals(&[1], &[(1, "a", "succeeded", Some(1))], 4);
        assert_invalid(&h, &Expectations::default(), Property::Cancellation, 1, "node 1 ends succeeded (a completion was accepted after the cancel, or the cancel was acknowledged on a finished task)");
    }

    #[test]
    fn assignment_after_cancel_in_the_audit_log() {
        let (mut h, e) = healthy();
        h.applied(23, 4, "assigned", 1, Some(6), Some("w2"));
        assert_invalid(
            &h,
            &e,
            Property::Cancellation,
            1,
            "task 4 was cancelled at index 14, then became assigned at index 23",
        );
    }

    #[test]
    fn refused_cancel_must_not_take_effect() {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        let op = h.cancel_invoke(1);
        h.cancel_fail(op, 1);
        h.finals(&[1], &[(1, "a", "cancelled", None)], 4);
        assert_invalid(
            &h,
            &Expectations::default(),
            Property::Cancellation,
            1,
            "every cancel was refused, yet node 1 ends cancelled",
        );
    }

    #[test]
    fn acknowledged_cancel_missing_from_the_final_state() {
        let (mut h, e) = healthy();
        h.edit(|k| match k {
            EventKind::FinalTask { node: 3, id: 4, state, .. } => {
                *state = "queued".into();
                true
            }
            _ => false,
        });
        assert_invalid(
            &h,
            &e,
            Property::Cancellation,
            1,
            "task 4: cancel (op 5) acknowledged at t=",
        );
    }

    #[test]
    fn expected_cancels_that_never_happened_are_unknown() {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.finals(&[1], &[(1, "a", "succeeded", Some(1))], 4);
        assert_unknown(
            &h,
            &Expectations { cancels: true, ..Default::default() },
            Property::Cancellation,
            "none was acknowledged",
        );
        assert_valid(&h, &Expectations::default(), Property::Cancellation);
    }
}
