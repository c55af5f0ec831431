//! Tracing threads: seizing, stopping, reading and writing their state.

use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, sys};

/// The general-purpose registers of a thread (`struct user_regs_struct`),
/// fs/gs base included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

macro_rules! regs_conv {
    ($($f:ident),*) => {
        impl From<libc::user_regs_struct> for Regs {
            fn from(r: libc::user_regs_struct) -> Regs {
                Regs { $($f: r.$f),* }
            }
        }
        impl From<Regs> for libc::user_regs_struct {
            fn from(r: Regs) -> libc::user_regs_struct {
                libc::user_regs_struct { $($f: r.$f),* }
            }
        }
    };
}
regs_conv!(
    r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs,
    eflags, rsp, ss, fs_base, gs_base, ds, es, fs, gs
);

/// Error values a system call interrupted by a stop leaves in `rax`; the
/// kernel restarts the call when the thread resumes.
pub const ERESTARTSYS: i64 = -512;
pub const ERESTARTNOINTR: i64 = -513;
pub const ERESTARTNOHAND: i64 = -514;
pub const ERESTART_RESTARTBLOCK: i64 = -516;

fn err(what: &'static str, tid: Pid) -> impl FnOnce(Errno) -> Error {
    move |e| Error::Ptrace {
        what,
        tid: tid.as_raw(),
        source: e,
    }
}

/// Why a traced thread stopped (or ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// A `PTRACE_EVENT_*` stop, with the event's message.
    Event(i32, u64),
    /// About to receive a signal (signal-delivery-stop).
    Signal(Signal),
    Exited(i32),
    Killed(Signal),
}

/// Waits for the next stop of `tid` (any thread, traced by us).
pub fn wait_stop(tid: Pid) -> Result<Stop> {
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceEvent(_, _, ev)) => {
                let msg = ptrace::getevent(tid).unwrap_or(0) as u64;
                return Ok(Stop::Event(ev, msg));
            }
            Ok(WaitStatus::Stopped(_, sig)) => return Ok(Stop::Signal(sig)),
            Ok(WaitStatus::Exited(_, code)) => return Ok(Stop::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(Stop::Killed(sig)),
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(err("wait", tid)(e)),
        }
    }
}

/// Sets `options` through `set` with `PTRACE_O_SUSPEND_SECCOMP` added,
/// as for every thread the engine traces: the thread's seccomp filters
/// do not apply to it while traced, so that the calls the engine makes
/// in it (checkpoint, restore) are not refused by a filter the program or
/// its container installed. It needs CAP_SYS_ADMIN and a kernel built with
/// checkpoint/restore support; where it is refused the thread is traced
/// without it (and its filters, if any, apply).
fn suspending(options: Options, set: impl Fn(Options) -> nix::Result<()>) -> nix::Result<()> {
    match set(options | Options::from_bits_retain(libc::PTRACE_O_SUSPEND_SECCOMP)) {
        Err(Errno::EINVAL | Errno::EPERM) => {
            SUSPEND_REFUSED.store(true, std::sync::atomic::Ordering::Relaxed);
            set(options)
        }
        r => r,
    }
}

/// Set once the kernel refused to suspend seccomp for a traced thread.
static SUSPEND_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether every thread traced so far has its seccomp suspended: a thread
/// in seccomp's strict mode can make no call of the engine's otherwise.
pub fn seccomp_suspended() -> bool {
    !SUSPEND_REFUSED.load(std::sync::atomic::Ordering::Relaxed)
}

pub fn seize(tid: Pid, options: Options) -> Result<()> {
    suspending(options, |o| ptrace::seize(tid, o)).map_err(err("seize", tid))
}

pub fn interrupt(tid: Pid) -> Result<()> {
    ptrace::interrupt(tid).map_err(err("interrupt", tid))
}

/// Sets the options of a thread seized by [`seize`] (which keeps seccomp
/// suspended where it could).
pub fn set_options(tid: Pid, options: Options) -> Result<()> {
    suspending(options, |o| ptrace::setoptions(tid, o)).map_err(err("set options", tid))
}

/// The thread's seccomp filters, the first installed first (see
/// [`sys::seccomp_filters`]).
pub fn seccomp_filters(tid: Pid) -> Result<Vec<Vec<libc::sock_filter>>> {
    sys::seccomp_filters(tid).map_err(|e| {
        err("read seccomp filters", tid)(Errno::from_raw(e.raw_os_error().unwrap_or(0)))
    })
}

pub fn get_regs(tid: Pid) -> Result<Regs> {
    ptrace::getregs(tid)
        .map(Regs::from)
        .map_err(err("read registers", tid))
}

pub fn set_regs(tid: Pid, regs: &Regs) -> Result<()> {
    ptrace::setregs(tid, (*regs).into()).map_err(err("write registers", tid))
}

pub fn get_xstate(tid: Pid, size: usize) -> Result<Vec<u8>> {
    sys::get_xstate(tid, size).map_err(|e| err("read extended registers", tid)(io_errno(e)))
}

pub fn set_xstate(tid: Pid, state: &[u8]) -> Result<()> {
    sys::set_xstate(tid, state).map_err(|e| err("write extended registers", tid)(io_errno(e)))
}

pub fn get_sigmask(tid: Pid) -> Result<u64> {
    sys::get_sigmask(tid).map_err(|e| err("read signal mask", tid)(io_errno(e)))
}

pub fn set_sigmask(tid: Pid, mask: u64) -> Result<()> {
    sys::set_sigmask(tid, mask).map_err(|e| err("write signal mask", tid)(io_errno(e)))
}

pub fn step(tid: Pid) -> Result<()> {
    ptrace::step(tid, None).map_err(err("single-step", tid))
}

pub fn detach(tid: Pid, sig: Option<Signal>) -> Result<()> {
    ptrace::detach(tid, sig).map_err(err("detach", tid))
}

/// Collects the deaths of traced threads `left` for up to `within`, the
/// threads whose deaths were not collected left in it. A thread
/// `still` no longer names (a later task given its number) is dropped;
/// one `set_aside` takes (on its way out, say) is no longer waited for,
/// but collected meanwhile if it can be (a pid namespace's first process
/// waits for its namespace's other tasks, one of which may be a thread
/// set aside); those not collected are returned.
pub fn collect_deaths(
    left: &mut Vec<Pid>,
    still: impl Fn(Pid) -> bool,
    mut set_aside: impl FnMut(Pid) -> bool,
    within: std::time::Duration,
) -> Vec<Pid> {
    // Whether `tid` is still to be collected.
    let pending = |tid: Pid| -> bool {
        if !still(tid) {
            return false;
        }
        match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_) => false,
            Ok(WaitStatus::StillAlive) => true,
            Ok(_) => {
                let _ = nix::sys::ptrace::cont(tid, None);
                true
            }
        }
    };
    let mut aside = Vec::new();
    let deadline = std::time::Instant::now() + within;
    while !left.is_empty() && std::time::Instant::now() < deadline {
        left.retain(|&tid| {
            if !pending(tid) {
                return false;
            }
            if set_aside(tid) {
                aside.push(tid);
                return false;
            }
            true
        });
        aside.retain(|&tid| pending(tid));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    aside
}

pub fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}
