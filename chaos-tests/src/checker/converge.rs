//! Replica convergence and election safety.
//!
//! * **Convergence.** All `Digest`s taken at the same applied index are equal; the last
//!   digest of every node is at the same applied index; every reporting node lists the same
//!   tasks with the same key, state and fence; and no audit-log change was observed with two
//!   different contents. Fewer than two nodes with a digest is unknown (nothing to compare).
//! * **Election safety.** At most one node is observed as leader of any term. Leader changes
//!   (observations whose term exceeds every term seen before, after the first) are counted
//!   here for the coverage property.

use std::collections::{BTreeMap, BTreeSet};

use super::facts::{Facts, FinalRecord};
use super::{Counts, Findings, Property, PropertyResult, Verdict};

/// Replicas agree at the end.
pub(crate) fn convergence(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    let mut digests = Findings::default();
    let mut by_index: BTreeMap<u64, BTreeMap<u64, BTreeSet<u64>>> = BTreeMap::new();
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for d in &f.digests {
        by_index.entry(d.applied_index).or_default().entry(d.digest).or_default().insert(d.node);
        last.insert(d.node, d.applied_index);
    }
    for (index, groups) in by_index.iter().filter(|(_, g)| g.len() > 1) {
        digests.push(|| {
            let groups: Vec<String> =
                groups.iter().map(|(d, nodes)| format!("{d:#x} on {nodes:?}")).collect();
            format!("at applied index {index} the digests differ: {}", groups.join(", "))
        });
    }
    let final_indexes: BTreeSet<u64> = last.values().copied().collect();
    if final_indexes.len() > 1 {
        digests.push(|| format!("nodes end at different applied indexes: {last:?} (node: index)"));
    }
    counts.digest_mismatches = digests.count();

    let mut replicas = Findings::default();
    for conflict in &f.audit_conflicts {
        replicas.push(|| format!("audit log {conflict}"));
    }
    let mut per_task: BTreeMap<u64, Vec<(u64, &FinalRecord<'_>)>> = BTreeMap::new();
    for (node, listing) in &f.finals {
        for (id, rec) in listing {
            per_task.entry(*id).or_default().push((*node, rec));
        }
    }
    for (id, recs) in &per_task {
        let differs = recs.len() != f.finals.len() || recs.iter().any(|(_, r)| *r != recs[0].1);
        if differs {
            replicas.push(|| {
                let seen: Vec<String> = recs
                    .iter()
                    .map(|(n, r)| {
                        format!("node {n}: {} fence {:?} key {:?}", r.state, r.fence, r.key)
                    })
                    .collect();
                let holders: BTreeSet<u64> = recs.iter().map(|(n, _)| *n).collect();
                let missing: Vec<u64> =
                    f.finals.keys().filter(|n| !holders.contains(n)).copied().collect();
                format!(
                    "task {id} differs between nodes: {}; missing on {missing:?}",
                    seen.join("; ")
                )
            });
        }
    }
    counts.replica_mismatches = replicas.count();

    let mut findings = digests;
    findings.absorb(replicas);
    let otherwise = if last.len() < 2 {
        Verdict::Unknown(format!(
            "{} node(s) reported a digest; at least two are needed",
            last.len()
        ))
    } else {
        Verdict::Valid
    };
    let notes = vec![format!(
        "{} digest(s) from {} node(s); {} final listing(s)",
        f.digests.len(),
        last.len(),
        f.finals.len()
    )];
    findings.into_result(Property::Convergence, otherwise, notes)
}

/// At most one leader per term; counts leader changes.
pub(crate) fn election_safety(f: &Facts<'_>, counts: &mut Counts) -> PropertyResult {
    let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut max_term: Option<u64> = None;
    counts.leader_changes = 0;
    for &(_, node, term) in &f.leaders {
        by_term.entry(term).or_default().insert(node);
        match max_term {
            Some(m) if term > m => counts.leader_changes += 1,
            _ => {}
        }
        max_term = max_term.max(Some(term));
    }
    let mut findings = Findings::default();
    for (term, nodes) in by_term.iter().filter(|(_, n)| n.len() > 1) {
        findings.push(|| format!("term {term} had {} leaders: {nodes:?}", nodes.len()));
    }
    counts.split_brain = findings.count();
    let otherwise = if f.leaders.is_empty() {
        Verdict::Unknown("no leader was ever observed".into())
    } else {
        Verdict::Valid
    };
    let notes = vec![format!(
        "{} term(s) observed, {} leader change(s)",
        by_term.len(),
        counts.leader_changes
    )];
    findings.into_result(Property::ElectionSafety, otherwise, notes)
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::{Expectations, Property};
    use crate::history::EventKind;

    #[test]
    fn convergence_valid_on_healthy_run() {
        let (h, e) = healthy();
        assert_valid(&h, &e, Property::Convergence);
    }

    #[test]
    fn different_digests_at_one_index() {
        let (mut h, e) = healthy();
        h.edit(|k| match k {
            EventKind::Digest { node: 2, digest, .. } => {
                *digest = 1;
                true
            }
            _ => false,
        });
        let r = assert_invalid(
            &h,
            &e,
            Property::Convergence,
            1,
            "at applied index 22 the digests differ: 0x1 on {2}",
        );
        assert_eq!(r.counts.digest_mismatches, 1);
    }

    #[test]
    fn nodes_ending_at_different_indexes() {
        let (mut h, e) = healthy();
        h.digest(3, 23, 0xabc);
        assert_invalid(
            &h,
            &e,
            Property::Convergence,
            1,
            "nodes end at different applied indexes: {1: 22, 2: 22, 3: 23}",
        );
    }

    #[test]
    fn final_listings_that_disagree() {
        let (mut h, e) = healthy();
        h.edit(|k| match k {
            EventKind::FinalTask { node: 1, id: 5, fence, .. } => {
                *fence = Some(4);
                true
            }
            _ => false,
        });
        let r = assert_invalid(&h, &e, Property::Convergence, 1, "task 5 differs between nodes");
        assert_eq!(r.counts.replica_mismatches, 1);
    }

    #[test]
    fn conflicting_audit_observations() {
        let (mut h, e) = healthy();
        h.applied_seq(21, 0, 5, "assigned", 1, Some(5), Some("w2"));
        assert_invalid(&h, &e, Property::Convergence, 1, "audit log index 21 change 0");
    }

    #[test]
    fn a_single_digest_is_unknown() {
        let mut h = H::new();
        h.digest(1, 5, 7);
        assert_unknown(
            &h,
            &Expectations::default(),
            Property::Convergence,
            "1 node(s) reported a digest",
        );
    }

    #[test]
    fn election_safety_valid_on_healthy_run() {
        let (h, e) = healthy();
        let r = assert_valid(&h, &e, Property::ElectionSafety);
        assert_eq!(r.counts.leader_changes, 1);
    }

    #[test]
    fn two_leaders_in_one_term() {
        let (mut h, e) = healthy();
        h.leader(3, 2);
        let r = assert_invalid(&h, &e, Property::ElectionSafety, 1, "term 2 had 2 leaders: {2, 3}");
        assert_eq!(r.counts.split_brain, 1);
    }

    #[test]
    fn leader_changes_count_term_increases_only() {
        let mut h = H::new();
        for (node, term) in [(1, 1), (1, 1), (2, 3), (1, 1), (2, 3), (2, 4), (3, 6)] {
            h.leader(node, term);
        }
        let r = assert_valid(&h, &Expectations::default(), Property::ElectionSafety);
        assert_eq!(r.counts.leader_changes, 3);
        assert_unknown(&H::new(), &Expectations::default(), Property::ElectionSafety, "no leader");
    }
}
