//! The `Tasks` service: submit, get, list, cancel, retry, explain, watch one task, the event
//! stream of applied changes (resumable from a log index), and the queues: pause, resume and
//! list them.

use std::sync::Arc;

use proto::convert;
use proto::pb;
use raft::events::ReadError;
use raft::node::now_ms;
use state_machine::{
    validate, CancelOutcome, NewTask, Op, Output, Rejection, SchedulerState, TaskId, TaskStateKind,
    WorkerStatus,
};
use tonic::{Request, Response, Status};

use super::{answer, open_stream, wait_more, BoxStream};
use crate::auth::{self, Caller};
use crate::error::{NodeError, NodeResult};
use crate::streams::StreamKind;
use crate::Node;

/// Implements `scheduler.v1.Tasks`.
pub struct TasksApi {
    node: Arc<Node>,
}

impl TasksApi {
    /// The service of `node`.
    pub fn new(node: Arc<Node>) -> Self {
        TasksApi { node }
    }

    async fn submit(&self, req: pb::SubmitTasksRequest) -> NodeResult<pb::SubmitTasksResponse> {
        let node = &self.node;
        let tasks: Vec<NewTask> = req.tasks.into_iter().map(convert::new_task_from_pb).collect();
        validate::submit_batch(&tasks, now_ms(), &node.cfg.limits.fields)?;
        let pending = node.local(|s| {
            s.counts()
                .iter()
                .zip(TaskStateKind::ALL)
                .filter(|(_, k)| !k.is_terminal())
                .map(|(n, _)| n)
                .sum::<u64>()
        });
        let limit = node.cfg.limits.max_pending_tasks;
        if pending + tasks.len() as u64 > limit {
            return Err(NodeError::Exhausted(format!(
                "the cluster holds {pending} unfinished tasks (limit {limit}); wait for tasks to finish or raise limits.max_pending_tasks"
            )));
        }
        let (index, out) = node.write(Op::Submit { tasks }).await?;
        match out {
            Output::Submitted(v) => Ok(pb::SubmitTasksResponse {
                tasks: v
                    .into_iter()
                    .map(|s| pb::SubmittedTask {
                        id: s.id.0,
                        created: s.created,
                        state: convert::state_to_pb(s.state) as i32,
                    })
                    .collect(),
                log_index: index,
            }),
            other => Err(NodeError::Internal(format!("submit answered {other:?}"))),
        }
    }

    async fn get(&self, req: pb::GetTaskRequest) -> NodeResult<pb::Task> {
        let id = TaskId(req.id);
        self.node
            .read(req.stale_ok, |s| s.task(id).map(|t| convert::task_to_pb(t, true)))
            .await?
            .ok_or_else(|| Rejection::TaskNotFound { task: id }.into())
    }

    /// One page of tasks, oldest or newest first. A page scans at most `MAX_SCAN` records
    /// (filters may skip most of them), so a page can be short yet not the last; the token is
    /// the last id scanned and the next page continues after it in the same order. The count
    /// of matching tasks beyond the page is bounded the same way.
    async fn list(&self, req: pb::ListTasksRequest) -> NodeResult<pb::ListTasksResponse> {
        const MAX_SCAN: usize = 100_000;
        let states = req
            .states
            .iter()
            .enumerate()
            .map(|(i, v)| convert::state_from_pb(&format!("states[{i}]"), *v))
            .collect::<Result<Vec<_>, _>>()?;
        let limit = match req.limit {
            0 => 100,
            n => n.min(1_000) as usize,
        };
        let since = req.created_since_ms;
        self.node
            .read(req.stale_ok, |s| {
                let matches = |t: &state_machine::Task| {
                    (states.is_empty() || states.contains(&t.state.kind()))
                        && (req.queue.is_empty() || t.spec.queue == req.queue)
                        && (req.name.is_empty() || t.spec.name == req.name)
                        && t.submitted_at >= since
                };
                let scan: Box<dyn Iterator<Item = &state_machine::Task>> = if req.newest_first {
                    let below = match req.page_token {
                        0 => TaskId(u64::MAX),
                        t => TaskId(t),
                    };
                    // Ids grow with log time, so nothing older than `since` follows.
                    Box::new(s.tasks_before(below).take_while(|t| t.submitted_at >= since))
                } else {
                    Box::new(s.tasks_from(TaskId(req.page_token.saturating_add(1))))
                };
                let mut tasks = Vec::new();
                let mut last = None;
                let mut remaining = 0u64;
                let mut capped = false;
                for (scanned, t) in scan.enumerate() {
                    if scanned == MAX_SCAN {
                        capped = true;
                        break;
                    }
                    if tasks.len() < limit {
                        last = Some(t.id.0);
                        if matches(t) {
                            tasks.push(convert::task_to_pb(t, req.include_payload));
                        }
                    } else if matches(t) {
                        remaining += 1;
                    }
                }
                // Beyond the scan bound nobody looked, so a capped scan always has a next page.
                let more = remaining > 0 || capped;
                pb::ListTasksResponse {
                    tasks,
                    next_page_token: if more { last.unwrap_or(0) } else { 0 },
                    remaining,
                    remaining_is_lower_bound: capped,
                }
            })
            .await
    }

