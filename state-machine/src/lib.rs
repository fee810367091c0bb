//! # state-machine: the deterministic core of raftsched
//!
//! Everything the scheduler decides lives here, as pure functions over plain data:
//!
//! * [`model`]: tasks, workers, resources, and the states a task moves through;
//! * [`command`]: the commands that make up the Raft log and their responses;
//! * [`SchedulerState::apply`]: the one way state changes — deterministic, total (any decodable
//!   command gets a response, business failures are [`Rejection`] values), and reporting
//!   exactly which records it changed ([`Changes`]) so storage writes only those;
//! * [`planner::plan`]: the leader's placement function (priority, resources, spreading,
//!   reservations against starvation);
//! * [`SchedulerState::explain`]: why a task is not running;
//! * [`record`]: the persistence shape (records, keys, versioned encoding, digest) and
//!   [`record::StateLoader`], which rebuilds every index from records alone;
//! * [`SchedulerState::check_invariants`]: what must hold after every apply.
//!
//! Besides what workers and the planner do, operators retry finished tasks, undrain and remove
//! workers, and pause queues (`state/lifecycle.rs`); each is a command like any other.
//!
//! House rule: no clock, randomness, I/O, async runtime or storage engine in this crate. Time
//! arrives inside each command, stamped by the leader; log time never moves backwards.

pub mod command;
pub mod error;
pub mod explain;
mod invariants;
pub mod model;
pub mod planner;
pub mod record;
pub mod state;
pub mod validate;

pub use command::{
    Assignment, CancelOutcome, Command, DepRef, NewTask, NewToken, Op, Output, Report, ReportKind,
    ReportOutcome, Response, Submitted, BASE_COMMAND_VERSION, COMMAND_VERSION,
};
pub use error::Rejection;
pub use explain::{Blocker, Explanation};
pub use model::{
    ApiToken, AttemptFailure, DeathReason, FailureKind, Fence, Meta, Millis, PausedQueue,
    Resources, RetryPolicy, Role, Task, TaskId, TaskSpec, TaskState, TaskStateKind, Worker,
    WorkerId, WorkerSpec, WorkerStatus,
};
pub use planner::{plan, plan_after_reports, Plan, PlanPolicy, Reservation};
pub use record::{Record, RecordKey, RecordRef, StateLoader};
pub use state::{
    valid_token_name, Changes, SchedulerState, TaskEvent, MAX_PAUSED_QUEUES, MAX_TOKENS,
    MAX_TOKEN_TTL_MS,
};
pub use validate::Limits;

/// The queue a task goes to when none is named.
pub const DEFAULT_QUEUE: &str = "default";
