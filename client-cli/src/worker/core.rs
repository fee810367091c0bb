//! The worker's protocol as a pure, synchronous state machine.
//!
//! [`Core::step`] takes one [`Input`] (something that happened: an assignment arrived, a job
//! ended, a Report RPC was answered, time passed) and returns the [`Effect`]s the runtime must
//! carry out (start or stop a job, send reports, open the stream, register...). The core does
//! no I/O, spawns nothing and never reads a clock: time arrives inside the inputs. Every
//! transition is therefore a plain function call, tested below by feeding inputs and asserting
//! the exact effects, in the style of openraft's engine tests.
//!
//! Invariants kept here:
//! * every `(task, fence)` is held at most once, and a finished one is remembered in a bounded
//!   set ([`RECENT_CAPACITY`]) so resends of its assignment are ignored;
//! * an entry is only forgotten once its job ended ([`Input::JobEnded`]), so a job is never
//!   orphaned;
//! * inputs tagged with an older stream or session generation change nothing;
//! * at most one Report RPC is in flight; reports queued meanwhile leave together, at most
//!   [`MAX_REPORT_BATCH`] at a time.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use proto::pb;
use proto::pb::task_report::Outcome as PbOutcome;

use super::{Job, Outcome, ReportAnswer, ReportKind, StopReason, WorkerEvent, WorkerStats};

/// Reports sent in one Report RPC at most.
pub(crate) const MAX_REPORT_BATCH: usize = 512;
/// Finished attempts remembered to ignore late resends of their assignments.
pub(crate) const RECENT_CAPACITY: usize = 65_536;

/// An attempt: `(task, fence)`.
pub(crate) type Key = (u64, u64);

/// What the core needs to know about the worker.
#[derive(Clone, Debug)]
pub(crate) struct CoreConfig {
    /// The worker id (jobs carry it; recovered tasks must name it).
    pub id: String,
    /// At drain, how long running jobs may take before they are stopped.
    pub drain_grace: Duration,
    /// After stopping the remaining jobs, how long to wait for them to exit.
    pub stop_grace: Duration,
}

/// A session granted by RegisterWorker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Session {
    pub id: u64,
    pub heartbeat_interval: Duration,
    pub ttl: Duration,
}

/// What a queued report is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// `Started`: the attempt goes on after it.
    Progress,
    /// `Succeeded`/`Failed` of a held attempt: the answer ends its entry.
    Final,
    /// A final failure for an attempt the server lists but this worker cannot run: no entry.
    Orphan,
}

/// How a queued report travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SendMode {
    /// With the other queued reports.
    Batched,
    /// Alone: it was part of a batch the server refused as a whole.
    Solo,
}

/// A report waiting to be sent (or in flight).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PendingReport {
    pub task: u64,
    pub fence: u64,
    pub outcome: PbOutcome,
    pub role: Role,
    pub mode: SendMode,
}

impl PendingReport {
    fn new(task: u64, fence: u64, outcome: PbOutcome, role: Role) -> Self {
        PendingReport { task, fence, outcome, role, mode: SendMode::Batched }
    }

    pub(crate) fn kind(&self) -> ReportKind {
        match self.outcome {
            PbOutcome::Started(_) => ReportKind::Started,
            PbOutcome::Succeeded(_) => ReportKind::Succeeded,
            PbOutcome::Failed(_) => ReportKind::Failed,
        }
    }

    fn is_final(&self) -> bool {
        self.role != Role::Progress
    }

    pub(crate) fn to_pb(&self) -> pb::TaskReport {
        pb::TaskReport { task: self.task, fence: self.fence, outcome: Some(self.outcome.clone()) }
    }
}

/// The server's verdict on one report of an answered Report RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Applied now.
    Applied,
    /// Applied before (a resend): counts as delivered.
    Duplicate,
    /// Refused: dropped, never retried.
    Refused {
        /// The server's reason.
        error: String,
        /// The fencing token is stale or the attempt is not this worker's (otherwise the
        /// report itself was invalid, or the task had already finished).
        stale: bool,
    },
}

