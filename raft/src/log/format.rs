//! On-disk format of the log directory: file names, record framing and checksums.
//!
//! Every record is `[u32 payload length][u32 crc32 of kind + payload][u8 kind][payload]`
//! (little endian) with a postcard payload; the kind values and [`FORMAT_VERSION`] are part of
//! the on-disk format and must never change meaning. Parsing never panics on damaged input: a
//! short, overlong or mis-checksummed record is [`Frame::Invalid`], and what that means (torn
//! tail or corruption) is decided by recovery, not here.

use openraft::LogId;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Entry, NodeId};

pub(super) const SEGMENT_PREFIX: &str = "seg-";
pub(super) const SEGMENT_SUFFIX: &str = ".wal";
pub(super) const VOTE_FILE: &str = "vote";
pub(super) const VOTE_TMP_FILE: &str = "vote.tmp";
pub(super) const LOCK_FILE: &str = "LOCK";

/// `[u32 len][u32 crc][u8 kind]`.
pub(super) const FRAME_HEADER: usize = 9;
/// Version written in every segment header; `open` refuses other versions.
pub(super) const FORMAT_VERSION: u32 = 1;

/// Record kinds. The values are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Kind {
    Entry = 1,
    Committed = 2,
    Purged = 3,
    Header = 4,
    Vote = 5,
}

impl Kind {
    pub(super) fn from_u8(v: u8) -> Option<Kind> {
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
pub(super) struct SegmentHeader {
    pub(super) version: u32,
    pub(super) first_index: u64,
    /// Id of the entry before `first_index` when the segment was created.
    pub(super) prev: Option<LogId<NodeId>>,
}

pub(super) fn record_crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

/// Appends one framed record to `buf`, returning its length.
pub(super) fn encode_record<T: Serialize + ?Sized>(
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

pub(super) enum Frame<'a> {
    Record { kind: u8, payload: &'a [u8], next: usize },
    End,
    Invalid(&'static str),
}

pub(super) fn parse_frame(data: &[u8], offset: usize) -> Frame<'_> {
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

pub(super) fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    postcard::from_bytes(payload).map_err(|e| format!("cannot decode record: {e}"))
}

/// Decodes one entry record (exactly `record`) and checks it is entry `index`.
pub(super) fn decode_entry_record(record: &[u8], index: u64) -> Result<Entry, String> {
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

pub(super) fn segment_file_name(first_index: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_index:020}{SEGMENT_SUFFIX}")
}

pub(super) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SEGMENT_PREFIX)?.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    /// A log entry of `term` at `index` with a payload of a realistic size.
    pub(in crate::log) fn entry(term: u64, index: u64) -> Entry {
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
}
