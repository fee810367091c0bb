//! `schedctl task ...` and `schedctl workflow submit`.
//!
//! Submits always carry an idempotency key (`--key`, or a random one chosen before the first
//! attempt), and the key is printed, so a submit whose outcome is unknown can be repeated
//! with `--key` without creating a second task. `--wait` and `task watch` follow the task to a
//! terminal state and exit 1 unless it succeeded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use client::client::is_terminal;
use client::error::EXIT_FAILED;
use client::pb;
use client::quantity::{parse_cpu_milli, parse_mem_mib};
use client::workflow::{multiplier_permille, retry_policy, Workflow};
use futures::StreamExt;
use proto::convert::state_name;
use serde_json::json;

use super::output::{self, out, outln, print_json, Format};
use super::{parse_duration, parse_key_count, parse_key_value, Ctx, UsageError};

/// Task commands.
#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Submit a task.
    Submit(SubmitArgs),
    /// Show one task (state, attempts, result).
    Get {
        /// Task id.
        id: u64,
    },
    /// List tasks, newest first (--oldest-first for submit order).
    List(ListArgs),
    /// Cancel tasks; dependents that can no longer run become upstream_failed.
    Cancel {
        /// Task ids.
        #[arg(required = true)]
        ids: Vec<u64>,
        /// Why (recorded on the task).
        #[arg(long, default_value = "cancelled with schedctl")]
        reason: String,
    },
    /// Run a failed, cancelled or upstream-failed task again as a new attempt (same id; its
    /// retry policy starts over). Refused for a task that is not finished or succeeded.
    Retry {
        /// Task id.
        id: u64,
        /// Also re-run its failed and upstream-failed dependents (they wait for it again).
        #[arg(long)]
        with_dependents: bool,
    },
    /// Follow a task until it ends; exits 1 unless it succeeded.
    Watch {
        /// Task id.
        id: u64,
    },
    /// Explain why a task is where it is (waiting on, blocked by, backoff, holder).
    Explain {
        /// Task id.
        id: u64,
    },
}

/// `task submit` options.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Task name (handler / kind).
    #[arg(long)]
    pub name: String,
    /// Payload text (a shell script for `schedctl dev up` workers).
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from a file ("-" for standard input).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// Priority: higher runs first; FIFO within a priority.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Run only after these tasks succeeded.
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub after: Vec<u64>,
    /// Queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// CPU needed: cores (2, 0.5) or millicores (500m).
    #[arg(long, default_value = "0", value_parser = parse_cpu_milli, value_name = "CPU")]
    pub cpu: u64,
    /// Memory needed: MiB (512) or with a unit (2GiB, 512Mi, 1G).
    #[arg(long, default_value = "0", value_parser = parse_mem_mib, value_name = "SIZE")]
    pub mem: u64,
    /// A named resource needed (repeatable), e.g. gpu=1.
    #[arg(long = "resource", value_parser = parse_key_count, value_name = "NAME=N")]
    pub resources: Vec<(String, u64)>,
    /// A worker label required (repeatable), e.g. zone=eu.
    #[arg(long = "label", value_parser = parse_key_value, value_name = "K=V")]
    pub labels: Vec<(String, String)>,
    /// Free-form metadata (repeatable), passed to the worker (a shell task sees
    /// SCHED_META_<K>).
    #[arg(long = "meta", value_parser = parse_key_value, value_name = "K=V")]
    pub metadata: Vec<(String, String)>,
    /// Attempts allowed in total (default: the server's, 3).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    #[command(flatten)]
    pub backoff: BackoffArgs,
    /// Per-attempt time limit, e.g. 30s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Do not run before this delay has passed, e.g. 10s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub delay: Option<Duration>,
    /// Idempotency key: submitting again with the same key returns the same task.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Wait until the task ends; exit 1 unless it succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// Retry backoff flags (unset = the server's default: 1s, doubling, capped at 1m).
#[derive(Debug, Args, Default)]
pub struct BackoffArgs {
    /// Delay before the first retry, e.g. 1s (0s retries at once).
    #[arg(long = "backoff", value_parser = parse_duration, value_name = "DURATION")]
    pub initial: Option<Duration>,
    /// Longest delay between retries, e.g. 5m.
    #[arg(long = "backoff-max", value_parser = parse_duration, value_name = "DURATION")]
    pub max: Option<Duration>,
    /// Growth of the delay per retry, e.g. 2 (doubling); between 1 and 10.
    #[arg(long = "backoff-multiplier", value_parser = multiplier_permille, value_name = "X")]
    pub multiplier: Option<u32>,
}

