//! The state-machine store: the pure scheduler state in memory, its records in sled.
//!
//! # Apply
//! Each entry goes through [`SchedulerState::apply`]. After the batch of entries openraft hands
//! over, the records the applies reported as changed are encoded once and written, together with
//! `last_applied` and the membership, in **one** `sled::Batch` on **one** tree — atomic, so a crash
//! can never leave records from an entry without the `last_applied` that covers it (which would
//! re-apply a non-idempotent command). Sled is not flushed per apply: the Raft log is the durable
//! copy, and openraft re-applies `(last_applied, committed]` after a restart.
//!
//! # Open
//! The state is rebuilt from the records in sled ([`state_machine::StateLoader`]); the log is not
//! replayed from the start. If the newest local snapshot is ahead of sled (a crash between a
//! snapshot install and its switch-over), it is installed again.
//!
//! # Snapshots without stopping applies (copy-on-write)
//! `get_snapshot_builder` runs serialized with apply; it fixes the snapshot point and opens a
//! copy-on-write session. The build then streams the live sled tree into a file while applies
//! continue. The session keeps the iteration position; an apply that changes a key the build
//! has not reached yet first saves that key's value as of the snapshot point (a pre-image,
//! `None` for a key that did not exist). The build uses a pre-image instead of the live value
//! where one exists, and finally emits the pre-images of keys deleted before it reached them.
//! Memory cost: one pre-image per key changed during the build, never a second copy of the state.
//! Before streaming, sled is flushed, so every entry up to the snapshot point is durable in the
//! state machine when openraft purges the log behind the snapshot.
//!
//! # Install
//! A received snapshot is streamed into a *new* sled tree; only when it is complete and flushed
//! does a single write to the `_store` tree switch the current tree, and the old tree is dropped.
//! A crash in the middle leaves the old tree current (the partial new one is dropped at open).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use state_machine::{Op, Output, RecordKey, Response, SchedulerState, StateLoader};
use tracing::{info, warn};

use crate::events::{EventBatch, EventLog};
use crate::persister::{Cow, Persister, Write};
use crate::snapshot::{Meta, SnapshotReader, SnapshotWriter};
use crate::{Entry, NodeId, NodeInfo, StorageError, TypeConfig};

const APPLIED_KEY: &[u8] = b"_applied";
const MEMBERSHIP_KEY: &[u8] = b"_membership";
const CURRENT_TREE_KEY: &[u8] = b"current_tree";
const STORE_TREE: &str = "_store";
const DATA_TREE_PREFIX: &str = "data-";

/// Settings of the state-machine store.
#[derive(Clone, Debug)]
pub struct SmConfig {
    /// sled's page cache budget in bytes (sled's own default of 1 GiB is far too much here).
    pub cache_capacity: u64,
    /// How often sled flushes in the background (ms); `None` = only when asked.
    pub flush_every_ms: Option<u64>,
    /// Events retained in memory for watchers (see [`EventLog`]).
    pub retained_events: usize,
    /// The newest command version this node applies ([`state_machine::COMMAND_VERSION`]; a
    /// lower value makes the node behave as an older build would, for upgrade tests). An
    /// entry above it stops the node instead of being misapplied.
    pub command_version: u32,
}

impl Default for SmConfig {
    fn default() -> Self {
        SmConfig {
            cache_capacity: 64 << 20,
            flush_every_ms: Some(500),
            retained_events: 200_000,
            command_version: state_machine::COMMAND_VERSION,
        }
    }
}

/// Failures opening the store.
#[derive(Debug, thiserror::Error)]
pub enum SmOpenError {
    /// sled refused to open or read.
    #[error("state-machine database at {path}: {source}")]
    Sled {
        /// The database directory.
        path: PathBuf,
        /// The error.
        source: sled::Error,
    },
    /// A record or snapshot could not be decoded: the data is corrupt or from a newer build.
    #[error("state-machine data at {path} is unreadable: {reason}")]
    Corrupt {
        /// The directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// File system error.
    #[error("state-machine files at {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

#[derive(Clone, Debug, Default)]
struct Applied {
    last: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, NodeInfo>,
}

struct Shared {
    db: sled::Db,
    store_tree: sled::Tree,
    data: Arc<RwLock<sled::Tree>>,
    state: RwLock<SchedulerState>,
    applied: RwLock<Applied>,
    cow: Arc<Mutex<Option<Cow>>>,
    persister: Persister,
    snap_dir: PathBuf,
    current: Mutex<Option<(Meta, PathBuf)>>,
    receiving: Mutex<Vec<PathBuf>>,
    build_lock: tokio::sync::Mutex<()>,
    events: EventLog,
    counter: AtomicU64,
    command_version: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_snapshot(None, &e).into()
}

fn snap_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("encoding to a Vec cannot fail")
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// The store handed to openraft. Cheap to clone; every clone shares one state.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
}

/// Read access to the state for the node (queries, planner, explain, digests).
#[derive(Clone)]
pub struct SmHandle {
    shared: Arc<Shared>,
}

impl SmHandle {
    /// Run `f` with the current state (a read lock: keep `f` short and never await in it).
    pub fn read<R>(&self, f: impl FnOnce(&SchedulerState) -> R) -> R {
        f(&read(&self.shared.state))
    }

