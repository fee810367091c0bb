//! The `Workers` service: registration, the assignment stream, heartbeats, reports (batched
//! or one at a time, always with the fencing token), drain, deregistration and listing.
//!
//! # The assignment stream
//! Served from the local applied state by any node. When it opens it sends every task the
//! worker holds (Assigned ones, and Running ones marked `started`) followed by a `Resync` with
//! the complete held set; then, as entries are applied, new assignments and revocations (a
//! task cancelled, timed out or taken away). If the node cannot tell what the worker missed
//! (events compacted, or the state replaced by a snapshot) it sends the held set again. So a
//! worker reconnecting to a new leader receives every assignment it holds and has not
//! acknowledged, and learns what it must stop. The stream ends with FAILED_PRECONDITION when
//! the worker's session ends (expired or replaced): the worker registers again.

use std::sync::Arc;

use proto::convert;
use proto::pb;
use state_machine::{
    validate, Op, Output, Rejection, ReportKind, ReportOutcome, TaskStateKind, WorkerId,
};
use tonic::{Request, Response, Status};

use super::{answer, open_stream, wait_more, BoxStream};
use crate::auth;
use crate::error::{NodeError, NodeResult};
use crate::streams::{StreamKind, StreamTx};
use crate::Node;

/// Implements `scheduler.v1.Workers`.
pub struct WorkersApi {
    node: Arc<Node>,
}

fn session_gone(worker: &WorkerId, session: u64) -> NodeError {
    Rejection::WorkerUnavailable {
        worker: worker.clone(),
        status: "gone".into(),
        reason: format!("session {session} is not live; register again"),
    }
    .into()
}

impl WorkersApi {
    /// The service of `node`.
    pub fn new(node: Arc<Node>) -> Self {
        WorkersApi { node }
    }

    async fn register(
        &self,
        req: pb::RegisterWorkerRequest,
        caller: Option<auth::Caller>,
    ) -> NodeResult<pb::RegisterWorkerResponse> {
        let node = &self.node;
        let spec = convert::worker_spec_from_pb(req.worker)?;
        validate::worker_spec(&spec, &node.cfg.limits.fields)?;
        let instance = req.instance;
        let op = match caller {
            // The session is bound to the token; apply refuses another token's registration
            // of a live worker.
            Some(c) => Op::RegisterWorkerAs { spec, instance, owner: c.name },
            None => Op::RegisterWorker { spec, instance },
        };
        let (_, out) = node.write(op).await?;
        let Output::Registered { session, requeued } = out else {
            return Err(NodeError::Internal(format!("register answered {out:?}")));
        };
        Ok(pb::RegisterWorkerResponse {
            session,
            heartbeat_interval_ms: node.cfg.workers.heartbeat_interval.as_millis() as u64,
            heartbeat_ttl_ms: node.cfg.workers.heartbeat_ttl.as_millis() as u64,
            requeued: requeued.iter().map(|t| t.0).collect(),
        })
    }

