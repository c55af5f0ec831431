//! Private memory moved into a pages file with one copy: the stopped
//! process is made to `vmsplice` its own pages into a pipe, which takes
//! references to them and copies nothing, and the engine `splice`s them
//! from the pipe into the file, the one copy. Reading the pages into the
//! engine first (`process_vm_readv`) and writing them out made a second
//! copy, and it was the larger part of a full checkpoint (46 of 77 ms for
//! a 151 MiB Redis).
//!
//! The pipe holds references, not copies: a page the process wrote after
//! its `vmsplice` would change in the pipe too. The process stays stopped
//! while [`PageSplicer::copy`] runs, and every page put in the pipe is
//! moved out before it returns.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::SpliceFFlags;
use nix::unistd::Pid;

use crate::dump::inject::{Injector, OUT_AT, SCRATCH_SIZE};
use crate::dump::memory::RunCursor;
use crate::image::PageRun;
use crate::procfs::PAGE_SIZE;
use crate::{Error, Result, procmem, sys};

/// Pipe size asked for: the default `pipe-max-size` (larger needs
/// CAP_SYS_RESOURCE). The kernel may give less; its answer is used.
const PIPE_SIZE: u64 = 1 << 20;
/// Ranges per `vmsplice`: the kernel's `UIO_MAXIOV`, and what fits in the
/// scratch memory after the pipe's two descriptors.
const MAX_IOV: usize = 1024;
const IOV_AT: u64 = OUT_AT + 64;
const _: () = assert!(IOV_AT + MAX_IOV as u64 * 16 <= SCRATCH_SIZE);

fn fail(pid: Pid, detail: String) -> Error {
    Error::Memory {
        pid: pid.as_raw(),
        op: "splice",
        detail,
    }
}

/// A pipe whose write end is in the stopped process and whose read end
/// is the engine's. Dropping it closes the process's end again.
pub struct PageSplicer<'a> {
    inj: &'a mut Injector,
    pid: Pid,
    write_end: u64,
    read_end: OwnedFd,
    capacity: u64,
}

impl<'a> PageSplicer<'a> {
    /// Makes the pipe: `pipe2` in the process, its read end taken over.
    pub fn open(inj: &'a mut Injector) -> Result<PageSplicer<'a>> {
        let pid = inj.pid();
        let scratch = inj.scratch()?;
        inj.remote(pid).call(
            "pipe2 for pages",
            crate::nr::SYS_pipe2,
            &[scratch + OUT_AT, libc::O_CLOEXEC as u64],
        )?;
        let mut fds = [0u8; 8];
        inj.read_scratch(OUT_AT, &mut fds)?;
        let read_fd = i32::from_ne_bytes(fds[..4].try_into().expect("4 bytes"));
        let write_fd = i32::from_ne_bytes(fds[4..].try_into().expect("4 bytes"));
        // The process keeps only the write end, closed again on drop.
        let taken = sys::pidfd_open(pid).and_then(|p| sys::steal_fd_via(&p, read_fd));
        let closed = inj
            .remote(pid)
            .call("close", crate::nr::SYS_close, &[read_fd as u64]);
        let read_end = match taken {
            Ok(fd) => fd,
            Err(e) => {
                let _ = (inj.remote(pid)).call("close", crate::nr::SYS_close, &[write_fd as u64]);
                return Err(fail(pid, format!("take the pipe's read end: {e}")));
            }
        };
        let mut splicer = PageSplicer {
            inj,
            pid,
            write_end: write_fd as u64,
            read_end,
            capacity: PAGE_SIZE,
        };
        closed?;
        let mut r = splicer.inj.remote(pid);
        // A smaller pipe only means more calls.
        let _ = r.raw(
            crate::nr::SYS_fcntl,
            &[splicer.write_end, libc::F_SETPIPE_SZ as u64, PIPE_SIZE],
        );
        let size = r.call(
            "pipe size",
            crate::nr::SYS_fcntl,
            &[splicer.write_end, libc::F_GETPIPE_SZ as u64],
        )?;
        splicer.capacity = size.max(PAGE_SIZE);
        Ok(splicer)
    }

    /// Moves the pages of `runs` (readable by the process) into `file`,
    /// each run at its offset; returns the bytes moved. With `writeback`,
    /// each piece starts on its way to the disk at once (the image is to
    /// be synced before the tree is killed).
    pub fn copy(&mut self, runs: &[PageRun], file: &File, writeback: bool) -> Result<u64> {
        let mut cursor = RunCursor::default();
        let mut moved = 0;
        loop {
            let (iov, bytes) = cursor.chunk(runs, self.capacity, MAX_IOV);
            if iov.is_empty() {
                return Ok(moved);
            }
            let at = cursor.file_at(runs);
            let mut table = Vec::with_capacity(iov.len() * 16);
            for (base, len) in &iov {
                table.extend_from_slice(&base.to_ne_bytes());
                table.extend_from_slice(&len.to_ne_bytes());
            }
            let scratch = self.inj.scratch()?;
            procmem::write(self.pid, scratch + IOV_AT, &table)?;
            let got = self.inj.remote(self.pid).call(
                "vmsplice",
                libc::SYS_vmsplice,
                &[self.write_end, scratch + IOV_AT, iov.len() as u64, 0],
            )?;
            if got == 0 || got > bytes {
                return Err(fail(
                    self.pid,
                    format!("vmsplice took {got} of {bytes} bytes"),
                ));
            }
            self.drain(file, at, got)?;
            if writeback {
                // Only sooner: the sync that follows is what counts.
                let _ = sys::start_writeback(file, at, got);
            }
            cursor.advance(runs, got);
            moved += got;
        }
    }

    /// Moves `len` bytes from the pipe into `file` at `at`.
    fn drain(&self, file: &File, at: u64, len: u64) -> Result<()> {
        let mut off = at as libc::loff_t;
        let mut left = len as usize;
        while left > 0 {
            let n = nix::fcntl::splice(
                self.read_end.as_fd(),
                None,
                file.as_fd(),
                Some(&mut off),
                left,
                SpliceFFlags::SPLICE_F_MOVE,
            )
            .map_err(|e| fail(self.pid, format!("splice into the pages file: {e}")))?;
            if n == 0 {
                return Err(fail(self.pid, "the pipe ran dry".into()));
            }
            left -= n;
        }
        Ok(())
    }
}

impl Drop for PageSplicer<'_> {
    fn drop(&mut self) {
        let mut r = self.inj.remote(self.pid);
        let _ = r.call("close", crate::nr::SYS_close, &[self.write_end]);
    }
}
