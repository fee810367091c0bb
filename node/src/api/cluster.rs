//! The `Cluster` service: initialization, status of every member, membership changes, leader
//! transfer and snapshots. Membership changes and transfers run on the leader; a follower
//! passes them on one hop ([`crate::route`]; marked with `x-raftsched-forwarded`, so they never
//! travel twice). Promotion and voter removal are refused with FAILED_PRECONDITION when they
//! could leave the cluster without a reachable majority (`raft::node::quorum`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use state_machine::{ApiToken, NewToken, Op, Output, Rejection, Role};
use tonic::{Request, Response, Status};

use super::{answer, BoxStream};
use crate::error::{NodeError, NodeResult};
use crate::route::AdminRoute as Route;
use crate::Node;
use raft::NodeInfo;

/// Implements `scheduler.v1.Cluster`.
pub struct ClusterApi {
    node: Arc<Node>,
}

impl ClusterApi {
    /// The service of `node`.
    pub fn new(node: Arc<Node>) -> Self {
        ClusterApi { node }
    }

    fn route<T>(&self, req: &Request<T>) -> NodeResult<Route> {
        self.node.admin_route(proto::status::is_forwarded(req))
    }

    fn client(&self, addr: &str) -> Result<ClusterClient<tonic::transport::Channel>, Status> {
        Ok(ClusterClient::new(self.node.channel(addr)?))
    }

    /// The request to pass on to the leader: the same message and credential, marked as
    /// forwarded (the leader authorizes it again; it never travels a second hop).
    fn forwarded<T>(req: Request<T>, timeout: Duration) -> Request<T> {
        let auth = req.metadata().get(proto::auth::AUTHORIZATION_KEY).cloned();
        let mut r = Request::new(req.into_inner());
        if let Some(a) = auth {
            r.metadata_mut().insert(proto::auth::AUTHORIZATION_KEY, a);
        }
        proto::status::mark_forwarded(&mut r);
        r.set_timeout(timeout);
        r
    }

    async fn status(&self) -> NodeResult<pb::ClusterStatusResponse> {
        let raft = &self.node.raft;
        let local = raft.local_status(false);
        let matched = raft.replication();
        let mut nodes = Vec::new();
        for m in self.node.member_statuses(Duration::from_secs(1)).await {
            let (id, voter, addr) = (m.id, m.voter, m.info.addr);
            let mut n = match m.reply {
                Ok(r) => pb::NodeStatus {
                    id,
                    addr,
                    voter,
                    reachable: true,
                    role: r.role,
                    term: r.term,
                    last_log_index: r.last_log_index,
                    committed_index: r.committed_index,
                    applied_index: r.applied_index,
                    snapshot_index: r.snapshot_index,
                    purged_index: r.purged_index,
                    leader_id: r.leader_id,
                    command_version: r.command_version,
                    disk_free_bytes: r.disk_free_bytes,
                    disk_min_free_bytes: r.disk_min_free_bytes,
                    disk_low: r.disk_low,
                    data_dir: r.data_dir,
                    ..Default::default()
                },
                Err(e) => pb::NodeStatus {
                    id,
                    addr,
                    voter,
                    reachable: false,
                    error: e,
                    ..Default::default()
                },
            };
            n.matched_index = matched.get(&id).copied().unwrap_or(0);
            n.peer_addr = m.info.peer_addr.unwrap_or_default();
            nodes.push(n);
        }
        let cluster_version = self.node.local(|s| s.cluster_version());
        Ok(pb::ClusterStatusResponse {
            leader_id: local.leader_id,
            term: local.term,
            nodes,
            cluster_version,
        })
    }
}

impl ClusterApi {
    /// Tokens need authentication on: without a token file nothing would check them.
    fn tokens(&self) -> NodeResult<&crate::auth::Tokens> {
        self.node.tokens.as_deref().ok_or_else(|| {
            NodeError::Relayed(Status::failed_precondition(
                "authentication is off on this node: start the nodes with --auth-tokens FILE, \
                 then create tokens",
            ))
        })
    }

    async fn create_token(&self, r: pb::CreateTokenRequest) -> NodeResult<pb::CreateTokenResponse> {
        let file = self.tokens()?;
        let role = Role::parse(&r.role).ok_or_else(|| {
            Rejection::invalid("role", "expected admin, submitter, worker or reader")
        })?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(r.secret_sha256.trim(), &mut digest).map_err(|_| {
            Rejection::invalid(
                "secret_sha256",
                "expected 64 hex digits (the SHA-256 of the secret)",
            )
        })?;
        if file.in_file(&r.name) {
            return Err(Rejection::TokenExists { name: r.name }.into());
        }
        let token = NewToken {
            name: r.name,
            role,
            secret_sha256: digest,
            worker_id_prefix: (!r.worker_id_prefix.is_empty()).then_some(r.worker_id_prefix),
            ttl_ms: (r.ttl_ms > 0).then_some(r.ttl_ms),
        };
        let (_, out) = self.node.write(Op::CreateToken { token }).await?;
        let Output::TokenCreated { token, created } = out else {
            return Err(NodeError::Internal(format!("create token answered {out:?}")));
        };
        Ok(pb::CreateTokenResponse { token: Some(token_info(&token)), created })
    }

