//! Conversions between wire messages (`pb`) and domain types (`state_machine`).
//!
//! Wire defaults follow proto3: an empty string, zero or an unset message means "not given"
//! and maps to the domain default (queue `default`, the default retry policy, no timeout).

use std::collections::BTreeMap;

use state_machine as sm;
use state_machine::{DepRef, NewTask, Rejection, TaskStateKind};

use crate::pb;

// ----- enums ------------------------------------------------------------------------------

/// Domain state kind -> wire enum.
pub fn state_to_pb(k: TaskStateKind) -> pb::TaskState {
    match k {
        TaskStateKind::Waiting => pb::TaskState::Waiting,
        TaskStateKind::Queued => pb::TaskState::Queued,
        TaskStateKind::Delayed => pb::TaskState::Delayed,
        TaskStateKind::Assigned => pb::TaskState::Assigned,
        TaskStateKind::Running => pb::TaskState::Running,
        TaskStateKind::Succeeded => pb::TaskState::Succeeded,
        TaskStateKind::Failed => pb::TaskState::Failed,
        TaskStateKind::Cancelled => pb::TaskState::Cancelled,
        TaskStateKind::UpstreamFailed => pb::TaskState::UpstreamFailed,
    }
}

/// Wire enum value -> domain state kind; `field` names it in the error.
pub fn state_from_pb(field: &str, v: i32) -> Result<TaskStateKind, Rejection> {
    Ok(match pb::TaskState::try_from(v) {
        Ok(pb::TaskState::Waiting) => TaskStateKind::Waiting,
        Ok(pb::TaskState::Queued) => TaskStateKind::Queued,
        Ok(pb::TaskState::Delayed) => TaskStateKind::Delayed,
        Ok(pb::TaskState::Assigned) => TaskStateKind::Assigned,
        Ok(pb::TaskState::Running) => TaskStateKind::Running,
        Ok(pb::TaskState::Succeeded) => TaskStateKind::Succeeded,
        Ok(pb::TaskState::Failed) => TaskStateKind::Failed,
        Ok(pb::TaskState::Cancelled) => TaskStateKind::Cancelled,
        Ok(pb::TaskState::UpstreamFailed) => TaskStateKind::UpstreamFailed,
        _ => return Err(Rejection::invalid(field, format!("unknown task state {v}"))),
    })
}

/// Wire enum -> the lower-case name used by the CLI (`upstream_failed`).
pub fn state_name(v: i32) -> &'static str {
    state_from_pb("state", v).map(|k| k.as_str()).unwrap_or("unspecified")
}

// ----- resources and specs -------------------------------------------------------------------

/// Wire resources -> domain (unset = none).
pub fn resources_from_pb(r: Option<pb::Resources>) -> sm::Resources {
    let r = r.unwrap_or_default();
    sm::Resources {
        cpu_milli: r.cpu_milli,
        memory_mib: r.memory_mib,
        named: r.named.into_iter().filter(|(_, v)| *v > 0).collect(),
    }
}

/// Domain resources -> wire.
pub fn resources_to_pb(r: &sm::Resources) -> pb::Resources {
    pb::Resources {
        cpu_milli: r.cpu_milli,
        memory_mib: r.memory_mib,
        named: r.named.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}

/// Wire retry policy -> domain. Unset fields (and the zeros that mean "unset" on the older
/// wire fields) take the default; only an explicitly set `initial_backoff_ms = 0` means "retry
/// at once".
fn retry_from_pb(r: Option<pb::RetryPolicy>) -> sm::RetryPolicy {
    let d = sm::RetryPolicy::default();
    let Some(r) = r else { return d };
    let initial_backoff_ms = r.initial_backoff_ms.unwrap_or(d.initial_backoff_ms);
    sm::RetryPolicy {
        max_attempts: if r.max_attempts == 0 { d.max_attempts } else { r.max_attempts },
        initial_backoff_ms,
        multiplier_permille: match r.multiplier_permille {
            None | Some(0) => d.multiplier_permille,
            Some(m) => m,
        },
        max_backoff_ms: match r.max_backoff_ms {
            None | Some(0) => d.max_backoff_ms.max(initial_backoff_ms),
            Some(m) => m,
        },
    }
}

fn retry_to_pb(r: &sm::RetryPolicy) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts: r.max_attempts,
        initial_backoff_ms: Some(r.initial_backoff_ms),
        multiplier_permille: Some(r.multiplier_permille),
        max_backoff_ms: Some(r.max_backoff_ms),
    }
}

