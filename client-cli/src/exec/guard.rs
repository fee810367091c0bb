//! The process guard: every process group a worker starts dies with the worker, however the
//! worker dies (SIGKILL and OOM kills included).
//!
//! A process cannot clean up after its own SIGKILL, so the cleanup lives in another process:
//! one *guard* per worker process, forked from it the first time a task is spawned.
//!
//! * The guard holds the read end of a pipe; only the worker holds the write end (`O_CLOEXEC`,
//!   so a task keeps it at most between its fork and its exec). Nothing else is ever written
//!   to it, so `read` returning 0 (end of file) means exactly one thing: the worker is gone.
//!   The kernel closes the write end on any death, there is no signal to miss and no polling.
//! * The pipe carries 4-byte native-endian records: `+pgid` registers a process group,
//!   `-pgid` unregisters it, `0` asks the guard to forget groups that no longer exist. A write
//!   of 4 bytes to a pipe is atomic, so records from several writers never interleave.
//! * A task's group is registered by the task's own process, in `pre_exec` after it became
//!   the leader of its group and before it runs anything: there is no moment at which the
//!   task could start processes the guard does not know about. The worker unregisters the
//!   group only after it killed what was left in it (see `GroupGuard` in the parent module).
//! * At end of file the guard SIGKILLs every registered group and exits.
//!
//! The guard is a fork of a multithreaded (tokio) process without an exec: until it exits it
//! may only make async-signal-safe calls (another thread may have held the allocator's or any
//! other lock at the fork). So it allocates nothing (its table of groups is allocated before
//! the fork), never panics, and calls only `read`, `kill`, `close_range`/`close`, `setsid`,
//! `prctl`, `sigprocmask`, `signal` and `_exit`. It also:
//!
//! * closes every inherited descriptor but its read end: a task's output pipes or the
//!   worker's sockets held open by the guard would hide the worker's death from their peers;
//! * starts a session (and so a process group) of its own: a terminal's Ctrl-C or hang-up,
//!   or a `kill` of the worker's group, reaches the worker but not the guard, which must
//!   outlive the worker by the instant it takes to kill the tasks;
//! * ignores the termination signals (`pkill schedctl` matches it too) and drops the
//!   worker's signal handlers: it ends at end of file, or by SIGKILL.
//!
//! Being a fork, the guard shares the worker's memory copy-on-write: it pins the worker's
//! private pages of the moment of the fork (about a MiB for `schedctl worker run`), no more.
//!
//! The worker keeps its own copy of the registered groups. Should the guard die anyway
//! (SIGKILL), the next spawn notices, forks a new one and registers them again.
//!
//! Limits: a process that leaves its group (`setsid`, `setpgid`) leaves the guard's care too.
//! A group is unregistered an instant after it was killed; if the worker dies in exactly that
//! instant and the kernel reuses the group's id for a new group in it, that group is killed.

use std::collections::BTreeSet;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Process groups one guard tracks at once: far more commands than a worker runs at a time,
/// and well below what the pipe buffers (16 Ki records), so re-registering them all with a
/// replacement guard never finds the pipe full.
pub(super) const CAPACITY: usize = 4096;

/// The record asking the guard to forget the groups that no longer exist.
const SWEEP: i32 = 0;

/// Signals the guard ignores: it ends at end of file or by SIGKILL, nothing else.
const IGNORED: [libc::c_int; 10] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGPIPE,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// A running guard process, seen from the worker.
pub(super) struct Guard {
    pid: libc::pid_t,
    /// The write end; closing it tells the guard to kill everything and exit.
    tx: ManuallyDrop<OwnedFd>,
    /// Its exit status was collected (the pid may belong to someone else by now).
    reaped: bool,
}

