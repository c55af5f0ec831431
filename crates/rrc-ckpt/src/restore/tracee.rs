//! A process being restored: its threads (all stopped, traced by us), and
//! the scratch region through which the engine makes calls in it.
//!
//! The scratch region sits at the same address in every process of the
//! tree (children inherit it from their parent skeleton) and holds a
//! `syscall` instruction at its start and argument space after it.

use nix::unistd::Pid;

use crate::ptrace::{self, Regs};
use crate::remote::{BATCH_CODE, BATCH_ENTRY, Batch, Remote, Spawned};
use crate::{Error, Result, procmem};

/// Size of the scratch region: one code page and argument space.
pub const SCRATCH_SIZE: u64 = 1 << 20;
const ARGS_OFFSET: u64 = 4096;
/// Where the batch code sits in the code page, after the `syscall`.
const BATCH_CODE_AT: u64 = 64;

/// How a process the engine ended ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Exited(i32),
    Killed(nix::sys::signal::Signal),
}

pub struct Tracee {
    /// The pid the image numbers it with.
    pub ns_pid: i32,
    /// Its pid in our namespace.
    pub pid: Pid,
    /// Threads created so far (ns tid, host tid); the first is the leader.
    pub threads: Vec<(i32, Pid)>,
    pub scratch: u64,
    base: Regs,
    next_arg: u64,
}

impl Tracee {
    pub fn new(ns_pid: i32, pid: Pid, scratch: u64) -> Result<Tracee> {
        let base = ptrace::get_regs(pid)?;
        Ok(Tracee {
            ns_pid,
            pid,
            threads: vec![(ns_pid, pid)],
            scratch,
            base,
            next_arg: ARGS_OFFSET,
        })
    }

    fn remote_for(&self, tid: Pid) -> Remote {
        Remote::new(tid, self.scratch, self.base)
    }

    /// A system call made by the process's main thread; errors name `what`.
    pub fn call(&mut self, what: &'static str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.remote_for(self.pid).call(what, nr, args);
        self.reset_args();
        r
    }

    /// The raw result (negative errno on failure) of a call by thread `tid`.
    pub fn raw_on(&mut self, tid: Pid, nr: i64, args: &[u64]) -> Result<i64> {
        let r = self.remote_for(tid).raw(nr, args);
        self.reset_args();
        r
    }

    pub fn call_on(&mut self, tid: Pid, what: &'static str, nr: i64, args: &[u64]) -> Result<u64> {
        let r = self.remote_for(tid).call(what, nr, args);
        self.reset_args();
        r
    }

