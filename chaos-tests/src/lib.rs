//! # chaos-tests: fault injection and a Jepsen-style checker for raftsched
//!
//! Chaos runs start real `schedulerd` processes, drive a workload of clients and workers
//! against them while faults are injected (SIGKILL, SIGSTOP, partitions, paused workers),
//! record everything that happened as a history, and judge that history afterwards.
//!
//! * [`history`]: the recorded events (JSON Lines), their recording rules, and the file
//!   writer/reader. This is the contract between whoever produces histories and the
//!   checker.
//! * [`checker`]: the pure judge — no network, no processes. It turns a history and the
//!   run's [`checker::Expectations`] into a [`checker::Report`] with Jepsen-style counts
//!   (lost, unexpected, duplicated, recovered), scheduler invariants (exactly-once
//!   acceptance, fencing, dependencies, priority, cancellation, convergence, election
//!   safety), failover percentiles, and coverage. A run passes only if every property is
//!   valid: "unknown" fails.
//! * [`cluster`] and [`proxy`]: real node processes behind partition proxies, with SIGKILL,
//!   SIGSTOP/SIGCONT, partitions, restarts and membership changes.
//! * [`scenario`]: one seeded run — cluster, worker processes (`chaos-worker`), workload,
//!   fault schedule, final reads, verdict.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod proxy;
pub mod scenario;
pub mod upgrade;
