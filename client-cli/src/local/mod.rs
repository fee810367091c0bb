//! # The local cluster harness
//!
//! One place that runs real `schedulerd` processes on loopback for `schedctl dev up`,
//! `schedctl bench`, the node and client integration tests and the chaos runs:
//!
//! * [`find_schedulerd`] locates the server binary.
//! * [`LocalClusterOptions`] says what to start: the binary, a base directory (or a temporary
//!   one), the nodes ([`NodeOptions`]: id, listen address, an advertised address that may
//!   differ — a proxy in front of the node —, an HTTP address, per-node flags), flags and
//!   environment variables for every node, and whether to initialize the cluster.
//! * [`LocalCluster`] starts the nodes, waits until each answers gRPC health checks,
//!   initializes the cluster, waits for a leader and for every node to be reachable; then it
//!   kills (SIGKILL), restarts (on the same data directory), pauses (SIGSTOP) and resumes
//!   (SIGCONT) nodes, finds the leader, reports PIDs and memory, and prints the tail of
//!   every node's log for failure messages.
//! * [`Proc`] is the process part on its own (log file, restart with the same command,
//!   pause, kill, graceful stop), also used for worker processes.
//! * [`wait_until`] and [`wait_until_blocking`] poll a condition every [`POLL_INTERVAL`] until
//!   it holds, or fail with [`Error::WaitTimeout`] naming what was waited for.
//!
//! ## Guarantees
//!
//! * Every process the harness started is SIGKILLed and reaped when its [`Proc`],
//!   [`LocalNode`] or [`LocalCluster`] is dropped, also when a test panics; a temporary base
//!   directory is removed only after that.
//! * Servers bind 127.0.0.1 only: listen and HTTP addresses are free loopback ports from
//!   [`crate::ports`] unless given, and given ones must be loopback addresses.
//! * Node `N` keeps its data in `DIR/node-N` and appends its output to `DIR/node-N.log`
//!   across restarts.
//! * Every wait is bounded; a node that exits during startup fails the start with the end of
//!   its log ([`Error::Exited`]).

mod process;
mod wait;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::pb;

pub use process::{stop_gracefully, Proc, ProcSpec};
pub use wait::{wait_until, wait_until_blocking, Condition, POLL_INTERVAL};

use crate::client::{Client, ClientConfig};
use crate::pki::{DevCa, PkiFiles, TokenSpec};
use crate::Error;

/// Finds `schedulerd`: in the directory of `exe` or any of its parents (cargo puts every
/// binary of a workspace in `target/<profile>/`, one level above test executables), then
/// `$SCHEDULERD_BIN`, then `PATH`.
pub fn find_schedulerd(exe: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = exe.and_then(Path::parent) {
        if let Some(p) = dir.ancestors().map(|d| d.join("schedulerd")).find(|p| p.is_file()) {
            return Some(p);
        }
    }
    if let Some(p) = std::env::var_os("SCHEDULERD_BIN").map(PathBuf::from) {
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|d| d.join("schedulerd")).find(|p| p.is_file())
    })
}

/// [`find_schedulerd`] from the running executable, or a [`Error::Config`] saying how to
/// provide the binary.
pub fn schedulerd_for_this_exe() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe().ok();
    find_schedulerd(exe.as_deref()).ok_or_else(|| {
        Error::Config(format!(
            "schedulerd not found near {}, in $SCHEDULERD_BIN or on PATH; build it with \
             `cargo build --release -p node`",
            exe.as_deref().map_or("this executable".into(), |e| e.display().to_string())
        ))
    })
}

/// The free-space floor of local clusters (see [`LocalClusterOptions::new`]).
pub const LOCAL_MIN_FREE_DISK: &str = "64MiB";

/// One node to start.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Node id (> 0, unique in the cluster).
    pub id: u64,
    /// Where it listens for gRPC (a loopback address); a free port when `None`.
    pub listen: Option<SocketAddr>,
    /// The address peers and clients use (`--advertise`), e.g. a proxy in front of the
    /// node; the listen address when `None`.
    pub advertise: Option<String>,
    /// Its HTTP (metrics, health) address (a loopback address). When `None` it gets a free
    /// port if `LocalClusterOptions::http` is set, else no `--http` flag.
    pub http: Option<SocketAddr>,
    /// Flags for this node only (after the cluster-wide ones).
    pub args: Vec<String>,
}

