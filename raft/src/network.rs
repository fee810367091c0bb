//! The peer network: openraft's RPCs over the internal gRPC service.
//!
//! * One lazily-connected tonic channel per peer address, shared by Raft replication and the
//!   `node` crate's peer service (forwarding, heartbeats, read index) ([`Peers`]); HTTP/2 keepalive detects dead connections; every RPC carries a
//!   deadline (openraft's `RPCOption::hard_ttl`).
//! * Payloads are postcard-encoded openraft messages inside `bytes` (see [`codec`]). An
//!   AppendEntries request is cut to a byte budget: if the leader offers more entries than fit,
//!   only a prefix is sent and success is reported as `PartialSuccess`, so one huge batch can
//!   never exceed message limits or the heartbeat-sized RPC timeout.
//! * Errors map to what makes openraft back off correctly: a refused connection or
//!   `UNAVAILABLE` is `Unreachable` (retried after [`PeerClient::backoff`], which doubles from
//!   `unreachable_backoff` up to `unreachable_backoff_max` while the peer stays down), a deadline
//!   is a `Network` error (retried at once), a Raft error from the peer is `RemoteError`.
//! * Each peer's reachability is tracked ([`PeerHealth`], shared by replication and votes): the
//!   change is logged once — WARN when a peer becomes unreachable (after
//!   [`FAILURES_BEFORE_UNREACHABLE`] failures in a row), INFO when it answers again — and while
//!   it stays down one WARN per [`REPEAT_EVERY`] says how many failures were not logged.
//!   Individual failures are DEBUG. (openraft logs each failed RPC itself, under
//!   `openraft::replication` and `openraft::engine::handler::replication_handler`; fewer
//!   attempts to a dead peer mean fewer of those lines, the log filter decides the rest.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use proto::internal::v1 as ipb;
use proto::internal::v1::raft_service_client::RaftServiceClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use crate::{NodeId, NodeInfo, TypeConfig};

/// Transport settings.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Largest gRPC message sent or accepted between nodes.
    pub max_message_bytes: usize,
    /// Upper bound on the encoded entries of one AppendEntries request.
    pub append_budget_bytes: usize,
    /// Delay before retrying an unreachable peer the first time; it doubles on each further
    /// failure up to `unreachable_backoff_max`.
    pub unreachable_backoff: Duration,
    /// Longest delay between attempts to reach a peer that stays down (how late a restarted
    /// peer may hear from the leader).
    pub unreachable_backoff_max: Duration,
    /// Source address of connections to peers (multi-homed hosts; fault-injection proxies use
    /// it to tell peers apart). `None`: chosen by the OS.
    pub source_ip: Option<std::net::IpAddr>,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            connect_timeout: Duration::from_millis(500),
            max_message_bytes: 64 << 20,
            append_budget_bytes: 2 << 20,
            unreachable_backoff: Duration::from_millis(100),
            unreachable_backoff_max: Duration::from_secs(1),
            source_ip: None,
        }
    }
}

/// Consecutive failed RPCs after which a peer counts as unreachable (and that is logged).
pub const FAILURES_BEFORE_UNREACHABLE: u64 = 3;
/// While a peer stays unreachable, at most one log line per this interval.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// What one peer's RPC outcomes mean for the log. Pure: time is passed in.
#[derive(Debug, Default)]
pub struct PeerHealth {
    /// Failed RPCs since the last answer.
    failures: u64,
    /// Set while the peer counts as unreachable.
    down: Option<Down>,
    /// When it last answered (any answer, including a refusal).
    last_answer: Option<Instant>,
}

#[derive(Debug)]
struct Down {
    since: Instant,
    last_logged: Instant,
    /// Failures since the last line about this peer.
    suppressed: u64,
}

/// A line worth logging about a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer just became unreachable after this many failures in a row.
    Unreachable {
        /// Failures in a row.
        failures: u64,
    },
    /// Still unreachable; `suppressed` failures were not logged since the last line.
    StillUnreachable {
        /// Failures since the last line.
        suppressed: u64,
        /// How long it has been down.
        down_for: Duration,
    },
    /// It answered again after `failures` failures in a row.
    Reachable {
        /// Failures in a row before this answer.
        failures: u64,
        /// How long it was down.
        down_for: Duration,
    },
}

