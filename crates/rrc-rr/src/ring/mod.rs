//! A single-producer single-consumer byte ring in shared memory.
//!
//! The application thread that records events is the producer; the agent
//! draining the log is the consumer; they are different processes sharing
//! a sealed `memfd` mapped `MAP_SHARED`. Everything either side needs is in
//! the mapping itself, laid out `#[repr(C)]` with a magic number and a
//! layout version so two separately built binaries can check they agree.
//!
//! # Layout
//!
//! | offset | size | field                                              |
//! |-------:|-----:|----------------------------------------------------|
//! | 0      | 8    | magic `RRCRING\0`                                  |
//! | 8      | 4    | layout version (1)                                 |
//! | 12     | 4    | header length (192); data starts here              |
//! | 16     | 8    | capacity in bytes, a power of two                  |
//! | 24     | 4    | producer claimed (0/1)                             |
//! | 28     | 4    | consumer claimed (0/1)                             |
//! | 64     | 8    | tail: total bytes ever published (producer writes) |
//! | 128    | 8    | head: total bytes ever consumed (consumer writes)  |
//! | 192    | cap  | data                                               |
//!
//! Head and tail sit on their own 64-byte cache lines so the two sides do
//! not invalidate each other's line on every update. They are free-running
//! 64-bit byte counters (they never wrap in practice); a position maps to
//! `data[pos & (capacity - 1)]`. The ring holds `tail - head` bytes.
//!
//! Messages are a 4-byte little-endian length followed by the bytes, both
//! possibly wrapping around the end of the data area. A message is
//! published whole or not at all.
//!
//! # Memory ordering
//!
//! The producer copies a message into `[tail, tail + n)` and then stores
//! the new tail with `Release`; the consumer loads the tail with `Acquire`,
//! which makes the message bytes visible before it reads them. Symmetrically
//! the consumer stores the head with `Release` after it has copied a
//! message out, and the producer loads the head with `Acquire` before it
//! reuses that space, so it cannot overwrite bytes still being read. Each
//! counter has exactly one writer, so no read-modify-write is needed. The
//! atomics are lock-free 64-bit operations on the shared page, which the
//! hardware keeps coherent across processes exactly as across threads.
//!
//! # Wake-ups
//!
//! A producer may be given an eventfd. After publishing, it writes to the
//! eventfd only if the ring was empty just before its message, i.e. the
//! consumer had caught up and may be asleep. That check and the consumer's
//! decision to sleep form a store-buffering (Dekker) pattern: the producer
//! stores the tail then loads the head, the consumer stores the head then
//! loads the tail. Both sides put a `SeqCst` fence between their store and
//! their load ([`Producer::try_push`], [`Consumer::ready_to_sleep`]), so at
//! least one of them sees the other's store: either the consumer sees the
//! new message and does not sleep, or the producer sees the ring drained
//! and wakes it. The consumer's loop is: drain; if `ready_to_sleep()`,
//! wait on the eventfd ([`wait_eventfd`]); repeat. Several rings may share
//! one eventfd.

mod set;
mod shm;

use std::io;
#[cfg(test)]
use std::os::fd::AsFd;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::Duration;

use thiserror::Error;

pub use set::{
    CopyMark, EAGER, KNOWN_FLAGS, REPLAY_REQUESTED, RingSet, SET_VERSION, STOP_REQUESTED, SlotInfo,
    SlotState, mark_copy, request_replay,
};
use shm::SharedMemory;

#[cfg(not(target_has_atomic = "64"))]
compile_error!("the shared ring needs lock-free 64-bit atomics");

/// Magic number at the start of a ring header: `RRCRING\0`.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"RRCRING\0");
/// Layout version of the ring header.
pub const RING_VERSION: u32 = 1;
/// Bytes before a ring's data area.
pub const RING_HEADER_LEN: usize = size_of::<RingHeader>();
/// Smallest allowed capacity.
pub const MIN_CAPACITY: u64 = 64;
/// Largest allowed capacity.
pub const MAX_CAPACITY: u64 = 1 << 40;
/// Bytes of framing in front of every message.
pub const MESSAGE_OVERHEAD: usize = 4;