    async fn cancel(&self, req: pb::CancelTasksRequest) -> NodeResult<pb::CancelTasksResponse> {
        if req.ids.is_empty() {
            return Err(Rejection::invalid("ids", "name at least one task").into());
        }
        let ids: Vec<TaskId> = req.ids.iter().map(|i| TaskId(*i)).collect();
        let reason = validate::truncate_message(&req.reason, 1024);
        let (_, out) = self.node.write(Op::Cancel { ids: ids.clone(), reason }).await?;
        let Output::Cancelled(results) = out else {
            return Err(NodeError::Internal(format!("cancel answered {out:?}")));
        };
        Ok(pb::CancelTasksResponse {
            results: ids
                .iter()
                .zip(results)
                .map(|(id, r)| match r {
                    Ok(CancelOutcome::Cancelled { dependents }) => pb::CancelResult {
                        id: id.0,
                        ok: true,
                        upstream_failed: dependents.iter().map(|d| d.0).collect(),
                        ..Default::default()
                    },
                    Ok(CancelOutcome::AlreadyCancelled) => pb::CancelResult {
                        id: id.0,
                        ok: true,
                        already_cancelled: true,
                        ..Default::default()
                    },
                    Err(e) => pb::CancelResult {
                        id: id.0,
                        ok: false,
                        error: e.to_string(),
                        ..Default::default()
                    },
                })
                .collect(),
        })
    }

    async fn retry(&self, req: pb::RetryTaskRequest) -> NodeResult<pb::RetryTaskResponse> {
        let op = Op::RetryTask { task: TaskId(req.id), with_dependents: req.with_dependents };
        let (index, out) = self.node.write(op).await?;
        let Output::Retried(tasks) = out else {
            return Err(NodeError::Internal(format!("retry answered {out:?}")));
        };
        Ok(pb::RetryTaskResponse {
            tasks: tasks
                .into_iter()
                .map(|(id, state)| pb::RetriedTask {
                    id: id.0,
                    state: convert::state_to_pb(state) as i32,
                })
                .collect(),
            log_index: index,
        })
    }

    /// Pause (`true`) or resume a queue; answers the queue as the apply left it.
    async fn set_paused(&self, queue: String, pause: bool) -> NodeResult<(pb::QueueInfo, bool)> {
        validate::ident("queue", &queue, &self.node.cfg.limits.fields)?;
        let op = if pause {
            Op::PauseQueue { queue: queue.clone() }
        } else {
            Op::ResumeQueue { queue: queue.clone() }
        };
        let (_, out) = self.node.write(op).await?;
        let Output::QueueUpdated { changed, .. } = out else {
            return Err(NodeError::Internal(format!("queue update answered {out:?}")));
        };
        Ok((self.node.local(|s| queue_info(s, &queue)), changed))
    }

