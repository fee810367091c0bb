//! Recovery on open: scanning the segments and cutting a torn tail.
//!
//! Segments are read in order, verifying CRCs, headers and index continuity. An invalid record
//! at the tail of the last segment, with nothing valid after it, is a torn write from a crash
//! and is cut away (logged at warn). Anywhere else — in an earlier segment, or followed by a
//! record whose checksum holds — it is damage a crash cannot explain (cutting there would drop
//! entries that were acknowledged), and `open` fails naming the file and offset. Leading
//! segments are only ever deleted by purge, so the first remaining segment's header bounds the
//! last purged id from below even when the `purged` record itself was lost.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{LogId, Vote};

use super::format::{
    decode, parse_frame, parse_segment_file_name, Frame, Kind, SegmentHeader, FORMAT_VERSION,
    LOCK_FILE, VOTE_FILE,
};
use super::index::{Loc, Segment};
use super::writer::SegInfo;
use super::LogError;
use crate::NodeId;

pub(super) struct Recovered {
    pub(super) segs: BTreeMap<u64, SegInfo>,
    pub(super) entries: Vec<(u64, Loc)>,
    pub(super) last_purged: Option<LogId<NodeId>>,
    pub(super) committed: Option<LogId<NodeId>>,
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

pub(super) fn corrupt(path: &Path, offset: usize, reason: impl Into<String>) -> LogError {
    LogError::Corrupt { path: path.to_path_buf(), offset: offset as u64, reason: reason.into() }
}

pub(super) fn lock_dir(dir: &Path) -> Result<File, LogError> {
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

pub(super) fn read_vote_file(dir: &Path) -> Result<Option<Vote<NodeId>>, LogError> {
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

pub(super) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
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

/// How to recover a node whose log is damaged; part of every corruption refusal at the tail.
pub(super) const RECOVERY: &str = "The other nodes hold the committed entries: remove this \
    node's data directory and rejoin it (`schedctl cluster remove --id N`, then start it empty \
    and `cluster add-learner` / `promote`), or restore the directory from a backup.";

/// The offset of the first record at or after `from` whose checksum holds and whose kind is
/// known, if any. A torn write leaves only garbage after the bad record; a valid one after
/// it means the bad record is damage in the middle of the log.
fn next_valid_record(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len()).find(|&at| {
        // The kind byte is cheap to check before parse_frame computes a checksum.
        data.get(at + 8).is_some_and(|k| Kind::from_u8(*k).is_some())
            && matches!(parse_frame(data, at), Frame::Record { .. })
    })
}

/// Scans every segment; cuts a torn tail off the last one. Returns whether files changed.
pub(super) fn recover(dir: &Path) -> Result<(Recovered, bool), LogError> {
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
                    if let Some(at) = next_valid_record(&data, offset + 1) {
                        return Err(corrupt(
                            &path,
                            offset,
                            format!(
                                "{reason}, yet a valid record follows at offset {at}: damage, \
                                 not a torn write. {RECOVERY}"
                            ),
                        ));
                    }
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

pub(super) fn max_by_index(
    a: Option<LogId<NodeId>>,
    b: Option<LogId<NodeId>>,
) -> Option<LogId<NodeId>> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.index > x.index { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}
