//! Raft settings with fast-failover defaults, and their translation to `openraft::Config`.
//!
//! Defaults: heartbeat 30 ms, election timeout 90–150 ms, chosen by measurement (schedctl bench
//! failover, 3 nodes on one 2-core machine): with 50 ms / 150–300 ms a leader SIGKILL took
//! p50 574 ms until the next accepted write, with these 283 ms (max 334 ms), and no spurious
//! election showed up under full load. Failover is about twice the election timeout because
//! openraft 0.9 followers refuse votes for `election_timeout_max` after the last heartbeat
//! (the leader lease) and each node draws its timeout once, so the first candidate usually
//! campaigns twice. openraft 0.9 also uses the heartbeat interval as the AppendEntries RPC
//! timeout, which is why the network cuts each AppendEntries to a byte budget (see
//! [`crate::network`]) and retries a timed-out one at once. Snapshots are built every
//! `snapshot_logs` entries; `keep_logs` entries stay behind a snapshot so slightly lagging
//! followers catch up from the log, not by snapshot.

use openraft::SnapshotPolicy;

use crate::log::LogOptions;
use crate::network::NetOptions;
use crate::sm_store::SmConfig;

/// Everything the raft crate needs to know to run a node.
#[derive(Clone, Debug)]
pub struct RaftSettings {
    /// Leader heartbeat interval (ms); also the AppendEntries timeout in openraft 0.9.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout (ms).
    pub election_min_ms: u64,
    /// Upper bound of the randomized election timeout (ms).
    pub election_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_logs: u64,
    /// Entries kept in the log behind a snapshot.
    pub keep_logs: u64,
    /// Most entries per AppendEntries (the network may send fewer to respect its byte budget).
    pub max_payload_entries: u64,
    /// Snapshot chunk size for InstallSnapshot.
    pub snapshot_chunk_bytes: u64,
    /// Timeout of one InstallSnapshot chunk RPC (ms).
    pub install_snapshot_timeout_ms: u64,
    /// How long a client write may wait for commit before it is answered as unavailable (ms).
    pub write_timeout_ms: u64,
    /// Transport.
    pub net: NetOptions,
    /// Durable log.
    pub log: LogOptions,
    /// State-machine store.
    pub sm: SmConfig,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 30,
            election_min_ms: 90,
            election_max_ms: 150,
            snapshot_logs: 20_000,
            keep_logs: 2_000,
            max_payload_entries: 256,
            snapshot_chunk_bytes: 1 << 20,
            install_snapshot_timeout_ms: 10_000,
            write_timeout_ms: 5_000,
            net: NetOptions::default(),
            log: LogOptions::default(),
            sm: SmConfig::default(),
        }
    }
}

/// A setting openraft refuses.
#[derive(Debug, thiserror::Error)]
#[error("invalid raft settings: {0}")]
pub struct ConfigError(pub String);

impl RaftSettings {
    /// The validated openraft configuration.
    pub fn openraft_config(&self) -> Result<openraft::Config, ConfigError> {
        if self.heartbeat_ms == 0 || self.election_min_ms <= self.heartbeat_ms {
            return Err(ConfigError(format!(
                "the election timeout ({} ms) must exceed the heartbeat interval ({} ms)",
                self.election_min_ms, self.heartbeat_ms
            )));
        }
        let cfg = openraft::Config {
            cluster_name: "raftsched".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: self.max_payload_entries,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs),
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_in_snapshot_log_to_keep: self.keep_logs,
            replication_lag_threshold: self.snapshot_logs.max(self.keep_logs),
            ..Default::default()
        };
        cfg.validate().map_err(|e| ConfigError(e.to_string()))
    }
}
