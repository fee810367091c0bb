//! Disk trouble against a real three-node cluster: the free-space floor for new submits, and
//! the fail-stop exit on storage errors (EIO on fsync, ENOSPC on write) injected through the
//! test-only hook of `raft::fault` (`RAFTSCHED_FAULT_INJECTION=1` plus a `fault-injection`
//! file in a node's data directory). Every wait polls a condition with a deadline.

mod common;

use std::time::{Duration, Instant};

use client::local::{LocalCluster, LocalClusterOptions};
use common::*;
use proto::pb;
use proto::pb::cluster_client::ClusterClient;
use proto::pb::tasks_client::TasksClient;
use proto::status::{reason_of, Reason};

/// How soon a node whose disk failed must be gone. It used to drain connections for 5 s first
/// (and with a real full disk, hang forever in sled's flush, deaf to SIGTERM).
const PROMPTLY: Duration = Duration::from_secs(4);

/// A floor no disk meets (1 EB).
const HUGE_FLOOR: &str = "1000000TB";

/// Starts `n` nodes; `node_args[i]` are extra flags of node `i`; the fault hook is on.
async fn start(n: u64, node_args: &[(usize, &[&str])]) -> Cluster {
    let mut opts = LocalClusterOptions::new(env!("CARGO_BIN_EXE_schedulerd"), n)
        .env("SCHED_LOG", "info,openraft=warn")
        .env(raft::fault::ENV, "1")
        .http(true);
    for (i, args) in node_args {
        opts.nodes[*i].args.extend(args.iter().map(|a| a.to_string()));
    }
    let mut c = Cluster { local: LocalCluster::prepare(opts).expect("cluster layout") };
    if let Err(e) = c.local.start_all().await {
        panic!("starting the cluster: {e}");
    }
    c
}

/// Replaces the value of `--flag` in node `i`'s command line (for its next start).
fn set_flag(c: &mut Cluster, i: usize, flag: &str, value: &str) {
    let args = &mut c.nodes[i].process_mut().spec_mut().args;
    match args.iter().position(|a| a == flag) {
        Some(p) => args[p + 1] = value.into(),
        None => args.extend([flag.into(), value.into()]),
    }
}

fn log_of(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(c.nodes[i].log()).unwrap_or_default()
}

fn inject(c: &Cluster, i: usize, faults: &str) {
    std::fs::write(c.nodes[i].data_dir.join(raft::fault::FILE), faults).unwrap();
}

fn heal(c: &Cluster, i: usize) {
    let _ = std::fs::remove_file(c.nodes[i].data_dir.join(raft::fault::FILE));
}

