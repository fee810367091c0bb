//! The persister: writes the state machine's changed records to sled off the apply path.
//!
//! Apply hands each batch of changed records (with `last_applied` and the membership) to one
//! background thread through an ordered, bounded queue, and returns. The thread applies the
//! batches to sled in queue order, each as one atomic `sled::Batch`; when it falls behind it
//! merges consecutive batches (the last value of a key wins), so a task that is submitted,
//! assigned and completed in quick succession costs one sled write, not three. Sled therefore
//! always holds the state as of some applied index — never a mix — and after a crash openraft
//! re-applies the log from there. The bound on the queue is the backpressure: apply waits when
//! the persister is that far behind.
//!
//! Markers travel through the same queue, so they are ordered with the writes:
//! * a **session** marker opens the snapshot's copy-on-write session exactly at the snapshot
//!   point (everything before it is in sled, nothing after it);
//! * a **sync** marker is answered once everything queued before it is in sled.
//!
//! A sled error stops all further writes and is reported by every later call: the node stops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{mpsc, oneshot};
use tracing::error;

use crate::fault::{Faults, Site};

/// How many apply batches may wait for the persister (also bounded by [`QUEUE_BYTES`]).
const QUEUE: usize = 1_024;
/// Encoded bytes that may wait for the persister. This bounds the memory of the queue and the
/// log tail a crashed node re-applies (everything applied but not yet in sled).
const QUEUE_BYTES: usize = 32 << 20;
/// The persister makes sled durable at least this often while writing (sled's own background
/// flush cannot keep up with bulk inserts, and whatever is not durable in sled is re-applied
/// from the Raft log after a crash, which delays the restart).
const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// Stop merging queued batches beyond this many distinct keys.
const MAX_MERGED_KEYS: usize = 100_000;

/// An open copy-on-write session of a snapshot build (see `sm_store`).
pub(crate) struct Cow {
    /// The last key the build has read.
    pub position: Option<Vec<u8>>,
    /// Values as of the snapshot point of keys changed since (`None`: key did not exist).
    pub pre: BTreeMap<Vec<u8>, Option<sled::IVec>>,
}

/// Where the persister writes: the sled directory (named in errors) and its fault hook.
pub(crate) struct Place {
    /// The sled directory.
    pub dir: std::path::PathBuf,
    /// Test-only injected IO errors ([`crate::fault`]).
    pub faults: Faults,
}