/// `task list` options.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tasks in these states (waiting, queued, delayed, assigned, running, succeeded,
    /// failed, cancelled, upstream_failed).
    #[arg(long = "state", value_delimiter = ',', value_parser = parse_state, value_name = "STATE,...")]
    pub states: Vec<pb::TaskState>,
    /// Only tasks of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only tasks with this name.
    #[arg(long)]
    pub name: Option<String>,
    /// At most this many tasks.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Continue a previous listing (the token its hint or `next_page_token` gave).
    #[arg(long, value_name = "TOKEN")]
    pub page_token: Option<u64>,
    /// Only tasks submitted within this long, e.g. 10m.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub since: Option<Duration>,
    /// Oldest first (submit order) instead of newest first.
    #[arg(long)]
    pub oldest_first: bool,
}

/// Workflow commands.
#[derive(Debug, Subcommand)]
pub enum WorkflowCmd {
    /// Submit a JSON or YAML DAG of named tasks atomically (all or nothing).
    ///
    /// The file is a list of tasks (or `{key_prefix, tasks}`); each task has a unique `name`,
    /// `after: [names]`, and any field of `task submit` (payload, payload_file, priority,
    /// queue, cpu, mem, resources, labels, metadata, max_attempts, timeout, delay, key).
    Submit {
        /// The workflow file (.json, .yaml, .yml).
        file: PathBuf,
        /// Idempotency keys become PREFIX/NAME: submitting the same file again with the
        /// same prefix returns the existing tasks.
        #[arg(long, value_name = "PREFIX")]
        key_prefix: Option<String>,
        /// Wait until every task ended; exit 1 unless all succeeded.
        #[arg(long)]
        wait: bool,
    },
}

/// How to repeat a submit safely: attached to a failed submit, and used by the error report
/// only when the outcome is unknown (a rejection is final; repeating it cannot help).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryWith {
    /// `task submit --key KEY`.
    Key(String),
    /// `workflow submit --key-prefix PREFIX`.
    KeyPrefix(String),
}

impl RetryWith {
    /// The flag to add to the same command.
    pub fn flag(&self) -> String {
        match self {
            RetryWith::Key(k) => format!("--key {k}"),
            RetryWith::KeyPrefix(p) => format!("--key-prefix {p}"),
        }
    }
}

impl std::fmt::Display for RetryWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RetryWith::Key(k) => write!(f, "submitting with idempotency key {k}"),
            RetryWith::KeyPrefix(p) => write!(f, "submitting the workflow with key prefix {p}"),
        }
    }
}

/// Parses a state name (`running`, `upstream_failed`, also `TASK_STATE_RUNNING`).
pub fn parse_state(s: &str) -> Result<pb::TaskState, String> {
    let norm = s.trim().to_ascii_lowercase().replace('-', "_");
    let norm = norm.strip_prefix("task_state_").unwrap_or(&norm);
    (1..=9)
        .filter_map(|v| pb::TaskState::try_from(v).ok())
        .find(|st| state_name(*st as i32) == norm)
        .ok_or_else(|| {
            format!(
                "{s:?} is not a state (waiting, queued, delayed, assigned, running, succeeded, \
                 failed, cancelled, upstream_failed)"
            )
        })
}

