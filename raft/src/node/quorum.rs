//! Whether a membership change keeps the cluster able to commit. Pure: the leader's view
//! (voters, who answered recently, how far each follower has replicated) comes in as data.
//!
//! Two changes used to lose quorum for good: promoting learners at addresses nobody serves
//! (each promotion grows the majority the cluster needs; after enough of them no change can
//! commit, so the repairing removal cannot either), and any change proposed while too few
//! voters answer. The rules:
//!
//! * a learner is promoted only once it has caught up: its matched log index (openraft's
//!   replication metrics) is within [`PROMOTE_MAX_LAG`] entries of the leader's last index
//!   (the leader waits up to [`PROMOTE_CATCH_UP_WAIT`] for that before refusing);
//! * a change from voters `old` to voters `new` goes through the joint configuration
//!   `old ∪ new` (openraft's joint consensus), which commits only with a majority of `old`
//!   *and* a majority of `new`; so both must be reachable: more than half of each are voters
//!   that answered the leader recently (the leader itself always counts). Removing a dead
//!   voter therefore stays possible exactly when the remaining voters form a reachable
//!   majority.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::NodeId;

/// How many entries behind the leader's last log index a learner may be and still be
/// promoted. Small enough that the new voter can acknowledge entries as soon as it votes,
/// large enough that a learner replicating under load is not refused forever.
pub const PROMOTE_MAX_LAG: u64 = 256;

/// How long a promotion waits for a learner that has not caught up yet before refusing.
pub const PROMOTE_CATCH_UP_WAIT: Duration = Duration::from_secs(3);

/// A membership change refused because the cluster could lose the ability to commit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeChange {
    /// The learner has not replicated (close enough to) the leader's log.
    #[error(
        "node {id} has not caught up: its matched index is {}, the leader's last index is \
         {leader_last} (promotion needs it within {PROMOTE_MAX_LAG}); wait for it to \
         replicate (is anything serving its address?) and retry",
        matched.map_or_else(|| "none".to_string(), |m| m.to_string())
    )]
    NotCaughtUp {
        /// The learner.
        id: NodeId,
        /// Its matched index, if it ever acknowledged anything.
        matched: Option<u64>,
        /// The leader's last log index.
        leader_last: u64,
    },
    /// Too few of a configuration's voters answer the leader for it to commit.
    #[error(
        "the {which} voters {voters:?} would have no reachable majority: only {reachable:?} \
         answered the leader recently, {needed} are needed"
    )]
    NoReachableMajority {
        /// "current" or "new".
        which: &'static str,
        /// The voters of that configuration.
        voters: BTreeSet<NodeId>,
        /// Those of them that answered recently.
        reachable: BTreeSet<NodeId>,
        /// The majority it needs.
        needed: usize,
    },
}

/// Whether learner `id`, with matched index `matched`, may become a voter now.
pub fn caught_up(id: NodeId, matched: Option<u64>, leader_last: u64) -> Result<(), UnsafeChange> {
    match matched {
        Some(m) if m.saturating_add(PROMOTE_MAX_LAG) >= leader_last => Ok(()),
        _ => Err(UnsafeChange::NotCaughtUp { id, matched, leader_last }),
    }
}

/// Whether changing the voters from `old` to `new` keeps a reachable majority in both (the
/// joint configuration needs both), given the voters that answered the leader recently.
pub fn keeps_majority(
    old: &BTreeSet<NodeId>,
    new: &BTreeSet<NodeId>,
    reachable: &BTreeSet<NodeId>,
) -> Result<(), UnsafeChange> {
    for (which, voters) in [("current", old), ("new", new)] {
        let up: BTreeSet<NodeId> = voters.intersection(reachable).copied().collect();
        let needed = voters.len() / 2 + 1;
        if up.len() < needed {
            return Err(UnsafeChange::NoReachableMajority {
                which,
                voters: voters.clone(),
                reachable: up,
                needed,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_learner_is_promoted_only_once_it_has_caught_up() {
        assert_eq!(caught_up(4, Some(100), 100), Ok(()));
        assert_eq!(caught_up(4, Some(1000 - PROMOTE_MAX_LAG), 1000), Ok(()));
        assert!(caught_up(4, Some(999 - PROMOTE_MAX_LAG), 1000).is_err());
        assert_eq!(caught_up(4, Some(0), 0), Ok(()));
        assert_eq!(
            caught_up(4, None, 10),
            Err(UnsafeChange::NotCaughtUp { id: 4, matched: None, leader_last: 10 })
        );
        assert!(caught_up(4, Some(1), PROMOTE_MAX_LAG + 2).is_err());
        assert_eq!(caught_up(4, Some(u64::MAX), u64::MAX), Ok(()), "no overflow");
    }

    #[test]
    fn promoting_a_dead_node_into_a_bare_majority_is_refused() {
        // 1, 2, 3 answer; adding 4 and 5 that nobody serves keeps 3 of 5, a sixth does not.
        let up = set(&[1, 2, 3]);
        assert_eq!(keeps_majority(&set(&[1, 2, 3]), &set(&[1, 2, 3, 4]), &up), Ok(()));
        assert_eq!(keeps_majority(&set(&[1, 2, 3, 4]), &set(&[1, 2, 3, 4, 5]), &up), Ok(()));
        assert_eq!(
            keeps_majority(&set(&[1, 2, 3, 4, 5]), &set(&[1, 2, 3, 4, 5, 6]), &up),
            Err(UnsafeChange::NoReachableMajority {
                which: "new",
                voters: set(&[1, 2, 3, 4, 5, 6]),
                reachable: up.clone(),
                needed: 4
            })
        );
    }

    #[test]
    fn removing_a_dead_voter_stays_possible_with_a_reachable_majority() {
        // 3 of 4 answer: dropping the dead one leaves 3 of 3.
        assert_eq!(keeps_majority(&set(&[1, 2, 3, 4]), &set(&[1, 2, 3]), &set(&[1, 2, 3])), Ok(()));
        // Only 2 of 5 answer: no change can commit, so none is proposed.
        assert!(matches!(
            keeps_majority(&set(&[1, 2, 3, 4, 5]), &set(&[1, 2, 3, 4]), &set(&[1, 2])),
            Err(UnsafeChange::NoReachableMajority { which: "current", needed: 3, .. })
        ));
        // Removing a live voter while another is dead: 2 of 3 current, 1 of 2 new is too few.
        assert!(matches!(
            keeps_majority(&set(&[1, 2, 3]), &set(&[1, 3]), &set(&[1, 2])),
            Err(UnsafeChange::NoReachableMajority { which: "new", needed: 2, .. })
        ));
    }
}
