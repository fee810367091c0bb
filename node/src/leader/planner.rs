//! The planner loop: woken by every applied change (and at least every `planner.interval`), it
//! runs the pure [`state_machine::plan`] on the current state and proposes one `Assign` with
//! many assignments. One Assign is in flight at a time, so the next round sees the previous one
//! applied; a placement that no longer fits when applied is refused by apply's re-validation.

use std::sync::Arc;

use state_machine::{plan, Op, Output, TaskState};

use crate::Node;

/// The planner loop (see the module docs).
pub async fn run(node: Arc<Node>) {
    let policy = node.cfg.planner.policy();
    let mut applied = node.raft.sm().events().subscribe();
    let mut last_planned = None;
    loop {
        let index = *applied.borrow_and_update();
        if last_planned == Some(index) {
            tokio::select! {
                _ = applied.changed() => {}
                _ = tokio::time::sleep(node.cfg.planner.interval) => {}
            }
            continue;
        }
        last_planned = Some(index);
        let (planned_at, p, since) = node.local(|s| {
            let p = plan(s, &policy);
            let since: Vec<u64> = p
                .assignments
                .iter()
                .map(|a| match s.task(a.task).map(|t| &t.state) {
                    Some(TaskState::Queued { since }) => *since,
                    _ => 0,
                })
                .collect();
            (node.raft.sm().events().applied(), p, since)
        });
        if p.assignments.is_empty() {
            continue;
        }
        let tasks: Vec<_> = p.assignments.iter().map(|a| a.task).collect();
        match super::propose(&node, Op::Assign { assignments: p.assignments, planned_at }).await {
            Ok(Some(Output::Assigned(results))) => {
                node.metrics.record_assignments(&results, false);
                // Queue-to-assignment latency, in log time.
                node.local(|s| {
                    for ((t, r), since) in tasks.iter().zip(&results).zip(&since) {
                        if let (Ok(_), Some(TaskState::Assigned { at, .. })) =
                            (r, s.task(*t).map(|t| &t.state))
                        {
                            node.metrics.observe_assign_latency(at.saturating_sub(*since));
                        }
                    }
                });
            }
            Ok(_) => {}
            Err(()) => return,
        }
    }
}
