//! `schedctl dev up`: a local cluster and shell workers as child processes.
//!
//! 1. Find `schedulerd`: next to this executable, else `$SCHEDULERD_BIN`, else on `PATH`.
//! 2. Pick ports: `base-port + i` for gRPC and `base-port + 1000 + i` for HTTP when free,
//!    otherwise free ports from [`client::ports`]. They are saved in `DIR/cluster.json`: the nodes store
//!    their members' addresses, so a restart on the same directory must reuse the same ports.
//! 3. Start node N as `schedulerd --id N --listen ... --data-dir DIR/node-N --http ...`, wait
//!    until its gRPC health service answers, initialise the cluster on node 1 unless it
//!    already has a leader (InitCluster is idempotent for the same members anyway), and wait
//!    for a leader.
//! 4. Start the workers: `schedctl worker run --exec 'sh -c "$SCHED_PAYLOAD"'`, so a task's
//!    payload is the shell script it runs.
//! 5. Print every child's PID, and record them in `DIR/cluster.json` (`pid` of each node,
//!    `workers` with theirs). A child that exits while the cluster is up is restarted after
//!    [`RESTART_DELAY`] (long enough to watch a failover), with the same arguments; the file
//!    is updated with the new PID.
//! 6. On Ctrl-C / SIGTERM: stop the workers first (they drain and deregister while the
//!    cluster is still up), then the nodes; SIGTERM, then SIGKILL after a grace.
//!
//! Processes are started and stopped by the [`client::local`] harness (the nodes as a
//! [`LocalCluster`], the workers as [`Proc`]s). Every child runs in its own process group, so
//! a Ctrl-C in the terminal reaches only this process, which then stops the children in
//! order; on Linux the children also get SIGTERM if this process dies without cleaning up.
//! Child output goes to `DIR/<child>.log`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use client::local::{
    stop_gracefully, LocalCluster, LocalClusterOptions, NodeOptions, Proc, ProcSpec, Security,
};
use client::pki::TokenSpec;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, SignalKind};

use super::output::{outln, print_json, Format};
use super::{Ctx, UsageError};

/// How long a node may take to answer health checks, and the cluster to elect a leader.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Workers get this long to drain at shutdown (then SIGKILL).
const WORKER_STOP_GRACE: Duration = Duration::from_secs(15);
/// Nodes get this long to exit after SIGTERM (then SIGKILL).
const NODE_STOP_GRACE: Duration = Duration::from_secs(5);
/// A child that exited unexpectedly is started again after this long.
const RESTART_DELAY: Duration = Duration::from_secs(5);

/// Development commands.
#[derive(Debug, Subcommand)]
pub enum DevCmd {
    /// Start a local cluster and shell workers; Ctrl-C stops everything.
    Up(UpArgs),
}

/// `dev up` options.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Scheduler nodes (1, 3 or 5 make sense).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=9))]
    pub nodes: u32,
    /// Shell workers.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Directory for node data, logs and the port assignment (reused on restart).
    #[arg(long, default_value = ".dev-cluster")]
    pub dir: PathBuf,
    /// First gRPC port (HTTP ports start 1000 higher).
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    /// Plaintext and no tokens. By default the cluster runs with TLS (a development CA in
    /// --dir) and tokens (an admin token, and a worker token for the dev workers).
    #[arg(long)]
    pub insecure: bool,
}

/// The worker token `dev up` gives its workers.
const WORKER_TOKEN: &str = "dev-workers";

/// The saved layout of a dev cluster (and, while it runs, the PIDs of its processes).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Layout {
    nodes: Vec<NodeAddrs>,
    /// The running workers: name and PID.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    workers: Vec<WorkerPid>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct NodeAddrs {
    id: u64,
    grpc: String,
    http: String,
    /// PID of the running node process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct WorkerPid {
    name: String,
    pid: u32,
}

impl Layout {
    fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.grpc.clone()).collect()
    }
}

/// Runs a dev command.
pub async fn run(ctx: &Ctx, cmd: DevCmd) -> Result<u8> {
    let DevCmd::Up(a) = cmd;
    up(ctx, a).await
}

