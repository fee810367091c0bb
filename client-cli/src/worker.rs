//! The worker runtime: register, receive assignments, run them, report, survive failovers.
//!
//! A [`Worker`] turns a [`Handler`] (what to do with one task: [`crate::exec::ShellHandler`]
//! runs a shell command; tests and benchmarks pass closures) into a cluster worker:
//!
//! 1. **Session.** RegisterWorker with the worker id and a random `instance` chosen once per
//!    process, then Heartbeat every `heartbeat_interval_ms` from the answer, and open the
//!    assignment stream.
//! 2. **Assignments.** Each [`pb::Assignment`] is deduplicated by `(task, fence)`: the server
//!    resends what the worker holds whenever the stream reopens, and an attempt must run at most
//!    once per process. A new attempt runs at once and reports `Started` if it is still
//!    running 10 ms later (unless the assignment says it was already confirmed); a job that
//!    ends sooner sends only its final report.
//! 3. **Reports.** Started/Succeeded/Failed reports go through one queue: while a Report RPC is
//!    in flight, new reports accumulate and leave together in the next one. A report that could
//!    not be delivered is sent again with the same fencing token, which the server answers with
//!    `duplicate` if the first one was applied: nothing is lost and nothing counts twice. A
//!    report refused as stale (the attempt was taken away) is dropped, never retried.
//! 4. **Stopping.** A job is told to stop (see [`StopReason`]) on a Revoke, on a Resync that no
//!    longer lists it, at its deadline (then reported as a retryable "timed out" failure), when
//!    the session is lost, and at shutdown. A stopped job's outcome is not reported, except for
//!    the deadline.
//! 5. **Failover.** When the stream ends or a call fails with UNAVAILABLE, the worker reopens
//!    the stream (the client routes it to the new leader or any live node) with the same
//!    session and keeps running what it holds. When the server says the session is gone
//!    (NOT_FOUND / FAILED_PRECONDITION: the leader expired it and requeued its tasks), the
//!    worker stops everything it holds, drops pending reports, and registers again.
//! 6. **Shutdown.** [`WorkerHandle::shutdown`] drains: DrainWorker (no new work), finish what it
//!    holds within the drain grace, stop the rest, DeregisterWorker (the server requeues what
//!    is left), return.
//!
//! # Invariants
//!
//! * Every `(task, fence)` runs at most once per worker process: it is either held, or in the
//!   bounded set of recently finished attempts. The only exception is an attempt the worker
//!   stopped on a server's say-so and the server then hands back (same fence): it runs again.
//! * A job entry lives until its handler returned, so a job's process is never orphaned by
//!   forgetting it; dropping the worker (or aborting it) stops every job.
//! * All state is owned by one task (the actor); network calls run in spawned tasks and report
//!   back through its channel, tagged with the session or stream generation they belong to, so
//!   a late answer about an old session changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use proto::pb;
use proto::pb::task_report::Outcome as PbOutcome;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backoff::{Backoff, BackoffConfig};
use crate::client::Client;
use crate::error::Error;

/// Reports sent in one Report RPC at most.
const MAX_REPORT_BATCH: usize = 512;
/// Finished attempts remembered to ignore late resends of their assignments.
const RECENT_CAPACITY: usize = 65_536;
/// Pause before sending reports again after the cluster could not take them.
const REPORT_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Retry budget of the calls made while shutting down.
const SHUTDOWN_CALL_BUDGET: Duration = Duration::from_secs(5);

/// How a worker presents itself and shuts down.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Worker id, 1..128 of `[A-Za-z0-9._:@/-]`; the same id after a restart takes over (and
    /// requeues) what the previous process held.
    pub id: String,
    /// Random per process: the same instance re-registering is a reconnect that keeps the
    /// session and the held tasks.
    pub instance: u64,
    /// Queues served (at least one).
    pub queues: Vec<String>,
    /// Labels offered to tasks that require them.
    pub labels: HashMap<String, String>,
    /// Resources offered.
    pub capacity: pb::Resources,
    /// Tasks run at the same time at most.
    pub slots: u32,
    /// At shutdown, how long running tasks may take to finish before they are stopped.
    pub drain_grace: Duration,
    /// After stopping the remaining tasks, how long to wait for them to exit.
    pub stop_grace: Duration,
}

impl WorkerConfig {
    /// A worker on the `default` queue with one slot, no labels and no resources.
    pub fn new(id: impl Into<String>) -> Self {
        WorkerConfig {
            id: id.into(),
            instance: rand::random(),
            queues: vec!["default".to_string()],
            labels: HashMap::new(),
            capacity: pb::Resources::default(),
            slots: 1,
            drain_grace: Duration::from_secs(30),
            stop_grace: Duration::from_secs(10),
        }
    }

    fn spec(&self) -> pb::WorkerSpec {
        pb::WorkerSpec {
            id: self.id.clone(),
            queues: self.queues.clone(),
            labels: self.labels.clone(),
            capacity: Some(self.capacity.clone()),
            slots: self.slots,
        }
    }
}

/// `hostname-pid`: unique per process on a host, readable in listings.
pub fn default_worker_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let host: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' })
        .take(100)
        .collect();
    let host = if host.is_empty() { "worker".to_string() } else { host };
    format!("{host}-{}", std::process::id())
}