fn map(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// One wire spec -> a batch entry. Nothing here can fail: field checks are
/// `state_machine::validate`'s job, so the node and apply report them identically.
pub fn new_task_from_pb(t: pb::TaskSpec) -> NewTask {
    let mut depends_on: Vec<DepRef> =
        t.depends_on.iter().map(|id| DepRef::Id(sm::TaskId(*id))).collect();
    depends_on.extend(t.depends_on_batch.iter().map(|p| DepRef::Batch(*p)));
    NewTask {
        spec: sm::TaskSpec {
            name: t.name,
            payload: t.payload,
            queue: if t.queue.is_empty() { sm::DEFAULT_QUEUE.to_string() } else { t.queue },
            priority: t.priority,
            resources: resources_from_pb(t.resources),
            labels: map(t.labels),
            retry: retry_from_pb(t.retry),
            timeout_ms: (t.timeout_ms > 0).then_some(t.timeout_ms),
            not_before: (t.not_before_ms > 0).then_some(t.not_before_ms),
            metadata: map(t.metadata),
            idempotency_key: (!t.idempotency_key.is_empty()).then_some(t.idempotency_key),
        },
        depends_on,
        delay_ms: t.delay_ms,
    }
}

fn spec_to_pb(spec: &sm::TaskSpec, deps: &[sm::TaskId], with_payload: bool) -> pb::TaskSpec {
    pb::TaskSpec {
        name: spec.name.clone(),
        payload: if with_payload { spec.payload.clone() } else { Vec::new() },
        queue: spec.queue.clone(),
        priority: spec.priority,
        depends_on: deps.iter().map(|d| d.0).collect(),
        depends_on_batch: Vec::new(),
        resources: Some(resources_to_pb(&spec.resources)),
        labels: spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        retry: Some(retry_to_pb(&spec.retry)),
        timeout_ms: spec.timeout_ms.unwrap_or(0),
        not_before_ms: spec.not_before.unwrap_or(0),
        delay_ms: 0,
        metadata: spec.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        idempotency_key: spec.idempotency_key.clone().unwrap_or_default(),
    }
}

/// Domain failure record -> wire.
pub fn failure_to_pb(f: &sm::AttemptFailure) -> pb::AttemptFailure {
    pb::AttemptFailure {
        attempt: f.attempt,
        fence: f.fence.0,
        worker: f.worker.0.clone(),
        kind: f.kind.to_string(),
        message: f.message.clone(),
        at_ms: f.at,
    }
}

/// Domain task -> wire. Payload and result are included only when asked (lists omit them).
pub fn task_to_pb(t: &sm::Task, with_payload: bool) -> pb::Task {
    let mut out = pb::Task {
        id: t.id.0,
        spec: Some(spec_to_pb(&t.spec, &t.deps, with_payload)),
        state: state_to_pb(t.state.kind()) as i32,
        submitted_at_ms: t.submitted_at,
        updated_at_ms: t.updated_at,
        attempt: t.attempt,
        fence: t.last_fence.0,
        last_failure: t.last_failure.as_deref().map(failure_to_pb),
        ..Default::default()
    };
    match &t.state {
        sm::TaskState::Waiting | sm::TaskState::Queued { .. } => {}
        sm::TaskState::Delayed { until } => out.until_ms = *until,
        sm::TaskState::Assigned { worker, at, deadline, .. } => {
            out.worker = worker.0.clone();
            out.assigned_at_ms = *at;
            out.deadline_ms = deadline.unwrap_or(0);
        }
        sm::TaskState::Running { worker, assigned_at, started_at, deadline, .. } => {
            out.worker = worker.0.clone();
            out.assigned_at_ms = *assigned_at;
            out.started_at_ms = *started_at;
            out.deadline_ms = deadline.unwrap_or(0);
        }
        sm::TaskState::Succeeded { at, started_at, worker, result, .. } => {
            out.worker = worker.0.clone();
            out.started_at_ms = *started_at;
            out.finished_at_ms = *at;
            if with_payload {
                out.result = result.clone();
            }
        }
        sm::TaskState::Failed { at } => out.finished_at_ms = *at,
        sm::TaskState::Cancelled { at, reason } => {
            out.finished_at_ms = *at;
            out.cancel_reason = reason.clone();
        }
        sm::TaskState::UpstreamFailed { at, upstream } => {
            out.finished_at_ms = *at;
            out.upstream = upstream.0;
        }
    }
    out
}

/// Domain event -> wire.
pub fn event_to_pb(e: &sm::TaskEvent) -> pb::TaskEvent {
    pb::TaskEvent {
        task: e.task.0,
        state: state_to_pb(e.state) as i32,
        attempt: e.attempt,
        worker: e.holder.as_ref().map(|(w, _)| w.0.clone()).unwrap_or_default(),
        fence: e.holder.as_ref().map(|(_, f)| f.0).unwrap_or(0),
        revoked_worker: e.revoked_from.as_ref().map(|(w, _)| w.0.clone()).unwrap_or_default(),
        revoked_fence: e.revoked_from.as_ref().map(|(_, f)| f.0).unwrap_or(0),
    }
}

/// Domain explanation -> wire.
pub fn explanation_to_pb(t: &sm::Task, e: &sm::Explanation) -> pb::ExplainTaskResponse {
    let mut out = pb::ExplainTaskResponse {
        id: t.id.0,
        state: state_to_pb(t.state.kind()) as i32,
        summary: e.to_string(),
        attempt: t.attempt,
        fence: t.last_fence.0,
        last_failure: t.last_failure.as_deref().map(failure_to_pb),
        ..Default::default()
    };
    match e {
        sm::Explanation::Waiting { on } => out.waiting_on = on.iter().map(|d| d.0).collect(),
        sm::Explanation::Queued { ahead, blocker, .. } => {
            out.ahead = *ahead;
            out.blocker = blocker.as_ref().map(|b| b.to_string()).unwrap_or_default();
        }
        sm::Explanation::Delayed { until, .. } => out.until_ms = *until,
        sm::Explanation::Assigned { worker, .. } | sm::Explanation::Running { worker, .. } => {
            out.worker = worker.0.clone();
        }
        sm::Explanation::Finished { .. } => {}
    }
    out
}

// ----- workers ------------------------------------------------------------------------------

/// Wire worker description -> domain; a missing `worker` message is refused.
pub fn worker_spec_from_pb(w: Option<pb::WorkerSpec>) -> Result<sm::WorkerSpec, Rejection> {
    let w = w.ok_or_else(|| Rejection::invalid("worker", "is required"))?;
    Ok(sm::WorkerSpec {
        id: sm::WorkerId(w.id),
        queues: w.queues,
        labels: map(w.labels),
        capacity: resources_from_pb(w.capacity),
        slots: w.slots,
    })
}

/// Domain worker description -> wire.
pub fn worker_spec_to_pb(w: &sm::WorkerSpec) -> pb::WorkerSpec {
    pb::WorkerSpec {
        id: w.id.0.clone(),
        queues: w.queues.clone(),
        labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        capacity: Some(resources_to_pb(&w.capacity)),
        slots: w.slots,
    }
}

/// A task a worker holds -> the assignment message that (re)delivers it, with the results of
/// its dependencies read from `state` (a task is only assigned once they all succeeded).
pub fn assignment_to_pb(state: &sm::SchedulerState, t: &sm::Task) -> Option<pb::Assignment> {
    let (fence, deadline, started) = match &t.state {
        sm::TaskState::Assigned { fence, deadline, .. } => (*fence, *deadline, false),
        sm::TaskState::Running { fence, deadline, .. } => (*fence, *deadline, true),
        _ => return None,
    };
    Some(pb::Assignment {
        task: t.id.0,
        fence: fence.0,
        attempt: t.attempt,
        name: t.spec.name.clone(),
        payload: t.spec.payload.clone(),
        deadline_ms: deadline.unwrap_or(0),
        metadata: t.spec.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        started,
        dependencies: t
            .deps
            .iter()
            .filter_map(|d| match &state.task(*d)?.state {
                sm::TaskState::Succeeded { result, .. } => {
                    Some(pb::DependencyResult { task: d.0, result: result.clone() })
                }
                _ => None,
            })
            .collect(),
    })
}

/// Wire report -> domain; a report without an outcome is refused.
pub fn report_from_pb(i: usize, r: pb::TaskReport) -> Result<sm::Report, Rejection> {
    let outcome = match r.outcome {
        Some(pb::task_report::Outcome::Started(_)) => sm::ReportKind::Started,
        Some(pb::task_report::Outcome::Succeeded(s)) => {
            sm::ReportKind::Succeeded { result: s.result }
        }
        Some(pb::task_report::Outcome::Failed(f)) => {
            sm::ReportKind::Failed { message: f.message, retryable: f.retryable }
        }
        None => return Err(Rejection::invalid(format!("reports[{i}].outcome"), "is required")),
    };
    Ok(sm::Report { task: sm::TaskId(r.task), fence: sm::Fence(r.fence), outcome })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips() {
        for k in TaskStateKind::ALL {
            assert_eq!(state_from_pb("s", state_to_pb(k) as i32), Ok(k));
        }
        assert!(state_from_pb("states[0]", 0).is_err());
        assert!(state_from_pb("states[0]", 77).is_err());
    }

    #[test]
    fn wire_defaults_map_to_domain_defaults() {
        let t = new_task_from_pb(pb::TaskSpec {
            name: "x".into(),
            depends_on: vec![4],
            depends_on_batch: vec![0],
            ..Default::default()
        });
        assert_eq!(t.spec.queue, "default");
        assert_eq!(t.spec.retry, sm::RetryPolicy::default());
        assert_eq!(t.spec.timeout_ms, None);
        assert_eq!(t.spec.idempotency_key, None);
        assert_eq!(t.depends_on, vec![DepRef::Id(sm::TaskId(4)), DepRef::Batch(0)]);
    }

    #[test]
    fn unset_retry_fields_take_the_defaults() {
        let d = sm::RetryPolicy::default();
        let only_attempts =
            retry_from_pb(Some(pb::RetryPolicy { max_attempts: 5, ..Default::default() }));
        assert_eq!(only_attempts, sm::RetryPolicy { max_attempts: 5, ..d.clone() });
        let zeros = retry_from_pb(Some(pb::RetryPolicy {
            max_attempts: 0,
            initial_backoff_ms: None,
            multiplier_permille: Some(0),
            max_backoff_ms: Some(0),
        }));
        assert_eq!(zeros, d);
        let no_wait = retry_from_pb(Some(pb::RetryPolicy {
            initial_backoff_ms: Some(0),
            ..Default::default()
        }));
        assert_eq!(no_wait.initial_backoff_ms, 0, "an explicit zero is kept");
        let long = retry_from_pb(Some(pb::RetryPolicy {
            initial_backoff_ms: Some(120_000),
            ..Default::default()
        }));
        assert_eq!(long.max_backoff_ms, 120_000, "the default cap never undercuts the start");
        assert_eq!(retry_from_pb(Some(retry_to_pb(&long))), long);
    }

    #[test]
    fn task_round_trip_keeps_the_spec() {
        let mut spec = sm::TaskSpec::new("n");
        spec.payload = b"p".to_vec();
        spec.labels.insert("a".into(), "b".into());
        spec.idempotency_key = Some("k".into());
        spec.timeout_ms = Some(5);
        let task = sm::Task {
            id: sm::TaskId(3),
            spec: spec.clone(),
            deps: vec![],
            submitted_at: 1,
            updated_at: 2,
            attempt: 0,
            last_fence: sm::Fence(0),
            last_failure: None,
            state: sm::TaskState::Queued { since: 2 },
            attempt_base: 0,
        };
        let wire = task_to_pb(&task, true);
        assert_eq!(new_task_from_pb(wire.spec.unwrap()).spec, spec);
        assert_eq!(task_to_pb(&task, false).spec.unwrap().payload, Vec::<u8>::new());
    }
}
