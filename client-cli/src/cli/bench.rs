//! `schedctl bench`: the numbers users care about, measured against a 3-node cluster of real
//! `schedulerd` processes on loopback that the command starts itself (or, for the scenarios
//! that need no process control, an existing cluster with `--external`).
//!
//! Scenarios (all bounded in count and time):
//! * `submit`: sequential single submits (latency), N in flight (throughput), batched
//!   submits (throughput);
//! * `e2e`: no-op tasks submitted, run by in-process workers and completed (tasks/s from the
//!   first submit to the last completion);
//! * `chain`: a chain of dependent tasks (latency of each step);
//! * `dag`: a layered DAG, two parents per task (tasks/s);
//! * `failover`: leader SIGKILL, time until the next accepted write (and restart);
//! * `recovery`: memory per queued task, and restart of a node holding all of them until it
//!   serves.
//!
//! Numbers are printed (a table, or one JSON document with `-o json`); nothing is asserted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use client::backoff::BackoffConfig;
use client::local::{find_schedulerd, LocalCluster, LocalClusterOptions};
use client::worker::{Outcome, Worker, WorkerConfig};
use client::{pb, Client, ClientConfig};
use futures::StreamExt;
use serde_json::{json, Value};

use super::output::outln;
use super::{Ctx, Format};

/// Which measurement to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Submit latency and throughput (sequential, concurrent, batched).
    Submit,
    /// No-op tasks end to end: submit, run, complete.
    E2e,
    /// A chain of dependent tasks: per-step latency.
    Chain,
    /// A layered DAG: tasks per second.
    Dag,
    /// Leader SIGKILL: time until writes are accepted again.
    Failover,
    /// Memory per queued task and restart time of a node holding them.
    Recovery,
    /// Every scenario above, in order.
    All,
}

/// The scenarios `all` runs, in order.
const EVERY: [Scenario; 6] = [
    Scenario::Submit,
    Scenario::E2e,
    Scenario::Chain,
    Scenario::Dag,
    Scenario::Failover,
    Scenario::Recovery,
];

/// Options of `schedctl bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Measure the cluster at --endpoints instead of starting one (submit, e2e, chain, dag).
    #[arg(long)]
    pub external: bool,
    /// Run the local cluster with TLS and tokens (a development CA, every call authenticated)
    /// to measure what the trust boundary costs.
    #[arg(long)]
    pub secure: bool,
    /// Where the local cluster keeps its data and logs (default: a fresh temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Sequential submits measured.
    #[arg(long, default_value_t = 2_000)]
    pub sequential: usize,
    /// Submits in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Tasks submitted by the concurrent submitters.
    #[arg(long, default_value_t = 50_000)]
    pub concurrent_tasks: usize,
    /// Tasks per batched submit.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Tasks submitted in batches (and run in `e2e`).
    #[arg(long, default_value_t = 100_000)]
    pub tasks: usize,
    /// Workers for e2e, chain and dag (in this process).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 256)]
    pub slots: u32,
    /// Length of the chain.
    #[arg(long, default_value_t = 500)]
    pub chain: usize,
    /// DAG layers.
    #[arg(long, default_value_t = 200)]
    pub layers: usize,
    /// DAG tasks per layer.
    #[arg(long, default_value_t = 100)]
    pub width: usize,
    /// Leader kills in `failover`.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Tasks held by the node restarted in `recovery`.
    #[arg(long, default_value_t = 1_000_000)]
    pub recovery_tasks: usize,
    /// Give up on one scenario after this long.
    #[arg(long, default_value = "600s", value_parser = super::parse_duration)]
    pub limit: Duration,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

