//! What a peer's Raft message must satisfy before openraft sees it.
//!
//! openraft trusts its peers: a term of `u64::MAX` in one Vote request is accepted, persisted,
//! and the next election computes `term + 1` (`Engine::elect`), which wraps to 0 in a release
//! build, after which `update_vote(..).unwrap()` panics — on every node that saw the term, and
//! again after every restart because the term is persisted. Other absurd values (an index near
//! `u64::MAX`, entries that are not consecutive, a snapshot chunk at an offset of exabytes, a
//! snapshot id that is a path) reach code that either panics, wraps or trusts them as file
//! names. The checks here are pure and cheap; the RPC handlers ([`crate::service`]) run them
//! on every request and refuse a failing one with an error, never handing it to openraft.
//!
//! The bounds:
//!
//! * terms and log indexes at most [`MAX_TERM`] / [`MAX_INDEX`] (2^48: a cluster electing a
//!   leader every millisecond needs 8900 years to get there, and `u64` has 2^16 times that
//!   room left before anything can overflow);
//! * a vote request's vote is not committed (a candidate's never is) and names a candidate;
//!   every log id a message carries is no newer than the sender's vote term;
//! * AppendEntries entries are consecutive, starting right after `prev_log_id`, with
//!   non-decreasing terms; a membership config they carry (or a snapshot's) has voters, and
//!   every voter has an address;
//! * a snapshot chunk ends at most [`MAX_SNAPSHOT_BYTES`] into the snapshot, and its id is a
//!   short token of `[A-Za-z0-9_-]` (it becomes part of a file name);
//! * the sender (candidate or leader) is a voter or learner of this node's current membership,
//!   and not this node itself — except on a node that has no membership yet (a fresh node about
//!   to be added as a learner must hear the leader), and for AppendEntries whose entries carry
//!   a membership config naming the sender (how a member that missed a change learns about a
//!   leader added after it lost touch).
//!
//! Without peer credentials a sender can still claim any member's id; these checks bound what
//! such a message can do (no panic, no absurd term), they do not authenticate it.

use std::collections::BTreeSet;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{EntryPayload, LogId, Membership, StoredMembership, Vote};

use crate::{NodeId, NodeInfo, TypeConfig};

/// The largest term a peer may send.
pub const MAX_TERM: u64 = 1 << 48;
/// The largest log index a peer may send.
pub const MAX_INDEX: u64 = 1 << 48;
/// The largest term a persisted vote may hold when the log opens: [`MAX_TERM`] plus room for
/// 2^32 elections this node may run after hearing the largest accepted term. A larger one can
/// only have come from hostile input accepted by an older build (see [`crate::log::LogError::ImplausibleVote`]).
pub const MAX_STORED_TERM: u64 = MAX_TERM + (1 << 32);
/// The largest snapshot a peer may stream, in bytes (1 TiB).
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 40;
/// The longest snapshot id, in bytes.
pub const MAX_SNAPSHOT_ID_BYTES: usize = 64;