impl NodeOptions {
    /// Node `id` with every address chosen by the harness.
    pub fn new(id: u64) -> Self {
        NodeOptions { id, listen: None, advertise: None, http: None, args: Vec::new() }
    }
}

/// What [`LocalCluster::start`] starts.
#[derive(Clone, Debug)]
pub struct LocalClusterOptions {
    /// The `schedulerd` binary.
    pub binary: PathBuf,
    /// Base directory for data and logs (created if missing); a temporary directory, removed
    /// on drop, when `None`.
    pub dir: Option<PathBuf>,
    /// The nodes, in the order of [`LocalCluster::nodes`].
    pub nodes: Vec<NodeOptions>,
    /// Flags for every node (after `--id`, `--listen`, `--data-dir` and friends).
    pub args: Vec<String>,
    /// Environment variables for every node (`SCHED_LOG`, ...).
    pub env: Vec<(String, String)>,
    /// Give every node without an explicit HTTP address a free loopback HTTP port.
    pub http: bool,
    /// Give every node a separate free loopback port for peer RPCs (`--peer-listen`).
    pub peer_ports: bool,
    /// Initialize the cluster with all nodes as voters, wait for a leader and for every
    /// node to be reachable. Without it, `start` returns once every node serves.
    pub init: bool,
    /// Run each node in its own process group and SIGTERM it when the starting thread dies
    /// (see [`ProcSpec`]); for clusters that outlive a terminal's Ctrl-C handling.
    pub detached: bool,
    /// Bound of every startup wait (serving, init, leader, reachability).
    pub startup_timeout: Duration,
    /// Run with TLS and tokens ([`Security`]): an `admin` token plus these.
    pub secure: Option<Vec<TokenSpec>>,
    /// Run with these existing credentials (takes precedence over `secure`).
    pub security: Option<Security>,
}

impl LocalClusterOptions {
    /// Nodes `1..=n` of `binary` on free ports in a temporary directory, initialized.
    ///
    /// Local nodes keep a free-space floor of [`LOCAL_MIN_FREE_DISK`] instead of the server's
    /// production default (unless `SCHED_MIN_FREE_DISK` is set, or a node gets
    /// `--min-free-disk`), so a trial or test cluster on a nearly full disk still takes
    /// submits.
    pub fn new(binary: impl Into<PathBuf>, n: u64) -> Self {
        let env = match std::env::var_os("SCHED_MIN_FREE_DISK") {
            Some(_) => Vec::new(),
            None => vec![("SCHED_MIN_FREE_DISK".to_string(), LOCAL_MIN_FREE_DISK.to_string())],
        };
        LocalClusterOptions {
            binary: binary.into(),
            dir: None,
            nodes: (1..=n).map(NodeOptions::new).collect(),
            args: Vec::new(),
            env,
            http: false,
            peer_ports: false,
            init: true,
            detached: false,
            startup_timeout: Duration::from_secs(30),
            secure: None,
            security: None,
        }
    }

    /// Runs the cluster with credentials made before (e.g. [`Security::load_or_create`]).
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = Some(security);
        self
    }

    /// Runs the cluster with TLS (a development CA and node certificate) and a token file
    /// holding an `admin` token and `tokens`; the harness's own calls use the admin token.
    pub fn secure(mut self, tokens: impl IntoIterator<Item = TokenSpec>) -> Self {
        self.secure = Some(tokens.into_iter().collect());
        self
    }

    /// Keeps data and logs under `dir`.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Adds flags for every node.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for every node.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the `http` field: free HTTP ports for nodes without one.
    pub fn http(mut self, on: bool) -> Self {
        self.http = on;
        self
    }

    /// Sets the `peer_ports` field: a separate peer port per node.
    pub fn peer_ports(mut self, on: bool) -> Self {
        self.peer_ports = on;
        self
    }

    /// Sets the `init` field: initialize the cluster at start.
    pub fn init(mut self, on: bool) -> Self {
        self.init = on;
        self
    }

    /// Sets the `detached` field: own process groups, SIGTERM on parent death.
    pub fn detached(mut self, on: bool) -> Self {
        self.detached = on;
        self
    }

    /// Sets the `startup_timeout` field.
    pub fn startup_timeout(mut self, within: Duration) -> Self {
        self.startup_timeout = within;
        self
    }
}

