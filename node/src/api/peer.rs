//! The node-to-node services on the gRPC port.
//!
//! * `RaftService` (AppendEntries, Vote, InstallSnapshot): a thin adapter over the `raft`
//!   crate's handlers ([`raft::service::RaftRpcs`]); their errors become statuses in
//!   [`crate::error`].
//! * `PeerService`: the leader side of what a follower passes on ([`crate::route`]) — a write
//!   (`Forward`, proposed here with plan-ahead and never passed on again), a worker heartbeat, a
//!   read index — plus this node's status and the steps of a leader transfer
//!   ([`crate::leader::transfer`]).

use std::sync::Arc;

use proto::internal::v1 as ipb;
use proto::internal::v1::peer_service_server::PeerService;
use proto::internal::v1::raft_service_server::RaftService;
use raft::network::codec;
use raft::service::RaftRpcs;
use state_machine::Op;
use tonic::{Request, Response, Status};

use crate::error::{NodeError, NodeResult};
use crate::Node;

/// Implements `raftsched.internal.v1.RaftService`.
#[derive(Clone)]
pub struct RaftApi {
    rpcs: RaftRpcs,
}

impl RaftApi {
    /// The Raft service of `node`.
    pub fn new(node: &Node) -> Self {
        RaftApi { rpcs: RaftRpcs::new(&node.raft) }
    }
}

fn reply<T>(r: Result<T, raft::service::RpcError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| Status::from(NodeError::from(e)))
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn append_entries(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        reply(self.rpcs.append_entries(req.into_inner()).await)
    }

    async fn vote(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        reply(self.rpcs.vote(req.into_inner()).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        reply(self.rpcs.install_snapshot(req.into_inner()).await)
    }
}

/// Implements `raftsched.internal.v1.PeerService`.
pub struct PeerApi {
    node: Arc<Node>,
}

impl PeerApi {
    /// The peer service of `node`.
    pub fn new(node: Arc<Node>) -> Self {
        PeerApi { node }
    }

    async fn forward(&self, req: ipb::ForwardRequest) -> NodeResult<ipb::ForwardReply> {
        check_version(req.version)?;
        let op: Op = codec::decode(&req.op)
            .map_err(|e| NodeError::Malformed(format!("undecodable forwarded operation: {e}")))?;
        let w = self.node.propose_here(op).await?;
        Ok(ipb::ForwardReply {
            version: codec::VERSION,
            log_index: w.index,
            response: codec::encode(&w.response),
        })
    }
}

fn check_version(v: u32) -> NodeResult<()> {
    if v != codec::VERSION {
        return Err(NodeError::from(raft::service::RpcError::Version {
            got: v,
            supported: codec::VERSION,
        }));
    }
    Ok(())
}

fn answer<T>(r: NodeResult<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn forward(
        &self,
        req: Request<ipb::ForwardRequest>,
    ) -> Result<Response<ipb::ForwardReply>, Status> {
        answer(self.forward(req.into_inner()).await)
    }

    async fn heartbeat(
        &self,
        req: Request<ipb::HeartbeatRequest>,
    ) -> Result<Response<ipb::HeartbeatReply>, Status> {
        let r = req.into_inner();
        answer(
            self.node
                .heartbeat_here(&r.worker_id, r.session)
                .map(|draining| ipb::HeartbeatReply { draining }),
        )
    }

    async fn read_index(
        &self,
        _req: Request<ipb::ReadIndexRequest>,
    ) -> Result<Response<ipb::ReadIndexReply>, Status> {
        let index = self.node.raft.ensure_linearizable().await.map_err(NodeError::from);
        answer(index.map(|index| ipb::ReadIndexReply { index }))
    }

    async fn node_status(
        &self,
        req: Request<ipb::NodeStatusRequest>,
    ) -> Result<Response<ipb::NodeStatusReply>, Status> {
        let digest = req.into_inner().digest;
        let raft = self.node.raft.clone();
        let status = if digest {
            tokio::task::spawn_blocking(move || raft.local_status(true))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))
        } else {
            Ok(raft.local_status(false))
        };
        answer(status.map(|mut s| {
            self.node.disk.fill(&mut s);
            s
        }))
    }

    async fn control(
        &self,
        req: Request<ipb::ControlRequest>,
    ) -> Result<Response<ipb::ControlReply>, Status> {
        let step = req
            .into_inner()
            .op
            .ok_or_else(|| NodeError::Malformed("control request without an operation".into()));
        let done = match step {
            Ok(step) => {
                crate::leader::transfer::apply_step(&self.node, step).await.map_err(NodeError::from)
            }
            Err(e) => Err(e),
        };
        answer(done.map(|()| ipb::ControlReply {}))
    }
}
