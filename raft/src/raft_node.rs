//! [`RaftNode`]: one member of the cluster — openraft plus our stores and network — with the
//! operations the server needs: writes with one-hop forwarding, linearizable reads, status,
//! membership changes and leader transfer.
//!
//! # Writes
//! [`RaftNode::write`] stamps the leader's clock into the command and proposes it. On a
//! follower the command goes one hop to the leader through the internal `Forward` RPC; the
//! leader proposes it locally and never forwards again, so a request travels at most one hop.
//! With no known leader, or a leader that lost its role meanwhile, the answer is
//! [`WriteError::Unavailable`] with the best leader hint: the outcome is *unknown* and the client
//! retries with the same idempotency key.
//!
//! # Reads
//! [`RaftNode::read_barrier`] makes the next local read linearizable: on the leader via
//! openraft's read-index (`ensure_linearizable`), on a follower by asking the leader for its
//! read index and waiting until the local state has applied it.
//!
//! # Readiness
//! [`RaftNode::readiness`] says whether such a read can be served now: on a leader whose last
//! quorum ack is within an election timeout (the same test that makes a cut-off leader refuse
//! requests at once), or on a follower that heard from its leader within an election timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use proto::internal::v1 as ipb;
use state_machine::{Command, Op, Response, SchedulerState};
use tokio::sync::{mpsc, oneshot};
use tokio::time::error::Elapsed;
use tracing::{info, warn};

use crate::config::{ConfigError, RaftSettings};
use crate::log::{LogError, LogReader, LogStats, LogStore};
use crate::network::{codec, NetworkFactory, Peers};
use crate::sm_store::{SmHandle, SmOpenError, StateMachineStore};
use crate::{NodeId, NodeInfo, Raft};

/// The result of a committed write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// Log index of the entry.
    pub index: u64,
    /// The state machine's response.
    pub response: Response,
}

/// The leader as far as this node knows: id and gRPC address.
pub type LeaderHint = Option<(NodeId, String)>;

/// Why a write or read could not be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// No leader, a forward that failed, a leader change, or no quorum within the write timeout.
    /// The write may or may not have been committed.
    #[error("cluster unavailable: {reason}")]
    Unavailable {
        /// What happened.
        reason: String,
        /// Where the leader probably is.
        leader: LeaderHint,
    },
    /// This node stopped (storage failure or shutdown).
    #[error("node stopped: {0}")]
    Fatal(String),
}

/// Failures starting a node.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log could not be opened.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The state machine could not be opened.
    #[error(transparent)]
    StateMachine(#[from] SmOpenError),
    /// openraft refused to start.
    #[error("raft failed to start: {0}")]
    Raft(String),
}

/// Failures of membership and admin operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// Only the leader does this; the hint says where it is.
    #[error("not the leader")]
    NotLeader {
        /// Where the leader probably is.
        leader: LeaderHint,
    },
    /// The request makes no sense in the current configuration.
    #[error("{0}")]
    Invalid(String),
    /// It did not complete in time or a peer was unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// The node stopped.
    #[error("node stopped: {0}")]
    Fatal(String),
}

/// Leader-local handling of a worker heartbeat: `Ok(draining)` or a gRPC error.
pub type HeartbeatHook = Arc<dyn Fn(&str, u64) -> Result<bool, tonic::Status> + Send + Sync>;

/// Leader-local companions of a proposal: operations that must ride in the same log entry,
/// right after it. The node uses this to assign the tasks a completion releases in the
/// completion's own entry (see `state_machine::plan_after_reports`).
pub trait CompanionHook: Send + Sync {
    /// Whether `op` may have companions; only then is [`Self::plan`] called (it needs the
    /// state's read lock, which an apply in progress holds up).
    fn considers(&self, op: &Op) -> bool;
    /// Operations to propose right after `op`, planned on the current applied state; empty
    /// for none. Runs under the state's read lock: keep it cheap.
    fn plan(&self, state: &SchedulerState, op: &Op) -> Vec<Op>;
    /// The companions' responses once their entry is committed.
    fn committed(&self, responses: &[Response]);
}

/// One member of the cluster. See the module docs.
pub struct RaftNode {
    id: NodeId,
    raft: Raft,
    sm: SmHandle,
    log: LogReader,
    peers: Peers,
    settings: RaftSettings,
    heartbeat: OnceLock<HeartbeatHook>,
    companions: OnceLock<Arc<dyn CompanionHook>>,
    proposals: mpsc::Sender<Proposal>,
}

