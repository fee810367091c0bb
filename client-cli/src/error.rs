//! Errors of the client library.
//!
//! Every failed call ends in one [`Error`]. It keeps what the caller needs to decide what to
//! do next: the gRPC code, the server's message, the machine-readable reason the server puts in
//! the `x-raftsched-reason` metadata ([`Reason`]), the leader hint, and, for failures without
//! an answer, whether the request may have reached the server.
//!
//! # Outcome unknown
//!
//! A write that fails with UNAVAILABLE, DEADLINE_EXCEEDED or a broken connection *after the
//! request may have been sent* has an unknown outcome: the leader may have committed it and
//! the answer got lost. [`Error::is_indeterminate`] says so. Such an outcome is never "absent":
//! the way to resolve it is to send the same request again (a submit with the same idempotency
//! key answers with the task it created; a report with the same fencing token answers
//! `duplicate`). [`Client`](crate::Client) does exactly that within its retry budget.

use std::time::Duration;

use tonic::Code;

pub use proto::status::{LeaderHint, Reason, REASON_KEY};

/// Exit code of `schedctl`: the operation failed (rejected, not found, task failed).
pub const EXIT_FAILED: u8 = 1;
/// Exit code of `schedctl`: a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code of `schedctl`: the cluster is unavailable.
pub const EXIT_UNAVAILABLE: u8 = 3;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status.
    #[error("{message} ({}, from {endpoint})", code_name(*code))]
    Status {
        /// The gRPC code.
        code: Code,
        /// The server's message (names the offending field for INVALID_ARGUMENT).
        message: String,
        /// The `x-raftsched-reason` metadata, when the server set it.
        reason: Option<Reason>,
        /// The `x-raftsched-leader` metadata, when the server set it.
        leader: Option<LeaderHint>,
        /// The node that answered.
        endpoint: String,
    },
    /// No answer within the per-attempt deadline; the request may have been applied.
    #[error("no answer from {endpoint} within {}", humantime::format_duration(*after))]
    Timeout {
        /// The node asked.
        endpoint: String,
        /// The deadline.
        after: Duration,
    },
    /// The connection failed (refused, reset, closed by a dying node).
    #[error("cannot reach {endpoint}: {message}")]
    Transport {
        /// The node asked.
        endpoint: String,
        /// What went wrong.
        message: String,
        /// False only when the connection was never established, so the request was not
        /// sent; true when it may have been.
        maybe_sent: bool,
    },
    /// Retries were spent (the retry budget ran out); `last` is the last attempt's error.
    #[error("gave up after {attempts} attempts in {}: {last}", fmt_ms(*elapsed))]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// True if any attempt may have reached a node: the outcome is unknown.
        maybe_applied: bool,
        /// Every endpoint tried.
        endpoints: Vec<String>,
        /// The last attempt's error.
        last: Box<Error>,
    },
    /// The client was configured wrongly (no endpoints, a malformed address).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The server broke the protocol (a missing field, an unexpected message).
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// A condition polled by [`crate::local::wait_until`] (or its blocking twin) did not
    /// hold in time.
    #[error("timed out after {} waiting for {what}", humantime::format_duration(*within))]
    WaitTimeout {
        /// What was waited for.
        what: String,
        /// How long.
        within: Duration,
    },
    /// A local file or process operation of [`crate::local`] failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation ("starting node 2 (/path/schedulerd)").
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A process started by [`crate::local`] exited while it was expected to run.
    #[error("{what} exited ({status}); the end of {}:\n{log_tail}", log.display())]
    Exited {
        /// The process ("node 2").
        what: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: std::path::PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
}

