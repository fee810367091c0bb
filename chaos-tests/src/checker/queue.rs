//! Total-queue properties: what goes in must come out, exactly once per idempotency key.
//!
//! Modelled on Jepsen's `total-queue` checker, with the final listings of the nodes in the
//! role of the drain:
//! * **lost**: a task acknowledged by a `SubmitOk`, or created in the audit log (committed),
//!   that some reporting node does not hold at the end; **stuck**: a task held at the end in
//!   a non-terminal state (the run drains before the final reads, so every task must have
//!   finished);
//! * **recovered** (information): a key whose submissions were all unknown or failed but
//!   whose task exists — the ok/fail/info rule at work;
//! * **unexpected**: a final task whose key no client submitted, a task whose submissions
//!   all *failed* yet exists, or a task a worker ran that nothing accounts for;
//! * **duplicated**: a key naming two task ids, or a task id answered for two keys.

use std::collections::{BTreeMap, BTreeSet};

use super::facts::Facts;
use super::{Counts, Findings, Property, PropertyResult, Verdict};

fn no_final_reads() -> PropertyResult {
    PropertyResult {
        property: Property::Lost,
        verdict: Verdict::Unknown("no node reported its final state".into()),
        violations: 0,
        notes: vec![],
    }
}

/// Lost and stuck tasks; also fills the attempt/acknowledged/recovered counts.
pub(crate) fn lost(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    counts.attempts = f.submits.len();
    counts.acknowledged = f.acked.len();
    counts.recovered = f
        .keys
        .values()
        .filter(|k| k.acked_ids.is_empty() && k.any_unknown && !k.final_ids.is_empty())
        .count();
    if !f.has_final_reads() {
        return no_final_reads();
    }

    let mut findings = Findings::default();
    let missing_on = |id: u64| -> Vec<u64> {
        f.finals.iter().filter(|(_, listing)| !listing.contains_key(&id)).map(|(n, _)| *n).collect()
    };
    for (&id, &key) in &f.acked {
        let missing = missing_on(id);
        if !missing.is_empty() {
            counts.lost += 1;
            findings.push(|| format!("task {id} (key {key:?}) was acknowledged but is missing on node(s) {missing:?}"));
        }
    }
    // A change in the audit log means the creating entry was committed: the task must
    // survive even if its submitter never heard back.
    let mut created: BTreeMap<u64, u64> = BTreeMap::new();
    for c in &f.applied {
        created.entry(c.task).or_insert(c.index);
    }
    for (&id, &index) in created.iter().filter(|(id, _)| !f.acked.contains_key(id)) {
        let missing = missing_on(id);
        if !missing.is_empty() {
            counts.lost += 1;
            findings.push(|| format!("task {id} appears in the audit log (index {index}) but is missing on node(s) {missing:?}"));
        }
    }

    let mut stuck: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (node, listing) in &f.finals {
        for (id, rec) in listing.iter().filter(|(_, r)| !r.state.is_terminal()) {
            stuck.entry(*id).or_default().push(format!("{} on node {node}", rec.state));
        }
    }
    for (id, where_) in stuck {
        counts.stuck += 1;
        findings.push(|| format!("task {id} is not terminal at the end: {}", where_.join(", ")));
    }

    let notes = vec![format!(
        "{} submit(s) invoked, {} task(s) acknowledged, {} created in the audit log, {} recovered; {} node(s) reported",
        counts.attempts,
        counts.acknowledged,
        created.len(),
        counts.recovered,
        f.finals.len()
    )];
    findings.into_result(Property::Lost, Verdict::Valid, notes)
}

