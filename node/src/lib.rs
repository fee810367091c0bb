//! # node: `schedulerd`, the raftsched server
//!
//! One gRPC port serves the public API (`scheduler.v1`: [`api::tasks`], [`api::workers`],
//! [`api::cluster`]), the node-to-node services ([`api::peer`]: Raft's RPCs and the peer
//! service), the gRPC health service and reflection; an optional HTTP port serves `/metrics`,
//! `/healthz` (liveness), `/readyz` (readiness), the JSON API `/api/v1` and the dashboard
//! ([`http`]).
//!
//! * Any node serves any request; [`route`] decides where it goes. Writes go through
//!   [`Node::write`]: proposed on the leader (with plan-ahead companions), or passed on one hop
//!   to it. Reads are linearizable ([`Node::read`]) unless the request sets `stale_ok`. Worker
//!   heartbeats reach the leader the same way ([`Node::heartbeat`]).
//! * Leader-only work runs in [`leader`]: the planner (woken by applied changes, many
//!   assignments per log entry) and plan-ahead, worker liveness ([`leader::liveness`]:
//!   heartbeats are leader-local soft state, only expiries reach the log), time-based
//!   transitions, retention and leader transfer. The loops start when this node becomes leader
//!   and stop when it is not.
//! * The `raft` crate below answers only "is it durable and agreed?": propose, read index,
//!   membership, status.
//! * Errors are [`error::NodeError`], mapped to gRPC codes in one table.
//! * [`disk`]: the free-space floor of the data directory; below it new submits are refused
//!   while everything that lets tasks finish keeps working. A storage error (a failed write or
//!   fsync, a full disk) stops the node with a non-zero exit ([`server::run`]).
//! * Resource limits ([`limits`]): connections per port and idle connections ([`conn`]),
//!   server streams and their buffers ([`streams`]), oversized requests.
//! * Configuration: [`config`]; the whole server: [`server::run`].

pub mod api;
pub mod auth;
pub mod config;
pub mod conn;
pub mod disk;
pub mod error;
pub mod http;
pub mod leader;
pub mod limits;
pub mod metrics;
pub mod route;
pub mod rpc_metrics;
pub mod server;
pub mod streams;
pub mod tls;
pub mod version;

use std::sync::Arc;

use raft::node::RaftNode;
use tokio::sync::watch;

use crate::config::Config;

/// Everything the handlers and loops of one node share.
pub struct Node {
    /// The resolved configuration.
    pub cfg: Config,
    /// Consensus and the replicated state.
    pub raft: Arc<RaftNode>,
    /// Leader-local worker heartbeat deadlines.
    pub liveness: leader::liveness::Liveness,
    /// Counters and histograms for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Open server streams and what they hold ([`streams`]).
    pub streams: streams::Streams,
    /// Becomes true when the node shuts down: streams end, loops stop.
    pub stopping: watch::Receiver<bool>,
    /// The accepted tokens; `None`: authentication off.
    pub tokens: Option<Arc<auth::Tokens>>,
    /// Serializes raising the cluster's command version ([`version`]).
    pub version_gate: tokio::sync::Mutex<()>,
    /// Free space of the data directory and the floor for new submits.
    pub disk: disk::DiskGuard,
}
