//! Multi-node tests over real gRPC on loopback: election and replication, a follower's
//! `NotLeader` hint, leader loss, restart on the same data dir, membership changes, snapshot
//! catch-up and the read index a follower read is built from. (Forwarding, follower reads
//! end to end and leader transfer belong to the `node` crate and are tested there.) Every wait
//! polls a condition with a deadline; nothing asserts on timing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use client::local::wait_until;
use proto::internal::v1 as ipb;
use proto::internal::v1::raft_service_server::{RaftService, RaftServiceServer};
use raft::config::RaftSettings;
use raft::node::{RaftNode, WriteError};
use raft::service::RaftRpcs;
use raft::NodeInfo;
use state_machine::{NewTask, Op, Output, TaskSpec};
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

/// The Raft RPC handlers as a gRPC service (the node crate's adapter, minus its error table).
#[derive(Clone)]
struct Rpcs(RaftRpcs);

fn answer(
    r: Result<ipb::RaftReply, raft::service::RpcError>,
) -> Result<Response<ipb::RaftReply>, Status> {
    r.map(Response::new).map_err(|e| Status::unavailable(e.to_string()))
}

#[tonic::async_trait]
impl RaftService for Rpcs {
    async fn append_entries(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        answer(self.0.append_entries(req.into_inner()).await)
    }
    async fn vote(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        answer(self.0.vote(req.into_inner()).await)
    }
    async fn install_snapshot(
        &self,
        req: Request<ipb::RaftRequest>,
    ) -> Result<Response<ipb::RaftReply>, Status> {
        answer(self.0.install_snapshot(req.into_inner()).await)
    }
}

struct TestNode {
    id: u64,
    addr: String,
    dir: PathBuf,
    node: Option<Arc<RaftNode>>,
    server: Option<(JoinHandle<()>, tokio::sync::oneshot::Sender<()>)>,
}

impl TestNode {
    fn node(&self) -> &Arc<RaftNode> {
        self.node.as_ref().expect("node is running")
    }

    async fn start(
        id: u64,
        dir: PathBuf,
        addr: Option<String>,
        settings: RaftSettings,
    ) -> TestNode {
        let listener = match &addr {
            Some(a) => tokio::net::TcpListener::bind(a).await.expect("rebind"),
            None => tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        };
        let addr = listener.local_addr().unwrap().to_string();
        let node = RaftNode::start(id, addr.clone(), &dir, settings).await.expect("start");
        let svc = RaftServiceServer::new(Rpcs(RaftRpcs::new(&node)))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                )
                .await;
        });
        TestNode { id, addr, dir, node: Some(node), server: Some((server, stop_tx)) }
    }

    /// Stop the node: close its connections (GOAWAY, bounded wait), shut raft down, drop
    /// every handle so the data dir can be opened again.
    async fn stop(&mut self) {
        if let Some((mut task, stop)) = self.server.take() {
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
                task.abort();
            }
        }
        if let Some(n) = self.node.take() {
            let _ = n.shutdown().await;
            drop(n);
        }
        // Give detached tasks a moment to drop their store handles (sled holds a dir lock).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn settings() -> RaftSettings {
    RaftSettings { snapshot_logs: 1_000, keep_logs: 50, ..RaftSettings::default() }
}

async fn cluster(n: u64, settings: RaftSettings) -> (Vec<TestNode>, Vec<tempfile::TempDir>) {
    let mut dirs = Vec::new();
    let mut nodes = Vec::new();
    for id in 1..=n {
        let d = tempfile::tempdir().unwrap();
        nodes.push(TestNode::start(id, d.path().to_path_buf(), None, settings.clone()).await);
        dirs.push(d);
    }
    let members: BTreeMap<u64, NodeInfo> =
        nodes.iter().map(|n| (n.id, NodeInfo::new(n.addr.clone()))).collect();
    nodes[0].node().initialize(members).await.expect("initialize");
    (nodes, dirs)
}

/// Bound of every wait for the in-process cluster.
const WAIT: Duration = Duration::from_secs(20);

fn leader_of(nodes: &[TestNode]) -> Option<usize> {
    nodes.iter().position(|n| n.node.as_ref().is_some_and(|x| x.is_leader()))
}