/// One node process of a [`LocalCluster`].
#[derive(Debug)]
pub struct LocalNode {
    /// Node id.
    pub id: u64,
    /// The address clients and peers use (the advertised address).
    pub addr: String,
    /// Where the process listens for gRPC.
    pub listen: SocketAddr,
    /// Its HTTP address, when it has one.
    pub http: Option<String>,
    /// Its peer address (`--peer-listen`), when it has one.
    pub peer_addr: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    proc: Proc,
}

impl LocalNode {
    /// True from a start until a kill or an observed exit (paused nodes run).
    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// True while SIGSTOPped.
    pub fn is_paused(&self) -> bool {
        self.proc.is_paused()
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// Resident memory of the process in bytes (Linux), while running.
    pub fn rss_bytes(&self) -> Option<u64> {
        self.proc.rss_bytes()
    }

    /// Its log file (appended to across restarts).
    pub fn log(&self) -> &Path {
        self.proc.log()
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    /// The process.
    pub fn process(&self) -> &Proc {
        &self.proc
    }

    /// The process, to start, signal or check it directly.
    pub fn process_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// A cluster of local node processes. See the module docs.
#[derive(Debug)]
pub struct LocalCluster {
    /// The nodes in the order they were added; methods take indices into this list.
    /// Dropping a node kills its process.
    pub nodes: Vec<LocalNode>,
    dir: PathBuf,
    opts: LocalClusterOptions,
    security: Option<Security>,
    _temp: Option<tempfile::TempDir>,
}

/// The credentials of a secure local cluster: where its certificates and token file are,
/// and the secrets of its tokens (by name).
#[derive(Clone)]
pub struct Security {
    /// CA, node certificate and key.
    pub pki: PkiFiles,
    /// The token file the nodes load.
    pub tokens_file: PathBuf,
    /// The CA itself, to issue more certificates (clients, rotations); only when the
    /// credentials were made in this process (the CA key is never written to disk).
    pub ca: Option<std::sync::Arc<DevCa>>,
    secrets: Vec<(String, String)>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("pki", &self.pki)
            .field("tokens_file", &self.tokens_file)
            .finish_non_exhaustive()
    }
}

impl Security {
    /// The credentials written under `dir` before, or new ones (see [`Security::create`])
    /// if any file is missing.
    pub fn load_or_create(dir: &Path, tokens: &[TokenSpec]) -> Result<Security, Error> {
        let pki = PkiFiles {
            ca: dir.join("pki").join("ca.pem"),
            cert: dir.join("pki").join("node.pem"),
            key: dir.join("pki").join("node-key.pem"),
        };
        let tokens_file = dir.join("tokens.toml");
        let names: Vec<String> = std::iter::once("admin".to_string())
            .chain(tokens.iter().map(|t| t.name.clone()))
            .collect();
        let complete = [&pki.ca, &pki.cert, &pki.key, &tokens_file].iter().all(|p| p.is_file())
            && names.iter().all(|n| Security::secret_file(dir, n).is_file());
        if !complete {
            return Security::create(dir, tokens);
        }
        let mut secrets = Vec::new();
        for n in names {
            let path = Security::secret_file(dir, &n);
            let s = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                what: format!("reading {}", path.display()),
                source,
            })?;
            secrets.push((n, s.trim().to_string()));
        }
        Ok(Security { pki, tokens_file, ca: None, secrets })
    }

    /// Where the secret of token `name` is kept (mode 0600): `DIR/<name>.token`.
    pub fn secret_file(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.token"))
    }

    /// Makes a CA, a node certificate and a token file (an `admin` token plus `tokens`)
    /// under `dir`, each token's secret in [`Security::secret_file`].
    pub fn create(dir: &Path, tokens: &[TokenSpec]) -> Result<Security, Error> {
        let ca = DevCa::new("raftsched development CA")?;
        let pki = ca.write_node_files(&dir.join("pki"), &[])?;
        let mut file = String::from("# Tokens of a local development cluster.\n");
        let mut secrets = Vec::new();
        let admin = TokenSpec::new("admin", "admin");
        for t in std::iter::once(&admin).chain(tokens) {
            let (secret, entry) = t.generate()?;
            file.push('\n');
            file.push_str(&entry);
            crate::pki::write_private(&Security::secret_file(dir, &t.name), &secret)?;
            secrets.push((t.name.clone(), secret));
        }
        let tokens_file = dir.join("tokens.toml");
        crate::pki::write_private(&tokens_file, &file)?;
        Ok(Security { pki, tokens_file, ca: Some(std::sync::Arc::new(ca)), secrets })
    }

