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
//! * [`restore`]: seeding a new node from a snapshot file (disaster recovery);
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
pub mod fault;
pub mod log;
pub mod network;
pub mod node;
mod persister;
pub mod plausible;
pub mod restore;
pub mod service;
pub mod sm_store;
pub mod snapshot;

/// What the cluster knows about a member: where to reach it.
///
/// Stored (in membership log entries and snapshots) as one string, `ADDR` or
/// `ADDR peer=PEER_ADDR`, so membership written before peer ports existed still reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `host:port` of the node's gRPC endpoint for clients (and for peers too, unless
    /// `peer_addr` is set).
    pub addr: String,
    /// `host:port` of its separate peer port (`--peer-listen`), when it has one.
    pub peer_addr: Option<String>,
}

const PEER_MARK: &str = " peer=";

impl NodeInfo {
    /// A member reached on one address.
    pub fn new(addr: impl Into<String>) -> Self {
        NodeInfo { addr: addr.into(), peer_addr: None }
    }

    /// A member with a separate peer address (`None` or empty: none).
    pub fn with_peer(addr: impl Into<String>, peer_addr: Option<String>) -> Self {
        NodeInfo { addr: addr.into(), peer_addr: peer_addr.filter(|p| !p.is_empty()) }
    }

    /// Where other nodes send Raft and peer RPCs.
    pub fn peer(&self) -> &str {
        self.peer_addr.as_deref().unwrap_or(&self.addr)
    }

    /// Why `addr` (or a peer address) cannot be stored, if it cannot: it must be non-empty
    /// and hold no whitespace.
    pub fn check_addr(what: &str, addr: &str) -> Result<(), String> {
        if addr.is_empty() || addr.chars().any(char::is_whitespace) {
            return Err(format!("{what} {addr:?} must be a non-empty host:port without spaces"));
        }
        Ok(())
    }

    fn encoded(&self) -> String {
        match &self.peer_addr {
            Some(p) => format!("{}{PEER_MARK}{p}", self.addr),
            None => self.addr.clone(),
        }
    }

    fn decoded(s: &str) -> NodeInfo {
        match s.split_once(PEER_MARK) {
            Some((addr, peer)) => NodeInfo::with_peer(addr, Some(peer.to_string())),
            None => NodeInfo::new(s),
        }
    }
}

impl Serialize for NodeInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encoded())
    }
}

impl<'de> Deserialize<'de> for NodeInfo {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(NodeInfo::decoded(&s))
    }
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.peer_addr {
            Some(p) => write!(f, "{} (peers: {p})", self.addr),
            None => f.write_str(&self.addr),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_info_reads_the_single_address_form_and_round_trips_a_peer_address() {
        // The form membership had before peer ports: a struct of one string.
        #[derive(Serialize)]
        struct Before {
            addr: String,
        }
        let old = postcard::to_stdvec(&Before { addr: "10.0.0.1:7001".into() }).unwrap();
        let read: NodeInfo = postcard::from_bytes(&old).unwrap();
        assert_eq!(read, NodeInfo::new("10.0.0.1:7001"));
        assert_eq!(read.peer(), "10.0.0.1:7001");
        assert_eq!(postcard::to_stdvec(&read).unwrap(), old, "one address encodes as before");

        let both = NodeInfo::with_peer("10.0.0.1:7001", Some("10.0.0.1:7101".into()));
        let bytes = postcard::to_stdvec(&both).unwrap();
        assert_eq!(postcard::from_bytes::<NodeInfo>(&bytes).unwrap(), both);
        assert_eq!(both.peer(), "10.0.0.1:7101");
        assert_eq!(NodeInfo::with_peer("a:1", Some(String::new())), NodeInfo::new("a:1"));
        assert!(NodeInfo::check_addr("addr", "a:1 peer=b:2").is_err());
        assert!(NodeInfo::check_addr("addr", "").is_err());
    }
}