/// One attempt to run.
#[derive(Clone, Debug)]
pub struct Job {
    /// Task id.
    pub task: u64,
    /// The attempt's fencing token: strictly increasing per task; pass it to side effects
    /// that must not happen twice.
    pub fence: u64,
    /// Attempt number (1-based).
    pub attempt: u32,
    /// The task's name (handler / kind).
    pub name: String,
    /// The task's payload.
    pub payload: Vec<u8>,
    /// The task's metadata.
    pub metadata: HashMap<String, String>,
    /// Attempt deadline, unix ms (0 = none). The runtime enforces it.
    pub deadline_ms: u64,
    /// The id of the worker running it.
    pub worker_id: String,
}

/// What a job produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Success, with a result (bounded by the server's result limit).
    Succeeded(Vec<u8>),
    /// Failure; `retryable = false` fails the task at once.
    Failed {
        /// What went wrong.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
}

/// Why a job is told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The server took the attempt away (cancel, timeout, reassignment) or no longer lists it.
    Revoked,
    /// The attempt's deadline passed (reported as a retryable "timed out" failure).
    Deadline,
    /// The worker's session expired; the server requeued the task.
    SessionLost,
    /// The worker is shutting down (or was dropped).
    Shutdown,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StopReason::Revoked => "revoked",
            StopReason::Deadline => "deadline",
            StopReason::SessionLost => "session lost",
            StopReason::Shutdown => "shutdown",
        })
    }
}

/// Tells a running job to stop. Handlers should watch it and return soon after it fires
/// (their outcome is then ignored, except after the deadline).
#[derive(Debug)]
pub struct StopSignal(watch::Receiver<Option<StopReason>>);

impl StopSignal {
    /// A signal and the sender that fires it (for handlers tested on their own).
    pub fn new() -> (watch::Sender<Option<StopReason>>, StopSignal) {
        let (tx, rx) = watch::channel(None);
        (tx, StopSignal(rx))
    }

    /// Waits until the job must stop. A dropped sender counts as [`StopReason::Shutdown`].
    pub async fn stopped(&mut self) -> StopReason {
        match self.0.wait_for(Option::is_some).await {
            Ok(r) => r.unwrap_or(StopReason::Shutdown),
            Err(_) => StopReason::Shutdown,
        }
    }

    /// The reason, if the job was already told to stop.
    pub fn reason(&self) -> Option<StopReason> {
        *self.0.borrow()
    }
}

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Runs one attempt. Implemented for closures `Fn(Job, StopSignal) -> impl Future<Output =
/// Outcome>`.
pub trait Handler: Send + Sync + 'static {
    /// Runs the job until it finishes or `stop` fires.
    fn run(&self, job: Job, stop: StopSignal) -> BoxFuture<Outcome>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Job, StopSignal) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn run(&self, job: Job, stop: StopSignal) -> BoxFuture<Outcome> {
        Box::pin(self(job, stop))
    }
}

/// What a report said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    /// The attempt started.
    Started,
    /// The attempt succeeded.
    Succeeded,
    /// The attempt failed.
    Failed,
}

/// How the server answered a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReportAnswer {
    /// Applied now (`duplicate = false`) or before (`duplicate = true`).
    Accepted {
        /// The same report was accepted before.
        duplicate: bool,
    },
    /// Refused: the attempt was taken away, the task finished, or the report was invalid.
    Rejected {
        /// The server's reason.
        error: String,
    },
    /// No answer (the cluster was unreachable); the report stays queued and is sent again.
    Unknown {
        /// What failed.
        error: String,
    },
}

/// What happened inside a worker, for logs, tests and history recorders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkerEvent {
    /// A session began.
    Registered {
        /// The session.
        session: u64,
        /// Tasks a previous instance held, now requeued.
        requeued: Vec<u64>,
    },
    /// The server expired the session; everything held was stopped.
    SessionLost {
        /// The lost session.
        session: u64,
    },
    /// The assignment stream is open.
    StreamOpened,
    /// The assignment stream ended; it is reopened.
    StreamClosed {
        /// Why, if it failed.
        error: Option<String>,
    },
    /// An attempt begins executing.
    ExecStart {
        /// Task.
        task: u64,
        /// Attempt number.
        attempt: u32,
        /// Fencing token.
        fence: u64,
    },
    /// An attempt's handler returned.
    ExecEnd {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// Whether it succeeded (a stopped job counts as not succeeded).
        success: bool,
        /// Set when the job had been told to stop.
        stopped: Option<StopReason>,
    },
    /// A job was told to stop.
    Stopping {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// Why.
        reason: StopReason,
    },
    /// A report is being sent (again, if an earlier send had no answer).
    ReportSent {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// What it says.
        kind: ReportKind,
    },
    /// The answer to a report.
    ReportAnswered {
        /// Task.
        task: u64,
        /// Fencing token.
        fence: u64,
        /// What it said.
        kind: ReportKind,
        /// The answer.
        answer: ReportAnswer,
    },
    /// The worker stopped taking new work.
    Draining,
    /// The worker left the cluster.
    Deregistered,
}

/// A callback receiving every [`WorkerEvent`]; it runs on the worker's task, keep it short.
pub type EventSink = Arc<dyn Fn(&WorkerEvent) + Send + Sync>;