    async fn reports(
        &self,
        worker: String,
        reports: Vec<pb::TaskReport>,
    ) -> NodeResult<Vec<pb::ReportResult>> {
        let worker = WorkerId(worker);
        validate::worker_id("worker_id", &worker)?;
        if reports.is_empty() {
            return Err(Rejection::invalid("reports", "send at least one report").into());
        }
        let max = self.node.cfg.limits.fields.max_result_bytes;
        let reports = reports
            .into_iter()
            .enumerate()
            .map(|(i, r)| convert::report_from_pb(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, r) in reports.iter().enumerate() {
            if let ReportKind::Succeeded { result } = &r.outcome {
                if result.len() > max {
                    return Err(Rejection::limit(
                        format!("reports[{i}].result"),
                        max as u64,
                        result.len() as u64,
                    )
                    .into());
                }
            }
        }
        let tasks: Vec<u64> = reports.iter().map(|r| r.task.0).collect();
        let (_, out) = self.node.write(Op::Report { worker, reports }).await?;
        let Output::Reported(results) = out else {
            return Err(NodeError::Internal(format!("report answered {out:?}")));
        };
        Ok(tasks
            .into_iter()
            .zip(results)
            .map(|(task, r)| match r {
                Ok(ReportOutcome::Accepted(k)) => pb::ReportResult {
                    task,
                    accepted: true,
                    state: convert::state_to_pb(k) as i32,
                    ..Default::default()
                },
                Ok(ReportOutcome::Duplicate(k)) => pb::ReportResult {
                    task,
                    accepted: true,
                    duplicate: true,
                    state: convert::state_to_pb(k) as i32,
                    ..Default::default()
                },
                Err(e) => pb::ReportResult {
                    task,
                    stale: matches!(
                        e,
                        Rejection::StaleFence { .. } | Rejection::WrongWorker { .. }
                    ),
                    error: e.to_string(),
                    ..Default::default()
                },
            })
            .collect())
    }

    /// One report, answered as a status (FAILED_PRECONDITION for a stale token etc.).
    async fn one(
        &self,
        worker: String,
        task: u64,
        fence: u64,
        outcome: pb::task_report::Outcome,
    ) -> NodeResult<pb::TaskReportResponse> {
        let worker_id = WorkerId(worker.clone());
        validate::worker_id("worker_id", &worker_id)?;
        let report =
            convert::report_from_pb(0, pb::TaskReport { task, fence, outcome: Some(outcome) })?;
        if let ReportKind::Succeeded { result } = &report.outcome {
            let max = self.node.cfg.limits.fields.max_result_bytes;
            if result.len() > max {
                return Err(Rejection::limit("result", max as u64, result.len() as u64).into());
            }
        }
        let (_, out) =
            self.node.write(Op::Report { worker: worker_id, reports: vec![report] }).await?;
        let Output::Reported(mut results) = out else {
            return Err(NodeError::Internal(format!("report answered {out:?}")));
        };
        match results.pop() {
            Some(Ok(ReportOutcome::Accepted(k))) => Ok(pb::TaskReportResponse {
                state: convert::state_to_pb(k) as i32,
                duplicate: false,
            }),
            Some(Ok(ReportOutcome::Duplicate(k))) => Ok(pb::TaskReportResponse {
                state: convert::state_to_pb(k) as i32,
                duplicate: true,
            }),
            Some(Err(e)) => Err(e.into()),
            None => Err(NodeError::Internal("report without a result".into())),
        }
    }

    async fn list(&self, stale_ok: bool) -> NodeResult<pb::ListWorkersResponse> {
        self.node
            .read(stale_ok, |s| pb::ListWorkersResponse {
                workers: s
                    .workers()
                    .map(|w| pb::WorkerInfo {
                        spec: Some(convert::worker_spec_to_pb(&w.spec)),
                        status: w.status.as_str().into(),
                        session: w.session,
                        registered_at_ms: w.registered_at,
                        used: s.worker_used(&w.spec.id).map(convert::resources_to_pb),
                        tasks: s.held_by(&w.spec.id).map(|t| t.id.0).collect(),
                    })
                    .collect(),
            })
            .await
    }
}

/// Send everything `me` holds, then the resync marker.
async fn send_held(node: &Node, me: &WorkerId, tx: &StreamTx<pb::WorkerMessage>) -> bool {
    let held: Vec<pb::Assignment> =
        node.local(|s| s.held_by(me).filter_map(|t| convert::assignment_to_pb(s, t)).collect());
    let resync = pb::Resync {
        tasks: held.iter().map(|a| a.task).collect(),
        fences: held.iter().map(|a| a.fence).collect(),
    };
    for a in held {
        let msg = pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Assignment(a)) };
        if tx.send(Ok(msg)).await.is_err() {
            return false;
        }
    }
    tx.send(Ok(pb::WorkerMessage { msg: Some(pb::worker_message::Msg::Resync(resync)) }))
        .await
        .is_ok()
}

