//! The persistence shape: how the state is cut into records and how records are encoded.
//!
//! The `raft` crate stores each record under [`RecordKey::encode`] in sled and writes only
//! the keys an apply reported in [`crate::Changes::records`]. Keys sort (as bytes) in the same
//! order as [`SchedulerState::records`] yields them — meta, paused queues by name, task chunks
//! by id, workers by id, tokens by name — so a digest computed from sled and one computed from
//! memory agree.
//!
//! Tasks are stored in **chunks** of [`CHUNK_TASKS`] consecutive ids, one record per chunk:
//! a task is found by `id / CHUNK_TASKS`, and a change to any task rewrites its chunk. Sled
//! 0.34 keeps well over a kilobyte of memory per key it has written and spends ~8 µs on each
//! new key, so one key per task made sled the largest cost in memory, bulk submits and restart
//! time; chunks divide those by 32 at the price of re-encoding up to 31 neighbours when a
//! single task changes (microseconds, against a Raft commit of about a millisecond).
//!
//! Values are `[version][postcard(Record)]`. The version byte lets a later release read older
//! records; a record with an unknown version is refused rather than misread. Each record is
//! written in the oldest version that holds it ([`RecordRef::encode`]), so a rolling upgrade
//! writes what the previous release reads until the cluster version enables what it cannot.

use serde::{Deserialize, Serialize};

use crate::model::{ApiToken, Meta, PausedQueue, Task, TaskId, Worker, WorkerId};
use crate::state::SchedulerState;

/// Format version of encoded records (first byte of every value).
pub const RECORD_VERSION: u8 = 4;

/// The previous format, still read: version 3 tasks had no `attempt_base` (nor were there
/// paused-queue records).
const RECORD_VERSION_3: u8 = 3;

/// An older format, still read: version 2 workers had no `owner` either.
const RECORD_VERSION_2: u8 = 2;

/// Tasks per chunk record (a power of two: the chunk of task `id` is `id >> CHUNK_BITS`).
pub const CHUNK_TASKS: u64 = 1 << CHUNK_BITS;
const CHUNK_BITS: u32 = 5;

/// Identifies one persisted record.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RecordKey {
    /// The counters record.
    Meta,
    /// The tasks with ids in `[n * CHUNK_TASKS, (n + 1) * CHUNK_TASKS)`.
    TaskChunk(u64),
    /// One worker.
    Worker(WorkerId),
    /// One replicated API token, by name.
    Token(String),
    /// One paused queue, by name.
    Queue(String),
    /// The cluster's command version (absent: [`crate::BASE_COMMAND_VERSION`]).
    ClusterVersion,
}

/// Sorts before every other key; written only once the version was raised, so states of
/// the first release have the same records and digests as before.
const VERSION_PREFIX: u8 = b'c';
const META_PREFIX: u8 = b'm';
const TASK_PREFIX: u8 = b't';
const WORKER_PREFIX: u8 = b'w';
const TOKEN_PREFIX: u8 = b'x';
const QUEUE_PREFIX: u8 = b'q';

impl RecordKey {
    /// The record holding task `id`.
    pub fn of_task(id: TaskId) -> RecordKey {
        RecordKey::TaskChunk(id.0 >> CHUNK_BITS)
    }

    /// The task ids a chunk record covers.
    pub fn chunk_range(chunk: u64) -> std::ops::Range<TaskId> {
        TaskId(chunk << CHUNK_BITS)..TaskId((chunk + 1) << CHUNK_BITS)
    }