/// Why a peer's Raft message was refused before openraft saw it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Implausible {
    /// A term beyond [`MAX_TERM`].
    #[error("{what} term {term} is beyond the largest accepted term ({MAX_TERM})")]
    Term {
        /// Which field.
        what: &'static str,
        /// The term sent.
        term: u64,
    },
    /// A log index beyond [`MAX_INDEX`].
    #[error("{what} index {index} is beyond the largest accepted index ({MAX_INDEX})")]
    Index {
        /// Which field.
        what: &'static str,
        /// The index sent.
        index: u64,
    },
    /// A log id newer than the vote of the message that carries it.
    #[error("{what} has term {term}, newer than the sender's vote term {vote_term}")]
    AheadOfVote {
        /// Which field.
        what: &'static str,
        /// Its term.
        term: u64,
        /// The sender's vote term.
        vote_term: u64,
    },
    /// A vote request whose vote is already committed (a candidate's never is).
    #[error("a vote request must carry an uncommitted vote")]
    CommittedCandidate,
    /// Entries from `index` > 0 with no previous entry: what a leader sends to a member it
    /// believes holds the entries before them, after that member lost its data (a wiped data
    /// directory or a replaced disk under the same node id). Appending them would leave a hole;
    /// and such a node must not vote as the member it was (it may have acknowledged entries
    /// that only it and a failed leader held), so it is refused with the way out.
    #[error(
        "the leader sends entries from index {index} as to a member that holds the ones before \
         them, but this node's log is empty: its data directory was wiped or replaced after it \
         had joined. It cannot safely rejoin as the same member. On a healthy node run \
         `schedctl cluster remove --id ID` for this node, then add it back with its empty \
         data directory: `schedctl cluster add-learner --id ID --addr ADDR --wait 60s` and \
         `schedctl cluster promote --id ID` (it catches up from a snapshot)"
    )]
    LostLog {
        /// The first entry's index.
        index: u64,
    },
    /// Entries that do not follow `prev_log_id` one by one.
    #[error("entry {position} has index {index}, expected {expected}")]
    NotConsecutive {
        /// Position in the request.
        position: usize,
        /// Its index.
        index: u64,
        /// The index it should have.
        expected: u64,
    },
    /// An entry with a lower term than the one before it.
    #[error("entry {position} has term {term}, lower than the {before} before it")]
    TermGoesBack {
        /// Position in the request.
        position: usize,
        /// Its term.
        term: u64,
        /// The term of the entry (or `prev_log_id`) before it.
        before: u64,
    },
    /// A membership config without voters, or with a voter that has no address.
    #[error("{what}: {problem}")]
    BadMembership {
        /// Where it was.
        what: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A snapshot chunk ending beyond [`MAX_SNAPSHOT_BYTES`].
    #[error(
        "snapshot chunk at offset {offset} with {len} bytes ends beyond the largest accepted \
         snapshot ({MAX_SNAPSHOT_BYTES} bytes)"
    )]
    SnapshotTooLarge {
        /// The chunk's offset.
        offset: u64,
        /// Its length.
        len: usize,
    },
    /// A snapshot id that is not a short `[A-Za-z0-9_-]` token.
    #[error(
        "snapshot id {id:?} is not 1 to {MAX_SNAPSHOT_ID_BYTES} characters of A-Z a-z 0-9 _ -"
    )]
    SnapshotId {
        /// The id sent.
        id: String,
    },
}

/// Why a sender was refused, by who it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stranger {
    /// The sender is not a voter or learner here.
    #[error("{role} {sender} is not a member of this node's configuration")]
    NotMember {
        /// "candidate" or "leader".
        role: &'static str,
        /// The id it claims.
        sender: NodeId,
    },
    /// The sender claims to be this node.
    #[error("{role} {sender} is this node; a peer cannot speak for it")]
    Myself {
        /// "candidate" or "leader".
        role: &'static str,
        /// The id it claims.
        sender: NodeId,
    },
}

/// Who this node accepts Raft messages from: its id and the voters and learners of its
/// current (effective) membership.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// This node.
    pub me: NodeId,
    /// Voters and learners of the current membership; empty on a node that has none yet.
    pub ids: BTreeSet<NodeId>,
}

impl Members {
    /// The members of `membership`, as seen by node `me`.
    pub fn of(me: NodeId, membership: &Membership<NodeId, NodeInfo>) -> Members {
        Members { me, ids: membership.nodes().map(|(id, _)| *id).collect() }
    }

    /// Whether `sender`, in `role`, may talk to this node. `named_by_request` says whether
    /// the request itself carries a membership that names the sender (AppendEntries only).
    pub fn admit(
        &self,
        role: &'static str,
        sender: NodeId,
        named_by_request: bool,
    ) -> Result<(), Stranger> {
        if sender == self.me {
            return Err(Stranger::Myself { role, sender });
        }
        if self.ids.is_empty() || self.ids.contains(&sender) || named_by_request {
            return Ok(());
        }
        Err(Stranger::NotMember { role, sender })
    }
}

