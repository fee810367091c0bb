//! The JSON API under `/api/v1`, for the dashboard and for scripts.
//!
//! Every endpoint calls the gRPC service's own handler ([`TasksApi`], [`WorkersApi`],
//! [`ClusterApi`]) with the caller attached, so validation, routing (linearizable reads
//! through [`crate::Node::read`], writes passed on to the leader), limits and the hiding of
//! fencing tokens are the gRPC API's; only the encoding differs. Roles are those of the gRPC
//! method each endpoint stands for ([`crate::auth::need_of`]); fencing tokens are shown to
//! admins only (and to everyone when authentication is off).
//!
//! | endpoint | gRPC method | notes |
//! |---|---|---|
//! | `GET /api/v1/whoami` | — | the caller's token name and role (any valid token) |
//! | `GET /api/v1/cluster` | `Cluster/Status` | members, leader, term, indexes, tasks per state |
//! | `GET /api/v1/stats` | `Tasks/ListTasks` | completions and latency per minute (`?window=10m`) |
//! | `GET /api/v1/tasks` | `Tasks/ListTasks` | `state` (comma list), `queue`, `name`, `since` (`10m` or unix ms), `limit`, `page_token`, `order=oldest` |
//! | `GET /api/v1/tasks/{id}` | `Tasks/GetTask` + `ExplainTask` | result, explanation, retained history, DAG |
//! | `POST /api/v1/tasks/{id}/cancel` | `Tasks/CancelTasks` | optional body `{"reason": "..."}` |
//! | `POST /api/v1/tasks/{id}/retry` | `Tasks/RetryTask` | optional body `{"with_dependents": true}` |
//! | `GET /api/v1/workers` | `Workers/ListWorkers` | resources, load, heartbeat age (leader), draining |
//! | `POST /api/v1/workers/{id}/drain` | `Workers/DrainWorker` | |
//! | `POST /api/v1/workers/{id}/undrain` | `Workers/UndrainWorker` | |
//! | `GET /api/v1/events` | `Tasks/WatchEvents` | Server-Sent Events, see [`super::sse`] |
//!
//! Reads are linearizable unless `?stale=1`. Errors are JSON `{"error", "code", "reason"}`
//! with the HTTP status of the gRPC code (INVALID_ARGUMENT 400 naming the field, NOT_FOUND 404,
//! FAILED_PRECONDITION 409, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503 with the leader hint,
//! UNAUTHENTICATED 401, PERMISSION_DENIED 403, OUT_OF_RANGE 410).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use proto::convert;
use proto::pb;
use proto::pb::cluster_server::Cluster as _;
use proto::pb::tasks_server::Tasks as _;
use proto::pb::workers_server::Workers as _;
use serde_json::{json, Value};
use state_machine::{Role, TaskId, TaskStateKind};
use tonic::Code;

use super::{auth_refusal, authorize};
use crate::api::cluster::ClusterApi;
use crate::api::tasks::TasksApi;
use crate::api::workers::WorkersApi;
use crate::auth::{need_of, Caller};
use crate::Node;

/// The largest request body an action accepts.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Tasks a DAG view shows at most (upstream and downstream together).
pub const MAX_DAG_TASKS: usize = 200;

/// Later tasks a DAG view scans for dependents.
const DAG_SCAN: usize = 10_000;

/// Retained event batches the history of one task scans at most.
const HISTORY_SCAN: usize = 65_536;

/// The routes of the JSON API.
pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/tasks", get(list_tasks))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/api/v1/tasks/{id}/retry", post(retry_task))
        .route("/api/v1/workers", get(list_workers))
        .route("/api/v1/workers/{id}/drain", post(drain_worker))
        .route("/api/v1/workers/{id}/undrain", post(undrain_worker))
        .route("/api/v1/events", get(super::sse::events))
}

/// A refusal or failure as the API answers it.
#[derive(Debug)]
pub struct ApiError(Box<Response>);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl ApiError {
    /// This response as the error.
    pub fn of(r: Response) -> ApiError {
        ApiError(Box::new(r))
    }

