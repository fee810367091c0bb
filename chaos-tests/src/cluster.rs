//! Real `schedulerd` processes for chaos runs, started by the [`client::local`] harness: each
//! node has its own data dir, log file, loopback source address for its peer connections and
//! partition proxy (the address it advertises); nodes can be killed (SIGKILL), paused
//! (SIGSTOP/SIGCONT), restarted on the same data dir, partitioned and healed, added and
//! removed. Everything is torn down on drop.
//!
//! The harness owns the processes; this module adds the proxies and the partition logic, and
//! addresses nodes by id.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use client::local::{LocalCluster, LocalClusterOptions, NodeOptions};
use proto::internal::v1 as ipb;
use proto::internal::v1::peer_service_client::PeerServiceClient;
use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use tonic::transport::Channel;

use crate::proxy::Proxy;

/// A lazily connected channel to `addr` with a per-call deadline.
pub fn channel(addr: &str, timeout: Duration) -> Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(300))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// The network side of one node: the proxy in front of it and the loopback address its
/// peer connections come from.
struct Net {
    proxy: Proxy,
    source_ip: IpAddr,
}

/// A cluster of node processes. See the module docs.
pub struct ChaosCluster {
    // Dropped first: the processes die before their proxies.
    local: LocalCluster,
    net: BTreeMap<u64, Net>,
}

impl ChaosCluster {
    /// Prepare `n` nodes under `dir` (nothing started yet). `config_toml` is the TOML all
    /// nodes use.
    pub async fn new(dir: &Path, n: u64, config_toml: &str) -> Result<ChaosCluster> {
        let bin = client::local::schedulerd_for_this_exe()?;
        std::fs::create_dir_all(dir)?;
        let config = dir.join("node.toml");
        std::fs::write(&config, config_toml)?;
        let opts = LocalClusterOptions::new(bin, 0)
            .dir(dir)
            .args(["--config".to_string(), config.display().to_string()])
            .http(true);
        let mut c = ChaosCluster { local: LocalCluster::prepare(opts)?, net: BTreeMap::new() };
        for id in 1..=n {
            c.add_node_proc(id).await?;
        }
        Ok(c)
    }

    /// Create (not start) the process description and proxy of node `id`.
    pub async fn add_node_proc(&mut self, id: u64) -> Result<()> {
        let listen = client::ports::free_addr()?;
        let proxy = Proxy::start(listen).await?;
        let source_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + id as u8));
        self.local.add_node(NodeOptions {
            listen: Some(listen),
            advertise: Some(proxy.listen.to_string()),
            args: vec!["--peer-source-ip".into(), source_ip.to_string()],
            ..NodeOptions::new(id)
        })?;
        self.net.insert(id, Net { proxy, source_ip });
        Ok(())
    }

    fn index(&self, id: u64) -> Result<usize> {
        self.local.index_of(id).ok_or_else(|| anyhow!("no node {id}"))
    }

    fn indices(&self, ids: &[u64]) -> Vec<usize> {
        ids.iter().filter_map(|id| self.local.index_of(*id)).collect()
    }

    /// Start every node, initialize the cluster with all of them, and wait for a leader and
    /// for every node to be reachable.
    pub async fn start_all(&mut self) -> Result<()> {
        self.local.start_all().await.context("starting the cluster")
    }

    /// Start (or restart) node `id` on its data dir.
    pub fn start(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        Ok(self.local.start_node(i)?)
    }

    /// SIGKILL node `id`.
    pub fn kill(&mut self, id: u64) {
        if let Some(i) = self.local.index_of(id) {
            self.local.kill(i);
        }
    }

    /// SIGSTOP node `id`.
    pub fn pause(&mut self, id: u64) {
        if let Some(i) = self.local.index_of(id) {
            self.local.pause(i);
        }
    }

    /// SIGCONT node `id`.
    pub fn resume(&mut self, id: u64) {
        if let Some(i) = self.local.index_of(id) {
            self.local.resume(i);
        }
    }

    /// Cut every link between a node of `a` and a node of `b`, both directions.
    pub fn partition(&self, a: &[u64], b: &[u64]) {
        for i in a {
            for j in b {
                if let (Some(ni), Some(nj)) = (self.net.get(i), self.net.get(j)) {
                    nj.proxy.block(ni.source_ip);
                    ni.proxy.block(nj.source_ip);
                }
            }
        }
    }

    /// Remove every partition.
    pub fn heal(&self) {
        for n in self.net.values() {
            n.proxy.unblock_all();
        }
    }

    /// The client address (proxy address) of node `id`.
    pub fn addr(&self, id: u64) -> Option<&str> {
        self.local.index_of(id).map(|i| self.local.nodes[i].addr.as_str())
    }

    /// Client endpoints (proxy addresses) of the given nodes.
    pub fn endpoints(&self, ids: &[u64]) -> Vec<String> {
        ids.iter().filter_map(|id| self.addr(*id)).map(str::to_string).collect()
    }

    /// Id and address of every node that runs and is not paused.
    pub fn live(&self) -> Vec<(u64, String)> {
        self.local
            .nodes
            .iter()
            .filter(|n| n.is_running() && !n.is_paused())
            .map(|n| (n.id, n.addr.clone()))
            .collect()
    }

    /// The highest node id so far (members and removed nodes alike).
    pub fn max_id(&self) -> u64 {
        self.local.nodes.iter().map(|n| n.id).max().unwrap_or(0)
    }

    /// Cluster status as seen by `id`.
    pub async fn status(&self, id: u64) -> Result<pb::ClusterStatusResponse> {
        let addr = self.addr(id).ok_or_else(|| anyhow!("no node {id}"))?;
        let mut c = ClusterClient::new(channel(addr, Duration::from_secs(2))?);
        Ok(c.status(pb::ClusterStatusRequest {}).await?.into_inner())
    }

    /// The leader that `ids` agree on (asked one after another, running unpaused nodes
    /// only), if any.
    pub async fn leader(&self, ids: &[u64]) -> Option<u64> {
        let i = self.local.leader_among(&self.indices(ids)).await?;
        Some(self.local.nodes[i].id)
    }

    /// Wait for a leader among `ids` (bounded).
    pub async fn wait_leader(&self, ids: &[u64], within: Duration) -> Result<u64> {
        let i = self.local.wait_leader_among(&self.indices(ids), within).await?;
        Ok(self.local.nodes[i].id)
    }

    /// Node status (with the state digest) straight from node `id`.
    pub async fn node_status(&self, id: u64, digest: bool) -> Result<ipb::NodeStatusReply> {
        let addr = self.addr(id).ok_or_else(|| anyhow!("no node {id}"))?;
        let mut c = PeerServiceClient::new(channel(addr, Duration::from_secs(30))?);
        Ok(c.node_status(ipb::NodeStatusRequest { digest }).await?.into_inner())
    }

    /// Set an environment variable for node `id`'s next starts (a later value wins).
    pub fn set_env(&mut self, id: u64, key: &str, value: &str) -> Result<()> {
        let i = self.index(id)?;
        self.local.nodes[i].process_mut().spec_mut().env.push((key.into(), value.into()));
        Ok(())
    }

    /// Whether node `id`'s process is running (a paused one is).
    pub fn is_running(&self, id: u64) -> bool {
        self.local.index_of(id).is_some_and(|i| self.local.nodes[i].is_running())
    }

    /// The data directory of the run.
    pub fn dir(&self) -> &Path {
        self.local.dir()
    }
}
