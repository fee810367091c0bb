//! schedulerd end to end: 3 real server processes on loopback, raw gRPC clients, in-test
//! workers. Waits poll conditions with deadlines; nothing asserts on timing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::*;
use proto::pb;
use proto::pb::workers_client::WorkersClient;

fn batch_state(e: &pb::TaskEvent) -> &'static str {
    proto::convert::state_name(e.state)
}

/// A DAG submitted through a follower runs to completion, in dependency order and, among
/// ready tasks, in priority order, on two workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_dag_through_a_follower_respects_dependencies_and_priorities() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let addrs = c.addrs();
    let w1 = TestWorker::spawn(addrs.clone(), "w1", 1, Duration::from_millis(150));
    let w2 = TestWorker::spawn(addrs.clone(), "w2", 1, Duration::from_millis(150));
    // Both workers registered before the submit, so the first plan sees every ready task.
    wait_until("workers registered", Duration::from_secs(30), || async {
        let mut w = c.workers(0).await;
        w.list_workers(pb::ListWorkersRequest { stale_ok: false }).await.is_ok_and(|r| {
            r.into_inner().workers.iter().filter(|w| w.status == "alive").count() == 2
        })
    })
    .await
    .unwrap();

    // 0:a(0) 1:b(5, after a) 2:c(1, after a) 3:d(0, after b and c) 4:e(10) 5:f(-1) 6:g(3)
    let mut tasks = vec![
        spec("a", 0),
        spec("b", 5),
        spec("c", 1),
        spec("d", 0),
        spec("e", 10),
        spec("f", -1),
        spec("g", 3),
    ];
    tasks[1].depends_on_batch = vec![0];
    tasks[2].depends_on_batch = vec![0];
    tasks[3].depends_on_batch = vec![1, 2];
    let mut client = c.tasks(follower).await;
    let resp = client
        .submit_tasks(pb::SubmitTasksRequest { tasks })
        .await
        .expect("submit via follower")
        .into_inner();
    let ids: Vec<u64> = resp.tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids.len(), 7);
    let prio: HashMap<u64, i32> = ids.iter().copied().zip([0, 5, 1, 0, 10, -1, 3]).collect();
    let deps: HashMap<u64, Vec<u64>> = HashMap::from([
        (ids[1], vec![ids[0]]),
        (ids[2], vec![ids[0]]),
        (ids[3], vec![ids[1], ids[2]]),
    ]);

    let events = events_until(&c.nodes[follower].addr, |bs| {
        bs.iter().flat_map(|b| &b.events).filter(|e| batch_state(e) == "succeeded").count() == 7
    })
    .await;
    let final_tasks = all_tasks(&addrs).await;
    assert!(final_tasks.values().all(|t| state(t) == "succeeded"));

    // Dependency order: a task is assigned only after every dependency succeeded.
    // Events of one entry are in apply order, so a dependent assigned in the entry of its
    // dependency's completion (the leader plans it ahead) comes after that completion.
    let mut succeeded_at = HashMap::new();
    let mut same_entry = 0;
    let mut queued: BTreeMap<u64, i32> = BTreeMap::new();
    for b in &events {
        let assigned: Vec<u64> =
            b.events.iter().filter(|e| batch_state(e) == "assigned").map(|e| e.task).collect();
        for e in &b.events {
            match batch_state(e) {
                "succeeded" => {
                    succeeded_at.insert(e.task, b.index);
                }
                "queued" => {
                    queued.insert(e.task, prio[&e.task]);
                }
                "assigned" => {
                    queued.remove(&e.task);
                    for d in deps.get(&e.task).into_iter().flatten() {
                        assert!(
                            succeeded_at.get(d).is_some_and(|i| *i <= b.index),
                            "task {} assigned before dep {d}",
                            e.task
                        );
                    }
                    let last_dep = deps.get(&e.task).and_then(|ds| {
                        ds.iter().filter_map(|d| succeeded_at.get(d)).max().copied()
                    });
                    same_entry += usize::from(last_dep == Some(b.index));
                }
                _ => {}
            }
        }
        // Priority: nothing left queued may outrank a task assigned in this entry (workers
        // are identical, so every queued task could have gone to either).
        if let Some(lowest) = assigned.iter().map(|t| prio[t]).min() {
            let best_left = queued.values().max().copied();
            assert!(
                best_left.is_none_or(|p| p <= lowest),
                "priority inversion at index {}: {queued:?}",
                b.index
            );
        }
    }
    // b, c and d each become ready with a completion while a worker frees up; the leader
    // assigns at least one of them in that completion's entry.
    assert!(same_entry >= 1, "no dependent was planned ahead of its release");
    // The highest priority ready task went first.
    let first: Vec<u64> = events
        .iter()
        .flat_map(|b| &b.events)
        .filter(|e| batch_state(e) == "assigned")
        .map(|e| e.task)
        .take(2)
        .collect();
    assert!(
        first.contains(&ids[4]),
        "e (priority 10) is among the first two assignments: {first:?}"
    );
    assert!(!first.contains(&ids[5]), "f (priority -1) is not");
    let mut all: Vec<u64> = w1.accepted();
    all.extend(w2.accepted());
    all.sort();
    assert_eq!(all, ids, "each task completed exactly once");
}

