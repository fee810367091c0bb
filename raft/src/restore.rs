//! Seeding a new node's data directory from a snapshot file (disaster recovery).
//!
//! A snapshot file (`schedctl snapshot save`, or one a node keeps in `state/snapshots`) holds
//! the whole applied state at one log id and the membership as of it. Restoring puts that state
//! where a node looks for it at start, so the node comes up as if it had installed the snapshot
//! from a leader:
//!
//! 1. The data directory must be empty: restoring over existing data would mix two histories.
//!    The one exception is a directory this same file was restored into before (its marker file
//!    names the file's snapshot), so a service that keeps `--restore` in its command line
//!    restarts normally instead of failing.
//! 2. The file is verified in full ([`crate::snapshot::verify`]): checksum, every record, the
//!    invariants of the state.
//! 3. The membership is either kept (every member of the old cluster is restored from the same
//!    file at its old address, and they elect a leader among themselves) or replaced by this node
//!    alone (`bootstrap`: a one-node cluster that grows with add-learner and promote).
//! 4. The snapshot is written to `state/snapshots`; the state-machine store installs it at open
//!    because its (empty) database is behind it, and openraft treats the log as purged up to
//!    the snapshot's last log id.
//! 5. The vote is seeded with the snapshot's term, so this node's first election runs in a
//!    higher term than any entry it holds: the leader's first entry then sorts after the
//!    snapshot's last log id, as Raft requires.
//!
//! Nothing here touches a running node: it runs before Raft starts.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use openraft::storage::RaftLogStorage;
use openraft::{Membership, StoredMembership, Vote};

use crate::config::RaftSettings;
use crate::log::{LogError, LogStore};
use crate::snapshot::{self, Meta, SnapshotReader, SnapshotWriter};
use crate::{NodeId, NodeInfo};

/// The file in the data directory that records which snapshot it was restored from.
pub const MARKER: &str = "RESTORED_FROM";

/// How the membership of the restored node is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMembership {
    /// Keep the snapshot's membership; this node must be a voter in it at the same address.
    Keep,
    /// This node alone, as a one-node cluster.
    Bootstrap,
}

/// What a restore did.
#[derive(Debug)]
pub enum Restored {
    /// The data directory was seeded from the file.
    Seeded {
        /// The snapshot's metadata, with the membership the node starts with.
        meta: Meta,
        /// Tasks in the restored state.
        tasks: usize,
        /// Registered workers in the restored state.
        workers: usize,
    },
    /// The data directory had already been seeded from this file; nothing was done.
    AlreadyRestored {
        /// The snapshot's metadata as the file holds it.
        meta: Meta,
    },
}

/// Why a restore was refused. Nothing in the data directory changed, except for [`Io`]
/// and [`Log`] failures in the middle of seeding, which leave a directory to remove.
///
/// [`Io`]: RestoreError::Io
/// [`Log`]: RestoreError::Log
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The data directory already holds data.
    #[error(
        "refusing to restore into {dir}: it is not empty (holds {entries}); restore into a \
         new or empty data directory (or remove this one if its data is not needed)"
    )]
    NotEmpty {
        /// The data directory.
        dir: PathBuf,
        /// Some of what it holds, for the message.
        entries: String,
    },
    /// The snapshot file is unreadable, damaged or inconsistent.
    #[error("snapshot file {path} cannot be restored: {source}")]
    BadSnapshot {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: io::Error,
    },
    /// The snapshot holds no applied entry (taken from a cluster that had not started).
    #[error("snapshot file {path} holds no applied log entry: there is nothing to restore")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// Keeping the membership, but this node is not one of its voters.
    #[error(
        "node {id} is not a voter of the snapshot's cluster (voters: {voters:?}); restore \
         each of those nodes with its own id, or pass --bootstrap to start a one-node cluster"
    )]
    NotAMember {
        /// This node's id.
        id: NodeId,
        /// The voters the snapshot names.
        voters: Vec<NodeId>,
    },
    /// Keeping the membership, but the snapshot has this node at another address.
    #[error(
        "the snapshot's cluster has node {id} at {snapshot:?} but this node advertises \
         {ours:?}; restore with the same addresses, or pass --bootstrap to start a one-node \
         cluster at the new address"
    )]
    AddressMismatch {
        /// This node's id.
        id: NodeId,
        /// The address in the snapshot's membership.
        snapshot: String,
        /// This node's address.
        ours: String,
    },
    /// Writing the seeded files failed.
    #[error("restore: {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The Raft log could not be opened or written.
    #[error("restore: {0}")]
    Log(#[from] LogError),
}

/// The marker's text for `meta`: enough to tell the same snapshot file again.
fn marker_text(meta: &Meta) -> String {
    let last = meta.last_log_id.map(|l| format!("{}-{}", l.leader_id.term, l.index));
    format!("snapshot {} last_log_id {}\n", meta.snapshot_id, last.unwrap_or_default())
}

