//! Time-based transitions: proposes `AdvanceTime` when the earliest delayed task or attempt
//! deadline is due (retry backoff, `not_before`, attempt timeouts). The clock goes into the
//! command, so apply stays deterministic.

use std::sync::Arc;
use std::time::Duration;

use raft::node::now_ms;
use state_machine::Op;

use crate::Node;

/// The timer loop (see the module docs).
pub async fn run(node: Arc<Node>) {
    let mut applied = node.raft.sm().events().subscribe();
    loop {
        let next = node.local(|s| s.next_timer());
        let now = now_ms();
        match next {
            Some(t) if t <= now => match super::propose(&node, Op::AdvanceTime).await {
                Ok(_) => continue,
                Err(()) => return,
            },
            Some(t) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis((t - now).min(1_000))) => {}
                    _ = applied.changed() => {}
                }
            }
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = applied.changed() => {}
                }
            }
        }
    }
}
