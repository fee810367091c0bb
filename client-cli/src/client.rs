//! The cluster client: endpoints, leader discovery, retries and typed calls.
//!
//! # Routing
//!
//! A [`Client`] holds one lazily connected tonic channel per node address. Every call goes to
//! the *preferred* node: at first the first configured endpoint, later the node that answered a
//! write last (normally the leader, so writes need no forwarding hop). When an attempt fails
//! with UNAVAILABLE and the answer carries the `x-raftsched-leader` hint (`<id>@<host:port>`),
//! the next attempt goes to that address, even if it was not configured (a node added later);
//! otherwise the next attempt goes to the next endpoint in the list.
//!
//! # Retries
//!
//! Only UNAVAILABLE, DEADLINE_EXCEEDED, per-attempt timeouts and broken connections are
//! retried, with jittered exponential backoff ([`crate::backoff`]), until the retry budget is
//! spent. Every other code is final: retrying a rejected request cannot make it valid.
//!
//! Retrying a write whose first attempt may have been applied is safe because every write is
//! idempotent end to end: [`Client::submit_tasks`] gives every task an idempotency key
//! *before* the first attempt (so every retry carries the same key and the server answers with
//! the task it created), reports quote the attempt's fencing token (a repeat answers
//! `duplicate`), cancels of a cancelled task answer `already_cancelled`, and a worker
//! re-registering with the same instance keeps its session. If the budget runs out, the error
//! says whether the outcome is unknown ([`Error::is_indeterminate`]); resolve it by sending the
//! same request again.
//!
//! With [`ClientConfig::fail_fast_when_refused`] (what `schedctl`'s one-shot commands use), a
//! call whose every attempt so far was a refused connection stops as soon as every known node
//! has refused: nothing was sent, so there is no unknown outcome to wait out.
//!
//! # Deadlines
//!
//! Every unary attempt has a deadline (`call_timeout`, default 10 s), sent to the server as
//! `grpc-timeout` and enforced locally. Streaming calls use it only for opening the stream.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, StreamExt};
use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use proto::pb::tasks_client::TasksClient;
use proto::pb::workers_client::WorkersClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::backoff::{Backoff, BackoffConfig};
use crate::error::{Error, LeaderHint};

/// Largest message the client sends or accepts (lists with payloads can be large).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Reconnects of a watch stream in a row without a single message before it gives up.
const MAX_EMPTY_RECONNECTS: u32 = 50;

/// After this long without an answer, a call logs a warning (once) while it keeps retrying.
const SLOW_CALL_NOTICE: Duration = Duration::from_secs(2);

/// Default node address.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";

/// How a [`Client`] connects and retries.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Node addresses, `host:port` (an `http://` prefix is accepted).
    pub endpoints: Vec<String>,
    /// Deadline of one attempt.
    pub call_timeout: Duration,
    /// Total time spent on one call, retries included.
    pub retry_budget: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval: detects a dead node on an idle connection.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Backoff between attempts.
    pub backoff: BackoffConfig,
    /// Give up at once, without spending the retry budget, when every known node refused
    /// the connection in this call: nothing was sent, so the outcome is known (not applied),
    /// and waiting rarely helps a one-shot command. Off by default: a long-lived client
    /// (a worker, a load generator) rides through a whole-cluster restart instead.
    pub fail_fast_when_refused: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_string()],
            call_timeout: Duration::from_secs(10),
            retry_budget: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            backoff: BackoffConfig::default(),
            fail_fast_when_refused: false,
        }
    }
}

impl ClientConfig {
    /// The defaults with these endpoints.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Splits a comma (or whitespace) separated endpoint list, dropping empty items.
pub fn parse_endpoints(list: &str) -> Vec<String> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A fresh random idempotency key (128 bits, hex).
pub fn new_idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Gives every spec without an idempotency key a fresh one, so that retries of the same
/// submission can never create a second task.
pub fn ensure_idempotency_keys(specs: &mut [pb::TaskSpec]) {
    for spec in specs.iter_mut().filter(|s| s.idempotency_key.is_empty()) {
        spec.idempotency_key = new_idempotency_key();
    }
}

/// True for the terminal states (succeeded, failed, cancelled, upstream_failed).
pub fn is_terminal(state: i32) -> bool {
    matches!(
        pb::TaskState::try_from(state),
        Ok(pb::TaskState::Succeeded
            | pb::TaskState::Failed
            | pb::TaskState::Cancelled
            | pb::TaskState::UpstreamFailed)
    )
}

/// A stream of task snapshots ([`Client::watch_task`]).
pub type TaskStream = BoxStream<'static, Result<pb::Task, Error>>;
/// A stream of applied changes ([`Client::watch_events`]).
pub type EventStream = BoxStream<'static, Result<pb::EventBatch, Error>>;
/// A worker's assignment stream ([`Client::open_assignments`]).
pub type AssignmentStream = BoxStream<'static, Result<pb::WorkerMessage, Error>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A read: any node answers.
    Read,
    /// A write: the node that answers becomes the preferred one.
    Write,
    /// Opening a server stream: no `grpc-timeout`, which would end the stream.
    Stream,
}

