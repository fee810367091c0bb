//! The server side of the internal service: Raft RPCs from peers, forwarded writes and
//! heartbeats, read index, node status and the leader-transfer controls.

use std::sync::{Arc, Weak};

use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use proto::internal::v1 as ipb;
use proto::internal::v1::raft_service_server::RaftService;
use tonic::{Request, Response, Status};

use crate::network::codec;
use crate::raft_node::{RaftNode, WriteError};
use crate::{NodeId, TypeConfig};

/// Implements `raftsched.internal.v1.RaftService` for one node.
///
/// It holds the node weakly: tonic keeps a clone of the service in every connection task,
/// and those outlive the server task; a strong reference there would keep the stores (and
/// sled's directory lock) alive after the node was stopped.
#[derive(Clone)]
pub struct InternalService {
    node: Weak<RaftNode>,
}

impl InternalService {
    /// The service of `node`.
    pub fn new(node: &Arc<RaftNode>) -> Self {
        InternalService { node: Arc::downgrade(node) }
    }

    fn node(&self) -> Result<Arc<RaftNode>, Status> {
        self.node.upgrade().ok_or_else(|| Status::unavailable("node is shutting down"))
    }
}

fn bad_request(what: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable {what}: {e}"))
}

fn check_version(v: u32) -> Result<(), Status> {
    if v != codec::VERSION {
        return Err(Status::failed_precondition(format!(
            "raft encoding {v} is not supported (this node speaks {})",
            codec::VERSION
        )));
    }
    Ok(())
}

fn reply<T: serde::Serialize, E: serde::Serialize>(r: Result<T, E>) -> Response<ipb::RaftReply> {
    let result = match r {
        Ok(v) => ipb::raft_reply::Result::Ok(codec::encode(&v)),
        Err(e) => ipb::raft_reply::Result::Error(codec::encode(&e)),
    };
    Response::new(ipb::RaftReply { version: codec::VERSION, result: Some(result) })
}

/// `UNAVAILABLE` carrying the leader hint (`<id>@<addr>`) in the `x-raftsched-leader` metadata.
pub fn unavailable(reason: &str, leader: &Option<(NodeId, String)>) -> Status {
    let mut s = Status::unavailable(reason.to_string());
    if let Some((id, addr)) = leader {
        if let Ok(v) = format!("{id}@{addr}").parse() {
            s.metadata_mut().insert(proto::LEADER_HINT_KEY, v);
        }
    }
    s
}

fn write_status(e: WriteError) -> Status {
    match e {
        WriteError::Unavailable { reason, leader } => unavailable(&reason, &leader),
        WriteError::Fatal(reason) => Status::unavailable(format!("node stopped: {reason}")),
    }
}

#[tonic::async_trait]
impl RaftService for InternalService {
    async fn append_entries(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        let req = req.into_inner();
        check_version(req.version)?;
        let wire: codec::AppendWire =
            codec::decode(&req.data).map_err(|e| bad_request("append entries", e))?;
        let entries =
            codec::decode_entries(&wire.entries).map_err(|e| bad_request("log entry", e))?;
        let rpc = openraft::raft::AppendEntriesRequest::<TypeConfig> {
            vote: wire.vote,
            prev_log_id: wire.prev_log_id,
            leader_commit: wire.leader_commit,
            entries,
        };
        Ok(reply(self.node()?.raft().append_entries(rpc).await))
    }

    async fn vote(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        let req = req.into_inner();
        check_version(req.version)?;
        let rpc: VoteRequest<NodeId> =
            codec::decode(&req.data).map_err(|e| bad_request("vote", e))?;
        Ok(reply(self.node()?.raft().vote(rpc).await))
    }

    async fn install_snapshot(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        let req = req.into_inner();
        check_version(req.version)?;
        let rpc: InstallSnapshotRequest<TypeConfig> =
            codec::decode(&req.data).map_err(|e| bad_request("snapshot chunk", e))?;
        Ok(reply(self.node()?.raft().install_snapshot(rpc).await))
    }

    async fn forward(
        &self,
        req: Request<ipb::ForwardRequest>,
    ) -> Result<Response<ipb::ForwardReply>, Status> {
        let req = req.into_inner();
        check_version(req.version)?;
        match req.op {
            Some(ipb::forward_request::Op::Command(bytes)) => {
                let cmd: state_machine::Command =
                    codec::decode(&bytes).map_err(|e| bad_request("command", e))?;
                let w = self.node()?.propose_local(cmd.op).await.map_err(write_status)?;
                Ok(Response::new(ipb::ForwardReply {
                    version: codec::VERSION,
                    log_index: w.index,
                    response: codec::encode(&w.response),
                    draining: false,
                }))
            }
            Some(ipb::forward_request::Op::Heartbeat(h)) => {
                let draining = self.node()?.heartbeat_local(&h.worker_id, h.session)?;
                Ok(Response::new(ipb::ForwardReply {
                    version: codec::VERSION,
                    draining,
                    ..Default::default()
                }))
            }
            None => Err(Status::invalid_argument("forward request without an operation")),
        }
    }

    async fn read_index(
        &self,
        _req: Request<ipb::ReadIndexRequest>,
    ) -> Result<Response<ipb::ReadIndexReply>, Status> {
        let index = self.node()?.read_index_local().await.map_err(write_status)?;
        Ok(Response::new(ipb::ReadIndexReply { index }))
    }

    async fn node_status(
        &self,
        req: Request<ipb::NodeStatusRequest>,
    ) -> Result<Response<ipb::NodeStatusReply>, Status> {
        let digest = req.into_inner().digest;
        let node = self.node()?;
        let status = if digest {
            tokio::task::spawn_blocking(move || node.local_status(true))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
        } else {
            node.local_status(false)
        };
        Ok(Response::new(status))
    }

    async fn control(
        &self,
        req: Request<ipb::ControlRequest>,
    ) -> Result<Response<ipb::ControlReply>, Status> {
        let op = req
            .into_inner()
            .op
            .ok_or_else(|| Status::invalid_argument("control request without an operation"))?;
        self.node()?.control(op).await.map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(ipb::ControlReply {}))
    }
}
