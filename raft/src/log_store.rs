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

use std::collections::{BTreeMap, VecDeque};
use std::fmt::{self, Debug, Display};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AnyError, CommittedLeaderId, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend,
    RaftLogReader, StorageIOError, Vote,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{Entry, NodeId, StorageError, TypeConfig};

const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".wal";
const VOTE_FILE: &str = "vote";
const VOTE_TMP_FILE: &str = "vote.tmp";
const LOCK_FILE: &str = "LOCK";

/// `[u32 len][u32 crc][u8 kind]`.
const FRAME_HEADER: usize = 9;
/// Version written in every segment header; `open` refuses other versions.
const FORMAT_VERSION: u32 = 1;
/// Upper bound on the requests the writer drains into one group commit.
const MAX_GROUP: usize = 256;
/// Upper bound on one coalesced positional read.
const MAX_COALESCED_READ: u64 = 8 << 20;
/// How often a reader re-resolves an entry that moved under it (truncate + re-append).
const READ_ATTEMPTS: usize = 3;

/// Record kinds. The values are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Entry = 1,
    Committed = 2,
    Purged = 3,
    Header = 4,
    Vote = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Entry,
            2 => Kind::Committed,
            3 => Kind::Purged,
            4 => Kind::Header,
            5 => Kind::Vote,
            _ => return None,
        })
    }
}

/// Payload of the first record of every segment.
#[derive(Debug, Serialize, Deserialize)]
struct SegmentHeader {
    version: u32,
    first_index: u64,
    /// Id of the entry before `first_index` when the segment was created.
    prev: Option<LogId<NodeId>>,
}

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

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
}

/// The durable Raft log: implements openraft's [`RaftLogStorage`].
///
/// Dropping it stops the writer thread after it has finished (and synced) the writes already
/// issued, and releases the directory lock; this blocks for at most those writes.
pub struct LogStore {
    dir: PathBuf,
    reader: LogReader,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

/// A cheap, cloneable reader of a [`LogStore`]; openraft clones it into replication tasks.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

// ---------------------------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------------------------

/// A segment file; readers keep an `Arc` so a file deleted by purge stays readable for them.
#[derive(Debug)]
struct Segment {
    first_index: u64,
    path: PathBuf,
    file: File,
}

/// Where an entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    segment: u64,
    offset: u64,
    /// Record length, framing included.
    len: u32,
    leader: CommittedLeaderId<NodeId>,
}

struct State {
    segments: BTreeMap<u64, Arc<Segment>>,
    /// Index of `locs[0]`; meaningless while `locs` is empty.
    first_index: u64,
    locs: VecDeque<Loc>,
    /// A suffix of the present entries, decoded, with their record sizes.
    cache: VecDeque<(Entry, usize)>,
    /// Index of `cache[0]`; meaningless while `cache` is empty.
    cache_first: u64,
    cache_bytes: usize,
    last_purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

impl State {
    fn end_index(&self) -> u64 {
        self.first_index + self.locs.len() as u64
    }

    fn loc(&self, index: u64) -> Option<Loc> {
        if index < self.first_index {
            return None;
        }
        usize::try_from(index - self.first_index).ok().and_then(|i| self.locs.get(i)).copied()
    }

    fn last_log_id(&self) -> Option<LogId<NodeId>> {
        match self.locs.back() {
            Some(loc) => Some(LogId::new(loc.leader, self.end_index() - 1)),
            None => self.last_purged,
        }
    }

    fn push(&mut self, entry: Entry, loc: Loc, cache_limit: usize) {
        let index = entry.log_id.index;
        if self.locs.is_empty() {
            self.first_index = index;
        }
        self.locs.push_back(loc);
        if self.cache.is_empty() {
            self.cache_first = index;
        }
        let size = loc.len as usize;
        self.cache.push_back((entry, size));
        self.cache_bytes += size;
        while self.cache_bytes > cache_limit {
            match self.cache.pop_front() {
                Some((_, size)) => {
                    self.cache_bytes -= size;
                    self.cache_first += 1;
                }
                None => break,
            }
        }
    }

    /// Forgets entries `>= index`.
    fn truncate_from(&mut self, index: u64) {
        let keep = index.saturating_sub(self.first_index);
        self.locs.truncate(usize::try_from(keep).unwrap_or(usize::MAX));
        let keep = index.saturating_sub(self.cache_first);
        let keep = usize::try_from(keep).unwrap_or(usize::MAX);
        while self.cache.len() > keep {
            if let Some((_, size)) = self.cache.pop_back() {
                self.cache_bytes -= size;
            }
        }
    }

    /// Forgets entries `<= index`.
    fn purge_upto(&mut self, index: u64) {
        while !self.locs.is_empty() && self.first_index <= index {
            self.locs.pop_front();
            self.first_index += 1;
        }
        while !self.cache.is_empty() && self.cache_first <= index {
            if let Some((_, size)) = self.cache.pop_front() {
                self.cache_bytes -= size;
            }
            self.cache_first += 1;
        }
    }
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    syncs: AtomicU64,
    sync_micros: AtomicU64,
}

struct Shared {
    state: RwLock<State>,
    poisoned: AtomicBool,
    poison_reason: Mutex<Option<String>>,
    stats: Counters,
    max_read_bytes: usize,
}

impl Shared {
    // A panic while holding the lock cannot leave `State` half-updated in a way that matters
    // more than the panic itself (the writer thread dies and every caller gets an error), so
    // lock poisoning is not propagated.
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn poison(&self, reason: &str) {
        let mut slot = self.poison_reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            tracing::error!(reason, "log store failed; refusing all further operations");
            *slot = Some(reason.to_string());
        }
        self.poisoned.store(true, Ordering::SeqCst);
    }

    fn poison_message(&self) -> Option<String> {
        if !self.poisoned.load(Ordering::SeqCst) {
            return None;
        }
        let slot = self.poison_reason.lock().unwrap_or_else(PoisonError::into_inner);
        Some(format!(
            "log store stopped after an earlier io error: {}",
            slot.as_deref().unwrap_or("unknown")
        ))
    }

