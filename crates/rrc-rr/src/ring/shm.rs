//! Sealed `memfd` shared memory, mapped `MAP_SHARED`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{MemfdFlags, SealFlags};

use super::RingError;

/// A `memfd` and this process's shared mapping of all of it.
///
/// The size is sealed at creation (`F_SEAL_SHRINK | F_SEAL_GROW`) so no
/// process holding the fd can truncate it under another's mapping, which
/// would turn every access into `SIGBUS`. [`SharedMemory::open`] refuses
/// an fd without those seals for the same reason.
pub(crate) struct SharedMemory {
    file: File,
    map: MmapRaw,
}

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
        Self::map(fd, len)
    }

    /// Maps a region another process created with [`create`](Self::create).
    pub(crate) fn open(fd: OwnedFd) -> Result<Self, RingError> {
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
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> Result<Self, RingError> {
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(|source| RingError::Io {
                op: "mmap memfd",
                source,
            })?;
        Ok(SharedMemory { file, map })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
