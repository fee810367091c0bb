//! A shell task's processes against a real cluster and a real `schedctl worker run`: they die
//! with a SIGKILLed worker (nothing keeps running unsupervised beside the next attempt), and
//! the task's metadata reaches them as `SCHED_META_*`.

mod common;

use client::local::wait_until_blocking;
use common::{alive, serial, Cluster, WAIT};

const EXEC: &str = "sh -c \"$SCHED_PAYLOAD\"";

/// The pid in `path`, once the file exists (the payloads write it aside and rename it).
fn read_pid(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The closest ancestor of `pid` (itself excluded) running `schedctl`: the worker.
fn schedctl_ancestor(pid: i32) -> Option<i32> {
    let mut pid = pid;
    for _ in 0..16 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let ppid: i32 = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
        if ppid <= 1 {
            return None;
        }
        let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).ok()?;
        if comm.trim() == "schedctl" {
            return Some(ppid);
        }
        pid = ppid;
    }
    None
}

#[test]
fn a_sigkilled_worker_takes_its_task_processes_with_it() {
    let _serial = serial();
    let mut c = Cluster::start(1);
    c.start_worker("w-orphans", EXEC, &["--kill-grace", "2s"]);
    let d = c.dir.path().display().to_string();
    // A nested shell that records its pid and starts a background child, then waits: the
    // outer shell of the worker's command is the only process the worker knows about.
    let payload = format!(
        "sh -c 'sleep 300 & echo $! > {d}/bg.tmp && mv {d}/bg.tmp {d}/bg.pid; \
         echo $$ > {d}/inner.tmp && mv {d}/inner.tmp {d}/inner.pid; wait'"
    );
    let id = c.submit(&["--name", "nested", "--payload", &payload, "--max-attempts", "1"]);
    c.wait_state(id, "running");
    let inner = wait_until_blocking("the nested shell to start", WAIT, || {
        read_pid(&c.dir.path().join("inner.pid"))
    })
    .unwrap();
    let bg = wait_until_blocking("its background child to start", WAIT, || {
        read_pid(&c.dir.path().join("bg.pid"))
    })
    .unwrap();
    assert!(alive(inner) && alive(bg), "the task's processes are not running");
    let worker = schedctl_ancestor(inner)
        .unwrap_or_else(|| panic!("no schedctl above process {inner}\n{}", c.logs()));

    // SAFETY: plain syscall on the worker this test started.
    assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);

    wait_until_blocking("the task's processes to die with their worker", WAIT, || {
        (!alive(inner) && !alive(bg)).then_some(())
    })
    .unwrap();
}

#[test]
fn a_shell_task_sees_its_metadata() {
    let _serial = serial();
    let mut c = Cluster::start(1);
    c.start_worker("w-meta", EXEC, &[]);
    let t = c.ok(&[
        "task",
        "submit",
        "--name",
        "meta",
        "--meta",
        "owner=alice",
        "--meta",
        "build-id=42",
        "--payload",
        "printf '%s/%s' \"$SCHED_META_OWNER\" \"$SCHED_META_BUILD_ID\"",
        "--wait",
    ]);
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["result"], "alice/42", "{t}");
}
