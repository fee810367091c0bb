//! Configuration of a node: flags > `SCHED_*` environment variables > TOML file > defaults.
//!
//! Every default lives in [`Config::default`]; `node/schedulerd.example.toml` documents every
//! key. Durations are written like `5s`, `150ms` or `24h`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use state_machine::Limits;

/// Command-line flags. Each also reads a `SCHED_*` environment variable.
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "schedulerd",
    version,
    about = "raftsched scheduler node: serves the scheduler.v1 gRPC API and takes part in the Raft cluster"
)]
pub struct Args {
    /// Node id: a positive integer, unique in the cluster.
    #[arg(long, env = "SCHED_ID")]
    pub id: Option<u64>,
    /// Address the gRPC server binds (public API and node-to-node traffic).
    #[arg(long, env = "SCHED_LISTEN", help = with_default(
        "Address the gRPC server binds (public API and node-to-node traffic)",
        |d| d.listen.to_string(),
    ))]
    pub listen: Option<SocketAddr>,
    /// Address other nodes and clients use to reach this node (default: --listen).
    #[arg(long, env = "SCHED_ADVERTISE")]
    pub advertise: Option<String>,
    /// Serve peer (Raft and node-to-node) RPCs on this address of their own instead of
    /// --listen, which then serves clients only. Needs --tls-* when not loopback.
    #[arg(long, env = "SCHED_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Address other nodes use to reach --peer-listen (default: --peer-listen).
    #[arg(long, env = "SCHED_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,
    /// Directory for the Raft log, the state machine and snapshots.
    #[arg(long, env = "SCHED_DATA_DIR", help = with_default(
        "Directory for the Raft log, the state machine and snapshots",
        |d| d.data_dir.display().to_string(),
    ))]
    pub data_dir: Option<PathBuf>,
    /// Address of the HTTP server for /metrics (Prometheus), /healthz (liveness) and /readyz
    /// (readiness).
    #[arg(long, env = "SCHED_HTTP")]
    pub http: Option<SocketAddr>,
    /// TOML configuration file (see schedulerd.example.toml).
    #[arg(long, env = "SCHED_CONFIG")]
    pub config: Option<PathBuf>,
    /// Form a single-node cluster on first start (does nothing if already initialized).
    #[arg(long, env = "SCHED_BOOTSTRAP")]
    pub bootstrap: bool,
    /// A worker that sends no heartbeat for this long is declared dead.
    #[arg(long, env = "SCHED_HEARTBEAT_TTL", value_parser = humantime::parse_duration, help = with_default(
        "A worker that sends no heartbeat for this long is declared dead",
        |d| duration(d.workers.heartbeat_ttl),
    ))]
    pub heartbeat_ttl: Option<Duration>,
    /// How often workers are asked to heartbeat (must be below the TTL).
    #[arg(long, env = "SCHED_HEARTBEAT_INTERVAL", value_parser = humantime::parse_duration, help = with_default(
        "How often workers are asked to heartbeat (must be below the TTL)",
        |d| duration(d.workers.heartbeat_interval),
    ))]
    pub heartbeat_interval: Option<Duration>,
    /// After a leader change, how long each worker has to reach the new leader.
    #[arg(long, env = "SCHED_FAILOVER_GRACE", value_parser = humantime::parse_duration, help = with_default(
        "After a leader change, how long each worker has to reach the new leader",
        |d| duration(d.workers.failover_grace),
    ))]
    pub failover_grace: Option<Duration>,
    /// Raft heartbeat interval.
    #[arg(long, env = "SCHED_RAFT_HEARTBEAT", value_parser = humantime::parse_duration, help = with_default(
        "Raft heartbeat interval",
        |d| duration(Duration::from_millis(d.raft.heartbeat_ms)),
    ))]
    pub raft_heartbeat: Option<Duration>,
    /// Lower bound of the Raft election timeout.
    #[arg(long, env = "SCHED_ELECTION_MIN", value_parser = humantime::parse_duration, help = with_default(
        "Lower bound of the Raft election timeout",
        |d| duration(Duration::from_millis(d.raft.election_min_ms)),
    ))]
    pub election_min: Option<Duration>,
    /// Upper bound of the Raft election timeout.
    #[arg(long, env = "SCHED_ELECTION_MAX", value_parser = humantime::parse_duration, help = with_default(
        "Upper bound of the Raft election timeout",
        |d| duration(Duration::from_millis(d.raft.election_max_ms)),
    ))]
    pub election_max: Option<Duration>,
    /// Open connections per gRPC port; further connections are closed at once.
    #[arg(long, env = "SCHED_MAX_CONNECTIONS", help = with_default(
        "Open connections per gRPC port; further connections are closed at once",
        |d| d.limits.max_connections.to_string(),
    ))]
    pub max_connections: Option<usize>,
    /// Open server streams (event, task watch and worker assignment streams) per node;
    /// further ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SCHED_MAX_STREAMS", help = with_default(
        "Open server streams (event, task watch and worker assignment streams) per node; further ones get RESOURCE_EXHAUSTED",
        |d| d.limits.max_streams.to_string(),
    ))]
    pub max_streams: Option<usize>,
    /// Memory (KiB) one stream may hold for a slow reader; beyond it the stream waits for
    /// its client.
    #[arg(long, env = "SCHED_STREAM_BUFFER_KIB", help = with_default(
        "Memory (KiB) one stream may hold for a slow reader; beyond it the stream waits for its client",
        |d| (d.limits.stream_buffer_bytes >> 10).to_string(),
    ))]
    pub stream_buffer_kib: Option<usize>,
    /// End a stream whose client took nothing for this long while its buffer was full.
    #[arg(long, env = "SCHED_STREAM_STALL_TIMEOUT", value_parser = humantime::parse_duration, help = with_default(
        "End a stream whose client took nothing for this long while its buffer was full",
        |d| duration(d.limits.stream_stall_timeout),
    ))]
    pub stream_stall_timeout: Option<Duration>,
    /// Close a connection with no request in flight for this long.
    #[arg(long, env = "SCHED_IDLE_TIMEOUT", value_parser = humantime::parse_duration, help = with_default(
        "Close a connection with no request in flight for this long",
        |d| duration(d.limits.idle_timeout),
    ))]
    pub idle_timeout: Option<Duration>,
    /// Source IP for connections to other nodes (multi-homed hosts).
    #[arg(long, env = "SCHED_PEER_SOURCE_IP")]
    pub peer_source_ip: Option<std::net::IpAddr>,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `node=debug,openraft=warn`).
    #[arg(long, env = "SCHED_LOG")]
    pub log: Option<String>,
    /// Log line format on stderr: `text` for people, `json` (one object per line) for log
    /// shippers (default text).
    #[arg(long, env = "SCHED_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Token file (TOML `[[token]]` entries with name, role, secret_sha256 and, for workers,
    /// worker_id_prefix): every request must then carry `authorization: Bearer <secret>` of
    /// one of them, with a role that allows it.
    #[arg(long, env = "SCHED_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,
    /// This node's certificate chain (PEM). With --tls-key and --tls-ca: every listener
    /// speaks TLS, and peer RPCs are accepted only from nodes presenting a CA-signed node
    /// certificate. Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "SCHED_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "SCHED_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA certificate (PEM) that node and client certificates chain to.
    #[arg(long, env = "SCHED_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Refuse new submits (RESOURCE_EXHAUSTED) while the data directory's filesystem has less
    /// free space than this, e.g. `1GiB`, `500MB`; `0` turns the check off.
    #[arg(long, env = "SCHED_MIN_FREE_DISK", value_parser = crate::disk::parse_bytes, help = with_default(
        "Refuse new submits (RESOURCE_EXHAUSTED) while the data directory's filesystem has less free space than this, e.g. 1GiB or 500MB; 0 turns the check off",
        |d| crate::disk::format_bytes(d.limits.min_free_disk),
    ))]
    pub min_free_disk: Option<u64>,
    /// Serve a non-loopback address without TLS and tokens (anyone who reaches the port can
    /// then change and delete tasks and membership). Logged loudly.
    #[arg(long, env = "SCHED_INSECURE")]
    pub insecure: bool,
    /// Seed an empty data directory from this snapshot file (made by `schedctl snapshot
    /// save`) before starting. With --bootstrap the node starts as a one-node cluster;
    /// without it, it keeps the snapshot's membership (restore every member at its old
    /// address). A directory already restored from the same file starts normally.
    #[arg(long, env = "SCHED_RESTORE", value_name = "FILE")]
    pub restore: Option<PathBuf>,
    /// Testing rolling upgrades: apply and report only command versions up to this one, as
    /// an older release would.
    #[arg(long, env = "SCHED_COMMAND_VERSION", hide = true)]
    pub command_version: Option<u32>,
}

