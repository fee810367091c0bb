//! Leader transfer. openraft 0.9 has no transfer call, so the leader runs a recipe over the
//! peer service's `Control` steps: disable elections on every voter but the target, stop
//! sending heartbeats here, wait out the leader lease, let the target campaign, then restore
//! heartbeats and elections everywhere, whatever happened.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::internal::v1 as ipb;
use proto::internal::v1::control_request::Op as Step;
use raft::node::AdminError;
use raft::{NodeId, NodeInfo};
use tracing::warn;

use crate::Node;

/// How long the target has to take over once it campaigns.
const TAKE_OVER_WITHIN: Duration = Duration::from_secs(3);
/// Deadline of one control step on a peer.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);

/// Apply one step of the recipe to this node (the peer service's `Control`).
pub async fn apply_step(node: &Node, step: Step) -> Result<(), AdminError> {
    match step {
        Step::Heartbeat(on) => node.raft.set_heartbeat(on),
        Step::Elect(on) => node.raft.set_elect(on),
        Step::TriggerElect(_) => node.raft.trigger_elect().await?,
    }
    Ok(())
}

async fn step_on(node: &Node, id: NodeId, addr: &str, step: Step) -> Result<(), AdminError> {
    if id == node.raft.id() {
        return apply_step(node, step).await;
    }
    let mut client = node.peer(addr).map_err(|e| AdminError::Unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(ipb::ControlRequest { op: Some(step) });
    req.set_timeout(STEP_TIMEOUT);
    client
        .control(req)
        .await
        .map_err(|s| AdminError::Unavailable(format!("node {id} at {addr}: {}", s.message())))?;
    Ok(())
}

/// Hand leadership to voter `to`; returns the new leader's id.
pub async fn transfer_leader(node: &Node, to: NodeId) -> Result<NodeId, AdminError> {
    let raft = &node.raft;
    if !raft.is_leader() {
        return Err(AdminError::NotLeader { leader: raft.leader() });
    }
    if to == raft.id() {
        return Ok(to);
    }
    let members: BTreeMap<NodeId, (NodeInfo, bool)> = raft.members();
    let Some((target, true)) = members.get(&to).cloned() else {
        return Err(AdminError::Invalid(format!("node {to} is not a voter")));
    };
    let settings = raft.settings();
    let lease = Duration::from_millis(settings.election_max_ms + settings.heartbeat_ms);
    let result = async {
        for (id, (info, voter)) in &members {
            if *voter && *id != to {
                step_on(node, *id, info.peer(), Step::Elect(false)).await?;
            }
        }
        raft.set_heartbeat(false);
        tokio::time::sleep(lease).await;
        step_on(node, to, target.peer(), Step::TriggerElect(true)).await?;
        let deadline = tokio::time::Instant::now() + TAKE_OVER_WITHIN;
        loop {
            if raft.raft().metrics().borrow().current_leader == Some(to) {
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
    raft.set_heartbeat(true);
    for (id, (info, voter)) in &members {
        if *voter {
            if let Err(e) = step_on(node, *id, info.peer(), Step::Elect(true)).await {
                warn!(node_id = id, error = %e, "could not re-enable elections after a leader transfer");
            }
        }
    }
    result
}
