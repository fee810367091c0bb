//! The applied-event log: what each applied entry changed, kept in memory for watchers.
//!
//! The state-machine store appends one [`EventBatch`] per applied command (with its log index)
//! and publishes the applied index on a watch channel. Readers keep their own cursor and read
//! batches after it; when their cursor falls behind the retained window they get
//! [`ReadError::Compacted`] and must resynchronise from the state (list, then watch from the
//! index given), the way etcd reports a compacted revision. A snapshot install replaces the
//! whole state, so it resets the log: readers see [`ReadError::Reset`].
//!
//! Events are derived data: they are not persisted, and a restarted node retains events only
//! from the index it restarted at.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use state_machine::TaskEvent;
use tokio::sync::watch;

/// The task changes made by one applied log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventBatch {
    /// Log index of the entry.
    pub index: u64,
    /// Log time after the entry.
    pub log_time: u64,
    /// Term of the leader that proposed the entry.
    pub term: u64,
    /// For an entry with an Assign (alone or in a batch): the applied index its planner
    /// looked at, the earliest if several (0 otherwise).
    pub planned_at: u64,
    /// Changes, in apply order.
    pub events: Vec<TaskEvent>,
}

/// Why a read could not continue from the cursor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Batches after the cursor are no longer retained; the oldest retained index is given.
    #[error("events after index {cursor} are no longer retained (oldest retained: {first})")]
    Compacted {
        /// The reader's cursor.
        cursor: u64,
        /// First index still available (resume from `first - 1` after re-listing).
        first: u64,
    },
    /// The state was replaced by a snapshot at this index; re-read the state.
    #[error("state was replaced by a snapshot at index {0}")]
    Reset(u64),
}

struct Inner {
    batches: VecDeque<Arc<EventBatch>>,
    retained_events: usize,
    /// Every entry up to and including this index has been applied.
    applied: u64,
    /// Batches with index <= this are not retained (compacted, or before a restart/reset).
    floor: u64,
    /// Index of the last snapshot install (0 = none since start).
    reset_at: u64,
}

/// Shared, cloneable handle to the event log.
#[derive(Clone)]
pub struct EventLog {
    inner: Arc<Mutex<Inner>>,
    applied_tx: Arc<watch::Sender<u64>>,
    max_events: usize,
}

impl EventLog {
    /// An empty log starting after `applied`, retaining up to `max_events` events.
    pub fn new(applied: u64, max_events: usize) -> Self {
        let (tx, _) = watch::channel(applied);
        EventLog {
            inner: Arc::new(Mutex::new(Inner {
                batches: VecDeque::new(),
                retained_events: 0,
                applied,
                floor: applied,
                reset_at: 0,
            })),
            applied_tx: Arc::new(tx),
            max_events: max_events.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave it inconsistent in a way readers care
        // about (every mutation is a push or pop), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record the batches of one apply call and advance the applied index.
    pub fn publish(&self, batches: Vec<EventBatch>, applied: u64) {
        {
            let mut g = self.lock();
            for b in batches {
                if b.events.is_empty() {
                    continue;
                }
                g.retained_events += b.events.len();
                g.batches.push_back(Arc::new(b));
            }
            while g.retained_events > self.max_events && g.batches.len() > 1 {
                let old = g.batches.pop_front().expect("non-empty");
                g.retained_events -= old.events.len();
                g.floor = old.index;
            }
            g.applied = g.applied.max(applied);
        }
        self.applied_tx.send_replace(applied);
    }

    /// The state was replaced (snapshot install) at `applied`: drop everything retained.
    pub fn reset(&self, applied: u64) {
        {
            let mut g = self.lock();
            g.batches.clear();
            g.retained_events = 0;
            g.applied = applied;
            g.floor = applied;
            g.reset_at = applied;
        }
        self.applied_tx.send_replace(applied);
    }

    /// The applied index.
    pub fn applied(&self) -> u64 {
        self.lock().applied
    }

    /// A watch of the applied index, to wait for progress.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// Batches with index > `cursor`, up to `max` of them, plus the applied index they reach
    /// (the caller's next cursor). Errors when the range is no longer complete.
    pub fn read_after(
        &self,
        cursor: u64,
        max: usize,
    ) -> Result<(Vec<Arc<EventBatch>>, u64), ReadError> {
        let g = self.lock();
        if g.reset_at > cursor {
            return Err(ReadError::Reset(g.reset_at));
        }
        if cursor < g.floor {
            return Err(ReadError::Compacted { cursor, first: g.floor + 1 });
        }
        let start = g.batches.partition_point(|b| b.index <= cursor);
        let out: Vec<Arc<EventBatch>> = g.batches.iter().skip(start).take(max).cloned().collect();
        let next =
            if out.len() == max { out.last().map_or(g.applied, |b| b.index) } else { g.applied };
        Ok((out, next.max(cursor)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use state_machine::{TaskId, TaskStateKind};

    fn batch(index: u64, n: usize) -> EventBatch {
        EventBatch {
            index,
            log_time: index,
            term: 1,
            planned_at: 0,
            events: (0..n)
                .map(|i| TaskEvent {
                    task: TaskId(i as u64),
                    state: TaskStateKind::Queued,
                    attempt: 0,
                    holder: None,
                    revoked_from: None,
                })
                .collect(),
        }
    }

    #[test]
    fn readers_resume_without_gaps() {
        let log = EventLog::new(0, 100);
        log.publish(vec![batch(1, 1), batch(2, 1)], 2);
        log.publish(vec![batch(4, 2)], 4);
        let (b, next) = log.read_after(0, 10).unwrap();
        assert_eq!(b.iter().map(|b| b.index).collect::<Vec<_>>(), vec![1, 2, 4]);
        assert_eq!(next, 4);
        let (b, next) = log.read_after(1, 1).unwrap();
        assert_eq!(b[0].index, 2);
        assert_eq!(next, 2);
        let (b, next) = log.read_after(4, 10).unwrap();
        assert!(b.is_empty());
        assert_eq!(next, 4);
    }

    #[test]
    fn compaction_and_reset_are_reported() {
        let log = EventLog::new(10, 3);
        assert_eq!(log.read_after(5, 10), Err(ReadError::Compacted { cursor: 5, first: 11 }));
        log.publish(vec![batch(11, 2), batch(12, 2)], 12);
        assert_eq!(log.read_after(10, 10), Err(ReadError::Compacted { cursor: 10, first: 12 }));
        assert_eq!(log.read_after(11, 10).unwrap().0.len(), 1);
        log.reset(50);
        assert_eq!(log.read_after(12, 10), Err(ReadError::Reset(50)));
        assert!(log.read_after(50, 10).unwrap().0.is_empty());
        assert_eq!(*log.subscribe().borrow(), 50);
    }
}