/// Errors setting up or reading a ring.
#[derive(Debug, Error)]
pub enum RingError {
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The requested capacity is unusable.
    #[error("ring capacity {0} is not a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}")]
    BadCapacity(u64),
    /// The mapping is smaller than its headers say it must be.
    #[error("{what} needs {needed} bytes but the shared memory has {len}")]
    TooSmall {
        /// The structure that does not fit.
        what: &'static str,
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The memfd's size is not sealed, so another process could truncate it.
    #[error("shared memory fd is not sealed against resizing")]
    Unsealed,
    /// The magic number is wrong: not a ring, or not initialized.
    #[error("bad {what} magic {found:#018x}")]
    BadMagic {
        /// Ring or ring set.
        what: &'static str,
        /// The value found.
        found: u64,
    },
    /// Built against a different layout.
    #[error("{what} layout version {found} is not supported (this build uses {supported})")]
    Version {
        /// Ring or ring set.
        what: &'static str,
        /// Version found.
        found: u32,
        /// Version expected.
        supported: u32,
    },
    /// Someone already holds that end of the ring.
    #[error("the ring's {role} is already claimed")]
    Claimed {
        /// `"producer"` or `"consumer"`.
        role: &'static str,
    },
    /// The shared counters or a message length are impossible; the peer
    /// is broken or hostile. The consumer stops reading that ring.
    #[error("ring state is inconsistent: {what} (head {head}, tail {tail}, capacity {capacity})")]
    Corrupt {
        /// What is wrong.
        what: &'static str,
        /// Consumer position.
        head: u64,
        /// Producer position.
        tail: u64,
        /// Ring capacity.
        capacity: u64,
    },
    /// A slot index beyond the set.
    #[error("slot {index} does not exist (the set has {count})")]
    NoSuchSlot {
        /// Requested slot.
        index: usize,
        /// Slots in the set.
        count: usize,
    },
    /// Every slot of the set is in use.
    #[error("all {count} ring slots are in use")]
    NoFreeSlot {
        /// Slots in the set.
        count: usize,
    },
    /// The set asks for behaviour this build does not know.
    #[error("ring set flags {flags:#x} include ones this build does not know")]
    UnknownFlags {
        /// The flags.
        flags: u32,
    },
    /// A slot was not in the state the operation requires.
    #[error("slot {index} is {found:?}, expected {expected:?}")]
    SlotState {
        /// The slot.
        index: usize,
        /// Its state.
        found: SlotState,
        /// The state required.
        expected: SlotState,
    },
}

/// The shared ring header. All fields another process may touch are
/// atomics, so concurrent access through `&RingHeader` is well defined and
/// any bit pattern (e.g. fresh zeroed memory) is a valid value.
#[repr(C, align(64))]
pub(crate) struct RingHeader {
    magic: AtomicU64,
    version: AtomicU32,
    header_len: AtomicU32,
    capacity: AtomicU64,
    producer_claimed: AtomicU32,
    consumer_claimed: AtomicU32,
    _pad0: [AtomicU64; 4],
    tail: AtomicU64,
    _pad1: [AtomicU64; 7],
    head: AtomicU64,
    _pad2: [AtomicU64; 7],
}

const _: () = {
    assert!(size_of::<RingHeader>() == 192);
    assert!(std::mem::offset_of!(RingHeader, tail) == 64);
    assert!(std::mem::offset_of!(RingHeader, head) == 128);
};

fn check_capacity(capacity: u64) -> Result<(), RingError> {
    if capacity.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        Ok(())
    } else {
        Err(RingError::BadCapacity(capacity))
    }
}

/// Bytes of shared memory a ring of `capacity` occupies.
pub fn ring_region_len(capacity: u64) -> usize {
    RING_HEADER_LEN + capacity as usize
}

