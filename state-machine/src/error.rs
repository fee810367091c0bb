//! Rejections: the business failures of apply, returned as values.
//!
//! Every variant names what is wrong precisely enough for the node to map it to one gRPC code
//! (see `node::error`) and for a user to fix the request: `field` paths look like
//! `tasks[3].depends_on[1]`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::model::{Fence, TaskId, TaskStateKind, WorkerId};

/// Why apply refused a command or one item of it.
#[derive(Clone, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum Rejection {
    /// A field is malformed (empty, wrong characters, out of range).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// Path of the field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A size or count limit is exceeded.
    #[error("{field} exceeds the limit: {actual} > {limit}")]
    LimitExceeded {
        /// Path of the field.
        field: String,
        /// The limit.
        limit: u64,
        /// What was sent.
        actual: u64,
    },
    /// A dependency id does not exist (never did, or was purged).
    #[error("{field}: unknown task {task}")]
    UnknownDependency {
        /// Path of the field.
        field: String,
        /// The missing id.
        task: TaskId,
    },
    /// Dependencies inside a batch form a cycle.
    #[error("dependency cycle among batch positions {positions:?}")]
    DependencyCycle {
        /// Batch positions on the cycle (or unorderable).
        positions: Vec<u32>,
    },
    /// No such task.
    #[error("task {task} not found")]
    TaskNotFound {
        /// The id.
        task: TaskId,
    },
    /// No such worker.
    #[error("worker {worker} not found")]
    WorkerNotFound {
        /// The id.
        worker: WorkerId,
    },
    /// The worker is live and was registered with another token.
    #[error("worker {worker} is live and registered with another token; use that token, or another worker id")]
    WorkerOwned {
        /// The id.
        worker: WorkerId,
    },
    /// The worker exists but cannot do this (dead, draining, wrong session).
    #[error("worker {worker} is {status}: {reason}")]
    WorkerUnavailable {
        /// The id.
        worker: WorkerId,
        /// Its status name.
        status: String,
        /// Why that matters here.
        reason: String,
    },
    /// A report or decision quoted a fencing token that is not the task's current one.
    ///
    /// The text never shows the current token: whoever sends a stale token must not learn the
    /// live one (it is what lets a report through). `current` stays in the value for tests
    /// and audits of the log.
    #[error("stale fencing token {given} for task {task}{}", match current {
        Some(_) => "",
        None => " (no attempt is in progress)",
    })]
    StaleFence {
        /// The task.
        task: TaskId,
        /// The current attempt's token, if one is in progress. Never shown in the text.
        current: Option<Fence>,
        /// The token quoted.
        given: Fence,
    },
    /// A report came from a worker that does not hold the task.
    ///
    /// The text never names the holder: a worker id is what a report must quote, so telling
    /// it to another worker would be half of a forged report.
    #[error("task {task} is not held by worker {given} ({})", match holder {
        Some(_) => "another worker holds it",
        None => "no worker holds it",
    })]
    WrongWorker {
        /// The task.
        task: TaskId,
        /// Who holds it, if anyone. Never shown in the text.
        holder: Option<WorkerId>,
        /// Who reported.
        given: WorkerId,
    },
    /// The task's state does not allow this (e.g. assigning a task that is not queued).
    #[error("task {task} is {state}: {reason}")]
    InvalidState {
        /// The task.
        task: TaskId,
        /// Its current state.
        state: TaskStateKind,
        /// What was attempted.
        reason: String,
    },
    /// An idempotency key is reused for a different request body: the same key and the same
    /// body name the same task, a different body is a client bug, never a silent match.
    #[error(
        "idempotency key {key:?} already names task {task}, submitted with a different {field}; \
         resubmit the same request to get that task, or use a new key"
    )]
    KeyConflict {
        /// The key.
        key: String,
        /// The task the key names.
        task: TaskId,
        /// The first field found to differ.
        field: String,
    },
    /// An assignment does not fit the worker (queue, labels, slots or resources).
    #[error("task {task} does not fit worker {worker}: {reason}")]
    DoesNotFit {
        /// The task.
        task: TaskId,
        /// The worker.
        worker: WorkerId,
        /// What does not fit.
        reason: String,
    },
    /// No replicated token has this name.
    #[error("no token named {name:?} (tokens of a node's token file are changed in that file)")]
    TokenNotFound {
        /// The name.
        name: String,
    },
    /// Another token already has this name or this secret.
    #[error(
        "a different token named {name:?} already exists; revoke it first or pick another name"
    )]
    TokenExists {
        /// The name.
        name: String,
    },
    /// The operation's kind is newer than the cluster's command version: some member could
    /// not apply it.
    #[error(
        "{kind} needs cluster command version {needed}, the cluster runs {current}: upgrade \
         every member (cluster status shows each node's version)"
    )]
    ClusterVersion {
        /// The kind of operation.
        kind: String,
        /// The version it needs.
        needed: u32,
        /// The cluster's version.
        current: u32,
    },
}

impl Rejection {
    /// Shorthand for [`Rejection::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Rejection::InvalidArgument { field: field.into(), reason: reason.into() }
    }

    /// Shorthand for [`Rejection::LimitExceeded`].
    pub fn limit(field: impl Into<String>, limit: u64, actual: u64) -> Self {
        Rejection::LimitExceeded { field: field.into(), limit, actual }
    }
}