    /// Bytes of the key: `m`, `t` + big-endian chunk number, `w` + worker id, `x` + token
    /// name, `q` + queue name.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            RecordKey::Meta => vec![META_PREFIX],
            RecordKey::ClusterVersion => vec![VERSION_PREFIX],
            RecordKey::TaskChunk(n) => {
                let mut k = Vec::with_capacity(9);
                k.push(TASK_PREFIX);
                k.extend_from_slice(&n.to_be_bytes());
                k
            }
            RecordKey::Worker(id) => {
                let mut k = Vec::with_capacity(1 + id.0.len());
                k.push(WORKER_PREFIX);
                k.extend_from_slice(id.0.as_bytes());
                k
            }
            RecordKey::Token(name) => {
                let mut k = Vec::with_capacity(1 + name.len());
                k.push(TOKEN_PREFIX);
                k.extend_from_slice(name.as_bytes());
                k
            }
            RecordKey::Queue(name) => {
                let mut k = Vec::with_capacity(1 + name.len());
                k.push(QUEUE_PREFIX);
                k.extend_from_slice(name.as_bytes());
                k
            }
        }
    }

    /// Parse bytes made by [`RecordKey::encode`].
    pub fn decode(bytes: &[u8]) -> Result<RecordKey, RecordError> {
        match bytes.split_first() {
            Some((&META_PREFIX, [])) => Ok(RecordKey::Meta),
            Some((&VERSION_PREFIX, [])) => Ok(RecordKey::ClusterVersion),
            Some((&TASK_PREFIX, rest)) if rest.len() == 8 => {
                Ok(RecordKey::TaskChunk(u64::from_be_bytes(rest.try_into().expect("8 bytes"))))
            }
            Some((&WORKER_PREFIX, rest)) if !rest.is_empty() => std::str::from_utf8(rest)
                .map(|s| RecordKey::Worker(WorkerId(s.to_string())))
                .map_err(|_| RecordError::BadKey(bytes.to_vec())),
            Some((&TOKEN_PREFIX, rest)) if !rest.is_empty() => std::str::from_utf8(rest)
                .map(|s| RecordKey::Token(s.to_string()))
                .map_err(|_| RecordError::BadKey(bytes.to_vec())),
            Some((&QUEUE_PREFIX, rest)) if !rest.is_empty() => std::str::from_utf8(rest)
                .map(|s| RecordKey::Queue(s.to_string()))
                .map_err(|_| RecordError::BadKey(bytes.to_vec())),
            _ => Err(RecordError::BadKey(bytes.to_vec())),
        }
    }

    /// True for bytes that could be a record key (the store keeps its own keys elsewhere).
    pub fn is_record_key(bytes: &[u8]) -> bool {
        matches!(
            bytes.first(),
            Some(
                &VERSION_PREFIX
                    | &META_PREFIX
                    | &TASK_PREFIX
                    | &WORKER_PREFIX
                    | &TOKEN_PREFIX
                    | &QUEUE_PREFIX
            )
        )
    }
}

/// A record value, owned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The counters.
    Meta(Meta),
    /// The tasks of one chunk, by id.
    TaskChunk(Vec<Task>),
    /// A worker.
    Worker(Worker),
    /// A replicated API token.
    Token(ApiToken),
    /// A paused queue.
    Queue(PausedQueue),
    /// The cluster's command version.
    ClusterVersion(u32),
}

/// A record value, borrowed from the state. Serializes exactly like [`Record`].
#[derive(Clone, Debug, Serialize)]
pub enum RecordRef<'a> {
    /// The counters.
    Meta(&'a Meta),
    /// The tasks of one chunk, by id.
    TaskChunk(Vec<&'a Task>),
    /// A worker.
    Worker(&'a Worker),
    /// A replicated API token.
    Token(&'a ApiToken),
    /// A paused queue.
    Queue(&'a PausedQueue),
    /// The cluster's command version.
    ClusterVersion(u32),
}

impl RecordRef<'_> {
    /// `[version][postcard]`, in the **oldest** format that holds the record: version 3
    /// (what the previous release reads) unless it has something only version 4 has (a
    /// paused queue, the cluster version, a task with a retry budget reset). Those exist only
    /// once the cluster version allows the operations that make them, so during a rolling
    /// upgrade every record, every snapshot and every digest is the same as the previous
    /// release would make: an older node can install a snapshot from a newer leader, and
    /// replicas of both releases agree on digests.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            RecordRef::Meta(_) | RecordRef::Worker(_) | RecordRef::Token(_) => {
                // Variants 0..4 are laid out alike in versions 3 and 4.
                out.push(RECORD_VERSION_3);
                postcard::to_io(self, &mut out)
            }
            RecordRef::TaskChunk(tasks) if tasks.iter().all(|t| t.attempt_base == 0) => {
                out.push(RECORD_VERSION_3);
                let v3: Vec<v3::TaskRef<'_>> =
                    tasks.iter().map(|t| v3::TaskRef::from(*t)).collect();
                postcard::to_io(&v3::RecordRef::TaskChunk(v3), &mut out)
            }
            _ => {
                out.push(RECORD_VERSION);
                postcard::to_io(self, &mut out)
            }
        }
        .expect("encoding to a Vec cannot fail");
        out
    }
}

