//! Linearizable reads and readiness.
//!
//! A read is linearizable once the local state has applied everything committed before the
//! read began. On the leader [`RaftNode::ensure_linearizable`] confirms leadership with a
//! quorum (openraft's read index) and waits for the local apply; it returns the read index,
//! which is what a follower needs: having got it from the leader (the `node` crate asks over
//! its peer service), the follower waits with [`RaftNode::wait_applied`] and then reads locally.
//!
//! [`RaftNode::readiness`] says whether such a read can be served now: on a leader whose last
//! quorum ack is within an election timeout (the same test that makes a cut-off leader refuse
//! requests at once), or on a follower that heard from its leader within an election timeout.

use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::ServerState;

use super::propose::quorum_lost;
use super::status::role_name;
use super::{forward_hint, RaftNode, WriteError};
use crate::NodeId;

impl RaftNode {
    /// On the leader: confirm leadership and wait until the local state applied every write
    /// committed before this call; returns that read index. Elsewhere: [`WriteError::NotLeader`].
    pub async fn ensure_linearizable(&self) -> Result<u64, WriteError> {
        self.check_quorum_contact()?;
        match tokio::time::timeout(self.write_timeout(), self.raft.ensure_linearizable()).await {
            Err(_) => Err(self.unavailable("read index not confirmed in time (no quorum?)", None)),
            Ok(Ok(id)) => Ok(id.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                match forward_hint(&f) {
                    Some(l) if l.id == self.id => {
                        Err(self.unavailable("leadership is changing", Some(l)))
                    }
                    leader => Err(WriteError::NotLeader { leader }),
                }
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                Err(self.unavailable(e.to_string(), None))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(WriteError::Fatal(f.to_string())),
        }
    }

    /// Wait until the local state machine applied `index` (at most the write timeout).
    pub async fn wait_applied(&self, index: u64) -> Result<(), WriteError> {
        let mut rx = self.sm.events().subscribe();
        let result =
            tokio::time::timeout(self.write_timeout(), rx.wait_for(|applied| *applied >= index))
                .await
                .map(|r| r.is_ok());
        match result {
            Ok(true) => Ok(()),
            Ok(false) => Err(WriteError::Fatal("state machine closed".into())),
            Err(_) => {
                Err(self
                    .unavailable(format!("this node did not apply index {index} in time"), None))
            }
        }
    }

    /// Whether this node can serve a linearizable read now (the `/readyz` and gRPC health
    /// answer): a leader whose last quorum ack is recent (the same decision that makes a cut-off
    /// leader refuse requests), or a follower or learner that heard from its leader within an
    /// election timeout. Cheap: one round trip to the Raft core on a follower, none on a leader.
    pub async fn readiness(&self) -> Result<Ready, NotReady> {
        if let Some(e) = self.fatal() {
            return Err(NotReady::Stopped(e));
        }
        let (state, leader, since_ack) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state, m.current_leader, m.millis_since_quorum_ack)
        };
        let limit = self.contact_limit_ms();
        let heard_ms = match (state, leader) {
            (ServerState::Follower | ServerState::Learner, Some(l)) if l != self.id => {
                // openraft 0.9 has no follower-side metric for this: the vote's last-modified
                // time is refreshed by every AppendEntries accepted from the leader.
                let asked = self.raft.with_raft_state(|st| {
                    st.vote_last_modified().map(|t| t.elapsed().as_millis() as u64)
                });
                match tokio::time::timeout(Duration::from_secs(1), asked).await {
                    Ok(Ok(ms)) => ms,
                    Ok(Err(e)) => return Err(NotReady::Stopped(e.to_string())),
                    Err(_) => return Err(NotReady::Busy),
                }
            }
            _ => None,
        };
        decide_readiness(self.id, state, leader, since_ack, heard_ms, limit)
    }
}

/// Why a node can serve linearizable reads now ([`RaftNode::readiness`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ready {
    /// The leader, acknowledged by a quorum this long ago.
    Leader {
        /// Milliseconds since the last quorum ack.
        quorum_ack_ms: u64,
    },
    /// A follower or learner that heard from its leader this long ago.
    Follower {
        /// The leader.
        leader: NodeId,
        /// Milliseconds since the last AppendEntries accepted from it.
        heard_ms: u64,
    },
}

impl std::fmt::Display for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ready::Leader { quorum_ack_ms } => {
                write!(f, "leader, quorum ack {quorum_ack_ms} ms ago")
            }
            Ready::Follower { leader, heard_ms } => {
                write!(f, "following leader {leader}, heard {heard_ms} ms ago")
            }
        }
    }
}

