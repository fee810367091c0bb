//! A local cluster of real `schedulerd` processes on loopback, for benchmarks and tests:
//! start, initialize, find the leader, kill and restart nodes, read their memory use.
//! Everything it started is killed when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::pb;

use crate::client::Client;
use crate::Error;

/// Finds `schedulerd`: next to `exe` (cargo puts every binary of the workspace in one
/// directory), then `$SCHEDULERD_BIN`, then `PATH`.
pub fn find_schedulerd(exe: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = exe.and_then(Path::parent) {
        let p = dir.join("schedulerd");
        if p.is_file() {
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

/// One node process.
pub struct LocalNode {
    /// Node id.
    pub id: u64,
    /// gRPC address.
    pub addr: String,
    /// Data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl LocalNode {
    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory of the process in bytes (Linux), while running.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// A cluster of local node processes.
pub struct LocalCluster {
    /// The nodes, in id order.
    pub nodes: Vec<LocalNode>,
    bin: PathBuf,
    extra: Vec<String>,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn io(e: std::io::Error) -> Error {
    Error::Config(e.to_string())
}

impl LocalCluster {
    /// Start `n` nodes with data under `dir` (passing `extra` flags to each), initialize the
    /// cluster and wait for a leader.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        n: u64,
        extra: &[String],
    ) -> Result<LocalCluster, Error> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut c =
            LocalCluster { nodes: Vec::new(), bin: bin.to_path_buf(), extra: extra.to_vec() };
        for id in 1..=n {
            c.nodes.push(LocalNode {
                id,
                addr: crate::ports::free_addr().map_err(io)?.to_string(),
                data_dir: dir.join(format!("node-{id}")),
                log: dir.join(format!("node-{id}.log")),
                child: None,
            });
        }
        for i in 0..c.nodes.len() {
            c.start_node(i)?;
        }
        let members: Vec<pb::Member> =
            c.nodes.iter().map(|n| pb::Member { id: n.id, addr: n.addr.clone() }).collect();
        let client =
            Client::new([c.nodes[0].addr.clone()])?.with_retry_budget(Duration::from_secs(30));
        client.init_cluster(members).await?;
        c.wait_leader(Duration::from_secs(30)).await?;
        Ok(c)
    }

    /// (Re)start node `i` on its data directory.
    pub fn start_node(&mut self, i: usize) -> Result<(), Error> {
        let n = &mut self.nodes[i];
        if n.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log).map_err(io)?;
        let child = Command::new(&self.bin)
            .args(["--id", &n.id.to_string(), "--listen", &n.addr])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io)?;
        n.child = Some(child);
        Ok(())
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Addresses of the running nodes.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.addr.clone()).collect()
    }

    /// The index of the leader according to a running node, if one is known.
    pub async fn leader(&self) -> Option<usize> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(c) = Client::new([n.addr.clone()]) else { continue };
            let c = c.with_retry_budget(Duration::ZERO).with_call_timeout(Duration::from_secs(1));
            if let Ok(s) = c.cluster_status().await {
                let leader = s.nodes.iter().find(|x| x.reachable && x.role == "leader")?;
                return self.nodes.iter().position(|x| x.id == leader.id && x.child.is_some());
            }
        }
        None
    }

    /// Wait for a leader.
    pub async fn wait_leader(&self, within: Duration) -> Result<usize, Error> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() > deadline {
                return Err(Error::Config(format!("no leader within {within:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