impl Record {
    /// Decode a value made by [`RecordRef::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        match bytes.split_first() {
            Some((&RECORD_VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|e| RecordError::BadValue(e.to_string()))
            }
            Some((&RECORD_VERSION_3, rest)) => postcard::from_bytes::<v3::Record>(rest)
                .map(Record::from)
                .map_err(|e| RecordError::BadValue(e.to_string())),
            Some((&RECORD_VERSION_2, rest)) => postcard::from_bytes::<v2::Record>(rest)
                .map(Record::from)
                .map_err(|e| RecordError::BadValue(e.to_string())),
            Some((v, _)) => Err(RecordError::UnknownVersion(*v)),
            None => Err(RecordError::BadValue("empty value".into())),
        }
    }
}

/// Version 3 of the record format: as 4, without a task's `attempt_base`.
mod v3 {
    use serde::{Deserialize, Serialize};

    use crate::model::{
        ApiToken, AttemptFailure, Fence, Meta, Millis, TaskId, TaskSpec, TaskState, Worker,
    };

    #[derive(Deserialize)]
    pub(super) enum Record {
        Meta(Meta),
        TaskChunk(Vec<Task>),
        Worker(Worker),
        Token(ApiToken),
    }

    #[derive(Deserialize)]
    pub(super) struct Task {
        id: TaskId,
        spec: TaskSpec,
        deps: Vec<TaskId>,
        submitted_at: Millis,
        updated_at: Millis,
        attempt: u32,
        last_fence: Fence,
        last_failure: Option<Box<AttemptFailure>>,
        state: TaskState,
    }

    /// A task as version 3 lays it out, borrowed, for writing.
    #[derive(Serialize)]
    pub(super) struct TaskRef<'a> {
        id: &'a TaskId,
        spec: &'a TaskSpec,
        deps: &'a Vec<TaskId>,
        submitted_at: &'a Millis,
        updated_at: &'a Millis,
        attempt: &'a u32,
        last_fence: &'a Fence,
        last_failure: &'a Option<Box<AttemptFailure>>,
        state: &'a TaskState,
    }

    impl<'a> From<&'a crate::model::Task> for TaskRef<'a> {
        fn from(t: &'a crate::model::Task) -> Self {
            TaskRef {
                id: &t.id,
                spec: &t.spec,
                deps: &t.deps,
                submitted_at: &t.submitted_at,
                updated_at: &t.updated_at,
                attempt: &t.attempt,
                last_fence: &t.last_fence,
                last_failure: &t.last_failure,
                state: &t.state,
            }
        }
    }

    /// The record enum of version 3 (only the task chunk is written through it; its variant
    /// index must stay that of [`Record::TaskChunk`]).
    #[derive(Serialize)]
    pub(super) enum RecordRef<'a> {
        #[allow(dead_code)]
        Meta(&'a Meta),
        TaskChunk(Vec<TaskRef<'a>>),
    }

    impl From<Task> for crate::model::Task {
        fn from(t: Task) -> crate::model::Task {
            crate::model::Task {
                id: t.id,
                spec: t.spec,
                deps: t.deps,
                submitted_at: t.submitted_at,
                updated_at: t.updated_at,
                attempt: t.attempt,
                last_fence: t.last_fence,
                last_failure: t.last_failure,
                state: t.state,
                attempt_base: 0,
            }
        }
    }

    impl From<Record> for super::Record {
        fn from(r: Record) -> super::Record {
            match r {
                Record::Meta(m) => super::Record::Meta(m),
                Record::TaskChunk(t) => {
                    super::Record::TaskChunk(t.into_iter().map(Into::into).collect())
                }
                Record::Worker(w) => super::Record::Worker(w),
                Record::Token(t) => super::Record::Token(t),
            }
        }
    }
}

/// Version 2 of the record format: as 3, without a worker's `owner`.
mod v2 {
    use serde::Deserialize;

    use crate::model::{Meta, Millis, WorkerSpec, WorkerStatus};

