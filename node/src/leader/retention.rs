//! Retention: every `retention.purge_interval`, purges finished tasks older than
//! `retention.finished_tasks`, a bounded number per log entry.

use std::sync::Arc;

use raft::node::now_ms;
use state_machine::{Op, Output};
use tracing::debug;

use crate::Node;

/// The retention loop (see the module docs).
pub async fn run(node: Arc<Node>) {
    const LIMIT: u32 = 10_000;
    let keep = node.cfg.retention.finished_tasks.as_millis() as u64;
    loop {
        tokio::time::sleep(node.cfg.retention.purge_interval).await;
        loop {
            let cutoff = now_ms().saturating_sub(keep);
            if !node.local(|s| s.oldest_finished().is_some_and(|t| t < cutoff)) {
                break;
            }
            match super::propose(&node, Op::Purge { finished_before: cutoff, limit: LIMIT }).await {
                Ok(Some(Output::Purged { tasks, workers })) => {
                    debug!(tasks, workers, "purged finished tasks");
                    if tasks < LIMIT {
                        break;
                    }
                }
                Ok(_) => break,
                Err(()) => return,
            }
        }
    }
}
