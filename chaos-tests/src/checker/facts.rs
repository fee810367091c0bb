//! A pre-digested view of a history, built in one pass and shared by every property.
//!
//! Building it pairs each invoke with its completion (by op id), resolves idempotency keys to
//! task ids, puts the audit log in `(index, seq)` order without re-observed duplicates, and
//! collects everything that makes the history malformed. Properties only read it.
//!
//! Invariants after [`Facts::build`]:
//! * `timeline` is in `t_ms` order; within one millisecond, starts (invokes, exec and fault
//!   starts) come first, otherwise input order is kept;
//! * `applied` is sorted by `(index, seq)` with one change per `(index, seq)`;
//! * `gaps` are sorted, disjoint and non-adjacent (merged);
//! * only events that passed validation are in the typed collections; the rest are
//!   described in `malformed`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use state_machine::TaskStateKind;

use crate::history::{fault, Event, EventKind, OpId};

/// What the server answered to an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Acknowledged at `t`; `duplicate` only for completions.
    Ok { t: u64, duplicate: bool },
    /// Refused at `t`; `stale` only for completions.
    Fail { t: u64, stale: bool },
    /// Unknown outcome, or no answer recorded at all.
    Unknown,
}

/// One submit operation.
#[derive(Clone, Debug)]
pub(crate) struct SubmitOp<'a> {
    pub t_invoke: u64,
    pub key: &'a str,
    pub answer: Answer,
}

/// One cancel operation.
#[derive(Clone, Debug)]
pub(crate) struct CancelOp {
    pub op: OpId,
    pub t_invoke: u64,
    pub task: u64,
    pub answer: Answer,
}

/// One completion report.
#[derive(Clone, Debug)]
pub(crate) struct CompleteOp<'a> {
    pub op: OpId,
    pub t_invoke: u64,
    pub worker: &'a str,
    pub task: u64,
    pub fence: u64,
    pub success: bool,
    pub answer: Answer,
}

impl CompleteOp<'_> {
    /// Accepted as a new report (not a duplicate of an earlier acceptance).
    pub fn accepted_fresh(&self) -> bool {
        matches!(self.answer, Answer::Ok { duplicate: false, .. })
    }
}

/// A worker's execution of one attempt.
#[derive(Clone, Debug)]
pub(crate) struct Exec<'a> {
    pub t_start: u64,
    /// When the worker recorded the end, if it did.
    pub t_end: Option<u64>,
    pub worker: &'a str,
    pub task: u64,
    pub attempt: u32,
    pub fence: u64,
}

/// One audit-log change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Change<'a> {
    /// When the observer saw it.
    pub t: u64,
    pub index: u64,
    pub seq: u32,
    pub task: u64,
    pub state: TaskStateKind,
    pub attempt: u32,
    pub fence: Option<u64>,
    pub worker: Option<&'a str>,
    pub term: Option<u64>,
    pub plan_index: Option<u64>,
}

impl Change<'_> {
    /// Same change, ignoring when it was seen.
    fn same_content(&self, other: &Change<'_>) -> bool {
        (self.task, self.state, self.attempt, self.fence, self.worker)
            == (other.task, other.state, other.attempt, other.fence, other.worker)
    }

    /// The change without its position, for messages.
    fn describe(&self) -> String {
        format!(
            "task {} {} (attempt {}, fence {:?}, worker {:?})",
            self.task, self.state, self.attempt, self.fence, self.worker
        )
    }

    /// The task is now held by a worker.
    pub fn is_held(&self) -> bool {
        matches!(self.state, TaskStateKind::Assigned | TaskStateKind::Running)
    }
}

/// A fault episode.
#[derive(Clone, Debug)]
pub(crate) struct Fault<'a> {
    pub t_start: u64,
    pub kind: &'a str,
}

/// One task in one node's final listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FinalRecord<'a> {
    pub key: Option<&'a str>,
    pub state: TaskStateKind,
    pub fence: Option<u64>,
}

/// One `Digest` event.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DigestObs {
    pub node: u64,
    pub applied_index: u64,
    pub digest: u64,
}

