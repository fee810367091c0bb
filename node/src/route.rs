//! Where a request goes: every node serves every request, and this module decides whether it
//! is answered here or passed on to the leader — one hop at most.
//!
//! * **Writes** ([`Node::write`]): on the leader, proposed here ([`Node::propose_here`], which
//!   adds plan-ahead companions, see [`crate::leader::plan_ahead`]); on a follower that knows
//!   the leader, passed on with `PeerService.Forward`; the leader proposes it with its own clock
//!   and never passes it on again. If leadership moves meanwhile the answer is UNAVAILABLE with
//!   the new hint, never a second hop: the client retries with its idempotency key.
//! * **Reads** ([`Node::read`]): linearizable unless `stale_ok`. The leader confirms its read
//!   index with a quorum; a follower asks the leader for it (`PeerService.ReadIndex`) and waits
//!   until it applied that far, then reads its own state.
//! * **Worker heartbeats** ([`Node::heartbeat`]): leader-local soft state
//!   ([`crate::leader::liveness`]); a follower passes them on (`PeerService.Heartbeat`) and
//!   relays the leader's answer unchanged, so a worker whose session is gone hears it from
//!   whichever node it talks to.
//! * **Cluster administration** ([`Node::admin_route`]): membership changes and transfers run
//!   on the leader; a follower passes the public request on, marked as forwarded
//!   ([`proto::status::FORWARDED_KEY`]) so it never travels twice.
//!
//! * **New submits while a disk is low** ([`crate::disk`]): refused on the node that received
//!   them and again on the leader, before anything is proposed; the leader's refusal is
//!   relayed unchanged to the client (RESOURCE_EXHAUSTED names the leader's disk).
//!
//! Peer calls share the Raft channel pool and carry deadlines; their failures become
//! [`NodeError`]s with the leader hint, mapped to statuses in [`crate::error`].

use std::time::Duration;

use proto::internal::v1 as ipb;
use proto::internal::v1::peer_service_client::PeerServiceClient;
use proto::status::LeaderHint;
use raft::network::codec;
use raft::node::{WriteError, Written};
use state_machine::{Op, Output, Response, SchedulerState};
use tonic::transport::Channel;

use crate::error::{NodeError, NodeResult};
use crate::leader::plan_ahead;
use crate::Node;

/// How long a follower waits for the leader to answer a passed-on heartbeat.
const HEARTBEAT_FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a leader-only administration request must go.
pub enum AdminRoute {
    /// This node leads: handle it here.
    Here,
    /// Pass it on to the leader at this address.
    Leader(String),
}

impl Node {
    /// Propose `op` (passed on to the leader if needed); a rejection becomes an error.
    pub async fn write(&self, op: Op) -> NodeResult<(u64, Output)> {
        let w = self.route_write(op).await?;
        Ok((w.index, w.response?))
    }

    async fn route_write(&self, op: Op) -> NodeResult<Written> {
        if !self.raft.is_leader() {
            if let Some(leader) = self.raft.remote_leader() {
                self.refuse_when_disk_low(&op)?;
                return self.forward(leader, op).await;
            }
        }
        self.propose_here(op).await
    }

    /// Propose `op` on this node (the leader side of a write). Plan-ahead companions ride in
    /// the same log entry right after it; the answer is `op`'s own response.
    pub async fn propose_here(&self, op: Op) -> NodeResult<Written> {
        self.refuse_when_disk_low(&op)?;
        self.ensure_version(&op).await?;
        let mut ops = vec![op];
        if self.cfg.planner.plan_ahead && plan_ahead::considers(&ops[0]) {
            let companions = self.local(|s| plan_ahead::plan(self, s, &ops[0]));
            ops.extend(companions);
        }
        let g = self.raft.propose(ops).await?;
        let mut responses = g.responses.into_iter();
        let response = responses.next().ok_or_else(|| {
            NodeError::Internal("a proposal was answered without a response".into())
        })?;
        let companions: Vec<Response> = responses.collect();
        plan_ahead::committed(self, &companions);
        Ok(Written { index: g.index, response })
    }

    /// New submits are refused while this node's data disk is below its floor; every other
    /// operation passes (they are what lets tasks finish and space be freed).
    fn refuse_when_disk_low(&self, op: &Op) -> NodeResult<()> {
        match (op, self.disk.low()) {
            (Op::Submit { .. }, Some(low)) => Err(low.into()),
            _ => Ok(()),
        }
    }

