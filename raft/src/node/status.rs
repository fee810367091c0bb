//! What this node knows about itself and the cluster: its status, the members of the current
//! configuration and (on the leader) replication progress. Everything here reads openraft's
//! metrics and the stores; nothing waits on a peer.

use std::collections::{BTreeMap, BTreeSet};

use openraft::ServerState;
use proto::internal::v1 as ipb;

use super::RaftNode;
use crate::NodeId;
use crate::NodeInfo;

impl RaftNode {
    /// This node's view of itself; with `with_digest` also the state digest (O(state): call
    /// it off the async threads).
    pub fn local_status(&self, with_digest: bool) -> ipb::NodeStatusReply {
        let m = self.raft.metrics().borrow().clone();
        let (digest_index, digest) = if with_digest { self.sm.digest() } else { (0, 0) };
        let applied = m.last_applied.map_or(0, |l| l.index);
        ipb::NodeStatusReply {
            id: self.id,
            role: role_name(m.state).to_string(),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            committed_index: self.log.committed().map_or(0, |l| l.index).max(applied),
            applied_index: if with_digest { digest_index } else { applied },
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            leader_id: m.current_leader.unwrap_or(0),
            digest,
            command_version: self.sm.command_version(),
            // The disk fields belong to the server (`node` crate), which fills them in.
            ..Default::default()
        }
    }

    /// Members (id -> addresses, voter?) of the current configuration.
    pub fn members(&self) -> BTreeMap<NodeId, (NodeInfo, bool)> {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        mem.nodes().map(|(id, n)| (*id, (n.clone(), voters.contains(id)))).collect()
    }

    /// Where member `id` takes peer RPCs (its peer port, else its one address).
    pub fn peer_addr(&self, id: NodeId) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config.membership().get_node(&id).map(|n| n.peer().to_string())
    }

    /// Replication progress as the leader sees it (id -> matched index).
    pub fn replication(&self) -> BTreeMap<NodeId, u64> {
        let m = self.raft.metrics().borrow().clone();
        m.replication
            .map(|r| r.iter().map(|(id, l)| (*id, l.map_or(0, |l| l.index))).collect())
            .unwrap_or_default()
    }
}

/// The lower-case role name used in status output.
pub fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}