    async fn list_tokens(&self) -> NodeResult<pb::ListTokensResponse> {
        let file = self.tokens()?;
        let mut tokens: Vec<pb::TokenInfo> = file
            .file_tokens()
            .map(|c| pb::TokenInfo {
                name: c.name.clone(),
                role: c.role.as_str().into(),
                worker_id_prefix: c.worker_id_prefix.clone().unwrap_or_default(),
                source: "file".into(),
                ..Default::default()
            })
            .collect();
        let replicated = self.node.read(false, |s| s.tokens().map(token_info).collect::<Vec<_>>());
        tokens.extend(replicated.await?);
        Ok(pb::ListTokensResponse { tokens })
    }

    async fn revoke_token(&self, r: pb::RevokeTokenRequest) -> NodeResult<pb::RevokeTokenResponse> {
        if self.tokens()?.in_file(&r.name) {
            return Err(NodeError::Relayed(Status::failed_precondition(format!(
                "token {:?} comes from the token file: remove it from the file on every node \
                 and restart them",
                r.name
            ))));
        }
        self.node.write(Op::RevokeToken { name: r.name }).await?;
        Ok(pb::RevokeTokenResponse {})
    }
}

/// A replicated token as listed.
fn token_info(t: &ApiToken) -> pb::TokenInfo {
    pb::TokenInfo {
        name: t.name.clone(),
        role: t.role.as_str().into(),
        worker_id_prefix: t.worker_id_prefix.clone().unwrap_or_default(),
        created_at_ms: t.created_at,
        expires_at_ms: t.expires_at.unwrap_or(0),
        expired: t.expired_at(raft::node::now_ms()),
        source: "replicated".into(),
    }
}

/// A node id named by a membership request: positive.
/// Bound of one relayed snapshot stream (a follower passing the leader's on).
const SNAPSHOT_STREAM_TIMEOUT: Duration = Duration::from_secs(600);
/// Bytes per streamed snapshot chunk.
const SNAPSHOT_CHUNK: usize = 1 << 20;

impl ClusterApi {
    /// Build a snapshot of everything applied now, open its file, and stream it.
    async fn save_snapshot(&self) -> NodeResult<BoxStream<pb::SnapshotChunk>> {
        let index = self.node.raft.trigger_snapshot(Duration::from_secs(60)).await?;
        let (meta, path) = self
            .node
            .raft
            .sm()
            .current_snapshot()
            .filter(|(m, _)| m.last_log_id.is_some_and(|l| l.index >= index))
            .ok_or_else(|| {
                NodeError::Internal(format!("the snapshot at index {index} is not on disk"))
            })?;
        let io = |e: std::io::Error| NodeError::Internal(format!("{}: {e}", path.display()));
        // Opened now: a newer snapshot may delete the path, never the open file.
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        let last = meta.last_log_id.expect("filtered above");
        // A few chunks in flight: a slow reader holds at most 4 MiB here.
        let (tx, rx) = super::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut first = true;
            loop {
                let mut data = vec![0u8; SNAPSHOT_CHUNK];
                let n = match file.read(&mut data).await {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading: {e}")))).await;
                        return;
                    }
                };
                data.truncate(n);
                let mut chunk = pb::SnapshotChunk { data, ..Default::default() };
                if std::mem::take(&mut first) {
                    (chunk.index, chunk.term, chunk.size) = (last.index, last.leader_id.term, size);
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    return; // the client left
                }
            }
        });
        Ok(rx)
    }
}

/// The field and the reason when a member's address or peer address cannot be stored.
fn member_addrs(addr: &str, peer_addr: &str) -> Result<(), (&'static str, String)> {
    NodeInfo::check_addr("addr", addr).map_err(|e| ("addr", e))?;
    if !peer_addr.is_empty() {
        NodeInfo::check_addr("peer_addr", peer_addr).map_err(|e| ("peer_addr", e))?;
    }
    Ok(())
}

