//! Node errors and **the** table that maps them to gRPC status codes.
//!
//! Every handler returns [`NodeError`]; nothing else in the node builds a `tonic::Status` for
//! a domain failure. Besides the code and message, each status carries
//! `x-raftsched-reason` (a stable machine-readable reason) and, when the cluster has no
//! leader here, `x-raftsched-leader` = `<id>@<host:port>` so clients can redirect.
//!
//! | error | code | reason |
//! |---|---|---|
//! | malformed field (`Rejection::InvalidArgument`, unknown dependency, cycle) | INVALID_ARGUMENT | invalid_argument / unknown_dependency / dependency_cycle |
//! | size or count limit, too many pending tasks | RESOURCE_EXHAUSTED | limit_exceeded |
//! | unknown task or worker | NOT_FOUND | not_found |
//! | stale fencing token, wrong worker | FAILED_PRECONDITION | stale_fence / wrong_worker |
//! | idempotency key reused with a different body | FAILED_PRECONDITION | idempotency_conflict |
//! | task in the wrong state, does not fit, worker dead/draining | FAILED_PRECONDITION | invalid_state / does_not_fit / worker_unavailable |
//! | no leader, forward failed, write not committed in time, node stopping | UNAVAILABLE | unavailable / not_leader |
//! | a bug | INTERNAL | internal |

use raft::raft_node::{AdminError, LeaderHint, WriteError};
use state_machine::Rejection;
use tonic::{Code, Status};

/// Metadata key with the machine-readable reason.
pub const REASON_KEY: &str = "x-raftsched-reason";

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The state machine (or the same validation before proposing) refused the request.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The write or read could not be served (outcome unknown for writes).
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A cluster administration request failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A resource limit outside the state machine (pending tasks).
    #[error("{0}")]
    Exhausted(String),
    /// An invariant of the node itself broke.
    #[error("internal error: {0}")]
    Internal(String),
}

fn with_meta(code: Code, message: String, reason: &str, leader: Option<&LeaderHint>) -> Status {
    let mut s = Status::new(code, message);
    if let Ok(v) = reason.parse() {
        s.metadata_mut().insert(REASON_KEY, v);
    }
    if let Some(Some((id, addr))) = leader {
        if let Ok(v) = format!("{id}@{addr}").parse() {
            s.metadata_mut().insert(proto::LEADER_HINT_KEY, v);
        }
    }
    s
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let msg = e.to_string();
        match e {
            NodeError::Rejected(r) => {
                let (code, reason) = match r {
                    Rejection::InvalidArgument { .. } => {
                        (Code::InvalidArgument, "invalid_argument")
                    }
                    Rejection::UnknownDependency { .. } => {
                        (Code::InvalidArgument, "unknown_dependency")
                    }
                    Rejection::DependencyCycle { .. } => {
                        (Code::InvalidArgument, "dependency_cycle")
                    }
                    Rejection::LimitExceeded { .. } => (Code::ResourceExhausted, "limit_exceeded"),
                    Rejection::TaskNotFound { .. } | Rejection::WorkerNotFound { .. } => {
                        (Code::NotFound, "not_found")
                    }
                    Rejection::StaleFence { .. } => (Code::FailedPrecondition, "stale_fence"),
                    Rejection::WrongWorker { .. } => (Code::FailedPrecondition, "wrong_worker"),
                    Rejection::InvalidState { .. } => (Code::FailedPrecondition, "invalid_state"),
                    Rejection::DoesNotFit { .. } => (Code::FailedPrecondition, "does_not_fit"),
                    Rejection::KeyConflict { .. } => {
                        (Code::FailedPrecondition, "idempotency_conflict")
                    }
                    Rejection::WorkerUnavailable { .. } => {
                        (Code::FailedPrecondition, "worker_unavailable")
                    }
                };
                with_meta(code, msg, reason, None)
            }
            NodeError::Write(WriteError::Unavailable { leader, .. }) => {
                with_meta(Code::Unavailable, msg, "unavailable", Some(&leader))
            }
            NodeError::Write(WriteError::Fatal(_)) => {
                with_meta(Code::Unavailable, msg, "unavailable", None)
            }
            NodeError::Admin(AdminError::NotLeader { leader }) => with_meta(
                Code::Unavailable,
                "this node is not the leader; retry on the leader".into(),
                "not_leader",
                Some(&leader),
            ),
            NodeError::Admin(AdminError::Invalid(_)) => {
                with_meta(Code::FailedPrecondition, msg, "invalid_state", None)
            }
            NodeError::Admin(AdminError::Unavailable(_) | AdminError::Fatal(_)) => {
                with_meta(Code::Unavailable, msg, "unavailable", None)
            }
            NodeError::Exhausted(_) => {
                with_meta(Code::ResourceExhausted, msg, "limit_exceeded", None)
            }
            NodeError::Internal(_) => with_meta(Code::Internal, msg, "internal", None),
        }
    }
}

/// Result type of handlers.
pub type NodeResult<T> = Result<T, NodeError>;

#[cfg(test)]
mod tests {
    use super::*;
    use state_machine::{Fence, TaskId};

    fn reason(s: &Status) -> &str {
        s.metadata().get(REASON_KEY).unwrap().to_str().unwrap()
    }

    #[test]
    fn the_table() {
        let s: Status =
            NodeError::from(Rejection::invalid("tasks[2].queue", "must not be empty")).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("tasks[2].queue"), "{}", s.message());
        assert_eq!(reason(&s), "invalid_argument");

        let s: Status = NodeError::from(Rejection::limit("tasks[0].payload", 10, 20)).into();
        assert_eq!(s.code(), Code::ResourceExhausted);

        let s: Status = NodeError::from(Rejection::StaleFence {
            task: TaskId(1),
            current: None,
            given: Fence(3),
        })
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert_eq!(reason(&s), "stale_fence");

        let s: Status = NodeError::from(Rejection::TaskNotFound { task: TaskId(9) }).into();
        assert_eq!(s.code(), Code::NotFound);

        let s: Status = NodeError::from(WriteError::Unavailable {
            reason: "no leader".into(),
            leader: Some((2, "127.0.0.1:7002".into())),
        })
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(proto::LEADER_HINT_KEY).unwrap(), "2@127.0.0.1:7002");
    }
}