    fn check(&self, subject: ErrorSubject<NodeId>, verb: ErrorVerb) -> Result<(), StorageError> {
        match self.poison_message() {
            Some(msg) => Err(storage_error(subject, verb, msg)),
            None => Ok(()),
        }
    }

    fn stats(&self) -> LogStats {
        let s = &self.stats;
        LogStats {
            appends: s.appends.load(Ordering::Relaxed),
            entries: s.entries.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            sync_micros: s.sync_micros.load(Ordering::Relaxed),
        }
    }
}

fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    msg: impl Display,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::error(msg)).into()
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

fn record_crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

/// Appends one framed record to `buf`, returning its length.
fn encode_record<T: Serialize + ?Sized>(
    buf: &mut Vec<u8>,
    kind: Kind,
    value: &T,
) -> Result<usize, String> {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; FRAME_HEADER]);
    *buf = postcard::to_extend(value, std::mem::take(buf))
        .map_err(|e| format!("cannot encode {kind:?} record: {e}"))?;
    let payload_len = buf.len() - start - FRAME_HEADER;
    let len = u32::try_from(payload_len)
        .map_err(|_| format!("{kind:?} record of {payload_len} bytes is too large"))?;
    let crc = record_crc(kind as u8, &buf[start + FRAME_HEADER..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    buf[start + 8] = kind as u8;
    Ok(buf.len() - start)
}

enum Frame<'a> {
    Record { kind: u8, payload: &'a [u8], next: usize },
    End,
    Invalid(&'static str),
}

fn parse_frame(data: &[u8], offset: usize) -> Frame<'_> {
    let rest = &data[offset.min(data.len())..];
    if rest.is_empty() {
        return Frame::End;
    }
    if rest.len() < FRAME_HEADER {
        return Frame::Invalid("truncated record header");
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    let kind = rest[8];
    if len > rest.len() - FRAME_HEADER {
        return Frame::Invalid("record extends past the end of the file");
    }
    let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
    if record_crc(kind, payload) != crc {
        return Frame::Invalid("checksum mismatch");
    }
    Frame::Record { kind, payload, next: offset + FRAME_HEADER + len }
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    postcard::from_bytes(payload).map_err(|e| format!("cannot decode record: {e}"))
}

/// Decodes one entry record (exactly `record`) and checks it is entry `index`.
fn decode_entry_record(record: &[u8], index: u64) -> Result<Entry, String> {
    match parse_frame(record, 0) {
        Frame::Record { kind, payload, next } if next == record.len() => {
            if kind != Kind::Entry as u8 {
                return Err(format!("expected an entry record, found kind {kind}"));
            }
            let entry: Entry = decode(payload)?;
            if entry.log_id.index != index {
                return Err(format!("expected entry {index}, found {}", entry.log_id.index));
            }
            Ok(entry)
        }
        Frame::Record { .. } => Err("record length does not match the index".to_string()),
        Frame::End => Err("record is missing".to_string()),
        Frame::Invalid(reason) => Err(reason.to_string()),
    }
}

fn segment_file_name(first_index: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_index:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn max_by_index(a: Option<LogId<NodeId>>, b: Option<LogId<NodeId>>) -> Option<LogId<NodeId>> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.index > x.index { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

// ---------------------------------------------------------------------------------------------
// Writer thread
// ---------------------------------------------------------------------------------------------

type Reply = oneshot::Sender<Result<(), StorageError>>;

enum Request {
    Append { entries: Vec<Entry>, written: Reply, flushed: Flushed },
    Vote { vote: Vote<NodeId>, done: Reply },
    Committed { committed: Option<LogId<NodeId>>, done: Reply },
    Truncate { since: LogId<NodeId>, done: Reply },
    Purge { upto: LogId<NodeId>, done: Reply },
}

/// Owns an append's callback and reports an error if it is dropped uncalled, so openraft
/// never waits forever.
struct Flushed(Option<LogFlushed<TypeConfig>>);

impl Flushed {
    fn complete(mut self, result: io::Result<()>) {
        if let Some(cb) = self.0.take() {
            cb.log_io_completed(result);
        }
    }
}

impl Drop for Flushed {
    fn drop(&mut self) {
        if let Some(cb) = self.0.take() {
            cb.log_io_completed(Err(io::Error::other(
                "the log writer stopped before these entries were flushed",
            )));
        }
    }
}

/// Why a write request failed.
enum Fault {
    /// An IO error: the store is poisoned.
    Io(String),
    /// The request itself is invalid (e.g. an append that would leave a hole); nothing was
    /// written and the store stays usable.
    Rejected(String),
}

impl Fault {
    fn io(what: impl Display, path: &Path, e: io::Error) -> Fault {
        Fault::Io(format!("{what} {}: {e}", path.display()))
    }

    fn message(&self) -> &str {
        match self {
            Fault::Io(m) | Fault::Rejected(m) => m,
        }
    }
}

/// Writer-side bookkeeping of one segment.
struct SegInfo {
    seg: Arc<Segment>,
    size: u64,
    /// First and last entry physically in the file (purged ones included).
    first_entry: Option<u64>,
    last_entry: Option<u64>,
}

impl SegInfo {
    /// The only index this segment can take next.
    fn next_entry(&self) -> u64 {
        self.last_entry.map_or(self.seg.first_index, |l| l + 1)
    }
}

struct Writer {
    dir: PathBuf,
    dir_file: File,
    _lock: File,
    shared: Arc<Shared>,
    segment_size: u64,
    cache_limit: usize,
    /// Every segment on disk; the last one is the active (appended-to) segment.
    segs: BTreeMap<u64, SegInfo>,
    /// The active segment has bytes not yet covered by a sync.
    dirty: bool,
    /// Callbacks of written appends, waiting for the next sync, in order.
    pending: Vec<Flushed>,
    buf: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Ok(first) = rx.recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(req) => group.push(req),
                    Err(_) => break,
                }
            }
            for req in group.drain(..) {
                self.handle(req);
            }
            // Group commit: one sync covers every append of the group.
            if !self.pending.is_empty() {
                if let Err(fault) = self.barrier() {
                    self.fail(&fault);
                }
            }
        }
        // Orderly shutdown: make trailing `committed` records durable too.
        if self.shared.poison_message().is_none() {
            if let Err(fault) = self.barrier() {
                self.fail(&fault);
            }
        }
        tracing::debug!(dir = %self.dir.display(), "log writer stopped");
    }

    fn handle(&mut self, req: Request) {
        if let Some(msg) = self.shared.poison_message() {
            match req {
                Request::Append { written, flushed, .. } => {
                    flushed.complete(Err(io::Error::other(msg.clone())));
                    let _ =
                        written.send(Err(storage_error(ErrorSubject::Logs, ErrorVerb::Write, msg)));
                }
                Request::Vote { done, .. } => {
                    let _ =
                        done.send(Err(storage_error(ErrorSubject::Vote, ErrorVerb::Write, msg)));
                }
                Request::Committed { done, .. } => {
                    let _ =
                        done.send(Err(storage_error(ErrorSubject::Logs, ErrorVerb::Write, msg)));
                }
                Request::Truncate { since, done } => {
                    let _ = done.send(Err(storage_error(
                        ErrorSubject::Log(since),
                        ErrorVerb::Delete,
                        msg,
                    )));
                }
                Request::Purge { upto, done } => {
                    let _ = done.send(Err(storage_error(
                        ErrorSubject::Log(upto),
                        ErrorVerb::Delete,
                        msg,
                    )));
                }
            }
            return;
        }
        match req {
            Request::Append { entries, written, flushed } => match self.append(entries) {
                Ok(()) => {
                    self.pending.push(flushed);
                    let _ = written.send(Ok(()));
                }
                Err(fault) => {
                    flushed.complete(Err(io::Error::other(fault.message().to_string())));
                    let err = storage_error(ErrorSubject::Logs, ErrorVerb::Write, fault.message());
                    self.fail(&fault);
                    let _ = written.send(Err(err));
                }
            },
            Request::Vote { vote, done } => {
                let result = self.save_vote(&vote);
                self.reply(done, result, ErrorSubject::Vote, ErrorVerb::Write);
            }
            Request::Committed { committed, done } => {
                let result = self.save_committed(committed);
                self.reply(done, result, ErrorSubject::Logs, ErrorVerb::Write);
            }
            Request::Truncate { since, done } => {
                let result = self.truncate(since);
                self.reply(done, result, ErrorSubject::Log(since), ErrorVerb::Delete);
            }
            Request::Purge { upto, done } => {
                let result = self.purge(upto);
                self.reply(done, result, ErrorSubject::Log(upto), ErrorVerb::Delete);
            }
        }
    }

    fn reply(
        &mut self,
        done: Reply,
        result: Result<(), Fault>,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) {
        let result = result.map_err(|fault| {
            let err = storage_error(subject, verb, fault.message());
            self.fail(&fault);
            err
        });
        let _ = done.send(result);
    }

    /// On an IO fault: poison the store and fail every append still waiting for a sync.
    fn fail(&mut self, fault: &Fault) {
        match fault {
            Fault::Io(msg) => {
                self.shared.poison(msg);
                for flushed in self.pending.drain(..) {
                    flushed.complete(Err(io::Error::other(msg.clone())));
                }
            }
            Fault::Rejected(msg) => tracing::error!(reason = %msg, "log write rejected"),
        }
    }

    fn active(&self) -> Option<&SegInfo> {
        self.segs.values().next_back()
    }

    fn active_mut(&mut self) -> Option<&mut SegInfo> {
        self.segs.values_mut().next_back()
    }

    fn fsync_dir(&self) -> Result<(), Fault> {
        self.dir_file.sync_all().map_err(|e| Fault::io("fsync directory", &self.dir, e))
    }

    /// Makes everything written so far durable, then completes the waiting appends in order.
    fn barrier(&mut self) -> Result<(), Fault> {
        if self.dirty {
            if let Some(active) = self.active() {
                let seg = active.seg.clone();
                self.timed_sync(&seg, false)?;
            }
            self.dirty = false;
        }
        for flushed in self.pending.drain(..) {
            flushed.complete(Ok(()));
        }
        Ok(())
    }

    fn timed_sync(&self, seg: &Segment, full: bool) -> Result<(), Fault> {
        let started = Instant::now();
        let result = if full { seg.file.sync_all() } else { seg.file.sync_data() };
        result.map_err(|e| Fault::io("fdatasync", &seg.path, e))?;
        let stats = &self.shared.stats;
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.sync_micros.fetch_add(micros, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `self.buf` at the end of the active segment.
    fn write_buf(&mut self) -> Result<u64, Fault> {
        let buf = std::mem::take(&mut self.buf);
        let result = match self.active_mut() {
            Some(active) => {
                let offset = active.size;
                match active.seg.file.write_all_at(&buf, offset) {
                    Ok(()) => {
                        active.size += buf.len() as u64;
                        Ok(offset)
                    }
                    Err(e) => Err(Fault::io("write", &active.seg.path, e)),
                }
            }
            None => Err(Fault::Rejected("no active segment".to_string())),
        };
        self.buf = buf;
        if result.is_ok() {
            self.dirty = true;
        }
        result
    }

    /// Starts a new segment whose first entry will be `first_index`.
    fn roll(&mut self, first_index: u64) -> Result<(), Fault> {
        // The old segment must be complete on disk before a newer one exists: recovery only
        // forgives damage at the tail of the last segment.
        self.barrier()?;
        let (prev, purged, committed) = {
            let st = self.shared.read();
            (st.last_log_id(), st.last_purged, st.committed)
        };
        let path = self.dir.join(segment_file_name(first_index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Fault::io("create", &path, e))?;
        self.fsync_dir()?;
        let seg = Arc::new(Segment { first_index, path, file });
        self.segs.insert(
            first_index,
            SegInfo { seg: seg.clone(), size: 0, first_entry: None, last_entry: None },
        );
        self.shared.write().segments.insert(first_index, seg.clone());

        // Restate the purge point and the commit point so they live next to the newest data.
        self.buf.clear();
        let header = SegmentHeader { version: FORMAT_VERSION, first_index, prev };
        encode_record(&mut self.buf, Kind::Header, &header).map_err(Fault::Rejected)?;
        if let Some(p) = purged {
            encode_record(&mut self.buf, Kind::Purged, &p).map_err(Fault::Rejected)?;
        }
        if committed.is_some() {
            encode_record(&mut self.buf, Kind::Committed, &committed).map_err(Fault::Rejected)?;
        }
        self.write_buf()?;
        tracing::debug!(segment = %seg.path.display(), first_index, "log segment created");
        Ok(())
    }

    /// Makes sure there is a segment to write a non-entry record to.
    fn ensure_active(&mut self) -> Result<(), Fault> {
        if self.segs.is_empty() {
            let next = self.shared.read().last_log_id().map_or(0, |id| id.index + 1);
            self.roll(next)?;
        }
        Ok(())
    }

    fn append(&mut self, mut entries: Vec<Entry>) -> Result<(), Fault> {
        if let Some(first) = entries.first().map(|e| e.log_id.index) {
            for (i, e) in entries.iter().enumerate() {
                if e.log_id.index != first + i as u64 {
                    return Err(Fault::Rejected(format!(
                        "append batch is not consecutive at position {i}: index {}",
                        e.log_id.index
                    )));
                }
            }
        }
        // Entries at or below the purge point are already covered by a snapshot: keeping them
        // would put entries behind `last_purged`. openraft's storage suite appends such entries
        // after `get_initial_state` purged up to the state machine's last applied id.
        let (expected, purged) = {
            let st = self.shared.read();
            (st.last_log_id().map(|id| id.index + 1), st.last_purged)
        };
        if let Some(p) = purged {
            let covered = entries.iter().take_while(|e| e.log_id.index <= p.index).count();
            if covered > 0 {
                tracing::debug!(count = covered, purged = %p, "skipping appended entries already purged");
                entries.drain(..covered);
            }
        }
        let Some(first) = entries.first().map(|e| e.log_id.index) else {
            self.shared.stats.appends.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        if let Some(expected) = expected {
            if first != expected {
                return Err(Fault::Rejected(format!(
                    "append would leave a hole or overwrite: expected index {expected}, got {first}"
                )));
            }
        }

        let needs_roll = match self.active() {
            None => true,
            Some(a) => {
                a.next_entry() != first || (a.first_entry.is_some() && a.size >= self.segment_size)
            }
        };
        if needs_roll {
            self.roll(first)?;
        }

        self.buf.clear();
        let mut sizes = Vec::with_capacity(entries.len());
        for e in &entries {
            sizes.push(encode_record(&mut self.buf, Kind::Entry, e).map_err(Fault::Rejected)?);
        }
        let total = self.buf.len() as u64;
        let base = self.write_buf()?;
        let last = first + entries.len() as u64 - 1;
        let segment = match self.active_mut() {
            Some(active) => {
                active.first_entry.get_or_insert(first);
                active.last_entry = Some(last);
                active.seg.first_index
            }
            None => return Err(Fault::Rejected("no active segment".to_string())),
        };

        // Publish only after the bytes are in the file, so a reader that misses the cache can
        // always read them back.
        let n = entries.len() as u64;
        {
            let mut st = self.shared.write();
            let mut offset = base;
            for (entry, size) in entries.into_iter().zip(sizes) {
                let loc = Loc {
                    segment,
                    offset,
                    len: u32::try_from(size).unwrap_or(u32::MAX),
                    leader: entry.log_id.leader_id,
                };
                offset += size as u64;
                st.push(entry, loc, self.cache_limit);
            }
        }
        let stats = &self.shared.stats;
        stats.appends.fetch_add(1, Ordering::Relaxed);
        stats.entries.fetch_add(n, Ordering::Relaxed);
        stats.bytes.fetch_add(total, Ordering::Relaxed);
        Ok(())
    }

    fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), Fault> {
        self.ensure_active()?;
        self.buf.clear();
        encode_record(&mut self.buf, Kind::Committed, &committed).map_err(Fault::Rejected)?;
        self.write_buf()?;
        self.shared.write().committed = committed;
        Ok(())
    }

    fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), Fault> {
        // Earlier log writes must not become durable after the vote.
        self.barrier()?;
        let tmp = self.dir.join(VOTE_TMP_FILE);
        let path = self.dir.join(VOTE_FILE);
        self.buf.clear();
        encode_record(&mut self.buf, Kind::Vote, vote).map_err(Fault::Rejected)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Fault::io("create", &tmp, e))?;
        io::Write::write_all(&mut file, &self.buf).map_err(|e| Fault::io("write", &tmp, e))?;
        file.sync_all().map_err(|e| Fault::io("fsync", &tmp, e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| Fault::io("rename to", &path, e))?;
        self.fsync_dir()?;
        self.shared.write().vote = Some(*vote);
        Ok(())
    }

    fn remove_segment(&mut self, first_index: u64) -> Result<(), Fault> {
        if let Some(info) = self.segs.remove(&first_index) {
            self.shared.write().segments.remove(&first_index);
            match fs::remove_file(&info.seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Fault::io("delete", &info.seg.path, e)),
            }
            tracing::debug!(segment = %info.seg.path.display(), "log segment deleted");
        }
        Ok(())
    }

    fn truncate(&mut self, since: LogId<NodeId>) -> Result<(), Fault> {
        self.barrier()?;
        // Never below the first present entry: purged entries are gone already.
        let cut = {
            let mut st = self.shared.write();
            let index = since.index.max(st.first_index);
            match st.loc(index) {
                Some(loc) => {
                    st.truncate_from(index);
                    Some((index, loc))
                }
                None => None,
            }
        };
        let Some((index, loc)) = cut else {
            return Ok(());
        };

        // Newest first, so that a crash in between leaves a prefix of the log.
        let later: Vec<u64> = self.segs.range(loc.segment + 1..).map(|(k, _)| *k).rev().collect();
        for first_index in &later {
            self.remove_segment(*first_index)?;
        }
        if !later.is_empty() {
            self.fsync_dir()?;
        }

        let Some(info) = self.segs.get_mut(&loc.segment) else {
            return Err(Fault::Rejected(format!(
                "segment {} of entry {index} is unknown",
                loc.segment
            )));
        };
        info.seg.file.set_len(loc.offset).map_err(|e| Fault::io("truncate", &info.seg.path, e))?;
        info.size = loc.offset;
        if info.first_entry.is_some_and(|f| f < index) {
            info.last_entry = Some(index - 1);
        } else {
            info.first_entry = None;
            info.last_entry = None;
        }
        let seg = info.seg.clone();

        // The cut may have removed the latest purged/committed records: restate them.
        let (purged, committed) = {
            let st = self.shared.read();
            (st.last_purged, st.committed)
        };
        self.buf.clear();
        if let Some(p) = purged {
            encode_record(&mut self.buf, Kind::Purged, &p).map_err(Fault::Rejected)?;
        }
        if committed.is_some() {
            encode_record(&mut self.buf, Kind::Committed, &committed).map_err(Fault::Rejected)?;
        }
        if !self.buf.is_empty() {
            self.write_buf()?;
        }
        // sync_all: the file size changed.
        self.timed_sync(&seg, true)?;
        self.dirty = false;
        tracing::debug!(since = %since, segment = %seg.path.display(), offset = loc.offset, "log truncated");
        Ok(())
    }

    fn purge(&mut self, upto: LogId<NodeId>) -> Result<(), Fault> {
        if self.shared.read().last_purged.is_some_and(|p| p.index >= upto.index) {
            return Ok(());
        }
        self.ensure_active()?;
        self.buf.clear();
        encode_record(&mut self.buf, Kind::Purged, &upto).map_err(Fault::Rejected)?;
        self.write_buf()?;
        // The purge point is durable before any data goes away.
        self.barrier()?;
        {
            let mut st = self.shared.write();
            st.purge_upto(upto.index);
            st.last_purged = Some(upto);
        }

        // Oldest first, so that a crash in between leaves a suffix; never the active segment.
        let active = self.active().map(|a| a.seg.first_index);
        let dead: Vec<u64> = self
            .segs
            .iter()
            .take_while(|(k, info)| {
                Some(**k) != active && info.last_entry.is_none_or(|l| l <= upto.index)
            })
            .map(|(k, _)| *k)
            .collect();
        for first_index in &dead {
            self.remove_segment(*first_index)?;
        }
        if !dead.is_empty() {
            self.fsync_dir()?;
        }
        tracing::debug!(upto = %upto, deleted_segments = dead.len(), "log purged");
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Open and recovery
// ---------------------------------------------------------------------------------------------

struct Recovered {
    segs: BTreeMap<u64, SegInfo>,
    entries: Vec<(u64, Loc)>,
    last_purged: Option<LogId<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, offset: usize, reason: impl Into<String>) -> LogError {
    LogError::Corrupt { path: path.to_path_buf(), offset: offset as u64, reason: reason.into() }
}

fn lock_dir(dir: &Path) -> Result<File, LogError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LogError::Locked { path: dir.to_path_buf() });
        }
        return Err(LogError::Io { path, source: e });
    }
    Ok(file)
}

