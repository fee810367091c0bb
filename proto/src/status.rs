//! The error contract on the wire, shared by server and client.
//!
//! A node answers a failed call with a gRPC status whose code says what kind of failure it is
//! and whose metadata carries two more facts a program can act on:
//!
//! * [`REASON_KEY`] (`x-raftsched-reason`): a stable, machine-readable [`Reason`] — the code
//!   says "FAILED_PRECONDITION", the reason says which precondition (`stale_fence`,
//!   `idempotency_conflict`, ...);
//! * [`LEADER_HINT_KEY`] (`x-raftsched-leader`): on UNAVAILABLE answers, where the leader
//!   probably is, as `<id>@<host:port>` ([`LeaderHint`]), so a client can go there directly.
//!
//! Nodes mark a request they pass on to the leader with [`FORWARDED_KEY`], so the leader never
//! passes it on again: a request travels at most one hop.
//!
//! The server builds every status with [`status`]; the client reads them back with
//! [`reason_of`] and [`leader_of`]. Unknown reasons (from a newer server) are kept as
//! [`Reason::Other`], never dropped, and a malformed hint is ignored rather than followed.

use std::fmt;

use tonic::{Code, Status};

/// Metadata key of the machine-readable reason of an error status.
pub const REASON_KEY: &str = "x-raftsched-reason";

/// Metadata key of the leader hint (`<id>@<host:port>`) on UNAVAILABLE answers.
pub const LEADER_HINT_KEY: &str = "x-raftsched-leader";

/// Metadata key marking a request one node passed on to the leader (never passed on again).
pub const FORWARDED_KEY: &str = "x-raftsched-forwarded";

/// The reason code a node attaches to an error status (`x-raftsched-reason`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A field is malformed; the message names it.
    InvalidArgument,
    /// A size or count limit is exceeded.
    LimitExceeded,
    /// A dependency id does not exist.
    UnknownDependency,
    /// Dependencies inside a batch form a cycle.
    DependencyCycle,
    /// No such task or worker.
    NotFound,
    /// Something of that name exists already (a token).
    AlreadyExists,
    /// A report quoted a fencing token that is not the current attempt's.
    StaleFence,
    /// A report came from a worker that does not hold the task.
    WrongWorker,
    /// The task's state does not allow the operation.
    InvalidState,
    /// An assignment does not fit the worker.
    DoesNotFit,
    /// An idempotency key was reused with a different request body.
    IdempotencyConflict,
    /// The worker is dead, draining, or the session is not current.
    WorkerUnavailable,
    /// The node is not the leader and cannot pass the request on; the hint says where to go.
    NotLeader,
    /// The node cannot serve right now.
    Unavailable,
    /// A watch asked for events this node no longer retains; list, then watch again.
    OutOfRange,
    /// A bug on the server.
    Internal,
    /// The request carried no valid credential.
    Unauthenticated,
    /// The credential's role does not allow the request (the message names the role needed).
    PermissionDenied,
    /// The node's data disk has less free space than its floor (`--min-free-disk`): new
    /// submits are refused until space is freed; everything else still works.
    DiskSpaceLow,
    /// A reason this build does not know (a newer server).
    Other(String),
}

impl Reason {
    /// Parses the metadata value; unknown values are kept as [`Reason::Other`].
    pub fn parse(s: &str) -> Reason {
        match s {
            "invalid_argument" => Reason::InvalidArgument,
            "limit_exceeded" => Reason::LimitExceeded,
            "unknown_dependency" => Reason::UnknownDependency,
            "dependency_cycle" => Reason::DependencyCycle,
            "not_found" => Reason::NotFound,
            "already_exists" => Reason::AlreadyExists,
            "stale_fence" => Reason::StaleFence,
            "wrong_worker" => Reason::WrongWorker,
            "invalid_state" => Reason::InvalidState,
            "does_not_fit" => Reason::DoesNotFit,
            "idempotency_conflict" => Reason::IdempotencyConflict,
            "worker_unavailable" => Reason::WorkerUnavailable,
            "not_leader" => Reason::NotLeader,
            "unavailable" => Reason::Unavailable,
            "out_of_range" => Reason::OutOfRange,
            "internal" => Reason::Internal,
            "unauthenticated" => Reason::Unauthenticated,
            "permission_denied" => Reason::PermissionDenied,
            "disk_space_low" => Reason::DiskSpaceLow,
            other => Reason::Other(other.to_string()),
        }
    }

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Reason::InvalidArgument => "invalid_argument",
            Reason::LimitExceeded => "limit_exceeded",
            Reason::UnknownDependency => "unknown_dependency",
            Reason::DependencyCycle => "dependency_cycle",
            Reason::NotFound => "not_found",
            Reason::AlreadyExists => "already_exists",
            Reason::StaleFence => "stale_fence",
            Reason::WrongWorker => "wrong_worker",
            Reason::InvalidState => "invalid_state",
            Reason::DoesNotFit => "does_not_fit",
            Reason::IdempotencyConflict => "idempotency_conflict",
            Reason::WorkerUnavailable => "worker_unavailable",
            Reason::NotLeader => "not_leader",
            Reason::Unavailable => "unavailable",
            Reason::OutOfRange => "out_of_range",
            Reason::Internal => "internal",
            Reason::Unauthenticated => "unauthenticated",
            Reason::PermissionDenied => "permission_denied",
            Reason::DiskSpaceLow => "disk_space_low",
            Reason::Other(s) => s,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the leader probably is: `<id>@<host:port>` on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderHint {
    /// The leader's node id.
    pub id: u64,
    /// The leader's gRPC address (`host:port`); may be absent from a client's endpoints.
    pub addr: String,
}

impl LeaderHint {
    /// A hint for node `id` at `addr`.
    pub fn new(id: u64, addr: impl Into<String>) -> LeaderHint {
        LeaderHint { id, addr: addr.into() }
    }