/// Counters of one worker run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Attempts executed (handler started).
    pub executed: u64,
    /// Success reports accepted.
    pub succeeded: u64,
    /// Failure reports accepted.
    pub failed: u64,
    /// Jobs stopped before they finished.
    pub stopped: u64,
    /// Reports refused by the server (stale attempts).
    pub rejected: u64,
    /// Sessions started (more than one: the session was lost and renewed).
    pub sessions: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Run,
    /// Finish what is held (within the drain grace), then leave.
    Drain,
    /// Stop everything now, then leave.
    Stop,
}

/// A worker, ready to start.
pub struct Worker {
    client: Client,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    sink: Option<EventSink>,
}

impl Worker {
    /// A worker that runs every assignment with `handler`.
    pub fn new(client: Client, config: WorkerConfig, handler: impl Handler) -> Self {
        Worker { client, config, handler: Arc::new(handler), sink: None }
    }

    /// Calls `sink` for every [`WorkerEvent`].
    pub fn on_event(mut self, sink: impl Fn(&WorkerEvent) + Send + Sync + 'static) -> Self {
        self.sink = Some(Arc::new(sink));
        self
    }

    /// Starts the worker on the current tokio runtime.
    pub fn start(self) -> WorkerHandle {
        let (control_tx, control_rx) = watch::channel(Control::Run);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.config.id.clone();
        let actor = Actor {
            client: self.client,
            config: self.config,
            handler: self.handler,
            sink: self.sink,
            tx,
            rx,
            control: control_rx,
            session: None,
            gen: 0,
            stream_task: None,
            heartbeat_task: None,
            stream_backoff: Backoff::new(BackoffConfig {
                initial: Duration::from_millis(20),
                max: Duration::from_secs(2),
            }),
            held: BTreeMap::new(),
            recent: Recent::default(),
            pending: VecDeque::new(),
            inflight: false,
            report_retry_scheduled: false,
            draining: false,
            stop_all_at: None,
            give_up_at: None,
            warned_draining: false,
            stats: WorkerStats::default(),
        };
        WorkerHandle { id, control: control_tx, join: tokio::spawn(actor.run()) }
    }
}

/// Controls a started worker.
#[derive(Debug)]
pub struct WorkerHandle {
    id: String,
    control: watch::Sender<Control>,
    join: JoinHandle<Result<WorkerStats, Error>>,
}

impl WorkerHandle {
    /// The worker id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Graceful shutdown: take no new work, finish what is held (bounded by the drain grace),
    /// deregister. Returns at once; [`WorkerHandle::wait`] for the end.
    pub fn shutdown(&self) {
        self.controller().shutdown();
    }

    /// Shutdown without the drain grace: stop every job now, deregister.
    pub fn stop_now(&self) {
        self.controller().stop_now();
    }

    /// A cloneable remote control, usable while another task waits on the handle.
    pub fn controller(&self) -> WorkerController {
        WorkerController(self.control.clone())
    }

    /// Waits for the worker to end.
    pub async fn wait(self) -> Result<WorkerStats, Error> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(Error::Protocol(format!("the worker task ended abnormally: {e}"))),
        }
    }

    /// Ends the worker abruptly, like a crash: jobs are killed, nothing more is reported and
    /// the worker does not deregister (the leader expires it after its heartbeat TTL).
    pub fn abort(self) {
        self.join.abort();
    }
}

/// Shuts a worker down from anywhere (a signal handler, a test).
#[derive(Clone, Debug)]
pub struct WorkerController(watch::Sender<Control>);

impl WorkerController {
    /// See [`WorkerHandle::shutdown`].
    pub fn shutdown(&self) {
        self.0.send_if_modified(|c| {
            let changed = *c == Control::Run;
            if changed {
                *c = Control::Drain;
            }
            changed
        });
    }

    /// See [`WorkerHandle::stop_now`].
    pub fn stop_now(&self) {
        self.0.send_replace(Control::Stop);
    }
}

/// A report waiting to be sent.
#[derive(Clone, Debug)]
struct PendingReport {
    task: u64,
    fence: u64,
    outcome: PbOutcome,
    /// True for Succeeded/Failed: the answer ends the attempt's entry.
    is_final: bool,
    /// A failure report for an attempt the server lists but this worker cannot run: it has
    /// no job entry.
    orphan: bool,
    /// Sent alone: it was part of a batch the server refused as a whole.
    solo: bool,
    /// A refused success was already turned into a failure once.
    converted: bool,
}

impl PendingReport {
    fn kind(&self) -> ReportKind {
        match self.outcome {
            PbOutcome::Started(_) => ReportKind::Started,
            PbOutcome::Succeeded(_) => ReportKind::Succeeded,
            PbOutcome::Failed(_) => ReportKind::Failed,
        }
    }

    fn to_pb(&self) -> pb::TaskReport {
        pb::TaskReport { task: self.task, fence: self.fence, outcome: Some(self.outcome.clone()) }
    }
}

#[derive(Debug)]
enum Phase {
    /// The handler is running.
    Running,
    /// The handler was told to stop; its outcome will not be reported.
    Stopping(StopReason),
    /// The handler returned; the final report is queued or in flight.
    Reporting,
}

#[derive(Debug)]
struct Held {
    phase: Phase,
    /// Fires the job's stop signal; `None` once the handler returned.
    stop: Option<watch::Sender<Option<StopReason>>>,
    /// The server handed the attempt back while it was stopping: run it again afterwards.
    redeliver: Option<pb::Assignment>,
}

