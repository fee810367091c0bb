//! One child process of the harness: started from a [`ProcSpec`], output appended to a log
//! file, killed (SIGKILL) when dropped.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::wait::wait_until;
use crate::Error;

/// How to start a process. Starting it again (after a kill or an exit) uses the same spec.
#[derive(Clone, Debug)]
pub struct ProcSpec {
    /// Its name in errors and log headers ("node 2", "worker-1").
    pub name: String,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Environment variables set on top of this process's own environment.
    pub env: Vec<(OsString, OsString)>,
    /// Environment variables of this process that the child does not inherit.
    pub env_remove: Vec<OsString>,
    /// Where stdout and stderr go (appended to, across restarts). Stdin is `/dev/null`.
    pub log: PathBuf,
    /// Run it in its own process group, so a Ctrl-C in the terminal reaches only this
    /// process (which then stops its children in order).
    pub own_process_group: bool,
    /// Linux: have the kernel send it SIGTERM when the thread that started it exits (so it
    /// does not outlive a parent that could not clean up). Start such processes from a
    /// long-lived thread.
    pub term_on_parent_death: bool,
}

impl ProcSpec {
    /// `program` with no arguments, logging to `log`.
    pub fn new(
        name: impl Into<String>,
        program: impl Into<PathBuf>,
        log: impl Into<PathBuf>,
    ) -> Self {
        ProcSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            log: log.into(),
            own_process_group: false,
            term_on_parent_death: false,
        }
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Keeps an environment variable of this process from the child.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.env_remove.push(key.into());
        self
    }
}

/// A child process (running or not) and the spec to start it again.
///
/// Dropping it SIGKILLs the process (after a SIGCONT, should it be paused) and reaps it.
#[derive(Debug)]
pub struct Proc {
    spec: ProcSpec,
    child: Option<Child>,
    paused: bool,
}

impl Proc {
    /// A process that is not started yet.
    pub fn new(spec: ProcSpec) -> Proc {
        Proc { spec, child: None, paused: false }
    }

    /// Starts a process from `spec`.
    pub fn spawn(spec: ProcSpec) -> Result<Proc, Error> {
        let mut p = Proc::new(spec);
        p.start()?;
        Ok(p)
    }

