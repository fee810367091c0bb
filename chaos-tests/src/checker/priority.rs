//! Priority is respected at assignment.
//!
//! Replays the audit log in `(index, seq)` order, keeping the set of Queued tasks with their
//! priority (from their submission) and the index at which their current queued stint began.
//! At every entry that assigns tasks, an assigned task A is an **inversion** if some task Q
//! that is still Queued after the entry has a strictly higher priority *and the planner could
//! see Q*. Chaos runs use homogeneous workers (no queues, labels or resources to tell tasks
//! apart), so any visible Q could have taken A's place.
//!
//! # What the planner could see
//!
//! The leader plans over its applied state at some index `p` and proposes the Assign entry
//! later, so tasks queued between `p` and the entry are invisible to it; counting them would
//! blame the scheduler for a race. Q counts only if its stint began at or before a proven
//! lower bound of `p`, the largest of:
//! * the start of the current queued stint of every task assigned by the entry that was
//!   queued *before* the entry (the planner saw each of them queued, and a task leaves Queued
//!   only by assignment or cancellation). A task released and assigned in the same entry was
//!   planned ahead of the completion that releases it, on an earlier state, so its stint
//!   proves nothing;
//! * the entry's `plan_index`, when the server exposes it (exact, or the earliest of the
//!   entry's planners);
//! * only when the entry has no `plan_index`: the index of the previous assigning entry of
//!   the same term, when terms are recorded (the planner loop plans again only after its
//!   previous Assign was applied). With a plan index this heuristic is not needed, and it
//!   would be wrong: an Assign planned ahead of a completion rides in the completion's
//!   entry while a planner round, planned earlier, is still in flight.
//!
//! # Audit gaps
//!
//! Across a gap the queued set is unknown: every tracked stint is dropped, and a task is
//! tracked again only from its next Queued change. An assigned task whose stint was not seen
//! is not judged. This subsumes skipping the entries next to a gap.
//!
//! Cost: O(n log n) with a max segment tree over stints in start order.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use state_machine::TaskStateKind;

use super::facts::Facts;
use super::{Counts, Expectations, Findings, Property, PropertyResult, Verdict};

/// A visible competitor: (priority, task, stint start).
type Competitor = Option<(i32, u64, u64)>;

fn better(a: Competitor, b: Competitor) -> Competitor {
    match (a, b) {
        (Some(x), Some(y)) => {
            Some(if (y.0, std::cmp::Reverse(y.2)) > (x.0, std::cmp::Reverse(x.2)) { y } else { x })
        }
        (x, None) => x,
        (None, y) => y,
    }
}

/// Max segment tree over stint positions (positions are in stint-start order).
struct MaxTree {
    size: usize,
    tree: Vec<Competitor>,
}

impl MaxTree {
    fn new(n: usize) -> Self {
        let size = n.max(1).next_power_of_two();
        MaxTree { size, tree: vec![None; 2 * size] }
    }

    fn set(&mut self, pos: usize, value: Competitor) {
        let mut i = pos + self.size;
        self.tree[i] = value;
        while i > 1 {
            i /= 2;
            self.tree[i] = better(self.tree[2 * i], self.tree[2 * i + 1]);
        }
    }

    /// Best entry among positions `0..end`.
    fn prefix_max(&self, end: usize) -> Competitor {
        let (mut l, mut r) = (self.size, end.min(self.size) + self.size);
        let mut best = None;
        while l < r {
            if l & 1 == 1 {
                best = better(best, self.tree[l]);
                l += 1;
            }
            if r & 1 == 1 {
                r -= 1;
                best = better(best, self.tree[r]);
            }
            l /= 2;
            r /= 2;
        }
        best
    }
}