    /// 400 naming `field`.
    pub fn bad(field: &str, why: &str) -> ApiError {
        ApiError::of(error_body(
            StatusCode::BAD_REQUEST,
            &format!("invalid {field}: {why}"),
            "invalid_argument",
            None,
        ))
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> ApiError {
        let code = http_status(s.code());
        let reason = s
            .metadata()
            .get(proto::status::REASON_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let leader = proto::status::leader_of(&s).map(|l| json!({"id": l.id, "addr": l.addr}));
        ApiError::of(error_body(code, s.message(), &reason, leader))
    }
}

/// The JSON error body: `{"error": message, "code": HTTP status, "reason": ..., "leader"?}`.
pub fn error_body(
    code: StatusCode,
    message: &str,
    reason: &str,
    leader: Option<Value>,
) -> Response {
    let mut body = json!({"error": message, "code": code.as_u16(), "reason": reason});
    if let Some(l) = leader {
        body["leader"] = l;
    }
    (code, axum::Json(body)).into_response()
}

/// The HTTP status of a gRPC code (the gRPC table in [`crate::error`] stays the one source).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::OutOfRange => StatusCode::GONE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

type ApiResult = Result<Response, ApiError>;

/// Who asks, allowed for the gRPC method `method` (`/scheduler.v1.Service/Method`).
pub(super) fn caller(
    node: &Node,
    headers: &HeaderMap,
    method: &str,
) -> Result<Option<Caller>, ApiError> {
    authorize(node, headers, need_of(method), method.trim_start_matches('/'))
        .map_err(|e| ApiError::of(auth_refusal(e, true)))
}

/// A tonic request carrying the caller, as the auth layer would hand it to the handler.
pub(super) fn request<T>(msg: T, caller: &Option<Caller>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(c) = caller {
        r.extensions_mut().insert(c.clone());
    }
    r
}

/// Whether this caller sees fencing tokens in the JSON API: admins, or anyone without auth.
pub(super) fn shows_fence(caller: &Option<Caller>) -> bool {
    caller.as_ref().is_none_or(|c| c.role == Role::Admin)
}

/// Query parameters, each allowed once; unknown ones are refused by name.
pub(super) struct Params(BTreeMap<String, String>);

impl Params {
    pub(super) fn parse(raw: Vec<(String, String)>, allowed: &[&str]) -> Result<Params, ApiError> {
        let mut out = BTreeMap::new();
        for (k, v) in raw {
            if !allowed.contains(&k.as_str()) {
                return Err(ApiError::bad(
                    &k,
                    &format!("unknown query parameter (expected one of: {})", allowed.join(", ")),
                ));
            }
            if out.insert(k.clone(), v).is_some() {
                return Err(ApiError::bad(&k, "given more than once"));
            }
        }
        Ok(Params(out))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(|s| s.as_str()).filter(|s| !s.is_empty())
    }

    pub(super) fn flag(&self, k: &str) -> Result<bool, ApiError> {
        match self.0.get(k).map(|s| s.as_str()) {
            None | Some("0") | Some("false") => Ok(false),
            Some("") | Some("1") | Some("true") => Ok(true),
            Some(_) => Err(ApiError::bad(k, "expected 1, 0, true or false")),
        }
    }

    pub(super) fn u64(&self, k: &str) -> Result<Option<u64>, ApiError> {
        self.get(k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| ApiError::bad(k, "expected a non-negative integer"))
            })
            .transpose()
    }

