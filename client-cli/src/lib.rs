//! # client: the raftsched client library
//!
//! Everything a program needs to use a raftsched cluster, shared by `schedctl`, the chaos tests
//! and the benchmarks:
//!
//! * [`Client`] ([`client`]): one lazily connected channel per node, leader discovery through
//!   the `x-raftsched-leader` hint, per-attempt deadlines, jittered retries within a budget,
//!   idempotency keys on every submit, and typed methods for every RPC of the `Tasks`,
//!   `Workers` and `Cluster` services (streams included).
//! * [`Error`] ([`error`]): the gRPC code, message and server reason of a failure, whether its
//!   outcome is unknown ([`Error::is_indeterminate`]), and its `schedctl` exit code.
//! * [`worker`]: a complete worker runtime (sessions, heartbeats, assignment stream, batched
//!   reports, revocation, failover, graceful drain) around a pluggable [`worker::Handler`].
//! * [`exec`]: the handler that runs each task as a shell command in its own process group.
//! * [`workflow`]: JSON/YAML DAG files turned into one atomic submit.
//! * [`backoff`]: the retry delays.
//! * [`local`]: the one harness for local clusters of real `schedulerd` processes (`dev up`,
//!   the benchmarks, the integration and chaos tests) and the shared "poll until" helpers.
//! * [`ports`]: free loopback ports for local clusters (`dev up`, benchmarks, tests).
//!
//! The library never panics on server input and never retries a request the server refused:
//! only "no answer" outcomes are retried, and only in ways that cannot apply anything twice.

pub mod backoff;
pub mod client;
pub mod error;
pub mod exec;
pub mod local;
pub mod pki;
pub mod ports;
pub mod quantity;
pub mod worker;
pub mod workflow;

pub use client::{Client, ClientConfig};
pub use error::{Error, Reason};
pub use proto::pb;
