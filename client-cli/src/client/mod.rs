//! The cluster client: endpoints, leader discovery, retries and typed calls.
//!
//! # Routing
//!
//! A [`Client`] holds one lazily connected tonic channel per node address. Every call goes to
//! the *preferred* node: at first the first configured endpoint, later the node that answered a
//! write last (normally the leader, so writes need no forwarding hop). When an attempt fails
//! with UNAVAILABLE and the answer carries the `x-raftsched-leader` hint (`<id>@<host:port>`),
//! the next attempt goes to that address, even if it was not configured (a node added later);
//! otherwise the next attempt goes to the next endpoint in the list.
//!
//! # Retries
//!
//! Only UNAVAILABLE, DEADLINE_EXCEEDED, per-attempt timeouts and broken connections are
//! retried, with jittered exponential backoff ([`crate::backoff`]), until the retry budget is
//! spent. Every other code is final: retrying a rejected request cannot make it valid.
//!
//! Retrying a write whose first attempt may have been applied is safe because every write is
//! idempotent end to end: [`Client::submit_tasks`] gives every task an idempotency key
//! *before* the first attempt (so every retry carries the same key and the server answers with
//! the task it created), reports quote the attempt's fencing token (a repeat answers
//! `duplicate`), cancels of a cancelled task answer `already_cancelled`, and a worker
//! re-registering with the same instance keeps its session. If the budget runs out, the error
//! says whether the outcome is unknown ([`Error::is_indeterminate`]); resolve it by sending the
//! same request again.
//!
//! With [`ClientConfig::fail_fast_when_refused`] (what `schedctl`'s one-shot commands use), a
//! call whose every attempt so far was a refused connection stops as soon as every known node
//! has refused: nothing was sent, so there is no unknown outcome to wait out.
//!
//! # Deadlines
//!
//! Every unary attempt has a deadline (`call_timeout`, default 10 s), sent to the server as
//! `grpc-timeout` and enforced locally. Streaming calls use it only for opening the stream.
//!
//! # Files
//!
//! This file holds [`Client`], its configuration and the helpers callers share; `retry`
//! routes and retries every call (endpoint pool, leader hints, deadlines, backoff); `tasks`,
//! `workers` and `cluster` hold the typed calls of the three public services.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use proto::pb::tasks_client::TasksClient;
use proto::pb::workers_client::WorkersClient;
use tonic::transport::Channel;

use crate::backoff::BackoffConfig;
use crate::error::Error;

mod cluster;
mod retry;
mod tasks;
mod workers;

pub(crate) use retry::node_endpoint;
use retry::{Node, Pool, PoolState, Tuning};

/// Largest message the client sends or accepts (lists with payloads can be large).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Default node address.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7001";
/// Deadline of one RPC attempt, unless configured.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call keeps retrying while the cluster is unreachable, unless configured.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(30);

/// How a [`Client`] connects and retries.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Node addresses, `host:port` (an `http://` prefix is accepted).
    pub endpoints: Vec<String>,
    /// Deadline of one attempt.
    pub call_timeout: Duration,
    /// Total time spent on one call, retries included.
    pub retry_budget: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive ping interval: detects a dead node on an idle connection.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Backoff between attempts.
    pub backoff: BackoffConfig,
    /// The cluster's CA certificate (PEM file): connect with TLS and verify the nodes against
    /// it. `None`: plaintext.
    pub ca_cert: Option<std::path::PathBuf>,
    /// The secret sent as `authorization: Bearer <secret>` on every call (clusters started
    /// with a token file require one). Never logged.
    pub token: Option<String>,
    /// Give up at once, without spending the retry budget, when every known node refused
    /// the connection in this call: nothing was sent, so the outcome is known (not applied),
    /// and waiting rarely helps a one-shot command. Off by default: a long-lived client
    /// (a worker, a load generator) rides through a whole-cluster restart instead.
    pub fail_fast_when_refused: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_string()],
            call_timeout: DEFAULT_CALL_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            backoff: BackoffConfig::default(),
            token: None,
            ca_cert: None,
            fail_fast_when_refused: false,
        }
    }
}

