//! Hostile input against a real 3-node cluster with TLS, peer certificates and tokens: each
//! attack a security review found is replayed over the wire and must be refused with the right
//! code, change nothing (tasks keep their state and fence, membership stays, no absurd term),
//! and leave every node alive. The raw channels present the node certificate and the admin
//! token, so each attack gets past the trust boundary and meets the checks behind it — what a
//! buggy or compromised member could send (the boundary itself is `security.rs`'s subject).
//! Real `schedulerd` processes on loopback; waits poll conditions with deadlines.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use openraft::raft::{InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, LogId, Membership, SnapshotMeta, StoredMembership, Vote};
use proto::internal::v1 as ipb;
use proto::internal::v1::raft_service_client::RaftServiceClient;
use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use proto::pb::workers_client::WorkersClient;
use raft::network::codec;
use raft::snapshot::{Meta, SnapshotWriter};
use raft::{NodeInfo, TypeConfig};
use tonic::Code;

/// Long enough for several election timeouts: a node that accepted an absurd term panics at
/// its next election, so the liveness checks come after this (it is a pause, not an
/// assertion about timing).
const LET_ELECTIONS_RUN: Duration = Duration::from_secs(2);

/// Fails the test if node `i`'s process has exited (the harness reaps and reports it).
fn assert_process_runs(c: &mut Cluster, i: usize) {
    let id = c.nodes[i].id;
    if let Err(e) = c.nodes[i].process_mut().check_running() {
        panic!("node {id} exited: {e}");
    }
}

async fn cluster_status(addr: &str) -> Result<pb::ClusterStatusResponse, tonic::Status> {
    let mut c = ClusterClient::new(channel(addr).await);
    c.status(pb::ClusterStatusRequest {}).await.map(|r| r.into_inner())
}

/// Every node's process runs and answers ClusterStatus with a leader and a plausible term.
async fn all_alive(c: &mut Cluster) {
    for i in 0..c.nodes.len() {
        assert_process_runs(c, i);
        let n = &c.nodes[i];
        let s = cluster_status(&n.addr)
            .await
            .unwrap_or_else(|e| panic!("node {} does not answer ClusterStatus: {e}", n.id));
        assert!(s.term < raft::plausible::MAX_TERM, "node {} term {} is absurd", n.id, s.term);
    }
    c.wait_leader().await;
}

/// Voter ids and learner ids as the leader reports them.
async fn membership(c: &Cluster) -> (Vec<u64>, Vec<u64>) {
    let leader = c.wait_leader().await;
    let s = cluster_status(&c.nodes[leader].addr).await.expect("status");
    let voters = s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect();
    let learners = s.nodes.iter().filter(|n| !n.voter).map(|n| n.id).collect();
    (voters, learners)
}

/// Id, state and fence of every task.
async fn task_facts(c: &Cluster) -> BTreeMap<u64, (String, u64)> {
    all_tasks(&c.addrs())
        .await
        .into_iter()
        .map(|(id, t)| (id, (state(&t).to_string(), t.fence)))
        .collect()
}

fn lid(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn raft_req<T: serde::Serialize>(msg: &T) -> ipb::RaftRequest {
    ipb::RaftRequest { version: codec::VERSION, data: codec::encode(msg) }
}

fn append_req(vote: Vote<u64>, prev: Option<LogId<u64>>) -> ipb::RaftRequest {
    raft_req(&codec::AppendWire { vote, prev_log_id: prev, leader_commit: prev, entries: vec![] })
}

fn snapshot_meta(last: LogId<u64>, id: &str, members: BTreeMap<u64, NodeInfo>) -> Meta {
    let voters = members.keys().copied().collect::<std::collections::BTreeSet<_>>();
    SnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(
            Some(lid(1, 0)),
            Membership::new(vec![voters], members),
        ),
        snapshot_id: id.into(),
    }
}

fn snapshot_req(vote: Vote<u64>, id: &str, offset: u64) -> ipb::RaftRequest {
    let members = BTreeMap::from([(1, NodeInfo::new("127.0.0.1:1"))]);
    let req = InstallSnapshotRequest::<TypeConfig> {
        vote,
        meta: snapshot_meta(lid(1, 5), id, members),
        offset,
        data: vec![0; 16],
        done: false,
    };
    raft_req(&req)
}