impl Guard {
    /// Forks a guard.
    pub(super) fn start() -> io::Result<Guard> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nothing else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A stalled guard (SIGSTOP) must not hang the worker or a task's start: with the write
        // end non-blocking, a full pipe (16 Ki records) is an error instead. The read end
        // stays blocking (a separate open file description).
        // SAFETY: plain fcntl calls on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(tx.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(tx.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let mut table = vec![0i32; CAPACITY].into_boxed_slice();
        let rx_fd = rx.as_raw_fd();
        // SAFETY: the child runs only `guard_main`, which is async-signal-safe and never
        // returns (so no destructor runs in the child either).
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => unsafe { guard_main(rx_fd, &mut table) },
            pid => {
                drop(rx);
                Ok(Guard { pid, tx: ManuallyDrop::new(tx), reaped: false })
            }
        }
    }

    /// The guard's process id.
    pub(super) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The write end, for a task's `pre_exec` to register itself ([`register_self`]).
    fn fd(&self) -> RawFd {
        self.tx.as_raw_fd()
    }

    /// Registers a process group.
    pub(super) fn add(&self, pgid: i32) -> io::Result<()> {
        write_record(self.fd(), pgid)
    }

    /// Unregisters a process group.
    pub(super) fn remove(&self, pgid: i32) -> io::Result<()> {
        write_record(self.fd(), pgid.wrapping_neg())
    }

    /// Asks the guard to forget groups that no longer exist.
    pub(super) fn sweep(&self) -> io::Result<()> {
        write_record(self.fd(), SWEEP)
    }

    /// Whether the guard is still running (collects its exit status when it is not).
    pub(super) fn alive(&mut self) -> bool {
        if self.reaped {
            return false;
        }
        let mut status = 0;
        // SAFETY: plain syscall on our own child.
        match unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) } {
            0 => true,
            -1 => match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => true,
                // Someone else collects our children (SIGCHLD ignored): ask the kernel.
                // SAFETY: signal 0 only checks for existence.
                Some(libc::ECHILD) if unsafe { libc::kill(self.pid, 0) } == 0 => true,
                _ => {
                    self.reaped = true;
                    false
                }
            },
            _ => {
                self.reaped = true;
                false
            }
        }
    }
}

