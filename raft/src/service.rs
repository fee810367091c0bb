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
//!
//! A snapshot is checked too: its chunks are copied to a spool file as they arrive, and the
//! last chunk reaches openraft only after the whole spooled snapshot verified
//! ([`crate::snapshot::verify`]). openraft treats a failed install as a storage fault and
//! stops the node, so an undecodable snapshot from one member used to stop whoever got it.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
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
    /// A snapshot from `leader` failed verification before install; nothing was installed.
    #[error("refused snapshot {id} from node {leader}: {error}")]
    BadSnapshot {
        /// The sending leader.
        leader: NodeId,
        /// The snapshot's id.
        id: String,
        /// What verification found.
        error: String,
    },
}

/// The Raft RPC handlers of one node.
///
/// They hold the node weakly: the gRPC server keeps a clone in every connection task, and
/// those outlive the server task; a strong reference there would keep the stores (and sled's
/// directory lock) alive after the node was stopped.
#[derive(Clone)]
pub struct RaftRpcs {
    node: Weak<RaftNode>,
    spool: Arc<tokio::sync::Mutex<Option<Spool>>>,
}

/// The copy of the snapshot being received (one at a time: a new id at offset 0 replaces
/// it). Removed once its last chunk was checked; a leftover is removed at the next start.
struct Spool {
    id: String,
    path: PathBuf,
    file: std::fs::File,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
        RaftRpcs { node: Arc::downgrade(node), spool: Arc::default() }
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
        let sender = plausible::append_request(&rpc).inspect_err(|e| {
            if matches!(e, Implausible::LostLog { .. }) {
                lost_log_alarm(e);
            }
        })?;
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
        self.spool_chunk(&node, leader, &rpc).await?;
        Ok(reply(node.raft().install_snapshot(rpc).await))
    }

    /// Copy `rpc`'s chunk into the spool; on the last chunk, verify the whole snapshot and
    /// refuse it (the spool dropped, openraft never told) unless it is sound and its header
    /// matches the request's metadata.
    async fn spool_chunk(
        &self,
        node: &RaftNode,
        leader: NodeId,
        rpc: &InstallSnapshotRequest<TypeConfig>,
    ) -> Result<(), RpcError> {
        let id = rpc.meta.snapshot_id.clone();
        let refuse = |error: String| RpcError::BadSnapshot { leader, id: id.clone(), error };
        let mut guard = self.spool.lock().await;
        if rpc.offset == 0 && guard.as_ref().is_none_or(|s| s.id != id) {
            *guard = None;
            let path = node.sm().snapshot_dir().join(format!("checking-{id}.tmp"));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| refuse(format!("cannot spool it: {e}")))?;
            *guard = Some(Spool { id: id.clone(), path, file });
        }
        let Some(spool) = guard.as_ref().filter(|s| s.id == id) else {
            // openraft refuses a chunk of a snapshot it did not see start, too; only a last
            // chunk must never pass unchecked.
            return match rpc.done {
                true => Err(refuse("its first chunk never arrived here".into())),
                false => Ok(()),
            };
        };
        spool
            .file
            .write_all_at(&rpc.data, rpc.offset)
            .map_err(|e| refuse(format!("cannot spool it: {e}")))?;
        if !rpc.done {
            return Ok(());
        }
        let spool = guard.take().expect("checked above");
        let path = spool.path.clone();
        let verified = tokio::task::spawn_blocking(move || crate::snapshot::verify(&path))
            .await
            .map_err(|e| refuse(format!("verification failed: {e}")))?;
        drop(spool);
        let (meta, _) = verified.map_err(|e| refuse(e.to_string()))?;
        if meta.last_log_id != rpc.meta.last_log_id
            || meta.last_membership != rpc.meta.last_membership
        {
            return Err(refuse("its header does not match the request's metadata".into()));
        }
        Ok(())
    }
}

/// Log (at most once a minute) that this node lost its data: the leader keeps retrying, and
/// the operator must act (see [`Implausible::LostLog`]).
fn lost_log_alarm(e: &Implausible) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::node::now_ms();
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if now.saturating_sub(last) >= 60_000
        && LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::error!(error = %e, "this node lost its data and cannot rejoin as the same member");
    }
}
