//! Calls of the `Workers` service: registration, the assignment stream, heartbeats and
//! reports.
//!
//! Reports quote the attempt's fencing token, so a retried report answers `duplicate` instead
//! of applying twice; re-registering with the same instance keeps the worker's session.

use futures::stream::StreamExt;
use proto::pb;

use super::retry::Kind;
use super::{workers, AssignmentStream, Client};
use crate::error::Error;

impl Client {
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

    /// The reverse of a drain: the worker takes new tasks again.
    pub async fn undrain_worker(&self, worker_id: &str) -> Result<(), Error> {
        let req = pb::UndrainWorkerRequest { worker_id: worker_id.to_string() };
        self.call("undrain_worker", Kind::Write, req, |ch, r| async move {
            workers(ch).undrain_worker(r).await
        })
        .await?;
        Ok(())
    }

    /// Deletes a dead worker's record (a live worker is refused).
    pub async fn remove_worker(&self, worker_id: &str) -> Result<(), Error> {
        let req = pb::RemoveWorkerRequest { worker_id: worker_id.to_string() };
        self.call("remove_worker", Kind::Write, req, |ch, r| async move {
            workers(ch).remove_worker(r).await
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
}
