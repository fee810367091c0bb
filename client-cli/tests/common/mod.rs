//! A real local cluster for integration tests: `schedulerd` processes on free loopback ports
//! with temporary data directories, initialised with `schedctl cluster init`, plus helpers to
//! run `schedctl` against it and to start `schedctl worker run` processes.
//!
//! Every wait polls a condition until a deadline; every process is killed when the cluster is
//! dropped (also when a test fails).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous bound for conditions that normally hold within a second.
pub const WAIT: Duration = Duration::from_secs(60);

/// Cluster tests run one at a time: several 3-node clusters at once on a small machine
/// would make leader elections flap and slow everything down.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the test lock; a failed test does not block the others.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The `schedctl` under test.
pub fn schedctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_schedctl"))
}

/// `schedulerd` from the same target directory (the parent of the test executable's
/// directory: `cargo test --workspace` builds every binary there).
pub fn schedulerd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let bin = dir.join("schedulerd");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release -p node` (or run `cargo test --workspace`)",
        bin.display()
    );
    bin
}

/// Free loopback ports, all distinct.
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| client::ports::free_port().expect("a free port")).collect()
}

/// Polls `f` until it returns `Some`, or panics with `what` after `WAIT`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The outcome of one `schedctl` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// The JSON document on stdout.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    /// Asserts exit code 0 and returns the JSON document.
    pub fn ok_json(&self) -> Value {
        assert_eq!(self.code, 0, "schedctl failed: {self:?}");
        self.json()
    }
}

/// Runs `schedctl` with these arguments (no cluster implied).
pub fn schedctl(args: &[&str]) -> Run {
    let out = Command::new(schedctl_bin())
        .args(args)
        .env_remove("SCHED_ENDPOINTS")
        .stdin(Stdio::null())
        .output()
        .expect("run schedctl");
    Run::from(out)
}

struct Node {
    id: u64,
    addr: String,
    child: Option<Child>,
}

/// A running cluster.
pub struct Cluster {
    nodes: Vec<Node>,
    workers: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes, initialises the cluster and waits for a leader.
    pub fn start(n: usize) -> Cluster {
        let bin = schedulerd_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_ports(2 * n);
        let mut nodes = Vec::new();
        for i in 0..n {
            let id = i as u64 + 1;
            let addr = format!("127.0.0.1:{}", ports[2 * i]);
            let log = std::fs::File::create(dir.path().join(format!("node-{id}.log"))).unwrap();
            let child = Command::new(&bin)
                .args(["--id", &id.to_string(), "--listen", &addr])
                .arg("--data-dir")
                .arg(dir.path().join(format!("node-{id}")))
                .args(["--http", &format!("127.0.0.1:{}", ports[2 * i + 1])])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start schedulerd");
            nodes.push(Node { id, addr, child: Some(child) });
        }
        let c = Cluster { nodes, workers: Vec::new(), dir };
        let mut init = vec!["cluster", "init"];
        let members: Vec<String> = c.nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect();
        for m in &members {
            init.push("--member");
            init.push(m);
        }
        // schedctl fails at once when nothing listens, so wait for the nodes to listen.
        for n in &c.nodes {
            wait_for(&format!("node {} to listen", n.id), || {
                std::net::TcpStream::connect(&n.addr).ok().map(|_| ())
            });
        }
        let first = c.nodes[0].addr.clone();
        let mut args = vec!["--endpoints", first.as_str(), "--retry-budget", "60s"];
        args.extend(init);
        let r = schedctl(&args);
        assert_eq!(r.code, 0, "cluster init failed: {r:?}\n{}", c.logs());
        c.leader();
        c
    }

    /// Every node address, comma-separated.
    pub fn endpoints(&self) -> String {
        self.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
    }

    /// Runs `schedctl --endpoints <all> ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Run {
        let endpoints = self.endpoints();
        let mut v = vec!["--endpoints", endpoints.as_str()];
        v.extend_from_slice(args);
        schedctl(&v)
    }

    /// Runs `schedctl -o json --endpoints <all> ARGS`, asserts success, returns the document.
    /// A failure shows the end of every node and worker log.
    pub fn ok(&self, args: &[&str]) -> Value {
        let mut v = vec!["-o", "json"];
        v.extend_from_slice(args);
        let r = self.ctl(&v);
        assert_eq!(r.code, 0, "schedctl {args:?} failed: {r:?}\n{}", self.logs());
        r.json()
    }

    /// The current leader's id (waits until there is one).
    pub fn leader(&self) -> u64 {
        wait_for("a leader", || {
            let r = self.ctl(&["-o", "json", "--retry-budget", "2s", "cluster", "status"]);
            if r.code != 0 {
                return None;
            }
            let id = r.json()["leader_id"].as_u64()?;
            (id != 0).then_some(id)
        })
    }

    /// SIGKILLs node `id`.
    pub fn kill(&mut self, id: u64) {
        let node = self.nodes.iter_mut().find(|n| n.id == id).expect("node id");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `schedctl worker run --exec CMD EXTRA...` against this cluster.
    pub fn start_worker(&mut self, id: &str, exec: &str, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).unwrap();
        let child = Command::new(schedctl_bin())
            .args(["--endpoints", &self.endpoints(), "worker", "run", "--exec", exec, "--id", id])
            .args(extra)
            .env_remove("SCHED_ENDPOINTS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start worker");
        self.workers.push(child);
        wait_for("the worker to register", || {
            let r = self.ctl(&["-o", "json", "worker", "list"]);
            let v = (r.code == 0).then(|| r.json())?;
            v["workers"]
                .as_array()?
                .iter()
                .any(|w| w["id"] == id && w["status"] == "alive")
                .then_some(())
        });
    }

    /// Submits a task and returns its id.
    pub fn submit(&self, args: &[&str]) -> u64 {
        let mut v = vec!["task", "submit"];
        v.extend_from_slice(args);
        let r = self.ok(&v);
        r["tasks"][0]["id"].as_u64().unwrap_or_else(|| panic!("no id in {r}"))
    }

    /// The task as `schedctl -o json task get` prints it.
    pub fn task(&self, id: u64) -> Value {
        self.ok(&["task", "get", &id.to_string()])
    }

    /// Waits until the task is in `state`.
    pub fn wait_state(&self, id: u64, state: &str) -> Value {
        wait_for(&format!("task {id} to be {state}"), || {
            let t = self.task(id);
            (t["state"] == state).then_some(t)
        })
    }

    /// Every node and worker log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    out.push_str(&format!("==> {} <==\n", p.display()));
                    for l in tail.iter().rev() {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// True while a process with this pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