fn latency_summary(mut ms: Vec<f64>) -> Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    json!({
        "count": ms.len(),
        "p50_ms": round3(percentile(&ms, 50.0)),
        "p99_ms": round3(percentile(&ms, 99.0)),
        "max_ms": round3(ms.last().copied().unwrap_or(0.0)),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn run_id() -> String {
    format!("bench-{:x}", rand::random::<u32>())
}

/// A client tuned for measurement: short retry steps, so client backoff does not hide or
/// inflate server behaviour. `base` carries the credentials (CA, token).
fn bench_client(base: &ClientConfig, endpoints: &[String], budget: Duration) -> Result<Client> {
    Ok(Client::with_config(ClientConfig {
        endpoints: endpoints.to_vec(),
        call_timeout: Duration::from_secs(10),
        retry_budget: budget,
        backoff: BackoffConfig {
            initial: Duration::from_millis(5),
            max: Duration::from_millis(20),
        },
        ..base.clone()
    })?)
}

fn spec(key: String) -> pb::TaskSpec {
    pb::TaskSpec {
        name: "noop".into(),
        idempotency_key: key,
        retry: Some(pb::RetryPolicy { max_attempts: 10, ..Default::default() }),
        ..Default::default()
    }
}

/// The cluster a scenario runs against.
struct Target {
    endpoints: Vec<String>,
    local: Option<LocalCluster>,
    /// Credentials every client of the run uses (CA, token); none for a plain cluster.
    credentials: ClientConfig,
}

impl Target {
    fn client(&self, budget: Duration) -> Result<Client> {
        bench_client(&self.credentials, &self.endpoints, budget)
    }
}

async fn start_cluster(args: &BenchArgs, name: &str, extra: &[String]) -> Result<Target> {
    let exe = std::env::current_exe().ok();
    let bin = find_schedulerd(exe.as_deref()).context(
        "cannot find schedulerd: build it (`cargo build --release -p node`), put it on PATH or set SCHEDULERD_BIN",
    )?;
    // Without --dir, the harness keeps data and logs in a temporary directory of its own.
    let mut opts = LocalClusterOptions::new(bin, 3).args(extra.iter().cloned());
    if args.secure {
        opts = opts.secure([]);
    }
    if let Some(d) = &args.dir {
        let dir = d.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        opts = opts.dir(dir);
    }
    let local = LocalCluster::start(opts).await?;
    let endpoints = local.endpoints();
    let credentials = match local.security() {
        Some(s) => s.client_config(&endpoints, Some("admin")),
        None => ClientConfig::default(),
    };
    Ok(Target { endpoints, local: Some(local), credentials })
}

async fn target(ctx: &Ctx, args: &BenchArgs, name: &str) -> Result<Target> {
    if args.external {
        return Ok(Target {
            endpoints: ctx.config.endpoints.clone(),
            local: None,
            credentials: ctx.config.clone(),
        });
    }
    start_cluster(args, name, &[]).await
}

/// Start in-process no-op workers; returns their handles.
fn start_workers(
    t: &Target,
    n: usize,
    slots: u32,
    tag: &str,
) -> Result<Vec<client::worker::WorkerHandle>> {
    let mut out = Vec::new();
    for i in 0..n {
        let client = Client::with_config(ClientConfig {
            endpoints: t.endpoints.clone(),
            ..t.credentials.clone()
        })?;
        let mut cfg = WorkerConfig::new(format!("{tag}-worker-{i}"));
        cfg.slots = slots;
        let w = Worker::new(client, cfg, |_job, _stop| async { Outcome::Succeeded(Vec::new()) });
        out.push(w.start());
    }
    Ok(out)
}

fn stop_workers(workers: Vec<client::worker::WorkerHandle>) {
    for w in workers {
        w.abort();
    }
}

/// Submit `specs` in batches of `batch`, `inflight` at a time. Returns the ids in order.
async fn submit_batched(
    client: &Client,
    specs: Vec<pb::TaskSpec>,
    batch: usize,
    inflight: usize,
) -> Result<Vec<u64>> {
    let chunks: Vec<Vec<pb::TaskSpec>> = specs.chunks(batch.max(1)).map(|c| c.to_vec()).collect();
    let mut ids = vec![Vec::new(); chunks.len()];
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight.max(1)));
    let mut js = tokio::task::JoinSet::new();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let client = client.clone();
        js.spawn(async move {
            let _p = permit;
            let r = client.submit_tasks(pb::SubmitTasksRequest { tasks: chunk }).await;
            (i, r)
        });
    }
    while let Some(r) = js.join_next().await {
        let (i, r) = r?;
        ids[i] = r?.tasks.into_iter().map(|t| t.id).collect();
    }
    Ok(ids.into_iter().flatten().collect())
}