/// When started by `cargo run` (cargo sets `$CARGO`) from this workspace and `schedulerd` is
/// not built yet, build it with the same profile, so one command starts a cluster on a fresh
/// checkout. Returns the binary, or `None` when not run by cargo.
fn build_schedulerd(exe: Option<&Path>) -> Result<Option<PathBuf>> {
    let (Some(cargo), Some(dir)) = (std::env::var_os("CARGO"), exe.and_then(Path::parent)) else {
        return Ok(None);
    };
    let release = dir.file_name().is_some_and(|n| n == "release");
    eprintln!(
        "building schedulerd (cargo build{} -p node)...",
        if release { " --release" } else { "" }
    );
    let mut cmd = std::process::Command::new(cargo);
    // The workspace this schedctl was built from (cargo runs us from any directory).
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    cmd.args(["build", "-p", "node", "--bin", "schedulerd", "--manifest-path"]).arg(manifest);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo to build schedulerd")?;
    if !status.success() {
        bail!("building schedulerd failed ({status}); fix the build, then run `dev up` again");
    }
    Ok(client::local::find_schedulerd(exe))
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The preferred ports when all are free, else free ports from [`client::ports`].
fn pick_layout(nodes: u32, base: u16) -> Result<Layout> {
    let wanted: Vec<(u16, u16)> = (0..nodes as u16)
        .map(|i| (base.saturating_add(i), base.saturating_add(1000).saturating_add(i)))
        .collect();
    let distinct = base.checked_add(1000 + nodes as u16).is_some();
    if distinct && wanted.iter().all(|(g, h)| port_free(*g) && port_free(*h)) {
        return Ok(Layout {
            nodes: wanted
                .iter()
                .enumerate()
                .map(|(i, (g, h))| NodeAddrs {
                    id: i as u64 + 1,
                    grpc: format!("127.0.0.1:{g}"),
                    http: format!("127.0.0.1:{h}"),
                    pid: None,
                })
                .collect(),
            workers: Vec::new(),
        });
    }
    let ports: Vec<u16> = (0..nodes * 2)
        .map(|_| client::ports::free_port())
        .collect::<std::io::Result<_>>()
        .context("finding free loopback ports")?;
    Ok(Layout {
        nodes: (0..nodes as usize)
            .map(|i| NodeAddrs {
                id: i as u64 + 1,
                grpc: format!("127.0.0.1:{}", ports[2 * i]),
                http: format!("127.0.0.1:{}", ports[2 * i + 1]),
                pid: None,
            })
            .collect(),
        workers: Vec::new(),
    })
}

fn load_layout(path: &Path) -> Result<Option<Layout>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(
            serde_json::from_str(&s).with_context(|| format!("reading {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Records the current PIDs in `cluster.json`.
fn save_pids(
    path: &Path,
    layout: &mut Layout,
    nodes: &LocalCluster,
    workers: &[Proc],
) -> Result<()> {
    for (n, p) in layout.nodes.iter_mut().zip(&nodes.nodes) {
        n.pid = p.pid();
    }
    layout.workers = workers
        .iter()
        .filter_map(|w| w.pid().map(|pid| WorkerPid { name: w.name().to_string(), pid }))
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(layout)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The nodes of `layout` as harness options: its addresses, data and logs under `dir`, each
/// node in its own process group, not initialized (see [`ensure_initialised`]).
fn cluster_options(schedulerd: &Path, dir: &Path, layout: &Layout) -> Result<LocalClusterOptions> {
    let mut opts = LocalClusterOptions::new(schedulerd, 0)
        .dir(dir)
        .init(false)
        .detached(true)
        .startup_timeout(STARTUP_TIMEOUT);
    for n in &layout.nodes {
        let addr = |a: &str| -> Result<SocketAddr> {
            a.parse().with_context(|| format!("node {} in cluster.json: bad address {a:?}", n.id))
        };
        opts.nodes.push(NodeOptions {
            listen: Some(addr(&n.grpc)?),
            http: Some(addr(&n.http)?),
            ..NodeOptions::new(n.id)
        });
    }
    Ok(opts)
}

/// Initialises the cluster unless it already has a leader, then waits for one; returns the
/// leader's id.
async fn ensure_initialised(cluster: &LocalCluster) -> Result<u64> {
    if cluster.leader().await.is_none() {
        if let Err(e) = cluster.init().await {
            // A restarted cluster may still be electing its leader; the wait below decides.
            tracing::info!(error = %e, "init was not accepted; waiting for a leader");
        }
    }
    let i = cluster.wait_leader(STARTUP_TIMEOUT).await.context("the cluster elected no leader")?;
    Ok(cluster.nodes[i].id)
}

/// Stops the workers first (they drain and deregister while the cluster is still up), then
/// the nodes.
async fn stop_everything(cluster: &mut LocalCluster, workers: &mut [Proc]) {
    let mut w: Vec<&mut Proc> = workers.iter_mut().collect();
    let killed = stop_gracefully(&mut w, WORKER_STOP_GRACE).await;
    killed.into_iter().chain(cluster.stop_gracefully(NODE_STOP_GRACE).await).for_each(|name| {
        tracing::warn!(child = %name, "did not stop in time; killed it");
    });
}

async fn up(ctx: &Ctx, a: UpArgs) -> Result<u8> {
    let exe = std::env::current_exe().ok();
    let schedulerd = match client::local::find_schedulerd(exe.as_deref()) {
        Some(p) => Some(p),
        None => build_schedulerd(exe.as_deref())?,
    };
    let schedulerd = schedulerd.ok_or_else(|| {
        UsageError(
            "cannot find the schedulerd binary: build it (`cargo build --release -p node`), put it \
             next to schedctl or on PATH, or set SCHEDULERD_BIN"
                .into(),
        )
    })?;
    let exe = exe.context("cannot locate the schedctl executable to start workers")?;
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let dir = a.dir.canonicalize()?;
    let layout_path = dir.join("cluster.json");
    let mut layout = match load_layout(&layout_path)? {
        Some(l) if l.nodes.len() == a.nodes as usize => l,
        Some(l) => {
            return Err(UsageError(format!(
                "{} holds a {}-node cluster; pass --nodes {} or use another --dir",
                dir.display(),
                l.nodes.len(),
                l.nodes.len()
            ))
            .into())
        }
        None => {
            let l = pick_layout(a.nodes, a.base_port)?;
            std::fs::write(&layout_path, serde_json::to_string_pretty(&l)?)?;
            l
        }
    };
    for n in &layout.nodes {
        let port: u16 = n.grpc.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if !port_free(port) {
            bail!(
                "port {} of node {} is in use (is another dev cluster running from {}?)",
                n.grpc,
                n.id,
                dir.display()
            );
        }
    }

    let mut opts = cluster_options(&schedulerd, &dir, &layout)?;
    let security = if a.insecure {
        None
    } else {
        let mut w = TokenSpec::new(WORKER_TOKEN, "worker");
        w.worker_id_prefix = Some("dev-worker-".into());
        Some(Security::load_or_create(&dir, &[w])?)
    };
    if let Some(s) = &security {
        opts = opts.with_security(s.clone());
    }
    let mut nodes = LocalCluster::prepare(opts)?;
    let mut workers: Vec<Proc> = Vec::new();
    let started =
        start(&mut nodes, &exe, &dir, &layout, a.workers, security.as_ref(), &mut workers).await;
    let leader = match started {
        Ok(l) => l,
        Err(e) => {
            stop_everything(&mut nodes, &mut workers).await;
            return Err(e);
        }
    };

    save_pids(&layout_path, &mut layout, &nodes, &workers)?;
    let endpoints = layout.endpoints().join(",");
    let scheme = if security.is_some() { "https" } else { "http" };
    let ca_cert = security.as_ref().map(|s| s.pki.ca.display().to_string());
    let token_file =
        security.as_ref().map(|_| Security::secret_file(&dir, "admin").display().to_string());
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "dir": dir.display().to_string(),
            "endpoints": layout.endpoints(),
            "ca_cert": ca_cert,
            "token_file": token_file,
            "leader_id": leader,
            "nodes": layout.nodes.iter().map(|n| serde_json::json!({
                "id": n.id,
                "pid": n.pid,
                "grpc": n.grpc,
                "http": format!("{scheme}://{}", n.http),
                "log": dir.join(format!("node-{}.log", n.id)).display().to_string(),
            })).collect::<Vec<_>>(),
            "workers": workers.iter().map(|w| serde_json::json!({
                "name": w.name(),
                "pid": w.pid(),
            })).collect::<Vec<_>>(),
        })),
        Format::Table => {
            outln!("raftsched dev cluster is up (data and logs in {})", dir.display());
            for n in &layout.nodes {
                let mark = if n.id == leader { " (leader)" } else { "" };
                outln!(
                    "  node {}  pid {:<7} grpc {}  metrics {scheme}://{}/metrics{mark}",
                    n.id,
                    n.pid.map(|p| p.to_string()).unwrap_or_default(),
                    n.grpc,
                    n.http
                );
            }
            for w in &workers {
                outln!(
                    "  {}  pid {}  (sh -c \"$SCHED_PAYLOAD\")",
                    w.name(),
                    w.pid().map(|p| p.to_string()).unwrap_or_default()
                );
            }
            outln!(
                "  PIDs are also in {}; a process that exits is restarted",
                layout_path.display()
            );
            outln!();
            outln!("  export SCHED_ENDPOINTS={endpoints}");
            if let (Some(ca), Some(token)) = (&ca_cert, &token_file) {
                outln!("  export SCHED_CA_CERT={ca} SCHED_TOKEN=$(cat {token})");
            }
            outln!("  schedctl task submit --name hello --payload 'echo hello' --wait");
            if security.is_some() {
                outln!();
                outln!(
                    "  TLS and tokens are on (the admin token above; --insecure turns them off)."
                );
            }
            outln!();
            outln!("Ctrl-C stops everything.");
        }
    }

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // When each node, then each worker, that exited unexpectedly is started again.
    let mut restart_at: Vec<Option<Instant>> = vec![None; nodes.nodes.len() + workers.len()];
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                let mut changed = false;
                let procs = nodes.nodes.iter_mut().map(|n| n.process_mut()).chain(workers.iter_mut());
                for (p, at) in procs.zip(restart_at.iter_mut()) {
                    match *at {
                        None => {
                            if let Ok(Some(status)) = p.try_exited() {
                                eprintln!(
                                    "{} exited ({status}); restarting it in {} (log: {})",
                                    p.name(),
                                    humantime::format_duration(RESTART_DELAY),
                                    p.log().display()
                                );
                                *at = Some(Instant::now() + RESTART_DELAY);
                            }
                        }
                        Some(t) if Instant::now() >= t => match p.start() {
                            Ok(()) => {
                                eprintln!(
                                    "{} restarted (pid {})",
                                    p.name(),
                                    p.pid().map(|p| p.to_string()).unwrap_or_default()
                                );
                                *at = None;
                                changed = true;
                            }
                            Err(e) => {
                                eprintln!("cannot restart {}: {e}; trying again", p.name());
                                *at = Some(Instant::now() + RESTART_DELAY);
                            }
                        },
                        Some(_) => {}
                    }
                }
                if changed {
                    if let Err(e) = save_pids(&layout_path, &mut layout, &nodes, &workers) {
                        eprintln!("{e:#}");
                    }
                }
            }
        }
    }
    eprintln!("stopping workers and nodes");
    stop_everything(&mut nodes, &mut workers).await;
    layout.workers.clear();
    for n in &mut layout.nodes {
        n.pid = None;
    }
    let _ = std::fs::write(&layout_path, serde_json::to_string_pretty(&layout)?);
    Ok(0)
}