    /// `10m`-style durations before now, or unix milliseconds.
    fn since_ms(&self, k: &str, now: u64) -> Result<u64, ApiError> {
        let Some(v) = self.get(k) else { return Ok(0) };
        if let Ok(ms) = v.parse::<u64>() {
            return Ok(ms);
        }
        let d = humantime::parse_duration(v).map_err(|_| {
            ApiError::bad(k, "expected a duration such as 10m or 2h, or unix milliseconds")
        })?;
        Ok(now.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<&String, &String> {
    m.iter().collect()
}

fn state_name(v: i32) -> &'static str {
    convert::state_from_pb("state", v).map_or("unspecified", |k| k.as_str())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn resources(r: &Option<pb::Resources>) -> Value {
    let r = r.clone().unwrap_or_default();
    let named: BTreeMap<_, _> = r.named.into_iter().collect();
    json!({"cpu_milli": r.cpu_milli, "memory_mib": r.memory_mib, "named": named})
}

fn failure(f: &Option<pb::AttemptFailure>, fence: bool) -> Value {
    match f {
        None => Value::Null,
        Some(f) => {
            let mut v = json!({
                "attempt": f.attempt, "worker": f.worker, "kind": f.kind,
                "message": f.message, "at_ms": f.at_ms,
            });
            if fence {
                v["fence"] = json!(f.fence);
            }
            v
        }
    }
}

/// A task as JSON; `fence` only when the caller may see it.
pub fn task_json(t: &pb::Task, fence: bool) -> Value {
    let spec = t.spec.clone().unwrap_or_default();
    let mut v = json!({
        "id": t.id,
        "name": spec.name,
        "queue": spec.queue,
        "priority": spec.priority,
        "state": state_name(t.state),
        "submitted_at_ms": t.submitted_at_ms,
        "updated_at_ms": t.updated_at_ms,
        "attempt": t.attempt,
        "max_attempts": spec.retry.as_ref().map_or(0, |r| r.max_attempts),
        "worker": t.worker,
        "assigned_at_ms": t.assigned_at_ms,
        "started_at_ms": t.started_at_ms,
        "deadline_ms": t.deadline_ms,
        "until_ms": t.until_ms,
        "finished_at_ms": t.finished_at_ms,
        "cancel_reason": t.cancel_reason,
        "upstream": t.upstream,
        "depends_on": spec.depends_on,
        "resources": resources(&spec.resources),
        "labels": sorted(&spec.labels),
        "metadata": sorted(&spec.metadata),
        "timeout_ms": spec.timeout_ms,
        "last_failure": failure(&t.last_failure, fence),
    });
    if fence {
        v["fence"] = json!(t.fence);
    }
    v
}

async fn whoami(State(node): State<Arc<Node>>, headers: HeaderMap) -> ApiResult {
    let who = authorize(&node, &headers, crate::auth::Need::ReaderOrWorker, "GET /api/v1/whoami")
        .map_err(|e| ApiError::of(auth_refusal(e, true)))?;
    Ok(axum::Json(match who {
        None => json!({"auth": false, "name": null, "role": "admin"}),
        Some(c) => json!({"auth": true, "name": c.name, "role": c.role.as_str()}),
    })
    .into_response())
}

async fn cluster(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    let who = caller(&node, &headers, "/scheduler.v1.Cluster/Status")?;
    let p = Params::parse(q, &["stale"])?;
    let stale = p.flag("stale")?;
    let api = ClusterApi::new(node.clone());
    let status = api.status(request(pb::ClusterStatusRequest {}, &who)).await?.into_inner();
    let counts = node.read(stale, |s| s.counts()).await.map_err(tonic::Status::from)?;
    let tasks: BTreeMap<&str, u64> =
        TaskStateKind::ALL.iter().map(|k| (k.as_str(), counts[k.index()])).collect();
    let members: Vec<Value> = status
        .nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.id, "addr": n.addr, "voter": n.voter, "reachable": n.reachable,
                "error": n.error, "role": n.role, "term": n.term,
                "last_log_index": n.last_log_index, "committed_index": n.committed_index,
                "applied_index": n.applied_index, "snapshot_index": n.snapshot_index,
                "purged_index": n.purged_index, "matched_index": n.matched_index,
                "leader_id": n.leader_id,
                "disk_free_bytes": n.disk_free_bytes, "disk_min_free_bytes": n.disk_min_free_bytes,
                "disk_low": n.disk_low,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "node_id": node.raft.id(),
        "leader_id": status.leader_id,
        "term": status.term,
        "members": members,
        "tasks": tasks,
        "now_ms": raft::node::now_ms(),
    }))
    .into_response())
}

