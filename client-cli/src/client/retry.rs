//! Routing and retries of every call: the endpoint pool, leader hints, deadlines and backoff.
//!
//! Invariants: the pool always holds at least one node, and `preferred` is a valid index into
//! it; only failures that may succeed elsewhere or later (UNAVAILABLE, DEADLINE_EXCEEDED,
//! attempt timeouts, broken connections) are retried, every other status is final. See the
//! module docs of [`crate::client`] for the routing and retry rules.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};

use super::Client;
use crate::backoff::Backoff;
use crate::error::{Error, LeaderHint};

/// After this long without an answer, a call logs a warning (once) while it keeps retrying.
const SLOW_CALL_NOTICE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A read: any node answers.
    Read,
    /// A write: the node that answers becomes the preferred one.
    Write,
    /// Opening a server stream: no `grpc-timeout`, which would end the stream.
    Stream,
}

/// Channel settings shared by every node of a pool.
#[derive(Clone, Debug)]
pub(super) struct Tuning {
    /// The cluster CA (PEM): connect with TLS, verifying the servers against it.
    pub(super) ca_pem: Option<Vec<u8>>,
    pub(super) connect_timeout: Duration,
    pub(super) keepalive_interval: Duration,
    pub(super) keepalive_timeout: Duration,
}

pub(super) struct Node {
    pub(super) addr: String,
    pub(super) endpoint: Endpoint,
    /// Created on first use: building a channel needs a running tokio runtime.
    pub(super) channel: Option<Channel>,
}

pub(super) struct PoolState {
    pub(super) nodes: Vec<Node>,
    pub(super) preferred: usize,
}

/// The nodes and the routing state, shared by every clone of a client.
pub(super) struct Pool {
    pub(super) tuning: Tuning,
    pub(super) state: Mutex<PoolState>,
}

/// The endpoint of the node at `host:port`: plaintext, or TLS verifying the node's
/// certificate against `ca_pem` for the name it is dialled by.
pub(crate) fn node_endpoint(
    hostport: &str,
    ca_pem: Option<&[u8]>,
) -> Result<Endpoint, tonic::transport::Error> {
    let Some(ca) = ca_pem else { return Endpoint::from_shared(format!("http://{hostport}")) };
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name(host);
    Endpoint::from_shared(format!("https://{hostport}"))?.tls_config(tls)
}

