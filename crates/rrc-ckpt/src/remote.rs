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

/// Machine code that makes a list of system calls in one go, so the engine
/// pays one ptrace round trip for the list instead of one per call. With
/// rbx pointing at a table of 64-byte entries `[nr, a0..a5, result]`, it
/// makes each call and stores its result, until an entry whose number is
/// -1, then traps (int3).
pub const BATCH_CODE: [u8; 46] = [
    0x48, 0x8b, 0x03, // 0: mov rax, [rbx]
    0x48, 0x83, 0xf8, 0xff, // 3: cmp rax, -1
    0x74, 0x24, // 7: je done (45)
    0x48, 0x8b, 0x7b, 0x08, // 9: mov rdi, [rbx+8]
    0x48, 0x8b, 0x73, 0x10, // 13: mov rsi, [rbx+16]
    0x48, 0x8b, 0x53, 0x18, // 17: mov rdx, [rbx+24]
    0x4c, 0x8b, 0x53, 0x20, // 21: mov r10, [rbx+32]
    0x4c, 0x8b, 0x43, 0x28, // 25: mov r8, [rbx+40]
    0x4c, 0x8b, 0x4b, 0x30, // 29: mov r9, [rbx+48]
    0x0f, 0x05, // 33: syscall
    0x48, 0x89, 0x43, 0x38, // 35: mov [rbx+56], rax
    0x48, 0x83, 0xc3, 0x40, // 39: add rbx, 64
    0xeb, 0xd3, // 43: jmp 0
    0xcc, // 45: done: int3
];

/// Bytes per entry of a batch table.
pub const BATCH_ENTRY: usize = 64;

/// System calls to make in one go (none may create a process or thread,
/// or unmap the code running them).
#[derive(Debug, Default, Clone)]
pub struct Batch {
    calls: Vec<(i64, [u64; 6])>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Adds a call; returns its index in the results.
    pub fn push(&mut self, nr: i64, args: &[u64]) -> usize {
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        self.calls.push((nr, a));
        self.calls.len() - 1
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn calls(&self) -> impl Iterator<Item = (i64, [u64; 6])> + '_ {
        self.calls.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The table the code reads, terminated.
    pub fn table(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity((self.calls.len() + 1) * BATCH_ENTRY);
        for (nr, args) in &self.calls {
            t.extend_from_slice(&(*nr as u64).to_ne_bytes());
            for a in args {
                t.extend_from_slice(&a.to_ne_bytes());
            }
            t.extend_from_slice(&0u64.to_ne_bytes());
        }
        t.extend_from_slice(&u64::MAX.to_ne_bytes());
        t.extend_from_slice(&[0u8; BATCH_ENTRY - 8]);
        t
    }

    /// Reads the results out of a table the code ran over.
    pub fn results(&self, table: &[u8]) -> Vec<i64> {
        (0..self.calls.len())
            .map(|i| {
                let at = i * BATCH_ENTRY + 56;
                i64::from_ne_bytes(table[at..at + 8].try_into().expect("8 bytes"))
            })
            .collect()
    }
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
        self.set_call(nr, args)?;
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

    /// Makes a call that ends the process (`exit`): returns how it ended,
    /// as its tracer sees it. Its parent can then reap it.
    pub fn final_call(&mut self, nr: i64, args: &[u64]) -> Result<Stop> {
        self.set_call(nr, args)?;
        ptrace::step(self.tid)?;
        loop {
            match ptrace::wait_stop(self.tid)? {
                end @ (Stop::Exited(_) | Stop::Killed(_)) => return Ok(end),
                Stop::Event(_, _) => ptrace::step(self.tid)?,
                other => {
                    return Err(Error::Remote {
                        tid: self.tid.as_raw(),
                        nr,
                        detail: format!("still alive after a call that ends it ({other:?})"),
                    });
                }
            }
        }
    }

    /// Points the thread at the `syscall` instruction with the call's
    /// number and arguments.
    fn set_call(&mut self, nr: i64, args: &[u64]) -> Result<()> {
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
        ptrace::set_regs(self.tid, &r)
    }

    /// Runs `batch` in the thread: [`BATCH_CODE`] must be at `code` and
    /// `table_len` writable bytes at `table`, in the tracee. Returns every
    /// call's raw result.
    pub fn run_batch(&mut self, batch: &Batch, code: u64, table: u64) -> Result<Vec<i64>> {
        self.start_batch(batch, code, table)?;
        self.finish_batch(batch, table)
    }

    /// Sets the thread running `batch` (see [`Remote::run_batch`]) without
    /// waiting for it, so that several threads run theirs at once.
    pub fn start_batch(&mut self, batch: &Batch, code: u64, table: u64) -> Result<()> {
        let bytes = batch.table();
        crate::procmem::write(self.tid, table, &bytes)
            .map_err(|e| self.batch_error(format!("write the call table: {e}")))?;
        self.start_written(code, table)
    }

    /// [`Remote::start_batch`] for a call table already written at
    /// `table`.
    pub fn start_written(&mut self, code: u64, table: u64) -> Result<()> {
        let mut r = self.base;
        r.rip = code;
        r.rbx = table;
        r.orig_rax = u64::MAX;
        ptrace::set_regs(self.tid, &r)?;
        nix::sys::ptrace::cont(self.tid, None).map_err(|e| Error::Ptrace {
            what: "resume",
            tid: self.tid.as_raw(),
            source: e,
        })
    }

    /// Waits for a batch started by [`Remote::start_batch`]; its results.
    pub fn finish_batch(&mut self, batch: &Batch, table: u64) -> Result<Vec<i64>> {
        self.wait_batch()?;
        let mut out = vec![0u8; (batch.len() + 1) * BATCH_ENTRY];
        crate::procmem::read(self.tid, table, &mut out)
            .map_err(|e| self.batch_error(format!("read the results: {e}")))?;
        Ok(batch.results(&out))
    }

    /// Waits for a batch started by [`Remote::start_written`] to end; its
    /// results are in its table.
    pub fn wait_batch(&mut self) -> Result<()> {
        match ptrace::wait_stop(self.tid)? {
            Stop::Signal(nix::sys::signal::Signal::SIGTRAP) => Ok(()),
            other => Err(self.batch_error(format!("stopped by {other:?} during a batch"))),
        }
    }

    fn batch_error(&self, detail: String) -> Error {
        Error::Remote {
            tid: self.tid.as_raw(),
            nr: -1,
            detail,
        }
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