/// A view of one initialized ring in a live mapping.
#[derive(Clone, Copy)]
pub(crate) struct RingRef<'a> {
    header: &'a RingHeader,
    data: *mut u8,
    /// Read once when the ring was validated and never again from shared
    /// memory, so a peer rewriting the header cannot make us index out of
    /// the mapping.
    capacity: u64,
}

impl<'a> RingRef<'a> {
    /// Writes a fresh ring header at `base`.
    ///
    /// # Safety
    /// `base` must be 64-byte aligned and point to at least
    /// `ring_region_len(capacity)` writable bytes of a mapping that lives
    /// for `'a`, not yet in use by any producer or consumer.
    pub(crate) unsafe fn init(base: *mut u8, capacity: u64) -> Result<RingRef<'a>, RingError> {
        check_capacity(capacity)?;
        // SAFETY: the caller guarantees alignment, size and lifetime; the
        // header is all atomics, valid for any contents.
        let header = unsafe { &*base.cast::<RingHeader>() };
        header.version.store(RING_VERSION, Ordering::Relaxed);
        header
            .header_len
            .store(RING_HEADER_LEN as u32, Ordering::Relaxed);
        header.capacity.store(capacity, Ordering::Relaxed);
        header.producer_claimed.store(0, Ordering::Relaxed);
        header.consumer_claimed.store(0, Ordering::Relaxed);
        header.tail.store(0, Ordering::Relaxed);
        header.head.store(0, Ordering::Relaxed);
        // Release: whoever sees the magic (Acquire in `attach`) sees the
        // fields above.
        header.magic.store(RING_MAGIC, Ordering::Release);
        Ok(RingRef {
            header,
            // SAFETY: the data area starts right after the header, inside
            // the region the caller vouched for.
            data: unsafe { base.add(RING_HEADER_LEN) },
            capacity,
        })
    }

    /// Validates the ring header at `base` and returns a view of it.
    ///
    /// # Safety
    /// `base` must be 64-byte aligned and point to `len` bytes of a shared
    /// mapping that stays mapped for `'a`.
    pub(crate) unsafe fn attach(base: *mut u8, len: usize) -> Result<RingRef<'a>, RingError> {
        if len < RING_HEADER_LEN {
            return Err(RingError::TooSmall {
                what: "ring header",
                len,
                needed: RING_HEADER_LEN,
            });
        }
        // SAFETY: aligned, in bounds (checked above), mapped for 'a (caller);
        // the header is all atomics, so any contents are valid.
        let header = unsafe { &*base.cast::<RingHeader>() };
        let magic = header.magic.load(Ordering::Acquire);
        if magic != RING_MAGIC {
            return Err(RingError::BadMagic {
                what: "ring",
                found: magic,
            });
        }
        let version = header.version.load(Ordering::Relaxed);
        let header_len = header.header_len.load(Ordering::Relaxed);
        if version != RING_VERSION || header_len as usize != RING_HEADER_LEN {
            return Err(RingError::Version {
                what: "ring",
                found: version,
                supported: RING_VERSION,
            });
        }
        let capacity = header.capacity.load(Ordering::Relaxed);
        check_capacity(capacity)?;
        let needed = ring_region_len(capacity);
        if needed > len {
            return Err(RingError::TooSmall {
                what: "ring data",
                len,
                needed,
            });
        }
        Ok(RingRef {
            header,
            // SAFETY: header and `capacity` data bytes fit in `len` (checked).
            data: unsafe { base.add(RING_HEADER_LEN) },
            capacity,
        })
    }

    fn mask(&self) -> u64 {
        self.capacity - 1
    }

    /// Copies `src` into the data area starting at ring position `pos`,
    /// wrapping at the end.
    ///
    /// Only the producer calls this, on space in `[tail, head + capacity)`
    /// that the consumer has released and will not read until the tail is
    /// published past it.
    fn copy_in(&self, pos: u64, src: &[u8]) {
        debug_assert!(src.len() as u64 <= self.capacity);
        let idx = (pos & self.mask()) as usize;
        let first = src.len().min(self.capacity as usize - idx);
        // SAFETY: `idx < capacity` and `first <= capacity - idx`, so the
        // first copy stays in the data area; the rest (`src.len() - first
        // <= capacity`, as callers never pass more than capacity) lands at
        // its start. The destination is producer-owned space (see above),
        // so no one reads or writes it concurrently, and it cannot overlap
        // `src`, which is private memory of the caller.
        unsafe {
            ptr::copy_nonoverlapping(src.as_ptr(), self.data.add(idx), first);
            ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data, src.len() - first);
        }
    }

    /// Copies bytes at ring position `pos` out into `dst`, wrapping.
    ///
    /// Only the consumer calls this, on published bytes in `[head, tail)`
    /// that the producer will not touch until the head moves past them.
    fn copy_out(&self, pos: u64, dst: &mut [u8]) {
        debug_assert!(dst.len() as u64 <= self.capacity);
        let idx = (pos & self.mask()) as usize;
        let first = dst.len().min(self.capacity as usize - idx);
        // SAFETY: bounds as in `copy_in` (`dst.len() <= capacity` is checked
        // by callers against `tail - head <= capacity`). The source is
        // consumer-owned published data the producer leaves alone, and
        // `dst` is private memory, so the ranges are disjoint.
        unsafe {
            ptr::copy_nonoverlapping(self.data.add(idx), dst.as_mut_ptr(), first);
            ptr::copy_nonoverlapping(self.data, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }

    /// Claims the producer end.
    pub(crate) fn producer(self) -> Result<Producer<'a>, RingError> {
        claim(&self.header.producer_claimed, "producer")?;
        let tail = self.header.tail.load(Ordering::Acquire);
        let head = self.header.head.load(Ordering::Acquire);
        if tail.wrapping_sub(head) > self.capacity {
            self.header.producer_claimed.store(0, Ordering::Release);
            return Err(self.corrupt("producer found more data than capacity", head, tail));
        }
        Ok(Producer {
            ring: self,
            tail,
            head_cache: head,
            wake: None,
        })
    }

    /// Claims the consumer end.
    pub(crate) fn consumer(self) -> Result<Consumer<'a>, RingError> {
        claim(&self.header.consumer_claimed, "consumer")?;
        let head = self.header.head.load(Ordering::Acquire);
        Ok(Consumer {
            ring: self,
            head,
            tail_cache: head,
            poisoned: false,
        })
    }

    fn corrupt(&self, what: &'static str, head: u64, tail: u64) -> RingError {
        RingError::Corrupt {
            what,
            head,
            tail,
            capacity: self.capacity,
        }
    }

    /// Whether the ring holds no bytes, as seen now.
    pub(crate) fn is_empty(&self) -> bool {
        self.header.head.load(Ordering::Acquire) == self.header.tail.load(Ordering::Acquire)
    }
}

