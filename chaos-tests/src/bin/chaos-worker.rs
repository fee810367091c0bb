//! A worker process for chaos runs: the library worker runtime (`client::worker`) that users
//! run, with a payload that sleeps for a seeded random time and succeeds, and an event sink
//! that records what the runtime did into the process's own history file, on the run's shared
//! clock. The chaos run therefore tests the real worker protocol (sessions, Started reports,
//! batched and resent reports with fencing tokens, stream reopening, re-registration after a
//! lost session), not a copy of it.
//!
//! The harness SIGSTOPs it to simulate a worker that stalls past its liveness deadline; on
//! SIGCONT it reports what it finished before it learns that its session is gone, and the
//! server must refuse those late completions as stale.
//!
//! Runtime events map to history events as follows:
//! * `ExecStart` / `ExecEnd` → the same events (a job stopped by the runtime ends unsuccessful);
//! * each send of a final report (`ReportSent` of a Succeeded/Failed) → a new `CompleteInvoke`
//!   op, recorded before the RPC leaves (the runtime calls the sink before it sends);
//! * its answer → `CompleteOk` (accepted, maybe duplicate), `CompleteRejected` (with the
//!   server's stale flag), or `CompleteUnknown` (no answer: the runtime resends it later, as a
//!   new op). A report whose process is killed first stays an invoke without completion, which
//!   the checker counts as unknown.
//!
//! Usage: chaos-worker ID HISTORY_FILE OP_BASE SLOTS RUN_MIN_MS RUN_MAX_MS SEED ENDPOINT...

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chaos_tests::history::{EventKind, HistoryWriter, OpId, RunClock};
use client::worker::{
    Handler, Job, Outcome, ReportAnswer, ReportKind, StopSignal, Worker, WorkerConfig, WorkerEvent,
};
use client::{Client, ClientConfig};
use proto::pb;
use rand::{Rng, SeedableRng};

/// Turns runtime events into history events.
struct Recorder {
    id: String,
    clock: RunClock,
    history: HistoryWriter,
    next_op: OpId,
    /// The op of the final report in flight per `(task, fence)`.
    in_flight: HashMap<(u64, u64), OpId>,
}

impl Recorder {
    fn record(&mut self, kind: EventKind) {
        let t = self.clock.now_ms();
        if let Err(e) = self.history.record(t, kind) {
            eprintln!("chaos-worker {}: cannot write history: {e:#}", self.id);
            std::process::exit(1);
        }
    }

    fn on_event(&mut self, e: &WorkerEvent) {
        match e {
            WorkerEvent::ExecStart { task, attempt, fence } => self.record(EventKind::ExecStart {
                worker: self.id.clone(),
                task: *task,
                attempt: *attempt,
                fence: *fence,
            }),
            WorkerEvent::ExecEnd { task, fence, success, .. } => self.record(EventKind::ExecEnd {
                worker: self.id.clone(),
                task: *task,
                fence: *fence,
                success: *success,
            }),
            WorkerEvent::ReportSent { task, fence, kind } if *kind != ReportKind::Started => {
                let op = self.next_op;
                self.next_op += 1;
                self.in_flight.insert((*task, *fence), op);
                self.record(EventKind::CompleteInvoke {
                    op,
                    worker: self.id.clone(),
                    task: *task,
                    fence: *fence,
                    success: *kind == ReportKind::Succeeded,
                });
            }
            WorkerEvent::ReportAnswered { task, fence, kind, answer }
                if *kind != ReportKind::Started =>
            {
                let (task, fence) = (*task, *fence);
                let Some(op) = self.in_flight.remove(&(task, fence)) else { return };
                self.record(match answer {
                    ReportAnswer::Accepted { duplicate } => {
                        EventKind::CompleteOk { op, task, fence, duplicate: *duplicate }
                    }
                    ReportAnswer::Rejected { error, stale } => EventKind::CompleteRejected {
                        op,
                        task,
                        fence,
                        reason: error.clone(),
                        stale: *stale,
                    },
                    ReportAnswer::Unknown { error } => {
                        EventKind::CompleteUnknown { op, task, fence, reason: error.clone() }
                    }
                });
            }
            _ => {}
        }
    }
}

/// The payload: sleep a seeded random time in `run_ms`, then succeed (or stop when told).
fn payload(rng: Arc<Mutex<rand::rngs::StdRng>>, run_ms: (u64, u64)) -> impl Handler {
    move |_job: Job, mut stop: StopSignal| {
        let ms = rng.lock().unwrap_or_else(|e| e.into_inner()).random_range(run_ms.0..=run_ms.1);
        async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => Outcome::Succeeded(b"ok".to_vec()),
                reason = stop.stopped() => Outcome::Failed { message: format!("stopped: {reason}"), retryable: true },
            }
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 8 {
        bail!("usage: chaos-worker ID HISTORY_FILE OP_BASE SLOTS RUN_MIN_MS RUN_MAX_MS SEED ENDPOINT...");
    }
    let start_ns: u64 = std::env::var(RunClock::ENV)
        .context("the run clock start must be passed in RAFTSCHED_RUN_START_NS")?
        .parse()
        .context("RAFTSCHED_RUN_START_NS")?;
    let id = args[0].clone();
    let recorder = Arc::new(Mutex::new(Recorder {
        id: id.clone(),
        clock: RunClock::from_start_ns(start_ns),
        history: HistoryWriter::open(&args[1])?,
        next_op: args[2].parse().context("OP_BASE")?,
        in_flight: HashMap::new(),
    }));
    let slots: u32 = args[3].parse().context("SLOTS")?;
    let run_ms = (args[4].parse().context("RUN_MIN_MS")?, args[5].parse().context("RUN_MAX_MS")?);
    let seed: u64 = args[6].parse().context("SEED")?;

    let mut client_config = ClientConfig::new(args[7..].iter().cloned());
    client_config.call_timeout = Duration::from_secs(3);
    client_config.retry_budget = Duration::from_secs(20);
    let mut config = WorkerConfig::new(id);
    config.instance = seed ^ 0x9e37_79b9_7f4a_7c15;
    config.slots = slots;
    config.capacity =
        pb::Resources { cpu_milli: 64_000, memory_mib: 65_536, named: Default::default() };
    let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let client = Client::with_config(client_config)?;
        let sink = recorder.clone();
        let worker = Worker::new(client, config, payload(rng, run_ms))
            .on_event(move |e| sink.lock().unwrap_or_else(|e| e.into_inner()).on_event(e));
        let stats = worker.start().wait().await?;
        bail!("the worker stopped on its own: {stats:?}")
    })
}