impl PeerHealth {
    /// A failed RPC at `now`: the line to log, if any.
    pub fn failure(&mut self, now: Instant) -> Option<PeerEvent> {
        self.failures += 1;
        match &mut self.down {
            None if self.failures >= FAILURES_BEFORE_UNREACHABLE => {
                self.down = Some(Down { since: now, last_logged: now, suppressed: 0 });
                Some(PeerEvent::Unreachable { failures: self.failures })
            }
            None => None,
            Some(d) if now.saturating_duration_since(d.last_logged) >= REPEAT_EVERY => {
                let suppressed = d.suppressed + 1;
                d.suppressed = 0;
                d.last_logged = now;
                Some(PeerEvent::StillUnreachable {
                    suppressed,
                    down_for: now.saturating_duration_since(d.since),
                })
            }
            Some(d) => {
                d.suppressed += 1;
                None
            }
        }
    }

    /// An answer from the peer at `now`: the line to log, if any.
    pub fn success(&mut self, now: Instant) -> Option<PeerEvent> {
        self.last_answer = Some(now);
        let failures = std::mem::take(&mut self.failures);
        self.down.take().map(|d| PeerEvent::Reachable {
            failures,
            down_for: now.saturating_duration_since(d.since),
        })
    }

    /// Whether the peer counts as unreachable.
    pub fn is_unreachable(&self) -> bool {
        self.down.is_some()
    }

    /// Whether the peer answered at most `window` before `now`.
    pub fn answered_within(&self, window: Duration, now: Instant) -> bool {
        self.last_answer.is_some_and(|t| now.saturating_duration_since(t) <= window)
    }
}

/// Channels to peers by address, shared by everything that talks to other nodes.
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    health: Arc<Mutex<HashMap<NodeId, PeerHealth>>>,
    opts: NetOptions,
    /// TLS for connections to peers (CA, this node's certificate, the name to verify);
    /// `None`: plaintext.
    tls: Arc<Mutex<Option<ClientTlsConfig>>>,
}

impl Peers {
    /// An empty pool.
    pub fn new(opts: NetOptions) -> Self {
        Peers {
            channels: Arc::new(Mutex::new(HashMap::new())),
            health: Arc::new(Mutex::new(HashMap::new())),
            opts,
            tls: Arc::new(Mutex::new(None)),
        }
    }