async fn bench_submit(ctx: &Ctx, args: &BenchArgs) -> Result<Value> {
    let t = target(ctx, args, "submit").await?;
    let client = t.client(Duration::from_secs(30))?;
    let run = run_id();
    // Warm up the connections and the leader hint.
    client.submit(spec(format!("{run}-warm"))).await?;

    let mut lat = Vec::with_capacity(args.sequential);
    for i in 0..args.sequential {
        let start = Instant::now();
        client.submit(spec(format!("{run}-s{i}"))).await?;
        lat.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let sequential = latency_summary(lat);

    let next = Arc::new(AtomicU64::new(0));
    let total = args.concurrent_tasks as u64;
    let start = Instant::now();
    let mut js = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, next, run) = (client.clone(), next.clone(), run.clone());
        js.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), client::Error>(());
                }
                client.submit(spec(format!("{run}-c{i}"))).await?;
            }
        });
    }
    while let Some(r) = js.join_next().await {
        r??;
    }
    let conc_secs = start.elapsed().as_secs_f64();

    let specs: Vec<pb::TaskSpec> = (0..args.tasks).map(|i| spec(format!("{run}-b{i}"))).collect();
    let start = Instant::now();
    submit_batched(&client, specs, args.batch, 4).await?;
    let batch_secs = start.elapsed().as_secs_f64();

    Ok(json!({
        "sequential": sequential,
        "concurrent": {
            "in_flight": args.concurrency,
            "tasks": total,
            "seconds": round3(conc_secs),
            "tasks_per_s": (total as f64 / conc_secs).round(),
        },
        "batched": {
            "batch_size": args.batch,
            "batches_in_flight": 4,
            "tasks": args.tasks,
            "seconds": round3(batch_secs),
            "tasks_per_s": (args.tasks as f64 / batch_secs).round(),
        },
    }))
}

/// Waits until every task of `ids` succeeded (watching the event stream from `from`);
/// returns the wall-clock instant at which each success was seen.
async fn wait_succeeded(
    client: &Client,
    from: u64,
    ids: &std::collections::HashSet<u64>,
    limit: Duration,
) -> Result<HashMap<u64, Instant>> {
    let mut stream = client.watch_events(from).await?;
    let mut done = HashMap::new();
    let deadline = Instant::now() + limit;
    while done.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(next) = tokio::time::timeout(left, stream.next()).await else {
            bail!("only {} of {} tasks finished within {limit:?}", done.len(), ids.len());
        };
        let Some(batch) = next else { bail!("the event stream ended") };
        let batch = batch?;
        let now = Instant::now();
        for e in batch.events {
            if e.state == pb::TaskState::Succeeded as i32 && ids.contains(&e.task) {
                done.entry(e.task).or_insert(now);
            } else if (e.state == pb::TaskState::Failed as i32
                || e.state == pb::TaskState::UpstreamFailed as i32)
                && ids.contains(&e.task)
            {
                bail!("task {} failed", e.task);
            }
        }
    }
    Ok(done)
}

/// The applied index now (where an event watch starts to see what follows).
async fn current_index(client: &Client) -> Result<u64> {
    let s = client.cluster_status().await?;
    Ok(s.nodes.iter().map(|n| n.applied_index).max().unwrap_or(0))
}

async fn bench_e2e(ctx: &Ctx, args: &BenchArgs) -> Result<Value> {
    let t = target(ctx, args, "e2e").await?;
    let client = t.client(Duration::from_secs(30))?;
    let run = run_id();
    let workers = start_workers(&t, args.workers, args.slots, &run)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = current_index(&client).await? + 1;
    let specs: Vec<pb::TaskSpec> = (0..args.tasks).map(|i| spec(format!("{run}-e{i}"))).collect();
    let start = Instant::now();
    let ids: std::collections::HashSet<u64> =
        submit_batched(&client, specs, args.batch, 4).await?.into_iter().collect();
    let submitted = start.elapsed().as_secs_f64();
    let done = wait_succeeded(&client, from, &ids, args.limit).await?;
    let last = done.values().max().copied().unwrap_or_else(Instant::now);
    let secs = last.duration_since(start).as_secs_f64();
    stop_workers(workers);
    Ok(json!({
        "tasks": ids.len(),
        "workers": args.workers,
        "slots_per_worker": args.slots,
        "submit_seconds": round3(submitted),
        "seconds": round3(secs),
        "tasks_per_s": (ids.len() as f64 / secs).round(),
    }))
}