fn claim(flag: &AtomicU32, role: &'static str) -> Result<(), RingError> {
    // Acquire pairs with the Release in the previous holder's drop, so we
    // see the counters as it left them.
    flag.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .map(drop)
        .map_err(|_| RingError::Claimed { role })
}

/// Writes one wake-up to an eventfd. Errors are ignored: `EAGAIN` means
/// the counter is already huge, i.e. a wake-up is pending anyway.
pub fn notify_eventfd(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Creates a non-blocking, close-on-exec eventfd suitable for
/// [`Producer::set_wake_fd`] and [`wait_eventfd`].
pub fn new_eventfd() -> Result<OwnedFd, RingError> {
    rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .map_err(|e| RingError::Io {
        op: "eventfd",
        source: e.into(),
    })
}

/// Waits until the eventfd is signalled or `timeout` passes, consuming
/// the pending wake-ups. Returns whether it was signalled.
pub fn wait_eventfd(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<bool, RingError> {
    let io = |op| {
        move |e: rustix::io::Errno| RingError::Io {
            op,
            source: e.into(),
        }
    };
    let ts = timeout.map(|t| rustix::event::Timespec {
        tv_sec: t.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: t.subsec_nanos().into(),
    });
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    loop {
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(0) => return Ok(false),
            Ok(_) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io("poll eventfd")(e)),
        }
    }
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(_) => Ok(true),
        // Another waiter consumed it first: still a wake-up for us.
        Err(rustix::io::Errno::AGAIN) => Ok(true),
        Err(e) => Err(io("read eventfd")(e)),
    }
}

