//! Writes: proposals on this node, grouped into log entries.
//!
//! [`RaftNode::propose`] hands a group of operations (usually one) to the batcher, which puts
//! everything queued into one entry once one of [`MAX_BATCHES_IN_FLIGHT`] slots is free, so a
//! batch grows while earlier ones commit. A group is applied together and in order; the batcher
//! may put other proposals before or after it, never inside. The leader's clock is stamped
//! when the entry is proposed. [`RaftNode::propose_exclusive`] skips the batcher: the leader
//! loops' entries stay attributable.
//!
//! A leader that has not heard from a majority for longer than an election timeout is
//! probably cut off (the others have likely elected a new leader): it refuses at once, so the
//! client tries another node instead of waiting out the write timeout. openraft 0.9 keeps
//! such a leader in office until it sees a higher term.
//!
//! On a follower a proposal fails with [`WriteError::NotLeader`] and the leader's hint;
//! passing it on is the caller's business.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use state_machine::{Command, Op};
use tokio::sync::{mpsc, oneshot};
use tokio::time::error::Elapsed;

use super::{forward_hint, leader_hint, now_ms, RaftNode, WriteError, Written, WrittenGroup};
use crate::{NodeId, NodeInfo, Raft};

/// Most operations in one log entry.
pub const MAX_BATCH_OPS: usize = 1_024;
/// Most (estimated) bytes in one log entry.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches proposed but not yet committed at any time.
pub const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Operations waiting for the batcher that must land in one log entry, in order.
pub(crate) struct Proposal {
    ops: Vec<Op>,
    size: usize,
    reply: oneshot::Sender<Result<WrittenGroup, WriteError>>,
}

impl RaftNode {
    /// Propose `ops` on this node, applied together and in order in one log entry (e.g. a
    /// completion and the assignment of the task it releases); one response per operation.
    pub async fn propose(&self, ops: Vec<Op>) -> Result<WrittenGroup, WriteError> {
        self.check_quorum_contact()?;
        let (reply, rx) = oneshot::channel();
        let size = ops.iter().map(Op::size_hint).sum();
        self.proposals
            .send(Proposal { ops, size, reply })
            .await
            .map_err(|_| WriteError::Fatal("the proposal batcher stopped".into()))?;
        rx.await.map_err(|_| WriteError::Fatal("the proposal batcher stopped".into()))?
    }

    /// Propose `op` as an entry of its own (leader loops: their entries stay attributable).
    pub async fn propose_exclusive(&self, op: Op) -> Result<Written, WriteError> {
        let r = tokio::time::timeout(
            self.write_timeout(),
            self.raft.client_write(Command::new(now_ms(), op)),
        )
        .await;
        map_write(&self.raft, r).map(|r| Written { index: r.log_id.index, response: r.data })
    }

    /// Refuse at once on a leader cut off from its majority (see the module docs).
    pub(crate) fn check_quorum_contact(&self) -> Result<(), WriteError> {
        // Copy out the two fields: cloning all metrics would allocate on every request.
        let (state, since_ack) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state, m.millis_since_quorum_ack)
        };
        match quorum_lost(state, since_ack, self.contact_limit_ms()) {
            Some(ms) => Err(WriteError::Unavailable {
                reason: format!(
                    "this leader has not reached a majority for {ms} ms; retry on another node"
                ),
                leader: None,
            }),
            None => Ok(()),
        }
    }

    /// How long a leader may go without a quorum ack, or a follower without word from its
    /// leader, before it counts as cut off: an election timeout (at least three heartbeats).
    pub(crate) fn contact_limit_ms(&self) -> u64 {
        self.settings.election_max_ms.max(3 * self.settings.heartbeat_ms)
    }
}

/// The one decision about a leader's contact with its majority: `Some(ms)` when this node is a
/// leader whose last quorum ack is more than `limit_ms` old. Used to refuse requests at once
/// and for readiness.
pub(crate) fn quorum_lost(
    state: ServerState,
    since_ack: Option<u64>,
    limit_ms: u64,
) -> Option<u64> {
    since_ack.filter(|ms| state == ServerState::Leader && *ms > limit_ms)
}

type ClientWriteResponse = openraft::raft::ClientWriteResponse<crate::TypeConfig>;
type WriteResult = Result<
    Result<ClientWriteResponse, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>,
    Elapsed,
>;

/// Map the outcome of a (timed) `client_write` to our error type, by openraft's error types.
fn map_write(raft: &Raft, r: WriteResult) -> Result<ClientWriteResponse, WriteError> {
    match r {
        Err(_) => Err(WriteError::Unavailable {
            reason: "the write was not committed in time (no quorum?)".into(),
            leader: leader_hint(raft),
        }),
        Ok(Ok(r)) => Ok(r),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            Err(WriteError::NotLeader { leader: forward_hint(&f).or_else(|| leader_hint(raft)) })
        }
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            Err(WriteError::Unavailable { reason: e.to_string(), leader: leader_hint(raft) })
        }
        Ok(Err(RaftError::Fatal(f))) => Err(WriteError::Fatal(f.to_string())),
    }
}

/// Groups queued proposals into log entries (see the module docs). A single operation is
/// proposed as itself, not wrapped in [`Op::Batch`].
pub(crate) async fn batcher(raft: Raft, mut rx: mpsc::Receiver<Proposal>, timeout: Duration) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let (mut bytes, mut n_ops) = (first.size, first.ops.len());
        let mut batch = vec![first];
        // A group is never split, so an entry may exceed the op limit by one group.
        while n_ops < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.size;
                    n_ops += p.ops.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut ops = Vec::new();
            let mut replies = Vec::with_capacity(batch.len());
            for p in batch {
                replies.push((p.ops.len(), p.reply));
                ops.extend(p.ops);
            }
            let single = ops.len() == 1;
            let op = if single { ops.into_iter().next().expect("one op") } else { Op::Batch(ops) };
            let r =
                tokio::time::timeout(timeout, raft.client_write(Command::new(now_ms(), op))).await;
            let responses = match map_write(&raft, r) {
                Ok(r) if single => Ok((r.log_id.index, vec![r.data])),
                Ok(r) => match r.data {
                    Ok(state_machine::Output::Batch(responses)) if responses.len() == n_ops => {
                        Ok((r.log_id.index, responses))
                    }
                    other => Err(WriteError::Fatal(format!("a batch was answered with {other:?}"))),
                },
                Err(e) => Err(e),
            };
            match responses {
                Ok((index, responses)) => {
                    let mut responses = responses.into_iter();
                    for (n, reply) in replies {
                        let responses = responses.by_ref().take(n).collect();
                        let _ = reply.send(Ok(WrittenGroup { index, responses }));
                    }
                }
                Err(e) => {
                    for (_, reply) in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