/// Why a node cannot serve linearizable reads now ([`RaftNode::readiness`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// Raft stopped (fatal error or shutdown).
    #[error("raft stopped: {0}")]
    Stopped(String),
    /// A leader cut off from its majority.
    #[error("leader without a quorum ack for {0} ms")]
    NoQuorum(u64),
    /// A leader not yet acknowledged by a quorum in its term (just elected).
    #[error("leader not yet acknowledged by a quorum")]
    Unconfirmed,
    /// No leader known (e.g. an election is under way).
    #[error("no leader known ({role})")]
    NoLeader {
        /// This node's role.
        role: &'static str,
    },
    /// A follower whose leader went quiet.
    #[error("no word from leader {leader} for {ms} ms")]
    LeaderSilent {
        /// The leader it last knew.
        leader: NodeId,
        /// Milliseconds since it last heard from it.
        ms: u64,
    },
    /// The Raft core did not answer the question in time.
    #[error("raft core did not answer within 1 s")]
    Busy,
}

/// Readiness from what this node knows: its role, the leader, the leader's last quorum ack and
/// (on a follower) when it last heard from the leader.
fn decide_readiness(
    id: NodeId,
    state: ServerState,
    leader: Option<NodeId>,
    since_ack: Option<u64>,
    heard_ms: Option<u64>,
    limit_ms: u64,
) -> Result<Ready, NotReady> {
    match state {
        ServerState::Leader => match (since_ack, quorum_lost(state, since_ack, limit_ms)) {
            (_, Some(ms)) => Err(NotReady::NoQuorum(ms)),
            (Some(ms), None) => Ok(Ready::Leader { quorum_ack_ms: ms }),
            (None, None) => Err(NotReady::Unconfirmed),
        },
        ServerState::Shutdown => Err(NotReady::Stopped("shut down".into())),
        ServerState::Follower | ServerState::Learner => match (leader, heard_ms) {
            (Some(l), Some(ms)) if l != id && ms <= limit_ms => {
                Ok(Ready::Follower { leader: l, heard_ms: ms })
            }
            (Some(l), Some(ms)) if l != id => Err(NotReady::LeaderSilent { leader: l, ms }),
            _ => Err(NotReady::NoLeader { role: role_name(state) }),
        },
        ServerState::Candidate => Err(NotReady::NoLeader { role: role_name(state) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 150;

    #[test]
    fn a_leader_is_ready_only_with_a_recent_quorum_ack() {
        let leader = |ack| decide_readiness(1, ServerState::Leader, Some(1), ack, None, LIMIT);
        assert_eq!(leader(Some(20)), Ok(Ready::Leader { quorum_ack_ms: 20 }));
        assert_eq!(leader(Some(LIMIT)), Ok(Ready::Leader { quorum_ack_ms: LIMIT }));
        assert_eq!(leader(Some(1234)), Err(NotReady::NoQuorum(1234)));
        assert_eq!(leader(None), Err(NotReady::Unconfirmed));
        // The same limit makes a leader refuse writes.
        assert_eq!(quorum_lost(ServerState::Leader, Some(1234), LIMIT), Some(1234));
        assert_eq!(quorum_lost(ServerState::Follower, Some(1234), LIMIT), None);
    }

    #[test]
    fn a_follower_is_ready_only_while_it_hears_from_its_leader() {
        let f = |state, leader, heard| decide_readiness(2, state, leader, None, heard, LIMIT);
        assert_eq!(
            f(ServerState::Follower, Some(1), Some(10)),
            Ok(Ready::Follower { leader: 1, heard_ms: 10 })
        );
        assert!(f(ServerState::Learner, Some(1), Some(10)).is_ok());
        assert_eq!(
            f(ServerState::Follower, Some(1), Some(900)),
            Err(NotReady::LeaderSilent { leader: 1, ms: 900 })
        );
        assert_eq!(
            f(ServerState::Follower, None, None),
            Err(NotReady::NoLeader { role: "follower" })
        );
        assert_eq!(
            f(ServerState::Candidate, Some(1), Some(10)),
            Err(NotReady::NoLeader { role: "candidate" })
        );
        assert!(f(ServerState::Shutdown, Some(1), Some(10)).is_err());
    }

    #[test]
    fn reasons_read_as_plain_text() {
        assert_eq!(NotReady::NoQuorum(1234).to_string(), "leader without a quorum ack for 1234 ms");
        assert_eq!(
            NotReady::NoLeader { role: "candidate" }.to_string(),
            "no leader known (candidate)"
        );
    }
}
