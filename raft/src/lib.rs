//! # raft: consensus for raftsched
//!
//! openraft 0.9 (storage-v2) wired to our storage and transport:
//!
//! * [`TypeConfig`]: log payload = [`state_machine::Command`], response =
//!   [`state_machine::Response`], `u64` node ids, [`NodeInfo`] (the node's gRPC address);
//! * [`log`]: the durable Raft log — append-only segment files with a CRC per record and
//!   `fdatasync` before openraft hears that entries are durable (group commit);
//! * [`sm_store`]: the state machine — the pure scheduler state in memory, its changed records
//!   written to sled atomically with `last_applied`; copy-on-write snapshots streamed to files;
//! * [`snapshot`]: the snapshot file format; [`events`]: applied changes for watchers;
//! * [`network`]: openraft's RPCs to peers over `RaftService` (the channel pool is shared
//!   with the `node` crate's peer service); [`service`]: the handlers that answer them, after
//!   [`plausible`] has refused absurd values and strangers;
//! * [`node`]: one cluster member and what the server asks of consensus — propose (batched),
//!   confirm a linearizable read, readiness, membership, snapshots, status;
//! * [`config`]: settings with fast-failover defaults.
//!
//! This crate answers "is it durable and agreed?" and nothing else. Where a request goes
//! (forwarding a follower's write, worker heartbeats, follower reads), leader-side planning and
//! gRPC statuses belong to the `node` crate: here a follower only says `NotLeader` with the
//! best leader hint it has.
//!
//! Storage failures are fatal: the stores report them to openraft, which stops the node, and
//! nothing is acknowledged afterwards.
#![allow(clippy::result_large_err)]

use serde::{Deserialize, Serialize};

pub mod config;
pub mod events;
pub mod log;
pub mod network;
pub mod node;
mod persister;
pub mod plausible;
pub mod service;
pub mod sm_store;
pub mod snapshot;

/// What the cluster knows about a member: where to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host:port` of the node's gRPC endpoint (public API and the node-to-node services).
    pub addr: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// The openraft type configuration of raftsched.
    pub TypeConfig:
        D = state_machine::Command,
        R = state_machine::Response,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Node id type.
pub type NodeId = u64;
/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// openraft's storage error for our config.
pub type StorageError = openraft::StorageError<NodeId>;