/// What the history says about one idempotency key.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyFacts<'a> {
    /// Priority given by its submissions; `None` if they disagree.
    pub priority: Option<i32>,
    /// Dependency keys given by its submissions; `None` if they disagree.
    pub deps: Option<Vec<&'a str>>,
    /// Number of submit invocations with this key.
    pub invokes: usize,
    /// Ids answered by `SubmitOk`s for this key.
    pub acked_ids: BTreeSet<u64>,
    /// Ids of final tasks carrying this key (any node).
    pub final_ids: BTreeSet<u64>,
    /// Some submission of this key ended unknown.
    pub any_unknown: bool,
    /// Number of submissions of this key that were refused (`SubmitFail`).
    pub refused: usize,
}

impl KeyFacts<'_> {
    /// The one task id this key names, if the history agrees on exactly one.
    pub fn id(&self) -> Option<u64> {
        let mut ids = self.acked_ids.iter().chain(&self.final_ids);
        let first = *ids.next()?;
        ids.all(|&i| i == first).then_some(first)
    }

    /// The key was submitted and every one of its submissions was refused.
    pub fn all_refused(&self) -> bool {
        // `invokes` counts exactly the `submits` carrying this key.
        self.invokes > 0 && self.refused == self.invokes
    }
}

/// The digested history.
#[derive(Debug, Default)]
pub(crate) struct Facts<'a> {
    /// Every event, in time order.
    pub timeline: Vec<&'a Event>,
    /// Descriptions of malformed events (harness bugs).
    pub malformed: Vec<String>,
    /// `HarnessError` descriptions.
    pub harness_errors: Vec<&'a str>,

    pub submits: Vec<SubmitOp<'a>>,
    pub keys: BTreeMap<&'a str, KeyFacts<'a>>,
    /// Acknowledged task ids, with the key of their first acknowledgement.
    pub acked: BTreeMap<u64, &'a str>,
    /// Every key a task id was associated with (from `SubmitOk` and `FinalTask`).
    pub id_keys: BTreeMap<u64, BTreeSet<&'a str>>,
    pub cancels: Vec<CancelOp>,
    pub completes: Vec<CompleteOp<'a>>,
    pub execs: Vec<Exec<'a>>,

    /// The audit log, in `(index, seq)` order.
    pub applied: Vec<Change<'a>>,
    /// `(index, seq)` seen twice with different contents.
    pub audit_conflicts: Vec<String>,
    /// Missed audit ranges, inclusive, merged.
    pub gaps: Vec<(u64, u64)>,

    pub faults: Vec<Fault<'a>>,
    /// `(t, node, term)` in time order.
    pub leaders: Vec<(u64, u64, u64)>,

    /// Final listings per reporting node (a node with only a `Digest` has an empty one).
    pub finals: BTreeMap<u64, BTreeMap<u64, FinalRecord<'a>>>,
    /// Digests in time order.
    pub digests: Vec<DigestObs>,
}

fn starts_something(kind: &EventKind) -> bool {
    kind.is_invoke() || matches!(kind, EventKind::ExecStart { .. } | EventKind::FaultStart { .. })
}

fn parse_state(s: &str) -> Option<TaskStateKind> {
    let k = TaskStateKind::parse(s)?;
    // `parse` is lenient about separators; the history format is not, so that the files
    // stay greppable by state name.
    (k.as_str() == s).then_some(k)
}