/// Channel settings shared by every node of a pool.
#[derive(Clone, Debug)]
struct Tuning {
    connect_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

struct Node {
    addr: String,
    endpoint: Endpoint,
    /// Created on first use: building a channel needs a running tokio runtime.
    channel: Option<Channel>,
}

struct PoolState {
    nodes: Vec<Node>,
    preferred: usize,
}

/// The nodes and the routing state, shared by every clone of a client.
struct Pool {
    tuning: Tuning,
    state: Mutex<PoolState>,
}

impl Pool {
    fn endpoint(&self, addr: &str) -> Result<(String, Endpoint), Error> {
        let addr = addr.trim();
        let (key, uri) = if let Some(rest) = addr.strip_prefix("http://") {
            (rest.trim_end_matches('/').to_string(), addr.to_string())
        } else if addr.starts_with("https://") {
            return Err(Error::Config(format!("{addr}: TLS endpoints are not supported")));
        } else {
            (addr.to_string(), format!("http://{addr}"))
        };
        if key.is_empty() || !key.contains(':') {
            return Err(Error::Config(format!("{addr:?} is not a host:port address")));
        }
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| Error::Config(format!("{addr:?} is not a valid address: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(self.tuning.connect_timeout)
            .http2_keep_alive_interval(self.tuning.keepalive_interval)
            .keep_alive_timeout(self.tuning.keepalive_timeout)
            .keep_alive_while_idle(true);
        Ok((key, endpoint))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding this lock cannot leave the routing state inconsistent (every
        // update is a single assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The preferred node's address and channel.
    fn pick(&self) -> (String, Channel) {
        let mut st = self.lock();
        let i = st.preferred;
        let node = &mut st.nodes[i];
        let channel = node.channel.get_or_insert_with(|| node.endpoint.connect_lazy()).clone();
        (node.addr.clone(), channel)
    }

    /// Index of `addr`, adding it (from a leader hint) when unknown.
    fn index_of_or_add(&self, st: &mut PoolState, addr: &str) -> Option<usize> {
        if let Some(i) = st.nodes.iter().position(|n| n.addr == addr) {
            return Some(i);
        }
        let (key, endpoint) = self.endpoint(addr).ok()?;
        st.nodes.push(Node { addr: key, endpoint, channel: None });
        Some(st.nodes.len() - 1)
    }

    /// After a failed attempt at `addr`: follow the leader hint, else move on to the next node
    /// (unless a concurrent call already moved the preference elsewhere).
    fn on_failure(&self, addr: &str, hint: Option<&LeaderHint>) {
        let mut st = self.lock();
        if let Some(h) = hint.filter(|h| h.addr != addr) {
            if let Some(i) = self.index_of_or_add(&mut st, &h.addr) {
                st.preferred = i;
                return;
            }
        }
        if st.nodes[st.preferred].addr == addr {
            st.preferred = (st.preferred + 1) % st.nodes.len();
        }
    }

    /// After a successful write at `addr`: that node is (or reaches) the leader.
    fn on_write_success(&self, addr: &str) {
        let mut st = self.lock();
        if let Some(i) = st.nodes.iter().position(|n| n.addr == addr) {
            st.preferred = i;
        }
    }
}

/// A client of a raftsched cluster. Cheap to clone; clones share channels and routing.
#[derive(Clone)]
pub struct Client {
    pool: Arc<Pool>,
    call_timeout: Duration,
    retry_budget: Duration,
    backoff: BackoffConfig,
    fail_fast_when_refused: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints())
            .field("call_timeout", &self.call_timeout)
            .field("retry_budget", &self.retry_budget)
            .finish()
    }
}

impl Client {
    /// A client for these endpoints with the default settings.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Result<Client, Error> {
        Client::with_config(ClientConfig::new(endpoints))
    }

    /// A client with explicit settings. No connection is made until the first call.
    pub fn with_config(config: ClientConfig) -> Result<Client, Error> {
        let pool = Pool {
            tuning: Tuning {
                connect_timeout: config.connect_timeout,
                keepalive_interval: config.keepalive_interval,
                keepalive_timeout: config.keepalive_timeout,
            },
            state: Mutex::new(PoolState { nodes: Vec::new(), preferred: 0 }),
        };
        let mut nodes: Vec<Node> = Vec::new();
        for addr in &config.endpoints {
            let (key, endpoint) = pool.endpoint(addr)?;
            if !nodes.iter().any(|n| n.addr == key) {
                nodes.push(Node { addr: key, endpoint, channel: None });
            }
        }
        if nodes.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        pool.lock().nodes = nodes;
        Ok(Client {
            pool: Arc::new(pool),
            call_timeout: config.call_timeout,
            retry_budget: config.retry_budget,
            backoff: config.backoff,
            fail_fast_when_refused: config.fail_fast_when_refused,
        })
    }

    /// This client with another per-attempt deadline (shares channels and routing).
    pub fn with_call_timeout(&self, timeout: Duration) -> Client {
        Client { call_timeout: timeout, ..self.clone() }
    }

    /// This client with another retry budget (shares channels and routing).
    pub fn with_retry_budget(&self, budget: Duration) -> Client {
        Client { retry_budget: budget, ..self.clone() }
    }

    /// The per-attempt deadline.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The retry budget.
    pub fn retry_budget(&self) -> Duration {
        self.retry_budget
    }

    /// Every known node address: the configured ones, then those learned from leader hints.
    pub fn endpoints(&self) -> Vec<String> {
        self.pool.lock().nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The address the next call goes to.
    pub fn preferred_endpoint(&self) -> String {
        let st = self.pool.lock();
        st.nodes[st.preferred].addr.clone()
    }

    /// Runs one call with routing, deadlines and retries (see [`Self::call_at`]).
    async fn call<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        kind: Kind,
        req: Req,
        f: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        Ok(self.call_at(op, kind, req, f).await?.0)
    }

    /// Runs one call with routing, deadlines and retries; returns the answer and the address
    /// of the node that gave it.
    async fn call_at<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        kind: Kind,
        req: Req,
        f: F,
    ) -> Result<(Resp, String), Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let start = Instant::now();
        let mut backoff = Backoff::new(self.backoff);
        let mut attempts = 0u32;
        let mut maybe_applied = false;
        let mut tried: Vec<String> = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        let mut any_answer = false;
        let mut warned = false;
        loop {
            let (addr, channel) = self.pool.pick();
            if !tried.contains(&addr) {
                tried.push(addr.clone());
            }
            attempts += 1;
            let mut request = tonic::Request::new(req.clone());
            if kind != Kind::Stream {
                request.set_timeout(self.call_timeout);
            }
            let err = match tokio::time::timeout(self.call_timeout, f(channel, request)).await {
                Ok(Ok(resp)) => {
                    if kind == Kind::Write {
                        self.pool.on_write_success(&addr);
                    }
                    return Ok((resp.into_inner(), addr));
                }
                Ok(Err(status)) => Error::from_status(status, &addr),
                Err(_) => Error::Timeout { endpoint: addr.clone(), after: self.call_timeout },
            };
            if !err.is_retryable() {
                return Err(err);
            }
            maybe_applied |= err.is_indeterminate();
            match &err {
                Error::Transport { maybe_sent: false, .. } => {
                    if !refused.contains(&addr) {
                        refused.push(addr.clone());
                    }
                }
                _ => any_answer = true,
            }
            self.pool.on_failure(&addr, err.leader_hint());
            if self.fail_fast_when_refused
                && !any_answer
                && self.endpoints().iter().all(|a| refused.contains(a))
            {
                tracing::debug!(op, attempts, "every node refused the connection");
                return Err(Error::Exhausted {
                    attempts,
                    elapsed: start.elapsed(),
                    maybe_applied,
                    endpoints: tried,
                    last: Box::new(err),
                });
            }
            let delay = backoff.next_delay();
            let elapsed = start.elapsed();
            if elapsed + delay >= self.retry_budget {
                tracing::debug!(op, attempts, error = %err, "retry budget spent");
                return Err(Error::Exhausted {
                    attempts,
                    elapsed,
                    maybe_applied,
                    endpoints: tried,
                    last: Box::new(err),
                });
            }
            if !warned && elapsed >= SLOW_CALL_NOTICE {
                // Say once why a call is taking long, and for how long it may go on.
                warned = true;
                tracing::warn!(
                    op,
                    error = %err,
                    budget = %humantime::format_duration(self.retry_budget),
                    "no answer from the cluster yet; retrying"
                );
            }
            tracing::debug!(op, endpoint = %addr, attempt = attempts, error = %err, "retrying");
            tokio::time::sleep(delay).await;
        }
    }

