//! Real `schedulerd` processes for chaos runs: each node has its own data dir, log file,
//! loopback source address and partition proxy; nodes can be killed (SIGKILL), paused
//! (SIGSTOP/SIGCONT), restarted on the same data dir, partitioned and healed, added and
//! removed. Everything is torn down on drop.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use proto::internal::v1 as ipb;
use proto::internal::v1::peer_service_client::PeerServiceClient;
use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use tonic::transport::Channel;

use crate::proxy::Proxy;

/// Where the `schedulerd` binary of this build lives: next to the test executable's
/// directory (`target/<profile>/`), where `cargo test --workspace` puts every binary.
pub fn schedulerd_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("SCHEDULERD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join("schedulerd");
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!(
        "schedulerd binary not found next to {}; build it with `cargo build --release -p node`",
        exe.display()
    )
}

/// Send a signal to a process.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet waited for).
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// A lazily connected channel to `addr` with a per-call deadline.
pub fn channel(addr: &str, timeout: Duration) -> Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// One node process.
pub struct NodeProc {
    /// Node id.
    pub id: u64,
    /// Where the process listens.
    pub listen: SocketAddr,
    /// The proxy address: advertised to peers and used by clients.
    pub addr: String,
    /// HTTP metrics/health address.
    pub http: SocketAddr,
    /// Loopback address its peer connections come from.
    pub source_ip: IpAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log file (appended across restarts).
    pub log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl NodeProc {
    /// True while the process runs (paused or not).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// True while SIGSTOPped.
    pub fn is_paused(&self) -> bool {
        self.paused
    }
}

fn free_addr() -> Result<SocketAddr> {
    Ok(client::ports::free_addr()?)
}

/// A cluster of node processes. See the module docs.
pub struct ChaosCluster {
    /// Nodes by id (members and removed nodes alike).
    pub nodes: BTreeMap<u64, NodeProc>,
    proxies: BTreeMap<u64, Proxy>,
    dir: PathBuf,
    bin: PathBuf,
    config: PathBuf,
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        for n in self.nodes.values_mut() {
            if let Some(mut c) = n.child.take() {
                signal(&c, libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl ChaosCluster {
    /// Prepare `n` nodes under `dir` (nothing started yet). `config` is the TOML all nodes use.
    pub async fn new(dir: &Path, n: u64, config_toml: &str) -> Result<ChaosCluster> {
        let bin = schedulerd_binary()?;
        let config = dir.join("node.toml");
        std::fs::write(&config, config_toml)?;
        let mut c = ChaosCluster {
            nodes: BTreeMap::new(),
            proxies: BTreeMap::new(),
            dir: dir.to_path_buf(),
            bin,
            config,
        };
        for id in 1..=n {
            c.add_node_proc(id).await?;
        }
        Ok(c)
    }

    /// Create (not start) the process description and proxy of node `id`.
    pub async fn add_node_proc(&mut self, id: u64) -> Result<()> {
        let listen = free_addr()?;
        let proxy = Proxy::start(listen).await?;
        let node = NodeProc {
            id,
            listen,
            addr: proxy.listen.to_string(),
            http: free_addr()?,
            source_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8)),
            data_dir: self.dir.join(format!("node-{id}")),
            log: self.dir.join(format!("node-{id}.log")),
            child: None,
            paused: false,
        };
        self.proxies.insert(id, proxy);
        self.nodes.insert(id, node);
        Ok(())
    }

    /// Start (or restart) node `id` on its data dir.
    pub fn start(&mut self, id: u64) -> Result<()> {
        let n = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        if n.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["--id", &id.to_string()])
            .args(["--listen", &n.listen.to_string()])
            .args(["--advertise", &n.addr])
            .args(["--http", &n.http.to_string()])
            .args(["--peer-source-ip", &n.source_ip.to_string()])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        n.child = Some(child);
        n.paused = false;
        Ok(())
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(mut c) = n.child.take() {
                signal(&c, libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
            n.paused = false;
        }
    }

    /// SIGSTOP node `id`.
    pub fn pause(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(c) = &n.child {
                signal(c, libc::SIGSTOP);
                n.paused = true;
            }
        }
    }

    /// SIGCONT node `id`.
    pub fn resume(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(c) = &n.child {
                signal(c, libc::SIGCONT);
            }
            n.paused = false;
        }
    }

    /// Cut every link between a node of `a` and a node of `b`, both directions.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for i in a {
            for j in b {
                if let (Some(pi), Some(pj), Some(ni), Some(nj)) =
                    (self.proxies.get(i), self.proxies.get(j), self.nodes.get(i), self.nodes.get(j))
                {
                    pj.block(ni.source_ip);
                    pi.block(nj.source_ip);
                }
            }
        }
    }

    /// Remove every partition.
    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.unblock_all();
        }
    }

    /// Client endpoints (proxy addresses) of the given nodes.
    pub fn endpoints(&self, ids: &[u64]) -> Vec<String> {
        ids.iter().filter_map(|id| self.nodes.get(id)).map(|n| n.addr.clone()).collect()
    }

    /// Initialize the cluster with `members` through the first of them.
    pub async fn init(&self, members: &[u64]) -> Result<()> {
        let list: Vec<pb::Member> = members
            .iter()
            .map(|id| pb::Member { id: *id, addr: self.nodes[id].addr.clone() })
            .collect();
        let first = &self.nodes[&members[0]].addr;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = ClusterClient::new(channel(first, Duration::from_secs(5))?);
            match c.init_cluster(pb::InitClusterRequest { members: list.clone() }).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "init not accepted yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => bail!("cluster init failed: {e}"),
            }
        }
    }

    /// Cluster status as seen by `id`.
    pub async fn status(&self, id: u64) -> Result<pb::ClusterStatusResponse> {
        let n = self.nodes.get(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        let mut c = ClusterClient::new(channel(&n.addr, Duration::from_secs(2))?);
        Ok(c.status(pb::ClusterStatusRequest {}).await?.into_inner())
    }

    /// The leader that `ids` agree on (asked one after another), if any.
    pub async fn leader(&self, ids: &[u64]) -> Option<u64> {
        for id in ids {
            if !self.nodes.get(id).is_some_and(|n| n.is_running() && !n.is_paused()) {
                continue;
            }
            if let Ok(s) = self.status(*id).await {
                if let Some(l) = s.nodes.iter().find(|n| n.reachable && n.role == "leader") {
                    return Some(l.id);
                }
            }
        }
        None
    }

    /// Wait for a leader among `ids` (bounded).
    pub async fn wait_leader(&self, ids: &[u64], within: Duration) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(l) = self.leader(ids).await {
                return Ok(l);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no leader among {ids:?} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Node status (with the state digest) straight from node `id`.
    pub async fn node_status(&self, id: u64, digest: bool) -> Result<ipb::NodeStatusReply> {
        let n = self.nodes.get(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        let mut c = PeerServiceClient::new(channel(&n.addr, Duration::from_secs(30))?);
        Ok(c.node_status(ipb::NodeStatusRequest { digest }).await?.into_inner())
    }

    /// The data directory of the run.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
