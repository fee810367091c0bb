//! The Jepsen-style checker: judges a recorded [`history`](crate::history) after the run.
//!
//! [`check`] reads the events once into a pre-digested view (`facts`), then judges each
//! [`Property`] on its own (one module per family) and gathers the results into a
//! [`Report`]: total-queue style counts, failover percentiles, and one [`Verdict`] per
//! property.
//!
//! # Rules every property follows
//!
//! * **Sound before complete.** A violation is reported only when the history proves it.
//!   Ambiguity (an unknown outcome, events in the same millisecond, a range of the audit log
//!   the observer missed) is resolved in the system's favour, and the property says what it
//!   could not judge in its notes.
//! * **Unknown is not a pass.** A property that had nothing to judge although the run was
//!   meant to exercise it, or whose inputs are missing (no final reads, no digests), is
//!   [`Verdict::Unknown`]; so is every property of a run whose harness failed. The run is
//!   valid only if every property is [`Verdict::Valid`].
//! * **Harness failures are not system failures.** Malformed events (a completion without
//!   its invoke, an unknown state name) and `HarnessError` events make the run unknown,
//!   never invalid.
//! * **Cost.** Every property is O(n log n) in the number of events (the dependency checks
//!   are O(n · deps)), so histories of 100k events check in well under a second.

mod cancel;
mod completion;
mod converge;
mod coverage;
mod deps;
mod facts;
mod failover;
mod priority;
mod queue;
#[cfg(test)]
mod testkit;

use std::fmt;

use serde::Serialize;

use crate::history::Event;

/// At most this many examples are kept per property.
pub const MAX_EXAMPLES: usize = 5;

/// What the run intended to exercise; a run that did not is [`Verdict::Unknown`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Expectations {
    /// Minimum number of leader changes (term increases seen in `LeaderObserved`).
    pub min_leader_changes: usize,
    /// Minimum number of completions rejected for a stale fence or wrong worker.
    pub min_stale_rejections: usize,
    /// Minimum number of submissions whose outcome was unknown but whose task exists at the
    /// end (proves the run produced, and resolved, ambiguous submissions).
    pub min_recovered: usize,
    /// Fault kinds (see [`crate::history::fault`]) that must each appear in a `FaultStart`.
    pub fault_kinds: Vec<String>,
    /// The workload cancelled tasks: at least one cancel must have been acknowledged.
    pub cancels: bool,
    /// The workload used dependencies: at least one dependent task must have been assigned
    /// or started, and checked against its dependencies.
    pub deps: bool,
    /// The workload used priorities: at least one assignment must have been made while a
    /// task of another priority was queued and visible to the planner.
    pub priorities: bool,
    /// Optional failover bounds; exceeding one makes the failover property invalid.
    /// Leave them unset in tests that must not depend on wall-clock speed.
    pub failover_limits: FailoverLimits,
}

/// Upper bounds on failover time, in milliseconds (unset = not judged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FailoverLimits {
    /// Bound on the median.
    pub p50_ms: Option<u64>,
    /// Bound on the 99th percentile.
    pub p99_ms: Option<u64>,
    /// Bound on the worst case.
    pub max_ms: Option<u64>,
}

/// The properties judged, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Property {
    /// The history is well formed and the harness reported no failure.
    History,
    /// Every acknowledged (or applied) task exists at the end, in a terminal state.
    Lost,
    /// Every task at the end was submitted by some client.
    Unexpected,
    /// One idempotency key names exactly one task (and one task has one key).
    Duplicated,
    /// At most one accepted report per attempt and one accepted success per task; terminal
    /// states never change.
    DoubleCompletions,
    /// No report from a stale attempt or from a worker that does not hold the fence is
    /// accepted; fences are never shared between attempts.
    StaleAccepted,
    /// No task is assigned, started or succeeds before all its dependencies succeeded.
    Dependencies,
    /// An acknowledged cancel is final.
    Cancellation,
    /// No assignment passes over a higher-priority task the planner could see.
    Priority,
    /// Replicas agree: equal digests at equal indexes, same final index and final state.
    Convergence,
    /// At most one leader per term.
    ElectionSafety,
    /// Writes are accepted again after each leader fault (measured; optionally bounded).
    Failover,
    /// The run exercised what it was meant to.
    Coverage,
}

