//! Calls of the `Tasks` service: submit, get, list, cancel, explain, and the watch streams.
//!
//! Watch streams survive node changes: on a broken stream they reconnect (to the leader hint or
//! the next node) and resume after the last message seen, and they give up only after
//! [`MAX_EMPTY_RECONNECTS`] reconnects in a row without a single message, or on a final error.

use futures::stream::StreamExt;
use proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::retry::{clone_final, Kind};
use super::{ensure_idempotency_keys, is_terminal, tasks, Client, EventStream, TaskStream};
use crate::backoff::Backoff;
use crate::error::Error;

/// Reconnects of a watch stream in a row without a single message before it gives up.
const MAX_EMPTY_RECONNECTS: u32 = 50;

impl Client {
    /// Submits tasks atomically (all or none). Specs without an idempotency key get a random
    /// one before the first attempt, so a retry after an unknown outcome never creates a
    /// second task. To be able to resubmit later yourself, set the keys (see
    /// [`ensure_idempotency_keys`]) and keep them.
    pub async fn submit_tasks(
        &self,
        mut req: pb::SubmitTasksRequest,
    ) -> Result<pb::SubmitTasksResponse, Error> {
        ensure_idempotency_keys(&mut req.tasks);
        let n = req.tasks.len();
        let resp = self
            .call("submit_tasks", Kind::Write, req, |ch, r| async move {
                tasks(ch).submit_tasks(r).await
            })
            .await?;
        if resp.tasks.len() != n {
            return Err(Error::Protocol(format!(
                "submitted {n} tasks, the answer lists {}",
                resp.tasks.len()
            )));
        }
        Ok(resp)
    }