impl Drop for Guard {
    /// Dropping a guard is the worker's death in miniature: the guard kills every group still
    /// registered and exits (waited for, briefly, so that it does not linger as a zombie).
    fn drop(&mut self) {
        // SAFETY: dropped exactly once, here.
        unsafe { ManuallyDrop::drop(&mut self.tx) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Writes one record (a 4-byte write to a pipe is atomic: never short, never interleaved).
fn write_record(fd: RawFd, record: i32) -> io::Result<()> {
    let bytes = record.to_ne_bytes();
    loop {
        // SAFETY: writes 4 bytes from a live buffer. The worker ignores SIGPIPE (as every
        // Rust program does by default), so a dead guard is EPIPE here, not a signal.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n == bytes.len() as isize {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if n < 0 { e } else { io::ErrorKind::WriteZero.into() });
    }
}

/// Runs in a task's process between fork and exec: makes sure it leads its own group, then
/// registers that group. Async-signal-safe; allocates nothing.
fn register_self(fd: RawFd) -> io::Result<()> {
    // SAFETY: getpid, getpgrp, setpgid and signal are async-signal-safe syscalls.
    unsafe {
        let pid = libc::getpid();
        // `process_group(0)` already did this; the group registered must be the one we lead
        // whatever the order of std's pre-exec steps.
        if libc::getpgrp() != pid && libc::setpgid(0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // std reset SIGPIPE to its default before this runs: a dead guard must fail the
        // spawn, not kill the task silently. Restored before exec (an ignored signal would
        // stay ignored in the command).
        let old = libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let res = write_record(fd, pid);
        if old != libc::SIG_ERR {
            libc::signal(libc::SIGPIPE, old);
        }
        res
    }
}

/// The worker's guard and the groups registered with it.
struct Shared {
    guard: Option<Guard>,
    /// Every group currently registered: re-registered with a replacement guard.
    groups: BTreeSet<i32>,
}

static SHARED: Mutex<Shared> = Mutex::new(Shared { guard: None, groups: BTreeSet::new() });

fn shared() -> MutexGuard<'static, Shared> {
    // The state stays consistent across a panic (every update is a single insert/remove).
    SHARED.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The live guard, started (again) if needed.
    fn live_guard(&mut self) -> io::Result<&Guard> {
        let dead = self.guard.as_mut().map(|g| !g.alive());
        if dead != Some(false) {
            if dead == Some(true) {
                tracing::warn!(
                    groups = self.groups.len(),
                    "the process guard died; starting a new one"
                );
            }
            self.guard = None;
            let guard = Guard::start()?;
            for &pgid in &self.groups {
                // Keep the new guard whatever happens: dropping it would kill the groups
                // already registered with it.
                if let Err(e) = guard.add(pgid) {
                    tracing::warn!(pgid, error = %e, "cannot register a process group again");
                }
            }
            tracing::debug!(pid = guard.pid(), "process guard started");
            self.guard = Some(guard);
        }
        self.guard.as_ref().ok_or_else(|| io::Error::other("no process guard"))
    }
}

/// Spawns `cmd` (set up with `process_group(0)`) with its process group registered with the
/// worker's guard, and returns it with its process group id. The caller kills the group when
/// the job ends, then calls [`release`].
///
/// Refuses to start a command it cannot guard. Errors are `EAGAIN`, `EPIPE` (the guard is
/// stalled or just died) and whatever starting `sh` fails with.
pub(super) fn spawn(cmd: &mut Command) -> io::Result<(Child, i32)> {
    // Held across the spawn (a synchronous fork and exec): a concurrent replacement of the
    // guard would close the descriptor the task is about to write to.
    let mut shared = shared();
    if shared.groups.len() >= CAPACITY - 1 {
        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
    }
    let guard = shared.live_guard()?;
    let fd = guard.fd();
    // SAFETY: `register_self` is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(move || register_self(fd));
    }
    match cmd.spawn() {
        Ok(child) => match child.id() {
            Some(pid) => {
                shared.groups.insert(pid as i32);
                Ok((child, pid as i32))
            }
            None => {
                let _ = guard.sweep();
                Err(io::Error::other("the command vanished at start"))
            }
        },
        Err(e) => {
            // The child may have registered itself before its exec failed; std collected it
            // before returning, so its group no longer exists and a sweep forgets it.
            let _ = guard.sweep();
            Err(e)
        }
    }
}

/// Unregisters a group whose remains the caller has just killed.
pub(super) fn release(pgid: i32) {
    let mut shared = shared();
    shared.groups.remove(&pgid);
    if let Some(guard) = &shared.guard {
        if let Err(e) = guard.remove(pgid) {
            // A dead guard forgot it anyway; a stalled one keeps a group that is gone.
            tracing::warn!(pgid, error = %e, "cannot unregister a process group");
        }
    }
}

/// The guard process. Never returns.
///
/// # Safety
///
/// Only in the child of a `fork`, with `rx` the read end of the guard's pipe and `table`
/// memory allocated before the fork.
unsafe fn guard_main(rx: RawFd, table: &mut [i32]) -> ! {
    // SAFETY (whole body): async-signal-safe syscalls only, on memory we own.
    unsafe {
        libc::setsid();
        libc::prctl(libc::PR_SET_NAME, c"sched-guard".as_ptr());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // The worker's handlers (tokio's) would write to descriptors closed below.
        for sig in 1..=64 {
            let action = if IGNORED.contains(&sig) { libc::SIG_IGN } else { libc::SIG_DFL };
            // SIGKILL, SIGSTOP and the C library's internal signals refuse: fine.
            libc::signal(sig, action);
        }
        close_all_but(rx);

        let mut live = 0usize;
        let mut buf = [0u8; 4096];
        let mut record = [0u8; 4];
        let mut have = 0usize;
        loop {
            let n = libc::read(rx, buf.as_mut_ptr().cast(), buf.len());
            if n == 0 {
                break;
            }
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                // Cannot supervise any more: fail safe, as if the worker had died.
                break;
            }
            // Writes are atomic 4-byte records, but a read is not promised to end on one.
            for &b in buf.iter().take(n as usize) {
                if let Some(slot) = record.get_mut(have) {
                    *slot = b;
                }
                have += 1;
                if have == record.len() {
                    have = 0;
                    apply(i32::from_ne_bytes(record), table, &mut live);
                }
            }
        }
        for &pgid in table.iter().take(live) {
            libc::kill(-pgid, libc::SIGKILL);
        }
        libc::_exit(0)
    }
}

/// Applies one record to the guard's table (`table[..live]` are the registered groups).
fn apply(record: i32, table: &mut [i32], live: &mut usize) {
    if record > 0 {
        if table.iter().take(*live).any(|&g| g == record) {
            return;
        }
        if *live >= table.len() {
            sweep(table, live);
        }
        // Still full: cannot happen (the worker refuses to start more than CAPACITY - 1).
        if let Some(slot) = table.get_mut(*live) {
            *slot = record;
            *live += 1;
        }
    } else if record < 0 {
        let pgid = record.wrapping_neg();
        if let Some(i) = table.iter().take(*live).position(|&g| g == pgid) {
            *live -= 1;
            table.swap(i, *live);
        }
    } else {
        sweep(table, live);
    }
}

/// Forgets the groups that no longer exist.
fn sweep(table: &mut [i32], live: &mut usize) {
    let mut i = 0;
    while i < *live {
        // SAFETY: signal 0 only checks for existence; errno is this thread's.
        let gone =
            unsafe { libc::kill(-table[i], 0) != 0 && *libc::__errno_location() == libc::ESRCH };
        if gone {
            *live -= 1;
            table.swap(i, *live);
        } else {
            i += 1;
        }
    }
}

/// Closes every descriptor but `keep`.
///
/// # Safety
///
/// Only in the guard (it closes descriptors other code may think it owns).
unsafe fn close_all_but(keep: RawFd) {
    // SAFETY: plain syscalls.
    unsafe {
        let keep = keep as libc::c_uint;
        let ok =
            (keep == 0 || close_range(0, keep - 1)) && close_range(keep + 1, libc::c_uint::MAX);
        if ok {
            return;
        }
        // Kernels before 5.9: one by one, up to the descriptor limit.
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 20) as libc::c_uint
        } else {
            1 << 16
        };
        for fd in 0..max {
            if fd != keep {
                libc::close(fd as libc::c_int);
            }
        }
    }
}

