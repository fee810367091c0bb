//! Storage fault injection, for tests of the fail-stop path.
//!
//! Off unless the environment of the process holds `RAFTSCHED_FAULT_INJECTION=1` when a store
//! opens; nothing a client or a peer sends can switch it on, and a node started without it
//! never reads the file below. When it is on, every store watches one file, `fault-injection`
//! in the node's data directory (the parent of the store's own directory). Before each write
//! and each sync the store reads that file; a line `SITE ERRNO` makes that call fail with the
//! error as if the kernel had returned it:
//!
//! | site | call |
//! |---|---|
//! | `log-write` | `pwrite` of a Raft log segment or the vote file |
//! | `log-sync` | `fdatasync`/`fsync` of a Raft log segment or the vote file |
//! | `sm-write` | a batch written to the state machine's sled tree |
//!
//! `ERRNO` is `EIO` or `ENOSPC` (anything else counts as `EIO`). Creating the file while the
//! node runs fails the next such call; that is how the multi-process tests make a leader's disk
//! fail or fill at a moment of their choosing, without root or a special filesystem.

use std::io;
use std::path::{Path, PathBuf};

/// The environment variable that turns fault injection on (value `1`).
pub const ENV: &str = "RAFTSCHED_FAULT_INJECTION";
/// The file, in the data directory, that names the faults to inject.
pub const FILE: &str = "fault-injection";

/// Where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// Writing a Raft log file.
    LogWrite,
    /// Syncing a Raft log file.
    LogSync,
    /// Writing a state-machine batch.
    SmWrite,
}

impl Site {
    fn name(self) -> &'static str {
        match self {
            Site::LogWrite => "log-write",
            Site::LogSync => "log-sync",
            Site::SmWrite => "sm-write",
        }
    }
}

/// A store's fault hook: inert unless [`ENV`] was set when the store opened.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    file: Option<PathBuf>,
}

impl Faults {
    /// The hook of the store living in `store_dir` (watching `../fault-injection`).
    pub fn for_store(store_dir: &Path) -> Faults {
        if std::env::var_os(ENV).is_none_or(|v| v != "1") {
            return Faults::default();
        }
        let base =
            store_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let file = base.join(FILE);
        tracing::warn!(file = %file.display(), "storage fault injection is on (a test setting; never set {ENV} in production)");
        Faults { file: Some(file) }
    }

    /// The injected error for `site`, if the file names one now.
    pub fn check(&self, site: Site) -> io::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        let Ok(text) = std::fs::read_to_string(file) else { return Ok(()) };
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() == Some(site.name()) {
                let errno = match words.next() {
                    Some("ENOSPC") => libc::ENOSPC,
                    _ => libc::EIO,
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_names_the_site_and_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("raft-log");
        let faults = Faults { file: Some(dir.path().join(FILE)) };
        assert!(faults.check(Site::LogSync).is_ok(), "no file, no fault");
        std::fs::write(dir.path().join(FILE), "log-sync EIO\nsm-write ENOSPC\n").unwrap();
        assert_eq!(faults.check(Site::LogSync).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(faults.check(Site::SmWrite).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert!(faults.check(Site::LogWrite).is_ok());
        // Without the environment variable the hook never looks.
        assert!(std::env::var_os(ENV).is_none());
        assert!(Faults::for_store(&store).check(Site::LogSync).is_ok());
    }
}
