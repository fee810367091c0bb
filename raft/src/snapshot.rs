//! The snapshot file format.
//!
//! ```text
//! magic "RSCHSNAP" | u32 format version | u32 header length | header (postcard SnapshotMeta)
//! record*: u32 key length | key | u32 value length | value      (state-machine records)
//! trailer: u32 0xFFFF_FFFF | u64 record count | u32 crc32 of every byte before the crc
//! ```
//! Records are streamed in and out, so neither building nor installing a snapshot holds the
//! whole state in memory a second time. The trailer makes a truncated or corrupted file fail
//! loudly instead of installing a partial state.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use openraft::SnapshotMeta;

use crate::{NodeId, NodeInfo};

const MAGIC: &[u8; 8] = b"RSCHSNAP";
/// Version of the file layout; bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
const TRAILER_MARK: u32 = u32::MAX;
const MAX_KEY: usize = 64 << 10;
const MAX_VALUE: usize = 64 << 20;

/// Snapshot metadata for our type config.
pub type Meta = SnapshotMeta<NodeId, NodeInfo>;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The file name a node keeps the snapshot `meta` under (in its snapshot directory).
pub fn file_name(meta: &Meta) -> String {
    let index = meta.last_log_id.map_or(0, |l| l.index);
    format!("snapshot-{index:020}-{}.snap", meta.snapshot_id)
}

/// Streams records into a new snapshot file.
pub struct SnapshotWriter {
    out: BufWriter<File>,
    crc: crc32fast::Hasher,
    count: u64,
}

impl SnapshotWriter {
    /// Create `path` (truncating it) and write the header.
    pub fn create(path: &Path, meta: &Meta) -> io::Result<Self> {
        let file = File::create(path)?;
        let mut w = SnapshotWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            count: 0,
        };
        let header = postcard::to_stdvec(meta)
            .map_err(|e| invalid(format!("encode snapshot header: {e}")))?;
        w.put(MAGIC)?;
        w.put(&FORMAT_VERSION.to_le_bytes())?;
        w.put(&(header.len() as u32).to_le_bytes())?;
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc.update(bytes);
        self.out.write_all(bytes)
    }

    /// Append one record.
    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.put(&(key.len() as u32).to_le_bytes())?;
        self.put(key)?;
        self.put(&(value.len() as u32).to_le_bytes())?;
        self.put(value)?;
        self.count += 1;
        Ok(())
    }

    /// Write the trailer and make the file durable. Returns the record count.
    pub fn finish(mut self) -> io::Result<u64> {
        self.put(&TRAILER_MARK.to_le_bytes())?;
        let count = self.count;
        self.put(&count.to_le_bytes())?;
        let crc = self.crc.clone().finalize();
        self.out.write_all(&crc.to_le_bytes())?;
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(count)
    }
}

/// Streams records out of a snapshot file, verifying the trailer at the end.
pub struct SnapshotReader {
    input: BufReader<File>,
    crc: crc32fast::Hasher,
    count: u64,
    done: bool,
}

impl SnapshotReader {
    /// Open `path` and read its header.
    pub fn open(path: &Path) -> io::Result<(Self, Meta)> {
        let file = File::open(path)?;
        let mut r = SnapshotReader {
            input: BufReader::with_capacity(1 << 20, file),
            crc: crc32fast::Hasher::new(),
            count: 0,
            done: false,
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(invalid(format!("{}: not a snapshot file", path.display())));
        }
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(invalid(format!(
                "{}: snapshot format {version} is not supported (this build reads {FORMAT_VERSION})",
                path.display()
            )));
        }
        let len = r.u32()? as usize;
        if len > MAX_KEY {
            return Err(invalid(format!("{}: snapshot header of {len} bytes", path.display())));
        }
        let mut header = vec![0u8; len];
        r.take(&mut header)?;
        let meta: Meta = postcard::from_bytes(&header)
            .map_err(|e| invalid(format!("{}: snapshot header: {e}", path.display())))?;
        Ok((r, meta))
    }

    fn take(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                invalid("snapshot file is truncated")
            } else {
                e
            }
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// The next record, or `None` after the trailer was read and verified.
    pub fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let klen = self.u32()?;
        if klen == TRAILER_MARK {
            let mut c = [0u8; 8];
            self.take(&mut c)?;
            let count = u64::from_le_bytes(c);
            let expected = self.crc.clone().finalize();
            let mut crc = [0u8; 4];
            self.input.read_exact(&mut crc).map_err(|_| invalid("snapshot file is truncated"))?;
            if u32::from_le_bytes(crc) != expected {
                return Err(invalid("snapshot checksum mismatch"));
            }
            if count != self.count {
                return Err(invalid(format!(
                    "snapshot holds {} records, trailer says {count}",
                    self.count
                )));
            }
            self.done = true;
            return Ok(None);
        }
        let klen = klen as usize;
        if klen > MAX_KEY {
            return Err(invalid(format!("snapshot record key of {klen} bytes")));
        }
        let mut key = vec![0u8; klen];
        self.take(&mut key)?;
        let vlen = self.u32()? as usize;
        if vlen > MAX_VALUE {
            return Err(invalid(format!("snapshot record value of {vlen} bytes")));
        }
        let mut value = vec![0u8; vlen];
        self.take(&mut value)?;
        self.count += 1;
        Ok(Some((key, value)))
    }
}

