//! `schedctl` against a real 3-node cluster: tasks, workflows, shell workers, cancellation,
//! listing, status, and a leader failover while a worker runs tasks.

mod common;

use std::collections::HashMap;

use client::local::wait_until_blocking;
use common::{alive, serial, Cluster, WAIT};
use serde_json::Value;

#[test]
fn submit_get_and_idempotent_resubmit() {
    let _serial = serial();
    let c = Cluster::start(3);
    let submit = [
        "task",
        "submit",
        "--name",
        "greet",
        "--payload",
        "echo hi",
        "--priority",
        "7",
        "--label",
        "zone=eu",
        "--cpu",
        "250m",
        "--key",
        "greet-1",
    ];
    let r = c.ok(&submit);
    let v = r;
    let id = v["tasks"][0]["id"].as_u64().unwrap();
    assert_eq!(v["tasks"][0]["created"], true);
    assert_eq!(v["tasks"][0]["idempotency_key"], "greet-1");

    let t = c.task(id);
    assert_eq!(t["name"], "greet");
    assert_eq!(t["payload"], "echo hi");
    assert_eq!(t["priority"], 7);
    assert_eq!(t["labels"]["zone"], "eu");
    assert_eq!(t["resources"]["cpu_milli"], 250);
    assert_eq!(t["state"], "queued", "no worker is attached");

    // The same key with the same request names the same task (a different request with
    // that key is refused: see tests/newcomer.rs).
    let again = c.ok(&submit);
    assert_eq!(again["tasks"][0]["id"].as_u64(), Some(id));
    assert_eq!(again["tasks"][0]["created"], false);

    // The human view and the explanation work too.
    let text = c.ctl(&["task", "get", &id.to_string()]);
    assert_eq!(text.code, 0);
    assert!(text.stdout.contains("greet") && text.stdout.contains("queued"), "{text:?}");
    let e = c.ok(&["task", "explain", &id.to_string()]);
    assert_eq!(e["state"], "queued");
    assert!(!e["summary"].as_str().unwrap_or("").is_empty(), "{e}");

    // Unknown ids are an operation failure (1), with the server's code in JSON.
    let missing = c.ctl(&["-o", "json", "task", "get", "999999"]);
    assert_eq!(missing.code, 1, "{missing:?}");
    assert_eq!(missing.json()["error"]["code"], "NOT_FOUND");

    // A rejected submit (unknown dependency) is 1 as well, and names the problem.
    let bad = c.ctl(&["task", "submit", "--name", "x", "--after", "999999"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("999999"), "{bad:?}");
}

#[test]
fn cluster_status_shows_every_node_and_one_leader() {
    let _serial = serial();
    let c = Cluster::start(3);
    let s = c.ok(&["cluster", "status"]);
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{s}");
    let leader = s["leader_id"].as_u64().unwrap();
    assert_ne!(leader, 0);
    let leaders: Vec<&Value> = nodes.iter().filter(|n| n["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{s}");
    assert_eq!(leaders[0]["id"].as_u64(), Some(leader));
    assert!(nodes.iter().all(|n| n["voter"] == true && n["reachable"] == true), "{s}");
    let table = c.ctl(&["cluster", "status"]);
    assert_eq!(table.code, 0);
    assert!(table.stdout.starts_with(&format!("leader: {leader}")), "{table:?}");
}

#[test]
fn list_filters_by_state() {
    let _serial = serial();
    let c = Cluster::start(3);
    let a = c.submit(&["--name", "a"]);
    let b = c.submit(&["--name", "b"]);
    let x = c.submit(&["--name", "x"]);
    let r = c.ok(&["task", "cancel", &x.to_string()]);
    assert_eq!(r["results"][0]["ok"], true);

    let ids = |state: &str| -> Vec<u64> {
        let v = c.ok(&["task", "list", "--state", state]);
        let mut ids: Vec<u64> =
            v["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids("cancelled"), vec![x]);
    assert_eq!(ids("queued"), vec![a, b]);
    assert_eq!(ids("queued,cancelled"), vec![a, b, x]);
    assert!(ids("succeeded").is_empty());
    let limited = c.ok(&["task", "list", "--limit", "2"]);
    assert_eq!(limited["tasks"].as_array().unwrap().len(), 2);

    // Cancelling again is fine (already cancelled), cancelling an unknown id is not.
    let again = c.ok(&["task", "cancel", &x.to_string()]);
    assert_eq!(again["results"][0]["already_cancelled"], true);
    let unknown = c.ctl(&["task", "cancel", "424242"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
}

#[test]
fn worker_runs_shell_commands_and_reports_results() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.start_worker("w-shell", "sh -c \"$SCHED_PAYLOAD\"", &["--slots", "2"]);

    let ok = c.ok(&["task",
        "submit",
        "--name",
        "env",
        "--payload",
        "printf '%s/%s/%s/%s' \"$SCHED_TASK_NAME\" \"$SCHED_TASK_ID\" \"$SCHED_ATTEMPT\" \"$SCHED_FENCE\"",
        "--wait",
    ]);
    let t = ok;
    assert_eq!(t["state"], "succeeded");
    let id = t["id"].as_u64().unwrap();
    let fence = t["fence"].as_u64().unwrap();
    assert_eq!(t["result"], format!("env/{id}/1/{fence}"));
    assert_eq!(t["worker"], "w-shell");
    let states: Vec<&str> =
        t["updates"].as_array().unwrap().iter().filter_map(|u| u["state"].as_str()).collect();
    assert_eq!(states.last(), Some(&"succeeded"), "{states:?}");

    let failed = c.ctl(&[
        "-o",
        "json",
        "task",
        "submit",
        "--name",
        "bad",
        "--payload",
        "echo broken >&2; exit 3",
        "--max-attempts",
        "1",
        "--wait",
    ]);
    assert_eq!(failed.code, 1, "a failed task exits 1: {failed:?}");
    let t = failed.json();
    assert_eq!(t["state"], "failed");
    let msg = t["last_failure"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("exit status 3") && msg.contains("broken"), "{t}");

    // A timed-out attempt is killed and fails as retryable "timed out".
    let slow = c.ctl(&[
        "-o",
        "json",
        "task",
        "submit",
        "--name",
        "slow",
        "--payload",
        "sleep 30",
        "--timeout",
        "1s",
        "--max-attempts",
        "1",
        "--wait",
    ]);
    assert_eq!(slow.code, 1, "{slow:?}");
    assert_eq!(slow.json()["state"], "failed");
}

#[test]
fn workflow_runs_in_dependency_order() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.start_worker("w-a", "sh -c \"$SCHED_PAYLOAD\"", &["--slots", "2"]);
    c.start_worker("w-b", "sh -c \"$SCHED_PAYLOAD\"", &["--slots", "2"]);
    let trace = c.dir.path().join("trace");
    let step = |name: &str| format!("sleep 0.2; echo {name} >> {}", trace.display());
    let wf = serde_json::json!({
        "key_prefix": "wf-test",
        "tasks": [
            { "name": "d", "after": ["b", "c"], "payload": step("d") },
            { "name": "a", "payload": step("a") },
            { "name": "b", "after": ["a"], "payload": step("b") },
            { "name": "c", "after": ["a"], "payload": step("c") },
        ]
    });
    let path = c.dir.path().join("wf.json");
    std::fs::write(&path, wf.to_string()).unwrap();
    let r = c.ok(&["workflow", "submit", path.to_str().unwrap(), "--wait"]);
    let v = r;
    let tasks = v["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 4);
    let by_name: HashMap<&str, &Value> =
        tasks.iter().map(|t| (t["workflow_name"].as_str().unwrap(), t)).collect();
    assert!(tasks.iter().all(|t| t["state"] == "succeeded"), "{v}");
    // Declared dependencies are the real ones.
    let id = |n: &str| by_name[n]["id"].as_u64().unwrap();
    let mut d_deps: Vec<u64> = by_name["d"]["depends_on"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    d_deps.sort();
    let mut want = vec![id("b"), id("c")];
    want.sort();
    assert_eq!(d_deps, want);

    // Each step ran after the steps it depends on had finished.
    let order: Vec<String> =
        std::fs::read_to_string(&trace).unwrap().lines().map(str::to_string).collect();
    let pos = |n: &str| {
        order.iter().position(|l| l == n).unwrap_or_else(|| panic!("{n} missing: {order:?}"))
    };
    assert_eq!(order.len(), 4, "each step ran once: {order:?}");
    assert!(pos("a") < pos("b") && pos("a") < pos("c"), "{order:?}");
    assert!(pos("b") < pos("d") && pos("c") < pos("d"), "{order:?}");
    let fin = |n: &str| by_name[n]["finished_at_ms"].as_u64().unwrap();
    assert!(
        fin("a") <= fin("b")
            && fin("a") <= fin("c")
            && fin("b") <= fin("d")
            && fin("c") <= fin("d")
    );

    // Submitting the same file again with the same prefix creates nothing.
    let again = c.ok(&["workflow", "submit", path.to_str().unwrap()]);
    assert!(again["tasks"].as_array().unwrap().iter().all(|t| t["created"] == false), "{again}");

    // Graph errors are caught before anything is sent.
    let before = c.ok(&["task", "list"])["tasks"].as_array().unwrap().len();
    let cyclic = c.dir.path().join("cycle.yaml");
    std::fs::write(&cyclic, "- name: x\n  after: [y]\n- name: y\n  after: [x]\n").unwrap();
    let r = c.ctl(&["workflow", "submit", cyclic.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("dependency cycle"), "{r:?}");
    let unknown = c.dir.path().join("unknown.yaml");
    std::fs::write(&unknown, "- name: x\n  after: [ghost]\n").unwrap();
    let r = c.ctl(&["workflow", "submit", unknown.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("ghost"), "{r:?}");
    let after = c.ok(&["task", "list"])["tasks"].as_array().unwrap().len();
    assert_eq!(before, after, "nothing was submitted");
}

#[test]
fn cancelling_a_running_task_kills_its_process() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.start_worker("w-cancel", "sh -c \"$SCHED_PAYLOAD\"", &["--kill-grace", "2s"]);
    let pidfile = c.dir.path().join("sleep.pid");
    let payload = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
    let id = c.submit(&["--name", "sleeper", "--payload", &payload]);
    c.wait_state(id, "running");
    let pid: i32 = wait_until_blocking("the task's process to start", WAIT, || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    })
    .unwrap();
    assert!(alive(pid));

    let r = c.ok(&["task", "cancel", &id.to_string(), "--reason", "test"]);
    assert_eq!(r["results"][0]["ok"], true, "{r}");
    let t = c.wait_state(id, "cancelled");
    assert_eq!(t["cancel_reason"], "test");
    wait_until_blocking("the cancelled task's process to be killed", WAIT, || {
        (!alive(pid)).then_some(())
    })
    .unwrap();

    // The worker is free again and takes new work.
    let next = c.ok(&["task", "submit", "--name", "after", "--payload", "echo next", "--wait"]);
    assert_eq!(next["result"], "next\n");
}

#[test]
fn worker_keeps_finishing_tasks_across_a_leader_failover() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    let log = c.dir.path().join("executions");
    let exec = format!("sleep 0.3; echo $SCHED_TASK_ID >> {}", log.display());
    c.start_worker("w-failover", &exec, &["--slots", "4"]);

    let mut ids: Vec<u64> = (0..12).map(|i| c.submit(&["--name", &format!("t{i}")])).collect();
    // Kill the leader while tasks are running.
    wait_until_blocking("some tasks to run", WAIT, || {
        let v = c.ok(&["task", "list", "--state", "running,succeeded"]);
        (!v["tasks"].as_array()?.is_empty()).then_some(())
    })
    .unwrap();
    let old = c.leader();
    c.kill(old);
    // Submits during the election are retried by schedctl until a new leader answers.
    ids.extend((12..18).map(|i| c.submit(&["--name", &format!("t{i}")])));
    let new = c.leader();
    assert_ne!(new, old);

    let tasks: Vec<Value> = wait_until_blocking("every task to finish", WAIT, || {
        let v = c.ctl(&["-o", "json", "task", "list", "--limit", "1000"]);
        if v.code != 0 {
            return None;
        }
        let tasks = v.json()["tasks"].as_array()?.clone();
        let done = tasks.iter().filter(|t| t["state"] == "succeeded").count();
        (done == ids.len()).then_some(tasks)
    })
    .unwrap();
    assert_eq!(tasks.len(), ids.len());
    for t in &tasks {
        assert_eq!(t["attempt"], 1, "no attempt was lost or repeated: {t}");
    }
    // Every task ran exactly once.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut runs: HashMap<u64, usize> = HashMap::new();
    for l in text.lines() {
        *runs.entry(l.trim().parse().unwrap()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(runs.get(id), Some(&1), "task {id} ran {:?} times\n{}", runs.get(id), c.logs());
    }
    assert_eq!(runs.len(), ids.len());
}

#[test]
fn dev_up_starts_a_usable_cluster_and_stops_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_ports(1)[0];
    // A base port whose neighbours are taken is replaced by OS ports; either way it works.
    let mut child = std::process::Command::new(common::schedctl_bin())
        .args(["-o", "json", "dev", "up", "--nodes", "3", "--workers", "1"])
        .arg("--dir")
        .arg(dir.path())
        .args(["--base-port", &port.to_string()])
        .env_remove("SCHED_ENDPOINTS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id() as i32);
    // The JSON summary is printed once everything is up; read it line by line.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let mut stdout = stdout;
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.push_str(&String::from_utf8_lossy(&buf[..n]));
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = tx.send(v);
                return;
            }
        }
    });
    let summary = rx.recv_timeout(common::WAIT).expect("dev up printed its summary");
    let endpoints: Vec<String> = summary["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    assert_eq!(endpoints.len(), 3);
    let joined = endpoints.join(",");
    // Secure by default: a CA and an admin token in the directory.
    let ca = summary["ca_cert"].as_str().expect("dev up runs with TLS").to_string();
    let token_file = summary["token_file"].as_str().expect("dev up runs with tokens");
    let token = std::fs::read_to_string(token_file).unwrap().trim().to_string();
    let anonymous = common::schedctl(&["--endpoints", &joined, "--ca-cert", &ca, "task", "list"]);
    assert_ne!(anonymous.code, 0, "a request without the token is refused");
    let r = common::schedctl(&[
        "--endpoints",
        &joined,
        "--ca-cert",
        &ca,
        "--token",
        &token,
        "-o",
        "json",
        "task",
        "submit",
        "--name",
        "hello",
        "--payload",
        "echo hello",
        "--wait",
    ]);
    assert_eq!(r.ok_json()["result"], "hello\n");

    // SIGTERM stops everything it started and exits 0.
    // SAFETY: signalling the child this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status =
        wait_until_blocking("dev up to exit", WAIT, || child.try_wait().ok().flatten()).unwrap();
    assert!(status.success(), "{status:?}");
    std::mem::forget(guard);
    wait_until_blocking("the nodes to stop", WAIT, || {
        let r = common::schedctl(&[
            "--endpoints",
            &joined,
            "--ca-cert",
            &ca,
            "--token",
            &token,
            "--retry-budget",
            "0s",
            "cluster",
            "status",
        ]);
        (r.code == 3).then_some(())
    })
    .unwrap();
    assert!(dir.path().join("cluster.json").is_file());
}

/// SIGKILLs a process when a test fails before stopping it properly.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling a child this test started.
        unsafe {
            libc::kill(self.0, libc::SIGTERM);
        }
    }
}

/// `snapshot save` streams a fresh snapshot from the leader into a file that `snapshot
/// inspect` verifies and summarises: the counts are the cluster's; a damaged copy is refused.
#[test]
fn snapshot_save_and_inspect_describe_the_cluster_and_refuse_damage() {
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.start_worker("snap-w1", "true", &[]);
    let done: Vec<u64> = (0..5).map(|i| c.submit(&["--name", &format!("done-{i}")])).collect();
    for id in &done {
        c.wait_state(*id, "succeeded");
    }
    for i in 0..3 {
        c.submit(&["--name", &format!("waiting-{i}"), "--queue", "nobody-serves"]);
    }

    let file = c.dir.path().join("backup.snap");
    let file_arg = file.to_str().unwrap();
    let saved = c.ok(&["snapshot", "save", file_arg]);
    assert!(saved["index"].as_u64().unwrap() > 0, "{saved}");
    assert!(!c.dir.path().join("backup.snap.partial").exists(), "the partial file is gone");
    let inspected = c.ok(&["snapshot", "inspect", file_arg]);
    for v in [&saved, &inspected] {
        assert_eq!(v["tasks"]["succeeded"], 5, "{v}");
        assert_eq!(v["tasks"]["queued"], 3, "{v}");
        assert_eq!(v["tasks_total"], 8, "{v}");
        assert_eq!(v["workers"]["alive"], 1, "{v}");
        assert_eq!(v["members"].as_array().unwrap().len(), 3, "{v}");
    }
    assert_eq!(saved["digest"], inspected["digest"]);
    assert_eq!(saved["sha256"], inspected["sha256"]);
    let text = c.ctl(&["snapshot", "inspect", file_arg]);
    assert!(text.stdout.contains("succeeded 5") && text.stdout.contains("member 1"), "{text:?}");

    // One flipped byte: the checksum catches it, and the message names the file.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let damaged = c.dir.path().join("damaged.snap");
    std::fs::write(&damaged, &bytes).unwrap();
    let r = c.ctl(&["snapshot", "inspect", damaged.to_str().unwrap()]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("damaged.snap") && r.stderr.contains("not a sound snapshot"),
        "{r:?}"
    );
}

/// Every task as `task list` shows it, by id.
fn all_tasks(c: &Cluster) -> std::collections::BTreeMap<u64, Value> {
    let v = c.ok(&["task", "list", "--limit", "100000"]);
    v["tasks"].as_array().unwrap().iter().map(|t| (t["id"].as_u64().unwrap(), t.clone())).collect()
}

/// Runs `schedulerd ARGS` to its exit (bounded) and returns its status and output.
fn schedulerd_exits(args: &[&str]) -> (i32, String) {
    let bin = client::local::schedulerd_for_this_exe().unwrap_or_else(|e| panic!("{e}"));
    let mut child = std::process::Command::new(bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run schedulerd");
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("schedulerd {args:?} did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (status.code().unwrap_or(-1), text)
}

#[test]
fn a_snapshot_saved_under_load_restores_into_a_new_cluster_with_every_task() {
    use client::local::{LocalCluster, LocalClusterOptions, NodeOptions};
    let _serial = serial();
    let mut c = Cluster::start(3);
    c.start_worker("dr-w1", "true", &[]);
    let done: Vec<u64> = (0..4).map(|i| c.submit(&["--name", &format!("done-{i}")])).collect();
    for id in &done {
        c.wait_state(*id, "succeeded");
    }
    // A small DAG that waits on a queue nobody serves.
    let root = c.submit(&["--name", "root", "--queue", "nobody-serves"]);
    let leaf = c.submit(&["--name", "leaf", "--after", &root.to_string()]);

    // Submissions keep coming while the snapshot is saved.
    let endpoints = c.endpoints();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let load = {
        let (stop, acked) = (stop.clone(), acked.clone());
        std::thread::spawn(move || {
            for i in 0..400 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let name = format!("load-{i}");
                let r = common::schedctl(&[
                    "--endpoints",
                    &endpoints,
                    "-o",
                    "json",
                    "task",
                    "submit",
                    "--name",
                    &name,
                    "--queue",
                    "nobody-serves",
                ]);
                assert_eq!(r.code, 0, "{r:?}");
                acked.lock().unwrap().push(r.json()["tasks"][0]["id"].as_u64().unwrap());
            }
        })
    };
    wait_until_blocking("some load to be acknowledged", WAIT, || {
        (acked.lock().unwrap().len() >= 10).then_some(())
    })
    .unwrap();
    let acked_before_save = acked.lock().unwrap().clone();
    let file = c.dir.path().join("dr.snap");
    let file_arg = file.to_str().unwrap().to_string();
    let saved = c.ok(&["snapshot", "save", &file_arg]);
    let acked_by_save = acked.lock().unwrap().len();
    wait_until_blocking("more load after the save", WAIT, || {
        (acked.lock().unwrap().len() >= acked_by_save + 5).then_some(())
    })
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().unwrap();
    let original = all_tasks(&c);
    let total = saved["tasks_total"].as_u64().unwrap() as usize;
    assert!(original.len() >= total + 5, "tasks were acknowledged after the snapshot point");

    // A new one-node cluster at a new address, from the file.
    let bin = client::local::schedulerd_for_this_exe().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let restore_args = ["--restore", file_arg.as_str(), "--bootstrap"];
    let opts = LocalClusterOptions::new(bin.clone(), 1)
        .dir(dir.path())
        .args(restore_args)
        .init(false)
        .startup_timeout(WAIT);
    let local = LocalCluster::start_blocking(opts).unwrap_or_else(|e| panic!("{e}"));
    let mut r = Cluster::adopt(local, dir);
    assert_eq!(r.leader(), 1);
    let compare = |r: &Cluster| {
        let restored = all_tasks(r);
        assert_eq!(restored.len(), total, "the restored cluster holds the snapshot's tasks");
        for id in acked_before_save.iter().chain(&done).chain([&root, &leaf]) {
            assert!(restored.contains_key(id), "task {id}, acknowledged before the save, is lost");
        }
        for (id, t) in &restored {
            assert_eq!(Some(t), original.get(id), "task {id} differs from the original");
        }
    };
    compare(&r);
    let restored_max = *all_tasks(&r).keys().max().unwrap();
    let status = r.ok(&["cluster", "status"]);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 1, "{status}");
    // New tasks get new ids; the DAG still holds.
    let fresh = r.submit(&["--name", "after-restore"]);
    assert!(fresh > restored_max, "id {fresh} reused");
    assert_eq!(r.task(leaf)["state"], "waiting");

    // A restart with --restore still on the command line starts from the restored data.
    r.local_mut().kill(0);
    r.local_mut().start_node(0).unwrap();
    assert_eq!(r.leader(), 1);
    assert_eq!(r.task(fresh)["name"], "after-restore");

    // The restored cluster grows like any other.
    let i = r.local_mut().add_node(NodeOptions::new(2)).unwrap();
    r.local_mut().start_node(i).unwrap();
    let addr = r.local().nodes[i].addr.clone();
    r.ok(&["cluster", "add-learner", "--id", "2", "--addr", &addr, "--wait", "60s"]);
    r.ok(&["cluster", "promote", "--id", "2"]);
    let status = r.ok(&["cluster", "status"]);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2, "{status}");

    // Refused: a directory that holds data, and (without --bootstrap) a node the snapshot's
    // membership does not have at this address.
    let busy = tempfile::tempdir().unwrap();
    std::fs::write(busy.path().join("stray"), b"x").unwrap();
    let port = common::free_ports(1)[0].to_string();
    let listen = format!("127.0.0.1:{port}");
    let refused = |id: &str, dir: &std::path::Path| {
        let dir = dir.to_str().unwrap();
        let (code, out) = schedulerd_exits(&[
            "--id",
            id,
            "--listen",
            &listen,
            "--data-dir",
            dir,
            "--restore",
            &file_arg,
        ]);
        assert_ne!(code, 0, "{out}");
        out
    };
    let out = refused("1", busy.path());
    assert!(out.contains("not empty") && out.contains("stray"), "{out}");
    let empty = tempfile::tempdir().unwrap();
    let out = refused("1", empty.path());
    assert!(out.contains("--bootstrap") && out.contains("advertises"), "{out}");
    let out = refused("9", empty.path());
    assert!(out.contains("not a voter"), "{out}");
    drop(r);

    // The whole old cluster, each member restored at its old address from the same file
    // (keeping the membership), elects a leader and holds the same tasks.
    let old: Vec<(u64, std::net::SocketAddr)> =
        c.local().nodes.iter().map(|n| (n.id, n.listen)).collect();
    c.local_mut().kill_all();
    let bin_dir = tempfile::tempdir().unwrap();
    let mut opts = LocalClusterOptions::new(bin, 0)
        .dir(bin_dir.path())
        .args(["--restore", file_arg.as_str()])
        .init(false)
        .startup_timeout(WAIT);
    opts.nodes = old
        .iter()
        .map(|(id, listen)| NodeOptions { listen: Some(*listen), ..NodeOptions::new(*id) })
        .collect();
    let local = LocalCluster::start_blocking(opts).unwrap_or_else(|e| panic!("{e}"));
    let again = Cluster::adopt(local, bin_dir);
    again.leader();
    compare(&again);
    let status = again.ok(&["cluster", "status"]);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3, "{status}");
}

