//! [`LogStore`]: opening the log and the openraft storage glue.
//!
//! `open` locks the directory, recovers it, rebuilds the in-memory index (refusing a hole) and
//! starts the writer thread. The openraft trait impls only check the poison flag, answer reads
//! from the shared state and hand writes to the writer thread, waiting for its reply.

use std::collections::VecDeque;
use std::fmt::{self, Debug};
use std::fs::{self, File};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogReader, Vote};
use tokio::sync::oneshot;

use super::format::VOTE_TMP_FILE;
use super::index::{storage_error, Counters, Shared, State};
use super::reader::LogReader;
use super::recover::{corrupt, io_err, lock_dir, read_vote_file, recover, Recovered};
use super::writer::{sync_dir, Flushed, Reply, Request, Writer};
use super::{LogError, LogOptions, LogStats};
use crate::{Entry, NodeId, StorageError, TypeConfig};

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
        if let Some(v) = vote.filter(|v| v.leader_id.term > crate::plausible::MAX_STORED_TERM) {
            return Err(LogError::ImplausibleVote {
                path: dir.join(super::format::VOTE_FILE),
                term: v.leader_id.term,
                max: crate::plausible::MAX_STORED_TERM,
            });
        }
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
            faults: crate::fault::Faults::for_store(dir),
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