fn read_vote_file(dir: &Path) -> Result<Option<Vote<NodeId>>, LogError> {
    let path = dir.join(VOTE_FILE);
    let data = match fs::read(&path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::Io { path, source: e }),
    };
    // The file is replaced by rename after an fsync, so it is never legitimately torn.
    match parse_frame(&data, 0) {
        Frame::Record { kind, payload, next } if next == data.len() && kind == Kind::Vote as u8 => {
            decode(payload).map(Some).map_err(|reason| corrupt(&path, 0, reason))
        }
        Frame::Record { .. } => Err(corrupt(&path, 0, "unexpected content in vote file")),
        Frame::End => Err(corrupt(&path, 0, "vote file is empty")),
        Frame::Invalid(reason) => Err(corrupt(&path, 0, reason)),
    }
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut segments = Vec::new();
    for item in fs::read_dir(dir).map_err(io_err(dir))? {
        let item = item.map_err(io_err(dir))?;
        let name = item.file_name();
        if let Some(first_index) = name.to_str().and_then(parse_segment_file_name) {
            segments.push((first_index, item.path()));
        }
    }
    segments.sort_unstable_by_key(|(first_index, _)| *first_index);
    Ok(segments)
}

/// Scans every segment; cuts a torn tail off the last one. Returns whether files changed.
fn recover(dir: &Path) -> Result<(Recovered, bool), LogError> {
    let listed = list_segments(dir)?;
    let count = listed.len();
    let mut segs = BTreeMap::new();
    let mut entries: Vec<(u64, Loc)> = Vec::new();
    let mut purged: Option<LogId<NodeId>> = None;
    let mut committed: Option<LogId<NodeId>> = None;
    let mut first_prev: Option<Option<LogId<NodeId>>> = None;
    let mut changed = false;

    for (pos, (name, path)) in listed.into_iter().enumerate() {
        let is_last = pos + 1 == count;
        let data = fs::read(&path).map_err(io_err(&path))?;
        let mut offset = 0usize;
        let mut header: Option<SegmentHeader> = None;
        let mut next_index = name;
        let mut first_entry = None;
        let mut last_entry = None;
        let mut torn: Option<&'static str> = None;

        loop {
            let (kind, payload, next) = match parse_frame(&data, offset) {
                Frame::End => break,
                Frame::Invalid(reason) if is_last => {
                    torn = Some(reason);
                    break;
                }
                Frame::Invalid(reason) => return Err(corrupt(&path, offset, reason)),
                Frame::Record { kind, payload, next } => (kind, payload, next),
            };
            // A record with a valid checksum but wrong content is never a torn write.
            let kind = Kind::from_u8(kind)
                .ok_or_else(|| corrupt(&path, offset, format!("unknown record kind {kind}")))?;
            match (kind, header.is_some()) {
                (Kind::Header, false) => {
                    let h: SegmentHeader =
                        decode(payload).map_err(|reason| corrupt(&path, offset, reason))?;
                    if h.version != FORMAT_VERSION {
                        return Err(corrupt(
                            &path,
                            offset,
                            format!("unsupported format version {}", h.version),
                        ));
                    }
                    if h.first_index != name {
                        return Err(corrupt(
                            &path,
                            offset,
                            format!(
                                "header says first index {}, file name says {name}",
                                h.first_index
                            ),
                        ));
                    }
                    header = Some(h);
                }
                (_, false) => {
                    return Err(corrupt(&path, offset, "segment does not start with a header"))
                }
                (Kind::Entry, true) => {
                    // Only the log id prefix is decoded here; entries are fully decoded on read.
                    let (log_id, _): (LogId<NodeId>, _) = postcard::take_from_bytes(payload)
                        .map_err(|e| corrupt(&path, offset, format!("cannot decode entry: {e}")))?;
                    if log_id.index != next_index {
                        return Err(corrupt(
                            &path,
                            offset,
                            format!("expected entry index {next_index}, found {}", log_id.index),
                        ));
                    }
                    let loc = Loc {
                        segment: name,
                        offset: offset as u64,
                        len: u32::try_from(next - offset).unwrap_or(u32::MAX),
                        leader: log_id.leader_id,
                    };
                    entries.push((log_id.index, loc));
                    first_entry.get_or_insert(log_id.index);
                    last_entry = Some(log_id.index);
                    next_index += 1;
                }
                (Kind::Committed, true) => {
                    committed = decode(payload).map_err(|reason| corrupt(&path, offset, reason))?;
                }
                (Kind::Purged, true) => {
                    let p: LogId<NodeId> =
                        decode(payload).map_err(|reason| corrupt(&path, offset, reason))?;
                    purged = max_by_index(purged, Some(p));
                }
                (Kind::Header, true) => {
                    return Err(corrupt(&path, offset, "second segment header"))
                }
                (Kind::Vote, true) => {
                    return Err(corrupt(&path, offset, "vote record in a segment"))
                }
            }
            offset = next;
        }

        let Some(header) = header else {
            if !is_last {
                return Err(corrupt(&path, 0, "segment has no valid header"));
            }
            // A segment whose creation was interrupted: nothing in it was ever acknowledged.
            tracing::warn!(segment = %path.display(), size = data.len(), "removing incomplete log segment left by a crash");
            fs::remove_file(&path).map_err(io_err(&path))?;
            changed = true;
            continue;
        };
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
        if let Some(reason) = torn {
            tracing::warn!(
                segment = %path.display(),
                offset,
                dropped_bytes = data.len() - offset,
                reason,
                "cutting torn write off the tail of the log"
            );
            file.set_len(offset as u64).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
        }
        if first_prev.is_none() {
            first_prev = Some(header.prev);
        }
        let seg = Arc::new(Segment { first_index: name, path, file });
        segs.insert(name, SegInfo { seg, size: offset as u64, first_entry, last_entry });
    }

    // Segments are only deleted from the front by purge, so whatever preceded the first
    // remaining segment was purged, even if the purged record itself was cut by a truncate.
    let last_purged = max_by_index(purged, first_prev.flatten());
    Ok((Recovered { segs, entries, last_purged, committed }, changed))
}

