//! One seeded chaos run: a real cluster, real workers, a client workload, a fault schedule,
//! and the checker's verdict.
//!
//! Phases: start 3 nodes and 3 worker processes; run the workload (submits with priorities and
//! dependencies, some cancels) while the faults of the schedule happen one after another;
//! heal everything; let the workload finish and every acknowledged task reach a terminal
//! state; stop the workers; read every node's final state and digest; check the history.
//! Every random choice comes from the printed seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use proto::pb;
use proto::pb::tasks_client::TasksClient;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tracing::info;

use crate::checker::{self, Expectations, Report};
use client::local::{Proc, ProcSpec};

use crate::cluster::{channel, ChaosCluster};
use crate::history::{fault, read_histories, EventKind, HistoryWriter, RunClock};
use crate::upgrade;

/// Size of a run.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Tasks the workload submits (at least; it keeps going until the faults are done).
    pub tasks: usize,
    /// Faults of each kind.
    pub leader_kills: usize,
    /// Follower SIGKILLs.
    pub follower_kills: usize,
    /// SIGSTOP/SIGCONT pauses of nodes (leader and followers, short and long).
    pub pauses: usize,
    /// Workers paused past their liveness deadline.
    pub worker_pauses: usize,
    /// Network partitions (the first isolates the leader in a minority).
    pub partitions: usize,
    /// Whole-cluster SIGKILL and restart.
    pub cluster_restarts: usize,
    /// Add a node, promote it, remove another (under load).
    pub membership_changes: usize,
    /// Start every node as a release with this command version would run
    /// (`SCHED_COMMAND_VERSION`); `None`: this build's.
    pub start_command_version: Option<u32>,
    /// Rolling upgrades from `start_command_version` to this build, one member at a time.
    pub rolling_upgrades: usize,
    /// Pause between submits.
    pub submit_interval: Duration,
    /// Where to keep data dirs, logs and the history.
    pub dir: PathBuf,
}

impl ChaosConfig {
    /// The CI smoke run.
    pub fn smoke(seed: u64, dir: PathBuf) -> Self {
        ChaosConfig {
            seed,
            tasks: 300,
            leader_kills: 5,
            follower_kills: 1,
            pauses: 5,
            worker_pauses: 5,
            partitions: 2,
            cluster_restarts: 2,
            membership_changes: 1,
            start_command_version: None,
            rolling_upgrades: 0,
            submit_interval: Duration::from_millis(40),
            dir,
        }
    }

    /// A rolling upgrade under load: every node starts as the previous release (the base
    /// command version), and is restarted as this build one at a time, among a few other
    /// faults.
    pub fn upgrade(seed: u64, dir: PathBuf) -> Self {
        ChaosConfig {
            tasks: 200,
            leader_kills: 1,
            follower_kills: 0,
            pauses: 1,
            worker_pauses: 0,
            partitions: 0,
            cluster_restarts: 0,
            membership_changes: 0,
            start_command_version: Some(state_machine::BASE_COMMAND_VERSION),
            rolling_upgrades: 1,
            ..ChaosConfig::smoke(seed, dir)
        }
    }

    /// The long run (`CHAOS_LONG=1`).
    pub fn long(seed: u64, dir: PathBuf) -> Self {
        ChaosConfig {
            tasks: 1_000,
            leader_kills: 20,
            follower_kills: 5,
            pauses: 30,
            worker_pauses: 20,
            partitions: 10,
            cluster_restarts: 3,
            membership_changes: 2,
            ..ChaosConfig::smoke(seed, dir)
        }
    }
}

/// What a run produced.
pub struct Outcome {
    /// The checker's verdict.
    pub report: Report,
    /// Where its history, logs and data live.
    pub dir: PathBuf,
}

const NODE_CONFIG: &str = r#"
log = "info,openraft=warn,sled=warn"
[workers]
heartbeat_ttl = "1s"
heartbeat_interval = "250ms"
failover_grace = "2s"
[raft]
snapshot_every_entries = 1500
keep_entries_after_snapshot = 300
write_timeout = "3s"
"#;

/// The shared recorder of the harness process.
#[derive(Clone)]
struct Recorder {
    clock: RunClock,
    writer: Arc<Mutex<HistoryWriter>>,
    ops: Arc<AtomicU64>,
}

impl Recorder {
    fn record(&self, kind: EventKind) {
        let t = self.clock.now_ms();
        let _ = self.writer.lock().unwrap_or_else(|e| e.into_inner()).record(t, kind);
    }

