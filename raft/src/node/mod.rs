//! [`RaftNode`]: one member of the cluster — openraft plus our stores and network — and the
//! questions the server asks of consensus: *is this durable and agreed?* It proposes on this
//! node, confirms reads, changes membership and reports status. It never decides where a
//! request goes: a follower's caller (the `node` crate's router) passes writes, heartbeats and
//! reads on to the leader over its own peer service; this crate only says
//! [`WriteError::NotLeader`] with the best hint it has.
//!
//! * [`propose`]: writes. Concurrent proposals are grouped into one log entry by a batcher
//!   (a group of operations that must land together is never split); the leader's clock is
//!   stamped when the entry is proposed. A leader cut off from its majority refuses at once.
//! * [`read`]: linearizable reads (`ensure_linearizable` on the leader, [`RaftNode::wait_applied`]
//!   on a follower that got the leader's read index) and readiness (`/readyz`, gRPC health).
//! * [`admin`]: initialize, learners, promotion, removal, snapshots and the runtime switches a
//!   leader transfer is built from (openraft 0.9 has no transfer call).
//! * [`quorum`]: whether a membership change keeps a reachable majority (pure).
//! * [`status`]: this node's view of itself, the members and replication progress.
//!
//! openraft's errors are matched by type (`ForwardToLeader`, `ChangeMembershipError`,
//! `InitializeError`), never by their text.

pub mod admin;
pub mod propose;
pub mod quorum;
pub mod read;
pub mod status;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::ServerState;
use proto::status::LeaderHint;
use state_machine::Response;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{ConfigError, RaftSettings};
use crate::log::{LogError, LogReader, LogStats, LogStore};
use crate::network::{NetworkFactory, Peers};
use crate::sm_store::{SmHandle, SmOpenError, StateMachineStore};
use crate::{NodeId, Raft};

pub use admin::AdminError;
pub use read::{NotReady, Ready};
pub use status::role_name;

/// The result of a committed write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// Log index of the entry.
    pub index: u64,
    /// The state machine's response.
    pub response: Response,
}

/// A committed group: the entry's index and one response per operation of the group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenGroup {
    /// Log index of the entry.
    pub index: u64,
    /// The state machine's responses, in the order of the operations.
    pub responses: Vec<Response>,
}

/// Why a write or read could not be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader; `leader` is where it probably is (`None`: no leader known,
    /// e.g. during an election). Nothing was proposed.
    #[error("this node is not the leader")]
    NotLeader {
        /// Where the leader probably is.
        leader: Option<LeaderHint>,
    },
    /// A leader change or no quorum within the write timeout. The write may or may not have
    /// been committed: the client retries with its idempotency key.
    #[error("cluster unavailable: {reason}")]
    Unavailable {
        /// What happened.
        reason: String,
        /// Where the leader probably is.
        leader: Option<LeaderHint>,
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

/// One member of the cluster. See the module docs.
pub struct RaftNode {
    id: NodeId,
    raft: Raft,
    sm: SmHandle,
    log: LogReader,
    peers: Peers,
    settings: RaftSettings,
    proposals: mpsc::Sender<propose::Proposal>,
}

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
        let sm_cfg = settings.sm.clone();
        let sm = tokio::task::spawn_blocking(move || StateMachineStore::open(&dir, &sm_cfg))
            .await
            .map_err(|e| StartError::Raft(e.to_string()))??;
        let handle = sm.handle();
        let peers = Peers::new(settings.net.clone());
        let raft = Raft::new(id, config, NetworkFactory::new(id, peers.clone()), log, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        info!(node_id = id, %addr, "raft started");
        let (proposals, rx) = mpsc::channel(16_384);
        let timeout = Duration::from_millis(settings.write_timeout_ms);
        tokio::spawn(propose::batcher(raft.clone(), rx, timeout));
        Ok(Arc::new(RaftNode { id, raft, sm: handle, log: log_reader, peers, settings, proposals }))
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

    /// The channel pool to peers (shared with the node's own peer service client).
    pub fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The settings this node runs with.
    pub fn settings(&self) -> &RaftSettings {
        &self.settings
    }

    /// How long a write or a read confirmation may take before it counts as unavailable.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.write_timeout_ms)
    }

    /// Counters of the durable log.
    pub fn log_stats(&self) -> LogStats {
        self.log.stats()
    }

    /// True while this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// The leader this node knows of, with its address.
    pub fn leader(&self) -> Option<LeaderHint> {
        leader_hint(&self.raft)
    }

    /// The leader this node knows of if it is another node: where a follower passes requests on.
    pub fn remote_leader(&self) -> Option<LeaderHint> {
        self.leader().filter(|l| l.id != self.id)
    }

    /// The stop reason, if openraft stopped with a fatal error (e.g. a storage failure).
    pub fn fatal(&self) -> Option<String> {
        let raft = self.raft.metrics().borrow().running_state.as_ref().err().map(|e| e.to_string());
        raft.or_else(|| self.sm.fatal())
    }

    /// A storage failure (or a panic) that stopped openraft or the state machine; unlike
    /// [`RaftNode::fatal`], a normal stop is not one.
    pub fn storage_failure(&self) -> Option<String> {
        let raft = match &self.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        raft.or_else(|| self.sm.fatal())
    }

    /// `Unavailable` with `leader`, or the leader this node knows of.
    pub(crate) fn unavailable(
        &self,
        reason: impl Into<String>,
        leader: Option<LeaderHint>,
    ) -> WriteError {
        WriteError::Unavailable { reason: reason.into(), leader: leader.or_else(|| self.leader()) }
    }

    /// Stop Raft and flush the state machine, each within a bounded time. After a storage
    /// failure nothing is flushed (the failed disk would only fail again, or hang); an error
    /// says the node did not stop cleanly.
    pub async fn shutdown(&self) -> Result<(), String> {
        match tokio::time::timeout(Duration::from_secs(5), self.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "raft shutdown reported an error"),
            Err(_) => warn!("raft did not shut down within 5 s"),
        }
        if let Some(e) = self.storage_failure() {
            return Err(e);
        }
        let sm = self.sm.clone();
        let flush = tokio::task::spawn_blocking(move || sm.flush());
        match tokio::time::timeout(Duration::from_secs(10), flush).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(format!("flushing the state machine failed: {e}")),
            Ok(Err(e)) => Err(format!("flushing the state machine failed: {e}")),
            Err(_) => Err("flushing the state machine did not finish within 10 s".into()),
        }
    }
}

/// The leader `raft` knows of, with its address.
fn leader_hint(raft: &Raft) -> Option<LeaderHint> {
    let m = raft.metrics();
    let m = m.borrow();
    let id = m.current_leader?;
    let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())?;
    Some(LeaderHint::new(id, addr))
}

/// The hint in openraft's `ForwardToLeader`, if it names a leader with an address.
fn forward_hint(
    f: &openraft::error::ForwardToLeader<NodeId, crate::NodeInfo>,
) -> Option<LeaderHint> {
    f.leader_id.zip(f.leader_node.as_ref()).map(|(id, n)| LeaderHint::new(id, n.addr.clone()))
}