/// A write waiting for the batcher.
/// Operations that must land in one log entry, in order (usually just one).
struct Proposal {
    ops: Vec<Op>,
    size: usize,
    reply: oneshot::Sender<Result<WrittenGroup, WriteError>>,
}

/// A committed group: the entry's index and one response per operation of the group.
#[derive(Debug)]
struct WrittenGroup {
    /// Log index of the entry.
    pub index: u64,
    /// The state machine's responses, in the order of the operations.
    pub responses: Vec<Response>,
}

/// Most operations in one log entry.
const MAX_BATCH_OPS: usize = 1_024;
/// Most (estimated) bytes in one log entry.
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches proposed but not yet committed at any time.
const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Milliseconds since the Unix epoch: the leader's clock, stamped into commands.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl RaftNode {
    /// Open the stores under `data_dir` and start Raft. A fresh node waits to be initialized
    /// ([`RaftNode::initialize`]) or added by a leader.
    pub async fn start(
        id: NodeId,
        addr: String,
        data_dir: &Path,
        settings: RaftSettings,
    ) -> Result<Arc<RaftNode>, StartError> {
        let config = Arc::new(settings.openraft_config()?);
        let log = LogStore::open(&data_dir.join("raft-log"), settings.log.clone())?;
        let log_reader = log.reader();
        let dir = data_dir.join("state");
        let sm_dir = dir.clone();
        let sm_cfg = settings.sm.clone();
        let sm = tokio::task::spawn_blocking(move || StateMachineStore::open(&sm_dir, &sm_cfg))
            .await
            .map_err(|e| StartError::Raft(e.to_string()))??;
        let handle = sm.handle();
        let peers = Peers::new(settings.net.clone());
        let raft = Raft::new(id, config, NetworkFactory::new(id, peers.clone()), log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        info!(node_id = id, %addr, "raft started");
        let (proposals, rx) = mpsc::channel(16_384);
        tokio::spawn(batcher(raft.clone(), rx, Duration::from_millis(settings.write_timeout_ms)));
        Ok(Arc::new(RaftNode {
            id,
            raft,
            sm: handle,
            log: log_reader,
            peers,
            settings,
            heartbeat: OnceLock::new(),
            companions: OnceLock::new(),
            proposals,
        }))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The openraft handle.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// The state machine.
    pub fn sm(&self) -> &SmHandle {
        &self.sm
    }

    /// The channel pool to peers.
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// Counters of the durable log.
    pub fn log_stats(&self) -> LogStats {
        self.log.stats()
    }

    /// Install the leader-local companion planner (once).
    pub fn set_companion_hook(&self, hook: Arc<dyn CompanionHook>) {
        let _ = self.companions.set(hook);
    }

    /// Install the leader-local heartbeat handler (once).
    pub fn set_heartbeat_hook(&self, hook: HeartbeatHook) {
        let _ = self.heartbeat.set(hook);
    }

    /// True while this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The leader this node knows of, with its address.
    pub fn leader(&self) -> LeaderHint {
        leader_hint(&self.raft)
    }

    /// The stop reason, if openraft stopped with a fatal error (e.g. a storage failure).
    pub fn fatal(&self) -> Option<String> {
        let raft = self.raft.metrics().borrow().running_state.as_ref().err().map(|e| e.to_string());
        raft.or_else(|| self.sm.fatal())
    }

    fn unavailable(&self, reason: impl Into<String>, leader: LeaderHint) -> WriteError {
        WriteError::Unavailable { reason: reason.into(), leader: leader.or_else(|| self.leader()) }
    }

    /// Propose `op`, here if leader, else one hop to the leader.
    ///
    /// If leadership moves while the proposal waits here, the answer is `Unavailable` with the
    /// new leader as hint (the client retries with its idempotency key) rather than a second
    /// forward: a request never travels more than one hop.
    pub async fn write(&self, op: Op) -> Result<Written, WriteError> {
        if !self.is_leader() {
            if let Some((lid, addr)) = self.leader().filter(|(lid, _)| *lid != self.id) {
                return self.forward(&addr, Command::new(0, op), Some((lid, addr.clone()))).await;
            }
        }
        self.propose_local(op).await
    }

    /// Propose on this node only (the leader side of a forward). Concurrent proposals are
    /// grouped into one log entry ([`Op::Batch`]) by the batcher; the leader's clock is
    /// stamped when the entry is proposed.
    ///
    /// A [`CompanionHook`] may add operations that ride in the same entry right after `op`;
    /// the answer is still `op`'s own response.
    pub async fn propose_local(&self, op: Op) -> Result<Written, WriteError> {
        let hook = self.companions.get();
        let mut ops = vec![op];
        if let Some(hook) = hook.filter(|h| h.considers(&ops[0])) {
            ops.extend(self.sm.read(|s| hook.plan(s, &ops[0])));
        }
        let g = self.propose_group(ops).await?;
        let mut responses = g.responses.into_iter();
        let response = responses.next().ok_or_else(|| {
            WriteError::Fatal("the batcher answered a proposal without a response".into())
        })?;
        let rest: Vec<Response> = responses.collect();
        if let (Some(hook), false) = (hook, rest.is_empty()) {
            hook.committed(&rest);
        }
        Ok(Written { index: g.index, response })
    }

    /// Propose several operations on this node that must be applied together, in order, in
    /// one log entry (e.g. a completion and the assignment of the task it releases). The
    /// batcher may put other proposals before or after the group, never inside it.
    async fn propose_group(&self, ops: Vec<Op>) -> Result<WrittenGroup, WriteError> {
        self.check_quorum_contact()?;
        let (reply, rx) = oneshot::channel();
        let size = ops.iter().map(Op::size_hint).sum();
        self.proposals
            .send(Proposal { ops, size, reply })
            .await
            .map_err(|_| WriteError::Fatal("the proposal batcher stopped".into()))?;
        rx.await.map_err(|_| WriteError::Fatal("the proposal batcher stopped".into()))?
    }

    /// A leader that has not heard from a majority for longer than an election timeout is
    /// probably cut off (the others have likely elected a new leader): refuse at once, so the
    /// client tries another node, instead of letting the request wait for the write timeout.
    /// openraft 0.9 keeps such a leader in office until it sees a higher term.
    fn check_quorum_contact(&self) -> Result<(), WriteError> {
        // Copy out the two fields: cloning all metrics would allocate on every request.
        let (state, since_ack) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state, m.millis_since_quorum_ack)
        };
        match quorum_lost(state, since_ack, self.contact_limit_ms()) {
            Some(ms) => Err(WriteError::Unavailable {
                reason: format!(
                    "this leader has not reached a majority for {ms} ms; retry on another node"
                ),
                leader: None,
            }),
            None => Ok(()),
        }
    }

    /// How long a leader may go without a quorum ack, or a follower without word from its
    /// leader, before it counts as cut off: an election timeout (at least three heartbeats).
    fn contact_limit_ms(&self) -> u64 {
        self.settings.election_max_ms.max(3 * self.settings.heartbeat_ms)
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

    /// Propose `op` as an entry of its own (leader loops: their entries stay attributable).
    pub async fn propose_exclusive(&self, op: Op) -> Result<Written, WriteError> {
        let timeout = Duration::from_millis(self.settings.write_timeout_ms);
        let r =
            tokio::time::timeout(timeout, self.raft.client_write(Command::new(now_ms(), op))).await;
        map_write(&self.raft, r).map(|r| Written { index: r.log_id.index, response: r.data })
    }

    async fn forward(
        &self,
        addr: &str,
        cmd: Command,
        hint: LeaderHint,
    ) -> Result<Written, WriteError> {
        let mut client = self.peers.internal_client(addr).map_err(|e| {
            self.unavailable(format!("bad leader address {addr}: {e}"), hint.clone())
        })?;
        let mut req = tonic::Request::new(ipb::ForwardRequest {
            version: codec::VERSION,
            op: Some(ipb::forward_request::Op::Command(codec::encode(&cmd))),
        });
        req.set_timeout(Duration::from_millis(self.settings.write_timeout_ms + 1_000));
        match client.forward(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let response: Response = codec::decode(&r.response).map_err(|e| {
                    self.unavailable(
                        format!("undecodable reply from the leader: {e}"),
                        hint.clone(),
                    )
                })?;
                Ok(Written { index: r.log_index, response })
            }
            Err(s) => {
                Err(self
                    .unavailable(format!("forward to the leader failed: {}", s.message()), hint))
            }
        }
    }

    /// Handle a worker heartbeat: on the leader run the hook, elsewhere forward one hop.
    pub async fn heartbeat(&self, worker: &str, session: u64) -> Result<bool, tonic::Status> {
        if self.is_leader() {
            return self.heartbeat_local(worker, session);
        }
        let Some((_, addr)) = self.leader() else {
            return Err(tonic::Status::unavailable("no leader is known yet"));
        };
        let mut client = self
            .peers
            .internal_client(&addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(ipb::ForwardRequest {
            version: codec::VERSION,
            op: Some(ipb::forward_request::Op::Heartbeat(ipb::Heartbeat {
                worker_id: worker.to_string(),
                session,
            })),
        });
        req.set_timeout(Duration::from_secs(2));
        Ok(client.forward(req).await?.into_inner().draining)
    }

    /// The leader side of a forwarded heartbeat.
    pub fn heartbeat_local(&self, worker: &str, session: u64) -> Result<bool, tonic::Status> {
        if !self.is_leader() {
            return Err(tonic::Status::unavailable("this node is no longer the leader"));
        }
        let hook =
            self.heartbeat.get().ok_or_else(|| tonic::Status::unavailable("node is starting"))?;
        hook(worker, session)
    }

    /// Wait until a local read reflects every write committed before this call.
    pub async fn read_barrier(&self) -> Result<(), WriteError> {
        self.check_quorum_contact()?;
        let timeout = Duration::from_millis(self.settings.write_timeout_ms);
        let index = match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Err(_) => {
                return Err(self.unavailable("read index not confirmed in time (no quorum?)", None))
            }
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                let hint = f.leader_id.zip(f.leader_node.map(|n| n.addr));
                let Some((lid, addr)) = hint.clone() else {
                    return Err(self.unavailable("no leader is known yet", None));
                };
                if lid == self.id {
                    return Err(self.unavailable("leadership is changing", hint));
                }
                let mut client = self
                    .peers
                    .internal_client(&addr)
                    .map_err(|e| self.unavailable(e.to_string(), hint.clone()))?;
                let mut req = tonic::Request::new(ipb::ReadIndexRequest {});
                req.set_timeout(timeout);
                match client.read_index(req).await {
                    Ok(r) => r.into_inner().index,
                    Err(s) => {
                        return Err(self.unavailable(
                            format!("read index from the leader: {}", s.message()),
                            hint,
                        ))
                    }
                }
            }
            Ok(Err(RaftError::APIError(e))) => return Err(self.unavailable(e.to_string(), None)),
            Ok(Err(RaftError::Fatal(f))) => return Err(WriteError::Fatal(f.to_string())),
        };
        self.wait_applied(index, timeout).await
    }

    /// The leader side of a follower's read: confirm leadership, return the read index.
    pub async fn read_index_local(&self) -> Result<u64, WriteError> {
        let timeout = Duration::from_millis(self.settings.write_timeout_ms);
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Err(_) => Err(self.unavailable("read index not confirmed in time", None)),
            Ok(Ok(id)) => Ok(id.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(e))) => Err(self.unavailable(e.to_string(), None)),
            Ok(Err(RaftError::Fatal(f))) => Err(WriteError::Fatal(f.to_string())),
        }
    }

    /// Wait until the local state machine applied `index`.
    async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), WriteError> {
        let mut rx = self.sm.events().subscribe();
        let result = tokio::time::timeout(timeout, rx.wait_for(|applied| *applied >= index))
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

    /// This node's view of itself.
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
        }
    }

    /// Members (id -> address, voter?) of the current configuration.
    pub fn members(&self) -> BTreeMap<NodeId, (String, bool)> {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        mem.nodes().map(|(id, n)| (*id, (n.addr.clone(), voters.contains(id)))).collect()
    }

    /// Replication progress as the leader sees it (id -> matched index).
    pub fn replication(&self) -> BTreeMap<NodeId, u64> {
        let m = self.raft.metrics().borrow().clone();
        m.replication
            .map(|r| r.iter().map(|(id, l)| (*id, l.map_or(0, |l| l.index))).collect())
            .unwrap_or_default()
    }

    fn admin_err<E: std::fmt::Display>(&self, e: RaftError<NodeId, E>) -> AdminError {
        match e {
            RaftError::Fatal(f) => AdminError::Fatal(f.to_string()),
            RaftError::APIError(e) => {
                let text = e.to_string();
                if text.contains("forward request to") || text.contains("has to forward request") {
                    AdminError::NotLeader { leader: self.leader() }
                } else {
                    AdminError::Invalid(text)
                }
            }
        }
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
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), AdminError> {
        if !members.contains_key(&self.id) {
            return Err(AdminError::Invalid(format!(
                "the members must include this node ({})",
                self.id
            )));
        }
        let nodes: BTreeMap<NodeId, NodeInfo> =
            members.iter().map(|(id, addr)| (*id, NodeInfo { addr: addr.clone() })).collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => {
                info!(members = ?members, "cluster initialized");
                Ok(())
            }
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                let current: BTreeMap<NodeId, String> =
                    self.members().into_iter().map(|(id, (addr, _))| (id, addr)).collect();
                if current == members {
                    Ok(())
                } else {
                    Err(AdminError::Invalid(format!(
                        "already initialized with members {current:?}"
                    )))
                }
            }
            Err(e) => Err(self.admin_err(e)),
        }
    }

    /// Add a learner; optionally wait until it has caught up with the leader's log.
    pub async fn add_learner(
        &self,
        id: NodeId,
        addr: String,
        wait: Duration,
    ) -> Result<u64, AdminError> {
        self.require_leader()?;
        let r = self
            .raft
            .add_learner(id, NodeInfo { addr }, false)
            .await
            .map_err(|e| self.admin_err(e))?;
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

    /// Make a learner a voter.
    pub async fn promote(&self, id: NodeId) -> Result<(), AdminError> {
        self.require_leader()?;
        if !self.members().contains_key(&id) {
            return Err(AdminError::Invalid(format!(
                "node {id} is not a member; add it as a learner first"
            )));
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.admin_err(e))?;
        info!(node = id, "promoted to voter");
        Ok(())
    }

    /// Remove a node (voter or learner) from the cluster.
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
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.admin_err(e))?;
        }
        if self.members().contains_key(&id) {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.admin_err(e))?;
        }
        info!(node = id, "removed from the cluster");
        Ok(())
    }

    /// Apply one step of the leader-transfer recipe to this node.
    pub async fn control(&self, op: ipb::control_request::Op) -> Result<(), AdminError> {
        match op {
            ipb::control_request::Op::Heartbeat(on) => self.raft.runtime_config().heartbeat(on),
            ipb::control_request::Op::Elect(on) => self.raft.runtime_config().elect(on),
            ipb::control_request::Op::TriggerElect(_) => {
                self.raft.trigger().elect().await.map_err(|e| AdminError::Fatal(e.to_string()))?
            }
        }
        Ok(())
    }

    async fn control_peer(
        &self,
        addr: &str,
        op: ipb::control_request::Op,
    ) -> Result<(), AdminError> {
        let mut client =
            self.peers.internal_client(addr).map_err(|e| AdminError::Unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(ipb::ControlRequest { op: Some(op) });
        req.set_timeout(Duration::from_secs(2));
        client
            .control(req)
            .await
            .map_err(|s| AdminError::Unavailable(format!("node at {addr}: {}", s.message())))?;
        Ok(())
    }

    async fn control_node(
        &self,
        id: NodeId,
        addr: &str,
        op: ipb::control_request::Op,
    ) -> Result<(), AdminError> {
        if id == self.id {
            self.control(op).await
        } else {
            self.control_peer(addr, op).await
        }
    }

    /// Hand leadership to voter `to` (openraft 0.9 has no transfer call): stop heartbeats here
    /// and elections everywhere but on the target, wait out the leader lease, let the target
    /// campaign, then restore normal operation everywhere.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<NodeId, AdminError> {
        self.require_leader()?;
        if to == self.id {
            return Ok(self.id);
        }
        let members = self.members();
        let Some((target_addr, true)) = members.get(&to).cloned() else {
            return Err(AdminError::Invalid(format!("node {to} is not a voter")));
        };
        use ipb::control_request::Op;
        let result = async {
            for (id, (addr, voter)) in &members {
                if *voter && *id != to {
                    self.control_node(*id, addr, Op::Elect(false)).await?;
                }
            }
            self.raft.runtime_config().heartbeat(false);
            tokio::time::sleep(Duration::from_millis(
                self.settings.election_max_ms + self.settings.heartbeat_ms,
            ))
            .await;
            self.control_peer(&target_addr, Op::TriggerElect(true)).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            loop {
                let m = self.raft.metrics().borrow().clone();
                if m.current_leader == Some(to) {
                    return Ok(to);
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(AdminError::Unavailable(format!(
                        "node {to} did not take over in time"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        .await;
        // Restore normal operation whatever happened.
        self.raft.runtime_config().heartbeat(true);
        for (id, (addr, voter)) in &members {
            if *voter {
                if let Err(e) = self.control_node(*id, addr, Op::Elect(true)).await {
                    warn!(node = id, error = %e, "could not re-enable elections after a leader transfer");
                }
            }
        }
        result
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

    /// Stop Raft (bounded wait) and flush the state machine.
    pub async fn shutdown(&self) {
        match tokio::time::timeout(Duration::from_secs(5), self.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "raft shutdown reported an error"),
            Err(_) => warn!("raft did not shut down within 5 s"),
        }
        let sm = self.sm.clone();
        let _ = tokio::task::spawn_blocking(move || sm.flush()).await;
    }
}

/// The one decision about a leader's contact with its majority: `Some(ms)` when this node is a
/// leader whose last quorum ack is more than `limit_ms` old. Used to refuse requests at once
/// and for readiness.
fn quorum_lost(state: ServerState, since_ack: Option<u64>, limit_ms: u64) -> Option<u64> {
    since_ack.filter(|ms| state == ServerState::Leader && *ms > limit_ms)
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

/// The leader `raft` knows of, with its address.
fn leader_hint(raft: &Raft) -> LeaderHint {
    let m = raft.metrics().borrow().clone();
    let id = m.current_leader?;
    let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())?;
    Some((id, addr))
}

type ClientWriteResponse = openraft::raft::ClientWriteResponse<crate::TypeConfig>;
type WriteResult = Result<
    Result<ClientWriteResponse, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>,
    Elapsed,
>;

/// Map the outcome of a (timed) `client_write` to our error type.
fn map_write(raft: &Raft, r: WriteResult) -> Result<ClientWriteResponse, WriteError> {
    let unavailable = |reason: &str, hint: LeaderHint| WriteError::Unavailable {
        reason: reason.to_string(),
        leader: hint.or_else(|| leader_hint(raft)),
    };
    match r {
        Err(_) => Err(unavailable("the write was not committed in time (no quorum?)", None)),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            let hint = f.leader_id.zip(f.leader_node.map(|n| n.addr));
            Err(unavailable("this node is not the leader", hint))
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            Err(unavailable(&e.to_string(), None))
        }
        Ok(Err(RaftError::Fatal(f))) => Err(WriteError::Fatal(f.to_string())),
    }
}

/// Groups queued proposals into log entries: once one of [`MAX_BATCHES_IN_FLIGHT`] slots is
/// free it takes everything queued (up to the limits), so a batch grows while earlier ones
/// commit. A single operation is proposed as itself, not wrapped.
async fn batcher(raft: Raft, mut rx: mpsc::Receiver<Proposal>, timeout: Duration) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (mut bytes, mut n_ops) = (first.size, first.ops.len());
        let mut batch = vec![first];
        // A group is never split, so an entry may exceed the op limit by one group.
        while n_ops < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.size;
                    n_ops += p.ops.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut ops = Vec::new();
            let mut replies = Vec::with_capacity(batch.len());
            for p in batch {
                replies.push((p.ops.len(), p.reply));
                ops.extend(p.ops);
            }
            let single = ops.len() == 1;
            let op = if single { ops.into_iter().next().expect("one op") } else { Op::Batch(ops) };
            let r =
                tokio::time::timeout(timeout, raft.client_write(Command::new(now_ms(), op))).await;
            let responses = match map_write(&raft, r) {
                Ok(r) if single => Ok((r.log_id.index, vec![r.data])),
                Ok(r) => match r.data {
                    Ok(state_machine::Output::Batch(responses)) if responses.len() == n_ops => {
                        Ok((r.log_id.index, responses))
                    }
                    other => Err(WriteError::Fatal(format!("a batch was answered with {other:?}"))),
                },
                Err(e) => Err(e),
            };
            match responses {
                Ok((index, responses)) => {
                    let mut responses = responses.into_iter();
                    for (n, reply) in replies {
                        let responses = responses.by_ref().take(n).collect();
                        let _ = reply.send(Ok(WrittenGroup { index, responses }));
                    }
                }
                Err(e) => {
                    for (_, reply) in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
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