    /// Starts the process unless it runs already (a no-op then).
    pub fn start(&mut self) -> Result<(), Error> {
        if self.child.is_some() {
            return Ok(());
        }
        let s = &self.spec;
        let io = |what: String| move |source| Error::Io { what, source };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .map_err(io(format!("opening {}", s.log.display())))?;
        let err = out.try_clone().map_err(io(format!("opening {}", s.log.display())))?;
        let mut cmd = Command::new(&s.program);
        cmd.args(&s.args).stdin(Stdio::null()).stdout(out).stderr(err);
        for k in &s.env_remove {
            cmd.env_remove(k);
        }
        for (k, v) in &s.env {
            cmd.env(k, v);
        }
        if s.own_process_group {
            cmd.process_group(0);
        }
        #[cfg(target_os = "linux")]
        if s.term_on_parent_death {
            // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let child =
            cmd.spawn().map_err(io(format!("starting {} ({})", s.name, s.program.display())))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The spec it is started from.
    pub fn spec(&self) -> &ProcSpec {
        &self.spec
    }

    /// The spec, to change for the next start (e.g. restart a node with other flags).
    pub fn spec_mut(&mut self) -> &mut ProcSpec {
        &mut self.spec
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.spec.log
    }

    /// True from a start until a kill or an observed exit ([`Proc::try_exited`]); a paused
    /// process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// True while SIGSTOPped by [`Proc::pause`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the process in bytes (Linux), while running.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// Sends `sig` to the process; false when it is not running or the signal failed.
    pub fn signal(&self, sig: i32) -> bool {
        let Some(pid) = self.pid() else { return false };
        // SAFETY: kill(2) on a child we started and have not reaped, so the pid is still ours.
        unsafe { libc::kill(pid as i32, sig) == 0 }
    }

    /// SIGSTOP.
    pub fn pause(&mut self) {
        if self.signal(libc::SIGSTOP) {
            self.paused = true;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
        self.paused = false;
    }

    /// SIGKILL (after a SIGCONT, so a paused process dies at once) and reap. A no-op when it
    /// is not running.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.paused {
                self.signal_child(&c, libc::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    fn signal_child(&self, c: &Child, sig: i32) {
        // SAFETY: as in `signal`: the child is not reaped yet.
        unsafe {
            libc::kill(c.id() as i32, sig);
        }
    }

    /// Whether the process has exited on its own: reaps it and returns its status (it no
    /// longer runs then), or `None` while it runs or when it was not started.
    pub fn try_exited(&mut self) -> Result<Option<ExitStatus>, Error> {
        let Some(c) = self.child.as_mut() else { return Ok(None) };
        let status = c.try_wait().map_err(|source| Error::Io {
            what: format!("checking on {}", self.spec.name),
            source,
        })?;
        if status.is_some() {
            self.child = None;
            self.paused = false;
        }
        Ok(status)
    }

    /// [`Error::Exited`] with the end of the log if the process has exited on its own.
    pub fn check_running(&mut self) -> Result<(), Error> {
        match self.try_exited()? {
            None => Ok(()),
            Some(status) => Err(Error::Exited {
                what: self.spec.name.clone(),
                status: status.to_string(),
                log: self.spec.log.clone(),
                log_tail: self.log_tail(15),
            }),
        }
    }

    /// The last `lines` lines of its log (empty if there is none yet).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.spec.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Stops processes gracefully: SIGTERM to each (SIGCONT first if paused), up to `grace` for
/// all of them to exit, then SIGKILL for the rest. Returns the names of those that had to be
/// killed.
pub async fn stop_gracefully(procs: &mut [&mut Proc], grace: Duration) -> Vec<String> {
    for p in procs.iter_mut() {
        if p.paused {
            p.resume();
        }
        p.signal(libc::SIGTERM);
    }
    let exited = wait_until("processes to exit after SIGTERM", grace, || {
        // A failed check counts as still running: the kill below reaps it.
        let all =
            procs.iter_mut().all(|p| matches!(p.try_exited(), Ok(Some(_))) || !p.is_running());
        std::future::ready(all)
    })
    .await;
    let mut killed = Vec::new();
    if exited.is_err() {
        for p in procs.iter_mut().filter(|p| p.is_running()) {
            killed.push(p.name().to_string());
            p.kill();
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(dir: &Path, name: &str) -> ProcSpec {
        ProcSpec::new(name, "sh", dir.join(format!("{name}.log")))
            .args(["-c", "echo started $GREETING; exec sleep 30"])
            .env("GREETING", "hello")
    }

    #[test]
    fn a_process_is_paused_resumed_killed_and_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Proc::spawn(sleeper(dir.path(), "p")).unwrap();
        let pid = p.pid().unwrap();
        super::super::wait_until_blocking("the log line", Duration::from_secs(10), || {
            p.log_tail(1) == "started hello"
        })
        .unwrap();
        assert!(p.rss_bytes().is_some_and(|b| b > 0));
        p.pause();
        assert!(p.is_paused());
        p.resume();
        assert!(!p.is_paused());
        p.kill();
        assert!(!p.is_running() && p.pid().is_none());
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_err(), "reaped");
        p.start().unwrap();
        assert!(p.is_running() && p.pid() != Some(pid));
        // The log is appended to across restarts.
        super::super::wait_until_blocking("the second log line", Duration::from_secs(10), || {
            p.log_tail(2) == "started hello\nstarted hello"
        })
        .unwrap();
    }

    #[test]
    fn an_exit_is_reported_with_the_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ProcSpec::new("quitter", "sh", dir.path().join("q.log"))
            .args(["-c", "echo bad flag >&2; exit 3"]);
        let mut p = Proc::spawn(spec).unwrap();
        let e = super::super::wait_until_blocking("the exit", Duration::from_secs(10), || {
            p.check_running().err()
        })
        .unwrap();
        let text = e.to_string();
        assert!(text.starts_with("quitter exited (exit status: 3)"), "{text}");
        assert!(text.ends_with("bad flag"), "{text}");
        assert!(!p.is_running());
    }

    #[test]
    fn a_missing_program_is_a_precise_error() {
        let dir = tempfile::tempdir().unwrap();
        let e =
            Proc::spawn(ProcSpec::new("ghost", dir.path().join("nope"), dir.path().join("g.log")))
                .unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        assert!(e.to_string().starts_with("starting ghost ("), "{e}");
    }

    #[tokio::test]
    async fn graceful_stop_terminates_then_kills() {
        let dir = tempfile::tempdir().unwrap();
        let mut polite = Proc::spawn(sleeper(dir.path(), "polite")).unwrap();
        let stubborn = ProcSpec::new("stubborn", "sh", dir.path().join("s.log"))
            .args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]);
        let mut stubborn = Proc::spawn(stubborn).unwrap();
        super::super::wait_until("the trap", Duration::from_secs(10), || {
            std::future::ready(stubborn.log_tail(1) == "ready")
        })
        .await
        .unwrap();
        let killed =
            stop_gracefully(&mut [&mut polite, &mut stubborn], Duration::from_millis(500)).await;
        assert_eq!(killed, vec!["stubborn".to_string()]);
        assert!(!polite.is_running() && !stubborn.is_running());
    }
}
