//! Assembles and runs a node: Raft, the gRPC server (public API, Raft and peer services, health,
//! reflection), the HTTP metrics server and the leader loops; stops them in order.
//!
//! gRPC health (`grpc.health.v1`) follows readiness, the same answer as `/readyz`
//! ([`raft::node::RaftNode::readiness`]): `Tasks`, `Workers`, `Cluster` and the overall
//! service `""` are SERVING only while this node can serve a linearizable read (a leader with a
//! recent quorum ack, or a follower hearing from its leader), NOT_SERVING otherwise, from start
//! until the first leader is known, and from shutdown on. A background task re-evaluates on
//! every role or leader change and at least every [`READINESS_INTERVAL`], and updates the
//! reporter only when the answer changes.
//!
//! Resource limits (`[limits]`): connections per port, idle and half-open connections
//! ([`crate::conn`]), HTTP/2 keepalive and streams per connection, server streams
//! ([`crate::streams`]) and oversized requests ([`crate::limits`]).
//!
//! Shutdown (SIGTERM/SIGINT, or the `shutdown` future): streams are told to end, the gRPC
//! server stops accepting and drains for a bounded time, then Raft shuts down and the state
//! machine is flushed. A fatal Raft error (a storage failure: a failed write or fsync, a full
//! disk) stops the node at once — no drain, no flush into the failed disk — and makes [`run`]
//! return an error naming the file, the error and the free space, so the process exits
//! non-zero within about a second (see `main` for why it must not wait for destructors).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proto::internal::v1::peer_service_server::PeerServiceServer;
use proto::internal::v1::raft_service_server::RaftServiceServer;
use proto::pb::cluster_server::ClusterServer;
use proto::pb::tasks_server::TasksServer;
use proto::pb::workers_server::WorkersServer;
use raft::node::{RaftNode, StartError};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::api::cluster::ClusterApi;
use crate::api::peer::{PeerApi, RaftApi};
use crate::api::tasks::TasksApi;
use crate::api::workers::WorkersApi;
use crate::auth::{AuthLayer, Tokens};
use crate::config::Config;
use crate::leader::liveness::Liveness;
use crate::metrics::Metrics;
use crate::tls::NodeTls;
use crate::Node;

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory is not usable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A port could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificates are not usable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The token file is not usable.
    #[error(transparent)]
    Tokens(#[from] crate::auth::TokenFileError),
    /// Raft or its storage did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// `--restore` was refused or failed.
    #[error(transparent)]
    Restore(#[from] raft::restore::RestoreError),
    /// Bootstrapping a single-node cluster failed.
    #[error("bootstrap failed: {0}")]
    Bootstrap(String),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Grpc(String),
    /// Raft stopped with a fatal error (e.g. the disk failed); nothing was acknowledged after it.
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// Replicated tokens as this node's state holds them, refused once expired by its clock.
fn replicated_tokens(raft: Arc<RaftNode>) -> crate::auth::ReplicatedLookup {
    Arc::new(move |digest| {
        let now = raft::node::now_ms();
        raft.sm().read(|s| {
            s.token_by_digest(digest).filter(|t| !t.expired_at(now)).map(|t| crate::auth::Caller {
                name: t.name.clone(),
                role: t.role,
                worker_id_prefix: t.worker_id_prefix.clone(),
            })
        })
    })
}

/// Seed the data directory from the snapshot `file` (`--restore`), keeping the snapshot's
/// membership or, with `--bootstrap`, making this node a one-node cluster.
async fn restore_data_dir(cfg: &Config, file: &std::path::Path) -> Result<(), ServerError> {
    use raft::restore::{restore, RestoreMembership, Restored};
    let membership =
        if cfg.bootstrap { RestoreMembership::Bootstrap } else { RestoreMembership::Keep };
    let info = cfg.node_info();
    match restore(&cfg.data_dir, file, cfg.id, &info, membership, &cfg.raft).await? {
        Restored::Seeded { meta, tasks, workers } => info!(
            file = %file.display(),
            data_dir = %cfg.data_dir.display(),
            last_log_id = %meta.last_log_id.map(|l| l.to_string()).unwrap_or_default(),
            members = ?meta.last_membership.voter_ids().collect::<Vec<_>>(),
            tasks,
            workers,
            "restored the data directory from a snapshot"
        ),
        Restored::AlreadyRestored { meta } => info!(
            file = %file.display(),
            snapshot = %meta.snapshot_id,
            "data directory was restored from this snapshot before; starting normally"
        ),
    }
    Ok(())
}

/// Run a node until `shutdown` completes or Raft fails.
pub async fn run(
    mut cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    // Connection caps that fit under the open-files limit (raised to its hard maximum).
    let listeners = 1 + usize::from(cfg.peer_listen.is_some()) + usize::from(cfg.http.is_some());
    cfg.limits.max_connections =
        crate::conn::fit_cap(cfg.limits.max_connections, listeners, crate::conn::raise_fd_limit());
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| ServerError::DataDir { path: cfg.data_dir.clone(), source })?;
    let tokens = match &cfg.auth_tokens {
        Some(path) => {
            let t = Tokens::load(path)?;
            info!(file = %path.display(), tokens = t.len(), "authentication on: requests need a bearer token");
            Some(t)
        }
        None => None,
    };
    let tls = match &cfg.tls {
        Some(files) => {
            let t = NodeTls::load(files.clone())?;
            info!(cert = %files.cert.display(), ca = %files.ca.display(), "TLS on: listeners need TLS; peer RPCs need a node certificate");
            Some(t)
        }
        None => None,
    };
    // Config::load refused this unless --insecure was given.
    if let Some((addr, missing)) = cfg.unprotected_exposure() {
        warn!(
            %addr,
            missing = %missing.join(", "),
            "INSECURE: serving a non-loopback address without TLS and tokens; anyone who reaches \
             this port can read and change tasks, workers and cluster membership"
        );
    }
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind { addr: cfg.listen.to_string(), source })?;
    let peer_listener = match cfg.peer_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr: addr.to_string(), source })?,
        ),
        None => None,
    };
    let http_listener = match cfg.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr: addr.to_string(), source })?,
        ),
        None => None,
    };
    if let Some(file) = &cfg.restore {
        restore_data_dir(&cfg, file).await?;
    }
    let raft =
        RaftNode::start(cfg.id, cfg.advertise.clone(), &cfg.data_dir, cfg.raft.clone()).await?;
    if let Some(t) = &tls {
        raft.peers().set_tls(Some(t.peer_client()));
    }
    let tokens = tokens.map(|t| Arc::new(t.with_replicated(replicated_tokens(raft.clone()))));
    let (stop_tx, stop_rx) = watch::channel(false);
    let disk = crate::disk::DiskGuard::new(cfg.id, cfg.data_dir.clone(), cfg.limits.min_free_disk);
    let metrics = Metrics::default();
    let streams = crate::streams::Streams::new(
        cfg.limits.max_streams,
        cfg.limits.stream_buffer_bytes,
        cfg.limits.stream_buffer_total_bytes,
        cfg.limits.stream_stall_timeout,
        metrics.limits().clone(),
    );
    let node = Arc::new(Node {
        disk,
        liveness: Liveness::new(cfg.workers.heartbeat_ttl, cfg.workers.failover_grace),
        metrics,
        streams,
        stopping: stop_rx,
        tokens: tokens.clone(),
        version_gate: tokio::sync::Mutex::new(()),
        raft: raft.clone(),
        cfg,
    });
    if node.cfg.bootstrap {
        let members = BTreeMap::from([(node.cfg.id, node.cfg.node_info())]);
        let initialized = raft
            .raft()
            .is_initialized()
            .await
            .map_err(|e| ServerError::Bootstrap(e.to_string()))?;
        if !initialized {
            raft.initialize(members).await.map_err(|e| ServerError::Bootstrap(e.to_string()))?;
            info!(node_id = node.cfg.id, "bootstrapped a single-node cluster");
        }
    }

    let leader_loops = tokio::spawn(crate::leader::supervise(node.clone()));
    tokio::spawn(crate::disk::watch(node.clone()));
    if let Some(l) = http_listener {
        info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics, health, api and dashboard on http");
        tokio::spawn(crate::http::serve(l, node.clone(), tls.clone()));
    }

    let (health, health_svc) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let readiness = tokio::spawn(follow_readiness(node.clone(), health.clone()));
    // Both reflection versions: grpcurl and most tools speak v1, some older clients v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection =
        reflection_builder().build_v1().map_err(|e| ServerError::Grpc(e.to_string()))?;
    let reflection_v1alpha =
        reflection_builder().build_v1alpha().map_err(|e| ServerError::Grpc(e.to_string()))?;
    let max = node.cfg.limits.max_message_bytes;
    let peer_max = node.cfg.raft.net.max_message_bytes;
    let limits = &node.cfg.limits;
    let limits_layer = crate::limits::LimitsLayer::new(
        max,
        limits.fields.max_batch_tasks,
        node.metrics.limits().clone(),
    );
    let builder = || {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .max_concurrent_streams(Some(limits.max_streams_per_connection))
            .layer(AuthLayer::new(tokens.clone(), tls.is_some()))
            .layer(crate::rpc_metrics::RpcMetricsLayer::new(node.clone()))
            .layer(limits_layer.clone())
    };
    let conns = crate::conn::ConnSettings {
        max: limits.max_connections,
        idle_timeout: limits.idle_timeout,
    };
    let raft_svc = RaftServiceServer::new(RaftApi::new(&node))
        .max_decoding_message_size(peer_max)
        .max_encoding_message_size(peer_max);
    let peer_svc = PeerServiceServer::new(PeerApi::new(node.clone()))
        .max_decoding_message_size(peer_max)
        .max_encoding_message_size(peer_max);
    // With a peer port the internal services live there alone; the client port does not
    // route them (UNIMPLEMENTED), as etcd keeps peer and client URLs apart.
    let (raft_here, peer_here, peer_router) = match peer_listener {
        None => (Some(raft_svc), Some(peer_svc), None),
        Some(l) => {
            let router = builder()
                .add_service(raft_svc)
                .add_service(peer_svc)
                .add_service(health_svc.clone());
            (None, None, Some((l, router)))
        }
    };
    let router = builder()
        .add_service(TasksServer::new(TasksApi::new(node.clone())).max_decoding_message_size(max))
        .add_service(
            WorkersServer::new(WorkersApi::new(node.clone())).max_decoding_message_size(max),
        )
        .add_service(
            ClusterServer::new(ClusterApi::new(node.clone())).max_decoding_message_size(max),
        )
        .add_optional_service(raft_here)
        .add_optional_service(peer_here)
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_v1alpha);
    info!(
        node_id = node.cfg.id,
        listen = %node.cfg.listen,
        advertise = %node.cfg.advertise,
        peer_listen = ?node.cfg.peer_listen,
        advertise_peer = ?node.cfg.advertise_peer,
        data_dir = %node.cfg.data_dir.display(),
        "schedulerd serving"
    );
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    // Our own listener (bound early to fail fast), so tonic's server-level TCP options do not
    // apply: `conn::incoming` sets them (TCP_NODELAY: without it small responses wait for
    // delayed ACKs, ~40 ms; keepalive), caps the connections and closes idle ones.
    let drained = async {
        let _ = drain_rx.await;
    };
    if let Some(t) = &tls {
        let peers = raft.peers().clone();
        crate::tls::spawn_reloader(t.clone(), node.stopping.clone(), move |t| {
            peers.set_tls(Some(t.peer_client()))
        });
    }
    let serve_on = |router, listener, name, shutdown| {
        let incoming = crate::conn::incoming(
            listener,
            tls.clone(),
            conns.clone(),
            node.metrics.limits().clone(),
            name,
        );
        serve(router, incoming, shutdown)
    };
    let mut server = serve_on(router, listener, "client", Box::pin(drained) as Shutdown);
    // The peer port stops with the client port; either failing stops the node.
    let mut peer_server = match peer_router {
        Some((l, r)) => {
            let mut stopping = node.stopping.clone();
            let stopped = async move {
                let _ = stopping.wait_for(|s| *s).await;
            };
            Some(serve_on(r, l, "peer", Box::pin(stopped) as Shutdown))
        }
        None => None,
    };
    let peer_failed = async {
        match &mut peer_server {
            Some(s) => s.await,
            None => std::future::pending().await,
        }
    };

    // Wait for a shutdown request, a fatal Raft error, or the server failing.
    let mut metrics = raft.raft().metrics();
    let fatal = async {
        loop {
            if let Some(e) = raft.fatal() {
                return e;
            }
            // Storage failures surface through openraft's metrics, or (state-machine writes
            // behind apply) through the store itself: look at both, at least every second.
            if let Ok(Err(_)) =
                tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await
            {
                return "raft stopped".to_string();
            }
        }
    };
    let mut outcome = Ok(());
    tokio::select! {
        _ = shutdown => info!("shutting down"),
        e = fatal => {
            let e = with_free_space(e, &node.cfg.data_dir);
            error!(error = %e, "raft stopped with a fatal error; stopping at once");
            outcome = Err(ServerError::Fatal(e));
        }
        r = &mut server => {
            let msg = server_stopped(r);
            error!(error = %msg, "grpc server stopped");
            outcome = Err(ServerError::Grpc(msg));
        }
        r = peer_failed => {
            let msg = server_stopped(r);
            error!(error = %msg, "grpc peer server stopped");
            outcome = Err(ServerError::Grpc(msg));
        }
    }
    readiness.abort();
    set_health(&health, ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    let _ = drain_tx.send(());
    // After a storage failure nothing is gained by draining: nothing more can be acknowledged.
    let drain = if outcome.is_ok() { Duration::from_secs(5) } else { Duration::ZERO };
    if !server.is_finished() && tokio::time::timeout(drain, &mut server).await.is_err() {
        if outcome.is_ok() {
            warn!("connections did not close within 5 s; closing them");
        }
        server.abort();
    }
    if let Some(s) = peer_server {
        s.abort();
    }
    leader_loops.abort();
    if let Err(e) = raft.shutdown().await {
        if outcome.is_ok() {
            let e = with_free_space(e, &node.cfg.data_dir);
            error!(error = %e, "stopping raft failed");
            outcome = Err(ServerError::Fatal(e));
        }
    }
    if outcome.is_err() {
        // After a storage error sled's handles must never be dropped: dropping the last one
        // flushes, and sled 0.34 waits forever for a flush after an IO error (a node with a
        // full disk used to hang here, deaf to SIGTERM). The process exits right after this
        // returns (see `main`); everything acknowledged is already durable in the Raft log.
        std::mem::forget(node);
        std::mem::forget(raft);
    }
    info!("stopped");
    outcome
}