/// Tasks nobody submitted (or whose every submission failed).
pub(crate) fn unexpected(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    if !f.has_final_reads() {
        return PropertyResult { property: Property::Unexpected, ..no_final_reads() };
    }
    let mut findings = Findings::default();
    let mut seen: BTreeSet<(u64, Option<&str>)> = BTreeSet::new();
    for listing in f.finals.values() {
        for (&id, rec) in listing {
            if !seen.insert((id, rec.key)) {
                continue;
            }
            match rec.key {
                None if !f.acked.contains_key(&id) => {
                    findings.push(|| {
                        format!("task {id} has no idempotency key and no client was told about it")
                    });
                }
                None => {}
                Some(key) => {
                    let Some(k) = f.keys.get(key).filter(|k| k.invokes > 0) else {
                        findings.push(|| {
                            format!("task {id} carries key {key:?}, which no client submitted")
                        });
                        continue;
                    };
                    if k.all_refused() && k.acked_ids.is_empty() {
                        findings.push(|| {
                            format!("task {id} (key {key:?}) exists although every submission of its key was refused")
                        });
                    }
                }
            }
        }
    }
    // Work on a task nobody can account for (not submitted, not in the log, not at the end).
    let audit: BTreeSet<u64> = f.applied.iter().map(|c| c.task).collect();
    let mut ran: BTreeMap<u64, &str> = BTreeMap::new();
    for e in &f.execs {
        ran.entry(e.task).or_insert(e.worker);
    }
    for (task, worker) in ran {
        if !f.acked.contains_key(&task) && !audit.contains(&task) && !f.in_final_state(task) {
            findings.push(|| format!("worker {worker} ran task {task}, which no submission, audit entry or node accounts for"));
        }
    }
    counts.unexpected = findings.count();
    findings.into_result(Property::Unexpected, Verdict::Valid, vec![])
}

