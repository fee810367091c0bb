//! Calls of the `Cluster` service: init, status, membership, leader transfer, snapshots and
//! tokens.
//!
//! Membership changes and leader transfer are writes, so the node that answers becomes the
//! preferred one; status is a read any node answers.

use proto::pb;

use super::retry::Kind;
use super::{cluster, Client};
use crate::error::Error;

impl Client {
    /// Initialises a new cluster with these voters (idempotent for the same members).
    pub async fn init_cluster(&self, members: Vec<pb::Member>) -> Result<(), Error> {
        let req = pb::InitClusterRequest { members };
        self.call("init_cluster", Kind::Write, req, |ch, r| async move {
            cluster(ch).init_cluster(r).await
        })
        .await?;
        Ok(())
    }

    /// Members, leader, term and per-node indexes.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, Error> {
        self.call("cluster_status", Kind::Read, pb::ClusterStatusRequest {}, |ch, r| async move {
            cluster(ch).status(r).await
        })
        .await
    }

    /// Adds a non-voting member (`peer_addr`: its peer port, `""` when it has none); with
    /// `wait_ms > 0` waits until it caught up.
    pub async fn add_learner(
        &self,
        id: u64,
        addr: &str,
        peer_addr: &str,
        wait_ms: u64,
    ) -> Result<pb::AddLearnerResponse, Error> {
        let req = pb::AddLearnerRequest {
            id,
            addr: addr.to_string(),
            peer_addr: peer_addr.to_string(),
            wait_ms,
        };
        self.call("add_learner", Kind::Write, req, |ch, r| async move {
            cluster(ch).add_learner(r).await
        })
        .await
    }

    /// Opens the leader's snapshot stream ([`pb::SnapshotChunk`]s: the bytes of a fresh
    /// snapshot file; the first chunk says index, term and size). Admin only.
    pub async fn save_snapshot(&self) -> Result<tonic::Streaming<pb::SnapshotChunk>, Error> {
        let (stream, _) = self
            .call_at(
                "save_snapshot",
                Kind::Stream,
                pb::SaveSnapshotRequest {},
                |ch, r| async move { cluster(ch).save_snapshot(r).await },
            )
            .await?;
        Ok(stream)
    }

    /// Makes a learner a voter.
    pub async fn promote(&self, id: u64) -> Result<(), Error> {
        self.call("promote", Kind::Write, pb::PromoteRequest { id }, |ch, r| async move {
            cluster(ch).promote(r).await
        })
        .await?;
        Ok(())
    }

    /// Removes a member.
    pub async fn remove_node(&self, id: u64) -> Result<(), Error> {
        self.call("remove_node", Kind::Write, pb::RemoveNodeRequest { id }, |ch, r| async move {
            cluster(ch).remove_node(r).await
        })
        .await?;
        Ok(())
    }

    /// Hands leadership to node `to`; returns the leader afterwards.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64, Error> {
        let r = self
            .call(
                "transfer_leader",
                Kind::Write,
                pb::TransferLeaderRequest { to },
                |ch, r| async move { cluster(ch).transfer_leader(r).await },
            )
            .await?;
        Ok(r.leader_id)
    }

    /// Makes the node that answers build a snapshot; returns its index.
    pub async fn trigger_snapshot(&self) -> Result<u64, Error> {
        let r = self
            .call(
                "trigger_snapshot",
                Kind::Write,
                pb::TriggerSnapshotRequest {},
                |ch, r| async move { cluster(ch).trigger_snapshot(r).await },
            )
            .await?;
        Ok(r.snapshot_index)
    }

    /// Creates a replicated token (idempotent for the same name, role, digest and prefix).
    pub async fn create_token(
        &self,
        req: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, Error> {
        self.call("create_token", Kind::Write, req, |ch, r| async move {
            cluster(ch).create_token(r).await
        })
        .await
    }

    /// The token file's tokens (of the node that answers) and the replicated ones.
    pub async fn list_tokens(&self) -> Result<Vec<pb::TokenInfo>, Error> {
        let r = self
            .call("list_tokens", Kind::Read, pb::ListTokensRequest {}, |ch, r| async move {
                cluster(ch).list_tokens(r).await
            })
            .await?;
        Ok(r.tokens)
    }

    /// Revokes a replicated token.
    pub async fn revoke_token(&self, name: &str) -> Result<(), Error> {
        let req = pb::RevokeTokenRequest { name: name.to_string() };
        self.call("revoke_token", Kind::Write, req, |ch, r| async move {
            cluster(ch).revoke_token(r).await
        })
        .await?;
        Ok(())
    }
}
