//! Membership and maintenance: initialize, learners, promotion, removal, snapshots, and the
//! runtime switches a leader transfer is built from.
//!
//! Promotion and voter removal are checked first ([`super::quorum`]): a learner is promoted
//! only once it has caught up, and no change is proposed unless the current and the new
//! voters each keep a majority that answered the leader recently.
//!
//! Membership changes run on the leader only ([`AdminError::NotLeader`] elsewhere, with the
//! leader's hint); passing them on is the caller's business. openraft 0.9 has no transfer
//! call, so the switches ([`RaftNode::set_heartbeat`], [`RaftNode::set_elect`],
//! [`RaftNode::trigger_elect`]) are exposed for the `node` crate's transfer recipe, which
//! applies them on every voter.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::ChangeMembers;
use proto::status::LeaderHint;
use tracing::info;

use super::quorum::{self, UnsafeChange};
use super::{forward_hint, RaftNode};
use crate::{NodeId, NodeInfo};

/// Failures of membership and admin operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// Only the leader does this; the hint says where it is.
    #[error("not the leader")]
    NotLeader {
        /// Where the leader probably is.
        leader: Option<LeaderHint>,
    },
    /// The request makes no sense in the current configuration.
    #[error("{0}")]
    Invalid(String),
    /// The change could leave the cluster unable to commit ([`super::quorum`]).
    #[error(transparent)]
    Unsafe(#[from] UnsafeChange),
    /// It did not complete in time or a peer was unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// The node stopped.
    #[error("node stopped: {0}")]
    Fatal(String),
}

type MembershipError = RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>;