/// One apply's changes.
pub(crate) struct Write {
    /// Record keys with their new value (`None`: deleted).
    pub records: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Store keys (last applied, membership) with their values.
    pub meta: Vec<(&'static [u8], Vec<u8>)>,
    /// The last log index the write covers.
    pub index: u64,
}

impl Write {
    /// Queue budget this write uses, in KiB.
    fn kib(&self) -> u32 {
        let records: usize =
            self.records.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        let meta: usize = self.meta.iter().map(|(k, v)| k.len() + v.len()).sum();
        ((records + meta) / 1024 + 1).min(QUEUE_BYTES / 1024) as u32
    }
}

enum Ack {
    Async(oneshot::Sender<Result<(), String>>),
    Blocking(std::sync::mpsc::Sender<Result<(), String>>),
}

impl Ack {
    fn send(self, r: Result<(), String>) {
        match self {
            Ack::Async(tx) => {
                let _ = tx.send(r);
            }
            Ack::Blocking(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

enum Msg {
    /// A write and the queue budget (KiB) it holds.
    Write(Write, u32),
    Session(oneshot::Sender<()>),
    Sync(Ack),
}

/// Handle to the persister thread. Dropping it finishes the queued writes and joins the thread.
pub(crate) struct Persister {
    tx: Option<mpsc::Sender<Msg>>,
    budget: Arc<tokio::sync::Semaphore>,
    thread: Option<std::thread::JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
    persisted: Arc<AtomicU64>,
}

impl Drop for Persister {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Persister {
    /// Start the thread writing into whatever tree `data` holds at the time of each write.
    pub fn start(
        db: sled::Db,
        data: Arc<RwLock<sled::Tree>>,
        cow: Arc<Mutex<Option<Cow>>>,
        persisted_at: u64,
        place: Place,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let error = Arc::new(Mutex::new(None));
        let persisted = Arc::new(AtomicU64::new(persisted_at));
        let budget = Arc::new(tokio::sync::Semaphore::new(QUEUE_BYTES / 1024));
        let (e, p, b) = (error.clone(), persisted.clone(), budget.clone());
        let thread = std::thread::Builder::new()
            .name("sm-persister".into())
            .spawn(move || run(rx, db, data, cow, e, p, b, place))?;
        Ok(Persister { tx: Some(tx), budget, thread: Some(thread), error, persisted })
    }

    /// The first sled failure, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    /// The last log index whose records are in sled.
    pub fn persisted(&self) -> u64 {
        self.persisted.load(Ordering::Acquire)
    }

    fn sender(&self) -> Result<&mpsc::Sender<Msg>, String> {
        if let Some(e) = self.error() {
            return Err(e);
        }
        self.tx.as_ref().ok_or_else(|| "the persister stopped".to_string())
    }

    /// Queue one apply's changes (waits while the queue is full).
    pub async fn write(&self, w: Write) -> Result<(), String> {
        let kib = w.kib();
        let sender = self.sender()?;
        // The persister gives the budget back once the write is in sled.
        self.budget
            .acquire_many(kib)
            .await
            .map_err(|_| "the persister stopped".to_string())?
            .forget();
        sender.send(Msg::Write(w, kib)).await.map_err(|_| "the persister stopped".to_string())
    }

    /// Queue the start of a copy-on-write session; the receiver fires when it is open, which
    /// is when sled holds exactly what was queued before.
    pub async fn start_session(&self) -> Result<oneshot::Receiver<()>, String> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Msg::Session(tx))
            .await
            .map_err(|_| "the persister stopped".to_string())?;
        Ok(rx)
    }

    /// Wait until everything queued so far is in sled.
    pub async fn sync(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(Msg::Sync(Ack::Async(tx)))
            .await
            .map_err(|_| "the persister stopped".to_string())?;
        rx.await.map_err(|_| "the persister stopped".to_string())?
    }

    /// [`Persister::sync`] for blocking contexts.
    pub fn sync_blocking(&self) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::channel();
        // `blocking_send` refuses to run on a runtime thread; polling a full queue works in
        // both kinds of context (this is only used on shutdown and in tests).
        let mut msg = Msg::Sync(Ack::Blocking(tx));
        loop {
            match self.sender()?.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Full(m)) => {
                    msg = m;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err("the persister stopped".into())
                }
            }
        }
        rx.recv().map_err(|_| "the persister stopped".to_string())?
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    mut rx: mpsc::Receiver<Msg>,
    db: sled::Db,
    data: Arc<RwLock<sled::Tree>>,
    cow: Arc<Mutex<Option<Cow>>>,
    error: Arc<Mutex<Option<String>>>,
    persisted: Arc<AtomicU64>,
    budget: Arc<tokio::sync::Semaphore>,
    place: Place,
) {
    let mut pending: Option<Msg> = None;
    let mut last_flush = std::time::Instant::now();
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match rx.blocking_recv() {
                Some(m) => m,
                None => return,
            },
        };
        match msg {
            Msg::Write(first, kib) => {
                let mut records: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
                let mut meta: BTreeMap<&'static [u8], Vec<u8>> = BTreeMap::new();
                let mut index = first.index;
                let mut used = kib as usize;
                let mut absorb =
                    |w: Write, records: &mut BTreeMap<_, _>, meta: &mut BTreeMap<_, _>| {
                        records.extend(w.records);
                        meta.extend(w.meta);
                        index = w.index;
                    };
                absorb(first, &mut records, &mut meta);
                while records.len() < MAX_MERGED_KEYS {
                    match rx.try_recv() {
                        Ok(Msg::Write(w, kib)) => {
                            used += kib as usize;
                            absorb(w, &mut records, &mut meta)
                        }
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if lock(&error).is_some() {
                    budget.add_permits(used);
                    continue;
                }
                let mut result = match place.faults.check(Site::SmWrite) {
                    Ok(()) => write(&data, &cow, records, meta),
                    Err(e) => Err(sled::Error::Io(e)),
                };
                budget.add_permits(used);
                if result.is_ok() && last_flush.elapsed() >= FLUSH_EVERY {
                    result = db.flush().map(|_| ());
                    last_flush = std::time::Instant::now();
                }
                match result {
                    Ok(()) => persisted.store(index, Ordering::Release),
                    Err(e) => {
                        let path = place.dir.display();
                        error!(error = %e, %path, "writing the state machine to sled failed; the node must stop");
                        *lock(&error) = Some(format!("state machine write to {path} failed: {e}"));
                    }
                }
            }
            Msg::Session(ack) => {
                *lock(&cow) = Some(Cow { position: None, pre: BTreeMap::new() });
                let _ = ack.send(());
            }
            Msg::Sync(ack) => ack.send(lock(&error).clone().map_or(Ok(()), Err)),
        }
    }
}

fn write(
    data: &RwLock<sled::Tree>,
    cow: &Mutex<Option<Cow>>,
    records: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    meta: BTreeMap<&'static [u8], Vec<u8>>,
) -> Result<(), sled::Error> {
    let tree = data.read().unwrap_or_else(|e| e.into_inner());
    let mut batch = sled::Batch::default();
    // Hold the session lock across recording pre-images and writing, so the snapshot build
    // never reads a new value of a key it has not passed yet without seeing its pre-image.
    let mut session = lock(cow);
    for (k, v) in records {
        if let Some(c) = session.as_mut() {
            if c.position.as_ref().is_none_or(|p| k > *p) && !c.pre.contains_key(&k) {
                let old = tree.get(&k)?;
                c.pre.insert(k.clone(), old);
            }
        }
        match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        }
    }
    for (k, v) in meta {
        batch.insert(k, v);
    }
    tree.apply_batch(batch)
}
