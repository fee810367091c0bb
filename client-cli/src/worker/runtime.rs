//! The worker's async runtime: a thin actor around the sans-I/O [`super::core::Core`].
//!
//! The actor owns the channels, the RPC tasks (register, heartbeat, assignment stream,
//! reports, task reads) and the job tasks. Everything they learn comes back through one
//! channel as a [`Input`], tagged with the session or stream generation it belongs to, and is
//! fed to the core; the [`Effect`]s the core returns are carried out here. No protocol
//! decision is taken in this file: it only translates between the network (and the clock)
//! and the core.
//!
//! Invariants: one task (the actor) owns all state; a job's stop sender lives in the actor
//! until the job's handler returned, so dropping (or aborting) the worker drops every stop
//! sender and thus stops every job.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use proto::pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::core::{
    Core, CoreConfig, Effect, Input, Key, PendingReport, ReportRpc, Session, StreamError, Verdict,
};
use super::{
    EventSink, Handler, Job, StopReason, StopSignal, WorkerConfig, WorkerEvent, WorkerStats,
};
use crate::backoff::{Backoff, BackoffConfig};
use crate::client::Client;
use crate::error::Error;

/// Pause before sending reports again after the cluster could not take them.
const REPORT_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Retry budget of the calls made while shutting down.
const SHUTDOWN_CALL_BUDGET: Duration = Duration::from_secs(5);
/// How long a job runs before its start is reported. Short jobs finish first and send only
/// their final report: one Raft commit per task instead of two, which halves the latency of a
/// dependent task's step and the log traffic of small tasks.
const START_REPORT_DELAY: Duration = Duration::from_millis(10);

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
        let core = Core::new(CoreConfig {
            id: self.config.id.clone(),
            drain_grace: self.config.drain_grace,
            stop_grace: self.config.stop_grace,
        });
        let actor = Actor {
            client: self.client,
            config: self.config,
            handler: self.handler,
            sink: self.sink,
            tx,
            rx,
            control: control_rx,
            core,
            want_register: true,
            stream_task: None,
            heartbeat_task: None,
            stream_backoff: Backoff::new(BackoffConfig {
                initial: Duration::from_millis(20),
                max: Duration::from_secs(2),
            }),
            jobs: HashMap::new(),
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

/// Feeds an input of a spawned task to the actor.
type Tx = mpsc::UnboundedSender<Input>;

struct Actor {
    client: Client,
    config: WorkerConfig,
    handler: Arc<dyn Handler>,
    sink: Option<EventSink>,
    tx: Tx,
    rx: mpsc::UnboundedReceiver<Input>,
    control: watch::Receiver<Control>,
    core: Core,
    /// The core asked for a session ([`Effect::Register`], or none yet).
    want_register: bool,
    stream_task: Option<JoinHandle<()>>,
    heartbeat_task: Option<JoinHandle<()>>,
    stream_backoff: Backoff,
    /// The stop signal of every job whose handler has not returned yet.
    jobs: HashMap<Key, watch::Sender<Option<StopReason>>>,
}

impl Drop for Actor {
    fn drop(&mut self) {
        // Network tasks hold clones of the channel sender; end them with the actor.
        self.stop_network();
    }
}

impl Actor {
    fn emit(&self, e: &WorkerEvent) {
        if let Some(sink) = &self.sink {
            sink(e);
        }
    }

    fn feed(&mut self, input: Input) {
        match &input {
            Input::Assignment { gen, .. }
            | Input::Revoke { gen, .. }
            | Input::Resync { gen, .. }
            | Input::StreamMessage { gen }
                if *gen == self.core.gen() =>
            {
                self.stream_backoff.reset()
            }
            // The handler returned: its stop signal is no longer needed.
            Input::JobEnded { task, fence, .. } => drop(self.jobs.remove(&(*task, *fence))),
            _ => {}
        }
        for effect in self.core.step(input) {
            self.execute(effect);
        }
    }

    async fn run(mut self) -> Result<WorkerStats, Error> {
        loop {
            if self.want_register && !self.core.draining() {
                self.want_register = false;
                match self.register().await? {
                    Some((session, requeued)) => self.feed(Input::Registered { session, requeued }),
                    // Shutdown requested while registering.
                    None => self.feed(Input::Drain { now: Instant::now() }),
                }
            }
            if self.core.should_exit(Instant::now()) {
                break;
            }
            let wake = self.core.next_wake();
            let input = tokio::select! {
                input = self.rx.recv() => input,
                c = next_control(&mut self.control) => match c {
                    Control::Run => continue,
                    Control::Drain => Some(Input::Drain { now: Instant::now() }),
                    Control::Stop => Some(Input::StopNow { now: Instant::now() }),
                },
                _ = sleep_until_opt(wake) => Some(Input::Tick { now: Instant::now() }),
            };
            match input {
                Some(input) => self.feed(input),
                None => break,
            }
        }
        self.leave().await;
        Ok(self.core.stats().clone())
    }

    fn execute(&mut self, effect: Effect) {
        match effect {
            Effect::Event(e) => self.emit(&e),
            Effect::Register => self.want_register = true,
            Effect::StartHeartbeat(session) => self.start_heartbeat(session),
            Effect::OpenStream { gen } => self.open_stream(gen),
            Effect::ReopenStreamLater { gen } => {
                self.stream_task = None;
                let delay = self.stream_backoff.next_delay();
                self.after(delay, Input::Reopen { gen });
            }
            Effect::StopNetwork => self.stop_network(),
            Effect::DrainWorker => {
                let client = self.client.with_retry_budget(SHUTDOWN_CALL_BUDGET);
                let id = self.config.id.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.drain_worker(&id).await {
                        tracing::warn!(error = %e, "could not mark the worker as draining");
                    }
                });
            }
            Effect::StartJob(job) => self.start_job(job),
            Effect::ScheduleStartReport { task, fence } => {
                self.after(START_REPORT_DELAY, Input::StartDue { task, fence })
            }
            Effect::StopJob { task, fence, reason } => {
                if let Some(stop) = self.jobs.get(&(task, fence)) {
                    let _ = stop.send(Some(reason));
                }
            }
            Effect::SendReports(batch) => self.send_reports(batch),
            Effect::RetryReportsLater => self.after(REPORT_RETRY_PAUSE, Input::ReportRetry),
            Effect::FetchTask { gen, task, fence } => {
                let client = self.client.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let found = client.get_task(task).await.ok().map(Box::new);
                    let _ = tx.send(Input::Recovered { gen, task, fence, found });
                });
            }
        }
    }

    /// Feeds `input` after `delay`.
    fn after(&self, delay: Duration, input: Input) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(input);
        });
    }

    fn stop_network(&mut self) {
        if let Some(t) = self.stream_task.take() {
            t.abort();
        }
        if let Some(t) = self.heartbeat_task.take() {
            t.abort();
        }
    }

    /// Registers (or re-registers) until it works. `Ok(None)`: shutdown was requested first.
    async fn register(&mut self) -> Result<Option<(Session, Vec<u64>)>, Error> {
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
                        return Ok(None);
                    }
                    continue;
                }
            };
            match attempt {
                Ok(resp) => {
                    let interval = Duration::from_millis(resp.heartbeat_interval_ms.max(50));
                    let ttl = Duration::from_millis(resp.heartbeat_ttl_ms).max(interval * 2);
                    let session = Session { id: resp.session, heartbeat_interval: interval, ttl };
                    return Ok(Some((session, resp.requeued)));
                }
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(error = %e, "cannot register yet; retrying");
                    let delay = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        c = next_control(&mut self.control) => {
                            if c != Control::Run {
                                return Ok(None);
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
                            let _ = tx.send(Input::ServerDraining { session: session.id });
                        }
                    }
                    Err(error) => {
                        let session_lost = error.is_session_lost();
                        let input = Input::HeartbeatFailed {
                            session: session.id,
                            error: error.to_string(),
                            session_lost,
                        };
                        if tx.send(input).is_err() || session_lost {
                            return;
                        }
                    }
                }
            }
        }));
    }

    fn open_stream(&mut self, gen: u64) {
        if let Some(t) = self.stream_task.take() {
            t.abort();
        }
        let Some(session) = self.core.session() else { return };
        let client = self.client.clone();
        let tx = self.tx.clone();
        let id = self.config.id.clone();
        let ended = move |error: Option<Error>| Input::StreamEnded {
            gen,
            error: error
                .map(|e| StreamError { error: e.to_string(), session_lost: e.is_session_lost() }),
        };
        self.stream_task = Some(tokio::spawn(async move {
            let mut stream = match client.open_assignments(&id, session.id).await {
                Ok(s) => s,
                Err(error) => {
                    let _ = tx.send(ended(Some(error)));
                    return;
                }
            };
            if tx.send(Input::StreamOpened { gen }).is_err() {
                return;
            }
            while let Some(item) = stream.next().await {
                let input = match item {
                    Ok(msg) => match msg.msg {
                        Some(pb::worker_message::Msg::Assignment(assignment)) => {
                            Input::Assignment { gen, assignment }
                        }
                        Some(pb::worker_message::Msg::Revoke(revoke)) => {
                            Input::Revoke { gen, revoke }
                        }
                        Some(pb::worker_message::Msg::Resync(resync)) => {
                            Input::Resync { gen, resync }
                        }
                        None => Input::StreamMessage { gen },
                    },
                    Err(error) => {
                        let _ = tx.send(ended(Some(error)));
                        return;
                    }
                };
                if tx.send(input).is_err() {
                    return;
                }
            }
            let _ = tx.send(ended(None));
        }));
    }

    fn start_job(&mut self, job: Job) {
        let key = (job.task, job.fence);
        let (stop_tx, stop) = watch::channel(None::<StopReason>);
        let deadline = (job.deadline_ms > 0).then(|| {
            let now = unix_ms();
            Instant::now() + Duration::from_millis(job.deadline_ms.saturating_sub(now))
        });
        let handler = self.handler.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let run = handler.run(job, StopSignal(stop));
            tokio::pin!(run);
            let mut deadline = deadline;
            let outcome = loop {
                tokio::select! {
                    o = &mut run => break o,
                    _ = sleep_until_opt(deadline) => {
                        deadline = None;
                        let _ = tx.send(Input::DeadlinePassed { task: key.0, fence: key.1 });
                    }
                }
            };
            let _ = tx.send(Input::JobEnded { task: key.0, fence: key.1, outcome });
        });
        self.jobs.insert(key, stop_tx);
    }

    fn send_reports(&mut self, batch: Vec<PendingReport>) {
        let req = pb::ReportRequest {
            worker_id: self.config.id.clone(),
            reports: batch.iter().map(PendingReport::to_pb).collect(),
        };
        let client = self.client.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let answer = match client.report(req).await {
                Ok(resp) => ReportRpc::Answered(
                    resp.results
                        .into_iter()
                        .map(|res| {
                            if res.accepted || res.duplicate {
                                if res.duplicate {
                                    Verdict::Duplicate
                                } else {
                                    Verdict::Applied
                                }
                            } else {
                                let error = if res.error.is_empty() {
                                    "refused".to_string()
                                } else {
                                    res.error
                                };
                                Verdict::Refused { error, stale: res.stale }
                            }
                        })
                        .collect(),
                ),
                Err(e) if e.is_unavailable() => ReportRpc::Unreachable(e.to_string()),
                Err(e) => ReportRpc::Refused {
                    error: e.to_string(),
                    message: e.message(),
                    too_big: matches!(
                        e.code(),
                        tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                    ),
                },
            };
            let _ = tx.send(Input::ReportAnswered { batch, answer });
        });
    }

    /// Leaves the cluster: deregister (the server requeues whatever is still held).
    async fn leave(&mut self) {
        self.stop_network();
        let Some(session) = self.core.take_session() else { return };
        let client = self.client.with_retry_budget(SHUTDOWN_CALL_BUDGET);
        match client.deregister_worker(&self.config.id, session.id).await {
            Ok(resp) => {
                tracing::info!(worker_id = %self.config.id, requeued = resp.requeued.len(), "deregistered");
                self.emit(&WorkerEvent::Deregistered);
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