fn fmt_ms(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// The canonical upper-case name of a gRPC code (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Error {
    /// Classifies a status returned by tonic for a call to `endpoint`.
    ///
    /// Statuses decoded from a server's answer carry no error source; statuses tonic made from
    /// a local failure (connect error, reset stream, closed connection) do. That is how a
    /// transport failure is told apart from a server that answered UNAVAILABLE.
    pub fn from_status(status: tonic::Status, endpoint: &str) -> Error {
        use std::error::Error as _;
        let endpoint = endpoint.to_string();
        if let Some(source) = status.source() {
            let mut maybe_sent = true;
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
            while let Some(e) = cur {
                if e.downcast_ref::<tonic::ConnectError>().is_some() {
                    maybe_sent = false;
                    break;
                }
                cur = e.source();
            }
            return Error::Transport { endpoint, message: transport_message(&status), maybe_sent };
        }
        let reason = proto::status::reason_of(&status);
        let leader = proto::status::leader_of(&status);
        Error::Status {
            code: status.code(),
            message: status.message().to_string(),
            reason,
            leader,
            endpoint,
        }
    }

    /// The gRPC code this error corresponds to (transport failures count as UNAVAILABLE,
    /// timeouts as DEADLINE_EXCEEDED).
    pub fn code(&self) -> Code {
        match self {
            Error::Status { code, .. } => *code,
            Error::Timeout { .. } => Code::DeadlineExceeded,
            Error::Transport { .. } => Code::Unavailable,
            Error::Exhausted { last, .. } => last.code(),
            Error::Config(_) => Code::InvalidArgument,
            Error::Protocol(_) | Error::Io { .. } => Code::Internal,
            Error::WaitTimeout { .. } => Code::DeadlineExceeded,
            Error::Exited { .. } => Code::Unavailable,
        }
    }

    /// The server's reason code, if it set one.
    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Error::Status { reason, .. } => reason.as_ref(),
            Error::Exhausted { last, .. } => last.reason(),
            _ => None,
        }
    }

    /// The leader hint, if the server gave one.
    pub fn leader_hint(&self) -> Option<&LeaderHint> {
        match self {
            Error::Status { leader, .. } => leader.as_ref(),
            Error::Exhausted { last, .. } => last.leader_hint(),
            _ => None,
        }
    }

    /// The server's message (or this error's text when there was no answer).
    pub fn message(&self) -> String {
        match self {
            Error::Status { message, .. } => message.clone(),
            Error::Exhausted { last, .. } => last.message(),
            other => other.to_string(),
        }
    }

    /// True when another attempt may succeed: UNAVAILABLE, DEADLINE_EXCEEDED, a timeout or a
    /// broken connection. Every other code is final and never retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Status { code, .. } => {
                matches!(code, Code::Unavailable | Code::DeadlineExceeded)
            }
            Error::Timeout { .. } | Error::Transport { .. } => true,
            Error::Exhausted { .. }
            | Error::Config(_)
            | Error::Protocol(_)
            | Error::WaitTimeout { .. }
            | Error::Io { .. }
            | Error::Exited { .. } => false,
        }
    }

    /// True when the request may have been applied although no success was seen: the outcome
    /// is unknown, not absent. Repeat the same request (same idempotency key, same fencing
    /// token) to learn it.
    ///
    /// An UNAVAILABLE answer counts as unknown too: a follower may have forwarded the write to
    /// a leader that committed it and then lost its leadership before answering.
    pub fn is_indeterminate(&self) -> bool {
        match self {
            Error::Status { code, .. } => {
                matches!(code, Code::Unavailable | Code::DeadlineExceeded)
            }
            Error::Timeout { .. } => true,
            Error::Transport { maybe_sent, .. } => *maybe_sent,
            Error::Exhausted { maybe_applied, .. } => *maybe_applied,
            Error::Config(_)
            | Error::Protocol(_)
            | Error::WaitTimeout { .. }
            | Error::Io { .. }
            | Error::Exited { .. } => false,
        }
    }

    /// True when the cluster could not be reached or has no leader (exit code 3).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Exhausted { last, .. } => last.is_retryable() || last.is_unavailable(),
            other => other.is_retryable(),
        }
    }

    /// True for NOT_FOUND.
    pub fn is_not_found(&self) -> bool {
        self.code() == Code::NotFound
    }

    /// True when a worker's session is gone (the leader expired it, or it never existed): the
    /// worker must drop what it holds and register again.
    pub fn is_session_lost(&self) -> bool {
        matches!(self.code(), Code::NotFound | Code::FailedPrecondition)
            || self.reason() == Some(&Reason::WorkerUnavailable)
    }

    /// True when a worker report was refused because the attempt was taken away (stale fence,
    /// another holder, a finished task): the report must be dropped, never retried.
    pub fn is_stale_attempt(&self) -> bool {
        matches!(
            self.reason(),
            Some(Reason::StaleFence | Reason::WrongWorker | Reason::InvalidState)
        ) || (self.code() == Code::FailedPrecondition && self.reason().is_none())
    }

    /// The `schedctl` exit code for this error: [`EXIT_UNAVAILABLE`] when the cluster could not
    /// be reached, [`EXIT_USAGE`] for a bad configuration, [`EXIT_FAILED`] otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => EXIT_USAGE,
            e if e.is_unavailable() => EXIT_UNAVAILABLE,
            _ => EXIT_FAILED,
        }
    }
}

