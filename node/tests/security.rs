//! The trust boundary end to end: real nodes with TLS (development CA) and a token file.
//! Roles are enforced on every path a user has (directly and through a follower), fencing
//! tokens are hidden from callers that may not use them, peer RPCs need a node certificate,
//! and bad certificates fail the handshake. Refusals change nothing and kill no node.

use std::time::Duration;

use client::local::{LocalCluster, LocalClusterOptions, Security};
use client::pki::{DevCa, TokenSpec};
use client::worker::{Job, Outcome, StopSignal, Worker, WorkerConfig};
use client::{Client, ClientConfig};
use proto::internal::v1 as ipb;
use proto::internal::v1::peer_service_client::PeerServiceClient;
use proto::pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// Prints the node logs when a test fails.
struct Logs<'a>(&'a LocalCluster);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.log_tails(40));
        }
    }
}

async fn secure_cluster(n: u64) -> LocalCluster {
    let mut gpu = TokenSpec::new("gpu-pool", "worker");
    gpu.worker_id_prefix = Some("gpu-".into());
    let mut gpu2 = TokenSpec::new("gpu-other", "worker");
    gpu2.worker_id_prefix = Some("gpu-".into());
    let opts = LocalClusterOptions::new(env!("CARGO_BIN_EXE_schedulerd"), n)
        .env("SCHED_LOG", "info,openraft=warn")
        .http(true)
        .secure([TokenSpec::new("ci", "submitter"), TokenSpec::new("dash", "reader"), gpu, gpu2]);
    LocalCluster::start(opts).await.expect("a secure cluster starts")
}

fn client(sec: &Security, endpoints: &[String], token: Option<&str>) -> Client {
    let mut c = sec.client_config(endpoints, token);
    c.retry_budget = Duration::from_secs(20);
    c.fail_fast_when_refused = true;
    Client::with_config(c).unwrap()
}

/// A one-slot worker on the default queue registering as `id`.
fn registration(id: &str, instance: u64) -> pb::RegisterWorkerRequest {
    let worker = pb::WorkerSpec {
        id: id.into(),
        queues: vec!["default".into()],
        slots: 1,
        ..Default::default()
    };
    pb::RegisterWorkerRequest { worker: Some(worker), instance }
}

fn spec(name: &str) -> pb::TaskSpec {
    pb::TaskSpec { name: name.into(), idempotency_key: format!("k-{name}"), ..Default::default() }
}