/// Runs a task command.
pub async fn run(ctx: &Ctx, cmd: TaskCmd) -> Result<u8> {
    match cmd {
        TaskCmd::Submit(a) => submit(ctx, a).await,
        TaskCmd::Get { id } => {
            let t = ctx.client()?.get_task(id).await?;
            match ctx.format {
                Format::Json => print_json(&output::task_json(&t)),
                Format::Table => out!("{}", output::task_text(&t)),
            }
            Ok(0)
        }
        TaskCmd::List(a) => list(ctx, a).await,
        TaskCmd::Cancel { ids, reason } => cancel(ctx, ids, reason).await,
        TaskCmd::Retry { id, with_dependents } => {
            let r = ctx.client()?.retry_task(id, with_dependents).await?;
            match ctx.format {
                Format::Json => {
                    let tasks: Vec<_> = r
                        .tasks
                        .iter()
                        .map(|t| json!({ "id": t.id, "state": state_name(t.state) }))
                        .collect();
                    print_json(&json!({ "id": id, "retried": tasks, "log_index": r.log_index }));
                }
                Format::Table => {
                    for t in &r.tasks {
                        outln!("task {} retried: {}", t.id, state_name(t.state));
                    }
                }
            }
            Ok(0)
        }
        TaskCmd::Watch { id } => watch(ctx, id).await,
        TaskCmd::Explain { id } => {
            let e = ctx.client()?.explain_task(id).await?;
            match ctx.format {
                Format::Json => print_json(&output::explain_json(&e)),
                Format::Table => out!("{}", output::explain_text(&e)),
            }
            Ok(0)
        }
    }
}

/// Builds the spec of `task submit` (the key is filled in here, before any attempt).
pub fn spec_from_args(a: &SubmitArgs) -> Result<pb::TaskSpec> {
    let payload = match (&a.payload, &a.payload_file) {
        (Some(p), _) => p.as_bytes().to_vec(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context("reading the payload from standard input")?;
            buf
        }
        (None, Some(f)) => std::fs::read(f)
            .map_err(|e| UsageError(format!("cannot read --payload-file {}: {e}", f.display())))?,
        (None, None) => Vec::new(),
    };
    Ok(pb::TaskSpec {
        name: a.name.clone(),
        payload,
        queue: a.queue.clone().unwrap_or_default(),
        priority: a.priority,
        depends_on: a.after.clone(),
        depends_on_batch: Vec::new(),
        resources: Some(pb::Resources {
            cpu_milli: a.cpu,
            memory_mib: a.mem,
            named: a.resources.iter().cloned().collect(),
        }),
        labels: a.labels.iter().cloned().collect(),
        retry: retry_policy(
            a.max_attempts,
            a.backoff.initial.map(|d| d.as_millis() as u64),
            a.backoff.max.map(|d| d.as_millis() as u64),
            a.backoff.multiplier,
        ),
        timeout_ms: a.timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
        not_before_ms: 0,
        delay_ms: a.delay.map(|d| d.as_millis() as u64).unwrap_or(0),
        metadata: a.metadata.iter().cloned().collect::<HashMap<_, _>>(),
        idempotency_key: a.key.clone().unwrap_or_else(client::client::new_idempotency_key),
    })
}

async fn submit(ctx: &Ctx, a: SubmitArgs) -> Result<u8> {
    let spec = spec_from_args(&a)?;
    let key = spec.idempotency_key.clone();
    let client = ctx.client()?;
    let resp = client
        .submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec] })
        .await
        .map_err(|e| anyhow::Error::new(e).context(RetryWith::Key(key.clone())))?;
    let s = resp.tasks.first().cloned().unwrap_or_default();
    if !a.wait {
        match ctx.format {
            Format::Json => print_json(&output::submitted_json(&resp, &[key], None)),
            Format::Table => {
                if s.created {
                    outln!("submitted task {} ({})", s.id, state_name(s.state));
                } else {
                    outln!("task {} already exists for key {key} ({})", s.id, state_name(s.state));
                }
            }
        }
        return Ok(0);
    }
    if ctx.format == Format::Table {
        outln!("submitted task {} ({}); waiting for it to end", s.id, state_name(s.state));
    }
    let t = follow(&client, s.id, ctx.format == Format::Table).await?;
    finish_watch(ctx, &t.0, &t.1)
}