fn term(what: &'static str, term: u64) -> Result<(), Implausible> {
    if term > MAX_TERM {
        return Err(Implausible::Term { what, term });
    }
    Ok(())
}

fn vote(v: &Vote<NodeId>) -> Result<(), Implausible> {
    term("vote", v.leader_id.term)
}

/// A log id within the bounds and no newer than the sender's vote.
fn log_id(
    what: &'static str,
    id: &Option<LogId<NodeId>>,
    vote_term: u64,
) -> Result<(), Implausible> {
    let Some(id) = id else { return Ok(()) };
    term(what, id.leader_id.term)?;
    if id.index > MAX_INDEX {
        return Err(Implausible::Index { what, index: id.index });
    }
    if id.leader_id.term > vote_term {
        return Err(Implausible::AheadOfVote { what, term: id.leader_id.term, vote_term });
    }
    Ok(())
}

/// A membership config openraft can compute quorums of.
pub fn membership(what: &'static str, m: &Membership<NodeId, NodeInfo>) -> Result<(), Implausible> {
    let bad = |problem: String| Err(Implausible::BadMembership { what, problem });
    let configs = m.get_joint_config();
    if configs.is_empty() || configs.iter().any(|c| c.is_empty()) {
        return bad("a configuration without voters".into());
    }
    if let Some(id) = m.voter_ids().find(|id| m.get_node(id).is_none()) {
        return bad(format!("voter {id} has no address"));
    }
    Ok(())
}

fn stored_membership(
    what: &'static str,
    m: &StoredMembership<NodeId, NodeInfo>,
    vote_term: u64,
) -> Result<(), Implausible> {
    log_id(what, m.log_id(), vote_term)?;
    if m.log_id().is_some() {
        membership(what, m.membership())?;
    }
    Ok(())
}

/// A vote request: the candidate it names, once its values are plausible.
pub fn vote_request(req: &VoteRequest<NodeId>) -> Result<NodeId, Implausible> {
    vote(&req.vote)?;
    if req.vote.committed {
        return Err(Implausible::CommittedCandidate);
    }
    log_id("last_log_id", &req.last_log_id, req.vote.leader_id.term)?;
    Ok(req.vote.leader_id.node_id)
}

/// What an AppendEntries request tells the membership check, once its values are plausible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendSender {
    /// The leader it claims to come from.
    pub leader: NodeId,
    /// Whether a membership config among its entries names the leader.
    pub named_by_entries: bool,
}

/// An AppendEntries request (also a heartbeat).
pub fn append_request(req: &AppendEntriesRequest<TypeConfig>) -> Result<AppendSender, Implausible> {
    vote(&req.vote)?;
    let vote_term = req.vote.leader_id.term;
    let leader = req.vote.leader_id.node_id;
    log_id("prev_log_id", &req.prev_log_id, vote_term)?;
    log_id("leader_commit", &req.leader_commit, vote_term)?;
    let mut expected = req.prev_log_id.map_or(0, |p| p.index + 1);
    let mut before = req.prev_log_id.map_or(0, |p| p.leader_id.term);
    let mut named_by_entries = false;
    for (position, e) in req.entries.iter().enumerate() {
        log_id("entry", &Some(e.log_id), vote_term)?;
        if position == 0 && req.prev_log_id.is_none() && e.log_id.index > 0 {
            return Err(Implausible::LostLog { index: e.log_id.index });
        }
        if e.log_id.index != expected {
            return Err(Implausible::NotConsecutive { position, index: e.log_id.index, expected });
        }
        if e.log_id.leader_id.term < before {
            return Err(Implausible::TermGoesBack {
                position,
                term: e.log_id.leader_id.term,
                before,
            });
        }
        if let EntryPayload::Membership(m) = &e.payload {
            membership("membership entry", m)?;
            named_by_entries |= m.get_node(&leader).is_some();
        }
        expected = e.log_id.index + 1;
        before = e.log_id.leader_id.term;
    }
    Ok(AppendSender { leader, named_by_entries })
}