    async fn queues(&self, req: pb::ListQueuesRequest) -> NodeResult<pb::ListQueuesResponse> {
        self.node
            .read(req.stale_ok, |s| {
                let mut names: std::collections::BTreeSet<String> =
                    s.queue_depths().into_keys().collect();
                names.extend(s.paused_queues().map(|q| q.queue.clone()));
                for w in s.workers().filter(|w| w.status.is_live()) {
                    names.extend(w.spec.queues.iter().cloned());
                }
                pb::ListQueuesResponse { queues: names.iter().map(|n| queue_info(s, n)).collect() }
            })
            .await
    }

    async fn explain(&self, req: pb::ExplainTaskRequest) -> NodeResult<pb::ExplainTaskResponse> {
        let id = TaskId(req.id);
        self.node
            .read(req.stale_ok, |s| {
                let task = s.task(id)?;
                s.explain(id).map(|e| convert::explanation_to_pb(task, &e))
            })
            .await?
            .ok_or_else(|| Rejection::TaskNotFound { task: id }.into())
    }
}

#[tonic::async_trait]
impl pb::tasks_server::Tasks for TasksApi {
    async fn submit_tasks(
        &self,
        req: Request<pb::SubmitTasksRequest>,
    ) -> Result<Response<pb::SubmitTasksResponse>, Status> {
        answer(&self.node, self.submit(req.into_inner()).await)
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        let view = View::of(&req);
        answer(&self.node, self.get(req.into_inner()).await.map(|t| view.task(t)))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let view = View::of(&req);
        let page = self.list(req.into_inner()).await.map(|mut page| {
            page.tasks = page.tasks.into_iter().map(|t| view.task(t)).collect();
            page
        });
        answer(&self.node, page)
    }

    async fn cancel_tasks(
        &self,
        req: Request<pb::CancelTasksRequest>,
    ) -> Result<Response<pb::CancelTasksResponse>, Status> {
        answer(&self.node, self.cancel(req.into_inner()).await)
    }

    async fn explain_task(
        &self,
        req: Request<pb::ExplainTaskRequest>,
    ) -> Result<Response<pb::ExplainTaskResponse>, Status> {
        let view = View::of(&req);
        let explained = self.explain(req.into_inner()).await.map(|mut e| {
            if view.hides(&e.worker) {
                e.fence = 0;
            }
            e
        });
        answer(&self.node, explained)
    }

    async fn retry_task(
        &self,
        req: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        answer(&self.node, self.retry(req.into_inner()).await)
    }