    fn op(&self) -> u64 {
        self.ops.fetch_add(1, Ordering::Relaxed)
    }
}

/// The worker processes (killed on drop) and their history files.
struct Workers {
    procs: Vec<Proc>,
    files: Vec<PathBuf>,
}

fn worker_binary() -> Result<PathBuf> {
    let node = client::local::schedulerd_for_this_exe()?;
    let p = node.with_file_name("chaos-worker");
    if p.is_file() {
        Ok(p)
    } else {
        bail!("chaos-worker binary not found at {}", p.display())
    }
}

fn start_workers(
    n: usize,
    dir: &Path,
    clock: &RunClock,
    seed: u64,
    endpoints: &[String],
) -> Result<Workers> {
    let bin = worker_binary()?;
    let mut w = Workers { procs: Vec::new(), files: Vec::new() };
    for i in 0..n {
        let id = format!("worker-{}", i + 1);
        let file = dir.join(format!("history-{id}.jsonl"));
        let spec = ProcSpec::new(&id, &bin, dir.join(format!("{id}.log")))
            .env(RunClock::ENV, clock.start_ns().to_string())
            .args([
                id.clone(),
                file.display().to_string(),
                ((i as u64 + 1) * 1_000_000_000).to_string(),
                "2".into(),
                "20".into(),
                "150".into(),
                seed.wrapping_add(i as u64).to_string(),
            ])
            .args(endpoints);
        w.procs.push(Proc::spawn(spec).context("spawn chaos-worker")?);
        w.files.push(file);
    }
    Ok(w)
}

/// Follow the applied-change stream from index 1, across node failures, into the history.
fn spawn_audit(rec: Recorder, endpoints: Vec<String>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut cursor = 0u64;
        let mut pending_gap: Option<u64> = None;
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let ep = &endpoints[i % endpoints.len()];
            i += 1;
            let Ok(ch) = channel(ep, Duration::from_secs(3600)) else { continue };
            let mut client = TasksClient::new(ch);
            let from = cursor + 1;
            let stream = tokio::time::timeout(
                Duration::from_secs(2),
                client.watch_events(pb::WatchEventsRequest { from_index: from }),
            )
            .await;
            let mut stream = match stream {
                Ok(Ok(s)) => s.into_inner(),
                Ok(Err(s)) if s.code() == tonic::Code::OutOfRange => {
                    // This node no longer has `from`: resume where it can, and say what we
                    // could not see.
                    let first = s
                        .message()
                        .rsplit("watch from index ")
                        .next()
                        .and_then(|x| x.trim().parse::<u64>().ok());
                    if let Some(first) = first.filter(|f| *f > from) {
                        pending_gap = Some(pending_gap.unwrap_or(from));
                        cursor = first - 1;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let msg = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
                let batch = match msg {
                    Err(_) => continue,
                    Ok(Ok(Some(b))) => b,
                    Ok(_) => break,
                };
                // Only a reported gap is one: entries without task changes produce no batch,
                // so `batch.index` may jump by more than one.
                if let Some(from) = pending_gap.take() {
                    rec.record(EventKind::AuditGap { from_index: from, to_index: batch.index - 1 });
                }
                for (seq, e) in batch.events.iter().enumerate() {
                    rec.record(EventKind::Applied {
                        index: batch.index,
                        seq: seq as u32,
                        task: e.task,
                        state: proto::convert::state_name(e.state).to_string(),
                        attempt: e.attempt,
                        fence: (e.fence > 0).then_some(e.fence),
                        worker: (!e.worker.is_empty()).then(|| e.worker.clone()),
                        term: Some(batch.term),
                        plan_index: (batch.planned_at > 0).then_some(batch.planned_at),
                    });
                }
                cursor = batch.index;
            }
        }
    })
}