    /// A call that creates processes or threads; returns their host ids.
    pub fn call_spawning(
        &mut self,
        what: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<(u64, Spawned)> {
        let (r, spawned) = self.remote_for(self.pid).raw_spawning(nr, args)?;
        self.reset_args();
        if (-4095..0).contains(&r) {
            return Err(Error::RemoteFailed {
                tid: self.pid.as_raw(),
                what,
                errno: nix::errno::Errno::from_raw(-r as i32),
            });
        }
        Ok((r as u64, spawned))
    }

    /// Makes the call that ends the process (`exit`), by its only thread;
    /// returns how it ended. Its parent can then reap it.
    pub fn end(self, nr: i64, args: &[u64]) -> Result<Ended> {
        match self.remote_for(self.pid).final_call(nr, args)? {
            ptrace::Stop::Exited(code) => Ok(Ended::Exited(code)),
            ptrace::Stop::Killed(sig) => Ok(Ended::Killed(sig)),
            other => Err(Error::Restore {
                pid: self.ns_pid,
                stage: "end a process",
                detail: format!("{other:?}"),
            }),
        }
    }

    /// Ends thread `tid` of the process, one just made and not yet among
    /// its `threads`.
    pub fn end_thread(&self, tid: Pid) -> Result<()> {
        match self.remote_for(tid).final_call(libc::SYS_exit, &[0])? {
            ptrace::Stop::Exited(_) => Ok(()),
            other => Err(Error::Restore {
                pid: self.ns_pid,
                stage: "end a thread",
                detail: format!("{other:?}"),
            }),
        }
    }

    /// Ends the process by signal `sig`, delivered from the stop it is in
    /// (it must not block it, and its action must be the default one);
    /// returns how it ended.
    pub fn end_by_signal(self, sig: nix::sys::signal::Signal) -> Result<Ended> {
        nix::sys::ptrace::cont(self.pid, Some(sig)).map_err(|e| Error::Ptrace {
            what: "resume",
            tid: self.pid.as_raw(),
            source: e,
        })?;
        loop {
            match ptrace::wait_stop(self.pid)? {
                ptrace::Stop::Exited(code) => return Ok(Ended::Exited(code)),
                ptrace::Stop::Killed(sig) => return Ok(Ended::Killed(sig)),
                ptrace::Stop::Signal(s) => nix::sys::ptrace::cont(self.pid, Some(s)),
                ptrace::Stop::Event(_, _) => nix::sys::ptrace::cont(self.pid, None),
            }
            .map_err(|e| Error::Ptrace {
                what: "resume",
                tid: self.pid.as_raw(),
                source: e,
            })?;
        }
    }

    /// Makes the calls of `batch` by the main thread, in as few round trips
    /// as the scratch region allows (see [`crate::remote::BATCH_CODE`]);
    /// returns each call's raw result. Arguments placed with
    /// [`Tracee::arg`] before stay where they are.
    pub fn batch(&mut self, batch: &Batch) -> Result<Vec<i64>> {
        self.batch_on(self.pid, batch)
    }

    /// As [`Tracee::batch`], by thread `tid`.
    pub fn batch_on(&mut self, tid: Pid, batch: &Batch) -> Result<Vec<i64>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let code = self.scratch + BATCH_CODE_AT;
        procmem::write(self.pid, code, &BATCH_CODE)?;
        let table_at = self.next_arg.next_multiple_of(BATCH_ENTRY as u64);
        let room = (SCRATCH_SIZE.saturating_sub(table_at) as usize / BATCH_ENTRY).saturating_sub(1);
        if room == 0 {
            return Err(Error::Restore {
                pid: self.ns_pid,
                stage: "call arguments",
                detail: "no room left for a call table".into(),
            });
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut piece = Batch::new();
        for (i, (nr, args)) in batch.calls().enumerate() {
            piece.push(nr, &args);
            if piece.len() == room || i + 1 == batch.len() {
                let r = self
                    .remote_for(tid)
                    .run_batch(&piece, code, self.scratch + table_at);
                out.extend(r?);
                piece = Batch::new();
            }
        }
        self.reset_args();
        Ok(out)
    }

    /// Copies `bytes` into the argument space; returns their address in the
    /// process. Valid until the next call.
    pub fn arg(&mut self, bytes: &[u8]) -> Result<u64> {
        let len = bytes.len() as u64;
        let at = self.next_arg.next_multiple_of(16);
        if at + len > SCRATCH_SIZE {
            return Err(Error::Restore {
                pid: self.ns_pid,
                stage: "call arguments",
                detail: format!("{len} bytes do not fit the scratch region"),
            });
        }
        procmem::write(self.pid, self.scratch + at, bytes)?;
        self.next_arg = at + len;
        Ok(self.scratch + at)
    }

    /// A NUL-terminated copy of `s` in the argument space.
    pub fn arg_str(&mut self, s: &str) -> Result<u64> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.arg(&b)
    }

    /// Room for a call to write `len` bytes into; read it back with
    /// [`procmem::read`].
    pub fn out(&mut self, len: usize) -> Result<u64> {
        self.arg(&vec![0u8; len])
    }

    fn reset_args(&mut self) {
        self.next_arg = ARGS_OFFSET;
    }
}