/// Recently finished attempts, bounded (oldest forgotten first).
#[derive(Default)]
struct Recent {
    set: HashSet<(u64, u64)>,
    order: VecDeque<(u64, u64)>,
}

impl Recent {
    fn insert(&mut self, key: (u64, u64)) {
        if self.set.insert(key) {
            self.order.push_back(key);
            if self.order.len() > RECENT_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, key: &(u64, u64)) -> bool {
        self.set.contains(key)
    }
}

#[derive(Clone, Copy, Debug)]
struct Session {
    id: u64,
    heartbeat_interval: Duration,
    ttl: Duration,
}

/// How long a job runs before its start is reported. Short jobs finish first and send only
/// their final report: one Raft commit per task instead of two, which halves the latency of a
/// dependent task's step and the log traffic of small tasks.
const START_REPORT_DELAY: Duration = Duration::from_millis(10);

/// Inputs of the actor.
enum Ev {
    StreamOpened {
        gen: u64,
    },
    Message {
        gen: u64,
        msg: pb::WorkerMessage,
    },
    StreamEnded {
        gen: u64,
        error: Option<Error>,
    },
    Reopen {
        gen: u64,
    },
    HeartbeatFailed {
        session: u64,
        error: Error,
    },
    ServerDraining {
        session: u64,
    },
    JobDone {
        task: u64,
        fence: u64,
        outcome: Outcome,
        stopped: Option<StopReason>,
    },
    ReportDone {
        batch: Vec<PendingReport>,
        result: Result<pb::ReportResponse, Error>,
    },
    ReportRetry,
    /// The start-report delay of an attempt passed (see [`START_REPORT_DELAY`]).
    StartDue {
        task: u64,
        fence: u64,
    },
    /// A task the server lists for this worker, read back because no assignment carried it.
    Recovered {
        gen: u64,
        task: u64,
        fence: u64,
        found: Option<Box<pb::Task>>,
    },
}

struct Actor {
    client: Client,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    sink: Option<EventSink>,
    tx: mpsc::UnboundedSender<Ev>,
    rx: mpsc::UnboundedReceiver<Ev>,
    control: watch::Receiver<Control>,
    session: Option<Session>,
    /// Increases with every stream opened and every session change.
    gen: u64,
    stream_task: Option<JoinHandle<()>>,
    heartbeat_task: Option<JoinHandle<()>>,
    stream_backoff: Backoff,
    /// Attempts this process holds, by (task, fence).
    held: BTreeMap<(u64, u64), Held>,
    recent: Recent,
    pending: VecDeque<PendingReport>,
    inflight: bool,
    report_retry_scheduled: bool,
    draining: bool,
    /// When the drain grace ends: stop whatever still runs.
    stop_all_at: Option<Instant>,
    /// When to leave even if stopped jobs have not exited.
    give_up_at: Option<Instant>,
    warned_draining: bool,
    stats: WorkerStats,
}

impl Drop for Actor {
    fn drop(&mut self) {
        // Network tasks hold clones of the channel sender; end them with the actor.
        if let Some(t) = self.stream_task.take() {
            t.abort();
        }
        if let Some(t) = self.heartbeat_task.take() {
            t.abort();
        }
    }
}

impl Actor {
    fn emit(&self, e: WorkerEvent) {
        if let Some(sink) = &self.sink {
            sink(&e);
        }
    }

    async fn run(mut self) -> Result<WorkerStats, Error> {
        loop {
            if self.session.is_none() && !self.draining && !self.register().await? {
                // Shutdown requested while registering.
                self.begin_drain();
            }
            if self.draining && self.idle() {
                break;
            }
            if self.give_up_at.is_some_and(|t| Instant::now() >= t) {
                tracing::warn!(held = self.held.len(), "stopped jobs did not exit in time");
                break;
            }
            let wake = self.give_up_at.or(self.stop_all_at);
            let ev = tokio::select! {
                ev = self.rx.recv() => ev,
                c = next_control(&mut self.control) => {
                    self.on_control(c);
                    continue;
                }
                _ = sleep_until_opt(wake) => {
                    if self.stop_all_at.take().is_some() {
                        self.stop_everything();
                    }
                    continue;
                }
            };
            match ev {
                Some(ev) => self.handle(ev),
                None => break,
            }
        }
        self.leave().await;
        Ok(self.stats.clone())
    }

    fn idle(&self) -> bool {
        self.held.is_empty() && self.pending.is_empty() && !self.inflight
    }

    fn on_control(&mut self, c: Control) {
        match c {
            Control::Run => {}
            Control::Drain => self.begin_drain(),
            Control::Stop => {
                self.begin_drain();
                self.stop_all_at = None;
                self.stop_everything();
            }
        }
    }

    fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        self.stop_all_at = Some(Instant::now() + self.config.drain_grace);
        tracing::info!(worker = %self.config.id, held = self.held.len(), "draining");
        self.emit(WorkerEvent::Draining);
        if self.session.is_some() {
            let client = self.client.with_retry_budget(SHUTDOWN_CALL_BUDGET);
            let id = self.config.id.clone();
            tokio::spawn(async move {
                if let Err(e) = client.drain_worker(&id).await {
                    tracing::warn!(error = %e, "could not mark the worker as draining");
                }
            });
        }
    }