/// Waits until node `i` exits on its own; its exit status and how long it took.
async fn wait_exit(
    c: &mut Cluster,
    i: usize,
    within: Duration,
) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    loop {
        if let Some(s) = c.nodes[i].process_mut().try_exited().unwrap() {
            return (s, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "node {} still runs {within:?} after its disk failed:\n{}",
            c.nodes[i].id,
            c.nodes[i].log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit_via(addr: &str, name: &str) -> Result<u64, tonic::Status> {
    let mut t = TasksClient::new(channel(addr).await);
    let r = t.submit_tasks(pb::SubmitTasksRequest { tasks: vec![spec(name, 0)] }).await?;
    Ok(r.into_inner().tasks[0].id)
}

/// The value of the sample `name` (no labels) on a metrics page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

async fn cluster_status(addr: &str) -> pb::ClusterStatusResponse {
    retry(&[addr.to_string()], |ch| async move {
        ClusterClient::new(ch).status(pb::ClusterStatusRequest {}).await.map(|r| r.into_inner())
    })
    .await
    .expect("cluster status")
}

async fn transfer_to(c: &Cluster, target: usize) {
    let id = c.nodes[target].id;
    let addrs = c.addrs();
    retry(&addrs, |ch| async move {
        ClusterClient::new(ch).transfer_leader(pb::TransferLeaderRequest { to: id }).await
    })
    .await
    .expect("leader transfer");
    wait_until("the target leads", Duration::from_secs(30), || async {
        c.leader().await == Some(target)
    })
    .await
    .unwrap();
}

fn assert_disk_refusal(s: &tonic::Status, node: u64, data_dir: &std::path::Path) {
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    assert_eq!(reason_of(s), Some(Reason::DiskSpaceLow), "{s:?}");
    let m = s.message();
    let path = data_dir.display().to_string();
    for part in [format!("node {node}"), path, "free".into(), "floor".into()] {
        assert!(m.contains(&part), "the refusal names {part:?}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d10_a_node_below_its_disk_floor_refuses_new_submits_and_nothing_else() {
    // Node 3 (index 2) keeps a floor above the free space of any disk.
    let mut c = start(3, &[(2, &["--min-free-disk", HUGE_FLOOR])]).await;
    let low = 2;
    let low_id = c.nodes[low].id;
    let low_dir = c.nodes[low].data_dir.clone();
    let leader = c.wait_leader().await;
    if leader == low {
        transfer_to(&c, 0).await;
    }
    let ok = c.nodes[0].addr.clone();
    let other = c.nodes[1].addr.clone();
    let low_addr = c.nodes[low].addr.clone();

    // Tasks accepted while a healthy node leads: one to cancel, one for a worker to finish.
    let to_cancel = submit(std::slice::from_ref(&ok), vec![spec("to-cancel", 0)]).await[0];
    let to_run = submit(std::slice::from_ref(&ok), vec![spec("to-run", 0)]).await[0];

    // Through the low node itself: refused, naming the node, its directory and the floor.
    let e = submit_via(&low_addr, "via-low").await.expect_err("the low node refuses");
    assert_disk_refusal(&e, low_id, &low_dir);
    // Through the others, while a healthy node leads: accepted.
    submit_via(&other, "via-other").await.expect("a healthy leader accepts");

    // Status and metrics show it.
    let st = cluster_status(&ok).await;
    let n = st.nodes.iter().find(|n| n.id == low_id).unwrap();
    assert!(n.disk_low && n.disk_free_bytes > 0, "{n:?}");
    assert_eq!(n.data_dir, low_dir.display().to_string());
    assert!(n.disk_min_free_bytes > n.disk_free_bytes);
    assert!(st
        .nodes
        .iter()
        .filter(|n| n.id != low_id)
        .all(|n| !n.disk_low && n.disk_free_bytes > 0));
    let page = http_get(c.nodes[low].http.as_deref().unwrap(), "/metrics").await.unwrap().1;
    assert_eq!(sample(&page, "raftsched_disk_low"), Some(1.0), "{page}");
    assert_eq!(sample(&page, "raftsched_disk_min_free_bytes"), Some(1e18));
    assert!(sample(&page, "raftsched_disk_free_bytes").is_some_and(|f| f > 0.0));
    promtool_check(&page);
    let healthy = http_get(c.nodes[0].http.as_deref().unwrap(), "/metrics").await.unwrap().1;
    assert_eq!(sample(&healthy, "raftsched_disk_low"), Some(0.0));

    // When the low node leads, new submits are refused cluster-wide, with its reason.
    transfer_to(&c, low).await;
    for addr in [&ok, &other, &low_addr] {
        let e = submit_via(addr, "while-low-leads").await.expect_err("refused cluster-wide");
        assert_disk_refusal(&e, low_id, &low_dir);
    }
    // Everything that lets work finish still works through every node: reads, cancels,
    // worker registration, heartbeats, assignment and completion.
    let mut t = TasksClient::new(channel(&other).await);
    let got = t.get_task(pb::GetTaskRequest { id: to_cancel, stale_ok: false }).await.unwrap();
    assert_eq!(got.into_inner().id, to_cancel);
    let r = t
        .cancel_tasks(pb::CancelTasksRequest { ids: vec![to_cancel], ..Default::default() })
        .await
        .expect("cancel under the floor")
        .into_inner();
    assert_eq!(r.results.len(), 1);
    let worker = TestWorker::spawn(c.addrs(), "disk-w", 1, Duration::from_millis(50));
    wait_until("the task runs to completion under the floor", Duration::from_secs(30), || async {
        let tasks = all_tasks(std::slice::from_ref(&ok)).await;
        state(&tasks[&to_run]) == "succeeded" && state(&tasks[&to_cancel]) == "cancelled"
    })
    .await
    .unwrap();
    assert!(worker.accepted().contains(&to_run));
    drop(worker);

    // Restarted with a lower floor, the node accepts submits again.
    c.kill(low);
    set_flag(&mut c, low, "--min-free-disk", "1MiB");
    c.restart(low);
    c.wait_serving(low, Duration::from_secs(30)).await.unwrap();
    let id = retry(std::slice::from_ref(&low_addr), |ch| async move {
        let req = pb::SubmitTasksRequest { tasks: vec![spec("after-lowering", 0)] };
        TasksClient::new(ch).submit_tasks(req).await.map(|r| r.into_inner().tasks[0].id)
    })
    .await
    .expect("accepted after lowering the floor");
    assert!(id > to_run);
    wait_until("status shows the disk fine again", Duration::from_secs(10), || async {
        let st = cluster_status(&ok).await;
        st.nodes.iter().any(|n| n.id == low_id && n.reachable && !n.disk_low)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d20_eio_on_the_leaders_fsync_stops_it_and_the_cluster_keeps_every_task() {
    let mut c = start(3, &[]).await;
    let leader = c.wait_leader().await;
    let leader_id = c.nodes[leader].id;
    let addrs = c.addrs();
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.extend(submit(&addrs, vec![spec(&format!("before-{i}"), 0)]).await);
    }

    inject(&c, leader, "log-sync EIO\n");
    // The next write makes the leader sync its log; its answer does not matter (the client
    // retries elsewhere with its idempotency key).
    let _ = submit_via(&c.nodes[leader].addr, "during").await;
    let (status, took) = wait_exit(&mut c, leader, PROMPTLY).await;
    assert!(!status.success(), "a node whose disk failed exits non-zero: {status}");
    let log = log_of(&c, leader);
    assert!(log.contains("Input/output error"), "the message names the error:\n{log}");
    assert!(log.contains("raft-log/"), "the message names the file:\n{log}");
    assert!(log.contains("free on"), "the message tells the free space:\n{log}");
    eprintln!("leader exited {status} {took:?} after the injected EIO");

    // A new leader, every acknowledged task still there, writes accepted again.
    let rest: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let rest_addrs: Vec<String> = rest.iter().map(|i| c.nodes[*i].addr.clone()).collect();
    wait_until("a new leader", Duration::from_secs(30), || async {
        c.leader_among(&rest).await.is_some_and(|l| l != leader)
    })
    .await
    .unwrap();
    let after = submit(&rest_addrs, vec![spec("after", 0)]).await[0];
    let tasks = all_tasks(&rest_addrs).await;
    for id in &acked {
        assert!(tasks.contains_key(id), "acknowledged task {id} survived the leader's disk");
    }
    assert!(tasks.contains_key(&after));

    // Recovery: the disk is replaced (the fault is gone) and the node restarts and catches up.
    heal(&c, leader);
    c.restart(leader);
    c.wait_serving(leader, Duration::from_secs(30)).await.unwrap();
    let mine = vec![c.nodes[leader].addr.clone()];
    wait_until("the restarted node sees every task", Duration::from_secs(30), || async {
        let t = all_tasks(&mine).await;
        acked.iter().chain([&after]).all(|id| t.contains_key(id))
    })
    .await
    .unwrap();
    assert!(c.nodes.iter().all(|n| n.id != leader_id || n.is_running()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d30_a_full_disk_stops_the_node_promptly_even_after_sigterm() {
    let mut c = start(3, &[]).await;
    let leader = c.wait_leader().await;
    let f = (leader + 1) % 3;
    let addrs = c.addrs();
    let before = submit(&addrs, vec![spec("before", 0)]).await[0];

    // A follower's disk fills: its next log write fails with ENOSPC and it stops by itself.
    inject(&c, f, "log-write ENOSPC\n");
    let during = submit(&addrs, vec![spec("during", 0)]).await[0];
    let (status, _) = wait_exit(&mut c, f, PROMPTLY).await;
    assert!(!status.success(), "{status}");
    let log = log_of(&c, f);
    assert!(log.contains("No space left on device"), "{log}");
    assert!(log.contains("raft-log/") && log.contains("free on"), "{log}");
    // The others keep serving with nothing lost.
    let rest: Vec<String> = (0..3).filter(|i| *i != f).map(|i| c.nodes[i].addr.clone()).collect();
    let after = submit(&rest, vec![spec("after", 0)]).await[0];
    let tasks = all_tasks(&rest).await;
    assert!([before, during, after].iter().all(|id| tasks.contains_key(id)));

    // Space is freed: the node restarts and catches up. Then its disk fills again for every
    // kind of write, and it is told to stop while writes keep coming: it exits promptly
    // either way, never hanging in shutdown.
    heal(&c, f);
    c.restart(f);
    c.wait_serving(f, Duration::from_secs(30)).await.unwrap();
    let seen = log_of(&c, f).len();
    inject(&c, f, "log-write ENOSPC\nlog-sync ENOSPC\nsm-write ENOSPC\n");
    let _ = submit(&rest, vec![spec("while-full", 0)]).await;
    assert!(c.nodes[f].process().signal(libc::SIGTERM));
    let (status, took) = wait_exit(&mut c, f, PROMPTLY).await;
    let log = log_of(&c, f);
    let failed = log[seen..].contains("No space left on device");
    // Whichever came first, the stop or the failure: a non-zero exit names the error.
    assert!(status.success() || failed, "{status}:\n{}", &log[seen..]);
    eprintln!("full node exited {status} {took:?} after SIGTERM (storage error seen: {failed})");
    let last = submit(&rest, vec![spec("last", 0)]).await[0];
    assert!(all_tasks(&rest).await.contains_key(&last));
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// `None` (the test is skipped, loudly) where mounting needs privileges we lack.
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "\n!!!!!!!! SKIPPED the real full-disk test: cannot mount a tmpfs here \
                 (needs root); the injected ENOSPC test covers the same path !!!!!!!!\n"
            );
            return None;
        }
        Some(SmallFs { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// The reported bug itself, on a real filesystem that fills up: the node used to log the
/// error and then hang forever in shutdown (sled's flush after an IO error never returns),
/// ignoring SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d40_a_really_full_disk_stops_the_node_promptly() {
    let Some(fs) = SmallFs::mount("12m") else { return };
    let data = fs.dir.path().join("node-1");
    let addr = client::ports::free_addr().unwrap().to_string();
    let log_path = std::env::temp_dir().join(format!("raftsched-full-{}.log", rand_u64()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_schedulerd"))
        .args(["--id", "1", "--listen", &addr, "--bootstrap", "--min-free-disk", "0"])
        .arg("--data-dir")
        .arg(&data)
        .env("SCHED_LOG", "info,openraft=warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let payload = vec![7u8; 200 << 10];
    let mut exited = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut accepted = 0;
    while exited.is_none() && Instant::now() < deadline {
        let mut t = TasksClient::new(channel(&addr).await);
        let task = pb::TaskSpec { payload: payload.clone(), ..spec(&format!("big-{accepted}"), 0) };
        if t.submit_tasks(pb::SubmitTasksRequest { tasks: vec![task] }).await.is_ok() {
            accepted += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exited = child.try_wait().unwrap().map(|s| (s, Instant::now()));
    }
    // Once the disk is full, the node must be gone within PROMPTLY.
    let until = Instant::now() + PROMPTLY;
    while exited.is_none() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        exited = child.try_wait().unwrap().map(|s| (s, Instant::now()));
    }
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let Some((status, _)) = exited else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the node with a full disk did not exit ({accepted} tasks accepted):\n{text}");
    };
    assert!(!status.success(), "{status}\n{text}");
    assert!(text.contains("No space left on device"), "{text}");
    let dir = data.display().to_string();
    assert!(text.contains(&format!("free on {dir}")), "names the path and free space:\n{text}");
    assert!(accepted > 0, "the disk filled before any task: {text}");
}
