//! # node: `schedulerd`, the raftsched server
//!
//! One gRPC port serves the public API (`scheduler.v1`: [`api::tasks`], [`api::workers`],
//! [`api::cluster`]), the internal Raft service, the gRPC health service and reflection; an
//! optional HTTP port serves `/metrics`, `/healthz` (liveness) and `/readyz` (readiness) ([`http`]).
//!
//! * Any node serves any request. Writes go through [`Node::write`]: stamped with the
//!   leader's clock and proposed on the leader, or forwarded one hop to it. Reads are
//!   linearizable ([`Node::read`]) unless the request sets `stale_ok`.
//! * Leader-only work runs in [`leader`]: the planner (woken by applied changes, many
//!   assignments per log entry), worker liveness ([`liveness`]: heartbeats are leader-local
//!   soft state, only expiries reach the log), time-based transitions and retention. The loops
//!   start when this node becomes leader and stop when it is not.
//! * Errors are [`error::NodeError`], mapped to gRPC codes in one table.
//! * Configuration: [`config`]; the whole server: [`server::run`].

pub mod api;
pub mod config;
pub mod error;
pub mod http;
pub mod leader;
pub mod liveness;
pub mod metrics;
pub mod server;

use std::sync::Arc;

use raft::raft_node::RaftNode;
use state_machine::{Op, Output, SchedulerState};
use tokio::sync::watch;

use crate::config::Config;
use crate::error::NodeResult;

/// Everything the handlers and loops of one node share.
pub struct Node {
    /// The resolved configuration.
    pub cfg: Config,
    /// Consensus and the replicated state.
    pub raft: Arc<RaftNode>,
    /// Leader-local worker heartbeat deadlines.
    pub liveness: liveness::Liveness,
    /// Counters and histograms for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Becomes true when the node shuts down: streams end, loops stop.
    pub stopping: watch::Receiver<bool>,
}

impl Node {
    /// Propose `op` (forwarded to the leader if needed); a rejection becomes an error.
    pub async fn write(&self, op: Op) -> NodeResult<(u64, Output)> {
        let w = self.raft.write(op).await?;
        Ok((w.index, w.response?))
    }

    /// Run `f` on the state after a read barrier (skipped when `stale_ok`).
    pub async fn read<R>(
        &self,
        stale_ok: bool,
        f: impl FnOnce(&SchedulerState) -> R,
    ) -> NodeResult<R> {
        if !stale_ok {
            self.raft.read_barrier().await?;
        }
        Ok(self.raft.sm().read(f))
    }

    /// Run `f` on this node's current state, without a barrier.
    pub fn local<R>(&self, f: impl FnOnce(&SchedulerState) -> R) -> R {
        self.raft.sm().read(f)
    }
}