    /// Stops every running job (drain grace over, or an immediate stop). Finished jobs keep
    /// their queued reports: those are still sent until `give_up_at`.
    fn stop_everything(&mut self) {
        let running: Vec<_> = self
            .held
            .iter()
            .filter(|(_, h)| matches!(h.phase, Phase::Running))
            .map(|(k, _)| *k)
            .collect();
        for key in running {
            self.stop_job(key, StopReason::Shutdown);
        }
        self.give_up_at = Some(Instant::now() + self.config.stop_grace);
    }

    /// Registers (or re-registers) until it works. `Ok(false)`: shutdown was requested first.
    async fn register(&mut self) -> Result<bool, Error> {
        let req = pb::RegisterWorkerRequest {
            worker: Some(self.config.spec()),
            instance: self.config.instance,
        };
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        });
        loop {
            let attempt = tokio::select! {
                r = self.client.register_worker(req.clone()) => r,
                c = next_control(&mut self.control) => {
                    if c != Control::Run {
                        return Ok(false);
                    }
                    continue;
                }
            };
            match attempt {
                Ok(resp) => {
                    let interval = Duration::from_millis(resp.heartbeat_interval_ms.max(50));
                    let ttl = Duration::from_millis(resp.heartbeat_ttl_ms).max(interval * 2);
                    let session = Session { id: resp.session, heartbeat_interval: interval, ttl };
                    tracing::info!(
                        worker = %self.config.id,
                        session = resp.session,
                        requeued = resp.requeued.len(),
                        "registered"
                    );
                    self.session = Some(session);
                    self.stats.sessions += 1;
                    self.gen += 1;
                    self.emit(WorkerEvent::Registered {
                        session: resp.session,
                        requeued: resp.requeued,
                    });
                    self.start_heartbeat(session);
                    self.open_stream();
                    return Ok(true);
                }
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(error = %e, "cannot register yet; retrying");
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        c = next_control(&mut self.control) => {
                            if c != Control::Run {
                                return Ok(false);
                            }
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn start_heartbeat(&mut self, session: Session) {
        if let Some(t) = self.heartbeat_task.take() {
            t.abort();
        }
        // Retries may use the time until the TTL is nearly gone: a heartbeat that gets through
        // late still saves the session.
        let budget =
            session.ttl.saturating_sub(session.heartbeat_interval).max(session.heartbeat_interval);
        let client = self
            .client
            .with_call_timeout(session.heartbeat_interval.max(Duration::from_secs(1)))
            .with_retry_budget(budget);
        let tx = self.tx.clone();
        let id = self.config.id.clone();
        self.heartbeat_task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(session.heartbeat_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut told_draining = false;
            loop {
                tick.tick().await;
                match client.heartbeat(&id, session.id).await {
                    Ok(resp) => {
                        if resp.draining && !told_draining {
                            told_draining = true;
                            let _ = tx.send(Ev::ServerDraining { session: session.id });
                        }
                    }
                    Err(error) => {
                        let lost = error.is_session_lost();
                        if tx.send(Ev::HeartbeatFailed { session: session.id, error }).is_err()
                            || lost
                        {
                            return;
                        }
                    }
                }
            }
        }));
    }

    fn open_stream(&mut self) {
        let Some(session) = self.session else { return };
        if let Some(t) = self.stream_task.take() {
            t.abort();
        }
        self.gen += 1;
        let gen = self.gen;
        let client = self.client.clone();
        let tx = self.tx.clone();
        let id = self.config.id.clone();
        self.stream_task = Some(tokio::spawn(async move {
            let mut stream = match client.open_assignments(&id, session.id).await {
                Ok(s) => s,
                Err(error) => {
                    let _ = tx.send(Ev::StreamEnded { gen, error: Some(error) });
                    return;
                }
            };
            if tx.send(Ev::StreamOpened { gen }).is_err() {
                return;
            }
            while let Some(item) = stream.next().await {
                match item {
                    Ok(msg) => {
                        if tx.send(Ev::Message { gen, msg }).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        let _ = tx.send(Ev::StreamEnded { gen, error: Some(error) });
                        return;
                    }
                }
            }
            let _ = tx.send(Ev::StreamEnded { gen, error: None });
        }));
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::StreamOpened { gen } if gen == self.gen => {
                tracing::debug!(worker = %self.config.id, "assignment stream open");
                self.emit(WorkerEvent::StreamOpened);
            }
            Ev::Message { gen, msg } if gen == self.gen => {
                self.stream_backoff.reset();
                match msg.msg {
                    Some(pb::worker_message::Msg::Assignment(a)) => self.on_assignment(a),
                    Some(pb::worker_message::Msg::Revoke(r)) => self.on_revoke(r),
                    Some(pb::worker_message::Msg::Resync(r)) => self.on_resync(r),
                    None => {}
                }
            }
            Ev::StreamEnded { gen, error } if gen == self.gen => self.on_stream_ended(error),
            Ev::Reopen { gen } if gen == self.gen => self.open_stream(),
            Ev::HeartbeatFailed { session, error } => {
                if self.session.map(|s| s.id) != Some(session) {
                    return;
                }
                if error.is_session_lost() {
                    tracing::warn!(error = %error, "heartbeat refused: session lost");
                    self.lose_session();
                } else {
                    tracing::warn!(error = %error, "heartbeat failed");
                }
            }
            Ev::ServerDraining { session } => {
                if self.session.map(|s| s.id) == Some(session) && !self.warned_draining {
                    self.warned_draining = true;
                    tracing::info!(worker = %self.config.id, "the cluster drains this worker: no new work will come");
                }
            }
            Ev::JobDone { task, fence, outcome, stopped } => {
                self.on_job_done(task, fence, outcome, stopped)
            }
            Ev::ReportDone { batch, result } => self.on_report_done(batch, result),
            Ev::ReportRetry => {
                self.report_retry_scheduled = false;
                self.kick_reports();
            }
            Ev::StartDue { task, fence } => {
                // Still running: confirm the start. A job that already finished sends only
                // its final report (Assigned -> Succeeded/Failed is a valid transition).
                if self.held.get(&(task, fence)).is_some_and(|h| matches!(h.phase, Phase::Running))
                {
                    self.queue_report(PendingReport {
                        task,
                        fence,
                        outcome: PbOutcome::Started(pb::Started {}),
                        is_final: false,
                        orphan: false,
                        solo: false,
                        converted: false,
                    });
                }
            }
            Ev::Recovered { gen, task, fence, found } if gen == self.gen => {
                self.on_recovered(task, fence, found)
            }
            // Events of an older stream or session.
            Ev::StreamOpened { .. }
            | Ev::Message { .. }
            | Ev::StreamEnded { .. }
            | Ev::Reopen { .. }
            | Ev::Recovered { .. } => {}
        }
    }

    fn on_stream_ended(&mut self, error: Option<Error>) {
        self.stream_task = None;
        let text = error.as_ref().map(|e| e.to_string());
        self.emit(WorkerEvent::StreamClosed { error: text.clone() });
        if let Some(e) = &error {
            if e.is_session_lost() {
                tracing::warn!(error = %e, "assignment stream refused: session lost");
                self.lose_session();
                return;
            }
        }
        tracing::info!(
            error = text.as_deref().unwrap_or("ended"),
            "assignment stream closed; reconnecting"
        );
        let delay = self.stream_backoff.next_delay();
        let tx = self.tx.clone();
        let gen = self.gen;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Ev::Reopen { gen });
        });
    }

    /// The server no longer knows this session: it requeued everything the worker held.
    fn lose_session(&mut self) {
        let Some(session) = self.session.take() else { return };
        self.gen += 1;
        if let Some(t) = self.stream_task.take() {
            t.abort();
        }
        if let Some(t) = self.heartbeat_task.take() {
            t.abort();
        }
        let keys: Vec<_> = self.held.keys().copied().collect();
        for key in keys {
            self.stop_job(key, StopReason::SessionLost);
        }
        // Reports of requeued attempts would be refused as stale.
        self.pending.clear();
        self.emit(WorkerEvent::SessionLost { session: session.id });
    }

    /// Tells a job to stop, or forgets a finished one whose report is no longer wanted.
    fn stop_job(&mut self, key: (u64, u64), reason: StopReason) {
        let Some(h) = self.held.get_mut(&key) else { return };
        match h.phase {
            Phase::Running => {
                h.phase = Phase::Stopping(reason);
                if let Some(stop) = &h.stop {
                    let _ = stop.send(Some(reason));
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
        let others: Vec<(u64, u64)> =
            self.held.range((a.task, 0)..=(a.task, u64::MAX)).map(|(k, _)| *k).collect();
        if others.iter().any(|k| k.1 > a.fence) {
            return;
        }
        for k in others {
            self.stop_job(k, StopReason::Revoked);
        }
        if self.draining {
            tracing::debug!(task_id = a.task, "draining: not starting a new assignment");
            return;
        }
        self.start_job(a);
    }

    fn start_job(&mut self, a: pb::Assignment) {
        let key = (a.task, a.fence);
        if !a.started {
            let tx = self.tx.clone();
            let (task, fence) = key;
            tokio::spawn(async move {
                tokio::time::sleep(START_REPORT_DELAY).await;
                let _ = tx.send(Ev::StartDue { task, fence });
            });
        }
        let (stop_tx, mut stop_rx) = watch::channel(None::<StopReason>);
        let job = Job {
            task: a.task,
            fence: a.fence,
            attempt: a.attempt,
            name: a.name,
            payload: a.payload,
            metadata: a.metadata,
            deadline_ms: a.deadline_ms,
            worker_id: self.config.id.clone(),
        };
        let deadline = (a.deadline_ms > 0).then(|| {
            let now = unix_ms();
            Instant::now() + Duration::from_millis(a.deadline_ms.saturating_sub(now))
        });
        tracing::info!(task_id = a.task, attempt = a.attempt, fence = a.fence, "running task");
        self.stats.executed += 1;
        self.emit(WorkerEvent::ExecStart { task: a.task, attempt: a.attempt, fence: a.fence });
        let handler = self.handler.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let (sig_tx, sig) = watch::channel(None::<StopReason>);
            let run = handler.run(job, StopSignal(sig));
            tokio::pin!(run);
            let mut stopped: Option<StopReason> = None;
            let outcome = loop {
                tokio::select! {
                    o = &mut run => break o,
                    _ = sleep_until_opt(deadline), if stopped.is_none() => {
                        stopped = Some(StopReason::Deadline);
                        let _ = sig_tx.send(Some(StopReason::Deadline));
                    }
                    changed = stop_rx.changed(), if stopped.is_none() => {
                        // A dropped sender means the worker itself is gone.
                        let reason = match changed {
                            Ok(()) => stop_rx.borrow().unwrap_or(StopReason::Shutdown),
                            Err(_) => StopReason::Shutdown,
                        };
                        stopped = Some(reason);
                        let _ = sig_tx.send(Some(reason));
                    }
                }
            };
            let _ = tx.send(Ev::JobDone { task: key.0, fence: key.1, outcome, stopped });
        });
        self.held.insert(key, Held { phase: Phase::Running, stop: Some(stop_tx), redeliver: None });
    }

    fn on_job_done(
        &mut self,
        task: u64,
        fence: u64,
        outcome: Outcome,
        stopped: Option<StopReason>,
    ) {
        let key = (task, fence);
        let success = matches!(outcome, Outcome::Succeeded(_)) && stopped.is_none();
        self.emit(WorkerEvent::ExecEnd { task, fence, success, stopped });
        let Some(h) = self.held.get_mut(&key) else { return };
        h.stop = None;
        match h.phase {
            Phase::Running => {
                let outcome = if stopped == Some(StopReason::Deadline) {
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
                h.phase = Phase::Reporting;
                self.queue_report(PendingReport {
                    task,
                    fence,
                    outcome,
                    is_final: true,
                    orphan: false,
                    solo: false,
                    converted: false,
                });
            }
            Phase::Stopping(reason) => {
                tracing::debug!(task_id = task, fence, %reason, "stopped task exited");
                let redeliver = h.redeliver.take();
                self.held.remove(&key);
                if let Some(a) = redeliver {
                    if self.session.is_some() {
                        self.on_assignment(a);
                    }
                }
            }
            Phase::Reporting => {}
        }
    }

    fn on_revoke(&mut self, r: pb::Revoke) {
        // Also sent after the task's own completion was applied: only a stop is news.
        tracing::debug!(task_id = r.task, fence = r.fence, reason = %r.reason, "revoked");
        self.stop_job((r.task, r.fence), StopReason::Revoked);
    }

    fn on_resync(&mut self, r: pb::Resync) {
        let listed: HashSet<(u64, u64)> =
            r.tasks.iter().copied().zip(r.fences.iter().copied()).collect();
        let unlisted: Vec<_> = self.held.keys().filter(|k| !listed.contains(k)).copied().collect();
        for key in unlisted {
            self.stop_job(key, StopReason::Revoked);
        }
        for key in listed {
            if self.held.contains_key(&key) || self.recent.contains(&key) {
                continue;
            }
            // The server says this worker holds an attempt it never received: read the task
            // and run it if it is still ours, so it is neither stuck nor wasted.
            let client = self.client.clone();
            let tx = self.tx.clone();
            let gen = self.gen;
            tokio::spawn(async move {
                let found = client.get_task(key.0).await.ok().map(Box::new);
                let _ = tx.send(Ev::Recovered { gen, task: key.0, fence: key.1, found });
            });
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
        if self.draining {
            // Nothing will run it here: give it back so another worker can.
            self.queue_report(PendingReport {
                task,
                fence,
                outcome: PbOutcome::Failed(pb::Failed {
                    message: "the worker is shutting down".into(),
                    retryable: true,
                }),
                is_final: true,
                orphan: true,
                solo: false,
                converted: false,
            });
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
        });
    }

    fn queue_report(&mut self, r: PendingReport) {
        self.pending.push_back(r);
        self.kick_reports();
    }

    /// Still wanted: the attempt is held (or the report has no entry by design).
    fn report_relevant(&self, r: &PendingReport) -> bool {
        r.orphan
            || match self.held.get(&(r.task, r.fence)).map(|h| &h.phase) {
                Some(Phase::Running) => !r.is_final,
                Some(Phase::Reporting) => true,
                Some(Phase::Stopping(_)) | None => false,
            }
    }

    /// Sends the queued reports if no Report RPC is in flight.
    fn kick_reports(&mut self) {
        if self.inflight || self.report_retry_scheduled || self.pending.is_empty() {
            return;
        }
        let mut batch = Vec::new();
        if self.pending.front().is_some_and(|r| r.solo) {
            batch.extend(self.pending.pop_front());
        } else {
            while batch.len() < MAX_REPORT_BATCH && self.pending.front().is_some_and(|r| !r.solo) {
                batch.extend(self.pending.pop_front());
            }
        }
        for r in &batch {
            self.emit(WorkerEvent::ReportSent { task: r.task, fence: r.fence, kind: r.kind() });
        }
        self.inflight = true;
        let req = pb::ReportRequest {
            worker_id: self.config.id.clone(),
            reports: batch.iter().map(PendingReport::to_pb).collect(),
        };
        let client = self.client.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let result = client.report(req).await;
            let _ = tx.send(Ev::ReportDone { batch, result });
        });
    }

    fn on_report_done(
        &mut self,
        batch: Vec<PendingReport>,
        result: Result<pb::ReportResponse, Error>,
    ) {
        self.inflight = false;
        match result {
            Ok(resp) => {
                for (r, res) in batch.into_iter().zip(resp.results) {
                    if res.accepted || res.duplicate {
                        self.report_accepted(r, res.duplicate);
                    } else {
                        let error = if res.error.is_empty() {
                            "refused as stale".to_string()
                        } else {
                            res.error.clone()
                        };
                        self.report_rejected(r, error);
                    }
                }
            }
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, reports = batch.len(), "reports not delivered; will resend");
                for r in batch.iter().rev() {
                    self.emit(WorkerEvent::ReportAnswered {
                        task: r.task,
                        fence: r.fence,
                        kind: r.kind(),
                        answer: ReportAnswer::Unknown { error: e.to_string() },
                    });
                }
                for r in batch.into_iter().rev() {
                    if self.report_relevant(&r) {
                        self.pending.push_front(r);
                    }
                }
                self.report_retry_scheduled = true;
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(REPORT_RETRY_PAUSE).await;
                    let _ = tx.send(Ev::ReportRetry);
                });
            }
            Err(e) if batch.len() > 1 => {
                // One bad report fails the whole RPC: find it by sending each alone.
                tracing::warn!(error = %e, "report batch refused; sending one by one");
                for mut r in batch.into_iter().rev() {
                    r.solo = true;
                    self.pending.push_front(r);
                }
            }
            Err(e) => {
                let Some(mut r) = batch.into_iter().next() else { return };
                let too_big = matches!(
                    e.code(),
                    tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                );
                if too_big && !r.converted && matches!(r.outcome, PbOutcome::Succeeded(_)) {
                    // The result is refused (too large for the server's limit): the attempt
                    // did run, so end it as a failure that no retry can fix.
                    tracing::warn!(task_id = r.task, error = %e, "result refused; reporting a failure");
                    r.outcome = PbOutcome::Failed(pb::Failed {
                        message: format!("result refused by the server: {}", e.message()),
                        retryable: false,
                    });
                    r.converted = true;
                    self.pending.push_front(r);
                } else {
                    self.report_rejected(r, e.to_string());
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
        if !r.is_final {
            return;
        }
        match r.outcome {
            PbOutcome::Succeeded(_) => self.stats.succeeded += 1,
            _ => self.stats.failed += 1,
        }
        if self.held.get(&key).is_some_and(|h| matches!(h.phase, Phase::Reporting)) {
            self.held.remove(&key);
        }
        self.recent.insert(key);
    }

    /// The attempt was taken away (or the report is invalid): never resend it.
    fn report_rejected(&mut self, r: PendingReport, error: String) {
        let key = (r.task, r.fence);
        tracing::info!(task_id = r.task, fence = r.fence, %error, "report refused; dropping the attempt");
        self.stats.rejected += 1;
        self.emit(WorkerEvent::ReportAnswered {
            task: r.task,
            fence: r.fence,
            kind: r.kind(),
            answer: ReportAnswer::Rejected { error },
        });
        // A refused Started means the attempt is not ours: stop it. A refused final report
        // ends the entry.
        self.stop_job(key, StopReason::Revoked);
        if r.is_final {
            self.pending.retain(|p| (p.task, p.fence) != key);
        }
    }

    /// Leaves the cluster: deregister (the server requeues whatever is still held).
    async fn leave(&mut self) {
        if let Some(t) = self.stream_task.take() {
            t.abort();
        }
        if let Some(t) = self.heartbeat_task.take() {
            t.abort();
        }
        let Some(session) = self.session.take() else { return };
        let client = self.client.with_retry_budget(SHUTDOWN_CALL_BUDGET);
        match client.deregister_worker(&self.config.id, session.id).await {
            Ok(resp) => {
                tracing::info!(worker = %self.config.id, requeued = resp.requeued.len(), "deregistered");
                self.emit(WorkerEvent::Deregistered);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the cluster will expire this worker")
            }
        }
    }
}

