//! Rolling upgrades: the cluster's command version.
//!
//! Every kind of operation has the command version that introduced it
//! ([`state_machine::Op::version`]); the replicated *cluster version* says which kinds every
//! member applies. A node of an older build cannot decode a newer kind, so a leader must never
//! log one while such a node is a member.
//!
//! When the leader is asked for an operation above the cluster version
//! ([`Node::ensure_version`], called for every client write before it is proposed), it asks
//! every member, voters and learners, for the newest version it applies (`NodeStatus`). If all
//! answer with at least the version needed, it proposes [`Op::SetClusterVersion`] with the
//! lowest version they have and then the operation; otherwise the request fails with
//! FAILED_PRECONDITION naming each node that lags or did not answer. Apply refuses a kind above
//! the cluster version as well, so the check cannot be raced; and a node that is somehow asked
//! to apply a kind newer than its own build stops instead of misapplying it.
//!
//! Upgrading is therefore: replace the binary of one node at a time (each restart is a normal
//! crash-recovery), and new kinds of operations become available once the last member runs the
//! new release. `schedctl cluster status` shows each node's version and the cluster's.

use std::time::Duration;

use state_machine::Op;
use tonic::Request;
use tracing::info;

use crate::error::{NodeError, NodeResult};
use crate::Node;

/// How long a member may take to say which version it runs.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// One member's answer.
pub struct MemberStatus {
    /// The member's id.
    pub id: u64,
    /// Its addresses.
    pub info: raft::NodeInfo,
    /// Voter (else learner).
    pub voter: bool,
    /// Its status, or why it could not be had.
    pub reply: Result<proto::internal::v1::NodeStatusReply, String>,
}

impl Node {
    /// The status of every member of the current configuration (this node's own without a
    /// call), asked in parallel, each bounded by `timeout`.
    pub async fn member_statuses(&self, timeout: Duration) -> Vec<MemberStatus> {
        let mut calls = Vec::new();
        for (id, (info, voter)) in self.raft.members() {
            let peer = (id != self.raft.id()).then(|| self.peer(info.peer()));
            calls.push(async move {
                let reply = match peer {
                    None => {
                        let mut s = self.raft.local_status(false);
                        self.disk.fill(&mut s);
                        Ok(s)
                    }
                    Some(Err(e)) => Err(e.to_string()),
                    Some(Ok(mut c)) => {
                        let mut req =
                            Request::new(proto::internal::v1::NodeStatusRequest { digest: false });
                        req.set_timeout(timeout);
                        c.node_status(req)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(|s| s.message().to_string())
                    }
                };
                MemberStatus { id, info, voter, reply }
            });
        }
        futures::future::join_all(calls).await
    }

    /// Make sure the cluster version allows `op` before it is proposed here (the leader side
    /// of a write); raises the version when every member has it. See the module docs.
    pub async fn ensure_version(&self, op: &Op) -> NodeResult<()> {
        let needed = op.version();
        if needed <= self.local(|s| s.cluster_version()) {
            return Ok(());
        }
        // One raise at a time; whoever waited finds it done.
        let _gate = self.version_gate.lock().await;
        let current = self.local(|s| s.cluster_version());
        if needed <= current {
            return Ok(());
        }
        let mut lowest = u32::MAX;
        let mut lagging = Vec::new();
        for m in self.member_statuses(ASK_TIMEOUT).await {
            match m.reply {
                Ok(r) if r.command_version >= needed => lowest = lowest.min(r.command_version),
                Ok(r) if r.command_version == 0 => {
                    lagging.push(format!("node {} runs a release without versions", m.id))
                }
                Ok(r) => lagging.push(format!("node {} runs {}", m.id, r.command_version)),
                Err(e) => lagging.push(format!("node {} did not answer ({e})", m.id)),
            }
        }
        if !lagging.is_empty() {
            return Err(NodeError::Upgrade(format!(
                "{} needs command version {needed} on every member, the cluster runs {current}: \
                 {}; upgrade those nodes (or wait until they are back) and retry",
                op.kind(),
                lagging.join(", ")
            )));
        }
        let version = lowest.min(state_machine::COMMAND_VERSION);
        let g = self.raft.propose(vec![Op::SetClusterVersion { version }]).await?;
        for r in g.responses {
            r?;
        }
        info!(from = current, to = version, "cluster command version raised: every member has it");
        Ok(())
    }

    /// Refuse to add a node that answers with a command version below the cluster's: it would
    /// stop at the first entry it cannot apply. A node that does not answer yet is let in (it
    /// cannot be promoted before it has caught up, which it cannot do without the version).
    pub async fn check_joiner_version(&self, id: u64, info: &raft::NodeInfo) -> NodeResult<()> {
        let current = self.local(|s| s.cluster_version());
        let Ok(mut c) = self.peer(info.peer()) else { return Ok(()) };
        let mut req = Request::new(proto::internal::v1::NodeStatusRequest { digest: false });
        req.set_timeout(ASK_TIMEOUT);
        match c.node_status(req).await {
            Ok(r) if r.get_ref().command_version < current => Err(NodeError::Upgrade(format!(
                "node {id} at {} applies command version {} but the cluster runs {current}: \
                     start it with the cluster's release, then add it",
                info.peer(),
                r.get_ref().command_version
            ))),
            _ => Ok(()),
        }
    }
}