    /// The event log of applied changes.
    pub fn events(&self) -> &EventLog {
        &self.shared.events
    }

    /// The newest snapshot file and its metadata, if one was built or installed. A reader
    /// should open it at once: a newer snapshot replaces (deletes) it, and an open file
    /// stays readable.
    pub fn current_snapshot(&self) -> Option<(Meta, PathBuf)> {
        lock(&self.shared.current).clone()
    }

    /// The newest command version this node applies.
    pub fn command_version(&self) -> u32 {
        self.shared.command_version
    }

    /// Where snapshot files live (files there not ending in `.snap` are removed at start).
    pub fn snapshot_dir(&self) -> &Path {
        &self.shared.snap_dir
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        read(&self.shared.applied).last
    }

    /// Digest of the whole state and the index it is taken at (O(state)).
    pub fn digest(&self) -> (u64, u64) {
        let st = read(&self.shared.state);
        let index = read(&self.shared.applied).last.map_or(0, |l| l.index);
        (index, st.digest())
    }

    /// Write everything applied so far to sled and flush it (graceful shutdown, so a restart
    /// re-applies little). Blocking.
    pub fn flush(&self) -> Result<(), String> {
        self.shared.persister.sync_blocking()?;
        self.shared.db.flush().map(|_| ()).map_err(|e| e.to_string())
    }

    /// The last log index whose records are in sled (lags `last_applied` under load).
    pub fn persisted_index(&self) -> u64 {
        self.shared.persister.persisted()
    }

    /// Why the store stopped accepting writes, if it did (a sled failure: the node must stop).
    pub fn fatal(&self) -> Option<String> {
        self.shared.persister.error()
    }
}

impl StateMachineStore {
    /// Open (or create) the store in `dir` (`dir/sled` and `dir/snapshots`).
    pub fn open(dir: &Path, cfg: &SmConfig) -> Result<Self, SmOpenError> {
        let sled_dir = dir.join("sled");
        let snap_dir = dir.join("snapshots");
        let io_err = |source| SmOpenError::Io { path: dir.to_path_buf(), source };
        fs::create_dir_all(&snap_dir).map_err(io_err)?;
        let sled_err = |source| SmOpenError::Sled { path: sled_dir.clone(), source };
        let started = std::time::Instant::now();
        let db = sled::Config::new()
            .path(&sled_dir)
            .cache_capacity(cfg.cache_capacity)
            .flush_every_ms(cfg.flush_every_ms)
            .open()
            .map_err(sled_err)?;
        let store_tree = db.open_tree(STORE_TREE).map_err(sled_err)?;
        let current = match store_tree.get(CURRENT_TREE_KEY).map_err(sled_err)? {
            Some(name) => String::from_utf8_lossy(&name).into_owned(),
            None => format!("{DATA_TREE_PREFIX}0"),
        };
        for name in db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if name.starts_with(DATA_TREE_PREFIX) && name != current {
                warn!(tree = %name, "dropping an unfinished snapshot install");
                db.drop_tree(name.as_bytes()).map_err(sled_err)?;
            }
        }
        let tree = db.open_tree(current.as_bytes()).map_err(sled_err)?;
        let sled_open_ms = started.elapsed().as_millis() as u64;
        let corrupt = |reason: String| SmOpenError::Corrupt { path: sled_dir.clone(), reason };
        let (state, applied) = load_tree(&tree).map_err(|e| match e {
            LoadError::Sled(e) => sled_err(e),
            LoadError::Corrupt(r) => corrupt(r),
        })?;
        let generation = current.trim_start_matches(DATA_TREE_PREFIX).parse::<u64>().unwrap_or(0);