impl LogStore {
    /// Opens (creating if needed) the log in `dir`, recovering from a crash if necessary, and
    /// starts its writer thread.
    ///
    /// Blocking: call it before starting the runtime or from `spawn_blocking`.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<LogStore, LogError> {
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        if created {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent).map_err(io_err(parent))?;
            }
        }
        let dir_file = File::open(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir)?;

        let tmp = dir.join(VOTE_TMP_FILE);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::Io { path: tmp, source: e }),
        }
        let vote = read_vote_file(dir)?;
        let (recovered, changed) = recover(dir)?;
        if changed {
            dir_file.sync_all().map_err(io_err(dir))?;
        }
        let Recovered { segs, entries, last_purged, mut committed } = recovered;

        // Present entries are those above the purge point; they must be consecutive.
        let mut state = State {
            segments: segs.iter().map(|(k, info)| (*k, info.seg.clone())).collect(),
            first_index: 0,
            locs: VecDeque::new(),
            cache: VecDeque::new(),
            cache_first: 0,
            cache_bytes: 0,
            last_purged,
            vote,
            committed: None,
        };
        let mut expected = last_purged.map(|p| p.index + 1);
        for (index, loc) in entries {
            if last_purged.is_some_and(|p| index <= p.index) {
                continue;
            }
            if let Some(expected) = expected {
                if index != expected {
                    let path =
                        segs.get(&loc.segment).map(|i| i.seg.path.clone()).unwrap_or_default();
                    return Err(corrupt(
                        &path,
                        loc.offset as usize,
                        format!("hole in the log: expected entry {expected}, found {index}"),
                    ));
                }
            }
            if state.locs.is_empty() {
                state.first_index = index;
            }
            state.locs.push_back(loc);
            expected = Some(index + 1);
        }
        let last_log_id = state.last_log_id();
        if committed.is_some_and(|c| last_log_id.is_none_or(|l| c.index > l.index)) {
            // Never claim more was committed than the log holds; a lower value is always safe.
            tracing::warn!(committed = ?committed, last_log_id = ?last_log_id, "ignoring committed id beyond the end of the log");
            committed = None;
        }
        state.committed = committed;

        tracing::info!(
            dir = %dir.display(),
            segments = segs.len(),
            entries = state.locs.len(),
            last_purged = ?last_purged,
            last_log_id = ?last_log_id,
            committed = ?committed,
            vote = ?vote,
            "log store opened"
        );

        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(None),
            stats: Counters::default(),
            max_read_bytes: opts.max_read_bytes.max(1),
        });
        let writer = Writer {
            dir: dir.to_path_buf(),
            dir_file,
            _lock: lock,
            shared: shared.clone(),
            segment_size: opts.segment_size,
            cache_limit: opts.cache_bytes,
            segs,
            dirty: false,
            pending: Vec::new(),
            buf: Vec::new(),
        };
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("raft-log-writer".to_string())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        Ok(LogStore {
            dir: dir.to_path_buf(),
            reader: LogReader { shared },
            tx: Some(tx),
            writer: Some(handle),
        })
    }

    /// A reader sharing this store's state.
    pub fn reader(&self) -> LogReader {
        self.reader.clone()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> LogStats {
        self.reader.shared.stats()
    }

    fn shared(&self) -> &Shared {
        &self.reader.shared
    }

    fn send(&self, req: Request) -> Result<(), Request> {
        match &self.tx {
            Some(tx) => tx.send(req).map_err(|e| e.0),
            None => Err(req),
        }
    }

    /// Sends a request answered by a single reply and waits for it.
    async fn call(
        &self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
        make: impl FnOnce(Reply) -> Request,
    ) -> Result<(), StorageError> {
        self.shared().check(subject.clone(), verb)?;
        let (tx, rx) = oneshot::channel();
        if self.send(make(tx)).is_err() {
            return Err(storage_error(subject, verb, "the log writer is not running"));
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(storage_error(subject, verb, "the log writer stopped")),
        }
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what was issued, sync and exit.
        self.tx.take();
        if let Some(handle) = self.writer.take() {
            if handle.join().is_err() {
                tracing::error!(dir = %self.dir.display(), "log writer thread panicked");
            }
        }
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").field("dir", &self.dir).finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

struct DiskRead {
    index: u64,
    loc: Loc,
    segment: Arc<Segment>,
}

fn read_record(segment: &Segment, loc: Loc, index: u64) -> Result<Entry, String> {
    let mut buf = vec![0u8; loc.len as usize];
    segment.file.read_exact_at(&mut buf, loc.offset).map_err(|e| format!("read failed: {e}"))?;
    decode_entry_record(&buf, index)
}

impl LogReader {
    /// Counters for metrics (the same as [`LogStore::stats`]).
    pub fn stats(&self) -> LogStats {
        self.shared.stats()
    }

    /// The committed log id last saved by openraft (for status output; may lag the leader).
    pub fn committed(&self) -> Option<LogId<NodeId>> {
        self.shared.read().committed
    }

    async fn read_range(
        &self,
        start: u64,
        end: u64,
        byte_limit: Option<usize>,
    ) -> Result<Vec<Entry>, StorageError> {
        self.shared.check(ErrorSubject::Logs, ErrorVerb::Read)?;
        let mut disk = Vec::new();
        let mut cached = Vec::new();
        {
            let st = self.shared.read();
            let lo = start.max(st.first_index);
            let hi = end.min(st.end_index());
            let mut bytes = 0usize;
            for index in lo..hi {
                let Some(loc) = st.loc(index) else { break };
                if let Some(limit) = byte_limit {
                    if index > lo && bytes + loc.len as usize > limit {
                        break;
                    }
                }
                bytes += loc.len as usize;
                if !st.cache.is_empty() && index >= st.cache_first {
                    match usize::try_from(index - st.cache_first).ok().and_then(|i| st.cache.get(i))
                    {
                        Some((entry, _)) => cached.push(entry.clone()),
                        None => break,
                    }
                } else {
                    let Some(segment) = st.segments.get(&loc.segment).cloned() else { break };
                    disk.push(DiskRead { index, loc, segment });
                }
            }
        }
        if disk.is_empty() {
            return Ok(cached);
        }
        let shared = self.shared.clone();
        let job = move || read_from_disk(&shared, disk);
        let mut entries = match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle.spawn_blocking(job).await.map_err(|e| {
                storage_error(
                    ErrorSubject::Logs,
                    ErrorVerb::Read,
                    format!("log read task failed: {e}"),
                )
            })??,
            Err(_) => job()?,
        };
        entries.extend(cached);
        // A race with truncate/purge may have removed some entries; return a gap-free run.
        let keep = entries
            .windows(2)
            .position(|w| w[1].log_id.index != w[0].log_id.index + 1)
            .map_or(entries.len(), |p| p + 1);
        entries.truncate(keep);
        Ok(entries)
    }
}

/// Reads entries from segment files, coalescing adjacent records into one positional read.
fn read_from_disk(shared: &Shared, items: Vec<DiskRead>) -> Result<Vec<Entry>, StorageError> {
    let mut out = Vec::with_capacity(items.len());
    let mut i = 0;
    while i < items.len() {
        let start = items[i].loc.offset;
        let mut end = start + u64::from(items[i].loc.len);
        let mut j = i + 1;
        while j < items.len()
            && Arc::ptr_eq(&items[j].segment, &items[i].segment)
            && items[j].loc.offset == end
            && end - start < MAX_COALESCED_READ
        {
            end += u64::from(items[j].loc.len);
            j += 1;
        }
        let mut buf = vec![0u8; (end - start) as usize];
        let read_ok = items[i].segment.file.read_exact_at(&mut buf, start).is_ok();
        for item in &items[i..j] {
            let decoded = if read_ok {
                let from = (item.loc.offset - start) as usize;
                decode_entry_record(&buf[from..from + item.loc.len as usize], item.index)
            } else {
                Err("read failed".to_string())
            };
            match decoded {
                Ok(entry) => out.push(entry),
                Err(reason) => {
                    if let Some(entry) = reread(shared, item, reason)? {
                        out.push(entry);
                    }
                }
            }
        }
        i = j;
    }
    Ok(out)
}

/// A read failed: the entry may have been truncated or purged (and its file cut or deleted)
/// after it was looked up. Re-resolve it; only a failure at a stable location is corruption.
fn reread(shared: &Shared, item: &DiskRead, reason: String) -> Result<Option<Entry>, StorageError> {
    let (mut loc, mut segment, mut reason) = (item.loc, item.segment.clone(), reason);
    for _ in 0..READ_ATTEMPTS {
        let current = {
            let st = shared.read();
            st.loc(item.index).and_then(|l| st.segments.get(&l.segment).map(|s| (l, s.clone())))
        };
        let Some((now_loc, now_segment)) = current else {
            return Ok(None);
        };
        if now_loc == loc && Arc::ptr_eq(&now_segment, &segment) {
            break;
        }
        (loc, segment) = (now_loc, now_segment);
        match read_record(&segment, loc, item.index) {
            Ok(entry) => return Ok(Some(entry)),
            Err(r) => reason = r,
        }
    }
    let msg = format!(
        "cannot read log entry {} from {} at offset {}: {reason}",
        item.index,
        segment.path.display(),
        loc.offset
    );
    shared.poison(&msg);
    Err(storage_error(ErrorSubject::LogIndex(item.index), ErrorVerb::Read, msg))
}

fn range_to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(x) => *x,
        Bound::Excluded(x) => x.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(x) => x.saturating_add(1),
        Bound::Excluded(x) => *x,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = range_to_bounds(&range);
        self.read_range(start, end, None).await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_range(start, end, Some(self.shared.max_read_bytes)).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.reader.try_get_log_entries(range).await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.reader.limited_get_log_entries(start, end).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.shared().check(ErrorSubject::Logs, ErrorVerb::Read)?;
        let st = self.shared().read();
        Ok(LogState { last_purged_log_id: st.last_purged, last_log_id: st.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = *vote;
        self.call(ErrorSubject::Vote, ErrorVerb::Write, |done| Request::Vote { vote, done }).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.shared().check(ErrorSubject::Vote, ErrorVerb::Read)?;
        Ok(self.shared().read().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        self.call(ErrorSubject::Logs, ErrorVerb::Write, |done| Request::Committed {
            committed,
            done,
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        self.shared().check(ErrorSubject::Logs, ErrorVerb::Read)?;
        Ok(self.shared().read().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let flushed = Flushed(Some(callback));
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Err(e) = self.shared().check(ErrorSubject::Logs, ErrorVerb::Write) {
            flushed.complete(Err(io::Error::other(e.to_string())));
            return Err(e);
        }
        let (written, rx) = oneshot::channel();
        // On a send failure the request (and with it the callback guard) is dropped, which
        // reports the error to openraft.
        if self.send(Request::Append { entries, written, flushed }).is_err() {
            return Err(storage_error(
                ErrorSubject::Logs,
                ErrorVerb::Write,
                "the log writer is not running",
            ));
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => {
                Err(storage_error(ErrorSubject::Logs, ErrorVerb::Write, "the log writer stopped"))
            }
        }
    }

    async fn truncate(&mut self, since: LogId<NodeId>) -> Result<(), StorageError> {
        self.call(ErrorSubject::Log(since), ErrorVerb::Delete, |done| Request::Truncate {
            since,
            done,
        })
        .await
    }

    async fn purge(&mut self, upto: LogId<NodeId>) -> Result<(), StorageError> {
        self.call(ErrorSubject::Log(upto), ErrorVerb::Delete, |done| Request::Purge { upto, done })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::EntryPayload;

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(state_machine::Command::new(
                7,
                state_machine::Op::Cancel { ids: vec![], reason: "x".repeat(40) },
            )),
        }
    }

    #[test]
    fn frame_round_trip_and_damage() {
        let mut buf = Vec::new();
        let e = entry(3, 42);
        let len = encode_record(&mut buf, Kind::Entry, &e).unwrap();
        assert_eq!(len, buf.len());
        let back = decode_entry_record(&buf, 42).unwrap();
        assert_eq!(back.log_id, e.log_id);
        assert!(decode_entry_record(&buf, 43).is_err(), "wrong index must be rejected");

        let mut damaged = buf.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        assert!(matches!(parse_frame(&damaged, 0), Frame::Invalid("checksum mismatch")));
        assert!(matches!(parse_frame(&buf[..buf.len() - 1], 0), Frame::Invalid(_)));
        assert!(matches!(parse_frame(&buf[..4], 0), Frame::Invalid(_)));
        assert!(matches!(parse_frame(&buf, buf.len()), Frame::End));
        // Zero-filled space (a crash after the size grew but before data landed) is invalid.
        assert!(matches!(parse_frame(&[0u8; 32], 0), Frame::Invalid(_)));
    }

    #[test]
    fn log_id_prefix_matches_full_decode() {
        let e = entry(9, 1234);
        let bytes = postcard::to_allocvec(&e).unwrap();
        let (id, _): (LogId<NodeId>, _) = postcard::take_from_bytes(&bytes).unwrap();
        assert_eq!(id, e.log_id);
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(17), "seg-00000000000000000017.wal");
        assert_eq!(parse_segment_file_name("seg-00000000000000000017.wal"), Some(17));
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("seg-17.wal"), None);
        assert_eq!(parse_segment_file_name("vote"), None);
    }

    #[test]
    fn state_cache_is_bounded_and_follows_truncate_and_purge() {
        let mut st = State {
            segments: BTreeMap::new(),
            first_index: 0,
            locs: VecDeque::new(),
            cache: VecDeque::new(),
            cache_first: 0,
            cache_bytes: 0,
            last_purged: None,
            vote: None,
            committed: None,
        };
        let loc = |i: u64| Loc {
            segment: 0,
            offset: i * 100,
            len: 100,
            leader: CommittedLeaderId::new(1, 1),
        };
        for i in 5..15 {
            st.push(entry(1, i), loc(i), 350);
        }
        assert_eq!(st.locs.len(), 10);
        assert_eq!(st.cache.len(), 3);
        assert_eq!(st.cache_first, 12);
        assert_eq!(st.cache_bytes, 300);
        st.truncate_from(13);
        assert_eq!(st.end_index(), 13);
        assert_eq!(st.cache.len(), 1);
        st.truncate_from(10);
        assert!(st.cache.is_empty());
        assert_eq!(st.cache_bytes, 0);
        st.purge_upto(7);
        assert_eq!(st.first_index, 8);
        assert_eq!(st.loc(7), None);
        assert_eq!(st.loc(8), Some(loc(8)));
        assert_eq!(st.last_log_id().map(|l| l.index), Some(9));
    }
}