async fn all_alive(c: &mut LocalCluster) {
    for i in 0..c.nodes.len() {
        assert!(c.nodes[i].is_running(), "node {} died", c.nodes[i].id);
        c.wait_serving(i, Duration::from_secs(10)).await.expect("still serving");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_are_enforced_and_fences_hidden_on_a_tls_cluster() {
    let mut c = secure_cluster(3).await;
    let logs = Logs(&c);
    let sec = c.security().unwrap().clone();
    let all = c.endpoints();
    let leader = c.wait_leader(Duration::from_secs(30)).await.unwrap();
    let follower = (leader + 1) % 3;
    let via_follower = vec![c.nodes[follower].addr.clone()];

    // A submitter submits, also through a follower (forwarded to the leader).
    let ci = client(&sec, &via_follower, Some("ci"));
    let id = ci.submit(spec("a")).await.expect("a submitter may submit").id;

    // No token, an unknown token, the wrong role: refused, nothing added.
    let e = client(&sec, &all, None).submit(spec("b")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let mut bogus = sec.client_config(&all, None);
    bogus.token = Some("not-a-token".into());
    let e = Client::with_config(bogus).unwrap().list_tasks(Default::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let dash = client(&sec, &all, Some("dash"));
    let e = dash.submit(spec("c")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("submitter"), "names the role needed: {e}");
    let e = dash.cancel(id, "no").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let admin = client(&sec, &all, Some("admin"));
    let listed = admin.list_all_tasks(Default::default(), 1000).await.unwrap();
    assert_eq!(listed.len(), 1, "refused requests added nothing: {listed:?}");

    // A worker token runs workers only under its prefix; one that strays is refused.
    let gpu = client(&sec, &all, Some("gpu-pool"));
    let stray = registration("cpu-1", 1);
    let e = gpu.register_worker(stray).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("gpu-"), "{e}");
    let e = client(&sec, &all, Some("ci")).list_workers(false).await;
    assert!(e.is_ok(), "a submitter reads the worker list");

    // While the task is held, only the admin and the holder's token see its fencing token.
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let handler = move |_job: Job, mut stop: StopSignal| {
        let mut release = release_rx.clone();
        async move {
            tokio::select! {
                _ = release.wait_for(|r| *r) => Outcome::Succeeded(b"done".to_vec()),
                r = stop.stopped() => Outcome::Failed { message: r.to_string(), retryable: true },
            }
        }
    };
    let worker = Worker::new(gpu.clone(), WorkerConfig::new("gpu-1"), handler).start();
    let held =
        client::local::wait_until("the task to be held", Duration::from_secs(30), || async {
            admin.get_task(id).await.ok().filter(|t| t.worker == "gpu-1" && t.fence != 0)
        })
        .await
        .unwrap();
    let seen_by_reader = dash.get_task(id).await.unwrap();
    assert_eq!(seen_by_reader.fence, 0, "a reader does not see the fence");
    assert_eq!(seen_by_reader.worker, "gpu-1", "holder names stay visible");
    let listed = dash.list_all_tasks(Default::default(), 1000).await.unwrap();
    assert!(listed.iter().all(|t| t.fence == 0), "{listed:?}");
    let explained = dash.explain_task(id).await.unwrap();
    assert_eq!(explained.fence, 0);
    assert!(!explained.summary.contains("fence"), "{}", explained.summary);
    assert_eq!(gpu.get_task(id).await.unwrap().fence, held.fence, "the holder's token sees it");

    // A forged completion with a guessed fence from a token that may not act for gpu-1.
    let forged = pb::ReportRequest {
        worker_id: "gpu-1".into(),
        reports: vec![pb::TaskReport {
            task: id,
            fence: held.fence,
            outcome: Some(pb::task_report::Outcome::Succeeded(pb::Succeeded { result: vec![] })),
        }],
    };
    let e = client(&sec, &all, Some("ci")).report(forged.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // Nor from another worker token allowed the same prefix: the live session is bound to
    // the token that opened it, for reports and for take-overs by re-registering.
    let other = client(&sec, &all, Some("gpu-other"));
    let e = other.report(forged).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let takeover = registration("gpu-1", 99);
    let e = other.register_worker(takeover).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let after = admin.get_task(id).await.unwrap();
    assert_ne!(after.state, pb::TaskState::Succeeded as i32, "the forgery changed nothing");
    assert_eq!((after.fence, after.worker.as_str()), (held.fence, "gpu-1"));

    // The real worker finishes it.
    release_tx.send(true).unwrap();
    let done = admin.wait_task(id).await.unwrap();
    assert_eq!(done.state, pb::TaskState::Succeeded as i32);
    worker.abort();

    // Admin requests through a follower carry the caller's token to the leader.
    let to = c.nodes[follower].id;
    let e = client(&sec, &via_follower, Some("ci")).transfer_leader(to).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let new_leader = client(&sec, &via_follower, Some("admin")).transfer_leader(to).await;
    assert_eq!(new_leader.expect("an admin may transfer leadership"), to);

    // /metrics needs a reader token; probes stay open.
    let http = c.nodes[0].http.clone().unwrap();
    assert!(https_get(&sec, &http, "/healthz", None).await.starts_with("HTTP/1.1 200"));
    assert!(https_get(&sec, &http, "/metrics", None).await.starts_with("HTTP/1.1 401"));
    let reader = sec.secret("dash").unwrap();
    let ok = https_get(&sec, &http, "/metrics", Some(reader)).await;
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("# TYPE"),
        "{}",
        &ok[..ok.len().min(200)]
    );
    let worker_secret = sec.secret("gpu-pool").unwrap();
    assert!(https_get(&sec, &http, "/metrics", Some(worker_secret))
        .await
        .starts_with("HTTP/1.1 403"));

    drop(logs);
    all_alive(&mut c).await;
}

/// One HTTP/1.1 GET over TLS (verified against the cluster CA); the whole response.
async fn https_get(sec: &Security, addr: &str, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = std::fs::read(&sec.pki.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    // Offer what curl and Prometheus offer; the server must pick HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake with the HTTP port");
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tls.read_to_string(&mut out).await.unwrap_or_default();
    out
}

use rustls_pki_types::pem::PemObject;

/// A channel to `addr` over TLS trusting `ca`, presenting `identity` (if any), verifying the
/// server for `name`.
fn tls_channel(
    addr: &str,
    ca: &str,
    identity: Option<(&str, &str)>,
    name: &str,
) -> tonic::transport::Channel {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name(name);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect_lazy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_rpcs_need_a_node_certificate_and_bad_certificates_fail() {
    let mut c = secure_cluster(3).await;
    let logs = Logs(&c);
    let sec = c.security().unwrap().clone();
    let all = c.endpoints();
    let admin = client(&sec, &all, Some("admin"));
    let id = admin.submit(spec("keep")).await.unwrap().id;
    let addr = c.nodes[0].addr.clone();
    let ca = std::fs::read_to_string(&sec.pki.ca).unwrap();
    let node_cert = std::fs::read_to_string(&sec.pki.cert).unwrap();
    let node_key = std::fs::read_to_string(&sec.pki.key).unwrap();

    // A forged internal Forward (it once carried a purge) without a node certificate: refused
    // before anything is decoded.
    let forward = ipb::ForwardRequest { op: b"garbage".to_vec(), ..Default::default() };
    let mut anon = PeerServiceClient::new(tls_channel(&addr, &ca, None, "127.0.0.1"));
    let s = anon.forward(forward.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // A client certificate from the cluster CA is not a node certificate.
    let client_cert = sec.ca.as_ref().unwrap().client_cert("intruder", 30).unwrap();
    let mut intruder = PeerServiceClient::new(tls_channel(
        &addr,
        &ca,
        Some((&client_cert.cert_pem, &client_cert.key_pem)),
        "127.0.0.1",
    ));
    let s = intruder.forward(forward.clone()).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    // A certificate of another CA, or an expired node certificate of ours, fails the handshake.
    for (what, cert) in [
        ("another CA", DevCa::new("other").unwrap().node_cert(&[], 30).unwrap()),
        ("expired", sec.ca.as_ref().unwrap().node_cert(&[], -1).unwrap()),
    ] {
        let mut bad = PeerServiceClient::new(tls_channel(
            &addr,
            &ca,
            Some((&cert.cert_pem, &cert.key_pem)),
            client::pki::PEER_NAME,
        ));
        let s = bad.node_status(ipb::NodeStatusRequest { digest: false }).await.unwrap_err();
        // No answer from the server (no reason metadata): the connection was refused.
        assert!(
            matches!(s.code(), Code::Unavailable | Code::Cancelled | Code::Unknown)
                && s.metadata().get(proto::status::REASON_KEY).is_none(),
            "{what}: the handshake fails: {s:?}"
        );
    }
    // The node certificate works (node-to-node status).
    let mut peer = PeerServiceClient::new(tls_channel(
        &addr,
        &ca,
        Some((&node_cert, &node_key)),
        client::pki::PEER_NAME,
    ));
    peer.node_status(ipb::NodeStatusRequest { digest: false }).await.expect("a node may ask");

    // Plaintext on the TLS port gets no answer; a client trusting another CA fails.
    let plain = Client::with_config(ClientConfig {
        retry_budget: Duration::ZERO,
        fail_fast_when_refused: true,
        token: sec.secret("admin").map(str::to_string),
        ..ClientConfig::new([addr.clone()])
    })
    .unwrap();
    let e = plain.get_task(id).await.unwrap_err();
    assert!(e.to_string().contains("--ca-cert"), "plaintext is not served, and says why: {e}");
    let elsewhere = tempfile::tempdir().unwrap();
    let other_ca = DevCa::new("elsewhere").unwrap();
    let other_ca_file = elsewhere.path().join("ca.pem");
    std::fs::write(&other_ca_file, other_ca.cert_pem()).unwrap();
    let mut wrong = sec.client_config(std::slice::from_ref(&addr), Some("admin"));
    wrong.ca_cert = Some(other_ca_file);
    wrong.retry_budget = Duration::ZERO;
    assert!(
        Client::with_config(wrong).unwrap().get_task(id).await.is_err(),
        "the server is not trusted"
    );

    drop(logs);
    all_alive(&mut c).await;
    assert_eq!(admin.get_task(id).await.unwrap().id, id, "refusals changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_sighup_and_on_file_change_and_expired_ones_fail() {
    let mut c = secure_cluster(1).await;
    let logs = Logs(&c);
    let sec = c.security().unwrap().clone();
    let addr = c.nodes[0].addr.clone();
    let fresh = |sec: &Security| {
        let mut cfg = sec.client_config(std::slice::from_ref(&addr), Some("admin"));
        cfg.retry_budget = Duration::ZERO;
        Client::with_config(cfg).unwrap()
    };
    fresh(&sec).cluster_status().await.expect("serves with the first certificate");

    // Swap in an expired node certificate of a new CA and the new CA as the trusted one.
    let ca2 = DevCa::new("rotated").unwrap();
    let expired = ca2.node_cert(&[], -1).unwrap();
    let keep = (
        std::fs::read(&sec.pki.cert).unwrap(),
        std::fs::read(&sec.pki.key).unwrap(),
        std::fs::read(&sec.pki.ca).unwrap(),
    );
    std::fs::write(&sec.pki.cert, &expired.cert_pem).unwrap();
    std::fs::write(&sec.pki.key, &expired.key_pem).unwrap();
    std::fs::write(&sec.pki.ca, ca2.cert_pem()).unwrap();
    let pid = c.nodes[0].pid().unwrap();
    let hup = || {
        // SAFETY: signalling the node process this test's harness started and still owns.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "SIGHUP delivered");
    };
    hup();
    client::local::wait_until(
        "new connections to fail on the expired certificate",
        Duration::from_secs(20),
        || async { fresh(&sec).cluster_status().await.is_err() },
    )
    .await
    .unwrap();

    // A valid certificate of the new CA: served again, verified against the new CA.
    let valid = ca2.node_cert(&[], 30).unwrap();
    std::fs::write(&sec.pki.cert, &valid.cert_pem).unwrap();
    std::fs::write(&sec.pki.key, &valid.key_pem).unwrap();
    hup();
    client::local::wait_until(
        "the rotated certificate to be served",
        Duration::from_secs(20),
        || async { fresh(&sec).cluster_status().await.is_ok() },
    )
    .await
    .unwrap();
    // The original files back, and no signal: the node notices the change by itself.
    std::fs::write(&sec.pki.cert, keep.0).unwrap();
    std::fs::write(&sec.pki.key, keep.1).unwrap();
    std::fs::write(&sec.pki.ca, keep.2).unwrap();
    client::local::wait_until(
        "the original certificate to be served again after a file change",
        Duration::from_secs(30),
        || async { fresh(&sec).cluster_status().await.is_ok() },
    )
    .await
    .unwrap();
    drop(logs);
    all_alive(&mut c).await;
}

/// A client holding the raw secret `secret`.
fn client_with_secret(sec: &Security, endpoints: &[String], secret: &str) -> Client {
    let mut c = sec.client_config(endpoints, None);
    c.token = Some(secret.to_string());
    c.retry_budget = Duration::from_secs(20);
    c.fail_fast_when_refused = true;
    Client::with_config(c).unwrap()
}

/// Waits (bounded) until `client` is refused as UNAUTHENTICATED.
async fn until_unauthenticated(what: &str, client: &Client) {
    client::local::wait_until(what, Duration::from_secs(20), || async {
        match client.list_workers(false).await {
            Err(e) if e.code() == Code::Unauthenticated => Some(()),
            _ => None,
        }
    })
    .await
    .unwrap();
}

fn create_req(name: &str, role: &str, secret: &str, ttl_ms: u64) -> pb::CreateTokenRequest {
    pb::CreateTokenRequest {
        name: name.into(),
        role: role.into(),
        secret_sha256: proto::auth::secret_digest_hex(secret),
        worker_id_prefix: String::new(),
        ttl_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicated_tokens_are_created_listed_expired_and_revoked_on_every_node() {
    let mut c = secure_cluster(3).await;
    let logs = Logs(&c);
    let sec = c.security().unwrap().clone();
    let all = c.endpoints();
    let admin = client(&sec, &all, Some("admin"));

    // Only an admin creates tokens; a submitter is refused and nothing is stored.
    let e = client(&sec, &all, Some("ci"))
        .create_token(create_req("sneaky", "admin", "s3cret-sneaky", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // Created through a follower; a retry of the same create is the same token.
    let leader = c.wait_leader(Duration::from_secs(30)).await.unwrap();
    let via_follower = vec![c.nodes[(leader + 1) % 3].addr.clone()];
    let admin_f = client(&sec, &via_follower, Some("admin"));
    let r = admin_f.create_token(create_req("ci-2", "submitter", "secret-ci-2", 0)).await.unwrap();
    assert!(r.created);
    let r = admin_f.create_token(create_req("ci-2", "submitter", "secret-ci-2", 0)).await.unwrap();
    assert!(!r.created, "a retried create is idempotent");
    let e = admin.create_token(create_req("ci-2", "admin", "other", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = admin.create_token(create_req("ci", "reader", "other", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "a token file name cannot be shadowed: {e}");
    let e = admin.create_token(create_req("bad name", "reader", "x", 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("name"), "{e}");
    let e = admin.create_token(create_req("r", "root", "x", 0)).await.unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("role"), "{e}");

    // The new token works on every node (replicated), with its role and no more.
    for n in &c.nodes {
        let one = client_with_secret(&sec, std::slice::from_ref(&n.addr), "secret-ci-2");
        client::local::wait_until("the token to reach the node", Duration::from_secs(20), || {
            let one = one.clone();
            async move { one.submit(spec("via-new-token")).await.ok() }
        })
        .await
        .unwrap();
        let e = one.trigger_snapshot().await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    }

    // Listing names roles and sources, never a secret or digest.
    let listed = admin.list_tokens().await.unwrap();
    let ci2 = listed.iter().find(|t| t.name == "ci-2").expect("listed");
    assert_eq!(
        (ci2.role.as_str(), ci2.source.as_str(), ci2.expired),
        ("submitter", "replicated", false)
    );
    assert!(listed.iter().any(|t| t.name == "admin" && t.source == "file"));
    let text = format!("{listed:?}");
    assert!(
        !text.contains("secret-ci-2")
            && !text.contains(&proto::auth::secret_digest_hex("secret-ci-2"))
    );

    // A token with a short lifetime stops working once it expired.
    admin.create_token(create_req("brief", "reader", "secret-brief", 1_000)).await.unwrap();
    let brief = client_with_secret(&sec, &all, "secret-brief");
    until_unauthenticated("the short-lived token to expire", &brief).await;

    // Revoked: refused by every node; revoking a file token or an unknown one is refused.
    admin.revoke_token("ci-2").await.unwrap();
    for n in &c.nodes {
        let one = client_with_secret(&sec, std::slice::from_ref(&n.addr), "secret-ci-2");
        until_unauthenticated("the revocation to reach the node", &one).await;
    }
    let e = admin.revoke_token("ci-2").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = admin.revoke_token("ci").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("token file"), "{e}");

    // Tokens are replicated state: they survive a restart of every node.
    admin.create_token(create_req("kept", "reader", "secret-kept", 0)).await.unwrap();
    drop(logs);
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.start_node(i).unwrap();
    }
    let logs = Logs(&c);
    let kept = client_with_secret(&sec, &all, "secret-kept");
    client::local::wait_until("the kept token after a restart", Duration::from_secs(30), || {
        let kept = kept.clone();
        async move { kept.list_workers(false).await.ok() }
    })
    .await
    .unwrap();
    drop(logs);
    all_alive(&mut c).await;
}

/// `--peer-listen`: Raft and peer RPCs move to a port of their own (mutual TLS there), the
/// client port stops routing them, and everything that crosses nodes — forwarding, status,
/// elections after a leader SIGKILL, leader transfer, a learner joining with its own peer
/// port — goes over the peer ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_port_carries_every_node_to_node_rpc_and_the_client_port_none() {
    use client::local::NodeOptions;
    use proto::internal::v1::raft_service_client::RaftServiceClient;
    use proto::pb::tasks_client::TasksClient;

    let opts = LocalClusterOptions::new(env!("CARGO_BIN_EXE_schedulerd"), 3)
        .env("SCHED_LOG", "info,openraft=warn")
        .peer_ports(true)
        .secure([TokenSpec::new("ci", "submitter")]);
    let mut c = LocalCluster::start(opts).await.expect("a cluster with peer ports starts");
    let sec = c.security().unwrap().clone();
    let ca = std::fs::read_to_string(&sec.pki.ca).unwrap();
    let node_cert = std::fs::read_to_string(&sec.pki.cert).unwrap();
    let node_key = std::fs::read_to_string(&sec.pki.key).unwrap();
    let node_identity = Some((node_cert.as_str(), node_key.as_str()));
    let admin = client(&sec, &c.endpoints(), Some("admin"));

    // Membership records both addresses, and the status calls (over peer ports) reach all.
    let st = admin.cluster_status().await.unwrap();
    for n in &c.nodes {
        let s = st.nodes.iter().find(|s| s.id == n.id).expect("every node listed");
        assert_eq!(s.addr, n.addr);
        assert_eq!(Some(&s.peer_addr), n.peer_addr.as_ref());
        assert!(s.reachable, "node {} reachable over its peer port: {}", n.id, s.error);
    }
    // Writes through every node, followers forwarding to the leader's peer port.
    let mut ids = Vec::new();
    for n in &c.nodes {
        let one = client(&sec, std::slice::from_ref(&n.addr), Some("admin"));
        ids.push(one.submit(spec(&format!("via-{}", n.id))).await.expect("a write").id);
    }

    // The client port no longer routes internal services, even for a node certificate.
    let on_client_port = tls_channel(&c.nodes[0].addr, &ca, node_identity, client::pki::PEER_NAME);
    let s = PeerServiceClient::new(on_client_port.clone())
        .node_status(ipb::NodeStatusRequest { digest: false })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    let vote = ipb::RaftRequest { version: raft::network::codec::VERSION, data: vec![] };
    let s = RaftServiceClient::new(on_client_port).vote(vote).await.unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");
    // The peer port serves nodes only: no certificate is refused, and client services are
    // not there even with an admin token.
    let peer_addr = c.nodes[0].peer_addr.clone().expect("a peer port");
    let anon = tls_channel(&peer_addr, &ca, None, "127.0.0.1");
    let s = PeerServiceClient::new(anon)
        .node_status(ipb::NodeStatusRequest { digest: false })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    let as_node = tls_channel(&peer_addr, &ca, node_identity, client::pki::PEER_NAME);
    PeerServiceClient::new(as_node.clone())
        .node_status(ipb::NodeStatusRequest { digest: false })
        .await
        .expect("a node may ask on the peer port");
    let mut submit = tonic::Request::new(pb::SubmitTasksRequest { tasks: vec![spec("nope")] });
    let bearer = format!("Bearer {}", sec.secret("admin").unwrap());
    submit.metadata_mut().insert(proto::auth::AUTHORIZATION_KEY, bearer.parse().unwrap());
    let s = TasksClient::new(as_node).submit_tasks(submit).await.unwrap_err();
    assert_eq!(s.code(), Code::Unimplemented, "{s:?}");

    // A leader SIGKILL: the others elect a new one over their peer ports and commit.
    let old = c.wait_leader(Duration::from_secs(30)).await.unwrap();
    c.kill(old);
    let rest: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    c.wait_leader_among(&rest, Duration::from_secs(30)).await.expect("a new leader");
    let after = client(
        &sec,
        &rest.iter().map(|i| c.nodes[*i].addr.clone()).collect::<Vec<_>>(),
        Some("admin"),
    );
    ids.push(after.submit(spec("after-failover")).await.expect("a write after failover").id);
    c.start_node(old).unwrap();
    c.wait_all_reachable(Duration::from_secs(30)).await.expect("the old leader rejoins");

    // Leader transfer steers elections with Control calls on the peer ports.
    let leader = c.wait_leader(Duration::from_secs(30)).await.unwrap();
    let to = c.nodes[(leader + 1) % 3].id;
    assert_eq!(admin.transfer_leader(to).await.expect("transfer"), to);

    // A fourth node joins as a learner with its own peer port and becomes a voter.
    let i = c.add_node(NodeOptions::new(4)).unwrap();
    c.start_node(i).unwrap();
    c.wait_serving(i, Duration::from_secs(30)).await.unwrap();
    let (addr, peer) = (c.nodes[i].addr.clone(), c.nodes[i].peer_addr.clone().unwrap());
    admin.add_learner(4, &addr, &peer, 20_000).await.expect("the learner catches up");
    admin.promote(4).await.expect("promoted");
    c.wait_all_reachable(Duration::from_secs(30)).await.expect("four reachable voters");
    let st = admin.cluster_status().await.unwrap();
    let four = st.nodes.iter().find(|s| s.id == 4).unwrap();
    assert!(four.voter && four.peer_addr == peer, "{four:?}");

    all_alive(&mut c).await;
    for id in ids {
        assert_eq!(admin.get_task(id).await.expect("every acknowledged task").id, id);
    }
}
