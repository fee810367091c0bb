//! Readiness end to end: `/readyz` and gRPC health follow whether a node can serve a
//! linearizable read, while `/healthz` (liveness) stays 200. Real `schedulerd` processes on
//! loopback; every wait polls a condition with a deadline, nothing asserts on timing.

mod common;

use std::time::Duration;

use common::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SERVICES: [&str; 4] =
    ["", "scheduler.v1.Tasks", "scheduler.v1.Workers", "scheduler.v1.Cluster"];

/// The gRPC health status of every service on a node (None if the node did not answer).
async fn grpc_health(addr: &str) -> Option<Vec<i32>> {
    let mut client = HealthClient::new(channel(addr).await);
    let mut out = Vec::new();
    for service in SERVICES {
        let r = client.check(HealthCheckRequest { service: service.into() }).await.ok()?;
        out.push(r.into_inner().status);
    }
    Some(out)
}

/// `/readyz` is 200 and gRPC health SERVING for every service on node `i`.
async fn ready(c: &Cluster, i: usize) -> bool {
    let n = &c.nodes[i];
    http_get(n.http.as_deref().expect("an HTTP address"), "/readyz")
        .await
        .is_some_and(|(code, _)| code == 200)
        && grpc_health(&n.addr)
            .await
            .is_some_and(|s| s.iter().all(|x| *x == ServingStatus::Serving as i32))
}

/// `/readyz` is 503 saying why, and gRPC health NOT_SERVING for every service on node `i`.
async fn not_ready(c: &Cluster, i: usize) -> bool {
    let n = &c.nodes[i];
    let http = http_get(n.http.as_deref().expect("an HTTP address"), "/readyz")
        .await
        .is_some_and(|(code, body)| code == 503 && body.starts_with("not ready: "));
    http && grpc_health(&n.addr)
        .await
        .is_some_and(|s| s.iter().all(|x| *x == ServingStatus::NotServing as i32))
}

async fn assert_alive(c: &Cluster, i: usize) {
    let h = http_get(c.nodes[i].http.as_deref().expect("an HTTP address"), "/healthz").await;
    assert!(h.as_ref().is_some_and(|(code, _)| *code == 200), "/healthz of node {i}: {h:?}");
}

async fn all_ready(c: &Cluster) {
    for i in 0..c.nodes.len() {
        wait_until(&format!("node {i} ready"), Duration::from_secs(30), || ready(c, i))
            .await
            .unwrap();
    }
}

/// A leader cut off from its majority stops being ready (HTTP and gRPC) but stays alive, and
/// becomes ready again once its followers are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r10_leader_without_a_majority_is_not_ready_but_alive() {
    let mut c = Cluster::start(3, &[]).await;
    all_ready(&c).await;
    let leader = c.wait_leader().await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let body = http_get(c.nodes[leader].http.as_deref().expect("an HTTP address"), "/readyz")
        .await
        .unwrap()
        .1;
    assert!(body.starts_with("ready: leader"), "{body}");

    for &f in &followers {
        c.kill(f);
    }
    wait_until("the isolated leader is not ready", Duration::from_secs(30), || async {
        assert_alive(&c, leader).await;
        not_ready(&c, leader).await
    })
    .await
    .unwrap();
    let (_, body) = http_get(c.nodes[leader].http.as_deref().expect("an HTTP address"), "/readyz")
        .await
        .unwrap();
    assert!(body.starts_with("not ready: leader without a quorum ack for "), "{body}");
    assert_alive(&c, leader).await;

    for &f in &followers {
        c.restart(f);
    }
    all_ready(&c).await;
    assert_alive(&c, leader).await;
}

/// A follower that lost its leader and cannot elect another is not ready but alive, and
/// becomes ready again once a leader exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r20_follower_without_a_leader_is_not_ready_but_alive() {
    let mut c = Cluster::start(3, &[]).await;
    all_ready(&c).await;
    let leader = c.wait_leader().await;
    let (other, survivor) = ((leader + 1) % 3, (leader + 2) % 3);
    let body = http_get(c.nodes[survivor].http.as_deref().expect("an HTTP address"), "/readyz")
        .await
        .unwrap()
        .1;
    assert!(body.starts_with("ready: following leader"), "{body}");

    c.kill(leader);
    c.kill(other);
    wait_until("the lone follower is not ready", Duration::from_secs(30), || async {
        assert_alive(&c, survivor).await;
        not_ready(&c, survivor).await
    })
    .await
    .unwrap();
    let (_, body) =
        http_get(c.nodes[survivor].http.as_deref().expect("an HTTP address"), "/readyz")
            .await
            .unwrap();
    assert!(
        body.starts_with("not ready: no leader known")
            || body.starts_with("not ready: no word from leader"),
        "{body}"
    );
    assert_alive(&c, survivor).await;

    c.restart(leader);
    c.restart(other);
    all_ready(&c).await;
}
