//! The client's routing and retry rules against scripted in-process `Tasks` servers: leader
//! hints to unlisted nodes, a lost answer resolved by the idempotency key, final codes never
//! retried, per-attempt deadlines, and the "outcome unknown" verdict when the budget runs out.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::error::{Error, Reason, REASON_KEY};
use client::pb;
use client::pb::tasks_server::{Tasks, TasksServer};
use client::{Client, ClientConfig};
use futures::Stream;
use tonic::{Code, Request, Response, Status};

/// What the fake node does with the next submit.
#[derive(Clone, Debug)]
enum Step {
    /// Apply and answer.
    Ok,
    /// Refuse with UNAVAILABLE (not_leader), with an optional leader hint.
    Unavailable(Option<String>),
    /// Apply, then lose the answer (UNAVAILABLE).
    ApplyThenUnavailable,
    /// Answer only after this long.
    Hang(Duration),
    /// A final error.
    Fail(Code, &'static str),
}

#[derive(Default)]
struct State {
    script: VecDeque<Step>,
    /// What happens once the script is used up.
    then: Option<Step>,
    keys_seen: Vec<String>,
    tasks: HashMap<String, u64>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

impl Fake {
    fn scripted(script: Vec<Step>, then: Step) -> Fake {
        Fake(Arc::new(Mutex::new(State {
            script: script.into(),
            then: Some(then),
            ..Default::default()
        })))
    }

    fn calls(&self) -> usize {
        self.0.lock().unwrap().keys_seen.len()
    }