/// The next control change. Never resolves once the handle is gone: a dropped handle
/// detaches the worker (like a dropped `JoinHandle`), it does not stop it.
async fn next_control(control: &mut watch::Receiver<Control>) -> Control {
    match control.changed().await {
        Ok(()) => *control.borrow_and_update(),
        Err(_) => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ids_are_valid_worker_ids() {
        let id = default_worker_id();
        assert!(id.ends_with(&format!("-{}", std::process::id())));
        assert!(id.len() <= 128);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || "._:@/-".contains(c)), "{id}");
    }

    #[test]
    fn recent_is_bounded() {
        let mut r = Recent::default();
        for i in 0..(RECENT_CAPACITY as u64 + 10) {
            r.insert((i, 1));
        }
        assert!(!r.contains(&(0, 1)));
        assert!(r.contains(&(RECENT_CAPACITY as u64 + 9, 1)));
        assert_eq!(r.set.len(), RECENT_CAPACITY);
    }

    #[tokio::test]
    async fn stop_signal_fires_and_treats_a_dropped_sender_as_shutdown() {
        let (tx, mut sig) = StopSignal::new();
        assert_eq!(sig.reason(), None);
        tx.send(Some(StopReason::Revoked)).unwrap();
        assert_eq!(sig.stopped().await, StopReason::Revoked);
        let (tx, mut sig) = StopSignal::new();
        drop(tx);
        assert_eq!(sig.stopped().await, StopReason::Shutdown);
    }
}