async fn assignment_stream(
    node: Arc<Node>,
    me: WorkerId,
    session: u64,
    tx: StreamTx<pb::WorkerMessage>,
) {
    let events = node.raft.sm().events().clone();
    let mut applied = events.subscribe();
    // Take the cursor before reading the state: events past it may be reflected in the state
    // already and get sent again, which the worker ignores (it dedupes by task and fence).
    let mut cursor = events.applied();
    if !send_held(&node, &me, &tx).await {
        return;
    }
    loop {
        match events.read_after(cursor, 512) {
            Ok((batches, next)) => {
                let mut assigned = Vec::new();
                let mut revoked = Vec::new();
                for b in &batches {
                    for e in &b.events {
                        if let Some((w, f)) = &e.revoked_from {
                            if *w == me {
                                revoked.push(pb::Revoke {
                                    task: e.task.0,
                                    fence: f.0,
                                    reason: e.state.as_str().into(),
                                });
                            }
                        }
                        if let Some((w, f)) = &e.holder {
                            if *w == me && e.state == TaskStateKind::Assigned {
                                assigned.push((e.task, *f));
                            }
                        }
                    }
                }
                let (alive, msgs) = node.local(|s| {
                    let alive =
                        s.worker(&me).is_some_and(|w| w.session == session && w.status.is_live());
                    let msgs: Vec<pb::Assignment> = assigned
                        .iter()
                        .filter_map(|(t, f)| {
                            s.task(*t)
                                .and_then(|t| convert::assignment_to_pb(s, t))
                                .filter(|a| a.fence == f.0)
                        })
                        .collect();
                    (alive, msgs)
                });
                let out = revoked
                    .into_iter()
                    .map(pb::worker_message::Msg::Revoke)
                    .chain(msgs.into_iter().map(pb::worker_message::Msg::Assignment));
                for m in out {
                    if tx.send(Ok(pb::WorkerMessage { msg: Some(m) })).await.is_err() {
                        return;
                    }
                }
                if !alive {
                    let _ = tx.send(Err(Status::from(session_gone(&me, session)))).await;
                    return;
                }
                cursor = next;
            }
            Err(_) => {
                cursor = events.applied();
                if !send_held(&node, &me, &tx).await {
                    return;
                }
            }
        }
        if !wait_more(&node, &mut applied, cursor, &tx).await {
            return;
        }
    }
}

/// The worker id a Workers request acts for.
trait ActsFor {
    fn worker_id(&self) -> &str;
}

macro_rules! acts_for {
    ($($t:ty),*) => {$(
        impl ActsFor for $t {
            fn worker_id(&self) -> &str {
                &self.worker_id
            }
        }
    )*};
}

acts_for!(
    pb::OpenAssignmentsRequest,
    pb::HeartbeatRequest,
    pb::ReportRequest,
    pb::StartTaskRequest,
    pb::CompleteTaskRequest,
    pb::FailTaskRequest,
    pb::DrainWorkerRequest,
    pb::UndrainWorkerRequest,
    pb::DeregisterWorkerRequest
);

impl ActsFor for pb::RegisterWorkerRequest {
    fn worker_id(&self) -> &str {
        self.worker.as_ref().map_or("", |w| w.id.as_str())
    }
}

impl WorkersApi {
    /// The request, once its caller may act for the worker it names (a worker token is held
    /// to its `worker_id_prefix`; authentication off: anyone may).
    ///
    /// A live worker registered with a token may only be acted for with that token (admins
    /// excepted). This reads this node's applied state, so a follower a moment behind may
    /// judge by the previous registration; the state machine still checks the session and
    /// the fencing token of everything written.
    fn permitted<T: ActsFor>(&self, req: Request<T>) -> Result<T, Status> {
        let caller = auth::caller_of(&req);
        let id = req.get_ref().worker_id();
        let mut allowed = auth::check_worker(caller, id).map_err(NodeError::from);
        if let (Ok(()), Some(c)) = (&allowed, caller) {
            if c.role != auth::Role::Admin {
                let worker = WorkerId(id.to_string());
                let owner = self.node.local(|s| {
                    s.worker(&worker).filter(|w| w.status.is_live()).map(|w| w.owner.clone())
                });
                if owner.is_some_and(|o| !o.is_empty() && o != c.name) {
                    allowed = Err(Rejection::WorkerOwned { worker }.into());
                }
            }
        }
        answer(&self.node, allowed)?;
        Ok(req.into_inner())
    }
}

#[tonic::async_trait]
impl pb::workers_server::Workers for WorkersApi {
    async fn register_worker(
        &self,
        req: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let caller = auth::caller_of(&req).cloned();
        let r = self.permitted(req)?;
        answer(&self.node, self.register(r, caller).await)
    }

    type OpenAssignmentsStream = BoxStream<pb::WorkerMessage>;

