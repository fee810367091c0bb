//! Test harness: real `schedulerd` processes on loopback (the `client::local` harness), raw
//! gRPC clients, workers on the library runtime that record which reports were accepted, and
//! one raw-protocol worker for the misbehaviour the runtime never commits.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[allow(unused_imports)]
pub use client::local::wait_until;
use client::local::{LocalCluster, LocalClusterOptions, Security};
use client::worker::{
    Job, Outcome, ReportAnswer, ReportKind, StopSignal, Worker, WorkerConfig, WorkerEvent,
    WorkerHandle,
};
use proto::pb;
use proto::pb::tasks_client::TasksClient;
use proto::pb::workers_client::WorkersClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A cluster of the harness with raw gRPC clients on top. When a test panics, the end of
/// every node log is printed.
pub struct Cluster {
    pub local: LocalCluster,
}

impl Deref for Cluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.local
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.local
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.local.kill_all();
        if std::thread::panicking() {
            eprint!("{}", self.local.log_tails(40));
        }
    }
}

/// The credentials of this test binary's secure clusters, once [`Cluster::start_secure`]
/// ran: every cluster it starts shares one development CA, node certificate and token file.
static SECURE: std::sync::OnceLock<(tempfile::TempDir, Security)> = std::sync::OnceLock::new();

fn security() -> Option<&'static Security> {
    SECURE.get().map(|(_, s)| s)
}