    /// The secret of token `name`.
    pub fn secret(&self, name: &str) -> Option<&str> {
        self.secrets.iter().find(|(n, _)| n == name).map(|(_, s)| s.as_str())
    }

    /// The flags that make a node use these credentials.
    pub fn node_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--tls-cert".into(),
            self.pki.cert.clone().into(),
            "--tls-key".into(),
            self.pki.key.clone().into(),
            "--tls-ca".into(),
            self.pki.ca.clone().into(),
            "--auth-tokens".into(),
            self.tokens_file.clone().into(),
        ]
    }

    /// A client configuration for `endpoints` that trusts the CA and sends token `token`
    /// (none when `None` or unknown).
    pub fn client_config(&self, endpoints: &[String], token: Option<&str>) -> ClientConfig {
        ClientConfig {
            ca_cert: Some(self.pki.ca.clone()),
            token: token.and_then(|t| self.secret(t)).map(str::to_string),
            ..ClientConfig::new(endpoints.iter().cloned())
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Before the temporary directory goes (fields are dropped after this).
        self.kill_all();
    }
}

fn loopback(id: u64, what: &str, a: SocketAddr) -> Result<SocketAddr, Error> {
    if a.ip().is_loopback() {
        Ok(a)
    } else {
        Err(Error::Config(format!("node {id}: {what} address {a} is not a loopback address")))
    }
}

fn free_addr() -> Result<SocketAddr, Error> {
    crate::ports::free_addr()
        .map_err(|source| Error::Io { what: "finding a free loopback port".into(), source })
}

/// Whether the gRPC server at `addr` answers: any answer of its health service counts.
/// With `ca` (PEM), over TLS verified against it.
async fn serving(addr: &str, ca: Option<&[u8]>) -> bool {
    let Ok(endpoint) = crate::client::node_endpoint(addr, ca) else { return false };
    let endpoint = endpoint.connect_timeout(Duration::from_secs(1)).timeout(Duration::from_secs(2));
    let Ok(ch) = endpoint.connect().await else { return false };
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
    match health.check(req).await {
        Ok(_) => true,
        // "Unknown service" and the like are answers too; transport failures are not.
        Err(s) => matches!(Error::from_status(s, addr), Error::Status { .. }),
    }
}

/// Runs `f` to completion on a private current-thread runtime (for synchronous callers).
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, Error> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::Config(
            "a blocking harness call was made inside an async runtime; use the async one".into(),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io { what: "building a runtime".into(), source })?;
    Ok(rt.block_on(f))
}