/// Record each node's (role, term) as seen in cluster status.
fn spawn_leader_poller(
    rec: Recorder,
    cluster: Arc<tokio::sync::Mutex<ChaosCluster>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen = std::collections::HashSet::new();
        while !stop.load(Ordering::Relaxed) {
            let addrs: Vec<(u64, String)> = cluster.lock().await.live();
            for (_, addr) in addrs {
                let Ok(ch) = channel(&addr, Duration::from_secs(1)) else { continue };
                let mut c = proto::pb::cluster_client::ClusterClient::new(ch);
                if let Ok(s) = c.status(pb::ClusterStatusRequest {}).await {
                    for n in
                        s.into_inner().nodes.iter().filter(|n| n.reachable && n.role == "leader")
                    {
                        if seen.insert((n.id, n.term)) {
                            rec.record(EventKind::LeaderObserved { node: n.id, term: n.term });
                        }
                    }
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Submit tasks (and cancel a few) until told to stop and at least `min_tasks` were tried.
#[allow(clippy::too_many_arguments)]
fn spawn_workload(
    rec: Recorder,
    endpoints: Vec<String>,
    seed: u64,
    min_tasks: usize,
    interval: Duration,
    faults_done: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, u64>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let client = match client::Client::new(endpoints.clone()) {
            Ok(c) => c
                .with_retry_budget(Duration::from_secs(8))
                .with_call_timeout(Duration::from_secs(3)),
            Err(e) => {
                rec.record(EventKind::HarnessError { what: format!("client: {e}") });
                return;
            }
        };
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut n = 0usize;
        let mut inflight = tokio::task::JoinSet::new();
        while n < min_tasks || !faults_done.load(Ordering::Relaxed) {
            let key = format!("k{n}");
            n += 1;
            let priority: i32 = rng.random_range(-2..=2);
            let deps: Vec<(String, u64)> = {
                let a = acked.lock().unwrap_or_else(|e| e.into_inner());
                if rng.random_bool(0.2) && !a.is_empty() {
                    let keys: Vec<(&String, &u64)> = a.iter().collect();
                    (0..rng.random_range(1..=2))
                        .map(|_| {
                            // Prefer recent tasks so dependencies are often still running.
                            let back = rng.random_range(0..keys.len().min(20));
                            let (k, id) = keys[keys.len() - 1 - back];
                            (k.clone(), *id)
                        })
                        .collect::<BTreeMap<_, _>>()
                        .into_iter()
                        .collect()
                } else {
                    Vec::new()
                }
            };
            let cancel_later = rng.random_bool(0.05);
            let (rec2, client2, acked2) = (rec.clone(), client.clone(), acked.clone());
            inflight.spawn(async move {
                let op = rec2.op();
                rec2.record(EventKind::SubmitInvoke {
                    op,
                    key: key.clone(),
                    priority,
                    deps: deps.iter().map(|(k, _)| k.clone()).collect(),
                });
                let spec = pb::TaskSpec {
                    name: "chaos".into(),
                    priority,
                    depends_on: deps.iter().map(|(_, id)| *id).collect(),
                    idempotency_key: key.clone(),
                    retry: Some(pb::RetryPolicy {
                        max_attempts: 50,
                        initial_backoff_ms: Some(50),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                match client2.submit(spec).await {
                    Ok(t) => {
                        rec2.record(EventKind::SubmitOk { op, key: key.clone(), id: t.id });
                        acked2.lock().unwrap_or_else(|e| e.into_inner()).insert(key, t.id);
                        if cancel_later {
                            tokio::time::sleep(Duration::from_millis(30)).await;
                            let op = rec2.op();
                            rec2.record(EventKind::CancelInvoke { op, id: t.id });
                            match client2.cancel(t.id, "chaos").await {
                                Ok(r) if r.ok => rec2.record(EventKind::CancelOk { op, id: t.id }),
                                Ok(r) => rec2.record(EventKind::CancelFail {
                                    op,
                                    id: t.id,
                                    reason: r.error,
                                }),
                                Err(e) if e.is_indeterminate() => {
                                    rec2.record(EventKind::CancelUnknown {
                                        op,
                                        id: t.id,
                                        reason: e.to_string(),
                                    })
                                }
                                Err(e) => rec2.record(EventKind::CancelFail {
                                    op,
                                    id: t.id,
                                    reason: e.to_string(),
                                }),
                            }
                        }
                    }
                    Err(e) if e.is_indeterminate() => {
                        rec2.record(EventKind::SubmitUnknown { op, key, reason: e.to_string() })
                    }
                    Err(e) => rec2.record(EventKind::SubmitFail { op, key, reason: e.to_string() }),
                }
            });
            // Keep a bounded number of submits in flight.
            while inflight.len() >= 32 {
                inflight.join_next().await;
            }
            tokio::time::sleep(interval).await;
        }
        while inflight.join_next().await.is_some() {}
    })
}

fn fault_plan(cfg: &ChaosConfig, rng: &mut StdRng) -> Vec<&'static str> {
    let mut plan = Vec::new();
    plan.extend(std::iter::repeat_n(fault::KILL_LEADER, cfg.leader_kills));
    plan.extend(std::iter::repeat_n(fault::KILL_FOLLOWER, cfg.follower_kills));
    for i in 0..cfg.pauses {
        plan.push(if i % 2 == 0 { fault::PAUSE_LEADER } else { fault::PAUSE_FOLLOWER });
    }
    plan.extend(std::iter::repeat_n(fault::WORKER_PAUSE, cfg.worker_pauses));
    for i in 0..cfg.partitions {
        plan.push(if i % 2 == 0 { fault::PARTITION_LEADER_MINORITY } else { fault::PARTITION });
    }
    plan.extend(std::iter::repeat_n(fault::CLUSTER_RESTART, cfg.cluster_restarts));
    plan.extend(std::iter::repeat_n(fault::MEMBERSHIP_CHANGE, cfg.membership_changes));
    plan.extend(std::iter::repeat_n(fault::ROLLING_UPGRADE, cfg.rolling_upgrades));
    plan.shuffle(rng);
    plan
}

/// A random member other than `leader`: one draw in `0..members.len() - 1` (seeds depend
/// on this exact use of the rng).
fn random_follower(members: &[u64], leader: u64, rng: &mut StdRng) -> u64 {
    let followers: Vec<u64> = members.iter().copied().filter(|m| *m != leader).collect();
    followers[rng.random_range(0..members.len() - 1)]
}

/// Run one fault to completion (installed, held, healed).
async fn run_fault(
    kind: &'static str,
    id: u64,
    rng: &mut StdRng,
    rec: &Recorder,
    cluster: &Arc<tokio::sync::Mutex<ChaosCluster>>,
    members: &mut Vec<u64>,
    workers: &mut Workers,
) -> Result<()> {
    let start =
        |target: String| rec.record(EventKind::FaultStart { id, fault: kind.to_string(), target });
    let leader = cluster.lock().await.wait_leader(members, Duration::from_secs(30)).await?;
    match kind {
        fault::KILL_LEADER | fault::KILL_FOLLOWER => {
            let victim = if kind == fault::KILL_LEADER {
                leader
            } else {
                random_follower(members, leader, rng)
            };
            cluster.lock().await.kill(victim);
            start(format!("node-{victim}"));
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
            cluster.lock().await.start(victim)?;
        }
        fault::PAUSE_LEADER | fault::PAUSE_FOLLOWER => {
            let victim = if kind == fault::PAUSE_LEADER {
                leader
            } else {
                random_follower(members, leader, rng)
            };
            // Shorter or longer than the election timeout (90-150 ms).
            let hold = if rng.random_bool(0.5) {
                rng.random_range(20..70)
            } else {
                rng.random_range(800..2_000)
            };
            cluster.lock().await.pause(victim);
            start(format!("node-{victim} for {hold} ms"));
            tokio::time::sleep(Duration::from_millis(hold)).await;
            cluster.lock().await.resume(victim);
        }
        fault::PARTITION_LEADER_MINORITY | fault::PARTITION => {
            let isolated = if kind == fault::PARTITION_LEADER_MINORITY {
                leader
            } else {
                random_follower(members, leader, rng)
            };
            let rest: Vec<u64> = members.iter().copied().filter(|m| *m != isolated).collect();
            cluster.lock().await.partition(&[isolated], &rest);
            start(format!("node-{isolated} | {rest:?}"));
            tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_000))).await;
            cluster.lock().await.heal();
        }
        fault::WORKER_PAUSE => {
            let i = rng.random_range(0..workers.procs.len());
            let w = &mut workers.procs[i];
            w.pause();
            start(w.name().to_string());
            // Well past the 1 s heartbeat TTL (plus the leader's check interval).
            tokio::time::sleep(Duration::from_millis(rng.random_range(2_500..3_500))).await;
            w.resume();
        }
        fault::CLUSTER_RESTART => {
            {
                let mut c = cluster.lock().await;
                for m in members.iter() {
                    c.kill(*m);
                }
            }
            start(format!("{members:?}"));
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_000))).await;
            let mut c = cluster.lock().await;
            for m in members.iter() {
                c.start(*m)?;
            }
        }
        fault::MEMBERSHIP_CHANGE => {
            let new_id = {
                let mut c = cluster.lock().await;
                let new_id = c.max_id() + 1;
                c.add_node_proc(new_id).await?;
                c.start(new_id)?;
                new_id
            };
            let victim = random_follower(members, leader, rng);
            start(format!("add node-{new_id}, remove node-{victim}"));
            let (addr, any) = {
                let c = cluster.lock().await;
                (c.addr(new_id).context("the new node")?.to_string(), c.endpoints(members))
            };
            let admin =
                client::Client::new(any.clone())?.with_retry_budget(Duration::from_secs(20));
            admin.add_learner(new_id, &addr, "", 15_000).await.context("add learner")?;
            admin.promote(new_id).await.context("promote")?;
            admin.remove_node(victim).await.context("remove")?;
            members.retain(|m| *m != victim);
            members.push(new_id);
            cluster.lock().await.kill(victim);
        }
        fault::ROLLING_UPGRADE => {
            let to = state_machine::COMMAND_VERSION;
            start(format!("{members:?} to command version {to}, leader {leader} last"));
            let mut order: Vec<u64> = members.iter().copied().filter(|m| *m != leader).collect();
            order.push(leader);
            let any = cluster.lock().await.endpoints(members);
            let admin = client::Client::new(any)?.with_retry_budget(Duration::from_secs(20));
            for m in &order {
                // While any member runs the old release, a newer kind must be refused.
                if let Err(e) = upgrade::newer_kind_refused(&admin).await {
                    rec.record(EventKind::HarnessError { what: format!("rolling upgrade: {e}") });
                }
                {
                    let mut c = cluster.lock().await;
                    c.kill(*m);
                    c.set_env(*m, "SCHED_COMMAND_VERSION", &to.to_string())?;
                    c.start(*m)?;
                }
                let c = cluster.lock().await;
                c.wait_leader(members, Duration::from_secs(30)).await?;
                upgrade::wait_caught_up(&c, members, *m).await?;
            }
            if let Err(e) = upgrade::newer_kind_accepted(&admin, to).await {
                rec.record(EventKind::HarnessError { what: format!("rolling upgrade: {e}") });
            }
            let c = cluster.lock().await;
            for m in members.iter() {
                if !c.is_running(*m) {
                    rec.record(EventKind::HarnessError {
                        what: format!("rolling upgrade: node {m} stopped"),
                    });
                }
            }
        }
        other => bail!("unknown fault {other}"),
    }
    rec.record(EventKind::FaultEnd { id });
    // Settle: a leader among the members before the next fault.
    cluster.lock().await.wait_leader(members, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(rng.random_range(500..1_500))).await;
    Ok(())
}

