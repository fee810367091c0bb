//! Routing end to end: every node serves every request, and a follower passes what only the
//! leader can do on to it over the peer service — writes, linearizable reads, worker heartbeats
//! (with the leader's answer relayed unchanged) and cluster administration (leader transfer).
//! Real `schedulerd` processes on loopback; every wait polls a condition with a deadline.

mod common;

use std::time::Duration;

use common::*;
use proto::pb;
use proto::pb::cluster_client::ClusterClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn p10_follower_writes_reads_and_heartbeats_reach_the_leader() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);

    // A write through one follower, then a linearizable read through the other sees it.
    let mut t1 = c.tasks(f1).await;
    let submitted = t1
        .submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec("routed", 0)] })
        .await
        .expect("submit through a follower")
        .into_inner();
    let id = submitted.tasks[0].id;
    let mut t2 = c.tasks(f2).await;
    let got = t2
        .get_task(pb::GetTaskRequest { id, stale_ok: false })
        .await
        .expect("linearizable read through a follower")
        .into_inner();
    assert_eq!(got.id, id);

    // A worker registered through a follower heartbeats through the other follower.
    let mut w1 = c.workers(f1).await;
    let reg = w1
        .register_worker(pb::RegisterWorkerRequest {
            worker: Some(pb::WorkerSpec {
                id: "routed-w".into(),
                queues: vec!["elsewhere".into()],
                slots: 1,
                ..Default::default()
            }),
            instance: 7,
        })
        .await
        .expect("register through a follower")
        .into_inner();
    let mut w2 = c.workers(f2).await;
    let hb = w2
        .heartbeat(pb::HeartbeatRequest { worker_id: "routed-w".into(), session: reg.session })
        .await
        .expect("heartbeat through a follower")
        .into_inner();
    assert!(!hb.draining);
    // The leader's refusal of a stale session reaches the worker unchanged, code and reason.
    let e = w2
        .heartbeat(pb::HeartbeatRequest { worker_id: "routed-w".into(), session: reg.session + 1 })
        .await
        .expect_err("a stale session is refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(proto::status::reason_of(&e), Some(proto::status::Reason::WorkerUnavailable));
    let e = w2
        .heartbeat(pb::HeartbeatRequest { worker_id: "nobody".into(), session: 1 })
        .await
        .expect_err("an unknown worker is refused");
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn p20_leader_transfer_through_a_follower_moves_leadership_to_the_target() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let (via, target) = ((leader + 1) % 3, (leader + 2) % 3);
    let target_id = c.nodes[target].id;
    let mut admin = ClusterClient::new(channel(&c.nodes[via].addr).await);
    let r = admin
        .transfer_leader(pb::TransferLeaderRequest { to: target_id })
        .await
        .expect("transfer through a follower")
        .into_inner();
    assert_eq!(r.leader_id, target_id);
    wait_until("the target leads", Duration::from_secs(30), || async {
        c.leader().await == Some(target)
    })
    .await
    .unwrap();
    // Writes keep working, and elections are enabled again everywhere: killing the new leader
    // still elects another one.
    retry(&[c.nodes[via].addr.clone()], |ch| async move {
        let req = pb::SubmitTasksRequest { tasks: vec![spec("after-transfer", 0)] };
        proto::pb::tasks_client::TasksClient::new(ch).submit_tasks(req).await
    })
    .await
    .expect("submit after the transfer");
    let mut c = c;
    c.kill(target);
    wait_until("a new leader after the target died", Duration::from_secs(30), || async {
        c.leader().await.is_some_and(|l| l != target)
    })
    .await
    .unwrap();
}