/// A flag's help text ending in its default, rendered from [`Config::default`] (the flags
/// themselves carry no clap default: an unset flag must fall through to the environment, the
/// file, then the default).
fn with_default(text: &str, value: impl FnOnce(&Config) -> String) -> String {
    format!("{text} (default {})", value(&Config::default()))
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields, span).
    Json,
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Node id.
    pub id: u64,
    /// gRPC bind address.
    pub listen: SocketAddr,
    /// Address clients (and, without a peer port, peers) use.
    pub advertise: String,
    /// Separate bind address for peer RPCs.
    pub peer_listen: Option<SocketAddr>,
    /// Address peers use for `peer_listen` (set whenever `peer_listen` is).
    pub advertise_peer: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// HTTP metrics/health bind address.
    pub http: Option<SocketAddr>,
    /// Initialize a single-node cluster if none exists.
    pub bootstrap: bool,
    /// Log filter.
    pub log: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Worker liveness.
    pub workers: WorkerSettings,
    /// Raft and storage.
    pub raft: raft::config::RaftSettings,
    /// Request limits.
    pub limits: LimitSettings,
    /// Planner.
    pub planner: PlannerSettings,
    /// Retention of finished tasks.
    pub retention: RetentionSettings,
    /// Token file; `None`: authentication off.
    pub auth_tokens: Option<PathBuf>,
    /// Certificates; `None`: plaintext.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Allow serving a non-loopback address without TLS and tokens.
    pub insecure: bool,
    /// Snapshot file to seed an empty data directory from (command line only).
    pub restore: Option<PathBuf>,
}