impl LocalCluster {
    /// Prepares the nodes of `opts` (directories, ports; nothing is started).
    pub fn prepare(opts: LocalClusterOptions) -> Result<LocalCluster, Error> {
        let (dir, temp) = match &opts.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|source| Error::Io {
                    what: format!("creating {}", d.display()),
                    source,
                })?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("raftsched-local-").tempdir().map_err(
                    |source| Error::Io { what: "creating a temporary directory".into(), source },
                )?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let nodes = opts.nodes.clone();
        let security = match (&opts.security, &opts.secure) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(tokens)) => Some(Security::create(&dir, tokens)?),
            (None, None) => None,
        };
        let mut c = LocalCluster { nodes: Vec::new(), dir, opts, security, _temp: temp };
        for n in nodes {
            c.add_node(n)?;
        }
        Ok(c)
    }

    /// Starts the nodes of `opts` and waits until each serves; with
    /// `LocalClusterOptions::init`, also initializes the cluster, waits for a leader and
    /// for every node to be reachable. Whatever was started is killed if this fails.
    pub async fn start(opts: LocalClusterOptions) -> Result<LocalCluster, Error> {
        let mut c = LocalCluster::prepare(opts)?;
        c.start_all().await?;
        Ok(c)
    }

    /// The second half of [`LocalCluster::start`] for a [`LocalCluster::prepare`]d cluster:
    /// starts every node, waits until each serves and, with `LocalClusterOptions::init`,
    /// initializes the cluster and waits for a leader and for every node to be reachable.
    pub async fn start_all(&mut self) -> Result<(), Error> {
        let within = self.opts.startup_timeout;
        for i in 0..self.nodes.len() {
            self.start_node(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_serving(i, within).await?;
        }
        if self.opts.init {
            self.init().await?;
            self.wait_leader(within).await?;
            self.wait_all_reachable(within).await?;
        }
        Ok(())
    }

    /// [`LocalCluster::start`] for synchronous callers (not from inside an async runtime).
    pub fn start_blocking(opts: LocalClusterOptions) -> Result<LocalCluster, Error> {
        block_on(LocalCluster::start(opts))?
    }

    /// Adds a node (not started); returns its index.
    pub fn add_node(&mut self, n: NodeOptions) -> Result<usize, Error> {
        if n.id == 0 || self.nodes.iter().any(|x| x.id == n.id) {
            return Err(Error::Config(format!("node id {} is 0 or used twice", n.id)));
        }
        let id = n.id;
        let listen = match n.listen {
            Some(a) => loopback(id, "listen", a)?,
            None => free_addr()?,
        };
        let http = match n.http {
            Some(a) => Some(loopback(id, "HTTP", a)?),
            None if self.opts.http => Some(free_addr()?),
            None => None,
        };
        let addr = n.advertise.clone().unwrap_or_else(|| listen.to_string());
        let data_dir = self.dir.join(format!("node-{id}"));
        let mut spec = ProcSpec::new(
            format!("node {id}"),
            &self.opts.binary,
            self.dir.join(format!("node-{id}.log")),
        )
        .args(["--id".to_string(), id.to_string(), "--listen".into(), listen.to_string()])
        .args([std::ffi::OsString::from("--data-dir"), data_dir.clone().into()]);
        if n.advertise.is_some() {
            spec = spec.args(["--advertise", &addr]);
        }
        if let Some(h) = http {
            spec = spec.args(["--http".to_string(), h.to_string()]);
        }
        let peer_addr = match self.opts.peer_ports {
            true => Some(free_addr()?.to_string()),
            false => None,
        };
        if let Some(p) = &peer_addr {
            spec = spec.args(["--peer-listen", p]);
        }
        if let Some(s) = &self.security {
            spec = spec.args(s.node_args());
        }
        spec = spec.args(&self.opts.args).args(&n.args);
        for (k, v) in &self.opts.env {
            spec = spec.env(k, v);
        }
        spec.own_process_group = self.opts.detached;
        spec.term_on_parent_death = self.opts.detached;
        self.nodes.push(LocalNode {
            id,
            addr,
            listen,
            http: http.map(|h| h.to_string()),
            peer_addr,
            data_dir,
            proc: Proc::new(spec),
        });
        Ok(self.nodes.len() - 1)
    }

    /// The credentials, when the cluster runs secure.
    pub fn security(&self) -> Option<&Security> {
        self.security.as_ref()
    }

    /// A client for `endpoints` as the harness calls the cluster (admin token and CA when
    /// secure).
    pub fn client(&self, endpoints: &[String]) -> Result<Client, Error> {
        match &self.security {
            Some(s) => Client::with_config(s.client_config(endpoints, Some("admin"))),
            None => Client::new(endpoints.iter().cloned()),
        }
    }

    /// The base directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The index of node `id`.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut LocalNode, Error> {
        let len = self.nodes.len();
        self.nodes
            .get_mut(i)
            .ok_or_else(|| Error::Config(format!("no node at index {i} (the cluster has {len})")))
    }

    /// (Re)starts node `i` on its data directory; a no-op while it runs. Does not wait for
    /// it to serve ([`LocalCluster::wait_serving`]).
    pub fn start_node(&mut self, i: usize) -> Result<(), Error> {
        self.node_mut(i)?.proc.start()
    }

    /// SIGKILLs node `i` (a no-op if it does not run or does not exist).
    pub fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.proc.kill();
        }
    }

    /// SIGKILLs every node.
    pub fn kill_all(&mut self) {
        for n in &mut self.nodes {
            n.proc.kill();
        }
    }

    /// SIGSTOPs node `i`.
    pub fn pause(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.proc.pause();
        }
    }

    /// SIGCONTs node `i`.
    pub fn resume(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.proc.resume();
        }
    }

    /// SIGTERMs every node, SIGKILLs those still running after `grace`; returns the names of
    /// those killed.
    pub async fn stop_gracefully(&mut self, grace: Duration) -> Vec<String> {
        let mut procs: Vec<&mut Proc> = self.nodes.iter_mut().map(|n| &mut n.proc).collect();
        stop_gracefully(&mut procs, grace).await
    }

    /// Waits until node `i` answers gRPC health checks; [`Error::Exited`] if it exits first.
    pub async fn wait_serving(&mut self, i: usize, within: Duration) -> Result<(), Error> {
        let ca = match &self.security {
            Some(s) => Some(std::fs::read(&s.pki.ca).map_err(|source| Error::Io {
                what: format!("reading {}", s.pki.ca.display()),
                source,
            })?),
            None => None,
        };
        let node = self.node_mut(i)?;
        let addr = node.addr.clone();
        let what = format!("node {} to serve at {addr} (log: {})", node.id, node.log().display());
        wait_until(&what, within, || {
            let exited = node.proc.check_running();
            let addr = addr.clone();
            let ca = ca.clone();
            async move {
                match exited {
                    Err(e) => Some(Err(e)),
                    Ok(()) => serving(&addr, ca.as_deref()).await.then_some(Ok(())),
                }
            }
        })
        .await?
    }

    /// Addresses of the running nodes.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.is_running()).map(|n| n.addr.clone()).collect()
    }

    /// Initializes the cluster with every node as a voter, through the first node (retried
    /// while it is unavailable, within the startup timeout).
    pub async fn init(&self) -> Result<(), Error> {
        let first = self.nodes.first().ok_or_else(|| Error::Config("no nodes".into()))?;
        let members: Vec<pb::Member> = self
            .nodes
            .iter()
            .map(|n| pb::Member {
                id: n.id,
                addr: n.addr.clone(),
                peer_addr: n.peer_addr.clone().unwrap_or_default(),
            })
            .collect();
        self.client(std::slice::from_ref(&first.addr))?
            .with_retry_budget(self.opts.startup_timeout)
            .init_cluster(members)
            .await?;
        Ok(())
    }

    /// The index of the leader according to the first of the nodes at `among` that answers
    /// (running, unpaused nodes only), if it knows a reachable leader that runs.
    pub async fn leader_among(&self, among: &[usize]) -> Option<usize> {
        for n in among.iter().filter_map(|i| self.nodes.get(*i)) {
            if !n.is_running() || n.is_paused() {
                continue;
            }
            let Ok(c) = self.client(std::slice::from_ref(&n.addr)) else { continue };
            let c = c.with_retry_budget(Duration::ZERO).with_call_timeout(Duration::from_secs(1));
            if let Ok(s) = c.cluster_status().await {
                let leader = s.nodes.iter().find(|x| x.reachable && x.role == "leader")?;
                return self.nodes.iter().position(|x| x.id == leader.id && x.is_running());
            }
        }
        None
    }

    /// [`LocalCluster::leader_among`] all nodes.
    pub async fn leader(&self) -> Option<usize> {
        self.leader_among(&(0..self.nodes.len()).collect::<Vec<_>>()).await
    }

    /// Waits for [`LocalCluster::leader_among`] to know a leader.
    pub async fn wait_leader_among(
        &self,
        among: &[usize],
        within: Duration,
    ) -> Result<usize, Error> {
        let ids: Vec<u64> = among.iter().filter_map(|i| self.nodes.get(*i)).map(|n| n.id).collect();
        wait_until(&format!("a leader among nodes {ids:?}"), within, || self.leader_among(among))
            .await
    }

    /// Waits for [`LocalCluster::leader`] to know a leader.
    pub async fn wait_leader(&self, within: Duration) -> Result<usize, Error> {
        wait_until("a leader", within, || self.leader()).await
    }

    /// [`LocalCluster::wait_leader`] for synchronous callers (not from inside an async
    /// runtime).
    pub fn wait_leader_blocking(&self, within: Duration) -> Result<usize, Error> {
        block_on(self.wait_leader(within))?
    }

    /// Waits until the first node's cluster status shows every node reachable.
    pub async fn wait_all_reachable(&self, within: Duration) -> Result<(), Error> {
        let first = self.nodes.first().ok_or_else(|| Error::Config("no nodes".into()))?;
        let client = self
            .client(std::slice::from_ref(&first.addr))?
            .with_retry_budget(Duration::ZERO)
            .with_call_timeout(Duration::from_secs(1));
        let n = self.nodes.len();
        wait_until("every node to be reachable", within, || async {
            client
                .cluster_status()
                .await
                .is_ok_and(|s| s.nodes.iter().filter(|x| x.reachable).count() == n)
        })
        .await
    }

    /// The last `lines` lines of every node's log, each under a header, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!(
                "--- node {} log ({}), last {lines} lines ---\n",
                n.id,
                n.log().display()
            ));
            let tail = n.log_tail(lines);
            if !tail.is_empty() {
                out.push_str(&tail);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedulerd_is_found_next_to_the_executable_or_above_it() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("schedulerd");
        std::fs::write(&bin, "").unwrap();
        assert_eq!(find_schedulerd(Some(&dir.path().join("schedctl"))), Some(bin.clone()));
        let deps = dir.path().join("deps");
        std::fs::create_dir(&deps).unwrap();
        assert_eq!(find_schedulerd(Some(&deps.join("test-123"))), Some(bin));
    }

    #[test]
    fn nodes_get_loopback_addresses_flags_and_their_own_directories() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LocalClusterOptions::new("/bin/true", 2)
            .dir(dir.path())
            .http(true)
            .args(["--config", "c.toml"])
            .env("SCHED_LOG", "debug");
        opts.nodes[1].advertise = Some("127.0.0.1:1".into());
        opts.nodes[1].args = vec!["--peer-source-ip".into(), "127.0.0.12".into()];
        let c = LocalCluster::prepare(opts).unwrap();
        assert!(c.nodes.iter().all(|n| n.listen.ip().is_loopback() && n.http.is_some()));
        assert_eq!(c.nodes[0].addr, c.nodes[0].listen.to_string());
        assert_eq!(c.nodes[1].addr, "127.0.0.1:1");
        assert_eq!(c.nodes[1].data_dir, dir.path().join("node-2"));
        assert_eq!(c.nodes[1].log(), dir.path().join("node-2.log"));
        let spec = c.nodes[1].process().spec();
        let args: Vec<String> = spec.args.iter().map(|a| a.to_string_lossy().into()).collect();
        let at = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
        assert_eq!(at("--id"), "2");
        assert_eq!(at("--advertise"), "127.0.0.1:1");
        assert_eq!(at("--config"), "c.toml");
        assert_eq!(at("--peer-source-ip"), "127.0.0.12");
        assert!(spec.env.contains(&("SCHED_LOG".into(), "debug".into())), "{:?}", spec.env);
        if std::env::var_os("SCHED_MIN_FREE_DISK").is_none() {
            let floor = ("SCHED_MIN_FREE_DISK".into(), LOCAL_MIN_FREE_DISK.into());
            assert!(spec.env.contains(&floor), "{:?}", spec.env);
        }
        assert_eq!(c.index_of(2), Some(1));
        assert!(c.endpoints().is_empty(), "nothing started");
    }

    #[test]
    fn non_loopback_addresses_and_duplicate_ids_are_refused() {
        let mut opts = LocalClusterOptions::new("/bin/true", 1);
        opts.nodes[0].listen = Some("0.0.0.0:7000".parse().unwrap());
        let e = LocalCluster::prepare(opts).unwrap_err();
        assert!(e.to_string().contains("0.0.0.0:7000 is not a loopback address"), "{e}");
        let mut c = LocalCluster::prepare(LocalClusterOptions::new("/bin/true", 1)).unwrap();
        assert!(c.add_node(NodeOptions::new(1)).is_err());
        assert_eq!(c.add_node(NodeOptions::new(7)).unwrap(), 1);
    }

    #[test]
    fn a_node_that_exits_at_startup_fails_the_start_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-schedulerd");
        std::fs::write(&script, "#!/bin/sh\necho \"bad args: $*\" >&2\nexit 2\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let e = LocalCluster::start_blocking(
            LocalClusterOptions::new(&script, 1).startup_timeout(Duration::from_secs(20)),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Exited { .. }), "{e:?}");
        assert!(e.to_string().contains("bad args: --id 1 --listen 127.0.0.1:"), "{e}");
    }

    #[test]
    fn the_temporary_directory_goes_with_the_cluster() {
        let c = LocalCluster::prepare(LocalClusterOptions::new("/bin/true", 1)).unwrap();
        let dir = c.dir().to_path_buf();
        assert!(dir.is_dir());
        drop(c);
        assert!(!dir.exists());
    }
}
