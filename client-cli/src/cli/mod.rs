//! The `schedctl` command tree (DESIGN §7) and its dispatch.
//!
//! * [`Cli`]: global options and the subcommands, with clap derive; `--help` comes from these
//!   doc comments.
//! * [`run`]: runs one command and returns the process exit code. Handlers return
//!   `anyhow::Result<u8>`: `Ok(0)` success, `Ok(1)` an operation that ran but did not succeed
//!   (a watched task failed, a cancel was refused); errors are mapped by [`report_error`]
//!   (a [`client::Error`] to its own exit code and an actionable message, anything else to 1).
//! * Output goes through [`output`]: tables for people, exactly one JSON document per command
//!   with `-o json` (errors too: `{"error": {...}}` on stdout, the message on stderr).

mod bench;
mod cluster;
mod dev;
mod docs;
mod output;
mod queue;
mod snapshot;
mod task;
mod token;
mod worker;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use client::error::{EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE};
use client::{Client, ClientConfig};

pub use output::Format;

/// Operate a raftsched cluster: submit and inspect tasks, run workers, manage members,
/// start a local development cluster.
#[derive(Debug, Parser)]
#[command(name = "schedctl", version, propagate_version = true, max_term_width = 100)]
#[command(after_help = "Exit codes: 0 ok, 1 the operation failed (rejected, not found, task \
failed), 2 usage error, 3 cluster unavailable.")]
pub struct Cli {
    /// Node addresses (host:port, comma-separated). Any node will do: the leader is found
    /// automatically.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SCHED_ENDPOINTS",
        default_value = client::client::DEFAULT_ENDPOINT,
        value_delimiter = ',',
        value_name = "HOST:PORT,..."
    )]
    pub endpoints: Vec<String>,

    /// Output format: human-readable tables, or one JSON document.
    #[arg(short = 'o', long = "output", global = true, help_heading = "Global options", value_enum, default_value_t = Format::Table)]
    pub output: Format,

    /// Deadline of one RPC attempt.
    #[arg(long, global = true, help_heading = "Global options", default_value = defaults::RPC_TIMEOUT.as_str(), value_parser = parse_duration, value_name = "DURATION")]
    pub rpc_timeout: Duration,

    /// How long to keep retrying while the cluster is unreachable or electing a leader.
    #[arg(long, global = true, help_heading = "Global options", default_value = defaults::RETRY_BUDGET.as_str(), value_parser = parse_duration, value_name = "DURATION")]
    pub retry_budget: Duration,

    /// The cluster's CA certificate (PEM): connect with TLS and verify the nodes against it
    /// (needed when the cluster runs with --tls-cert).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SCHED_CA_CERT",
        value_name = "FILE"
    )]
    pub ca_cert: Option<std::path::PathBuf>,

    /// Secret of a token, sent as `authorization: Bearer <secret>` (needed when the cluster
    /// runs with --auth-tokens). Prefer SCHED_TOKEN: a flag shows in the process list.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "SCHED_TOKEN",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub token: Option<String>,

    /// More logging on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, help_heading = "Global options", action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The command groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
    /// Submit, inspect, cancel and watch tasks.
    #[command(subcommand)]
    Task(task::TaskCmd),
    /// Submit a DAG of tasks from a JSON or YAML file.
    #[command(subcommand)]
    Workflow(task::WorkflowCmd),
    /// Run a worker; list, drain, undrain and remove workers.
    #[command(subcommand)]
    Worker(worker::WorkerCmd),
    /// Pause, resume and list queues.
    #[command(subcommand)]
    Queue(queue::QueueCmd),
    /// Local development cluster.
    #[command(subcommand)]
    Dev(dev::DevCmd),
    /// Make credentials for clusters started with --auth-tokens.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Measure submit latency and throughput, end-to-end throughput, dependency latency,
    /// failover and recovery on a local 3-node cluster (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Back up the cluster's state to a file, and inspect such a file.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(docs::CompletionArgs),
    /// Write man pages for schedctl and every subcommand into a directory.
    Man(docs::ManArgs),
}

/// Settings every command shares.
pub struct Ctx {
    /// Output format.
    pub format: Format,
    /// Client settings built from the global options.
    pub config: ClientConfig,
    /// The command changes the cluster: an unknown outcome is worth a warning.
    pub writes: bool,
}