async fn wait_leader(nodes: &[TestNode]) -> usize {
    wait_until("a leader", WAIT, || std::future::ready(leader_of(nodes).is_some())).await.unwrap();
    leader_of(nodes).unwrap()
}

fn submit_op(tag: &str, n: usize) -> Op {
    Op::Submit {
        tasks: (0..n)
            .map(|i| {
                let mut s = TaskSpec::new("job");
                s.idempotency_key = Some(format!("{tag}-{i}"));
                NewTask::new(s)
            })
            .collect(),
    }
}

/// Propose on whichever of `nodes` leads, retrying while the cluster settles (same key = no
/// duplicates).
async fn write(nodes: &[&TestNode], op: Op) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let leader = nodes.iter().find(|n| n.node.as_ref().is_some_and(|x| x.is_leader()));
        let r = match leader {
            Some(l) => l.node().propose(vec![op.clone()]).await,
            None => Err(WriteError::NotLeader { leader: None }),
        };
        match r {
            Ok(w) => {
                assert!(
                    matches!(w.responses.as_slice(), [Ok(Output::Submitted(_))]),
                    "{:?}",
                    w.responses
                );
                return w.index;
            }
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "write kept failing: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn converged(nodes: &[&TestNode], index: u64) {
    for n in nodes {
        let node = n.node().clone();
        wait_until(&format!("node {} applies {index}", n.id), WAIT, || {
            std::future::ready(node.sm().events().applied() >= index)
        })
        .await
        .unwrap();
    }
    let digests: Vec<(u64, u64)> = nodes.iter().map(|n| n.node().sm().digest()).collect();
    let last = nodes.iter().map(|n| n.node().sm().events().applied()).max().unwrap();
    for n in nodes {
        let node = n.node().clone();
        wait_until("same applied index", WAIT, || {
            std::future::ready(node.sm().events().applied() >= last)
        })
        .await
        .unwrap();
    }
    let digests2: Vec<u64> = nodes.iter().map(|n| n.node().sm().digest().1).collect();
    assert!(
        digests2.windows(2).all(|w| w[0] == w[1]),
        "digests differ: {digests:?} / {digests2:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_three_nodes_elect_replicate_and_a_follower_points_to_the_leader() {
    let (nodes, _dirs) = cluster(3, settings()).await;
    let l = wait_leader(&nodes).await;
    let follower = (l + 1) % 3;
    let f = nodes[follower].node().clone();
    wait_until("the follower knows the leader", WAIT, || {
        std::future::ready(f.remote_leader().is_some())
    })
    .await
    .unwrap();
    // A follower proposes nothing: it names the leader, and passing the write on is the
    // caller's business.
    match f.propose(vec![submit_op("a", 10)]).await {
        Err(WriteError::NotLeader { leader: Some(hint) }) => {
            assert_eq!(hint.id, nodes[l].id);
            assert_eq!(hint.addr, nodes[l].addr);
        }
        other => panic!("a follower answered a proposal with {other:?}"),
    }
    assert!(matches!(f.ensure_linearizable().await, Err(WriteError::NotLeader { .. })));
    let index = write(&nodes.iter().collect::<Vec<_>>(), submit_op("a", 10)).await;
    converged(&nodes.iter().collect::<Vec<_>>(), index).await;
    for n in &nodes {
        assert_eq!(n.node().sm().read(|s| s.task_count()), 10);
    }
    // A follower read: the leader's read index, then the follower's own apply.
    let read_index = nodes[l].node().ensure_linearizable().await.expect("read index on the leader");
    assert!(read_index >= index);
    f.wait_applied(read_index).await.expect("the follower applies the read index");
    assert_eq!(f.sm().read(|s| s.task_count()), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_leader_stop_then_a_new_leader_commits() {
    let (mut nodes, _dirs) = cluster(3, settings()).await;
    let l = wait_leader(&nodes).await;
    write(&[&nodes[l]], submit_op("before", 5)).await;
    let old = nodes[l].id;
    nodes[l].stop().await;
    let rest: Vec<&TestNode> = nodes.iter().filter(|n| n.node.is_some()).collect();
    wait_until("a new leader", WAIT, || {
        std::future::ready(rest.iter().any(|n| n.node().is_leader()))
    })
    .await
    .unwrap();
    let nl = rest.iter().find(|n| n.node().is_leader()).unwrap();
    assert_ne!(nl.id, old);
    let index = write(&rest, submit_op("after", 5)).await;
    converged(&rest, index).await;
    assert_eq!(rest[0].node().sm().read(|s| s.task_count()), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_restart_on_same_dir_catches_up() {
    let (mut nodes, _dirs) = cluster(3, settings()).await;
    let l = wait_leader(&nodes).await;
    let victim = (l + 1) % 3;
    write(&[&nodes[l]], submit_op("x", 20)).await;
    let (id, dir, addr) = (nodes[victim].id, nodes[victim].dir.clone(), nodes[victim].addr.clone());
    nodes[victim].stop().await;
    let l = wait_leader(&nodes).await;
    let mut index = 0;
    for i in 0..30 {
        index = write(&[&nodes[l]], submit_op(&format!("y{i}"), 3)).await;
    }
    nodes[victim] = TestNode::start(id, dir, Some(addr), settings()).await;
    converged(&nodes.iter().collect::<Vec<_>>(), index).await;
    assert_eq!(nodes[victim].node().sm().read(|s| s.task_count()), 110);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t40_learner_added_promoted_and_a_voter_removed() {
    let (mut nodes, mut dirs) = cluster(3, settings()).await;
    let l = wait_leader(&nodes).await;
    write(&[&nodes[l]], submit_op("m", 10)).await;
    let d = tempfile::tempdir().unwrap();
    let n4 = TestNode::start(4, d.path().to_path_buf(), None, settings()).await;
    dirs.push(d);
    let leader = nodes[l].node().clone();
    leader
        .add_learner(4, NodeInfo::new(n4.addr.clone()), Duration::from_secs(10))
        .await
        .expect("add learner");
    leader.promote(4).await.expect("promote");
    assert_eq!(leader.members().get(&4).map(|m| m.1), Some(true));
    // Remove a follower voter.
    let victim = nodes.iter().position(|n| n.id != leader.id()).unwrap();
    let victim_id = nodes[victim].id;
    leader.remove(victim_id).await.expect("remove");
    assert!(!leader.members().contains_key(&victim_id));
    nodes[victim].stop().await;
    nodes.push(n4);
    let live: Vec<&TestNode> = nodes.iter().filter(|n| n.node.is_some()).collect();
    let index = write(&live, submit_op("after-change", 5)).await;
    converged(&live, index).await;
    assert_eq!(live[0].node().sm().read(|s| s.task_count()), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_a_fresh_node_far_behind_catches_up_by_snapshot() {
    let s = RaftSettings { snapshot_logs: 100, keep_logs: 10, ..RaftSettings::default() };
    let (nodes, mut dirs) = cluster(3, s.clone()).await;
    let l = wait_leader(&nodes).await;
    let leader = nodes[l].node().clone();
    let mut index = 0;
    for i in 0..250 {
        index = write(&[&nodes[l]], submit_op(&format!("s{i}"), 4)).await;
    }
    wait_until("leader purged its log behind a snapshot", WAIT, || {
        std::future::ready({
            leader.raft().metrics().borrow().purged.is_some_and(|p| p.index > 10)
        })
    })
    .await
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let n4 = TestNode::start(4, d.path().to_path_buf(), None, s).await;
    dirs.push(d);
    leader
        .add_learner(4, NodeInfo::new(n4.addr.clone()), Duration::from_secs(15))
        .await
        .expect("learner catches up");
    let n4node = n4.node().clone();
    wait_until("learner installed a snapshot", WAIT, || {
        std::future::ready(n4node.raft().metrics().borrow().snapshot.is_some())
    })
    .await
    .unwrap();
    let mut all: Vec<&TestNode> = nodes.iter().collect();
    all.push(&n4);
    converged(&all, index).await;
    assert_eq!(n4.node().sm().read(|s| s.task_count()), 1_000);
}