/// One snapshot chunk: the leader it claims to come from, once its values are plausible.
pub fn snapshot_request(req: &InstallSnapshotRequest<TypeConfig>) -> Result<NodeId, Implausible> {
    vote(&req.vote)?;
    let vote_term = req.vote.leader_id.term;
    log_id("snapshot last_log_id", &req.meta.last_log_id, vote_term)?;
    stored_membership("snapshot membership", &req.meta.last_membership, vote_term)?;
    let id = &req.meta.snapshot_id;
    if id.is_empty()
        || id.len() > MAX_SNAPSHOT_ID_BYTES
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Implausible::SnapshotId {
            id: id.chars().take(MAX_SNAPSHOT_ID_BYTES).collect(),
        });
    }
    let end = req.offset.checked_add(req.data.len() as u64);
    if end.is_none_or(|end| end > MAX_SNAPSHOT_BYTES) {
        return Err(Implausible::SnapshotTooLarge { offset: req.offset, len: req.data.len() });
    }
    Ok(req.vote.leader_id.node_id)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, Entry, SnapshotMeta};

    use super::*;

    fn lid(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn blank(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry { log_id: lid(term, index), payload: EntryPayload::Blank }
    }

    fn append(
        term: u64,
        prev: Option<LogId<NodeId>>,
        entries: Vec<Entry<TypeConfig>>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, 1),
            prev_log_id: prev,
            leader_commit: prev,
            entries,
        }
    }

    fn mem(voters: &[NodeId], nodes: &[NodeId]) -> Membership<NodeId, NodeInfo> {
        let nodes: BTreeMap<NodeId, NodeInfo> =
            nodes.iter().map(|id| (*id, NodeInfo::new(format!("h:{id}")))).collect();
        Membership::new(vec![voters.iter().copied().collect()], nodes)
    }

    #[test]
    fn terms_and_indexes_beyond_the_bound_are_refused() {
        let max_vote = VoteRequest::new(Vote::new(u64::MAX, 2), None);
        assert_eq!(
            vote_request(&max_vote),
            Err(Implausible::Term { what: "vote", term: u64::MAX })
        );
        let at_bound = VoteRequest::new(Vote::new(MAX_TERM, 2), Some(lid(MAX_TERM, MAX_INDEX)));
        assert_eq!(vote_request(&at_bound), Ok(2));
        let index = VoteRequest::new(Vote::new(5, 2), Some(lid(5, MAX_INDEX + 1)));
        assert_eq!(
            vote_request(&index),
            Err(Implausible::Index { what: "last_log_id", index: MAX_INDEX + 1 })
        );
        let ahead = VoteRequest::new(Vote::new(5, 2), Some(lid(6, 10)));
        assert!(matches!(vote_request(&ahead), Err(Implausible::AheadOfVote { .. })));
        let committed = VoteRequest::new(Vote::new_committed(5, 2), None);
        assert_eq!(vote_request(&committed), Err(Implausible::CommittedCandidate));

        let r = append(3, Some(lid(3, u64::MAX)), vec![]);
        assert!(matches!(append_request(&r), Err(Implausible::Index { what: "prev_log_id", .. })));
        let r = append(u64::MAX, None, vec![]);
        assert!(matches!(append_request(&r), Err(Implausible::Term { .. })));
    }

    #[test]
    fn entries_must_follow_prev_log_id_one_by_one() {
        let ok = append(3, Some(lid(2, 4)), vec![blank(2, 5), blank(3, 6)]);
        assert_eq!(append_request(&ok), Ok(AppendSender { leader: 1, named_by_entries: false }));
        let first = append(3, None, vec![blank(1, 0), blank(1, 1)]);
        assert!(append_request(&first).is_ok());
        let gap = append(3, Some(lid(2, 4)), vec![blank(3, 5), blank(3, 7)]);
        assert_eq!(
            append_request(&gap),
            Err(Implausible::NotConsecutive { position: 1, index: 7, expected: 6 })
        );
        let wrap = append(3, Some(lid(2, 4)), vec![blank(3, u64::MAX)]);
        assert!(append_request(&wrap).is_err());
        let back = append(3, Some(lid(3, 4)), vec![blank(2, 5)]);
        assert_eq!(
            append_request(&back),
            Err(Implausible::TermGoesBack { position: 0, term: 2, before: 3 })
        );
        // Entries after a purge point with nothing before them: sent to a wiped member.
        let lost = append(3, None, vec![blank(3, 112), blank(3, 113)]);
        assert_eq!(append_request(&lost), Err(Implausible::LostLog { index: 112 }));
        let text = Implausible::LostLog { index: 112 }.to_string();
        assert!(text.contains("cluster remove --id") && text.contains("add-learner"), "{text}");
    }

    #[test]
    fn membership_entries_must_be_usable_and_may_name_the_leader() {
        let named =
            Entry { log_id: lid(3, 5), payload: EntryPayload::Membership(mem(&[1, 2], &[1, 2])) };
        let r = append(3, Some(lid(3, 4)), vec![named]);
        assert_eq!(append_request(&r), Ok(AppendSender { leader: 1, named_by_entries: true }));
        let empty = Entry { log_id: lid(3, 5), payload: EntryPayload::Membership(mem(&[], &[])) };
        let r = append(3, Some(lid(3, 4)), vec![empty]);
        assert!(matches!(append_request(&r), Err(Implausible::BadMembership { .. })));
    }

    #[test]
    fn snapshot_chunks_are_bounded_and_their_ids_are_tokens() {
        let chunk = |id: &str, offset: u64, len: usize| InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            meta: SnapshotMeta {
                last_log_id: Some(lid(3, 9)),
                last_membership: StoredMembership::new(Some(lid(1, 0)), mem(&[1], &[1])),
                snapshot_id: id.into(),
            },
            offset,
            data: vec![0; len],
            done: false,
        };
        assert_eq!(snapshot_request(&chunk("3-17", 0, 10)), Ok(1));
        for bad in ["", "../../etc/passwd", "a/b", &"x".repeat(65)] {
            assert!(
                matches!(snapshot_request(&chunk(bad, 0, 1)), Err(Implausible::SnapshotId { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            snapshot_request(&chunk("s", u64::MAX, 2)),
            Err(Implausible::SnapshotTooLarge { .. })
        ));
        assert!(matches!(
            snapshot_request(&chunk("s", MAX_SNAPSHOT_BYTES, 1)),
            Err(Implausible::SnapshotTooLarge { .. })
        ));
    }

    #[test]
    fn only_members_are_heard_unless_there_is_no_membership_yet() {
        let m = Members::of(1, &mem(&[1, 2], &[1, 2, 4]));
        assert_eq!(m.admit("leader", 2, false), Ok(()));
        assert_eq!(m.admit("leader", 4, false), Ok(()), "learners count");
        assert_eq!(
            m.admit("leader", 9, false),
            Err(Stranger::NotMember { role: "leader", sender: 9 })
        );
        assert_eq!(m.admit("leader", 9, true), Ok(()), "named by the request's entries");
        assert_eq!(
            m.admit("candidate", 1, false),
            Err(Stranger::Myself { role: "candidate", sender: 1 })
        );
        let fresh = Members { me: 5, ids: BTreeSet::new() };
        assert_eq!(fresh.admit("leader", 9, false), Ok(()));
    }
}
