//! The durable Raft log: append-only segment files with a CRC per record.
//!
//! # Layout
//!
//! A log directory holds:
//!
//! * `seg-<first index, 20 digits>.wal`: segment files, append-only. A segment is named after
//!   the index the log expected next when the segment was created; every entry it holds is
//!   `>=` that index and the entries inside one segment are consecutive, starting at the name.
//! * `vote`: the last saved vote, replaced atomically (`vote.tmp` + fsync + rename + fsync(dir)).
//! * `LOCK`: an `flock`ed file so two stores never write the same directory.
//!
//! Every record, in segments and in the vote file, is framed as
//! `[u32 payload length][u32 crc32 of kind + payload][u8 kind][payload]` (little endian). The
//! payload is postcard. Record kinds:
//!
//! * `header`: the first record of every segment: format version, the segment's first index
//!   and the id of the entry just before it (`prev`). When leading segments have been purged,
//!   the first remaining segment's `prev` is a lower bound of the last purged log id that can
//!   never be lost (see "purge" below).
//! * `entry`: one `openraft::Entry`.
//! * `committed`: the argument of the last `save_committed`. Written without its own fsync; it
//!   becomes durable with the next sync. A lost or stale value only means less re-apply.
//! * `purged`: the last purged log id, fsynced before any segment is deleted, and restated at
//!   the head of every new segment.
//!
//! # Invariants
//!
//! * **No holes.** The entries present in memory (and on disk, above the last purged id) are
//!   consecutive; `last_purged + 1` is the first present entry when something was purged.
//!   `open` refuses a directory that violates this instead of starting with a hole.
//! * **Writes become durable in the order they were issued.** Every write (append, vote,
//!   committed, truncate, purge) goes through one writer thread fed by a channel. Before a write
//!   that touches another file or deletes data, pending appends are fsynced first. Only the last
//!   segment can hold unsynced bytes: rotation syncs the old segment before creating the new one,
//!   so a damaged record anywhere but the tail of the last segment is corruption, not a torn
//!   write.
//! * **openraft's contract.** `append` returns once the entries are readable (written to the
//!   file and indexed in memory, not yet synced); the [`LogFlushed`] callback fires only after
//!   `fdatasync` covered them. One batch = one `pwrite` + one `fdatasync`. Callbacks are never
//!   dropped: a guard reports an error if the writer goes away with one still pending.
//! * **Fail-stop.** After any IO error the store is poisoned: the failing operation reports the
//!   error (openraft then stops the node) and every later operation fails too.
//!
//! # Truncate and purge
//!
//! An append must continue the log: its first entry is the last present one plus one (any
//! index for a log that never held an entry). Entries at or below the purge point are skipped,
//! since a snapshot already covers them; anything else that would leave a hole or overwrite is
//! refused without touching the disk.
//!
//! `truncate(i)` forgets the in-memory entries `>= i`, deletes later segments (newest first, so
//! a crash leaves a prefix), cuts the segment holding `i` at that entry's offset and fsyncs it.
//! The cut may remove `committed`/`purged` records written after entry `i`; they are restated
//! at the new tail, and even if that restatement is lost in a crash the result is only a stale
//! (lower) value: leading segments are only ever deleted by purge, so the first remaining
//! segment's header still bounds the purged id from below and no hole can appear.
//!
//! `purge(id)` writes and fsyncs a `purged` record, then deletes leading segments whose entries
//! are all `<= id.index` (never the segment being appended to), then drops the in-memory index.
//!
//! # Memory
//!
//! An index maps every present log index to its segment, offset, length and leader id, and a
//! cache (bounded in bytes) keeps recently appended decoded entries so replication of fresh
//! entries never touches the disk; older entries are read with positional reads on a blocking
//! thread. Readers ([`LogReader`], cloned into openraft's replication tasks) share this state
//! behind a lock held only for lookups, never across IO. A reader that loses a race with
//! truncate or purge re-checks the index and treats the entry as absent rather than failing.
//!
//! # Recovery
//!
//! `open` scans the segments in order, verifying CRCs, headers and index continuity. An invalid
//! record at the tail of the last segment is a torn write from a crash and is cut away (logged
//! at warn); anywhere else it is corruption and `open` fails naming the file and offset.
//!
//! # Files
//!
//! * `format`: file names, record framing and checksums;
//! * `index`: the in-memory index and cache, and the state shared with readers;
//! * `writer`: the writer thread (group commit, rotation, truncate, purge, vote);
//! * `recover`: the scan on open that cuts a torn tail and detects corruption;
//! * `reader`: [`LogReader`] and its cache and disk reads;
//! * `store`: [`LogStore`], `open`, and the openraft `RaftLogStorage`/`RaftLogReader` impls.
//!
//! [`LogFlushed`]: openraft::storage::LogFlushed

