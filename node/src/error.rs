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
//! | a submit while the data disk is below its free-space floor ([`crate::disk`]) | RESOURCE_EXHAUSTED | disk_space_low |
//! | unknown task or worker | NOT_FOUND | not_found |
//! | unknown token (revoke) | NOT_FOUND | not_found |
//! | another token of that name (create) | ALREADY_EXISTS | already_exists |
//! | stale fencing token, wrong worker | FAILED_PRECONDITION | stale_fence / wrong_worker |
//! | idempotency key reused with a different body | FAILED_PRECONDITION | idempotency_conflict |
//! | task in the wrong state, does not fit, worker dead/draining | FAILED_PRECONDITION | invalid_state / does_not_fit / worker_unavailable |
//! | no leader, forward failed, write not committed in time, node stopping | UNAVAILABLE | unavailable / not_leader |
//! | a membership change that would lose a reachable majority, a learner not caught up | FAILED_PRECONDITION | invalid_state |
//! | an undecodable peer message, or one with implausible values (`raft::plausible`) | INVALID_ARGUMENT | invalid_argument |
//! | a Raft message from a node that is not a member here | FAILED_PRECONDITION | invalid_state |
//! | a request body that is not valid protobuf (built by `proto::codec` before any handler runs) | INVALID_ARGUMENT | invalid_argument |
//! | a peer speaking another internal encoding | FAILED_PRECONDITION | invalid_state |
//! | a kind of operation some member's release cannot apply yet (rolling upgrade) | FAILED_PRECONDITION | invalid_state |
//! | a followed task was purged | NOT_FOUND | not_found |
//! | a watch resumes before the retained events | OUT_OF_RANGE | out_of_range |
//! | no token, or an unknown one | UNAUTHENTICATED | unauthenticated |
//! | the token's role does not allow it, a worker id outside the token's prefix, a live worker registered by another token | PERMISSION_DENIED | permission_denied |
//! | a bug | INTERNAL | internal |
//!
//! The reason codes, the metadata keys and the hint format are the wire contract in
//! [`proto::status`], shared with the client. The one exception to "built here" is
//! [`NodeError::Relayed`]: the leader's own answer to a request this node passed on, returned
//! unchanged so the caller sees exactly what the leader said.

use proto::status::{status, LeaderHint, Reason};
use raft::node::{AdminError, WriteError};
use raft::service::RpcError;
use state_machine::Rejection;
use tonic::{Code, Status};

use crate::auth::AuthError;

pub use proto::status::REASON_KEY;

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
    /// A Raft RPC from a peer could not be handled.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// A peer sent a message that does not decode or lacks a required part.
    #[error("{0}")]
    Malformed(String),
    /// The leader's answer to a request this node passed on, relayed unchanged.
    #[error("{}", .0.message())]
    Relayed(Status),
    /// A task a stream follows is gone (purged by retention).
    #[error("{0}")]
    Gone(String),
    /// A watch asked for events this node no longer retains.
    #[error("{0}")]
    OutOfRange(String),
    /// A resource limit outside the state machine (pending tasks).
    #[error("{0}")]
    Exhausted(String),
    /// The data disk is below its free-space floor: new submits are refused.
    #[error(transparent)]
    DiskLow(#[from] crate::disk::DiskLow),
    /// The caller is not authenticated or not allowed ([`crate::auth`]).
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// The operation needs a command version some member does not have yet
    /// ([`crate::version`]).
    #[error("{0}")]
    Upgrade(String),
    /// An invariant of the node itself broke.
    #[error("internal error: {0}")]
    Internal(String),
}