    // ------------------------------------------------------------------------------- tasks

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
        let open = {
            let client = self.clone();
            move || {
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
            }
        };
        let first = open().await?;
        let (tx, rx) = mpsc::channel(16);
        let client = self.clone();
        tokio::spawn(async move {
            let (mut stream, mut addr) = first;
            let mut backoff = Backoff::new(client.backoff);
            let mut empty_reconnects = 0u32;
            loop {
                let ended = loop {
                    let msg = tokio::select! {
                        _ = tx.closed() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(task)) => {
                            backoff.reset();
                            empty_reconnects = 0;
                            let done = is_terminal(task.state);
                            if tx.send(Ok(task)).await.is_err() || done {
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
                    let _ = tx
                        .send(Err(Error::Protocol(format!("the watch of task {id} keeps ending"))))
                        .await;
                    return;
                }
                tracing::debug!(task_id = id, endpoint = %addr, "reopening task watch");
                client.pool.on_failure(&addr, ended.as_ref().and_then(|e| e.leader_hint()));
                tokio::time::sleep(backoff.next_delay()).await;
                match open().await {
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
        let open = {
            let client = self.clone();
            move |from: u64| {
                let client = client.clone();
                async move {
                    client
                        .call_at(
                            "watch_events",
                            Kind::Stream,
                            pb::WatchEventsRequest { from_index: from },
                            |ch, r| async move { tasks(ch).watch_events(r).await },
                        )
                        .await
                }
            }
        };
        let first = open(from_index).await?;
        let (tx, rx) = mpsc::channel(64);
        let client = self.clone();
        tokio::spawn(async move {
            let (mut stream, mut addr) = first;
            let mut next = from_index;
            let mut backoff = Backoff::new(client.backoff);
            let mut empty_reconnects = 0u32;
            loop {
                let ended = loop {
                    let msg = tokio::select! {
                        _ = tx.closed() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(batch)) => {
                            backoff.reset();
                            empty_reconnects = 0;
                            next = batch.index + 1;
                            if tx.send(Ok(batch)).await.is_err() {
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
                        tx.send(Err(Error::Protocol("the event watch keeps ending".into()))).await;
                    return;
                }
                tracing::debug!(from_index = next, endpoint = %addr, "reopening event watch");
                client.pool.on_failure(&addr, ended.as_ref().and_then(|e| e.leader_hint()));
                tokio::time::sleep(backoff.next_delay()).await;
                match open(next).await {
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

    // ----------------------------------------------------------------------------- workers

    /// Registers a worker (or reconnects it: the same id and instance keep the session).
    pub async fn register_worker(
        &self,
        req: pb::RegisterWorkerRequest,
    ) -> Result<pb::RegisterWorkerResponse, Error> {
        self.call("register_worker", Kind::Write, req, |ch, r| async move {
            workers(ch).register_worker(r).await
        })
        .await
    }

    /// Opens a worker's assignment stream. It is not reopened automatically: the worker
    /// runtime ([`crate::worker`]) decides between reopening and registering again.
    pub async fn open_assignments(
        &self,
        worker_id: &str,
        session: u64,
    ) -> Result<AssignmentStream, Error> {
        let req = pb::OpenAssignmentsRequest { worker_id: worker_id.to_string(), session };
        let (stream, addr) = self
            .call_at("open_assignments", Kind::Stream, req, |ch, r| async move {
                workers(ch).open_assignments(r).await
            })
            .await?;
        Ok(stream.map(move |m| m.map_err(|s| Error::from_status(s, &addr))).boxed())
    }

    /// Renews a worker's session.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        session: u64,
    ) -> Result<pb::HeartbeatResponse, Error> {
        let req = pb::HeartbeatRequest { worker_id: worker_id.to_string(), session };
        self.call(
            "heartbeat",
            Kind::Read,
            req,
            |ch, r| async move { workers(ch).heartbeat(r).await },
        )
        .await
    }

    /// Reports progress of several attempts at once (applied in order, as one log entry).
    pub async fn report(&self, req: pb::ReportRequest) -> Result<pb::ReportResponse, Error> {
        let n = req.reports.len();
        let r = self
            .call("report", Kind::Write, req, |ch, r| async move { workers(ch).report(r).await })
            .await?;
        if r.results.len() != n {
            return Err(Error::Protocol(format!(
                "reported {n} outcomes, the answer lists {}",
                r.results.len()
            )));
        }
        Ok(r)
    }

    /// Confirms the start of an attempt.
    pub async fn start_task(
        &self,
        req: pb::StartTaskRequest,
    ) -> Result<pb::TaskReportResponse, Error> {
        self.call(
            "start_task",
            Kind::Write,
            req,
            |ch, r| async move { workers(ch).start_task(r).await },
        )
        .await
    }

    /// Reports the success of an attempt.
    pub async fn complete_task(
        &self,
        req: pb::CompleteTaskRequest,
    ) -> Result<pb::TaskReportResponse, Error> {
        self.call("complete_task", Kind::Write, req, |ch, r| async move {
            workers(ch).complete_task(r).await
        })
        .await
    }

    /// Reports the failure of an attempt.
    pub async fn fail_task(
        &self,
        req: pb::FailTaskRequest,
    ) -> Result<pb::TaskReportResponse, Error> {
        self.call(
            "fail_task",
            Kind::Write,
            req,
            |ch, r| async move { workers(ch).fail_task(r).await },
        )
        .await
    }

    /// Stops assigning new work to a worker; what it holds keeps running.
    pub async fn drain_worker(&self, worker_id: &str) -> Result<(), Error> {
        let req = pb::DrainWorkerRequest { worker_id: worker_id.to_string() };
        self.call("drain_worker", Kind::Write, req, |ch, r| async move {
            workers(ch).drain_worker(r).await
        })
        .await?;
        Ok(())
    }

    /// Removes a worker; the tasks it still holds are requeued.
    pub async fn deregister_worker(
        &self,
        worker_id: &str,
        session: u64,
    ) -> Result<pb::DeregisterWorkerResponse, Error> {
        let req = pb::DeregisterWorkerRequest { worker_id: worker_id.to_string(), session };
        self.call("deregister_worker", Kind::Write, req, |ch, r| async move {
            workers(ch).deregister_worker(r).await
        })
        .await
    }

    /// Every known worker.
    pub async fn list_workers(&self, stale_ok: bool) -> Result<pb::ListWorkersResponse, Error> {
        let req = pb::ListWorkersRequest { stale_ok };
        self.call("list_workers", Kind::Read, req, |ch, r| async move {
            workers(ch).list_workers(r).await
        })
        .await
    }

    // ----------------------------------------------------------------------------- cluster

    /// Initialises a new cluster with these voters (idempotent for the same members).
    pub async fn init_cluster(&self, members: Vec<pb::Member>) -> Result<(), Error> {
        let req = pb::InitClusterRequest { members };
        self.call("init_cluster", Kind::Write, req, |ch, r| async move {
            cluster(ch).init_cluster(r).await
        })
        .await?;
        Ok(())
    }

    /// Members, leader, term and per-node indexes.
    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, Error> {
        self.call("cluster_status", Kind::Read, pb::ClusterStatusRequest {}, |ch, r| async move {
            cluster(ch).status(r).await
        })
        .await
    }

    /// Adds a non-voting member; with `wait_ms > 0` waits until it caught up.
    pub async fn add_learner(
        &self,
        id: u64,
        addr: &str,
        wait_ms: u64,
    ) -> Result<pb::AddLearnerResponse, Error> {
        let req = pb::AddLearnerRequest { id, addr: addr.to_string(), wait_ms };
        self.call("add_learner", Kind::Write, req, |ch, r| async move {
            cluster(ch).add_learner(r).await
        })
        .await
    }

    /// Makes a learner a voter.
    pub async fn promote(&self, id: u64) -> Result<(), Error> {
        self.call("promote", Kind::Write, pb::PromoteRequest { id }, |ch, r| async move {
            cluster(ch).promote(r).await
        })
        .await?;
        Ok(())
    }

    /// Removes a member.
    pub async fn remove_node(&self, id: u64) -> Result<(), Error> {
        self.call("remove_node", Kind::Write, pb::RemoveNodeRequest { id }, |ch, r| async move {
            cluster(ch).remove_node(r).await
        })
        .await?;
        Ok(())
    }

    /// Hands leadership to node `to`; returns the leader afterwards.
    pub async fn transfer_leader(&self, to: u64) -> Result<u64, Error> {
        let r = self
            .call(
                "transfer_leader",
                Kind::Write,
                pb::TransferLeaderRequest { to },
                |ch, r| async move { cluster(ch).transfer_leader(r).await },
            )
            .await?;
        Ok(r.leader_id)
    }

    /// Makes the node that answers build a snapshot; returns its index.
    pub async fn trigger_snapshot(&self) -> Result<u64, Error> {
        let r = self
            .call(
                "trigger_snapshot",
                Kind::Write,
                pb::TriggerSnapshotRequest {},
                |ch, r| async move { cluster(ch).trigger_snapshot(r).await },
            )
            .await?;
        Ok(r.snapshot_index)
    }
}

fn tasks(ch: Channel) -> TasksClient<Channel> {
    TasksClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn workers(ch: Channel) -> WorkersClient<Channel> {
    WorkersClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn cluster(ch: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A copy of a final (server-status) error for a stream's consumer.
fn clone_final(e: &Error) -> Error {
    match e {
        Error::Status { code, message, reason, leader, endpoint } => Error::Status {
            code: *code,
            message: message.clone(),
            reason: reason.clone(),
            leader: leader.clone(),
            endpoint: endpoint.clone(),
        },
        other => Error::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_lists_parse() {
        assert_eq!(
            parse_endpoints("127.0.0.1:7001, 127.0.0.1:7002,,127.0.0.1:7003 "),
            vec!["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        );
        assert!(parse_endpoints(" , ").is_empty());
    }

    #[test]
    fn bad_endpoints_are_config_errors() {
        assert!(matches!(Client::new(Vec::<String>::new()), Err(Error::Config(_))));
        assert!(matches!(Client::new(["nohost"]), Err(Error::Config(_))));
        assert!(matches!(Client::new(["https://a:1"]), Err(Error::Config(_))));
        let c = Client::new(["http://a:1", "a:1", "b:2"]).unwrap();
        assert_eq!(c.endpoints(), vec!["a:1", "b:2"], "duplicates collapse");
    }

    #[test]
    fn routing_follows_hints_and_rotates() {
        let c = Client::new(["a:1", "b:2", "c:3"]).unwrap();
        assert_eq!(c.preferred_endpoint(), "a:1");
        c.pool.on_failure("a:1", None);
        assert_eq!(c.preferred_endpoint(), "b:2");
        // A failure reported for a node that is no longer preferred changes nothing.
        c.pool.on_failure("a:1", None);
        assert_eq!(c.preferred_endpoint(), "b:2");
        // A hint to an unknown node adds it and goes there.
        c.pool.on_failure("b:2", Some(&LeaderHint { id: 4, addr: "d:4".into() }));
        assert_eq!(c.preferred_endpoint(), "d:4");
        assert_eq!(c.endpoints().len(), 4);
        // A hint naming the failing node itself does not stick to it.
        c.pool.on_failure("d:4", Some(&LeaderHint { id: 4, addr: "d:4".into() }));
        assert_eq!(c.preferred_endpoint(), "a:1");
        c.pool.on_write_success("c:3");
        assert_eq!(c.preferred_endpoint(), "c:3");
    }

    #[test]
    fn keys_are_filled_only_where_missing() {
        let mut specs = vec![
            pb::TaskSpec { name: "a".into(), ..Default::default() },
            pb::TaskSpec { name: "b".into(), idempotency_key: "mine".into(), ..Default::default() },
        ];
        ensure_idempotency_keys(&mut specs);
        assert_eq!(specs[0].idempotency_key.len(), 32);
        assert_eq!(specs[1].idempotency_key, "mine");
        assert_ne!(new_idempotency_key(), new_idempotency_key());
    }

    #[test]
    fn terminal_states() {
        use pb::TaskState as S;
        for s in [S::Succeeded, S::Failed, S::Cancelled, S::UpstreamFailed] {
            assert!(is_terminal(s as i32));
        }
        for s in [S::Unspecified, S::Waiting, S::Queued, S::Delayed, S::Assigned, S::Running] {
            assert!(!is_terminal(s as i32));
        }
    }
}