/// Run a chaos scenario; the verdict is in the returned report.
pub async fn run(cfg: ChaosConfig) -> Result<Outcome> {
    std::fs::create_dir_all(&cfg.dir)?;
    let clock = RunClock::start();
    let main_history = cfg.dir.join("history-harness.jsonl");
    let rec = Recorder {
        clock,
        writer: Arc::new(Mutex::new(HistoryWriter::open(&main_history)?)),
        ops: Arc::new(AtomicU64::new(1)),
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut members: Vec<u64> = vec![1, 2, 3];
    let mut first = ChaosCluster::new(&cfg.dir, 3, NODE_CONFIG).await?;
    if let Some(v) = cfg.start_command_version {
        for id in 1..=3 {
            first.set_env(id, "SCHED_COMMAND_VERSION", &v.to_string())?;
        }
    }
    let cluster = Arc::new(tokio::sync::Mutex::new(first));
    {
        // Starts nodes 1-3, initializes them as the members, waits for a leader.
        let mut c = cluster.lock().await;
        c.start_all().await?;
        c.wait_leader(&members, Duration::from_secs(30)).await?;
    }
    // The workload, the workers and the audit follower get the endpoints of the initial
    // members (nodes 1-3) only: a node added by a membership change is never among them,
    // so they reach the cluster through whichever of 1-3 are still members. (The final
    // reads below use the members at the end.)
    let mut endpoints = cluster.lock().await.endpoints(&members);
    let stop = Arc::new(AtomicBool::new(false));
    let audit = spawn_audit(rec.clone(), endpoints.clone(), stop.clone());
    let poller = spawn_leader_poller(rec.clone(), cluster.clone(), stop.clone());
    let mut workers = start_workers(3, &cfg.dir, &clock, cfg.seed, &endpoints)?;
    let faults_done = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let workload = spawn_workload(
        rec.clone(),
        endpoints.clone(),
        cfg.seed,
        cfg.tasks,
        cfg.submit_interval,
        faults_done.clone(),
        acked.clone(),
    );

    let plan = fault_plan(&cfg, &mut rng);
    info!(faults = ?plan, "fault schedule");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, kind) in plan.iter().enumerate() {
        info!(fault = kind, n = i + 1, of = plan.len(), "injecting");
        if let Err(e) =
            run_fault(kind, i as u64 + 1, &mut rng, &rec, &cluster, &mut members, &mut workers)
                .await
        {
            rec.record(EventKind::HarnessError { what: format!("fault {kind}: {e:#}") });
            break;
        }
    }
    {
        let mut c = cluster.lock().await;
        c.heal();
        for m in members.clone() {
            c.resume(m);
            c.start(m)?;
        }
        endpoints = c.endpoints(&members);
    }
    faults_done.store(true, Ordering::Relaxed);
    let _ = workload.await;

    // Every acknowledged task must reach a terminal state.
    let reader = client::Client::new(endpoints.clone())?.with_retry_budget(Duration::from_secs(30));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let tasks = reader
            .list_all_tasks(pb::ListTasksRequest { limit: 1000, ..Default::default() }, 1_000_000)
            .await;
        if let Ok(tasks) = tasks {
            if tasks.iter().all(|t| client::client::is_terminal(t.state)) {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            rec.record(EventKind::HarnessError {
                what: "tasks still unfinished after 180 s (see final reads)".into(),
            });
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let worker_files = std::mem::take(&mut workers.files);
    drop(workers);

    // Final reads once every member applied the same index.
    let c = cluster.lock().await;
    let mut applied = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        applied.clear();
        for m in &members {
            if let Ok(s) = c.node_status(*m, false).await {
                applied.insert(*m, s.applied_index);
            }
        }
        let same = applied.len() == members.len()
            && applied.values().all(|a| Some(a) == applied.values().next());
        if same || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for m in &members {
        let Some(addr) = c.addr(*m) else { continue };
        let Ok(ch) = channel(addr, Duration::from_secs(30)) else { continue };
        let mut client = TasksClient::new(ch);
        let mut token = 0;
        loop {
            let req = pb::ListTasksRequest {
                limit: 1000,
                page_token: token,
                stale_ok: true,
                ..Default::default()
            };
            let Ok(page) = client.list_tasks(req).await else {
                rec.record(EventKind::HarnessError {
                    what: format!("final read of node {m} failed"),
                });
                break;
            };
            let page = page.into_inner();
            for t in &page.tasks {
                let key =
                    t.spec.as_ref().map(|s| s.idempotency_key.clone()).filter(|k| !k.is_empty());
                let state = proto::convert::state_name(t.state).to_string();
                let fence = (state == "succeeded").then_some(t.fence);
                rec.record(EventKind::FinalTask { node: *m, id: t.id, key, state, fence });
            }
            if page.next_page_token == 0 {
                break;
            }
            token = page.next_page_token;
        }
        match c.node_status(*m, true).await {
            Ok(s) => rec.record(EventKind::Digest {
                node: *m,
                applied_index: s.applied_index,
                digest: s.digest,
            }),
            Err(e) => {
                rec.record(EventKind::HarnessError { what: format!("digest of node {m}: {e}") })
            }
        }
    }
    drop(c);
    stop.store(true, Ordering::Relaxed);
    let _ = audit.await;
    let _ = poller.await;

    let mut files = vec![main_history];
    // A worker that never got to create its file has nothing to contribute.
    files.extend(worker_files.into_iter().filter(|p| p.is_file()));
    let history = read_histories(&files)?;
    let expect = Expectations {
        min_leader_changes: cfg.leader_kills,
        min_stale_rejections: usize::from(cfg.worker_pauses > 0),
        fault_kinds: plan
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(String::from)
            .collect(),
        cancels: true,
        deps: true,
        priorities: true,
        ..Default::default()
    };
    let report = checker::check(&history, &expect);
    std::fs::write(cfg.dir.join("report.txt"), report.to_string())?;
    if let Ok(json) = serde_json::to_string_pretty(&report) {
        std::fs::write(cfg.dir.join("results.json"), json)?;
    }
    Ok(Outcome { report, dir: cfg.dir.clone() })
}