impl RaftNode {
    /// A failed membership change, by openraft's error type.
    fn membership_err(&self, e: MembershipError) -> AdminError {
        match e {
            RaftError::Fatal(f) => AdminError::Fatal(f.to_string()),
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                AdminError::NotLeader { leader: forward_hint(&f).or_else(|| self.leader()) }
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                AdminError::Invalid(e.to_string())
            }
        }
    }

    /// How recently a voter must have answered this (leading) node to count as reachable:
    /// an election timeout, and at least three heartbeats.
    fn reachable_window(&self) -> Duration {
        let s = &self.settings;
        Duration::from_millis(s.election_max_ms.max(3 * s.heartbeat_ms))
    }

    /// The current voters and those of them that answered recently (this node included).
    fn voters_and_reachable(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let voters: BTreeSet<NodeId> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        let mut reachable = self.peers.answered_within(
            voters.iter().copied().filter(|id| *id != self.id),
            self.reachable_window(),
        );
        if voters.contains(&self.id) {
            reachable.insert(self.id);
        }
        (voters, reachable)
    }

    fn require_leader(&self) -> Result<(), AdminError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(AdminError::NotLeader { leader: self.leader() })
        }
    }

    /// Form a new cluster with these voters (this node included). Idempotent: a node that is
    /// already initialized with the same members answers Ok.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), AdminError> {
        if !members.contains_key(&self.id) {
            return Err(AdminError::Invalid(format!(
                "the members must include this node ({})",
                self.id
            )));
        }
        match self.raft.initialize(members.clone()).await {
            Ok(()) => {
                info!(node_id = self.id, members = ?members, "cluster initialized");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                let current: BTreeMap<NodeId, NodeInfo> =
                    self.members().into_iter().map(|(id, (info, _))| (id, info)).collect();
                if current == members {
                    Ok(())
                } else {
                    Err(AdminError::Invalid(format!(
                        "already initialized with members {current:?}"
                    )))
                }
            }
            Err(RaftError::APIError(e @ InitializeError::NotInMembers(_))) => {
                Err(AdminError::Invalid(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(AdminError::Fatal(f.to_string())),
        }
    }

    /// Add a learner; optionally wait until it has caught up with the leader's log.
    pub async fn add_learner(
        &self,
        id: NodeId,
        info: NodeInfo,
        wait: Duration,
    ) -> Result<u64, AdminError> {
        self.require_leader()?;
        let r = self.raft.add_learner(id, info, false).await.map_err(|e| self.membership_err(e))?;
        let target = r.log_id.index;
        if wait.is_zero() {
            return Ok(0);
        }
        let waited = self
            .raft
            .wait(Some(wait))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&id))
                        .is_some_and(|l| l.is_some_and(|l| l.index >= target))
                },
                "learner caught up",
            )
            .await;
        match waited {
            Ok(m) => {
                Ok(m.replication.and_then(|r| r.get(&id).copied().flatten()).map_or(0, |l| l.index))
            }
            Err(_) => Err(AdminError::Unavailable(format!(
                "learner {id} did not catch up within {} ms; it keeps replicating",
                wait.as_millis()
            ))),
        }
    }

    /// Make a learner a voter, once it has caught up (waiting up to
    /// [`quorum::PROMOTE_CATCH_UP_WAIT`] for that) and if the new voters keep a reachable
    /// majority ([`quorum::caught_up`], [`quorum::keeps_majority`]).
    pub async fn promote(&self, id: NodeId) -> Result<(), AdminError> {
        self.require_leader()?;
        let members = self.members();
        let Some((_, voter)) = members.get(&id) else {
            return Err(AdminError::Invalid(format!(
                "node {id} is not a member; add it as a learner first"
            )));
        };
        if !*voter {
            // A learner replicating under load may be a little behind at this instant: give
            // it a moment before refusing.
            let lag = |m: &openraft::RaftMetrics<NodeId, NodeInfo>| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map(|l| l.index);
                (matched, m.last_log_index.unwrap_or(0))
            };
            let waited = self
                .raft
                .wait(Some(quorum::PROMOTE_CATCH_UP_WAIT))
                .metrics(
                    |m| {
                        let (matched, last) = lag(m);
                        quorum::caught_up(id, matched, last).is_ok()
                    },
                    "learner caught up",
                )
                .await;
            let (matched, leader_last) = match waited {
                Ok(m) => lag(&m),
                Err(_) => lag(&self.raft.metrics().borrow()),
            };
            quorum::caught_up(id, matched, leader_last)?;
            let (old, mut reachable) = self.voters_and_reachable();
            reachable.extend(self.peers.answered_within([id], self.reachable_window()));
            let mut new = old.clone();
            new.insert(id);
            quorum::keeps_majority(&old, &new, &reachable)?;
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.membership_err(e))?;
        info!(node_id = id, "promoted to voter");
        Ok(())
    }

    /// Remove a node (voter or learner) from the cluster. Removing a voter needs a reachable
    /// majority among the current voters and among those that remain (so a dead voter can
    /// always be removed while the others form one).
    pub async fn remove(&self, id: NodeId) -> Result<(), AdminError> {
        self.require_leader()?;
        let members = self.members();
        let Some((_, voter)) = members.get(&id) else {
            return Err(AdminError::Invalid(format!("node {id} is not a member")));
        };
        if *voter {
            if members.values().filter(|(_, v)| *v).count() == 1 {
                return Err(AdminError::Invalid("cannot remove the last voter".into()));
            }
            let (old, reachable) = self.voters_and_reachable();
            let mut new = old.clone();
            new.remove(&id);
            quorum::keeps_majority(&old, &new, &reachable)?;
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.membership_err(e))?;
        }
        if self.members().contains_key(&id) {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.membership_err(e))?;
        }
        info!(node_id = id, "removed from the cluster");
        Ok(())
    }

    /// Enable or disable sending heartbeats (on a leader).
    pub fn set_heartbeat(&self, on: bool) {
        self.raft.runtime_config().heartbeat(on);
    }

    /// Enable or disable election timeouts.
    pub fn set_elect(&self, on: bool) {
        self.raft.runtime_config().elect(on);
    }

    /// Start an election now.
    pub async fn trigger_elect(&self) -> Result<(), AdminError> {
        self.raft.trigger().elect().await.map_err(|e| AdminError::Fatal(e.to_string()))
    }

    /// Build a snapshot now and wait for it (up to `wait`).
    pub async fn trigger_snapshot(&self, wait: Duration) -> Result<u64, AdminError> {
        let applied = self.raft.metrics().borrow().last_applied.map_or(0, |l| l.index);
        self.raft.trigger().snapshot().await.map_err(|e| AdminError::Fatal(e.to_string()))?;
        let m = self
            .raft
            .wait(Some(wait))
            .metrics(|m| m.snapshot.is_some_and(|s| s.index >= applied), "snapshot built")
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
        Ok(m.snapshot.map_or(0, |s| s.index))
    }
}