/// How a Report RPC ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ReportRpc {
    /// Answered, one verdict per report, in order.
    Answered(Vec<Verdict>),
    /// No answer (cluster unreachable): resend the same reports, same fences, after a pause.
    Unreachable(String),
    /// The RPC as a whole was refused.
    Refused {
        /// The whole error, for logs and events.
        error: String,
        /// The server's message alone.
        message: String,
        /// INVALID_ARGUMENT / RESOURCE_EXHAUSTED: likely a result over the server's limit.
        too_big: bool,
    },
}

/// Why the assignment stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamError {
    pub error: String,
    /// NOT_FOUND / FAILED_PRECONDITION: the server expired the session.
    pub session_lost: bool,
}

/// Something that happened, fed to [`Core::step`].
#[derive(Debug)]
pub(crate) enum Input {
    /// RegisterWorker succeeded.
    Registered { session: Session, requeued: Vec<u64> },
    /// The stream of generation `gen` is open.
    StreamOpened { gen: u64 },
    /// An assignment arrived on stream `gen`.
    Assignment { gen: u64, assignment: pb::Assignment },
    /// A revoke arrived on stream `gen`.
    Revoke { gen: u64, revoke: pb::Revoke },
    /// A message without content arrived on stream `gen` (it still proves the stream works).
    StreamMessage { gen: u64 },
    /// A resync (every attempt the server says this worker holds) arrived on stream `gen`.
    Resync { gen: u64, resync: pb::Resync },
    /// Stream `gen` ended.
    StreamEnded { gen: u64, error: Option<StreamError> },
    /// The backoff after stream `gen` ended is over: reopen it.
    Reopen { gen: u64 },
    /// A heartbeat of `session` failed.
    HeartbeatFailed { session: u64, error: String, session_lost: bool },
    /// A heartbeat answer of `session` says the cluster drains this worker.
    ServerDraining { session: u64 },
    /// A job's handler returned.
    JobEnded { task: u64, fence: u64, outcome: Outcome },
    /// A running job's deadline passed.
    DeadlinePassed { task: u64, fence: u64 },
    /// The start-report delay of an attempt passed.
    StartDue { task: u64, fence: u64 },
    /// The Report RPC carrying `batch` ended.
    ReportAnswered { batch: Vec<PendingReport>, answer: ReportRpc },
    /// The pause after an unreachable cluster is over: send the queued reports.
    ReportRetry,
    /// A task listed by a resync of generation `gen`, read back.
    Recovered { gen: u64, task: u64, fence: u64, found: Option<Box<pb::Task>> },
    /// Graceful shutdown asked (or shutdown while registering).
    Drain { now: Instant },
    /// Immediate shutdown asked.
    StopNow { now: Instant },
    /// Time passed (the runtime wakes at [`Core::next_wake`]).
    Tick { now: Instant },
}