    /// Connects to peers with `tls` from now on (after a certificate reload too): cached
    /// channels are dropped, so every new connection presents the current certificate.
    pub fn set_tls(&self, tls: Option<ClientTlsConfig>) {
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = tls;
        self.channels.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The peers among `ids` that answered an RPC of this node within `window` (the leader's
    /// heartbeats make that every heartbeat interval for a live follower).
    pub fn answered_within(
        &self,
        ids: impl IntoIterator<Item = NodeId>,
        window: Duration,
    ) -> std::collections::BTreeSet<NodeId> {
        let now = Instant::now();
        let map = self.health.lock().unwrap_or_else(|e| e.into_inner());
        ids.into_iter()
            .filter(|id| map.get(id).is_some_and(|h| h.answered_within(window, now)))
            .collect()
    }

    /// Record the outcome of one RPC from `node_id` to `peer` and log a change of its
    /// reachability (rate-limited; see the module docs).
    fn record(&self, node_id: NodeId, peer: NodeId, addr: &str, outcome: Result<(), &str>) {
        let now = Instant::now();
        let event = {
            let mut map = self.health.lock().unwrap_or_else(|e| e.into_inner());
            let h = map.entry(peer).or_default();
            match outcome {
                Ok(()) => h.success(now),
                Err(_) => h.failure(now),
            }
        };
        let error = outcome.err().unwrap_or("");
        match event {
            Some(PeerEvent::Unreachable { failures }) => {
                warn!(node_id, peer, addr, error, failures, "peer {peer} unreachable: {error}")
            }
            Some(PeerEvent::StillUnreachable { suppressed, down_for }) => warn!(
                node_id,
                peer,
                addr,
                error,
                suppressed,
                down_ms = down_for.as_millis() as u64,
                "peer {peer} still unreachable after {} s: {error} ({suppressed} failures since the last report)",
                down_for.as_secs()
            ),
            Some(PeerEvent::Reachable { failures, down_for }) => info!(
                node_id,
                peer,
                addr,
                failures,
                down_ms = down_for.as_millis() as u64,
                "peer {peer} reachable again after {failures} failures"
            ),
            None if outcome.is_err() => debug!(node_id, peer, addr, error, "rpc to peer failed"),
            None => {}
        }
    }

    /// The transport settings.
    pub fn options(&self) -> &NetOptions {
        &self.opts
    }

    /// The channel to `addr` (`host:port`), created on first use; connects lazily.
    pub fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let tls = self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        let ch = endpoint
            .connect_timeout(self.opts.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .local_address(self.opts.source_ip)
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// A client of the Raft service at `addr`.
    fn raft_client(
        &self,
        addr: &str,
    ) -> Result<RaftServiceClient<Channel>, tonic::transport::Error> {
        Ok(RaftServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(self.opts.max_message_bytes)
            .max_encoding_message_size(self.opts.max_message_bytes))
    }
}

/// Encoding of Raft messages on the wire.
pub mod codec {
    use serde::{de::DeserializeOwned, Deserialize, Serialize};

    use crate::{Entry, NodeId};

    /// Version of the payload encoding inside `RaftRequest` / `RaftReply`.
    pub const VERSION: u32 = 1;

    /// Encode a message.
    pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_stdvec(v).expect("encoding to a Vec cannot fail")
    }

    /// Decode a message.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    /// AppendEntries as sent: entries individually encoded, so the sender can cut the batch
    /// to a byte budget without encoding anything twice.
    #[derive(Serialize, Deserialize)]
    pub struct AppendWire {
        /// Leader's vote.
        pub vote: openraft::Vote<NodeId>,
        /// Log id before the first entry.
        pub prev_log_id: Option<openraft::LogId<NodeId>>,
        /// Leader's committed log id.
        pub leader_commit: Option<openraft::LogId<NodeId>>,
        /// Encoded entries.
        pub entries: Vec<Vec<u8>>,
    }

    /// Decode entries of an [`AppendWire`].
    pub fn decode_entries(entries: &[Vec<u8>]) -> Result<Vec<Entry>, postcard::Error> {
        entries.iter().map(|e| decode(e)).collect()
    }
}

/// Creates [`PeerClient`]s for openraft.
#[derive(Clone)]
pub struct NetworkFactory {
    node_id: NodeId,
    peers: Peers,
}

impl NetworkFactory {
    /// A factory for node `node_id` over a shared channel pool.
    pub fn new(node_id: NodeId, peers: Peers) -> Self {
        NetworkFactory { node_id, peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient {
            node_id: self.node_id,
            target,
            addr: node.peer().to_string(),
            peers: self.peers.clone(),
        }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    node_id: NodeId,
    target: NodeId,
    addr: String,
    peers: Peers,
}

/// Why one call to a peer failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    /// The peer (or tonic on its behalf) answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The peer's address is not a valid endpoint.
    #[error("bad peer address {addr}: {error}")]
    BadAddress {
        /// The address.
        addr: String,
        /// Why it is bad.
        error: String,
    },
    /// The peer answered something this node cannot use (another encoding, an empty reply).
    #[error("{0}")]
    Protocol(String),
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        CallError::Status(s)
    }
}

impl CallError {
    /// Whether the peer did not answer (as opposed to answering with an error).
    fn is_transport_failure(&self) -> bool {
        match self {
            CallError::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
            ),
            CallError::BadAddress { .. } => true,
            CallError::Protocol(_) => false,
        }
    }
}

/// Records one RPC's outcome for [`PeerHealth`]; a call dropped before it finished (openraft's
/// own deadline fired first) counts as a failure.
struct Attempt<'a> {
    client: &'a PeerClient,
    ttl: Duration,
    done: bool,
}