    /// Submits one task (see [`Client::submit_tasks`]).
    pub async fn submit(&self, spec: pb::TaskSpec) -> Result<pb::SubmittedTask, Error> {
        let resp = self.submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec] }).await?;
        resp.tasks.into_iter().next().ok_or_else(|| Error::Protocol("empty submit answer".into()))
    }

    /// One task, linearizable, with payload and result.
    pub async fn get_task(&self, id: u64) -> Result<pb::Task, Error> {
        self.get_task_with(pb::GetTaskRequest { id, stale_ok: false }).await
    }

    /// One task, with explicit read options.
    pub async fn get_task_with(&self, req: pb::GetTaskRequest) -> Result<pb::Task, Error> {
        self.call("get_task", Kind::Read, req, |ch, r| async move { tasks(ch).get_task(r).await })
            .await
    }

    /// One page of tasks.
    pub async fn list_tasks(
        &self,
        req: pb::ListTasksRequest,
    ) -> Result<pb::ListTasksResponse, Error> {
        self.call(
            "list_tasks",
            Kind::Read,
            req,
            |ch, r| async move { tasks(ch).list_tasks(r).await },
        )
        .await
    }

    /// Up to `max` tasks, following page tokens (`req.limit` is the page size).
    pub async fn list_all_tasks(
        &self,
        req: pb::ListTasksRequest,
        max: usize,
    ) -> Result<Vec<pb::Task>, Error> {
        Ok(self.list_tasks_upto(req, max).await?.tasks)
    }

    /// Up to `max` tasks, following page tokens from `req.page_token` in the request's order;
    /// the answer's `next_page_token` continues after the last task returned (0 = no more)
    /// and `remaining` counts the matching tasks after it (a lower bound when
    /// `remaining_is_lower_bound`).
    pub async fn list_tasks_upto(
        &self,
        mut req: pb::ListTasksRequest,
        max: usize,
    ) -> Result<pb::ListTasksResponse, Error> {
        let mut out = pb::ListTasksResponse::default();
        // A page may be empty yet not the last (the server scans a bounded number of tasks
        // per page when filtering). Bounded: the token moves strictly in the list's order.
        loop {
            let want = (max.max(1) - out.tasks.len()).clamp(1, 1000) as u32;
            req.limit = want;
            let page = self.list_tasks(req.clone()).await?;
            out.tasks.extend(page.tasks);
            out.next_page_token = page.next_page_token;
            out.remaining = page.remaining;
            out.remaining_is_lower_bound = page.remaining_is_lower_bound;
            let stuck = if req.newest_first {
                req.page_token != 0 && page.next_page_token >= req.page_token
            } else {
                page.next_page_token <= req.page_token
            };
            if out.tasks.len() >= max.max(1) || page.next_page_token == 0 || stuck {
                break;
            }
            req.page_token = page.next_page_token;
        }
        Ok(out)
    }

    /// Cancels tasks; one result per id (already cancelled counts as ok).
    pub async fn cancel_tasks(
        &self,
        req: pb::CancelTasksRequest,
    ) -> Result<pb::CancelTasksResponse, Error> {
        self.call("cancel_tasks", Kind::Write, req, |ch, r| async move {
            tasks(ch).cancel_tasks(r).await
        })
        .await
    }

    /// Cancels one task.
    pub async fn cancel(&self, id: u64, reason: &str) -> Result<pb::CancelResult, Error> {
        let resp = self
            .cancel_tasks(pb::CancelTasksRequest { ids: vec![id], reason: reason.to_string() })
            .await?;
        resp.results
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| Error::Protocol(format!("the cancel answer does not list task {id}")))
    }

    /// Runs a failed, cancelled or upstream-failed task again (with its failed dependents
    /// when `with_dependents`). Not idempotent: when an earlier try of this call was applied
    /// but its answer lost, the retried call answers FAILED_PRECONDITION (the task is queued).
    pub async fn retry_task(
        &self,
        id: u64,
        with_dependents: bool,
    ) -> Result<pb::RetryTaskResponse, Error> {
        let req = pb::RetryTaskRequest { id, with_dependents };
        self.call(
            "retry_task",
            Kind::Write,
            req,
            |ch, r| async move { tasks(ch).retry_task(r).await },
        )
        .await
    }

    /// Pauses a queue: none of its tasks is assigned until it is resumed.
    pub async fn pause_queue(&self, queue: &str) -> Result<pb::PauseQueueResponse, Error> {
        let req = pb::PauseQueueRequest { queue: queue.to_string() };
        self.call(
            "pause_queue",
            Kind::Write,
            req,
            |ch, r| async move { tasks(ch).pause_queue(r).await },
        )
        .await
    }

    /// Resumes a paused queue.
    pub async fn resume_queue(&self, queue: &str) -> Result<pb::ResumeQueueResponse, Error> {
        let req = pb::ResumeQueueRequest { queue: queue.to_string() };
        self.call("resume_queue", Kind::Write, req, |ch, r| async move {
            tasks(ch).resume_queue(r).await
        })
        .await
    }

    /// Queues with tasks, workers or a pause.
    pub async fn list_queues(&self) -> Result<pb::ListQueuesResponse, Error> {
        let req = pb::ListQueuesRequest { stale_ok: false };
        self.call(
            "list_queues",
            Kind::Read,
            req,
            |ch, r| async move { tasks(ch).list_queues(r).await },
        )
        .await
    }

    /// Why a task is where it is.
    pub async fn explain_task(&self, id: u64) -> Result<pb::ExplainTaskResponse, Error> {
        let req = pb::ExplainTaskRequest { id, stale_ok: false };
        self.call("explain_task", Kind::Read, req, |ch, r| async move {
            tasks(ch).explain_task(r).await
        })
        .await
    }

    /// The task now, then on every change, ending after a terminal state.
    ///
    /// A broken stream (node death, failover) is reopened on another node; the reopened
    /// stream starts with the task's current state, so no final state is missed (intermediate
    /// states during the gap may be). The stream yields an error and ends when reopening fails.
    pub async fn watch_task(&self, id: u64) -> Result<TaskStream, Error> {
        let client = self.clone();
        let open = move |_: &()| {
            let client = client.clone();
            async move {
                client
                    .call_at(
                        "watch_task",
                        Kind::Stream,
                        pb::WatchTaskRequest { id },
                        |ch, r| async move { tasks(ch).watch_task(r).await },
                    )
                    .await
            }
        };
        let watch = Resumable { what: format!("the watch of task {id}"), buffer: 16 };
        watch.start(self.clone(), (), open, |task: &pb::Task, _| is_terminal(task.state)).await
    }

    /// Waits until the task is terminal and returns its final state (with the result).
    pub async fn wait_task(&self, id: u64) -> Result<pb::Task, Error> {
        let mut stream = self.watch_task(id).await?;
        let mut last = None;
        while let Some(item) = stream.next().await {
            let task = item?;
            let done = is_terminal(task.state);
            last = Some(task);
            if done {
                break;
            }
        }
        match last {
            Some(t) if is_terminal(t.state) => {
                // The watch may omit the result; a read returns the complete record.
                match self.get_task(id).await {
                    Ok(full) => Ok(full),
                    Err(_) => Ok(t),
                }
            }
            _ => Err(Error::Protocol(format!("the watch of task {id} ended early"))),
        }
    }

    /// Every applied change from log index `from_index` on (0 = from now).
    ///
    /// A broken stream is reopened after the last index seen, so no change is skipped or
    /// repeated; if the stream broke before the first batch of a `from_index = 0` watch, the
    /// reopened one starts from the new "now" and changes in between are not seen. An
    /// OUT_OF_RANGE error means the node no longer retains that index: list the tasks and
    /// watch again from a newer index.
    pub async fn watch_events(&self, from_index: u64) -> Result<EventStream, Error> {
        let client = self.clone();
        let open = move |from: &u64| {
            let client = client.clone();
            let from_index = *from;
            async move {
                client
                    .call_at(
                        "watch_events",
                        Kind::Stream,
                        pb::WatchEventsRequest { from_index },
                        |ch, r| async move { tasks(ch).watch_events(r).await },
                    )
                    .await
            }
        };
        let watch = Resumable { what: "the event watch".into(), buffer: 64 };
        watch
            .start(self.clone(), from_index, open, |b: &pb::EventBatch, next| {
                *next = b.index + 1;
                false
            })
            .await
    }
}

