//! Calls made inside a stopped process for incremental checkpoints: the
//! userfaultfd that tracks its writes, and copy-on-write snapshots.
//!
//! A snapshot is a clone of the process made by a call injected into it:
//! a new process with a copy-on-write copy of its memory, sharing its file
//! descriptor table (so that no file stays open because of it) and with no
//! exit signal (so that the process gets no SIGCHLD and its `wait` calls do
//! not see it: only `__WALL`/`__WCLONE` waits do). The engine traces it from
//! birth, so it never runs a single instruction; it reads the pages from it
//! while the process runs on, then kills it. The dead snapshot stays a child
//! of the process until the process reaps it, which the engine makes it do
//! at the next checkpoint.

use std::os::fd::OwnedFd;

use nix::sys::ptrace::Options;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::dump::inject::Injector;
use crate::ptrace::{self, Stop};
use crate::remote::Batch;
use crate::{Error, Result, nr, sys};

/// `userfaultfd` flag: handle faults from user mode only, which is all
/// asynchronous write-protection needs and which an unprivileged process
/// may ask for.
const UFFD_USER_MODE_ONLY: u64 = 1;

/// Creates a userfaultfd in process `pid` (for its memory), takes it over,
/// and closes it in the process again.
pub fn take_userfaultfd(inj: &mut Injector, pid: Pid) -> Result<OwnedFd> {
    let mut r = inj.remote(pid);
    let fd = r.call(
        "userfaultfd",
        libc::SYS_userfaultfd,
        &[(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64 | UFFD_USER_MODE_ONLY],
    )?;
    let ours = sys::pidfd_open(pid).and_then(|pidfd| sys::steal_fd_via(&pidfd, fd as i32));
    let closed = r.call("close the userfaultfd", nr::SYS_close, &[fd]);
    let ours = ours.map_err(|e| Error::Proc {
        pid: pid.as_raw(),
        what: "userfaultfd",
        detail: e.to_string(),
    })?;
    closed?;
    Ok(ours)
}

/// A snapshot: the engine's pid for it, and the pid its parent knows it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub pid: Pid,
    pub ns_pid: i32,
}

/// Makes a snapshot of process `pid`; it is stopped, traced by the engine.
pub fn take(inj: &mut Injector, pid: Pid) -> Result<Snapshot> {
    ptrace::set_options(pid, Options::PTRACE_O_TRACECLONE)?;
    let made = inj
        .remote(pid)
        .raw_spawning(libc::SYS_clone, &[libc::CLONE_FILES as u64, 0, 0, 0, 0]);
    let reset = ptrace::set_options(pid, Options::empty());
    let (ret, spawned) = made?;
    if (-4095..0).contains(&ret) {
        return Err(Error::RemoteFailed {
            tid: pid.as_raw(),
            what: "clone (snapshot)",
            errno: nix::errno::Errno::from_raw(-ret as i32),
        });
    }
    let child = *spawned.tids.first().ok_or_else(|| Error::Remote {
        tid: pid.as_raw(),
        nr: libc::SYS_clone,
        detail: "the snapshot was not reported to the tracer".into(),
    })?;
    let snap = Snapshot {
        pid: child,
        ns_pid: ret as i32,
    };
    if let Err(e) = reset {
        end(child);
        return Err(e);
    }
    match ptrace::wait_stop(child) {
        Ok(Stop::Event(..)) | Ok(Stop::Signal(Signal::SIGSTOP)) => Ok(snap),
        Ok(other) => {
            end(child);
            Err(Error::Remote {
                tid: pid.as_raw(),
                nr: libc::SYS_clone,
                detail: format!("the snapshot stopped unexpectedly: {other:?}"),
            })
        }
        Err(e) => {
            end(child);
            Err(e)
        }
    }
}

/// Kills a snapshot and collects it as its tracer; it stays a zombie until
/// its parent reaps it.
pub fn end(child: Pid) {
    let _ = kill(child, Signal::SIGKILL);
    loop {
        match waitpid(child, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => break,
            Ok(_) => {
                let _ = nix::sys::ptrace::cont(child, None);
            }
        }
    }
}

/// Has the stopped process reap its dead snapshots.
pub fn reap(inj: &mut Injector, pid: Pid, snaps: &[Snapshot]) -> Result<()> {
    let mut b = Batch::new();
    for s in snaps {
        b.push(
            libc::SYS_wait4,
            &[s.ns_pid as u64, 0, (libc::WNOHANG | libc::__WALL) as u64, 0],
        );
    }
    let results = inj.batch(pid, &b)?;
    for (s, r) in snaps.iter().zip(results) {
        if r != i64::from(s.ns_pid) {
            tracing::warn!(
                process = pid.as_raw(),
                snapshot = s.ns_pid,
                result = r,
                "a snapshot was not reaped"
            );
        }
    }
    Ok(())
}