impl Property {
    /// Every property, in report order.
    pub const ALL: [Property; 13] = [
        Property::History,
        Property::Lost,
        Property::Unexpected,
        Property::Duplicated,
        Property::DoubleCompletions,
        Property::StaleAccepted,
        Property::Dependencies,
        Property::Cancellation,
        Property::Priority,
        Property::Convergence,
        Property::ElectionSafety,
        Property::Failover,
        Property::Coverage,
    ];

    /// Snake-case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Property::History => "history",
            Property::Lost => "lost",
            Property::Unexpected => "unexpected",
            Property::Duplicated => "duplicated",
            Property::DoubleCompletions => "double_completions",
            Property::StaleAccepted => "stale_accepted",
            Property::Dependencies => "dependencies",
            Property::Cancellation => "cancellation",
            Property::Priority => "priority",
            Property::Convergence => "convergence",
            Property::ElectionSafety => "election_safety",
            Property::Failover => "failover",
            Property::Coverage => "coverage",
        }
    }
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The judgement of one property.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Holds on everything that could be judged, and enough could be judged.
    Valid,
    /// Violated; up to [`MAX_EXAMPLES`] human-readable examples.
    Invalid(Vec<String>),
    /// Could not be judged (or was not exercised); fails the run.
    Unknown(String),
}

impl Verdict {
    /// True only for [`Verdict::Valid`].
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid)
    }
}

/// The overall outcome of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every property is valid.
    Valid,
    /// Some property is violated.
    Invalid,
    /// Nothing is violated, but something could not be judged: a failure all the same.
    Unknown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Valid => "valid",
            Outcome::Invalid => "invalid",
            Outcome::Unknown => "unknown",
        })
    }
}

/// One property's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PropertyResult {
    /// Which property.
    pub property: Property,
    /// The judgement.
    pub verdict: Verdict,
    /// Number of violations found (the examples are at most [`MAX_EXAMPLES`] of them).
    pub violations: usize,
    /// What was judged, what was skipped and why.
    pub notes: Vec<String>,
}

/// Jepsen-style counts over the whole history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Submit invocations.
    pub attempts: usize,
    /// Distinct task ids acknowledged by a `SubmitOk`.
    pub acknowledged: usize,
    /// Acknowledged or applied tasks missing from some node's final state.
    pub lost: usize,
    /// Acknowledged tasks present at the end but not terminal.
    pub stuck: usize,
    /// Keys whose submissions were all unknown (or failed) but whose task exists at the end.
    pub recovered: usize,
    /// Final tasks (and executed tasks) no client submitted.
    pub unexpected: usize,
    /// Keys with more than one task id, plus task ids with more than one key.
    pub duplicated: usize,
    /// Tasks with more than one accepted completion (or a terminal state that changed).
    pub double_completions: usize,
    /// Accepted reports from a stale attempt or from the wrong worker.
    pub stale_accepted: usize,
    /// Fences given to two different attempts or workers of one task.
    pub fence_reuse: usize,
    /// Reports rejected as stale (desired: fencing at work).
    pub stale_rejected: usize,
    /// Executions of different attempts of one task that overlapped in time (allowed by
    /// at-least-once execution; reported for information).
    pub exec_overlaps: usize,
    /// Assignments, starts or final states that violate a dependency.
    pub deps_violations: usize,
    /// Acknowledged cancels that did not hold.
    pub cancel_violations: usize,
    /// Assignments that passed over a higher-priority visible task.
    pub priority_inversions: usize,
    /// Assignments judged by the priority check.
    pub priority_judged: usize,
    /// Indexes with different digests, plus one if final applied indexes differ.
    pub digest_mismatches: usize,
    /// Tasks whose final record differs between nodes, plus audit entries seen with two
    /// different contents.
    pub replica_mismatches: usize,
    /// Leader changes observed.
    pub leader_changes: usize,
    /// Terms with more than one leader.
    pub split_brain: usize,
    /// Malformed events and harness errors.
    pub harness_problems: usize,
}