/// Read the whole snapshot at `path` as an install would, without installing it: the
/// header, every record (decoded and loaded), the trailer's count and checksum, and the
/// invariants of the state it holds. Returns its metadata and that state.
///
/// A node runs this on a snapshot a peer sent before openraft may install it: openraft
/// treats a failed install as a storage fault and stops the node, so a corrupt or forged
/// snapshot from one member must be refused here instead. Loading runs under
/// `catch_unwind`, so records that decode but contradict each other are an error too.
pub fn verify(path: &Path) -> io::Result<(Meta, state_machine::SchedulerState)> {
    let (mut reader, meta) = SnapshotReader::open(path)?;
    let mut loader = state_machine::StateLoader::new();
    while let Some((k, v)) = reader.next_record()? {
        loader.add(&k, &v).map_err(|e| invalid(format!("snapshot record: {e}")))?;
    }
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let state = loader.finish();
        let checked = state.check_invariants();
        (state, checked)
    }));
    match loaded {
        Ok((state, Ok(()))) => Ok((meta, state)),
        Ok((_, Err(violations))) => Err(invalid(format!(
            "snapshot state breaks {} invariant(s), first: {}",
            violations.len(),
            violations[0]
        ))),
        Err(_) => Err(invalid("snapshot records contradict each other")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        let meta = Meta::default();
        let mut w = SnapshotWriter::create(&path, &meta).unwrap();
        w.record(b"k1", b"v1").unwrap();
        w.record(b"k2", &[7u8; 1000]).unwrap();
        assert_eq!(w.finish().unwrap(), 2);

        let (mut r, m) = SnapshotReader::open(&path).unwrap();
        assert_eq!(m, meta);
        assert_eq!(r.next_record().unwrap(), Some((b"k1".to_vec(), b"v1".to_vec())));
        assert_eq!(r.next_record().unwrap().unwrap().1.len(), 1000);
        assert_eq!(r.next_record().unwrap(), None);

        // Flip one byte in a value: the checksum catches it.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 30] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (mut r, _) = SnapshotReader::open(&path).unwrap();
        let err = loop {
            match r.next_record() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("corruption not detected"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("checksum"), "{err}");

        // Truncation is detected too.
        std::fs::write(&path, &bytes[..n - 10]).unwrap();
        let (mut r, _) = SnapshotReader::open(&path).unwrap();
        assert!(std::iter::from_fn(|| Some(r.next_record())).find_map(|x| x.err()).is_some());
    }

    #[test]
    fn verify_loads_a_real_state_and_refuses_forged_records() {
        use state_machine::{RecordKey, SchedulerState};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        let meta = Meta::default();
        let state = SchedulerState::new();
        let mut w = SnapshotWriter::create(&path, &meta).unwrap();
        for (key, value) in state.records() {
            w.record(&key.encode(), &value.encode()).unwrap();
        }
        w.finish().unwrap();
        let (m, loaded) = verify(&path).unwrap();
        assert_eq!(m, meta);
        assert_eq!(loaded.digest(), state.digest());

        // A checksummed file whose record is not a record: refused, naming the record.
        let mut w = SnapshotWriter::create(&path, &meta).unwrap();
        w.record(&RecordKey::Meta.encode(), b"not a record").unwrap();
        w.finish().unwrap();
        let e = verify(&path).unwrap_err();
        assert!(e.to_string().contains("snapshot record"), "{e}");

        // Not a snapshot at all.
        std::fs::write(&path, [0u8; 16]).unwrap();
        assert!(verify(&path).unwrap_err().to_string().contains("not a snapshot"));
    }
}