/// The writing end of a ring. Lives in the recording thread.
///
/// Never allocates, never blocks, never panics.
pub struct Producer<'a> {
    ring: RingRef<'a>,
    /// Our tail; the shared copy is only ever written by us.
    tail: u64,
    /// Last head we read; refreshed only when the ring looks full, which
    /// keeps the consumer's cache line out of the fast path.
    head_cache: u64,
    wake: Option<BorrowedFd<'a>>,
}

// SAFETY: a `Producer` is the unique writer of its ring (enforced by the
// claim flag); the raw data pointer refers to shared memory valid for 'a,
// not to anything tied to the creating thread, so it may move to another
// thread.
unsafe impl Send for Producer<'_> {}

impl<'a> Producer<'a> {
    /// Wakes the consumer through `fd` (an eventfd) whenever a push makes
    /// the ring non-empty.
    pub fn set_wake_fd(&mut self, fd: Option<BorrowedFd<'a>>) {
        self.wake = fd;
    }

    /// Largest message this ring can carry.
    pub fn max_message_len(&self) -> usize {
        (self.ring.capacity as usize - MESSAGE_OVERHEAD).min(u32::MAX as usize)
    }

    /// Appends `msg` as one message if there is room for all of it.
    /// Returns `false`, with nothing written, if there is not.
    pub fn try_push(&mut self, msg: &[u8]) -> bool {
        if msg.len() > self.max_message_len() {
            return false;
        }
        let need = (MESSAGE_OVERHEAD + msg.len()) as u64;
        let cap = self.ring.capacity;
        if self.tail - self.head_cache + need > cap {
            // Acquire: the consumer finished reading everything before this
            // head before publishing it, so that space is ours to reuse.
            let head = self.ring.header.head.load(Ordering::Acquire);
            // A head outside [tail - capacity, tail] is a broken consumer;
            // refuse rather than overwrite unread data.
            let used = self.tail.wrapping_sub(head);
            if used > cap {
                return false;
            }
            self.head_cache = head;
            if used + need > cap {
                return false;
            }
        }
        let old_tail = self.tail;
        self.ring
            .copy_in(old_tail, &(msg.len() as u32).to_le_bytes());
        self.ring.copy_in(old_tail + MESSAGE_OVERHEAD as u64, msg);
        self.tail = old_tail + need;
        // Release: the bytes copied above are visible to a consumer that
        // loads this tail with Acquire.
        self.ring.header.tail.store(self.tail, Ordering::Release);
        if let Some(fd) = self.wake {
            // SeqCst fence between our tail store and head load; pairs with
            // the fence in `Consumer::ready_to_sleep` (see module docs).
            fence(Ordering::SeqCst);
            if self.ring.header.head.load(Ordering::Relaxed) == old_tail {
                notify_eventfd(fd);
            }
        }
        true
    }

    /// Bytes currently free, as far as this producer knows (may be stale
    /// low, never high).
    pub fn free_space(&self) -> u64 {
        self.ring.capacity - (self.tail - self.head_cache)
    }
}

impl Drop for Producer<'_> {
    fn drop(&mut self) {
        // Release: the next producer's Acquire claim sees our final tail.
        self.ring
            .header
            .producer_claimed
            .store(0, Ordering::Release);
    }
}

/// The reading end of a ring. Lives in the agent.
///
/// Treats the producer as untrusted: impossible counters or lengths are
/// reported as [`RingError::Corrupt`] and reading stops; nothing read
/// from shared memory can make it index outside the ring or allocate more
/// than the ring's capacity.
pub struct Consumer<'a> {
    ring: RingRef<'a>,
    head: u64,
    /// Last tail we read; everything before it is published.
    tail_cache: u64,
    poisoned: bool,
}