/// `e` with the free space of the data directory's filesystem, which tells a full disk from
/// a failing one.
fn with_free_space(e: String, data_dir: &std::path::Path) -> String {
    match crate::disk::statvfs(data_dir) {
        Ok((free, _)) => {
            format!("{e} ({} free on {})", crate::disk::format_bytes(free), data_dir.display())
        }
        Err(s) => format!("{e} (free space of {} unknown: {s})", data_dir.display()),
    }
}

type Served = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

type Layers = tower::layer::util::Stack<
    crate::limits::LimitsLayer,
    tower::layer::util::Stack<
        crate::rpc_metrics::RpcMetricsLayer,
        tower::layer::util::Stack<AuthLayer, tower::layer::util::Identity>,
    >,
>;

/// Serve `router` on the connections of `incoming` ([`crate::conn`]) until `shutdown`.
fn serve(
    router: tonic::transport::server::Router<Layers>,
    incoming: tokio_stream::wrappers::ReceiverStream<Result<crate::conn::Conn, std::io::Error>>,
    shutdown: Shutdown,
) -> Served {
    tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
}

fn server_stopped(
    r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> String {
    match r {
        Ok(Ok(())) => "server stopped".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    }
}

/// The longest a change of readiness that no role or leader change announces (a leader losing
/// its quorum, a follower whose leader went quiet) waits before gRPC health reports it.
pub const READINESS_INTERVAL: Duration = Duration::from_millis(100);

/// The services whose gRPC health follows readiness; `""` is the server as a whole.
const HEALTH_SERVICES: [&str; 4] = [
    "",
    <TasksServer<TasksApi> as NamedService>::NAME,
    <WorkersServer<WorkersApi> as NamedService>::NAME,
    <ClusterServer<ClusterApi> as NamedService>::NAME,
];

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Keep gRPC health in step with readiness until Raft stops (see the module docs).
async fn follow_readiness(node: Arc<Node>, health: HealthReporter) {
    let mut changes = node.raft.raft().server_metrics();
    let mut serving = false;
    loop {
        let r = node.raft.readiness().await;
        if r.is_ok() != serving {
            serving = r.is_ok();
            let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
            set_health(&health, status).await;
            match r {
                Ok(why) => info!(node_id = node.raft.id(), %why, "ready: grpc health serving"),
                Err(why) => {
                    info!(node_id = node.raft.id(), %why, "not ready: grpc health not serving")
                }
            }
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    set_health(&health, ServingStatus::NotServing).await;
                    return;
                }
            }
            _ = tokio::time::sleep(READINESS_INTERVAL) => {}
        }
    }
}
