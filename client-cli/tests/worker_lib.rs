//! The library's worker runtime (with in-process handlers) against a real cluster: graceful
//! drain at shutdown, and the loss of a session (the cluster dropped the worker) followed by
//! re-registration without reporting the abandoned attempt.

mod common;

use std::sync::{Arc, Mutex};

use client::local::wait_until;
use client::pb;
use client::worker::{
    Job, Outcome, ReportKind, StopReason, StopSignal, Worker, WorkerConfig, WorkerEvent,
};
use client::Client;
use common::{serial, Cluster, WAIT};

type Events = Arc<Mutex<Vec<WorkerEvent>>>;

fn recorder() -> (Events, impl Fn(&WorkerEvent) + Send + Sync + 'static) {
    let events: Events = Arc::default();
    let sink = events.clone();
    (events, move |e: &WorkerEvent| sink.lock().unwrap().push(e.clone()))
}

async fn wait_terminal(client: &Client, id: u64) -> pb::Task {
    tokio::time::timeout(WAIT, client.wait_task(id)).await.expect("task ended in time").unwrap()
}

#[test]
fn shutdown_finishes_held_work_then_deregisters() {
    let _serial = serial();
    let c = Cluster::start(3);
    let endpoints: Vec<String> = c.endpoints().split(',').map(str::to_string).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = Client::new(endpoints).unwrap();
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let handler = move |job: Job, _stop: StopSignal| {
            let mut release = release_rx.clone();
            async move {
                // Hold the task until the test has asked the worker to shut down.
                let _ = release.wait_for(|r| *r).await;
                Outcome::Succeeded(format!("done {}", job.task).into_bytes())
            }
        };
        let (events, sink) = recorder();
        let mut config = WorkerConfig::new("lib-drain");
        config.slots = 2;
        let handle = Worker::new(client.clone(), config, handler).on_event(sink).start();

        let id = client
            .submit(pb::TaskSpec { name: "held".into(), ..Default::default() })
            .await
            .unwrap()
            .id;
        wait_until("the job to start", WAIT, || {
            std::future::ready({
                events
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|e| matches!(e, WorkerEvent::ExecStart { task, .. } if *task == id))
                    .then_some(())
            })
        })
        .await
        .unwrap();
        handle.shutdown();
        wait_until("the worker to drain", WAIT, || {
            std::future::ready({
                events
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|e| matches!(e, WorkerEvent::Draining))
                    .then_some(())
            })
        })
        .await
        .unwrap();
        release_tx.send(true).unwrap();
        let stats =
            tokio::time::timeout(WAIT, handle.wait()).await.expect("worker stopped").unwrap();
        assert_eq!(stats.succeeded, 1, "{stats:?}");

        let t = wait_terminal(&client, id).await;
        assert_eq!(t.state, pb::TaskState::Succeeded as i32);
        assert_eq!(t.result, format!("done {id}").into_bytes());
        let evs = events.lock().unwrap().clone();
        assert!(evs.contains(&WorkerEvent::Deregistered), "{evs:?}");
        let w = client.list_workers(false).await.unwrap();
        assert!(
            w.workers.iter().all(|w| w.spec.as_ref().map(|s| s.id.as_str()) != Some("lib-drain")
                || w.status != "alive"),
            "{w:?}"
        );
    });
}

#[test]
fn a_lost_session_stops_the_attempt_and_the_worker_registers_again() {
    let _serial = serial();
    let c = Cluster::start(3);
    let endpoints: Vec<String> = c.endpoints().split(',').map(str::to_string).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = Client::new(endpoints).unwrap();
        // The first attempt runs until it is told to stop; later attempts succeed at once.
        let handler = |job: Job, mut stop: StopSignal| async move {
            if job.attempt == 1 {
                let reason = stop.stopped().await;
                return Outcome::Failed { message: format!("stopped: {reason}"), retryable: true };
            }
            Outcome::Succeeded(b"second time".to_vec())
        };
        let (events, sink) = recorder();
        let handle = Worker::new(client.clone(), WorkerConfig::new("lib-session"), handler).on_event(sink).start();

        let id = client.submit(pb::TaskSpec { name: "once".into(), ..Default::default() }).await.unwrap().id;
        let first_fence = wait_until("the first attempt to start", WAIT, || std::future::ready({
            events.lock().unwrap().iter().find_map(|e| match e {
                WorkerEvent::ExecStart { task, fence, attempt: 1 } if *task == id => Some(*fence),
                _ => None,
            })
        })).await.unwrap();
        // The cluster drops the worker (as if its heartbeats had stopped arriving).
        let session = client
            .list_workers(false)
            .await
            .unwrap()
            .workers
            .into_iter()
            .find(|w| w.spec.as_ref().is_some_and(|s| s.id == "lib-session"))
            .expect("worker listed")
            .session;
        client.deregister_worker("lib-session", session).await.unwrap();

        let t = wait_terminal(&client, id).await;
        assert_eq!(t.state, pb::TaskState::Succeeded as i32, "{t:?}");
        assert_eq!(t.result, b"second time");
        assert!(t.attempt >= 2, "{t:?}");

        let evs = events.lock().unwrap().clone();
        assert!(evs.iter().any(|e| matches!(e, WorkerEvent::SessionLost { session: s } if *s == session)), "{evs:?}");
        assert!(
            // The server revokes what it takes back and then refuses the session; whichever
            // arrives first stops the attempt.
            evs.iter().any(|e| matches!(e, WorkerEvent::Stopping { task, fence, reason: StopReason::SessionLost | StopReason::Revoked }
                if *task == id && *fence == first_fence)),
            "{evs:?}"
        );
        let sessions = evs.iter().filter(|e| matches!(e, WorkerEvent::Registered { .. })).count();
        assert!(sessions >= 2, "registered again: {evs:?}");
        // The abandoned attempt's outcome was never reported.
        assert!(
            !evs.iter().any(|e| matches!(e, WorkerEvent::ReportSent { task, fence, kind }
                if *task == id && *fence == first_fence && *kind != ReportKind::Started)),
            "{evs:?}"
        );
        handle.stop_now();
        tokio::time::timeout(WAIT, handle.wait()).await.expect("worker stopped").unwrap();
    });
}