/// Completions per minute over a window, from tasks submitted in it (newest first, bounded
/// by the list scan): counts by outcome, mean end-to-end and run time.
async fn stats(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    caller(&node, &headers, "/scheduler.v1.Tasks/ListTasks")?;
    let p = Params::parse(q, &["window", "stale"])?;
    let stale = p.flag("stale")?;
    let window_min = match p.get("window") {
        None => 10,
        Some(w) => {
            let d = humantime::parse_duration(w)
                .map_err(|_| ApiError::bad("window", "expected a duration such as 10m"))?;
            let m = d.as_secs().div_ceil(60);
            if !(1..=60).contains(&m) {
                return Err(ApiError::bad("window", "must be between 1m and 60m"));
            }
            m
        }
    };
    let now = raft::node::now_ms();
    let start = (now / 60_000).saturating_sub(window_min - 1) * 60_000;
    let minutes = node
        .read(stale, |s| {
            let mut m: Vec<[u64; 6]> = vec![[0; 6]; window_min as usize];
            for t in s.tasks_before(TaskId(u64::MAX)).take(100_000) {
                if t.submitted_at < start {
                    break;
                }
                let (slot, run) = match &t.state {
                    state_machine::TaskState::Succeeded { at, started_at, .. } => {
                        (0, Some((*at, at.saturating_sub(*started_at))))
                    }
                    state_machine::TaskState::Failed { at } => (1, Some((*at, 0))),
                    state_machine::TaskState::Cancelled { at, .. }
                    | state_machine::TaskState::UpstreamFailed { at, .. } => (2, Some((*at, 0))),
                    _ => continue,
                };
                let Some((at, run_ms)) = run else { continue };
                if at < start {
                    continue;
                }
                let i = ((at - start) / 60_000) as usize;
                if let Some(row) = m.get_mut(i) {
                    row[slot] += 1;
                    row[3] += at.saturating_sub(t.submitted_at);
                    row[4] += run_ms;
                    row[5] += 1;
                }
            }
            m
        })
        .await
        .map_err(tonic::Status::from)?;
    let rows: Vec<Value> = minutes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let n = r[5].max(1) as f64;
            json!({
                "minute_ms": start + i as u64 * 60_000,
                "succeeded": r[0], "failed": r[1], "cancelled": r[2],
                "mean_end_to_end_ms": if r[5] == 0 { Value::Null } else { json!(r[3] as f64 / n) },
                "mean_run_ms": if r[0] == 0 { Value::Null } else { json!(r[4] as f64 / r[0] as f64) },
            })
        })
        .collect();
    Ok(axum::Json(json!({"window_minutes": window_min, "minutes": rows})).into_response())
}

async fn list_tasks(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    let who = caller(&node, &headers, "/scheduler.v1.Tasks/ListTasks")?;
    let p = Params::parse(
        q,
        &["state", "queue", "name", "since", "limit", "page_token", "order", "stale"],
    )?;
    let mut states = Vec::new();
    for s in p.get("state").unwrap_or("").split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let k = TaskStateKind::ALL.iter().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = TaskStateKind::ALL.iter().map(|k| k.as_str()).collect();
            ApiError::bad("state", &format!("unknown state {s:?} (expected {})", names.join(", ")))
        })?;
        states.push(convert::state_to_pb(*k) as i32);
    }
    let limit = p.u64("limit")?.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad("limit", "must be between 1 and 1000"));
    }
    let newest_first = match p.get("order") {
        None | Some("newest") => true,
        Some("oldest") => false,
        Some(_) => return Err(ApiError::bad("order", "expected newest or oldest")),
    };
    let req = pb::ListTasksRequest {
        states,
        queue: p.get("queue").unwrap_or("").to_string(),
        name: p.get("name").unwrap_or("").to_string(),
        page_token: p.u64("page_token")?.unwrap_or(0),
        limit: limit as u32,
        stale_ok: p.flag("stale")?,
        include_payload: false,
        newest_first,
        created_since_ms: p.since_ms("since", raft::node::now_ms())?,
    };
    let api = TasksApi::new(node.clone());
    let page = api.list_tasks(request(req, &who)).await?.into_inner();
    let fence = shows_fence(&who);
    Ok(axum::Json(json!({
        "tasks": page.tasks.iter().map(|t| task_json(t, fence)).collect::<Vec<_>>(),
        "next_page_token": page.next_page_token,
        "remaining": page.remaining,
        "remaining_is_lower_bound": page.remaining_is_lower_bound,
    }))
    .into_response())
}