fn with_meta(code: Code, message: String, reason: Reason, leader: Option<&LeaderHint>) -> Status {
    status(code, message, &reason, leader)
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let msg = e.to_string();
        match e {
            NodeError::Rejected(r) => {
                let (code, reason) = match r {
                    Rejection::InvalidArgument { .. } => {
                        (Code::InvalidArgument, Reason::InvalidArgument)
                    }
                    Rejection::UnknownDependency { .. } => {
                        (Code::InvalidArgument, Reason::UnknownDependency)
                    }
                    Rejection::DependencyCycle { .. } => {
                        (Code::InvalidArgument, Reason::DependencyCycle)
                    }
                    Rejection::LimitExceeded { .. } => {
                        (Code::ResourceExhausted, Reason::LimitExceeded)
                    }
                    Rejection::TaskNotFound { .. }
                    | Rejection::WorkerNotFound { .. }
                    | Rejection::TokenNotFound { .. } => (Code::NotFound, Reason::NotFound),
                    Rejection::TokenExists { .. } => (Code::AlreadyExists, Reason::AlreadyExists),
                    Rejection::StaleFence { .. } => (Code::FailedPrecondition, Reason::StaleFence),
                    Rejection::WrongWorker { .. } => {
                        (Code::FailedPrecondition, Reason::WrongWorker)
                    }
                    Rejection::InvalidState { .. } => {
                        (Code::FailedPrecondition, Reason::InvalidState)
                    }
                    Rejection::DoesNotFit { .. } => (Code::FailedPrecondition, Reason::DoesNotFit),
                    Rejection::KeyConflict { .. } => {
                        (Code::FailedPrecondition, Reason::IdempotencyConflict)
                    }
                    Rejection::WorkerUnavailable { .. } => {
                        (Code::FailedPrecondition, Reason::WorkerUnavailable)
                    }
                    Rejection::WorkerOwned { .. } => {
                        (Code::PermissionDenied, Reason::PermissionDenied)
                    }
                    Rejection::ClusterVersion { .. } => {
                        (Code::FailedPrecondition, Reason::InvalidState)
                    }
                };
                with_meta(code, msg, reason, None)
            }
            NodeError::Write(WriteError::Unavailable { leader, .. }) => {
                with_meta(Code::Unavailable, msg, Reason::Unavailable, leader.as_ref())
            }
            NodeError::Write(WriteError::NotLeader { leader }) => with_meta(
                Code::Unavailable,
                match &leader {
                    Some(l) => format!("this node is not the leader; node {} leads", l.id),
                    None => "no leader is known yet (an election may be under way)".into(),
                },
                Reason::NotLeader,
                leader.as_ref(),
            ),
            NodeError::Write(WriteError::Fatal(_)) => {
                with_meta(Code::Unavailable, msg, Reason::Unavailable, None)
            }
            NodeError::Admin(AdminError::NotLeader { leader }) => with_meta(
                Code::Unavailable,
                "this node is not the leader; retry on the leader".into(),
                Reason::NotLeader,
                leader.as_ref(),
            ),
            NodeError::Admin(AdminError::Invalid(_) | AdminError::Unsafe(_)) => {
                with_meta(Code::FailedPrecondition, msg, Reason::InvalidState, None)
            }
            NodeError::Admin(AdminError::Unavailable(_) | AdminError::Fatal(_)) => {
                with_meta(Code::Unavailable, msg, Reason::Unavailable, None)
            }
            NodeError::Exhausted(_) => {
                with_meta(Code::ResourceExhausted, msg, Reason::LimitExceeded, None)
            }
            NodeError::DiskLow(_) => {
                with_meta(Code::ResourceExhausted, msg, Reason::DiskSpaceLow, None)
            }
            NodeError::Rpc(
                RpcError::Undecodable { .. }
                | RpcError::Implausible(_)
                | RpcError::BadSnapshot { .. },
            )
            | NodeError::Malformed(_) => {
                with_meta(Code::InvalidArgument, msg, Reason::InvalidArgument, None)
            }
            NodeError::Rpc(RpcError::Version { .. } | RpcError::Stranger(_)) => {
                with_meta(Code::FailedPrecondition, msg, Reason::InvalidState, None)
            }
            NodeError::Rpc(RpcError::Stopped) => {
                with_meta(Code::Unavailable, msg, Reason::Unavailable, None)
            }
            NodeError::Relayed(status) => status,
            NodeError::Gone(_) => with_meta(Code::NotFound, msg, Reason::NotFound, None),
            NodeError::OutOfRange(_) => with_meta(Code::OutOfRange, msg, Reason::OutOfRange, None),
            NodeError::Auth(AuthError::Missing | AuthError::Unknown) => {
                with_meta(Code::Unauthenticated, msg, Reason::Unauthenticated, None)
            }
            NodeError::Auth(
                AuthError::Denied { .. }
                | AuthError::WrongWorkerId { .. }
                | AuthError::NotPeer { .. },
            ) => with_meta(Code::PermissionDenied, msg, Reason::PermissionDenied, None),
            NodeError::Upgrade(_) => {
                with_meta(Code::FailedPrecondition, msg, Reason::InvalidState, None)
            }
            NodeError::Internal(_) => with_meta(Code::Internal, msg, Reason::Internal, None),
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

        // Neither the current token nor the holder reaches the text; the reason still tells.
        let s: Status = NodeError::from(Rejection::StaleFence {
            task: TaskId(1),
            current: Some(Fence(777)),
            given: Fence(3),
        })
        .into();
        assert!(!s.message().contains("777"), "{}", s.message());
        assert_eq!(reason(&s), "stale_fence");
        let s: Status = NodeError::from(Rejection::WrongWorker {
            task: TaskId(1),
            holder: Some(state_machine::WorkerId("the-holder".into())),
            given: state_machine::WorkerId("w2".into()),
        })
        .into();
        assert!(!s.message().contains("the-holder"), "{}", s.message());
        assert_eq!(reason(&s), "wrong_worker");

        let s: Status = NodeError::from(Rejection::TaskNotFound { task: TaskId(9) }).into();
        assert_eq!(s.code(), Code::NotFound);

        let s: Status = NodeError::from(WriteError::Unavailable {
            reason: "no leader".into(),
            leader: Some(LeaderHint::new(2, "127.0.0.1:7002")),
        })
        .into();
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(proto::status::LEADER_HINT_KEY).unwrap(), "2@127.0.0.1:7002");

        let s: Status = NodeError::from(crate::disk::DiskLow {
            node: 3,
            path: "/var/lib/raftsched".into(),
            free: 1 << 20,
            floor: 1 << 30,
        })
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(reason(&s), "disk_space_low");
        for part in ["node 3", "/var/lib/raftsched", "1.0 MiB", "1.0 GiB"] {
            assert!(s.message().contains(part), "{part}: {}", s.message());
        }
    }
}