async fn bench_chain(ctx: &Ctx, args: &BenchArgs) -> Result<Value> {
    let t = target(ctx, args, "chain").await?;
    let client = t.client(Duration::from_secs(30))?;
    let run = run_id();
    let workers = start_workers(&t, args.workers.min(2), args.slots, &run)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = current_index(&client).await? + 1;
    let n = args.chain.min(10_000);
    let specs: Vec<pb::TaskSpec> = (0..n)
        .map(|i| {
            let mut s = spec(format!("{run}-ch{i}"));
            if i > 0 {
                s.depends_on_batch = vec![i as u32 - 1];
            }
            s
        })
        .collect();
    let start = Instant::now();
    let ids = submit_batched(&client, specs, n, 1).await?;
    let set: std::collections::HashSet<u64> = ids.iter().copied().collect();
    let done = wait_succeeded(&client, from, &set, args.limit).await?;
    let secs = start.elapsed().as_secs_f64();
    let steps: Vec<f64> = ids
        .windows(2)
        .map(|w| done[&w[1]].saturating_duration_since(done[&w[0]]).as_secs_f64() * 1e3)
        .collect();
    stop_workers(workers);
    Ok(json!({
        "length": n,
        "seconds": round3(secs),
        "step": latency_summary(steps),
    }))
}

async fn bench_dag(ctx: &Ctx, args: &BenchArgs) -> Result<Value> {
    let t = target(ctx, args, "dag").await?;
    let client = t.client(Duration::from_secs(30))?;
    let run = run_id();
    let workers = start_workers(&t, args.workers, args.slots, &run)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = current_index(&client).await? + 1;
    let mut all = std::collections::HashSet::new();
    let mut previous: Vec<u64> = Vec::new();
    let start = Instant::now();
    for layer in 0..args.layers {
        let specs: Vec<pb::TaskSpec> = (0..args.width)
            .map(|i| {
                let mut s = spec(format!("{run}-d{layer}-{i}"));
                if !previous.is_empty() {
                    let a = previous[i % previous.len()];
                    let b = previous[(i * 7 + 3) % previous.len()];
                    s.depends_on = if a == b { vec![a] } else { vec![a, b] };
                }
                s
            })
            .collect();
        let ids = submit_batched(&client, specs, args.width, 1).await?;
        all.extend(ids.iter().copied());
        previous = ids;
    }
    let submitted = start.elapsed().as_secs_f64();
    let done = wait_succeeded(&client, from, &all, args.limit).await?;
    let last = done.values().max().copied().unwrap_or_else(Instant::now);
    let secs = last.duration_since(start).as_secs_f64();
    stop_workers(workers);
    Ok(json!({
        "layers": args.layers,
        "width": args.width,
        "tasks": all.len(),
        "submit_seconds": round3(submitted),
        "seconds": round3(secs),
        "tasks_per_s": (all.len() as f64 / secs).round(),
    }))
}

async fn bench_failover(args: &BenchArgs) -> Result<Value> {
    let mut t = start_cluster(args, "failover", &[]).await?;
    let endpoints = t.endpoints.clone();
    let client = bench_client(&t.credentials, &endpoints, Duration::from_secs(30))?
        .with_call_timeout(Duration::from_millis(250));
    let run = run_id();
    let mut gaps = Vec::new();
    let mut seq = 0u64;
    for round in 0..args.kills {
        let local = t.local.as_mut().expect("own cluster");
        let leader = local.wait_leader(Duration::from_secs(30)).await?;
        // Steady state: writes succeed.
        client.submit(spec(format!("{run}-f{round}-warm"))).await?;
        local.kill(leader);
        let killed = Instant::now();
        // The first write sent after the kill that is accepted.
        loop {
            seq += 1;
            if client.submit(spec(format!("{run}-f{round}-{seq}"))).await.is_ok() {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no write accepted within 30 s after killing the leader");
            }
        }
        gaps.push(killed.elapsed().as_secs_f64() * 1e3);
        local.start_node(leader)?;
        // Let it catch up before the next round.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    Ok(json!({
        "kills": args.kills,
        "until_next_write": latency_summary(gaps),
    }))
}

