//! A real local cluster for integration tests: `schedulerd` processes started by the
//! `client::local` harness on free loopback ports with temporary data directories,
//! initialised with `schedctl cluster init`, plus helpers to run `schedctl` against it and to
//! start `schedctl worker run` processes.
//!
//! Every wait polls a condition until a deadline (`client::local::wait_until_blocking`);
//! every process is killed when the cluster is dropped (also when a test fails).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use client::local::{wait_until_blocking, LocalCluster, LocalClusterOptions, Proc, ProcSpec};
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

/// Free loopback ports, all distinct.
pub fn free_ports(n: usize) -> Vec<u16> {
    (0..n).map(|_| client::ports::free_port().expect("a free port")).collect()
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

/// A running cluster.
pub struct Cluster {
    // Dropped in this order: the workers, then the nodes, then their directory.
    workers: Vec<Proc>,
    local: LocalCluster,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes, initialises the cluster and waits for a leader.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, &[])
    }

    /// [`Cluster::start`] with extra flags for every node.
    pub fn start_with(n: usize, args: &[&str]) -> Cluster {
        let bin = client::local::schedulerd_for_this_exe().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().expect("temp dir");
        // The harness waits until every node serves: schedctl fails at once when nothing
        // listens.
        let opts = LocalClusterOptions::new(bin, n as u64)
            .dir(dir.path())
            .http(true)
            .init(false)
            .args(args.iter().copied())
            .startup_timeout(WAIT);
        let local = LocalCluster::start_blocking(opts).unwrap_or_else(|e| panic!("{e}"));
        let c = Cluster { workers: Vec::new(), local, dir };
        let mut init = vec!["cluster", "init"];
        let members: Vec<String> =
            c.local.nodes.iter().map(|n| format!("{}={}", n.id, n.addr)).collect();
        for m in &members {
            init.push("--member");
            init.push(m);
        }
        let first = c.local.nodes[0].addr.clone();
        let mut args = vec!["--endpoints", first.as_str(), "--retry-budget", "60s"];
        args.extend(init);
        let r = schedctl(&args);
        assert_eq!(r.code, 0, "cluster init failed: {r:?}\n{}", c.logs());
        c.leader();
        c
    }

    /// Wraps nodes the caller started (e.g. from restored data directories) with `dir` as
    /// the directory for workers' logs.
    pub fn adopt(local: LocalCluster, dir: tempfile::TempDir) -> Cluster {
        Cluster { workers: Vec::new(), local, dir }
    }

    /// The harness behind this cluster (to kill, restart or add nodes).
    pub fn local_mut(&mut self) -> &mut LocalCluster {
        &mut self.local
    }

    /// The harness behind this cluster.
    pub fn local(&self) -> &LocalCluster {
        &self.local
    }

    /// Every node address, comma-separated.
    pub fn endpoints(&self) -> String {
        self.local.nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",")
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
        let i = self
            .local
            .wait_leader_blocking(WAIT)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
        self.local.nodes[i].id
    }

    /// SIGKILLs node `id`.
    pub fn kill(&mut self, id: u64) {
        let i = self.local.index_of(id).expect("node id");
        self.local.kill(i);
    }

    /// Starts `schedctl worker run --exec CMD EXTRA...` against this cluster.
    pub fn start_worker(&mut self, id: &str, exec: &str, extra: &[&str]) {
        let spec = ProcSpec::new(id, schedctl_bin(), self.dir.path().join(format!("{id}.log")))
            .args(["--endpoints", &self.endpoints(), "worker", "run", "--exec", exec, "--id", id])
            .args(extra)
            .env_remove("SCHED_ENDPOINTS");
        self.workers.push(Proc::spawn(spec).expect("start worker"));
        wait_until_blocking("the worker to register", WAIT, || {
            let r = self.ctl(&["-o", "json", "worker", "list"]);
            let v = (r.code == 0).then(|| r.json())?;
            v["workers"]
                .as_array()?
                .iter()
                .any(|w| w["id"] == id && w["status"] == "alive")
                .then_some(())
        })
        .unwrap();
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
        wait_until_blocking(&format!("task {id} to be {state}"), WAIT, || {
            let t = self.task(id);
            (t["state"] == state).then_some(t)
        })
        .unwrap()
    }

    /// The end of every node and worker log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = self.local.log_tails(30);
        for w in &self.workers {
            out.push_str(&format!(
                "--- {} log ({}), last 30 lines ---\n",
                w.name(),
                w.log().display()
            ));
            out.push_str(&w.log_tail(30));
            out.push('\n');
        }
        out
    }
}

/// True while a process with this pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
