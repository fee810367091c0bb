//! The HTTP port on a TLS + token cluster: the JSON API's roles (the gRPC role matrix),
//! fencing tokens for admins only, 400s naming the field, actions that change state only for
//! the right role, server-sent events resumable with Last-Event-ID, and `/metrics` passing
//! `promtool check metrics` (skipped loudly only when promtool is absent; `.ci/run` installs
//! it) with cluster-wide gauges on the leader only. Hostile requests leave state and nodes
//! unchanged.

mod common;

use std::time::Duration;

use client::local::{LocalCluster, LocalClusterOptions, Security};
use client::pki::TokenSpec;
use client::Client;
use common::promtool_check;
use proto::pb;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Logs<'a>(&'a LocalCluster);

impl Drop for Logs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.log_tails(40));
        }
    }
}

async fn secure_cluster() -> LocalCluster {
    let opts = LocalClusterOptions::new(env!("CARGO_BIN_EXE_schedulerd"), 3)
        .env("SCHED_LOG", "info,openraft=warn")
        .http(true)
        .secure([TokenSpec::new("ci", "submitter"), TokenSpec::new("dash", "reader")]);
    LocalCluster::start(opts).await.expect("a secure cluster starts")
}

async fn tls(sec: &Security, addr: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let ca = std::fs::read(&sec.pki.ca).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake with the HTTP port")
}

/// One request over TLS: (status, body). `extra` are whole header lines.
async fn call(
    sec: &Security,
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    extra: &[&str],
    body: &str,
) -> (u16, String) {
    let mut s = tls(sec, addr).await;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("authorization: Bearer {t}\r\n"));
    }
    for h in extra {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out))
        .await
        .expect("an answer within 15 s")
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (code, body)
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Reads an event stream until `until` holds for what arrived (at most 20 s).
async fn sse_until(
    sec: &Security,
    addr: &str,
    token: &str,
    extra: &str,
    query: &str,
    until: impl Fn(&str) -> bool,
) -> String {
    let mut s = tls(sec, addr).await;
    let head = format!(
        "GET /api/v1/events{query} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n{extra}\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 16 * 1024];
    while !until(&seen) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            other => panic!("event stream ended or stalled ({other:?}); got:\n{seen}"),
        }
    }
    seen
}

