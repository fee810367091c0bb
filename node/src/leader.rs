//! Leader-only loops. [`supervise`] watches the Raft role: when this node becomes leader (for a
//! term) it resets the leader-local soft state and starts the loops; when it stops being
//! leader it aborts them. Every loop proposes with `propose_exclusive` (its own entry, on this
//! node, never forwarded): a loop on a deposed leader simply fails and is stopped.
//!
//! * **planner**: woken by every applied change (and at least every `planner.interval`), runs
//!   the pure [`state_machine::plan`] on the current state and proposes one `Assign` with many
//!   assignments. One planner Assign is in flight at a time, so the next round sees the
//!   previous one applied. [`PlanAhead`] Assigns ride in completion entries meanwhile; a
//!   placement that no longer fits when applied is refused by apply's re-validation, never
//!   double-booked.
//! * **liveness**: expires worker sessions whose heartbeat deadline passed
//!   (see [`crate::liveness`]); only the expiry goes to the log.
//! * **timers**: proposes `AdvanceTime` when the earliest delayed task or attempt deadline is
//!   due (retry backoff, `not_before`, attempt timeouts).
//! * **retention**: purges finished tasks older than `retention.finished_tasks`.
//!
//! [`PlanAhead`] is the planner's shortcut for dependent steps: a completion that releases
//! dependents is proposed together with their `Assign`, in one entry.

use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::ServerState;
use raft::raft_node::{now_ms, CompanionHook, WriteError};
use state_machine::{
    plan, plan_after_reports, Op, Output, ReportKind, Response, SchedulerState, TaskState,
};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::Node;

/// Plans the tasks a completion releases before the completion is committed, so that their
/// `Assign` rides in the completion's own log entry: a dependent step costs one commit, not
/// two. The assignments are exactly those the planner would make right after the completion
/// (`plan_after_reports`); apply re-validates them, and whatever it refuses is left to the
/// planner loop. Installed on every node (unless `planner.plan_ahead` is off), it acts only
/// where proposals are made: the leader.
pub struct PlanAhead(pub Weak<Node>);

impl CompanionHook for PlanAhead {
    fn considers(&self, op: &Op) -> bool {
        // Only a completion can release dependents.
        matches!(op, Op::Report { reports, .. }
            if reports.iter().any(|r| matches!(r.outcome, ReportKind::Succeeded { .. })))
    }

    fn plan(&self, state: &SchedulerState, op: &Op) -> Vec<Op> {
        let (Op::Report { worker, reports }, Some(node)) = (op, self.0.upgrade()) else {
            return Vec::new();
        };
        let now = now_ms().max(state.log_time());
        let assignments =
            plan_after_reports(state, worker, reports, now, &node.cfg.planner.policy());
        if assignments.is_empty() {
            return Vec::new();
        }
        vec![Op::Assign { assignments, planned_at: node.raft.sm().events().applied() }]
    }

    fn committed(&self, responses: &[Response]) {
        let Some(node) = self.0.upgrade() else { return };
        for r in responses {
            if let Ok(Output::Assigned(results)) = r {
                node.metrics.record_assignments(results, true);
            }
        }
    }
}

/// Run the leader loops whenever this node leads. Returns when the node stops.
pub async fn supervise(node: Arc<Node>) {
    let mut metrics = node.raft.raft().metrics();
    let mut stopping = node.stopping.clone();
    let mut running: Option<(u64, JoinSet<()>)> = None;
    loop {
        let (leader, term) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.current_term)
        };
        match (&mut running, leader) {
            (Some((t, _)), true) if *t == term => {}
            (_, true) => {
                if let Some((_, mut set)) = running.take() {
                    set.abort_all();
                }
                info!(node_id = node.raft.id(), term, "became leader; starting leader loops");
                node.liveness.reset();
                let mut set = JoinSet::new();
                set.spawn(planner(node.clone()));
                set.spawn(liveness(node.clone()));
                set.spawn(timers(node.clone()));
                set.spawn(retention(node.clone()));
                running = Some((term, set));
            }
            (Some(_), false) => {
                info!(node_id = node.raft.id(), term, "lost leadership; stopping leader loops");
                if let Some((_, mut set)) = running.take() {
                    set.abort_all();
                }
            }
            (None, false) => {}
        }
        tokio::select! {
            r = metrics.changed() => if r.is_err() { break },
            _ = stopping.wait_for(|s| *s) => break,
        }
    }
    if let Some((_, mut set)) = running.take() {
        set.abort_all();
    }
}

/// Propose on this node; `Err` means "stop this loop" (no longer leader or node stopping).
async fn propose(node: &Node, op: Op) -> Result<Option<Output>, ()> {
    match node.raft.propose_exclusive(op).await {
        Ok(w) => Ok(w.response.ok()),
        Err(WriteError::Fatal(e)) => {
            warn!(error = %e, "leader loop stopped: node failed");
            Err(())
        }
        Err(WriteError::Unavailable { reason, .. }) => {
            if node.raft.is_leader() {
                // A slow commit (e.g. a follower is down and the quorum is thin): try again.
                debug!(%reason, "leader proposal not committed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(None)
            } else {
                Err(())
            }
        }
    }
}

async fn planner(node: Arc<Node>) {
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
        match propose(&node, Op::Assign { assignments: p.assignments, planned_at }).await {
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

async fn liveness(node: Arc<Node>) {
    let tick = (node.cfg.workers.heartbeat_interval / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        let expired = node.local(|s| node.liveness.expired(s, tokio::time::Instant::now()));
        for (worker, session) in expired {
            info!(%worker, session, "worker missed its heartbeats; expiring it");
            match propose(&node, Op::ExpireWorker { worker: worker.clone(), session }).await {
                Ok(Some(Output::WorkerUpdated { requeued })) => {
                    node.metrics.record_expiry(requeued.len() as u64);
                }
                Ok(_) => node.liveness.extend(&worker, tick),
                Err(()) => return,
            }
        }
    }
}

async fn timers(node: Arc<Node>) {
    let mut applied = node.raft.sm().events().subscribe();
    loop {
        let next = node.local(|s| s.next_timer());
        let now = now_ms();
        match next {
            Some(t) if t <= now => match propose(&node, Op::AdvanceTime).await {
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

async fn retention(node: Arc<Node>) {
    const LIMIT: u32 = 10_000;
    let keep = node.cfg.retention.finished_tasks.as_millis() as u64;
    loop {
        tokio::time::sleep(node.cfg.retention.purge_interval).await;
        loop {
            let cutoff = now_ms().saturating_sub(keep);
            if !node.local(|s| s.oldest_finished().is_some_and(|t| t < cutoff)) {
                break;
            }
            match propose(&node, Op::Purge { finished_before: cutoff, limit: LIMIT }).await {
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
