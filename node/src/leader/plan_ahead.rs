//! Plan-ahead: the tasks a completion releases are planned before the completion is committed,
//! so that their `Assign` rides in the completion's own log entry — a dependent step costs one
//! commit, not two. The assignments are exactly those the planner would make right after the
//! completion ([`plan_after_reports`]); apply re-validates them, and whatever it refuses is left
//! to the planner loop. [`crate::Node::propose_here`] calls it for every proposal made on the
//! leader (unless `planner.plan_ahead` is off).

use state_machine::{plan_after_reports, Op, Output, ReportKind, Response, SchedulerState};

use raft::node::now_ms;

use crate::Node;

/// Whether `op` may release dependents; only then is [`plan`] called (it needs the state's
/// read lock, which an apply in progress holds up).
pub fn considers(op: &Op) -> bool {
    // Only a completion can release dependents.
    matches!(op, Op::Report { reports, .. }
        if reports.iter().any(|r| matches!(r.outcome, ReportKind::Succeeded { .. })))
}

/// Operations to propose right after `op` in the same entry, planned on the current applied
/// state; empty for none. Runs under the state's read lock: keep it cheap.
pub fn plan(node: &Node, state: &SchedulerState, op: &Op) -> Vec<Op> {
    let Op::Report { worker, reports } = op else {
        return Vec::new();
    };
    let now = now_ms().max(state.log_time());
    let assignments = plan_after_reports(state, worker, reports, now, &node.cfg.planner.policy());
    if assignments.is_empty() {
        return Vec::new();
    }
    vec![Op::Assign { assignments, planned_at: node.raft.sm().events().applied() }]
}

/// The companions' responses once their entry is committed.
pub fn committed(node: &Node, responses: &[Response]) {
    for r in responses {
        if let Ok(Output::Assigned(results)) = r {
            node.metrics.record_assignments(results, true);
        }
    }
}