/// Watches a task to its end; returns the final task and the observed updates.
async fn follow(
    client: &client::Client,
    id: u64,
    print_updates: bool,
) -> Result<(pb::Task, Vec<serde_json::Value>)> {
    let mut stream = client.watch_task(id).await?;
    let mut updates = Vec::new();
    let mut last: Option<pb::Task> = None;
    while let Some(item) = stream.next().await {
        let t = item?;
        let changed = last
            .as_ref()
            .is_none_or(|l| l.state != t.state || l.attempt != t.attempt || l.worker != t.worker);
        if changed {
            if print_updates {
                let mut line = format!(
                    "{}  task {} {}",
                    output::time(t.updated_at_ms),
                    t.id,
                    state_name(t.state)
                );
                if t.attempt > 0 {
                    line.push_str(&format!(" (attempt {}", t.attempt));
                    if !t.worker.is_empty() {
                        line.push_str(&format!(" on {}", t.worker));
                    }
                    line.push(')');
                }
                outln!("{line}");
            }
            updates.push(json!({
                "state": state_name(t.state),
                "attempt": t.attempt,
                "worker": t.worker,
                "fence": t.fence,
                "updated_at_ms": t.updated_at_ms,
            }));
        }
        let done = is_terminal(t.state);
        last = Some(t);
        if done {
            break;
        }
    }
    let Some(t) = last.filter(|t| is_terminal(t.state)) else {
        anyhow::bail!("the watch of task {id} ended before the task did");
    };
    // The stream may omit the result; read the complete record.
    let full = client.get_task(id).await.unwrap_or(t);
    Ok((full, updates))
}

fn finish_watch(ctx: &Ctx, t: &pb::Task, updates: &[serde_json::Value]) -> Result<u8> {
    let ok = t.state == pb::TaskState::Succeeded as i32;
    match ctx.format {
        Format::Json => {
            let mut v = output::task_json(t);
            v["updates"] = json!(updates);
            print_json(&v);
        }
        Format::Table => {
            if !t.result.is_empty() {
                outln!("result:\n{}", output::text(&t.result, 64 << 10));
            }
            if let Some(f) = t.last_failure.as_ref().filter(|_| !ok) {
                outln!("last failure (attempt {}, {}): {}", f.attempt, f.kind, f.message);
            }
            if !t.cancel_reason.is_empty() {
                outln!("cancelled: {}", t.cancel_reason);
            }
            if t.upstream != 0 {
                outln!("dependency {} did not succeed", t.upstream);
            }
        }
    }
    Ok(if ok { 0 } else { EXIT_FAILED })
}

async fn watch(ctx: &Ctx, id: u64) -> Result<u8> {
    let client = ctx.client()?;
    let (t, updates) = follow(&client, id, ctx.format == Format::Table).await?;
    finish_watch(ctx, &t, &updates)
}

async fn list(ctx: &Ctx, a: ListArgs) -> Result<u8> {
    let since_ms = match a.since {
        Some(d) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.saturating_sub(d).as_millis() as u64
        }
        None => 0,
    };
    let req = pb::ListTasksRequest {
        states: a.states.iter().map(|s| *s as i32).collect(),
        queue: a.queue.unwrap_or_default(),
        name: a.name.unwrap_or_default(),
        page_token: a.page_token.unwrap_or(0),
        limit: 0,
        stale_ok: false,
        include_payload: false,
        newest_first: !a.oldest_first,
        created_since_ms: since_ms,
    };
    let page = ctx.client()?.list_tasks_upto(req, a.limit).await?;
    match ctx.format {
        Format::Json => {
            let v: Vec<_> = page.tasks.iter().map(output::task_json).collect();
            print_json(&json!({
                "tasks": v,
                "next_page_token": page.next_page_token,
                "remaining": page.remaining,
                "remaining_is_lower_bound": page.remaining_is_lower_bound,
            }));
        }
        Format::Table => {
            if page.tasks.is_empty() {
                outln!("no tasks");
            } else {
                out!("{}", output::task_table(&page.tasks));
            }
            if page.next_page_token != 0 {
                // On stderr, so that the table on stdout stays whole for pipes.
                eprintln!("{}", more_hint(&page));
            }
        }
    }
    Ok(0)
}

/// "N more, use --page-token X" under a listing that stopped at its limit.
fn more_hint(page: &pb::ListTasksResponse) -> String {
    let count = match (page.remaining, page.remaining_is_lower_bound) {
        (0, true) => "more tasks may match".to_string(),
        (n, true) => format!("at least {n} more"),
        (n, false) => format!("{n} more"),
    };
    format!("{count}: use --page-token {} (same filters) to continue", page.next_page_token)
}