    async fn forward(&self, leader: LeaderHint, op: Op) -> NodeResult<Written> {
        let mut client = self.peer_of(&leader)?;
        let mut req = tonic::Request::new(ipb::ForwardRequest {
            version: codec::VERSION,
            op: codec::encode(&op),
        });
        req.set_timeout(self.raft.write_timeout() + Duration::from_secs(1));
        let unavailable = |reason: String, leader: LeaderHint| {
            NodeError::from(WriteError::Unavailable { reason, leader: Some(leader) })
        };
        match client.forward(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let response: Response = codec::decode(&r.response).map_err(|e| {
                    unavailable(format!("undecodable reply from the leader: {e}"), leader.clone())
                })?;
                Ok(Written { index: r.log_index, response })
            }
            // A definite refusal (nothing was proposed, e.g. the leader's disk is low): the
            // client hears the leader's own answer, not an ambiguous UNAVAILABLE.
            Err(s) if s.code() == tonic::Code::ResourceExhausted => Err(NodeError::Relayed(s)),
            Err(s) => {
                let hint = proto::status::leader_of(&s).unwrap_or(leader);
                Err(unavailable(format!("forward to the leader failed: {}", s.message()), hint))
            }
        }
    }

    /// Run `f` on the state after a read barrier (skipped when `stale_ok`).
    pub async fn read<R>(
        &self,
        stale_ok: bool,
        f: impl FnOnce(&SchedulerState) -> R,
    ) -> NodeResult<R> {
        if !stale_ok {
            self.read_barrier().await?;
        }
        Ok(self.local(f))
    }

    /// Wait until a local read reflects every write committed before this call.
    pub async fn read_barrier(&self) -> NodeResult<()> {
        let leader = match self.raft.ensure_linearizable().await {
            Ok(_) => return Ok(()),
            // The hint never names this node: raft answers "leadership is changing" then.
            Err(WriteError::NotLeader { leader: Some(l) }) => l,
            Err(WriteError::NotLeader { leader }) => {
                return Err(WriteError::Unavailable {
                    reason: "no leader is known yet".into(),
                    leader,
                }
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        let mut client = self.peer_of(&leader)?;
        let mut req = tonic::Request::new(ipb::ReadIndexRequest {});
        req.set_timeout(self.raft.write_timeout());
        let index = match client.read_index(req).await {
            Ok(r) => r.into_inner().index,
            Err(s) => {
                return Err(WriteError::Unavailable {
                    reason: format!("read index from the leader: {}", s.message()),
                    leader: Some(proto::status::leader_of(&s).unwrap_or(leader)),
                }
                .into())
            }
        };
        Ok(self.raft.wait_applied(index).await?)
    }

    /// Run `f` on this node's current state, without a barrier.
    pub fn local<R>(&self, f: impl FnOnce(&SchedulerState) -> R) -> R {
        self.raft.sm().read(f)
    }

    /// A worker heartbeat: `Ok(draining)`. Handled by the leader (here, or one hop away).
    pub async fn heartbeat(&self, worker: &str, session: u64) -> NodeResult<bool> {
        if self.raft.is_leader() {
            return self.heartbeat_here(worker, session);
        }
        let Some(leader) = self.raft.remote_leader() else {
            return Err(WriteError::Unavailable {
                reason: "no leader is known yet".into(),
                leader: None,
            }
            .into());
        };
        let mut client = self.peer_of(&leader)?;
        let mut req =
            tonic::Request::new(ipb::HeartbeatRequest { worker_id: worker.to_string(), session });
        req.set_timeout(HEARTBEAT_FORWARD_TIMEOUT);
        match client.heartbeat(req).await {
            Ok(r) => Ok(r.into_inner().draining),
            Err(s) => Err(NodeError::Relayed(s)),
        }
    }

    /// The leader side of a heartbeat.
    pub fn heartbeat_here(&self, worker: &str, session: u64) -> NodeResult<bool> {
        if !self.raft.is_leader() {
            return Err(WriteError::Unavailable {
                reason: "this node is no longer the leader".into(),
                leader: self.raft.remote_leader(),
            }
            .into());
        }
        self.local(|s| self.liveness.heartbeat(s, worker, session))
    }

    /// Where a leader-only administration request goes; `forwarded` says whether another node
    /// already passed it on (then it is handled here or refused, never passed on again).
    pub fn admin_route(&self, forwarded: bool) -> NodeResult<AdminRoute> {
        if self.raft.is_leader() {
            return Ok(AdminRoute::Here);
        }
        match self.raft.remote_leader() {
            Some(l) if !forwarded => Ok(AdminRoute::Leader(l.addr)),
            leader => Err(raft::node::AdminError::NotLeader {
                leader: leader.or_else(|| self.raft.leader()),
            }
            .into()),
        }
    }

    /// A channel to the node at `addr`, from the pool Raft uses.
    pub fn channel(&self, addr: &str) -> NodeResult<Channel> {
        self.raft.peers().channel(addr).map_err(|e| {
            NodeError::from(WriteError::Unavailable {
                reason: format!("bad peer address {addr}: {e}"),
                leader: None,
            })
        })
    }

    /// A client of the peer service of the leader in `hint`, at its peer address (the hint
    /// carries the address clients use).
    pub fn peer_of(&self, hint: &LeaderHint) -> NodeResult<PeerServiceClient<Channel>> {
        self.peer(&self.raft.peer_addr(hint.id).unwrap_or_else(|| hint.addr.clone()))
    }

    /// A client of the peer service of the node at `addr`.
    pub fn peer(&self, addr: &str) -> NodeResult<PeerServiceClient<Channel>> {
        let max = self.cfg.raft.net.max_message_bytes;
        Ok(PeerServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max))
    }
}
