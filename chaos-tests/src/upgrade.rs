//! The checks of a rolling upgrade (`fault::ROLLING_UPGRADE`): while a member runs the older
//! release, an operation of a newer kind is refused with FAILED_PRECONDITION; once every
//! member runs this build, the same operation is accepted and the cluster version is raised;
//! and an upgraded node catches up before the next one is restarted.
//!
//! The newer kind used is pausing (then resuming) a queue no task uses, so the workload
//! never notices.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tonic::Code;

use crate::cluster::ChaosCluster;

/// The queue the checks pause and resume.
const PROBE_QUEUE: &str = "upgrade-probe";

/// A newer kind must be refused while some member is old.
pub async fn newer_kind_refused(admin: &client::Client) -> Result<()> {
    match admin.pause_queue(PROBE_QUEUE).await {
        Ok(_) => bail!("a queue pause was accepted while a member runs the older release"),
        Err(e) if e.code() == Code::FailedPrecondition => Ok(()),
        Err(e) => {
            bail!("a queue pause failed with {:?} instead of FAILED_PRECONDITION: {e}", e.code())
        }
    }
}

/// With every member upgraded, the newer kind works and the cluster runs version `to`.
pub async fn newer_kind_accepted(admin: &client::Client, to: u32) -> Result<()> {
    admin.pause_queue(PROBE_QUEUE).await.map_err(|e| anyhow!("pause after the upgrade: {e}"))?;
    admin.resume_queue(PROBE_QUEUE).await.map_err(|e| anyhow!("resume after the upgrade: {e}"))?;
    let status = admin.cluster_status().await.map_err(|e| anyhow!("cluster status: {e}"))?;
    if status.cluster_version != to {
        bail!("the cluster version is {} after the upgrade, not {to}", status.cluster_version);
    }
    if let Some(n) = status.nodes.iter().find(|n| n.command_version != to) {
        bail!("node {} reports command version {} after the upgrade", n.id, n.command_version);
    }
    Ok(())
}

/// Wait (bounded) until node `id` serves again and has applied what the leader had committed
/// when it came back.
pub async fn wait_caught_up(c: &ChaosCluster, members: &[u64], id: u64) -> Result<()> {
    let leader = c.wait_leader(members, Duration::from_secs(30)).await?;
    let target = c.node_status(leader, false).await?.committed_index;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = c.node_status(id, false).await {
            if s.applied_index >= target {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("node {id} did not catch up to index {target} within 30 s after its upgrade");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