/// Failover measurements over the leader faults of the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FailoverStats {
    /// Number of leader faults (see [`crate::history::fault::LEADER_FAULTS`]).
    pub leader_faults: usize,
    /// Per measured fault: ms from the fault start to the first acknowledgement of a write
    /// invoked at or after it; sorted ascending.
    pub samples_ms: Vec<u64>,
    /// Leader faults after which no write invoked later was ever acknowledged.
    pub unmeasured: usize,
    /// Median (nearest rank).
    pub p50_ms: Option<u64>,
    /// 99th percentile (nearest rank).
    pub p99_ms: Option<u64>,
    /// Worst case.
    pub max_ms: Option<u64>,
}

/// The checker's result for one history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// What was expected of the run.
    pub expectations: Expectations,
    /// Counts over the history.
    pub counts: Counts,
    /// Failover measurements.
    pub failover: FailoverStats,
    /// One result per property, in [`Property::ALL`] order.
    pub properties: Vec<PropertyResult>,
}

impl Report {
    /// Invalid if any property is invalid, else unknown if any is unknown, else valid.
    pub fn outcome(&self) -> Outcome {
        let mut outcome = Outcome::Valid;
        for p in &self.properties {
            match p.verdict {
                Verdict::Invalid(_) => return Outcome::Invalid,
                Verdict::Unknown(_) => outcome = Outcome::Unknown,
                Verdict::Valid => {}
            }
        }
        outcome
    }

    /// True only if every property is valid.
    pub fn is_valid(&self) -> bool {
        self.outcome() == Outcome::Valid
    }

    /// The result of one property.
    pub fn property(&self, property: Property) -> &PropertyResult {
        self.properties
            .iter()
            .find(|p| p.property == property)
            .expect("a report holds every property")
    }
}