    #[derive(Deserialize)]
    pub(super) enum Record {
        Meta(Meta),
        TaskChunk(Vec<super::v3::Task>),
        Worker(Worker),
    }

    #[derive(Deserialize)]
    pub(super) struct Worker {
        spec: WorkerSpec,
        instance: u64,
        session: u64,
        status: WorkerStatus,
        registered_at: Millis,
    }

    impl From<Record> for super::Record {
        fn from(r: Record) -> super::Record {
            match r {
                Record::Meta(m) => super::Record::Meta(m),
                Record::TaskChunk(t) => {
                    super::Record::TaskChunk(t.into_iter().map(Into::into).collect())
                }
                Record::Worker(w) => super::Record::Worker(crate::model::Worker {
                    spec: w.spec,
                    instance: w.instance,
                    session: w.session,
                    status: w.status,
                    registered_at: w.registered_at,
                    owner: String::new(),
                }),
            }
        }
    }
}

/// Decoding failures: the stored data is not what this build wrote.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// A key with an unknown shape.
    #[error("malformed record key {0:?}")]
    BadKey(Vec<u8>),
    /// A value that does not decode.
    #[error("malformed record value: {0}")]
    BadValue(String),
    /// A value written by a newer format.
    #[error("record format version {0} is not supported (this build reads {RECORD_VERSION})")]
    UnknownVersion(u8),
    /// The key and the value disagree (e.g. a task record under a worker key).
    #[error("record under key {0:?} has the wrong kind or id")]
    Mismatch(RecordKey),
}

/// A 64-bit FNV-1a hash, incrementally fed: the state digest used to compare replicas.
#[derive(Clone, Copy, Debug)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Feed one record (length-prefixed key and value, so boundaries count).
    pub fn record(&mut self, key: &[u8], value: &[u8]) {
        self.update(&(key.len() as u64).to_le_bytes());
        self.update(key);
        self.update(&(value.len() as u64).to_le_bytes());
        self.update(value);
    }

    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Rebuilds a [`SchedulerState`] from encoded records, in any order.
#[derive(Default)]
pub struct StateLoader {
    meta: Option<Meta>,
    tasks: Vec<Task>,
    workers: Vec<Worker>,
    tokens: Vec<ApiToken>,
    queues: Vec<PausedQueue>,
    cluster_version: Option<u32>,
}

impl StateLoader {
    /// An empty loader.
    pub fn new() -> Self {
        StateLoader::default()
    }

    /// Add one encoded record.
    pub fn add(&mut self, key: &[u8], value: &[u8]) -> Result<(), RecordError> {
        let key = RecordKey::decode(key)?;
        match (Record::decode(value)?, &key) {
            (Record::Meta(m), RecordKey::Meta) => self.meta = Some(m),
            (Record::TaskChunk(tasks), RecordKey::TaskChunk(n)) => {
                let range = RecordKey::chunk_range(*n);
                if tasks.iter().any(|t| !range.contains(&t.id)) {
                    return Err(RecordError::Mismatch(key));
                }
                self.tasks.extend(tasks);
            }
            (Record::Worker(w), RecordKey::Worker(id)) if w.spec.id == *id => self.workers.push(w),
            (Record::Token(t), RecordKey::Token(name)) if t.name == *name => self.tokens.push(t),
            (Record::Queue(q), RecordKey::Queue(name)) if q.queue == *name => self.queues.push(q),
            (Record::ClusterVersion(v), RecordKey::ClusterVersion) => {
                self.cluster_version = Some(v)
            }
            _ => return Err(RecordError::Mismatch(key)),
        }
        Ok(())
    }

    /// The state (an empty one if no meta record was seen: a fresh store).
    pub fn finish(mut self) -> SchedulerState {
        self.tasks.sort_by_key(|t| t.id);
        let mut s = SchedulerState::from_records(
            self.meta.unwrap_or_else(Meta::initial),
            self.tasks,
            self.workers,
            self.tokens,
            self.queues,
        );
        s.cluster_version = self.cluster_version.unwrap_or(crate::BASE_COMMAND_VERSION);
        s
    }
}