/// The channel type the raw clients use: a connection plus the admin bearer token (when the
/// binary's clusters are secure).
pub type Ch = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <secret>` to every request (nothing when `None`).
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(proto::auth::AUTHORIZATION_KEY, v.clone());
        }
        Ok(req)
    }
}

/// A raw channel to `addr`. On a secure cluster it speaks TLS and presents the node
/// certificate — a member's credentials, so peer RPCs get past the certificate check and
/// meet the checks a buggy or compromised member would — and carries the admin token.
pub async fn channel(addr: &str) -> Ch {
    let Some(sec) = security() else {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        return InterceptedService::new(ch, Bearer(None));
    };
    let read = |p: &std::path::Path| std::fs::read(p).expect("credentials of the test CA");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&sec.pki.ca)))
        .identity(Identity::from_pem(read(&sec.pki.cert), read(&sec.pki.key)))
        .domain_name("127.0.0.1");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let secret = sec.secret("admin").expect("an admin token");
    InterceptedService::new(ch, Bearer(Some(format!("Bearer {secret}").parse().unwrap())))
}

/// A library client for `addrs`, with the admin token and the CA on a secure cluster.
pub fn library_client(addrs: Vec<String>) -> client::Client {
    match security() {
        Some(sec) => client::Client::with_config(sec.client_config(&addrs, Some("admin"))),
        None => client::Client::new(addrs),
    }
    .expect("valid endpoints")
}

impl Cluster {
    /// Start `n` nodes (with HTTP ports) with extra flags, initialize the cluster, wait for a
    /// leader and for every node to be reachable (a node that failed to start would make
    /// fault tests meaningless: killing the leader would leave no quorum).
    pub async fn start(n: u64, extra: &[&str]) -> Cluster {
        let mut opts = LocalClusterOptions::new(env!("CARGO_BIN_EXE_schedulerd"), n)
            .args(extra.iter().copied())
            .env("SCHED_LOG", "info,openraft=warn")
            .http(true);
        if let Some(sec) = security() {
            opts = opts.with_security(sec.clone());
        }
        let mut c = Cluster { local: LocalCluster::prepare(opts).expect("cluster layout") };
        if let Err(e) = c.local.start_all().await {
            panic!("starting the cluster: {e}");
        }
        c
    }

    /// [`Cluster::start`] with TLS, peer certificates and tokens; from the first call on,
    /// every cluster and raw channel of this test binary is secure (use it for all tests of
    /// a binary, or none).
    pub async fn start_secure(n: u64, extra: &[&str]) -> Cluster {
        SECURE.get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let sec = Security::create(dir.path(), &[]).expect("development credentials");
            (dir, sec)
        });
        Cluster::start(n, extra).await
    }

    pub fn addrs(&self) -> Vec<String> {
        self.local.endpoints()
    }

    pub async fn wait_leader(&self) -> usize {
        self.local.wait_leader(Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn restart(&mut self, i: usize) {
        self.local.start_node(i).unwrap_or_else(|e| panic!("{e}"));
    }

    pub async fn tasks(&self, i: usize) -> TasksClient<Ch> {
        TasksClient::new(channel(&self.nodes[i].addr).await)
    }

    pub async fn workers(&self, i: usize) -> WorkersClient<Ch> {
        WorkersClient::new(channel(&self.nodes[i].addr).await)
    }
}

/// Retry an RPC on UNAVAILABLE across the given endpoints (the same request each time).
pub async fn retry<T, F, Fut>(addrs: &[String], mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut(Ch) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let ch = channel(&addrs[i % addrs.len()]).await;
        match f(ch).await {
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                ) && tokio::time::Instant::now() < deadline =>
            {
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// Submits `tasks` as one batch (retrying on UNAVAILABLE across `addrs`); their ids in order.
pub async fn submit(addrs: &[String], tasks: Vec<pb::TaskSpec>) -> Vec<u64> {
    submit_batch(addrs, tasks).await.tasks.iter().map(|t| t.id).collect()
}

/// [`submit`], answering the whole response (ids, log index).
pub async fn submit_batch(addrs: &[String], tasks: Vec<pb::TaskSpec>) -> pb::SubmitTasksResponse {
    retry(addrs, |ch| {
        let tasks = tasks.clone();
        async move {
            TasksClient::new(ch)
                .submit_tasks(pb::SubmitTasksRequest { tasks })
                .await
                .map(|r| r.into_inner())
        }
    })
    .await
    .expect("submit")
}

pub fn spec(name: &str, priority: i32) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.into(),
        priority,
        idempotency_key: format!("key-{name}"),
        ..Default::default()
    }
}

/// What an in-test worker's completion report got.
#[derive(Clone, Debug)]
pub struct Exec {
    pub task: u64,
    pub fence: u64,
    /// The server accepted the completion (not a duplicate answer).
    pub accepted: bool,
    /// The server refused it (stale fence etc.): the code's reason.
    pub refused: Option<String>,
}

/// A worker on the library runtime (`client::worker`, what users run) with `slots` slots on
/// queue `default`; each task "runs" for a fixed time and succeeds. It records the answer to
/// every completion report.
pub struct TestWorker {
    pub id: String,
    pub execs: Arc<Mutex<Vec<Exec>>>,
    handle: Option<WorkerHandle>,
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

impl TestWorker {
    pub fn spawn(addrs: Vec<String>, id: &str, slots: u32, run: Duration) -> TestWorker {
        let execs = Arc::new(Mutex::new(Vec::new()));
        let client = library_client(addrs);
        let mut config = WorkerConfig::new(id);
        config.slots = slots;
        config.capacity =
            pb::Resources { cpu_milli: 8_000, memory_mib: 8_192, named: Default::default() };
        let handler = move |_job: Job, mut stop: StopSignal| async move {
            tokio::select! {
                _ = tokio::time::sleep(run) => Outcome::Succeeded(b"done".to_vec()),
                r = stop.stopped() => Outcome::Failed { message: format!("stopped: {r}"), retryable: true },
            }
        };
        let log = execs.clone();
        // Completions whose send got no answer: if a resend is then answered "duplicate",
        // the unanswered send was the one applied, so that answer is this worker's acceptance.
        let unanswered = Mutex::new(std::collections::HashSet::new());
        let handle = Worker::new(client, config, handler)
            .on_event(move |e| {
                let WorkerEvent::ReportAnswered { task, fence, kind, answer } = e else { return };
                if *kind != ReportKind::Succeeded {
                    return;
                }
                let (accepted, refused) = match answer {
                    ReportAnswer::Accepted { duplicate: false } => (true, None),
                    ReportAnswer::Accepted { duplicate: true } => {
                        (unanswered.lock().unwrap().remove(&(*task, *fence)), None)
                    }
                    ReportAnswer::Rejected { error, .. } => (false, Some(error.clone())),
                    ReportAnswer::Unknown { .. } => {
                        unanswered.lock().unwrap().insert((*task, *fence));
                        return;
                    }
                };
                log.lock().unwrap().push(Exec { task: *task, fence: *fence, accepted, refused });
            })
            .start();
        TestWorker { id: id.to_string(), execs, handle: Some(handle) }
    }

    pub fn accepted(&self) -> Vec<u64> {
        self.execs.lock().unwrap().iter().filter(|e| e.accepted).map(|e| e.task).collect()
    }
}

/// A worker that speaks the raw protocol on purpose, to do what the library runtime never
/// does: keep a task after it stopped heartbeating, and report that task's completion long
/// after its session expired (the runtime would notice the lost session and drop the report).
pub struct SilentWorker {
    addrs: Vec<String>,
    id: String,
    heartbeat: Arc<AtomicBool>,
    heartbeats: tokio::task::JoinHandle<()>,
    stream: tonic::Streaming<pb::WorkerMessage>,
}

impl Drop for SilentWorker {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl SilentWorker {
    /// Registers, heartbeats every 150 ms, and opens the assignment stream.
    pub async fn register(addrs: &[String], id: &str) -> SilentWorker {
        let spec = pb::WorkerSpec {
            id: id.into(),
            queues: vec!["default".into()],
            capacity: Some(pb::Resources {
                cpu_milli: 8_000,
                memory_mib: 8_192,
                ..Default::default()
            }),
            slots: 1,
            ..Default::default()
        };
        let instance = rand_u64();
        let reg = retry(addrs, |ch| {
            let spec = spec.clone();
            async move {
                WorkersClient::new(ch)
                    .register_worker(pb::RegisterWorkerRequest { worker: Some(spec), instance })
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
        .expect("register");
        let session = reg.session;
        let heartbeat = Arc::new(AtomicBool::new(true));
        let heartbeats = {
            let (addrs, id, heartbeat) = (addrs.to_vec(), id.to_string(), heartbeat.clone());
            tokio::spawn(async move {
                while heartbeat.load(Ordering::SeqCst) {
                    let id = id.clone();
                    let _ = retry(&addrs, |ch| {
                        let id = id.clone();
                        async move {
                            WorkersClient::new(ch)
                                .heartbeat(pb::HeartbeatRequest { worker_id: id, session })
                                .await
                        }
                    })
                    .await;
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            })
        };
        let stream = retry(addrs, |ch| {
            let id = id.to_string();
            async move {
                WorkersClient::new(ch)
                    .open_assignments(pb::OpenAssignmentsRequest { worker_id: id, session })
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await
        .expect("open the assignment stream");
        SilentWorker { addrs: addrs.to_vec(), id: id.into(), heartbeat, heartbeats, stream }
    }

    /// The next assignment on the stream (within 30 s).
    pub async fn next_assignment(&mut self) -> pb::Assignment {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.message())
                .await
                .expect("an assignment within 30 s")
                .expect("the assignment stream")
                .expect("the assignment stream ended");
            if let Some(pb::worker_message::Msg::Assignment(a)) = msg.msg {
                return a;
            }
        }
    }

    /// Stops heartbeating: the session expires after its TTL.
    pub fn go_silent(&self) {
        self.heartbeat.store(false, Ordering::SeqCst);
    }

    /// Reports the attempt's success now, whatever became of the session.
    pub async fn report_success(&self, task: u64, fence: u64) -> Exec {
        let r = retry(&self.addrs, |ch| {
            let id = self.id.clone();
            async move {
                WorkersClient::new(ch)
                    .report(pb::ReportRequest {
                        worker_id: id,
                        reports: vec![pb::TaskReport {
                            task,
                            fence,
                            outcome: Some(pb::task_report::Outcome::Succeeded(pb::Succeeded {
                                result: b"done".to_vec(),
                            })),
                        }],
                    })
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .await;
        let (accepted, refused) = match r {
            Ok(resp) => {
                let x = &resp.results[0];
                (x.accepted && !x.duplicate, (!x.accepted).then(|| x.error.clone()))
            }
            Err(s) => (false, Some(s.message().to_string())),
        };
        Exec { task, fence, accepted, refused }
    }
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos(),
    );
    h.finish()
}

/// Every event batch from index 1 on, read from one node's event stream until `done` holds.
pub async fn events_until(
    addr: &str,
    mut done: impl FnMut(&[pb::EventBatch]) -> bool,
) -> Vec<pb::EventBatch> {
    let mut out = Vec::new();
    let mut client = TasksClient::new(channel(addr).await);
    let mut stream =
        client.watch_events(pb::WatchEventsRequest { from_index: 1 }).await.unwrap().into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&out) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(b))) => out.push(b),
            other => panic!("event stream ended early: {other:?}"),
        }
    }
    out
}

/// The final state of every task, by id.
pub async fn all_tasks(addrs: &[String]) -> BTreeMap<u64, pb::Task> {
    let r = retry(addrs, |ch| async move {
        TasksClient::new(ch)
            .list_tasks(pb::ListTasksRequest { limit: 1000, ..Default::default() })
            .await
            .map(|r| r.into_inner())
    })
    .await
    .unwrap();
    r.tasks.into_iter().map(|t| (t.id, t)).collect()
}

pub fn state(t: &pb::Task) -> &'static str {
    proto::convert::state_name(t.state)
}

/// `GET path` on an HTTP address: (status code, body), or None if it did not answer within
/// 5 s. HTTP/1.0, so the body is not chunked and the server closes after it.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), io).await.ok()?.ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((code, body))
}

/// `promtool check metrics` finds nothing in `page` (skipped loudly without promtool).
pub fn promtool_check(page: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!(
            "\n!!!!!!!! SKIPPED promtool check: promtool is not installed \
             (apt-get install -y prometheus; .ci/run does this) !!!!!!!!\n"
        );
        return;
    };
    child.stdin.take().unwrap().write_all(page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let findings =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && findings.trim().is_empty(), "promtool: {findings}\n{page}");
}