        // Pick the newest readable snapshot; remove the rest and any half-written files.
        let mut best: Option<(Meta, PathBuf)> = None;
        for entry in fs::read_dir(&snap_dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            if path.extension().is_some_and(|e| e == "snap") {
                match SnapshotReader::open(&path) {
                    Ok((_, meta)) => {
                        let newer =
                            best.as_ref().is_none_or(|(m, _)| m.last_log_id < meta.last_log_id);
                        if newer {
                            if let Some((_, old)) = best.take() {
                                let _ = fs::remove_file(old);
                            }
                            best = Some((meta, path));
                        } else {
                            let _ = fs::remove_file(&path);
                        }
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "removing an unreadable snapshot");
                        let _ = fs::remove_file(&path);
                    }
                }
            } else {
                let _ = fs::remove_file(&path);
            }
        }
        let applied_index = applied.last.map_or(0, |l| l.index);
        let data = Arc::new(RwLock::new(tree));
        let cow = Arc::new(Mutex::new(None));
        let persister = Persister::start(
            db.clone(),
            data.clone(),
            cow.clone(),
            applied.last.map_or(0, |l| l.index),
            crate::persister::Place {
                dir: sled_dir.clone(),
                faults: crate::fault::Faults::for_store(dir),
            },
        )
        .map_err(|source| SmOpenError::Io { path: dir.to_path_buf(), source })?;
        let shared = Arc::new(Shared {
            db,
            store_tree,
            data,
            state: RwLock::new(state),
            applied: RwLock::new(applied),
            cow,
            persister,
            snap_dir,
            current: Mutex::new(best.clone()),
            receiving: Mutex::new(Vec::new()),
            build_lock: tokio::sync::Mutex::new(()),
            events: EventLog::new(applied_index, cfg.retained_events),
            counter: AtomicU64::new(generation + 1),
            command_version: cfg.command_version,
        });
        let store = StateMachineStore { shared };
        if let Some((meta, path)) = best {
            if meta.last_log_id > store.shared.applied.read().map(|a| a.last).unwrap_or(None) {
                info!(snapshot = %path.display(), "state machine is behind its snapshot; installing it again");
                store.install_from_file(&meta, &path).map_err(|e| SmOpenError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
        info!(
            applied =
                store.shared.applied.read().map(|a| a.last.map_or(0, |l| l.index)).unwrap_or(0),
            tasks = read(&store.shared.state).task_count(),
            sled_open_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "state machine loaded"
        );
        Ok(store)
    }

    /// A read handle for the node.
    pub fn handle(&self) -> SmHandle {
        SmHandle { shared: self.shared.clone() }
    }

    /// Replace the whole state with the snapshot at `path` (blocking IO).
    fn install_from_file(&self, meta: &Meta, path: &Path) -> io::Result<()> {
        let sh = &self.shared;
        let io = |e: sled::Error| io::Error::other(e.to_string());
        let gen = sh.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{DATA_TREE_PREFIX}{gen}");
        let tree = sh.db.open_tree(name.as_bytes()).map_err(io)?;
        tree.clear().map_err(io)?;
        let (mut reader, file_meta) = SnapshotReader::open(path)?;
        if file_meta.last_log_id != meta.last_log_id {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot file does not match its metadata",
            ));
        }
        let mut loader = StateLoader::new();
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        while let Some((k, v)) = reader.next_record()? {
            loader
                .add(&k, &v)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            batch.insert(k, v);
            in_batch += 1;
            if in_batch == 10_000 {
                tree.apply_batch(std::mem::take(&mut batch)).map_err(io)?;
                in_batch = 0;
            }
        }
        batch.insert(APPLIED_KEY, encode(&meta.last_log_id));
        batch.insert(MEMBERSHIP_KEY, encode(&meta.last_membership));
        tree.apply_batch(batch).map_err(io)?;
        sh.db.flush().map_err(io)?;
        // The switch-over: one durable write.
        sh.store_tree.insert(CURRENT_TREE_KEY, name.as_bytes()).map_err(io)?;
        sh.db.flush().map_err(io)?;
        let state = loader.finish();
        let old = {
            let mut data = write(&sh.data);
            let old = data.name();
            *data = tree;
            old
        };
        *write(&sh.state) = state;
        *write(&sh.applied) =
            Applied { last: meta.last_log_id, membership: meta.last_membership.clone() };
        sh.db.drop_tree(&old).map_err(io)?;
        sh.events.reset(meta.last_log_id.map_or(0, |l| l.index));
        Ok(())
    }

    fn snapshot_path(&self, meta: &Meta) -> PathBuf {
        self.shared.snap_dir.join(crate::snapshot::file_name(meta))
    }

    /// Make `path` the current snapshot and delete older ones.
    fn set_current(&self, meta: Meta, path: PathBuf) {
        let old = lock(&self.shared.current).replace((meta, path.clone()));
        if let Some((_, old)) = old {
            if old != path {
                let _ = fs::remove_file(old);
            }
        }
    }
}

