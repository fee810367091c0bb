//! A worker process for chaos runs. It behaves like a real worker (register, assignment
//! stream, heartbeats, a `Succeeded` report with the fencing token when an execution ends,
//! reconnects, re-registers when its session was expired) and records every execution and
//! report in its own history file, on the run's shared clock. The harness SIGSTOPs it to
//! simulate a worker that stalls past its liveness deadline; on SIGCONT it reports what it
//! finished, and the server must refuse those late completions.
//!
//! Usage: chaos-worker ID HISTORY_FILE OP_BASE SLOTS RUN_MIN_MS RUN_MAX_MS SEED ENDPOINT...

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chaos_tests::cluster::channel;
use chaos_tests::history::{EventKind, HistoryWriter, RunClock};
use proto::pb;
use proto::pb::workers_client::WorkersClient;
use rand::{Rng, SeedableRng};
use tonic::Code;

struct Ctx {
    id: String,
    endpoints: Vec<String>,
    clock: RunClock,
    history: Mutex<HistoryWriter>,
    ops: AtomicU64,
    next_endpoint: AtomicU64,
}

impl Ctx {
    fn record(&self, kind: EventKind) {
        let t = self.clock.now_ms();
        if let Err(e) = self.history.lock().unwrap_or_else(|e| e.into_inner()).record(t, kind) {
            eprintln!("chaos-worker {}: cannot write history: {e}", self.id);
            std::process::exit(1);
        }
    }

    fn client(&self) -> WorkersClient<tonic::transport::Channel> {
        let i = self.next_endpoint.load(Ordering::Relaxed) as usize % self.endpoints.len();
        let ch = channel(&self.endpoints[i], Duration::from_secs(3)).expect("valid endpoint");
        WorkersClient::new(ch)
    }

    fn rotate(&self) {
        self.next_endpoint.fetch_add(1, Ordering::Relaxed);
    }
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
    )
}

/// Report one completion: retried across nodes for a while; the op's outcome is recorded.
async fn complete(ctx: Arc<Ctx>, task: u64, fence: u64) {
    let op = ctx.ops.fetch_add(1, Ordering::Relaxed);
    ctx.record(EventKind::CompleteInvoke {
        op,
        worker: ctx.id.clone(),
        task,
        fence,
        success: true,
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        let req = pb::ReportRequest {
            worker_id: ctx.id.clone(),
            reports: vec![pb::TaskReport {
                task,
                fence,
                outcome: Some(pb::task_report::Outcome::Succeeded(pb::Succeeded {
                    result: b"ok".to_vec(),
                })),
            }],
        };
        match ctx.client().report(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let Some(x) = r.results.first() else {
                    last = "empty report answer".into();
                    break;
                };
                if x.accepted {
                    ctx.record(EventKind::CompleteOk { op, task, fence, duplicate: x.duplicate });
                } else {
                    ctx.record(EventKind::CompleteRejected {
                        op,
                        task,
                        fence,
                        reason: x.error.clone(),
                        stale: x.stale,
                    });
                }
                return;
            }
            Err(s) if retryable(&s) => {
                last = s.message().to_string();
                ctx.rotate();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => {
                // The server answered and proved it did nothing.
                ctx.record(EventKind::CompleteRejected {
                    op,
                    task,
                    fence,
                    reason: s.message().to_string(),
                    stale: false,
                });
                return;
            }
        }
    }
    ctx.record(EventKind::CompleteUnknown { op, task, fence, reason: last });
}

async fn register(ctx: &Ctx, spec: &pb::WorkerSpec, instance: u64) -> pb::RegisterWorkerResponse {
    loop {
        match ctx
            .client()
            .register_worker(pb::RegisterWorkerRequest { worker: Some(spec.clone()), instance })
            .await
        {
            Ok(r) => return r.into_inner(),
            Err(_) => {
                ctx.rotate();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn run(ctx: Arc<Ctx>, slots: u32, run_ms: (u64, u64), seed: u64) -> Result<()> {
    let instance = seed ^ 0x9e37_79b9_7f4a_7c15;
    let rng = Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
    let seen: Arc<Mutex<HashSet<(u64, u64)>>> = Arc::new(Mutex::new(HashSet::new()));
    let spec = pb::WorkerSpec {
        id: ctx.id.clone(),
        queues: vec!["default".into()],
        labels: Default::default(),
        capacity: Some(pb::Resources {
            cpu_milli: 64_000,
            memory_mib: 65_536,
            named: Default::default(),
        }),
        slots,
    };
    loop {
        let reg = register(&ctx, &spec, instance).await;
        let session = reg.session;
        let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(50));
        let (lost_tx, mut lost_rx) = tokio::sync::watch::channel(false);
        let hb = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(interval).await;
                    let req = pb::HeartbeatRequest { worker_id: ctx.id.clone(), session };
                    match ctx.client().heartbeat(req).await {
                        Ok(_) => {}
                        Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                            let _ = lost_tx.send(true);
                            return;
                        }
                        Err(_) => ctx.rotate(),
                    }
                }
            })
        };
        let stream = ctx
            .client()
            .open_assignments(pb::OpenAssignmentsRequest { worker_id: ctx.id.clone(), session })
            .await;
        match stream {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    let msg = tokio::select! {
                        m = s.message() => m,
                        _ = lost_rx.wait_for(|l| *l) => break,
                    };
                    let Ok(Some(msg)) = msg else {
                        ctx.rotate();
                        break;
                    };
                    let Some(pb::worker_message::Msg::Assignment(a)) = msg.msg else { continue };
                    if !seen.lock().unwrap_or_else(|e| e.into_inner()).insert((a.task, a.fence)) {
                        continue;
                    }
                    ctx.record(EventKind::ExecStart {
                        worker: ctx.id.clone(),
                        task: a.task,
                        attempt: a.attempt,
                        fence: a.fence,
                    });
                    let dur = rng
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .random_range(run_ms.0..=run_ms.1);
                    let ctx2 = ctx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(dur)).await;
                        ctx2.record(EventKind::ExecEnd {
                            worker: ctx2.id.clone(),
                            task: a.task,
                            fence: a.fence,
                            success: true,
                        });
                        complete(ctx2, a.task, a.fence).await;
                    });
                }
            }
            Err(_) => ctx.rotate(),
        }
        hb.abort();
        tokio::time::sleep(Duration::from_millis(100)).await;
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
    let ctx = Arc::new(Ctx {
        id: args[0].clone(),
        history: Mutex::new(HistoryWriter::open(&args[1])?),
        ops: AtomicU64::new(args[2].parse().context("OP_BASE")?),
        endpoints: args[7..].to_vec(),
        clock: RunClock::from_start_ns(start_ns),
        next_endpoint: AtomicU64::new(0),
    });
    let slots: u32 = args[3].parse().context("SLOTS")?;
    let run_ms = (args[4].parse().context("RUN_MIN_MS")?, args[5].parse().context("RUN_MAX_MS")?);
    let seed: u64 = args[6].parse().context("SEED")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(ctx, slots, run_ms, seed))
}