/// What the runtime must do.
#[derive(Debug, PartialEq)]
pub(crate) enum Effect {
    /// Tell the event sink.
    Event(WorkerEvent),
    /// Register (again): the session is gone.
    Register,
    /// Heartbeat `session` (replacing any heartbeat task).
    StartHeartbeat(Session),
    /// Open the assignment stream as generation `gen` (replacing any stream task).
    OpenStream { gen: u64 },
    /// After the stream backoff, feed [`Input::Reopen`] with `gen`.
    ReopenStreamLater { gen: u64 },
    /// Stop the stream and heartbeat tasks.
    StopNetwork,
    /// Tell the server to send no new work.
    DrainWorker,
    /// Run a job (and watch its deadline, feeding [`Input::DeadlinePassed`]).
    StartJob(Job),
    /// After the start-report delay, feed [`Input::StartDue`].
    ScheduleStartReport { task: u64, fence: u64 },
    /// Fire the job's stop signal.
    StopJob { task: u64, fence: u64, reason: StopReason },
    /// Send one Report RPC; feed [`Input::ReportAnswered`] with the batch.
    SendReports(Vec<PendingReport>),
    /// After the report retry pause, feed [`Input::ReportRetry`].
    RetryReportsLater,
    /// Read the task and feed [`Input::Recovered`] with `gen`.
    FetchTask { gen: u64, task: u64, fence: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The handler is running.
    Running,
    /// The deadline passed and the handler was told to stop; its end is reported as a
    /// retryable "timed out" failure.
    TimedOut,
    /// The handler was told to stop; its outcome will not be reported.
    Stopping(StopReason),
    /// The handler returned; the final report is queued or in flight.
    Reporting,
}

#[derive(Debug)]
struct Held {
    phase: Phase,
    /// The server handed the attempt back while it was stopping: run it again afterwards.
    redeliver: Option<pb::Assignment>,
}

/// Where the report queue stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReportFlow {
    /// Nothing in flight: queued reports leave at once.
    Idle,
    /// One Report RPC in flight: new reports wait for its answer.
    InFlight,
    /// The cluster was unreachable: wait for [`Input::ReportRetry`].
    Pausing,
}

/// Whether the worker takes new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lifecycle {
    Running,
    /// No new work; running jobs are stopped at `stop_all_at`, and the worker leaves at
    /// `give_up_at` even if stopped jobs did not exit.
    Draining {
        stop_all_at: Option<Instant>,
        give_up_at: Option<Instant>,
    },
}

/// Recently finished attempts, bounded (oldest forgotten first).
#[derive(Default)]
pub(crate) struct Recent {
    set: HashSet<Key>,
    order: VecDeque<Key>,
}