use std::io;
use std::path::PathBuf;

mod format;
mod index;
mod reader;
mod recover;
mod store;
mod writer;

pub use reader::LogReader;
pub use store::LogStore;

/// Tuning of a [`LogStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogOptions {
    /// A new segment is started once the current one reaches this size. A batch is never split,
    /// so a segment may exceed it by one batch. Default 64 MiB.
    pub segment_size: u64,
    /// Upper bound on the encoded size of the recently appended entries kept decoded in memory.
    /// Default 16 MiB: followers normally trail by a few entries, and decoded entries take
    /// several times their encoded size in memory.
    pub cache_bytes: usize,
    /// Upper bound on the encoded size returned by one `limited_get_log_entries` call (used by
    /// replication); at least one entry is always returned. Default 1 MiB.
    pub max_read_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_size: 64 << 20, cache_bytes: 16 << 20, max_read_bytes: 1 << 20 }
    }
}

/// Errors of [`LogStore::open`].
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file system operation failed.
    #[error("log store io error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A record is damaged somewhere a crash cannot explain, or the log has a hole.
    #[error("corrupt log file {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The persisted vote holds a term no honest cluster reaches (above
    /// [`crate::plausible::MAX_STORED_TERM`]): it can only have come from a hostile peer
    /// message accepted by a build without the [`crate::plausible`] checks. Refused at open,
    /// with this error instead of a panic at the next election (where `term + 1` would
    /// overflow). A term cannot safely be lowered (this node may have voted in it), so the
    /// remedy is to re-provision the node: remove it from the cluster, clear its data
    /// directory, add it back as a learner.
    #[error(
        "vote file {path} holds term {term}, beyond the largest plausible term {max}: it came          from a hostile peer message; remove this node from the cluster, clear its data          directory and add it back"
    )]
    ImplausibleVote {
        /// The vote file.
        path: PathBuf,
        /// The term it holds.
        term: u64,
        /// The largest term accepted at open.
        max: u64,
    },
    /// Another open [`LogStore`] (in this or another process) holds the directory.
    #[error("log directory {path} is already in use by another log store")]
    Locked {
        /// The log directory.
        path: PathBuf,
    },
}

/// Counters of a [`LogStore`], for metrics. Monotonic since `open`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// `append` calls.
    pub appends: u64,
    /// Entries appended.
    pub entries: u64,
    /// Bytes of entry records written (framing included).
    pub bytes: u64,
    /// `fdatasync`/`fsync` calls on segment files.
    pub syncs: u64,
    /// Total time spent in those syncs, in microseconds.
    pub sync_micros: u64,
    /// How many syncs took at most [`SYNC_BUCKETS_MICROS`]`[i]` microseconds and more than
    /// the bucket before (the last slot: longer than every bound).
    pub sync_buckets: [u64; SYNC_BUCKETS_MICROS.len() + 1],
}

/// Upper bounds of the sync latency buckets in [`LogStats::sync_buckets`], in microseconds.
pub const SYNC_BUCKETS_MICROS: [u64; 12] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// The bucket of [`LogStats::sync_buckets`] a sync of `micros` falls in.
pub fn sync_bucket(micros: u64) -> usize {
    SYNC_BUCKETS_MICROS.iter().position(|b| micros <= *b).unwrap_or(SYNC_BUCKETS_MICROS.len())
}