impl Ctx {
    /// A client with the global settings.
    pub fn client(&self) -> Result<Client, client::Error> {
        Client::with_config(self.config.clone())
    }
}

/// Flag defaults rendered once from the library's own defaults, so that `--help` and the
/// behaviour of a program using the library directly cannot disagree.
pub(crate) mod defaults {
    use std::sync::LazyLock;
    use std::time::Duration;

    fn flag(d: Duration) -> String {
        humantime::format_duration(d).to_string()
    }

    /// `--rpc-timeout`.
    pub static RPC_TIMEOUT: LazyLock<String> =
        LazyLock::new(|| flag(client::client::DEFAULT_CALL_TIMEOUT));
    /// `--retry-budget`.
    pub static RETRY_BUDGET: LazyLock<String> =
        LazyLock::new(|| flag(client::client::DEFAULT_RETRY_BUDGET));
    /// `worker run --drain-grace`.
    pub static DRAIN_GRACE: LazyLock<String> =
        LazyLock::new(|| flag(client::worker::DEFAULT_DRAIN_GRACE));
    /// `worker run --kill-grace`.
    pub static KILL_GRACE: LazyLock<String> =
        LazyLock::new(|| flag(client::exec::DEFAULT_KILL_GRACE));
}

/// Parses `30s`, `1m30s`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s or 5m: {e}"))
}

/// Parses `KEY=VALUE`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Parses `KEY=NUMBER`.
pub fn parse_key_count(s: &str) -> Result<(String, u64), String> {
    let (k, v) = parse_key_value(s)?;
    let n = v.trim().parse().map_err(|_| format!("{s:?}: {v:?} is not a whole number"))?;
    Ok((k, n))
}

