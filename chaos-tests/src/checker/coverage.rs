//! A run must not pass by doing nothing, nor by a broken harness.
//!
//! * **History** (well-formedness): no malformed event (a completion without its invoke, an
//!   op answered twice, an unknown state or fault name, a fault never healed) and no
//!   `HarnessError`. Either makes the run unknown — the harness failed, not the system.
//! * **Coverage**: the run reached the minimums of its [`Expectations`]: leader changes,
//!   stale completions rejected, recovered submissions, and a `FaultStart` of every
//!   expected fault kind. Falling short is unknown. (Cancels, dependencies and priorities
//!   are checked by their own properties, which know what "exercised" means for them.)

use std::collections::BTreeSet;

use super::facts::Facts;
use super::{Counts, Expectations, Findings, Property, PropertyResult, Verdict};

/// The history is usable.
pub(crate) fn history(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    counts.harness_problems = f.harness_problems();
    let notes = vec![format!("{} event(s)", f.timeline.len())];
    if counts.harness_problems == 0 {
        return PropertyResult {
            property: Property::History,
            verdict: Verdict::Valid,
            violations: 0,
            notes,
        };
    }
    let mut problems: Vec<String> =
        f.harness_errors.iter().map(|e| format!("harness error: {e}")).collect();
    problems.extend(f.malformed.iter().cloned());
    let shown: Vec<&str> = problems.iter().take(super::MAX_EXAMPLES).map(String::as_str).collect();
    PropertyResult {
        property: Property::History,
        verdict: Verdict::Unknown(format!(
            "{} harness problem(s): {}",
            problems.len(),
            shown.join(" | ")
        )),
        violations: 0,
        notes,
    }
}

/// The run exercised what it was meant to.
pub(crate) fn coverage(f: &Facts<'_>, expect: &Expectations, counts: &Counts) -> PropertyResult {
    let mut short = Findings::default();
    let mut check = |what: &str, got: usize, want: usize| {
        if got < want {
            short.push(|| format!("{what}: {got} < {want}"));
        }
    };
    check("leader changes", counts.leader_changes, expect.min_leader_changes);
    check("stale completions rejected", counts.stale_rejected, expect.min_stale_rejections);
    check("recovered submissions", counts.recovered, expect.min_recovered);
    let seen: BTreeSet<&str> = f.faults.iter().map(|fa| fa.kind).collect();
    for kind in &expect.fault_kinds {
        if !seen.contains(kind.as_str()) {
            short.push(|| format!("fault {kind:?} never started"));
        }
    }
    let notes = vec![format!(
        "leader_changes={} stale_rejected={} recovered={} faults={:?}",
        counts.leader_changes, counts.stale_rejected, counts.recovered, seen
    )];
    // Shortfalls are not violations of the system: the run is unknown, not invalid.
    let verdict = match short.count() {
        0 => Verdict::Valid,
        _ => Verdict::Unknown(format!(
            "the run did not exercise what it expected: {}",
            short.examples.join("; ")
        )),
    };
    PropertyResult { property: Property::Coverage, verdict, violations: 0, notes }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{check, Outcome, Property};
    use crate::history::{fault, EventKind};

    #[test]
    fn history_valid_on_healthy_run() {
        let (h, e) = healthy();
        assert_valid(&h, &e, Property::History);
    }

    #[test]
    fn malformed_history_is_unknown_not_invalid() {
        let (mut h, e) = healthy();
        h.push(EventKind::CompleteOk { op: 4242, task: 1, fence: 2, duplicate: false });
        let r = assert_unknown(
            &h,
            &e,
            Property::History,
            "complete_ok for op 4242 without its complete invoke",
        );
        assert_eq!(r.counts.harness_problems, 1);
        assert_eq!(r.outcome(), Outcome::Unknown);
    }

    #[test]
    fn unhealed_fault_is_a_harness_problem() {
        let (mut h, e) = healthy();
        h.remove(|k| matches!(k, EventKind::FaultEnd { id: 2 }));
        assert_unknown(&h, &e, Property::History, "fault 2 was never healed");
    }

    #[test]
    fn coverage_valid_on_healthy_run() {
        let (h, e) = healthy();
        assert_valid(&h, &e, Property::Coverage);
    }

    #[test]
    fn missing_fault_kind_is_unknown() {
        let (h, mut e) = healthy();
        e.fault_kinds.push(fault::PARTITION_LEADER_MINORITY.into());
        assert_unknown(
            &h,
            &e,
            Property::Coverage,
            "fault \"partition-leader-minority\" never started",
        );
    }

    #[test]
    fn too_few_leader_changes_or_stale_rejections_is_unknown() {
        let (h, mut e) = healthy();
        e.min_stale_rejections = 2;
        e.min_leader_changes = 3;
        e.min_recovered = 2;
        let r = assert_unknown(&h, &e, Property::Coverage, "leader changes: 1 < 3; stale completions rejected: 1 < 2; recovered submissions: 1 < 2");
        assert_eq!(r.property(Property::Coverage).violations, 0);
    }

    #[test]
    fn run_without_the_stale_rejection_is_not_covered() {
        let (mut h, e) = healthy();
        h.edit(|k| match k {
            EventKind::CompleteRejected { stale, .. } => {
                *stale = false;
                true
            }
            _ => false,
        });
        let report = check(&h.events, &e);
        assert_eq!(report.outcome(), Outcome::Unknown, "{report}");
        assert_eq!(report.counts.stale_rejected, 0);
    }
}
