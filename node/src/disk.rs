//! Free space on the data directory, and the floor below which new submits are refused.
//!
//! A node whose disk fills cannot write its Raft log and must stop (see the README's
//! operations part). To stop before that, every node watches the free space of the filesystem
//! holding its data directory (`statvfs`, space available to the server's user, every
//! [`CHECK_INTERVAL`]) and compares it with a floor (`limits.min_free_disk`,
//! `--min-free-disk`). While the free space is below the floor the node refuses **new
//! submits** with RESOURCE_EXHAUSTED (reason `disk_space_low`), through itself and, when it
//! leads, for the whole cluster, naming the node, the path, the free bytes and the floor.
//! Everything else keeps working — reads, cancels, worker registration, heartbeats, reports
//! and completions — because those are what lets tasks finish and retention free space; their
//! entries are small and bounded by the tasks already accepted.
//!
//! Invariants: the refusal happens before anything is proposed (a refused submit changes
//! nothing); a floor of 0 turns the check off; a failed `statvfs` keeps the last known value
//! (logged), it never refuses on a guess.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::Node;

/// How often the free space is measured.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The free space of the filesystem holding `path`, and its size, in bytes (the space an
/// unprivileged writer may use: `f_bavail`, not `f_bfree`).
pub fn statvfs(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `s` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = if s.f_frsize > 0 { s.f_frsize as u64 } else { s.f_bsize as u64 };
    Ok(((s.f_bavail as u64).saturating_mul(unit), (s.f_blocks as u64).saturating_mul(unit)))
}

/// Why new submits are refused: the data disk is below its floor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "node {node} refuses new submits: its data directory {path} has {} free, below the floor of \
     {} (--min-free-disk / limits.min_free_disk); free space on that disk (or lower the floor) \
     and submit again",
    format_bytes(*.free),
    format_bytes(*.floor)
)]
pub struct DiskLow {
    /// The node refusing.
    pub node: u64,
    /// Its data directory.
    pub path: PathBuf,
    /// Free bytes at the last check.
    pub free: u64,
    /// The configured floor.
    pub floor: u64,
}

/// The last measured free space of the data directory, and the floor.
pub struct DiskGuard {
    node: u64,
    path: PathBuf,
    floor: u64,
    free: AtomicU64,
    total: AtomicU64,
    /// At least one measurement succeeded.
    known: AtomicBool,
}

impl DiskGuard {
    /// A guard for node `node`'s data directory `path` with `floor` bytes (0: off), measured
    /// once now.
    pub fn new(node: u64, path: PathBuf, floor: u64) -> DiskGuard {
        let g = DiskGuard {
            node,
            path,
            floor,
            free: AtomicU64::new(0),
            total: AtomicU64::new(0),
            known: AtomicBool::new(false),
        };
        if let Err(e) = g.measure() {
            warn!(path = %g.path.display(), error = %e, "cannot measure the free disk space");
        }
        g
    }

    /// Measure now; `Ok(low)` says whether the disk is below the floor.
    pub fn measure(&self) -> io::Result<bool> {
        let (free, total) = statvfs(&self.path)?;
        self.free.store(free, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.known.store(true, Ordering::Relaxed);
        Ok(self.low().is_some())
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The floor in bytes (0: off).
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Free bytes at the last measurement (`None` before the first one succeeded).
    pub fn free(&self) -> Option<u64> {
        self.known.load(Ordering::Relaxed).then(|| self.free.load(Ordering::Relaxed))
    }

    /// Size of the filesystem at the last measurement.
    pub fn total(&self) -> Option<u64> {
        self.known.load(Ordering::Relaxed).then(|| self.total.load(Ordering::Relaxed))
    }

    /// Fill the disk fields of this node's status reply.
    pub fn fill(&self, r: &mut proto::internal::v1::NodeStatusReply) {
        r.disk_free_bytes = self.free().unwrap_or(0);
        r.disk_min_free_bytes = self.floor;
        r.disk_low = self.low().is_some();
        r.data_dir = self.path.display().to_string();
    }

    /// Why submits are refused now, if they are.
    pub fn low(&self) -> Option<DiskLow> {
        let free = self.free()?;
        (self.floor > 0 && free < self.floor).then(|| DiskLow {
            node: self.node,
            path: self.path.clone(),
            free,
            floor: self.floor,
        })
    }
}

/// Measure the free space every [`CHECK_INTERVAL`] until the node stops, logging each change
/// between "above" and "below the floor".
pub async fn watch(node: Arc<Node>) {
    let mut stopping = node.stopping.clone();
    let mut was_low = node.disk.low().is_some();
    if let Some(low) = node.disk.low() {
        warn!(error = %low, "free disk space is below the floor; new submits are refused");
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
        let n = node.clone();
        let measured = tokio::task::spawn_blocking(move || n.disk.measure()).await;
        match measured {
            Ok(Ok(low)) if low != was_low => {
                was_low = low;
                match node.disk.low() {
                    Some(l) => {
                        warn!(error = %l, "free disk space fell below the floor; new submits are refused")
                    }
                    None => info!(
                        path = %node.disk.path().display(),
                        free = %format_bytes(node.disk.free().unwrap_or(0)),
                        floor = %format_bytes(node.disk.floor()),
                        "free disk space is above the floor again; submits are accepted"
                    ),
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(path = %node.disk.path().display(), error = %e, "cannot measure the free disk space")
            }
            Err(_) => return,
        }
    }
}

/// Parses a byte size as people write it: binary `1GiB`, `1Gi`, `512MiB`; decimal `1GB`,
/// `1G`, `100MB`; a bare number is bytes (`0`: off).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let value: f64 =
        num.parse().map_err(|_| format!("{s:?} is not a size: write e.g. 1GiB, 512MiB or 0"))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit {unit:?}: use B, KiB, MiB, GiB, TiB (or KB, MB, GB, TB)"
            ))
        }
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// A byte count for people: `512 B`, `1.5 KiB`, `20.0 GiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {} ({n} bytes)", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_bytes("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("lots").unwrap_err().contains("not a size"));
        assert!(parse_bytes("3 parsecs").unwrap_err().contains("unknown unit"));
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1 << 30), "1.0 GiB (1073741824 bytes)");
    }

    #[test]
    fn the_floor_refuses_below_it_and_never_when_off() {
        let dir = tempfile::tempdir().unwrap();
        let (free, total) = statvfs(dir.path()).unwrap();
        assert!(free > 0 && total >= free);
        let g = DiskGuard::new(4, dir.path().to_path_buf(), u64::MAX);
        let low = g.low().expect("no disk has u64::MAX bytes free");
        assert_eq!((low.node, low.floor), (4, u64::MAX));
        let msg = low.to_string();
        assert!(msg.contains("node 4") && msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("--min-free-disk"), "{msg}");
        assert!(DiskGuard::new(4, dir.path().to_path_buf(), 0).low().is_none(), "0 is off");
        assert!(DiskGuard::new(4, dir.path().to_path_buf(), 1).low().is_none());
        let missing = DiskGuard::new(4, dir.path().join("nope"), u64::MAX);
        assert!(missing.low().is_none(), "an unmeasured disk never refuses");
        assert!(statvfs(&dir.path().join("nope")).is_err());
    }
}