    async fn pause_queue(
        &self,
        req: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::PauseQueueResponse>, Status> {
        let r = self.set_paused(req.into_inner().queue, true).await;
        answer(&self.node, r.map(|(q, changed)| pb::PauseQueueResponse { queue: Some(q), changed }))
    }

    async fn resume_queue(
        &self,
        req: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::ResumeQueueResponse>, Status> {
        let r = self.set_paused(req.into_inner().queue, false).await;
        answer(
            &self.node,
            r.map(|(q, changed)| pb::ResumeQueueResponse { queue: Some(q), changed }),
        )
    }

    async fn list_queues(
        &self,
        req: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        answer(&self.node, self.queues(req.into_inner()).await)
    }

    type WatchTaskStream = BoxStream<pb::Task>;

    async fn watch_task(
        &self,
        req: Request<pb::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let view = View::of(&req);
        let id = TaskId(req.into_inner().id);
        let node = self.node.clone();
        let events = node.raft.sm().events().clone();
        let mut cursor = events.applied();
        let first =
            answer(&node, self.get(pb::GetTaskRequest { id: id.0, stale_ok: false }).await)?
                .into_inner();
        let (tx, stream) = open_stream(&node, StreamKind::Task)?;
        tokio::spawn(async move {
            let mut applied = events.subscribe();
            let mut last = first.clone();
            if tx.send(Ok(view.task(first))).await.is_err() || is_terminal(&last) {
                return;
            }
            loop {
                let changed = match events.read_after(cursor, 1_024) {
                    Ok((batches, next)) => {
                        cursor = next;
                        batches.iter().any(|b| b.events.iter().any(|e| e.task == id))
                    }
                    Err(_) => {
                        cursor = events.applied();
                        true
                    }
                };
                if changed {
                    let Some(now) =
                        node.local(|s| s.task(id).map(|t| convert::task_to_pb(t, true)))
                    else {
                        let _ = tx
                            .send(Err(NodeError::Gone(format!("task {id} was purged")).into()))
                            .await;
                        return;
                    };
                    if now != last {
                        last = now.clone();
                        if tx.send(Ok(view.task(now))).await.is_err() || is_terminal(&last) {
                            return;
                        }
                    }
                }
                if !wait_more(&node, &mut applied, cursor, &tx).await {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    type WatchEventsStream = BoxStream<pb::EventBatch>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let view = View::of(&req);
        let from = req.into_inner().from_index;
        let node = self.node.clone();
        let events = node.raft.sm().events().clone();
        let mut cursor = if from == 0 { events.applied() } else { from - 1 };
        // Refuse a start that is already gone instead of opening a stream that fails at once.
        if let Err(e) = events.read_after(cursor, 0) {
            return Err(resume_error(e));
        }
        let (tx, stream) = open_stream(&node, StreamKind::Events)?;
        tokio::spawn(async move {
            let mut applied = events.subscribe();
            loop {
                match events.read_after(cursor, 256) {
                    Ok((batches, next)) => {
                        for b in batches {
                            let msg = pb::EventBatch {
                                index: b.index,
                                log_time_ms: b.log_time,
                                events: b
                                    .events
                                    .iter()
                                    .map(|e| view.event(convert::event_to_pb(e)))
                                    .collect(),
                                term: b.term,
                                planned_at: b.planned_at,
                            };
                            // Waits while the client is behind; a client that takes nothing
                            // for the stall timeout is dropped with the index to resume from
                            // (crate::streams), never buffered for without bound.
                            if tx.send_resumable(msg, b.index).await.is_err() {
                                return;
                            }
                        }
                        cursor = next;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(resume_error(e))).await;
                        return;
                    }
                }
                if !wait_more(&node, &mut applied, cursor, &tx).await {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// What a caller may see of fencing tokens. A fence lets its holder report the attempt, so it
/// is shown only to admins, to workers that may act for the holder, and to everyone when
/// authentication is off. Holder names stay visible: a name grants nothing, since acting as a
/// worker takes a worker token whose prefix covers it.
#[derive(Clone)]
struct View(Option<Caller>);

impl View {
    fn of<T>(req: &Request<T>) -> View {
        View(auth::caller_of(req).cloned())
    }

    fn hides(&self, worker: &str) -> bool {
        self.0.as_ref().is_some_and(|c| !c.sees_fence_of(worker))
    }

    fn task(&self, mut t: pb::Task) -> pb::Task {
        if self.hides(&t.worker) {
            t.fence = 0;
        }
        t
    }

    fn event(&self, mut e: pb::TaskEvent) -> pb::TaskEvent {
        if self.hides(&e.worker) {
            e.fence = 0;
        }
        if self.hides(&e.revoked_worker) {
            e.revoked_fence = 0;
        }
        e
    }
}

/// One queue's pause state, ready tasks and serving workers.
fn queue_info(s: &SchedulerState, name: &str) -> pb::QueueInfo {
    let since = s.queue_paused_since(name);
    pb::QueueInfo {
        name: name.to_string(),
        paused: since.is_some(),
        paused_since_ms: since.unwrap_or(0),
        queued: s.queue_depths().get(name).copied().unwrap_or(0),
        workers: s
            .workers()
            .filter(|w| w.status == WorkerStatus::Alive && w.spec.queues.iter().any(|q| q == name))
            .count() as u32,
    }
}

fn is_terminal(t: &pb::Task) -> bool {
    convert::state_from_pb("state", t.state).is_ok_and(|k| k.is_terminal())
}

fn resume_error(e: ReadError) -> Status {
    let message = match e {
        ReadError::Compacted { first, .. } => format!(
            "events before index {first} are no longer retained on this node; list the tasks, then watch from index {first}"
        ),
        ReadError::Reset(at) => format!(
            "this node's state was replaced by a snapshot at index {at}; list the tasks, then watch from index {}",
            at + 1
        ),
    };
    NodeError::OutOfRange(message).into()
}