impl SchedulerState {
    /// The encoded current value of a record (`None`: it was deleted).
    pub fn encode_record(&self, key: &RecordKey) -> Option<Vec<u8>> {
        match key {
            RecordKey::Meta => Some(RecordRef::Meta(&self.meta).encode()),
            RecordKey::TaskChunk(n) => {
                let tasks: Vec<&Task> =
                    self.tasks.range(RecordKey::chunk_range(*n)).map(|(_, t)| &**t).collect();
                (!tasks.is_empty()).then(|| RecordRef::TaskChunk(tasks).encode())
            }
            RecordKey::Worker(id) => self.workers.get(id).map(|w| RecordRef::Worker(w).encode()),
            RecordKey::Token(name) => self.tokens.get(name).map(|t| RecordRef::Token(t).encode()),
            RecordKey::Queue(name) => self.paused.get(name).map(|q| RecordRef::Queue(q).encode()),
            RecordKey::ClusterVersion => (self.cluster_version != crate::BASE_COMMAND_VERSION)
                .then(|| RecordRef::ClusterVersion(self.cluster_version).encode()),
        }
    }

    /// Every record, in key order (the cluster version once raised, meta, paused queues by
    /// name, task chunks, workers by id, tokens by name).
    pub fn records(&self) -> impl Iterator<Item = (RecordKey, RecordRef<'_>)> {
        let version = (self.cluster_version != crate::BASE_COMMAND_VERSION).then_some((
            RecordKey::ClusterVersion,
            RecordRef::ClusterVersion(self.cluster_version),
        ));
        let mut chunks: Vec<(RecordKey, RecordRef<'_>)> = Vec::new();
        for (id, t) in &self.tasks {
            let key = RecordKey::of_task(*id);
            match chunks.last_mut() {
                Some((k, RecordRef::TaskChunk(v))) if *k == key => v.push(&**t),
                _ => chunks.push((key, RecordRef::TaskChunk(vec![&**t]))),
            }
        }
        // Key bytes sort `c` < `m` < `q` < `t` < `w` < `x`.
        version
            .into_iter()
            .chain(std::iter::once((RecordKey::Meta, RecordRef::Meta(&self.meta))))
            .chain(
                self.paused.iter().map(|(n, q)| (RecordKey::Queue(n.clone()), RecordRef::Queue(q))),
            )
            .chain(chunks)
            .chain(
                self.workers
                    .iter()
                    .map(|(id, w)| (RecordKey::Worker(id.clone()), RecordRef::Worker(w))),
            )
            .chain(
                self.tokens.iter().map(|(n, t)| (RecordKey::Token(n.clone()), RecordRef::Token(t))),
            )
    }

    /// Digest of all records in key order; equal states have equal digests on every replica.
    pub fn digest(&self) -> u64 {
        let mut d = Digest::default();
        for (k, v) in self.records() {
            d.record(&k.encode(), &v.encode());
        }
        d.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_like_records() {
        let keys = vec![
            RecordKey::ClusterVersion,
            RecordKey::Meta,
            RecordKey::Queue("a".into()),
            RecordKey::Queue("b".into()),
            RecordKey::TaskChunk(0),
            RecordKey::TaskChunk(256),
            RecordKey::TaskChunk(u64::MAX),
            RecordKey::Worker(WorkerId("a".into())),
            RecordKey::Worker(WorkerId("b".into())),
            RecordKey::Token("t".into()),
        ];
        for k in &keys {
            assert_eq!(&RecordKey::decode(&k.encode()).unwrap(), k);
        }
        let mut encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.encode()).collect();
        let before = encoded.clone();
        encoded.sort();
        assert_eq!(encoded, before, "byte order must equal record order");
        assert!(RecordKey::decode(b"x").is_err());
        assert!(RecordKey::decode(b"t123").is_err());
    }

    #[test]
    fn unknown_versions_are_refused() {
        let v = RecordRef::Meta(&Meta::initial()).encode();
        assert!(Record::decode(&v).is_ok());
        let mut bad = v.clone();
        bad[0] = 9;
        assert_eq!(Record::decode(&bad), Err(RecordError::UnknownVersion(9)));
    }

    #[test]
    fn records_are_written_in_the_oldest_format_that_holds_them() {
        use crate::model::{TaskSpec, TaskState};
        let mut t = Task {
            id: TaskId(7),
            spec: TaskSpec::new("a"),
            deps: vec![],
            submitted_at: 1,
            updated_at: 2,
            attempt: 1,
            last_fence: crate::model::Fence(3),
            last_failure: None,
            state: TaskState::Queued { since: 2 },
            attempt_base: 0,
        };
        // What the previous release wrote and reads: version 3, decoded by its own layout.
        let old = RecordRef::TaskChunk(vec![&t]).encode();
        assert_eq!(old[0], RECORD_VERSION_3);
        assert!(postcard::from_bytes::<v3::Record>(&old[1..]).is_ok());
        assert_eq!(Record::decode(&old).unwrap(), Record::TaskChunk(vec![t.clone()]));
        let meta = RecordRef::Meta(&Meta::initial()).encode();
        assert_eq!(meta[0], RECORD_VERSION_3);
        assert!(matches!(postcard::from_bytes::<v3::Record>(&meta[1..]), Ok(v3::Record::Meta(_))));
        // A task with what only version 4 has is written as version 4, and read back whole.
        t.attempt_base = 2;
        let new = RecordRef::TaskChunk(vec![&t]).encode();
        assert_eq!(new[0], RECORD_VERSION);
        assert_eq!(Record::decode(&new).unwrap(), Record::TaskChunk(vec![t]));
        assert_eq!(RecordRef::ClusterVersion(2).encode()[0], RECORD_VERSION);
    }

    #[test]
    fn version_3_tasks_decode_as_never_retried() {
        use crate::model::{AttemptFailure, Fence, TaskSpec, TaskState};
        // The version 3 shape, written the way version 3 wrote it.
        #[derive(serde::Serialize)]
        #[allow(clippy::type_complexity)]
        struct TaskV3(
            TaskId,
            TaskSpec,
            Vec<TaskId>,
            u64,
            u64,
            u32,
            Fence,
            Option<Box<AttemptFailure>>,
            TaskState,
        );
        #[derive(serde::Serialize)]
        enum RecordV3 {
            _Meta(Meta),
            TaskChunk(Vec<TaskV3>),
        }
        let old = TaskV3(
            TaskId(5),
            TaskSpec::new("a"),
            vec![TaskId(4)],
            1,
            2,
            3,
            Fence(9),
            None,
            TaskState::Failed { at: 2 },
        );
        let mut bytes = vec![3u8];
        bytes.extend(postcard::to_allocvec(&RecordV3::TaskChunk(vec![old])).unwrap());
        let Record::TaskChunk(tasks) = Record::decode(&bytes).unwrap() else { panic!("tasks") };
        let t = &tasks[0];
        assert_eq!((t.id, t.attempt, t.last_fence, t.attempt_base), (TaskId(5), 3, Fence(9), 0));
        assert_eq!(
            (t.deps.clone(), t.state.clone()),
            (vec![TaskId(4)], TaskState::Failed { at: 2 })
        );
    }

    #[test]
    fn version_2_workers_decode_without_an_owner() {
        use crate::model::{Resources, WorkerSpec, WorkerStatus};
        // The version 2 shape, written the way version 2 wrote it.
        #[derive(serde::Serialize)]
        enum RecordV2 {
            _Meta(Meta),
            _TaskChunk(Vec<Task>),
            Worker(WorkerSpec, u64, u64, WorkerStatus, u64),
        }
        let spec = WorkerSpec {
            id: WorkerId("w1".into()),
            queues: vec!["default".into()],
            labels: Default::default(),
            capacity: Resources::default(),
            slots: 2,
        };
        let mut bytes = vec![2u8];
        bytes.extend(
            postcard::to_allocvec(&RecordV2::Worker(spec.clone(), 7, 3, WorkerStatus::Alive, 99))
                .unwrap(),
        );
        let Record::Worker(w) = Record::decode(&bytes).unwrap() else { panic!("a worker") };
        assert_eq!((&w.spec, w.instance, w.session, w.registered_at), (&spec, 7, 3, 99));
        assert_eq!(w.owner, "");
        // Written again, it is version 3 and keeps the owner.
        let w = Worker { owner: "ci".into(), ..w };
        let v3 = RecordRef::Worker(&w).encode();
        assert_eq!(v3[0], RECORD_VERSION_3);
        assert_eq!(Record::decode(&v3).unwrap(), Record::Worker(w));
    }
}