impl Recent {
    pub(crate) fn insert(&mut self, key: Key) {
        if self.set.insert(key) {
            self.order.push_back(key);
            if self.order.len() > RECENT_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    pub(crate) fn contains(&self, key: &Key) -> bool {
        self.set.contains(key)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

/// The worker's state; see the module doc.
pub(crate) struct Core {
    config: CoreConfig,
    session: Option<Session>,
    /// Increases with every stream opened and every session change.
    gen: u64,
    held: BTreeMap<Key, Held>,
    recent: Recent,
    pending: VecDeque<PendingReport>,
    flow: ReportFlow,
    lifecycle: Lifecycle,
    warned_draining: bool,
    stats: WorkerStats,
    out: Vec<Effect>,
}

impl Core {
    pub(crate) fn new(config: CoreConfig) -> Self {
        Core {
            config,
            session: None,
            gen: 0,
            held: BTreeMap::new(),
            recent: Recent::default(),
            pending: VecDeque::new(),
            flow: ReportFlow::Idle,
            lifecycle: Lifecycle::Running,
            warned_draining: false,
            stats: WorkerStats::default(),
            out: Vec::new(),
        }
    }

    /// The current stream/session generation.
    pub(crate) fn gen(&self) -> u64 {
        self.gen
    }

    /// The current session, if registered.
    pub(crate) fn session(&self) -> Option<Session> {
        self.session
    }

    pub(crate) fn draining(&self) -> bool {
        self.lifecycle != Lifecycle::Running
    }

    pub(crate) fn stats(&self) -> &WorkerStats {
        &self.stats
    }

    /// Ends the session (at leave); the runtime deregisters it.
    pub(crate) fn take_session(&mut self) -> Option<Session> {
        self.session.take()
    }

    /// When the runtime must feed [`Input::Tick`] (or check [`Core::should_exit`]).
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        match self.lifecycle {
            Lifecycle::Running => None,
            Lifecycle::Draining { stop_all_at, give_up_at } => give_up_at.or(stop_all_at),
        }
    }

    /// Whether the worker is done: drained and idle, or stopped jobs outlived the stop grace.
    pub(crate) fn should_exit(&self, now: Instant) -> bool {
        let Lifecycle::Draining { give_up_at, .. } = self.lifecycle else { return false };
        if self.held.is_empty() && self.pending.is_empty() && self.flow != ReportFlow::InFlight {
            return true;
        }
        if give_up_at.is_some_and(|t| now >= t) {
            tracing::warn!(held = self.held.len(), "stopped jobs did not exit in time");
            return true;
        }
        false
    }

    /// Applies one input; returns what the runtime must do, in order.
    pub(crate) fn step(&mut self, input: Input) -> Vec<Effect> {
        self.handle(input);
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, e: WorkerEvent) {
        self.out.push(Effect::Event(e));
    }

    fn handle(&mut self, input: Input) {
        let gen = self.gen;
        match input {
            Input::Registered { session, requeued } => self.on_registered(session, requeued),
            Input::StreamOpened { gen: g } if g == gen => {
                tracing::debug!(worker_id = %self.config.id, "assignment stream open");
                self.emit(WorkerEvent::StreamOpened);
            }
            Input::Assignment { gen: g, assignment } if g == gen => self.on_assignment(assignment),
            Input::Revoke { gen: g, revoke } if g == gen => {
                // Also sent after the task's own completion was applied: only a stop is news.
                tracing::debug!(task_id = revoke.task, fence = revoke.fence, reason = %revoke.reason, "revoked");
                self.stop_job((revoke.task, revoke.fence), StopReason::Revoked);
            }
            Input::Resync { gen: g, resync } if g == gen => self.on_resync(resync),
            Input::StreamEnded { gen: g, error } if g == gen => self.on_stream_ended(error),
            Input::Reopen { gen: g } if g == gen => self.open_stream(),
            Input::Recovered { gen: g, task, fence, found } if g == gen => {
                self.on_recovered(task, fence, found)
            }
            // Inputs of an older stream or session.
            Input::StreamOpened { .. }
            | Input::Assignment { .. }
            | Input::Revoke { .. }
            | Input::Resync { .. }
            | Input::StreamEnded { .. }
            | Input::Reopen { .. }
            | Input::Recovered { .. }
            | Input::StreamMessage { .. } => {}
            Input::HeartbeatFailed { session, error, session_lost } => {
                if self.session.map(|s| s.id) != Some(session) {
                    return;
                }
                if session_lost {
                    tracing::warn!(error = %error, "heartbeat refused: session lost");
                    self.lose_session();
                } else {
                    tracing::warn!(error = %error, "heartbeat failed");
                }
            }
            Input::ServerDraining { session } => {
                if self.session.map(|s| s.id) == Some(session) && !self.warned_draining {
                    self.warned_draining = true;
                    tracing::info!(worker_id = %self.config.id, "the cluster drains this worker: no new work will come");
                }
            }
            Input::JobEnded { task, fence, outcome } => self.on_job_ended(task, fence, outcome),
            Input::DeadlinePassed { task, fence } => {
                if let Some(h) = self.held.get_mut(&(task, fence)) {
                    if h.phase == Phase::Running {
                        h.phase = Phase::TimedOut;
                        self.out.push(Effect::StopJob {
                            task,
                            fence,
                            reason: StopReason::Deadline,
                        });
                    }
                }
            }
            Input::StartDue { task, fence } => {
                // Still running: confirm the start. A job that already finished sends only
                // its final report (Assigned -> Succeeded/Failed is a valid transition).
                if self.held.get(&(task, fence)).is_some_and(|h| h.phase == Phase::Running) {
                    let started = PbOutcome::Started(pb::Started {});
                    self.queue_report(PendingReport::new(task, fence, started, Role::Progress));
                }
            }
            Input::ReportAnswered { batch, answer } => self.on_report_answered(batch, answer),
            Input::ReportRetry => {
                if self.flow == ReportFlow::Pausing {
                    self.flow = ReportFlow::Idle;
                }
                self.kick_reports();
            }
            Input::Drain { now } => self.begin_drain(now),
            Input::StopNow { now } => {
                self.begin_drain(now);
                self.stop_everything(now);
            }
            Input::Tick { now } => {
                if let Lifecycle::Draining { stop_all_at: Some(t), .. } = self.lifecycle {
                    if now >= t {
                        self.stop_everything(now);
                    }
                }
            }
        }
    }

    fn on_registered(&mut self, session: Session, requeued: Vec<u64>) {
        tracing::info!(
            worker_id = %self.config.id,
            session = session.id,
            requeued = requeued.len(),
            "registered"
        );
        self.session = Some(session);
        self.stats.sessions += 1;
        self.gen += 1;
        self.emit(WorkerEvent::Registered { session: session.id, requeued });
        self.out.push(Effect::StartHeartbeat(session));
        self.open_stream();
    }

    fn open_stream(&mut self) {
        if self.session.is_none() {
            return;
        }
        self.gen += 1;
        self.out.push(Effect::OpenStream { gen: self.gen });
    }

    fn on_stream_ended(&mut self, error: Option<StreamError>) {
        self.emit(WorkerEvent::StreamClosed { error: error.as_ref().map(|e| e.error.clone()) });
        if let Some(e) = &error {
            if e.session_lost {
                tracing::warn!(error = %e.error, "assignment stream refused: session lost");
                self.lose_session();
                return;
            }
        }
        tracing::info!(
            error = error.as_ref().map_or("ended", |e| e.error.as_str()),
            "assignment stream closed; reconnecting"
        );
        self.out.push(Effect::ReopenStreamLater { gen: self.gen });
    }

    /// The server no longer knows this session: it requeued everything the worker held.
    fn lose_session(&mut self) {
        let Some(session) = self.session.take() else { return };
        self.gen += 1;
        self.out.push(Effect::StopNetwork);
        let keys: Vec<_> = self.held.keys().copied().collect();
        for key in keys {
            self.stop_job(key, StopReason::SessionLost);
        }
        // Reports of requeued attempts would be refused as stale.
        self.pending.clear();
        self.emit(WorkerEvent::SessionLost { session: session.id });
        self.out.push(Effect::Register);
    }

    fn begin_drain(&mut self, now: Instant) {
        if self.draining() {
            return;
        }
        self.lifecycle = Lifecycle::Draining {
            stop_all_at: Some(now + self.config.drain_grace),
            give_up_at: None,
        };
        tracing::info!(worker_id = %self.config.id, held = self.held.len(), "draining");
        self.emit(WorkerEvent::Draining);
        if self.session.is_some() {
            self.out.push(Effect::DrainWorker);
        }
    }

    /// Stops every running job (drain grace over, or an immediate stop). Finished jobs keep
    /// their queued reports: those are still sent until the stop grace ends.
    fn stop_everything(&mut self, now: Instant) {
        let running: Vec<_> = self
            .held
            .iter()
            .filter(|(_, h)| matches!(h.phase, Phase::Running | Phase::TimedOut))
            .map(|(k, _)| *k)
            .collect();
        for key in running {
            self.stop_job(key, StopReason::Shutdown);
        }
        self.lifecycle = Lifecycle::Draining {
            stop_all_at: None,
            give_up_at: Some(now + self.config.stop_grace),
        };
    }

    /// Tells a job to stop, or forgets a finished one whose report is no longer wanted.
    fn stop_job(&mut self, key: Key, reason: StopReason) {
        let Some(h) = self.held.get_mut(&key) else { return };
        match h.phase {
            Phase::Running | Phase::TimedOut => {
                let signal = h.phase == Phase::Running;
                h.phase = Phase::Stopping(reason);
                if signal {
                    self.out.push(Effect::StopJob { task: key.0, fence: key.1, reason });
                }
                // A queued Started report is pointless now (and would be refused as stale).
                self.pending.retain(|r| (r.task, r.fence) != key);
                self.stats.stopped += 1;
                tracing::info!(task_id = key.0, fence = key.1, %reason, "stopping task");
                self.emit(WorkerEvent::Stopping { task: key.0, fence: key.1, reason });
            }
            Phase::Stopping(_) => {}
            Phase::Reporting => {
                self.held.remove(&key);
                self.pending.retain(|r| (r.task, r.fence) != key);
                self.recent.insert(key);
            }
        }
    }

    fn on_assignment(&mut self, a: pb::Assignment) {
        let key = (a.task, a.fence);
        if self.recent.contains(&key) {
            return;
        }
        if let Some(h) = self.held.get_mut(&key) {
            if matches!(h.phase, Phase::Stopping(_)) {
                // Stopped on the server's word (a resync from a node that had not yet applied
                // the assignment, a lost session that turned out to be alive), and handed back:
                // run it again once the stopped run has exited.
                h.redeliver = Some(a);
            }
            return;
        }
        // Another attempt of the same task: the newest fence wins.
        let others: Vec<Key> =
            self.held.range((a.task, 0)..=(a.task, u64::MAX)).map(|(k, _)| *k).collect();
        if others.iter().any(|k| k.1 > a.fence) {
            return;
        }
        for k in others {
            self.stop_job(k, StopReason::Revoked);
        }
        if self.draining() {
            tracing::debug!(task_id = a.task, "draining: not starting a new assignment");
            return;
        }
        self.start_job(a);
    }

    fn start_job(&mut self, a: pb::Assignment) {
        if !a.started {
            self.out.push(Effect::ScheduleStartReport { task: a.task, fence: a.fence });
        }
        tracing::info!(task_id = a.task, attempt = a.attempt, fence = a.fence, "running task");
        self.stats.executed += 1;
        self.emit(WorkerEvent::ExecStart { task: a.task, attempt: a.attempt, fence: a.fence });
        self.held.insert((a.task, a.fence), Held { phase: Phase::Running, redeliver: None });
        self.out.push(Effect::StartJob(Job {
            task: a.task,
            fence: a.fence,
            attempt: a.attempt,
            name: a.name,
            payload: a.payload,
            metadata: a.metadata,
            deadline_ms: a.deadline_ms,
            worker_id: self.config.id.clone(),
        }));
    }

    fn on_job_ended(&mut self, task: u64, fence: u64, outcome: Outcome) {
        let key = (task, fence);
        let phase = self.held.get(&key).map(|h| h.phase);
        let stopped = match phase {
            Some(Phase::TimedOut) => Some(StopReason::Deadline),
            Some(Phase::Stopping(r)) => Some(r),
            _ => None,
        };
        let success = matches!(outcome, Outcome::Succeeded(_)) && stopped.is_none();
        self.emit(WorkerEvent::ExecEnd { task, fence, success, stopped });
        match phase {
            Some(Phase::Running | Phase::TimedOut) => {
                let outcome = if phase == Some(Phase::TimedOut) {
                    tracing::info!(task_id = task, fence, "task timed out");
                    PbOutcome::Failed(pb::Failed { message: "timed out".into(), retryable: true })
                } else {
                    match outcome {
                        Outcome::Succeeded(result) => {
                            PbOutcome::Succeeded(pb::Succeeded { result })
                        }
                        Outcome::Failed { message, retryable } => {
                            PbOutcome::Failed(pb::Failed { message, retryable })
                        }
                    }
                };
                tracing::info!(task_id = task, fence, success, "task finished");
                if let Some(h) = self.held.get_mut(&key) {
                    h.phase = Phase::Reporting;
                }
                self.queue_report(PendingReport::new(task, fence, outcome, Role::Final));
            }
            Some(Phase::Stopping(reason)) => {
                tracing::debug!(task_id = task, fence, %reason, "stopped task exited");
                let redeliver = self.held.remove(&key).and_then(|h| h.redeliver);
                if let Some(a) = redeliver {
                    if self.session.is_some() {
                        self.on_assignment(a);
                    }
                }
            }
            Some(Phase::Reporting) | None => {}
        }
    }

    fn on_resync(&mut self, r: pb::Resync) {
        let listed: HashSet<Key> = r.tasks.iter().copied().zip(r.fences.iter().copied()).collect();
        let unlisted: Vec<_> = self.held.keys().filter(|k| !listed.contains(k)).copied().collect();
        for key in unlisted {
            self.stop_job(key, StopReason::Revoked);
        }
        let mut missing: Vec<Key> = listed
            .into_iter()
            .filter(|k| !self.held.contains_key(k) && !self.recent.contains(k))
            .collect();
        missing.sort_unstable();
        for (task, fence) in missing {
            // The server says this worker holds an attempt it never received: read the task
            // and run it if it is still ours, so it is neither stuck nor wasted.
            self.out.push(Effect::FetchTask { gen: self.gen, task, fence });
        }
    }

    fn on_recovered(&mut self, task: u64, fence: u64, found: Option<Box<pb::Task>>) {
        let key = (task, fence);
        if self.held.contains_key(&key) || self.recent.contains(&key) {
            return;
        }
        let ours = found.as_ref().is_some_and(|t| {
            t.fence == fence
                && t.worker == self.config.id
                && matches!(
                    pb::TaskState::try_from(t.state),
                    Ok(pb::TaskState::Assigned | pb::TaskState::Running)
                )
        });
        let Some(t) = found.filter(|_| ours) else { return };
        let spec = t.spec.unwrap_or_default();
        if self.draining() {
            // Nothing will run it here: give it back so another worker can.
            let failed = PbOutcome::Failed(pb::Failed {
                message: "the worker is shutting down".into(),
                retryable: true,
            });
            self.queue_report(PendingReport::new(task, fence, failed, Role::Orphan));
            return;
        }
        tracing::info!(task_id = task, fence, "running an attempt known only from a resync");
        self.start_job(pb::Assignment {
            task,
            fence,
            attempt: t.attempt,
            name: spec.name,
            payload: spec.payload,
            deadline_ms: t.deadline_ms,
            metadata: spec.metadata,
            started: t.state == pb::TaskState::Running as i32,
            // A task read back carries no dependency results; payload-only handlers (all this
            // runtime runs) do not need them.
            dependencies: Vec::new(),
        });
    }

    fn queue_report(&mut self, r: PendingReport) {
        self.pending.push_back(r);
        self.kick_reports();
    }

    /// Still wanted: the attempt is held (or the report has no entry by design).
    fn report_relevant(&self, r: &PendingReport) -> bool {
        r.role == Role::Orphan
            || match self.held.get(&(r.task, r.fence)).map(|h| h.phase) {
                Some(Phase::Running | Phase::TimedOut) => r.role == Role::Progress,
                Some(Phase::Reporting) => true,
                Some(Phase::Stopping(_)) | None => false,
            }
    }

    /// Sends the queued reports if no Report RPC is in flight.
    fn kick_reports(&mut self) {
        if self.flow != ReportFlow::Idle || self.pending.is_empty() {
            return;
        }
        let mut batch = Vec::new();
        if self.pending.front().is_some_and(|r| r.mode == SendMode::Solo) {
            batch.extend(self.pending.pop_front());
        } else {
            while batch.len() < MAX_REPORT_BATCH
                && self.pending.front().is_some_and(|r| r.mode == SendMode::Batched)
            {
                batch.extend(self.pending.pop_front());
            }
        }
        for r in &batch {
            self.emit(WorkerEvent::ReportSent { task: r.task, fence: r.fence, kind: r.kind() });
        }
        self.flow = ReportFlow::InFlight;
        self.out.push(Effect::SendReports(batch));
    }

    fn on_report_answered(&mut self, batch: Vec<PendingReport>, answer: ReportRpc) {
        self.flow = ReportFlow::Idle;
        match answer {
            ReportRpc::Answered(verdicts) => {
                for (r, v) in batch.into_iter().zip(verdicts) {
                    match v {
                        Verdict::Applied => self.report_accepted(r, false),
                        Verdict::Duplicate => self.report_accepted(r, true),
                        Verdict::Refused { error, stale } => self.report_rejected(r, error, stale),
                    }
                }
            }
            ReportRpc::Unreachable(error) => {
                tracing::warn!(error = %error, reports = batch.len(), "reports not delivered; will resend");
                for r in batch.iter().rev() {
                    self.emit(WorkerEvent::ReportAnswered {
                        task: r.task,
                        fence: r.fence,
                        kind: r.kind(),
                        answer: ReportAnswer::Unknown { error: error.clone() },
                    });
                }
                for r in batch.into_iter().rev() {
                    if self.report_relevant(&r) {
                        self.pending.push_front(r);
                    }
                }
                self.flow = ReportFlow::Pausing;
                self.out.push(Effect::RetryReportsLater);
            }
            ReportRpc::Refused { error, .. } if batch.len() > 1 => {
                // One bad report fails the whole RPC: find it by sending each alone.
                tracing::warn!(error = %error, "report batch refused; sending one by one");
                for mut r in batch.into_iter().rev() {
                    r.mode = SendMode::Solo;
                    self.pending.push_front(r);
                }
            }
            ReportRpc::Refused { error, message, too_big } => {
                let Some(mut r) = batch.into_iter().next() else { return };
                if too_big && matches!(r.outcome, PbOutcome::Succeeded(_)) {
                    // The result is refused (too large for the server's limit): the attempt
                    // did run, so end it as a failure that no retry can fix. (Once converted
                    // it is a failure, so this happens at most once.)
                    tracing::warn!(task_id = r.task, error = %error, "result refused; reporting a failure");
                    r.outcome = PbOutcome::Failed(pb::Failed {
                        message: format!("result refused by the server: {message}"),
                        retryable: false,
                    });
                    self.pending.push_front(r);
                } else {
                    self.report_rejected(r, error, false);
                }
            }
        }
        self.kick_reports();
    }

    fn report_accepted(&mut self, r: PendingReport, duplicate: bool) {
        let key = (r.task, r.fence);
        self.emit(WorkerEvent::ReportAnswered {
            task: r.task,
            fence: r.fence,
            kind: r.kind(),
            answer: ReportAnswer::Accepted { duplicate },
        });
        if !r.is_final() {
            return;
        }
        match r.outcome {
            PbOutcome::Succeeded(_) => self.stats.succeeded += 1,
            _ => self.stats.failed += 1,
        }
        if self.held.get(&key).is_some_and(|h| h.phase == Phase::Reporting) {
            self.held.remove(&key);
        }
        self.recent.insert(key);
    }

    /// The attempt was taken away (or the report is invalid): never resend it.
    fn report_rejected(&mut self, r: PendingReport, error: String, stale: bool) {
        let key = (r.task, r.fence);
        tracing::info!(task_id = r.task, fence = r.fence, %error, "report refused; dropping the attempt");
        self.stats.rejected += 1;
        self.emit(WorkerEvent::ReportAnswered {
            task: r.task,
            fence: r.fence,
            kind: r.kind(),
            answer: ReportAnswer::Rejected { error, stale },
        });
        // A refused Started means the attempt is not ours: stop it. A refused final report
        // ends the entry.
        self.stop_job(key, StopReason::Revoked);
        if r.is_final() {
            self.pending.retain(|p| (p.task, p.fence) != key);
        }
    }
}

#[cfg(test)]
mod tests;