fn task_id(raw: &str) -> Result<u64, ApiError> {
    match raw.parse::<u64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::bad("id", "expected a positive task id")),
    }
}

async fn get_task(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    let id = task_id(&raw)?;
    let who = caller(&node, &headers, "/scheduler.v1.Tasks/GetTask")?;
    let p = Params::parse(q, &["stale"])?;
    let stale = p.flag("stale")?;
    let api = TasksApi::new(node.clone());
    let task = api.get_task(request(pb::GetTaskRequest { id, stale_ok: stale }, &who)).await?;
    let task = task.into_inner();
    // The task was just read (linearizably unless stale): explain it from this node's state.
    let explain = api
        .explain_task(request(pb::ExplainTaskRequest { id, stale_ok: true }, &who))
        .await
        .ok()
        .map(|e| e.into_inner());
    let fence = shows_fence(&who);
    let mut out = task_json(&task, fence);
    out["result"] = json!(text(&task.result));
    out["explain"] = match &explain {
        None => Value::Null,
        Some(e) => json!({
            "summary": e.summary, "waiting_on": e.waiting_on, "ahead": e.ahead,
            "blocker": e.blocker, "until_ms": e.until_ms, "worker": e.worker,
            "attempt": e.attempt,
        }),
    };
    out["history"] = json!(history(&node, TaskId(id), fence));
    out["dag"] = node.local(|s| dag(s, TaskId(id)));
    Ok(axum::Json(out).into_response())
}

/// This task's state changes still retained in the event log, oldest first.
fn history(node: &Node, id: TaskId, fence: bool) -> Vec<Value> {
    let events = node.raft.sm().events();
    let mut cursor = match events.read_after(0, 0) {
        Ok(_) => 0,
        Err(raft::events::ReadError::Compacted { first, .. }) => first - 1,
        Err(raft::events::ReadError::Reset(at)) => at,
    };
    let mut out = Vec::new();
    let mut scanned = 0;
    while scanned < HISTORY_SCAN {
        let Ok((batches, next)) = events.read_after(cursor, 1_024) else { break };
        if batches.is_empty() {
            break;
        }
        scanned += batches.len();
        for b in &batches {
            for e in b.events.iter().filter(|e| e.task == id) {
                let mut v = json!({
                    "index": b.index, "at_ms": b.log_time, "state": e.state.as_str(),
                    "attempt": e.attempt,
                    "worker": e.holder.as_ref().map(|(w, _)| w.0.clone()),
                    "revoked_worker": e.revoked_from.as_ref().map(|(w, _)| w.0.clone()),
                });
                if fence {
                    v["fence"] = json!(e.holder.as_ref().map(|(_, f)| f.0));
                }
                out.push(v);
            }
        }
        if next <= cursor {
            break;
        }
        cursor = next;
    }
    out
}