fn member_id(id: u64) -> NodeResult<()> {
    if id == 0 {
        return Err(Rejection::invalid("id", "needs a node id > 0").into());
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterApi {
    async fn init_cluster(
        &self,
        req: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterResponse>, Status> {
        let r = req.into_inner();
        let mut members = BTreeMap::new();
        let mut check = Ok(());
        for (i, m) in r.members.iter().enumerate() {
            if m.id == 0 || m.addr.is_empty() {
                check = Err(Rejection::invalid(
                    format!("members[{i}]"),
                    "needs an id > 0 and an address",
                ));
                break;
            }
            if let Err(e) = member_addrs(&m.addr, &m.peer_addr) {
                check = Err(Rejection::invalid(format!("members[{i}].{}", e.0), e.1));
                break;
            }
            let info = NodeInfo::with_peer(m.addr.clone(), Some(m.peer_addr.clone()));
            if members.insert(m.id, info).is_some() {
                check = Err(Rejection::invalid(
                    format!("members[{i}].id"),
                    format!("id {} appears twice", m.id),
                ));
                break;
            }
        }
        if members.is_empty() && check.is_ok() {
            check = Err(Rejection::invalid("members", "name at least one member"));
        }
        let out = match check {
            Err(e) => Err(e.into()),
            Ok(()) => self
                .node
                .raft
                .initialize(members)
                .await
                .map(|_| pb::InitClusterResponse {})
                .map_err(NodeError::from),
        };
        answer(&self.node, out)
    }

    async fn status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        answer(&self.node, self.status().await)
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::AddLearnerResponse>, Status> {
        let wait = Duration::from_millis(req.get_ref().wait_ms.min(600_000));
        match answer(&self.node, self.route(&req))?.into_inner() {
            Route::Leader(addr) => {
                return self
                    .client(&addr)?
                    .add_learner(Self::forwarded(req, wait + Duration::from_secs(5)))
                    .await
            }
            Route::Here => {}
        }
        let r = req.into_inner();
        let out = if r.id == 0 || r.addr.is_empty() {
            Err(Rejection::invalid(
                "id",
                "needs an id > 0 and an address (--id N --addr HOST:PORT)",
            )
            .into())
        } else if let Err((field, why)) = member_addrs(&r.addr, &r.peer_addr) {
            Err(Rejection::invalid(field, why).into())
        } else {
            let info = NodeInfo::with_peer(r.addr, Some(r.peer_addr));
            match self.node.check_joiner_version(r.id, &info).await {
                Err(e) => Err(e),
                Ok(()) => self
                    .node
                    .raft
                    .add_learner(r.id, info, wait)
                    .await
                    .map(|matched_index| pb::AddLearnerResponse { matched_index })
                    .map_err(NodeError::from),
            }
        };
        answer(&self.node, out)
    }

    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        if let Route::Leader(addr) = answer(&self.node, self.route(&req))?.into_inner() {
            return self
                .client(&addr)?
                .promote(Self::forwarded(req, Duration::from_secs(30)))
                .await;
        }
        let id = req.into_inner().id;
        let out = match member_id(id) {
            Err(e) => Err(e),
            Ok(()) => self.node.raft.promote(id).await.map_err(NodeError::from),
        };
        answer(&self.node, out.map(|_| pb::PromoteResponse {}))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        if let Route::Leader(addr) = answer(&self.node, self.route(&req))?.into_inner() {
            return self
                .client(&addr)?
                .remove_node(Self::forwarded(req, Duration::from_secs(30)))
                .await;
        }
        let id = req.into_inner().id;
        let out = match member_id(id) {
            Err(e) => Err(e),
            Ok(()) => self.node.raft.remove(id).await.map_err(NodeError::from),
        };
        answer(&self.node, out.map(|_| pb::RemoveNodeResponse {}))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        if let Route::Leader(addr) = answer(&self.node, self.route(&req))?.into_inner() {
            return self
                .client(&addr)?
                .transfer_leader(Self::forwarded(req, Duration::from_secs(30)))
                .await;
        }
        let out = crate::leader::transfer::transfer_leader(&self.node, req.into_inner().to).await;
        answer(
            &self.node,
            out.map(|leader_id| pb::TransferLeaderResponse { leader_id }).map_err(NodeError::from),
        )
    }

    async fn trigger_snapshot(
        &self,
        _req: Request<pb::TriggerSnapshotRequest>,
    ) -> Result<Response<pb::TriggerSnapshotResponse>, Status> {
        let out = self.node.raft.trigger_snapshot(Duration::from_secs(60)).await;
        answer(
            &self.node,
            out.map(|snapshot_index| pb::TriggerSnapshotResponse { snapshot_index })
                .map_err(NodeError::from),
        )
    }

    type SaveSnapshotStream = BoxStream<pb::SnapshotChunk>;

    async fn save_snapshot(
        &self,
        req: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<Self::SaveSnapshotStream>, Status> {
        match answer(&self.node, self.route(&req))?.into_inner() {
            Route::Leader(addr) => {
                let relayed = self
                    .client(&addr)?
                    .save_snapshot(Self::forwarded(req, SNAPSHOT_STREAM_TIMEOUT))
                    .await?;
                return Ok(Response::new(Box::pin(relayed.into_inner())));
            }
            Route::Here => {}
        }
        let stream = self.save_snapshot().await;
        answer(&self.node, stream)
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        answer(&self.node, self.create_token(req.into_inner()).await)
    }

    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        answer(&self.node, self.list_tokens().await)
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        answer(&self.node, self.revoke_token(req.into_inner()).await)
    }
}
