//! The operator's lifecycle commands against a real 3-node cluster and a shell worker:
//! `task retry` (with dependents, on a DAG whose failing task succeeds on its second attempt),
//! `queue pause/resume/list`, `worker drain/undrain` and `worker remove`.

mod common;

use client::local::wait_until_blocking;
use client::pb;
use common::{serial, Cluster, WAIT};

#[test]
fn retry_with_dependents_reruns_a_failed_dag_after_its_root_succeeds() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.start_worker("w-retry", "sh -c \"$SCHED_PAYLOAD\"", &["--slots", "2"]);
    let marker = c.dir.path().join("flaky-ran-once");
    let trace = c.dir.path().join("trace");
    // Fails the first time (leaving a marker), succeeds from then on.
    let flaky = format!(
        "if [ -e {m} ]; then echo root >> {t}; else touch {m}; echo first try failed >&2; exit 1; fi",
        m = marker.display(),
        t = trace.display()
    );
    let root = c.submit(&["--name", "flaky", "--payload", &flaky, "--max-attempts", "1"]);
    let child_payload = format!("echo child >> {}", trace.display());
    let child =
        c.submit(&["--name", "child", "--payload", &child_payload, "--after", &root.to_string()]);
    let leaf =
        c.submit(&["--name", "leaf", "--payload", "echo leaf", "--after", &child.to_string()]);
    let failed = c.wait_state(root, "failed");
    let first_fence = failed["fence"].as_u64().unwrap();
    c.wait_state(child, "upstream_failed");
    c.wait_state(leaf, "upstream_failed");

    // The dependent alone cannot run: its dependency failed. The refusal says what to do.
    let r = c.ctl(&["-o", "json", "task", "retry", &child.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "FAILED_PRECONDITION", "{r:?}");
    assert!(r.stderr.contains(&format!("dependency {root} is failed")), "{r:?}");

    let r = c.ok(&["task", "retry", &root.to_string(), "--with-dependents"]);
    let retried: Vec<(u64, &str)> = r["retried"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["state"].as_str().unwrap()))
        .collect();
    assert_eq!(retried, vec![(root, "queued"), (child, "waiting"), (leaf, "waiting")], "{r}");

    let done = c.wait_state(leaf, "succeeded");
    let root_t = c.task(root);
    assert_eq!(root_t["state"], "succeeded");
    assert_eq!(root_t["attempt"], 2, "the retry is a new attempt: {root_t}");
    assert!(root_t["fence"].as_u64().unwrap() > first_fence, "{root_t}");
    assert!(
        root_t["finished_at_ms"].as_u64() <= c.task(child)["finished_at_ms"].as_u64(),
        "the dependent ran after the retried task succeeded"
    );
    assert_eq!(done["result"], "leaf\n");
    let order = std::fs::read_to_string(&trace).unwrap();
    assert_eq!(order, "root\nchild\n", "each ran once, in dependency order");

    // A succeeded task is not run again.
    let r = c.ctl(&["task", "retry", &root.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("succeeded"), "{r:?}");
}

#[test]
fn pause_undrain_and_remove_change_what_workers_get() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.start_worker(
        "w-ops",
        "sh -c \"$SCHED_PAYLOAD\"",
        &["--queue", "default", "--queue", "other", "--slots", "2"],
    );

    // Pause: the queue's new task waits, while the same worker takes another queue's task.
    let r = c.ok(&["queue", "pause", "default"]);
    assert_eq!((r["paused"].as_bool(), r["changed"].as_bool()), (Some(true), Some(true)), "{r}");
    let again = c.ok(&["queue", "pause", "default"]);
    assert_eq!(again["changed"], false, "{again}");
    let held = c.submit(&["--name", "held", "--payload", "echo held"]);
    let other = c.submit(&["--name", "other", "--queue", "other", "--payload", "echo other"]);
    c.wait_state(other, "succeeded");
    assert_eq!(c.task(held)["state"], "queued", "a paused queue's task is not assigned");
    let e = c.ok(&["task", "explain", &held.to_string()]);
    assert!(e["summary"].as_str().unwrap().contains("paused"), "{e}");
    let list = c.ok(&["queue", "list"]);
    let q = list["queues"].as_array().unwrap().iter().find(|q| q["name"] == "default").cloned();
    let q = q.unwrap_or_else(|| panic!("default missing: {list}"));
    assert_eq!((q["paused"].as_bool(), q["queued"].as_u64()), (Some(true), Some(1)), "{list}");
    let table = c.ctl(&["queue", "list"]);
    assert!(table.stdout.contains("paused"), "{table:?}");
    let r = c.ok(&["queue", "resume", "default"]);
    assert_eq!(r["paused"], false, "{r}");
    c.wait_state(held, "succeeded");

    // Drain, then undrain: the drained worker gets nothing until it is undrained.
    c.ok(&["worker", "drain", "w-ops"]);
    let waiting = c.submit(&["--name", "after-drain", "--payload", "echo later"]);
    let e = c.ok(&["task", "explain", &waiting.to_string()]);
    assert!(e["summary"].as_str().unwrap().contains("no alive worker"), "{e}");
    assert_eq!(c.task(waiting)["state"], "queued");
    let r = c.ok(&["worker", "undrain", "w-ops"]);
    assert_eq!(r["draining"], false, "{r}");
    c.wait_state(waiting, "succeeded");
    let workers = c.ok(&["worker", "list"]);
    assert!(
        workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["id"] == "w-ops" && w["status"] == "alive"),
        "{workers}"
    );

    // Remove: refused for a live worker; a dead one's record goes away.
    let r = c.ctl(&["-o", "json", "worker", "remove", "w-ops"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "FAILED_PRECONDITION", "{r:?}");
    let endpoints: Vec<String> = c.endpoints().split(',').map(str::to_string).collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = client::client::Client::new(endpoints).unwrap();
        let spec = pb::WorkerSpec {
            id: "w-gone".into(),
            queues: vec!["nothing-here".into()],
            slots: 1,
            ..Default::default()
        };
        let reg = client
            .register_worker(pb::RegisterWorkerRequest { worker: Some(spec), instance: 7 })
            .await
            .unwrap();
        client.deregister_worker("w-gone", reg.session).await.unwrap();
    });
    wait_until_blocking("w-gone to be dead", WAIT, || {
        let v = c.ok(&["worker", "list"]);
        v["workers"]
            .as_array()?
            .iter()
            .any(|w| w["id"] == "w-gone" && w["status"] == "dead")
            .then_some(())
    })
    .unwrap();
    let r = c.ok(&["worker", "remove", "w-gone"]);
    assert_eq!(r["removed"], true, "{r}");
    let v = c.ok(&["worker", "list"]);
    assert!(!v["workers"].as_array().unwrap().iter().any(|w| w["id"] == "w-gone"), "{v}");
    let r = c.ctl(&["-o", "json", "worker", "remove", "w-gone"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "NOT_FOUND", "{r:?}");
}