/// The task's DAG: its dependencies (transitively) and the later tasks that depend on it or
/// on them, bounded by [`MAX_DAG_TASKS`]; `edges` go from dependency to dependent.
fn dag(s: &state_machine::SchedulerState, id: TaskId) -> Value {
    let mut members: BTreeSet<TaskId> = BTreeSet::from([id]);
    let mut todo = VecDeque::from([id]);
    while let Some(t) = todo.pop_front() {
        let Some(task) = s.task(t) else { continue };
        for d in &task.deps {
            if members.len() >= MAX_DAG_TASKS {
                break;
            }
            if members.insert(*d) {
                todo.push_back(*d);
            }
        }
    }
    // Dependents have higher ids than their dependencies: one ascending scan finds them.
    let mut down: BTreeSet<TaskId> = BTreeSet::from([id]);
    for t in s.tasks_from(TaskId(id.0 + 1)).take(DAG_SCAN) {
        if members.len() >= MAX_DAG_TASKS {
            break;
        }
        if t.deps.iter().any(|d| down.contains(d)) {
            down.insert(t.id);
            members.insert(t.id);
        }
    }
    let mut edges = Vec::new();
    let nodes: Vec<Value> = members
        .iter()
        .filter_map(|m| s.task(*m))
        .map(|t| {
            for d in &t.deps {
                if members.contains(d) {
                    edges.push(json!([d.0, t.id.0]));
                }
            }
            json!({"id": t.id.0, "name": t.spec.name, "state": t.state.kind().as_str(), "deps": t.deps.iter().map(|d| d.0).collect::<Vec<_>>()})
        })
        .collect();
    json!({"nodes": nodes, "edges": edges, "truncated": members.len() >= MAX_DAG_TASKS})
}

/// The action's JSON body (an empty body is `{}`), refusing fields other than `allowed`.
fn body_json(body: &Bytes, allowed: &str) -> Result<Value, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::of(error_body(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body over {MAX_BODY_BYTES} bytes"),
            "limit_exceeded",
            None,
        )));
    }
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", &format!("not valid JSON: {e}")))?;
    let Some(fields) = v.as_object() else {
        return Err(ApiError::bad("body", "expected a JSON object"));
    };
    if let Some(k) = fields.keys().find(|k| *k != allowed) {
        return Err(ApiError::bad(k, &format!("unknown field (expected {allowed})")));
    }
    Ok(v)
}

async fn cancel_task(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = task_id(&raw)?;
    let who = caller(&node, &headers, "/scheduler.v1.Tasks/CancelTasks")?;
    json_content(&headers)?;
    let v = body_json(&body, "reason")?;
    let reason = match v.get("reason") {
        None | Some(Value::Null) => "cancelled from the dashboard".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::bad("reason", "expected a string")),
    };
    let api = TasksApi::new(node.clone());
    let r = api
        .cancel_tasks(request(pb::CancelTasksRequest { ids: vec![id], reason }, &who))
        .await?
        .into_inner();
    let Some(r) = r.results.first() else {
        return Err(tonic::Status::internal("cancel answered no result").into());
    };
    if !r.ok {
        // The per-task refusal (unknown task, already finished) comes as text in the result.
        let msg = format!("task {id} was not cancelled: {}", r.error);
        return Err(ApiError::of(error_body(StatusCode::CONFLICT, &msg, "rejected", None)));
    }
    Ok(axum::Json(json!({
        "id": r.id, "cancelled": true, "already_cancelled": r.already_cancelled,
        "upstream_failed": r.upstream_failed,
    }))
    .into_response())
}

async fn retry_task(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> ApiResult {
    let id = task_id(&raw)?;
    let who = caller(&node, &headers, "/scheduler.v1.Tasks/RetryTask")?;
    json_content(&headers)?;
    let v = body_json(&body, "with_dependents")?;
    let with_dependents = match v.get("with_dependents") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("with_dependents", "expected true or false")),
    };
    let api = TasksApi::new(node.clone());
    let r = api
        .retry_task(request(pb::RetryTaskRequest { id, with_dependents }, &who))
        .await?
        .into_inner();
    let tasks: Vec<Value> =
        r.tasks.iter().map(|t| json!({"id": t.id, "state": state_name(t.state)})).collect();
    Ok(axum::Json(json!({"id": id, "retried": tasks, "log_index": r.log_index})).into_response())
}

