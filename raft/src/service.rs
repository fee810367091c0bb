//! The server side of Raft's own RPCs (AppendEntries, Vote, InstallSnapshot), as plain
//! handlers: request message in, reply message or [`RpcError`] out. The `node` crate serves
//! them as `raftsched.internal.v1.RaftService` and turns an [`RpcError`] into a status in its
//! one error table; this crate never builds a gRPC status.
//!
//! A Raft-level refusal (e.g. a stale term) is not an [`RpcError`]: it travels inside the
//! reply, encoded, so the calling node's openraft sees its own error type.
//!
//! Every request is checked by [`crate::plausible`] before openraft sees it — bounded terms
//! and indexes, consecutive entries, a sender that is a member here — and refused with
//! [`RpcError::Implausible`] or [`RpcError::Stranger`] otherwise: openraft trusts its peers,
//! and one absurd term used to make every node panic.

use std::sync::{Arc, Weak};

use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use proto::internal::v1 as ipb;

use crate::network::codec;
use crate::node::RaftNode;
use crate::plausible::{self, Implausible, Members, Stranger};
use crate::{NodeId, TypeConfig};

/// Why a Raft RPC could not be handled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The payload did not decode.
    #[error("undecodable {what}: {error}")]
    Undecodable {
        /// Which part.
        what: &'static str,
        /// The decoder's complaint.
        error: String,
    },
    /// The peer speaks another payload encoding.
    #[error("raft encoding {got} is not supported (this node speaks {supported})")]
    Version {
        /// The peer's encoding.
        got: u32,
        /// Ours.
        supported: u32,
    },
    /// This node is shutting down.
    #[error("node is shutting down")]
    Stopped,
    /// A value in the message is out of bounds or inconsistent ([`crate::plausible`]).
    #[error("refused raft message: {0}")]
    Implausible(#[from] Implausible),
    /// The sender is not a member here ([`crate::plausible::Members::admit`]).
    #[error("refused raft message: {0}")]
    Stranger(#[from] Stranger),
}

/// The Raft RPC handlers of one node.
///
/// They hold the node weakly: the gRPC server keeps a clone in every connection task, and
/// those outlive the server task; a strong reference there would keep the stores (and sled's
/// directory lock) alive after the node was stopped.
#[derive(Clone)]
pub struct RaftRpcs {
    node: Weak<RaftNode>,
}

fn undecodable(what: &'static str) -> impl FnOnce(postcard::Error) -> RpcError {
    move |e| RpcError::Undecodable { what, error: e.to_string() }
}

fn check_version(got: u32) -> Result<(), RpcError> {
    if got != codec::VERSION {
        return Err(RpcError::Version { got, supported: codec::VERSION });
    }
    Ok(())
}

fn reply<T: serde::Serialize, E: serde::Serialize>(r: Result<T, E>) -> ipb::RaftReply {
    let result = match r {
        Ok(v) => ipb::raft_reply::Result::Ok(codec::encode(&v)),
        Err(e) => ipb::raft_reply::Result::Error(codec::encode(&e)),
    };
    ipb::RaftReply { version: codec::VERSION, result: Some(result) }
}

impl RaftRpcs {
    /// The handlers of `node`.
    pub fn new(node: &Arc<RaftNode>) -> Self {
        RaftRpcs { node: Arc::downgrade(node) }
    }

    fn node(&self) -> Result<Arc<RaftNode>, RpcError> {
        self.node.upgrade().ok_or(RpcError::Stopped)
    }

    /// Who `node` hears Raft messages from right now.
    fn members(node: &RaftNode) -> Members {
        let m = node.raft().metrics().borrow().membership_config.clone();
        Members::of(node.id(), m.membership())
    }

    /// AppendEntries (also the leader's heartbeat).
    pub async fn append_entries(&self, req: ipb::RaftRequest) -> Result<ipb::RaftReply, RpcError> {
        check_version(req.version)?;
        let wire: codec::AppendWire =
            codec::decode(&req.data).map_err(undecodable("append entries"))?;
        let entries = codec::decode_entries(&wire.entries).map_err(undecodable("log entry"))?;
        let rpc = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: wire.vote,
            prev_log_id: wire.prev_log_id,
            leader_commit: wire.leader_commit,
            entries,
        };
        let sender = plausible::append_request(&rpc)?;
        let node = self.node()?;
        Self::members(&node).admit("leader", sender.leader, sender.named_by_entries)?;
        Ok(reply(node.raft().append_entries(rpc).await))
    }

    /// RequestVote.
    pub async fn vote(&self, req: ipb::RaftRequest) -> Result<ipb::RaftReply, RpcError> {
        check_version(req.version)?;
        let rpc: VoteRequest<NodeId> = codec::decode(&req.data).map_err(undecodable("vote"))?;
        let candidate = plausible::vote_request(&rpc)?;
        let node = self.node()?;
        Self::members(&node).admit("candidate", candidate, false)?;
        Ok(reply(node.raft().vote(rpc).await))
    }

    /// One chunk of a snapshot.
    pub async fn install_snapshot(
        &self,
        req: ipb::RaftRequest,
    ) -> Result<ipb::RaftReply, RpcError> {
        check_version(req.version)?;
        let rpc: InstallSnapshotRequest<TypeConfig> =
            codec::decode(&req.data).map_err(undecodable("snapshot chunk"))?;
        let leader = plausible::snapshot_request(&rpc)?;
        let node = self.node()?;
        Self::members(&node).admit("leader", leader, false)?;
        Ok(reply(node.raft().install_snapshot(rpc).await))
    }
}