// SAFETY: as for `Producer`: the unique reader (claim flag) of memory that
// is valid for 'a independent of any thread.
unsafe impl Send for Consumer<'_> {}

impl Consumer<'_> {
    /// Bytes published and not yet consumed.
    fn available(&mut self) -> Result<u64, RingError> {
        if self.poisoned {
            return Err(self.ring.corrupt(
                "ring was found corrupt earlier",
                self.head,
                self.tail_cache,
            ));
        }
        if self.head == self.tail_cache {
            // Acquire: pairs with the producer's Release store, making the
            // message bytes before the new tail visible to us.
            self.tail_cache = self.ring.header.tail.load(Ordering::Acquire);
        }
        let used = self.tail_cache.wrapping_sub(self.head);
        if used > self.ring.capacity {
            self.poisoned = true;
            return Err(self.ring.corrupt(
                "tail is not within capacity of head",
                self.head,
                self.tail_cache,
            ));
        }
        Ok(used)
    }

    /// Moves the next message into `out` (replacing its contents).
    /// Returns `Ok(false)` if the ring is empty.
    pub fn pop_into(&mut self, out: &mut Vec<u8>) -> Result<bool, RingError> {
        let used = self.available()?;
        if used == 0 {
            return Ok(false);
        }
        let mut len_bytes = [0u8; MESSAGE_OVERHEAD];
        if used < MESSAGE_OVERHEAD as u64 {
            self.poisoned = true;
            return Err(self
                .ring
                .corrupt("partial message length", self.head, self.tail_cache));
        }
        self.ring.copy_out(self.head, &mut len_bytes);
        let len = u64::from(u32::from_le_bytes(len_bytes));
        if len + MESSAGE_OVERHEAD as u64 > used {
            self.poisoned = true;
            return Err(self.ring.corrupt(
                "message longer than published data",
                self.head,
                self.tail_cache,
            ));
        }
        out.clear();
        // Bounded by the ring's capacity through the check above.
        out.resize(len as usize, 0);
        self.ring.copy_out(self.head + MESSAGE_OVERHEAD as u64, out);
        self.head += MESSAGE_OVERHEAD as u64 + len;
        // Release: our reads of the message happen before the producer,
        // loading this head with Acquire, may overwrite the space.
        self.ring.header.head.store(self.head, Ordering::Release);
        Ok(true)
    }

    /// Pops every message currently available, handing each to `f`.
    /// `scratch` is reused as the message buffer. Returns how many.
    pub fn drain(
        &mut self,
        scratch: &mut Vec<u8>,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, RingError> {
        let mut n = 0;
        while self.pop_into(scratch)? {
            f(scratch);
            n += 1;
        }
        Ok(n)
    }

    /// Whether the consumer may block on the wake-up eventfd: true if the
    /// ring is empty after a full fence, in which case a producer pushing
    /// from now on is guaranteed to signal. See the module docs.
    pub fn ready_to_sleep(&mut self) -> bool {
        // Our last head store precedes this fence; the producer's tail
        // store precedes its own. Whichever fence comes second sees the
        // other side's store.
        fence(Ordering::SeqCst);
        self.ring.header.tail.load(Ordering::Relaxed) == self.head
    }
}

impl Drop for Consumer<'_> {
    fn drop(&mut self) {
        self.ring
            .header
            .consumer_claimed
            .store(0, Ordering::Release);
    }
}

/// A ring alone in its own memfd.
pub struct SharedRing {
    shm: SharedMemory,
    capacity: u64,
}

impl SharedRing {
    /// Creates a ring of `capacity` data bytes (a power of two) in a new
    /// sealed memfd.
    pub fn create(capacity: u64) -> Result<Self, RingError> {
        check_capacity(capacity)?;
        let shm = SharedMemory::create("rrc-ring", ring_region_len(capacity))?;
        // SAFETY: the mapping is page-aligned, exactly `ring_region_len`
        // long, owned by `shm` (which outlives the returned view's use
        // here), and nobody else has the fd yet.
        unsafe { RingRef::init(shm.as_ptr(), capacity)? };
        Ok(SharedRing { shm, capacity })
    }