/// One key, one task; one task, one key.
pub(crate) fn duplicated(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    let mut findings = Findings::default();
    let mut judged = 0usize;
    for (key, k) in &f.keys {
        let ids: BTreeSet<u64> = k.acked_ids.union(&k.final_ids).copied().collect();
        judged += usize::from(!ids.is_empty());
        if ids.len() > 1 {
            findings.push(|| {
                format!(
                    "key {key:?} names {} tasks: {ids:?} (acknowledged {:?}, at the end {:?})",
                    ids.len(),
                    k.acked_ids,
                    k.final_ids
                )
            });
        }
    }
    for (id, keys) in f.id_keys.iter().filter(|(_, keys)| keys.len() > 1) {
        findings
            .push(|| format!("task {id} was answered or listed for {} keys: {keys:?}", keys.len()));
    }
    counts.duplicated = findings.count();
    let otherwise = if judged == 0 {
        Verdict::Unknown("no idempotency key was acknowledged or listed at the end".into())
    } else {
        Verdict::Valid
    };
    findings.into_result(Property::Duplicated, otherwise, vec![format!("{judged} key(s) judged")])
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Expectations, Property};
    use crate::history::EventKind;

    #[test]
    fn lost_valid_on_healthy_run() {
        let (h, e) = healthy();
        let r = assert_valid(&h, &e, Property::Lost);
        assert_eq!((r.counts.attempts, r.counts.acknowledged, r.counts.recovered), (5, 4, 1));
    }

    #[test]
    fn acknowledged_task_missing_on_one_node_is_lost() {
        let (mut h, e) = healthy();
        h.remove(|k| matches!(k, EventKind::FinalTask { node: 3, id: 2, .. }));
        let r = assert_invalid(
            &h,
            &e,
            Property::Lost,
            1,
            "task 2 (key \"b\") was acknowledged but is missing on node(s) [3]",
        );
        assert_eq!(r.counts.lost, 1);
    }

    #[test]
    fn committed_but_unacknowledged_task_must_survive() {
        let (mut h, e) = healthy();
        // Task 5's submit was unknown; it is in the audit log, so it was committed.
        h.remove(|k| matches!(k, EventKind::FinalTask { id: 5, .. }));
        let r =
            assert_invalid(&h, &e, Property::Lost, 1, "task 5 appears in the audit log (index 20)");
        assert_eq!(r.counts.recovered, 0);
    }

    #[test]
    fn acknowledged_task_still_running_at_the_end_is_stuck() {
        let (mut h, e) = healthy();
        h.edit(|k| match k {
            EventKind::FinalTask { node: 2, id: 3, state, fence, .. } => {
                *state = "running".into();
                *fence = None;
                true
            }
            _ => false,
        });
        let r = assert_invalid(
            &h,
            &e,
            Property::Lost,
            1,
            "task 3 is not terminal at the end: running on node 2",
        );
        assert_eq!((r.counts.lost, r.counts.stuck), (0, 1));
    }

    #[test]
    fn lost_is_unknown_without_final_reads() {
        let (mut h, e) = healthy();
        h.remove(|k| matches!(k, EventKind::FinalTask { .. } | EventKind::Digest { .. }));
        assert_unknown(&h, &e, Property::Lost, "final state");
        assert_unknown(&h, &e, Property::Unexpected, "final state");
    }

    #[test]
    fn unexpected_valid_on_healthy_run() {
        let (h, e) = healthy();
        assert_valid(&h, &e, Property::Unexpected);
    }

    #[test]
    fn final_task_with_a_key_nobody_submitted_is_unexpected() {
        let (mut h, e) = healthy();
        h.final_task(1, 77, Some("phantom"), "succeeded", Some(9));
        let r = assert_invalid(&h, &e, Property::Unexpected, 1, "task 77 carries key \"phantom\"");
        assert_eq!(r.counts.unexpected, 1);
    }

    #[test]
    fn keyless_unacknowledged_task_and_unaccounted_work_are_unexpected() {
        let (mut h, e) = healthy();
        h.final_task(2, 78, None, "failed", None);
        h.exec_start("w9", 4242, 1, 99);
        h.exec_end("w9", 4242, 99, true);
        assert_invalid(&h, &e, Property::Unexpected, 2, "worker w9 ran task 4242");
    }

    #[test]
    fn task_of_a_refused_submission_is_unexpected() {
        let mut h = H::new();
        let op = h.submit_invoke("x", 1, &[]);
        h.submit_fail_for(op, "x");
        h.finals(&[1, 2], &[(1, "x", "succeeded", Some(1))], 5);
        assert_invalid(
            &h,
            &Expectations::default(),
            Property::Unexpected,
            1,
            "every submission of its key was refused",
        );
    }

    #[test]
    fn duplicated_valid_on_healthy_run() {
        let (h, e) = healthy();
        assert_valid(&h, &e, Property::Duplicated);
    }

    #[test]
    fn two_ids_for_one_key_is_duplicated() {
        let (mut h, e) = healthy();
        // A retry of "a" is answered with a fresh id.
        h.submit_ok("a", 1, &[], 6);
        let r = assert_invalid(&h, &e, Property::Duplicated, 1, "key \"a\" names 2 tasks: {1, 6}");
        assert_eq!(r.counts.duplicated, 1);
    }

    #[test]
    fn duplicate_in_final_state_only_is_caught() {
        let (mut h, e) = healthy();
        h.final_task(1, 6, Some("b"), "succeeded", Some(7));
        assert_invalid(&h, &e, Property::Duplicated, 1, "key \"b\" names 2 tasks");
    }

    #[test]
    fn one_id_for_two_keys_is_caught() {
        let mut h = H::new();
        h.submit_ok("x", 1, &[], 1);
        h.submit_ok("y", 1, &[], 1);
        assert_invalid(
            &h,
            &Expectations::default(),
            Property::Duplicated,
            1,
            "task 1 was answered or listed for 2 keys",
        );
    }

    #[test]
    fn duplicated_is_unknown_without_any_key() {
        let mut h = H::new();
        let op = h.submit_invoke("x", 1, &[]);
        h.submit_unknown_for(op, "x");
        assert_unknown(&h, &Expectations::default(), Property::Duplicated, "no idempotency key");
    }
}
