//! The peer network: openraft's RPCs over the internal gRPC service.
//!
//! * One lazily-connected tonic channel per peer address, shared by Raft replication and write
//!   forwarding ([`Peers`]); HTTP/2 keepalive detects dead connections; every RPC carries a
//!   deadline (openraft's `RPCOption::hard_ttl`).
//! * Payloads are postcard-encoded openraft messages inside `bytes` (see [`codec`]). An
//!   AppendEntries request is cut to a byte budget: if the leader offers more entries than fit,
//!   only a prefix is sent and success is reported as `PartialSuccess`, so one huge batch can
//!   never exceed message limits or the heartbeat-sized RPC timeout.
//! * Errors map to what makes openraft back off correctly: a refused connection or
//!   `UNAVAILABLE` is `Unreachable` (retried after [`PeerClient::backoff`]), a deadline is a
//!   `Network` error (retried at once), a Raft error from the peer is `RemoteError`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
use tonic::transport::{Channel, Endpoint};

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
    /// Delay before retrying an unreachable peer.
    pub unreachable_backoff: Duration,
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
            source_ip: None,
        }
    }
}

/// Channels to peers by address, shared by everything that talks to other nodes.
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    opts: NetOptions,
}

impl Peers {
    /// An empty pool.
    pub fn new(opts: NetOptions) -> Self {
        Peers { channels: Arc::new(Mutex::new(HashMap::new())), opts }
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
        let ch = Endpoint::from_shared(format!("http://{addr}"))?
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

    /// A client of the internal service at `addr`.
    pub fn internal_client(
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
    peers: Peers,
}

impl NetworkFactory {
    /// A factory over a shared channel pool.
    pub fn new(peers: Peers) -> Self {
        NetworkFactory { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerClient {
        PeerClient { target, addr: node.addr.clone(), peers: self.peers.clone() }
    }
}

/// The connection to one peer.
pub struct PeerClient {
    target: NodeId,
    addr: String,
    peers: Peers,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

/// A peer that refused or dropped the connection is `Unreachable`: openraft backs off before
/// trying again. A deadline (tonic reports its own as `Cancelled: Timeout expired`) is only a
/// `Network` error and is retried at once: a slow AppendEntries must not pause replication.
fn status_to_rpc<E: std::error::Error>(s: tonic::Status) -> RPCError<NodeId, NodeInfo, E> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            RPCError::Unreachable(Unreachable::new(&s))
        }
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

impl PeerClient {
    async fn call(
        &self,
        method: Method,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<ipb::raft_reply::Result, tonic::Status> {
        let mut client = self.peers.internal_client(&self.addr).map_err(|e| {
            tonic::Status::unavailable(format!("bad peer address {}: {e}", self.addr))
        })?;
        let mut req = tonic::Request::new(ipb::RaftRequest { version: codec::VERSION, data });
        req.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::Append => client.append_entries(req).await?,
            Method::Vote => client.vote(req).await?,
            Method::Snapshot => client.install_snapshot(req).await?,
        }
        .into_inner();
        if reply.version != codec::VERSION {
            return Err(tonic::Status::failed_precondition(format!(
                "peer speaks raft encoding {}, this node {}",
                reply.version,
                codec::VERSION
            )));
        }
        reply.result.ok_or_else(|| tonic::Status::internal("empty reply from peer"))
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
        let reply = self
            .call(Method::Append, codec::encode(&wire), &option)
            .await
            .map_err(status_to_rpc)?;
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
        let reply = self
            .call(Method::Snapshot, codec::encode(&rpc), &option)
            .await
            .map_err(status_to_rpc)?;
        self.decode_reply(reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        let reply =
            self.call(Method::Vote, codec::encode(&rpc), &option).await.map_err(status_to_rpc)?;
        self.decode_reply(reply)
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.peers.options().unreachable_backoff))
    }
}