    /// Maps a ring created by [`create`](Self::create), possibly in
    /// another process, from its fd.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RingError> {
        let shm = SharedMemory::open(fd, 0)?;
        // SAFETY: page-aligned mapping of `shm.len()` bytes owned by `shm`.
        let ring = unsafe { RingRef::attach(shm.as_ptr(), shm.len())? };
        let capacity = ring.capacity;
        Ok(SharedRing { shm, capacity })
    }

    fn ring(&self) -> RingRef<'_> {
        // SAFETY: validated (or initialized) at construction, with the
        // capacity cached then; the mapping lives as long as `self`.
        unsafe {
            RingRef {
                header: &*self.shm.as_ptr().cast::<RingHeader>(),
                data: self.shm.as_ptr().add(RING_HEADER_LEN),
                capacity: self.capacity,
            }
        }
    }

    /// The memfd, to pass to the other process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shm.fd()
    }

    /// Data capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Claims the producer end; fails if it is held.
    pub fn producer(&self) -> Result<Producer<'_>, RingError> {
        self.ring().producer()
    }

    /// Claims the consumer end; fails if it is held.
    pub fn consumer(&self) -> Result<Consumer<'_>, RingError> {
        self.ring().consumer()
    }

    /// Whether the ring is empty right now.
    pub fn is_empty(&self) -> bool {
        self.ring().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The consumer treats the producer as untrusted: impossible counters
    /// or lengths poison the ring instead of reading out of bounds.
    #[test]
    fn consumer_rejects_impossible_state() {
        let ring = SharedRing::create(64).unwrap();
        let header = ring.ring().header;
        let mut c = ring.consumer().unwrap();
        let mut out = Vec::new();

        header.tail.store(65, Ordering::Release);
        assert!(matches!(
            c.pop_into(&mut out),
            Err(RingError::Corrupt { tail: 65, .. })
        ));
        // Poisoned for good, even once the tail looks sane again.
        header.tail.store(0, Ordering::Release);
        assert!(c.pop_into(&mut out).is_err());
        drop(c);

        // A length prefix beyond the published bytes.
        let mut p = ring.producer().unwrap();
        assert!(p.try_push(&[1, 2, 3]));
        drop(p);
        ring.ring().copy_in(0, &1000u32.to_le_bytes());
        let mut c = ring.consumer().unwrap();
        assert!(matches!(
            c.pop_into(&mut out),
            Err(RingError::Corrupt {
                what: "message longer than published data",
                ..
            })
        ));
    }

    /// A head the consumer could never have written makes the producer
    /// refuse to write rather than overwrite unread data.
    #[test]
    fn producer_refuses_with_impossible_head() {
        let ring = SharedRing::create(64).unwrap();
        let header = ring.ring().header;
        let mut p = ring.producer().unwrap();
        for _ in 0..4 {
            assert!(p.try_push(&[0; 12]));
        }
        header.head.store(1000, Ordering::Release);
        assert!(!p.try_push(&[0; 12]));
    }

    #[test]
    fn wake_only_on_empty_to_non_empty() {
        let ring = SharedRing::create(256).unwrap();
        let efd = new_eventfd().unwrap();
        let mut p = ring.producer().unwrap();
        let mut c = ring.consumer().unwrap();
        p.set_wake_fd(Some(efd.as_fd()));
        let pending = || {
            let mut buf = [0u8; 8];
            rustix::io::read(&efd, &mut buf)
                .map(|_| u64::from_ne_bytes(buf))
                .unwrap_or(0)
        };
        assert!(p.try_push(b"a"));
        assert!(p.try_push(b"b"));
        assert_eq!(pending(), 1, "second push found the ring non-empty");
        let mut out = Vec::new();
        c.drain(&mut out, |_| {}).unwrap();
        assert!(c.ready_to_sleep());
        assert!(p.try_push(b"c"));
        assert!(!c.ready_to_sleep());
        assert_eq!(pending(), 1);
    }
}