/// Judges `history` (in any order: it is put in time order first) against `expect`.
pub fn check(history: &[Event], expect: &Expectations) -> Report {
    let facts = facts::Facts::build(history);
    let mut counts = Counts::default();
    let mut properties = Vec::with_capacity(Property::ALL.len());

    properties.push(coverage::history(&facts, &mut counts));
    properties.push(queue::lost(&facts, &mut counts));
    properties.push(queue::unexpected(&facts, &mut counts));
    properties.push(queue::duplicated(&facts, &mut counts));
    properties.push(completion::double_completions(&facts, &mut counts));
    properties.push(completion::stale_accepted(&facts, &mut counts));
    properties.push(deps::dependencies(&facts, expect, &mut counts));
    properties.push(cancel::cancellation(&facts, expect, &mut counts));
    properties.push(priority::priority(&facts, expect, &mut counts));
    properties.push(converge::convergence(&facts, &mut counts));
    properties.push(converge::election_safety(&facts, &mut counts));
    let (failover_result, failover) = failover::failover(&facts, expect);
    properties.push(failover_result);
    properties.push(coverage::coverage(&facts, expect, &counts));

    // A failed harness taints every judgement: what looks like a pass may be a run that
    // never happened as intended.
    if counts.harness_problems > 0 {
        for p in properties.iter_mut().filter(|p| p.verdict.is_valid()) {
            p.verdict = Verdict::Unknown("the history is malformed or the harness failed".into());
        }
    }
    debug_assert!(properties.iter().map(|p| p.property).eq(Property::ALL));
    Report { expectations: expect.clone(), counts, failover, properties }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "lost={} unexpected={} duplicated={} double_completions={} stale_accepted={} \
             deps_violations={} cancel_violations={} priority_inversions={} \
             digest_mismatches={} stuck={} fence_reuse={} replica_mismatches={} split_brain={}",
            c.lost,
            c.unexpected,
            c.duplicated,
            c.double_completions,
            c.stale_accepted,
            c.deps_violations,
            c.cancel_violations,
            c.priority_inversions,
            c.digest_mismatches,
            c.stuck,
            c.fence_reuse,
            c.replica_mismatches,
            c.split_brain,
        )?;
        writeln!(
            f,
            "attempts={} acknowledged={} recovered={} stale_rejected={} exec_overlaps={} \
             leader_changes={} priority_judged={} harness_problems={}",
            c.attempts,
            c.acknowledged,
            c.recovered,
            c.stale_rejected,
            c.exec_overlaps,
            c.leader_changes,
            c.priority_judged,
            c.harness_problems,
        )?;
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| format!("{v}ms"));
        let fo = &self.failover;
        writeln!(
            f,
            "failover: leader_faults={} measured={} unmeasured={} p50={} p99={} max={}",
            fo.leader_faults,
            fo.samples_ms.len(),
            fo.unmeasured,
            ms(fo.p50_ms),
            ms(fo.p99_ms),
            ms(fo.max_ms),
        )?;
        writeln!(f, "verdict: {}", self.outcome())?;
        for p in &self.properties {
            match &p.verdict {
                Verdict::Valid => writeln!(f, "  {:<19} valid", p.property.name())?,
                Verdict::Unknown(why) => writeln!(f, "  {:<19} unknown: {why}", p.property.name())?,
                Verdict::Invalid(examples) => {
                    writeln!(
                        f,
                        "  {:<19} INVALID: {} violation(s)",
                        p.property.name(),
                        p.violations
                    )?;
                    for e in examples {
                        writeln!(f, "      - {e}")?;
                    }
                }
            }
            for n in &p.notes {
                writeln!(f, "      note: {n}")?;
            }
        }
        Ok(())
    }
}

/// Collects violations: counts them all, keeps the first [`MAX_EXAMPLES`] descriptions.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    count: usize,
    examples: Vec<String>,
}

impl Findings {
    /// Records one violation; `describe` runs only while examples are still kept.
    pub(crate) fn push(&mut self, describe: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(describe());
        }
    }

    /// Adds `other`'s violations, keeping examples while there is room.
    pub(crate) fn absorb(&mut self, other: Findings) {
        self.count += other.count;
        let room = MAX_EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }

    /// Number of violations recorded.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// The result: invalid if anything was found, else `otherwise` (valid, or unknown when
    /// the property was not exercised).
    pub(crate) fn into_result(
        self,
        property: Property,
        otherwise: Verdict,
        notes: Vec<String>,
    ) -> PropertyResult {
        let verdict = if self.count > 0 { Verdict::Invalid(self.examples) } else { otherwise };
        PropertyResult { property, verdict, violations: self.count, notes }
    }
}

#[cfg(test)]
mod tests {
    use super::testkit::*;
    use super::*;

    #[test]
    fn healthy_history_is_valid_on_every_property() {
        let (h, expect) = healthy();
        let report = check(&h.events, &expect);
        assert!(report.is_valid(), "{report}");
        assert_eq!(report.outcome(), Outcome::Valid);
        // The healthy run really exercised the properties it claims to.
        assert_eq!(report.counts.recovered, 1, "{report}");
        assert!(report.counts.stale_rejected >= 1);
        assert!(report.counts.leader_changes >= 1);
        assert!(report.counts.priority_judged >= 1);
        assert_eq!(report.failover.samples_ms.len(), 1);
    }

    #[test]
    fn input_order_does_not_matter() {
        let (h, expect) = healthy();
        let mut reversed = h.events.clone();
        reversed.reverse();
        assert_eq!(check(&reversed, &expect), check(&h.events, &expect));
    }

