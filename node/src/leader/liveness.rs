//! Worker liveness, judged by the leader.
//!
//! Heartbeats are leader-local soft state (a deadline per worker session), never log entries:
//! only the leader's decision that a session expired is written ([`Op::ExpireWorker`]). A new
//! leader knows no deadlines, so every live worker it finds in the state gets a bounded grace
//! period to reach it — a leader change by itself expires nobody, and a worker that really died
//! during the failover is still noticed within `grace` (not minutes).
//!
//! Heartbeats reach the leader directly or passed on by a follower ([`crate::route`]); the
//! [`run`] loop proposes the expiries.
//!
//! [`Op::ExpireWorker`]: state_machine::Op::ExpireWorker

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use state_machine::{Op, Output};
use state_machine::{Rejection, SchedulerState, WorkerId, WorkerStatus};
use tokio::time::Instant;
use tracing::info;

use crate::error::NodeError;
use crate::Node;

/// Deadlines per worker session.
pub struct Liveness {
    deadlines: Mutex<HashMap<WorkerId, (u64, Instant)>>,
    ttl: Duration,
    grace: Duration,
}

impl Liveness {
    /// Empty: sessions seen for the first time get `grace`; heartbeats extend by `ttl`.
    pub fn new(ttl: Duration, grace: Duration) -> Self {
        Liveness { deadlines: Mutex::new(HashMap::new()), ttl, grace }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, (u64, Instant)>> {
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget everything (this node just became leader).
    pub fn reset(&self) {
        self.lock().clear();
    }

    /// Record a heartbeat of `worker`'s `session`: returns whether it is draining. A session
    /// that is not the worker's current live one is refused, so the worker registers again.
    pub fn heartbeat(
        &self,
        state: &SchedulerState,
        worker: &str,
        session: u64,
    ) -> Result<bool, NodeError> {
        let id = WorkerId(worker.to_string());
        let w =
            state.worker(&id).ok_or_else(|| Rejection::WorkerNotFound { worker: id.clone() })?;
        if w.session != session || !w.status.is_live() {
            return Err(Rejection::WorkerUnavailable {
                worker: id,
                status: w.status.as_str().into(),
                reason: format!(
                    "session {session} is not live (current {}); register again",
                    w.session
                ),
            }
            .into());
        }
        self.lock().insert(id, (session, Instant::now() + self.ttl));
        Ok(matches!(w.status, WorkerStatus::Draining { .. }))
    }

    /// How long ago `worker` last sent a heartbeat this leader saw (since its deadline was
    /// last set; a session not heard from since this node leads counts from then).
    pub fn heartbeat_age(&self, worker: &WorkerId, now: Instant) -> Option<Duration> {
        let (_, deadline) = *self.lock().get(worker)?;
        Some(now.saturating_duration_since(deadline.checked_sub(self.ttl)?))
    }

    /// Track every live session of `state` (new ones get the grace period), drop the rest, and
    /// return the sessions whose deadline passed at `now`.
    pub fn expired(&self, state: &SchedulerState, now: Instant) -> Vec<(WorkerId, u64)> {
        let mut map = self.lock();
        map.retain(|id, (session, _)| {
            state.worker(id).is_some_and(|w| w.status.is_live() && w.session == *session)
        });
        let mut out = Vec::new();
        for w in state.workers().filter(|w| w.status.is_live()) {
            let entry = map.entry(w.spec.id.clone()).or_insert((w.session, now + self.grace));
            if entry.1 <= now {
                out.push((w.spec.id.clone(), entry.0));
            }
        }
        out
    }

    /// Give a session more time (e.g. after an expiry proposal failed, to avoid hammering).
    pub fn extend(&self, worker: &WorkerId, by: Duration) {
        if let Some(e) = self.lock().get_mut(worker) {
            e.1 = Instant::now() + by;
        }
    }
}

/// The expiry loop: proposes `ExpireWorker` for every session whose deadline passed.
pub async fn run(node: Arc<Node>) {
    let tick = (node.cfg.workers.heartbeat_interval / 2).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(tick).await;
        let expired = node.local(|s| node.liveness.expired(s, tokio::time::Instant::now()));
        for (worker, session) in expired {
            info!(node_id = node.raft.id(), worker_id = %worker, session, "worker missed its heartbeats; expiring it");
            match super::propose(&node, Op::ExpireWorker { worker: worker.clone(), session }).await
            {
                Ok(Some(Output::WorkerUpdated { requeued })) => {
                    node.metrics.record_expiry(requeued.len() as u64);
                }
                Ok(_) => node.liveness.extend(&worker, tick),
                Err(()) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use state_machine::{Command, Op, Resources, WorkerSpec};

    use super::*;

    fn state_with(worker: &str) -> (SchedulerState, u64) {
        let mut s = SchedulerState::new();
        let spec = WorkerSpec {
            id: WorkerId(worker.into()),
            queues: vec!["default".into()],
            labels: BTreeMap::new(),
            capacity: Resources::default(),
            slots: 1,
        };
        let r = s.apply(&Command::new(1, Op::RegisterWorker { spec, instance: 1 }));
        let Ok(state_machine::Output::Registered { session, .. }) = r else { panic!("{r:?}") };
        (s, session)
    }

    #[tokio::test(start_paused = true)]
    async fn grace_then_ttl_then_expiry() {
        let (s, session) = state_with("w");
        let l = Liveness::new(Duration::from_secs(5), Duration::from_secs(3));
        let t0 = Instant::now();
        assert!(l.expired(&s, t0).is_empty(), "a new leader gives grace first");
        assert_eq!(
            l.expired(&s, t0 + Duration::from_secs(3)),
            vec![(WorkerId("w".into()), session)]
        );
        l.heartbeat(&s, "w", session).unwrap();
        assert!(
            l.expired(&s, t0 + Duration::from_secs(4)).is_empty(),
            "a heartbeat extends by the ttl"
        );
        assert!(!l.expired(&s, t0 + Duration::from_secs(6)).is_empty());
    }

    #[test]
    fn stale_sessions_and_unknown_workers_are_refused() {
        let (s, session) = state_with("w");
        let l = Liveness::new(Duration::from_secs(5), Duration::from_secs(3));
        assert!(matches!(
            l.heartbeat(&s, "w", session + 1),
            Err(NodeError::Rejected(Rejection::WorkerUnavailable { .. }))
        ));
        assert!(matches!(
            l.heartbeat(&s, "nobody", 1),
            Err(NodeError::Rejected(Rejection::WorkerNotFound { .. }))
        ));
    }
}
