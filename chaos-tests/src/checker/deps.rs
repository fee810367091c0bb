//! Dependencies are respected: no task runs before all its dependencies succeeded.
//!
//! Dependencies are submitted by idempotency key and resolved to task ids through the
//! acknowledgements and final listings (a key that does not resolve to exactly one id is
//! skipped). Three independent views, each sound on its own:
//!
//! * **Audit order** (exact): each attempt of a dependent task B, at its first
//!   Assigned/Running change at position `(i, seq)`, needs every dependency A to have become
//!   Succeeded strictly before it in apply order: at an earlier index, or earlier in the same
//!   entry (the leader assigns the tasks a completion releases in the completion's own
//!   entry). If A's success was not seen and an audit gap starts before `i`, the attempt is
//!   not judged (the success may be in the gap).
//! * **Real time** (black box): an `ExecStart` of B must not precede every success report
//!   of A: some `CompleteInvoke` of A with `success = true` must be at or before the start.
//!   Equal milliseconds count as "not before".
//! * **Final state**, per node: a B that ran (Succeeded or Failed) has only Succeeded
//!   dependencies, and a B with a Failed, Cancelled or UpstreamFailed dependency ends
//!   UpstreamFailed or Cancelled.

use std::collections::{BTreeSet, HashMap};

use state_machine::TaskStateKind;

use super::facts::Facts;
use super::{Counts, Expectations, Findings, Property, PropertyResult, Verdict};

type Deps<'a> = Option<Vec<(u64, &'a str)>>;

/// Dependency order in the audit log, in real time and in the final state.
pub(crate) fn dependencies(
    f: &Facts<'_>,
    expect: &Expectations,
    counts: &mut Counts,
) -> PropertyResult {
    let mut cache: HashMap<u64, Deps<'_>> = HashMap::new();
    let mut deps_of = |task: u64| -> Vec<(u64, &str)> {
        cache.entry(task).or_insert_with(|| f.deps_of(task)).clone().unwrap_or_default()
    };
    let mut findings = Findings::default();
    let (mut judged, mut skipped) = (0usize, 0usize);

    // Audit order.
    // Changes are visited in apply order, `(index, seq)`: a success in here came before.
    let mut succeeded: BTreeSet<u64> = BTreeSet::new();
    let mut attempts: BTreeSet<(u64, u32)> = BTreeSet::new();
    for c in &f.applied {
        if c.state == TaskStateKind::Succeeded {
            succeeded.insert(c.task);
        }
        if !c.is_held() {
            continue;
        }
        let deps = deps_of(c.task);
        if deps.is_empty() || !attempts.insert((c.task, c.attempt)) {
            continue;
        }
        let mut unsure = false;
        let mut bad = None;
        for &(dep, key) in &deps {
            if succeeded.contains(&dep) {
                continue;
            }
            if f.gap_before(c.index) {
                unsure = true;
            } else {
                bad = Some(format!("{dep} ({key:?}) had not succeeded"));
            }
        }
        match bad {
            Some(why) => findings.push(|| {
                format!(
                    "task {} attempt {} was {} at index {} but dependency {why}",
                    c.task, c.attempt, c.state, c.index
                )
            }),
            None if unsure => skipped += 1,
            None => judged += 1,
        }
    }

    // Real time.
    let mut first_success_report: HashMap<u64, u64> = HashMap::new();
    for c in f.completes.iter().filter(|c| c.success) {
        let t = first_success_report.entry(c.task).or_insert(c.t_invoke);
        *t = (*t).min(c.t_invoke);
    }
    let mut starts: BTreeSet<(u64, u64)> = BTreeSet::new();
    for e in &f.execs {
        let deps = deps_of(e.task);
        if deps.is_empty() || !starts.insert((e.task, e.fence)) {
            continue;
        }
        let bad = deps.iter().find_map(|&(dep, key)| match first_success_report.get(&dep) {
            Some(&t) if t <= e.t_start => None,
            Some(&t) => Some(format!("{dep} ({key:?}) was first reported successful at t={t}")),
            None => Some(format!("{dep} ({key:?}) was never reported successful")),
        });
        match bad {
            Some(why) => findings.push(|| {
                format!(
                    "{} started task {} (attempt {}, fence {}) at t={} but dependency {why}",
                    e.worker, e.task, e.attempt, e.fence, e.t_start
                )
            }),
            None => judged += 1,
        }
    }

    // Final state.
    let mut final_bad: BTreeSet<u64> = BTreeSet::new();
    for (node, listing) in &f.finals {
        for (&task, rec) in listing {
            let deps = deps_of(task);
            if deps.is_empty() || final_bad.contains(&task) {
                continue;
            }
            let state_of = |dep: u64| listing.get(&dep).map(|r| r.state);
            let ran = matches!(rec.state, TaskStateKind::Succeeded | TaskStateKind::Failed);
            let why = if ran {
                deps.iter().find_map(|&(dep, key)| match state_of(dep) {
                    Some(TaskStateKind::Succeeded) => None,
                    s => Some(format!(
                        "ended {} although dependency {dep} ({key:?}) is {}",
                        rec.state,
                        show(s)
                    )),
                })
            } else if matches!(rec.state, TaskStateKind::UpstreamFailed | TaskStateKind::Cancelled)
            {
                None
            } else {
                deps.iter().find_map(|&(dep, key)| match state_of(dep) {
                    Some(
                        s @ (TaskStateKind::Failed
                        | TaskStateKind::Cancelled
                        | TaskStateKind::UpstreamFailed),
                    ) => {
                        Some(format!("is {} although dependency {dep} ({key:?}) is {s}", rec.state))
                    }
                    _ => None,
                })
            };
            if let Some(why) = why {
                final_bad.insert(task);
                findings.push(|| format!("task {task} on node {node} {why}"));
            }
        }
    }

    counts.deps_violations = findings.count();
    let mut notes = vec![format!(
        "{judged} dependent assignment(s)/start(s) judged, {skipped} skipped around audit gaps"
    )];
    notes.extend(f.gap_note());
    let otherwise = if expect.deps && judged == 0 {
        Verdict::Unknown(
            "dependencies were expected, but no dependent task was assigned or started".into(),
        )
    } else {
        Verdict::Valid
    };
    findings.into_result(Property::Dependencies, otherwise, notes)
}