/// The leader is SIGKILLed mid-run: every task still completes, with exactly one accepted
/// completion, and the leader change by itself reassigns nothing.
/// A task's assignment carries the results of its dependencies, in submitted order, so a
/// chain step can take what the step before it returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t15_assignment_carries_dependency_results() {
    let c = Cluster::start(1, &[]).await;
    let addrs = c.addrs();
    let mut w = SilentWorker::register(&addrs, "w-deps").await;
    let (a, b) = (spec("a", 0), spec("b", 0));
    let mut joined = spec("joined", 0);
    joined.depends_on_batch = vec![1, 0];
    let ids = submit(&addrs, vec![a, b, joined]).await;
    for _ in 0..2 {
        let first = w.next_assignment().await;
        assert!(first.dependencies.is_empty(), "{first:?}");
        assert!(w.report_success(first.task, first.fence).await.accepted);
    }
    let last = w.next_assignment().await;
    assert_eq!(last.task, ids[2]);
    let deps: Vec<(u64, &[u8])> =
        last.dependencies.iter().map(|d| (d.task, d.result.as_slice())).collect();
    assert_eq!(deps, vec![(ids[1], &b"done"[..]), (ids[0], &b"done"[..])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_leader_killed_mid_run_every_task_completes_once() {
    let mut c = Cluster::start(3, &["--failover-grace", "5s"]).await;
    let addrs = c.addrs();
    let w1 = TestWorker::spawn(addrs.clone(), "w1", 2, Duration::from_millis(200));
    let w2 = TestWorker::spawn(addrs.clone(), "w2", 2, Duration::from_millis(200));
    let tasks: Vec<pb::TaskSpec> = (0..40).map(|i| spec(&format!("t{i}"), 0)).collect();
    let ids = submit(&addrs, tasks).await;
    wait_until("some tasks done", Duration::from_secs(60), || async {
        w1.accepted().len() + w2.accepted().len() >= 6
    })
    .await
    .unwrap();
    let leader = c.wait_leader().await;
    c.kill(leader);
    let live = c.addrs();
    wait_until("a new leader", Duration::from_secs(30), || async {
        c.leader().await.is_some_and(|l| l != leader)
    })
    .await
    .unwrap();
    wait_until("all tasks succeeded", Duration::from_secs(120), || async {
        let t = all_tasks(&live).await;
        t.len() == ids.len() && t.values().all(|t| state(t) == "succeeded")
    })
    .await
    .unwrap();
    let mut accepted: Vec<u64> = w1.accepted();
    accepted.extend(w2.accepted());
    accepted.sort();
    assert_eq!(accepted, ids, "exactly one accepted completion per task");
    let final_tasks = all_tasks(&live).await;
    assert!(
        final_tasks.values().all(|t| t.attempt == 1),
        "a leader change must not reassign tasks"
    );
}

/// A worker that stops heartbeating loses its task: it is reassigned with a new fencing
/// token, and the first worker's late completion is rejected as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_silent_worker_loses_its_task_and_its_late_completion_is_rejected() {
    let c = Cluster::start(
        3,
        &["--heartbeat-ttl", "1s", "--heartbeat-interval", "200ms", "--failover-grace", "1s"],
    )
    .await;
    let addrs = c.addrs();
    // The silent worker speaks raw RPCs on purpose: it keeps its task after going silent and
    // reports late, which the library runtime never does.
    let mut slow = SilentWorker::register(&addrs, "z-silent").await;
    let mut t = spec("victim", 0);
    t.retry = Some(pb::RetryPolicy { max_attempts: 5, ..Default::default() });
    let id = submit(&addrs, vec![t]).await[0];
    let first = slow.next_assignment().await;
    assert_eq!(first.task, id, "the silent worker got the task");
    let first_fence = first.fence;
    // It goes silent; a healthy worker arrives (its id sorts first, so it wins ties).
    slow.go_silent();
    let healthy = TestWorker::spawn(addrs.clone(), "a-healthy", 1, Duration::from_millis(10));
    wait_until("the healthy worker completed it", Duration::from_secs(60), || async {
        healthy.accepted() == vec![id]
    })
    .await
    .unwrap();
    let second_fence = healthy.execs.lock().unwrap()[0].fence;
    assert!(second_fence > first_fence, "the new attempt has a larger fencing token");
    // Now the silent worker reports its (late) completion: refused as stale.
    let late = slow.report_success(id, first_fence).await;
    assert!(!late.accepted);
    assert!(late.refused.as_deref().is_some_and(|r| r.contains("stale")), "{late:?}");
    let task = all_tasks(&addrs).await.remove(&id).unwrap();
    assert_eq!(state(&task), "succeeded");
    assert_eq!(task.fence, second_fence);
    assert_eq!(task.attempt, 2);
}

fn reason(s: &tonic::Status) -> String {
    s.metadata().get("x-raftsched-reason").and_then(|v| v.to_str().ok()).unwrap_or("").to_string()
}

/// Bad requests get the documented codes, name the problem, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t40_bad_requests_get_documented_codes_and_change_nothing() {
    let c = Cluster::start(3, &[]).await;
    let addrs = c.addrs();
    let mut tasks = c.tasks(0).await;
    let ok = tasks
        .submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec("good", 0)] })
        .await
        .unwrap()
        .into_inner();
    let good = ok.tasks[0].id;
    let before = all_tasks(&addrs).await;

    let submitter = tasks.clone();
    let submit = |t: Vec<pb::TaskSpec>| {
        let mut tasks = submitter.clone();
        async move { tasks.submit_tasks(pb::SubmitTasksRequest { tasks: t }).await.unwrap_err() }
    };
    let e =
        submit(vec![spec("fine", 0), pb::TaskSpec { name: String::new(), ..Default::default() }])
            .await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("tasks[1].name"), "{}", e.message());

    let mut dep = spec("dep", 0);
    dep.depends_on = vec![999_999];
    let e = submit(vec![dep]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("tasks[0].depends_on[0]"), "{}", e.message());
    assert_eq!(reason(&e), "unknown_dependency");

    let (mut x, mut y) = (spec("x", 0), spec("y", 0));
    x.depends_on_batch = vec![1];
    y.depends_on_batch = vec![0];
    let e = submit(vec![x, y]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(reason(&e), "dependency_cycle");

    let mut big = spec("big", 0);
    big.payload = vec![0u8; 300 << 10];
    let e = submit(vec![big]).await;
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("tasks[0].payload"), "{}", e.message());

    let e = tasks.get_task(pb::GetTaskRequest { id: 424_242, stale_ok: false }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    let mut workers = WorkersClient::new(channel(&addrs[0]).await);
    let e = workers
        .complete_task(pb::CompleteTaskRequest {
            worker_id: "nobody".into(),
            task: good,
            fence: 77,
            result: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason(&e), "stale_fence");

    let e = workers
        .register_worker(pb::RegisterWorkerRequest {
            worker: Some(pb::WorkerSpec {
                id: "w".into(),
                queues: vec!["default".into()],
                slots: 0,
                ..Default::default()
            }),
            instance: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("worker.slots"), "{}", e.message());

    let e = tasks
        .list_tasks(pb::ListTasksRequest { states: vec![99], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("states[0]"), "{}", e.message());

    // A message over the size limit is refused by the transport.
    let huge: Vec<pb::TaskSpec> = (0..20)
        .map(|i| {
            let mut t = spec(&format!("h{i}"), 0);
            t.payload = vec![1u8; 1 << 20];
            t
        })
        .collect();
    let e = submit(huge).await;
    assert!(matches!(e.code(), tonic::Code::OutOfRange | tonic::Code::ResourceExhausted), "{e:?}");

    assert_eq!(all_tasks(&addrs).await, before, "refused requests changed nothing");
}

/// A generic gRPC client can use a node: health answers SERVING, reflection lists services.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_health_and_reflection() {
    let c = Cluster::start(1, &[]).await;
    let ch = channel(&c.nodes[0].addr).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", "scheduler.v1.Tasks", "scheduler.v1.Workers", "scheduler.v1.Cluster"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
            .await
            .unwrap();
        assert_eq!(
            r.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream =
        refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "scheduler.v1.Tasks",
        "scheduler.v1.Workers",
        "scheduler.v1.Cluster",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }

    // The older v1alpha protocol answers too (some clients speak only it).
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as Alpha;
    use tonic_reflection::pb::v1alpha::{
        server_reflection_request::MessageRequest as AlphaRequest,
        server_reflection_response::MessageResponse as AlphaResponse,
        ServerReflectionRequest as AlphaReq,
    };
    let req = AlphaReq {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut stream =
        Alpha::new(ch).server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap();
    let resp = stream.get_mut().message().await.unwrap().unwrap();
    let Some(AlphaResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    assert!(list.service.iter().any(|s| s.name == "scheduler.v1.Tasks"), "{list:?}");
}
