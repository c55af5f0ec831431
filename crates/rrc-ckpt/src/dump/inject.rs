//! Making system calls inside a stopped process during a checkpoint, and
//! leaving it exactly as it was afterwards.

use nix::unistd::Pid;

use crate::common::BLOCK_ALL;
use crate::dump::seize::SeizedProcess;
use crate::ptrace::{self, Regs};
use crate::remote::Remote;
use crate::{Error, Result, nr, procmem};

/// Room for the outputs of 1,365 threads' batches (48 bytes each, see
/// `threads_and_signals`); pages never touched cost the process nothing.
pub const SCRATCH_SIZE: u64 = 96 * 1024;
/// Layout of the scratch memory: batch code, call table, call outputs.
const CODE_AT: u64 = 0;
const TABLE_AT: u64 = 4096;
pub const OUT_AT: u64 = 32 * 1024;

/// A process whose threads the engine drives. Dropping it (or
/// [`Injector::finish`]) puts back every register and signal mask and
/// unmaps the scratch memory.
pub struct Injector {
    pid: Pid,
    threads: Vec<(Pid, Regs, u64)>,
    syscall_ip: u64,
    scratch: Option<u64>,
    finished: bool,
}

/// Finds a `syscall` instruction in the process's executable memory,
/// preferring the vDSO (always there, never unmapped by the process).
pub fn find_syscall_insn(pid: Pid) -> Result<u64> {
    // The vDSO's line first, without parsing the whole map.
    if let Ok(text) = crate::procfs::read_text(format!("/proc/{pid}/maps"))
        && let Some(line) = text.lines().find(|l| l.ends_with("[vdso]"))
        && let Some((s, e)) = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'))
        && let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
    {
        let mut buf = vec![0u8; (e - s) as usize];
        if procmem::read(pid, s, &mut buf).is_ok()
            && let Some(off) = buf.windows(2).position(|w| w == [0x0f, 0x05])
        {
            return Ok(s + off as u64);
        }
    }
    let maps = procfs::process::Process::new(pid.as_raw())
        .and_then(|p| p.maps())
        .map_err(Error::proc(pid.as_raw(), "memory maps"))?;
    let mut candidates: Vec<(u64, u64)> = Vec::new();
    for m in maps.iter() {
        if !m.perms.contains(procfs::process::MMPermissions::EXECUTE) {
            continue;
        }
        let (s, e) = m.address;
        if m.pathname == procfs::process::MMapPath::Vdso {
            candidates.insert(0, (s, e));
        } else if m.perms.contains(procfs::process::MMPermissions::READ) {
            candidates.push((s, e));
        }
    }
    for (start, end) in candidates {
        let len = (end - start).min(4 << 20) as usize;
        let mut buf = vec![0u8; len];
        if procmem::read(pid, start, &mut buf).is_err() {
            continue;
        }
        if let Some(off) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(start + off as u64);
        }
    }
    Err(Error::Unsupported(vec![format!(
        "process {pid} has no executable memory with a syscall instruction"
    )]))
}