/// A server stream that is reopened where it left off when it breaks: `open(&cursor)` opens
/// it (a failure of the first open is returned to the caller), `advance(&item, &mut cursor)`
/// records each item delivered and says whether it was the last one wanted. Reopening goes to the leader hint or the next node after a backoff; an
/// error no retry can fix ends the stream with that error, and so do
/// [`MAX_EMPTY_RECONNECTS`] reopenings in a row without an item.
struct Resumable {
    /// Names the watch in errors.
    what: String,
    /// Items buffered for a slow reader.
    buffer: usize,
}

impl Resumable {
    async fn start<T, C, O, Fut, A>(
        self,
        client: Client,
        mut cursor: C,
        open: O,
        mut advance: A,
    ) -> Result<futures::stream::BoxStream<'static, Result<T, Error>>, Error>
    where
        T: Send + 'static,
        C: Send + 'static,
        O: Fn(&C) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(tonic::Streaming<T>, String), Error>> + Send,
        A: FnMut(&T, &mut C) -> bool + Send + 'static,
    {
        let (mut stream, mut addr) = open(&cursor).await?;
        let (tx, rx) = mpsc::channel(self.buffer);
        tokio::spawn(async move {
            let mut backoff = Backoff::new(client.backoff);
            let mut empty_reconnects = 0u32;
            loop {
                let ended = loop {
                    let msg = tokio::select! {
                        _ = tx.closed() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(item)) => {
                            backoff.reset();
                            empty_reconnects = 0;
                            let done = advance(&item, &mut cursor);
                            if tx.send(Ok(item)).await.is_err() || done {
                                return;
                            }
                        }
                        Ok(None) => break None,
                        Err(s) => break Some(Error::from_status(s, &addr)),
                    }
                };
                if let Some(e) = ended.as_ref().filter(|e| !e.is_retryable()) {
                    let _ = tx.send(Err(clone_final(e))).await;
                    return;
                }
                empty_reconnects += 1;
                if empty_reconnects > MAX_EMPTY_RECONNECTS {
                    let _ =
                        tx.send(Err(Error::Protocol(format!("{} keeps ending", self.what)))).await;
                    return;
                }
                tracing::debug!(watch = %self.what, endpoint = %addr, "reopening the watch");
                client.pool.on_failure(&addr, ended.as_ref().and_then(|e| e.leader_hint()));
                tokio::time::sleep(backoff.next_delay()).await;
                match open(&cursor).await {
                    Ok((s, a)) => (stream, addr) = (s, a),
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }
}