/// How the leader judges worker liveness.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// No heartbeat for this long: the worker is expired and its tasks requeued.
    pub heartbeat_ttl: Duration,
    /// How often workers are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// After a leader change, every worker gets this long to reach the new leader before it
    /// can be expired (bounded; a leader change by itself expires nobody).
    pub failover_grace: Duration,
}

/// Limits on what clients send (each at most the state machine's hard limit).
#[derive(Clone, Debug)]
pub struct LimitSettings {
    /// Largest gRPC message accepted from clients.
    pub max_message_bytes: usize,
    /// Field limits checked before proposing.
    pub fields: Limits,
    /// Non-terminal tasks allowed in the cluster; submits beyond it get RESOURCE_EXHAUSTED.
    pub max_pending_tasks: u64,
    /// Free bytes the data directory's filesystem must keep: below it new submits get
    /// RESOURCE_EXHAUSTED ([`crate::disk`]); 0: no floor.
    pub min_free_disk: u64,
    /// Open connections per gRPC listener ([`crate::conn`]).
    pub max_connections: usize,
    /// Concurrent requests (HTTP/2 streams) per connection.
    pub max_streams_per_connection: u32,
    /// Open server streams per node ([`crate::streams`]).
    pub max_streams: usize,
    /// Bytes one server stream may hold for its client.
    pub stream_buffer_bytes: usize,
    /// Bytes all server streams together may hold.
    pub stream_buffer_total_bytes: usize,
    /// A full stream whose client takes nothing this long is ended.
    pub stream_stall_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout: Duration,
    /// The server pings each connection this often (HTTP/2 keepalive).
    pub keepalive_interval: Duration,
    /// A ping unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
}

/// Leader planner knobs.
#[derive(Clone, Debug)]
pub struct PlannerSettings {
    /// Most assignments in one Assign entry.
    pub max_assignments_per_round: usize,
    /// Most workers held back for large tasks per round.
    pub max_reservations: usize,
    /// Plan at least this often even without state changes.
    pub interval: Duration,
    /// Assign the dependents a completion releases in the completion's own log entry
    /// (one commit per dependent step instead of two).
    pub plan_ahead: bool,
}

impl PlannerSettings {
    /// The pure planner's policy.
    pub fn policy(&self) -> state_machine::PlanPolicy {
        state_machine::PlanPolicy {
            max_assignments: self.max_assignments_per_round,
            max_reservations: self.max_reservations,
        }
    }
}

/// Retention of finished tasks.
#[derive(Clone, Debug)]
pub struct RetentionSettings {
    /// Finished tasks (and their idempotency keys) are kept this long.
    pub finished_tasks: Duration,
    /// How often the leader purges.
    pub purge_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: 1,
            listen: "127.0.0.1:7001".parse().expect("valid address"),
            advertise: String::new(),
            peer_listen: None,
            advertise_peer: None,
            data_dir: PathBuf::from("./data"),
            http: None,
            bootstrap: false,
            log: "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=error,sled=warn".into(),
            log_format: LogFormat::Text,
            workers: WorkerSettings {
                heartbeat_ttl: Duration::from_secs(5),
                heartbeat_interval: Duration::from_secs(1),
                failover_grace: Duration::from_secs(5),
            },
            raft: raft::config::RaftSettings::default(),
            limits: LimitSettings {
                max_message_bytes: 16 << 20,
                fields: Limits::default(),
                max_pending_tasks: 5_000_000,
                min_free_disk: 512 << 20,
                max_connections: 4_096,
                max_streams_per_connection: 256,
                max_streams: 4_096,
                stream_buffer_bytes: 1 << 20,
                stream_buffer_total_bytes: 256 << 20,
                stream_stall_timeout: Duration::from_secs(30),
                idle_timeout: Duration::from_secs(300),
                keepalive_interval: Duration::from_secs(5),
                keepalive_timeout: Duration::from_secs(10),
            },
            planner: PlannerSettings {
                max_assignments_per_round: 4_096,
                max_reservations: 16,
                interval: Duration::from_millis(200),
                plan_ahead: true,
            },
            retention: RetentionSettings {
                finished_tasks: Duration::from_secs(24 * 3600),
                purge_interval: Duration::from_secs(60),
            },
            auth_tokens: None,
            tls: None,
            insecure: false,
            restore: None,
        }
    }
}

/// A configuration problem, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A value is missing or out of range.
    #[error("invalid setting {key}: {reason}")]
    Invalid {
        /// Which setting.
        key: String,
        /// Why, and what to do.
        reason: String,
    },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), reason: reason.into() }
}

/// A duration in the file (`"5s"`).
#[derive(Deserialize, Debug, Clone)]
#[serde(transparent)]
struct Dur(String);