impl Pool {
    pub(super) fn endpoint(&self, addr: &str) -> Result<(String, Endpoint), Error> {
        let addr = addr.trim();
        let key = addr
            .strip_prefix("http://")
            .or_else(|| addr.strip_prefix("https://"))
            .unwrap_or(addr)
            .trim_end_matches('/')
            .to_string();
        if addr.starts_with("https://") && self.tuning.ca_pem.is_none() {
            return Err(Error::Config(format!(
                "{addr}: a TLS endpoint needs the cluster CA certificate (--ca-cert / SCHED_CA_CERT)"
            )));
        }
        if addr.starts_with("http://") && self.tuning.ca_pem.is_some() {
            return Err(Error::Config(format!(
                "{addr}: plaintext endpoint given together with a CA certificate; drop http:// (TLS is used)"
            )));
        }
        if key.is_empty() || !key.contains(':') {
            return Err(Error::Config(format!("{addr:?} is not a host:port address")));
        }
        let endpoint = node_endpoint(&key, self.tuning.ca_pem.as_deref())
            .map_err(|e| Error::Config(format!("{addr:?}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(self.tuning.connect_timeout)
            .http2_keep_alive_interval(self.tuning.keepalive_interval)
            .keep_alive_timeout(self.tuning.keepalive_timeout)
            .keep_alive_while_idle(true);
        Ok((key, endpoint))
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding this lock cannot leave the routing state inconsistent (every
        // update is a single assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The preferred node's address and channel.
    pub(super) fn pick(&self) -> (String, Channel) {
        let mut st = self.lock();
        let i = st.preferred;
        let node = &mut st.nodes[i];
        let channel = node.channel.get_or_insert_with(|| node.endpoint.connect_lazy()).clone();
        (node.addr.clone(), channel)
    }

    /// Index of `addr`, adding it (from a leader hint) when unknown.
    pub(super) fn index_of_or_add(&self, st: &mut PoolState, addr: &str) -> Option<usize> {
        if let Some(i) = st.nodes.iter().position(|n| n.addr == addr) {
            return Some(i);
        }
        let (key, endpoint) = self.endpoint(addr).ok()?;
        st.nodes.push(Node { addr: key, endpoint, channel: None });
        Some(st.nodes.len() - 1)
    }

    /// After a failed attempt at `addr`: follow the leader hint, else move on to the next node
    /// (unless a concurrent call already moved the preference elsewhere).
    pub(super) fn on_failure(&self, addr: &str, hint: Option<&LeaderHint>) {
        let mut st = self.lock();
        if let Some(h) = hint.filter(|h| h.addr != addr) {
            if let Some(i) = self.index_of_or_add(&mut st, &h.addr) {
                st.preferred = i;
                return;
            }
        }
        if st.nodes[st.preferred].addr == addr {
            st.preferred = (st.preferred + 1) % st.nodes.len();
        }
    }

    /// After a successful write at `addr`: that node is (or reaches) the leader.
    pub(super) fn on_write_success(&self, addr: &str) {
        let mut st = self.lock();
        if let Some(i) = st.nodes.iter().position(|n| n.addr == addr) {
            st.preferred = i;
        }
    }
}

impl Client {
    /// Runs one call with routing, deadlines and retries (see [`Self::call_at`]).
    pub(super) async fn call<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        kind: Kind,
        req: Req,
        f: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        Ok(self.call_at(op, kind, req, f).await?.0)
    }

    /// Runs one call with routing, deadlines and retries; returns the answer and the address
    /// of the node that gave it.
    pub(super) async fn call_at<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        kind: Kind,
        req: Req,
        f: F,
    ) -> Result<(Resp, String), Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let start = Instant::now();
        let mut backoff = Backoff::new(self.backoff);
        let mut attempts = 0u32;
        let mut maybe_applied = false;
        let mut tried: Vec<String> = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        let mut any_answer = false;
        let mut warned = false;
        loop {
            let (addr, channel) = self.pool.pick();
            if !tried.contains(&addr) {
                tried.push(addr.clone());
            }
            attempts += 1;
            let mut request = tonic::Request::new(req.clone());
            if let Some(a) = &self.authorization {
                request.metadata_mut().insert(proto::auth::AUTHORIZATION_KEY, a.clone());
            }
            if kind != Kind::Stream {
                request.set_timeout(self.call_timeout);
            }
            let err = match tokio::time::timeout(self.call_timeout, f(channel, request)).await {
                Ok(Ok(resp)) => {
                    if kind == Kind::Write {
                        self.pool.on_write_success(&addr);
                    }
                    return Ok((resp.into_inner(), addr));
                }
                Ok(Err(status)) => Error::from_status(status, &addr),
                Err(_) => Error::Timeout { endpoint: addr.clone(), after: self.call_timeout },
            };
            if self.pool.tuning.ca_pem.is_none()
                && matches!(err, Error::Transport { maybe_sent: true, .. })
                && answers_with_tls(&addr).await
            {
                return Err(Error::Config(format!(
                    "the node at {addr} speaks TLS: pass the cluster's CA certificate with \
                     --ca-cert / SCHED_CA_CERT (and a token with --token / SCHED_TOKEN)"
                )));
            }
            if !err.is_retryable() {
                return Err(err);
            }
            maybe_applied |= err.is_indeterminate();
            match &err {
                Error::Transport { maybe_sent: false, .. } => {
                    if !refused.contains(&addr) {
                        refused.push(addr.clone());
                    }
                }
                _ => any_answer = true,
            }
            self.pool.on_failure(&addr, err.leader_hint());
            if self.fail_fast_when_refused
                && !any_answer
                && self.endpoints().iter().all(|a| refused.contains(a))
            {
                tracing::debug!(op, attempts, "every node refused the connection");
                return Err(Error::Exhausted {
                    attempts,
                    elapsed: start.elapsed(),
                    maybe_applied,
                    endpoints: tried,
                    last: Box::new(err),
                });
            }
            let delay = backoff.next_delay();
            let elapsed = start.elapsed();
            if elapsed + delay >= self.retry_budget {
                tracing::debug!(op, attempts, error = %err, "retry budget spent");
                return Err(Error::Exhausted {
                    attempts,
                    elapsed,
                    maybe_applied,
                    endpoints: tried,
                    last: Box::new(err),
                });
            }
            if !warned && elapsed >= SLOW_CALL_NOTICE {
                // Say once why a call is taking long, and for how long it may go on.
                warned = true;
                tracing::warn!(
                    op,
                    error = %err,
                    budget = %humantime::format_duration(self.retry_budget),
                    "no answer from the cluster yet; retrying"
                );
            }
            tracing::debug!(op, endpoint = %addr, attempt = attempts, error = %err, "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

/// A copy of a final (server-status) error for a stream's consumer.
pub(super) fn clone_final(e: &Error) -> Error {
    match e {
        Error::Status { code, message, reason, leader, endpoint } => Error::Status {
            code: *code,
            message: message.clone(),
            reason: reason.clone(),
            leader: leader.clone(),
            endpoint: endpoint.clone(),
        },
        other => Error::Protocol(other.to_string()),
    }
}

/// Whether the server at `addr` speaks TLS: sent a plaintext HTTP/2 preface, a TLS server
/// answers with an alert record (content type 21). Asked only after a plaintext call failed
/// on an established connection, so a cluster that merely lost a node pays one refused or
/// unanswered probe, bounded by a second.
async fn answers_with_tls(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.ok()?;
        let mut first = [0u8; 1];
        tcp.read_exact(&mut first).await.ok()?;
        Some(first[0] == 21)
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), probe).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_follows_hints_and_rotates() {
        let c = Client::new(["a:1", "b:2", "c:3"]).unwrap();
        assert_eq!(c.preferred_endpoint(), "a:1");
        c.pool.on_failure("a:1", None);
        assert_eq!(c.preferred_endpoint(), "b:2");
        // A failure reported for a node that is no longer preferred changes nothing.
        c.pool.on_failure("a:1", None);
        assert_eq!(c.preferred_endpoint(), "b:2");
        // A hint to an unknown node adds it and goes there.
        c.pool.on_failure("b:2", Some(&LeaderHint { id: 4, addr: "d:4".into() }));
        assert_eq!(c.preferred_endpoint(), "d:4");
        assert_eq!(c.endpoints().len(), 4);
        // A hint naming the failing node itself does not stick to it.
        c.pool.on_failure("d:4", Some(&LeaderHint { id: 4, addr: "d:4".into() }));
        assert_eq!(c.preferred_endpoint(), "a:1");
        c.pool.on_write_success("c:3");
        assert_eq!(c.preferred_endpoint(), "c:3");
    }
}