impl ClientConfig {
    /// The defaults with these endpoints.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Splits a comma (or whitespace) separated endpoint list, dropping empty items.
pub fn parse_endpoints(list: &str) -> Vec<String> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A fresh random idempotency key (128 bits, hex).
pub fn new_idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Gives every spec without an idempotency key a fresh one, so that retries of the same
/// submission can never create a second task.
pub fn ensure_idempotency_keys(specs: &mut [pb::TaskSpec]) {
    for spec in specs.iter_mut().filter(|s| s.idempotency_key.is_empty()) {
        spec.idempotency_key = new_idempotency_key();
    }
}

/// True for the terminal states (succeeded, failed, cancelled, upstream_failed).
pub fn is_terminal(state: i32) -> bool {
    matches!(
        pb::TaskState::try_from(state),
        Ok(pb::TaskState::Succeeded
            | pb::TaskState::Failed
            | pb::TaskState::Cancelled
            | pb::TaskState::UpstreamFailed)
    )
}

/// A stream of task snapshots ([`Client::watch_task`]).
pub type TaskStream = BoxStream<'static, Result<pb::Task, Error>>;
/// A stream of applied changes ([`Client::watch_events`]).
pub type EventStream = BoxStream<'static, Result<pb::EventBatch, Error>>;
/// A worker's assignment stream ([`Client::open_assignments`]).
pub type AssignmentStream = BoxStream<'static, Result<pb::WorkerMessage, Error>>;

/// A client of a raftsched cluster. Cheap to clone; clones share channels and routing.
#[derive(Clone)]
pub struct Client {
    pool: Arc<Pool>,
    call_timeout: Duration,
    retry_budget: Duration,
    backoff: BackoffConfig,
    fail_fast_when_refused: bool,
    /// `Bearer <secret>`, ready to attach.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoints())
            .field("call_timeout", &self.call_timeout)
            .field("retry_budget", &self.retry_budget)
            .field("token", &self.authorization.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl Client {
    /// A client for these endpoints with the default settings.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Result<Client, Error> {
        Client::with_config(ClientConfig::new(endpoints))
    }

    /// A client with explicit settings. No connection is made until the first call.
    pub fn with_config(config: ClientConfig) -> Result<Client, Error> {
        let pool = Pool {
            tuning: Tuning {
                ca_pem: match &config.ca_cert {
                    None => None,
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        Error::Config(format!(
                            "cannot read the CA certificate {}: {e}",
                            path.display()
                        ))
                    })?),
                },
                connect_timeout: config.connect_timeout,
                keepalive_interval: config.keepalive_interval,
                keepalive_timeout: config.keepalive_timeout,
            },
            state: Mutex::new(PoolState { nodes: Vec::new(), preferred: 0 }),
        };
        let mut nodes: Vec<Node> = Vec::new();
        for addr in &config.endpoints {
            let (key, endpoint) = pool.endpoint(addr)?;
            if !nodes.iter().any(|n| n.addr == key) {
                nodes.push(Node { addr: key, endpoint, channel: None });
            }
        }
        if nodes.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        pool.lock().nodes = nodes;
        let authorization = match config.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(secret) => Some(format!("Bearer {secret}").parse().map_err(|_| {
                Error::Config(
                    "the token contains characters that cannot travel in a header (use printable ASCII)"
                        .into(),
                )
            })?),
        };
        Ok(Client {
            authorization,
            pool: Arc::new(pool),
            call_timeout: config.call_timeout,
            retry_budget: config.retry_budget,
            backoff: config.backoff,
            fail_fast_when_refused: config.fail_fast_when_refused,
        })
    }

    /// This client with another per-attempt deadline (shares channels and routing).
    pub fn with_call_timeout(&self, timeout: Duration) -> Client {
        Client { call_timeout: timeout, ..self.clone() }
    }

    /// This client with another retry budget (shares channels and routing).
    pub fn with_retry_budget(&self, budget: Duration) -> Client {
        Client { retry_budget: budget, ..self.clone() }
    }

    /// The per-attempt deadline.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }

    /// The retry budget.
    pub fn retry_budget(&self) -> Duration {
        self.retry_budget
    }

    /// Every known node address: the configured ones, then those learned from leader hints.
    pub fn endpoints(&self) -> Vec<String> {
        self.pool.lock().nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// The address the next call goes to.
    pub fn preferred_endpoint(&self) -> String {
        let st = self.pool.lock();
        st.nodes[st.preferred].addr.clone()
    }
}

fn tasks(ch: Channel) -> TasksClient<Channel> {
    TasksClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn workers(ch: Channel) -> WorkersClient<Channel> {
    WorkersClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn cluster(ch: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_lists_parse() {
        assert_eq!(
            parse_endpoints("127.0.0.1:7001, 127.0.0.1:7002,,127.0.0.1:7003 "),
            vec!["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
        );
        assert!(parse_endpoints(" , ").is_empty());
    }

    #[test]
    fn bad_endpoints_are_config_errors() {
        assert!(matches!(Client::new(Vec::<String>::new()), Err(Error::Config(_))));
        assert!(matches!(Client::new(["nohost"]), Err(Error::Config(_))));
        assert!(matches!(Client::new(["https://a:1"]), Err(Error::Config(_))));
        let c = Client::new(["http://a:1", "a:1", "b:2"]).unwrap();
        assert_eq!(c.endpoints(), vec!["a:1", "b:2"], "duplicates collapse");
    }

    #[test]
    fn keys_are_filled_only_where_missing() {
        let mut specs = vec![
            pb::TaskSpec { name: "a".into(), ..Default::default() },
            pb::TaskSpec { name: "b".into(), idempotency_key: "mine".into(), ..Default::default() },
        ];
        ensure_idempotency_keys(&mut specs);
        assert_eq!(specs[0].idempotency_key.len(), 32);
        assert_eq!(specs[1].idempotency_key, "mine");
        assert_ne!(new_idempotency_key(), new_idempotency_key());
    }

    #[test]
    fn terminal_states() {
        use pb::TaskState as S;
        for s in [S::Succeeded, S::Failed, S::Cancelled, S::UpstreamFailed] {
            assert!(is_terminal(s as i32));
        }
        for s in [S::Unspecified, S::Waiting, S::Queued, S::Delayed, S::Assigned, S::Running] {
            assert!(!is_terminal(s as i32));
        }
    }
}