impl<'a> Facts<'a> {
    /// Digests `history`.
    pub fn build(history: &'a [Event]) -> Self {
        let mut timeline: Vec<&Event> = history.iter().collect();
        // Within one millisecond, starts go first: an answer can never precede its invoke,
        // whatever order the files were merged in.
        timeline.sort_by_key(|e| (e.t_ms, !starts_something(&e.kind)));
        let mut f = Facts { timeline, ..Facts::default() };

        // Invokes by op id, pointing into the typed collections.
        enum Slot {
            Submit(usize),
            Cancel(usize),
            Complete(usize),
        }
        let mut invokes: HashMap<OpId, Slot> = HashMap::new();
        let mut answered: BTreeSet<OpId> = BTreeSet::new();
        // Exec starts by (worker, task, fence), to pair ExecEnd.
        let mut open_execs: HashMap<(&str, u64, u64), usize> = HashMap::new();
        let mut fault_ids: HashMap<u64, bool> = HashMap::new();
        let mut applied = Vec::new();

        for &ev in &f.timeline {
            let t = ev.t_ms;
            if ev.kind.is_invoke() {
                let op = ev.kind.op().expect("invokes carry an op");
                if invokes.contains_key(&op) {
                    f.malformed.push(format!("t={t}: op {op} invoked twice"));
                    continue;
                }
            } else if let Some(op) = ev.kind.op() {
                if !answered.insert(op) {
                    f.malformed.push(format!("t={t}: op {op} answered twice"));
                    continue;
                }
            }
            match &ev.kind {
                EventKind::SubmitInvoke { op, key, priority, deps } => {
                    invokes.insert(*op, Slot::Submit(f.submits.len()));
                    f.submits.push(SubmitOp { t_invoke: t, key, answer: Answer::Unknown });
                    let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
                    match f.keys.get_mut(key.as_str()).filter(|k| k.invokes > 0) {
                        None => {
                            let k = f.keys.entry(key).or_default();
                            k.priority = Some(*priority);
                            k.deps = Some(deps);
                            k.invokes = 1;
                        }
                        Some(k) => {
                            k.invokes += 1;
                            // A retry must repeat the arguments; if it does not, which one
                            // the server kept is unknowable, so neither is trusted.
                            if k.priority != Some(*priority) {
                                k.priority = None;
                            }
                            if k.deps.as_ref() != Some(&deps) {
                                k.deps = None;
                            }
                        }
                    }
                }
                EventKind::SubmitOk { op, key, .. }
                | EventKind::SubmitFail { op, key, .. }
                | EventKind::SubmitUnknown { op, key, .. } => {
                    let Some(Slot::Submit(i)) = invokes.get(op) else {
                        f.malformed.push(format!(
                            "t={t}: {} for op {op} without its submit invoke",
                            ev.kind.name()
                        ));
                        continue;
                    };
                    let s = &mut f.submits[*i];
                    if s.key != key {
                        f.malformed.push(format!(
                            "t={t}: {} for op {op} names key {key:?}, the invoke {:?}",
                            ev.kind.name(),
                            s.key
                        ));
                        continue;
                    }
                    if t < s.t_invoke {
                        f.malformed.push(format!("t={t}: op {op} answered before it was invoked"));
                        continue;
                    }
                    s.answer = match ev.kind {
                        EventKind::SubmitOk { .. } => Answer::Ok { t, duplicate: false },
                        EventKind::SubmitFail { .. } => Answer::Fail { t, stale: false },
                        _ => Answer::Unknown,
                    };
                    if let EventKind::SubmitOk { id, .. } = ev.kind {
                        f.keys.entry(key).or_default().acked_ids.insert(id);
                        f.acked.entry(id).or_insert(key);
                        f.id_keys.entry(id).or_default().insert(key);
                    }
                }
                EventKind::CancelInvoke { op, id } => {
                    invokes.insert(*op, Slot::Cancel(f.cancels.len()));
                    f.cancels.push(CancelOp {
                        op: *op,
                        t_invoke: t,
                        task: *id,
                        answer: Answer::Unknown,
                    });
                }
                EventKind::CancelOk { op, id }
                | EventKind::CancelFail { op, id, .. }
                | EventKind::CancelUnknown { op, id, .. } => {
                    let Some(Slot::Cancel(i)) = invokes.get(op) else {
                        f.malformed.push(format!(
                            "t={t}: {} for op {op} without its cancel invoke",
                            ev.kind.name()
                        ));
                        continue;
                    };
                    let c = &mut f.cancels[*i];
                    if c.task != *id || t < c.t_invoke {
                        f.malformed.push(format!(
                            "t={t}: {} for op {op} does not match its invoke",
                            ev.kind.name()
                        ));
                        continue;
                    }
                    c.answer = match ev.kind {
                        EventKind::CancelOk { .. } => Answer::Ok { t, duplicate: false },
                        EventKind::CancelFail { .. } => Answer::Fail { t, stale: false },
                        _ => Answer::Unknown,
                    };
                }
                EventKind::ExecStart { worker, task, attempt, fence } => {
                    open_execs.insert((worker, *task, *fence), f.execs.len());
                    f.execs.push(Exec {
                        t_start: t,
                        t_end: None,
                        worker,
                        task: *task,
                        attempt: *attempt,
                        fence: *fence,
                    });
                }
                EventKind::ExecEnd { worker, task, fence, .. } => {
                    match open_execs.remove(&(worker.as_str(), *task, *fence)) {
                        Some(i) => f.execs[i].t_end = Some(t),
                        None => f.malformed.push(format!(
                            "t={t}: exec_end of task {task} fence {fence} on {worker} without its exec_start"
                        )),
                    }
                }
                EventKind::CompleteInvoke { op, worker, task, fence, success } => {
                    invokes.insert(*op, Slot::Complete(f.completes.len()));
                    f.completes.push(CompleteOp {
                        op: *op,
                        t_invoke: t,
                        worker,
                        task: *task,
                        fence: *fence,
                        success: *success,
                        answer: Answer::Unknown,
                    });
                }
                EventKind::CompleteOk { op, task, fence, .. }
                | EventKind::CompleteRejected { op, task, fence, .. }
                | EventKind::CompleteUnknown { op, task, fence, .. } => {
                    let Some(Slot::Complete(i)) = invokes.get(op) else {
                        f.malformed.push(format!(
                            "t={t}: {} for op {op} without its complete invoke",
                            ev.kind.name()
                        ));
                        continue;
                    };
                    let c = &mut f.completes[*i];
                    if (c.task, c.fence) != (*task, *fence) || t < c.t_invoke {
                        f.malformed.push(format!(
                            "t={t}: {} for op {op} does not match its invoke",
                            ev.kind.name()
                        ));
                        continue;
                    }
                    c.answer = match ev.kind {
                        EventKind::CompleteOk { duplicate, .. } => Answer::Ok { t, duplicate },
                        EventKind::CompleteRejected { stale, .. } => Answer::Fail { t, stale },
                        _ => Answer::Unknown,
                    };
                }
                EventKind::Applied {
                    index,
                    seq,
                    task,
                    state,
                    attempt,
                    fence,
                    worker,
                    term,
                    plan_index,
                } => {
                    let Some(state) = parse_state(state) else {
                        f.malformed
                            .push(format!("t={t}: applied index {index}: unknown state {state:?}"));
                        continue;
                    };
                    applied.push(Change {
                        t,
                        index: *index,
                        seq: *seq,
                        task: *task,
                        state,
                        attempt: *attempt,
                        fence: *fence,
                        worker: worker.as_deref(),
                        term: *term,
                        plan_index: *plan_index,
                    });
                }
                EventKind::AuditGap { from_index, to_index } => {
                    if from_index > to_index {
                        f.malformed
                            .push(format!("t={t}: audit gap {from_index}..={to_index} is empty"));
                        continue;
                    }
                    f.gaps.push((*from_index, *to_index));
                }
                EventKind::FaultStart { id, fault: kind, .. } => {
                    if !fault::is_known(kind) {
                        f.malformed.push(format!(
                            "t={t}: unknown fault kind {kind:?} (add it to history::fault::ALL)"
                        ));
                        continue;
                    }
                    if fault_ids.insert(*id, false).is_some() {
                        f.malformed.push(format!("t={t}: fault {id} started twice"));
                        continue;
                    }
                    f.faults.push(Fault { t_start: t, kind });
                }
                EventKind::FaultEnd { id } => match fault_ids.get_mut(id) {
                    Some(ended @ false) => *ended = true,
                    Some(true) => f.malformed.push(format!("t={t}: fault {id} ended twice")),
                    None => f.malformed.push(format!("t={t}: fault {id} ended without starting")),
                },
                EventKind::LeaderObserved { node, term } => f.leaders.push((t, *node, *term)),
                EventKind::HarnessError { what } => f.harness_errors.push(what),
                EventKind::FinalTask { node, id, key, state, fence } => {
                    let Some(state) = parse_state(state) else {
                        f.malformed.push(format!(
                            "t={t}: final task {id} on node {node}: unknown state {state:?}"
                        ));
                        continue;
                    };
                    let rec = FinalRecord { key: key.as_deref(), state, fence: *fence };
                    let listing = f.finals.entry(*node).or_default();
                    if let Some(prev) = listing.get(id) {
                        if *prev != rec {
                            f.malformed.push(format!(
                                "t={t}: node {node} listed task {id} twice, differently"
                            ));
                        }
                        continue;
                    }
                    if let Some(k) = key {
                        f.keys.entry(k).or_default().final_ids.insert(*id);
                        f.id_keys.entry(*id).or_default().insert(k);
                    }
                    listing.insert(*id, rec);
                }
                EventKind::Digest { node, applied_index, digest } => {
                    f.finals.entry(*node).or_default();
                    f.digests.push(DigestObs {
                        node: *node,
                        applied_index: *applied_index,
                        digest: *digest,
                    });
                }
            }
        }

        let mut unhealed: Vec<u64> =
            fault_ids.iter().filter(|(_, ended)| !**ended).map(|(id, _)| *id).collect();
        unhealed.sort_unstable();
        for id in unhealed {
            f.malformed.push(format!("fault {id} was never healed (no fault_end)"));
        }

        // A key is "unknown" if any of its submissions might have happened unseen; count
        // the refused ones too, so that "all refused" is O(1) per key.
        for s in &f.submits {
            match s.answer {
                Answer::Unknown => f.keys.entry(s.key).or_default().any_unknown = true,
                Answer::Fail { .. } => f.keys.entry(s.key).or_default().refused += 1,
                Answer::Ok { .. } => {}
            }
        }

        f.set_applied(applied);
        f.set_gaps();
        f
    }