    fn apply(&self, keys: &[String]) -> pb::SubmitTasksResponse {
        let mut st = self.0.lock().unwrap();
        let mut out = Vec::new();
        for k in keys {
            let next = st.tasks.len() as u64 + 1;
            let created = !st.tasks.contains_key(k);
            let id = *st.tasks.entry(k.clone()).or_insert(next);
            out.push(pb::SubmittedTask { id, created, state: pb::TaskState::Queued as i32 });
        }
        pb::SubmitTasksResponse { tasks: out, log_index: 1 }
    }
}

fn unavailable(hint: Option<&str>) -> Status {
    let mut s = Status::unavailable("not the leader");
    s.metadata_mut().insert(REASON_KEY, "not_leader".parse().unwrap());
    if let Some(h) = hint {
        s.metadata_mut().insert(proto::status::LEADER_HINT_KEY, h.parse().unwrap());
    }
    s
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Tasks for Fake {
    async fn submit_tasks(
        &self,
        request: Request<pb::SubmitTasksRequest>,
    ) -> Result<Response<pb::SubmitTasksResponse>, Status> {
        let keys: Vec<String> =
            request.into_inner().tasks.into_iter().map(|t| t.idempotency_key).collect();
        let step = {
            let mut st = self.0.lock().unwrap();
            st.keys_seen.extend(keys.iter().cloned());
            st.script.pop_front().or_else(|| st.then.clone()).unwrap_or(Step::Ok)
        };
        match step {
            Step::Ok => Ok(Response::new(self.apply(&keys))),
            Step::Unavailable(hint) => Err(unavailable(hint.as_deref())),
            Step::ApplyThenUnavailable => {
                self.apply(&keys);
                Err(unavailable(None))
            }
            Step::Hang(d) => {
                tokio::time::sleep(d).await;
                Ok(Response::new(self.apply(&keys)))
            }
            Step::Fail(code, reason) => {
                let mut s = Status::new(code, "tasks[0].name: is required");
                s.metadata_mut().insert(REASON_KEY, reason.parse().unwrap());
                Err(s)
            }
        }
    }

    async fn get_task(&self, _: Request<pb::GetTaskRequest>) -> Result<Response<pb::Task>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_tasks(
        &self,
        _: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn cancel_tasks(
        &self,
        _: Request<pb::CancelTasksRequest>,
    ) -> Result<Response<pb::CancelTasksResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn explain_task(
        &self,
        _: Request<pb::ExplainTaskRequest>,
    ) -> Result<Response<pb::ExplainTaskResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn retry_task(
        &self,
        _: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn pause_queue(
        &self,
        _: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn resume_queue(
        &self,
        _: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_queues(
        &self,
        _: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchTaskStream = BoxStream<pb::Task>;

    async fn watch_task(
        &self,
        _: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        Err(Status::unimplemented("fake"))
    }

    type WatchEventsStream = BoxStream<pb::EventBatch>;

    async fn watch_events(
        &self,
        _: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves `fake` on a free loopback port; returns its address.
async fn serve(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TasksServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    addr
}

fn spec() -> pb::TaskSpec {
    pb::TaskSpec { name: "t".into(), ..Default::default() }
}

fn client(endpoints: Vec<String>, budget: Duration, call_timeout: Duration) -> Client {
    Client::with_config(ClientConfig {
        retry_budget: budget,
        call_timeout,
        ..ClientConfig::new(endpoints)
    })
    .unwrap()
}

#[tokio::test]
async fn a_leader_hint_redirects_to_an_unlisted_node() {
    let leader = Fake::scripted(vec![], Step::Ok);
    let leader_addr = serve(leader.clone()).await;
    let follower = Fake::scripted(vec![], Step::Unavailable(Some(format!("2@{leader_addr}"))));
    let follower_addr = serve(follower.clone()).await;

    let c = client(vec![follower_addr.clone()], Duration::from_secs(10), Duration::from_secs(5));
    let s = c.submit(spec()).await.unwrap();
    assert!(s.created);
    assert_eq!(follower.calls(), 1);
    assert_eq!(leader.calls(), 1);
    // The leader is remembered: the next call goes there directly.
    assert_eq!(c.preferred_endpoint(), leader_addr);
    c.submit(spec()).await.unwrap();
    assert_eq!(follower.calls(), 1);
    assert!(c.endpoints().contains(&leader_addr));
}

#[tokio::test]
async fn a_lost_answer_is_resolved_by_the_same_key() {
    let node = Fake::scripted(vec![Step::ApplyThenUnavailable], Step::Ok);
    let addr = serve(node.clone()).await;
    let c = client(vec![addr], Duration::from_secs(10), Duration::from_secs(5));
    let s = c.submit(spec()).await.unwrap();
    let st = node.0.lock().unwrap();
    assert_eq!(st.keys_seen.len(), 2, "one retry");
    assert_eq!(st.keys_seen[0], st.keys_seen[1], "the retry carries the same key");
    assert!(!st.keys_seen[0].is_empty(), "a key was generated before the first attempt");
    assert_eq!(st.tasks.len(), 1, "no second task");
    assert!(!s.created, "the retry found the task the first attempt created");
}

#[tokio::test]
async fn final_codes_are_never_retried() {
    let node = Fake::scripted(vec![], Step::Fail(Code::InvalidArgument, "invalid_argument"));
    let addr = serve(node.clone()).await;
    let c = client(vec![addr], Duration::from_secs(10), Duration::from_secs(5));
    let e = c.submit(spec()).await.unwrap_err();
    assert_eq!(node.calls(), 1);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.reason(), Some(&Reason::InvalidArgument));
    assert!(e.message().contains("tasks[0].name"), "{e}");
    assert!(!e.is_indeterminate());
    assert_eq!(e.exit_code(), 1);

    let node = Fake::scripted(vec![], Step::Fail(Code::FailedPrecondition, "stale_fence"));
    let addr = serve(node.clone()).await;
    let e = client(vec![addr], Duration::from_secs(10), Duration::from_secs(5))
        .submit(spec())
        .await
        .unwrap_err();
    assert_eq!(node.calls(), 1);
    assert!(e.is_stale_attempt());
}

#[tokio::test]
async fn a_slow_node_times_out_and_the_next_one_answers() {
    let slow = Fake::scripted(vec![], Step::Hang(Duration::from_secs(30)));
    let slow_addr = serve(slow.clone()).await;
    let fast = Fake::scripted(vec![], Step::Ok);
    let fast_addr = serve(fast.clone()).await;
    let c = client(
        vec![slow_addr, fast_addr.clone()],
        Duration::from_secs(20),
        Duration::from_millis(300),
    );
    c.submit(spec()).await.unwrap();
    assert_eq!(slow.calls(), 1);
    assert_eq!(fast.calls(), 1);
    assert_eq!(c.preferred_endpoint(), fast_addr);
}

#[tokio::test]
async fn an_exhausted_budget_reports_an_unknown_outcome() {
    let node = Fake::scripted(vec![], Step::Unavailable(None));
    let addr = serve(node.clone()).await;
    let c = client(vec![addr], Duration::from_millis(400), Duration::from_secs(5));
    let e = c.submit(spec()).await.unwrap_err();
    assert!(matches!(e, Error::Exhausted { .. }), "{e:?}");
    assert!(node.calls() > 1, "it retried");
    assert!(e.is_indeterminate(), "UNAVAILABLE after sending: the outcome is unknown");
    assert!(e.is_unavailable());
    assert_eq!(e.exit_code(), 3);
}

#[tokio::test]
async fn a_refused_connection_proves_nothing_was_sent() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = client(
        vec![format!("127.0.0.1:{port}")],
        Duration::from_millis(300),
        Duration::from_secs(1),
    );
    let e = c.submit(spec()).await.unwrap_err();
    let Error::Exhausted { last, maybe_applied, .. } = &e else { panic!("{e:?}") };
    assert!(matches!(**last, Error::Transport { maybe_sent: false, .. }), "{last:?}");
    assert!(!maybe_applied);
    assert!(!e.is_indeterminate());
    assert_eq!(e.exit_code(), 3);
}