fn show(state: Option<TaskStateKind>) -> String {
    state.map_or_else(|| "missing".to_string(), |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::Property;
    use crate::history::EventKind;

    #[test]
    fn dependencies_valid_on_healthy_run() {
        let (h, e) = healthy();
        let r = assert_valid(&h, &e, Property::Dependencies);
        assert!(r.property(Property::Dependencies).notes[0].starts_with("2 dependent"), "{r}");
    }

    #[test]
    fn assigned_before_dependency_succeeded_in_the_audit_log() {
        let (mut h, e) = healthy();
        // Task 3 ("c", after "a") assigned at index 14, before "a" succeeded at 15.
        h.applied(14, 3, "assigned", 1, Some(9), Some("w3"));
        let r = assert_invalid(
            &h,
            &e,
            Property::Dependencies,
            1,
            "task 3 attempt 1 was assigned at index 14 but dependency 1 (\"a\") had not succeeded",
        );
        assert_eq!(r.counts.deps_violations, 1);
    }

    #[test]
    fn assigned_after_the_dependency_success_in_the_same_entry_is_valid() {
        // "c" (task 3, after "a") released and assigned in the entry where "a" succeeds
        // (op 0), right after its release (op 1).
        let (mut h, e) = healthy();
        h.applied_seq(15, 2, 3, "assigned", 1, Some(9), Some("w3"));
        assert_valid(&h, &e, Property::Dependencies);
    }

    #[test]
    fn assigned_before_the_dependency_success_in_the_same_entry_is_a_violation() {
        let (mut h, e) = healthy();
        h.remove(|k| matches!(k, EventKind::Applied { index: 15, .. }));
        h.applied_seq(15, 0, 3, "assigned", 1, Some(9), Some("w3"));
        h.applied_seq(15, 1, 1, "succeeded", 1, Some(2), Some("w2"));
        assert_invalid(
            &h,
            &e,
            Property::Dependencies,
            1,
            "task 3 attempt 1 was assigned at index 15 but dependency 1 (\"a\") had not succeeded",
        );
    }

    #[test]
    fn dependency_success_hidden_in_a_gap_is_not_judged() {
        let (mut h, e) = healthy();
        h.remove(|k| matches!(k, EventKind::Applied { index: 15, .. }));
        h.gap(15, 15);
        let r = assert_valid(&h, &e, Property::Dependencies);
        let notes = &r.property(Property::Dependencies).notes;
        assert!(notes[0].contains("1 skipped"), "{r}");
        assert!(notes[1].contains("1 gap(s)"), "{r}");
    }

    #[test]
    fn same_missing_success_without_a_gap_is_a_violation() {
        let (mut h, e) = healthy();
        h.remove(|k| matches!(k, EventKind::Applied { index: 15, .. }));
        assert_invalid(&h, &e, Property::Dependencies, 1, "dependency 1 (\"a\") had not succeeded");
    }

    #[test]
    fn started_before_any_success_report_of_the_dependency() {
        let (mut h, e) = healthy();
        h.exec_start("w3", 3, 9, 40);
        // Move that start before w2's first report for task 1.
        let t = h
            .events
            .iter()
            .find(|e| matches!(e.kind, EventKind::CompleteInvoke { task: 1, .. }))
            .unwrap()
            .t_ms;
        h.events.last_mut().unwrap().t_ms = t - 1;
        assert_invalid(&h, &e, Property::Dependencies, 1, &format!("w3 started task 3 (attempt 9, fence 40) at t={} but dependency 1 (\"a\") was first reported successful at t={t}", t - 1));
    }

    #[test]
    fn final_state_must_follow_dependencies() {
        let (mut h, e) = healthy();
        // "c" depends on "a"; say "a" ended failed on node 2 while "c" succeeded.
        h.edit(|k| match k {
            EventKind::FinalTask { node: 2, id: 1, state, fence, .. } => {
                *state = "failed".into();
                *fence = None;
                true
            }
            _ => false,
        });
        assert_invalid(
            &h,
            &e,
            Property::Dependencies,
            1,
            "task 3 on node 2 ended succeeded although dependency 1 (\"a\") is failed",
        );
    }

    #[test]
    fn dependent_of_a_cancelled_task_must_not_stay_queued() {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.submit_ok("b", 1, &["a"], 2);
        h.finals(&[1], &[(1, "a", "cancelled", None), (2, "b", "queued", None)], 9);
        assert_invalid(
            &h,
            &Default::default(),
            Property::Dependencies,
            1,
            "task 2 on node 1 is queued although dependency 1 (\"a\") is cancelled",
        );
    }

    #[test]
    fn expected_but_unexercised_dependencies_are_unknown() {
        let (mut h, mut e) = healthy();
        h.remove(|k| matches!(k, EventKind::SubmitInvoke { key, .. } if key == "c"));
        h.remove(|k| matches!(k, EventKind::SubmitOk { key, .. } if key == "c"));
        h.remove(|k| matches!(k, EventKind::FinalTask { id: 3, .. }));
        assert_unknown(&h, &e, Property::Dependencies, "no dependent task");
        e.deps = false;
        assert_valid(&h, &e, Property::Dependencies);
    }
}