/// Seed `data_dir` from the snapshot at `file` for node `id` reached at `info`. See the
/// module docs for the steps and their order.
pub async fn restore(
    data_dir: &Path,
    file: &Path,
    id: NodeId,
    info: &NodeInfo,
    membership: RestoreMembership,
    settings: &RaftSettings,
) -> Result<Restored, RestoreError> {
    let bad = |source| RestoreError::BadSnapshot { path: file.to_path_buf(), source };
    let io_at = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RestoreError::Io { path, source }
    };

    let entries = match fs::read_dir(data_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_at(data_dir)(e)),
    };
    if !entries.is_empty() {
        // Only the header is read here, so a restart with `--restore` still in the command
        // line costs nothing.
        let (_, meta) = SnapshotReader::open(file).map_err(bad)?;
        let marker = fs::read_to_string(data_dir.join(MARKER)).ok();
        if marker.as_deref() == Some(marker_text(&meta).as_str()) {
            return Ok(Restored::AlreadyRestored { meta });
        }
        let mut shown = entries;
        shown.sort();
        let more = shown.len().saturating_sub(5);
        shown.truncate(5);
        let mut entries = shown.join(", ");
        if more > 0 {
            entries.push_str(&format!(" and {more} more"));
        }
        return Err(RestoreError::NotEmpty { dir: data_dir.to_path_buf(), entries });
    }

    let path = file.to_path_buf();
    let (meta, state) = tokio::task::spawn_blocking(move || snapshot::verify(&path))
        .await
        .map_err(|e| bad(io::Error::other(e.to_string())))?
        .map_err(bad)?;
    let Some(last) = meta.last_log_id else {
        return Err(RestoreError::Empty { path: file.to_path_buf() });
    };
    let (tasks, workers) = (state.task_count(), state.workers().count());
    drop(state);

    let mut seeded = meta.clone();
    match membership {
        RestoreMembership::Keep => {
            let voters: Vec<NodeId> = meta.last_membership.voter_ids().collect();
            if !voters.contains(&id) {
                return Err(RestoreError::NotAMember { id, voters });
            }
            let theirs = meta.last_membership.membership().get_node(&id).cloned();
            if let Some(theirs) = theirs.filter(|t| t != info) {
                return Err(RestoreError::AddressMismatch {
                    id,
                    snapshot: theirs.to_string(),
                    ours: info.to_string(),
                });
            }
        }
        RestoreMembership::Bootstrap => {
            let alone = Membership::new(
                vec![std::collections::BTreeSet::from([id])],
                std::collections::BTreeMap::from([(id, info.clone())]),
            );
            seeded.last_membership = StoredMembership::new(*meta.last_membership.log_id(), alone);
        }
    }

    // The snapshot, under the name the state-machine store gives its own; rewritten when the
    // membership changed (it lives in the header), copied otherwise.
    let snap_dir = data_dir.join("state").join("snapshots");
    fs::create_dir_all(&snap_dir).map_err(io_at(&snap_dir))?;
    let target = snap_dir.join(snapshot::file_name(&seeded));
    let (src, dst, header) = (file.to_path_buf(), target.clone(), seeded.clone());
    let rewrite = membership == RestoreMembership::Bootstrap;
    tokio::task::spawn_blocking(move || write_snapshot(&src, &dst, &header, rewrite))
        .await
        .map_err(|e| io_at(&target)(io::Error::other(e.to_string())))?
        .map_err(io_at(&target))?;
    sync_dir(&snap_dir).map_err(io_at(&snap_dir))?;

    // The vote: this node's first campaign is in a term above every entry it holds.
    {
        let mut log = LogStore::open(&data_dir.join("raft-log"), settings.log.clone())?;
        log.save_vote(&Vote::new(last.leader_id.term, id))
            .await
            .map_err(|e| io_at(&data_dir.join("raft-log"))(io::Error::other(e.to_string())))?;
    }

    let marker = data_dir.join(MARKER);
    fs::write(&marker, marker_text(&meta)).map_err(io_at(&marker))?;
    fs::File::open(&marker).and_then(|f| f.sync_all()).map_err(io_at(&marker))?;
    sync_dir(data_dir).map_err(io_at(data_dir))?;
    Ok(Restored::Seeded { meta: seeded, tasks, workers })
}

/// Copy the snapshot at `src` to `dst` (fsynced), with `header` as its metadata when
/// `rewrite`, byte for byte otherwise.
fn write_snapshot(src: &Path, dst: &Path, header: &Meta, rewrite: bool) -> io::Result<()> {
    if rewrite {
        let (mut reader, _) = SnapshotReader::open(src)?;
        let mut w = SnapshotWriter::create(dst, header)?;
        while let Some((k, v)) = reader.next_record()? {
            w.record(&k, &v)?;
        }
        w.finish()?;
    } else {
        fs::copy(src, dst)?;
    }
    fs::File::open(dst)?.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}
