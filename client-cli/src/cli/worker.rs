//! `schedctl worker ...`: run a shell worker, list workers, drain, undrain or remove one.
//!
//! `worker run` is the library's [`client::worker::Worker`] with a
//! [`client::exec::ShellHandler`]. The first SIGINT/SIGTERM drains (no new work, finish what
//! is held within `--drain-grace`, deregister, exit 0); a second one stops the running tasks
//! at once.

use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use client::exec::ShellHandler;
use client::pb;
use client::quantity::{parse_cpu_milli, parse_mem_mib};
use client::worker::{default_worker_id, Worker, WorkerConfig};
use tokio::signal::unix::{signal, SignalKind};

use super::output::{self, out, outln, print_json, Format};
use super::{parse_duration, parse_key_count, parse_key_value, Ctx};

/// Worker commands.
#[derive(Debug, Subcommand)]
pub enum WorkerCmd {
    /// Run a worker that executes each task with `sh -c COMMAND`.
    ///
    /// The command sees SCHED_TASK_ID, SCHED_ATTEMPT, SCHED_FENCE, SCHED_TASK_NAME and
    /// SCHED_PAYLOAD (the payload is also on its standard input). Exit 0 succeeds with the
    /// standard output as the result; anything else fails with the end of standard error.
    Run(RunArgs),
    /// List workers with their status, load and held tasks.
    List,
    /// Stop assigning new tasks to a worker; what it runs may finish.
    Drain {
        /// Worker id.
        id: String,
    },
    /// Give a drained worker new tasks again.
    Undrain {
        /// Worker id.
        id: String,
    },
    /// Delete a dead worker's record (refused while it is alive or draining: stop it, or
    /// let its heartbeats expire, first). Admin role.
    Remove {
        /// Worker id.
        id: String,
    },
}

/// `worker run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The shell command run for every task, e.g. 'sh -c "$SCHED_PAYLOAD"'.
    #[arg(long, value_name = "COMMAND")]
    pub exec: String,
    /// Queue to take tasks from (repeatable).
    #[arg(long = "queue", default_value = "default", value_name = "QUEUE")]
    pub queues: Vec<String>,
    /// Tasks run at the same time (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
    /// CPU offered: cores (2, 0.5) or millicores (500m) (default: one core per CPU).
    #[arg(long, value_parser = parse_cpu_milli, value_name = "CPU")]
    pub cpu: Option<u64>,
    /// Memory offered: MiB (512) or with a unit (2GiB, 512Mi, 1G) (default: the machine's).
    #[arg(long, value_parser = parse_mem_mib, value_name = "SIZE")]
    pub mem: Option<u64>,
    /// A named resource offered (repeatable), e.g. gpu=2.
    #[arg(long = "resource", value_parser = parse_key_count, value_name = "NAME=N")]
    pub resources: Vec<(String, u64)>,
    /// A label offered to tasks that require it (repeatable), e.g. zone=eu.
    #[arg(long = "label", value_parser = parse_key_value, value_name = "K=V")]
    pub labels: Vec<(String, String)>,
    /// Worker id (default: HOSTNAME-PID). Restarting with the same id takes over, and
    /// requeues, what the previous process held.
    #[arg(long)]
    pub id: Option<String>,
    /// On shutdown, how long running tasks may take to finish.
    #[arg(long, default_value = super::defaults::DRAIN_GRACE.as_str(), value_parser = parse_duration, value_name = "DURATION")]
    pub drain_grace: Duration,
    /// When a task is stopped, time between SIGTERM and SIGKILL.
    #[arg(long, default_value = super::defaults::KILL_GRACE.as_str(), value_parser = parse_duration, value_name = "DURATION")]
    pub kill_grace: Duration,
}

fn cpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

fn memory_mib() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) =
        unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || size <= 0 {
        return 0;
    }
    (pages as u64).saturating_mul(size as u64) >> 20
}

/// The worker configuration of `worker run`.
pub fn config_from_args(a: &RunArgs) -> WorkerConfig {
    let mut c = WorkerConfig::new(a.id.clone().unwrap_or_else(default_worker_id));
    c.queues = a.queues.clone();
    c.slots = a.slots.unwrap_or_else(cpus);
    c.capacity = pb::Resources {
        cpu_milli: a.cpu.unwrap_or(u64::from(cpus()) * 1000),
        memory_mib: a.mem.unwrap_or_else(memory_mib),
        named: a.resources.iter().cloned().collect(),
    };
    c.labels = a.labels.iter().cloned().collect();
    c.drain_grace = a.drain_grace;
    c.stop_grace = a.kill_grace + Duration::from_secs(5);
    c
}