/// `close_range(2)` through `syscall` (the C library may predate its wrapper).
unsafe fn close_range(first: libc::c_uint, last: libc::c_uint) -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) == 0 }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command as StdCommand, Stdio};

    use super::*;
    use crate::local::wait_until_blocking;

    const WAIT: Duration = Duration::from_secs(20);

    fn sleeper() -> std::process::Child {
        StdCommand::new("sleep")
            .arg("300")
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start sleep")
    }

    #[test]
    fn the_guard_kills_registered_groups_when_the_worker_end_closes() {
        let mut kept = sleeper();
        let mut killed = sleeper();
        let guard = Guard::start().unwrap();
        guard.add(killed.id() as i32).unwrap();
        guard.add(kept.id() as i32).unwrap();
        guard.remove(kept.id() as i32).unwrap();
        // A group that is already gone is harmless.
        guard.add(i32::MAX - 1).unwrap();
        guard.sweep().unwrap();
        drop(guard);
        let mut status = None;
        wait_until_blocking("the registered group to be killed", WAIT, || {
            status = killed.try_wait().unwrap();
            status.is_some()
        })
        .unwrap();
        assert_eq!(status.unwrap().signal(), Some(libc::SIGKILL));
        assert!(kept.try_wait().unwrap().is_none(), "an unregistered group was killed");
        kept.kill().unwrap();
        kept.wait().unwrap();
    }

    #[test]
    fn the_guard_keeps_no_inherited_descriptor_and_stands_apart() {
        let mut fds = [-1; 2];
        // Close-on-exec, so that other tests' commands do not keep it; a fork (the guard)
        // inherits it all the same.
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
        // SAFETY: new descriptors owned by nothing else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut guard = Guard::start().unwrap();
        let pid = guard.pid();
        drop(tx);
        // Once the guard closed its copy of the write end (other tests' children may hold
        // one until their exec), the read end sees end of file.
        wait_until_blocking("the guard to close the inherited pipe", WAIT, || {
            let mut b = [0u8; 1];
            // SAFETY: reads into a live buffer.
            unsafe { libc::read(rx.as_raw_fd(), b.as_mut_ptr().cast(), 1) == 0 }
        })
        .unwrap();
        // Its own session and group; termination signals ignored.
        wait_until_blocking("the guard to set itself up", WAIT, || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let ignored = status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
                .unwrap();
            IGNORED.iter().all(|&s| ignored & (1 << (s - 1)) != 0)
        })
        .unwrap();
        // SAFETY: plain syscalls.
        unsafe {
            assert_eq!(libc::getsid(pid), pid);
            assert_eq!(libc::getpgid(pid), pid);
        }
        assert!(guard.alive());
        drop(guard);
    }

    #[test]
    fn a_full_table_forgets_dead_groups() {
        let mut table = [0i32; 3];
        let mut live = 0;
        // SAFETY: plain syscall.
        let me = unsafe { libc::getpgrp() };
        apply(me, &mut table, &mut live);
        apply(i32::MAX - 1, &mut table, &mut live);
        apply(i32::MAX - 2, &mut table, &mut live);
        apply(me, &mut table, &mut live);
        assert_eq!(live, 3);
        // Full: the two dead groups make room.
        apply(i32::MAX - 3, &mut table, &mut live);
        assert_eq!(live, 2);
        assert_eq!(&table[..2], &[me, i32::MAX - 3]);
        apply(-me, &mut table, &mut live);
        assert_eq!(&table[..live], &[i32::MAX - 3]);
        apply(-12345, &mut table, &mut live);
        assert_eq!(live, 1);
    }
}