/// Queued tasks nobody serves, then a task a worker holds (so it has a holder and a fence to
/// leak or lose; its id differs from its fence, so a leaked fence is recognisable).
async fn tasks_with_a_holder(c: &Cluster) -> (SilentWorker, pb::Assignment) {
    let queued: Vec<pb::TaskSpec> = (0..3)
        .map(|i| pb::TaskSpec { queue: "nobody-serves".into(), ..spec(&format!("queued-{i}"), 0) })
        .collect();
    submit(&c.addrs(), queued).await;
    let mut w = SilentWorker::register(&c.addrs(), "holder-w1").await;
    submit(&c.addrs(), vec![spec("held", 5)]).await;
    let a = w.next_assignment().await;
    assert_ne!(a.task, a.fence, "the held task's id must not look like its fence");
    (w, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h1_absurd_terms_indexes_and_strangers_are_refused_by_every_node() {
    let mut c = Cluster::start_secure(3, &[]).await;
    let leader = c.wait_leader().await;
    let (_w, _a) = tasks_with_a_holder(&c).await;
    let before_tasks = task_facts(&c).await;
    let before_members = membership(&c).await;
    let leader_id = c.nodes[leader].id;

    for (i, n) in c.nodes.iter().enumerate() {
        let other = c.nodes[(i + 1) % 3].id;
        let mut rc = RaftServiceClient::new(channel(&n.addr).await);
        // The original attack: a vote at the largest term, with a log that wins any comparison.
        let e = rc
            .vote(raft_req(&VoteRequest::new(
                Vote::new(u64::MAX, other),
                Some(lid(u64::MAX, u64::MAX)),
            )))
            .await
            .expect_err("a u64::MAX term is refused");
        assert_eq!(e.code(), Code::InvalidArgument, "node {}: {e:?}", n.id);
        assert!(e.message().contains("term"), "{}", e.message());
        // Just past the documented bound.
        let e = rc
            .vote(raft_req(&VoteRequest::new(
                Vote::new(raft::plausible::MAX_TERM + 1, other),
                None,
            )))
            .await
            .expect_err("a term past the bound is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        // The same term claimed by the leader's heartbeat, and an absurd index.
        let e = rc
            .append_entries(append_req(Vote::new_committed(u64::MAX, leader_id), None))
            .await
            .expect_err("an append at u64::MAX is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = rc
            .append_entries(append_req(Vote::new_committed(5, leader_id), Some(lid(5, u64::MAX))))
            .await
            .expect_err("an absurd index is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        // A plausible term from a node that is not a member.
        let e = rc
            .vote(raft_req(&VoteRequest::new(Vote::new(1_000, 99), Some(lid(999, 1 << 20)))))
            .await
            .expect_err("a stranger's vote is refused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("not a member"), "{}", e.message());
        let e = rc
            .append_entries(append_req(Vote::new_committed(1_000, 99), None))
            .await
            .expect_err("a stranger's append is refused");
        assert_eq!(e.code(), Code::FailedPrecondition);
        // A snapshot whose id is a path, and a chunk exabytes into the file.
        let e = rc
            .install_snapshot(snapshot_req(Vote::new_committed(1_000, leader_id), "../../x", 0))
            .await
            .expect_err("a path as snapshot id is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = rc
            .install_snapshot(snapshot_req(Vote::new_committed(1_000, leader_id), "s-1", 1 << 60))
            .await
            .expect_err("a chunk beyond the largest snapshot is refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = rc
            .install_snapshot(snapshot_req(Vote::new_committed(1_000, 99), "s-1", 0))
            .await
            .expect_err("a stranger's snapshot is refused");
        assert_eq!(e.code(), Code::FailedPrecondition);
    }

    tokio::time::sleep(LET_ELECTIONS_RUN).await;
    all_alive(&mut c).await;
    assert_eq!(membership(&c).await, before_members, "membership changed");
    assert_eq!(task_facts(&c).await, before_tasks, "a task changed");
    // And the cluster still commits.
    retry(&c.addrs(), |ch| async move {
        proto::pb::tasks_client::TasksClient::new(ch)
            .submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec("after", 0)] })
            .await
    })
    .await
    .expect("a write after the attack commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_unserved_learners_are_not_promoted_and_a_dead_voter_can_be_removed() {
    let c = Cluster::start_secure(3, &[]).await;
    let leader = c.wait_leader().await;
    let before = membership(&c).await;
    let mut admin = ClusterClient::new(channel(&c.nodes[leader].addr).await);

    // Two learners at addresses nobody serves: adding them is harmless ...
    for id in [4, 5] {
        admin
            .add_learner(pb::AddLearnerRequest {
                id,
                addr: format!("127.0.0.1:{}", client::ports::free_port().unwrap()),
                wait_ms: 0,
                peer_addr: String::new(),
            })
            .await
            .expect("add a learner");
    }
    // ... promoting them is refused: they never caught up.
    for id in [4, 5] {
        let e = admin.promote(pb::PromoteRequest { id }).await.expect_err("promotion refused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("has not caught up"), "{}", e.message());
    }
    let (voters, learners) = membership(&c).await;
    assert_eq!(voters, before.0, "no voter was added");
    assert_eq!(learners, vec![4, 5]);
    let e = admin.promote(pb::PromoteRequest { id: 0 }).await.expect_err("id 0");
    assert_eq!(e.code(), Code::InvalidArgument);

    // The learners can be removed again, and the cluster still commits.
    for id in [4, 5] {
        admin.remove_node(pb::RemoveNodeRequest { id }).await.expect("remove a learner");
    }
    assert_eq!(membership(&c).await, before);

    // A dead voter can be removed while the other two form a reachable majority.
    let mut c = c;
    let dead = (leader + 1) % 3;
    let dead_id = c.nodes[dead].id;
    c.kill(dead);
    admin.remove_node(pb::RemoveNodeRequest { id: dead_id }).await.expect("remove the dead voter");
    let (voters, _) = membership(&c).await;
    assert!(!voters.contains(&dead_id) && voters.len() == 2, "{voters:?}");
    retry(&[c.nodes[leader].addr.clone()], |ch| async move {
        proto::pb::tasks_client::TasksClient::new(ch)
            .submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec("after", 0)] })
            .await
    })
    .await
    .expect("a write after the removal commits");
    for i in (0..c.nodes.len()).filter(|i| *i != dead) {
        assert_process_runs(&mut c, i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h3_absurd_resource_amounts_are_invalid_arguments_naming_field_and_maximum() {
    let mut c = Cluster::start_secure(3, &[]).await;
    let leader = c.wait_leader().await;
    let mut w = WorkersClient::new(channel(&c.nodes[leader].addr).await);
    let greedy = |capacity: pb::Resources| pb::RegisterWorkerRequest {
        worker: Some(pb::WorkerSpec {
            id: "greedy".into(),
            queues: vec!["default".into()],
            capacity: Some(capacity),
            slots: 100,
            ..Default::default()
        }),
        instance: 1,
    };
    let max = state_machine::Limits::default();
    let e = w
        .register_worker(greedy(pb::Resources { cpu_milli: u64::MAX, ..Default::default() }))
        .await
        .expect_err("u64::MAX cpu is refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("worker.capacity.cpu_milli"), "{}", e.message());
    assert!(e.message().contains(&max.max_cpu_milli.to_string()), "{}", e.message());
    let e = w
        .register_worker(greedy(pb::Resources {
            memory_mib: u64::MAX,
            named: [("gpu".to_string(), u64::MAX)].into(),
            ..Default::default()
        }))
        .await
        .expect_err("u64::MAX memory is refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("memory_mib"), "{}", e.message());
    let e = w
        .register_worker(greedy(pb::Resources {
            named: [("gpu".to_string(), u64::MAX)].into(),
            ..Default::default()
        }))
        .await
        .expect_err("u64::MAX gpus are refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("gpu"), "{}", e.message());

    let mut t = c.tasks(leader).await;
    let mut huge = spec("huge", 0);
    huge.resources = Some(pb::Resources { cpu_milli: u64::MAX, ..Default::default() });
    let e = t
        .submit_tasks(pb::SubmitTasksRequest { tasks: vec![huge] })
        .await
        .expect_err("a u64::MAX request is refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("tasks[0].resources.cpu_milli"), "{}", e.message());

    let workers = w
        .list_workers(pb::ListWorkersRequest { stale_ok: false })
        .await
        .expect("list workers")
        .into_inner();
    assert!(workers.workers.is_empty(), "nothing was registered: {:?}", workers.workers);
    assert!(task_facts(&c).await.is_empty(), "nothing was submitted");
    all_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h4_a_malformed_protobuf_body_is_an_invalid_argument() {
    let mut c = Cluster::start_secure(3, &[]).await;
    let leader = c.wait_leader().await;
    // A RaftRequest's field 1 is a varint; SubmitTasksRequest's field 1 is a repeated
    // message: the same bytes are a wire-type error there.
    let mut grpc = tonic::client::Grpc::new(channel(&c.nodes[leader].addr).await);
    grpc.ready().await.expect("ready");
    let codec = proto::codec::ProtoCodec::<ipb::RaftRequest, pb::SubmitTasksResponse>::default();
    let e = grpc
        .unary(
            tonic::Request::new(ipb::RaftRequest { version: 7, data: vec![1, 2, 3] }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/scheduler.v1.Tasks/SubmitTasks"),
            codec,
        )
        .await
        .expect_err("a malformed body is refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("malformed protobuf"), "{}", e.message());
    assert_eq!(proto::status::reason_of(&e), Some(proto::status::Reason::InvalidArgument));
    assert!(task_facts(&c).await.is_empty(), "nothing was submitted");
    all_alive(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h5_refusals_never_reveal_the_current_fence_or_holder() {
    let c = Cluster::start_secure(3, &[]).await;
    let (_w, a) = tasks_with_a_holder(&c).await;
    let before = task_facts(&c).await;
    let leader = c.wait_leader().await;
    let mut w = WorkersClient::new(channel(&c.nodes[leader].addr).await);
    let complete = |worker: &str, fence: u64| pb::CompleteTaskRequest {
        worker_id: worker.into(),
        task: a.task,
        fence,
        result: vec![],
    };
    let stale = a.fence + 1_000;
    for (req, reason) in [
        (complete("holder-w1", stale), "stale_fence"),
        (complete("intruder", stale), "stale_fence"),
        (complete("intruder", a.fence), "wrong_worker"),
    ] {
        let e = w.complete_task(req).await.expect_err("refused");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(e.metadata().get(proto::status::REASON_KEY).unwrap(), reason);
        let numbers: Vec<&str> = e.message().split(|c: char| !c.is_ascii_digit()).collect();
        assert!(
            !numbers.contains(&a.fence.to_string().as_str()),
            "the current fence leaks: {}",
            e.message()
        );
        assert!(!e.message().contains("holder-w1"), "the holder leaks: {}", e.message());
    }
    assert_eq!(task_facts(&c).await, before, "a task changed");
}

/// A snapshot that does not decode, and one whose checksum holds but whose record is forged,
/// sent as the current leader to each follower: openraft would install it, fail, and stop
/// the node. Each is refused before install, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h6_an_undecodable_or_forged_snapshot_is_refused_and_every_node_lives() {
    let mut c = Cluster::start_secure(3, &[]).await;
    let leader = c.wait_leader().await;
    let (_w, _a) = tasks_with_a_holder(&c).await;
    let before_tasks = task_facts(&c).await;
    let before_members = membership(&c).await;
    let leader_id = c.nodes[leader].id;
    let term = cluster_status(&c.nodes[leader].addr).await.expect("status").term;
    let members: BTreeMap<u64, NodeInfo> =
        c.nodes.iter().map(|n| (n.id, NodeInfo::new(n.addr.clone()))).collect();
    // Far ahead of anything committed, so openraft would take it over the follower's state.
    let meta = snapshot_meta(lid(term, 1 << 30), "forged-1", members);

    let dir = tempfile::tempdir().expect("tempdir");
    let forged = dir.path().join("forged.snap");
    let mut w = SnapshotWriter::create(&forged, &meta).expect("create");
    w.record(&state_machine::RecordKey::Meta.encode(), b"\x01 not a record").expect("record");
    w.finish().expect("finish");
    let forged = std::fs::read(&forged).expect("read");
    let garbage = vec![0xAB; 4096];

    for (i, n) in c.nodes.iter().enumerate() {
        if i == leader {
            continue;
        }
        let mut rc = RaftServiceClient::new(channel(&n.addr).await);
        for (what, data) in [("undecodable", &garbage), ("forged", &forged)] {
            // Two chunks, so the spool is exercised across calls.
            let half = data.len() / 2;
            for (offset, part, done) in [(0, &data[..half], false), (half, &data[half..], true)] {
                let req = InstallSnapshotRequest::<TypeConfig> {
                    vote: Vote::new_committed(term, leader_id),
                    meta: meta.clone(),
                    offset: offset as u64,
                    data: part.to_vec(),
                    done,
                };
                let sent = rc.install_snapshot(raft_req(&req)).await;
                if !done {
                    sent.unwrap_or_else(|e| panic!("node {}: first {what} chunk: {e:?}", n.id));
                    continue;
                }
                let e = sent.expect_err("the last chunk of a bad snapshot is refused");
                assert_eq!(e.code(), Code::InvalidArgument, "node {} {what}: {e:?}", n.id);
                assert!(e.message().contains("refused snapshot forged-1"), "{}", e.message());
            }
        }
        // A last chunk whose start this node never received is refused too.
        let req = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(term, leader_id),
            meta: Meta { snapshot_id: "forged-2".into(), ..meta.clone() },
            offset: 100,
            data: vec![1; 10],
            done: true,
        };
        let e = rc.install_snapshot(raft_req(&req)).await.expect_err("an orphan last chunk");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }

    tokio::time::sleep(LET_ELECTIONS_RUN).await;
    all_alive(&mut c).await;
    assert_eq!(membership(&c).await, before_members, "membership changed");
    assert_eq!(task_facts(&c).await, before_tasks, "a task changed");
    retry(&c.addrs(), |ch| async move {
        proto::pb::tasks_client::TasksClient::new(ch)
            .submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec("after", 0)] })
            .await
    })
    .await
    .expect("a write after the attack commits");
}