    fn set_applied(&mut self, mut applied: Vec<Change<'a>>) {
        applied.sort_by_key(|c| (c.index, c.seq, c.t));
        let mut out: Vec<Change<'a>> = Vec::with_capacity(applied.len());
        for c in applied {
            match out.last() {
                Some(prev) if (prev.index, prev.seq) == (c.index, c.seq) => {
                    if !prev.same_content(&c) {
                        self.audit_conflicts.push(format!(
                            "index {} change {}: seen as {} and as {}",
                            c.index,
                            c.seq,
                            prev.describe(),
                            c.describe()
                        ));
                    }
                }
                _ => out.push(c),
            }
        }
        self.applied = out;
    }

    fn set_gaps(&mut self) {
        self.gaps.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.gaps.len());
        for &(a, b) in &self.gaps {
            match merged.last_mut() {
                Some((_, end)) if a <= end.saturating_add(1) => *end = (*end).max(b),
                _ => merged.push((a, b)),
            }
        }
        self.gaps = merged;
    }

    /// True if some missed audit range starts before `index` (so a change the checker is
    /// looking for at an index below `index` may simply not have been seen).
    pub fn gap_before(&self, index: u64) -> bool {
        self.gaps.first().is_some_and(|&(from, _)| from < index)
    }

    /// Total number of missed audit indexes.
    pub fn gap_len(&self) -> u64 {
        self.gaps.iter().map(|&(a, b)| b - a + 1).sum()
    }

    /// The note properties add when they judged the audit log around gaps.
    pub fn gap_note(&self) -> Option<String> {
        (!self.gaps.is_empty()).then(|| {
            format!(
                "audit log has {} gap(s) ({} indexes missed): judged only on the changes that were seen",
                self.gaps.len(),
                self.gap_len()
            )
        })
    }

    /// The one key of task `id`, if the history agrees on exactly one.
    pub fn key_of(&self, id: u64) -> Option<&'a str> {
        let keys = self.id_keys.get(&id)?;
        (keys.len() == 1).then(|| *keys.iter().next().expect("one key"))
    }

    /// The priority of task `id`, if known without ambiguity.
    pub fn priority_of(&self, id: u64) -> Option<i32> {
        self.keys.get(self.key_of(id)?)?.priority
    }

    /// The dependencies of task `id` that resolve to one task id each. `None` if the task's
    /// key or dependency list is unknown or ambiguous.
    pub fn deps_of(&self, id: u64) -> Option<Vec<(u64, &'a str)>> {
        let deps = self.keys.get(self.key_of(id)?)?.deps.as_ref()?;
        Some(deps.iter().filter_map(|k| Some((self.keys.get(k)?.id()?, *k))).collect())
    }

    /// Every node's final record of task `id` (nodes that do not hold it are skipped).
    pub fn final_records(&self, id: u64) -> impl Iterator<Item = (u64, &FinalRecord<'a>)> + '_ {
        self.finals.iter().filter_map(move |(node, listing)| listing.get(&id).map(|r| (*node, r)))
    }

    /// Whether some node's final listing holds task `id`.
    pub fn in_final_state(&self, id: u64) -> bool {
        self.final_records(id).next().is_some()
    }

    /// Final listings exist (at least one node reported).
    pub fn has_final_reads(&self) -> bool {
        !self.finals.is_empty()
    }

    /// Events that make the history malformed, plus harness errors.
    pub fn harness_problems(&self) -> usize {
        self.malformed.len() + self.harness_errors.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::*;

    #[test]
    fn pairs_ops_and_resolves_keys() {
        let mut h = H::new();
        h.submit_ok("a", 3, &[], 7);
        h.submit_ok("b", 1, &["a"], 8);
        let op = h.complete_invoke("w1", 7, 1, true);
        h.complete_ok(op, 7, 1, false);
        let f = Facts::build(&h.events);
        assert!(f.malformed.is_empty(), "{:?}", f.malformed);
        assert_eq!(f.key_of(7), Some("a"));
        assert_eq!(f.priority_of(7), Some(3));
        assert_eq!(f.deps_of(8), Some(vec![(7, "a")]));
        assert!(f.completes[0].accepted_fresh());
    }

    #[test]
    fn all_refused_needs_every_submission_of_the_key_refused() {
        let mut h = H::new();
        let op = h.submit_invoke("x", 1, &[]);
        h.submit_fail_for(op, "x");
        let op = h.submit_invoke("y", 1, &[]);
        h.submit_fail_for(op, "y");
        let op = h.submit_invoke("y", 1, &[]);
        h.submit_unknown_for(op, "y");
        h.submit_invoke("z", 1, &[]); // never answered: unknown
        h.final_task(1, 9, Some("w"), "succeeded", Some(1)); // listed, never submitted
        let f = Facts::build(&h.events);
        assert!(f.keys["x"].all_refused());
        assert_eq!((f.keys["y"].refused, f.keys["y"].invokes), (1, 2));
        assert!(!f.keys["y"].all_refused());
        assert!(!f.keys["z"].all_refused());
        assert!(!f.keys["w"].all_refused());
    }

    #[test]
    fn retries_with_different_arguments_are_not_trusted() {
        let mut h = H::new();
        h.submit_ok("a", 3, &[], 7);
        h.submit_ok("a", 4, &[], 7);
        let f = Facts::build(&h.events);
        assert_eq!(f.priority_of(7), None);
        assert_eq!(f.deps_of(7), Some(vec![]));
    }

    #[test]
    fn malformed_events_are_collected() {
        let mut h = H::new();
        h.push(EventKind::SubmitOk { op: 99, key: "x".into(), id: 1 });
        h.push(EventKind::Applied {
            index: 1,
            seq: 0,
            task: 1,
            state: "Queued".into(),
            attempt: 0,
            fence: None,
            worker: None,
            term: None,
            plan_index: None,
        });
        h.push(EventKind::FaultStart { id: 1, fault: "kill_leader".into(), target: "n1".into() });
        h.push(EventKind::FaultStart { id: 2, fault: "kill-leader".into(), target: "n1".into() });
        h.push(EventKind::FaultEnd { id: 3 });
        let f = Facts::build(&h.events);
        let text = f.malformed.join("\n");
        assert_eq!(f.malformed.len(), 5, "{text}");
        assert!(text.contains("without its submit invoke"), "{text}");
        assert!(text.contains("unknown state"), "{text}");
        assert!(text.contains("unknown fault kind"), "{text}");
        assert!(text.contains("fault 2 was never healed"), "{text}");
        assert!(text.contains("fault 3 ended without starting"), "{text}");
    }

    #[test]
    fn audit_duplicates_are_merged_and_conflicts_kept() {
        let mut h = H::new();
        h.applied_at(5, 1, "queued", 0, None, None);
        h.applied_at(5, 1, "queued", 0, None, None); // re-observed: same content
        h.applied_seq(6, 0, 1, "assigned", 1, Some(1), Some("w1"));
        h.applied_seq(6, 0, 1, "assigned", 1, Some(1), Some("w2")); // disagreement
        h.gap(10, 12);
        h.gap(13, 14);
        h.gap(20, 20);
        let f = Facts::build(&h.events);
        assert_eq!(f.applied.len(), 2);
        assert_eq!(f.audit_conflicts.len(), 1);
        assert_eq!(f.gaps, vec![(10, 14), (20, 20)]);
        assert!(f.gap_before(11) && !f.gap_before(10));
        assert_eq!(f.gap_len(), 6);
    }
}
