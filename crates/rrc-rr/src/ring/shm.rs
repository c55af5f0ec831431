//! Sealed `memfd` shared memory, mapped `MAP_SHARED`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use super::RingError;

/// A `memfd` and this process's shared mapping of all of it.
///
/// The size is sealed at creation (`F_SEAL_SHRINK | F_SEAL_GROW`) so no
/// process holding the fd can truncate it under another's mapping, which
/// would turn every access into `SIGBUS`. [`SharedMemory::open`] refuses
/// an fd without those seals for the same reason.
pub(crate) struct SharedMemory {
    file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared memory owned by this value, not tied to
// the thread that made it; every access to its contents goes through
// atomics or the rings' own protocol.
unsafe impl Send for SharedMemory {}
// SAFETY: as above; `&SharedMemory` only hands out the base pointer.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Creates a zero-filled region of `len` bytes.
    pub(crate) fn create(name: &str, len: usize) -> Result<Self, RingError> {
        let io = |op| {
            move |e: rustix::io::Errno| RingError::Io {
                op,
                source: e.into(),
            }
        };
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(io("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(io("ftruncate memfd"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(io("seal memfd"))?;
        Self::map(fd, len, 0)
    }

    /// Maps a region another process created with [`create`](Self::create),
    /// at `hint` if that address range is free (0: anywhere).
    pub(crate) fn open(fd: OwnedFd, hint: usize) -> Result<Self, RingError> {
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|e| RingError::Io {
            op: "read memfd seals",
            source: e.into(),
        })?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(RingError::Unsealed);
        }
        let stat = rustix::fs::fstat(&fd).map_err(|e| RingError::Io {
            op: "fstat memfd",
            source: e.into(),
        })?;
        let len = usize::try_from(stat.st_size).map_err(|_| RingError::TooSmall {
            what: "shared memory",
            len: 0,
            needed: 1,
        })?;
        Self::map(fd, len, hint)
    }

    fn map(fd: OwnedFd, len: usize, hint: usize) -> Result<Self, RingError> {
        let file = File::from(fd);
        // SAFETY: a new shared mapping of our own memfd; the hint is only a
        // hint (no MAP_FIXED), so nothing already mapped is replaced.
        let ptr = unsafe {
            rustix::mm::mmap(
                hint as *mut std::ffi::c_void,
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .map_err(|e| RingError::Io {
            op: "mmap memfd",
            source: e.into(),
        })?;
        Ok(SharedMemory {
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value made; nothing
        // refers to it once the value is dropped (users borrow from it).
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}
