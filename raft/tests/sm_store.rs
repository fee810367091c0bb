//! The sled state-machine store: restart without replay, snapshots taken while applies keep
//! running (copy-on-write), and installing a snapshot on a fresh store.

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use raft::sm_store::{SmConfig, StateMachineStore};
use raft::Entry;
use state_machine::{Command, NewTask, Op, Output, TaskId, TaskSpec, TaskStateKind};

fn entry(index: u64, op: Op) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::new(1_000 + index, op)),
    }
}

fn submit(n: usize, tag: usize) -> Op {
    Op::Submit {
        tasks: (0..n)
            .map(|i| {
                let mut s = TaskSpec::new("t");
                s.payload = format!("{tag}-{i}").into_bytes();
                s.priority = (i % 3) as i32;
                NewTask::new(s)
            })
            .collect(),
    }
}

fn open(dir: &std::path::Path) -> StateMachineStore {
    StateMachineStore::open(dir, &SmConfig::default()).expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_state_without_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (digest, applied) = {
        let mut sm = open(dir.path());
        let r = sm
            .apply([
                entry(1, submit(50, 0)),
                entry(2, Op::Cancel { ids: vec![TaskId(3)], reason: "x".into() }),
            ])
            .await
            .unwrap();
        assert!(matches!(r[0], Ok(Output::Submitted(_))));
        assert_eq!(r.len(), 2);
        let h = sm.handle();
        h.flush().unwrap();
        (h.digest(), h.last_applied())
    };
    let sm = open(dir.path());
    let h = sm.handle();
    assert_eq!(h.digest(), digest);
    assert_eq!(h.last_applied(), applied);
    h.read(|s| {
        s.check_invariants().unwrap();
        assert_eq!(s.task_count(), 50);
        assert_eq!(s.task(TaskId(3)).unwrap().state.kind(), TaskStateKind::Cancelled);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_and_membership_entries_get_a_response_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path());
    let blank =
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), 1), payload: EntryPayload::Blank };
    let r = sm.apply([blank, entry(2, submit(1, 0))]).await.unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0], Ok(Output::Noop));
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(2));
}

/// Build a snapshot while other applies run; the snapshot must equal the state at the point
/// the builder was created, whatever the applies did meanwhile (updates, deletes, inserts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_is_consistent_while_applies_continue() {
    for round in 0..3usize {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = open(dir.path());
        let mut index = 0;
        for b in 0..20 {
            index += 1;
            sm.apply([entry(index, submit(1_000, b))]).await.unwrap();
        }
        // Make some tasks terminal so purge has something to delete.
        index += 1;
        let ids: Vec<TaskId> = (1..=5_000).step_by(2).map(TaskId).collect();
        sm.apply([entry(index, Op::Cancel { ids, reason: "r".into() })]).await.unwrap();

        let mut builder = sm.get_snapshot_builder().await;
        let (point_index, point_digest) = sm.handle().digest();
        assert_eq!(point_index, index);

        let build = tokio::spawn(async move { builder.build_snapshot().await });
        // Mutate heavily while the build streams: cancel (update), purge (delete), submit (insert).
        let mut sm2 = sm.clone();
        for k in 0..30u64 {
            index += 1;
            let op = match k % 3 {
                0 => Op::Cancel {
                    ids: (10_000 + k * 100..10_000 + k * 100 + 100).map(TaskId).collect(),
                    reason: "c".into(),
                },
                1 => Op::Purge { finished_before: u64::MAX, limit: 500 },
                _ => submit(200, 100 + k as usize + round),
            };
            sm2.apply([entry(index, op)]).await.unwrap();
        }
        let snap = build.await.unwrap().unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(point_index));
        assert_ne!(sm.handle().digest().1, point_digest, "the live state moved on");

        // Install on a fresh store: it must equal the state at the snapshot point.
        let dir2 = tempfile::tempdir().unwrap();
        let mut fresh = open(dir2.path());
        let mut data = fresh.begin_receiving_snapshot().await.unwrap();
        let mut src = snap.snapshot;
        use tokio::io::AsyncSeekExt;
        src.seek(std::io::SeekFrom::Start(0)).await.unwrap();
        tokio::io::copy(&mut src, &mut *data).await.unwrap();
        fresh.install_snapshot(&snap.meta, data).await.unwrap();
        let h = fresh.handle();
        assert_eq!(h.digest(), (point_index, point_digest), "round {round}");
        h.read(|s| s.check_invariants().unwrap());
        // The installed snapshot is the fresh store's current snapshot and survives a restart.
        assert!(fresh.get_current_snapshot().await.unwrap().is_some());
        drop(h);
        drop(fresh);
        let mut reopened = open(dir2.path());
        assert_eq!(reopened.handle().digest(), (point_index, point_digest));
        assert_eq!(
            reopened.get_current_snapshot().await.unwrap().map(|s| s.meta.last_log_id),
            Some(snap.meta.last_log_id)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_refused_and_the_state_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = open(dir.path());
    sm.apply([entry(1, submit(100, 0))]).await.unwrap();
    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.unwrap();

    let dir2 = tempfile::tempdir().unwrap();
    let mut other = open(dir2.path());
    other.apply([entry(1, submit(3, 9))]).await.unwrap();
    let before = other.handle().digest();
    let mut data = other.begin_receiving_snapshot().await.unwrap();
    let mut src = snap.snapshot;
    let mut bytes = Vec::new();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    src.read_to_end(&mut bytes).await.unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    data.write_all(&bytes).await.unwrap();
    assert!(other.install_snapshot(&snap.meta, data).await.is_err());
    assert_eq!(other.handle().digest(), before);
    drop(other);
    // After a restart the old state is still there and the half-built tree is gone.
    let reopened = open(dir2.path());
    assert_eq!(reopened.handle().digest(), before);
}
