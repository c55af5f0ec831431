//! The memory of another process (a stopped tracee, or a snapshot of one):
//! ranges read and written with `process_vm_readv`/`process_vm_writev`,
//! and runs of pages copied in as few calls as the kernel allows.
//!
//! Every transfer is checked here for being whole: a short one (a range
//! that was unmapped, or a page that cannot be faulted in) is an error,
//! never a partial copy the caller could miss.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;

use nix::sys::uio::{RemoteIoVec, process_vm_readv, process_vm_writev};
use nix::unistd::Pid;

use crate::image::PageRun;
use crate::procfs::PAGE_SIZE;
use crate::{Error, Result};

/// Ranges per vectored call: the kernel's `UIO_MAXIOV`.
const IOV_MAX: usize = 1024;

fn fail(pid: Pid, op: &'static str, detail: String) -> Error {
    Error::Memory {
        pid: pid.as_raw(),
        op,
        detail,
    }
}

/// Reads `buf.len()` bytes at `addr` of `pid`.
pub fn read(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
    let len = buf.len();
    read_vectored(
        pid,
        &[RemoteIoVec {
            base: addr as usize,
            len,
        }],
        buf,
    )
    .map_err(|e| fail(pid, "read", format!("at {addr:#x}: {e}")))
}

/// Writes `bytes` at `addr` of `pid` (the pages must be writable).
pub fn write(pid: Pid, addr: u64, bytes: &[u8]) -> Result<()> {
    let len = bytes.len();
    write_vectored(
        pid,
        &[IoSlice::new(bytes)],
        &[RemoteIoVec {
            base: addr as usize,
            len,
        }],
    )
    .map_err(|e| fail(pid, "write", format!("at {addr:#x}+{len}: {e}")))
}

/// Why a vectored transfer fell through: the kernel's error, or fewer
/// bytes than asked.
enum Transfer {
    Failed(nix::errno::Errno),
    Short { done: usize, want: usize },
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transfer::Failed(e) => write!(f, "{e}"),
            Transfer::Short { done, want } => write!(f, "short transfer, {done} of {want} bytes"),
        }
    }
}

/// Reads the remote ranges, in order, into `buf` (exactly as long as
/// they are together); at most [`IOV_MAX`] ranges.
fn read_vectored(
    pid: Pid,
    remote: &[RemoteIoVec],
    buf: &mut [u8],
) -> std::result::Result<(), Transfer> {
    let want = buf.len();
    let done =
        process_vm_readv(pid, &mut [IoSliceMut::new(buf)], remote).map_err(Transfer::Failed)?;
    if done != want {
        return Err(Transfer::Short { done, want });
    }
    Ok(())
}

/// Writes the local slices, in order, over the remote ranges (of the same
/// total length); at most [`IOV_MAX`] of each.
fn write_vectored(
    pid: Pid,
    local: &[IoSlice],
    remote: &[RemoteIoVec],
) -> std::result::Result<(), Transfer> {
    let want: usize = remote.iter().map(|r| r.len).sum();
    let done = process_vm_writev(pid, local, remote).map_err(Transfer::Failed)?;
    if done != want {
        return Err(Transfer::Short { done, want });
    }
    Ok(())
}

/// Copies page runs of `pid` into `out`, each run at its `offset` less
/// `base`. Runs whose pages cannot be read by the process itself
/// (`readable[i]` false: PROT_NONE or write-only) are read through
/// `/proc/PID/mem`, which ignores protections; consecutive readable runs
/// whose places in `out` are consecutive too (as when runs are laid out
/// in order) go in one call.
pub fn read_runs(
    pid: Pid,
    runs: &[PageRun],
    readable: &[bool],
    out: &mut [u8],
    base: u64,
) -> Result<()> {
    let raw = pid.as_raw();
    let mut mem: Option<File> = None;
    let place = |out_len: usize, r: &PageRun, len: usize| -> Result<std::ops::Range<usize>> {
        let at = r.offset.checked_sub(base).map(|a| a as usize);
        match at {
            Some(at) if at.checked_add(len).is_some_and(|end| end <= out_len) => Ok(at..at + len),
            _ => Err(fail(
                pid,
                "read",
                format!("pages at {:#x} do not fit the buffer", r.start),
            )),
        }
    };
    let mut i = 0;
    while i < runs.len() {
        if !readable.get(i).copied().unwrap_or(true) {
            let r = runs[i];
            let len = r.count.saturating_mul(PAGE_SIZE) as usize;
            if mem.is_none() {
                mem = Some(
                    File::open(format!("/proc/{raw}/mem"))
                        .map_err(|e| fail(pid, "read", format!("/proc/{raw}/mem: {e}")))?,
                );
            }
            let m = mem.as_ref().expect("opened above");
            let dst = place(out.len(), &r, len)?;
            m.read_exact_at(&mut out[dst], r.start)
                .map_err(|e| fail(pid, "read", format!("{:#x}+{len}: {e}", r.start)))?;
            i += 1;
            continue;
        }
        let mut j = i;
        let mut remote = Vec::new();
        let mut len = 0usize;
        while j < runs.len()
            && readable.get(j).copied().unwrap_or(true)
            && j - i < IOV_MAX
            && runs[j].offset == runs[i].offset.saturating_add(len as u64)
        {
            let n = runs[j].count.saturating_mul(PAGE_SIZE) as usize;
            remote.push(RemoteIoVec {
                base: runs[j].start as usize,
                len: n,
            });
            len = len.saturating_add(n);
            j += 1;
        }
        let dst = place(out.len(), &runs[i], len)?;
        read_vectored(pid, &remote, &mut out[dst]).map_err(|e| {
            fail(
                pid,
                "read",
                format!("{} runs from {:#x}: {e}", j - i, runs[i].start),
            )
        })?;
        i = j;
    }
    Ok(())
}