/// A short description of a local transport failure, with the innermost cause, which is the
/// useful part ("Connection refused") of tonic's layered errors.
fn transport_message(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut msg = status.message().to_string();
    let mut cur = status.source();
    let mut innermost = None;
    while let Some(e) = cur {
        innermost = Some(e.to_string());
        cur = e.source();
    }
    if let Some(inner) = innermost {
        if !msg.contains(&inner) {
            if msg.is_empty() {
                msg = inner;
            } else {
                msg = format!("{msg}: {inner}");
            }
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, reason: Option<&str>, leader: Option<&str>) -> tonic::Status {
        let mut s = tonic::Status::new(code, "boom");
        if let Some(r) = reason {
            s.metadata_mut().insert(REASON_KEY, r.parse().unwrap());
        }
        if let Some(l) = leader {
            s.metadata_mut().insert(proto::status::LEADER_HINT_KEY, l.parse().unwrap());
        }
        s
    }

    #[test]
    fn reasons_round_trip() {
        for r in [
            "invalid_argument",
            "limit_exceeded",
            "unknown_dependency",
            "dependency_cycle",
            "not_found",
            "stale_fence",
            "wrong_worker",
            "invalid_state",
            "does_not_fit",
            "worker_unavailable",
            "not_leader",
            "unavailable",
        ] {
            let parsed = Reason::parse(r);
            assert!(!matches!(parsed, Reason::Other(_)), "{r}");
            assert_eq!(parsed.as_str(), r);
        }
        assert_eq!(Reason::parse("new_thing"), Reason::Other("new_thing".into()));
    }

    #[test]
    fn leader_hints_parse() {
        assert_eq!(
            LeaderHint::parse("2@127.0.0.1:7002"),
            Some(LeaderHint { id: 2, addr: "127.0.0.1:7002".into() })
        );
        assert_eq!(LeaderHint::parse("x@127.0.0.1:7002"), None);
        assert_eq!(LeaderHint::parse("2@"), None);
        assert_eq!(LeaderHint::parse("2"), None);
    }

    #[test]
    fn server_statuses_keep_code_reason_and_hint() {
        let e = Error::from_status(
            status(Code::Unavailable, Some("not_leader"), Some("3@10.0.0.3:7003")),
            "a:1",
        );
        assert_eq!(e.code(), Code::Unavailable);
        assert_eq!(e.reason(), Some(&Reason::NotLeader));
        assert_eq!(e.leader_hint().map(|h| h.id), Some(3));
        assert!(e.is_retryable());
        assert!(e.is_indeterminate());
        assert_eq!(e.exit_code(), EXIT_UNAVAILABLE);

        let e =
            Error::from_status(status(Code::FailedPrecondition, Some("stale_fence"), None), "a:1");
        assert!(!e.is_retryable());
        assert!(!e.is_indeterminate());
        assert!(e.is_stale_attempt());
        assert_eq!(e.exit_code(), EXIT_FAILED);
        assert_eq!(e.to_string(), "boom (FAILED_PRECONDITION, from a:1)");
    }

    #[test]
    fn exit_codes_follow_the_cli_contract() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            let e = Error::from_status(status(code, None, None), "a:1");
            assert_eq!(e.exit_code(), EXIT_FAILED, "{code:?}");
            assert!(!e.is_retryable(), "{code:?}");
        }
        let timeout = Error::Timeout { endpoint: "a:1".into(), after: Duration::from_secs(1) };
        assert_eq!(timeout.exit_code(), EXIT_UNAVAILABLE);
        assert!(timeout.is_indeterminate());
        let refused = Error::Transport {
            endpoint: "a:1".into(),
            message: "connection refused".into(),
            maybe_sent: false,
        };
        assert!(!refused.is_indeterminate());
        assert!(refused.is_retryable());
        let exhausted = Error::Exhausted {
            attempts: 3,
            elapsed: Duration::from_secs(1),
            maybe_applied: false,
            endpoints: vec!["a:1".into()],
            last: Box::new(refused),
        };
        assert_eq!(exhausted.exit_code(), EXIT_UNAVAILABLE);
        assert!(!exhausted.is_retryable(), "an exhausted call is final");
        assert!(!exhausted.is_indeterminate());
        let not_found = Error::Exhausted {
            attempts: 2,
            elapsed: Duration::from_secs(1),
            maybe_applied: true,
            endpoints: vec!["a:1".into()],
            last: Box::new(Error::from_status(status(Code::NotFound, None, None), "a:1")),
        };
        assert_eq!(not_found.exit_code(), EXIT_FAILED);
        assert_eq!(Error::Config("x".into()).exit_code(), EXIT_USAGE);
    }

    #[test]
    fn session_loss_is_recognised() {
        let gone = Error::from_status(status(Code::NotFound, Some("not_found"), None), "a:1");
        assert!(gone.is_session_lost());
        let dead = Error::from_status(
            status(Code::FailedPrecondition, Some("worker_unavailable"), None),
            "a:1",
        );
        assert!(dead.is_session_lost());
        let down = Error::from_status(status(Code::Unavailable, None, None), "a:1");
        assert!(!down.is_session_lost());
    }

    #[test]
    fn local_failures_are_transport_errors() {
        let local = tonic::Status::from_error(Box::new(tonic::ConnectError(
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused").into(),
        )));
        let e = Error::from_status(local, "a:1");
        assert!(matches!(e, Error::Transport { maybe_sent: false, .. }), "{e:?}");
        assert!(e.to_string().contains("connection refused"), "{e}");

        let reset = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        let e = Error::from_status(reset, "a:1");
        assert!(matches!(e, Error::Transport { maybe_sent: true, .. }), "{e:?}");
        assert!(e.is_indeterminate());
    }
}