#[test]
fn a_wiped_member_is_refused_with_the_fix_and_rejoins_as_a_new_learner() {
    let _serial = serial();
    let conf = tempfile::tempdir().unwrap();
    let file = conf.path().join("node.toml");
    std::fs::write(
        &file,
        "[raft]\nsnapshot_every_entries = 100\nkeep_entries_after_snapshot = 20\n",
    )
    .unwrap();
    let mut c = Cluster::start_with(3, &["--config", file.to_str().unwrap()]);
    let mut ids = Vec::new();
    for round in 0..2 {
        for i in 0..60 {
            ids.push(c.submit(&["--name", &format!("t{round}-{i}"), "--queue", "nobody-serves"]));
        }
        c.ok(&["cluster", "snapshot"]);
    }
    let status = c.ok(&["cluster", "status"]);
    let leader = status["leader_id"].as_u64().unwrap();
    let purged = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == leader).unwrap()
        ["purged_index"]
        .as_u64()
        .unwrap();
    assert!(purged > 0, "the leader compacted its log: {status}");

    // A follower loses its data directory and comes back under its id.
    let victim = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let i = c.local().index_of(victim).unwrap();
    c.kill(victim);
    std::fs::remove_dir_all(&c.local().nodes[i].data_dir).unwrap();
    c.local_mut().start_node(i).unwrap();
    let log = c.local().nodes[i].log().to_path_buf();
    wait_until_blocking("the wiped node to say what happened", WAIT, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("lost its data").then_some(())
    })
    .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cluster remove --id") && text.contains("add-learner"), "{text}");
    // It took nothing: the cluster keeps serving with the other two.
    let more = c.submit(&["--name", "while-wiped", "--queue", "nobody-serves"]);

    // The fix the message names: remove it, add it back as a learner, promote it.
    let addr = c.local().nodes[i].addr.clone();
    let victim_s = victim.to_string();
    c.ok(&["cluster", "remove", "--id", &victim_s]);
    c.ok(&["cluster", "add-learner", "--id", &victim_s, "--addr", &addr, "--wait", "60s"]);
    c.ok(&["cluster", "promote", "--id", &victim_s]);
    wait_until_blocking("the rejoined node to hold every task", WAIT, || {
        let s = c.ok(&["cluster", "status"]);
        let nodes = s["nodes"].as_array()?.clone();
        let applied: Vec<u64> =
            nodes.iter().map(|n| n["applied_index"].as_u64().unwrap()).collect();
        (nodes.len() == 3
            && nodes.iter().all(|n| n["voter"] == true && n["reachable"] == true)
            && applied.iter().all(|a| *a == applied[0]))
        .then_some(())
    })
    .unwrap();
    for id in ids.iter().chain([&more]) {
        assert_eq!(c.task(*id)["state"], "queued");
    }
}
