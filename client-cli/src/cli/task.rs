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
use client::workflow::Workflow;
use futures::StreamExt;
use proto::convert::state_name;
use serde_json::json;

use super::output::{self, print_json, Format};
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
    /// List tasks in id order (oldest first).
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
    /// CPU needed, in millicores.
    #[arg(long, default_value_t = 0, value_name = "MILLI")]
    pub cpu: u64,
    /// Memory needed, in MiB.
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    pub mem: u64,
    /// A named resource needed (repeatable), e.g. gpu=1.
    #[arg(long = "resource", value_parser = parse_key_count, value_name = "NAME=N")]
    pub resources: Vec<(String, u64)>,
    /// A worker label required (repeatable), e.g. zone=eu.
    #[arg(long = "label", value_parser = parse_key_value, value_name = "K=V")]
    pub labels: Vec<(String, String)>,
    /// Free-form metadata (repeatable), passed to the worker.
    #[arg(long = "meta", value_parser = parse_key_value, value_name = "K=V")]
    pub metadata: Vec<(String, String)>,
    /// Attempts allowed in total (default: the server's, 3).
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
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
                Format::Table => print!("{}", output::task_text(&t)),
            }
            Ok(0)
        }
        TaskCmd::List(a) => list(ctx, a).await,
        TaskCmd::Cancel { ids, reason } => cancel(ctx, ids, reason).await,
        TaskCmd::Watch { id } => watch(ctx, id).await,
        TaskCmd::Explain { id } => {
            let e = ctx.client()?.explain_task(id).await?;
            match ctx.format {
                Format::Json => print_json(&output::explain_json(&e)),
                Format::Table => print!("{}", output::explain_text(&e)),
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
        retry: a.max_attempts.map(|n| pb::RetryPolicy { max_attempts: n, ..Default::default() }),
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
    let resp =
        client.submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec] }).await.with_context(
            || format!("submitting with idempotency key {key} (repeat with --key {key})"),
        )?;
    let s = resp.tasks.first().cloned().unwrap_or_default();
    if !a.wait {
        match ctx.format {
            Format::Json => print_json(&output::submitted_json(&resp, &[key], None)),
            Format::Table => {
                if s.created {
                    println!("submitted task {} ({})", s.id, state_name(s.state));
                } else {
                    println!(
                        "task {} already exists for key {key} ({})",
                        s.id,
                        state_name(s.state)
                    );
                }
            }
        }
        return Ok(0);
    }
    if ctx.format == Format::Table {
        println!("submitted task {} ({}); waiting for it to end", s.id, state_name(s.state));
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
                println!("{line}");
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
                println!("result:\n{}", output::text(&t.result, 64 << 10));
            }
            if let Some(f) = t.last_failure.as_ref().filter(|_| !ok) {
                println!("last failure (attempt {}, {}): {}", f.attempt, f.kind, f.message);
            }
            if !t.cancel_reason.is_empty() {
                println!("cancelled: {}", t.cancel_reason);
            }
            if t.upstream != 0 {
                println!("dependency {} did not succeed", t.upstream);
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
    let req = pb::ListTasksRequest {
        states: a.states.iter().map(|s| *s as i32).collect(),
        queue: a.queue.unwrap_or_default(),
        name: a.name.unwrap_or_default(),
        page_token: 0,
        limit: 0,
        stale_ok: false,
        include_payload: false,
    };
    let tasks = ctx.client()?.list_all_tasks(req, a.limit).await?;
    match ctx.format {
        Format::Json => {
            let v: Vec<_> = tasks.iter().map(output::task_json).collect();
            print_json(&json!({ "tasks": v }));
        }
        Format::Table => {
            if tasks.is_empty() {
                println!("no tasks");
            } else {
                print!("{}", output::task_table(&tasks));
            }
        }
    }
    Ok(0)
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
                    println!("task {}: not cancelled: {}", r.id, r.error);
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
                println!("{line}");
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
    let prepared = wf.to_request()?;
    let keys: Vec<String> =
        prepared.request.tasks.iter().map(|t| t.idempotency_key.clone()).collect();
    let client = ctx.client()?;
    let resp = client.submit_tasks(prepared.request).await.context(
        "submitting the workflow (if the outcome is unknown, submit again with --key-prefix to \
         make the retry idempotent)",
    )?;
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
                print!("{}", t.render());
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
            print!("{}", t.render());
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
            "1500",
            "--mem",
            "256",
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
        assert_eq!(s.retry.unwrap().max_attempts, 5);
        assert_eq!(s.timeout_ms, 30_000);
        assert_eq!(s.delay_ms, 60_000);
        assert_eq!(s.idempotency_key, "k1");
        assert!(!a.wait);
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