    async fn open_assignments(
        &self,
        req: Request<pb::OpenAssignmentsRequest>,
    ) -> Result<Response<Self::OpenAssignmentsStream>, Status> {
        let r = self.permitted(req)?;
        let me = WorkerId(r.worker_id);
        let session = r.session;
        let check = self
            .node
            .read(false, |s| match s.worker(&me) {
                None => Err(NodeError::from(Rejection::WorkerNotFound { worker: me.clone() })),
                Some(w) if w.session != session || !w.status.is_live() => {
                    Err(session_gone(&me, session))
                }
                Some(_) => Ok(()),
            })
            .await
            .and_then(|r| r);
        answer(&self.node, check)?;
        let (tx, stream) = open_stream(&self.node, StreamKind::Assignments)?;
        tokio::spawn(assignment_stream(self.node.clone(), me, session, tx));
        Ok(Response::new(stream))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = self.permitted(req)?;
        let result = self.node.heartbeat(&r.worker_id, r.session).await;
        answer(&self.node, result.map(|draining| pb::HeartbeatResponse { draining }))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let r = self.permitted(req)?;
        let results = self
            .reports(r.worker_id, r.reports)
            .await
            .map(|results| pb::ReportResponse { results });
        answer(&self.node, results)
    }

    async fn start_task(
        &self,
        req: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::TaskReportResponse>, Status> {
        let r = self.permitted(req)?;
        let out = self
            .one(r.worker_id, r.task, r.fence, pb::task_report::Outcome::Started(pb::Started {}))
            .await;
        answer(&self.node, out)
    }

    async fn complete_task(
        &self,
        req: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::TaskReportResponse>, Status> {
        let r = self.permitted(req)?;
        let outcome = pb::task_report::Outcome::Succeeded(pb::Succeeded { result: r.result });
        answer(&self.node, self.one(r.worker_id, r.task, r.fence, outcome).await)
    }

    async fn fail_task(
        &self,
        req: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::TaskReportResponse>, Status> {
        let r = self.permitted(req)?;
        let outcome = pb::task_report::Outcome::Failed(pb::Failed {
            message: r.message,
            retryable: r.retryable,
        });
        answer(&self.node, self.one(r.worker_id, r.task, r.fence, outcome).await)
    }

    async fn drain_worker(
        &self,
        req: Request<pb::DrainWorkerRequest>,
    ) -> Result<Response<pb::DrainWorkerResponse>, Status> {
        let worker = WorkerId(self.permitted(req)?.worker_id);
        let r =
            self.node.write(Op::DrainWorker { worker }).await.map(|_| pb::DrainWorkerResponse {});
        answer(&self.node, r)
    }

    async fn undrain_worker(
        &self,
        req: Request<pb::UndrainWorkerRequest>,
    ) -> Result<Response<pb::UndrainWorkerResponse>, Status> {
        let worker = WorkerId(self.permitted(req)?.worker_id);
        let r = self
            .node
            .write(Op::UndrainWorker { worker })
            .await
            .map(|_| pb::UndrainWorkerResponse {});
        answer(&self.node, r)
    }

    /// Admins only (the method table): no worker may remove a record.
    async fn remove_worker(
        &self,
        req: Request<pb::RemoveWorkerRequest>,
    ) -> Result<Response<pb::RemoveWorkerResponse>, Status> {
        let worker = WorkerId(req.into_inner().worker_id);
        let r = match validate::worker_id("worker_id", &worker) {
            Err(e) => Err(e.into()),
            Ok(()) => self
                .node
                .write(Op::RemoveWorker { worker })
                .await
                .map(|_| pb::RemoveWorkerResponse {}),
        };
        answer(&self.node, r)
    }

    async fn deregister_worker(
        &self,
        req: Request<pb::DeregisterWorkerRequest>,
    ) -> Result<Response<pb::DeregisterWorkerResponse>, Status> {
        let r = self.permitted(req)?;
        let out = self
            .node
            .write(Op::DeregisterWorker { worker: WorkerId(r.worker_id), session: r.session })
            .await;
        let out = out.and_then(|(_, o)| match o {
            Output::WorkerUpdated { requeued } => Ok(pb::DeregisterWorkerResponse {
                requeued: requeued.iter().map(|t| t.0).collect(),
            }),
            other => Err(NodeError::Internal(format!("deregister answered {other:?}"))),
        });
        answer(&self.node, out)
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        answer(&self.node, self.list(req.into_inner().stale_ok).await)
    }
}