fn task(name: &str, queue: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.into(),
        queue: queue.into(),
        idempotency_key: format!("http-{name}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_api_roles_validation_events_and_metrics() {
    let mut c = secure_cluster().await;
    let logs = Logs(&c);
    let sec = c.security().unwrap().clone();
    let leader = c.wait_leader(Duration::from_secs(30)).await.unwrap();
    let follower = (leader + 1) % 3;
    let lh = c.nodes[leader].http.clone().unwrap();
    let fh = c.nodes[follower].http.clone().unwrap();
    let (admin, reader, submitter) =
        (sec.secret("admin").unwrap(), sec.secret("dash").unwrap(), sec.secret("ci").unwrap());
    let mut cfg = sec.client_config(&c.endpoints(), Some("admin"));
    cfg.retry_budget = Duration::from_secs(20);
    let client = Client::with_config(cfg).unwrap();
    let parked = client.submit(task("parked", "parked")).await.unwrap().id;

    // Cluster: a token is needed; a reader sees members and the leader, through a follower too.
    let (code, body) = call(&sec, &fh, "GET", "/api/v1/cluster", None, &[], "").await;
    assert_eq!(code, 401, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("token"), "{body}");
    let (code, body) = call(&sec, &fh, "GET", "/api/v1/cluster", Some(reader), &[], "").await;
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(v["members"].as_array().unwrap().len(), 3, "{body}");
    assert_eq!(v["leader_id"], c.nodes[leader].id, "{body}");
    assert!(v["tasks"]["queued"].as_u64().unwrap() >= 1, "{body}");

    // A queue's series appears while it holds tasks (and stays, at 0, below).
    let (_, page) = call(&sec, &lh, "GET", "/metrics", Some(reader), &[], "").await;
    assert!(page.contains("raftsched_queue_depth{queue=\"parked\"} 1"), "{page}");
    assert!(page.contains("raftsched_queue_oldest_age_seconds{queue=\"parked\"}"), "{page}");

    // Tasks: filters; fencing tokens for admins only.
    let (code, body) =
        call(&sec, &fh, "GET", "/api/v1/tasks?state=queued&queue=parked", Some(reader), &[], "")
            .await;
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    let t = &v["tasks"][0];
    assert_eq!(t["id"], parked, "{body}");
    assert_eq!(t["state"], "queued", "{body}");
    assert!(t.get("fence").is_none(), "a reader must not see fences: {body}");
    let (_, body) =
        call(&sec, &lh, "GET", &format!("/api/v1/tasks/{parked}"), Some(admin), &[], "").await;
    let v = json(&body);
    assert!(v.get("fence").is_some(), "{body}");
    assert!(v["explain"]["summary"].as_str().unwrap().len() > 5, "{body}");
    assert_eq!(v["dag"]["nodes"].as_array().unwrap().len(), 1, "{body}");
    let (code, body) =
        call(&sec, &lh, "GET", "/api/v1/tasks?name=parked&stale=1", Some(reader), &[], "").await;
    assert_eq!((code, json(&body)["tasks"][0]["id"].as_u64()), (200, Some(parked)), "{body}");

    // Bad input: 400 naming the field.
    for (path, field) in [
        ("/api/v1/tasks?state=bogus", "state"),
        ("/api/v1/tasks?limit=0", "limit"),
        ("/api/v1/tasks?limit=x", "limit"),
        ("/api/v1/tasks?since=yesterday", "since"),
        ("/api/v1/tasks?colour=red", "colour"),
        ("/api/v1/tasks?stale=maybe", "stale"),
        ("/api/v1/tasks/abc", "id"),
        ("/api/v1/tasks/0", "id"),
        ("/api/v1/stats?window=3h", "window"),
        ("/api/v1/events?from=-1", "from"),
    ] {
        let (code, body) = call(&sec, &fh, "GET", path, Some(reader), &[], "").await;
        assert_eq!(code, 400, "{path}: {body}");
        assert!(json(&body)["error"].as_str().unwrap().contains(field), "{path}: {body}");
    }
    let (code, body) =
        call(&sec, &fh, "GET", "/api/v1/tasks/987654321", Some(reader), &[], "").await;
    assert_eq!(code, 404, "{body}");

    // Actions: the reader may not cancel, a JSON body is required, the submitter may.
    let cancel = format!("/api/v1/tasks/{parked}/cancel");
    let ctype = ["content-type: application/json"];
    let (code, body) = call(&sec, &fh, "POST", &cancel, Some(reader), &ctype, "{}").await;
    assert_eq!(code, 403, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("submitter"), "{body}");
    let (code, body) = call(&sec, &fh, "POST", &cancel, Some(submitter), &[], "{}").await;
    assert_eq!(code, 415, "{body}");
    let (code, body) =
        call(&sec, &fh, "POST", &cancel, Some(submitter), &ctype, r#"{"reason": 7}"#).await;
    assert!(code == 400 && body.contains("reason"), "{code} {body}");
    let (code, body) =
        call(&sec, &fh, "POST", &cancel, Some(submitter), &ctype, r#"{"colour": "red"}"#).await;
    assert!(code == 400 && body.contains("colour"), "{code} {body}");
    let big = format!("{{\"reason\": \"{}\"}}", "x".repeat(100_000));
    let (code, _) = call(&sec, &fh, "POST", &cancel, Some(submitter), &ctype, &big).await;
    assert_eq!(code, 413);
    let (code, body) =
        call(&sec, &fh, "POST", "/api/v1/workers/w-1/drain", Some(submitter), &ctype, "").await;
    assert_eq!(code, 403, "{body}");
    // Nothing above changed the task.
    assert_eq!(client.get_task(parked).await.unwrap().state, pb::TaskState::Queued as i32);
    let (code, body) =
        call(&sec, &fh, "POST", &cancel, Some(submitter), &ctype, r#"{"reason": "test"}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(client.get_task(parked).await.unwrap().state, pb::TaskState::Cancelled as i32);
    let (code, body) =
        call(&sec, &fh, "POST", "/api/v1/tasks/987654321/cancel", Some(submitter), &ctype, "")
            .await;
    assert_eq!(code, 409, "{body}");

    // Events: from the start, then resumed after the cancellation's batch with Last-Event-ID.
    // serde_json writes keys in alphabetical order.
    let needle = format!("\"state\":\"cancelled\",\"task\":{parked},");
    let seen = sse_until(&sec, &fh, reader, "", "?from=1", |s| s.contains(&needle)).await;
    let before = &seen[..seen.find(&needle).unwrap()];
    let id: u64 =
        before.rsplit("id: ").next().unwrap().split('\n').next().unwrap().trim().parse().unwrap();
    let resumed =
        sse_until(&sec, &fh, reader, &format!("last-event-id: {}\r\n", id - 1), "", |s| {
            s.contains("event: batch")
        })
        .await;
    assert!(resumed.contains(&format!("id: {id}\n")), "resumed at {id}:\n{resumed}");
    assert!(!resumed.contains(&format!("id: {}\n", id - 1)), "{resumed}");
    assert!(!seen.contains("\"fence\""), "a reader's events carry no fences:\n{seen}");
    let (code, _) = call(&sec, &fh, "GET", "/api/v1/events", None, &[], "").await;
    assert_eq!(code, 401);

    // Metrics: the leader exports the cluster-wide gauges, a follower does not.
    let (code, page) = call(&sec, &lh, "GET", "/metrics", Some(reader), &[], "").await;
    assert_eq!(code, 200);
    for name in [
        "raftsched_build_info{",
        "raftsched_tasks{state=\"cancelled\"} 1",
        "raftsched_queue_depth{queue=\"parked\"} 0",
        "raftsched_queue_oldest_age_seconds{queue=\"default\"}",
        "raftsched_replication_lag_entries{follower=",
        "raftsched_grpc_requests_total{method=\"scheduler.v1.Tasks/SubmitTasks\",code=\"OK\"}",
        "raftsched_grpc_request_duration_seconds_bucket{",
        "raftsched_task_completions_total{outcome=\"cancelled\"} 1",
        "raftsched_task_end_to_end_duration_seconds_count",
        "raftsched_log_fsync_duration_seconds_bucket{le=",
        "raftsched_elections_won_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(page.contains(name), "the leader's /metrics lacks {name}:\n{page}");
    }
    let (_, fpage) = call(&sec, &fh, "GET", "/metrics", Some(reader), &[], "").await;
    assert!(!fpage.contains("raftsched_tasks{"), "a follower exports no cluster-wide gauges");
    assert!(fpage.contains("raftsched_is_leader 0"), "{fpage}");
    // The bad requests above went to the follower: counted by route pattern, not raw path.
    assert!(
        fpage.contains("raftsched_http_requests_total{route=\"/api/v1/tasks\",code=\"400\"}"),
        "{fpage}"
    );
    assert!(
        fpage
            .contains("raftsched_http_requests_total{route=\"/api/v1/tasks/{id}\",code=\"404\"} 1"),
        "{fpage}"
    );
    let (_, open) = call(
        &sec,
        &lh,
        "GET",
        "/metrics",
        Some(reader),
        &["accept: application/openmetrics-text; version=1.0.0"],
        "",
    )
    .await;
    assert!(open.trim_end().ends_with("# EOF"), "OpenMetrics on request");
    for p in [&page, &fpage] {
        promtool_check(p);
    }
    grafana_names_exist(&page);

    // Retry: the reader may not; the body is checked; the submitter runs the cancelled task
    // again (through a follower); a second retry of the now queued task is a conflict.
    let retry = format!("/api/v1/tasks/{parked}/retry");
    let (code, body) = call(&sec, &fh, "POST", &retry, Some(reader), &ctype, "{}").await;
    assert_eq!(code, 403, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("submitter"), "{body}");
    for (bad, field) in [(r#"{"with_dependents": "yes"}"#, "with_dependents"), (r#"{"x": 1}"#, "x")]
    {
        let (code, body) = call(&sec, &fh, "POST", &retry, Some(submitter), &ctype, bad).await;
        assert!(code == 400 && body.contains(field), "{code} {body}");
    }
    let (code, body) = call(&sec, &fh, "POST", &retry, Some(submitter), &[], "{}").await;
    assert_eq!(code, 415, "{body}");
    assert_eq!(client.get_task(parked).await.unwrap().state, pb::TaskState::Cancelled as i32);
    let (code, body) = call(&sec, &fh, "POST", &retry, Some(submitter), &ctype, "").await;
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(
        (v["retried"][0]["id"].as_u64(), v["retried"][0]["state"].as_str()),
        (Some(parked), Some("queued")),
        "{body}"
    );
    assert_eq!(client.get_task(parked).await.unwrap().state, pb::TaskState::Queued as i32);
    let (code, body) = call(&sec, &fh, "POST", &retry, Some(submitter), &ctype, "").await;
    assert_eq!(code, 409, "{body}");
    assert!(json(&body)["error"].as_str().unwrap().contains("is queued"), "{body}");

    // Undrain: admins (like drain); a drained worker is alive again.
    let spec = pb::WorkerSpec {
        id: "w-http".into(),
        queues: vec!["nothing".into()],
        slots: 1,
        ..Default::default()
    };
    let reg = client
        .register_worker(pb::RegisterWorkerRequest { worker: Some(spec), instance: 1 })
        .await
        .unwrap();
    let (code, body) =
        call(&sec, &fh, "POST", "/api/v1/workers/w-http/undrain", Some(submitter), &ctype, "")
            .await;
    assert_eq!(code, 403, "{body}");
    let (code, body) =
        call(&sec, &fh, "POST", "/api/v1/workers/w-nobody/undrain", Some(admin), &ctype, "").await;
    assert_eq!(code, 404, "{body}");
    let status = |body: &str| {
        json(body)["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["id"] == "w-http")
            .map(|w| w["status"].as_str().unwrap().to_string())
    };
    let (code, body) =
        call(&sec, &fh, "POST", "/api/v1/workers/w-http/drain", Some(admin), &ctype, "").await;
    assert_eq!(code, 200, "{body}");
    let (_, body) = call(&sec, &lh, "GET", "/api/v1/workers", Some(reader), &[], "").await;
    assert_eq!(status(&body).as_deref(), Some("draining"), "{body}");
    let (code, body) =
        call(&sec, &fh, "POST", "/api/v1/workers/w-http/undrain", Some(admin), &ctype, "").await;
    assert_eq!((code, json(&body)["draining"].as_bool()), (200, Some(false)), "{body}");
    let (_, body) = call(&sec, &lh, "GET", "/api/v1/workers", Some(reader), &[], "").await;
    assert_eq!(status(&body).as_deref(), Some("alive"), "{body}");
    client.deregister_worker("w-http", reg.session).await.unwrap();

    drop(logs);
    for i in 0..3 {
        assert!(c.nodes[i].is_running(), "node {i} died");
        c.wait_serving(i, Duration::from_secs(10)).await.expect("still serving");
    }
}

/// Every metric the shipped Grafana dashboard queries is on the leader's page.
fn grafana_names_exist(page: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/raftsched.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("raftsched_").chain(expr.match_indices("process_")) {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                names.insert(name);
            }
        }
    }
    assert!(names.len() > 10, "{names:?}");
    for n in names {
        assert!(
            page.contains(&format!("\n{n}")) || page.contains(&format!("\n{n}{{")),
            "the Grafana dashboard queries {n}, which /metrics lacks"
        );
    }
}