impl Injector {
    pub fn new(p: &SeizedProcess) -> Result<Injector> {
        let mut inj = Injector {
            pid: p.pid,
            threads: Vec::new(),
            syscall_ip: 0,
            scratch: None,
            finished: false,
        };
        for t in &p.threads {
            let regs = ptrace::get_regs(t.tid)?;
            let mask = ptrace::get_sigmask(t.tid)?;
            inj.threads.push((t.tid, regs, mask));
            ptrace::set_sigmask(t.tid, BLOCK_ALL)?;
        }
        inj.syscall_ip = find_syscall_insn(p.pid)?;
        Ok(inj)
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The registers and signal mask a thread had when it was stopped.
    pub fn original(&self, tid: Pid) -> (Regs, u64) {
        let (_, r, m) = self
            .threads
            .iter()
            .find(|(t, _, _)| *t == tid)
            .expect("a thread of this process");
        (*r, *m)
    }

    /// A driver for calls made by thread `tid`.
    pub fn remote(&self, tid: Pid) -> Remote {
        let (regs, _) = self.original(tid);
        Remote::new(tid, self.syscall_ip, regs)
    }

    /// Memory in the process for call arguments and results, mapped on
    /// first use.
    pub fn scratch(&mut self) -> Result<u64> {
        if let Some(a) = self.scratch {
            return Ok(a);
        }
        let mut r = self.remote(self.pid);
        let addr = r.call(
            "mmap scratch memory",
            nr::SYS_mmap,
            &[
                0,
                SCRATCH_SIZE,
                (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        self.scratch = Some(addr);
        procmem::write(self.pid, addr + CODE_AT, &crate::remote::BATCH_CODE)?;
        Ok(addr)
    }

    /// Makes the calls of `batch` in thread `tid`, in one round trip;
    /// outputs they write should point into [`OUT_AT`] onwards.
    pub fn batch(&mut self, tid: Pid, batch: &crate::remote::Batch) -> Result<Vec<i64>> {
        let base = self.scratch()?;
        let max = (OUT_AT - TABLE_AT) as usize / crate::remote::BATCH_ENTRY - 1;
        let mut out = Vec::with_capacity(batch.len());
        if batch.len() <= max {
            return self
                .remote(tid)
                .run_batch(batch, base + CODE_AT, base + TABLE_AT);
        }
        // Too long for one table: in pieces.
        let mut piece = crate::remote::Batch::new();
        for (i, (nr, args)) in batch.calls().enumerate() {
            piece.push(nr, &args);
            if piece.len() == max || i + 1 == batch.len() {
                out.extend(
                    self.remote(tid)
                        .run_batch(&piece, base + CODE_AT, base + TABLE_AT)?,
                );
                piece = crate::remote::Batch::new();
            }
        }
        Ok(out)
    }

    /// The engine's own mapping in the process, if any: no part of the
    /// process's image.
    pub fn scratch_range(&self) -> Option<(u64, u64)> {
        self.scratch.map(|a| (a, a + SCRATCH_SIZE))
    }

    /// Makes the calls of each batch in its thread, all threads at once
    /// (one wake-up latency for all instead of one each); results in the
    /// same order. Outputs of different threads must not overlap.
    pub fn batch_each(&mut self, work: &[(Pid, crate::remote::Batch)]) -> Result<Vec<Vec<i64>>> {
        let base = self.scratch()?;
        let mut at = TABLE_AT;
        let mut tables = Vec::with_capacity(work.len());
        for (_, b) in work {
            let len = ((b.len() + 1) * crate::remote::BATCH_ENTRY) as u64;
            if at + len > OUT_AT {
                // No room for all the tables: one thread at a time.
                return work.iter().map(|(tid, b)| self.batch(*tid, b)).collect();
            }
            tables.push(at);
            at += len;
        }
        // Every table in one write, every result in one read.
        let mut all = Vec::with_capacity((at - TABLE_AT) as usize);
        for (_, b) in work {
            all.extend_from_slice(&b.table());
        }
        procmem::write(self.pid, base + TABLE_AT, &all)?;
        let mut started = 0;
        let mut first_err = None;
        for ((tid, _), t) in work.iter().zip(&tables) {
            match self.remote(*tid).start_written(base + CODE_AT, base + t) {
                Ok(()) => started += 1,
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
        }
        // Every thread set running is waited for, whatever happened.
        for (tid, _) in work.iter().take(started) {
            if let Err(e) = self.remote(*tid).wait_batch() {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        procmem::read(self.pid, base + TABLE_AT, &mut all)?;
        Ok(work
            .iter()
            .zip(&tables)
            .map(|((_, b), t)| {
                let from = (t - TABLE_AT) as usize;
                b.results(&all[from..from + (b.len() + 1) * crate::remote::BATCH_ENTRY])
            })
            .collect())
    }

    /// Reads back what a call left in scratch memory.
    pub fn read_scratch(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let base = self.scratch.expect("scratch mapped before use");
        procmem::read(self.pid, base + offset, buf)
    }

    /// Unmaps the scratch memory and puts registers and masks back.
    pub fn finish(mut self) -> Result<()> {
        self.undo()
    }

    fn undo(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let mut first_err = None;
        if let Some(addr) = self.scratch.take() {
            let mut r = self.remote(self.pid);
            if let Err(e) = r.call(
                "munmap scratch memory",
                nr::SYS_munmap,
                &[addr, SCRATCH_SIZE],
            ) {
                first_err.get_or_insert(e);
            }
        }
        for (tid, regs, mask) in &self.threads {
            if let Err(e) = ptrace::set_regs(*tid, regs).and(ptrace::set_sigmask(*tid, *mask)) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = self.undo();
    }
}
