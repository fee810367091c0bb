//! Reading entries: [`LogReader`], cloned into openraft's replication tasks.
//!
//! A read resolves the requested range under the index lock, serves what the cache holds and
//! reads the rest from the segment files with coalesced positional reads on a blocking thread,
//! never holding the lock across IO. Readers keep an `Arc` of each segment so a file deleted by
//! purge stays readable for them; a reader that loses a race with truncate or purge re-checks
//! the index and treats the entry as absent rather than failing.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use openraft::{ErrorSubject, ErrorVerb, LogId};

use super::format::decode_entry_record;
use super::index::{storage_error, Loc, Segment, Shared};
use super::LogStats;
use crate::{Entry, NodeId, StorageError};

/// Upper bound on one coalesced positional read.
const MAX_COALESCED_READ: u64 = 8 << 20;
/// How often a reader re-resolves an entry that moved under it (truncate + re-append).
const READ_ATTEMPTS: usize = 3;

/// A cheap, cloneable reader of a [`LogStore`]; openraft clones it into replication tasks.
#[derive(Clone)]
pub struct LogReader {
    pub(super) shared: Arc<Shared>,
}

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

    pub(super) async fn read_range(
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