async fn start(
    nodes: &mut LocalCluster,
    exe: &Path,
    dir: &Path,
    layout: &Layout,
    worker_count: u32,
    security: Option<&Security>,
    workers: &mut Vec<Proc>,
) -> Result<u64> {
    // Every node started and serving (the options do not initialize).
    nodes.start_all().await?;
    let leader = ensure_initialised(nodes).await?;
    let endpoints = layout.endpoints().join(",");
    for i in 1..=worker_count {
        let name = format!("worker-{i}");
        let mut spec = ProcSpec::new(&name, exe, dir.join(format!("{name}.log"))).args([
            "--endpoints".to_string(),
            endpoints.clone(),
            "worker".into(),
            "run".into(),
            "--exec".into(),
            "sh -c \"$SCHED_PAYLOAD\"".into(),
            "--id".into(),
            format!("dev-worker-{i}"),
            "--drain-grace".into(),
            "10s".into(),
        ]);
        if let Some(s) = security {
            let token = s.secret(WORKER_TOKEN).context("the dev worker token is missing")?;
            spec = spec.env("SCHED_CA_CERT", &s.pki.ca).env("SCHED_TOKEN", token);
        } else {
            spec = spec.env_remove("SCHED_CA_CERT").env_remove("SCHED_TOKEN");
        }
        spec.own_process_group = true;
        spec.term_on_parent_death = true;
        workers.push(Proc::spawn(spec)?);
    }
    Ok(leader)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_ports_are_used_when_free_else_os_ports() {
        // Find a base whose ports are free (bounded search over a high range).
        let base = (20_000u16..30_000)
            .step_by(37)
            .find(|b| (0..3).all(|i| port_free(b + i) && port_free(b + 1000 + i)));
        if let Some(base) = base {
            let l = pick_layout(3, base).unwrap();
            assert_eq!(l.nodes[0].grpc, format!("127.0.0.1:{base}"));
            assert_eq!(l.nodes[2].http, format!("127.0.0.1:{}", base + 1002));
        }
        // Occupy a preferred port: every port comes from `client::ports` instead, all distinct.
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = busy.local_addr().unwrap().port();
        let l = pick_layout(3, port).unwrap();
        let mut all: Vec<&String> = l.nodes.iter().flat_map(|n| [&n.grpc, &n.http]).collect();
        assert!(!all.contains(&&format!("127.0.0.1:{port}")));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 6);
        assert_eq!(l.nodes.iter().map(|n| n.id).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn layouts_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        assert_eq!(load_layout(&path).unwrap(), None);
        let l = Layout {
            nodes: vec![NodeAddrs {
                id: 1,
                grpc: "127.0.0.1:1".into(),
                http: "127.0.0.1:2".into(),
                pid: Some(42),
            }],
            workers: vec![WorkerPid { name: "worker-1".into(), pid: 43 }],
        };
        std::fs::write(&path, serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(load_layout(&path).unwrap(), Some(l));
    }

    #[test]
    fn schedulerd_is_found_next_to_the_executable_first() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("schedulerd");
        std::fs::write(&bin, "").unwrap();
        let exe = dir.path().join("schedctl");
        assert_eq!(client::local::find_schedulerd(Some(&exe)), Some(bin));
    }
}