enum LoadError {
    Sled(sled::Error),
    Corrupt(String),
}

fn load_tree(tree: &sled::Tree) -> Result<(SchedulerState, Applied), LoadError> {
    let mut loader = StateLoader::new();
    let mut applied = Applied::default();
    for item in tree.iter() {
        let (k, v) = item.map_err(LoadError::Sled)?;
        if k.as_ref() == APPLIED_KEY {
            applied.last = postcard::from_bytes(&v)
                .map_err(|e| LoadError::Corrupt(format!("last applied: {e}")))?;
        } else if k.as_ref() == MEMBERSHIP_KEY {
            applied.membership = postcard::from_bytes(&v)
                .map_err(|e| LoadError::Corrupt(format!("membership: {e}")))?;
        } else {
            loader.add(&k, &v).map_err(|e| LoadError::Corrupt(e.to_string()))?;
        }
    }
    Ok((loader.finish(), applied))
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError> {
        let a = read(&self.shared.applied).clone();
        Ok((a.last, a.membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let sh = &self.shared;
        if let Some(e) = sh.persister.error() {
            return Err(sm_write_err(io::Error::other(e)));
        }
        let mut responses = Vec::new();
        let mut batches = Vec::new();
        let mut changed = BTreeSet::new();
        let mut last = None;
        let mut membership = None;
        let mut records = Vec::new();
        let mut meta = Vec::with_capacity(2);
        {
            let mut st = write(&sh.state);
            for entry in entries {
                last = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => responses.push(Ok(Output::Noop)),
                    EntryPayload::Normal(cmd) => {
                        let needed = match &cmd.op {
                            Op::SetClusterVersion { version } => *version,
                            op => op.version(),
                        };
                        if needed > sh.command_version {
                            let e = format!(
                                "log entry {} ({}) needs command version {needed}; this node \
                                 applies up to {}: upgrade this node to a release that has it",
                                entry.log_id,
                                cmd.op.kind(),
                                sh.command_version
                            );
                            tracing::error!(error = %e, "stopping: the cluster runs a newer version");
                            return Err(sm_write_err(io::Error::other(e)));
                        }
                        let r = st.apply(&cmd);
                        let ch = st.take_changes();
                        changed.extend(ch.records);
                        let planned_at = cmd.op.planned_at().unwrap_or(0);
                        batches.push(EventBatch {
                            index: entry.log_id.index,
                            log_time: st.log_time(),
                            term: entry.log_id.leader_id.term,
                            planned_at,
                            events: ch.events,
                        });
                        responses.push(r);
                    }
                    EntryPayload::Membership(m) => {
                        membership = Some(StoredMembership::new(Some(entry.log_id), m));
                        responses.push(Ok(Output::Noop));
                    }
                }
            }
            let Some(last) = last else { return Ok(responses) };
            // Encoded now, under the lock: the state moves on after this apply.
            records.reserve(changed.len());
            for key in &changed {
                records.push((key.encode(), st.encode_record(key)));
            }
            meta.push((APPLIED_KEY, encode(&Some(last))));
            if let Some(m) = &membership {
                meta.push((MEMBERSHIP_KEY, encode(m)));
            }
        }
        let last = last.expect("checked above");
        sh.persister
            .write(Write { records, meta, index: last.index })
            .await
            .map_err(|e| sm_write_err(io::Error::other(e)))?;
        {
            let mut a = write(&sh.applied);
            a.last = Some(last);
            if let Some(m) = membership {
                a.membership = m;
            }
        }
        sh.events.publish(batches, last.index);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let point = read(&self.shared.applied).clone();
        // The session opens at this point of the persister's queue: after every write up to
        // the snapshot point, before any later one.
        let session = self.shared.persister.start_session().await;
        SnapshotBuilder { store: self.clone(), point, session: Some(session) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let n = self.shared.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.shared.snap_dir.join(format!("receiving-{n}.tmp"));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await
            .map_err(snap_write_err)?;
        lock(&self.shared.receiving).push(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let _build = self.shared.build_lock.lock().await;
        // Everything applied before the install must be in sled before the tree is replaced.
        self.shared.persister.sync().await.map_err(|e| snap_write_err(io::Error::other(e)))?;
        let std_file = snapshot.into_std().await;
        let store = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            std_file.sync_all()?;
            // Find which received file this is, then give it its final name.
            let received = {
                use std::os::unix::fs::MetadataExt;
                let target = std_file.metadata()?;
                let mut receiving = lock(&store.shared.receiving);
                let pos = receiving.iter().position(|p| {
                    fs::metadata(p)
                        .is_ok_and(|m| m.ino() == target.ino() && m.dev() == target.dev())
                });
                pos.map(|i| receiving.remove(i))
            };
            let path = store.snapshot_path(&meta);
            match received {
                Some(received) => fs::rename(&received, &path)?,
                None => {
                    // Data that did not come from begin_receiving_snapshot (e.g. another
                    // store's snapshot handed over directly): keep a copy of our own.
                    use std::io::{Seek, SeekFrom};
                    let mut src = std_file;
                    src.seek(SeekFrom::Start(0))?;
                    let mut dst = fs::File::create(&path)?;
                    io::copy(&mut src, &mut dst)?;
                    dst.sync_all()?;
                }
            }
            fsync_dir(&store.shared.snap_dir)?;
            store.install_from_file(&meta, &path)?;
            store.set_current(meta.clone(), path);
            for stale in lock(&store.shared.receiving).drain(..) {
                let _ = fs::remove_file(stale);
            }
            info!(index = meta.last_log_id.map_or(0, |l| l.index), "installed snapshot");
            Ok(())
        })
        .await
        .map_err(|e| snap_write_err(io::Error::other(e.to_string())))?
        .map_err(snap_write_err)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = lock(&self.shared.current).clone();
        match current {
            None => Ok(None),
            Some((meta, path)) => {
                let file = tokio::fs::File::open(&path).await.map_err(snap_read_err)?;
                Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
            }
        }
    }
}

/// Builds a snapshot from the live sled tree (see the module docs).
pub struct SnapshotBuilder {
    store: StateMachineStore,
    point: Applied,
    session: Option<Result<tokio::sync::oneshot::Receiver<()>, String>>,
}

impl SnapshotBuilder {
    fn build_blocking(&self, meta: &Meta) -> io::Result<PathBuf> {
        let sh = &self.store.shared;
        let io = |e: sled::Error| io::Error::other(e.to_string());
        // Everything applied so far (>= the snapshot point) becomes durable in the state
        // machine before openraft may purge the log behind the snapshot.
        sh.db.flush().map_err(io)?;
        let tmp = sh.snap_dir.join(format!("building-{}.tmp", meta.snapshot_id));
        let mut writer = SnapshotWriter::create(&tmp, meta)?;
        let tree = read(&sh.data).clone();
        for item in tree.iter() {
            let (k, v) = item.map_err(io)?;
            if !RecordKey::is_record_key(&k) {
                continue;
            }
            let value = {
                let mut cow = lock(&sh.cow);
                let c =
                    cow.as_mut().ok_or_else(|| io::Error::other("snapshot session ended early"))?;
                c.position = Some(k.to_vec());
                match c.pre.remove(k.as_ref()) {
                    Some(pre) => pre,
                    None => Some(v),
                }
            };
            if let Some(v) = value {
                writer.record(&k, &v)?;
            }
        }
        let leftovers = lock(&sh.cow).take().map(|c| c.pre).unwrap_or_default();
        for (k, v) in leftovers {
            if let (true, Some(v)) = (RecordKey::is_record_key(&k), v) {
                writer.record(&k, &v)?;
            }
        }
        let count = writer.finish()?;
        let path = self.store.snapshot_path(meta);
        fs::rename(&tmp, &path)?;
        fsync_dir(&sh.snap_dir)?;
        info!(index = meta.last_log_id.map_or(0, |l| l.index), records = count, "built snapshot");
        Ok(path)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let sh = self.store.shared.clone();
        let _build = sh.build_lock.lock().await;
        match self.session.take() {
            Some(Ok(rx)) => {
                rx.await.map_err(|_| snap_write_err(io::Error::other("the persister stopped")))?
            }
            Some(Err(e)) => return Err(snap_write_err(io::Error::other(e))),
            None => return Err(snap_write_err(io::Error::other("snapshot builder used twice"))),
        }
        let n = sh.counter.fetch_add(1, Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: self.point.last,
            last_membership: self.point.membership.clone(),
            snapshot_id: format!("{}-{n}", self.point.last.map_or(0, |l| l.leader_id.term)),
        };
        let builder =
            SnapshotBuilder { store: self.store.clone(), point: self.point.clone(), session: None };
        let meta2 = meta.clone();
        let result = tokio::task::spawn_blocking(move || builder.build_blocking(&meta2)).await;
        // Whatever happened, the session is over.
        lock(&sh.cow).take();
        let path = result
            .map_err(|e| snap_write_err(io::Error::other(e.to_string())))?
            .map_err(snap_write_err)?;
        self.store.set_current(meta.clone(), path.clone());
        let file = tokio::fs::File::open(&path).await.map_err(snap_read_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}
