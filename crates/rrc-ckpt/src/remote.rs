//! System calls made by a stopped tracee on the engine's behalf.
//!
//! The thread's registers are pointed at a `syscall` instruction somewhere in
//! its address space, with the call's number and arguments, and the thread
//! is single-stepped over it: it stops again right after the call returns,
//! wherever that leaves it, which also lets the engine unmap the very page
//! the instruction was on. The original registers are put back by the
//! caller when it is done.

use nix::unistd::Pid;

use crate::ptrace::{self, Regs, Stop};
use crate::{Error, Result};

/// Events seen while a remote call ran (new threads or processes).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Spawned {
    pub tids: Vec<Pid>,
}

/// A stopped thread that makes system calls for us.
pub struct Remote {
    tid: Pid,
    /// Address of a `syscall` instruction (0f 05) in the tracee.
    syscall_ip: u64,
    /// Register values the calls start from (segment registers, flags).
    base: Regs,
}

/// Constants of `PTRACE_EVENT_*` stops that a remote call may produce.
const EVENT_FORK: i32 = 1;
const EVENT_CLONE: i32 = 3;

impl Remote {
    pub fn new(tid: Pid, syscall_ip: u64, base: Regs) -> Remote {
        Remote {
            tid,
            syscall_ip,
            base,
        }
    }

    pub fn tid(&self) -> Pid {
        self.tid
    }

    /// Moves future calls to another `syscall` instruction.
    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.syscall_ip = ip;
    }

    /// Makes system call `nr` with `args`; returns the kernel's raw result
    /// (a negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        self.raw_spawning(nr, args).map(|(r, _)| r)
    }

    /// As [`Remote::raw`], also reporting threads or processes the call
    /// created (they are traced and stopped).
    pub fn raw_spawning(&mut self, nr: i64, args: &[u64]) -> Result<(i64, Spawned)> {
        let mut r = self.base;
        r.rip = self.syscall_ip;
        r.rax = nr as u64;
        // No syscall restart logic must apply to a call we inject.
        r.orig_rax = u64::MAX;
        let regs = [
            &mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.r10, &mut r.r8, &mut r.r9,
        ];
        for (reg, a) in regs
            .into_iter()
            .zip(args.iter().chain(std::iter::repeat(&0)))
        {
            *reg = *a;
        }
        ptrace::set_regs(self.tid, &r)?;
        let mut spawned = Spawned::default();
        ptrace::step(self.tid)?;
        loop {
            match ptrace::wait_stop(self.tid)? {
                Stop::Signal(nix::sys::signal::Signal::SIGTRAP) => break,
                Stop::Event(ev, msg) if ev == EVENT_FORK || ev == EVENT_CLONE => {
                    spawned.tids.push(Pid::from_raw(msg as i32));
                    ptrace::step(self.tid)?;
                }
                Stop::Event(_, _) => ptrace::step(self.tid)?,
                Stop::Signal(sig) => {
                    // Signals are blocked while the engine works; one that
                    // cannot be blocked means the thread is being killed.
                    return Err(Error::Remote {
                        tid: self.tid.as_raw(),
                        nr,
                        detail: format!("stopped by {sig} during the call"),
                    });
                }
                Stop::Exited(code) => {
                    return Err(Error::Remote {
                        tid: self.tid.as_raw(),
                        nr,
                        detail: format!("exited with {code} during the call"),
                    });
                }
                Stop::Killed(sig) => {
                    return Err(Error::Remote {
                        tid: self.tid.as_raw(),
                        nr,
                        detail: format!("killed by {sig} during the call"),
                    });
                }
            }
        }
        let after = ptrace::get_regs(self.tid)?;
        Ok((after.rax as i64, spawned))
    }

    /// Makes a call and turns a negative result into an error naming `what`.
    pub fn call(&mut self, what: &'static str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(Error::RemoteFailed {
                tid: self.tid.as_raw(),
                what,
                errno: nix::errno::Errno::from_raw(-r as i32),
            });
        }
        Ok(r as u64)
    }
}