async fn bench_recovery(args: &BenchArgs) -> Result<Value> {
    let mut t = start_cluster(args, "recovery", &[]).await?;
    let local = t.local.as_mut().expect("own cluster");
    let leader = local.wait_leader(Duration::from_secs(30)).await?;
    let follower = (leader + 1) % local.nodes.len();
    let endpoints = local.endpoints();
    let client = bench_client(&t.credentials, &endpoints, Duration::from_secs(60))?;
    client.submit(spec(format!("{}-warm", run_id()))).await?;
    let rss_before = local.nodes[leader].rss_bytes().unwrap_or(0);
    let run = run_id();
    let n = args.recovery_tasks;
    let start = Instant::now();
    let mut submitted = 0;
    while submitted < n {
        let k = (n - submitted).min(100_000);
        let specs: Vec<pb::TaskSpec> =
            (submitted..submitted + k).map(|i| spec(format!("{run}-r{i}"))).collect();
        submit_batched(&client, specs, 10_000, 2).await?;
        submitted += k;
    }
    let load_secs = start.elapsed().as_secs_f64();
    // Let sled and the allocator settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = local.nodes[leader].rss_bytes().unwrap_or(0);

    // Restart a follower holding every task: a crash, then the time until it answers a
    // linearizable read (having loaded its state and caught up).
    let applied = current_index(&client).await?;
    local.kill(follower);
    let restarted = Instant::now();
    local.start_node(follower)?;
    let addr = local.nodes[follower].addr.clone();
    let single = Client::new([addr])?
        .with_retry_budget(Duration::ZERO)
        .with_call_timeout(Duration::from_secs(2));
    let mut serving_ms = None;
    while restarted.elapsed() < args.limit {
        if let Ok(s) = single.cluster_status().await {
            let me = s.nodes.iter().find(|x| x.id == local.nodes[follower].id);
            if serving_ms.is_none() {
                serving_ms = Some(restarted.elapsed().as_secs_f64() * 1e3);
            }
            if me.is_some_and(|m| m.applied_index >= applied) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let caught_up_ms = restarted.elapsed().as_secs_f64() * 1e3;
    let rss_restarted = local.nodes[follower].rss_bytes().unwrap_or(0);
    Ok(json!({
        "tasks": n,
        "load_seconds": round3(load_secs),
        "load_tasks_per_s": (n as f64 / load_secs).round(),
        "leader_rss_before_mib": rss_before / (1 << 20),
        "leader_rss_after_mib": rss_after / (1 << 20),
        "rss_bytes_per_queued_task": ((rss_after.saturating_sub(rss_before)) as f64 / n as f64).round(),
        "restart_until_serving_ms": serving_ms.map(round3),
        "restart_until_caught_up_ms": round3(caught_up_ms),
        "restarted_node_rss_mib": rss_restarted / (1 << 20),
    }))
}

fn print_table(name: &str, v: &Value) {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&p, x, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut rows = Vec::new();
    walk("", v, &mut rows);
    outln!("{name}");
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        outln!("  {k:w$}  {v}");
    }
}

/// Runs `schedctl bench`.
pub async fn run(ctx: &Ctx, args: BenchArgs) -> Result<u8> {
    let scenarios: Vec<Scenario> = match args.scenario {
        Scenario::All => EVERY.to_vec(),
        s => vec![s],
    };
    if args.external
        && scenarios.iter().any(|s| matches!(s, Scenario::Failover | Scenario::Recovery))
    {
        bail!(super::UsageError("failover and recovery kill and restart nodes: they need their own cluster (drop --external)".into()));
    }
    let mut results = serde_json::Map::new();
    for s in scenarios {
        let name = format!("{s:?}").to_lowercase();
        eprintln!("running {name}...");
        let fut = async {
            match s {
                Scenario::Submit => bench_submit(ctx, &args).await,
                Scenario::E2e => bench_e2e(ctx, &args).await,
                Scenario::Chain => bench_chain(ctx, &args).await,
                Scenario::Dag => bench_dag(ctx, &args).await,
                Scenario::Failover => bench_failover(&args).await,
                Scenario::Recovery => bench_recovery(&args).await,
                Scenario::All => bail!("`all` is expanded into the scenarios before running"),
            }
        };
        let v = tokio::time::timeout(args.limit + Duration::from_secs(60), fut)
            .await
            .with_context(|| format!("{name} did not finish within {:?}", args.limit))??;
        if ctx.format == Format::Table {
            print_table(&name, &v);
        }
        results.insert(name, v);
    }
    if ctx.format == Format::Json {
        super::output::print_json(&Value::Object(results));
    }
    Ok(0)
}