/// Runs a worker command.
pub async fn run(ctx: &Ctx, cmd: WorkerCmd) -> Result<u8> {
    match cmd {
        WorkerCmd::Run(a) => run_worker(ctx, a).await,
        WorkerCmd::List => {
            let w = ctx.client()?.list_workers(false).await?;
            match ctx.format {
                Format::Json => print_json(&output::workers_json(&w)),
                Format::Table if w.workers.is_empty() => outln!("no workers"),
                Format::Table => out!("{}", output::workers_text(&w)),
            }
            Ok(0)
        }
        WorkerCmd::Drain { id } => {
            ctx.client()?.drain_worker(&id).await?;
            match ctx.format {
                Format::Json => print_json(&serde_json::json!({ "id": id, "draining": true })),
                Format::Table => outln!("worker {id} is draining: it gets no new tasks"),
            }
            Ok(0)
        }
        WorkerCmd::Undrain { id } => {
            ctx.client()?.undrain_worker(&id).await?;
            match ctx.format {
                Format::Json => print_json(&serde_json::json!({ "id": id, "draining": false })),
                Format::Table => outln!("worker {id} takes new tasks again"),
            }
            Ok(0)
        }
        WorkerCmd::Remove { id } => {
            ctx.client()?.remove_worker(&id).await?;
            match ctx.format {
                Format::Json => print_json(&serde_json::json!({ "id": id, "removed": true })),
                Format::Table => outln!("worker {id} removed"),
            }
            Ok(0)
        }
    }
}

async fn run_worker(ctx: &Ctx, a: RunArgs) -> Result<u8> {
    let config = config_from_args(&a);
    let handler = ShellHandler::new(a.exec.clone()).kill_grace(a.kill_grace);
    tracing::info!(
        worker_id = %config.id,
        queues = ?config.queues,
        slots = config.slots,
        endpoints = %ctx.config.endpoints.join(","),
        "starting worker"
    );
    let handle = Worker::new(ctx.client()?, config, handler).start();
    let control = handle.controller();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let signals = tokio::spawn(async move {
        let mut count = 0;
        // Bounded: after the second signal there is nothing more to escalate to.
        while count < 2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            count += 1;
            if count == 1 {
                tracing::info!(
                    "shutting down: finishing running tasks (signal again to stop them now)"
                );
                control.shutdown();
            } else {
                tracing::info!("stopping running tasks now");
                control.stop_now();
            }
        }
    });
    let result = handle.wait().await;
    signals.abort();
    let stats = result?;
    tracing::info!(
        executed = stats.executed,
        succeeded = stats.succeeded,
        failed = stats.failed,
        stopped = stats.stopped,
        "worker stopped"
    );
    if ctx.format == Format::Json {
        print_json(&serde_json::json!({
            "executed": stats.executed,
            "succeeded": stats.succeeded,
            "failed": stats.failed,
            "stopped": stats.stopped,
            "rejected": stats.rejected,
            "sessions": stats.sessions,
        }));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let mut v = vec!["schedctl", "worker", "run"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Worker(WorkerCmd::Run(a)) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn run_flags_map_to_the_worker_config() {
        let a = run_args(&[
            "--exec",
            "true",
            "--queue",
            "a",
            "--queue",
            "b",
            "--slots",
            "3",
            "--cpu",
            "500m",
            "--mem",
            "64",
            "--label",
            "zone=eu",
            "--resource",
            "gpu=2",
            "--id",
            "w-1",
        ]);
        let c = config_from_args(&a);
        assert_eq!(c.id, "w-1");
        assert_eq!(c.queues, vec!["a", "b"]);
        assert_eq!(c.slots, 3);
        assert_eq!((c.capacity.cpu_milli, c.capacity.memory_mib), (500, 64));
        assert_eq!(c.capacity.named["gpu"], 2);
        assert_eq!(c.labels["zone"], "eu");
    }

    #[test]
    fn run_defaults_describe_this_machine() {
        let c = config_from_args(&run_args(&["--exec", "true"]));
        assert_eq!(c.queues, vec!["default"]);
        assert!(c.slots >= 1);
        assert_eq!(c.capacity.cpu_milli, u64::from(c.slots) * 1000);
        assert!(c.capacity.memory_mib > 0);
        assert!(c.id.ends_with(&format!("-{}", std::process::id())));
        assert_eq!(c.drain_grace, Duration::from_secs(30));
        // The flags' defaults are the library's.
        assert_eq!(c.drain_grace, client::worker::DEFAULT_DRAIN_GRACE);
        assert_eq!(run_args(&["--exec", "true"]).kill_grace, client::exec::DEFAULT_KILL_GRACE);
    }
}