async fn cancel(ctx: &Ctx, ids: Vec<u64>, reason: String) -> Result<u8> {
    let resp = ctx.client()?.cancel_tasks(pb::CancelTasksRequest { ids, reason }).await?;
    let all_ok = resp.results.iter().all(|r| r.ok);
    match ctx.format {
        Format::Json => {
            let v: Vec<_> = resp
                .results
                .iter()
                .map(|r| {
                    json!({
                        "id": r.id,
                        "ok": r.ok,
                        "already_cancelled": r.already_cancelled,
                        "upstream_failed": r.upstream_failed,
                        "error": r.error,
                    })
                })
                .collect();
            print_json(&json!({ "results": v }));
        }
        Format::Table => {
            for r in &resp.results {
                if !r.ok {
                    outln!("task {}: not cancelled: {}", r.id, r.error);
                    continue;
                }
                let mut line = if r.already_cancelled {
                    format!("task {} was already cancelled", r.id)
                } else {
                    format!("task {} cancelled", r.id)
                };
                if !r.upstream_failed.is_empty() {
                    let ids: Vec<String> = r.upstream_failed.iter().map(u64::to_string).collect();
                    line.push_str(&format!("; dependents that will not run: {}", ids.join(",")));
                }
                outln!("{line}");
            }
        }
    }
    Ok(if all_ok { 0 } else { EXIT_FAILED })
}