impl Dur {
    fn get(&self, key: &str) -> Result<Duration, ConfigError> {
        humantime::parse_duration(&self.0).map_err(|e| invalid(key, format!("{:?}: {e}", self.0)))
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    listen: Option<SocketAddr>,
    advertise: Option<String>,
    peer_listen: Option<SocketAddr>,
    advertise_peer: Option<String>,
    data_dir: Option<PathBuf>,
    http: Option<SocketAddr>,
    bootstrap: Option<bool>,
    log: Option<String>,
    log_format: Option<LogFormat>,
    auth_tokens: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    insecure: Option<bool>,
    #[serde(default)]
    workers: FileWorkers,
    #[serde(default)]
    raft: FileRaft,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    planner: FilePlanner,
    #[serde(default)]
    retention: FileRetention,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileWorkers {
    heartbeat_ttl: Option<Dur>,
    heartbeat_interval: Option<Dur>,
    failover_grace: Option<Dur>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileRaft {
    heartbeat: Option<Dur>,
    election_min: Option<Dur>,
    election_max: Option<Dur>,
    snapshot_every_entries: Option<u64>,
    keep_entries_after_snapshot: Option<u64>,
    write_timeout: Option<Dur>,
    sled_cache_mib: Option<u64>,
    retained_events: Option<usize>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_message_mib: Option<usize>,
    max_payload_kib: Option<usize>,
    max_result_kib: Option<usize>,
    max_batch_tasks: Option<usize>,
    max_deps: Option<usize>,
    max_pending_tasks: Option<u64>,
    min_free_disk: Option<String>,
    max_worker_slots: Option<u32>,
    max_cpu_milli: Option<u64>,
    max_memory_mib: Option<u64>,
    max_named_amount: Option<u64>,
    max_named_resources: Option<usize>,
    max_connections: Option<usize>,
    max_streams_per_connection: Option<u32>,
    max_streams: Option<usize>,
    stream_buffer_kib: Option<usize>,
    stream_buffer_total_mib: Option<usize>,
    stream_stall_timeout: Option<Dur>,
    idle_timeout: Option<Dur>,
    keepalive_interval: Option<Dur>,
    keepalive_timeout: Option<Dur>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FilePlanner {
    max_assignments_per_round: Option<usize>,
    max_reservations: Option<usize>,
    interval: Option<Dur>,
    plan_ahead: Option<bool>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    finished_tasks: Option<Dur>,
    purge_interval: Option<Dur>,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl Config {
    /// Resolve flags/env over the file over the defaults, then check the result.
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        Config::load_with_rust_log(args, std::env::var("RUST_LOG").ok())
    }

    /// [`Config::load`] with the value of `RUST_LOG` given. The log filter follows the same
    /// order as every setting: `--log` (or `SCHED_LOG`), then `RUST_LOG` (the environment
    /// layer), then the file's `log`, then the default.
    pub fn load_with_rust_log(
        args: &Args,
        rust_log: Option<String>,
    ) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut c = Config::default();

        // File layer.
        if let Some(v) = file.id {
            c.id = v;
        }
        if let Some(v) = file.listen {
            c.listen = v;
        }
        if let Some(v) = file.advertise {
            c.advertise = v;
        }
        c.peer_listen = file.peer_listen;
        c.advertise_peer = file.advertise_peer;
        if let Some(v) = file.data_dir {
            c.data_dir = v;
        }
        c.http = file.http.or(c.http);
        c.bootstrap = file.bootstrap.unwrap_or(c.bootstrap);
        if let Some(v) = file.log {
            c.log = v;
        }
        c.log_format = args.log_format.or(file.log_format).unwrap_or(c.log_format);
        c.auth_tokens = file.auth_tokens.or(c.auth_tokens);
        let mut tls = (file.tls_cert, file.tls_key, file.tls_ca);
        c.insecure = file.insecure.unwrap_or(c.insecure);
        let w = &file.workers;
        if let Some(d) = &w.heartbeat_ttl {
            c.workers.heartbeat_ttl = d.get("workers.heartbeat_ttl")?;
        }
        if let Some(d) = &w.heartbeat_interval {
            c.workers.heartbeat_interval = d.get("workers.heartbeat_interval")?;
        }
        if let Some(d) = &w.failover_grace {
            c.workers.failover_grace = d.get("workers.failover_grace")?;
        }
        let r = &file.raft;
        if let Some(d) = &r.heartbeat {
            c.raft.heartbeat_ms = ms(d.get("raft.heartbeat")?);
        }
        if let Some(d) = &r.election_min {
            c.raft.election_min_ms = ms(d.get("raft.election_min")?);
        }
        if let Some(d) = &r.election_max {
            c.raft.election_max_ms = ms(d.get("raft.election_max")?);
        }
        if let Some(v) = r.snapshot_every_entries {
            c.raft.snapshot_logs = v;
        }
        if let Some(v) = r.keep_entries_after_snapshot {
            c.raft.keep_logs = v;
        }
        if let Some(d) = &r.write_timeout {
            c.raft.write_timeout_ms = ms(d.get("raft.write_timeout")?);
        }
        if let Some(v) = r.sled_cache_mib {
            c.raft.sm.cache_capacity = v << 20;
        }
        if let Some(v) = r.retained_events {
            c.raft.sm.retained_events = v;
        }
        let l = &file.limits;
        if let Some(v) = l.max_message_mib {
            c.limits.max_message_bytes = v << 20;
        }
        if let Some(v) = l.max_payload_kib {
            c.limits.fields.max_payload_bytes = v << 10;
        }
        if let Some(v) = l.max_result_kib {
            c.limits.fields.max_result_bytes = v << 10;
        }
        if let Some(v) = l.max_batch_tasks {
            c.limits.fields.max_batch_tasks = v;
        }
        if let Some(v) = l.max_deps {
            c.limits.fields.max_deps = v;
        }
        if let Some(v) = l.max_pending_tasks {
            c.limits.max_pending_tasks = v;
        }
        if let Some(v) = &l.min_free_disk {
            c.limits.min_free_disk =
                crate::disk::parse_bytes(v).map_err(|e| invalid("limits.min_free_disk", e))?;
        }
        if let Some(v) = l.max_worker_slots {
            c.limits.fields.max_worker_slots = v;
        }
        if let Some(v) = l.max_cpu_milli {
            c.limits.fields.max_cpu_milli = v;
        }
        if let Some(v) = l.max_memory_mib {
            c.limits.fields.max_memory_mib = v;
        }
        if let Some(v) = l.max_named_amount {
            c.limits.fields.max_named_amount = v;
        }
        if let Some(v) = l.max_named_resources {
            c.limits.fields.max_named_resources = v;
        }
        if let Some(v) = l.max_connections {
            c.limits.max_connections = v;
        }
        if let Some(v) = l.max_streams_per_connection {
            c.limits.max_streams_per_connection = v;
        }
        if let Some(v) = l.max_streams {
            c.limits.max_streams = v;
        }
        if let Some(v) = l.stream_buffer_kib {
            c.limits.stream_buffer_bytes = v << 10;
        }
        if let Some(v) = l.stream_buffer_total_mib {
            c.limits.stream_buffer_total_bytes = v << 20;
        }
        if let Some(d) = &l.stream_stall_timeout {
            c.limits.stream_stall_timeout = d.get("limits.stream_stall_timeout")?;
        }
        if let Some(d) = &l.idle_timeout {
            c.limits.idle_timeout = d.get("limits.idle_timeout")?;
        }
        if let Some(d) = &l.keepalive_interval {
            c.limits.keepalive_interval = d.get("limits.keepalive_interval")?;
        }
        if let Some(d) = &l.keepalive_timeout {
            c.limits.keepalive_timeout = d.get("limits.keepalive_timeout")?;
        }
        let p = &file.planner;
        if let Some(v) = p.max_assignments_per_round {
            c.planner.max_assignments_per_round = v;
        }
        if let Some(v) = p.max_reservations {
            c.planner.max_reservations = v;
        }
        if let Some(d) = &p.interval {
            c.planner.interval = d.get("planner.interval")?;
        }
        if let Some(v) = p.plan_ahead {
            c.planner.plan_ahead = v;
        }
        if let Some(d) = &file.retention.finished_tasks {
            c.retention.finished_tasks = d.get("retention.finished_tasks")?;
        }
        if let Some(d) = &file.retention.purge_interval {
            c.retention.purge_interval = d.get("retention.purge_interval")?;
        }

        // Flag / environment layer.
        if let Some(v) = args.id {
            c.id = v;
        }
        if let Some(v) = args.listen {
            c.listen = v;
        }
        if let Some(v) = &args.advertise {
            c.advertise = v.clone();
        }
        c.peer_listen = args.peer_listen.or(c.peer_listen);
        c.advertise_peer = args.advertise_peer.clone().or(c.advertise_peer);
        if let Some(v) = &args.data_dir {
            c.data_dir = v.clone();
        }
        c.http = args.http.or(c.http);
        c.bootstrap |= args.bootstrap;
        if let Some(v) = &args.auth_tokens {
            c.auth_tokens = Some(v.clone());
        }
        c.insecure |= args.insecure;
        c.restore = args.restore.clone().or(c.restore);
        if let Some(v) = args.command_version {
            if !(state_machine::BASE_COMMAND_VERSION..=state_machine::COMMAND_VERSION).contains(&v)
            {
                return Err(invalid(
                    "command_version",
                    format!(
                        "{v} is not between {} and {}",
                        state_machine::BASE_COMMAND_VERSION,
                        state_machine::COMMAND_VERSION
                    ),
                ));
            }
            c.raft.sm.command_version = v;
        }
        for (flag, file) in
            [(&args.tls_cert, &mut tls.0), (&args.tls_key, &mut tls.1), (&args.tls_ca, &mut tls.2)]
        {
            if let Some(v) = flag {
                *file = Some(v.clone());
            }
        }
        c.tls = match tls {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(crate::tls::TlsFiles { cert, key, ca }),
            _ => {
                return Err(invalid(
                    "tls",
                    "give all three of --tls-cert, --tls-key and --tls-ca (or none)",
                ))
            }
        };
        match (&args.log, rust_log.filter(|v| !v.trim().is_empty())) {
            (Some(v), _) => c.log = v.clone(),
            (None, Some(v)) => c.log = v,
            (None, None) => {}
        }
        if let Some(v) = args.min_free_disk {
            c.limits.min_free_disk = v;
        }
        if let Some(d) = args.heartbeat_ttl {
            c.workers.heartbeat_ttl = d;
        }
        if let Some(d) = args.heartbeat_interval {
            c.workers.heartbeat_interval = d;
        }
        if let Some(d) = args.failover_grace {
            c.workers.failover_grace = d;
        }
        if let Some(v) = args.max_connections {
            c.limits.max_connections = v;
        }
        if let Some(v) = args.max_streams {
            c.limits.max_streams = v;
        }
        if let Some(v) = args.stream_buffer_kib {
            c.limits.stream_buffer_bytes = v << 10;
        }
        if let Some(d) = args.stream_stall_timeout {
            c.limits.stream_stall_timeout = d;
        }
        if let Some(d) = args.idle_timeout {
            c.limits.idle_timeout = d;
        }
        if let Some(ip) = args.peer_source_ip {
            c.raft.net.source_ip = Some(ip);
        }
        if let Some(d) = args.raft_heartbeat {
            c.raft.heartbeat_ms = ms(d);
        }
        if let Some(d) = args.election_min {
            c.raft.election_min_ms = ms(d);
        }
        if let Some(d) = args.election_max {
            c.raft.election_max_ms = ms(d);
        }
        if c.advertise.is_empty() {
            c.advertise = c.listen.to_string();
        }
        if c.advertise_peer.is_none() {
            c.advertise_peer = c.peer_listen.map(|a| a.to_string());
        }
        c.check()?;
        Ok(c)
    }

    /// This node as the cluster's membership records it: its client address and, with a
    /// peer port, the address peers use.
    pub fn node_info(&self) -> raft::NodeInfo {
        raft::NodeInfo::with_peer(self.advertise.clone(), self.advertise_peer.clone())
    }

    /// A non-loopback address this node serves while TLS or tokens are off, and what is
    /// missing; `None` when every address is loopback or both protections are on.
    pub fn unprotected_exposure(&self) -> Option<(SocketAddr, Vec<&'static str>)> {
        let addr = [Some(self.listen), self.peer_listen, self.http]
            .into_iter()
            .flatten()
            .find(|a| !a.ip().is_loopback())?;
        let missing: Vec<&'static str> = [
            self.tls.is_none().then_some("TLS (--tls-cert/--tls-key/--tls-ca)"),
            self.auth_tokens.is_none().then_some("tokens (--auth-tokens)"),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!missing.is_empty()).then_some((addr, missing))
    }

    fn check(&mut self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("id", "must be a positive integer (pass --id N)"));
        }
        if self.listen.ip().is_unspecified() && self.advertise == self.listen.to_string() {
            return Err(invalid(
                "advertise",
                "listening on a wildcard address needs --advertise HOST:PORT that peers can reach",
            ));
        }
        match (self.peer_listen, &self.advertise_peer) {
            (None, Some(_)) => {
                return Err(invalid("advertise_peer", "needs --peer-listen ADDR to advertise"))
            }
            (Some(p), Some(adv)) => {
                if p == self.listen {
                    return Err(invalid(
                        "peer_listen",
                        "must differ from --listen (leave it out to serve peers on --listen)",
                    ));
                }
                if p.ip().is_unspecified() && *adv == p.to_string() {
                    return Err(invalid(
                        "advertise_peer",
                        "a wildcard --peer-listen needs --advertise-peer HOST:PORT that peers can reach",
                    ));
                }
                raft::NodeInfo::check_addr("advertise_peer", adv)
                    .map_err(|e| invalid("advertise_peer", e))?;
            }
            _ => {}
        }
        if let Some((addr, missing)) = self.unprotected_exposure() {
            if !self.insecure {
                return Err(invalid(
                    "listen",
                    format!(
                        "{addr} is reachable from other hosts, and this node would serve it without {}; \
                         anyone reaching it could read and change tasks and membership. Add them, \
                         serve loopback only, or pass --insecure to accept that risk",
                        missing.join(" and ")
                    ),
                ));
            }
        }
        if self.raft.election_min_ms <= self.raft.heartbeat_ms
            || self.raft.election_max_ms <= self.raft.election_min_ms
        {
            return Err(invalid(
                "raft",
                format!(
                    "need heartbeat < election_min < election_max, got {} / {} / {} ms",
                    self.raft.heartbeat_ms, self.raft.election_min_ms, self.raft.election_max_ms
                ),
            ));
        }
        if self.workers.heartbeat_interval >= self.workers.heartbeat_ttl {
            return Err(invalid(
                "workers.heartbeat_interval",
                "must be shorter than workers.heartbeat_ttl",
            ));
        }
        if self.planner.max_assignments_per_round == 0 {
            return Err(invalid("planner.max_assignments_per_round", "must be at least 1"));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_connections", l.max_connections),
            ("limits.max_streams", l.max_streams),
            ("limits.max_streams_per_connection", l.max_streams_per_connection as usize),
            ("limits.stream_buffer_kib", l.stream_buffer_bytes >> 10),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if l.stream_buffer_total_bytes < l.stream_buffer_bytes {
            return Err(invalid(
                "limits.stream_buffer_total_mib",
                "must be at least one stream's buffer (limits.stream_buffer_kib)",
            ));
        }
        for (key, d) in [
            ("limits.stream_stall_timeout", l.stream_stall_timeout),
            ("limits.idle_timeout", l.idle_timeout),
            ("limits.keepalive_interval", l.keepalive_interval),
            ("limits.keepalive_timeout", l.keepalive_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(invalid(key, "must be at least 100ms"));
            }
        }
        let clamped = self.limits.fields.clamped();
        if clamped != self.limits.fields {
            return Err(invalid(
                "limits",
                format!("a limit exceeds the hard maximum: {:?}", state_machine::validate::HARD),
            ));
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text)
        .map_err(|e| ConfigError::Parse { path: path.into(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "id = 3\nlisten = \"127.0.0.1:9000\"\n[workers]\nheartbeat_ttl = \"9s\"\n[raft]\nheartbeat = \"40ms\"\n",
        )
        .unwrap();
        let args = Args { config: Some(path.clone()), id: Some(7), ..Default::default() };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.id, 7, "flag wins over file");
        assert_eq!(c.listen.port(), 9000, "file wins over default");
        assert_eq!(c.advertise, "127.0.0.1:9000");
        assert_eq!(c.workers.heartbeat_ttl, Duration::from_secs(9));
        assert_eq!(c.raft.heartbeat_ms, 40);
        assert_eq!(c.workers.heartbeat_interval, Duration::from_secs(1), "default kept");
    }

    #[test]
    fn log_filter_follows_flags_then_rust_log_then_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "log = \"warn\"\n").unwrap();
        let file = Args { config: Some(path), ..Default::default() };
        let with_flag = Args { log: Some("debug".into()), ..file.clone() };
        let env = Some("trace".to_string());
        assert_eq!(Config::load_with_rust_log(&with_flag, env.clone()).unwrap().log, "debug");
        assert_eq!(Config::load_with_rust_log(&file, env.clone()).unwrap().log, "trace");
        assert_eq!(Config::load_with_rust_log(&file, None).unwrap().log, "warn");
        let none = Args::default();
        assert_eq!(Config::load_with_rust_log(&none, None).unwrap().log, Config::default().log);
    }

