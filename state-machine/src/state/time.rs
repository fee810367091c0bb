//! Applying the clock: deadlines and delays (`AdvanceTime`) and retention (`Purge`).
//!
//! Both only act on entries of the time-ordered indexes at or before the command's log time
//! (purge: strictly before its cutoff), in index order, so the outcome depends on the log alone.

use super::SchedulerState;
use crate::command::Output;
use crate::model::{FailureKind, Millis, TaskState};
use crate::record::RecordKey;

impl SchedulerState {
    pub(super) fn advance_time(&mut self, now: Millis) -> Output {
        let mut timed_out = 0;
        while let Some(&(t, id)) = self.idx.deadlines.first() {
            if t > now {
                break;
            }
            let timeout = self.tasks[&id].spec.timeout_ms.unwrap_or(0);
            self.fail_attempt(
                now,
                id,
                FailureKind::Timeout,
                format!("attempt exceeded its {timeout} ms timeout"),
            );
            timed_out += 1;
        }
        let mut promoted = 0;
        while let Some(&(t, id)) = self.idx.delayed.first() {
            if t > now {
                break;
            }
            self.transition(now, id, TaskState::Queued { since: now });
            promoted += 1;
        }
        Output::Advanced { promoted, timed_out }
    }

    pub(super) fn purge(&mut self, before: Millis, limit: u32) -> Output {
        let mut tasks = 0;
        while tasks < limit {
            let Some(&(at, id)) = self.idx.finished.first() else { break };
            if at >= before {
                break;
            }
            self.idx.finished.remove(&(at, id));
            let task = self.tasks.remove(&id).expect("finished task exists");
            self.idx.counts[task.state.kind().index()] -= 1;
            if let Some(k) = &task.spec.idempotency_key {
                self.idx.by_key.remove(k);
            }
            self.touch(RecordKey::of_task(id));
            tasks += 1;
        }
        let mut workers = 0;
        while let Some((at, id)) = self.idx.dead_workers.first().cloned() {
            if at >= before {
                break;
            }
            self.idx.dead_workers.remove(&(at, id.clone()));
            self.workers.remove(&id);
            self.touch(RecordKey::Worker(id));
            workers += 1;
        }
        Output::Purged { tasks, workers }
    }
}
