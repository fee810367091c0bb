//! Leader-only work. [`supervise`] watches the Raft role: when this node becomes leader (for a
//! term) it resets the leader-local soft state and starts the loops; when it stops being
//! leader it aborts them. Every loop proposes with `propose_exclusive` (its own entry, on this
//! node, never forwarded): a loop on a deposed leader simply fails and is stopped.
//!
//! * [`planner`]: woken by every applied change (and at least every `planner.interval`), runs
//!   the pure [`state_machine::plan`] on the current state and proposes one `Assign` with many
//!   assignments. One planner Assign is in flight at a time, so the next round sees the
//!   previous one applied. [`plan_ahead`] Assigns ride in completion entries meanwhile; a
//!   placement that no longer fits when applied is refused by apply's re-validation, never
//!   double-booked.
//! * [`liveness`]: heartbeat deadlines (leader-local soft state) and the loop that expires
//!   worker sessions whose deadline passed; only the expiry goes to the log.
//! * [`timers`]: proposes `AdvanceTime` when the earliest delayed task or attempt deadline is
//!   due (retry backoff, `not_before`, attempt timeouts).
//! * [`retention`]: purges finished tasks older than `retention.finished_tasks`.
//! * [`transfer`]: hands leadership to another voter (openraft 0.9 has no transfer call).
//!
//! [`plan_ahead`] is the planner's shortcut for dependent steps: a completion that releases
//! dependents is proposed together with their `Assign`, in one entry.

pub mod liveness;
pub mod plan_ahead;
pub mod planner;
pub mod retention;
pub mod timers;
pub mod transfer;

use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use raft::node::WriteError;
use state_machine::{Op, Output};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::Node;

/// Run the leader loops whenever this node leads. Returns when the node stops.
pub async fn supervise(node: Arc<Node>) {
    let mut metrics = node.raft.raft().metrics();
    let mut stopping = node.stopping.clone();
    let mut running: Option<(u64, JoinSet<()>)> = None;
    loop {
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.current_term)
        };
        match (&mut running, leader) {
            (Some((t, _)), true) if *t == term => {}
            (_, true) => {
                if let Some((_, mut set)) = running.take() {
                    set.abort_all();
                }
                info!(node_id = node.raft.id(), term, "became leader; starting leader loops");
                node.liveness.reset();
                let mut set = JoinSet::new();
                set.spawn(planner::run(node.clone()));
                set.spawn(liveness::run(node.clone()));
                set.spawn(timers::run(node.clone()));
                set.spawn(retention::run(node.clone()));
                running = Some((term, set));
            }
            (Some(_), false) => {
                info!(node_id = node.raft.id(), term, "lost leadership; stopping leader loops");
                if let Some((_, mut set)) = running.take() {
                    set.abort_all();
                }
            }
            (None, false) => {}
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { break },
            _ = stopping.wait_for(|s| *s) => break,
        }
    }
    if let Some((_, mut set)) = running.take() {
        set.abort_all();
    }
}

/// Propose on this node; `Err` means "stop this loop" (no longer leader or node stopping).
pub(crate) async fn propose(node: &Node, op: Op) -> Result<Option<Output>, ()> {
    match node.raft.propose_exclusive(op).await {
        Ok(w) => Ok(w.response.ok()),
        Err(WriteError::Fatal(e)) => {
            warn!(node_id = node.raft.id(), error = %e, "leader loop stopped: node failed");
            Err(())
        }
        Err(WriteError::NotLeader { .. }) => Err(()),
        Err(WriteError::Unavailable { reason, .. }) => {
            if node.raft.is_leader() {
                // A slow commit (e.g. a follower is down and the quorum is thin): try again.
                debug!(%reason, "leader proposal not committed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(None)
            } else {
                Err(())
            }
        }
    }
}