    #[test]
    fn the_example_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schedulerd.example.toml");
        let c = Config::load(&Args { config: Some(path), ..Default::default() }).unwrap();
        assert_eq!(c.id, 1);
        // Apart from where this node lives, the example states exactly the defaults.
        let d = Config {
            id: c.id,
            listen: c.listen,
            advertise: c.advertise.clone(),
            data_dir: c.data_dir.clone(),
            ..Config::default()
        };
        assert_eq!(
            format!("{c:#?}"),
            format!("{d:#?}"),
            "the example file drifted from the defaults"
        );
    }

    #[test]
    fn help_texts_state_the_real_defaults() {
        use clap::CommandFactory;
        let d = Config::default();
        let cmd = Args::command();
        let help = |flag: &str| {
            let arg = cmd.get_arguments().find(|a| a.get_long() == Some(flag)).unwrap();
            arg.get_help().map(|h| h.to_string()).unwrap_or_default()
        };
        for (flag, default) in [
            ("listen", "127.0.0.1:7001".to_string()),
            ("data-dir", "./data".to_string()),
            ("heartbeat-ttl", "5s".to_string()),
            ("heartbeat-interval", "1s".to_string()),
            ("failover-grace", "5s".to_string()),
            ("raft-heartbeat", format!("{}ms", d.raft.heartbeat_ms)),
            ("election-min", format!("{}ms", d.raft.election_min_ms)),
            ("election-max", format!("{}ms", d.raft.election_max_ms)),
            ("max-connections", d.limits.max_connections.to_string()),
            ("max-streams", d.limits.max_streams.to_string()),
            ("stream-buffer-kib", (d.limits.stream_buffer_bytes >> 10).to_string()),
            ("idle-timeout", "5m".to_string()),
            ("stream-stall-timeout", "30s".to_string()),
        ] {
            let h = help(flag);
            assert!(h.ends_with(&format!("(default {default})")), "--{flag}: {h}");
        }
        // A help default never turns into a clap default that would hide the file's value.
        let parsed = Args::try_parse_from(["schedulerd"]).unwrap();
        assert!(parsed.heartbeat_ttl.is_none() && parsed.listen.is_none());
    }

    #[test]
    fn resource_limits_come_from_flags_and_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[limits]\nmax_connections = 50\nstream_buffer_kib = 64\nidle_timeout = \"2m\"\n\
             stream_stall_timeout = \"5s\"\n",
        )
        .unwrap();
        let args =
            Args { config: Some(path.clone()), max_connections: Some(9), ..Default::default() };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.limits.max_connections, 9, "flag wins over file");
        assert_eq!(c.limits.stream_buffer_bytes, 64 << 10);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.limits.stream_stall_timeout, Duration::from_secs(5));
        let e = Config::load(&Args { max_streams: Some(0), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("limits.max_streams"), "{e}");
        std::fs::write(&path, "[limits]\nstream_buffer_kib = 4096\nstream_buffer_total_mib = 1\n")
            .unwrap();
        let e = Config::load(&Args { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("stream_buffer_total_mib"), "{e}");
    }

    #[test]
    fn bad_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[workers]\nheartbeat_ttl = \"soon\"\n").unwrap();
        let e =
            Config::load(&Args { config: Some(path.clone()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("workers.heartbeat_ttl"), "{e}");
        std::fs::write(&path, "[limits]\nmin_free_disk = \"lots\"\n").unwrap();
        let e =
            Config::load(&Args { config: Some(path.clone()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("limits.min_free_disk"), "{e}");
        std::fs::write(&path, "[limits]\nmin_free_disk = \"2GiB\"\n").unwrap();
        let c = Config::load(&Args { config: Some(path.clone()), ..Default::default() }).unwrap();
        assert_eq!(c.limits.min_free_disk, 2 << 30);
        let c = Config::load(&Args {
            config: Some(path.clone()),
            min_free_disk: Some(0),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.limits.min_free_disk, 0, "the flag wins over the file");
        std::fs::write(&path, "unknown_key = 1\n").unwrap();
        let e = Config::load(&Args { config: Some(path), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("unknown"), "{e}");
        let e = Config::load(&Args { id: Some(0), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("id"), "{e}");
        let e = Config::load(&Args {
            election_min: Some(Duration::from_millis(10)),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("election"), "{e}");
    }

    #[test]
    fn a_non_loopback_address_needs_insecure_until_it_is_protected() {
        let wide = Args {
            listen: Some("0.0.0.0:7001".parse().unwrap()),
            advertise: Some("10.0.0.1:7001".into()),
            ..Default::default()
        };
        let e = Config::load(&wide).unwrap_err().to_string();
        assert!(e.contains("0.0.0.0:7001") && e.contains("--insecure"), "{e}");
        assert!(e.contains("--auth-tokens"), "names the missing protection: {e}");
        let http = Args { http: Some("0.0.0.0:8001".parse().unwrap()), ..Default::default() };
        assert!(Config::load(&http).is_err(), "the HTTP address counts too");
        let tokens_only = Args { auth_tokens: Some("t.toml".into()), ..wide.clone() };
        let e = Config::load(&tokens_only).unwrap_err().to_string();
        assert!(e.contains("TLS") && !e.contains("--auth-tokens"), "{e}");
        let protected = Args {
            tls_cert: Some("n.pem".into()),
            tls_key: Some("k.pem".into()),
            tls_ca: Some("ca.pem".into()),
            ..tokens_only
        };
        assert!(Config::load(&protected).unwrap().tls.is_some());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "tls_cert = \"n.pem\"\ntls_key = \"k.pem\"\ntls_ca = \"ca.pem\"\n")
            .unwrap();
        let from_file = Config::load(&Args { config: Some(file), ..Default::default() }).unwrap();
        assert_eq!(from_file.tls.unwrap().ca, PathBuf::from("ca.pem"), "the file layer sets TLS");
        let half = Args { tls_cert: Some("n.pem".into()), ..Default::default() };
        let e = Config::load(&half).unwrap_err().to_string();
        assert!(e.contains("all three"), "{e}");
        let c = Config::load(&Args { insecure: true, ..wide }).unwrap();
        assert!(c.insecure);
        // Loopback needs nothing.
        assert!(Config::load(&Args::default()).is_ok());
    }

    #[test]
    fn a_peer_port_is_checked_and_recorded_in_the_node_info() {
        let peer = |listen: &str, adv: Option<&str>| Args {
            peer_listen: Some(listen.parse().unwrap()),
            advertise_peer: adv.map(str::to_string),
            ..Default::default()
        };
        let c = Config::load(&peer("127.0.0.1:7101", None)).unwrap();
        assert_eq!(c.advertise_peer.as_deref(), Some("127.0.0.1:7101"), "defaults to itself");
        assert_eq!(c.node_info().peer(), "127.0.0.1:7101");
        assert_eq!(c.node_info().addr, "127.0.0.1:7001");
        let e = Config::load(&peer("127.0.0.1:7001", None)).unwrap_err().to_string();
        assert!(e.contains("must differ from --listen"), "{e}");
        let e = Config::load(&peer("0.0.0.0:7101", None)).unwrap_err().to_string();
        assert!(e.contains("--advertise-peer"), "a wildcard needs an advertised address: {e}");
        let e = Config::load(&peer("0.0.0.0:7101", Some("10.0.0.1:7101"))).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "the peer port counts as exposure: {e}");
        let lone = Args { advertise_peer: Some("10.0.0.1:7101".into()), ..Default::default() };
        let e = Config::load(&lone).unwrap_err().to_string();
        assert!(e.contains("--peer-listen"), "{e}");
    }

    #[test]
    fn the_three_node_deployment_files_parse_and_protect_every_port() {
        for i in 1..=3u64 {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("deploy/node-{i}.toml"));
            let c = Config::load(&Args { config: Some(path), ..Default::default() })
                .unwrap_or_else(|e| panic!("node-{i}.toml: {e}"));
            assert_eq!(c.id, i);
            assert_eq!(c.node_info().peer(), format!("10.0.0.{i}:7101"));
            assert!(c.tls.is_some() && c.auth_tokens.is_some() && !c.insecure);
            assert!(c.unprotected_exposure().is_none());
        }
    }
}