/// No visible higher-priority task is passed over at assignment.
pub(crate) fn priority(
    f: &Facts<'_>,
    expect: &Expectations,
    counts: &mut Counts,
) -> PropertyResult {
    let queued_changes = f.applied.iter().filter(|c| c.state == TaskStateKind::Queued).count();
    let mut tree = MaxTree::new(queued_changes);
    let mut stint_starts: Vec<u64> = Vec::with_capacity(queued_changes);
    // task -> (position, stint start, priority)
    let mut stints: HashMap<u64, (usize, u64, i32)> = HashMap::new();
    let mut gaps = f.gaps.iter().peekable();
    let mut prev_assign: Option<(u64, Option<u64>)> = None;

    let mut findings = Findings::default();
    let (mut judged, mut unjudged, mut contended, mut exact, mut by_term) =
        (0usize, 0usize, 0usize, 0usize, 0usize);

    let mut rest = &f.applied[..];
    while let Some(first) = rest.first() {
        let index = first.index;
        let len = rest.iter().take_while(|c| c.index == index).count();
        let (entry, tail) = rest.split_at(len);
        rest = tail;

        while gaps.next_if(|&&(from, _)| from <= index).is_some() {
            for (_, (pos, _, _)) in stints.drain() {
                tree.set(pos, None);
            }
        }

        let mut assigned: Vec<(u64, u64, i32)> = Vec::new();
        let (mut plan_index, mut term, mut assigns) = (None, None, false);
        for c in entry {
            term = term.or(c.term);
            if c.state == TaskStateKind::Queued {
                // A Queued change of a task already queued does not restart its stint.
                if let Entry::Vacant(slot) = stints.entry(c.task) {
                    if let Some(p) = f.priority_of(c.task) {
                        let pos = stint_starts.len();
                        stint_starts.push(index);
                        tree.set(pos, Some((p, c.task, index)));
                        slot.insert((pos, index, p));
                    }
                }
                continue;
            }
            let stint = stints.remove(&c.task);
            if let Some((pos, _, _)) = stint {
                tree.set(pos, None);
            }
            if c.state == TaskStateKind::Assigned {
                assigns = true;
                plan_index = plan_index.max(c.plan_index);
                match stint {
                    Some((_, since, p)) => assigned.push((c.task, since, p)),
                    None => unjudged += 1,
                }
            }
        }
        if !assigns {
            continue;
        }
        let prev = prev_assign.replace((index, term));
        if assigned.is_empty() {
            continue;
        }

        let mut bound = assigned.iter().map(|a| a.1).filter(|&since| since < index).max();
        if let Some(p) = plan_index {
            exact += 1;
            bound = bound.max(Some(p));
        }
        if let (None, Some((prev_index, Some(prev_term))), Some(term)) = (plan_index, prev, term) {
            if prev_term == term {
                by_term += 1;
                bound = bound.max(Some(prev_index));
            }
        }

        // With no lower bound at all, the planner is not shown to have seen anything.
        let visible = bound.map_or(0, |b| stint_starts.partition_point(|&s| s <= b));
        let best = tree.prefix_max(visible);
        for &(task, since, p) in &assigned {
            judged += 1;
            let Some((qp, q, q_since)) = best else { continue };
            if qp != p {
                contended += 1;
            }
            if qp > p {
                findings.push(|| {
                    format!(
                        "index {index}: task {task} (priority {p}, queued since {since}) was assigned while task {q} \
                         (priority {qp}, queued since {q_since}) stayed queued"
                    )
                });
            }
        }
    }

    counts.priority_inversions = findings.count();
    counts.priority_judged = judged;
    let mut notes = vec![format!(
        "{judged} assignment(s) judged ({contended} with a visible task of another priority), {unjudged} not judged \
         (queued stint unseen or priority unknown); planner view bounded by plan_index in {exact} and by the \
         previous assignment of the same term in {by_term} entr(ies)"
    )];
    notes.extend(f.gap_note());
    let otherwise = if expect.priorities && contended == 0 {
        Verdict::Unknown(
            "priorities were expected, but no assignment was made while a task of another priority was visibly queued"
                .into(),
        )
    } else {
        Verdict::Valid
    };
    findings.into_result(Property::Priority, otherwise, notes)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Expectations, Property};
    use super::*;
    use crate::history::EventKind;

    #[test]
    fn segment_tree_prefix_max() {
        let mut t = MaxTree::new(5);
        t.set(0, Some((1, 10, 0)));
        t.set(1, Some((7, 11, 1)));
        t.set(2, Some((3, 12, 2)));
        t.set(4, Some((9, 14, 4)));
        assert_eq!(t.prefix_max(0), None);
        assert_eq!(t.prefix_max(1), Some((1, 10, 0)));
        assert_eq!(t.prefix_max(4), Some((7, 11, 1)));
        assert_eq!(t.prefix_max(5), Some((9, 14, 4)));
        t.set(1, None);
        assert_eq!(t.prefix_max(4), Some((3, 12, 2)));
        // Ties go to the earlier stint.
        t.set(3, Some((3, 13, 3)));
        assert_eq!(t.prefix_max(4), Some((3, 12, 2)));
    }

    #[test]
    fn priority_valid_on_healthy_run() {
        let (h, e) = healthy();
        let r = assert_valid(&h, &e, Property::Priority);
        // Index 13 (two tasks, "d" visible) and 17 (two tasks) and 21 (one task).
        assert_eq!(r.counts.priority_judged, 5);
    }

    #[test]
    fn lower_priority_assigned_while_a_visible_higher_one_waits() {
        let (mut h, e) = healthy();
        // Index 13 assigns "b" (p5, since 11) and "d" (p0, since 9); "a" (p1, since 10) is
        // visible (10 <= 11) and stays queued.
        h.edit(|k| match k {
            EventKind::Applied { index: 13, task, .. } if *task == 1 => {
                *task = 4;
                true
            }
            _ => false,
        });
        let r = assert_invalid(
            &h,
            &e,
            Property::Priority,
            1,
            "index 13: task 4 (priority 0, queued since 9) was assigned while task 1 (priority 1, queued since 10) stayed queued",
        );
        assert_eq!(r.counts.priority_inversions, 1);
    }

    /// Two planning rounds; task 3 (p9) is queued between them and passed over by round 2.
    fn two_rounds(term: Option<u64>, plan_index: Option<u64>) -> H {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.submit_ok("b", 1, &[], 2);
        h.submit_ok("c", 9, &[], 3);
        h.submit_ok("x", 1, &[], 4);
        let push = |h: &mut H,
                    index: u64,
                    task: u64,
                    state: &str,
                    fence: Option<u64>,
                    plan: Option<u64>| {
            h.push(EventKind::Applied {
                index,
                seq: 0,
                task,
                state: state.into(),
                attempt: u32::from(fence.is_some()),
                fence,
                worker: fence.map(|_| "w1".to_string()),
                term,
                plan_index: plan,
            });
        };
        push(&mut h, 1, 1, "queued", None, None);
        push(&mut h, 2, 2, "queued", None, None);
        push(&mut h, 3, 4, "assigned", Some(1), None); // unrelated round (stint unseen)
        push(&mut h, 4, 3, "queued", None, None);
        push(&mut h, 5, 1, "assigned", Some(2), plan_index);
        h
    }

    #[test]
    fn task_queued_after_the_planner_looked_is_not_blamed() {
        let h = two_rounds(None, None);
        assert_valid(&h, &Expectations::default(), Property::Priority);
    }

    #[test]
    fn previous_round_of_the_same_term_bounds_the_planner_view() {
        // Index 3 assigned in the same term, so the planner of index 5 saw at least index 3:
        // that view does not include task 3, queued at index 4.
        assert_valid(&two_rounds(Some(2), None), &Expectations::default(), Property::Priority);
        // The plan index says the planner saw index 4: task 3 was visible.
        assert_invalid(
            &two_rounds(None, Some(4)),
            &Expectations::default(),
            Property::Priority,
            1,
            "task 3 (priority 9, queued since 4)",
        );
    }

    #[test]
    fn an_exact_plan_index_overrides_the_previous_round_of_the_same_term() {
        // Index 4 is a completion entry: it queues task 3 (p9) and, planned ahead, assigns
        // task 2. The planner round applied at index 5 looked at index 3 (its plan index),
        // so task 3 was not visible to it, although an assignment of the same term precedes.
        let mut h = two_rounds(Some(2), Some(3));
        h.push(EventKind::Applied {
            index: 4,
            seq: 1,
            task: 2,
            state: "assigned".into(),
            attempt: 1,
            fence: Some(3),
            worker: Some("w2".into()),
            term: Some(2),
            plan_index: None,
        });
        assert_valid(&h, &Expectations::default(), Property::Priority);
    }

    /// Index 6 is a completion entry that releases task 3 (p1) and assigns it, planned ahead
    /// at `plan`; task 4 (p9) was queued at index 5 and stays queued.
    fn planned_ahead(plan: u64) -> H {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.submit_ok("c", 1, &["a"], 3);
        h.submit_ok("x", 9, &[], 4);
        let mut push = |index: u64, seq: u32, task: u64, state: &str, fence: Option<u64>| {
            h.push(EventKind::Applied {
                index,
                seq,
                task,
                state: state.into(),
                attempt: u32::from(fence.is_some()),
                fence,
                worker: fence.map(|_| "w1".to_string()),
                term: Some(3),
                plan_index: (index == 6).then_some(plan),
            });
        };
        push(1, 0, 1, "queued", None);
        push(2, 0, 1, "assigned", Some(1));
        push(3, 0, 3, "waiting", None);
        push(5, 0, 4, "queued", None);
        push(6, 0, 1, "succeeded", Some(1));
        push(6, 1, 3, "queued", None);
        push(6, 2, 3, "assigned", Some(2));
        h
    }

    #[test]
    fn a_task_assigned_in_its_release_entry_is_judged_by_the_plan_index() {
        // Planned at index 4: task 4, queued at 5, was not visible.
        assert_valid(&planned_ahead(4), &Expectations::default(), Property::Priority);
        // Planned at index 5: task 4 was visible and outranks task 3.
        assert_invalid(
            &planned_ahead(5),
            &Expectations::default(),
            Property::Priority,
            1,
            "index 6: task 3 (priority 1, queued since 6) was assigned while task 4 (priority 9, queued since 5) stayed queued",
        );
    }

    #[test]
    fn same_term_rounds_expose_a_fifo_planner() {
        // Round 1 (index 3) and round 2 (index 6) in one term; task 3 (p9) queued at index 4
        // is visible to round 2, which takes the older p1 task instead.
        let mut h = two_rounds(Some(7), None);
        h.edit(|k| match k {
            EventKind::Applied { index, .. } if *index == 5 => {
                *index = 6;
                true
            }
            _ => false,
        });
        h.push(EventKind::Applied {
            index: 5,
            seq: 0,
            task: 2,
            state: "assigned".into(),
            attempt: 1,
            fence: Some(3),
            worker: Some("w2".into()),
            term: Some(7),
            plan_index: None,
        });
        assert_invalid(
            &h,
            &Expectations::default(),
            Property::Priority,
            1,
            "index 6: task 1 (priority 1, queued since 1)",
        );
        // The same rounds in different terms prove nothing.
        h.edit(|k| match k {
            EventKind::Applied { index: 6, term, .. } => {
                *term = Some(8);
                true
            }
            _ => false,
        });
        assert_valid(&h, &Expectations::default(), Property::Priority);
    }

    #[test]
    fn gap_drops_what_was_known_about_the_queue() {
        let (mut h, e) = healthy();
        // The inversion of `lower_priority_assigned_while_a_visible_higher_one_waits`, but
        // the observer missed index 12: "a" may have left the queue unseen.
        h.edit(|k| match k {
            EventKind::Applied { index: 13, task, .. } if *task == 1 => {
                *task = 4;
                true
            }
            _ => false,
        });
        h.remove(|k| matches!(k, EventKind::Applied { index: 12, .. }));
        h.gap(12, 12);
        // Nothing visible is left to compare with, so do not expect contention either.
        let e = Expectations { priorities: false, ..e };
        let r = assert_valid(&h, &e, Property::Priority);
        assert!(r.property(Property::Priority).notes[1].contains("1 gap(s)"));
    }

    #[test]
    fn priorities_expected_but_never_contended_are_unknown() {
        let mut h = H::new();
        h.submit_ok("a", 1, &[], 1);
        h.applied(1, 1, "queued", 0, None, None);
        h.applied(2, 1, "assigned", 1, Some(1), Some("w1"));
        assert_unknown(
            &h,
            &Expectations { priorities: true, ..Default::default() },
            Property::Priority,
            "no assignment",
        );
        assert_valid(&h, &Expectations::default(), Property::Priority);
    }
}