    #[test]
    fn unknown_property_fails_the_run() {
        let (h, mut expect) = healthy();
        expect.min_leader_changes = 50;
        let report = check(&h.events, &expect);
        assert!(matches!(report.property(Property::Coverage).verdict, Verdict::Unknown(_)));
        assert!(report.properties.iter().filter(|p| !p.verdict.is_valid()).count() == 1);
        assert_eq!(report.outcome(), Outcome::Unknown);
        assert!(!report.is_valid());
        assert!(report.to_string().contains("verdict: unknown"), "{report}");
    }

    #[test]
    fn invalid_wins_over_unknown() {
        let (mut h, mut expect) = healthy();
        expect.min_leader_changes = 50;
        // An acknowledged task that no node holds at the end.
        h.submit_ok("ghost", 1, &[], 999);
        let report = check(&h.events, &expect);
        assert_eq!(report.outcome(), Outcome::Invalid, "{report}");
    }

    #[test]
    fn harness_error_makes_every_passing_property_unknown() {
        let (mut h, expect) = healthy();
        h.harness_error("could not install nft rule");
        let report = check(&h.events, &expect);
        assert_eq!(report.outcome(), Outcome::Unknown, "{report}");
        assert!(report.properties.iter().all(|p| matches!(p.verdict, Verdict::Unknown(_))));
    }

    #[test]
    fn display_prints_counts_failover_and_properties() {
        let (h, expect) = healthy();
        let text = check(&h.events, &expect).to_string();
        let first = text.lines().next().unwrap();
        assert!(first.starts_with(
            "lost=0 unexpected=0 duplicated=0 double_completions=0 stale_accepted=0 \
             deps_violations=0 cancel_violations=0 priority_inversions=0 digest_mismatches=0"
        ));
        assert!(text.contains("failover: leader_faults=1 measured=1 unmeasured=0 p50="), "{text}");
        for p in Property::ALL {
            assert!(text.contains(&format!("  {:<19} valid", p.name())), "{p}: {text}");
        }
    }

    #[test]
    fn examples_are_capped_but_violations_counted() {
        let (mut h, expect) = healthy();
        for i in 0..8 {
            h.submit_ok(&format!("gone-{i}"), 1, &[], 1000 + i);
        }
        let report = check(&h.events, &expect);
        let lost = report.property(Property::Lost);
        assert_eq!(lost.violations, 8);
        match &lost.verdict {
            Verdict::Invalid(ex) => assert_eq!(ex.len(), MAX_EXAMPLES),
            v => panic!("{v:?}"),
        }
        assert_eq!(report.counts.lost, 8);
    }

    #[test]
    fn large_correct_run_is_valid() {
        let (h, expect) = simulated_run(10_000, 6, 7, Planner::Priority);
        assert!(h.events.len() > 100_000, "{}", h.events.len());
        let report = check(&h.events, &expect);
        assert!(report.is_valid(), "{report}");
        assert!(report.counts.priority_judged >= 10_000, "{report}");
        assert_eq!(report.counts.acknowledged, 10_000);
    }

    #[test]
    fn fifo_planner_is_caught_and_nothing_else_is_blamed() {
        let (h, expect) = simulated_run(2_000, 3, 11, Planner::Fifo);
        let report = check(&h.events, &expect);
        assert!(report.counts.priority_inversions > 0, "{report}");
        let failing: Vec<Property> = report
            .properties
            .iter()
            .filter(|p| !p.verdict.is_valid())
            .map(|p| p.property)
            .collect();
        assert_eq!(failing, vec![Property::Priority], "{report}");
    }

    #[test]
    fn report_serializes_to_json() {
        let (h, expect) = healthy();
        let v = serde_json::to_value(check(&h.events, &expect)).unwrap();
        assert_eq!(v["properties"][0]["property"], "history");
        assert_eq!(v["properties"][0]["verdict"], "valid");
    }
}