/// Runs `workflow submit`.
pub async fn run_workflow(ctx: &Ctx, cmd: WorkflowCmd) -> Result<u8> {
    let WorkflowCmd::Submit { file, key_prefix, wait } = cmd;
    let mut wf = Workflow::load(&file)?;
    if key_prefix.is_some() {
        wf.key_prefix = key_prefix;
    }
    // Without a prefix, pick one now: a submit whose outcome is unknown can then be repeated
    // with it (the error says how) without creating the workflow twice.
    let prefix = wf.key_prefix.get_or_insert_with(client::client::new_idempotency_key).clone();
    let prepared = wf.to_request()?;
    let keys: Vec<String> =
        prepared.request.tasks.iter().map(|t| t.idempotency_key.clone()).collect();
    let client = ctx.client()?;
    let resp = client
        .submit_tasks(prepared.request)
        .await
        .map_err(|e| anyhow::Error::new(e).context(RetryWith::KeyPrefix(prefix)))?;
    if !wait {
        match ctx.format {
            Format::Json => {
                print_json(&output::submitted_json(&resp, &keys, Some(&prepared.names)))
            }
            Format::Table => {
                let mut t = output::Table::new(vec!["NAME", "ID", "STATE", "NEW"]);
                for (name, s) in prepared.names.iter().zip(&resp.tasks) {
                    t.row(vec![
                        name.clone(),
                        s.id.to_string(),
                        state_name(s.state).to_string(),
                        if s.created { "yes".into() } else { "no (existing key)".into() },
                    ]);
                }
                out!("{}", t.render());
            }
        }
        return Ok(0);
    }
    let mut finals = Vec::new();
    for s in &resp.tasks {
        finals.push(client.wait_task(s.id).await?);
    }
    let all_ok = finals.iter().all(|t| t.state == pb::TaskState::Succeeded as i32);
    match ctx.format {
        Format::Json => {
            let tasks: Vec<_> = prepared
                .names
                .iter()
                .zip(&finals)
                .map(|(n, t)| {
                    let mut v = output::task_json(t);
                    v["workflow_name"] = json!(n);
                    v
                })
                .collect();
            print_json(&json!({ "tasks": tasks }));
        }
        Format::Table => {
            let mut t = output::Table::new(vec!["NAME", "ID", "STATE", "ATTEMPT", "FINISHED"]);
            for (name, task) in prepared.names.iter().zip(&finals) {
                t.row(vec![
                    name.clone(),
                    task.id.to_string(),
                    state_name(task.state).to_string(),
                    task.attempt.to_string(),
                    output::time(task.finished_at_ms),
                ]);
            }
            out!("{}", t.render());
        }
    }
    Ok(if all_ok { 0 } else { EXIT_FAILED })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::*;

    fn submit_args(args: &[&str]) -> SubmitArgs {
        let mut v = vec!["schedctl", "task", "submit"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Task(TaskCmd::Submit(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn submit_flags_map_to_the_spec() {
        let a = submit_args(&[
            "--name",
            "build",
            "--payload",
            "make",
            "--priority",
            "-3",
            "--after",
            "4,5",
            "--queue",
            "q",
            "--cpu",
            "1.5",
            "--mem",
            "256Mi",
            "--resource",
            "gpu=1",
            "--label",
            "zone=eu",
            "--max-attempts",
            "5",
            "--timeout",
            "30s",
            "--delay",
            "1m",
            "--key",
            "k1",
            "--meta",
            "owner=me",
        ]);
        let s = spec_from_args(&a).unwrap();
        assert_eq!(s.name, "build");
        assert_eq!(s.payload, b"make");
        assert_eq!(s.priority, -3);
        assert_eq!(s.depends_on, vec![4, 5]);
        assert_eq!(s.queue, "q");
        let r = s.resources.unwrap();
        assert_eq!((r.cpu_milli, r.memory_mib, r.named["gpu"]), (1500, 256, 1));
        assert_eq!(s.labels["zone"], "eu");
        assert_eq!(s.metadata["owner"], "me");
        let retry = s.retry.unwrap();
        assert_eq!(retry.max_attempts, 5);
        assert_eq!(
            (retry.initial_backoff_ms, retry.multiplier_permille, retry.max_backoff_ms),
            (None, None, None),
            "--max-attempts alone leaves the backoff at the server's default"
        );
        assert_eq!(s.timeout_ms, 30_000);
        assert_eq!(s.delay_ms, 60_000);
        assert_eq!(s.idempotency_key, "k1");
        assert!(!a.wait);
    }

    #[test]
    fn backoff_flags_set_the_policy() {
        let a = submit_args(&[
            "--name",
            "x",
            "--backoff",
            "2s",
            "--backoff-max",
            "5m",
            "--backoff-multiplier",
            "3",
            "--cpu",
            "250m",
            "--mem",
            "2GiB",
        ]);
        let s = spec_from_args(&a).unwrap();
        let r = s.retry.unwrap();
        assert_eq!(r.max_attempts, 0, "the server's default count");
        assert_eq!(r.initial_backoff_ms, Some(2_000));
        assert_eq!(r.max_backoff_ms, Some(300_000));
        assert_eq!(r.multiplier_permille, Some(3_000));
        let res = s.resources.unwrap();
        assert_eq!((res.cpu_milli, res.memory_mib), (250, 2048));
        let bad = |args: &[&str]| {
            let mut v = vec!["schedctl", "task", "submit", "--name", "x"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v).unwrap_err().to_string()
        };
        assert!(bad(&["--cpu", "1500"]).contains("1500m"));
        assert!(bad(&["--mem", "2 parsecs"]).contains("memory size"));
        assert!(bad(&["--backoff-multiplier", "0.5"]).contains("1..10"));
    }

    #[test]
    fn submit_without_key_gets_a_fresh_one_and_no_retry_policy() {
        let a = submit_args(&["--name", "x"]);
        let s1 = spec_from_args(&a).unwrap();
        let s2 = spec_from_args(&a).unwrap();
        assert_eq!(s1.idempotency_key.len(), 32);
        assert_ne!(s1.idempotency_key, s2.idempotency_key);
        assert!(s1.retry.is_none(), "the server's default policy applies");
        assert_eq!(s1.queue, "", "the server fills in the default queue");
    }

    #[test]
    fn payload_file_is_read_and_a_missing_one_is_a_usage_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p");
        std::fs::write(&f, "from file").unwrap();
        let a = submit_args(&["--name", "x", "--payload-file", f.to_str().unwrap()]);
        assert_eq!(spec_from_args(&a).unwrap().payload, b"from file");
        let missing = dir.path().join("missing");
        let a = submit_args(&["--name", "x", "--payload-file", missing.to_str().unwrap()]);
        let e = spec_from_args(&a).unwrap_err();
        assert!(e.downcast_ref::<UsageError>().is_some(), "{e}");
    }

    #[test]
    fn states_parse_in_every_spelling() {
        assert_eq!(parse_state("running"), Ok(pb::TaskState::Running));
        assert_eq!(parse_state("UPSTREAM-FAILED"), Ok(pb::TaskState::UpstreamFailed));
        assert_eq!(parse_state("TASK_STATE_QUEUED"), Ok(pb::TaskState::Queued));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("done").is_err());
    }
}
