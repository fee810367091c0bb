//! The writer thread: the only code that writes to the log directory.
//!
//! Every write (append, vote, committed, truncate, purge) arrives on one channel and is handled
//! in order, so writes become durable in the order they were issued. Queued appends are drained
//! into one group commit (one `pwrite` + one `fdatasync`); their [`LogFlushed`] callbacks fire
//! only after that sync, and a [`Flushed`] guard reports an error for any callback dropped
//! uncalled. Before a write that touches another file or deletes data, pending appends are
//! synced first; rotation syncs the old segment before creating the new one, so only the tail of
//! the last segment can ever hold unsynced bytes. Any IO error poisons the store.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use openraft::storage::LogFlushed;
use openraft::{ErrorSubject, ErrorVerb, LogId, Vote};
use tokio::sync::oneshot;

use super::format::{
    encode_record, segment_file_name, Kind, SegmentHeader, FORMAT_VERSION, VOTE_FILE, VOTE_TMP_FILE,
};
use super::index::{storage_error, Loc, Segment, Shared};
use crate::fault::{Faults, Site};
use crate::{Entry, NodeId, StorageError, TypeConfig};

/// Upper bound on the requests the writer drains into one group commit.
pub(super) const MAX_GROUP: usize = 256;

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(super) type Reply = oneshot::Sender<Result<(), StorageError>>;

pub(super) enum Request {
    Append { entries: Vec<Entry>, written: Reply, flushed: Flushed },
    Vote { vote: Vote<NodeId>, done: Reply },
    Committed { committed: Option<LogId<NodeId>>, done: Reply },
    Truncate { since: LogId<NodeId>, done: Reply },
    Purge { upto: LogId<NodeId>, done: Reply },
}

/// Owns an append's callback and reports an error if it is dropped uncalled, so openraft
/// never waits forever.
pub(super) struct Flushed(pub(super) Option<LogFlushed<TypeConfig>>);

impl Flushed {
    pub(super) fn complete(mut self, result: io::Result<()>) {
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
pub(super) enum Fault {
    /// An IO error: the store is poisoned.
    Io(String),
    /// The request itself is invalid (e.g. an append that would leave a hole); nothing was
    /// written and the store stays usable.
    Rejected(String),
}

impl Fault {
    pub(super) fn io(what: impl Display, path: &Path, e: io::Error) -> Fault {
        Fault::Io(format!("{what} {}: {e}", path.display()))
    }

    pub(super) fn message(&self) -> &str {
        match self {
            Fault::Io(m) | Fault::Rejected(m) => m,
        }
    }
}

/// Writer-side bookkeeping of one segment.
pub(super) struct SegInfo {
    pub(super) seg: Arc<Segment>,
    pub(super) size: u64,
    /// First and last entry physically in the file (purged ones included).
    pub(super) first_entry: Option<u64>,
    pub(super) last_entry: Option<u64>,
}

impl SegInfo {
    /// The only index this segment can take next.
    pub(super) fn next_entry(&self) -> u64 {
        self.last_entry.map_or(self.seg.first_index, |l| l + 1)
    }
}

pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) dir_file: File,
    pub(super) _lock: File,
    pub(super) shared: Arc<Shared>,
    pub(super) segment_size: u64,
    pub(super) cache_limit: usize,
    /// Every segment on disk; the last one is the active (appended-to) segment.
    pub(super) segs: BTreeMap<u64, SegInfo>,
    /// The active segment has bytes not yet covered by a sync.
    pub(super) dirty: bool,
    /// Callbacks of written appends, waiting for the next sync, in order.
    pub(super) pending: Vec<Flushed>,
    pub(super) buf: Vec<u8>,
    /// Test-only injected IO errors ([`crate::fault`]).
    pub(super) faults: Faults,
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Request>) {
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

    pub(super) fn handle(&mut self, req: Request) {
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

    pub(super) fn reply(
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
    pub(super) fn fail(&mut self, fault: &Fault) {
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

    pub(super) fn active(&self) -> Option<&SegInfo> {
        self.segs.values().next_back()
    }

    pub(super) fn active_mut(&mut self) -> Option<&mut SegInfo> {
        self.segs.values_mut().next_back()
    }

    pub(super) fn fsync_dir(&self) -> Result<(), Fault> {
        self.dir_file.sync_all().map_err(|e| Fault::io("fsync directory", &self.dir, e))
    }

    /// Makes everything written so far durable, then completes the waiting appends in order.
    pub(super) fn barrier(&mut self) -> Result<(), Fault> {
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

    pub(super) fn timed_sync(&self, seg: &Segment, full: bool) -> Result<(), Fault> {
        let started = Instant::now();
        let result = self.faults.check(Site::LogSync).and_then(|()| {
            if full {
                seg.file.sync_all()
            } else {
                seg.file.sync_data()
            }
        });
        result.map_err(|e| Fault::io("fdatasync", &seg.path, e))?;
        let stats = &self.shared.stats;
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stats.sync_micros.fetch_add(micros, Ordering::Relaxed);
        stats.sync_buckets[super::sync_bucket(micros)].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `self.buf` at the end of the active segment.
    pub(super) fn write_buf(&mut self) -> Result<u64, Fault> {
        let buf = std::mem::take(&mut self.buf);
        let injected = self.faults.check(Site::LogWrite);
        let result = match self.active_mut() {
            Some(active) => {
                let offset = active.size;
                let written = injected.and_then(|()| active.seg.file.write_all_at(&buf, offset));
                match written {
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
    pub(super) fn roll(&mut self, first_index: u64) -> Result<(), Fault> {
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
    pub(super) fn ensure_active(&mut self) -> Result<(), Fault> {
        if self.segs.is_empty() {
            let next = self.shared.read().last_log_id().map_or(0, |id| id.index + 1);
            self.roll(next)?;
        }
        Ok(())
    }

    pub(super) fn append(&mut self, mut entries: Vec<Entry>) -> Result<(), Fault> {
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

    pub(super) fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), Fault> {
        self.ensure_active()?;
        self.buf.clear();
        encode_record(&mut self.buf, Kind::Committed, &committed).map_err(Fault::Rejected)?;
        self.write_buf()?;
        self.shared.write().committed = committed;
        Ok(())
    }

    pub(super) fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), Fault> {
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
        self.faults
            .check(Site::LogWrite)
            .and_then(|()| io::Write::write_all(&mut file, &self.buf))
            .map_err(|e| Fault::io("write", &tmp, e))?;
        self.faults
            .check(Site::LogSync)
            .and_then(|()| file.sync_all())
            .map_err(|e| Fault::io("fsync", &tmp, e))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(|e| Fault::io("rename to", &path, e))?;
        self.fsync_dir()?;
        self.shared.write().vote = Some(*vote);
        Ok(())
    }

    pub(super) fn remove_segment(&mut self, first_index: u64) -> Result<(), Fault> {
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

    pub(super) fn truncate(&mut self, since: LogId<NodeId>) -> Result<(), Fault> {
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

    pub(super) fn purge(&mut self, upto: LogId<NodeId>) -> Result<(), Fault> {
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