/// Sets up logging on stderr: warnings by default, info for long-running commands.
pub fn init_tracing(cli: &Cli) {
    let long_running =
        matches!(cli.command, Command::Worker(worker::WorkerCmd::Run(_)) | Command::Dev(_));
    let base = match (cli.verbose, long_running) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{base},h2=warn,tower=warn,hyper=warn"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Runs the command; returns the exit code.
pub async fn run(cli: Cli) -> u8 {
    let endpoints: Vec<String> =
        cli.endpoints.iter().flat_map(|e| client::client::parse_endpoints(e)).collect();
    let writes = match &cli.command {
        Command::Cluster(c) => !matches!(c, cluster::ClusterCmd::Status),
        Command::Task(t) => matches!(
            t,
            task::TaskCmd::Submit(_) | task::TaskCmd::Cancel { .. } | task::TaskCmd::Retry { .. }
        ),
        Command::Queue(q) => !matches!(q, queue::QueueCmd::List),
        Command::Workflow(_) => true,
        Command::Snapshot(_) => false,
        Command::Worker(w) => matches!(
            w,
            worker::WorkerCmd::Drain { .. }
                | worker::WorkerCmd::Undrain { .. }
                | worker::WorkerCmd::Remove { .. }
        ),
        Command::Dev(_)
        | Command::Bench(_)
        | Command::Token(_)
        | Command::Completion(_)
        | Command::Man(_) => false,
    };
    // One-shot commands fail at once when no node accepts a connection; a worker or a dev
    // cluster waits for nodes that are (re)starting.
    let one_shot = !matches!(
        &cli.command,
        Command::Worker(worker::WorkerCmd::Run(_)) | Command::Dev(_) | Command::Bench(_)
    );
    let ctx = Ctx {
        writes,
        format: cli.output,
        config: ClientConfig {
            endpoints,
            call_timeout: cli.rpc_timeout,
            retry_budget: cli.retry_budget,
            fail_fast_when_refused: one_shot,
            token: cli.token.clone(),
            ca_cert: cli.ca_cert.clone(),
            ..Default::default()
        },
    };
    let result = match cli.command {
        Command::Cluster(c) => cluster::run(&ctx, c).await,
        Command::Task(c) => task::run(&ctx, c).await,
        Command::Workflow(c) => task::run_workflow(&ctx, c).await,
        Command::Worker(c) => worker::run(&ctx, c).await,
        Command::Queue(c) => queue::run(&ctx, c).await,
        Command::Token(c) => token::run(&ctx, c).await,
        Command::Dev(c) => dev::run(&ctx, c).await,
        Command::Bench(c) => bench::run(&ctx, c).await,
        Command::Snapshot(c) => snapshot::run(&ctx, c).await,
        Command::Completion(c) => docs::completion(&c),
        Command::Man(c) => docs::man(&c),
    };
    match result {
        Ok(code) => code,
        Err(e) => report_error(&ctx, &e),
    }
}

/// Prints an error the way the user needs it and returns its exit code.
fn report_error(ctx: &Ctx, e: &anyhow::Error) -> u8 {
    let (code, text, json) = describe(ctx, e);
    if ctx.format == Format::Json {
        output::print_json(&serde_json::json!({ "error": json }));
    }
    eprintln!("error: {text}");
    code
}

/// The exit code, the message for people, and the JSON error object.
fn describe(ctx: &Ctx, e: &anyhow::Error) -> (u8, String, serde_json::Value) {
    let context: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    let Some(ce) = e.chain().find_map(|c| c.downcast_ref::<client::Error>()) else {
        let code = if e.chain().any(|c| c.downcast_ref::<UsageError>().is_some()) {
            EXIT_USAGE
        } else {
            EXIT_FAILED
        };
        let text = context.join(": ");
        return (code, text.clone(), serde_json::json!({ "message": text }));
    };
    let code = ce.exit_code();
    let endpoints = ctx.config.endpoints.join(",");
    let mut text = context.join(": ");
    if code == EXIT_UNAVAILABLE {
        let answered = matches!(
            ce,
            client::Error::Exhausted { last, .. } if matches!(**last, client::Error::Status { .. })
        ) || matches!(ce, client::Error::Status { .. });
        text = if answered {
            format!(
                "the cluster at {endpoints} has no leader ({}) — a new leader may still be being \
                 elected (retry), or the cluster is not initialised yet (`schedctl cluster init \
                 --member 1=HOST:PORT ...`)",
                ce.message()
            )
        } else {
            format!(
                "no node reachable at {endpoints} ({}) — start a cluster with `schedctl dev up` \
                 or pass --endpoints / SCHED_ENDPOINTS",
                innermost_message(ce)
            )
        };
    }
    let retry_with = e.downcast_ref::<task::RetryWith>();
    if ctx.writes && ce.is_indeterminate() {
        text.push_str(&match retry_with {
            Some(r) => format!(
                "\nthe outcome is unknown: the request may have been applied; repeating it is \
                 safe with the same key: run the same command with {}",
                r.flag()
            ),
            None => "\nthe outcome is unknown: the request may have been applied; repeating the \
                     same command is safe"
                .to_string(),
        });
    }
    let json = serde_json::json!({
        "code": client::error::code_name(ce.code()),
        "reason": ce.reason().map(|r| r.as_str().to_string()),
        "message": ce.message(),
        "unknown_outcome": ctx.writes && ce.is_indeterminate(),
        "retry_with": retry_with.filter(|_| ctx.writes && ce.is_indeterminate()).map(|r| r.flag()),
        "exit_code": code,
    });
    (code, text, json)
}

fn innermost_message(e: &client::Error) -> String {
    match e {
        client::Error::Exhausted { last, .. } => innermost_message(last),
        client::Error::Transport { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// A mistake in how the command was called that clap could not catch (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut v = vec!["schedctl"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
    }

    #[test]
    fn the_command_tree_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn globals_and_defaults() {
        let cli = parse(&["task", "get", "5"]).unwrap();
        assert_eq!(cli.endpoints, vec!["127.0.0.1:7001"]);
        assert_eq!(cli.output, Format::Table);
        assert_eq!(cli.rpc_timeout, Duration::from_secs(10));
        assert_eq!(cli.rpc_timeout, client::client::DEFAULT_CALL_TIMEOUT);
        assert_eq!(cli.retry_budget, client::client::DEFAULT_RETRY_BUDGET);
        let cli = parse(&["--endpoints", "a:1,b:2", "task", "get", "5", "-o", "json"]).unwrap();
        assert_eq!(cli.endpoints, vec!["a:1", "b:2"]);
        assert_eq!(cli.output, Format::Json);
    }

    #[test]
    fn usage_errors_are_clap_errors() {
        for bad in [
            vec!["task", "get"],
            vec!["task", "get", "abc"],
            vec!["task", "submit"],
            vec!["task", "submit", "--name", "x", "--payload", "a", "--payload-file", "f"],
            vec!["task", "submit", "--name", "x", "--timeout", "soon"],
            vec!["task", "submit", "--name", "x", "--label", "novalue"],
            vec!["task", "submit", "--name", "x", "--resource", "gpu=many"],
            vec!["cluster", "init"],
            vec!["cluster", "init", "--member", "1"],
            vec!["worker", "run"],
            vec!["-o", "yaml", "task", "list"],
            vec!["bench"],
        ] {
            let e = parse(&bad).expect_err(&format!("{bad:?} should not parse"));
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn every_documented_command_parses() {
        for ok in [
            vec!["cluster", "init", "--member", "1=127.0.0.1:7001", "--member", "2=127.0.0.1:7002"],
            vec!["cluster", "status"],
            vec!["cluster", "add-learner", "--id", "4", "--addr", "127.0.0.1:7004"],
            vec!["cluster", "promote", "--id", "4"],
            vec!["cluster", "remove", "--id", "4"],
            vec!["cluster", "transfer-leader", "--to", "2"],
            vec!["cluster", "snapshot"],
            vec!["task", "submit", "--name", "n", "--payload", "echo hi", "--wait"],
            vec!["task", "get", "1"],
            vec!["task", "list", "--state", "queued,running", "--queue", "q", "--limit", "5"],
            vec!["task", "cancel", "1"],
            vec!["task", "retry", "1"],
            vec!["task", "retry", "1", "--with-dependents"],
            vec!["task", "watch", "1"],
            vec!["task", "explain", "1"],
            vec!["workflow", "submit", "wf.yaml"],
            vec!["worker", "run", "--exec", "sh -c \"$SCHED_PAYLOAD\""],
            vec!["worker", "list"],
            vec!["worker", "drain", "w1"],
            vec!["worker", "undrain", "w1"],
            vec!["worker", "remove", "w1"],
            vec!["queue", "pause", "q"],
            vec!["queue", "resume", "q"],
            vec!["queue", "list"],
            vec!["dev", "up"],
            vec![
                "dev",
                "up",
                "--nodes",
                "5",
                "--workers",
                "0",
                "--dir",
                "d",
                "--base-port",
                "9001",
            ],
        ] {
            parse(&ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
    }

    #[test]
    fn key_values_parse() {
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), "".into())));
        assert!(parse_key_value("=b").is_err());
        assert_eq!(parse_key_count("gpu=2"), Ok(("gpu".into(), 2)));
        assert!(parse_key_count("gpu=-1").is_err());
    }

    fn ctx() -> Ctx {
        Ctx {
            format: Format::Table,
            config: ClientConfig {
                endpoints: vec!["127.0.0.1:7001".into()],
                ..ClientConfig::default()
            },
            writes: true,
        }
    }

    #[test]
    fn errors_map_to_exit_codes_and_advice() {
        let refused = client::Error::Exhausted {
            attempts: 3,
            elapsed: Duration::from_secs(1),
            maybe_applied: false,
            endpoints: vec!["127.0.0.1:7001".into()],
            last: Box::new(client::Error::Transport {
                endpoint: "127.0.0.1:7001".into(),
                message: "Connection refused".into(),
                maybe_sent: false,
            }),
        };
        let (code, text, json) = describe(&ctx(), &anyhow::Error::new(refused));
        assert_eq!(code, 3);
        assert!(text.contains("no node reachable at 127.0.0.1:7001"), "{text}");
        assert!(text.contains("schedctl dev up"), "{text}");
        assert_eq!(json["unknown_outcome"], false);

        let not_found = client::Error::Status {
            code: tonic::Code::NotFound,
            message: "task 9 not found".into(),
            reason: Some(client::Reason::NotFound),
            leader: None,
            endpoint: "127.0.0.1:7001".into(),
        };
        let (code, _, json) = describe(&ctx(), &anyhow::Error::new(not_found));
        assert_eq!(code, 1);
        assert_eq!(json["code"], "NOT_FOUND");
        assert_eq!(json["reason"], "not_found");

        let (code, _, _) = describe(&ctx(), &anyhow::Error::new(UsageError("bad".into())));
        assert_eq!(code, 2);
        let (code, _, _) = describe(&ctx(), &anyhow::anyhow!("something else"));
        assert_eq!(code, 1);
    }
}
