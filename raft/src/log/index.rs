//! The in-memory index of the log and the state the writer thread shares with readers.
//!
//! [`State`] maps every present log index to its segment, offset, length and leader id and
//! keeps a byte-bounded cache of the most recently appended decoded entries. Invariants: the
//! indexed entries are consecutive (`first_index..end_index()`), the cache is a suffix of them,
//! and `cache_bytes` is the sum of the cached records' sizes. Only the writer thread mutates it;
//! readers take the lock for lookups only, never across IO. [`Shared`] adds the fail-stop
//! poison flag and the metrics counters.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::{AnyError, CommittedLeaderId, ErrorSubject, ErrorVerb, LogId, StorageIOError, Vote};

use super::LogStats;
use crate::{Entry, NodeId, StorageError};

/// A segment file; readers keep an `Arc` so a file deleted by purge stays readable for them.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) first_index: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
}

/// Where an entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Loc {
    pub(super) segment: u64,
    pub(super) offset: u64,
    /// Record length, framing included.
    pub(super) len: u32,
    pub(super) leader: CommittedLeaderId<NodeId>,
}

pub(super) struct State {
    pub(super) segments: BTreeMap<u64, Arc<Segment>>,
    /// Index of `locs[0]`; meaningless while `locs` is empty.
    pub(super) first_index: u64,
    pub(super) locs: VecDeque<Loc>,
    /// A suffix of the present entries, decoded, with their record sizes.
    pub(super) cache: VecDeque<(Entry, usize)>,
    /// Index of `cache[0]`; meaningless while `cache` is empty.
    pub(super) cache_first: u64,
    pub(super) cache_bytes: usize,
    pub(super) last_purged: Option<LogId<NodeId>>,
    pub(super) vote: Option<Vote<NodeId>>,
    pub(super) committed: Option<LogId<NodeId>>,
}

impl State {
    pub(super) fn end_index(&self) -> u64 {
        self.first_index + self.locs.len() as u64
    }

    pub(super) fn loc(&self, index: u64) -> Option<Loc> {
        if index < self.first_index {
            return None;
        }
        usize::try_from(index - self.first_index).ok().and_then(|i| self.locs.get(i)).copied()
    }

    pub(super) fn last_log_id(&self) -> Option<LogId<NodeId>> {
        match self.locs.back() {
            Some(loc) => Some(LogId::new(loc.leader, self.end_index() - 1)),
            None => self.last_purged,
        }
    }

    pub(super) fn push(&mut self, entry: Entry, loc: Loc, cache_limit: usize) {
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
    pub(super) fn truncate_from(&mut self, index: u64) {
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
    pub(super) fn purge_upto(&mut self, index: u64) {
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
pub(super) struct Counters {
    pub(super) appends: AtomicU64,
    pub(super) entries: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) syncs: AtomicU64,
    pub(super) sync_micros: AtomicU64,
    pub(super) sync_buckets: [AtomicU64; super::SYNC_BUCKETS_MICROS.len() + 1],
}

pub(super) struct Shared {
    pub(super) state: RwLock<State>,
    pub(super) poisoned: AtomicBool,
    pub(super) poison_reason: Mutex<Option<String>>,
    pub(super) stats: Counters,
    pub(super) max_read_bytes: usize,
}

impl Shared {
    // A panic while holding the lock cannot leave `State` half-updated in a way that matters
    // more than the panic itself (the writer thread dies and every caller gets an error), so
    // lock poisoning is not propagated.
    pub(super) fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn poison(&self, reason: &str) {
        let mut slot = self.poison_reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            tracing::error!(reason, "log store failed; refusing all further operations");
            *slot = Some(reason.to_string());
        }
        self.poisoned.store(true, Ordering::SeqCst);
    }

    pub(super) fn poison_message(&self) -> Option<String> {
        if !self.poisoned.load(Ordering::SeqCst) {
            return None;
        }
        let slot = self.poison_reason.lock().unwrap_or_else(PoisonError::into_inner);
        Some(format!(
            "log store stopped after an earlier io error: {}",
            slot.as_deref().unwrap_or("unknown")
        ))
    }

    pub(super) fn check(
        &self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> Result<(), StorageError> {
        match self.poison_message() {
            Some(msg) => Err(storage_error(subject, verb, msg)),
            None => Ok(()),
        }
    }

    pub(super) fn stats(&self) -> LogStats {
        let s = &self.stats;
        LogStats {
            appends: s.appends.load(Ordering::Relaxed),
            entries: s.entries.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
            sync_micros: s.sync_micros.load(Ordering::Relaxed),
            sync_buckets: std::array::from_fn(|i| s.sync_buckets[i].load(Ordering::Relaxed)),
        }
    }
}

pub(super) fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    msg: impl Display,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::error(msg)).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::format::tests::entry;

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