/// Copies page runs into `pid`, each from its `offset` in `data`, in
/// calls of up to [`IOV_MAX`] runs.
pub fn write_runs(pid: Pid, runs: &[PageRun], data: &[u8]) -> Result<()> {
    for batch in runs.chunks(IOV_MAX) {
        let mut local = Vec::with_capacity(batch.len());
        let mut remote = Vec::with_capacity(batch.len());
        for r in batch {
            let len = r.count.saturating_mul(PAGE_SIZE) as usize;
            let src = data
                .get(r.offset as usize..(r.offset as usize).saturating_add(len))
                .ok_or_else(|| {
                    fail(
                        pid,
                        "write",
                        format!("pages at {:#x} lie beyond their data", r.start),
                    )
                })?;
            local.push(IoSlice::new(src));
            remote.push(RemoteIoVec {
                base: r.start as usize,
                len,
            });
        }
        write_vectored(pid, &local, &remote).map_err(|e| {
            fail(
                pid,
                "write",
                format!("{} runs from {:#x}: {e}", batch.len(), batch[0].start),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Pid {
        Pid::this()
    }

    #[test]
    fn reads_and_writes_own_memory() {
        let src = [1u8, 2, 3, 4, 5];
        let mut dst = [0u8; 5];
        read(me(), src.as_ptr() as u64, &mut dst).unwrap();
        assert_eq!(dst, src);
        let mut target = [0u8; 3];
        write(me(), target.as_mut_ptr() as u64, &[7, 8, 9]).unwrap();
        assert_eq!(std::hint::black_box(target), [7, 8, 9]);
    }

    #[test]
    fn unmapped_memory_is_an_error() {
        let mut buf = [0u8; 8];
        let e = read(me(), 8, &mut buf).unwrap_err();
        assert!(matches!(e, Error::Memory { op: "read", .. }), "{e}");
    }

    #[test]
    fn runs_copy_both_ways() {
        let page = PAGE_SIZE as usize;
        // Three pages of our own: runs of one and two pages, stored in
        // reverse order of address.
        let mut region = vec![0u8; 4 * page];
        let start = (region.as_ptr() as usize).next_multiple_of(page);
        let off = start - region.as_ptr() as usize;
        for (i, b) in region[off..off + 3 * page].iter_mut().enumerate() {
            *b = (i / page) as u8 + 1;
        }
        let runs = [
            PageRun {
                start: start as u64,
                count: 1,
                offset: 2 * PAGE_SIZE,
            },
            PageRun {
                start: (start + page) as u64,
                count: 2,
                offset: 0,
            },
        ];
        let mut out = vec![0u8; 3 * page];
        read_runs(me(), &runs, &[true, true], &mut out, 0).unwrap();
        assert!(out[..page].iter().all(|b| *b == 2));
        assert!(out[page..2 * page].iter().all(|b| *b == 3));
        assert!(out[2 * page..].iter().all(|b| *b == 1));
        // The same through /proc/PID/mem for the first run.
        let mut again = vec![0u8; 3 * page];
        read_runs(me(), &runs, &[false, true], &mut again, 0).unwrap();
        assert_eq!(again, out);
        let flipped: Vec<u8> = out.iter().map(|b| b + 10).collect();
        write_runs(me(), &runs, &flipped).unwrap();
        let region = std::hint::black_box(region);
        assert!(region[off..off + page].iter().all(|b| *b == 11));
        assert!(region[off + page..off + 3 * page].iter().all(|b| *b >= 12));
        // Data that does not cover a run is refused, not read past.
        let e = write_runs(me(), &runs, &flipped[..page]).unwrap_err();
        assert!(matches!(e, Error::Memory { op: "write", .. }), "{e}");
    }
}