async fn list_workers(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult {
    let who = caller(&node, &headers, "/scheduler.v1.Workers/ListWorkers")?;
    let p = Params::parse(q, &["stale"])?;
    let api = WorkersApi::new(node.clone());
    let list = api
        .list_workers(request(pb::ListWorkersRequest { stale_ok: p.flag("stale")? }, &who))
        .await?
        .into_inner();
    let leader = node.raft.is_leader();
    let now = tokio::time::Instant::now();
    let workers: Vec<Value> = list
        .workers
        .iter()
        .map(|w| {
            let spec = w.spec.clone().unwrap_or_default();
            let age = leader
                .then(|| {
                    node.liveness.heartbeat_age(&state_machine::WorkerId(spec.id.clone()), now)
                })
                .flatten();
            json!({
                "id": spec.id,
                "status": w.status,
                "draining": w.status == "draining",
                "queues": spec.queues,
                "labels": spec.labels.iter().collect::<BTreeMap<_, _>>(),
                "slots": spec.slots,
                "capacity": resources(&spec.capacity),
                "used": resources(&w.used),
                "tasks": w.tasks,
                "load": w.tasks.len(),
                "registered_at_ms": w.registered_at_ms,
                "heartbeat_age_ms": age.map(|a| a.as_millis() as u64),
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "workers": workers,
        "heartbeats_known": leader,
    }))
    .into_response())
}

async fn drain_worker(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let who = caller(&node, &headers, "/scheduler.v1.Workers/DrainWorker")?;
    json_content(&headers)?;
    let api = WorkersApi::new(node.clone());
    api.drain_worker(request(pb::DrainWorkerRequest { worker_id: id.clone() }, &who)).await?;
    Ok(axum::Json(json!({"id": id, "draining": true})).into_response())
}

async fn undrain_worker(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let who = caller(&node, &headers, "/scheduler.v1.Workers/UndrainWorker")?;
    json_content(&headers)?;
    let api = WorkersApi::new(node.clone());
    api.undrain_worker(request(pb::UndrainWorkerRequest { worker_id: id.clone() }, &who)).await?;
    Ok(axum::Json(json!({"id": id, "draining": false})).into_response())
}

/// Actions take JSON bodies only: a cross-site HTML form cannot send
/// `content-type: application/json` without a CORS preflight, which this server never allows.
fn json_content(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if ok {
        return Ok(());
    }
    Err(ApiError::of(error_body(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid content-type: actions need content-type: application/json",
        "invalid_argument",
        None,
    )))
}

#[cfg(test)]
mod tests {
    use state_machine::{Command, DepRef, NewTask, Op, SchedulerState, TaskSpec};

    use super::*;

    fn params(q: &[(&str, &str)], allowed: &[&str]) -> Result<Params, ApiError> {
        Params::parse(q.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), allowed)
    }

    fn message(e: ApiError) -> (StatusCode, String) {
        let code = e.0.status();
        let body = futures::executor::block_on(axum::body::to_bytes((*e.0).into_body(), 1 << 20))
            .expect("a body");
        (code, json_text(&body))
    }

    fn json_text(b: &[u8]) -> String {
        let v: Value = serde_json::from_slice(b).expect("a JSON error body");
        v["error"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn query_parameters_are_checked_by_name() {
        let (code, msg) = message(params(&[("colour", "red")], &["state"]).err().unwrap());
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(msg.contains("colour") && msg.contains("state"), "{msg}");
        let (_, msg) =
            message(params(&[("state", "a"), ("state", "b")], &["state"]).err().unwrap());
        assert!(msg.contains("more than once"), "{msg}");
        let p = params(
            &[("limit", "x"), ("stale", "yes"), ("since", "10m")],
            &["limit", "stale", "since"],
        )
        .unwrap();
        assert!(message(p.u64("limit").unwrap_err()).1.contains("limit"));
        assert!(message(p.flag("stale").unwrap_err()).1.contains("stale"));
        assert_eq!(p.since_ms("since", 1_000_000).unwrap(), 1_000_000 - 600_000);
        let p = params(&[("stale", ""), ("since", "1234")], &["stale", "since"]).unwrap();
        assert!(p.flag("stale").unwrap());
        assert_eq!(p.since_ms("since", 9_999_999).unwrap(), 1234);
        assert!(message(
            params(&[("since", "soon")], &["since"]).unwrap().since_ms("since", 0).unwrap_err()
        )
        .1
        .contains("since"));
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::CONFLICT);
        assert_eq!(http_status(Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http_status(Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(Code::OutOfRange), StatusCode::GONE);
        // A gRPC error keeps its message, reason and leader hint.
        let s: tonic::Status = crate::error::NodeError::from(raft::node::WriteError::Unavailable {
            reason: "no quorum".into(),
            leader: Some(proto::status::LeaderHint::new(2, "127.0.0.1:7002")),
        })
        .into();
        let e = ApiError::from(s);
        let code = e.0.status();
        let body =
            futures::executor::block_on(axum::body::to_bytes((*e.0).into_body(), 1 << 20)).unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["leader"]["id"], 2, "{v}");
        assert_eq!(v["reason"], "unavailable", "{v}");
    }

    #[test]
    fn fences_are_shown_to_admins_and_without_auth_only() {
        let caller = |role| Some(Caller { name: "t".into(), role, worker_id_prefix: None });
        assert!(shows_fence(&None));
        assert!(shows_fence(&caller(Role::Admin)));
        for role in [Role::Reader, Role::Submitter, Role::Worker] {
            assert!(!shows_fence(&caller(role)), "{role:?}");
        }
        let t = pb::Task {
            id: 7,
            fence: 99,
            last_failure: Some(pb::AttemptFailure { fence: 98, ..Default::default() }),
            ..Default::default()
        };
        let hidden = task_json(&t, false).to_string();
        assert!(!hidden.contains("fence") && !hidden.contains("99"), "{hidden}");
        let shown = task_json(&t, true);
        assert_eq!(
            (shown["fence"].as_u64(), shown["last_failure"]["fence"].as_u64()),
            (Some(99), Some(98))
        );
    }

    #[test]
    fn the_dag_holds_dependencies_and_dependents() {
        let mut s = SchedulerState::new();
        let batch = vec![
            NewTask::new(TaskSpec::new("a")),
            NewTask::with_deps(TaskSpec::new("b"), vec![DepRef::Batch(0)]),
            NewTask::with_deps(TaskSpec::new("c"), vec![DepRef::Batch(1)]),
            NewTask::new(TaskSpec::new("unrelated")),
        ];
        assert!(s.apply(&Command::new(1, Op::Submit { tasks: batch })).is_ok());
        let v = dag(&s, TaskId(2));
        let ids: Vec<u64> =
            v["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, vec![1, 2, 3], "{v}");
        assert_eq!(v["edges"], json!([[1, 2], [2, 3]]), "{v}");
        assert_eq!(v["truncated"], false);
        assert_eq!(dag(&s, TaskId(4))["nodes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn sse_frames_carry_the_index_as_id() {
        let b = pb::EventBatch {
            index: 42,
            log_time_ms: 5,
            term: 3,
            events: vec![pb::TaskEvent {
                task: 1,
                state: pb::TaskState::Running as i32,
                fence: 77,
                ..Default::default()
            }],
            planned_at: 0,
        };
        let f = String::from_utf8(super::super::sse::frame(&b, false).to_vec()).unwrap();
        assert!(f.starts_with("id: 42\nevent: batch\ndata: {") && f.ends_with("}\n\n"), "{f}");
        assert!(f.contains("\"state\":\"running\"") && !f.contains("77"), "{f}");
        let f = String::from_utf8(super::super::sse::frame(&b, true).to_vec()).unwrap();
        assert!(f.contains("\"fence\":77"), "{f}");
    }
}