impl Attempt<'_> {
    fn finish<T>(mut self, r: &Result<T, CallError>) {
        self.done = true;
        let c = self.client;
        match r {
            Err(e) if e.is_transport_failure() => {
                let error = e.to_string();
                c.peers.record(c.node_id, c.target, &c.addr, Err(&error));
            }
            _ => c.peers.record(c.node_id, c.target, &c.addr, Ok(())),
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.done {
            let c = self.client;
            let error = format!("no reply within {} ms", self.ttl.as_millis());
            c.peers.record(c.node_id, c.target, &c.addr, Err(&error));
        }
    }
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

/// A peer that refused or dropped the connection is `Unreachable`: openraft backs off before
/// trying again. So is a peer that refused the message itself (INVALID_ARGUMENT or
/// FAILED_PRECONDITION from its `plausible` checks, e.g. it does not count this node as a
/// member yet): it will not change its mind at once, and retrying without a pause would be a
/// hot loop. A deadline (tonic reports its own as `Cancelled: Timeout expired`) is only a
/// `Network` error and is retried at once: a slow AppendEntries must not pause replication.
fn call_to_rpc<E: std::error::Error>(e: CallError) -> RPCError<NodeId, NodeInfo, E> {
    match &e {
        CallError::Status(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::InvalidArgument
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::PermissionDenied
            ) =>
        {
            RPCError::Unreachable(Unreachable::new(&e))
        }
        CallError::BadAddress { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl PeerClient {
    async fn call(
        &self,
        method: Method,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<ipb::raft_reply::Result, CallError> {
        let attempt = Attempt { client: self, ttl: option.hard_ttl(), done: false };
        let r = self.call_once(method, data, option).await;
        attempt.finish(&r);
        r
    }

    async fn call_once(
        &self,
        method: Method,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<ipb::raft_reply::Result, CallError> {
        let mut client = self
            .peers
            .raft_client(&self.addr)
            .map_err(|e| CallError::BadAddress { addr: self.addr.clone(), error: e.to_string() })?;
        let mut req = tonic::Request::new(ipb::RaftRequest { version: codec::VERSION, data });
        req.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::Append => client.append_entries(req).await?,
            Method::Vote => client.vote(req).await?,
            Method::Snapshot => client.install_snapshot(req).await?,
        }
        .into_inner();
        if reply.version != codec::VERSION {
            return Err(CallError::Protocol(format!(
                "peer speaks raft encoding {}, this node {}",
                reply.version,
                codec::VERSION
            )));
        }
        reply.result.ok_or_else(|| CallError::Protocol("empty reply from peer".into()))
    }

    fn decode_reply<T, E>(&self, r: ipb::raft_reply::Result) -> Result<T, RpcErr<E>>
    where
        T: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        match r {
            ipb::raft_reply::Result::Ok(bytes) => {
                codec::decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))
            }
            ipb::raft_reply::Result::Error(bytes) => {
                let err: RaftError<NodeId, E> =
                    codec::decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                Err(RPCError::RemoteError(RemoteError::new(self.target, err)))
            }
        }
    }
}

enum Method {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let budget = self.peers.options().append_budget_bytes;
        let mut entries = Vec::with_capacity(rpc.entries.len());
        let mut bytes = 0usize;
        let mut last_sent = None;
        let total = rpc.entries.len();
        for e in &rpc.entries {
            let enc = codec::encode(e);
            // Always send at least one entry, so progress is made whatever its size.
            if !entries.is_empty() && bytes + enc.len() > budget {
                break;
            }
            bytes += enc.len();
            entries.push(enc);
            last_sent = Some(e.log_id);
        }
        let truncated = entries.len() < total;
        let wire = codec::AppendWire {
            vote: rpc.vote,
            prev_log_id: rpc.prev_log_id,
            leader_commit: rpc.leader_commit,
            entries,
        };
        let reply =
            self.call(Method::Append, codec::encode(&wire), &option).await.map_err(call_to_rpc)?;
        let resp: AppendEntriesResponse<NodeId> = self.decode_reply(reply)?;
        Ok(match resp {
            AppendEntriesResponse::Success if truncated => {
                AppendEntriesResponse::PartialSuccess(last_sent)
            }
            other => other,
        })
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        let reply =
            self.call(Method::Snapshot, codec::encode(&rpc), &option).await.map_err(call_to_rpc)?;
        self.decode_reply(reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let reply =
            self.call(Method::Vote, codec::encode(&rpc), &option).await.map_err(call_to_rpc)?;
        self.decode_reply(reply)
    }

    /// Called by openraft when a peer turns out unreachable; the iterator lives until the next
    /// successful RPC, so the delay grows while the peer stays down.
    fn backoff(&self) -> Backoff {
        let o = self.peers.options();
        Backoff::new(backoff_delays(o.unreachable_backoff, o.unreachable_backoff_max))
    }
}

/// `first`, doubling, capped at `max`.
fn backoff_delays(first: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    let first = first.min(max);
    std::iter::successors(Some(first), move |d| Some((*d * 2).min(max)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_peer_becomes_unreachable_once_after_failures_in_a_row() {
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        for i in 1..FAILURES_BEFORE_UNREACHABLE {
            assert_eq!(h.failure(t0 + Duration::from_millis(i)), None);
            assert!(!h.is_unreachable());
        }
        assert_eq!(
            h.failure(t0 + secs(1)),
            Some(PeerEvent::Unreachable { failures: FAILURES_BEFORE_UNREACHABLE })
        );
        assert!(h.is_unreachable());
        // Repeats within the interval are counted, not logged.
        for i in 0..100 {
            assert_eq!(h.failure(t0 + secs(1) + Duration::from_millis(100 * i)), None);
        }
        // One line per interval, with the count of what was not logged.
        assert_eq!(
            h.failure(t0 + secs(1) + REPEAT_EVERY),
            Some(PeerEvent::StillUnreachable { suppressed: 101, down_for: REPEAT_EVERY })
        );
        assert_eq!(h.failure(t0 + secs(2) + REPEAT_EVERY), None);
        assert_eq!(
            h.failure(t0 + secs(1) + 2 * REPEAT_EVERY),
            Some(PeerEvent::StillUnreachable { suppressed: 2, down_for: 2 * REPEAT_EVERY })
        );
        // Recovery is logged once, with every failure of the outage.
        assert_eq!(
            h.success(t0 + secs(1) + 2 * REPEAT_EVERY + secs(5)),
            Some(PeerEvent::Reachable {
                failures: FAILURES_BEFORE_UNREACHABLE + 100 + 1 + 1 + 1,
                down_for: 2 * REPEAT_EVERY + secs(5),
            })
        );
        assert!(!h.is_unreachable());
        assert_eq!(h.success(t0 + secs(100)), None);
    }

    #[test]
    fn sporadic_failures_are_not_an_outage() {
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        for i in 0..50 {
            for _ in 1..FAILURES_BEFORE_UNREACHABLE {
                assert_eq!(h.failure(t0 + secs(i)), None);
            }
            assert_eq!(h.success(t0 + secs(i)), None);
        }
        assert!(!h.is_unreachable());
    }

    #[test]
    fn an_outage_after_recovery_is_reported_again() {
        let t0 = Instant::now();
        let mut h = PeerHealth::default();
        for _ in 0..FAILURES_BEFORE_UNREACHABLE {
            h.failure(t0);
        }
        assert!(h.success(t0 + secs(1)).is_some());
        for _ in 1..FAILURES_BEFORE_UNREACHABLE {
            assert_eq!(h.failure(t0 + secs(2)), None);
        }
        assert_eq!(
            h.failure(t0 + secs(2)),
            Some(PeerEvent::Unreachable { failures: FAILURES_BEFORE_UNREACHABLE })
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let d: Vec<u64> = backoff_delays(Duration::from_millis(100), secs(1))
            .take(7)
            .map(|d| d.as_millis() as u64)
            .collect();
        assert_eq!(d, [100, 200, 400, 800, 1000, 1000, 1000]);
        let d: Vec<Duration> = backoff_delays(secs(5), secs(1)).take(2).collect();
        assert_eq!(d, [secs(1), secs(1)]);
    }

    #[test]
    fn shared_pool_tracks_peers_separately() {
        let peers = Peers::new(NetOptions::default());
        for _ in 0..FAILURES_BEFORE_UNREACHABLE {
            peers.record(1, 3, "127.0.0.1:1", Err("Unavailable: tcp connect error"));
        }
        let down = |id| peers.health.lock().unwrap().get(&id).is_some_and(|h| h.is_unreachable());
        assert!(down(3));
        assert!(!down(2));
        peers.record(1, 3, "127.0.0.1:1", Ok(()));
        assert!(!down(3));
    }
}