    /// Parses `<id>@<host:port>`; `None` for anything else.
    pub fn parse(s: &str) -> Option<LeaderHint> {
        let (id, addr) = s.trim().split_once('@')?;
        let id = id.parse().ok()?;
        if addr.is_empty() || !addr.contains(':') {
            return None;
        }
        Some(LeaderHint { id, addr: addr.to_string() })
    }
}

impl fmt::Display for LeaderHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

/// An error status with its reason and, if given, the leader hint. A hint that cannot be a
/// metadata value (it never can be with a valid address) is left out rather than mangled.
pub fn status(
    code: Code,
    message: impl Into<String>,
    reason: &Reason,
    leader: Option<&LeaderHint>,
) -> Status {
    let mut s = Status::new(code, message.into());
    if let Ok(v) = reason.as_str().parse() {
        s.metadata_mut().insert(REASON_KEY, v);
    }
    if let Some(Ok(v)) = leader.map(|l| l.to_string().parse()) {
        s.metadata_mut().insert(LEADER_HINT_KEY, v);
    }
    s
}

/// The reason a status carries, if any.
pub fn reason_of(s: &Status) -> Option<Reason> {
    s.metadata().get(REASON_KEY).and_then(|v| v.to_str().ok()).map(Reason::parse)
}

/// The leader hint a status carries, if any and well-formed.
pub fn leader_of(s: &Status) -> Option<LeaderHint> {
    s.metadata().get(LEADER_HINT_KEY).and_then(|v| v.to_str().ok()).and_then(LeaderHint::parse)
}

/// Whether a request was already passed on by another node.
pub fn is_forwarded<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().get(FORWARDED_KEY).is_some()
}

/// Mark a request as passed on to the leader.
pub fn mark_forwarded<T>(req: &mut tonic::Request<T>) {
    req.metadata_mut().insert(FORWARDED_KEY, tonic::metadata::MetadataValue::from_static("1"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_carries_reason_and_hint_and_reads_back() {
        let hint = LeaderHint::new(2, "127.0.0.1:7002");
        let s = status(Code::Unavailable, "go there", &Reason::NotLeader, Some(&hint));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(s.metadata().get(LEADER_HINT_KEY).unwrap(), "2@127.0.0.1:7002");
        assert_eq!(reason_of(&s), Some(Reason::NotLeader));
        assert_eq!(leader_of(&s), Some(hint));
        let plain = status(Code::NotFound, "no such task", &Reason::NotFound, None);
        assert_eq!(leader_of(&plain), None);
        assert_eq!(reason_of(&Status::internal("bare")), None);
    }

    #[test]
    fn every_reason_round_trips_and_unknown_ones_are_kept() {
        let all = [
            Reason::InvalidArgument,
            Reason::LimitExceeded,
            Reason::UnknownDependency,
            Reason::DependencyCycle,
            Reason::NotFound,
            Reason::AlreadyExists,
            Reason::StaleFence,
            Reason::WrongWorker,
            Reason::InvalidState,
            Reason::DoesNotFit,
            Reason::IdempotencyConflict,
            Reason::WorkerUnavailable,
            Reason::NotLeader,
            Reason::Unavailable,
            Reason::OutOfRange,
            Reason::Internal,
            Reason::Unauthenticated,
            Reason::PermissionDenied,
            Reason::DiskSpaceLow,
        ];
        for r in all {
            assert_eq!(Reason::parse(r.as_str()), r);
        }
        assert_eq!(Reason::parse("quota_spent"), Reason::Other("quota_spent".into()));
    }

    #[test]
    fn hints_parse_strictly() {
        assert_eq!(
            LeaderHint::parse(" 3@10.0.0.3:7003 "),
            Some(LeaderHint::new(3, "10.0.0.3:7003"))
        );
        for bad in ["", "3", "x@1.2.3.4:5", "3@", "3@nohostport"] {
            assert_eq!(LeaderHint::parse(bad), None, "{bad:?}");
        }
        assert_eq!(LeaderHint::new(1, "h:1").to_string(), "1@h:1");
    }

    #[test]
    fn forwarded_marks_are_seen() {
        let mut r = tonic::Request::new(());
        assert!(!is_forwarded(&r));
        mark_forwarded(&mut r);
        assert!(is_forwarded(&r));
    }
}
